//! Passes before the main one, for steps that must see every tensor before changing any:
//! global magnitude pruning (selection of the exact threshold) and automatic mixed precision
//! (error of every candidate on every tensor, then the allocation under the budget). Each pass
//! reads the tensors one at a time, so memory stays bounded.

use super::kernels::{apply, quantize, Buffers, Resolved};
use super::{EngineError, EngineJob, Tracker};
use crate::compress::mixed::{self, Candidate, TensorOptions};
use crate::compress::plan::{scheme_bits, scheme_name, scheme_refusal, Kernel, TensorPlan};
use crate::compress::prune::{magnitude_key, GlobalMagnitude};
use crate::compress::report::{MixedChoice, MixedDecision};
use crate::compress::spec::{PruneMethod, QuantMethod, Scheme, Step};
use crate::formats::safetensors::TensorReader;

fn members(job: &EngineJob<'_>, want: impl Fn(&Kernel) -> bool) -> Vec<usize> {
    job.plan
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, tp)| tp.actions.iter().any(|a| want(&a.kernel)))
        .map(|(i, _)| i)
        .collect()
}

/// Reads tensor `tp` into `b.work` with the actions of earlier steps applied.
fn load_before(
    job: &EngineJob<'_>,
    tp: &TensorPlan,
    step: usize,
    reader: &mut TensorReader,
    b: &mut Buffers,
    resolved: &mut Resolved,
) -> Result<(), EngineError> {
    let t = &job.header.tensors[tp.index];
    reader.read_f32(t, &mut b.work)?;
    apply(t, &tp.actions, Some(step), b, resolved, None)?;
    Ok(())
}

pub fn resolve(
    job: &EngineJob<'_>,
    reader: &mut TensorReader,
    b: &mut Buffers,
    tracker: &mut Tracker<'_>,
) -> Result<(Resolved, Vec<MixedDecision>), EngineError> {
    let mut resolved = Resolved::default();
    let mut decisions = Vec::new();
    for (s, step) in job.spec.steps.iter().enumerate() {
        match step {
            Step::Prune(p) => {
                let PruneMethod::Magnitude { global: true, sparsity } = p.method else { continue };
                let ids = members(job, |k| *k == Kernel::GlobalMagnitude { step: s });
                let total: u64 =
                    ids.iter().map(|&i| job.header.tensors[job.plan.tensors[i].index].numel() as u64).sum();
                let mut gm = GlobalMagnitude::new(sparsity, total).map_err(|e| global_error(s, e))?;
                while gm.needs_pass() {
                    for &i in &ids {
                        let tp = &job.plan.tensors[i];
                        tracker.check(&format!("selecting the global threshold: {}", tp.name))?;
                        load_before(job, tp, s, reader, b, &mut resolved)?;
                        gm.observe(gm.pass(), &b.work).map_err(|e| global_error(s, e))?;
                        tracker.done(tp.bytes_in);
                    }
                    gm.end_pass().map_err(|e| global_error(s, e))?;
                }
                let cut = gm.cut().map_err(|e| global_error(s, e))?;
                let ties = cut.start();
                resolved.global.insert(s, (cut, ties));
                if cut.ties > 0 && later_prepass(job, s) {
                    allot_ties(job, s, &ids, reader, b, &mut resolved, tracker)?;
                }
            }
            Step::Quantize(q) => {
                let QuantMethod::Auto { target_bits, candidates } = &q.method else { continue };
                decisions.push(measure_and_allocate(
                    job,
                    s,
                    *target_bits,
                    candidates,
                    reader,
                    b,
                    &mut resolved,
                    tracker,
                )?);
            }
        }
    }
    Ok((resolved, decisions))
}

/// Does a step after `s` read the tensors in a pass of its own (and so apply step `s` early)?
fn later_prepass(job: &EngineJob<'_>, s: usize) -> bool {
    job.spec.steps[s + 1..].iter().any(|step| match step {
        Step::Prune(p) => matches!(p.method, PruneMethod::Magnitude { global: true, .. }),
        Step::Quantize(q) => matches!(q.method, QuantMethod::Auto { .. }),
    })
}

/// One counting pass: hands the cut's threshold ties to tensors in processing order, as the
/// main pass would, and records each tensor's share.
fn allot_ties(
    job: &EngineJob<'_>,
    s: usize,
    ids: &[usize],
    reader: &mut TensorReader,
    b: &mut Buffers,
    resolved: &mut Resolved,
    tracker: &mut Tracker<'_>,
) -> Result<(), EngineError> {
    let (cut, _) = resolved.global[&s];
    let mut remaining = cut.ties;
    for &i in ids {
        let tp = &job.plan.tensors[i];
        tracker.check(&format!("sharing threshold ties: {}", tp.name))?;
        load_before(job, tp, s, reader, b, resolved)?;
        let equal = b.work.iter().filter(|x| magnitude_key(**x) == cut.threshold).count() as u64;
        let mine = equal.min(remaining);
        remaining -= mine;
        resolved.global_ties.insert((s, tp.name.clone()), mine);
        tracker.done(tp.bytes_in);
    }
    Ok(())
}

fn global_error(step: usize, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tensor { tensor: format!("(step {step})"), code: "kernel_error", detail: e.to_string() }
}

#[allow(clippy::too_many_arguments)]
fn measure_and_allocate(
    job: &EngineJob<'_>,
    s: usize,
    target_bits: f64,
    candidates: &[Scheme],
    reader: &mut TensorReader,
    b: &mut Buffers,
    resolved: &mut Resolved,
    tracker: &mut Tracker<'_>,
) -> Result<MixedDecision, EngineError> {
    let ids = members(job, |k| *k == Kernel::Auto { step: s });
    let mut options = Vec::with_capacity(ids.len());
    let mut fitting: Vec<Vec<Scheme>> = Vec::with_capacity(ids.len());
    let mut measured_all = Vec::with_capacity(ids.len());
    let mut probe = Buffers::default();
    for &i in &ids {
        let tp = &job.plan.tensors[i];
        let t = &job.header.tensors[tp.index];
        tracker.check(&format!("measuring candidate schemes: {}", tp.name))?;
        load_before(job, tp, s, reader, b, resolved)?;
        let fits: Vec<Scheme> = candidates.iter().copied().filter(|c| scheme_refusal(c, t).is_none()).collect();
        let mut cands = Vec::with_capacity(fits.len());
        let mut measured = Vec::with_capacity(fits.len());
        for c in &fits {
            probe.work.clear();
            probe.work.extend_from_slice(&b.work);
            quantize(t, c, &mut probe)?;
            let error: f64 = b.work.iter().zip(&probe.work).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
            cands.push(Candidate { bits_per_weight: scheme_bits(c, t), error });
            measured.push((scheme_name(c), error));
        }
        options.push(TensorOptions { name: tp.name.clone(), params: t.numel() as u64, candidates: cands });
        fitting.push(fits);
        measured_all.push(measured);
        tracker.done(tp.bytes_in);
    }
    let alloc = mixed::allocate(&options, target_bits).map_err(|e| EngineError::Tensor {
        tensor: format!("(step {s})"),
        code: "budget_unreachable",
        detail: e.to_string(),
    })?;
    let mut choices = Vec::with_capacity(ids.len());
    for (k, &i) in ids.iter().enumerate() {
        let scheme = fitting[k][alloc.choices[k]];
        let name = job.plan.tensors[i].name.clone();
        choices.push(MixedChoice {
            tensor: name.clone(),
            scheme: scheme_name(&scheme),
            bits_per_weight: options[k].candidates[alloc.choices[k]].bits_per_weight,
            measured: std::mem::take(&mut measured_all[k]),
        });
        resolved.auto.insert((s, name), scheme);
    }
    Ok(MixedDecision { step: s, target_bits, achieved_bits: alloc.average_bits, exact: alloc.exact, choices })
}
