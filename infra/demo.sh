#!/usr/bin/env bash
# `make demo`: the whole system end to end on loopback.
#  1. installs and starts Kafka, Redis and Prometheus, and the Python venv (ONNX Runtime);
#  2. builds the release sfs binary;
#  3. resets the demo topics and keys, then generates one simulated hour of card
#     transactions, clicks and fraud labels into Kafka (with a few poison messages);
#  4. runs `sfs stream` over the log to its end: sliding-window features into Redis;
#  5. starts `sfs serve` with the served-vector log on, scores fraud requests, shows
#     a 400 and the trained models against the rules, then stops it;
#  6. `sfs parity`: every logged vector against the one recomputed from the event log.
# Env: DEMO_EVENTS_PER_SEC (simulated events/s, default 100), DEMO_WORKERS (2).
SERVICE=demo
source "$(dirname "$0")/lib.sh"
cd "$SFS_ROOT"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/sfs/target}"
SFS="$CARGO_TARGET_DIR/release/sfs"
PREFIX="sfs:"
PORT="${DEMO_PORT:-8080}"
REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
TOPICS=(txn.events click.events txn.labels scores.log)

step() { echo; echo "==> $*"; }
server=""
cleanup() {
  local rc=$?
  if [[ -n "$server" ]]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
  exit $rc
}
trap cleanup EXIT INT TERM

step "starting Kafka, Redis and Prometheus"
make -s up
bash infra/python.sh install
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$(bash infra/python.sh ort-path)}"

step "building sfs (release)"
cargo build --release --bin sfs

step "resetting the demo topics and ${PREFIX}* keys"
for t in "${TOPICS[@]}" "${TOPICS[0]}.dlq" "${TOPICS[1]}.dlq"; do
  bash infra/kafka.sh topics --delete --if-exists --topic "$t" 2>/dev/null || true
done
redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}*" | xargs -r -n 1000 redis-cli -u "$REDIS_URL" del >/dev/null
sleep 2

step "generating one simulated hour of traffic (ending now) into Kafka"
"$SFS" generate --start-time now-1h --duration 1h --sim-rate "${DEMO_EVENTS_PER_SEC:-100}" \
  --users 20000 --merchants 2000 --fraud-rate 0.02 --label-delay 10m --v1-share 0.1
# Poison messages: garbage bytes, an unknown schema id, an invalid amount. They
# must land in txn.events.dlq with their reason while the rest flows.
python_bin="$SFS_ROOT/.venv/bin/python"
"$python_bin" - <<'PY'
from confluent_kafka import Producer
p = Producer({"bootstrap.servers": "127.0.0.1:9092"})
p.produce("txn.events", key=b"poison-1", value=b"\x07garbage bytes")
p.produce("txn.events", key=b"poison-2", value=b"\x00\x00\x00\x03\xe7" + b"\x02" * 20)
p.produce("txn.events", key=b"poison-3", value=b'{"event_id":"e","card_id":"c","user_id":"u","merchant_id":"m","mcc":5411,"amount_minor":-5,"currency":"EUR","country":"DE","channel":"pos","event_time":1}')
p.flush(10)
PY

LOGS="$SFS_DATA/logs"
mkdir -p "$LOGS"
step "streaming the log into Redis (sfs stream --until-end, ${DEMO_WORKERS:-2} workers; log in $LOGS/stream.log)"
"$SFS" stream -w "${DEMO_WORKERS:-2}" --until-end --key-prefix "$PREFIX" --metrics-listen "" 2> >(tee -a "$LOGS/stream.log" >&2)

rows_card=$(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}card:*" | wc -l)
rows_user=$(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}user:*" | wc -l)
frontier=$(redis-cli -u "$REDIS_URL" hget "${PREFIX}_progress" frontier_ms)
echo "redis: $rows_card card rows, $rows_user user rows, progress frontier $frontier ($(date -u -d "@$((frontier / 1000))" +%FT%TZ))"
echo "dead letters in txn.events.dlq:"
"$python_bin" - <<'PY'
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": "127.0.0.1:9092", "group.id": "sfs-demo-dlq", "enable.auto.commit": False})
md = c.list_topics("txn.events.dlq", timeout=10).topics["txn.events.dlq"]
c.assign([TopicPartition("txn.events.dlq", p, 0) for p in md.partitions])
seen = 0
while True:
    m = c.poll(2.0)
    if m is None:
        break
    if m.error():
        continue
    seen += 1
    h = {k: v.decode() for k, v in (m.headers() or [])}
    print("  ", {k: v for k, v in h.items()})
print(f"  {seen} dead letters")
c.close()
PY

step "serving on 127.0.0.1:$PORT, every scored vector logged to scores.log"
SFS_LOG=warn "$SFS" serve --listen "127.0.0.1:$PORT" --key-prefix "$PREFIX" --models-dir models \
  --score-log-brokers 127.0.0.1:9092 --score-log-sample-rate 1.0 2>>"$LOGS/serve.log" &
server=$!
wait_for 30 "server ready" curl -fs "http://127.0.0.1:$PORT/ready" || die "sfs serve did not become ready"

card_key=$(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}card:*" | head -1 || true)
card=${card_key#"${PREFIX}card:"}
user_key=$(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}user:*" | head -1 || true)
user=${user_key#"${PREFIX}user:"}
post() { curl -s -X POST -H 'content-type: application/json' "http://127.0.0.1:$PORT$1" -d "$2"; echo; }
echo "-- GET /features/card/$card"
curl -s "http://127.0.0.1:$PORT/features/card/$card"; echo
echo "-- POST /score/fraud (a usual purchase)"
post /score/fraud "{\"card_id\":\"$card\",\"user_id\":\"$user\",\"transaction_amount\":25.00,\"mcc\":5411,\"country\":\"DE\",\"channel\":\"pos\"}"
echo "-- POST /score/fraud?explain=true (large online purchase abroad)"
post '/score/fraud?explain=true' "{\"card_id\":\"$card\",\"amount_minor\":950000,\"mcc\":5732,\"country\":\"BR\",\"channel\":\"ecom\"}"
echo "-- POST /score/fraud (unknown card: cold start)"
post /score/fraud '{"card_id":"never-seen","transaction_amount":10}'
echo "-- POST /score/fraud (bad request: amount is a string)"
post /score/fraud "{\"card_id\":\"$card\",\"transaction_amount\":\"lots\"}"
echo "-- GET /models"
models_json=$(curl -s "http://127.0.0.1:$PORT/models")
echo "$models_json"
echo "-- the served models against the rules on their held-out test rows (make train)"
python3 - "$models_json" <<'PY'
import json, sys
for m in json.loads(sys.argv[1])["models"]:
    name, label = m["name"], m["model_version"]
    test = (m.get("training") or {}).get("metrics", {}).get("test")
    if not test:
        print(f"  {name}: {label} has no held-out metrics (not trained by make train)")
        continue
    t = m["training"]
    print(f"  {name} {label}: {t['rows_test']} held-out rows, {t['split']['test'][0]} .. {t['split']['test'][1]}")
    for k, what in (("roc_auc", "ROC-AUC"), ("pr_auc", "PR-AUC"), ("recall_at_1pct_fpr", "recall at 1% FPR")):
        print(f"    {what:<17} model {test['model'][k]:.4f}   rules {test['rules'][k]:.4f}")
PY

echo "-- 200 more fraud requests, for cards and users seen in the log"
mapfile -t cards < <(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}card:*" | head -200)
mapfile -t users < <(redis-cli -u "$REDIS_URL" --scan --pattern "${PREFIX}user:*" | head -200)
scored=0
for i in "${!cards[@]}"; do
  body="{\"card_id\":\"${cards[$i]#"${PREFIX}card:"}\",\"user_id\":\"${users[$((i % ${#users[@]}))]#"${PREFIX}user:"}\",\"amount_minor\":$((500 + i * 731 % 90000)),\"mcc\":5411,\"country\":\"DE\",\"channel\":\"ecom\"}"
  curl -fs -o /dev/null -X POST -H 'content-type: application/json' "http://127.0.0.1:$PORT/score/fraud" -d "$body" && scored=$((scored + 1))
done
echo "   $scored answered 200"
# Stopping the server flushes the served-vector log.
kill "$server"; wait "$server" 2>/dev/null || true; server=""

step "online/offline parity: the served vectors against the event log replayed (sfs parity)"
"$SFS" parity --no-progress 2> >(tee -a "$LOGS/parity.log" >&2)

echo
echo "demo: generated 1 simulated hour, $rows_card card and $rows_user user rows in Redis, scored $((scored + 3)) requests and checked their vectors' parity; Prometheus on http://127.0.0.1:9090"
