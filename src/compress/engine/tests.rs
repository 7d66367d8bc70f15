//! The engine against its input file: the hash computed alongside the job names the bytes it
//! compressed, and a file modified under a job fails it (`input_changed`).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{execute, sha256_file, Control, EngineError, InputSha, Inputs, PendingSha};
use crate::compress::plan::{prepare, Plan, PlanInputs};
use crate::compress::spec::parse_compress;
use crate::formats::safetensors::{read_header, Dtype, SafetensorsWriter};

/// The bytes of an f32 [8, 64] tensor, different for each `l`, with a few exact zeros.
fn tensor_bytes(l: usize) -> Vec<u8> {
    (0..8 * 64).flat_map(|i| (((i * 37 + l * 11) % 101) as f32 / 100.0 - 0.5).to_le_bytes()).collect()
}

/// A model of three f32 [8, 64] tensors `fc0..fc2.weight`, and the plan of `steps` on it.
fn model(dir: &Path, steps: serde_json::Value) -> (PathBuf, Plan) {
    let path = dir.join("in.safetensors");
    let mut w = SafetensorsWriter::create(&path).unwrap();
    for l in 0..3 {
        w.write(&format!("fc{l}.weight"), Dtype::F32, &[8, 64], &tensor_bytes(l)).unwrap();
    }
    w.finish(&Default::default()).unwrap();
    let spec = parse_compress(&steps, Some(&serde_json::json!(["safetensors"]))).unwrap();
    let plan = prepare(spec, PlanInputs::model(read_header(&path, u64::MAX).unwrap()));
    (path, plan)
}

/// A control that, at the first progress message equal to `at`, runs `edit` once.
struct EditAt<'a> {
    at: &'a str,
    edit: Mutex<Option<Box<dyn FnOnce() + Send + 'a>>>,
}

impl Control for EditAt<'_> {
    fn progress(&self, _: f64, _: &str, message: &str) {
        if message == self.at {
            if let Some(edit) = self.edit.lock().unwrap().take() {
                edit();
            }
        }
    }
    fn canceled(&self) -> bool {
        false
    }
}

/// Overwrites the first 4 bytes of tensor `name` of the file at `path` with another value.
fn overwrite(path: &Path, plan: &Plan, name: &str) {
    let t = plan.header.get(name).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&7.5f32.to_le_bytes(), t.start).unwrap();
}

fn run(path: &Path, plan: &Plan, sha: InputSha<'_>, out: &Path, ctl: &dyn Control) -> Result<String, EngineError> {
    std::fs::create_dir_all(out).unwrap();
    let inputs = Inputs { input_sha256: sha, ..Inputs::model(path, "", "0") };
    execute(plan, &inputs, out, ctl).map(|o| o.report.input_sha256)
}

fn regions(plan: &Plan) -> Vec<super::Region> {
    super::Region::of(plan)
}

#[test]
fn the_hash_computed_alongside_is_the_files_and_names_the_bytes_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let (path, plan) = model(dir.path(), serde_json::json!([{"op": "quantize", "bits": 8}]));
    let pending = PendingSha::start(&path, regions(&plan));
    let sha = run(&path, &plan, InputSha::Pending(&pending), &dir.path().join("out"), &super::Silent).unwrap();
    assert_eq!(sha, sha256_file(&path).unwrap().0);
}

/// Runs `steps` with the hash computed alongside; just before the main pass reaches fc2 (the
/// hash has read the whole file by then), fc2 changes. The job must fail with `input_changed`
/// naming fc2, its detail containing `detail_part`.
fn fc2_changed_after_hashing(steps: serde_json::Value, detail_part: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (path, plan) = model(dir.path(), steps);
    let pending = PendingSha::start(&path, regions(&plan));
    let ctl = EditAt {
        at: "tensor fc2.weight",
        edit: Mutex::new(Some(Box::new(|| {
            pending.wait().unwrap();
            overwrite(&path, &plan, "fc2.weight");
        }))),
    };
    match run(&path, &plan, InputSha::Pending(&pending), &dir.path().join("out"), &ctl) {
        Err(EngineError::Job { code: "input_changed", detail }) => {
            assert!(detail.contains("`fc2.weight`") && detail.contains(detail_part), "{detail}")
        }
        other => panic!("expected input_changed, got {other:?}"),
    }
}

#[test]
fn a_file_changed_after_it_was_hashed_fails_the_job_naming_the_tensor() {
    let steps = serde_json::json!([{"op": "quantize", "bits": 8}]);
    fc2_changed_after_hashing(steps, "the bytes the job compressed are not the bytes its input hash read");
}

#[test]
fn a_tensor_whose_two_reads_disagree_fails_the_job_even_with_a_known_hash() {
    let dir = tempfile::tempdir().unwrap();
    let steps = serde_json::json!([{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.5}]);
    let (path, plan) = model(dir.path(), steps);
    // The global threshold's pass has read every tensor; fc1 changes before the main pass.
    let ctl =
        EditAt { at: "tensor fc1.weight", edit: Mutex::new(Some(Box::new(|| overwrite(&path, &plan, "fc1.weight")))) };
    match run(&path, &plan, InputSha::Known("0"), &dir.path().join("out"), &ctl) {
        Err(EngineError::Job { code: "input_changed", detail }) => {
            assert!(detail.contains("`fc1.weight`") && detail.contains("two reads"), "{detail}")
        }
        other => panic!("expected input_changed, got {other:?}"),
    }
    // Unchanged, the same job succeeds.
    let (path, plan) = model(
        dir.path(),
        serde_json::json!([{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.5}]),
    );
    run(&path, &plan, InputSha::Known("0"), &dir.path().join("out2"), &super::Silent).unwrap();
}

#[test]
fn untouched_tensors_copied_unread_get_their_figures_from_the_hash_or_one_read_and_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let steps = serde_json::json!([{"op": "quantize", "bits": 8, "targets": ["fc0.*"]}]);
    let (path, plan) = model(dir.path(), steps);
    // fc1 gets some zeros, so its non-zero count is not simply its size.
    let fc1 = plan.header.get("fc1.weight").unwrap().clone();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0u8; 40], fc1.start).unwrap();
    let pending = PendingSha::start(&path, regions(&plan));
    // The CLI (hash computed alongside: figures from the hash thread) and the server (hash known).
    for (k, sha) in [InputSha::Pending(&pending), InputSha::Known("0")].into_iter().enumerate() {
        let out = dir.path().join(format!("out{k}"));
        std::fs::create_dir_all(&out).unwrap();
        let inputs = Inputs { input_sha256: sha, ..Inputs::model(&path, "", "0") };
        let done = execute(&plan, &inputs, &out, &super::Silent).unwrap();
        check_copied(&path, &fc1, &done);
    }
}

fn check_copied(path: &Path, fc1: &crate::formats::safetensors::TensorInfo, done: &super::EngineOutput) {
    let mut input = vec![0u8; fc1.bytes() as usize];
    std::fs::File::open(path).unwrap().read_exact_at(&mut input, fc1.start).unwrap();
    let zeros = input.chunks_exact(4).filter(|c| c == &[0u8; 4]).count();
    assert!(zeros >= 10);
    let report = done.report.tensors.iter().find(|t| t.name == "fc1.weight").unwrap();
    assert_eq!((report.scheme.as_str(), report.nonzeros), ("unchanged", (512 - zeros) as u64));
    assert!((report.sparsity - zeros as f64 / 512.0).abs() < 1e-12, "{}", report.sparsity);
    // The copy holds the input's bytes, and the output check covered it.
    let written = done.artifacts.iter().find(|a| a.name == "model.safetensors").unwrap();
    let h = read_header(&written.path, u64::MAX).unwrap();
    let t = h.get("fc1.weight").unwrap();
    let mut copied = vec![0u8; t.bytes() as usize];
    std::fs::File::open(&written.path).unwrap().read_exact_at(&mut copied, t.start).unwrap();
    assert_eq!(copied, input);
    let check = done.report.checks.iter().find(|c| c.format == "safetensors").unwrap();
    assert_eq!(check.tensors_checked, 3);
}

#[test]
fn an_untouched_tensor_changed_after_it_was_hashed_fails_as_input_changed_not_as_a_layout_fault() {
    // fc2 is untouched: copied file to file unread, its figures taken from the hash thread. This
    // detail is the copy's: a tensor the main pass read fails with the other one instead.
    let steps = serde_json::json!([{"op": "quantize", "bits": 8, "targets": ["fc0.*"]}]);
    fc2_changed_after_hashing(steps, "the bytes copied to the output are not the bytes it had when first read");
}

/// An empty tensor starts where the next one does: fingerprints and figures are keyed by the
/// whole span, so neither is taken for the other's (a false `input_changed` or `layout_mismatch`).
#[test]
fn an_empty_tensor_between_two_others_is_neither_mistaken_for_the_next_nor_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.safetensors");
    let mut w = SafetensorsWriter::create(&path).unwrap();
    w.write("fc0.weight", Dtype::F32, &[8, 64], &tensor_bytes(0)).unwrap();
    w.write("empty", Dtype::F32, &[0], &[]).unwrap();
    w.write("fc1.weight", Dtype::F32, &[8, 64], &tensor_bytes(1)).unwrap();
    w.finish(&Default::default()).unwrap();
    for (k, steps) in [
        serde_json::json!([{"op": "quantize", "bits": 8, "targets": ["fc0.*"]}]),
        serde_json::json!([{"op": "quantize", "bits": 8}]),
    ]
    .into_iter()
    .enumerate()
    {
        let spec = parse_compress(&steps, Some(&serde_json::json!(["safetensors"]))).unwrap();
        let plan = prepare(spec, PlanInputs::model(read_header(&path, u64::MAX).unwrap()));
        let pending = PendingSha::start(&path, regions(&plan));
        for (j, sha) in [InputSha::Pending(&pending), InputSha::Known("0")].into_iter().enumerate() {
            let out = dir.path().join(format!("out{k}{j}"));
            std::fs::create_dir_all(&out).unwrap();
            let inputs = Inputs { input_sha256: sha, ..Inputs::model(&path, "", "0") };
            let done = execute(&plan, &inputs, &out, &super::Silent).unwrap_or_else(|e| panic!("{k}/{j}: {e:?}"));
            let empty = done.report.tensors.iter().find(|t| t.name == "empty").unwrap();
            assert_eq!(empty.nonzeros, 0, "{k}/{j}");
            let fc1 = done.report.tensors.iter().find(|t| t.name == "fc1.weight").unwrap();
            assert!(fc1.nonzeros > 500, "{k}/{j}: {}", fc1.nonzeros);
        }
    }
}
