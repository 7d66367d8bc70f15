-- Model drafts: a folder uploaded file by file (PUT /v1/models/drafts/{id}/files/{name}), then
-- committed into one model. The files live under <data_dir>/drafts/<id>/ named by their SHA-256;
-- a row per file maps its name in the folder to that hash (taken while it was written) and keeps
-- its size (counted in the owner's storage quota).
create table model_drafts (
    id          text primary key,
    owner       text not null,
    name        text,
    created_at  integer not null,
    -- Unix ms after which the draft is gone; pushed back by every file received.
    expires_at  integer not null
);
create index model_drafts_owner on model_drafts (owner, expires_at);
create table model_draft_files (
    draft_id    text not null references model_drafts (id) on delete cascade,
    name        text not null,
    sha256      text not null,
    bytes       integer not null,
    primary key (draft_id, name)
);
