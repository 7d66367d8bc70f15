//! The compression spec: what a job (or the CLI) asks the engine to do, parsed from JSON into
//! validated types. Every error carries the JSON pointer of the offending field.

use serde::Deserialize;
use serde_json::Value;

use super::quant::{Granularity, IntParams, ScaleSearch};
use super::select::Selector;

/// A validated compression spec: steps in order, output formats, options.
#[derive(Debug, Clone)]
pub struct CompressSpec {
    pub steps: Vec<Step>,
    pub outputs: Vec<OutputFormat>,
}

#[derive(Debug, Clone)]
pub enum Step {
    Quantize(QuantizeStep),
}

impl Step {
    pub fn op(&self) -> &'static str {
        match self {
            Step::Quantize(_) => "quantize",
        }
    }

    pub fn selector(&self) -> &Selector {
        match self {
            Step::Quantize(q) => &q.select,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeStep {
    pub select: Selector,
    pub method: QuantMethod,
}

#[derive(Debug, Clone)]
pub enum QuantMethod {
    Int(IntParams),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutputFormat {
    Safetensors,
    CompressedTensors,
    Gguf,
    Sparse,
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Safetensors => "safetensors",
            OutputFormat::CompressedTensors => "compressed-tensors",
            OutputFormat::Gguf => "gguf",
            OutputFormat::Sparse => "sparse",
        }
    }
}

/// One problem in a spec: where (RFC 6901 pointer), a stable code and what is wrong.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SpecError {
    pub pointer: String,
    pub code: &'static str,
    pub detail: String,
}

impl SpecError {
    pub fn new(pointer: impl Into<String>, code: &'static str, detail: impl Into<String>) -> Self {
        Self { pointer: pointer.into(), code, detail: detail.into() }
    }
}

impl std::fmt::Display for SpecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", if self.pointer.is_empty() { "/" } else { &self.pointer }, self.detail)
    }
}

/// Deserialises `value` into `T`, turning serde's error into a pointer below `base`.
pub fn from_value_at<T: serde::de::DeserializeOwned>(value: &Value, base: &str) -> Result<T, SpecError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let mut pointer = base.to_owned();
        for seg in e.path().iter() {
            use serde_path_to_error::Segment;
            match seg {
                Segment::Seq { index } => pointer.push_str(&format!("/{index}")),
                Segment::Map { key } => pointer.push_str(&format!("/{}", key.replace('~', "~0").replace('/', "~1"))),
                Segment::Enum { .. } | Segment::Unknown => {}
            }
        }
        let inner = e.into_inner().to_string();
        // serde appends " at line L column C", meaningless for a pointer-addressed error.
        let detail = inner.split(" at line ").next().unwrap_or(&inner).to_owned();
        SpecError::new(pointer, "invalid_field", detail)
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    steps: Vec<Value>,
    #[serde(default)]
    outputs: Option<Vec<OutputFormat>>,
}

/// Parses the compression part of a spec: `steps` and `outputs`. Other top-level fields are
/// the caller's (a job adds `model_id`...); `base` prefixes every pointer.
pub fn parse_compress(steps: &Value, outputs: Option<&Value>) -> Result<CompressSpec, Vec<SpecError>> {
    let mut errors = Vec::new();
    let mut raw = serde_json::Map::new();
    raw.insert("steps".into(), steps.clone());
    if let Some(o) = outputs {
        raw.insert("outputs".into(), o.clone());
    }
    let raw: RawSpec = from_value_at(&Value::Object(raw), "").map_err(|e| vec![e])?;
    if raw.steps.is_empty() {
        errors.push(SpecError::new("/steps", "invalid_field", "at least one step is required"));
    }
    let mut steps = Vec::new();
    for (i, step) in raw.steps.iter().enumerate() {
        match parse_step(step, &format!("/steps/{i}")) {
            Ok(s) => steps.push(s),
            Err(e) => errors.push(e),
        }
    }
    let outputs = raw.outputs.unwrap_or_else(|| vec![OutputFormat::Safetensors]);
    if outputs.is_empty() {
        errors.push(SpecError::new("/outputs", "invalid_field", "at least one output format is required"));
    }
    for (i, o) in outputs.iter().enumerate() {
        if outputs[..i].contains(o) {
            errors.push(SpecError::new(
                format!("/outputs/{i}"),
                "invalid_field",
                format!("output `{}` is listed twice", o.as_str()),
            ));
        }
    }
    if errors.is_empty() {
        Ok(CompressSpec { steps, outputs })
    } else {
        Err(errors)
    }
}

fn parse_step(value: &Value, at: &str) -> Result<Step, SpecError> {
    let op =
        value.get("op").ok_or_else(|| SpecError::new(format!("{at}/op"), "invalid_field", "missing field `op`"))?;
    match op.as_str() {
        Some("quantize") => parse_quantize(value, at).map(Step::Quantize),
        Some(other) => Err(SpecError::new(
            format!("{at}/op"),
            "invalid_field",
            format!("unknown op `{other}`, expected one of `quantize`"),
        )),
        None => Err(SpecError::new(format!("{at}/op"), "invalid_field", "`op` must be a string")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawGranularity {
    Tensor,
    Channel,
    Group,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum RawSearch {
    None,
    Mse,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuantize {
    #[allow(dead_code)]
    op: String,
    bits: Option<u8>,
    granularity: Option<RawGranularity>,
    group_size: Option<usize>,
    symmetric: Option<bool>,
    search: Option<RawSearch>,
    targets: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
}

/// Group size used when `granularity` is `group` and none is given (the common int4 choice).
pub const DEFAULT_GROUP_SIZE: usize = 128;

fn parse_quantize(value: &Value, at: &str) -> Result<QuantizeStep, SpecError> {
    let raw: RawQuantize = from_value_at(value, at)?;
    let select = Selector::parse(raw.targets.as_deref(), raw.ignore.as_deref(), at)?;
    let bits = raw
        .bits
        .ok_or_else(|| SpecError::new(format!("{at}/bits"), "invalid_field", "missing field `bits` (2, 4 or 8)"))?;
    if ![2, 4, 8].contains(&bits) {
        return Err(SpecError::new(
            format!("{at}/bits"),
            "invalid_field",
            format!("bits must be 2, 4 or 8, got {bits} (the compressed-tensors layouts emit only these)"),
        ));
    }
    let granularity = match raw.granularity.unwrap_or(RawGranularity::Channel) {
        RawGranularity::Tensor => Granularity::Tensor,
        RawGranularity::Channel => Granularity::Channel,
        RawGranularity::Group => Granularity::Group(raw.group_size.unwrap_or(DEFAULT_GROUP_SIZE)),
    };
    match (granularity, raw.group_size) {
        (Granularity::Group(0), _) => {
            return Err(SpecError::new(format!("{at}/group_size"), "invalid_field", "group_size must be at least 1"))
        }
        (Granularity::Tensor | Granularity::Channel, Some(_)) => {
            return Err(SpecError::new(
                format!("{at}/group_size"),
                "invalid_field",
                "group_size applies only with granularity `group`",
            ))
        }
        _ => {}
    }
    let search = match raw.search.unwrap_or(RawSearch::None) {
        RawSearch::None => ScaleSearch::None,
        RawSearch::Mse => ScaleSearch::Mse,
    };
    Ok(QuantizeStep {
        select,
        method: QuantMethod::Int(IntParams { bits, granularity, symmetric: raw.symmetric.unwrap_or(true), search }),
    })
}

/// Canonical text of a spec value (sorted keys, no whitespace) for hashing and storage.
pub fn canonical_json(value: &Value) -> String {
    // serde_json's Map is a BTreeMap unless `preserve_order` is enabled: keys come out sorted.
    serde_json::to_string(value).expect("a Value always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(steps: Value, outputs: Option<Value>) -> Vec<SpecError> {
        parse_compress(&steps, outputs.as_ref()).unwrap_err()
    }

    #[test]
    fn the_issue_example_parses_with_defaults() {
        let spec =
            parse_compress(&json!([{"op": "quantize", "bits": 8, "granularity": "channel", "symmetric": true}]), None)
                .unwrap();
        assert_eq!(spec.outputs, vec![OutputFormat::Safetensors]);
        let Step::Quantize(q) = &spec.steps[0];
        let QuantMethod::Int(p) = q.method;
        assert_eq!(
            p,
            IntParams { bits: 8, granularity: Granularity::Channel, symmetric: true, search: ScaleSearch::None }
        );
    }

    #[test]
    fn bad_bits_name_their_pointer() {
        let e = errors(json!([{"op": "quantize", "bits": 3}]), None);
        assert_eq!(e[0].pointer, "/steps/0/bits");
        assert!(e[0].detail.contains("bits must be 2, 4 or 8, got 3"));
    }

    #[test]
    fn unknown_fields_and_variants_name_their_pointer() {
        let e = errors(json!([{"op": "quantize", "bits": 8}, {"op": "quantize", "bits": 8, "bitz": 1}]), None);
        assert_eq!(e[0].pointer, "/steps/1/bitz");
        assert!(e[0].detail.contains("unknown field `bitz`"), "{}", e[0].detail);
        let e = errors(json!([{"op": "quantize", "bits": 8, "granularity": "row"}]), None);
        assert_eq!(e[0].pointer, "/steps/0/granularity");
        let e = errors(json!([{"op": "shrinkify"}]), Some(json!(["safetensors", "onnx"])));
        assert_eq!(e[0].pointer, "/outputs/1");
    }

    #[test]
    fn every_bad_step_is_reported_not_just_the_first() {
        let e = errors(json!([{"op": "nope"}, {"op": "quantize", "bits": 5}]), None);
        let pointers: Vec<_> = e.iter().map(|e| e.pointer.as_str()).collect();
        assert_eq!(pointers, ["/steps/0/op", "/steps/1/bits"]);
    }

    #[test]
    fn group_size_needs_group_granularity() {
        let e = errors(json!([{"op": "quantize", "bits": 4, "group_size": 64}]), None);
        assert_eq!(e[0].pointer, "/steps/0/group_size");
    }
}
