-- API keys (`Authorization: Bearer mp_<id>_<secret><checksum>`). Only a SHA-256 of the secret is
-- stored; the full key is shown once, when it is created.
create table api_keys (
    id            text primary key,          -- 12 hex characters, the public part of the key
    principal     text not null,             -- who the key acts for (ownership, quotas)
    name          text,
    scopes        text not null,             -- 'read' | 'write' | 'admin' (each implies the ones before)
    secret_sha256 text not null,
    created_at    integer not null,
    expires_at    integer,
    last_used_at  integer,
    revoked_at    integer
);
create index api_keys_principal on api_keys (principal, revoked_at);
