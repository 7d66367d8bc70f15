//! What a plan predicts from shapes alone: output sizes, and whether a mixed budget can be met.

use super::*;
use crate::compress::layout::compressed_tensors as ct;

/// A mixed-precision budget below what the cheapest candidates reach is refused up front.
pub(super) fn check_budgets(spec: &CompressSpec, header: &Header, tensors: &[TensorPlan], refusals: &mut Vec<Refusal>) {
    for (i, step) in spec.steps.iter().enumerate() {
        let Step::Quantize(q) = step else { continue };
        let QuantMethod::Auto { target_bits, candidates } = &q.method else { continue };
        let (mut params, mut min_bits) = (0f64, 0f64);
        for (tp, t) in tensors.iter().zip(&header.tensors) {
            if !tp.actions.iter().any(|a| a.kernel == Kernel::Auto { step: i }) {
                continue;
            }
            let cheapest = candidates
                .iter()
                .filter(|c| scheme_refusal(c, t).is_none())
                .map(|c| scheme_bits(c, t))
                .fold(f64::INFINITY, f64::min);
            params += t.numel() as f64;
            min_bits += cheapest * t.numel() as f64;
        }
        if params > 0.0 && min_bits / params > *target_bits + 1e-9 {
            refusals.push(Refusal {
                pointer: format!("/steps/{i}/mixed/target_bits"),
                tensor: None,
                detail: format!(
                    "target_bits {target_bits} is below the {:.3} bits per weight the cheapest candidates reach on this model",
                    min_bits / params
                ),
            });
        }
    }
}

pub(super) fn output_bytes(f: OutputFormat, header: &Header, tensors: &[TensorPlan]) -> u64 {
    let dense: u64 = header.tensors.iter().map(|t| t.bytes()).sum();
    // Headers are small next to the data; this allowance covers names, shapes and provenance.
    let header_allowance = header.data_start + 512 + 64 * header.tensors.len() as u64;
    let quantized = |tp: &TensorPlan, want: fn(&Kernel) -> bool| tp.actions.last().is_some_and(|a| want(&a.kernel));
    match f {
        OutputFormat::Safetensors => dense + header_allowance,
        OutputFormat::CompressedTensors => {
            tensors
                .iter()
                .map(|tp| {
                    if crate::compress::layout::packs_as_linear(&header.tensors[tp.index])
                        && quantized(tp, |k| matches!(k, Kernel::Int(_)))
                    {
                        tp.bytes_out + 16
                    } else {
                        tp.bytes_in
                    }
                })
                .sum::<u64>()
                + header_allowance
        }
        OutputFormat::Gguf => {
            tensors
                .iter()
                .map(|tp| {
                    let t = &header.tensors[tp.index];
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
                .zip(tensors.iter().map(|tp| &header.tensors[tp.index]))
                .map(|(tp, t)| {
                    if tp.actions.iter().any(|a| a.op == "prune") && t.shape.len() == 2 {
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
pub(super) fn check_output_names(
    spec: &CompressSpec,
    header: &Header,
    tensors: &[TensorPlan],
    refusals: &mut Vec<Refusal>,
) {
    for (i, f) in spec.outputs.iter().enumerate() {
        let mut seen: std::collections::HashMap<String, &str> = std::collections::HashMap::new();
        for tp in tensors {
            let t = &header.tensors[tp.index];
            let prefix = t.name.strip_suffix(".weight").unwrap_or(&t.name);
            let last = tp.actions.last().map(|a| &a.kernel);
            let names: Vec<String> = match f {
                OutputFormat::CompressedTensors
                    if crate::compress::layout::packs_as_linear(t)
                        && matches!(last, Some(Kernel::Int(_) | Kernel::Auto { .. })) =>
                {
                    ct::PART_SUFFIXES.iter().map(|p| ct::part_name(ct::module_of(&t.name), p)).collect()
                }
                OutputFormat::Sparse if t.shape.len() == 2 && tp.actions.iter().any(|a| a.op == "prune") => {
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
        let p = plan(&spec, &header(&["fc", "fc.weight"]));
        assert_eq!(p.refusals.len(), 4, "{:?}", p.refusals);
        assert!(p.refusals[0].detail.contains("`fc.shape` would collide with one from `fc`"), "{:?}", p.refusals[0]);
        assert!(plan(&spec, &header(&["a.weight", "b.weight"])).refusals.is_empty());
    }
}
