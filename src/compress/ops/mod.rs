//! The steps a spec can ask for, each behind [`StepOp`]: how it is parsed, what it plans for each
//! tensor, what it must read before the main pass, and which kernels the engine runs for it.
//!
//! A new op is a new module here plus one variant of [`OpKind`] and [`Step`]; every match over
//! them is exhaustive, so the compiler lists what a new op must decide.

use serde::Serialize;
use serde_json::Value;

pub mod distill;
pub mod factorize;
pub mod prune;
pub mod quantize;
pub mod shrink;
pub mod structural;

use super::engine::{EngineError, PassCx};
use super::plan::planner::Planner;
use super::report::MixedDecision;
use super::select::Selector;
use super::spec::SpecError;
pub use prune::{PruneMethod, PruneStep};
pub use quantize::{QuantMethod, QuantizeStep, Scheme};

/// The kinds of step, by their `op` name in a spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    Quantize,
    Prune,
    Shrink,
    Factorize,
    Distill,
    Qat,
}

impl OpKind {
    pub const ALL: [OpKind; 6] =
        [OpKind::Quantize, OpKind::Prune, OpKind::Shrink, OpKind::Factorize, OpKind::Distill, OpKind::Qat];

    /// The `op` value of a spec step.
    pub fn name(self) -> &'static str {
        match self {
            OpKind::Quantize => "quantize",
            OpKind::Prune => "prune",
            OpKind::Shrink => "shrink",
            OpKind::Factorize => "factorize",
            OpKind::Distill => "distill",
            OpKind::Qat => "qat",
        }
    }

    fn parse(name: &str) -> Option<OpKind> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// What an op must see at once to decide what it does to one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Each tensor alone: the main streaming pass is enough.
    Tensor,
    /// Every targeted tensor first (a global threshold, a bit budget): passes of its own before
    /// the main one, one tensor in memory at a time.
    CrossTensor,
    /// The whole model at once (its graph's tensors in memory): structural edits, which run
    /// before every other pass and must precede tensor-level steps.
    Model,
}

/// One step of a spec, as the planner and the engine see it.
pub trait StepOp {
    fn kind(&self) -> OpKind;
    fn scope(&self) -> Scope;
    /// Which tensors the step touches.
    fn selector(&self) -> &Selector;
    /// Plans tensor `i` (selected by [`StepOp::selector`]): pushes its actions, skips or refusals.
    fn plan_tensor(&self, cx: &mut Planner<'_>, step: usize, i: usize);
    /// After every tensor was planned for this step: actions that depend on others (a pruned
    /// weight's bias).
    fn plan_finish(&self, _cx: &mut Planner<'_>, _step: usize) {}
    /// After every step was planned: refusals only the whole plan shows (an unreachable budget).
    fn check(&self, _cx: &mut Planner<'_>, _step: usize) {}
    /// Full reads of the step's tensors before the main pass (for progress and the plan).
    fn prepasses(&self) -> usize {
        0
    }
    /// Runs those reads and records what they decided in `cx.resolved`; a mixed-precision step
    /// returns its decision for the report.
    fn prepass(&self, _cx: &mut PassCx<'_, '_>, _step: usize) -> Result<Option<MixedDecision>, EngineError> {
        Ok(None)
    }
    /// The structural edit this step makes, on a model with a graph or without; `None` for
    /// tensor-level steps.
    fn edit(&self, _has_graph: bool) -> Option<structural::Edit> {
        None
    }
    /// Whether the step is refused on a model without a graph.
    fn needs_graph(&self) -> bool {
        false
    }
}

/// A parsed step. The enum keeps steps `Clone` and matchable; [`Step::op`] is the common face.
#[derive(Debug, Clone)]
pub enum Step {
    Quantize(QuantizeStep),
    Prune(PruneStep),
    Shrink(shrink::ShrinkStep),
    Factorize(factorize::FactorizeStep),
    Distill(distill::DistillStep),
}

impl Step {
    pub fn op(&self) -> &dyn StepOp {
        match self {
            Step::Quantize(q) => q,
            Step::Prune(p) => p,
            Step::Shrink(s) => s,
            Step::Factorize(f) => f,
            Step::Distill(d) => d,
        }
    }

    pub fn kind(&self) -> OpKind {
        self.op().kind()
    }
}

/// Parses one step object; `at` is its pointer (`/steps/3`).
pub fn parse_step(value: &Value, at: &str) -> Result<Step, SpecError> {
    let op =
        value.get("op").ok_or_else(|| SpecError::new(format!("{at}/op"), "invalid_field", "missing field `op`"))?;
    let name =
        op.as_str().ok_or_else(|| SpecError::new(format!("{at}/op"), "invalid_field", "`op` must be a string"))?;
    match OpKind::parse(name) {
        Some(OpKind::Quantize) => quantize::parse::parse_quantize(value, at).map(Step::Quantize),
        Some(OpKind::Prune) => prune::parse::parse_prune(value, at).map(Step::Prune),
        Some(OpKind::Shrink) => shrink::parse_shrink(value, at).map(Step::Shrink),
        Some(OpKind::Factorize) => factorize::parse_factorize(value, at).map(Step::Factorize),
        Some(OpKind::Distill) => distill::parse_distill(value, at).map(Step::Distill),
        Some(OpKind::Qat) => distill::parse_qat(value, at).map(Step::Distill),
        None => {
            let names: Vec<String> = OpKind::ALL.iter().map(|k| format!("`{}`", k.name())).collect();
            Err(SpecError::new(
                format!("{at}/op"),
                "invalid_field",
                format!("unknown op `{name}`, expected one of {}", names.join(", ")),
            ))
        }
    }
}
