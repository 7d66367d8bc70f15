//! API keys: scopes, the key lifecycle, and the open routes.

use std::process::Command;

use serde_json::{json, Value};

use crate::helpers::*;

/// `modelpress keys ...` on the app's data directory, as an operator would run it.
fn keys_cli(app: &TestApp, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .arg("keys")
        .args(args)
        .env("MODELPRESS__STORAGE__DATA_DIR", app.data_dir())
        .env("MODELPRESS__STORAGE__DATABASE_URL", test_database_url(&app.data_dir()))
        .output()
        .expect("binary runs")
}

pub fn create_key_cli(app: &TestApp, principal: &str, scopes: &str) -> String {
    let out = keys_cli(app, &["create", "--principal", principal, "--scopes", scopes]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

async fn send(app: &TestApp, method: reqwest::Method, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut req = app.client.request(method, app.url(path));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    if status == 401 {
        assert_eq!(res.headers()["www-authenticate"], "Bearer realm=\"modelpress\"");
    }
    res.json().await.unwrap()
}

#[tokio::test]
async fn without_keys_the_embedded_server_is_open_and_the_first_key_closes_it() {
    let app = spawn_app(0).await;
    assert_eq!(send(&app, reqwest::Method::GET, "/v1/models", None).await.status(), 200);
    let admin = create_key_cli(&app, "ops", "admin");
    assert!(admin.starts_with("mp_"), "{admin}");
    let p = problem(send(&app, reqwest::Method::GET, "/v1/models", None).await, 401).await;
    assert!(p["detail"].as_str().unwrap().contains("Bearer"), "{p}");
    assert_eq!(send(&app, reqwest::Method::GET, "/v1/models", Some(&admin)).await.status(), 200);
    // Health checks and the docs stay open; metrics do not.
    for open in ["/healthz", "/readyz", "/openapi.json", "/docs"] {
        assert_eq!(send(&app, reqwest::Method::GET, open, None).await.status(), 200, "{open}");
    }
    problem(send(&app, reqwest::Method::GET, "/metrics", None).await, 401).await;
    assert_eq!(send(&app, reqwest::Method::GET, "/metrics", Some(&admin)).await.status(), 200);
}

#[tokio::test]
async fn scopes_decide_what_a_key_may_do() {
    let app = spawn_app_with(0, |s| s.auth.required = true).await;
    // Required: closed before any key exists.
    problem(send(&app, reqwest::Method::GET, "/v1/models", None).await, 401).await;
    let admin = create_key_cli(&app, "ops", "admin");
    let new_key = |principal: &str, scopes: &str| {
        let body = json!({"principal": principal, "scopes": scopes, "name": "test"});
        app.client.post(app.url("/v1/keys")).bearer_auth(&admin).json(&body).send()
    };
    let res = new_key("alice", "read").await.unwrap();
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let reader = created["key"].as_str().unwrap().to_owned();
    assert_eq!(created["principal"], "alice");
    let writer: Value = new_key("bob", "write").await.unwrap().json().await.unwrap();
    let writer = writer["key"].as_str().unwrap().to_owned();

    // read: lists and downloads, no uploads; write: uploads, no keys; admin: keys.
    assert_eq!(send(&app, reqwest::Method::GET, "/v1/models", Some(&reader)).await.status(), 200);
    let upload = |key: &str| app.client.post(app.url("/v1/models")).bearer_auth(key).body(small_model()).send();
    let p = problem(upload(&reader).await.unwrap(), 403).await;
    assert!(p["detail"].as_str().unwrap().contains("`write` scope"), "{p}");
    assert_eq!(upload(&writer).await.unwrap().status(), 201);
    problem(send(&app, reqwest::Method::GET, "/v1/keys", Some(&writer)).await, 403).await;
    let listed: Value = send(&app, reqwest::Method::GET, "/v1/keys", Some(&admin)).await.json().await.unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3);
    assert!(!listed.to_string().contains(&reader[16..]), "secrets are never listed");
    assert!(listed.to_string().contains("last_used_at"));

    // Two live keys per principal (rotation), not three.
    assert_eq!(new_key("alice", "read").await.unwrap().status(), 201);
    let p = problem(new_key("alice", "read").await.unwrap(), 409).await;
    assert_eq!(p["code"], "too_many_keys");
    let p = problem(
        app.client
            .post(app.url("/v1/keys"))
            .bearer_auth(&admin)
            .json(&json!({"principal": "a b", "scopes": "read"}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p["pointer"], "/principal");
    let p = problem(
        app.client
            .post(app.url("/v1/keys"))
            .bearer_auth(&admin)
            .json(&json!({"principal": "c", "scopes": "root"}))
            .send()
            .await
            .unwrap(),
        422,
    )
    .await;
    assert_eq!(p["pointer"], "/scopes");

    // Revoked keys stop at once, on the API and from the CLI.
    let id = &reader[3..15];
    assert_eq!(send(&app, reqwest::Method::DELETE, &format!("/v1/keys/{id}"), Some(&admin)).await.status(), 204);
    let p = problem(send(&app, reqwest::Method::GET, "/v1/models", Some(&reader)).await, 401).await;
    assert!(p["detail"].as_str().unwrap().contains("revoked"), "{p}");
    let out = keys_cli(&app, &["revoke", &writer[3..15]]);
    assert!(out.status.success());
    problem(send(&app, reqwest::Method::GET, "/v1/models", Some(&writer)).await, 401).await;
    let out = keys_cli(&app, &["list"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().iter().filter(|k| k["revoked_at"].is_string()).count(), 2);
}

#[tokio::test]
async fn malformed_mistyped_unknown_and_expired_keys_are_401() {
    let app = spawn_app_with(0, |s| s.auth.required = true).await;
    let admin = create_key_cli(&app, "ops", "admin");
    let mut typo = admin.clone().into_bytes();
    typo[30] = if typo[30] == b'x' { b'y' } else { b'x' };
    let typo = String::from_utf8(typo).unwrap();
    let get = |auth: &str| app.client.get(app.url("/v1/models")).header("authorization", auth.to_owned()).send();
    for (auth, words) in [
        (format!("Basic {admin}"), "Bearer mp_"),
        ("Bearer sk-123".to_string(), "not a ModelPress key"),
        (format!("Bearer {typo}"), "checksum"),
    ] {
        let p = problem(get(&auth).await.unwrap(), 401).await;
        assert!(p["detail"].as_str().unwrap().contains(words), "{auth}: {p}");
    }
    // A well-formed key that was never issued (its checksum is right).
    let forged = {
        let out = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(["keys", "create", "--principal", "elsewhere", "--scopes", "admin"])
            .env("MODELPRESS__STORAGE__DATA_DIR", tempfile::tempdir().unwrap().path())
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let p = problem(get(&format!("Bearer {forged}")).await.unwrap(), 401).await;
    assert_eq!(p["detail"], "unknown key");
    // Expired: a key whose expiry is moved into the past in the database.
    let out = keys_cli(&app, &["create", "--principal", "temp", "--scopes", "read", "--expires-in-days", "1"]);
    let temp = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(get(&format!("Bearer {temp}")).await.unwrap().status(), 200);
    let dir = app.data_dir();
    let pool = modelpress::storage::db::Db::connect(&test_database_url(&dir), &dir).await.unwrap().pool;
    sqlx::query("update api_keys set expires_at = 1 where id = $1").bind(&temp[3..15]).execute(&pool).await.unwrap();
    let p = problem(get(&format!("Bearer {temp}")).await.unwrap(), 401).await;
    assert!(p["detail"].as_str().unwrap().contains("expired"), "{p}");
    assert_eq!(get(&format!("Bearer {admin}")).await.unwrap().status(), 200);
    // Only a hash of the secret is stored.
    let stored: Vec<String> = sqlx::query_scalar("select secret_sha256 from api_keys").fetch_all(&pool).await.unwrap();
    assert!(stored.iter().all(|h| h.len() == 64 && !admin.contains(h.as_str())));
    let used: Option<i64> = sqlx::query_scalar("select last_used_at from api_keys where id = $1")
        .bind(&admin[3..15])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(used.is_some(), "last_used_at is recorded");
}

#[tokio::test]
async fn another_principals_models_datasets_and_jobs_do_not_exist_for_you() {
    let app = spawn_app(0).await;
    // Uploaded before any key: it belongs to `local`, which only admins see once keys exist.
    let old = app.upload_ok(small_model()).await;
    let admin = create_key_cli(&app, "ops", "admin");
    let alice = create_key_cli(&app, "alice", "write");
    let bob = create_key_cli(&app, "bob", "write");
    let upload = |key: String| {
        let app = &app;
        async move {
            let res =
                app.client.post(app.url("/v1/models")).bearer_auth(&key).body(small_model()).send().await.unwrap();
            assert_eq!(res.status(), 201);
            res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
        }
    };
    let model = upload(alice.clone()).await;
    let bobs = upload(bob.clone()).await;
    let job_spec = |m: &str| json!({"model_id": m, "steps": [{"op": "quantize", "bits": 8}]});
    let create = |key: &str, spec: Value, idem: &str| {
        app.client.post(app.url("/v1/jobs")).bearer_auth(key).header("idempotency-key", idem).json(&spec).send()
    };
    let res = create(&alice, job_spec(&model), "same-key").await.unwrap();
    assert_eq!(res.status(), 202);
    let job = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();

    // Bob: 404 for every path to Alice's rows, and his lists do not show them.
    for (method, path) in [
        (reqwest::Method::GET, format!("/v1/models/{model}")),
        (reqwest::Method::GET, format!("/v1/models/{model}/file")),
        (reqwest::Method::GET, format!("/v1/models/{model}/graph")),
        (reqwest::Method::DELETE, format!("/v1/models/{model}")),
        (reqwest::Method::GET, format!("/v1/models/{old}")),
        (reqwest::Method::GET, format!("/v1/jobs/{job}")),
        (reqwest::Method::POST, format!("/v1/jobs/{job}/cancel")),
        (reqwest::Method::GET, format!("/v1/jobs/{job}/artifacts")),
        (reqwest::Method::GET, format!("/v1/jobs/{job}/report")),
        (reqwest::Method::GET, format!("/v1/jobs/{job}/events")),
    ] {
        let res = send(&app, method.clone(), &path, Some(&bob)).await;
        assert_eq!(res.status(), 404, "{method} {path}");
    }
    let listed: Value = send(&app, reqwest::Method::GET, "/v1/models", Some(&bob)).await.json().await.unwrap();
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [bobs.as_str()]);
    let listed: Value = send(&app, reqwest::Method::GET, "/v1/jobs", Some(&bob)).await.json().await.unwrap();
    assert_eq!(listed["items"], json!([]));
    // A job on Alice's model is refused as if it did not exist.
    let p = problem(create(&bob, job_spec(&model), "other").await.unwrap(), 422).await;
    assert_eq!(p["pointer"], "/model_id", "{p}");
    // The same Idempotency-Key is Bob's own: a new job, not Alice's replayed.
    let res = create(&bob, job_spec(&bobs), "same-key").await.unwrap();
    assert_eq!(res.status(), 202);
    assert_ne!(res.json::<Value>().await.unwrap()["id"], job);

    // Alice sees hers; the admin sees everything, the rows from before keys included.
    assert_eq!(send(&app, reqwest::Method::GET, &format!("/v1/jobs/{job}"), Some(&alice)).await.status(), 200);
    assert_eq!(send(&app, reqwest::Method::GET, &format!("/v1/models/{old}"), Some(&admin)).await.status(), 200);
    let all: Value = send(&app, reqwest::Method::GET, "/v1/models", Some(&admin)).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 3);
    let all: Value = send(&app, reqwest::Method::GET, "/v1/jobs", Some(&admin)).await.json().await.unwrap();
    assert_eq!(all["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn registered_models_belong_to_the_jobs_principal_and_revoking_every_key_keeps_auth_on() {
    let app = spawn_app(1).await;
    let alice = create_key_cli(&app, "alice", "write");
    let reader = create_key_cli(&app, "bob", "read");
    let res = app.client.post(app.url("/v1/models")).bearer_auth(&alice).body(small_model()).send().await.unwrap();
    let model = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "register": true, "steps": [{"op": "quantize", "bits": 8}]});
    // A read key may plan (nothing is stored), not run.
    let plan = app
        .client
        .post(app.url("/v1/plans"))
        .bearer_auth(&reader)
        .json(&json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8}]}))
        .send()
        .await
        .unwrap();
    // Not 403: the read key may plan; alice's model just does not exist for bob.
    let p = problem(plan, 422).await;
    assert_eq!(p["pointer"], "/model_id", "{p}");

    let res = app.client.post(app.url("/v1/jobs")).bearer_auth(&alice).json(&spec).send().await.unwrap();
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut job = Value::Null;
    for _ in 0..300 {
        job = send(&app, reqwest::Method::GET, &format!("/v1/jobs/{id}"), Some(&alice)).await.json().await.unwrap();
        if job["status"] == "succeeded" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let registered = job["registered_model_id"].as_str().expect("registered").to_owned();
    let mine: Value =
        send(&app, reqwest::Method::GET, &format!("/v1/models/{registered}"), Some(&alice)).await.json().await.unwrap();
    assert_eq!(mine["tensor_count"], mine["tensors"].as_array().unwrap().len());
    let listed: Value = send(&app, reqwest::Method::GET, "/v1/models", Some(&alice)).await.json().await.unwrap();
    assert!(listed["items"].as_array().unwrap().iter().all(|m| m["tensor_count"].as_u64().unwrap() > 0));
    assert_eq!(
        send(&app, reqwest::Method::GET, &format!("/v1/models/{registered}"), Some(&reader)).await.status(),
        404
    );

    // `local` (what was made while keys were off) cannot be handed to a key.
    let out = keys_cli(&app, &["create", "--principal", "local", "--scopes", "read"]);
    assert!(!out.status.success());
    // Revoking every key does not reopen the server to anonymous admins.
    for key in [&alice, &reader] {
        assert!(keys_cli(&app, &["revoke", &key[3..15]]).status.success());
    }
    problem(send(&app, reqwest::Method::GET, "/v1/models", None).await, 401).await;
}

#[tokio::test]
async fn without_keys_only_localhost_addressed_tool_requests_act_as_the_local_admin() {
    let app = spawn_app(0).await;
    assert_eq!(app.get("/v1/models").await.status(), 200);
    // A DNS-rebinding page reaches 127.0.0.1 under its own name: refused, reads included.
    let rebound = app.client.get(app.url("/v1/models")).header("host", "rebind.example:8080").send().await.unwrap();
    let p = problem(rebound, 403).await;
    assert_eq!(p["code"], "api_key_required");
    // A cross-site form post from a page elsewhere: refused; the same from a tool: accepted.
    let upload = |origin: Option<&'static str>| {
        let mut req = app.client.post(app.url("/v1/models")).body(small_model());
        if let Some(o) = origin {
            req = req.header("origin", o).header("sec-fetch-site", "cross-site");
        }
        req.send()
    };
    let p = problem(upload(Some("https://evil.example")).await.unwrap(), 403).await;
    assert_eq!(p["code"], "cross_site_request");
    assert_eq!(upload(None).await.unwrap().status(), 201);
    // The health checks stay open to any host (probes use the pod's address).
    let probe = app.client.get(app.url("/readyz")).header("host", "10.0.0.7:8080").send().await.unwrap();
    assert_eq!(probe.status(), 200);
    // With keys, the host does not matter.
    let key = create_key_cli(&app, "ops", "admin");
    let res = app
        .client
        .get(app.url("/v1/models"))
        .header("host", "modelpress.internal")
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test]
async fn a_principal_past_its_queued_jobs_quota_gets_429_while_others_still_queue() {
    let app = spawn_app_with(0, |s| s.queue.max_queued_per_principal = 3).await;
    let alice = create_key_cli(&app, "alice", "write");
    let bob = create_key_cli(&app, "bob", "write");
    let submit = |key: String| {
        let app = &app;
        async move {
            let res =
                app.client.post(app.url("/v1/models")).bearer_auth(&key).body(small_model()).send().await.unwrap();
            let model = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8}]});
            let mut statuses = Vec::new();
            for _ in 0..4 {
                let res = app.client.post(app.url("/v1/jobs")).bearer_auth(&key).json(&spec).send().await.unwrap();
                statuses.push((res.status().as_u16(), res.headers().get("retry-after").is_some()));
            }
            statuses
        }
    };
    let alices = submit(alice).await;
    assert_eq!(alices, [(202, false), (202, false), (202, false), (429, true)]);
    let bobs = submit(bob).await;
    assert_eq!(bobs[0], (202, false), "another principal is not held back by alice's jobs");
}

#[tokio::test]
async fn a_principal_past_its_storage_quota_gets_413_and_can_upload_again_after_a_delete() {
    let size = small_model().len() as u64;
    let app = spawn_app_with(0, move |s| s.storage.max_stored_bytes_per_principal = Some(2 * size + size / 2)).await;
    let alice = create_key_cli(&app, "alice", "write");
    let bob = create_key_cli(&app, "bob", "write");
    let upload =
        |key: &str| app.client.post(app.url("/v1/models")).bearer_auth(key.to_owned()).body(small_model()).send();
    let first = upload(&alice).await.unwrap();
    assert_eq!(first.status(), 201);
    let first = first.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(upload(&alice).await.unwrap().status(), 201);
    let p = problem(upload(&alice).await.unwrap(), 413).await;
    assert_eq!(p["code"], "storage_quota_exceeded", "{p}");
    assert_eq!(upload(&bob).await.unwrap().status(), 201, "bob has a quota of his own");
    let res = app.client.delete(app.url(&format!("/v1/models/{first}"))).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(upload(&alice).await.unwrap().status(), 201);
}

#[tokio::test]
async fn a_principal_over_its_request_rate_gets_429_and_others_do_not() {
    let app = spawn_app_with(0, |s| s.auth.requests_per_second = 2).await;
    let alice = create_key_cli(&app, "alice", "read");
    let bob = create_key_cli(&app, "bob", "read");
    let mut statuses = Vec::new();
    for _ in 0..10 {
        let res = send(&app, reqwest::Method::GET, "/v1/models", Some(&alice)).await;
        if res.status() == 429 {
            assert!(res.headers().get("retry-after").is_some());
            assert_eq!(res.json::<Value>().await.unwrap()["code"], "rate_limited");
            statuses.push(429);
        } else {
            statuses.push(res.status().as_u16());
        }
    }
    // A burst of twice the rate passes, then the limit holds.
    assert!(statuses[..4].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(send(&app, reqwest::Method::GET, "/v1/models", Some(&bob)).await.status(), 200);
    // Health checks are never limited.
    assert_eq!(send(&app, reqwest::Method::GET, "/healthz", None).await.status(), 200);
}

#[tokio::test]
async fn an_event_stream_ends_when_its_key_is_revoked() {
    let app = spawn_app(0).await;
    let alice = create_key_cli(&app, "alice", "write");
    let res = app.client.post(app.url("/v1/models")).bearer_auth(&alice).body(small_model()).send().await.unwrap();
    let model = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let spec = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 8}]});
    let res = app.client.post(app.url("/v1/jobs")).bearer_auth(&alice).json(&spec).send().await.unwrap();
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    // No workers: the job stays queued and its stream stays open.
    let stream = send(&app, reqwest::Method::GET, &format!("/v1/jobs/{id}/events"), Some(&alice)).await;
    assert_eq!(stream.status(), 200);
    let body = tokio::spawn(async move { stream.text().await.unwrap() });
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!body.is_finished(), "the stream of a queued job stays open");
    assert!(keys_cli(&app, &["revoke", &alice[3..15]]).status.success());
    let text = tokio::time::timeout(std::time::Duration::from_secs(5), body).await.expect("the stream ended").unwrap();
    assert!(text.contains("queued"), "{text}");
}

#[tokio::test]
async fn cors_is_off_by_default_and_answers_only_the_listed_origins_when_set() {
    let preflight = |app: &TestApp, origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/jobs"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization,content-type")
            .send()
    };
    // Off: no CORS header on any answer, so a browser keeps responses from other pages.
    let app = spawn_app(0).await;
    let res = preflight(&app, "https://ui.example").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let res = app.client.get(app.url("/v1/models")).header("origin", "https://ui.example").send().await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    assert_eq!(problem(res, 403).await["code"], "cross_site_request", "keys off: a foreign script reads nothing");
    drop(app);

    let app = spawn_app_with(0, |s| s.server.cors_allowed_origins = vec!["https://ui.example".into()]).await;
    let key = create_key_cli(&app, "ui", "write");
    // The preflight carries no key and is answered before authentication.
    let res = preflight(&app, "https://ui.example").await.unwrap();
    assert!(res.status().is_success(), "{}", res.status());
    assert_eq!(res.headers()["access-control-allow-origin"], "https://ui.example");
    let allowed = res.headers()["access-control-allow-headers"].to_str().unwrap().to_owned();
    assert!(allowed.contains("authorization") && allowed.contains("idempotency-key"), "{allowed}");
    assert!(res.headers().get("access-control-allow-credentials").is_none());
    // The request itself still needs its key, and its answer names the origin.
    let res = app.client.post(app.url("/v1/models")).header("origin", "https://ui.example").body(small_model());
    let p = problem(res.send().await.unwrap(), 401).await;
    assert_eq!(p["code"], "unauthorized");
    let res = app
        .client
        .post(app.url("/v1/models"))
        .header("origin", "https://ui.example")
        .bearer_auth(&key)
        .body(small_model())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()["access-control-allow-origin"], "https://ui.example");
    assert!(res.headers()["access-control-expose-headers"].to_str().unwrap().contains("location"));
    // Another page gets no grant.
    let res = preflight(&app, "https://evil.example").await.unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_none());
    drop(app);

    // `*` while keys are off: a foreign page's script may not read as the local admin; a link
    // followed from elsewhere (no Origin: the page cannot read the answer) still opens.
    let app = spawn_app_with(0, |s| s.server.cors_allowed_origins = vec!["*".into()]).await;
    let res = app
        .client
        .get(app.url("/v1/models"))
        .header("origin", "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res, 403).await["code"], "cross_site_request");
    let res = app.client.get(app.url("/v1/models")).header("sec-fetch-site", "cross-site").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = app.client.get(app.url("/v1/models")).header("origin", "http://localhost:3000").send().await.unwrap();
    assert_eq!(res.status(), 200, "a page on this machine");
}

#[tokio::test]
async fn job_artifacts_count_toward_the_storage_quota_and_a_full_quota_refuses_new_jobs() {
    let size = small_model().len() as u64;
    // Room for the model and one byte more: the first job's artifacts fill it.
    let app = spawn_app_with(1, move |s| s.storage.max_stored_bytes_per_principal = Some(size + 1)).await;
    let alice = create_key_cli(&app, "alice", "write");
    let res = app.client.post(app.url("/v1/models")).bearer_auth(&alice).body(small_model()).send().await.unwrap();
    let model = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let create = || app.client.post(app.url("/v1/jobs")).bearer_auth(&alice).json(&int8_spec(&model)).send();
    let res = create().await.unwrap();
    assert_eq!(res.status(), 202);
    let job = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let mut status = Value::Null;
    for _ in 0..600 {
        let res = send(&app, reqwest::Method::GET, &format!("/v1/jobs/{job}"), Some(&alice)).await;
        status = res.json::<Value>().await.unwrap()["status"].clone();
        if status == "succeeded" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, "succeeded");
    // A bad spec is still told what is wrong with it first.
    let bad = json!({"model_id": model, "steps": [{"op": "quantize", "bits": 3}]});
    let res = app.client.post(app.url("/v1/jobs")).bearer_auth(&alice).json(&bad).send().await.unwrap();
    assert_eq!(res.status(), 422);
    let p = problem(create().await.unwrap(), 403).await;
    assert_eq!(p["code"], "storage_quota_exceeded");
    assert!(p["detail"].as_str().unwrap().contains("job artifacts"), "{p}");
    // Deleting the finished job frees its artifacts.
    let res = app.client.delete(app.url(&format!("/v1/jobs/{job}"))).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(res.status(), 204);
    assert_eq!(create().await.unwrap().status(), 202);
}
