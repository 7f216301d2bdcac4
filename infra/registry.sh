#!/usr/bin/env bash
# Apicurio Registry, the schema registry, with its Confluent-compatible API at
# http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7 (default port 8081): the URL
# to give sfs as SCHEMA_REGISTRY_URL (`infra/registry.sh url` prints it).
# Built from its jars on Maven Central by a small Maven build (infra/registry/
# pom.xml, see its header for why 2.4.2.Final and what it works around), run
# with the machine's Java 17. Storage: H2 in a file under $SFS_DATA, so
# schema ids survive a restart (REGISTRY_STORAGE=mem: in memory).
# usage: infra/registry.sh install|start|stop|status|url|register
#   register: registers the shipped schemas (schemas/registry.json) in order
#   and checks the registry gave them the shipped ids.
SERVICE=registry
source "$(dirname "$0")/lib.sh"

VERSION="$(sed -n 's:.*<apicurio.version>\(.*\)</apicurio.version>.*:\1:p' "$SFS_ROOT/infra/registry/pom.xml")"
PORT="${REGISTRY_PORT:-8081}"
BUILD="$SFS_CACHE/registry-$VERSION"
RUNNER="$BUILD/target/sfs-schema-registry-1-runner.jar"
DIR="$SFS_DATA/registry-$PORT"
PIDFILE="$DIR/registry.pid"
URL="http://127.0.0.1:$PORT/apis/ccompat/v7"

need_java() {
  command -v java >/dev/null 2>&1 || die "java not found: install a Java 17+ runtime (Debian: openjdk-17-jre-headless)"
  local major
  major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)
  [[ "${major:-0}" -ge 17 ]] || die "java $major is too old: the registry needs Java 17 or newer"
  command -v javac >/dev/null 2>&1 || die "javac not found: the registry build needs a JDK (Debian: openjdk-17-jdk-headless)"
}

install() {
  need_java
  # The build inputs' checksum: a changed pom or source rebuilds.
  local sum
  sum=$(cd "$SFS_ROOT/infra/registry" && find . -type f | sort | xargs cat | sha256sum | cut -c1-16)
  if [[ -f "$BUILD/.complete" && "$(cat "$BUILD/.complete")" == "$sum" && -f "$RUNNER" ]]; then return 0; fi
  command -v mvn >/dev/null 2>&1 || die "mvn not found: install Maven (Debian: maven) to build the registry"
  say "building Apicurio Registry $VERSION from Maven Central into $BUILD (a few minutes the first time)"
  rm -rf "$BUILD"
  mkdir -p "$BUILD"
  cp -r "$SFS_ROOT/infra/registry/." "$BUILD/"
  (cd "$BUILD" && mvn -B -Dmaven.repo.local="${MAVEN_REPO:-$SFS_CACHE/m2}" package -DskipTests) \
    >"$SFS_CACHE/registry-mvn.log" 2>&1 \
    || die "the registry build failed (see $SFS_CACHE/registry-mvn.log): check access to Maven Central"
  [[ -f "$RUNNER" ]] || die "no $RUNNER after the build: see $SFS_CACHE/registry-mvn.log"
  echo "$sum" >"$BUILD/.complete"
}

answers() { curl -sf --max-time 2 "$URL/subjects" >/dev/null 2>&1; }

start() {
  install
  if pid_alive "$PIDFILE" && answers; then say "already running at $URL"; return 0; fi
  if pid_alive "$PIDFILE"; then
    say "process running but not answering yet, waiting"
  else
    port_in_use "$PORT" && die "port $PORT is in use by another process: stop it or set REGISTRY_PORT"
    mkdir -p "$DIR"
    local jdbc="jdbc:h2:file:$DIR/db/registry"
    [[ "${REGISTRY_STORAGE:-file}" == mem ]] && jdbc="jdbc:h2:mem:registry_db"
    say "starting Apicurio Registry $VERSION on 127.0.0.1:$PORT"
    REGISTRY_DATASOURCE_URL="$jdbc" nohup java -Xms64m -Xmx"${REGISTRY_HEAP:-384m}" \
      -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
      -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$PORT" \
      -Dquarkus.datasource.jdbc.min-size=1 -Dquarkus.datasource.jdbc.initial-size=1 \
      -Dquarkus.datasource.jdbc.max-size=8 \
      -jar "$RUNNER" >"$DIR/registry.log" 2>&1 </dev/null &
    echo $! >"$PIDFILE"
  fi
  if ! wait_for 180 "registry API" answers; then
    pid_alive "$PIDFILE" || die "the registry exited during startup: see $DIR/registry.log"
    die "the registry did not answer within 180 s: see $DIR/registry.log"
  fi
  say "running at $URL (data in $DIR)"
}

# Registers the shipped schemas, oldest first, and checks their ids.
register() {
  answers || die "the registry is not answering at $URL: run infra/registry.sh start"
  local file=$SFS_ROOT/schemas/registry.json
  python3 - "$file" "$URL" <<'PY' || die "registering the shipped schemas failed"
import json, sys, urllib.request, os
path, url = sys.argv[1], sys.argv[2]
root = os.path.dirname(path)
bad = 0
for e in json.load(open(path))["schemas"]:
    text = open(os.path.join(root, e["file"])).read()
    body = json.dumps({"schema": text}).encode()
    req = urllib.request.Request(f"{url}/subjects/{e['subject']}/versions", data=body,
        headers={"Content-Type": "application/vnd.schemaregistry.v1+json"})
    got = json.load(urllib.request.urlopen(req, timeout=10))["id"]
    if got != e["id"]:
        bad += 1
        print(f"[registry] {e['file']} got id {got}, the shipped file says {e['id']}", file=sys.stderr)
print(f"[registry] {len(json.load(open(path))['schemas'])} shipped schemas registered", file=sys.stderr)
sys.exit(1 if bad else 0)
PY
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop_pid "$PIDFILE" registry ;;
  status)
    if answers; then say "healthy at $URL"; else say "down at $URL"; exit 1; fi ;;
  url) echo "$URL" ;;
  register) register ;;
  *) echo "usage: $0 install|start|stop|status|url|register" >&2; exit 2 ;;
esac
