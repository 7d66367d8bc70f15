-- The version of the spec format a job was accepted under. A worker runs only versions it
-- knows; a spec accepted by a newer server fails clearly instead of being read with old rules.
alter table jobs add column spec_version integer not null default 1;
