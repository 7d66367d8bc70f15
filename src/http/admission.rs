//! What every upload is admitted with: one of `storage.max_concurrent_uploads` permits, the
//! rate floor (`storage.min_upload_bytes_per_sec`), and the bytes the owner's storage quota
//! leaves. Shared by `/v1/models`, `/v1/datasets` and draft files.

use axum::body::Body;
use axum::http::StatusCode;
use tokio::sync::OwnedSemaphorePermit;

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::{upload, AppState};

/// An admitted upload; its permit is held until this is dropped.
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    rate: upload::MinRate,
    slow: upload::TooSlow,
    /// The owner's quota and what it leaves for this upload; `None` without a quota.
    quota: Option<(u64, u64)>,
    owner: String,
    /// The most this upload may write: the caller's limit, or less when the quota leaves less.
    pub max_bytes: u64,
}

impl Admission {
    /// Takes a permit (503 `too_many_uploads` when none is free) and sets the byte budget:
    /// `limit`, or what the owner's quota leaves, counting `freed` bytes (a file this upload
    /// replaces) as free.
    pub async fn new(state: &AppState, owner: &Principal, limit: u64, freed: u64) -> ApiResult<Admission> {
        let settings = &state.settings.storage;
        let permit = state.uploads.clone().try_acquire_owned().map_err(|_| ApiError {
            retry_after: Some(5),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_uploads",
                format!(
                    "{} uploads are being received (storage.max_concurrent_uploads); retry shortly",
                    settings.max_concurrent_uploads
                ),
            )
        })?;
        let quota = match settings.max_stored_bytes_per_principal.filter(|_| owner.name != "local") {
            Some(q) => {
                let stored = state.catalog.stored_bytes(&owner.name).await?;
                Some((q, q.saturating_sub(stored.saturating_sub(freed))))
            }
            None => None,
        };
        let max_bytes = quota.map_or(limit, |(_, left)| left.min(limit));
        Ok(Admission {
            _permit: permit,
            rate: upload::MinRate {
                bytes_per_sec: settings.min_upload_bytes_per_sec,
                window: std::time::Duration::from_secs(settings.upload_rate_window_secs.max(1)),
            },
            slow: upload::TooSlow::default(),
            quota,
            owner: owner.name.clone(),
            max_bytes,
        })
    }

    /// `body`, cut off when it arrives slower than the rate floor.
    pub fn pace(&self, body: Body) -> Body {
        if self.rate.bytes_per_sec > 0 {
            upload::paced(body, self.rate, self.slow.clone())
        } else {
            body
        }
    }

    /// The answer for an upload that failed to arrive: 408 when it was cut off as too slow (whatever
    /// layer saw the stream end), 413 `storage_quota_exceeded` when it ran into the quota rather than
    /// `limit`, else `e`.
    pub fn refusal(&self, e: ApiError, limit: u64) -> ApiError {
        if self.slow.happened() {
            return upload::TooSlow::error(self.rate);
        }
        match self.quota {
            Some((q, left)) if e.code == "upload_too_large" && left < limit => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "storage_quota_exceeded",
                format!(
                    "`{}` may store {q} bytes of models, datasets, drafts and job artifacts (storage.max_stored_bytes_per_principal) and has {left} left; delete some first",
                    self.owner
                ),
            ),
            _ => e,
        }
    }
}
