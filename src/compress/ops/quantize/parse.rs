//! The `quantize` step: integer, GGUF, rules and automatic mixed precision.

use serde::Deserialize;
use serde_json::Value;

use super::{Fallback, GgufMix, QuantMethod, QuantizeStep, Scheme};
use crate::compress::quant::{Granularity, IntParams, ScaleSearch};
use crate::compress::select::Selector;
use crate::compress::spec::{field, from_value_at, SpecError};
use crate::formats::gguf::GgufType;

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

/// The step object. It restates `RawScheme`'s fields instead of flattening it: a flattened
/// struct is buffered, which loses both `deny_unknown_fields` and the exact pointer of a bad
/// field (`/steps/0/granularity`), the errors users see most.
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
    gguf_mix: Option<String>,
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
            None | Some("llama.cpp") => Fallback::LlamaCpp,
            Some("refuse") => Fallback::Refuse,
            Some(f) => Fallback::To(parse_gguf_type(f, at, "fallback")?),
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

pub(crate) fn parse_quantize(value: &Value, at: &str) -> Result<QuantizeStep, SpecError> {
    let raw: RawQuantize = from_value_at(value, at)?;
    if let Some(name) = &raw.gguf_mix {
        // llama-quantize quantizes every matrix, the embeddings included.
        let all = ["*.weight".to_owned()];
        let select = Selector::parse(Some(raw.targets.as_deref().unwrap_or(&all)), raw.ignore.as_deref(), at)?;
        let others = [raw.bits.is_some(), raw.gguf_type.is_some(), raw.rules.is_some(), raw.mixed.is_some()];
        if others.iter().any(|&b| b) || raw.granularity.is_some() || raw.fallback.is_some() {
            return Err(field(at, "gguf_mix", "`gguf_mix` decides every tensor's type: give it without `bits`, `gguf_type`, `rules`, `mixed` or `fallback`"));
        }
        let mix = name.parse::<GgufMix>().map_err(|e| field(at, "gguf_mix", e))?;
        return Ok(QuantizeStep { select, method: QuantMethod::Mix(mix) });
    }
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
                    Value::String(name) => Scheme::Ggml {
                        ty: parse_gguf_type(name, &mat, &format!("candidates/{i}"))?,
                        fallback: Fallback::Refuse,
                    },
                    other => {
                        if other.get("fallback").is_some() {
                            return Err(field(
                                &cat,
                                "fallback",
                                "mixed-precision candidates have no fallback: a candidate that does not fit a tensor is not a choice for it",
                            ));
                        }
                        parse_scheme(from_value_at(other, &cat)?, &cat)?
                    }
                };
                candidates.push(scheme);
            }
            QuantMethod::Auto { target_bits: mixed.target_bits, candidates }
        }
        (None, None) => QuantMethod::Fixed(parse_scheme(scheme, at)?),
    };
    Ok(QuantizeStep { select, method })
}
