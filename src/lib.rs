//! ModelPress: makes neural-network models smaller.
//!
//! Layers, with dependencies pointing one way: [`http`] -> [`scheduler`] -> [`compress`] ->
//! [`formats`]; [`storage`] holds the database, queue and blobs; [`domain`] the shared types.

pub mod cli;
pub mod compress;
pub mod config;
pub mod domain;
pub mod formats;
pub mod graph;
pub mod http;
pub mod scheduler;
pub mod startup;
pub mod storage;
pub mod telemetry;
