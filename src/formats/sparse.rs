//! The legacy "sparse-bitmask" layout of compressed-tensors: a really smaller file for pruned tensors.
//!
//! Read from compressed-tensors' `sparse_compressors/sparse_bitmask.py` and `sparse_compressors/base.py`:
//! a 2-D weight `P.weight` is stored as four tensors named after its module prefix `P` (the state-dict
//! name with `.weight` stripped, see [`part_prefix`]):
//! - `P.shape`: I64 `[2]`, the dense shape (`torch.tensor(list(shape))`);
//! - `P.bitmask`: U8 `[rows, ceil(cols/8)]`, `numpy.packbits(tensor != 0, axis=-1, bitorder="little")`:
//!   bit `c % 8` of byte `c / 8` flags column `c`, every row padded to whole bytes;
//! - `P.row_offsets`: I64 `[rows]`, `cumsum(row_counts) - row_counts`, where each row's kept values start;
//! - `P.compressed`: `[nnz]` in the weight's dtype, the values `!= 0` in row-major order.
//!
//! "Non-zero" is judged in the output dtype, as torch does on the stored tensor: -0.0 counts as zero,
//! NaN as non-zero, and an f32 that rounds to zero in f16/bf16 is dropped. Only rank-2 tensors are
//! accepted: the reference decoder unpacks along the last axis of the stored shape, so a flattened
//! conv weight would not decode there (newer versions refuse non-2-D bitmasks too).

use crate::formats::safetensors::Dtype;
use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

/// The four parts' name suffixes, in the order [`SparseEncoder::encode`] returns them.
pub const SUFFIXES: [&str; 4] = ["shape", "bitmask", "row_offsets", "compressed"];

/// Why a tensor cannot be stored, or a stored one cannot be read, in the sparse-bitmask layout.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SparseError {
    #[error("sparse-bitmask stores 2-D tensors only, got shape {shape:?}")]
    Rank { shape: Vec<usize> },
    #[error("sparse-bitmask values must be F32, F16 or BF16, got {dtype:?}")]
    Dtype { dtype: Dtype },
    #[error("tensor of shape {shape:?} needs {expected} values, got {len}")]
    Len { shape: Vec<usize>, expected: usize, len: usize },
    #[error("sparse-bitmask part `{part}` is malformed: {reason}")]
    Malformed { part: &'static str, reason: String },
}

/// One stored tensor of the layout; write it as `{prefix}.{suffix}`.
#[derive(Debug, Clone, PartialEq)]
pub struct SparsePart<'a> {
    /// `shape`, `bitmask`, `row_offsets` or `compressed`.
    pub suffix: &'static str,
    /// Safetensors dtype of the part.
    pub dtype: Dtype,
    /// Safetensors shape of the part.
    pub shape: Vec<usize>,
    /// Little-endian bytes, exactly `shape x dtype` long.
    pub data: &'a [u8],
}

/// The name prefix compressed-tensors uses for a weight's parts: the name without a final `.weight`.
pub fn part_prefix(tensor_name: &str) -> &str {
    tensor_name.strip_suffix(".weight").unwrap_or(tensor_name)
}

/// Bytes of the four parts for a `shape` tensor with `nnz` kept values of `dtype`.
pub fn predicted_bytes(shape: &[usize], nnz: u64, dtype: Dtype) -> Result<u64, SparseError> {
    let (rows, cols) = dims(shape)?;
    let size = value_size(dtype)? as u64;
    let rows = rows as u64;
    Ok(8 * 2 + rows * cols.div_ceil(8) as u64 + 8 * rows + nnz * size)
}

/// Encoder owning the four output buffers, reused from one tensor to the next.
#[derive(Debug, Default)]
pub struct SparseEncoder {
    shape: Vec<u8>,
    bitmask: Vec<u8>,
    row_offsets: Vec<u8>,
    compressed: Vec<u8>,
    /// Kept values per row, from the mask pass.
    counts: Vec<usize>,
}

/// A value type of the `compressed` part.
trait Elem: Copy + Default + Send + Sync {
    const SIZE: usize;
    /// The row in this type; f32 borrows it as is, halves convert into `scratch`.
    fn row<'a>(src: &'a [f32], scratch: &'a mut Vec<Self>) -> &'a [Self];
    fn is_nonzero(self) -> bool;
    fn put(self, dst: &mut [u8]);
}

impl Elem for f32 {
    const SIZE: usize = 4;
    fn row<'a>(src: &'a [f32], _: &'a mut Vec<Self>) -> &'a [Self] {
        src
    }
    #[inline(always)]
    fn is_nonzero(self) -> bool {
        self.to_bits() & 0x7FFF_FFFF != 0
    }
    #[inline(always)]
    fn put(self, dst: &mut [u8]) {
        dst.copy_from_slice(&self.to_le_bytes());
    }
}

macro_rules! half_elem {
    ($t:ty) => {
        impl Elem for $t {
            const SIZE: usize = 2;
            fn row<'a>(src: &'a [f32], scratch: &'a mut Vec<Self>) -> &'a [Self] {
                scratch.resize(src.len(), <$t>::ZERO);
                scratch.convert_from_f32_slice(src);
                scratch
            }
            #[inline(always)]
            fn is_nonzero(self) -> bool {
                self.to_bits() & 0x7FFF != 0
            }
            #[inline(always)]
            fn put(self, dst: &mut [u8]) {
                dst.copy_from_slice(&self.to_bits().to_le_bytes());
            }
        }
    };
}
half_elem!(f16);
half_elem!(bf16);

impl SparseEncoder {
    /// A new encoder with empty buffers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Encodes a dense row-major tensor into the four parts, stored with values of `dtype`.
    pub fn encode(
        &mut self,
        values: &[f32],
        shape: &[usize],
        dtype: Dtype,
    ) -> Result<[SparsePart<'_>; 4], SparseError> {
        let (rows, cols) = dims(shape)?;
        if values.len() != rows * cols {
            return Err(SparseError::Len { shape: shape.to_vec(), expected: rows * cols, len: values.len() });
        }
        match dtype {
            Dtype::F32 => self.fill::<f32>(values, rows, cols),
            Dtype::F16 => self.fill::<f16>(values, rows, cols),
            Dtype::BF16 => self.fill::<bf16>(values, rows, cols),
            other => return Err(SparseError::Dtype { dtype: other }),
        }
        let nnz = self.compressed.len() / value_size(dtype)?;
        let part = |suffix, dtype, shape, data| SparsePart { suffix, dtype, shape, data };
        Ok([
            part(SUFFIXES[0], Dtype::I64, vec![2], &self.shape),
            part(SUFFIXES[1], Dtype::U8, vec![rows, cols.div_ceil(8)], &self.bitmask),
            part(SUFFIXES[2], Dtype::I64, vec![rows], &self.row_offsets),
            part(SUFFIXES[3], dtype, vec![nnz], &self.compressed),
        ])
    }

    fn fill<E: Elem>(&mut self, values: &[f32], rows: usize, cols: usize) {
        self.shape.clear();
        for d in [rows, cols] {
            self.shape.extend_from_slice(&(d as i64).to_le_bytes());
        }
        let row_bytes = cols.div_ceil(8);
        self.bitmask.clear();
        self.bitmask.resize(rows * row_bytes, 0);
        self.counts.clear();
        self.counts.resize(rows, 0);
        if cols > 0 {
            // Pass 1: bitmask and kept count per row.
            values
                .par_chunks(cols)
                .zip(self.bitmask.par_chunks_mut(row_bytes))
                .zip(self.counts.par_iter_mut())
                .for_each_init(Vec::new, |scratch, ((src, mask), count)| {
                    let row = E::row(src, scratch);
                    for (byte, group) in mask.iter_mut().zip(row.chunks(8)) {
                        let mut bits = 0u8;
                        for (b, e) in group.iter().enumerate() {
                            bits |= u8::from(e.is_nonzero()) << b;
                        }
                        *byte = bits;
                    }
                    *count = mask.iter().map(|b| b.count_ones() as usize).sum();
                });
        }
        self.row_offsets.clear();
        let mut nnz = 0usize;
        for &c in &self.counts {
            self.row_offsets.extend_from_slice(&(nnz as i64).to_le_bytes());
            nnz += c;
        }
        self.compressed.clear();
        self.compressed.resize(nnz * E::SIZE, 0);
        if cols == 0 || nnz == 0 {
            return;
        }
        // Pass 2: every row compacts its kept values into its own slice of `compressed`.
        let mut dsts: Vec<&mut [u8]> = Vec::with_capacity(rows);
        let mut rest = self.compressed.as_mut_slice();
        for &c in &self.counts {
            let (head, tail) = rest.split_at_mut(c * E::SIZE);
            dsts.push(head);
            rest = tail;
        }
        values.par_chunks(cols).zip(dsts.into_par_iter()).for_each_init(
            || (Vec::new(), Vec::new()),
            |(scratch, kept), (src, dst)| {
                let row = E::row(src, scratch);
                // Branch-free compaction: always write, advance only past kept values (j <= i < cols).
                kept.resize(cols, E::default());
                let mut j = 0;
                for &e in row {
                    kept[j] = e;
                    j += usize::from(e.is_nonzero());
                }
                for (out, e) in dst.chunks_exact_mut(E::SIZE).zip(&kept[..j]) {
                    e.put(out);
                }
            },
        );
    }
}

fn dims(shape: &[usize]) -> Result<(usize, usize), SparseError> {
    match shape {
        &[rows, cols] => Ok((rows, cols)),
        _ => Err(SparseError::Rank { shape: shape.to_vec() }),
    }
}

fn value_size(dtype: Dtype) -> Result<usize, SparseError> {
    match dtype {
        Dtype::F32 => Ok(4),
        Dtype::F16 | Dtype::BF16 => Ok(2),
        other => Err(SparseError::Dtype { dtype: other }),
    }
}

/// Decodes the four parts' bytes back to the dense shape and f32 values (for checks and tests).
pub fn decode(
    shape: &[u8],
    bitmask: &[u8],
    row_offsets: &[u8],
    compressed: &[u8],
    dtype: Dtype,
) -> Result<(Vec<usize>, Vec<f32>), SparseError> {
    let bad = |part, reason: String| SparseError::Malformed { part, reason };
    if shape.len() != 16 {
        return Err(bad("shape", format!("{} bytes, expected 16", shape.len())));
    }
    let dim = |i: usize| i64::from_le_bytes(shape[8 * i..8 * i + 8].try_into().unwrap());
    let (rows, cols) = (dim(0), dim(1));
    if rows < 0 || cols < 0 {
        return Err(bad("shape", format!("negative dims [{rows}, {cols}]")));
    }
    let (rows, cols) = (rows as usize, cols as usize);
    let row_bytes = cols.div_ceil(8);
    if bitmask.len() != rows * row_bytes {
        return Err(bad("bitmask", format!("{} bytes for [{rows}, {cols}]", bitmask.len())));
    }
    if row_offsets.len() != 8 * rows {
        return Err(bad("row_offsets", format!("{} bytes for {rows} rows", row_offsets.len())));
    }
    let size = value_size(dtype)?;
    let value = |i: usize| -> f32 {
        let b = &compressed[i * size..(i + 1) * size];
        match dtype {
            Dtype::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            Dtype::F16 => f16::from_le_bytes(b.try_into().unwrap()).to_f32(),
            _ => bf16::from_le_bytes(b.try_into().unwrap()).to_f32(),
        }
    };
    let nnz = compressed.len() / size;
    let mut dense = vec![0f32; rows * cols];
    let mut next = 0usize;
    for r in 0..rows {
        let offset = i64::from_le_bytes(row_offsets[8 * r..8 * r + 8].try_into().unwrap());
        if offset != next as i64 {
            return Err(bad("row_offsets", format!("row {r} starts at {offset}, expected {next}")));
        }
        for c in 0..cols {
            if bitmask[r * row_bytes + c / 8] >> (c % 8) & 1 == 1 {
                if next >= nnz {
                    return Err(bad("compressed", format!("only {nnz} values")));
                }
                dense[r * cols + c] = value(next);
                next += 1;
            }
        }
    }
    if next != nnz || !compressed.len().is_multiple_of(size) {
        return Err(bad("compressed", format!("{} bytes, bitmask keeps {next}", compressed.len())));
    }
    Ok((vec![rows, cols], dense))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::prune::prune_magnitude;
    use crate::compress::synth::benchmark_matrix;

    /// Independent of [`decode`]: numpy's `unpackbits(bitorder="little")`, then a boolean-mask scatter.
    fn numpy_style_decode(parts: &[SparsePart<'_>; 4]) -> Vec<f32> {
        let i64s = |b: &[u8]| -> Vec<i64> { b.chunks(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect() };
        let shape = i64s(parts[0].data);
        let (rows, cols) = (shape[0] as usize, shape[1] as usize);
        let mask: Vec<bool> = parts[1]
            .data
            .chunks(cols.div_ceil(8).max(1))
            .take(rows)
            .flat_map(|row| (0..cols).map(move |c| row[c / 8] & (1 << (c % 8)) != 0))
            .collect();
        let values: Vec<f32> = match parts[3].dtype {
            Dtype::F32 => parts[3].data.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            Dtype::F16 => parts[3].data.chunks(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            _ => parts[3].data.chunks(2).map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        let mut counts = 0i64;
        for (r, offset) in i64s(parts[2].data).into_iter().enumerate() {
            assert_eq!(offset, counts, "row_offsets[{r}]");
            counts += mask[r * cols..(r + 1) * cols].iter().filter(|m| **m).count() as i64;
        }
        let mut it = values.into_iter();
        let dense: Vec<f32> = mask.iter().map(|&m| if m { it.next().unwrap() } else { 0.0 }).collect();
        assert!(it.next().is_none(), "values left over");
        dense
    }

    #[test]
    fn the_sparse_encoding_decodes_to_the_dense_input_exactly() {
        let mut enc = SparseEncoder::new();
        for (rows, cols) in [(37, 61), (8, 8), (3, 1), (0, 5), (4, 0)] {
            let mut data = benchmark_matrix(rows.max(1), cols.max(1), 7);
            data.truncate(rows * cols);
            prune_magnitude(&mut data, 0.5).unwrap();
            data.iter_mut().step_by(11).for_each(|x| *x = -0.0);
            let parts = enc.encode(&data, &[rows, cols], Dtype::F32).unwrap();
            assert_eq!(numpy_style_decode(&parts), data, "{rows}x{cols}");
            let (shape, dense) =
                decode(parts[0].data, parts[1].data, parts[2].data, parts[3].data, Dtype::F32).unwrap();
            assert_eq!((shape, dense), (vec![rows, cols], data.clone()));
            for part in &parts {
                let elems: usize = part.shape.iter().product();
                assert_eq!(part.data.len(), elems * part.dtype.size(), "{}", part.suffix);
            }
        }
    }

    #[test]
    fn half_precision_parts_hold_the_rounded_values() {
        let mut data = benchmark_matrix(16, 40, 3);
        prune_magnitude(&mut data, 0.5).unwrap();
        data[1] = 1e-9; // rounds to zero in f16: dropped from the mask, as torch's `!= 0` would
        let mut enc = SparseEncoder::new();
        for dtype in [Dtype::F16, Dtype::BF16] {
            let parts = enc.encode(&data, &[16, 40], dtype).unwrap();
            let want: Vec<f32> = match dtype {
                Dtype::F16 => data.iter().map(|x| f16::from_f32(*x).to_f32()).collect(),
                _ => data.iter().map(|x| bf16::from_f32(*x).to_f32()).collect(),
            };
            assert_eq!(numpy_style_decode(&parts), want, "{dtype:?}");
        }
    }

    #[test]
    fn half_sparse_f32_shrinks_to_about_53_percent_as_predicted() {
        let mut data = benchmark_matrix(256, 512, 5);
        prune_magnitude(&mut data, 0.5).unwrap();
        let mut enc = SparseEncoder::new();
        let parts = enc.encode(&data, &[256, 512], Dtype::F32).unwrap();
        let bytes: usize = parts.iter().map(|p| p.data.len()).sum();
        assert_eq!(bytes as u64, predicted_bytes(&[256, 512], 256 * 512 / 2, Dtype::F32).unwrap());
        let ratio = bytes as f64 / (data.len() * 4) as f64;
        assert!((0.53..0.54).contains(&ratio), "ratio {ratio}");
        assert_eq!(part_prefix("model.layers.0.mlp.up_proj.weight"), "model.layers.0.mlp.up_proj");
    }

    #[test]
    fn unsupported_shapes_dtypes_and_lengths_are_refused() {
        let mut enc = SparseEncoder::new();
        let err = enc.encode(&[0.0; 8], &[2, 2, 2], Dtype::F32).unwrap_err();
        assert_eq!(err.to_string(), "sparse-bitmask stores 2-D tensors only, got shape [2, 2, 2]");
        let err = enc.encode(&[0.0; 4], &[2, 2], Dtype::I8).unwrap_err();
        assert_eq!(err.to_string(), "sparse-bitmask values must be F32, F16 or BF16, got I8");
        let err = enc.encode(&[0.0; 3], &[2, 2], Dtype::F32).unwrap_err();
        assert_eq!(err.to_string(), "tensor of shape [2, 2] needs 4 values, got 3");
    }
}
