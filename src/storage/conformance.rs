//! One conformance suite for the queue, the catalog, drafts and keys, run against SQLite always
//! and against PostgreSQL when `MODELPRESS_TEST_POSTGRES_URL` names a server (each test in a
//! fresh database there, dropped at its end): the shared mode must keep every guarantee of the
//! embedded one. The blob stores have theirs in [`super::blobs`].

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::catalog::{Catalog, DeleteOutcome, JobDeleteOutcome, ModelKind, NewModel, SqlCatalog};
use super::db::{Db, Dialect};
use super::error::StorageError;
use super::queue::{Enqueued, JobFilter, JobQueue, NewArtifact, NewJob, Outcome, QueueError, QueueLimits};
use super::sql_queue::SqlQueue;
use crate::domain::job::{JobFailure, JobStatus, Progress};

/// A database for one test: SQLite in a temp dir, or a fresh Postgres database.
pub(crate) struct TestDb {
    pub db: Db,
    pub dir: tempfile::TempDir,
    /// Postgres: the server's URL and the database to drop at the end.
    drop: Option<(String, String)>,
}

impl TestDb {
    pub async fn finish(self) {
        self.db.pool.close().await;
        if let Some((admin_url, name)) = self.drop {
            let admin = admin_pool(&admin_url).await.expect("postgres admin connection");
            sqlx::query(sqlx::AssertSqlSafe(format!("drop database if exists {name} with (force)")))
                .execute(&admin)
                .await
                .expect("dropping the test database");
            admin.close().await;
        }
    }

    /// A second connection to the same database, as another replica would open.
    pub async fn reopen(&self) -> Db {
        Db::connect(&self.db.url, self.dir.path()).await.expect("reopening the test database")
    }
}

async fn admin_pool(url: &str) -> Result<sqlx::AnyPool, sqlx::Error> {
    sqlx::any::install_default_drivers();
    sqlx::pool::PoolOptions::new().max_connections(1).connect(url).await
}

/// SQLite, plus Postgres when `MODELPRESS_TEST_POSTGRES_URL` is set.
pub(crate) async fn engines() -> Vec<TestDb> {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Db::connect("sqlite://", dir.path()).await.unwrap();
    let mut all = vec![TestDb { db: sqlite, dir, drop: None }];
    if let Ok(url) = std::env::var("MODELPRESS_TEST_POSTGRES_URL") {
        let name = format!("modelpress_test_{}", uuid::Uuid::new_v4().simple());
        let admin = admin_pool(&url).await.expect("MODELPRESS_TEST_POSTGRES_URL unreachable");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}"))).execute(&admin).await.unwrap();
        admin.close().await;
        let (base, _) = url.rsplit_once('/').expect("a postgres URL ending in /database");
        let dir = tempfile::tempdir().unwrap();
        let db = Db::connect(&format!("{base}/{name}"), dir.path()).await.unwrap();
        all.push(TestDb { db, dir, drop: Some((url, name)) });
    }
    all
}

fn model(owner: &str, sha: &str) -> NewModel {
    NewModel {
        kind: ModelKind::Model,
        name: Some("m.safetensors".into()),
        sha256: sha.into(),
        bytes: 100,
        tensors: "[]".into(),
        parameters: 25,
        source_job: None,
        graph: None,
        owner: owner.into(),
        tensor_count: 0,
        files: vec![],
    }
}

fn job(model_id: &str, owner: &str, key: Option<&str>, spec: &str) -> NewJob {
    NewJob {
        model_id: model_id.into(),
        dataset_id: None,
        student_model_id: None,
        eval_dataset_id: None,
        owner: owner.into(),
        spec: spec.into(),
        spec_version: 1,
        spec_hash: format!("hash-{spec}"),
        idempotency_key: key.map(str::to_owned),
        max_attempts: 2,
    }
}

const LIMITS: QueueLimits = QueueLimits { total: 1000, per_owner: 1000 };

fn created(e: Enqueued) -> crate::domain::job::JobRecord {
    match e {
        Enqueued::Created(j) => j,
        Enqueued::Replayed(j) => panic!("replayed {}", j.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_checks_inputs_limits_and_idempotency_keys() {
    for t in engines().await {
        let (catalog, queue) = (SqlCatalog::new(t.db.clone()), SqlQueue::new(t.db.clone(), Duration::from_millis(1)));
        let m = catalog.insert_model(model("alice", "aa")).await.unwrap();
        let first = created(queue.enqueue(job(&m.id, "alice", Some("alice/k1"), "a"), LIMITS).await.unwrap());
        assert_eq!(first.status(), JobStatus::Queued);
        // The same key and body: the first job; another body: refused.
        match queue.enqueue(job(&m.id, "alice", Some("alice/k1"), "a"), LIMITS).await.unwrap() {
            Enqueued::Replayed(j) => assert_eq!(j.id, first.id),
            Enqueued::Created(_) => panic!("{:?}: a second job for one key", t.db.dialect),
        }
        assert!(matches!(
            queue.enqueue(job(&m.id, "alice", Some("alice/k1"), "b"), LIMITS).await,
            Err(QueueError::IdempotencyConflict)
        ));
        assert_eq!(queue.find_by_idempotency_key("alice/k1").await.unwrap().unwrap().id, first.id);
        // Limits: the whole queue, then one principal.
        let full = queue.enqueue(job(&m.id, "bob", None, "c"), QueueLimits { total: 1, per_owner: 9 }).await;
        assert!(matches!(full, Err(QueueError::Full { queued: 1 })), "{full:?}");
        let quota = queue.enqueue(job(&m.id, "alice", None, "c"), QueueLimits { total: 9, per_owner: 1 }).await;
        assert!(matches!(quota, Err(QueueError::QuotaExceeded { queued: 1, .. })), "{quota:?}");
        // A model that does not exist: nothing is inserted.
        assert!(matches!(queue.enqueue(job("nope", "alice", None, "d"), LIMITS).await, Err(QueueError::NotFound(_))));
        assert_eq!(queue.list(&JobFilter { limit: 10, ..Default::default() }).await.unwrap().len(), 1);
        // The model is in use while the job is queued.
        assert!(matches!(catalog.delete_model(ModelKind::Model, &m.id).await.unwrap(), DeleteOutcome::InUse(1)));
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claims_take_every_job_exactly_once() {
    for t in engines().await {
        let catalog = SqlCatalog::new(t.db.clone());
        let m = catalog.insert_model(model("local", "bb")).await.unwrap();
        // Two queues on two pools: two replicas of one database.
        let a: Arc<dyn JobQueue> = Arc::new(SqlQueue::new(t.db.clone(), Duration::from_millis(1)));
        let b: Arc<dyn JobQueue> = Arc::new(SqlQueue::new(t.reopen().await, Duration::from_millis(1)));
        let mut ids = HashSet::new();
        for i in 0..60 {
            ids.insert(created(a.enqueue(job(&m.id, "local", None, &i.to_string()), LIMITS).await.unwrap()).id);
        }
        let mut claimers = tokio::task::JoinSet::new();
        for w in 0..6 {
            let q = if w % 2 == 0 { a.clone() } else { b.clone() };
            claimers.spawn(async move {
                let mut mine = Vec::new();
                let worker = format!("w{w}");
                while let Some(j) = q.claim(&worker, Duration::from_secs(30)).await.unwrap() {
                    assert_eq!(j.lease_owner.as_deref(), Some(worker.as_str()));
                    q.finish(&j.id, &worker, Outcome::Succeeded(vec![], None)).await.unwrap();
                    mine.push(j.id);
                }
                mine
            });
        }
        let mut claimed = Vec::new();
        while let Some(r) = claimers.join_next().await {
            claimed.extend(r.unwrap());
        }
        assert_eq!(claimed.len(), 60, "{:?}: every job claimed once", t.db.dialect);
        assert_eq!(claimed.into_iter().collect::<HashSet<_>>(), ids);
        let counts = a.counts().await.unwrap();
        assert!(counts.contains(&(JobStatus::Succeeded, 60)), "{counts:?}");
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_heartbeats_cancels_and_rescue_behave_alike() {
    for t in engines().await {
        let catalog = SqlCatalog::new(t.db.clone());
        let a = SqlQueue::new(t.db.clone(), Duration::from_millis(1));
        let b = SqlQueue::new(t.reopen().await, Duration::from_millis(1));
        let m = catalog.insert_model(model("local", "cc")).await.unwrap();
        let id = created(a.enqueue(job(&m.id, "local", None, "x"), LIMITS).await.unwrap()).id;
        let j = a.claim("wa", Duration::from_secs(30)).await.unwrap().unwrap();
        assert_eq!((j.id.as_str(), j.attempt), (id.as_str(), 1));
        a.progress(&id, "wa", &Progress { fraction: 0.5, step: Some("s".into()), message: None }).await.unwrap();
        // A cancel sent to the other replica reaches the worker's next heartbeat.
        assert_eq!(b.cancel(&id).await.unwrap().cancel_requested, 1);
        let beat = a.heartbeat(&id, "wa", Duration::from_secs(30)).await.unwrap();
        assert!(beat.held && beat.cancel_requested);
        assert!(!a.heartbeat(&id, "intruder", Duration::from_secs(30)).await.unwrap().held);
        let done = a.finish(&id, "wa", Outcome::Canceled).await.unwrap();
        assert_eq!(done.status(), JobStatus::Canceled);
        assert!(matches!(a.finish(&id, "wa", Outcome::Canceled).await, Err(QueueError::Finished { .. })));
        // Events: queued, running, progress, canceled, in order.
        let events = b.events_after(&id, 0).await.unwrap();
        let kinds: Vec<_> = events.iter().map(|e| (e.seq, e.kind.as_str())).collect();
        assert_eq!(kinds, [(1, "state"), (2, "state"), (3, "progress"), (4, "state")]);
        assert_eq!(b.events_after(&id, 3).await.unwrap().len(), 1);

        // An expired lease goes back to the queue (any replica rescues it), then fails for good
        // once its attempts are spent, with a readable reason.
        let id = created(a.enqueue(job(&m.id, "local", None, "y"), LIMITS).await.unwrap()).id;
        a.claim("wa", Duration::from_millis(1)).await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.rescue(false).await.unwrap(), 1);
        let again = b.claim("wb", Duration::from_millis(1)).await.unwrap().unwrap();
        assert_eq!((again.id.as_str(), again.attempt), (id.as_str(), 2));
        assert!(!a.heartbeat(&id, "wa", Duration::from_secs(30)).await.unwrap().held);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(a.rescue(false).await.unwrap(), 1);
        let failed = a.get(&id).await.unwrap().unwrap();
        assert_eq!(failed.status(), JobStatus::Failed);
        let why = failed.failure().expect("the rescue's reason is JSON");
        assert_eq!(why.code, "attempts_exhausted");
        assert!(why.detail.contains("attempt 2 of 2"), "{}", why.detail);

        // A retry waits for its backoff; a release does not count the attempt.
        let id = created(a.enqueue(job(&m.id, "local", None, "z"), LIMITS).await.unwrap()).id;
        a.claim("wa", Duration::from_secs(30)).await.unwrap().unwrap();
        let retry = JobFailure { code: "io_error".into(), detail: "disk".into() };
        let back = a.finish(&id, "wa", Outcome::Retry(retry)).await.unwrap();
        assert_eq!((back.status(), back.attempt), (JobStatus::Queued, 1));
        tokio::time::sleep(Duration::from_millis(10)).await;
        a.claim("wa", Duration::from_secs(30)).await.unwrap().unwrap();
        let released = a.finish(&id, "wa", Outcome::Released).await.unwrap();
        assert_eq!((released.status(), released.attempt), (JobStatus::Queued, 1));
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_registration_deletes_and_quotas_behave_alike() {
    for t in engines().await {
        let catalog = SqlCatalog::new(t.db.clone());
        let queue = SqlQueue::new(t.db.clone(), Duration::from_millis(1));
        let m = catalog.insert_model(model("alice", "dd")).await.unwrap();
        let id = created(queue.enqueue(job(&m.id, "alice", None, "x"), LIMITS).await.unwrap()).id;
        queue.claim("w", Duration::from_secs(30)).await.unwrap().unwrap();
        catalog.ensure_blob("ee", 40).await.unwrap();
        catalog.ensure_blob("ee", 40).await.unwrap();
        let artifacts = vec![
            NewArtifact {
                name: "model.safetensors".into(),
                format: "safetensors".into(),
                sha256: "ee".into(),
                bytes: 40,
            },
            NewArtifact { name: "report.json".into(), format: "json".into(), sha256: "dd".into(), bytes: 100 },
        ];
        let register =
            NewModel { sha256: "ee".into(), bytes: 40, source_job: Some(id.clone()), ..model("alice", "ee") };
        let done = queue.finish(&id, "w", Outcome::Succeeded(artifacts, Some(register))).await.unwrap();
        assert_eq!((done.status(), done.progress_fraction), (JobStatus::Succeeded, 1.0));
        let registered = done.registered_model_id.clone().unwrap();
        assert_eq!(catalog.artifacts(&id).await.unwrap().len(), 2);
        assert_eq!(catalog.artifact(&id, "report.json").await.unwrap().unwrap().bytes, 100);
        // Models 100 + 40, artifacts 40 + 100.
        assert_eq!(catalog.stored_bytes("alice").await.unwrap(), 280);
        assert_eq!(catalog.stored_bytes("bob").await.unwrap(), 0);
        let listed = catalog.list_models(ModelKind::Model, None, 10, Some("alice")).await.unwrap();
        assert_eq!(listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [registered.as_str(), m.id.as_str()]);
        let page2 = catalog.list_models(ModelKind::Model, Some(&registered), 10, None).await.unwrap();
        assert_eq!(page2.len(), 1);
        assert_eq!(catalog.set_graph(&m.id, Some("{}")).await.unwrap(), super::catalog::GraphUpdate::Updated);
        assert_eq!(catalog.list_models(ModelKind::Model, Some(&registered), 10, None).await.unwrap()[0].has_graph, 1);
        // The job goes with its artifacts; blob "dd" is still the model's, "ee" the registered one's.
        match catalog.delete_job(&id).await.unwrap() {
            JobDeleteOutcome::Deleted { orphan_blobs } => assert!(orphan_blobs.is_empty(), "{orphan_blobs:?}"),
            other => panic!("{other:?}"),
        }
        match catalog.delete_model(ModelKind::Model, &registered).await.unwrap() {
            DeleteOutcome::Deleted { orphan_blobs } => assert_eq!(orphan_blobs, ["ee"]),
            other => panic!("{other:?}"),
        }
        // An ingest rolled back: of its blobs, only those no row names lose their rows.
        catalog.ensure_blob("ab", 1).await.unwrap();
        let gone = catalog.forget_unnamed_blobs(&["ab".into(), "dd".into(), "zz".into()]).await.unwrap();
        assert_eq!(gone, ["ab"]);
        // Orphan rows: only those created before the cut-off go.
        catalog.ensure_blob("ff", 1).await.unwrap();
        assert!(catalog.remove_orphan_blobs(0).await.unwrap().is_empty());
        assert_eq!(catalog.remove_orphan_blobs(i64::MAX).await.unwrap(), ["ff"]);
        assert_eq!(catalog.blob_keys().await.unwrap(), ["dd"]);
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_lists_page_by_id_and_filter_by_owner_and_status() {
    for t in engines().await {
        let catalog = SqlCatalog::new(t.db.clone());
        let queue = SqlQueue::new(t.db.clone(), Duration::from_millis(1));
        let m = catalog.insert_model(model("local", "aa")).await.unwrap();
        let mut ids = Vec::new();
        for i in 0..5 {
            let owner = if i % 2 == 0 { "alice" } else { "bob" };
            ids.push(created(queue.enqueue(job(&m.id, owner, None, &i.to_string()), LIMITS).await.unwrap()).id);
        }
        queue.cancel(&ids[0]).await.unwrap();
        let all = queue.list(&JobFilter { limit: 3, ..Default::default() }).await.unwrap();
        assert_eq!(all.iter().map(|j| &j.id).collect::<Vec<_>>(), [&ids[4], &ids[3], &ids[2]]);
        let rest =
            queue.list(&JobFilter { limit: 3, after: Some(ids[2].clone()), ..Default::default() }).await.unwrap();
        assert_eq!(rest.iter().map(|j| &j.id).collect::<Vec<_>>(), [&ids[1], &ids[0]]);
        let alices =
            queue.list(&JobFilter { limit: 9, owner: Some("alice".into()), ..Default::default() }).await.unwrap();
        assert_eq!(alices.len(), 3);
        let canceled =
            queue.list(&JobFilter { limit: 9, status: Some(JobStatus::Canceled), ..Default::default() }).await.unwrap();
        assert_eq!(canceled.iter().map(|j| &j.id).collect::<Vec<_>>(), [&ids[0]]);
        assert_eq!(queue.active_uses(&m.id).await.unwrap(), 4);
        assert!(matches!(queue.cancel(&ids[0]).await, Err(QueueError::Finished { .. })));
        assert!(matches!(queue.cancel("missing").await, Err(QueueError::NotFound(_))));
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_drafts_keep_their_limits() {
    use super::keys::{CreateError, KeyStore, Scope};
    for t in engines().await {
        let keys = KeyStore::new(t.db.clone());
        assert!(!keys.any().await.unwrap());
        let (rec, _secret) = keys.create("alice", Some("ci"), Scope::Write, None).await.unwrap();
        assert!(keys.any().await.unwrap());
        assert_eq!(keys.get(&rec.id).await.unwrap().unwrap().principal, "alice");
        assert!(keys.revoke(&rec.id).await.unwrap());
        assert!(!keys.get(&rec.id).await.unwrap().unwrap().live(super::now_ms()));
        let mut made = 0;
        loop {
            match keys.create("bob", None, Scope::Read, None).await {
                Ok(_) => made += 1,
                Err(CreateError::TooManyKeys(n)) => {
                    assert_eq!(n, made);
                    break;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        let drafts = super::drafts::Drafts::open(t.db.clone(), t.dir.path()).unwrap();
        let d = drafts.create("alice", Some("m"), 60_000, 1).await.unwrap().unwrap();
        assert!(drafts.create("alice", None, 60_000, 1).await.unwrap().is_none(), "one open draft at most");
        let file = super::catalog::ModelFile { name: "config.json".into(), sha256: "aa".into(), bytes: 7 };
        assert!(!drafts.put_file(&d.id, &file, 60_000).await.unwrap(), "a new name replaces nothing");
        assert!(drafts.put_file(&d.id, &file, 60_000).await.unwrap());
        assert_eq!(drafts.files(&d.id).await.unwrap(), [file]);
        assert_eq!(SqlCatalog::new(t.db.clone()).stored_bytes("alice").await.unwrap(), 7);
        t.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_errors_have_the_same_kinds_on_both_engines() {
    for t in engines().await {
        let dup = "insert into blobs (sha256, bytes, created_at) values ('x', 1, 1)";
        sqlx::query(dup).execute(&t.db.pool).await.unwrap();
        let e = StorageError::from(sqlx::query(dup).execute(&t.db.pool).await.unwrap_err());
        assert!(matches!(e, StorageError::Conflict(_)), "{:?}: {e:?}", t.db.dialect);
        let e = StorageError::from(sqlx::query("select nope from blobs").execute(&t.db.pool).await.unwrap_err());
        assert!(matches!(e, StorageError::Other(_)), "{e:?}");
        t.finish().await;
    }
}

/// Checks that read, then write, made at once through two pools (two replicas) behave as if
/// one ran after the other: a per-principal limit of one admits one job, and a job enqueued
/// while its model is deleted either sees the model gone or keeps it from going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replicas_cannot_both_pass_a_check() {
    for t in engines().await {
        let (a_db, b_db) = (t.db.clone(), t.reopen().await);
        let (a, b) =
            (SqlQueue::new(a_db.clone(), Duration::from_millis(1)), SqlQueue::new(b_db.clone(), Duration::ZERO));
        let (ca, cb) = (SqlCatalog::new(a_db), SqlCatalog::new(b_db));
        let one_each = QueueLimits { total: 1000, per_owner: 1 };
        for round in 0..20 {
            let m = ca.insert_model(model("local", &format!("{round:02}"))).await.unwrap();
            let owner = format!("p{round}");
            let (x, y) = tokio::join!(
                a.enqueue(job(&m.id, &owner, None, "x"), one_each),
                b.enqueue(job(&m.id, &owner, None, "y"), one_each)
            );
            assert_eq!(
                usize::from(x.is_ok()) + usize::from(y.is_ok()),
                1,
                "{:?} round {round}: a limit of one admitted {x:?} and {y:?}",
                t.db.dialect
            );
            let m = ca.insert_model(model("local", &format!("{round:02}"))).await.unwrap();
            let (queued, deleted) = tokio::join!(
                a.enqueue(job(&m.id, "local", None, "z"), LIMITS),
                cb.delete_model(ModelKind::Model, &m.id)
            );
            let deleted = matches!(deleted.unwrap(), DeleteOutcome::Deleted { .. });
            assert!(
                !(queued.is_ok() && deleted),
                "{:?} round {round}: a job was queued on a model deleted at the same time",
                t.db.dialect
            );
        }
        t.finish().await;
    }
}

/// What only a shared database has: other replicas' events wake this one, and the blob gate
/// excludes across replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_see_each_others_events_and_share_the_blob_gate() {
    for t in engines().await {
        if t.db.dialect != Dialect::Postgres {
            t.finish().await;
            continue;
        }
        let (a_db, b_db) = (t.db.clone(), t.reopen().await);
        let (a, b) =
            (SqlQueue::new(a_db.clone(), Duration::from_millis(1)), SqlQueue::new(b_db.clone(), Duration::ZERO));
        let mut wake = b.subscribe();
        // The listener connects in the background: enqueue until B hears one.
        let catalog = SqlCatalog::new(a_db.clone());
        let m = catalog.insert_model(model("local", "aa")).await.unwrap();
        let heard = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let id = created(
                    a.enqueue(job(&m.id, "local", None, &uuid::Uuid::new_v4().to_string()), LIMITS).await.unwrap(),
                )
                .id;
                if let Ok(Ok(got)) = tokio::time::timeout(Duration::from_millis(300), wake.recv()).await {
                    return (id, got);
                }
            }
        })
        .await
        .expect("replica B never heard replica A's event");
        assert_eq!(heard.0, heard.1);

        let (ca, cb) = (SqlCatalog::new(a_db), SqlCatalog::new(b_db));
        let held = ca.blob_gate().await.unwrap();
        let waiting = tokio::spawn(async move { cb.blob_gate().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "replica B took the blob gate replica A holds");
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), waiting).await.expect("gate released").unwrap().unwrap();

        // A waiter that gives up (a client gone mid-upload) leaves the gate free for everyone.
        let held = ca.blob_gate().await.unwrap();
        let (ca2, cb2) = (SqlCatalog::new(t.db.clone()), SqlCatalog::new(t.reopen().await));
        assert!(tokio::time::timeout(Duration::from_millis(200), cb2.blob_gate()).await.is_err());
        drop(held);
        for catalog in [&ca2, &cb2, &ca2] {
            let again = tokio::time::timeout(Duration::from_secs(5), catalog.blob_gate()).await;
            drop(again.expect("the gate came back after a waiter gave up").unwrap());
        }
        t.finish().await;
    }
}
