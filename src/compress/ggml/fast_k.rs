//! Q4_K, Q5_K and Q6_K quantizers producing llama.cpp's exact bytes.
//!
//! A port of ggml's `quantize_row_q{4,5,6}_K_ref`, `make_qkx2_quants` and `make_qx_quants`
//! (`ggml/src/ggml-quants.c` in the llama.cpp bundled with llama-cpp-python 0.3.36), the code
//! `llama-quantize` runs without an importance matrix: the same operations in the same order, so
//! the same floats and bytes (checked against llama-quantize by `tests/python/check_llama_cpp.py`).
//! candle 0.11's `from_float` still runs ggml's older `make_qkx1_quants` (and an older
//! `make_qx_quants`), which give other, slightly worse bytes; candle reads both.

use half::f16;

const QK_K: usize = 256;
/// Q4_K block: d, dmin (f16), 12 bytes of 6-bit scales/mins, 128 bytes of 4-bit values.
pub(super) const Q4K_BYTES: usize = 4 + 12 + QK_K / 2;
/// Q5_K block: as Q4_K plus 32 bytes of high bits.
pub(super) const Q5K_BYTES: usize = 4 + 12 + QK_K / 8 + QK_K / 2;

/// Sub-blocks of 32 values per super-block.
const SUBS: usize = QK_K / 32;

/// ggml's `nearest_int`: round half to even through the float adder (|v| < 2^22).
#[inline(always)]
fn nearest_int(v: f32) -> i32 {
    ((v + 12_582_912.0).to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// ggml's `make_qkx2_quants` (`ggml/src/ggml-quants.c`) for the 8 sub-blocks of a
/// super-block at once: an affine fit `scale * L + min` of 32 values under `weights`, refined
/// over `nstep + 1` candidate inverse scales. Lane k runs exactly the scalar operation sequence
/// of sub-block k (the same sequential f32 sums, so the same floats and bytes as ggml); eight
/// independent chains side by side hide the latency of each and vectorise across lanes.
/// `xt[i][k]` is value i of sub-block k. Returns per lane (scale, -min) and the levels `l[i][k]`.
#[inline(always)]
fn make_qkx2_quants_x8(
    nmax: i32,
    xt: &[[f32; SUBS]; 32],
    wt: &[[f32; SUBS]; 32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> ([f32; SUBS], [f32; SUBS], [[u8; SUBS]; 32]) {
    let (mut min, mut max) = (xt[0], xt[0]);
    let mut sum_w = wt[0];
    let mut sum_x = [0f32; SUBS];
    for k in 0..SUBS {
        sum_x[k] = sum_w[k] * xt[0][k];
    }
    for i in 1..32 {
        for k in 0..SUBS {
            let (x, w) = (xt[i][k], wt[i][k]);
            if x < min[k] {
                min[k] = x;
            }
            if x > max[k] {
                max[k] = x;
            }
            sum_w[k] += w;
            sum_x[k] += w * x;
        }
    }
    let mut flat = [false; SUBS];
    let (mut iscale, mut scale) = ([0f32; SUBS], [0f32; SUBS]);
    for k in 0..SUBS {
        if min[k] > 0.0 {
            min[k] = 0.0;
        }
        flat[k] = max[k] == min[k];
        iscale[k] = nmax as f32 / (max[k] - min[k]);
        scale[k] = 1.0 / iscale[k];
    }
    let mut l = [[0u8; SUBS]; 32];
    let mut best_error = [0f32; SUBS];
    for i in 0..32 {
        for k in 0..SUBS {
            let q = nearest_int(iscale[k] * (xt[i][k] - min[k])).clamp(0, nmax);
            l[i][k] = q as u8;
            let diff = scale[k] * q as f32 + min[k] - xt[i][k];
            best_error[k] += wt[i][k] * (diff * diff);
        }
    }
    let mut laux = [[0u8; SUBS]; 32];
    for is in 0..=nstep {
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0f32; SUBS], [0f32; SUBS], [0f32; SUBS]);
        for k in 0..SUBS {
            iscale[k] = (rmin + rdelta * is as f32 + nmax as f32) / (max[k] - min[k]);
        }
        // `min` changes when a step wins, so the levels use the lane's current one, as the C does.
        for i in 0..32 {
            for k in 0..SUBS {
                let q = nearest_int(iscale[k] * (xt[i][k] - min[k])).clamp(0, nmax);
                laux[i][k] = q as u8;
                let (w, q) = (wt[i][k], q as f32);
                sum_l[k] += w * q;
                sum_l2[k] += w * q * q;
                sum_xl[k] += w * q * xt[i][k];
            }
        }
        let (mut this_scale, mut this_min, mut ok) = ([0f32; SUBS], [0f32; SUBS], [false; SUBS]);
        for k in 0..SUBS {
            let d = sum_w[k] * sum_l2[k] - sum_l[k] * sum_l[k];
            ok[k] = d > 0.0;
            this_scale[k] = (sum_w[k] * sum_xl[k] - sum_x[k] * sum_l[k]) / d;
            this_min[k] = (sum_l2[k] * sum_x[k] - sum_l[k] * sum_xl[k]) / d;
            if this_min[k] > 0.0 {
                this_min[k] = 0.0;
                this_scale[k] = sum_xl[k] / sum_l2[k];
            }
        }
        let mut cur_error = [0f32; SUBS];
        for i in 0..32 {
            for k in 0..SUBS {
                let diff = this_scale[k] * laux[i][k] as f32 + this_min[k] - xt[i][k];
                cur_error[k] += wt[i][k] * (diff * diff);
            }
        }
        let mut take = [false; SUBS];
        for k in 0..SUBS {
            take[k] = ok[k] && cur_error[k] < best_error[k];
            if take[k] {
                best_error[k] = cur_error[k];
                scale[k] = this_scale[k];
                min[k] = this_min[k];
            }
        }
        for i in 0..32 {
            for k in 0..SUBS {
                if take[k] {
                    l[i][k] = laux[i][k];
                }
            }
        }
    }
    let (mut scales, mut mins) = ([0f32; SUBS], [0f32; SUBS]);
    for k in 0..SUBS {
        // max == min: ggml returns scale 0 and -min with all levels 0.
        if flat[k] {
            (scales[k], mins[k]) = (0.0, -min[k]);
            for row in l.iter_mut() {
                row[k] = 0;
            }
        } else {
            (scales[k], mins[k]) = (scale[k], -min[k]);
        }
    }
    (scales, mins, l)
}

fn get_scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The shared part of Q4_K/Q5_K, as `quantize_row_q4_K_ref`/`quantize_row_q5_K_ref` do it
/// (`rmin`, `nstep`: -1.0 and 20 for Q4_K, -0.5 and 15 for Q5_K): writes d, dmin and scales
/// into `head` (16 bytes) and returns the per-value levels 0..=nmax.
#[inline(always)]
fn levels(nmax: i32, rmin: f32, nstep: i32, x: &[f32], head: &mut [u8]) -> [u8; QK_K] {
    let mut xt = [[0f32; SUBS]; 32];
    let mut wt = [[0f32; SUBS]; 32];
    for (k, sub) in x.chunks_exact(32).enumerate() {
        let mut sum_x2 = 0f32;
        for &v in sub {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (i, &v) in sub.iter().enumerate() {
            xt[i][k] = v;
            wt[i][k] = av_x + v.abs();
        }
    }
    let (scales, mins, lq) = make_qkx2_quants_x8(nmax, &xt, &wt, rmin, 0.1, nstep);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..SUBS {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    // The fit's levels stay where a sub-block's scale rounds to 0 (ggml skips it below).
    let mut l = [0u8; QK_K];
    for (i, row) in lq.iter().enumerate() {
        for (k, &q) in row.iter().enumerate() {
            l[32 * k + i] = q;
        }
    }
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let sc = &mut head[4..16];
    sc.fill(0);
    for j in 0..SUBS {
        // `uint8_t ls = nearest_int(...)`: the C truncates to 8 bits before the MIN.
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
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
    for j in 0..SUBS {
        let (s, m) = get_scale_min_k4(j, &head[4..16]);
        let d = d.to_f32() * s as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin.to_f32() * m as f32;
        for (q, &v) in l[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..32 * j + 32]) {
            *q = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
    l
}

#[inline(always)]
fn q4k_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.chunks_exact_mut(Q4K_BYTES)) {
        let (head, qs) = y.split_at_mut(16);
        let l = levels(15, -1.0, 20, x, head);
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
        let l = levels(31, -0.5, 15, x, head);
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

/// Q6_K block: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d (f16).
pub(super) const Q6K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// ggml's `GROUP_MAX_EPS`: a group whose largest magnitude is below it is all zeros.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Groups of 16 values per Q6_K super-block.
const GROUPS: usize = QK_K / 16;

/// ggml's `make_qx_quants(16, 32, x, L, 1, NULL)` as `quantize_row_q6_K_ref` calls it, for the
/// 16 groups of a super-block at once (lane k = group k, each lane the scalar operation order):
/// a symmetric fit weighted by x², searched over 18 inverse scales around the plain one.
/// `xt[i][k]` is value i of group k; returns each group's scale and writes its levels.
#[inline(always)]
fn make_qx_quants_q6_x16(xt: &[[f32; GROUPS]; 16], lt: &mut [[i8; GROUPS]; 16]) -> [f32; GROUPS] {
    const NMAX: i32 = 32;
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-NMAX, NMAX - 1);
    let (mut max, mut amax) = ([0f32; GROUPS], [0f32; GROUPS]);
    for row in xt {
        for k in 0..GROUPS {
            let ax = row[k].abs();
            if ax > amax[k] {
                amax[k] = ax;
                max[k] = row[k];
            }
        }
    }
    let mut iscale = [0f32; GROUPS];
    let (mut sumlx, mut suml2) = ([0f32; GROUPS], [0f32; GROUPS]);
    for k in 0..GROUPS {
        iscale[k] = -(NMAX as f32) / max[k];
    }
    for (row, lrow) in xt.iter().zip(lt.iter_mut()) {
        for k in 0..GROUPS {
            let v = row[k];
            let lv = level(iscale[k], v);
            lrow[k] = (lv + NMAX) as i8;
            let w = v * v;
            sumlx[k] += w * v * lv as f32;
            suml2[k] += w * lv as f32 * lv as f32;
        }
    }
    let (mut scale, mut best) = ([0f32; GROUPS], [0f32; GROUPS]);
    for k in 0..GROUPS {
        scale[k] = if suml2[k] != 0.0 { sumlx[k] / suml2[k] } else { 0.0 };
        best[k] = scale[k] * sumlx[k];
    }
    for is in -9i32..=9 {
        if is == 0 {
            continue;
        }
        let (mut slx, mut sl2) = ([0f32; GROUPS], [0f32; GROUPS]);
        for k in 0..GROUPS {
            iscale[k] = -(NMAX as f32 + 0.1 * is as f32) / max[k];
        }
        for row in xt {
            for k in 0..GROUPS {
                let v = row[k];
                let lv = level(iscale[k], v) as f32;
                let w = v * v;
                slx[k] += w * v * lv;
                sl2[k] += w * lv * lv;
            }
        }
        let mut take = [false; GROUPS];
        for k in 0..GROUPS {
            take[k] = sl2[k] > 0.0 && slx[k] * slx[k] > best[k] * sl2[k];
            if take[k] {
                scale[k] = slx[k] / sl2[k];
                best[k] = scale[k] * slx[k];
            }
        }
        if take.iter().any(|&t| t) {
            for (row, lrow) in xt.iter().zip(lt.iter_mut()) {
                for k in 0..GROUPS {
                    if take[k] {
                        lrow[k] = (level(iscale[k], row[k]) + NMAX) as i8;
                    }
                }
            }
        }
    }
    for k in 0..GROUPS {
        // All (near) zero: ggml returns 0 with every level 0.
        if amax[k] < GROUP_MAX_EPS {
            scale[k] = 0.0;
            for lrow in lt.iter_mut() {
                lrow[k] = 0;
            }
        }
    }
    scale
}

/// ggml's `quantize_row_q6_K_ref` on whole super-blocks.
#[inline(always)]
fn q6k_blocks(xs: &[f32], ys: &mut [u8]) {
    for (x, y) in xs.chunks_exact(QK_K).zip(ys.chunks_exact_mut(Q6K_BYTES)) {
        let mut xt = [[0f32; GROUPS]; 16];
        for (k, group) in x.chunks_exact(16).enumerate() {
            for (i, &v) in group.iter().enumerate() {
                xt[i][k] = v;
            }
        }
        let mut lt = [[0i8; GROUPS]; 16];
        let scales = make_qx_quants_q6_x16(&xt, &mut lt);
        let mut l = [0i8; QK_K];
        for (i, row) in lt.iter().enumerate() {
            for (k, &q) in row.iter().enumerate() {
                l[16 * k + i] = q;
            }
        }
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for &scale in &scales {
            if scale.abs() > max_abs_scale {
                max_abs_scale = scale.abs();
                max_scale = scale;
            }
        }
        y.fill(0);
        if max_abs_scale < GROUP_MAX_EPS {
            continue;
        }
        let (ql_qh, rest) = y.split_at_mut(QK_K / 2 + QK_K / 4);
        let (sc, d_bytes) = rest.split_at_mut(QK_K / 16);
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        d_bytes.copy_from_slice(&d.to_le_bytes());
        for (s, &scale) in sc.iter_mut().zip(&scales) {
            *s = nearest_int(iscale * scale).min(127) as i8 as u8;
        }
        for j in 0..GROUPS {
            let dj = d.to_f32() * sc[j] as i8 as f32;
            if dj == 0.0 {
                continue;
            }
            for ii in 0..16 {
                l[16 * j + ii] = (nearest_int(x[16 * j + ii] / dj).clamp(-32, 31) + 32) as i8;
            }
        }
        let (ql, qh) = ql_qh.split_at_mut(QK_K / 2);
        for (n, j) in (0..QK_K).step_by(128).enumerate() {
            let (ql, qh) = (&mut ql[64 * n..64 * n + 64], &mut qh[32 * n..32 * n + 32]);
            for i in 0..32 {
                let q = |k: usize| l[j + i + k] as u8;
                ql[i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[i] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn q6k_avx2(xs: &[f32], ys: &mut [u8]) {
    q6k_blocks(xs, ys)
}

/// Quantizes whole Q6_K super-blocks `xs` into `ys` (`xs.len() / 256 * 210` bytes).
pub(super) fn quantize_q6k(xs: &[f32], ys: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { q6k_avx2(xs, ys) };
    }
    q6k_blocks(xs, ys)
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

/// The portable Q6_K version, for tests that compare both paths on an AVX2 machine.
#[cfg(test)]
pub(super) fn quantize_portable_q6k(xs: &[f32], ys: &mut [u8]) {
    q6k_blocks(xs, ys)
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
