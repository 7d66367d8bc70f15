//! One error type for every HTTP response that is not a success: RFC 9457
//! `application/problem+json` with a stable `code`, a human `detail`, the request id, and for
//! spec errors the JSON pointers of the offending fields. 5xx bodies never carry internals; the
//! cause is logged once here with the request id.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::compress::spec::SpecError;

tokio::task_local! {
    /// The current request's id, set by the request-id middleware for the handler's task.
    pub static REQUEST_ID: String;
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub detail: String,
    pub pointer: Option<String>,
    pub errors: Vec<SpecError>,
    pub retry_after: Option<u64>,
    /// Logged, never sent.
    pub source: Option<anyhow::Error>,
}

/// The wire shape of every error.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pointer: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<Object>)]
    pub errors: Vec<SpecError>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Self {
        Self { status, code, detail: detail.into(), pointer: None, errors: Vec::new(), retry_after: None, source: None }
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no {what} with id `{id}`"))
    }

    pub fn conflict(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, detail)
    }

    pub fn bad_request(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail)
    }

    pub fn unprocessable(code: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, detail)
    }

    /// 422 for an invalid spec: the first error's words and pointer, all errors listed.
    pub fn spec(errors: Vec<SpecError>) -> Self {
        let first = errors.first().cloned().unwrap_or_else(|| SpecError::new("", "invalid_spec", "invalid spec"));
        let detail = if errors.len() > 1 {
            format!("{} (and {} more problems, listed in `errors`)", first, errors.len() - 1)
        } else {
            first.to_string()
        };
        Self { pointer: Some(first.pointer.clone()), errors, ..Self::unprocessable(first.code, detail) }
    }

    pub fn internal(source: impl Into<anyhow::Error>) -> Self {
        Self {
            source: Some(source.into()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "an internal error occurred; the request id identifies it in the server log",
            )
        }
    }

    pub fn insufficient_storage() -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "insufficient_storage",
            "the server's disk is full; nothing was stored",
        )
    }

    /// Maps I/O errors: a full disk is 507, anything else 500.
    pub fn io(e: std::io::Error) -> Self {
        if e.raw_os_error() == Some(libc::ENOSPC) {
            Self::insufficient_storage()
        } else {
            Self::internal(e)
        }
    }

    pub fn with_pointer(mut self, pointer: impl Into<String>) -> Self {
        self.pointer = Some(pointer.into());
        self
    }
}

impl From<crate::storage::error::StorageError> for ApiError {
    fn from(e: crate::storage::error::StorageError) -> Self {
        use crate::storage::error::StorageError as S;
        match e {
            S::StorageFull => ApiError::insufficient_storage(),
            S::Unavailable(_) => ApiError {
                retry_after: Some(5),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "database_unavailable",
                    "the database did not answer in time; retry shortly",
                )
            },
            // Conflicts and missing rows a handler expects are answered by the handler with
            // their own meaning; one that reaches here was not expected.
            S::Conflict(_) | S::NotFound(_) | S::Other(_) => ApiError::internal(e),
        }
    }
}

impl From<crate::storage::queue::QueueError> for ApiError {
    fn from(e: crate::storage::queue::QueueError) -> Self {
        use crate::storage::queue::QueueError as Q;
        match e {
            Q::IdempotencyConflict => ApiError::unprocessable("idempotency_key_reused", e.to_string()),
            Q::QuotaExceeded { .. } => ApiError {
                retry_after: Some(10),
                ..ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "quota_exceeded",
                    format!("{e} (queue.max_queued_per_principal); retry when some have run"),
                )
            },
            Q::Full { .. } => ApiError {
                retry_after: Some(10),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", format!("{e}; retry later"))
            },
            Q::NotFound(id) => ApiError::not_found("job", &id),
            Q::Finished { .. } => ApiError::conflict("job_finished", e.to_string()),
            Q::Db(db) => db.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = REQUEST_ID.try_with(Clone::clone).ok();
        if self.status.is_server_error() {
            match &self.source {
                Some(src) => {
                    tracing::error!(request_id = ?request_id, code = self.code, error = ?src, "request failed")
                }
                None => {
                    tracing::error!(request_id = ?request_id, code = self.code, detail = %self.detail, "request failed")
                }
            }
        }
        let body = Problem {
            kind: format!("urn:modelpress:problem:{}", self.code),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            code: self.code.to_owned(),
            request_id,
            pointer: self.pointer,
            errors: self.errors,
        };
        let mut res = (self.status, serde_json::to_vec(&body).expect("problem JSON")).into_response();
        res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"modelpress\""));
        }
        if let Some(secs) = self.retry_after {
            res.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
