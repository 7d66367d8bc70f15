"""Loads ModelPress outputs with the real tools (issue 10): transformers, compressed-tensors, gguf.

Builds a tiny Llama with transformers (random weights, untied lm_head; then a tied one for the
compressed-tensors load), compresses it with the
`modelpress` CLI to int4 group-32 compressed-tensors, GGUF Q8_0 and dense safetensors, then:
- transformers' `from_pretrained` loads the compressed-tensors folder as written (the model's own
  config.json with ModelPress's `quantization_config` merged in) with no missing or unexpected
  keys, and gives the logits of the dense output folder;
- the compressed-tensors package decompresses the packed weights to exactly the dense values;
- the gguf package reads the GGUF and its Q8_0 tensors dequantize to the dense values.

Usage: python tests/python/check_loaders.py path/to/modelpress
Needs: torch, transformers, compressed-tensors, gguf, safetensors, numpy (see .ci/run).
"""

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

# Dense output and decompressed weights are the same numbers, decoded in the same dtype.
EXACT = 0.0
# Logits of two loads of identical weights through different code paths (fused vs unfused ops).
LOGITS_ATOL = 1e-4


def run(cmd):
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(cmd, check=True)


def make_llama(folder: Path, tied: bool = False, max_shard_size="5GB"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=tied,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    return model


def check_transformers(out: Path):
    """The output folders load as they are: ModelPress wrote the model's config.json (with
    `quantization_config` merged in for compressed-tensors) next to the weights."""
    from transformers import AutoModelForCausalLM

    folder = out / "compressed-tensors"
    config = json.loads((folder / "config.json").read_text())
    assert config.get("model_type") == "llama" and "quantization_config" in config, sorted(config)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"compressed-tensors folder loads with problems: {problems}"

    dense, dinfo = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(dinfo[k] for k in ("missing_keys", "unexpected_keys")), dinfo

    ids = torch.arange(0, 32).reshape(2, 16)
    with torch.no_grad():
        got = model(ids).logits
        want = dense(ids).logits
    diff = (got - want).abs().max().item()
    print(f"transformers: compressed-tensors folder loads cleanly; max |logit difference| vs dense = {diff:.2e}")
    assert diff <= LOGITS_ATOL, diff


def check_compressed_tensors(out: Path):
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    folder = out / "compressed-tensors"
    dense = load_file(out / "model.safetensors")
    dequantizer = CompressedTensorsDequantizer(folder, dtype=torch.float32)
    packed = load_file(folder / "model.safetensors")
    n_packed = sum(name.endswith(".weight_packed") for name in packed)
    # validate() dequantizes and refuses leftover qparams of modules no config group targets.
    decoded = dequantizer.validate(packed)
    assert n_packed > 0 and set(decoded) == set(dense), sorted(set(decoded) ^ set(dense))
    for name, want in dense.items():
        diff = (decoded[name].to(torch.float32) - want.to(torch.float32)).abs().max().item()
        assert diff <= EXACT, f"{name}: decompressed differs from dense by {diff}"
    print(f"compressed-tensors: {n_packed} packed weights decompress to exactly the dense values")


def check_gguf(out: Path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(out / "model.gguf")
    dense = load_file(out / "model.safetensors")
    quantized = 0
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).reshape(dense[t.name].shape)
        want = dense[t.name].to(torch.float32).numpy()
        diff = float(np.abs(values.astype(np.float32) - want).max()) if want.size else 0.0
        assert diff <= EXACT, f"{t.name} ({t.tensor_type.name}): differs from dense by {diff}"
        quantized += t.tensor_type.name == "Q8_0"
    assert quantized > 0
    print(f"gguf: {len(reader.tensors)} tensors read, {quantized} Q8_0, all equal to the dense values")


def check_bert(binary: Path, work: Path):
    """An encoder's evaluation measures what transformers computes: the report's embedding cosine
    between the original and the compressed (dense output) BERT equals the cosine of
    transformers' own mean-pooled embeddings of the same passages."""
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    folder = work / "bert"
    config = BertConfig(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=128)
    BertModel(config).eval().save_pretrained(folder, safe_serialization=True)
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bpe" / "tokenizer.json"
    shutil.copy(fixture, folder / "tokenizer.json")
    lines = ["The cat sat on the mat.", "Stocks fell sharply on Monday.", "Rain is expected over the weekend.",
             "Compilers turn source code into machine code.", "Birds migrate south in the autumn."]
    (work / "corpus.txt").write_text("\n".join(lines))
    # 2 bits, so the embeddings move enough for the comparison to mean something.
    spec = {"steps": [{"op": "quantize", "bits": 2, "granularity": "group", "group_size": 32}],
            "outputs": ["safetensors"], "evaluate": {"context": 32}}
    (work / "bert.json").write_text(json.dumps(spec))
    out = work / "bert-out"
    run([binary, "compress", folder, "--spec", work / "bert.json", "--dataset", work / "corpus.txt", "--out", out])
    e = json.loads((out / "report.json").read_text())["embedding_evaluation"]

    tok = Tokenizer.from_file(str(fixture))
    tok.enable_truncation(32)
    original = BertModel.from_pretrained(folder).eval()
    compressed = BertModel.from_pretrained(out).eval()
    cosines = []
    with torch.no_grad():
        for line in lines:
            ids = torch.tensor([tok.encode(line, add_special_tokens=True).ids])
            a = original(ids).last_hidden_state[0].mean(0)
            b = compressed(ids).last_hidden_state[0].mean(0)
            cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
    want = sum(cosines) / len(cosines)
    print(f"bert: report cosine_mean {e['cosine_mean']:.6f}, transformers {want:.6f}, passages {e['passages']}")
    assert e["passages"] == len(lines), e
    assert abs(e["cosine_mean"] - want) <= 1e-6 and abs(e["cosine_min"] - min(cosines)) <= 1e-6, (e, cosines)


def check_decoder_evaluation(binary: Path, work: Path, arch: str):
    """A decoder's evaluation measures what transformers computes: the report's perplexity of the
    original model equals transformers' own on the same tokens and chunks (each chunk from an
    empty cache, no BOS), for a Llama and a Qwen2 (biases, tied embeddings) saved by
    transformers."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(0)
    folder = work / f"{arch}-eval"
    shape = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    if arch == "qwen2":
        config = Qwen2Config(tie_word_embeddings=True, **shape)
    else:
        config = LlamaConfig(tie_word_embeddings=False, **shape)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(folder, safe_serialization=True)
    fixture = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_bpe" / "tokenizer.json"
    shutil.copy(fixture, folder / "tokenizer.json")
    text = "The quick brown fox jumps over the lazy dog. A model is a folder, not only a file. " * 8
    (work / "decoder.txt").write_text(text)
    spec = {"steps": [{"op": "quantize", "gguf_mix": "Q8_0"}], "outputs": ["gguf"],
            "evaluate": {"tokens": 64, "context": 32}}
    (work / f"{arch}.json").write_text(json.dumps(spec))
    out = work / f"{arch}-eval-out"
    run([binary, "compress", folder, "--spec", work / f"{arch}.json", "--dataset", work / "decoder.txt", "--out", out])
    e = json.loads((out / "report.json").read_text())["text_evaluation"]

    ids = Tokenizer.from_file(str(fixture)).encode(text, add_special_tokens=False).ids[:64]
    nll, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(ids), 32):
            chunk = ids[k:k + 32]
            if len(chunk) < 2:
                continue
            logp = torch.log_softmax(model(torch.tensor([chunk])).logits[0].double(), dim=-1)
            for p in range(len(chunk) - 1):
                nll -= logp[p, chunk[p + 1]].item()
                n += 1
    want = float(np.exp(nll / n))
    print(f"{arch}: report perplexity_before {e['perplexity_before']:.6f}, transformers {want:.6f}, "
          f"{e['predictions']} predictions; Q8_0 GGUF perplexity {e['perplexity_after']:.6f}")
    assert e["predictions"] == n, (e, n)
    assert abs(e["perplexity_before"] / want - 1) <= 1e-4, (e, want)


def main():
    binary = Path(sys.argv[1]).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src = work / "llama"
        make_llama(src)
        # The folder, as a user has it: config.json beside the weights.
        model = src
        for name, spec in [
            ("ct", {"steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}],
                    "outputs": ["safetensors", "compressed-tensors"]}),
            ("gguf", {"steps": [{"op": "quantize", "gguf_type": "q8_0"}], "outputs": ["safetensors", "gguf"]}),
        ]:
            (work / f"{name}.json").write_text(json.dumps(spec))
            run([binary, "compress", model, "--spec", work / f"{name}.json", "--out", work / name])
        check_transformers(work / "ct")
        check_compressed_tensors(work / "ct")
        check_gguf(work / "gguf")

        # A tied lm_head (absent from the file, shared with the embeddings): the single scheme
        # targets every Linear, so the folder must list lm_head in `ignore` or the load fails.
        tied = work / "tied"
        tied.mkdir()
        make_llama(tied / "llama", tied=True)
        assert "lm_head.weight" not in load_file(tied / "llama" / "model.safetensors"), "the test model is tied"
        spec = {"steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}],
                "outputs": ["safetensors", "compressed-tensors"]}
        (tied / "ct.json").write_text(json.dumps(spec))
        run([binary, "compress", tied / "llama", "--spec", tied / "ct.json", "--out", tied / "ct"])
        check_transformers(tied / "ct")

        # Sharded in and out: a checkpoint saved by transformers in shards, compressed into shards
        # of at most 40 KB with their index; both folders load with from_pretrained as written.
        sharded = work / "sharded"
        sharded.mkdir()
        make_llama(sharded / "llama", max_shard_size="50KB")
        assert (sharded / "llama" / "model.safetensors.index.json").exists(), "the test model is sharded"
        spec = {"steps": [{"op": "quantize", "bits": 4, "granularity": "group", "group_size": 32}],
                "outputs": ["safetensors", "compressed-tensors"], "max_shard_size": "40KB"}
        (sharded / "ct.json").write_text(json.dumps(spec))
        run([binary, "compress", sharded / "llama", "--spec", sharded / "ct.json", "--out", sharded / "ct"])
        for folder in (sharded / "ct", sharded / "ct" / "compressed-tensors"):
            index = json.loads((folder / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1, index
            assert not (folder / "model.safetensors").exists()
        check_transformers(sharded / "ct")

        check_bert(binary, work)
        for arch in ("llama", "qwen2"):
            check_decoder_evaluation(binary, work, arch)
    print("all loader checks passed")


if __name__ == "__main__":
    main()
