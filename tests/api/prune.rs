//! Pruning end to end: exact sparsity, patterns, a really smaller file decoded independently,
//! composition with quantization, and the digits teacher's accuracy.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::mlp::accuracy;

/// The legacy compressed-tensors sparse-bitmask layout decoded from its description (numpy
/// `packbits(bitorder="little")` rows, kept values in row-major order), not with engine code.
fn decode_bitmask(st: &safetensors::SafeTensors, prefix: &str) -> (Vec<usize>, Vec<f32>) {
    let shape: Vec<usize> = st
        .tensor(&format!("{prefix}.shape"))
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as usize)
        .collect();
    let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
    let mask = st.tensor(&format!("{prefix}.bitmask")).unwrap();
    let bytes_per_row = cols.div_ceil(8);
    assert_eq!(mask.shape(), &[rows, bytes_per_row]);
    let values: Vec<f32> = st
        .tensor(&format!("{prefix}.compressed"))
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let mut out = vec![0f32; rows * cols];
    let mut next = 0;
    for r in 0..rows {
        for c in 0..cols {
            if mask.data()[r * bytes_per_row + c / 8] >> (c % 8) & 1 == 1 {
                out[r * cols + c] = values[next];
                next += 1;
            }
        }
    }
    assert_eq!(next, values.len(), "every kept value is used");
    (shape, out)
}

fn zeros(v: &[f32]) -> usize {
    v.iter().filter(|x| **x == 0.0).count()
}

#[tokio::test]
async fn layer_magnitude_pruning_hits_the_exact_count_keeps_accuracy_and_the_sparse_file_decodes() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [{"op": "prune", "method": "magnitude", "scope": "layer", "sparsity": 0.5}],
                      "outputs": ["safetensors", "sparse"]});
    let (_, report, files) = run_job(&app, &spec).await;
    let dense = read_f32_tensors(&files["model.safetensors"]);
    let original = read_f32_tensors(&teacher());
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let (_, w) = &dense[name];
        assert_eq!(zeros(w), w.len() / 2, "{name}: exactly half");
        let kept_min =
            original[name].1.iter().zip(w).filter(|(_, p)| **p != 0.0).map(|(o, _)| o.abs()).fold(f32::MAX, f32::min);
        let pruned_max =
            original[name].1.iter().zip(w).filter(|(_, p)| **p == 0.0).map(|(o, _)| o.abs()).fold(0f32, f32::max);
        assert!(kept_min >= pruned_max, "{name}: every kept magnitude >= every pruned one");
        assert_eq!(entry(&report, name)["requested_sparsity"], 0.5);
        assert_eq!(entry(&report, name)["sparsity"], 0.5);
    }
    let acc = accuracy(&files["model.safetensors"]);
    eprintln!("digits teacher accuracy after 50% per-layer magnitude pruning: {acc:.4}");
    assert!(acc >= 0.96, "accuracy {acc}");

    let sparse = safetensors::SafeTensors::deserialize(&files["sparse/model.safetensors"]).unwrap();
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let prefix = name.strip_suffix(".weight").unwrap();
        let (shape, decoded) = decode_bitmask(&sparse, prefix);
        assert_eq!(shape, dense[name].0);
        assert_eq!(decoded, dense[name].1, "{name}: the sparse file decodes to the dense output exactly");
    }
    assert!(sparse.tensor("fc1.bias").is_ok(), "unpruned tensors stay dense");
    let ratio = files["sparse/model.safetensors"].len() as f64 / files["model.safetensors"].len() as f64;
    assert!(ratio < 0.56, "at 50% sparsity the f32 file shrinks to about 53%, got {ratio:.3}");
    let config: Value = serde_json::from_slice(&files["sparse/config.json"]).unwrap();
    assert_eq!(config["quantization_config"]["sparsity_config"]["format"], "sparse-bitmask");
}

#[tokio::test]
async fn global_magnitude_pruning_is_exact_across_tensors_and_deterministic() {
    let app = spawn_app(1).await;
    // Many equal magnitudes straddling the threshold, spread over two tensors.
    let a: Vec<f32> = (0..400).map(|i| ((i % 5) as f32) * 0.1).collect();
    let b: Vec<f32> = (0..600).map(|i| ((i % 7) as f32) * -0.05).collect();
    let model = app
        .upload_ok(safetensors_f32(&[("a.weight", vec![20, 20], a.clone()), ("b.weight", vec![20, 30], b.clone())]))
        .await;
    let spec = json!({"model_id": model, "steps": [{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.45}]});
    let (_, _, files) = run_job(&app, &spec).await;
    let out = read_f32_tensors(&files["model.safetensors"]);
    let total_zeros = zeros(&out["a.weight"].1) + zeros(&out["b.weight"].1);
    assert_eq!(total_zeros, 450, "round(0.45 * 1000) weights pruned across both tensors");
    let originals: Vec<f32> = a.iter().chain(&b).copied().collect();
    let pruned: Vec<f32> = out["a.weight"].1.iter().chain(&out["b.weight"].1).copied().collect();
    let kept_min =
        originals.iter().zip(&pruned).filter(|(_, p)| **p != 0.0).map(|(o, _)| o.abs()).fold(f32::MAX, f32::min);
    let pruned_max =
        originals.iter().zip(&pruned).filter(|(_, p)| **p == 0.0).map(|(o, _)| o.abs()).fold(0f32, f32::max);
    assert!(kept_min >= pruned_max);
    let (_, _, again) = run_job(&app, &spec).await;
    assert_eq!(again["model.safetensors"], files["model.safetensors"], "the same input gives the same mask");
}

#[tokio::test]
async fn two_four_pruning_holds_in_every_group_and_mismatched_rows_are_refused_or_skipped() {
    let app = spawn_app(1).await;
    let model = app
        .upload_ok(safetensors_f32(&[
            ("w.weight", vec![8, 16], values(128, 3, 1.0)),
            ("odd.weight", vec![4, 6], values(24, 4, 1.0)),
        ]))
        .await;
    let refused = json!({"model_id": model, "steps": [{"op": "prune", "method": "n_m", "n": 2, "m": 4}]});
    let res = app.create_job(&refused).await;
    assert_eq!(res.status(), 422);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["pointer"], "/steps/0/m");
    assert!(body["detail"].as_str().unwrap().contains("tensor `odd.weight`: row length 6 is not a multiple of m = 4"));
    let skipping =
        json!({"model_id": model, "steps": [{"op": "prune", "method": "n_m", "n": 2, "m": 4, "on_mismatch": "skip"}]});
    let (_, report, files) = run_job(&app, &skipping).await;
    let out = read_f32_tensors(&files["model.safetensors"]);
    for group in out["w.weight"].1.chunks(4) {
        assert!(zeros(group) >= 2, "2:4 in every group: {group:?}");
    }
    assert_eq!(entry(&report, "odd.weight")["scheme"], "unchanged");
    assert!(entry(&report, "odd.weight")["notes"][0].as_str().unwrap().contains("not a multiple of m = 4"));
}

#[tokio::test]
async fn structured_pruning_zeros_the_lowest_norm_rows_and_their_bias() {
    let app = spawn_app(1).await;
    let mut w = values(8 * 4, 5, 1.0);
    for (row, scale) in [(2usize, 0.01f32), (5, 0.02)] {
        w[row * 4..row * 4 + 4].iter_mut().for_each(|v| *v *= scale);
    }
    let model = app.upload_ok(safetensors_f32(&[("l.bias", vec![8], vec![1.0; 8]), ("l.weight", vec![8, 4], w)])).await;
    let spec =
        json!({"model_id": model, "steps": [{"op": "prune", "method": "structured", "norm": "l2", "amount": 0.25}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let out = read_f32_tensors(&files["model.safetensors"]);
    let zero_rows: Vec<usize> =
        out["l.weight"].1.chunks(4).enumerate().filter(|(_, r)| r.iter().all(|v| *v == 0.0)).map(|(i, _)| i).collect();
    assert_eq!(zero_rows, [2, 5]);
    let bias = &out["l.bias"].1;
    assert_eq!((bias[2], bias[5], bias[0]), (0.0, 0.0, 1.0), "the bias of removed rows is zeroed too");
    assert!(entry(&report, "l.weight")["notes"][0].as_str().unwrap().contains("zeroed 2 of 8 rows"));
}

#[tokio::test]
async fn pruning_then_quantizing_keeps_every_zero_in_every_format() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [
        {"op": "prune", "method": "magnitude", "sparsity": 0.6},
        {"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}],
        "outputs": ["safetensors", "compressed-tensors", "sparse"]});
    let (_, report, files) = run_job(&app, &spec).await;
    let out = read_f32_tensors(&files["model.safetensors"]);
    for name in ["fc1.weight", "fc2.weight", "fc3.weight"] {
        let w = &out[name].1;
        assert!(zeros(w) >= (w.len() as f64 * 0.6).round() as usize, "{name}: {} zeros", zeros(w));
        assert_eq!(entry(&report, name)["scheme"], "magnitude/layer/0.60 + int4/group32/sym");
    }
    let sparse = safetensors::SafeTensors::deserialize(&files["sparse/model.safetensors"]).unwrap();
    assert_eq!(decode_bitmask(&sparse, "fc2").1, out["fc2.weight"].1);
}

#[tokio::test]
async fn bad_pruning_parameters_are_422_with_the_field_pointer() {
    let app = spawn_app(0).await;
    let model = app.upload_ok(small_model()).await;
    for (step, pointer) in [
        (json!({"op": "prune", "method": "magnitude", "sparsity": 1.0}), "/steps/0/sparsity"),
        (json!({"op": "prune", "method": "n_m", "n": 2, "m": 0}), "/steps/0/m"),
        (json!({"op": "prune", "method": "n_m", "n": 3, "m": 2}), "/steps/0/n"),
        (json!({"op": "prune", "method": "magnitude", "scope": "galaxy", "sparsity": 0.5}), "/steps/0/scope"),
    ] {
        let res = app.create_job(&json!({"model_id": model, "steps": [step]})).await;
        assert_eq!(res.status(), 422);
        assert_eq!(res.json::<Value>().await.unwrap()["pointer"], pointer);
    }
}

#[tokio::test]
async fn global_pruning_keeps_its_exact_mask_when_a_later_step_reads_the_tensors_again() {
    let app = spawn_app(1).await;
    // Many ties at the threshold, rows of 64 so q8_0/q4_0 blocks fit.
    let a: Vec<f32> = (0..640).map(|i| ((i % 5) as f32) * 0.1).collect();
    let b: Vec<f32> = (0..960).map(|i| ((i % 7) as f32) * -0.05).collect();
    let model = app.upload_ok(safetensors_f32(&[("a.weight", vec![10, 64], a), ("b.weight", vec![15, 64], b)])).await;
    let global = json!({"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.45});
    let (_, _, alone) = run_job(&app, &json!({"model_id": model, "steps": [global]})).await;
    let mixed = json!({"op": "quantize", "mixed": {"target_bits": 8.5, "candidates": ["q8_0", "q4_0"]}});
    let (_, _, both) = run_job(&app, &json!({"model_id": model, "steps": [global, mixed]})).await;
    let (alone, both) = (read_f32_tensors(&alone["model.safetensors"]), read_f32_tensors(&both["model.safetensors"]));
    let pruned: usize = ["a.weight", "b.weight"].iter().map(|n| zeros(&alone[*n].1)).sum();
    assert_eq!(pruned, 720, "round(0.45 * 1600)");
    for name in ["a.weight", "b.weight"] {
        for (x, y) in alone[name].1.iter().zip(&both[name].1) {
            assert!(*x != 0.0 || *y == 0.0, "{name}: a weight the global step pruned came back");
        }
    }
}

#[tokio::test]
async fn structure_then_weight_pruning_compose_in_one_job() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": model, "steps": [
        {"op": "prune", "method": "structured", "amount": 0.25, "targets": ["fc1.weight"]},
        {"op": "prune", "method": "magnitude", "sparsity": 0.5}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let out = read_f32_tensors(&files["model.safetensors"]);
    let fc1 = &out["fc1.weight"].1;
    let empty_rows = fc1.chunks(64).filter(|r| r.iter().all(|v| *v == 0.0)).count();
    assert!(empty_rows >= 64, "a quarter of 256 rows removed: {empty_rows}");
    assert!(zeros(fc1) >= fc1.len() / 2);
    assert_eq!(entry(&report, "fc1.weight")["scheme"], "structured/l2/0.25 + magnitude/layer/0.50");
    let bias = &out["fc1.bias"].1;
    assert!(bias.iter().filter(|v| **v == 0.0).count() >= 64, "the bias of removed rows is zeroed");
}
