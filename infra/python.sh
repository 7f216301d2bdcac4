#!/usr/bin/env bash
# The Python virtualenv (.venv at the repo root) with training/requirements.txt,
# which also carries libonnxruntime (from the onnxruntime wheel) for the server.
# usage: infra/python.sh install|ort-path|status|install-feast|feast-python
# install-feast: a second venv (.venv-feast, or $SFS_FEAST_VENV) with
# training/requirements-feast.txt (Feast's SDK and server, whose numpy and
# protobuf pins conflict with the training stack's).
SERVICE=python
source "$(dirname "$0")/lib.sh"

VENV="${SFS_VENV:-$SFS_ROOT/.venv}"
REQS="$SFS_ROOT/training/requirements.txt"
STAMP="$VENV/.requirements.sha"

ort_path() {
  local lib
  lib=$(find "$VENV" -path '*onnxruntime/capi/libonnxruntime.so*' -type f 2>/dev/null | sort | head -1)
  [[ -n "$lib" ]] || return 1
  echo "$lib"
}

case "${1:-}" in
  install)
    command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3.11+ (Debian: python3 python3-venv)"
    want=$(sha256sum "$REQS" | cut -d' ' -f1)
    if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then say "venv up to date at $VENV"; exit 0; fi
    if [[ ! -x "$VENV/bin/python" ]]; then
      say "creating venv at $VENV"
      python3 -m venv "$VENV" || die "python3 -m venv failed: install python3-venv"
    fi
    say "installing training/requirements.txt (cache in $SFS_CACHE/pip)"
    PIP_CACHE_DIR="$SFS_CACHE/pip" "$VENV/bin/pip" install -q --disable-pip-version-check -r "$REQS" \
      || die "pip install failed: check access to PyPI, then rerun"
    echo "$want" >"$STAMP"
    say "venv ready at $VENV"
    ;;
  install-feast)
    FVENV="${SFS_FEAST_VENV:-$SFS_ROOT/.venv-feast}"
    FREQS="$SFS_ROOT/training/requirements-feast.txt"
    want=$(sha256sum "$FREQS" | cut -d' ' -f1)
    if [[ -f "$FVENV/.requirements.sha" && "$(cat "$FVENV/.requirements.sha")" == "$want" ]]; then say "feast venv up to date at $FVENV"; exit 0; fi
    command -v python3 >/dev/null 2>&1 || die "python3 not found: install Python 3.11+ (Debian: python3 python3-venv)"
    [[ -x "$FVENV/bin/python" ]] || python3 -m venv "$FVENV" || die "python3 -m venv failed: install python3-venv"
    say "installing training/requirements-feast.txt into $FVENV"
    PIP_CACHE_DIR="$SFS_CACHE/pip" "$FVENV/bin/pip" install -q --disable-pip-version-check -r "$FREQS" \
      || die "pip install failed: check access to PyPI, then rerun"
    echo "$want" >"$FVENV/.requirements.sha"
    say "feast venv ready at $FVENV"
    ;;
  feast-python) echo "${SFS_FEAST_VENV:-$SFS_ROOT/.venv-feast}/bin/python" ;;
  ort-path) ort_path || die "libonnxruntime not found in $VENV: run make setup" ;;
  status)
    if lib=$(ort_path); then say "venv ready, onnxruntime at $lib"; else say "venv missing or without onnxruntime"; exit 1; fi ;;
  *) echo "usage: $0 install|ort-path|status|install-feast|feast-python" >&2; exit 2 ;;
esac
