//! The `quantize` step: integer round-to-nearest (the compressed-tensors layouts), GGUF block
//! types, per-tensor rules and automatic mixed precision under a bit budget.

pub(crate) mod parse;

use super::{OpKind, Scope, StepOp};
use crate::compress::engine::{EngineError, PassCx};
use crate::compress::layout::compressed_tensors::scale_dtype;
use crate::compress::mixed::{self, Candidate, TensorOptions};
use crate::compress::plan::planner::Planner;
use crate::compress::plan::{Kernel, PlannedAction, Refusal, Skip};
use crate::compress::quant::{Granularity, IntParams, ScaleSearch};
use crate::compress::report::{MixedChoice, MixedDecision};
use crate::compress::select::Selector;
use crate::formats::gguf::GgufType;
use crate::formats::safetensors::{Dtype, TensorInfo};
pub use parse::DEFAULT_GROUP_SIZE;

mod mix;
pub use mix::GgufMix;

#[derive(Debug, Clone)]
pub struct QuantizeStep {
    pub select: Selector,
    pub method: QuantMethod,
}

/// One way to store a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// Integer round-to-nearest (the compressed-tensors layouts).
    Int(IntParams),
    /// A GGUF block type through candle's kernels; `fallback` decides for rows the block does
    /// not divide.
    Ggml { ty: GgufType, fallback: Fallback },
}

/// What a GGUF type does with a tensor whose rows its block does not divide (rows of 576,
/// 2880 or 4544 values under a 256-value k-quant; conv kernels' rows of 9 or 27).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// llama.cpp's table (the default): see [`llama_cpp_fallback`].
    LlamaCpp,
    /// The plan refuses the tensor, naming it.
    Refuse,
    /// This type instead (refused in turn if its block does not divide the rows either).
    To(GgufType),
}

/// The type llama-quantize stores a tensor as when `ty`'s block does not divide its rows, as
/// `tensor_type_fallback` in llama.cpp's `src/llama-quant.cpp` decides (the copy bundled with
/// llama-cpp-python 0.3.36): Q2_K and Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
/// and F16 when that does not fit either (32-value block types go to F16 at once).
pub fn llama_cpp_fallback(ty: GgufType, shape: &[usize]) -> GgufType {
    let first = match ty {
        GgufType::Q2K | GgufType::Q3K => GgufType::Q4_0,
        GgufType::Q4K => GgufType::Q5_0,
        GgufType::Q5K => GgufType::Q5_1,
        GgufType::Q6K => GgufType::Q8_0,
        other => other,
    };
    if first.shape_refusal(shape).is_none() {
        first
    } else {
        GgufType::F16
    }
}

#[derive(Debug, Clone)]
pub enum QuantMethod {
    /// One scheme for every targeted tensor.
    Fixed(Scheme),
    /// First matching glob wins; unmatched targeted tensors are left alone (reported).
    Rules(Vec<(glob::Pattern, Scheme)>),
    /// Per-tensor choice among candidates minimising total error with average bits per weight
    /// (over the targeted tensors) <= `target_bits`, from errors measured on the weights.
    Auto { target_bits: f64, candidates: Vec<Scheme> },
    /// llama-quantize's per-tensor choices for a named mix (`gguf_mix`), by role and layer.
    Mix(GgufMix),
}

/// Scheme label used in plans and reports, e.g. `int4/group128/asym`.
pub fn int_scheme_name(p: &IntParams) -> String {
    let g = match p.granularity {
        Granularity::Tensor => "tensor".to_string(),
        Granularity::Channel => "channel".to_string(),
        Granularity::Group(g) => format!("group{g}"),
    };
    let search = if p.search == ScaleSearch::Mse { "/mse" } else { "" };
    format!("int{}/{g}/{}{search}", p.bits, if p.symmetric { "sym" } else { "asym" })
}

pub fn scheme_name(s: &Scheme) -> String {
    match s {
        Scheme::Int(p) => int_scheme_name(p),
        Scheme::Ggml { ty, .. } => ty.name().to_owned(),
    }
}

/// Bytes of an int-quantized tensor: packed codes plus one scale (and zero point) per block,
/// the scale stored in the tensor's own float dtype as compressed-tensors does.
pub fn int_bytes(p: &IntParams, t: &TensorInfo) -> u64 {
    let (rows, cols) = t.matrix();
    let blocks = match p.granularity {
        Granularity::Tensor => 1,
        Granularity::Channel => rows,
        Granularity::Group(g) => rows * cols.div_ceil(g),
    } as u64;
    let words_per_row = (cols * p.bits as usize).div_ceil(32) as u64;
    let per_block = scale_dtype(t.dtype).size() as u64 + if p.symmetric { 0 } else { 1 };
    rows as u64 * words_per_row * 4 + blocks * per_block
}

fn ggml_bytes(ty: GgufType, t: &TensorInfo) -> u64 {
    ty.encoded_len(t.numel()) as u64
}

/// Why a scheme cannot store `t`, if it cannot.
pub fn scheme_refusal(s: &Scheme, t: &TensorInfo) -> Option<String> {
    let (_, cols) = t.matrix();
    match s {
        Scheme::Int(p) => match p.granularity {
            Granularity::Group(g) if !cols.is_multiple_of(g) => {
                Some(format!("row length {cols} is not a multiple of group_size {g}"))
            }
            _ => None,
        },
        // ggml blocks run along the last dimension, whatever the flattened row length.
        Scheme::Ggml { ty, .. } => ty.shape_refusal(&t.shape),
    }
}

/// Bits per weight a scheme costs on tensor `t`, scales included.
pub fn scheme_bits(s: &Scheme, t: &TensorInfo) -> f64 {
    let bytes = match s {
        Scheme::Int(p) => int_bytes(p, t),
        Scheme::Ggml { ty, .. } => ggml_bytes(*ty, t),
    };
    bytes as f64 * 8.0 / t.numel().max(1) as f64
}

/// Adds a quantize action for `scheme` to tensor `i`, applying its fallback when the shape
/// forbids it, or a refusal naming the field to change.
fn plan_scheme(cx: &mut Planner<'_>, i: usize, step: usize, pointer: &str, scheme: &Scheme) {
    let t = cx.tensors[i].out.clone();
    let (kernel, label, bytes, note) = match scheme {
        Scheme::Int(p) => match scheme_refusal(scheme, &t) {
            Some(reason) => {
                let detail = format!("{reason}; exclude it with `ignore` or pick a group size that divides it");
                return cx.refuse(format!("{pointer}/group_size"), &t, detail);
            }
            None => (Kernel::Int(*p), int_scheme_name(p), int_bytes(p, &t), None),
        },
        // No type stores a scalar or a rank above 4: no fallback helps, only `ignore`.
        Scheme::Ggml { ty, .. } if t.shape.is_empty() || t.shape.len() > 4 => {
            let reason = ty.shape_refusal(&t.shape).unwrap_or_default();
            return cx.refuse(format!("{pointer}/gguf_type"), &t, format!("{reason}; exclude it with `ignore`"));
        }
        Scheme::Ggml { ty, fallback } => match (ty.shape_refusal(&t.shape), fallback) {
            (None, _) => (Kernel::Ggml(*ty), ty.name().to_owned(), ggml_bytes(*ty, &t), None),
            (Some(reason), Fallback::Refuse) => {
                let detail = format!("{reason}; set `\"fallback\": \"llama.cpp\"` (llama-quantize's choice), `\"f16\"` or another type, or exclude it with `ignore`");
                return cx.refuse(format!("{pointer}/gguf_type"), &t, detail);
            }
            (Some(reason), chosen) => {
                let (fb, whose) = match chosen {
                    Fallback::To(fb) => (*fb, ""),
                    _ => (llama_cpp_fallback(*ty, &t.shape), ", llama.cpp's choice"),
                };
                if let Some(again) = fb.shape_refusal(&t.shape) {
                    return cx.refuse(
                        format!("{pointer}/fallback"),
                        &t,
                        format!("{reason}, and the fallback: {again}"),
                    );
                }
                let why = format!("{reason}: fallback {}{whose}", fb.name());
                if fb == GgufType::F32 && t.dtype == Dtype::F32 {
                    cx.tensors[i].skipped.push(Skip { step, reason: why + " (unchanged)" });
                    return;
                }
                (Kernel::Ggml(fb), format!("{} (fallback)", fb.name()), ggml_bytes(fb, &t), Some(why))
            }
        },
    };
    let tp = &mut cx.tensors[i];
    tp.bytes_out = bytes;
    tp.bits_per_weight = bytes as f64 * 8.0 / t.numel().max(1) as f64;
    tp.actions.push(PlannedAction { step, op: OpKind::Quantize, scheme: label, note, kernel });
}

impl StepOp for QuantizeStep {
    fn kind(&self) -> OpKind {
        OpKind::Quantize
    }

    fn scope(&self) -> Scope {
        match self.method {
            QuantMethod::Fixed(_) | QuantMethod::Rules(_) | QuantMethod::Mix(_) => Scope::Tensor,
            QuantMethod::Auto { .. } => Scope::CrossTensor,
        }
    }

    fn selector(&self) -> &Selector {
        &self.select
    }

    fn plan_tensor(&self, cx: &mut Planner<'_>, step: usize, i: usize) {
        let pointer = format!("/steps/{step}");
        match &self.method {
            // Planned in `plan_finish`, once the layer count is known.
            QuantMethod::Mix(_) if cx.tensors[i].out.shape.len() < 2 => {
                let reason = "not a matrix: llama.cpp keeps 1-D tensors in F32".into();
                cx.tensors[i].skipped.push(Skip { step, reason });
            }
            QuantMethod::Mix(_) => {}
            QuantMethod::Fixed(s) => plan_scheme(cx, i, step, &pointer, s),
            QuantMethod::Rules(rules) => {
                let name = cx.tensors[i].out.name.clone();
                match rules.iter().enumerate().find(|(_, (p, _))| p.matches(&name)) {
                    Some((r, (_, s))) => plan_scheme(cx, i, step, &format!("{pointer}/rules/{r}"), s),
                    None => cx.tensors[i].skipped.push(Skip { step, reason: "no rule matches".into() }),
                }
            }
            QuantMethod::Auto { target_bits, candidates } => {
                let t = cx.tensors[i].out.clone();
                let fits: Vec<&Scheme> = candidates.iter().filter(|c| scheme_refusal(c, &t).is_none()).collect();
                if fits.is_empty() {
                    let detail = "no candidate scheme fits its shape".to_string();
                    return cx.refuse(format!("{pointer}/mixed/candidates"), &t, detail);
                }
                let tp = &mut cx.tensors[i];
                tp.bits_per_weight = *target_bits;
                tp.bytes_out = (target_bits * t.numel() as f64 / 8.0) as u64;
                let names: Vec<String> = fits.iter().map(|c| scheme_name(c)).collect();
                tp.actions.push(PlannedAction {
                    step,
                    op: OpKind::Quantize,
                    scheme: "auto".into(),
                    note: Some(format!("one of {} chosen from measured error", names.join(", "))),
                    kernel: Kernel::Auto { step },
                });
            }
        }
    }

    /// A named mix: each selected matrix gets llama-quantize's type for its role and layer,
    /// with llama.cpp's shape fallback.
    fn plan_finish(&self, cx: &mut Planner<'_>, step: usize) {
        let QuantMethod::Mix(mix) = self.method else { return };
        let layers = cx
            .tensors
            .iter()
            .filter_map(|tp| tp.out.name.strip_prefix("model.layers.")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .map_or(0, |l| l + 1);
        let tied = !cx.tensors.iter().any(|tp| tp.out.name == "lm_head.weight");
        // llama.cpp's 70B class: 80 layers and grouped-query attention (Llama 2/3 70B: K has
        // fewer rows than Q), or Qwen2 (whose attention has biases) with 80 layers.
        let rows = |n: &str| cx.tensors.iter().find(|tp| tp.out.name == n).and_then(|tp| tp.out.shape.first().copied());
        let gqa = rows("model.layers.0.self_attn.q_proj.weight") != rows("model.layers.0.self_attn.k_proj.weight");
        let qwen2 = cx.tensors.iter().any(|tp| tp.out.name.ends_with(".self_attn.q_proj.bias"));
        let seventy_b = layers == 80 && (gqa || qwen2);
        let pointer = format!("/steps/{step}/gguf_mix");
        for i in 0..cx.tensors.len() {
            let t = &cx.tensors[i].out;
            if t.shape.len() < 2 || self.select.decide(t).is_err() {
                continue;
            }
            let ty = mix.type_for(&t.name, t.shape[t.shape.len() - 1], layers, tied, seventy_b);
            plan_scheme(cx, i, step, &pointer, &Scheme::Ggml { ty, fallback: Fallback::LlamaCpp });
        }
    }

    /// A mixed-precision budget below what the cheapest candidates reach is refused up front.
    fn check(&self, cx: &mut Planner<'_>, step: usize) {
        let QuantMethod::Auto { target_bits, candidates } = &self.method else { return };
        let (mut params, mut min_bits) = (0f64, 0f64);
        for tp in cx.tensors.iter().filter(|tp| tp.actions.iter().any(|a| a.kernel == Kernel::Auto { step })) {
            let cheapest = candidates
                .iter()
                .filter(|c| scheme_refusal(c, &tp.out).is_none())
                .map(|c| scheme_bits(c, &tp.out))
                .fold(f64::INFINITY, f64::min);
            params += tp.out.numel() as f64;
            min_bits += cheapest * tp.out.numel() as f64;
        }
        if params > 0.0 && min_bits / params > *target_bits + 1e-9 {
            cx.refusals.push(Refusal {
                pointer: format!("/steps/{step}/mixed/target_bits"),
                tensor: None,
                detail: format!(
                    "target_bits {target_bits} is below the {:.3} bits per weight the cheapest candidates reach on this model",
                    min_bits / params
                ),
            });
        }
    }

    fn prepasses(&self) -> usize {
        usize::from(matches!(self.method, QuantMethod::Auto { .. }))
    }

    /// Measures every candidate's squared error on every tensor of the step, then allocates
    /// schemes under the budget ([`mixed::allocate`]).
    fn prepass(&self, cx: &mut PassCx<'_, '_>, s: usize) -> Result<Option<MixedDecision>, EngineError> {
        let QuantMethod::Auto { target_bits, candidates } = &self.method else { return Ok(None) };
        let ids = cx.members(|k| *k == Kernel::Auto { step: s });
        let mut options = Vec::with_capacity(ids.len());
        let mut fitting: Vec<Vec<Scheme>> = Vec::with_capacity(ids.len());
        let mut measured_all = Vec::with_capacity(ids.len());
        let mut probe = crate::compress::engine::Buffers::default();
        for &i in &ids {
            let t = cx.plan.tensors[i].out.clone();
            cx.progress(&format!("measuring candidate schemes: {}", t.name))?;
            cx.load_before(i, s)?;
            let fits: Vec<Scheme> = candidates.iter().copied().filter(|c| scheme_refusal(c, &t).is_none()).collect();
            let mut cands = Vec::with_capacity(fits.len());
            let mut measured = Vec::with_capacity(fits.len());
            for c in &fits {
                crate::compress::engine::par_copy(&mut probe.work, &cx.b.work);
                let ctl = cx.control();
                crate::compress::engine::quantize(&t, c, &mut probe, &|| ctl.canceled())?;
                let error = crate::compress::metrics::error_sums(&cx.b.work, &probe.work).squared_error();
                cands.push(Candidate { bits_per_weight: scheme_bits(c, &t), error });
                measured.push((scheme_name(c), error));
            }
            options.push(TensorOptions { name: t.name.clone(), params: t.numel() as u64, candidates: cands });
            fitting.push(fits);
            measured_all.push(measured);
            cx.done(i);
        }
        let alloc = mixed::allocate(&options, *target_bits).map_err(|e| EngineError::Tensor {
            tensor: format!("(step {s})"),
            code: "budget_unreachable",
            detail: e.to_string(),
        })?;
        let mut choices = Vec::with_capacity(ids.len());
        for (k, &i) in ids.iter().enumerate() {
            let scheme = fitting[k][alloc.choices[k]];
            let name = cx.plan.tensors[i].out.name.clone();
            choices.push(MixedChoice {
                tensor: name.clone(),
                scheme: scheme_name(&scheme),
                bits_per_weight: options[k].candidates[alloc.choices[k]].bits_per_weight,
                measured: std::mem::take(&mut measured_all[k]),
            });
            cx.resolved.auto.insert((s, name), scheme);
        }
        Ok(Some(MixedDecision {
            step: s,
            target_bits: *target_bits,
            achieved_bits: alloc.average_bits,
            exact: alloc.exact,
            choices,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_fallback_is_llama_cpps_table() {
        // llama.cpp src/llama-quant.cpp `tensor_type_fallback`, as bundled in llama-cpp-python 0.3.36.
        let row_576 = [8, 576];
        for (ty, want) in [
            (GgufType::Q2K, GgufType::Q4_0),
            (GgufType::Q3K, GgufType::Q4_0),
            (GgufType::Q4K, GgufType::Q5_0),
            (GgufType::Q5K, GgufType::Q5_1),
            (GgufType::Q6K, GgufType::Q8_0),
        ] {
            assert_eq!(llama_cpp_fallback(ty, &row_576), want, "{ty}");
            // Rows no 32-value block divides either go to F16.
            assert_eq!(llama_cpp_fallback(ty, &[4, 3, 3, 3]), GgufType::F16, "{ty}");
        }
        assert_eq!(llama_cpp_fallback(GgufType::Q8_0, &[4, 27]), GgufType::F16);
    }

    #[test]
    fn a_rank_no_gguf_type_holds_is_refused_at_gguf_type_whatever_the_fallback() {
        use crate::compress::plan::{prepare, PlanInputs};
        use crate::formats::safetensors::{Dtype, Header, TensorInfo};
        let t = |name: &str, shape: Vec<usize>, start: u64| {
            let n: usize = shape.iter().product();
            TensorInfo { name: name.into(), dtype: Dtype::F32, shape, start, end: start + 4 * n as u64 }
        };
        let conv3d = t("patch.weight", vec![2, 3, 2, 2, 2], 8);
        let header = Header { tensors: vec![conv3d], metadata: Default::default(), data_start: 8 };
        for fallback in [None, Some("f16")] {
            let mut step = serde_json::json!({"op": "quantize", "gguf_type": "q4_k"});
            if let Some(f) = fallback {
                step["fallback"] = f.into();
            }
            let spec = crate::compress::spec::parse_compress(&serde_json::json!([step]), None).unwrap();
            let plan = prepare(spec, PlanInputs::model(header.clone()));
            assert_eq!(plan.refusals.len(), 1, "{fallback:?}");
            assert_eq!(plan.refusals[0].pointer, "/steps/0/gguf_type");
            assert!(plan.refusals[0].detail.contains("rank 5") && plan.refusals[0].detail.contains("ignore"));
        }
    }
}
