//! Output sinks: each receives every tensor once, in processing order, and writes one layout.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::kernels::LastQuant;
use super::ArtifactFile;
use crate::compress::ggml;
use crate::compress::layout::compressed_tensors as ct;
use crate::compress::layout::compressed_tensors::scale_dtype;
use crate::compress::layout::packs_as_linear;
use crate::compress::layout::sparse_dtype;
use crate::compress::quant::{pack_int32_into, pack_zero_points, packed_len, Granularity, IntParams, IntQuantized};
use crate::formats::gguf::llama_cpp::{self, LlamaCppModel, Rename};
use crate::formats::gguf::GgufType;
use crate::formats::gguf::{GgufWriter, MetaValue, TensorInfo as GgufTensor};
use crate::formats::hf::ModelFiles;
use crate::formats::safetensors::sharded::{DeferredShards, PlannedShards};
use crate::formats::safetensors::{decode_f32, encode_f32, Dtype, SafetensorsWriter, TensorInfo};
use crate::formats::sparse::SparseEncoder;

/// What a sink receives for one tensor.
pub enum TensorData<'a> {
    /// Untouched: the bytes exactly as stored.
    Raw(&'a [u8]),
    /// Changed: the final values, the same values encoded in the tensor's dtype (what dense
    /// layouts store), the quantization that still describes them, and whether a prune step
    /// touched the tensor.
    Values { values: &'a [f32], dense: &'a [u8], quant: QuantRef<'a>, pruned: bool },
}

#[derive(Clone, Copy)]
pub enum QuantRef<'a> {
    None,
    Int(IntParams, &'a IntQuantized),
    Ggml(GgufType, &'a [u8]),
}

impl<'a> QuantRef<'a> {
    pub fn new(last: LastQuant, int: &'a IntQuantized, ggml: &'a [u8]) -> Self {
        match last {
            LastQuant::None => QuantRef::None,
            LastQuant::Int(p) => QuantRef::Int(p, int),
            LastQuant::Ggml(ty) => QuantRef::Ggml(ty, ggml),
        }
    }
}

pub trait Sink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()>;
    /// An untouched tensor whose bytes `raw` are also at `offset` in `source`: a sink that
    /// stores them as they are may copy them file to file instead.
    fn write_raw(&mut self, t: &TensorInfo, raw: &[u8], _source: &std::fs::File, _offset: u64) -> std::io::Result<()> {
        self.write(t, &TensorData::Raw(raw))
    }
    /// Whether [`Self::copy_raw`] stores an untouched tensor without its bytes being read.
    fn copies_raw(&self) -> bool {
        false
    }
    /// An untouched tensor of `t.bytes()` bytes at `offset` in `source`, copied without being
    /// read by the caller; only called when [`Self::copies_raw`].
    fn copy_raw(&mut self, t: &TensorInfo, _source: &std::fs::File, _offset: u64) -> std::io::Result<()> {
        Err(std::io::Error::other(format!("tensor `{}`: this layout cannot copy a tensor unread", t.name)))
    }
    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>>;
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// A GGUF error as an I/O error, keeping the kind of an underlying I/O error (a full disk must
/// fail the job as `insufficient_storage` at once, not be retried as a generic I/O error).
fn gguf_err(e: crate::formats::gguf::GgufError) -> std::io::Error {
    match e {
        crate::formats::gguf::GgufError::Io { context, source } => {
            std::io::Error::new(source.kind(), format!("{context}: {source}"))
        }
        other => io_err(other),
    }
}

impl TensorData<'_> {
    /// The tensor's bytes in its own dtype.
    fn dense(&self) -> &[u8] {
        match self {
            TensorData::Raw(raw) => raw,
            TensorData::Values { dense, .. } => dense,
        }
    }
}

/// Writes the dense form of a tensor (its bytes in its own dtype).
fn write_dense(w: &mut SafetensorsWriter, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
    w.write(&t.name, t.dtype, &t.shape, data.dense())
}

fn artifact(dir: &Path, name: &str, format: &str) -> ArtifactFile {
    ArtifactFile { name: name.into(), format: format.into(), path: dir.join(name) }
}

/// The model folder's files an output folder carries (see [`FolderFiles::write`]).
#[derive(Clone, Default)]
pub struct FolderFiles {
    pub files: ModelFiles,
    /// Whether the input's `config.json` still describes the output (no structural step changed
    /// a shape or removed a tensor); when not, it is left out and the tokenizer files still go.
    pub config_holds: bool,
}

impl FolderFiles {
    /// Writes the companions into `dir` (artifacts named `prefix` + file name, of `format`):
    /// `config.json` with `quantization_config` merged in when given (its `architectures`,
    /// `model_type`, `torch_dtype` kept), the other files copied. Without a model config,
    /// `quantization_config` alone makes the `config.json`.
    fn write(
        &self,
        dir: &Path,
        prefix: &str,
        format: &str,
        quantization_config: Option<serde_json::Value>,
    ) -> std::io::Result<Vec<ArtifactFile>> {
        let parent = dir.ancestors().nth(prefix.matches('/').count()).expect("job dir").to_path_buf();
        let mut out = Vec::new();
        let model_config = match (self.config_holds, self.files.json("config.json")) {
            (true, Ok(c)) => c,
            (false, _) => None,
            (true, Err(e)) => return Err(std::io::Error::other(e.to_string())),
        };
        let config = match (model_config, quantization_config) {
            (Some(mut c), Some(q)) if c.is_object() => {
                c["quantization_config"] = q;
                Some(c)
            }
            (Some(c), None) => Some(c),
            (_, Some(q)) => Some(json!({ "quantization_config": q })),
            (None, None) => None,
        };
        if let Some(c) = config {
            std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&c).expect("config JSON"))?;
            out.push(artifact(&parent, &format!("{prefix}config.json"), format));
        }
        for (name, path) in self.files.files.iter().filter(|(n, _)| n.as_str() != "config.json") {
            std::fs::copy(path, dir.join(name))?;
            out.push(artifact(&parent, &format!("{prefix}{name}"), format));
        }
        Ok(out)
    }
}

/// Dense safetensors: same names, shapes and dtypes; changed tensors hold their final values.
/// Every size is known before the first tensor, so each shard's header goes first and data is
/// written once; above `max_shard_bytes` the output is sharded as transformers shards it.
pub struct DenseSink {
    writer: PlannedShards,
    dir: PathBuf,
    folder: FolderFiles,
}

impl DenseSink {
    pub fn create(
        dir: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
        folder: FolderFiles,
        max_shard_bytes: u64,
    ) -> std::io::Result<Self> {
        let writer = PlannedShards::create(dir, tensors, metadata, max_shard_bytes)?;
        Ok(Self { writer, dir: dir.into(), folder })
    }
}

impl Sink for DenseSink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
        self.writer.write(&t.name, data.dense())
    }

    fn write_raw(&mut self, t: &TensorInfo, _raw: &[u8], source: &std::fs::File, offset: u64) -> std::io::Result<()> {
        self.copy_raw(t, source, offset)
    }

    fn copies_raw(&self) -> bool {
        true
    }

    fn copy_raw(&mut self, t: &TensorInfo, source: &std::fs::File, offset: u64) -> std::io::Result<()> {
        self.writer.copy_from(&t.name, source, offset, t.bytes())
    }

    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>> {
        // The headers written at creation may hold a placeholder for the input's hash.
        let files = self.writer.finish_with_metadata(metadata)?;
        let mut out: Vec<ArtifactFile> = files.iter().map(|f| artifact(&self.dir, f, "safetensors")).collect();
        out.extend(self.folder.write(&self.dir, "", "safetensors", None)?);
        Ok(out)
    }
}

/// The vLLM compressed-tensors `pack-quantized` layout: int-quantized matrices as
/// `weight_packed` / `weight_scale` / `weight_zero_point` / `weight_shape`, everything else dense
/// and, when it is a module's weight, listed in `ignore` (the reference loader treats every
/// `*.weight` as a target otherwise).
pub struct CompressedTensorsSink {
    writer: DeferredShards,
    dir: PathBuf,
    buf: Vec<u8>,
    words: Vec<i32>,
    /// Scheme -> module names stored packed with it.
    groups: BTreeMap<String, (IntParams, Vec<String>)>,
    ignore: BTreeSet<String>,
    /// Whether the file holds an `lm_head` module (absent when tied to the embeddings).
    lm_head: bool,
    folder: FolderFiles,
}

impl CompressedTensorsSink {
    pub fn create(dir: &Path, folder: FolderFiles, max_shard_bytes: u64) -> std::io::Result<Self> {
        let dir = dir.join("compressed-tensors");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            writer: DeferredShards::new(&dir, max_shard_bytes),
            dir,
            buf: Vec::new(),
            words: Vec::new(),
            groups: BTreeMap::new(),
            ignore: BTreeSet::new(),
            lm_head: false,
            folder,
        })
    }

    fn write_packed(&mut self, t: &TensorInfo, p: &IntParams, q: &IntQuantized) -> std::io::Result<()> {
        let module = ct::module_of(&t.name).to_owned();
        let (rows, cols) = (q.rows, q.cols);
        let width = packed_len(cols, q.bits);
        let sd = scale_dtype(t.dtype);
        // A module's parts share a file: loaders find them through the index either way, but
        // the output check decodes a module from one file.
        let zero_bytes = match (&q.zero_points, p.granularity) {
            (None, _) => 0,
            (Some(_), Granularity::Tensor) => 1,
            (Some(_), _) => packed_len(q.scale_shape[0], q.bits) * q.scale_shape[1] * 4,
        };
        let scale_count = if p.granularity == Granularity::Tensor { 1 } else { q.scales.len() };
        self.writer.reserve((rows * width * 4 + scale_count * sd.size() + zero_bytes + 16) as u64)?;
        self.words.resize(rows * width, 0);
        pack_int32_into(&q.codes, rows, cols, q.bits, &mut self.words);
        self.buf.clear();
        self.words.iter().for_each(|w| self.buf.extend_from_slice(&w.to_le_bytes()));
        self.writer.write(&ct::part_name(&module, "weight_packed"), Dtype::I32, &[rows, width], &self.buf)?;

        let scale_shape: Vec<usize> = match p.granularity {
            Granularity::Tensor => vec![1],
            _ => q.scale_shape.to_vec(),
        };
        self.buf.clear();
        encode_f32(&q.scales, sd, &mut self.buf);
        self.writer.write(&ct::part_name(&module, "weight_scale"), sd, &scale_shape, &self.buf)?;

        if let Some(zps) = &q.zero_points {
            self.buf.clear();
            let shape = match p.granularity {
                Granularity::Tensor => {
                    self.buf.extend(zps.iter().map(|z| *z as u8));
                    (vec![1], Dtype::I8)
                }
                _ => {
                    let [zr, zg] = q.scale_shape;
                    let packed = pack_zero_points(zps, zr, zg, q.bits);
                    packed.iter().for_each(|w| self.buf.extend_from_slice(&w.to_le_bytes()));
                    (vec![packed_len(zr, q.bits), zg], Dtype::I32)
                }
            };
            self.writer.write(&ct::part_name(&module, "weight_zero_point"), shape.1, &shape.0, &self.buf)?;
        }
        self.buf.clear();
        [rows as i64, cols as i64].iter().for_each(|v| self.buf.extend_from_slice(&v.to_le_bytes()));
        self.writer.write(&ct::part_name(&module, "weight_shape"), Dtype::I64, &[2], &self.buf)?;
        let key = crate::compress::ops::quantize::int_scheme_name(p);
        self.groups.entry(key).or_insert_with(|| (*p, Vec::new())).1.push(module);
        Ok(())
    }
}

impl Sink for CompressedTensorsSink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
        self.lm_head |= ct::module_of(&t.name) == "lm_head";
        if let TensorData::Values { quant: QuantRef::Int(p, q), .. } = data {
            if packs_as_linear(t) {
                return self.write_packed(t, &p.clone(), q);
            }
        }
        if t.name.ends_with(".weight") {
            self.ignore.insert(ct::module_of(&t.name).to_owned());
        }
        let bytes = data.dense();
        self.writer.reserve(bytes.len() as u64)?;
        self.writer.write(&t.name, t.dtype, &t.shape, bytes)
    }

    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>> {
        let mut meta = metadata.clone();
        meta.insert("format".into(), "pt".into());
        let files = self.writer.finish(&meta)?;
        let mut ignore = self.ignore;
        if !self.lm_head && self.groups.len() == 1 {
            // A single scheme targets every `Linear`: a tied `lm_head` (absent from the file,
            // shared with the embeddings) would be matched and its packed weight looked for,
            // which fails the load; ignoring it keeps the loader's tied weight.
            ignore.insert("lm_head".into());
        }
        let q = ct::quantization_config(&self.groups, &ignore);
        let parent = self.dir.parent().expect("job dir").to_path_buf();
        let mut out: Vec<ArtifactFile> =
            files.iter().map(|f| artifact(&parent, &format!("compressed-tensors/{f}"), "compressed-tensors")).collect();
        out.extend(self.folder.write(&self.dir, "compressed-tensors/", "compressed-tensors", Some(q))?);
        Ok(out)
    }
}

/// GGUF through the streaming writer; the tensor list is fixed when the sink opens. For a
/// llama.cpp GGUF, tensors are renamed, Q/K rows permuted (on the encoded rows: every block
/// type encodes rows independently, so this equals permuting before quantizing) and 1-D
/// tensors stored as F32.
pub struct GgufSink {
    writer: Option<GgufWriter<std::io::BufWriter<std::fs::File>>>,
    /// The metadata written at creation; `finish` rewrites the input's hash in it.
    metadata: Vec<(String, MetaValue)>,
    /// Planned type by the name the tensor is written under.
    types: BTreeMap<String, GgufType>,
    renames: BTreeMap<String, Rename>,
    dir: PathBuf,
    buf: Vec<u8>,
    permuted: Vec<u8>,
    values: Vec<f32>,
}

impl GgufSink {
    pub fn create(
        dir: &Path,
        tensors: &[GgufTensor],
        metadata: &[(String, MetaValue)],
        llama: Option<&LlamaCppModel>,
    ) -> std::io::Result<Self> {
        let mut writer = GgufWriter::create(&dir.join("model.gguf"), metadata, tensors).map_err(gguf_err)?;
        if let Some(factors) = llama.and_then(|m| m.rope_freqs.as_ref()) {
            let bytes: Vec<u8> = factors.iter().flat_map(|f| f.to_le_bytes()).collect();
            writer.write_tensor(llama_cpp::ROPE_FREQS, &bytes).map_err(gguf_err)?;
        }
        let types = tensors.iter().map(|t| (t.name.clone(), t.ty)).collect();
        Ok(Self {
            writer: Some(writer),
            metadata: metadata.to_vec(),
            types,
            renames: llama.map(|m| m.names.clone()).unwrap_or_default(),
            dir: dir.into(),
            buf: Vec::new(),
            permuted: Vec::new(),
            values: Vec::new(),
        })
    }
}

impl Sink for GgufSink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
        let rename = self.renames.get(&t.name);
        let name = rename.map_or(&t.name, |r| &r.name);
        let Some(&ty) = self.types.get(name) else { return Ok(()) };
        let w = self.writer.as_mut().expect("open writer");
        let (rows, cols) = t.matrix();
        let bytes: &[u8] = match data {
            TensorData::Values { quant: QuantRef::Ggml(q, bytes), .. } if *q == ty => bytes,
            TensorData::Raw(raw)
                if (ty == GgufType::F32 && t.dtype == Dtype::F32) || (ty == GgufType::F16 && t.dtype == Dtype::F16) =>
            {
                raw
            }
            TensorData::Raw(raw) => {
                self.values.resize(t.numel(), 0.0);
                decode_f32(raw, t.dtype, &mut self.values);
                ggml::quantize(&self.values, rows, cols, ty, &mut self.buf).map_err(io_err)?;
                &self.buf
            }
            TensorData::Values { values, .. } => {
                ggml::quantize(values, rows, cols, ty, &mut self.buf).map_err(io_err)?;
                &self.buf
            }
        };
        let bytes = match rename.and_then(|r| r.permute_heads) {
            Some(heads) => {
                // A bias is one row per value.
                let rows = if t.shape.len() == 1 { t.numel() } else { rows };
                llama_cpp::permute_rows(bytes, rows, heads, &mut self.permuted);
                &self.permuted
            }
            None => bytes,
        };
        w.write_tensor(name, bytes).map_err(gguf_err)
    }

    fn finish(mut self: Box<Self>, provenance: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>> {
        // The header written at creation may hold a placeholder for the input's hash.
        const KEY: &str = "modelpress.input_sha256";
        let mut metadata = std::mem::take(&mut self.metadata);
        if let (Some(entry), Some(sha)) = (metadata.iter_mut().find(|(k, _)| k == KEY), provenance.get(KEY)) {
            entry.1 = MetaValue::from(sha.as_str());
        }
        self.writer.take().expect("open writer").finish_with_metadata(&metadata).map_err(gguf_err)?;
        Ok(vec![artifact(&self.dir, "model.gguf", "gguf")])
    }
}

/// The legacy compressed-tensors `sparse-bitmask` layout: each pruned matrix as
/// `NAME.shape` / `.bitmask` / `.row_offsets` / `.compressed`, the rest dense.
pub struct SparseSink {
    writer: SafetensorsWriter,
    dir: PathBuf,
    encoder: SparseEncoder,
    targets: Vec<String>,
    zeros: u64,
    total: u64,
}

impl SparseSink {
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let dir = dir.join("sparse");
        std::fs::create_dir_all(&dir)?;
        Ok(Self {
            writer: SafetensorsWriter::create(&dir.join("model.safetensors"))?,
            dir,
            encoder: SparseEncoder::new(),
            targets: Vec::new(),
            zeros: 0,
            total: 0,
        })
    }
}

impl Sink for SparseSink {
    fn write(&mut self, t: &TensorInfo, data: &TensorData<'_>) -> std::io::Result<()> {
        if let TensorData::Values { values, pruned: true, .. } = data {
            // compressed-tensors decodes the bitmask along the last axis of a 2-D shape only:
            // other ranks (conv kernels) stay dense so every reader can load the file.
            if t.shape.len() == 2 {
                let prefix = crate::formats::sparse::part_prefix(&t.name).to_owned();
                self.zeros += values.iter().filter(|v| **v == 0.0).count() as u64;
                self.total += values.len() as u64;
                let parts = self.encoder.encode(values, &t.shape, sparse_dtype(t.dtype)).map_err(io_err)?;
                for part in parts {
                    self.writer.write(&format!("{prefix}.{}", part.suffix), part.dtype, &part.shape, part.data)?;
                }
                self.targets.push(t.name.clone());
                return Ok(());
            }
        }
        write_dense(&mut self.writer, t, data)
    }

    fn finish(self: Box<Self>, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<ArtifactFile>> {
        let mut meta = metadata.clone();
        meta.insert("format".into(), "pt".into());
        self.writer.finish(&meta)?;
        let global = if self.total > 0 { self.zeros as f64 / self.total as f64 } else { 0.0 };
        let config = json!({
            "quantization_config": {
                "quant_method": "compressed-tensors",
                "format": "sparse-bitmask",
                "sparsity_config": {
                    "format": "sparse-bitmask",
                    "global_sparsity": global,
                    "sparsity_structure": "unstructured",
                    "targets": self.targets,
                    "ignore": [],
                }
            }
        });
        std::fs::write(self.dir.join("config.json"), serde_json::to_vec_pretty(&config).expect("config JSON"))?;
        let parent = self.dir.parent().expect("job dir").to_path_buf();
        Ok(vec![
            artifact(&parent, "sparse/model.safetensors", "sparse"),
            artifact(&parent, "sparse/config.json", "sparse"),
        ])
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_full_disk_under_the_gguf_writer_stays_a_full_disk() {
        let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
        let e =
            super::gguf_err(crate::formats::gguf::GgufError::Io { context: "writing model.gguf".into(), source: full });
        assert_eq!(e.kind(), std::io::ErrorKind::StorageFull);
        assert!(e.to_string().contains("writing model.gguf"), "{e}");
    }
}
