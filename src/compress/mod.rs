//! Compression: specs, plans and the engine that runs them tensor by tensor.
//!
//! Nothing here knows about HTTP or SQL: the server's workers, the CLI and the benchmarks call
//! [`engine::run`] directly.

pub mod engine;
pub mod ggml;
pub mod layout;
pub mod metrics;
pub mod mixed;
pub mod plan;
pub mod prune;
pub mod quant;
pub mod report;
pub mod report_html;
pub mod select;
pub mod spec;
pub mod synth;
