//! Runs one claimed job: heartbeat and cancel watch, the engine on a blocking thread inside the
//! job's span, throttled progress, artifact persistence, and the outcome.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use super::WorkerContext;
use crate::compress::engine::{self, Control, EngineError, Inputs};
use crate::compress::plan;
use crate::domain::job::{JobFailure, JobRecord, Progress};
use crate::domain::spec::JobSpec;
use crate::formats::safetensors::read_header;
use crate::storage::catalog::{ModelFile, ModelKind, NewModel};
use crate::storage::queue::{NewArtifact, Outcome, QueueError};

/// Why a running job's cancel flag was raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum CancelReason {
    None = 0,
    /// The user asked (`POST /v1/jobs/{id}/cancel`).
    User = 1,
    /// The process is shutting down past its grace period.
    Shutdown = 2,
    /// Another worker owns the job now (our lease expired).
    LeaseLost = 3,
}

/// Shared between the engine thread and the async side of one job.
struct JobControl {
    cancel: AtomicU8,
    /// Latest progress, picked up and stored by the throttling task.
    latest: Mutex<Option<Progress>>,
}

impl JobControl {
    fn reason(&self) -> CancelReason {
        match self.cancel.load(Ordering::SeqCst) {
            1 => CancelReason::User,
            2 => CancelReason::Shutdown,
            3 => CancelReason::LeaseLost,
            _ => CancelReason::None,
        }
    }

    fn raise(&self, reason: CancelReason) {
        let _ = self.cancel.compare_exchange(0, reason as u8, Ordering::SeqCst, Ordering::SeqCst);
    }
}

impl Control for JobControl {
    fn progress(&self, fraction: f64, step: &str, message: &str) {
        *self.latest.lock().expect("progress lock") =
            Some(Progress { fraction, step: Some(step.into()), message: Some(message.into()) });
    }

    fn canceled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) != 0
    }
}

/// How often the worker renews its lease and checks for a cancel request. Cancel latency is
/// this plus one unit of work.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// Tries at recording a job's outcome before leaving it to lease expiry.
const FINISH_ATTEMPTS: u32 = 5;
/// Progress is stored (and streamed) at most this often.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(300);

fn failure(code: &str, detail: impl Into<String>) -> JobFailure {
    JobFailure { code: code.into(), detail: detail.into() }
}

pub(super) async fn run_job(ctx: &WorkerContext, worker: &str, job: JobRecord) {
    let span = tracing::info_span!("job", job_id = %job.id, attempt = job.attempt, worker = %worker);
    async {
        let started = Instant::now();
        tracing::info!("job started");
        let (outcome, held) = execute(ctx, worker, &job).await;
        let label = match &outcome {
            Outcome::Succeeded(..) => "succeeded",
            Outcome::Failed(_) => "failed",
            Outcome::Canceled => "canceled",
            Outcome::Retry(_) => "retry",
            Outcome::Released => "released",
        };
        if let Outcome::Failed(f) | Outcome::Retry(f) = &outcome {
            tracing::warn!(code = %f.code, detail = %f.detail, "job did not succeed");
        }
        metrics::counter!("modelpress_jobs_finished_total", "outcome" => label).increment(1);
        metrics::histogram!("modelpress_job_duration_seconds", "outcome" => label)
            .record(started.elapsed().as_secs_f64());
        // A busy or briefly failing database must not strand the job as `running`: retry, then
        // leave it to lease expiry, which re-queues it.
        let mut recorded = false;
        for attempt in 1..=FINISH_ATTEMPTS {
            match ctx.queue.finish(&job.id, worker, outcome.clone()).await {
                Ok(done) => {
                    tracing::info!(status = %done.status, seconds = started.elapsed().as_secs_f64(), "job finished");
                    recorded = true;
                    break;
                }
                Err(QueueError::Db(e)) if attempt < FINISH_ATTEMPTS => {
                    tracing::warn!(error = %e, attempt, "recording the job's outcome failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not record the job's outcome (lease lost?)");
                    break;
                }
            }
        }
        // Artifacts no row came to name (the success was not recorded) go again, still under the
        // gate; a rescued attempt makes the same bytes and ingests them anew.
        if let (false, Outcome::Succeeded(artifacts, registered)) = (recorded, &outcome) {
            let mut shas: Vec<String> = artifacts.iter().map(|a| a.sha256.clone()).collect();
            shas.extend(registered.iter().map(|m| m.sha256.clone()));
            crate::storage::roll_back_blobs(ctx.catalog.as_ref(), ctx.blobs.as_ref(), &shas).await;
        }
        drop(held);
    }
    .instrument(span)
    .await
}

/// What a job keeps until its outcome is recorded.
#[derive(Default)]
struct Held {
    /// On success, the blob gate: held until the artifact rows commit.
    gate: Option<crate::storage::catalog::BlobGate>,
    /// The heartbeat task: the lease is renewed until the outcome is recorded, through the
    /// artifacts' upload and the wait for the gate (which other replicas may hold), so a slow
    /// ending is not mistaken for a dead worker.
    watcher: Option<AbortOnDrop>,
}

/// Aborts its task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs the job; also returns what must be held until its outcome is recorded.
async fn execute(ctx: &WorkerContext, worker: &str, job: &JobRecord) -> (Outcome, Held) {
    let mut held = Held::default();
    let outcome = execute_inner(ctx, worker, job, &mut held).await;
    (outcome, held)
}

/// The file of the dataset `id`, if given; a dataset deleted since the job was accepted fails
/// it, a storage error retries it.
async fn dataset_file(ctx: &WorkerContext, id: Option<&str>) -> Result<Option<std::path::PathBuf>, Outcome> {
    let Some(id) = id else { return Ok(None) };
    match ctx.catalog.get_model(ModelKind::Dataset, id).await {
        Ok(Some(d)) => match ctx.blobs.local_path(&d.sha256).await {
            Ok(p) => Ok(Some(p)),
            Err(e) => Err(Outcome::Retry(failure("storage_error", e.to_string()))),
        },
        Ok(None) => Err(Outcome::Failed(failure("dataset_not_found", format!("dataset {id} no longer exists")))),
        Err(e) => Err(Outcome::Retry(failure("database_error", e.to_string()))),
    }
}

async fn execute_inner(ctx: &WorkerContext, worker: &str, job: &JobRecord, held: &mut Held) -> Outcome {
    let spec = match JobSpec::from_stored(&job.spec, job.spec_version) {
        Ok(s) => s,
        Err(detail) => return Outcome::Failed(failure("invalid_spec", detail)),
    };
    let model = match ctx.catalog.get_model(ModelKind::Model, &job.model_id).await {
        Ok(Some(m)) => m,
        Ok(None) => {
            return Outcome::Failed(failure("model_not_found", format!("model {} no longer exists", job.model_id)))
        }
        Err(e) => return Outcome::Retry(failure("database_error", e.to_string())),
    };
    // With `student_model_id` the job trains the student; its model is the teacher.
    let (model, teacher) = match spec.compress.student_model_id() {
        None => (model, None),
        Some((_, id)) => match ctx.catalog.get_model(ModelKind::Model, id).await {
            Ok(Some(student)) => (student, Some(model)),
            Ok(None) => return Outcome::Failed(failure("model_not_found", format!("model {id} no longer exists"))),
            Err(e) => return Outcome::Retry(failure("database_error", e.to_string())),
        },
    };
    let teacher = match teacher {
        None => None,
        Some(t) => {
            let graph = match t.graph.as_deref().map(crate::graph::Graph::from_stored) {
                Some(Ok(g)) => g,
                Some(Err(e)) => return Outcome::Failed(failure("invalid_graph", e)),
                None => return Outcome::Failed(failure("plan_refused", "the teacher has no graph")),
            };
            match ctx.blobs.local_path(&t.sha256).await {
                Ok(p) => Some((graph, p)),
                Err(e) => return Outcome::Retry(failure("storage_error", e.to_string())),
            }
        }
    };
    let model_path = match ctx.blobs.local_path(&model.sha256).await {
        Ok(p) => p,
        Err(e) => return Outcome::Retry(failure("storage_error", e.to_string())),
    };
    let files = match crate::storage::model_files(ctx.catalog.as_ref(), ctx.blobs.as_ref(), &model.id).await {
        Ok(f) => f,
        Err(e) => return Outcome::Retry(failure("storage_error", e.to_string())),
    };
    let register = spec.register;
    let job_name = format!("{} (job {})", model.name.as_deref().unwrap_or(&model.id), job.id);
    let graph = match model.graph.as_deref().map(crate::graph::Graph::from_stored).transpose() {
        Ok(g) => g,
        Err(e) => return Outcome::Failed(failure("invalid_graph", e)),
    };
    let dataset_path = match dataset_file(ctx, spec.dataset_id.as_deref()).await {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let eval_path = match dataset_file(ctx, spec.eval_dataset_id.as_deref()).await {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let out_dir = ctx.blobs.staging_path("job");
    if let Err(e) = tokio::fs::create_dir_all(&out_dir).await {
        return Outcome::Retry(failure("storage_error", e.to_string()));
    }
    // The job's inputs, hard-linked where a blob cache cannot evict them while the job runs.
    let pins = ctx.blobs.staging_path("job-inputs");
    if let Err(e) = tokio::fs::create_dir_all(&pins).await {
        return Outcome::Retry(failure("storage_error", e.to_string()));
    }
    let _pins = crate::storage::blobs::DirGuard::new(pins.clone());
    let pin = |p: PathBuf| pin_input(&pins, p);
    let model_path = pin(model_path);
    let mut files = files;
    for path in files.files.values_mut() {
        *path = pin(std::mem::take(path));
    }
    let dataset_path = dataset_path.map(pin);
    let eval_path = eval_path.map(pin);
    let teacher = teacher.map(|(graph, path)| (graph, pin(path)));

    let control = Arc::new(JobControl { cancel: AtomicU8::new(0), latest: Mutex::new(None) });
    held.watcher =
        Some(AbortOnDrop(tokio::spawn(watch_job(ctx.clone(), worker.to_owned(), job.id.clone(), control.clone()))));

    let engine_control = control.clone();
    let (header_limit, memory_limit) = (ctx.header_limit, ctx.memory_limit);
    let (dir, sha) = (out_dir.clone(), model.sha256.clone());
    let checkpoints = ctx.blobs.checkpoint_dir(&job.id);
    let checkpoints_for_job = checkpoints.clone();
    let span = tracing::Span::current();
    let result = super::priority::run_job_thread(ctx.nice, move || {
        let _entered = span.enter();
        let teacher_path = teacher.as_ref().map(|(_, path)| path.clone());
        let f = plan::PlanFiles {
            model: &model_path,
            graph,
            dataset: dataset_path.as_deref(),
            eval_dataset: eval_path.as_deref(),
            teacher: teacher.map(|(graph, _)| graph).zip(teacher_path.as_deref()),
            files: Some(&files),
        };
        let plan = plan::prepare_from_files(spec.compress, f, header_limit, memory_limit)
            .map_err(|e| EngineError::Io(std::io::Error::other(e.to_string())))?;
        let inputs = Inputs {
            teacher_path: teacher_path.as_deref(),
            model_path: &model_path,
            input_sha256: engine::InputSha::Known(&sha),
            spec_sha256: &spec.work_sha256,
            dataset_path: dataset_path.as_deref(),
            eval_dataset_path: eval_path.as_deref(),
            checkpoint_dir: Some(&checkpoints_for_job),
        };
        let out = engine::execute(&plan, &inputs, &dir, engine_control.as_ref())?;
        metrics::counter!("modelpress_bytes_processed_total").increment(plan.totals.bytes_in);
        Ok::<_, EngineError>(out)
    })
    .await;

    let outcome = match result {
        Err(panic) => {
            let msg = panic_message(panic);
            tracing::error!(panic = %msg, "job panicked");
            Outcome::Failed(failure("internal_error", "the engine stopped on an internal error; the log has details"))
        }
        Ok(Ok(output)) => match prepare(ctx, &output.artifacts).await {
            Err(e) => io_outcome(&e),
            Ok(prepared) => {
                match ctx.catalog.blob_gate().await {
                    Ok(g) => held.gate = Some(g),
                    Err(e) => return Outcome::Retry(failure("database_error", e.to_string())),
                }
                match persist(ctx, &prepared).await {
                    Ok(artifacts) => {
                        match registration(ctx, &job_name, &job.owner, register, &artifacts, &out_dir).await {
                            Ok(r) => Outcome::Succeeded(artifacts, r),
                            Err(e) => io_outcome(&e),
                        }
                    }
                    Err(e) => io_outcome(&e),
                }
            }
        },
        Ok(Err(EngineError::Canceled)) => match control.reason() {
            CancelReason::User => Outcome::Canceled,
            _ => Outcome::Released,
        },
        Ok(Err(EngineError::Refused(r))) => {
            Outcome::Failed(failure("plan_refused", r.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>().join("; ")))
        }
        Ok(Err(EngineError::Tensor { code, detail, tensor })) => {
            Outcome::Failed(failure(code, format!("tensor `{tensor}`: {detail}")))
        }
        Ok(Err(EngineError::Job { code, detail })) => Outcome::Failed(failure(code, detail)),
        Ok(Err(EngineError::Io(e))) => io_outcome(&e),
    };
    if let Err(e) = tokio::fs::remove_dir_all(&out_dir).await {
        tracing::warn!(error = %e, dir = %out_dir.display(), "could not remove the job's staging dir");
    }
    // Checkpoints outlive an attempt the job will retry (a lost lease, a shutdown, an I/O error),
    // and nothing else.
    if !matches!(outcome, Outcome::Released | Outcome::Retry(_)) {
        let _ = tokio::fs::remove_dir_all(&checkpoints).await;
    }
    outcome
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    // The kind survives errors rewrapped with context; the raw code does when nothing rewrapped.
    if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull {
        Outcome::Failed(failure("insufficient_storage", "the disk is full; free space and submit the job again"))
    } else {
        Outcome::Retry(failure("io_error", e.to_string()))
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Renews the lease, turns cancel requests, lost leases and shutdown into the cancel flag, and
/// stores throttled progress.
async fn watch_job(ctx: WorkerContext, worker: String, id: String, control: Arc<JobControl>) {
    let mut abort = ctx.abort.clone();
    let mut last_progress = Instant::now() - PROGRESS_INTERVAL;
    let mut last_beat = Instant::now();
    let beat_every = (ctx.lease / 3).max(WATCH_INTERVAL);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_INTERVAL) => {}
            _ = abort.changed() => {}
        }
        if *abort.borrow() {
            control.raise(CancelReason::Shutdown);
        }
        // The heartbeat also reads the cancel flag, so it runs every tick; the lease itself
        // only needs renewing every `beat_every`, but one cheap UPDATE does both.
        match ctx.queue.heartbeat(&id, &worker, ctx.lease).await {
            Ok(state) if !state.held => control.raise(CancelReason::LeaseLost),
            Ok(state) if state.cancel_requested => control.raise(CancelReason::User),
            Ok(_) => last_beat = Instant::now(),
            Err(e) if last_beat.elapsed() > beat_every * 2 => {
                tracing::warn!(error = %e, "heartbeat failing; stopping the job before the lease expires");
                control.raise(CancelReason::LeaseLost);
            }
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
        if last_progress.elapsed() >= PROGRESS_INTERVAL {
            let latest = control.latest.lock().expect("progress lock").take();
            if let Some(p) = latest {
                if let Err(e) = ctx.queue.progress(&id, &worker, &p).await {
                    tracing::warn!(error = %e, "could not store progress");
                }
                last_progress = Instant::now();
            }
        }
    }
}

/// Hashes each artifact, moves it into the blob store and records the blob rows.
/// The model row `"register": true` creates from the persisted `model.safetensors` and
/// `graph.json` of a job.
async fn registration(
    ctx: &WorkerContext,
    name: &str,
    owner: &str,
    register: bool,
    artifacts: &[NewArtifact],
    out_dir: &Path,
) -> std::io::Result<Option<NewModel>> {
    if !register {
        return Ok(None);
    }
    let (sha256, bytes) = match artifacts.iter().find(|a| a.name == "model.safetensors") {
        Some(m) => (m.sha256.clone(), m.bytes),
        None => merge_for_registration(ctx, out_dir, artifacts).await?,
    };
    let path = ctx.blobs.local_path(&sha256).await?;
    let header = read_header(&path, u64::MAX).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tensors: Vec<serde_json::Value> = header
        .tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "dtype": t.dtype.as_str(), "shape": t.shape, "bytes": t.bytes()}))
        .collect();
    let graph = match artifacts.iter().find(|a| a.name == "graph.json") {
        Some(g) => Some(tokio::fs::read_to_string(ctx.blobs.local_path(&g.sha256).await?).await?),
        None => None,
    };
    Ok(Some(NewModel {
        kind: ModelKind::Model,
        name: Some(name.to_owned()),
        sha256,
        bytes,
        tensors: serde_json::to_string(&tensors).expect("tensor table JSON"),
        parameters: header.parameter_count() as i64,
        source_job: None,
        graph,
        owner: owner.to_owned(),
        tensor_count: header.tensors.len() as i64,
        // The dense output's folder files (config.json, tokenizer) travel with it.
        files: artifacts
            .iter()
            .filter(|a| crate::formats::hf::is_companion(&a.name))
            .map(|a| ModelFile { name: a.name.clone(), sha256: a.sha256.clone(), bytes: a.bytes })
            .collect(),
    }))
}

/// A sharded dense output merged into the one file a model is stored as (shards in the order
/// `safetensors.save_file` writes, as for an uploaded folder), stored as a blob: (sha256, bytes).
async fn merge_for_registration(
    ctx: &WorkerContext,
    out_dir: &Path,
    artifacts: &[NewArtifact],
) -> std::io::Result<(String, i64)> {
    use crate::formats::hf::{check_index, FolderError};
    use crate::formats::safetensors::sharded::INDEX_FILE;
    let index = artifacts
        .iter()
        .find(|a| a.name == INDEX_FILE)
        .ok_or_else(|| std::io::Error::other("registering needs the `safetensors` output"))?;
    let text = tokio::fs::read(ctx.blobs.local_path(&index.sha256).await?).await?;
    // Every safetensors file of the dense output, by name; the index says which are its shards
    // and is checked against them as an uploaded folder's is.
    let mut files = std::collections::HashMap::new();
    for a in artifacts.iter().filter(|a| a.format == "safetensors" && a.name.ends_with(".safetensors")) {
        files.insert(a.name.clone(), ctx.blobs.local_path(&a.sha256).await?);
    }
    let merged = out_dir.join("registered.safetensors");
    let out = merged.clone();
    let (sha, bytes) = tokio::task::spawn_blocking(move || {
        let open = |file: &str| {
            let path = files.get(file).ok_or_else(|| FolderError::MissingShard(file.into()))?;
            let header = read_header(path, u64::MAX).map_err(|e| FolderError::BadShard(file.into(), e.to_string()))?;
            Ok((path.clone(), header))
        };
        let shards = check_index(&text, open).map_err(std::io::Error::other)?;
        crate::formats::hf::merge_shards(&shards, &out, &|| false)?;
        hash_file(&out)
    })
    .await
    .expect("merge task")?;
    crate::storage::persist_blob(ctx.catalog.as_ref(), ctx.blobs.as_ref(), &merged, &sha, bytes).await?;
    Ok((sha, bytes as i64))
}

/// Hard-links an input's local file into `dir` under a fresh name, so the job reads it there even
/// if a blob cache evicts the blob meanwhile (the link keeps the bytes); the path as it is where
/// linking fails (another filesystem).
fn pin_input(dir: &Path, path: PathBuf) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let link = dir.join(format!("{}-{name}", uuid::Uuid::new_v4()));
    match std::fs::hard_link(&path, &link) {
        Ok(()) => link,
        Err(_) => path,
    }
}

/// Hashes each artifact and hands it to the blob store ahead of time (an object store uploads
/// it now, outside the blob gate: content-addressed, so nothing can name it yet).
async fn prepare(
    ctx: &WorkerContext,
    files: &[engine::ArtifactFile],
) -> std::io::Result<Vec<(engine::ArtifactFile, String, u64)>> {
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let path = f.path.clone();
        let (sha, bytes) = tokio::task::spawn_blocking(move || hash_file(&path)).await.expect("hash task")?;
        ctx.blobs.upload_ahead(&f.path, &sha).await?;
        out.push((f.clone(), sha, bytes));
    }
    Ok(out)
}

/// Moves the prepared artifacts into the blob store and records the blob rows (under the gate).
async fn persist(
    ctx: &WorkerContext,
    files: &[(engine::ArtifactFile, String, u64)],
) -> std::io::Result<Vec<NewArtifact>> {
    let mut out = Vec::with_capacity(files.len());
    for (f, sha, bytes) in files {
        crate::storage::persist_blob(ctx.catalog.as_ref(), ctx.blobs.as_ref(), &f.path, sha, *bytes).await?;
        out.push(NewArtifact {
            name: f.name.clone(),
            format: f.format.clone(),
            sha256: sha.clone(),
            bytes: *bytes as i64,
        });
    }
    Ok(out)
}

/// SHA-256 and length of a file, fsyncing it first so a persisted blob is durable.
pub fn hash_file(path: &Path) -> std::io::Result<(String, u64)> {
    std::fs::File::open(path)?.sync_all()?;
    engine::sha256_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_fails_the_job_while_other_io_errors_retry() {
        match io_outcome(&std::io::Error::from_raw_os_error(libc::ENOSPC)) {
            Outcome::Failed(f) => assert_eq!(f.code, "insufficient_storage"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(io_outcome(&std::io::Error::other("flaky NFS")), Outcome::Retry(_)));
    }
}
