use std::io::Cursor;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::Device;

use super::*;
use crate::compress::ggml::{dequantize, quantize};
use crate::compress::synth::benchmark_matrix;

/// A small model mixing ranks and types: a k-quant matrix, a rank-3 q8_0 tensor, a conv kernel
/// kept in f16 (its rows of 3 fit no block type), and an f32 norm vector.
fn plan() -> Vec<TensorInfo> {
    vec![
        TensorInfo::new("blk.0.attn_q.weight", &[16, 512], GgufType::Q4K),
        TensorInfo::new("blk.0.ffn_up.weight", &[2, 4, 64], GgufType::Q8_0),
        TensorInfo::new("conv.weight", &[8, 3, 3], GgufType::F16),
        TensorInfo::new("output_norm.weight", &[64], GgufType::F32),
    ]
}

fn metadata() -> Vec<(String, MetaValue)> {
    vec![
        ("general.architecture".into(), "llama".into()),
        ("general.quantization_version".into(), 2u32.into()),
        ("modelpress.parameters".into(), 12_345_678_901u64.into()),
        ("modelpress.target_bits".into(), 4.5f32.into()),
        ("modelpress.exact".into(), true.into()),
        ("modelpress.schemes".into(), vec!["q4_k".to_string(), "q8_0".to_string()].into()),
    ]
}

/// Writes the plan's tensors (benchmark-distribution values) to memory; returns the file and the
/// f32 data each tensor was quantized from.
fn write_plan(metadata: &[(String, MetaValue)], tensors: &[TensorInfo]) -> (Vec<u8>, Vec<Vec<f32>>) {
    let mut writer = GgufWriter::new(Vec::new(), metadata, tensors).unwrap();
    let mut bytes = Vec::new();
    let mut originals = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let cols = *t.shape.last().unwrap();
        let rows = t.shape.iter().product::<usize>() / cols;
        let data = benchmark_matrix(rows, cols, i as u64);
        quantize(&data, rows, cols, t.ty, &mut bytes).unwrap();
        writer.write_tensor(&t.name, &bytes).unwrap();
        originals.push(data);
    }
    (writer.finish().unwrap(), originals)
}

#[test]
fn candles_reader_gets_back_names_shapes_types_and_values() {
    let tensors = plan();
    let (file, originals) = write_plan(&metadata(), &tensors);
    let mut cursor = Cursor::new(&file);
    let content = Content::read(&mut cursor).unwrap();
    assert_eq!(content.tensor_infos.len(), tensors.len());
    let mut ours = Vec::new();
    for (t, data) in tensors.iter().zip(&originals) {
        let q = content.tensor(&mut cursor, &t.name, &Device::Cpu).unwrap();
        assert_eq!(q.shape().dims(), &t.shape[..], "{}", t.name);
        assert_eq!(q.dtype(), t.ty.ggml_dtype(), "{}", t.name);
        let theirs = q.dequantize(&Device::Cpu).unwrap().flatten_all().unwrap();
        let theirs = theirs.to_vec1::<f32>().unwrap();
        let cols = *t.shape.last().unwrap();
        let mut bytes = Vec::new();
        quantize(data, data.len() / cols, cols, t.ty, &mut bytes).unwrap();
        ours.resize(data.len(), 0.0);
        dequantize(&bytes, data.len() / cols, cols, t.ty, &mut ours).unwrap();
        assert!(theirs == ours, "{} dequantizes differently", t.name);
    }
}

#[test]
fn candles_reader_gets_back_every_metadata_value() {
    let (file, _) = write_plan(&metadata(), &plan());
    let content = Content::read(&mut Cursor::new(&file)).unwrap();
    let m = &content.metadata;
    assert_eq!(m["general.architecture"].to_string().unwrap(), "llama");
    assert_eq!(m["general.quantization_version"].to_u32().unwrap(), 2);
    assert_eq!(m["modelpress.parameters"].to_u64().unwrap(), 12_345_678_901);
    assert_eq!(m["modelpress.target_bits"].to_f32().unwrap(), 4.5);
    assert!(m["modelpress.exact"].to_bool().unwrap());
    let schemes: Vec<String> = m["modelpress.schemes"]
        .to_vec()
        .unwrap()
        .iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => panic!("not a string: {other:?}"),
        })
        .collect();
    assert_eq!(schemes, ["q4_k", "q8_0"]);
}

#[test]
fn predicted_size_and_offsets_match_the_written_file() {
    for alignment in [None, Some(64u32)] {
        let mut meta = metadata();
        if let Some(a) = alignment {
            meta.push(("general.alignment".into(), a.into()));
        }
        let tensors = plan();
        let layout = layout(&meta, &tensors).unwrap();
        let (file, _) = write_plan(&meta, &tensors);
        assert_eq!(predict_file_size(&meta, &tensors).unwrap(), file.len() as u64);
        let content = Content::read(&mut Cursor::new(&file)).unwrap();
        assert_eq!(content.tensor_data_offset, layout.data_start);
        for (t, &offset) in tensors.iter().zip(&layout.offsets) {
            assert_eq!(content.tensor_infos[&t.name].offset, offset);
            assert_eq!(offset % layout.alignment, 0);
        }
    }
}

#[test]
fn a_header_finished_with_a_same_length_value_equals_writing_it_first() {
    let dir = tempfile::tempdir().unwrap();
    let tensors = [TensorInfo::new("w", &[2, 32], GgufType::Q8_0)];
    let meta = |sha: &str| vec![("modelpress.input_sha256".to_string(), MetaValue::from(sha))];
    let mut bytes = Vec::new();
    quantize(&[0.5; 64], 2, 32, GgufType::Q8_0, &mut bytes).unwrap();
    let write = |name: &str, first: &str, last: Option<&str>| {
        let path = dir.path().join(name);
        let mut w = GgufWriter::create(&path, &meta(first), &tensors).unwrap();
        w.write_tensor("w", &bytes).unwrap();
        match last {
            Some(sha) => w.finish_with_metadata(&meta(sha)).map(|_| ()),
            None => w.finish().map(|_| ()),
        }
        .map(|()| std::fs::read(&path).unwrap())
    };
    let patched = write("p.gguf", &"0".repeat(64), Some(&"ab".repeat(32))).unwrap();
    assert_eq!(patched, write("d.gguf", &"ab".repeat(32), None).unwrap());
    let err = write("x.gguf", &"0".repeat(64), Some(&"0".repeat(65))).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}

#[test]
fn a_written_file_is_synced_and_readable_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    let tensors = [TensorInfo::new("w", &[2, 32], GgufType::Q8_0)];
    let mut writer = GgufWriter::create(&path, &[], &tensors).unwrap();
    let mut bytes = Vec::new();
    quantize(&[0.5; 64], 2, 32, GgufType::Q8_0, &mut bytes).unwrap();
    writer.write_tensor("w", &bytes).unwrap();
    writer.finish().unwrap();
    let mut file = File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let q = content.tensor(&mut file, "w", &Device::Cpu).unwrap();
    assert_eq!(q.shape().dims(), &[2, 32]);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), predict_file_size(&[], &tensors).unwrap());
}

#[test]
fn tensors_must_arrive_in_plan_order_with_exact_byte_counts() {
    let tensors = plan();
    let mut writer = GgufWriter::new(Vec::new(), &[], &tensors).unwrap();
    let err = writer.write_tensor("conv.weight", &[0; 144]).unwrap_err();
    assert_eq!(err.to_string(), "expected tensor \"blk.0.attn_q.weight\" next (plan order), got \"conv.weight\"");
    let err = writer.write_tensor("blk.0.attn_q.weight", &[0; 10]).unwrap_err();
    assert_eq!(err.to_string(), "tensor \"blk.0.attn_q.weight\" (q4_k) must be 4608 bytes, got 10");
    writer.write_tensor("blk.0.attn_q.weight", &[0; 4608]).unwrap();
    let err = writer.finish().unwrap_err();
    assert_eq!(err.to_string(), "finish() called after 1 of 4 tensors; next expected \"blk.0.ffn_up.weight\"");
}

#[test]
fn writing_past_the_plan_is_refused() {
    let tensors = [TensorInfo::new("w", &[32], GgufType::F32)];
    let mut writer = GgufWriter::new(Vec::new(), &[], &tensors).unwrap();
    writer.write_tensor("w", &[0; 128]).unwrap();
    let err = writer.write_tensor("x", &[0; 128]).unwrap_err();
    assert_eq!(err.to_string(), "all 1 planned tensors are already written; got \"x\"");
}

#[test]
fn plans_that_readers_would_reject_are_refused_up_front() {
    let conv = [TensorInfo::new("conv.weight", &[64, 32, 3, 3], GgufType::Q8_0)];
    assert_eq!(
        layout(&[], &conv).unwrap_err().to_string(),
        "tensor \"conv.weight\" with shape [64, 32, 3, 3] cannot be stored as q8_0: \
         innermost row length 3 is not a multiple of the q8_0 block size 32"
    );
    let long = "x".repeat(MAX_NAME_BYTES + 1);
    let err = layout(&[], &[TensorInfo::new(long, &[1], GgufType::F32)]).unwrap_err();
    assert!(matches!(err, GgufError::NameTooLong(_)));
    let twice = [TensorInfo::new("a", &[1], GgufType::F32), TensorInfo::new("a", &[1], GgufType::F32)];
    assert!(matches!(layout(&[], &twice), Err(GgufError::DuplicateTensor(n)) if n == "a"));
    let meta = [("k".to_string(), MetaValue::Bool(true)), ("k".to_string(), MetaValue::Bool(false))];
    assert!(matches!(layout(&meta, &[]), Err(GgufError::DuplicateKey(k)) if k == "k"));
    let meta = [("general.alignment".to_string(), MetaValue::U32(48))];
    assert!(matches!(layout(&meta, &[]), Err(GgufError::BadAlignment(_))));
}
