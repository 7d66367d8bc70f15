#!/usr/bin/env bash
# Service-level measurements (issue: foundation): streaming upload speed and server memory,
# and status-read latency idle and under load while jobs run. Needs curl and wrk (apt-get install wrk).
#   bash benches/service.sh            # 2 GiB upload, 30 s of wrk with 64 connections, idle then two jobs running
#   AUTH=1 bash benches/service.sh     # then the same with API keys required (an admin key, rate limit off:
#                                      # the auth path's cost), and LIMITED_DURATION at the default
#                                      # auth.requests_per_second (most answers 429)
#   BIN=/tmp/t/release/modelpress AUTH=1 ROUNDS=2 SIZE_MIB=256 DURATION=20s bash benches/service.sh
#                                      # a prebuilt binary; keys off and on alternated twice
#   MODELPRESS__STORAGE__DATABASE_URL=postgres://user:pw@host/db bash benches/service.sh
#                                      # the same on a shared PostgreSQL database (the server
#                                      # inherits the environment; every setting works this way)
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-2048}
DURATION=${DURATION:-30s}
AUTH=${AUTH:-0}
ROUNDS=${ROUNDS:-1}
LIMITED_DURATION=${LIMITED_DURATION:-10s}
# Enough slow jobs to keep both workers busy through a measurement: 12 at 2 GiB, more for
# smaller models (up to 90: a key's principal may queue 100).
HEAVY_JOBS=${HEAVY_JOBS:-$(( SIZE_MIB >= 2048 ? 12 : 12 * 2048 / SIZE_MIB > 90 ? 90 : 12 * 2048 / SIZE_MIB ))}
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked --bin modelpress >/dev/null
  BIN=target/release/modelpress
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/modelpress-bench.XXXXXX")
SERVER=
stop() { if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; SERVER=; fi; }
trap 'stop; rm -rf "$WORK"' EXIT

# A valid safetensors file of SIZE_MIB MiB: one f32 tensor per 64 MiB, data left sparse (zeros)
# so the client's reads cost nothing and the figure is the server's.
python3 benches/sparse_model.py "$WORK/model.safetensors" "$SIZE_MIB"

# Counts the responses by status (only for the rate-limited run: a Lua callback per response costs).
cat > "$WORK/status.lua" <<'LUA'
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init() codes = {} end
function response(status) codes[status] = (codes[status] or 0) + 1 end
function done()
  local total = {}
  for _, t in ipairs(threads) do for k, v in pairs(t:get("codes")) do total[k] = (total[k] or 0) + v end end
  for k, v in pairs(total) do io.write(string.format("  status %d: %d\n", k, v)) end
end
LUA

# Every request carries the key once one is set (KEY empty: keys off, the local user).
api() { curl -sS ${KEY:+-H "authorization: Bearer $KEY"} "$@"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
rss() { awk "/^$1:/ {print \$2}" "/proc/$SERVER/status"; }
running() { api "http://127.0.0.1:$PORT/v1/jobs?status=running" | json '["items"].__len__()'; }

# measure LABEL DURATION [wrk args]: GET /v1/jobs/$TARGET; the latency section and one summary line.
measure() {
  local label=$1 duration=$2 out; shift 2
  out=$(wrk -t2 -c64 -d"$duration" --latency ${KEY:+-H "authorization: Bearer $KEY"} "$@" "http://127.0.0.1:$PORT/v1/jobs/$TARGET")
  echo "$out" | sed -n '/Latency Distribution/,/Transfer/p;/status [0-9]/p'
  echo "$out" | awk -v label="$label" '
    /^ +50%/ {p50=$2} /^ +90%/ {p90=$2} /^ +99%/ {p99=$2} / requests in / {total=$1}
    /Non-2xx or 3xx responses:/ {non2xx=$NF} /^Requests\/sec:/ {rps=$2}
    END {printf "RESULT %-26s req/s %9s  p50 %8s  p90 %8s  p99 %8s  non-2xx %d/%d (%.1f%%)\n", label, rps, p50, p90, p99, non2xx, total, 100*non2xx/(total ? total : 1)}'
  sleep 3   # lets a rate limiter refill before the next calls
}

# phase MODE: a fresh server and data directory; MODE is off (no keys: the local user), on (an
# admin key, auth.required, no rate limit) or limited (the same at the default rate limit).
# Uploads the model, reads a finished job idle, then the same job while two workers run slow jobs.
phase() {
  local mode=$1 data="$WORK/data-$1-$2" duration=$DURATION wrk_args=() env=()
  KEY=
  case $mode in
    on) env=(MODELPRESS__AUTH__REQUIRED=true MODELPRESS__AUTH__REQUESTS_PER_SECOND=0) ;;
    limited) env=(MODELPRESS__AUTH__REQUIRED=true) duration=$LIMITED_DURATION wrk_args=(-s "$WORK/status.lua") ;;
  esac
  if [ "$mode" != off ]; then
    KEY=$(MODELPRESS__STORAGE__DATA_DIR="$data" MODELPRESS__LOG__LEVEL=warn "$BIN" keys create --principal bench --scopes admin 2>/dev/null)
  fi
  PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  env MODELPRESS__STORAGE__DATA_DIR="$data" MODELPRESS__SERVER__PORT="$PORT" MODELPRESS__QUEUE__WORKERS=2 \
    MODELPRESS__QUEUE__SHUTDOWN_GRACE_SECS=1 MODELPRESS__LOG__LEVEL=warn ${env[@]+"${env[@]}"} "$BIN" serve & SERVER=$!
  until curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null; do sleep 0.1; done
  echo "== keys $mode (round $2)"

  echo 5 > "/proc/$SERVER/clear_refs"   # reset the peak (VmHWM) to the current resident set
  local before peak start end model job
  before=$(rss VmRSS)
  start=$(date +%s.%N)
  model=$(api -T "$WORK/model.safetensors" "http://127.0.0.1:$PORT/v1/models" | json '["id"]')
  end=$(date +%s.%N)
  peak=$(rss VmHWM)
  python3 -c "
mib=$SIZE_MIB; s=$end-$start
print(f'upload: {mib} MiB in {s:.2f} s = {mib*1.048576/s:.0f} MB/s; server RSS {$before/1024:.1f} MiB before, peak {$peak/1024:.1f} MiB (growth {($peak-$before)/1024:.1f} MiB)')"

  # The job every read targets: a quick one, finished before the idle measurement.
  TARGET=$(api "http://127.0.0.1:$PORT/v1/jobs" -H 'content-type: application/json' \
    -d '{"model_id": "'"$model"'", "steps": [{"op": "quantize", "bits": 8, "granularity": "channel", "symmetric": true}]}' | json '["id"]')
  local status=queued
  while [ "$status" = queued ] || [ "$status" = running ]; do
    sleep 0.2
    status=$(api "http://127.0.0.1:$PORT/v1/jobs/$TARGET" | json '["status"]')
  done
  echo "target job $TARGET: $status; jobs running while measuring: $(running)"
  measure "keys $mode, idle" "$duration" ${wrk_args[@]+"${wrk_args[@]}"}

  # Keep two workers busy for the whole run: a queue of slow jobs (int4 with MSE search).
  local spec='{"model_id": "'$model'", "steps": [{"op": "quantize", "bits": 4, "granularity": "group", "search": "mse"}]}'
  for _ in $(seq 1 "$HEAVY_JOBS"); do
    job=$(api "http://127.0.0.1:$PORT/v1/jobs" -H 'content-type: application/json' -d "$spec" | json '["id"]')
  done
  sleep 2
  echo "jobs running while measuring: $(running)"
  measure "keys $mode, 2 jobs running" "$duration" ${wrk_args[@]+"${wrk_args[@]}"}
  echo "jobs still running at the end: $(running)"
  stop
}

for round in $(seq 1 "$ROUNDS"); do
  phase off "$round"
  if [ "$AUTH" = 1 ]; then phase on "$round"; fi
done
if [ "$AUTH" = 1 ]; then phase limited 1; fi
