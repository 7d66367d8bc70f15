//! Hand-written Q8_0 and Q4_0 quantizers that produce candle's exact bytes, faster.
//!
//! candle's loops (ggml's reference `quantize_row_q8_0/q4_0`) keep a sequential max and call
//! `f32::round`, a libm call per value on baseline x86_64. The same arithmetic written with lane
//! accumulators and an exact integer rounding vectorises; it is also compiled for AVX2 and picked at
//! run time. Figures are in the benchmark report (`benches/quant_gguf.rs`).

use half::f16;

const QK: usize = 32;
/// Bytes of one block: f16 scale + 32 values (8 or 4 bits).
pub(super) const Q8_0_BYTES: usize = 2 + QK;
pub(super) const Q4_0_BYTES: usize = 2 + QK / 2;

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
            *q = round_half_away(v * id) as i8 as u8;
        }
    }
}

#[inline(always)]
fn q4_0_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK).zip(ys.chunks_exact_mut(Q4_0_BYTES)) {
        let x: &[f32; QK] = x.try_into().expect("chunks_exact gives whole blocks");
        let amax = abs_max(x);
        // The reference keeps the signed value of the FIRST element of largest magnitude, and
        // +0.0 for an all-zero block (the sign of d is stored).
        let max = if amax > 0.0 {
            x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0)
        } else {
            0.0
        };
        let d = max / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        y[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        let (lo, hi) = x.split_at(QK / 2);
        for ((q, &a), &b) in y[2..].iter_mut().zip(lo).zip(hi) {
            // `as i32` saturates and maps NaN to 0 like the reference's `as u8`; clamp = min(15, _).
            let qa = ((a * id + 8.5) as i32).clamp(0, 15) as u8;
            let qb = ((b * id + 8.5) as i32).clamp(0, 15) as u8;
            *q = qa | (qb << 4);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q8_0_avx2(xs: &[f32], ys: &mut [u8]) {
    q8_0_blocks(xs, ys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q4_0_avx2(xs: &[f32], ys: &mut [u8]) {
    q4_0_blocks(xs, ys)
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

/// Quantizes whole Q4_0 blocks `xs` into `ys` (`xs.len() / 32 * 18` bytes).
pub(super) fn quantize_q4_0(xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q4_0_avx2(xs, ys) };
    }
    q4_0_blocks(xs, ys)
}

/// The portable versions, for tests that compare both paths on an AVX2 machine.
#[cfg(test)]
pub(super) fn quantize_portable(q8: bool, xs: &[f32], ys: &mut [u8]) {
    if q8 {
        q8_0_blocks(xs, ys)
    } else {
        q4_0_blocks(xs, ys)
    }
}
