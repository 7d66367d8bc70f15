//! Hand-written Q4_K and Q5_K quantizers producing candle's exact bytes.
//!
//! A line-by-line port of candle 0.11's `BlockQ4K/BlockQ5K::from_float` and `make_qkx1_quants`
//! (same operations in the same order, so the same floats), minus what made them slow: a heap
//! `Vec` per 32 values and a libm `roundf` call per value per refinement step (up to 6 per value).
//! Rounding here is exact integer arithmetic, the 8 sub-blocks of a super-block are refined side by
//! side, and the AVX2 build is picked at run time. One thread, 64 MiB: Q4_K 455 MiB/s against
//! candle's 152, Q5_K 321 against 133 (`benches/quant_gguf.rs`).

use half::f16;

const QK_K: usize = 256;
/// Q4_K block: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values.
pub(super) const Q4K_BYTES: usize = 4 + 12 + QK_K / 2;
/// Q5_K block: as Q4_K plus 32 bytes of high bits.
pub(super) const Q5K_BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;

/// `(v.round() as i32).clamp(0, nmax)` without libm: clamping first keeps the integer rounding in
/// its exact range (|v| < 2^23) and maps NaN to 0 as the original does.
#[inline(always)]
fn round_clamped(v: f32, nmax: i32) -> i32 {
    let v = v.max(-1.0).min((nmax + 1) as f32);
    let t = v as i32;
    let frac = v - t as f32;
    (t + i32::from(frac >= 0.5) - i32::from(frac <= -0.5)).clamp(0, nmax)
}

/// Sub-blocks of 32 values per super-block, processed as 8 SIMD lanes.
const SUBS: usize = QK_K / 32;
/// Refinement steps of candle's `make_qkx1_quants` for Q4_K/Q5_K.
const NTRY: usize = 5;

/// Orders floats like `f32::total_cmp`, as integers (vectorises, unlike `total_cmp` itself).
#[inline(always)]
fn total_key(v: f32) -> i32 {
    let b = v.to_bits() as i32;
    b ^ ((((b >> 31) as u32) >> 1) as i32)
}

/// candle's `make_qkx1_quants(nmax, 5, sub)` for the 8 sub-blocks of a super-block at once.
///
/// Lane k runs exactly the scalar operation sequence of sub-block k (same order of the
/// sequential f32 sums, so the same floats); a lane whose levels stop changing freezes after the
/// step that noticed it, as the scalar loop breaks. The scalar version's time is latency of two
/// 32-long dependent add chains per step; eight independent chains side by side hide it.
#[inline(always)]
fn make_qkx1_quants_x8(nmax: i32, x: &[f32]) -> ([f32; SUBS], [f32; SUBS]) {
    let mut xt = [[0f32; SUBS]; 32];
    for (k, sub) in x.chunks_exact(32).enumerate() {
        for (i, &v) in sub.iter().enumerate() {
            xt[i][k] = v;
        }
    }
    // min_by/max_by(total_cmp): values with equal keys are bit-identical, so which one wins a
    // tie does not matter.
    let (mut lo, mut hi) = (xt[0], xt[0]);
    for row in &xt[1..] {
        for k in 0..SUBS {
            if total_key(row[k]) < total_key(lo[k]) {
                lo[k] = row[k];
            }
            if total_key(row[k]) > total_key(hi[k]) {
                hi[k] = row[k];
            }
        }
    }
    let mut done = [false; SUBS];
    let (mut min, mut scale, mut iscale) = ([0f32; SUBS], [0f32; SUBS], [0f32; SUBS]);
    for k in 0..SUBS {
        // max == min: the scalar version returns (0, 0) before refining.
        done[k] = hi[k] == lo[k];
        min[k] = lo[k].min(0.);
        iscale[k] = nmax as f32 / (hi[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let flat = done;
    let mut l = [[0i32; SUBS]; 32];
    for _ in 0..NTRY {
        if done.iter().all(|&d| d) {
            break;
        }
        let (mut sumlx, mut suml2, mut changed) = ([0f32; SUBS], [0i32; SUBS], [false; SUBS]);
        for (row, lrow) in xt.iter().zip(l.iter_mut()) {
            for k in 0..SUBS {
                let li = round_clamped(iscale[k] * (row[k] - min[k]), nmax);
                changed[k] |= li != lrow[k];
                lrow[k] = li;
                sumlx[k] += (row[k] - min[k]) * li as f32;
                suml2[k] += li * li;
            }
        }
        let mut new_scale = [0f32; SUBS];
        for k in 0..SUBS {
            new_scale[k] = sumlx[k] / suml2[k] as f32;
        }
        // `Iterator::sum` for f32 starts from -0.0.
        let mut sum = [-0.0f32; SUBS];
        for (row, lrow) in xt.iter().zip(&l) {
            for k in 0..SUBS {
                sum[k] += row[k] - new_scale[k] * lrow[k] as f32;
            }
        }
        for k in 0..SUBS {
            if done[k] {
                continue;
            }
            scale[k] = new_scale[k];
            min[k] = sum[k] / 32_f32;
            if min[k] > 0.0 {
                min[k] = 0.0;
            }
            iscale[k] = 1.0 / scale[k];
            done[k] = !changed[k];
        }
    }
    let (mut scales, mut mins) = ([0f32; SUBS], [0f32; SUBS]);
    for k in 0..SUBS {
        if !flat[k] {
            (scales[k], mins[k]) = (scale[k], -min[k]);
        }
    }
    (scales, mins)
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared part of Q4_K/Q5_K: writes d, dmin and scales into `head` (16 bytes) and returns
/// the per-value levels 0..=nmax.
#[inline(always)]
fn levels(nmax: i32, x: &[f32], head: &mut [u8]) -> [u8; QK_K] {
    let (scales, mins) = make_qkx1_quants_x8(nmax, x);
    let max_scale = scales.iter().fold(0.0, |max, &val| val.max(max));
    let max_min = mins.iter().fold(0.0, |max, &val| val.max(max));
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut head[4..16];
    sc.fill(0);
    for j in 0..QK_K / 32 {
        let ls = ((inv_scale * scales[j]).round() as i32).min(63) as u8;
        let lm = ((inv_min * mins[j]).round() as i32).min(63) as u8;
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let d = f16::from_f32(max_scale / 63.0);
    let dmin = f16::from_f32(max_min / 63.0);
    head[0..2].copy_from_slice(&d.to_le_bytes());
    head[2..4].copy_from_slice(&dmin.to_le_bytes());

    let mut l = [0u8; QK_K];
    for j in 0..QK_K / 32 {
        let (s, m) = get_scale_min_k4(j, &head[4..16]);
        let d = d.to_f32() * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for (q, &v) in l[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..32 * j + 32]) {
            *q = round_clamped((v + dm) / d, nmax) as u8;
        }
    }
    l
}

#[inline(always)]
fn q4k_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.chunks_exact_mut(Q4K_BYTES)) {
        let (head, qs) = y.split_at_mut(16);
        let l = levels(15, x, head);
        for (n, q) in (0..QK_K).step_by(64).zip(qs.chunks_exact_mut(32)) {
            for (j, b) in q.iter_mut().enumerate() {
                *b = l[n + j] | (l[n + j + 32] << 4);
            }
        }
    }
}

#[inline(always)]
fn q5k_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.chunks_exact_mut(Q5K_BYTES)) {
        let (head, rest) = y.split_at_mut(16);
        let (qh, ql) = rest.split_at_mut(QK_K / 8);
        let l = levels(31, x, head);
        qh.fill(0);
        let (mut m1, mut m2) = (1u8, 2u8);
        for (n, q) in (0..QK_K).step_by(64).zip(ql.chunks_exact_mut(32)) {
            for (j, b) in q.iter_mut().enumerate() {
                let (mut l1, mut l2) = (l[n + j], l[n + j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    qh[j] |= m1;
                }
                if l2 > 15 {
                    l2 -= 16;
                    qh[j] |= m2;
                }
                *b = l1 | (l2 << 4);
            }
            m1 <<= 2;
            m2 <<= 2;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q4k_avx2(xs: &[f32], ys: &mut [u8]) {
    q4k_blocks(xs, ys)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q5k_avx2(xs: &[f32], ys: &mut [u8]) {
    q5k_blocks(xs, ys)
}

/// Quantizes whole Q4_K super-blocks `xs` into `ys` (`xs.len() / 256 * 144` bytes).
pub(super) fn quantize_q4k(xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q4k_avx2(xs, ys) };
    }
    q4k_blocks(xs, ys)
}

/// Quantizes whole Q5_K super-blocks `xs` into `ys` (`xs.len() / 256 * 176` bytes).
pub(super) fn quantize_q5k(xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q5k_avx2(xs, ys) };
    }
    q5k_blocks(xs, ys)
}

/// The portable versions, for tests that compare both paths on an AVX2 machine.
#[cfg(test)]
pub(super) fn quantize_portable(q5: bool, xs: &[f32], ys: &mut [u8]) {
    if q5 {
        q5k_blocks(xs, ys)
    } else {
        q4k_blocks(xs, ys)
    }
}
