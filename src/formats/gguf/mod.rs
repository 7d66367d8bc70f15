//! Streaming GGUF v3 writer: the whole layout is fixed up front, then tensors arrive one at a time.
//!
//! candle's `gguf_file::write` needs every tensor in memory at once; here only the caller's current
//! tensor is. Readers checked in tests: candle's `gguf_file::Content::read` (and the Python `gguf`
//! package by hand). Shapes are given row-major (`[rows, cols]`, as safetensors and candle use) and
//! stored reversed, as ggml's `ne[]` (innermost first), which is what candle's reader undoes.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

pub mod llama_cpp;
mod types;
pub use types::{GgufType, UnknownGgufType};

/// "GGUF" read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;
const VERSION: u32 = 3;
/// Data alignment when the metadata has no `general.alignment` (the GGUF default).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp refuses tensor names of 64 bytes or more (GGML_MAX_NAME = 64 including the NUL).
pub const MAX_NAME_BYTES: usize = 63;

/// Errors of the GGUF writer; messages name the tensor, key or byte counts involved.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("tensor \"{name}\" with shape {shape:?} cannot be stored as {ty}: {reason}")]
    ShapeRefused { name: String, shape: Vec<usize>, ty: GgufType, reason: String },
    #[error("tensor name \"{0}\" is longer than {MAX_NAME_BYTES} bytes, which llama.cpp refuses")]
    NameTooLong(String),
    #[error("tensor \"{0}\" appears twice in the plan")]
    DuplicateTensor(String),
    #[error("metadata key \"{0}\" appears twice")]
    DuplicateKey(String),
    #[error("metadata key general.alignment must be a u32 power of two, got {0:?}")]
    BadAlignment(MetaValue),
    #[error("expected tensor \"{expected}\" next (plan order), got \"{got}\"")]
    OutOfOrder { expected: String, got: String },
    #[error("all {0} planned tensors are already written; got \"{1}\"")]
    TooManyTensors(usize, String),
    #[error("tensor \"{name}\" ({ty}) must be {expected} bytes, got {got}")]
    ByteCount { name: String, ty: GgufType, expected: u64, got: u64 },
    #[error("finish() called after {written} of {planned} tensors; next expected \"{next}\"")]
    Unfinished { written: usize, planned: usize, next: String },
    #[error("I/O error while writing GGUF {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> GgufError {
    let context = context.into();
    move |source| GgufError::Io { context, source }
}

/// A metadata value; GGUF value type ids are in [`MetaValue::type_id`].
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    Bool(bool),
    String(String),
    StringArray(Vec<String>),
    U32Array(Vec<u32>),
    I32Array(Vec<i32>),
    F32Array(Vec<f32>),
}

const TYPE_U32: u32 = 4;
const TYPE_I32: u32 = 5;
const TYPE_F32: u32 = 6;
const TYPE_BOOL: u32 = 7;
const TYPE_STRING: u32 = 8;
const TYPE_ARRAY: u32 = 9;
const TYPE_U64: u32 = 10;

impl MetaValue {
    /// The GGUF `gguf_metadata_value_type` of this value.
    pub fn type_id(&self) -> u32 {
        match self {
            Self::U32(_) => TYPE_U32,
            Self::I32(_) => TYPE_I32,
            Self::U64(_) => TYPE_U64,
            Self::F32(_) => TYPE_F32,
            Self::Bool(_) => TYPE_BOOL,
            Self::String(_) => TYPE_STRING,
            Self::StringArray(_) | Self::U32Array(_) | Self::I32Array(_) | Self::F32Array(_) => TYPE_ARRAY,
        }
    }

    fn encode(&self, buf: &mut Vec<u8>) {
        fn array<T>(buf: &mut Vec<u8>, ty: u32, xs: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
            buf.extend_from_slice(&ty.to_le_bytes());
            buf.extend_from_slice(&(xs.len() as u64).to_le_bytes());
            xs.iter().for_each(|x| each(buf, x));
        }
        match self {
            Self::U32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Self::I32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Self::U64(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Self::F32(v) => buf.extend_from_slice(&v.to_le_bytes()),
            Self::Bool(v) => buf.push(u8::from(*v)),
            Self::String(s) => put_string(buf, s),
            Self::StringArray(xs) => array(buf, TYPE_STRING, xs, |b, s| put_string(b, s)),
            Self::U32Array(xs) => array(buf, TYPE_U32, xs, |b, v| b.extend(v.to_le_bytes())),
            Self::I32Array(xs) => array(buf, TYPE_I32, xs, |b, v| b.extend(v.to_le_bytes())),
            Self::F32Array(xs) => array(buf, TYPE_F32, xs, |b, v| b.extend(v.to_le_bytes())),
        }
    }
}

impl From<&str> for MetaValue {
    fn from(s: &str) -> Self {
        Self::String(s.to_string())
    }
}
impl From<String> for MetaValue {
    fn from(s: String) -> Self {
        Self::String(s)
    }
}
impl From<u32> for MetaValue {
    fn from(v: u32) -> Self {
        Self::U32(v)
    }
}
impl From<u64> for MetaValue {
    fn from(v: u64) -> Self {
        Self::U64(v)
    }
}
impl From<f32> for MetaValue {
    fn from(v: f32) -> Self {
        Self::F32(v)
    }
}
impl From<bool> for MetaValue {
    fn from(v: bool) -> Self {
        Self::Bool(v)
    }
}
impl From<Vec<String>> for MetaValue {
    fn from(v: Vec<String>) -> Self {
        Self::StringArray(v)
    }
}

/// One tensor of the plan: row-major shape (outermost first) and storage type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub ty: GgufType,
}

impl TensorInfo {
    /// Builds a tensor entry.
    pub fn new(name: impl Into<String>, shape: &[usize], ty: GgufType) -> Self {
        Self { name: name.into(), shape: shape.to_vec(), ty }
    }

    /// Bytes of this tensor's data (without alignment padding).
    pub fn byte_len(&self) -> u64 {
        self.ty.encoded_len(self.shape.iter().product()) as u64
    }
}

/// Where everything goes in the file, computed before a byte is written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufLayout {
    /// Header + metadata + tensor infos, unpadded (kept so the writer need not re-encode them).
    header: Vec<u8>,
    /// Offset of the data section from the start of the file (a multiple of `alignment`).
    pub data_start: u64,
    /// Per tensor, its offset from `data_start`.
    pub offsets: Vec<u64>,
    pub alignment: u64,
    /// Total file size: every tensor, including the last, is padded to `alignment`.
    pub file_size: u64,
}

fn put_string(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u64).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

fn align_up(x: u64, alignment: u64) -> u64 {
    x.div_ceil(alignment) * alignment
}

/// Validates the plan and computes the full layout (offsets and file size).
pub fn layout(metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Result<GgufLayout, GgufError> {
    let mut alignment = DEFAULT_ALIGNMENT;
    let mut keys = std::collections::HashSet::new();
    for (key, value) in metadata {
        if !keys.insert(key.as_str()) {
            return Err(GgufError::DuplicateKey(key.clone()));
        }
        if key == "general.alignment" {
            match value {
                MetaValue::U32(a) if a.is_power_of_two() => alignment = u64::from(*a),
                other => return Err(GgufError::BadAlignment(other.clone())),
            }
        }
    }
    let mut names = std::collections::HashSet::new();
    for t in tensors {
        if t.name.len() > MAX_NAME_BYTES {
            return Err(GgufError::NameTooLong(t.name.clone()));
        }
        if !names.insert(t.name.as_str()) {
            return Err(GgufError::DuplicateTensor(t.name.clone()));
        }
        if let Some(reason) = t.ty.shape_refusal(&t.shape) {
            return Err(GgufError::ShapeRefused { name: t.name.clone(), shape: t.shape.clone(), ty: t.ty, reason });
        }
    }

    let mut header = Vec::with_capacity(4096);
    header.extend_from_slice(&MAGIC.to_le_bytes());
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    header.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_string(&mut header, key);
        header.extend_from_slice(&value.type_id().to_le_bytes());
        value.encode(&mut header);
    }
    let mut offsets = Vec::with_capacity(tensors.len());
    let mut offset = 0u64;
    for t in tensors {
        put_string(&mut header, &t.name);
        header.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for &dim in t.shape.iter().rev() {
            header.extend_from_slice(&(dim as u64).to_le_bytes());
        }
        header.extend_from_slice(&t.ty.ggml_type_id().to_le_bytes());
        header.extend_from_slice(&offset.to_le_bytes());
        offsets.push(offset);
        offset += align_up(t.byte_len(), alignment);
    }
    let data_start = align_up(header.len() as u64, alignment);
    Ok(GgufLayout { header, data_start, offsets, alignment, file_size: data_start + offset })
}

/// The exact size in bytes of the GGUF file this plan would produce, without writing it.
pub fn predict_file_size(metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Result<u64, GgufError> {
    Ok(layout(metadata, tensors)?.file_size)
}

/// A sink that can make written bytes durable (fsync for files; nothing for memory).
pub trait Durable: Write {
    /// Flushes and, for files, waits until the data is on stable storage.
    fn make_durable(&mut self) -> std::io::Result<()>;

    /// For files: starts writing what was written so far to disk, without waiting.
    fn start_writeback(&mut self) {}
}

impl Durable for File {
    fn make_durable(&mut self) -> std::io::Result<()> {
        self.sync_all()
    }

    fn start_writeback(&mut self) {
        crate::formats::safetensors::start_writeback(self)
    }
}

impl<W: Durable> Durable for BufWriter<W> {
    fn make_durable(&mut self) -> std::io::Result<()> {
        self.flush()?;
        self.get_mut().make_durable()
    }

    fn start_writeback(&mut self) {
        self.get_mut().start_writeback()
    }
}

impl Durable for Vec<u8> {
    fn make_durable(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Writes one GGUF file: the header goes out on creation, then each tensor in plan order.
pub struct GgufWriter<W: Durable> {
    sink: W,
    tensors: Vec<TensorInfo>,
    layout: GgufLayout,
    /// Number of tensors written so far; the next one must be `tensors[next]`.
    next: usize,
}

/// Zeros for alignment padding; alignments above this size are written in several pieces.
const ZEROS: [u8; 256] = [0; 256];

fn write_zeros<W: Write>(sink: &mut W, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        sink.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

impl GgufWriter<BufWriter<File>> {
    /// Creates (truncating) `path` and writes the header. Write to a temp path and rename after `finish`.
    pub fn create(path: &Path, metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Result<Self, GgufError> {
        let file = File::create(path).map_err(io(format!("creating {}", path.display())))?;
        // 1 MiB buffer: large sequential writes without a copy per small tensor.
        Self::new(BufWriter::with_capacity(1 << 20, file), metadata, tensors)
    }
}

impl GgufWriter<BufWriter<File>> {
    /// Like [`GgufWriter::finish`], but the header carries `metadata` (a value learned while
    /// the tensors were written, such as the input's hash). It must encode to the length of the
    /// header written at creation (a fixed-width value replaced) and is written over it.
    pub fn finish_with_metadata(mut self, metadata: &[(String, MetaValue)]) -> Result<BufWriter<File>, GgufError> {
        use std::os::unix::fs::FileExt;
        let header = layout(metadata, &self.tensors)?.header;
        if header.len() != self.layout.header.len() {
            return Err(GgufError::Io {
                context: "rewriting the header".into(),
                source: std::io::Error::other(format!(
                    "the final GGUF header is {} bytes where {} were reserved",
                    header.len(),
                    self.layout.header.len()
                )),
            });
        }
        self.check_complete()?;
        self.sink.flush().map_err(io("flush"))?;
        if header != self.layout.header {
            self.sink.get_ref().write_all_at(&header, 0).map_err(io("rewriting the header"))?;
        }
        self.sink.make_durable().map_err(io("flush/fsync"))?;
        Ok(self.sink)
    }
}

impl<W: Durable> GgufWriter<W> {
    /// Validates the plan and writes header, metadata, tensor infos and padding to `sink`.
    pub fn new(mut sink: W, metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> Result<Self, GgufError> {
        let layout = layout(metadata, tensors)?;
        sink.write_all(&layout.header)
            .and_then(|()| write_zeros(&mut sink, layout.data_start - layout.header.len() as u64))
            .map_err(io("header"))?;
        Ok(Self { sink, tensors: tensors.to_vec(), layout, next: 0 })
    }

    /// The layout being written (offsets, file size).
    pub fn layout(&self) -> &GgufLayout {
        &self.layout
    }

    /// Writes the next tensor's encoded bytes; `name` must be the next one in plan order.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<(), GgufError> {
        let Some(info) = self.tensors.get(self.next) else {
            return Err(GgufError::TooManyTensors(self.tensors.len(), name.into()));
        };
        if info.name != name {
            return Err(GgufError::OutOfOrder { expected: info.name.clone(), got: name.into() });
        }
        let expected = info.byte_len();
        if bytes.len() as u64 != expected {
            return Err(GgufError::ByteCount { name: name.into(), ty: info.ty, expected, got: bytes.len() as u64 });
        }
        let padding = align_up(expected, self.layout.alignment) - expected;
        self.sink
            .write_all(bytes)
            .and_then(|()| write_zeros(&mut self.sink, padding))
            .map_err(io(format!("tensor \"{name}\"")))?;
        self.next += 1;
        self.sink.start_writeback();
        Ok(())
    }

    /// Checks every tensor was written, flushes and fsyncs; returns the sink.
    pub fn finish(mut self) -> Result<W, GgufError> {
        self.check_complete()?;
        self.sink.make_durable().map_err(io("flush/fsync"))?;
        Ok(self.sink)
    }

    fn check_complete(&self) -> Result<(), GgufError> {
        match self.tensors.get(self.next) {
            Some(next) => {
                Err(GgufError::Unfinished { written: self.next, planned: self.tensors.len(), next: next.name.clone() })
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
