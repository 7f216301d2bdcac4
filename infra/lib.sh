# Shared helpers for the infra/ scripts. Sourced, not run.
# Every service runs on loopback, keeps its data under $SFS_DATA and its
# downloads under $SFS_CACHE, and is controlled by install|start|stop|status.

set -euo pipefail

SFS_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SFS_CACHE="${SFS_CACHE:-$HOME/.cache/sfs}"
SFS_DATA="${SFS_DATA:-$SFS_ROOT/.data}"
mkdir -p "$SFS_CACHE" "$SFS_DATA"

die() { echo "error: $*" >&2; exit 1; }
say() { echo "[$SERVICE] $*" >&2; }

# port_in_use PORT: true when something listens on 127.0.0.1:PORT.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# pid_alive FILE: true when FILE names a running process.
pid_alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# stop_pid FILE NAME: SIGTERM, wait up to 20 s, then SIGKILL; removes FILE.
stop_pid() {
  local file=$1 name=$2 pid
  if ! pid_alive "$file"; then rm -f "$file"; say "$name not running"; return 0; fi
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then say "$name did not stop in 20 s, killing"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$file"
  say "$name stopped"
}

# apt_install PKG BIN: installs a Debian package unless BIN is already there.
apt_install() {
  local pkg=$1 bin=$2
  command -v "$bin" >/dev/null 2>&1 && return 0
  command -v apt-get >/dev/null 2>&1 || die "$bin not found and apt-get is missing: install the $pkg package by hand"
  local sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  say "installing Debian package $pkg"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q --no-install-recommends "$pkg" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q --no-install-recommends "$pkg" >/dev/null; } \
    || die "apt-get install $pkg failed: check the package mirror, then rerun"
  command -v "$bin" >/dev/null 2>&1 || die "$pkg installed but $bin is not on PATH"
}

# wait_for SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.25 s.
wait_for() {
  local secs=$1 what=$2; shift 2
  local deadline=$(( $(date +%s) + secs ))
  until "$@" >/dev/null 2>&1; do
    (( $(date +%s) < deadline )) || return 1
    sleep 0.25
  done
}
