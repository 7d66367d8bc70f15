//! Per-tensor ("layer") magnitude pruning with an exact count of zeros.
//!
//! Prunes exactly `k = round(sparsity * n)` weights (see [`prune_count`]): those of smallest |x|, ties at
//! the threshold broken by pruning the lowest flat index first. Weights that are already zero are the
//! smallest magnitudes, so they are selected first and count towards `k`; NaN weights are never pruned.
//!
//! No sort and no full scratch copy: pass 1 histograms the high 16 bits of the magnitude keys (as global
//! pruning does) to find the bucket holding the k-th smallest; pass 2 zeroes everything below that
//! bucket and collects the few values inside it (about 0.2% of a normal-distributed tensor), from which
//! a selection gives the exact threshold; the collected values are then pruned in index order. When the
//! bucket is too crowded (many equal magnitudes) the bounded-memory global machinery runs instead.

use rayon::prelude::*;

use super::global::{find_rank, high_histogram, CHUNK, HI_BUCKETS, MAX_SLICE};
use super::{magnitude_key, prune_count, GlobalCut, GlobalMagnitude, PruneError, PruneStats};

/// Largest bucket (as a fraction 1/N of the tensor) whose values are collected in pass 2; above it
/// the candidates (8 bytes each) would cost more than a third histogram pass saves.
const CANDIDATE_FRACTION: usize = 16;

/// Prunes the `round(sparsity * len)` smallest-magnitude weights of one tensor in place.
pub fn prune_magnitude(data: &mut [f32], sparsity: f64) -> Result<PruneStats, PruneError> {
    prune_with_limit(data, sparsity, (data.len() / CANDIDATE_FRACTION).max(CHUNK))
}

/// [`prune_magnitude`] collecting at most `limit` bucket values (tests force each path with it).
fn prune_with_limit(data: &mut [f32], sparsity: f64, limit: usize) -> Result<PruneStats, PruneError> {
    let n = data.len() as u64;
    let k = prune_count(sparsity, n)?;
    if k == 0 {
        let cut = GlobalCut { threshold: 0, ties: 0 };
        return Ok(cut.apply(data, &mut cut.start()));
    }
    let mut hist = vec![0u64; HI_BUCKETS];
    for part in data.chunks(MAX_SLICE) {
        let local = high_histogram(part);
        hist.iter_mut().zip(&local).for_each(|(a, b)| *a += u64::from(*b));
    }
    let (bucket, rank) = find_rank(&hist, k);
    if rank == hist[bucket] {
        // The k-th value closes its bucket: prune every key below the next bucket.
        let cut = GlobalCut { threshold: ((bucket as u32) + 1) << 16, ties: 0 };
        return Ok(cut.apply(data, &mut cut.start()));
    }
    if hist[bucket] > limit as u64 {
        let mut plan = GlobalMagnitude::new(sparsity, n)?;
        while plan.needs_pass() {
            plan.observe(plan.pass(), data)?;
            plan.end_pass()?;
        }
        let cut = plan.cut()?;
        return Ok(cut.apply(data, &mut cut.start()));
    }
    Ok(prune_in_bucket(data, bucket as u32, rank))
}

/// Pass 2: zero keys below `bucket`, then prune the `rank` smallest of the bucket (lowest index first).
fn prune_in_bucket(data: &mut [f32], bucket: u32, rank: u64) -> PruneStats {
    let floor = bucket << 16;
    // Per chunk: (zeroed below the bucket, the bucket's (offset in chunk, key) in index order).
    let chunks: Vec<(u64, Vec<(u32, u32)>)> = data
        .par_chunks_mut(CHUNK)
        .map(|chunk| {
            // Two loops: the rare, predictable pushes would stop the zeroing loop from vectorising,
            // and a scalar select on random data compiles to a mispredicted branch (7x slower).
            // Blocks of 64 are tested with a vectorised OR first: most hold no bucket value at all.
            let mut inside = Vec::new();
            for (b, block) in chunk.chunks(64).enumerate() {
                let hit = block.iter().fold(false, |a, x| a | (magnitude_key(*x) >> 16 == bucket));
                if !hit {
                    continue;
                }
                for (i, x) in block.iter().enumerate() {
                    let key = magnitude_key(*x);
                    if key >> 16 == bucket {
                        inside.push(((b * 64 + i) as u32, key));
                    }
                }
            }
            let mut below = 0u64;
            for x in chunk.iter_mut() {
                let key = magnitude_key(*x);
                below += u64::from(key < floor);
                *x = if key < floor { 0.0 } else { *x };
            }
            (below, inside)
        })
        .collect();
    let mut keys: Vec<u32> = chunks.iter().flat_map(|(_, inside)| inside.iter().map(|&(_, key)| key)).collect();
    let threshold = *keys.select_nth_unstable((rank - 1) as usize).1;
    let mut ties = rank - keys.iter().filter(|&&key| key < threshold).count() as u64;
    let mut pruned = 0u64;
    let mut kept_zeros = 0u64;
    for (chunk, (below, inside)) in data.chunks_mut(CHUNK).zip(&chunks) {
        pruned += below;
        for &(i, key) in inside {
            if key < threshold || (key == threshold && ties > 0) {
                ties -= u64::from(key == threshold);
                chunk[i as usize] = 0.0;
                pruned += 1;
            } else if key == 0 {
                kept_zeros += 1;
            }
        }
    }
    PruneStats { pruned, zeros: pruned + kept_zeros, total: data.len() as u64 }
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
        let mut fallback = data.to_vec();
        let fallback_stats = prune_with_limit(&mut fallback, sparsity, 0).unwrap();
        let mut got = data.to_vec();
        let stats = prune_magnitude(&mut got, sparsity).unwrap();
        assert_eq!((&fallback, fallback_stats), (&got, stats), "paths differ");
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
