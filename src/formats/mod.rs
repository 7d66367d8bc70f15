//! Model file formats: reading and validating safetensors, and writing every output layout.

pub mod safetensors;
