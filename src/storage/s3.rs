//! Blobs in an S3-compatible object store (AWS S3, MinIO, Ceph, GCS in S3 mode) through Apache
//! Arrow's `object_store`, with a bounded local cache for reading.
//!
//! - Keys: `<prefix>/<aa>/<sha256>`, the content's hash, as on the local disk.
//! - Persist: the staged file (complete, hashed, checked) is sent as a multipart upload in 8 MiB
//!   parts, two in flight (bounded memory); a failed upload is aborted. An object that already
//!   exists under the key is not sent again (same content). The staged file then becomes the
//!   cache entry, so the job or download that follows reads it without a round trip.
//! - Read: kernels and downloads read with positioned I/O (`pread`, HTTP `Range`), so a blob is
//!   fetched whole into `<data_dir>/blob-cache` the first time it is needed (one fetch at a time
//!   per blob) and served from there. The cache is trimmed to `storage.blob_cache_bytes`, least
//!   recently used first, never touching entries used in the last ten minutes (a job may have
//!   just been handed the path), so it may sit above the limit while that many blobs are in use.
//!   Whole-blob caching was chosen over ranged GETs: every job reads all of its input, in an
//!   order set by the plan, often twice (prepasses, the output check), and safetensors readers
//!   (candle's mmap included) want a file.
//! - Visibility: an object appears under its key when its upload completes, before the database
//!   row that names it; nothing reads a blob without a row, and an object no row names is
//!   listed by [`BlobStore::unreferenced`] (and deleted at start) once it is an hour old.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use tokio::io::AsyncWriteExt;

use super::blobs::{is_sha256, BlobStore, LocalDirs};

/// Where and how to reach the bucket (`storage.blob_store = "s3://bucket/prefix"` and the
/// `storage.s3_*` settings; credentials from the usual `AWS_*` environment variables).
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub allow_http: bool,
    pub cache_bytes: u64,
}

impl S3Settings {
    /// Parses `s3://bucket` or `s3://bucket/some/prefix`.
    pub fn parse_url(url: &str) -> Result<(String, String), String> {
        let rest = url.strip_prefix("s3://").ok_or_else(|| format!("`{url}` is not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(format!("`{url}` names no bucket"));
        }
        Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
    }
}

/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 << 20;
/// Cache entries used more recently than this are never evicted.
const CACHE_GRACE: Duration = Duration::from_secs(600);
/// Objects no row names are removed once older than this (uploads finish before their rows).
const ORPHAN_AGE: Duration = Duration::from_secs(3600);

pub struct S3BlobStore {
    store: AmazonS3,
    prefix: String,
    dirs: LocalDirs,
    cache: PathBuf,
    cache_bytes: u64,
    /// One fetch at a time per blob.
    fetching: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn io_err(e: object_store::Error) -> std::io::Error {
    match e {
        object_store::Error::NotFound { .. } => std::io::Error::new(std::io::ErrorKind::NotFound, e.to_string()),
        e => std::io::Error::other(e.to_string()),
    }
}

impl S3BlobStore {
    /// Opens the store: local staging, checkpoints and cache under `data_dir`, the bucket as
    /// configured (not contacted yet; [`BlobStore::check_writable`] does).
    pub fn open(data_dir: &Path, s: &S3Settings) -> std::io::Result<Self> {
        // No overall request timeout (object_store's default of 30 s would cut every transfer
        // of a multi-GB blob, retried until the retry budget is gone); a stalled connection is
        // caught by the read timeout instead.
        let options = object_store::ClientOptions::new()
            .with_timeout_disabled()
            .with_connect_timeout(Duration::from_secs(10))
            .with_read_timeout(Duration::from_secs(60));
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&s.bucket).with_client_options(options);
        if let Some(e) = &s.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &s.region {
            b = b.with_region(r);
        }
        if s.allow_http {
            b = b.with_allow_http(true);
        }
        let store = b.build().map_err(io_err)?;
        let cache = data_dir.join("blob-cache");
        std::fs::create_dir_all(&cache)?;
        // Fetches a crash or a dropped request left half done.
        for e in std::fs::read_dir(&cache)?.flatten() {
            if e.file_name().to_string_lossy().starts_with('.') {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Self {
            store,
            prefix: s.prefix.clone(),
            dirs: LocalDirs::open(data_dir)?,
            cache,
            cache_bytes: s.cache_bytes,
            fetching: Default::default(),
        })
    }

    /// `rest` under the store's prefix.
    fn under_prefix(&self, rest: &str) -> ObjectPath {
        ObjectPath::from(if self.prefix.is_empty() { rest.to_owned() } else { format!("{}/{rest}", self.prefix) })
    }

    fn key(&self, sha256: &str) -> ObjectPath {
        self.under_prefix(&format!("{}/{sha256}", &sha256[..2]))
    }

    fn prefix_path(&self) -> Option<ObjectPath> {
        (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.as_str()))
    }

    /// Writes and deletes a small object under the prefix: the credentials may write (run at
    /// start; readiness checks only list).
    pub async fn probe_write(&self) -> std::io::Result<()> {
        let key = self.under_prefix(&format!(".modelpress-probe-{}", uuid::Uuid::new_v4()));
        self.store.put(&key, object_store::PutPayload::from_static(b"ok")).await.map_err(io_err)?;
        self.store.delete(&key).await.map_err(io_err)
    }

    fn cached(&self, sha256: &str) -> PathBuf {
        self.cache.join(sha256)
    }

    async fn exists(&self, key: &ObjectPath) -> std::io::Result<bool> {
        match self.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(io_err(e)),
        }
    }

    /// Uploads `file` under `key` as a task of its own: a caller that goes away (a client gone)
    /// cannot leave an incomplete multipart upload behind; a failed one is aborted.
    async fn upload(&self, file: &Path, key: &ObjectPath) -> std::io::Result<()> {
        let (store, file, key) = (self.store.clone(), file.to_owned(), key.clone());
        tokio::spawn(async move { upload(&store, &file, &key).await }).await.expect("upload task")
    }

    /// Evicts least recently used cache entries over the limit (see the module docs).
    async fn trim_cache(&self) -> std::io::Result<()> {
        let mut entries = Vec::new();
        let mut total = 0u64;
        let mut dir = tokio::fs::read_dir(&self.cache).await?;
        while let Some(e) = dir.next_entry().await? {
            let meta = e.metadata().await?;
            if !meta.is_file() || e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            total += meta.len();
            entries.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), meta.len(), e.path()));
        }
        entries.sort();
        let now = SystemTime::now();
        for (used, len, path) in entries {
            if total <= self.cache_bytes {
                break;
            }
            if now.duration_since(used).unwrap_or_default() < CACHE_GRACE {
                break;
            }
            // Used since the listing (a caller was just handed it): it stays.
            let still_old = tokio::fs::metadata(&path)
                .await
                .ok()
                .and_then(|m| m.modified().ok())
                .is_some_and(|m| now.duration_since(m).unwrap_or_default() >= CACHE_GRACE);
            if still_old && tokio::fs::remove_file(&path).await.is_ok() {
                total -= len;
            }
        }
        Ok(())
    }
}

async fn upload(store: &AmazonS3, file: &Path, key: &ObjectPath) -> std::io::Result<()> {
    let mut source = tokio::fs::File::open(file).await?;
    let upload = store.put_multipart(key).await.map_err(io_err)?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let mut buf = vec![0u8; PART_BYTES];
    let sent: std::io::Result<()> = async {
        loop {
            let n = tokio::io::AsyncReadExt::read(&mut source, &mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            writer.wait_for_capacity(2).await.map_err(io_err)?;
            writer.write(&buf[..n]);
        }
    }
    .await;
    match sent {
        Ok(()) => writer.finish().await.map(|_| ()).map_err(io_err),
        Err(e) => {
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

/// Fetches the object at `key` into `dest` in the cache `dir` (whole, to a temporary name, then
/// renamed).
async fn fetch(store: &AmazonS3, key: &ObjectPath, dir: &Path, sha256: &str, dest: &Path) -> std::io::Result<()> {
    let result = store.get(key).await.map_err(io_err)?;
    let partial = dir.join(format!(".{sha256}.{}", uuid::Uuid::new_v4()));
    let mut out = tokio::fs::File::create(&partial).await?;
    let mut stream = result.into_stream();
    let copied: std::io::Result<()> = async {
        while let Some(chunk) = stream.next().await {
            out.write_all(&chunk.map_err(io_err)?).await?;
        }
        out.sync_all().await
    }
    .await;
    if let Err(e) = copied {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(e);
    }
    tokio::fs::rename(&partial, dest).await
}

/// Marks a cache entry used now (its modification time orders the eviction).
fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::options().append(true).open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    fn dirs(&self) -> &LocalDirs {
        &self.dirs
    }

    async fn upload_ahead(&self, staged: &Path, sha256: &str) -> std::io::Result<()> {
        assert!(is_sha256(sha256), "sha256 key");
        let key = self.key(sha256);
        if !self.exists(&key).await? {
            self.upload(staged, &key).await?;
        }
        Ok(())
    }

    async fn persist(&self, staged: &Path, sha256: &str) -> std::io::Result<()> {
        // Normally uploaded ahead, outside the gate: then this only checks it is still there (a
        // delete under the gate since, or a caller that did not upload ahead, means it is sent now).
        self.upload_ahead(staged, sha256).await?;
        // The staged file is the blob's bytes: keep it as the cache entry.
        let cached = self.cached(sha256);
        if tokio::fs::try_exists(&cached).await? {
            tokio::fs::remove_file(staged).await?;
        } else {
            tokio::fs::rename(staged, &cached).await?;
        }
        self.trim_cache().await
    }

    async fn local_path(&self, sha256: &str) -> std::io::Result<PathBuf> {
        if !is_sha256(sha256) {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{sha256}` is not a blob key")));
        }
        let cached = self.cached(sha256);
        // Touched before it is checked, so a trim running now sees it as just used.
        touch(&cached);
        if tokio::fs::try_exists(&cached).await? {
            return Ok(cached);
        }
        let lock = self.fetching.lock().expect("fetch locks").entry(sha256.to_owned()).or_default().clone();
        let one = lock.lock().await;
        let fetched = match tokio::fs::try_exists(&cached).await {
            Ok(true) => Ok(()),
            // A task of its own: a caller that goes away does not leave half a file behind.
            Ok(false) => {
                let (store, key, dir, dest) =
                    (self.store.clone(), self.key(sha256), self.cache.clone(), cached.clone());
                let sha = sha256.to_owned();
                tokio::spawn(async move { fetch(&store, &key, &dir, &sha, &dest).await }).await.expect("fetch task")
            }
            Err(e) => Err(e),
        };
        drop(one);
        // The next caller starts afresh (a failed fetch is tried again); a newer lock another
        // caller made meanwhile stays.
        {
            let mut locks = self.fetching.lock().expect("fetch locks");
            if locks.get(sha256).is_some_and(|l| Arc::ptr_eq(l, &lock)) {
                locks.remove(sha256);
            }
        }
        fetched?;
        touch(&cached);
        self.trim_cache().await?;
        Ok(cached)
    }

    async fn delete(&self, sha256: &str) -> std::io::Result<()> {
        match self.store.delete(&self.key(sha256)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io_err(e)),
        }
        match tokio::fs::remove_file(self.cached(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn check_writable(&self) -> std::io::Result<()> {
        self.dirs.check_writable().await?;
        // The bucket exists and these credentials may list it (a missing bucket is an error
        // here, where a missing key would not be).
        self.store.list_with_delimiter(self.prefix_path().as_ref()).await.map(|_| ()).map_err(io_err)
    }

    async fn unreferenced(&self, referenced: &HashSet<String>) -> std::io::Result<Vec<String>> {
        let prefix = self.prefix_path();
        let mut listing = self.store.list(prefix.as_ref());
        let now = unix_now_secs();
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = meta.map_err(io_err)?;
            let Some(name) = meta.location.filename().map(str::to_owned) else { continue };
            // Only this store's own keys: the listing also shows deeper prefixes (another
            // deployment under `<prefix>/...`).
            if !is_sha256(&name) || meta.location != self.key(&name) || referenced.contains(&name) {
                continue;
            }
            let age = now.saturating_sub(meta.last_modified.timestamp().max(0) as u64);
            if age > ORPHAN_AGE.as_secs() {
                found.push(name);
            }
        }
        Ok(found)
    }
}

/// Seconds since the Unix epoch.
fn unix_now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        assert_eq!(S3Settings::parse_url("s3://models").unwrap(), ("models".into(), "".into()));
        assert_eq!(S3Settings::parse_url("s3://models/team/a/").unwrap(), ("models".into(), "team/a".into()));
        assert!(S3Settings::parse_url("s3:///x").is_err());
        assert!(S3Settings::parse_url("file:///x").is_err());
    }
}
