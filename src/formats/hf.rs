//! Hugging Face model folders: `config.json`, tokenizer files and the weights, as one
//! `model.safetensors` or as shards listed by `model.safetensors.index.json`.
//!
//! A folder becomes one logical model: the shards are checked against their index (every tensor
//! present exactly once, in the shard the index names, nothing else in the shards) and merged
//! into one safetensors file in the order `safetensors.save_file` writes a state dict (dtype
//! alignment descending, then name), so a sharded checkpoint and the same checkpoint saved as
//! one file give byte-identical outputs. The files beside the weights that runtimes need
//! ([`COMPANIONS`]) travel with the model into every output folder.
//!
//! Layout of the index (transformers' `save_pretrained`):
//! `{"metadata": {"total_size": N}, "weight_map": {"tensor.name": "model-00001-of-00002.safetensors"}}`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use super::safetensors::{read_header, shard_of, Dtype, Header, TensorInfo};

/// The index transformers writes beside sharded weights.
pub use super::safetensors::sharded::INDEX_FILE;

/// Files kept with a model and copied into its output folders: the configuration and the
/// tokenizer in every form transformers and llama.cpp's converter read.
pub const COMPANIONS: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// Largest companion file (and index) accepted (bytes). The largest tokenizer.json of common
/// models (Gemma's 256k vocabulary) is about 34 MB.
pub const MAX_COMPANION_BYTES: u64 = 128 << 20;

/// Most shards one model may have; the largest public checkpoints have a few hundred.
pub const MAX_SHARDS: usize = 4096;

/// Whether `name` is kept with a model ([`COMPANIONS`]).
pub fn is_companion(name: &str) -> bool {
    COMPANIONS.contains(&name)
}

/// The companion files of a model, by file name.
#[derive(Debug, Clone, Default)]
pub struct ModelFiles {
    pub files: BTreeMap<String, PathBuf>,
}

impl ModelFiles {
    pub fn path(&self, name: &str) -> Option<&Path> {
        self.files.get(name).map(PathBuf::as_path)
    }

    /// A companion parsed as JSON; `Ok(None)` when the model has no such file.
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>, FolderError> {
        let Some(path) = self.path(name) else { return Ok(None) };
        let bytes = std::fs::read(path).map_err(|e| FolderError::Io(name.into(), e))?;
        serde_json::from_slice(&bytes).map(Some).map_err(|e| FolderError::BadJson(name.into(), e.to_string()))
    }
}

/// Why a folder is not a usable model; messages name the file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    #[error("the folder has no weights: expected model.safetensors, or shards with {INDEX_FILE}")]
    NoWeights,
    #[error("{0}")]
    LoneShard(String),
    #[error("the folder has {0} safetensors files ({1}) and no {INDEX_FILE} saying how they form one model")]
    NoIndex(usize, String),
    #[error("{INDEX_FILE} names shard `{0}`, which is not in the folder")]
    MissingShard(String),
    #[error("{INDEX_FILE} puts tensor `{tensor}` in `{shard}`, but that shard does not hold it")]
    MissingTensor { tensor: String, shard: String },
    #[error("tensor `{tensor}` is in shard `{shard}` but {INDEX_FILE} {detail}")]
    Unindexed { tensor: String, shard: String, detail: String },
    #[error("tensor `{tensor}` is in both `{first}` and `{second}`")]
    Duplicate { tensor: String, first: String, second: String },
    #[error("`{0}` is not valid JSON: {1}")]
    BadJson(String, String),
    #[error("{INDEX_FILE}: {0}")]
    BadIndex(String),
    #[error("`{0}`: {1}")]
    BadShard(String, String),
    #[error("`{0}` is {1} bytes; companion files may be at most {MAX_COMPANION_BYTES}")]
    TooLarge(String, u64),
    #[error("reading `{0}`: {1}")]
    Io(String, std::io::Error),
}

/// The weights of a folder.
#[derive(Debug)]
pub enum Weights {
    /// One safetensors file.
    Single(PathBuf),
    /// Shards checked against the index, in the index's file order, with their headers.
    Sharded(Vec<(PathBuf, Header)>),
}

/// A model folder, read and checked; nothing is written.
#[derive(Debug)]
pub struct ModelFolder {
    pub weights: Weights,
    pub files: ModelFiles,
    /// Files of the folder that are neither weights nor companions (README.md, .gitattributes,
    /// training logs): not kept.
    pub ignored: Vec<String>,
}

impl ModelFolder {
    /// Reads the folder `dir` (top level only; hidden files and subfolders are ignored).
    /// Shard headers are read with `header_limit`.
    pub fn open(dir: &Path, header_limit: u64) -> Result<ModelFolder, FolderError> {
        let io = |e| FolderError::Io(dir.display().to_string(), e);
        let mut names: Vec<String> = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            if entry.file_type().map_err(io)?.is_file() {
                if let Ok(name) = entry.file_name().into_string() {
                    names.push(name);
                }
            }
        }
        names.sort();
        let mut files = ModelFiles::default();
        let mut ignored = Vec::new();
        let mut safetensors = Vec::new();
        for name in names {
            if is_companion(&name) {
                let bytes = std::fs::metadata(dir.join(&name)).map_err(|e| FolderError::Io(name.clone(), e))?.len();
                if bytes > MAX_COMPANION_BYTES {
                    return Err(FolderError::TooLarge(name, bytes));
                }
                // A JSON file that does not parse would fail every job that reads it later.
                if name.ends_with(".json") {
                    let text = std::fs::read(dir.join(&name)).map_err(|e| FolderError::Io(name.clone(), e))?;
                    serde_json::from_slice::<serde::de::IgnoredAny>(&text)
                        .map_err(|e| FolderError::BadJson(name.clone(), e.to_string()))?;
                }
                files.files.insert(name.clone(), dir.join(&name));
            } else if name.ends_with(".safetensors") {
                safetensors.push(name);
            } else if name != INDEX_FILE && !name.starts_with('.') {
                ignored.push(name);
            }
        }
        let weights = if dir.join(INDEX_FILE).is_file() {
            let len = std::fs::metadata(dir.join(INDEX_FILE)).map_err(|e| FolderError::Io(INDEX_FILE.into(), e))?.len();
            if len > MAX_COMPANION_BYTES {
                return Err(FolderError::TooLarge(INDEX_FILE.into(), len));
            }
            let index = std::fs::read(dir.join(INDEX_FILE)).map_err(|e| FolderError::Io(INDEX_FILE.into(), e))?;
            let shards = check_index(&index, |shard| {
                let path = dir.join(shard);
                if !path.is_file() {
                    return Err(FolderError::MissingShard(shard.into()));
                }
                let header =
                    read_header(&path, header_limit).map_err(|e| FolderError::BadShard(shard.into(), e.to_string()))?;
                Ok((path, header))
            })?;
            // Safetensors files the index does not name are not part of the model.
            ignored
                .extend(safetensors.iter().filter(|n| !shards.iter().any(|(p, _)| p.ends_with(n.as_str()))).cloned());
            Weights::Sharded(shards)
        } else {
            match safetensors.as_slice() {
                [] => return Err(FolderError::NoWeights),
                [one] => match shard_of(one) {
                    Some((k, n)) => return Err(FolderError::LoneShard(missing_shards(one, k, n))),
                    None => Weights::Single(dir.join(one)),
                },
                many => return Err(FolderError::NoIndex(many.len(), many.join(", "))),
            }
        };
        Ok(ModelFolder { weights, files, ignored })
    }
}

/// The refusal of a shard without its set, naming the files that are missing.
fn missing_shards(name: &str, k: u32, n: u32) -> String {
    let stem = name.strip_suffix(&format!("-{k:05}-of-{n:05}.safetensors")).unwrap_or("model");
    let missing: Vec<String> =
        (1..=n).filter(|&i| i != k).map(|i| format!("{stem}-{i:05}-of-{n:05}.safetensors")).collect();
    let shown = if missing.len() > 4 {
        format!("{} ... ({} files)", missing[..3].join(", "), missing.len())
    } else {
        missing.join(", ")
    };
    format!(
        "`{name}` is shard {k} of {n} of a sharded checkpoint: compressed alone it would be a fraction of the model. Send the whole folder (the other shards: {shown}, and {INDEX_FILE})"
    )
}

/// Checks an index against its shards: `open(file)` reads each shard named (once, in order of
/// first appearance). Every tensor of the index must be in the shard it names, and every tensor
/// of a shard in the index under that shard.
pub fn check_index(
    index: &[u8],
    mut open: impl FnMut(&str) -> Result<(PathBuf, Header), FolderError>,
) -> Result<Vec<(PathBuf, Header)>, FolderError> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| FolderError::BadIndex(e.to_string()))?;
    if index.weight_map.is_empty() {
        return Err(FolderError::BadIndex("`weight_map` is empty".into()));
    }
    let mut order: BTreeSet<&str> = BTreeSet::new();
    for shard in index.weight_map.values() {
        if shard.contains('/') || shard.contains('\\') || !shard.ends_with(".safetensors") {
            return Err(FolderError::BadIndex(format!("`{shard}` is not a safetensors file of the folder")));
        }
        order.insert(shard);
        if order.len() > MAX_SHARDS {
            return Err(FolderError::BadIndex(format!("it names more than {MAX_SHARDS} shards")));
        }
    }
    let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
    let mut shards = Vec::with_capacity(order.len());
    for shard in order {
        let (path, header) = open(shard)?;
        for t in &header.tensors {
            match index.weight_map.get(&t.name) {
                None => {
                    return Err(FolderError::Unindexed {
                        tensor: t.name.clone(),
                        shard: shard.into(),
                        detail: "does not list it".into(),
                    })
                }
                Some(s) if s != shard => {
                    return Err(FolderError::Unindexed {
                        tensor: t.name.clone(),
                        shard: shard.into(),
                        detail: format!("puts it in `{s}`"),
                    })
                }
                Some(_) => {}
            }
            if let Some(first) = seen.insert(index.weight_map.get_key_value(&t.name).expect("listed").0, shard) {
                return Err(FolderError::Duplicate {
                    tensor: t.name.clone(),
                    first: first.into(),
                    second: shard.into(),
                });
            }
        }
        shards.push((path, header));
    }
    if let Some((tensor, shard)) = index.weight_map.iter().find(|(t, _)| !seen.contains_key(t.as_str())) {
        return Err(FolderError::MissingTensor { tensor: tensor.clone(), shard: shard.clone() });
    }
    Ok(shards)
}

/// The shards' tensors in `safetensors.save_file`'s order (dtype alignment descending, then
/// name), each with the shard it is read from.
fn save_file_order(shards: &[(PathBuf, Header)]) -> Vec<(usize, &TensorInfo)> {
    let mut all: Vec<(usize, &TensorInfo)> =
        shards.iter().enumerate().flat_map(|(i, (_, h))| h.tensors.iter().map(move |t| (i, t))).collect();
    all.sort_by(|(_, a), (_, b)| save_order(a.dtype).cmp(&save_order(b.dtype)).reverse().then(a.name.cmp(&b.name)));
    all
}

/// The JSON header (padded) `safetensors.save_file` writes for `tensors` laid out in order:
/// the `safetensors` crate's own serialization, so the merged file is byte for byte the one
/// file transformers would have saved.
fn save_file_header(tensors: &[(usize, &TensorInfo)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut offset = 0usize;
    let infos = tensors
        .iter()
        .map(|(_, t)| {
            let start = offset;
            offset += t.bytes() as usize;
            let info = safetensors::tensor::TensorInfo {
                dtype: save_order(t.dtype),
                shape: t.shape.clone(),
                data_offsets: (start, offset),
            };
            (t.name.clone(), info)
        })
        .collect();
    let meta = (!metadata.is_empty()).then(|| metadata.clone().into_iter().collect());
    let m = safetensors::tensor::Metadata::new(meta, infos).expect("offsets laid out back to back");
    let mut json = serde_json::to_vec(&m).expect("header JSON");
    json.resize(json.len().next_multiple_of(8), b' ');
    json
}

/// The header [`merge_shards`] writes, without writing anything (plans read only headers).
pub fn merged_header(shards: &[(PathBuf, Header)]) -> Header {
    let metadata = shards.first().map(|(_, h)| h.metadata.clone()).unwrap_or_default();
    let json = save_file_header(&save_file_order(shards), &metadata);
    super::safetensors::parse_header_unsized(&json).expect("a header built from valid shards parses")
}

/// Writes the shards' tensors into one safetensors file at `out` (see [`merged_header`]), with
/// the first shard's `__metadata__`. Tensors are copied in chunks of 8 MiB (memory stays
/// bounded whatever a tensor's size), each shard opened while it is read; `stop` is asked
/// between chunks (a client gone, a shutdown) and ends the merge with `Interrupted`. Returns the
/// file's size.
pub fn merge_shards(shards: &[(PathBuf, Header)], out: &Path, stop: &dyn Fn() -> bool) -> std::io::Result<u64> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    const CHUNK: usize = 8 << 20;
    let all = save_file_order(shards);
    let metadata = shards.first().map(|(_, h)| h.metadata.clone()).unwrap_or_default();
    let header = save_file_header(&all, &metadata);
    let mut file = std::io::BufWriter::with_capacity(CHUNK, std::fs::File::create(out)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(&header)?;
    let mut buf = vec![0u8; CHUNK];
    let mut open: Option<(usize, std::fs::File)> = None;
    for (i, t) in all {
        let source = match open.take() {
            Some((j, f)) if j == i => f,
            _ => std::fs::File::open(&shards[i].0)?,
        };
        let (mut at, end) = (t.start, t.end);
        while at < end {
            if stop() {
                return Err(std::io::Error::new(std::io::ErrorKind::Interrupted, "the merge was stopped"));
            }
            let n = ((end - at) as usize).min(CHUNK);
            source.read_exact_at(&mut buf[..n], at)?;
            file.write_all(&buf[..n])?;
            at += n as u64;
        }
        open = Some((i, source));
    }
    let file = file.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(file.metadata()?.len())
}

/// The rank `safetensors`' own `Dtype` gives a dtype: `save_file` sorts by it, descending.
fn save_order(d: Dtype) -> safetensors::Dtype {
    serde_json::from_value(serde_json::Value::from(d.as_str())).unwrap_or(safetensors::Dtype::BOOL)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::{SafetensorsWriter, TensorReader};

    fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>)]) {
        let mut w = SafetensorsWriter::create(path).unwrap();
        for (i, (name, dtype, shape)) in tensors.iter().enumerate() {
            let n: usize = shape.iter().product::<usize>() * dtype.size();
            let bytes: Vec<u8> = (0..n).map(|b| (b * 7 + i * 13) as u8).collect();
            w.write(name, *dtype, shape, &bytes).unwrap();
        }
        w.finish(&BTreeMap::from([("format".to_string(), "pt".to_string())])).unwrap();
    }

    fn sharded(dir: &Path) {
        write(
            &dir.join("model-00001-of-00002.safetensors"),
            &[("b.weight", Dtype::F32, vec![2, 3]), ("a.bias", Dtype::F16, vec![3])],
        );
        write(&dir.join("model-00002-of-00002.safetensors"), &[("c.weight", Dtype::F32, vec![4])]);
        let index = serde_json::json!({"metadata": {"total_size": 46}, "weight_map": {
            "b.weight": "model-00001-of-00002.safetensors", "a.bias": "model-00001-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("README.md"), "hi").unwrap();
    }

    #[test]
    fn shards_merge_in_save_file_order_with_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        sharded(dir.path());
        let folder = ModelFolder::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(folder.ignored, vec!["README.md"]);
        assert!(folder.files.path("config.json").is_some());
        let Weights::Sharded(shards) = &folder.weights else { panic!("sharded") };
        let out = dir.path().join("merged.st");
        merge_shards(shards, &out, &|| false).unwrap();
        let h = read_header(&out, 1 << 20).unwrap();
        let planned = merged_header(shards);
        assert_eq!((planned.tensors.clone(), planned.data_start), (h.tensors.clone(), h.data_start));
        let names: Vec<_> = h.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["b.weight", "c.weight", "a.bias"], "F32 before F16, then by name");
        assert_eq!(h.metadata.get("format").map(String::as_str), Some("pt"));
        let (mut merged, mut first) = (TensorReader::open(&out).unwrap(), TensorReader::open(&shards[0].0).unwrap());
        let b = shards[0].1.get("b.weight").unwrap();
        assert_eq!(merged.read_raw(h.get("b.weight").unwrap()).unwrap().to_vec(), first.read_raw(b).unwrap().to_vec());
    }

    #[test]
    fn index_and_shards_must_agree() {
        let dir = tempfile::tempdir().unwrap();
        sharded(dir.path());
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = ModelFolder::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("names shard `model-00002-of-00002.safetensors`, which is not in the folder"), "{e}");

        sharded(dir.path());
        let index = serde_json::json!({"weight_map": {"b.weight": "model-00001-of-00002.safetensors",
            "c.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let e = ModelFolder::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("tensor `a.bias` is in shard `model-00001-of-00002.safetensors`"), "{e}");

        let index = serde_json::json!({"weight_map": {"b.weight": "model-00001-of-00002.safetensors",
            "a.bias": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors",
            "d.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let e = ModelFolder::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(
            e.contains("puts tensor `d.weight` in `model-00002-of-00002.safetensors`, but that shard does not hold it"),
            "{e}"
        );
    }

    #[test]
    fn a_lone_shard_names_what_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("model-00002-of-00003.safetensors"), &[("x", Dtype::F32, vec![1])]);
        let e = ModelFolder::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("model-00001-of-00003.safetensors, model-00003-of-00003.safetensors"), "{e}");
        assert!(e.contains(INDEX_FILE), "{e}");
    }

    #[test]
    fn a_single_file_needs_no_index() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("model.safetensors"), &[("x", Dtype::F32, vec![1])]);
        let f = ModelFolder::open(dir.path(), 1 << 20).unwrap();
        assert!(matches!(f.weights, Weights::Single(_)));
        write(&dir.path().join("other.safetensors"), &[("x", Dtype::F32, vec![1])]);
        let e = ModelFolder::open(dir.path(), 1 << 20).unwrap_err().to_string();
        assert!(e.contains("2 safetensors files"), "{e}");
    }
}
