//! The agreement check run at the end of every job: each written layout is read back from disk,
//! decoded the way its loader would, and compared bit for bit (zeros of either sign being one
//! number) with the dense values the report describes. A layout that decodes to anything else fails the job (`layout_mismatch`).
//!
//! Memory stays bounded: the main pass keeps one 64-bit fingerprint per tensor of its dense bytes
//! (in the tensor's own dtype); here each output is read one tensor at a time, decoded to f32,
//! re-encoded in that dtype and fingerprinted.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use candle_core::quantized::gguf_file;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{ArtifactFile, EngineError};
use crate::compress::ggml;
use crate::compress::layout::compressed_tensors as ct;
use crate::compress::quant::{packed_len, unpack_int32, unpack_zero_points};
use crate::formats::gguf::llama_cpp::{self, LlamaCppModel};
use crate::formats::gguf::GgufType;
use crate::formats::hf::{check_index, FolderError};
use crate::formats::safetensors::sharded::INDEX_FILE;
use crate::formats::safetensors::{decode_f32, encode_f32_into, read_header, Dtype, Header, TensorInfo, TensorReader};

/// What the agreement check did for one output, for the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputCheck {
    pub artifact: String,
    pub format: String,
    /// Tensors decoded from the file and found equal, bit for bit, to the dense output's values.
    pub tensors_checked: usize,
    /// Of those, how many were stored in a compressed form (packed codes, GGUF blocks, bitmask).
    pub tensors_decoded: usize,
}

impl OutputCheck {
    fn new(a: &ArtifactFile, tensors_checked: usize, tensors_decoded: usize) -> Self {
        OutputCheck { artifact: a.name.clone(), format: a.format.clone(), tensors_checked, tensors_decoded }
    }
}

pub use crate::formats::fingerprint::{fingerprint, fold_fingerprints, piece_fingerprint, FINGERPRINT_CHUNK};

/// Reused buffers of the check.
#[derive(Default)]
struct Scratch {
    values: Vec<f32>,
    encoded: Vec<u8>,
    raw: Vec<u8>,
}

impl Scratch {
    /// Fingerprint of `self.values` encoded in `dtype`, as the dense output stores them. Zeros
    /// count as +0.0, as the engine writes them (a GGUF block with a zero scale decodes its
    /// negative codes to -0.0, which is the same number).
    fn values_fp(&mut self, dtype: Dtype) -> u64 {
        let per = FINGERPRINT_CHUNK / dtype.size();
        let len = self.values.len() * dtype.size();
        // f32 values are their own encoding: fingerprinted in place, as the engine does.
        if super::values_are_dense(dtype) {
            self.encoded = Vec::new();
            let pieces: Vec<u64> = self
                .values
                .par_chunks_mut(per)
                .map(|v| {
                    v.iter_mut().for_each(|x| *x += 0.0);
                    piece_fingerprint(bytemuck::cast_slice(v))
                })
                .collect();
            return fold_fingerprints(&pieces, len);
        }
        self.encoded.resize(len, 0);
        // In parallel pieces, each encoded and hashed while in cache (as the engine's own pass).
        let pieces: Vec<u64> = self
            .values
            .par_chunks_mut(per)
            .zip(self.encoded.par_chunks_mut(FINGERPRINT_CHUNK))
            .map(|(v, e)| {
                v.iter_mut().for_each(|x| *x += 0.0);
                encode_f32_into(v, dtype, e);
                piece_fingerprint(e)
            })
            .collect();
        fold_fingerprints(&pieces, len)
    }
}

fn mismatch(tensor: &str, detail: impl Into<String>) -> EngineError {
    EngineError::Tensor { tensor: tensor.into(), code: "layout_mismatch", detail: detail.into() }
}

fn bad_file(artifact: &str, detail: impl std::fmt::Display) -> EngineError {
    EngineError::Tensor { tensor: "(output)".into(), code: "layout_mismatch", detail: format!("{artifact}: {detail}") }
}

/// Checks every model artifact against the expected fingerprints (tensor name -> fingerprint of its
/// dense bytes). `tensors` gives each input tensor's dtype and shape.
pub fn verify(
    artifacts: &[ArtifactFile],
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    llama: Option<&LlamaCppModel>,
) -> Result<Vec<OutputCheck>, EngineError> {
    let mut checks = Vec::new();
    let mut s = Scratch::default();
    let sharded = |format: &str| artifacts.iter().any(|b| b.format == format && b.name.ends_with(INDEX_FILE));
    let mut covered: HashMap<&str, usize> = HashMap::new();
    for a in artifacts {
        let shard;
        let tensors = if a.name.ends_with(".safetensors") && sharded(&a.format) {
            shard = in_shard(a, tensors)?;
            *covered.entry(a.format.as_str()).or_default() += shard.len();
            &shard[..]
        } else {
            tensors
        };
        let check = match (a.format.as_str(), a.name.ends_with(".safetensors")) {
            ("safetensors", true) => dense(a, tensors, expected, &mut s)?,
            ("compressed-tensors", true) => compressed_tensors(a, tensors, expected, &mut s)?,
            ("sparse", true) => sparse(a, tensors, expected, &mut s)?,
            ("gguf", _) => gguf(a, tensors, expected, llama, &mut s)?,
            _ => continue,
        };
        checks.push(check);
    }
    // Every tensor is in exactly one shard: each shard holds only its own (checked above), and
    // together they hold them all.
    if let Some((format, n)) = covered.iter().find(|(_, n)| **n != tensors.len()) {
        return Err(bad_file(format, format!("the shards hold {n} tensors, expected {}", tensors.len())));
    }
    // The index names exactly the shards' entries, each in the file that holds it: the check an
    // uploaded folder passes.
    for format in covered.into_keys() {
        let index = artifacts
            .iter()
            .find(|b| b.format == format && b.name.ends_with(INDEX_FILE))
            .ok_or_else(|| bad_file(format, "no index"))?;
        let prefix = &index.name[..index.name.len() - INDEX_FILE.len()];
        let shard = |file: &str| {
            let a = artifacts
                .iter()
                .find(|b| b.format == format && b.name == format!("{prefix}{file}"))
                .ok_or_else(|| FolderError::MissingShard(file.into()))?;
            let header =
                read_header(&a.path, u64::MAX).map_err(|e| FolderError::BadShard(file.into(), e.to_string()))?;
            Ok((a.path.clone(), header))
        };
        check_index(&std::fs::read(&index.path)?, shard).map_err(|e| bad_file(&index.name, e))?;
    }
    Ok(checks)
}

/// The tensors of `tensors` one shard of an output holds: by name, or (compressed-tensors) by
/// the packed parts of their module, which a shard never splits.
fn in_shard(a: &ArtifactFile, tensors: &[TensorInfo]) -> Result<Vec<TensorInfo>, EngineError> {
    let header = read_header(&a.path, u64::MAX).map_err(|e| bad_file(&a.name, e))?;
    let names: std::collections::HashSet<&str> = header.tensors.iter().map(|t| t.name.as_str()).collect();
    let held = |t: &TensorInfo| {
        names.contains(t.name.as_str())
            || (a.format == "compressed-tensors"
                && names.contains(ct::part_name(ct::module_of(&t.name), "weight_packed").as_str()))
    };
    Ok(tensors.iter().filter(|t| held(t)).cloned().collect())
}

fn open(a: &ArtifactFile) -> Result<(Header, TensorReader), EngineError> {
    let header = read_header(&a.path, u64::MAX).map_err(|e| bad_file(&a.name, e))?;
    Ok((header, TensorReader::open(&a.path)?))
}

fn compare(name: &str, got: u64, expected: &HashMap<String, u64>, artifact: &str) -> Result<(), EngineError> {
    match expected.get(name) {
        Some(&want) if want == got => Ok(()),
        Some(_) => Err(mismatch(name, format!("{artifact} decodes to values that differ from the dense output"))),
        None => Err(mismatch(name, format!("{artifact} holds a tensor the job did not produce"))),
    }
}

fn raw_entry(
    a: &ArtifactFile,
    header: &Header,
    reader: &mut TensorReader,
    name: &str,
    expected: &HashMap<String, u64>,
) -> Result<(), EngineError> {
    let entry = header.get(name).ok_or_else(|| mismatch(name, format!("{} has no entry `{name}`", a.name)))?;
    let fp = crate::formats::fingerprint::fingerprint_file_range(reader.file(), entry.start, entry.bytes())?;
    compare(name, fp, expected, &a.name)
}

/// Checks every input tensor in a safetensors-based output. `decode` fills `s.values` and returns
/// true for a tensor the layout stores in a compressed form, or returns false for one it stores as
/// is (then its bytes are compared directly).
fn each_tensor(
    a: &ArtifactFile,
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    s: &mut Scratch,
    mut decode: impl FnMut(&TensorInfo, &Header, &mut TensorReader, &mut Scratch) -> Result<bool, EngineError>,
) -> Result<(OutputCheck, Header), EngineError> {
    let (header, mut reader) = open(a)?;
    let mut decoded = 0;
    for t in tensors {
        if decode(t, &header, &mut reader, s)? {
            let fp = s.values_fp(t.dtype);
            compare(&t.name, fp, expected, &a.name)?;
            decoded += 1;
        } else {
            raw_entry(a, &header, &mut reader, &t.name, expected)?;
        }
    }
    Ok((OutputCheck::new(a, tensors.len(), decoded), header))
}

fn dense(
    a: &ArtifactFile,
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    s: &mut Scratch,
) -> Result<OutputCheck, EngineError> {
    let (check, header) = each_tensor(a, tensors, expected, s, |_, _, _, _| Ok(false))?;
    if header.tensors.len() != tensors.len() {
        return Err(bad_file(&a.name, format!("{} tensors, expected {}", header.tensors.len(), tensors.len())));
    }
    Ok(check)
}

/// Reads a whole entry as little-endian i32 words.
fn read_i32(reader: &mut TensorReader, t: &TensorInfo) -> std::io::Result<Vec<i32>> {
    Ok(reader.read_raw(t)?.chunks_exact(4).map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes"))).collect())
}

fn compressed_tensors(
    a: &ArtifactFile,
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    s: &mut Scratch,
) -> Result<OutputCheck, EngineError> {
    let config_path = a.path.with_file_name("config.json");
    let config = ct::QuantizationConfig::from_config_json(&std::fs::read(&config_path)?)
        .map_err(|e| bad_file(&a.name, format!("config.json: {e}")))?;
    let (check, _) = each_tensor(a, tensors, expected, s, |t, header, reader, s| {
        let module = ct::module_of(&t.name);
        let Some(packed) = header.get(&ct::part_name(module, "weight_packed")) else { return Ok(false) };
        let w = config
            .scheme_for(module)
            .ok_or_else(|| mismatch(&t.name, format!("no config group of {} targets `{module}`", a.name)))?;
        let (rows, cols) = t.matrix();
        let part = |suffix: &str| {
            header
                .get(&ct::part_name(module, suffix))
                .ok_or_else(|| mismatch(&t.name, format!("no `{}`", ct::part_name(module, suffix))))
        };
        let shape = read_i32(reader, part("weight_shape")?)?;
        if shape.len() != 4 || [shape[0] as usize, shape[2] as usize] != [rows, cols] {
            return Err(mismatch(
                &t.name,
                format!("weight_shape {shape:?} (i64 words) does not match [{rows}, {cols}]"),
            ));
        }
        if packed.shape != [rows, packed_len(cols, w.num_bits)] {
            return Err(mismatch(&t.name, format!("weight_packed has shape {:?}", packed.shape)));
        }
        let codes = unpack_int32(&read_i32(reader, packed)?, rows, cols, w.num_bits);
        let scale_t = part("weight_scale")?;
        let mut scales = vec![0f32; scale_t.numel()];
        decode_f32(reader.read_raw(scale_t)?, scale_t.dtype, &mut scales);
        let block = match (w.strategy.as_str(), w.group_size) {
            ("tensor", _) => rows * cols,
            ("channel", _) => cols,
            ("group", Some(g)) if g > 0 => g,
            (other, g) => return Err(mismatch(&t.name, format!("strategy {other} with group_size {g:?}"))),
        };
        let zps: Option<Vec<i8>> = if w.symmetric {
            None
        } else {
            let z = part("weight_zero_point")?;
            Some(if z.dtype == Dtype::I8 {
                reader.read_raw(z)?.iter().map(|b| *b as i8).collect()
            } else {
                unpack_zero_points(&read_i32(reader, z)?, rows, scales.len() / rows.max(1), w.num_bits)
            })
        };
        if scales.len() * block != rows * cols {
            return Err(mismatch(&t.name, format!("{} scales for blocks of {block}", scales.len())));
        }
        s.values.resize(rows * cols, 0.0);
        // One block (scale, zero point) at a time, blocks in parallel: (q - zp) * scale.
        s.values.par_chunks_mut(block.max(1)).zip(codes.par_chunks(block.max(1))).enumerate().for_each(
            |(k, (out, q))| {
                let zp = zps.as_ref().map_or(0.0, |z| z[k] as f32);
                out.iter_mut().zip(q).for_each(|(o, &c)| *o = (c as f32 - zp) * scales[k]);
            },
        );
        Ok(true)
    })?;
    Ok(check)
}

fn sparse(
    a: &ArtifactFile,
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    s: &mut Scratch,
) -> Result<OutputCheck, EngineError> {
    let (check, _) = each_tensor(a, tensors, expected, s, |t, header, reader, s| {
        let prefix = crate::formats::sparse::part_prefix(&t.name);
        if header.get(&format!("{prefix}.bitmask")).is_none() {
            return Ok(false);
        }
        let mut parts = Vec::with_capacity(4);
        let mut dtype = Dtype::F32;
        for suffix in ["shape", "bitmask", "row_offsets", "compressed"] {
            let p =
                header.get(&format!("{prefix}.{suffix}")).ok_or_else(|| mismatch(&t.name, format!("no `{suffix}`")))?;
            if suffix == "compressed" {
                dtype = crate::compress::layout::sparse_dtype(p.dtype);
            }
            parts.push(reader.read_raw(p)?.to_vec());
        }
        let (shape, values) = crate::formats::sparse::decode(&parts[0], &parts[1], &parts[2], &parts[3], dtype)
            .map_err(|e| mismatch(&t.name, e.to_string()))?;
        if shape != t.shape {
            return Err(mismatch(&t.name, format!("sparse shape {shape:?}, expected {:?}", t.shape)));
        }
        s.values = values;
        Ok(true)
    })?;
    Ok(check)
}

/// A GGUF's tensors decoded and compared; a llama.cpp GGUF's names and Q/K permutation are
/// undone first, and its `rope_freqs` (not a model tensor) compared with the plan's factors.
fn gguf(
    a: &ArtifactFile,
    tensors: &[TensorInfo],
    expected: &HashMap<String, u64>,
    llama: Option<&LlamaCppModel>,
    s: &mut Scratch,
) -> Result<OutputCheck, EngineError> {
    let mut file = File::open(&a.path)?;
    let content = gguf_file::Content::read(&mut file).map_err(|e| bad_file(&a.name, e))?;
    let by_name: HashMap<&str, (&TensorInfo, Option<usize>)> = tensors
        .iter()
        .filter_map(|t| match llama {
            None => Some((t.name.as_str(), (t, None))),
            Some(m) => m.names.get(&t.name).map(|r| (r.name.as_str(), (t, r.permute_heads))),
        })
        .collect();
    let (mut checked, mut decoded) = (0, 0);
    let mut unpermuted = Vec::new();
    for (name, info) in &content.tensor_infos {
        if let Some(factors) = llama.and_then(|m| m.rope_freqs.as_ref()).filter(|_| name == llama_cpp::ROPE_FREQS) {
            s.raw.resize(4 * factors.len(), 0);
            file.read_exact_at(&mut s.raw, content.tensor_data_offset + info.offset)?;
            let stored: Vec<f32> =
                s.raw.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect();
            if &stored != factors {
                return Err(mismatch(name, "rope_freqs differ from the planned factors"));
            }
            continue;
        }
        let &(t, heads) =
            by_name.get(name.as_str()).ok_or_else(|| mismatch(name, format!("{} holds an unknown tensor", a.name)))?;
        let ty = GgufType::try_from(info.ggml_dtype).map_err(|e| mismatch(name, e.to_string()))?;
        let dims: Vec<usize> = info.shape.dims().to_vec();
        if dims != t.shape {
            return Err(mismatch(name, format!("GGUF shape {dims:?}, expected {:?}", t.shape)));
        }
        let (rows, cols) = t.matrix();
        s.raw.resize(ty.encoded_len(t.numel()), 0);
        file.read_exact_at(&mut s.raw, content.tensor_data_offset + info.offset)?;
        s.values.resize(t.numel(), 0.0);
        if t.numel() > 0 {
            ggml::dequantize(&s.raw, rows, cols, ty, &mut s.values).map_err(|e| mismatch(name, e.to_string()))?;
        }
        if let Some(heads) = heads {
            let rows = if t.shape.len() == 1 { t.numel() } else { rows };
            llama_cpp::unpermute_rows(&s.values, rows, heads, &mut unpermuted);
            std::mem::swap(&mut s.values, &mut unpermuted);
        }
        let fp = s.values_fp(t.dtype);
        compare(&t.name, fp, expected, &a.name)?;
        checked += 1;
        decoded += usize::from(!matches!(ty, GgufType::F32 | GgufType::F16));
    }
    let storable = tensors
        .iter()
        .filter(|t| crate::compress::layout::gguf_type_for(t, None).is_some())
        .filter(|t| llama.is_none_or(|m| m.names.contains_key(&t.name)))
        .count();
    if checked != storable {
        return Err(bad_file(&a.name, format!("{checked} tensors, expected {storable}")));
    }
    Ok(OutputCheck::new(a, checked, decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::engine::{execute, Inputs, Silent};
    use crate::compress::{
        plan::{prepare, PlanInputs},
        spec::parse_compress,
    };

    /// Runs a small job with every layout; returns the temp dir, the artifacts, the input tensors and
    /// the fingerprints of the dense output (what the engine's own map holds).
    fn job() -> (tempfile::TempDir, Vec<ArtifactFile>, Vec<TensorInfo>, HashMap<String, u64>) {
        job_sharded(None)
    }

    /// [`job`] with shards of at most `max_shard_bytes` (three tensors then make three files).
    fn job_sharded(
        max_shard_bytes: Option<u64>,
    ) -> (tempfile::TempDir, Vec<ArtifactFile>, Vec<TensorInfo>, HashMap<String, u64>) {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("in.safetensors");
        let values: Vec<f32> = (0..8 * 64).map(|i| ((i * 37 % 101) as f32 - 50.0) / 100.0).collect();
        let mut w = crate::formats::safetensors::SafetensorsWriter::create(&model).unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let layers = if max_shard_bytes.is_some() { 3 } else { 1 };
        for l in 0..layers {
            let name = if layers == 1 { "fc.weight".to_string() } else { format!("fc{l}.weight") };
            w.write(&name, Dtype::F32, &[8, 64], &bytes).unwrap();
        }
        w.finish(&std::collections::BTreeMap::new()).unwrap();
        let steps = serde_json::json!([{"op": "prune", "method": "magnitude", "sparsity": 0.5},
                                       {"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}]);
        let outputs = serde_json::json!(["safetensors", "compressed-tensors", "sparse"]);
        let mut spec = parse_compress(&steps, Some(&outputs)).unwrap();
        if let Some(m) = max_shard_bytes {
            spec.max_shard_bytes = m;
        }
        let header = read_header(&model, u64::MAX).unwrap();
        let plan = prepare(spec, PlanInputs::model(header));
        let out_dir = dir.path().join("out");
        std::fs::create_dir(&out_dir).unwrap();
        let inputs = Inputs::model(&model, "0", "0");
        let out = execute(&plan, &inputs, &out_dir, &Silent).unwrap();
        let mut expected = HashMap::new();
        for dense in out.artifacts.iter().filter(|a| a.format == "safetensors" && a.name.ends_with(".safetensors")) {
            let (dense_header, mut reader) = open(dense).unwrap();
            for t in &dense_header.tensors {
                expected.insert(t.name.clone(), fingerprint(reader.read_raw(t).unwrap()));
            }
        }
        (dir, out.artifacts, plan.header.tensors, expected)
    }

    #[test]
    fn shards_are_checked_each_and_against_their_index() {
        let (_dir, artifacts, tensors, expected) = job_sharded(Some(2048));
        let names: Vec<&str> = artifacts.iter().map(|a| a.name.as_str()).collect();
        assert!(names.contains(&"model-00003-of-00003.safetensors"), "{names:?}");
        let checks = verify(&artifacts, &tensors, &expected, None).unwrap();
        assert_eq!(checks.iter().filter(|c| c.format == "safetensors").count(), 3);
        // An index that puts a tensor in another file than the one holding it is caught.
        let index = artifacts.iter().find(|a| a.name == INDEX_FILE).unwrap();
        let text = std::fs::read_to_string(&index.path).unwrap();
        std::fs::write(&index.path, text.replacen("model-00001-of-00003", "model-00002-of-00003", 1)).unwrap();
        match verify(&artifacts, &tensors, &expected, None) {
            Err(EngineError::Tensor { code: "layout_mismatch", detail, .. }) => {
                assert!(detail.contains("model.safetensors.index.json puts"), "{detail}")
            }
            other => panic!("expected a layout mismatch, got {other:?}"),
        }
        // A shard left out is caught by the count.
        let fewer: Vec<ArtifactFile> =
            artifacts.iter().filter(|a| a.name != "model-00002-of-00003.safetensors").cloned().collect();
        std::fs::write(&index.path, text).unwrap();
        assert!(verify(&fewer, &tensors, &expected, None).is_err());
    }

    /// Flips one byte inside the data of entry `name` of a safetensors file.
    fn corrupt(path: &std::path::Path, name: &str) {
        let header = read_header(path, u64::MAX).unwrap();
        let t = header.get(name).unwrap();
        let mut bytes = std::fs::read(path).unwrap();
        bytes[t.start as usize] ^= 0x10;
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn a_layout_that_decodes_to_other_values_fails_the_check() {
        for (format, entry) in [("compressed-tensors", "fc.weight_scale"), ("sparse", "fc.compressed")] {
            let (_dir, artifacts, tensors, expected) = job();
            let checks = verify(&artifacts, &tensors, &expected, None).unwrap();
            assert_eq!(checks.iter().map(|c| c.tensors_decoded).collect::<Vec<_>>(), [0, 1, 1]);
            let a = artifacts.iter().find(|a| a.format == format && a.name.ends_with(".safetensors")).unwrap();
            corrupt(&a.path, entry);
            match verify(&artifacts, &tensors, &expected, None) {
                Err(EngineError::Tensor { tensor, code, detail }) => {
                    assert_eq!((tensor.as_str(), code), ("fc.weight", "layout_mismatch"), "{detail}");
                    assert!(detail.contains(&a.name), "{detail}");
                }
                other => panic!("{format}: corrupted {entry} passed the check: {other:?}"),
            }
        }
    }

    #[test]
    fn fingerprints_see_order_length_and_every_byte() {
        let a: Vec<u8> = (0..100u8).collect();
        let mut b = a.clone();
        b.swap(3, 40);
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_ne!(fingerprint(&a[..99]), fingerprint(&a));
        assert_ne!(fingerprint(&[0u8; 8]), fingerprint(&[0u8; 9]));
        for i in 0..a.len() {
            let mut c = a.clone();
            c[i] ^= 1;
            assert_ne!(fingerprint(&c), fingerprint(&a), "byte {i}");
        }
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
