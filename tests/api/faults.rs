//! Regression tests for faults found by trying inputs from real users' bug reports (issue 10):
//! numeric range, agreement between every artifact and the report, loader compatibility.

use serde_json::{json, Value};

use crate::helpers::*;
use safetensors::Dtype;

/// Two decodes of the same codes in the same arithmetic must agree exactly.
const EXACT: f32 = 0.0;

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    (d / n).sqrt()
}

fn notes(entry: &Value) -> String {
    entry["notes"].as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect::<Vec<_>>().join(" | ")
}

/// [3, 32] of 0.5 with one outlier per row of 8.0e6, 8.4e6 and 2.0e6 (issue 10, fault 1).
fn outlier_model() -> (Vec<u8>, Vec<f32>) {
    let mut x = vec![0.5f32; 96];
    x[5] = 8.0e6;
    x[32 + 9] = 8.4e6;
    x[64 + 31] = 2.0e6;
    (safetensors_f32(&[("x.weight", vec![3, 32], x.clone())]), x)
}

#[tokio::test]
async fn gguf_block_scales_never_overflow_and_saturation_is_reported() {
    let app = spawn_app(1).await;
    let (model, x) = outlier_model();
    let model = app.upload_ok(model).await;
    // q8_0 saturates one outlier a little (8.4e6 -> 8.32e6); q4_0 holds at most 524,032, so its
    // outliers lose most of their size, but the values stay finite and the report says so.
    for (ty, limit, max_rel) in [("q8_0", 65504.0 * 127.0, 0.01), ("q4_0", 65504.0 * 8.0, 1.0)] {
        let spec = json!({"model_id": model, "steps": [{"op": "quantize", "gguf_type": ty}],
                          "outputs": ["safetensors", "gguf"]});
        let (_, report, files) = run_job(&app, &spec).await;
        let gguf = read_gguf(&files["model.gguf"]);
        let dense = read_f32_tensors(&files["model.safetensors"]);
        let (shape, g) = &gguf["x.weight"];
        assert_eq!(shape, &vec![3, 32]);
        assert!(g.iter().all(|v| v.is_finite()), "{ty}: {g:?}");
        assert_eq!(g, &dense["x.weight"].1, "{ty}: the GGUF decodes to the dense output");
        let e = entry(&report, "x.weight");
        let rel = e["error"]["relative_error"].as_f64().unwrap();
        assert!((rel - relative_error(&x, g)).abs() < 1e-9, "{ty}: report {rel} vs file");
        assert!(rel < max_rel, "{ty}: {rel}");
        let saturated = x.iter().filter(|v| v.abs() > limit).count();
        assert!(saturated > 0);
        assert!(notes(e).contains(&format!("{saturated} values beyond")), "{ty}: {}", notes(e));
        let formats: Vec<&str> =
            report["checks"].as_array().unwrap().iter().map(|c| c["format"].as_str().unwrap()).collect();
        assert_eq!(formats, ["safetensors", "gguf"]);
    }
}

#[tokio::test]
async fn int_ranges_at_the_edges_of_f32_and_f16_decode_finite() {
    let app = spawn_app(1).await;
    // An asymmetric range wider than f32 can hold, and f16 weights at f16's largest value.
    let wide: Vec<f32> = (0..64).map(|i| if i % 2 == 0 { -3.0e38 } else { 3.0e38 } * (i as f32 / 64.0)).collect();
    let near_max: Vec<f32> = (0..64).map(|i| 65504.0 * ((i as f32 - 32.0) / 32.0)).collect();
    let model = safetensors_typed(&[
        ("wide.weight", Dtype::F32, vec![2, 32], wide.clone()),
        ("near.weight", Dtype::F16, vec![2, 32], near_max),
    ]);
    let model = app.upload_ok(model).await;
    for symmetric in [true, false] {
        let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8, "symmetric": symmetric}],
                          "outputs": ["safetensors", "compressed-tensors"]});
        let (_, report, files) = run_job(&app, &spec).await;
        for (name, (_, _, v)) in read_float_tensors(&files["model.safetensors"]) {
            assert!(v.iter().all(|x| x.is_finite()), "{name} symmetric={symmetric}");
            let rel = entry(&report, &name)["error"]["relative_error"].as_f64().unwrap();
            assert!(rel < 0.01, "{name} symmetric={symmetric}: {rel}");
        }
    }
}

#[tokio::test]
async fn non_finite_weights_fail_every_op_naming_the_tensor() {
    let app = spawn_app(1).await;
    for bad in [f32::NAN, f32::INFINITY] {
        let mut w = values(8 * 64, 7, 0.02);
        w[3 * 64 + 7] = bad;
        let model = app
            .upload_ok(safetensors_f32(&[
                ("w.weight", vec![8, 64], w),
                ("ok.weight", vec![8, 64], values(512, 8, 0.02)),
            ]))
            .await;
        for step in [
            json!({"op": "prune", "method": "magnitude", "sparsity": 0.5}),
            json!({"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.5}),
            json!({"op": "prune", "method": "n_m", "n": 2, "m": 4}),
            json!({"op": "prune", "method": "structured", "amount": 0.25}),
            json!({"op": "quantize", "gguf_type": "q8_0"}),
            json!({"op": "quantize", "bits": 4}),
        ] {
            let id = app.create_job_ok(&json!({"model_id": model, "steps": [step]})).await;
            let job = app.wait_terminal(&id).await;
            assert_eq!(job["status"], "failed", "{step}: {job}");
            assert_eq!(job["error"]["code"], "non_finite_weights", "{step}: {job}");
            let detail = job["error"]["detail"].as_str().unwrap();
            assert!(detail.contains("tensor `w.weight`") && detail.contains("flat index 199"), "{step}: {detail}");
            assert_eq!(job["attempt"], 1, "a bad input is not retried");
        }
    }
}

/// Rows of max |x| = 1, 1e-2, 1e-4, 3e-5, 1e-5, 1e-6, 0 and 1.2e-7 (issue 10, fault 3).
fn tiny_rows() -> Vec<f32> {
    let maxes = [1.0f32, 1e-2, 1e-4, 3e-5, 1e-5, 1e-6, 0.0, 1.2e-7];
    let base = values(8 * 64, 11, 1.0);
    let mut w = Vec::with_capacity(512);
    for (r, m) in maxes.iter().enumerate() {
        let row = &base[r * 64..(r + 1) * 64];
        let peak = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        w.extend(row.iter().map(|v| v / peak * m));
    }
    w
}

#[tokio::test]
async fn compressed_tensors_scales_are_the_ones_the_codes_were_made_with() {
    let app = spawn_app(1).await;
    for dtype in [Dtype::F16, Dtype::BF16] {
        let w = tiny_rows();
        let model = app.upload_ok(safetensors_typed(&[("proj.weight", dtype, vec![8, 64], w.clone())])).await;
        let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8, "granularity": "channel"}],
                          "outputs": ["safetensors", "compressed-tensors"]});
        let (_, report, files) = run_job(&app, &spec).await;
        let dense = read_float_tensors(&files["model.safetensors"]);
        let (d_dtype, _, dense) = &dense["proj.weight"];
        assert_eq!(*d_dtype, dtype);
        // Decode compressed-tensors as its loader does, in the scale's dtype: (q - 0) * scale.
        let st = safetensors::SafeTensors::deserialize(&files["compressed-tensors/model.safetensors"]).unwrap();
        let scale = st.tensor("proj.weight_scale").unwrap();
        assert_eq!(scale.dtype(), dtype);
        let scales: Vec<f32> =
            read_float_tensors(&files["compressed-tensors/model.safetensors"])["proj.weight_scale"].2.clone();
        assert!(scales.iter().all(|s| *s > 0.0), "no stored scale is zero: {scales:?}");
        let packed = st.tensor("proj.weight_packed").unwrap();
        let words: Vec<i32> =
            packed.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect();
        let codes = modelpress::compress::quant::unpack_int32(&words, 8, 64, 8);
        let decoded: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| {
                let v = q as f32 * scales[i / 64];
                if dtype == Dtype::F16 {
                    half::f16::from_f32(v).to_f32()
                } else {
                    half::bf16::from_f32(v).to_f32()
                }
            })
            .collect();
        for (i, (a, b)) in decoded.iter().zip(dense).enumerate() {
            assert!((a - b).abs() <= EXACT, "{dtype:?} element {i}: decode {a} vs dense {b}");
        }
        if dtype == Dtype::F16 {
            // The 1e-6 row keeps its values (error well under 1), where an epsilon scale zeroes it.
            let input: Vec<f32> = w.iter().map(|v| half::f16::from_f32(*v).to_f32()).collect();
            let row = 5 * 64..6 * 64;
            let rel = relative_error(&input[row.clone()], &dense[row]);
            assert!(rel < 0.1, "row of max 1e-6: relative error {rel}");
        }
        let check = report["checks"].as_array().unwrap().iter().find(|c| c["format"] == "compressed-tensors").unwrap();
        assert_eq!(check["tensors_decoded"], 1, "{check}");
        let rel = entry(&report, "proj.weight")["error"]["relative_error"].as_f64().unwrap();
        let input: Vec<f32> =
            read_float_tensors(&safetensors_typed(&[("p", dtype, vec![8, 64], w.clone())]))["p"].2.clone();
        assert!((rel - relative_error(&input, dense)).abs() < 1e-9, "{dtype:?}: the report measures the file");
    }
}

#[tokio::test]
async fn compressed_tensors_packs_linear_weights_only_and_ignores_embeddings() {
    let app = spawn_app(1).await;
    let model = app
        .upload_ok(safetensors_f32(&[
            ("model.embed_tokens.weight", vec![256, 64], values(256 * 64, 1, 0.5)),
            ("model.layers.0.mlp.up_proj.weight", vec![128, 64], values(128 * 64, 2, 0.5)),
            ("model.norm.weight", vec![64], values(64, 3, 1.0)),
            ("lm_head.weight", vec![256, 64], values(256 * 64, 4, 0.5)),
        ]))
        .await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}],
                      "outputs": ["compressed-tensors"]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    let embed = plan["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "model.embed_tokens.weight").unwrap();
    assert_eq!(embed["actions"], json!([]), "{embed}");
    assert!(embed["skipped"][0]["reason"].as_str().unwrap().contains("embedding"), "{embed}");
    let (_, _, files) = run_job(&app, &spec).await;
    let st = safetensors::SafeTensors::deserialize(&files["compressed-tensors/model.safetensors"]).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert!(names.contains(&"model.embed_tokens.weight".to_string()), "{names:?}");
    assert!(names.contains(&"model.layers.0.mlp.up_proj.weight_packed".to_string()));
    assert!(names.contains(&"lm_head.weight_packed".to_string()));
    assert!(!names.iter().any(|n| n.starts_with("model.embed_tokens.weight_")), "{names:?}");
    let config: Value = serde_json::from_slice(&files["compressed-tensors/config.json"]).unwrap();
    let ignore = &config["quantization_config"]["ignore"];
    assert_eq!(ignore, &json!(["model.embed_tokens", "model.norm"]));

    // Targeted explicitly, an embedding is quantized but still stored dense there, with the reason.
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8, "targets": ["*embed*"]}],
                      "outputs": ["compressed-tensors"]});
    let (_, report, files) = run_job(&app, &spec).await;
    assert!(notes(entry(&report, "model.embed_tokens.weight")).contains("stores it dense"));
    let st = safetensors::SafeTensors::deserialize(&files["compressed-tensors/model.safetensors"]).unwrap();
    assert!(st.tensor("model.embed_tokens.weight").is_ok());
}

#[tokio::test]
async fn empty_tensors_are_copied_and_reported_as_skipped_under_default_targets() {
    let app = spawn_app(1).await;
    let model = app
        .upload_ok(safetensors_f32(&[
            ("empty_rows.weight", vec![0, 64], vec![]),
            ("empty_cols.weight", vec![64, 0], vec![]),
            ("ok.weight", vec![8, 64], values(512, 5, 0.1)),
        ]))
        .await;
    for (step, outputs) in [
        (json!({"op": "quantize", "bits": 4, "granularity": "channel"}), json!(["safetensors", "compressed-tensors"])),
        (json!({"op": "quantize", "gguf_type": "q8_0"}), json!(["gguf"])),
    ] {
        let spec = json!({"model_id": model, "steps": [step], "outputs": outputs});
        let (_, report, files) = run_job(&app, &spec).await;
        for name in ["empty_rows.weight", "empty_cols.weight"] {
            let e = entry(&report, name);
            assert_eq!(e["scheme"], "unchanged", "{e}");
            assert!(notes(e).contains("empty tensor"), "{e}");
        }
        assert_ne!(entry(&report, "ok.weight")["scheme"], "unchanged");
        if let Some(ct) = files.get("compressed-tensors/model.safetensors") {
            let st = safetensors::SafeTensors::deserialize(ct).unwrap();
            assert!(st.tensor("empty_cols.weight").is_ok() && st.tensor("empty_cols.weight_scale").is_err());
        }
    }
}

#[tokio::test]
async fn one_dimensional_tensors_of_f16_models_go_to_gguf_as_f32() {
    let app = spawn_app(1).await;
    let model = app
        .upload_ok(safetensors_typed(&[
            ("blk.attn_norm.weight", Dtype::F16, vec![256], values(256, 1, 1.0)),
            ("blk.ffn.weight", Dtype::F16, vec![4, 256], values(1024, 2, 0.1)),
            ("blk.other.weight", Dtype::F16, vec![2, 256], values(512, 3, 0.1)),
        ]))
        .await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "gguf_type": "q4_k", "targets": ["blk.ffn.weight"]}],
                      "outputs": ["gguf"]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    let types: Vec<(String, String)> = plan["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap().to_owned(), t["gguf_type"].as_str().unwrap().to_owned()))
        .collect();
    let want = [("blk.attn_norm.weight", "f32"), ("blk.ffn.weight", "q4_k"), ("blk.other.weight", "f16")];
    assert_eq!(types, want.map(|(a, b)| (a.to_string(), b.to_string())));
    let (_, report, files) = run_job(&app, &spec).await;
    let content =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&files["model.gguf"])).unwrap();
    let ty = |n: &str| content.tensor_infos[n].ggml_dtype;
    use candle_core::quantized::GgmlDType;
    assert_eq!(ty("blk.attn_norm.weight"), GgmlDType::F32);
    assert_eq!(ty("blk.ffn.weight"), GgmlDType::Q4K);
    assert_eq!(ty("blk.other.weight"), GgmlDType::F16);
    let predicted = plan["outputs"][0]["predicted_bytes"].as_u64().unwrap();
    let actual = report["outputs"][0]["bytes"].as_u64().unwrap();
    assert!(predicted >= actual && predicted < actual + 4096, "predicted {predicted}, wrote {actual}");
}

#[tokio::test]
async fn rank_3_tensors_get_a_scale_and_a_pruning_unit_per_row_of_the_last_dimension() {
    let app = spawn_app(1).await;
    let experts = values(4 * 8 * 64, 9, 0.1);
    let model = app.upload_ok(safetensors_f32(&[("moe.experts.weight", vec![4, 8, 64], experts)])).await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8, "granularity": "channel"}]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    assert_eq!(plan["tensors"][0]["matrix"], json!([32, 64]));
    // One f32 scale per row of 64: 8 + 32/64 bits per weight.
    assert!((plan["tensors"][0]["bits_per_weight"].as_f64().unwrap() - 8.5).abs() < 1e-9, "{plan}");

    let spec = json!({"model_id": model, "steps": [{"op": "prune", "method": "structured", "amount": 0.25}]});
    let (_, _, files) = run_job(&app, &spec).await;
    let w = &read_f32_tensors(&files["model.safetensors"])["moe.experts.weight"].1;
    let zero_rows: Vec<usize> = (0..32).filter(|r| w[r * 64..(r + 1) * 64].iter().all(|v| *v == 0.0)).collect();
    assert_eq!(zero_rows.len(), 8, "{zero_rows:?}");
    let whole_experts = (0..4).filter(|e| (0..8).all(|o| zero_rows.contains(&(e * 8 + o)))).count();
    assert_eq!(whole_experts, 0, "rows, not experts, are the units: {zero_rows:?}");
}

#[tokio::test]
async fn cancelling_a_finished_job_names_its_status_in_lowercase() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(small_model()).await;
    let (job, _, _) = run_job(&app, &int8_spec(&model)).await;
    let res = app.cancel(job["id"].as_str().unwrap()).await;
    assert_eq!(res.status(), 409);
    let body: Value = res.json().await.unwrap();
    assert!(body["detail"].as_str().unwrap().ends_with("is succeeded and can no longer change"), "{body}");
}

#[tokio::test]
async fn the_same_file_and_steps_give_byte_identical_artifacts_on_two_servers() {
    let (a, b) = (spawn_app(1).await, spawn_app(1).await);
    let steps = json!([{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 16}]);
    let outputs = json!(["safetensors", "compressed-tensors", "gguf"]);
    let mut runs = Vec::new();
    for app in [&a, &b] {
        // A different model uploaded first gives the second server different ids.
        if runs.len() == 1 {
            app.upload_ok(safetensors_f32(&[("other.weight", vec![2, 16], values(32, 1, 1.0))])).await;
        }
        let model = app.upload_ok(small_model()).await;
        let (_, report, files) = run_job(app, &json!({"model_id": model, "steps": steps, "outputs": outputs})).await;
        runs.push((model, report, files));
    }
    assert_ne!(runs[0].0, runs[1].0, "the model ids differ");
    for name in ["model.safetensors", "compressed-tensors/model.safetensors", "model.gguf"] {
        assert!(runs[0].2[name] == runs[1].2[name], "{name} differs between servers");
    }
    assert_eq!(runs[0].1["spec_sha256"], runs[1].1["spec_sha256"]);
}
