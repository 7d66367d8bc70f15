//! Plans: what a spec will do to each tensor, decided from the header alone.
//!
//! The engine executes exactly the plan, and `POST /v1/jobs` refuses a spec whose plan has
//! refusals, with the plan's words, so a shape problem is found before any work starts.

use serde::Serialize;

use super::quant::{Granularity, IntParams};
use super::spec::{CompressSpec, OutputFormat, QuantMethod, Step};
use crate::formats::safetensors::{Header, TensorInfo};

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub tensors: Vec<TensorPlan>,
    /// Non-empty means the spec cannot run on this model; each says where and why.
    pub refusals: Vec<Refusal>,
    pub outputs: Vec<OutputPlan>,
    pub totals: PlanTotals,
    /// Predicted peak working memory of the engine, in bytes (one tensor at a time).
    pub peak_memory_bytes: u64,
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
    /// Bits per weight of the tensor's compressed representation.
    pub bits_per_weight: f64,
    /// Bytes of that representation (codes, scales, zero points).
    pub bytes_out: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedAction {
    pub step: usize,
    pub op: &'static str,
    pub scheme: String,
    #[serde(skip)]
    pub kernel: Kernel,
}

/// The typed instruction the engine runs for one tensor and one step.
#[derive(Debug, Clone)]
pub enum Kernel {
    Int(IntParams),
}

#[derive(Debug, Clone, Serialize)]
pub struct Skip {
    pub step: usize,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    /// JSON pointer of the step (or output) that cannot apply.
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
    let search = match p.search {
        super::quant::ScaleSearch::None => "",
        super::quant::ScaleSearch::Mse => "/mse",
    };
    format!("int{}/{g}/{}{search}", p.bits, if p.symmetric { "sym" } else { "asym" })
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
    let per_block = t.dtype.size() as u64 + if p.symmetric { 0 } else { 1 };
    rows as u64 * words_per_row * 4 + blocks * per_block
}

/// Working memory per element of the largest tensor: original f32, working f32, codes, the
/// encoded output and the raw read buffer.
const BYTES_PER_ELEMENT_IN_FLIGHT: u64 = 4 + 4 + 1 + 4 + 4;
/// Fixed overhead of the process (runtime, buffers, SQLite) included in the prediction.
const BASE_MEMORY_BYTES: u64 = 64 << 20;

pub fn plan(spec: &CompressSpec, header: &Header) -> Plan {
    let mut tensors = Vec::with_capacity(header.tensors.len());
    let mut refusals = Vec::new();
    for t in &header.tensors {
        let mut tp = TensorPlan {
            name: t.name.clone(),
            dtype: t.dtype.as_str().to_owned(),
            shape: t.shape.clone(),
            bytes_in: t.bytes(),
            actions: Vec::new(),
            skipped: Vec::new(),
            bits_per_weight: (t.dtype.size() * 8) as f64,
            bytes_out: t.bytes(),
        };
        for (i, step) in spec.steps.iter().enumerate() {
            match step.selector().decide(t) {
                Err(Some(reason)) => tp.skipped.push(Skip { step: i, reason }),
                Err(None) => {}
                Ok(()) => match step {
                    Step::Quantize(q) => match &q.method {
                        QuantMethod::Int(p) => {
                            let (_, cols) = t.matrix();
                            if let Granularity::Group(g) = p.granularity {
                                if !cols.is_multiple_of(g) {
                                    refusals.push(Refusal {
                                        pointer: format!("/steps/{i}/group_size"),
                                        tensor: Some(t.name.clone()),
                                        detail: format!(
                                            "tensor `{}`: row length {cols} is not a multiple of group_size {g}; exclude it with `ignore` or pick a group size that divides it",
                                            t.name
                                        ),
                                    });
                                    continue;
                                }
                            }
                            tp.bytes_out = int_bytes(p, t);
                            tp.bits_per_weight = tp.bytes_out as f64 * 8.0 / t.numel() as f64;
                            tp.actions.push(PlannedAction {
                                step: i,
                                op: step.op(),
                                scheme: int_scheme_name(p),
                                kernel: Kernel::Int(*p),
                            });
                        }
                    },
                },
            }
        }
        tensors.push(tp);
    }
    let parameters = header.parameter_count();
    let bytes_in: u64 = tensors.iter().map(|t| t.bytes_in).sum();
    let bytes_out: u64 = tensors.iter().map(|t| t.bytes_out).sum();
    let outputs = spec
        .outputs
        .iter()
        .map(|f| OutputPlan {
            format: f.as_str(),
            artifact: artifact_name(*f).to_owned(),
            predicted_bytes: predict_output(*f, header),
        })
        .collect();
    let max_numel = header.tensors.iter().map(|t| t.numel() as u64).max().unwrap_or(0);
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
    }
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

fn predict_output(f: OutputFormat, header: &Header) -> u64 {
    match f {
        // Dense output: same tensors, same dtypes; the header grows by the provenance entries.
        OutputFormat::Safetensors => header.tensors.iter().map(|t| t.bytes()).sum::<u64>() + header.data_start + 512,
        _ => 0,
    }
}
