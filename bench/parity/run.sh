#!/usr/bin/env bash
# bench/parity: online/offline parity and the served-vector log's cost, under
# live load. RATE events/s of live traffic (sfs generate, event time = now)
# stream through `sfs stream` into Redis while serve-loadgen scores fraud
# requests at SCORE_RPS (real request bodies of the same card population),
# first against `sfs serve` without the score log, then against one that logs
# every SAMPLE-th fraction of scored requests to its own scores topic. Then
# `sfs parity` recomputes every logged vector from the event log.
# Prints one JSON line (also to bench/out/parity.jsonl).
# env: RATE (20000), SCORE_RPS (2000), DURATION (120 s per phase), SAMPLE (1.0),
#      WARMUP (20 s of traffic before scoring), WORKERS (2), CONNECTIONS (32),
#      SFS_BIN (a built sfs: skips the build), BROKERS, REDIS_URL
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
RATE="${RATE:-20000}"; SCORE_RPS="${SCORE_RPS:-2000}"; DURATION="${DURATION:-120}"
SAMPLE="${SAMPLE:-1.0}"; WARMUP="${WARMUP:-20}"; WORKERS="${WORKERS:-2}"; CONNECTIONS="${CONNECTIONS:-32}"
BROKERS="${BROKERS:-127.0.0.1:9092}"; REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
mkdir -p bench/out
say() { echo "bench/parity: $*" >&2; }

bash infra/kafka.sh start >&2
bash infra/redis.sh start >&2
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"
if [[ -z "${SFS_BIN:-}" ]]; then
  cargo build --release -q --bin sfs --bin serve-loadgen >&2
fi
SFS="${SFS_BIN:-$CARGO_TARGET_DIR/release/sfs}"
LOADGEN="$(dirname "$SFS")/serve-loadgen"

run="benchparity-$(date +%s)-$$"
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  redis-cli -u "$REDIS_URL" --scan --pattern "$run:*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" del >/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
topics=(--txn-topic "$run.txn" --click-topic "$run.click" --label-topic "$run.label")
job_topics=(--topic "txn=$run.txn" --topic "click=$run.click")
SEED=7; USERS=20000

# Request bodies: the transactions of the same seeded population.
say "request bodies"
"$SFS" generate --out json --out-dir "$work/bodies" --events 200000 --seed "$SEED" --users "$USERS" \
  --start-time now --no-progress --summary-json >/dev/null
python3 - "$work/bodies" >"$work/fraud.jsonl" <<'PY'
import json, os, sys
d = sys.argv[1]
name = next(f for f in os.listdir(d) if f.endswith(".jsonl") and "txn" in f and "label" not in f)
for line in open(os.path.join(d, name)):
    t = json.loads(line)
    print(json.dumps({k: t[k] for k in ("card_id", "user_id", "amount_minor", "mcc", "country", "channel")}))
PY
say "$(wc -l <"$work/fraud.jsonl") fraud request bodies"

# The topics (one event), the stream job, then live traffic for both phases.
"$SFS" generate --events 1 --start-time now --partitions 4 --brokers "$BROKERS" "${topics[@]}" \
  --no-progress --summary-json >/dev/null
SFS_LOG=warn "$SFS" stream -w "$WORKERS" --metrics-listen "" "${job_topics[@]}" --key-prefix "$run:" \
  --group-id "$run" --brokers "$BROKERS" --redis-url "$REDIS_URL" >/dev/null 2>"$work/stream.log" &
pids+=($!)
events=$((RATE * (WARMUP + 2 * DURATION + 30)))
"$SFS" generate --rate "$RATE" --speedup 1 --start-time now --events "$events" --seed "$SEED" --users "$USERS" \
  --partitions 4 --brokers "$BROKERS" "${topics[@]}" --no-progress --summary-json >"$work/gen.json" &
gen=$!
pids+=($gen)
sleep "$WARMUP"

# serve PORT SAMPLE: starts sfs serve; echoes its pid.
serve() {
  cat >"$work/serve-$1.toml" <<TOML
listen = "127.0.0.1:$1"
redis_url = "$REDIS_URL"
key_prefix = "$run:"
models_dir = "models"
log_sample_every = 0
score_log_sample_rate = $2
score_log_brokers = "$BROKERS"
score_log_topic = "$run.scores"
TOML
  SFS_LOG=warn "$SFS" serve --config "$work/serve-$1.toml" >/dev/null 2>"$work/serve-$1.log" &
  local pid=$!
  for _ in $(seq 300); do curl -fs "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && break; sleep 0.1; done
  echo "$pid"
}
# load PORT -> serve-loadgen's rate line
load() {
  "$LOADGEN" --addr "127.0.0.1:$1" --rates "$SCORE_RPS" --duration-secs "$DURATION" \
    --connections "$CONNECTIONS" --bodies "$work/fraud.jsonl" --path /score/fraud | grep '"kind":"rate"' | head -1
}
loadavg() { cut -d' ' -f1 /proc/loadavg; }

say "phase 1: ${DURATION}s at $SCORE_RPS rps, no score log"
p1=$(serve 18101 0); pids+=("$p1")
l1a=$(loadavg); without=$(load 18101); l1b=$(loadavg)
kill -TERM "$p1"; wait "$p1" 2>/dev/null || true
say "phase 2: ${DURATION}s at $SCORE_RPS rps, score log sampling $SAMPLE"
p2=$(serve 18102 "$SAMPLE"); pids+=("$p2")
l2a=$(loadavg); with=$(load 18102); l2b=$(loadavg)
metrics=$(curl -s "http://127.0.0.1:18102/metrics")
kill -TERM "$p2"; wait "$p2" 2>/dev/null || true
kill "$gen" 2>/dev/null || true; wait "$gen" 2>/dev/null || true

say "sfs parity over $run.scores"
SFS_LOG=warn "$SFS" parity --json -w "$WORKERS" --scores-topic "$run.scores" "${job_topics[@]}" \
  --brokers "$BROKERS" >"$work/parity.json"

python3 - "$without" "$with" "$work/parity.json" "$metrics" "$RATE" "$SCORE_RPS" "$DURATION" "$SAMPLE" \
  "$l1a" "$l1b" "$l2a" "$l2b" "$(git rev-parse --short HEAD)" <<'PY' | tee -a bench/out/parity.jsonl
import json, sys
without, with_, parity_path, metrics = json.loads(sys.argv[1])["result"], json.loads(sys.argv[2])["result"], sys.argv[3], sys.argv[4]
rate, rps, duration, sample = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]), float(sys.argv[8])
p = json.load(open(parity_path))
def metric(name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines() if l.startswith(name) and not l.startswith("#"))
worst = sorted(p["features"], key=lambda f: -f["mismatch_rate"])[:3]
print(json.dumps({
    "bench": "parity", "commit": sys.argv[13],
    "config": {"events_per_sec": rate, "score_rps": rps, "duration_secs_per_phase": duration, "sample_rate": sample},
    "serve_without_log": {k: without[k] for k in ("achieved_rps", "ok", "errors", "p50_ms", "p99_ms", "p999_ms")},
    "serve_with_log": {k: with_[k] for k in ("achieved_rps", "ok", "errors", "p50_ms", "p99_ms", "p999_ms")},
    "p99_overhead_ms": round(with_["p99_ms"] - without["p99_ms"], 3),
    "score_log_records": metric("sfs_serve_score_log_records_total"),
    "score_log_dropped": metric("sfs_serve_score_log_dropped_total"),
    "parity": {"records": p["records"], "checked": p["checked"], "identical": p["identical"],
               "identical_rate": p["identical_rate"], "unverifiable": p["unverifiable"],
               "models": p["models"], "worst_features": worst, "events_replayed": p["events"],
               "parity_secs": round(p["elapsed_secs"], 1)},
    "loadavg_1m": {"phase1": [float(sys.argv[9]), float(sys.argv[10])], "phase2": [float(sys.argv[11]), float(sys.argv[12])]},
}))
PY
