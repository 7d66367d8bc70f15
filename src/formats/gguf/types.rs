//! The ggml storage types a GGUF file can hold, as ggml.h numbers them and llama.cpp names them.

use std::fmt;
use std::str::FromStr;

use candle_core::quantized::GgmlDType;

/// A name (or a candle dtype) that is not one of the GGUF types ModelPress writes.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error(
    "unknown GGUF type \"{0}\"; expected one of f32, f16, q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k, q5_k, q6_k"
)]
pub struct UnknownGgufType(pub String);

/// The ggml storage types ModelPress writes into GGUF files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgufType {
    F32,
    F16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
}

impl GgufType {
    /// Every type, in declaration order.
    pub const ALL: [GgufType; 12] = [
        Self::F32,
        Self::F16,
        Self::Q8_0,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    /// The lowercase name used in job specs and llama.cpp ("q8_0", "q4_k", "f16").
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q5_0 => "q5_0",
            Self::Q5_1 => "q5_1",
            Self::Q2K => "q2_k",
            Self::Q3K => "q3_k",
            Self::Q4K => "q4_k",
            Self::Q5K => "q5_k",
            Self::Q6K => "q6_k",
        }
    }

    /// Values per block: 1 for floats, 32 for the legacy quants, 256 for k-quants.
    pub fn block_size(self) -> usize {
        self.ggml_dtype().block_size()
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        self.ggml_dtype().type_size()
    }

    /// Storage cost per weight including the block scales (q4_k: 144 bytes / 256 values = 4.5).
    pub fn bits_per_weight(self) -> f64 {
        (self.type_size() * 8) as f64 / self.block_size() as f64
    }

    /// True for the 256-value super-block types.
    pub fn is_k_quant(self) -> bool {
        matches!(self, Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K)
    }

    /// The candle dtype with the same layout.
    pub fn ggml_dtype(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
            Self::Q4_1 => GgmlDType::Q4_1,
            Self::Q5_0 => GgmlDType::Q5_0,
            Self::Q5_1 => GgmlDType::Q5_1,
            Self::Q2K => GgmlDType::Q2K,
            Self::Q3K => GgmlDType::Q3K,
            Self::Q4K => GgmlDType::Q4K,
            Self::Q5K => GgmlDType::Q5K,
            Self::Q6K => GgmlDType::Q6K,
        }
    }

    /// The `ggml_type` number stored in GGUF tensor infos (ggml.h's enum).
    pub fn ggml_type_id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
        }
    }

    /// Why rows of `cols` values cannot be stored in this type, or `None` when they can.
    pub fn row_refusal(self, cols: usize) -> Option<String> {
        let block = self.block_size();
        if cols == 0 || !cols.is_multiple_of(block) {
            return Some(format!("row length {cols} is not a multiple of the {} block size {block}", self.name()));
        }
        None
    }

    /// Why a tensor of this `shape` cannot be stored in a GGUF file as this type, or `None`.
    ///
    /// ggml blocks run along the innermost dimension (`ne[0]`, the LAST dim of the row-major shape),
    /// and candle's and llama.cpp's readers refuse a tensor whose last dim is not a multiple of the
    /// block size, even when `rows x cols` flattening would fit. GGUF also caps tensors at 4 dims.
    pub fn shape_refusal(self, shape: &[usize]) -> Option<String> {
        match shape {
            [] => Some("a scalar (rank 0) tensor cannot be stored; reshape it to [1]".into()),
            s if s.len() > 4 => Some(format!("rank {} exceeds the GGUF limit of 4", s.len())),
            [.., last] => self.row_refusal(*last).map(|r| format!("innermost {r}")),
        }
    }

    /// The largest magnitude this type can store without its f16 block scales overflowing, or
    /// `None` for F32. Derived from each kernel's scale formula (ggml-quants.c, candle's
    /// `k_quants.rs`): Q8_0 `d = amax / 127`, Q4_0 `d = max / -8`, Q5_0 `d = max / -16`; Q4_1/Q5_1
    /// store the block minimum itself as f16, and the k-quants' super-block `d`/`dmin` stay below
    /// f16's maximum whenever |x| does, so those are limited to f16's 65504 (a conservative bound).
    pub fn input_limit(self) -> Option<f32> {
        const F16_MAX: f32 = 65504.0;
        match self {
            Self::F32 => None,
            Self::Q8_0 => Some(F16_MAX * 127.0),
            Self::Q4_0 => Some(F16_MAX * 8.0),
            Self::Q5_0 => Some(F16_MAX * 16.0),
            Self::F16 | Self::Q4_1 | Self::Q5_1 | Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => {
                Some(F16_MAX)
            }
        }
    }

    /// Bytes taken by `elems` values (a multiple of the block size).
    pub fn encoded_len(self, elems: usize) -> usize {
        elems / self.block_size() * self.type_size()
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GgufType {
    type Err = UnknownGgufType;

    /// Accepts the lowercase names of [`GgufType::name`], case-insensitively ("Q4_K" works too).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Self::ALL.into_iter().find(|t| t.name() == lower).ok_or_else(|| UnknownGgufType(s.to_string()))
    }
}

impl From<GgufType> for GgmlDType {
    fn from(t: GgufType) -> Self {
        t.ggml_dtype()
    }
}

impl TryFrom<GgmlDType> for GgufType {
    type Error = UnknownGgufType;

    fn try_from(d: GgmlDType) -> Result<Self, Self::Error> {
        GgufType::ALL.into_iter().find(|t| t.ggml_dtype() == d).ok_or_else(|| UnknownGgufType(format!("{d:?}")))
    }
}
