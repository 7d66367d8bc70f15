//! Low-rank factorization of linear layers by truncated SVD: `W [out, in] ~ B [out, r] A [r, in]`
//! with `A = sqrt(S_r) V_r^T` and `B = U_r sqrt(S_r)`, so a linear layer becomes two (`x A^T`,
//! then `B`), storing `r (in + out)` values instead of `in x out`.
//!
//! Small matrices (or a rank chosen by energy, which needs the whole spectrum) use faer's thin
//! SVD. A fixed rank well below the matrix's size uses the randomized range finder of Halko,
//! Martinsson and Tropp (2011, Algorithm 4.4 with power iterations), as `torch.svd_lowrank` does:
//! a Gaussian sketch of `rank + OVERSAMPLE` columns, `POWER_ITERATIONS` re-orthonormalised power
//! iterations, then the exact SVD of the small projected matrix. The relative error reported is
//! exact in both cases: `sqrt(1 - sum_{i<=r} s_i^2 / ||W||_F^2)`.

use faer::Mat;
use serde::{Deserialize, Serialize};

/// Extra sketch columns of the randomized SVD (Halko et al. recommend 5-10).
pub const OVERSAMPLE: usize = 10;
/// Power iterations of the randomized SVD (`torch.svd_lowrank`'s default `niter=2`).
pub const POWER_ITERATIONS: usize = 2;
/// The randomized path runs when the rank is at most this fraction of the smaller dimension
/// (and that dimension exceeds [`RANDOMIZED_MIN_DIM`]); otherwise the exact SVD is as fast.
const RANDOMIZED_MAX_FRACTION: f64 = 0.25;
const RANDOMIZED_MIN_DIM: usize = 512;

/// How to choose the rank.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rank {
    Fixed(usize),
    /// The smallest rank keeping this fraction of `||W||_F^2` (the squared singular values).
    Energy(f64),
}

/// The two factors and what they keep.
#[derive(Debug, Clone)]
pub struct Factors {
    pub rank: usize,
    /// `[rank, in]`, row-major.
    pub a: Vec<f32>,
    /// `[out, rank]`, row-major.
    pub b: Vec<f32>,
    /// Fraction of `||W||_F^2` kept.
    pub energy: f64,
    /// `||W - B A||_F / ||W||_F`.
    pub relative_error: f64,
    /// Whether the randomized range finder was used.
    pub randomized: bool,
}

/// What factorizing one layer did, for the report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FactorReport {
    pub layer: String,
    pub shape: [usize; 2],
    pub rank: usize,
    pub parameters_before: u64,
    pub parameters_after: u64,
    pub energy: f64,
    pub relative_error: f64,
    pub method: String,
}

/// Deterministic standard normal values (xorshift64* and Box-Muller).
pub fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|_| {
            let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
        })
        .collect()
}

fn orthonormal(m: &Mat<f32>) -> Mat<f32> {
    m.qr().compute_thin_Q()
}

/// Factorizes the row-major `rows x cols` matrix `w`. Errors: a rank of 0 or above
/// `min(rows, cols)`, an energy outside (0, 1], or an SVD that does not converge.
pub fn factorize(w: &[f32], rows: usize, cols: usize, rank: Rank) -> Result<Factors, String> {
    let full = rows.min(cols);
    let m = Mat::<f32>::from_fn(rows, cols, |i, j| w[i * cols + j]);
    let total: f64 = w.iter().map(|v| (*v as f64).powi(2)).sum();
    let randomized = match rank {
        Rank::Fixed(r) if r == 0 || r > full => {
            return Err(format!("rank {r} must be between 1 and {full} (the smaller dimension of [{rows}, {cols}])"))
        }
        Rank::Energy(e) if !(e > 0.0 && e <= 1.0) => return Err(format!("energy {e} must be in (0, 1]")),
        Rank::Fixed(r) => full > RANDOMIZED_MIN_DIM && (r as f64) <= RANDOMIZED_MAX_FRACTION * full as f64,
        Rank::Energy(_) => false,
    };
    // U [rows, k], S [k], V [cols, k] with k >= the rank kept.
    let (u, s, v) = if randomized {
        let Rank::Fixed(r) = rank else { unreachable!("randomized only for a fixed rank") };
        let q = (r + OVERSAMPLE).min(full);
        let omega = gaussian(cols * q, 0x5EED ^ (rows * 31 + cols) as u64);
        let omega = Mat::<f32>::from_fn(cols, q, |i, j| omega[i * q + j]);
        let mut basis = orthonormal(&(&m * &omega));
        for _ in 0..POWER_ITERATIONS {
            let z = orthonormal(&(m.transpose() * &basis));
            basis = orthonormal(&(&m * &z));
        }
        let small = basis.transpose() * &m; // [q, cols]
        let svd = small.thin_svd().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        let u = &basis * svd.U();
        (u, svd.S().column_vector().to_owned(), svd.V().to_owned())
    } else {
        let svd = m.thin_svd().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        (svd.U().to_owned(), svd.S().column_vector().to_owned(), svd.V().to_owned())
    };
    let sq: Vec<f64> = (0..s.nrows()).map(|i| (s[i] as f64).powi(2)).collect();
    let r = match rank {
        Rank::Fixed(r) => r,
        Rank::Energy(e) => {
            let mut acc = 0.0;
            sq.iter()
                .position(|x| {
                    acc += x;
                    acc >= e * total
                })
                .map_or(full, |i| i + 1)
        }
    };
    let kept: f64 = sq[..r].iter().sum();
    let energy = if total > 0.0 { (kept / total).min(1.0) } else { 1.0 };
    let mut a = vec![0f32; r * cols];
    let mut b = vec![0f32; rows * r];
    for k in 0..r {
        let root = s[k].max(0.0).sqrt();
        for j in 0..cols {
            a[k * cols + j] = root * v[(j, k)];
        }
        for i in 0..rows {
            b[i * r + k] = u[(i, k)] * root;
        }
    }
    Ok(Factors { rank: r, a, b, energy, relative_error: (1.0 - energy).max(0.0).sqrt(), randomized })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `B A` as a row-major matrix.
    fn product(f: &Factors, rows: usize, cols: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * cols];
        for i in 0..rows {
            for k in 0..f.rank {
                let bik = f.b[i * f.rank + k];
                for j in 0..cols {
                    out[i * cols + j] += bik * f.a[k * cols + j];
                }
            }
        }
        out
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let d: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let n: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (d / n).sqrt()
    }

    /// A `rows x cols` matrix of exact rank `r` plus `noise`.
    fn low_rank(rows: usize, cols: usize, r: usize, noise: f32) -> Vec<f32> {
        let (p, q, e) = (gaussian(rows * r, 1), gaussian(r * cols, 2), gaussian(rows * cols, 3));
        (0..rows * cols)
            .map(|x| {
                let (i, j) = (x / cols, x % cols);
                (0..r).map(|k| p[i * r + k] * q[k * cols + j]).sum::<f32>() + noise * e[x]
            })
            .collect()
    }

    #[test]
    fn full_rank_reproduces_the_matrix_and_reports_its_error_exactly() {
        let w = low_rank(24, 16, 16, 0.0);
        let f = factorize(&w, 24, 16, Rank::Fixed(16)).unwrap();
        assert!(rel(&product(&f, 24, 16), &w) < 1e-5);
        let f = factorize(&w, 24, 16, Rank::Fixed(5)).unwrap();
        assert!((rel(&product(&f, 24, 16), &w) - f.relative_error).abs() < 1e-4, "{}", f.relative_error);
    }

    #[test]
    fn energy_picks_the_smallest_rank_that_keeps_it() {
        let w = low_rank(40, 30, 6, 1e-3);
        let f = factorize(&w, 40, 30, Rank::Energy(0.999)).unwrap();
        assert_eq!(f.rank, 6);
        assert!(f.energy >= 0.999);
    }

    #[test]
    fn the_randomized_path_finds_a_low_rank_matrix_and_is_exact_about_its_error() {
        let w = low_rank(600, 700, 8, 1e-3);
        let f = factorize(&w, 600, 700, Rank::Fixed(8)).unwrap();
        assert!(f.randomized);
        let measured = rel(&product(&f, 600, 700), &w);
        assert!(measured < 1e-2, "{measured}");
        assert!((measured - f.relative_error).abs() < 1e-3, "{measured} vs {}", f.relative_error);
    }

    #[test]
    fn ranks_out_of_range_are_refused() {
        let w = vec![1.0; 12];
        assert!(factorize(&w, 3, 4, Rank::Fixed(4)).unwrap_err().contains("between 1 and 3"));
        assert!(factorize(&w, 3, 4, Rank::Energy(1.5)).is_err());
    }
}
