//! llama-quantize's named mixes (`Q4_K_M`, `Q5_K_M`, ...): the per-tensor GGUF types
//! `llama_tensor_get_type_impl` in llama.cpp's `src/llama-quant.cpp` picks (the copy bundled
//! with llama-cpp-python 0.3.36), for Llama-family tensor names in Hugging Face form, without an
//! importance matrix. Covered: the mixes whose choices depend only on the tensor's role and
//! layer (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K_S, Q4_K_M, Q5_K_S, Q5_K_M, Q6_K).

use std::str::FromStr;

use crate::formats::gguf::GgufType;

/// A named mix of llama-quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufMix {
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q4KS,
    Q4KM,
    Q5KS,
    Q5KM,
    Q6K,
}

impl GgufMix {
    pub const ALL: [GgufMix; 10] = [
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4KS,
        Self::Q4KM,
        Self::Q5KS,
        Self::Q5KM,
        Self::Q6K,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q4KS => "Q4_K_S",
            Self::Q4KM => "Q4_K_M",
            Self::Q5KS => "Q5_K_S",
            Self::Q5KM => "Q5_K_M",
            Self::Q6K => "Q6_K",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`).
    pub fn file_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 7,
            Self::Q5_0 => 8,
            Self::Q5_1 => 9,
            Self::Q4KS => 14,
            Self::Q4KM => 15,
            Self::Q5KS => 16,
            Self::Q5KM => 17,
            Self::Q6K => 18,
        }
    }

    /// The mix's default type (llama-quantize's `default_type` for the ftype).
    fn base(self) -> GgufType {
        match self {
            Self::Q4_0 => GgufType::Q4_0,
            Self::Q4_1 => GgufType::Q4_1,
            Self::Q5_0 => GgufType::Q5_0,
            Self::Q5_1 => GgufType::Q5_1,
            Self::Q8_0 => GgufType::Q8_0,
            Self::Q4KS | Self::Q4KM => GgufType::Q4K,
            Self::Q5KS | Self::Q5KM => GgufType::Q5K,
            Self::Q6K => GgufType::Q6K,
        }
    }

    /// The type of tensor `name` (Hugging Face Llama naming) with `cols` values per row, in a
    /// model of `layers` blocks; `tied` when there is no `lm_head` (the embeddings serve as the
    /// output, and get the output's type); `seventy_b` when llama.cpp classes the model as 70B
    /// (80 layers with grouped-query attention, or Qwen2 with 80 layers), whose `attn_v` it
    /// raises from Q3_K/Q4_K to Q5_K. Shape fallbacks are applied after, as llama.cpp does.
    pub fn type_for(self, name: &str, cols: usize, layers: usize, tied: bool, seventy_b: bool) -> GgufType {
        let base = self.base();
        let layer = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0);
        let output = name == "lm_head.weight" || (tied && name == "model.embed_tokens.weight");
        if output {
            return if !cols.is_multiple_of(base.block_size()) {
                GgufType::Q8_0
            } else if base != GgufType::Q8_0 {
                GgufType::Q6K
            } else {
                base
            };
        }
        let more_bits = use_more_bits(layer, layers);
        if name.ends_with(".self_attn.v_proj.weight") {
            let ty = match self {
                Self::Q4KM | Self::Q5KM if more_bits => GgufType::Q6K,
                Self::Q4KS if layer < 4 => GgufType::Q5K,
                _ => base,
            };
            return match ty {
                GgufType::Q3K | GgufType::Q4K if seventy_b => GgufType::Q5K,
                other => other,
            };
        }
        if name.ends_with(".mlp.down_proj.weight") {
            return match self {
                Self::Q4KM | Self::Q5KM if more_bits => GgufType::Q6K,
                Self::Q4KS if layer < layers / 8 => GgufType::Q5K,
                _ => base,
            };
        }
        base
    }
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
fn use_more_bits(layer: usize, layers: usize) -> bool {
    let (i, n) = (layer as i64, layers as i64);
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl FromStr for GgufMix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.to_ascii_uppercase();
        Self::ALL.into_iter().find(|m| m.name() == wanted).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|m| m.name()).collect();
            format!("unknown mix `{s}`; the named mixes are {}", names.join(", "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Q4_K_M on a 32-layer Llama (Llama 2 7B): attn_v and ffn_down in Q6_K on layers 0-3,
    /// 6, 9, ..., 27 and 28-31 (llama-quantize's printout), Q4_K elsewhere; output Q6_K.
    #[test]
    fn q4_k_m_follows_llama_quantize() {
        let q6: Vec<usize> = (0..32)
            .filter(|&l| {
                GgufMix::Q4KM.type_for(&format!("model.layers.{l}.mlp.down_proj.weight"), 11008, 32, false, false)
                    == GgufType::Q6K
            })
            .collect();
        assert_eq!(q6, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);
        let t = |n: &str| GgufMix::Q4KM.type_for(n, 4096, 32, false, false);
        assert_eq!(t("model.layers.5.self_attn.v_proj.weight"), GgufType::Q4K);
        assert_eq!(t("model.layers.6.self_attn.v_proj.weight"), GgufType::Q6K);
        assert_eq!(t("model.layers.6.self_attn.q_proj.weight"), GgufType::Q4K);
        assert_eq!(t("lm_head.weight"), GgufType::Q6K);
        assert_eq!(t("model.embed_tokens.weight"), GgufType::Q4K);
        // Tied embeddings take the output's type; Q8_0 keeps Q8_0 for the output.
        assert_eq!(GgufMix::Q4KM.type_for("model.embed_tokens.weight", 4096, 32, true, false), GgufType::Q6K);
        assert_eq!(GgufMix::Q8_0.type_for("lm_head.weight", 4096, 32, false, false), GgufType::Q8_0);
        assert_eq!(GgufMix::Q4_0.type_for("lm_head.weight", 4096, 32, false, false), GgufType::Q6K);
        // Llama 2/3 70B: attn_v of the Q4_K layers goes to Q5_K, the Q6_K layers stay.
        let v70 = |l: usize| {
            GgufMix::Q4KM.type_for(&format!("model.layers.{l}.self_attn.v_proj.weight"), 8192, 80, false, true)
        };
        assert_eq!((v70(0), v70(11)), (GgufType::Q6K, GgufType::Q5K));
        assert_eq!("q4_k_m".parse::<GgufMix>(), Ok(GgufMix::Q4KM));
        assert!("Q3_K_M".parse::<GgufMix>().unwrap_err().contains("Q4_K_M"));
    }
}
