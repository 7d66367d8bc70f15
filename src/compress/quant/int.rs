//! Round-to-nearest entry points: validation, buffer reuse and rayon over row blocks; the per-block
//! arithmetic lives in [`super::kernel`].

use rayon::prelude::*;

use super::kernel::{self, qparams, Levels};
use super::search;
use super::{Granularity, IntParams, IntQuantized, QuantError, ScaleSearch, Stop, StoreDtype, NEVER};

/// Target number of input values per rayon task (256 KiB of f32): large enough to hide scheduling,
/// small enough to balance 2-8 cores on a 4096-row matrix.
const VALUES_PER_TASK: usize = 1 << 16;

fn validate(data_len: usize, dequant_len: usize, rows: usize, cols: usize, p: &IntParams) -> Result<usize, QuantError> {
    if !matches!(p.bits, 2 | 4 | 8) {
        return Err(QuantError::UnsupportedBits(p.bits));
    }
    let expected = rows * cols;
    for (what, got) in [("data", data_len), ("dequant", dequant_len)] {
        if got != expected {
            return Err(QuantError::LengthMismatch { what, got, expected, rows, cols });
        }
    }
    match p.granularity {
        Granularity::Tensor | Granularity::Channel => Ok(cols),
        Granularity::Group(0) => Err(QuantError::ZeroGroup),
        Granularity::Group(g) if !cols.is_multiple_of(g) => Err(QuantError::GroupDoesNotDivide { cols, group: g }),
        Granularity::Group(g) => Ok(g),
    }
}

fn first_non_finite(data: &[f32]) -> QuantError {
    let index = data.iter().position(|v| !v.is_finite()).unwrap_or(0);
    QuantError::NonFinite { index, value: data.get(index).copied().unwrap_or(f32::NAN) }
}

/// Quantizes a row-major `rows x cols` matrix into `q` (buffers reused) and writes `(q - zp) * scale`
/// into `dequant`. Scales are rounded to `store` (the dtype they will be saved in) before any code
/// is computed, and codes are limited so every decoded value is finite in `store`. Errors name the
/// offending parameter or the flat index of the first NaN/Inf.
pub fn quantize_into(
    data: &[f32],
    rows: usize,
    cols: usize,
    p: &IntParams,
    store: StoreDtype,
    q: &mut IntQuantized,
    dequant: &mut [f32],
) -> Result<(), QuantError> {
    quantize_into_until(data, rows, cols, p, store, q, dequant, NEVER)
}

/// [`quantize_into`] that asks `stop` before each block of rows and ends with
/// [`QuantError::Canceled`] (the outputs then partly written) once it answers true.
#[allow(clippy::too_many_arguments)]
pub fn quantize_into_until(
    data: &[f32],
    rows: usize,
    cols: usize,
    p: &IntParams,
    store: StoreDtype,
    q: &mut IntQuantized,
    dequant: &mut [f32],
    stop: &Stop<'_>,
) -> Result<(), QuantError> {
    let blk = validate(data.len(), dequant.len(), rows, cols, p)?;
    let lv = Levels::new(p.bits, p.symmetric, store);
    let scale_shape = match p.granularity {
        Granularity::Tensor => [1, 1],
        _ => [rows, cols / blk.max(1)],
    };
    q.rows = rows;
    q.cols = cols;
    q.bits = p.bits;
    q.symmetric = p.symmetric;
    q.scale_shape = scale_shape;
    q.codes.resize(rows * cols, 0);
    q.scales.resize(scale_shape[0] * scale_shape[1], 0.0);
    if p.symmetric {
        q.zero_points = None;
    } else {
        q.zero_points.get_or_insert_with(Vec::new).resize(q.scales.len(), 0);
    }
    if rows * cols == 0 {
        return Ok(());
    }
    let task = (VALUES_PER_TASK / cols).max(1) * cols;

    if p.granularity == Granularity::Tensor {
        let (lo, hi, finite) = data
            .par_chunks(task)
            .map(kernel::min_max_chunk)
            .reduce(|| (0.0, 0.0, true), |a, b| (a.0.min(b.0), a.1.max(b.1), a.2 && b.2));
        if !finite {
            return Err(first_non_finite(data));
        }
        let qp = match p.search {
            ScaleSearch::None => qparams(lo, hi, &lv),
            ScaleSearch::Mse => search::tensor_range(data, task, lo, hi, &lv),
        };
        q.scales[0] = qp.scale;
        if let Some(z) = q.zero_points.as_mut() {
            z[0] = qp.zp;
        }
        return (q.codes.par_chunks_mut(task), dequant.par_chunks_mut(task), data.par_chunks(task))
            .into_par_iter()
            .try_for_each(|(c, d, x)| {
                if stop() {
                    return Err(QuantError::Canceled);
                }
                kernel::quantize_chunk(x, c, d, qp);
                Ok(())
            });
    }

    let per_task_scales = task / blk;
    let mse = p.search == ScaleSearch::Mse;
    let work = |x: &[f32], c: &mut [i8], d: &mut [f32], s: &mut [f32], z: Option<&mut [i8]>| {
        if stop() {
            return Err(QuantError::Canceled);
        }
        kernel::blocks_chunk(x, c, d, s, z, blk, &lv, mse).map_err(|()| first_non_finite(data))
    };
    let chunks = (q.codes.par_chunks_mut(task), dequant.par_chunks_mut(task), data.par_chunks(task));
    let outcome = match q.zero_points.as_mut() {
        Some(zps) => (
            chunks.0,
            chunks.1,
            chunks.2,
            q.scales.par_chunks_mut(per_task_scales),
            zps.par_chunks_mut(per_task_scales),
        )
            .into_par_iter()
            .try_for_each(|(c, d, x, s, z)| work(x, c, d, s, Some(z))),
        None => (chunks.0, chunks.1, chunks.2, q.scales.par_chunks_mut(per_task_scales))
            .into_par_iter()
            .try_for_each(|(c, d, x, s)| work(x, c, d, s, None)),
    };
    outcome
}

/// Allocating convenience over [`quantize_into`] with f32 scales: returns the quantized tensor and
/// its dequantization.
pub fn quantize(data: &[f32], rows: usize, cols: usize, p: &IntParams) -> Result<(IntQuantized, Vec<f32>), QuantError> {
    let mut q = IntQuantized::default();
    let mut dequant = vec![0f32; data.len()];
    quantize_into(data, rows, cols, p, StoreDtype::F32, &mut q, &mut dequant)?;
    Ok((q, dequant))
}

/// Decodes `q` into `out` (`rows * cols` values) as `(code - zp) * scale`, independently of the kernel.
pub fn dequantize_into(q: &IntQuantized, out: &mut [f32]) -> Result<(), QuantError> {
    let expected = q.rows * q.cols;
    if out.len() != expected {
        return Err(QuantError::LengthMismatch { what: "out", got: out.len(), expected, rows: q.rows, cols: q.cols });
    }
    let per_tensor = q.scales.len() == 1 && q.scale_shape == [1, 1];
    let blk = if per_tensor { q.cols.max(1) } else { q.block_len().max(1) };
    out.par_chunks_mut(blk).zip(q.codes.par_chunks(blk)).enumerate().for_each(|(b, (o, c))| {
        let k = if per_tensor { 0 } else { b };
        let scale = q.scales[k];
        let zp = q.zero_points.as_ref().map_or(0.0, |z| z[k] as f32);
        for (o, &c) in o.iter_mut().zip(c) {
            *o = (c as f32 - zp) * scale;
        }
    });
    Ok(())
}
