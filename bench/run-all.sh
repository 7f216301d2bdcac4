#!/usr/bin/env bash
# `make bench`: starts the services, builds release, runs every bench/<name>/run.sh
# and collects their JSON lines in bench/out/<name>.jsonl. BENCHES="a b" picks some.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
make -s up >/dev/null
bash infra/python.sh install
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"
mkdir -p bench/out
benches=${BENCHES:-$(for d in bench/*/; do [[ -x "$d/run.sh" || -f "$d/run.sh" ]] && basename "$d"; done)}
ran=0
for name in $benches; do
  echo "==> bench/$name" >&2
  bash "bench/$name/run.sh" | tee "bench/out/$name.jsonl"
  ran=$((ran + 1))
done
echo "bench: $ran benchmarks, results in bench/out/" >&2
