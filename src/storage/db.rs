//! The SQLite pool: WAL, a busy timeout and foreign keys, migrations applied at start.

use crate::storage::error::StorageError;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

/// Opens (creating if needed) `modelpress.db` in `data_dir` and applies pending migrations.
pub async fn connect(data_dir: &Path) -> Result<SqlitePool, StorageError> {
    let url = format!("sqlite://{}", data_dir.join("modelpress.db").display());
    let options = SqliteConnectOptions::from_str(&url)?
        .create_if_missing(true)
        // WAL lets readers (status polls) proceed while a worker writes.
        .journal_mode(SqliteJournalMode::Wal)
        // NORMAL in WAL mode is durable across process crashes (only an OS crash can lose the
        // last commits), which is the failure the service promises to survive.
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        // The ping before this hook runs after any rollback a dropped transaction queued. A
        // connection still inside a transaction here had its COMMIT or ROLLBACK fail (a full
        // disk: SQLite ends the transaction itself, sqlx still counts it), and sqlx would refuse
        // every later BEGIN on it ("begin_with at non-zero transaction depth") until a restart:
        // it is closed and replaced instead, so storage works again as soon as space is free.
        .before_acquire(|conn, _meta| {
            Box::pin(async move {
                use sqlx::Connection;
                if conn.is_in_transaction() {
                    tracing::warn!("discarding a database connection left inside a failed transaction");
                    return Ok(false);
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await?;
    migrate(&pool).await?;
    Ok(pool)
}

pub async fn migrate(pool: &SqlitePool) -> Result<(), StorageError> {
    sqlx::migrate!("./migrations").run(pool).await.map_err(|e| match e {
        sqlx::migrate::MigrateError::Execute(e) => e.into(),
        // A database newer than this binary, or edited migrations: not something to retry.
        other => StorageError::Other(format!("migrating the database: {other}")),
    })
}
