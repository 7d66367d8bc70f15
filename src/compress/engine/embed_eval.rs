//! Encoder evaluation (BERT family): the original model and the compressed dense output run on
//! the same passages with candle-transformers' `bert`, and their embeddings are compared.
//!
//! The text is cut into passages at line breaks (empty lines skipped), each tokenized with the
//! model's own `tokenizer.json` (special tokens added as its post-processor says, truncated to
//! `context` tokens), while whole passages fit in the token budget. Each passage runs alone (no padding), so
//! its embedding is the mean of its last hidden states over every token (sentence-transformers'
//! mean pooling with a full attention mask). Measured:
//! - cosine similarity of each passage's embedding before and after (mean and minimum);
//! - cosine of each token's hidden state before and after (mean over all tokens);
//! - nearest-neighbour agreement: for each passage, the most similar other passage (cosine of
//!   embeddings) is the same one under both models; the retrieval a search index would do.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::text_eval::{has_tokenizer, load_tokenizer, read_text, within_positions, TextEvalPlan};
use super::{EngineError, Tracker};
use crate::formats::hf::ModelFiles;

/// Default token budget for an encoder: passages run whole, so a budget costs far less than a
/// decoder's token-by-token steps.
pub const DEFAULT_TOKENS: usize = 4096;

/// The result, in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EmbeddingEvaluation {
    pub artifact: String,
    pub passages: usize,
    pub tokens: usize,
    /// Largest passage, in tokens.
    pub context: usize,
    /// Mean and smallest cosine similarity of a passage's embedding, original vs compressed.
    pub cosine_mean: f64,
    pub cosine_min: f64,
    /// Mean cosine similarity of a token's last hidden state, original vs compressed.
    pub token_cosine_mean: f64,
    /// Share of passages whose nearest other passage is the same under both models.
    pub neighbour_agreement: f64,
    pub milliseconds: f64,
}

/// Whether the model is one candle-transformers' `bert` runs: `model_type` `bert`.
pub fn covers(files: &ModelFiles) -> bool {
    let Ok(Some(config)) = files.json("config.json") else { return false };
    config["model_type"] == "bert"
}

/// What the plan checks before an encoder evaluation is accepted: a tokenizer.json, a
/// config.json candle's BERT reads, and passages within `max_position_embeddings`.
pub fn check(files: &ModelFiles, context: usize) -> Result<(), String> {
    has_tokenizer(files, "an encoder")?;
    let config = candle_config(files).map_err(|e| format!("candle-transformers' BERT cannot read {e}"))?;
    within_positions(context, config.max_position_embeddings)
}

fn candle_config(files: &ModelFiles) -> Result<candle_transformers::models::bert::Config, String> {
    let c = files.json("config.json").map_err(|e| e.to_string())?.ok_or("the model has no config.json")?;
    serde_json::from_value(c).map_err(|e| format!("config.json: {e}"))
}

fn load(path: &Path, files: &ModelFiles) -> Result<candle_transformers::models::bert::BertModel, String> {
    let config = candle_config(files)?;
    let vb = super::text_eval::var_builder(path)?;
    candle_transformers::models::bert::BertModel::load(vb, &config).map_err(|e| format!("loading BERT: {e}"))
}

/// The last hidden states of one passage: [tokens][hidden].
fn hidden_states(
    model: &candle_transformers::models::bert::BertModel,
    ids: &[u32],
) -> Result<Vec<Vec<f32>>, candle_core::Error> {
    let input = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let types = input.zeros_like()?;
    model.forward(&input, &types, None)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec2()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 || bb == 0.0 {
        // Two zero vectors are the same embedding; one zero vector is unrelated to anything.
        return if aa == bb { 1.0 } else { 0.0 };
    }
    ab / (aa.sqrt() * bb.sqrt())
}

fn mean_pool(states: &[Vec<f32>]) -> Vec<f32> {
    let mut out = vec![0f32; states.first().map_or(0, Vec::len)];
    for s in states {
        out.iter_mut().zip(s).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= states.len().max(1) as f32);
    out
}

/// For each embedding, the index of the most similar other one (cosine).
fn nearest(embeddings: &[Vec<f32>]) -> Vec<usize> {
    (0..embeddings.len())
        .map(|i| {
            (0..embeddings.len())
                .filter(|&j| j != i)
                .map(|j| (j, cosine(&embeddings[i], &embeddings[j])))
                .fold((usize::MAX, f64::NEG_INFINITY), |best, (j, c)| if c > best.1 { (j, c) } else { best })
                .0
        })
        .collect()
}

/// Runs the evaluation: `model` is the original safetensors file, `artifact` the dense output
/// (one file, or the index of its shards), `dataset` the file holding the text tensor.
pub(super) fn run(
    plan: &TextEvalPlan,
    files: &ModelFiles,
    model: &Path,
    artifact: &Path,
    dataset: &Path,
    tracker: &mut Tracker<'_>,
) -> Result<EmbeddingEvaluation, EngineError> {
    let started = std::time::Instant::now();
    let job_err = |detail: String| EngineError::Job { code: "evaluation_failed", detail };
    let text = read_text(plan, dataset)?;
    let mut tokenizer = load_tokenizer(files)?;
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams { max_length: plan.context, ..Default::default() }))
        .map_err(|e| job_err(format!("tokenizer.json: {e}")))?;
    let mut passages: Vec<Vec<u32>> = Vec::new();
    let mut spent = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if spent >= plan.tokens {
            break;
        }
        let encoding = tokenizer.encode(line, true).map_err(|e| job_err(format!("tokenizing the text: {e}")))?;
        // Whole passages only (with their closing special token), once one is in.
        if !passages.is_empty() && spent + encoding.get_ids().len() > plan.tokens {
            break;
        }
        let ids: Vec<u32> = encoding.get_ids().iter().copied().take(plan.tokens - spent).collect();
        if !ids.is_empty() {
            spent += ids.len();
            passages.push(ids);
        }
    }
    if passages.len() < 2 {
        return Err(job_err(format!(
            "the text gives {} passage(s); comparing neighbours needs at least 2 non-empty lines",
            passages.len()
        )));
    }
    let vocab = candle_config(files).map_err(job_err)?.vocab_size;
    if let Some(id) = passages.iter().flatten().find(|&&id| id as usize >= vocab) {
        return Err(job_err(format!("token id {id} is outside the model's vocabulary of {vocab}")));
    }
    tracker.check("embedding evaluation: loading the models")?;
    let original = load(model, files).map_err(job_err)?;
    tracker.check("embedding evaluation: loading the models")?;
    let compressed = load(artifact, files).map_err(job_err)?;
    let eval = |e: candle_core::Error| job_err(e.to_string());
    let (mut before, mut after) = (Vec::new(), Vec::new());
    let (mut token_cos, mut token_n) = (0f64, 0usize);
    for (k, ids) in passages.iter().enumerate() {
        tracker.check("embedding evaluation")?;
        tracker.ctl.progress(
            k as f64 / passages.len() as f64,
            "evaluate",
            &format!("embedding evaluation: passage {} of {}", k + 1, passages.len()),
        );
        let (b, a) = (hidden_states(&original, ids).map_err(eval)?, hidden_states(&compressed, ids).map_err(eval)?);
        if b.iter().chain(&a).flatten().any(|v| !v.is_finite()) {
            return Err(job_err(format!("passage {}: the hidden states hold NaN or Inf", k + 1)));
        }
        token_cos += b.iter().zip(&a).map(|(x, y)| cosine(x, y)).sum::<f64>();
        token_n += b.len();
        before.push(mean_pool(&b));
        after.push(mean_pool(&a));
    }
    let cosines: Vec<f64> = before.iter().zip(&after).map(|(b, a)| cosine(b, a)).collect();
    let (nb, na) = (nearest(&before), nearest(&after));
    let agree = nb.iter().zip(&na).filter(|(x, y)| x == y).count();
    Ok(EmbeddingEvaluation {
        artifact: plan.artifact.clone(),
        passages: passages.len(),
        tokens: spent,
        context: passages.iter().map(Vec::len).max().unwrap_or(0),
        cosine_mean: cosines.iter().sum::<f64>() / cosines.len() as f64,
        cosine_min: cosines.iter().copied().fold(f64::INFINITY, f64::min),
        token_cosine_mean: token_cos / token_n.max(1) as f64,
        neighbour_agreement: agree as f64 / passages.len() as f64,
        milliseconds: started.elapsed().as_secs_f64() * 1e3,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_and_neighbours() {
        assert!((cosine(&[1.0, 0.0], &[2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(cosine(&[1.0, 0.0], &[0.0, 3.0]).abs() < 1e-12);
        assert_eq!(cosine(&[0.0, 0.0], &[0.0, 0.0]), 1.0);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 0.0]), 0.0);
        let e = vec![vec![1.0, 0.0], vec![0.9, 0.1], vec![0.0, 1.0]];
        assert_eq!(nearest(&e), [1, 0, 1]);
        assert_eq!(mean_pool(&[vec![1.0, 2.0], vec![3.0, 4.0]]), [2.0, 3.0]);
    }
}
