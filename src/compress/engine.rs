//! The engine: runs a plan over a model one tensor at a time and writes every output.
//!
//! Memory is bounded by the largest tensor: each tensor is read with positioned I/O into reused
//! buffers, passed through its planned kernels and handed to every output sink before the next
//! is read. Cancellation and progress are checked between tensors (the unit of work).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::metrics::error_metrics;
use super::plan::{Kernel, Plan, Refusal};
use super::quant::{quantize_into, IntQuantized, QuantError};
use super::report::{peak_rss_bytes, OutputSummary, Report, StepTiming, TensorReport, Totals};
use super::spec::{CompressSpec, OutputFormat};
use crate::formats::safetensors::{encode_f32, Header, SafetensorsWriter, TensorInfo, TensorReader};

/// Everything one run needs. `out_dir` must exist and be empty; the caller owns it.
pub struct EngineJob<'a> {
    pub model_path: &'a Path,
    pub header: &'a Header,
    pub spec: &'a CompressSpec,
    pub plan: &'a Plan,
    pub out_dir: &'a Path,
    pub input_sha256: &'a str,
    pub spec_sha256: &'a str,
}

/// How the engine talks to whoever runs it (a server worker, the CLI, a benchmark).
pub trait Control: Sync {
    /// Called after each tensor; implementations throttle as they need.
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
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// What a sink receives for one tensor.
pub enum TensorData<'a> {
    /// Untouched: the bytes exactly as stored.
    Raw(&'a [u8]),
    /// Changed: final values plus the last quantization, if it still describes them.
    Values { values: &'a [f32], quant: Option<&'a IntQuantized> },
}

trait Sink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()>;
    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>>;
}

/// Dense safetensors: same names, shapes and dtypes; changed tensors hold their final values.
struct DenseSink {
    writer: SafetensorsWriter,
    path: PathBuf,
    buf: Vec<u8>,
}

impl Sink for DenseSink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
        match data {
            TensorData::Raw(raw) => self.writer.write(&t.name, t.dtype, &t.shape, raw),
            TensorData::Values { values, .. } => {
                self.buf.clear();
                encode_f32(values, t.dtype, &mut self.buf);
                self.writer.write(&t.name, t.dtype, &t.shape, &self.buf)
            }
        }
    }

    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>> {
        self.writer.finish(metadata)?;
        Ok(vec![ArtifactFile { name: "model.safetensors".into(), format: "safetensors".into(), path: self.path }])
    }
}

fn open_sink(format: OutputFormat, out_dir: &Path) -> std::io::Result<Box<dyn Sink>> {
    match format {
        OutputFormat::Safetensors => {
            let path = out_dir.join("model.safetensors");
            Ok(Box::new(DenseSink { writer: SafetensorsWriter::create(&path)?, path, buf: Vec::new() }))
        }
        other => Err(std::io::Error::other(format!("output `{}` is not available in this build", other.as_str()))),
    }
}

/// Provenance written into every model artifact's metadata. Deterministic (no times, no job
/// ids) so a re-run after a crash produces byte-identical files.
pub fn provenance(job: &EngineJob<'_>) -> BTreeMap<String, String> {
    let mut meta = job.header.metadata.clone();
    meta.insert("modelpress.version".into(), env!("CARGO_PKG_VERSION").into());
    meta.insert("modelpress.input_sha256".into(), job.input_sha256.into());
    meta.insert("modelpress.spec_sha256".into(), job.spec_sha256.into());
    meta
}

fn kernel_error(t: &TensorInfo, e: QuantError) -> EngineError {
    let code = match e {
        QuantError::NonFinite(_) => "non_finite_weights",
        _ => "kernel_error",
    };
    EngineError::Tensor { tensor: t.name.clone(), code, detail: e.to_string() }
}

pub fn run(job: &EngineJob<'_>, ctl: &dyn Control) -> Result<EngineOutput, EngineError> {
    if !job.plan.refusals.is_empty() {
        return Err(EngineError::Refused(job.plan.refusals.clone()));
    }
    let started = Instant::now();
    let mut sinks = job.spec.outputs.iter().map(|f| open_sink(*f, job.out_dir)).collect::<Result<Vec<_>, _>>()?;
    let mut reader = TensorReader::open(job.model_path)?;
    let (mut orig, mut work, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
    let mut quant = IntQuantized::default();
    let mut steps: Vec<StepTiming> = job
        .spec
        .steps
        .iter()
        .enumerate()
        .map(|(i, s)| StepTiming { step: i, op: s.op().into(), milliseconds: 0.0, tensors: 0 })
        .collect();
    let total_bytes: u64 = job.header.tensors.iter().map(|t| t.bytes()).sum::<u64>().max(1);
    let mut done_bytes = 0u64;
    let mut reports = Vec::with_capacity(job.header.tensors.len());

    for (t, tp) in job.header.tensors.iter().zip(&job.plan.tensors) {
        if ctl.canceled() {
            return Err(EngineError::Canceled);
        }
        let t0 = Instant::now();
        let notes: Vec<String> = tp.skipped.iter().map(|s| format!("step {}: {}", s.step, s.reason)).collect();
        if tp.actions.is_empty() {
            let raw = reader.read_raw(t)?;
            for sink in &mut sinks {
                sink.write(t, &TensorData::Raw(raw))?;
            }
            let nonzeros = count_nonzero_raw(raw, t);
            reports.push(TensorReport {
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
                error: None,
                milliseconds: t0.elapsed().as_secs_f64() * 1e3,
                notes,
            });
        } else {
            reader.read_f32(t, &mut orig)?;
            work.clear();
            work.extend_from_slice(&orig);
            scratch.resize(orig.len(), 0.0);
            let (rows, cols) = t.matrix();
            let mut quantized = false;
            for action in &tp.actions {
                let s0 = Instant::now();
                match &action.kernel {
                    Kernel::Int(p) => {
                        quantize_into(&work, rows, cols, p, &mut quant, &mut scratch)
                            .map_err(|e| kernel_error(t, e))?;
                        std::mem::swap(&mut work, &mut scratch);
                        quantized = true;
                    }
                }
                steps[action.step].milliseconds += s0.elapsed().as_secs_f64() * 1e3;
                steps[action.step].tensors += 1;
            }
            let data = TensorData::Values { values: &work, quant: quantized.then_some(&quant) };
            for sink in &mut sinks {
                sink.write(t, &data)?;
            }
            let nonzeros = work.iter().filter(|v| **v != 0.0).count() as u64;
            reports.push(TensorReport {
                name: t.name.clone(),
                shape_in: t.shape.clone(),
                shape_out: t.shape.clone(),
                dtype_in: t.dtype.as_str().into(),
                dtype_out: t.dtype.as_str().into(),
                scheme: tp.actions.iter().map(|a| a.scheme.as_str()).collect::<Vec<_>>().join(" + "),
                bytes_in: t.bytes(),
                bytes_out: tp.bytes_out,
                bits_per_weight: tp.bits_per_weight,
                parameters: t.numel() as u64,
                nonzeros,
                sparsity: 1.0 - nonzeros as f64 / t.numel().max(1) as f64,
                error: Some(error_metrics(&orig, &work)),
                milliseconds: t0.elapsed().as_secs_f64() * 1e3,
                notes,
            });
        }
        done_bytes += t.bytes();
        ctl.progress(done_bytes as f64 / total_bytes as f64, "compress", &format!("tensor {}", t.name));
    }

    if ctl.canceled() {
        return Err(EngineError::Canceled);
    }
    let metadata = provenance(job);
    let mut artifacts = Vec::new();
    for sink in sinks {
        artifacts.extend(sink.finish(&metadata)?);
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
        input_sha256: job.input_sha256.into(),
        spec_sha256: job.spec_sha256.into(),
        totals: Totals::from_tensors(&reports),
        tensors: reports,
        steps,
        outputs,
        duration_ms: started.elapsed().as_secs_f64() * 1e3,
        peak_rss_bytes: peak_rss_bytes(),
    };
    let report_path = job.out_dir.join("report.json");
    std::fs::write(&report_path, serde_json::to_vec_pretty(&report).expect("report JSON"))?;
    artifacts.push(ArtifactFile { name: "report.json".into(), format: "report".into(), path: report_path });
    Ok(EngineOutput { artifacts, report })
}

fn count_nonzero_raw(raw: &[u8], t: &TensorInfo) -> u64 {
    let size = t.dtype.size();
    raw.chunks_exact(size).filter(|c| c.iter().any(|b| *b != 0)).count() as u64
}
