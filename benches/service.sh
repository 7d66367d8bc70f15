#!/usr/bin/env bash
# Service-level measurements (issue: foundation): streaming upload speed and server memory,
# and status-read latency under load while jobs run. Needs curl and wrk (apt-get install wrk).
#   bash benches/service.sh            # 2 GiB upload, 30 s of wrk with 64 connections
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-2048}
DURATION=${DURATION:-30s}
cargo build --release --locked --bin modelpress >/dev/null
BIN=target/release/modelpress
WORK=$(mktemp -d "${TMPDIR:-/tmp}/modelpress-bench.XXXXXX")
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; rm -rf "$WORK"' EXIT

# A valid safetensors file of SIZE_MIB MiB: one f32 tensor per 64 MiB, data left sparse (zeros)
# so the client's reads cost nothing and the figure is the server's.
python3 - "$WORK/model.safetensors" "$SIZE_MIB" <<'PY'
import json, struct, sys
path, mib = sys.argv[1], int(sys.argv[2])
n = mib // 64
per = 64 << 20
header = {f"layers.{i}.weight": {"dtype": "F32", "shape": [4096, 4096], "data_offsets": [i * per, (i + 1) * per]} for i in range(n)}
h = json.dumps(header).encode()
h += b" " * (-len(h) % 8)
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    f.truncate(8 + len(h) + n * per)
PY

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MODELPRESS__STORAGE__DATA_DIR="$WORK/data" MODELPRESS__SERVER__PORT=$PORT MODELPRESS__QUEUE__WORKERS=2 \
  MODELPRESS__LOG__LEVEL=warn "$BIN" serve & SERVER=$!
until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.1; done

rss() { awk "/^$1:/ {print \$2}" "/proc/$SERVER/status"; }
echo 5 > "/proc/$SERVER/clear_refs"   # reset the peak (VmHWM) to the current resident set
BEFORE=$(rss VmRSS)
START=$(date +%s.%N)
MODEL=$(curl -sS -T "$WORK/model.safetensors" "http://127.0.0.1:$PORT/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
END=$(date +%s.%N)
PEAK=$(rss VmHWM)
python3 -c "
mib=$SIZE_MIB; s=$END-$START
print(f'upload: {mib} MiB in {s:.2f} s = {mib*1.048576/s:.0f} MB/s; server RSS {$BEFORE/1024:.1f} MiB before, peak {$PEAK/1024:.1f} MiB (growth {($PEAK-$BEFORE)/1024:.1f} MiB)')"

# Keep two workers busy for the whole run: a queue of slow jobs (int4 with MSE search).
SPEC='{"model_id": "'$MODEL'", "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "search": "mse"}]}'
for _ in $(seq 1 12); do
  JOB=$(curl -sS "http://127.0.0.1:$PORT/v1/jobs" -H 'content-type: application/json' -d "$SPEC" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
done
sleep 2
RUNNING=$(curl -sS "http://127.0.0.1:$PORT/v1/jobs?status=running" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')
echo "jobs running while measuring: $RUNNING"
wrk -t2 -c64 -d"$DURATION" --latency "http://127.0.0.1:$PORT/v1/jobs/$JOB" | sed -n '/Latency Distribution/,/Transfer/p'
RUNNING=$(curl -sS "http://127.0.0.1:$PORT/v1/jobs?status=running" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["items"]))')
echo "jobs still running at the end: $RUNNING"
