//! Architecture graphs over HTTP, and evaluation of the model before and after a job.

use serde_json::{json, Value};

use crate::helpers::*;
use crate::mlp;

pub const TEACHER_GRAPH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/teacher_mlp.graph.json");

pub fn teacher_graph() -> Value {
    serde_json::from_str(&std::fs::read_to_string(TEACHER_GRAPH).unwrap()).unwrap()
}

/// Uploads the teacher with its graph and the digits test split; returns (model, dataset) ids.
pub async fn teacher_with_graph(app: &TestApp) -> (String, String) {
    let model = app.upload_ok(teacher()).await;
    let res = app.put_json(&format!("/v1/models/{model}/graph"), &teacher_graph()).await;
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let res = app.upload_dataset(std::fs::read(mlp::DIGITS_TEST).unwrap()).await;
    assert_eq!(res.status(), 201);
    let dataset = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    (model, dataset)
}

#[tokio::test]
async fn a_graph_attaches_and_reads_back_with_every_layer_shape() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let res = app.get(&format!("/v1/models/{model}/graph")).await;
    assert_eq!(problem(res, 404).await["code"], "no_graph");

    let res = app.put_json(&format!("/v1/models/{model}/graph"), &teacher_graph()).await;
    assert_eq!(res.status(), 200);
    let put: Value = res.json().await.unwrap();
    let summary = &put["summary"];
    assert_eq!(summary["output_shape"], json!([10]));
    assert_eq!(summary["parameters"], 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10);
    assert_eq!(summary["unused_tensors"], json!([]));
    assert_eq!(summary["layers"][2]["shape_in"], json!([256]));
    assert_eq!(put, app.get_json(&format!("/v1/models/{model}/graph")).await);
    assert_eq!(app.get_json(&format!("/v1/models/{model}")).await["has_graph"], true);

    let res = app.client.delete(app.url(&format!("/v1/models/{model}/graph"))).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(app.get_json(&format!("/v1/models/{model}")).await["has_graph"], false);
}

#[tokio::test]
async fn every_bad_graph_class_is_a_422_naming_the_layer_and_nothing_is_stored() {
    let app = spawn_app(1).await;
    let model = app.upload_ok(teacher()).await;
    let path = format!("/v1/models/{model}/graph");
    let linear = |name: &str| json!({"kind": "linear", "name": name});
    let cases = [
        // A tensor the model does not have.
        (
            json!({"input": {"shape": [64]}, "layers": [linear("fc1"), linear("fc9")]}),
            "/layers/1",
            "no tensor `fc9.weight`",
        ),
        // Shapes that do not chain: fc3 expects 256 features, fc1 gives 256... fc3 after fc3.
        (
            json!({"input": {"shape": [64]}, "layers": [linear("fc1"), linear("fc3"), linear("fc2")]}),
            "/layers/2",
            "expects 256 features",
        ),
        (json!({"input": {"shape": [32]}, "layers": [linear("fc1")]}), "/layers/0", "expects 64 features"),
        // An unknown kind.
        (
            json!({"input": {"shape": [64]}, "layers": [linear("fc1"), {"kind": "swish"}]}),
            "/layers/1/kind",
            "unknown layer kind `swish`",
        ),
        // A residual block whose layers change the shape.
        (
            json!({"input": {"shape": [64]}, "layers": [{"kind": "residual", "layers": [linear("fc1")]}]}),
            "/layers/0",
            "must keep it",
        ),
        (
            json!({"input": {"shape": [64]}, "layers": [linear("fc1"), {"kind": "residual", "layers": [{"kind": "relu"}, linear("fc3")]}]}),
            "/layers/1",
            "from [256] to [10]",
        ),
    ];
    for (graph, pointer, detail) in cases {
        let p = problem(app.put_json(&path, &graph).await, 422).await;
        assert_eq!(p["pointer"], pointer, "{graph}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(detail), "{graph}: {p}");
        assert_eq!(p["errors"][0]["pointer"], pointer);
        assert_eq!(problem(app.get(&path).await, 404).await["code"], "no_graph");
    }
    // A bad graph does not replace a good one.
    assert_eq!(app.put_json(&path, &teacher_graph()).await.status(), 200);
    let bad = json!({"input": {"shape": [64]}, "layers": [linear("fc2")]});
    problem(app.put_json(&path, &bad).await, 422).await;
    assert_eq!(app.get_json(&path).await["graph"], serde_json::to_value(teacher_graph()).unwrap());
}

/// Accuracy of the teacher's layers read from a GGUF file, by the plain matrix reference.
fn gguf_accuracy(bytes: &[u8]) -> f64 {
    let tensors = read_gguf(bytes);
    let list: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(n, (s, v))| (n.as_str(), s.clone(), v.clone())).collect();
    mlp::accuracy(&safetensors_f32(&list))
}

/// One error in 360 samples is 0.28 points.
const ONE_SAMPLE: f64 = 1.0 / 360.0;

#[tokio::test]
async fn the_digits_teacher_evaluated_by_modelpress_matches_plain_matrix_code() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": true,
                      "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}]});
    let (_, report, files) = run_job(&app, &spec).await;
    let e = &report["evaluation"];
    assert_eq!(e["samples"], 360);
    assert_eq!(e["labels"], "labels");
    let before = e["before"]["accuracy"].as_f64().unwrap();
    assert!((before - mlp::TEACHER_ACCURACY).abs() < 1e-12, "{e}");
    assert!((before - mlp::accuracy(&teacher())).abs() < 1e-12, "{e}");
    let after = mlp::accuracy(&files["model.safetensors"]);
    assert!((e["after"]["accuracy"].as_f64().unwrap() - after).abs() < 1e-12, "{e} vs {after}");
    assert!(e["top1_agreement"].as_f64().unwrap() > 0.97, "{e}");
    assert!(e["kl_mean"].as_f64().unwrap() > 0.0 && e["kl_mean"].as_f64().unwrap() < 0.05, "{e}");
    assert!(e["output_relative_error"].as_f64().unwrap() < 0.1, "{e}");
    assert!(e["before"]["loss"].as_f64().unwrap() < 0.2, "{e}");
    let html = String::from_utf8(files["report.html"].clone()).unwrap();
    assert!(html.contains("Evaluation on 360 samples"), "report.html shows the evaluation");

    // A GGUF-only job evaluates the values the GGUF file decodes to.
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": {"batch_size": 64},
                      "steps": [{"op": "quantize", "gguf_type": "q4_0"}], "outputs": ["gguf"]});
    let (_, report, files) = run_job(&app, &spec).await;
    let e = &report["evaluation"];
    assert_eq!(e["batch_size"], 64);
    let after = gguf_accuracy(&files["model.gguf"]);
    assert!((e["after"]["accuracy"].as_f64().unwrap() - after).abs() < 1e-12, "{e} vs {after}");
    assert!((after - 0.975).abs() <= 3.0 * ONE_SAMPLE, "q4_0 accuracy {after} (PyTorch reference 0.975)");
}

#[tokio::test]
async fn evaluation_without_a_graph_or_with_data_that_does_not_fit_is_refused_before_running() {
    let app = spawn_app(1).await;
    let (model, dataset) = teacher_with_graph(&app).await;
    let step = json!([{"op": "quantize", "bits": 8}]);

    let spec = json!({"model_id": model, "evaluate": true, "steps": step});
    let p = problem(app.create_job(&spec).await, 422).await;
    assert_eq!(p["pointer"], "/dataset_id", "{p}");

    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": {"inputs": "images"}, "steps": step});
    let p = problem(app.create_job(&spec).await, 422).await;
    assert_eq!(p["pointer"], "/evaluate", "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("[360, 1, 8, 8]") && detail.contains("[64]"), "names both shapes: {detail}");

    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": {"batch_size": 0}, "steps": step});
    assert_eq!(problem(app.create_job(&spec).await, 422).await["pointer"], "/evaluate/batch_size");

    let bare = app.upload_ok(teacher()).await;
    let spec = json!({"model_id": bare, "dataset_id": dataset, "evaluate": true, "steps": step});
    let p = problem(app.create_job(&spec).await, 422).await;
    assert_eq!(p["pointer"], "/evaluate");
    assert!(p["detail"].as_str().unwrap().contains("PUT /v1/models/{id}/graph"), "{p}");

    // The plan shows the graph and what the evaluation will read.
    let spec = json!({"model_id": model, "dataset_id": dataset, "evaluate": true, "steps": step});
    let plan: Value = app.post_json("/v1/plans", &spec).await.json().await.unwrap();
    assert_eq!(plan["evaluation"]["samples"], 360);
    assert_eq!(plan["graph"]["output_shape"], json!([10]));
}

/// A `multipart/form-data` body with the given (name, bytes) parts.
fn multipart(parts: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "modelpress-test-boundary";
    let mut body = Vec::new();
    for (name, bytes) in parts {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn a_model_and_its_graph_upload_together_or_not_at_all() {
    let app = spawn_app(1).await;
    let graph = serde_json::to_vec(&teacher_graph()).unwrap();
    let post = |(ct, body): (String, Vec<u8>)| {
        app.client.post(app.url("/v1/models?name=teacher")).header("content-type", ct).body(body).send()
    };
    // The graph may come first: it is checked once the model's header is known.
    let res = post(multipart(&[("graph", &graph), ("model", &teacher())])).await.unwrap();
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    let m: Value = res.json().await.unwrap();
    assert_eq!(m["has_graph"], true);
    assert_eq!(m["name"], "teacher", "`?name=` wins over the part's file name");
    let (ct, body) = multipart(&[("model", &teacher())]);
    let res = app.client.post(app.url("/v1/models")).header("content-type", ct).body(body).send().await.unwrap();
    assert_eq!(res.json::<Value>().await.unwrap()["name"], "model", "the part's file name by default");
    let g = app.get_json(&format!("/v1/models/{}/graph", m["id"].as_str().unwrap())).await;
    assert_eq!(g["summary"]["output_shape"], json!([10]));

    let bad =
        serde_json::to_vec(&json!({"input": {"shape": [32]}, "layers": [{"kind": "linear", "name": "fc1"}]})).unwrap();
    let (before, blobs, _) = app.stored_state().await;
    let p = problem(post(multipart(&[("model", &teacher()), ("graph", &bad)])).await.unwrap(), 422).await;
    assert_eq!(p["pointer"], "/graph/layers/0", "{p}");
    let p = problem(post(multipart(&[("model", &teacher()), ("weights", b"x")])).await.unwrap(), 400).await;
    assert!(p["detail"].as_str().unwrap().contains("unknown part `weights`"), "{p}");
    let p = problem(post(multipart(&[("graph", &graph)])).await.unwrap(), 400).await;
    assert!(p["detail"].as_str().unwrap().contains("no `model` part"), "{p}");
    assert_eq!(app.stored_state().await, (before, blobs, 0), "nothing stored, no staging file left");
}
