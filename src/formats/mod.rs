//! Model file formats: reading and validating safetensors, and writing every output layout.

pub mod fingerprint;
pub mod gguf;
pub mod hf;
pub mod safetensors;
pub mod sparse;
