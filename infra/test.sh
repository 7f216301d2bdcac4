#!/usr/bin/env bash
# `make test`: installs and starts what the tests need, runs the format check,
# clippy with warnings denied and every unit and integration test, and stops
# what it started (also on failure or interrupt).
SERVICE=test
source "$(dirname "$0")/lib.sh"
cd "$SFS_ROOT"

started=()
cleanup() {
  local rc=$?
  for svc in "${started[@]}"; do bash "infra/$svc.sh" stop || true; done
  exit $rc
}
trap cleanup EXIT INT TERM

step() { echo; echo "==> $*"; }

step "installing services and the Python venv"
bash infra/kafka.sh install
bash infra/redis.sh install
bash infra/registry.sh install
bash infra/python.sh install
bash infra/chromium.sh install
bash infra/prometheus.sh install  # promtool: sfs/tests/prometheus_rules.rs
bash infra/python.sh install-feast

for svc in kafka redis registry; do
  if ! bash "infra/$svc.sh" status >/dev/null 2>&1; then
    started+=("$svc")
    bash "infra/$svc.sh" start
  fi
done

# The schema registry: the shipped schemas get their shipped ids (checked).
# sfs/tests/registry.rs runs generate -> stream through a registry of its own
# (and stops it mid-stream); the other tests keep the in-memory shipped ids:
# concurrent registrations of many fresh subjects made Apicurio 2.4 refuse
# some as "not compatible".
bash infra/registry.sh register

export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"
export SFS_VENV_PYTHON="$SFS_ROOT/.venv/bin/python"
# sfs/tests/feast.rs: Feast's SDK against sfs serve.
export SFS_FEAST_PYTHON="${SFS_FEAST_PYTHON:-$(bash infra/python.sh feast-python)}"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Release profile: the reference-model tests replay every tick of random logs
# through the graph and a brute-force interpreter, ~10x slower unoptimized.
step "cargo test --release"
start=$(date +%s)
cargo test --release --workspace --no-fail-fast -- --test-threads="${SFS_TEST_THREADS:-2}"
echo
echo "test: all checks passed in $(( $(date +%s) - start )) s of tests"
