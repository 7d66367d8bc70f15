//! Safetensors: header validation (the gate every upload passes) here; tensor reads and the
//! writers in [`io`].
//!
//! Layout: 8-byte little-endian header length `n`, `n` bytes of JSON, then the data region. The
//! JSON maps tensor names to `{dtype, shape, data_offsets: [start, end]}` (relative to the data
//! region) plus an optional `__metadata__` string map.

mod io;
pub mod sharded;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

pub use io::{
    decode_f32, encode_f32, encode_f32_into, start_writeback, InputChanged, PlannedSafetensorsWriter,
    SafetensorsWriter, TensorReader,
};

/// Element types the format defines; anything else in a header is refused. Variants are
/// spelled as in the format so they serialise to the header's own names.
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::BOOL,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8_E5M2,
            "F8_E4M3" => Dtype::F8_E4M3,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E5M2 | Dtype::F8_E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// Floating-point types the kernels read and write losslessly through f32.
    pub fn is_float(self) -> bool {
        matches!(self, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
    }
}

/// One tensor of a validated header; offsets are absolute positions in the file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn bytes(&self) -> u64 {
        self.end - self.start
    }

    /// `(start, end)`: what identifies the tensor's bytes in the file (a start alone does not: an
    /// empty tensor starts where the next one does).
    pub fn span(&self) -> (u64, u64) {
        (self.start, self.end)
    }

    /// The tensor seen as a matrix of rows along its LAST dimension: cols = the last dim, rows =
    /// the product of all the others (a channel is every index but the last). This is how GGUF
    /// blocks run, and it gives a mixture-of-experts weight [experts, out, in] one row (and one
    /// per-channel scale, one structured-pruning unit) per expert and output, not per expert.
    pub fn matrix(&self) -> (usize, usize) {
        match self.shape.split_last() {
            Some((&cols, rest)) => (rest.iter().product(), cols),
            None => (1, 1),
        }
    }
}

/// A validated safetensors header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Tensors in file (offset) order.
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    /// 8 + JSON length: where the data region starts.
    pub data_start: u64,
}

impl Header {
    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel() as u64).sum()
    }
}

/// Why a file is not an acceptable safetensors model. The HTTP layer maps `NotSafetensors` to
/// 415, `HeaderTooLarge` to 413 and `Invalid` to 422.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum HeaderError {
    #[error("not a safetensors file: {0}")]
    NotSafetensors(String),
    #[error("safetensors header of {len} bytes exceeds the limit of {limit} bytes")]
    HeaderTooLarge { len: u64, limit: u64 },
    #[error("{detail}")]
    Invalid { detail: String, tensor: Option<String> },
}

fn invalid(tensor: Option<&str>, detail: impl Into<String>) -> HeaderError {
    HeaderError::Invalid { detail: detail.into(), tensor: tensor.map(str::to_owned) }
}

/// Recognises the first bytes of files people upload by mistake, for a precise 415 message.
fn sniff_foreign(prefix: &[u8]) -> Option<&'static str> {
    if prefix.starts_with(b"PK\x03\x04") {
        Some("this is a zip archive (a PyTorch .pt/.bin checkpoint?); export it with safetensors.torch.save_file")
    } else if prefix.len() >= 2 && prefix[0] == 0x80 && (2..=5).contains(&prefix[1]) {
        Some("this is a Python pickle, which ModelPress never loads; export it with safetensors.torch.save_file")
    } else if prefix.starts_with(b"GGUF") {
        Some("this is a GGUF file; upload the original safetensors model")
    } else if prefix.starts_with(b"\x89HDF") {
        Some("this is an HDF5 (Keras) file; export the weights as safetensors")
    } else {
        None
    }
}

/// Length of a text dataset's JSON header: `{"text":{"dtype":"U8","shape":[N],...}}` with N of up
/// to 20 digits fits, padded with spaces (a multiple of 8, so the data stays aligned).
pub const TEXT_HEADER_BYTES: usize = 128;

/// The JSON header of a text dataset of `n` bytes (one U8 tensor `text`, the UTF-8 text a
/// language model is evaluated on), [`TEXT_HEADER_BYTES`] long: the server and the CLI store the
/// same text as the same file.
pub fn text_dataset_header(n: u64) -> Vec<u8> {
    let mut json = format!(r#"{{"text":{{"dtype":"U8","shape":[{n}],"data_offsets":[0,{n}]}}}}"#).into_bytes();
    debug_assert!(json.len() <= TEXT_HEADER_BYTES);
    json.resize(TEXT_HEADER_BYTES, b' ');
    json
}

/// `(k, n)` when `file_name` is visibly shard `k` of an `n`-shard checkpoint, as Hugging Face
/// names them (`model-00001-of-00003.safetensors`); `None` for any other name and for `n` = 1.
pub fn shard_of(file_name: &str) -> Option<(u32, u32)> {
    let base = file_name.rsplit('/').next()?.strip_suffix(".safetensors")?;
    let (head, total) = base.rsplit_once("-of-")?;
    let (_, index) = head.rsplit_once('-')?;
    // transformers writes both numbers with exactly five digits (`{:05d}`); a name like
    // `ckpt-3-of-10.safetensors` is someone's own naming, not a shard.
    let five_digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !five_digits(index) || !five_digits(total) {
        return None;
    }
    let (k, n): (u32, u32) = (index.parse().ok()?, total.parse().ok()?);
    (n > 1 && (1..=n).contains(&k)).then_some((k, n))
}

/// The explanation for refusing a lone shard (see [`shard_of`]).
pub fn lone_shard_detail(file_name: &str, k: u32, n: u32) -> String {
    format!(
        "`{file_name}` is shard {k} of {n} of a sharded checkpoint: compressed alone it would be a fraction of the model. Send the whole folder with its model.safetensors.index.json (over HTTP as a tar body: tar -cf - -C DIR . | curl -T - -H 'Content-Type: application/x-tar' URL; in the CLI, the folder's path)"
    )
}

/// Checks the first bytes of an upload as soon as they arrive: returns the header length when
/// they look like safetensors (`None` while fewer than 9 bytes are known), so an upload can be
/// refused before its body is stored.
///
/// Structure decides first: 8 length bytes then `{`. Only when that fails are the bytes matched
/// against formats people upload by mistake, because a valid header length can itself start
/// with a pickle's magic (a 640-byte header is `80 02 00 ...`).
pub fn check_prefix(prefix: &[u8], header_limit: u64) -> Result<Option<u64>, HeaderError> {
    if prefix.len() < 9 {
        // Four-byte magics are unambiguous: no sane header length starts with them.
        return match sniff_foreign(prefix) {
            Some(what) if !prefix.starts_with(&[0x80]) => Err(HeaderError::NotSafetensors(what.into())),
            _ => Ok(None),
        };
    }
    if prefix[8] != b'{' {
        let what =
            sniff_foreign(prefix).unwrap_or("the first 8 bytes must be the header length followed by a JSON object");
        return Err(HeaderError::NotSafetensors(what.into()));
    }
    let len = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if len > header_limit {
        return Err(HeaderError::HeaderTooLarge { len, limit: header_limit });
    }
    Ok(Some(len))
}

/// Why a complete file too short to hold a header is not safetensors.
pub fn too_short(prefix: &[u8]) -> HeaderError {
    HeaderError::NotSafetensors(sniff_foreign(prefix).unwrap_or("the file is shorter than a safetensors header").into())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Keeps a JSON object's entries in order and with duplicates, which `serde_json::Map` would
/// silently merge.
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensors")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Entries, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// Validates a complete header (`json` is the header's JSON bytes) against the file length.
pub fn parse_header(json: &[u8], file_len: u64) -> Result<Header, HeaderError> {
    parse_header_with(json, Some(file_len))
}

/// [`parse_header`] for a file whose length is not known yet (an upload streaming in without
/// Content-Length): every check but those against the file's length.
pub fn parse_header_unsized(json: &[u8]) -> Result<Header, HeaderError> {
    parse_header_with(json, None)
}

fn parse_header_with(json: &[u8], file_len: Option<u64>) -> Result<Header, HeaderError> {
    let data_start = 8 + json.len() as u64;
    // Without a length, the tensors' own end is the file's end.
    if let Some(file_len) = file_len.filter(|&l| data_start > l) {
        return Err(invalid(
            None,
            format!(
                "file is truncated: the header claims {} bytes but the file has {}",
                json.len(),
                file_len.saturating_sub(8)
            ),
        ));
    }
    let text = std::str::from_utf8(json).map_err(|_| invalid(None, "header is not UTF-8"))?;
    // Safetensors pads the header with trailing spaces to align the data region.
    let Entries(entries) = serde_json::from_str(text.trim_end_matches(' '))
        .map_err(|e| invalid(None, format!("header is not a valid JSON object: {e}")))?;

    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(entries.len());
    let mut seen = std::collections::HashSet::with_capacity(entries.len());
    for (name, value) in entries {
        if !seen.insert(name.clone()) {
            return Err(invalid(Some(&name), format!("tensor `{name}` appears twice in the header")));
        }
        if name == "__metadata__" {
            metadata = serde_json::from_value(value)
                .map_err(|_| invalid(None, "`__metadata__` must map strings to strings"))?;
            continue;
        }
        let raw: RawEntry =
            serde_json::from_value(value).map_err(|e| invalid(Some(&name), format!("tensor `{name}`: {e}")))?;
        let dtype = Dtype::parse(&raw.dtype)
            .ok_or_else(|| invalid(Some(&name), format!("tensor `{name}`: unknown dtype `{}`", raw.dtype)))?;
        let numel = raw
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid(Some(&name), format!("tensor `{name}`: shape overflows")))?;
        let (start, end) = raw.data_offsets;
        let expected = numel.checked_mul(dtype.size() as u64);
        if end < start || Some(end - start) != expected {
            return Err(invalid(
                Some(&name),
                format!(
                    "tensor `{name}`: data_offsets [{start}, {end}] hold {} bytes but shape {:?} of {} needs {}",
                    end.saturating_sub(start),
                    raw.shape,
                    dtype.as_str(),
                    expected.map_or("more than 2^64".to_string(), |e| e.to_string())
                ),
            ));
        }
        let shape = raw.shape.iter().map(|&d| d as usize).collect();
        let (Some(abs_start), Some(abs_end)) = (data_start.checked_add(start), data_start.checked_add(end)) else {
            return Err(invalid(
                Some(&name),
                format!("tensor `{name}`: data_offsets [{start}, {end}] lie past any file"),
            ));
        };
        tensors.push(TensorInfo { name, dtype, shape, start: abs_start, end: abs_end });
    }

    // Offsets must tile the data region exactly: no gaps, no overlaps, no trailing bytes.
    tensors.sort_by_key(|t| (t.start, t.end));
    let mut cursor = data_start;
    for t in &tensors {
        if t.start != cursor {
            let what = if t.start < cursor { "overlaps the previous tensor" } else { "leaves a gap before it" };
            return Err(invalid(
                Some(&t.name),
                format!(
                    "tensor `{}`: data starts at offset {} which {what} (expected {})",
                    t.name,
                    t.start - data_start,
                    cursor - data_start
                ),
            ));
        }
        cursor = t.end;
    }
    let file_len = file_len.unwrap_or(cursor);
    if cursor != file_len {
        let detail = if cursor > file_len {
            let t = tensors.iter().find(|t| t.end > file_len).expect("one tensor passes the end");
            return Err(invalid(
                Some(&t.name),
                format!(
                    "file is truncated: tensor `{}` ends at byte {} of the data but the file holds {}",
                    t.name,
                    t.end - data_start,
                    file_len - data_start
                ),
            ));
        } else {
            format!("{} trailing bytes after the last tensor", file_len - cursor)
        };
        return Err(invalid(None, detail));
    }
    Ok(Header { tensors, metadata, data_start })
}

/// Reads and validates the header of a file on disk.
pub fn read_header(path: &Path, header_limit: u64) -> Result<Header, ReadError> {
    let file = File::open(path)?;
    let file_len = file.metadata()?.len();
    let mut prefix = [0u8; 9];
    let n = file.read_at(&mut prefix, 0)?;
    let len = check_prefix(&prefix[..n], header_limit)?.ok_or_else(|| too_short(&prefix[..n]))?;
    if 8 + len > file_len {
        return Err(invalid(
            None,
            format!("file is truncated: the header claims {len} bytes but the file has {}", file_len - 8),
        )
        .into());
    }
    let mut json = vec![0u8; len as usize];
    file.read_exact_at(&mut json, 8)?;
    Ok(parse_header(&json, file_len)?)
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Header(#[from] HeaderError),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_header_without_a_file_length_is_checked_for_everything_else() {
        use super::parse_header_unsized;
        let ok = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[2],"data_offsets":[8,12]}}"#;
        let h = parse_header_unsized(ok).unwrap();
        assert_eq!(h.tensors.len(), 2);
        assert_eq!(h.tensors[1].end, 8 + ok.len() as u64 + 12, "the tensors' end stands for the file's");
        let gap = br#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#;
        assert!(parse_header_unsized(gap).unwrap_err().to_string().contains("gap"));
        let wrong = br#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        assert!(parse_header_unsized(wrong).is_err());
    }

    #[test]
    fn shards_are_recognised_by_their_hugging_face_names() {
        use super::shard_of;
        assert_eq!(shard_of("model-00001-of-00003.safetensors"), Some((1, 3)));
        assert_eq!(shard_of("dir/model-00002-of-00002.safetensors"), Some((2, 2)));
        assert_eq!(shard_of("model-00001-of-00001.safetensors"), None, "one shard is the whole model");
        for whole in
            ["model.safetensors", "my-model-of-doom.safetensors", "x-1-of-two.safetensors", "m-00001-of-00003.bin"]
        {
            assert_eq!(shard_of(whole), None, "{whole}");
        }
    }

    use super::*;

    fn file_bytes(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(0u8, data_len));
        v
    }

    fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        let len = check_prefix(bytes, 1 << 20)?.expect("prefix") as usize;
        parse_header(&bytes[8..8 + len], bytes.len() as u64)
    }

    #[test]
    fn a_well_formed_header_is_accepted_in_offset_order() {
        let h = r#"{"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]},"a":{"dtype":"F16","shape":[2,2],"data_offsets":[0,8]},"__metadata__":{"k":"v"}}"#;
        let header = parse(&file_bytes(h, 16)).unwrap();
        assert_eq!(header.tensors[0].name, "a");
        assert_eq!(header.tensors[1].start, 8 + h.len() as u64 + 8);
        assert_eq!(header.metadata["k"], "v");
    }

    #[test]
    fn duplicate_names_are_refused() {
        let h = r#"{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        let err = parse(&file_bytes(h, 2)).unwrap_err();
        assert_eq!(err.to_string(), "tensor `a` appears twice in the header");
    }

    #[test]
    fn byte_counts_must_match_shape_times_dtype() {
        let h = r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#;
        let err = parse(&file_bytes(h, 8)).unwrap_err();
        assert!(
            err.to_string().contains("tensor `w`: data_offsets [0, 8] hold 8 bytes but shape [3] of F32 needs 12"),
            "{err}"
        );
    }

    #[test]
    fn gaps_trailing_bytes_and_truncation_are_refused() {
        let gap = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}"#;
        assert!(parse(&file_bytes(gap, 2)).unwrap_err().to_string().contains("leaves a gap"));
        let ok = r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(parse(&file_bytes(ok, 3)).unwrap_err().to_string().contains("2 trailing bytes"));
        let err = parse(&file_bytes(r#"{"w":{"dtype":"U8","shape":[4],"data_offsets":[0,4]}}"#, 2)).unwrap_err();
        assert!(err.to_string().contains("truncated: tensor `w`"), "{err}");
    }

    #[test]
    fn unknown_dtypes_and_foreign_files_are_refused() {
        let h = r#"{"w":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}}"#;
        assert!(parse(&file_bytes(h, 1)).unwrap_err().to_string().contains("unknown dtype `Q4`"));
        assert!(matches!(check_prefix(b"PK\x03\x04rest", 100), Err(HeaderError::NotSafetensors(_))));
        assert!(matches!(check_prefix(b"\x80\x02}q\x00X(K.", 100), Err(HeaderError::NotSafetensors(_))));
        assert!(matches!(check_prefix(b"\x05\0\0\0\0\0\0\0[", 100), Err(HeaderError::NotSafetensors(_))));
        assert_eq!(
            check_prefix(b"\xff\xff\0\0\0\0\0\0{", 100),
            Err(HeaderError::HeaderTooLarge { len: 65535, limit: 100 })
        );
    }
}
