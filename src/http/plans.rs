//! `POST /v1/plans`: what a spec will do, from the model's header alone.

use axum::extract::State;
use axum::{Extension, Json};
use serde::Serialize;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::extract::{JsonBody, Query};
use super::{AppState, TensorWindow};
use crate::compress::plan::{prepare_from_files, Plan, PlanFiles};
use crate::compress::spec::SpecError;
use crate::domain::spec::{parse_job_spec, JobSpec};
use crate::storage::catalog::ModelKind;

/// The file of the dataset `id`, if given; an unknown id is a 422 at `pointer`.
async fn dataset_file(
    state: &AppState,
    who: &Principal,
    id: Option<&str>,
    pointer: &str,
) -> ApiResult<Option<std::path::PathBuf>> {
    let Some(id) = id else { return Ok(None) };
    let Some(d) = super::models::visible(state, who, ModelKind::Dataset, id).await? else {
        return Err(ApiError::spec(vec![SpecError::new(
            pointer,
            "unknown_dataset",
            format!("no dataset with id `{id}`"),
        )]));
    };
    Ok(Some(state.blobs.local_path(&d.sha256).await.map_err(ApiError::io)?))
}

/// Parses a job spec body, checks its model and dataset exist (for `who`), and plans it.
pub async fn spec_and_plan(state: &AppState, who: &Principal, body: &serde_json::Value) -> ApiResult<(JobSpec, Plan)> {
    let spec = parse_job_spec(body).map_err(ApiError::spec)?;
    let model = super::models::visible(state, who, ModelKind::Model, &spec.model_id).await?.ok_or_else(|| {
        ApiError::spec(vec![SpecError::new(
            "/model_id",
            "unknown_model",
            format!("no model with id `{}`", spec.model_id),
        )])
    })?;
    let dataset_path = dataset_file(state, who, spec.dataset_id.as_deref(), "/dataset_id").await?;
    let eval_path = dataset_file(state, who, spec.eval_dataset_id.as_deref(), "/evaluate/dataset_id").await?;
    // With `student_model_id` the job compresses (trains) the student; its model is the teacher.
    let (model, teacher) = match spec.compress.student_model_id() {
        None => (model, None),
        Some((i, id)) => {
            let Some(student) = super::models::visible(state, who, ModelKind::Model, id).await? else {
                return Err(ApiError::spec(vec![SpecError::new(
                    format!("/steps/{i}/student_model_id"),
                    "unknown_model",
                    format!("no model with id `{id}`"),
                )]));
            };
            let Some(graph) =
                super::graphs::stored_graph(&model).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?
            else {
                return Err(ApiError::spec(vec![SpecError::new(
                    "/model_id",
                    "plan_refused",
                    "the teacher (`model_id`) runs during distillation, which needs its architecture graph: attach one with PUT /v1/models/{id}/graph",
                )]));
            };
            if student.graph.is_none() {
                return Err(ApiError::spec(vec![SpecError::new(
                    format!("/steps/{i}/student_model_id"),
                    "plan_refused",
                    format!("the student `{id}` has no architecture graph, which training needs: attach one with PUT /v1/models/{id}/graph"),
                )]));
            }
            let path = state.blobs.local_path(&model.sha256).await.map_err(ApiError::io)?;
            (student, Some((graph, path)))
        }
    };
    let graph = super::graphs::stored_graph(&model).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    let path = state.blobs.local_path(&model.sha256).await.map_err(ApiError::io)?;
    let files = crate::storage::model_files(state.catalog.as_ref(), state.blobs.as_ref(), &model.id)
        .await
        .map_err(ApiError::io)?;
    let limit = state.settings.storage.max_header_bytes;
    let compress = spec.compress.clone();
    let memory_limit = state.settings.queue.job_memory_limit();
    let plan = tokio::task::spawn_blocking(move || {
        let teacher_path = teacher.as_ref().map(|(_, path)| path.clone());
        let f = PlanFiles {
            model: &path,
            graph,
            dataset: dataset_path.as_deref(),
            eval_dataset: eval_path.as_deref(),
            teacher: teacher.map(|(graph, _)| graph).zip(teacher_path.as_deref()),
            files: Some(&files),
        };
        prepare_from_files(compress, f, limit, memory_limit)
    })
    .await
    .map_err(|e| ApiError::internal(anyhow::anyhow!("the plan task stopped: {e}")))?
    .map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?;
    Ok((spec, plan))
}

/// Like [`spec_and_plan`], but a plan with refusals is a 422 carrying the plan's words.
pub async fn checked_plan(state: &AppState, who: &Principal, body: &serde_json::Value) -> ApiResult<(JobSpec, Plan)> {
    let (spec, plan) = spec_and_plan(state, who, body).await?;
    if !plan.refusals.is_empty() {
        let errors =
            plan.refusals.iter().map(|r| SpecError::new(r.pointer.clone(), "plan_refused", r.detail.clone())).collect();
        return Err(ApiError::spec(errors));
    }
    Ok((spec, plan))
}

/// A plan as answered: its tensors limited to the window asked for.
#[derive(Serialize)]
pub struct PlanView {
    #[serde(flatten)]
    plan: Plan,
    /// Pass as `tensors_offset` for the next window of `tensors`; absent at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    tensors_next_offset: Option<usize>,
}

/// Plan a job without running it: per tensor the scheme it will get or why not, predicted
/// sizes, bits per weight and peak memory. `refusals` lists what `POST /v1/jobs` would refuse.
/// `tensors` lists at most 10,000 tensors (`?tensors_offset=&tensors_limit=`); `totals` and
/// `refusals` always cover them all.
#[utoipa::path(post, path = "/v1/plans", tag = "plans", params(TensorWindow), request_body(content = Object, description = "A job spec"),
    responses((status = 200, body = Object), (status = 422, body = super::error::Problem)))]
pub async fn create_plan(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(window): Query<TensorWindow>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<PlanView>> {
    window.range(0)?; // a bad window is refused before the planning work
    let (_, mut plan) = spec_and_plan(&state, &who, &body).await?;
    let (range, tensors_next_offset) = window.range(plan.tensors.len())?;
    plan.tensors.truncate(range.end);
    plan.tensors.drain(..range.start);
    Ok(Json(PlanView { plan, tensors_next_offset }))
}
