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
    /// A fresh path in the local staging directory for a file being written.
    fn staging_path(&self, hint: &str) -> PathBuf;
    /// Moves a complete, fsynced staged file in under `sha256`; if that blob exists already the
    /// staged copy is dropped (same content).
    async fn persist(&self, staged: &Path, sha256: &str) -> std::io::Result<()>;
    /// A local path holding the blob's bytes (an S3 store would fetch into a cache).
    async fn local_path(&self, sha256: &str) -> std::io::Result<PathBuf>;
    async fn delete(&self, sha256: &str) -> std::io::Result<()>;
    /// Removes staged files left behind by a crash; returns how many.
    async fn sweep_staging(&self) -> std::io::Result<usize>;
    /// Can the store take writes now (readiness probe)?
    async fn check_writable(&self) -> std::io::Result<()>;
    /// A local directory for a job's training checkpoints, kept across restarts (unlike
    /// staging) until the job ends.
    fn checkpoint_dir(&self, job_id: &str) -> PathBuf;
}

/// Blobs as files under `<data_dir>/blobs/<aa>/<sha256>`, staging under `<data_dir>/staging`.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
    staging: PathBuf,
    checkpoints: PathBuf,
}

impl LocalBlobStore {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let root = data_dir.join("blobs");
        let staging = data_dir.join("staging");
        std::fs::create_dir_all(&root)?;
        std::fs::create_dir_all(&staging)?;
        Ok(Self { root, staging, checkpoints: data_dir.join("checkpoints") })
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
    fn staging_path(&self, hint: &str) -> PathBuf {
        self.staging.join(format!("{}-{hint}", uuid::Uuid::new_v4()))
    }

    fn checkpoint_dir(&self, job_id: &str) -> PathBuf {
        self.checkpoints.join(job_id)
    }

    async fn persist(&self, staged: &Path, sha256: &str) -> std::io::Result<()> {
        assert!(sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit()), "sha256 key");
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

    async fn sweep_staging(&self) -> std::io::Result<usize> {
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

    async fn check_writable(&self) -> std::io::Result<()> {
        let probe = self.staging.join(format!(".probe-{}", uuid::Uuid::new_v4()));
        let written = tokio::fs::write(&probe, b"ok").await;
        // On a full disk the write fails after creating the file: remove it on every path.
        let removed = tokio::fs::remove_file(&probe).await;
        written?;
        removed
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
}
