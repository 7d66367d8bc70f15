//! A fast, order-sensitive 64-bit fingerprint of byte strings, computed in parallel pieces.
//! The engine compares with it what it meant to write with what each output decodes to, and what
//! two reads of the same input region returned (a file changed under a job).

const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0x27D4_EB2F_1656_67C5];

/// Bytes per piece of a [`fingerprint`]: pieces are hashed in parallel and folded in order. Every
/// float dtype's size divides it, so a piece of encoded values is whole values.
pub const FINGERPRINT_CHUNK: usize = 1 << 18;

/// Order-sensitive 64-bit fingerprint of a byte string: each piece of [`FINGERPRINT_CHUNK`]
/// bytes gets four independent multiply-xorshift lanes over 8-byte words, the pieces are folded
/// in order with the length ([`fold_fingerprints`]). Not cryptographic: it compares what the
/// engine meant to write with what a layout decodes to, and two reads of the same input bytes.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    use rayon::prelude::*;
    let pieces: Vec<u64> = bytes.par_chunks(FINGERPRINT_CHUNK).map(piece_fingerprint).collect();
    fold_fingerprints(&pieces, bytes.len())
}

/// The fingerprint of a byte string of `len` bytes from its pieces' fingerprints, in order.
pub fn fold_fingerprints(pieces: &[u64], len: usize) -> u64 {
    pieces.iter().fold(len as u64, |h, p| (h ^ p).wrapping_mul(K[1]).rotate_left(29))
}

/// The fingerprint of one piece (at most [`FINGERPRINT_CHUNK`] bytes).
pub fn piece_fingerprint(bytes: &[u8]) -> u64 {
    let mut lanes = K;
    let mut chunks = bytes.chunks_exact(32);
    for c in &mut chunks {
        for (i, lane) in lanes.iter_mut().enumerate() {
            let w = u64::from_le_bytes(c[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            *lane = (*lane ^ w).wrapping_mul(K[i]).rotate_left(31);
        }
    }
    let mut tail = [0u8; 32];
    let rest = chunks.remainder();
    tail[..rest.len()].copy_from_slice(rest);
    for (i, lane) in lanes.iter_mut().enumerate() {
        let w = u64::from_le_bytes(tail[8 * i..8 * i + 8].try_into().expect("8 bytes"));
        *lane = (*lane ^ w).wrapping_mul(K[i]).rotate_left(31);
    }
    lanes.iter().fold(bytes.len() as u64, |h, l| (h ^ l).wrapping_mul(K[0]).rotate_left(27))
}
