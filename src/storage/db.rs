//! The database: SQLite in the data directory (the zero-setup default) or PostgreSQL (shared by
//! replicas), chosen by `storage.database_url` and reached through sqlx's `Any` driver, so the
//! queue, the catalog, drafts and keys are one implementation whose SQL runs on both.
//!
//! The SQL is written once in the common dialect (`$N` parameters, `on conflict`, `returning`,
//! `cast(... as bigint)`); where the engines differ ([`Db::write_tx`], [`Db::row_tx`],
//! [`Db::notify`]) the difference lives here. Each engine has its own migrations:
//! `migrations/*.sql` (SQLite) and `migrations/postgres/*.sql`, the same schema.

use crate::storage::error::StorageError;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode};
use sqlx::{Any, AnyPool, ConnectOptions, Connection, Transaction};

/// Which engine stands behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// One process owns the file; `BEGIN IMMEDIATE` serialises writers.
    Sqlite,
    /// Several replicas share it; row locks, `SKIP LOCKED` claims and a transaction-level
    /// advisory lock where SQLite's write lock was relied upon.
    Postgres,
}

/// A pool on either engine.
#[derive(Debug, Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub dialect: Dialect,
    /// The URL it was opened with (Postgres: a `LISTEN` connection opens its own).
    pub url: String,
}

/// `pg_advisory_xact_lock` key serialising the writes SQLite serialises with its write lock:
/// enqueue (quotas, idempotency keys, inputs that must still exist) against model deletes and
/// graph changes, draft and key creation against their per-principal limits.
const WRITE_LOCK_KEY: i64 = 0x006d_7057_5249_5445; // "mpWRITE"

/// The channel job events are announced on (payload: the job id), so SSE streams on every
/// replica wake for jobs running on any of them.
pub const EVENTS_CHANNEL: &str = "modelpress_job_events";

impl Db {
    /// Opens `url`: `sqlite://` (the default: `modelpress.db` in `data_dir`), `sqlite://PATH`,
    /// or `postgres://user:password@host:port/database`; then applies pending migrations (on
    /// Postgres under sqlx's migration advisory lock, so replicas starting together apply them once).
    ///
    /// Errors: a URL of another scheme; an unreachable server ([`StorageError::Unavailable`]); a
    /// database migrated by a newer ModelPress ([`StorageError::Other`]).
    pub async fn connect(url: &str, data_dir: &Path) -> Result<Db, StorageError> {
        sqlx::any::install_default_drivers();
        let db = match Dialect::of(url)? {
            Dialect::Sqlite => Self::connect_sqlite(url, data_dir).await?,
            Dialect::Postgres => {
                // One plain connection first: a pool that cannot connect only says it timed out,
                // this says why (refused, no such database, authentication).
                sqlx::AnyConnection::connect(url).await?.close().await?;
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                Db { pool, dialect: Dialect::Postgres, url: url.to_owned() }
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    async fn connect_sqlite(url: &str, data_dir: &Path) -> Result<Db, StorageError> {
        let path = match url.strip_prefix("sqlite://").unwrap_or("") {
            "" => data_dir.join("modelpress.db"),
            p => Path::new(p).to_path_buf(),
        };
        let url = format!("sqlite://{}", path.display());
        // WAL is a property of the file: set once here with the typed options, then every pooled
        // connection (opened from the URL by the Any driver) finds it.
        let options = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            // WAL lets readers (status polls) proceed while a worker writes.
            .journal_mode(SqliteJournalMode::Wal);
        options.connect().await?.close().await?;
        let pool = AnyPoolOptions::new()
            .max_connections(8)
            .after_connect(|conn, _meta| {
                Box::pin(async move {
                    // NORMAL in WAL mode is durable across process crashes (only an OS crash can
                    // lose the last commits), which is the failure the service promises to survive.
                    sqlx::raw_sql(
                        "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                    )
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            })
            // The ping before this hook runs after any rollback a dropped transaction queued. A
            // connection still inside a transaction here had its COMMIT or ROLLBACK fail (a full
            // disk: SQLite ends the transaction itself, sqlx still counts it), and sqlx would
            // refuse every later BEGIN on it ("begin_with at non-zero transaction depth") until a
            // restart: it is closed and replaced instead, so storage works again once space is free.
            .before_acquire(|conn, _meta| {
                Box::pin(async move {
                    if conn.is_in_transaction() {
                        tracing::warn!("discarding a database connection left inside a failed transaction");
                        return Ok(false);
                    }
                    Ok(true)
                })
            })
            .connect_with(AnyConnectOptions::from_str(&url)?)
            .await?;
        Ok(Db { pool, dialect: Dialect::Sqlite, url })
    }

    async fn migrate(&self) -> Result<(), StorageError> {
        let migrator = match self.dialect {
            Dialect::Sqlite => sqlx::migrate!("./migrations"),
            Dialect::Postgres => sqlx::migrate!("./migrations/postgres"),
        };
        migrator.run(&self.pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => e.into(),
            // A database newer than this binary, or edited migrations: not something to retry.
            other => StorageError::Other(format!("migrating the database: {other}")),
        })
    }

    /// A transaction that runs alone among writers: SQLite's `BEGIN IMMEDIATE` (the write lock
    /// up front: a deferred transaction that reads, then writes, can fail with
    /// `SQLITE_BUSY_SNAPSHOT` without waiting for the busy timeout); on Postgres a transaction
    /// holding [`WRITE_LOCK_KEY`] until it ends, so checks and inserts made by different
    /// replicas (counts against limits, inputs that must exist) cannot interleave.
    pub async fn write_tx(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("select pg_advisory_xact_lock($1)").bind(WRITE_LOCK_KEY).execute(&mut *tx).await?;
                Ok(tx)
            }
        }
    }

    /// A transaction that changes one job's rows: on SQLite the write lock, on Postgres only
    /// the row locks its statements take (so claims and heartbeats of different jobs run side
    /// by side on different replicas).
    pub async fn row_tx(&self) -> Result<Transaction<'static, Any>, sqlx::Error> {
        match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await,
            Dialect::Postgres => self.pool.begin().await,
        }
    }

    /// Unix milliseconds on the clock leases, retry backoff and expiries are measured by: the
    /// database server's on Postgres, where one replica writes a lease's end and another
    /// compares it (their clocks may drift apart); this process's on SQLite (one process).
    pub async fn now_ms<'e, E>(&self, executor: E) -> Result<i64, sqlx::Error>
    where
        E: sqlx::Executor<'e, Database = Any>,
    {
        match self.dialect {
            Dialect::Sqlite => Ok(super::now_ms()),
            Dialect::Postgres => {
                sqlx::query_scalar("select cast(extract(epoch from clock_timestamp()) * 1000 as bigint)")
                    .fetch_one(executor)
                    .await
            }
        }
    }

    /// Announces a new event of job `id` to every replica when `tx` commits (Postgres
    /// `pg_notify`); nothing on SQLite, where the one process already knows.
    pub async fn notify(&self, tx: &mut Transaction<'static, Any>, id: &str) -> Result<(), sqlx::Error> {
        if self.dialect == Dialect::Postgres {
            sqlx::query("select pg_notify($1, $2)").bind(EVENTS_CHANNEL).bind(id).execute(&mut **tx).await?;
        }
        Ok(())
    }
}

impl Dialect {
    /// The engine a `storage.database_url` names.
    pub fn of(url: &str) -> Result<Dialect, StorageError> {
        if url.starts_with("sqlite://") {
            Ok(Dialect::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Dialect::Postgres)
        } else {
            Err(StorageError::Other(format!(
                "storage.database_url `{}`: expected `sqlite://` (the embedded default), `sqlite://PATH` or `postgres://...`",
                redact(url)
            )))
        }
    }
}

/// `url` with any password replaced by `***`, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_engine_and_passwords_stay_out_of_messages() {
        assert_eq!(Dialect::of("sqlite://").unwrap(), Dialect::Sqlite);
        // Other sqlite forms would silently fall back to the default file: refused instead.
        assert!(Dialect::of("sqlite:data.db").is_err() && Dialect::of("sqlite::memory:").is_err());
        assert_eq!(Dialect::of("postgresql://u:p@h/db").unwrap(), Dialect::Postgres);
        let e = Dialect::of("mysql://u:secret@h/db").unwrap_err().to_string();
        assert!(e.contains("mysql://u:***@h/db") && !e.contains("secret"), "{e}");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }
}
