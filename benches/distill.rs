//! Knowledge distillation on the digits fixtures, measured as the issue asks: each student is
//! trained on `digits_train` and evaluated on `digits_test` (360 rows: one error is 0.28 points)
//! by the same engine a job runs.
//!
//! `cargo bench --bench distill` prints, per recipe, the test accuracy of the teacher and of the
//! student, the student's parameters and the training time.

use std::path::{Path, PathBuf};
use std::time::Instant;

use modelpress::compress::engine::{execute, Inputs, Silent};
use modelpress::compress::plan::{prepare, PlanInputs, Teacher};
use modelpress::compress::spec::{parse_compress, parse_evaluate};
use modelpress::formats::safetensors::{read_header, Dtype, SafetensorsWriter};
use modelpress::graph::lowrank::gaussian;
use modelpress::graph::Graph;
use serde_json::{json, Value};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn graph(path: &Path) -> Graph {
    Graph::parse(&serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap()
}

/// A 64-32-10 MLP with PyTorch's default initialisation scale (uniform-like, std 1/sqrt(3 fan_in)).
fn small_student(path: &Path) -> Graph {
    let mut out = SafetensorsWriter::create(path).unwrap();
    for (name, shape, fan_in, seed) in [
        ("fc1.bias", vec![32], 64, 2),
        ("fc1.weight", vec![32, 64], 64, 1),
        ("fc2.bias", vec![10], 32, 4),
        ("fc2.weight", vec![10, 32], 32, 3),
    ] {
        let n: usize = shape.iter().product();
        let scale = 1.0 / (3.0 * fan_in as f32).sqrt();
        let bytes: Vec<u8> = gaussian(n, seed).iter().flat_map(|v| (v * scale).to_le_bytes()).collect();
        out.write(name, Dtype::F32, &shape, &bytes).unwrap();
    }
    out.finish(&Default::default()).unwrap();
    Graph::parse(&json!({"input": {"shape": [64]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}]}))
    .unwrap()
}

struct Run {
    teacher_accuracy: f64,
    accuracy: f64,
    parameters: u64,
    seconds: f64,
}

/// Runs `steps` on `model` (with `graph`), trained on digits_train and evaluated on digits_test
/// (`inputs` names the dataset tensor); `teacher` is a separate teacher (file, graph).
fn run(dir: &Path, model: &Path, graph: Graph, steps: Value, inputs: &str, teacher: Option<(&Path, Graph)>) -> Run {
    let mut spec = parse_compress(&steps, None).unwrap();
    spec.evaluate = parse_evaluate(&json!({"inputs": inputs})).unwrap();
    let (train, test) = (fixture("digits_train.safetensors"), fixture("digits_test.safetensors"));
    let (train_h, test_h) = (read_header(&train, u64::MAX).unwrap(), read_header(&test, u64::MAX).unwrap());
    let inputs = PlanInputs {
        header: read_header(model, u64::MAX).unwrap(),
        graph: Some(graph),
        dataset: Some(&train_h),
        eval_dataset: Some(&test_h),
        teacher: teacher.as_ref().map(|(p, g)| Teacher { graph: g.clone(), header: read_header(p, u64::MAX).unwrap() }),
        files: None,
    };
    let plan = prepare(spec, inputs);
    assert!(plan.refusals.is_empty(), "{:?}", plan.refusals);
    let out = tempfile::tempdir_in(dir).unwrap();
    let files = Inputs {
        dataset_path: Some(&train),
        eval_dataset_path: Some(&test),
        teacher_path: teacher.as_ref().map(|(p, _)| *p),
        ..Inputs::model(model, "bench", "bench")
    };
    let started = Instant::now();
    let output = execute(&plan, &files, out.path(), &Silent).unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let e = output.report.evaluation.expect("evaluated");
    Run {
        teacher_accuracy: e.before.accuracy.unwrap_or(0.0),
        accuracy: e.after.accuracy.unwrap_or(0.0),
        parameters: output.report.totals.parameters,
        seconds,
    }
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("distill") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-distill");
    std::fs::create_dir_all(&dir).unwrap();
    let teacher = fixture("teacher_mlp.safetensors");
    let teacher_graph = graph(&fixture("teacher_mlp.graph.json"));
    let student = dir.join("student_64_32_10.safetensors");
    let student_graph = small_student(&student);
    let cnn = fixture("digits_cnn.safetensors");
    let cnn_graph = graph(&fixture("digits_cnn.graph.json"));
    let separate = || Some((teacher.as_path(), teacher_graph.clone()));

    let mut recipes: Vec<(String, Run)> = Vec::new();
    // The small student from one random start, with and without the teacher, over three seeds
    // (the seed orders the batches and splits nothing: the held-out rows are the last 10%).
    for seed in 1..=3 {
        for (kd_weight, what) in [
            (0.9, "distilled from the teacher (T 4, kd_weight 0.9)"),
            (0.0, "without the teacher (kd_weight 0: labels only)"),
        ] {
            let steps =
                json!([{"op": "distill", "epochs": 100, "learning_rate": 0.01, "kd_weight": kd_weight, "seed": seed}]);
            let r = run(&dir, &student, student_graph.clone(), steps, "inputs", separate());
            recipes.push((format!("64-32-10 student {what}, 100 epochs, lr 1e-2, seed {seed}"), r));
        }
    }
    let more: Vec<(&str, Run)> = vec![
        (
            "width 256 -> 96, then distilled (10 epochs, lr 3e-3)",
            run(
                &dir,
                &teacher,
                teacher_graph.clone(),
                json!([{"op": "distill", "student": {"width": 0.375}, "epochs": 10, "learning_rate": 0.003, "seed": 1}]),
                "inputs",
                None,
            ),
        ),
        (
            "width 256 -> 96, no training",
            run(&dir, &teacher, teacher_graph.clone(), json!([{"op": "shrink", "width": 0.375}]), "inputs", None),
        ),
        (
            "fc2 dropped, then distilled (10 epochs, lr 3e-3)",
            run(
                &dir,
                &teacher,
                teacher_graph.clone(),
                json!([{"op": "distill", "student": {"depth": {"drop": ["fc2"]}}, "epochs": 10, "learning_rate": 0.003, "seed": 1}]),
                "inputs",
                None,
            ),
        ),
        (
            "fc2 dropped, no training",
            run(
                &dir,
                &teacher,
                teacher_graph.clone(),
                json!([{"op": "shrink", "depth": {"drop": ["fc2"]}}]),
                "inputs",
                None,
            ),
        ),
        (
            "CNN, 50% of the filters removed, then distilled (10 epochs, lr 3e-3)",
            run(
                &dir,
                &cnn,
                cnn_graph.clone(),
                json!([{"op": "distill", "student": {"width": 0.5}, "epochs": 10, "learning_rate": 0.003, "seed": 1, "inputs": "images"}]),
                "images",
                None,
            ),
        ),
        (
            "CNN, 50% of the filters removed, no training",
            run(&dir, &cnn, cnn_graph.clone(), json!([{"op": "shrink", "width": 0.5}]), "images", None),
        ),
        (
            "int2 per channel, plain RTN",
            run(&dir, &teacher, teacher_graph.clone(), json!([{"op": "quantize", "bits": 2}]), "inputs", None),
        ),
        (
            "int2 per channel after QAT (10 epochs, lr 3e-4)",
            run(
                &dir,
                &teacher,
                teacher_graph.clone(),
                json!([{"op": "qat", "bits": 2, "epochs": 10, "learning_rate": 0.0003, "seed": 1}, {"op": "quantize", "bits": 2}]),
                "inputs",
                None,
            ),
        ),
    ];
    recipes.extend(more.into_iter().map(|(n, r)| (n.to_string(), r)));
    println!(
        "{:<100} {:>8} {:>8} {:>10} {:>8}",
        "recipe (train: digits_train, test: digits_test)", "teacher", "student", "parameters", "seconds"
    );
    for (name, r) in recipes {
        println!("{name:<100} {:>8.4} {:>8.4} {:>10} {:>8.2}", r.teacher_accuracy, r.accuracy, r.parameters, r.seconds);
    }
}
