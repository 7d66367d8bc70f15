//! HTTP: routing, extraction, errors. Handlers are grouped per resource.

pub mod admission;
pub mod auth;
pub mod download;
pub mod drafts;
pub mod error;
pub mod events;
pub mod extract;
pub mod folder_upload;
pub mod graphs;
pub mod jobs;
pub mod models;
pub mod ops;
pub mod plans;
pub mod upload;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use axum::Router;
use serde::{Deserialize, Serialize};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Settings;
use crate::storage::blobs::BlobStore;
use crate::storage::catalog::Catalog;
use crate::storage::queue::JobQueue;
use error::{ApiError, ApiResult, REQUEST_ID};

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    pub settings: Arc<Settings>,
    pub queue: Arc<dyn JobQueue>,
    pub blobs: Arc<dyn BlobStore>,
    pub catalog: std::sync::Arc<dyn Catalog>,
    /// Worker loops currently alive, and how many were started (readiness).
    pub workers_alive: Arc<AtomicUsize>,
    pub workers_expected: usize,
    /// The rendered OpenAPI document, built once at start.
    pub openapi: Arc<String>,
    /// API keys.
    pub keys: crate::storage::keys::KeyStore,
    /// Requests per principal (`auth.requests_per_second`); `None` without a limit.
    pub rate: Option<Arc<auth::RateLimiter>>,
    /// One permit per upload being received (`storage.max_concurrent_uploads`).
    pub uploads: Arc<tokio::sync::Semaphore>,
    /// Model folders being uploaded file by file.
    pub drafts: crate::storage::drafts::Drafts,
    /// This process's id: its workers' ids (a job's `worker`) start with it; `GET /healthz`.
    pub instance: Arc<str>,
}

/// A page of a cursor-paginated list.
#[derive(Debug, Serialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub has_more: bool,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<String>,
}

impl<T> Page<T> {
    /// `rows` were fetched with `limit + 1` to learn whether more exist.
    pub fn from_rows<R>(rows: &mut Vec<R>, limit: u32, id: impl Fn(&R) -> String, view: impl Fn(&R) -> T) -> Page<T> {
        let has_more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        Page {
            next: if has_more { rows.last().map(&id) } else { None },
            items: rows.iter().map(view).collect(),
            has_more,
        }
    }
}

/// Most tensors one response lists: a model's table or a plan past it is read in windows
/// (`?tensors_offset=&tensors_limit=`), so a 200,000-tensor header never makes a 40 MB answer.
pub const MAX_TENSORS_PER_RESPONSE: usize = 10_000;

/// The window of a long tensor table a response carries (a model's, a plan's).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct TensorWindow {
    /// Tensors to skip (the `tensors_next_offset` of the previous answer). Default 0.
    pub tensors_offset: Option<usize>,
    /// Tensors to list, 0-10,000 (default and most: 10,000; 0 lists none).
    pub tensors_limit: Option<usize>,
}

impl TensorWindow {
    /// The indices to list out of `len`, and the offset of the next window when more remain.
    pub fn range(&self, len: usize) -> ApiResult<(std::ops::Range<usize>, Option<usize>)> {
        let limit = self.tensors_limit.unwrap_or(MAX_TENSORS_PER_RESPONSE);
        if limit > MAX_TENSORS_PER_RESPONSE {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("tensors_limit must be at most {MAX_TENSORS_PER_RESPONSE}, got {limit}"),
            )
            .with_pointer("/tensors_limit"));
        }
        let start = self.tensors_offset.unwrap_or(0).min(len);
        let end = start.saturating_add(limit).min(len);
        // A window of 0 lists nothing and points nowhere (a client following the offset must end).
        Ok((start..end, (end < len && end > start).then_some(end)))
    }
}

/// Default and maximum page sizes.
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;

pub fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    match limit.unwrap_or(DEFAULT_PAGE) {
        n @ 1..=MAX_PAGE => Ok(n),
        n => Err(ApiError::bad_request("invalid_query", format!("limit must be between 1 and {MAX_PAGE}, got {n}"))
            .with_pointer("/limit")),
    }
}

/// Ids are UUIDs; anything else is a 400 naming the parameter (and never reaches SQL).
pub fn parse_id(raw: &str, what: &str) -> ApiResult<String> {
    uuid::Uuid::parse_str(raw).map(|u| u.to_string()).map_err(|_| {
        ApiError::bad_request("invalid_id", format!("`{what}` must be a UUID, got `{raw}`"))
            .with_pointer(format!("/{what}"))
    })
}

#[derive(OpenApi)]
#[openapi(
    info(title = "ModelPress", description = "Makes neural-network models smaller: upload a safetensors model, plan and run compression jobs, download the artifacts and the per-tensor report."),
    tags((name = "models"), (name = "datasets"), (name = "jobs"), (name = "plans"), (name = "keys"), (name = "operations"))
)]
struct ApiDoc;

/// The API routes and their OpenAPI document.
fn api_router() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(models::upload_model, models::list_models))
        .routes(routes!(models::get_model, models::delete_model))
        .routes(routes!(models::download_model))
        .routes(routes!(drafts::create_draft, drafts::list_drafts))
        .routes(routes!(drafts::get_draft, drafts::delete_draft))
        .routes(routes!(drafts::put_draft_file))
        .routes(routes!(drafts::commit_draft))
        .routes(routes!(graphs::put_graph, graphs::get_graph, graphs::delete_graph))
        .routes(routes!(models::upload_dataset, models::list_datasets))
        .routes(routes!(models::get_dataset, models::delete_dataset))
        .routes(routes!(models::download_dataset))
        .routes(routes!(jobs::create_job, jobs::list_jobs))
        .routes(routes!(jobs::get_job, jobs::delete_job))
        .routes(routes!(jobs::cancel_job))
        .routes(routes!(jobs::job_events))
        .routes(routes!(jobs::list_artifacts))
        .routes(routes!(jobs::get_report))
        .routes(routes!(plans::create_plan))
        .routes(routes!(auth::create_key, auth::list_keys))
        .routes(routes!(auth::revoke_key))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::readyz))
        .routes(routes!(ops::metrics_text))
        .split_for_parts()
}

/// The rendered OpenAPI document (also used by `modelpress openapi`).
pub fn openapi_document() -> String {
    api_router().1.to_pretty_json().expect("OpenAPI JSON")
}

pub fn router(mut state: AppState) -> Router {
    let (api, doc) = api_router();
    state.openapi = Arc::new(doc.to_pretty_json().expect("OpenAPI JSON"));
    let idle = Duration::from_secs(state.settings.server.body_idle_timeout_secs);
    let cors = cors_layer(&state.settings.server.cors_allowed_origins);
    api
        // Artifact names may contain '/' (compressed-tensors/config.json): a wildcard route.
        .route("/v1/jobs/{id}/artifacts/{*name}", axum::routing::get(jobs::download_artifact))
        // `curl -T file URL` streams the file with PUT: accept it wherever POST uploads.
        .route("/v1/models", axum::routing::put(models::upload_model))
        .route("/v1/datasets", axum::routing::put(models::upload_dataset))
        .route("/openapi.json", axum::routing::get(ops::openapi_json))
        .route("/docs", axum::routing::get(ops::docs))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        .with_state(state)
        // Outside the keys: a browser's preflight carries no Authorization and is answered here.
        .layer(tower::util::option_layer(cors))
        .layer(axum::middleware::from_fn(record_metrics))
        // Browsers must not guess types (a JSON artifact rendered as HTML).
        .layer(tower_http::set_header::SetResponseHeaderLayer::overriding(
            axum::http::header::X_CONTENT_TYPE_OPTIONS,
            axum::http::HeaderValue::from_static("nosniff"),
        ))
        .layer(axum::middleware::from_fn(scope_request_id))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(idle))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| m.as_str()).to_owned();
            let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
            tracing::info_span!("request", method = %req.method(), route = %route, request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// The CORS policy for `origins` (`server.cors_allowed_origins`); `None` when it is empty: no
/// CORS headers at all, so browsers keep every cross-origin response from the page. Keys travel
/// in `Authorization`, never cookies, so credentials are not allowed.
fn cors_layer(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{header, HeaderName};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().map(|o| o.parse().expect("origins are checked when settings load")))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::HEAD, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                header::RANGE,
                header::IF_NONE_MATCH,
                HeaderName::from_static("idempotency-key"),
                HeaderName::from_static("last-event-id"),
                HeaderName::from_static("x-request-id"),
            ])
            .expose_headers([
                header::LOCATION,
                header::RETRY_AFTER,
                header::ETAG,
                header::CONTENT_DISPOSITION,
                header::CONTENT_RANGE,
                HeaderName::from_static("x-request-id"),
            ])
            .max_age(Duration::from_secs(600)),
    )
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "route_not_found",
        format!("no route for {} {}", req.method(), req.uri().path()),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Makes the request id available to error bodies built anywhere in the handler.
async fn scope_request_id(req: Request, next: Next) -> Response {
    let id =
        req.extensions().get::<RequestId>().and_then(|r| r.header_value().to_str().ok()).unwrap_or_default().to_owned();
    REQUEST_ID.scope(id, next.run(req)).await
}

/// Label values as `&'static str`, so a request allocates none: route templates and status
/// codes form small, bounded sets, each leaked once. Never pass client-chosen text here.
fn intern(value: &str) -> &'static str {
    static SEEN: std::sync::RwLock<std::collections::BTreeSet<&'static str>> =
        std::sync::RwLock::new(std::collections::BTreeSet::new());
    if let Some(v) = SEEN.read().expect("label lock").get(value) {
        return v;
    }
    let mut seen = SEEN.write().expect("label lock");
    match seen.get(value) {
        Some(v) => v,
        None => {
            let leaked: &'static str = Box::leak(value.to_owned().into_boxed_str());
            seen.insert(leaked);
            leaked
        }
    }
}

/// Requests by matched route and status, and their durations.
async fn record_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Methods come from the client: only the standard ones get a label of their own.
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    };
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched", |m| intern(m.as_str()));
    let res = next.run(req).await;
    let status = intern(res.status().as_str());
    metrics::counter!("modelpress_http_requests_total", "method" => method, "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("modelpress_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    res
}
