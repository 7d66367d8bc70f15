//! Structural edits that make a model physically smaller: which units are coupled, how important
//! each is, and the rewrite that removes them from every tensor that holds them.
//!
//! A *unit group* is one index space of units (the rows of a linear, the filters of a conv) and
//! every tensor slice indexed by it: its producers (weight rows, bias entries), the per-unit
//! members along the way (batch norm entries, both sides of a depthwise conv), and its consumers
//! (the next linear's columns, in blocks of `H x W` after a flatten; the next conv's input
//! channels). Units that meet at a residual add are one group: they are removed together or not
//! at all. A group that a layer mixes across (layer norm, softmax, a grouped conv), the model's
//! input and its output are *pinned*: never removed, with the reason in the plan.
//!
//! Removing a unit from every slice of its group is exactly the model whose consumers ignore the
//! unit (their columns zeroed): [`masked`] builds that full-size model, and the engine checks the
//! two give the same outputs before writing anything.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::Serialize;

use super::forward::Weights;
use super::{Graph, GraphSummary, Layer};

/// A slice of a tensor indexed by a group's units: unit `u` owns entries `u * block ..
/// (u + 1) * block` along `axis`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Slice {
    pub tensor: String,
    pub axis: usize,
    pub block: usize,
}

/// One set of coupled units.
#[derive(Debug, Clone, Serialize)]
pub struct UnitGroup {
    pub size: usize,
    /// The layers whose outputs are these units.
    pub layers: Vec<String>,
    pub producers: Vec<Slice>,
    pub members: Vec<Slice>,
    pub consumers: Vec<Slice>,
    /// Why these units cannot be removed, if they cannot.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
}

impl UnitGroup {
    fn new(size: usize) -> Self {
        UnitGroup {
            size,
            layers: Vec::new(),
            producers: Vec::new(),
            members: Vec::new(),
            consumers: Vec::new(),
            pinned: None,
        }
    }

    /// Every slice of the group.
    pub fn slices(&self) -> impl Iterator<Item = &Slice> {
        self.producers.iter().chain(&self.members).chain(&self.consumers)
    }
}

/// Where the current activation's units are.
#[derive(Debug, Clone, Copy)]
struct Units {
    group: usize,
    block: usize,
    /// Units on the first per-sample axis (channels) rather than the last (features).
    first_axis: bool,
}

struct Analysis<'a> {
    shapes: HashMap<&'a str, &'a super::LayerShape>,
    weights: &'a dyn Fn(&str) -> bool,
    arena: Vec<UnitGroup>,
    parent: Vec<usize>,
}

impl Analysis<'_> {
    fn find(&mut self, mut g: usize) -> usize {
        while self.parent[g] != g {
            self.parent[g] = self.parent[self.parent[g]];
            g = self.parent[g];
        }
        g
    }

    fn group(&mut self, size: usize) -> usize {
        self.arena.push(UnitGroup::new(size));
        self.parent.push(self.arena.len() - 1);
        self.arena.len() - 1
    }

    fn pin(&mut self, g: usize, why: String) {
        let r = self.find(g);
        self.arena[r].pinned.get_or_insert(why);
    }

    fn slice(&self, name: &str, suffix: &str, axis: usize, block: usize) -> Option<Slice> {
        let tensor = format!("{name}.{suffix}");
        (self.weights)(&tensor).then_some(Slice { tensor, axis, block })
    }

    fn produce(&mut self, name: &str, size: usize, axis: usize, first_axis: bool) -> Units {
        let g = self.group(size);
        self.arena[g].layers.push(name.to_owned());
        for suffix in ["weight", "bias"] {
            let ax = if suffix == "bias" { 0 } else { axis };
            if let Some(s) = self.slice(name, suffix, ax, 1) {
                self.arena[g].producers.push(s);
            }
        }
        Units { group: g, block: 1, first_axis }
    }

    fn chain(&mut self, layers: &[Layer], at: &str, mut u: Units) -> Units {
        for (i, layer) in layers.iter().enumerate() {
            let p = format!("{at}/layers/{i}");
            u = self.layer(layer, &p, u);
        }
        u
    }

    fn layer(&mut self, layer: &Layer, at: &str, u: Units) -> Units {
        let s_in = self.shapes[at].shape_in.clone();
        let rank1 = s_in.len() == 1;
        let on_last = rank1 || !u.first_axis;
        let on_first = rank1 || u.first_axis;
        match layer {
            Layer::Linear { name } => {
                let out = self.shapes[at].shape_out.last().copied().unwrap_or(0);
                if on_last {
                    if let Some(s) = self.slice(name, "weight", 1, u.block) {
                        let r = self.find(u.group);
                        self.arena[r].consumers.push(s);
                    }
                } else {
                    self.pin(u.group, format!("linear `{name}` reads the last dimension, not these channels"));
                }
                self.produce(name, out, 0, false)
            }
            Layer::Conv2d { name, groups, .. } => {
                let (c, oc) = (s_in[0], self.shapes[at].shape_out[0]);
                if !(u.first_axis && u.block == 1) {
                    self.pin(u.group, format!("conv2d `{name}` reads channels these units are not"));
                }
                if *groups == 1 {
                    if let Some(s) = self.slice(name, "weight", 1, 1) {
                        let r = self.find(u.group);
                        self.arena[r].consumers.push(s);
                    }
                    self.produce(name, oc, 0, true)
                } else if *groups == c && oc == c {
                    // Depthwise: filter u reads channel u only; both sides go with the unit.
                    let r = self.find(u.group);
                    for suffix in ["weight", "bias"] {
                        if let Some(s) = self.slice(name, suffix, 0, 1) {
                            self.arena[r].members.push(s);
                        }
                    }
                    u
                } else {
                    let why = format!("grouped conv2d `{name}` ({groups} groups) ties channels together");
                    self.pin(u.group, why.clone());
                    let out = self.produce(name, oc, 0, true);
                    self.pin(out.group, why);
                    out
                }
            }
            Layer::BatchNorm { name, .. } => {
                if on_first {
                    let r = self.find(u.group);
                    for suffix in ["weight", "bias", "running_mean", "running_var"] {
                        // After a flatten a unit owns `block` consecutive features, each normalised.
                        if let Some(s) = self.slice(name, suffix, 0, u.block) {
                            self.arena[r].members.push(s);
                        }
                    }
                }
                u
            }
            Layer::LayerNorm { name, .. } => {
                if on_last {
                    self.pin(u.group, format!("layer_norm `{name}` normalises across these units"));
                }
                u
            }
            Layer::Embedding { name } => {
                let d = *self.shapes[at].shape_out.last().unwrap_or(&0);
                self.produce(name, d, 1, false)
            }
            Layer::Softmax => {
                if on_last {
                    self.pin(u.group, format!("the softmax at {at} mixes these units"));
                }
                u
            }
            Layer::Flatten => {
                if rank1 {
                    u
                } else if u.first_axis {
                    Units { block: u.block * s_in[1..].iter().product::<usize>(), first_axis: false, ..u }
                } else {
                    self.pin(u.group, format!("the flatten at {at} interleaves these units"));
                    u
                }
            }
            Layer::GlobalAvgPool2d | Layer::MaxPool2d { .. } | Layer::AvgPool2d { .. } if !u.first_axis => {
                // Pooling runs over the two last axes: units there are mixed, not carried.
                self.pin(u.group, format!("the pooling at {at} mixes these units"));
                u
            }
            Layer::GlobalAvgPool2d => Units { first_axis: true, ..u },
            Layer::Relu
            | Layer::Gelu
            | Layer::Silu
            | Layer::Tanh
            | Layer::Sigmoid
            | Layer::Dropout { .. }
            | Layer::MaxPool2d { .. }
            | Layer::AvgPool2d { .. } => u,
            Layer::Residual { layers } => {
                let inner = self.chain(layers, at, u);
                let (a, b) = (self.find(u.group), self.find(inner.group));
                if inner.block != u.block || inner.first_axis != u.first_axis {
                    self.pin(a, format!("the residual at {at} adds units laid out differently"));
                    self.pin(b, format!("the residual at {at} adds units laid out differently"));
                } else if a != b {
                    // Union: everything of `b` moves into `a`.
                    let moved = std::mem::replace(&mut self.arena[b], UnitGroup::new(0));
                    let target = &mut self.arena[a];
                    target.layers.extend(moved.layers);
                    target.producers.extend(moved.producers);
                    target.members.extend(moved.members);
                    target.consumers.extend(moved.consumers);
                    if target.pinned.is_none() {
                        target.pinned = moved.pinned;
                    }
                    self.parent[b] = a;
                }
                u
            }
        }
    }
}

/// The unit groups of a model, in the order their first layer runs. `summary` is the graph's
/// validation on the model and `has` tells which tensors exist.
pub fn unit_groups(graph: &Graph, summary: &GraphSummary, has: &dyn Fn(&str) -> bool) -> Vec<UnitGroup> {
    let shapes = summary.layers.iter().map(|l| (l.pointer.as_str(), l)).collect();
    let mut a = Analysis { shapes, weights: has, arena: Vec::new(), parent: Vec::new() };
    // Features of a flat input, channels of an image.
    let input = a.group(summary.input_shape[0]);
    a.pin(input, "the model's input".into());
    let start = Units { group: input, block: 1, first_axis: summary.input_shape.len() > 1 };
    let out = a.chain(&graph.layers, "", start);
    a.pin(out.group, "the model's output".into());
    let roots: BTreeSet<usize> = (0..a.arena.len()).map(|g| a.find(g)).collect();
    roots
        .into_iter()
        .map(|r| {
            let mut g = a.arena[r].clone();
            g.producers.sort();
            g.members.sort();
            g.consumers.sort();
            g.members.dedup();
            g
        })
        .collect()
}

/// Norm used to rank units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    L1,
    L2,
}

/// Per-unit importance: the norm of everything the group's producers hold for the unit.
pub fn importance(group: &UnitGroup, weights: &Weights, norm: Norm) -> Vec<f64> {
    let mut acc = vec![0f64; group.size];
    for s in &group.producers {
        let Some((shape, values)) = weights.get(&s.tensor) else { continue };
        for_each_entry(shape, s.axis, s.block, |unit, flat| {
            let v = values[flat] as f64;
            acc[unit] += match norm {
                Norm::L1 => v.abs(),
                Norm::L2 => v * v,
            };
        });
    }
    if norm == Norm::L2 {
        acc.iter_mut().for_each(|v| *v = v.sqrt());
    }
    acc
}

/// Where a producer's units are measured: the output of the last layer after it that keeps
/// each unit on its own (activations, batch norm, dropout, pooling), i.e. what its consumers read.
fn activation_point<'a>(summary: &'a GraphSummary, producer: &'a super::LayerShape) -> &'a super::LayerShape {
    let per_unit = ["relu", "gelu", "silu", "tanh", "sigmoid", "dropout", "batch_norm", "max_pool2d", "avg_pool2d"];
    let mut at = producer;
    loop {
        let Some((parent, index)) = at.pointer.rsplit_once('/').and_then(|(p, i)| Some((p, i.parse::<usize>().ok()?)))
        else {
            return at;
        };
        let next = format!("{parent}/{}", index + 1);
        match summary.layers.iter().find(|l| l.pointer == next) {
            Some(l) if per_unit.contains(&l.kind) => at = l,
            _ => return at,
        }
    }
}

fn producer_layers<'a>(
    group: &'a UnitGroup,
    summary: &'a GraphSummary,
) -> impl Iterator<Item = (&'a super::LayerShape, &'a super::LayerShape)> + 'a {
    group.layers.iter().filter_map(move |name| {
        let p = summary.layers.iter().find(|l| l.name.as_deref() == Some(name.as_str()))?;
        Some((p, activation_point(summary, p)))
    })
}

/// What the data says about a group's units: their importance, and the mean of each unit's
/// activation per position (`[unit][position]`) where the consumers read it.
pub struct Activity {
    pub scores: Vec<f64>,
    means: Vec<Vec<f64>>,
    /// Whether the consumers read exactly the measured activations (one producer, no per-unit
    /// layer such as a depthwise conv in between), so removed units can be compensated.
    exact: bool,
}

/// Per-unit importance measured on data: how much each unit's contribution to its consumers
/// varies, the standard deviation of its activation where they read it (after the activation
/// function, batch norm or pooling that follow its producer; summed over a residual stream's
/// producers) times the L2 norm of the consumers' weights reading it. The mean part of a removed
/// unit's contribution is not lost: [`compensate`] folds it into the consumers' biases. On the
/// digits MLP at 50% of the hidden units this keeps 90.8% accuracy where the L2 weight norm keeps
/// 89.4%, and ranking by mean |activation| without compensation 37%. `trace` holds the measured
/// layers' outputs by pointer (batch first); channels are axis 1 of a conv's output, features the
/// last axis otherwise.
pub fn activation_importance(
    group: &UnitGroup,
    summary: &GraphSummary,
    trace: &super::forward::Trace,
    weights: &Weights,
) -> Activity {
    let mut outgoing = vec![0f64; group.size];
    for s in &group.consumers {
        let Some((shape, values)) = weights.get(&s.tensor) else { continue };
        for_each_entry(shape, s.axis, s.block, |unit, flat| {
            if unit < outgoing.len() {
                outgoing[unit] += (values[flat] as f64).powi(2);
            }
        });
    }
    let mut scores = vec![0f64; group.size];
    let mut means = vec![Vec::new(); group.size];
    let producers: Vec<_> = producer_layers(group, summary).collect();
    for (producer, point) in &producers {
        let Some((dims, values)) = trace.get(&point.pointer) else { continue };
        let axis = if producer.kind == "conv2d" { 1 } else { dims.len() - 1 };
        // Per unit: sum and sum of squares over the batch, per position within the unit.
        let positions: usize = if axis == 1 { dims[2..].iter().product() } else { 1 };
        let samples = (values.len() / (dims[axis].max(1) * positions)) as f64;
        let mut sum = vec![vec![0f64; positions]; group.size];
        let mut sq = vec![0f64; group.size];
        let inner: usize = dims[axis + 1..].iter().product();
        for_each_entry(dims, axis, 1, |unit, flat| {
            if unit < group.size {
                let v = values[flat] as f64;
                sum[unit][if positions > 1 { flat % inner } else { 0 }] += v;
                sq[unit] += v * v;
            }
        });
        for u in 0..group.size {
            let n = samples * positions as f64;
            let mean = sum[u].iter().sum::<f64>() / n;
            scores[u] += (sq[u] / n - mean * mean).max(0.0).sqrt();
            means[u] = sum[u].iter().map(|s| s / samples).collect();
        }
    }
    scores.iter_mut().zip(&outgoing).for_each(|(a, o)| *a *= o.sqrt());
    // Per-unit members other than batch norm (a depthwise conv) sit between the measured
    // activation and the consumers.
    let exact = producers.len() == 1 && group.members.iter().all(|m| is_norm(&m.tensor, group));
    Activity { scores, means, exact }
}

/// Whether a member tensor is a batch norm's (whose effect the measured activation already holds).
fn is_norm(tensor: &str, group: &UnitGroup) -> bool {
    let module = tensor.rsplit_once('.').map_or(tensor, |(m, _)| m);
    group.members.iter().any(|m| m.tensor == format!("{module}.running_mean"))
}

/// Folds the mean contribution of the units not in `keep` into the biases of the linear layers
/// that read them (`b += W[:, u] * mean(a_u)`), so removing them loses only their variation.
/// Returns how many consumers were compensated; conv consumers and groups whose consumers do not
/// read the measured activations directly are left as they are.
pub fn compensate(weights: &mut Weights, group: &UnitGroup, activity: &Activity, keep: &[usize]) -> usize {
    if !activity.exact {
        return 0;
    }
    let kept: BTreeSet<usize> = keep.iter().copied().collect();
    let mut done = 0;
    for s in &group.consumers {
        let Some((shape, w)) = weights.get(&s.tensor) else { continue };
        let [out, cols] = shape[..] else { continue };
        if s.axis != 1 || cols != group.size * s.block {
            continue;
        }
        let bias = format!("{}.bias", s.tensor.strip_suffix(".weight").unwrap_or(&s.tensor));
        let mut shift = vec![0f64; out];
        for u in (0..group.size).filter(|u| !kept.contains(u)) {
            let m = &activity.means[u];
            for k in 0..s.block {
                let mean = if m.len() == s.block { m[k] } else { m.iter().sum::<f64>() / m.len().max(1) as f64 };
                for (o, sh) in shift.iter_mut().enumerate() {
                    *sh += w[o * cols + u * s.block + k] as f64 * mean;
                }
            }
        }
        if let Some((bshape, b)) = weights.get_mut(&bias) {
            if bshape[..] == [out] {
                b.iter_mut().zip(&shift).for_each(|(b, s)| *b += *s as f32);
                done += 1;
            }
        }
    }
    done
}

/// The pointers of the layers whose outputs [`activation_importance`] reads for `groups`.
pub fn producer_pointers(groups: &[&UnitGroup], summary: &GraphSummary) -> BTreeSet<String> {
    groups.iter().flat_map(|g| producer_layers(g, summary).map(|(_, point)| point.pointer.clone())).collect()
}

/// Calls `f(unit, flat index)` for every entry of a tensor along `axis`, units in blocks.
fn for_each_entry(shape: &[usize], axis: usize, block: usize, mut f: impl FnMut(usize, usize)) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let dim = shape[axis];
    for o in 0..outer {
        for j in 0..dim {
            let base = (o * dim + j) * inner;
            for k in 0..inner {
                f(j / block, base + k);
            }
        }
    }
}

/// The `keep` most important units (ties broken by index), ascending.
pub fn keep_most_important(scores: &[f64], keep: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut kept: Vec<usize> = order[..keep.min(scores.len())].to_vec();
    kept.sort_unstable();
    kept
}

/// Keeps only units `keep` (ascending) of `s` in its tensor.
fn gather(weights: &mut Weights, s: &Slice, keep: &[usize]) {
    let Some((shape, values)) = weights.get_mut(&s.tensor) else { return };
    let outer: usize = shape[..s.axis].iter().product();
    let inner: usize = shape[s.axis + 1..].iter().product();
    let dim = shape[s.axis];
    let mut out = Vec::with_capacity(outer * keep.len() * s.block * inner);
    for o in 0..outer {
        for &u in keep {
            let start = (o * dim + u * s.block) * inner;
            out.extend_from_slice(&values[start..start + s.block * inner]);
        }
    }
    shape[s.axis] = keep.len() * s.block;
    *values = out;
}

/// Removes every unit of `group` not in `keep` from every tensor that holds it.
pub fn remove_units(weights: &mut Weights, group: &UnitGroup, keep: &[usize]) {
    for s in group.slices() {
        gather(weights, s, keep);
    }
}

/// The full-size model in which the consumers ignore the removed units (their input columns are
/// zero): what removing them must compute exactly.
pub fn masked(weights: &mut Weights, group: &UnitGroup, keep: &[usize]) {
    let kept: BTreeSet<usize> = keep.iter().copied().collect();
    for s in &group.consumers {
        let Some((shape, values)) = weights.get_mut(&s.tensor) else { continue };
        let shape = shape.clone();
        for_each_entry(&shape, s.axis, s.block, |unit, flat| {
            if !kept.contains(&unit) {
                values[flat] = 0.0;
            }
        });
    }
}

/// The graph without the layers at `pointers` (`/layers/3`, `/layers/2/layers/0`); returns it
/// and the module names whose tensors go with them.
pub fn drop_layers(graph: &Graph, pointers: &BTreeSet<String>) -> (Graph, Vec<String>) {
    fn walk(layers: &[Layer], at: &str, drop: &BTreeSet<String>, names: &mut Vec<String>) -> Vec<Layer> {
        let mut out = Vec::new();
        for (i, l) in layers.iter().enumerate() {
            let p = format!("{at}/layers/{i}");
            if drop.contains(&p) {
                collect_names(l, names);
                continue;
            }
            out.push(match l {
                Layer::Residual { layers } => Layer::Residual { layers: walk(layers, &p, drop, names) },
                other => other.clone(),
            });
        }
        out
    }
    let mut names = Vec::new();
    let layers = walk(&graph.layers, "", pointers, &mut names);
    (Graph { input: graph.input.clone(), layers }, names)
}

fn collect_names(l: &Layer, out: &mut Vec<String>) {
    if let Some(n) = l.name() {
        out.push(n.to_owned());
    }
    if let Layer::Residual { layers } = l {
        layers.iter().for_each(|l| collect_names(l, out));
    }
}

/// Pointers of the layers `depth` can drop: residual blocks and shape-preserving parametrized
/// layers (a linear `[n, n]`, a conv keeping its shape), with their names when they have one.
pub fn droppable(graph: &Graph, summary: &GraphSummary) -> BTreeMap<String, Option<String>> {
    fn walk(
        layers: &[Layer],
        at: &str,
        shapes: &HashMap<&str, &super::LayerShape>,
        out: &mut BTreeMap<String, Option<String>>,
    ) {
        for (i, l) in layers.iter().enumerate() {
            let p = format!("{at}/layers/{i}");
            let s = shapes[p.as_str()];
            let keeps = s.shape_in == s.shape_out;
            match l {
                Layer::Residual { layers } => {
                    out.insert(p.clone(), None);
                    walk(layers, &p, shapes, out);
                }
                l if keeps && l.name().is_some() => {
                    out.insert(p, l.name().map(str::to_owned));
                }
                _ => {}
            }
        }
    }
    let shapes = summary.layers.iter().map(|l| (l.pointer.as_str(), l)).collect();
    let mut out = BTreeMap::new();
    walk(&graph.layers, "", &shapes, &mut out);
    out
}

/// Every tensor of the modules `names` (weights, biases, norm statistics and buffers).
pub fn module_tensors<'a>(names: &'a [String], all: impl Iterator<Item = &'a String> + 'a) -> Vec<String> {
    let prefixes: Vec<String> = names.iter().map(|n| format!("{n}.")).collect();
    all.filter(|t| prefixes.iter().any(|p| t.starts_with(p.as_str()) && !t[p.len()..].contains('.'))).cloned().collect()
}

#[cfg(test)]
mod tests;
