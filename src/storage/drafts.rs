//! Model drafts: the rows of a folder uploaded file by file, and the directory holding its
//! files (`<data_dir>/drafts/<id>/`, outside staging, which is emptied at every start).
//!
//! A file is streamed to staging first and renamed into its draft's directory only when it is
//! complete, under the draft's lock, together with its row: a draft's directory holds complete
//! files only, and a commit (which holds the same lock while it checks and merges) never sees
//! one change under it.

use crate::storage::error::StorageError;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use super::db::Db;

use super::catalog::ModelFile;
use super::now_ms;

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DraftRecord {
    pub id: String,
    /// The principal whose key created it (`local` without keys).
    pub owner: String,
    /// The name the committed model gets.
    pub name: Option<String>,
    pub created_at: i64,
    pub expires_at: i64,
}

/// What serialises the changes of one draft.
#[derive(Default)]
pub struct DraftLock {
    /// Held while a file moves in, while the draft is deleted, and for a whole commit.
    pub files: tokio::sync::Mutex<()>,
    /// Set for the length of a commit, so a second commit, or a file sent meanwhile, is told at
    /// once instead of waiting for the merge.
    pub committing: AtomicBool,
}

#[derive(Clone)]
pub struct Drafts {
    db: Db,
    /// `<data_dir>/drafts`.
    root: PathBuf,
    /// One lock per draft touched since the start, by id; an entry goes with its draft.
    locks: Arc<Mutex<HashMap<String, Arc<DraftLock>>>>,
}

impl Drafts {
    pub fn open(db: Db, data_dir: &Path) -> std::io::Result<Drafts> {
        let root = data_dir.join("drafts");
        std::fs::create_dir_all(&root)?;
        Ok(Drafts { db, root, locks: Arc::default() })
    }

    /// The directory of draft `id`'s complete files (created by the first file).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.root.join(id)
    }

    pub fn lock(&self, id: &str) -> Arc<DraftLock> {
        self.locks.lock().expect("draft locks").entry(id.to_owned()).or_default().clone()
    }

    /// A new draft for `owner` living `ttl_ms`, unless `owner` has `max_open` live drafts already
    /// (`Ok(None)`); the count and the insert are one transaction.
    pub async fn create(
        &self,
        owner: &str,
        name: Option<&str>,
        ttl_ms: i64,
        max_open: u64,
    ) -> Result<Option<DraftRecord>, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let now = now_ms();
        let open: i64 = sqlx::query_scalar("select count(*) from model_drafts where owner = $1 and expires_at > $2")
            .bind(owner)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
        if open as u64 >= max_open {
            return Ok(None);
        }
        let rec = sqlx::query_as(
            "insert into model_drafts (id, owner, name, created_at, expires_at) values ($1, $2, $3, $4, $5) returning *",
        )
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(owner)
        .bind(name)
        .bind(now)
        .bind(now.saturating_add(ttl_ms))
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(rec))
    }

    /// The draft `id` unless it expired.
    /// Live drafts, newest first, at most `limit`; `owner` limits them to one principal's
    /// (`None`: everyone's).
    pub async fn list(&self, owner: Option<&str>, limit: u32) -> Result<Vec<DraftRecord>, StorageError> {
        sqlx::query_as(
            "select * from model_drafts where expires_at > $1 and ($2 is null or owner = $2)
             order by created_at desc, id desc limit $3",
        )
        .bind(now_ms())
        .bind(owner)
        .bind(limit as i64)
        .fetch_all(&self.db.pool)
        .await
        .map_err(StorageError::from)
    }

    pub async fn get(&self, id: &str) -> Result<Option<DraftRecord>, StorageError> {
        sqlx::query_as("select * from model_drafts where id = $1 and expires_at > $2")
            .bind(id)
            .bind(now_ms())
            .fetch_optional(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    /// The draft's files, by name.
    pub async fn files(&self, id: &str) -> Result<Vec<ModelFile>, StorageError> {
        sqlx::query_as("select name, sha256, bytes from model_draft_files where draft_id = $1 order by name")
            .bind(id)
            .fetch_all(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    /// Records `file` (moved into the draft's directory by the caller, under the draft's lock)
    /// and gives the draft `ttl_ms` more; returns whether it replaced a file of that name.
    pub async fn put_file(&self, id: &str, file: &ModelFile, ttl_ms: i64) -> Result<bool, StorageError> {
        let mut tx = self.db.write_tx().await?;
        let replaced: Option<i64> =
            sqlx::query_scalar("select bytes from model_draft_files where draft_id = $1 and name = $2")
                .bind(id)
                .bind(&file.name)
                .fetch_optional(&mut *tx)
                .await?;
        // Only while the draft exists: another replica may have deleted it (or let it expire).
        let recorded = sqlx::query(
            "insert into model_draft_files (draft_id, name, sha256, bytes)
             select $1, $2, $3, $4 where exists (select 1 from model_drafts where id = $1)
             on conflict (draft_id, name) do update set sha256 = excluded.sha256, bytes = excluded.bytes",
        )
        .bind(id)
        .bind(&file.name)
        .bind(&file.sha256)
        .bind(file.bytes)
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            // Deleted between the check and the insert (Postgres checks the key at the insert).
            sqlx::Error::Database(d) if d.is_foreign_key_violation() => StorageError::NotFound(format!("draft {id}")),
            _ => e.into(),
        })?
        .rows_affected();
        if recorded == 0 {
            return Err(StorageError::NotFound(format!("draft {id}")));
        }
        sqlx::query(
            "update model_drafts set expires_at = case when expires_at > $1 then expires_at else $1 end where id = $2",
        )
        .bind(now_ms().saturating_add(ttl_ms))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(replaced.is_some())
    }

    /// Deletes the draft's rows, then its files. The caller holds the draft's lock.
    pub async fn discard(&self, id: &str) -> Result<(), StorageError> {
        sqlx::query("delete from model_drafts where id = $1").bind(id).execute(&self.db.pool).await?;
        if let Err(e) = tokio::fs::remove_dir_all(self.dir(id)).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, draft_id = id, "draft deleted but its files remain; removed at next start");
            }
        }
        self.locks.lock().expect("draft locks").remove(id);
        Ok(())
    }

    /// Deletes expired drafts that nothing is using now, then the directories here that no draft
    /// owns any more (deleted or expired through another replica sharing the database, or left
    /// by a crash), except those a request is using; returns how many drafts went. `at_start`:
    /// no request runs yet, so every such directory goes.
    pub async fn sweep(&self, at_start: bool) -> Result<usize, StorageError> {
        let now = now_ms();
        let expired: Vec<String> = sqlx::query_scalar("select id from model_drafts where expires_at <= $1")
            .bind(now)
            .fetch_all(&self.db.pool)
            .await?;
        let mut swept = 0;
        for id in expired {
            let lock = self.lock(&id);
            // A file moving in or a commit: that draft goes at the next sweep.
            let Ok(_held) = lock.files.try_lock() else { continue };
            // Still expired (a file received meanwhile on another replica pushes it back).
            let gone = sqlx::query("delete from model_drafts where id = $1 and expires_at <= $2")
                .bind(&id)
                .bind(now)
                .execute(&self.db.pool)
                .await?
                .rows_affected();
            if gone == 1 {
                self.discard(&id).await?;
                swept += 1;
            }
        }
        // Directories first, rows second: a draft's row exists before its directory, so one
        // listed here without a row is no live draft's.
        let root = self.root.clone();
        let dirs: Vec<std::path::PathBuf> = tokio::task::spawn_blocking(move || match std::fs::read_dir(root) {
            Ok(entries) => entries.flatten().map(|e| e.path()).collect(),
            Err(_) => Vec::new(),
        })
        .await
        .unwrap_or_default();
        let live: std::collections::HashSet<String> =
            sqlx::query_scalar("select id from model_drafts").fetch_all(&self.db.pool).await?.into_iter().collect();
        for dir in dirs {
            let id = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if live.contains(&id) {
                continue;
            }
            let lock = self.lock(&id);
            let held = lock.files.try_lock();
            if at_start || held.is_ok() {
                let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
                drop(held);
                self.locks.lock().expect("draft locks").remove(&id);
            }
        }
        Ok(swept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn drafts() -> (tempfile::TempDir, Drafts) {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::db::Db::connect("sqlite://", dir.path()).await.unwrap();
        let drafts = Drafts::open(db, dir.path()).unwrap();
        (dir, drafts)
    }

    fn file(name: &str, bytes: i64) -> ModelFile {
        ModelFile { name: name.into(), sha256: "ab".repeat(32), bytes }
    }

    #[tokio::test]
    async fn a_principal_gets_at_most_its_cap_of_open_drafts_and_expired_ones_do_not_count() {
        let (_dir, drafts) = drafts().await;
        assert!(drafts.create("alice", None, 60_000, 2).await.unwrap().is_some());
        assert!(drafts.create("alice", Some("m"), 60_000, 2).await.unwrap().is_some());
        assert!(drafts.create("alice", None, 60_000, 2).await.unwrap().is_none());
        assert!(drafts.create("bob", None, 60_000, 2).await.unwrap().is_some(), "the cap is per principal");
        let gone = drafts.create("carol", None, 0, 1).await.unwrap().unwrap();
        assert!(drafts.get(&gone.id).await.unwrap().is_none(), "an expired draft is not found");
        assert!(drafts.create("carol", None, 60_000, 1).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_file_sent_again_replaces_its_row_and_pushes_the_expiry_back() {
        let (_dir, drafts) = drafts().await;
        let d = drafts.create("alice", None, 1_000, 8).await.unwrap().unwrap();
        assert!(!drafts.put_file(&d.id, &file("config.json", 10), 60_000).await.unwrap());
        assert!(drafts.put_file(&d.id, &file("config.json", 12), 60_000).await.unwrap());
        assert_eq!(drafts.files(&d.id).await.unwrap(), [file("config.json", 12)]);
        assert!(drafts.get(&d.id).await.unwrap().unwrap().expires_at >= d.created_at + 60_000);
    }

    #[tokio::test]
    async fn sweeping_deletes_expired_drafts_with_their_files_and_keeps_live_ones() {
        let (_dir, drafts) = drafts().await;
        let live = drafts.create("alice", None, 60_000, 8).await.unwrap().unwrap();
        let old = drafts.create("alice", None, 0, 8).await.unwrap().unwrap();
        for d in [&live, &old] {
            std::fs::create_dir_all(drafts.dir(&d.id)).unwrap();
            std::fs::write(drafts.dir(&d.id).join("config.json"), "{}").unwrap();
            drafts.put_file(&d.id, &file("config.json", 2), 0).await.unwrap();
        }
        std::fs::create_dir_all(drafts.dir("stray")).unwrap();
        assert_eq!(drafts.sweep(true).await.unwrap(), 1);
        assert!(drafts.dir(&live.id).join("config.json").is_file());
        assert!(!drafts.dir(&old.id).exists() && !drafts.dir("stray").exists());
        assert!(drafts.files(&old.id).await.unwrap().is_empty(), "its file rows went with it");
    }
}
