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

/// How many spin iterations candle's CPU thread pool waits for more work before it parks,
/// unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set. candle 0.11 spins 25,000 times (about a
/// millisecond) after each parallel op; on a 2-core machine that spinning takes the core the
/// next gemm needs (one KD step of `benches/graph.rs`: 3.3 ms at 25,000, 2.4 ms at 2,000).
pub const CANDLE_SPIN_LIMIT: u32 = 2_000;

/// Process-wide settings of the libraries, before any thread starts: the candle pool's spin
/// limit ([`CANDLE_SPIN_LIMIT`]). Called first by `main` and by the benchmarks.
pub fn tune_process() {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // Single-threaded here: nothing reads the environment concurrently.
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", CANDLE_SPIN_LIMIT.to_string());
    }
}
