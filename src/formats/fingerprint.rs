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

/// The [`fingerprint`] of `len` bytes of `file` at `offset`, equal to that of the same bytes in
/// memory ([`file_range_facts`] without the count).
pub fn fingerprint_file_range(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<u64> {
    file_range_facts(file, offset, len, None).map(|(print, _)| print)
}

/// The [`fingerprint`] of `len` bytes of `file` at `offset` and, with `element` (bytes per
/// element), how many elements are not all-zero bytes ([`count_nonzero`]). Each piece is read and
/// hashed by whichever core takes it, into a buffer of one piece: the reads run on every core and
/// no buffer of the whole range is held.
pub fn file_range_facts(
    file: &std::fs::File,
    offset: u64,
    len: u64,
    element: Option<usize>,
) -> std::io::Result<(u64, u64)> {
    use rayon::prelude::*;
    use std::os::unix::fs::FileExt;
    let chunk = FINGERPRINT_CHUNK as u64;
    let pieces: Vec<(u64, u64)> = (0..len.div_ceil(chunk))
        .into_par_iter()
        .map_init(
            || vec![0u8; FINGERPRINT_CHUNK],
            |buf, k| {
                let n = chunk.min(len - k * chunk) as usize;
                file.read_exact_at(&mut buf[..n], offset + k * chunk)?;
                Ok((piece_fingerprint(&buf[..n]), element.map_or(0, |size| count_nonzero(&buf[..n], size))))
            },
        )
        .collect::<std::io::Result<_>>()?;
    let prints: Vec<u64> = pieces.iter().map(|p| p.0).collect();
    Ok((fold_fingerprints(&prints, len as usize), pieces.iter().map(|p| p.1).sum()))
}

/// [`file_range_facts`] of bytes in memory, in one parallel pass: their [`fingerprint`] and how
/// many of their `element`-byte elements are not all-zero bytes. The two must agree: the engine
/// compares what one path learned of a tensor with what the other did.
pub fn bytes_facts(bytes: &[u8], element: usize) -> (u64, u64) {
    use rayon::prelude::*;
    let pieces: Vec<(u64, u64)> = bytes
        .par_chunks(FINGERPRINT_CHUNK)
        .map(|piece| (piece_fingerprint(piece), count_nonzero(piece, element)))
        .collect();
    let prints: Vec<u64> = pieces.iter().map(|p| p.0).collect();
    (fold_fingerprints(&prints, bytes.len()), pieces.iter().map(|p| p.1).sum())
}

/// How many `size`-byte elements of `bytes` are not all-zero bytes (whole words per element
/// size, so the count vectorises). Every element size divides [`FINGERPRINT_CHUNK`], so counts
/// of pieces add up.
pub fn count_nonzero(bytes: &[u8], size: usize) -> u64 {
    (match size {
        2 => bytes.chunks_exact(2).filter(|c| u16::from_ne_bytes([c[0], c[1]]) != 0).count(),
        4 => bytes.chunks_exact(4).filter(|c| u32::from_ne_bytes((*c).try_into().expect("4")) != 0).count(),
        8 => bytes.chunks_exact(8).filter(|c| u64::from_ne_bytes((*c).try_into().expect("8")) != 0).count(),
        _ => bytes.chunks_exact(size.max(1)).filter(|c| c.iter().any(|x| *x != 0)).count(),
    }) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_range_has_the_fingerprint_of_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let bytes: Vec<u8> = (0..3 * FINGERPRINT_CHUNK + 1234).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        for (at, len) in [(0, bytes.len()), (5, 2 * FINGERPRINT_CHUNK), (100, 0), (17, 300)] {
            assert_eq!(
                fingerprint_file_range(&file, at as u64, len as u64).unwrap(),
                fingerprint(&bytes[at..at + len])
            );
        }
        assert!(fingerprint_file_range(&file, 10, bytes.len() as u64).is_err(), "a range past the end");
        let zeros = bytes[4..].chunks_exact(4).filter(|c| c == &[0u8; 4]).count() as u64;
        let len = (bytes.len() - 4) / 4 * 4;
        assert_eq!(file_range_facts(&file, 4, len as u64, Some(4)).unwrap().1, len as u64 / 4 - zeros);
        // The same facts from the bytes in memory.
        assert_eq!(file_range_facts(&file, 4, len as u64, Some(4)).unwrap(), bytes_facts(&bytes[4..4 + len], 4));
    }
}
