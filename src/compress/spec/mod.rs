//! The compression spec: what a job (or the CLI) asks the engine to do, parsed from JSON into
//! validated types. Every error carries the JSON pointer of the offending field.

use serde::Deserialize;
use serde_json::Value;

use super::ops::{parse_step, Step};
use crate::graph::eval::EvalOptions;

/// A validated compression spec: steps in order, output formats, and whether to evaluate the
/// model before and after on a dataset (needs a graph).
#[derive(Debug, Clone)]
pub struct CompressSpec {
    pub steps: Vec<Step>,
    pub outputs: Vec<OutputFormat>,
    pub evaluate: Option<EvalOptions>,
    /// Largest file of a sharded safetensors output (`max_shard_size`), in bytes of tensor data.
    pub max_shard_bytes: u64,
    /// How much the report measures (`report`).
    pub report: ReportDetail,
}

/// `report`: `"full"` (the default) measures every changed tensor's error against the original
/// (MSE, SQNR, ...); `"summary"` leaves the error figures out and skips their computation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportDetail {
    #[default]
    Full,
    Summary,
}

/// Parses `report`.
pub fn parse_report(value: &Value) -> Result<ReportDetail, SpecError> {
    serde_json::from_value(value.clone()).map_err(|_| {
        SpecError::new("/report", "invalid_field", format!("report must be \"full\" or \"summary\", got {value}"))
    })
}

impl CompressSpec {
    /// The first `distill` step naming another uploaded model as its student: (step index,
    /// model id). The job's model is then the teacher.
    pub fn student_model_id(&self) -> Option<(usize, &str)> {
        self.steps.iter().enumerate().find_map(|(i, s)| match s {
            Step::Distill(d) => d.student_model_id.as_deref().map(|id| (i, id)),
            _ => None,
        })
    }
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

/// An `invalid_field` error at `{at}/{name}`.
pub(crate) fn field(at: &str, name: &str, detail: impl Into<String>) -> SpecError {
    SpecError::new(format!("{at}/{name}"), "invalid_field", detail)
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
    // No steps is a format conversion (a folder to a llama.cpp GGUF, as convert_hf_to_gguf.py
    // does), which only makes sense with the outputs named.
    if raw.steps.is_empty() && raw.outputs.is_none() {
        errors.push(SpecError::new(
            "/steps",
            "invalid_field",
            "at least one step is required, or name the `outputs` to convert the model to",
        ));
    }
    if raw.steps.len() > MAX_STEPS {
        return Err(vec![SpecError::new(
            "/steps",
            "invalid_field",
            format!("a spec has at most {MAX_STEPS} steps, got {}", raw.steps.len()),
        )]);
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
        Ok(CompressSpec {
            steps,
            outputs,
            evaluate: None,
            max_shard_bytes: DEFAULT_MAX_SHARD_BYTES,
            report: ReportDetail::Full,
        })
    } else {
        Err(errors)
    }
}

/// Parses the `evaluate` field of a spec: `true` (defaults: tensor `inputs`, `labels` when the
/// dataset has them, batches of 256), `false`, or an object overriding those.
pub fn parse_evaluate(value: &Value) -> Result<Option<EvalOptions>, SpecError> {
    let options = match value {
        Value::Bool(false) => return Ok(None),
        Value::Bool(true) => EvalOptions::default(),
        Value::Object(_) => from_value_at::<EvalOptions>(value, "/evaluate")?,
        _ => return Err(SpecError::new("/evaluate", "invalid_field", "`evaluate` must be true, false or an object")),
    };
    if options.batch_size == 0 || options.batch_size > MAX_EVAL_BATCH {
        return Err(field(
            "/evaluate",
            "batch_size",
            format!("batch_size must be between 1 and {MAX_EVAL_BATCH}, got {}", options.batch_size),
        ));
    }
    if options.limit == Some(0) {
        return Err(field("/evaluate", "limit", "limit must be at least 1"));
    }
    use crate::compress::engine::text_eval::{MAX_CONTEXT, MAX_TOKENS};
    if let Some(t) = options.tokens.filter(|&t| !(2..=MAX_TOKENS).contains(&t)) {
        return Err(field("/evaluate", "tokens", format!("tokens must be between 2 and {MAX_TOKENS}, got {t}")));
    }
    if let Some(c) = options.context.filter(|&c| !(2..=MAX_CONTEXT).contains(&c)) {
        return Err(field("/evaluate", "context", format!("context must be between 2 and {MAX_CONTEXT}, got {c}")));
    }
    Ok(Some(options))
}

pub use crate::formats::safetensors::sharded::DEFAULT_MAX_SHARD_BYTES;

/// Smallest `max_shard_size`: below it every tensor of a real model gets a file of its own.
pub const MIN_SHARD_BYTES: u64 = 1 << 10;

/// Parses `max_shard_size`: bytes as an integer, or a string with a unit as transformers'
/// `save_pretrained` takes it (`"5GB"`, `"500MB"`, `"10KB"`: powers of 1000; `"2GiB"`,
/// `"512MiB"`, `"64KiB"`: powers of 1024).
pub fn parse_shard_size(value: &Value) -> Result<u64, SpecError> {
    let bad = |detail: String| SpecError::new("/max_shard_size", "invalid_field", detail);
    let bytes = match value {
        Value::Number(n) => {
            n.as_u64().ok_or_else(|| bad(format!("max_shard_size must be a whole number of bytes, got {n}")))?
        }
        Value::String(text) => {
            let t = text.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (digits, unit) = t.split_at(split);
            // Units in any case, as transformers upper-cases them.
            let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
                "" | "B" => 1,
                "KB" => 1_000,
                "MB" => 1_000_000,
                "GB" => 1_000_000_000,
                "KIB" => 1 << 10,
                "MIB" => 1 << 20,
                "GIB" => 1 << 30,
                _ => {
                    return Err(bad(format!(
                        "max_shard_size `{text}`: expected bytes, or a number with KB, MB, GB (powers of 1000) or KiB, MiB, GiB"
                    )))
                }
            };
            let n: u64 = digits.parse().map_err(|_| bad(format!("max_shard_size `{text}` has no number")))?;
            n.checked_mul(factor).ok_or_else(|| bad(format!("max_shard_size `{text}` is too large")))?
        }
        _ => return Err(bad("max_shard_size must be bytes (an integer) or a string such as \"5GB\"".into())),
    };
    if bytes < MIN_SHARD_BYTES {
        return Err(bad(format!("max_shard_size must be at least {MIN_SHARD_BYTES} bytes, got {bytes}")));
    }
    Ok(bytes)
}

/// Most steps a spec may have: every step runs on every tensor it selects, so the count bounds
/// a job's work per tensor (real pipelines use a handful).
pub const MAX_STEPS: usize = 64;

/// Largest evaluation batch: activations of a batch are held at once.
pub const MAX_EVAL_BATCH: usize = 65_536;

/// Canonical text of a spec value (sorted keys, no whitespace) for hashing and storage.
pub fn canonical_json(value: &Value) -> String {
    // serde_json's Map is a BTreeMap unless `preserve_order` is enabled: keys come out sorted.
    serde_json::to_string(value).expect("a Value always serialises")
}

/// SHA-256 (hex) of the work a spec asks for: the canonical JSON of its `steps` and `outputs`
/// (the default `["safetensors"]` when absent), without the model or dataset ids. Written into
/// every artifact as `modelpress.spec_sha256`, so the same input file and the same steps give
/// byte-identical artifacts on any server and from the CLI.
pub fn work_sha256(steps: &Value, outputs: Option<&Value>, max_shard_bytes: u64) -> String {
    use sha2::{Digest, Sha256};
    let outputs = outputs.cloned().unwrap_or_else(|| serde_json::json!(["safetensors"]));
    let mut work = serde_json::json!({"steps": steps, "outputs": outputs});
    // Where the files are cut changes the artifacts: the size in bytes (however it was
    // written), left out at the default so the hash of every other spec stays what it was.
    if max_shard_bytes != DEFAULT_MAX_SHARD_BYTES {
        work["max_shard_size"] = max_shard_bytes.into();
    }
    hex::encode(Sha256::digest(canonical_json(&work).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::ops::{QuantMethod, Scheme};
    use crate::compress::quant::{Granularity, IntParams, ScaleSearch};
    use crate::formats::gguf::GgufType;
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
        let Step::Quantize(q) = &spec.steps[0] else { panic!() };
        let QuantMethod::Fixed(Scheme::Int(p)) = q.method else { panic!() };
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

    #[test]
    fn gguf_rules_and_mixed_parse() {
        let spec = parse_compress(
            &json!([
                {"op": "quantize", "gguf_type": "q4_k", "fallback": "f16"},
                {"op": "quantize", "rules": [{"match": "*embed*", "gguf_type": "q8_0"}, {"match": "*", "bits": 4, "granularity": "group", "group_size": 32}]},
                {"op": "quantize", "mixed": {"target_bits": 5.0, "candidates": ["q8_0", "q4_k"]}}
            ]),
            None,
        )
        .unwrap();
        let Step::Quantize(q) = &spec.steps[0] else { panic!() };
        assert!(matches!(
            q.method,
            QuantMethod::Fixed(Scheme::Ggml {
                ty: GgufType::Q4K,
                fallback: crate::compress::ops::quantize::Fallback::To(GgufType::F16)
            })
        ));
        let Step::Quantize(q) = &spec.steps[1] else { panic!() };
        assert!(matches!(&q.method, QuantMethod::Rules(r) if r.len() == 2));
        let Step::Quantize(q) = &spec.steps[2] else { panic!() };
        assert!(matches!(&q.method, QuantMethod::Auto { candidates, .. } if candidates.len() == 2));
    }

    #[test]
    fn bad_gguf_names_and_rule_fields_name_their_pointer() {
        let e = errors(json!([{"op": "quantize", "gguf_type": "q4_z"}]), None);
        assert_eq!(e[0].pointer, "/steps/0/gguf_type");
        let e = errors(json!([{"op": "quantize", "rules": [{"match": "*", "bitz": 4}]}]), None);
        assert_eq!(e[0].pointer, "/steps/0/rules/0/bitz");
        let e = errors(json!([{"op": "quantize", "bits": 8, "gguf_type": "q8_0"}]), None);
        assert_eq!(e[0].pointer, "/steps/0/gguf_type");
        let mixed = json!({"target_bits": 5.0, "candidates": ["q8_0", {"gguf_type": "q4_k", "fallback": "f16"}]});
        let e = errors(json!([{"op": "quantize", "mixed": mixed}]), None);
        assert_eq!(e[0].pointer, "/steps/0/mixed/candidates/1/fallback", "{:?}", e[0]);
    }

    #[test]
    fn bad_prune_parameters_name_their_pointer() {
        let cases = [
            (json!({"op": "prune", "method": "magnitude", "sparsity": 1.0}), "/steps/0/sparsity"),
            (json!({"op": "prune", "method": "n_m", "n": 2, "m": 0}), "/steps/0/m"),
            (json!({"op": "prune", "method": "n_m", "n": 5, "m": 4}), "/steps/0/n"),
            (json!({"op": "prune", "method": "magnitude", "scope": "planet", "sparsity": 0.5}), "/steps/0/scope"),
            (json!({"op": "prune", "method": "structured", "amount": -0.1}), "/steps/0/amount"),
            (json!({"op": "prune", "method": "magnitude", "sparsity": 0.5, "n": 2}), "/steps/0/n"),
        ];
        for (step, pointer) in cases {
            let e = errors(json!([step]), None);
            assert_eq!(e[0].pointer, pointer, "{step}: {:?}", e[0]);
        }
    }

    #[test]
    fn shard_sizes_read_as_transformers_writes_them() {
        assert_eq!(parse_shard_size(&json!("5GB")).unwrap(), 5_000_000_000);
        assert_eq!(parse_shard_size(&json!("2GiB")).unwrap(), 2 << 30);
        assert_eq!(parse_shard_size(&json!("100KB")).unwrap(), 100_000);
        assert_eq!(parse_shard_size(&json!("2gib")).unwrap(), 2 << 30);
        assert_eq!(parse_shard_size(&json!(4096)).unwrap(), 4096);
        for bad in [json!("5 parsecs"), json!("GB"), json!(-1), json!(1.5), json!(12), json!("99999999999999999999GB")]
        {
            let e = parse_shard_size(&bad).unwrap_err();
            assert_eq!(e.pointer, "/max_shard_size", "{bad}");
        }
        let steps = json!([{"op": "quantize", "bits": 8}]);
        let default = DEFAULT_MAX_SHARD_BYTES;
        assert_eq!(work_sha256(&steps, None, default), work_sha256(&steps, Some(&json!(["safetensors"])), default));
        assert_ne!(work_sha256(&steps, None, default), work_sha256(&steps, None, 1_000_000_000));
    }
}
