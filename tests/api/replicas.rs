//! Three `modelpress serve` processes on one PostgreSQL database and one S3 bucket (issue 9):
//! jobs submitted through all three run exactly once per attempt, a replica killed with -9 has
//! its jobs rescued by the others with byte-identical outputs, a cancel sent to one replica stops
//! a job running on another, and what is uploaded through one downloads through another. Run when
//! both `MODELPRESS_TEST_POSTGRES_URL` and `MODELPRESS_TEST_S3_ENDPOINT` are set (`.ci/run` starts
//! both servers on loopback), skipped with a message otherwise.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::crash::{model_artifact_sha, running_midway, Server};
use crate::helpers::*;

/// A fresh database on the test server, dropped when the test ends.
struct TestDatabase {
    admin: sqlx::PgPool,
    name: String,
    url: String,
}

impl TestDatabase {
    async fn create(server_url: &str) -> TestDatabase {
        let (url, name) = create_postgres_database(server_url, "modelpress_replicas").await;
        let admin = sqlx::PgPool::connect(server_url).await.unwrap();
        TestDatabase { admin, url, name }
    }

    async fn drop(self) {
        let sql = format!("drop database if exists {} with (force)", self.name);
        sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&self.admin).await.unwrap();
    }
}

async fn instance(s: &Server) -> String {
    s.json("/healthz").await["instance"].as_str().unwrap().to_owned()
}

/// Which of the replicas named `instances` runs job `id` now (by the job's `worker`, read
/// through `via`).
async fn runner_of(instances: &[String], via: &Server, id: &str) -> usize {
    let job = via.json(&format!("/v1/jobs/{id}")).await;
    let worker = job["worker"].as_str().unwrap_or_else(|| panic!("a running job names its worker: {job}"));
    instances.iter().position(|i| worker.starts_with(i.as_str())).expect("the worker is one of the replicas")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_queue_rescue_a_killed_one_and_cancel_across() {
    let (Ok(pg), Ok(endpoint)) =
        (std::env::var("MODELPRESS_TEST_POSTGRES_URL"), std::env::var("MODELPRESS_TEST_S3_ENDPOINT"))
    else {
        eprintln!("skipped: set MODELPRESS_TEST_POSTGRES_URL and MODELPRESS_TEST_S3_ENDPOINT (and AWS_*) to run it");
        return;
    };
    let database = TestDatabase::create(&pg).await;
    let bucket = std::env::var("MODELPRESS_TEST_S3_BUCKET").unwrap_or_else(|_| "modelpress-test".into());
    let blob_store = format!("s3://{bucket}/replicas/{}", uuid::Uuid::new_v4());
    let env = [
        ("MODELPRESS__STORAGE__DATABASE_URL", database.url.as_str()),
        ("MODELPRESS__STORAGE__BLOB_STORE", blob_store.as_str()),
        ("MODELPRESS__STORAGE__S3_ENDPOINT", endpoint.as_str()),
        ("MODELPRESS__STORAGE__S3_ALLOW_HTTP", "true"),
        ("MODELPRESS__STORAGE__S3_REGION", "us-east-1"),
        // Short leases: a killed replica's job is rescued within seconds.
        ("MODELPRESS__QUEUE__LEASE_SECS", "2"),
    ];
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = Server::start(dirs[0].path(), &env).await;
    let b = Server::start(dirs[1].path(), &env).await;
    let c = Server::start(dirs[2].path(), &env).await;

    // Uploaded through A, downloaded through C.
    let bytes = small_model();
    let model = a.upload(bytes.clone()).await;
    let got = c.client.get(format!("{}/v1/models/{model}/file", c.base)).send().await.unwrap();
    assert_eq!(got.bytes().await.unwrap().to_vec(), bytes);

    // A draft's rows are shared, its files stay with the replica that received them: a commit
    // elsewhere says so instead of failing obscurely.
    let res = a.client.post(format!("{}/v1/models/drafts?name=m", a.base)).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let draft = res.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let put = b.client.put(format!("{}/v1/models/drafts/{draft}/files/model.safetensors", b.base));
    assert_eq!(put.body(bytes.clone()).send().await.unwrap().status(), 201);
    let res = a.client.post(format!("{}/v1/models/drafts/{draft}/commit", a.base)).send().await.unwrap();
    assert_eq!(res.status(), 409);
    let problem = res.json::<serde_json::Value>().await.unwrap();
    assert_eq!(problem["code"], "draft_file_elsewhere", "{problem}");
    let res = b.client.post(format!("{}/v1/models/drafts/{draft}/commit", b.base)).send().await.unwrap();
    assert_eq!(res.status(), 201, "the replica holding the files commits it");

    // 50 jobs through all three; each runs once and they all make the same bytes.
    let servers = [&a, &b, &c];
    let mut jobs = Vec::new();
    for i in 0..50 {
        jobs.push(servers[i % 3].submit(&int8_spec(&model)).await);
    }
    let mut outputs = BTreeSet::new();
    for (i, id) in jobs.iter().enumerate() {
        let done = servers[(i + 1) % 3].wait_terminal(id).await;
        assert_eq!((done["status"].as_str(), done["attempt"].as_i64()), (Some("succeeded"), Some(1)), "{done}");
        outputs.insert(model_artifact_sha(servers[(i + 2) % 3], id).await);
    }
    assert_eq!(outputs.len(), 1, "identical specs made different bytes: {outputs:?}");
    // At the source: one `running` event per job, so no job was claimed twice.
    let db = sqlx::PgPool::connect(&database.url).await.unwrap();
    let runs: Vec<(String, i64)> = sqlx::query_as(
        "select job_id, count(*) from job_events where kind = 'state' and data like '%\"status\":\"running\"%'
         group by job_id",
    )
    .fetch_all(&db)
    .await
    .unwrap();
    let runs: BTreeMap<_, _> = runs.into_iter().collect();
    assert_eq!(runs.len(), 50);
    assert!(runs.values().all(|n| *n == 1), "a job ran twice: {runs:?}");

    // Three long jobs, one per replica; kill -9 the replica running one of them: another
    // replica takes it over after its lease and it ends with the same bytes as the others.
    let big = b.upload(big_model(300, 256, 256)).await;
    let mut long = Vec::new();
    for _ in 0..3 {
        long.push(a.submit(&int8_spec(&big)).await);
    }
    for id in &long {
        c.wait(id, running_midway).await;
    }
    let named = [instance(&a).await, instance(&b).await, instance(&c).await];
    let mut on_b = None;
    for id in &long {
        if runner_of(&named, &c, id).await == 1 {
            on_b = Some(id.clone());
        }
    }
    let on_b = on_b.expect("with one worker per replica, B runs one of the three jobs");
    let killed = Instant::now();
    b.kill9();
    let rescued = a.wait(&on_b, |j| j["status"] == "running" && j["attempt"] == 2).await;
    let pickup = killed.elapsed();
    eprintln!("a killed replica's job was running again on another after {pickup:?} (lease 2 s)");
    let by = rescued["worker"].as_str().unwrap();
    assert!(by.starts_with(&named[0]) || by.starts_with(&named[2]), "{rescued}");
    let mut shas = BTreeSet::new();
    for id in &long {
        let done = c.wait_terminal(id).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["attempt"].as_i64(), Some(if *id == on_b { 2 } else { 1 }), "{done}");
        shas.insert(model_artifact_sha(&a, id).await);
    }
    assert_eq!(shas.len(), 1, "the rescued job's output differs from an uninterrupted run's: {shas:?}");

    // A cancel sent to one replica stops the job another one runs.
    let id = c.submit(&int8_spec(&big)).await;
    a.wait(&id, running_midway).await;
    let survivors = [named[0].clone(), named[2].clone()];
    let other = if runner_of(&survivors, &a, &id).await == 0 { &c } else { &a };
    // Its events, streamed (SSE) by the replica that does not run it.
    let stream = other.client.get(format!("{}/v1/jobs/{id}/events", other.base)).send().await.unwrap();
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let events = tokio::spawn(async move { stream.text().await.unwrap() });
    let asked = Instant::now();
    let res = other.client.post(format!("{}/v1/jobs/{id}/cancel", other.base)).send().await.unwrap();
    assert_eq!(res.status(), 202, "{}", res.text().await.unwrap());
    let done = other.wait_terminal(&id).await;
    eprintln!("a cancel sent to the other replica stopped the job in {:?}", asked.elapsed());
    assert_eq!(done["status"], "canceled", "{done}");
    assert!(asked.elapsed() < Duration::from_secs(10));
    let text = tokio::time::timeout(Duration::from_secs(10), events).await.expect("the stream ends").unwrap();
    eprintln!("its event stream on the other replica ended {:?} after the cancel", asked.elapsed());
    let last = text.split("\n\n").filter(|b| b.contains("event: state")).last().unwrap_or_default().to_owned();
    assert!(last.contains("\"canceled\""), "the stream ends with the cancel: {text}");
    assert!(text.contains("\"running\""), "it carried the other replica's states: {text}");

    db.close().await;
    drop((a, c));
    database.drop().await;
}

#[tokio::test]
async fn a_bad_database_url_stops_the_start_with_the_reason_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), 0);
    settings.storage.database_url = "postgres://mp:hunter2@127.0.0.1:1/nowhere".into();
    let e = modelpress::startup::Application::build(settings).await.err().expect("the start fails");
    let text = format!("{e:#}");
    assert!(text.contains("opening the database postgres://mp:***@127.0.0.1:1/nowhere"), "{text}");
    assert!(!text.contains("hunter2"), "{text}");
    let mut settings = test_settings(dir.path(), 0);
    settings.storage.database_url = "mysql://x".into();
    let e = modelpress::startup::Application::build(settings).await.err().expect("the start fails");
    assert!(format!("{e:#}").contains("expected `sqlite://`"), "{e:#}");
}
