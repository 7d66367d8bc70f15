//! Property test over the engine itself (no server): random shapes, dtypes and value ranges,
//! extremes of each dtype, subnormals and all-zero rows, through every scheme and every layout.
//! Each run either succeeds with finite values everywhere, with every layout decoding to the
//! dense output (the engine's own check, `report.checks`) and a report that measures the dense
//! file, or fails naming the tensor whose result its dtype cannot hold.

use proptest::prelude::*;
use safetensors::Dtype;
use serde_json::{json, Value};

use modelpress::compress::engine::{self, EngineError, Inputs, Silent};
use modelpress::compress::{
    plan::{prepare, PlanInputs},
    spec::parse_compress,
};
use modelpress::formats::safetensors::read_header;

use crate::helpers::{read_float_tensors, safetensors_typed};

/// The report and a measurement of the dense file agree to float-summation noise.
const REPORT_TOLERANCE: f64 = 1e-9;

fn schemes() -> Vec<Value> {
    let mut out = Vec::new();
    for bits in [2, 4, 8] {
        for g in ["tensor", "channel", "group"] {
            for sym in [true, false] {
                let mut step = json!({"op": "quantize", "bits": bits, "granularity": g, "symmetric": sym});
                if g == "group" {
                    step["group_size"] = json!(32);
                }
                out.push(step);
            }
        }
    }
    out.push(json!({"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32, "search": "mse"}));
    for ty in ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "f16"] {
        out.push(json!({"op": "quantize", "gguf_type": ty, "fallback": "f16"}));
    }
    out.push(json!({"op": "prune", "method": "magnitude", "sparsity": 0.5}));
    out
}

fn dtype_max(d: Dtype) -> f32 {
    match d {
        Dtype::F16 => half::f16::MAX.to_f32(),
        Dtype::BF16 => half::bf16::MAX.to_f32(),
        _ => f32::MAX,
    }
}

/// Values of one tensor: rows of random values at 10^exponent, some rows all zero, some with an
/// outlier at the dtype's limit, all representable in `dtype`.
fn tensor_values(dtype: Dtype, rows: usize, cols: usize, exponent: i32, seed: u64) -> Vec<f32> {
    let mut rng = modelpress::compress::synth::SplitMix64::new(seed);
    let scale = 10f64.powi(exponent);
    let max = dtype_max(dtype) as f64;
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let kind = rng.next_f64();
        for _ in 0..cols {
            let x = if kind < 0.15 { 0.0 } else { (rng.next_f64() * 2.0 - 1.0) * scale };
            v.push(x.clamp(-max, max) as f32);
        }
        if kind > 0.85 {
            let last = v.len() - 1;
            v[last] = if kind > 0.93 { -max as f32 } else { max as f32 };
        }
    }
    // Round through the dtype, so the input holds exactly the values the file will.
    v.iter()
        .map(|&x| match dtype {
            Dtype::F16 => half::f16::from_f32(x).to_f32(),
            Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => x,
        })
        .collect()
}

fn relative_error(a: &[f32], b: &[f32]) -> f64 {
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 - y as f64).powi(2)).sum();
    let n: f64 = a.iter().map(|&x| (x as f64).powi(2)).sum();
    if n > 0.0 {
        (d / n).sqrt()
    } else if d > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

fn run_case(
    dtype: Dtype,
    rows: usize,
    cols: usize,
    exponent: i32,
    step: &Value,
    seed: u64,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let w = tensor_values(dtype, rows, cols, exponent, seed);
    let w2 = tensor_values(dtype, 2, 32, exponent - 1, seed + 1);
    let model = dir.path().join("in.safetensors");
    std::fs::write(
        &model,
        safetensors_typed(&[
            ("a.weight", dtype, vec![rows, cols], w.clone()),
            ("b.weight", dtype, vec![2, 32], w2.clone()),
        ]),
    )
    .unwrap();
    let outputs = json!(["safetensors", "compressed-tensors", "gguf", "sparse"]);
    let spec = parse_compress(&json!([step]), Some(&outputs)).unwrap();
    let header = read_header(&model, u64::MAX).unwrap();
    let plan = prepare(spec, PlanInputs::model(header));
    prop_assume!(plan.refusals.is_empty());
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let inputs = Inputs::model(&model, "0", "0");
    match engine::execute(&plan, &inputs, &out_dir, &Silent) {
        Ok(out) => {
            prop_assert_eq!(out.report.checks.len(), 4, "every layout is checked: {:?}", out.report.checks);
            let dense = read_float_tensors(&std::fs::read(out_dir.join("model.safetensors")).unwrap());
            for (name, input) in [("a.weight", &w), ("b.weight", &w2)] {
                let (_, _, values) = &dense[name];
                prop_assert!(values.iter().all(|v| v.is_finite()), "{} has non-finite output", name);
                let r = out.report.tensors.iter().find(|t| t.name == name).unwrap();
                if let Some(e) = &r.error {
                    let measured = relative_error(input, values);
                    prop_assert!(e.relative_error.is_finite() && e.cosine.is_finite() && e.max_abs_error.is_finite());
                    prop_assert!(
                        (e.relative_error - measured).abs() <= REPORT_TOLERANCE * measured.max(1.0),
                        "{}: report {} vs file {}",
                        name,
                        e.relative_error,
                        measured
                    );
                }
            }
            Ok(())
        }
        Err(EngineError::Tensor { tensor, code, detail }) => {
            prop_assert_eq!(code, "non_finite_output", "{}: {}", tensor, detail);
            prop_assert!(tensor == "a.weight" || tensor == "b.weight");
            Ok(())
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected engine error: {e}"))),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn every_scheme_and_layout_gives_finite_agreeing_output_or_a_named_failure(
        dtype in prop::sample::select(vec![Dtype::F32, Dtype::F16, Dtype::BF16]),
        rows in 1usize..5,
        cols in prop::sample::select(vec![32usize, 64, 256]),
        exponent in prop::sample::select(vec![-44i32, -38, -30, -7, -5, 0, 3, 4, 15, 37]),
        step in prop::sample::select(schemes()),
        seed in any::<u64>(),
    ) {
        run_case(dtype, rows, cols, exponent, &step, seed)?;
    }
}
