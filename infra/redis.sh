#!/usr/bin/env bash
# Redis from Debian's package, on 127.0.0.1:$REDIS_PORT (default 6379).
# usage: infra/redis.sh install|start|stop|status
SERVICE=redis
source "$(dirname "$0")/lib.sh"

PORT="${REDIS_PORT:-6379}"
DIR="$SFS_DATA/redis-$PORT"
PIDFILE="$DIR/redis.pid"

ping() { redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG; }

case "${1:-}" in
  install) apt_install redis-server redis-server; apt_install redis-tools redis-cli ;;
  start)
    "$0" install
    if pid_alive "$PIDFILE" && ping; then say "already running on 127.0.0.1:$PORT"; exit 0; fi
    port_in_use "$PORT" && die "port $PORT is in use by another process: stop it or set REDIS_PORT"
    mkdir -p "$DIR"
    # Functions (FUNCTION LOAD) need Redis 7; Debian 12 ships 7.0.
    version=$(redis-server --version | sed -n 's/.*v=\([0-9]*\).*/\1/p')
    [[ "${version:-0}" -ge 7 ]] || die "redis-server $version is too old: Redis 7 or newer is needed for functions"
    redis-server --bind 127.0.0.1 --port "$PORT" --dir "$DIR" --pidfile "$PIDFILE" \
      --daemonize yes --logfile "$DIR/redis.log" --save "" --appendonly yes \
      --appendfsync everysec --auto-aof-rewrite-min-size 1gb --protected-mode yes
    wait_for 20 "redis ping" ping || die "redis did not answer on 127.0.0.1:$PORT within 20 s: see $DIR/redis.log"
    say "running on 127.0.0.1:$PORT (data in $DIR)"
    ;;
  stop) stop_pid "$PIDFILE" redis ;;
  status)
    if ping; then say "healthy on 127.0.0.1:$PORT"; else say "down on 127.0.0.1:$PORT"; exit 1; fi ;;
  *) echo "usage: $0 install|start|stop|status" >&2; exit 2 ;;
esac
