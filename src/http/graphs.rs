//! `/v1/models/{id}/graph`: attach, read and remove a model's architecture graph.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Serialize;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::extract::JsonBody;
use super::AppState;
use crate::compress::spec::SpecError;
use crate::graph::{Graph, GraphSummary, TensorTable};
use crate::storage::catalog::{GraphUpdate, ModelKind, ModelRecord};

/// A graph and what it computes on its model.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct GraphView {
    #[schema(value_type = Object)]
    pub graph: Graph,
    #[schema(value_type = Object)]
    pub summary: GraphSummary,
}

/// The model's tensor table as graph validation sees it.
pub fn tensor_table(m: &ModelRecord) -> TensorTable {
    let views: Vec<super::models::TensorView> = serde_json::from_str(&m.tensors).unwrap_or_default();
    views
        .into_iter()
        .filter_map(|t| crate::formats::safetensors::Dtype::parse(&t.dtype).map(|d| (t.name, (d, t.shape))))
        .collect()
}

/// The graph stored with a model, if any. Stored graphs were validated when attached.
pub fn stored_graph(m: &ModelRecord) -> Result<Option<Graph>, String> {
    m.graph.as_deref().map(Graph::from_stored).transpose()
}

fn graph_errors(errors: Vec<crate::graph::GraphError>) -> ApiError {
    graph_errors_at("")(errors)
}

/// A 422 listing every graph problem, pointers prefixed with `prefix` (`/graph` for the graph
/// part of a multipart upload).
pub fn graph_errors_at(prefix: &'static str) -> impl Fn(Vec<crate::graph::GraphError>) -> ApiError {
    move |errors| {
        ApiError::spec(
            errors
                .into_iter()
                .map(|e| SpecError::new(format!("{prefix}{}", e.pointer), "invalid_graph", e.detail))
                .collect(),
        )
    }
}

async fn model(state: &AppState, who: &Principal, id: &str) -> ApiResult<ModelRecord> {
    super::models::get_kind(state, who, ModelKind::Model, id).await
}

fn in_use(id: &str, n: i64) -> ApiError {
    ApiError::conflict(
        "in_use",
        format!("model `{id}` is read by {n} queued or running job(s), which run with the graph they were planned with; cancel them or wait"),
    )
}

/// Attach (or replace) the model's architecture graph. It is validated against the model's
/// tensors first: a bad graph is a 422 naming the layer (`/layers/3/layers/0`) and nothing is
/// stored. The answer gives every layer's shapes, the parameters and the unused tensors.
#[utoipa::path(put, path = "/v1/models/{id}/graph", tag = "models", request_body(content = Object, description = "A graph"),
    responses((status = 200, body = GraphView), (status = 404, body = super::error::Problem),
              (status = 409, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn put_graph(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody,
) -> ApiResult<Json<GraphView>> {
    let m = model(&state, &who, &id).await?;
    let graph = Graph::parse(&body).map_err(graph_errors)?;
    let summary = graph.validate(&tensor_table(&m)).map_err(graph_errors)?;
    let text = serde_json::to_string(&graph).expect("graphs serialise");
    match state.catalog.set_graph(&m.id, Some(&text)).await? {
        GraphUpdate::Updated => {}
        GraphUpdate::InUse(n) => return Err(in_use(&m.id, n)),
        GraphUpdate::NotFound => return Err(ApiError::not_found("model", &m.id)),
    }
    tracing::info!(id = %m.id, layers = summary.layers.len(), "graph attached");
    Ok(Json(GraphView { graph, summary }))
}

/// The model's graph (with defaults filled in) and what it computes on the model.
#[utoipa::path(get, path = "/v1/models/{id}/graph", tag = "models",
    responses((status = 200, body = GraphView), (status = 404, body = super::error::Problem)))]
pub async fn get_graph(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<GraphView>> {
    let m = model(&state, &who, &id).await?;
    let graph = stored_graph(&m).map_err(|e| ApiError::internal(anyhow::anyhow!(e)))?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "no_graph",
            format!("model `{}` has no graph; attach one with PUT /v1/models/{}/graph", m.id, m.id),
        )
    })?;
    let summary = graph.validate(&tensor_table(&m)).map_err(graph_errors)?;
    Ok(Json(GraphView { graph, summary }))
}

/// Remove the model's graph (409 while queued or running jobs read the model).
#[utoipa::path(delete, path = "/v1/models/{id}/graph", tag = "models",
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
pub async fn delete_graph(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let m = model(&state, &who, &id).await?;
    match state.catalog.set_graph(&m.id, None).await? {
        GraphUpdate::Updated => Ok(StatusCode::NO_CONTENT),
        GraphUpdate::InUse(n) => Err(in_use(&m.id, n)),
        GraphUpdate::NotFound => Err(ApiError::not_found("model", &m.id)),
    }
}
