use serde_json::Value;

use crate::helpers::*;

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app(2).await;
    assert_eq!(app.get_json("/healthz").await["status"], "ok");
    let ready = app.get_json("/readyz").await;
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["workers"], "ok");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_jobs_by_status() {
    let app = spawn_app(0).await;
    let id = app.upload_ok(small_model()).await;
    app.get(&format!("/v1/models/{id}")).await;
    app.create_job_ok(&int8_spec(&id)).await;
    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(text.contains(r#"route="/v1/models/{id}""#), "{text}");
    assert!(text.contains("modelpress_http_request_duration_seconds"));
    assert!(text.contains(r#"modelpress_jobs{status="queued"} 1"#), "{text}");
    assert!(text.contains("modelpress_upload_bytes_total"));
}

#[tokio::test]
async fn the_openapi_document_and_docs_page_are_served() {
    let app = spawn_app(0).await;
    let doc = app.get_json("/openapi.json").await;
    for path in ["/v1/models", "/v1/jobs", "/v1/jobs/{id}/events", "/v1/plans", "/readyz"] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let res = app.get("/docs").await;
    assert!(res.headers()["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"));
    assert_eq!(res.headers()["x-content-type-options"], "nosniff");
    let page = res.text().await.unwrap();
    assert!(page.contains("/openapi.json"));
    assert!(!page.contains("https://"), "the docs page loads nothing from the network");
}

#[tokio::test]
async fn unknown_routes_are_problems_carrying_the_request_id() {
    let app = spawn_app(0).await;
    let res = app.client.get(app.url("/v2/nothing")).header("x-request-id", "trace-me-123").send().await.unwrap();
    assert_eq!(res.status(), 404);
    assert_eq!(res.headers()["x-request-id"], "trace-me-123");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], "route_not_found");
    assert_eq!(body["request_id"], "trace-me-123");
    let res = app.client.delete(app.url("/v1/jobs")).send().await.unwrap();
    assert_eq!(res.status(), 405);
}

#[tokio::test]
async fn a_restarted_app_keeps_its_models_jobs_and_artifacts() {
    let app = spawn_app(1).await;
    let id = app.upload_ok(small_model()).await;
    let job = app.create_job_ok(&int8_spec(&id)).await;
    assert_eq!(app.wait_terminal(&job).await["status"], "succeeded");
    let report = app.download(&format!("/v1/jobs/{job}/report")).await;
    let dir = app.stop().await;

    let app = spawn_app_with(0, |s| s.storage.data_dir = dir.path().to_path_buf()).await;
    assert_eq!(app.get_json(&format!("/v1/models/{id}")).await["id"], id);
    assert_eq!(app.job(&job).await["status"], "succeeded");
    assert_eq!(app.download(&format!("/v1/jobs/{job}/report")).await, report);
    drop(dir);
}

#[tokio::test]
async fn a_client_trickling_its_headers_is_cut_off_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(0, |s| s.server.header_read_timeout_secs = 1).await;
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut slow = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::TcpStream::connect(&address).await.unwrap();
        s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ").await.unwrap();
        slow.push(s);
    }
    // And clients that connect and send nothing at all.
    for _ in 0..5 {
        slow.push(tokio::net::TcpStream::connect(&address).await.unwrap());
    }
    // Others are served meanwhile.
    assert_eq!(app.get("/healthz").await.status(), 200);
    // Within a few seconds of the 1 s limit every slow connection is closed by the server
    // (hyper answers 408 or just closes).
    let started = std::time::Instant::now();
    for mut s in slow {
        let mut buf = Vec::new();
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        assert!(read.is_ok(), "a connection still open after {:?}", started.elapsed());
        let text = String::from_utf8_lossy(&buf);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
