//! Hugging Face model folders over HTTP (issue 11): a tiny Llama made here (random weights,
//! the small byte-level BPE tokenizer of `tests/fixtures/tiny_bpe`), sent as a streamed tar
//! body, sharded; its GGUF is llama.cpp's kind, checked by candle's `quantized_llama` against
//! candle's dense Llama on the same weights.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::helpers::*;

const HIDDEN: usize = 64;
const FF: usize = 128;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = HIDDEN / HEADS;
const LAYERS: usize = 2;
const VOCAB: usize = 320;

/// Logits of two implementations on the same F32 weights: the same math in another order.
const LOGITS_ATOL: f32 = 1e-4;

fn config() -> Value {
    json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": FF, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float32"
    })
}

/// The tensors of the tiny Llama: name -> (shape, values).
fn weights() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut t = BTreeMap::new();
    let mut seed = 1;
    let mut add = |name: String, shape: Vec<usize>, scale: f32| {
        let n = shape.iter().product();
        seed += 1;
        t.insert(name, (shape, values(n, seed, scale)));
    };
    let _ = &mut add;
    add("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN], 1.0);
    add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 0.2);
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        add(format!("{p}.self_attn.q_proj.weight"), vec![HEADS * HEAD_DIM, HIDDEN], 0.3);
        add(format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.3);
        add(format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * HEAD_DIM, HIDDEN], 0.2);
        add(format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * HEAD_DIM], 0.2);
        add(format!("{p}.mlp.gate_proj.weight"), vec![FF, HIDDEN], 0.2);
        add(format!("{p}.mlp.up_proj.weight"), vec![FF, HIDDEN], 0.2);
        add(format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FF], 0.2);
    }
    for l in 0..LAYERS {
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            let n = format!("model.layers.{l}.{norm}.weight");
            t.insert(n, (vec![HIDDEN], (0..HIDDEN).map(|i| 1.0 + 0.01 * i as f32).collect()));
        }
    }
    t.insert("model.norm.weight".into(), (vec![HIDDEN], vec![1.0; HIDDEN]));
    t
}

fn file_of(tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, names: &[&String]) -> Vec<u8> {
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> =
        names.iter().map(|n| (n.as_str(), tensors[*n].0.clone(), tensors[*n].1.clone())).collect();
    safetensors_f32(&list)
}

/// The folder as `save_pretrained` writes it: three shards and their index, config, tokenizer,
/// and files a folder has that are not kept.
fn write_folder(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let tensors = weights();
    let names: Vec<&String> = tensors.keys().collect();
    let mut map = serde_json::Map::new();
    for (k, chunk) in names.chunks(names.len().div_ceil(3)).enumerate() {
        let shard = format!("model-{:05}-of-00003.safetensors", k + 1);
        std::fs::write(dir.join(&shard), file_of(&tensors, chunk)).unwrap();
        for n in chunk {
            map.insert((*n).clone(), json!(shard));
        }
    }
    let index = json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("config.json"), config().to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new("tests/fixtures/tiny_bpe").join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("README.md"), "# tiny llama\n").unwrap();
    std::fs::create_dir(dir.join("original")).unwrap();
    std::fs::write(dir.join("original/params.json"), "{}").unwrap();
    tensors
}

fn tar_of(dir: &Path) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap()
}

async fn upload_tar(app: &TestApp, body: Vec<u8>) -> reqwest::Response {
    app.client
        .put(app.url("/v1/models?name=tiny-llama"))
        .header("content-type", "application/x-tar")
        .body(body)
        .send()
        .await
        .unwrap()
}

/// q/k rows as llama.cpp stores them: per head, [2, d/2] rows become [d/2, 2].
fn permuted(values: &[f32], rows: usize, heads: usize) -> Vec<f32> {
    let cols = values.len() / rows;
    let half = rows / heads / 2;
    let mut out = Vec::with_capacity(values.len());
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + j * half + i;
                out.extend_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[tokio::test]
async fn a_sharded_folder_uploads_as_tar_and_gives_a_gguf_llama_cpp_reads() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    let tensors = write_folder(dir.path());
    let res = upload_tar(&app, tar_of(dir.path())).await;
    assert_eq!(res.status(), 201);
    let model: Value = res.json().await.unwrap();
    let files: Vec<&str> = model["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(files, ["config.json", "tokenizer.json", "tokenizer_config.json"], "{model}");
    let mut ignored: Vec<&str> =
        model["ignored_files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect();
    ignored.sort();
    // As the folder names them, without tar's `./`.
    assert_eq!(ignored, ["README.md", "original/params.json"], "{model}");
    assert_eq!(model["tensor_count"], tensors.len());

    // The same model as one file (the order safetensors writes) is the same blob: shards merge
    // into exactly that file.
    let all: Vec<&String> = tensors.keys().collect();
    let single = app.upload_ok(file_of(&tensors, &all)).await;
    assert_eq!(app.get_json(&format!("/v1/models/{single}")).await["sha256"], model["sha256"]);
    assert_eq!(app.get_json(&format!("/v1/models/{}", model["id"].as_str().unwrap())).await["files"], model["files"]);

    // The plan says what the GGUF is.
    let id = model["id"].as_str().unwrap();
    let spec = json!({"model_id": id, "steps": [], "outputs": ["gguf", "safetensors"]});
    let plan = app.post_json("/v1/plans", &spec).await.json::<Value>().await.unwrap();
    let note = plan["outputs"][0]["note"].as_str().unwrap();
    assert!(note.contains("llama.cpp GGUF: architecture `llama`") && note.contains("pre-tokenizer `gpt-2`"), "{plan}");
    let (_, _, out) = run_job(&app, &spec).await;

    let gguf = &out["model.gguf"];
    let got = read_gguf(gguf);
    assert_eq!(got.len(), tensors.len());
    // Names, and the Q/K permutation computed here directly.
    let q = &tensors["model.layers.1.self_attn.q_proj.weight"].1;
    assert_eq!(got["blk.1.attn_q.weight"].1, permuted(q, HEADS * HEAD_DIM, HEADS));
    let k = &tensors["model.layers.0.self_attn.k_proj.weight"].1;
    assert_eq!(got["blk.0.attn_k.weight"].1, permuted(k, KV_HEADS * HEAD_DIM, KV_HEADS));
    assert_eq!(got["blk.0.attn_v.weight"].1, tensors["model.layers.0.self_attn.v_proj.weight"].1);
    assert_eq!(got["output.weight"].1, tensors["lm_head.weight"].1);
    let content = candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(gguf)).unwrap();
    let meta = |k: &str| content.metadata.get(k).unwrap_or_else(|| panic!("no {k}"));
    assert_eq!(meta("general.architecture").to_string().unwrap(), "llama");
    assert_eq!(meta("llama.attention.head_count_kv").to_u32().unwrap(), KV_HEADS as u32);
    assert_eq!(meta("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
    assert_eq!(meta("tokenizer.ggml.tokens").to_vec().unwrap().len(), VOCAB);

    // candle's quantized_llama (llama.cpp's layout and RoPE) on the GGUF gives the logits of
    // candle's Llama on the dense weights and config.json: names, permutation and
    // hyperparameters all line up.
    let device = candle_core::Device::Cpu;
    let tokens = candle_core::Tensor::new(&[[1u32, 17, 200, 5, 64, 99, 3, 250, 12, 7]], &device).unwrap();
    let mut quantized = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
        content,
        &mut std::io::Cursor::new(gguf),
        &device,
    )
    .unwrap();
    let from_gguf = quantized.forward(&tokens, 0).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let cfg: candle_transformers::models::llama::LlamaConfig = serde_json::from_value(config()).unwrap();
    let cfg = cfg.into_config(false);
    let vb = candle_nn::VarBuilder::from_buffered_safetensors(
        out["model.safetensors"].clone(),
        candle_core::DType::F32,
        &device,
    )
    .unwrap();
    let dense = candle_transformers::models::llama::Llama::load(vb, &cfg).unwrap();
    let mut cache =
        candle_transformers::models::llama::Cache::new(false, candle_core::DType::F32, &cfg, &device).unwrap();
    let from_dense = dense.forward(&tokens, 0, &mut cache).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let diff = from_gguf.iter().zip(&from_dense).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
    assert!(diff <= LOGITS_ATOL, "max |logit difference| {diff}");
    let spread = from_dense.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(spread > 0.1, "the logits say something ({spread})");

    // llama-quantize's Q4_K_M mix: by role and layer, then llama.cpp's fallback for rows of 64
    // (Q4_K -> Q5_0, Q6_K -> Q8_0; an output whose rows no k-quant divides is Q8_0).
    let spec = json!({"model_id": id, "steps": [{"op": "quantize", "gguf_mix": "Q4_K_M"}], "outputs": ["gguf"]});
    let (_, _, mixed) = run_job(&app, &spec).await;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&mixed["model.gguf"])).unwrap();
    let ty = |n: &str| format!("{:?}", content.tensor_infos[n].ggml_dtype);
    assert_eq!(ty("blk.0.attn_q.weight"), "Q5_0");
    assert_eq!(ty("blk.0.attn_v.weight"), "Q5_0");
    assert_eq!(ty("blk.1.attn_v.weight"), "Q8_0", "the last layer gets more bits");
    assert_eq!(ty("blk.1.ffn_down.weight"), "Q8_0");
    assert_eq!(ty("output.weight"), "Q8_0");
    assert_eq!(ty("token_embd.weight"), "Q5_0");
    assert_eq!(ty("blk.0.attn_norm.weight"), "F32");
    assert_eq!(content.metadata["general.file_type"].to_u32().unwrap(), 15);

    // The dense output folder carries the model's files: config.json as it was, the tokenizer.
    assert_eq!(serde_json::from_slice::<Value>(&out["config.json"]).unwrap(), config());
    assert!(out.contains_key("tokenizer.json") && out.contains_key("tokenizer_config.json"));
}

#[tokio::test]
async fn a_folder_missing_a_shard_or_sent_as_one_shard_is_refused_with_what_is_missing() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    std::fs::remove_file(dir.path().join("model-00002-of-00003.safetensors")).unwrap();
    let res = upload_tar(&app, tar_of(dir.path())).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "incomplete_checkpoint", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("model-00002-of-00003.safetensors"), "{p}");

    std::fs::remove_file(dir.path().join("model.safetensors.index.json")).unwrap();
    std::fs::remove_file(dir.path().join("model-00003-of-00003.safetensors")).unwrap();
    let res = upload_tar(&app, tar_of(dir.path())).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("model-00002-of-00003.safetensors, model-00003-of-00003"), "{p}");

    // Not a tar at all.
    let res = upload_tar(&app, small_model()).await;
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "invalid_tar");
    assert_eq!(staging_entries(&app.data_dir()), 0);
    assert_eq!(app.get_json("/v1/models").await["items"].as_array().unwrap().len(), 0);
}

#[tokio::test]
async fn an_unknown_pre_tokenizer_is_refused_at_the_gguf_output() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let path = dir.path().join("tokenizer.json");
    let mut tok: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tok["pre_tokenizer"] = json!({"type": "Whitespace"});
    std::fs::write(&path, tok.to_string()).unwrap();
    let res = upload_tar(&app, tar_of(dir.path())).await;
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let res = app.create_job(&json!({"model_id": id, "steps": [], "outputs": ["gguf"]})).await;
    assert_eq!(res.status(), 422);
    let p = res.json::<Value>().await.unwrap().to_string();
    assert!(p.contains("/outputs/0") && p.contains("pre-tokenizer") && p.contains("Whitespace"), "{p}");
}

#[tokio::test]
async fn a_llama3_style_post_processor_sets_add_bos_once_and_registered_models_keep_their_files() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    // Llama 3's shape: ByteLevel, then a template that puts BOS first.
    let path = dir.path().join("tokenizer.json");
    let mut tok: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    tok["post_processor"] = json!({"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        {"type": "TemplateProcessing",
         "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [], "special_tokens": {}}]});
    std::fs::write(&path, tok.to_string()).unwrap();
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": id, "steps": [], "outputs": ["gguf", "safetensors"], "register": true});
    let (job, _, out) = run_job(&app, &spec).await;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&out["model.gguf"])).unwrap();
    let add_bos = content.metadata.get("tokenizer.ggml.add_bos_token").and_then(|v| v.to_bool().ok());
    assert_eq!(add_bos, Some(true));
    assert_eq!(content.metadata.get("tokenizer.ggml.add_eos_token").and_then(|v| v.to_bool().ok()), Some(false));

    // The registered model carries the folder's files, so its next GGUF is llama.cpp's kind too.
    let registered = job["registered_model_id"].as_str().unwrap();
    let model = app.get_json(&format!("/v1/models/{registered}")).await;
    let files: Vec<&str> = model["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(files, ["config.json", "tokenizer.json", "tokenizer_config.json"], "{model}");
    let plan = app.post_json("/v1/plans", &json!({"model_id": registered, "steps": [], "outputs": ["gguf"]})).await;
    let plan: Value = plan.json().await.unwrap();
    assert!(plan["outputs"][0]["note"].as_str().unwrap().starts_with("a llama.cpp GGUF"), "{plan}");
}

#[tokio::test]
async fn a_folder_with_broken_json_or_an_impossible_config_is_refused_not_run() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    std::fs::write(dir.path().join("config.json"), "{\"architectures\": [").unwrap();
    let res = upload_tar(&app, tar_of(dir.path())).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("`config.json` is not valid JSON"), "{p}");
    assert_eq!(staging_entries(&app.data_dir()), 0);

    // A layer count no allocation could hold: the plan refuses it, the server lives on.
    let mut config = config();
    config["num_hidden_layers"] = json!(1_000_000_000_000u64);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let res = app.create_job(&json!({"model_id": id, "steps": [], "outputs": ["gguf"]})).await;
    assert_eq!(res.status(), 422);
    assert!(res.text().await.unwrap().contains("1000000000000 layers"));
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn a_language_model_is_evaluated_on_text_through_the_gguf_it_downloads() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let text = "The quick brown fox jumps over the lazy dog. A model is a folder, not only a file. ".repeat(8);
    let res = app
        .client
        .post(app.url("/v1/datasets?name=corpus.txt"))
        .header("content-type", "text/plain; charset=utf-8")
        .body(text.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let data: Value = res.json().await.unwrap();
    assert_eq!(data["tensors"][0]["name"], "text");
    assert_eq!(data["tensors"][0]["shape"][0], text.len());
    let data = data["id"].as_str().unwrap();

    let mut kl = Vec::new();
    for mix in ["Q8_0", "Q4_0"] {
        let spec = json!({"model_id": id, "dataset_id": data, "evaluate": {"tokens": 96, "context": 48},
                          "steps": [{"op": "quantize", "gguf_mix": mix}], "outputs": ["gguf"]});
        let plan = app.post_json("/v1/plans", &spec).await.json::<Value>().await.unwrap();
        assert_eq!(plan["text_evaluation"]["artifact"], "model.gguf", "{plan}");
        let (_, report, _) = run_job(&app, &spec).await;
        let e = &report["text_evaluation"];
        assert_eq!(e["artifact"], "model.gguf");
        assert_eq!(e["tokens"], 96);
        assert_eq!(e["predictions"], 94, "two chunks of 48 predict 47 next tokens each");
        let (before, after) = (e["perplexity_before"].as_f64().unwrap(), e["perplexity_after"].as_f64().unwrap());
        // Random weights: perplexity is about the vocabulary size, and quantization moves it little.
        assert!(before > 50.0 && (after / before - 1.0).abs() < 0.2, "{e}");
        assert!(e["top1_agreement"].as_f64().unwrap() > 0.5, "{e}");
        kl.push(e["kl_mean"].as_f64().unwrap());
    }
    assert!(kl[0] > 0.0 && kl[0] < kl[1], "Q8_0 is closer to the original than Q4_0: {kl:?}");

    // Not UTF-8, or no text in the dataset: refused with the reason.
    let res = app
        .client
        .post(app.url("/v1/datasets"))
        .header("content-type", "text/plain")
        .body(vec![0xffu8, 0xfe])
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    let res = app.create_job(&json!({"model_id": id, "evaluate": true, "steps": [], "outputs": ["gguf"]})).await;
    assert_eq!(res.status(), 422);
    let body = res.text().await.unwrap();
    assert!(body.contains("dataset"), "{body}");
}

/// Every tensor of the safetensors files `names` among `out`, as name -> (dtype, shape, bytes).
fn raw_tensors<'a>(
    out: &BTreeMap<String, Vec<u8>>,
    names: impl Iterator<Item = &'a String>,
) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut all = BTreeMap::new();
    for n in names {
        let st = safetensors::SafeTensors::deserialize(&out[n]).unwrap();
        for (t, v) in st.tensors() {
            let old = all.insert(t.clone(), (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()));
            assert!(old.is_none(), "`{t}` is in two files");
        }
    }
    all
}

#[tokio::test]
async fn outputs_over_max_shard_size_are_sharded_as_transformers_shards_them() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    let weights = write_folder(dir.path());
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let text = "The quick brown fox jumps over the lazy dog. ".repeat(8);
    let res = app.client.post(app.url("/v1/datasets")).header("content-type", "text/plain").body(text).send().await;
    let data = res.unwrap().json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let steps = json!([{"op": "quantize", "bits": 8, "granularity": "channel", "symmetric": true}]);
    let outputs = json!(["safetensors", "compressed-tensors"]);

    // A bad size names its field.
    let bad = json!({"model_id": id, "steps": steps, "outputs": outputs, "max_shard_size": "5 parsecs"});
    let res = app.create_job(&bad).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["errors"][0]["pointer"], "/max_shard_size", "{p}");

    let spec = json!({"model_id": id, "dataset_id": data, "steps": steps, "outputs": outputs,
                      "max_shard_size": "100KB", "register": true, "evaluate": {"tokens": 32, "context": 16}});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    assert_eq!(plan["outputs"][0]["artifact"], "model.safetensors.index.json", "{plan}");
    assert_eq!(plan["text_evaluation"]["artifact"], "model.safetensors.index.json", "{plan}");
    let shards = plan["outputs"][0]["shards"].as_u64().unwrap() as usize;
    assert!(shards >= 4, "{plan}");
    let (job, report, out) = run_job(&app, &spec).await;
    assert!(report["text_evaluation"]["perplexity_after"].as_f64().unwrap() > 1.0, "{report}");

    // Shards named and mapped as transformers writes them, each within the limit unless one
    // tensor alone is larger, together holding every tensor once, byte for byte what the
    // unsharded job writes.
    let index: Value = serde_json::from_slice(&out["model.safetensors.index.json"]).unwrap();
    let names: Vec<String> = (1..=shards).map(|k| format!("model-{k:05}-of-{shards:05}.safetensors")).collect();
    let mut total = 0;
    for n in &names {
        let st = safetensors::SafeTensors::deserialize(&out[n]).unwrap();
        let size: usize = st.tensors().iter().map(|(_, v)| v.data().len()).sum();
        assert!(size <= 100_000 || st.len() == 1, "{n}: {size} bytes");
        assert!(st.names().iter().all(|t| index["weight_map"][*t] == n.as_str()), "{n}");
        total += size;
    }
    assert_eq!(index["metadata"]["total_size"], total);
    assert!(!out.contains_key("model.safetensors"));
    let sharded = raw_tensors(&out, names.iter());
    assert_eq!(sharded.keys().collect::<Vec<_>>(), weights.keys().collect::<Vec<_>>());
    let whole = json!({"model_id": id, "steps": steps, "outputs": outputs});
    let (_, _, single) = run_job(&app, &whole).await;
    assert_eq!(sharded, raw_tensors(&single, [String::from("model.safetensors")].iter()));

    // compressed-tensors: its own index beside its config; the same packed tensors.
    let ct_index: Value = serde_json::from_slice(&out["compressed-tensors/model.safetensors.index.json"]).unwrap();
    let ct_files: std::collections::BTreeSet<String> = ct_index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| format!("compressed-tensors/{}", v.as_str().unwrap()))
        .collect();
    assert!(ct_files.len() > 1 && out.contains_key("compressed-tensors/config.json"));
    assert_eq!(
        raw_tensors(&out, ct_files.iter()),
        raw_tensors(&single, [String::from("compressed-tensors/model.safetensors")].iter())
    );

    // Registering stores the shards as the one file a model is.
    let registered = job["registered_model_id"].as_str().unwrap();
    let model = app.get_json(&format!("/v1/models/{registered}")).await;
    assert_eq!(model["tensors"].as_array().unwrap().len(), weights.len(), "{model}");
    let file = app.download(&format!("/v1/models/{registered}/file")).await;
    assert_eq!(raw_tensors(&[("m".to_string(), file)].into(), [String::from("m")].iter()), sharded);
}

/// A tiny BERT folder as transformers' `BertModel.save_pretrained` names it (random weights,
/// the byte-level BPE tokenizer of `tests/fixtures/tiny_bpe`).
fn write_bert_folder(dir: &Path) {
    let config = json!({
        "architectures": ["BertModel"], "model_type": "bert", "vocab_size": VOCAB, "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": FF,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 128, "type_vocab_size": 2, "initializer_range": 0.02,
        "layer_norm_eps": 1e-12, "pad_token_id": 0, "torch_dtype": "float32"
    });
    let mut t: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut seed = 100;
    let mut add = |name: String, shape: Vec<usize>, scale: f32| {
        seed += 1;
        let n = shape.iter().product();
        let v = if name.ends_with("LayerNorm.weight") { vec![1.0; n] } else { values(n, seed, scale) };
        t.push((name, shape, v));
    };
    add("embeddings.word_embeddings.weight".into(), vec![VOCAB, HIDDEN], 1.0);
    add("embeddings.position_embeddings.weight".into(), vec![128, HIDDEN], 0.2);
    add("embeddings.token_type_embeddings.weight".into(), vec![2, HIDDEN], 0.2);
    add("embeddings.LayerNorm.weight".into(), vec![HIDDEN], 0.0);
    add("embeddings.LayerNorm.bias".into(), vec![HIDDEN], 0.01);
    for l in 0..LAYERS {
        let p = format!("encoder.layer.{l}");
        for m in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"] {
            add(format!("{p}.{m}.weight"), vec![HIDDEN, HIDDEN], 0.2);
            add(format!("{p}.{m}.bias"), vec![HIDDEN], 0.01);
        }
        add(format!("{p}.intermediate.dense.weight"), vec![FF, HIDDEN], 0.2);
        add(format!("{p}.intermediate.dense.bias"), vec![FF], 0.01);
        add(format!("{p}.output.dense.weight"), vec![HIDDEN, FF], 0.2);
        add(format!("{p}.output.dense.bias"), vec![HIDDEN], 0.01);
        for n in ["attention.output.LayerNorm", "output.LayerNorm"] {
            add(format!("{p}.{n}.weight"), vec![HIDDEN], 0.0);
            add(format!("{p}.{n}.bias"), vec![HIDDEN], 0.01);
        }
    }
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> =
        t.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    std::fs::write(dir.join("model.safetensors"), safetensors_f32(&list)).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::copy("tests/fixtures/tiny_bpe/tokenizer.json", dir.join("tokenizer.json")).unwrap();
}

#[tokio::test]
async fn a_bert_encoder_is_evaluated_by_its_embeddings_and_neighbours() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    write_bert_folder(dir.path());
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let lines = [
        "The cat sat on the mat.",
        "A dog barked at the mailman.",
        "Stocks fell sharply on Monday.",
        "The recipe needs two eggs and flour.",
        "Rain is expected over the weekend.",
        "She plays the violin every night.",
        "The server answered with a 404.",
        "Compilers turn source code into machine code.",
        "He ran the marathon in three hours.",
        "The museum opens at nine.",
        "Quantized weights take less memory.",
        "Birds migrate south in the autumn.",
    ];
    let text = lines.join("\n\n");
    let res = app.client.post(app.url("/v1/datasets")).header("content-type", "text/plain").body(text).send().await;
    let data = res.unwrap().json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    // The evaluation runs the dense output: without it, refused with the reason.
    let steps8 = json!([{"op": "quantize", "bits": 8, "granularity": "channel", "symmetric": true}]);
    let no_dense =
        json!({"model_id": id, "dataset_id": data, "evaluate": {}, "steps": steps8, "outputs": ["compressed-tensors"]});
    let res = app.create_job(&no_dense).await;
    assert_eq!(res.status(), 422);
    assert!(res.text().await.unwrap().contains("`safetensors` output"));

    let mut cosines = Vec::new();
    for steps in [steps8, json!([{"op": "quantize", "bits": 2, "granularity": "group", "group_size": 32}])] {
        let spec = json!({"model_id": id, "dataset_id": data, "evaluate": {"context": 16}, "steps": steps,
                          "outputs": ["safetensors", "compressed-tensors"]});
        let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
        assert_eq!(plan["text_evaluation"]["model"], "encoder", "{plan}");
        let (_, report, out) = run_job(&app, &spec).await;
        let e = &report["embedding_evaluation"];
        assert_eq!(e["passages"], lines.len(), "{e}");
        assert_eq!(e["artifact"], "model.safetensors");
        assert!(e["context"].as_u64().unwrap() <= 16, "{e}");
        let agreement = e["neighbour_agreement"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&agreement), "{e}");
        assert!(e["cosine_min"].as_f64().unwrap() <= e["cosine_mean"].as_f64().unwrap());
        cosines.push((e["cosine_mean"].as_f64().unwrap(), e["token_cosine_mean"].as_f64().unwrap(), agreement));
        assert!(report.get("text_evaluation").is_none());
        assert!(String::from_utf8_lossy(&out["report.html"]).contains("nearest-neighbour agreement"));
    }
    let ((c8, t8, a8), (c2, t2, _)) = (cosines[0], cosines[1]);
    assert!(c8 > 0.999 && t8 > 0.99 && a8 >= 0.9, "int8 keeps the embeddings: {cosines:?}");
    assert!(c2 < c8 && t2 < t8, "2-bit moves them more than 8-bit: {cosines:?}");
}

/// The top-level files of the folder a draft takes (all but README.md), by name.
fn draft_files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_type().unwrap().is_file() && e.file_name() != "README.md")
        .map(|e| (e.file_name().into_string().unwrap(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Opens a draft and sends it every file of the folder but `withheld`, whose bytes it returns.
async fn draft_without(app: &TestApp, folder: &Path, withheld: &str) -> (String, Vec<u8>) {
    let id = app.create_draft_ok(None).await;
    let mut files = draft_files(folder);
    let kept_back = files.remove(withheld).unwrap();
    for (name, bytes) in &files {
        assert_eq!(app.put_draft_file(None, &id, name, bytes.clone()).await.status(), 201, "{name}");
    }
    (id, kept_back)
}

/// Commits the draft (201) and checks it is the model the tar upload of `folder` makes.
async fn commit_matches_tar(app: &TestApp, id: &str, folder: &Path) -> Value {
    let res = app.commit_draft(None, id).await;
    assert_eq!(res.status(), 201);
    let model: Value = res.json().await.unwrap();
    let from_tar = upload_tar(app, tar_of(folder)).await.json::<Value>().await.unwrap();
    assert_eq!(model["sha256"], from_tar["sha256"], "the same merged file");
    assert_eq!(model["files"], from_tar["files"], "the same companion files");
    model
}

#[tokio::test]
async fn a_sharded_folder_sent_file_by_file_and_committed_is_the_model_its_tar_upload_makes() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let res = app.create_draft(None).await;
    assert_eq!(res.status(), 201);
    assert!(res.headers()["location"].to_str().unwrap().starts_with("/v1/models/drafts/"));
    let draft: Value = res.json().await.unwrap();
    assert_eq!((draft["name"].as_str(), draft["files"].as_array().map(Vec::len)), (Some("tiny-llama"), Some(0)));
    assert!(draft["expires_at"].as_str().unwrap() > draft["created_at"].as_str().unwrap(), "{draft}");
    let id = draft["id"].as_str().unwrap();

    let files = draft_files(dir.path());
    assert_eq!(files.len(), 7, "three shards, the index, config and two tokenizer files");
    for (name, bytes) in &files {
        let res = app.put_draft_file(None, id, name, bytes.clone()).await;
        assert_eq!(res.status(), 201, "{name}");
        let got: Value = res.json().await.unwrap();
        assert_eq!(got, json!({"name": name, "sha256": sha256_hex(bytes), "bytes": bytes.len()}));
    }
    let listed = app.get_draft(None, id).await.json::<Value>().await.unwrap();
    let names: Vec<&str> = listed["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, files.keys().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(listed["bytes"], files.values().map(Vec::len).sum::<usize>());

    let model = commit_matches_tar(&app, id, dir.path()).await;
    assert_eq!((model["name"].as_str(), model["tensor_count"].as_u64()), (Some("tiny-llama"), Some(21)));
    let stored = app.get_json(&format!("/v1/models/{}", model["id"].as_str().unwrap())).await;
    assert_eq!(stored["files"], model["files"]);

    // Committed, the draft is gone with its directory; nothing is left in staging.
    assert_eq!(problem(app.get_draft(None, id).await, 404).await["code"], "not_found");
    assert_eq!(std::fs::read_dir(app.data_dir().join("drafts")).unwrap().count(), 0);
    assert_eq!(staging_entries(&app.data_dir()), 0);
}

#[tokio::test]
async fn a_commit_missing_a_shard_names_it_and_keeps_the_draft_until_the_shard_follows() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let missing = "model-00002-of-00003.safetensors";
    let (id, shard) = draft_without(&app, dir.path(), missing).await;
    let p = problem(app.commit_draft(None, &id).await, 422).await;
    assert_eq!(p["code"], "incomplete_checkpoint", "{p}");
    assert!(p["detail"].as_str().unwrap().contains(missing), "{p}");
    assert_eq!(app.get_draft(None, &id).await.json::<Value>().await.unwrap()["files"].as_array().unwrap().len(), 6);
    assert_eq!(staging_entries(&app.data_dir()), 0, "the refused commit leaves no merge behind");

    // The wrong shard first (the third's tensors under the second's name), then the right one
    // sent again under the same name replaces it.
    let wrong = std::fs::read(dir.path().join("model-00003-of-00003.safetensors")).unwrap();
    assert_eq!(app.put_draft_file(None, &id, missing, wrong).await.status(), 201);
    let p = problem(app.commit_draft(None, &id).await, 422).await;
    assert_eq!(p["code"], "invalid_model_folder", "{p}");
    assert!(p["detail"].as_str().unwrap().contains(missing), "{p}");
    let res = app.put_draft_file(None, &id, missing, shard.clone()).await;
    assert_eq!(res.status(), 200, "a file sent again replaces the first");
    assert_eq!(res.json::<Value>().await.unwrap()["sha256"], sha256_hex(&shard));
    commit_matches_tar(&app, &id, dir.path()).await;
}

#[tokio::test]
async fn files_a_folder_does_not_keep_and_files_that_are_not_safetensors_are_refused_naming_them() {
    let app = spawn_app(0).await;
    let id = app.create_draft_ok(None).await;
    let p = problem(app.put_draft_file(None, &id, "README.md", b"# hi".to_vec()).await, 422).await;
    assert_eq!((p["code"].as_str(), p["pointer"].as_str()), (Some("unwanted_file"), Some("/files/README.md")), "{p}");
    assert!(p["detail"].as_str().unwrap().starts_with("`README.md` is not a file a model keeps"), "{p}");
    let p = problem(app.put_draft_file(None, &id, "original%2Fparams.json", b"{}".to_vec()).await, 422).await;
    assert_eq!(p["pointer"], "/files/original~1params.json", "{p}");
    let p = problem(app.put_draft_file(None, &id, "model.safetensors", b"PK\x03\x04 a zip".to_vec()).await, 415).await;
    assert_eq!(p["code"], "not_safetensors");
    // A folder without weights, and a folder of two unindexed files, are refused at commit.
    app.put_draft_file(None, &id, "config.json", config().to_string().into_bytes()).await;
    let p = problem(app.commit_draft(None, &id).await, 422).await;
    assert_eq!(p["code"], "invalid_model_folder", "{p}");
    for name in ["a.safetensors", "b.safetensors"] {
        assert_eq!(app.put_draft_file(None, &id, name, small_model()).await.status(), 201);
    }
    let p = problem(app.commit_draft(None, &id).await, 422).await;
    assert!(p["detail"].as_str().unwrap().contains("a.safetensors, b.safetensors"), "{p}");
    assert_eq!(app.get_draft(None, &id).await.json::<Value>().await.unwrap()["files"].as_array().unwrap().len(), 3);
    let p = problem(app.put_draft_file(None, "not-a-uuid", "config.json", b"{}".to_vec()).await, 400).await;
    assert_eq!(p["code"], "invalid_id");
    assert_eq!(app.get("/healthz").await.status(), 200);
}

#[tokio::test]
async fn another_principal_can_neither_see_nor_fill_nor_commit_a_draft_and_the_owner_can_delete_it() {
    let app = spawn_app_with(0, |s| {
        s.storage.max_drafts_per_principal = 1;
        s.storage.max_stored_bytes_per_principal = Some(50_000);
    })
    .await;
    let alice = crate::auth::create_key_cli(&app, "alice", "write");
    let bob = crate::auth::create_key_cli(&app, "bob", "write");
    let id = app.create_draft_ok(Some(&alice)).await;
    let p = problem(app.create_draft(Some(&alice)).await, 409).await;
    assert_eq!(p["code"], "too_many_drafts", "{p}");
    let config = config().to_string().into_bytes();
    assert_eq!(app.put_draft_file(Some(&alice), &id, "config.json", config.clone()).await.status(), 201);

    for res in [
        app.get_draft(Some(&bob), &id).await,
        app.put_draft_file(Some(&bob), &id, "config.json", config.clone()).await,
        app.commit_draft(Some(&bob), &id).await,
        app.delete_draft(Some(&bob), &id).await,
    ] {
        assert_eq!(problem(res, 404).await["code"], "not_found");
    }
    let draft = app.get_draft(Some(&alice), &id).await.json::<Value>().await.unwrap();
    assert_eq!(draft["files"][0]["sha256"], sha256_hex(&config), "bob's PUT changed nothing");
    // Each lists only their own drafts: a lost id is found again, another's never shows.
    let mine = app.list_drafts(Some(&alice)).await.json::<Value>().await.unwrap();
    assert_eq!(mine.as_array().unwrap().len(), 1, "{mine}");
    assert_eq!(mine[0]["id"], id.as_str());
    assert_eq!(mine[0]["files"][0]["name"], "config.json");
    assert_eq!(app.list_drafts(Some(&bob)).await.json::<Value>().await.unwrap(), json!([]));

    // Draft files count toward the owner's storage quota.
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let files = draft_files(dir.path());
    let shard = files["model-00001-of-00003.safetensors"].clone();
    assert!(shard.len() > 50_000);
    let p = problem(app.put_draft_file(Some(&alice), &id, "model-00001-of-00003.safetensors", shard).await, 413).await;
    assert_eq!(p["code"], "storage_quota_exceeded", "{p}");

    assert_eq!(app.delete_draft(Some(&alice), &id).await.status(), 204);
    assert_eq!(problem(app.get_draft(Some(&alice), &id).await, 404).await["code"], "not_found");
    assert!(!app.data_dir().join("drafts").join(&id).exists());
    assert_eq!(app.create_draft(Some(&alice)).await.status(), 201, "a deleted draft frees its place");
}

#[tokio::test]
async fn the_same_file_sent_twice_at_once_ends_as_one_of_them_and_a_draft_expires() {
    let app = spawn_app_with(0, |s| s.storage.draft_expiry_secs = 2).await;
    let id = app.create_draft_ok(None).await;
    let mut one = config();
    one["hidden_size"] = json!(1);
    let bodies = [one.to_string().into_bytes(), config().to_string().into_bytes()];
    let (a, b) = tokio::join!(
        app.put_draft_file(None, &id, "config.json", bodies[0].clone()),
        app.put_draft_file(None, &id, "config.json", bodies[1].clone()),
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 201]);
    let listed = app.get_draft(None, &id).await.json::<Value>().await.unwrap();
    let sha = listed["files"][0]["sha256"].as_str().unwrap().to_owned();
    // Draft files are stored under their hash; the replaced one is gone.
    let dir = app.data_dir().join("drafts").join(&id);
    let on_disk = std::fs::read(dir.join(&sha)).unwrap();
    assert_eq!(sha256_hex(&on_disk), sha, "the row names the file that is there");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "only the file the row names stays");
    assert!(bodies.iter().any(|b| sha256_hex(b) == sha));

    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(problem(app.get_draft(None, &id).await, 404).await["code"], "not_found");
    assert_eq!(problem(app.commit_draft(None, &id).await, 404).await["code"], "not_found");
}

#[tokio::test]
async fn a_draft_outlives_a_restart_that_empties_staging_and_is_committed_after_it() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let (id, last) = draft_without(&app, dir.path(), "model-00003-of-00003.safetensors").await;
    let data = app.stop().await;

    let app = spawn_app_with(0, |s| s.storage.data_dir = data.path().to_path_buf()).await;
    let draft = app.get_draft(None, &id).await.json::<Value>().await.unwrap();
    assert_eq!(draft["files"].as_array().unwrap().len(), 6, "{draft}");
    assert_eq!(app.put_draft_file(None, &id, "model-00003-of-00003.safetensors", last).await.status(), 201);
    commit_matches_tar(&app, &id, dir.path()).await;
    drop(data);
}

#[tokio::test]
async fn a_file_sent_again_while_the_draft_commits_never_changes_what_is_merged() {
    let app = spawn_app(0).await;
    let dir = tempfile::tempdir().unwrap();
    write_folder(dir.path());
    let shard = "model-00001-of-00003.safetensors";
    let (id, bytes) = draft_without(&app, dir.path(), shard).await;
    assert_eq!(app.put_draft_file(None, &id, shard, bytes.clone()).await.status(), 201);
    // The same tensors with other values: a valid replacement the merge must take whole or not
    // at all.
    let negated: Vec<(String, Vec<usize>, Vec<f32>)> = read_f32_tensors(&bytes)
        .into_iter()
        .map(|(n, (shape, v))| (n, shape, v.iter().map(|x| -x).collect()))
        .collect();
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> =
        negated.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    let other = safetensors_f32(&list);
    let original = upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap();
    std::fs::write(dir.path().join(shard), &other).unwrap();
    let modified = upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap();
    assert_ne!(original["sha256"], modified["sha256"]);
    // Before the commit takes the draft (200: the commit merges the new shard), during it
    // (409), or after it (404: the commit merged the old one): never a file moved into a folder
    // being merged.
    let (commit, put) = tokio::join!(app.commit_draft(None, &id), app.put_draft_file(None, &id, shard, other));
    let put_status = put.status().as_u16();
    assert!([200, 404, 409].contains(&put_status), "{}", put.text().await.unwrap());
    assert_eq!(commit.status(), 201);
    let model: Value = commit.json().await.unwrap();
    let want = if put_status == 200 { &modified } else { &original };
    assert_eq!(model["sha256"], want["sha256"], "PUT answered {put_status}");
    assert_eq!(staging_entries(&app.data_dir()), 0);
}

/// The tiny Llama's weights as a Qwen2: q/k/v biases, embeddings tied to the output (no
/// `lm_head`), a config as transformers 5 writes it (`rope_parameters`, `sliding_window` null).
fn write_qwen2_folder(dir: &Path) {
    let mut tensors = weights();
    tensors.remove("lm_head.weight");
    let mut seed = 500;
    for l in 0..LAYERS {
        for (m, n) in [("q_proj", HEADS * HEAD_DIM), ("k_proj", KV_HEADS * HEAD_DIM), ("v_proj", KV_HEADS * HEAD_DIM)] {
            seed += 1;
            tensors.insert(format!("model.layers.{l}.self_attn.{m}.bias"), (vec![n], values(n, seed, 0.1)));
        }
    }
    let names: Vec<&String> = tensors.keys().collect();
    std::fs::write(dir.join("model.safetensors"), file_of(&tensors, &names)).unwrap();
    let mut config = config();
    config["architectures"] = json!(["Qwen2ForCausalLM"]);
    config["model_type"] = json!("qwen2");
    config["tie_word_embeddings"] = json!(true);
    config["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1_000_000.0});
    config.as_object_mut().unwrap().remove("rope_theta");
    config["sliding_window"] = Value::Null;
    config["use_sliding_window"] = json!(false);
    config["max_window_layers"] = json!(LAYERS);
    config["hidden_act"] = json!("silu");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(Path::new("tests/fixtures/tiny_bpe").join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test]
async fn a_qwen2_is_evaluated_through_the_gguf_it_downloads() {
    let app = spawn_app(1).await;
    let dir = tempfile::tempdir().unwrap();
    write_qwen2_folder(dir.path());
    let id =
        upload_tar(&app, tar_of(dir.path())).await.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let text = "The quick brown fox jumps over the lazy dog. A model is a folder, not only a file. ".repeat(8);
    let res = app.client.post(app.url("/v1/datasets")).header("content-type", "text/plain").body(text).send().await;
    let data = res.unwrap().json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut kl = Vec::new();
    for (mix, outputs) in [("Q8_0", json!(["gguf"])), ("Q4_0", json!(["gguf"])), ("Q8_0", json!(["safetensors"]))] {
        let spec = json!({"model_id": id, "dataset_id": data, "evaluate": {"tokens": 64, "context": 32},
                          "steps": [{"op": "quantize", "gguf_mix": mix}], "outputs": outputs});
        let plan = app.post_json("/v1/plans", &spec).await.json::<Value>().await.unwrap();
        assert!(plan["refusals"].as_array().is_none_or(|r| r.is_empty()), "{plan}");
        let (_, report, _) = run_job(&app, &spec).await;
        let e = &report["text_evaluation"];
        assert_eq!(e["predictions"], 62, "{e}");
        let (before, after) = (e["perplexity_before"].as_f64().unwrap(), e["perplexity_after"].as_f64().unwrap());
        assert!(before > 50.0 && (after / before - 1.0).abs() < 0.2, "{e}");
        kl.push((e["artifact"].as_str().unwrap().to_owned(), e["kl_mean"].as_f64().unwrap()));
    }
    assert_eq!(kl[0].0, "model.gguf");
    assert_eq!(kl[2].0, "model.safetensors");
    assert!(kl[0].1 > 0.0 && kl[0].1 < kl[1].1, "Q8_0 is closer to the original than Q4_0: {kl:?}");
    // The dense output holds the same Q8_0 weights; through the GGUF, candle (as llama.cpp)
    // also rounds the activations to 8 bits for each product, so its KL is a little higher.
    assert!(kl[2].1 > 0.0 && kl[2].1 < 0.05 && kl[0].1 < 0.05 && kl[2].1 < kl[1].1, "{kl:?}");
}
