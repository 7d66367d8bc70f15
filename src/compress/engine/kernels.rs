//! Runs one tensor's planned actions on reused buffers.

use std::collections::HashMap;
use std::time::Instant;

use super::EngineError;
use crate::compress::ggml;
use crate::compress::metrics::error_metrics;
use crate::compress::ops::Scheme;
use crate::compress::plan::{Kernel, PlannedAction};
use crate::compress::prune::{self, GlobalCut, TieState};
use crate::compress::quant::{quantize_into_until, IntParams, IntQuantized, QuantError, ScaleSearch, Stop, StoreDtype};
use crate::compress::report::StepTiming;
use crate::formats::gguf::GgufType;
use crate::formats::safetensors::{Dtype, TensorInfo};

/// Buffers reused from one tensor to the next: memory stays at a few copies of the largest.
#[derive(Default)]
pub struct Buffers {
    /// The tensor as read (f32).
    pub orig: Vec<f32>,
    /// The values after the actions so far.
    pub work: Vec<f32>,
    pub scratch: Vec<f32>,
    pub int: IntQuantized,
    pub ggml: Vec<u8>,
}

/// The quantization that still describes `work` after the last action, if any.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LastQuant {
    None,
    Int(IntParams),
    Ggml(GgufType),
}

/// Results of the passes before the main one, and state the main pass carries across tensors.
#[derive(Default)]
pub struct Resolved {
    /// Mixed precision: (step, tensor) -> the chosen scheme.
    pub auto: HashMap<(usize, String), Scheme>,
    /// Global magnitude: step -> the threshold and the tie counter (in processing order).
    pub global: HashMap<usize, (GlobalCut, TieState)>,
    /// Global magnitude when a later step reads the tensors again in its own pass: (step,
    /// tensor) -> how many threshold ties that tensor prunes, so applying the cut carries no
    /// state between tensors and every pass sees the same mask.
    pub global_ties: HashMap<(usize, String), u64>,
    /// Structured pruning: (step, weight name) -> the rows it zeroed, for the matching bias.
    pub removed_rows: HashMap<(usize, String), Vec<usize>>,
}

/// What happened to one tensor, for the report and the output sinks.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub quant: LastQuant,
    pub labels: Vec<String>,
    pub notes: Vec<String>,
    pub requested_sparsity: Option<f64>,
    /// With `search: mse`, the relative error plain round-to-nearest would have had.
    pub rtn_relative_error: Option<f64>,
}

fn tensor_error(t: &TensorInfo, code: &'static str, detail: impl ToString) -> EngineError {
    EngineError::Tensor { tensor: t.name.clone(), code, detail: detail.to_string() }
}

fn quant_error(t: &TensorInfo, e: QuantError) -> EngineError {
    if e == QuantError::Canceled {
        return EngineError::Canceled;
    }
    let code = if matches!(e, QuantError::NonFinite { .. }) { "non_finite_weights" } else { "kernel_error" };
    tensor_error(t, code, e)
}

/// Flat index of the first NaN/Inf, if any. The scan has no early exit so it vectorises; only a
/// failing tensor pays for the second, locating pass.
pub fn first_non_finite(data: &[f32]) -> Option<usize> {
    let finite = data.iter().fold(true, |ok, v| ok & v.is_finite());
    if finite {
        None
    } else {
        data.iter().position(|v| !v.is_finite())
    }
}

/// Every op refuses NaN/Inf in its input: no kernel's output means anything after one.
fn check_finite_input(t: &TensorInfo, data: &[f32]) -> Result<(), EngineError> {
    match first_non_finite(data) {
        Some(i) => {
            Err(tensor_error(t, "non_finite_weights", format!("non-finite value {} at flat index {i}", data[i])))
        }
        None => Ok(()),
    }
}

/// Where int scales are stored for a weight of dtype `d` (compressed-tensors: the weight's own
/// float type; f32 for f32 and f64 weights).
pub fn store_dtype(d: Dtype) -> StoreDtype {
    match d {
        Dtype::F16 => StoreDtype::F16,
        Dtype::BF16 => StoreDtype::BF16,
        _ => StoreDtype::F32,
    }
}

/// Block reconstructions can overshoot their block's largest value by a few percent (f16 scale
/// rounding, 2^-11; the k-quants' 6-bit sub-scales, up to ~2%), so values are kept this far below
/// the largest finite value of the tensor's dtype, which the dense output must still hold.
const BLOCK_HEADROOM: f32 = 0.97;

/// The largest magnitude `ty` can take from a tensor of dtype `d` and give back finite in `d`.
fn saturation_limit(ty: GgufType, d: Dtype) -> Option<f32> {
    match ty {
        GgufType::F32 | GgufType::F16 => ty.input_limit(),
        _ => Some(ty.input_limit().unwrap_or(f32::MAX).min(store_dtype(d).max() * BLOCK_HEADROOM)),
    }
}

/// Clamps values `ty` cannot hold to its limit; returns the limit and how many were clamped.
fn saturate_for(ty: GgufType, d: Dtype, data: &mut [f32]) -> (f32, usize) {
    let Some(limit) = saturation_limit(ty, d) else { return (f32::MAX, 0) };
    let over = data.iter().filter(|v| v.abs() > limit).count();
    if over > 0 {
        data.iter_mut().for_each(|v| *v = v.clamp(-limit, limit));
    }
    (limit, over)
}

/// Quantizes `b.work` in place with `scheme`; returns what now describes it, and a note when
/// values had to be saturated to fit the scheme's range.
pub fn quantize(
    t: &TensorInfo,
    scheme: &Scheme,
    b: &mut Buffers,
    stop: &Stop<'_>,
) -> Result<(LastQuant, Option<String>), EngineError> {
    let (rows, cols) = t.matrix();
    match scheme {
        Scheme::Int(p) => {
            // The dequantized values go to `scratch`, then swap with `work` (GGUF decodes in place).
            b.scratch.resize(b.work.len(), 0.0);
            quantize_into_until(&b.work, rows, cols, p, store_dtype(t.dtype), &mut b.int, &mut b.scratch, stop)
                .map_err(|e| quant_error(t, e))?;
            std::mem::swap(&mut b.work, &mut b.scratch);
            Ok((LastQuant::Int(*p), None))
        }
        Scheme::Ggml { ty, .. } => {
            let (limit, saturated) = saturate_for(*ty, t.dtype, &mut b.work);
            ggml::quantize_until(&b.work, rows, cols, *ty, &mut b.ggml, stop).map_err(|e| match e {
                ggml::GgmlError::Canceled => EngineError::Canceled,
                e => tensor_error(t, "kernel_error", e),
            })?;
            ggml::dequantize(&b.ggml, rows, cols, *ty, &mut b.work).map_err(|e| tensor_error(t, "kernel_error", e))?;
            let note = (saturated > 0).then(|| {
                format!(
                    "{saturated} values beyond +-{limit:e} were saturated to it: the largest magnitude {} can hold here (its block scales are f16, and the result must fit {})",
                    ty.name(),
                    t.dtype.as_str()
                )
            });
            Ok((LastQuant::Ggml(*ty), note))
        }
    }
}

/// How [`apply`] reports and stops: `between_steps(k, n)` before step `k` of `n` (progress; true
/// stops), `canceled` between the row blocks of a kernel.
#[derive(Clone, Copy)]
pub struct Hooks<'a> {
    pub between_steps: &'a dyn Fn(usize, usize) -> bool,
    pub canceled: &'a Stop<'a>,
}

/// Runs the actions of steps `< until` (all when `None`) on `b.work`, which holds the tensor.
pub fn apply(
    t: &TensorInfo,
    actions: &[PlannedAction],
    until: Option<usize>,
    b: &mut Buffers,
    resolved: &mut Resolved,
    mut timings: Option<&mut [StepTiming]>,
    hooks: Hooks<'_>,
) -> Result<Outcome, EngineError> {
    let Hooks { between_steps: stop, canceled } = hooks;
    let total = actions.iter().filter(|a| until.is_none_or(|u| a.step < u)).count();
    check_finite_input(t, &b.work)?;
    let (rows, cols) = t.matrix();
    let mut out = Outcome {
        quant: LastQuant::None,
        labels: Vec::new(),
        notes: Vec::new(),
        requested_sparsity: None,
        rtn_relative_error: None,
    };
    for (n, a) in actions.iter().filter(|a| until.is_none_or(|u| a.step < u)).enumerate() {
        // A cancel or a shutdown stops between the steps of a tensor, not after all of them.
        if n > 0 && stop(n, total) {
            return Err(EngineError::Canceled);
        }
        let started = Instant::now();
        let mut label = a.scheme.clone();
        let mut pruned = false;
        match &a.kernel {
            Kernel::Int(p) => {
                if p.search == ScaleSearch::Mse {
                    // The report shows what plain round-to-nearest would have lost, for comparison.
                    let rtn = IntParams { search: ScaleSearch::None, ..*p };
                    let mut probe = IntQuantized::default();
                    b.scratch.resize(b.work.len(), 0.0);
                    quantize_into_until(
                        &b.work,
                        rows,
                        cols,
                        &rtn,
                        store_dtype(t.dtype),
                        &mut probe,
                        &mut b.scratch,
                        canceled,
                    )
                    .map_err(|e| quant_error(t, e))?;
                    out.rtn_relative_error = Some(error_metrics(&b.work, &b.scratch).relative_error);
                }
                (out.quant, _) = quantize(t, &Scheme::Int(*p), b, canceled)?;
            }
            Kernel::Ggml(ty) => {
                let note;
                (out.quant, note) = quantize(
                    t,
                    &Scheme::Ggml { ty: *ty, fallback: crate::compress::ops::quantize::Fallback::Refuse },
                    b,
                    canceled,
                )?;
                out.notes.extend(note.map(|n| format!("step {}: {n}", a.step)));
            }
            Kernel::Auto { step } => {
                let scheme = *resolved.auto.get(&(*step, t.name.clone())).ok_or_else(|| {
                    tensor_error(t, "internal_error", "mixed precision was not resolved before the main pass")
                })?;
                label = format!("{} (auto)", crate::compress::ops::quantize::scheme_name(&scheme));
                let note;
                (out.quant, note) = quantize(t, &scheme, b, canceled)?;
                out.notes.extend(note.map(|n| format!("step {}: {n}", a.step)));
            }
            Kernel::Magnitude { sparsity } => {
                prune::prune_magnitude(&mut b.work, *sparsity).map_err(|e| tensor_error(t, "kernel_error", e))?;
                out.requested_sparsity = Some(*sparsity);
                pruned = true;
            }
            Kernel::GlobalMagnitude { step } => {
                let (cut, ties) = resolved
                    .global
                    .get_mut(step)
                    .ok_or_else(|| tensor_error(t, "internal_error", "global threshold missing"))?;
                match resolved.global_ties.get(&(*step, t.name.clone())) {
                    Some(&mine) => {
                        cut.apply(&mut b.work, &mut TieState { remaining: mine });
                    }
                    None => {
                        cut.apply(&mut b.work, ties);
                    }
                }
                pruned = true;
            }
            Kernel::NM { n, m } => {
                prune::prune_n_m(&mut b.work, rows, cols, *n, *m).map_err(|e| tensor_error(t, "kernel_error", e))?;
                out.requested_sparsity = Some(1.0 - *n as f64 / *m as f64);
                pruned = true;
            }
            Kernel::Structured { norm, amount } => {
                let r = prune::prune_rows(&mut b.work, rows, cols, *amount, *norm)
                    .map_err(|e| tensor_error(t, "kernel_error", e))?;
                out.notes.push(format!(
                    "step {}: zeroed {} of {rows} rows (the shape cannot shrink without an architecture graph)",
                    a.step,
                    r.removed_rows.len()
                ));
                resolved.removed_rows.insert((a.step, t.name.clone()), r.removed_rows);
                pruned = true;
            }
            // The structural phase already holds the new values in `work`.
            Kernel::Rewritten { .. } => {}
            Kernel::BiasOf { weight, step } => {
                if let Some(removed) = resolved.removed_rows.get(&(*step, weight.clone())) {
                    for &r in removed {
                        if let Some(v) = b.work.get_mut(r) {
                            *v = 0.0;
                        }
                    }
                }
                pruned = true;
            }
        }
        if pruned && out.quant != LastQuant::None {
            out.quant = LastQuant::None;
            out.notes.push(format!(
                "step {}: pruning after quantization changed the quantized values; compressed layouts store this tensor dense",
                a.step
            ));
        }
        if let Some(note) = &a.note {
            out.notes.push(format!("step {}: {note}", a.step));
        }
        out.labels.push(label);
        if let Some(t) = timings.as_deref_mut() {
            t[a.step].milliseconds += started.elapsed().as_secs_f64() * 1e3;
            t[a.step].tensors += 1;
        }
    }
    Ok(out)
}
