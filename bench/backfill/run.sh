#!/usr/bin/env bash
# `sfs backfill` throughput: a generated log (Avro files) replayed through the
# feature graph into the two Parquet training sets. Prints one JSON line.
# usage: bench/backfill/run.sh   (env: DAYS=2 USERS=2000 SIM_RATE=20 WORKERS=2, SFS=prebuilt binary)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$ROOT"
DAYS="${DAYS:-2}"
USERS="${USERS:-2000}"
SIM_RATE="${SIM_RATE:-20}"
WORKERS="${WORKERS:-2}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
if [ -z "${SFS:-}" ]; then
  cargo build --release -q -p sfs >&2
  SFS="$CARGO_TARGET_DIR/release/sfs"
fi
DIR=$(mktemp -d "${TMPDIR:-/tmp}/sfs-bench-backfill.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
"$SFS" generate --out avro --out-dir "$DIR/log" --start-time 2026-01-01T00:00:00Z --duration "${DAYS}d" \
  --users "$USERS" --sim-rate "$SIM_RATE" --seed 7 --no-progress >&2
LOAD_BEFORE=$(cut -d' ' -f1 /proc/loadavg)
summary=$("$SFS" backfill --input "$DIR/log" --out "$DIR/out" -w "$WORKERS" --no-progress --summary-json)
LOAD_AFTER=$(cut -d' ' -f1 /proc/loadavg)
python3 - "$summary" "$DAYS" "$USERS" "$SIM_RATE" "$WORKERS" "$LOAD_BEFORE" "$LOAD_AFTER" <<'PY'
import json, os, subprocess, sys
s = json.loads(sys.argv[1])
secs = s["elapsed_secs"]  # the replay: log in memory -> both Parquet files closed
total = secs + s["read_secs"]
print(json.dumps({
    "bench": "backfill",
    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
    "cores": os.cpu_count(),
    "config": {"days": int(sys.argv[2]), "users": int(sys.argv[3]), "sim_rate": float(sys.argv[4]), "workers": int(sys.argv[5])},
    "load_before": float(sys.argv[6]), "load_after": float(sys.argv[7]),
    "events": s["events"], "transactions": s["transactions"], "views": s["views"],
    "read_secs": round(s["read_secs"], 2),
    "elapsed_secs": round(secs, 2),
    "events_per_sec": round(s["events"] / secs),
    "transactions_per_sec": round(s["transactions"] / secs),
    "lookups_per_sec": round((s["transactions"] + s["views"]) / secs),
    # With reading the log: the whole command but for process start and exit.
    "transactions_per_sec_with_read": round(s["transactions"] / total),
}))
PY
