#!/usr/bin/env bash
# bench/serve: open-loop load against `sfs serve` with rows in a real Redis on
# this machine. Prints JSON lines (per rate, then a summary with machine,
# commit, config) to stdout and bench/out/serve.jsonl.
# usage: bench/serve/run.sh [extra serve-loadgen flags, e.g. --rates 1000,5000 --duration-secs 5]
# env: RATES (default 1000,5000,10000), DURATION_SECS (10), CONNECTIONS (64),
#      FIND_MAX (1), SERVE_WORKERS (0 = one per core), PORT (18090),
#      DRIFT_WINDOW_SECS (600; 0 turns drift detection off, to measure its cost)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
PORT="${PORT:-18090}"
PREFIX="bench:$$:"
mkdir -p bench/out

bash infra/redis.sh start >&2
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"
cargo build --release -q --bin sfs --bin serve-loadgen >&2

cfg=$(mktemp)
cat >"$cfg" <<TOML
listen = "127.0.0.1:$PORT"
redis_url = "$REDIS_URL"
key_prefix = "$PREFIX"
models_dir = "models"
log_sample_every = 0
worker_threads = ${SERVE_WORKERS:-0}
drift_window_secs = ${DRIFT_WINDOW_SECS:-600}
TOML
SFS_LOG=warn "$CARGO_TARGET_DIR/release/sfs" serve --config "$cfg" >&2 &
server=$!
cleanup() {
  kill "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -f "$cfg"
  redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" del >/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 100); do
  curl -fs "http://127.0.0.1:$PORT/ready" >/dev/null 2>&1 && break
  sleep 0.1
done

find_max=()
[[ "${FIND_MAX:-1}" == 1 ]] && find_max=(--find-max)
"$CARGO_TARGET_DIR/release/serve-loadgen" --addr "127.0.0.1:$PORT" \
  --seed-redis "$REDIS_URL" --key-prefix "$PREFIX" --entities 10000 \
  --rates "${RATES:-1000,5000,10000}" --duration-secs "${DURATION_SECS:-10}" \
  --connections "${CONNECTIONS:-64}" "${find_max[@]}" "$@" | tee bench/out/serve.jsonl
