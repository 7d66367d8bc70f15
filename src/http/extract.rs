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
