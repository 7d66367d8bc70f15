//! `/v1/models/drafts`: a model folder uploaded file by file, for clients that cannot make a
//! tar stream or that retry one shard without resending the others. A draft collects the files
//! a tar upload would keep (`PUT .../files/{name}`, the same name again replaces it); its commit
//! runs the tar upload's checks and merge ([`folder_upload::check_folder`]) and registers the
//! model. A commit refused by the checks keeps the draft, so the missing file can follow.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use utoipa::ToSchema;

use super::admission::Admission;
use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::extract::Query;
use super::models::{refuse_lone_shard, store_model, UploadParams};
use super::upload::{self, FileDigest};
use super::{folder_upload, parse_id, AppState};
use crate::formats::hf::{is_companion, COMPANIONS, INDEX_FILE, MAX_COMPANION_BYTES};
use crate::storage::catalog::{ModelFile, ModelKind};
use crate::storage::drafts::DraftRecord;
use crate::storage::rfc3339;

#[derive(Debug, Serialize, ToSchema)]
pub struct DraftView {
    pub id: String,
    /// The name the committed model gets.
    pub name: Option<String>,
    /// The files received so far, by name.
    pub files: Vec<ModelFile>,
    /// Their bytes in all (counted in the owner's storage quota).
    pub bytes: i64,
    pub created_at: String,
    /// When the draft and its files are deleted unless committed; every file received pushes
    /// it back to `storage.draft_expiry_secs` from then.
    pub expires_at: String,
}

impl DraftView {
    fn new(d: &DraftRecord, files: Vec<ModelFile>) -> DraftView {
        DraftView {
            id: d.id.clone(),
            name: d.name.clone(),
            bytes: files.iter().map(|f| f.bytes).sum(),
            files,
            created_at: rfc3339(d.created_at),
            expires_at: rfc3339(d.expires_at),
        }
    }
}

fn expiry_ms(state: &AppState) -> i64 {
    i64::try_from(state.settings.storage.draft_expiry_secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}

/// The draft `id` if `who` may see it and it has not expired; otherwise a 404 like a missing one.
async fn visible_draft(state: &AppState, who: &Principal, id: &str) -> ApiResult<DraftRecord> {
    let id = parse_id(id, "id")?;
    state.drafts.get(&id).await?.filter(|d| who.sees(&d.owner)).ok_or_else(|| ApiError::not_found("draft", &id))
}

/// Most files a draft holds: the most shards a folder may have, its index and every companion.
const MAX_DRAFT_FILES: usize = crate::formats::hf::MAX_SHARDS + COMPANIONS.len() + 1;

fn committing(id: &str) -> ApiError {
    ApiError::conflict("draft_committing", format!("draft `{id}` is being committed; wait for the commit's answer"))
}

/// A draft takes what a tar upload keeps from a folder's top level: the weights
/// (`*.safetensors`), the index and the companion files; anything else is a 422 naming it.
fn check_file_name(name: &str) -> ApiResult<()> {
    let plain = name.len() <= 255
        && !name.contains(['\\', '\0'])
        && !name.chars().any(char::is_control)
        && folder_upload::top_level(std::path::Path::new(name)).as_deref() == Some(name);
    if plain && folder_upload::wanted(name) {
        return Ok(());
    }
    Err(ApiError::unprocessable(
        "unwanted_file",
        format!(
            "`{name}` is not a file a model keeps: a draft takes the weights (model.safetensors, or shards *.safetensors with {INDEX_FILE}) and the companion files {}, by their names in the folder's top level",
            COMPANIONS.join(", ")
        ),
    )
    .with_pointer(format!("/files/{}", name.replace('~', "~0").replace('/', "~1"))))
}

/// Open a draft: a model folder to be uploaded file by file, then committed.
#[utoipa::path(post, path = "/v1/models/drafts", tag = "models", params(UploadParams),
    responses((status = 201, body = DraftView), (status = 409, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn create_draft(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(p): Query<UploadParams>,
) -> ApiResult<Response> {
    if let Some(name) = p.name.as_deref() {
        refuse_lone_shard(name).map_err(|e| e.with_pointer("/name"))?;
    }
    let max = s.settings.storage.max_drafts_per_principal;
    let draft = s.drafts.create(&who.name, p.name.as_deref(), expiry_ms(&s), max).await?.ok_or_else(|| {
        ApiError::conflict(
            "too_many_drafts",
            format!(
                "`{}` has {max} open drafts (storage.max_drafts_per_principal); commit or delete one first",
                who.name
            ),
        )
    })?;
    let location = format!("/v1/models/drafts/{}", draft.id);
    Ok((StatusCode::CREATED, [(header::LOCATION, location)], Json(DraftView::new(&draft, Vec::new()))).into_response())
}

/// Most drafts one listing returns (a principal has at most `storage.max_drafts_per_principal`;
/// an admin sees everyone's).
const MAX_LISTED_DRAFTS: u32 = 1000;

/// The caller's open drafts with their files, newest first (an admin's: everyone's), so a client
/// that lost a draft's id finds it again.
#[utoipa::path(get, path = "/v1/models/drafts", tag = "models", responses((status = 200, body = Vec<DraftView>)))]
pub async fn list_drafts(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
) -> ApiResult<Json<Vec<DraftView>>> {
    let mut out = Vec::new();
    for d in s.drafts.list(who.owner_filter(), MAX_LISTED_DRAFTS).await? {
        let files = s.drafts.files(&d.id).await?;
        out.push(DraftView::new(&d, files));
    }
    Ok(Json(out))
}

/// A draft with the files received so far.
#[utoipa::path(get, path = "/v1/models/drafts/{id}", tag = "models",
    responses((status = 200, body = DraftView), (status = 404, body = super::error::Problem)))]
pub async fn get_draft(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Json<DraftView>> {
    let draft = visible_draft(&s, &who, &id).await?;
    let files = s.drafts.files(&draft.id).await?;
    Ok(Json(DraftView::new(&draft, files)))
}

/// Discard a draft and its files.
#[utoipa::path(delete, path = "/v1/models/drafts/{id}", tag = "models",
    responses((status = 204), (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem)))]
pub async fn delete_draft(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    let draft = visible_draft(&s, &who, &id).await?;
    let lock = s.drafts.lock(&draft.id);
    if lock.committing.load(Ordering::Acquire) {
        return Err(committing(&draft.id));
    }
    let _held = lock.files.lock().await;
    visible_draft(&s, &who, &draft.id).await?;
    s.drafts.discard(&draft.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Send one file of the folder as the raw body (`curl -T config.json URL`): 201 when new, 200
/// when it replaced the file of that name.
#[utoipa::path(put, path = "/v1/models/drafts/{id}/files/{name}", tag = "models",
    request_body(content((Vec<u8> = "application/octet-stream"))),
    responses((status = 201, body = ModelFile), (status = 200, body = ModelFile),
              (status = 404, body = super::error::Problem), (status = 409, body = super::error::Problem),
              (status = 413, body = super::error::Problem), (status = 415, body = super::error::Problem),
              (status = 422, body = super::error::Problem)))]
pub async fn put_draft_file(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path((id, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let settings = &s.settings.storage;
    check_file_name(&name)?;
    let draft = visible_draft(&s, &who, &id).await?;
    let lock = s.drafts.lock(&draft.id);
    if lock.committing.load(Ordering::Acquire) {
        return Err(committing(&draft.id));
    }
    // A draft holds what one upload may: its other files leave the rest for this one.
    let files = s.drafts.files(&draft.id).await?;
    let replaced = files.iter().find(|f| f.name == name).map_or(0, |f| f.bytes as u64);
    let others = files.iter().map(|f| f.bytes as u64).sum::<u64>() - replaced;
    let room = settings.max_upload_bytes.saturating_sub(others);
    let small = is_companion(&name) || name == INDEX_FILE;
    let limit = if small { room.min(MAX_COMPANION_BYTES) } else { room };
    // The bytes count against the draft owner's quota (an admin may fill another's draft).
    let payer = Principal { name: draft.owner.clone(), ..who.clone() };
    let admission = Admission::new(&s, &payer, limit, replaced).await?;
    let staged = s.blobs.staging_path("draft-file");
    let body = admission.pace(body);
    let received = if small {
        upload::receive_file(&headers, body, staged.clone(), admission.max_bytes).await
    } else {
        let check = |h: &crate::formats::safetensors::Header| {
            upload::check_header_limits(h, settings.max_tensors, settings.max_tensor_name_bytes)
        };
        upload::receive(&headers, body, staged.clone(), admission.max_bytes, settings.max_header_bytes, &check)
            .await
            .map(|u| FileDigest { sha256: u.sha256, bytes: u.bytes })
    };
    let digest = received.map_err(|e| match admission.refusal(e, limit) {
        e if e.code != "upload_too_large" => e,
        _ if small && limit == MAX_COMPANION_BYTES => ApiError::unprocessable(
            "file_too_large",
            format!(
                "`{name}` is over {MAX_COMPANION_BYTES} bytes; companion files may be at most {MAX_COMPANION_BYTES}"
            ),
        )
        .with_pointer(format!("/files/{name}")),
        e => ApiError {
            detail: format!(
                "a draft holds at most {} bytes in all (storage.max_upload_bytes); its other files hold {others}",
                settings.max_upload_bytes
            ),
            ..e
        },
    })?;
    let file = ModelFile { name, sha256: digest.sha256, bytes: digest.bytes as i64 };
    let replaced = move_in(&s, &draft.id, staged, file.clone()).await?;
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(file)).into_response())
}

/// Moves a received file into its draft under the draft's lock (the draft may have been
/// committed or deleted meanwhile: 404), replacing one of the same name; returns whether it did.
///
/// Draft files are stored under their content's hash (`<dir>/<sha256>`) and the row maps the
/// name to it, so the row is the one point where a file takes effect: a failure between the
/// rename and the row (a database error) leaves the previous file and row as they were, never
/// a name whose bytes differ from its recorded hash. The move runs as a task of its own, so a
/// client that goes away cannot stop it half done. The draft's size is checked again here,
/// under the lock: files arriving in parallel each saw the room before the others landed.
async fn move_in(s: &AppState, id: &str, staged: std::path::PathBuf, file: ModelFile) -> ApiResult<bool> {
    let (s, id) = (s.clone(), id.to_owned());
    tokio::spawn(async move {
        let lock = s.drafts.lock(&id);
        let _held = lock.files.lock().await;
        let unstage = |e: ApiError| {
            let _ = std::fs::remove_file(&staged);
            e
        };
        if s.drafts.get(&id).await.map_err(|e| unstage(e.into()))?.is_none() {
            return Err(unstage(ApiError::not_found("draft", &id)));
        }
        let files = s.drafts.files(&id).await.map_err(|e| unstage(e.into()))?;
        let max = s.settings.storage.max_upload_bytes;
        let others: u64 = files.iter().filter(|f| f.name != file.name).map(|f| f.bytes as u64).sum();
        if others.saturating_add(file.bytes as u64) > max {
            return Err(unstage(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload_too_large",
                format!(
                    "a draft holds at most {max} bytes in all (storage.max_upload_bytes); its other files hold {others} and `{}` is {} bytes",
                    file.name, file.bytes
                ),
            )));
        }
        if !files.iter().any(|f| f.name == file.name) && files.len() >= MAX_DRAFT_FILES {
            return Err(unstage(
                ApiError::unprocessable(
                    "too_many_files",
                    format!(
                        "a draft holds at most {MAX_DRAFT_FILES} files (a checkpoint's shards, its index and companions)"
                    ),
                )
                .with_pointer(format!("/files/{}", file.name)),
            ));
        }
        let dir = s.drafts.dir(&id);
        let (from, to) = (staged.clone(), dir.join(&file.sha256));
        let created = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir)?;
            if to.exists() {
                // The same bytes are already in the draft (under another name, or sent again).
                std::fs::remove_file(&from)?;
                return Ok(false);
            }
            std::fs::rename(&from, &to)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok::<_, std::io::Error>(true)
        })
        .await
        .expect("rename thread")
        .map_err(|e| unstage(ApiError::io(e)))?;
        let in_use = |sha: &str, except: &str| files.iter().any(|f| f.sha256 == sha && f.name != except);
        let replaced = match s.drafts.put_file(&id, &file, expiry_ms(&s)).await {
            Ok(r) => r,
            Err(e) => {
                if created && !in_use(&file.sha256, &file.name) {
                    let _ = tokio::fs::remove_file(s.drafts.dir(&id).join(&file.sha256)).await;
                }
                // Deleted meanwhile (through another replica, or expired).
                if let crate::storage::error::StorageError::NotFound(_) = e {
                    return Err(ApiError::not_found("draft", &id));
                }
                return Err(e.into());
            }
        };
        // The bytes the name held before, unless another name still holds them.
        if let Some(old) = files.iter().find(|f| f.name == file.name && f.sha256 != file.sha256) {
            if !in_use(&old.sha256, &file.name) {
                let _ = tokio::fs::remove_file(s.drafts.dir(&id).join(&old.sha256)).await;
            }
        }
        Ok(replaced)
    })
    .await
    .expect("draft file task")
}

/// Clears a draft's `committing` flag when the commit ends, however it ends.
struct Committing(std::sync::Arc<crate::storage::drafts::DraftLock>);

impl Drop for Committing {
    fn drop(&mut self) {
        self.0.committing.store(false, Ordering::Release);
    }
}

/// Check the draft as a tar upload of the same files is checked, merge its shards and register
/// the model (201, answered like `POST /v1/models`); the draft is then gone. A refused commit
/// (`incomplete_checkpoint`, `invalid_model_folder`, ...) keeps it: send what is missing and
/// commit again.
#[utoipa::path(post, path = "/v1/models/drafts/{id}/commit", tag = "models",
    responses((status = 201, body = super::models::ModelView), (status = 404, body = super::error::Problem),
              (status = 409, body = super::error::Problem), (status = 422, body = super::error::Problem)))]
pub async fn commit_draft(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let draft = visible_draft(&s, &who, &id).await?;
    let lock = s.drafts.lock(&draft.id);
    if lock.committing.swap(true, Ordering::AcqRel) {
        return Err(committing(&draft.id));
    }
    let committing_flag = Committing(lock.clone());
    // The merge is an upload's work: it takes an upload's permit.
    let admission = Admission::new(&s, &who, 0, 0).await?;
    // The check, merge and store run as a task of their own, holding the draft's lock, its
    // `committing` flag and the permit: a client that goes away cannot leave them half done.
    // They read a view of the draft (its files hard-linked under their names into staging), so
    // the draft keeps every file until the model is stored; the model is the draft owner's.
    let state = s.clone();
    tokio::spawn(async move {
        let (s, _committing, _admission) = (state, committing_flag, admission);
        let _held = lock.files.lock().await;
        let draft = visible_draft(&s, &who, &draft.id).await?;
        let owner = draft.owner.clone();
        let files = s.drafts.files(&draft.id).await?;
        let view = folder_upload::DirGuard::new(s.blobs.staging_path("draft-view"));
        let (dir, to) = (s.drafts.dir(&draft.id), view.path().to_owned());
        let links: Vec<(String, String)> = files.iter().map(|f| (f.sha256.clone(), f.name.clone())).collect();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&to)?;
            for (sha, name) in links {
                std::fs::hard_link(dir.join(&sha), to.join(&name)).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => std::io::Error::new(e.kind(), name),
                    _ => e,
                })?;
            }
            Ok::<_, std::io::Error>(())
        })
        .await
        .expect("draft view thread")
        .map_err(|e| match e.kind() {
            // Replicas share a draft's rows but each keeps the files it received.
            std::io::ErrorKind::NotFound => ApiError::conflict(
                "draft_file_elsewhere",
                format!(
                    "file `{e}` of draft {} was received by another replica (this is {}): send all of a draft's \
                     requests to one replica, or upload the folder as one tar body",
                    draft.id, s.instance
                ),
            ),
            _ => ApiError::io(e),
        })?;
        let digests: BTreeMap<String, FileDigest> =
            files.into_iter().map(|f| (f.name, FileDigest { sha256: f.sha256, bytes: f.bytes as u64 })).collect();
        let settings = &s.settings.storage;
        let check = |h: &crate::formats::safetensors::Header| {
            upload::check_header_limits(h, settings.max_tensors, settings.max_tensor_name_bytes)
        };
        let gone = folder_upload::Gone::new();
        let merged = s.blobs.staging_path("merged");
        let folder = folder_upload::check_folder(
            view.path(),
            digests,
            merged.clone(),
            settings.max_header_bytes,
            &check,
            gone.0.clone(),
        )
        .await?;
        let stored = store_model(&s, &owner, ModelKind::Model, draft.name.clone(), None, folder).await;
        // Persisted into the blob store, or left over by a failure: not the draft's any more.
        let _ = tokio::fs::remove_file(&merged).await;
        let response = stored?;
        s.drafts.discard(&draft.id).await?;
        tracing::info!(draft_id = %draft.id, "committed draft");
        Ok(response)
    })
    .await
    .expect("draft commit task")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_draft_takes_the_files_a_folder_keeps_by_their_plain_names() {
        for ok in ["model.safetensors", "model-00002-of-00003.safetensors", INDEX_FILE, "config.json", "merges.txt"] {
            assert!(check_file_name(ok).is_ok(), "{ok}");
        }
        for bad in ["README.md", "pytorch_model.bin", ".merged.safetensors", "original/model.safetensors"] {
            let e = check_file_name(bad).unwrap_err();
            assert_eq!((e.status.as_u16(), e.code), (422, "unwanted_file"), "{bad}");
            assert!(e.detail.contains(&format!("`{bad}`")), "{}", e.detail);
        }
        for sneaky in ["../model.safetensors", "./config.json", "a\\b.safetensors", "/etc/x.safetensors", ""] {
            assert!(check_file_name(sneaky).is_err(), "{sneaky}");
        }
        assert_eq!(
            check_file_name("original/x.safetensors").unwrap_err().pointer.as_deref(),
            Some("/files/original~1x.safetensors")
        );
    }
}
