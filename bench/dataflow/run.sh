#!/usr/bin/env bash
# Dataflow-alone benchmark: the feature graph fed from an in-memory log on 1 and
# 2 workers (release build). Prints one JSON line. Knobs: BENCH_EVENTS,
# BENCH_RATE, BENCH_WORKERS (see dataflow/benches/graph.rs).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo bench -q -p dataflow --bench graph 2>/dev/null | tail -n 1
