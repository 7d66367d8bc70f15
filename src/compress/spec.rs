//! The compression spec: what a job (or the CLI) asks the engine to do, parsed from JSON into
//! validated types. Every error carries the JSON pointer of the offending field.

use serde::Deserialize;
use serde_json::Value;

use super::ggml::GgufType;
use super::prune::Norm;
use super::quant::{Granularity, IntParams, ScaleSearch};
use super::select::Selector;

/// A validated compression spec: steps in order, output formats.
#[derive(Debug, Clone)]
pub struct CompressSpec {
    pub steps: Vec<Step>,
    pub outputs: Vec<OutputFormat>,
}

#[derive(Debug, Clone)]
pub enum Step {
    Quantize(QuantizeStep),
    Prune(PruneStep),
}

impl Step {
    pub fn op(&self) -> &'static str {
        match self {
            Step::Quantize(_) => "quantize",
            Step::Prune(_) => "prune",
        }
    }

    pub fn selector(&self) -> &Selector {
        match self {
            Step::Quantize(q) => &q.select,
            Step::Prune(p) => &p.select,
        }
    }
}

#[derive(Debug, Clone)]
pub struct QuantizeStep {
    pub select: Selector,
    pub method: QuantMethod,
}

/// One way to store a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scheme {
    /// Integer round-to-nearest (the compressed-tensors layouts).
    Int(IntParams),
    /// A GGUF block type through candle's kernels; `fallback` decides for rows the block does
    /// not divide (None = refuse).
    Ggml { ty: GgufType, fallback: Option<GgufType> },
}

#[derive(Debug, Clone)]
pub enum QuantMethod {
    /// One scheme for every targeted tensor.
    Fixed(Scheme),
    /// First matching glob wins; unmatched targeted tensors are left alone (reported).
    Rules(Vec<(glob::Pattern, Scheme)>),
    /// Per-tensor choice among candidates minimising total error with average bits per weight
    /// (over the targeted tensors) <= `target_bits`, from errors measured on the weights.
    Auto { target_bits: f64, candidates: Vec<Scheme> },
}

#[derive(Debug, Clone)]
pub struct PruneStep {
    pub select: Selector,
    pub method: PruneMethod,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PruneMethod {
    /// Smallest magnitudes, `sparsity` of each tensor (`layer`) or of all targeted weights (`global`).
    Magnitude { global: bool, sparsity: f64 },
    /// Keep the `n` largest of every `m` consecutive weights along a row; rows whose length `m`
    /// does not divide are refused, or left alone when `skip_mismatch`.
    NM { n: usize, m: usize, skip_mismatch: bool },
    /// Zero the `amount` fraction of output units (rows/filters) with the lowest norm.
    Structured { norm: Norm, amount: f64 },
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
        Some("prune") => parse_prune(value, at).map(Step::Prune),
        Some(other) => Err(SpecError::new(
            format!("{at}/op"),
            "invalid_field",
            format!("unknown op `{other}`, expected one of `quantize`, `prune`"),
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

/// The fields that describe one scheme, shared by a step, a rule and a mixed candidate. Rules
/// embed it with `#[serde(flatten)]`, which cannot be combined with `deny_unknown_fields`, so
/// unknown keys are collected in `rest` and refused by [`parse_scheme`] with their pointer.
#[derive(Deserialize, Default)]
struct RawScheme {
    bits: Option<u8>,
    granularity: Option<RawGranularity>,
    group_size: Option<usize>,
    symmetric: Option<bool>,
    search: Option<RawSearch>,
    gguf_type: Option<String>,
    fallback: Option<String>,
    #[serde(flatten)]
    rest: serde_json::Map<String, Value>,
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
    gguf_type: Option<String>,
    fallback: Option<String>,
    rules: Option<Vec<RawRule>>,
    mixed: Option<RawMixed>,
    targets: Option<Vec<String>>,
    ignore: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawRule {
    #[serde(rename = "match")]
    pattern: String,
    #[serde(flatten)]
    scheme: RawScheme,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMixed {
    target_bits: f64,
    candidates: Vec<Value>,
}

/// Group size used when `granularity` is `group` and none is given (the common int4 choice).
pub const DEFAULT_GROUP_SIZE: usize = 128;

fn field(at: &str, name: &str, detail: impl Into<String>) -> SpecError {
    SpecError::new(format!("{at}/{name}"), "invalid_field", detail)
}

fn parse_gguf_type(name: &str, at: &str, key: &str) -> Result<GgufType, SpecError> {
    name.parse::<GgufType>().map_err(|e| field(at, key, e.to_string()))
}

/// Turns one scheme description into a [`Scheme`]; `at` points at the object holding it.
fn parse_scheme(raw: RawScheme, at: &str) -> Result<Scheme, SpecError> {
    if let Some(k) = raw.rest.keys().next() {
        return Err(field(at, k, format!("unknown field `{k}`")));
    }
    let int_fields = raw.bits.is_some() as u8
        + raw.granularity.is_some() as u8
        + raw.group_size.is_some() as u8
        + raw.symmetric.is_some() as u8
        + raw.search.is_some() as u8;
    if let Some(name) = &raw.gguf_type {
        if int_fields > 0 {
            return Err(field(
                at,
                "gguf_type",
                "give either `gguf_type` or integer fields (`bits`, `granularity`, ...), not both",
            ));
        }
        let ty = parse_gguf_type(name, at, "gguf_type")?;
        let fallback = match raw.fallback.as_deref() {
            None | Some("refuse") => None,
            Some(f) => Some(parse_gguf_type(f, at, "fallback")?),
        };
        return Ok(Scheme::Ggml { ty, fallback });
    }
    if raw.fallback.is_some() {
        return Err(field(at, "fallback", "`fallback` applies only with `gguf_type`"));
    }
    let bits = raw.bits.ok_or_else(|| {
        SpecError::new(at.to_owned(), "invalid_field", "give `bits` (2, 4 or 8), `gguf_type`, `rules` or `mixed`")
    })?;
    if ![2, 4, 8].contains(&bits) {
        return Err(field(
            at,
            "bits",
            format!("bits must be 2, 4 or 8, got {bits} (the compressed-tensors layouts emit only these)"),
        ));
    }
    let granularity = match raw.granularity.unwrap_or(RawGranularity::Channel) {
        RawGranularity::Tensor => Granularity::Tensor,
        RawGranularity::Channel => Granularity::Channel,
        RawGranularity::Group => Granularity::Group(raw.group_size.unwrap_or(DEFAULT_GROUP_SIZE)),
    };
    match (granularity, raw.group_size) {
        (Granularity::Group(0), _) => return Err(field(at, "group_size", "group_size must be at least 1")),
        (Granularity::Tensor | Granularity::Channel, Some(_)) => {
            return Err(field(at, "group_size", "group_size applies only with granularity `group`"))
        }
        _ => {}
    }
    let search = match raw.search.unwrap_or(RawSearch::None) {
        RawSearch::None => ScaleSearch::None,
        RawSearch::Mse => ScaleSearch::Mse,
    };
    Ok(Scheme::Int(IntParams { bits, granularity, symmetric: raw.symmetric.unwrap_or(true), search }))
}

fn parse_quantize(value: &Value, at: &str) -> Result<QuantizeStep, SpecError> {
    let raw: RawQuantize = from_value_at(value, at)?;
    let select = Selector::parse(raw.targets.as_deref(), raw.ignore.as_deref(), at)?;
    let scheme = RawScheme {
        bits: raw.bits,
        granularity: raw.granularity,
        group_size: raw.group_size,
        symmetric: raw.symmetric,
        search: raw.search,
        gguf_type: raw.gguf_type,
        fallback: raw.fallback,
        rest: Default::default(),
    };
    let has_scheme = scheme.bits.is_some() || scheme.gguf_type.is_some();
    let method = match (raw.rules, raw.mixed) {
        (Some(_), Some(_)) => return Err(field(at, "mixed", "give either `rules` or `mixed`, not both")),
        (Some(_), None) | (None, Some(_)) if has_scheme => {
            return Err(SpecError::new(
                at.to_owned(),
                "invalid_field",
                "`rules`/`mixed` replace `bits`/`gguf_type`: give one of them",
            ))
        }
        (Some(rules), None) => {
            if rules.is_empty() {
                return Err(field(at, "rules", "rules must not be empty"));
            }
            let mut out = Vec::with_capacity(rules.len());
            for (i, r) in rules.into_iter().enumerate() {
                let rat = format!("{at}/rules/{i}");
                let pattern = glob::Pattern::new(&r.pattern)
                    .map_err(|e| field(&rat, "match", format!("bad glob `{}`: {e}", r.pattern)))?;
                out.push((pattern, parse_scheme(r.scheme, &rat)?));
            }
            QuantMethod::Rules(out)
        }
        (None, Some(mixed)) => {
            let mat = format!("{at}/mixed");
            if !(mixed.target_bits.is_finite() && mixed.target_bits > 0.0) {
                return Err(field(
                    &mat,
                    "target_bits",
                    format!("target_bits must be a positive number, got {}", mixed.target_bits),
                ));
            }
            if mixed.candidates.len() < 2 {
                return Err(field(&mat, "candidates", "give at least two candidate schemes"));
            }
            let mut candidates = Vec::new();
            for (i, c) in mixed.candidates.iter().enumerate() {
                let cat = format!("{mat}/candidates/{i}");
                let scheme = match c {
                    Value::String(name) => {
                        Scheme::Ggml { ty: parse_gguf_type(name, &mat, &format!("candidates/{i}"))?, fallback: None }
                    }
                    other => parse_scheme(from_value_at(other, &cat)?, &cat)?,
                };
                candidates.push(scheme);
            }
            QuantMethod::Auto { target_bits: mixed.target_bits, candidates }
        }
        (None, None) => QuantMethod::Fixed(parse_scheme(scheme, at)?),
    };
    Ok(QuantizeStep { select, method })
}

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

fn parse_prune(value: &Value, at: &str) -> Result<PruneStep, SpecError> {
    let raw: RawPrune = from_value_at(value, at)?;
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
    Ok(PruneStep { select, method })
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
            QuantMethod::Fixed(Scheme::Ggml { ty: GgufType::Q4K, fallback: Some(GgufType::F16) })
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
}
