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
fn a_refused_spec_exits_2_with_the_reason_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("job.json");
    std::fs::write(&spec, r#"{"steps": [{"op": "quantize", "gguf_type": "q4_k"}]}"#).unwrap();
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
