//! Integration tests: the real application on port 0 with a temp data dir, spoken to over HTTP.

mod auth;
mod cli;
mod crash;
mod disk;
mod faults;
mod folders;
mod fuzz;
mod golden;
mod graphs;
mod helpers;
mod jobs;
mod mlp;
mod models;
mod operations;
mod properties;
mod prune;
mod quantize;
mod replicas;
mod s3;
mod structure;
