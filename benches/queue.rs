//! Claims per second on the queue (issue 9): `cargo bench --bench queue`.
//!
//! Enqueues `JOBS` jobs (default 2000), then R queue instances, each with its own connection
//! pool and `LOOPS` claiming loops (default 2; as R replicas of that many workers), claim and finish
//! them as fast as they can: every cycle is the real `claim` (one transaction: the `SKIP LOCKED`
//! update, its event, its `pg_notify`) and `finish` (another, with the row lock), the work in
//! between being nothing. Prints the cycles per second and checks that no job was claimed twice.
//! SQLite runs with one instance (one process owns it); Postgres with 1, 2 and 4 when
//! `MODELPRESS_BENCH_POSTGRES_URL` (or `MODELPRESS_TEST_POSTGRES_URL`) names a server, each case
//! in a fresh database. Everything, the database server included, shares this machine's cores.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelpress::storage::catalog::{Catalog, ModelKind, NewModel, SqlCatalog};
use modelpress::storage::db::Db;
use modelpress::storage::queue::{JobQueue, NewJob, Outcome, QueueLimits};
use modelpress::storage::sql_queue::SqlQueue;

async fn fresh_postgres(server: &str) -> (String, String) {
    let admin = sqlx::PgPool::connect(server).await.expect("the Postgres server answers");
    let name = format!("modelpress_bench_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}"))).execute(&admin).await.unwrap();
    let (base, _) = server.rsplit_once('/').expect("a URL ending in /database");
    (format!("{base}/{name}"), name)
}

async fn drop_postgres(server: &str, name: &str) {
    let admin = sqlx::PgPool::connect(server).await.unwrap();
    let sql = format!("drop database if exists {name} with (force)");
    sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&admin).await.unwrap();
}

/// Enqueues `jobs`, drains them with `replicas` instances; returns (enqueues/s, cycles/s, p99 claim).
async fn run(
    url: &str,
    dir: &std::path::Path,
    replicas: usize,
    loops_per_replica: usize,
    jobs: usize,
) -> (f64, f64, Duration) {
    let db = Db::connect(url, dir).await.unwrap();
    let catalog = SqlCatalog::new(db.clone());
    let model = catalog
        .insert_model(NewModel {
            kind: ModelKind::Model,
            name: None,
            sha256: "00".repeat(32),
            bytes: 1,
            tensors: "[]".into(),
            parameters: 0,
            source_job: None,
            graph: None,
            owner: "local".into(),
            tensor_count: 0,
            files: vec![],
        })
        .await
        .unwrap();
    let first = SqlQueue::new(db.clone(), Duration::from_secs(1));
    let limits = QueueLimits { total: u64::MAX, per_owner: u64::MAX };
    let start = Instant::now();
    for i in 0..jobs {
        let job = NewJob {
            model_id: model.id.clone(),
            dataset_id: None,
            student_model_id: None,
            eval_dataset_id: None,
            owner: "local".into(),
            spec: format!("{{\"n\":{i}}}"),
            spec_version: 1,
            spec_hash: i.to_string(),
            idempotency_key: None,
            max_attempts: 3,
        };
        first.enqueue(job, limits).await.unwrap();
    }
    let enqueues = jobs as f64 / start.elapsed().as_secs_f64();

    let mut queues: Vec<Arc<dyn JobQueue>> = vec![Arc::new(first)];
    for _ in 1..replicas {
        queues.push(Arc::new(SqlQueue::new(Db::connect(url, dir).await.unwrap(), Duration::from_secs(1))));
    }
    let start = Instant::now();
    let mut loops = tokio::task::JoinSet::new();
    for (r, q) in queues.iter().enumerate() {
        for w in 0..loops_per_replica {
            let q = q.clone();
            loops.spawn(async move {
                let worker = format!("r{r}-{w}");
                let (mut ids, mut waits) = (Vec::new(), Vec::new());
                loop {
                    let t = Instant::now();
                    let Some(job) = q.claim(&worker, Duration::from_secs(60)).await.unwrap() else { break };
                    waits.push(t.elapsed());
                    q.finish(&job.id, &worker, Outcome::Succeeded(vec![], None)).await.unwrap();
                    ids.push(job.id);
                }
                (ids, waits)
            });
        }
    }
    let (mut ids, mut waits) = (Vec::new(), Vec::new());
    while let Some(r) = loops.join_next().await {
        let (i, w) = r.unwrap();
        ids.extend(i);
        waits.extend(w);
    }
    let cycles = jobs as f64 / start.elapsed().as_secs_f64();
    let unique: HashSet<_> = ids.iter().collect();
    assert_eq!(ids.len(), jobs, "every job claimed once");
    assert_eq!(unique.len(), jobs, "no job claimed twice");
    waits.sort();
    (enqueues, cycles, waits[waits.len() * 99 / 100])
}

fn main() {
    if !modelpress::compress::synth::run_as_benchmark("queue") {
        return;
    }
    let jobs: usize = std::env::var("JOBS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let loops: usize = std::env::var("LOOPS").ok().and_then(|v| v.parse().ok()).unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    rt.block_on(async {
        println!("{jobs} jobs, {loops} claiming loops per replica; cycle = claim + finish");
        println!(
            "{:<10} {:>8} {:>12} {:>14} {:>15} {:>11}",
            "database", "replicas", "enqueue/s", "claim+finish/s", "p99 claim (ms)", "duplicates"
        );
        let dir = tempfile::tempdir().unwrap();
        let (enq, cyc, p99) = run("sqlite://", dir.path(), 1, loops, jobs).await;
        println!("{:<10} {:>8} {:>12.0} {:>14.0} {:>15.2} {:>11}", "sqlite", 1, enq, cyc, p99.as_secs_f64() * 1e3, 0);
        let server =
            std::env::var("MODELPRESS_BENCH_POSTGRES_URL").or_else(|_| std::env::var("MODELPRESS_TEST_POSTGRES_URL"));
        let Ok(server) = server else {
            println!("postgres: skipped (set MODELPRESS_BENCH_POSTGRES_URL)");
            return;
        };
        for replicas in [1, 2, 4] {
            let (url, name) = fresh_postgres(&server).await;
            let dir = tempfile::tempdir().unwrap();
            let (enq, cyc, p99) = run(&url, dir.path(), replicas, loops, jobs).await;
            println!(
                "{:<10} {:>8} {:>12.0} {:>14.0} {:>15.2} {:>11}",
                "postgres",
                replicas,
                enq,
                cyc,
                p99.as_secs_f64() * 1e3,
                0
            );
            drop_postgres(&server, &name).await;
        }
    });
}
