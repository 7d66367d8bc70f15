//! Operations: liveness, readiness, Prometheus metrics, the OpenAPI document and docs page.

use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

/// One Prometheus recorder per process (tests start many apps in one process).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_request_duration_seconds".into()),
                &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Suffix("_job_duration_seconds".into()),
                    &[0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0],
                )
            })
            .expect("bucket lists are non-empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program; keep serving ours.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[derive(Serialize, ToSchema)]
pub struct Health {
    pub status: &'static str,
    pub version: &'static str,
    /// This process's id (random at each start). Replicas behind one gateway tell themselves
    /// apart by it: a running job's `worker` starts with the id of the replica running it.
    pub instance: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "operations", responses((status = 200, body = Health)))]
pub async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health { status: "ok", version: env!("CARGO_PKG_VERSION"), instance: state.instance.to_string() })
}

#[derive(Serialize, ToSchema)]
pub struct Readiness {
    pub status: &'static str,
    pub database: String,
    pub storage: String,
    pub workers: String,
}

/// Readiness: the database answers, the data dir takes writes, every worker loop is alive.
#[utoipa::path(get, path = "/readyz", tag = "operations", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    // The answer says what is wrong, not where (endpoints, buckets, paths go to the log only:
    // this route needs no key).
    let database = match state.catalog.ping().await {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: the database does not answer");
            "error: the database does not answer".to_string()
        }
    };
    let storage = match state.blobs.check_writable().await {
        Ok(()) => "ok".to_string(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: the blob store does not take writes");
            format!("error: the blob store does not take writes ({})", e.kind())
        }
    };
    let alive = state.workers_alive.load(Ordering::SeqCst);
    let workers = if alive == state.workers_expected {
        "ok".to_string()
    } else {
        format!("error: {alive} of {} worker loops alive", state.workers_expected)
    };
    let ready = database == "ok" && storage == "ok" && workers == "ok";
    let body = Readiness { status: if ready { "ready" } else { "not_ready" }, database, storage, workers };
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}

/// Prometheus text format: HTTP requests by route and status, durations, jobs by status, job
/// durations, bytes uploaded and processed.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<AppState>) -> Response {
    if let Ok(counts) = state.queue.counts().await {
        for (status, n) in counts {
            metrics::gauge!("modelpress_jobs", "status" => status.as_str()).set(n as f64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render()).into_response()
}

/// The OpenAPI 3.1 document generated from the handlers.
pub async fn openapi_json(State(state): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], state.openapi.as_ref().clone()).into_response()
}

/// A self-contained API reference page: no scripts or styles from the network, so it works
/// behind an offline gateway (it reads `/openapi.json` from this server).
pub async fn docs() -> Response {
    // Its own inline script and style, and `/openapi.json` from here; never framed.
    let csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'";
    ([(header::CONTENT_SECURITY_POLICY, csp)], Html(include_str!("docs.html"))).into_response()
}
