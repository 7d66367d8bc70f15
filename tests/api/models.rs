use serde_json::{json, Value};

use crate::helpers::*;

#[tokio::test]
async fn an_uploaded_model_is_listed_described_and_downloaded_whole_and_by_range() {
    let app = spawn_app(0).await;
    let bytes = small_model();
    let res = app.upload(bytes.clone()).await;
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    let model: Value = res.json().await.unwrap();
    let id = model["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/models/{id}"));
    assert_eq!(model["bytes"], bytes.len());
    assert_eq!(model["parameters"], 512 + 16 + 128);
    let fc1 = model["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "fc1.weight").unwrap();
    assert_eq!(fc1, &json!({"name": "fc1.weight", "dtype": "F32", "shape": [16, 32], "bytes": 2048}));

    let list = app.get_json("/v1/models").await;
    assert_eq!(list["items"][0]["id"], id);
    assert_eq!(list["has_more"], false);
    assert!(list["items"][0].get("tensors").is_none(), "lists omit the tensor table");

    let file = app.get(&format!("/v1/models/{id}/file")).await;
    let etag = file.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", model["sha256"].as_str().unwrap()));
    assert_eq!(file.bytes().await.unwrap().to_vec(), bytes);

    let part =
        app.client.get(app.url(&format!("/v1/models/{id}/file"))).header("Range", "bytes=8-15").send().await.unwrap();
    assert_eq!(part.status(), 206);
    assert_eq!(part.headers()["content-range"], format!("bytes 8-15/{}", bytes.len()));
    assert_eq!(part.bytes().await.unwrap().to_vec(), bytes[8..16].to_vec());

    let cached =
        app.client.get(app.url(&format!("/v1/models/{id}/file"))).header("If-None-Match", &etag).send().await.unwrap();
    assert_eq!(cached.status(), 304);
    let bad =
        app.client.get(app.url(&format!("/v1/models/{id}/file"))).header("Range", "bytes=99999-").send().await.unwrap();
    assert_eq!(bad.status(), 416);
}

#[tokio::test]
async fn the_same_file_uploaded_twice_shares_one_blob() {
    let app = spawn_app(0).await;
    let a = app.upload_ok(small_model()).await;
    let b = app.upload_ok(small_model()).await;
    assert_ne!(a, b);
    assert_eq!(blob_files(&app.data_dir()).len(), 1);
    // Deleting one keeps the blob for the other.
    assert_eq!(app.client.delete(app.url(&format!("/v1/models/{a}"))).send().await.unwrap().status(), 204);
    assert_eq!(blob_files(&app.data_dir()).len(), 1);
    assert_eq!(app.get(&format!("/v1/models/{b}/file")).await.status(), 200);
    assert_eq!(app.client.delete(app.url(&format!("/v1/models/{b}"))).send().await.unwrap().status(), 204);
    assert_eq!(blob_files(&app.data_dir()).len(), 0);
    assert_eq!(app.get(&format!("/v1/models/{b}")).await.status(), 404);
}

async fn assert_problem(res: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()["content-type"], "application/problem+json");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{body}");
    assert_eq!(body["status"], status);
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    body
}

#[tokio::test]
async fn every_bad_upload_gets_its_status_and_leaves_nothing_behind() {
    let app = spawn_app_with(0, |s| {
        s.storage.max_header_bytes = 4096;
        s.storage.max_upload_bytes = 1 << 20;
    })
    .await;
    app.upload_ok(small_model()).await;
    let before = app.stored_state().await;

    let pickle = vec![0x80, 0x02, b'}', b'q', 0, b'.'];
    let body = assert_problem(app.upload(pickle).await, 415, "not_safetensors").await;
    assert!(body["detail"].as_str().unwrap().contains("Python pickle"));
    assert_problem(app.upload(b"PK\x03\x04zipzipzip".to_vec()).await, 415, "not_safetensors").await;
    assert_problem(app.upload(Vec::new()).await, 415, "not_safetensors").await;
    assert_problem(
        app.upload(values(64, 9, 1.0).iter().flat_map(|v| v.to_le_bytes()).collect()).await,
        415,
        "not_safetensors",
    )
    .await;

    let mut truncated = small_model();
    truncated.truncate(truncated.len() - 10);
    let body = assert_problem(app.upload(truncated).await, 422, "invalid_safetensors").await;
    assert_eq!(body["pointer"], "/tensors/fc2.weight", "{body}");
    assert!(body["detail"].as_str().unwrap().contains("truncated"), "{body}");

    let mut header = format!(
        "{{\"w\":{{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}},\"__metadata__\":{{\"pad\":\"{}\"}}}}",
        "x".repeat(5000)
    )
    .into_bytes();
    let mut huge = (header.len() as u64).to_le_bytes().to_vec();
    huge.append(&mut header);
    huge.extend_from_slice(&[0; 4]);
    let body = assert_problem(app.upload(huge).await, 413, "header_too_large").await;
    assert!(body["detail"].as_str().unwrap().contains("limit of 4096 bytes"));

    let too_big = safetensors_f32(&[("w.weight", vec![512, 1024], vec![0.0; 512 * 1024])]);
    assert_problem(app.upload(too_big.clone()).await, 413, "upload_too_large").await;
    // Without Content-Length (chunked), the limit trips mid-stream.
    let res = app.post_chunks("/v1/models", too_big.chunks(64 * 1024).map(<[u8]>::to_vec).collect()).await;
    assert_problem(res, 413, "upload_too_large").await;

    let dup = br#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
    let mut file = (dup.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(dup);
    file.extend_from_slice(&[0; 8]);
    let body = assert_problem(app.upload(file).await, 422, "invalid_safetensors").await;
    assert!(body["detail"].as_str().unwrap().contains("appears twice"));

    assert_eq!(app.stored_state().await, before);
}

#[tokio::test]
async fn a_dataset_needs_an_inputs_tensor() {
    let app = spawn_app(0).await;
    let res = app.upload_dataset(small_model()).await;
    assert_problem(res, 422, "invalid_dataset").await;
    let ds =
        safetensors_f32(&[("inputs", vec![4, 2], values(8, 1, 1.0)), ("labels", vec![4], vec![0.0, 1.0, 0.0, 1.0])]);
    let res = app.upload_dataset(ds).await;
    assert_eq!(res.status(), 201);
    let id = res.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    assert_eq!(app.get_json(&format!("/v1/datasets/{id}")).await["kind"], "dataset");
    // A dataset is not a model.
    assert_eq!(app.get(&format!("/v1/models/{id}")).await.status(), 404);
}

#[tokio::test]
async fn a_model_used_by_a_queued_job_cannot_be_deleted() {
    let app = spawn_app(0).await;
    let id = app.upload_ok(small_model()).await;
    let job = app.create_job_ok(&int8_spec(&id)).await;
    let res = app.client.delete(app.url(&format!("/v1/models/{id}"))).send().await.unwrap();
    let body = assert_problem(res, 409, "in_use").await;
    assert!(body["detail"].as_str().unwrap().contains("1 queued or running job"));
    app.cancel(&job).await;
    assert_eq!(app.client.delete(app.url(&format!("/v1/models/{id}"))).send().await.unwrap().status(), 204);
}

#[tokio::test]
async fn malformed_ids_and_queries_are_400_problems() {
    let app = spawn_app(0).await;
    let body = assert_problem(app.get("/v1/models/not-a-uuid").await, 400, "invalid_id").await;
    assert_eq!(body["pointer"], "/id");
    let body = assert_problem(app.get("/v1/models?limit=abc").await, 400, "invalid_query").await;
    assert_eq!(body["pointer"], "/limit");
    assert_problem(app.get("/v1/models?limit=0").await, 400, "invalid_query").await;
    assert_problem(app.get("/v1/models?color=red").await, 400, "invalid_query").await;
}

#[tokio::test]
async fn model_pages_never_repeat_or_skip() {
    let app = spawn_app(0).await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let m = safetensors_f32(&[("w.weight", vec![2, 2], values(4, i, 1.0))]);
        ids.push(app.upload_ok(m).await);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let q = after.as_ref().map_or(String::new(), |a| format!("&after={a}"));
        let page = app.get_json(&format!("/v1/models?limit=3{q}")).await;
        seen.extend(page["items"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()));
        if !page["has_more"].as_bool().unwrap() {
            assert!(page["next"].is_null());
            break;
        }
        after = Some(page["next"].as_str().unwrap().to_owned());
    }
    ids.reverse();
    assert_eq!(seen, ids, "newest first, each exactly once");
}

#[tokio::test]
async fn a_header_whose_length_looks_like_a_pickle_is_still_accepted_and_put_uploads_work() {
    let app = spawn_app(0).await;
    // Pad a real header to exactly 640 bytes: its length field then reads 80 02 00 ...
    let mut json = r#"{"w.weight":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#.to_string();
    json.push_str(&" ".repeat(640 - json.len()));
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    assert_eq!(&file[..2], &[0x80, 0x02]);
    file.extend_from_slice(json.as_bytes());
    file.extend(std::iter::repeat_n(0u8, 16));
    let res = app.upload(file).await;
    assert_eq!(res.status(), 201, "{}", res.text().await.unwrap());
    // `curl -T file URL` sends PUT.
    let res = app.client.put(app.url("/v1/models")).body(small_model()).send().await.unwrap();
    assert_eq!(res.status(), 201);
}

#[tokio::test]
async fn a_200_000_tensor_model_lists_fast_and_its_table_and_plan_come_in_windows() {
    let app = spawn_app(0).await;
    let names: Vec<String> = (0..200_000).map(|i| format!("blocks.{i}.scale")).collect();
    let tensors: Vec<(&str, Vec<usize>, Vec<f32>)> = names.iter().map(|n| (n.as_str(), vec![1], vec![1.0])).collect();
    let res = app.upload(safetensors_f32(&tensors)).await;
    assert_eq!(res.status(), 201);
    let created: Value = res.json().await.unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    assert_eq!(created["tensors"].as_array().unwrap().len(), 10_000);
    // A list row is a summary read from a stored count, whatever the table's size.
    let started = std::time::Instant::now();
    let body = app.get("/v1/models").await.bytes().await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "listing took {:?}", started.elapsed());
    assert!(body.len() < 4096, "a list row is a summary: {} bytes", body.len());
    let list: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(list["items"][0]["tensor_count"], 200_000);
    assert!(list["items"][0].get("tensors").is_none());
    // The table comes 10,000 at a time, with the offset of the next window.
    let one = app.get_json(&format!("/v1/models/{id}")).await;
    assert_eq!(one["tensor_count"], 200_000);
    assert_eq!(one["tensors"].as_array().unwrap().len(), 10_000);
    assert_eq!(one["tensors_next_offset"], 10_000);
    let last = app.get_json(&format!("/v1/models/{id}?tensors_offset=199990&tensors_limit=50")).await;
    assert_eq!(last["tensors"].as_array().unwrap().len(), 10);
    assert!(last.get("tensors_next_offset").is_none());
    let at = app.get_json(&format!("/v1/models/{id}?tensors_offset=195000&tensors_limit=1")).await;
    let name_at_195000 = at["tensors"][0]["name"].clone();
    assert_eq!(at["tensors_next_offset"], 195_001);
    // A window of none lists none and points nowhere.
    let none = app.get_json(&format!("/v1/models/{id}?tensors_offset=5&tensors_limit=0")).await;
    assert_eq!(none["tensors"], json!([]));
    assert!(none.get("tensors_next_offset").is_none());
    let res = app.get(&format!("/v1/models/{id}?tensors_limit=10001")).await;
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["pointer"], "/tensors_limit");
    // So does the plan's; its totals cover every tensor.
    let spec = json!({"model_id": id, "steps": [{"op": "prune", "method": "magnitude", "sparsity": 0.5}]});
    let res = app.post_json("/v1/plans?tensors_offset=195000", &spec).await;
    assert_eq!(res.status(), 200);
    let plan: Value = res.json().await.unwrap();
    assert_eq!(plan["totals"]["tensors"], 200_000);
    assert_eq!(plan["tensors"].as_array().unwrap().len(), 5_000);
    assert_eq!(plan["tensors"][0]["name"], name_at_195000);
    assert!(plan.get("tensors_next_offset").is_none());
    let plan = app.post_json("/v1/plans", &spec).await.json::<Value>().await.unwrap();
    assert_eq!(plan["tensors_next_offset"], 10_000);
}

#[tokio::test]
async fn headers_past_the_tensor_count_or_name_length_limits_are_refused_by_name() {
    let app = spawn_app_with(0, |s| {
        s.storage.max_tensors = 3;
        s.storage.max_tensor_name_bytes = 16;
    })
    .await;
    let four: Vec<(&str, Vec<usize>, Vec<f32>)> =
        ["a", "b", "c", "d"].iter().map(|n| (*n, vec![1], vec![1.0])).collect();
    let res = app.upload(safetensors_f32(&four)).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!((p["code"].as_str(), p["pointer"].as_str()), (Some("too_many_tensors"), Some("/tensors")));
    assert!(p["detail"].as_str().unwrap().contains("storage.max_tensors"), "{p}");
    let long = safetensors_f32(&[("model/layers.0.attention.weight", vec![1], vec![1.0])]);
    let res = app.upload(long).await;
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["code"], "tensor_name_too_long");
    assert_eq!(p["pointer"], "/tensors/model~1layers.0.attention.weight");
    // A name past what the message shows is cut there, but the pointer names the whole tensor.
    let name = format!("blocks/{}", "x".repeat(200));
    let res = app.upload(safetensors_f32(&[(name.as_str(), vec![1], vec![1.0])])).await;
    let p: Value = res.json().await.unwrap();
    assert_eq!(p["pointer"].as_str().unwrap(), format!("/tensors/blocks~1{}", "x".repeat(200)));
    assert!(p["detail"].as_str().unwrap().contains("…` has a 207-byte name"), "{p}");
    assert_eq!(staging_entries(&app.data_dir()), 0);
    assert_eq!(app.upload(safetensors_f32(&four[..3])).await.status(), 201);
}

#[tokio::test]
async fn uploads_past_the_concurrency_cap_get_503_while_the_rest_stays_responsive() {
    type Sender = tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>;
    let app = spawn_app_with(0, |s| s.storage.max_concurrent_uploads = 1).await;
    let model = small_model();
    // A slow client: the first bytes, then nothing until we say.
    let start_slow = || -> (Sender, tokio::task::JoinHandle<reqwest::StatusCode>) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.try_send(Ok(model[..16].to_vec())).unwrap();
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let request = app
            .client
            .post(app.url("/v1/models"))
            .header("content-length", model.len())
            .body(reqwest::Body::wrap_stream(stream));
        (tx, tokio::spawn(async move { request.send().await.unwrap().status() }))
    };
    let (mut tx, mut slow) = start_slow();
    // Probe until an upload is refused because the slow one holds the permit (a probe can also
    // take the permit first and make the slow one the refused one: then start it again).
    let mut refused = None;
    for _ in 0..250 {
        if slow.is_finished() {
            (tx, slow) = start_slow();
        }
        let res = app.upload(small_model()).await;
        if res.status() == 503 {
            refused = Some(res);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let res = refused.expect("an upload is refused while another is received");
    assert_eq!(res.headers()["retry-after"], "5");
    assert_eq!(res.json::<serde_json::Value>().await.unwrap()["code"], "too_many_uploads");
    assert_eq!(app.get("/readyz").await.status(), 200);
    assert_eq!(app.get("/v1/models").await.status(), 200);
    // The slow client finishes; the permit comes back.
    tx.send(Ok(model[16..].to_vec())).await.unwrap();
    drop(tx);
    assert_eq!(slow.await.unwrap(), 201);
    assert_eq!(app.upload(small_model()).await.status(), 201);
}

/// Sends `head` then `body` in 8-byte pieces every 100 ms over a raw connection (under any idle
/// timeout) and returns what the server answered, and after how long.
async fn trickle(app: &TestApp, head: String, body: Vec<u8>) -> (String, std::time::Duration) {
    trickle_at(app, head, body, 8).await
}

/// [`trickle`] with pieces of `piece` bytes every 100 ms.
async fn trickle_at(app: &TestApp, head: String, body: Vec<u8>, piece: usize) -> (String, std::time::Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let address = app.address.trim_start_matches("http://").to_owned();
    let (mut read, mut write) = tokio::net::TcpStream::connect(&address).await.unwrap().into_split();
    let started = std::time::Instant::now();
    let writer = tokio::spawn(async move {
        write.write_all(head.as_bytes()).await.unwrap();
        for piece in body.chunks(piece) {
            if write.write_all(piece).await.is_err() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), read.read_to_end(&mut answer)).await;
    writer.abort();
    (String::from_utf8_lossy(&answer).into_owned(), started.elapsed())
}

// The trickling clients and the server share the test's runtime: two threads, so a stall of
// one (a busy machine) does not starve the client that must stay above the floor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_trickling_below_the_minimum_rate_is_cut_off_with_408_and_leaves_nothing() {
    let app = spawn_app_with(0, |s| {
        s.storage.min_upload_bytes_per_sec = 1000;
        s.storage.upload_rate_window_secs = 1;
    })
    .await;
    let model = small_model();
    // 80 bytes/s: a byte arrives well within the 60 s idle timeout, but far below 1000 bytes/s.
    let head = format!("PUT /v1/models HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n", model.len());
    let slow = trickle(&app, head, model.clone());
    // A multipart upload is paced the same way.
    let boundary = "XyZ";
    let mut form =
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"m.safetensors\"\r\n\r\n")
            .into_bytes();
    form.extend_from_slice(&model);
    form.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let head = format!(
        "POST /v1/models HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {}\r\n\r\n",
        form.len()
    );
    let slow_form = trickle(&app, head, form);
    // An upload above the floor that spans several windows passes: 20 KB/s for about 2 s.
    let steady = safetensors_f32(&[("w", vec![40, 256], values(40 * 256, 3, 0.1))]);
    let head = format!("PUT /v1/models HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n", steady.len());
    let steady = trickle_at(&app, head, steady, 2048);
    // A normal upload meanwhile is not held up.
    let (raw, multipart, fast, steady) = tokio::join!(slow, slow_form, app.upload(small_model()), steady);
    assert_eq!(fast.status(), 201);
    assert!(steady.0.starts_with("HTTP/1.1 201"), "{}", steady.0);
    assert!(steady.1 > std::time::Duration::from_millis(1500), "spans windows: {:?}", steady.1);
    for (answer, took) in [raw, multipart] {
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains("\"code\":\"upload_too_slow\""), "{answer}");
        assert!(answer.contains("min_upload_bytes_per_sec"), "{answer}");
        assert!(took < std::time::Duration::from_secs(4), "cut off after {took:?}");
    }
    assert_eq!(staging_entries(&app.data_dir()), 0);
    assert_eq!(app.get_json("/v1/models").await["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_lone_shard_of_a_sharded_checkpoint_is_refused_with_what_is_missing() {
    let app = spawn_app(0).await;
    let res = app.client.put(app.url("/v1/models?name=model-00001-of-00003.safetensors")).body(small_model());
    let res = res.send().await.unwrap();
    assert_eq!(res.status(), 422);
    let p: Value = res.json().await.unwrap();
    assert_eq!((p["code"].as_str(), p["pointer"].as_str()), (Some("incomplete_checkpoint"), Some("/name")));
    assert!(p["detail"].as_str().unwrap().contains("shard 1 of 3"), "{p}");
    // The same by the file name of a multipart upload: refused before the part streams in.
    let boundary = "B0und";
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"model\"; filename=\"model-00002-of-00002.safetensors\"\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(&small_model());
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let res = app
        .client
        .post(app.url("/v1/models"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 422);
    assert!(res.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("shard 2 of 2"));
    assert_eq!(staging_entries(&app.data_dir()), 0);
    assert_eq!(app.get_json("/v1/models").await["items"], json!([]));
    // A single-shard "set" is the whole model, and names of one's own are not shards.
    for name in ["model-00001-of-00001.safetensors", "ckpt-3-of-10.safetensors"] {
        let res = app.client.put(app.url(&format!("/v1/models?name={name}"))).body(small_model());
        assert_eq!(res.send().await.unwrap().status(), 201, "{name}");
    }
    // Part of a dataset is still a dataset.
    let mut data = safetensors_f32(&[("inputs", vec![2, 4], vec![0.5; 8])]);
    let res =
        app.client.put(app.url("/v1/datasets?name=train-00001-of-00004.safetensors")).body(std::mem::take(&mut data));
    assert_eq!(res.send().await.unwrap().status(), 201);
}

#[tokio::test]
async fn a_header_that_breaks_a_limit_is_refused_before_the_tensor_data_arrives() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = spawn_app_with(0, |s| s.storage.max_tensors = 3).await;
    let four: Vec<(&str, Vec<usize>, Vec<f32>)> =
        ["a", "b", "c", "d"].iter().map(|n| (*n, vec![256, 256], vec![0.5; 256 * 256])).collect();
    let file = safetensors_f32(&four);
    let header_len = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    // The client sends the header and then nothing: only the header can be judged.
    let address = app.address.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&address).await.unwrap();
    let head = format!("PUT /v1/models HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n", file.len());
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&file[..header_len]).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut answer))
        .await
        .expect("answered before the data came")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 422"), "{answer}");
    assert!(answer.contains("too_many_tensors"), "{answer}");
    drop(conn);
    assert_eq!(staging_entries(&app.data_dir()), 0);
    // Eight zero bytes (a header length of 0) are still "not safetensors", whatever the chunking.
    assert_problem(app.upload(vec![0u8; 8]).await, 415, "not_safetensors").await;
    let res = app.post_chunks("/v1/models", vec![vec![0u8; 8], b"xyz".to_vec()]).await;
    assert_problem(res, 415, "not_safetensors").await;
}
