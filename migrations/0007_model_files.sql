-- The files a model folder brings besides its weights (config.json, the tokenizer): each a blob,
-- named as in the folder. They go into the outputs (a llama.cpp GGUF, complete folders).
create table model_files (
    model_id    text not null references models (id),
    name        text not null,
    sha256      text not null references blobs (sha256),
    bytes       integer not null,
    primary key (model_id, name)
);
create index model_files_by_blob on model_files (sha256);
