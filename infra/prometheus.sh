#!/usr/bin/env bash
# Prometheus from Debian's package on 127.0.0.1:$PROMETHEUS_PORT (default 9090),
# scraping the stream job and the server (infra/prometheus/prometheus.yml).
# usage: infra/prometheus.sh install|start|stop|status
SERVICE=prometheus
source "$(dirname "$0")/lib.sh"

PORT="${PROMETHEUS_PORT:-9090}"
DIR="$SFS_DATA/prometheus-$PORT"
PIDFILE="$DIR/prometheus.pid"

ready() { curl -fsS --max-time 2 "http://127.0.0.1:$PORT/-/ready" >/dev/null; }

case "${1:-}" in
  install) apt_install prometheus prometheus ;;
  start)
    "$0" install
    if pid_alive "$PIDFILE" && ready; then say "already running on 127.0.0.1:$PORT"; exit 0; fi
    port_in_use "$PORT" && die "port $PORT is in use by another process: stop it or set PROMETHEUS_PORT"
    mkdir -p "$DIR"
    nohup prometheus --config.file="$SFS_ROOT/infra/prometheus/prometheus.yml" \
      --storage.tsdb.path="$DIR/tsdb" --web.listen-address="127.0.0.1:$PORT" \
      --storage.tsdb.retention.time=2d >"$DIR/prometheus.log" 2>&1 &
    echo $! >"$PIDFILE"
    wait_for 30 "prometheus ready" ready || die "prometheus was not ready within 30 s: see $DIR/prometheus.log"
    say "running on 127.0.0.1:$PORT (data in $DIR)"
    ;;
  stop) stop_pid "$PIDFILE" prometheus ;;
  status)
    if ready; then say "healthy on 127.0.0.1:$PORT"; else say "down on 127.0.0.1:$PORT"; exit 1; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
