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
///
/// It holds the parsed body: handlers never parse it again.
pub struct JsonBody(pub serde_json::Value);

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
        parse_json(&body).map(JsonBody).map_err(|e| ApiError::bad_request("invalid_json", e))
    }
}

/// Parses `bytes` as JSON, refusing duplicate keys in any object: the error names the key and
/// where it is.
pub fn parse_json(bytes: &[u8]) -> Result<serde_json::Value, String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::Value;
    struct Strict(String);
    impl<'de> DeserializeSeed<'de> for Strict {
        type Value = Value;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Strict {
        type Value = Value;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::from(v))
        }
        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(v) = seq.next_element_seed(Strict(format!("{}/{}", self.0, items.len())))? {
                items.push(v);
            }
            Ok(Value::Array(items))
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut object = serde_json::Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let at = format!("{}/{key}", self.0);
                if object.contains_key(&key) {
                    return Err(serde::de::Error::custom(format!("duplicate key `{key}` at `{at}`")));
                }
                let value = map.next_value_seed(Strict(at))?;
                object.insert(key, value);
            }
            Ok(Value::Object(object))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict(String::new()).deserialize(&mut de).map_err(|e| format!("the body is not valid JSON: {e}"))?;
    de.end().map_err(|e| format!("the body is not valid JSON: {e}"))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::parse_json;

    #[test]
    fn duplicate_keys_are_refused_at_any_depth_with_their_place() {
        let v = parse_json(br#"{"a": [1, {"b": 2.5}], "c": null, "d": "x"}"#).unwrap();
        assert_eq!(v, serde_json::json!({"a": [1, {"b": 2.5}], "c": null, "d": "x"}));
        let e = parse_json(br#"{"steps": [{"op": "quantize", "bits": 8, "bits": 2}]}"#).unwrap_err();
        assert!(e.contains("duplicate key `bits` at `/steps/0/bits`"), "{e}");
        assert!(parse_json(br#"{"a": 1} x"#).is_err());
        assert!(parse_json(b"").is_err());
    }
}
