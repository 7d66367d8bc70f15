//! The `factorize` step: each selected linear weight `W [out, in]` becomes two factors of rank
//! `r` by truncated SVD (`rank`, or the smallest rank keeping `energy` of `||W||_F^2`). With a
//! graph, the layer becomes two linears `m.0` and `m.1` (PyTorch `nn.Sequential` names) and the
//! new graph is written; without one, the factors are written and named in the report.

use serde::Deserialize;
use serde_json::Value;

use super::structural::Edit;
use super::{OpKind, Scope, StepOp};
use crate::compress::plan::planner::Planner;
use crate::compress::select::Selector;
use crate::compress::spec::{field, from_value_at, SpecError};
use crate::graph::lowrank::Rank;

#[derive(Debug, Clone)]
pub struct FactorizeStep {
    pub edit: Edit,
    select: Selector,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFactorize {
    #[allow(dead_code)]
    op: String,
    rank: Option<usize>,
    energy: Option<f64>,
    targets: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
}

pub(crate) fn parse_factorize(value: &Value, at: &str) -> Result<FactorizeStep, SpecError> {
    let raw: RawFactorize = from_value_at(value, at)?;
    let select = Selector::parse(raw.targets.as_deref(), raw.ignore.as_deref(), at)?;
    let rank = match (raw.rank, raw.energy) {
        (Some(0), None) => return Err(field(at, "rank", "rank must be at least 1")),
        (Some(r), None) => Rank::Fixed(r),
        (None, Some(e)) if e > 0.0 && e <= 1.0 => Rank::Energy(e),
        (None, Some(e)) => return Err(field(at, "energy", format!("energy must be in (0, 1], got {e}"))),
        _ => return Err(field(at, "rank", "give `rank` or `energy` (not both)")),
    };
    Ok(FactorizeStep { edit: Edit::Factorize { rank, select: select.clone() }, select })
}

impl StepOp for FactorizeStep {
    fn kind(&self) -> OpKind {
        OpKind::Factorize
    }

    fn scope(&self) -> Scope {
        Scope::Model
    }

    fn selector(&self) -> &Selector {
        &self.select
    }

    fn plan_tensor(&self, _cx: &mut Planner<'_>, _step: usize, _i: usize) {}

    fn edit(&self, _has_graph: bool) -> Option<Edit> {
        Some(self.edit.clone())
    }
}
