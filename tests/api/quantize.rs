//! Quantization end to end: every scheme family and output layout, checked by independent
//! decoders and by the accuracy of the digits teacher.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::mlp::{accuracy, TEACHER_ACCURACY};

/// Values decoded by two independent paths from the same codes differ by float rounding only.
const DECODE_TOLERANCE: f32 = 1e-6;
/// One test error is 0.28 points on 360 rows: accuracy comparisons allow about one point.
const ACCURACY_TOLERANCE: f64 = 0.01;

/// compressed-tensors `pack-quantized` decoded as its reference loader does, written here from
/// the layout description (not with the engine's code): unsigned b-bit fields of little-endian
/// int32 words, offset by 2^(b-1), times the scale of their group.
fn decode_packed(st: &safetensors::SafeTensors, module: &str) -> (Vec<usize>, Vec<f32>) {
    let i32s = |name: &str| -> (Vec<usize>, Vec<i32>) {
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap())).collect())
    };
    let shape_t = st.tensor(&format!("{module}.weight_shape")).unwrap();
    let shape: Vec<usize> =
        shape_t.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize).collect();
    let (rows, cols) = (shape[0], shape[1]);
    let (pshape, packed) = i32s(&format!("{module}.weight_packed"));
    let scale_t = st.tensor(&format!("{module}.weight_scale")).unwrap();
    let scales: Vec<f32> = scale_t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let groups = if scales.len() == 1 { 1 } else { scales.len() / rows };
    let per_scale = if scales.len() == 1 { rows * cols } else { cols / groups };
    (shape.clone(), decode_rows(&packed, pshape[1], rows, cols, &scales, per_scale))
}

fn decode_rows(packed: &[i32], words: usize, rows: usize, cols: usize, scales: &[f32], per_scale: usize) -> Vec<f32> {
    // Bits per value: the smallest of 2, 4, 8 whose packed width matches.
    let bits = [2usize, 4, 8].into_iter().find(|b| (cols * b).div_ceil(32) == words).expect("packed width");
    let per_word = 32 / bits;
    let mut out = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        for i in 0..cols {
            let word = packed[r * words + i / per_word] as u32;
            let u = (word >> ((i % per_word) * bits)) & ((1 << bits) - 1);
            let q = u as i32 - (1 << (bits - 1));
            let flat = r * cols + i;
            let s = if scales.len() == 1 { scales[0] } else { scales[flat / per_scale] };
            out.push(q as f32 * s);
        }
    }
    out
}

#[tokio::test]
async fn int8_keeps_the_teachers_accuracy_and_int4_is_reported() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let (_, report8, files8) = run_job(&app, &int8_spec(&model)).await;
    let acc8 = accuracy(&files8["model.safetensors"]);
    assert!(acc8 >= 0.97, "int8 accuracy {acc8}");
    assert!((acc8 - TEACHER_ACCURACY).abs() <= ACCURACY_TOLERANCE);
    let spec4 =
        json!({"model_id": model, "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}]});
    let (_, report4, files4) = run_job(&app, &spec4).await;
    let acc4 = accuracy(&files4["model.safetensors"]);
    eprintln!(
        "digits teacher accuracy: int8/channel {acc8:.4}, int4/group32 {acc4:.4} (teacher {TEACHER_ACCURACY:.4})"
    );
    assert!(acc4 >= TEACHER_ACCURACY - 3.0 * ACCURACY_TOLERANCE, "int4 accuracy {acc4}");
    assert!(report4["totals"]["bits_per_weight"].as_f64() < report8["totals"]["bits_per_weight"].as_f64());
}

#[tokio::test]
async fn compressed_tensors_decode_independently_to_the_dense_output() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    for step in [
        json!({"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}),
        json!({"op": "quantize", "bits": 8, "granularity": "channel"}),
        json!({"op": "quantize", "bits": 2, "granularity": "tensor"}),
    ] {
        let spec = json!({"model_id": model, "steps": [step], "outputs": ["safetensors", "compressed-tensors"]});
        let (_, _, files) = run_job(&app, &spec).await;
        let dense = read_f32_tensors(&files["model.safetensors"]);
        let ct = safetensors::SafeTensors::deserialize(&files["compressed-tensors/model.safetensors"]).unwrap();
        for module in ["fc1", "fc2", "fc3"] {
            let (shape, decoded) = decode_packed(&ct, module);
            let (dshape, want) = &dense[&format!("{module}.weight")];
            assert_eq!(&shape, dshape);
            let worst = decoded.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= DECODE_TOLERANCE, "{step} {module}: max diff {worst}");
        }
        assert!(ct.tensor("fc1.bias").is_ok(), "biases stay dense");
        let config: Value = serde_json::from_slice(&files["compressed-tensors/config.json"]).unwrap();
        let q = &config["quantization_config"];
        assert_eq!(q["format"], "pack-quantized");
        assert_eq!(q["quant_method"], "compressed-tensors");
        assert_eq!(q["config_groups"]["group_0"]["targets"], json!(["Linear"]));
        assert_eq!(q["config_groups"]["group_0"]["weights"]["num_bits"], step["bits"]);
    }
}

#[tokio::test]
async fn asymmetric_zero_points_are_stored_and_symmetric_keeps_exact_zeros() {
    let app = spawn_app(1).await;
    let mut w = values(16 * 64, 7, 0.5);
    w.iter_mut().step_by(3).for_each(|v| *v = 0.0);
    let model = app.upload_ok(safetensors_f32(&[("l.weight", vec![16, 64], w.clone())])).await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": false}],
                      "outputs": ["safetensors", "compressed-tensors"]});
    let (_, _, files) = run_job(&app, &spec).await;
    let ct = safetensors::SafeTensors::deserialize(&files["compressed-tensors/model.safetensors"]).unwrap();
    assert!(ct.tensor("l.weight_zero_point").is_ok());
    let sym =
        json!({"model_id": model, "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}]});
    let (_, _, files) = run_job(&app, &sym).await;
    let out = &read_f32_tensors(&files["model.safetensors"])["l.weight"].1;
    assert!(w.iter().zip(out).filter(|(a, _)| **a == 0.0).all(|(_, b)| *b == 0.0), "zeros stay exactly zero");
}

#[tokio::test]
async fn gguf_read_back_by_candle_equals_the_dense_output_and_conv_rows_fall_back() {
    use candle_core::quantized::gguf_file;
    let app = spawn_app(1).await;
    let conv = values(8 * 3 * 3 * 3, 11, 0.2);
    let model = app
        .upload_ok(safetensors_f32(&[
            ("fc.weight", vec![16, 256], values(16 * 256, 10, 0.1)),
            ("conv.weight", vec![8, 3, 3, 3], conv),
            ("fc.bias", vec![16], values(16, 12, 0.1)),
        ]))
        .await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "gguf_type": "q4_k", "fallback": "f16"}],
                      "outputs": ["safetensors", "gguf"]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    let conv_plan = plan["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "conv.weight").unwrap();
    assert_eq!(conv_plan["actions"][0]["scheme"], "f16 (fallback)");
    assert!(conv_plan["actions"][0]["note"]
        .as_str()
        .unwrap()
        .contains("innermost row length 3 is not a multiple of the q4_k block size 256"));

    let (_, report, files) = run_job(&app, &spec).await;
    assert_eq!(entry(&report, "fc.weight")["scheme"], "q4_k");
    assert!(entry(&report, "conv.weight")["notes"][0].as_str().unwrap().contains("fallback f16"));
    let dense = read_f32_tensors(&files["model.safetensors"]);
    let mut cursor = std::io::Cursor::new(files["model.gguf"].clone());
    let content = gguf_file::Content::read(&mut cursor).unwrap();
    let dev = candle_core::Device::Cpu;
    for name in ["fc.weight", "conv.weight", "fc.bias"] {
        let q = content.tensor(&mut cursor, name, &dev).unwrap();
        assert_eq!(q.shape().dims(), dense[name].0.as_slice(), "{name}");
        let got = q.dequantize(&dev).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got, dense[name].1, "{name}: GGUF and safetensors hold the same values");
    }
    assert_eq!(content.tensor_infos["fc.weight"].ggml_dtype, candle_core::quantized::GgmlDType::Q4K);
    assert_eq!(content.tensor_infos["conv.weight"].ggml_dtype, candle_core::quantized::GgmlDType::F16);
}

#[tokio::test]
async fn a_block_that_does_not_divide_the_rows_is_refused_with_the_plans_words() {
    let app = spawn_app(0).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "gguf_type": "q4_k", "fallback": "refuse"}]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    let refusal = plan["refusals"][0].clone();
    assert_eq!(refusal["tensor"], "fc1.weight");
    let res = app.create_job(&spec).await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "plan_refused");
    assert_eq!(body["pointer"], "/steps/0/gguf_type");
    assert_eq!(body["errors"][0]["detail"], refusal["detail"]);
    assert!(
        refusal["detail"].as_str().unwrap().contains("\"fallback\": \"llama.cpp\""),
        "the refusal says how to fix it"
    );
}

#[tokio::test]
async fn rows_a_k_quant_does_not_divide_fall_back_as_llama_quantize_does_by_default() {
    use candle_core::quantized::{gguf_file, GgmlDType};
    let app = spawn_app(1).await;
    // Rows of 576 and 2880 values (SmolLM's and gpt-oss's widths) and of 27 (a conv kernel).
    let model = app
        .upload_ok(safetensors_f32(&[
            ("attn.weight", vec![8, 576], values(8 * 576, 1, 0.1)),
            ("mlp.weight", vec![4, 2880], values(4 * 2880, 2, 0.1)),
            ("fc.weight", vec![8, 256], values(8 * 256, 3, 0.1)),
            ("conv.weight", vec![4, 3, 3, 3], values(4 * 27, 4, 0.1)),
        ]))
        .await;
    for (ty, fits, small) in [("q4_k", "q5_0", GgmlDType::Q5_0), ("q6_k", "q8_0", GgmlDType::Q8_0)] {
        let spec = json!({"model_id": model, "steps": [{"op": "quantize", "gguf_type": ty}], "outputs": ["gguf"]});
        let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
        assert_eq!(plan["refusals"], json!([]), "{plan}");
        assert!(plan["outputs"][0]["note"].as_str().unwrap().contains("llama.cpp refuses"), "the plan is honest");
        let scheme = |name: &str| {
            let t = plan["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap().clone();
            (t["actions"][0]["scheme"].as_str().unwrap().to_owned(), t["actions"][0]["note"].clone())
        };
        assert_eq!(scheme("fc.weight").0, ty);
        for name in ["attn.weight", "mlp.weight"] {
            let (label, note) = scheme(name);
            assert_eq!(label, format!("{fits} (fallback)"), "{name}");
            assert!(note.as_str().unwrap().contains("llama.cpp's choice"), "{note}");
        }
        assert_eq!(scheme("conv.weight").0, "f16 (fallback)", "rows of 27 fit no block type");
        let (_, _, files) = run_job(&app, &spec).await;
        let mut cursor = std::io::Cursor::new(files["model.gguf"].clone());
        let content = gguf_file::Content::read(&mut cursor).unwrap();
        assert_eq!(content.tensor_infos["attn.weight"].ggml_dtype, small);
        assert_eq!(content.tensor_infos["mlp.weight"].ggml_dtype, small);
        assert_eq!(content.tensor_infos["conv.weight"].ggml_dtype, GgmlDType::F16);
    }
}

#[tokio::test]
async fn mixed_precision_meets_its_budget_and_rules_pick_per_tensor() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "mixed": {"target_bits": 6.0, "candidates": ["q8_0", "q4_0"]}}],
                      "outputs": ["safetensors", "gguf"]});
    let (_, report, files) = run_job(&app, &spec).await;
    let decision = &report["mixed"][0];
    let achieved = decision["achieved_bits"].as_f64().unwrap();
    assert!(achieved <= 6.0 + 1e-9, "{decision}");
    let schemes: Vec<&str> =
        decision["choices"].as_array().unwrap().iter().map(|c| c["scheme"].as_str().unwrap()).collect();
    assert!(schemes.contains(&"q8_0") && schemes.contains(&"q4_0"), "a 6-bit budget mixes both: {schemes:?}");
    assert!(accuracy(&files["model.safetensors"]) >= TEACHER_ACCURACY - 2.0 * ACCURACY_TOLERANCE);

    let rules = json!({"model_id": model, "steps": [{"op": "quantize", "rules": [
        {"match": "fc3.*", "gguf_type": "q8_0"}, {"match": "*", "bits": 4, "granularity": "group", "group_size": 64}]}]});
    let (_, report, _) = run_job(&app, &rules).await;
    assert_eq!(entry(&report, "fc3.weight")["scheme"], "q8_0");
    assert_eq!(entry(&report, "fc1.weight")["scheme"], "int4/group64/sym");

    let too_tight = json!({"model_id": model, "steps": [{"op": "quantize", "mixed": {"target_bits": 3.0, "candidates": ["q8_0", "q4_0"]}}]});
    let res = app.create_job(&too_tight).await;
    assert_eq!(res.status(), 422);
    assert_eq!(res.json::<Value>().await.unwrap()["pointer"], "/steps/0/mixed/target_bits");
}

#[tokio::test]
async fn mse_scale_search_is_reported_next_to_plain_rounding_and_never_worse() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32, "search": "mse"}]});
    let (_, report, _) = run_job(&app, &spec).await;
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let e = entry(&report, name);
        let mse = e["error"]["relative_error"].as_f64().unwrap();
        let rtn = e["rtn_relative_error"].as_f64().unwrap();
        assert!(mse <= rtn + 1e-12, "{name}: mse {mse} vs rtn {rtn}");
    }
}

#[tokio::test]
async fn a_tied_lm_head_absent_from_the_file_is_ignored_by_the_compressed_tensors_config() {
    let app = spawn_app(1).await;
    let config = |files: &std::collections::BTreeMap<String, Vec<u8>>| -> Value {
        serde_json::from_slice(&files["compressed-tensors/config.json"]).unwrap()
    };
    let spec = |model: &str| json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8}], "outputs": ["compressed-tensors"]});
    // Tied: no lm_head in the file, so the `Linear` target must not look for its packed weight.
    let tied = app.upload_ok(safetensors_f32(&[("layers.0.proj.weight", vec![16, 32], values(512, 1, 0.1))])).await;
    let (_, _, files) = run_job(&app, &spec(&tied)).await;
    let ignore = config(&files)["quantization_config"]["ignore"].clone();
    assert!(ignore.as_array().unwrap().contains(&json!("lm_head")), "{ignore}");
    // Untied: lm_head is quantized like the rest, so it is not ignored.
    let untied = app
        .upload_ok(safetensors_f32(&[
            ("layers.0.proj.weight", vec![16, 32], values(512, 1, 0.1)),
            ("lm_head.weight", vec![16, 32], values(512, 2, 0.1)),
        ]))
        .await;
    let (_, _, files) = run_job(&app, &spec(&untied)).await;
    let ignore = config(&files)["quantization_config"]["ignore"].clone();
    assert!(!ignore.as_array().unwrap().contains(&json!("lm_head")), "{ignore}");
    assert!(files.contains_key("compressed-tensors/model.safetensors"));
}

#[tokio::test]
async fn a_summary_report_leaves_out_the_error_figures_and_nothing_else() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(small_model()).await;
    let full = int8_spec(&model);
    let mut summary = full.clone();
    summary["report"] = serde_json::json!("summary");
    let (_, full_report, full_out) = run_job(&app, &full).await;
    let (_, summary_report, summary_out) = run_job(&app, &summary).await;
    assert_eq!(full_out["model.safetensors"], summary_out["model.safetensors"], "the same artifact");
    assert!(entry(&full_report, "fc1.weight")["error"]["relative_error"].as_f64().unwrap() > 0.0, "{full_report}");
    assert!(entry(&summary_report, "fc1.weight")["error"].is_null(), "{summary_report}");
    assert_eq!(full_report["totals"], summary_report["totals"]);

    let mut bad = full.clone();
    bad["report"] = serde_json::json!("verbose");
    let res = app.create_job(&bad).await;
    assert_eq!(res.status(), 422);
    let p: serde_json::Value = res.json().await.unwrap();
    assert_eq!(p["errors"][0]["pointer"], "/report", "{p}");
}
