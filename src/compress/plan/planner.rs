//! The per-step, per-tensor decisions of a plan.

use super::*;

pub(super) struct Planner<'a> {
    pub(super) header: &'a Header,
    pub(super) tensors: Vec<TensorPlan>,
    pub(super) refusals: Vec<Refusal>,
}

impl Planner<'_> {
    fn refuse(&mut self, pointer: String, t: &TensorInfo, detail: String) {
        self.refusals.push(Refusal {
            pointer,
            tensor: Some(t.name.clone()),
            detail: format!("tensor `{}`: {detail}", t.name),
        });
    }

    /// Adds a quantize action for `scheme`, applying its fallback when the shape forbids it.
    fn quantize(
        &mut self,
        i: usize,
        step: usize,
        pointer: &str,
        t: &TensorInfo,
        scheme: &Scheme,
        note: Option<String>,
    ) {
        let (kernel, label, bytes, note) = match scheme {
            Scheme::Int(p) => match scheme_refusal(scheme, t) {
                Some(reason) => {
                    let detail = format!("{reason}; exclude it with `ignore` or pick a group size that divides it");
                    return self.refuse(format!("{pointer}/group_size"), t, detail);
                }
                None => (Kernel::Int(*p), int_scheme_name(p), int_bytes(p, t), note),
            },
            Scheme::Ggml { ty, fallback } => match (ty.shape_refusal(&t.shape), fallback) {
                (None, _) => (Kernel::Ggml(*ty), ty.name().to_owned(), ggml_bytes(*ty, t), note),
                (Some(reason), None) => {
                    let detail =
                        format!("{reason}; set `\"fallback\": \"f16\"` (or another type) or exclude it with `ignore`");
                    return self.refuse(format!("{pointer}/gguf_type"), t, detail);
                }
                (Some(reason), Some(fb)) => {
                    if let Some(again) = fb.shape_refusal(&t.shape) {
                        return self.refuse(
                            format!("{pointer}/fallback"),
                            t,
                            format!("{reason}, and the fallback: {again}"),
                        );
                    }
                    let why = format!("{reason}: fallback {}", fb.name());
                    if *fb == GgufType::F32 && t.dtype == Dtype::F32 {
                        self.tensors[i].skipped.push(Skip { step, reason: why + " (unchanged)" });
                        return;
                    }
                    (Kernel::Ggml(*fb), format!("{} (fallback)", fb.name()), ggml_bytes(*fb, t), Some(why))
                }
            },
        };
        let tp = &mut self.tensors[i];
        tp.bytes_out = bytes;
        tp.bits_per_weight = bytes as f64 * 8.0 / t.numel().max(1) as f64;
        tp.actions.push(PlannedAction { step, op: "quantize", scheme: label, note, kernel });
    }

    pub(super) fn step(&mut self, step_index: usize, step: &Step, spec: &CompressSpec) {
        let pointer = format!("/steps/{step_index}");
        for i in 0..self.header.tensors.len() {
            let t = &self.header.tensors[i];
            match step.selector().decide(t) {
                Err(Some(reason)) => self.tensors[i].skipped.push(Skip { step: step_index, reason }),
                Err(None) => {}
                Ok(()) => match step {
                    Step::Quantize(q) => match &q.method {
                        QuantMethod::Fixed(s) => self.quantize(i, step_index, &pointer, t, s, None),
                        QuantMethod::Rules(rules) => {
                            match rules.iter().enumerate().find(|(_, (p, _))| p.matches(&t.name)) {
                                Some((r, (_, s))) => {
                                    self.quantize(i, step_index, &format!("{pointer}/rules/{r}"), t, s, None)
                                }
                                None => self.tensors[i]
                                    .skipped
                                    .push(Skip { step: step_index, reason: "no rule matches".into() }),
                            }
                        }
                        QuantMethod::Auto { target_bits, candidates } => {
                            let fits: Vec<&Scheme> =
                                candidates.iter().filter(|c| scheme_refusal(c, t).is_none()).collect();
                            if fits.is_empty() {
                                let detail = "no candidate scheme fits its shape".to_string();
                                self.refuse(format!("{pointer}/mixed/candidates"), t, detail);
                                continue;
                            }
                            let tp = &mut self.tensors[i];
                            tp.bits_per_weight = *target_bits;
                            tp.bytes_out = (target_bits * t.numel() as f64 / 8.0) as u64;
                            let names: Vec<String> = fits.iter().map(|c| scheme_name(c)).collect();
                            tp.actions.push(PlannedAction {
                                step: step_index,
                                op: "quantize",
                                scheme: "auto".into(),
                                note: Some(format!("one of {} chosen from measured error", names.join(", "))),
                                kernel: Kernel::Auto { step: step_index },
                            });
                        }
                    },
                    Step::Prune(p) => self.prune(i, step_index, &pointer, t, &p.method, spec),
                },
            }
        }
        if let Step::Prune(p) = step {
            if let PruneMethod::Structured { .. } = p.method {
                self.bias_actions(step_index);
            }
        }
    }

    fn prune(&mut self, i: usize, step: usize, pointer: &str, t: &TensorInfo, m: &PruneMethod, spec: &CompressSpec) {
        let (_, cols) = t.matrix();
        let (kernel, label, sparsity) = match *m {
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
                        self.tensors[i].skipped.push(Skip { step, reason });
                    } else {
                        let detail = format!("{reason}; exclude it with `ignore` or set `\"on_mismatch\": \"skip\"`");
                        self.refuse(format!("{pointer}/m"), t, detail);
                    }
                    return;
                }
                (Kernel::NM { n, m }, format!("{n}:{m}"), 1.0 - n as f64 / m as f64)
            }
            PruneMethod::Structured { norm, amount } => {
                let rows = t.matrix().0;
                let removed = (amount * rows as f64).round() / rows.max(1) as f64;
                (
                    Kernel::Structured { norm, amount },
                    format!("structured/{norm:?}/{amount:.2}").to_lowercase(),
                    removed,
                )
            }
        };
        let tp = &mut self.tensors[i];
        // Pruning composes with earlier steps: zeros only grow.
        tp.sparsity = 1.0 - (1.0 - tp.sparsity) * (1.0 - sparsity);
        if tp.actions.iter().all(|a| matches!(a.op, "prune"))
            && spec.outputs.contains(&OutputFormat::Sparse)
            && t.shape.len() == 2
        {
            let nnz = ((1.0 - tp.sparsity) * t.numel() as f64).round() as u64;
            tp.bytes_out =
                crate::formats::sparse::predicted_bytes(&t.shape, nnz, sparse_dtype(t.dtype)).unwrap_or(tp.bytes_in);
            tp.bits_per_weight = tp.bytes_out as f64 * 8.0 / t.numel().max(1) as f64;
        }
        tp.actions.push(PlannedAction { step, op: "prune", scheme: label, note: None, kernel });
    }

    /// For each weight a structured step prunes, the bias of the same layer loses the same rows.
    fn bias_actions(&mut self, step: usize) {
        let pruned: Vec<String> = self
            .tensors
            .iter()
            .filter(|t| t.actions.iter().any(|a| a.step == step && matches!(a.kernel, Kernel::Structured { .. })))
            .map(|t| t.name.clone())
            .collect();
        for weight in pruned {
            let Some(layer) = weight.strip_suffix(".weight") else { continue };
            let bias = format!("{layer}.bias");
            let rows = self.header.tensors.iter().find(|t| t.name == weight).map(|t| t.matrix().0);
            if let Some(tp) = self.tensors.iter_mut().find(|t| t.name == bias) {
                let float = self.header.tensors[tp.index].dtype.is_float();
                if float && tp.shape.first().copied() == rows && tp.shape.len() == 1 {
                    tp.actions.push(PlannedAction {
                        step,
                        op: "prune",
                        scheme: "bias of pruned rows".into(),
                        note: Some(format!("entries of rows removed from `{weight}`")),
                        kernel: Kernel::BiasOf { weight: weight.clone(), step },
                    });
                }
            }
        }
    }
}
