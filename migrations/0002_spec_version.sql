-- The version of the spec format a job was accepted under. A worker runs only versions it
-- knows; a spec accepted by a newer server fails clearly instead of being read with old rules.
alter table jobs add column spec_version integer not null default 1;

-- The model a job with `"register": true` registered from its output, set when it succeeded.
alter table jobs add column registered_model_id text;
