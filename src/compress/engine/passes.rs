//! Passes before the main one, for steps that must see every tensor before changing any (global
//! magnitude pruning, automatic mixed precision: [`crate::compress::ops::StepOp::prepass`]). Each
//! pass reads the tensors one at a time, so memory stays bounded.

use super::kernels::{apply, Buffers, Hooks, Resolved};
use super::rewrite::Source;
use super::{EngineError, Tracker};
use crate::compress::plan::{Kernel, Plan};
use crate::compress::report::MixedDecision;

/// What an op's prepass can use: the plan, a reader, reused buffers, the decisions so far.
pub struct PassCx<'a, 't> {
    pub plan: &'a Plan,
    source: &'a mut Source,
    /// `b.work` holds the tensor after [`PassCx::load_before`].
    pub b: &'a mut Buffers,
    pub resolved: &'a mut Resolved,
    tracker: &'a mut Tracker<'t>,
}

impl<'t> PassCx<'_, 't> {
    /// The job's control: `|| control.canceled()` is the stop of kernels run in a pass.
    pub fn control(&self) -> &'t dyn super::Control {
        self.tracker.ctl
    }

    /// Indices (into `plan.tensors`) of the tensors with an action matching `want`.
    pub fn members(&self, want: impl Fn(&Kernel) -> bool) -> Vec<usize> {
        (0..self.plan.tensors.len()).filter(|&i| self.plan.tensors[i].actions.iter().any(|a| want(&a.kernel))).collect()
    }

    /// Reads tensor `i` into `b.work` with the actions of steps before `step` applied.
    pub fn load_before(&mut self, i: usize, step: usize) -> Result<(), EngineError> {
        let tp = &self.plan.tensors[i];
        self.source.read(self.plan, tp, &mut self.b.work, false)?;
        let ctl = self.tracker.ctl;
        let hooks = Hooks { between_steps: &|_, _| ctl.canceled(), canceled: &|| ctl.canceled() };
        apply(&tp.out, &tp.actions, Some(step), self.b, self.resolved, None, hooks)?;
        Ok(())
    }

    /// Reports progress; the cancellation point of a pass.
    pub fn progress(&mut self, message: &str) -> Result<(), EngineError> {
        self.tracker.check(message)
    }

    /// Counts tensor `i` as read once more.
    pub fn done(&mut self, i: usize) {
        self.tracker.done(self.plan.tensors[i].bytes_in);
    }
}

/// Runs every step's prepass in step order.
pub fn resolve<'a, 't>(
    plan: &'a Plan,
    source: &'a mut Source,
    b: &'a mut Buffers,
    tracker: &'a mut Tracker<'t>,
) -> Result<(Resolved, Vec<MixedDecision>), EngineError> {
    let mut resolved = Resolved::default();
    let mut decisions = Vec::new();
    let mut cx = PassCx { plan, source, b, resolved: &mut resolved, tracker };
    for (s, step) in plan.spec.steps.iter().enumerate() {
        decisions.extend(step.op().prepass(&mut cx, s)?);
    }
    Ok((resolved, decisions))
}
