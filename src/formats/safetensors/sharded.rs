//! Sharded safetensors outputs, as transformers' `save_pretrained` writes them: files
//! `model-00001-of-0000N.safetensors` of at most `max_shard_size` bytes of tensor data each, and
//! `model.safetensors.index.json` mapping every tensor to its file
//! (`{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}`). One shard is written
//! as `model.safetensors` without an index, as transformers does.
//!
//! Tensors are assigned in order: a tensor that would take the current shard over the limit
//! starts the next one, and a tensor larger than the limit gets a shard of its own (the rule of
//! transformers' `shard_checkpoint`; huggingface_hub's newer splitter may move such a tensor
//! ahead of the shard being filled, which would need two files open at once). Loaders read the
//! index, not the order, so both load the same.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::io::{PlannedSafetensorsWriter, SafetensorsWriter, SealedDeferred, SealedPlanned};
use super::Dtype;

/// The default largest shard: transformers' `max_shard_size="5GB"` (decimal gigabytes).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The file name of the one-file checkpoint (and of a single shard).
pub const SINGLE_FILE: &str = "model.safetensors";

/// The index naming each tensor's shard.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The name of shard `k` (0-based) of `n`: `model-00001-of-00003.safetensors`, or
/// `model.safetensors` when `n` is 1.
pub fn shard_file_name(k: usize, n: usize) -> String {
    if n == 1 {
        SINGLE_FILE.to_owned()
    } else {
        format!("model-{:05}-of-{n:05}.safetensors", k + 1)
    }
}

/// The shard (0-based) of each tensor of `sizes` (bytes, in file order) under `max` bytes per
/// shard (see the module docs for the rule).
pub fn split(sizes: &[u64], max: u64) -> Vec<usize> {
    let (mut shard, mut filled, mut count) = (0usize, 0u64, 0usize);
    sizes
        .iter()
        .map(|&size| {
            if count > 0 && filled.saturating_add(size) > max {
                shard += 1;
                (filled, count) = (0, 0);
            }
            filled += size;
            count += 1;
            shard
        })
        .collect()
}

/// The index file's bytes: 2-space indented JSON with sorted keys and a final newline, as
/// transformers writes it (`json.dumps(index, indent=2, sort_keys=True) + "\n"`).
pub fn index_json(weight_map: &BTreeMap<String, String>, total_size: u64) -> Vec<u8> {
    let index = serde_json::json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    let mut bytes = serde_json::to_vec_pretty(&index).expect("index JSON");
    bytes.push(b'\n');
    bytes
}

/// A sharded output whose tensors are all known up front: every shard's header is written
/// first and each tensor's bytes go straight to their place (see [`PlannedSafetensorsWriter`]);
/// one shard is open for writing at a time, finished shards are closed until
/// [`Self::finish_with_metadata`] rewrites their headers.
pub struct PlannedShards {
    dir: PathBuf,
    /// The tensors of each shard, in order.
    shards: Vec<Vec<(String, Dtype, Vec<usize>)>>,
    metadata: BTreeMap<String, String>,
    current: Option<(usize, usize, PlannedSafetensorsWriter)>,
    sealed: Vec<SealedPlanned>,
    total_size: u64,
}

impl PlannedShards {
    /// Plans the shards of `tensors` (in the order they will be written) in `dir`, each header
    /// holding `metadata` (with fixed-width placeholders for values learned later).
    pub fn create(
        dir: &Path,
        tensors: &[(String, Dtype, Vec<usize>)],
        metadata: &BTreeMap<String, String>,
        max_shard_bytes: u64,
    ) -> std::io::Result<Self> {
        let sizes: Vec<u64> =
            tensors.iter().map(|(_, d, s)| s.iter().product::<usize>() as u64 * d.size() as u64).collect();
        let assignment = split(&sizes, max_shard_bytes);
        let mut shards: Vec<Vec<(String, Dtype, Vec<usize>)>> =
            vec![Vec::new(); assignment.last().map_or(1, |s| s + 1)];
        for (t, s) in tensors.iter().zip(&assignment) {
            shards[*s].push(t.clone());
        }
        Ok(Self {
            dir: dir.to_owned(),
            shards,
            metadata: metadata.clone(),
            current: None,
            sealed: Vec::new(),
            total_size: sizes.iter().sum(),
        })
    }

    /// How many files the tensors are split into.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    fn open(&mut self, k: usize) -> std::io::Result<()> {
        let path = self.dir.join(shard_file_name(k, self.shards.len()));
        self.current = Some((k, 0, PlannedSafetensorsWriter::create(&path, &self.shards[k], &self.metadata)?));
        Ok(())
    }

    /// Writes the next tensor (in the declared order).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        self.next_writer()?.write(name, bytes)?;
        self.advance();
        Ok(())
    }

    /// Like [`Self::write`] with the bytes copied from `src` at `offset`, file to file (see
    /// [`PlannedSafetensorsWriter::copy_from`]).
    pub fn copy_from(&mut self, name: &str, src: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
        self.next_writer()?.copy_from(name, src, offset, len)?;
        self.advance();
        Ok(())
    }

    fn advance(&mut self) {
        if let Some((_, done, _)) = self.current.as_mut() {
            *done += 1;
        }
    }

    /// The writer of the shard the next tensor goes to (the previous one sealed when full).
    fn next_writer(&mut self) -> std::io::Result<&mut PlannedSafetensorsWriter> {
        let (k, done) = match &self.current {
            None => (None, 0),
            Some((k, done, _)) => (Some(*k), *done),
        };
        match k {
            None => self.open(0)?,
            Some(k) if done == self.shards[k].len() && k + 1 < self.shards.len() => {
                let (_, _, w) = self.current.take().expect("open shard");
                // Closed until the end: an output of thousands of shards holds no descriptors.
                self.sealed.push(w.seal()?.close());
                self.open(k + 1)?;
            }
            Some(_) => {}
        }
        Ok(&mut self.current.as_mut().expect("open shard").2)
    }

    /// Rewrites every header with `metadata` (same length as at creation), fsyncs each file,
    /// and writes the index when there is more than one shard. Returns the file names written
    /// (shards in order, then the index).
    pub fn finish_with_metadata(mut self, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<String>> {
        let n = self.shards.len();
        if self.current.is_none() {
            // Nothing was written: an empty model still gets its (empty) file.
            self.open(0)?;
        }
        let (_, _, w) = self.current.take().expect("open shard");
        self.sealed.push(w.seal()?);
        if self.sealed.len() != n {
            return Err(std::io::Error::other(format!("{} of {n} shards were written", self.sealed.len())));
        }
        for s in self.sealed {
            s.finish_with_metadata(metadata)?;
        }
        let mut files: Vec<String> = (0..n).map(|k| shard_file_name(k, n)).collect();
        if n > 1 {
            let map = self
                .shards
                .iter()
                .enumerate()
                .flat_map(|(k, ts)| ts.iter().map(move |t| (t.0.clone(), shard_file_name(k, n))))
                .collect();
            write_index(&self.dir, &map, self.total_size)?;
            files.push(INDEX_FILE.to_owned());
        }
        Ok(files)
    }
}

fn write_index(dir: &Path, map: &BTreeMap<String, String>, total_size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(dir.join(INDEX_FILE))?;
    f.write_all(&index_json(map, total_size))?;
    f.sync_all()
}

/// A sharded output whose sizes are learned as it is written (packed layouts): tensors go to a
/// side file per shard; a shard is closed when the next group of entries would take it over the
/// limit ([`Self::reserve`]), and the files get their final names once the count is known.
pub struct DeferredShards {
    dir: PathBuf,
    max: u64,
    current: Option<SafetensorsWriter>,
    sealed: Vec<SealedDeferred>,
}

impl DeferredShards {
    pub fn new(dir: &Path, max_shard_bytes: u64) -> Self {
        Self { dir: dir.to_owned(), max: max_shard_bytes, current: None, sealed: Vec::new() }
    }

    /// Announces `bytes` of entries that must share a file (the parts of one packed module):
    /// closes the current shard first when they would take it over the limit.
    pub fn reserve(&mut self, bytes: u64) -> std::io::Result<()> {
        if let Some(w) = &self.current {
            if w.data_bytes() > 0 && w.data_bytes().saturating_add(bytes) > self.max {
                let w = self.current.take().expect("open shard");
                self.sealed.push(w.seal()?);
            }
        }
        Ok(())
    }

    pub fn write(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: &[u8]) -> std::io::Result<()> {
        if self.current.is_none() {
            let partial = self.dir.join(format!("model-shard-{}.safetensors", self.sealed.len() + 1));
            self.current = Some(SafetensorsWriter::create(&partial)?);
        }
        self.current.as_mut().expect("open shard").write(name, dtype, shape, bytes)
    }

    /// Writes every shard under its final name with `metadata`, and the index when there is
    /// more than one. Returns the file names written (shards in order, then the index).
    pub fn finish(mut self, metadata: &BTreeMap<String, String>) -> std::io::Result<Vec<String>> {
        if self.current.is_none() && self.sealed.is_empty() {
            self.write_nothing()?;
        }
        if let Some(w) = self.current.take() {
            self.sealed.push(w.seal()?);
        }
        let n = self.sealed.len();
        let mut map = BTreeMap::new();
        let mut total_size = 0;
        let mut files = Vec::with_capacity(n + 1);
        for (k, s) in self.sealed.into_iter().enumerate() {
            let name = shard_file_name(k, n);
            map.extend(s.names().map(|t| (t.to_owned(), name.clone())));
            total_size += s.data_bytes();
            s.finish_at(&self.dir.join(&name), metadata)?;
            files.push(name);
        }
        if n > 1 {
            write_index(&self.dir, &map, total_size)?;
            files.push(INDEX_FILE.to_owned());
        }
        Ok(files)
    }

    fn write_nothing(&mut self) -> std::io::Result<()> {
        let partial = self.dir.join("model-shard-1.safetensors");
        self.current = Some(SafetensorsWriter::create(&partial)?);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::safetensors::read_header;

    #[test]
    fn tensors_fill_shards_in_order_and_a_large_one_stands_alone() {
        assert_eq!(split(&[4, 4, 4], 8), [0, 0, 1]);
        assert_eq!(split(&[4, 20, 4, 4], 8), [0, 1, 2, 2]);
        assert_eq!(split(&[20], 8), [0]);
        assert_eq!(split(&[], 8), Vec::<usize>::new());
        assert_eq!(split(&[8, 0, 1], 8), [0, 0, 1], "a zero-size tensor fits anywhere");
    }

    #[test]
    fn names_follow_transformers() {
        assert_eq!(shard_file_name(0, 1), "model.safetensors");
        assert_eq!(shard_file_name(1, 3), "model-00002-of-00003.safetensors");
        let map = BTreeMap::from([("b".to_string(), "f2".to_string()), ("a".to_string(), "f1".to_string())]);
        let text = String::from_utf8(index_json(&map, 12)).unwrap();
        assert_eq!(
            text,
            "{\n  \"metadata\": {\n    \"total_size\": 12\n  },\n  \"weight_map\": {\n    \"a\": \"f1\",\n    \"b\": \"f2\"\n  }\n}\n"
        );
    }

    /// Both writers split the same tensors into the same files, and each file holds exactly the
    /// tensors the index names for it.
    #[test]
    fn planned_and_deferred_shards_agree_with_their_index() {
        let tensors: Vec<(String, Dtype, Vec<usize>)> =
            (0..5).map(|i| (format!("t{i}"), Dtype::F32, vec![i + 1, 4])).collect();
        let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = |t: &(String, Dtype, Vec<usize>)| vec![t.2[0] as u8; t.2[0] * 16];
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut planned = PlannedShards::create(a.path(), &tensors, &meta, 60).unwrap();
        let mut deferred = DeferredShards::new(b.path(), 60);
        for t in &tensors {
            planned.write(&t.0, &bytes(t)).unwrap();
            deferred.reserve(bytes(t).len() as u64).unwrap();
            deferred.write(&t.0, t.1, &t.2, &bytes(t)).unwrap();
        }
        assert_eq!(planned.shard_count(), 4, "bytes 16+32 | 48 | 64 (over the limit, alone) | 80");
        let fa = planned.finish_with_metadata(&meta).unwrap();
        let fb = deferred.finish(&meta).unwrap();
        assert_eq!(fa, fb);
        assert_eq!(fa.last().unwrap(), INDEX_FILE);
        for f in &fa {
            assert_eq!(std::fs::read(a.path().join(f)).unwrap(), std::fs::read(b.path().join(f)).unwrap(), "{f}");
        }
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(a.path().join(INDEX_FILE)).unwrap()).unwrap();
        assert_eq!(index["metadata"]["total_size"], 16 * (1 + 2 + 3 + 4 + 5));
        for f in &fa[..fa.len() - 1] {
            let h = read_header(&a.path().join(f), u64::MAX).unwrap();
            assert!(h.tensors.iter().all(|t| index["weight_map"][&t.name] == f.as_str()), "{f}");
            assert_eq!(h.metadata, meta);
        }
        let leftovers: Vec<_> = std::fs::read_dir(b.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.contains("shard-") || n.ends_with(".partial"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn one_shard_is_the_plain_file_without_an_index() {
        let dir = tempfile::tempdir().unwrap();
        let tensors = vec![("w".to_string(), Dtype::F32, vec![2])];
        let mut planned =
            PlannedShards::create(dir.path(), &tensors, &BTreeMap::new(), DEFAULT_MAX_SHARD_BYTES).unwrap();
        planned.write("w", &[0; 8]).unwrap();
        assert_eq!(planned.finish_with_metadata(&BTreeMap::new()).unwrap(), ["model.safetensors"]);
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(DeferredShards::new(empty.path(), 8).finish(&BTreeMap::new()).unwrap(), ["model.safetensors"]);
        assert!(read_header(&empty.path().join("model.safetensors"), u64::MAX).unwrap().tensors.is_empty());
    }

    /// Finished shards wait for their final header closed: thousands of shards (a small
    /// `max_shard_size` on a model of many tensors) hold no file descriptors.
    #[test]
    fn finished_shards_hold_no_descriptors() {
        let open_fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
        let dir = tempfile::tempdir().unwrap();
        let tensors: Vec<(String, Dtype, Vec<usize>)> =
            (0..300).map(|i| (format!("t{i}"), Dtype::F32, vec![4])).collect();
        let mut planned = PlannedShards::create(dir.path(), &tensors, &BTreeMap::new(), 16).unwrap();
        let before = open_fds();
        for t in &tensors {
            planned.write(&t.0, &[1; 16]).unwrap();
        }
        // Other tests run in this process too: a margin, far below one descriptor per shard.
        assert!(open_fds() < before + 100, "{} descriptors open, {before} before", open_fds());
        let files = planned.finish_with_metadata(&BTreeMap::new()).unwrap();
        assert_eq!(files.len(), 301);
        assert_eq!(std::fs::read(dir.path().join(&files[7])).unwrap().len() as u64, {
            let h = read_header(&dir.path().join(&files[7]), u64::MAX).unwrap();
            h.data_start + 16
        });
    }
}
