//! Persistence: the database (SQLite or PostgreSQL, [`db::Db`]), the blob store (local disk or
//! S3) and the job queue.
//!
//! The queue ([`queue::JobQueue`]), the catalog of models and artifacts ([`catalog::Catalog`])
//! and the blob store ([`blobs::BlobStore`]) are traits; every operation answers
//! [`error::StorageError`], never a driver's error.

pub mod blobs;
pub mod catalog;
#[cfg(test)]
mod conformance;
pub mod db;
pub mod drafts;
pub mod error;
pub mod keys;
pub mod queue;
pub mod s3;
pub mod sql_queue;

/// Deletes a finished job with its events, artifact rows, the artifact files no other row names
/// and its training checkpoints; the blob gate is held until the files are gone, so an upload
/// of the same content cannot find a file that is about to go.
pub async fn delete_job(
    catalog: &dyn catalog::Catalog,
    queue: &dyn queue::JobQueue,
    blobs: &dyn blobs::BlobStore,
    id: &str,
) -> Result<catalog::JobDeleteOutcome, error::StorageError> {
    let _gate = catalog.blob_gate().await?;
    let outcome = catalog.delete_job(id).await?;
    if let catalog::JobDeleteOutcome::Deleted { orphan_blobs } = &outcome {
        queue.forget(id);
        for sha in orphan_blobs {
            if let Err(e) = blobs.delete(sha).await {
                tracing::warn!(error = %e, sha256 = %sha, "job deleted but a blob file remains; removed at next start");
            }
        }
        let _ = tokio::fs::remove_dir_all(blobs.checkpoint_dir(id)).await;
    }
    Ok(outcome)
}

/// Deletes every job that finished more than `days` days ago (see [`delete_job`]); returns how
/// many went. Run by a background task when `storage.retention_days` is set.
pub async fn sweep_finished_jobs(
    catalog: &dyn catalog::Catalog,
    queue: &dyn queue::JobQueue,
    blobs: &dyn blobs::BlobStore,
    days: u64,
) -> usize {
    let before = now_ms() - (days as i64).saturating_mul(86_400_000);
    let mut deleted = 0;
    loop {
        let ids = match catalog.finished_before(before, 100).await {
            Ok(ids) if !ids.is_empty() => ids,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "retention: listing old jobs failed");
                break;
            }
        };
        let mut progressed = false;
        for id in ids {
            match delete_job(catalog, queue, blobs, &id).await {
                Ok(catalog::JobDeleteOutcome::Deleted { .. }) => {
                    deleted += 1;
                    progressed = true;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, job_id = %id, "retention: deleting a job failed"),
            }
        }
        if !progressed {
            break;
        }
    }
    if deleted > 0 {
        tracing::info!(deleted, days, "retention: deleted finished jobs");
    }
    deleted
}

/// Ingests one staged file: moves it into the blob store under `sha256` (content already there
/// is kept) and records its blob row. The first half of every ingest, uploads' and finished
/// jobs' alike; the caller holds [`catalog::Catalog::blob_gate`] until the rows naming the blob
/// (a model, or a job's artifacts) commit, or until [`roll_back_blobs`] undid it.
pub async fn persist_blob(
    catalog: &dyn catalog::Catalog,
    blobs: &dyn blobs::BlobStore,
    path: &std::path::Path,
    sha256: &str,
    bytes: u64,
) -> std::io::Result<()> {
    blobs.persist(path, sha256).await?;
    catalog.ensure_blob(sha256, bytes as i64).await.map_err(std::io::Error::other)
}

/// The roll-back of ingests whose naming rows did not commit: the blobs of `shas` that no row
/// names lose their rows and their files (blobs other rows name stay). Under the blob gate. A
/// failure here is logged: the start-up sweep removes what remains.
pub async fn roll_back_blobs(catalog: &dyn catalog::Catalog, blobs: &dyn blobs::BlobStore, shas: &[String]) {
    match catalog.forget_unnamed_blobs(shas).await {
        Ok(gone) => {
            for sha in gone {
                if let Err(e) = blobs.delete(&sha).await {
                    tracing::warn!(error = %e, sha256 = %sha, "rolling back an ingest left a blob file; removed by a later sweep");
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "rolling back an ingest failed; a later sweep removes its blobs"),
    }
}

/// Milliseconds since the Unix epoch: the one clock every row uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// RFC 3339 rendering of a stored millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// A model's companion files (config.json, tokenizer) at local paths; empty for a model
/// uploaded as one file.
pub async fn model_files(
    catalog: &dyn catalog::Catalog,
    blobs: &dyn blobs::BlobStore,
    model_id: &str,
) -> std::io::Result<crate::formats::hf::ModelFiles> {
    let mut files = crate::formats::hf::ModelFiles::default();
    for f in catalog.model_files(model_id).await.map_err(std::io::Error::other)? {
        files.files.insert(f.name, blobs.local_path(&f.sha256).await?);
    }
    Ok(files)
}
