//! Deterministic synthetic weights for benchmarks and tests.
//!
//! The benchmark model of the product targets: f32 matrices drawn from normal(0, 0.02), with 4 input
//! columns scaled x8 (the "outlier channels" real LLM weights show) and 64 single outliers of
//! magnitude 0.5-2.0, all from a fixed seed so every run measures the same data.

use std::time::Instant;

/// SplitMix64: tiny, fast and good enough for test data; avoids a `rand` dependency.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Standard normal by Box-Muller (one value per call; the twin is dropped for simplicity).
    pub fn next_normal(&mut self) -> f64 {
        let u1 = self.next_f64().max(f64::MIN_POSITIVE);
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// One `rows x cols` matrix of the benchmark distribution.
pub fn benchmark_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    let mut data: Vec<f32> = (0..rows * cols).map(|_| (rng.next_normal() * 0.02) as f32).collect();
    let scaled_cols: Vec<usize> = (0..4).map(|_| rng.next_u64() as usize % cols).collect();
    for row in data.chunks_exact_mut(cols) {
        for &c in &scaled_cols {
            row[c] *= 8.0;
        }
    }
    for _ in 0..64 {
        let i = rng.next_u64() as usize % data.len();
        let magnitude = 0.5 + 1.5 * rng.next_f64();
        let sign = if rng.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
        data[i] = (sign * magnitude) as f32;
    }
    data
}

/// The product's benchmark model: `count` matrices `rows x cols` named `layers.{i}.weight`.
pub fn benchmark_model(count: usize, rows: usize, cols: usize) -> Vec<(String, Vec<f32>)> {
    (0..count).map(|i| (format!("layers.{i}.weight"), benchmark_matrix(rows, cols, 0x5EED_0000 + i as u64))).collect()
}

/// Throughput of a plain parallel memory copy of `src`, in bytes per second, best of `repeats`.
///
/// Every kernel benchmark prints its speed as a ratio to this figure measured in the same run, so
/// results compare across machines and across noisy neighbours.
pub fn memcpy_bytes_per_sec(src: &[f32], repeats: usize) -> f64 {
    use rayon::prelude::*;
    let mut dst = vec![0f32; src.len()];
    let chunk = (src.len() / rayon::current_num_threads().max(1)).max(1 << 16);
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        let start = Instant::now();
        dst.par_chunks_mut(chunk).zip(src.par_chunks(chunk)).for_each(|(d, s)| d.copy_from_slice(s));
        best = best.min(start.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    std::mem::size_of_val(src) as f64 / best
}

/// `cargo test --all-targets` also runs `harness = false` benchmarks, without `--bench`: each
/// benchmark calls this first and returns at once unless `cargo bench` started it.
pub fn run_as_benchmark(name: &str) -> bool {
    let bench = std::env::args().any(|a| a == "--bench");
    if !bench {
        println!("{name} benchmark skipped (run it with `cargo bench --bench {name}`)");
    }
    bench
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_matrix() {
        assert_eq!(benchmark_matrix(8, 64, 7), benchmark_matrix(8, 64, 7));
        assert_ne!(benchmark_matrix(8, 64, 7), benchmark_matrix(8, 64, 8));
    }

    #[test]
    fn benchmark_matrix_has_the_documented_spread() {
        let m = benchmark_matrix(256, 256, 1);
        let max = m.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!((0.5..=2.0).contains(&max), "largest outlier {max}");
        let mut sorted: Vec<f32> = m.iter().map(|v| v.abs()).collect();
        sorted.sort_by(f32::total_cmp);
        // Median |x| of normal(0, 0.02) is 0.6745 * 0.02.
        let median = sorted[sorted.len() / 2];
        assert!((0.011..0.016).contains(&median), "median |x| {median}");
    }
}
