"""Train the fraud and propensity models and publish them to the model registry.

Writes models/<name>/<version>/{model.onnx, metadata.json, test_vectors.json}.
The feature names and their cold-start values follow server/CONTEXT.md
("Feature vectors"); until the point-in-time dataset of the dataflow exists,
the training rows are synthetic draws that respect those definitions (money in
minor units, windows [t - W, t), counts nested 1m <= 5m <= 1h <= 24h).

usage: python training/train.py [--out models] [--version 1] [--rows 40000] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
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

# Must stay equal to schemas::features::FEATURE_SET_VERSION.
FEATURE_SET_VERSION = 2
DAY_SECS = 86_400.0

CARD = [
    "txn_count_1m", "txn_count_5m", "txn_count_1h", "txn_count_24h",
    "amount_sum_1h", "amount_sum_24h", "amount_mean_24h", "amount_std_24h",
    "amount_max_24h", "distinct_merchants_1h", "distinct_merchants_24h",
    "distinct_countries_24h",
]
USER = [
    "click_count_5m", "click_count_1h", "click_count_24h", "add_to_cart_count_1h",
    "purchase_count_24h", "distinct_categories_1h", "txn_count_24h", "amount_sum_24h",
]
REQUEST = [
    "amount_log1p", "amount_to_mean_24h", "amount_zscore_24h", "country_mismatch",
    "seconds_since_last_txn", "channel_ecom", "channel_atm",
]
FRAUD_FEATURES = (
    REQUEST + [f"card.{f}" for f in CARD] + [f"user.{f}" for f in USER]
    + ["card_cold_start", "user_cold_start"]
)
PROPENSITY_FEATURES = [f"user.{f}" for f in USER] + ["user_cold_start"]


def user_rows(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """User rows, with cold-start users (no row: all zeros)."""
    cold = rng.random(n) < 0.08
    activity = rng.lognormal(np.log(20.0), 1.0, n)
    c24 = rng.poisson(activity)
    c1h = rng.binomial(c24, 0.12)
    c5m = rng.binomial(c1h, 0.25)
    atc = rng.binomial(c1h, 0.1)
    purchases = rng.poisson(0.02 * c24)
    cats = np.minimum(c1h, 1 + rng.poisson(1.5, n)) * (c1h > 0)
    txns = rng.poisson(2.0, n)
    spend = np.round(txns * rng.lognormal(np.log(4000.0), 0.8, n))
    cols = dict(zip(USER, [c5m, c1h, c24, atc, purchases, cats, txns, spend]))
    out = {f"user.{k}": np.where(cold, 0, v).astype(np.float64) for k, v in cols.items()}
    out["user_cold_start"] = cold.astype(np.float64)
    return out


def fraud_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Card + user + request features of n transactions and their fraud labels."""
    cold = rng.random(n) < 0.05
    mean = rng.lognormal(np.log(4000.0), 0.8, n)
    std = mean * rng.uniform(0.2, 1.0, n)
    c24 = 1 + rng.poisson(4.0, n)
    c1h = rng.binomial(c24, 0.1)
    c5m = rng.binomial(c1h, 0.2)
    c1m = rng.binomial(c5m, 0.3)
    attack = rng.random(n) < 0.04
    # Fraud shows up as bursts, big amounts, new countries, card-not-present.
    burst = np.where(attack & (rng.random(n) < 0.5), rng.poisson(3.0, n), 0)
    c1m, c5m, c1h, c24 = c1m + burst, c5m + burst, c1h + burst, c24 + burst
    sum24 = np.round(mean * c24)
    sum1h = np.round(mean * c1h * rng.uniform(0.5, 1.5, n))
    max24 = np.round(mean + std * rng.uniform(0.0, 2.0, n))
    dm24 = np.minimum(c24, 1 + rng.poisson(2.0, n))
    dm1h = np.minimum(c1h, dm24)
    dc24 = 1 + (rng.random(n) < np.where(attack, 0.5, 0.05))
    amount = np.where(
        attack,
        mean * rng.uniform(2.0, 15.0, n),
        mean * rng.lognormal(0.0, 0.5, n),
    ).round().clip(1)
    mismatch = rng.random(n) < np.where(attack, 0.6, 0.04)
    since = np.minimum(rng.exponential(DAY_SECS / c24), DAY_SECS)
    since = np.where(attack & (rng.random(n) < 0.5), rng.uniform(1.0, 120.0, n), since)
    channel = rng.choice(3, n, p=[0.6, 0.3, 0.1])
    channel = np.where(attack & (rng.random(n) < 0.5), 1, channel)
    label = np.where(attack, rng.random(n) < 0.85, rng.random(n) < 0.004)

    card = dict(zip(CARD, [c1m, c5m, c1h, c24, sum1h, sum24, mean, std, max24, dm1h, dm24, dc24]))
    cols: dict[str, np.ndarray] = {f"card.{k}": np.where(cold, 0, v) for k, v in card.items()}
    # Cold-start request features, as the server defines them.
    cols["amount_log1p"] = np.log1p(amount)
    cols["amount_to_mean_24h"] = np.where(cold, 1.0, amount / mean)
    cols["amount_zscore_24h"] = np.where(cold, 0.0, np.clip((amount - mean) / np.maximum(std, 1.0), -50, 50))
    cols["country_mismatch"] = np.where(cold, 0.0, mismatch)
    cols["seconds_since_last_txn"] = np.where(cold, DAY_SECS, since)
    cols["channel_ecom"] = (channel == 1).astype(np.float64)
    cols["channel_atm"] = (channel == 2).astype(np.float64)
    cols["card_cold_start"] = cold.astype(np.float64)
    cols.update(user_rows(rng, n))
    x = np.column_stack([np.asarray(cols[f], dtype=np.float64) for f in FRAUD_FEATURES])
    return x.astype(np.float32), label.astype(np.int64)


def propensity_dataset(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """User features and whether the user purchases in the next hour."""
    cols = user_rows(rng, n)
    logit = (
        -4.0 + 1.2 * np.minimum(cols["user.add_to_cart_count_1h"], 3)
        + 0.04 * np.minimum(cols["user.click_count_1h"], 40)
        + 0.6 * np.minimum(cols["user.purchase_count_24h"], 3)
        + 0.3 * np.minimum(cols["user.distinct_categories_1h"], 4)
        - 0.5 * cols["user_cold_start"]
    )
    label = rng.random(n) < 1.0 / (1.0 + np.exp(-logit))
    x = np.column_stack([cols[f] for f in PROPENSITY_FEATURES])
    return x.astype(np.float32), label.astype(np.int64)


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


def publish(out: Path, name: str, version: int, model, features: list[str], x_train, x_test, y_test,
            thresholds: list[dict], default_decision: str, rng: np.random.Generator) -> None:
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
        cold[0, i] = {"amount_to_mean_24h": 1.0, "seconds_since_last_txn": DAY_SECS,
                      "card_cold_start": 1.0, "user_cold_start": 1.0,
                      "amount_log1p": float(np.log1p(5000.0))}.get(f, 0.0)
    vectors = np.vstack([vectors, cold])
    vector_scores = sess.run(["probabilities"], {"features": vectors})[0][:, 1]

    metadata = {
        "name": name,
        "version": version,
        "feature_set_version": FEATURE_SET_VERSION,
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
            "data": "synthetic (training/train.py), to be replaced by the point-in-time dataset",
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
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "models")
    parser.add_argument("--version", type=int, default=1)
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)

    x, y = fraud_dataset(rng, args.rows)
    split = int(0.8 * len(x))
    fraud = GradientBoostingClassifier(n_estimators=60, max_depth=3, learning_rate=0.1, random_state=args.seed)
    fraud.fit(x[:split], y[:split])
    publish(args.out, "fraud", args.version, fraud, FRAUD_FEATURES, x[:split], x[split:], y[split:],
            [{"decision": "review", "min_score": 0.3}, {"decision": "decline", "min_score": 0.7}],
            "approve", rng)

    x, y = propensity_dataset(rng, args.rows)
    split = int(0.8 * len(x))
    propensity = Pipeline([("scale", StandardScaler()), ("lr", LogisticRegression(max_iter=1000))])
    propensity.fit(x[:split], y[:split])
    publish(args.out, "propensity", args.version, propensity, PROPENSITY_FEATURES, x[:split], x[split:],
            y[split:], [{"decision": "medium", "min_score": 0.2}, {"decision": "high", "min_score": 0.5}],
            "low", rng)


if __name__ == "__main__":
    main()
