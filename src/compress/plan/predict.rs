//! What a plan predicts from the output descriptors alone: output sizes, and names that collide.

use super::*;
use crate::compress::layout::compressed_tensors as ct;
use crate::compress::layout::sparse_dtype;

/// Predicted bytes of output `f`; `data_start` is the input's header size, a fair estimate of
/// the output's.
/// Bytes a tensor takes in the compressed-tensors output: its packed parts, or its dense bytes.
fn compressed_tensors_bytes(tp: &TensorPlan) -> u64 {
    let int = tp.actions.last().is_some_and(|a| matches!(a.kernel, Kernel::Int(_)));
    if crate::compress::layout::packs_as_linear(&tp.out) && int {
        tp.bytes_out + 16
    } else {
        tp.bytes_in
    }
}

/// How many files a safetensors-based output is split into under `max` bytes per shard: exact
/// for the dense output, predicted for compressed-tensors (packed sizes are estimates); other
/// layouts are one file.
pub(super) fn shard_count(f: OutputFormat, tensors: &[TensorPlan], max: u64) -> usize {
    let sizes: Vec<u64> = match f {
        OutputFormat::Safetensors => tensors.iter().map(|tp| tp.out.bytes()).collect(),
        OutputFormat::CompressedTensors => tensors.iter().map(compressed_tensors_bytes).collect(),
        OutputFormat::Gguf | OutputFormat::Sparse => return 1,
    };
    crate::formats::safetensors::sharded::split(&sizes, max).last().map_or(1, |k| k + 1)
}

pub(super) fn output_bytes(f: OutputFormat, data_start: u64, tensors: &[TensorPlan]) -> u64 {
    let dense: u64 = tensors.iter().map(|tp| tp.out.bytes()).sum();
    // Headers are small next to the data; this allowance covers names, shapes and provenance.
    let header_allowance = data_start + 512 + 64 * tensors.len() as u64;
    let quantized = |tp: &TensorPlan, want: fn(&Kernel) -> bool| tp.actions.last().is_some_and(|a| want(&a.kernel));
    match f {
        OutputFormat::Safetensors => dense + header_allowance,
        OutputFormat::CompressedTensors => tensors.iter().map(compressed_tensors_bytes).sum::<u64>() + header_allowance,
        OutputFormat::Gguf => {
            tensors
                .iter()
                .map(|tp| {
                    let t = &tp.out;
                    if quantized(tp, |k| matches!(k, Kernel::Ggml(_) | Kernel::Auto { .. })) {
                        tp.bytes_out
                    } else {
                        crate::compress::layout::gguf_type_for(t, None).map_or(0, |ty| ty.encoded_len(t.numel()) as u64)
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
        OutputFormat::Sparse => {
            tensors
                .iter()
                .map(|tp| {
                    let t = &tp.out;
                    if tp.actions.iter().any(PlannedAction::zeroes) && t.shape.len() == 2 {
                        let nnz = ((1.0 - tp.sparsity) * t.numel() as f64).round() as u64;
                        crate::formats::sparse::predicted_bytes(&t.shape, nnz, sparse_dtype(t.dtype))
                            .unwrap_or(tp.bytes_in)
                    } else {
                        tp.bytes_in
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
    }
}

/// Names an output layout derives from a tensor (compressed-tensors and sparse-bitmask split
/// one tensor into several named parts); collisions are refused, since one entry would
/// silently replace another.
pub(super) fn check_output_names(spec: &CompressSpec, tensors: &[TensorPlan], refusals: &mut Vec<Refusal>) {
    for (i, f) in spec.outputs.iter().enumerate() {
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for tp in tensors {
            let t = &tp.out;
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            let last = tp.actions.last().map(|a| &a.kernel);
            let names: Vec<String> = match f {
                OutputFormat::CompressedTensors
                    if crate::compress::layout::packs_as_linear(t)
                        && matches!(last, Some(Kernel::Int(_) | Kernel::Auto { .. })) =>
                {
                    ct::PART_SUFFIXES.iter().map(|p| ct::part_name(ct::module_of(&t.name), p)).collect()
                }
                OutputFormat::Sparse if t.shape.len() == 2 && tp.actions.iter().any(PlannedAction::zeroes) => {
                    ["shape", "bitmask", "row_offsets", "compressed"].iter().map(|p| format!("{prefix}.{p}")).collect()
                }
                _ => vec![t.name.clone()],
            };
            for n in names {
                if let Some(other) = seen.insert(n.clone(), &t.name) {
                    refusals.push(Refusal {
                        pointer: format!("/outputs/{i}"),
                        tensor: Some(t.name.clone()),
                        detail: format!(
                            "tensor `{}`: its {} entry `{n}` would collide with one from `{other}`; exclude one with `ignore`",
                            t.name,
                            f.as_str()
                        ),
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::spec::parse_compress;
    use crate::formats::safetensors::Dtype;

    fn header(names: &[&str]) -> Header {
        let mut start = 100;
        let tensors = names
            .iter()
            .map(|n| {
                let t =
                    TensorInfo { name: n.to_string(), dtype: Dtype::F32, shape: vec![4, 8], start, end: start + 128 };
                start += 128;
                t
            })
            .collect();
        Header { tensors, metadata: Default::default(), data_start: 100 }
    }

    #[test]
    fn derived_names_that_collide_are_refused() {
        let spec = parse_compress(
            &serde_json::json!([{"op": "prune", "method": "magnitude", "sparsity": 0.5, "targets": ["*"]}]),
            Some(&serde_json::json!(["sparse"])),
        )
        .unwrap();
        let p = prepare(spec.clone(), PlanInputs::model(header(&["fc", "fc.weight"])));
        assert_eq!(p.refusals.len(), 4, "{:?}", p.refusals);
        assert!(p.refusals[0].detail.contains("`fc.shape` would collide with one from `fc`"), "{:?}", p.refusals[0]);
        assert!(prepare(spec, PlanInputs::model(header(&["a.weight", "b.weight"]))).refusals.is_empty());
    }
}
