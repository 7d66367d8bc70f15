//! The `distill` step: the model as it stands after the steps before it (a shrunk or factorized
//! student) is trained to match the original model (the teacher) on the job's dataset, with the
//! temperature-scaled KD loss plus cross-entropy on the labels (see [`crate::graph::train`]).
//! Needs the graph and a dataset; the best epoch on a held-out split is kept.

use serde::Deserialize;
use serde_json::Value;

use super::structural::Edit;
use super::{OpKind, Scope, StepOp};
use crate::compress::plan::planner::Planner;
use crate::compress::select::Selector;
use crate::compress::spec::{field, from_value_at, SpecError};
use crate::graph::train::DistillConfig;

#[derive(Debug, Clone)]
pub struct DistillStep {
    pub config: DistillConfig,
    /// The dataset tensor to train on (default `inputs`, or what `evaluate` names).
    pub inputs: Option<String>,
    /// `"student": {"width": ...}` or `{"depth": {"drop": [...]}}`: the `shrink` that derives
    /// the student from the model, in this step.
    pub student: Option<Edit>,
    /// `"student_model_id"`: the student is another uploaded model (with a graph), the job's
    /// model is the teacher.
    pub student_model_id: Option<String>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawPreset {
    Classification,
    Recovery,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawSchedule {
    Constant,
    Cosine,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDistill {
    #[allow(dead_code)]
    op: String,
    preset: Option<RawPreset>,
    epochs: Option<usize>,
    batch_size: Option<usize>,
    learning_rate: Option<f64>,
    weight_decay: Option<f64>,
    betas: Option<[f64; 2]>,
    temperature: Option<f64>,
    kd_weight: Option<f64>,
    schedule: Option<RawSchedule>,
    validation_fraction: Option<f64>,
    seed: Option<u64>,
    loss: Option<RawLoss>,
    inputs: Option<String>,
    student: Option<Value>,
    student_model_id: Option<String>,
    features: Option<Vec<RawFeature>>,
    feature_weight: Option<f64>,
    /// `qat` only: the bits the weights train at.
    bits: Option<u8>,
}

#[derive(Deserialize, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum RawLoss {
    Kd,
    Mse,
    Features,
}

/// `{"teacher": "fc2", "student": "fc1"}`: layer names or pointers whose outputs are matched.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFeature {
    teacher: String,
    student: String,
}

/// Most feature pairs a step may match.
pub const MAX_FEATURE_PAIRS: usize = 16;

/// Largest number of epochs a step may ask for.
pub const MAX_EPOCHS: usize = 1000;

/// The presets a user can name instead of tuning.
/// - `classification` (the default): T = 4 and kd_weight 0.5, Hinton et al. (2015)'s setting
///   for classifiers, AdamW at 1e-3 for 10 epochs with a cosine schedule.
/// - `recovery`: after a shrink, the Minitron recipe (Muralidharan et al., 2024): logit
///   distillation alone (kd_weight 1, T = 1), AdamW at 1e-3, 20 epochs, cosine.
fn preset(p: RawPreset) -> DistillConfig {
    let base = DistillConfig::default();
    match p {
        RawPreset::Classification => base,
        RawPreset::Recovery => DistillConfig { epochs: 20, temperature: 1.0, kd_weight: 1.0, ..base },
    }
}

pub(crate) fn parse_distill(value: &Value, at: &str) -> Result<DistillStep, SpecError> {
    parse(value, at, false)
}

/// `{"op": "qat", "bits": 2, …}`: a distillation whose student runs with fake-quantized weights
/// (straight-through gradient), for a later `quantize` step at the same bits to store. A small
/// learning rate by default (1e-4), as fine-tuning a converged model needs.
pub(crate) fn parse_qat(value: &Value, at: &str) -> Result<DistillStep, SpecError> {
    parse(value, at, true)
}

fn parse(value: &Value, at: &str, qat: bool) -> Result<DistillStep, SpecError> {
    let raw: RawDistill = from_value_at(value, at)?;
    let mut c = preset(raw.preset.unwrap_or(RawPreset::Classification));
    let positive = |v: f64, name: &str| {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(field(at, name, format!("{name} must be a positive number, got {v}")))
        }
    };
    if let Some(e) = raw.epochs {
        if e == 0 || e > MAX_EPOCHS {
            return Err(field(at, "epochs", format!("epochs must be between 1 and {MAX_EPOCHS}, got {e}")));
        }
        c.epochs = e;
    }
    if let Some(b) = raw.batch_size {
        if b == 0 || b > 65_536 {
            return Err(field(at, "batch_size", format!("batch_size must be between 1 and 65536, got {b}")));
        }
        c.batch_size = b;
    }
    if let Some(v) = raw.learning_rate {
        c.learning_rate = positive(v, "learning_rate")?;
    }
    if let Some(v) = raw.weight_decay {
        if !(v.is_finite() && v >= 0.0) {
            return Err(field(at, "weight_decay", format!("weight_decay must be >= 0, got {v}")));
        }
        c.weight_decay = v;
    }
    if let Some([b1, b2]) = raw.betas {
        if !((0.0..1.0).contains(&b1) && (0.0..1.0).contains(&b2)) {
            return Err(field(at, "betas", format!("betas are two decay rates in [0, 1), got [{b1}, {b2}]")));
        }
        c.betas = (b1, b2);
    }
    if let Some(v) = raw.temperature {
        c.temperature = positive(v, "temperature")?;
    }
    if let Some(v) = raw.kd_weight {
        if !(0.0..=1.0).contains(&v) {
            return Err(field(at, "kd_weight", format!("kd_weight must be in [0, 1], got {v}")));
        }
        c.kd_weight = v;
    }
    if let Some(s) = raw.schedule {
        c.cosine = matches!(s, RawSchedule::Cosine);
    }
    if let Some(v) = raw.validation_fraction {
        if !(0.0..0.9).contains(&v) {
            return Err(field(at, "validation_fraction", format!("validation_fraction must be in [0, 0.9), got {v}")));
        }
        c.validation_fraction = v;
    }
    if let Some(s) = raw.seed {
        c.seed = s;
    }
    match (qat, raw.bits) {
        (true, Some(b)) if [2, 4, 8].contains(&b) => {
            c.qat_bits = Some(b);
            if raw.learning_rate.is_none() {
                c.learning_rate = 1e-4;
            }
        }
        (true, Some(b)) => return Err(field(at, "bits", format!("bits must be 2, 4 or 8, got {b}"))),
        (true, None) => {
            return Err(field(at, "bits", "missing field `bits` (2, 4 or 8): the bits the weights train at"))
        }
        (false, Some(_)) => return Err(field(at, "bits", "`bits` applies to `qat`, not `distill`")),
        (false, None) => {}
    }
    if let Some(list) = raw.features {
        if list.is_empty() || list.len() > MAX_FEATURE_PAIRS {
            return Err(field(
                at,
                "features",
                format!("features lists 1 to {MAX_FEATURE_PAIRS} {{\"teacher\": layer, \"student\": layer}} pairs"),
            ));
        }
        c.features = list.into_iter().map(|f| (f.teacher, f.student)).collect();
    }
    if let Some(w) = raw.feature_weight {
        if c.features.is_empty() {
            return Err(field(at, "feature_weight", "`feature_weight` weighs the `features` term: list `features`"));
        }
        c.feature_weight = positive(w, "feature_weight")?;
    }
    if let Some(RawLoss::Features) = raw.loss {
        if c.features.is_empty() {
            return Err(field(at, "loss", "`loss: features` matches the layers listed in `features`; list them"));
        }
        if raw.kd_weight.is_some() || raw.temperature.is_some() {
            return Err(field(
                at,
                "loss",
                "`loss: features` trains on the feature term alone: `kd_weight` and `temperature` do not apply",
            ));
        }
        c.features_only = true;
        // No logits term: the labels' cross-entropy does not apply either.
        c.kd_weight = 1.0;
    }
    if let Some(RawLoss::Mse) = raw.loss {
        if raw.kd_weight.is_some() || raw.temperature.is_some() {
            return Err(field(
                at,
                "loss",
                "`loss: mse` compares logits directly: `kd_weight` and `temperature` do not apply",
            ));
        }
        c.mse = true;
        c.kd_weight = 1.0;
    }
    let student = match raw.student {
        None => None,
        Some(Value::Object(mut body)) => {
            let sat = format!("{at}/student");
            if body.contains_key("op") {
                return Err(field(
                    &sat,
                    "op",
                    "`student` is the body of a `shrink` step (`width` or `depth`), without `op`",
                ));
            }
            body.insert("op".into(), Value::from("shrink"));
            let edit = super::shrink::parse_shrink(&Value::Object(body), &sat)?.edit;
            if matches!(edit, Edit::Depth(super::structural::DepthRule::Count(_))) {
                return Err(field(
                    &format!("{sat}/depth"),
                    "count",
                    "inside `student`, name the layers to drop (`drop`); `count` decides them at run time, so it goes in a `shrink` job of its own (`register: true` chains jobs)",
                ));
            }
            Some(edit)
        }
        Some(_) => {
            return Err(field(
                at,
                "student",
                "`student` is an object: {\"width\": {\"ratio\": 0.375}} or {\"depth\": {\"drop\": [\"fc2\"]}}",
            ))
        }
    };
    if qat && (student.is_some() || raw.student_model_id.is_some()) {
        let name = if student.is_some() { "student" } else { "student_model_id" };
        return Err(field(at, name, "`qat` fine-tunes the model itself; use `distill` for a different student"));
    }
    if let Some(id) = &raw.student_model_id {
        if uuid::Uuid::parse_str(id).is_err() {
            return Err(field(
                at,
                "student_model_id",
                format!("`{id}` is not a model id (a UUID from POST /v1/models)"),
            ));
        }
    }
    Ok(DistillStep { config: c, inputs: raw.inputs, student, student_model_id: raw.student_model_id })
}

impl StepOp for DistillStep {
    fn kind(&self) -> OpKind {
        if self.config.qat_bits.is_some() {
            OpKind::Qat
        } else {
            OpKind::Distill
        }
    }

    fn scope(&self) -> Scope {
        Scope::Model
    }

    fn selector(&self) -> &Selector {
        Selector::all()
    }

    fn plan_tensor(&self, _cx: &mut Planner<'_>, _step: usize, _i: usize) {}

    fn edit(&self, _has_graph: bool) -> Option<Edit> {
        Some(Edit::Distill { config: self.config.clone(), student: self.student.clone().map(Box::new) })
    }

    fn needs_graph(&self) -> bool {
        true
    }
}
