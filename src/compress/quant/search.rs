//! MSE clipping search (`ScaleSearch::Mse`), data-free, in the spirit of llm-compressor's MSE observer
//! (which shrinks min/max by factors `1 - i/grid` and keeps the lowest error).
//!
//! Each block's range `[lo, hi]` is shrunk by a factor `p` in [0.5, 1.0] (`[p*lo, p*hi]`, so 0 stays in
//! range), with a coarse-to-fine grid: 11 factors 1.00, 0.95, ..., 0.50, then +-0.01..0.04 around the best
//! (<= 19 evaluations instead of 51 for the same 0.01 resolution). Candidates are ranked with a fast
//! approximate error (`x * (1/scale)`); the winner is then compared with plain RTN (factor 1.0) on the
//! exact error the output will have and kept only if strictly lower, so the search is never worse than
//! RTN on the same block.

use rayon::prelude::*;

use super::kernel::{self, block_sq_error, qparams, Levels, Qp};

const COARSE: usize = 11;
const COARSE_STEP: f32 = 0.05;
const FINE: usize = 8;
const FINE_STEP: f32 = 0.01;
const MIN_FACTOR: f32 = 0.5;

/// Fills one squared error per candidate. A trait with an `#[inline(always)]` method rather than a
/// closure: closures are separate functions compiled without AVX2, which halved the block search speed.
trait Evaluate {
    /// Approximate errors (`x * (1 / scale)`), used to rank candidates.
    fn eval(&self, cands: &[Qp], errs: &mut [f64]);
    /// The error the output will really have (`x / scale`).
    fn exact(&self, qp: Qp) -> f64;
}

/// Runs the coarse-to-fine search.
#[inline(always)]
fn search(lo: f32, hi: f32, lv: &Levels, eval: &impl Evaluate) -> Qp {
    let mut cands = [Qp::ZERO; COARSE];
    let mut factors = [0f32; COARSE];
    let mut errs = [0f64; COARSE];
    for (i, (c, f)) in cands.iter_mut().zip(factors.iter_mut()).enumerate() {
        *f = 1.0 - COARSE_STEP * i as f32;
        *c = qparams(lo * *f, hi * *f, lv);
    }
    eval.eval(&cands, &mut errs);
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
    eval.eval(&cands[..n], &mut errs[..n]);
    for i in 0..n {
        if errs[i] < best_err {
            (best, best_err) = (cands[i], errs[i]);
        }
    }
    // The ranking used approximate errors: keep the winner only if its exact error beats plain RTN's.
    let rtn = qparams(lo, hi, lv);
    if best != rtn && eval.exact(best) >= eval.exact(rtn) {
        return rtn;
    }
    best
}

struct Block<'a> {
    x: &'a [f32],
}

impl Evaluate for Block<'_> {
    #[inline(always)]
    fn eval(&self, cands: &[Qp], errs: &mut [f64]) {
        for (c, e) in cands.iter().zip(errs.iter_mut()) {
            *e = block_sq_error::<false>(self.x, *c);
        }
    }

    #[inline(always)]
    fn exact(&self, qp: Qp) -> f64 {
        block_sq_error::<true>(self.x, qp)
    }
}

/// Best scale and zero point for one block (a row or a group) whose zero-including range is `[lo, hi]`.
#[inline(always)]
pub(crate) fn block_range(x: &[f32], lo: f32, hi: f32, lv: &Levels) -> Qp {
    search(lo, hi, lv, &Block { x })
}

struct Tensor<'a> {
    data: &'a [f32],
    task: usize,
}

impl Tensor<'_> {
    fn sums(&self, cands: &[Qp], errs: &mut [f64], exact: bool) {
        let sums = self
            .data
            .par_chunks(self.task)
            .map(|x| {
                let mut e = [0f64; COARSE];
                kernel::errors_chunk(x, cands, &mut e[..cands.len()], exact);
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
    }
}

impl Evaluate for Tensor<'_> {
    fn eval(&self, cands: &[Qp], errs: &mut [f64]) {
        self.sums(cands, errs, false);
    }

    fn exact(&self, qp: Qp) -> f64 {
        let mut e = [0f64];
        self.sums(&[qp], &mut e, true);
        e[0]
    }
}

/// Best single scale for a whole tensor; every candidate's error is summed over row chunks in parallel,
/// each chunk evaluating all candidates while it is in cache.
pub(crate) fn tensor_range(data: &[f32], task: usize, lo: f32, hi: f32, lv: &Levels) -> Qp {
    search(lo, hi, lv, &Tensor { data, task })
}
