use serde_json::json;

use super::*;
use crate::graph::forward::Network;
use crate::graph::tests::{cnn, put, table, values};

fn groups_of(graph: &Graph, w: &Weights) -> (GraphSummary, Vec<UnitGroup>) {
    let summary = graph.validate(&table(w)).unwrap();
    let groups = unit_groups(graph, &summary, &|t| w.contains_key(t));
    (summary, groups)
}

fn slice(tensor: &str, axis: usize, block: usize) -> Slice {
    Slice { tensor: tensor.into(), axis, block }
}

/// Outputs of a network on `n` samples of `x`.
fn run(graph: &Graph, w: &Weights, x: &[f32], n: usize) -> Vec<f32> {
    Network::build(graph, w).unwrap().forward(x, n, &graph.input.shape).unwrap().1
}

/// Shrunk and masked models differ only by f32 summation order.
const EQUIVALENCE_TOLERANCE: f32 = 1e-5;

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= EQUIVALENCE_TOLERANCE * (1.0 + y.abs()), "{x} vs {y}");
    }
}

#[test]
fn an_mlp_has_one_group_per_hidden_layer_and_pins_its_ends() {
    let g = Graph::parse(&json!({"input": {"shape": [6]}, "layers": [
        {"kind": "linear", "name": "fc1"}, {"kind": "relu"}, {"kind": "linear", "name": "fc2"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "fc1.weight", &[5, 6], 1);
    put(&mut w, "fc1.bias", &[5], 2);
    put(&mut w, "fc2.weight", &[3, 5], 3);
    let (_, groups) = groups_of(&g, &w);
    assert_eq!(groups.len(), 3);
    assert_eq!(groups[0].pinned.as_deref(), Some("the model's input"));
    assert_eq!(groups[0].consumers, vec![slice("fc1.weight", 1, 1)]);
    let hidden = &groups[1];
    assert_eq!((hidden.size, hidden.pinned.is_none()), (5, true));
    assert_eq!(hidden.producers, vec![slice("fc1.bias", 0, 1), slice("fc1.weight", 0, 1)]);
    assert_eq!(hidden.consumers, vec![slice("fc2.weight", 1, 1)]);
    assert_eq!(groups[2].pinned.as_deref(), Some("the model's output"));

    let x = values(4 * 6, 9);
    let scores = importance(hidden, &w, Norm::L2);
    let keep = keep_most_important(&scores, 3);
    let (mut shrunk, mut full) = (w.clone(), w.clone());
    remove_units(&mut shrunk, hidden, &keep);
    masked(&mut full, hidden, &keep);
    assert_eq!(shrunk["fc1.weight"].0, vec![3, 6]);
    assert_eq!(shrunk["fc2.weight"].0, vec![3, 3]);
    assert_close(&run(&g, &shrunk, &x, 4), &run(&g, &full, &x, 4));
    // The kept units are the largest rows.
    let row = |r: usize| (0..6).map(|c| w["fc1.weight"].1[r * 6 + c].powi(2)).sum::<f32>() + w["fc1.bias"].1[r].powi(2);
    let dropped: Vec<usize> = (0..5).filter(|u| !keep.contains(u)).collect();
    assert!(dropped.iter().all(|&d| keep.iter().all(|&k| row(d) <= row(k))));
}

#[test]
fn a_cnn_couples_the_residual_stream_through_batch_norm_depthwise_and_flatten() {
    let (g, w) = cnn();
    let (_, groups) = groups_of(&g, &w);
    // input, the residual stream (conv1 + b1.conv), the classifier's output.
    let stream = groups.iter().find(|g| g.layers.contains(&"conv1".to_string())).unwrap();
    assert_eq!(stream.layers, vec!["conv1".to_string(), "b1.conv".to_string()]);
    assert!(stream.pinned.is_none(), "{stream:?}");
    assert!(stream.members.contains(&slice("bn1.running_var", 0, 1)));
    assert!(stream.members.contains(&slice("dw.weight", 0, 1)), "both sides of the depthwise conv");
    // After max pooling the maps are 2x2: each channel is 4 consecutive columns of fc.
    assert!(stream.consumers.contains(&slice("fc.weight", 1, 4)), "{:?}", stream.consumers);
    assert!(stream.consumers.contains(&slice("b1.conv.weight", 1, 1)));

    let keep = keep_most_important(&importance(stream, &w, Norm::L1), 2);
    let (mut shrunk, mut full) = (w.clone(), w.clone());
    remove_units(&mut shrunk, stream, &keep);
    masked(&mut full, stream, &keep);
    assert_eq!(shrunk["conv1.weight"].0, vec![2, 2, 3, 3]);
    assert_eq!(shrunk["b1.conv.weight"].0, vec![2, 2, 3, 3]);
    assert_eq!(shrunk["dw.weight"].0, vec![2, 1, 3, 3]);
    assert_eq!(shrunk["fc.weight"].0, vec![10, 8]);
    // The depthwise conv now has 2 groups: the graph's `groups` follows the channels.
    let g2 = with_groups(&g, "dw", 2);
    g2.validate(&table(&shrunk)).unwrap();
    let x = values(3 * 2 * 8 * 8, 5);
    assert_close(&run(&g2, &shrunk, &x, 3), &run(&g, &full, &x, 3));
}

fn with_groups(g: &Graph, name: &str, n: usize) -> Graph {
    let mut g = g.clone();
    fn walk(layers: &mut [Layer], name: &str, n: usize) {
        for l in layers {
            match l {
                Layer::Conv2d { name: m, groups, .. } if m == name => *groups = n,
                Layer::Residual { layers } => walk(layers, name, n),
                _ => {}
            }
        }
    }
    walk(&mut g.layers, name, n);
    g
}

#[test]
fn units_a_layer_mixes_are_pinned_with_the_reason() {
    let g = Graph::parse(&json!({"input": {"shape": [4]}, "layers": [
        {"kind": "linear", "name": "a"}, {"kind": "layer_norm", "name": "ln"},
        {"kind": "linear", "name": "b"}, {"kind": "softmax"}, {"kind": "linear", "name": "c"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "a.weight", &[4, 4], 1);
    put(&mut w, "ln.weight", &[4], 1);
    put(&mut w, "b.weight", &[4, 4], 2);
    put(&mut w, "c.weight", &[2, 4], 3);
    let (_, groups) = groups_of(&g, &w);
    let of = |layer: &str| groups.iter().find(|g| g.layers.contains(&layer.to_string())).unwrap().pinned.clone();
    assert_eq!(of("a").unwrap(), "layer_norm `ln` normalises across these units");
    assert!(of("b").unwrap().contains("softmax"));
}

#[test]
fn dropping_a_layer_removes_it_and_names_its_tensors() {
    let (g, w) = cnn();
    let summary = g.validate(&table(&w)).unwrap();
    let candidates = droppable(&g, &summary);
    assert_eq!(candidates.get("/layers/3"), Some(&None), "the residual block");
    assert!(!candidates.contains_key("/layers/0"), "conv1 changes the shape");
    let (g2, names) = drop_layers(&g, &BTreeSet::from(["/layers/3".to_string()]));
    assert_eq!(names, vec!["b1.conv".to_string()]);
    assert_eq!(module_tensors(&names, w.keys()), vec!["b1.conv.weight".to_string()]);
    let mut w2 = w.clone();
    w2.remove("b1.conv.weight");
    let s2 = g2.validate(&table(&w2)).unwrap();
    assert_eq!(s2.output_shape, vec![10]);
}

#[test]
fn batch_norm_after_a_flatten_goes_with_whole_blocks_of_features() {
    let g = Graph::parse(&json!({"input": {"shape": [2, 4, 4]}, "layers": [
        {"kind": "conv2d", "name": "c1", "padding": 1}, {"kind": "relu"}, {"kind": "flatten"},
        {"kind": "batch_norm", "name": "bn"}, {"kind": "linear", "name": "fc"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "c1.weight", &[3, 2, 3, 3], 1);
    put(&mut w, "bn.weight", &[48], 2);
    put(&mut w, "bn.bias", &[48], 3);
    put(&mut w, "bn.running_mean", &[48], 4);
    w.insert("bn.running_var".into(), (vec![48], vec![1.5; 48]));
    put(&mut w, "fc.weight", &[5, 48], 5);
    let (_, groups) = groups_of(&g, &w);
    let c1 = groups.iter().find(|g| g.layers == ["c1"]).unwrap();
    assert!(c1.members.contains(&slice("bn.running_mean", 0, 16)), "{:?}", c1.members);
    let keep = vec![0, 2];
    let (mut shrunk, mut full) = (w.clone(), w.clone());
    remove_units(&mut shrunk, c1, &keep);
    masked(&mut full, c1, &keep);
    assert_eq!(shrunk["bn.running_var"].0, vec![32]);
    let x = values(2 * 32, 7);
    assert_close(&run(&g, &shrunk, &x, 2), &run(&g, &full, &x, 2));
}

#[test]
fn pooling_over_units_on_the_last_axis_pins_them() {
    let g = Graph::parse(&json!({"input": {"shape": [1, 8, 8]}, "layers": [
        {"kind": "conv2d", "name": "c1", "padding": 1}, {"kind": "linear", "name": "lw"},
        {"kind": "global_avg_pool2d"}, {"kind": "linear", "name": "fc"}]}))
    .unwrap();
    let mut w = Weights::new();
    put(&mut w, "c1.weight", &[4, 1, 3, 3], 1);
    put(&mut w, "lw.weight", &[8, 8], 2);
    put(&mut w, "fc.weight", &[10, 4], 3);
    let (_, groups) = groups_of(&g, &w);
    let lw = groups.iter().find(|g| g.layers == ["lw"]).unwrap();
    assert!(lw.pinned.as_deref().unwrap_or("").contains("pooling"), "{lw:?}");
}
