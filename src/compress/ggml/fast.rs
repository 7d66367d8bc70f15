//! Hand-written Q8_0 quantizer that produces candle's exact bytes, faster.
//!
//! candle's loop (ggml's reference `quantize_row_q8_0`) keeps a sequential max and calls
//! `f32::round`, a libm call per value on baseline x86_64. The same arithmetic written with lane
//! accumulators and an exact integer rounding vectorises; it is also compiled for AVX2 and picked at
//! run time: one thread, 64 MiB, 2,250 MiB/s against candle's 1,083 (`benches/quant_gguf.rs`).
//! A Q4_0 port was no faster than candle's kernel (2,189 vs 2,187 MiB/s), so Q4_0 uses candle's.

use half::f16;

const QK: usize = 32;
/// Bytes of one block: f16 scale + 32 signed 8-bit values.
const Q8_0_BYTES: usize = 2 + QK;

/// max |x| over a block, ignoring NaN like `f32::max` does; 8 lanes so it maps to vector max.
#[inline(always)]
fn abs_max(xs: &[f32; QK]) -> f32 {
    let mut lanes = [0f32; 8];
    for chunk in xs.chunks_exact(8) {
        for (m, &x) in lanes.iter_mut().zip(chunk) {
            let a = x.abs();
            *m = if a > *m { a } else { *m };
        }
    }
    lanes.into_iter().fold(0f32, |m, a| if a > m { a } else { m })
}

/// `f32::round` (half away from zero) as integer arithmetic: exact for |v| < 2^23, NaN -> 0.
#[inline(always)]
fn round_half_away(v: f32) -> i32 {
    let t = v as i32;
    let frac = v - t as f32;
    t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)
}

#[inline(always)]
fn q8_0_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK).zip(ys.chunks_exact_mut(Q8_0_BYTES)) {
        let x: &[f32; QK] = x.try_into().expect("chunks_exact gives whole blocks");
        let d = abs_max(x) / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        for (q, &v) in y[2..].iter_mut().zip(x) {
            // The clamp reproduces `round(v) as i8` saturating when 1/d overflows to infinity
            // (all |x| < 4e-37); clamp keeps NaN, which rounds to 0 as in the reference.
            *q = round_half_away((v * id).clamp(-128.0, 127.0)) as i8 as u8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q8_0_avx2(xs: &[f32], ys: &mut [u8]) {
    q8_0_blocks(xs, ys)
}

/// Quantizes whole Q8_0 blocks `xs` into `ys` (`xs.len() / 32 * 34` bytes).
pub(super) fn quantize_q8_0(xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q8_0_avx2(xs, ys) };
    }
    q8_0_blocks(xs, ys)
}

#[inline(always)]
fn q8_0_decode_blocks(xs: &[u8], ys: &mut [f32]) {
    for (x, y) in xs.chunks_exact(Q8_0_BYTES).zip(ys.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([x[0], x[1]]).to_f32();
        for (o, &q) in y.iter_mut().zip(&x[2..]) {
            // candle's BlockQ8_0::to_float: `qs[j] as f32 * d`, the same product bit for bit.
            *o = q as i8 as f32 * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q8_0_decode_avx2(xs: &[u8], ys: &mut [f32]) {
    q8_0_decode_blocks(xs, ys)
}

/// Decodes whole Q8_0 blocks `xs` into `ys` exactly as candle's `to_float` does, vectorised
/// (candle's loop is scalar: 6% of a whole Q8_0 job's CPU went to it).
pub(super) fn dequantize_q8_0(xs: &[u8], ys: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q8_0_decode_avx2(xs, ys) };
    }
    q8_0_decode_blocks(xs, ys)
}

/// Bytes of one Q4_0 block: f16 scale + 16 bytes of 4-bit codes.
const Q4_0_BYTES: usize = 2 + QK / 2;

#[inline(always)]
fn q4_0_decode_blocks(xs: &[u8], ys: &mut [f32]) {
    for (x, y) in xs.chunks_exact(Q4_0_BYTES).zip(ys.chunks_exact_mut(QK)) {
        let d = f16::from_le_bytes([x[0], x[1]]).to_f32();
        let (lo, hi) = y.split_at_mut(QK / 2);
        // candle's BlockQ4_0::to_float: low nibbles are values 0..16, high nibbles 16..32,
        // each `(nibble as i16 - 8) as f32 * d`.
        for ((l, h), &q) in lo.iter_mut().zip(hi.iter_mut()).zip(&x[2..]) {
            *l = ((q & 0x0F) as i16 - 8) as f32 * d;
            *h = ((q >> 4) as i16 - 8) as f32 * d;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q4_0_decode_avx2(xs: &[u8], ys: &mut [f32]) {
    q4_0_decode_blocks(xs, ys)
}

/// Decodes whole Q4_0 blocks exactly as candle's `to_float`, with one f16 conversion per block
/// and a vectorisable loop (candle's took 12% of a whole Q4_0 job's CPU).
pub(super) fn dequantize_q4_0(xs: &[u8], ys: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q4_0_decode_avx2(xs, ys) };
    }
    q4_0_decode_blocks(xs, ys)
}

/// The portable version, for tests that compare both paths on an AVX2 machine.
#[cfg(test)]
pub(super) fn quantize_portable(xs: &[f32], ys: &mut [u8]) {
    q8_0_blocks(xs, ys)
}
