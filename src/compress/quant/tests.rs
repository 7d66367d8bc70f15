//! Behaviour of the integer kernels: conventions, error bounds, search, refusals.

use super::*;
use crate::compress::synth::benchmark_matrix;

/// Slack on the `scale / 2` bound for f32 rounding in `x / scale` and `(q - zp) * scale`.
const BOUND_REL_SLACK: f32 = 1e-5;
/// Hand-computed dequantized values involve 1/3 and friends: allow a few ulps.
const GOLDEN_TOL: f32 = 1e-6;
/// The search sums errors in f32 lanes; the test re-sums in f64 sequentially.
const SUM_ORDER_REL: f64 = 1e-6;

fn params(bits: u8, granularity: Granularity, symmetric: bool, search: ScaleSearch) -> IntParams {
    IntParams { bits, granularity, symmetric, search }
}

fn sq_error(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum()
}

fn all_schemes() -> Vec<IntParams> {
    let mut out = vec![];
    for bits in [2, 4, 8] {
        for g in [Granularity::Tensor, Granularity::Channel, Granularity::Group(16)] {
            for sym in [true, false] {
                out.push(params(bits, g, sym, ScaleSearch::None));
            }
        }
    }
    out
}

/// Scale (and zero point) index of flat element `i`.
fn block_of(q: &IntQuantized, i: usize) -> usize {
    if q.scale_shape == [1, 1] {
        0
    } else {
        i / q.block_len()
    }
}

#[test]
fn int4_symmetric_matches_hand_computed_codes_and_rounds_half_to_even() {
    // absmax 7.5 -> scale 7.5 / 7.5 = 1; -7.5 ties to -8, 2.5 ties to 2, 7.5 clamps to 7.
    let x = [0.0, 1.0, -7.5, 2.5, 7.5];
    let (q, d) = quantize(&x, 1, 5, &params(4, Granularity::Channel, true, ScaleSearch::None)).unwrap();
    assert_eq!(q.scales, vec![1.0]);
    assert_eq!(q.codes, vec![0, 1, -8, 2, 7]);
    assert_eq!(d, vec![0.0, 1.0, -8.0, 2.0, 7.0]);
    assert_eq!(q.zero_points, None);
}

#[test]
fn int4_asymmetric_matches_hand_computed_scale_and_zero_point() {
    // lo -1, hi 4: scale 5/15, zp = -8 - (-1)/(1/3) = -5.
    let x = [-1.0, 0.0, 2.0, 4.0];
    let (q, d) = quantize(&x, 1, 4, &params(4, Granularity::Tensor, false, ScaleSearch::None)).unwrap();
    assert!((q.scales[0] - 1.0 / 3.0).abs() < GOLDEN_TOL);
    assert_eq!(q.zero_points, Some(vec![-5]));
    assert_eq!(q.codes, vec![-8, -5, 1, 7]);
    for (a, b) in x.iter().zip(&d) {
        assert!((a - b).abs() < GOLDEN_TOL, "{a} vs {b}");
    }
}

#[test]
fn int8_symmetric_scale_is_absmax_over_127_5() {
    let x = [0.5, -2.55, 1.0, 0.0];
    let (q, _) = quantize(&x, 2, 2, &params(8, Granularity::Channel, true, ScaleSearch::None)).unwrap();
    assert_eq!(q.scale_shape, [2, 1]);
    assert_eq!(q.scales, vec![2.55 / 127.5, 1.0 / 127.5]);
}

#[test]
fn every_scheme_reconstructs_within_half_a_step_and_decodes_consistently() {
    let (rows, cols) = (24, 64);
    let x = benchmark_matrix(rows, cols, 3);
    for p in all_schemes() {
        let (q, d) = quantize(&x, rows, cols, &p).unwrap();
        let half = 1i16 << (p.bits - 1);
        assert!(q.codes.iter().all(|&c| (-half..half).contains(&(c as i16))), "{p:?}");
        let expected_shape = match p.granularity {
            Granularity::Tensor => [1, 1],
            Granularity::Channel => [rows, 1],
            Granularity::Group(g) => [rows, cols / g],
        };
        assert_eq!(q.scale_shape, expected_shape, "{p:?}");
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            let step = q.scales[block_of(&q, i)];
            assert!((a - b).abs() <= step / 2.0 * (1.0 + BOUND_REL_SLACK) + f32::EPSILON, "{p:?} at {i}: {a} vs {b}");
        }
        let mut decoded = vec![0f32; x.len()];
        dequantize_into(&q, &mut decoded).unwrap();
        assert_eq!(decoded, d, "independent decode differs for {p:?}");
    }
}

#[test]
fn pruned_zeros_stay_exactly_zero_in_every_scheme() {
    let (rows, cols) = (8, 64);
    let mut x = benchmark_matrix(rows, cols, 4);
    x.iter_mut().step_by(3).for_each(|v| *v = 0.0);
    x[64..128].iter_mut().for_each(|v| *v = 0.0); // one all-zero row: scale falls back to epsilon
    for p in all_schemes() {
        let (_, d) = quantize(&x, rows, cols, &p).unwrap();
        for (i, (&a, &b)) in x.iter().zip(&d).enumerate() {
            if a == 0.0 {
                assert_eq!(b, 0.0, "{p:?} at {i}");
            }
        }
    }
}

#[test]
fn per_channel_error_is_never_worse_than_per_tensor() {
    let (rows, cols) = (64, 256);
    let x = benchmark_matrix(rows, cols, 5);
    for bits in [2, 4, 8] {
        for sym in [true, false] {
            let (_, dt) = quantize(&x, rows, cols, &params(bits, Granularity::Tensor, sym, ScaleSearch::None)).unwrap();
            let (_, dc) =
                quantize(&x, rows, cols, &params(bits, Granularity::Channel, sym, ScaleSearch::None)).unwrap();
            assert!(sq_error(&x, &dc) <= sq_error(&x, &dt), "bits {bits} symmetric {sym}");
        }
    }
}

#[test]
fn asymmetric_zero_point_fits_a_shifted_distribution_better_than_symmetric() {
    let x: Vec<f32> = benchmark_matrix(16, 128, 6).iter().map(|v| v + 0.1).collect();
    for g in [Granularity::Tensor, Granularity::Channel, Granularity::Group(32)] {
        let (_, ds) = quantize(&x, 16, 128, &params(4, g, true, ScaleSearch::None)).unwrap();
        let (_, da) = quantize(&x, 16, 128, &params(4, g, false, ScaleSearch::None)).unwrap();
        assert!(sq_error(&x, &da) < sq_error(&x, &ds), "{g:?}");
    }
}

#[test]
fn mse_search_is_never_worse_than_round_to_nearest() {
    let (rows, cols) = (32, 256);
    let x = benchmark_matrix(rows, cols, 7);
    let mut strictly_better = 0;
    for p in all_schemes() {
        let (_, rtn) = quantize(&x, rows, cols, &p).unwrap();
        let (_, mse) = quantize(&x, rows, cols, &IntParams { search: ScaleSearch::Mse, ..p }).unwrap();
        // Per row as well as in total: the search works block by block.
        for (r, ((xr, a), b)) in x.chunks(cols).zip(rtn.chunks(cols)).zip(mse.chunks(cols)).enumerate() {
            let (e_rtn, e_mse) = (sq_error(xr, a), sq_error(xr, b));
            if p.granularity != Granularity::Tensor {
                assert!(e_mse <= e_rtn * (1.0 + SUM_ORDER_REL), "{p:?} row {r}: {e_mse} > {e_rtn}");
            }
        }
        let (e_rtn, e_mse) = (sq_error(&x, &rtn), sq_error(&x, &mse));
        assert!(e_mse <= e_rtn * (1.0 + SUM_ORDER_REL), "{p:?}: {e_mse} > {e_rtn}");
        strictly_better += (e_mse < e_rtn * 0.99) as usize;
    }
    // Outlier-heavy data: clipping must pay off for most low-bit schemes.
    assert!(strictly_better >= 6, "search improved only {strictly_better} schemes");
}

#[test]
fn nan_and_inf_are_refused_with_the_index_of_the_first_one() {
    let mut x = benchmark_matrix(4, 32, 8);
    x[77] = f32::INFINITY;
    x[90] = f32::NAN;
    for g in [Granularity::Tensor, Granularity::Channel, Granularity::Group(8)] {
        for search in [ScaleSearch::None, ScaleSearch::Mse] {
            let err = quantize(&x, 4, 32, &params(4, g, true, search)).unwrap_err();
            assert!(matches!(err, QuantError::NonFinite { index: 77, .. }), "{g:?}: {err}");
        }
    }
    x[77] = 0.0;
    let err = quantize(&x, 4, 32, &params(8, Granularity::Channel, false, ScaleSearch::None)).unwrap_err();
    assert_eq!(err.to_string(), "non-finite value NaN at flat index 90");
}

#[test]
fn a_group_size_that_does_not_divide_the_row_is_refused() {
    let x = vec![0.5f32; 30];
    let err = quantize(&x, 3, 10, &params(4, Granularity::Group(4), true, ScaleSearch::None)).unwrap_err();
    assert_eq!(err, QuantError::GroupDoesNotDivide { cols: 10, group: 4 });
    assert_eq!(err.to_string(), "group size 4 does not divide the row length cols=10");
    let err = quantize(&x, 3, 10, &params(4, Granularity::Group(0), true, ScaleSearch::None)).unwrap_err();
    assert_eq!(err, QuantError::ZeroGroup);
}

#[test]
fn unsupported_bits_and_wrong_lengths_are_refused() {
    let x = vec![0.5f32; 30];
    let err = quantize(&x, 3, 10, &params(3, Granularity::Channel, true, ScaleSearch::None)).unwrap_err();
    assert_eq!(err, QuantError::UnsupportedBits(3));
    let err = quantize(&x, 4, 10, &params(4, Granularity::Channel, true, ScaleSearch::None)).unwrap_err();
    assert_eq!(err.to_string(), "data has 30 values, expected rows*cols = 4*10 = 40");
}

#[test]
fn reused_buffers_give_the_same_result_as_fresh_ones() {
    let x = benchmark_matrix(16, 64, 9);
    let mut q = IntQuantized::default();
    let mut d = vec![0f32; x.len()];
    // An asymmetric int8 run first leaves zero points and larger scales behind.
    quantize_into(
        &x,
        16,
        64,
        &params(8, Granularity::Group(8), false, ScaleSearch::None),
        StoreDtype::F32,
        &mut q,
        &mut d,
    )
    .unwrap();
    let p = params(4, Granularity::Channel, true, ScaleSearch::Mse);
    quantize_into(&x, 16, 64, &p, StoreDtype::F32, &mut q, &mut d).unwrap();
    let (fresh_q, fresh_d) = quantize(&x, 16, 64, &p).unwrap();
    assert_eq!(q, fresh_q);
    assert_eq!(d, fresh_d);
}

#[test]
fn packed_codes_from_the_kernel_unpack_to_the_dequantized_values() {
    let (rows, cols) = (8, 256);
    let x = benchmark_matrix(rows, cols, 10);
    let (q, d) = quantize(&x, rows, cols, &params(4, Granularity::Group(128), false, ScaleSearch::None)).unwrap();
    let codes = unpack_int32(&pack_int32(&q.codes, rows, cols, 4), rows, cols, 4);
    let zps = unpack_zero_points(&pack_zero_points(q.zero_points.as_ref().unwrap(), rows, 2, 4), rows, 2, 4);
    for (i, (&c, &dv)) in codes.iter().zip(&d).enumerate() {
        let k = i / 128;
        assert_eq!((c as f32 - zps[k] as f32) * q.scales[k], dv, "at {i}");
    }
}

/// Signature of `kernel::blocks_chunk`: data, codes, dequant, scales, zero points, block, levels, mse.
type BlocksFn = fn(
    &[f32],
    &mut [i8],
    &mut [f32],
    &mut [f32],
    Option<&mut [i8]>,
    usize,
    &super::kernel::Levels,
    bool,
) -> Result<(), ()>;

#[test]
fn the_avx2_and_baseline_kernels_give_bit_identical_results() {
    use super::kernel::{blocks_chunk, blocks_chunk_baseline, Levels};
    let (rows, cols, blk) = (4, 256, 64);
    let x = benchmark_matrix(rows, cols, 11);
    for (bits, symmetric, mse) in [(4, true, false), (4, false, true), (8, true, true), (2, false, false)] {
        let lv = Levels::new(bits, symmetric, crate::compress::quant::StoreDtype::F16);
        let run = |f: BlocksFn| {
            let (mut c, mut d) = (vec![0i8; x.len()], vec![0f32; x.len()]);
            let (mut s, mut z) = (vec![0f32; x.len() / blk], vec![0i8; x.len() / blk]);
            f(&x, &mut c, &mut d, &mut s, Some(&mut z), blk, &lv, mse).unwrap();
            (c, d, s, z)
        };
        assert_eq!(run(blocks_chunk), run(blocks_chunk_baseline), "bits {bits} symmetric {symmetric} mse {mse}");
    }
}

#[test]
fn a_stop_that_answers_true_ends_the_kernel_between_row_blocks() {
    let (rows, cols) = (256, 4096); // 16 blocks of 64K values
    let data = benchmark_matrix(rows, cols, 7);
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let stop_after_two = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2;
    for p in [
        params(4, Granularity::Group(128), true, ScaleSearch::None),
        params(8, Granularity::Tensor, false, ScaleSearch::None),
    ] {
        asked.store(0, std::sync::atomic::Ordering::Relaxed);
        let (mut q, mut d) = (IntQuantized::default(), vec![0f32; data.len()]);
        let r = quantize_into_until(&data, rows, cols, &p, StoreDtype::F32, &mut q, &mut d, &stop_after_two);
        assert_eq!(r, Err(QuantError::Canceled), "{p:?}");
        // Never stopping gives exactly what the plain entry point gives.
        let (mut q2, mut d2) = (IntQuantized::default(), vec![0f32; data.len()]);
        quantize_into_until(&data, rows, cols, &p, StoreDtype::F32, &mut q2, &mut d2, NEVER).unwrap();
        let (q1, d1) = quantize(&data, rows, cols, &p).unwrap();
        assert_eq!((q1.codes, d1), (q2.codes, d2));
    }
}
