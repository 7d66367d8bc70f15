//! The structural phase: before any other pass, the model's graph tensors are loaded into memory,
//! each structural step edits and proves them, and the plan's tensor list is brought up to date
//! with what the edits decided at run time (ranks chosen by energy, layers chosen by count).

use super::{EngineError, Tracker};
use crate::compress::ops::structural::{ModelState, StructureRecord};
use crate::compress::plan::planner::Planner;
use crate::compress::plan::{DroppedTensor, Kernel, Plan, TensorPlan};
use crate::formats::safetensors::TensorReader;
use crate::graph::eval::Dataset;
use crate::graph::forward::Weights;
use crate::graph::Graph;

/// Where the main pass and the prepasses read a tensor's values: the file, or for tensors the
/// structural steps rewrote, memory.
pub struct Source {
    pub reader: TensorReader,
    pub memory: Weights,
}

/// Whether a planned tensor's values come from the structural rewrite.
pub fn rewritten(tp: &TensorPlan) -> bool {
    tp.actions.iter().any(|a| matches!(a.kernel, Kernel::Rewritten { .. }))
}

impl Source {
    /// Reads `tp`'s values as f32 into `out`; `last` frees a rewritten tensor's memory.
    pub fn read(&mut self, plan: &Plan, tp: &TensorPlan, out: &mut Vec<f32>, last: bool) -> std::io::Result<()> {
        if rewritten(tp) {
            let (_, values) =
                if last { self.memory.remove(&tp.out.name) } else { self.memory.get(&tp.out.name).cloned() }
                    .ok_or_else(|| std::io::Error::other(format!("tensor `{}` was not rewritten", tp.out.name)))?;
            out.clear();
            out.extend_from_slice(&values);
            Ok(())
        } else {
            self.reader.read_f32(&plan.header.tensors[tp.index], out)
        }
    }
}

/// Plans the tensor-level steps again for tensors whose shape was decided at run time (a rank
/// chosen by energy): a block size or group size that fitted the predicted shape may not fit the
/// real one, and a `fallback` must apply as it would have at plan time.
fn replan_reshaped(effective: &mut Plan, original: &Plan) -> Result<(), EngineError> {
    let has_graph = original.graph_def.is_some();
    let mut refusals = Vec::new();
    for tp in effective.tensors.iter_mut() {
        let planned = original.tensors.iter().find(|p| p.out.name == tp.out.name);
        if !rewritten(tp) || planned.is_none_or(|p| p.out.shape == tp.out.shape) {
            continue;
        }
        let mut fresh = tp.clone();
        fresh.actions.retain(|a| matches!(a.kernel, Kernel::Rewritten { .. }));
        fresh.skipped.clear();
        let mut cx = Planner::new(&original.spec, vec![fresh]);
        for (i, step) in original.spec.steps.iter().enumerate() {
            if step.op().edit(has_graph).is_none() {
                cx.step(i, step.op());
            }
        }
        refusals.extend(cx.refusals);
        let fresh = cx.tensors.pop().expect("one tensor");
        *tp = TensorPlan { notes: tp.notes.clone(), ..fresh };
    }
    if refusals.is_empty() {
        Ok(())
    } else {
        Err(EngineError::Refused(refusals))
    }
}

/// The floating-point tensors of `header` named in `names`, as f32, checked finite.
fn load_float_tensors(
    header: &crate::formats::safetensors::Header,
    reader: &mut TensorReader,
    names: &std::collections::BTreeSet<String>,
) -> Result<(Weights, std::collections::BTreeMap<String, crate::formats::safetensors::Dtype>), EngineError> {
    let (mut weights, mut dtypes) = (Weights::new(), std::collections::BTreeMap::new());
    for t in header.tensors.iter().filter(|t| names.contains(&t.name) && t.dtype.is_float()) {
        let mut values = Vec::new();
        reader.read_f32(t, &mut values)?;
        if let Some(i) = crate::compress::engine::kernels::first_non_finite(&values) {
            return Err(EngineError::Tensor {
                tensor: t.name.clone(),
                code: "non_finite_weights",
                detail: format!("non-finite value {} at flat index {i}", values[i]),
            });
        }
        weights.insert(t.name.clone(), (t.shape.clone(), values));
        dtypes.insert(t.name.clone(), t.dtype);
    }
    Ok((weights, dtypes))
}

/// What the structural phase produced.
pub struct Restructured {
    /// The plan with the tensor list as executed.
    pub plan: Plan,
    pub graph: Option<Graph>,
    pub records: Vec<StructureRecord>,
    /// The graph's tensors before any edit (for the evaluation's original model).
    pub before: Option<Weights>,
}

/// Runs the structural steps of `plan`, if it has any.
pub fn restructure(
    plan: &Plan,
    source: &mut Source,
    inputs: &super::Inputs<'_>,
    data: Option<&Dataset>,
    tracker: &mut Tracker<'_>,
) -> Result<Option<Restructured>, EngineError> {
    let checkpoints = inputs.checkpoint_dir;
    let has_graph = plan.graph_def.is_some();
    let edits: Vec<_> = plan
        .spec
        .steps
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.op().edit(has_graph).map(|e| (i, s.kind().name(), e)))
        .collect();
    if edits.is_empty() {
        return Ok(None);
    }
    tracker.check("loading the model for the structural steps")?;
    // The graph's tensors, and every tensor a step rewrites (factorize without a graph).
    let mut names = plan.graph_def.as_ref().map(Graph::tensor_names).unwrap_or_default();
    for tp in plan.tensors.iter().filter(|tp| rewritten(tp)) {
        let src = &plan.header.tensors[tp.index].name;
        names.insert(src.clone());
        if let Some(m) = src.strip_suffix(".weight") {
            names.insert(format!("{m}.bias"));
        }
    }
    let mut state = ModelState {
        graph: plan.graph_def.clone(),
        weights: Weights::new(),
        dtypes: Default::default(),
        teacher: None,
    };
    (state.weights, state.dtypes) = load_float_tensors(&plan.header, &mut source.reader, &names)?;
    // One copy of the original tensors serves as the distillation's teacher and, afterwards, as
    // the evaluation's original model; a separate teacher is read from its own file.
    let distills = edits.iter().any(|(_, _, e)| matches!(e, crate::compress::ops::structural::Edit::Distill { .. }));
    let mut before = None;
    match (&plan.graph_def, &plan.teacher_model, distills) {
        (_, Some(t), _) => {
            let path = inputs.teacher_path.ok_or_else(|| EngineError::Job {
                code: "internal_error",
                detail: "the plan has a teacher but the job has no teacher file".into(),
            })?;
            let mut reader = TensorReader::open(path)?;
            let (weights, _) = load_float_tensors(&t.header, &mut reader, &t.graph.tensor_names())?;
            state.teacher = Some((t.graph.clone(), weights));
        }
        (Some(g), None, true) => state.teacher = Some((g.clone(), state.weights.clone())),
        _ if plan.evaluation.is_some() => before = Some(state.weights.clone()),
        _ => {}
    }
    let mut records = Vec::new();
    for (i, op, edit) in edits {
        tracker.check(&format!("step {i}: {op}"))?;
        let ctl = tracker.ctl;
        let fraction = (tracker.done as f64 / tracker.total.max(1) as f64).min(1.0);
        let mut tick = |message: &str| {
            ctl.progress(fraction, op, message);
            !ctl.canceled()
        };
        let record = match edit.apply(i, op, &mut state, data, checkpoints, &mut tick) {
            Ok(r) => r,
            Err(_) if ctl.canceled() => return Err(EngineError::Canceled),
            Err(detail) => {
                return Err(EngineError::Job { code: "structure_failed", detail: format!("step {i} ({op}): {detail}") })
            }
        };
        records.push(record);
    }
    let mut effective = plan.clone();
    let mut kept = Vec::with_capacity(effective.tensors.len());
    let still_read = state.graph.as_ref().map(Graph::tensor_names).unwrap_or_default();
    for mut tp in std::mem::take(&mut effective.tensors) {
        if !rewritten(&tp) {
            kept.push(tp);
            continue;
        }
        // A buffer that is not floating point (`num_batches_tracked`) is never loaded: if its
        // layer stayed, it is copied from the file as it is.
        let name = &plan.header.tensors[tp.index].name;
        if !state.weights.contains_key(&tp.out.name) && *name == tp.out.name && still_read.contains(name) {
            tp.actions.retain(|a| !matches!(a.kernel, Kernel::Rewritten { .. }));
            kept.push(tp);
            continue;
        }
        match state.weights.get(&tp.out.name) {
            Some((shape, _)) => {
                if *shape != tp.out.shape {
                    tp.notes.push(format!("shape {shape:?} decided at run time (planned {:?})", tp.out.shape));
                    tp.out.shape = shape.clone();
                    tp.shape_out = shape.clone();
                }
                tp.out.start = 0;
                tp.out.end = (tp.out.numel() * tp.out.dtype.size()) as u64;
                if tp.actions.iter().all(|a| matches!(a.kernel, Kernel::Rewritten { .. })) {
                    tp.bytes_out = tp.out.end;
                }
                kept.push(tp);
            }
            None => {
                let step = tp.actions.iter().find_map(|a| match a.kernel {
                    Kernel::Rewritten { step } => Some(step),
                    _ => None,
                });
                effective.dropped.push(DroppedTensor {
                    name: tp.out.name.clone(),
                    step: step.unwrap_or(0),
                    reason: "its layer was dropped".into(),
                });
            }
        }
    }
    effective.tensors = kept;
    replan_reshaped(&mut effective, plan)?;
    let keep: std::collections::BTreeSet<String> =
        effective.tensors.iter().filter(|tp| rewritten(tp)).map(|tp| tp.out.name.clone()).collect();
    state.weights.retain(|k, _| keep.contains(k));
    source.memory = state.weights;
    if plan.evaluation.is_some() && before.is_none() {
        before = state.teacher.take().map(|(_, w)| w);
    }
    Ok(Some(Restructured { plan: effective, graph: state.graph, records, before }))
}
