//! Crash safety with the real binary: kill -9 and SIGTERM at awkward moments, then restart on
//! the same data dir.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::*;

pub(crate) struct Server {
    pub child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Server {
    pub(crate) async fn start(data_dir: &Path, extra_env: &[(&str, &str)]) -> Server {
        let port = free_port();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_modelpress"));
        cmd.arg("serve")
            .env("MODELPRESS__STORAGE__DATA_DIR", data_dir)
            .env("MODELPRESS__SERVER__PORT", port.to_string())
            .env("MODELPRESS__QUEUE__WORKERS", "1")
            .env("MODELPRESS__LOG__LEVEL", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("binary starts");
        let server = Server { child, base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() };
        let start = Instant::now();
        while server
            .client
            .get(format!("{}/readyz", server.base))
            .send()
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
        {
            assert!(start.elapsed() < Duration::from_secs(30), "server did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        server
    }

    pub(crate) async fn json(&self, path: &str) -> Value {
        self.client.get(format!("{}{path}", self.base)).send().await.unwrap().json().await.unwrap()
    }

    pub(crate) async fn upload(&self, bytes: Vec<u8>) -> String {
        let res = self.client.post(format!("{}/v1/models", self.base)).body(bytes).send().await.unwrap();
        assert_eq!(res.status(), 201);
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub(crate) async fn submit(&self, spec: &Value) -> String {
        let res = self.client.post(format!("{}/v1/jobs", self.base)).json(spec).send().await.unwrap();
        assert_eq!(res.status(), 202);
        res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub(crate) async fn wait(&self, id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let job = self.json(&format!("/v1/jobs/{id}")).await;
            if done(&job) {
                return job;
            }
            assert!(start.elapsed() < Duration::from_secs(120), "job stuck: {job}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub(crate) async fn wait_terminal(&self, id: &str) -> Value {
        self.wait(id, |j| matches!(j["status"].as_str(), Some("succeeded" | "failed" | "canceled"))).await
    }

    pub(crate) fn kill9(mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    pub(crate) fn sigterm_and_wait(mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "server ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn running_midway(j: &Value) -> bool {
    j["status"] == "running" && j["progress"]["fraction"].as_f64().unwrap_or(0.0) > 0.05
}

pub(crate) async fn model_artifact_sha(s: &Server, job: &str) -> String {
    let list = s.json(&format!("/v1/jobs/{job}/artifacts")).await;
    list.as_array().unwrap().iter().find(|a| a["name"] == "model.safetensors").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn a_job_killed_mid_run_is_rerun_after_restart_with_identical_output() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let model = server.upload(big_model(300, 256, 256)).await;
    let job = server.submit(&int8_spec(&model)).await;
    server.wait(&job, running_midway).await;
    server.kill9();

    let server = Server::start(dir.path(), &[]).await;
    let done = server.wait_terminal(&job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2);
    let interrupted = model_artifact_sha(&server, &job).await;

    let again = server.submit(&int8_spec(&model)).await;
    assert_eq!(server.wait_terminal(&again).await["status"], "succeeded");
    assert_eq!(model_artifact_sha(&server, &again).await, interrupted, "byte-identical to an uninterrupted run");
    assert_eq!(staging_entries(dir.path()), 0);
}

#[tokio::test]
async fn an_upload_killed_midway_leaves_no_model_and_no_temp_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let bytes = big_model(16, 256, 256);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let url = format!("{}/v1/models", server.base);
    let client = server.client.clone();
    let upload = tokio::spawn(async move {
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
        client.post(url).body(reqwest::Body::wrap_stream(stream)).send().await
    });
    tx.send(Ok(bytes[..bytes.len() / 2].to_vec())).await.unwrap();
    // Wait until the server has the first half in staging, then kill it.
    let start = Instant::now();
    while staging_entries(dir.path()) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.kill9();
    let _ = upload.await;

    let server = Server::start(dir.path(), &[]).await;
    assert_eq!(server.json("/v1/models").await["items"], serde_json::json!([]));
    assert_eq!(staging_entries(dir.path()), 0, "the partial upload was swept");
    assert_eq!(blob_files(dir.path()), Vec::<String>::new());
}

#[tokio::test]
async fn sigterm_requeues_a_running_job_without_counting_the_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("MODELPRESS__QUEUE__SHUTDOWN_GRACE_SECS", "0")];
    let server = Server::start(dir.path(), &env).await;
    let model = server.upload(big_model(300, 256, 256)).await;
    let job = server.submit(&int8_spec(&model)).await;
    server.wait(&job, running_midway).await;
    let status = server.sigterm_and_wait();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");

    let server = Server::start(dir.path(), &[]).await;
    let done = server.wait_terminal(&job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 1, "a shutdown release does not use up an attempt");
}

#[tokio::test]
async fn a_job_whose_worker_keeps_dying_fails_with_attempts_exhausted() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("MODELPRESS__QUEUE__MAX_ATTEMPTS", "1")];
    let server = Server::start(dir.path(), &env).await;
    let model = server.upload(big_model(300, 256, 256)).await;
    let job = server.submit(&int8_spec(&model)).await;
    server.wait(&job, running_midway).await;
    server.kill9();

    let server = Server::start(dir.path(), &env).await;
    let done = server.wait_terminal(&job).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "attempts_exhausted");
    assert!(done["error"]["detail"].as_str().unwrap().contains("attempt 1 of 1"), "{done}");
}

#[tokio::test]
async fn a_distillation_killed_mid_way_resumes_from_its_checkpoint_and_ends_with_the_same_student() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]).await;
    let model = server.upload(teacher()).await;
    let graph: Value = serde_json::from_str(&std::fs::read_to_string(crate::graphs::TEACHER_GRAPH).unwrap()).unwrap();
    let res = server.client.put(format!("{}/v1/models/{model}/graph", server.base)).json(&graph).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = server
        .client
        .post(format!("{}/v1/datasets", server.base))
        .body(std::fs::read(crate::mlp::DIGITS_TEST).unwrap())
        .send()
        .await
        .unwrap();
    let dataset = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = serde_json::json!({"model_id": model, "dataset_id": dataset, "steps": [
        {"op": "shrink", "width": {"ratio": 0.375}},
        {"op": "distill", "epochs": 60, "batch_size": 8, "seed": 1}]});
    let job = server.submit(&spec).await;
    // Kill once a few epochs are checkpointed.
    let checkpoint = dir.path().join("checkpoints").join(&job).join("step-1.safetensors");
    let start = Instant::now();
    while !checkpoint.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint: {}",
            server.json(&format!("/v1/jobs/{job}")).await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill9();

    let server = Server::start(dir.path(), &[]).await;
    let done = server.wait_terminal(&job).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempt"], 2);
    let report = server.json(&format!("/v1/jobs/{job}/report")).await;
    let resumed =
        report["structure"][1]["training"]["resumed_after_epoch"].as_u64().expect("the second attempt resumed");
    assert!((1..60).contains(&resumed), "{resumed}");
    assert!(!dir.path().join("checkpoints").join(&job).exists(), "checkpoints go when the job ends");
    let interrupted = model_artifact_sha(&server, &job).await;

    let again = server.submit(&spec).await;
    assert_eq!(server.wait_terminal(&again).await["status"], "succeeded");
    assert_eq!(model_artifact_sha(&server, &again).await, interrupted, "the same student as an uninterrupted run");
}
