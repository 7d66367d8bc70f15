//! Persistence: the SQLite database, the blob store and the job queue.
//!
//! The queue ([`queue::JobQueue`]) and the blob store ([`blobs::BlobStore`]) are traits so a
//! Postgres queue and an S3-compatible store can replace the embedded defaults without touching
//! callers; the catalog of models and artifacts is plain SQL next to the queue.

pub mod blobs;
pub mod catalog;
pub mod db;
pub mod keys;
pub mod queue;
pub mod sqlite_queue;

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
