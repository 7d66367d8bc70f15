//! Property tests of the parsers that read what clients send: no input makes them panic. Each
//! runs a few thousand generated inputs in `cargo test` (`PROPTEST_CASES` raises it for a longer
//! fuzzing run).

use proptest::prelude::*;
use serde_json::{json, Value};

use modelpress::domain::spec::parse_job_spec;
use modelpress::formats::safetensors::parse_header;
use modelpress::graph::Graph;

/// JSON values biased toward the shapes the parsers look for.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        prop_oneof![
            Just("quantize"),
            Just("prune"),
            Just("shrink"),
            Just("distill"),
            Just("qat"),
            Just("factorize"),
            Just("F32"),
            Just("F16"),
            Just("BF16"),
            Just("I64"),
            Just("q4_k"),
            Just("linear"),
            Just("relu"),
            Just("conv2d"),
            Just("residual"),
            Just("fc1"),
            Just("width"),
            Just("inputs"),
            Just(""),
        ]
        .prop_map(Value::from),
        "[a-z_./*0-9]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("op".to_string()),
                    Just("bits".to_string()),
                    Just("steps".to_string()),
                    Just("dtype".to_string()),
                    Just("shape".to_string()),
                    Just("data_offsets".to_string()),
                    Just("kind".to_string()),
                    Just("name".to_string()),
                    Just("layers".to_string()),
                    Just("input".to_string()),
                    Just("student".to_string()),
                    Just("features".to_string()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_safetensors_header_parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256), len in 0u64..1 << 40) {
        let _ = parse_header(&bytes, len);
    }

    #[test]
    fn the_safetensors_header_parser_never_panics_on_json(v in json_value(), len in 0u64..1 << 20) {
        let _ = parse_header(v.to_string().as_bytes(), len);
    }

    #[test]
    fn the_job_spec_parser_never_panics(steps in json_value(), outputs in json_value(), evaluate in json_value()) {
        let model = "01a22a00-0000-7000-8000-000000000000";
        let _ = parse_job_spec(&json!({"model_id": model, "steps": steps}));
        let _ = parse_job_spec(&json!({"model_id": model, "steps": [steps.clone()], "outputs": outputs, "evaluate": evaluate}));
        let _ = parse_job_spec(&steps);
    }

    #[test]
    fn the_graph_parser_never_panics(layers in json_value(), input in json_value()) {
        let _ = Graph::parse(&json!({"input": input, "layers": layers}));
        let _ = Graph::parse(&json!({"input": {"shape": [4]}, "layers": [layers]}));
    }
}
