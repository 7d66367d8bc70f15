//! File downloads with a content-addressed `ETag`, `If-None-Match` and single-range `Range`.

use std::path::Path;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use super::error::ApiError;

/// Parses `bytes=a-b`, `bytes=a-` or `bytes=-n` against `len`; `Err` for an unsatisfiable or
/// multi-range request (answered 416), `Ok(None)` when there is no usable Range header.
fn parse_range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = value.strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Err(());
    }
    let (a, b) = spec.split_once('-').ok_or(())?;
    let (start, end) = match (a.trim(), b.trim()) {
        ("", n) => {
            let n: u64 = n.parse().map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            (len.saturating_sub(n), len.saturating_sub(1))
        }
        (a, "") => (a.parse().map_err(|_| ())?, len.saturating_sub(1)),
        (a, b) => (a.parse().map_err(|_| ())?, b.parse::<u64>().map_err(|_| ())?.min(len.saturating_sub(1))),
    };
    if start > end || start >= len {
        return Err(());
    }
    Ok(Some((start, end)))
}

/// Serves `path` whose content hash is `sha256`.
pub async fn serve_file(
    path: &Path,
    sha256: &str,
    content_type: &'static str,
    filename: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let etag = format!("\"{sha256}\"");
    let mut file = tokio::fs::File::open(path).await.map_err(ApiError::io)?;
    let len = file.metadata().await.map_err(ApiError::io)?.len();
    let mut builder = Response::builder()
        .header(header::ETAG, &etag)
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_DISPOSITION, format!("attachment; filename=\"{}\"", safe_filename(filename)));
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return builder.status(StatusCode::NOT_MODIFIED).body(Body::empty()).map_err(ApiError::internal);
    }
    // If-Range with another validator means the client's copy changed: send it all.
    let if_range_ok = headers.get(header::IF_RANGE).and_then(|v| v.to_str().ok()).is_none_or(|v| v == etag);
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if if_range_ok => match parse_range(r, len) {
            Ok(r) => r,
            Err(()) => {
                let mut res = ApiError::new(
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    "range_not_satisfiable",
                    format!("Range `{r}` cannot be served from a file of {len} bytes (one range, within the file)"),
                )
                .into_response_with_header(header::CONTENT_RANGE, format!("bytes */{len}"));
                res.headers_mut().insert(header::ETAG, HeaderValue::from_str(&etag).expect("etag"));
                return Ok(res);
            }
        },
        _ => None,
    };
    let response = match range {
        Some((start, end)) => {
            file.seek(std::io::SeekFrom::Start(start)).await.map_err(ApiError::io)?;
            let count = end - start + 1;
            builder = builder
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"))
                .header(header::CONTENT_LENGTH, count);
            builder.body(Body::from_stream(ReaderStream::with_capacity(file.take(count), 256 << 10)))
        }
        None => builder
            .status(StatusCode::OK)
            .header(header::CONTENT_LENGTH, len)
            .body(Body::from_stream(ReaderStream::with_capacity(file, 256 << 10))),
    };
    response.map_err(ApiError::internal)
}

/// A user-given name made safe for a header: printable ASCII without quotes or backslashes.
/// The base name of `name` (after its last `/` or `\\`), printable ASCII without quotes: a
/// model named `../../etc/passwd` downloads as `passwd`.
fn safe_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let cleaned: String =
        base.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    if cleaned.trim().is_empty() || cleaned == "." || cleaned == ".." {
        "download".into()
    } else {
        cleaned
    }
}

impl ApiError {
    fn into_response_with_header(self, name: header::HeaderName, value: String) -> Response {
        use axum::response::IntoResponse;
        let mut res = self.into_response();
        res.headers_mut().insert(name, HeaderValue::from_str(&value).expect("header value"));
        res
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_range, safe_filename};

    #[test]
    fn download_names_keep_only_a_printable_base_name() {
        assert_eq!(safe_filename("../../etc/passwd"), "passwd");
        assert_eq!(safe_filename("C:\\models\\m.safetensors"), "m.safetensors");
        assert_eq!(safe_filename("a\"b\nc"), "a_b_c");
        assert_eq!(safe_filename("dir/"), "download");
        assert_eq!(safe_filename(".."), "download");
    }

    #[test]
    fn filenames_cannot_break_the_header() {
        // A backslash separates directories (Windows names): only what follows it stays.
        assert_eq!(super::safe_filename("a\nb\"c\\d é.safetensors"), "d _.safetensors");
        assert_eq!(super::safe_filename("  "), "download");
    }

    #[test]
    fn ranges_parse_like_rfc_9110() {
        assert_eq!(parse_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(parse_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(parse_range("bytes=95-200", 100), Ok(Some((95, 99))));
        assert_eq!(parse_range("bytes=100-", 100), Err(()));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), Err(()));
        assert_eq!(parse_range("items=0-1", 100), Ok(None));
    }
}
