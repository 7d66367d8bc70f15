//! Content-addressed blob storage behind a small trait.
//!
//! Files are named by their SHA-256. Writers stage a file under the store's staging directory,
//! fsync it, then `persist` renames it into place; only after that does a database row point at
//! it. Staged files left by a crash are removed by `sweep_staging` at start.

use std::path::{Path, PathBuf};

use async_trait::async_trait;

/// Where blobs live. The local-disk store is the embedded default; an S3-compatible store
/// implements the same calls (staging stays local because kernels read with positioned I/O).
#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// The local staging and checkpoint directories every store keeps.
    fn dirs(&self) -> &LocalDirs;
    /// A fresh path in the local staging directory for a file being written.
    fn staging_path(&self, hint: &str) -> PathBuf {
        self.dirs().staging_path(hint)
    }
    /// Sends a complete staged file to where the blob will live before the caller takes the blob
    /// gate (an object store's upload takes long; content-addressed, nothing names it yet). The
    /// local disk has nothing to do ahead. [`Self::persist`] must still follow.
    async fn upload_ahead(&self, _staged: &Path, _sha256: &str) -> std::io::Result<()> {
        Ok(())
    }
    /// Moves a complete, fsynced staged file in under `sha256`; if that blob exists already the
    /// staged copy is dropped (same content).
    async fn persist(&self, staged: &Path, sha256: &str) -> std::io::Result<()>;
    /// A local path holding the blob's bytes (an S3 store would fetch into a cache).
    async fn local_path(&self, sha256: &str) -> std::io::Result<PathBuf>;
    async fn delete(&self, sha256: &str) -> std::io::Result<()>;
    /// Removes staged files left behind by a crash; returns how many.
    async fn sweep_staging(&self) -> std::io::Result<usize> {
        self.dirs().sweep_staging().await
    }
    /// Can the store take writes now (readiness probe)?
    async fn check_writable(&self) -> std::io::Result<()>;
    /// A local directory for a job's training checkpoints, kept across restarts (unlike
    /// staging) until the job ends.
    fn checkpoint_dir(&self, job_id: &str) -> PathBuf {
        self.dirs().checkpoint_dir(job_id)
    }
    /// Stored blobs whose key is not in `referenced` (left by a crash between storing a file and
    /// committing its row), to delete at start once the caller checked again under the blob gate.
    /// Listing a large bucket takes long, so it runs outside the gate other replicas wait on.
    async fn unreferenced(&self, referenced: &std::collections::HashSet<String>) -> std::io::Result<Vec<String>>;
}

/// Whether `key` is a SHA-256 in lowercase hex: the only names blobs have.
pub fn is_sha256(key: &str) -> bool {
    key.len() == 64 && key.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Removes a staging directory when dropped (an upload's folder, a job's pinned inputs).
pub struct DirGuard(PathBuf);

impl DirGuard {
    /// Guards `dir` (not created here).
    pub fn new(dir: PathBuf) -> Self {
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The local directories every store keeps: staging (emptied at start) and checkpoints.
#[derive(Debug, Clone)]
pub struct LocalDirs {
    staging: PathBuf,
    checkpoints: PathBuf,
}

impl LocalDirs {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&staging)?;
        Ok(Self { staging, checkpoints: data_dir.join("checkpoints") })
    }

    pub fn staging_path(&self, hint: &str) -> PathBuf {
        self.staging.join(format!("{}-{hint}", uuid::Uuid::new_v4()))
    }

    pub fn checkpoint_dir(&self, job_id: &str) -> PathBuf {
        self.checkpoints.join(job_id)
    }

    pub async fn sweep_staging(&self) -> std::io::Result<usize> {
        let mut n = 0;
        let mut dir = tokio::fs::read_dir(&self.staging).await?;
        while let Some(entry) = dir.next_entry().await? {
            let path = entry.path();
            if entry.file_type().await?.is_dir() {
                tokio::fs::remove_dir_all(&path).await?;
            } else {
                tokio::fs::remove_file(&path).await?;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Can the local disk take writes now?
    pub async fn check_writable(&self) -> std::io::Result<()> {
        let probe = self.staging.join(format!(".probe-{}", uuid::Uuid::new_v4()));
        let written = tokio::fs::write(&probe, b"ok").await;
        // On a full disk the write fails after creating the file: remove it on every path.
        let removed = tokio::fs::remove_file(&probe).await;
        written?;
        removed
    }
}

/// Blobs as files under `<data_dir>/blobs/<aa>/<sha256>`, staging under `<data_dir>/staging`.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
    dirs: LocalDirs,
}

impl LocalBlobStore {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("blobs");
        std::fs::create_dir_all(&root)?;
        Ok(Self { root, dirs: LocalDirs::open(data_dir)? })
    }

    fn path_of(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2]).join(sha256)
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    fn dirs(&self) -> &LocalDirs {
        &self.dirs
    }

    async fn persist(&self, staged: &Path, sha256: &str) -> std::io::Result<()> {
        assert!(is_sha256(sha256), "sha256 key");
        let dest = self.path_of(sha256);
        let staged = staged.to_owned();
        tokio::task::spawn_blocking(move || {
            let dir = dest.parent().expect("blob dir");
            std::fs::create_dir_all(dir)?;
            if dest.exists() {
                std::fs::remove_file(&staged)?;
                return Ok(());
            }
            std::fs::rename(&staged, &dest)?;
            fsync_dir(dir)
        })
        .await
        .expect("persist task")
    }

    async fn local_path(&self, sha256: &str) -> std::io::Result<PathBuf> {
        let p = self.path_of(sha256);
        if tokio::fs::try_exists(&p).await? {
            Ok(p)
        } else {
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("blob {sha256} is missing")))
        }
    }

    async fn delete(&self, sha256: &str) -> std::io::Result<()> {
        match tokio::fs::remove_file(self.path_of(sha256)).await {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    async fn check_writable(&self) -> std::io::Result<()> {
        self.dirs.check_writable().await
    }

    async fn unreferenced(&self, referenced: &std::collections::HashSet<String>) -> std::io::Result<Vec<String>> {
        let mut found = Vec::new();
        let mut shards = tokio::fs::read_dir(&self.root).await?;
        while let Some(shard) = shards.next_entry().await? {
            if !shard.file_type().await?.is_dir() {
                continue;
            }
            let mut files = tokio::fs::read_dir(shard.path()).await?;
            while let Some(f) = files.next_entry().await? {
                let name = f.file_name().to_string_lossy().into_owned();
                let in_place = is_sha256(&name) && shard.file_name().to_string_lossy() == name[..2];
                if !in_place {
                    // Not a blob of this store (no name a persist writes): nothing can come to
                    // name it, so it goes at once.
                    tokio::fs::remove_file(f.path()).await?;
                } else if !referenced.contains(&name) {
                    found.push(name);
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn persisting_the_same_content_twice_keeps_one_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        let sha = "ab".repeat(32);
        for _ in 0..2 {
            let staged = store.staging_path("x");
            std::fs::write(&staged, b"data").unwrap();
            store.persist(&staged, &sha).await.unwrap();
            assert!(!staged.exists());
        }
        let path = store.local_path(&sha).await.unwrap();
        assert_eq!(std::fs::read(path).unwrap(), b"data");
        assert_eq!(std::fs::read_dir(dir.path().join("staging")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn sweeping_removes_leftover_staged_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        std::fs::write(store.staging_path("upload"), b"partial").unwrap();
        std::fs::create_dir(store.staging_path("job")).unwrap();
        assert_eq!(store.sweep_staging().await.unwrap(), 2);
        assert_eq!(store.sweep_staging().await.unwrap(), 0);
    }

    /// What every blob store must do, run on the local disk always and on an S3 endpoint when
    /// `MODELPRESS_TEST_S3_ENDPOINT` is set (see [`s3_from_env`]).
    pub(crate) async fn conformance(store: &dyn BlobStore, data_dir: &Path) {
        use sha2::{Digest, Sha256};
        let put = |bytes: &[u8]| {
            let staged = store.staging_path("conformance");
            std::fs::write(&staged, bytes).unwrap();
            (staged, hex::encode(Sha256::digest(bytes)))
        };
        // Larger than a multipart part (8 MiB), not a multiple of it.
        let big: Vec<u8> = (0..(17u32 << 20) + 12_345).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
        let (staged, a) = put(&big);
        store.persist(&staged, &a).await.unwrap();
        assert!(!staged.exists(), "persist takes the staged file");
        assert_eq!(std::fs::read(store.local_path(&a).await.unwrap()).unwrap(), big);
        // The same content again: one blob, the staged copy dropped.
        let (again, same) = put(&big);
        store.persist(&again, &same).await.unwrap();
        assert!(!again.exists());
        // Another replica (an empty cache) reads the same bytes.
        let cache = data_dir.join("blob-cache");
        if cache.exists() {
            std::fs::remove_dir_all(&cache).unwrap();
            std::fs::create_dir_all(&cache).unwrap();
        }
        assert_eq!(std::fs::read(store.local_path(&a).await.unwrap()).unwrap(), big);
        // Referenced blobs survive the start-up sweep.
        let (staged, b) = put(b"small");
        store.persist(&staged, &b).await.unwrap();
        let referenced: std::collections::HashSet<String> = [a.clone(), b.clone()].into();
        assert_eq!(store.unreferenced(&referenced).await.unwrap(), Vec::<String>::new());
        assert_eq!(std::fs::read(store.local_path(&b).await.unwrap()).unwrap(), b"small");
        // Deleted means gone, and deleting twice is fine.
        store.delete(&b).await.unwrap();
        store.delete(&b).await.unwrap();
        if cache.exists() {
            std::fs::remove_dir_all(&cache).unwrap();
            std::fs::create_dir_all(&cache).unwrap();
        }
        let missing = store.local_path(&b).await.unwrap_err();
        assert_eq!(missing.kind(), std::io::ErrorKind::NotFound, "{missing}");
        // Staging leftovers go; the store takes writes.
        std::fs::write(store.staging_path("left"), b"x").unwrap();
        assert_eq!(store.sweep_staging().await.unwrap(), 1);
        store.check_writable().await.unwrap();
        store.delete(&a).await.unwrap();
    }

    #[tokio::test]
    async fn the_local_disk_passes_the_blob_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::open(dir.path()).unwrap();
        conformance(&store, dir.path()).await;
        // The local store lists unreferenced files at once (one process owns the directory).
        let staged = store.staging_path("stray");
        std::fs::write(&staged, b"stray").unwrap();
        store.persist(&staged, &"cd".repeat(32)).await.unwrap();
        // Files no persist writes (another name, a hash in the wrong shard) go at once.
        std::fs::write(dir.path().join("blobs/cd/junk.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("blobs/cd").join("ef".repeat(32)), b"x").unwrap();
        assert_eq!(store.unreferenced(&Default::default()).await.unwrap(), ["cd".repeat(32)]);
        assert_eq!(std::fs::read_dir(dir.path().join("blobs/cd")).unwrap().count(), 1);
    }

    /// An S3 store on the endpoint of `MODELPRESS_TEST_S3_ENDPOINT` (bucket
    /// `MODELPRESS_TEST_S3_BUCKET`, default `modelpress-test`; credentials from `AWS_*`), under a
    /// fresh prefix; `None` (the test says it skipped) when the variable is unset.
    pub(crate) fn s3_from_env(data_dir: &Path) -> Option<crate::storage::s3::S3BlobStore> {
        let endpoint = std::env::var("MODELPRESS_TEST_S3_ENDPOINT").ok()?;
        let settings = crate::storage::s3::S3Settings {
            bucket: std::env::var("MODELPRESS_TEST_S3_BUCKET").unwrap_or_else(|_| "modelpress-test".into()),
            prefix: format!("conformance/{}", uuid::Uuid::new_v4()),
            allow_http: endpoint.starts_with("http://"),
            endpoint: Some(endpoint),
            region: Some("us-east-1".into()),
            cache_bytes: 1 << 30,
        };
        Some(crate::storage::s3::S3BlobStore::open(data_dir, &settings).unwrap())
    }

    #[tokio::test]
    async fn an_s3_endpoint_passes_the_blob_store_suite() {
        let dir = tempfile::tempdir().unwrap();
        let Some(store) = s3_from_env(dir.path()) else {
            eprintln!(
                "skipped: set MODELPRESS_TEST_S3_ENDPOINT (and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) to run it"
            );
            return;
        };
        conformance(&store, dir.path()).await;
    }
}
