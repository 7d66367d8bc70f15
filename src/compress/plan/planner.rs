//! The per-step, per-tensor decisions of a plan: the generic part (selection, refusals); what
//! each op decides is its [`crate::compress::ops::StepOp`] implementation.

use super::*;
use crate::compress::ops::structural::{DepthRule, Edit, Importance, ShapeModel};
use crate::compress::ops::StepOp;

/// A plan being built: ops push actions, skips and refusals here.
pub struct Planner<'a> {
    pub spec: &'a CompressSpec,
    pub tensors: Vec<TensorPlan>,
    pub refusals: Vec<Refusal>,
    /// The model's graph (when valid) and tensor shapes after the structural steps so far.
    pub shapes: ShapeModel,
    /// The first tensor-level step: structural steps after it are refused.
    pub tensor_level: Option<usize>,
    /// Whether the job has a dataset that fits the graph (ranking layers needs one).
    pub has_dataset: bool,
    /// Whether that dataset has labels (cross-entropy in a distillation needs them).
    pub has_labels: bool,
    /// A `depth: {count}` step, which decides the graph only at run time.
    pub graph_decided_at_run_time: Option<usize>,
    pub structure: Vec<StructurePlan>,
    pub dropped: Vec<DroppedTensor>,
    /// What a distillation's teacher computes: the separate teacher, or the model as given.
    pub teacher: Option<crate::graph::GraphSummary>,
}

impl<'a> Planner<'a> {
    /// A planner over `tensors` with no graph, no dataset and nothing planned yet.
    pub fn new(spec: &'a CompressSpec, tensors: Vec<TensorPlan>) -> Planner<'a> {
        Planner {
            spec,
            tensors,
            refusals: Vec::new(),
            shapes: ShapeModel { graph: None, table: Default::default() },
            tensor_level: None,
            has_dataset: false,
            has_labels: false,
            graph_decided_at_run_time: None,
            structure: Vec::new(),
            dropped: Vec::new(),
            teacher: None,
        }
    }

    /// Refuses the spec at `pointer` because of tensor `t`.
    pub fn refuse(&mut self, pointer: String, t: &TensorInfo, detail: String) {
        self.refusals.push(Refusal {
            pointer,
            tensor: Some(t.name.clone()),
            detail: format!("tensor `{}`: {detail}", t.name),
        });
    }

    /// Plans one step: a structural edit on the whole model, or each tensor its selector picks.
    pub(crate) fn step(&mut self, step: usize, op: &dyn StepOp) {
        if let Some(edit) = op.edit(self.shapes.graph.is_some()) {
            return self.structural(step, op, edit);
        }
        self.tensor_level.get_or_insert(step);
        for i in 0..self.tensors.len() {
            match op.selector().decide(&self.tensors[i].out) {
                Err(Some(reason)) => self.tensors[i].skipped.push(Skip { step, reason }),
                Err(None) => {}
                Ok(()) => op.plan_tensor(self, step, i),
            }
        }
        op.plan_finish(self, step);
    }

    fn structural(&mut self, step: usize, op: &dyn StepOp, edit: Edit) {
        let pointer = format!("/steps/{step}");
        let refuse = |detail: String| Refusal { pointer: pointer.clone(), tensor: None, detail };
        if op.needs_graph() && self.shapes.graph.is_none() {
            let detail = format!("`{}` needs the model's architecture graph: attach one with PUT /v1/models/{{id}}/graph (CLI: --graph FILE)", op.kind().name());
            return self.refusals.push(refuse(detail));
        }
        if let Some(first) = self.tensor_level {
            let detail = format!("structural steps (shrink, factorize, structured pruning with a graph) change which tensors exist, so they must come before tensor-level steps; step {first} is one");
            return self.refusals.push(refuse(detail));
        }
        if let Some(count_step) = self.graph_decided_at_run_time {
            let detail = format!("step {count_step} (`depth: {{count}}`) decides which layers go only at run time, so it must be the last structural step; put this step before it or in a job of its own (`register: true` chains jobs)");
            return self.refusals.push(refuse(detail));
        }
        if matches!(edit, Edit::Width { importance: Importance::Activation, .. }) && !self.has_dataset {
            let detail = "`importance: activation` ranks units by their activation on the job's dataset: give `dataset_id` (CLI: --dataset FILE)".to_string();
            return self.refusals.push(Refusal { pointer: format!("{pointer}/importance"), tensor: None, detail });
        }
        if let Edit::Distill { config: c, .. } = &edit {
            if !self.has_dataset {
                let detail = "`distill` trains on the job's dataset (`inputs`, optional `labels`): give `dataset_id` (CLI: --dataset FILE)".to_string();
                return self.refusals.push(refuse(detail));
            }
            if let Some(bits) = c.qat_bits {
                use crate::compress::ops::{QuantMethod, Scheme, Step};
                use crate::compress::quant::{Granularity, IntParams, ScaleSearch};
                let stores = |s: &Step| match s {
                    Step::Quantize(q) => {
                        matches!(q.method, QuantMethod::Fixed(Scheme::Int(IntParams { bits: b, granularity: Granularity::Channel, symmetric: true, search: ScaleSearch::None })) if b == bits)
                    }
                    _ => false,
                };
                if !self.spec.steps[step + 1..].iter().any(stores) {
                    let detail = format!("`qat` trains the weights for int{bits} per-channel symmetric codes: add `{{\"op\": \"quantize\", \"bits\": {bits}}}` after it to store them");
                    return self.refusals.push(Refusal { pointer: format!("{pointer}/bits"), tensor: None, detail });
                }
            }
            if c.kd_weight < 1.0 && !self.has_labels {
                let detail = format!("the dataset has no `labels`, so the cross-entropy term (weight 1 - kd_weight = {}) has nothing to learn from: set `kd_weight` to 1", 1.0 - c.kd_weight);
                return self.refusals.push(Refusal { pointer: format!("{pointer}/kd_weight"), tensor: None, detail });
            }
        }
        if matches!(edit, Edit::Depth(DepthRule::Count(_))) && !self.has_dataset {
            let detail = "`depth: {count}` ranks layers by how much the outputs change without them, on the job's dataset: give `dataset_id` (CLI: --dataset FILE)".to_string();
            return self.refusals.push(Refusal { pointer: format!("{pointer}/depth/count"), tensor: None, detail });
        }
        if matches!(edit, Edit::Depth(DepthRule::Count(_))) {
            self.graph_decided_at_run_time = Some(step);
        }
        let (next, change) = match edit.plan(&self.shapes) {
            Ok(x) => x,
            Err(e) => {
                return self.refusals.push(Refusal {
                    pointer: format!("{pointer}{}", e.field),
                    tensor: None,
                    detail: e.detail,
                })
            }
        };
        if let (Edit::Distill { config, .. }, Some(teacher), Some(graph)) = (&edit, &self.teacher, &next.graph) {
            let checked = graph.validate(&next.table).map_err(|e| crate::compress::ops::structural::EditError {
                field: String::new(),
                detail: format!("the student's graph does not fit it: {}", e[0]),
            });
            if let Err(e) = checked.and_then(|student| {
                crate::compress::ops::structural::feature_layers(config, teacher, &student).map(drop)
            }) {
                return self.refusals.push(Refusal {
                    pointer: format!("{pointer}{}", e.field),
                    tensor: None,
                    detail: e.detail,
                });
            }
        }
        let action = |scheme: String, note: Option<String>| PlannedAction {
            step,
            op: op.kind(),
            scheme,
            note,
            kernel: Kernel::Rewritten { step },
        };
        for (name, shape, from) in &change.added {
            let Some(src) = self.tensors.iter().find(|t| &t.out.name == from) else { continue };
            let mut tp = src.clone();
            let dtype = src.out.dtype;
            tp.name = name.clone();
            tp.out = TensorInfo { name: name.clone(), dtype, shape: shape.clone(), start: 0, end: 0 };
            tp.actions = vec![action(format!("{} of `{from}`", op.kind().name()), None)];
            // A new tensor: its source's bytes are counted once, under the source (dropped).
            tp.bytes_in = 0;
            tp.skipped.clear();
            self.tensors.push(tp);
        }
        for (name, why) in &change.dropped {
            if let Some(i) = self.tensors.iter().position(|t| &t.out.name == name) {
                let tp = self.tensors.remove(i);
                self.dropped.push(DroppedTensor { name: tp.out.name, step, reason: why.clone() });
            }
        }
        for tp in self.tensors.iter_mut() {
            if let Some(shape) = change.reshaped.get(&tp.out.name) {
                let label = format!("{} {:?} -> {shape:?}", op.kind().name(), tp.out.shape);
                tp.out.shape = shape.clone();
                tp.actions.push(action(label, None));
            } else if change.maybe_dropped.contains(&tp.out.name) {
                tp.actions.push(action(format!("{}: kept or dropped at run time", op.kind().name()), None));
            }
        }
        for tp in self.tensors.iter_mut().filter(|t| t.actions.iter().any(|a| a.step == step)) {
            tp.out.end = (tp.out.numel() * tp.out.dtype.size()) as u64;
            tp.out.start = 0;
            tp.shape_out = tp.out.shape.clone();
            tp.bytes_out = tp.out.end;
        }
        let parameters_after = next.table.values().map(|(_, s)| s.iter().product::<usize>() as u64).sum();
        self.structure.push(StructurePlan { step, op: op.kind(), notes: change.notes, parameters_after });
        self.shapes = next;
    }
}
