//! What the structural steps (`shrink`, `factorize`, `prune` `structured` with a graph) share:
//! planning on shapes alone, and rewriting the model held in memory, with a proof per edit.
//!
//! Planning simulates each edit on a [`ShapeModel`] (the graph and the tensor table), so the plan
//! gives every new shape before anything runs. Execution applies the same edit to a
//! [`ModelState`] (the graph's tensors as f32) and checks it: a width edit must give the outputs
//! of the full-size model whose consumers ignore the removed units, a factorization those of the
//! model with each weight replaced by its low-rank product, within [`PROOF_TOLERANCE`].

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::compress::select::Selector;
use crate::formats::safetensors::Dtype;
use crate::graph::eval::Dataset;
use crate::graph::forward::{Network, Weights};
use crate::graph::lowrank::{self, FactorReport, Rank};
use crate::graph::structure::{self, Norm, UnitGroup};
use crate::graph::train::{DistillConfig, Trainable, TrainingRecord};
use crate::graph::{Graph, GraphSummary, Layer, LayerShape, TensorTable};

/// Largest relative difference allowed between a structural edit's result and its reference
/// model on the proof batch: both are the same arithmetic in f32, summed in another order.
pub const PROOF_TOLERANCE: f64 = 1e-4;
/// Samples of the proof batch (from the dataset when the job has one, else seeded Gaussian).
pub const PROOF_SAMPLES: usize = 64;
/// Samples used to rank layers for `depth: {count}`.
pub const DEPTH_SAMPLES: usize = 256;

/// How many units of a group to keep.
#[derive(Debug, Clone, PartialEq)]
pub enum KeepRule {
    /// The same fraction of every group the selector allows.
    Ratio(f64),
    /// A fraction per producing layer name; other groups are kept whole.
    PerLayer(BTreeMap<String, f64>),
}

#[derive(Debug, Clone, PartialEq)]
pub enum DepthRule {
    /// Layer names or pointers (`/layers/3`).
    Drop(Vec<String>),
    /// The `n` top-level layers whose removal changes the outputs least on the dataset.
    Count(usize),
}

/// How units are ranked before the least important go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Importance {
    /// The norm of the weights producing each unit.
    Weights(Norm),
    /// The mean magnitude of each unit's activation on the job's dataset.
    Activation,
}

/// One structural edit, as a step asks for it.
#[derive(Debug, Clone)]
pub enum Edit {
    Width {
        keep: KeepRule,
        importance: Importance,
        select: Selector,
    },
    Depth(DepthRule),
    Factorize {
        rank: Rank,
        select: Selector,
    },
    /// Train the model as it stands to match the teacher (the original model, or the job's
    /// model when the student is another upload) on the dataset; `student` first derives the
    /// student from the model (the step's `"student": {"width": ...}` shorthand).
    Distill {
        config: DistillConfig,
        student: Option<Box<Edit>>,
    },
}

/// A model's architecture and tensor shapes, for planning.
#[derive(Debug, Clone)]
pub struct ShapeModel {
    pub graph: Option<Graph>,
    pub table: TensorTable,
}

/// A model's graph and tensors in memory, for execution.
pub struct ModelState {
    pub graph: Option<Graph>,
    pub weights: Weights,
    pub dtypes: BTreeMap<String, Dtype>,
    /// The original model (graph and tensors) when a step distills from it.
    pub teacher: Option<(Graph, Weights)>,
}

/// What one edit changed, for the plan (and checked against execution).
#[derive(Debug, Clone, Default)]
pub struct Change {
    /// Tensors whose shape changed: name -> new shape.
    pub reshaped: BTreeMap<String, Vec<usize>>,
    /// New tensors: (name, shape, the tensor it comes from).
    pub added: Vec<(String, Vec<usize>, String)>,
    /// Tensors that disappear, with why.
    pub dropped: Vec<(String, String)>,
    /// Tensors the edit may drop at run time (depth by count).
    pub maybe_dropped: Vec<String>,
    /// One line per decision (`fc1: 256 -> 96 units`), and what was left alone and why.
    pub notes: Vec<String>,
}

/// A removed or kept set of units, in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupChange {
    pub layers: Vec<String>,
    pub units_before: usize,
    pub units_after: usize,
}

/// A layer `depth` considered, with the output change its removal causes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerImportance {
    pub pointer: String,
    pub name: Option<String>,
    /// Relative change of the outputs when the layer is bypassed (`None` when dropped by name).
    pub output_change: Option<f64>,
    pub dropped: bool,
}

/// The check that an edit computes what it should.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proof {
    /// What the edited model was compared with.
    pub reference: String,
    pub samples: usize,
    /// `max |y - y_ref| / max(1, max |y_ref|)` over the batch.
    pub max_relative_difference: f64,
    pub tolerance: f64,
}

/// What one structural step did, in `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StructureRecord {
    pub step: usize,
    pub op: String,
    pub parameters_before: u64,
    pub parameters_after: u64,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupChange>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerImportance>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub factors: Vec<FactorReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proof: Option<Proof>,
    /// A distillation run: loss and validation accuracy per epoch, the epoch kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<TrainingRecord>,
    pub notes: Vec<String>,
}

/// A refusal of a structural step: a pointer below the step and what is wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct EditError {
    /// Below `/steps/i` (`/width/ratios/fc9`), or empty for the step itself.
    pub field: String,
    pub detail: String,
}

fn refuse(field: impl Into<String>, detail: impl Into<String>) -> EditError {
    EditError { field: field.into(), detail: detail.into() }
}

/// Whether a step's `targets`/`ignore` pick a tensor of the table.
fn selects(select: &Selector, name: &str, dtype: Dtype, shape: &[usize]) -> bool {
    let t =
        crate::formats::safetensors::TensorInfo { name: name.into(), dtype, shape: shape.to_vec(), start: 0, end: 0 };
    select.decide(&t).is_ok()
}

fn kept_units(size: usize, ratio: f64) -> usize {
    ((size as f64 * ratio).round() as usize).clamp(1, size.max(1))
}

/// `a.b.weight` -> `a.b`.
fn module(tensor: &str) -> &str {
    tensor.rsplit_once('.').map_or(tensor, |(m, _)| m)
}

/// The graph with every depthwise conv of `group` set to `kept` groups (its channels follow).
fn resize_depthwise(graph: &Graph, group: &UnitGroup, kept: usize) -> Graph {
    let convs: BTreeSet<&str> =
        group.members.iter().filter(|s| s.tensor.ends_with(".weight")).map(|s| module(&s.tensor)).collect();
    fn walk(layers: &mut [Layer], convs: &BTreeSet<&str>, kept: usize) {
        for l in layers {
            match l {
                Layer::Conv2d { name, groups, .. } if convs.contains(name.as_str()) => *groups = kept,
                Layer::Residual { layers } => walk(layers, convs, kept),
                _ => {}
            }
        }
    }
    let mut g = graph.clone();
    walk(&mut g.layers, &convs, kept);
    g
}

/// Decides, for each unit group, how many units stay (`None`: the group is left whole).
fn width_targets(
    groups: &[UnitGroup],
    keep: &KeepRule,
    select: &Selector,
    table: &TensorTable,
) -> Result<(Vec<Option<usize>>, Vec<String>), EditError> {
    let mut notes = Vec::new();
    let selected = |g: &UnitGroup| {
        g.producers
            .iter()
            .any(|s| table.get(&s.tensor).is_some_and(|(dtype, shape)| selects(select, &s.tensor, *dtype, shape)))
    };
    let mut out = vec![None; groups.len()];
    match keep {
        KeepRule::Ratio(r) => {
            for (i, g) in groups.iter().enumerate() {
                match (&g.pinned, selected(g)) {
                    (None, true) => out[i] = Some(kept_units(g.size, *r)),
                    (Some(why), true) => notes.push(format!("{}: kept whole ({why})", g.layers.join(" + "))),
                    (_, false) => {}
                }
            }
        }
        KeepRule::PerLayer(ratios) => {
            for (name, r) in ratios {
                let field = format!("/width/ratios/{}", name.replace('~', "~0").replace('/', "~1"));
                let Some(i) = groups.iter().position(|g| g.layers.contains(name)) else {
                    let names: Vec<&str> = groups
                        .iter()
                        .filter(|g| g.pinned.is_none())
                        .flat_map(|g| g.layers.iter().map(String::as_str))
                        .collect();
                    return Err(refuse(
                        field,
                        format!("no layer `{name}` produces units (layers that can shrink: {})", names.join(", ")),
                    ));
                };
                if let Some(why) = &groups[i].pinned {
                    return Err(refuse(field, format!("the units of `{name}` cannot be removed: {why}")));
                }
                let k = kept_units(groups[i].size, *r);
                if let Some(other) = out[i].filter(|o| *o != k) {
                    return Err(refuse(
                        field,
                        format!("`{name}` is coupled with {} (a residual add), which keeps {other} units: give them the same ratio", groups[i].layers.join(", ")),
                    ));
                }
                out[i] = Some(k);
            }
        }
    }
    Ok((out, notes))
}

fn shapes_of(table: &TensorTable) -> impl Fn(&str) -> bool + '_ {
    move |t: &str| table.contains_key(t)
}

impl Edit {
    /// Plans the edit on shapes; returns the model after it and what changed.
    pub fn plan(&self, model: &ShapeModel) -> Result<(ShapeModel, Change), EditError> {
        if let Edit::Distill { config, student: Some(student) } = self {
            let (mid, mut change) =
                student.plan(model).map_err(|e| refuse(format!("/student{}", e.field), e.detail))?;
            let (next, more) = Edit::Distill { config: config.clone(), student: None }.plan(&mid)?;
            change.reshaped.extend(more.reshaped);
            change.notes.extend(more.notes);
            return Ok((next, change));
        }
        let mut next = model.clone();
        let mut change = Change::default();
        match self {
            Edit::Width { keep, select, .. } => {
                let graph = model.graph.as_ref().ok_or_else(|| refuse("", "needs the model's architecture graph"))?;
                let summary = graph
                    .validate(&model.table)
                    .map_err(|e| refuse("", format!("the graph does not fit: {}", e[0])))?;
                let groups = structure::unit_groups(graph, &summary, &shapes_of(&model.table));
                let (targets, notes) = width_targets(&groups, keep, select, &model.table)?;
                change.notes = notes;
                let mut g = graph.clone();
                for (group, kept) in groups.iter().zip(&targets) {
                    let Some(kept) = *kept else { continue };
                    change.notes.push(format!("{}: {} -> {kept} units", group.layers.join(" + "), group.size));
                    for s in group.slices() {
                        if let Some((_, shape)) = next.table.get_mut(&s.tensor) {
                            shape[s.axis] = kept * s.block;
                            change.reshaped.insert(s.tensor.clone(), shape.clone());
                        }
                    }
                    g = resize_depthwise(&g, group, kept);
                }
                g.validate(&next.table)
                    .map_err(|e| refuse("", format!("the narrower model would not fit its graph: {}", e[0])))?;
                next.graph = Some(g);
            }
            Edit::Depth(rule) => {
                let graph = model.graph.as_ref().ok_or_else(|| refuse("", "needs the model's architecture graph"))?;
                let summary = graph
                    .validate(&model.table)
                    .map_err(|e| refuse("", format!("the graph does not fit: {}", e[0])))?;
                let candidates = structure::droppable(graph, &summary);
                match rule {
                    DepthRule::Drop(list) => {
                        let mut pointers = BTreeSet::new();
                        for (i, item) in list.iter().enumerate() {
                            let found = candidates
                                .iter()
                                .find(|(p, n)| *p == item || n.as_deref() == Some(item.as_str()))
                                .map(|(p, _)| p.clone());
                            match found {
                                Some(p) => {
                                    pointers.insert(p);
                                }
                                None => {
                                    let exists = summary
                                        .layers
                                        .iter()
                                        .find(|l| &l.pointer == item || l.name.as_deref() == Some(item.as_str()));
                                    let detail = match exists {
                                        Some(l) => format!("layer `{item}` ({}) changes the shape {:?} -> {:?}; only shape-preserving layers and residual blocks can be dropped", l.kind, l.shape_in, l.shape_out),
                                        None => format!("the graph has no layer `{item}`"),
                                    };
                                    return Err(refuse(format!("/depth/drop/{i}"), detail));
                                }
                            }
                        }
                        let (g, names) = structure::drop_layers(graph, &pointers);
                        let gone = structure::module_tensors(&names, model.table.keys());
                        for t in &gone {
                            next.table.remove(t);
                            change.dropped.push((t.clone(), format!("layer `{}` dropped", module(t))));
                        }
                        g.validate(&next.table).map_err(|e| {
                            refuse("/depth/drop", format!("without those layers the graph does not chain: {}", e[0]))
                        })?;
                        change
                            .notes
                            .push(format!("dropped {}", pointers.iter().cloned().collect::<Vec<_>>().join(", ")));
                        next.graph = Some(g);
                    }
                    DepthRule::Count(n) => {
                        let top: Vec<(&String, &Option<String>)> =
                            candidates.iter().filter(|(p, _)| p.matches('/').count() == 2).collect();
                        if *n == 0 || *n > top.len() {
                            return Err(refuse(
                                "/depth/count",
                                format!(
                                    "count {n} must be between 1 and the {} top-level layers that can go",
                                    top.len()
                                ),
                            ));
                        }
                        let mut names = Vec::new();
                        for (p, _) in &top {
                            let (_, n) = structure::drop_layers(graph, &BTreeSet::from([(*p).clone()]));
                            names.extend(n);
                        }
                        change.maybe_dropped = structure::module_tensors(&names, model.table.keys());
                        let list: Vec<String> =
                            top.iter().map(|(p, n)| (*n).clone().unwrap_or_else(|| (*p).clone())).collect();
                        change.notes.push(format!("drops the {n} of {} whose removal changes the outputs least on the dataset (decided at run time)", list.join(", ")));
                    }
                }
            }
            Edit::Distill { config: c, .. } => {
                let graph = model.graph.as_ref().ok_or_else(|| refuse("", "needs the model's architecture graph"))?;
                let summary = graph
                    .validate(&model.table)
                    .map_err(|e| refuse("", format!("the graph does not fit: {}", e[0])))?;
                if summary.output_shape.len() != 1 {
                    return Err(refuse(
                        "",
                        format!(
                            "distillation trains on logits of shape [classes]; this graph outputs {:?}",
                            summary.output_shape
                        ),
                    ));
                }
                // Every trained tensor gets new values; shapes stay.
                for name in graph.tensor_names() {
                    if let Some((dtype, shape)) = model.table.get(&name) {
                        let trained =
                            dtype.is_float() && !name.ends_with(".running_mean") && !name.ends_with(".running_var");
                        if trained {
                            change.reshaped.insert(name, shape.clone());
                        }
                    }
                }
                change.notes.push(format!(
                    "{} epochs of batches of {}, AdamW at {} ({} schedule), T = {}, kd_weight {}, {:.0}% held out",
                    c.epochs,
                    c.batch_size,
                    c.learning_rate,
                    if c.cosine { "cosine" } else { "constant" },
                    c.temperature,
                    c.kd_weight,
                    100.0 * c.validation_fraction
                ));
            }
            Edit::Factorize { rank, select } => {
                let linear: Option<BTreeSet<String>> = model.graph.as_ref().map(linear_layers);
                for (name, (dtype, shape)) in &model.table {
                    if !selects(select, name, *dtype, shape) || shape.len() != 2 || !name.ends_with(".weight") {
                        continue;
                    }
                    let m = module(name).to_owned();
                    if linear.as_ref().is_some_and(|l| !l.contains(&m)) {
                        change.notes.push(format!("{name}: not a linear layer of the graph, left alone"));
                        continue;
                    }
                    let (out, inp) = (shape[0], shape[1]);
                    let r = match rank {
                        Rank::Fixed(r) if *r > out.min(inp) => {
                            change.notes.push(format!(
                                "{name}: rank {r} is above its smaller dimension {}, left dense",
                                out.min(inp)
                            ));
                            continue;
                        }
                        Rank::Fixed(r) => *r,
                        Rank::Energy(_) => out.min(inp),
                    };
                    let (a, b, bias) = (format!("{m}.0.weight"), format!("{m}.1.weight"), format!("{m}.1.bias"));
                    for n in [&a, &b, &bias] {
                        if model.table.contains_key(n) {
                            return Err(refuse(
                                "",
                                format!(
                                    "tensor `{name}`: its factor would be named `{n}`, which the model already has"
                                ),
                            ));
                        }
                    }
                    next.table.remove(name);
                    change.dropped.push((name.clone(), format!("factorized into `{a}` and `{b}`")));
                    next.table.insert(a.clone(), (*dtype, vec![r, inp]));
                    next.table.insert(b.clone(), (*dtype, vec![out, r]));
                    change.added.push((a, vec![r, inp], name.clone()));
                    change.added.push((b, vec![out, r], name.clone()));
                    let old_bias = format!("{m}.bias");
                    if let Some((bd, bs)) = model.table.get(&old_bias) {
                        next.table.remove(&old_bias);
                        next.table.insert(bias.clone(), (*bd, bs.clone()));
                        change.dropped.push((old_bias.clone(), format!("renamed `{bias}`")));
                        change.added.push((bias, bs.clone(), old_bias));
                    }
                    let saved = (out * inp) as i64 - (r * (out + inp)) as i64;
                    change.notes.push(match rank {
                        Rank::Fixed(_) if saved <= 0 => {
                            format!("{m}: rank {r} keeps {} more parameters than the dense layer", -saved)
                        }
                        Rank::Fixed(_) => format!("{m}: [{out}, {inp}] -> [{r}, {inp}] and [{out}, {r}]"),
                        Rank::Energy(e) => {
                            format!("{m}: rank decided at run time (energy {e}); shapes here are the upper bound {r}")
                        }
                    });
                }
                if change.added.is_empty() {
                    return Err(refuse("", "no selected tensor is a linear weight to factorize"));
                }
                if let Some(g) = &model.graph {
                    next.graph = Some(split_linears(g, &change));
                } else {
                    change.notes.push("the model has no graph: the factors are written, and code that loads them must apply the two layers (`x A^T`, then `B`)".into());
                }
            }
        }
        Ok((next, change))
    }
}

/// Resolves each feature pair of `c` to (teacher layer, student layer), refusing pairs whose
/// layers are missing or of different widths. `teacher` and `student` are what the graphs
/// compute; errors carry the pointer below the step (`/features/0/student`).
pub fn feature_layers<'g>(
    c: &DistillConfig,
    teacher: &'g GraphSummary,
    student: &'g GraphSummary,
) -> Result<Vec<(&'g LayerShape, &'g LayerShape)>, EditError> {
    let mut pairs = Vec::new();
    for (k, (t, s)) in c.features.iter().enumerate() {
        let tl = teacher.layer(t).ok_or_else(|| {
            refuse(format!("/features/{k}/teacher"), format!("the teacher's graph has no layer `{t}`"))
        })?;
        let sl = student.layer(s).ok_or_else(|| {
            refuse(format!("/features/{k}/student"), format!("the student's graph has no layer `{s}`"))
        })?;
        let width = |l: &LayerShape| l.shape_out.iter().product::<usize>();
        if width(tl) != width(sl) {
            return Err(refuse(
                format!("/features/{k}"),
                format!(
                    "teacher layer `{t}` outputs {:?} per sample and student layer `{s}` {:?}: feature distillation matches layers of equal width (pick layers the student kept whole, or use the logits alone)",
                    tl.shape_out, sl.shape_out
                ),
            ));
        }
        pairs.push((tl, sl));
    }
    Ok(pairs)
}

/// The teacher's logits and, for each feature pair, its layer's outputs on every sample of the
/// dataset, computed once (no augmentation: they do not change between epochs).
fn teacher_outputs(
    (tg, tw): (&Graph, &Weights),
    student: &Graph,
    student_table: &TensorTable,
    c: &DistillConfig,
    d: &Dataset,
) -> Result<crate::graph::train::TeacherOutputs, String> {
    let (ts, ss) = (
        tg.validate(&tw.iter().map(|(k, (shape, _))| (k.clone(), (Dtype::F32, shape.clone()))).collect())
            .map_err(|e| format!("the teacher's graph: {}", e[0]))?,
        student.validate(student_table).map_err(|e| format!("the student's graph: {}", e[0]))?,
    );
    let pairs = feature_layers(c, &ts, &ss).map_err(|e| e.detail)?;
    let mut out = crate::graph::train::TeacherOutputs {
        logits: Vec::with_capacity(d.samples * ts.output_shape.iter().product::<usize>()),
        features: pairs
            .iter()
            .map(|(t, s)| crate::graph::train::FeatureTarget {
                student: s.pointer.clone(),
                width: t.shape_out.iter().product(),
                values: Vec::new(),
            })
            .collect(),
    };
    let pointers: Vec<String> = pairs.iter().map(|(t, _)| t.pointer.clone()).collect();
    // Logits from the inference network; features from the training forward pass, so both
    // sides of a feature pair are the same computation (the inference network fuses ReLU).
    let network = Network::build(tg, tw).map_err(|e| e.to_string())?;
    let trainable = if pointers.is_empty() { None } else { Some(Trainable::new(tg, tw)?) };
    for start in (0..d.samples).step_by(256) {
        let n = 256.min(d.samples - start);
        let x = &d.inputs[start * d.sample_len..(start + n) * d.sample_len];
        out.logits.extend(network.forward(x, n, &d.input_shape).map_err(|e| e.to_string())?.1);
        if let Some(t) = &trainable {
            let mut dims = vec![n];
            dims.extend_from_slice(&d.input_shape);
            let xt = candle_core::Tensor::from_slice(x, dims, &candle_core::Device::Cpu).map_err(|e| e.to_string())?;
            let (_, feats) = t.forward_taps(&xt, &pointers)?;
            for (target, f) in out.features.iter_mut().zip(feats) {
                let values = f.flatten_all().and_then(|v| v.to_vec1::<f32>()).map_err(|e| e.to_string())?;
                target.values.extend(values);
            }
        }
    }
    Ok(out)
}

fn linear_layers(g: &Graph) -> BTreeSet<String> {
    fn walk(layers: &[Layer], out: &mut BTreeSet<String>) {
        for l in layers {
            match l {
                Layer::Linear { name } => {
                    out.insert(name.clone());
                }
                Layer::Residual { layers } => walk(layers, out),
                _ => {}
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(&g.layers, &mut out);
    out
}

/// The graph with each factorized linear `m` replaced by linears `m.0` and `m.1`.
fn split_linears(g: &Graph, change: &Change) -> Graph {
    let split: BTreeSet<String> = change
        .added
        .iter()
        .filter(|(n, ..)| n.ends_with(".0.weight"))
        .map(|(n, ..)| n[..n.len() - ".0.weight".len()].to_owned())
        .collect();
    fn walk(layers: &[Layer], split: &BTreeSet<String>) -> Vec<Layer> {
        let mut out = Vec::new();
        for l in layers {
            match l {
                Layer::Linear { name } if split.contains(name) => {
                    out.push(Layer::Linear { name: format!("{name}.0") });
                    out.push(Layer::Linear { name: format!("{name}.1") });
                }
                Layer::Residual { layers } => out.push(Layer::Residual { layers: walk(layers, split) }),
                other => out.push(other.clone()),
            }
        }
        out
    }
    Graph { input: g.input.clone(), layers: walk(&g.layers, &split) }
}

fn parameters(w: &Weights) -> u64 {
    w.values().map(|(s, _)| s.iter().product::<usize>() as u64).sum()
}

/// The proof batch: dataset samples when there are, else seeded Gaussian inputs (token ids in
/// range when the graph starts with an embedding).
pub fn proof_batch(graph: &Graph, weights: &Weights, data: Option<&Dataset>, samples: usize) -> (Vec<f32>, usize) {
    if let Some(d) = data {
        let n = samples.min(d.samples);
        return (d.inputs[..n * d.sample_len].to_vec(), n);
    }
    let per: usize = graph.input.shape.iter().product();
    let mut x = crate::graph::lowrank::gaussian(per * samples, 0xBA7C4);
    if let Some(Layer::Embedding { name }) = graph.layers.first() {
        let vocab = weights.get(&format!("{name}.weight")).map_or(1, |(s, _)| s[0]);
        x.iter_mut().for_each(|v| *v = ((v.abs() * 1000.0) as usize % vocab) as f32);
    }
    (x, samples)
}

/// A model's outputs on a batch.
fn outputs((g, w): (&Graph, &Weights), batch: &(Vec<f32>, usize)) -> Result<Vec<f32>, String> {
    let net = Network::build(g, w).map_err(|e| e.to_string())?;
    net.forward(&batch.0, batch.1, &g.input.shape).map(|(_, y)| y).map_err(|e| e.to_string())
}

/// Runs both models on the batch and measures how far apart they are.
fn prove(
    reference: (&Graph, &Weights),
    edited: (&Graph, &Weights),
    batch: &(Vec<f32>, usize),
    what: &'static str,
) -> Result<Proof, String> {
    let (a, b) = (outputs(reference, batch)?, outputs(edited, batch)?);
    if a.len() != b.len() {
        return Err(format!("the edited model gives {} outputs, the reference {}", b.len(), a.len()));
    }
    let scale = a.iter().fold(1f64, |m, v| m.max(v.abs() as f64));
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs())) / scale;
    if !diff.is_finite() || diff > PROOF_TOLERANCE {
        return Err(format!(
            "the edited model's outputs differ from the {what} by {diff:.3e} (relative), more than {PROOF_TOLERANCE:e}"
        ));
    }
    Ok(Proof { reference: what.into(), samples: batch.1, max_relative_difference: diff, tolerance: PROOF_TOLERANCE })
}

/// Relative change of the outputs between two models on a batch.
fn output_change(a: (&Graph, &Weights), b: (&Graph, &Weights), batch: &(Vec<f32>, usize)) -> Result<f64, String> {
    let (ya, yb) = (outputs(a, batch)?, outputs(b, batch)?);
    let d: f64 = ya.iter().zip(&yb).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let n: f64 = ya.iter().map(|x| (*x as f64).powi(2)).sum();
    Ok((d / n.max(f64::MIN_POSITIVE)).sqrt())
}

impl Edit {
    /// Applies the edit to the model in memory and proves it. `data` is the job's dataset.
    pub fn apply(
        &self,
        step: usize,
        op: &'static str,
        state: &mut ModelState,
        data: Option<&Dataset>,
        checkpoints: Option<&std::path::Path>,
        tick: &mut dyn FnMut(&str) -> bool,
    ) -> Result<StructureRecord, String> {
        if let Edit::Distill { config, student: Some(student) } = self {
            let derived = student.apply(step, op, state, data, checkpoints, tick)?;
            let trained = Edit::Distill { config: config.clone(), student: None }.apply(
                step,
                op,
                state,
                data,
                checkpoints,
                tick,
            )?;
            let mut notes = derived.notes;
            notes.extend(trained.notes);
            return Ok(StructureRecord {
                parameters_before: derived.parameters_before,
                groups: derived.groups,
                layers: derived.layers,
                factors: derived.factors,
                proof: derived.proof,
                notes,
                ..trained
            });
        }
        let before = parameters(&state.weights);
        let mut record = StructureRecord {
            step,
            op: op.into(),
            parameters_before: before,
            parameters_after: before,
            groups: Vec::new(),
            layers: Vec::new(),
            factors: Vec::new(),
            proof: None,
            training: None,
            notes: Vec::new(),
        };
        let table = |w: &Weights, d: &BTreeMap<String, Dtype>| -> TensorTable {
            w.iter().map(|(k, (s, _))| (k.clone(), (d.get(k).copied().unwrap_or(Dtype::F32), s.clone()))).collect()
        };
        match self {
            Edit::Width { keep, importance, select } => {
                let graph = state.graph.clone().ok_or("needs the model's architecture graph")?;
                let t = table(&state.weights, &state.dtypes);
                let summary = graph.validate(&t).map_err(|e| e[0].to_string())?;
                let groups = structure::unit_groups(&graph, &summary, &shapes_of(&t));
                let (targets, notes) = width_targets(&groups, keep, select, &t).map_err(|e| e.detail)?;
                record.notes = notes;
                let mut masked = state.weights.clone();
                let mut g = graph.clone();
                let trace = match importance {
                    Importance::Weights(_) => None,
                    Importance::Activation => {
                        let d = data.ok_or("`importance: activation` measures on the dataset: the job needs one")?;
                        let chosen: Vec<&UnitGroup> =
                            groups.iter().zip(&targets).filter(|(_, k)| k.is_some()).map(|(g, _)| g).collect();
                        let want = structure::producer_pointers(&chosen, &summary);
                        let (x, n) = proof_batch(&graph, &state.weights, Some(d), DEPTH_SAMPLES);
                        let net = Network::build(&graph, &state.weights).map_err(|e| e.to_string())?;
                        Some(net.trace(&x, n, &graph.input.shape, &want).map_err(|e| e.to_string())?)
                    }
                };
                for (group, kept) in groups.iter().zip(&targets) {
                    let Some(kept) = *kept else { continue };
                    let activity = match (importance, &trace) {
                        (Importance::Activation, Some(t)) => {
                            Some(structure::activation_importance(group, &summary, t, &state.weights))
                        }
                        _ => None,
                    };
                    let scores = match (importance, &activity) {
                        (Importance::Weights(norm), _) => structure::importance(group, &state.weights, *norm),
                        (Importance::Activation, Some(a)) => a.scores.clone(),
                        (Importance::Activation, None) => unreachable!("measured above"),
                    };
                    let keep_idx = structure::keep_most_important(&scores, kept);
                    if let Some(a) = &activity {
                        // The same bias shift in both models: the proof still compares like with like.
                        let n = structure::compensate(&mut state.weights, group, a, &keep_idx);
                        structure::compensate(&mut masked, group, a, &keep_idx);
                        if n == 0 {
                            record.notes.push(format!(
                                "{}: the removed units' mean contribution could not be folded into a bias (no linear consumer with a bias reads them directly)",
                                group.layers.join(" + ")
                            ));
                        }
                    }
                    structure::masked(&mut masked, group, &keep_idx);
                    structure::remove_units(&mut state.weights, group, &keep_idx);
                    g = resize_depthwise(&g, group, kept);
                    record.groups.push(GroupChange {
                        layers: group.layers.clone(),
                        units_before: group.size,
                        units_after: kept,
                    });
                }
                let batch = proof_batch(&graph, &masked, data, PROOF_SAMPLES);
                record.proof = Some(prove(
                    (&graph, &masked),
                    (&g, &state.weights),
                    &batch,
                    "full-size model with the removed units masked",
                )?);
                state.graph = Some(g);
            }
            Edit::Depth(rule) => {
                let graph = state.graph.clone().ok_or("needs the model's architecture graph")?;
                let t = table(&state.weights, &state.dtypes);
                let summary = graph.validate(&t).map_err(|e| e[0].to_string())?;
                let candidates = structure::droppable(&graph, &summary);
                let batch = proof_batch(&graph, &state.weights, data, DEPTH_SAMPLES);
                // Each candidate's importance: how much the outputs move without it.
                let bypass = |p: &String| -> Result<f64, String> {
                    let (g2, names) = structure::drop_layers(&graph, &BTreeSet::from([p.clone()]));
                    let mut w2 = state.weights.clone();
                    for t in structure::module_tensors(&names, state.weights.keys()) {
                        w2.remove(&t);
                    }
                    output_change((&graph, &state.weights), (&g2, &w2), &batch)
                };
                let pointers: BTreeSet<String> = match rule {
                    DepthRule::Drop(list) => {
                        let chosen: BTreeSet<String> = list
                            .iter()
                            .filter_map(|item| {
                                candidates
                                    .iter()
                                    .find(|(p, n)| *p == item || n.as_deref() == Some(item.as_str()))
                                    .map(|(p, _)| p.clone())
                            })
                            .collect();
                        for p in &chosen {
                            let change = bypass(p)?;
                            record.layers.push(LayerImportance {
                                pointer: p.clone(),
                                name: candidates[p].clone(),
                                output_change: Some(change),
                                dropped: true,
                            });
                        }
                        chosen
                    }
                    DepthRule::Count(n) => {
                        if data.is_none() {
                            return Err("`depth: {count}` ranks layers on the dataset: the job needs one".into());
                        }
                        let mut scored = Vec::new();
                        for (p, name) in candidates.iter().filter(|(p, _)| p.matches('/').count() == 2) {
                            scored.push((p.clone(), name.clone(), bypass(p)?));
                        }
                        scored.sort_by(|a, b| a.2.total_cmp(&b.2).then(a.0.cmp(&b.0)));
                        let chosen: BTreeSet<String> = scored.iter().take(*n).map(|s| s.0.clone()).collect();
                        record.layers = scored
                            .iter()
                            .map(|(p, name, c)| LayerImportance {
                                pointer: p.clone(),
                                name: name.clone(),
                                output_change: Some(*c),
                                dropped: chosen.contains(p),
                            })
                            .collect();
                        chosen
                    }
                };
                let (g, names) = structure::drop_layers(&graph, &pointers);
                for t in structure::module_tensors(&names, state.weights.keys().collect::<Vec<_>>().into_iter()) {
                    state.weights.remove(&t);
                }
                let t = table(&state.weights, &state.dtypes);
                g.validate(&t).map_err(|e| format!("without the dropped layers the graph does not chain: {}", e[0]))?;
                // Dropping layers changes what the model computes by design, so there is no
                // equivalent model to prove against: the shortened graph is validated on the
                // kept tensors and each dropped layer's effect on the outputs is reported.
                record.notes.push(format!(
                    "dropped {}; the outputs move by the `output_change` of each (measured on {} samples)",
                    pointers.iter().cloned().collect::<Vec<_>>().join(", "),
                    batch.1
                ));
                state.graph = Some(g);
            }
            Edit::Distill { config: c, .. } => {
                let d = data.ok_or("distillation trains on the dataset: the job needs one")?;
                let (tg, tw) = state.teacher.as_ref().ok_or("the original model (the teacher) is not in memory")?;
                let graph = state.graph.clone().ok_or("needs the model's architecture graph")?;
                if c.kd_weight < 1.0 && d.labels.is_none() {
                    return Err(
                        "the dataset has no `labels`: set `kd_weight` to 1 (distillation from the teacher alone)"
                            .into(),
                    );
                }
                let teacher = teacher_outputs((tg, tw), &graph, &table(&state.weights, &state.dtypes), c, d)?;
                let mut student = Trainable::new(&graph, &state.weights)?;
                student.fake_quant_bits = c.qat_bits;
                let labels = d.labels.as_deref();
                let checkpoint = match checkpoints {
                    Some(dir) => {
                        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                        Some(dir.join(format!("step-{step}.safetensors")))
                    }
                    None => None,
                };
                let run = crate::graph::train::distill(
                    &student,
                    &d.inputs,
                    &d.input_shape,
                    &teacher,
                    labels,
                    c,
                    checkpoint.as_deref(),
                    tick,
                )?;
                for (name, values) in student.weights()? {
                    state.weights.insert(name, values);
                }
                record.notes.push(format!(
                    "validation accuracy ({}) {:.4} before, {:.4} kept (epoch {})",
                    run.validated_against,
                    run.validation_accuracy_before,
                    run.epochs
                        .iter()
                        .find(|e| e.epoch == run.best_epoch)
                        .map_or(run.validation_accuracy_before, |e| e.validation_accuracy),
                    run.best_epoch
                ));
                record.training = Some(run);
            }
            Edit::Factorize { rank, .. } => {
                let t = table(&state.weights, &state.dtypes);
                let (next, change) =
                    self.plan(&ShapeModel { graph: state.graph.clone(), table: t }).map_err(|e| e.detail)?;
                let mut reconstructed = state.weights.clone();
                for (a_name, _, from) in change.added.iter().filter(|(n, ..)| n.ends_with(".0.weight")) {
                    let m = module(from).to_owned();
                    let (shape, values) =
                        state.weights.remove(from).ok_or_else(|| format!("tensor `{from}` is not in memory"))?;
                    let (out, inp) = (shape[0], shape[1]);
                    let f =
                        lowrank::factorize(&values, out, inp, *rank).map_err(|e| format!("tensor `{from}`: {e}"))?;
                    // The reference keeps the dense layer, with the product of the factors.
                    let mut dense = vec![0f32; out * inp];
                    for i in 0..out {
                        for k in 0..f.rank {
                            let bik = f.b[i * f.rank + k];
                            let row = &mut dense[i * inp..(i + 1) * inp];
                            row.iter_mut().zip(&f.a[k * inp..(k + 1) * inp]).for_each(|(d, a)| *d += bik * a);
                        }
                    }
                    reconstructed.insert(from.clone(), (shape.clone(), dense));
                    record.factors.push(FactorReport {
                        layer: m.clone(),
                        shape: [out, inp],
                        rank: f.rank,
                        parameters_before: (out * inp) as u64,
                        parameters_after: (f.rank * (out + inp)) as u64,
                        energy: f.energy,
                        relative_error: f.relative_error,
                        method: if f.randomized { "randomized SVD" } else { "SVD" }.into(),
                    });
                    state.weights.insert(a_name.clone(), (vec![f.rank, inp], f.a));
                    state.weights.insert(format!("{m}.1.weight"), (vec![out, f.rank], f.b));
                    let dt = state.dtypes.get(from).copied().unwrap_or(Dtype::F32);
                    state.dtypes.insert(a_name.clone(), dt);
                    state.dtypes.insert(format!("{m}.1.weight"), dt);
                    if let Some(b) = state.weights.remove(&format!("{m}.bias")) {
                        let bd = state.dtypes.get(&format!("{m}.bias")).copied().unwrap_or(Dtype::F32);
                        state.weights.insert(format!("{m}.1.bias"), b);
                        state.dtypes.insert(format!("{m}.1.bias"), bd);
                    }
                }
                record.notes = change.notes;
                if let (Some(old), Some(new)) = (&state.graph, &next.graph) {
                    let batch = proof_batch(old, &reconstructed, data, PROOF_SAMPLES);
                    record.proof = Some(prove(
                        (old, &reconstructed),
                        (new, &state.weights),
                        &batch,
                        "dense model with each weight replaced by its low-rank product",
                    )?);
                }
                state.graph = next.graph;
            }
        }
        record.parameters_after = parameters(&state.weights);
        Ok(record)
    }
}
