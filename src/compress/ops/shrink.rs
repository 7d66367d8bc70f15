//! The `shrink` step: a narrower model (`width`: keep a ratio of each layer's units, the most
//! important by weight norm) or a shallower one (`depth`: drop named layers or blocks, or the
//! `count` whose removal changes the outputs least on the dataset). Needs the model's graph.

use serde::Deserialize;
use serde_json::Value;

use super::structural::{DepthRule, Edit, KeepRule};
use super::{OpKind, Scope, StepOp};
use crate::compress::plan::planner::Planner;
use crate::compress::select::Selector;
use crate::compress::spec::{field, from_value_at, SpecError};
use crate::graph::structure::Norm;

#[derive(Debug, Clone)]
pub struct ShrinkStep {
    pub edit: Edit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRatios {
    ratio: Option<f64>,
    ratios: Option<std::collections::BTreeMap<String, f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDepth {
    drop: Option<Vec<String>>,
    count: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawNorm {
    L1,
    L2,
}

/// How width ranks units: by weight norm (`norm`) or by activation on the dataset.
#[derive(Deserialize, Clone, Copy)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
pub(crate) enum RawImportance {
    Weights,
    Activation,
}

/// The ranking a step asks for; `norm` applies to weight ranking only.
pub(crate) fn importance(
    raw: Option<RawImportance>,
    norm: Option<Norm>,
    at: &str,
) -> Result<super::structural::Importance, SpecError> {
    use super::structural::Importance;
    match (raw.unwrap_or(RawImportance::Weights), norm) {
        (RawImportance::Weights, n) => Ok(Importance::Weights(n.unwrap_or(Norm::L2))),
        (RawImportance::Activation, None) => Ok(Importance::Activation),
        (RawImportance::Activation, Some(_)) => {
            Err(field(at, "norm", "`norm` ranks weights; it does not apply with `importance: activation`"))
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShrink {
    #[allow(dead_code)]
    op: String,
    /// `{"ratio": r}`, `{"ratios": {layer: r}}`, or the bare number `r`.
    width: Option<Value>,
    depth: Option<RawDepth>,
    norm: Option<RawNorm>,
    importance: Option<RawImportance>,
    targets: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
}

fn keep_ratio(v: f64, at: &str, name: &str) -> Result<f64, SpecError> {
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(field(at, name, format!("a ratio of units to keep must be in (0, 1], got {v}")))
    }
}

pub(crate) fn parse_shrink(value: &Value, at: &str) -> Result<ShrinkStep, SpecError> {
    let raw: RawShrink = from_value_at(value, at)?;
    let select = Selector::parse(raw.targets.as_deref(), raw.ignore.as_deref(), at)?;
    let norm_given = raw.norm.is_some() || raw.importance.is_some();
    let norm = raw.norm.map(|n| match n {
        RawNorm::L1 => Norm::L1,
        RawNorm::L2 => Norm::L2,
    });
    let ranking = importance(raw.importance, norm, at)?;
    let edit = match (raw.width, raw.depth) {
        (Some(_), Some(_)) => {
            return Err(field(at, "depth", "give `width` or `depth` in one step; use two steps for both"))
        }
        (None, None) => {
            return Err(SpecError::new(at.to_owned(), "invalid_field", "`shrink` needs `width` or `depth`"))
        }
        (Some(w), None) => {
            let wat = format!("{at}/width");
            let w: RawRatios = match w.as_f64() {
                Some(r) => RawRatios { ratio: Some(r), ratios: None },
                None => from_value_at(&w, &wat)?,
            };
            let keep = match (w.ratio, w.ratios) {
                (Some(r), None) => KeepRule::Ratio(keep_ratio(r, &wat, "ratio")?),
                (None, Some(map)) if !map.is_empty() => {
                    for (k, v) in &map {
                        keep_ratio(*v, &format!("{wat}/ratios"), k)?;
                    }
                    KeepRule::PerLayer(map)
                }
                _ => return Err(field(&wat, "ratio", "give `ratio` (every layer) or `ratios` ({layer: ratio})")),
            };
            Edit::Width { keep, importance: ranking, select }
        }
        (None, Some(d)) => {
            if norm_given {
                return Err(field(at, "norm", "`norm` and `importance` rank units: they apply to `width`"));
            }
            let dat = format!("{at}/depth");
            match (d.drop, d.count) {
                (Some(list), None) if !list.is_empty() => Edit::Depth(DepthRule::Drop(list)),
                (None, Some(n)) if n > 0 => Edit::Depth(DepthRule::Count(n)),
                _ => return Err(field(&dat, "drop", "give `drop` (layer names or pointers) or `count` (at least 1)")),
            }
        }
    };
    Ok(ShrinkStep { edit })
}

impl StepOp for ShrinkStep {
    fn kind(&self) -> OpKind {
        OpKind::Shrink
    }

    fn scope(&self) -> Scope {
        Scope::Model
    }

    fn selector(&self) -> &Selector {
        match &self.edit {
            Edit::Width { select, .. } | Edit::Factorize { select, .. } => select,
            Edit::Depth(_) | Edit::Distill { .. } => Selector::all(),
        }
    }

    fn plan_tensor(&self, _cx: &mut Planner<'_>, _step: usize, _i: usize) {}

    fn edit(&self, _has_graph: bool) -> Option<Edit> {
        Some(self.edit.clone())
    }

    fn needs_graph(&self) -> bool {
        true
    }
}
