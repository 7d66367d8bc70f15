//! Reconstruction-error metrics shared by every step's report entry.

/// Error of a reconstruction `approx` against the `original`, accumulated in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ErrorMetrics {
    /// ||x - x'||_F / ||x||_F (0 when both are zero).
    pub relative_error: f64,
    /// 10 log10(||x||^2 / ||x - x'||^2) in dB; `None` stands for infinity (exact reconstruction).
    pub sqnr_db: Option<f64>,
    /// <x, x'> / (||x|| ||x'||); 1 when both are zero.
    pub cosine: f64,
    /// max |x - x'|.
    pub max_abs_error: f64,
    /// Fraction of the L2 norm the reconstruction keeps: ||x'|| / ||x||.
    pub norm_kept: f64,
}

/// Running sums so metrics can be accumulated row by row or chunk by chunk.
#[derive(Debug, Clone, Copy, Default)]
pub struct ErrorAccumulator {
    sum_x2: f64,
    sum_y2: f64,
    sum_xy: f64,
    sum_d2: f64,
    max_abs: f64,
}

impl ErrorAccumulator {
    /// Adds the pairs of `original` and `approx` (equal lengths). Compiled twice, picked at run
    /// time: with AVX2 the f64 lanes are twice as wide as baseline x86_64's SSE2.
    pub fn add(&mut self, original: &[f32], approx: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            return unsafe { self.add_avx2(original, approx) };
        }
        self.add_lanes(original, approx)
    }

    /// [`Self::add_lanes`] with one AVX register per accumulator: the same four lanes, the same
    /// operations in the same order (no FMA), so the sums are bit for bit those of the portable
    /// loop, which the compiler left scalar.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn add_avx2(&mut self, original: &[f32], approx: &[f32]) {
        use std::arch::x86_64::*;
        debug_assert_eq!(original.len(), approx.len());
        let n = original.len().min(approx.len()) / 4 * 4;
        let (mut x2, mut y2, mut xy, mut d2, mut mx) =
            (_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd());
        let sign = _mm256_set1_pd(-0.0);
        for i in (0..n).step_by(4) {
            // SAFETY: i + 4 <= n <= both lengths; unaligned loads.
            let (x, y) = unsafe {
                (
                    _mm256_cvtps_pd(_mm_loadu_ps(original.as_ptr().add(i))),
                    _mm256_cvtps_pd(_mm_loadu_ps(approx.as_ptr().add(i))),
                )
            };
            let d = _mm256_sub_pd(x, y);
            x2 = _mm256_add_pd(x2, _mm256_mul_pd(x, x));
            y2 = _mm256_add_pd(y2, _mm256_mul_pd(y, y));
            xy = _mm256_add_pd(xy, _mm256_mul_pd(x, y));
            d2 = _mm256_add_pd(d2, _mm256_mul_pd(d, d));
            // maxpd returns its second operand when either is NaN: a NaN difference keeps the
            // maximum, as `if |d| > m` does.
            mx = _mm256_max_pd(_mm256_andnot_pd(sign, d), mx);
        }
        let lanes = |v: __m256d| {
            let mut out = [0f64; 4];
            // SAFETY: `out` holds four f64.
            unsafe { _mm256_storeu_pd(out.as_mut_ptr(), v) };
            out
        };
        self.fold_lanes([lanes(x2), lanes(y2), lanes(xy), lanes(d2), lanes(mx)], &original[n..], &approx[n..]);
    }

    /// Adds the tail values (fewer than a lane group) into lane 0 of `[x2, y2, xy, d2, max]`,
    /// then folds the lanes into the running sums, in lane order.
    #[inline(always)]
    fn fold_lanes(&mut self, lanes: [[f64; 4]; 5], xs: &[f32], ys: &[f32]) {
        let [mut x2, mut y2, mut xy, mut d2, mut mx] = lanes;
        for (&x, &y) in xs.iter().zip(ys) {
            let (x, y) = (x as f64, y as f64);
            let d = x - y;
            x2[0] += x * x;
            y2[0] += y * y;
            xy[0] += x * y;
            d2[0] += d * d;
            mx[0] = mx[0].max(d.abs());
        }
        self.sum_x2 += x2.iter().sum::<f64>();
        self.sum_y2 += y2.iter().sum::<f64>();
        self.sum_xy += xy.iter().sum::<f64>();
        self.sum_d2 += d2.iter().sum::<f64>();
        self.max_abs = mx.iter().fold(self.max_abs, |a, &b| a.max(b));
    }

    #[inline(always)]
    fn add_lanes(&mut self, original: &[f32], approx: &[f32]) {
        debug_assert_eq!(original.len(), approx.len());
        // Everything in f64: squares of f32 values overflow f32 above ~1.8e19 (and an f32 sum of
        // millions of terms loses digits). Four independent lanes keep the loop vectorisable
        // without reassociating a single sum.
        const L: usize = 4;
        let (mut x2, mut y2, mut xy, mut d2, mut mx) = ([0f64; L], [0f64; L], [0f64; L], [0f64; L], [0f64; L]);
        let mut xs = original.chunks_exact(L);
        let mut ys = approx.chunks_exact(L);
        for (xc, yc) in (&mut xs).zip(&mut ys) {
            for i in 0..L {
                let (x, y) = (xc[i] as f64, yc[i] as f64);
                let d = x - y;
                x2[i] += x * x;
                y2[i] += y * y;
                xy[i] += x * y;
                d2[i] += d * d;
                mx[i] = if d.abs() > mx[i] { d.abs() } else { mx[i] };
            }
        }
        self.fold_lanes([x2, y2, xy, d2, mx], xs.remainder(), ys.remainder());
    }

    /// The sum of squared differences added so far.
    pub fn squared_error(&self) -> f64 {
        self.sum_d2
    }

    pub fn merge(&mut self, other: &ErrorAccumulator) {
        self.sum_x2 += other.sum_x2;
        self.sum_y2 += other.sum_y2;
        self.sum_xy += other.sum_xy;
        self.sum_d2 += other.sum_d2;
        self.max_abs = self.max_abs.max(other.max_abs);
    }

    pub fn finish(&self) -> ErrorMetrics {
        let nx = self.sum_x2.sqrt();
        let ny = self.sum_y2.sqrt();
        let relative_error = if nx > 0.0 {
            self.sum_d2.sqrt() / nx
        } else if self.sum_d2 > 0.0 {
            f64::INFINITY
        } else {
            0.0
        };
        let sqnr_db = if self.sum_d2 > 0.0 && self.sum_x2 > 0.0 {
            Some(10.0 * (self.sum_x2 / self.sum_d2).log10())
        } else {
            None
        };
        let cosine = if nx > 0.0 && ny > 0.0 {
            (self.sum_xy / (nx * ny)).clamp(-1.0, 1.0)
        } else if nx == 0.0 && ny == 0.0 {
            1.0
        } else {
            0.0
        };
        let norm_kept = if nx > 0.0 { ny / nx } else { 1.0 };
        ErrorMetrics { relative_error, sqnr_db, cosine, max_abs_error: self.max_abs, norm_kept }
    }
}

/// Values per parallel piece of [`error_metrics`] (256 KiB of f32).
const METRICS_CHUNK: usize = 1 << 16;

/// Metrics of a whole tensor in one call, over every core ([`error_sums`]).
pub fn error_metrics(original: &[f32], approx: &[f32]) -> ErrorMetrics {
    error_sums(original, approx).finish()
}

/// The sums behind [`ErrorMetrics`] of a whole tensor, over every core: pieces of
/// [`METRICS_CHUNK`] values are summed in parallel and merged in order, so the result does not
/// depend on scheduling.
pub fn error_sums(original: &[f32], approx: &[f32]) -> ErrorAccumulator {
    use rayon::prelude::*;
    debug_assert_eq!(original.len(), approx.len());
    let parts: Vec<ErrorAccumulator> = original
        .par_chunks(METRICS_CHUNK)
        .zip(approx.par_chunks(METRICS_CHUNK))
        .map(|(x, y)| {
            let mut acc = ErrorAccumulator::default();
            acc.add(x, y);
            acc
        })
        .collect();
    let mut acc = ErrorAccumulator::default();
    for p in &parts {
        acc.merge(p);
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: f64 = 1e-9;

    #[test]
    fn exact_reconstruction_has_no_error_and_infinite_sqnr() {
        let x = [1.0f32, -2.0, 3.0];
        let m = error_metrics(&x, &x);
        assert_eq!(m.relative_error, 0.0);
        assert_eq!(m.sqnr_db, None);
        assert!((m.cosine - 1.0).abs() < TOL);
        assert_eq!(m.max_abs_error, 0.0);
    }

    #[test]
    fn a_known_error_gives_the_hand_computed_figures() {
        // x = (3, 4), y = (3, 3): ||x|| = 5, ||d|| = 1 -> rel 0.2, SQNR 10 log10(25) dB.
        let m = error_metrics(&[3.0, 4.0], &[3.0, 3.0]);
        assert!((m.relative_error - 0.2).abs() < TOL);
        assert!((m.sqnr_db.unwrap() - 10.0 * 25f64.log10()).abs() < 1e-6);
        assert!((m.cosine - 21.0 / (5.0 * 18f64.sqrt())).abs() < 1e-6);
        assert_eq!(m.max_abs_error, 1.0);
    }

    #[test]
    fn huge_values_do_not_overflow_the_sums() {
        // Squares of 8e6 and of 1e20 overflow nothing in f64 (1e40 is past f32's range).
        let m = error_metrics(&[8.0e6, 1e20, 0.5], &[8.3e6, 1e20, 0.5]);
        assert!(m.relative_error.is_finite() && m.relative_error < 1e-10, "{m:?}");
        assert_eq!(m.max_abs_error, 300_000.0);
        let m = error_metrics(&[8.4e6, 0.5, 0.5], &[8.32e6, 0.5, 0.5]);
        assert!((m.relative_error - 80_000.0 / 8.4e6).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn the_vector_path_gives_the_portable_loops_sums_bit_for_bit() {
        let x: Vec<f32> = (0..10_003).map(|i| ((i as f32) * 0.37).sin() * 1e3).collect();
        let mut y: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * 0.99 + (i % 7) as f32 * 1e-3).collect();
        y[17] = f32::NAN;
        let (mut a, mut b) = (ErrorAccumulator::default(), ErrorAccumulator::default());
        a.add(&x, &y);
        b.add_lanes(&x, &y);
        let bits = |e: &ErrorAccumulator| [e.sum_x2, e.sum_y2, e.sum_xy, e.sum_d2, e.max_abs].map(|v| v.to_bits());
        assert_eq!(bits(&a), bits(&b));
    }

    #[test]
    fn accumulating_in_pieces_equals_one_pass() {
        let x: Vec<f32> = (0..5000).map(|i| (i as f32).sin()).collect();
        let y: Vec<f32> = x.iter().map(|v| v * 0.99).collect();
        let mut acc = ErrorAccumulator::default();
        for (a, b) in x.chunks(333).zip(y.chunks(333)) {
            let mut part = ErrorAccumulator::default();
            part.add(a, b);
            acc.merge(&part);
        }
        let whole = error_metrics(&x, &y);
        assert!((acc.finish().relative_error - whole.relative_error).abs() < 1e-6);
    }
}
