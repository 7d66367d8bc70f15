//! Running models: the forward pass of the digits MLP and of a small CNN at batch 256, the
//! rank-256 factorization of a 4096x4096 matrix, and one knowledge-distillation step (teacher
//! 784-1024-1024-10, student 784-256-10, batch 256), against PyTorch on the same data.
//!
//! `cargo bench --bench graph` writes the data it uses to `target/bench-graph/` and prints its
//! figures; `python tests/python/bench_graph_torch.py` then measures PyTorch on those files and
//! writes `target/bench-graph/torch.json`, which the next bench run turns into ratios.

use std::path::Path;
use std::time::Instant;

use modelpress::formats::safetensors::{Dtype, SafetensorsWriter};
use modelpress::graph::forward::{read_weights, Network, Weights};
use modelpress::graph::lowrank::{factorize, gaussian, Rank};
use modelpress::graph::train::{kd_loss, AdamW, Trainable};
use modelpress::graph::Graph;
use serde_json::json;

const BATCH: usize = 256;

fn load(path: &Path) -> Weights {
    read_weights(path).unwrap()
}

fn save(path: &Path, w: &Weights) {
    let mut out = SafetensorsWriter::create(path).unwrap();
    let mut names: Vec<&String> = w.keys().collect();
    names.sort();
    for n in names {
        let (shape, values) = &w[n];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        out.write(n, Dtype::F32, shape, &bytes).unwrap();
    }
    out.finish(&Default::default()).unwrap();
}

/// Median milliseconds of `runs` calls.
fn median_ms(runs: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

fn cnn() -> (Graph, Weights) {
    let graph = Graph::parse(&json!({"input": {"shape": [1, 8, 8]}, "layers": [
        {"kind": "conv2d", "name": "conv1", "padding": 1}, {"kind": "batch_norm", "name": "bn1"}, {"kind": "relu"},
        {"kind": "residual", "layers": [{"kind": "conv2d", "name": "b1.conv", "padding": 1}, {"kind": "relu"}]},
        {"kind": "conv2d", "name": "dw", "groups": 32, "padding": 1}, {"kind": "relu"},
        {"kind": "max_pool2d", "kernel": 2}, {"kind": "flatten"}, {"kind": "linear", "name": "fc"}]}))
    .unwrap();
    let mut w = Weights::new();
    let mut put = |name: &str, shape: &[usize], seed: u64, scale: f32| {
        let n = shape.iter().product();
        w.insert(name.into(), (shape.to_vec(), gaussian(n, seed).iter().map(|v| v * scale).collect()));
    };
    put("conv1.weight", &[32, 1, 3, 3], 1, 0.3);
    put("conv1.bias", &[32], 2, 0.1);
    put("bn1.weight", &[32], 3, 0.1);
    put("bn1.bias", &[32], 4, 0.1);
    put("bn1.running_mean", &[32], 5, 0.1);
    put("b1.conv.weight", &[32, 32, 3, 3], 6, 0.06);
    put("dw.weight", &[32, 1, 3, 3], 7, 0.3);
    put("dw.bias", &[32], 8, 0.1);
    put("fc.weight", &[10, 32 * 16], 9, 0.05);
    put("fc.bias", &[10], 10, 0.1);
    w.insert("bn1.running_var".into(), (vec![32], vec![1.0; 32]));
    (graph, w)
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("graph") {
        return;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-graph");
    std::fs::create_dir_all(&dir).unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let data = load(&fixtures.join("digits_test.safetensors"));
    let mut rows = Vec::new();

    let mlp_graph: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures.join("teacher_mlp.graph.json")).unwrap()).unwrap();
    let mlp =
        Network::build(&Graph::parse(&mlp_graph).unwrap(), &load(&fixtures.join("teacher_mlp.safetensors"))).unwrap();
    let x = &data["inputs"].1[..BATCH * 64];
    rows.push(("mlp_forward_ms", median_ms(50, || drop(mlp.forward(x, BATCH, &[64]).unwrap()))));

    let (g, w) = cnn();
    save(&dir.join("cnn.safetensors"), &w);
    std::fs::write(dir.join("cnn.graph.json"), serde_json::to_vec(&g).unwrap()).unwrap();
    let net = Network::build(&g, &w).unwrap();
    let x = &data["images"].1[..BATCH * 64];
    rows.push(("cnn_forward_ms", median_ms(20, || drop(net.forward(x, BATCH, &[1, 8, 8]).unwrap()))));

    let n = 4096;
    let m = gaussian(n * n, 42);
    let mut wm = Weights::new();
    wm.insert("w".into(), (vec![n, n], m.clone()));
    save(&dir.join("matrix.safetensors"), &wm);
    let mut err = 0.0;
    let ms = median_ms(3, || err = factorize(&m, n, n, Rank::Fixed(256)).unwrap().relative_error);
    rows.push(("svd_rank256_ms", ms));
    rows.push(("svd_rank256_relative_error", err));

    // One KD step: teacher MLP 784-1024-1024-10 (inference) -> student 784-256-10 (forward,
    // backward, AdamW), batch 256.
    let mut tw = Weights::new();
    for (name, shape, seed) in [
        ("fc1.weight", vec![1024, 784], 31),
        ("fc1.bias", vec![1024], 32),
        ("fc2.weight", vec![1024, 1024], 33),
        ("fc2.bias", vec![1024], 34),
        ("fc3.weight", vec![10, 1024], 35),
        ("fc3.bias", vec![10], 36),
    ] {
        let n: usize = shape.iter().product();
        tw.insert(name.into(), (shape, gaussian(n, seed).iter().map(|v| v * 0.03).collect()));
    }
    let teacher_graph = Graph::parse(&json!({"input": {"shape": [784]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}, {"kind": "relu"},
        {"kind": "linear", "name": "fc3"}]}))
    .unwrap();
    let student_graph = Graph::parse(&json!({"input": {"shape": [784]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc3"}]}))
    .unwrap();
    let mut sw = Weights::new();
    sw.insert("fc1.weight".into(), (vec![256, 784], gaussian(256 * 784, 41).iter().map(|v| v * 0.03).collect()));
    sw.insert("fc1.bias".into(), (vec![256], vec![0.0; 256]));
    sw.insert("fc3.weight".into(), (vec![10, 256], gaussian(2560, 42).iter().map(|v| v * 0.06).collect()));
    sw.insert("fc3.bias".into(), (vec![10], vec![0.0; 10]));
    let teacher = Network::build(&teacher_graph, &tw).unwrap();
    let student = Trainable::new(&student_graph, &sw).unwrap();
    let mut opt = AdamW::new(1e-3, 0.0);
    let x = gaussian(BATCH * 784, 43);
    let xt = candle_core::Tensor::from_slice(&x, (BATCH, 784), &candle_core::Device::Cpu).unwrap();
    let kd_ms = median_ms(20, || {
        let (_, t) = teacher.forward(&x, BATCH, &[784]).unwrap();
        let t = candle_core::Tensor::from_vec(t, (BATCH, 10), &candle_core::Device::Cpu).unwrap();
        let loss = kd_loss(&student.forward(&xt).unwrap(), &t, None, 4.0, 1.0).unwrap();
        let grads = loss.backward().unwrap();
        opt.update(&student, &grads).unwrap();
    });
    rows.push(("kd_step_ms", kd_ms));
    rows.push(("kd_teacher_forward_ms", median_ms(20, || drop(teacher.forward(&x, BATCH, &[784]).unwrap()))));
    // What a `distill` step runs per batch: the teacher's logits are computed once per dataset
    // (no augmentation, so they do not change between epochs), the student trains.
    let (_, t) = teacher.forward(&x, BATCH, &[784]).unwrap();
    let t = candle_core::Tensor::from_vec(t, (BATCH, 10), &candle_core::Device::Cpu).unwrap();
    rows.push((
        "kd_student_step_ms",
        median_ms(20, || {
            let loss = kd_loss(&student.forward(&xt).unwrap(), &t, None, 4.0, 1.0).unwrap();
            let grads = loss.backward().unwrap();
            opt.update(&student, &grads).unwrap();
        }),
    ));

    let torch: Option<serde_json::Value> =
        std::fs::read(dir.join("torch.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
    println!("{:<30} {:>14} {:>14} {:>10}", "figure", "modelpress", "pytorch", "ratio");
    for (name, ours) in rows {
        let theirs = torch.as_ref().and_then(|t| t[name].as_f64());
        let ratio = theirs.map_or("-".into(), |t| format!("{:.2}x", ours / t));
        let theirs = theirs.map_or("-".into(), |t| format!("{t:.4}"));
        println!("{name:<30} {ours:>14.4} {theirs:>14} {ratio:>10}");
    }
    if torch.is_none() {
        println!("(run `python tests/python/bench_graph_torch.py` then this bench again for PyTorch's figures)");
    }
}
