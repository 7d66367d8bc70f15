//! compressed-tensors `pack-quantized` int32 packing (`compressors/quantized_compressors/pack_quantized.py`,
//! `pack_to_int32` / `unpack_from_int32`).
//!
//! Each signed code is offset by `2^(b-1)` to unsigned; `32 / b` values share one int32 word, value `j` of
//! the word at bits `[j*b, j*b + b)`; i.e. element `i` of a row sits at bits `[i*b, i*b + b)` of a
//! little-endian stream of 32-bit words. Each row is padded with zeros (unsigned 0, i.e. code `-2^(b-1)`)
//! to a whole word on its own: `weight_packed` is `[rows, ceil(cols * b / 32)]`.
//!
//! Asymmetric channel/group zero points (`weight_zero_point`, `[rows, groups]` int8) are packed with the
//! same function along dim 0 (`packed_dim=0`): the columns of the zero-point matrix are packed, giving
//! int32 `[ceil(rows * b / 32), groups]` (see [`pack_zero_points`]). A per-tensor zero point is not packed.

use rayon::prelude::*;

/// int32 words per packed row of `cols` values at `bits` bits.
pub fn packed_len(cols: usize, bits: u8) -> usize {
    (cols * bits as usize).div_ceil(32)
}

/// Packs one row at `B` bits. Full words go through [`swar_word`]; the padded tail word bit by bit.
#[inline]
fn pack_row<const B: usize>(row: &[i8], out: &mut [i32]) {
    let per_word = 32 / B;
    let full = row.chunks_exact(per_word);
    let tail = full.remainder();
    let mut words = out.iter_mut();
    // `full` first: zip must not pull (and lose) the tail's word when the full words run out.
    for (vals, w) in full.zip(words.by_ref()) {
        *w = swar_word::<B>(vals) as i32;
    }
    if let Some(w) = words.next() {
        let offset = 1i32 << (B - 1);
        let mask = (1u32 << B) - 1;
        *w = tail.iter().enumerate().fold(0u32, |w, (j, &v)| w | (((v as i32 + offset) as u32 & mask) << (j * B)))
            as i32;
    }
}

/// One full word from `32 / B` codes with 64-bit lane tricks instead of a shift per value (the per-value
/// loop made int4 packing as slow as quantizing). For a `B`-bit signed code, `code + 2^(B-1)` equals its
/// low `B` bits XOR `2^(B-1)`; then neighbouring fields are merged pairwise: 8 -> 4 -> 2 -> 1 per lane.
#[inline(always)]
fn swar_word<const B: usize>(vals: &[i8]) -> u32 {
    let lane = |v: &[i8]| u64::from_le_bytes(std::array::from_fn(|j| v[j] as u8));
    match B {
        8 => u32::from_le_bytes(std::array::from_fn(|j| vals[j] as u8)) ^ 0x8080_8080,
        4 => {
            let mut x = (lane(vals) & 0x0F0F_0F0F_0F0F_0F0F) ^ 0x0808_0808_0808_0808;
            x = (x | (x >> 4)) & 0x00FF_00FF_00FF_00FF;
            x = (x | (x >> 8)) & 0x0000_FFFF_0000_FFFF;
            (x | (x >> 16)) as u32
        }
        _ => {
            let two = |v: &[i8]| {
                let mut x = (lane(v) & 0x0303_0303_0303_0303) ^ 0x0202_0202_0202_0202;
                x = (x | (x >> 6)) & 0x000F_000F_000F_000F;
                x = (x | (x >> 12)) & 0x0000_00FF_0000_00FF;
                (x | (x >> 24)) as u32 & 0xFFFF
            };
            two(&vals[..8]) | (two(&vals[8..16]) << 16)
        }
    }
}

/// Packs `rows x cols` codes into `out` (`rows * packed_len(cols, bits)` words), rows in parallel.
pub fn pack_int32_into(codes: &[i8], rows: usize, cols: usize, bits: u8, out: &mut [i32]) {
    assert!(matches!(bits, 2 | 4 | 8), "bits must be 2, 4 or 8, got {bits}");
    assert_eq!(codes.len(), rows * cols, "codes must hold rows*cols = {rows}*{cols} values");
    let words = packed_len(cols, bits);
    assert_eq!(out.len(), rows * words, "out must hold rows*packed_len = {rows}*{words} words");
    if rows * cols == 0 {
        return;
    }
    // 32 rows per task: a 4096-column int4 matrix gives 128 tasks of 128 KiB of codes.
    let rows_per_task = 32;
    out.par_chunks_mut(words * rows_per_task).zip(codes.par_chunks(cols * rows_per_task)).for_each(|(o, c)| {
        for (o, c) in o.chunks_exact_mut(words).zip(c.chunks_exact(cols)) {
            match bits {
                2 => pack_row::<2>(c, o),
                4 => pack_row::<4>(c, o),
                _ => pack_row::<8>(c, o),
            }
        }
    });
}

/// compressed-tensors `weight_packed`: `[rows, ceil(cols * bits / 32)]` int32, row-major.
pub fn pack_int32(codes: &[i8], rows: usize, cols: usize, bits: u8) -> Vec<i32> {
    let mut out = vec![0i32; rows * packed_len(cols, bits)];
    pack_int32_into(codes, rows, cols, bits, &mut out);
    out
}

/// Inverse of [`pack_int32`]: `rows x cols` signed codes, padding dropped.
pub fn unpack_int32(packed: &[i32], rows: usize, cols: usize, bits: u8) -> Vec<i8> {
    let words = packed_len(cols, bits);
    assert_eq!(packed.len(), rows * words, "packed must hold rows*packed_len = {rows}*{words} words");
    let per_word = 32 / bits as usize;
    let offset = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = Vec::with_capacity(rows * cols);
    for row in packed.chunks_exact(words.max(1)).take(rows) {
        for i in 0..cols {
            let word = row[i / per_word] as u32;
            let v = (word >> ((i % per_word) * bits as usize)) & mask;
            out.push((v as i32 - offset) as i8);
        }
    }
    out
}

/// compressed-tensors `weight_zero_point` for asymmetric channel/group schemes: the `[rows, groups]` zero
/// points packed along rows, giving `[ceil(rows * bits / 32), groups]` int32, row-major.
pub fn pack_zero_points(zps: &[i8], rows: usize, groups: usize, bits: u8) -> Vec<i32> {
    assert_eq!(zps.len(), rows * groups, "zero points must hold rows*groups = {rows}*{groups} values");
    let mut transposed = vec![0i8; zps.len()];
    for r in 0..rows {
        for g in 0..groups {
            transposed[g * rows + r] = zps[r * groups + g];
        }
    }
    transpose_i32(&pack_int32(&transposed, groups, rows, bits), groups, packed_len(rows, bits))
}

/// Inverse of [`pack_zero_points`]: `[rows, groups]` signed zero points.
pub fn unpack_zero_points(packed: &[i32], rows: usize, groups: usize, bits: u8) -> Vec<i8> {
    let words = packed_len(rows, bits);
    let by_group = unpack_int32(&transpose_i32(packed, words, groups), groups, rows, bits);
    let mut out = vec![0i8; rows * groups];
    for g in 0..groups {
        for r in 0..rows {
            out[r * groups + g] = by_group[g * rows + r];
        }
    }
    out
}

fn transpose_i32(m: &[i32], rows: usize, cols: usize) -> Vec<i32> {
    let mut t = vec![0i32; m.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = m[r * cols + c];
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn int4_row_packs_to_hand_computed_words() {
        // unsigned nibbles 0,1,7,8,9,15,11,15 | 13: low nibble first, the row padded to 2 words.
        let codes = [-8, -7, -1, 0, 1, 7, 3, 7, 5];
        assert_eq!(pack_int32(&codes, 1, 9, 4), vec![0xFBF9_8710_u32 as i32, 0xD]);
    }

    #[test]
    fn int8_row_packs_to_hand_computed_words() {
        // compressed-tensors' docstring example: [1, 2] -> [129, 130] -> 33409.
        assert_eq!(pack_int32(&[1, 2], 1, 2, 8), vec![33409]);
        let codes = [-128, 127, 0, -1, 5];
        assert_eq!(pack_int32(&codes, 1, 5, 8), vec![0x7F80_FF00, 0x85]);
    }

    #[test]
    fn int2_row_packs_to_hand_computed_words() {
        // codes cycle -2,-1,0,1 -> unsigned 0,1,2,3 -> one byte 0b11_10_01_00 = 0xE4 per four values.
        let codes: Vec<i8> = (0..18).map(|i| [-2, -1, 0, 1][i % 4]).collect();
        assert_eq!(pack_int32(&codes, 1, 18, 2), vec![0xE4E4_E4E4_u32 as i32, 0x4]);
    }

    #[test]
    fn rows_are_padded_independently() {
        let codes: Vec<i8> = vec![7, 7, 7, -8, -8, -8];
        // Two rows of 3 int4 values: each row gets its own word.
        assert_eq!(pack_int32(&codes, 2, 3, 4), vec![0xFFF, 0x000]);
    }

    #[test]
    fn zero_points_pack_along_rows_into_hand_computed_words() {
        // [rows=3, groups=2]: column 0 = [-8, 7, 2] -> 0,15,10; column 1 = [1, 0, -1] -> 9,8,7.
        let zps = [-8, 1, 7, 0, 2, -1];
        let packed = pack_zero_points(&zps, 3, 2, 4);
        assert_eq!(packed, vec![0xAF0, 0x789]);
        assert_eq!(unpack_zero_points(&packed, 3, 2, 4), zps.to_vec());
    }

    fn codes_strategy() -> impl Strategy<Value = (u8, usize, usize, Vec<i8>)> {
        (prop_oneof![Just(2u8), Just(4u8), Just(8u8)], 1usize..6, 1usize..70).prop_flat_map(|(bits, rows, cols)| {
            let half = 1i16 << (bits - 1);
            let codes = prop::collection::vec((-half..half).prop_map(|v| v as i8), rows * cols);
            (Just(bits), Just(rows), Just(cols), codes)
        })
    }

    proptest! {
        #[test]
        fn unpacking_packed_codes_gives_them_back((bits, rows, cols, codes) in codes_strategy()) {
            let packed = pack_int32(&codes, rows, cols, bits);
            prop_assert_eq!(packed.len(), rows * packed_len(cols, bits));
            prop_assert_eq!(unpack_int32(&packed, rows, cols, bits), codes);
        }

        #[test]
        fn unpacking_packed_zero_points_gives_them_back((bits, rows, groups, zps) in codes_strategy()) {
            let packed = pack_zero_points(&zps, rows, groups, bits);
            prop_assert_eq!(packed.len(), packed_len(rows, bits) * groups);
            prop_assert_eq!(unpack_zero_points(&packed, rows, groups, bits), zps);
        }
    }
}
