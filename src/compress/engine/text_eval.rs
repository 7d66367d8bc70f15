//! Language-model evaluation: the original model and the compressed artifact run on the same
//! text, token by token, with candle-transformers (its `llama` on safetensors weights, its
//! `quantized_llama` on a GGUF: the file the user downloads, as llama.cpp reads it). The text is
//! tokenized with the model's own `tokenizer.json` through the `tokenizers` crate.
//!
//! Measured over every predicted position of `context`-token chunks of the first `tokens`
//! tokens: perplexity of each model on the text (exp of the mean negative log-likelihood of the
//! next token), the mean KL divergence KL(original || compressed) of the next-token distributions
//! (nats), and top-1 agreement (both models' most likely next token equal). candle-transformers'
//! models return the last position's logits only, so each chunk runs one token at a time with a
//! KV cache: cost is `tokens` forward steps per model, which the token budget bounds. Chunks
//! start without a BOS token (the text's own tokens), so perplexities compare the two models
//! with each other, not with llama-perplexity's figures, which put BOS first.

use crate::formats::safetensors::sharded::INDEX_FILE;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{EngineError, Tracker};
use crate::formats::hf::ModelFiles;

/// Default and largest token budget, and default and largest chunk length.
pub const DEFAULT_TOKENS: usize = 256;
pub const MAX_TOKENS: usize = 65_536;
pub const DEFAULT_CONTEXT: usize = 128;
pub const MAX_CONTEXT: usize = 4096;

/// What a text evaluation will do, decided by the plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextEvalPlan {
    /// The dataset tensor holding the UTF-8 text (U8, 1-D).
    pub text: String,
    /// Bytes of text in it.
    pub text_bytes: u64,
    /// Token budget (the text's first tokens).
    pub tokens: usize,
    /// Tokens per chunk (each chunk starts with an empty cache).
    pub context: usize,
    /// The artifact evaluated as the compressed model: `model.gguf` (llama.cpp's layout) or
    /// `model.safetensors`.
    pub artifact: String,
    /// Whether the evaluation reads `evaluate.dataset_id` rather than the job's dataset.
    pub separate_dataset: bool,
    /// A decoder (perplexity, KL, top-1) or an encoder (embeddings, nearest neighbours).
    #[serde(default)]
    pub model: TextModel,
}

/// The kinds of language model evaluated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TextModel {
    /// Llama family, run by candle-transformers' `llama` / `quantized_llama`.
    #[default]
    Decoder,
    /// BERT family, run by candle-transformers' `bert` ([`super::embed_eval`]).
    Encoder,
}

/// The result, in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextEvaluation {
    pub artifact: String,
    pub tokens: usize,
    pub context: usize,
    /// Next-token predictions compared.
    pub predictions: usize,
    pub perplexity_before: f64,
    pub perplexity_after: f64,
    /// Mean KL(original || compressed) over the predictions, in nats.
    pub kl_mean: f64,
    pub top1_agreement: f64,
    pub milliseconds: f64,
}

/// The kind of language model evaluated, when candle-transformers runs it: `llama` and
/// `quantized_llama` for Llama and Mistral decoders, `qwen2` and `quantized_qwen2` for Qwen2,
/// `bert` for BERT encoders.
pub fn covers(files: &ModelFiles) -> Option<TextModel> {
    let Ok(Some(config)) = files.json("config.json") else { return None };
    if matches!(
        config["architectures"][0].as_str(),
        Some("LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM")
    ) {
        Some(TextModel::Decoder)
    } else if super::embed_eval::covers(files) {
        Some(TextModel::Encoder)
    } else {
        None
    }
}

/// What the plan checks before a text evaluation is accepted, so a job never fails at its end
/// on what candle-transformers' Llama cannot run: a tokenizer.json to tokenize with, a
/// config.json it reads (RoPE scaling: none or llama3), `head_dim` = hidden / heads (it derives
/// it), and chunks within `max_position_embeddings`. Returns whether llama3 RoPE scaling is used
/// (candle's `quantized_llama` ignores a GGUF's `rope_freqs`, so such a model is evaluated
/// through its safetensors output).
pub fn check(files: &ModelFiles, context: usize) -> Result<bool, String> {
    has_tokenizer(files, "a language model")?;
    let raw = files.json("config.json").map_err(|e| e.to_string())?.ok_or("the model has no config.json")?;
    if is_qwen2(files) {
        let config = qwen2_config(files).map_err(|e| format!("candle-transformers' Qwen2 cannot read {e}"))?;
        if !raw["rope_scaling"].is_null()
            || raw["rope_parameters"]["rope_type"].as_str().is_some_and(|t| t != "default")
        {
            return Err("config.json sets RoPE scaling, which candle-transformers' Qwen2 does not apply".into());
        }
        derived_head_dim(&raw, "Qwen2")?;
        within_positions(context, config.max_position_embeddings)?;
        return Ok(false);
    }
    let config = candle_config(files).map_err(|e| format!("candle-transformers' Llama cannot read {e}"))?;
    derived_head_dim(&raw, "Llama")?;
    within_positions(context, config.max_position_embeddings)?;
    Ok(config.rope_scaling.is_some())
}

/// The model's tokenizer.json is there (`what` is evaluated with it).
pub(super) fn has_tokenizer(files: &ModelFiles, what: &str) -> Result<(), String> {
    match files.path("tokenizer.json") {
        Some(_) => Ok(()),
        None => {
            Err(format!("evaluating {what} tokenizes with the model's tokenizer.json, which the folder does not have"))
        }
    }
}

/// candle-transformers derives `head_dim` as hidden / heads: a config that sets another cannot run.
fn derived_head_dim(raw: &serde_json::Value, model: &str) -> Result<(), String> {
    let (hidden, heads) = (raw["hidden_size"].as_u64().unwrap_or(0), raw["num_attention_heads"].as_u64().unwrap_or(1));
    match raw["head_dim"].as_u64().filter(|&d| heads == 0 || d != hidden / heads) {
        Some(head_dim) => Err(format!(
            "config.json sets head_dim {head_dim} apart from hidden_size / num_attention_heads, which candle-transformers' {model} does not support"
        )),
        None => Ok(()),
    }
}

/// Chunks of `context` tokens fit the model's positions.
pub(super) fn within_positions(context: usize, max_position_embeddings: usize) -> Result<(), String> {
    if context > max_position_embeddings {
        return Err(format!(
            "evaluate.context {context} is beyond the model's max_position_embeddings {max_position_embeddings}"
        ));
    }
    Ok(())
}

/// config.json as candle-transformers' `LlamaConfig` reads it: transformers 5 writes RoPE's
/// parameters under `rope_parameters`, which candle reads from `rope_theta` and `rope_scaling`.
fn candle_config(files: &ModelFiles) -> Result<candle_transformers::models::llama::Config, String> {
    let mut c = files.json("config.json").map_err(|e| e.to_string())?.ok_or("the model has no config.json")?;
    let params = c["rope_parameters"].clone();
    if c["rope_theta"].is_null() {
        if let Some(theta) = params["rope_theta"].as_f64() {
            c["rope_theta"] = theta.into();
        }
    }
    if c["rope_scaling"].is_null() && params["rope_type"] == "llama3" {
        c["rope_scaling"] = params;
    }
    let cfg: candle_transformers::models::llama::LlamaConfig =
        serde_json::from_value(c).map_err(|e| format!("config.json: {e}"))?;
    Ok(cfg.into_config(false))
}

/// The weights of a safetensors file, or of the shards a `model.safetensors.index.json` names,
/// as f32 on the CPU.
pub(super) fn var_builder(path: &Path) -> Result<candle_nn::VarBuilder<'static>, String> {
    if path.file_name().is_some_and(|n| n == INDEX_FILE) {
        let text = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let open = |file: &str| {
            let path = dir.join(file);
            let header = crate::formats::safetensors::read_header(&path, u64::MAX)
                .map_err(|e| crate::formats::hf::FolderError::BadShard(file.into(), e.to_string()))?;
            Ok((path, header))
        };
        let shards: Vec<_> = crate::formats::hf::check_index(&text, open)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(path, _)| path)
            .collect();
        // SAFETY: the shards are this job's own outputs, complete and no longer written;
        // nothing modifies them while they are mapped.
        unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&shards, DType::F32, &Device::Cpu) }
            .map_err(|e| e.to_string())
    } else {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        candle_nn::VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).map_err(|e| e.to_string())
    }
}

/// The beginning of the evaluation text: generously more bytes than `tokens` tokens take (a
/// token is a few bytes), so a multi-GB corpus costs neither memory nor time.
pub(super) fn read_text(plan: &TextEvalPlan, dataset: &Path) -> Result<String, EngineError> {
    let job_err = |detail: String| EngineError::Job { code: "evaluation_failed", detail };
    let header = crate::formats::safetensors::read_header(dataset, u64::MAX).map_err(|e| job_err(e.to_string()))?;
    let info = header.get(&plan.text).ok_or_else(|| job_err(format!("the dataset has no `{}`", plan.text)))?;
    let prefix = info.bytes().min(plan.tokens as u64 * 64 + 4096);
    let mut raw = vec![0u8; prefix as usize];
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(dataset)?, &mut raw, info.start)?;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

fn is_qwen2(files: &ModelFiles) -> bool {
    files.json("config.json").ok().flatten().is_some_and(|c| c["architectures"][0] == "Qwen2ForCausalLM")
}

/// config.json as candle-transformers' Qwen2 `Config` reads it: RoPE's base from
/// `rope_parameters` (transformers 5) and a `sliding_window` that transformers writes as null
/// when the window is off.
fn qwen2_config(files: &ModelFiles) -> Result<candle_transformers::models::qwen2::Config, String> {
    let mut c = files.json("config.json").map_err(|e| e.to_string())?.ok_or("the model has no config.json")?;
    if c["rope_theta"].is_null() {
        c["rope_theta"] = c["rope_parameters"]["rope_theta"].as_f64().unwrap_or(10_000.0).into();
    }
    if c["sliding_window"].is_null() {
        c["sliding_window"] = c["max_position_embeddings"].clone();
    }
    for (key, default) in [("use_sliding_window", serde_json::json!(false)), ("hidden_act", serde_json::json!("silu"))]
    {
        if c[key].is_null() {
            c[key] = default;
        }
    }
    if c["max_window_layers"].is_null() {
        c["max_window_layers"] = c["num_hidden_layers"].clone();
    }
    serde_json::from_value(c).map_err(|e| format!("config.json: {e}"))
}

/// The model's own `tokenizer.json`, through the `tokenizers` crate.
pub(super) fn load_tokenizer(files: &ModelFiles) -> Result<tokenizers::Tokenizer, EngineError> {
    let job_err = |detail: String| EngineError::Job { code: "evaluation_failed", detail };
    let path = files.path("tokenizer.json").ok_or_else(|| job_err("the model has no tokenizer.json".into()))?;
    tokenizers::Tokenizer::from_file(path).map_err(|e| job_err(format!("tokenizer.json: {e}")))
}

/// One of the two models, fed a token at a time (two exist per evaluation: their size does not
/// matter).
#[allow(clippy::large_enum_variant)]
enum Runner {
    Dense(
        Box<candle_transformers::models::llama::Llama>,
        candle_transformers::models::llama::Config,
        Option<candle_transformers::models::llama::Cache>,
    ),
    Gguf(Box<candle_transformers::models::quantized_llama::ModelWeights>),
    Qwen2(Box<candle_transformers::models::qwen2::ModelForCausalLM>),
    GgufQwen2(Box<candle_transformers::models::quantized_qwen2::ModelWeights>),
}

impl Runner {
    fn dense(path: &Path, files: &ModelFiles) -> Result<Runner, String> {
        if is_qwen2(files) {
            let config = qwen2_config(files)?;
            let model = candle_transformers::models::qwen2::ModelForCausalLM::new(&config, var_builder(path)?)
                .map_err(|e| e.to_string())?;
            return Ok(Runner::Qwen2(Box::new(model)));
        }
        let config = candle_config(files)?;
        let vb = var_builder(path)?;
        let model = candle_transformers::models::llama::Llama::load(vb, &config).map_err(|e| e.to_string())?;
        Ok(Runner::Dense(Box::new(model), config, None))
    }

    fn gguf(path: &Path) -> Result<Runner, String> {
        let mut file = std::fs::File::open(path).map_err(|e| e.to_string())?;
        let content = candle_core::quantized::gguf_file::Content::read(&mut file).map_err(|e| e.to_string())?;
        let arch = content.metadata.get("general.architecture").and_then(|v| v.to_string().ok()).cloned();
        if arch.as_deref() == Some("qwen2") {
            let model =
                candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                    .map_err(|e| e.to_string())?;
            return Ok(Runner::GgufQwen2(Box::new(model)));
        }
        let model =
            candle_transformers::models::quantized_llama::ModelWeights::from_gguf(content, &mut file, &Device::Cpu)
                .map_err(|e| e.to_string())?;
        Ok(Runner::Gguf(Box::new(model)))
    }

    /// Starts a fresh context (an empty KV cache).
    fn reset(&mut self) -> Result<(), EngineError> {
        match self {
            Runner::Dense(_, config, cache) => {
                *cache = Some(
                    candle_transformers::models::llama::Cache::new(true, DType::F32, config, &Device::Cpu)
                        .map_err(eval_err)?,
                );
            }
            Runner::Gguf(m) => m.clear_kv_cache(),
            Runner::Qwen2(m) => m.clear_kv_cache(),
            Runner::GgufQwen2(m) => m.clear_kv_cache(),
        }
        Ok(())
    }

    /// Feeds token `id` at position `p` of the context; the next token's log-probabilities.
    fn step(&mut self, id: u32, p: usize) -> Result<Vec<f64>, EngineError> {
        let x = Tensor::new(&[[id]], &Device::Cpu).map_err(eval_err)?;
        let logits = match self {
            Runner::Dense(m, _, Some(cache)) => m.forward(&x, p, cache),
            Runner::Dense(_, _, None) => unreachable!("reset before the first step"),
            Runner::Gguf(m) => m.forward(&x, p),
            Runner::Qwen2(m) => m.forward(&x, p),
            Runner::GgufQwen2(m) => m.forward(&x, p),
        }
        .map_err(eval_err)?;
        let logits: Vec<f32> = logits.flatten_all().and_then(|t| t.to_vec1()).map_err(eval_err)?;
        Ok(log_softmax(&logits))
    }
}

fn eval_err(e: candle_core::Error) -> EngineError {
    EngineError::Job { code: "evaluation_failed", detail: e.to_string() }
}

/// log(softmax(x)) in f64.
fn log_softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let sum: f64 = x.iter().map(|&v| (v as f64 - max).exp()).sum();
    let log_sum = sum.ln() + max;
    x.iter().map(|&v| v as f64 - log_sum).collect()
}

fn argmax(x: &[f64]) -> usize {
    x.iter().enumerate().fold((0, f64::NEG_INFINITY), |best, (i, &v)| if v > best.1 { (i, v) } else { best }).0
}

/// Runs the evaluation: `model` is the original safetensors file, `artifact` the compressed one
/// the plan names, `dataset` the file holding the text tensor.
pub(super) fn run(
    plan: &TextEvalPlan,
    files: &ModelFiles,
    model: &Path,
    artifact: &Path,
    dataset: &Path,
    tracker: &mut Tracker<'_>,
) -> Result<TextEvaluation, EngineError> {
    let started = std::time::Instant::now();
    let job_err = |detail: String| EngineError::Job { code: "evaluation_failed", detail };
    let text = read_text(plan, dataset)?;
    let tokenizer = load_tokenizer(files)?;
    let encoding = tokenizer.encode(text, false).map_err(|e| job_err(format!("tokenizing the text: {e}")))?;
    let ids: Vec<u32> = encoding.get_ids().iter().copied().take(plan.tokens).collect();
    drop(encoding);
    if ids.len() < 2 {
        return Err(job_err(format!("the text is {} token(s); at least 2 are needed", ids.len())));
    }
    if tracker.ctl.canceled() {
        return Err(EngineError::Canceled);
    }
    let mut original = Runner::dense(model, files).map_err(job_err)?;
    if tracker.ctl.canceled() {
        return Err(EngineError::Canceled);
    }
    let mut compressed =
        if plan.artifact == "model.gguf" { Runner::gguf(artifact) } else { Runner::dense(artifact, files) }
            .map_err(job_err)?;
    // Both models step through each chunk together, so only one pair of distributions is alive;
    // the chunk's last token predicts nothing and is not fed.
    let chunks: Vec<&[u32]> = ids.chunks(plan.context).filter(|c| c.len() >= 2).collect();
    let total: usize = chunks.iter().map(|c| c.len() - 1).sum();
    let (mut nll_before, mut nll_after, mut kl, mut agree, mut n) = (0f64, 0f64, 0f64, 0usize, 0usize);
    for (k, chunk) in chunks.iter().enumerate() {
        original.reset()?;
        compressed.reset()?;
        for p in 0..chunk.len() - 1 {
            if tracker.ctl.canceled() {
                return Err(EngineError::Canceled);
            }
            if p.is_multiple_of(16) {
                let message = format!("text evaluation: chunk {} of {}", k + 1, chunks.len());
                tracker.ctl.progress(n as f64 / total as f64, "evaluate", &message);
            }
            let (b, a) = (original.step(chunk[p], p)?, compressed.step(chunk[p], p)?);
            let next = chunk[p + 1] as usize;
            if next >= b.len() || next >= a.len() {
                return Err(job_err(format!("token id {next} is outside the model's vocabulary of {}", b.len())));
            }
            nll_before -= b[next];
            nll_after -= a[next];
            kl += b.iter().zip(&a).map(|(&pb, &pa)| pb.exp() * (pb - pa)).sum::<f64>();
            agree += usize::from(argmax(&b) == argmax(&a));
            n += 1;
        }
    }
    let n_f = n.max(1) as f64;
    let result = TextEvaluation {
        artifact: plan.artifact.clone(),
        tokens: ids.len(),
        context: plan.context,
        predictions: n,
        perplexity_before: (nll_before / n_f).exp(),
        perplexity_after: (nll_after / n_f).exp(),
        kl_mean: kl / n_f,
        top1_agreement: agree as f64 / n_f,
        milliseconds: started.elapsed().as_secs_f64() * 1e3,
    };
    for v in [result.perplexity_before, result.perplexity_after, result.kl_mean] {
        if !v.is_finite() {
            return Err(job_err(format!(
                "the evaluation produced a non-finite value ({v}); the model's logits overflow"
            )));
        }
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_softmax_sums_to_one_and_keeps_the_argmax() {
        let lp = log_softmax(&[1.0, 3.0, -2.0, 3.5]);
        let total: f64 = lp.iter().map(|v| v.exp()).sum();
        assert!((total - 1.0).abs() < 1e-12);
        assert_eq!(argmax(&lp), 3);
        // Large logits do not overflow.
        assert!(log_softmax(&[1e30, 0.0]).iter().all(|v| v.is_finite() || *v == f64::NEG_INFINITY));
    }
}
