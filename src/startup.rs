//! Builds the application from settings and runs it until a shutdown signal.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::config::Settings;
use crate::http::{self, AppState};
use crate::scheduler::WorkerPool;
use crate::storage::blobs::{BlobStore, LocalBlobStore};
use crate::storage::catalog::{Catalog, SqlCatalog};
use crate::storage::db::{Db, Dialect};
use crate::storage::queue::JobQueue;
use crate::storage::sql_queue::SqlQueue;

pub struct Application {
    listener: TcpListener,
    router: axum::Router,
    workers: WorkerPool,
    settings: Arc<Settings>,
    /// Held for the process's life: one server per data dir (the embedded queue re-queues every
    /// running job at start, which is only right when no other process runs them).
    _lock: std::fs::File,
}

/// Takes an exclusive advisory lock on `<data_dir>/.lock`, failing fast if another process has it.
fn lock_data_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(".lock"))?;
    // SAFETY: flock on a valid, owned descriptor.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        anyhow::bail!("data dir {} is in use by another ModelPress process", dir.display());
    }
    Ok(file)
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let settings = Arc::new(settings);
        let data_dir = settings.storage.data_dir.clone();
        std::fs::create_dir_all(&data_dir).with_context(|| format!("creating data dir {}", data_dir.display()))?;
        let lock = lock_data_dir(&data_dir)?;
        // The port first: a replica that cannot serve should not touch shared state.
        let address = format!("{}:{}", settings.server.host, settings.server.port);
        let listener = TcpListener::bind(&address).await.with_context(|| format!("binding {address}"))?;
        let db = Db::connect(&settings.storage.database_url, &data_dir).await.with_context(|| {
            format!("opening the database {}", crate::storage::db::redact(&settings.storage.database_url))
        })?;
        // Replicas share a Postgres database: what one finds unfinished may be another's work.
        let shared = db.dialect == Dialect::Postgres;
        if shared && settings.storage.s3().map_err(anyhow::Error::msg)?.is_none() {
            tracing::warn!(
                "storage.database_url is shared but storage.blob_store is this machine's disk: other replicas \
                 cannot read the files this one stores; use an s3:// blob store to run more than one"
            );
        }
        let blobs: Arc<dyn BlobStore> = match settings.storage.s3().map_err(anyhow::Error::msg)? {
            None => Arc::new(LocalBlobStore::open(&data_dir)?),
            Some(s3) => {
                let store = crate::storage::s3::S3BlobStore::open(&data_dir, &s3)
                    .with_context(|| format!("opening the blob store {}", settings.storage.blob_store))?;
                let context = || {
                    format!(
                        "reaching the blob store {} (check the endpoint, the credentials: AWS_ACCESS_KEY_ID and \
                         AWS_SECRET_ACCESS_KEY, or an instance role, and that the bucket exists)",
                        settings.storage.blob_store
                    )
                };
                store.check_writable().await.with_context(context)?;
                store.probe_write().await.with_context(context)?;
                Arc::new(store)
            }
        };
        let catalog: Arc<dyn Catalog> = Arc::new(SqlCatalog::new(db.clone()));

        // Crash recovery, in order: partial files, rows naming nothing, files named by nothing,
        // then jobs whose worker died with the previous process. On a shared database only rows
        // an hour old count as orphans (another replica may be between persisting a blob and
        // naming it), under the gate every replica takes.
        let swept = blobs.sweep_staging().await?;
        let created_before = if shared { crate::storage::now_ms() - 3_600_000 } else { i64::MAX };
        let gate = catalog.blob_gate().await?;
        let orphans = catalog.remove_orphan_blobs(created_before).await?;
        for sha in &orphans {
            blobs.delete(sha).await?;
        }
        drop(gate);
        // Files no row names: listed outside the gate (a bucket's listing can take minutes while
        // other replicas wait on it), deleted under it after checking the rows again.
        let known: std::collections::HashSet<String> = catalog.blob_keys().await?.into_iter().collect();
        let candidates = blobs.unreferenced(&known).await?;
        let mut stray = 0;
        if !candidates.is_empty() {
            let _gate = catalog.blob_gate().await?;
            let known: std::collections::HashSet<String> = catalog.blob_keys().await?.into_iter().collect();
            for sha in candidates.iter().filter(|c| !known.contains(*c)) {
                blobs.delete(sha).await?;
                stray += 1;
            }
        }
        let drafts = crate::storage::drafts::Drafts::open(db.clone(), &data_dir)?;
        let expired_drafts = drafts.sweep(true).await?;
        let queue: Arc<dyn JobQueue> =
            Arc::new(SqlQueue::new(db.clone(), Duration::from_secs(settings.queue.retry_backoff_secs)));
        // The single process owning an embedded database knows every running job died with the
        // last one; replicas sharing a database rescue only expired leases.
        let rescued = queue.rescue(!shared).await?;
        tracing::info!(swept, orphan_blobs = orphans.len() + stray, rescued, expired_drafts, data_dir = %data_dir.display(), "recovered state");

        // Leases that expire while we run (a worker of another process died, or a finish that
        // could not be recorded) go back to the queue. Checked every quarter lease: a dead
        // replica's job waits about one lease (plus up to a quarter) before another takes it.
        let rescuer = queue.clone();
        let lease = Duration::from_secs(settings.queue.lease_secs);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(lease / 4).await;
                if let Err(e) = rescuer.rescue(false).await {
                    tracing::warn!(error = %e, "re-queueing expired leases failed");
                }
            }
        });
        if let Some(days) = settings.storage.retention_days {
            let (catalog, blobs, queue) = (catalog.clone(), blobs.clone(), queue.clone());
            tokio::spawn(async move {
                loop {
                    crate::storage::sweep_finished_jobs(catalog.as_ref(), queue.as_ref(), blobs.as_ref(), days).await;
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            });
        }
        // Drafts expire while we run; a lookup already ignores an expired one, this frees its disk.
        let sweeper = drafts.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                if let Err(e) = sweeper.sweep(false).await {
                    tracing::warn!(error = %e, "deleting expired drafts failed");
                }
            }
        });
        let worker_count = settings.queue.worker_count();
        let blob_store: Arc<dyn BlobStore> = blobs;
        // Twelve hex digits tell replicas apart in worker ids, logs and /healthz.
        let instance: Arc<str> = uuid::Uuid::new_v4().simple().to_string()[..12].into();
        let workers = WorkerPool::start(
            &instance,
            worker_count,
            queue.clone(),
            blob_store.clone(),
            catalog.clone(),
            crate::scheduler::WorkerLimits {
                lease: Duration::from_secs(settings.queue.lease_secs),
                header_limit: settings.storage.max_header_bytes,
                memory_limit: settings.queue.job_memory_limit(),
                nice: settings.queue.job_nice,
            },
        );
        http::ops::prometheus();
        let state = AppState {
            settings: settings.clone(),
            queue,
            blobs: blob_store,
            catalog,
            workers_alive: workers.alive(),
            workers_expected: worker_count,
            openapi: Arc::default(),
            keys: crate::storage::keys::KeyStore::new(db.clone()),
            rate: crate::http::auth::rate_limiter(settings.auth.requests_per_second).map(Arc::new),
            uploads: Arc::new(tokio::sync::Semaphore::new(settings.storage.max_concurrent_uploads)),
            drafts,
            instance: instance.clone(),
        };
        tracing::info!(address = %listener.local_addr()?, workers = worker_count, %instance, "ModelPress listening");
        Ok(Application { listener, router: http::router(state), workers, settings, _lock: lock })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `signal` resolves, then shuts down: stop accepting and claiming, give
    /// running jobs their grace period (then re-queue them), give in-flight requests theirs.
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let header_timeout = Duration::from_secs(self.settings.server.header_read_timeout_secs);
        let server = tokio::spawn(serve(self.listener, self.router, header_timeout, stop_rx.clone()));
        signal.await;
        tracing::info!("shutdown requested: no new requests or jobs");
        let _ = stop_tx.send(true);
        self.workers.shutdown(Duration::from_secs(self.settings.queue.shutdown_grace_secs)).await;
        // axum's graceful shutdown waits for every connection without limit (an upload kept a
        // process alive 18 s in FACTS.md): bound it.
        let grace = Duration::from_secs(self.settings.server.shutdown_grace_secs);
        let abort = server.abort_handle();
        match tokio::time::timeout(grace, server).await {
            Ok(res) => res??,
            Err(_) => {
                abort.abort();
                tracing::warn!(grace_secs = grace.as_secs(), "in-flight requests cut off after the grace period")
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Accepts connections until `stop` turns true, then waits for the open ones to finish (the
/// caller bounds that wait). HTTP/1 and HTTP/2 as `axum::serve` does, plus a header read timeout.
async fn serve(
    listener: TcpListener,
    router: axum::Router,
    header_timeout: Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto::Builder;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = hyper_util::service::TowerToHyperService::new(router.clone());
                let (builder, watcher) = (builder.clone(), graceful.watcher());
                tokio::spawn(async move {
                    // hyper's header timeout starts once it knows the protocol: a client that
                    // sends nothing at all gets the same time for its first byte.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(header_timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            // The guard `wait_for` returns is not Send: drop it inside.
            () = async { drop(stop.wait_for(|s| *s).await) } => break,
        }
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
