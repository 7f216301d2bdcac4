#!/usr/bin/env bash
# Sustained produce rate of `sfs generate --rate max` into the real broker.
# Prints one JSON line: machine, commit, config, results.
# usage: bench/generate/run.sh [EVENTS]   (env: KAFKA_BROKERS, PARTITIONS, FORMAT, SFS=prebuilt binary)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
EVENTS="${1:-${EVENTS:-5000000}}"
PARTITIONS="${PARTITIONS:-4}"
FORMAT="${FORMAT:-avro}"
BROKERS="${KAFKA_BROKERS:-127.0.0.1:9092}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"

bash infra/kafka.sh start >&2
if [ -z "${SFS:-}" ]; then
  cargo build --release -q -p sfs >&2
  SFS="$CARGO_TARGET_DIR/release/sfs"
fi

PREFIX="bench-gen-$(date +%s)"
# Other work on the same cores moves the result a lot: record the load.
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
summary=$("$SFS" generate --rate max --events "$EVENTS" --seed 1 --start-time 2024-01-01T00:00:00Z \
  --sim-rate 2000 --partitions "$PARTITIONS" --format "$FORMAT" --brokers "$BROKERS" \
  --txn-topic "$PREFIX.txn.events" --click-topic "$PREFIX.click.events" --label-topic "$PREFIX.txn.labels" \
  --summary-json --no-progress)

LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)

python3 - "$summary" "$EVENTS" "$PARTITIONS" "$FORMAT" "$LOAD_BEFORE" "$LOAD_AFTER" <<'PY'
import json, os, platform, subprocess, sys
summary, events, partitions, fmt = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
load = [float(sys.argv[5]), float(sys.argv[6])]
model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
print(json.dumps({
    "bench": "generate",
    "machine": {"nproc": os.cpu_count(), "model": model, "load_avg_1m_before_after": load},
    "commit": commit + ("-dirty" if dirty else ""),
    "config": {"events": events, "partitions": partitions, "format": fmt, "rate": "max",
               "acks": "all", "idempotence": True, "compression": "lz4", "linger_ms": 20},
    "results": {"events_per_sec": round(summary["events_per_sec"]), "elapsed_secs": round(summary["elapsed_secs"], 2),
                "per_topic": summary["per_topic"], "fraud_txns": summary["fraud_txns"]},
}))
PY
