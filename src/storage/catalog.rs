//! Models, datasets and artifacts: the rows that name blobs.

use crate::storage::error::StorageError;
use async_trait::async_trait;
use serde::Serialize;
use sqlx::pool::PoolConnection;
use sqlx::Any;

use super::db::{Db, Dialect};
use super::now_ms;

/// Models and datasets share one table and one upload path; `kind` tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Model,
    Dataset,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Model => "model",
            ModelKind::Dataset => "dataset",
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelRecord {
    pub id: String,
    pub kind: String,
    pub name: Option<String>,
    pub sha256: String,
    pub bytes: i64,
    /// JSON array of `{name, dtype, shape, bytes}`.
    pub tensors: String,
    pub parameters: i64,
    pub graph: Option<String>,
    pub source_job: Option<String>,
    pub created_at: i64,
    /// The principal whose key created it (`local` without keys).
    pub owner: String,
    pub tensor_count: i64,
}

/// A model or dataset as lists show it: everything but the tensor table and the graph.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ModelSummary {
    pub id: String,
    pub kind: String,
    pub name: Option<String>,
    pub sha256: String,
    pub bytes: i64,
    pub parameters: i64,
    pub tensor_count: i64,
    /// 1 when the model has an architecture graph (an integer: the column is computed, and
    /// SQLite has no boolean type).
    pub has_graph: i64,
    pub source_job: Option<String>,
    pub created_at: i64,
}

impl From<&ModelRecord> for ModelSummary {
    fn from(m: &ModelRecord) -> Self {
        ModelSummary {
            id: m.id.clone(),
            kind: m.kind.clone(),
            name: m.name.clone(),
            sha256: m.sha256.clone(),
            bytes: m.bytes,
            parameters: m.parameters,
            tensor_count: m.tensor_count,
            has_graph: i64::from(m.graph.is_some()),
            source_job: m.source_job.clone(),
            created_at: m.created_at,
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ArtifactRecord {
    pub job_id: String,
    pub name: String,
    pub format: String,
    pub sha256: String,
    pub bytes: i64,
    pub created_at: i64,
}

/// A model row to insert once its blob is persisted.
#[derive(Debug, Clone)]
pub struct NewModel {
    pub kind: ModelKind,
    pub name: Option<String>,
    pub sha256: String,
    pub bytes: i64,
    pub tensors: String,
    pub parameters: i64,
    pub source_job: Option<String>,
    /// The architecture graph (canonical JSON), validated against `tensors` by the caller.
    pub graph: Option<String>,
    /// The principal it belongs to.
    pub owner: String,
    /// Entries of `tensors`.
    pub tensor_count: i64,
    /// The folder's companion files (config.json, tokenizer), each a persisted blob.
    pub files: Vec<ModelFile>,
}

/// A file a model folder brought besides its weights.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize, utoipa::ToSchema)]
pub struct ModelFile {
    pub name: String,
    pub sha256: String,
    pub bytes: i64,
}

#[derive(Debug)]
pub enum DeleteOutcome {
    /// Deleted; `orphan_blobs` names blobs no row uses any more, for the caller to remove.
    Deleted {
        orphan_blobs: Vec<String>,
    },
    InUse(i64),
    NotFound,
}

#[derive(Debug, PartialEq, Eq)]
pub enum GraphUpdate {
    Updated,
    /// Queued or running jobs read the model.
    InUse(i64),
    NotFound,
}

/// [`Catalog`] on SQLite or PostgreSQL ([`Db`]).
#[derive(Debug, Clone)]
pub struct SqlCatalog {
    db: Db,
    /// This process's half of [`Catalog::blob_gate`].
    blob_gate: std::sync::Arc<tokio::sync::Mutex<()>>,
}

/// `pg_advisory_lock` key of the blob gate shared by replicas.
const BLOB_GATE_KEY: i64 = 0x006d_7042_4c4f_4253; // "mpBLOBS"

/// A held [`Catalog::blob_gate`]: this process's mutex and, on Postgres, a session advisory
/// lock every replica takes, released (with its connection) when dropped.
pub struct BlobGate {
    _local: tokio::sync::OwnedMutexGuard<()>,
    _shared: Option<SharedLock>,
}

/// The connection holding the shared gate's advisory lock; gives the lock back when dropped,
/// wherever that happens (held by a caller, or still in the channel from the task that took it).
struct SharedLock(Option<PoolConnection<Any>>);

impl Drop for SharedLock {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            tokio::spawn(release_shared_gate(conn));
        }
    }
}

/// Gives the shared gate back before its connection returns to the pool; a connection that
/// cannot is closed instead (ending the session releases its locks): a pooled connection must
/// never keep the lock.
async fn release_shared_gate(mut conn: PoolConnection<Any>) {
    let unlocked = sqlx::query("select pg_advisory_unlock($1)").bind(BLOB_GATE_KEY).execute(&mut *conn).await;
    if let Err(e) = unlocked {
        tracing::warn!(error = %e, "releasing the shared blob gate failed; closing its connection");
        use sqlx::Connection;
        let _ = conn.detach().close().await;
    }
}

/// Takes the shared gate on a connection of `pool`. The wait runs as a task of its own: a caller
/// that goes away while another replica holds the gate (a client disconnecting mid-upload) does
/// not leave the lock to be granted later to a connection nobody owns; the task gives it back.
async fn acquire_shared_gate(pool: sqlx::AnyPool) -> Result<SharedLock, StorageError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let locked = async {
            let mut conn = pool.acquire().await?;
            sqlx::query("select pg_advisory_lock($1)").bind(BLOB_GATE_KEY).execute(&mut *conn).await?;
            Ok::<_, sqlx::Error>(SharedLock(Some(conn)))
        }
        .await;
        // Nobody waiting any more: dropping the lock here (or later, unread in the channel)
        // gives it back.
        let _ = tx.send(locked);
    });
    match rx.await {
        Ok(locked) => Ok(locked?),
        Err(_) => Err(StorageError::Unavailable("the blob gate's task stopped".into())),
    }
}

/// The rows that name blobs: models and datasets (with their files and graphs), artifacts, blob
/// rows and the parts of jobs the catalog owns (deleting finished ones, retention, quotas). A trait
/// like [`super::queue::JobQueue`], so another database can stand behind it.
#[async_trait]
pub trait Catalog: Send + Sync + 'static {
    /// Held from persisting a blob file until the row naming it commits, and from deleting a row
    /// until its file is unlinked: otherwise a delete could unlink a file that an upload of the
    /// same content just found in place and is about to name. In-process: it serialises one
    /// server's requests and jobs (the embedded mode has exactly one process).
    /// On a database replicas share, it is also held against every other replica.
    async fn blob_gate(&self) -> Result<BlobGate, StorageError>;

    /// Records the blob (if new) and the model in one transaction.
    async fn insert_model(&self, m: NewModel) -> Result<ModelRecord, StorageError>;

    /// A model's companion files, by name.
    async fn model_files(&self, model_id: &str) -> Result<Vec<ModelFile>, StorageError>;

    async fn get_model(&self, kind: ModelKind, id: &str) -> Result<Option<ModelRecord>, StorageError>;

    /// Newest first; `after` is the last id of the previous page; `owner` limits the list to one
    /// principal's rows (`None`: everyone's).
    async fn list_models(
        &self,
        kind: ModelKind,
        after: Option<&str>,
        limit: u32,
        owner: Option<&str>,
    ) -> Result<Vec<ModelSummary>, StorageError>;

    /// Deletes unless a queued or running job reads it; the check and the delete are one
    /// transaction, serialised with job inserts.
    async fn delete_model(&self, kind: ModelKind, id: &str) -> Result<DeleteOutcome, StorageError>;

    /// Attaches (`Some`) or removes (`None`) a model's architecture graph, unless a queued or
    /// running job reads the model: a job runs with the graph it was planned with.
    async fn set_graph(&self, id: &str, graph: Option<&str>) -> Result<GraphUpdate, StorageError>;

    /// Records a blob a job produced (before the job's artifact rows name it).
    async fn ensure_blob(&self, sha256: &str, bytes: i64) -> Result<(), StorageError>;

    /// Deletes the blob rows no model or artifact names (left by a crash between persist and
    /// finish) that were created before `created_before` (unix ms); returns their keys. Replicas
    /// sharing a database pass an hour ago, so a row another replica is about to name stays.
    async fn remove_orphan_blobs(&self, created_before: i64) -> Result<Vec<String>, StorageError>;

    /// Deletes the rows of those of `shas` no model, file or artifact names; returns them (the
    /// caller, holding the blob gate, deletes their files). The roll-back of an ingest whose
    /// naming rows did not commit.
    async fn forget_unnamed_blobs(&self, shas: &[String]) -> Result<Vec<String>, StorageError>;

    /// Every blob key the database knows (start-up sweep of stray files).
    async fn blob_keys(&self) -> Result<Vec<String>, StorageError>;

    async fn artifacts(&self, job_id: &str) -> Result<Vec<ArtifactRecord>, StorageError>;

    async fn artifact(&self, job_id: &str, name: &str) -> Result<Option<ArtifactRecord>, StorageError>;

    async fn ping(&self) -> Result<(), StorageError>;

    /// Deletes a finished job, its events and artifact rows (one transaction), and the blob rows
    /// nothing else names. The caller holds [`Catalog::blob_gate`] until it removed the files.
    async fn delete_job(&self, id: &str) -> Result<JobDeleteOutcome, StorageError>;

    /// Bytes `owner` stores: its models and datasets (those registered from its jobs included),
    /// the files of its drafts, and its jobs' artifacts, as they would be downloaded (a blob two
    /// of them share counts twice).
    async fn stored_bytes(&self, owner: &str) -> Result<u64, StorageError>;

    /// Finished jobs that ended before `before_ms` (unix milliseconds), oldest first.
    async fn finished_before(&self, before_ms: i64, limit: u32) -> Result<Vec<String>, StorageError>;
}

impl SqlCatalog {
    pub fn new(db: Db) -> Self {
        Self { db, blob_gate: Default::default() }
    }
}

#[async_trait]
impl Catalog for SqlCatalog {
    /// See `blob_gate`: take it around persist + insert and around delete + unlink.
    async fn blob_gate(&self) -> Result<BlobGate, StorageError> {
        // The process's mutex first: tasks waiting here hold no database connection.
        let local = self.blob_gate.clone().lock_owned().await;
        let shared = match self.db.dialect {
            Dialect::Sqlite => None,
            Dialect::Postgres => Some(acquire_shared_gate(self.db.pool.clone()).await?),
        };
        Ok(BlobGate { _local: local, _shared: shared })
    }

    /// Records the blob (if new) and the model in one transaction.
    async fn insert_model(&self, m: NewModel) -> Result<ModelRecord, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let now = now_ms();
        sqlx::query("insert into blobs (sha256, bytes, created_at) values ($1, $2, $3) on conflict do nothing")
            .bind(&m.sha256)
            .bind(m.bytes)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        let rec: ModelRecord = sqlx::query_as(
            "insert into models (id, kind, name, sha256, bytes, tensors, parameters, source_job, created_at, graph, owner,
                                 tensor_count)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) returning *",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(m.kind.as_str())
        .bind(&m.name)
        .bind(&m.sha256)
        .bind(m.bytes)
        .bind(&m.tensors)
        .bind(m.parameters)
        .bind(&m.source_job)
        .bind(now)
        .bind(&m.graph)
        .bind(&m.owner)
        .bind(m.tensor_count)
        .fetch_one(&mut *tx)
        .await?;
        for f in &m.files {
            sqlx::query("insert into blobs (sha256, bytes, created_at) values ($1, $2, $3) on conflict do nothing")
                .bind(&f.sha256)
                .bind(f.bytes)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query("insert into model_files (model_id, name, sha256, bytes) values ($1, $2, $3, $4)")
                .bind(&rec.id)
                .bind(&f.name)
                .bind(&f.sha256)
                .bind(f.bytes)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(rec)
    }

    /// A model's companion files, by name.
    async fn model_files(&self, model_id: &str) -> Result<Vec<ModelFile>, StorageError> {
        sqlx::query_as("select name, sha256, bytes from model_files where model_id = $1 order by name")
            .bind(model_id)
            .fetch_all(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    async fn get_model(&self, kind: ModelKind, id: &str) -> Result<Option<ModelRecord>, StorageError> {
        sqlx::query_as("select * from models where id = $1 and kind = $2")
            .bind(id)
            .bind(kind.as_str())
            .fetch_optional(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    /// Newest first; `after` is the last id of the previous page; `owner` limits the list to one
    /// principal's rows (`None`: everyone's).
    async fn list_models(
        &self,
        kind: ModelKind,
        after: Option<&str>,
        limit: u32,
        owner: Option<&str>,
    ) -> Result<Vec<ModelSummary>, StorageError> {
        sqlx::query_as(
            "select id, kind, name, sha256, bytes, parameters, tensor_count, case when graph is null then 0 else 1 end as has_graph,
                    source_job, created_at
             from models where kind = $1 and ($2 is null or id < $2) and ($4 is null or owner = $4)
             order by id desc limit $3",
        )
        .bind(kind.as_str())
        .bind(after)
        .bind(limit as i64)
        .bind(owner)
        .fetch_all(&self.db.pool)
        .await
        .map_err(StorageError::from)
    }

    /// Deletes unless a queued or running job reads it; the check and the delete are one
    /// transaction, serialised with job inserts by SQLite's write lock.
    async fn delete_model(&self, kind: ModelKind, id: &str) -> Result<DeleteOutcome, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let active: i64 = sqlx::query_scalar(
            "select count(*) from jobs where (model_id = $1 or dataset_id = $1 or student_model_id = $1 or eval_dataset_id = $1)
             and status in ('queued', 'running')",
        )
        .bind(id)
        .fetch_one(&mut *tx)
        .await?;
        if active > 0 {
            return Ok(DeleteOutcome::InUse(active));
        }
        let exists: Option<String> = sqlx::query_scalar("select id from models where id = $1 and kind = $2")
            .bind(id)
            .bind(kind.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        if exists.is_none() {
            return Ok(DeleteOutcome::NotFound);
        }
        let mut shas: Vec<String> = sqlx::query_scalar("delete from model_files where model_id = $1 returning sha256")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        let sha: String = sqlx::query_scalar("delete from models where id = $1 returning sha256")
            .bind(id)
            .fetch_one(&mut *tx)
            .await?;
        shas.push(sha);
        shas.sort();
        shas.dedup();
        let mut orphan_blobs = Vec::new();
        for sha in shas {
            if delete_blob_row_if_unused(&mut tx, &sha).await? {
                orphan_blobs.push(sha);
            }
        }
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted { orphan_blobs })
    }

    /// Attaches (`Some`) or removes (`None`) a model's architecture graph, unless a queued or
    /// running job reads the model: a job runs with the graph it was planned with.
    async fn set_graph(&self, id: &str, graph: Option<&str>) -> Result<GraphUpdate, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let active: i64 =
            sqlx::query_scalar(
                "select count(*) from jobs where (model_id = $1 or student_model_id = $1) and status in ('queued', 'running')",
            )
                .bind(id)
                .fetch_one(&mut *tx)
                .await?;
        if active > 0 {
            return Ok(GraphUpdate::InUse(active));
        }
        let updated = sqlx::query("update models set graph = $1 where id = $2 and kind = 'model'")
            .bind(graph)
            .bind(id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(if updated == 0 { GraphUpdate::NotFound } else { GraphUpdate::Updated })
    }

    /// Records a blob a job produced (before the job's artifact rows name it).
    async fn ensure_blob(&self, sha256: &str, bytes: i64) -> Result<(), StorageError> {
        sqlx::query("insert into blobs (sha256, bytes, created_at) values ($1, $2, $3) on conflict do nothing")
            .bind(sha256)
            .bind(bytes)
            .bind(now_ms())
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }

    async fn remove_orphan_blobs(&self, created_before: i64) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar(
            "delete from blobs where created_at < $1 and sha256 not in (select sha256 from models)
               and sha256 not in (select sha256 from artifacts)
               and sha256 not in (select sha256 from model_files) returning sha256",
        )
        .bind(created_before)
        .fetch_all(&self.db.pool)
        .await
        .map_err(StorageError::from)
    }

    async fn forget_unnamed_blobs(&self, shas: &[String]) -> Result<Vec<String>, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let mut gone = Vec::new();
        for sha in shas {
            if delete_blob_row_if_unused(&mut tx, sha).await? {
                gone.push(sha.clone());
            }
        }
        tx.commit().await?;
        Ok(gone)
    }

    /// Every blob key the database knows (start-up sweep of stray files).
    async fn blob_keys(&self) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar("select sha256 from blobs").fetch_all(&self.db.pool).await.map_err(StorageError::from)
    }

    async fn artifacts(&self, job_id: &str) -> Result<Vec<ArtifactRecord>, StorageError> {
        sqlx::query_as("select * from artifacts where job_id = $1 order by name")
            .bind(job_id)
            .fetch_all(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    async fn artifact(&self, job_id: &str, name: &str) -> Result<Option<ArtifactRecord>, StorageError> {
        sqlx::query_as("select * from artifacts where job_id = $1 and name = $2")
            .bind(job_id)
            .bind(name)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    async fn ping(&self) -> Result<(), StorageError> {
        sqlx::query("select 1").execute(&self.db.pool).await.map(|_| ()).map_err(StorageError::from)
    }
    /// Deletes a finished job, its events and artifact rows (one transaction), and the blob rows
    /// nothing else names. The caller holds [`Catalog::blob_gate`] until it removed the files.
    async fn delete_job(&self, id: &str) -> Result<JobDeleteOutcome, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let status: Option<String> =
            sqlx::query_scalar("select status from jobs where id = $1").bind(id).fetch_optional(&mut *tx).await?;
        match status.as_deref() {
            None => return Ok(JobDeleteOutcome::NotFound),
            Some("queued" | "running") => return Ok(JobDeleteOutcome::Active),
            Some(_) => {}
        }
        let shas: Vec<String> = sqlx::query_scalar("select distinct sha256 from artifacts where job_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
        // Events and artifacts go with the job (`on delete cascade`).
        sqlx::query("delete from jobs where id = $1").bind(id).execute(&mut *tx).await?;
        let mut orphan_blobs = Vec::new();
        for sha in shas {
            if delete_blob_row_if_unused(&mut tx, &sha).await? {
                orphan_blobs.push(sha);
            }
        }
        tx.commit().await?;
        Ok(JobDeleteOutcome::Deleted { orphan_blobs })
    }

    /// Bytes `owner` stores: its models and datasets (those registered from its jobs included),
    /// the files of its drafts, and its jobs' artifacts, as they would be downloaded (a blob two
    /// of them share counts twice).
    async fn stored_bytes(&self, owner: &str) -> Result<u64, StorageError> {
        let n: i64 = sqlx::query_scalar(
            // Postgres sums bigints into numeric: cast back to the integer both engines return.
            "select cast((select coalesce(sum(bytes), 0) from models where owner = $1)
                  + (select coalesce(sum(f.bytes), 0) from model_files f join models m on m.id = f.model_id
                     where m.owner = $1)
                  + (select coalesce(sum(a.bytes), 0) from artifacts a join jobs j on j.id = a.job_id
                     where j.owner = $1)
                  + (select coalesce(sum(f.bytes), 0) from model_draft_files f
                     join model_drafts d on d.id = f.draft_id where d.owner = $1) as bigint)",
        )
        .bind(owner)
        .fetch_one(&self.db.pool)
        .await?;
        Ok(n as u64)
    }

    /// Finished jobs that ended before `before_ms` (unix milliseconds), oldest first.
    async fn finished_before(&self, before_ms: i64, limit: u32) -> Result<Vec<String>, StorageError> {
        sqlx::query_scalar(
            "select id from jobs where status in ('succeeded', 'failed', 'canceled')
               and coalesce(finished_at, canceled_at, updated_at) < $1
             order by coalesce(finished_at, canceled_at, updated_at) limit $2",
        )
        .bind(before_ms)
        .bind(limit as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(StorageError::from)
    }
}

/// What deleting a job did.
#[derive(Debug)]
pub enum JobDeleteOutcome {
    /// Deleted with its events and artifacts; the blobs no row uses any more, to remove.
    Deleted {
        orphan_blobs: Vec<String>,
    },
    /// Queued or running: cancel it first.
    Active,
    NotFound,
}

async fn delete_blob_row_if_unused(tx: &mut sqlx::Transaction<'static, Any>, sha: &str) -> Result<bool, StorageError> {
    let deleted = sqlx::query(
        "delete from blobs where sha256 = $1
           and not exists (select 1 from models where sha256 = $1)
           and not exists (select 1 from artifacts where sha256 = $1)
           and not exists (select 1 from model_files where sha256 = $1)",
    )
    .bind(sha)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(deleted == 1)
}
