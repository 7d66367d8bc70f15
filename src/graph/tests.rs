use serde_json::json;

use super::forward::{Network, Weights};
use super::*;

/// Deterministic pseudo-random values in [-1, 1).
pub(crate) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub(crate) fn table(weights: &Weights) -> TensorTable {
    weights.iter().map(|(k, (s, _))| (k.clone(), (Dtype::F32, s.clone()))).collect()
}

pub(crate) fn put(w: &mut Weights, name: &str, shape: &[usize], seed: u64) {
    let n = shape.iter().product();
    w.insert(name.into(), (shape.to_vec(), values(n, seed)));
}

/// A CNN with every spatial layer kind: conv (padding), batch norm, residual, depthwise conv
/// (groups = channels, stride 2, dilation), pooling, flatten, linear.
pub(crate) fn cnn() -> (Graph, Weights) {
    let graph = Graph::parse(&json!({
        "input": {"shape": [2, 8, 8]},
        "layers": [
            {"kind": "conv2d", "name": "conv1", "padding": 1},
            {"kind": "batch_norm", "name": "bn1"},
            {"kind": "relu"},
            {"kind": "residual", "layers": [
                {"kind": "conv2d", "name": "b1.conv", "padding": 1},
                {"kind": "relu"}]},
            {"kind": "conv2d", "name": "dw", "groups": 4, "stride": 2, "padding": 2, "dilation": 2},
            {"kind": "max_pool2d", "kernel": 2},
            {"kind": "flatten"},
            {"kind": "dropout", "p": 0.1},
            {"kind": "linear", "name": "fc"}]
    }))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "conv1.weight", &[4, 2, 3, 3], 1);
    put(&mut w, "conv1.bias", &[4], 2);
    put(&mut w, "bn1.weight", &[4], 3);
    put(&mut w, "bn1.bias", &[4], 4);
    put(&mut w, "bn1.running_mean", &[4], 5);
    w.insert("bn1.running_var".into(), (vec![4], vec![0.5, 1.0, 1.5, 2.0]));
    put(&mut w, "b1.conv.weight", &[4, 4, 3, 3], 6);
    put(&mut w, "dw.weight", &[4, 1, 3, 3], 7);
    put(&mut w, "dw.bias", &[4], 8);
    put(&mut w, "fc.weight", &[10, 16], 9);
    put(&mut w, "fc.bias", &[10], 10);
    (graph, w)
}

/// Reference conv2d on one sample `[c, h, w]`, straight from the definition.
#[allow(clippy::too_many_arguments)]
fn ref_conv(
    x: &[f32],
    (c, h, wd): (usize, usize, usize),
    k: &[f32],
    kshape: &[usize],
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
    dil: usize,
    groups: usize,
) -> (Vec<f32>, (usize, usize, usize)) {
    let (oc, icg, kh, kw) = (kshape[0], kshape[1], kshape[2], kshape[3]);
    let oh = (h + 2 * pad - dil * (kh - 1) - 1) / stride + 1;
    let ow = (wd + 2 * pad - dil * (kw - 1) - 1) / stride + 1;
    let mut y = vec![0f32; oc * oh * ow];
    let ocg = oc / groups;
    for o in 0..oc {
        let g = o / ocg;
        for i in 0..oh {
            for j in 0..ow {
                let mut acc = bias.map_or(0.0, |b| b[o]) as f64;
                for ci in 0..icg {
                    let cin = g * icg + ci;
                    for a in 0..kh {
                        for b in 0..kw {
                            let (yy, xx) = (
                                (i * stride + a * dil) as isize - pad as isize,
                                (j * stride + b * dil) as isize - pad as isize,
                            );
                            if yy >= 0 && xx >= 0 && (yy as usize) < h && (xx as usize) < wd {
                                acc += (x[cin * h * wd + yy as usize * wd + xx as usize]
                                    * k[((o * icg + ci) * kh + a) * kw + b])
                                    as f64;
                            }
                        }
                    }
                }
                y[(o * oh + i) * ow + j] = acc as f32;
            }
        }
    }
    let _ = c;
    (y, (oc, oh, ow))
}

fn reference_cnn(w: &Weights, x: &[f32]) -> Vec<f32> {
    let g = |n: &str| w[n].1.as_slice();
    let (mut y, mut s) = ref_conv(x, (2, 8, 8), g("conv1.weight"), &[4, 2, 3, 3], Some(g("conv1.bias")), 1, 1, 1, 1);
    let hw = s.1 * s.2;
    for c in 0..4 {
        let scale = g("bn1.weight")[c] / (g("bn1.running_var")[c] + 1e-5).sqrt();
        for v in &mut y[c * hw..(c + 1) * hw] {
            *v = ((*v - g("bn1.running_mean")[c]) * scale + g("bn1.bias")[c]).max(0.0);
        }
    }
    let (inner, _) = ref_conv(&y, s, g("b1.conv.weight"), &[4, 4, 3, 3], None, 1, 1, 1, 1);
    y.iter_mut().zip(&inner).for_each(|(a, b)| *a += b.max(0.0));
    (y, s) = ref_conv(&y, s, g("dw.weight"), &[4, 1, 3, 3], Some(g("dw.bias")), 2, 2, 2, 4);
    let (oh, ow) = (s.1 / 2, s.2 / 2);
    let mut pooled = vec![f32::NEG_INFINITY; 4 * oh * ow];
    for c in 0..4 {
        for i in 0..oh * 2 {
            for j in 0..ow * 2 {
                let p = &mut pooled[(c * oh + i / 2) * ow + j / 2];
                *p = p.max(y[(c * s.1 + i) * s.2 + j]);
            }
        }
    }
    (0..10).map(|o| g("fc.bias")[o] + (0..16).map(|i| g("fc.weight")[o * 16 + i] * pooled[i]).sum::<f32>()).collect()
}

/// Agreement of candle's f32 kernels with the f64-accumulated reference.
const LOGIT_TOLERANCE: f32 = 1e-4;

#[test]
fn the_cnn_gives_the_logits_of_a_straightforward_reference() {
    let (graph, w) = cnn();
    let summary = graph.validate(&table(&w)).unwrap();
    assert_eq!(summary.output_shape, vec![10]);
    assert!(summary.unused_tensors.is_empty(), "{:?}", summary.unused_tensors);
    let net = Network::build(&graph, &w).unwrap();
    let x = values(3 * 2 * 8 * 8, 42);
    let (shape, y) = net.forward(&x, 3, &[2, 8, 8]).unwrap();
    assert_eq!(shape, vec![3, 10]);
    for s in 0..3 {
        let want = reference_cnn(&w, &x[s * 128..(s + 1) * 128]);
        for (a, b) in y[s * 10..(s + 1) * 10].iter().zip(&want) {
            assert!((a - b).abs() <= LOGIT_TOLERANCE * (1.0 + b.abs()), "sample {s}: {a} vs {b}");
        }
    }
}

#[test]
fn every_activation_and_norm_matches_its_definition() {
    let graph = Graph::parse(&json!({"input": {"shape": [4]}, "layers": [
        {"kind": "layer_norm", "name": "ln"}, {"kind": "gelu"}, {"kind": "silu"}, {"kind": "tanh"},
        {"kind": "sigmoid"}, {"kind": "avg_pool2d", "kernel": 1}]}))
    .unwrap();
    // avg_pool2d on [4] is refused: shapes are checked before anything runs.
    let mut w = Weights::new();
    w.insert("ln.weight".into(), (vec![4], vec![1.0, 2.0, 0.5, 1.0]));
    let e = graph.validate(&table(&w)).unwrap_err();
    assert_eq!(e[0].pointer, "/layers/5");
    let graph = Graph { layers: graph.layers[..5].to_vec(), ..graph };
    graph.validate(&table(&w)).unwrap();
    let net = Network::build(&graph, &w).unwrap();
    let x = [1.0f32, -2.0, 0.5, 3.0];
    let (_, y) = net.forward(&x, 1, &[4]).unwrap();
    let mean = x.iter().sum::<f32>() / 4.0;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 4.0;
    let erf = |v: f64| {
        // Abramowitz-Stegun 7.1.26 is only 1e-7 accurate; use the series-free identity via tanh? No:
        // compare against a high-precision erf from its Taylor series, enough terms for |v| < 4.
        let mut sum = 0.0;
        let mut term = v;
        for n in 0..60 {
            sum += term / (2 * n + 1) as f64;
            term *= -v * v / (n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    };
    for (i, got) in y.iter().enumerate() {
        let z = ((x[i] - mean) / (var + 1e-5).sqrt() * w["ln.weight"].1[i]) as f64;
        let gelu = 0.5 * z * (1.0 + erf(z / std::f64::consts::SQRT_2));
        let silu = gelu / (1.0 + (-gelu).exp());
        let want = 1.0 / (1.0 + (-silu.tanh()).exp());
        assert!((*got as f64 - want).abs() < 1e-5, "{i}: {got} vs {want}");
    }
}

#[test]
fn an_embedding_reads_token_ids_and_refuses_out_of_range_ones() {
    let graph = Graph::parse(&json!({"input": {"shape": [3]}, "layers": [
        {"kind": "embedding", "name": "emb"}, {"kind": "softmax"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "emb.weight", &[5, 2], 3);
    assert_eq!(graph.validate(&table(&w)).unwrap().output_shape, vec![3, 2]);
    let net = Network::build(&graph, &w).unwrap();
    let (shape, y) = net.forward(&[4.0, 0.0, 2.0], 1, &[3]).unwrap();
    assert_eq!(shape, vec![1, 3, 2]);
    let row = &w["emb.weight"].1[8..10];
    let e = (row[0] - row[1]).exp();
    assert!((y[0] - e / (1.0 + e)).abs() < 1e-6);
    let err = net.forward(&[5.0, 0.0, 1.0], 1, &[3]).unwrap_err();
    assert!(err.to_string().contains("token id 5 is not an integer in [0, 5)"), "{err}");
}

fn parse_errors(v: serde_json::Value) -> Vec<GraphError> {
    Graph::parse(&v).unwrap_err()
}

#[test]
fn bad_graph_json_names_the_layer_pointer() {
    let cases = [
        (
            json!({"input": {"shape": [4]}, "layers": [{"kind": "relu"}, {"kind": "conv3d", "name": "c"}]}),
            "/layers/1/kind",
            "unknown layer kind `conv3d`",
        ),
        (
            json!({"input": {"shape": [4]}, "layers": [{"kind": "residual", "layers": [{"kind": "linear", "nam": "x"}]}]}),
            "/layers/0/layers/0/nam",
            "unknown field `nam`",
        ),
        (json!({"input": {"shape": [4]}, "layers": [{"kind": "linear"}]}), "/layers/0/name", "missing field `name`"),
        (
            json!({"input": {"shape": [1, 4, 4]}, "layers": [{"kind": "conv2d", "name": "c", "stride": 0}]}),
            "/layers/0/stride",
            "at least 1",
        ),
        (
            json!({"input": {"shape": [4]}, "layers": [{"kind": "relu", "inplace": true}]}),
            "/layers/0/inplace",
            "unknown field",
        ),
        (json!({"input": {"shape": []}, "layers": [{"kind": "relu"}]}), "/input/shape", "at least one dimension"),
        (
            json!({"input": {"shape": [4]}, "layers": [{"kind": "residual", "layers": []}]}),
            "/layers/0/layers",
            "at least one layer",
        ),
        (json!({"input": {"shape": [4]}, "layers": [], "extra": 1}), "/extra", "unknown field"),
    ];
    for (graph, pointer, detail) in cases {
        let e = parse_errors(graph.clone());
        assert_eq!(e[0].pointer, pointer, "{graph}: {e:?}");
        assert!(e[0].detail.contains(detail), "{graph}: {e:?}");
    }
}

#[test]
fn graphs_that_do_not_fit_the_tensors_name_the_layer_and_the_shapes() {
    let (graph, w) = cnn();
    let t = table(&w);
    let mut missing = t.clone();
    missing.remove("b1.conv.weight");
    let e = graph.validate(&missing).unwrap_err();
    assert_eq!(e[0].pointer, "/layers/3/layers/0");
    assert!(e[0].detail.contains("no tensor `b1.conv.weight`"), "{e:?}");

    let mut wrong = t.clone();
    wrong.insert("fc.weight".into(), (Dtype::F32, vec![10, 17]));
    let e = graph.validate(&wrong).unwrap_err();
    assert_eq!(e[0].pointer, "/layers/8");
    assert!(e[0].detail.contains("[16]") && e[0].detail.contains("17"), "{e:?}");

    let mut grows = t.clone();
    grows.insert("b1.conv.weight".into(), (Dtype::F32, vec![8, 4, 3, 3]));
    let e = graph.validate(&grows).unwrap_err();
    assert_eq!(e[0].pointer, "/layers/3");
    assert!(e[0].detail.contains("change the shape from [4, 8, 8] to [8, 8, 8]"), "{e:?}");

    let mut depthwise = t.clone();
    depthwise.insert("dw.weight".into(), (Dtype::F32, vec![4, 2, 3, 3]));
    let e = graph.validate(&depthwise).unwrap_err();
    assert!(e[0].detail.contains("expects 1 per group, not 2"), "{e:?}");

    let mut extra = t;
    extra.insert("head.weight".into(), (Dtype::F32, vec![3, 3]));
    assert_eq!(graph.validate(&extra).unwrap().unused_tensors, vec!["head.weight".to_string()]);
}

#[test]
fn a_layer_name_used_twice_is_refused() {
    let g = Graph::parse(&json!({"input": {"shape": [4]}, "layers": [
        {"kind": "linear", "name": "fc"}, {"kind": "linear", "name": "fc"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "fc.weight", &[4, 4], 1);
    let e = g.validate(&table(&w)).unwrap_err();
    assert_eq!(e[0].pointer, "/layers/1");
    assert!(e[0].detail.contains("already used at /layers/0"), "{e:?}");
}

#[test]
fn zero_sized_tensors_and_empty_residual_blocks_are_refused() {
    let g = Graph::parse(&json!({"input": {"shape": [4]}, "layers": [{"kind": "linear", "name": "fc"}]})).unwrap();
    let mut t = TensorTable::new();
    t.insert("fc.weight".into(), (Dtype::F32, vec![0, 4]));
    assert!(g.validate(&t).unwrap_err()[0].detail.contains("dimension of 0"));
    let empty = Graph { input: g.input.clone(), layers: vec![Layer::Residual { layers: vec![] }] };
    assert!(empty.validate(&TensorTable::new()).unwrap_err()[0].detail.contains("at least one layer"));
    assert_eq!(window_out(8, 0, 1, 0, 1), None, "a zero kernel does not underflow");
}
