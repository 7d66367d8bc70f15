//! Evaluation: what a compression did to a model's answers, measured on the user's data.
//!
//! The original and the compressed network run on the same batches; outputs are read as logits
//! along their last dimension (one prediction per row: `[N, K]` gives N rows, `[N, T, K]` gives
//! N x T). With labels: accuracy and cross-entropy `-log softmax(y)[label]` (mean over rows), for
//! both. Always: top-1 agreement of the compressed model with the original, mean KL(original ||
//! compressed) of their softmax distributions (natural log, mean over prediction rows: for
//! `[N, K]` outputs `torch.nn.functional.kl_div(log q, p, reduction="batchmean")`; for `[N, T, K]`
//! that divided by T), and the relative error
//! `||y_c - y_o||_2 / ||y_o||_2` of the raw outputs. Sums are accumulated in f64.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::forward::{ForwardError, Network};
use crate::formats::safetensors::{decode_f32, Dtype, Header, TensorInfo, TensorReader};

/// Default batch size of an evaluation (the forward pass holds a few batches of activations).
pub const DEFAULT_BATCH_SIZE: usize = 256;

/// Which tensors of a dataset file to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalOptions {
    /// Tensor with the inputs, `[N, ...input shape]` (default `inputs`).
    #[serde(default = "default_inputs")]
    pub inputs: String,
    /// Integer class labels, one per output row (default `labels`, used when present).
    #[serde(default)]
    pub labels: Option<String>,
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Evaluate on the first `limit` samples only.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Language models (a folder with config.json and tokenizer.json, no graph): the dataset
    /// tensor holding UTF-8 text (U8; default `text`).
    #[serde(default)]
    pub text: Option<String>,
    /// Language models: the token budget (default 256).
    #[serde(default)]
    pub tokens: Option<usize>,
    /// Language models: tokens per chunk (default 128).
    #[serde(default)]
    pub context: Option<usize>,
}

fn default_inputs() -> String {
    "inputs".into()
}

fn default_batch() -> usize {
    DEFAULT_BATCH_SIZE
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            inputs: default_inputs(),
            labels: None,
            batch_size: DEFAULT_BATCH_SIZE,
            limit: None,
            text: None,
            tokens: None,
            context: None,
        }
    }
}

/// Accuracy and loss of one model; `None` without labels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub accuracy: Option<f64>,
    pub loss: Option<f64>,
}

/// The evaluation block of a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Samples evaluated.
    pub samples: usize,
    /// Prediction rows (samples x positions).
    pub rows: usize,
    pub batch_size: usize,
    pub inputs: String,
    pub labels: Option<String>,
    pub before: Quality,
    pub after: Quality,
    /// Fraction of rows where both models give the same top-1 class.
    pub top1_agreement: f64,
    /// Mean KL(original || compressed) of the output distributions, in nats.
    pub kl_mean: f64,
    /// `||y_compressed - y_original|| / ||y_original||` over every output value.
    pub output_relative_error: f64,
    pub milliseconds: f64,
}

/// A dataset's tensors, resolved against a graph's input shape.
#[derive(Debug, Clone)]
pub struct DatasetPlan {
    pub inputs: TensorInfo,
    pub labels: Option<TensorInfo>,
    /// Samples to evaluate (after `limit`).
    pub samples: usize,
}

fn int_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 | Dtype::U8 | Dtype::U16 | Dtype::U32 | Dtype::U64)
}

/// Checks a dataset against the graph's input and output shapes; errors name both shapes and
/// are phrased for the `evaluate` field of a spec.
pub fn plan_dataset(
    header: &Header,
    options: &EvalOptions,
    input_shape: &[usize],
    output_shape: &[usize],
) -> Result<DatasetPlan, String> {
    let inputs = header.get(&options.inputs).ok_or_else(|| {
        let names: Vec<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
        format!("the dataset has no tensor `{}` (it has: {})", options.inputs, names.join(", "))
    })?;
    if !(inputs.dtype.is_float() || int_dtype(inputs.dtype)) {
        return Err(format!("dataset tensor `{}` is {}, not a number type", inputs.name, inputs.dtype.as_str()));
    }
    if inputs.shape.get(1..) != Some(input_shape) {
        return Err(format!(
            "dataset tensor `{}` has shape {:?}; the graph's input is {:?} per sample, so it must be [N, {}]",
            inputs.name,
            inputs.shape,
            input_shape,
            input_shape.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
        ));
    }
    let n = inputs.shape[0];
    let samples = options.limit.map_or(n, |l| l.min(n));
    if samples == 0 {
        return Err(format!("dataset tensor `{}` holds no samples", inputs.name));
    }
    let label_name = options.labels.clone().or_else(|| header.get("labels").map(|_| "labels".to_string()));
    let labels = match label_name {
        None => None,
        Some(name) => {
            let t = header.get(&name).ok_or_else(|| format!("the dataset has no tensor `{name}`"))?;
            if !int_dtype(t.dtype) {
                return Err(format!("labels `{name}` are {}; class labels must be integers", t.dtype.as_str()));
            }
            // One label per prediction row: the output's dimensions between batch and classes.
            let mut want = vec![n];
            want.extend_from_slice(&output_shape[..output_shape.len().saturating_sub(1)]);
            if t.shape != want {
                return Err(format!(
                    "labels `{name}` have shape {:?}; the graph's output is {output_shape:?} per sample, so they must be {want:?}",
                    t.shape
                ));
            }
            Some(t.clone())
        }
    };
    Ok(DatasetPlan { inputs: inputs.clone(), labels, samples })
}

/// Decodes a tensor of any number dtype to f32 (integers exactly up to 2^24).
fn read_numbers(reader: &mut TensorReader, t: &TensorInfo) -> std::io::Result<Vec<f32>> {
    let raw = reader.read_raw(t)?;
    let mut out = vec![0f32; t.numel()];
    if t.dtype.is_float() {
        decode_f32(raw, t.dtype, &mut out);
        return Ok(out);
    }
    let size = t.dtype.size();
    for (o, b) in out.iter_mut().zip(raw.chunks_exact(size)) {
        *o = match t.dtype {
            Dtype::I8 => b[0] as i8 as f32,
            Dtype::U8 => b[0] as f32,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f32,
            Dtype::U16 => u16::from_le_bytes([b[0], b[1]]) as f32,
            Dtype::I32 => i32::from_le_bytes(b.try_into().expect("4 bytes")) as f32,
            Dtype::U32 => u32::from_le_bytes(b.try_into().expect("4 bytes")) as f32,
            Dtype::I64 => i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
            _ => u64::from_le_bytes(b.try_into().expect("8 bytes")) as f32,
        };
    }
    Ok(out)
}

/// A dataset loaded for evaluation.
pub struct Dataset {
    pub inputs: Vec<f32>,
    pub labels: Option<Vec<f32>>,
    pub samples: usize,
    /// Input values per sample.
    pub sample_len: usize,
    pub input_shape: Vec<usize>,
}

impl Dataset {
    /// Reads the planned tensors of the dataset file at `path`.
    pub fn load(path: &Path, plan: &DatasetPlan) -> std::io::Result<Dataset> {
        let mut reader = TensorReader::open(path)?;
        let sample_len: usize = plan.inputs.shape[1..].iter().product();
        let mut inputs = read_numbers(&mut reader, &plan.inputs)?;
        inputs.truncate(plan.samples * sample_len);
        let labels = match &plan.labels {
            Some(t) => {
                let per = t.numel() / t.shape[0].max(1);
                let mut l = read_numbers(&mut reader, t)?;
                l.truncate(plan.samples * per);
                Some(l)
            }
            None => None,
        };
        Ok(Dataset { inputs, labels, samples: plan.samples, sample_len, input_shape: plan.inputs.shape[1..].to_vec() })
    }
}

/// Why an evaluation stopped.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("{0}")]
    Output(String),
    /// The caller's progress callback asked to stop (cancellation).
    #[error("stopped")]
    Stopped,
}

#[derive(Default)]
struct Tally {
    correct: u64,
    loss: f64,
}

/// Log-softmax of one row, in f64.
fn log_softmax(row: &[f32], out: &mut Vec<f64>) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v)) as f64;
    let lse = row.iter().map(|v| (*v as f64 - max).exp()).sum::<f64>().ln() + max;
    out.clear();
    out.extend(row.iter().map(|v| *v as f64 - lse));
}

/// Index of the largest value (the first on ties).
pub(crate) fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, v)| if *v > bv { (i, *v) } else { (bi, bv) }).0
}

/// Runs both networks over the dataset in batches. `tick(done, total)` is called after each
/// batch with samples done; returning `false` stops the evaluation ([`EvalError::Stopped`]).
pub fn evaluate(
    before: &Network,
    after: &Network,
    data: &Dataset,
    options: &EvalOptions,
    labels_name: Option<String>,
    tick: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Evaluation, EvalError> {
    let started = std::time::Instant::now();
    let batch = options.batch_size.max(1);
    let (mut tb, mut ta) = (Tally::default(), Tally::default());
    let (mut agree, mut rows, mut kl, mut diff2, mut ref2) = (0u64, 0usize, 0f64, 0f64, 0f64);
    let (mut lp, mut lq) = (Vec::new(), Vec::new());
    let mut start = 0;
    while start < data.samples {
        let n = batch.min(data.samples - start);
        let x = &data.inputs[start * data.sample_len..(start + n) * data.sample_len];
        let (shape_o, yo) = before.forward(x, n, &data.input_shape)?;
        let (shape_c, yc) = after.forward(x, n, &data.input_shape)?;
        if shape_o != shape_c {
            return Err(EvalError::Output(format!("output shapes differ: {shape_o:?} before, {shape_c:?} after")));
        }
        let k = *shape_o.last().unwrap_or(&1);
        if yo.iter().chain(&yc).any(|v| !v.is_finite()) {
            let which = if yo.iter().any(|v| !v.is_finite()) { "original" } else { "compressed" };
            return Err(EvalError::Output(format!(
                "the {which} model's outputs hold NaN/Inf on samples {start}..{}",
                start + n
            )));
        }
        let batch_rows = yo.len() / k.max(1);
        let labels = data.labels.as_ref().map(|l| &l[rows..rows + batch_rows]);
        for r in 0..batch_rows {
            let (o, c) = (&yo[r * k..(r + 1) * k], &yc[r * k..(r + 1) * k]);
            log_softmax(o, &mut lp);
            log_softmax(c, &mut lq);
            kl += lp.iter().zip(&lq).map(|(p, q)| p.exp() * (p - q)).sum::<f64>();
            let (ao, ac) = (argmax(o), argmax(c));
            agree += u64::from(ao == ac);
            if let Some(l) = labels {
                if !(l[r] >= 0.0 && (l[r] as usize) < k) {
                    return Err(EvalError::Output(format!("label {} is not a class of the {k}-wide output", l[r])));
                }
                let label = l[r] as usize;
                tb.correct += u64::from(ao == label);
                ta.correct += u64::from(ac == label);
                tb.loss -= lp[label];
                ta.loss -= lq[label];
            }
            for (a, b) in o.iter().zip(c) {
                diff2 += (*b as f64 - *a as f64).powi(2);
                ref2 += (*a as f64).powi(2);
            }
        }
        rows += batch_rows;
        start += n;
        if !tick(start, data.samples) {
            return Err(EvalError::Stopped);
        }
    }
    let per_row = |v: f64| v / rows.max(1) as f64;
    let quality = |t: &Tally| Quality {
        accuracy: data.labels.as_ref().map(|_| per_row(t.correct as f64)),
        loss: data.labels.as_ref().map(|_| per_row(t.loss)),
    };
    Ok(Evaluation {
        samples: data.samples,
        rows,
        batch_size: batch,
        inputs: options.inputs.clone(),
        labels: labels_name,
        before: quality(&tb),
        after: quality(&ta),
        top1_agreement: per_row(agree as f64),
        kl_mean: per_row(kl).max(0.0),
        output_relative_error: if ref2 > 0.0 { (diff2 / ref2).sqrt() } else { diff2.sqrt() },
        milliseconds: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::forward::Weights;
    use crate::graph::Graph;

    fn net(w: [f32; 4]) -> Network {
        let g =
            Graph::parse(&serde_json::json!({"input": {"shape": [2]}, "layers": [{"kind": "linear", "name": "fc"}]}))
                .unwrap();
        let mut weights = Weights::new();
        weights.insert("fc.weight".into(), (vec![2, 2], w.to_vec()));
        Network::build(&g, &weights).unwrap()
    }

    fn data() -> Dataset {
        Dataset {
            inputs: vec![1.0, 0.0, 0.0, 1.0, 2.0, 1.0],
            labels: Some(vec![0.0, 1.0, 1.0]),
            samples: 3,
            sample_len: 2,
            input_shape: vec![2],
        }
    }

    #[test]
    fn metrics_follow_their_definitions() {
        let identity = net([1.0, 0.0, 0.0, 1.0]);
        let options = EvalOptions { batch_size: 2, ..EvalOptions::default() };
        let same = evaluate(&identity, &identity, &data(), &options, None, &mut |_, _| true).unwrap();
        assert_eq!((same.top1_agreement, same.kl_mean, same.output_relative_error), (1.0, 0.0, 0.0));
        // Logits are the inputs: rows (1,0) label 0 and (0,1) label 1 are right, (2,1) label 1 is wrong.
        assert!((same.before.accuracy.unwrap() - 2.0 / 3.0).abs() < 1e-12);
        let ce = |a: f64, b: f64, label: usize| -([a, b][label] - (a.exp() + b.exp()).ln());
        let want = (ce(1.0, 0.0, 0) + ce(0.0, 1.0, 1) + ce(2.0, 1.0, 1)) / 3.0;
        assert!((same.before.loss.unwrap() - want).abs() < 1e-9);

        // The swapped network flips every prediction: agreement 0, KL = mean of KL(p || swap(p)).
        let swapped = net([0.0, 1.0, 1.0, 0.0]);
        let e = evaluate(&identity, &swapped, &data(), &options, None, &mut |_, _| true).unwrap();
        assert_eq!(e.top1_agreement, 0.0);
        let kl = |a: f64, b: f64| {
            let (pa, pb) = (a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp()));
            pa * (pa / pb).ln() + pb * (pb / pa).ln()
        };
        assert!((e.kl_mean - (kl(1.0, 0.0) + kl(0.0, 1.0) + kl(2.0, 1.0)) / 3.0).abs() < 1e-9);
        assert!((e.output_relative_error - (6.0f64 / 7.0).sqrt()).abs() < 1e-6, "{}", e.output_relative_error);
    }

    #[test]
    fn a_false_tick_stops_the_evaluation() {
        let identity = net([1.0, 0.0, 0.0, 1.0]);
        let options = EvalOptions { batch_size: 1, ..EvalOptions::default() };
        let mut calls = 0;
        let r = evaluate(&identity, &identity, &data(), &options, None, &mut |_, _| {
            calls += 1;
            false
        });
        assert!(matches!(r, Err(EvalError::Stopped)));
        assert_eq!(calls, 1);
    }
}
