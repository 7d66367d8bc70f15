//! Integer round-to-nearest quantization in the compressed-tensors (vLLM) conventions.
//!
//! Conventions, read from compressed-tensors' sources (`quantization/utils/helpers.py::calculate_qparams`,
//! `quantization/lifecycle/forward.py::_quantize/_dequantize`, `quant_args.py::round_to_quantized_type_args`):
//! - the range is first widened to hold 0: `lo = min(min, 0)`, `hi = max(max, 0)`;
//! - integer codes live in `[q_min, q_max] = [-2^(b-1), 2^(b-1) - 1]` and `bit_range = q_max - q_min = 2^b - 1`;
//! - symmetric: `scale = max(|lo|, |hi|) / (bit_range / 2)` (7.5 for int4, 127.5 for int8), zero point 0;
//! - asymmetric: `scale = (hi - lo) / bit_range`, `zp = round(clamp(q_min - lo / scale, q_min, q_max))`;
//! - a scale of exactly 0 (an all-zero block) is replaced by the dtype's epsilon (`f32::EPSILON` here);
//!   a nonzero scale is rounded to the dtype it is stored in and clamped to that dtype's smallest
//!   positive value (not to epsilon, which zeroes rows of tiny weights): see [`StoreDtype::scale`];
//! - quantize: `q = round_half_even(clamp(x / scale + zp, q_min, q_max))` (`torch.round` rounds half to even);
//! - dequantize: `x' = (q - zp) * scale`.
//!
//! Because `zp` is an integer, 0.0 quantizes to `zp` and dequantizes to exactly 0.0 in both modes, so pruned
//! zeros survive. Packing into `weight_packed` / `weight_zero_point` int32 words lives in [`pack`].
//!
//! Sources read: vllm-project/compressed-tensors `helpers.py` (commit 04a58ff), `forward.py` (01dd1a5),
//! `pack_quantized.py` (179cba9). That `pack_quantized.py`'s `match_scheme` lists `num_bits in (4, 8)`;
//! FACTS.md allows 2 as well, and the packing itself is defined for any width.

mod int;
mod kernel;
pub mod pack;
mod search;

pub use int::{dequantize_into, quantize, quantize_into, quantize_into_until};
pub use pack::{pack_int32, pack_int32_into, pack_zero_points, packed_len, unpack_int32, unpack_zero_points};

/// The float type scales and dequantized values are stored in (compressed-tensors keeps scales in
/// the weight's dtype). Codes are computed with the scale exactly as stored, so the codes, every
/// layout's decode and the dense output agree bit for bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    F16,
    BF16,
}

impl StoreDtype {
    /// Nearest value of this dtype (round half to even), as f32.
    #[inline(always)]
    pub fn round(self, v: f32) -> f32 {
        match self {
            StoreDtype::F32 => v,
            StoreDtype::F16 => half::f16::from_f32(v).to_f32(),
            StoreDtype::BF16 => half::bf16::from_f32(v).to_f32(),
        }
    }

    /// Largest finite value.
    #[inline(always)]
    pub fn max(self) -> f32 {
        match self {
            StoreDtype::F32 => f32::MAX,
            StoreDtype::F16 => half::f16::MAX.to_f32(),
            StoreDtype::BF16 => half::bf16::MAX.to_f32(),
        }
    }

    /// Smallest positive value (a subnormal): 5.96e-8 for f16, 9.2e-41 for bf16, 1.4e-45 for f32.
    #[inline(always)]
    pub fn min_positive(self) -> f32 {
        match self {
            StoreDtype::F32 => f32::from_bits(1),
            StoreDtype::F16 => half::f16::from_bits(1).to_f32(),
            StoreDtype::BF16 => half::bf16::from_bits(1).to_f32(),
        }
    }

    /// A block scale as it will be stored: rounded to this dtype and kept in
    /// `[min_positive, max]`. compressed-tensors replaces a zero scale by the dtype's epsilon,
    /// which turns rows of tiny weights into zeros; clamping to the smallest positive value
    /// instead keeps them (a row of max |x| = 1e-6 still gets ~17 levels in f16). An all-zero
    /// block (scale 0) gets f32's epsilon, exact in all three dtypes: its codes are all zp.
    #[inline(always)]
    pub fn scale(self, s: f32) -> f32 {
        if s == 0.0 {
            return f32::EPSILON;
        }
        let r = self.round(s);
        if r < self.min_positive() {
            self.min_positive()
        } else if r > self.max() {
            self.max()
        } else {
            r
        }
    }
}

/// How many values share one scale (and zero point).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per row (output channel).
    Channel,
    /// One scale per `g` consecutive values of a row; `cols % g` must be 0.
    Group(usize),
}

/// How each block's clipping range is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleSearch {
    /// Plain min/max (round-to-nearest, RTN).
    None,
    /// Shrink the range by the factor in [0.5, 1.0] that minimises the block's squared error.
    Mse,
}

/// One integer quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IntParams {
    /// 2, 4 or 8 (compressed-tensors changed the packing of 3, 5, 6, 7 bits in 2026: we never emit them).
    pub bits: u8,
    pub granularity: Granularity,
    /// `true`: zero point 0; `false`: one signed zero point per scale.
    pub symmetric: bool,
    pub search: ScaleSearch,
}

/// A quantized matrix; every buffer is reused by [`quantize_into`] across calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct IntQuantized {
    /// Rows of the quantized matrix (`shape[0]`).
    pub rows: usize,
    /// Values per row (product of the other dims).
    pub cols: usize,
    /// 2, 4 or 8.
    pub bits: u8,
    /// Whether zero points are all 0 (and `zero_points` is `None`).
    pub symmetric: bool,
    /// `rows * cols` signed codes in `[-2^(b-1), 2^(b-1) - 1]`, row-major.
    pub codes: Vec<i8>,
    /// Row-major `scale_shape[0] x scale_shape[1]`.
    pub scales: Vec<f32>,
    /// Same layout as `scales`; `None` when symmetric.
    pub zero_points: Option<Vec<i8>>,
    /// `[rows, 1]` per channel, `[rows, cols / g]` per group, `[1, 1]` per tensor.
    pub scale_shape: [usize; 2],
}

impl IntQuantized {
    /// Values sharing one scale along a row (`cols` for channel and tensor granularity).
    pub fn block_len(&self) -> usize {
        self.cols.checked_div(self.scale_shape[1]).unwrap_or(0)
    }
}

/// Why a tensor cannot be quantized; the engine prefixes the tensor name.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    #[error("bits must be 2, 4 or 8, got {0}")]
    UnsupportedBits(u8),
    #[error("group size {group} does not divide the row length cols={cols}")]
    GroupDoesNotDivide { cols: usize, group: usize },
    #[error("group size must be at least 1, got 0")]
    ZeroGroup,
    #[error("{what} has {got} values, expected rows*cols = {rows}*{cols} = {expected}")]
    LengthMismatch { what: &'static str, got: usize, expected: usize, rows: usize, cols: usize },
    #[error("non-finite value {value} at flat index {index}")]
    NonFinite { index: usize, value: f32 },
    /// The `stop` of a cancellable kernel answered true between two row blocks.
    #[error("canceled")]
    Canceled,
}

/// Asked between the row blocks of a long kernel: `true` stops it (a job canceled or shutting
/// down). Checked once per block of about 64K values, so a cancel lands within milliseconds.
pub type Stop<'a> = dyn Fn() -> bool + Sync + 'a;

/// A [`Stop`] that never stops (benchmarks, tests, one-shot tools).
pub const NEVER: &Stop<'static> = &|| false;

#[cfg(test)]
mod tests;
