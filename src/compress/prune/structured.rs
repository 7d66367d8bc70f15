//! Structured pruning of output units: score rows (rows of a linear weight, filters of a conv weight)
//! by L1 or L2 norm and zero the lowest-scoring ones. Without a model graph shapes cannot shrink, so
//! the removed row indices are returned for the engine to zero matching bias entries (and, later, to
//! remove rows and the next layer's input columns physically, reusing [`row_scores`]).

use rayon::prelude::*;

use super::{check_shape, PruneError, PruneStats};

/// Lanes of the f32 partial sums: wide enough for the compiler to vectorise the row reduction.
const LANES: usize = 16;
/// Values summed in f32 before the block sum is added to the f64 row total (bounds f32 rounding).
const BLOCK: usize = 1024;

/// Which norm scores a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    /// Sum of |x|.
    L1,
    /// sqrt(sum of x^2).
    L2,
}

/// Result of structured row pruning.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPruneOutcome {
    /// Zeroed rows, ascending.
    pub removed_rows: Vec<usize>,
    /// Counts over the whole tensor.
    pub stats: PruneStats,
}

/// Norm of every row of a row-major `rows x cols` matrix (f32 blocks accumulated in f64).
pub fn row_scores(data: &[f32], rows: usize, cols: usize, norm: Norm) -> Vec<f64> {
    score_rows(data, rows, cols, norm).into_iter().map(|(score, _)| score).collect()
}

/// Per row: (norm, exact zeros in the row).
fn score_rows(data: &[f32], rows: usize, cols: usize, norm: Norm) -> Vec<(f64, u64)> {
    assert_eq!(data.len(), rows * cols, "row_scores: data is not rows x cols");
    if cols == 0 {
        return vec![(0.0, 0); rows];
    }
    data.par_chunks(cols)
        .map(|row| {
            let mut total = 0f64;
            let mut zeros = 0u64;
            for block in row.chunks(BLOCK) {
                let (sum, z) = match norm {
                    Norm::L1 => block_sum(block, |x| x.abs()),
                    Norm::L2 => block_sum(block, |x| x * x),
                };
                total += f64::from(sum);
                zeros += z;
            }
            let score = match norm {
                Norm::L1 => total,
                Norm::L2 => total.sqrt(),
            };
            (score, zeros)
        })
        .collect()
}

/// f32 sum of `f(x)` over a block in [`LANES`] independent accumulators, plus the count of zeros.
#[inline(always)]
fn block_sum(block: &[f32], f: impl Fn(f32) -> f32) -> (f32, u64) {
    let mut acc = [0f32; LANES];
    let mut zeros = [0u32; LANES];
    let mut lanes = block.chunks_exact(LANES);
    for lane in &mut lanes {
        for i in 0..LANES {
            acc[i] += f(lane[i]);
            zeros[i] += u32::from(lane[i] == 0.0);
        }
    }
    let mut sum: f32 = acc.iter().sum();
    let mut z: u64 = zeros.iter().map(|&z| u64::from(z)).sum();
    for &x in lanes.remainder() {
        sum += f(x);
        z += u64::from(x == 0.0);
    }
    (sum, z)
}

/// Zeros the `round(amount * rows)` rows of lowest norm (ties: lower row index first), in place.
pub fn prune_rows(
    data: &mut [f32],
    rows: usize,
    cols: usize,
    amount: f64,
    norm: Norm,
) -> Result<RowPruneOutcome, PruneError> {
    if !(0.0..1.0).contains(&amount) {
        return Err(PruneError::Amount(amount));
    }
    check_shape(data.len(), rows, cols)?;
    let count = ((amount * rows as f64).round() as usize).min(rows);
    let scores = score_rows(data, rows, cols, norm);
    let mut order: Vec<usize> = (0..rows).collect();
    // total_cmp puts NaN norms last, so a row holding NaN is never chosen before a finite one.
    order.sort_by(|&a, &b| scores[a].0.total_cmp(&scores[b].0).then(a.cmp(&b)));
    let mut removed_rows = order[..count].to_vec();
    removed_rows.sort_unstable();
    let mut remove = vec![false; rows];
    for &r in &removed_rows {
        remove[r] = true;
    }
    if cols > 0 {
        data.par_chunks_mut(cols)
            .zip(remove.par_iter())
            .filter(|(_, remove)| **remove)
            .for_each(|(row, _)| row.fill(0.0));
    }
    let pruned = (count * cols) as u64;
    let kept_zeros: u64 = (0..rows).filter(|&r| !remove[r]).map(|r| scores[r].1).sum();
    Ok(RowPruneOutcome {
        removed_rows,
        stats: PruneStats { pruned, zeros: pruned + kept_zeros, total: data.len() as u64 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::synth::benchmark_matrix;

    /// Relative tolerance between the blocked f32/f64 norm and a plain f64 one.
    const NORM_REL_TOL: f64 = 1e-5;

    #[test]
    fn row_scores_match_plain_f64_norms() {
        let data = benchmark_matrix(8, 3000, 1);
        for norm in [Norm::L1, Norm::L2] {
            let scores = row_scores(&data, 8, 3000, norm);
            for (row, score) in data.chunks(3000).zip(&scores) {
                let want = match norm {
                    Norm::L1 => row.iter().map(|x| f64::from(x.abs())).sum::<f64>(),
                    Norm::L2 => row.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt(),
                };
                assert!((score - want).abs() <= NORM_REL_TOL * want, "{norm:?} {score} vs {want}");
            }
        }
    }

    #[test]
    fn structured_pruning_removes_the_lowest_norm_rows() {
        let rows = 10;
        let cols = 6;
        // Row r has every entry equal to scale[r]; rows 2 and 7 tie at the lowest norm.
        let scale = [5.0f32, 3.0, 0.5, 9.0, 2.0, 4.0, 8.0, 0.5, 7.0, 6.0];
        let mut data: Vec<f32> = scale.iter().flat_map(|&s| [s, -s, s, -s, s, -s]).collect();
        let out = prune_rows(&mut data, rows, cols, 0.3, Norm::L2).unwrap();
        assert_eq!(out.removed_rows, vec![2, 4, 7]);
        for (r, row) in data.chunks(cols).enumerate() {
            let zeroed = row.iter().all(|x| *x == 0.0);
            assert_eq!(zeroed, out.removed_rows.contains(&r), "row {r}");
        }
        assert_eq!(out.stats.pruned, 18);
        assert_eq!(out.stats.zeros, 18);
        // Ties go to the lower index: of rows 2 and 7 only row 2 is taken when one row is removed.
        let mut data: Vec<f32> = scale.iter().flat_map(|&s| [s; 6]).collect();
        let out = prune_rows(&mut data, rows, cols, 0.1, Norm::L1).unwrap();
        assert_eq!(out.removed_rows, vec![2]);
    }

    #[test]
    fn structured_pruning_refuses_bad_amounts_and_shapes() {
        let mut data = vec![1.0f32; 12];
        assert_eq!(
            prune_rows(&mut data, 3, 4, 1.0, Norm::L2).unwrap_err().to_string(),
            "amount must be in [0, 1), got 1"
        );
        assert!(matches!(prune_rows(&mut data, 5, 4, 0.5, Norm::L1), Err(PruneError::Shape { .. })));
    }
}
