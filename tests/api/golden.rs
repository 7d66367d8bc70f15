//! Golden hashes: the CLI's artifacts for a small fixed model, byte for byte, across every
//! scheme and layout. Speed work on the engine (fused passes, parallel pieces, pipelining) must
//! not change one output byte; a deliberate format change updates these hashes in its commit.

use std::collections::BTreeMap;
use std::process::Command;

use safetensors::Dtype;
use sha2::{Digest, Sha256};

use crate::helpers::*;

/// A model with the dtypes and shapes the kernels branch on: f32, bf16 and f16 matrices whose
/// rows fit every GGUF block size, a conv kernel (rows of 27), and 1-D tensors.
fn golden_model() -> Vec<u8> {
    safetensors_typed(&[
        ("attn.weight", Dtype::F32, vec![64, 256], values(64 * 256, 1, 0.05)),
        ("mlp.weight", Dtype::BF16, vec![32, 512], values(32 * 512, 2, 0.08)),
        ("proj.weight", Dtype::F16, vec![16, 256], values(16 * 256, 3, 0.5)),
        ("conv.weight", Dtype::F32, vec![8, 3, 3, 3], values(8 * 27, 4, 0.3)),
        ("norm.weight", Dtype::F32, vec![256], values(256, 5, 1.0)),
        ("attn.bias", Dtype::F32, vec![64], values(64, 6, 0.1)),
    ])
}

/// Specs (as the CLI takes them) covering integer, GGUF, mixed and pruning kernels and every layout.
const SPECS: [(&str, &str); 7] = [
    ("int8", r#"{"steps": [{"op": "quantize", "bits": 8}], "outputs": ["safetensors", "compressed-tensors"]}"#),
    (
        "int4_asym_mse",
        r#"{"steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32, "symmetric": false, "search": "mse", "ignore": ["conv.weight"]}], "outputs": ["safetensors", "compressed-tensors"]}"#,
    ),
    (
        "int8_tensor",
        r#"{"steps": [{"op": "quantize", "bits": 8, "granularity": "tensor"}], "outputs": ["safetensors"]}"#,
    ),
    (
        "gguf",
        r#"{"steps": [{"op": "quantize", "gguf_type": "q4_k", "fallback": "f16"}], "outputs": ["safetensors", "gguf"]}"#,
    ),
    (
        "mixed",
        r#"{"steps": [{"op": "quantize", "mixed": {"target_bits": 6.0, "candidates": ["q8_0", "q4_0"]}, "ignore": ["conv.weight"]}], "outputs": ["gguf"]}"#,
    ),
    (
        "prune_global_2_4",
        r#"{"steps": [{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.4}, {"op": "prune", "method": "n_m", "n": 2, "m": 4, "on_mismatch": "skip"}], "outputs": ["safetensors", "sparse"]}"#,
    ),
    (
        "prune_then_int8",
        r#"{"steps": [{"op": "prune", "method": "magnitude", "scope": "layer", "sparsity": 0.5}, {"op": "quantize", "bits": 8}], "outputs": ["safetensors", "compressed-tensors"]}"#,
    ),
];

/// SHA-256 of every artifact but the report (which carries timings), by spec and file.
/// Changed deliberately for `gguf` when Q4_K/Q5_K/Q6_K moved to llama.cpp's current reference
/// kernels (byte-identical to llama-quantize).
const GOLDEN: [(&str, &str, &str); 16] = [
    ("int8", "compressed-tensors/config.json", "97a04a30fc19c0418745f3d5c14fbf53157139df20e774ac7044982f69d605bf"),
    (
        "int8",
        "compressed-tensors/model.safetensors",
        "acd189b78cd174d975694cbf8aa4db00e74a7229010e84f7165d60f8fe679df3",
    ),
    ("int8", "model.safetensors", "458bd4f15915d5076192aa30d1aed6cc7f9c4d020b01672f77dcf7d025870d20"),
    (
        "int4_asym_mse",
        "compressed-tensors/config.json",
        "7ec811071808aa0bd11491b21a68d7d62ac0d1a7da8ec1bf2014864ec89627a4",
    ),
    (
        "int4_asym_mse",
        "compressed-tensors/model.safetensors",
        "a9f729c71882477d8a0bb12ec24bcdf8cbafdf353f8371f8ad99deb522e5e750",
    ),
    ("int4_asym_mse", "model.safetensors", "41e569778a5713dd143089ef5d571bd1a10bfeb0485993f3ba5f944bff4e587a"),
    ("int8_tensor", "model.safetensors", "97922b69af8c2b290159fc7689e649b8012c93c49dad7ce0138b356daa049655"),
    ("gguf", "model.gguf", "c51f9ee46f72e5871f06defc583a747c2d454cf042f672fe80f8bdff6dcad36a"),
    ("gguf", "model.safetensors", "950ca7359a843c6a6b98aef01340073bd9f35082020592d9e24999cd5bfcae4b"),
    ("mixed", "model.gguf", "29afb5c40174f528323b2095ee447c50032ee0064a586a50641e15184a0097d8"),
    ("prune_global_2_4", "model.safetensors", "815290be7c6415668911d363e143543e4dca5ba7937784c968b904a391527c94"),
    ("prune_global_2_4", "sparse/config.json", "fd1ee5f7ac6775de0cf2d36f10301db1b6f1c260ba9df9d253ea62c75ed61697"),
    (
        "prune_global_2_4",
        "sparse/model.safetensors",
        "c4219e8b3f60b2233815b141756c056c564b1f84ad33f7796d5482c3b303b560",
    ),
    (
        "prune_then_int8",
        "compressed-tensors/config.json",
        "97a04a30fc19c0418745f3d5c14fbf53157139df20e774ac7044982f69d605bf",
    ),
    (
        "prune_then_int8",
        "compressed-tensors/model.safetensors",
        "f23c5559e912149b4fd84a0de1f95ba637ec1d1381d8a60c6996324892e2bc59",
    ),
    ("prune_then_int8", "model.safetensors", "dbc93e5d4769ba197a91bc7b54c754b46a8bbdf6811a3833d6bb3fbb87541551"),
];

fn artifacts(dir: &std::path::Path, prefix: &str, out: &mut BTreeMap<String, String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = format!("{prefix}{}", path.file_name().unwrap().to_string_lossy());
        if path.is_dir() {
            artifacts(&path, &format!("{name}/"), out);
        } else if !name.starts_with("report.") {
            out.insert(name, hex::encode(Sha256::digest(std::fs::read(&path).unwrap())));
        }
    }
}

#[test]
fn every_scheme_and_layout_writes_the_same_bytes_as_before() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    std::fs::write(&model, golden_model()).unwrap();
    let mut actual = Vec::new();
    for (name, spec) in SPECS {
        let spec_path = dir.path().join(format!("{name}.json"));
        std::fs::write(&spec_path, spec).unwrap();
        let out = dir.path().join(name);
        let run = Command::new(env!("CARGO_BIN_EXE_modelpress"))
            .args(["compress", model.to_str().unwrap(), "--spec", spec_path.to_str().unwrap()])
            .args(["--out", out.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(run.status.success(), "{name}: {}", String::from_utf8_lossy(&run.stderr));
        let mut files = BTreeMap::new();
        artifacts(&out, "", &mut files);
        actual.extend(files.into_iter().map(|(file, sha)| (name.to_owned(), file, sha)));
    }
    let expected: Vec<(String, String, String)> =
        GOLDEN.iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string())).collect();
    let listing: String = actual.iter().map(|(a, b, c)| format!("    (\"{a}\", \"{b}\", \"{c}\"),\n")).collect();
    assert_eq!(actual, expected, "artifacts changed; if deliberate, the new table is:\n{listing}");
}
