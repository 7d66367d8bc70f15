//! Per-tensor ("layer") magnitude pruning with an exact count of zeros.
//!
//! Prunes exactly `k = round(sparsity * n)` weights (see [`prune_count`]): those of smallest |x|, ties at
//! the threshold broken by pruning the lowest flat index first. Weights that are already zero are the
//! smallest magnitudes, so they are selected first and count towards `k`. The threshold comes from the
//! same two bit-pattern histograms as global pruning (one tensor is a global run over one tensor): two
//! or three parallel streaming passes, no sort and no O(n) scratch buffer; NaN weights are never pruned.

use super::{prune_count, GlobalMagnitude, PruneError, PruneStats};

/// Prunes the `round(sparsity * len)` smallest-magnitude weights of one tensor in place.
pub fn prune_magnitude(data: &mut [f32], sparsity: f64) -> Result<PruneStats, PruneError> {
    prune_count(sparsity, data.len() as u64)?;
    let mut plan = GlobalMagnitude::new(sparsity, data.len() as u64)?;
    while plan.needs_pass() {
        plan.observe(plan.pass(), data)?;
        plan.end_pass()?;
    }
    let cut = plan.cut()?;
    Ok(cut.apply(data, &mut cut.start()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::prune::magnitude_key;
    use crate::compress::synth::{benchmark_matrix, SplitMix64};

    /// Reference: stable sort of (|x|, index), prune the first k.
    fn reference(data: &[f32], sparsity: f64) -> Vec<f32> {
        let k = prune_count(sparsity, data.len() as u64).unwrap() as usize;
        let mut order: Vec<usize> = (0..data.len()).collect();
        order.sort_by_key(|&i| (magnitude_key(data[i]), i));
        let mut out = data.to_vec();
        for &i in &order[..k] {
            out[i] = 0.0;
        }
        out
    }

    fn check(data: &[f32], sparsity: f64) {
        let mut got = data.to_vec();
        let stats = prune_magnitude(&mut got, sparsity).unwrap();
        let want = reference(data, sparsity);
        assert_eq!(got, want, "sparsity {sparsity}, len {}", data.len());
        let k = prune_count(sparsity, data.len() as u64).unwrap();
        assert_eq!(stats.pruned, k);
        assert_eq!(stats.zeros, got.iter().filter(|x| **x == 0.0).count() as u64);
        assert_eq!(stats.total, data.len() as u64);
    }

    #[test]
    fn layer_pruning_zeroes_exactly_round_sparsity_times_n_weights() {
        let data = benchmark_matrix(64, 96, 3);
        for sparsity in [0.0, 0.1, 0.25, 0.5, 0.5001, 0.9, 0.999] {
            check(&data, sparsity);
        }
    }

    #[test]
    fn many_equal_magnitudes_and_zeros_are_pruned_lowest_index_first() {
        let mut rng = SplitMix64::new(11);
        // Values from {0, -0, +-0.25, +-0.5}: almost every cut lands inside a run of ties.
        let levels = [0.0f32, -0.0, 0.25, -0.25, 0.5, -0.5];
        let data: Vec<f32> = (0..5000).map(|_| levels[(rng.next_u64() % 6) as usize]).collect();
        for sparsity in [0.0, 0.1, 0.2, 0.33, 0.34, 0.5, 0.7, 0.95] {
            check(&data, sparsity);
        }
        check(&[0.0; 17], 0.5);
        check(&[0.125; 33], 0.5);
    }

    #[test]
    fn every_kept_magnitude_is_at_least_every_pruned_one() {
        let data = benchmark_matrix(32, 128, 5);
        let mut pruned = data.clone();
        prune_magnitude(&mut pruned, 0.6).unwrap();
        let max_pruned =
            data.iter().zip(&pruned).filter(|(_, p)| **p == 0.0).map(|(d, _)| d.abs()).fold(0f32, f32::max);
        let min_kept = pruned.iter().filter(|p| **p != 0.0).map(|p| p.abs()).fold(f32::INFINITY, f32::min);
        assert!(max_pruned <= min_kept, "{max_pruned} > {min_kept}");
    }

    #[test]
    fn layer_pruning_is_deterministic() {
        let data = benchmark_matrix(300, 700, 9);
        let mut a = data.clone();
        let mut b = data;
        assert_eq!(prune_magnitude(&mut a, 0.5), prune_magnitude(&mut b, 0.5));
        assert_eq!(a, b);
    }

    #[test]
    fn nan_weights_are_kept_and_empty_tensors_are_fine() {
        let mut data = vec![f32::NAN, 1.0, -2.0, 0.5];
        prune_magnitude(&mut data, 0.5).unwrap();
        assert!(data[0].is_nan());
        assert_eq!(&data[1..], &[0.0, -2.0, 0.0]);
        assert_eq!(prune_magnitude(&mut [], 0.5).unwrap().pruned, 0);
    }

    #[test]
    fn sparsity_outside_zero_to_one_is_refused() {
        let mut data = vec![1.0f32; 8];
        assert_eq!(prune_magnitude(&mut data, 1.0), Err(PruneError::Sparsity(1.0)));
        assert!(prune_magnitude(&mut data, -0.5).is_err());
    }
}
