//! Layered settings: `config/default.toml` (compiled in), an optional file, then environment
//! variables `MODELPRESS__SECTION__KEY`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

const DEFAULTS: &str = include_str!("../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub storage: StorageSettings,
    pub queue: QueueSettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    /// Every request but the health checks and the docs needs a key, even before one exists
    /// (the container sets it). Otherwise keys are needed as soon as one live key exists.
    pub required: bool,
    /// Requests per second one principal (an API key's owner) may make, sustained; bursts of
    /// twice that pass. 0: no limit. The embedded `local` user is not limited.
    pub requests_per_second: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub shutdown_grace_secs: u64,
    pub body_idle_timeout_secs: u64,
    /// Seconds a client has to send a request's headers (slow-loris clients are cut off).
    pub header_read_timeout_secs: u64,
    /// Web origins (`https://host[:port]`, or `*`) whose pages may call the API from a browser
    /// (CORS). Empty (the default): none, browsers keep cross-origin responses from pages.
    #[serde(default)]
    pub cors_allowed_origins: Vec<String>,
}

impl ServerSettings {
    /// Refuses origins a browser never sends (a path, no scheme, a trailing slash).
    fn check_origins(&self) -> Result<(), String> {
        for origin in &self.cors_allowed_origins {
            if origin == "*" {
                continue;
            }
            let rest = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://"));
            // Browsers send origins lower-case, without a default port and without wildcards:
            // anything else would never match and silently serve no page.
            let default_port = (origin.ends_with(":443") && origin.starts_with("https://"))
                || (origin.ends_with(":80") && origin.starts_with("http://"));
            let ok = rest.is_some_and(|r| !r.is_empty() && !r.contains(['/', '?', '#', ' ', '*']))
                && !origin.chars().any(|c| c.is_ascii_uppercase())
                && !default_port
                && axum::http::HeaderValue::from_str(origin).is_ok();
            if !ok {
                return Err(format!(
                    "server.cors_allowed_origins: `{origin}` is not an origin as browsers send it: write scheme://host[:port] in lower case, with no path, wildcard or default port (https://app.example.com), or `*`"
                ));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub data_dir: PathBuf,
    pub max_upload_bytes: u64,
    pub max_header_bytes: u64,
    /// Most tensors one uploaded file may hold.
    pub max_tensors: usize,
    /// Longest tensor name accepted, in bytes.
    pub max_tensor_name_bytes: usize,
    /// Uploads received at once; more answer 503 with `Retry-After`. Each holds a writer
    /// thread of the runtime's blocking pool (512) for its whole life.
    pub max_concurrent_uploads: usize,
    /// Slowest accepted upload, in bytes per second averaged over each window of
    /// `upload_rate_window_secs`; slower ones answer 408 `upload_too_slow`. 0: no floor.
    pub min_upload_bytes_per_sec: u64,
    pub upload_rate_window_secs: u64,
    /// Bytes of models, datasets, drafts' files and job artifacts one principal (an API key's
    /// owner) may store; unset: no quota. The embedded `local` user has none.
    pub max_stored_bytes_per_principal: Option<u64>,
    /// Days a finished job (and its artifacts) is kept; unset keeps them until deleted.
    pub retention_days: Option<u64>,
    /// Seconds a model draft (a folder uploaded file by file) lives after its creation or its
    /// last received file; then it and its files are deleted.
    pub draft_expiry_secs: u64,
    /// Drafts one principal may have open at once; more answer 409 `too_many_drafts`.
    pub max_drafts_per_principal: u64,
    /// The database: `sqlite://` (the default: `modelpress.db` in `data_dir`, owned by this one
    /// process) or `postgres://user:password@host:port/database`, which replicas share (see
    /// [`crate::storage::db`]).
    pub database_url: String,
    /// Where blobs live: `file://` (under `data_dir/blobs`, the default) or
    /// `s3://bucket/prefix` (an S3-compatible store; see [`crate::storage::s3`]).
    pub blob_store: String,
    /// The S3 endpoint (MinIO, Ceph, a local s3s-fs...); unset: AWS, or `AWS_ENDPOINT`.
    pub s3_endpoint: Option<String>,
    /// The S3 region; unset: `AWS_REGION`/`AWS_DEFAULT_REGION`, else `us-east-1`.
    pub s3_region: Option<String>,
    /// Allow plain HTTP to the endpoint (a store on loopback or a private network).
    pub s3_allow_http: bool,
    /// Bytes of fetched blobs the local cache keeps (S3 store only).
    pub blob_cache_bytes: u64,
}

impl StorageSettings {
    /// The S3 settings when `blob_store` names a bucket; `Ok(None)` for the local disk.
    pub fn s3(&self) -> Result<Option<crate::storage::s3::S3Settings>, String> {
        match self.blob_store.as_str() {
            "" | "file://" => Ok(None),
            url if url.starts_with("s3://") => {
                let (bucket, prefix) = crate::storage::s3::S3Settings::parse_url(url)?;
                if self.s3_endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) && !self.s3_allow_http {
                    return Err(format!(
                        "storage.s3_endpoint {} is plain HTTP: set storage.s3_allow_http = true (MODELPRESS__STORAGE__S3_ALLOW_HTTP=true) to use it",
                        self.s3_endpoint.as_deref().unwrap_or_default()
                    ));
                }
                Ok(Some(crate::storage::s3::S3Settings {
                    bucket,
                    prefix,
                    endpoint: self.s3_endpoint.clone(),
                    region: self.s3_region.clone(),
                    allow_http: self.s3_allow_http,
                    cache_bytes: self.blob_cache_bytes,
                }))
            }
            other => Err(format!(
                "storage.blob_store `{other}`: expected `file://` (the local disk under data_dir) or `s3://bucket/prefix`"
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSettings {
    pub workers: Option<usize>,
    pub lease_secs: u64,
    pub max_attempts: u32,
    pub retry_backoff_secs: u64,
    pub max_queued: u64,
    /// Jobs one principal (an API key's) may have waiting; more answer 429.
    pub max_queued_per_principal: u64,
    pub shutdown_grace_secs: u64,
    pub job_nice: i32,
    /// Largest predicted peak memory of one job, in bytes; unset: three quarters of the
    /// machine's (or the container's) memory; 0: no limit.
    pub max_job_memory_bytes: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl QueueSettings {
    /// The memory a job's plan may predict before it is refused, in bytes
    /// (`max_job_memory_bytes`, resolved).
    pub fn job_memory_limit(&self) -> u64 {
        match self.max_job_memory_bytes {
            Some(0) => u64::MAX,
            Some(limit) => limit,
            None => machine_memory_bytes().map_or(u64::MAX, |m| m / 4 * 3),
        }
    }

    /// Worker count, unset resolved to the number of cores.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

/// The memory this process may use: the cgroup v2 limit of its container when one is set, else
/// the machine's `MemTotal`; `None` when neither can be read (not Linux).
pub fn machine_memory_bytes() -> Option<u64> {
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kib| kib * 1024)
    });
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok().and_then(|s| s.trim().parse::<u64>().ok());
    match (total, cgroup) {
        (Some(t), Some(c)) => Some(t.min(c)),
        (t, c) => t.or(c),
    }
}

impl Settings {
    /// Defaults, then `file` if given, then the environment.
    pub fn load(file: Option<&Path>) -> Result<Settings, config::ConfigError> {
        let mut builder =
            config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let settings: Settings = builder
            .add_source(
                config::Environment::with_prefix("MODELPRESS")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // MODELPRESS__SERVER__CORS_ALLOWED_ORIGINS=https://a.example,https://b.example
                    .list_separator(",")
                    .with_list_parse_key("server.cors_allowed_origins"),
            )
            .build()?
            .try_deserialize()?;
        settings.server.check_origins().map_err(config::ConfigError::Message)?;
        if !(1..=3600).contains(&settings.storage.upload_rate_window_secs) {
            return Err(config::ConfigError::Message(format!(
                "storage.upload_rate_window_secs must be 1-3600, got {}",
                settings.storage.upload_rate_window_secs
            )));
        }
        settings.storage.s3().map_err(config::ConfigError::Message)?;
        if settings.storage.draft_expiry_secs == 0 {
            return Err(config::ConfigError::Message(
                "storage.draft_expiry_secs must be at least 1: a draft must live long enough to receive its files"
                    .into(),
            ));
        }
        Ok(settings)
    }

    /// Defaults only: what tests start from before pointing the data dir at a temp dir.
    pub fn defaults() -> Settings {
        config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("config/default.toml is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_loopback_8080_with_data_under_dot_data() {
        let s = Settings::defaults();
        assert_eq!((s.server.host.as_str(), s.server.port), ("127.0.0.1", 8080));
        assert_eq!(s.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(s.storage.max_header_bytes, 16 * 1024 * 1024);
    }

    #[test]
    fn a_file_overrides_the_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("prod.toml");
        std::fs::write(&path, "[server]\nport = 9999\n[queue]\nworkers = 3\n").unwrap();
        let s = Settings::load(Some(&path)).unwrap();
        assert_eq!(s.server.port, 9999);
        assert_eq!(s.queue.worker_count(), 3);
        assert_eq!(s.server.host, "127.0.0.1");
    }

    #[test]
    fn cors_origins_must_be_bare_origins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cors.toml");
        std::fs::write(&path, "[server]\ncors_allowed_origins = [\"https://app.example.com:8443\", \"*\"]\n").unwrap();
        assert_eq!(Settings::load(Some(&path)).unwrap().server.cors_allowed_origins.len(), 2);
        assert!(Settings::defaults().server.cors_allowed_origins.is_empty());
        for bad in ["app.example.com", "https://app.example.com/", "https://app.example.com/ui", "ftp://x", "https://"]
        {
            std::fs::write(&path, format!("[server]\ncors_allowed_origins = [\"{bad}\"]\n")).unwrap();
            let err = Settings::load(Some(&path)).unwrap_err().to_string();
            assert!(err.contains("is not an origin") && err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_keys_in_a_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[server]\nprot = 1\n").unwrap();
        let err = Settings::load(Some(&path)).unwrap_err().to_string();
        assert!(err.contains("prot"), "{err}");
    }
}
