//! Extractors whose rejections are problem+json like every other error.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::error::ApiError;

/// `axum::extract::Query` with a 400 problem naming the bad parameter.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(Query).map_err(|e| {
            let path = e.path().to_string();
            let err = ApiError::bad_request("invalid_query", format!("query parameter: {}", e.into_inner()));
            if path == "." {
                err
            } else {
                err.with_pointer(format!("/{path}"))
            }
        })
    }
}

/// The body of a JSON route, checked before any handler reads it:
/// - `Content-Type` must be JSON (`application/json` or `…+json`): a 415 otherwise. Browsers
///   send cross-site `text/plain` and form posts without a preflight; refusing them closes
///   that CSRF hole.
/// - At most axum's default 2 MiB: a 413 problem naming the limit.
/// - Valid JSON without duplicate object keys (serde_json keeps the last silently, so
///   `{"bits": 8, "bits": 2}` would quantize to 2 bits): a 400 naming the key.
pub struct JsonBody(pub bytes::Bytes);

/// Largest JSON body, in bytes (axum's `DefaultBodyLimit`).
pub const MAX_JSON_BODY: usize = 2 * 1024 * 1024;

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        use axum::http::StatusCode;
        let content_type = req.headers().get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
        let essence = content_type.map(|c| c.split(';').next().unwrap_or_default().trim().to_ascii_lowercase());
        let json = essence.as_deref().is_some_and(|e| e == "application/json" || e.ends_with("+json"));
        if !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                format!(
                    "this route takes JSON: send `Content-Type: application/json` (got {})",
                    content_type.map_or("none".to_string(), |c| format!("`{c}`"))
                ),
            ));
        }
        let body = bytes::Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("a JSON body may hold at most {MAX_JSON_BODY} bytes"),
                )
            } else {
                ApiError::bad_request("invalid_body", format!("reading the body: {}", e.body_text()))
            }
        })?;
        if let Err(e) = check_json(&body) {
            return Err(ApiError::bad_request("invalid_json", e));
        }
        Ok(JsonBody(body))
    }
}

/// Parses `bytes` as JSON, refusing duplicate keys in any object: the error names the key and
/// where it is.
pub fn check_json(bytes: &[u8]) -> Result<(), String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    struct Strict(String);
    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Strict {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut i = 0;
            while seq.next_element_seed(Strict(format!("{}/{i}", self.0)))?.is_some() {
                i += 1;
            }
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                let at = format!("{}/{key}", self.0);
                if !seen.insert(key.clone()) {
                    return Err(serde::de::Error::custom(format!("duplicate key `{key}` at `{at}`")));
                }
                map.next_value_seed(Strict(at))?;
            }
            Ok(())
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    Strict(String::new())
        .deserialize(&mut de)
        .and_then(|()| de.end())
        .map_err(|e| format!("the body is not valid JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::check_json;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_with_their_place() {
        assert!(check_json(br#"{"a": [1, {"b": 2}], "c": null}"#).is_ok());
        let e = check_json(br#"{"steps": [{"op": "quantize", "bits": 8, "bits": 2}]}"#).unwrap_err();
        assert!(e.contains("duplicate key `bits` at `/steps/0/bits`"), "{e}");
        assert!(check_json(br#"{"a": 1} x"#).is_err());
        assert!(check_json(b"").is_err());
    }
}
