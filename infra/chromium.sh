#!/usr/bin/env bash
# Headless Chromium from Debian's package, used by the status-page test to
# render `GET /` of `sfs serve` and screenshot it.
# usage: infra/chromium.sh install|path
SERVICE=chromium
source "$(dirname "$0")/lib.sh"

case "${1:-}" in
  install) apt_install chromium chromium ;;
  path) command -v chromium || die "chromium is not installed: run bash infra/chromium.sh install" ;;
  *) echo "usage: $0 install|path" >&2; exit 2 ;;
esac
