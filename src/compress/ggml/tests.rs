use candle_core::quantized::QTensor;
use candle_core::{Device, Tensor};

use super::*;
use crate::compress::metrics::error_metrics;
use crate::compress::synth::{benchmark_matrix, SplitMix64};

/// Largest relative Frobenius error allowed on normal(0, 1) data, per type. Each is about 1.3x the
/// value measured on the 40x512 test matrix (f32 is exact; f16 keeps 11 significant bits).
fn round_trip_tolerance(ty: GgufType) -> f64 {
    match ty {
        GgufType::F32 => 0.0,
        GgufType::F16 => 3e-4,
        GgufType::Q8_0 => 0.007,
        GgufType::Q6K => 0.024,
        GgufType::Q5_1 | GgufType::Q5K => 0.05,
        GgufType::Q5_0 => 0.055,
        GgufType::Q4_1 | GgufType::Q4K => 0.1,
        GgufType::Q4_0 => 0.11,
        GgufType::Q3K => 0.2,
        GgufType::Q2K => 0.38,
    }
}

/// 40 x 512: 1.25 parallel chunks, so one chunk is partial; rows hold two k-quant super-blocks.
const ROWS: usize = 40;
const COLS: usize = 512;

fn normal_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..rows * cols).map(|_| rng.next_normal() as f32).collect()
}

/// The benchmark distribution (outliers, scaled columns) plus edge blocks: all zeros, a single
/// negative extreme, and ties, which exercise the sign and rounding corners of the kernels.
fn awkward_matrix() -> Vec<f32> {
    let mut data = benchmark_matrix(ROWS, COLS, 7);
    data[..256].fill(0.0);
    data[256..288].fill(-0.0);
    data[300] = -3.0;
    for (i, x) in data[512..544].iter_mut().enumerate() {
        *x = (i as f32 - 16.0) * 0.5;
    }
    data[600..632].fill(1.0);
    data
}

fn candle_bytes(data: &[f32], ty: GgufType) -> Vec<u8> {
    let t = Tensor::from_slice(data, (ROWS, COLS), &Device::Cpu).unwrap();
    let q = QTensor::quantize(&t, ty.ggml_dtype()).unwrap();
    q.data().unwrap().into_owned()
}

#[test]
fn names_parse_back_to_the_same_type() {
    for ty in GgufType::ALL {
        assert_eq!(ty.name().parse::<GgufType>().unwrap(), ty);
        assert_eq!(ty.name().to_uppercase().parse::<GgufType>().unwrap(), ty);
        assert_eq!(GgufType::try_from(ty.ggml_dtype()).unwrap(), ty);
    }
    let err = "q4_km".parse::<GgufType>().unwrap_err();
    assert!(err.to_string().starts_with("unknown GGUF type \"q4_km\""));
}

#[test]
fn block_geometry_matches_llama_cpp() {
    let expect = [
        (GgufType::F32, 1, 4, 32.0),
        (GgufType::F16, 1, 2, 16.0),
        (GgufType::Q8_0, 32, 34, 8.5),
        (GgufType::Q4_0, 32, 18, 4.5),
        (GgufType::Q4_1, 32, 20, 5.0),
        (GgufType::Q5_0, 32, 22, 5.5),
        (GgufType::Q5_1, 32, 24, 6.0),
        (GgufType::Q2K, 256, 84, 2.625),
        (GgufType::Q3K, 256, 110, 3.4375),
        (GgufType::Q4K, 256, 144, 4.5),
        (GgufType::Q5K, 256, 176, 5.5),
        (GgufType::Q6K, 256, 210, 6.5625),
    ];
    for (ty, block, size, bits) in expect {
        assert_eq!((ty.block_size(), ty.type_size()), (block, size), "{ty}");
        assert_eq!(ty.bits_per_weight(), bits, "{ty}");
    }
}

#[test]
fn conv_like_rows_are_refused_with_the_reason() {
    assert_eq!(
        GgufType::Q4K.row_refusal(9).as_deref(),
        Some("row length 9 is not a multiple of the q4_k block size 256")
    );
    assert_eq!(
        GgufType::Q8_0.row_refusal(27).as_deref(),
        Some("row length 27 is not a multiple of the q8_0 block size 32")
    );
    assert_eq!(GgufType::F16.row_refusal(9), None);
    assert!(GgufType::Q4_0.row_refusal(0).is_some());
}

#[test]
fn k_quants_refuse_rows_that_only_fit_32_value_blocks() {
    let cols = 4096 + 32;
    for ty in GgufType::ALL {
        assert_eq!(ty.row_refusal(cols).is_some(), ty.is_k_quant(), "{ty}");
        assert_eq!(ty.row_refusal(4096), None, "{ty}");
    }
    assert_eq!(
        GgufType::Q6K.row_refusal(cols).as_deref(),
        Some("row length 4128 is not a multiple of the q6_k block size 256")
    );
}

#[test]
fn gguf_shapes_are_judged_by_their_innermost_dimension() {
    // 64 x (32*3*3): 288 values per output row fit q8_0, but ggml blocks run along the last dim (3).
    let refusal = GgufType::Q8_0.shape_refusal(&[64, 32, 3, 3]).unwrap();
    assert_eq!(refusal, "innermost row length 3 is not a multiple of the q8_0 block size 32");
    assert_eq!(GgufType::Q8_0.shape_refusal(&[64, 4, 32]), None);
    assert!(GgufType::F16.shape_refusal(&[]).is_some());
    assert!(GgufType::F16.shape_refusal(&[1, 1, 1, 1, 1]).is_some());
}

/// Q4_K, Q5_K and Q6_K follow llama.cpp's current reference (`make_qkx2_quants`,
/// `make_qx_quants`), candle's `from_float` an older one; every other type is candle's kernel
/// or a port of it.
const LLAMA_CPP_ONLY: [GgufType; 3] = [GgufType::Q4K, GgufType::Q5K, GgufType::Q6K];

#[test]
fn quantized_bytes_equal_candles_for_every_type() {
    let data = awkward_matrix();
    let mut out = Vec::new();
    for ty in GgufType::ALL.into_iter().filter(|t| !LLAMA_CPP_ONLY.contains(t)) {
        quantize(&data, ROWS, COLS, ty, &mut out).unwrap();
        assert!(out == candle_bytes(&data, ty), "{ty} bytes differ from candle's");
    }
}

/// llama.cpp's Q4_K/Q5_K fit weighs each value by its size, so its error is at most candle's
/// on typical weights (here over the whole matrix), never far worse.
#[test]
fn llama_cpp_k_quants_are_at_least_as_close_as_candles() {
    let data = normal_matrix(ROWS, COLS, 17);
    let (mut bytes, mut back) = (Vec::new(), vec![0f32; data.len()]);
    for ty in LLAMA_CPP_ONLY {
        quantize(&data, ROWS, COLS, ty, &mut bytes).unwrap();
        dequantize(&bytes, ROWS, COLS, ty, &mut back).unwrap();
        let ours = error_metrics(&data, &back).relative_error;
        let t = Tensor::from_slice(&data, (ROWS, COLS), &Device::Cpu).unwrap();
        let candle = QTensor::quantize(&t, ty.ggml_dtype()).unwrap().dequantize(&Device::Cpu).unwrap();
        let candle = candle.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let theirs = error_metrics(&data, &candle).relative_error;
        assert!(ours <= theirs, "{ty}: relative error {ours} against candle's {theirs}");
    }
}

#[test]
fn dequantized_values_equal_candles_for_every_type() {
    let data = awkward_matrix();
    let (mut bytes, mut ours) = (Vec::new(), vec![0f32; data.len()]);
    for ty in GgufType::ALL.into_iter().filter(|t| !LLAMA_CPP_ONLY.contains(t)) {
        quantize(&data, ROWS, COLS, ty, &mut bytes).unwrap();
        dequantize(&bytes, ROWS, COLS, ty, &mut ours).unwrap();
        let t = Tensor::from_slice(&data, (ROWS, COLS), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, ty.ggml_dtype())
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(ours == theirs, "{ty} dequantized values differ from candle's");
    }
}

#[test]
fn every_type_round_trips_within_its_tolerance() {
    let data = normal_matrix(ROWS, COLS, 11);
    let (mut bytes, mut back) = (Vec::new(), vec![0f32; data.len()]);
    for ty in GgufType::ALL {
        quantize(&data, ROWS, COLS, ty, &mut bytes).unwrap();
        assert_eq!(bytes.len(), ty.encoded_len(data.len()));
        dequantize(&bytes, ROWS, COLS, ty, &mut back).unwrap();
        let err = error_metrics(&data, &back).relative_error;
        assert!(err <= round_trip_tolerance(ty), "{ty}: relative error {err}");
    }
}

#[test]
fn misaligned_buffers_give_the_same_bytes_and_values() {
    let data = normal_matrix(2, 256, 3);
    let mut aligned = Vec::new();
    for ty in GgufType::ALL {
        quantize(&data, 2, 256, ty, &mut aligned).unwrap();
        let mut storage = vec![0u8; aligned.len() + 1];
        kernels::quantize_chunk(ty, &data, &mut storage[1..]);
        assert_eq!(&storage[1..], &aligned[..], "{ty}");
        let (mut a, mut b) = (vec![0f32; data.len()], vec![0f32; data.len()]);
        kernels::dequantize_chunk(ty, &aligned, &mut a);
        kernels::dequantize_chunk(ty, &storage[1..], &mut b);
        assert_eq!(a, b, "{ty}");
    }
}

#[test]
fn wrong_lengths_are_refused_naming_the_shape() {
    let mut out = Vec::new();
    let err = quantize(&[0.0; 60], 2, 32, GgufType::Q8_0, &mut out).unwrap_err();
    assert_eq!(err.to_string(), "a 2x32 matrix needs 64 values, got 60");
    let err = quantize(&[0.0; 18], 2, 9, GgufType::Q8_0, &mut out).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot store a 2x9 matrix as q8_0: row length 9 is not a multiple of the q8_0 block size 32"
    );
    let err = dequantize(&[0; 10], 2, 32, GgufType::Q8_0, &mut [0.0; 64]).unwrap_err();
    assert_eq!(err.to_string(), "q8_0 data of a 2x32 matrix is 68 bytes, got 10");
}

#[test]
fn hand_written_kernels_agree_on_both_code_paths() {
    // Values on exact .5 rounding boundaries after scaling, negatives first, and repeated maxima.
    let mut data = normal_matrix(ROWS, COLS, 5);
    for (i, x) in data[..COLS].iter_mut().enumerate() {
        *x = ((i % 64) as f32 - 32.0) * 0.25;
    }
    data[COLS..COLS + 32].fill(-2.0);
    data[COLS + 40] = f32::MIN_POSITIVE;
    // Subnormal blocks, where the reciprocal scale overflows to infinity.
    for (i, x) in data[COLS + 256..COLS + 512].iter_mut().enumerate() {
        *x = (i as f32 - 100.0) * 1e-41;
    }
    data[2 * COLS..3 * COLS].fill(0.25);
    for ty in [GgufType::Q8_0, GgufType::Q4K, GgufType::Q5K, GgufType::Q6K] {
        let mut ours = vec![0u8; ty.encoded_len(data.len())];
        match ty {
            GgufType::Q8_0 => fast::quantize_portable(&data, &mut ours),
            GgufType::Q6K => fast_k::quantize_portable_q6k(&data, &mut ours),
            _ => fast_k::quantize_portable(ty == GgufType::Q5K, &data, &mut ours),
        }
        if ty == GgufType::Q8_0 {
            assert!(ours == candle_bytes(&data, ty), "{ty} portable path differs from candle");
        }
        let mut dispatched = vec![0u8; ours.len()];
        kernels::quantize_chunk(ty, &data, &mut dispatched);
        assert!(ours == dispatched, "{ty} dispatched path differs from the portable one");
        let mut back = vec![0f32; data.len()];
        dequantize(&ours, ROWS, COLS, ty, &mut back).unwrap();
        assert!(back.iter().all(|v| v.is_finite()), "{ty}: non-finite values decoded");
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Random super-blocks mixing scales, exact zeros, repeats and signs: Q8_0 gives candle's
    /// bytes; Q4_K/Q5_K/Q6_K give the same bytes on both code paths and decode to finite values.
    #[test]
    fn hand_written_kernels_agree_on_random_blocks(
        values in proptest::collection::vec(
            proptest::prop_oneof![
                4 => -2.0f32..2.0,
                1 => -1e-3f32..1e-3,
                1 => proptest::strategy::Just(0.0f32),
                1 => proptest::sample::select(vec![-1.0f32, 0.5, 0.25, -0.125, 3.0, 1e-40, -3e-39]),
            ],
            512,
        )
    ) {
        let t = Tensor::from_slice(&values, (2, 256), &Device::Cpu).unwrap();
        let theirs = QTensor::quantize(&t, GgufType::Q8_0.ggml_dtype()).unwrap().data().unwrap().into_owned();
        let mut ours = Vec::new();
        quantize(&values, 2, 256, GgufType::Q8_0, &mut ours).unwrap();
        proptest::prop_assert!(ours == theirs, "q8_0 differs");
        for ty in LLAMA_CPP_ONLY {
            let (mut portable, mut dispatched) = (vec![0u8; ty.encoded_len(512)], vec![0u8; ty.encoded_len(512)]);
            match ty {
                GgufType::Q6K => fast_k::quantize_portable_q6k(&values, &mut portable),
                _ => fast_k::quantize_portable(ty == GgufType::Q5K, &values, &mut portable),
            }
            kernels::quantize_chunk(ty, &values, &mut dispatched);
            proptest::prop_assert!(portable == dispatched, "{} paths differ", ty);
            let mut back = vec![0f32; 512];
            dequantize(&portable, 2, 256, ty, &mut back).unwrap();
            proptest::prop_assert!(back.iter().all(|v| v.is_finite()), "{} decodes non-finite values", ty);
        }
    }
}

#[test]
fn a_stop_that_answers_true_ends_gguf_quantization_between_chunks() {
    let data = normal_matrix(64, 4096, 11); // 16 chunks of 16K values
    let asked = std::sync::atomic::AtomicUsize::new(0);
    let stop_after_two = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 2;
    let mut out = Vec::new();
    assert_eq!(quantize_until(&data, 64, 4096, GgufType::Q4K, &mut out, &stop_after_two), Err(GgmlError::Canceled));
    let (mut a, mut b) = (Vec::new(), Vec::new());
    quantize_until(&data, 64, 4096, GgufType::Q4K, &mut a, crate::compress::quant::NEVER).unwrap();
    quantize(&data, 64, 4096, GgufType::Q4K, &mut b).unwrap();
    assert_eq!(a, b);
}
