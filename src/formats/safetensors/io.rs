//! Reading tensors and writing safetensors files.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{Dtype, TensorInfo};
use crate::formats::fingerprint::{fingerprint, fold_fingerprints, piece_fingerprint, FINGERPRINT_CHUNK};
use std::collections::HashMap;

/// Reads tensors one at a time with positioned reads into reused buffers.
///
/// Not a memory map: FACTS.md measured a mapped 26 GiB model growing the resident set to 20 GiB
/// of file-backed pages, which container limits count, while positioned reads into one reused
/// buffer kept the peak at 204 MiB at 584-743 MB/s. Memory stays bounded by the largest tensor.
pub struct TensorReader {
    file: File,
    raw: Vec<u8>,
    /// With [`Self::record_reads`]: the [`fingerprint`] of every tensor read, by [`TensorInfo::span`].
    prints: Option<HashMap<(u64, u64), u64>>,
}

/// A tensor whose bytes differ between two reads of the same file in one job: the file was
/// modified while the job ran. Carried inside the [`std::io::Error`] of the read that saw it.
#[derive(Debug, thiserror::Error)]
#[error("tensor `{tensor}`: the input file changed while the job read it ({detail}); nothing may write to a model file while a job reads it")]
pub struct InputChanged {
    pub tensor: String,
    pub detail: String,
}

impl InputChanged {
    /// The error as an I/O error (what readers return), recognisable with [`Self::find`].
    pub fn into_io(self) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, self)
    }

    /// The [`InputChanged`] an I/O error carries, if any.
    pub fn find(e: &std::io::Error) -> Option<&InputChanged> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<InputChanged>())
    }
}

impl TensorReader {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self { file: File::open(path)?, raw: Vec::new(), prints: None })
    }

    /// From now on, fingerprints the bytes of every tensor read (one more parallel pass over
    /// bytes already in cache) and fails a read of a tensor read before whose bytes differ
    /// ([`InputChanged`]). [`Self::read_prints`] gives them, to compare with another reader's.
    pub fn record_reads(&mut self) {
        self.prints.get_or_insert_with(HashMap::new);
    }

    /// The fingerprint of each tensor's bytes as read, by [`TensorInfo::span`].
    pub fn read_prints(&self) -> Option<&HashMap<(u64, u64), u64>> {
        self.prints.as_ref()
    }

    /// Records that tensor `t` was read with bytes of fingerprint `print` (a caller that read it
    /// with [`Self::read_raw_unnoted`] and fingerprinted it itself); fails as [`Self::read_raw`].
    pub fn note(&mut self, t: &TensorInfo, print: u64) -> std::io::Result<()> {
        match self.prints.as_mut().and_then(|p| p.insert(t.span(), print)) {
            Some(before) if before != print => {
                Err(InputChanged { tensor: t.name.clone(), detail: "two reads of its bytes disagree".into() }.into_io())
            }
            _ => Ok(()),
        }
    }

    /// The file read (for copying a tensor's bytes file to file, see
    /// [`PlannedSafetensorsWriter::copy_from`]).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The tensor's bytes exactly as stored.
    pub fn read_raw(&mut self, t: &TensorInfo) -> std::io::Result<&[u8]> {
        self.read_raw_unnoted(t)?;
        if self.prints.is_some() {
            self.note(t, fingerprint(&self.raw))?;
        }
        Ok(&self.raw)
    }

    /// [`Self::read_raw`] without recording the read: the caller fingerprints the bytes in a pass
    /// of its own and gives the fingerprint to [`Self::note`].
    pub fn read_raw_unnoted(&mut self, t: &TensorInfo) -> std::io::Result<&[u8]> {
        self.raw.resize(t.bytes() as usize, 0);
        self.file.read_exact_at(&mut self.raw, t.start)?;
        Ok(&self.raw)
    }

    /// The tensor converted to f32 into `out` (resized); only floating-point dtypes.
    pub fn read_f32(&mut self, t: &TensorInfo, out: &mut Vec<f32>) -> std::io::Result<()> {
        let n = t.numel();
        out.resize(n, 0.0);
        if t.dtype == Dtype::F32 {
            // Read straight into the f32 buffer: no second copy.
            // SAFETY: any byte pattern is a valid f32 and the slice covers exactly `out`.
            let bytes = unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<u8>(), n * 4) };
            self.file.read_exact_at(bytes, t.start)?;
            if self.prints.is_some() {
                let print = fingerprint(bytes);
                self.note(t, print)?;
            }
            if cfg!(target_endian = "big") {
                out.iter_mut().for_each(|v| *v = f32::from_bits(v.to_bits().swap_bytes()));
            }
            return Ok(());
        }
        // Other dtypes are read and converted a slice at a time, so no second buffer the size of
        // the whole tensor is held (a bf16 embedding of a 128k vocabulary is 1 GB).
        const CHUNK_VALUES: usize = 1 << 20;
        let size = t.dtype.size();
        self.raw.resize((CHUNK_VALUES * size).min(n * size), 0);
        // A whole tensor read raw before (an unchanged one) leaves a large buffer: give it back.
        self.raw.shrink_to(CHUNK_VALUES * size);
        // A slice's bytes are whole fingerprint pieces (CHUNK_VALUES * size is a multiple).
        let mut pieces = Vec::new();
        for (k, slice) in out.chunks_mut(CHUNK_VALUES).enumerate() {
            let bytes = &mut self.raw[..slice.len() * size];
            self.file.read_exact_at(bytes, t.start + (k * CHUNK_VALUES * size) as u64)?;
            if self.prints.is_some() {
                use rayon::prelude::*;
                pieces.par_extend(bytes.par_chunks(FINGERPRINT_CHUNK).map(piece_fingerprint));
            }
            decode_f32(bytes, t.dtype, slice);
        }
        if self.prints.is_some() {
            self.note(t, fold_fingerprints(&pieces, n * size))?;
        }
        Ok(())
    }
}

/// Converts little-endian floating-point bytes of `dtype` to f32 (`out.len()` elements).
pub fn decode_f32(raw: &[u8], dtype: Dtype, out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        Dtype::F32 => out
            .iter_mut()
            .zip(raw.chunks_exact(4))
            .for_each(|(o, b)| *o = f32::from_le_bytes(b.try_into().expect("4 bytes"))),
        Dtype::F16 => {
            let h: Vec<half::f16> = raw.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]])).collect();
            h.convert_to_f32_slice(out);
        }
        Dtype::BF16 => {
            let h: Vec<half::bf16> = raw.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]])).collect();
            h.convert_to_f32_slice(out);
        }
        Dtype::F64 => out
            .iter_mut()
            .zip(raw.chunks_exact(8))
            .for_each(|(o, b)| *o = f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32),
        other => panic!("decode_f32 called on non-float dtype {}", other.as_str()),
    }
}

/// Converts f32 values to little-endian bytes of `dtype` into `out`, which holds exactly
/// `values.len() * dtype.size()` bytes.
pub fn encode_f32_into(values: &[f32], dtype: Dtype, out: &mut [u8]) {
    assert_eq!(out.len(), values.len() * dtype.size(), "encode_f32_into: output size");
    match dtype {
        Dtype::F32 => {
            out.chunks_exact_mut(4).zip(values).for_each(|(o, v)| o.copy_from_slice(&v.to_le_bytes()));
        }
        Dtype::F16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => out
            .chunks_exact_mut(2)
            .zip(values)
            .for_each(|(o, v)| o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F64 => {
            out.chunks_exact_mut(8).zip(values).for_each(|(o, v)| o.copy_from_slice(&(*v as f64).to_le_bytes()));
        }
        other => panic!("encode_f32_into called on non-float dtype {}", other.as_str()),
    }
}

/// Converts f32 values to little-endian bytes of `dtype`, appending to `out`.
pub fn encode_f32(values: &[f32], dtype: Dtype, out: &mut Vec<u8>) {
    out.reserve(values.len() * dtype.size());
    match dtype {
        Dtype::F32 => values.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        Dtype::F16 => values.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes())),
        Dtype::BF16 => values.iter().for_each(|v| out.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes())),
        Dtype::F64 => values.iter().for_each(|v| out.extend_from_slice(&(*v as f64).to_le_bytes())),
        other => panic!("encode_f32 called on non-float dtype {}", other.as_str()),
    }
}

/// Asks the kernel to start writing `file`'s dirty pages to disk now, without waiting, so the
/// fsync at the end finds most of the file already written while the job kept computing
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; a no-op elsewhere and on failure: the final
/// fsync is what guarantees durability).
pub fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; offset 0 and length 0 mean the whole file.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

/// Copies `len` bytes of `src` at `src_at` to `dst` at `dst_at`: `copy_file_range` while the
/// kernel takes it, then reads and writes for the rest (another filesystem, an old kernel).
fn copy_range(src: &File, src_at: u64, dst: &File, dst_at: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        while done < len {
            let (mut off_in, mut off_out) = ((src_at + done) as libc::loff_t, (dst_at + done) as libc::loff_t);
            let chunk = (len - done).min(1 << 30) as usize;
            // SAFETY: valid descriptors and offsets owned by this call; the kernel copies between
            // the files without touching this process's memory.
            let n =
                unsafe { libc::copy_file_range(src.as_raw_fd(), &mut off_in, dst.as_raw_fd(), &mut off_out, chunk, 0) };
            if n > 0 {
                done += n as u64;
                continue;
            }
            if n == 0 {
                // The end of the source, or a filesystem that answers 0 instead of an error:
                // the reads below tell the two apart.
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM) => break,
                Some(libc::EINTR) => continue,
                _ => return Err(e),
            }
        }
    }
    let mut buf = vec![0u8; (len - done).min(8 << 20) as usize];
    while done < len {
        let n = ((len - done) as usize).min(buf.len());
        src.read_exact_at(&mut buf[..n], src_at + done)?;
        dst.write_all_at(&buf[..n], dst_at + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Writes a safetensors file tensor by tensor without knowing the sizes up front.
///
/// Tensor bytes go to a side file as they come; `finish` writes the header and appends the data
/// (a kernel-side `copy_file_range`). The extra sequential copy buys streaming for layouts whose
/// sizes are only known after compression (sparse), with one writer for every output.
pub struct SafetensorsWriter {
    path: PathBuf,
    body_path: PathBuf,
    body: BufWriter<File>,
    entries: Vec<(String, Dtype, Vec<usize>, u64, u64)>,
    offset: u64,
}

impl SafetensorsWriter {
    pub fn create(path: &Path) -> std::io::Result<Self> {
        let body_path = path.with_extension("body.partial");
        let body = BufWriter::with_capacity(1 << 20, File::create(&body_path)?);
        Ok(Self { path: path.to_owned(), body_path, body, entries: Vec::new(), offset: 0 })
    }

    pub fn write(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> std::io::Result<()> {
        let expected = shape.iter().product::<usize>() * dtype.size();
        assert_eq!(bytes.len(), expected, "tensor `{name}`: {} bytes for shape {shape:?} {dtype:?}", bytes.len());
        self.body.write_all(bytes)?;
        let end = self.offset + bytes.len() as u64;
        self.entries.push((name.to_owned(), dtype, shape.to_vec(), self.offset, end));
        self.offset = end;
        Ok(())
    }

    /// Writes header + data to the final path, fsyncs it and removes the side file.
    pub fn finish(self, metadata: &BTreeMap<String, String>) -> std::io::Result<u64> {
        let path = self.path.clone();
        self.seal()?.finish_at(&path, metadata)
    }

    /// Bytes of tensor data written so far.
    pub fn data_bytes(&self) -> u64 {
        self.offset
    }

    /// Closes the side file, keeping what is needed to write the final file later (a shard
    /// whose metadata is only known when the whole output is written): no buffer stays held.
    pub fn seal(self) -> std::io::Result<SealedDeferred> {
        let body = self.body.into_inner().map_err(|e| e.into_error())?;
        drop(body);
        Ok(SealedDeferred { body_path: self.body_path, entries: self.entries, offset: self.offset })
    }
}

/// A [`SafetensorsWriter`] whose tensors are all written: the data waits in its side file.
pub struct SealedDeferred {
    body_path: PathBuf,
    entries: Vec<(String, Dtype, Vec<usize>, u64, u64)>,
    offset: u64,
}

impl SealedDeferred {
    /// The tensor names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.0.as_str())
    }

    /// Bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.offset
    }

    /// Writes header + data to `path`, fsyncs it and removes the side file; returns the size.
    pub fn finish_at(self, path: &Path, metadata: &BTreeMap<String, String>) -> std::io::Result<u64> {
        let header = header_bytes(&self.entries, metadata);
        let mut out = File::create(path)?;
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        let mut body = File::open(&self.body_path)?;
        std::io::copy(&mut body, &mut out)?;
        out.sync_all()?;
        std::fs::remove_file(&self.body_path)?;
        Ok(8 + header.len() as u64 + self.offset)
    }
}

/// `tensors` laid out back to back from offset 0: (name, dtype, shape, start, end).
fn planned_entries(tensors: &[(String, Dtype, Vec<usize>)]) -> Vec<(String, Dtype, Vec<usize>, u64, u64)> {
    let mut offset = 0u64;
    tensors
        .iter()
        .map(|(name, dtype, shape)| {
            let len = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
            offset += len;
            (name.clone(), *dtype, shape.clone(), offset - len, offset)
        })
        .collect()
}

/// The header of a file holding `entries` (name, dtype, shape, start, end), padded with spaces
/// to a multiple of 8 bytes so the data region is aligned, as the reference writer does.
fn header_bytes(entries: &[(String, Dtype, Vec<usize>, u64, u64)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    if !metadata.is_empty() {
        map.insert("__metadata__".into(), serde_json::to_value(metadata).expect("string map"));
    }
    for (name, dtype, shape, start, end) in entries {
        map.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.as_str(), "shape": shape, "data_offsets": [start, end]}),
        );
    }
    let mut header = serde_json::to_vec(&map).expect("JSON");
    header.resize(header.len().div_ceil(8) * 8, b' ');
    header
}

/// Writes a safetensors file whose tensors are all known up front: the header goes first and
/// each tensor's bytes stream straight to their place, written once (the deferred writer copies
/// the data a second time). Tensors must arrive in the declared order with the declared sizes.
pub struct PlannedSafetensorsWriter {
    path: PathBuf,
    out: BufWriter<File>,
    entries: Vec<(String, Dtype, Vec<usize>, u64, u64)>,
    next: usize,
    /// The JSON header written at creation.
    header: Vec<u8>,
}

impl PlannedSafetensorsWriter {
    pub fn create(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        let header = header_bytes(&planned_entries(tensors), metadata);
        Self::create_with_header(path, tensors, header)
    }

    /// Like [`Self::create`] with the JSON header given (padded, for the same layout of
    /// `tensors`): a caller that must reproduce another writer's bytes.
    pub fn create_with_header(
        path: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        header: Vec<u8>,
    ) -> std::io::Result<Self> {
        let entries = planned_entries(tensors);
        let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
        out.write_all(&(header.len() as u64).to_le_bytes())?;
        out.write_all(&header)?;
        Ok(Self { path: path.to_owned(), out, entries, next: 0, header })
    }

    /// Checks that `name` of `len` bytes is the next declared tensor; returns its data offset.
    fn expect_next(&self, name: &str, len: u64) -> std::io::Result<u64> {
        let Some((expected, _, _, start, end)) = self.entries.get(self.next) else {
            return Err(std::io::Error::other(format!("tensor `{name}` was not declared")));
        };
        if expected != name || end - start != len {
            return Err(std::io::Error::other(format!(
                "tensor `{name}` ({len} bytes) arrived where `{expected}` ({} bytes) was declared",
                end - start
            )));
        }
        Ok(*start)
    }

    pub fn write(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.expect_next(name, bytes.len() as u64)?;
        self.out.write_all(bytes)?;
        self.next += 1;
        start_writeback(self.out.get_ref());
        Ok(())
    }

    /// Like [`Self::write`] with the bytes taken from `src` at `offset`, file to file in the
    /// kernel (Linux `copy_file_range`: no copy through this process, and on filesystems that
    /// share extents, none at all), with a read and write where the kernel cannot.
    pub fn copy_from(&mut self, name: &str, src: &File, offset: u64, len: u64) -> std::io::Result<()> {
        let start = self.expect_next(name, len)?;
        self.out.flush()?;
        let at = 8 + self.header.len() as u64 + start;
        copy_range(src, offset, self.out.get_ref(), at, len)?;
        self.out.seek(std::io::SeekFrom::Start(at + len))?;
        self.next += 1;
        start_writeback(self.out.get_ref());
        Ok(())
    }

    pub fn finish(self) -> std::io::Result<()> {
        self.seal()?.finish()
    }

    /// Like [`Self::finish`], but the header carries `metadata` (see
    /// [`SealedPlanned::finish_with_metadata`]).
    pub fn finish_with_metadata(self, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
        self.seal()?.finish_with_metadata(metadata)
    }

    /// Checks every declared tensor was written and gives back the write buffer, keeping what is
    /// needed to rewrite the header at the end; [`SealedPlanned::close`] also lets go of the file
    /// (a shard of a larger output, so thousands of shards hold no descriptors).
    pub fn seal(self) -> std::io::Result<SealedPlanned> {
        if let Some((missing, ..)) = self.entries.get(self.next) {
            return Err(std::io::Error::other(format!("tensor `{missing}` was declared but never written")));
        }
        let file = self.out.into_inner().map_err(|e| e.into_error())?;
        Ok(SealedPlanned { path: self.path, file: Some(file), entries: self.entries, header: self.header })
    }
}

/// A [`PlannedSafetensorsWriter`] whose tensors are all written; only the header may change.
pub struct SealedPlanned {
    path: PathBuf,
    /// Still open when sealed by `finish` itself; closed once set aside as a shard.
    file: Option<File>,
    entries: Vec<(String, Dtype, Vec<usize>, u64, u64)>,
    /// The JSON header written at creation.
    header: Vec<u8>,
}

impl SealedPlanned {
    /// Closes the file until [`Self::finish_with_metadata`] reopens it.
    pub fn close(mut self) -> Self {
        self.file = None;
        self
    }

    pub fn finish(self) -> std::io::Result<()> {
        let header = self.header.clone();
        self.finish_with_header(header)
    }

    /// The header carries `metadata` (a value learned while the data was written, such as the
    /// input's hash). The new header must have the length of the one written at creation (a
    /// fixed-width value replaced), so it is written over it in place.
    pub fn finish_with_metadata(self, metadata: &BTreeMap<String, String>) -> std::io::Result<()> {
        let header = header_bytes(&self.entries, metadata);
        if header.len() != self.header.len() {
            return Err(std::io::Error::other(format!(
                "the final safetensors header is {} bytes where {} were reserved",
                header.len(),
                self.header.len()
            )));
        }
        self.finish_with_header(header)
    }

    fn finish_with_header(self, header: Vec<u8>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let file = match self.file {
            Some(f) => f,
            None => std::fs::OpenOptions::new().write(true).open(&self.path)?,
        };
        if header != self.header {
            file.write_all_at(&header, 8)?;
        }
        file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::read_header;

    #[test]
    fn a_tensor_copied_file_to_file_is_the_tensor_written() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&source, [&[9u8; 13][..], &payload].concat()).unwrap();
        let declared = [("a".to_string(), Dtype::U8, vec![5]), ("b".to_string(), Dtype::U8, vec![100_000])];
        let meta = BTreeMap::new();
        let mut written = PlannedSafetensorsWriter::create(&dir.path().join("w"), &declared, &meta).unwrap();
        written.write("a", &[1, 2, 3, 4, 5]).unwrap();
        written.write("b", &payload).unwrap();
        written.finish().unwrap();
        let mut copied = PlannedSafetensorsWriter::create(&dir.path().join("c"), &declared, &meta).unwrap();
        copied.write("a", &[1, 2, 3, 4, 5]).unwrap();
        let src = File::open(&source).unwrap();
        assert!(copied.copy_from("a", &src, 13, 100_000).is_err(), "the declared order holds");
        copied.copy_from("b", &src, 13, 100_000).unwrap();
        copied.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("w")).unwrap(), std::fs::read(dir.path().join("c")).unwrap());
        // A source shorter than the range is an error, not a short file.
        let out = File::create(dir.path().join("short")).unwrap();
        assert!(copy_range(&src, 13 + 99_000, &out, 0, 2_000).is_err());
    }

    #[test]
    fn the_planned_writer_matches_the_deferred_one_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let (a, b) = (vec![1u8; 12], vec![2u8; 4]);
        let mut deferred = SafetensorsWriter::create(&dir.path().join("d")).unwrap();
        deferred.write("a", Dtype::F32, &[3], &a).unwrap();
        deferred.write("b", Dtype::F16, &[2], &b).unwrap();
        deferred.finish(&meta).unwrap();
        let declared = [("a".to_string(), Dtype::F32, vec![3]), ("b".to_string(), Dtype::F16, vec![2])];
        let mut planned = PlannedSafetensorsWriter::create(&dir.path().join("p"), &declared, &meta).unwrap();
        assert!(planned.write("b", &b).is_err(), "out of order is refused");
        planned.write("a", &a).unwrap();
        planned.write("b", &b).unwrap();
        planned.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("d")).unwrap(), std::fs::read(dir.path().join("p")).unwrap());
    }

    #[test]
    fn a_header_finished_with_new_metadata_of_the_same_length_equals_writing_it_first() {
        let dir = tempfile::tempdir().unwrap();
        let declared = [("a".to_string(), Dtype::F32, vec![3])];
        let (early, late) = (
            BTreeMap::from([("sha".to_string(), "0".repeat(64))]),
            BTreeMap::from([("sha".to_string(), "ab".repeat(32))]),
        );
        let mut patched = PlannedSafetensorsWriter::create(&dir.path().join("p"), &declared, &early).unwrap();
        patched.write("a", &[7u8; 12]).unwrap();
        patched.finish_with_metadata(&late).unwrap();
        let mut direct = PlannedSafetensorsWriter::create(&dir.path().join("d"), &declared, &late).unwrap();
        direct.write("a", &[7u8; 12]).unwrap();
        direct.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("p")).unwrap(), std::fs::read(dir.path().join("d")).unwrap());
        // A longer value cannot fit the reserved header.
        let mut w = PlannedSafetensorsWriter::create(&dir.path().join("x"), &declared, &early).unwrap();
        w.write("a", &[7u8; 12]).unwrap();
        let longer = BTreeMap::from([("sha".to_string(), "0".repeat(100))]);
        assert!(w.finish_with_metadata(&longer).unwrap_err().to_string().contains("reserved"));
    }

    #[test]
    fn the_writer_output_is_read_back_by_the_reference_crate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let mut w = SafetensorsWriter::create(&path).unwrap();
        let mut bytes = Vec::new();
        encode_f32(&[1.0, -2.5, 3.25], Dtype::F32, &mut bytes);
        w.write("x", Dtype::F32, &[3], &bytes).unwrap();
        bytes.clear();
        encode_f32(&[0.5, 1.5], Dtype::BF16, &mut bytes);
        w.write("y", Dtype::BF16, &[1, 2], &bytes).unwrap();
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        let len = w.finish(&meta).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert_eq!(len, data.len() as u64);
        let st = ::safetensors::SafeTensors::deserialize(&data).unwrap();
        assert_eq!(st.tensor("y").unwrap().shape(), &[1, 2]);
        let header = read_header(&path, 1 << 20).unwrap();
        let mut r = TensorReader::open(&path).unwrap();
        let mut out = Vec::new();
        r.read_f32(header.get("x").unwrap(), &mut out).unwrap();
        assert_eq!(out, vec![1.0, -2.5, 3.25]);
        r.read_f32(header.get("y").unwrap(), &mut out).unwrap();
        assert_eq!(out, vec![0.5, 1.5]);
        assert!(!path.with_extension("body.partial").exists());
    }
}
