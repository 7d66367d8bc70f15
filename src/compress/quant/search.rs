//! MSE clipping search (`ScaleSearch::Mse`), data-free, in the spirit of llm-compressor's MSE observer
//! (which shrinks min/max by factors `1 - i/grid` and keeps the lowest error).
//!
//! Each block's range `[lo, hi]` is shrunk by a factor `p` in [0.5, 1.0] (`[p*lo, p*hi]`, so 0 stays in
//! range), with a coarse-to-fine grid: 11 factors 1.00, 0.95, ..., 0.50, then +-0.01..0.04 around the best
//! (<= 19 evaluations instead of 51 for the same 0.01 resolution). Factor 1.0 is evaluated first and only
//! a strictly lower error replaces it, so the search is never worse than plain RTN on the same block.

use rayon::prelude::*;

use super::int::{block_sq_error, qparams, Levels, Qp};

const COARSE: usize = 11;
const COARSE_STEP: f32 = 0.05;
const FINE: usize = 8;
const FINE_STEP: f32 = 0.01;
const MIN_FACTOR: f32 = 0.5;

/// Runs the coarse-to-fine search; `eval(candidates, errors)` fills one squared error per candidate.
fn search(lo: f32, hi: f32, lv: &Levels, mut eval: impl FnMut(&[Qp], &mut [f64])) -> Qp {
    let mut cands = [Qp { scale: 0.0, zp: 0 }; COARSE];
    let mut factors = [0f32; COARSE];
    let mut errs = [0f64; COARSE];
    for (i, (c, f)) in cands.iter_mut().zip(factors.iter_mut()).enumerate() {
        *f = 1.0 - COARSE_STEP * i as f32;
        *c = qparams(lo * *f, hi * *f, lv);
    }
    eval(&cands, &mut errs);
    let (mut best, mut best_err, mut best_f) = (cands[0], errs[0], 1.0f32);
    for i in 1..COARSE {
        if errs[i] < best_err {
            (best, best_err, best_f) = (cands[i], errs[i], factors[i]);
        }
    }
    let mut n = 0;
    for k in 1..=FINE / 2 {
        for f in [best_f - FINE_STEP * k as f32, best_f + FINE_STEP * k as f32] {
            if (MIN_FACTOR..1.0).contains(&f) {
                factors[n] = f;
                cands[n] = qparams(lo * f, hi * f, lv);
                n += 1;
            }
        }
    }
    eval(&cands[..n], &mut errs[..n]);
    for i in 0..n {
        if errs[i] < best_err {
            (best, best_err) = (cands[i], errs[i]);
        }
    }
    best
}

/// Best scale and zero point for one block (a row or a group) whose zero-including range is `[lo, hi]`.
pub(crate) fn block_range(x: &[f32], lo: f32, hi: f32, lv: &Levels) -> Qp {
    search(lo, hi, lv, |cands, errs| {
        for (c, e) in cands.iter().zip(errs.iter_mut()) {
            *e = block_sq_error(x, *c, lv);
        }
    })
}

/// Best single scale for a whole tensor; every candidate's error is summed over row chunks in parallel,
/// each chunk evaluating all candidates while it is in cache.
pub(crate) fn tensor_range(data: &[f32], task: usize, lo: f32, hi: f32, lv: &Levels) -> Qp {
    search(lo, hi, lv, |cands, errs| {
        let sums = data
            .par_chunks(task)
            .map(|x| {
                let mut e = [0f64; COARSE];
                for (c, e) in cands.iter().zip(e.iter_mut()) {
                    *e = block_sq_error(x, *c, lv);
                }
                e
            })
            .reduce(
                || [0f64; COARSE],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        errs.copy_from_slice(&sums[..errs.len()]);
    })
}
