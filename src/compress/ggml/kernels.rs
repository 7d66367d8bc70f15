//! Per-chunk dispatch to candle's block kernels, viewing byte buffers as block slices.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8_0,
};
use candle_core::quantized::GgmlType;
use half::f16;

use super::GgufType;

/// Plain-old-data block types: `repr(C)` structs of f16/f32/u8/i8 fields (or the scalars
/// themselves), so every bit pattern is a valid value and a byte slice can be viewed as them.
///
/// # Safety
/// Implement only for types whose every bit pattern is valid and that have no padding.
unsafe trait Pod: GgmlType {}
unsafe impl Pod for f32 {}
unsafe impl Pod for f16 {}
unsafe impl Pod for BlockQ8_0 {}
unsafe impl Pod for BlockQ4_0 {}
unsafe impl Pod for BlockQ4_1 {}
unsafe impl Pod for BlockQ5_0 {}
unsafe impl Pod for BlockQ5_1 {}
unsafe impl Pod for BlockQ2K {}
unsafe impl Pod for BlockQ3K {}
unsafe impl Pod for BlockQ4K {}
unsafe impl Pod for BlockQ5K {}
unsafe impl Pod for BlockQ6K {}

/// Views `bytes` as blocks when its address is aligned for `B` (always, in practice: the global
/// allocator and GGUF's 32-byte data alignment both exceed the 2-4 bytes blocks need).
fn as_blocks_mut<B: Pod>(bytes: &mut [u8]) -> Option<&mut [B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.as_ptr().cast::<B>().is_aligned() || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: alignment and length checked above; `B: Pod` makes any byte content a valid `B`.
    Some(unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<B>(), bytes.len() / size) })
}

fn as_blocks<B: Pod>(bytes: &[u8]) -> Option<&[B]> {
    let size = std::mem::size_of::<B>();
    if !bytes.as_ptr().cast::<B>().is_aligned() || !bytes.len().is_multiple_of(size) {
        return None;
    }
    // SAFETY: as in `as_blocks_mut`.
    Some(unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<B>(), bytes.len() / size) })
}

/// Copies blocks into their byte image (used only on the misaligned fallback path).
fn block_bytes<B: Pod>(blocks: &[B]) -> &[u8] {
    // SAFETY: `B: Pod` has no padding, so all its bytes are initialised.
    unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

fn quantize_with<B: Pod>(xs: &[f32], ys: &mut [u8]) {
    match as_blocks_mut::<B>(ys) {
        Some(blocks) => B::from_float(xs, blocks),
        None => {
            let mut blocks = vec![B::zeros(); xs.len() / B::BLCK_SIZE];
            B::from_float(xs, &mut blocks);
            ys.copy_from_slice(block_bytes(&blocks));
        }
    }
}

fn dequantize_with<B: Pod>(xs: &[u8], ys: &mut [f32]) {
    match as_blocks::<B>(xs) {
        Some(blocks) => B::to_float(blocks, ys),
        None => {
            let mut blocks = vec![B::zeros(); ys.len() / B::BLCK_SIZE];
            block_bytes_mut(&mut blocks).copy_from_slice(xs);
            B::to_float(&blocks, ys);
        }
    }
}

fn block_bytes_mut<B: Pod>(blocks: &mut [B]) -> &mut [u8] {
    // SAFETY: `B: Pod`: no padding, and any bytes written form a valid `B`.
    unsafe { std::slice::from_raw_parts_mut(blocks.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(blocks)) }
}

/// Quantizes whole blocks `xs` into their byte image `ys` (`ty.encoded_len(xs.len())` bytes).
pub(super) fn quantize_chunk(ty: GgufType, xs: &[f32], ys: &mut [u8]) {
    match ty {
        GgufType::F32 => quantize_with::<f32>(xs, ys),
        GgufType::F16 => quantize_with::<f16>(xs, ys),
        GgufType::Q8_0 => super::fast::quantize_q8_0(xs, ys),
        GgufType::Q4_0 => quantize_with::<BlockQ4_0>(xs, ys),
        GgufType::Q4_1 => quantize_with::<BlockQ4_1>(xs, ys),
        GgufType::Q5_0 => quantize_with::<BlockQ5_0>(xs, ys),
        GgufType::Q5_1 => quantize_with::<BlockQ5_1>(xs, ys),
        GgufType::Q2K => quantize_with::<BlockQ2K>(xs, ys),
        GgufType::Q3K => quantize_with::<BlockQ3K>(xs, ys),
        GgufType::Q4K => super::fast_k::quantize_q4k(xs, ys),
        GgufType::Q5K => super::fast_k::quantize_q5k(xs, ys),
        GgufType::Q6K => super::fast_k::quantize_q6k(xs, ys),
    }
}

/// Decodes the byte image `xs` of whole blocks into `ys`.
pub(super) fn dequantize_chunk(ty: GgufType, xs: &[u8], ys: &mut [f32]) {
    match ty {
        GgufType::F32 => dequantize_with::<f32>(xs, ys),
        GgufType::F16 => dequantize_with::<f16>(xs, ys),
        GgufType::Q8_0 => super::fast::dequantize_q8_0(xs, ys),
        GgufType::Q4_0 => super::fast::dequantize_q4_0(xs, ys),
        GgufType::Q4_1 => dequantize_with::<BlockQ4_1>(xs, ys),
        GgufType::Q5_0 => dequantize_with::<BlockQ5_0>(xs, ys),
        GgufType::Q5_1 => dequantize_with::<BlockQ5_1>(xs, ys),
        GgufType::Q2K => dequantize_with::<BlockQ2K>(xs, ys),
        GgufType::Q3K => dequantize_with::<BlockQ3K>(xs, ys),
        GgufType::Q4K => dequantize_with::<BlockQ4K>(xs, ys),
        GgufType::Q5K => dequantize_with::<BlockQ5K>(xs, ys),
        GgufType::Q6K => dequantize_with::<BlockQ6K>(xs, ys),
    }
}
