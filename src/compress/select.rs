//! Which tensors a step touches: `targets` and `ignore` globs over tensor names.

use crate::formats::safetensors::TensorInfo;

use super::spec::SpecError;

/// Default rule when no `targets` are given: floating-point tensors of rank >= 2 named
/// `*.weight` (biases, norms' 1-D scales and buffers are left alone).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    targets: Option<Vec<glob::Pattern>>,
    ignore: Vec<glob::Pattern>,
}

/// Why a tensor is not touched by a step (`None` from `reason_skipped` means it is).
impl Selector {
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
