//! Which tensors a step touches: `targets` and `ignore` globs over tensor names.

use crate::formats::safetensors::TensorInfo;

use super::spec::SpecError;

/// Module names the major model families give their embedding tables (PyTorch `nn.Embedding`):
/// Llama/Mistral/Qwen `embed_tokens`, BERT `word_embeddings`/`position_embeddings`/
/// `token_type_embeddings`, GPT-2 `wte`/`wpe`, T5 `shared`, Meta's `tok_embeddings`, and any
/// module whose last name part contains `embed`.
pub fn is_embedding(tensor_name: &str) -> bool {
    let module = tensor_name.strip_suffix(".weight").unwrap_or(tensor_name);
    let last = module.rsplit('.').next().unwrap_or(module);
    last.contains("embed") || matches!(last, "wte" | "wpe" | "shared")
}

/// Default rule when no `targets` are given: floating-point tensors of rank >= 2 named
/// `*.weight` that hold values and are not embedding tables (biases, norms' 1-D scales, buffers
/// and embeddings are left alone; empty and embedding tensors with a reason in the plan).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    targets: Option<Vec<glob::Pattern>>,
    ignore: Vec<glob::Pattern>,
}

/// Why a tensor is not touched by a step (`None` from `reason_skipped` means it is).
impl Selector {
    /// The default selector (no `targets`, no `ignore`), for steps that select layers otherwise.
    pub fn all() -> &'static Selector {
        static DEFAULT: Selector = Selector { targets: None, ignore: Vec::new() };
        &DEFAULT
    }

    pub fn parse(targets: Option<&[String]>, ignore: Option<&[String]>, at: &str) -> Result<Selector, SpecError> {
        let compile = |list: &[String], field: &str| -> Result<Vec<glob::Pattern>, SpecError> {
            list.iter()
                .enumerate()
                .map(|(i, p)| {
                    glob::Pattern::new(p).map_err(|e| {
                        SpecError::new(format!("{at}/{field}/{i}"), "invalid_field", format!("bad glob `{p}`: {e}"))
                    })
                })
                .collect()
        };
        let targets = targets.map(|t| compile(t, "targets")).transpose()?;
        if targets.as_ref().is_some_and(|t| t.is_empty()) {
            return Err(SpecError::new(format!("{at}/targets"), "invalid_field", "targets must not be empty"));
        }
        Ok(Selector { targets, ignore: compile(ignore.unwrap_or_default(), "ignore")? })
    }

    /// `Ok(())` when the step applies to `t`, otherwise why not (`Err` with the reason; an
    /// explicit target of the wrong kind is skipped with a reason too, never silently).
    pub fn decide(&self, t: &TensorInfo) -> Result<(), Option<String>> {
        if self.ignore.iter().any(|p| p.matches(&t.name)) {
            return Err(Some("matched an `ignore` pattern".into()));
        }
        match &self.targets {
            None => {
                if !(t.dtype.is_float() && t.shape.len() >= 2 && t.name.ends_with(".weight")) {
                    return Err(None);
                }
                if t.numel() == 0 {
                    return Err(Some("empty tensor (0 values): copied unchanged".into()));
                }
                if is_embedding(&t.name) {
                    return Err(Some(
                        "an embedding table (not a Linear layer): left alone unless named in `targets`".into(),
                    ));
                }
            }
            Some(targets) => {
                if !targets.iter().any(|p| p.matches(&t.name)) {
                    return Err(None);
                }
                if !t.dtype.is_float() {
                    return Err(Some(format!("dtype {} is not floating point", t.dtype.as_str())));
                }
                if t.shape.is_empty() || t.numel() == 0 {
                    return Err(Some("scalar or empty tensor".into()));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::Dtype;

    fn tensor(name: &str, shape: &[usize]) -> TensorInfo {
        TensorInfo { name: name.into(), dtype: Dtype::F32, shape: shape.to_vec(), start: 0, end: 0 }
    }

    #[test]
    fn embedding_tables_of_the_common_families_are_recognised() {
        for name in [
            "model.embed_tokens.weight",
            "bert.embeddings.word_embeddings.weight",
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "shared.weight",
            "tok_embeddings.weight",
        ] {
            assert!(is_embedding(name), "{name}");
        }
        for name in ["model.layers.0.mlp.up_proj.weight", "lm_head.weight", "fc1.weight", "embeddings.LayerNorm.weight"]
        {
            assert!(!is_embedding(name), "{name}");
        }
    }

    #[test]
    fn default_targets_skip_empty_and_embedding_tensors_with_a_reason() {
        let s = Selector::parse(None, None, "/steps/0").unwrap();
        assert_eq!(s.decide(&tensor("ok.weight", &[8, 64])), Ok(()));
        assert!(s.decide(&tensor("empty_rows.weight", &[0, 64])).unwrap_err().unwrap().contains("empty"));
        assert!(s.decide(&tensor("empty_cols.weight", &[64, 0])).unwrap_err().unwrap().contains("empty"));
        assert!(s.decide(&tensor("model.embed_tokens.weight", &[256, 64])).unwrap_err().unwrap().contains("embedding"));
        assert_eq!(s.decide(&tensor("fc.bias", &[8])), Err(None));
        let explicit = Selector::parse(Some(&["*embed*".to_string()]), None, "/steps/0").unwrap();
        assert_eq!(explicit.decide(&tensor("model.embed_tokens.weight", &[256, 64])), Ok(()));
    }
}
