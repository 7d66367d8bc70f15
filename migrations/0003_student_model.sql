-- The second model a job reads: the student of a `distill` step with `student_model_id` (the
-- job's `model_id` is then the teacher). Deletes and graph changes check it like `model_id`.
alter table jobs add column student_model_id text;
