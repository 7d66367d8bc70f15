//! The job queue on SQL: jobs, events and artifacts in SQLite (embedded) or PostgreSQL (shared
//! by replicas), one implementation over [`super::db::Db`].
//!
//! Every state change is one transaction that also appends the matching event, so the event log
//! and the job row never disagree. Claims are one `UPDATE ... WHERE id = (SELECT ... LIMIT 1)
//! RETURNING *`: on SQLite under the write lock (FACTS.md: 0 duplicates over 20,000 jobs across
//! processes), on Postgres River-style with `FOR UPDATE SKIP LOCKED`, so replicas claiming at
//! once take different jobs without waiting on each other. On Postgres every event is also
//! announced with `pg_notify`, and a `LISTEN` task wakes this replica's SSE streams for jobs
//! running anywhere.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sqlx::{Any, Transaction};
use tokio::sync::broadcast;

use super::db::{Db, Dialect};
use super::now_ms;
use super::queue::{Enqueued, JobFilter, JobQueue, LeaseState, NewJob, Outcome, QueueError, QueueLimits};
use crate::domain::job::{JobEvent, JobFailure, JobRecord, JobStatus, Progress};

#[derive(Debug, Clone)]
pub struct SqlQueue {
    db: Db,
    /// First retry delay; doubles per attempt.
    backoff: Duration,
    /// Fans out "job X has a new event" to SSE streams in this process.
    notify: broadcast::Sender<String>,
    /// Recently read or written job rows. `GET /v1/jobs/{id}` is the hot read (clients poll it
    /// while kernels hold every core): every write this process makes refreshes its entry, and
    /// `CACHE_TTL` bounds how stale a row written by another process can be.
    cache: Arc<RwLock<HashMap<String, (JobRecord, Instant)>>>,
    /// Stops the `LISTEN` task (Postgres) when the last clone of this queue goes.
    _listener: Option<Arc<tokio_util::sync::DropGuard>>,
}

/// How long a cached job row is served before it is read again.
const CACHE_TTL: Duration = Duration::from_millis(250);
/// Entries kept before the cache starts over (rows are small; this bounds memory).
const CACHE_MAX: usize = 10_000;

impl SqlQueue {
    /// The queue on `db`; on Postgres also starts the task that turns other replicas' event
    /// announcements into wake-ups here (it reconnects by itself when the connection drops).
    pub fn new(db: Db, backoff: Duration) -> Self {
        let (notify, _) = broadcast::channel(1024);
        let cache: Arc<RwLock<HashMap<String, (JobRecord, Instant)>>> = Arc::default();
        let listener = (db.dialect == Dialect::Postgres).then(|| {
            let stop = tokio_util::sync::CancellationToken::new();
            let task = listen(db.url.clone(), notify.clone(), cache.clone());
            let token = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = task => {}
                    () = token.cancelled() => {}
                }
            });
            Arc::new(stop.drop_guard())
        });
        Self { db, backoff, notify, cache, _listener: listener }
    }

    fn remember(&self, job: &JobRecord) {
        let mut cache = self.cache.write().expect("job cache lock");
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(job.id.clone(), (job.clone(), Instant::now()));
    }

    fn wake(&self, id: &str) {
        let _ = self.notify.send(id.to_owned());
    }
}

async fn append_event(
    db: &Db,
    tx: &mut Transaction<'static, Any>,
    id: &str,
    kind: &str,
    data: serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into job_events (job_id, seq, kind, data, created_at)
         values ($1, (select coalesce(max(seq), 0) + 1 from job_events where job_id = $1), $2, $3, $4)",
    )
    .bind(id)
    .bind(kind)
    .bind(data.to_string())
    .bind(now_ms())
    .execute(&mut **tx)
    .await?;
    db.notify(tx, id).await
}

fn state_event(job: &JobRecord) -> serde_json::Value {
    serde_json::json!({
        "status": job.status,
        "attempt": job.attempt,
        "error": job.failure(),
    })
}

/// Job `id`, locked until `tx` ends (the write lock on SQLite, its row lock on Postgres).
async fn fetch(db: &Db, tx: &mut Transaction<'static, Any>, id: &str) -> Result<Option<JobRecord>, sqlx::Error> {
    let sql = match db.dialect {
        Dialect::Sqlite => "select * from jobs where id = $1",
        Dialect::Postgres => "select * from jobs where id = $1 for update",
    };
    sqlx::query_as(sql).bind(id).fetch_optional(&mut **tx).await
}

#[async_trait]
impl JobQueue for SqlQueue {
    async fn enqueue(&self, job: NewJob, limits: QueueLimits) -> Result<Enqueued, QueueError> {
        let mut tx = self.db.write_tx().await?;
        if let Some(key) = &job.idempotency_key {
            let existing: Option<JobRecord> = sqlx::query_as("select * from jobs where idempotency_key = $1")
                .bind(key)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(existing) = existing {
                return if existing.spec_hash == job.spec_hash {
                    Ok(Enqueued::Replayed(existing))
                } else {
                    Err(QueueError::IdempotencyConflict)
                };
            }
        }
        let queued: i64 =
            sqlx::query_scalar("select count(*) from jobs where status = 'queued'").fetch_one(&mut *tx).await?;
        if queued as u64 >= limits.total {
            return Err(QueueError::Full { queued: queued as u64 });
        }
        if job.owner != "local" {
            let mine: i64 = sqlx::query_scalar("select count(*) from jobs where status = 'queued' and owner = $1")
                .bind(&job.owner)
                .fetch_one(&mut *tx)
                .await?;
            if mine as u64 >= limits.per_owner {
                return Err(QueueError::QuotaExceeded { owner: job.owner.clone(), queued: mine as u64 });
            }
        }
        let id = uuid::Uuid::now_v7().to_string();
        let now = self.db.now_ms(&mut *tx).await?;
        // Inserted only while the inputs still exist, in the same statement: a concurrent
        // DELETE of the model either sees this job or happens before it and this inserts nothing.
        let record: Option<JobRecord> = sqlx::query_as(
            "insert into jobs (id, model_id, dataset_id, spec, spec_hash, idempotency_key, status,
                               max_attempts, run_after, created_at, updated_at, spec_version, student_model_id,
                               eval_dataset_id, owner)
             select $1, $2, $3, $4, $5, $6, 'queued', $7, $8, $8, $8, $9, $10, $11, $12
             where exists (select 1 from models where id = $2 and kind = 'model')
               and ($3 is null or exists (select 1 from models where id = $3 and kind = 'dataset'))
               and ($10 is null or exists (select 1 from models where id = $10 and kind = 'model'))
               and ($11 is null or exists (select 1 from models where id = $11 and kind = 'dataset'))
             returning *",
        )
        .bind(&id)
        .bind(&job.model_id)
        .bind(&job.dataset_id)
        .bind(&job.spec)
        .bind(&job.spec_hash)
        .bind(&job.idempotency_key)
        .bind(job.max_attempts as i64)
        .bind(now)
        .bind(job.spec_version)
        .bind(&job.student_model_id)
        .bind(&job.eval_dataset_id)
        .bind(&job.owner)
        .fetch_optional(&mut *tx)
        .await?;
        let record = record.ok_or_else(|| QueueError::NotFound(job.model_id.clone()))?;
        append_event(&self.db, &mut tx, &id, "state", state_event(&record)).await?;
        tx.commit().await?;
        self.remember(&record);
        self.wake(&id);
        Ok(Enqueued::Created(record))
    }

    async fn find_by_idempotency_key(&self, key: &str) -> Result<Option<JobRecord>, QueueError> {
        Ok(sqlx::query_as("select * from jobs where idempotency_key = $1")
            .bind(key)
            .fetch_optional(&self.db.pool)
            .await?)
    }

    async fn claim(&self, worker: &str, lease: Duration) -> Result<Option<JobRecord>, QueueError> {
        let mut tx = self.db.row_tx().await?;
        let now = self.db.now_ms(&mut *tx).await?;
        let sql = match self.db.dialect {
            Dialect::Sqlite => {
                "update jobs set status = 'running', attempt = attempt + 1, lease_owner = $1,
                        lease_expires_at = $2, started_at = $3, updated_at = $3, progress_fraction = 0,
                        progress_step = null, progress_message = null
                 where id = (select id from jobs where status = 'queued' and run_after <= $3
                             order by run_after, id limit 1)
                   and status = 'queued'
                 returning *"
            }
            // A job another replica is claiming right now is skipped, not waited for.
            Dialect::Postgres => {
                "update jobs set status = 'running', attempt = attempt + 1, lease_owner = $1,
                        lease_expires_at = $2, started_at = $3, updated_at = $3, progress_fraction = 0,
                        progress_step = null, progress_message = null
                 where id = (select id from jobs where status = 'queued' and run_after <= $3
                             order by run_after, id limit 1 for update skip locked)
                 returning *"
            }
        };
        let job: Option<JobRecord> = sqlx::query_as(sql)
            .bind(worker)
            .bind(now + lease.as_millis() as i64)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(job) = &job {
            append_event(&self.db, &mut tx, &job.id, "state", state_event(job)).await?;
        }
        tx.commit().await?;
        if let Some(job) = &job {
            self.remember(job);
            self.wake(&job.id);
        }
        Ok(job)
    }

    async fn heartbeat(&self, id: &str, worker: &str, lease: Duration) -> Result<LeaseState, QueueError> {
        let now = self.db.now_ms(&self.db.pool).await?;
        let row: Option<i64> = sqlx::query_scalar(
            "update jobs set lease_expires_at = $3
             where id = $1 and lease_owner = $2 and status = 'running'
             returning cancel_requested",
        )
        .bind(id)
        .bind(worker)
        .bind(now + lease.as_millis() as i64)
        .fetch_optional(&self.db.pool)
        .await?;
        Ok(match row {
            Some(flag) => LeaseState { held: true, cancel_requested: flag != 0 },
            None => LeaseState { held: false, cancel_requested: false },
        })
    }

    async fn progress(&self, id: &str, worker: &str, p: &Progress) -> Result<(), QueueError> {
        let mut tx = self.db.row_tx().await?;
        let updated = sqlx::query(
            "update jobs set progress_fraction = $3, progress_step = $4, progress_message = $5, updated_at = $6
             where id = $1 and lease_owner = $2 and status = 'running'",
        )
        .bind(id)
        .bind(worker)
        .bind(p.fraction)
        .bind(&p.step)
        .bind(&p.message)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if updated == 1 {
            append_event(&self.db, &mut tx, id, "progress", serde_json::to_value(p).expect("progress JSON")).await?;
        }
        tx.commit().await?;
        self.forget(id);
        self.wake(id);
        Ok(())
    }

    async fn finish(&self, id: &str, worker: &str, outcome: Outcome) -> Result<JobRecord, QueueError> {
        let mut tx = self.db.row_tx().await?;
        let current = fetch(&self.db, &mut tx, id).await?.ok_or_else(|| QueueError::NotFound(id.to_owned()))?;
        if current.status() != JobStatus::Running || current.lease_owner.as_deref() != Some(worker) {
            return Err(QueueError::Finished { id: id.to_owned(), status: current.status() });
        }
        let now = self.db.now_ms(&mut *tx).await?;
        let retry_at = |attempt: i64| now + self.backoff.as_millis() as i64 * (1i64 << (attempt - 1).clamp(0, 16));
        let (status, error, run_after) = match &outcome {
            // A cancel request outranks putting the job back in the queue.
            Outcome::Released | Outcome::Retry(_) if current.cancel_requested != 0 => {
                ("canceled", None, current.run_after)
            }
            Outcome::Succeeded(..) => ("succeeded", None, current.run_after),
            Outcome::Failed(f) => ("failed", Some(f.clone()), current.run_after),
            Outcome::Canceled => ("canceled", None, current.run_after),
            Outcome::Released => ("queued", current.failure(), now),
            Outcome::Retry(f) if current.attempt < current.max_attempts => {
                ("queued", Some(f.clone()), retry_at(current.attempt))
            }
            Outcome::Retry(f) => (
                "failed",
                Some(JobFailure {
                    code: "attempts_exhausted".into(),
                    detail: format!("gave up after {} attempts; last: {}", current.attempt, f.detail),
                }),
                current.run_after,
            ),
        };
        let mut registered: Option<String> = None;
        if let Outcome::Succeeded(_, Some(m)) = &outcome {
            let model_id = uuid::Uuid::now_v7().to_string();
            sqlx::query(
                "insert into models (id, kind, name, sha256, bytes, tensors, parameters, graph, source_job, created_at,
                                     owner, tensor_count)
                 values ($1, 'model', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
            )
            .bind(&model_id)
            .bind(&m.name)
            .bind(&m.sha256)
            .bind(m.bytes)
            .bind(&m.tensors)
            .bind(m.parameters)
            .bind(&m.graph)
            .bind(id)
            .bind(now)
            .bind(&m.owner)
            .bind(m.tensor_count)
            .execute(&mut *tx)
            .await?;
            // The folder files it carries are artifacts of this job: their blob rows exist.
            for f in &m.files {
                sqlx::query("insert into model_files (model_id, name, sha256, bytes) values ($1, $2, $3, $4)")
                    .bind(&model_id)
                    .bind(&f.name)
                    .bind(&f.sha256)
                    .bind(f.bytes)
                    .execute(&mut *tx)
                    .await?;
            }
            registered = Some(model_id);
        }
        if let Outcome::Succeeded(artifacts, _) = &outcome {
            for a in artifacts {
                sqlx::query(
                    "insert into artifacts (job_id, name, format, sha256, bytes, created_at)
                     values ($1, $2, $3, $4, $5, $6)
                     on conflict (job_id, name) do update set format = excluded.format, sha256 = excluded.sha256,
                        bytes = excluded.bytes, created_at = excluded.created_at",
                )
                .bind(id)
                .bind(&a.name)
                .bind(&a.format)
                .bind(&a.sha256)
                .bind(a.bytes)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
        }
        let terminal = status != "queued";
        let attempt = current.attempt - i64::from(matches!(outcome, Outcome::Released));
        let job: JobRecord = sqlx::query_as(
            "update jobs set status = $2, error = $3, run_after = $4, lease_owner = null, lease_expires_at = null, attempt = $7,
                    finished_at = case when $5 then $6 end, canceled_at = case when $2 = 'canceled' then $6 end,
                    progress_fraction = case when $2 = 'succeeded' then 1.0 else progress_fraction end,
                    updated_at = $6, registered_model_id = coalesce($8, registered_model_id)
             where id = $1 returning *",
        )
        .bind(id)
        .bind(status)
        .bind(error.map(|e| serde_json::to_string(&e).expect("failure JSON")))
        .bind(run_after)
        .bind(terminal)
        .bind(now)
        .bind(attempt)
        .bind(&registered)
        .fetch_one(&mut *tx)
        .await?;
        append_event(&self.db, &mut tx, id, "state", state_event(&job)).await?;
        tx.commit().await?;
        self.remember(&job);
        self.wake(id);
        Ok(job)
    }

    async fn cancel(&self, id: &str) -> Result<JobRecord, QueueError> {
        let mut tx = self.db.row_tx().await?;
        let current = fetch(&self.db, &mut tx, id).await?.ok_or_else(|| QueueError::NotFound(id.to_owned()))?;
        let now = self.db.now_ms(&mut *tx).await?;
        let job: JobRecord = match current.status() {
            JobStatus::Queued => {
                let job = sqlx::query_as(
                    "update jobs set status = 'canceled', canceled_at = $2, finished_at = $2, updated_at = $2
                     where id = $1 returning *",
                )
                .bind(id)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
                append_event(&self.db, &mut tx, id, "state", state_event(&job)).await?;
                job
            }
            JobStatus::Running => {
                sqlx::query_as("update jobs set cancel_requested = 1, updated_at = $2 where id = $1 returning *")
                    .bind(id)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?
            }
            status => return Err(QueueError::Finished { id: id.to_owned(), status }),
        };
        tx.commit().await?;
        self.remember(&job);
        self.wake(id);
        Ok(job)
    }

    async fn rescue(&self, all: bool) -> Result<u64, QueueError> {
        let mut tx = self.db.row_tx().await?;
        let now = self.db.now_ms(&mut *tx).await?;
        let rescued: Vec<JobRecord> = sqlx::query_as(
            "update jobs set
                status = case when cancel_requested = 1 then 'canceled'
                              when attempt >= max_attempts then 'failed' else 'queued' end,
                error = case when cancel_requested = 1 then null
                             when attempt >= max_attempts
                             then '{\"code\":\"attempts_exhausted\",\"detail\":\"the worker running attempt ' || attempt
                                  || ' of ' || max_attempts || ' stopped (crash or lost lease)\"}'
                             else error end,
                finished_at = case when cancel_requested = 1 or attempt >= max_attempts then $1 end,
                canceled_at = case when cancel_requested = 1 then $1 end,
                lease_owner = null, lease_expires_at = null, run_after = $1, updated_at = $1
             where status = 'running' and ($2 or lease_expires_at < $1)
             returning *",
        )
        .bind(now)
        .bind(all)
        .fetch_all(&mut *tx)
        .await?;
        for job in &rescued {
            append_event(&self.db, &mut tx, &job.id, "state", state_event(job)).await?;
        }
        tx.commit().await?;
        for job in &rescued {
            self.remember(job);
            tracing::warn!(job_id = %job.id, status = %job.status, attempt = job.attempt, "rescued a job whose worker stopped");
            self.wake(&job.id);
        }
        Ok(rescued.len() as u64)
    }

    async fn get(&self, id: &str) -> Result<Option<JobRecord>, QueueError> {
        if let Some((job, at)) = self.cache.read().expect("job cache lock").get(id) {
            if at.elapsed() < CACHE_TTL {
                return Ok(Some(job.clone()));
            }
        }
        let job: Option<JobRecord> =
            sqlx::query_as("select * from jobs where id = $1").bind(id).fetch_optional(&self.db.pool).await?;
        if let Some(job) = &job {
            self.remember(job);
        }
        Ok(job)
    }

    async fn list(&self, f: &JobFilter) -> Result<Vec<JobRecord>, QueueError> {
        Ok(sqlx::query_as(
            "select * from jobs
             where ($1 is null or status = $1) and ($2 is null or model_id = $2) and ($3 is null or id < $3)
               and ($5 is null or owner = $5)
             order by id desc limit $4",
        )
        .bind(f.status.map(JobStatus::as_str))
        .bind(&f.model_id)
        .bind(&f.after)
        .bind(f.limit as i64)
        .bind(&f.owner)
        .fetch_all(&self.db.pool)
        .await?)
    }

    async fn events_after(&self, id: &str, after_seq: i64) -> Result<Vec<JobEvent>, QueueError> {
        Ok(sqlx::query_as("select * from job_events where job_id = $1 and seq > $2 order by seq limit 1000")
            .bind(id)
            .bind(after_seq)
            .fetch_all(&self.db.pool)
            .await?)
    }

    async fn counts(&self) -> Result<Vec<(JobStatus, i64)>, QueueError> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("select status, count(*) from jobs group by status").fetch_all(&self.db.pool).await?;
        Ok(JobStatus::ALL.iter().map(|s| (*s, rows.iter().find(|(n, _)| n == s.as_str()).map_or(0, |r| r.1))).collect())
    }

    async fn active_uses(&self, model_id: &str) -> Result<i64, QueueError> {
        Ok(sqlx::query_scalar(
            "select count(*) from jobs where (model_id = $1 or dataset_id = $1 or student_model_id = $1 or eval_dataset_id = $1)
             and status in ('queued', 'running')",
        )
        .bind(model_id)
        .fetch_one(&self.db.pool)
        .await?)
    }

    fn forget(&self, id: &str) {
        self.cache.write().expect("job cache lock").remove(id);
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.notify.subscribe()
    }
}

/// Wakes this replica's SSE streams and idle workers for events any replica stored (Postgres
/// `LISTEN` on [`super::db::EVENTS_CHANNEL`]), and drops the job's cached row so the next read
/// sees the change. sqlx's listener reconnects by itself; announcements sent while it was
/// away are lost, which streams and workers cover by polling (every second or so) anyway.
async fn listen(
    url: String,
    notify: broadcast::Sender<String>,
    cache: Arc<RwLock<HashMap<String, (JobRecord, Instant)>>>,
) {
    loop {
        let mut listener = match sqlx::postgres::PgListener::connect(&url).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "listening for other replicas' job events failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(super::db::EVENTS_CHANNEL).await {
            tracing::warn!(error = %e, "listening for other replicas' job events failed; retrying");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        loop {
            match listener.recv().await {
                Ok(n) => {
                    let id = n.payload().to_owned();
                    cache.write().expect("job cache lock").remove(&id);
                    let _ = notify.send(id);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "job event listener stopped; reconnecting");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    break;
                }
            }
        }
    }
}
