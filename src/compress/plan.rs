//! Plans: what a spec will do to each tensor, decided from the header alone.
//!
//! The engine executes exactly the plan, and `POST /v1/jobs` refuses a spec whose plan has
//! refusals, with the plan's words, so a shape problem is found before any work starts.

use serde::Serialize;

use super::ggml::GgufType;
use super::prune::Norm;
use super::quant::{Granularity, IntParams, ScaleSearch};
use super::spec::{CompressSpec, OutputFormat, PruneMethod, QuantMethod, Scheme, Step};
use crate::formats::safetensors::{Dtype, Header, TensorInfo};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub tensors: Vec<TensorPlan>,
    /// Non-empty means the spec cannot run on this model; each says where and why.
    pub refusals: Vec<Refusal>,
    pub outputs: Vec<OutputPlan>,
    pub totals: PlanTotals,
    /// Predicted peak working memory of the engine, in bytes (one tensor at a time).
    pub peak_memory_bytes: u64,
    /// Extra full reads of the targeted tensors before the main pass (global pruning, mixed
    /// precision measurement).
    pub prepasses: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct TensorPlan {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes_in: u64,
    /// Steps that change this tensor, in order.
    pub actions: Vec<PlannedAction>,
    /// Steps that could have touched it but will not, and why.
    pub skipped: Vec<Skip>,
    /// Predicted bits per weight of its compressed representation.
    pub bits_per_weight: f64,
    /// Predicted bytes of that representation (codes and scales; kept values and bitmask).
    pub bytes_out: u64,
    /// Predicted fraction of zeros after the steps.
    pub sparsity: f64,
    #[serde(skip)]
    pub(crate) index: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    pub step: usize,
    pub op: &'static str,
    /// e.g. `int4/group128/sym`, `q4_k`, `f16 (fallback)`, `magnitude/layer/0.50`, `2:4`.
    pub scheme: String,
    /// Why this scheme and not the one asked for (fallbacks), or what is decided at run time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    #[serde(skip)]
    pub kernel: Kernel,
}

/// The typed instruction the engine runs for one tensor and one step.
#[derive(Debug, Clone, PartialEq)]
pub enum Kernel {
    Int(IntParams),
    Ggml(GgufType),
    /// Mixed precision: the scheme is chosen by the engine's measurement pass.
    Auto {
        step: usize,
    },
    Magnitude {
        sparsity: f64,
    },
    /// One threshold over every tensor of the step, found by the engine's selection passes.
    GlobalMagnitude {
        step: usize,
    },
    NM {
        n: usize,
        m: usize,
    },
    Structured {
        norm: Norm,
        amount: f64,
    },
    /// Zero the bias entries of rows a structured step removes from `weight`.
    BiasOf {
        weight: String,
        step: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub step: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// JSON pointer of the step field that cannot apply.
    pub pointer: String,
    pub tensor: Option<String>,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct OutputPlan {
    pub format: &'static str,
    pub artifact: String,
    pub predicted_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlanTotals {
    pub tensors: usize,
    pub tensors_changed: usize,
    pub parameters: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Average over all parameters of the compressed representation.
    pub bits_per_weight: f64,
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

/// Scales are stored in the weight's float type (f32 for f64 weights).
pub fn scale_dtype(d: Dtype) -> Dtype {
    if matches!(d, Dtype::F16 | Dtype::BF16) {
        d
    } else {
        Dtype::F32
    }
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

/// Working memory per element of the largest tensor: original and working f32, scratch f32,
/// codes, and the encoded outputs.
const BYTES_PER_ELEMENT_IN_FLIGHT: u64 = 4 * 3 + 1 + 4 + 2;
/// Fixed overhead of the process (runtime, buffers, SQLite) included in the prediction.
const BASE_MEMORY_BYTES: u64 = 64 << 20;

struct Planner<'a> {
    header: &'a Header,
    tensors: Vec<TensorPlan>,
    refusals: Vec<Refusal>,
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

    fn step(&mut self, step_index: usize, step: &Step, spec: &CompressSpec) {
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

/// The dtype the sparse layout stores kept values in.
pub fn sparse_dtype(d: Dtype) -> safetensors::Dtype {
    match d {
        Dtype::F16 => safetensors::Dtype::F16,
        Dtype::BF16 => safetensors::Dtype::BF16,
        _ => safetensors::Dtype::F32,
    }
}

pub fn plan(spec: &CompressSpec, header: &Header) -> Plan {
    let tensors = header
        .tensors
        .iter()
        .enumerate()
        .map(|(index, t)| TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype.as_str().to_owned(),
            shape: t.shape.clone(),
            bytes_in: t.bytes(),
            actions: Vec::new(),
            skipped: Vec::new(),
            bits_per_weight: (t.dtype.size() * 8) as f64,
            bytes_out: t.bytes(),
            sparsity: 0.0,
            index,
        })
        .collect();
    let mut planner = Planner { header, tensors, refusals: Vec::new() };
    for (i, step) in spec.steps.iter().enumerate() {
        planner.step(i, step, spec);
    }
    let Planner { mut tensors, mut refusals, .. } = planner;
    check_budgets(spec, header, &tensors, &mut refusals);
    if let Some(i) = spec.outputs.iter().position(|f| *f == OutputFormat::Gguf) {
        for t in
            header.tensors.iter().filter(|t| t.dtype.is_float() && t.name.len() > crate::formats::gguf::MAX_NAME_BYTES)
        {
            refusals.push(Refusal {
                pointer: format!("/outputs/{i}"),
                tensor: Some(t.name.clone()),
                detail: format!(
                    "tensor `{}`: its name is {} bytes; GGUF readers (llama.cpp) accept at most {}",
                    t.name,
                    t.name.len(),
                    crate::formats::gguf::MAX_NAME_BYTES
                ),
            });
        }
    }

    // Biases that follow a structurally pruned weight are processed after every other tensor,
    // so the rows removed from their weight are known when they are written.
    tensors.sort_by_key(|t| (t.actions.iter().any(|a| matches!(a.kernel, Kernel::BiasOf { .. })), t.index));

    let parameters = header.parameter_count();
    let bytes_in: u64 = tensors.iter().map(|t| t.bytes_in).sum();
    let bytes_out: u64 = tensors.iter().map(|t| t.bytes_out).sum();
    let outputs = spec
        .outputs
        .iter()
        .map(|f| OutputPlan {
            format: f.as_str(),
            artifact: artifact_name(*f).to_owned(),
            predicted_bytes: predict_output(*f, header, &tensors),
        })
        .collect();
    let max_numel = header.tensors.iter().map(|t| t.numel() as u64).max().unwrap_or(0);
    let prepasses = spec
        .steps
        .iter()
        .map(|s| match s {
            Step::Prune(p) if matches!(p.method, PruneMethod::Magnitude { global: true, .. }) => 2,
            Step::Quantize(q) if matches!(q.method, QuantMethod::Auto { .. }) => 1,
            _ => 0,
        })
        .sum();
    Plan {
        totals: PlanTotals {
            tensors: tensors.len(),
            tensors_changed: tensors.iter().filter(|t| !t.actions.is_empty()).count(),
            parameters,
            bytes_in,
            bytes_out,
            bits_per_weight: if parameters > 0 { bytes_out as f64 * 8.0 / parameters as f64 } else { 0.0 },
        },
        tensors,
        refusals,
        outputs,
        peak_memory_bytes: BASE_MEMORY_BYTES + max_numel * BYTES_PER_ELEMENT_IN_FLIGHT,
        prepasses,
    }
}

/// A mixed-precision budget below what the cheapest candidates reach is refused up front.
fn check_budgets(spec: &CompressSpec, header: &Header, tensors: &[TensorPlan], refusals: &mut Vec<Refusal>) {
    for (i, step) in spec.steps.iter().enumerate() {
        let Step::Quantize(q) = step else { continue };
        let QuantMethod::Auto { target_bits, candidates } = &q.method else { continue };
        let (mut params, mut min_bits) = (0f64, 0f64);
        for (tp, t) in tensors.iter().zip(&header.tensors) {
            if !tp.actions.iter().any(|a| a.kernel == Kernel::Auto { step: i }) {
                continue;
            }
            let cheapest = candidates
                .iter()
                .filter(|c| scheme_refusal(c, t).is_none())
                .map(|c| scheme_bits(c, t))
                .fold(f64::INFINITY, f64::min);
            params += t.numel() as f64;
            min_bits += cheapest * t.numel() as f64;
        }
        if params > 0.0 && min_bits / params > *target_bits + 1e-9 {
            refusals.push(Refusal {
                pointer: format!("/steps/{i}/mixed/target_bits"),
                tensor: None,
                detail: format!(
                    "target_bits {target_bits} is below the {:.3} bits per weight the cheapest candidates reach on this model",
                    min_bits / params
                ),
            });
        }
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

/// The main artifact each output format produces.
pub fn artifact_name(f: OutputFormat) -> &'static str {
    match f {
        OutputFormat::Safetensors => "model.safetensors",
        OutputFormat::CompressedTensors => "compressed-tensors/model.safetensors",
        OutputFormat::Gguf => "model.gguf",
        OutputFormat::Sparse => "sparse/model.safetensors",
    }
}

fn predict_output(f: OutputFormat, header: &Header, tensors: &[TensorPlan]) -> u64 {
    let dense: u64 = header.tensors.iter().map(|t| t.bytes()).sum();
    // Headers are small next to the data; this allowance covers names, shapes and provenance.
    let header_allowance = header.data_start + 512 + 64 * header.tensors.len() as u64;
    let quantized = |tp: &TensorPlan, want: fn(&Kernel) -> bool| tp.actions.last().is_some_and(|a| want(&a.kernel));
    match f {
        OutputFormat::Safetensors => dense + header_allowance,
        OutputFormat::CompressedTensors => {
            tensors
                .iter()
                .map(|tp| {
                    if tp.shape.len() == 2 && quantized(tp, |k| matches!(k, Kernel::Int(_))) {
                        tp.bytes_out + 16
                    } else {
                        tp.bytes_in
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
        OutputFormat::Gguf => {
            tensors
                .iter()
                .map(|tp| {
                    if quantized(tp, |k| matches!(k, Kernel::Ggml(_) | Kernel::Auto { .. })) {
                        tp.bytes_out
                    } else {
                        tp.bytes_in
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
        OutputFormat::Sparse => {
            tensors
                .iter()
                .zip(tensors.iter().map(|tp| &header.tensors[tp.index]))
                .map(|(tp, t)| {
                    if tp.actions.iter().any(|a| a.op == "prune") && t.shape.len() == 2 {
                        let nnz = ((1.0 - tp.sparsity) * t.numel() as f64).round() as u64;
                        crate::formats::sparse::predicted_bytes(&t.shape, nnz, sparse_dtype(t.dtype))
                            .unwrap_or(tp.bytes_in)
                    } else {
                        tp.bytes_in
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
    }
}
