//! The job queue contract, implemented by [`super::sql_queue::SqlQueue`] on SQLite and on
//! PostgreSQL.

use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::domain::job::{JobEvent, JobFailure, JobRecord, JobStatus, Progress};

/// A job to enqueue; `spec` is the canonical JSON the job will run.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub model_id: String,
    pub dataset_id: Option<String>,
    /// A `distill` step's `student_model_id`: a second model the job reads.
    pub student_model_id: Option<String>,
    /// `evaluate.dataset_id`: the evaluation's own dataset.
    pub eval_dataset_id: Option<String>,
    /// The principal it belongs to.
    pub owner: String,
    pub spec: String,
    /// [`crate::domain::spec::SPEC_VERSION`] of the server that accepted it.
    pub spec_version: i64,
    pub spec_hash: String,
    pub idempotency_key: Option<String>,
    pub max_attempts: u32,
}

/// Queued jobs allowed: in all, and per principal.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    pub total: u64,
    pub per_owner: u64,
}

#[derive(Debug)]
pub enum Enqueued {
    Created(JobRecord),
    /// Same `Idempotency-Key` and same spec: the job created the first time.
    Replayed(JobRecord),
}

/// A file a finished job produced, already persisted in the blob store.
#[derive(Debug, Clone)]
pub struct NewArtifact {
    pub name: String,
    pub format: String,
    pub sha256: String,
    pub bytes: i64,
}

/// How a worker ends its attempt.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Done; the artifacts, and the model to register from them (`"register": true`), recorded
    /// in the same transaction as the job's success.
    Succeeded(Vec<NewArtifact>, Option<crate::storage::catalog::NewModel>),
    /// A permanent failure: bad weights, an impossible spec, a panic.
    Failed(JobFailure),
    /// The cancel flag was seen and the work stopped.
    Canceled,
    /// Infrastructure trouble worth another attempt (after backoff) while attempts remain.
    Retry(JobFailure),
    /// The worker is shutting down: back to the queue at once, the attempt not counted.
    Released,
}

/// What a heartbeat learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseState {
    /// False when the lease was lost (expired and taken, or the job left `running`).
    pub held: bool,
    pub cancel_requested: bool,
}

#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub model_id: Option<String>,
    /// Only this principal's jobs (`None`: everyone's).
    pub owner: Option<String>,
    /// Cursor: list jobs older than this id (ids are time-ordered UUIDv7, newest first).
    pub after: Option<String>,
    pub limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("Idempotency-Key was already used with a different request body")]
    IdempotencyConflict,
    #[error("the queue holds {queued} jobs, its limit")]
    Full { queued: u64 },
    #[error("`{owner}` has {queued} jobs queued, its limit")]
    QuotaExceeded { owner: String, queued: u64 },
    #[error("no job {0}")]
    NotFound(String),
    #[error("job {id} is {} and can no longer change", status.as_str())]
    Finished { id: String, status: JobStatus },
    #[error(transparent)]
    Db(#[from] crate::storage::error::StorageError),
}

impl From<sqlx::Error> for QueueError {
    fn from(e: sqlx::Error) -> Self {
        QueueError::Db(e.into())
    }
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    /// Enqueues `job` unless the queue holds `limits.total` queued jobs, or its owner
    /// `limits.per_owner` (the embedded `local` principal has no quota of its own).
    async fn enqueue(&self, job: NewJob, limits: QueueLimits) -> Result<Enqueued, QueueError>;
    /// The job created with this `Idempotency-Key`, if any.
    async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<JobRecord>, QueueError>;
    /// Atomically takes the oldest runnable job, leasing it to `worker`.
    async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<JobRecord>, QueueError>;
    async fn heartbeat(&self, id: &str, worker: &str, lease: Duration) -> Result<LeaseState, QueueError>;
    async fn progress(&self, id: &str, worker: &str, progress: &Progress) -> Result<(), QueueError>;
    async fn finish(&self, id: &str, worker: &str, outcome: Outcome) -> Result<JobRecord, QueueError>;
    /// Cancels a queued job at once; flags a running one for its worker to stop.
    async fn cancel(&self, id: &str) -> Result<JobRecord, QueueError>;
    /// Puts running jobs back in the queue: those with expired leases, or all of them when
    /// `all` (at start-up of the single process that owns an embedded database).
    async fn rescue(&self, all: bool) -> Result<u64, QueueError>;
    async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError>;
    async fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, QueueError>;
    async fn events_after(&self, id: &str, after_seq: i64) -> Result<Vec<JobEvent>, QueueError>;
    async fn counts(&self) -> Result<Vec<(JobStatus, i64)>, QueueError>;
    /// Queued or running jobs that read this model or dataset.
    async fn active_uses(&self, model_id: &str) -> Result<i64, QueueError>;
    /// Drops any copy of the job kept in memory (after its row was deleted).
    fn forget(&self, id: &str);
    /// Wakes on every stored event with the job id (SSE streams wait on it).
    fn subscribe(&self) -> broadcast::Receiver<String>;
}
