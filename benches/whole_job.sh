#!/usr/bin/env bash
# Whole-process figures (issue 13): `modelpress compress` on the 512 MiB benchmark model
# (8 x 4096x4096 f32, normal(0, 0.02), seed 0) against the physical floor of this machine
# (`cp` + `sync` of the same bytes) and, when LLAMA_QUANTIZE names a built llama-quantize,
# against it on the same weights (an F32 GGUF of the same tensors), 2 threads each.
# The global pruning job is also run by PyTorch (`benches/torch_prune.py`: `prune.global_unstructured`,
# the issue's reference) when PYTHON has torch and safetensors (TORCH=0 skips it: ~26 s a round).
# Rounds alternate the commands; the figures are medians of wall-clock seconds, then ratios.
#   bash benches/whole_job.sh
#   ROUNDS=7 BIN=target/release/modelpress LLAMA_QUANTIZE=/path/llama-quantize PYTHON=venv/bin/python bash benches/whole_job.sh
# Needs python3 with numpy (and the `gguf` package for the llama-quantize comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-5}
PYTHON=${PYTHON:-python3}
if [ -n "${LLAMA_QUANTIZE:-}" ] && ! command -v openssl >/dev/null; then
  echo "openssl is needed for the llama-quantize + SHA-256 reference (apt-get install openssl)" >&2
  exit 1
fi
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin modelpress >/dev/null
  BIN=target/release/modelpress
fi
BIN=$(realpath "$BIN")
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/modelpress-whole.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

"$PYTHON" - "$WORK" "${LLAMA_QUANTIZE:+gguf}" <<'PY'
import json, struct, sys
import numpy as np
work, want_gguf = sys.argv[1], len(sys.argv) > 2 and sys.argv[2] == "gguf"
rng = np.random.default_rng(0)
names = [f"blk.{i}.ffn_up.weight" for i in range(8)]
mats = [rng.normal(0.0, 0.02, size=(4096, 4096)).astype(np.float32) for _ in names]
per = 4096 * 4096 * 4
header = {n: {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [i * per, (i + 1) * per]} for i, n in enumerate(names)}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(f"{work}/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for m in mats:
        f.write(m.tobytes())
if want_gguf:
    import gguf
    w = gguf.GGUFWriter(f"{work}/model-f32.gguf", "llama")
    w.add_block_count(8)
    w.add_context_length(4096)
    w.add_embedding_length(4096)
    w.add_feed_forward_length(4096)
    w.add_head_count(32)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0)
    for n, m in zip(names, mats):
        w.add_tensor(n, m)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
PY

spec() { printf '%s' "$2" > "$WORK/$1.json"; }
spec q8_0 '{"steps": [{"op": "quantize", "gguf_type": "q8_0"}], "outputs": ["gguf"]}'
spec q4_0 '{"steps": [{"op": "quantize", "gguf_type": "q4_0"}], "outputs": ["gguf"]}'
spec prune '{"steps": [{"op": "prune", "method": "magnitude", "scope": "global", "sparsity": 0.5}], "outputs": ["safetensors"]}'
spec copy '{"steps": [{"op": "quantize", "bits": 8, "targets": ["nothing.*"]}], "outputs": ["safetensors"]}'

# Seconds of one command (its output discarded), the page cache left warm as a user's rerun has it.
# A `sync` after it, not timed, so no command pays for the writeback of the one before (llama-quantize
# does not sync its output: its dirty pages were being written back during the next command).
seconds() {
  local start end
  start=$(date +%s%N)
  "$@" >/dev/null 2>&1
  end=$(date +%s%N)
  sync
  printf '%d.%09d' $(( (end - start) / 1000000000 )) $(( (end - start) % 1000000000 ))
}
mp() {
  rm -rf "$WORK/out"
  seconds "$BIN" compress "$WORK/model.safetensors" --spec "$WORK/$1.json" --out "$WORK/out"
}
floor() {
  rm -f "$WORK/copy.safetensors"
  seconds sh -c "cp '$WORK/model.safetensors' '$WORK/copy.safetensors' && sync '$WORK/copy.safetensors'"
}
lq() {
  rm -f "$WORK/lq.gguf"
  seconds "$LLAMA_QUANTIZE" "$WORK/model-f32.gguf" "$WORK/lq.gguf" "$1" 2
}
# llama-quantize given two guarantees `modelpress compress` has and it lacks, with standard tools:
# the input's SHA-256 for the provenance (OpenSSL's, which uses the SHA extensions as ModelPress's
# does, where coreutils' sha256sum is several times slower; computed alongside, as ModelPress does)
# and a durable output (a `sync` of the file, timed this time).
lq_durable() {
  rm -f "$WORK/lq.gguf"
  seconds sh -c "openssl dgst -sha256 '$WORK/model-f32.gguf' >/dev/null & '$LLAMA_QUANTIZE' '$WORK/model-f32.gguf' '$WORK/lq.gguf' $1 2 && wait && sync '$WORK/lq.gguf'"
}

# PyTorch's whole process for the pruning job, when it can run here.
TORCH=${TORCH:-1}
if [ "$TORCH" = 1 ] && ! "$PYTHON" -c 'import torch, safetensors' 2>/dev/null; then
  echo "skipping PyTorch's pruning: $PYTHON has no torch or safetensors (pip install torch safetensors)" >&2
  TORCH=0
fi
torch_prune() {
  rm -f "$WORK/torch.safetensors"
  seconds "$PYTHON" benches/torch_prune.py "$WORK/model.safetensors" "$WORK/torch.safetensors" 2
}

declare -A T
cases=(q8_0 q4_0 prune copy)
for r in $(seq 1 "$ROUNDS"); do
  for c in "${cases[@]}"; do
    T[mp_$c]+="$(mp "$c") "
    if [ "$TORCH" = 1 ] && [ "$c" = prune ]; then T[torch_prune]+="$(torch_prune) "; fi
    if [ -n "${LLAMA_QUANTIZE:-}" ] && [ "$c" = q8_0 ]; then
      T[lq_q8_0]+="$(lq Q8_0) "
      T[lqd_q8_0]+="$(lq_durable Q8_0) "
    fi
    if [ -n "${LLAMA_QUANTIZE:-}" ] && [ "$c" = q4_0 ]; then
      T[lq_q4_0]+="$(lq Q4_0) "
      T[lqd_q4_0]+="$(lq_durable Q4_0) "
    fi
  done
  T[floor]+="$(floor) "
  echo "round $r done" >&2
done

"$PYTHON" - "$ROUNDS" <<PY
import statistics, sys
t = {k: [float(x) for x in v.split()] for k, v in {$(for k in "${!T[@]}"; do printf '"%s": "%s", ' "$k" "${T[$k]}"; done)}.items()}
med = {k: statistics.median(v) for k, v in t.items()}
print(f"whole process, median of {sys.argv[1]} alternating rounds, 512 MiB model, wall seconds (min-max):")
for k in sorted(med):
    print(f"  {k:10s} {med[k]:6.3f} s  ({min(t[k]):.3f}-{max(t[k]):.3f})")
print(f"  copy vs cp+sync: {med['mp_copy'] / med['floor']:.2f}x the floor")
if "torch_prune" in med:
    print(f"  prune: PyTorch / modelpress = {med['torch_prune'] / med['mp_prune']:.1f}x")
for q in ("q8_0", "q4_0"):
    if f"lq_{q}" in med:
        print(f"  {q}: llama-quantize / modelpress = {med[f'lq_{q}'] / med[f'mp_{q}']:.2f}x;"
              f" with SHA-256 + sync (lqd): {med[f'lqd_{q}'] / med[f'mp_{q}']:.2f}x")
PY
