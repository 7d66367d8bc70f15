//! N:M semi-structured pruning: in every group of `m` consecutive weights along a row keep the `n`
//! largest |x| (ties: the lower index is kept) and zero the rest.

use rayon::prelude::*;

use super::{check_shape, magnitude_key, PruneError, PruneStats};

/// Default N of N:M (2:4, the pattern sparse tensor cores accelerate).
pub const DEFAULT_N: usize = 2;
/// Default M of N:M.
pub const DEFAULT_M: usize = 4;
/// Groups up to this size rank by pairwise comparison (O(m^2), branch-free); larger ones sort.
const PAIRWISE_MAX_M: usize = 32;
/// Rows per parallel work item are chosen so an item covers at least this many values.
const MIN_ITEM: usize = 1 << 15;

/// Applies the `n:m` pattern to a row-major `rows x cols` matrix in place.
pub fn prune_n_m(data: &mut [f32], rows: usize, cols: usize, n: usize, m: usize) -> Result<PruneStats, PruneError> {
    if m == 0 {
        return Err(PruneError::ZeroM { m });
    }
    if n == 0 || n > m {
        return Err(PruneError::BadN { n, m });
    }
    if !cols.is_multiple_of(m) {
        return Err(PruneError::ColsNotMultiple { cols, m });
    }
    check_shape(data.len(), rows, cols)?;
    // Groups never straddle rows because cols % m == 0, so the flat buffer is just a run of groups.
    let item = MIN_ITEM.div_ceil(m) * m;
    let zeros: u64 = data
        .par_chunks_mut(item)
        .map(|chunk| match (n, m) {
            (2, 4) => groups_pairwise::<4>(chunk, 2),
            (_, 8) => groups_pairwise::<8>(chunk, n),
            _ if m <= PAIRWISE_MAX_M => groups_dynamic(chunk, n, m),
            _ => groups_sorted(chunk, n, m),
        })
        .sum();
    let total = data.len() as u64;
    Ok(PruneStats { pruned: total / m as u64 * (m - n) as u64, zeros, total })
}

/// Ranks every element of a group: how many elements beat it (a larger key, or an equal key at a
/// lower index). Each unordered pair is compared once: m(m-1)/2 comparisons, branch-free.
#[inline(always)]
fn ranks(keys: &[u32], rank: &mut [u32]) {
    rank.fill(0);
    for i in 0..keys.len() {
        for j in i + 1..keys.len() {
            let j_wins = u32::from(keys[j] > keys[i]);
            rank[i] += j_wins;
            rank[j] += 1 - j_wins;
        }
    }
}

/// Fixed-size groups: the compiler unrolls the pairwise ranks. Returns zeros after pruning.
fn groups_pairwise<const M: usize>(chunk: &mut [f32], n: usize) -> u64 {
    let mut zeros = 0u64;
    let mut rank = [0u32; M];
    for group in chunk.chunks_exact_mut(M) {
        let mut keys = [0u32; M];
        for (k, x) in keys.iter_mut().zip(group.iter()) {
            *k = magnitude_key(*x);
        }
        ranks(&keys, &mut rank);
        for (x, &r) in group.iter_mut().zip(&rank) {
            *x = if (r as usize) < n { *x } else { 0.0 };
            zeros += u64::from(*x == 0.0);
        }
    }
    zeros
}

/// Any group size up to [`PAIRWISE_MAX_M`].
fn groups_dynamic(chunk: &mut [f32], n: usize, m: usize) -> u64 {
    let mut zeros = 0u64;
    let mut keys = [0u32; PAIRWISE_MAX_M];
    let mut rank = [0u32; PAIRWISE_MAX_M];
    for group in chunk.chunks_exact_mut(m) {
        for (k, x) in keys.iter_mut().zip(group.iter()) {
            *k = magnitude_key(*x);
        }
        ranks(&keys[..m], &mut rank[..m]);
        for (x, &r) in group.iter_mut().zip(&rank) {
            if r as usize >= n {
                *x = 0.0;
            }
            zeros += u64::from(*x == 0.0);
        }
    }
    zeros
}

/// Large groups: order (key descending, index ascending) with a scratch index buffer.
fn groups_sorted(chunk: &mut [f32], n: usize, m: usize) -> u64 {
    let mut zeros = 0u64;
    let mut order: Vec<(u32, usize)> = Vec::with_capacity(m);
    for group in chunk.chunks_exact_mut(m) {
        order.clear();
        order.extend(group.iter().enumerate().map(|(i, x)| (magnitude_key(*x), i)));
        order.select_nth_unstable_by(n - 1, |a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for &(_, i) in &order[n..] {
            group[i] = 0.0;
        }
        zeros += group.iter().filter(|x| **x == 0.0).count() as u64;
    }
    zeros
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::synth::{benchmark_matrix, SplitMix64};

    /// Reference: per group, stable sort by (key desc, index asc) and keep the first n.
    fn reference(data: &[f32], n: usize, m: usize) -> Vec<f32> {
        let mut out = data.to_vec();
        for group in out.chunks_exact_mut(m) {
            let mut idx: Vec<usize> = (0..m).collect();
            idx.sort_by_key(|&i| (std::cmp::Reverse(magnitude_key(group[i])), i));
            for &i in &idx[n..] {
                group[i] = 0.0;
            }
        }
        out
    }

    #[test]
    fn two_four_keeps_the_two_largest_of_every_group() {
        let data = benchmark_matrix(48, 64, 2);
        let mut got = data.clone();
        let stats = prune_n_m(&mut got, 48, 64, DEFAULT_N, DEFAULT_M).unwrap();
        assert_eq!(got, reference(&data, 2, 4));
        for group in got.chunks_exact(4) {
            assert!(group.iter().filter(|x| **x == 0.0).count() >= 2);
        }
        assert_eq!(stats.pruned, 48 * 64 / 2);
        assert_eq!(stats.zeros, got.iter().filter(|x| **x == 0.0).count() as u64);
    }

    #[test]
    fn every_group_size_path_matches_the_reference_with_ties() {
        let mut rng = SplitMix64::new(4);
        let levels = [0.0f32, 0.5, -0.5, 1.0, -0.0];
        let data: Vec<f32> = (0..4 * 128).map(|_| levels[(rng.next_u64() % 5) as usize]).collect();
        for (n, m) in [(2, 4), (1, 4), (4, 4), (3, 8), (1, 2), (5, 16), (7, 64), (1, 128)] {
            let mut got = data.clone();
            let stats = prune_n_m(&mut got, 4, 128, n, m).unwrap();
            assert_eq!(got, reference(&data, n, m), "{n}:{m}");
            assert_eq!(stats.zeros, got.iter().filter(|x| **x == 0.0).count() as u64);
        }
    }

    #[test]
    fn bad_n_m_parameters_are_refused_naming_the_parameter() {
        let mut data = vec![1.0f32; 12];
        let err = prune_n_m(&mut data, 2, 6, 2, 4).unwrap_err();
        assert_eq!(err.to_string(), "row length (cols = 6) is not a multiple of m = 4");
        let err = prune_n_m(&mut data, 3, 4, 2, 0).unwrap_err();
        assert_eq!(err.to_string(), "m must be > 0, got m = 0");
        let err = prune_n_m(&mut data, 3, 4, 5, 4).unwrap_err();
        assert_eq!(err.to_string(), "n must satisfy 0 < n <= m, got n = 5, m = 4");
        assert!(prune_n_m(&mut data, 3, 4, 0, 4).is_err());
        assert!(matches!(prune_n_m(&mut data, 2, 4, 2, 4), Err(PruneError::Shape { .. })));
    }
}
