#!/usr/bin/env bash
# bench/feast: Feast 0.67's own feature server (`feast serve` over its Redis
# online store) and `sfs serve` side by side, on the same card rows in one
# Redis of their own, same POST /get-online-features request shape, loaded by
# outside tools: wrk (closed loop, throughput) and oha (fixed rate, latency
# corrected). Prints one JSON line (also to bench/out/feast.jsonl).
# env: OHA (1; 0 skips the fixed-rate runs), CARDS (10000), DURATION (10 s per run), CONNECTIONS (64), FEAST_WORKERS (1),
#      RATE (5000: sfs single-card rate), BATCH_RATE (500: sfs 100-card batch rate),
#      SFS_BIN (a built sfs: skips the build), BENCH_REDIS_PORT (16391), SFS_PORT (18095), FEAST_PORT (18096)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
CARDS="${CARDS:-10000}"; DURATION="${DURATION:-10}"; CONNECTIONS="${CONNECTIONS:-64}"
FEAST_WORKERS="${FEAST_WORKERS:-1}"; RATE="${RATE:-5000}"; BATCH_RATE="${BATCH_RATE:-500}"
RPORT="${BENCH_REDIS_PORT:-16391}"; SFS_PORT="${SFS_PORT:-18095}"; FEAST_PORT="${FEAST_PORT:-18096}"
PREFIX="benchfeast:"
mkdir -p bench/out
say() { echo "bench/feast: $*" >&2; }

bash infra/python.sh install-feast >&2
PY=$(bash infra/python.sh feast-python)
FEAST_BIN="$(dirname "$PY")/feast"
command -v wrk >/dev/null || { say "installing wrk (Debian)"; apt-get install -y -qq wrk >&2; }
export PATH="$HOME/.cargo/bin:$PATH"
if [[ "${OHA:-1}" == 1 ]] && ! command -v oha >/dev/null; then
  say "installing oha (cargo install oha --locked)"
  env -u CARGO_TARGET_DIR cargo install -q oha --locked >&2
fi
export PATH="$HOME/.cargo/bin:$PATH"
SFS="${SFS_BIN:-$CARGO_TARGET_DIR/release/sfs}"
[[ -n "${SFS_BIN:-}" ]] || cargo build --release -q --bin sfs >&2

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  redis-cli -p "$RPORT" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --pidfile "$work/redis.pid" --logfile "$work/redis.log" --dir "$work" >&2
for _ in $(seq 50); do redis-cli -p "$RPORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
REDIS="redis://127.0.0.1:$RPORT"

# The Feast repository: sfs feast init's definitions, with Feast's own Redis
# online store instead of the remote one.
"$SFS" feast init "$work/repo" --url "http://127.0.0.1:$SFS_PORT" >&2
"$PY" - "$work/repo/feature_store.yaml" "127.0.0.1:$RPORT" <<'PY'
import sys
path, conn = sys.argv[1], sys.argv[2]
text = open(path).read()
start = text.index("online_store:")
end = text.index("offline_store:")
open(path, "w").write(text[:start] + f"online_store:\n  type: redis\n  connection_string: \"{conn}\"\n" + text[end:])
PY
VERSION=$("$SFS" features --version)
"$PY" bench/feast/setup.py --repo "$work/repo" --redis "$REDIS" --prefix "$PREFIX" \
  --features features.toml --version "$VERSION" --cards "$CARDS"

# 13 card features per request (the card row less its last feature).
FEATURES=$("$PY" -c '
import json, tomllib
d = tomllib.load(open("features.toml", "rb"))
names = [f["name"] for f in d["features"] if f["entity"] == "card"][:13]
print(json.dumps(["card_features:" + n for n in names]))')
export CARDS FEATURES

wait_up() { for _ in $(seq 600); do curl -fs "$1/health" >/dev/null 2>&1 && return 0; sleep 0.1; done; say "$1 did not come up"; exit 1; }
# wrk_run URL BATCH -> the WRK json line
wrk_run() {
  BATCH=$2 wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s bench/feast/batch.lua "$1" | grep '^WRK ' | sed 's/^WRK //'
}
# oha_run URL BODY RATE -> oha's JSON summary, reduced
oha_run() {
  oha --no-tui --output-format json -z "${DURATION}s" -q "$3" -c 32 --latency-correction \
    -m POST -H 'content-type: application/json' -d "$2" "$1/get-online-features" |
    "$PY" -c 'import json,sys; d=json.load(sys.stdin); s=d["summary"]; p=d["latencyPercentiles"]; c=d.get("statusCodeDistribution",{});
print(json.dumps({"rps": round(s["requestsPerSec"],1), "success_rate": s["successRate"], "p50_ms": round(p["p50"]*1e3,3), "p99_ms": round(p["p99"]*1e3,3), "p99_9_ms": round(p["p99.9"]*1e3,3), "status": c}))'
}

# Feast first, alone on the machine; then stopped.
say "feast serve ($FEAST_WORKERS worker(s))"
(cd "$work/repo" && exec "$FEAST_BIN" serve -h 127.0.0.1 -p "$FEAST_PORT" --workers "$FEAST_WORKERS" >"$work/feast.log" 2>&1) &
feast_pid=$!; pids+=("$feast_pid")
wait_up "http://127.0.0.1:$FEAST_PORT"
check=$(curl -fs -XPOST "http://127.0.0.1:$FEAST_PORT/get-online-features" -H 'content-type: application/json' \
  -d "{\"features\":$FEATURES,\"entities\":{\"card_id\":[\"c1\"]}}")
BATCH=1 DURATION=2 wrk -t1 -c4 -d2s -s bench/feast/batch.lua "http://127.0.0.1:$FEAST_PORT" >/dev/null
feast_wrk=$(wrk_run "http://127.0.0.1:$FEAST_PORT" 1)
say "feast: $feast_wrk"
kill "$feast_pid"; wait "$feast_pid" 2>/dev/null || true

say "sfs serve"
mkdir -p "$work/models"
cat >"$work/serve.toml" <<TOML
listen = "127.0.0.1:$SFS_PORT"
redis_url = "$REDIS"
key_prefix = "$PREFIX"
models_dir = "$work/models"
log_sample_every = 0
TOML
SFS_LOG=warn "$SFS" serve --config "$work/serve.toml" >"$work/sfs.log" 2>&1 &
pids+=("$!")
wait_up "http://127.0.0.1:$SFS_PORT"
sfs_check=$(curl -fs -XPOST "http://127.0.0.1:$SFS_PORT/get-online-features" -H 'content-type: application/json' \
  -d "{\"features\":$FEATURES,\"entities\":{\"card_id\":[\"c1\"]}}")
# Same answer as Feast's for the same row (values; Feast's statuses ignore ttl).
"$PY" - "$check" "$sfs_check" <<'PY'
import json, sys
f, s = json.loads(sys.argv[1]), json.loads(sys.argv[2])
# Feast orders the columns its own way: compare by name.
cols = lambda d: dict(zip(d["metadata"]["feature_names"], [r["values"] for r in d["results"]]))
assert cols(f) == cols(s), (cols(f), cols(s))
PY
BATCH=1 wrk -t1 -c4 -d2s -s bench/feast/batch.lua "http://127.0.0.1:$SFS_PORT" >/dev/null
sfs_wrk=$(wrk_run "http://127.0.0.1:$SFS_PORT" 1)
say "sfs: $sfs_wrk"
one="{\"features\":$FEATURES,\"entities\":{\"card_id\":[\"c42\"]}}"
sfs_rate='{"skipped": "OHA=0"}'; sfs_batch=$sfs_rate
if [[ "${OHA:-1}" == 1 ]]; then
sfs_rate=$(oha_run "http://127.0.0.1:$SFS_PORT" "$one" "$RATE")
say "sfs at $RATE rps: $sfs_rate"
hundred=$("$PY" -c 'import json,os; print(json.dumps({"features": json.loads(os.environ["FEATURES"]), "entities": {"card_id": ["c%d" % (i * 97 % int(os.environ["CARDS"])) for i in range(100)]}}))')
sfs_batch=$(oha_run "http://127.0.0.1:$SFS_PORT" "$hundred" "$BATCH_RATE")
say "sfs 100-card batches at $BATCH_RATE rps: $sfs_batch"
fi

"$PY" - <<PY | tee bench/out/feast.jsonl
import json, os, platform, subprocess
feast, sfs = json.loads('''$feast_wrk'''), json.loads('''$sfs_wrk''')
rps = lambda r: r["requests"] / (r["duration_us"] / 1e6)
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
print(json.dumps({
    "bench": "feast", "commit": commit, "machine": f"{os.cpu_count()} cores {platform.machine()}",
    "load_avg_1m": os.getloadavg()[0],
    "config": {"cards": $CARDS, "features_per_row": 13, "duration_s": $DURATION, "wrk": "-t2 -c$CONNECTIONS",
               "feast_workers": $FEAST_WORKERS, "oha": "-c32 --latency-correction"},
    "feast_serve": {**feast, "rps": round(rps(feast), 1)},
    "sfs_serve": {**sfs, "rps": round(rps(sfs), 1)},
    "throughput_ratio": round(rps(sfs) / rps(feast), 1),
    "sfs_at_rate": {"rate": $RATE, **json.loads('''$sfs_rate''')},
    "sfs_100_card_batches": {"rate": $BATCH_RATE, **json.loads('''$sfs_batch''')},
}))
PY
