//! Job states and the records the queue stores.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// `queued -> running -> succeeded | failed | canceled`; a running job whose worker dies goes back
/// to `queued` until its attempts are used up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [JobStatus; 5] =
        [JobStatus::Queued, JobStatus::Running, JobStatus::Succeeded, JobStatus::Failed, JobStatus::Canceled];

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<JobStatus> {
        JobStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Canceled)
    }
}

/// Where a running job is: fraction in [0, 1], the current step and a human message.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub fraction: f64,
    pub step: Option<String>,
    pub message: Option<String>,
}

/// Why a job failed, as stored and shown: a stable code and a human detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobFailure {
    pub code: String,
    pub detail: String,
}

/// One row of the jobs table.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRecord {
    pub id: String,
    pub model_id: String,
    pub dataset_id: Option<String>,
    pub spec: String,
    pub spec_version: i64,
    pub spec_hash: String,
    pub idempotency_key: Option<String>,
    pub status: String,
    pub attempt: i64,
    pub max_attempts: i64,
    pub run_after: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<i64>,
    pub cancel_requested: i64,
    pub progress_fraction: f64,
    pub progress_step: Option<String>,
    pub progress_message: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub updated_at: i64,
    pub registered_model_id: Option<String>,
    /// The principal it belongs to (`local` without keys).
    pub owner: String,
}

impl JobRecord {
    pub fn status(&self) -> JobStatus {
        JobStatus::parse(&self.status).unwrap_or(JobStatus::Failed)
    }

    pub fn uuid(&self) -> Uuid {
        Uuid::parse_str(&self.id).unwrap_or_default()
    }

    pub fn failure(&self) -> Option<JobFailure> {
        self.error.as_deref().and_then(|e| serde_json::from_str(e).ok())
    }

    pub fn progress(&self) -> Progress {
        Progress {
            fraction: self.progress_fraction,
            step: self.progress_step.clone(),
            message: self.progress_message.clone(),
        }
    }
}

/// A stored event, replayed to SSE clients by `seq`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobEvent {
    pub job_id: String,
    pub seq: i64,
    pub kind: String,
    pub data: String,
    pub created_at: i64,
}
