//! The worker pool: claims jobs from the queue and runs them off the async runtime.

pub mod priority;
mod runner;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::storage::blobs::BlobStore;
use crate::storage::catalog::Catalog;
use crate::storage::queue::JobQueue;

pub use runner::{hash_file, CancelReason};

/// What every worker shares.
#[derive(Clone)]
pub struct WorkerContext {
    pub queue: Arc<dyn JobQueue>,
    pub blobs: Arc<dyn BlobStore>,
    pub catalog: std::sync::Arc<dyn Catalog>,
    pub lease: Duration,
    pub header_limit: u64,
    /// Largest peak memory a job's plan may predict (`queue.max_job_memory_bytes`, resolved).
    pub memory_limit: u64,
    /// How much lower than the API's the job threads' CPU priority is (`nice`).
    pub nice: i32,
    /// Flips to true on shutdown: stop claiming; running jobs get the grace period.
    pub stopping: watch::Receiver<bool>,
    /// Flips to true when the grace period is over: running jobs stop and are re-queued.
    pub abort: watch::Receiver<bool>,
}

/// Handle to the running pool.
pub struct WorkerPool {
    tasks: JoinSet<()>,
    /// Workers whose loop is alive (readiness reports it).
    alive: Arc<AtomicUsize>,
    stop_tx: watch::Sender<bool>,
    abort_tx: watch::Sender<bool>,
}

/// The settings every worker runs with.
#[derive(Debug, Clone, Copy)]
pub struct WorkerLimits {
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// Largest safetensors header a job reads.
    pub header_limit: u64,
    /// Largest peak memory a job's plan may predict.
    pub memory_limit: u64,
    /// How much lower than the API's the job threads' CPU priority is.
    pub nice: i32,
}

impl WorkerPool {
    /// Starts `count` worker loops named `<instance>-<n>`.
    pub fn start(
        instance: &str,
        count: usize,
        queue: Arc<dyn JobQueue>,
        blobs: Arc<dyn BlobStore>,
        catalog: std::sync::Arc<dyn Catalog>,
        limits: WorkerLimits,
    ) -> WorkerPool {
        let WorkerLimits { lease, header_limit, memory_limit, nice } = limits;
        priority::lower_kernel_pool(nice);
        let (stop_tx, stopping) = watch::channel(false);
        let (abort_tx, abort) = watch::channel(false);
        let alive = Arc::new(AtomicUsize::new(0));
        let mut tasks = JoinSet::new();
        for n in 0..count {
            let ctx = WorkerContext {
                queue: queue.clone(),
                blobs: blobs.clone(),
                catalog: catalog.clone(),
                lease,
                header_limit,
                memory_limit,
                nice,
                stopping: stopping.clone(),
                abort: abort.clone(),
            };
            let worker_id = format!("{instance}-{n}");
            let alive = alive.clone();
            tasks.spawn(async move {
                alive.fetch_add(1, Ordering::SeqCst);
                worker_loop(ctx, worker_id).await;
                alive.fetch_sub(1, Ordering::SeqCst);
            });
        }
        WorkerPool { tasks, alive, stop_tx, abort_tx }
    }

    pub fn alive(&self) -> Arc<AtomicUsize> {
        self.alive.clone()
    }

    /// Stops claiming, lets running jobs finish for `grace`, then stops them (they are released
    /// back to the queue) and waits for every worker to exit.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop_tx.send(true);
        let drained = tokio::time::timeout(grace, async { while self.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(grace_secs = grace.as_secs(), "jobs still running after the grace period; re-queueing them");
            let _ = self.abort_tx.send(true);
            while self.tasks.join_next().await.is_some() {}
        }
    }
}

async fn worker_loop(ctx: WorkerContext, worker_id: String) {
    let mut wake = ctx.queue.subscribe();
    let mut stopping = ctx.stopping.clone();
    loop {
        if *stopping.borrow() {
            return;
        }
        match ctx.queue.claim(&worker_id, ctx.lease).await {
            Ok(Some(job)) => {
                runner::run_job(&ctx, &worker_id, job).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, worker = %worker_id, "claim failed"),
        }
        // Idle: wake on any queue event, or poll for delayed retries and other processes' jobs.
        tokio::select! {
            _ = wake.recv() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = stopping.changed() => {}
        }
    }
}
