//! The `prune` step: magnitude (layer or global), N:M and structured.

use serde::Deserialize;
use serde_json::Value;

use super::{PruneMethod, PruneStep};
use crate::compress::prune::Norm;
use crate::compress::select::Selector;
use crate::compress::spec::{field, from_value_at, SpecError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum RawPruneMethod {
    Magnitude,
    NM,
    Structured,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawScope {
    Layer,
    Global,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawMismatch {
    Refuse,
    Skip,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawNorm {
    L1,
    L2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrune {
    #[allow(dead_code)]
    op: String,
    method: RawPruneMethod,
    scope: Option<RawScope>,
    sparsity: Option<f64>,
    n: Option<usize>,
    m: Option<usize>,
    on_mismatch: Option<RawMismatch>,
    norm: Option<RawNorm>,
    importance: Option<crate::compress::ops::shrink::RawImportance>,
    amount: Option<f64>,
    targets: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
}

fn fraction(v: Option<f64>, at: &str, name: &str) -> Result<f64, SpecError> {
    let v = v.ok_or_else(|| field(at, name, format!("missing field `{name}` (a fraction in [0, 1))")))?;
    if !(0.0..1.0).contains(&v) {
        return Err(field(at, name, format!("{name} must be in [0, 1), got {v}")));
    }
    Ok(v)
}

pub(crate) fn parse_prune(value: &Value, at: &str) -> Result<PruneStep, SpecError> {
    let raw: RawPrune = from_value_at(value, at)?;
    let norm_given = raw.norm.is_some();
    let select = Selector::parse(raw.targets.as_deref(), raw.ignore.as_deref(), at)?;
    let misplaced = |name: &str, present: bool| -> Result<(), SpecError> {
        if present {
            Err(field(at, name, format!("`{name}` does not apply to this pruning method")))
        } else {
            Ok(())
        }
    };
    let method = match raw.method {
        RawPruneMethod::Magnitude => {
            misplaced("n", raw.n.is_some())?;
            misplaced("m", raw.m.is_some())?;
            misplaced("norm", raw.norm.is_some())?;
            misplaced("amount", raw.amount.is_some())?;
            PruneMethod::Magnitude {
                global: matches!(raw.scope, Some(RawScope::Global)),
                sparsity: fraction(raw.sparsity, at, "sparsity")?,
            }
        }
        RawPruneMethod::NM => {
            misplaced("sparsity", raw.sparsity.is_some())?;
            misplaced("scope", raw.scope.is_some())?;
            let m = raw.m.unwrap_or(4);
            let n = raw.n.unwrap_or(2);
            if m == 0 {
                return Err(field(at, "m", "m must be at least 1"));
            }
            if n == 0 || n > m {
                return Err(field(at, "n", format!("n must be between 1 and m ({m}), got {n}")));
            }
            PruneMethod::NM { n, m, skip_mismatch: matches!(raw.on_mismatch, Some(RawMismatch::Skip)) }
        }
        RawPruneMethod::Structured => {
            misplaced("sparsity", raw.sparsity.is_some())?;
            misplaced("scope", raw.scope.is_some())?;
            PruneMethod::Structured {
                norm: match raw.norm.unwrap_or(RawNorm::L2) {
                    RawNorm::L1 => Norm::L1,
                    RawNorm::L2 => Norm::L2,
                },
                amount: fraction(raw.amount, at, "amount")?,
            }
        }
    };
    if raw.on_mismatch.is_some() && !matches!(method, PruneMethod::NM { .. }) {
        return Err(field(at, "on_mismatch", "`on_mismatch` applies only to method `n_m`"));
    }
    let by_activation = match raw.importance {
        None => false,
        Some(_) if !matches!(method, PruneMethod::Structured { .. }) => {
            return Err(field(at, "importance", "`importance` applies only to method `structured`"))
        }
        Some(i) => {
            let ranking = crate::compress::ops::shrink::importance(
                Some(i),
                norm_given.then_some(crate::graph::structure::Norm::L2),
                at,
            )?;
            ranking == crate::compress::ops::structural::Importance::Activation
        }
    };
    Ok(PruneStep { select, method, by_activation })
}
