//! `spawn_app` and a typed client with one method per endpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use modelpress::config::Settings;
use modelpress::startup::Application;
use serde_json::{json, Value};

pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

/// Settings for a test app: temp data dir, port 0, `workers` worker loops.
pub fn test_settings(dir: &Path, workers: usize) -> Settings {
    let mut s = Settings::defaults();
    s.server.port = 0;
    s.storage.data_dir = dir.to_path_buf();
    s.queue.workers = Some(workers);
    s.queue.shutdown_grace_secs = 1;
    s.server.shutdown_grace_secs = 1;
    s
}

/// The database URL an app on `dir` uses: SQLite's default, or with
/// `MODELPRESS_TEST_API_POSTGRES_URL` that directory's own PostgreSQL database.
pub fn test_database_url(dir: &Path) -> String {
    match std::env::var("MODELPRESS_TEST_API_POSTGRES_URL") {
        Ok(server) => postgres_database_for(dir, &server),
        Err(_) => "sqlite://".into(),
    }
}

/// A fresh database named `<prefix>_<uuid>` on the server of `server_url` (a URL ending in
/// `/database`); its URL and name.
pub async fn create_postgres_database(server_url: &str, prefix: &str) -> (String, String) {
    let admin = sqlx::PgPool::connect(server_url).await.expect("the test PostgreSQL server is unreachable");
    let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}"))).execute(&admin).await.unwrap();
    admin.close().await;
    let (base, _) = server_url.rsplit_once('/').expect("a postgres URL ending in /database");
    (format!("{base}/{name}"), name)
}

/// With `MODELPRESS_TEST_API_POSTGRES_URL` (a server URL ending in `/database`), the whole API
/// suite runs on PostgreSQL: each data directory gets a database of its own, created on first
/// use and named in `<data_dir>/.test-database-url`, so an app restarted on the same directory
/// finds its rows again (as it finds its SQLite file). The databases are left to the server's
/// lifetime (CI's is thrown away).
fn postgres_database_for(dir: &Path, server: &str) -> String {
    let marker = dir.join(".test-database-url");
    if let Ok(url) = std::fs::read_to_string(&marker) {
        return url;
    }
    let server = server.to_owned();
    // Settings are built outside any runtime here; a thread of its own runs the one query.
    let url = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(create_postgres_database(&server, "modelpress_api")).0
    })
    .join()
    .unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(&marker, &url).unwrap();
    url
}

pub async fn spawn_app(workers: usize) -> TestApp {
    spawn_app_with(workers, |_| {}).await
}

pub async fn spawn_app_with(workers: usize, tweak: impl FnOnce(&mut Settings)) -> TestApp {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = test_settings(dir.path(), workers);
    tweak(&mut settings);
    if settings.storage.database_url == "sqlite://" {
        settings.storage.database_url = test_database_url(&settings.storage.data_dir);
    }
    let app = Application::build(settings).await.expect("app builds");
    let address = format!("http://127.0.0.1:{}", app.port());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async move {
        let _ = rx.await;
    }));
    TestApp { address, client: reqwest::Client::new(), dir, shutdown: Some(tx), task: Some(task) }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.address)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Stops the app the way SIGTERM would and waits for it.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("app task").expect("app stops cleanly");
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    pub async fn upload(&self, bytes: Vec<u8>) -> reqwest::Response {
        self.client.post(self.url("/v1/models")).body(bytes).send().await.expect("request")
    }

    pub async fn upload_dataset(&self, bytes: Vec<u8>) -> reqwest::Response {
        self.client.post(self.url("/v1/datasets")).body(bytes).send().await.expect("request")
    }

    /// Uploads and returns the new model's id.
    pub async fn upload_ok(&self, bytes: Vec<u8>) -> String {
        let res = self.upload(bytes).await;
        assert_eq!(res.status(), 201, "upload: {}", res.text().await.unwrap());
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    /// POSTs `chunks` as a streamed body to `path` (no Content-Length: chunked transfer).
    pub async fn post_chunks(&self, path: &str, chunks: Vec<Vec<u8>>) -> reqwest::Response {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = chunks.into_iter().map(Ok).collect();
        self.client
            .post(self.url(path))
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)))
            .send()
            .await
            .unwrap()
    }

    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.client.get(self.url(path)).send().await.expect("request")
    }

    pub async fn get_json(&self, path: &str) -> Value {
        let res = self.get(path).await;
        assert!(res.status().is_success(), "GET {path}: {} {}", res.status(), res.text().await.unwrap());
        res.json().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.post(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn put_json(&self, path: &str, body: &Value) -> reqwest::Response {
        self.client.put(self.url(path)).json(body).send().await.expect("request")
    }

    pub async fn create_job(&self, spec: &Value) -> reqwest::Response {
        self.post_json("/v1/jobs", spec).await
    }

    /// Submits and returns the job id (asserting 202).
    pub async fn create_job_ok(&self, spec: &Value) -> String {
        let res = self.create_job(spec).await;
        assert_eq!(res.status(), 202, "create job: {}", res.text().await.unwrap());
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    /// `method path` with `key` as bearer (`None`: no key) and `body`.
    async fn send_as(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
        body: Vec<u8>,
    ) -> reqwest::Response {
        let mut req = self.client.request(method, self.url(path)).body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        req.send().await.expect("request")
    }

    /// `POST /v1/models/drafts?name=tiny-llama`.
    pub async fn create_draft(&self, key: Option<&str>) -> reqwest::Response {
        self.send_as(reqwest::Method::POST, "/v1/models/drafts?name=tiny-llama", key, Vec::new()).await
    }

    /// Opens a draft and returns its id (asserting 201).
    pub async fn create_draft_ok(&self, key: Option<&str>) -> String {
        let res = self.create_draft(key).await;
        assert_eq!(res.status(), 201, "create draft: {}", res.text().await.unwrap());
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    /// `PUT /v1/models/drafts/{id}/files/{name}` with `bytes` as the body.
    pub async fn put_draft_file(&self, key: Option<&str>, id: &str, name: &str, bytes: Vec<u8>) -> reqwest::Response {
        let path = format!("/v1/models/drafts/{id}/files/{name}");
        self.send_as(reqwest::Method::PUT, &path, key, bytes).await
    }

    /// `GET /v1/models/drafts/{id}`.
    pub async fn get_draft(&self, key: Option<&str>, id: &str) -> reqwest::Response {
        self.send_as(reqwest::Method::GET, &format!("/v1/models/drafts/{id}"), key, Vec::new()).await
    }

    /// `GET /v1/models/drafts`: the caller's open drafts.
    pub async fn list_drafts(&self, key: Option<&str>) -> reqwest::Response {
        self.send_as(reqwest::Method::GET, "/v1/models/drafts", key, Vec::new()).await
    }

    /// `DELETE /v1/models/drafts/{id}`.
    pub async fn delete_draft(&self, key: Option<&str>, id: &str) -> reqwest::Response {
        self.send_as(reqwest::Method::DELETE, &format!("/v1/models/drafts/{id}"), key, Vec::new()).await
    }

    /// `POST /v1/models/drafts/{id}/commit`.
    pub async fn commit_draft(&self, key: Option<&str>, id: &str) -> reqwest::Response {
        self.send_as(reqwest::Method::POST, &format!("/v1/models/drafts/{id}/commit"), key, Vec::new()).await
    }

    pub async fn job(&self, id: &str) -> Value {
        self.get_json(&format!("/v1/jobs/{id}")).await
    }

    pub async fn cancel(&self, id: &str) -> reqwest::Response {
        self.client.post(self.url(&format!("/v1/jobs/{id}/cancel"))).send().await.expect("request")
    }

    /// Polls until the job's status satisfies `done`, failing after `timeout`.
    pub async fn wait_for(&self, id: &str, timeout: Duration, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            assert!(start.elapsed() < timeout, "job {id} did not get there in {timeout:?}: {job}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub async fn wait_terminal(&self, id: &str) -> Value {
        self.wait_for(id, Duration::from_secs(60), |j| {
            matches!(j["status"].as_str(), Some("succeeded" | "failed" | "canceled"))
        })
        .await
    }

    pub async fn download(&self, path: &str) -> Vec<u8> {
        let res = self.get(path).await;
        assert_eq!(res.status(), 200, "GET {path}");
        res.bytes().await.unwrap().to_vec()
    }

    /// (model rows via the API, blob files, staging entries): what a failed upload must not change.
    pub async fn stored_state(&self) -> (usize, Vec<String>, usize) {
        let models = self.get_json("/v1/models?limit=200").await["items"].as_array().unwrap().len();
        (models, blob_files(&self.data_dir()), staging_entries(&self.data_dir()))
    }
}

/// The problem+json body of `res`, asserting its status and type.
pub async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    res.json().await.unwrap()
}

pub fn blob_files(data_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(shards) = std::fs::read_dir(data_dir.join("blobs")) {
        for shard in shards.flatten() {
            for f in std::fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                out.push(f.file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

pub fn staging_entries(data_dir: &Path) -> usize {
    std::fs::read_dir(data_dir.join("staging")).map_or(0, |d| d.count())
}

/// A safetensors file from (name, shape, values) as f32, written by the reference crate.
pub fn safetensors_f32(tensors: &[(&str, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.to_string(), s.clone(), v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    let meta: Option<std::collections::HashMap<String, String>> =
        Some([("format".to_string(), "pt".to_string())].into());
    safetensors::tensor::serialize(views, meta).unwrap()
}

/// Deterministic pseudo-random values in [-scale, scale].
pub fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = modelpress::compress::synth::SplitMix64::new(seed);
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) as f32) * scale).collect()
}

/// A small MLP-like model: two weight matrices, a bias, and an int tensor that must be copied.
pub fn small_model() -> Vec<u8> {
    safetensors_f32(&[
        ("fc1.weight", vec![16, 32], values(512, 1, 0.1)),
        ("fc1.bias", vec![16], values(16, 2, 0.1)),
        ("fc2.weight", vec![8, 16], values(128, 3, 0.1)),
    ])
}

/// A model big enough that a job on it runs for a while: `count` matrices of `rows x cols`.
pub fn big_model(count: usize, rows: usize, cols: usize) -> Vec<u8> {
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = (0..count)
        .map(|i| (format!("layers.{i}.weight"), vec![rows, cols], values(rows * cols, 100 + i as u64, 0.05)))
        .collect();
    let refs: Vec<(&str, Vec<usize>, Vec<f32>)> =
        tensors.iter().map(|(n, s, v)| (n.as_str(), s.clone(), v.clone())).collect();
    safetensors_f32(&refs)
}

pub fn int8_spec(model_id: &str) -> Value {
    json!({"model_id": model_id, "steps": [{"op": "quantize", "bits": 8, "granularity": "channel", "symmetric": true}]})
}

/// Parses a safetensors file into name -> (shape, f32 values) for F32 tensors.
pub fn read_f32_tensors(bytes: &[u8]) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(n, v)| {
            let vals = v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            (n, (v.shape().to_vec(), vals))
        })
        .collect()
}

/// Reads a whole SSE stream (it ends after the terminal event) into (id, event, data) triples.
pub async fn read_events(app: &TestApp, id: &str, last_event_id: Option<i64>) -> Vec<(i64, String, Value)> {
    let mut req = app.client.get(app.url(&format!("/v1/jobs/{id}/events")));
    if let Some(l) = last_event_id {
        req = req.header("Last-Event-ID", l.to_string());
    }
    let res = req.send().await.unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let text = tokio::time::timeout(Duration::from_secs(60), res.text()).await.expect("stream ends").unwrap();
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let (mut id, mut event, mut data) = (0, String::new(), Value::Null);
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("id:") {
                id = v.trim().parse().unwrap();
            } else if let Some(v) = line.strip_prefix("event:") {
                event = v.trim().to_owned();
            } else if let Some(v) = line.strip_prefix("data:") {
                data = serde_json::from_str(v.trim()).unwrap();
            }
        }
        if !event.is_empty() {
            out.push((id, event, data));
        }
    }
    out
}

/// Runs a job to success and downloads every artifact: (job, report, name -> bytes).
pub async fn run_job(app: &TestApp, spec: &Value) -> (Value, Value, BTreeMap<String, Vec<u8>>) {
    let id = app.create_job_ok(spec).await;
    let job = app.wait_terminal(&id).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let list = app.get_json(&format!("/v1/jobs/{id}/artifacts")).await;
    let mut files = BTreeMap::new();
    for a in list.as_array().unwrap() {
        let name = a["name"].as_str().unwrap().to_owned();
        let bytes = app.download(&format!("/v1/jobs/{id}/artifacts/{name}")).await;
        assert_eq!(bytes.len() as u64, a["bytes"].as_u64().unwrap(), "{name}");
        files.insert(name, bytes);
    }
    let report: Value = serde_json::from_slice(&files["report.json"]).unwrap();
    (job, report, files)
}

/// The report entry of one tensor.
pub fn entry<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in report"))
}

pub fn teacher() -> Vec<u8> {
    std::fs::read(crate::mlp::TEACHER).unwrap()
}

/// A safetensors file whose tensors are stored as `dtype` (F32, F16 or BF16), values given as f32.
pub fn safetensors_typed(tensors: &[(&str, safetensors::Dtype, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, d, _, v)| encode(v, *d)).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, d, s, _), b)| (n.to_string(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// f32 values as little-endian bytes of `dtype` (round to nearest even).
pub fn encode(values: &[f32], dtype: safetensors::Dtype) -> Vec<u8> {
    match dtype {
        safetensors::Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        safetensors::Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        safetensors::Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        other => panic!("encode: {other:?}"),
    }
}

/// Every tensor of a safetensors file as (dtype, shape, f32 values) for float dtypes.
pub fn read_float_tensors(bytes: &[u8]) -> BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<f32>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter_map(|(n, v)| {
            let vals: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => {
                    v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
                }
                safetensors::Dtype::F16 => {
                    v.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                safetensors::Dtype::BF16 => {
                    v.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
                }
                _ => return None,
            };
            Some((n, (v.dtype(), v.shape().to_vec(), vals)))
        })
        .collect()
}

/// Every tensor of a GGUF file, dequantized by candle's reader: name -> (shape, values).
pub fn read_gguf(bytes: &[u8]) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    use candle_core::quantized::gguf_file::Content;
    let mut cursor = std::io::Cursor::new(bytes);
    let content = Content::read(&mut cursor).unwrap();
    let names: Vec<String> = content.tensor_infos.keys().cloned().collect();
    names
        .into_iter()
        .map(|n| {
            let q = content.tensor(&mut cursor, &n, &candle_core::Device::Cpu).unwrap();
            let t = q.dequantize(&candle_core::Device::Cpu).unwrap();
            let shape = t.dims().to_vec();
            (n, (shape, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        })
        .collect()
}
