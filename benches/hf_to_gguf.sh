#!/usr/bin/env bash
# Hugging Face folder -> llama.cpp-ready GGUF (issue 11): ModelPress in one process
# (`modelpress compress FOLDER` with `gguf_mix`) against llama.cpp's two-tool path
# (`convert_hf_to_gguf.py --outtype f16` to an intermediate GGUF, then `llama-quantize ... 2`),
# on the same model, for Q8_0 and Q4_K_M.
#
# The model is generated here with transformers: a random-weight Llama (seed 0) with realistic
# shapes where every k-quant block fits (hidden 2048, intermediate 5632, 8 layers, 32 heads,
# 4 KV heads, vocab 32000, untied lm_head), saved as bf16 in 500 MB shards, with the small
# byte-level BPE tokenizer of tests/fixtures/tiny_bpe (320 tokens; both tools pad the vocabulary
# to 32000). About 1 GB; written once and reused by every round.
#
# Figures: wall seconds, CPU seconds (user + system) and peak RSS (`/usr/bin/time -v`, "Maximum
# resident set size") per path and target. The two-tool path is timed as the sum of its two steps
# and its peak RSS is the larger of the two steps' peaks (the steps run one after the other).
# Each step also reports the user CPU other processes used meanwhile (/proc/stat): when it is not
# near zero, the machine was shared and the wall times are skewed. One warm-up of each path,
# then ROUNDS rounds alternating the paths (the order flips every round); medians over the
# rounds, ratios two-tool / ModelPress. Also: output sizes, a tensor-by-tensor comparison with
# the `gguf` package (names, types, shapes, bytes; other metadata than general.* and modelpress.*
# is compared and reported), and llama-perplexity on the two Q4_K_M files.
#
# Byte identity: with the f16 intermediate, llama.cpp quantizes f16-rounded weights while
# ModelPress quantizes the bf16 weights directly. bf16 -> f16 is exact except for values below
# 2^-17 in magnitude (they become f16 subnormals and lose bits) or beyond f16's range, so the
# f16-path files may differ in some tensors. The byte comparison that must hold runs against a
# second, untimed two-tool run through an f32 intermediate (bf16 -> f32 is exact); the f16-path
# files are compared too, for information.
#
# Run:
#   bash benches/hf_to_gguf.sh
#   ROUNDS=5 LLAMA_CPP_SRC=/path/llama.cpp LLAMA_CPP_BIN=/path/build/bin PYTHON=/path/python bash benches/hf_to_gguf.sh
# Environment (defaults):
#   ROUNDS=3
#   LLAMA_CPP_SRC=/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp  (convert_hf_to_gguf.py, gguf-py)
#   LLAMA_CPP_BIN=/work/llama/build/bin                                  (llama-quantize, llama-perplexity)
#   PYTHON=/work/main/target/loaders-venv/bin/python                     (torch, transformers, gguf, numpy)
#   BIN: a built modelpress; without it, `cargo build --release --locked --bin modelpress`.
# Needs: GNU time at /usr/bin/time, the Rust toolchain (unless BIN), about 8 GB free under
# /var/tmp (the work dir, removed on exit), about 3 GB of RAM; about 6 minutes on 2 quiet cores
# with ROUNDS=3, plus the build.
set -euo pipefail
cd "$(dirname "$0")/.."
START_ALL=$(date +%s)
ROUNDS=${ROUNDS:-3}
LLAMA_CPP_SRC=$(realpath "${LLAMA_CPP_SRC:-/work/llama/llama_cpp_python-0.3.36/vendor/llama.cpp}")
LLAMA_CPP_BIN=$(realpath "${LLAMA_CPP_BIN:-/work/llama/build/bin}")
PYTHON=${PYTHON:-/work/main/target/loaders-venv/bin/python}
TIME=/usr/bin/time
THREADS=2

die() { echo "hf_to_gguf: $*" >&2; exit 1; }
"$TIME" -v true >/dev/null 2>&1 || die "needs GNU time at $TIME (with -v)"
[ -f "$LLAMA_CPP_SRC/convert_hf_to_gguf.py" ] || die "no convert_hf_to_gguf.py in LLAMA_CPP_SRC=$LLAMA_CPP_SRC"
[ -x "$LLAMA_CPP_BIN/llama-quantize" ] || die "no llama-quantize in LLAMA_CPP_BIN=$LLAMA_CPP_BIN"
[ -x "$LLAMA_CPP_BIN/llama-perplexity" ] || die "no llama-perplexity in LLAMA_CPP_BIN=$LLAMA_CPP_BIN"
"$PYTHON" -c 'import torch, transformers, gguf, numpy' || die "PYTHON=$PYTHON lacks torch, transformers, gguf or numpy"
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin modelpress >/dev/null
  BIN=target/release/modelpress
fi
BIN=$(realpath "$BIN")
REV=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || REV="$REV + uncommitted changes"
free_kb=$(df -Pk /var/tmp | awk 'NR == 2 {print $4}')
[ "$free_kb" -gt $((8 * 1024 * 1024)) ] || die "needs about 8 GB free under /var/tmp (has $((free_kb / 1024)) MiB)"

WORK=$(mktemp -d /var/tmp/modelpress-hf2gguf.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
MODEL=$WORK/model
TARGETS=(Q8_0 Q4_K_M)
for t in "${TARGETS[@]}"; do
  printf '{"steps": [{"op": "quantize", "gguf_mix": "%s"}], "outputs": ["gguf"]}' "$t" > "$WORK/$t.json"
done

echo "== generating the model folder and the text (once)"
"$PYTHON" - "$MODEL" "$WORK/text.txt" tests/fixtures/tiny_bpe <<'PY'
import shutil, sys
from pathlib import Path
import torch
from transformers import LlamaConfig, LlamaForCausalLM

folder, text, tok = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
folder.mkdir(parents=True)
for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok / f, folder / f)
torch.manual_seed(0)
config = LlamaConfig(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    bos_token_id=0, eos_token_id=2,  # <|endoftext|> and <|im_end|> in tiny_bpe
)
setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", torch.bfloat16)
model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
changed, largest = 0, 0.0  # the bf16 weights the f16 intermediate changes, and the largest of them
with torch.no_grad():
    for p in model.parameters():
        diff = p != p.to(torch.float16).to(torch.bfloat16)
        if diff.any():
            changed += int(diff.sum())
            largest = max(largest, float(p[diff].abs().max()))
(folder.parent / "f16_changed.txt").write_text(f"{changed} {largest:.3g}")
model.save_pretrained(folder, max_shard_size="500MB")
shards = sorted(folder.glob("model-*.safetensors"))
assert len(shards) > 1 and (folder / "model.safetensors.index.json").exists(), sorted(folder.iterdir())
n = sum(p.numel() for p in model.parameters())
print(f"model: bf16 -> f16 changes {changed} of {n} weights ({changed / n:.2e}), all |x| <= {largest:.3g}")
size = sum(p.stat().st_size for p in shards)
print(f"model: {n / 1e6:.1f} M parameters, bf16, {len(shards)} shards, {size / 2**20:.1f} MiB")

paragraphs = [
    "The river ran quietly past the old mill, where the miller's daughter kept a ledger of every sack of "
    "grain that came through the door. In the spring the water rose and the wheel turned faster; in the "
    "autumn it slowed, and the village gathered to talk about the harvest and the price of bread.",
    "A good map is not the territory, but it is often more useful than the territory. Travellers who "
    "trusted their maps reached the coast in nine days; those who followed the stars took twelve, and "
    "argued the whole way about which constellation pointed north.",
    "Engineers measure before they cut. They write down the wall time, the memory, the size of every "
    "file, and they repeat the measurement three times because the first number is always a little "
    "wrong. Then they compare, and only then do they decide what to change.",
    "On Tuesday the library opened late. Forty-two readers waited on the steps with coffee and "
    "newspapers, and when the doors finally opened at ten past nine, nobody complained: the new "
    "reading room had windows on three sides and a long oak table by the fire.",
    "Small models run on phones and laptops; large ones need servers with many gigabytes of memory. "
    "Compression narrows the gap: fewer bits per weight, fewer weights per layer, and sometimes fewer "
    "layers, as long as the answers stay nearly the same.",
]
body = "\n\n".join(paragraphs) + "\n\n"
text.write_text(body * (20000 // len(body) + 1))
print(f"text: {text.stat().st_size / 1024:.1f} KiB")
PY

# llama.cpp's converter, run the way tests/python/check_llama_cpp.py runs it: its pre-tokenizer
# detection hashes token ids of known vocabularies and does not know this one; the pre-tokenizer
# of tokenizer.json is GPT-2's byte-level one, so say so.
cat > "$WORK/convert.py" <<PY
import runpy, sys
sys.path.insert(0, "$LLAMA_CPP_SRC")
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
folder, out, outtype = sys.argv[1:4]
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", out, "--outtype", outtype]
runpy.run_path("$LLAMA_CPP_SRC/convert_hf_to_gguf.py", run_name="__main__")
PY
CONVERT=(env PYTHONPATH="$LLAMA_CPP_SRC/gguf-py" NO_LOCAL_GGUF=1 "$PYTHON" "$WORK/convert.py")

# User-mode CPU time (centiseconds) of the whole machine, from /proc/stat (user, nice): minus the
# measured command's own user time, what other processes took meanwhile. Kernel time is left out:
# it holds the asynchronous writeback of the files the commands write, which is no contention.
HZ=$(getconf CLK_TCK)
busy_cs() { awk -v hz="$HZ" '/^cpu / {printf "%d\n", ($2 + $3) * 100 / hz}' /proc/stat; }
# measure ROUND PATH TARGET STEP CMD...: one command's wall milliseconds, peak RSS (KiB), the
# user CPU centiseconds other processes used meanwhile and its own CPU centiseconds (user + system),
# appended to results.tsv; on failure, the command and the end of its output.
measure() {
  local round=$1 path=$2 target=$3 step=$4 start end rss busy0 busy1 own own_user others
  shift 4
  busy0=$(busy_cs)
  start=$(date +%s%N)
  if ! "$TIME" -v -o "$WORK/time.txt" "$@" >"$WORK/last.log" 2>&1; then
    echo "FAILED: $*" >&2
    tail -n 40 "$WORK/last.log" >&2
    tail -n 3 "$WORK/time.txt" >&2 || true
    exit 1
  fi
  end=$(date +%s%N)
  busy1=$(busy_cs)
  rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/time.txt")
  own=$(awk -F': ' '/(User|System) time \(seconds\)/ {s += $2} END {printf "%d\n", s * 100}' "$WORK/time.txt")
  own_user=$(awk -F': ' '/User time \(seconds\)/ {printf "%d\n", $2 * 100}' "$WORK/time.txt")
  others=$((busy1 - busy0 - own_user))
  [ "$others" -ge 0 ] || others=0
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$path" "$target" "$step" $(((end - start) / 1000000)) "$rss" "$others" "$own" >>"$WORK/results.tsv"
  printf '  round %s %-10s %-6s %-8s %5d.%02d s %6d MiB   (own CPU %d.%02d s, others (user) %d.%02d s)\n' "$round" "$path" "$target" "$step" \
    $(((end - start) / 1000000000)) $(((end - start) / 10000000 % 100)) $((rss / 1024)) \
    $((own / 100)) $((own % 100)) $((others / 100)) $((others % 100))
}
modelpress_path() {
  rm -rf "$WORK/mp-$2"
  measure "$1" modelpress "$2" compress "$BIN" compress "$MODEL" --spec "$WORK/$2.json" --out "$WORK/mp-$2"
}
two_tool_path() {
  rm -f "$WORK/f16.gguf" "$WORK/tt-$2.gguf"
  measure "$1" two-tool "$2" convert "${CONVERT[@]}" "$MODEL" "$WORK/f16.gguf" f16
  measure "$1" two-tool "$2" quantize "$LLAMA_CPP_BIN/llama-quantize" "$WORK/f16.gguf" "$WORK/tt-$2.gguf" "$2" "$THREADS"
}

: >"$WORK/results.tsv"
echo "== timed runs (round 0 is the warm-up, not counted)"
for r in $(seq 0 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    if [ $((r % 2)) -eq 0 ]; then
      modelpress_path "$r" "$t"
      two_tool_path "$r" "$t"
    else
      two_tool_path "$r" "$t"
      modelpress_path "$r" "$t"
    fi
  done
done
F16_BYTES=$(stat -c %s "$WORK/f16.gguf")
rm -f "$WORK/f16.gguf"

echo "== untimed: the two-tool path through an exact f32 intermediate, for the byte comparison"
"${CONVERT[@]}" "$MODEL" "$WORK/f32.gguf" f32 >"$WORK/convert-f32.log" 2>&1 || { tail -n 40 "$WORK/convert-f32.log"; die "convert to f32 failed"; }
for t in "${TARGETS[@]}"; do
  "$LLAMA_CPP_BIN/llama-quantize" "$WORK/f32.gguf" "$WORK/tt32-$t.gguf" "$t" "$THREADS" >"$WORK/quantize-f32-$t.log" 2>&1 \
    || { tail -n 40 "$WORK/quantize-f32-$t.log"; die "llama-quantize $t from f32 failed"; }
done
rm -f "$WORK/f32.gguf"

echo "== comparing tensors"
"$PYTHON" - "$WORK" "${TARGETS[@]}" >"$WORK/compare.txt" <<'PY'
import re, sys
from pathlib import Path
from gguf import GGUFReader

work, targets = Path(sys.argv[1]), sys.argv[2:]
TOOL = re.compile(r"^(GGUF\.|general\.|modelpress\.)")

def load(path):
    r = GGUFReader(path)
    meta = {k: f.contents() for k, f in r.fields.items() if not TOOL.match(k)}
    tensors = {t.name: t for t in r.tensors}
    return meta, tensors

def compare(a, b):
    ma, ta = load(a)
    mb, tb = load(b)
    meta = [k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)]
    names = sorted(set(ta) & set(tb))
    only = sorted(set(ta) ^ set(tb))
    types = [n for n in names if (ta[n].tensor_type, list(ta[n].shape)) != (tb[n].tensor_type, list(tb[n].shape))]
    differ = [n for n in names if n not in types and ta[n].data.tobytes() != tb[n].data.tobytes()]
    same = len(names) - len(types) - len(differ)
    verdict = "IDENTICAL" if not (only or types or differ) else "DIFFERENT"
    detail = f"{same}/{len(ta)} tensors byte-identical"
    if only:
        detail += f", names only on one side: {only[:5]}"
    if types:
        detail += f", type/shape differs: {[(n, ta[n].tensor_type.name, tb[n].tensor_type.name) for n in types[:5]]}"
    if differ:
        kinds = sorted({ta[n].tensor_type.name for n in differ})
        detail += f", bytes differ in {len(differ)} ({'/'.join(kinds)}), e.g. {differ[:3]}"
    detail += f"; other metadata: {'same' if not meta else 'differs in ' + ', '.join(meta[:6])}"
    return verdict, detail

for t in targets:
    mp = work / f"mp-{t}" / "model.gguf"
    for label, ref in (("f32 intermediate", work / f"tt32-{t}.gguf"), ("f16 intermediate", work / f"tt-{t}.gguf")):
        verdict, detail = compare(mp, ref)
        print(f"{t} ModelPress vs two-tool ({label}): {verdict}: {detail}")
PY
cat "$WORK/compare.txt"

echo "== llama-perplexity on the Q4_K_M files (-c 128 -b 128 -t $THREADS)"
perplexity() {
  local out
  out=$("$LLAMA_CPP_BIN/llama-perplexity" -m "$1" -f "$WORK/text.txt" -c 128 -b 128 -t "$THREADS" 2>&1) \
    || { echo "$out" | tail -n 20 >&2; die "llama-perplexity failed on $1"; }
  echo "$out" | grep -o 'Final estimate: PPL = [0-9.]*' | tail -n 1 | awk '{print $NF}'
}
PPL_MP=$(perplexity "$WORK/mp-Q4_K_M/model.gguf")
PPL_TT=$(perplexity "$WORK/tt-Q4_K_M.gguf")
[ -n "$PPL_MP" ] && [ -n "$PPL_TT" ] || die "no 'Final estimate: PPL' in llama-perplexity's output"
echo "  ModelPress $PPL_MP, two-tool (f16) $PPL_TT"

echo
echo "modelpress: $BIN (source tree at $REV when the script started)"
"$PYTHON" - "$WORK" "$ROUNDS" "$F16_BYTES" "$PPL_MP" "$PPL_TT" "$THREADS" "${TARGETS[@]}" <<'PY'
import statistics, sys
from collections import defaultdict
from pathlib import Path

work, rounds, f16_bytes, ppl_mp, ppl_tt, threads = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:7]
targets = sys.argv[7:]
runs = defaultdict(lambda: defaultdict(dict))  # (path, target) -> round -> step -> (wall s, MiB, CPU s)
others = []  # user CPU seconds other processes used during each counted step
for line in (work / "results.tsv").read_text().splitlines():
    r, path, target, step, ms, kb, cs, own = line.split("\t")
    if int(r) > 0:
        runs[(path, target)][int(r)][step] = (int(ms) / 1000, int(kb) / 1024, int(own) / 100)
        others.append(int(cs) / 100)
model_mib = sum(p.stat().st_size for p in (work / "model").glob("*.safetensors")) / 2**20
nbytes = {("modelpress", t): (work / f"mp-{t}" / "model.gguf").stat().st_size for t in targets}
nbytes |= {("two-tool", t): (work / f"tt-{t}.gguf").stat().st_size for t in targets}
size = {k: v / 2**20 for k, v in nbytes.items()}
names = {"modelpress": "modelpress compress", "two-tool": "convert f16 + llama-quantize"}

def figures(key):
    per = runs[key].values()
    wall = [sum(v[0] for v in steps.values()) for steps in per]
    rss = [max(v[1] for v in steps.values()) for steps in per]
    cpu = [sum(v[2] for v in steps.values()) for steps in per]
    parts = {step: statistics.median(steps[step][0] for steps in per) for step in next(iter(per))}
    return statistics.median(wall), min(wall), max(wall), statistics.median(rss), parts, statistics.median(cpu)

print(f"HF folder ({model_mib:.0f} MiB bf16, 8-layer Llama 2048/5632, vocab 32000) -> GGUF, "
      f"{threads} threads, median of {rounds} alternating rounds after a warm-up")
print(f"{'path':30s} | {'target':6s} | {'wall s (median)':>15s} | {'min-max s':>13s} | {'CPU s':>6s} | {'peak RSS MiB':>12s} | {'output MiB':>10s} | steps (median wall s)")
fig = {}
for t in targets:
    for path in ("modelpress", "two-tool"):
        w, lo, hi, rss, parts, cpu = fig[(path, t)] = figures((path, t))
        steps = ", ".join(f"{k} {v:.2f}" for k, v in parts.items())
        print(f"{names[path]:30s} | {t:6s} | {w:15.2f} | {lo:6.2f}-{hi:6.2f} | {cpu:6.2f} | {rss:12.0f} | {size[(path, t)]:10.1f} | {steps}")
print("(CPU s: user + system seconds of the path's processes, median; less sensitive than wall time to other load)")
print(f"(the two-tool path also writes a {f16_bytes / 2**20:.0f} MiB f16 intermediate GGUF; its peak RSS is the larger of its two steps')")
print("ratios two-tool / modelpress:")
for t in targets:
    mp, tt = fig[("modelpress", t)], fig[("two-tool", t)]
    print(f"  {t:6s}: time {tt[0] / mp[0]:.2f}x, CPU {tt[5] / mp[5]:.2f}x, peak RSS {tt[3] / mp[3]:.2f}x, output bytes two-tool - modelpress {nbytes[('two-tool', t)] - nbytes[('modelpress', t)]:+d}")
print("byte comparison (gguf package: tensor names, types, shapes, bytes; general.* and modelpress.* metadata ignored):")
for line in (work / "compare.txt").read_text().splitlines():
    print("  " + line)
changed, largest = (work / "f16_changed.txt").read_text().split()
print("  note: through the f16 intermediate llama.cpp quantizes f16-rounded weights, ModelPress the bf16 weights")
print(f"  directly; bf16 -> f16 changed {changed} weights (all |x| <= {largest}: f16 subnormals lose bits), so")
print("  byte identity is expected only through the exact f32 intermediate (bf16 -> f32).")
quiet = max(others) < 1.0
print(f"other processes' user CPU during the counted steps: {sum(others):.1f} s in all, at most {max(others):.1f} s in one step"
      + ("" if quiet else "  <- the machine was not quiet: wall times are skewed, CPU s less so (see the per-step lines)"))
print(f"llama-perplexity Q4_K_M (random weights, PPL near the vocab size; the point is agreement):")
print(f"  modelpress {ppl_mp}, two-tool (f16 intermediate) {ppl_tt}, relative difference "
      f"{(float(ppl_tt) - float(ppl_mp)) / float(ppl_mp):+.2e}")
print("  (the f32-intermediate Q4_K_M file is byte-identical to ModelPress's when the comparison above says so,")
print("  hence the same perplexity)")
PY
echo "total run time: $(( $(date +%s) - START_ALL )) s"
