#!/usr/bin/env bash
# Checks that Kafka, Redis, the schema registry and Prometheus answer; prints one line each and a
# summary; exits non-zero if any is down.
SERVICE=health
source "$(dirname "$0")/lib.sh"
set +e
failed=0
for svc in kafka redis registry prometheus; do
  bash "$SFS_ROOT/infra/$svc.sh" status 2>&1 || failed=$((failed + 1))
done
if ((failed)); then echo "health: $failed of 4 services down (run make up)"; exit 1; fi
echo "health: kafka, redis, registry and prometheus healthy"
