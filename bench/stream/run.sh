#!/usr/bin/env bash
# Kafka -> `sfs stream` -> Redis, two measurements, one JSON line each:
#  1. throughput: EVENTS generated events (max rate, historical time) read by a
#     bounded job (`--until-end`, WORKERS workers): events/s over the job's wall time
#     (the generator has finished before the job starts), with the job's and
#     redis-server's CPU seconds and the load average (the machine may be shared);
#  2. freshness: RATE events/s generated live (event time = now) for LIVE_SECS into
#     an unbounded job (tick FRESH_TICK_MS, no lateness); p50/p90/p99/p99.9 of the
#     job's sfs_sink_feature_freshness_seconds histogram, read once every record
#     has been observed. Per record: its Kafka timestamp (the producer's create
#     time, at or before the broker's append) -> the moment every worker's Redis
#     sink has had its batch acknowledged for a frontier past the record's time.
#     The generator simulates WARMUP before its start without emitting (sessions
#     under way: the steady-state rate from the first event, not a ramp over
#     minutes), then emits each event at its wall-clock slot (event time = about
#     the wall clock; a partial batch is handed to the producer before every
#     pacing wait, so records are not held back in bursts).
#     The generator's achieved rate is reported: on a busy machine it can fall
#     short of RATE.
# usage: bench/stream/run.sh [throughput|freshness|all]
# env: EVENTS (2000000), WORKERS (2), RATE (20000), LIVE_SECS (30; not SECONDS: bash's built-in counter), FRESH_TICK_MS (10), WARMUP (15m),
#      LINGER_MS (5: the generator's producer linger, librdkafka's and Kafka's default; it is part of the
#      measured latency, which starts at the record's create time), KAFKA_BROKERS, REDIS_URL
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
MODE="${1:-all}"
EVENTS="${EVENTS:-2000000}"
WORKERS="${WORKERS:-2}"
RATE="${RATE:-20000}"
LIVE_SECS="${LIVE_SECS:-30}"
FRESH_TICK_MS="${FRESH_TICK_MS:-10}"
LINGER_MS="${LINGER_MS:-5}"
WARMUP="${WARMUP:-15m}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
REDIS="${REDIS_URL:-redis://127.0.0.1:6379}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
export KAFKA_BROKERS="$BROKERS" REDIS_URL="$REDIS" SFS_LOG="${SFS_LOG:-warn}"

bash infra/kafka.sh start >&2
bash infra/redis.sh start >&2
cargo build --release -q -p sfs >&2
SFS="$CARGO_TARGET_DIR/release/sfs"

emit() { # name config-json results-json
  python3 - "$1" "$2" "$3" <<'PY'
import json, os, platform, subprocess, sys
name, config, results = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
print(json.dumps({"bench": name, "machine": {"nproc": os.cpu_count(), "model": model},
                  "commit": commit + ("-dirty" if dirty else ""), "config": config, "results": results}))
PY
}

aof_rewrites() { redis-cli -u "$REDIS" info persistence | sed -n 's/^aof_rewrites:\([0-9]*\).*/\1/p' | grep . || echo 0; }
aof_rewrite_now() { # start a rewrite (if AOF is on) and wait for it, at most 60 s
  redis-cli -u "$REDIS" bgrewriteaof >/dev/null 2>&1 || true
  for _ in $(seq 600); do
    redis-cli -u "$REDIS" info persistence | grep -Eq '^aof_rewrite_(in_progress|scheduled):1' || return 0
    sleep 0.1
  done
}
topics() { echo "--txn-topic $1.txn --click-topic $1.click"; }       # sfs generate
job_topics() { echo "--topic txn=$1.txn --topic click=$1.click"; }   # sfs stream
# CPU ticks (user + system) of a process, or 0 when it is not visible here.
redis_cpu() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
TMPDIR_BENCH=$(mktemp -d)
trap 'rm -rf "$TMPDIR_BENCH"' EXIT

throughput() {
  local run="bench-stream-$(date +%s)"
  "$SFS" generate --rate max --events "$EVENTS" --seed 1 --start-time 2024-01-01T00:00:00Z --sim-rate 2000 \
    --partitions 4 --brokers "$BROKERS" $(topics "$run") --label-topic "$run.label" --no-progress --summary-json >/dev/null
  # The generator has flushed and exited: the measured window is the job alone
  # (plus Redis). CPU seconds of the job and of redis-server are reported too.
  local start end redis_pid redis_cpu0 redis_cpu1 load0 load1
  redis_pid=$(redis-cli -u "$REDIS" info server | sed -n 's/^process_id:\([0-9]*\).*/\1/p')
  redis_cpu0=$(redis_cpu "$redis_pid")
  load0=$(cut -d' ' -f1 /proc/loadavg)
  start=$(date +%s.%N)
  /usr/bin/time -f "%U %S" -o "$TMPDIR_BENCH/time" \
    "$SFS" stream --until-end -w "$WORKERS" --metrics-listen "" $(job_topics "$run") --key-prefix "$run:" --group-id "$run" >/dev/null
  end=$(date +%s.%N)
  redis_cpu1=$(redis_cpu "$redis_pid")
  load1=$(cut -d' ' -f1 /proc/loadavg)
  local rows
  rows=$(redis-cli -u "$REDIS" --scan --pattern "$run:*" | wc -l)
  emit stream-throughput \
    "{\"events\": $EVENTS, \"workers\": $WORKERS, \"partitions\": 4, \"tick_ms\": 1000, \"format\": \"avro\", \"mode\": \"until-end\"}" \
    "$(python3 -c "import json;e=$EVENTS;s=$end-$start;u,k=open('$TMPDIR_BENCH/time').read().split()[-2:];print(json.dumps({'events_per_sec': round(e/s), 'elapsed_secs': round(s,2), 'rows_in_redis': $rows, 'job_cpu_secs': round(float(u)+float(k),2), 'redis_cpu_secs': round(($redis_cpu1-$redis_cpu0)/100,2), 'loadavg_1m_before_after': [$load0, $load1]}))")"
  redis-cli -u "$REDIS" --scan --pattern "$run:*" | xargs -r -n 1000 redis-cli -u "$REDIS" del >/dev/null
}

freshness() {
  local run="bench-fresh-$(date +%s)" port=18088
  # Create the topics (one event), then start the job, then the live load.
  "$SFS" generate --events 1 --start-time now --partitions 4 --brokers "$BROKERS" $(topics "$run") \
    --label-topic "$run.label" --no-progress --summary-json >/dev/null
  "$SFS" stream -w "$WORKERS" --metrics-listen "127.0.0.1:$port" $(job_topics "$run") --key-prefix "$run:" \
    --group-id "$run" --tick-ms "$FRESH_TICK_MS" --allowed-lateness-ms 0 --idle-timeout-ms 200 >/dev/null &
  local job=$!
  # Redis (appendonly) rewrites its AOF when it has doubled: a fork and a
  # core's worth of work for seconds, which on 2 cores shows as a freshness
  # spike. Leftover data of earlier runs makes that likely during the window,
  # so rewrite it before the window; rewrites during it are counted and reported.
  aof_rewrite_now
  local aof0
  aof0=$(aof_rewrites)
  sleep 3
  local gen
  gen=$("$SFS" generate --rate "$RATE" --speedup 1 --warmup "$WARMUP" --start-time now --events $((RATE * LIVE_SECS)) --seed 2 \
    --partitions 4 --brokers "$BROKERS" $(topics "$run") --label-topic "$run.label" --linger-ms "$LINGER_MS" \
    --no-progress --summary-json)
  # Every generated record (and the topic-creating one) must be observed:
  # records still invisible at the end are the slowest, so leaving them out
  # would flatter the tail. Wait for them (at most 60 s).
  local metrics expected=$((RATE * LIVE_SECS + 1)) waited=0
  while :; do
    metrics=$(curl -s "http://127.0.0.1:$port/metrics")
    local seen
    seen=$(echo "$metrics" | sed -n 's/^sfs_sink_feature_freshness_seconds_count \([0-9.e+]*\)$/\1/p')
    python3 -c "import sys; sys.exit(0 if float('${seen:-0}') >= $expected else 1)" && break
    [[ $waited -ge 600 ]] && break
    sleep 0.1; waited=$((waited + 1))
  done
  kill "$job"; wait "$job" 2>/dev/null || true
  local aof_during=$(($(aof_rewrites) - aof0))
  local results
  results=$(python3 - "$metrics" "$gen" "$expected" "$aof_during" <<'PY'
import json, sys
buckets, count = [], 0
for line in sys.argv[1].splitlines():
    if line.startswith("sfs_sink_feature_freshness_seconds_bucket"):
        le = line.split('le="')[1].split('"')[0]
        buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    elif line.startswith("sfs_sink_feature_freshness_seconds_count"):
        count = float(line.rsplit(" ", 1)[1])
def quantile(q):
    target, prev_le, prev_n = q * count, 0.0, 0.0
    for le, n in buckets:
        if n >= target:
            if le == float("inf"):
                return prev_le
            return prev_le + (le - prev_le) * ((target - prev_n) / max(n - prev_n, 1e-9))
        prev_le, prev_n = le, n
    return float("nan")
gen = json.loads(sys.argv[2])
print(json.dumps({"records": int(count), "records_expected": int(sys.argv[3]),
                  "generator_events_per_sec": round(gen["events_per_sec"]),
                  "p50_ms": round(quantile(0.5) * 1000, 1), "p90_ms": round(quantile(0.9) * 1000, 1),
                  "p99_ms": round(quantile(0.99) * 1000, 1), "p999_ms": round(quantile(0.999) * 1000, 1),
                  "redis_aof_rewrites_during": int(sys.argv[4]),
                  "loadavg_1m": float(open("/proc/loadavg").read().split()[0])}))
PY
)
  emit stream-freshness \
    "{\"rate\": $RATE, \"seconds\": $LIVE_SECS, \"workers\": $WORKERS, \"partitions\": 4, \"tick_ms\": $FRESH_TICK_MS, \"allowed_lateness_ms\": 0, \"linger_ms\": $LINGER_MS, \"idle_timeout_ms\": 200, \"warmup\": \"$WARMUP\"}" \
    "$results"
  redis-cli -u "$REDIS" --scan --pattern "$run:*" | xargs -r -n 1000 redis-cli -u "$REDIS" del >/dev/null
}

case "$MODE" in
  throughput) throughput ;;
  freshness) freshness ;;
  all) throughput; freshness ;;
  *) echo "usage: $0 [throughput|freshness|all]" >&2; exit 2 ;;
esac
