//! Exact global magnitude pruning across many tensors with O(65536) memory.
//!
//! The engine drives a small state machine over the tensors, always in the same tensor order:
//! pass 0 histograms the high 16 bits of every [`magnitude_key`] (the bucket holding the k-th smallest
//! magnitude is found from it); pass 1 histograms the low 16 bits of the keys in that bucket only, which
//! gives the exact k-th key `t` and how many values equal to `t` must go (`ties`). Applying the cut
//! prunes every key < `t` and the first `ties` keys == `t` in (tensor order, flat index) order, which is
//! exactly what a stable sort of all magnitudes would prune. Pass 1 is skipped when the k-th value
//! closes its bucket, and when pass 0 already counted the low bits of that bucket: after the first
//! tensor of pass 0 the bucket is estimated from it (the same quantile of its own values), and from
//! then on, every tensor the first included, pass 0 also histograms the low 16 bits of the
//! [`WINDOW`] buckets around the estimate. Tensors whose values share a distribution (the layers of
//! one model) land the k-th value in the window, saving a whole read of every tensor; a wrong
//! estimate costs that window's counting and falls back to pass 1, so the cut is exact either way.

use rayon::prelude::*;

use super::{magnitude_key, prune_count, PruneError, PruneStats};

/// The key's bit 31 is clear, so its high half takes 2^15 values.
pub(super) const HI_BUCKETS: usize = 1 << 15;
const LO_BUCKETS: usize = 1 << 16;
/// Values per parallel work item: 256 KiB of f32, large enough to amortise rayon, small enough to balance.
pub(super) const CHUNK: usize = 1 << 16;
/// Per-thread histograms count in u32; an observed slice is split so no counter can overflow.
pub(super) const MAX_SLICE: usize = u32::MAX as usize;
/// High buckets whose low bits pass 0 also counts (one below the estimate, the estimate, two above).
pub(super) const WINDOW: usize = 4;

/// Pass bookkeeping for exact global magnitude pruning (see the module docs).
#[derive(Debug, Clone)]
pub struct GlobalMagnitude {
    /// Number of weights to prune over all tensors.
    k: u64,
    /// Sum of the lengths of all tensors, given up front and checked at the end of every pass.
    total: u64,
    /// Open pass: 0 (high bits) or 1 (low bits of one bucket).
    pass: usize,
    /// Values observed in the open pass.
    observed: u64,
    /// Histogram of the open pass (2^15 or 2^16 counters).
    hist: Vec<u64>,
    /// High 16 bits of the k-th smallest key, known after pass 0.
    bucket: u32,
    /// 1-based rank of the k-th smallest key inside `bucket`.
    rank: u64,
    /// Set once the threshold is exact.
    cut: Option<GlobalCut>,
    /// Pass 0's low-bit histograms of the high buckets `lo..lo + WINDOW` (`WINDOW` x 2^16
    /// counters, bucket by bucket), chosen after the first observed tensor.
    window: Option<(u32, Vec<u64>)>,
    /// Whether pass 1 was needed (the window missed the k-th value's bucket); for tests and benches.
    pub second_pass: bool,
}

/// The exact global threshold: prune keys < `threshold` and the first `ties` keys equal to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalCut {
    /// Magnitude key (f32 bits of |x|) of the k-th smallest magnitude, or 0 when nothing is pruned.
    pub threshold: u32,
    /// How many values equal to `threshold` are pruned, the first ones in (tensor, index) order.
    pub ties: u64,
}

/// Ties still to prune while the cut is applied to the tensors in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TieState {
    /// Values equal to the threshold that the next tensors must still prune.
    pub remaining: u64,
}

impl GlobalMagnitude {
    /// Plans pruning `round(sparsity * total_len)` weights over tensors totalling `total_len` values.
    pub fn new(sparsity: f64, total_len: u64) -> Result<Self, PruneError> {
        let k = prune_count(sparsity, total_len)?;
        // k = 0 needs no pass: threshold 0 with no ties prunes nothing.
        let cut = (k == 0).then_some(GlobalCut { threshold: 0, ties: 0 });
        Ok(Self {
            k,
            total: total_len,
            pass: 0,
            observed: 0,
            hist: vec![0; HI_BUCKETS],
            bucket: 0,
            rank: 0,
            cut,
            window: None,
            second_pass: false,
        })
    }

    /// Number of weights that will be pruned over all tensors.
    pub fn target(&self) -> u64 {
        self.k
    }

    /// Whether another pass over all tensors is needed before [`Self::cut`].
    pub fn needs_pass(&self) -> bool {
        self.cut.is_none()
    }

    /// The pass the engine must run next (0 or 1); meaningful while [`Self::needs_pass`] is true.
    pub fn pass(&self) -> usize {
        self.pass
    }

    /// Feeds one tensor's values to the open pass; tensors may come in any order within a pass.
    pub fn observe(&mut self, pass: usize, data: &[f32]) -> Result<(), PruneError> {
        if self.cut.is_some() || pass != self.pass {
            let expected = if self.cut.is_some() { 2 } else { self.pass };
            return Err(PruneError::WrongPass { expected, got: pass });
        }
        for part in data.chunks(MAX_SLICE) {
            let local = if pass == 0 { high_histogram(part) } else { low_histogram(part, self.bucket, 1) };
            for (total, count) in self.hist.iter_mut().zip(&local) {
                *total += u64::from(*count);
            }
        }
        if pass == 0 && !data.is_empty() {
            if self.window.is_none() {
                // The first tensor: the bucket of the same quantile of its own values.
                let seen: u64 = self.hist.iter().sum();
                let k = ((self.k as u128 * seen as u128) / self.total as u128).clamp(1, seen as u128) as u64;
                let (estimate, _) = find_rank(&self.hist, k);
                let lo = (estimate as u32).saturating_sub(1).min((HI_BUCKETS - WINDOW) as u32);
                self.window = Some((lo, vec![0; WINDOW * LO_BUCKETS]));
            }
            let (lo, counts) = self.window.as_mut().expect("chosen above");
            for part in data.chunks(MAX_SLICE) {
                for (total, count) in counts.iter_mut().zip(&low_histogram(part, *lo, WINDOW)) {
                    *total += u64::from(*count);
                }
            }
        }
        self.observed += data.len() as u64;
        Ok(())
    }

    /// Closes the open pass after every tensor was observed once.
    pub fn end_pass(&mut self) -> Result<(), PruneError> {
        if self.cut.is_some() {
            return Err(PruneError::WrongPass { expected: 2, got: self.pass });
        }
        if self.observed != self.total {
            return Err(PruneError::PassLength { pass: self.pass, observed: self.observed, expected: self.total });
        }
        self.observed = 0;
        if self.pass == 0 {
            let (bucket, rank) = find_rank(&self.hist, self.k);
            let window = self.window.take();
            let in_window = window.as_ref().and_then(|(lo, counts)| {
                let at = (bucket as u32).checked_sub(*lo)? as usize;
                (at < WINDOW).then(|| &counts[at * LO_BUCKETS..(at + 1) * LO_BUCKETS])
            });
            if rank == self.hist[bucket] {
                // The k-th value closes its bucket: everything below the next bucket goes, no ties.
                self.cut = Some(GlobalCut { threshold: ((bucket as u32) + 1) << 16, ties: 0 });
            } else if let Some(low) = in_window {
                // Pass 0 already counted the bucket's low bits: exact without another pass.
                let (low, ties) = find_rank(low, rank);
                self.cut = Some(GlobalCut { threshold: ((bucket as u32) << 16) | low as u32, ties });
            } else {
                self.second_pass = true;
                self.bucket = bucket as u32;
                self.rank = rank;
                self.pass = 1;
                self.hist.clear();
                self.hist.resize(LO_BUCKETS, 0);
            }
        } else {
            let (low, ties) = find_rank(&self.hist, self.rank);
            self.cut = Some(GlobalCut { threshold: (self.bucket << 16) | low as u32, ties });
        }
        Ok(())
    }

    /// The exact cut, once [`Self::needs_pass`] is false.
    pub fn cut(&self) -> Result<GlobalCut, PruneError> {
        self.cut.ok_or(PruneError::NotFinished)
    }
}

/// Finds the bucket holding the `k`-th smallest value (k >= 1) and the value's 1-based rank in it.
pub(super) fn find_rank(hist: &[u64], k: u64) -> (usize, u64) {
    let mut below = 0u64;
    for (i, &count) in hist.iter().enumerate() {
        if below + count >= k {
            return (i, k - below);
        }
        below += count;
    }
    unreachable!("k <= total was checked when the passes were counted")
}

/// Parallel histogram of the high 16 bits of the magnitude keys of `data` (at most 2^32 - 1 values).
pub(super) fn high_histogram(data: &[f32]) -> Vec<u32> {
    histogram(data, HI_BUCKETS, |chunk, h| {
        for &x in chunk {
            h[(magnitude_key(x) >> 16) as usize & (HI_BUCKETS - 1)] += 1;
        }
    })
}

/// Parallel histogram of the low 16 bits of the keys of `data` whose high bits are one of the
/// `width` high buckets from `lo` (at most 2^32 - 1 values): bucket `lo + j`'s counts at
/// `j * 2^16`. Pass 1 counts its one bucket, pass 0 the [`WINDOW`] around the estimate. One
/// accumulator per thread (up to 1 MiB each), not per chunk.
fn low_histogram(data: &[f32], lo: u32, width: usize) -> Vec<u32> {
    let parts = rayon::current_num_threads().max(1);
    let per = data.len().div_ceil(parts).max(CHUNK);
    data.par_chunks(per)
        .map(|part| {
            let mut h = vec![0u32; width * LO_BUCKETS];
            // Most blocks of 64 hold no value of the buckets: a vectorised OR skips them.
            for block in part.chunks(64) {
                let hit =
                    block.iter().fold(false, |a, x| a | ((magnitude_key(*x) >> 16).wrapping_sub(lo) < width as u32));
                if hit {
                    for &x in block {
                        let key = magnitude_key(x);
                        let at = (key >> 16).wrapping_sub(lo);
                        if at < width as u32 {
                            h[at as usize * LO_BUCKETS + (key as usize & (LO_BUCKETS - 1))] += 1;
                        }
                    }
                }
            }
            h
        })
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_else(|| vec![0; width * LO_BUCKETS])
}

/// Parallel histogram over chunks of `data`; `count` adds one chunk to a thread-local histogram.
fn histogram<F>(data: &[f32], buckets: usize, count: F) -> Vec<u32>
where
    F: Fn(&[f32], &mut [u32]) + Sync,
{
    data.par_chunks(CHUNK)
        .fold(
            || vec![0u32; buckets],
            |mut h, chunk| {
                count(chunk, &mut h);
                h
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
            a
        })
        .unwrap_or_else(|| vec![0; buckets])
}

impl GlobalCut {
    /// Fresh tie bookkeeping; pass it to [`Self::apply`] for every tensor, in the observed order.
    pub fn start(&self) -> TieState {
        TieState { remaining: self.ties }
    }

    /// Prunes one tensor in place; `state` carries the ties left for the following tensors.
    pub fn apply(&self, data: &mut [f32], state: &mut TieState) -> PruneStats {
        let t = self.threshold;
        // Per chunk: (values below t, values equal to t); zeroing below t is branch-free.
        let counts: Vec<(u64, u64)> = data
            .par_chunks_mut(CHUNK)
            .map(|chunk| {
                let (mut below, mut equal) = (0u64, 0u64);
                for x in chunk.iter_mut() {
                    let key = magnitude_key(*x);
                    below += u64::from(key < t);
                    equal += u64::from(key == t);
                    *x = if key < t { 0.0 } else { *x };
                }
                (below, equal)
            })
            .collect();
        let mut pruned = 0u64;
        let mut equal_total = 0u64;
        let mut ties_here = 0u64;
        for (chunk, &(below, equal)) in data.chunks_mut(CHUNK).zip(&counts) {
            pruned += below;
            equal_total += equal;
            if equal == 0 || state.remaining == 0 {
                continue;
            }
            // Ties are rare outside zeros or quantized inputs: a sequential walk is cheap.
            for x in chunk.iter_mut() {
                if state.remaining == 0 {
                    break;
                }
                if magnitude_key(*x) == t {
                    *x = 0.0;
                    state.remaining -= 1;
                    ties_here += 1;
                }
            }
        }
        pruned += ties_here;
        // A zero survives only when the threshold is zero itself (key 0 then is a tie left unpruned).
        let kept_zeros = if t == 0 { equal_total - ties_here } else { 0 };
        PruneStats { pruned, zeros: pruned + kept_zeros, total: data.len() as u64 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::synth::{benchmark_matrix, SplitMix64};

    /// Runs the engine's loop: passes over the tensors in order, then apply in the same order.
    fn run(tensors: &mut [Vec<f32>], sparsity: f64) -> (GlobalCut, Vec<PruneStats>) {
        let total = tensors.iter().map(|t| t.len() as u64).sum();
        let mut plan = GlobalMagnitude::new(sparsity, total).unwrap();
        while plan.needs_pass() {
            let pass = plan.pass();
            for t in tensors.iter() {
                plan.observe(pass, t).unwrap();
            }
            plan.end_pass().unwrap();
        }
        let cut = plan.cut().unwrap();
        let mut ties = cut.start();
        let stats = tensors.iter_mut().map(|t| cut.apply(t, &mut ties)).collect();
        assert_eq!(ties.remaining, 0);
        (cut, stats)
    }

    /// Reference: one stable sort of every magnitude in (tensor, index) order; prune the first k.
    fn reference(tensors: &[Vec<f32>], sparsity: f64) -> Vec<Vec<f32>> {
        let mut all: Vec<(u32, usize, usize)> = Vec::new();
        for (t, values) in tensors.iter().enumerate() {
            all.extend(values.iter().enumerate().map(|(i, x)| (magnitude_key(*x), t, i)));
        }
        let k = prune_count(sparsity, all.len() as u64).unwrap() as usize;
        all.sort();
        let mut out = tensors.to_vec();
        for &(_, t, i) in &all[..k] {
            out[t][i] = 0.0;
        }
        out
    }

    fn check(tensors: &[Vec<f32>], sparsity: f64) {
        let mut got = tensors.to_vec();
        let (_, stats) = run(&mut got, sparsity);
        assert_eq!(got, reference(tensors, sparsity), "sparsity {sparsity}");
        let total: u64 = tensors.iter().map(|t| t.len() as u64).sum();
        let pruned: u64 = stats.iter().map(|s| s.pruned).sum();
        assert_eq!(pruned, prune_count(sparsity, total).unwrap());
        for (t, s) in got.iter().zip(&stats) {
            assert_eq!(s.zeros, t.iter().filter(|x| **x == 0.0).count() as u64);
        }
    }

    #[test]
    fn global_pruning_matches_a_sort_of_all_magnitudes() {
        let tensors: Vec<Vec<f32>> = (0..4).map(|i| benchmark_matrix(16 + 8 * i, 40, 100 + i as u64)).collect();
        for sparsity in [0.0, 0.01, 0.3, 0.5, 0.77, 0.99] {
            check(&tensors, sparsity);
        }
    }

    #[test]
    fn pass_one_is_skipped_when_the_first_tensor_predicts_the_bucket_and_the_cut_stays_exact_when_not() {
        let passes = |tensors: &[Vec<f32>], sparsity: f64| {
            let total = tensors.iter().map(|t| t.len() as u64).sum();
            let mut plan = GlobalMagnitude::new(sparsity, total).unwrap();
            let mut n = 0;
            while plan.needs_pass() {
                let pass = plan.pass();
                tensors.iter().for_each(|t| plan.observe(pass, t).unwrap());
                plan.end_pass().unwrap();
                n += 1;
            }
            assert_eq!(n, 1 + usize::from(plan.second_pass));
            plan.second_pass
        };
        // Layers of one distribution: the first predicts the bucket, one pass.
        let alike: Vec<Vec<f32>> = (0..4).map(|i| benchmark_matrix(256, 256, 7 + i)).collect();
        for sparsity in [0.3, 0.5, 0.9] {
            assert!(!passes(&alike, sparsity), "sparsity {sparsity}");
            check(&alike, sparsity);
        }
        // A first tensor a thousand times smaller than the rest: the estimate misses, pass 1 runs.
        let mut unlike = alike.clone();
        unlike[0].iter_mut().for_each(|x| *x *= 1e-3);
        assert!(passes(&unlike, 0.5));
        check(&unlike, 0.5);
    }

    #[test]
    fn global_ties_and_zeros_are_pruned_in_tensor_then_index_order() {
        let mut rng = SplitMix64::new(21);
        let levels = [0.0f32, -0.0, 0.25, -0.25, 0.5, 1e-3];
        let tensors: Vec<Vec<f32>> = [700usize, 1, 333, 2000]
            .iter()
            .map(|&n| (0..n).map(|_| levels[(rng.next_u64() % 6) as usize]).collect())
            .collect();
        for sparsity in [0.05, 0.2, 0.34, 0.5, 0.6, 0.9] {
            check(&tensors, sparsity);
        }
        check(&[vec![0.75; 10], vec![0.75; 7]], 0.5);
        check(&[vec![0.0; 10], vec![], vec![0.0; 3]], 0.5);
    }

    #[test]
    fn every_kept_magnitude_across_tensors_is_at_least_every_pruned_one() {
        let originals: Vec<Vec<f32>> = (0..3).map(|i| benchmark_matrix(20, 50, i)).collect();
        let mut tensors = originals.clone();
        run(&mut tensors, 0.5);
        let (mut max_pruned, mut min_kept) = (0f32, f32::INFINITY);
        for (o, p) in originals.iter().zip(&tensors) {
            for (x, y) in o.iter().zip(p) {
                if *y == 0.0 {
                    max_pruned = max_pruned.max(x.abs());
                } else {
                    min_kept = min_kept.min(y.abs());
                }
            }
        }
        assert!(max_pruned <= min_kept, "{max_pruned} > {min_kept}");
    }

    #[test]
    fn global_pruning_is_deterministic() {
        let tensors: Vec<Vec<f32>> = (0..3).map(|i| benchmark_matrix(64, 300, i)).collect();
        let mut a = tensors.clone();
        let mut b = tensors;
        assert_eq!(run(&mut a, 0.5), run(&mut b, 0.5));
        assert_eq!(a, b);
    }

    #[test]
    fn a_cut_that_closes_its_bucket_needs_a_single_pass() {
        // Two distinct magnitudes in different high-16-bit buckets; 50% takes all of the smaller one.
        let mut plan = GlobalMagnitude::new(0.5, 8).unwrap();
        plan.observe(0, &[0.5, -1.0, 0.5, 1.0, -0.5, 1.0, 0.5, 1.0]).unwrap();
        plan.end_pass().unwrap();
        assert!(!plan.needs_pass());
        assert_eq!(plan.cut().unwrap().ties, 0);
    }

    #[test]
    fn misuse_of_the_pass_protocol_is_reported() {
        let mut plan = GlobalMagnitude::new(0.5, 4).unwrap();
        assert_eq!(plan.cut(), Err(PruneError::NotFinished));
        assert_eq!(plan.observe(1, &[1.0]), Err(PruneError::WrongPass { expected: 0, got: 1 }));
        plan.observe(0, &[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(
            plan.end_pass().unwrap_err().to_string(),
            "global magnitude: pass 0 saw 3 values, but total_len is 4"
        );
        assert_eq!(GlobalMagnitude::new(1.0, 4).unwrap_err(), PruneError::Sparsity(1.0));
    }
}
