//! GGUF block quantization: the ggml block types, their byte layout, and parallel quantize/dequantize.
//!
//! The bytes produced are exactly what `candle_core::quantized::QTensor::quantize` would hold for the
//! same tensor (tested, including random blocks), but the work is split across rayon threads in
//! chunks of whole blocks, and kernels run on plain slices (candle quantizes a tensor on one thread,
//! and quantizing a narrowed view silently reads the parent's data: candle issue #3864).
//! Q8_0, Q4_K and Q5_K use hand-written ports that give candle's bytes 2-3x faster (`fast`,
//! `fast_k`); every other type calls candle's own `GgmlType::from_float`/`to_float`.

mod fast;
mod fast_k;
mod kernels;

use rayon::prelude::*;

use crate::formats::gguf::GgufType;

/// Errors of GGUF block quantization; messages name the type, shape and byte counts involved.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GgmlError {
    #[error("cannot store a {rows}x{cols} matrix as {ty}: {reason}")]
    RowLength { ty: GgufType, rows: usize, cols: usize, reason: String },
    #[error("a {rows}x{cols} matrix needs {expected} values, got {got}")]
    ValueCount { rows: usize, cols: usize, expected: usize, got: usize },
    #[error("{ty} data of a {rows}x{cols} matrix is {expected} bytes, got {got}")]
    ByteCount { ty: GgufType, rows: usize, cols: usize, expected: usize, got: usize },
    /// The `stop` of [`quantize_until`] answered true between two chunks.
    #[error("canceled")]
    Canceled,
}

/// Input values per parallel work item: 64 KiB of f32 keeps per-task overhead under 1% while
/// giving rayon enough pieces to balance 2-64 threads. A multiple of 256, so of every block size.
const CHUNK_VALUES: usize = 16 * 1024;

fn check_shape(ty: GgufType, rows: usize, cols: usize, values: usize) -> Result<usize, GgmlError> {
    if let Some(reason) = ty.row_refusal(cols) {
        return Err(GgmlError::RowLength { ty, rows, cols, reason });
    }
    let expected = rows.saturating_mul(cols);
    if values != expected {
        return Err(GgmlError::ValueCount { rows, cols, expected, got: values });
    }
    Ok(expected)
}

/// Quantizes a row-major `rows x cols` matrix into `out` (cleared first) as ggml `ty` blocks.
///
/// `out` keeps its allocation between calls: pass the same Vec for every tensor.
pub fn quantize(data: &[f32], rows: usize, cols: usize, ty: GgufType, out: &mut Vec<u8>) -> Result<(), GgmlError> {
    quantize_until(data, rows, cols, ty, out, crate::compress::quant::NEVER)
}

/// [`quantize`] that asks `stop` before each chunk of blocks and ends with
/// [`GgmlError::Canceled`] (`out` then partly written) once it answers true.
pub fn quantize_until(
    data: &[f32],
    rows: usize,
    cols: usize,
    ty: GgufType,
    out: &mut Vec<u8>,
    stop: &crate::compress::quant::Stop<'_>,
) -> Result<(), GgmlError> {
    let elems = check_shape(ty, rows, cols, data.len())?;
    // Zeroing costs one write pass over the (smaller) output; it keeps every byte defined even if
    // a kernel leaves padding untouched, so the same input always gives the same file.
    out.clear();
    out.resize(ty.encoded_len(elems), 0);
    let out_chunk = ty.encoded_len(CHUNK_VALUES);
    data.par_chunks(CHUNK_VALUES).zip(out.par_chunks_mut(out_chunk)).try_for_each(|(xs, ys)| {
        if stop() {
            return Err(GgmlError::Canceled);
        }
        kernels::quantize_chunk(ty, xs, ys);
        Ok(())
    })
}

/// Decodes `ty` blocks of a row-major `rows x cols` matrix into `out` (exactly `rows * cols` long).
pub fn dequantize(bytes: &[u8], rows: usize, cols: usize, ty: GgufType, out: &mut [f32]) -> Result<(), GgmlError> {
    let elems = check_shape(ty, rows, cols, out.len())?;
    let expected = ty.encoded_len(elems);
    if bytes.len() != expected {
        return Err(GgmlError::ByteCount { ty, rows, cols, expected, got: bytes.len() });
    }
    let in_chunk = ty.encoded_len(CHUNK_VALUES);
    out.par_chunks_mut(CHUNK_VALUES)
        .zip(bytes.par_chunks(in_chunk))
        .for_each(|(ys, xs)| kernels::dequantize_chunk(ty, xs, ys));
    Ok(())
}

#[cfg(test)]
mod tests;
