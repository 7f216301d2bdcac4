#!/usr/bin/env bash
# `make train`: generate a log (Avro files), backfill the point-in-time training
# sets from it, train the fraud and propensity models, track and register them
# in MLflow, and publish the registered versions to models/<name>/<version>/
# (a running `sfs serve` hot-reloads them). `mlflow` serves the MLflow UI.
#
# usage: infra/train.sh [run|mlflow]
# Knobs (environment, or make variables: `make train TRAIN_DAYS=3 TRAIN_USERS=2000`):
#   TRAIN_DAYS (30)            simulated days of log
#   TRAIN_USERS (10000)        users of the simulation
#   TRAIN_SIM_RATE (0.5)       mean events per simulated second
#   TRAIN_FRAUD_RATE (0.01)    share of fraudulent transactions
#   TRAIN_LABEL_DELAY (1d)     mean delay of a fraud label
#   TRAIN_LABEL_MATURITY (7d)  a transaction younger than this at the cutoff has no settled label
#   TRAIN_SEED (7), TRAIN_START (2025-01-01T00:00:00Z)
#   TRAIN_DIR (.data/train)    log/, backfill/ and report/ (plots) go here
#   TRAIN_MODELS (models)      the registry folder to publish to
#   MLFLOW_DIR (.data/mlflow)  the MLflow tracking store (mlflow.db, artifacts/)
#   MLFLOW_PORT (5000)         `make mlflow` listens on 127.0.0.1:MLFLOW_PORT
#   SFS_BIN                    an sfs binary to use instead of building one
SERVICE=train
source "$(dirname "$0")/lib.sh"
cd "$SFS_ROOT"

TRAIN_DAYS="${TRAIN_DAYS:-30}"
TRAIN_USERS="${TRAIN_USERS:-10000}"
TRAIN_SIM_RATE="${TRAIN_SIM_RATE:-0.5}"
TRAIN_FRAUD_RATE="${TRAIN_FRAUD_RATE:-0.01}"
TRAIN_LABEL_DELAY="${TRAIN_LABEL_DELAY:-1d}"
TRAIN_LABEL_MATURITY="${TRAIN_LABEL_MATURITY:-7d}"
TRAIN_SEED="${TRAIN_SEED:-7}"
TRAIN_START="${TRAIN_START:-2025-01-01T00:00:00Z}"
TRAIN_DIR="${TRAIN_DIR:-$SFS_DATA/train}"
TRAIN_MODELS="${TRAIN_MODELS:-$SFS_ROOT/models}"
MLFLOW_DIR="${MLFLOW_DIR:-$SFS_DATA/mlflow}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
VENV="${SFS_VENV:-$SFS_ROOT/.venv}"

case "${1:-run}" in
  run)
    start=$(date +%s)
    bash infra/python.sh install
    if [[ -z "${SFS_BIN:-}" ]]; then
      say "building sfs (release)"
      cargo build --release --bin sfs -q
      SFS_BIN="${CARGO_TARGET_DIR:-$SFS_ROOT/target}/release/sfs"
    fi
    [[ -x "$SFS_BIN" ]] || die "no sfs binary at $SFS_BIN"
    rm -rf "$TRAIN_DIR/log" "$TRAIN_DIR/backfill"
    mkdir -p "$TRAIN_DIR"
    say "generating $TRAIN_DAYS simulated days ($TRAIN_USERS users, $TRAIN_SIM_RATE events/s) into $TRAIN_DIR/log"
    "$SFS_BIN" generate --out avro --out-dir "$TRAIN_DIR/log" --start-time "$TRAIN_START" \
      --duration "${TRAIN_DAYS}d" --seed "$TRAIN_SEED" --users "$TRAIN_USERS" --sim-rate "$TRAIN_SIM_RATE" \
      --fraud-rate "$TRAIN_FRAUD_RATE" --label-delay "$TRAIN_LABEL_DELAY"
    say "backfilling the training sets into $TRAIN_DIR/backfill"
    "$SFS_BIN" backfill --input "$TRAIN_DIR/log" --out "$TRAIN_DIR/backfill" \
      --features "${SFS_FEATURES:-$SFS_ROOT/features.toml}" --label-maturity "$TRAIN_LABEL_MATURITY"
    say "training, registering in MLflow ($MLFLOW_DIR) and publishing to $TRAIN_MODELS"
    "$VENV/bin/python" training/train.py --backfill "$TRAIN_DIR/backfill" --models "$TRAIN_MODELS" \
      --mlflow "$MLFLOW_DIR" --report "$TRAIN_DIR/report" --seed "$TRAIN_SEED"
    say "done in $(( $(date +%s) - start )) s: plots in $TRAIN_DIR/report, MLflow UI: make mlflow"
    ;;
  mlflow)
    [[ -x "$VENV/bin/mlflow" ]] || die "mlflow not found in $VENV: run make setup"
    mkdir -p "$MLFLOW_DIR/artifacts"
    say "MLflow UI on http://127.0.0.1:$MLFLOW_PORT (store $MLFLOW_DIR/mlflow.db; Ctrl-C stops it)"
    exec "$VENV/bin/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --backend-store-uri "sqlite:///$MLFLOW_DIR/mlflow.db" \
      --default-artifact-root "$MLFLOW_DIR/artifacts" --workers 1
    ;;
  *) echo "usage: $0 [run|mlflow]" >&2; exit 2 ;;
esac
