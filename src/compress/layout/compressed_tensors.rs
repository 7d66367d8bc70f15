//! The compressed-tensors `pack-quantized` layout, written by the sink, predicted by the plan and
//! read back by the layout check: entry names and the `quantization_config` of `config.json`.
//!
//! Names and fields follow compressed-tensors 0.20 (`compressors/quantized_compressors/
//! pack_quantized.py`, `quantization/quant_scheme.py`): a `Linear` module `M` stores
//! `M.weight_packed` (i32 words, 32/bits codes each, along the row), `M.weight_scale`,
//! `M.weight_zero_point` (asymmetric only) and `M.weight_shape` (i64 `[rows, cols]`).

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::compress::quant::{Granularity, IntParams};
use crate::formats::safetensors::Dtype;

/// The entries a packed module is stored as, in the order the sink writes them.
pub const PART_SUFFIXES: [&str; 4] = ["weight_packed", "weight_scale", "weight_zero_point", "weight_shape"];

/// The module a weight belongs to: `fc1.weight` -> `fc1` (a name without `.weight` is its own).
pub fn module_of(tensor: &str) -> &str {
    tensor.strip_suffix(".weight").unwrap_or(tensor)
}

/// The dtype `weight_scale` is stored in: the weight's own float type (f32 for f32 and f64).
pub fn scale_dtype(d: Dtype) -> Dtype {
    if matches!(d, Dtype::F16 | Dtype::BF16) {
        d
    } else {
        Dtype::F32
    }
}

/// `M.suffix` for a module `M`.
pub fn part_name(module: &str, suffix: &str) -> String {
    format!("{module}.{suffix}")
}

/// The `quantization_config` object for packed modules grouped by scheme and the modules left
/// dense (`ignore`). One scheme targets every `Linear` (llm-compressor's usual shape) and relies on
/// `ignore` for the rest; several name each group's modules exactly.
pub fn quantization_config(groups: &BTreeMap<String, (IntParams, Vec<String>)>, ignore: &BTreeSet<String>) -> Value {
    let single = groups.len() == 1;
    let config_groups: serde_json::Map<String, Value> = groups
        .values()
        .enumerate()
        .map(|(i, (p, modules))| {
            let (strategy, group_size) = match p.granularity {
                Granularity::Tensor => ("tensor", None),
                Granularity::Channel => ("channel", None),
                Granularity::Group(g) => ("group", Some(g)),
            };
            let targets = if single { vec!["Linear".to_string()] } else { modules.clone() };
            let group = json!({
                "targets": targets,
                "weights": {"num_bits": p.bits, "type": "int", "symmetric": p.symmetric, "strategy": strategy,
                            "group_size": group_size, "dynamic": false, "observer": "minmax"},
                "input_activations": null,
                "output_activations": null,
            });
            (format!("group_{i}"), group)
        })
        .collect();
    json!({
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": ignore.iter().collect::<Vec<_>>(),
        "kv_cache_scheme": null,
    })
}

/// One config group's weight scheme, as the loader reads it.
#[derive(Debug, Clone, Deserialize)]
pub struct Weights {
    pub num_bits: u8,
    pub symmetric: bool,
    pub strategy: String,
    pub group_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct Group {
    targets: Vec<String>,
    weights: Weights,
}

/// The part of a `config.json` the loaders use to decode packed modules.
#[derive(Debug, Deserialize)]
pub struct QuantizationConfig {
    config_groups: BTreeMap<String, Group>,
}

#[derive(Debug, Deserialize)]
struct ConfigFile {
    quantization_config: QuantizationConfig,
}

impl QuantizationConfig {
    /// Reads the `quantization_config` of a `config.json`.
    pub fn from_config_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice::<ConfigFile>(bytes).map(|c| c.quantization_config)
    }

    /// The scheme of a packed module: the group naming it, else the `Linear` catch-all.
    pub fn scheme_for(&self, module: &str) -> Option<&Weights> {
        let groups = self.config_groups.values();
        let named = groups.clone().find(|g| g.targets.iter().any(|t| t == module));
        named.or_else(|| groups.clone().find(|g| g.targets.iter().any(|t| t == "Linear"))).map(|g| &g.weights)
    }
}
