//! A Hugging Face model folder uploaded as one streamed tar body
//! (`tar -cf - -C dir . | curl -T - -H 'Content-Type: application/x-tar' URL`).
//!
//! The archive is read as it arrives (the `tar` crate over tokio-util's `SyncIoBridge`, on a
//! blocking thread): top-level regular files that are weights, the index or companions are
//! written to a staging directory while hashed; everything else (README.md, subfolders such as
//! `original/`, links) is skipped without being stored. Then [`check_folder`], which a committed
//! draft (`super::drafts`) runs too, checks the folder as [`crate::formats::hf::ModelFolder`]
//! does (index against shards, lone shards) and merges sharded weights into one file. Memory:
//! the reader's buffers and, when merging, the largest tensor. Every failure removes the staging
//! directory.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use futures_util::TryStreamExt;
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::upload::{header_error, FileDigest, HeaderCheck, StagedUpload};
use crate::formats::hf::{
    is_companion, merge_shards, FolderError, ModelFolder, Weights, INDEX_FILE, MAX_COMPANION_BYTES,
};
use crate::formats::safetensors::read_header;
pub use crate::storage::blobs::DirGuard;

/// A companion file in staging, hashed.
pub struct StagedFile {
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
}

/// A received folder: its weights as one file, its companions, and what was skipped.
pub struct StagedFolder {
    pub weights: StagedUpload,
    pub files: Vec<StagedFile>,
    pub ignored: Vec<String>,
    /// The staging directory; removed on drop.
    pub dir: DirGuard,
}

/// Why reading the archive stopped.
enum TarError {
    TooLarge,
    /// The archive itself: truncated, not a tar, extension headers over the limit.
    Archive(std::io::Error),
    /// Writing the staged files (a full disk, too many open files): the server's side.
    Disk(std::io::Error),
    Api(ApiError),
}

/// Most entries an archive may hold (files, folders, links, extension headers).
const MAX_ENTRIES: usize = 100_000;
/// Names of skipped entries listed in the answer; the rest are counted.
const MAX_LISTED: usize = 200;
/// Bytes the archive reader may consume between two entries beyond the previous entry's data:
/// headers, GNU long names and PAX records, which the `tar` crate holds in memory.
const EXTENSION_BUDGET: u64 = 1 << 20;

/// The state [`Limited`] shares with the extraction loop.
#[derive(Default)]
struct Budget {
    read: std::cell::Cell<u64>,
    since_entry: std::cell::Cell<u64>,
    allowed: std::cell::Cell<u64>,
}

/// Counts the bytes read and fails past `limit` in all, or past what the current entry allows
/// (its data plus [`EXTENSION_BUDGET`]) before the next one is handed out.
struct Limited<'b, R> {
    inner: R,
    limit: u64,
    budget: &'b Budget,
}

impl<R: Read> Read for Limited<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        let b = self.budget;
        b.read.set(b.read.get() + n as u64);
        b.since_entry.set(b.since_entry.get() + n as u64);
        if b.read.get() > self.limit {
            return Err(std::io::Error::other("over the upload limit"));
        }
        if b.since_entry.get() > b.allowed.get() {
            return Err(std::io::Error::other(format!(
                "tar extension headers (long names, PAX records) over {EXTENSION_BUDGET} bytes"
            )));
        }
        Ok(n)
    }
}

/// The name of a top-level file (`./config.json` or `config.json`); `None` for anything in a
/// subfolder or with `..`.
pub(super) fn top_level(path: &Path) -> Option<String> {
    let parts: Vec<Component> = path.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    match parts.as_slice() {
        [Component::Normal(n)] => n.to_str().map(str::to_owned),
        _ => None,
    }
}

/// Whether a top-level file of a folder is kept: weights, the index, companions.
pub(super) fn wanted(name: &str) -> bool {
    is_companion(name) || name == INDEX_FILE || (name.ends_with(".safetensors") && !name.starts_with('.'))
}

/// What the archive held: kept files by name, and the skipped names (at most [`MAX_LISTED`],
/// then a count).
type Extraction = (BTreeMap<String, FileDigest>, Vec<String>);

fn extract(reader: impl Read, dir: &Path, limit: u64, gone: &AtomicBool) -> Result<Extraction, TarError> {
    let budget = Budget::default();
    budget.allowed.set(EXTENSION_BUDGET);
    let counted = Limited { inner: reader, limit, budget: &budget };
    let archive_error = |e: std::io::Error| {
        if budget.read.get() > limit {
            TarError::TooLarge
        } else {
            TarError::Archive(e)
        }
    };
    let mut archive = tar::Archive::new(counted);
    let mut kept = BTreeMap::new();
    let (mut ignored, mut more) = (Vec::new(), 0usize);
    for (count, entry) in archive.entries().map_err(archive_error)?.enumerate() {
        let mut entry = entry.map_err(archive_error)?;
        if count >= MAX_ENTRIES {
            return Err(TarError::Api(ApiError::unprocessable(
                "invalid_model_folder",
                format!("the archive holds more than {MAX_ENTRIES} entries; a model folder has a few dozen"),
            )));
        }
        if gone.load(Ordering::Relaxed) {
            return Err(TarError::Archive(std::io::Error::other("the client went away")));
        }
        // This entry's data (read by us or skipped by the reader) plus the next headers.
        let size = entry.size();
        budget.since_entry.set(0);
        budget.allowed.set(size.div_ceil(512).saturating_mul(512).saturating_add(EXTENSION_BUDGET));
        let kind = entry.header().entry_type();
        if kind.is_dir() || kind.is_pax_global_extensions() {
            continue;
        }
        let path = entry.path().map_err(archive_error)?.into_owned();
        let name = top_level(&path).filter(|n| wanted(n) && kind.is_file());
        let Some(name) = name else {
            if ignored.len() < MAX_LISTED {
                // As the folder names it: without the `./` that `tar -C DIR .` puts first.
                ignored.push(path.strip_prefix(".").unwrap_or(&path).display().to_string());
            } else {
                more += 1;
            }
            continue; // the archive reader skips the entry's data
        };
        if is_companion(&name) && size > MAX_COMPANION_BYTES {
            return Err(TarError::Api(
                ApiError::unprocessable("file_too_large", FolderError::TooLarge(name.clone(), size).to_string())
                    .with_pointer(format!("/files/{name}")),
            ));
        }
        if kept.contains_key(&name) {
            return Err(TarError::Api(ApiError::unprocessable(
                "invalid_model_folder",
                format!("the archive holds `{name}` twice"),
            )));
        }
        let file = std::fs::File::create(dir.join(&name)).map_err(TarError::Disk)?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(archive_error)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(TarError::Disk)?;
            bytes += n as u64;
        }
        let file = out.into_inner().map_err(|e| TarError::Disk(e.into_error()))?;
        file.sync_all().map_err(TarError::Disk)?;
        kept.insert(name, FileDigest { sha256: hex::encode(hasher.finalize()), bytes });
    }
    if more > 0 {
        ignored.push(format!("... and {more} more"));
    }
    Ok((kept, ignored))
}

fn folder_error(e: FolderError) -> ApiError {
    let code = match &e {
        FolderError::LoneShard(_) | FolderError::MissingShard(_) | FolderError::MissingTensor { .. } => {
            "incomplete_checkpoint"
        }
        FolderError::Io(..) => return ApiError::io(std::io::Error::other(e.to_string())),
        _ => "invalid_model_folder",
    };
    ApiError::unprocessable(code, e.to_string())
}

/// Set when the request's future is dropped (the client went away, the server stops), so the
/// blocking extraction and merge stop too instead of writing on for nobody.
pub(super) struct Gone(pub(super) Arc<AtomicBool>);

impl Gone {
    pub(super) fn new() -> Gone {
        Gone(Arc::new(AtomicBool::new(false)))
    }
}

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Receives a tar body into `dir` (created; removed on every failure), at most `max_bytes` of
/// archive (`declared`: the request's Content-Length, refused at once when over), then checks
/// it as every folder upload is checked ([`check_folder`]).
pub async fn receive_tar(
    body: Body,
    declared: Option<u64>,
    dir: PathBuf,
    max_bytes: u64,
    header_limit: u64,
    check: HeaderCheck<'_>,
    too_large: impl Fn() -> ApiError,
) -> Result<StagedFolder, ApiError> {
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(too_large());
    }
    tokio::fs::create_dir_all(&dir).await.map_err(ApiError::io)?;
    let guard = DirGuard::new(dir.clone());
    let gone = Gone::new();
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = tokio_util::io::SyncIoBridge::new(tokio_util::io::StreamReader::new(stream));
    let work = dir.clone();
    let flag = gone.0.clone();
    let extracted =
        tokio::task::spawn_blocking(move || extract(reader, &work, max_bytes, &flag)).await.expect("tar reader thread");
    let (kept, mut ignored) = match extracted {
        Ok(r) => r,
        Err(TarError::TooLarge) => return Err(too_large()),
        Err(TarError::Api(e)) => return Err(e),
        Err(TarError::Disk(e)) => return Err(ApiError::io(e)),
        Err(TarError::Archive(e)) => {
            return Err(ApiError::bad_request(
                "invalid_tar",
                format!("the body is not a complete tar archive of a model folder: {e}"),
            ))
        }
    };
    let merged = dir.join(".merged.safetensors");
    let folder = check_folder(&dir, kept, merged, header_limit, check, gone.0.clone()).await?;
    ignored.extend(folder.ignored);
    Ok(StagedFolder { weights: folder.weights, files: folder.files, ignored, dir: guard })
}

/// A folder that passed [`check_folder`]: its weights as one file, its companions, and the files
/// of the folder that are not kept.
pub struct CheckedFolder {
    pub weights: StagedUpload,
    pub files: Vec<StagedFile>,
    pub ignored: Vec<String>,
}

/// What every folder upload (a tar body, a committed draft) runs once its files are in `dir`:
/// the folder checked as [`ModelFolder`] does (index against shards, lone shards, companions),
/// sharded weights merged into `merged` (removed again on failure), the weights' header read
/// and `check`ed. `digests` are the hashes taken while the files were written; a file without
/// one is hashed here. `stop` ends a merge early. Nothing in `dir` is changed.
pub async fn check_folder(
    dir: &Path,
    digests: BTreeMap<String, FileDigest>,
    merged: PathBuf,
    header_limit: u64,
    check: HeaderCheck<'_>,
    stop: Arc<AtomicBool>,
) -> Result<CheckedFolder, ApiError> {
    let work = dir.to_owned();
    let opened = tokio::task::spawn_blocking(move || {
        let folder = ModelFolder::open(&work, header_limit).map_err(folder_error)?;
        let digest = |name: &str, path: &Path| match digests.get(name) {
            Some(d) => Ok(d.clone()),
            None => crate::compress::engine::sha256_file(path)
                .map(|(sha256, bytes)| FileDigest { sha256, bytes })
                .map_err(ApiError::io),
        };
        let mut files = Vec::with_capacity(folder.files.files.len());
        for (name, path) in &folder.files.files {
            let d = digest(name, path)?;
            files.push(StagedFile { name: name.clone(), path: path.clone(), sha256: d.sha256, bytes: d.bytes });
        }
        let weights = match folder.weights {
            Weights::Single(p) => {
                let d = digest(&file_name(&p), &p)?;
                Found::Single(p, d)
            }
            Weights::Sharded(shards) => Found::Sharded(shards),
        };
        Ok::<_, ApiError>((weights, files, folder.ignored))
    })
    .await
    .expect("folder check thread")?;
    let (weights, files, ignored) = opened;
    let (path, sha256, bytes) = match weights {
        Found::Single(p, d) => (p, d.sha256, d.bytes),
        Found::Sharded(shards) => {
            let target = merged.clone();
            let (sha, bytes) = tokio::task::spawn_blocking(move || {
                merge_shards(&shards, &target, &|| stop.load(Ordering::Relaxed))?;
                crate::compress::engine::sha256_file(&target)
            })
            .await
            .expect("merge thread")
            .map_err(|e| {
                let _ = std::fs::remove_file(&merged);
                ApiError::io(e)
            })?;
            (merged, sha, bytes)
        }
    };
    let header = read_header(&path, header_limit)
        .map_err(|e| match e {
            crate::formats::safetensors::ReadError::Header(h) => header_error(h),
            crate::formats::safetensors::ReadError::Io(e) => ApiError::io(e),
        })
        .and_then(|header| check(&header).map(|()| header));
    let header = match header {
        Ok(h) => h,
        Err(e) => {
            if !path.starts_with(dir) {
                let _ = std::fs::remove_file(&path);
            }
            return Err(e);
        }
    };
    Ok(CheckedFolder { weights: StagedUpload { path, sha256, bytes, header }, files, ignored })
}

/// The weights [`ModelFolder::open`] found, with the digest of a single file.
enum Found {
    Single(PathBuf, FileDigest),
    Sharded(Vec<(PathBuf, crate::formats::safetensors::Header)>),
}

fn file_name(path: &Path) -> String {
    path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_top_level_names_are_taken() {
        assert_eq!(top_level(Path::new("./config.json")).as_deref(), Some("config.json"));
        assert_eq!(top_level(Path::new("config.json")).as_deref(), Some("config.json"));
        assert_eq!(top_level(Path::new("original/consolidated.safetensors")), None);
        assert_eq!(top_level(Path::new("../config.json")), None);
        assert_eq!(top_level(Path::new("/etc/passwd")), None);
    }

    #[test]
    fn what_a_folder_keeps() {
        assert!(wanted("model-00001-of-00002.safetensors") && wanted(INDEX_FILE) && wanted("tokenizer.json"));
        assert!(!wanted("README.md") && !wanted(".hidden.safetensors") && !wanted("pytorch_model.bin"));
    }
}
