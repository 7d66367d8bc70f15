//! API keys on every request, and `/v1/keys` for admins.
//!
//! Keys are off while no live key exists and `auth.required` is false (the embedded single-user
//! setup); then every request acts as the local admin. Otherwise a request needs
//! `Authorization: Bearer mp_...`: none, a malformed, unknown, revoked or expired key is a 401
//! (with `WWW-Authenticate: Bearer`), a key without the scope the route needs a 403. The health
//! checks and the API documentation stay open. Route scopes: `GET`/`HEAD` (`/metrics` included)
//! need `read`, other methods `write`, everything under `/v1/keys` `admin`.

use axum::extract::{Path, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::JsonBody;
use super::AppState;
use crate::storage::keys::{self, CreateError, KeyRecord, Scope};
use crate::storage::rfc3339;

/// Who a request acts for, in its extensions.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The key's principal; `local` when keys are off.
    pub name: String,
    /// The key's id; `None` when keys are off.
    pub key_id: Option<String>,
    pub scope: Scope,
}

impl Principal {
    /// Whether rows of `owner` exist for this principal: its own, or every row for an admin.
    /// Another principal's rows answer 404, as if they did not exist.
    pub fn sees(&self, owner: &str) -> bool {
        self.scope == Scope::Admin || self.name == owner
    }

    /// The owner to filter lists by: `None` (everyone's) for admins.
    pub fn owner_filter(&self) -> Option<&str> {
        (self.scope != Scope::Admin).then_some(self.name.as_str())
    }
}

/// A keyed GCRA limiter: one budget per principal.
pub type RateLimiter = governor::DefaultKeyedRateLimiter<String>;

/// `per_second` requests a second sustained, bursts of twice that; `None` for 0 (no limit).
pub fn rate_limiter(per_second: u32) -> Option<RateLimiter> {
    let rate = std::num::NonZeroU32::new(per_second)?;
    let burst = rate.saturating_mul(std::num::NonZeroU32::new(2).expect("2"));
    Some(governor::RateLimiter::keyed(governor::Quota::per_second(rate).allow_burst(burst)))
}

/// Paths anyone may read.
const OPEN: [&str; 4] = ["/healthz", "/readyz", "/docs", "/openapi.json"];

/// The scope a request needs; `None` for the open routes.
fn needed(method: &Method, path: &str) -> Option<Scope> {
    if OPEN.contains(&path) {
        return None;
    }
    if path == "/v1/keys" || path.starts_with("/v1/keys/") {
        return Some(Scope::Admin);
    }
    // A plan reads and computes, it stores nothing: `read` may ask for one.
    let reads = matches!(*method, Method::GET | Method::HEAD) || (*method == Method::POST && path == "/v1/plans");
    Some(if reads { Scope::Read } else { Scope::Write })
}

/// The host part of `host[:port]` (`[::1]:8080` -> `[::1]`).
fn host_part(authority: &str) -> &str {
    authority
        .rsplit_once(':')
        .filter(|(h, p)| !h.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        .map_or(authority, |(h, _)| h)
}

fn is_loopback(host: &str) -> bool {
    matches!(host, "localhost" | "127.0.0.1" | "[::1]")
}

/// Whether the request's `Host` (HTTP/1) or authority (HTTP/2) names this machine's loopback.
fn addressed_to_loopback(headers: &axum::http::HeaderMap) -> bool {
    headers.get(header::HOST).and_then(|v| v.to_str().ok()).is_none_or(|h| is_loopback(host_part(h)))
}

/// Whether a browser sent the request from a page that is not on this machine: a cross-site
/// `Sec-Fetch-Site`, or an `Origin` whose host is not loopback. Tools send neither. An origin
/// named in `allowed` (`server.cors_allowed_origins`, never its `*`) is trusted: the operator
/// chose that page.
fn from_a_foreign_page(headers: &axum::http::HeaderMap, allowed: &[String]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = header("origin");
    if origin.is_some_and(|o| allowed.iter().any(|a| a == o)) {
        return false;
    }
    if header("sec-fetch-site").is_some_and(|s| s == "cross-site") {
        return true;
    }
    let Some(origin) = origin else { return false };
    !is_loopback(host_part(origin.split("://").nth(1).unwrap_or(origin)))
}

fn unauthorized(detail: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

/// The middleware: resolves the key and checks its scope.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(scope) = needed(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let presented = req.headers().get(header::AUTHORIZATION).cloned();
    match principal(&state, presented, scope).await {
        // Without keys every request is the local admin: a browser page must not be able to
        // act as it (a cross-site form post, or a DNS-rebinding page whose origin is its own).
        Ok(p) if p.key_id.is_none() && !addressed_to_loopback(req.headers()) => ApiError::new(
            StatusCode::FORBIDDEN,
            "api_key_required",
            "while API keys are off this server answers only requests addressed to localhost (a DNS-rebinding page names its own host); create a key (`modelpress keys create`) to use it from elsewhere",
        )
        .into_response(),
        // Changes from any foreign page; reads when a foreign page's script asks (it sends
        // `Origin`; a link followed from elsewhere does not and cannot read the answer), which
        // matters once `server.cors_allowed_origins` lets pages read answers at all.
        Ok(p) if p.key_id.is_none()
            && (scope > Scope::Read || req.headers().contains_key(header::ORIGIN))
            && from_a_foreign_page(req.headers(), &state.settings.server.cors_allowed_origins) => {
            ApiError::new(
                StatusCode::FORBIDDEN,
                "cross_site_request",
                "while API keys are off, requests are accepted only from tools (curl, clients), pages on localhost and the origins in server.cors_allowed_origins (never `*`); create a key to use the API from elsewhere",
            )
            .into_response()
        }
        Ok(p) => {
            if let (Some(limiter), Some(_)) = (&state.rate, &p.key_id) {
                if let Err(not_until) = limiter.check_key(&p.name) {
                    let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
                    return ApiError {
                        retry_after: Some(wait.as_secs().max(1)),
                        ..ApiError::new(
                            StatusCode::TOO_MANY_REQUESTS,
                            "rate_limited",
                            format!(
                                "`{}` is over {} requests per second (auth.requests_per_second); retry after the Retry-After seconds",
                                p.name, state.settings.auth.requests_per_second
                            ),
                        )
                    }
                    .into_response();
                }
            }
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => e.into_response(),
    }
}

async fn principal(state: &AppState, presented: Option<axum::http::HeaderValue>, scope: Scope) -> ApiResult<Principal> {
    if presented.is_none() && !state.settings.auth.required && !state.keys.any().await? {
        return Ok(Principal { name: "local".into(), key_id: None, scope: Scope::Admin });
    }
    let Some(value) = presented else {
        return Err(unauthorized("this server needs an API key: send `Authorization: Bearer mp_...` (an admin creates keys with `modelpress keys create`)"));
    };
    let text = value.to_str().unwrap_or_default();
    let key = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| unauthorized("the Authorization header must be `Bearer mp_...`"))?;
    let (id, secret) = keys::parse(key.trim()).map_err(|e| match e {
        keys::KeyFormatError::BadChecksum => unauthorized("the key's checksum does not match: it was mistyped or cut"),
        keys::KeyFormatError::NotAModelPressKey => unauthorized("that is not a ModelPress key (`mp_<id>_<secret>`)"),
    })?;
    let record = state.keys.get(id).await?;
    let record = match record {
        Some(r) if keys::constant_time_eq(&r.secret_sha256, &keys::secret_hash(secret)) => r,
        _ => return Err(unauthorized("unknown key")),
    };
    if let Some(at) = record.revoked_at {
        return Err(unauthorized(format!("key `{id}` was revoked at {}", rfc3339(at))));
    }
    if let Some(at) = record.expires_at.filter(|e| *e <= crate::storage::now_ms()) {
        return Err(unauthorized(format!("key `{id}` expired at {}", rfc3339(at))));
    }
    if record.scope() < scope {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("this needs the `{}` scope; key `{id}` has `{}`", scope.as_str(), record.scopes),
        ));
    }
    if let Err(e) = state.keys.touch(&record).await {
        tracing::warn!(error = %e, key = id, "could not record the key's use");
    }
    let scope = record.scope();
    Ok(Principal { name: record.principal, key_id: Some(record.id), scope })
}

/// A key as listed (never its secret).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyView {
    pub id: String,
    pub principal: String,
    pub name: Option<String>,
    /// `read`, `write` or `admin`.
    pub scopes: String,
    pub created_at: String,
    pub expires_at: Option<String>,
    pub last_used_at: Option<String>,
    pub revoked_at: Option<String>,
}

impl From<&KeyRecord> for KeyView {
    fn from(k: &KeyRecord) -> Self {
        KeyView {
            id: k.id.clone(),
            principal: k.principal.clone(),
            name: k.name.clone(),
            scopes: k.scopes.clone(),
            created_at: rfc3339(k.created_at),
            expires_at: k.expires_at.map(rfc3339),
            last_used_at: k.last_used_at.map(rfc3339),
            revoked_at: k.revoked_at.map(rfc3339),
        }
    }
}

/// A new key: the full key appears here once and is never stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: String,
    #[serde(flatten)]
    pub view: KeyView,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    /// Who the key acts for: letters, digits, `.`, `_`, `-`, `@`; at most 128 characters.
    pub principal: String,
    pub name: Option<String>,
    /// `read`, `write` or `admin`.
    pub scopes: String,
    /// Days until the key stops working (none: it works until revoked).
    pub expires_in_days: Option<u32>,
}

/// Checks a new key's fields; errors name the field.
pub fn check_new_key(principal: &str, scopes: &str, days: Option<u32>) -> Result<(Scope, Option<i64>), ApiError> {
    let valid = |c: char| c.is_ascii_alphanumeric() || "._-@".contains(c);
    if principal == "local" {
        return Err(ApiError::unprocessable(
            "invalid_field",
            "`local` owns what was created while keys were off, which only admins may see: choose another principal",
        )
        .with_pointer("/principal"));
    }
    if principal.is_empty() || principal.len() > 128 || !principal.chars().all(valid) {
        return Err(ApiError::unprocessable(
            "invalid_field",
            "principal must be 1-128 letters, digits, `.`, `_`, `-` or `@`",
        )
        .with_pointer("/principal"));
    }
    let scope = Scope::parse(scopes).ok_or_else(|| {
        ApiError::unprocessable("invalid_field", format!("scopes must be `read`, `write` or `admin`, got `{scopes}`"))
            .with_pointer("/scopes")
    })?;
    let expires = match days {
        Some(0) => {
            return Err(ApiError::unprocessable("invalid_field", "expires_in_days must be at least 1")
                .with_pointer("/expires_in_days"))
        }
        Some(d) => Some(crate::storage::now_ms() + d as i64 * 86_400_000),
        None => None,
    };
    Ok((scope, expires))
}

/// Create a key (admin). The answer holds the full key, once.
#[utoipa::path(post, path = "/v1/keys", tag = "keys", request_body = NewKey,
    responses((status = 201, body = CreatedKey), (status = 409, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn create_key(State(state): State<AppState>, JsonBody(body): JsonBody) -> ApiResult<Response> {
    let body: NewKey = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let err = ApiError::unprocessable("invalid_field", format!("the key request: {}", e.into_inner()));
        if path == "." {
            err
        } else {
            err.with_pointer(format!("/{}", path.replace('.', "/")))
        }
    })?;
    let (scope, expires) = check_new_key(&body.principal, &body.scopes, body.expires_in_days)?;
    match state.keys.create(&body.principal, body.name.as_deref(), scope, expires).await {
        Ok((record, key)) => {
            tracing::info!(key = %record.id, principal = %record.principal, scope = scope.as_str(), "API key created");
            Ok((StatusCode::CREATED, Json(CreatedKey { key, view: KeyView::from(&record) })).into_response())
        }
        Err(CreateError::TooManyKeys(n)) => Err(ApiError::conflict(
            "too_many_keys",
            format!(
                "principal `{}` already has {n} live keys (the most for rotation): revoke one first",
                body.principal
            ),
        )),
        Err(CreateError::Database(e)) => Err(e.into()),
    }
}

/// Every key, newest first, without secrets (admin).
#[utoipa::path(get, path = "/v1/keys", tag = "keys", responses((status = 200, body = Vec<KeyView>)))]
pub async fn list_keys(State(state): State<AppState>) -> ApiResult<Json<Vec<KeyView>>> {
    Ok(Json(state.keys.list().await?.iter().map(KeyView::from).collect()))
}

/// Revoke a key (admin): it stops working at once; the row stays for the record.
#[utoipa::path(delete, path = "/v1/keys/{id}", tag = "keys",
    responses((status = 204), (status = 404, body = super::error::Problem)))]
pub async fn revoke_key(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<StatusCode> {
    if state.keys.revoke(&id).await? {
        tracing::info!(key = %id, "API key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("key", &id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pages_on_this_machine_count_as_local() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = axum::http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, axum::http::HeaderValue::from_static(v));
            }
            from_a_foreign_page(&h, &[])
        };
        assert!(!with(&[]), "curl sends no Origin");
        assert!(!with(&[("origin", "http://localhost:8080")]));
        assert!(!with(&[("origin", "http://127.0.0.1:8080"), ("sec-fetch-site", "same-origin")]));
        assert!(!with(&[("origin", "http://[::1]:8080")]));
        assert!(with(&[("origin", "https://evil.example")]));
        assert!(with(&[("origin", "http://rebind.example:8080")]), "a DNS-rebinding page keeps its own origin");
        assert!(with(&[("origin", "null")]));
        assert!(with(&[("sec-fetch-site", "cross-site")]));
        // An origin the operator listed in server.cors_allowed_origins is trusted; `*` is not.
        let mut h = axum::http::HeaderMap::new();
        h.insert("origin", axum::http::HeaderValue::from_static("https://ui.example"));
        h.insert("sec-fetch-site", axum::http::HeaderValue::from_static("cross-site"));
        assert!(!from_a_foreign_page(&h, &["https://ui.example".into()]));
        assert!(from_a_foreign_page(&h, &["*".into(), "https://other.example".into()]));
    }

    #[test]
    fn routes_need_read_write_admin_or_nothing() {
        assert_eq!(needed(&Method::GET, "/healthz"), None);
        assert_eq!(needed(&Method::GET, "/readyz"), None);
        assert_eq!(needed(&Method::GET, "/metrics"), Some(Scope::Read));
        assert_eq!(needed(&Method::GET, "/v1/models"), Some(Scope::Read));
        assert_eq!(needed(&Method::POST, "/v1/plans"), Some(Scope::Read));
        assert_eq!(needed(&Method::POST, "/v1/jobs"), Some(Scope::Write));
        assert_eq!(needed(&Method::DELETE, "/v1/models/x"), Some(Scope::Write));
        assert_eq!(needed(&Method::GET, "/v1/keys"), Some(Scope::Admin));
        assert_eq!(needed(&Method::DELETE, "/v1/keys/abc"), Some(Scope::Admin));
        assert_eq!(needed(&Method::GET, "/v1/keysmith"), Some(Scope::Read));
    }
}
