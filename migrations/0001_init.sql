-- ModelPress schema. Times are unix milliseconds (integers compare cheaply for leases).

-- content-addressed files; a blob is deleted only when no model or artifact row names it.
create table blobs (
    sha256      text primary key,
    bytes       integer not null,
    created_at  integer not null
);

-- uploaded models and datasets (same shape: a validated safetensors file).
create table models (
    id          text primary key,            -- uuid v7: time-ordered, so it is also the list cursor
    kind        text not null check (kind in ('model', 'dataset')),
    name        text,
    sha256      text not null references blobs (sha256),
    bytes       integer not null,
    tensors     text not null,               -- JSON tensor table read from the validated header
    parameters  integer not null,
    graph       text,                        -- optional architecture description (JSON)
    source_job  text,                        -- set when registered from a job's artifact
    created_at  integer not null
);
create index models_kind_id on models (kind, id);

create table jobs (
    id                text primary key,      -- uuid v7
    -- no foreign keys on inputs: a job's history outlives a deleted model; deletes and
    -- enqueues are single statements that check each other, so no active job loses its input.
    model_id          text not null,
    dataset_id        text,
    spec              text not null,         -- the canonical JSON spec as accepted
    spec_hash         text not null,         -- sha256 of `spec`, also the idempotency fingerprint
    idempotency_key   text unique,
    status            text not null check (status in ('queued', 'running', 'succeeded', 'failed', 'canceled')),
    attempt           integer not null default 0,
    max_attempts      integer not null,
    run_after         integer not null,      -- earliest claim time (retry backoff)
    lease_owner       text,
    lease_expires_at  integer,
    cancel_requested  integer not null default 0,
    progress_fraction real not null default 0,
    progress_step     text,
    progress_message  text,
    error             text,                  -- JSON {code, detail} when failed
    created_at        integer not null,
    started_at        integer,
    finished_at       integer,
    canceled_at       integer,
    updated_at        integer not null
);
create index jobs_claim on jobs (status, run_after, id);
create index jobs_model on jobs (model_id, status);

-- every state change and throttled progress, so SSE clients can replay from Last-Event-ID.
create table job_events (
    job_id      text not null references jobs (id) on delete cascade,
    seq         integer not null,
    kind        text not null,               -- 'state' | 'progress'
    data        text not null,               -- JSON payload sent as the SSE data line
    created_at  integer not null,
    primary key (job_id, seq)
);

create table artifacts (
    job_id      text not null references jobs (id) on delete cascade,
    name        text not null,               -- e.g. 'model.safetensors', 'compressed-tensors/config.json'
    format      text not null,
    sha256      text not null references blobs (sha256),
    bytes       integer not null,
    created_at  integer not null,
    primary key (job_id, name)
);
