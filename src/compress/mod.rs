//! Compression: specs, plans and the engine that runs them tensor by tensor.
//!
//! Nothing here knows about HTTP or SQL. Two entry points, used alike by the server's edge and
//! workers, the CLI and the benchmarks: [`plan::prepare`] turns a parsed spec and a model's header
//! into a [`plan::Plan`], and [`engine::execute`] runs a plan. Each kind of step is a module of
//! [`ops`] behind [`ops::StepOp`].

pub mod engine;
pub mod ggml;
pub mod layout;
pub mod metrics;
pub mod mixed;
pub mod ops;
pub mod plan;
pub mod prune;
pub mod quant;
pub mod report;
pub mod report_html;
pub mod select;
pub mod spec;
pub mod synth;
