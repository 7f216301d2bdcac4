"""Feast's own Python SDK (feast==0.67.0) reads sfs's rows.

Run by sfs/tests/feast.rs with the .venv-feast interpreter, against a real
`sfs serve` and Redis: this script writes the rows (raw Redis hashes, encoded
here from docs/FEATURES.md, not by sfs), runs `feast apply` in the repository
`sfs feast init` wrote, then checks FeatureStore.get_online_features: by
name and by service, several entities, unknown entities (NOT_FOUND), a stale
row (OUTSIDE_MAX_AGE), full feature names, reals typed as doubles, values
equal to GET /features/..., and Feast-style errors.

usage: feast_sdk.py --repo DIR --url URL --redis URL --prefix P --features TOML --version FS
"""

import argparse
import json
import os
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from datetime import datetime, timezone

import redis
from feast import FeatureStore
from feast.errors import FeatureNameCollisionError, FeatureViewNotFoundException
from feast.protos.feast.serving.ServingService_pb2 import FieldStatus

REAL = {"mean", "std"}  # the aggregations with real values (docs/FEATURES.md)


def http(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def rfc3339(ms):
    t = datetime.fromtimestamp(ms / 1000, tz=timezone.utc)
    text = t.strftime("%Y-%m-%dT%H:%M:%S")
    return text + ("Z" if ms % 1000 == 0 else ".%03dZ" % (ms % 1000))


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def main():
    ap = argparse.ArgumentParser()
    for a in ("repo", "url", "redis", "prefix", "features", "version"):
        ap.add_argument("--" + a, required=True)
    args = ap.parse_args()

    with open(args.features, "rb") as f:
        defs = tomllib.load(f)
    kinds = {}  # entity -> [(feature, is_real)] in file order
    for feat in defs["features"]:
        kinds.setdefault(feat["entity"], []).append(
            (feat["name"], feat["aggregation"] in REAL)
        )

    r = redis.Redis.from_url(args.redis)
    now = int(time.time() * 1000)
    written = {}  # (entity, id) -> (as_of, {feature: value})

    def put(entity, id_, as_of, seed):
        values = {}
        for i, (name, real) in enumerate(kinds[entity]):
            # Reals alternate integral (must still come back as doubles) and not.
            values[name] = (float(seed * 100 + i) + (0.25 if i % 2 else 0.0)) if real else seed * 10 + i
        fields = {k: repr(v) for k, v in values.items()}
        fields["_as_of"] = str(as_of)
        fields["_fv"] = args.version
        key = f"{args.prefix}{entity}:{id_}"
        r.delete(key)
        r.hset(key, mapping=fields)
        written[(entity, id_)] = (as_of, values)

    fresh = now - 1_500  # seconds old: inside the 1h ttl
    put("card", "c1", fresh, 1)
    put("card", "c2", fresh - 7, 2)
    put("card", "c_stale", now - 2 * 3_600_000, 3)  # 2 h: outside the 1 h ttl
    put("user", "u1", fresh, 4)
    r.delete(f"{args.prefix}_progress")  # no frontier: rows are as fresh as their _as_of

    feast_cli = os.path.join(os.path.dirname(sys.executable), "feast")
    out = subprocess.run(
        [feast_cli, "apply"], cwd=args.repo, capture_output=True, text=True, timeout=300
    )
    check(out.returncode == 0, f"feast apply failed:\n{out.stdout}\n{out.stderr}")

    store = FeatureStore(repo_path=args.repo)
    card_names = [n for n, _ in kinds["card"]]
    user_names = [n for n, _ in kinds["user"]]

    # 1. By name, several entities, one unknown, one stale.
    ids = ["c1", "c2", "nope", "c_stale"]
    refs = ["card_features:" + n for n in card_names]
    resp = store.get_online_features(
        features=refs, entity_rows=[{"card_id": i} for i in ids]
    )
    d = resp.to_dict()
    check(d["card_id"] == ids, f"join keys come back in order: {d['card_id']}")
    names = list(resp.proto.metadata.feature_names.val)
    check(names == ["card_id"] + card_names, f"feature names: {names}")
    for n, real in kinds["card"]:
        for row, id_ in enumerate(ids):
            got = d[n][row]
            if id_ == "nope":
                check(got is None, f"{n} of an unknown card is None, got {got!r}")
                continue
            want = written[("card", id_)][1][n]
            check(got == want, f"card {id_} {n}: {got!r} != {want!r}")
            check(
                isinstance(got, float) if real else isinstance(got, int),
                f"card {id_} {n}: {got!r} has type {type(got).__name__}",
            )
    statuses = {
        names[i]: list(v.statuses) for i, v in enumerate(resp.proto.results)
    }
    want_status = [
        FieldStatus.PRESENT,
        FieldStatus.PRESENT,
        FieldStatus.NOT_FOUND,
        FieldStatus.OUTSIDE_MAX_AGE,
    ]
    for n in card_names:
        check(statuses[n] == want_status, f"statuses of {n}: {statuses[n]}")

    # The same values as GET /features/card/{id}.
    for id_ in ("c1", "c2", "c_stale"):
        code, body = http(f"{args.url}/features/card/{id_}")
        check(code == 200, f"GET /features/card/{id_}: {code} {body}")
        row = json.loads(body)["features"]
        for n in card_names:
            i = ids.index(id_)
            check(d[n][i] == row[n], f"{id_} {n}: SDK {d[n][i]!r} != GET {row[n]!r}")

    # 2. The raw protocol: timestamps are the rows' _as_of, reals keep a point.
    code, body = http(
        f"{args.url}/get-online-features",
        {"features": refs[:3] + ["card_features:amount_mean_24h"], "entities": {"card_id": ids}},
    )
    check(code == 200, f"raw POST: {code} {body}")
    raw = json.loads(body)
    mean = raw["results"][4]
    check(mean["event_timestamps"][0] == rfc3339(fresh), f"timestamp {mean['event_timestamps'][0]} vs {rfc3339(fresh)}")
    check(mean["event_timestamps"][2] == "1970-01-01T00:00:00Z", "a missing row has the epoch")
    check(raw["results"][0]["statuses"] == ["PRESENT"] * 4, "join keys are PRESENT")
    check(mean["statuses"] == ["PRESENT", "PRESENT", "NOT_FOUND", "OUTSIDE_MAX_AGE"], str(mean["statuses"]))
    # c1's amount_mean_24h is integral (see put): the text must still have a point.
    text_value = body.split('"values":[')[5].split(",")[0]
    check("." in text_value, f"a real is written with a decimal point: {text_value}")

    # 3. By service, full feature names, card and user at once.
    service = store.get_feature_service("fraud_v1")
    resp = store.get_online_features(
        features=service,
        entity_rows=[{"card_id": "c1", "user_id": "u1"}, {"card_id": "c2", "user_id": "nope"}],
        full_feature_names=True,
    )
    d = resp.to_dict()
    want_names = (
        ["card_id", "user_id"]
        + ["card_features__" + n for n in card_names]
        + ["user_features__" + n for n in user_names]
    )
    check(list(resp.proto.metadata.feature_names.val) == want_names, str(list(resp.proto.metadata.feature_names.val)))
    _, body = http(f"{args.url}/features/user/u1")
    user_row = json.loads(body)["features"]
    for n in user_names:
        check(d["user_features__" + n] == [user_row[n], None], f"user {n}: {d['user_features__' + n]}")
        check(d["user_features__" + n][0] == written[("user", "u1")][1][n], f"user {n} vs written")
    for n in card_names:
        check(d["card_features__" + n] == [written[("card", "c1")][1][n], written[("card", "c2")][1][n]], f"card {n}")

    # Without full names the service's colliding names are Feast's error: the
    # SDK rebuilds Feast's own exception from the error body.
    try:
        store.get_online_features(features=service, entity_rows=[{"card_id": "c1", "user_id": "u1"}])
        raise AssertionError("a name collision must fail")
    except FeatureNameCollisionError as e:
        check("txn_count_24h" in str(e), str(e))

    # 4. Unknown view / feature / service: 4xx naming it, through the SDK too.
    try:
        store.get_online_features(features=["ghost_view:x"], entity_rows=[{"card_id": "c1"}])
        raise AssertionError("an unknown view must fail")
    except FeatureViewNotFoundException as e:
        check("ghost_view" in str(e), str(e))
    try:
        store.get_online_features(features=refs[:1], entity_rows=[{"user_id": "u1"}])
        raise AssertionError("a missing join key must fail")
    except RuntimeError as e:
        check("400" in str(e) and "card_id" in str(e), str(e))
    code, body = http(f"{args.url}/get-online-features", {"features": ["card_features:ghost"], "entities": {"card_id": ["c1"]}})
    check(code == 404 and "ghost" in body, f"unknown feature: {code} {body}")
    code, body = http(f"{args.url}/get-online-features", {"feature_service": "ghost_v2", "entities": {"card_id": ["c1"]}})
    detail = json.loads(json.loads(body))
    check(code == 404 and detail["class"] == "FeatureServiceNotFoundException" and "ghost_v2" in detail["message"], body)
    code, body = http(f"{args.url}/get-online-features", {"features": refs})
    check(code == 422 and "entities" in body, f"missing entities: {code} {body}")

    # 5. A frontier past the stale row's _as_of: the job is alive and the row
    # is exact as of it, so it is PRESENT again.
    r.hset(f"{args.prefix}_progress", "frontier_ms", str(int(time.time() * 1000)))
    resp = store.get_online_features(features=refs[:1], entity_rows=[{"card_id": "c_stale"}])
    check(list(resp.proto.results[1].statuses) == [FieldStatus.PRESENT], str(resp.proto.results[1].statuses))

    # 6. /health as Feast's: 200, empty body.
    code, body = http(f"{args.url}/health")
    check(code == 200 and body == "", f"/health: {code} {body!r}")

    for k in list(written) + [("_progress", None)]:
        r.delete(f"{args.prefix}{k[0]}:{k[1]}" if k[1] else f"{args.prefix}_progress")
    print("feast sdk: all checks passed")


if __name__ == "__main__":
    main()
