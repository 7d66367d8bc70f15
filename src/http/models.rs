//! `/v1/models` and `/v1/datasets`: the same upload, list, get, download and delete for both.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::admission::Admission;
use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::extract::Query;
use super::folder_upload::{self, CheckedFolder};
use super::upload;
use super::{page_limit, parse_id, AppState, Page, TensorWindow};
use crate::storage::catalog::{DeleteOutcome, ModelFile, ModelKind, ModelRecord, ModelSummary, NewModel};
use crate::storage::rfc3339;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TensorView {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ModelView {
    pub id: String,
    pub kind: String,
    pub name: Option<String>,
    pub sha256: String,
    pub bytes: i64,
    pub parameters: i64,
    pub tensor_count: usize,
    pub created_at: String,
    /// Set when the model was registered from a job's output.
    pub source_job: Option<String>,
    /// Whether an architecture graph is attached (`GET /v1/models/{id}/graph`).
    pub has_graph: bool,
    /// The tensor table (only on `GET /v1/models/{id}`), at most 10,000 at a time: the window
    /// `?tensors_offset=&tensors_limit=` asks for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors: Option<Vec<TensorView>>,
    /// Pass as `tensors_offset` for the next window of the table; absent at its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tensors_next_offset: Option<usize>,
    /// A folder's companion files (config.json, tokenizer), on `GET /v1/models/{id}` and the
    /// upload's answer; absent for a model uploaded as one file.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<ModelFile>,
    /// Files of an uploaded folder that were not kept (README.md, subfolders, other formats).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub ignored_files: Vec<String>,
}

impl ModelView {
    /// With the `window` of its tensor table.
    fn from_record(m: &ModelRecord, window: &TensorWindow) -> ApiResult<ModelView> {
        let mut tensors: Vec<TensorView> = serde_json::from_str(&m.tensors).unwrap_or_default();
        let (range, next) = window.range(tensors.len())?;
        let count = tensors.len();
        tensors.truncate(range.end);
        tensors.drain(..range.start);
        Ok(ModelView {
            tensor_count: count,
            tensors: Some(tensors),
            tensors_next_offset: next,
            ..Self::from_summary(&ModelSummary::from(m))
        })
    }

    /// As lists show it: no tensor table.
    fn from_summary(m: &ModelSummary) -> ModelView {
        ModelView {
            id: m.id.clone(),
            kind: m.kind.clone(),
            name: m.name.clone(),
            sha256: m.sha256.clone(),
            bytes: m.bytes,
            parameters: m.parameters,
            tensor_count: m.tensor_count as usize,
            created_at: rfc3339(m.created_at),
            source_job: m.source_job.clone(),
            has_graph: m.has_graph != 0,
            tensors: None,
            tensors_next_offset: None,
            files: Vec::new(),
            ignored_files: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct UploadParams {
    /// A human name for the upload (e.g. the original file name).
    pub name: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    /// Page size, 1-200 (default 50).
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<String>,
}

async fn upload_kind(
    state: &AppState,
    owner: &Principal,
    kind: ModelKind,
    params: UploadParams,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let settings = &state.settings.storage;
    if let Some(name) = params.name.as_deref().filter(|_| kind == ModelKind::Model) {
        refuse_lone_shard(name).map_err(|e| e.with_pointer("/name"))?;
    }
    // Its permit is held until the upload is stored or refused.
    let admission = Admission::new(state, owner, settings.max_upload_bytes, 0).await?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|ct| ct.starts_with("multipart/form-data") && kind == ModelKind::Model)
        .map(multer::parse_boundary)
        .transpose()
        .map_err(|e| ApiError::bad_request("invalid_multipart", format!("bad multipart content type: {e}")))?;
    let max_bytes = admission.max_bytes;
    let path = state.blobs.staging_path("upload");
    let body = admission.pace(body);
    // Checked as soon as the header has arrived: every stored upload has passed it.
    let check = |h: &crate::formats::safetensors::Header| {
        upload::check_header_limits(h, settings.max_tensors, settings.max_tensor_name_bytes)?;
        dataset_inputs(kind, h)
    };
    let is_tar = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-tar") || ct.starts_with("application/tar"));
    let is_text = kind == ModelKind::Dataset
        && headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("text/plain"));
    if is_tar && kind == ModelKind::Dataset {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_content_type",
            "a dataset is one safetensors file: send it as the body (curl -T data.safetensors URL)",
        ));
    }
    let mut folder_files = Vec::new();
    let mut ignored = Vec::new();
    // A folder's staging directory, removed when the handler returns (its files persisted or not).
    let mut staging_dir = None;
    let received = match boundary {
        None if is_text => {
            upload::receive_text(&headers, body, path, max_bytes).await.map(|staged| (staged, None, None))
        }
        None if is_tar => {
            let dir = state.blobs.staging_path("folder");
            let too_large = || {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload_too_large",
                    format!("the upload exceeds the limit of {max_bytes} bytes (storage.max_upload_bytes or what the quota leaves)"),
                )
            };
            folder_upload::receive_tar(
                body,
                upload::declared_length(&headers),
                dir,
                max_bytes,
                settings.max_header_bytes,
                &check,
                too_large,
            )
            .await
            .map(|f| {
                folder_files = f.files;
                ignored = f.ignored;
                staging_dir = Some(f.dir);
                (f.weights, None, None)
            })
        }
        Some(b) => {
            // The part's file name names the model unless `?name=` does.
            let by_file_name = params.name.is_none() && kind == ModelKind::Model;
            let check_name = |name: &str| if by_file_name { refuse_lone_shard(name) } else { Ok(()) };
            upload::receive_multipart(b, body, path, max_bytes, settings.max_header_bytes, &check, &check_name).await
        }
        None => upload::receive(&headers, body, path, max_bytes, settings.max_header_bytes, &check)
            .await
            .map(|staged| (staged, None, None)),
    };
    let (staged, graph_part, file_name) = received.map_err(|e| admission.refusal(e, settings.max_upload_bytes))?;
    // A graph sent with the model is validated against it before anything is stored.
    let graph = match graph_part {
        None => None,
        Some(bytes) => {
            let checked = serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| ApiError::bad_request("invalid_json", format!("the `graph` part is not valid JSON: {e}")))
                .and_then(|v| {
                    let g = crate::graph::Graph::parse(&v).map_err(super::graphs::graph_errors_at("/graph"))?;
                    let table = crate::graph::tensor_table(&staged.header);
                    g.validate(&table).map_err(super::graphs::graph_errors_at("/graph"))?;
                    Ok(serde_json::to_string(&g).expect("graphs serialise"))
                });
            match checked {
                Ok(text) => Some(text),
                Err(e) => {
                    let _ = std::fs::remove_file(&staged.path);
                    return Err(e);
                }
            }
        }
    };
    // `?name=` wins; a multipart upload otherwise keeps the model part's file name.
    let name = params.name.or(file_name);
    store_model(state, &owner.name, kind, name, graph, CheckedFolder { weights: staged, files: folder_files, ignored })
        .await
}

/// Persists a received upload (its file, and a folder's companion files; a single file is a
/// folder without them) and registers it for `owner` with its validated `graph`: the one way an
/// upload becomes a model or dataset. Answers 201 with it.
pub(super) async fn store_model(
    state: &AppState,
    owner: &str,
    kind: ModelKind,
    name: Option<String>,
    graph: Option<String>,
    upload: CheckedFolder,
) -> ApiResult<Response> {
    let CheckedFolder { weights: staged, files: folder_files, ignored } = upload;
    let tensors: Vec<TensorView> = staged
        .header
        .tensors
        .iter()
        .map(|t| TensorView {
            name: t.name.clone(),
            dtype: t.dtype.as_str().into(),
            shape: t.shape.clone(),
            bytes: t.bytes(),
        })
        .collect();
    let parameters = staged.header.parameter_count() as i64;
    // An object store receives the files now, outside the gate (nothing names them yet); under
    // the gate, persisting is then a check and a local move.
    let ahead = async {
        state.blobs.upload_ahead(&staged.path, &staged.sha256).await?;
        for f in &folder_files {
            state.blobs.upload_ahead(&f.path, &f.sha256).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    if let Err(e) = ahead.await {
        let _ = std::fs::remove_file(&staged.path);
        return Err(ApiError::io(e));
    }
    let _gate = match state.catalog.blob_gate().await {
        Ok(gate) => gate,
        Err(e) => {
            let _ = std::fs::remove_file(&staged.path);
            return Err(e.into());
        }
    };
    let (catalog, blobs) = (state.catalog.as_ref(), state.blobs.as_ref());
    let mut ingested = vec![staged.sha256.clone()];
    let persisted = async {
        crate::storage::persist_blob(catalog, blobs, &staged.path, &staged.sha256, staged.bytes).await?;
        let mut files = Vec::with_capacity(folder_files.len());
        for f in folder_files {
            ingested.push(f.sha256.clone());
            crate::storage::persist_blob(catalog, blobs, &f.path, &f.sha256, f.bytes).await?;
            files.push(ModelFile { name: f.name, sha256: f.sha256, bytes: f.bytes as i64 });
        }
        Ok::<_, std::io::Error>(files)
    }
    .await;
    let files = match persisted {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_file(&staged.path);
            crate::storage::roll_back_blobs(catalog, blobs, &ingested).await;
            return Err(ApiError::io(e));
        }
    };
    let inserted = state
        .catalog
        .insert_model(NewModel {
            kind,
            name,
            sha256: staged.sha256,
            bytes: staged.bytes as i64,
            tensors: serde_json::to_string(&tensors).expect("tensor table JSON"),
            parameters,
            source_job: None,
            graph,
            owner: owner.to_owned(),
            tensor_count: tensors.len() as i64,
            files: files.clone(),
        })
        .await;
    let record = match inserted {
        Ok(record) => record,
        Err(e) => {
            crate::storage::roll_back_blobs(catalog, blobs, &ingested).await;
            return Err(e.into());
        }
    };
    tracing::info!(id = %record.id, kind = kind.as_str(), bytes = record.bytes, "stored upload");
    let location = format!("/v1/{}s/{}", kind.as_str(), record.id);
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, location)],
        Json(ModelView { files, ignored_files: ignored, ..ModelView::from_record(&record, &TensorWindow::default())? }),
    )
        .into_response())
}

/// A dataset must hold `inputs`.
fn dataset_inputs(kind: ModelKind, header: &crate::formats::safetensors::Header) -> ApiResult<()> {
    if kind == ModelKind::Dataset && header.get("inputs").is_none() {
        return Err(ApiError::unprocessable(
            "invalid_dataset",
            "a dataset must hold an `inputs` tensor (and optionally `labels`)",
        )
        .with_pointer("/tensors/inputs"));
    }
    Ok(())
}

/// A file named as one shard of several (`model-00001-of-00003.safetensors`) is refused: alone
/// it is part of a model, and compressing it would silently compress a fraction.
pub(super) fn refuse_lone_shard(name: &str) -> ApiResult<()> {
    match crate::formats::safetensors::shard_of(name) {
        Some((k, n)) => Err(ApiError::unprocessable(
            "incomplete_checkpoint",
            crate::formats::safetensors::lone_shard_detail(name, k, n),
        )),
        None => Ok(()),
    }
}

async fn list_kind(
    state: &AppState,
    who: &Principal,
    kind: ModelKind,
    params: ListParams,
) -> ApiResult<Json<Page<ModelView>>> {
    let limit = page_limit(params.limit)?;
    let after = params.after.as_deref().map(|a| parse_id(a, "after")).transpose()?;
    let mut rows = state.catalog.list_models(kind, after.as_deref(), limit + 1, who.owner_filter()).await?;
    Ok(Json(Page::from_rows(&mut rows, limit, |m| m.id.clone(), ModelView::from_summary)))
}

/// The model or dataset `id` if `who` may see it; another principal's is a 404 like a missing one.
pub async fn get_kind(state: &AppState, who: &Principal, kind: ModelKind, id: &str) -> ApiResult<ModelRecord> {
    let id = parse_id(id, "id")?;
    visible(state, who, kind, &id).await?.ok_or_else(|| ApiError::not_found(kind.as_str(), &id))
}

/// The model or dataset `id` when `who` may see it (its own, or any for an admin): the one
/// ownership check of models and datasets.
pub async fn visible(state: &AppState, who: &Principal, kind: ModelKind, id: &str) -> ApiResult<Option<ModelRecord>> {
    Ok(state.catalog.get_model(kind, id).await?.filter(|m| who.sees(&m.owner)))
}

async fn download_kind(
    state: &AppState,
    who: &Principal,
    kind: ModelKind,
    id: &str,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let m = get_kind(state, who, kind, id).await?;
    let path = state.blobs.local_path(&m.sha256).await.map_err(ApiError::io)?;
    let filename = m.name.clone().unwrap_or_else(|| format!("{}.safetensors", m.id));
    super::download::serve_file(&path, &m.sha256, "application/octet-stream", &filename, &headers).await
}

async fn delete_kind(state: &AppState, who: &Principal, kind: ModelKind, id: &str) -> ApiResult<StatusCode> {
    let id = get_kind(state, who, kind, id).await?.id;
    let _gate = state.catalog.blob_gate().await?;
    match state.catalog.delete_model(kind, &id).await? {
        DeleteOutcome::NotFound => Err(ApiError::not_found(kind.as_str(), &id)),
        DeleteOutcome::InUse(n) => Err(ApiError::conflict(
            "in_use",
            format!("{} `{id}` is used by {n} queued or running job(s); cancel them or wait", kind.as_str()),
        )),
        DeleteOutcome::Deleted { orphan_blobs } => {
            for sha in orphan_blobs {
                if let Err(e) = state.blobs.delete(&sha).await {
                    tracing::warn!(error = %e, sha256 = %sha, "row deleted but blob file remains; removed at next start");
                }
            }
            Ok(StatusCode::NO_CONTENT)
        }
    }
}

/// Upload a model: the raw safetensors file as the body. `PUT` is accepted too, because
/// `curl -T model.safetensors URL` (the streaming upload) sends PUT. With its architecture graph:
/// `multipart/form-data` with a `model` part (streamed) and a `graph` part (JSON), validated
/// together before anything is stored (`curl -F model=@m.safetensors -F graph=@g.json URL`). A
/// Hugging Face folder: `application/x-tar` (`tar -cf - -C DIR . | curl -T - -H
/// 'Content-Type: application/x-tar' URL`), sharded weights merged, config and tokenizer kept.
#[utoipa::path(post, path = "/v1/models", tag = "models", params(UploadParams),
    request_body(content(
        (Vec<u8> = "application/octet-stream"),
        (Vec<u8> = "application/x-tar"),
        ("multipart/form-data")
    )),
    responses((status = 201, body = ModelView), (status = 413, body = super::error::Problem),
              (status = 415, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn upload_model(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    upload_kind(&s, &who, ModelKind::Model, p, headers, body).await
}

/// List models, newest first.
#[utoipa::path(get, path = "/v1/models", tag = "models", params(ListParams), responses((status = 200, body = Page<ModelView>)))]
pub async fn list_models(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<ListParams>,
) -> ApiResult<Json<Page<ModelView>>> {
    list_kind(&s, &who, ModelKind::Model, p).await
}

/// A model with its tensor table, 10,000 tensors at a time (`tensors_next_offset`).
#[utoipa::path(get, path = "/v1/models/{id}", tag = "models", params(TensorWindow), responses((status = 200, body = ModelView), (status = 404, body = super::error::Problem)))]
pub async fn get_model(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(window): Query<TensorWindow>,
) -> ApiResult<Json<ModelView>> {
    let record = get_kind(&s, &who, ModelKind::Model, &id).await?;
    let files = s.catalog.model_files(&record.id).await?;
    Ok(Json(ModelView { files, ..ModelView::from_record(&record, &window)? }))
}

/// Download the model file (supports `Range` and `If-None-Match`).
#[utoipa::path(get, path = "/v1/models/{id}/file", tag = "models", responses((status = 200), (status = 206), (status = 404, body = super::error::Problem)))]
pub async fn download_model(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_kind(&s, &who, ModelKind::Model, &id, headers).await
}

/// Delete a model (409 while a queued or running job uses it).
#[utoipa::path(delete, path = "/v1/models/{id}", tag = "models", responses((status = 204), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
pub async fn delete_model(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete_kind(&s, &who, ModelKind::Model, &id).await
}

/// Upload a dataset: safetensors with `inputs` and optional `labels` (POST or PUT), or UTF-8
/// text as `text/plain` (stored as one U8 tensor `text`) for evaluating a language model.
#[utoipa::path(post, path = "/v1/datasets", tag = "datasets", params(UploadParams),
    request_body(content((Vec<u8> = "application/octet-stream"), (String = "text/plain"))),
    responses((status = 201, body = ModelView), (status = 422, body = super::error::Problem)))]
pub async fn upload_dataset(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<UploadParams>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    upload_kind(&s, &who, ModelKind::Dataset, p, headers, body).await
}

/// List datasets, newest first.
#[utoipa::path(get, path = "/v1/datasets", tag = "datasets", params(ListParams), responses((status = 200, body = Page<ModelView>)))]
pub async fn list_datasets(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<ListParams>,
) -> ApiResult<Json<Page<ModelView>>> {
    list_kind(&s, &who, ModelKind::Dataset, p).await
}

/// A dataset with its tensor table, 10,000 tensors at a time (`tensors_next_offset`).
#[utoipa::path(get, path = "/v1/datasets/{id}", tag = "datasets", params(TensorWindow), responses((status = 200, body = ModelView), (status = 404, body = super::error::Problem)))]
pub async fn get_dataset(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    Query(window): Query<TensorWindow>,
) -> ApiResult<Json<ModelView>> {
    Ok(Json(ModelView::from_record(&get_kind(&s, &who, ModelKind::Dataset, &id).await?, &window)?))
}

/// Download the dataset file.
#[utoipa::path(get, path = "/v1/datasets/{id}/file", tag = "datasets", responses((status = 200), (status = 206)))]
pub async fn download_dataset(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    download_kind(&s, &who, ModelKind::Dataset, &id, headers).await
}

/// Delete a dataset (409 while a queued or running job uses it).
#[utoipa::path(delete, path = "/v1/datasets/{id}", tag = "datasets", responses((status = 204), (status = 409, body = super::error::Problem)))]
pub async fn delete_dataset(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete_kind(&s, &who, ModelKind::Dataset, &id).await
}
