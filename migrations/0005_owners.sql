-- Every model, dataset and job belongs to the principal whose key created it; rows from before
-- keys existed (and from the embedded setup without keys) belong to `local`. Idempotency keys are
-- scoped to their principal: stored as `<principal>/<key>`.
alter table models add column owner text not null default 'local';
alter table jobs add column owner text not null default 'local';
update jobs set idempotency_key = 'local/' || idempotency_key where idempotency_key is not null;
create index models_owner on models (owner, kind, id);
create index jobs_owner on jobs (owner, id);
