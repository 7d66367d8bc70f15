//! Streaming uploads: the request body goes to a staging file on a blocking thread that hashes
//! as it writes; the safetensors header is captured on the way and validated before anything
//! becomes visible. Every failure path deletes the staging file.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::error::ApiError;
use crate::formats::safetensors::{check_prefix, parse_header, too_short, Header, HeaderError};

/// A validated upload sitting in staging, ready to persist.
pub struct StagedUpload {
    pub path: PathBuf,
    pub sha256: String,
    pub bytes: u64,
    pub header: Header,
}

/// Deletes the staged file unless disarmed: every early return cleans up.
struct StagingGuard(Option<PathBuf>);

impl Drop for StagingGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

pub fn header_error(e: HeaderError) -> ApiError {
    match e {
        HeaderError::NotSafetensors(d) => {
            ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "not_safetensors", format!("not a safetensors file: {d}"))
        }
        HeaderError::HeaderTooLarge { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "header_too_large", e.to_string())
        }
        HeaderError::Invalid { detail, tensor } => {
            let err = ApiError::unprocessable("invalid_safetensors", detail);
            match tensor {
                Some(t) => err.with_pointer(format!("/tensors/{}", t.replace('~', "~0").replace('/', "~1"))),
                None => err,
            }
        }
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload_too_large",
        format!("the upload exceeds the limit of {limit} bytes (storage.max_upload_bytes)"),
    )
}

/// Refuses a header past `storage.max_tensors` tensors or with a name longer than
/// `storage.max_tensor_name_bytes` (422, naming the limit and, for a name, the tensor). Real
/// checkpoints hold well under 100,000 tensors with names under 200 bytes.
pub fn check_header_limits(header: &Header, max_tensors: usize, max_name_bytes: usize) -> Result<(), ApiError> {
    if header.tensors.len() > max_tensors {
        return Err(ApiError::unprocessable(
            "too_many_tensors",
            format!(
                "the file holds {} tensors; at most {max_tensors} are accepted (storage.max_tensors)",
                header.tensors.len()
            ),
        )
        .with_pointer("/tensors"));
    }
    if let Some(t) = header.tensors.iter().find(|t| t.name.len() > max_name_bytes) {
        let mut shown: String = t.name.chars().take(64).collect();
        if shown.len() < t.name.len() {
            shown.push('…');
        }
        return Err(ApiError::unprocessable(
            "tensor_name_too_long",
            format!(
                "tensor `{shown}` has a {}-byte name; at most {max_name_bytes} bytes are accepted (storage.max_tensor_name_bytes)",
                t.name.len()
            ),
        )
        .with_pointer(format!("/tensors/{}", t.name.replace('~', "~0").replace('/', "~1"))));
    }
    Ok(())
}

/// The slowest an upload may arrive: at least `bytes_per_sec` on average over each window of
/// `window` (`storage.min_upload_bytes_per_sec`, `storage.upload_rate_window_secs`). A client
/// that trickles a byte now and then stays under any idle timeout; this cuts it off.
#[derive(Debug, Clone, Copy)]
pub struct MinRate {
    pub bytes_per_sec: u64,
    pub window: Duration,
}

/// Set when [`paced`] cut an upload off, so the caller answers 408 `upload_too_slow` whatever
/// layer (raw body, multipart parser) saw the stream fail.
#[derive(Clone, Default)]
pub struct TooSlow(Arc<AtomicBool>);

impl TooSlow {
    pub fn happened(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    pub fn error(rate: MinRate) -> ApiError {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "upload_too_slow",
            format!(
                "the upload sent less than {} bytes/s over {} s (storage.min_upload_bytes_per_sec); resend it over a faster link",
                rate.bytes_per_sec,
                rate.window.as_secs()
            ),
        )
    }
}

/// `body` cut off with an error once a window of `rate.window` passes with fewer than
/// `rate.bytes_per_sec * window` bytes (at least one) received; `slow` records that it did.
/// Windows count only the time spent waiting for the client: while the server itself does not
/// read (its writer is busy), no window runs, so a stall of ours never fails a fast client. A
/// window is judged on the bytes that arrived within it, whether its end is noticed by the
/// timer or by a chunk that arrives just after it.
pub fn paced(body: Body, rate: MinRate, slow: TooSlow) -> Body {
    struct State {
        inner: axum::body::BodyDataStream,
        /// Time spent waiting for the client in the current window.
        waited: Duration,
        /// Bytes received in the current window.
        received: u64,
        need: u64,
        window: Duration,
        slow: TooSlow,
    }
    impl State {
        fn cut_off(&self) -> Option<(Result<Bytes, axum::Error>, Option<State>)> {
            self.slow.0.store(true, Ordering::Relaxed);
            let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "upload too slow");
            Some((Err(axum::Error::new(e)), None))
        }
    }
    let need = (rate.bytes_per_sec.saturating_mul(rate.window.as_secs())).max(1);
    let start =
        State { inner: body.into_data_stream(), waited: Duration::ZERO, received: 0, need, window: rate.window, slow };
    let stream = futures_util::stream::unfold(Some(start), |state| async move {
        let mut s = state?;
        loop {
            let asked = tokio::time::Instant::now();
            let budget = s.window.saturating_sub(s.waited);
            let next = tokio::time::timeout(budget, s.inner.next()).await;
            s.waited += asked.elapsed();
            match next {
                Ok(Some(Ok(chunk))) => {
                    if s.waited >= s.window {
                        // The window ended just before this chunk: judge it without it.
                        if s.received < s.need {
                            return s.cut_off();
                        }
                        s.waited = Duration::ZERO;
                        s.received = 0;
                    }
                    s.received += chunk.len() as u64;
                    return Some((Ok(chunk), Some(s)));
                }
                Ok(Some(Err(e))) => return Some((Err(e), None)),
                Ok(None) => return None,
                Err(_) if s.received >= s.need => {
                    s.waited = Duration::ZERO;
                    s.received = 0;
                }
                Err(_) => return s.cut_off(),
            }
        }
    });
    Body::from_stream(stream)
}

/// A received file's hash and size, taken while it was written.
#[derive(Debug, Clone)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

fn writer_thread(path: &Path, mut rx: mpsc::Receiver<Bytes>) -> std::io::Result<FileDigest> {
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        hasher.update(&chunk);
        out.write_all(&chunk)?;
        total += chunk.len() as u64;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(FileDigest { sha256: hex::encode(hasher.finalize()), bytes: total })
}

/// A check of the parsed header run as soon as the header has arrived, before the tensor data
/// streams in (limits, what a dataset must hold): a refusal then costs the header, not the file.
pub type HeaderCheck<'a> = &'a (dyn Fn(&Header) -> Result<(), ApiError> + Send + Sync);

/// A form body (multipart, urlencoded) where the raw file is expected is a 415: stored as it
/// is, it would be the form's encoding, not the file.
pub fn refuse_form_body(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        Some(ct) if ct.starts_with("multipart/") || ct.starts_with("application/x-www-form-urlencoded") => {
            Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_content_type",
                format!("send the raw file as the body (curl -T model.safetensors URL), not `{ct}`; a model with its graph goes as multipart/form-data to POST /v1/models"),
            ))
        }
        _ => Ok(()),
    }
}

/// Streams `body` to `path`, enforcing `max_bytes` and the header cap, and validates it. The
/// header is parsed and `check`ed as soon as its last byte arrives.
pub async fn receive(
    headers: &HeaderMap,
    body: Body,
    path: PathBuf,
    max_bytes: u64,
    header_limit: u64,
    check: HeaderCheck<'_>,
) -> Result<StagedUpload, ApiError> {
    let declared = declared_length(headers);
    if let Some(len) = declared {
        if len > max_bytes {
            return Err(too_large(max_bytes));
        }
    }
    refuse_form_body(headers)?;
    let guard = StagingGuard(Some(path.clone()));
    let mut prefix: Vec<u8> = Vec::with_capacity(9);
    // The header's bytes as they arrive, and once they are whole, the header parsed and checked.
    let mut head = Vec::new();
    let mut early: Option<Gathered> = None;
    let written = stream_to_file(body, &path, max_bytes, |chunk| {
        if prefix.len() < 9 {
            let take = (9 - prefix.len()).min(chunk.len());
            prefix.extend_from_slice(&chunk[..take]);
            // Refuse foreign files and oversized headers from the first bytes, not after the body.
            check_prefix(&prefix, header_limit).map_err(header_error)?;
        }
        if early.is_none() {
            match early_header(&mut head, chunk, header_limit, declared, check)? {
                Gathered::More => {}
                done => early = Some(done),
            }
        }
        Ok(())
    })
    .await?;

    // Parsed once: against the declared length, which the body had; otherwise again, now that
    // the length is known.
    let header = match early {
        Some(Gathered::Header(h)) if declared == Some(written.bytes) => h,
        _ => validate(&head, written.bytes, header_limit)?,
    };
    let mut guard = guard;
    guard.0 = None;
    Ok(StagedUpload { path, sha256: written.sha256, bytes: written.bytes, header })
}

/// Streams `body` to a new file at `path` on a blocking thread that hashes as it writes, at most
/// `max_bytes`; `inspect` sees every chunk before it is written and may refuse the upload. The
/// caller removes the file on failure.
async fn stream_to_file(
    body: Body,
    path: &Path,
    max_bytes: u64,
    mut inspect: impl FnMut(&[u8]) -> Result<(), ApiError>,
) -> Result<FileDigest, ApiError> {
    let (tx, rx) = mpsc::channel::<Bytes>(32);
    let writer_path = path.to_owned();
    let writer = tokio::task::spawn_blocking(move || writer_thread(&writer_path, rx));
    let mut stream = body.into_data_stream();
    let mut received = 0u64;
    let mut failure: Option<ApiError> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                failure = Some(ApiError::bad_request(
                    "upload_interrupted",
                    format!("the upload stopped before its end: {e}"),
                ));
                break;
            }
        };
        received += chunk.len() as u64;
        if received > max_bytes {
            failure = Some(too_large(max_bytes));
            break;
        }
        if let Err(e) = inspect(&chunk) {
            failure = Some(e);
            break;
        }
        if tx.send(chunk).await.is_err() {
            break; // the writer stopped: its error is reported below
        }
    }
    drop(tx);
    let written = writer.await.expect("upload writer thread");
    if let Some(f) = failure {
        return Err(f);
    }
    let written = written.map_err(ApiError::io)?;
    metrics::counter!("modelpress_upload_bytes_total").increment(written.bytes);
    Ok(written)
}

/// Streams any file (a folder's index, config, tokenizer) to `path`, at most `max_bytes`, hashed
/// as it is written; the file is removed on failure.
pub async fn receive_file(
    headers: &HeaderMap,
    body: Body,
    path: PathBuf,
    max_bytes: u64,
) -> Result<FileDigest, ApiError> {
    if declared_length(headers).is_some_and(|len| len > max_bytes) {
        return Err(too_large(max_bytes));
    }
    refuse_form_body(headers)?;
    let mut guard = StagingGuard(Some(path.clone()));
    let written = stream_to_file(body, &path, max_bytes, |_| Ok(())).await?;
    guard.0 = None;
    Ok(written)
}

/// The request's Content-Length, when it sent one.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// A plain-text body stored as a dataset: a safetensors file with one U8 tensor `text` (the
/// bytes as sent, checked to be UTF-8), which language-model evaluation tokenizes with the
/// model's own tokenizer. Streamed to `path` (at most `max_bytes`), the header written last
/// into the space reserved for it, then the file hashed.
pub async fn receive_text(
    headers: &HeaderMap,
    body: Body,
    path: PathBuf,
    max_bytes: u64,
) -> Result<StagedUpload, ApiError> {
    let declared = declared_length(headers);
    if declared.is_some_and(|len| len > max_bytes) {
        return Err(too_large(max_bytes));
    }
    let guard = StagingGuard(Some(path.clone()));
    let mut file = tokio::fs::File::create(&path).await.map_err(ApiError::io)?;
    use tokio::io::AsyncWriteExt;
    file.write_all(&[0u8; 8 + crate::formats::safetensors::TEXT_HEADER_BYTES]).await.map_err(ApiError::io)?;
    let mut stream = body.into_data_stream();
    let (mut received, mut carry) = (0u64, Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request("upload_interrupted", format!("the upload stopped before its end: {e}"))
        })?;
        received += chunk.len() as u64;
        if received > max_bytes {
            return Err(too_large(max_bytes));
        }
        // UTF-8 across chunk boundaries: an incomplete sequence at the end waits for the next.
        carry.extend_from_slice(&chunk);
        let valid = match std::str::from_utf8(&carry) {
            Ok(_) => carry.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => {
                let at = received - (carry.len() - e.valid_up_to()) as u64;
                return Err(ApiError::unprocessable(
                    "invalid_text",
                    format!("a text dataset must be UTF-8; byte {at} is not"),
                ));
            }
        };
        file.write_all(&carry[..valid]).await.map_err(ApiError::io)?;
        carry.drain(..valid);
    }
    if !carry.is_empty() {
        return Err(ApiError::unprocessable(
            "invalid_text",
            "a text dataset must be UTF-8; it ends inside a character",
        ));
    }
    if received == 0 {
        return Err(ApiError::unprocessable("invalid_text", "the text is empty"));
    }
    let json = crate::formats::safetensors::text_dataset_header(received);
    use tokio::io::AsyncSeekExt;
    file.seek(std::io::SeekFrom::Start(0)).await.map_err(ApiError::io)?;
    file.write_all(&(crate::formats::safetensors::TEXT_HEADER_BYTES as u64).to_le_bytes())
        .await
        .map_err(ApiError::io)?;
    file.write_all(&json).await.map_err(ApiError::io)?;
    // tokio's File finishes a pending write in the background: flush surfaces its error.
    file.flush().await.map_err(ApiError::io)?;
    file.sync_all().await.map_err(ApiError::io)?;
    drop(file);
    let hashed = path.clone();
    let (sha256, bytes) = tokio::task::spawn_blocking(move || crate::compress::engine::sha256_file(&hashed))
        .await
        .expect("hash thread")
        .map_err(ApiError::io)?;
    let header = parse_header(&json, bytes).map_err(header_error)?;
    let mut guard = guard;
    guard.0 = None;
    Ok(StagedUpload { path, sha256, bytes, header })
}

/// Where [`early_header`] stands.
enum Gathered {
    /// The header is not whole yet.
    More,
    /// Nothing to parse early (a zero or oversized length: the prefix check and the final
    /// validation answer those).
    Skipped,
    /// Parsed and checked.
    Header(Header),
}

/// Adds `chunk` to the header gathered so far; once it is whole (8 length bytes and the JSON),
/// parses it against the declared length, if any, and runs `check`.
fn early_header(
    head: &mut Vec<u8>,
    chunk: &[u8],
    header_limit: u64,
    declared: Option<u64>,
    check: HeaderCheck<'_>,
) -> Result<Gathered, ApiError> {
    let mut rest = chunk;
    if head.len() < 8 {
        let take = (8 - head.len()).min(rest.len());
        head.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        if head.len() < 8 {
            return Ok(Gathered::More);
        }
    }
    let len = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
    if len == 0 || len > header_limit {
        // 415 for 8 zero bytes, 413 for an oversized header, as they always were.
        return Ok(Gathered::Skipped);
    }
    let total = 8 + len as usize;
    let take = (total - head.len()).min(rest.len());
    head.extend_from_slice(&rest[..take]);
    if head.len() < total {
        return Ok(Gathered::More);
    }
    let header = match declared {
        Some(len) => parse_header(&head[8..], len),
        None => crate::formats::safetensors::parse_header_unsized(&head[8..]),
    }
    .map_err(header_error)?;
    check(&header)?;
    Ok(Gathered::Header(header))
}

/// Largest `graph` part of a multipart upload.
pub const MAX_GRAPH_BYTES: usize = 1 << 20;

/// A model uploaded as `multipart/form-data` with a `model` part (the safetensors file, streamed
/// to staging like a raw upload) and an optional `graph` part (JSON, at most 1 MiB), in either
/// order. The graph is returned unparsed (the caller validates it against the staged header),
/// with the model part's file name.
pub async fn receive_multipart(
    boundary: String,
    body: Body,
    path: PathBuf,
    max_bytes: u64,
    header_limit: u64,
    check: HeaderCheck<'_>,
    check_file_name: &(dyn Fn(&str) -> Result<(), ApiError> + Send + Sync),
) -> Result<(StagedUpload, Option<Bytes>, Option<String>), ApiError> {
    let bad = |detail: String| ApiError::bad_request("invalid_multipart", detail);
    let mut file_name = None;
    let mut parts = multer::Multipart::new(body.into_data_stream(), boundary);
    let (mut model, mut graph) = (None, None);
    // Removes the staged model if this future is dropped while later parts are still read.
    let mut guard = StagingGuard(Some(path.clone()));
    let result = async {
        while let Some(mut field) =
            parts.next_field().await.map_err(|e| bad(format!("malformed multipart body: {e}")))?
        {
            match field.name() {
                Some("model") if model.is_none() => {
                    file_name = field.file_name().map(str::to_owned);
                    // Judged before the part streams in, like the header.
                    if let Some(name) = &file_name {
                        check_file_name(name)?;
                    }
                    let body = Body::from_stream(field);
                    model = Some(receive(&HeaderMap::new(), body, path.clone(), max_bytes, header_limit, check).await?);
                }
                Some("graph") if graph.is_none() => {
                    let mut buf = Vec::new();
                    while let Some(chunk) = field.chunk().await.map_err(|e| bad(format!("the `graph` part: {e}")))? {
                        buf.extend_from_slice(&chunk);
                        if buf.len() > MAX_GRAPH_BYTES {
                            return Err(ApiError::new(
                                StatusCode::PAYLOAD_TOO_LARGE,
                                "graph_too_large",
                                format!("the `graph` part exceeds {MAX_GRAPH_BYTES} bytes"),
                            ));
                        }
                    }
                    graph = Some(Bytes::from(buf));
                }
                Some(name @ ("model" | "graph")) => return Err(bad(format!("the `{name}` part is given twice"))),
                other => {
                    return Err(bad(format!(
                        "unknown part {}: expected `model` (the safetensors file) and optionally `graph` (JSON)",
                        other.map_or("without a name".to_string(), |n| format!("`{n}`"))
                    )))
                }
            }
        }
        Ok(())
    }
    .await;
    guard.0 = None;
    match (result, model) {
        (Ok(()), Some(m)) => Ok((m, graph, file_name)),
        (Ok(()), None) => Err(bad("the multipart body has no `model` part".into())),
        (Err(e), staged) => {
            if let Some(m) = staged {
                let _ = std::fs::remove_file(&m.path);
            }
            Err(e)
        }
    }
}

fn validate(head: &[u8], file_len: u64, header_limit: u64) -> Result<Header, ApiError> {
    let len = check_prefix(head, header_limit).map_err(header_error)?.ok_or_else(|| header_error(too_short(head)))?;
    if 8 + len > file_len {
        return Err(header_error(HeaderError::Invalid {
            detail: format!(
                "file is truncated: the header claims {len} bytes but the file has {}",
                file_len.saturating_sub(8)
            ),
            tensor: None,
        }));
    }
    parse_header(&head[8..8 + len as usize], file_len).map_err(header_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_while_writing_an_upload_is_a_507() {
        // /dev/full fails every write with ENOSPC: the real error a full disk gives.
        let (tx, rx) = mpsc::channel(1);
        tx.blocking_send(Bytes::from(vec![1u8; 4 << 20])).unwrap();
        drop(tx);
        let err = writer_thread(Path::new("/dev/full"), rx).expect_err("write fails");
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        let api = ApiError::io(err);
        assert_eq!((api.status.as_u16(), api.code), (507, "insufficient_storage"));
    }
}
