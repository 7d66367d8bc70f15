//! Whole-engine benchmark on a generated model file: throughput and peak memory of real jobs
//! (read from disk, kernels, every output written), the figure the memory targets are about.
//!
//! `cargo bench --bench engine` (default 4 GiB model: 64 matrices 4096x4096 f32). Set
//! `MODELPRESS_BENCH_MATRICES=8` for a 512 MiB run. `cargo test` runs this binary without
//! `--bench`: it then exits at once.

use std::collections::BTreeMap;
use std::time::Instant;

use modelpress::compress::engine::{execute, Inputs, Silent};
use modelpress::compress::plan::{prepare, PlanInputs};
use modelpress::compress::spec::parse_compress;
use modelpress::compress::synth::{benchmark_matrix, memcpy_bytes_per_sec};
use modelpress::formats::safetensors::{read_header, Dtype, SafetensorsWriter};
use serde_json::json;

const MIB: f64 = (1u64 << 20) as f64;

/// Resets the kernel's peak-RSS counter (VmHWM) so each job's peak is measured alone.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn rss_field(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("engine") {
        return;
    }
    let matrices: usize = std::env::var("MODELPRESS_BENCH_MATRICES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let dir = tempfile::tempdir_in(std::env::var("MODELPRESS_BENCH_DIR").unwrap_or_else(|_| ".".into())).unwrap();
    let model = dir.path().join("model.safetensors");
    let t0 = Instant::now();
    {
        let mut w = SafetensorsWriter::create(&model).unwrap();
        let mut bytes = Vec::new();
        for i in 0..matrices {
            let m = benchmark_matrix(4096, 4096, 0x5EED_0000 + i as u64);
            bytes.clear();
            bytes.extend(m.iter().flat_map(|v| v.to_le_bytes()));
            w.write(&format!("layers.{i}.weight"), Dtype::F32, &[4096, 4096], &bytes).unwrap();
        }
        w.finish(&BTreeMap::new()).unwrap();
    }
    let size = std::fs::metadata(&model).unwrap().len();
    println!(
        "generated {:.0} MiB model ({matrices} x 4096x4096 f32) in {:.1} s",
        size as f64 / MIB,
        t0.elapsed().as_secs_f64()
    );
    let probe = benchmark_matrix(4096, 4096, 1);
    let memcpy = memcpy_bytes_per_sec(&probe, 5);
    println!("memcpy baseline: {:.0} MiB/s", memcpy / MIB);
    let header = read_header(&model, u64::MAX).unwrap();

    let cases = [
        ("int8/channel -> safetensors", json!([{"op": "quantize", "bits": 8}]), json!(["safetensors"])),
        (
            "int4/group128 -> compressed-tensors",
            json!([{"op": "quantize", "bits": 4, "granularity": "group"}]),
            json!(["compressed-tensors"]),
        ),
        ("q4_k -> gguf", json!([{"op": "quantize", "gguf_type": "q4_k"}]), json!(["gguf"])),
        (
            "50% global magnitude -> sparse",
            json!([{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.5}]),
            json!(["sparse"]),
        ),
    ];
    println!("{:<40} {:>10} {:>10} {:>12} {:>14}", "job", "seconds", "MiB/s", "peak RSS MiB", "largest tensor");
    for (name, steps, outputs) in cases {
        let spec = parse_compress(&steps, Some(&outputs)).unwrap();
        let p = prepare(spec, PlanInputs::model(header.clone()));
        let out = tempfile::tempdir_in(dir.path()).unwrap();
        reset_peak_rss();
        let start = Instant::now();
        let inputs = Inputs::model(&model, "bench", "bench");
        execute(&p, &inputs, out.path(), &Silent).unwrap();
        let secs = start.elapsed().as_secs_f64();
        let peak = rss_field("VmHWM:");
        println!(
            "{name:<40} {secs:>10.2} {:>10.0} {:>12.0} {:>11.0} MiB   (predicted peak {:.0} MiB)",
            size as f64 / MIB / secs,
            peak as f64 / MIB,
            (4096 * 4096 * 4) as f64 / MIB,
            p.peak_memory_bytes as f64 / MIB
        );
    }
}
