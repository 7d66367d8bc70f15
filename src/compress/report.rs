//! The per-tensor ledger written as `report.json` at the end of every job.

use serde::{Deserialize, Serialize};

use super::metrics::ErrorMetrics;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub engine: String,
    pub input_sha256: String,
    pub spec_sha256: String,
    pub tensors: Vec<TensorReport>,
    pub totals: Totals,
    pub steps: Vec<StepTiming>,
    /// Decisions of automatic mixed-precision steps.
    pub mixed: Vec<MixedDecision>,
    pub outputs: Vec<OutputSummary>,
    /// Every model artifact read back, decoded and compared bit for bit with the dense values.
    pub checks: Vec<super::engine::OutputCheck>,
    /// What each structural step (shrink, factorize, structured pruning with a graph) did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub structure: Vec<crate::compress::ops::structural::StructureRecord>,
    /// With `evaluate`: the original and the compressed model run on the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub evaluation: Option<crate::graph::eval::Evaluation>,
    /// With `evaluate` on a language model: perplexity before and after, KL, top-1 agreement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text_evaluation: Option<crate::compress::engine::text_eval::TextEvaluation>,
    /// With `evaluate` on an encoder (BERT): embedding cosine and nearest-neighbour agreement.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding_evaluation: Option<crate::compress::engine::embed_eval::EmbeddingEvaluation>,
    pub duration_ms: f64,
    /// Peak resident memory of the process while the job ran (VmHWM), when the OS reports it.
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorReport {
    pub name: String,
    pub shape_in: Vec<usize>,
    pub shape_out: Vec<usize>,
    pub dtype_in: String,
    pub dtype_out: String,
    /// What the tensor became, e.g. `int8/channel/sym`, or `unchanged`.
    pub scheme: String,
    pub bytes_in: u64,
    /// Bytes of its compressed representation (packed codes + scales for quantized tensors).
    pub bytes_out: u64,
    pub bits_per_weight: f64,
    pub parameters: u64,
    pub nonzeros: u64,
    /// Achieved fraction of exact zeros.
    pub sparsity: f64,
    /// What a per-tensor pruning step asked for (layer magnitude, N:M).
    pub requested_sparsity: Option<f64>,
    /// Reconstruction error of the final values against the input; absent when unchanged.
    pub error: Option<ErrorMetrics>,
    /// With `search: mse`: the relative error plain round-to-nearest would have had.
    pub rtn_relative_error: Option<f64>,
    pub milliseconds: f64,
    /// Why a step skipped this tensor, or how it fell back.
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Totals {
    pub tensors: usize,
    pub tensors_changed: usize,
    pub parameters: u64,
    pub nonzeros: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// bytes_in / bytes_out.
    pub ratio: f64,
    pub bits_per_weight: f64,
}

/// What a mixed-precision step decided, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixedDecision {
    pub step: usize,
    pub target_bits: f64,
    /// Parameter-weighted average bits per weight of the chosen schemes (<= target).
    pub achieved_bits: f64,
    /// True when the allocation is proven optimal.
    pub exact: bool,
    pub choices: Vec<MixedChoice>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MixedChoice {
    pub tensor: String,
    pub scheme: String,
    pub bits_per_weight: f64,
    /// Squared error of each candidate measured on this tensor, by scheme name.
    pub measured: Vec<(String, f64)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: usize,
    pub op: String,
    pub milliseconds: f64,
    pub tensors: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputSummary {
    pub format: String,
    pub artifact: String,
    pub bytes: u64,
}

impl Totals {
    pub fn from_tensors(tensors: &[TensorReport]) -> Totals {
        let mut t = Totals { tensors: tensors.len(), ..Totals::default() };
        for r in tensors {
            t.parameters += r.parameters;
            t.nonzeros += r.nonzeros;
            t.bytes_in += r.bytes_in;
            t.bytes_out += r.bytes_out;
            t.tensors_changed += usize::from(r.scheme != "unchanged");
        }
        t.ratio = if t.bytes_out > 0 { t.bytes_in as f64 / t.bytes_out as f64 } else { 0.0 };
        t.bits_per_weight = if t.parameters > 0 { t.bytes_out as f64 * 8.0 / t.parameters as f64 } else { 0.0 };
        t
    }
}

/// Peak resident set of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
