//! Which form each tensor takes in each output layout: rules shared by the plan's predictions,
//! the sinks that write the layouts and the check that reads them back.

pub mod compressed_tensors;

use crate::formats::gguf::GgufType;
use crate::formats::safetensors::{Dtype, TensorInfo};

/// Whether the compressed-tensors layout stores an int-quantized tensor packed: only weights of
/// `Linear` modules (rank 2, not an embedding table). Its loaders decompress `Linear` modules only
/// (transformers leaves a packed embedding randomly initialised), so everything else stays dense
/// and is listed in `ignore`.
pub fn packs_as_linear(t: &TensorInfo) -> bool {
    t.shape.len() == 2 && t.name.ends_with(".weight") && !super::select::is_embedding(&t.name)
}

/// The storage type a tensor gets in GGUF: its block type when GGUF-quantized, otherwise its
/// float values as F32, or F16 for F16 inputs of rank >= 2 (1-D tensors, norms and biases, go out
/// as F32 as llama.cpp's converters do: F16 norms cost quality). Tensors GGUF cannot hold (not
/// floating point, rank 0 or above 4) are left out and listed in `modelpress.omitted_tensors`.
pub fn gguf_type_for(t: &TensorInfo, last_ggml: Option<GgufType>) -> Option<GgufType> {
    if GgufType::F32.shape_refusal(&t.shape).is_some() {
        return None;
    }
    match last_ggml {
        Some(ty) => Some(ty),
        None if t.dtype == Dtype::F16 && t.shape.len() >= 2 => Some(GgufType::F16),
        None if t.dtype.is_float() => Some(GgufType::F32),
        None => None,
    }
}

/// The dtype the sparse-bitmask layout stores kept values in: the weight's own half type, else f32.
pub fn sparse_dtype(d: Dtype) -> Dtype {
    match d {
        Dtype::F16 | Dtype::BF16 => d,
        _ => Dtype::F32,
    }
}
