//! Pruning kernels: magnitude (per tensor and global), N:M semi-structured and structured rows.
//!
//! Every kernel works in place on a row-major `&mut [f32]` (rows = shape[0], cols = product of the other
//! dims), is deterministic (ties are broken by position, never by thread timing) and returns
//! [`PruneStats`]. Magnitudes are compared through [`magnitude_key`]: the f32 bit pattern with the sign
//! cleared, whose unsigned order is the order of |x| (zeros, both signs, are the smallest; NaN sorts
//! above +inf, so a NaN weight is never pruned by magnitude).

pub mod global;
pub mod magnitude;
pub mod nm;
pub mod structured;

pub use global::{GlobalCut, GlobalMagnitude, TieState};
pub use magnitude::prune_magnitude;
pub use nm::{prune_n_m, DEFAULT_M, DEFAULT_N};
pub use structured::{prune_rows, row_scores, Norm, RowPruneOutcome};

/// Why a pruning call was refused; every message names the parameter or shape at fault.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PruneError {
    #[error("sparsity must be in [0, 1), got {0}")]
    Sparsity(f64),
    #[error("amount must be in [0, 1), got {0}")]
    Amount(f64),
    #[error("m must be > 0, got m = {m}")]
    ZeroM { m: usize },
    #[error("n must satisfy 0 < n <= m, got n = {n}, m = {m}")]
    BadN { n: usize, m: usize },
    #[error("row length (cols = {cols}) is not a multiple of m = {m}")]
    ColsNotMultiple { cols: usize, m: usize },
    #[error("data has {len} values but shape is {rows} x {cols}")]
    Shape { len: usize, rows: usize, cols: usize },
    #[error("global magnitude: observe called for pass {got} while pass {expected} is open")]
    WrongPass { expected: usize, got: usize },
    #[error("global magnitude: pass {pass} saw {observed} values, but total_len is {expected}")]
    PassLength { pass: usize, observed: u64, expected: u64 },
    #[error("global magnitude: cut() called before the passes were finished")]
    NotFinished,
}

/// What a kernel did to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PruneStats {
    /// Weights the kernel selected and set to zero (weights that were already zero count when selected).
    pub pruned: u64,
    /// Exact zeros in the tensor afterwards (selected ones plus zeros the kernel kept).
    pub zeros: u64,
    /// Number of weights in the tensor.
    pub total: u64,
}

impl PruneStats {
    /// Achieved sparsity: fraction of exact zeros after pruning (0 for an empty tensor).
    pub fn sparsity(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            self.zeros as f64 / self.total as f64
        }
    }
}

/// |x| as an unsigned key whose integer order is the order of magnitudes (sign bit cleared).
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7FFF_FFFF
}

/// How many of `n` weights a `sparsity` prunes: `round(sparsity * n)`, halves rounded away from zero
/// (so 0.5 of 3 weights prunes 2), computed in f64 so the count is exact for any tensor size in use.
pub fn prune_count(sparsity: f64, n: u64) -> Result<u64, PruneError> {
    if !(0.0..1.0).contains(&sparsity) {
        return Err(PruneError::Sparsity(sparsity));
    }
    Ok(((sparsity * n as f64).round() as u64).min(n))
}

/// Checks that a flat buffer holds `rows x cols` values.
pub(crate) fn check_shape(len: usize, rows: usize, cols: usize) -> Result<(), PruneError> {
    if rows.checked_mul(cols) != Some(len) {
        return Err(PruneError::Shape { len, rows, cols });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_keys_order_like_absolute_values() {
        let xs = [0.0f32, -0.0, 1e-30, -0.5, 0.5, 1.0, -2.0, f32::INFINITY];
        for a in xs {
            for b in xs {
                assert_eq!(magnitude_key(a).cmp(&magnitude_key(b)), a.abs().total_cmp(&b.abs()), "{a} vs {b}");
            }
        }
    }

    #[test]
    fn prune_count_rounds_half_away_from_zero_and_rejects_bad_sparsity() {
        assert_eq!(prune_count(0.5, 3), Ok(2));
        assert_eq!(prune_count(0.5, 4), Ok(2));
        assert_eq!(prune_count(0.0, 10), Ok(0));
        assert_eq!(prune_count(0.99, 1), Ok(1));
        assert_eq!(prune_count(1.0, 4), Err(PruneError::Sparsity(1.0)));
        assert!(prune_count(-0.1, 4).is_err());
        assert!(prune_count(f64::NAN, 4).is_err());
        assert_eq!(PruneError::Sparsity(1.0).to_string(), "sparsity must be in [0, 1), got 1");
    }
}
