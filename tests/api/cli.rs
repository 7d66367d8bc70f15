//! The one-shot CLI runs the same engine as the server.

use std::process::Command;

use serde_json::Value;

use crate::helpers::*;

fn modelpress(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_modelpress")).args(args).output().expect("binary runs")
}

#[test]
fn compress_writes_the_same_artifacts_as_a_job_and_plan_prints_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(
        &spec,
        r#"{"steps": [{"op": "quantize", "bits": 8}], "outputs": ["safetensors", "compressed-tensors"]}"#,
    )
    .unwrap();
    let teacher = crate::mlp::TEACHER;

    let plan = modelpress(&["plan", teacher, "--spec", spec.to_str().unwrap()]);
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["refusals"], serde_json::json!([]));

    let out = dir.path().join("out");
    let run = modelpress(&["compress", teacher, "--spec", spec.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    for name in [
        "model.safetensors",
        "report.json",
        "report.html",
        "compressed-tensors/model.safetensors",
        "compressed-tensors/config.json",
    ] {
        assert!(out.join(name).exists(), "{name}");
    }
    assert!(!out.join(".partial").exists());
    assert!(crate::mlp::accuracy(&std::fs::read(out.join("model.safetensors")).unwrap()) >= 0.97);
}

#[test]
fn a_lone_shard_is_refused_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("model-00001-of-00004.safetensors");
    std::fs::write(&shard, small_model()).unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "bits": 8}]}"#).unwrap();
    let out = dir.path().join("out");
    let run = modelpress(&[
        "compress",
        shard.to_str().unwrap(),
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("shard 1 of 4"), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(!out.exists());
}

#[test]
fn a_refused_spec_exits_2_with_the_reason_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "gguf_type": "q4_k", "fallback": "refuse"}]}"#).unwrap();
    let out = dir.path().join("out");
    let run = modelpress(&[
        "compress",
        crate::mlp::TEACHER,
        "--spec",
        spec.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(run.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("tensor `fc1.weight`") && stderr.contains("q4_k block size 256"), "{stderr}");
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());
    let _ = small_model();
}

#[test]
fn plan_exits_quietly_when_its_reader_goes_away() {
    use std::io::Read;
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    // 3,000 tensors: a plan of several hundred KiB, well past a pipe's 64 KiB buffer.
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> =
        (0..3000).map(|i| (format!("layers.{i}.weight"), vec![1, 4], vec![0.5; 4])).collect();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    let model = dir.path().join("model.safetensors");
    std::fs::write(&model, safetensors_f32(&refs)).unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "bits": 8}]}"#).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .args(["plan", model.to_str().unwrap(), "--spec", spec.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 800];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap(); // `| head -c 800`, then the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{:?}: {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn compress_with_a_graph_and_a_dataset_evaluates_the_model_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "gguf_type": "q8_0"}], "outputs": ["gguf"]}"#).unwrap();
    let out = dir.path().join("out");
    let graph = crate::graphs::TEACHER_GRAPH;
    let (spec, out_s) = (spec.to_str().unwrap(), out.to_str().unwrap());
    let args = ["--spec", spec, "--graph", graph, "--dataset", crate::mlp::DIGITS_TEST];
    let run = modelpress(&[&["compress", crate::mlp::TEACHER][..], &args, &["--out", out_s]].concat());
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let e = &report["evaluation"];
    assert!((e["before"]["accuracy"].as_f64().unwrap() - crate::mlp::TEACHER_ACCURACY).abs() < 1e-12, "{e}");
    // Q8_0 keeps the teacher's answers (PyTorch reference: same accuracy).
    assert!(e["top1_agreement"].as_f64().unwrap() >= 0.99, "{e}");

    // A graph that does not fit the model is refused by the plan, naming the layer.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"input": {"shape": [32]}, "layers": [{"kind": "linear", "name": "fc1"}]}"#).unwrap();
    let plan = modelpress(&["plan", crate::mlp::TEACHER, "--spec", spec, "--graph", bad.to_str().unwrap()]);
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    assert_eq!(plan["refusals"][0]["pointer"], "/graph/layers/0", "{plan}");
}

#[test]
fn compress_distills_a_student_file_from_a_teacher_file() {
    let dir = tempfile::tempdir().unwrap();
    let student = dir.path().join("student.safetensors");
    std::fs::write(
        &student,
        safetensors_f32(&[
            ("fc1.weight", vec![32, 64], values(32 * 64, 1, 0.125)),
            ("fc1.bias", vec![32], vec![0.0; 32]),
            ("fc2.weight", vec![10, 32], values(10 * 32, 2, 0.18)),
            ("fc2.bias", vec![10], vec![0.0; 10]),
        ]),
    )
    .unwrap();
    let graph = dir.path().join("student.graph.json");
    std::fs::write(
        &graph,
        r#"{"input": {"shape": [64]}, "layers": [{"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}]}"#,
    )
    .unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "distill", "epochs": 4, "learning_rate": 0.01}]}"#).unwrap();
    let out = dir.path().join("out");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let (student_s, graph_s, spec_s, out_s) = (s(&student), s(&graph), s(&spec), s(&out));
    let teacher = ["--teacher", crate::mlp::TEACHER, "--teacher-graph", crate::graphs::TEACHER_GRAPH];
    let run = modelpress(
        &[
            &["compress", &student_s, "--spec", &spec_s, "--graph", &graph_s, "--dataset", crate::mlp::DIGITS_TEST][..],
            &teacher,
            &["--out", &out_s],
        ]
        .concat(),
    );
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let report: Value = serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    let e = &report["evaluation"];
    assert!((e["before"]["accuracy"].as_f64().unwrap() - crate::mlp::TEACHER_ACCURACY).abs() < 1e-12, "{e}");
    assert_eq!(report["structure"][0]["training"]["epochs"].as_array().unwrap().len(), 4);

    // `student_model_id` is the server's; the CLI says what to give instead.
    let id = uuid::Uuid::now_v7();
    std::fs::write(&spec, format!(r#"{{"steps": [{{"op": "distill", "student_model_id": "{id}"}}]}}"#)).unwrap();
    let run =
        modelpress(&["plan", &student_s, "--spec", &spec_s, "--graph", &graph_s, "--dataset", crate::mlp::DIGITS_TEST]);
    let plan: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(plan["refusals"][0]["pointer"], "/steps/0/student_model_id", "{plan}");
    assert!(plan["refusals"][0]["detail"].as_str().unwrap().contains("--teacher"), "{plan}");
    // A teacher without a distill step is refused.
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "bits": 8}]}"#).unwrap();
    let run = modelpress(&[&["plan", &student_s, "--spec", &spec_s, "--graph", &graph_s][..], &teacher].concat());
    let plan: Value = serde_json::from_slice(&run.stdout).unwrap();
    assert_eq!(plan["refusals"][0]["pointer"], "/steps", "{plan}");
}
