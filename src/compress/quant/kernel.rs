//! Per-block arithmetic shared by RTN and the MSE search, compiled twice: baseline SSE2 and AVX2.
//!
//! The crate is built for the x86-64 baseline (no `target-cpu`), where these loops run 4 lanes wide; the
//! `multiversion!` entry points re-instantiate the same inlined bodies with AVX2 enabled (8 lanes) and pick
//! one at run time. No FMA contraction happens in either (Rust never contracts `a * b + c`), so both
//! versions give bit-identical results.

use super::search;
use super::StoreDtype;

/// Defines `pub(crate) fn $name` whose body is compiled for the baseline and for AVX2, dispatched at run time.
macro_rules! multiversion {
    ($(#[$m:meta])* fn $name:ident / $baseline:ident ($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        /// The baseline (non-AVX2) instantiation, so tests can compare both versions on any CPU.
        #[cfg(test)]
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $baseline($($arg: $ty),*) -> $ret $body
        multiversion! { $(#[$m])* fn $name($($arg: $ty),*) -> $ret $body }
    };
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                #[allow(clippy::too_many_arguments)]
                fn avx2($($arg: $ty),*) -> $ret {
                    body($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: `avx2` only needs the AVX2 instructions the CPU was just checked to have.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Adding 1.5 * 2^23 to |t| < 2^22 leaves round_half_even(t) in the low mantissa bits: this rounds like
/// `torch.round` and converts to an integer with plain SSE2 adds (`round_ties_even` is a libm call
/// without SSE4.1, and `as i8` adds NaN/saturation fix-ups that stop vectorisation).
const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4B40_0000;

/// Integer range of one bit width, in f32 so the hot loops stay in floating point, and the float
/// type the scales (and the dequantized values) are stored in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Levels {
    pub qmin: f32,
    pub qmax: f32,
    /// `q_max - q_min = 2^b - 1`, the denominator of both scale formulas.
    pub bit_range: f32,
    pub symmetric: bool,
    pub store: StoreDtype,
}

impl Levels {
    pub fn new(bits: u8, symmetric: bool, store: StoreDtype) -> Self {
        let half = (1i32 << (bits - 1)) as f32;
        Self { qmin: -half, qmax: half - 1.0, bit_range: 2.0 * half - 1.0, symmetric, store }
    }
}

/// Scale, zero point and usable code range of one block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Qp {
    /// Exactly representable in the store dtype, positive and finite.
    pub scale: f32,
    pub zp: i8,
    /// Codes in `[qlo, qhi]` decode to values the store dtype holds as finite numbers; this is
    /// `[q_min, q_max]` except for blocks within ~2^b steps of the dtype's largest value.
    pub qlo: f32,
    pub qhi: f32,
}

impl Qp {
    pub const ZERO: Qp = Qp { scale: 0.0, zp: 0, qlo: 0.0, qhi: 0.0 };
}

/// compressed-tensors' `calculate_qparams` for a range `lo <= 0 <= hi` (see the module docs), with
/// the scale rounded to the dtype it is stored in before any code is computed, so codes, the
/// stored scale and every decode agree exactly.
#[inline(always)]
pub(crate) fn qparams(lo: f32, hi: f32, lv: &Levels) -> Qp {
    let (scale, zp) = if lv.symmetric {
        let absmax = if -lo > hi { -lo } else { hi };
        (lv.store.scale(absmax / (lv.bit_range / 2.0)), 0.0)
    } else {
        // The width can exceed f32's range (lo = -3e38, hi = 3e38): divide in f64. The zero point
        // is computed from the stored scale, so an all-zero block gets zp = q_min instead of
        // compressed-tensors' 0/0; either way every value decodes to 0.0.
        let scale = lv.store.scale(((hi as f64 - lo as f64) / lv.bit_range as f64) as f32);
        let zp = (lv.qmin - lo / scale).clamp(lv.qmin, lv.qmax);
        (scale, round_code(zp) as f32)
    };
    // |q - zp| <= reach keeps (q - zp) * scale within the store dtype's largest finite value.
    let reach = (lv.store.max() / scale).floor();
    Qp { scale, zp: zp as i8, qlo: lv.qmin.max(zp - reach), qhi: lv.qmax.min(zp + reach) }
}

#[inline(always)]
fn round_code(t: f32) -> i8 {
    ((t + MAGIC).to_bits() as i32).wrapping_sub(MAGIC_BITS) as i8
}

/// Clamped, rounded code of `v` as (float code, integer code); the float form feeds the dequantization.
#[inline(always)]
fn quant_one(v: f32, qp: &Qp, zp: f32) -> (f32, i8) {
    clamp_round(v / qp.scale + zp, qp)
}

#[inline(always)]
fn clamp_round(mut t: f32, qp: &Qp) -> (f32, i8) {
    // Comparisons (not f32::max/min) compile to maxps/minps without NaN fix-ups; inputs are finite.
    t = if t < qp.qlo { qp.qlo } else { t };
    t = if t > qp.qhi { qp.qhi } else { t };
    let y = t + MAGIC;
    ((y - MAGIC), (y.to_bits() as i32).wrapping_sub(MAGIC_BITS) as i8)
}

/// Maps f32 bits to an i32 with the same order as the floats (NaNs land beyond the infinities), so
/// min/max become integer reductions, which LLVM vectorises; float min/max reductions it does not
/// without fast-math (the lane-array version compiled to shuffles and ran at 1/4 of the speed).
#[inline(always)]
fn order_key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ (((b >> 31) as u32) >> 1) as i32
}

#[inline(always)]
fn from_order_key(k: i32) -> f32 {
    f32::from_bits((k ^ (((k >> 31) as u32) >> 1) as i32) as u32)
}

/// min(x, 0), max(x, 0) and whether every value is finite, in one vectorisable pass.
#[inline(always)]
pub(crate) fn min_max_finite(x: &[f32]) -> (f32, f32, bool) {
    // Starting at key(0.0) = 0 applies compressed-tensors' "the range must contain 0" for free.
    let (mut lo, mut hi) = (0i32, 0i32);
    for &v in x {
        let k = order_key(v);
        lo = lo.min(k);
        hi = hi.max(k);
    }
    // Keys beyond +-Inf's are NaNs; +-Inf themselves are refused too.
    let finite = hi < order_key(f32::INFINITY) && lo > order_key(f32::NEG_INFINITY);
    (from_order_key(lo), from_order_key(hi), finite)
}

/// Writes codes and dequantized values of one block.
#[inline(always)]
pub(crate) fn quantize_block(x: &[f32], codes: &mut [i8], deq: &mut [f32], qp: Qp) {
    let zp = qp.zp as f32;
    for ((&v, c), d) in x.iter().zip(codes.iter_mut()).zip(deq.iter_mut()) {
        let (q, code) = quant_one(v, &qp, zp);
        *c = code;
        *d = (q - zp) * qp.scale;
    }
}

/// Sum of squared reconstruction errors of `x` under `qp`. `EXACT` uses the arithmetic of
/// [`quantize_block`] (`x / scale`); otherwise `x * (1 / scale)`, which may round a tie differently but
/// runs the search about 1.5x faster (division is half the loop's cost).
#[inline(always)]
pub(crate) fn block_sq_error<const EXACT: bool>(x: &[f32], qp: Qp) -> f64 {
    // Squared errors go through a small stack buffer: the map loop vectorises like `quantize_block`,
    // and the buffer is then summed in 8 f32 lanes (a float sum cannot be vectorised in place
    // without reassociation).
    const TMP: usize = 64;
    const L: usize = 8;
    let zp = qp.zp as f32;
    let inv = 1.0 / qp.scale;
    let mut tmp = [0f32; TMP];
    let mut lanes = [0f32; L];
    let mut total = 0f64;
    for chunk in x.chunks(TMP) {
        for (t, &v) in tmp.iter_mut().zip(chunk) {
            let (q, _) = if EXACT { quant_one(v, &qp, zp) } else { clamp_round(v * inv + zp, &qp) };
            let e = (q - zp) * qp.scale - v;
            *t = e * e;
        }
        if chunk.len() == TMP {
            for c in tmp.chunks_exact(L) {
                for i in 0..L {
                    lanes[i] += c[i];
                }
            }
        } else {
            total += tmp[..chunk.len()].iter().map(|&e| e as f64).sum::<f64>();
        }
    }
    total + lanes.iter().map(|&a| a as f64).sum::<f64>()
}

multiversion! {
    /// Quantizes whole blocks of `blk` values (rows never straddle blocks): min/max, optional MSE search,
    /// quantize + dequantize. `Err` means a NaN/Inf was seen; the caller locates the first one.
    fn blocks_chunk / blocks_chunk_baseline(
        x: &[f32],
        codes: &mut [i8],
        deq: &mut [f32],
        scales: &mut [f32],
        zps: Option<&mut [i8]>,
        blk: usize,
        lv: &Levels,
        mse: bool,
    ) -> Result<(), ()> {
        let mut zps = zps;
        let blocks = x.chunks_exact(blk).zip(codes.chunks_exact_mut(blk)).zip(deq.chunks_exact_mut(blk));
        for (i, ((xb, cb), db)) in blocks.enumerate() {
            let (lo, hi, finite) = min_max_finite(xb);
            if !finite {
                return Err(());
            }
            let qp = if mse { search::block_range(xb, lo, hi, lv) } else { qparams(lo, hi, lv) };
            quantize_block(xb, cb, db, qp);
            scales[i] = qp.scale;
            if let Some(z) = zps.as_deref_mut() {
                z[i] = qp.zp;
            }
        }
        Ok(())
    }
}

multiversion! {
    /// [`min_max_finite`] of a chunk of a tensor quantized with one scale.
    fn min_max_chunk(x: &[f32]) -> (f32, f32, bool) {
        min_max_finite(x)
    }
}

multiversion! {
    /// [`quantize_block`] of a chunk of a tensor quantized with one scale.
    fn quantize_chunk(x: &[f32], codes: &mut [i8], deq: &mut [f32], qp: Qp) -> () {
        quantize_block(x, codes, deq, qp)
    }
}

multiversion! {
    /// Squared error of `x` under each candidate (the whole-tensor MSE search).
    fn errors_chunk(x: &[f32], cands: &[Qp], errs: &mut [f64], exact: bool) -> () {
        for (c, e) in cands.iter().zip(errs.iter_mut()) {
            *e = if exact { block_sq_error::<true>(x, *c) } else { block_sq_error::<false>(x, *c) };
        }
    }
}
