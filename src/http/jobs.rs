//! `/v1/jobs`: create, list, get, cancel, events, report and artifacts.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::extract::JsonBody;
use super::extract::Query;
use super::plans::checked_plan;
use super::{page_limit, parse_id, AppState, Page};
use crate::domain::job::{JobFailure, JobRecord, JobStatus, Progress};
use crate::storage::queue::{Enqueued, JobFilter, NewJob};
use crate::storage::rfc3339;

#[derive(Debug, Serialize, ToSchema)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub model_id: String,
    pub dataset_id: Option<String>,
    /// The spec as stored: passed through verbatim, not re-parsed on every status read.
    #[schema(value_type = Object)]
    pub spec: Box<serde_json::value::RawValue>,
    pub progress: Progress,
    pub attempt: i64,
    pub max_attempts: i64,
    pub cancel_requested: bool,
    /// While it runs: the worker holding its lease, `<instance>-<n>` (the instance is the
    /// running replica's, see `GET /healthz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub error: Option<JobFailure>,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub canceled_at: Option<String>,
    /// With `"register": true`: the model registered from the output (`GET /v1/models/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub registered_model_id: Option<String>,
    pub links: JobLinks,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct JobLinks {
    #[serde(rename = "self")]
    pub this: String,
    pub events: String,
    pub artifacts: String,
    pub report: String,
}

impl From<&JobRecord> for JobView {
    fn from(j: &JobRecord) -> JobView {
        let base = format!("/v1/jobs/{}", j.id);
        JobView {
            id: j.id.clone(),
            status: j.status(),
            model_id: j.model_id.clone(),
            dataset_id: j.dataset_id.clone(),
            spec: serde_json::value::RawValue::from_string(j.spec.clone())
                .unwrap_or_else(|_| serde_json::value::RawValue::from_string("null".into()).expect("null is JSON")),
            progress: j.progress(),
            attempt: j.attempt,
            max_attempts: j.max_attempts,
            cancel_requested: j.cancel_requested != 0,
            worker: if j.status() == JobStatus::Running { j.lease_owner.clone() } else { None },
            error: j.failure(),
            created_at: rfc3339(j.created_at),
            started_at: j.started_at.map(rfc3339),
            finished_at: j.finished_at.map(rfc3339),
            canceled_at: j.canceled_at.map(rfc3339),
            registered_model_id: j.registered_model_id.clone(),
            links: JobLinks {
                events: format!("{base}/events"),
                artifacts: format!("{base}/artifacts"),
                report: format!("{base}/report"),
                this: base,
            },
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ArtifactView {
    pub name: String,
    pub format: String,
    pub bytes: i64,
    pub sha256: String,
    pub url: String,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct JobListParams {
    /// Only jobs in this status.
    pub status: Option<String>,
    /// Only jobs of this model.
    pub model_id: Option<String>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

/// Idempotency keys longer than this are refused (they are stored and indexed).
const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Submit a job. Answers 202 with `Location`; the same `Idempotency-Key` and body answer 200
/// with the job created the first time.
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs", request_body(content = Object, description = "A job spec"),
    responses((status = 202, body = JobView), (status = 200, body = JobView, description = "Idempotent replay"),
              (status = 422, body = super::error::Problem), (status = 429, body = super::error::Problem)))]
pub async fn create_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> ApiResult<Response> {
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v
                .to_str()
                .map_err(|_| ApiError::bad_request("invalid_header", "Idempotency-Key must be visible ASCII"))?;
            if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY {
                return Err(ApiError::bad_request(
                    "invalid_header",
                    format!("Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters"),
                ));
            }
            // Keys are the principal's own: another principal's same key is another job.
            Some(format!("{}/{k}", who.name))
        }
        None => None,
    };
    // A replay answers with the job created the first time, even if its model is gone since.
    if let Some(k) = &key {
        if let Some(existing) = state.queue.find_by_idempotency_key(k).await? {
            if crate::domain::spec::request_sha256(&body) != existing.spec_hash {
                return Err(crate::storage::queue::QueueError::IdempotencyConflict.into());
            }
            let location = format!("/v1/jobs/{}", existing.id);
            return Ok((StatusCode::OK, [(header::LOCATION, location)], Json(JobView::from(&existing))).into_response());
        }
    }
    let (spec, _plan) = checked_plan(&state, &who, &body).await?;
    // A principal at its storage quota cannot start outputs it has no room for (a 4xx: its
    // own limit, which deleting frees, not a fault of the server's disk).
    if let Some(quota) = state.settings.storage.max_stored_bytes_per_principal.filter(|_| who.name != "local") {
        let stored = state.catalog.stored_bytes(&who.name).await?;
        if stored >= quota {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "storage_quota_exceeded",
                format!(
                    "`{}` stores {stored} bytes of models, datasets, drafts and job artifacts, its whole quota of {quota} (storage.max_stored_bytes_per_principal): delete models, drafts or finished jobs first",
                    who.name
                ),
            ));
        }
    }
    let outcome = state
        .queue
        .enqueue(
            NewJob {
                model_id: spec.model_id.clone(),
                dataset_id: spec.dataset_id.clone(),
                student_model_id: spec.compress.student_model_id().map(|(_, id)| id.to_owned()),
                eval_dataset_id: spec.eval_dataset_id.clone(),
                spec: spec.canonical.clone(),
                spec_version: crate::domain::spec::SPEC_VERSION,
                spec_hash: spec.sha256.clone(),
                idempotency_key: key,
                max_attempts: state.settings.queue.max_attempts,
                owner: who.name.clone(),
            },
            crate::storage::queue::QueueLimits {
                total: state.settings.queue.max_queued,
                per_owner: state.settings.queue.max_queued_per_principal,
            },
        )
        .await
        .map_err(|e| match e {
            crate::storage::queue::QueueError::NotFound(id) => ApiError::unprocessable(
                "unknown_model",
                format!("model `{id}` was deleted while the job was submitted"),
            )
            .with_pointer("/model_id"),
            other => other.into(),
        })?;
    let (status, job) = match outcome {
        Enqueued::Created(j) => (StatusCode::ACCEPTED, j),
        Enqueued::Replayed(j) => (StatusCode::OK, j),
    };
    tracing::info!(job_id = %job.id, replay = status == StatusCode::OK, "job accepted");
    Ok((status, [(header::LOCATION, format!("/v1/jobs/{}", job.id))], Json(JobView::from(&job))).into_response())
}

/// List jobs, newest first, with optional filters.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(JobListParams), responses((status = 200, body = Page<JobView>)))]
pub async fn list_jobs(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<JobListParams>,
) -> ApiResult<Json<Page<JobView>>> {
    let limit = page_limit(p.limit)?;
    let status = p
        .status
        .as_deref()
        .map(|s| {
            JobStatus::parse(s).ok_or_else(|| {
                ApiError::bad_request(
                    "invalid_query",
                    format!("status `{s}` is not one of queued, running, succeeded, failed, canceled"),
                )
                .with_pointer("/status")
            })
        })
        .transpose()?;
    let filter = JobFilter {
        status,
        model_id: p.model_id.as_deref().map(|m| parse_id(m, "model_id")).transpose()?,
        after: p.after.as_deref().map(|a| parse_id(a, "after")).transpose()?,
        limit: limit + 1,
        owner: who.owner_filter().map(str::to_owned),
    };
    let mut rows = state.queue.list(&filter).await?;
    Ok(Json(Page::from_rows(&mut rows, limit, |j| j.id.clone(), |j| JobView::from(j))))
}

/// The job `id` if `who` may see it; another principal's is a 404 like a missing one.
async fn load(state: &AppState, who: &Principal, id: &str) -> ApiResult<JobRecord> {
    let id = parse_id(id, "id")?;
    match state.queue.get(&id).await? {
        Some(j) if who.sees(&j.owner) => Ok(j),
        _ => Err(ApiError::not_found("job", &id)),
    }
}

/// A job: status, progress, attempts, timestamps and the error of a failed job.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs", responses((status = 200, body = JobView), (status = 404, body = super::error::Problem)))]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<JobView>> {
    Ok(Json(JobView::from(&load(&state, &who, &id).await?)))
}

/// Cancel a job: a queued one at once (200), a running one at its next step, tensor or batch (202).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    responses((status = 200, body = JobView), (status = 202, body = JobView), (status = 409, body = super::error::Problem)))]
pub async fn cancel_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let id = load(&state, &who, &id).await?.id;
    let job = state.queue.cancel(&id).await?;
    let status = if job.status() == JobStatus::Running { StatusCode::ACCEPTED } else { StatusCode::OK };
    Ok((status, Json(JobView::from(&job))).into_response())
}

/// How long `DELETE` waits for a running job it canceled to stop.
const DELETE_WAIT: Duration = Duration::from_secs(10);

/// Delete a job with its events, artifacts and report (their files too unless another row names
/// the same content). A queued or running job is canceled first; a running one that does not
/// stop within 10 s is a 409 to retry.
#[utoipa::path(delete, path = "/v1/jobs/{id}", tag = "jobs",
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
pub async fn delete_job(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let mut job = load(&state, &who, &id).await?;
    if !job.status().is_terminal() {
        // The row read may be up to 250 ms old: a job that finished meanwhile is deleted as is.
        job = match state.queue.cancel(&job.id).await {
            Ok(j) => j,
            Err(crate::storage::queue::QueueError::Finished { .. }) => {
                state.queue.get(&job.id).await?.ok_or_else(|| ApiError::not_found("job", &id))?
            }
            Err(e) => return Err(e.into()),
        };
        let deadline = tokio::time::Instant::now() + DELETE_WAIT;
        while !job.status().is_terminal() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            job = state.queue.get(&job.id).await?.ok_or_else(|| ApiError::not_found("job", &id))?;
        }
    }
    use crate::storage::catalog::JobDeleteOutcome;
    match crate::storage::delete_job(state.catalog.as_ref(), state.queue.as_ref(), state.blobs.as_ref(), &job.id).await? {
        JobDeleteOutcome::Deleted { orphan_blobs } => {
            tracing::info!(job_id = %job.id, blobs_removed = orphan_blobs.len(), "job deleted");
            Ok(StatusCode::NO_CONTENT)
        }
        JobDeleteOutcome::NotFound => Err(ApiError::not_found("job", &job.id)),
        JobDeleteOutcome::Active => Err(ApiError {
            retry_after: Some(5),
            ..ApiError::conflict(
                "job_running",
                format!("job `{}` was asked to stop and is still running (it stops at its next tensor or batch); retry the delete", job.id),
            )
        }),
    }
}

/// The job's stored events as Server-Sent Events; resumes after `Last-Event-ID` and ends after
/// the terminal state.
#[utoipa::path(get, path = "/v1/jobs/{id}/events", tag = "jobs", responses((status = 200, content_type = "text/event-stream")))]
pub async fn job_events(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    let job = load(&state, &who, &id).await?;
    let last: i64 = headers.get("last-event-id").and_then(|v| v.to_str().ok()?.trim().parse().ok()).unwrap_or(0);
    let key = who.key_id.clone().map(|id| (state.keys.clone(), id));
    let stream = super::events::job_event_stream(state.queue.clone(), job.id, last, key);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Artifacts of a succeeded job.
#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts", tag = "jobs", responses((status = 200, body = Vec<ArtifactView>)))]
pub async fn list_artifacts(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ArtifactView>>> {
    let job = load(&state, &who, &id).await?;
    let rows = state.catalog.artifacts(&job.id).await?;
    Ok(Json(
        rows.into_iter()
            .map(|a| ArtifactView {
                url: format!("/v1/jobs/{}/artifacts/{}", job.id, a.name),
                name: a.name,
                format: a.format,
                bytes: a.bytes,
                sha256: a.sha256,
            })
            .collect(),
    ))
}

fn content_type_of(name: &str) -> &'static str {
    if name.ends_with(".json") {
        "application/json"
    } else if name.ends_with(".html") {
        "text/html; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

async fn serve_artifact(state: &AppState, job: &JobRecord, name: &str, headers: &HeaderMap) -> ApiResult<Response> {
    let Some(a) = state.catalog.artifact(&job.id, name).await? else {
        let hint =
            if job.status() == JobStatus::Succeeded { String::new() } else { format!(" (the job is {})", job.status) };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("job `{}` has no artifact `{name}`{hint}", job.id),
        ));
    };
    let path = state.blobs.local_path(&a.sha256).await.map_err(ApiError::io)?;
    let filename = name.rsplit('/').next().unwrap_or(name);
    let mut res = super::download::serve_file(&path, &a.sha256, content_type_of(name), filename, headers).await?;
    if name.ends_with(".html") {
        // report.html: inline styles and SVG only; no script, no network, never framed.
        res.headers_mut().insert(
            header::CONTENT_SECURITY_POLICY,
            axum::http::HeaderValue::from_static(
                "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'none'; sandbox",
            ),
        );
    }
    Ok(res)
}

/// Download one artifact (supports `Range` and `If-None-Match`).
#[utoipa::path(get, path = "/v1/jobs/{id}/artifacts/{name}", tag = "jobs", responses((status = 200), (status = 206), (status = 404, body = super::error::Problem)))]
pub async fn download_artifact(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = load(&state, &who, &id).await?;
    serve_artifact(&state, &job, &name, &headers).await
}

/// The job's report (`report.json`): the per-tensor ledger and totals.
#[utoipa::path(get, path = "/v1/jobs/{id}/report", tag = "jobs", responses((status = 200, content_type = "application/json"), (status = 404, body = super::error::Problem)))]
pub async fn get_report(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let job = load(&state, &who, &id).await?;
    serve_artifact(&state, &job, "report.json", &headers).await.map(|mut r| {
        r.headers_mut().remove(header::CONTENT_DISPOSITION);
        r
    })
}
