"""Train the fraud and propensity models and publish them to the model registry.

Writes models/<name>/<version>/{model.onnx, metadata.json, test_vectors.json}.

The model inputs follow the feature definitions (features.toml, read with
tomllib): every feature of the card and user entities that is a quantity
(count, sum, mean, std, min, max, distinct_count), named `{entity}.{feature}`,
plus the server's request-time features and cold-start flags
(server/CONTEXT.md, "Feature vectors"). Features holding a time or a code
(last_time, last, mode) reach the models only through the request-time
features that read them.

Until the point-in-time dataset of the dataflow exists, the training rows are
computed from synthetic events by each feature's definition (aggregation,
field, window [t - W, t), filter), so a feature added to features.toml is
trained on without touching this file. An entity with no event in its widest
window has no row: its features are 0 and its cold-start flag is 1, as in the
server.

The feature-set version is the hash `sfs features` prints (computed in Rust,
schemas::features::FeatureSet::version); the server refuses a model trained on
another version.

usage: python training/train.py --feature-set-version fs-... [--features features.toml]
       [--out models] [--version 1] [--rows 40000] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, log_loss, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
# The cap (and cold-start value) of seconds_since_last_txn: server/src/features.rs.
MAX_SECONDS_SINCE_LAST_TXN = 86_400.0
# When the synthetic rows are "as of" (ms since the epoch).
AS_OF_MS = 1_700_000_000_000

# The entities the scoring routes read, and the card features the server's
# request-time features need (server/src/features.rs).
CARD, USER = "card", "user"
# Request roles ([request] of features.toml) bound to the card features they read.
ROLES = ("amount_mean", "amount_std", "last_time", "usual_country")
REQUEST = [
    "amount_log1p", "amount_to_mean_24h", "amount_zscore_24h", "country_mismatch",
    "seconds_since_last_txn", "channel_ecom", "channel_atm",
]
# Aggregations whose value is a quantity a model may take as is.
QUANTITIES = {"count", "sum", "mean", "std", "min", "max", "distinct_count"}

# The event schemas (schemas::features::TXN_FIELDS, CLICK_FIELDS) as far as
# filters need their string values.
ENUMS = {"channel": ["pos", "ecom", "atm"], "action": ["view", "add_to_cart", "purchase"]}
CATEGORIES = ["books", "music", "games", "garden", "toys", "shoes", "food", "phones",
              "tv", "sports", "beauty", "travel"]
COUNTRY_FIELDS = {"country", "ip_country"}
HOME_COUNTRIES = ["DE", "FR", "NL", "ES", "IT", "PL"]
FOREIGN_COUNTRIES = ["BR", "NG", "RU", "US", "VN", "ID"]


def pack_country(code: str) -> int:
    """schemas::features::pack_country: two uppercase letters as (b0 << 8) | b1."""
    if len(code) != 2 or not code.isascii() or not code.isupper():
        raise ValueError(f"not a country code: {code!r}")
    return (ord(code[0]) << 8) | ord(code[1])


def unpack_country(code: np.ndarray) -> np.ndarray:
    """Whether each packed code is a country (0: none)."""
    b0, b1 = code // 256, code % 256
    return (code > 0) & (b0 >= 65) & (b0 <= 90) & (b1 >= 65) & (b1 <= 90)


def parse_window(text: str) -> int:
    """A window such as 500ms, 10s, 5m, 1h, 30d in ms (validated in Rust)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text.strip())
    if not m:
        raise ValueError(f"bad window {text!r}")
    return int(m[1]) * {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}[m[2]]


# ---------------------------------------------------------------------------
# The definitions.

@dataclass
class Feature:
    name: str
    entity: str
    source: str
    aggregation: str
    field: str | None
    window_ms: int
    filter: dict


@dataclass
class Definitions:
    schemas: dict[str, str]                  # source -> schema
    entities: dict[str, list[str]]           # entity -> sources
    features: dict[str, list[Feature]] = field(default_factory=dict)  # entity -> features, file order
    request: dict[str, str] = field(default_factory=dict)  # request role -> card feature

    def model_inputs(self, entity: str) -> list[str]:
        """`entity.feature` of every quantity of `entity`, in row order."""
        return [f"{entity}.{f.name}" for f in self.features.get(entity, []) if f.aggregation in QUANTITIES]

    def feature(self, entity: str, name: str) -> Feature | None:
        return next((f for f in self.features.get(entity, []) if f.name == name), None)


def load_definitions(path: Path) -> Definitions:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    defs = Definitions(
        schemas={s["name"]: s["schema"] for s in doc.get("sources", [])},
        entities={e["name"]: e["sources"] for e in doc.get("entities", [])},
        request=dict(doc.get("request", {})),
    )
    for f in doc.get("features", []):
        defs.features.setdefault(f["entity"], []).append(Feature(
            name=f["name"], entity=f["entity"], source=f["source"], aggregation=f["aggregation"],
            field=f.get("field"), window_ms=parse_window(f["window"]), filter=f.get("filter", {}),
        ))
    for entity in (CARD, USER):
        if entity not in defs.entities:
            raise SystemExit(f"{path}: no entity {entity}, which the scoring routes read")
    for role in ROLES:
        name = defs.request.get(role)
        if name is None or defs.feature(CARD, name) is None:
            raise SystemExit(f"{path}: the request-time features need [request] {role} bound to a feature of entity {CARD}")
    return defs


# ---------------------------------------------------------------------------
# Synthetic events and the features they make.

@dataclass
class Events:
    """Events of n entity rows: `row` (which row), `age_ms` (as-of time minus
    event time, in [1, horizon]), and one integer column per schema field
    (strings as codes); `absent` marks optional fields an event lacks."""
    n: int
    row: np.ndarray
    age_ms: np.ndarray
    cols: dict[str, np.ndarray]
    absent: dict[str, np.ndarray] = field(default_factory=dict)

    def present(self, name: str) -> np.ndarray:
        return ~self.absent.get(name, np.zeros(len(self.row), dtype=bool))

    @staticmethod
    def concat(parts: list["Events"]) -> "Events":
        n = parts[0].n
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.int64)
        names = set().union(*(p.absent for p in parts))
        return Events(
            n, cat([p.row for p in parts]), cat([p.age_ms for p in parts]),
            {k: cat([p.cols[k] for p in parts]) for k in parts[0].cols},
            {k: np.concatenate([p.absent.get(k, np.zeros(len(p.row), bool)) for p in parts]) for k in names},
        )


def _times(rng, rows, horizon_ms, recent_share=0.0, recent_ms=3_600_000):
    """Ages: uniform over the horizon, except a share within the last `recent_ms`."""
    ages = rng.integers(1, horizon_ms + 1, len(rows))
    recent = rng.random(len(rows)) < recent_share
    ages[recent] = rng.integers(1, min(recent_ms, horizon_ms) + 1, int(recent.sum()))
    return ages


def _gamma(rng, mean, std):
    shape = (mean / std) ** 2
    return rng.gamma(shape, std**2 / mean)


def txns(rng, count: np.ndarray, horizon_ms: int, mean: np.ndarray, std: np.ndarray,
         home: np.ndarray, foreign_p: np.ndarray, ages: np.ndarray | None = None,
         channel_p=(0.6, 0.3, 0.1), merchants: np.ndarray | None = None) -> Events:
    """`count[i]` transactions of row i (amounts around mean[i], mostly in home[i])."""
    n = len(count)
    rows = np.repeat(np.arange(n), count)
    k = len(rows)
    if ages is None:
        ages = _times(rng, rows, horizon_ms)
    pool = merchants if merchants is not None else np.full(n, 1_000_000)
    merchant = rows * 1_000_000 + rng.integers(0, np.maximum(pool[rows], 1))
    foreign = rng.random(k) < foreign_p[rows]
    country = np.where(foreign, rng.choice([pack_country(c) for c in FOREIGN_COUNTRIES], k), home[rows])
    cols = {
        "event_id": np.arange(k), "card_id": rows, "user_id": rows, "merchant_id": merchant,
        "mcc": rng.choice([5411, 5812, 5999, 4111, 7011], k),
        "amount_minor": np.maximum(1, np.round(_gamma(rng, mean[rows], std[rows]))).astype(np.int64),
        "currency": np.zeros(k, np.int64), "country": country,
        "channel": rng.choice(3, k, p=list(channel_p)),
        "event_time": AS_OF_MS - ages, "device_id": rng.integers(0, 1 << 30, k), "ip_country": country,
    }
    absent = {"device_id": rng.random(k) < 0.3, "ip_country": rng.random(k) < 0.2}
    return Events(n, rows, ages, cols, absent)


def clicks(rng, count: np.ndarray, horizon_ms: int, intent: np.ndarray) -> Events:
    """`count[i]` clicks of user i; a share in a recent session; add_to_cart with probability intent[i]."""
    n = len(count)
    rows = np.repeat(np.arange(n), count)
    k = len(rows)
    ages = _times(rng, rows, horizon_ms, recent_share=0.12)
    interests = 1 + rng.poisson(1.5, n)
    first = rng.integers(0, len(CATEGORIES), n)
    category = (first[rows] + rng.integers(0, interests[rows])) % len(CATEGORIES)
    u = rng.random(k)
    action = np.where(u < intent[rows], 1, np.where(u < intent[rows] + 0.02, 2, 0))
    cols = {
        "event_id": np.arange(k), "user_id": rows, "session_id": rows * 100 + ages // 1_800_000,
        "item_id": rng.integers(0, 100_000, k), "category": category, "action": action,
        "event_time": AS_OF_MS - ages, "dwell_ms": rng.exponential(30_000, k).astype(np.int64),
    }
    return Events(n, rows, ages, cols, {"dwell_ms": rng.random(k) < 0.1})


def filter_code(field_name: str, value) -> int | None:
    """The integer code a filter value has in the synthetic events (None: matches nothing)."""
    if isinstance(value, int):
        return value
    if field_name in ENUMS:
        return ENUMS[field_name].index(value) if value in ENUMS[field_name] else None
    if field_name in COUNTRY_FIELDS:
        return pack_country(value)
    if field_name == "category":
        return CATEGORIES.index(value) if value in CATEGORIES else None
    return None


def aggregate(agg: str, rows: np.ndarray, values: np.ndarray | None, ages: np.ndarray, n: int) -> np.ndarray:
    """One aggregation per row over the selected events, as schemas::features::Aggregation defines it."""
    out = np.zeros(n)
    if agg == "count":
        return np.bincount(rows, minlength=n).astype(np.float64)
    if agg == "last_time":
        np.maximum.at(out, rows, (AS_OF_MS - ages).astype(np.float64))
        return out
    v = values.astype(np.float64)
    count = np.bincount(rows, minlength=n)
    if agg == "sum":
        return np.bincount(rows, weights=v, minlength=n)
    if agg in ("mean", "std"):
        mean = np.divide(np.bincount(rows, weights=v, minlength=n), count, out=np.zeros(n), where=count > 0)
        if agg == "mean":
            return mean
        sq = np.divide(np.bincount(rows, weights=v * v, minlength=n), count, out=np.zeros(n), where=count > 0)
        return np.sqrt(np.maximum(sq - mean * mean, 0.0))
    if agg in ("min", "max"):
        out = np.full(n, np.inf if agg == "min" else -np.inf)
        (np.minimum if agg == "min" else np.maximum).at(out, rows, v)
        return np.where(count > 0, out, 0.0)
    if agg == "distinct_count":
        pairs = np.unique(np.stack([rows, values]), axis=1)
        return np.bincount(pairs[0], minlength=n).astype(np.float64)
    if agg == "mode":  # most frequent, ties to the smallest value
        pairs, freq = np.unique(np.stack([rows, values]), axis=1, return_counts=True)
        order = np.lexsort((pairs[1], -freq, pairs[0]))
        r, val = pairs[0][order], pairs[1][order]
        first = np.r_[True, r[1:] != r[:-1]] if len(r) else np.zeros(0, bool)
        out[r[first]] = val[first]
        return out
    if agg == "last":  # latest event, ties to the largest value
        order = np.lexsort((values, -ages, rows))
        r = rows[order]
        last = np.r_[r[1:] != r[:-1], True] if len(r) else np.zeros(0, bool)
        out[r[last]] = values[order][last]
        return out
    raise ValueError(f"unknown aggregation {agg}")


def entity_rows(defs: Definitions, entity: str, events: dict[str, Events]) -> dict[str, np.ndarray]:
    """Every feature `entity.feature` of the rows (0 without a row) and `entity_cold_start`."""
    n = next(iter(events.values())).n
    features = defs.features.get(entity, [])
    widest = max((f.window_ms for f in features), default=0)
    has_row = np.zeros(n, dtype=bool)
    for ev in events.values():
        has_row[ev.row[ev.age_ms <= widest]] = True
    out = {}
    for f in features:
        ev = events[f.source]
        sel = ev.age_ms <= f.window_ms
        for name, value in f.filter.items():
            code = filter_code(name, value)
            sel = sel & ev.present(name) & (ev.cols[name] == code if code is not None else False)
        values = None
        if f.field is not None and f.aggregation != "last_time":
            sel = sel & ev.present(f.field)
            values = ev.cols[f.field][sel]
        col = aggregate(f.aggregation, ev.row[sel], values, ev.age_ms[sel], n)
        out[f"{entity}.{f.name}"] = np.where(has_row, col, 0.0)
    out[f"{entity}_cold_start"] = (~has_row).astype(np.float64)
    return out


def horizon(defs: Definitions, entity: str, source: str) -> int:
    return max((f.window_ms for f in defs.features[entity] if f.source == source), default=DAY_MS)


def simulate(defs: Definitions, entity: str, make: dict) -> dict[str, Events]:
    """The events of each source of `entity`, from `make[schema](horizon_ms)`."""
    events = {}
    for source in defs.entities[entity]:
        schema = defs.schemas[source]
        if schema not in make:
            raise SystemExit(f"no synthetic {schema} events for entity {entity}")
        events[source] = make[schema](horizon(defs, entity, source))
    return events


def user_rows(defs: Definitions, rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], Events]:
    """User rows (8% without activity: cold start) and their clicks."""
    idle = rng.random(n) < 0.08
    activity = np.where(idle, 0.0, rng.lognormal(np.log(20.0), 1.0, n))
    intent = rng.beta(1.0, 9.0, n)
    spend = rng.lognormal(np.log(4000.0), 0.8, n)
    home = rng.choice([pack_country(c) for c in HOME_COUNTRIES], n)
    made = {}

    def make_clicks(h):
        made["click"] = clicks(rng, rng.poisson(activity * h / DAY_MS), h, intent)
        return made["click"]

    def make_txns(h):
        count = np.where(idle, 0, rng.poisson(2.0 * h / DAY_MS, n))
        return txns(rng, count, h, spend, spend * 0.5, home, np.full(n, 0.02))

    events = simulate(defs, USER, {"click": make_clicks, "txn": make_txns})
    return entity_rows(defs, USER, events), made.get("click") or clicks(rng, np.zeros(n, np.int64), DAY_MS, intent)


def request_features(defs: Definitions, card: dict[str, np.ndarray], amount, country, channel) -> dict[str, np.ndarray]:
    """The server's request-time features (server/src/features.rs) from the card row and the request."""
    cold = card[f"{CARD}_cold_start"] > 0
    bound = {role: card[f"{CARD}.{defs.request[role]}"] for role in ROLES}
    mean, std = bound["amount_mean"], bound["amount_std"]
    last, usual = bound["last_time"], bound["usual_country"].astype(np.int64)
    known = ~cold & unpack_country(usual)
    return {
        "amount_log1p": np.log1p(amount),
        "amount_to_mean_24h": np.where(~cold & (mean > 0), amount / np.where(mean > 0, mean, 1.0), 1.0),
        "amount_zscore_24h": np.where(cold, 0.0, np.clip((amount - mean) / np.maximum(std, 1.0), -50, 50)),
        "country_mismatch": (known & (country != usual)).astype(np.float64),
        "seconds_since_last_txn": np.where(
            cold, MAX_SECONDS_SINCE_LAST_TXN,
            np.clip((AS_OF_MS - last) / 1000.0, 0.0, MAX_SECONDS_SINCE_LAST_TXN)),
        "channel_ecom": (channel == 1).astype(np.float64),
        "channel_atm": (channel == 2).astype(np.float64),
    }


def fraud_dataset(defs: Definitions, features: list[str], rng: np.random.Generator, n: int):
    """Card + user + request features of n transactions and their fraud labels."""
    new_card = rng.random(n) < 0.05
    mean = rng.lognormal(np.log(4000.0), 0.8, n)
    std = mean * rng.uniform(0.2, 1.0, n)
    rate = np.where(new_card, 0.0, rng.lognormal(np.log(4.0), 0.5, n))
    home = rng.choice([pack_country(c) for c in HOME_COUNTRIES], n)
    merchants = 1 + rng.poisson(2.0, n)
    attack = rng.random(n) < 0.04
    # Fraud shows up as bursts, big amounts, new countries, card-not-present.
    burst = np.where(attack & (rng.random(n) < 0.5), rng.poisson(3.0, n), 0)

    def make_txns(h):
        usual = txns(rng, rng.poisson(rate * h / DAY_MS), h, mean, std, home,
                     np.where(attack, 0.25, 0.02), merchants=merchants)
        rows = np.repeat(np.arange(n), burst)
        bursts = txns(rng, burst, h, mean * 3.0, mean, home, np.full(n, 0.5),
                      ages=rng.integers(1, 60_001, len(rows)), channel_p=(0.1, 0.9, 0.0))
        return Events.concat([usual, bursts])

    cols = entity_rows(defs, CARD, simulate(defs, CARD, {"txn": make_txns}))
    amount = np.where(attack, mean * rng.uniform(2.0, 15.0, n), mean * rng.lognormal(0.0, 0.5, n)).round().clip(1)
    foreign = rng.random(n) < np.where(attack, 0.6, 0.04)
    country = np.where(foreign, rng.choice([pack_country(c) for c in FOREIGN_COUNTRIES], n), home)
    channel = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    channel = np.where(attack & (rng.random(n) < 0.5), 1, channel)
    cols.update(request_features(defs, cols, amount, country, channel))
    cols.update(user_rows(defs, rng, n)[0])
    label = np.where(attack, rng.random(n) < 0.85, rng.random(n) < 0.004)
    x = np.column_stack([np.asarray(cols[f], dtype=np.float64) for f in features])
    return x.astype(np.float32), label.astype(np.int64)


def propensity_dataset(defs: Definitions, features: list[str], rng: np.random.Generator, n: int):
    """User features and whether the user purchases in the next hour: likelier
    after recent cart adds, clicks and categories, and past purchases."""
    cols, ev = user_rows(defs, rng, n)
    hour = ev.age_ms <= 3_600_000
    per_user = lambda sel: np.bincount(ev.row[sel], minlength=n)
    categories = np.unique(np.stack([ev.row[hour], ev.cols["category"][hour]]), axis=1)[0]
    logit = (
        -4.0 + 1.2 * np.minimum(per_user(hour & (ev.cols["action"] == 1)), 3)
        + 0.04 * np.minimum(per_user(hour), 40)
        + 0.6 * np.minimum(per_user(ev.cols["action"] == 2), 3)
        + 0.3 * np.minimum(np.bincount(categories, minlength=n), 4)
        - 0.5 * cols[f"{USER}_cold_start"]
    )
    label = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    x = np.column_stack([cols[f] for f in features])
    return x.astype(np.float32), label.astype(np.int64)


# ---------------------------------------------------------------------------
# Export and publication.

def histograms(x: np.ndarray, names: list[str], scores: np.ndarray) -> dict:
    """Reference histograms (10 quantile bins) of each feature and of the score, for drift checks."""
    out = {}
    for i, name in enumerate(names + ["score"]):
        col = scores if name == "score" else x[:, i].astype(np.float64)
        edges = np.unique(np.quantile(col, np.linspace(0, 1, 11)))
        if len(edges) < 2:
            edges = np.array([edges[0], edges[0] + 1.0])
        counts, edges = np.histogram(col, bins=edges)
        out[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return out


def publish(out: Path, name: str, version: int, feature_set_version: str, model, features: list[str],
            x_train, x_test, y_test, thresholds: list[dict], default_decision: str,
            rng: np.random.Generator) -> None:
    onx = convert_sklearn(
        model,
        initial_types=[("features", FloatTensorType([None, len(features)]))],
        options={id(model): {"zipmap": False}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    onnx.checker.check_model(onx)
    sess = ort.InferenceSession(onx.SerializeToString(), providers=["CPUExecutionProvider"])
    onnx_test = sess.run(["probabilities"], {"features": x_test})[0][:, 1]
    skl_test = model.predict_proba(x_test)[:, 1]
    onnx_train = sess.run(["probabilities"], {"features": x_train})[0][:, 1]

    # Fixed vectors: typical rows, the extremes, and a cold start.
    picks = list(rng.choice(len(x_test), 24, replace=False))
    picks += [int(np.argmax(onnx_test)), int(np.argmin(onnx_test))]
    vectors = x_test[picks]
    cold = np.zeros((1, len(features)), dtype=np.float32)
    for i, f in enumerate(features):
        cold[0, i] = {"amount_to_mean_24h": 1.0, "seconds_since_last_txn": MAX_SECONDS_SINCE_LAST_TXN,
                      "amount_log1p": float(np.log1p(5000.0))}.get(f, 1.0 if f.endswith("_cold_start") else 0.0)
    vectors = np.vstack([vectors, cold])
    vector_scores = sess.run(["probabilities"], {"features": vectors})[0][:, 1]

    metadata = {
        "name": name,
        "version": version,
        "feature_set_version": feature_set_version,
        "features": features,
        "input_name": "features",
        "output_name": "probabilities",
        "positive_class_index": 1,
        "default_decision": default_decision,
        "thresholds": thresholds,
        "training": {
            "algorithm": type(model[-1] if isinstance(model, Pipeline) else model).__name__,
            "rows_train": int(len(x_train)),
            "rows_test": int(len(x_test)),
            "positive_rate_test": float(np.mean(y_test)),
            "roc_auc": float(roc_auc_score(y_test, onnx_test)),
            "average_precision": float(average_precision_score(y_test, onnx_test)),
            "log_loss": float(log_loss(y_test, np.clip(onnx_test, 1e-7, 1 - 1e-7))),
            "max_abs_diff_sklearn_vs_onnx": float(np.max(np.abs(skl_test - onnx_test))),
            "data": "synthetic events aggregated by features.toml (training/train.py), "
                    "to be replaced by the point-in-time dataset",
            "versions": {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__},
        },
        "reference_histograms": histograms(x_train, features, onnx_train),
    }
    vectors_doc = {
        "model": name,
        "version": version,
        "onnxruntime": ort.__version__,
        "features": features,
        "vectors": [[float(v) for v in row] for row in vectors],
        "scores": [float(s) for s in vector_scores],
    }

    # Publish atomically: the server polls the registry and must never see a half-written version.
    final = out / name / str(version)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    (tmp / "model.onnx").write_bytes(onx.SerializeToString())
    (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (tmp / "test_vectors.json").write_text(json.dumps(vectors_doc, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    t = metadata["training"]
    print(f"{name} v{version}: auc={t['roc_auc']:.4f} ap={t['average_precision']:.4f} "
          f"logloss={t['log_loss']:.4f} -> {final}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--feature-set-version", required=True,
                        help="the version of --features, as `sfs features` prints it (fs-...)")
    parser.add_argument("--features", type=Path, default=Path(os.environ.get("SFS_FEATURES", ROOT / "features.toml")),
                        help="feature definitions (default: $SFS_FEATURES, else features.toml)")
    parser.add_argument("--out", type=Path, default=ROOT / "models")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not re.fullmatch(r"fs-[0-9a-f]{16}", args.feature_set_version):
        parser.error(f"--feature-set-version {args.feature_set_version!r} is not fs- and 16 hex digits")
    defs = load_definitions(args.features)
    fraud_features = REQUEST + defs.model_inputs(CARD) + defs.model_inputs(USER) + [
        f"{CARD}_cold_start", f"{USER}_cold_start"]
    propensity_features = defs.model_inputs(USER) + [f"{USER}_cold_start"]
    rng = np.random.default_rng(args.seed)

    x, y = fraud_dataset(defs, fraud_features, rng, args.rows)
    split = int(0.8 * len(x))
    fraud = GradientBoostingClassifier(n_estimators=60, max_depth=3, learning_rate=0.1, random_state=args.seed)
    fraud.fit(x[:split], y[:split])
    publish(args.out, "fraud", args.version, args.feature_set_version, fraud, fraud_features,
            x[:split], x[split:], y[split:],
            [{"decision": "review", "min_score": 0.3}, {"decision": "decline", "min_score": 0.7}],
            "approve", rng)

    x, y = propensity_dataset(defs, propensity_features, rng, args.rows)
    split = int(0.8 * len(x))
    propensity = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=1000))])
    propensity.fit(x[:split], y[:split])
    publish(args.out, "propensity", args.version, args.feature_set_version, propensity, propensity_features,
            x[:split], x[split:], y[split:],
            [{"decision": "medium", "min_score": 0.2}, {"decision": "high", "min_score": 0.5}],
            "low", rng)


if __name__ == "__main__":
    main()
