-- The other files a job reads: the student of a `distill` step with `student_model_id` (the
-- job's `model_id` is then the teacher) and the evaluation's own dataset (`evaluate.dataset_id`).
-- Deletes and graph changes check them like `model_id` and `dataset_id`.
alter table jobs add column student_model_id text;
alter table jobs add column eval_dataset_id text;
