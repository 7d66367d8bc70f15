//! Automatic mixed precision: one candidate scheme per tensor, minimising the total error with the
//! parameter-weighted average bits per weight at or under a target.
//!
//! This is a multiple-choice knapsack. It is solved exactly by dynamic programming over the Pareto
//! frontier of (bits spent, error) pairs: after each tensor only assignments that no other assignment
//! beats on both cost and error are kept, and states that cannot finish within the budget even with
//! the cheapest remaining choices are dropped. Costs stay real numbers (no discretisation), so the
//! result equals brute force. The frontier is at most the number of distinct cost sums; should it
//! exceed [`MAX_FRONTIER`] states (many tensors of distinct sizes), it is thinned to the best state
//! per cost bucket, the answer stays within budget but may be slightly suboptimal, and
//! [`Allocation::exact`] says so.

/// Frontier states kept per step before thinning; bounds time (~states x candidates per tensor)
/// and the back-pointer memory (4 bytes per state per tensor: 64 KiB x tensors). Must stay
/// below 2^24, the parent field of [`State::back`].
pub const MAX_FRONTIER: usize = 16384;

/// Relative slack on the budget that absorbs float rounding of sums of `params x bits`.
const BUDGET_SLACK: f64 = 1e-9;

/// Errors of the allocator; messages name the tensor, candidate or budget involved.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MixedError {
    #[error("tensor \"{0}\" has no candidate schemes")]
    NoCandidates(String),
    #[error("tensor \"{tensor}\" candidate {index}: {reason}")]
    InvalidCandidate { tensor: String, index: usize, reason: String },
    #[error("target_bits must be a positive finite number, got {0}")]
    InvalidTarget(f64),
    #[error("target of {target} bits per weight is below the minimum achievable {minimum:.4} with these candidates")]
    OverBudget { target: f64, minimum: f64 },
}

/// One scheme a tensor could get: its storage cost and the error it would cause.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Storage bits per weight including scales (q4_k: 4.5).
    pub bits_per_weight: f64,
    /// This tensor's contribution to the objective, already parameter-weighted: e.g. the squared
    /// error summed over its weights, or relative error squared x params. Must be >= 0.
    pub error: f64,
}

/// A targeted tensor: its size and its candidates.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorOptions {
    pub name: String,
    pub params: u64,
    pub candidates: Vec<Candidate>,
}

/// The chosen assignment.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    /// Per tensor, the index of the chosen candidate.
    pub choices: Vec<usize>,
    /// Parameter-weighted average bits per weight achieved (<= target).
    pub average_bits: f64,
    /// Sum of the chosen candidates' errors.
    pub total_error: f64,
    /// A proven lower bound on the optimal total error (Lagrangian dual bound, capped at
    /// `total_error`): when `exact` is false, `total_error - lower_bound` bounds the loss.
    pub lower_bound: f64,
    /// True when the frontier never needed thinning, i.e. the result is proven optimal.
    pub exact: bool,
}

#[derive(Clone, Copy)]
struct State {
    cost: f64,
    error: f64,
    /// Back-pointer: index of the parent state in the previous frontier << 8 | candidate index.
    back: u32,
}

/// Candidates per tensor that fit the 8-bit choice field of [`State::back`].
const MAX_CANDIDATES: usize = 256;

/// Chooses per tensor the candidate minimising total error with average bits <= `target_bits`.
pub fn allocate(tensors: &[TensorOptions], target_bits: f64) -> Result<Allocation, MixedError> {
    allocate_with_cap(tensors, target_bits, MAX_FRONTIER)
}

fn validate(tensors: &[TensorOptions], target_bits: f64) -> Result<(), MixedError> {
    if !(target_bits.is_finite() && target_bits > 0.0) {
        return Err(MixedError::InvalidTarget(target_bits));
    }
    for t in tensors {
        if t.candidates.is_empty() {
            return Err(MixedError::NoCandidates(t.name.clone()));
        }
        if t.candidates.len() > MAX_CANDIDATES {
            return Err(MixedError::InvalidCandidate {
                tensor: t.name.clone(),
                index: MAX_CANDIDATES,
                reason: format!("at most {MAX_CANDIDATES} candidates per tensor are supported"),
            });
        }
        for (index, c) in t.candidates.iter().enumerate() {
            let reason = if !(c.bits_per_weight.is_finite() && c.bits_per_weight > 0.0) {
                format!("bits_per_weight must be positive and finite, got {}", c.bits_per_weight)
            } else if !(c.error.is_finite() && c.error >= 0.0) {
                format!("error must be finite and >= 0, got {}", c.error)
            } else {
                continue;
            };
            return Err(MixedError::InvalidCandidate { tensor: t.name.clone(), index, reason });
        }
    }
    Ok(())
}

fn allocate_with_cap(tensors: &[TensorOptions], target_bits: f64, cap: usize) -> Result<Allocation, MixedError> {
    validate(tensors, target_bits)?;
    let params: f64 = tensors.iter().map(|t| t.params as f64).sum();
    let cost = |t: &TensorOptions, c: &Candidate| t.params as f64 * c.bits_per_weight;
    // min_rest[i]: the cheapest possible cost of tensors i.. (prunes states that cannot finish).
    let mut min_rest = vec![0.0; tensors.len() + 1];
    for (i, t) in tensors.iter().enumerate().rev() {
        let cheapest = t.candidates.iter().map(|c| cost(t, c)).fold(f64::INFINITY, f64::min);
        min_rest[i] = min_rest[i + 1] + cheapest;
    }
    let budget = target_bits * params * (1.0 + BUDGET_SLACK);
    if min_rest[0] > budget {
        return Err(MixedError::OverBudget { target: target_bits, minimum: min_rest[0] / params });
    }

    let mut exact = true;
    let mut frontier = vec![State { cost: 0.0, error: 0.0, back: 0 }];
    // backs[i][k]: the back-pointer of state k of the frontier after tensor i.
    let mut backs: Vec<Vec<u32>> = Vec::with_capacity(tensors.len());
    let mut next = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        next.clear();
        for (p, s) in frontier.iter().enumerate() {
            for (j, c) in t.candidates.iter().enumerate() {
                let state =
                    State { cost: s.cost + cost(t, c), error: s.error + c.error, back: (p as u32) << 8 | j as u32 };
                if state.cost + min_rest[i + 1] <= budget {
                    next.push(state);
                }
            }
        }
        next.sort_unstable_by(|a, b| a.cost.total_cmp(&b.cost).then(a.error.total_cmp(&b.error)));
        // Keep the Pareto frontier: error strictly falls as cost rises.
        frontier.clear();
        for s in &next {
            if frontier.last().is_none_or(|k| s.error < k.error) {
                frontier.push(*s);
            }
        }
        if frontier.len() > cap {
            frontier = thin(&frontier, cap);
            exact = false;
        }
        if frontier.is_empty() {
            // Only reachable through float rounding right at the budget's edge.
            return Err(MixedError::OverBudget { target: target_bits, minimum: min_rest[0] / params });
        }
        backs.push(frontier.iter().map(|s| s.back).collect());
    }

    // The final frontier's last state has the lowest error, and every state in it fits the budget
    // (min_rest pruning left only states that can finish, and the initial check made one exist).
    let total_error = frontier.last().map_or(0.0, |s| s.error);
    let mut choices = vec![0usize; tensors.len()];
    let mut idx = frontier.len() - 1;
    for (i, layer) in backs.iter().enumerate().rev() {
        choices[i] = (layer[idx] & 0xFF) as usize;
        idx = (layer[idx] >> 8) as usize;
    }
    let spent: f64 = tensors.iter().zip(&choices).map(|(t, &j)| cost(t, &t.candidates[j])).sum();
    Ok(Allocation {
        choices,
        average_bits: if params > 0.0 { spent / params } else { 0.0 },
        total_error,
        lower_bound: lagrangian_bound(tensors, target_bits * params).min(total_error),
        exact,
    })
}

/// max over lambda >= 0 of  sum_i min_j (error_ij + lambda cost_ij) - lambda budget: a lower bound
/// on the constrained optimum (weak duality). The dual is concave in lambda, so a golden-section
/// search over log(lambda) finds its maximum; lambda = 0 (no budget) is checked as well.
fn lagrangian_bound(tensors: &[TensorOptions], budget: f64) -> f64 {
    let dual = |lambda: f64| {
        let inner: f64 = tensors
            .iter()
            .map(|t| {
                let p = t.params as f64;
                t.candidates.iter().map(|c| c.error + lambda * p * c.bits_per_weight).fold(f64::INFINITY, f64::min)
            })
            .sum();
        inner - lambda * budget
    };
    // lambda in [e^-120, e^120] spans any ratio of error units to bit units that f64 sums hold;
    // 200 golden-section steps shrink that interval below f64 resolution.
    let (mut lo, mut hi) = (-120f64, 120f64);
    let ratio = (5f64.sqrt() - 1.0) / 2.0;
    for _ in 0..200 {
        let (a, b) = (hi - ratio * (hi - lo), lo + ratio * (hi - lo));
        if dual(a.exp()) < dual(b.exp()) {
            lo = a;
        } else {
            hi = b;
        }
    }
    dual(0.0).max(dual(((lo + hi) / 2.0).exp()))
}

/// Keeps, in each of `cap` equal cost buckets, the state with the lowest error (the last one),
/// plus the cheapest state so that a feasible completion always survives.
fn thin(frontier: &[State], cap: usize) -> Vec<State> {
    let (lo, hi) = (frontier[0].cost, frontier[frontier.len() - 1].cost);
    let width = (hi - lo) / cap as f64;
    let bucket = |c: f64| (((c - lo) / width) as usize).min(cap - 1);
    let mut out: Vec<State> = Vec::with_capacity(cap + 1);
    out.push(frontier[0]);
    for s in &frontier[1..] {
        let n = out.len();
        if n > 1 && bucket(out[n - 1].cost) == bucket(s.cost) {
            out[n - 1] = *s;
        } else {
            out.push(*s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Relative tolerance when comparing error totals summed in different orders.
    const SUM_TOLERANCE: f64 = 1e-9;
    /// Allowed error excess of a frontier thinned to 64 states on the 40-tensor case.
    const THINNED_LOSS_BOUND: f64 = 1.05;

    fn tensor(name: &str, params: u64, options: &[(f64, f64)]) -> TensorOptions {
        TensorOptions {
            name: name.into(),
            params,
            candidates: options.iter().map(|&(bits_per_weight, error)| Candidate { bits_per_weight, error }).collect(),
        }
    }

    /// Three GGUF-like schemes (q8_0, q4_k, q2_k) whose error shrinks with bits.
    fn ladder(name: &str, params: u64, sensitivity: f64) -> TensorOptions {
        let p = params as f64 * sensitivity;
        tensor(name, params, &[(8.5, 0.01 * p), (4.5, 1.0 * p), (2.625, 9.0 * p)])
    }

    /// The lowest total error over all assignments within the budget, by enumeration.
    fn brute_force(tensors: &[TensorOptions], target: f64) -> Option<f64> {
        let params: f64 = tensors.iter().map(|t| t.params as f64).sum();
        let mut best: Option<f64> = None;
        let mut choice = vec![0usize; tensors.len()];
        loop {
            let (mut cost, mut error) = (0.0, 0.0);
            for (t, &j) in tensors.iter().zip(&choice) {
                cost += t.params as f64 * t.candidates[j].bits_per_weight;
                error += t.candidates[j].error;
            }
            if cost <= target * params * (1.0 + BUDGET_SLACK) && best.is_none_or(|b| error < b) {
                best = Some(error);
            }
            // Odometer increment over the candidate indices.
            let mut i = 0;
            loop {
                if i == tensors.len() {
                    return best;
                }
                choice[i] += 1;
                if choice[i] < tensors[i].candidates.len() {
                    break;
                }
                choice[i] = 0;
                i += 1;
            }
        }
    }

    fn average_bits(tensors: &[TensorOptions], choices: &[usize]) -> f64 {
        let params: f64 = tensors.iter().map(|t| t.params as f64).sum();
        let cost: f64 =
            tensors.iter().zip(choices).map(|(t, &j)| t.params as f64 * t.candidates[j].bits_per_weight).sum();
        cost / params
    }

    #[test]
    fn a_budget_above_every_candidate_picks_the_most_accurate_everywhere() {
        let tensors = [ladder("a", 1000, 1.0), ladder("b", 300, 5.0), ladder("c", 7, 0.1)];
        let a = allocate(&tensors, 16.0).unwrap();
        assert_eq!(a.choices, [0, 0, 0]);
        assert_eq!(a.average_bits, 8.5);
        assert!(a.exact);
    }

    #[test]
    fn a_budget_at_the_cheapest_picks_the_cheapest_everywhere() {
        let tensors = [ladder("a", 1000, 1.0), ladder("b", 300, 5.0)];
        assert_eq!(allocate(&tensors, 2.625).unwrap().choices, [2, 2]);
    }

    #[test]
    fn an_impossible_budget_names_the_minimum_achievable() {
        let tensors = [ladder("a", 1000, 1.0), tensor("norm", 1000, &[(16.0, 0.0)])];
        let err = allocate(&tensors, 4.0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "target of 4 bits per weight is below the minimum achievable 9.3125 with these candidates"
        );
    }

    #[test]
    fn sensitive_tensors_get_the_bits_when_the_budget_is_tight() {
        // 4.5 average over equal sizes: the 100x more sensitive tensor gets q8_0, the other q2_k-ish.
        let tensors = [ladder("robust", 1024, 0.01), ladder("sensitive", 1024, 1.0)];
        let a = allocate(&tensors, 5.6).unwrap();
        assert_eq!(a.choices, [2, 0]);
        assert!(a.average_bits <= 5.6);
    }

    #[test]
    fn invalid_inputs_are_refused_naming_the_tensor() {
        let empty = [tensor("w", 10, &[])];
        assert_eq!(allocate(&empty, 4.0).unwrap_err().to_string(), "tensor \"w\" has no candidate schemes");
        let nan = [tensor("w", 10, &[(4.0, f64::NAN)])];
        assert_eq!(
            allocate(&nan, 4.0).unwrap_err().to_string(),
            "tensor \"w\" candidate 0: error must be finite and >= 0, got NaN"
        );
        assert_eq!(allocate(&[], -1.0), Err(MixedError::InvalidTarget(-1.0)));
    }

    #[test]
    fn no_tensors_is_an_empty_allocation() {
        let a = allocate(&[], 4.0).unwrap();
        assert!(a.choices.is_empty() && a.total_error == 0.0);
    }

    #[test]
    fn a_thinned_frontier_still_meets_the_budget_and_stays_close() {
        // 40 tensors of distinct sizes: the exact frontier grows past a cap of 64 states (to < 1024).
        let tensors: Vec<_> = (0..40).map(|i| ladder(&format!("t{i}"), 100 + 37 * i, 1.0 + (i % 7) as f64)).collect();
        let exact = allocate(&tensors, 4.0).unwrap();
        let thinned = allocate_with_cap(&tensors, 4.0, 64).unwrap();
        assert!(exact.exact && !thinned.exact);
        assert!(thinned.average_bits <= 4.0 * (1.0 + BUDGET_SLACK));
        assert!(thinned.total_error >= exact.total_error * (1.0 - SUM_TOLERANCE));
        // Measured 1.4% above optimal for this case (cap 128 is already optimal here).
        assert!(thinned.total_error <= exact.total_error * THINNED_LOSS_BOUND);
        // The dual bound certifies both: it never exceeds the optimum.
        assert!(thinned.lower_bound <= exact.total_error * (1.0 + SUM_TOLERANCE));
        assert!(exact.lower_bound <= exact.total_error);
    }

    fn small_problem() -> impl Strategy<Value = (Vec<TensorOptions>, f64)> {
        let candidate = (1.0f64..16.0, 0.0f64..100.0);
        let one = (1u64..5000, proptest::collection::vec(candidate, 3));
        (proptest::collection::vec(one, 6), 0.0f64..1.0).prop_map(|(raw, mix)| {
            let tensors: Vec<_> =
                raw.into_iter().enumerate().map(|(i, (params, c))| tensor(&format!("t{i}"), params, &c)).collect();
            let bits = |pick: fn(f64, f64) -> f64, init: f64| {
                let params: f64 = tensors.iter().map(|t| t.params as f64).sum();
                let cost: f64 = tensors
                    .iter()
                    .map(|t| {
                        let b = t.candidates.iter().map(|c| c.bits_per_weight).fold(init, pick);
                        t.params as f64 * b
                    })
                    .sum();
                cost / params
            };
            // Targets from slightly infeasible to slack, to hit every regime.
            let (lo, hi) = (bits(f64::min, f64::INFINITY), bits(f64::max, 0.0));
            let target = lo * 0.95 + (hi * 1.05 - lo * 0.95) * mix;
            (tensors, target)
        })
    }

    proptest! {
        #[test]
        fn the_allocation_equals_brute_force_and_meets_the_budget((tensors, target) in small_problem()) {
            match (allocate(&tensors, target), brute_force(&tensors, target)) {
                (Ok(a), Some(best)) => {
                    prop_assert!(a.exact);
                    prop_assert!(average_bits(&tensors, &a.choices) <= target * (1.0 + BUDGET_SLACK));
                    prop_assert!((a.total_error - best).abs() <= SUM_TOLERANCE * best.max(1.0));
                    prop_assert!(a.lower_bound <= best + SUM_TOLERANCE * best.max(1.0));
                    let chosen: f64 = tensors.iter().zip(&a.choices).map(|(t, &j)| t.candidates[j].error).sum();
                    prop_assert!((chosen - a.total_error).abs() <= SUM_TOLERANCE * chosen.max(1.0));
                }
                (Err(MixedError::OverBudget { .. }), None) => {}
                (got, want) => prop_assert!(false, "allocator {got:?} vs brute force {want:?}"),
            }
        }
    }
}
