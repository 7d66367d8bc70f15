#!/usr/bin/env bash
# Upload throughput and server memory with blobs in an S3-compatible store (issue 9): a 2 GiB
# model sent with `curl -T` to a server whose storage.blob_store is an s3s-fs bucket on loopback,
# then the same to a server on the local disk, alternating; prints MB/s and the server's peak RSS
# growth (VmHWM after minus VmRSS before the upload).
#   bash benches/s3_upload.sh
#   ROUNDS=3 SIZE_MIB=2048 S3S_FS=target/ci-tools/bin/s3s-fs BIN=target/release/modelpress bash benches/s3_upload.sh
# Needs s3s-fs (cargo install s3s-fs --version 0.14.1 --features binary --locked) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-2}
S3S_FS=${S3S_FS:-$(command -v s3s-fs || echo target/ci-tools/bin/s3s-fs)}
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin modelpress >/dev/null
  BIN=target/release/modelpress
fi
WORK=$(mktemp -d "${TMPDIR:-/var/tmp}/modelpress-s3.XXXXXX")
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

python3 benches/sparse_model.py "$WORK/model.safetensors" "$SIZE_MIB"

mkdir -p "$WORK/s3/bench"
S3PORT=$(port)
"$S3S_FS" --host 127.0.0.1 --port "$S3PORT" --access-key bench --secret-key bench-secret "$WORK/s3" >"$WORK/s3.log" 2>&1 &
PIDS+=($!)
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench-secret

run() { # $1: s3 or disk
  local dir="$WORK/data-$1-$RANDOM" p
  p=$(port)
  if [ "$1" = s3 ]; then
    MODELPRESS__STORAGE__BLOB_STORE="s3://bench/r$RANDOM" MODELPRESS__STORAGE__S3_ENDPOINT="http://127.0.0.1:$S3PORT" \
    MODELPRESS__STORAGE__S3_ALLOW_HTTP=true MODELPRESS__STORAGE__DATA_DIR="$dir" MODELPRESS__SERVER__PORT="$p" \
      "$BIN" serve >"$WORK/server.log" 2>&1 &
  else
    MODELPRESS__STORAGE__DATA_DIR="$dir" MODELPRESS__SERVER__PORT="$p" "$BIN" serve >"$WORK/server.log" 2>&1 &
  fi
  local pid=$!
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$p/healthz" >/dev/null && break; sleep 0.1; done
  local before after t0 t1 code
  before=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
  t0=$(date +%s.%N)
  code=$(curl -s -o /dev/null -w '%{http_code}' -T "$WORK/model.safetensors" "http://127.0.0.1:$p/v1/models?name=bench")
  t1=$(date +%s.%N)
  after=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  python3 -c "import sys; mib, t0, t1, b, a = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]); print(f'$1: HTTP $code, {mib * 1048576 / (t1 - t0) / 1e6:.0f} MB/s, RSS growth {(a - b) / 1024:.0f} MiB')" \
    "$SIZE_MIB" "$t0" "$t1" "$before" "$after"
}

for r in $(seq "$ROUNDS"); do
  run s3
  run disk
done
