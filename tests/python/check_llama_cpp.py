"""Checks ModelPress's llama.cpp GGUF against llama.cpp's own converter (issue 11).

Builds a tiny Llama-family checkpoint folder as transformers saves it (random weights, a
byte-level BPE tokenizer trained here, sharded into several safetensors files with an index),
runs `modelpress compress FOLDER` to GGUF (F32 and Q8_0), and checks with the `gguf` package:
- the metadata llama.cpp reads (architecture, hyperparameters, tokenizer, special tokens) equals
  what `convert_hf_to_gguf.py` writes for the same folder, key by key;
- every tensor has llama.cpp's name, shape and type, and its bytes equal the converter's
  (F32) or `llama-quantize`'s (the Q8_0 and Q4_K_M mixes) bytes: Q/K permutation included.
With LLAMA_CPP_BIN set (a folder with llama.cpp's built `llama-quantize` and `llama-perplexity`),
the Q8_0 and Q4_K_M files are also compared with llama-quantize's, and llama.cpp runs each pair on
the same text and must report the same perplexity.

Usage: python tests/python/check_llama_cpp.py path/to/modelpress LLAMA_CPP_SOURCE
  LLAMA_CPP_SOURCE: llama.cpp's source tree (convert_hf_to_gguf.py and gguf-py), as bundled in
  the llama-cpp-python source distribution. Without it, only ModelPress's file is checked.
Needs: torch, transformers, tokenizers, gguf, numpy.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

TEXT = (
    "The quick brown fox jumps over the lazy dog. A model is a folder, not only a file. "
    "Quantization makes weights smaller; pruning removes them; distillation teaches a student. "
    "llama.cpp runs GGUF files on phones, laptops and servers, 1234567890 times a day. "
) * 40

# Keys that name the producing tool or file rather than the model.
TOOL_KEYS = re.compile(r"^(general\.(name|basename|size_label|type|file_type|quantization_version|finetune|version)|modelpress\..*)$")


def run(cmd, **kw):
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def make_folder(folder: Path, sentencepiece: bool = False, arch: str = "llama"):
    """A tiny Llama with GQA, untied lm_head, in several shards, with a gpt2-style BPE tokenizer
    or (sentencepiece=True) a SentencePiece tokenizer.model as Llama 2 and Mistral ship.
    arch "llama3": Llama 3.1's RoPE scaling (a rope_freqs tensor); "qwen2": a Qwen2 with q/k/v
    biases and tied embeddings."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    if sentencepiece:
        import shutil

        import sentencepiece as spm
        from transformers import LlamaTokenizer

        folder.mkdir(parents=True)
        text = folder.parent / "spm-text.txt"
        text.write_text(TEXT.replace(". ", ".\n"))
        spm.SentencePieceTrainer.train(
            input=str(text), model_prefix=str(folder.parent / "spm"), vocab_size=360, model_type="bpe",
            byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
        )
        fast = LlamaTokenizer(vocab_file=str(folder.parent / "spm.model"))
        fast.save_pretrained(folder)
        # transformers 5 writes only tokenizer.json; Llama 2 and Mistral folders also carry the
        # SentencePiece model, which llama.cpp's converter reads first.
        shutil.copy(folder.parent / "spm.model", folder / "tokenizer.model")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["add_bos_token"] = True
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
        vocab_size = 360
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator([TEXT] * 4, trainer=trainer)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
        )
        fast.chat_template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        fast.save_pretrained(folder)
        vocab_size = tok.get_vocab_size()
        if arch == "template":
            # A template that starts with BOS and ends with a special token other than the
            # configured EOS (gguf-py then makes it the EOS and the configured one EOT).
            t = json.loads((folder / "tokenizer.json").read_text())
            t["post_processor"] = {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                            {"SpecialToken": {"id": "<|im_start|>", "type_id": 0}}],
                 "pair": [], "special_tokens": {}}]}
            (folder / "tokenizer.json").write_text(json.dumps(t))

    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab_size,
        # Rows of 256 and 512 values: every k-quant block fits, so Q4_K_M is k-quants throughout.
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    if arch == "qwen2":
        from transformers import Qwen2Config, Qwen2ForCausalLM

        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1000000.0)
        model = Qwen2ForCausalLM(config).eval()
    else:
        rope = {}
        if arch == "llama3":
            rope = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        rope_theta=500000.0)
        config = LlamaConfig(**common, tie_word_embeddings=False, **rope)
        model = LlamaForCausalLM(config).eval()
    # Weights of a trained model are not i.i.d. per row; scale rows so a wrong permutation shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(torch.linspace(0.5, 1.5, p.shape[0]).unsqueeze(1))
    model.save_pretrained(folder, max_shard_size="60KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists(), "the test folder is sharded"
    return fast


def reference(folder: Path, source: Path, out: Path, outtype: str):
    """convert_hf_to_gguf.py on the folder. Its pre-tokenizer check hashes token ids of known
    vocabularies, and this tokenizer is trained here: tell it the pre-tokenizer is gpt-2's, which
    is what tokenizer.json says (ModelPress reads that definition)."""
    env = dict(os.environ, PYTHONPATH=str(source / "gguf-py"), NO_LOCAL_GGUF="")
    code = (
        "import sys, runpy\n"
        f"sys.path.insert(0, {str(source)!r})\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tokenizer: 'gpt-2'\n"
        f"sys.argv = ['convert_hf_to_gguf.py', {str(folder)!r}, '--outfile', {str(out)!r}, '--outtype', {outtype!r}]\n"
        f"runpy.run_path({str(source / 'convert_hf_to_gguf.py')!r}, run_name='__main__')\n"
    )
    run([sys.executable, "-c", code], env=env)


def fields(path: Path):
    from gguf import GGUFReader

    r = GGUFReader(path)
    meta = {}
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or TOOL_KEYS.match(k):
            continue
        meta[k] = f.contents()
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], np.array(t.data).tobytes()) for t in r.tensors}
    return meta, tensors


def compare(ours: Path, theirs: Path, what: str):
    m1, t1 = fields(ours)
    m2, t2 = fields(theirs)
    diffs = []
    for k in sorted(set(m1) | set(m2)):
        a, b = m1.get(k), m2.get(k)
        if isinstance(a, float) or isinstance(b, float):
            same = a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))
        else:
            same = a == b
        if not same:
            diffs.append(f"`{k}`: ModelPress {str(a)[:200]!r}, converter {str(b)[:200]!r}")
    assert not diffs, f"{what}: metadata differs:\n" + "\n".join(diffs)
    assert set(t1) == set(t2), f"{what}: tensor names differ: {sorted(set(t1) ^ set(t2))}"
    for name in sorted(t1):
        assert t1[name][:2] == t2[name][:2], f"{what}: {name}: {t1[name][:2]} vs {t2[name][:2]}"
        assert t1[name][2] == t2[name][2], f"{what}: {name} ({t1[name][0]}): bytes differ"
    print(f"{what}: {len(m1)} metadata keys and {len(t1)} tensors identical to llama.cpp's converter")


def perplexity(binary: Path, model: Path, text: Path) -> float:
    # llama.cpp logs from a background thread and now and then exits before the last line is
    # out: run again rather than fail on a lost log line.
    for _ in range(3):
        out = run([binary, "-m", model, "-f", text, "-c", "64", "-b", "64", "-t", "2"], capture_output=True, text=True)
        found = re.findall(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if found:
            return float(found[-1])
    raise AssertionError(out.stderr[-2000:])


def main():
    binary = Path(sys.argv[1]).resolve()
    source = Path(sys.argv[2]).resolve() if len(sys.argv) > 2 else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = work / "tiny-llama"
        make_folder(folder)
        outs = {}
        for name, steps in [("f32", []), ("q8_0", [{"op": "quantize", "gguf_mix": "Q8_0"}]),
                            ("q4_k_m", [{"op": "quantize", "gguf_mix": "Q4_K_M"}])]:
            (work / f"{name}.json").write_text(json.dumps({"steps": steps, "outputs": ["gguf"]}))
            run([binary, "compress", folder, "--spec", work / f"{name}.json", "--out", work / name])
            outs[name] = work / name / "model.gguf"
        m, t = fields(outs["q4_k_m"])
        assert m["general.architecture"] == "llama" and "blk.0.attn_q.weight" in t, sorted(m)
        assert t["blk.0.attn_q.weight"][0] == "Q4_K" and t["output.weight"][0] == "Q6_K", t["output.weight"][:2]
        assert t["blk.0.attn_norm.weight"][0] == "F32"
        print(f"gguf: ModelPress's file has architecture llama, {len(t)} tensors under llama.cpp's names")
        if source is None:
            return
        ref = work / "ref-f32.gguf"
        reference(folder, source, ref, "f32")
        compare(outs["f32"], ref, "F32")
        # The converter quantizes to Q8_0 itself (gguf-py's numpy port of ggml's kernel).
        ref_q8 = work / "ref-q8_0-converter.gguf"
        reference(folder, source, ref_q8, "q8_0")
        compare(outs["q8_0"], ref_q8, "Q8_0 (converter --outtype q8_0)")
        quantize = os.environ.get("LLAMA_CPP_BIN")
        if quantize:
            bin_dir = Path(quantize)
            text = work / "text.txt"
            text.write_text(TEXT)
            for name, mix in (("q8_0", "Q8_0"), ("q4_k_m", "Q4_K_M")):
                theirs = work / f"ref-{name}.gguf"
                run([bin_dir / "llama-quantize", ref, theirs, mix, "2"], capture_output=True)
                compare(outs[name], theirs, mix)
            for name in ("f32", "q8_0", "q4_k_m"):
                ours = perplexity(bin_dir / "llama-perplexity", outs[name], text)
                theirs = perplexity(bin_dir / "llama-perplexity", ref if name == "f32" else work / f"ref-{name}.gguf", text)
                print(f"llama-perplexity {name}: ModelPress {ours:.4f}, converter + llama-quantize {theirs:.4f}")
                assert ours == theirs, (ours, theirs)
        # A SentencePiece tokenizer (Llama 2, Mistral): tokenizer.ggml.model `llama` with scores.
        spm_folder = work / "spm" / "tiny-llama"
        make_folder(spm_folder, sentencepiece=True)
        for name, steps in [("f32", []), ("q8_0", [{"op": "quantize", "gguf_mix": "Q8_0"}])]:
            (work / f"spm-{name}.json").write_text(json.dumps({"steps": steps, "outputs": ["gguf"]}))
            out = work / "spm" / name
            run([binary, "compress", spm_folder, "--spec", work / f"spm-{name}.json", "--out", out])
            theirs = work / "spm" / f"ref-{name}.gguf"
            reference(spm_folder, source, theirs, name)
            compare(out / "model.gguf", theirs, f"SentencePiece {name}")
            if quantize and name == "q8_0":
                ours = perplexity(bin_dir / "llama-perplexity", out / "model.gguf", text)
                ref = perplexity(bin_dir / "llama-perplexity", theirs, text)
                print(f"llama-perplexity SentencePiece q8_0: ModelPress {ours:.4f}, converter {ref:.4f}")
                assert ours == ref, (ours, ref)
        # Llama 3.1's RoPE scaling (rope_freqs), Qwen2 (biases, no permutation, tied output), and a
        # post-processor template that renames the EOS (gguf-py's SpecialVocab rules).
        for arch in ("llama3", "qwen2", "template"):
            folder = work / arch / "model"
            make_folder(folder, arch=arch)
            spec = work / f"{arch}.json"
            spec.write_text(json.dumps({"steps": [{"op": "quantize", "gguf_mix": "Q8_0"}], "outputs": ["gguf"]}))
            run([binary, "compress", folder, "--spec", spec, "--out", work / arch / "out"])
            theirs = work / arch / "ref-q8_0.gguf"
            reference(folder, source, theirs, "q8_0")
            compare(work / arch / "out" / "model.gguf", theirs, f"{arch} Q8_0")
            if quantize:
                ours = perplexity(bin_dir / "llama-perplexity", work / arch / "out" / "model.gguf", text)
                ref = perplexity(bin_dir / "llama-perplexity", theirs, text)
                print(f"llama-perplexity {arch} q8_0: ModelPress {ours:.4f}, converter {ref:.4f}")
                assert ours == ref, (ours, ref)
    print("llama.cpp checks passed")


if __name__ == "__main__":
    main()
