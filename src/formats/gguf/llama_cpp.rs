//! GGUF that llama.cpp runs: the architecture, its hyperparameters, the tokenizer and
//! llama.cpp's tensor names, derived from a Hugging Face folder's `config.json`,
//! `tokenizer.json` and `tokenizer_config.json` the way llama.cpp's `convert_hf_to_gguf.py`
//! derives them (its `conversion/llama.py`, `conversion/base.py` and `gguf-py/gguf/vocab.py`).
//!
//! Covered: `LlamaForCausalLM` and `MistralForCausalLM` (architecture `llama`, Q/K rows permuted
//! for llama.cpp's RoPE, llama3 RoPE scaling as a `rope_freqs` tensor) and `Qwen2ForCausalLM`
//! (architecture `qwen2`, no permutation), with byte-level BPE tokenizers (`tokenizer.ggml.model`
//! `gpt2`). The pre-tokenizer is recognised by its definition in `tokenizer.json` (the regex
//! llama.cpp must reproduce) from an allow-list; the converter instead hashes the token ids of a
//! test string, which ties it to known vocabularies. Anything else is refused with the reason.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{GgufType, MetaValue};
use crate::formats::hf::ModelFiles;

/// The name of llama3 RoPE scaling's factor tensor.
pub const ROPE_FREQS: &str = "rope_freqs.weight";

/// What makes a GGUF runnable by llama.cpp, planned before any tensor is written.
#[derive(Debug, Clone)]
pub struct LlamaCppModel {
    /// `llama` or `qwen2`.
    pub arch: &'static str,
    /// Every key but `general.file_type` (which depends on the tensors' final types).
    pub metadata: Vec<(String, MetaValue)>,
    /// Input tensor name -> its GGUF name and, for Q/K of `llama`, the head count of the row
    /// permutation ([`permute_rows`]).
    pub names: BTreeMap<String, Rename>,
    /// Input tensors llama.cpp does not read (`rotary_emb.inv_freq`): left out of the GGUF.
    pub skipped: Vec<String>,
    /// llama3 RoPE scaling: the `rope_freqs.weight` factors (F32, `head_dim / 2` values).
    pub rope_freqs: Option<Vec<f32>>,
    /// One line for the plan: architecture, tokenizer, pre-tokenizer.
    pub summary: String,
}

/// A tensor's GGUF name and its Q/K permutation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rename {
    pub name: String,
    pub permute_heads: Option<usize>,
}

impl LlamaCppModel {
    /// The GGUF type a tensor is stored as: 1-D tensors always F32 (llama.cpp's kernels
    /// expect it; the converter does the same), others `planned`.
    pub fn storage_type(shape: &[usize], planned: GgufType) -> GgufType {
        if shape.len() <= 1 {
            GgufType::F32
        } else {
            planned
        }
    }
}

/// `general.file_type` (llama.cpp's `llama_ftype`) for a file whose 2-D weights have `types`:
/// the most common one decides, as llama-quantize labels its mixes.
pub fn file_type(types: impl IntoIterator<Item = GgufType>) -> u32 {
    let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
    for ty in types {
        let ftype = match ty {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q4_1 => 3,
            GgufType::Q8_0 => 7,
            GgufType::Q5_0 => 8,
            GgufType::Q5_1 => 9,
            GgufType::Q2K => 10,
            GgufType::Q3K => 12,
            GgufType::Q4K => 15,
            GgufType::Q5K => 17,
            GgufType::Q6K => 18,
        };
        *counts.entry(ftype).or_default() += 1;
    }
    counts.into_iter().max_by_key(|&(ft, n)| (n, ft)).map_or(0, |(ft, _)| ft)
}

/// Reorders the rows of a Q or K projection (or its bias) as `convert_hf_to_gguf.py`'s
/// `LlamaModel.permute` does: per head, rows `[2, head_dim/2]` become `[head_dim/2, 2]`, so
/// llama.cpp's interleaved RoPE computes what transformers' `rotate_half` does. Works on any
/// encoding whose rows are independent (every GGUF block type): `bytes` is `rows` equal rows.
pub fn permute_rows(bytes: &[u8], rows: usize, heads: usize, out: &mut Vec<u8>) {
    let row = bytes.len() / rows;
    let half = rows / heads / 2;
    out.clear();
    out.reserve(bytes.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                out.extend_from_slice(&bytes[src * row..(src + 1) * row]);
            }
        }
    }
}

/// The inverse of [`permute_rows`] on f32 values (`rows` rows of `values.len() / rows`).
pub fn unpermute_rows(values: &[f32], rows: usize, heads: usize, out: &mut Vec<f32>) {
    let row = values.len() / rows;
    let half = rows / heads / 2;
    out.clear();
    out.resize(values.len(), 0.0);
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let (dst, src) = (h * 2 * half + j * half + i, h * 2 * half + i * 2 + j);
                out[dst * row..(dst + 1) * row].copy_from_slice(&values[src * row..(src + 1) * row]);
            }
        }
    }
}

/// What a GGUF output of a model will be.
#[derive(Debug)]
pub enum Conversion {
    /// One llama.cpp runs.
    Runnable(LlamaCppModel),
    /// The generic GGUF (tensors under their own names), and why it is not one llama.cpp runs.
    Generic(String),
}

/// Plans a llama.cpp GGUF for a model with `files` whose output tensors are `tensors`
/// (name, row-major shape). Generic: no `config.json`, an architecture this does not cover, or
/// no tokenizer at all. `Err`: a covered architecture that cannot be converted (a tokenizer
/// llama.cpp would not reproduce, a tensor without a llama.cpp name, shapes that disagree with
/// `config.json`), with the reason.
pub fn plan(files: &ModelFiles, tensors: &[(&str, &[usize])]) -> Result<Conversion, String> {
    let Some(config) = files.json("config.json").map_err(|e| e.to_string())? else {
        return Ok(Conversion::Generic("the model has no config.json (upload the model's folder)".into()));
    };
    let hf_arch = config["architectures"].get(0).and_then(Value::as_str).unwrap_or("");
    let (arch, permute) = match hf_arch {
        "LlamaForCausalLM" | "MistralForCausalLM" => ("llama", true),
        "Qwen2ForCausalLM" => ("qwen2", false),
        _ => {
            return Ok(Conversion::Generic(format!(
                "config.json names architecture `{hf_arch}`; ModelPress writes llama.cpp GGUF for LlamaForCausalLM, MistralForCausalLM and Qwen2ForCausalLM"
            )))
        }
    };
    if files.path("tokenizer.json").is_none() && files.path("tokenizer.model").is_none() {
        return Ok(Conversion::Generic(
            "the model has no tokenizer (tokenizer.json), which llama.cpp needs: upload the folder with its tokenizer files".into(),
        ));
    }
    let h = Hparams::read(&config, hf_arch)?;
    // Every layer has nine tensors: a count above what the file holds is not this model (and
    // must not size anything).
    if h.layers > tensors.len() {
        return Err(format!("config.json says {} layers but the model has {} tensors in all", h.layers, tensors.len()));
    }
    if permute && h.head_dim % 2 != 0 {
        return Err(format!("head_dim {} is odd; llama.cpp's RoPE layout needs it even", h.head_dim));
    }
    let mut names = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut blocks = vec![[false; 9]; h.layers];
    for &(name, shape) in tensors {
        if name.ends_with("rotary_emb.inv_freq") {
            skipped.push(name.to_owned());
            continue;
        }
        let (gguf, expect, heads) = map_name(name, &h, permute, &mut blocks)
            .ok_or_else(|| format!("tensor `{name}` has no llama.cpp name in architecture `{arch}` ({hf_arch})"))?;
        if let Some(expect) = expect {
            if shape != expect.as_slice() {
                return Err(format!(
                    "tensor `{name}` has shape {shape:?} where config.json ({}) gives {expect:?}; a step changed the model's shape, so config.json no longer describes it",
                    h.describe()
                ));
            }
        }
        names.insert(name.to_owned(), Rename { name: gguf, permute_heads: heads });
    }
    const PARTS: [&str; 9] = [
        "input_layernorm",
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "post_attention_layernorm",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ];
    for (b, seen) in blocks.iter().enumerate() {
        if let Some(k) = seen.iter().position(|s| !s) {
            return Err(format!(
                "layer {b} has no `model.layers.{b}.{}.weight`, which llama.cpp needs ({} layers in config.json)",
                PARTS[k], h.layers
            ));
        }
    }
    if !names.contains_key("model.embed_tokens.weight") {
        return Err("the model has no `model.embed_tokens.weight`, which llama.cpp needs".into());
    }
    let tok = tokenizer(files, h.vocab, arch == "llama")?;
    let mut metadata: Vec<(String, MetaValue)> = vec![
        ("general.architecture".into(), arch.into()),
        ("general.name".into(), config["_name_or_path"].as_str().unwrap_or("modelpress output").into()),
        ("general.quantization_version".into(), 2u32.into()),
    ];
    let key = |k: &str| format!("{arch}.{k}");
    metadata.push((key("block_count"), (h.layers as u32).into()));
    metadata.push((key("context_length"), (h.context as u32).into()));
    metadata.push((key("embedding_length"), (h.hidden as u32).into()));
    metadata.push((key("feed_forward_length"), (h.ff as u32).into()));
    metadata.push((key("attention.head_count"), (h.heads as u32).into()));
    metadata.push((key("attention.head_count_kv"), (h.kv_heads as u32).into()));
    metadata.push((key("rope.freq_base"), (h.rope_theta as f32).into()));
    metadata.push((key("attention.layer_norm_rms_epsilon"), (h.rms_eps as f32).into()));
    if config["head_dim"].is_u64() {
        metadata.push((key("attention.key_length"), (h.head_dim as u32).into()));
        metadata.push((key("attention.value_length"), (h.head_dim as u32).into()));
    }
    if arch == "llama" {
        metadata.push((key("vocab_size"), (h.vocab as u32).into()));
        metadata.push((key("rope.dimension_count"), (h.head_dim as u32).into()));
    }
    let rope_freqs = rope_scaling(&config, &h, arch, &mut metadata)?;
    let summary = format!(
        "a llama.cpp GGUF: architecture `{arch}` ({hf_arch}, {} layers), tokenizer `{}` with pre-tokenizer `{}`, {} tokens{}",
        h.layers,
        tok.model,
        tok.pre,
        tok.tokens.len(),
        if permute { ", Q/K rows permuted for llama.cpp's RoPE" } else { "" }
    );
    tok.write(&mut metadata);
    Ok(Conversion::Runnable(LlamaCppModel { arch, metadata, names, skipped, rope_freqs, summary }))
}

/// The hyperparameters llama.cpp needs, from `config.json`.
struct Hparams {
    layers: usize,
    hidden: usize,
    ff: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    rope_theta: f64,
    rms_eps: f64,
}

impl Hparams {
    fn read(c: &Value, hf_arch: &str) -> Result<Hparams, String> {
        let int = |k: &str| {
            c[k].as_u64()
                .filter(|&v| v > 0)
                .map(|v| v as usize)
                .ok_or_else(|| format!("config.json ({hf_arch}) has no positive integer `{k}`"))
        };
        let (hidden, heads) = (int("hidden_size")?, int("num_attention_heads")?);
        let head_dim = c["head_dim"].as_u64().map_or(hidden / heads, |v| v as usize);
        let kv_heads = match c["num_key_value_heads"].as_u64() {
            None => heads,
            Some(k) if k > 0 && heads % k as usize == 0 => k as usize,
            Some(k) => {
                return Err(format!(
                    "config.json ({hf_arch}): num_key_value_heads {k} does not divide num_attention_heads {heads}"
                ))
            }
        };
        if head_dim == 0 {
            return Err(format!("config.json ({hf_arch}): head_dim is 0"));
        }
        let rope_theta =
            c["rope_theta"].as_f64().or_else(|| c["rope_parameters"]["rope_theta"].as_f64()).unwrap_or(10000.0);
        Ok(Hparams {
            layers: int("num_hidden_layers")?,
            hidden,
            ff: int("intermediate_size")?,
            heads,
            kv_heads,
            head_dim,
            vocab: int("vocab_size")?,
            context: c["max_position_embeddings"].as_u64().unwrap_or(2048) as usize,
            rope_theta,
            rms_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        })
    }

    fn describe(&self) -> String {
        format!(
            "hidden_size {}, intermediate_size {}, {} heads of {}, {} key-value heads, vocab_size {}",
            self.hidden, self.ff, self.heads, self.head_dim, self.kv_heads, self.vocab
        )
    }
}

/// The GGUF name of a Hugging Face Llama/Qwen2 tensor, the shape `config.json` implies, and
/// the Q/K permutation's head count; marks the block parts seen.
#[allow(clippy::type_complexity)]
fn map_name(
    name: &str,
    h: &Hparams,
    permute: bool,
    blocks: &mut [[bool; 9]],
) -> Option<(String, Option<Vec<usize>>, Option<usize>)> {
    let (q, kv) = (h.heads * h.head_dim, h.kv_heads * h.head_dim);
    match name {
        "model.embed_tokens.weight" => return Some(("token_embd.weight".into(), Some(vec![h.vocab, h.hidden]), None)),
        "model.norm.weight" => return Some(("output_norm.weight".into(), Some(vec![h.hidden]), None)),
        "lm_head.weight" => return Some(("output.weight".into(), Some(vec![h.vocab, h.hidden]), None)),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (b, part) = rest.split_once('.')?;
    // `model.layers.01.` is not layer 1: only the canonical spelling maps.
    let spelled = b;
    let b: usize = b.parse().ok().filter(|&n: &usize| n < blocks.len() && n.to_string() == spelled)?;
    let (part, suffix) = part.rsplit_once('.')?;
    let bias = match suffix {
        "weight" => false,
        "bias" => true,
        _ => return None,
    };
    let (k, gguf, rows, cols, heads) = match part {
        "input_layernorm" => (0, "attn_norm", h.hidden, 0, None),
        "self_attn.q_proj" => (1, "attn_q", q, h.hidden, permute.then_some(h.heads)),
        "self_attn.k_proj" => (2, "attn_k", kv, h.hidden, permute.then_some(h.kv_heads)),
        "self_attn.v_proj" => (3, "attn_v", kv, h.hidden, None),
        "self_attn.o_proj" => (4, "attn_output", h.hidden, q, None),
        "post_attention_layernorm" => (5, "ffn_norm", h.hidden, 0, None),
        "mlp.gate_proj" => (6, "ffn_gate", h.ff, h.hidden, None),
        "mlp.up_proj" => (7, "ffn_up", h.ff, h.hidden, None),
        "mlp.down_proj" => (8, "ffn_down", h.hidden, h.ff, None),
        _ => return None,
    };
    let shape = if cols == 0 || bias { vec![rows] } else { vec![rows, cols] };
    if !bias {
        blocks[b][k] = true;
    }
    Some((format!("blk.{b}.{gguf}.{suffix}"), Some(shape), heads))
}

/// RoPE scaling keys (linear, yarn) or the llama3 `rope_freqs` factors, as the converter
/// writes them; unknown scaling types are refused (llama.cpp would run the model wrongly).
fn rope_scaling(
    c: &Value,
    h: &Hparams,
    arch: &str,
    metadata: &mut Vec<(String, MetaValue)>,
) -> Result<Option<Vec<f32>>, String> {
    let params = if c["rope_scaling"].is_object() { &c["rope_scaling"] } else { &c["rope_parameters"] };
    let kind = params["rope_type"].as_str().or_else(|| params["type"].as_str()).unwrap_or("default");
    let factor = params["factor"].as_f64();
    match (kind, factor) {
        ("default", _) => Ok(None),
        ("linear", Some(f)) => {
            metadata.push((format!("{arch}.rope.scaling.type"), "linear".into()));
            metadata.push((format!("{arch}.rope.scaling.factor"), (f as f32).into()));
            Ok(None)
        }
        ("yarn", Some(f)) => {
            let orig = params["original_max_position_embeddings"]
                .as_u64()
                .ok_or("config.json: yarn RoPE scaling without `original_max_position_embeddings`")?;
            metadata.push((format!("{arch}.rope.scaling.type"), "yarn".into()));
            metadata.push((format!("{arch}.rope.scaling.factor"), (f as f32).into()));
            metadata.push((format!("{arch}.rope.scaling.original_context_length"), (orig as u32).into()));
            Ok(None)
        }
        ("llama3", _) if arch == "llama" => {
            let get = |k: &str, d: f64| params[k].as_f64().unwrap_or(d);
            let (factor, low, high) = (get("factor", 8.0), get("low_freq_factor", 1.0), get("high_freq_factor", 4.0));
            let old = get("original_max_position_embeddings", 8192.0);
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            let dim = h.head_dim;
            // float32 as the converter computes them (torch.arange(...) / dim in float32).
            // As the converter computes them: torch float32 throughout (freqs, wavelen, smooth),
            // compared with Python floats.
            let (base, factor32) = (h.rope_theta as f32, factor as f32);
            let factors = (0..dim)
                .step_by(2)
                .map(|i| {
                    let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
                    let wavelen = 2.0f32 * std::f32::consts::PI / freq;
                    if (wavelen as f64) < high_wavelen {
                        1.0
                    } else if (wavelen as f64) > low_wavelen {
                        factor32
                    } else {
                        let smooth = (old as f32 / wavelen - low as f32) / (high as f32 - low as f32);
                        1.0 / ((1.0 - smooth) / factor32 + smooth)
                    }
                })
                .collect();
            Ok(Some(factors))
        }
        (other, _) => Err(format!(
            "config.json asks for RoPE scaling `{other}`, which ModelPress does not write for llama.cpp (default, linear, yarn and llama3 are covered)"
        )),
    }
}

/// The tokenizer keys: byte-level BPE (`gpt2`) or SentencePiece (`llama`).
struct Tokenizer {
    model: &'static str,
    pre: &'static str,
    tokens: Vec<String>,
    /// SentencePiece scores (`llama` only).
    scores: Option<Vec<f32>>,
    types: Vec<i32>,
    merges: Vec<String>,
    special: Vec<(&'static str, u32)>,
    add: Vec<(&'static str, bool)>,
    add_space_prefix: Option<bool>,
    chat_template: Option<String>,
}

/// llama.cpp's `llama_token_type`.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Pre-tokenizer definitions of `tokenizer.json` -> llama.cpp's `tokenizer.ggml.pre`. Each
/// regex is the one llama.cpp's `llama-vocab.cpp` reproduces for that name.
fn pre_tokenizer(pre: &Value) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |v: &Value, regex: bool| {
        v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex && v["add_prefix_space"] != true
    };
    let split =
        |v: &Value, pattern: &str| v["type"] == "Split" && v["pattern"]["Regex"] == pattern && v["invert"] != true;
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array().filter(|_| pre["type"] == "Sequence")?;
    match parts.as_slice() {
        [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b, true) => Some("smollm"),
        [s, b] if split(s, LLAMA3) && byte_level(b, false) => Some("llama-bpe"),
        [s, b] if split(s, QWEN2) && byte_level(b, false) => Some("qwen2"),
        _ => None,
    }
}

/// The tokenizer as the converter reads it: SentencePiece from `tokenizer.model` when the folder
/// has one (its `_set_vocab_sentencepiece`, tried first), else byte-level BPE from
/// `tokenizer.json` (`_set_vocab_gpt2`); then gguf-py's `SpecialVocab` for special ids, the
/// add-BOS/EOS flags and the chat template. `space_prefix`: whether `add_prefix_space` of
/// `tokenizer_config.json` is written (the converter's Llama class does, Qwen2's does not).
fn tokenizer(files: &ModelFiles, vocab_size: usize, space_prefix: bool) -> Result<Tokenizer, String> {
    let json = files.json("tokenizer.json").map_err(|e| e.to_string())?;
    let config = files.json("tokenizer_config.json").map_err(|e| e.to_string())?.unwrap_or(Value::Null);
    let added = json.as_ref().and_then(|j| j["added_tokens"].as_array().cloned()).unwrap_or_default();
    let (model, pre, tokens, scores, types, merges) = match files.path("tokenizer.model") {
        Some(path) => {
            let bytes = std::fs::read(path).map_err(|e| format!("reading tokenizer.model: {e}"))?;
            let (tokens, scores, types) = sentencepiece_vocab(&bytes, &config, files, vocab_size)?;
            ("llama", "default", tokens, Some(scores), types, Vec::new())
        }
        None => {
            let json = json.as_ref().ok_or("the model has no tokenizer.json")?;
            let (pre, tokens, types, merges) = bpe_vocab(json, &added, vocab_size)?;
            ("gpt2", pre, tokens, None, types, merges)
        }
    };
    let n_vocab = tokens.len();
    // gguf-py's SpecialVocab, step by step: the post-processor decides add_bos/add_eos and may
    // name the bos/eos tokens (a template's first and last special tokens), then
    // tokenizer_config.json's names resolve to ids through added_tokens, then config.json's ids
    // fill the rest (the first found wins).
    let mut tc = config.clone();
    let has_tc = tc.as_object().is_some_and(|m| !m.is_empty());
    let truthy = |v: &Value| !(v.is_null() || v == "" || v == false);
    if has_tc && !truthy(&tc["bos_token"]) && truthy(&tc["cls_token"]) {
        tc["bos_token"] = tc["cls_token"].clone();
    }
    if has_tc && !truthy(&tc["eos_token"]) && truthy(&tc["sep_token"]) {
        tc["eos_token"] = tc["sep_token"].clone();
    }
    let mut add: BTreeMap<&'static str, bool> = BTreeMap::new();
    let mut special_types: Vec<(&'static str, &'static str)> = vec![
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("sep", "seperator_token_id"),
        ("pad", "padding_token_id"),
        ("mask", "mask_token_id"),
    ];
    let post = json.as_ref().map_or(Value::Null, |j| j["post_processor"].clone());
    let processors = post["processors"].as_array().cloned().unwrap_or_else(|| vec![post.clone()]);
    for p in &processors {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                add.entry("add_bos_token").or_insert(false);
                add.entry("add_eos_token").or_insert(false);
            }
            Some("RobertaProcessing") => {
                add.insert("add_bos_token", true);
                add.insert("add_eos_token", true);
                add.insert("add_sep_token", true);
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                if single.len() < 2 {
                    continue;
                }
                if let Some(first) = single[0]["SpecialToken"]["id"].as_str().filter(|f| !f.is_empty()) {
                    let first_v = Value::from(first);
                    if !has_tc {
                        tc["bos_token"] = first_v.clone();
                    } else if first_v != tc["bos_token"] && first_v != tc["cls_token"] {
                        if !truthy(&tc["bos_token"]) {
                            tc["bos_token"] = first_v.clone();
                        }
                        if !truthy(&tc["cls_token"]) {
                            tc["cls_token"] = first_v.clone();
                        }
                    }
                    add.insert("add_bos_token", first_v == tc["bos_token"] || first_v == tc["cls_token"]);
                }
                if let Some(last) = single[single.len() - 1]["SpecialToken"]["id"].as_str().filter(|l| !l.is_empty()) {
                    let last_v = Value::from(last);
                    if has_tc && last_v != tc["eos_token"] {
                        // The template's last token is the eos; the configured one becomes eot.
                        special_types.push(("eot", "eot_token_id"));
                        tc["eot_token"] = tc["eos_token"].clone();
                    }
                    tc["eos_token"] = last_v;
                    add.insert("add_eos_token", true);
                }
            }
            _ => {}
        }
    }
    let model_config = files.json("config.json").ok().flatten().unwrap_or(Value::Null);
    let mut special = Vec::new();
    for (typ, key) in special_types {
        let from_tc = if has_tc {
            if let Some(v) = tc[format!("add_{typ}_token")].as_bool() {
                if let Some(k) = ["add_bos_token", "add_eos_token", "add_sep_token"]
                    .into_iter()
                    .find(|k| *k == format!("add_{typ}_token"))
                {
                    add.entry(k).or_insert(v);
                }
            }
            let entry = &tc[format!("{typ}_token")];
            let content = entry.as_str().or_else(|| entry["content"].as_str());
            content.and_then(|c| added.iter().find(|a| a["content"] == c)).and_then(|a| a["id"].as_u64())
        } else {
            None
        };
        let id =
            from_tc.filter(|&id| (id as usize) < n_vocab).or_else(|| model_config[format!("{typ}_token_id")].as_u64());
        if let Some(id) = id.filter(|&id| (id as usize) < n_vocab) {
            special.push((key, id as u32));
        }
    }
    let add: Vec<(&'static str, bool)> = add.into_iter().collect();
    let chat_template = match config["chat_template"].as_str() {
        Some(t) => Some(t.to_owned()),
        None => match files.path("chat_template.jinja") {
            Some(p) => Some(std::fs::read_to_string(p).map_err(|e| format!("reading chat_template.jinja: {e}"))?),
            None => None,
        },
    };
    let add_space_prefix = config["add_prefix_space"].as_bool().filter(|_| space_prefix);
    Ok(Tokenizer { model, pre, tokens, scores, types, merges, special, add, add_space_prefix, chat_template })
}

/// Tokens, types and merges of a byte-level BPE `tokenizer.json` (the converter's
/// `get_vocab_base`), padded to `vocab_size` with `[PAD{i}]` (unused).
#[allow(clippy::type_complexity)]
fn bpe_vocab(
    json: &Value,
    added: &[Value],
    vocab_size: usize,
) -> Result<(&'static str, Vec<String>, Vec<i32>, Vec<String>), String> {
    let model = &json["model"];
    if model["type"] != "BPE" || model["byte_fallback"] == true || json["pre_tokenizer"]["type"] == "Metaspace" {
        return Err(format!(
            "tokenizer.json holds a {} tokenizer{} and the folder has no tokenizer.model; ModelPress writes llama.cpp GGUF for byte-level BPE tokenizer.json and SentencePiece tokenizer.model",
            model["type"].as_str().unwrap_or("unknown"),
            if model["byte_fallback"] == true { " with byte fallback (SentencePiece style)" } else { "" }
        ));
    }
    let pre = pre_tokenizer(&json["pre_tokenizer"]).ok_or_else(|| {
        format!(
            "tokenizer.json's pre-tokenizer {} is not one llama.cpp is known to reproduce (covered: gpt-2, smollm, llama-bpe, qwen2); its output would tokenize differently",
            serde_json::to_string(&json["pre_tokenizer"]).unwrap_or_default().chars().take(300).collect::<String>()
        )
    })?;
    let mut by_id: BTreeMap<usize, (String, i32)> = BTreeMap::new();
    for (token, id) in model["vocab"].as_object().ok_or("tokenizer.json has no model.vocab")? {
        let id = id.as_u64().ok_or_else(|| format!("tokenizer.json: token {token:?} has no integer id"))? as usize;
        by_id.insert(id, (token.clone(), NORMAL));
    }
    for a in added {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        let ty = if a["special"] == true || looks_special(content) { CONTROL } else { USER_DEFINED };
        let content = if ty == USER_DEFINED { content.replace('\u{2581}', " ") } else { content.to_owned() };
        by_id.insert(id as usize, (content, ty));
    }
    if let Some((&max, _)) = by_id.last_key_value() {
        if max >= vocab_size {
            return Err(format!("tokenizer.json has token id {max}, beyond config.json's vocab_size {vocab_size}"));
        }
    }
    let (mut tokens, mut types) = (Vec::with_capacity(vocab_size), Vec::with_capacity(vocab_size));
    for i in 0..vocab_size {
        match by_id.remove(&i) {
            Some((t, ty)) => {
                tokens.push(t);
                types.push(ty);
            }
            None => {
                tokens.push(format!("[PAD{i}]"));
                types.push(UNUSED);
            }
        }
    }
    let merges = match model["merges"].as_array().map(Vec::as_slice) {
        Some(m) if m.first().is_some_and(Value::is_array) => m
            .iter()
            .map(|pair| {
                let part = |k: usize| pair[k].as_str().unwrap_or("").replace(' ', "\u{0120}");
                format!("{} {}", part(0), part(1))
            })
            .collect(),
        Some(m) => m.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        None => return Err("tokenizer.json has no model.merges, which a BPE tokenizer needs".into()),
    };
    Ok((pre, tokens, types, merges))
}

/// Tokens, scores and types of a SentencePiece `tokenizer.model`, as the converter's
/// `_create_vocab_sentencepiece` builds them: `vocab_size` entries (unfilled ones `[PAD{i}]`,
/// score -10000, unused), the model's pieces with their scores and types (user-defined pieces
/// count as normal, as `SentencePieceProcessor` reports them), then `added_tokens.json` and
/// `tokenizer_config.json`'s `added_tokens_decoder` (score -1000; control when special).
#[allow(clippy::type_complexity)]
fn sentencepiece_vocab(
    bytes: &[u8],
    config: &Value,
    files: &ModelFiles,
    vocab_size: usize,
) -> Result<(Vec<String>, Vec<f32>, Vec<i32>), String> {
    let pieces =
        sentencepiece_pieces(bytes).map_err(|e| format!("tokenizer.model is not a SentencePiece model: {e}"))?;
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![UNUSED; vocab_size];
    for (id, (piece, score, ty)) in pieces.into_iter().enumerate().take(vocab_size) {
        tokens[id] = piece;
        scores[id] = score;
        types[id] = match ty {
            2 => UNKNOWN,
            3 => CONTROL,
            5 => UNUSED,
            6 => BYTE,
            _ => NORMAL,
        };
    }
    if let Some(added) = files.json("added_tokens.json").map_err(|e| e.to_string())? {
        for (token, id) in added.as_object().into_iter().flatten() {
            if let Some(id) = id.as_u64().map(|v| v as usize).filter(|&id| id < vocab_size) {
                tokens[id] = token.clone();
                scores[id] = -1000.0;
                types[id] = USER_DEFINED;
            }
        }
    }
    let mut decoder: Vec<(usize, &Value)> = config["added_tokens_decoder"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.parse::<usize>().ok()?, v)))
        .filter(|&(id, _)| id < vocab_size)
        .collect();
    // Python dicts keep the file's order; serde_json's map sorts keys as strings.
    decoder.sort_by_key(|&(id, _)| id);
    for (id, data) in decoder {
        let Some(content) = data["content"].as_str() else { continue };
        if data["special"] == true || looks_special(content) {
            types[id] = CONTROL;
            tokens[id] = content.to_owned();
        } else {
            types[id] = USER_DEFINED;
            tokens[id] = content.replace('\u{2581}', " ");
        }
        scores[id] = -1000.0;
    }
    Ok((tokens, scores, types))
}

/// The pieces of a SentencePiece `ModelProto` (protobuf: field 1, repeated `SentencePiece`
/// {piece = 1: string, score = 2: float, type = 3: enum, NORMAL = 1 by default}); other
/// fields skipped.
fn sentencepiece_pieces(bytes: &[u8]) -> Result<Vec<(String, f32, i32)>, String> {
    struct Reader<'a>(&'a [u8]);
    impl<'a> Reader<'a> {
        fn varint(&mut self) -> Result<u64, String> {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let (&b, rest) = self.0.split_first().ok_or("truncated varint")?;
                self.0 = rest;
                v |= u64::from(b & 0x7f) << shift;
                if b & 0x80 == 0 {
                    return Ok(v);
                }
            }
            Err("varint longer than 10 bytes".into())
        }
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if n > self.0.len() {
                return Err(format!("a field of {n} bytes runs past the end"));
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(head)
        }
        /// (field number, wire type, payload for length-delimited and fixed fields).
        fn field(&mut self) -> Result<(u64, u64, &'a [u8], u64), String> {
            let key = self.varint()?;
            let (field, wire) = (key >> 3, key & 7);
            match wire {
                0 => Ok((field, wire, &[], self.varint()?)),
                1 => Ok((field, wire, self.take(8)?, 0)),
                2 => {
                    let n = usize::try_from(self.varint()?).map_err(|_| "length overflows")?;
                    Ok((field, wire, self.take(n)?, 0))
                }
                5 => Ok((field, wire, self.take(4)?, 0)),
                other => Err(format!("wire type {other} of field {field}")),
            }
        }
    }
    let mut pieces = Vec::new();
    let mut model = Reader(bytes);
    while !model.0.is_empty() {
        let (field, wire, payload, _) = model.field()?;
        if field != 1 || wire != 2 {
            continue;
        }
        let (mut piece, mut score, mut ty) = (String::new(), 0f32, 1i32);
        let mut r = Reader(payload);
        while !r.0.is_empty() {
            match r.field()? {
                (1, 2, p, _) => piece = String::from_utf8(p.to_vec()).map_err(|_| "a piece is not UTF-8")?,
                (2, 5, p, _) => score = f32::from_le_bytes(p.try_into().expect("4 bytes")),
                (3, 0, _, v) => ty = v as i32,
                _ => {}
            }
        }
        pieces.push((piece, score, ty));
    }
    if pieces.is_empty() {
        return Err("no pieces".into());
    }
    Ok(pieces)
}

/// gguf-py's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

impl Tokenizer {
    fn write(self, m: &mut Vec<(String, MetaValue)>) {
        if let Some(v) = self.add_space_prefix {
            m.push(("tokenizer.ggml.add_space_prefix".into(), v.into()));
        }
        m.push(("tokenizer.ggml.model".into(), self.model.into()));
        m.push(("tokenizer.ggml.pre".into(), self.pre.into()));
        m.push(("tokenizer.ggml.tokens".into(), MetaValue::StringArray(self.tokens)));
        if let Some(scores) = self.scores {
            m.push(("tokenizer.ggml.scores".into(), MetaValue::F32Array(scores)));
        }
        m.push(("tokenizer.ggml.token_type".into(), MetaValue::I32Array(self.types)));
        if !self.merges.is_empty() {
            m.push(("tokenizer.ggml.merges".into(), MetaValue::StringArray(self.merges)));
        }
        for (key, id) in self.special {
            m.push((format!("tokenizer.ggml.{key}"), id.into()));
        }
        for (key, v) in self.add {
            m.push((format!("tokenizer.ggml.{key}"), v.into()));
        }
        if let Some(t) = self.chat_template {
            m.push(("tokenizer.chat_template".into(), t.into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The permutation is the converter's reshape-swapaxes-reshape, checked directly: for
    /// heads of head_dim 4, rows [0 1 2 3] of each head become [0 2 1 3].
    #[test]
    fn permutation_matches_the_converter_and_inverts() {
        let (rows, heads) = (8, 2);
        let bytes: Vec<u8> = (0..rows as u8).flat_map(|r| [r, r]).collect();
        let mut out = Vec::new();
        permute_rows(&bytes, rows, heads, &mut out);
        let order: Vec<u8> = out.chunks(2).map(|c| c[0]).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
        // numpy: w.reshape(heads, 2, hd/2, cols).swapaxes(1, 2).reshape(w.shape), written out.
        let (hd, cols) = (rows / heads, 2);
        let w: Vec<f32> = (0..rows * cols).map(|v| v as f32).collect();
        let mut expected = vec![0f32; w.len()];
        for h in 0..heads {
            for a in 0..2 {
                for b in 0..hd / 2 {
                    for c in 0..cols {
                        // swapped[h][b][a][c] = w[h][a][b][c]
                        expected[((h * (hd / 2) + b) * 2 + a) * cols + c] = w[((h * 2 + a) * (hd / 2) + b) * cols + c];
                    }
                }
            }
        }
        let raw: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
        permute_rows(&raw, rows, heads, &mut out);
        let got: Vec<f32> = out.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(got, expected);
        let mut back = Vec::new();
        unpermute_rows(&got, rows, heads, &mut back);
        assert_eq!(back, w);
    }

    #[test]
    fn pre_tokenizers_are_recognised_by_definition() {
        let gpt2 = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        assert_eq!(pre_tokenizer(&gpt2), Some("gpt-2"));
        let smollm = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, gpt2]});
        assert_eq!(pre_tokenizer(&smollm), Some("smollm"));
        let llama3 = serde_json::json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
        assert_eq!(pre_tokenizer(&llama3), Some("llama-bpe"));
        let unknown = serde_json::json!({"type": "Whitespace"});
        assert_eq!(pre_tokenizer(&unknown), None);
    }

    /// A SentencePiece model written by hand in protobuf: pieces with scores and types, and a
    /// trainer-spec field (2) that is skipped.
    #[test]
    fn sentencepiece_pieces_are_read_from_the_protobuf() {
        fn piece(text: &str, score: f32, ty: Option<u8>) -> Vec<u8> {
            let mut p = vec![0x0a, text.len() as u8];
            p.extend_from_slice(text.as_bytes());
            p.push(0x15);
            p.extend_from_slice(&score.to_le_bytes());
            if let Some(t) = ty {
                p.extend_from_slice(&[0x18, t]);
            }
            let mut out = vec![0x0a, p.len() as u8];
            out.extend(p);
            out
        }
        let mut model = piece("<unk>", 0.0, Some(2));
        model.extend(piece("\u{2581}a", -1.5, None));
        model.extend([0x12, 0x02, 0x08, 0x01]);
        model.extend(piece("<0x41>", 0.0, Some(6)));
        let pieces = sentencepiece_pieces(&model).unwrap();
        assert_eq!(pieces, vec![("<unk>".into(), 0.0, 2), ("\u{2581}a".into(), -1.5, 1), ("<0x41>".into(), 0.0, 6)]);
        assert!(sentencepiece_pieces(&[0x0a, 0x40, 0x00]).unwrap_err().contains("runs past the end"));
        assert!(sentencepiece_pieces(b"{\"not\": \"protobuf\"}").is_err());
    }

    #[test]
    fn file_type_follows_the_most_common_matrix_type() {
        assert_eq!(file_type([GgufType::Q8_0, GgufType::Q8_0, GgufType::F32]), 7);
        assert_eq!(file_type([GgufType::Q4K, GgufType::Q4K, GgufType::Q6K]), 15);
        assert_eq!(file_type([]), 0);
    }
}
