//! The job spec as the API accepts it: the compression spec plus which model and dataset.

use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::compress::spec::{
    canonical_json, from_value_at, parse_compress, parse_evaluate, parse_report, parse_shard_size, work_sha256,
    CompressSpec, SpecError,
};

/// Version of the job spec format this server accepts and stores with every job. Raise it when a
/// field's meaning changes; [`JobSpec::from_stored`] refuses versions it does not know.
pub const SPEC_VERSION: i64 = 1;

/// A validated job spec with its canonical text and hash (idempotency and provenance).
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub model_id: String,
    pub dataset_id: Option<String>,
    /// `evaluate.dataset_id`: the evaluation runs on this dataset instead of `dataset_id`.
    pub eval_dataset_id: Option<String>,
    pub compress: CompressSpec,
    pub canonical: String,
    /// Hash of the whole request (ids included): idempotency.
    pub sha256: String,
    /// Hash of the work alone (steps and outputs): provenance in the artifacts.
    pub work_sha256: String,
    /// Register the dense output as a new model (with the output graph) when the job succeeds.
    pub register: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    model_id: uuid::Uuid,
    dataset_id: Option<uuid::Uuid>,
    steps: Value,
    outputs: Option<Value>,
    evaluate: Option<Value>,
    max_shard_size: Option<Value>,
    report: Option<Value>,
    #[serde(default)]
    register: bool,
}

/// SHA-256 (hex) of a request body's canonical JSON: the idempotency fingerprint, compared on
/// a replay without parsing the spec again.
pub fn request_sha256(body: &Value) -> String {
    hex::encode(Sha256::digest(canonical_json(body).as_bytes()))
}

/// Parses and validates a job spec; the errors name JSON pointers into `body`.
pub fn parse_job_spec(body: &Value) -> Result<JobSpec, Vec<SpecError>> {
    if !body.is_object() {
        return Err(vec![SpecError::new("", "invalid_field", "the job spec must be a JSON object")]);
    }
    let env: Envelope = from_value_at(body, "").map_err(|e| vec![e])?;
    let mut compress = parse_compress(&env.steps, env.outputs.as_ref())?;
    if let Some(m) = &env.max_shard_size {
        compress.max_shard_bytes = parse_shard_size(m).map_err(|e| vec![e])?;
    }
    if let Some(r) = &env.report {
        compress.report = parse_report(r).map_err(|e| vec![e])?;
    }
    let mut eval_dataset_id = None;
    if let Some(e) = &env.evaluate {
        let mut e = e.clone();
        if let Some(id) = e.as_object_mut().and_then(|o| o.remove("dataset_id")) {
            let id = id.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()).ok_or_else(|| {
                vec![SpecError::new(
                    "/evaluate/dataset_id",
                    "invalid_field",
                    "dataset_id must be a dataset id (a UUID from POST /v1/datasets)",
                )]
            })?;
            eval_dataset_id = Some(id.to_string());
        }
        compress.evaluate = parse_evaluate(&e).map_err(|e| vec![e])?;
    }
    if env.register && !compress.outputs.contains(&crate::compress::spec::OutputFormat::Safetensors) {
        return Err(vec![SpecError::new(
            "/register",
            "invalid_field",
            "registering makes the dense `safetensors` output a new model: add it to `outputs`",
        )]);
    }
    if compress.evaluate.is_some() && env.dataset_id.is_none() && eval_dataset_id.is_none() {
        return Err(vec![SpecError::new(
            "/dataset_id",
            "invalid_field",
            "`evaluate` needs a dataset: give `dataset_id` (upload one with POST /v1/datasets: safetensors with `inputs`, or text/plain for a language model)",
        )]);
    }
    let work_sha256 = work_sha256(&env.steps, env.outputs.as_ref(), compress.max_shard_bytes);
    let canonical = canonical_json(body);
    let sha256 = request_sha256(body);
    Ok(JobSpec {
        model_id: env.model_id.to_string(),
        dataset_id: env.dataset_id.map(|d| d.to_string()),
        eval_dataset_id,
        compress,
        canonical,
        sha256,
        work_sha256,
        register: env.register,
    })
}

impl JobSpec {
    /// The typed spec of a stored job: its canonical JSON, accepted under `version`. Errors name
    /// an unknown version or what no longer validates.
    pub fn from_stored(canonical: &str, version: i64) -> Result<JobSpec, String> {
        if version != SPEC_VERSION {
            return Err(format!(
                "the job was accepted with spec version {version}; this server runs version {SPEC_VERSION}"
            ));
        }
        let body: Value = serde_json::from_str(canonical).map_err(|e| format!("stored spec is not JSON: {e}"))?;
        parse_job_spec(&body).map_err(|errors| errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_does_not_change_the_hash() {
        let a = json!({"model_id": "0190c5e6-0000-7000-8000-000000000000", "steps": [{"op": "quantize", "bits": 8}]});
        let b: Value = serde_json::from_str(
            r#"{"steps":[{"bits":8,"op":"quantize"}],"model_id":"0190c5e6-0000-7000-8000-000000000000"}"#,
        )
        .unwrap();
        assert_eq!(parse_job_spec(&a).unwrap().sha256, parse_job_spec(&b).unwrap().sha256);
    }

    #[test]
    fn the_work_hash_ignores_the_model_and_defaults_the_outputs() {
        let a = json!({"model_id": "0190c5e6-0000-7000-8000-000000000000", "steps": [{"op": "quantize", "bits": 8}]});
        let b = json!({"model_id": "0190c5e6-0000-7000-8000-000000000001", "steps": [{"op": "quantize", "bits": 8}],
                       "outputs": ["safetensors"]});
        let (a, b) = (parse_job_spec(&a).unwrap(), parse_job_spec(&b).unwrap());
        assert_ne!(a.sha256, b.sha256);
        assert_eq!(a.work_sha256, b.work_sha256);
        assert_eq!(
            a.work_sha256,
            work_sha256(&json!([{"bits": 8, "op": "quantize"}]), None, crate::compress::spec::DEFAULT_MAX_SHARD_BYTES)
        );
    }

    #[test]
    fn a_stored_spec_reads_back_only_under_a_known_version() {
        let body =
            json!({"model_id": "0190c5e6-0000-7000-8000-000000000000", "steps": [{"op": "quantize", "bits": 8}]});
        let stored = parse_job_spec(&body).unwrap();
        let back = JobSpec::from_stored(&stored.canonical, SPEC_VERSION).unwrap();
        assert_eq!((back.sha256, back.work_sha256), (stored.sha256, stored.work_sha256));
        let e = JobSpec::from_stored(&stored.canonical, SPEC_VERSION + 1).unwrap_err();
        assert!(e.contains("spec version 2"), "{e}");
    }

    #[test]
    fn a_malformed_model_id_names_its_pointer() {
        let e = parse_job_spec(&json!({"model_id": "nope", "steps": []})).unwrap_err();
        assert_eq!(e[0].pointer, "/model_id");
    }

    #[test]
    fn unknown_top_level_fields_are_refused() {
        let e =
            parse_job_spec(&json!({"model_id": "0190c5e6-0000-7000-8000-000000000000", "steps": [], "priority": 1}))
                .unwrap_err();
        assert!(e[0].detail.contains("unknown field `priority`"), "{:?}", e);
    }
}
