//! What the storage layer reports, whatever the database behind it: callers (HTTP, the
//! scheduler) react to these kinds and never to a driver's error codes.

/// A failed storage operation.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The database cannot grow: its disk is full (SQLite `SQLITE_FULL`, PostgreSQL `53100`).
    #[error("the database's disk is full")]
    StorageFull,
    /// A row that must be unique exists already (a unique or primary key constraint).
    #[error("conflict: {0}")]
    Conflict(String),
    /// A row the operation needs does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The database did not answer in time or the connection is gone: worth retrying.
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug, a corrupt row): not worth retrying.
    #[error("database error: {0}")]
    Other(String),
}

impl From<sqlx::Error> for StorageError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::RowNotFound => StorageError::NotFound(e.to_string()),
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
                StorageError::Unavailable(e.to_string())
            }
            sqlx::Error::Database(d) => match d.code().as_deref() {
                // SQLITE_FULL; PostgreSQL's disk_full.
                Some("13") | Some("53100") => StorageError::StorageFull,
                // SQLITE_BUSY (and its _RECOVERY, _SNAPSHOT, _TIMEOUT), SQLITE_LOCKED (and _SHAREDCACHE);
                // PostgreSQL's connection and shutdown classes.
                Some("5") | Some("6") | Some("261") | Some("517") | Some("773") | Some("262") => {
                    StorageError::Unavailable(e.to_string())
                }
                Some(c) if c.starts_with("08") || c.starts_with("57P") => StorageError::Unavailable(e.to_string()),
                _ if d.is_unique_violation() => StorageError::Conflict(d.message().to_owned()),
                _ => StorageError::Other(e.to_string()),
            },
            _ => StorageError::Other(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_errors_become_storage_kinds() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        sqlx::query("create table t (id integer primary key)").execute(&pool).await.unwrap();
        sqlx::query("insert into t values (1)").execute(&pool).await.unwrap();
        let dup = sqlx::query("insert into t values (1)").execute(&pool).await.unwrap_err();
        assert!(matches!(StorageError::from(dup), StorageError::Conflict(_)));
        let missing = sqlx::query("select id from t where id = 2").fetch_one(&pool).await.unwrap_err();
        assert!(matches!(StorageError::from(missing), StorageError::NotFound(_)));
        let bad = sqlx::query("select nope from t").fetch_all(&pool).await.unwrap_err();
        assert!(matches!(StorageError::from(bad), StorageError::Other(_)));
        pool.close().await;
        let closed = sqlx::query("select 1").fetch_one(&pool).await.unwrap_err();
        assert!(matches!(StorageError::from(closed), StorageError::Unavailable(_)));
    }
}
