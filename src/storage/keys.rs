//! API keys: their format, and their rows.
//!
//! A key reads `mp_<id>_<secret><check>`: `id` is 12 hex characters (the row's id, public),
//! `secret` 40 base62 characters (about 238 random bits from the OS, through UUID v4s) and
//! `check` the first 6 base62 characters of SHA-256 over everything before it, so a leaked key
//! is recognisable by a scanner (the `mp_` prefix and a valid checksum) without the database,
//! as GitHub's tokens are. Only SHA-256 of the secret is stored (the secret has too much entropy
//! for a slow hash to add anything) and it is compared in constant time.

use super::db::Db;
use crate::storage::error::StorageError;
use sha2::{Digest, Sha256};

use super::now_ms;

/// What a key may do; each scope implies the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Lists, downloads, reports, plans, job events, metrics.
    Read,
    /// Uploads, jobs, cancel, graphs, deletes.
    Write,
    /// Everything, keys included.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// Live keys one principal may hold at once: two, so a key can be rotated without downtime.
pub const MAX_LIVE_KEYS_PER_PRINCIPAL: i64 = 2;

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const SECRET_LEN: usize = 40;
const CHECK_LEN: usize = 6;

fn base62(bytes: &[u8], len: usize) -> String {
    // Each output character takes 6 bits of the input (a value below 62 is kept; 62 and 63 are
    // folded back, a bias of under 4% per character that costs about 0.1 bit of the 5.95).
    let mut bits = bytes.iter().flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1));
    (0..len)
        .map(|_| {
            let v = (0..6).fold(0u8, |acc, _| (acc << 1) | bits.next().unwrap_or(0));
            BASE62[(v % 62) as usize] as char
        })
        .collect()
}

fn checksum(body: &str) -> String {
    base62(&Sha256::digest(body.as_bytes()), CHECK_LEN)
}

/// SHA-256 (hex) of a key's secret part, as stored.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new key: (id, secret, the full key text).
pub fn generate() -> (String, String, String) {
    let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let random: Vec<u8> = (0..3).flat_map(|_| *uuid::Uuid::new_v4().as_bytes()).collect();
    let secret = base62(&random, SECRET_LEN);
    let body = format!("mp_{id}_{secret}");
    let key = format!("{body}{}", checksum(&body));
    (id, secret, key)
}

/// Why a presented key is not one: its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyFormatError {
    NotAModelPressKey,
    BadChecksum,
}

/// Splits a key into (id, secret) after checking its shape and checksum.
pub fn parse(key: &str) -> Result<(&str, &str), KeyFormatError> {
    let rest = key.strip_prefix("mp_").ok_or(KeyFormatError::NotAModelPressKey)?;
    let (id, tail) = rest.split_once('_').ok_or(KeyFormatError::NotAModelPressKey)?;
    let shaped = id.len() == 12
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && tail.len() == SECRET_LEN + CHECK_LEN
        && tail.bytes().all(|b| b.is_ascii_alphanumeric());
    if !shaped {
        return Err(KeyFormatError::NotAModelPressKey);
    }
    let (secret, check) = tail.split_at(SECRET_LEN);
    if checksum(&key[..key.len() - CHECK_LEN]) != check {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok((id, secret))
}

/// Equality of two strings in time that depends on their length only.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A key's row (never its secret).
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize)]
pub struct KeyRecord {
    pub id: String,
    pub principal: String,
    pub name: Option<String>,
    pub scopes: String,
    #[serde(skip)]
    pub secret_sha256: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl KeyRecord {
    pub fn scope(&self) -> Scope {
        Scope::parse(&self.scopes).unwrap_or(Scope::Read)
    }

    pub fn live(&self, now: i64) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now)
    }
}

/// What creating a key may run into.
#[derive(Debug)]
pub enum CreateError {
    /// The principal already has [`MAX_LIVE_KEYS_PER_PRINCIPAL`] live keys.
    TooManyKeys(i64),
    Database(StorageError),
}

impl From<sqlx::Error> for CreateError {
    fn from(e: sqlx::Error) -> Self {
        CreateError::Database(e.into())
    }
}

impl From<StorageError> for CreateError {
    fn from(e: StorageError) -> Self {
        CreateError::Database(e)
    }
}

/// The `api_keys` table.
#[derive(Clone)]
pub struct KeyStore {
    db: Db,
    /// Set once a key is known to exist: [`KeyStore::any`] never turns false again (revoked and
    /// expired keys count), so the answer is kept instead of asked per request.
    seen_a_key: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl KeyStore {
    pub fn new(db: Db) -> KeyStore {
        KeyStore { db, seen_a_key: Default::default() }
    }

    /// Creates a key for `principal`; returns its row and the full key (shown once).
    pub async fn create(
        &self,
        principal: &str,
        name: Option<&str>,
        scope: Scope,
        expires_at: Option<i64>,
    ) -> Result<(KeyRecord, String), CreateError> {
        let mut tx = self.db.write_tx().await?;
        let now = now_ms();
        let live: i64 = sqlx::query_scalar(
            "select count(*) from api_keys where principal = $1 and revoked_at is null
             and (expires_at is null or expires_at > $2)",
        )
        .bind(principal)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        if live >= MAX_LIVE_KEYS_PER_PRINCIPAL {
            return Err(CreateError::TooManyKeys(live));
        }
        let (id, secret, key) = generate();
        let record: KeyRecord = sqlx::query_as(
            "insert into api_keys (id, principal, name, scopes, secret_sha256, created_at, expires_at)
             values ($1, $2, $3, $4, $5, $6, $7) returning *",
        )
        .bind(&id)
        .bind(principal)
        .bind(name)
        .bind(scope.as_str())
        .bind(secret_hash(&secret))
        .bind(now)
        .bind(expires_at)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok((record, key))
    }

    pub async fn get(&self, id: &str) -> Result<Option<KeyRecord>, StorageError> {
        sqlx::query_as("select * from api_keys where id = $1")
            .bind(id)
            .fetch_optional(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    /// Every key, newest first.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, StorageError> {
        sqlx::query_as("select * from api_keys order by created_at desc, id")
            .fetch_all(&self.db.pool)
            .await
            .map_err(StorageError::from)
    }

    /// Revokes a key; false when there is no such key. Revoking twice keeps the first time.
    pub async fn revoke(&self, id: &str) -> Result<bool, StorageError> {
        let done = sqlx::query("update api_keys set revoked_at = coalesce(revoked_at, $1) where id = $2")
            .bind(now_ms())
            .bind(id)
            .execute(&self.db.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Whether any key was ever created: then every request needs one. Revoked and expired
    /// keys count, so revoking the last key never reopens the server to anonymous admins.
    /// Once true it stays true, and is answered from memory (a database round trip per request
    /// costs on a shared server); while false it is asked every time, so a key created by
    /// another process or replica takes effect at once.
    pub async fn any(&self) -> Result<bool, StorageError> {
        use std::sync::atomic::Ordering;
        if self.seen_a_key.load(Ordering::Acquire) {
            return Ok(true);
        }
        let n: i64 = sqlx::query_scalar("select count(*) from (select 1 from api_keys limit 1) as any_key")
            .fetch_one(&self.db.pool)
            .await?;
        if n > 0 {
            self.seen_a_key.store(true, Ordering::Release);
        }
        Ok(n > 0)
    }

    /// Records a use of `key`, at most once a minute: the check is made on the row already read,
    /// because an UPDATE takes SQLite's write lock even when it changes nothing, and a write per
    /// request would queue reads behind job progress writes.
    pub async fn touch(&self, key: &KeyRecord) -> Result<(), StorageError> {
        let now = now_ms();
        if key.last_used_at.is_some_and(|t| t > now - 60_000) {
            return Ok(());
        }
        sqlx::query("update api_keys set last_used_at = $1 where id = $2")
            .bind(now)
            .bind(&key.id)
            .execute(&self.db.pool)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_parses_back_to_its_id_and_secret() {
        let (id, secret, key) = generate();
        assert!(key.starts_with("mp_") && key.len() == 3 + 12 + 1 + SECRET_LEN + CHECK_LEN, "{key}");
        assert_eq!(parse(&key), Ok((id.as_str(), secret.as_str())));
        assert_ne!(generate().2, key, "keys are random");
    }

    #[test]
    fn a_typo_fails_the_checksum_and_other_text_is_not_a_key() {
        let (_, _, key) = generate();
        let mut typo = key.clone().into_bytes();
        let i = 20;
        typo[i] = if typo[i] == b'a' { b'b' } else { b'a' };
        assert_eq!(parse(std::str::from_utf8(&typo).unwrap()), Err(KeyFormatError::BadChecksum));
        for bad in ["", "mp_", "Bearer x", "mp_xyz_abc", &key[..key.len() - 1], &format!("{key}0")] {
            assert_eq!(parse(bad), Err(KeyFormatError::NotAModelPressKey), "{bad}");
        }
    }

    #[test]
    fn constant_time_equality_is_equality() {
        assert!(constant_time_eq("abc", "abc"));
        assert!(!constant_time_eq("abc", "abd"));
        assert!(!constant_time_eq("abc", "ab"));
    }

    #[test]
    fn scopes_are_ordered_read_write_admin() {
        assert!(Scope::Read < Scope::Write && Scope::Write < Scope::Admin);
        assert_eq!(Scope::parse("write"), Some(Scope::Write));
        assert_eq!(Scope::parse("root"), None);
    }
}
