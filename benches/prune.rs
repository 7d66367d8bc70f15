//! Pruning and sparse-encoding throughput on the 512 MiB synthetic model (8 x 4096x4096 f32).
//!
//! Every kernel runs on a fresh copy of the dense weights (the copy is not timed); figures are in MiB
//! of dense f32 input per second and as a ratio to a parallel memcpy measured in the same run.

use std::time::Instant;

use modelpress::compress::prune::{
    prune_magnitude, prune_n_m, prune_rows, GlobalMagnitude, Norm, DEFAULT_M, DEFAULT_N,
};
use modelpress::compress::synth::{benchmark_model, memcpy_bytes_per_sec};
use modelpress::formats::safetensors::Dtype;
use modelpress::formats::sparse::SparseEncoder;

const REPEATS: usize = 5;
const ROWS: usize = 4096;
const COLS: usize = 4096;
const MIB: f64 = 1024.0 * 1024.0;

fn report(name: &str, bytes: usize, secs: f64, memcpy: f64) {
    let rate = bytes as f64 / secs;
    println!("{name:<34} {:>8.0} MiB/s  {:>6.3} x memcpy  ({:.1} ms)", rate / MIB, rate / memcpy, secs * 1e3);
}

/// Sum over tensors of each tensor's best-of-REPEATS time (robust to noisy neighbours on a shared
/// machine); every run starts from the dense weights copied into `work` (not timed).
fn per_tensor(model: &[(String, Vec<f32>)], work: &mut [f32], mut kernel: impl FnMut(&mut [f32])) -> f64 {
    let mut total = 0.0;
    for (_, dense) in model {
        let mut best = f64::MAX;
        for _ in 0..REPEATS {
            work.copy_from_slice(dense);
            let start = Instant::now();
            kernel(work);
            best = best.min(start.elapsed().as_secs_f64());
        }
        total += best;
    }
    total
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("prune") {
        return;
    }
    let start = Instant::now();
    let model = benchmark_model(8, ROWS, COLS);
    let bytes: usize = model.iter().map(|(_, t)| t.len() * 4).sum();
    println!(
        "model: {} tensors, {:.0} MiB, generated in {:.1} s, {} threads",
        model.len(),
        bytes as f64 / MIB,
        start.elapsed().as_secs_f64(),
        rayon::current_num_threads()
    );
    let memcpy = memcpy_bytes_per_sec(&model[0].1, 5);
    println!("memcpy                             {:>8.0} MiB/s", memcpy / MIB);

    let mut work = vec![0f32; ROWS * COLS];
    let secs = per_tensor(&model, &mut work, |w| {
        prune_magnitude(w, 0.5).unwrap();
    });
    report("magnitude layer 50%", bytes, secs, memcpy);

    let mut tensors: Vec<Vec<f32>> = model.iter().map(|(_, t)| t.clone()).collect();
    let mut best = f64::MAX;
    let mut passes = 0;
    for _ in 0..REPEATS {
        for (w, (_, dense)) in tensors.iter_mut().zip(&model) {
            w.copy_from_slice(dense);
        }
        let start = Instant::now();
        let mut plan = GlobalMagnitude::new(0.5, (bytes / 4) as u64).unwrap();
        passes = 1;
        while plan.needs_pass() {
            let pass = plan.pass();
            for t in &tensors {
                plan.observe(pass, t).unwrap();
            }
            plan.end_pass().unwrap();
            passes += 1;
        }
        let cut = plan.cut().unwrap();
        let mut ties = cut.start();
        let pruned: u64 = tensors.iter_mut().map(|t| cut.apply(t, &mut ties).pruned).sum();
        best = best.min(start.elapsed().as_secs_f64());
        assert_eq!(pruned, plan.target());
    }
    drop(tensors);
    report(&format!("magnitude global 50% ({passes} passes)"), bytes, best, memcpy);

    let secs = per_tensor(&model, &mut work, |w| {
        prune_n_m(w, ROWS, COLS, DEFAULT_N, DEFAULT_M).unwrap();
    });
    report("n:m 2:4", bytes, secs, memcpy);

    let secs = per_tensor(&model, &mut work, |w| {
        prune_rows(w, ROWS, COLS, 0.5, Norm::L2).unwrap();
    });
    report("structured rows L2 50%", bytes, secs, memcpy);

    // The encoder runs on 50%-pruned weights, the case the sparse format is meant for.
    let pruned: Vec<Vec<f32>> = model
        .iter()
        .map(|(_, t)| {
            let mut t = t.clone();
            prune_magnitude(&mut t, 0.5).unwrap();
            t
        })
        .collect();
    let mut enc = SparseEncoder::new();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let mut best = f64::MAX;
        let mut out = 0usize;
        for _ in 0..REPEATS {
            let start = Instant::now();
            out = 0;
            for t in &pruned {
                let parts = enc.encode(t, &[ROWS, COLS], dtype).unwrap();
                out += parts.iter().map(|p| p.data.len()).sum::<usize>();
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        report(&format!("sparse encode 50% -> {dtype:?}"), bytes, best, memcpy);
        println!("    output {:.1}% of dense f32 bytes", 100.0 * out as f64 / bytes as f64);
    }
}
