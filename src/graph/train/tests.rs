use serde_json::json;

use super::*;
use crate::graph::forward::Network;
use crate::graph::tests::{cnn, put, values};

fn batch(n: usize, shape: &[usize], seed: u64) -> Tensor {
    let mut dims = vec![n];
    dims.extend_from_slice(shape);
    let len = dims.iter().product();
    Tensor::from_vec(values(len, seed), dims, &Device::Cpu).unwrap()
}

fn labels(n: usize, classes: u32) -> Tensor {
    Tensor::from_vec((0..n as u32).map(|i| (i * 7) % classes).collect::<Vec<u32>>(), n, &Device::Cpu).unwrap()
}

/// Every trained variable gets a gradient with a non-zero entry from the distillation loss.
fn assert_every_parameter_learns(model: &Trainable, x: &Tensor) {
    let y = model.forward(x).unwrap();
    let teacher = (y.detach() * 0.5).unwrap().affine(1.0, 0.1).unwrap();
    let loss = kd_loss(&y, &teacher, Some(&labels(x.dim(0).unwrap(), 10)), 4.0, 0.5).unwrap();
    let grads = loss.backward().unwrap();
    for (name, var) in model.trained() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
        let max = g.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max > 0.0, "{name} has an all-zero gradient");
    }
}

#[test]
fn every_trainable_parameter_of_a_cnn_receives_a_gradient() {
    let (graph, w) = cnn();
    let model = Trainable::new(&graph, &w).unwrap();
    assert_eq!(model.trained().len(), w.len() - 2, "running statistics stay fixed");
    assert_every_parameter_learns(&model, &batch(4, &[2, 8, 8], 3));
}

#[test]
fn layer_norm_and_every_activation_pass_gradients() {
    let graph = Graph::parse(&json!({"input": {"shape": [6]}, "layers": [
        {"kind": "linear", "name": "a"}, {"kind": "layer_norm", "name": "ln"}, {"kind": "gelu"},
        {"kind": "linear", "name": "b"}, {"kind": "silu"}, {"kind": "tanh"}, {"kind": "sigmoid"},
        {"kind": "linear", "name": "c"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "a.weight", &[8, 6], 1);
    put(&mut w, "a.bias", &[8], 2);
    w.insert("ln.weight".into(), (vec![8], vec![1.0; 8]));
    put(&mut w, "ln.bias", &[8], 3);
    put(&mut w, "b.weight", &[8, 8], 4);
    put(&mut w, "c.weight", &[10, 8], 5);
    put(&mut w, "c.bias", &[10], 6);
    assert_every_parameter_learns(&Trainable::new(&graph, &w).unwrap(), &batch(5, &[6], 7));
}

/// The training forward pass and the inference network compute the same function.
const FORWARD_TOLERANCE: f32 = 1e-4;

#[test]
fn the_training_forward_pass_matches_the_inference_network() {
    let (graph, w) = cnn();
    let x = batch(3, &[2, 8, 8], 11);
    let trained =
        Trainable::new(&graph, &w).unwrap().forward(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let (_, inference) = Network::build(&graph, &w).unwrap().forward(&xs, 3, &[2, 8, 8]).unwrap();
    for (a, b) in trained.iter().zip(&inference) {
        assert!((a - b).abs() <= FORWARD_TOLERANCE * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn the_kd_loss_is_zero_on_the_teachers_own_logits_and_matches_its_formula() {
    let s = batch(4, &[10], 1);
    let zero = kd_loss(&s, &s, None, 4.0, 1.0).unwrap().to_scalar::<f32>().unwrap();
    assert!(zero.abs() < 1e-6, "KL(p || p) = {zero}");
    // Two classes, one sample: KL and CE by hand.
    let st = Tensor::new(&[[1.0f32, 0.0]], &Device::Cpu).unwrap();
    let te = Tensor::new(&[[0.0f32, 2.0]], &Device::Cpu).unwrap();
    let l = Tensor::new(&[1u32], &Device::Cpu).unwrap();
    let got = kd_loss(&st, &te, Some(&l), 2.0, 0.25).unwrap().to_scalar::<f32>().unwrap() as f64;
    let soft = |a: f64, b: f64| [a.exp() / (a.exp() + b.exp()), b.exp() / (a.exp() + b.exp())];
    let (p, q) = (soft(0.0, 1.0), soft(0.5, 0.0));
    let kl = p[0] * (p[0] / q[0]).ln() + p[1] * (p[1] / q[1]).ln();
    let ce = -soft(1.0, 0.0)[1].ln();
    let want = 0.25 * 4.0 * kl + 0.75 * ce;
    assert!((got - want).abs() < 1e-5, "{got} vs {want}");
}

#[test]
fn adamw_distills_the_digits_teacher_into_a_small_student() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let read = |file: &str| crate::graph::forward::read_weights(&std::path::Path::new(dir).join(file)).unwrap();
    let teacher_graph: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(format!("{dir}/teacher_mlp.graph.json")).unwrap()).unwrap();
    let teacher = Network::build(&Graph::parse(&teacher_graph).unwrap(), &read("teacher_mlp.safetensors")).unwrap();
    let data = read("digits_test.safetensors");
    let (x, n) = (&data["inputs"].1, 360);
    let (_, teacher_logits) = teacher.forward(x, n, &[64]).unwrap();
    let student_graph = Graph::parse(&json!({"input": {"shape": [64]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}]}))
    .unwrap();
    let mut w = Weights::new();
    w.insert("fc1.weight".into(), (vec![32, 64], values(32 * 64, 1).iter().map(|v| v * 0.125).collect()));
    w.insert("fc1.bias".into(), (vec![32], vec![0.0; 32]));
    w.insert("fc2.weight".into(), (vec![10, 32], values(10 * 32, 2).iter().map(|v| v * 0.18).collect()));
    w.insert("fc2.bias".into(), (vec![10], vec![0.0; 10]));
    let student = Trainable::new(&student_graph, &w).unwrap();
    let mut opt = AdamW::new(1e-2, 0.0);
    let xs = Tensor::from_slice(x, (n, 64), &Device::Cpu).unwrap();
    let ts = Tensor::from_slice(&teacher_logits, (n, 10), &Device::Cpu).unwrap();
    let accuracy = |m: &Trainable| {
        let y = m.forward(&xs).unwrap().argmax(1).unwrap().to_vec1::<u32>().unwrap();
        let t = ts.argmax(1).unwrap().to_vec1::<u32>().unwrap();
        y.iter().zip(&t).filter(|(a, b)| a == b).count() as f64 / n as f64
    };
    let before = accuracy(&student);
    for _ in 0..30 {
        for start in (0..n).step_by(60) {
            let xb = xs.narrow(0, start, 60).unwrap();
            let tb = ts.narrow(0, start, 60).unwrap();
            let loss = kd_loss(&student.forward(&xb).unwrap(), &tb, None, 4.0, 1.0).unwrap();
            let grads = loss.backward().unwrap();
            assert_eq!(opt.update(&student, &grads).unwrap(), 4);
        }
    }
    let after = accuracy(&student);
    assert!(after > 0.9 && after > before + 0.5, "agreement with the teacher {before} -> {after}");
    assert_eq!(opt.step, 30 * 6);
}

#[test]
fn a_run_stopped_after_a_checkpoint_resumes_to_the_same_student_bit_for_bit() {
    let graph = Graph::parse(&json!({"input": {"shape": [6]}, "layers": [
        {"kind": "linear", "name": "a"}, {"kind": "relu"}, {"kind": "linear", "name": "b"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "a.weight", &[8, 6], 1);
    put(&mut w, "a.bias", &[8], 2);
    put(&mut w, "b.weight", &[4, 8], 3);
    let inputs = values(40 * 6, 4);
    let teacher = values(40 * 4, 5);
    let labels: Vec<f32> = (0..40).map(|i| (i % 4) as f32).collect();
    let config = DistillConfig {
        epochs: 6,
        batch_size: 8,
        learning_rate: 1e-2,
        weight_decay: 0.01,
        betas: (0.9, 0.99),
        temperature: 2.0,
        validation_fraction: 0.2,
        seed: 9,
        // The hidden layer of the student matched to columns of the teacher's "features".
        features: vec![("/layers/0".into(), "/layers/0".into())],
        feature_weight: 0.1,
        ..Default::default()
    };
    let teacher = TeacherOutputs {
        logits: teacher,
        features: vec![FeatureTarget { student: "/layers/0".into(), width: 8, values: values(40 * 8, 6) }],
    };
    let dir = tempfile::tempdir().unwrap();
    let run = |checkpoint: &std::path::Path, stop_after: Option<usize>| {
        let student = Trainable::new(&graph, &w).unwrap();
        let mut batches = 0;
        let mut tick = |_: &str| {
            batches += 1;
            stop_after.is_none_or(|s| batches <= s)
        };
        let record = distill(&student, &inputs, &[6], &teacher, Some(&labels), &config, Some(checkpoint), &mut tick);
        (record, student.weights().unwrap())
    };
    let (whole, reference) = run(&dir.path().join("whole.safetensors"), None);
    let whole = whole.unwrap();
    // 32 training samples in batches of 8: 4 batches per epoch; stop in the 4th epoch.
    let path = dir.path().join("stopped.safetensors");
    let (stopped, _) = run(&path, Some(13));
    assert_eq!(stopped.unwrap_err(), "canceled");
    assert!(path.exists(), "the checkpoint of epoch 3 is on disk");
    let (resumed, weights) = run(&path, None);
    let resumed = resumed.unwrap();
    assert_eq!(resumed.resumed_after_epoch, Some(3));
    // Epoch times differ between runs; everything else is the same.
    let untimed = |r: TrainingRecord| TrainingRecord {
        resumed_after_epoch: None,
        epochs: r.epochs.into_iter().map(|e| EpochRecord { seconds: 0.0, ..e }).collect(),
        ..r
    };
    assert_eq!(untimed(resumed), untimed(whole), "the same records, best epoch included");
    assert_eq!(weights, reference, "the same student, bit for bit");
}

/// Central differences in f64 of the f32 loss: agreement to a few percent of the largest entry.
const FINITE_DIFFERENCE_TOLERANCE: f64 = 0.05;

/// Compares every gradient entry of `model`'s loss on `x` with a central finite difference.
fn assert_gradients_match_finite_differences(model: &Trainable, x: &Tensor, labels: &Tensor) {
    let teacher = model.forward(x).unwrap().detach().affine(0.7, 0.2).unwrap();
    let loss = |m: &Trainable| -> f64 {
        kd_loss(&m.forward(x).unwrap(), &teacher, Some(labels), 2.0, 0.5).unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let grads = kd_loss(&model.forward(x).unwrap(), &teacher, Some(labels), 2.0, 0.5).unwrap().backward().unwrap();
    let h = 1e-2f32;
    for (name, var) in model.trained() {
        let analytic = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let values = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let dims = var.as_tensor().dims().to_vec();
        let scale = analytic.iter().fold(1e-3f64, |m, g| m.max(g.abs() as f64));
        // A few entries per tensor keep the test fast.
        for i in (0..values.len()).step_by((values.len() / 5).max(1)) {
            let probe = |delta: f32| {
                let mut v = values.clone();
                v[i] += delta;
                var.set(&Tensor::from_vec(v, dims.clone(), &Device::Cpu).unwrap()).unwrap();
                loss(model)
            };
            let numeric = (probe(h) - probe(-h)) / (2.0 * h as f64);
            var.set(&Tensor::from_vec(values.clone(), dims.clone(), &Device::Cpu).unwrap()).unwrap();
            let diff = (numeric - analytic[i] as f64).abs();
            assert!(
                diff <= FINITE_DIFFERENCE_TOLERANCE * scale,
                "{name}[{i}]: analytic {} vs numeric {numeric}",
                analytic[i]
            );
        }
    }
}

#[test]
fn gradients_match_finite_differences_on_a_tiny_mlp_and_a_tiny_cnn() {
    let mlp = Graph::parse(&json!({"input": {"shape": [5]}, "layers": [
        {"kind": "linear", "name": "a"}, {"kind": "tanh"}, {"kind": "linear", "name": "b"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "a.weight", &[6, 5], 1);
    put(&mut w, "a.bias", &[6], 2);
    put(&mut w, "b.weight", &[3, 6], 3);
    assert_gradients_match_finite_differences(&Trainable::new(&mlp, &w).unwrap(), &batch(4, &[5], 4), &labels(4, 3));

    let cnn = Graph::parse(&json!({"input": {"shape": [1, 4, 4]}, "layers": [
        {"kind": "conv2d", "name": "c", "padding": 1}, {"kind": "batch_norm", "name": "bn"}, {"kind": "sigmoid"},
        {"kind": "avg_pool2d", "kernel": 2}, {"kind": "flatten"}, {"kind": "linear", "name": "fc"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "c.weight", &[2, 1, 3, 3], 5);
    put(&mut w, "c.bias", &[2], 6);
    put(&mut w, "bn.weight", &[2], 7);
    put(&mut w, "bn.bias", &[2], 8);
    put(&mut w, "bn.running_mean", &[2], 9);
    w.insert("bn.running_var".into(), (vec![2], vec![1.0, 2.0]));
    put(&mut w, "fc.weight", &[3, 8], 10);
    assert_gradients_match_finite_differences(
        &Trainable::new(&cnn, &w).unwrap(),
        &batch(3, &[1, 4, 4], 11),
        &labels(3, 3),
    );
}

#[test]
fn the_mse_loss_is_the_mean_squared_difference_of_the_logits() {
    let s = Tensor::new(&[[1.0f32, 2.0], [0.0, -1.0]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[0.0f32, 2.0], [1.0, 1.0]], &Device::Cpu).unwrap();
    assert_eq!(mse_loss(&s, &t).unwrap().to_scalar::<f32>().unwrap(), (1.0 + 0.0 + 1.0 + 4.0) / 4.0);
}

#[test]
fn kd_weight_zero_is_plain_cross_entropy_training() {
    let s = batch(6, &[10], 21);
    let t = batch(6, &[10], 22);
    let l = labels(6, 10);
    let kd0 = kd_loss(&s, &t, Some(&l), 4.0, 0.0).unwrap().to_scalar::<f32>().unwrap();
    let log_p = log_softmax(&s).unwrap().to_vec2::<f32>().unwrap();
    let ce = -(0..6).map(|i| log_p[i][(i * 7) % 10]).sum::<f32>() / 6.0;
    assert!((kd0 - ce).abs() < 1e-6, "{kd0} vs {ce}");
}

#[test]
fn fake_quantization_snaps_each_row_to_its_levels_and_passes_the_gradient_straight_through() {
    let w = Var::from_slice(&[0.9f32, -0.3, 0.1, 0.05, 2.0, -1.0, 0.4, 0.0], (2, 4), &Device::Cpu).unwrap();
    let q = fake_quantize(w.as_tensor(), 2).unwrap();
    let rows = q.to_vec2::<f32>().unwrap();
    // Row 0: scale 0.9 / 1.5 = 0.6, codes in [-2, 1]: 0.9 -> 0.6 (clamped), -0.3 -> -0.6 or 0, 0.1 -> 0.
    assert_eq!(rows[0][0], 0.6);
    assert_eq!(rows[0][2], 0.0);
    let scale1 = 2.0f32 / 1.5;
    assert!(rows[1].iter().all(|v| (v / scale1 - (v / scale1).round()).abs() < 1e-6), "{:?}", rows[1]);
    let grads = q.sum_all().unwrap().backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(g.iter().all(|v| *v == 1.0), "straight-through: {g:?}");
}

/// The faer gemm op and candle's matmul agree on values and gradients (relative).
const GEMM_TOLERANCE: f32 = 1e-5;

#[test]
fn the_gemm_op_matches_candles_matmul_and_its_gradients_for_every_transposition() {
    let close = |a: &Tensor, b: &Tensor, what: &str| {
        let (a, b) =
            (a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(a.len(), b.len(), "{what}");
        let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= GEMM_TOLERANCE * scale, "{what}: {x} vs {y}");
        }
    };
    let (m, k, n) = (5, 7, 3);
    for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
        let a = Var::from_tensor(&batch(if ta { k } else { m }, &[if ta { m } else { k }], 1)).unwrap();
        let b = Var::from_tensor(&batch(if tb { n } else { k }, &[if tb { k } else { n }], 2)).unwrap();
        let op = |x: &Tensor, t: bool| if t { x.t().unwrap() } else { x.clone() };
        let weights = batch(m, &[n], 3);
        let ours = a.as_tensor().apply_op2(b.as_tensor(), Gemm { ta, tb }).unwrap();
        let theirs = op(a.as_tensor(), ta).matmul(&op(b.as_tensor(), tb)).unwrap();
        close(&ours, &theirs, &format!("C for ta={ta} tb={tb}"));
        let g1 = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for (v, name) in [(&a, "dA"), (&b, "dB")] {
            close(g1.get(v.as_tensor()).unwrap(), g2.get(v.as_tensor()).unwrap(), &format!("{name} ta={ta} tb={tb}"));
        }
    }
    // An operand that is not a variable gets no gradient (the input batch of the first layer).
    let x = batch(4, &[3], 4);
    let w = Var::from_tensor(&batch(2, &[3], 5)).unwrap();
    let grads = linear_xwt(&x, w.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none() && grads.get(w.as_tensor()).is_some());
}

#[test]
fn taps_return_the_outputs_of_the_layers_at_their_pointers_residual_blocks_included() {
    let (graph, w) = cnn();
    let model = Trainable::new(&graph, &w).unwrap();
    let x = batch(2, &[2, 8, 8], 21);
    let want = ["/layers/2".to_string(), "/layers/3/layers/1".to_string(), "/layers/8".to_string()];
    let (y, taps) = model.forward_taps(&x, &want).unwrap();
    let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // The last layer's output is the model's output.
    assert_eq!(flat(&taps[2]), flat(&y));
    // After a ReLU: nothing negative; the residual block's inner output has the block's shape.
    assert!(flat(&taps[0]).iter().all(|v| *v >= 0.0));
    assert_eq!(taps[0].dims(), taps[1].dims());
    assert!(flat(&taps[1]).iter().all(|v| *v >= 0.0));
    // A layer that is not there is an error naming it.
    let err = model.forward_taps(&x, &["/layers/99".to_string()]).err().unwrap();
    assert!(err.contains("/layers/99"), "{err}");
}

#[test]
fn epochs_tied_on_held_out_accuracy_are_decided_by_held_out_cross_entropy() {
    // The held-out half repeats the training half, training is full-batch plain cross-entropy
    // with a tiny step: accuracy cannot move, the held-out cross-entropy falls every epoch, so
    // the last epoch wins (the earliest, 0, won before the tie-break).
    let graph = Graph::parse(&json!({"input": {"shape": [6]}, "layers": [{"kind": "linear", "name": "a"}]})).unwrap();
    let mut w = Weights::new();
    put(&mut w, "a.weight", &[4, 6], 1);
    let half = values(20 * 6, 4);
    let inputs = [half.clone(), half].concat();
    let labels: Vec<f32> = (0..40).map(|i| ((i % 20) % 4) as f32).collect();
    let config = DistillConfig {
        epochs: 4,
        batch_size: 20,
        learning_rate: 1e-5,
        kd_weight: 0.0,
        cosine: false,
        validation_fraction: 0.5,
        seed: 1,
        ..Default::default()
    };
    let teacher = TeacherOutputs { logits: values(40 * 4, 5), features: Vec::new() };
    let student = Trainable::new(&graph, &w).unwrap();
    let record = distill(&student, &inputs, &[6], &teacher, Some(&labels), &config, None, &mut |_| true).unwrap();
    let accuracies: Vec<f64> = record.epochs.iter().map(|e| e.validation_accuracy).collect();
    assert!(accuracies.iter().all(|a| *a == record.validation_accuracy_before), "{accuracies:?}");
    let losses: Vec<f64> = record.epochs.iter().map(|e| e.validation_loss).collect();
    assert!(losses.windows(2).all(|p| p[1] < p[0]), "{losses:?}");
    assert_eq!(record.best_epoch, 4);
}
