//! The per-step, per-tensor decisions of a plan: the generic part (selection, refusals); what
//! each op decides is its [`crate::compress::ops::StepOp`] implementation.

use super::*;
use crate::compress::ops::StepOp;

/// A plan being built: ops push actions, skips and refusals here.
pub struct Planner<'a> {
    pub spec: &'a CompressSpec,
    pub tensors: Vec<TensorPlan>,
    pub refusals: Vec<Refusal>,
}

impl Planner<'_> {
    /// Refuses the spec at `pointer` because of tensor `t`.
    pub fn refuse(&mut self, pointer: String, t: &TensorInfo, detail: String) {
        self.refusals.push(Refusal {
            pointer,
            tensor: Some(t.name.clone()),
            detail: format!("tensor `{}`: {detail}", t.name),
        });
    }

    /// Plans one step over every tensor its selector picks.
    pub(super) fn step(&mut self, step: usize, op: &dyn StepOp) {
        for i in 0..self.tensors.len() {
            match op.selector().decide(&self.tensors[i].out) {
                Err(Some(reason)) => self.tensors[i].skipped.push(Skip { step, reason }),
                Err(None) => {}
                Ok(()) => op.plan_tensor(self, step, i),
            }
        }
        op.plan_finish(self, step);
    }
}
