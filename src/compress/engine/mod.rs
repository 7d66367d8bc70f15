//! The engine: runs a plan over a model one tensor at a time and writes every output.
//!
//! Memory is bounded by the largest tensor: each tensor is read with positioned I/O into reused
//! buffers, passed through its planned kernels and handed to every output sink before the next
//! is read. Steps that must see all tensors first (global pruning, mixed precision) get their own
//! read passes before the main one. Structural steps run before those, on the graph's tensors in
//! memory (`rewrite`), and an evaluation after the outputs are written and checked. Cancellation
//! and progress are checked between tensors, steps and evaluation batches.

pub mod embed_eval;
pub(crate) mod kernels;
mod passes;
mod rewrite;
mod sinks;
pub mod text_eval;
mod verify;

use crate::compress::spec::ReportDetail;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub(crate) use kernels::{quantize, Buffers};
pub use passes::PassCx;
pub use verify::{fingerprint, OutputCheck};

use super::ops::Scheme;
use super::plan::{EvaluationPlan, Kernel, Plan, PlannedAction, Refusal, TensorPlan};
use super::report::{peak_rss_bytes, OutputSummary, Report, StepTiming, TensorReport, Totals};
use super::spec::OutputFormat;
use crate::formats::gguf::llama_cpp::{self, LlamaCppModel};
use crate::formats::gguf::{GgufType, MetaValue, TensorInfo as GgufTensor};
use crate::formats::safetensors::{decode_f32, encode_f32_into, Dtype, TensorInfo, TensorReader};
use crate::graph::eval::{Dataset, EvalError, Evaluation};
use crate::graph::forward::{Network, Weights};
use crate::graph::Graph;
use kernels::Resolved;
use rewrite::Source;
use sinks::{QuantRef, Sink, TensorData};

/// What [`execute`] reads besides the plan: the input file and the hashes written into every
/// artifact as provenance.
pub struct Inputs<'a> {
    /// The safetensors file the plan's header was read from.
    pub model_path: &'a Path,
    /// SHA-256 (hex) of that file: known, or being computed alongside the job.
    pub input_sha256: InputSha<'a>,
    /// [`crate::compress::spec::work_sha256`] of the spec.
    pub spec_sha256: &'a str,
    /// The dataset file the plan's evaluation reads (required when the plan evaluates).
    pub dataset_path: Option<&'a Path>,
    /// The evaluation's own dataset (`evaluate.dataset_id`), when the plan has one.
    pub eval_dataset_path: Option<&'a Path>,
    /// The teacher's safetensors file when the plan has a separate teacher
    /// ([`crate::compress::plan::Plan::teacher_model`]).
    pub teacher_path: Option<&'a Path>,
    /// Where training steps keep checkpoints that survive a crash (a later attempt of the same
    /// job resumes from them); `None` trains without.
    pub checkpoint_dir: Option<&'a Path>,
}

impl<'a> Inputs<'a> {
    /// A model file alone: no dataset, no teacher, no checkpoints.
    pub fn model(model_path: &'a Path, input_sha256: &'a str, spec_sha256: &'a str) -> Inputs<'a> {
        Inputs {
            model_path,
            input_sha256: InputSha::Known(input_sha256),
            spec_sha256,
            dataset_path: None,
            eval_dataset_path: None,
            teacher_path: None,
            checkpoint_dir: None,
        }
    }
}

/// The SHA-256 of the input model: already known (the server has it from the upload), or
/// computed by another thread while the job runs (the CLI), so hashing is never a pass of its
/// own before the work. Outputs are written with [`InputSha::PLACEHOLDER`] in their headers and
/// the headers rewritten in place once the hash is known (same length).
#[derive(Clone, Copy)]
pub enum InputSha<'a> {
    Known(&'a str),
    Pending(&'a PendingSha),
}

impl InputSha<'_> {
    /// 64 hex digits, the width of the real value.
    pub const PLACEHOLDER: &'static str = "0000000000000000000000000000000000000000000000000000000000000000";

    /// The hash if known, else [`Self::PLACEHOLDER`].
    fn now(&self) -> &str {
        match self {
            InputSha::Known(s) => s,
            InputSha::Pending(p) => p.value.get().map_or(Self::PLACEHOLDER, |(sha, _)| sha.as_str()),
        }
    }

    /// The hash, waiting for its thread when pending.
    pub fn wait(&self) -> std::io::Result<&str> {
        match self {
            InputSha::Known(s) => Ok(s),
            InputSha::Pending(p) => p.wait(),
        }
    }
}

/// SHA-256 of a file, computed by a thread of its own (one core; SHA-256 is sequential), which
/// also learns each tensor's [`Facts`] from the bytes it hashes: the job can prove it read the
/// bytes the hash names (see [`execute`]: a file changed under the job fails it), and copy an
/// untouched tensor without reading it again.
pub struct PendingSha {
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<std::io::Result<Hashed>>>>,
    value: std::sync::OnceLock<Hashed>,
}

/// The input's SHA-256 (hex) and each tensor's [`Facts`], by [`TensorInfo::span`].
type Hashed = (String, HashMap<(u64, u64), Facts>);

/// A tensor's byte range in the input file, its element size, and whether the job may leave it
/// untouched (then the hash thread also counts its non-zero elements for the report).
#[derive(Debug, Clone, Copy)]
pub struct Region {
    pub start: u64,
    pub end: u64,
    /// Bytes per element (1, 2, 4 or 8).
    pub element: usize,
    pub untouched: bool,
}

impl Region {
    /// The regions of the plan's input tensors, in file order.
    pub fn of(plan: &Plan) -> Vec<Region> {
        let untouched: std::collections::HashSet<usize> =
            plan.tensors.iter().filter(|tp| tp.actions.is_empty()).map(|tp| tp.index).collect();
        let region = |(i, t): (usize, &TensorInfo)| Region {
            start: t.start,
            end: t.end,
            element: t.dtype.size(),
            untouched: untouched.contains(&i),
        };
        plan.header.tensors.iter().enumerate().map(region).collect()
    }
}

/// What the hash thread learned of one tensor's bytes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Facts {
    /// Their [`fingerprint`].
    pub print: u64,
    /// Elements that are not all-zero bytes, counted for untouched regions only.
    pub nonzeros: Option<u64>,
}

impl PendingSha {
    /// Starts hashing `path`; `tensors` are its tensors' regions in file order (the plan's,
    /// [`Region::of`]), whose [`Facts`] are recorded on the way.
    pub fn start(path: &Path, tensors: Vec<Region>) -> PendingSha {
        let path = path.to_owned();
        let thread = std::thread::spawn(move || sha256_and_facts(&path, &tensors));
        PendingSha { thread: std::sync::Mutex::new(Some(thread)), value: std::sync::OnceLock::new() }
    }

    /// The hash (hex), joining the thread the first time.
    pub fn wait(&self) -> std::io::Result<&str> {
        self.joined().map(|(sha, _)| sha.as_str())
    }

    /// Each tensor's [`Facts`] as the hash read its bytes, by [`TensorInfo::span`].
    pub fn facts(&self) -> std::io::Result<&HashMap<(u64, u64), Facts>> {
        self.joined().map(|(_, facts)| facts)
    }

    fn joined(&self) -> std::io::Result<&Hashed> {
        if let Some(v) = self.value.get() {
            return Ok(v);
        }
        let thread = self.thread.lock().expect("hash thread lock").take();
        if let Some(t) = thread {
            let done = t.join().map_err(|_| std::io::Error::other("the input hashing thread panicked"))??;
            let _ = self.value.set(done);
        }
        self.value.get().ok_or_else(|| std::io::Error::other("the input hash failed before"))
    }
}

/// SHA-256 (hex) of the file at `path`, read once in 1 MiB pieces, and the [`Facts`] of each of
/// `tensors` (in file order, not overlapping) from the same bytes.
fn sha256_and_facts(path: &Path, tensors: &[Region]) -> std::io::Result<Hashed> {
    use sha2::Digest;
    use std::os::unix::fs::FileExt;
    const PIECE: usize = 1 << 20;
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; PIECE];
    let mut facts = HashMap::with_capacity(tensors.len());
    // Hashes [from, to); as one tensor's bytes (`Some(count)`), learns their facts, counting
    // non-zeros with `count` = Some(element size).
    let mut span = |from: u64, to: u64, tensor: Option<Option<usize>>| -> std::io::Result<()> {
        let (mut pieces, mut nonzeros) = (Vec::new(), tensor.flatten().map(|_| 0));
        let mut at = from;
        while at < to {
            let n = PIECE.min((to - at) as usize);
            file.read_exact_at(&mut buf[..n], at)?;
            hasher.update(&buf[..n]);
            if let Some(count) = tensor {
                pieces.extend(buf[..n].chunks(verify::FINGERPRINT_CHUNK).map(verify::piece_fingerprint));
                if let (Some(size), Some(total)) = (count, nonzeros.as_mut()) {
                    *total += crate::formats::fingerprint::count_nonzero(&buf[..n], size);
                }
            }
            at += n as u64;
        }
        if tensor.is_some() {
            let print = verify::fold_fingerprints(&pieces, (to - from) as usize);
            facts.insert((from, to), Facts { print, nonzeros });
        }
        Ok(())
    };
    let mut at = 0;
    for r in tensors {
        span(at, r.start.max(at), None)?;
        span(r.start.max(at), r.end, Some(r.untouched.then_some(r.element)))?;
        at = r.end.max(at);
    }
    span(at, len.max(at), None)?;
    Ok((hex::encode(hasher.finalize()), facts))
}

/// SHA-256 (hex) and length of the file at `path`, read in 1 MiB pieces.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok((hex::encode(hasher.finalize()), total));
        }
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

/// One execution: the plan, its inputs and the directory it writes into.
struct Job<'a> {
    plan: &'a Plan,
    inputs: &'a Inputs<'a>,
    out_dir: &'a Path,
}

/// How the engine talks to whoever runs it (a server worker, the CLI, a benchmark).
pub trait Control: Sync {
    /// Called before each tensor of each pass; implementations throttle as they need.
    fn progress(&self, fraction: f64, step: &str, message: &str);
    fn canceled(&self) -> bool;
}

/// A control that never cancels and ignores progress (benchmarks, tests).
pub struct Silent;

impl Control for Silent {
    fn progress(&self, _: f64, _: &str, _: &str) {}
    fn canceled(&self) -> bool {
        false
    }
}

#[derive(Debug, Clone)]
pub struct ArtifactFile {
    /// Name under the job, e.g. `model.safetensors` or `compressed-tensors/config.json`.
    pub name: String,
    pub format: String,
    pub path: PathBuf,
}

#[derive(Debug)]
pub struct EngineOutput {
    pub artifacts: Vec<ArtifactFile>,
    pub report: Report,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("canceled")]
    Canceled,
    #[error("the plan refuses this spec: {}", .0.iter().map(|r| r.detail.as_str()).collect::<Vec<_>>().join("; "))]
    Refused(Vec<Refusal>),
    #[error("tensor `{tensor}`: {detail}")]
    Tensor { tensor: String, code: &'static str, detail: String },
    /// A failure of the job as a whole (a structural step's proof, the evaluation), not of one
    /// tensor.
    #[error("{detail}")]
    Job { code: &'static str, detail: String },
    #[error("I/O error: {0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for EngineError {
    /// An I/O error, or the job failure `input_changed` when a read found the input modified
    /// during the job ([`crate::formats::safetensors::InputChanged`]).
    fn from(e: std::io::Error) -> Self {
        match crate::formats::safetensors::InputChanged::find(&e) {
            Some(changed) => EngineError::Job { code: "input_changed", detail: changed.to_string() },
            None => EngineError::Io(e),
        }
    }
}

/// Progress over every pass, in bytes of tensors read; also the cancellation point.
pub struct Tracker<'a> {
    ctl: &'a dyn Control,
    total: u64,
    done: u64,
}

impl Tracker<'_> {
    fn check(&mut self, message: &str) -> Result<(), EngineError> {
        if self.ctl.canceled() {
            return Err(EngineError::Canceled);
        }
        // The total is an estimate (selection may take one pass or two; tie sharing adds one).
        let fraction = (self.done as f64 / self.total.max(1) as f64).min(1.0);
        self.ctl.progress(fraction, "compress", message);
        Ok(())
    }

    fn done(&mut self, bytes: u64) {
        self.done += bytes;
    }
}

/// Provenance written into every model artifact's metadata. Deterministic (no times, no job
/// ids) so a re-run after a crash produces byte-identical files.
/// The metadata outputs carry, with the input's hash as known now (see [`InputSha`]).
fn provenance(job: &Job<'_>) -> BTreeMap<String, String> {
    let mut meta = job.plan.header.metadata.clone();
    meta.insert("modelpress.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("modelpress.input_sha256".into(), job.inputs.input_sha256.now().into());
    meta.insert("modelpress.spec_sha256".into(), job.inputs.spec_sha256.into());
    meta
}

/// The GGUF type each tensor ends with, after mixed precision is resolved.
fn final_ggml(tp: &TensorPlan, resolved: &Resolved) -> Option<GgufType> {
    match &tp.actions.last()?.kernel {
        Kernel::Ggml(ty) => Some(*ty),
        Kernel::Auto { step } => match resolved.auto.get(&(*step, tp.name.clone()))? {
            Scheme::Ggml { ty, .. } => Some(*ty),
            Scheme::Int(_) => None,
        },
        _ => None,
    }
}

/// The companion files the folder outputs carry; `config.json` only while no structural step
/// changed the model's shapes.
fn folder_files(job: &Job<'_>) -> sinks::FolderFiles {
    let config_holds = job.plan.structure.is_empty() && job.plan.dropped.is_empty();
    sinks::FolderFiles { files: job.plan.files.clone(), config_holds }
}

fn open_sinks(
    job: &Job<'_>,
    resolved: &Resolved,
    labels: &BTreeMap<String, String>,
) -> std::io::Result<Vec<Box<dyn Sink>>> {
    let mut out: Vec<Box<dyn Sink>> = Vec::new();
    for f in &job.plan.spec.outputs {
        out.push(match f {
            OutputFormat::Safetensors => {
                let tensors: Vec<_> = job
                    .plan
                    .tensors
                    .iter()
                    .map(|tp| (tp.out.name.clone(), tp.out.dtype, tp.out.shape.clone()))
                    .collect();
                Box::new(sinks::DenseSink::create(
                    job.out_dir,
                    &tensors,
                    &provenance(job),
                    folder_files(job),
                    job.plan.spec.max_shard_bytes,
                )?)
            }
            OutputFormat::CompressedTensors => Box::new(sinks::CompressedTensorsSink::create(
                job.out_dir,
                folder_files(job),
                job.plan.spec.max_shard_bytes,
            )?),
            OutputFormat::Sparse => Box::new(sinks::SparseSink::create(job.out_dir)?),
            OutputFormat::Gguf => {
                let llama = job.plan.llama_cpp.as_ref();
                let mut tensors: Vec<GgufTensor> = job
                    .plan
                    .tensors
                    .iter()
                    .filter_map(|tp| {
                        let ty = crate::compress::layout::gguf_type_for(&tp.out, final_ggml(tp, resolved))?;
                        match llama {
                            None => Some(GgufTensor::new(&tp.out.name, &tp.out.shape, ty)),
                            Some(m) => m.names.get(&tp.out.name).map(|r| {
                                let ty = LlamaCppModel::storage_type(&tp.out.shape, ty);
                                GgufTensor::new(&r.name, &tp.out.shape, ty)
                            }),
                        }
                    })
                    .collect();
                let omitted: Vec<String> = job
                    .plan
                    .tensors
                    .iter()
                    .map(|tp| &tp.out)
                    .filter(|t| {
                        let name = llama.and_then(|m| m.names.get(&t.name)).map_or(&t.name, |r| &r.name);
                        !tensors.iter().any(|g| &g.name == name)
                    })
                    .map(|t| t.name.clone())
                    .collect();
                let schemes: Vec<String> = tensors
                    .iter()
                    .map(|t| format!("{}={}", t.name, labels.get(&t.name).map_or(t.ty.name(), |s| s)))
                    .collect();
                let mut meta = Vec::new();
                if let Some(m) = llama {
                    meta.extend(m.metadata.iter().cloned());
                    let matrices = tensors.iter().filter(|t| t.shape.len() >= 2).map(|t| t.ty);
                    // A named mix is its own file type (Q4_K_S and Q4_K_M share their common type).
                    let mix = job.plan.spec.steps.iter().rev().find_map(|s| match s {
                        super::ops::Step::Quantize(q) => match q.method {
                            super::ops::quantize::QuantMethod::Mix(m) => Some(m.file_type()),
                            _ => None,
                        },
                        _ => None,
                    });
                    let file_type = mix.unwrap_or_else(|| llama_cpp::file_type(matrices));
                    meta.push(("general.file_type".to_string(), MetaValue::from(file_type)));
                    if let Some(f) = &m.rope_freqs {
                        tensors.insert(0, GgufTensor::new(llama_cpp::ROPE_FREQS, &[f.len()], GgufType::F32));
                    }
                } else {
                    meta.push(("general.name".to_string(), MetaValue::from("modelpress output")));
                }
                meta.extend([
                    ("modelpress.version".to_string(), MetaValue::from(env!("CARGO_PKG_VERSION"))),
                    ("modelpress.input_sha256".to_string(), MetaValue::from(job.inputs.input_sha256.now())),
                    ("modelpress.spec_sha256".to_string(), MetaValue::from(job.inputs.spec_sha256)),
                    ("modelpress.tensor_schemes".to_string(), MetaValue::from(schemes)),
                    ("modelpress.omitted_tensors".to_string(), MetaValue::from(omitted)),
                ]);
                Box::new(sinks::GgufSink::create(job.out_dir, &tensors, &meta, llama)?)
            }
        });
    }
    Ok(out)
}

/// Executes `plan` (from [`crate::compress::plan::prepare`]) on `inputs`, writing every output
/// and `report.json`/`report.html` into `out_dir`, which must exist and be empty; the caller
/// owns it. Errors: the plan's refusals, a tensor the kernels refuse (NaN/Inf, a value the dtype
/// cannot hold, a layout that does not decode back), I/O, or cancellation through `ctl`.
pub fn execute(
    plan: &Plan,
    inputs: &Inputs<'_>,
    out_dir: &Path,
    ctl: &dyn Control,
) -> Result<EngineOutput, EngineError> {
    if !plan.refusals.is_empty() {
        return Err(EngineError::Refused(plan.refusals.clone()));
    }
    let started = Instant::now();
    let mut source = Source { reader: TensorReader::open(inputs.model_path)?, memory: Weights::new() };
    // Every tensor read is fingerprinted: two reads of one tensor must agree, and with the hash
    // computed alongside, each must equal what the hash read (checked below).
    source.reader.record_reads();
    // The dataset is read only by an evaluation and by structural steps (proof batches, ranking).
    let structural = plan.spec.steps.iter().any(|s| s.op().edit(plan.graph_def.is_some()).is_some());
    let data = match (&plan.dataset, inputs.dataset_path) {
        (Some(d), Some(path)) if plan.evaluation.as_ref().is_some_and(|e| !e.separate_dataset) || structural => {
            Some(Dataset::load(path, d)?)
        }
        _ => None,
    };
    let mut tracker = Tracker { ctl, total: plan.totals.bytes_in, done: 0 };
    let restructured = rewrite::restructure(plan, &mut source, inputs, data.as_ref(), &mut tracker)?;
    let (plan, final_graph, structure, mut before) = match restructured {
        Some(r) => (std::borrow::Cow::Owned(r.plan), r.graph, r.records, r.before),
        None => (std::borrow::Cow::Borrowed(plan), plan.graph_def.clone(), Vec::new(), None),
    };
    let job = &Job { plan: &plan, inputs, out_dir };
    let main_bytes: u64 = job.plan.tensors.iter().map(|tp| tp.bytes_in).sum();
    let prepass_bytes: u64 = job
        .plan
        .tensors
        .iter()
        .flat_map(|tp| tp.actions.iter().map(move |a| (tp, a)))
        .map(|(tp, a)| job.plan.spec.steps[a.step].op().prepasses() as u64 * tp.bytes_in)
        .sum();
    tracker.total = main_bytes + prepass_bytes;
    let mut b = Buffers::default();
    let (mut resolved, mixed) = passes::resolve(job.plan, &mut source, &mut b, &mut tracker)?;

    let labels: BTreeMap<String, String> = job
        .plan
        .tensors
        .iter()
        .filter(|tp| !tp.actions.is_empty())
        .map(|tp| {
            let label = match final_ggml(tp, &resolved) {
                Some(ty) => ty.name().to_owned(),
                None => tp.actions.last().map(|a| a.scheme.clone()).unwrap_or_default(),
            };
            (tp.name.clone(), label)
        })
        .collect();
    let mut sinks = open_sinks(job, &resolved, &labels)?;
    let mut steps: Vec<StepTiming> = job
        .plan
        .spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| StepTiming { step: i, op: s.kind().name().into(), milliseconds: 0.0, tensors: 0 })
        .collect();
    let mut reports = Vec::with_capacity(job.plan.tensors.len());
    // Fingerprint of every tensor's dense bytes, for the agreement check of the written layouts.
    let mut expected = std::collections::HashMap::with_capacity(job.plan.tensors.len());
    let mut dense = Vec::new();
    // With an evaluation: the tensors of the original graph as read (unless the structural
    // phase kept them) and those of the final graph as written, for the forward passes.
    let evaluating = job.plan.evaluation.is_some();
    let before_names = match (&job.plan.graph_def, evaluating && before.is_none()) {
        (Some(g), true) => g.tensor_names(),
        _ => Default::default(),
    };
    let after_names = match (&final_graph, evaluating) {
        (Some(g), true) => g.tensor_names(),
        _ => Default::default(),
    };
    let (mut before_values, mut after) = (Weights::new(), Weights::new());

    // A second handle on the input: unchanged tensors are copied from it file to file.
    let input_file = source.reader.file().try_clone()?;
    // An untouched tensor that every output copies file to file is never read into memory. With
    // the hash computed alongside it is not read by this pass at all (the hash thread reads it
    // anyway and learns its figures); otherwise its figures come from one parallel piecewise read.
    let hashed_alongside = matches!(job.inputs.input_sha256, InputSha::Pending(_));
    let copy_unread = sinks.iter().all(|s| s.copies_raw());
    // (index in `reports`, span, element size) of the tensors copied unread whose figures come
    // from the hash.
    let mut copied_unread = Vec::new();
    // Every tensor copied unread by name: only the output check reads its bytes.
    let mut copied_spans = HashMap::new();
    let source_file = &mut source;
    for tp in &job.plan.tensors {
        let (src, t) = (&job.plan.header.tensors[tp.index], &tp.out);
        tracker.check(&format!("tensor {}", t.name))?;
        let t0 = Instant::now();
        let mut notes: Vec<String> = tp.skipped.iter().map(|s| format!("step {}: {}", s.step, s.reason)).collect();
        notes.extend(tp.notes.iter().cloned());
        if tp.actions.is_empty() && copy_unread && !before_names.contains(&t.name) && !after_names.contains(&t.name) {
            for sink in &mut sinks {
                sink.copy_raw(t, &input_file, src.start)?;
            }
            copied_spans.insert(t.name.clone(), src.span());
            if hashed_alongside {
                copied_unread.push((reports.len(), src.span(), src.dtype.size()));
                reports.push(unchanged_report(t, 0, notes, t0));
            } else {
                let element = Some(src.dtype.size());
                let (print, nonzeros) =
                    crate::formats::fingerprint::file_range_facts(&input_file, src.start, src.bytes(), element)?;
                expected.insert(t.name.clone(), print);
                reports.push(unchanged_report(t, nonzeros, notes, t0));
            }
        } else if tp.actions.is_empty() {
            // Fingerprinted once, by the pass that also counts: the reader records that print.
            let raw = source_file.reader.read_raw_unnoted(src)?;
            for sink in &mut sinks {
                sink.write_raw(t, raw, &input_file, src.start)?;
            }
            let (print, nonzeros) = crate::formats::fingerprint::bytes_facts(raw, t.dtype.size());
            expected.insert(t.name.clone(), print);
            if before_names.contains(&t.name) || after_names.contains(&t.name) {
                let mut values = vec![0f32; t.numel()];
                decode_f32(raw, t.dtype, &mut values);
                if before_names.contains(&t.name) {
                    before_values.insert(t.name.clone(), (t.shape.clone(), values.clone()));
                }
                if after_names.contains(&t.name) {
                    after.insert(t.name.clone(), (t.shape.clone(), values));
                }
            }
            source_file.reader.note(src, print)?;
            reports.push(unchanged_report(t, nonzeros, notes, t0));
        } else {
            source_file.read(job.plan, tp, &mut b.orig, true)?;
            par_copy(&mut b.work, &b.orig);
            // Between the steps of a tensor: progress moves and a cancel stops.
            let (ctl, total) = (tracker.ctl, tracker.total.max(1) as f64);
            let (done, bytes) = (tracker.done as f64, src.bytes() as f64);
            let between_steps = |k: usize, n: usize| {
                let fraction = ((done + bytes * k as f64 / n as f64) / total).min(1.0);
                ctl.progress(fraction, "compress", &format!("tensor {}: step {}/{n}", t.name, k + 1));
                ctl.canceled()
            };
            let hooks = kernels::Hooks { between_steps: &between_steps, canceled: &|| ctl.canceled() };
            let outcome = kernels::apply(t, &tp.actions, None, &mut b, &mut resolved, Some(&mut steps), hooks)?;
            let pruned = tp.actions.iter().any(PlannedAction::zeroes);
            let structural_only = tp.actions.iter().all(|a| matches!(a.kernel, Kernel::Rewritten { .. }));
            // The error against the original, unless a structural rewrite alone made the tensor
            // (not an approximation of anything) or the spec asks for a summary report.
            let measured = !structural_only && job.plan.spec.report == ReportDetail::Full;
            let done = finalize(t, &mut b.work, measured.then_some(b.orig.as_slice()), &mut dense)?;
            expected.insert(t.name.clone(), done.fingerprint);
            if before_names.contains(&src.name) && !rewrite::rewritten(tp) {
                before_values.insert(src.name.clone(), (src.shape.clone(), b.orig.clone()));
            }
            if after_names.contains(&t.name) {
                after.insert(t.name.clone(), (t.shape.clone(), b.work.clone()));
            }
            let data = TensorData::Values {
                values: &b.work,
                dense: dense_bytes(t.dtype, &b.work, &dense),
                quant: QuantRef::new(outcome.quant, &b.int, &b.ggml),
                pruned,
            };
            for sink in &mut sinks {
                sink.write(t, &data)?;
            }
            notes.extend(outcome.notes);
            let nonzeros = done.nonzeros;
            let (bytes_out, bits) = match (&tp.actions.last().map(|a| &a.kernel), final_ggml(tp, &resolved)) {
                (Some(Kernel::Auto { step }), _) => {
                    let scheme = resolved.auto[&(*step, tp.name.clone())];
                    let bits = super::ops::quantize::scheme_bits(&scheme, t);
                    ((bits * t.numel() as f64 / 8.0).round() as u64, bits)
                }
                _ => (tp.bytes_out, tp.bits_per_weight),
            };
            let n = t.numel().max(1) as f64;
            // A tensor the structural steps created (a factor) had no input bytes of its own.
            let created = src.name != t.name;
            reports.push(TensorReport {
                name: t.name.clone(),
                shape_in: if created { Vec::new() } else { src.shape.clone() },
                shape_out: t.shape.clone(),
                dtype_in: src.dtype.as_str().into(),
                dtype_out: t.dtype.as_str().into(),
                scheme: outcome.labels.join(" + "),
                bytes_in: if created { 0 } else { src.bytes() },
                bytes_out,
                bits_per_weight: bits,
                parameters: t.numel() as u64,
                nonzeros,
                sparsity: 1.0 - nonzeros as f64 / n,
                requested_sparsity: outcome.requested_sparsity,
                error: done.error,
                rtn_relative_error: outcome.rtn_relative_error,
                milliseconds: t0.elapsed().as_secs_f64() * 1e3,
                notes,
            });
        }
        tracker.done(tp.bytes_in);
    }
    for d in &job.plan.dropped {
        if let Some(t) = job.plan.header.get(&d.name) {
            reports.push(TensorReport {
                shape_out: Vec::new(),
                scheme: "dropped".into(),
                bytes_out: 0,
                bits_per_weight: 0.0,
                parameters: 0,
                nonzeros: 0,
                sparsity: 0.0,
                ..unchanged_report(t, 0, vec![format!("step {}: {}", d.step, d.reason)], Instant::now())
            });
        }
    }
    tracker.check("writing outputs")?;

    // Every header gets the input's hash now: wait for it if another thread computes it, and
    // prove the job read the bytes the hash names.
    job.inputs.input_sha256.wait()?;
    if let InputSha::Pending(p) = job.inputs.input_sha256 {
        let facts = p.facts()?;
        if let Some(read) = source.reader.read_prints() {
            same_bytes_as_hashed(&job.plan.header.tensors, facts, read)?;
        }
        // Tensors copied unread: their figures are the hash's (their copy is checked below).
        for (i, span, element) in copied_unread {
            let f = facts.get(&span).ok_or_else(|| {
                std::io::Error::other(format!("the input hash has no figures for tensor `{}`", reports[i].name))
            })?;
            let r = &mut reports[i];
            // A tensor the plan did not expect to leave untouched (a structural step's replanning)
            // was not counted by the hash thread: counted now.
            r.nonzeros = match f.nonzeros {
                Some(n) => n,
                None => {
                    let (start, end) = span;
                    crate::formats::fingerprint::file_range_facts(&input_file, start, end - start, Some(element))?.1
                }
            };
            r.sparsity = 1.0 - r.nonzeros as f64 / r.parameters.max(1) as f64;
            expected.insert(r.name.clone(), f.print);
        }
    }
    let metadata = provenance(job);
    let mut artifacts = Vec::new();
    for sink in sinks {
        artifacts.extend(sink.finish(&metadata)?);
    }
    tracker.check("checking that every output decodes to the dense values")?;
    // The check has buffers of its own: the main pass's go first, so the peak stays the main pass's.
    drop((b, dense));
    let outs: Vec<TensorInfo> = job.plan.tensors.iter().map(|tp| tp.out.clone()).collect();
    let checks = match verify::verify(&artifacts, &outs, &expected, job.plan.llama_cpp.as_ref()) {
        // A tensor copied unread that does not match what was learned of it: if the input's bytes
        // are no longer those, the file changed under the job (not a layout fault).
        Err(EngineError::Tensor { tensor, code: "layout_mismatch", detail }) => {
            let changed = match (copied_spans.get(&tensor), expected.get(&tensor)) {
                (Some(&(start, end)), Some(&want)) => {
                    crate::formats::fingerprint::fingerprint_file_range(&input_file, start, end - start)? != want
                }
                _ => false,
            };
            return Err(match changed {
                true => EngineError::from(
                    crate::formats::safetensors::InputChanged {
                        tensor,
                        detail: "the bytes copied to the output are not the bytes it had when first read".into(),
                    }
                    .into_io(),
                ),
                false => EngineError::Tensor { tensor, code: "layout_mismatch", detail },
            });
        }
        other => other?,
    };
    if let Some(g) = &final_graph {
        let path = out_dir.join("graph.json");
        std::fs::write(&path, serde_json::to_vec_pretty(g).expect("graph JSON"))?;
        artifacts.push(ArtifactFile { name: "graph.json".into(), format: "graph".into(), path });
    }
    // The evaluation compares with the teacher when it is another model.
    let original = job.plan.teacher_model.as_ref().map(|t| &t.graph).or(job.plan.graph_def.as_ref());
    let eval_data = match (&job.plan.evaluation, job.inputs.eval_dataset_path) {
        (Some(e), Some(path)) if e.separate_dataset => Some(Dataset::load(path, &e.dataset)?),
        _ => None,
    };
    let evaluation = match (&job.plan.evaluation, original, &final_graph, eval_data.as_ref().or(data.as_ref())) {
        (Some(e), Some(original), Some(compressed), Some(data)) => {
            let before = before.take().unwrap_or(before_values);
            Some(evaluate(e, (original, &before), (compressed, &after), data, &mut tracker)?)
        }
        _ => None,
    };
    drop(after);
    // A language model's evaluation: a decoder's or an encoder's, by the plan.
    let (mut text_evaluation, mut embedding_evaluation) = (None, None);
    if let Some(t) = &job.plan.text_evaluation {
        let dataset = if t.separate_dataset { job.inputs.eval_dataset_path } else { job.inputs.dataset_path };
        let dataset = dataset.ok_or_else(|| EngineError::Job {
            code: "evaluation_failed",
            detail: "the evaluation's dataset file was not given".into(),
        })?;
        let artifact = artifacts.iter().find(|a| a.name == t.artifact).ok_or_else(|| EngineError::Job {
            code: "evaluation_failed",
            detail: format!("no `{}` was written", t.artifact),
        })?;
        tracker.check("text evaluation: loading the models")?;
        let files = &job.plan.files;
        let (model, path) = (job.inputs.model_path, &artifact.path);
        match t.model {
            text_eval::TextModel::Decoder => {
                text_evaluation = Some(text_eval::run(t, files, model, path, dataset, &mut tracker)?)
            }
            text_eval::TextModel::Encoder => {
                embedding_evaluation = Some(embed_eval::run(t, files, model, path, dataset, &mut tracker)?)
            }
        }
    }
    let outputs = artifacts
        .iter()
        .map(|a| {
            Ok(OutputSummary {
                format: a.format.clone(),
                artifact: a.name.clone(),
                bytes: std::fs::metadata(&a.path)?.len(),
            })
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let report = Report {
        engine: format!("modelpress {}", env!("CARGO_PKG_VERSION")),
        input_sha256: job.inputs.input_sha256.now().into(),
        spec_sha256: job.inputs.spec_sha256.into(),
        totals: Totals::from_tensors(&reports),
        tensors: reports,
        steps,
        mixed,
        outputs,
        checks,
        structure,
        evaluation,
        text_evaluation,
        embedding_evaluation,
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        peak_rss_bytes: peak_rss_bytes(),
    };
    let json_path = out_dir.join("report.json");
    std::fs::write(&json_path, serde_json::to_vec_pretty(&report).expect("report JSON"))?;
    artifacts.push(ArtifactFile { name: "report.json".into(), format: "report".into(), path: json_path });
    let html_path = out_dir.join("report.html");
    std::fs::write(&html_path, super::report_html::render(&report))?;
    artifacts.push(ArtifactFile { name: "report.html".into(), format: "report".into(), path: html_path });
    Ok(EngineOutput { artifacts, report })
}

/// Fails the job when a tensor's bytes as the job read them (`read`, [`fingerprint`]s) differ
/// from the bytes the input hash read (`hashed`): the file changed under the job, and its
/// provenance would name a hash of bytes it did not compress. Both by [`TensorInfo::span`].
fn same_bytes_as_hashed(
    tensors: &[TensorInfo],
    hashed: &HashMap<(u64, u64), Facts>,
    read: &HashMap<(u64, u64), u64>,
) -> Result<(), EngineError> {
    for t in tensors {
        if let (Some(h), Some(r)) = (hashed.get(&t.span()), read.get(&t.span())) {
            if h.print != *r {
                let detail = "the bytes the job compressed are not the bytes its input hash read".into();
                return Err(crate::formats::safetensors::InputChanged { tensor: t.name.clone(), detail }
                    .into_io()
                    .into());
            }
        }
    }
    Ok(())
}

/// Runs the original and the compressed model over the dataset; progress reports each batch.
fn evaluate(
    e: &EvaluationPlan,
    original: (&Graph, &Weights),
    compressed: (&Graph, &Weights),
    data: &Dataset,
    tracker: &mut Tracker<'_>,
) -> Result<Evaluation, EngineError> {
    let failed = |detail: String| EngineError::Job { code: "evaluation_failed", detail };
    tracker.check("evaluation: building the models")?;
    let before = Network::build(original.0, original.1).map_err(|err| failed(format!("the original model: {err}")))?;
    let after =
        Network::build(compressed.0, compressed.1).map_err(|err| failed(format!("the compressed model: {err}")))?;
    let options = crate::graph::eval::EvalOptions {
        inputs: e.inputs.clone(),
        labels: e.labels.clone(),
        batch_size: e.batch_size,
        limit: Some(e.samples),
        ..Default::default()
    };
    let ctl = tracker.ctl;
    let mut tick = |done: usize, total: usize| {
        ctl.progress(1.0, "evaluate", &format!("evaluation: {done}/{total} samples"));
        !ctl.canceled()
    };
    match crate::graph::eval::evaluate(&before, &after, data, &options, e.labels.clone(), &mut tick) {
        Ok(ev) => Ok(ev),
        Err(EvalError::Stopped) => Err(EngineError::Canceled),
        Err(err) => Err(failed(format!("evaluation: {err}"))),
    }
}

/// What [`finalize`] learned about a changed tensor on its way out.
struct Finalized {
    /// [`fingerprint`] of its dense bytes.
    fingerprint: u64,
    nonzeros: u64,
    /// Its error against the original, when one was given.
    error: Option<crate::compress::metrics::ErrorMetrics>,
}

/// One parallel pass over a changed tensor after its kernels: makes zeros positive, encodes
/// `values` into `dense` in the tensor's dtype and decodes them back (what the dtype holds),
/// refuses a non-finite result, and on the same cache-hot pieces counts non-zeros, sums the
/// error against `original` and fingerprints the bytes. Pieces are merged in order, so every
/// figure is independent of scheduling. An f32 tensor's dense bytes are its values' own bytes
/// ([`dense_bytes`]): `dense` is left empty and nothing is copied.
fn finalize(
    t: &TensorInfo,
    values: &mut [f32],
    original: Option<&[f32]>,
    dense: &mut Vec<u8>,
) -> Result<Finalized, EngineError> {
    use crate::compress::metrics::ErrorAccumulator;
    use rayon::prelude::*;
    struct Piece {
        fingerprint: u64,
        nonzeros: u64,
        error: ErrorAccumulator,
        non_finite: Option<usize>,
    }
    let size = t.dtype.size();
    let per = verify::FINGERPRINT_CHUNK / size;
    let original = original.filter(|o| o.len() == values.len());
    // One piece: `d` is where its encoding goes, `None` when the values' bytes are the encoding.
    let piece = |k: usize, v: &mut [f32], d: Option<&mut [u8]>| {
        // -0.0 + 0.0 = +0.0: the sparse layout stores zeros as absent bits and decodes them
        // as +0.0, so every changed tensor's zeros are made positive for all layouts to agree.
        v.iter_mut().for_each(|x| *x += 0.0);
        let fingerprint = match d {
            Some(d) => {
                encode_f32_into(v, t.dtype, d);
                if t.dtype != Dtype::F32 {
                    // What the narrower dtype holds, including an overflow to Inf, found below.
                    decode_f32(d, t.dtype, v);
                }
                verify::piece_fingerprint(d)
            }
            None => verify::piece_fingerprint(bytemuck::cast_slice(v)),
        };
        let mut error = ErrorAccumulator::default();
        if let Some(o) = original {
            error.add(&o[k * per..k * per + v.len()], v);
        }
        Piece {
            fingerprint,
            nonzeros: v.iter().filter(|x| **x != 0.0).count() as u64,
            error,
            non_finite: kernels::first_non_finite(v).map(|i| k * per + i),
        }
    };
    dense.clear();
    let pieces: Vec<Piece> = if values_are_dense(t.dtype) {
        values.par_chunks_mut(per).enumerate().map(|(k, v)| piece(k, v, None)).collect()
    } else {
        dense.resize(values.len() * size, 0);
        values
            .par_chunks_mut(per)
            .zip(dense.par_chunks_mut(per * size))
            .enumerate()
            .map(|(k, (v, d))| piece(k, v, Some(d)))
            .collect()
    };
    if let Some(i) = pieces.iter().find_map(|p| p.non_finite) {
        return Err(non_finite_output(t, i, values[i]));
    }
    let mut error = ErrorAccumulator::default();
    pieces.iter().for_each(|p| error.merge(&p.error));
    let prints: Vec<u64> = pieces.iter().map(|p| p.fingerprint).collect();
    Ok(Finalized {
        fingerprint: verify::fold_fingerprints(&prints, values.len() * size),
        nonzeros: pieces.iter().map(|p| p.nonzeros).sum(),
        error: original.map(|_| error.finish()),
    })
}

/// Whether f32 values in memory are already their dense encoding in `dtype` (f32 on a
/// little-endian machine: safetensors stores little-endian), so no copy is made.
pub(crate) fn values_are_dense(dtype: Dtype) -> bool {
    dtype == Dtype::F32 && cfg!(target_endian = "little")
}

/// The dense bytes of a finalized tensor: its values' own bytes when [`values_are_dense`],
/// else what [`finalize`] encoded into `dense`.
fn dense_bytes<'a>(dtype: Dtype, values: &'a [f32], dense: &'a [u8]) -> &'a [u8] {
    if values_are_dense(dtype) {
        bytemuck::cast_slice(values)
    } else {
        dense
    }
}

/// `dst` becomes a copy of `src`, copied by every core in pieces (a single-threaded copy of a
/// 64 MiB tensor is ~10 ms on the main thread's critical path). `dst` keeps its allocation.
pub(crate) fn par_copy(dst: &mut Vec<f32>, src: &[f32]) {
    use rayon::prelude::*;
    const PIECE: usize = 1 << 18;
    dst.resize(src.len(), 0.0);
    dst.par_chunks_mut(PIECE).zip(src.par_chunks(PIECE)).for_each(|(d, s)| d.copy_from_slice(s));
}

fn non_finite_output(t: &TensorInfo, i: usize, value: f32) -> EngineError {
    EngineError::Tensor {
        tensor: t.name.clone(),
        code: "non_finite_output",
        detail: format!(
            "the compressed value at flat index {i} is {value} in {}: it exceeds the dtype's largest finite value; exclude the tensor with `ignore` or use a scheme with a smaller range",
            t.dtype.as_str()
        ),
    }
}

fn unchanged_report(
    t: &crate::formats::safetensors::TensorInfo,
    nonzeros: u64,
    notes: Vec<String>,
    t0: Instant,
) -> TensorReport {
    TensorReport {
        name: t.name.clone(),
        shape_in: t.shape.clone(),
        shape_out: t.shape.clone(),
        dtype_in: t.dtype.as_str().into(),
        dtype_out: t.dtype.as_str().into(),
        scheme: "unchanged".into(),
        bytes_in: t.bytes(),
        bytes_out: t.bytes(),
        bits_per_weight: (t.dtype.size() * 8) as f64,
        parameters: t.numel() as u64,
        nonzeros,
        sparsity: 1.0 - nonzeros as f64 / t.numel().max(1) as f64,
        requested_sparsity: None,
        error: None,
        rtn_relative_error: None,
        milliseconds: t0.elapsed().as_secs_f64() * 1e3,
        notes,
    }
}

#[cfg(test)]
mod tests;
