//! The whole server on an S3-compatible blob store (issue 9): run when
//! `MODELPRESS_TEST_S3_ENDPOINT` names one (`.ci/run` starts s3s-fs on loopback), skipped with a
//! message otherwise. Credentials come from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`.

use serde_json::json;

use crate::helpers::*;

/// Points `s` at the test endpoint under a fresh prefix; `None` when no endpoint is set.
fn s3_settings() -> Option<impl Fn(&mut modelpress::config::Settings) + Clone> {
    let endpoint = std::env::var("MODELPRESS_TEST_S3_ENDPOINT").ok()?;
    let bucket = std::env::var("MODELPRESS_TEST_S3_BUCKET").unwrap_or_else(|_| "modelpress-test".into());
    let url = format!("s3://{bucket}/api/{}", uuid::Uuid::new_v4());
    Some(move |s: &mut modelpress::config::Settings| {
        s.storage.blob_store = url.clone();
        s.storage.s3_endpoint = Some(endpoint.clone());
        s.storage.s3_allow_http = endpoint.starts_with("http://");
        s.storage.s3_region = Some("us-east-1".into());
    })
}

#[tokio::test]
async fn uploads_jobs_and_downloads_run_on_an_s3_blob_store_and_survive_an_empty_cache() {
    let Some(configure) = s3_settings() else {
        eprintln!("skipped: set MODELPRESS_TEST_S3_ENDPOINT (and AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) to run it");
        return;
    };
    let app = spawn_app_with(1, configure.clone()).await;
    let bytes = small_model();
    let model = app.upload_ok(bytes.clone()).await;
    let (job, _, out) = run_job(&app, &int8_spec(&model)).await;
    let job_id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(app.download(&format!("/v1/models/{model}/file")).await, bytes);
    // The blobs are in the bucket, with local copies only in the read cache.
    let cached = std::fs::read_dir(app.data_dir().join("blob-cache")).unwrap().count();
    assert!(cached >= 2, "the model and the job's artifacts are cached: {cached}");

    // Another replica's view: the same database, an empty cache. Every blob comes back from
    // the bucket, whole and by range, and a new job reads its input from there.
    let data = app.stop().await;
    std::fs::remove_dir_all(data.path().join("blob-cache")).unwrap();
    let dir = data.path().to_path_buf();
    let app = spawn_app_with(1, move |s| {
        configure(s);
        s.storage.data_dir = dir.clone();
    })
    .await;
    assert_eq!(app.download(&format!("/v1/models/{model}/file")).await, bytes);
    let artifact = app.download(&format!("/v1/jobs/{job_id}/artifacts/model.safetensors")).await;
    assert_eq!(artifact, out["model.safetensors"]);
    let part = app
        .client
        .get(app.url(&format!("/v1/models/{model}/file")))
        .header("Range", "bytes=8-15")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.bytes().await.unwrap().to_vec(), bytes[8..16].to_vec());
    let (_, _, again) =
        run_job(&app, &json!({"model_id": model, "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]}))
            .await;
    assert!(again.contains_key("model.safetensors"));
    drop(data);
}

#[tokio::test]
async fn a_missing_bucket_stops_the_start_with_the_reason() {
    let Some(configure) = s3_settings() else {
        eprintln!("skipped: set MODELPRESS_TEST_S3_ENDPOINT to run it");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut settings = test_settings(dir.path(), 0);
    configure(&mut settings);
    settings.storage.blob_store = "s3://no-such-bucket/x".into();
    let e = modelpress::startup::Application::build(settings).await.err().expect("the start fails");
    let text = format!("{e:#}");
    assert!(text.contains("reaching the blob store s3://no-such-bucket/x"), "{text}");
}
