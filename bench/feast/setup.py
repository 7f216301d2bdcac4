"""bench/feast setup: the same card rows in sfs's layout and in Feast's Redis
online store (through Feast's own `feast apply` + `feast materialize`).

usage: setup.py --repo DIR --redis URL --prefix P --features TOML --version FS --cards N
Writes N card rows (ids c0..c{N-1}, every card feature of features.toml) as
sfs hashes under P, and as data/card.parquet materialized into the Feast repo
DIR (whose feature_store.yaml must point at the same Redis).
"""

import argparse
import os
import subprocess
import sys
import time
import tomllib

import pandas as pd
import redis

REAL = {"mean", "std"}


def main():
    ap = argparse.ArgumentParser()
    for a in ("repo", "redis", "prefix", "features", "version"):
        ap.add_argument("--" + a, required=True)
    ap.add_argument("--cards", type=int, default=10000)
    args = ap.parse_args()
    with open(args.features, "rb") as f:
        defs = tomllib.load(f)
    card = [(x["name"], x["aggregation"] in REAL) for x in defs["features"] if x["entity"] == "card"]
    now_ms = int(time.time() * 1000) - 1000
    r = redis.Redis.from_url(args.redis)
    cols = {"card_id": [], "event_timestamp": []}
    for name, _ in card:
        cols[name] = []
    pipe = r.pipeline(transaction=False)
    for i in range(args.cards):
        fields = {"_as_of": str(now_ms), "_fv": args.version}
        cols["card_id"].append(f"c{i}")
        cols["event_timestamp"].append(pd.Timestamp(now_ms, unit="ms", tz="UTC"))
        for j, (name, real) in enumerate(card):
            v = (i % 97) * 1.5 + j if real else (i * 7 + j) % 1000
            fields[name] = repr(v)
            cols[name].append(v)
        pipe.hset(f"{args.prefix}card:c{i}", mapping=fields)
        if i % 1000 == 999:
            pipe.execute()
    pipe.execute()
    os.makedirs(os.path.join(args.repo, "data"), exist_ok=True)
    pd.DataFrame(cols).to_parquet(os.path.join(args.repo, "data", "card.parquet"))
    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    t0 = time.time()
    subprocess.run([feast, "apply"], cwd=args.repo, check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [feast, "materialize", "--views", "card_features", "2000-01-01T00:00:00", "2100-01-01T00:00:00"],
        cwd=args.repo, check=True, stdout=subprocess.DEVNULL,
    )
    print(f"setup: {args.cards} card rows in sfs and Feast ({time.time() - t0:.0f} s of feast apply + materialize)", file=sys.stderr)


if __name__ == "__main__":
    main()
