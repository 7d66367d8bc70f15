//! The `prune` step: magnitude (per layer or one global threshold), N:M, and structured rows.

pub(crate) mod parse;

use super::structural::{Edit, Importance, KeepRule};
use super::{OpKind, Scope, StepOp};
use crate::compress::engine::{EngineError, PassCx};
use crate::compress::layout::sparse_dtype;
use crate::compress::plan::planner::Planner;
use crate::compress::plan::{Kernel, PlannedAction, Skip};
use crate::compress::prune::{magnitude_key, GlobalMagnitude, Norm};
use crate::compress::report::MixedDecision;
use crate::compress::select::Selector;
use crate::compress::spec::OutputFormat;

#[derive(Debug, Clone)]
pub struct PruneStep {
    pub select: Selector,
    pub method: PruneMethod,
    /// Structured with a graph: rank units by their activation on the dataset, not weight norm.
    pub by_activation: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PruneMethod {
    /// Smallest magnitudes, `sparsity` of each tensor (`layer`) or of all targeted weights (`global`).
    Magnitude { global: bool, sparsity: f64 },
    /// Keep the `n` largest of every `m` consecutive weights along a row; rows whose length `m`
    /// does not divide are refused, or left alone when `skip_mismatch`.
    NM { n: usize, m: usize, skip_mismatch: bool },
    /// Zero the `amount` fraction of output units (rows/filters) with the lowest norm.
    Structured { norm: Norm, amount: f64 },
}

impl StepOp for PruneStep {
    fn kind(&self) -> OpKind {
        OpKind::Prune
    }

    fn scope(&self) -> Scope {
        match self.method {
            PruneMethod::Magnitude { global: true, .. } => Scope::CrossTensor,
            PruneMethod::Magnitude { global: false, .. } | PruneMethod::NM { .. } | PruneMethod::Structured { .. } => {
                Scope::Tensor
            }
        }
    }

    fn selector(&self) -> &Selector {
        &self.select
    }

    /// With a graph, structured pruning removes the units physically (every consumer follows).
    fn edit(&self, has_graph: bool) -> Option<Edit> {
        match self.method {
            PruneMethod::Structured { norm, amount } if has_graph => Some(Edit::Width {
                keep: KeepRule::Ratio(1.0 - amount),
                importance: if self.by_activation {
                    Importance::Activation
                } else {
                    Importance::Weights(match norm {
                        Norm::L1 => crate::graph::structure::Norm::L1,
                        Norm::L2 => crate::graph::structure::Norm::L2,
                    })
                },
                select: self.select.clone(),
            }),
            _ => None,
        }
    }

    fn plan_tensor(&self, cx: &mut Planner<'_>, step: usize, i: usize) {
        let pointer = format!("/steps/{step}");
        let t = cx.tensors[i].out.clone();
        let (rows, cols) = t.matrix();
        let (kernel, label, sparsity) = match self.method {
            PruneMethod::Magnitude { global: false, sparsity } => {
                (Kernel::Magnitude { sparsity }, format!("magnitude/layer/{sparsity:.2}"), sparsity)
            }
            PruneMethod::Magnitude { global: true, sparsity } => {
                (Kernel::GlobalMagnitude { step }, format!("magnitude/global/{sparsity:.2}"), sparsity)
            }
            PruneMethod::NM { n, m, skip_mismatch } => {
                if !cols.is_multiple_of(m) {
                    let reason = format!("row length {cols} is not a multiple of m = {m}");
                    if skip_mismatch {
                        cx.tensors[i].skipped.push(Skip { step, reason });
                    } else {
                        let detail = format!("{reason}; exclude it with `ignore` or set `\"on_mismatch\": \"skip\"`");
                        cx.refuse(format!("{pointer}/m"), &t, detail);
                    }
                    return;
                }
                (Kernel::NM { n, m }, format!("{n}:{m}"), 1.0 - n as f64 / m as f64)
            }
            PruneMethod::Structured { norm, amount } => {
                let removed = (amount * rows as f64).round() / rows.max(1) as f64;
                (
                    Kernel::Structured { norm, amount },
                    format!("structured/{norm:?}/{amount:.2}").to_lowercase(),
                    removed,
                )
            }
        };
        let sparse_out = cx.spec.outputs.contains(&OutputFormat::Sparse);
        let tp = &mut cx.tensors[i];
        // Pruning composes with earlier steps: zeros only grow.
        tp.sparsity = 1.0 - (1.0 - tp.sparsity) * (1.0 - sparsity);
        let only_pruned = tp.actions.iter().all(|a| a.zeroes() || matches!(a.kernel, Kernel::Rewritten { .. }));
        if only_pruned && sparse_out && t.shape.len() == 2 {
            let nnz = ((1.0 - tp.sparsity) * t.numel() as f64).round() as u64;
            tp.bytes_out =
                crate::formats::sparse::predicted_bytes(&t.shape, nnz, sparse_dtype(t.dtype)).unwrap_or(tp.bytes_in);
            tp.bits_per_weight = tp.bytes_out as f64 * 8.0 / t.numel().max(1) as f64;
        }
        tp.actions.push(PlannedAction { step, op: OpKind::Prune, scheme: label, note: None, kernel });
    }

    /// For each weight a structured step prunes, the bias of the same layer loses the same rows.
    fn plan_finish(&self, cx: &mut Planner<'_>, step: usize) {
        if !matches!(self.method, PruneMethod::Structured { .. }) {
            return;
        }
        let pruned: Vec<(String, usize)> = cx
            .tensors
            .iter()
            .filter(|t| t.actions.iter().any(|a| a.step == step && matches!(a.kernel, Kernel::Structured { .. })))
            .map(|t| (t.out.name.clone(), t.out.matrix().0))
            .collect();
        for (weight, rows) in pruned {
            let Some(layer) = weight.strip_suffix(".weight") else { continue };
            let bias = format!("{layer}.bias");
            if let Some(tp) = cx.tensors.iter_mut().find(|t| t.out.name == bias) {
                if tp.out.dtype.is_float() && tp.out.shape == [rows] {
                    tp.actions.push(PlannedAction {
                        step,
                        op: OpKind::Prune,
                        scheme: "bias of pruned rows".into(),
                        note: Some(format!("entries of rows removed from `{weight}`")),
                        kernel: Kernel::BiasOf { weight: weight.clone(), step },
                    });
                }
            }
        }
    }

    fn prepasses(&self) -> usize {
        if matches!(self.method, PruneMethod::Magnitude { global: true, .. }) {
            2
        } else {
            0
        }
    }

    /// Global magnitude: finds the exact threshold over every targeted tensor (histogram passes,
    /// [`GlobalMagnitude`]); when a later step reads the tensors early, also hands out the
    /// threshold ties per tensor so every pass sees the same mask.
    fn prepass(&self, cx: &mut PassCx<'_, '_>, s: usize) -> Result<Option<MixedDecision>, EngineError> {
        let PruneMethod::Magnitude { global: true, sparsity } = self.method else { return Ok(None) };
        let ids = cx.members(|k| *k == Kernel::GlobalMagnitude { step: s });
        let total: u64 = ids.iter().map(|&i| cx.plan.tensors[i].out.numel() as u64).sum();
        let mut gm = GlobalMagnitude::new(sparsity, total).map_err(|e| global_error(s, e))?;
        while gm.needs_pass() {
            for &i in &ids {
                cx.progress(&format!("selecting the global threshold: {}", cx.plan.tensors[i].out.name))?;
                cx.load_before(i, s)?;
                gm.observe(gm.pass(), &cx.b.work).map_err(|e| global_error(s, e))?;
                cx.done(i);
            }
            gm.end_pass().map_err(|e| global_error(s, e))?;
        }
        let cut = gm.cut().map_err(|e| global_error(s, e))?;
        cx.resolved.global.insert(s, (cut, cut.start()));
        let later_prepass = cx.plan.spec.steps[s + 1..].iter().any(|st| st.op().prepasses() > 0);
        if cut.ties > 0 && later_prepass {
            // One counting pass: hands the ties to tensors in processing order, as the main pass
            // would, and records each tensor's share.
            let mut remaining = cut.ties;
            for &i in &ids {
                let name = cx.plan.tensors[i].out.name.clone();
                cx.progress(&format!("sharing threshold ties: {name}"))?;
                cx.load_before(i, s)?;
                let equal = cx.b.work.iter().filter(|x| magnitude_key(**x) == cut.threshold).count() as u64;
                let mine = equal.min(remaining);
                remaining -= mine;
                cx.resolved.global_ties.insert((s, name), mine);
                cx.done(i);
            }
        }
        Ok(None)
    }
}

fn global_error(step: usize, e: impl std::fmt::Display) -> EngineError {
    EngineError::Tensor { tensor: format!("(step {step})"), code: "kernel_error", detail: e.to_string() }
}
