//! Structural steps over HTTP: structured pruning that removes units, width and depth shrinking,
//! low-rank factorization; each proven by the engine and measured on the digits teacher.

use serde_json::{json, Value};

use crate::graphs::{teacher_graph, teacher_with_graph};
use crate::helpers::*;
use crate::mlp;

async fn problem(res: reqwest::Response) -> Value {
    assert_eq!(res.status(), 422);
    res.json().await.unwrap()
}

fn shapes(bytes: &[u8]) -> std::collections::BTreeMap<String, Vec<usize>> {
    read_f32_tensors(bytes).into_iter().map(|(k, (s, _))| (k, s)).collect()
}

/// Header sizes differ a little between the input and the output (metadata, shapes).
const HEADER_SLACK: i64 = 1024;

#[tokio::test]
async fn structured_pruning_with_a_graph_removes_units_and_their_inputs() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": true,
                      "steps": [{"op": "prune", "method": "structured", "amount": 0.25}]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    assert_eq!(plan["refusals"], json!([]));
    let planned: Vec<_> =
        plan["tensors"].as_array().unwrap().iter().map(|t| (t["name"].clone(), t["shape_out"].clone())).collect();
    assert!(planned.contains(&(json!("fc2.weight"), json!([192, 192]))), "{planned:?}");
    assert_eq!(plan["graph_after"]["parameters"], 51466);

    let (_, report, files) = run_job(&app, &spec).await;
    let out = shapes(&files["model.safetensors"]);
    assert_eq!(out["fc1.weight"], vec![192, 64]);
    assert_eq!(out["fc1.bias"], vec![192]);
    assert_eq!(out["fc2.weight"], vec![192, 192]);
    assert_eq!(out["fc3.weight"], vec![10, 192], "the consumer lost the removed inputs");
    let removed = (85002 - 51466) * 4;
    let shrunk = teacher().len() as i64 - files["model.safetensors"].len() as i64;
    assert!((shrunk - removed).abs() < HEADER_SLACK, "the file is {shrunk} bytes smaller, expected about {removed}");
    let s = &report["structure"][0];
    assert_eq!(s["groups"][0]["units_after"], 192);
    assert!(s["proof"]["max_relative_difference"].as_f64().unwrap() <= s["proof"]["tolerance"].as_f64().unwrap());
    // The evaluation of the shrunk model is what plain matrix code measures on the file.
    let e = &report["evaluation"];
    assert!((e["after"]["accuracy"].as_f64().unwrap() - mlp::accuracy(&files["model.safetensors"])).abs() < 1e-12);
    assert!(e["after"]["accuracy"].as_f64().unwrap() > 0.9, "{e}");
    let graph: Value = serde_json::from_slice(&files["graph.json"]).unwrap();
    assert_eq!(graph, teacher_graph(), "width changes no layer");
}

/// A small CNN: conv, batch norm, a residual block, a depthwise conv, pooling, flatten, linear.
fn cnn() -> (Vec<u8>, Value) {
    let t = |name: &'static str, shape: &[usize], seed: u64| {
        (name, shape.to_vec(), values(shape.iter().product(), seed, 0.5))
    };
    let mut tensors = vec![
        t("conv1.weight", &[8, 1, 3, 3], 1),
        t("conv1.bias", &[8], 2),
        t("bn1.weight", &[8], 3),
        t("bn1.bias", &[8], 4),
        t("bn1.running_mean", &[8], 5),
        t("b1.conv.weight", &[8, 8, 3, 3], 6),
        t("dw.weight", &[8, 1, 3, 3], 7),
        t("dw.bias", &[8], 8),
        t("fc.weight", &[10, 8 * 4 * 4], 9),
        t("fc.bias", &[10], 10),
    ];
    tensors.push(("bn1.running_var", vec![8], (0..8).map(|i| 0.5 + i as f32 * 0.1).collect()));
    let graph = json!({"input": {"shape": [1, 8, 8]}, "layers": [
        {"kind": "conv2d", "name": "conv1", "padding": 1}, {"kind": "batch_norm", "name": "bn1"}, {"kind": "relu"},
        {"kind": "residual", "layers": [{"kind": "conv2d", "name": "b1.conv", "padding": 1}, {"kind": "relu"}]},
        {"kind": "conv2d", "name": "dw", "groups": 8, "padding": 1},
        {"kind": "max_pool2d", "kernel": 2}, {"kind": "flatten"}, {"kind": "linear", "name": "fc"}]});
    (safetensors_f32(&tensors), graph)
}

#[tokio::test]
async fn half_the_filters_of_a_cnn_go_through_residual_depthwise_and_flatten() {
    let app = spawn_app(1).await;
    let (bytes, graph) = cnn();
    let model = app.upload_ok(bytes.clone()).await;
    assert_eq!(app.put_json(&format!("/v1/models/{model}/graph"), &graph).await.status(), 200);
    let spec =
        json!({"model_id": model, "steps": [{"op": "prune", "method": "structured", "amount": 0.5, "norm": "l1"}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let out = shapes(&files["model.safetensors"]);
    assert_eq!(out["conv1.weight"], vec![4, 1, 3, 3]);
    assert_eq!(out["bn1.running_var"], vec![4]);
    assert_eq!(out["b1.conv.weight"], vec![4, 4, 3, 3], "both sides of the residual stream");
    assert_eq!(out["dw.weight"], vec![4, 1, 3, 3], "both sides of the depthwise conv");
    assert_eq!(out["fc.weight"], vec![10, 4 * 16], "whole 4x4 blocks of columns after the flatten");
    let s = &report["structure"][0];
    assert_eq!(s["groups"][0]["layers"], json!(["conv1", "b1.conv"]));
    assert!(s["proof"]["max_relative_difference"].as_f64().unwrap() <= 1e-4, "{s}");
    let new_graph: Value = serde_json::from_slice(&files["graph.json"]).unwrap();
    assert_eq!(new_graph["layers"][4]["groups"], 4, "the depthwise conv follows its channels");
    let removed: i64 = (4 * 9 + 4 + 4 * 4 + 4 * 8 * 9 + 4 * 4 * 9 + 4 * 9 + 4 + 10 * 64) * 4;
    let shrunk = bytes.len() as i64 - files["model.safetensors"].len() as i64;
    assert!((shrunk - removed).abs() < HEADER_SLACK, "{shrunk} vs {removed}");

    // The shrunk model registers as a valid model with its new graph.
    let registered = app.upload_ok(files["model.safetensors"].clone()).await;
    let res = app.put_json(&format!("/v1/models/{registered}/graph"), &new_graph).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn width_depth_and_factorization_of_the_digits_teacher_report_accuracy_before_and_after() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let job = |steps: Value| json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": steps});

    let (_, report, files) = run_job(&app, &job(json!([{"op": "shrink", "width": {"ratio": 0.375}}]))).await;
    assert_eq!(shapes(&files["model.safetensors"])["fc2.weight"], vec![96, 96]);
    let e = &report["evaluation"];
    assert!((e["after"]["accuracy"].as_f64().unwrap() - mlp::accuracy(&files["model.safetensors"])).abs() < 1e-12);

    let (_, report, files) = run_job(&app, &job(json!([{"op": "shrink", "depth": {"drop": ["fc2"]}}]))).await;
    assert!(!shapes(&files["model.safetensors"]).contains_key("fc2.weight"));
    let graph: Value = serde_json::from_slice(&files["graph.json"]).unwrap();
    assert!(!graph.to_string().contains("fc2"), "{graph}");
    assert_eq!(report["structure"][0]["layers"][0]["name"], "fc2");
    let dropped = report["tensors"].as_array().unwrap().iter().filter(|t| t["scheme"] == "dropped").count();
    assert_eq!(dropped, 2, "fc2.weight and fc2.bias are listed as dropped");

    let (_, report, files) = run_job(&app, &job(json!([{"op": "factorize", "rank": 32}]))).await;
    let out = shapes(&files["model.safetensors"]);
    assert_eq!((out["fc2.0.weight"].clone(), out["fc2.1.weight"].clone()), (vec![32, 256], vec![256, 32]));
    assert!(!out.contains_key("fc3.0.weight"), "fc3 [10, 256] is left dense: rank 32 is above 10");
    let f = &report["structure"][0]["factors"][1];
    assert_eq!((f["layer"].clone(), f["parameters_after"].clone()), (json!("fc2"), json!(32 * 512)));
    assert!(report["evaluation"]["after"]["accuracy"].as_f64().unwrap() > 0.9, "{}", report["evaluation"]);

    // At full rank the factors reproduce the layer.
    let (_, report, _) = run_job(&app, &job(json!([{"op": "factorize", "rank": 64, "targets": ["fc1.weight"]}]))).await;
    let e = &report["evaluation"];
    assert_eq!(e["top1_agreement"], 1.0);
    assert!(e["output_relative_error"].as_f64().unwrap() < 1e-5, "{e}");
    assert!(report["structure"][0]["factors"][0]["relative_error"].as_f64().unwrap() < 1e-6);
}

#[tokio::test]
async fn structural_steps_that_cannot_run_are_refused_with_pointers() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let bare = app.upload_ok(teacher()).await;
    let cases = [
        (
            json!({"model_id": bare, "steps": [{"op": "shrink", "width": {"ratio": 0.5}}]}),
            "/steps/0",
            "architecture graph",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "depth": {"drop": ["fc1"]}}]}),
            "/steps/0/depth/drop/0",
            "changes the shape [64] -> [256]",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "depth": {"drop": ["fc7"]}}]}),
            "/steps/0/depth/drop/0",
            "no layer `fc7`",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "width": {"ratios": {"fc9": 0.5}}}]}),
            "/steps/0/width/ratios/fc9",
            "no layer `fc9`",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "width": {"ratios": {"fc3": 0.5}}}]}),
            "/steps/0/width/ratios/fc3",
            "the model's output",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "depth": {"count": 1}}]}),
            "/steps/0/depth/count",
            "dataset",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8}, {"op": "factorize", "rank": 8}]}),
            "/steps/1",
            "before tensor-level steps",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "shrink", "width": {"ratio": 1.5}}]}),
            "/steps/0/width/ratio",
            "(0, 1]",
        ),
        (
            json!({"model_id": model, "steps": [{"op": "factorize", "rank": 8, "energy": 0.9}]}),
            "/steps/0/rank",
            "not both",
        ),
    ];
    for (spec, pointer, detail) in cases {
        let p = problem(app.create_job(&spec).await).await;
        assert_eq!(p["pointer"], pointer, "{spec}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(detail), "{spec}: {p}");
    }
    // Units ranked by their activation on the dataset.
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": true,
                      "steps": [{"op": "prune", "method": "structured", "amount": 0.5, "importance": "activation"}]});
    let (_, report, files) = run_job(&app, &spec).await;
    assert_eq!(shapes(&files["model.safetensors"])["fc2.weight"], vec![128, 128]);
    assert!(report["evaluation"]["after"]["accuracy"].as_f64().unwrap() > 0.85, "{}", report["evaluation"]);

    // Depth by count ranks the layers on the dataset and says which went.
    let spec = json!({"model_id": model, "dataset_id": dataset, "steps": [{"op": "shrink", "depth": {"count": 1}}]});
    let (_, report, _) = run_job(&app, &spec).await;
    let layers = &report["structure"][0]["layers"];
    assert_eq!(layers[0]["name"], "fc2");
    assert!(layers[0]["output_change"].as_f64().unwrap() > 0.0);

    // Without a graph, factorize writes the factors and says the model needs code to use them.
    let spec = json!({"model_id": bare, "steps": [{"op": "factorize", "rank": 8}]});
    let (_, report, files) = run_job(&app, &spec).await;
    assert!(shapes(&files["model.safetensors"]).contains_key("fc1.0.weight"));
    assert!(!files.contains_key("graph.json"));
    let notes = report["structure"][0]["notes"].to_string();
    assert!(notes.contains("no graph"), "{notes}");
}

#[tokio::test]
async fn a_shrunk_model_registers_with_its_graph_so_jobs_chain() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let spec = json!({"model_id": model, "register": true, "steps": [{"op": "shrink", "width": {"ratio": 0.5}}]});
    let (job, _, files) = run_job(&app, &spec).await;
    let registered = job["registered_model_id"].as_str().expect("the job names the model it registered").to_owned();
    let m = app.get_json(&format!("/v1/models/{registered}")).await;
    assert_eq!(m["has_graph"], true);
    assert_eq!(m["source_job"], job["id"]);
    assert_eq!(m["parameters"], 128 * 64 + 128 + 128 * 128 + 128 + 10 * 128 + 10);
    assert_eq!(app.download(&format!("/v1/models/{registered}/file")).await, files["model.safetensors"]);

    // The next job in the chain quantizes the shrunk model and evaluates it.
    let spec = json!({"model_id": registered, "dataset_id": dataset, "evaluate": true, "steps": [{"op": "quantize", "bits": 8}]});
    let (_, report, _) = run_job(&app, &spec).await;
    assert!(report["evaluation"]["top1_agreement"].as_f64().unwrap() > 0.98, "{}", report["evaluation"]);

    let spec =
        json!({"model_id": model, "register": true, "outputs": ["gguf"], "steps": [{"op": "quantize", "bits": 8}]});
    let p = problem(app.create_job(&spec).await).await;
    assert_eq!(p["pointer"], "/register");
}

#[tokio::test]
async fn the_trained_cnn_evaluates_as_pytorch_does_and_loses_half_its_filters() {
    let app = spawn_app(1).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let model = app.upload_ok(std::fs::read(format!("{dir}/digits_cnn.safetensors")).unwrap()).await;
    let graph: Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/digits_cnn.graph.json")).unwrap()).unwrap();
    assert_eq!(app.put_json(&format!("/v1/models/{model}/graph"), &graph).await.status(), 200);
    let res = app.upload_dataset(std::fs::read(mlp::DIGITS_TEST).unwrap()).await;
    let dataset = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": {"inputs": "images"},
                      "steps": [{"op": "prune", "method": "structured", "amount": 0.5, "importance": "activation"}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let e = &report["evaluation"];
    // PyTorch measured 356/360 when the fixture was trained (tests/fixtures/README.md).
    assert!((e["before"]["accuracy"].as_f64().unwrap() - 356.0 / 360.0).abs() < 1e-9, "{e}");
    assert!(e["after"]["accuracy"].as_f64().unwrap() > 0.93, "{e}");
    assert_eq!(shapes(&files["model.safetensors"])["conv1.weight"], vec![8, 1, 3, 3]);

    // Distillation trains on the tensor it names; `evaluate` naming another is refused.
    let steps = json!([{"op": "prune", "method": "structured", "amount": 0.5},
                       {"op": "distill", "epochs": 2, "inputs": "images"}]);
    let (_, report, _) = run_job(&app, &json!({"model_id": model, "dataset_id": dataset, "steps": steps})).await;
    assert_eq!(report["structure"][1]["training"]["epochs"].as_array().unwrap().len(), 2);
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": steps});
    assert_eq!(problem(app.create_job(&spec).await).await["pointer"], "/evaluate");
}

#[tokio::test]
async fn depth_by_count_keeps_the_integer_buffers_of_the_layers_that_stay() {
    let app = spawn_app(1).await;
    let f32s = |n: usize, seed: u64| values(n, seed, 0.5);
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = [
        ("fc1.weight", vec![4, 4], f32s(16, 1)),
        ("bn1.weight", vec![4], f32s(4, 2)),
        ("bn1.bias", vec![4], f32s(4, 3)),
        ("bn1.running_mean", vec![4], f32s(4, 4)),
        ("bn1.running_var", vec![4], vec![1.0; 4]),
        ("fc2.weight", vec![4, 4], f32s(16, 5)),
        ("out.weight", vec![3, 4], f32s(12, 6)),
    ]
    .into_iter()
    .map(|(n, s, v)| (n.to_string(), safetensors::Dtype::F32, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
    .collect();
    tensors.push(("bn1.num_batches_tracked".into(), safetensors::Dtype::I64, vec![], 7i64.to_le_bytes().to_vec()));
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::tensor::serialize(views, None).unwrap();
    let model = app.upload_ok(bytes).await;
    let graph = json!({"input": {"shape": [4]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "batch_norm", "name": "bn1"}, {"kind": "relu"},
        {"kind": "linear", "name": "fc2"}, {"kind": "linear", "name": "out"}]});
    assert_eq!(app.put_json(&format!("/v1/models/{model}/graph"), &graph).await.status(), 200);
    let data = safetensors_f32(&[("inputs", vec![32, 4], f32s(128, 9))]);
    let res = app.upload_dataset(data).await;
    let dataset = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "dataset_id": dataset, "steps": [{"op": "shrink", "depth": {"count": 1}}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let dropped: Vec<&str> = report["structure"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["dropped"] == true)
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    // With these seeds fc1 matters least: bn1 stays, and so must its integer buffer, which the
    // structural phase never loads (it is not floating point).
    assert_eq!(dropped, ["fc1"], "{report}");
    let out = safetensors::SafeTensors::deserialize(&files["model.safetensors"]).unwrap();
    let has = |n: &str| out.names().contains(&n);
    assert_eq!(has("bn1.num_batches_tracked"), dropped[0] != "bn1", "dropped {dropped:?}");
    assert!(!has(&format!("{}.weight", dropped[0])));
}

#[tokio::test]
async fn a_shrunk_model_distilled_from_the_original_recovers_accuracy_and_reruns_bit_for_bit() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let shrink = json!({"op": "shrink", "width": {"ratio": 0.375}});
    let job = |steps: Value| json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": steps});
    let (_, shrunk, _) = run_job(&app, &job(json!([shrink.clone()]))).await;
    let before = shrunk["evaluation"]["after"]["accuracy"].as_f64().unwrap();

    let steps = json!([shrink, {"op": "distill", "epochs": 10, "seed": 3}]);
    let (_, report, files) = run_job(&app, &job(steps.clone())).await;
    let after = report["evaluation"]["after"]["accuracy"].as_f64().unwrap();
    assert!(after > before + 0.02, "distillation recovers accuracy: {before} -> {after}");
    let training = &report["structure"][1]["training"];
    assert_eq!(training["epochs"].as_array().unwrap().len(), 10);
    assert_eq!(training["validated_against"], "labels");
    assert!(training["epochs"][9]["loss"].as_f64().unwrap() < training["epochs"][0]["loss"].as_f64().unwrap());
    assert_eq!(shapes(&files["model.safetensors"])["fc2.weight"], vec![96, 96]);
    let html = String::from_utf8(files["report.html"].clone()).unwrap();
    assert!(html.contains("validation accuracy (blue) over 10 epochs"), "report.html charts the training");

    // The same spec on the same data gives the same student, bit for bit.
    let (_, _, again) = run_job(&app, &json!({"model_id": model, "dataset_id": dataset, "steps": steps})).await;
    assert!(again["model.safetensors"] == files["model.safetensors"], "the student differs between two runs");

    // Matching the logits by MSE instead of the KD loss also trains.
    let steps = json!([{"op": "shrink", "width": {"ratio": 0.375}}, {"op": "distill", "epochs": 5, "loss": "mse"}]);
    let (_, report, _) = run_job(&app, &job(steps)).await;
    let epochs = report["structure"][1]["training"]["epochs"].as_array().unwrap().clone();
    assert!(epochs[4]["loss"].as_f64().unwrap() < epochs[0]["loss"].as_f64().unwrap(), "{epochs:?}");
    let spec = json!({"model_id": model, "steps": [{"op": "distill", "loss": "mse", "kd_weight": 0.5}]});
    assert_eq!(problem(app.create_job(&spec).await).await["pointer"], "/steps/0/loss");

    // Without a dataset, or without labels and a cross-entropy term, the plan refuses.
    let spec = json!({"model_id": model, "steps": [{"op": "distill"}]});
    assert_eq!(problem(app.create_job(&spec).await).await["pointer"], "/steps/0");
    let unlabelled = app.upload_dataset(safetensors_f32(&[("inputs", vec![8, 64], values(8 * 64, 1, 0.5))])).await;
    let unlabelled = unlabelled.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "dataset_id": unlabelled, "steps": [{"op": "distill", "kd_weight": 0.5}]});
    assert_eq!(problem(app.create_job(&spec).await).await["pointer"], "/steps/0/kd_weight");
    let spec = json!({"model_id": model, "dataset_id": unlabelled, "steps": [{"op": "distill", "epochs": 0}]});
    assert_eq!(problem(app.create_job(&spec).await).await["pointer"], "/steps/0/epochs");
}

#[tokio::test]
async fn quantization_aware_training_at_2_bits_keeps_at_least_the_accuracy_of_plain_rtn() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let job = |steps: Value| json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": steps});
    let (_, rtn, _) = run_job(&app, &job(json!([{"op": "quantize", "bits": 2}]))).await;
    let steps = json!([{"op": "qat", "bits": 2, "epochs": 10, "learning_rate": 3e-4}, {"op": "quantize", "bits": 2}]);
    let (_, qat, files) = run_job(&app, &job(steps)).await;
    let (rtn, qat_acc) = (
        rtn["evaluation"]["after"]["accuracy"].as_f64().unwrap(),
        qat["evaluation"]["after"]["accuracy"].as_f64().unwrap(),
    );
    assert!(qat_acc >= rtn, "QAT {qat_acc} vs RTN {rtn}");
    assert_eq!(qat["structure"][0]["op"], "qat");
    // The stored values are 2-bit codes times one scale per row: at most 4 distinct values a row.
    let (shape, values) = &read_f32_tensors(&files["model.safetensors"])["fc2.weight"];
    for row in values.chunks(shape[1]) {
        let mut distinct: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(distinct.len() <= 4, "{} levels in a 2-bit row", distinct.len());
    }
    let spec = json!({"model_id": model, "dataset_id": dataset, "steps": [{"op": "qat", "bits": 2}, {"op": "quantize", "bits": 4}]});
    let p = problem(app.create_job(&spec).await).await;
    assert_eq!(p["pointer"], "/steps/0/bits", "{p}");
}

#[tokio::test]
async fn the_student_shorthand_shrinks_and_distills_in_one_step() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let job = |steps: Value| json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": steps});
    let two_steps = json!([{"op": "shrink", "width": {"ratio": 0.375}}, {"op": "distill", "epochs": 10, "seed": 3}]);
    let (_, report, files) = run_job(&app, &job(two_steps)).await;
    let one_step = json!([{"op": "distill", "student": {"width": 0.375}, "epochs": 10, "seed": 3}]);
    let (_, short, short_files) = run_job(&app, &job(one_step)).await;
    // The same student as a `shrink` step then a `distill` step, in one record.
    let tensors = |files: &std::collections::BTreeMap<String, Vec<u8>>| read_f32_tensors(&files["model.safetensors"]);
    assert!(tensors(&short_files) == tensors(&files), "the shorthand trains another student");
    let record = &short["structure"][0];
    assert_eq!(record["op"], "distill");
    assert_eq!(record["groups"], report["structure"][0]["groups"]);
    assert_eq!(record["parameters_before"], report["structure"][0]["parameters_before"]);
    assert!(record["training"]["best_epoch"].as_u64().unwrap() > 0, "{record}");
    assert_eq!(short["structure"].as_array().unwrap().len(), 1);

    let drop = json!([{"op": "distill", "student": {"depth": {"drop": ["fc2"]}}, "epochs": 2}]);
    let (_, report, files) = run_job(&app, &job(drop)).await;
    assert!(!shapes(&files["model.safetensors"]).contains_key("fc2.weight"));
    assert_eq!(report["structure"][0]["training"]["epochs"].as_array().unwrap().len(), 2);

    for (student, pointer) in [
        (json!({"width": 1.5}), "/steps/0/student/width/ratio"),
        (json!({"depth": {"count": 1}}), "/steps/0/student/depth/count"),
        (json!({"op": "shrink", "width": 0.5}), "/steps/0/student/op"),
        (json!({"width": {"ratios": {"fc9": 0.5}}}), "/steps/0/student/width/ratios/fc9"),
        (json!("narrow"), "/steps/0/student"),
    ] {
        let spec = job(json!([{"op": "distill", "student": student}]));
        let p = problem(app.create_job(&spec).await).await;
        assert_eq!(p["pointer"], pointer, "{p}");
    }
}

/// The digits teacher (with graph and dataset) and a 64-32-10 student with random weights and
/// its graph: (teacher, dataset, student).
async fn teacher_and_student(app: &TestApp) -> (String, String, String) {
    let (teacher, dataset) = teacher_with_graph(app).await;
    let student = safetensors_f32(&[
        ("fc1.weight", vec![32, 64], values(32 * 64, 1, 0.125)),
        ("fc1.bias", vec![32], vec![0.0; 32]),
        ("fc2.weight", vec![10, 32], values(10 * 32, 2, 0.18)),
        ("fc2.bias", vec![10], vec![0.0; 10]),
    ]);
    let student = app.upload_ok(student).await;
    let graph = json!({"input": {"shape": [64]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}]});
    assert_eq!(app.put_json(&format!("/v1/models/{student}/graph"), &graph).await.status(), 200);
    (teacher, dataset, student)
}

#[tokio::test]
async fn an_uploaded_student_learns_from_the_jobs_model_as_its_teacher() {
    let app = spawn_app(1).await;
    let (teacher, dataset, student) = teacher_and_student(&app).await;
    let spec = |steps: Value| json!({"model_id": teacher, "dataset_id": dataset, "evaluate": true, "steps": steps});
    let distill =
        json!([{"op": "distill", "student_model_id": student, "epochs": 20, "learning_rate": 1e-2, "seed": 2}]);
    let plan = app.post_json("/v1/plans", &spec(distill.clone())).await.json::<Value>().await.unwrap();
    assert_eq!(plan["teacher"]["output_shape"], json!([10]), "{plan}");
    assert_eq!(plan["totals"]["parameters"], 32 * 64 + 32 + 320 + 10);
    let (_, report, files) = run_job(&app, &spec(distill)).await;
    assert_eq!(shapes(&files["model.safetensors"])["fc1.weight"], vec![32, 64], "the output is the student");
    let evaluation = &report["evaluation"];
    // The evaluation compares the student with its teacher.
    assert!((evaluation["before"]["accuracy"].as_f64().unwrap() - 0.9778).abs() < 0.01, "{evaluation}");
    let after = evaluation["after"]["accuracy"].as_f64().unwrap();
    let before = report["structure"][0]["training"]["validation_accuracy_before"].as_f64().unwrap();
    assert!(after > 0.85 && after > before + 0.3, "the student learns: {before} -> {after}");

    // Refusals name the field.
    let p = problem(app.create_job(&spec(json!([{"op": "distill", "student_model_id": "nope"}]))).await).await;
    assert_eq!(p["pointer"], "/steps/0/student_model_id", "{p}");
    let unknown = uuid::Uuid::now_v7().to_string();
    let p = problem(app.create_job(&spec(json!([{"op": "distill", "student_model_id": unknown}]))).await).await;
    assert_eq!(p["pointer"], "/steps/0/student_model_id", "{p}");
    let other = app.upload_ok(safetensors_f32(&[("fc.weight", vec![3, 64], values(192, 3, 0.1))])).await;
    let g = json!({"input": {"shape": [64]}, "layers": [{"kind": "linear", "name": "fc"}]});
    assert_eq!(app.put_json(&format!("/v1/models/{other}/graph"), &g).await.status(), 200);
    let p = problem(app.create_job(&spec(json!([{"op": "distill", "student_model_id": other}]))).await).await;
    assert_eq!(p["pointer"], "/steps/0/student_model_id", "{p}");
    assert!(p.to_string().contains("same logits"), "{p}");
    // A student without a graph, and a student named by a later step.
    let bare = app.upload_ok(safetensors_f32(&[("fc.weight", vec![10, 64], values(640, 4, 0.1))])).await;
    let p = problem(app.create_job(&spec(json!([{"op": "distill", "student_model_id": bare}]))).await).await;
    assert_eq!(p["pointer"], "/steps/0/student_model_id", "{p}");
    assert!(p.to_string().contains("no architecture graph"), "{p}");
    let later = json!([{"op": "quantize", "bits": 8}, {"op": "distill", "student_model_id": student}]);
    let p = problem(app.create_job(&spec(later)).await).await;
    assert!(p.to_string().contains("/steps/1/student_model_id"), "{p}");
    // Without held-out samples the last epoch is kept.
    let all = json!([{"op": "distill", "student_model_id": student, "epochs": 3, "validation_fraction": 0.0}]);
    let (_, report, _) = run_job(&app, &spec(all)).await;
    assert_eq!(report["structure"][0]["training"]["best_epoch"], 3);
}

#[tokio::test]
async fn a_student_read_by_a_queued_job_can_be_neither_deleted_nor_regraphed() {
    let app = spawn_app(0).await;
    let (teacher, dataset, student) = teacher_and_student(&app).await;
    let res = app.upload_dataset(std::fs::read(mlp::DIGITS_TRAIN).unwrap()).await;
    let train = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": teacher, "dataset_id": train, "evaluate": {"dataset_id": dataset},
                      "steps": [{"op": "distill", "student_model_id": student}]});
    app.create_job_ok(&spec).await;
    let res = app.client.delete(app.url(&format!("/v1/models/{student}"))).send().await.unwrap();
    assert_eq!(res.status(), 409);
    let res = app.client.delete(app.url(&format!("/v1/datasets/{dataset}"))).send().await.unwrap();
    assert_eq!(res.status(), 409, "the evaluation's dataset is in use too");
    let g = json!({"input": {"shape": [64]}, "layers": [{"kind": "linear", "name": "fc1"}]});
    assert_eq!(app.put_json(&format!("/v1/models/{student}/graph"), &g).await.status(), 409);
    assert_eq!(app.get(&format!("/v1/models/{student}")).await.status(), 200);
}

#[tokio::test]
async fn feature_distillation_matches_named_layers_of_equal_width() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let job = |distill: Value| json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": [distill]});
    // fc1 narrows to 96 units; fc2 keeps its 256 outputs, so the two fc2 layers can be matched.
    let student = json!({"width": {"ratios": {"fc1": 0.375}}});
    let both = json!({"op": "distill", "student": student, "epochs": 6, "seed": 5,
                      "features": [{"teacher": "fc2", "student": "/layers/2"}], "feature_weight": 0.5});
    let (_, report, _) = run_job(&app, &job(both)).await;
    let epochs = report["structure"][0]["training"]["epochs"].as_array().unwrap().clone();
    assert!(epochs[5]["loss"].as_f64().unwrap() < epochs[0]["loss"].as_f64().unwrap(), "{epochs:?}");
    for e in &epochs {
        assert!(e["train_accuracy"].as_f64().unwrap() > 0.5 && e["seconds"].as_f64().unwrap() > 0.0, "{e}");
    }
    let alone = json!({"op": "distill", "student": student, "epochs": 6, "loss": "features",
                       "features": [{"teacher": "fc2", "student": "fc2"}]});
    let (_, report, _) = run_job(&app, &job(alone)).await;
    let epochs = report["structure"][0]["training"]["epochs"].as_array().unwrap().clone();
    assert!(epochs[5]["loss"].as_f64().unwrap() < epochs[0]["loss"].as_f64().unwrap(), "{epochs:?}");

    // The student's fc2 and the teacher's fc2 are the same computation before training: with a
    // learning rate of ~0 the feature loss is exactly 0 (the right rows of the right layers).
    let same = json!({"op": "distill", "epochs": 1, "loss": "features", "learning_rate": 1e-30,
                      "features": [{"teacher": "fc2", "student": "fc2"}, {"teacher": "/layers/1", "student": "/layers/1"}]});
    let (_, report, _) = run_job(&app, &job(same)).await;
    assert_eq!(report["structure"][0]["training"]["epochs"][0]["loss"], 0.0, "{}", report["structure"]);
    // The teacher's feature outputs are held for every sample: the plan counts them.
    let peak = |d: Value| {
        let body = job(d);
        let app = &app;
        async move {
            app.post_json("/v1/plans", &body).await.json::<Value>().await.unwrap()["peak_memory_bytes"]
                .as_u64()
                .unwrap()
        }
    };
    let without = peak(json!({"op": "distill"})).await;
    let with = peak(json!({"op": "distill", "features": [{"teacher": "fc2", "student": "fc2"}]})).await;
    assert_eq!(with - without, 4 * 360 * 256, "one float per sample and unit of fc2");
    // Features alone need no labels.
    let unlabelled = app.upload_dataset(safetensors_f32(&[("inputs", vec![40, 64], values(40 * 64, 1, 0.5))])).await;
    let unlabelled = unlabelled.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let alone = json!({"model_id": model, "dataset_id": unlabelled, "steps": [{"op": "distill", "epochs": 1,
                       "loss": "features", "features": [{"teacher": "fc2", "student": "fc2"}]}]});
    run_job(&app, &alone).await;

    for (distill, pointer) in [
        (
            json!({"op": "distill", "student": {"width": 0.375}, "features": [{"teacher": "fc2", "student": "fc2"}]}),
            "/steps/0/features/0",
        ),
        (json!({"op": "distill", "features": [{"teacher": "fc2", "student": "fc9"}]}), "/steps/0/features/0/student"),
        (json!({"op": "distill", "features": [{"teacher": "fc0", "student": "fc2"}]}), "/steps/0/features/0/teacher"),
        (json!({"op": "distill", "loss": "features"}), "/steps/0/loss"),
        (json!({"op": "distill", "feature_weight": 2.0}), "/steps/0/feature_weight"),
        (json!({"op": "distill", "features": []}), "/steps/0/features"),
        (json!({"op": "distill", "betas": [0.9, 1.0]}), "/steps/0/betas"),
    ] {
        let p = problem(app.create_job(&job(distill)).await).await;
        assert_eq!(p["pointer"], pointer, "{p}");
    }
}

#[tokio::test]
async fn a_job_predicted_above_the_memory_limit_is_refused_before_it_runs() {
    // 70 MiB: room for the digits teacher's distillation in batches of 64 (the prediction is
    // 64 MiB of base, the model 7 times, the data and 16 KiB of activations per sample of a
    // batch), not in one batch of all 360 samples.
    let app = spawn_app_with(1, |s| s.queue.max_job_memory_bytes = Some(70 << 20)).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let spec = |distill: Value| json!({"model_id": model, "dataset_id": dataset, "steps": [distill]});
    let small = app.post_json("/v1/plans", &spec(json!({"op": "distill", "epochs": 1}))).await;
    let small: Value = small.json().await.unwrap();
    assert_eq!(small["refusals"], json!([]), "{small}");
    let big = spec(json!({"op": "distill", "epochs": 1, "batch_size": 65536}));
    let small_peak = small["peak_memory_bytes"].as_u64().unwrap();
    let plan: Value = app.post_json("/v1/plans", &big).await.json().await.unwrap();
    assert!(plan["peak_memory_bytes"].as_u64().unwrap() > 70 << 20 && small_peak < 70 << 20, "{plan}");
    assert_eq!(
        plan["peak_memory_bytes"],
        app.post_json("/v1/plans", &spec(json!({"op": "distill", "batch_size": 360})))
            .await
            .json::<Value>()
            .await
            .unwrap()["peak_memory_bytes"],
        "a batch is at most the dataset"
    );
    let p = problem(app.create_job(&big).await).await;
    assert_eq!(p["pointer"], "/steps/0/batch_size", "{p}");
    assert!(p.to_string().contains("queue.max_job_memory_bytes"), "{p}");
    let (_, report, _) = run_job(&app, &spec(json!({"op": "distill", "epochs": 1}))).await;
    assert_eq!(report["structure"][0]["training"]["epochs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_student_trained_on_the_train_split_is_evaluated_on_the_test_split() {
    let app = spawn_app(1).await;
    let (model, test) = teacher_with_graph(&app).await;
    let res = app.upload_dataset(std::fs::read(mlp::DIGITS_TRAIN).unwrap()).await;
    let train = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "dataset_id": train, "evaluate": {"dataset_id": test},
                      "steps": [{"op": "distill", "student": {"width": 0.375}, "epochs": 10, "learning_rate": 0.003, "seed": 1}]});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    assert_eq!(plan["evaluation"]["samples"], 360, "{plan}");
    assert_eq!(plan["evaluation"]["separate_dataset"], true);
    let (_, report, _) = run_job(&app, &spec).await;
    let e = &report["evaluation"];
    assert_eq!(e["samples"], 360);
    assert!((e["before"]["accuracy"].as_f64().unwrap() - mlp::TEACHER_ACCURACY).abs() < 1e-12, "{e}");
    // The goal for width 256 -> 96 then distillation: at least 0.96 on the test split.
    assert!(e["after"]["accuracy"].as_f64().unwrap() >= 0.96, "{e}");
    assert_eq!(report["structure"][0]["training"]["train_samples"], 1293);

    // The evaluation dataset must exist and be a UUID.
    let unknown = uuid::Uuid::now_v7().to_string();
    let bad = json!({"model_id": model, "dataset_id": train, "evaluate": {"dataset_id": unknown}, "steps": [{"op": "quantize", "bits": 8}]});
    assert_eq!(problem(app.create_job(&bad).await).await["pointer"], "/evaluate/dataset_id");
    let bad = json!({"model_id": model, "evaluate": {"dataset_id": "x"}, "steps": [{"op": "quantize", "bits": 8}]});
    assert_eq!(problem(app.create_job(&bad).await).await["pointer"], "/evaluate/dataset_id");
    // Only an evaluation dataset: enough for `evaluate`.
    let only = json!({"model_id": model, "evaluate": {"dataset_id": test}, "steps": [{"op": "quantize", "bits": 8}]});
    let (_, report, _) = run_job(&app, &only).await;
    assert_eq!(report["evaluation"]["samples"], 360);
}
