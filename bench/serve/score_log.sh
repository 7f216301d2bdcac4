#!/usr/bin/env bash
# bench/serve/score_log.sh: serving latency with and without the served-vector
# log (scores.log), side by side in one run. Two `sfs serve` over the same rows
# in a real Redis: one without the log, one logging SAMPLE_RATE of the scored
# requests to a fresh topic on a real Kafka. The open-loop loadgen offers RATE
# rps of /score/fraud to each in turn, ROUNDS times (alternating, so machine
# noise hits both alike). Prints one JSON line (also appended to
# bench/out/serve-score-log.jsonl): p50/p99/p999 per round and the median of
# each, the log's sampled/acknowledged/dropped counts, and the load average.
# usage: bench/serve/score_log.sh
# env: RATE (5000), DURATION_SECS (20), ROUNDS (3), SAMPLE_RATE (0.01, the
#      config default; 1.0 logs every request, the worst case),
#      CONNECTIONS (64), KAFKA_BROKERS (127.0.0.1:9092), SERVE_WORKERS (0),
#      PORT (18091; the logging server uses PORT+1)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
RATE="${RATE:-5000}"
DURATION="${DURATION_SECS:-20}"
ROUNDS="${ROUNDS:-3}"
SAMPLE="${SAMPLE_RATE:-0.01}"
PORT="${PORT:-18091}"
PORT_LOG=$((PORT + 1))
PREFIX="bench-score-log:$$:"
TOPIC="bench-scores-log-$$-$(date +%s)"
mkdir -p bench/out

# Use the running services; start the project's own if they are not up.
redis-cli -u "$REDIS_URL" ping >/dev/null 2>&1 || bash infra/redis.sh start >&2
broker=${BROKERS%%,*}
(exec 3<>"/dev/tcp/${broker%:*}/${broker##*:}") 2>/dev/null || bash infra/kafka.sh start >&2
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"
cargo build --release -q --bin sfs --bin serve-loadgen >&2

tmp=$(mktemp -d)
config() { # port, extra
  cat >"$tmp/$1.toml" <<TOML
listen = "127.0.0.1:$1"
redis_url = "$REDIS_URL"
key_prefix = "$PREFIX"
models_dir = "models"
log_sample_every = 0
worker_threads = ${SERVE_WORKERS:-0}
$2
TOML
  echo "$tmp/$1.toml"
}
off_cfg=$(config "$PORT" "")
on_cfg=$(config "$PORT_LOG" "score_log_brokers = \"$BROKERS\"
score_log_topic = \"$TOPIC\"
score_log_sample_rate = $SAMPLE")
SFS_LOG=warn "$CARGO_TARGET_DIR/release/sfs" serve --config "$off_cfg" >&2 &
off_pid=$!
SFS_LOG=warn "$CARGO_TARGET_DIR/release/sfs" serve --config "$on_cfg" >&2 &
on_pid=$!
cleanup() {
  kill "$off_pid" "$on_pid" 2>/dev/null || true
  wait "$off_pid" "$on_pid" 2>/dev/null || true
  rm -rf "$tmp"
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" del >/dev/null || true
}
trap cleanup EXIT
for port in "$PORT" "$PORT_LOG"; do
  for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fs "http://127.0.0.1:$port/ready" >/dev/null || { echo "sfs serve on $port is not ready" >&2; exit 1; }
done

load=(--rates "$RATE" --duration-secs "$DURATION" --connections "${CONNECTIONS:-64}" --entities 10000 --key-prefix "$PREFIX")
"$CARGO_TARGET_DIR/release/serve-loadgen" --addr "127.0.0.1:$PORT" --seed-redis "$REDIS_URL" \
  "${load[@]}" --rates 500 --duration-secs 2 >/dev/null # seed the rows, warm up
"$CARGO_TARGET_DIR/release/serve-loadgen" --addr "127.0.0.1:$PORT_LOG" "${load[@]}" --rates 500 --duration-secs 2 >/dev/null

load_before=$(cut -d' ' -f1-3 /proc/loadavg)
: >"$tmp/rounds.jsonl"
for round in $(seq 1 "$ROUNDS"); do
  for side in off on; do
    port=$PORT
    [[ $side == on ]] && port=$PORT_LOG
    echo "round $round/$ROUNDS: score log $side, $RATE rps for ${DURATION}s" >&2
    "$CARGO_TARGET_DIR/release/serve-loadgen" --addr "127.0.0.1:$port" "${load[@]}" |
      jq -c --arg side "$side" --argjson round "$round" 'select(.kind == "rate") | .result + {side: $side, round: $round}' >>"$tmp/rounds.jsonl"
  done
done
load_after=$(cut -d' ' -f1-3 /proc/loadavg)
# The log's own counters, once what it queued has been acknowledged or dropped.
sleep 6
metrics=$(curl -fs "http://127.0.0.1:$PORT_LOG/metrics")
counter() { echo "$metrics" | awk -v n="$1" '$1 ~ "^"n"({|$)" {s += $2} END {print s + 0}'; }

jq -c -s \
  --arg commit "$(git rev-parse --short HEAD)" --arg cpu "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)" \
  --argjson cores "$(nproc)" --arg load_before "$load_before" --arg load_after "$load_after" \
  --argjson rate "$RATE" --argjson duration "$DURATION" --argjson sample "$SAMPLE" --arg topic "$TOPIC" \
  --argjson sampled "$(counter sfs_serve_score_log_sampled_total)" \
  --argjson records "$(counter sfs_serve_score_log_records_total)" \
  --argjson dropped "$(counter sfs_serve_score_log_dropped_total)" '
  def median: sort | if length == 0 then null else .[(length - 1) / 2 | floor] end;
  def side($s): map(select(.side == $s)) | {
      p50_ms: (map(.p50_ms) | median), p99_ms: (map(.p99_ms) | median), p999_ms: (map(.p999_ms) | median),
      rounds: map({p50_ms, p99_ms, p999_ms, achieved_rps, errors})};
  {bench: "serve_score_log", commit: $commit, machine: {cpu: $cpu, cores: $cores},
   load_average_before: $load_before, load_average_after: $load_after,
   offered_rps: $rate, duration_secs: $duration, route: "/score/fraud", sample_rate: $sample, topic: $topic,
   without_log: side("off"), with_log: side("on"),
   p99_delta_ms: ((side("on").p99_ms // 0) - (side("off").p99_ms // 0)),
   score_log: {sampled: $sampled, acknowledged: $records, dropped: $dropped}}' "$tmp/rounds.jsonl" |
  tee -a bench/out/serve-score-log.jsonl
