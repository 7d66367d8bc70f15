//! Integer RTN throughput on the 512 MiB benchmark model (8 x 4096x4096 f32), as input MiB/s and as a
//! ratio to a plain parallel memcpy of one matrix measured in the same run.
//! Goals (issue 3, 2 cores): int8 per-channel >= 2.5 GiB/s; int4 group-128 with packing >= 2 GiB/s.

use std::time::Instant;

use modelpress::compress::metrics::error_metrics;
use modelpress::compress::quant::{
    pack_int32_into, pack_zero_points, packed_len, quantize_into, Granularity, IntParams, IntQuantized, ScaleSearch,
    StoreDtype,
};
use modelpress::compress::synth::{benchmark_model, memcpy_bytes_per_sec};

const ROWS: usize = 4096;
const COLS: usize = 4096;
const MIB: f64 = 1024.0 * 1024.0;

struct Buffers {
    q: IntQuantized,
    dequant: Vec<f32>,
    packed: Vec<i32>,
}

/// One pass over the model: quantize every matrix into reused buffers (and pack when asked).
fn run(model: &[(String, Vec<f32>)], p: &IntParams, pack: bool, b: &mut Buffers) -> f64 {
    let start = Instant::now();
    for (_, m) in model {
        quantize_into(m, ROWS, COLS, p, StoreDtype::F32, &mut b.q, &mut b.dequant).expect("benchmark data is finite");
        if pack {
            b.packed.resize(ROWS * packed_len(COLS, p.bits), 0);
            pack_int32_into(&b.q.codes, ROWS, COLS, p.bits, &mut b.packed);
            if let Some(z) = &b.q.zero_points {
                std::hint::black_box(pack_zero_points(z, b.q.scale_shape[0], b.q.scale_shape[1], p.bits));
            }
        }
    }
    std::hint::black_box(&b.packed);
    start.elapsed().as_secs_f64()
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("quant_int") {
        return;
    }
    let model = benchmark_model(8, ROWS, COLS);
    let bytes = (model.len() * ROWS * COLS * 4) as f64;
    let memcpy = memcpy_bytes_per_sec(&model[0].1, 5);
    println!(
        "model {:.0} MiB, {} threads, memcpy {:.0} MiB/s",
        bytes / MIB,
        rayon::current_num_threads(),
        memcpy / MIB
    );
    let mut b = Buffers { q: IntQuantized::default(), dequant: vec![0f32; ROWS * COLS], packed: Vec::new() };
    let p = |bits, granularity, symmetric, search| IntParams { bits, granularity, symmetric, search };
    let cases = [
        ("int8 per-channel sym", p(8, Granularity::Channel, true, ScaleSearch::None), false, 3),
        ("int4 group-128 sym + pack", p(4, Granularity::Group(128), true, ScaleSearch::None), true, 3),
        ("int4 group-128 sym, no pack", p(4, Granularity::Group(128), true, ScaleSearch::None), false, 3),
        ("int4 group-128 asym + pack", p(4, Granularity::Group(128), false, ScaleSearch::None), true, 3),
        ("int8 per-tensor sym", p(8, Granularity::Tensor, true, ScaleSearch::None), false, 3),
        ("int2 group-64 sym + pack", p(2, Granularity::Group(64), true, ScaleSearch::None), true, 3),
        ("int4 group-128 sym mse + pack", p(4, Granularity::Group(128), true, ScaleSearch::Mse), true, 1),
        ("int8 per-channel sym mse", p(8, Granularity::Channel, true, ScaleSearch::Mse), false, 1),
    ];
    // `cargo bench --bench quant_int -- mse` runs only the cases whose name contains an argument.
    let filters: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    for (name, params, pack, repeats) in cases {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let best = (0..repeats).map(|_| run(&model, &params, pack, &mut b)).fold(f64::MAX, f64::min);
        let speed = bytes / best;
        // Error on the last matrix, whose dequantization is still in the buffer.
        let err = error_metrics(&model[model.len() - 1].1, &b.dequant);
        println!(
            "{name:<32} {:>8.0} MiB/s  {:>5.2} GiB/s  x{:.3} memcpy  rel.err {:.5}  SQNR {:.2} dB",
            speed / MIB,
            speed / (MIB * 1024.0),
            speed / memcpy,
            err.relative_error,
            err.sqnr_db.unwrap_or(f64::INFINITY)
        );
    }
}
