//! Round-to-nearest kernels: one fused pass per block (min/max, then quantize + dequantize), rayon over
//! row blocks, no allocation once the caller's buffers have grown to size.

use rayon::prelude::*;

use super::search;
use super::{Granularity, IntParams, IntQuantized, QuantError, ScaleSearch};

/// Adding 1.5 * 2^23 to |t| < 2^22 leaves round_half_even(t) in the low mantissa bits: this rounds like
/// `torch.round` and converts to an integer with plain SSE2 adds (`round_ties_even` is a libm call
/// without SSE4.1, and `as i8` adds NaN/saturation fix-ups that stop vectorisation).
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

/// Target number of input values per rayon task (256 KiB of f32): large enough to hide scheduling,
/// small enough to balance 2-8 cores on a 4096-row matrix.
const VALUES_PER_TASK: usize = 1 << 16;

/// Integer range of one bit width, in f32 so the hot loops stay in floating point.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Levels {
    pub qmin: f32,
    pub qmax: f32,
    /// `q_max - q_min = 2^b - 1`, the denominator of both scale formulas.
    pub bit_range: f32,
    pub symmetric: bool,
}

impl Levels {
    pub fn new(bits: u8, symmetric: bool) -> Self {
        let half = (1i32 << (bits - 1)) as f32;
        Self { qmin: -half, qmax: half - 1.0, bit_range: 2.0 * half - 1.0, symmetric }
    }
}

/// Scale and zero point of one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Qp {
    pub scale: f32,
    pub zp: i8,
}

/// compressed-tensors' `calculate_qparams` for a range `lo <= 0 <= hi` (see the module docs).
#[inline]
pub(crate) fn qparams(lo: f32, hi: f32, lv: &Levels) -> Qp {
    if lv.symmetric {
        let absmax = if -lo > hi { -lo } else { hi };
        let scale = absmax / (lv.bit_range / 2.0);
        Qp { scale: nonzero(scale), zp: 0 }
    } else {
        // The zero point is computed from the eps-substituted scale so an all-zero block gets
        // zp = q_min instead of compressed-tensors' 0/0; either way every value decodes to 0.0.
        let scale = nonzero((hi - lo) / lv.bit_range);
        let zp = (lv.qmin - lo / scale).clamp(lv.qmin, lv.qmax);
        Qp { scale, zp: round_code(zp) }
    }
}

#[inline]
fn nonzero(scale: f32) -> f32 {
    if scale == 0.0 {
        f32::EPSILON
    } else {
        scale
    }
}

#[inline(always)]
fn round_code(t: f32) -> i8 {
    ((t + MAGIC).to_bits() as i32).wrapping_sub(MAGIC_BITS) as i8
}

/// Clamped, rounded code of `v` as (float code, integer code); the float form feeds the dequantization.
#[inline(always)]
fn quant_one(v: f32, scale: f32, zp: f32, lv: &Levels) -> (f32, i8) {
    let mut t = v / scale + zp;
    // Comparisons (not f32::max/min) compile to maxps/minps without NaN fix-ups; inputs are finite.
    t = if t < lv.qmin { lv.qmin } else { t };
    t = if t > lv.qmax { lv.qmax } else { t };
    let y = t + MAGIC;
    ((y - MAGIC), (y.to_bits() as i32).wrapping_sub(MAGIC_BITS) as i8)
}

/// min(x, 0), max(x, 0) and whether every value is finite, in one vectorisable pass.
#[inline]
pub(crate) fn min_max_finite(x: &[f32]) -> (f32, f32, bool) {
    const L: usize = 8;
    // Starting at 0 applies compressed-tensors' "the range must contain 0" for free.
    let (mut mn, mut mx, mut bad) = ([0f32; L], [0f32; L], [0f32; L]);
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let v = c[i];
            mn[i] = if v < mn[i] { v } else { mn[i] };
            mx[i] = if v > mx[i] { v } else { mx[i] };
            // v * 0 is +-0 for finite v and NaN for NaN or +-Inf; NaN then sticks in the sum.
            bad[i] += v * 0.0;
        }
    }
    for &v in rest {
        mn[0] = if v < mn[0] { v } else { mn[0] };
        mx[0] = if v > mx[0] { v } else { mx[0] };
        bad[0] += v * 0.0;
    }
    let lo = mn.iter().fold(0f32, |a, &b| if b < a { b } else { a });
    let hi = mx.iter().fold(0f32, |a, &b| if b > a { b } else { a });
    (lo, hi, bad.iter().all(|&b| b == 0.0))
}

/// Writes codes and dequantized values of one block.
#[inline]
pub(crate) fn quantize_block(x: &[f32], codes: &mut [i8], deq: &mut [f32], qp: Qp, lv: &Levels) {
    let zp = qp.zp as f32;
    for ((&v, c), d) in x.iter().zip(codes.iter_mut()).zip(deq.iter_mut()) {
        let (q, code) = quant_one(v, qp.scale, zp, lv);
        *c = code;
        *d = (q - zp) * qp.scale;
    }
}

/// Sum of squared reconstruction errors of `x` under `qp`, with exactly the arithmetic of
/// [`quantize_block`] (so the search's choice is the error the output will have).
#[inline]
pub(crate) fn block_sq_error(x: &[f32], qp: Qp, lv: &Levels) -> f64 {
    const L: usize = 8;
    let zp = qp.zp as f32;
    let mut acc = [0f32; L];
    let chunks = x.chunks_exact(L);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..L {
            let (q, _) = quant_one(c[i], qp.scale, zp, lv);
            let e = (q - zp) * qp.scale - c[i];
            acc[i] += e * e;
        }
    }
    let mut total: f64 = acc.iter().map(|&a| a as f64).sum();
    for &v in rest {
        let (q, _) = quant_one(v, qp.scale, zp, lv);
        let e = (q - zp) * qp.scale - v;
        total += (e * e) as f64;
    }
    total
}

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
/// into `dequant`. Errors name the offending parameter or the flat index of the first NaN/Inf.
pub fn quantize_into(
    data: &[f32],
    rows: usize,
    cols: usize,
    p: &IntParams,
    q: &mut IntQuantized,
    dequant: &mut [f32],
) -> Result<(), QuantError> {
    let blk = validate(data.len(), dequant.len(), rows, cols, p)?;
    let lv = Levels::new(p.bits, p.symmetric);
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
            .map(min_max_finite)
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
        (q.codes.par_chunks_mut(task), dequant.par_chunks_mut(task), data.par_chunks(task))
            .into_par_iter()
            .for_each(|(c, d, x)| quantize_block(x, c, d, qp, &lv));
        return Ok(());
    }

    let per_task_scales = task / blk;
    let mse = p.search == ScaleSearch::Mse;
    let work = |x: &[f32], c: &mut [i8], d: &mut [f32], s: &mut [f32], mut z: Option<&mut [i8]>| {
        let blocks = x.chunks_exact(blk).zip(c.chunks_exact_mut(blk)).zip(d.chunks_exact_mut(blk));
        for (i, ((xb, cb), db)) in blocks.enumerate() {
            let (lo, hi, finite) = min_max_finite(xb);
            if !finite {
                return Err(());
            }
            let qp = if mse { search::block_range(xb, lo, hi, &lv) } else { qparams(lo, hi, &lv) };
            quantize_block(xb, cb, db, qp, &lv);
            s[i] = qp.scale;
            if let Some(z) = z.as_deref_mut() {
                z[i] = qp.zp;
            }
        }
        Ok(())
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
    outcome.map_err(|()| first_non_finite(data))
}

/// Allocating convenience over [`quantize_into`]: returns the quantized tensor and its dequantization.
pub fn quantize(data: &[f32], rows: usize, cols: usize, p: &IntParams) -> Result<(IntQuantized, Vec<f32>), QuantError> {
    let mut q = IntQuantized::default();
    let mut dequant = vec![0f32; data.len()];
    quantize_into(data, rows, cols, p, &mut q, &mut dequant)?;
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
