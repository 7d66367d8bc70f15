//! The digits MLP teacher evaluated with plain matrix products: enough to measure what
//! compression costs in accuracy without a deep-learning runtime.

use std::collections::BTreeMap;

pub const TEACHER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/teacher_mlp.safetensors");
pub const DIGITS_TEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/digits_test.safetensors");
pub const DIGITS_TRAIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/digits_train.safetensors");

/// The teacher's accuracy on the test split, as measured with PyTorch (352/360).
pub const TEACHER_ACCURACY: f64 = 352.0 / 360.0;

/// A tensor's shape and values.
type Tensor = (Vec<usize>, Vec<f32>);

fn tensor_f32(st: &safetensors::SafeTensors, name: &str) -> Tensor {
    let t = st.tensor(name).unwrap_or_else(|_| panic!("missing tensor {name}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    (t.shape().to_vec(), t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
}

/// y = x W^T + b for a batch `x` [n, in], `w` [out, in].
fn linear(x: &[f32], n: usize, w: &[f32], out: usize, b: &[f32]) -> Vec<f32> {
    let inp = w.len() / out;
    let mut y = vec![0f32; n * out];
    for i in 0..n {
        let xi = &x[i * inp..(i + 1) * inp];
        for o in 0..out {
            let wo = &w[o * inp..(o + 1) * inp];
            y[i * out + o] = xi.iter().zip(wo).map(|(a, b)| a * b).sum::<f32>() + b[o];
        }
    }
    y
}

/// Test-set accuracy of a model file holding the teacher's tensor names.
pub fn accuracy(model_bytes: &[u8]) -> f64 {
    let model = safetensors::SafeTensors::deserialize(model_bytes).unwrap();
    let data_bytes = std::fs::read(DIGITS_TEST).unwrap();
    let data = safetensors::SafeTensors::deserialize(&data_bytes).unwrap();
    let (shape, x) = tensor_f32(&data, "inputs");
    let n = shape[0];
    let labels: Vec<i64> = data
        .tensor("labels")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let layers: BTreeMap<&str, (Tensor, Tensor)> = ["fc1", "fc2", "fc3"]
        .into_iter()
        .map(|l| (l, (tensor_f32(&model, &format!("{l}.weight")), tensor_f32(&model, &format!("{l}.bias")))))
        .collect();
    let mut h = x;
    for (i, l) in ["fc1", "fc2", "fc3"].iter().enumerate() {
        let ((ws, w), (_, b)) = &layers[l];
        h = linear(&h, n, w, ws[0], b);
        if i < 2 {
            h.iter_mut().for_each(|v| *v = v.max(0.0));
        }
    }
    let correct = h
        .chunks(10)
        .zip(&labels)
        .filter(|(row, &label)| {
            let argmax = row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0;
            argmax as i64 == label
        })
        .count();
    correct as f64 / n as f64
}

#[test]
fn the_evaluator_reproduces_the_teachers_measured_accuracy() {
    let acc = accuracy(&std::fs::read(TEACHER).unwrap());
    assert!((acc - TEACHER_ACCURACY).abs() < 1e-9, "accuracy {acc}");
}
