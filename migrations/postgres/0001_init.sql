-- ModelPress schema on PostgreSQL: the same tables as the SQLite migrations (migrations/*.sql)
-- at their latest version, with bigint integers (the code reads every integer as i64) and
-- ids compared byte by byte (collate "C": UUIDv7 text order is time order, whatever the
-- database's locale). Times are unix milliseconds.

-- content-addressed files; a blob is deleted only when no model or artifact row names it.
create table blobs (
    sha256      text collate "C" primary key,
    bytes       bigint not null,
    created_at  bigint not null
);

-- uploaded models and datasets.
create table models (
    id           text collate "C" primary key,
    kind         text not null check (kind in ('model', 'dataset')),
    name         text,
    sha256       text collate "C" not null references blobs (sha256),
    bytes        bigint not null,
    tensors      text not null,
    parameters   bigint not null,
    graph        text,
    source_job   text collate "C",
    created_at   bigint not null,
    owner        text not null default 'local',
    tensor_count bigint not null default 0
);
create index models_kind_id on models (kind, id);
create index models_owner on models (owner, kind, id);

create table jobs (
    id                  text collate "C" primary key,
    model_id            text collate "C" not null,
    dataset_id          text collate "C",
    spec                text not null,
    spec_hash           text not null,
    idempotency_key     text unique,
    status              text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    attempt             bigint not null default 0,
    max_attempts        bigint not null,
    run_after           bigint not null,
    lease_owner         text,
    lease_expires_at    bigint,
    cancel_requested    bigint not null default 0,
    progress_fraction   double precision not null default 0,
    progress_step       text,
    progress_message    text,
    error               text,
    created_at          bigint not null,
    started_at          bigint,
    finished_at         bigint,
    canceled_at         bigint,
    updated_at          bigint not null,
    spec_version        bigint not null default 1,
    registered_model_id text collate "C",
    student_model_id    text collate "C",
    eval_dataset_id     text collate "C",
    owner               text not null default 'local'
);
-- Claims read the oldest runnable queued job: a partial index keeps that read small however
-- many finished jobs the table holds.
create index jobs_claim on jobs (run_after, id) where status = 'queued';
create index jobs_status on jobs (status);
create index jobs_model on jobs (model_id, status);
create index jobs_owner on jobs (owner, id);
create index jobs_leases on jobs (lease_expires_at) where status = 'running';

create table job_events (
    job_id      text collate "C" not null references jobs (id) on delete cascade,
    seq         bigint not null,
    kind        text not null,
    data        text not null,
    created_at  bigint not null,
    primary key (job_id, seq)
);

create table artifacts (
    job_id      text collate "C" not null references jobs (id) on delete cascade,
    name        text collate "C" not null,
    format      text not null,
    sha256      text collate "C" not null references blobs (sha256),
    bytes       bigint not null,
    created_at  bigint not null,
    primary key (job_id, name)
);
create index artifacts_by_blob on artifacts (sha256);

create table api_keys (
    id            text collate "C" primary key,
    principal     text not null,
    name          text,
    scopes        text not null,
    secret_sha256 text not null,
    created_at    bigint not null,
    expires_at    bigint,
    last_used_at  bigint,
    revoked_at    bigint
);
create index api_keys_principal on api_keys (principal, revoked_at);

create table model_files (
    model_id    text collate "C" not null references models (id),
    name        text collate "C" not null,
    sha256      text collate "C" not null references blobs (sha256),
    bytes       bigint not null,
    primary key (model_id, name)
);
create index model_files_by_blob on model_files (sha256);
create index models_by_blob on models (sha256);

create table model_drafts (
    id          text collate "C" primary key,
    owner       text not null,
    name        text,
    created_at  bigint not null,
    expires_at  bigint not null
);
create index model_drafts_owner on model_drafts (owner, expires_at);
create table model_draft_files (
    draft_id    text collate "C" not null references model_drafts (id) on delete cascade,
    name        text collate "C" not null,
    sha256      text collate "C" not null,
    bytes       bigint not null,
    primary key (draft_id, name)
);
