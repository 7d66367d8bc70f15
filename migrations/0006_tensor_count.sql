-- Lists show each model's tensor count without reading (and parsing) its tensor table, which
-- is megabytes for a model of 200,000 tensors.
alter table models add column tensor_count integer not null default 0;
update models set tensor_count = json_array_length(tensors);
