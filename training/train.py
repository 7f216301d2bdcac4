"""Train the fraud and propensity models on the point-in-time training sets of
`sfs backfill`, track them in MLflow, register and publish them.

Reads only `<backfill>/fraud.parquet` and `<backfill>/propensity.parquet`
(the contract: BACKFILL columns in training/README.md). For each model:

1. rows whose label is settled: a transaction at least the label maturity
   older than the label cutoff (`sfs.label_cutoff_ms - sfs.label_maturity_ms`),
   a view at least the label horizon before the end of the log; `pending`
   labels are dropped. Rows younger than that are dropped whatever their label,
   since there only frauds would be labelled. Rows of the first widest-window
   of the log (features over incomplete windows) are dropped too, when that
   leaves at least half;
2. a time split by event_time: train (oldest 70%), validation (next 15%),
   held-out test (newest 15%);
3. LightGBM with early stopping on validation PR-AUC;
4. ONNX export (onnxmltools), checked against LightGBM on the whole test set
   (max |diff| <= 1e-5), the model and the rule-based scores (`rules_score`)
   compared on the test set: ROC-AUC, PR-AUC, recall at 1% FPR;
5. decision thresholds chosen on the validation scores (THRESHOLD_RULES);
6. plots (ROC, PR, feature importance, score histograms, calibration),
   parameters, metrics and the ONNX model logged to MLflow; the model is
   registered under its name, and the registered version is published to
   `models/<name>/<version>/` (model.onnx, metadata.json, test_vectors.json),
   atomically (the server hot-reloads it).

The model inputs follow features.toml (read with tomllib): the server's
request-time features, then every card and user feature that is a quantity
(count, sum, mean, std, min, max, distinct_count) as `{entity}.{feature}` in
file order, then the cold-start flags (server/CONTEXT.md, "Feature vectors").

usage: python training/train.py --backfill .data/train/backfill [--models models]
       [--mlflow .data/mlflow] [--only fraud|propensity] [--seed 7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
# The cap (and cold-start value) of seconds_since_last_txn: server/src/features.rs.
MAX_SECONDS_SINCE_LAST_TXN = 86_400.0
# ONNX (float32 thresholds and sums) against LightGBM (double) on the test set.
ONNX_TOLERANCE = 1e-5

CARD, USER = "card", "user"
# Request roles ([request] of features.toml) bound to the card features they read.
ROLES = ("amount_mean", "amount_std", "last_time", "usual_country")
REQUEST = [
    "amount_log1p", "amount_to_mean_24h", "amount_zscore_24h", "country_mismatch",
    "seconds_since_last_txn", "channel_ecom", "channel_atm",
]
# Aggregations whose value is a quantity a model may take as is.
QUANTITIES = {"count", "sum", "mean", "std", "min", "max", "distinct_count"}

# How each decision threshold is chosen on the validation scores (a score at or
# above it gets the decision):
#   ("fpr", f): the lowest threshold whose false-positive rate is at most f;
#   ("precision", p, fallback_fpr): the lowest threshold (at or above the previous
#     one) whose precision is at least p with at least MIN_FLAGGED positives
#     flagged; when no threshold reaches p, the ("fpr", fallback_fpr) one.
THRESHOLD_RULES = {
    "fraud": ("approve", [("review", ("fpr", 0.01)), ("decline", ("precision", 0.9, 0.001))]),
    "propensity": ("low", [("medium", ("fpr", 0.10)), ("high", ("fpr", 0.01))]),
}
MIN_FLAGGED = 5
FPR_POINT = 0.01  # recall is reported at this false-positive rate


def parse_window(text: str) -> int:
    """A window such as 500ms, 10s, 5m, 1h, 30d in ms (validated in Rust)."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h|d)", text.strip())
    if not m:
        raise ValueError(f"bad window {text!r}")
    return int(m[1]) * {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": DAY_MS}[m[2]]


# ---------------------------------------------------------------------------
# The definitions.

@dataclass
class Definitions:
    entities: set[str]
    features: dict[str, list[tuple[str, str, int]]] = field(default_factory=dict)  # entity -> (name, agg, window)
    request: dict[str, str] = field(default_factory=dict)

    def model_inputs(self, entity: str) -> list[str]:
        """`entity.feature` of every quantity of `entity`, in file order."""
        return [f"{entity}.{name}" for name, agg, _ in self.features.get(entity, []) if agg in QUANTITIES]

    def widest_window_ms(self) -> int:
        return max((w for fs in self.features.values() for _, _, w in fs), default=0)


def load_definitions(path: Path) -> Definitions:
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    defs = Definitions(entities={e["name"] for e in doc.get("entities", [])}, request=dict(doc.get("request", {})))
    for f in doc.get("features", []):
        defs.features.setdefault(f["entity"], []).append((f["name"], f["aggregation"], parse_window(f["window"])))
    for entity in (CARD, USER):
        if entity not in defs.entities:
            raise SystemExit(f"{path}: no entity {entity}, which the scoring routes read")
    card = {name for name, _, _ in defs.features.get(CARD, [])}
    for role in ROLES:
        if defs.request.get(role) not in card:
            raise SystemExit(f"{path}: the request-time features need [request] {role} bound to a feature of entity {CARD}")
    return defs


def model_features(defs: Definitions, name: str) -> list[str]:
    if name == "fraud":
        return REQUEST + defs.model_inputs(CARD) + defs.model_inputs(USER) + [f"{CARD}_cold_start", f"{USER}_cold_start"]
    return defs.model_inputs(USER) + [f"{USER}_cold_start"]


# ---------------------------------------------------------------------------
# The backfill.

@dataclass
class Dataset:
    name: str
    path: Path
    meta: dict[str, str]
    x: np.ndarray          # float32 [rows, features], the model's input as served
    y: np.ndarray          # int8 labels
    t: np.ndarray          # event time, ms
    rules: np.ndarray      # rules_score
    ids: np.ndarray
    rows: dict[str, int]   # counts of what was kept and dropped


def iso(ms: int | float) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def read_backfill(path: Path, name: str, features: list[str], warmup_ms: int) -> Dataset:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not path.is_file():
        raise SystemExit(f"{path}: not found: run `sfs backfill --input <log> --out {path.parent}` first")
    table = pq.read_table(path)
    # The file's key-value metadata (and the Arrow schema's, if a writer put it there).
    kv = {**(table.schema.metadata or {}), **(pq.read_metadata(path).metadata or {})}
    meta = {k.decode(): v.decode() for k, v in kv.items() if k.startswith(b"sfs.")}
    if meta.get("sfs.kind") != name:
        raise SystemExit(f"{path}: metadata sfs.kind is {meta.get('sfs.kind')!r}, expected {name!r}")
    id_col = "txn_id" if name == "fraud" else "click_id"
    required = [id_col, "event_time", "label", "label_status", "rules_score"] + features
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise SystemExit(f"{path}: missing column(s) {', '.join(missing)} (features.toml differs from the backfill's? "
                         f"its feature set is {meta.get('sfs.feature_set_version')})")
    for key in ("sfs.feature_set_version", "sfs.log_end_ms", "sfs.label_cutoff_ms"):
        if key not in meta:
            raise SystemExit(f"{path}: metadata {key} missing")
    t = table["event_time"].cast(pa.int64()).to_numpy()
    if name == "fraud":
        settled = int(meta["sfs.label_cutoff_ms"]) - int(meta.get("sfs.label_maturity_ms", "0"))
    else:
        settled = int(meta["sfs.log_end_ms"]) - int(meta.get("sfs.label_horizon_ms", "0"))
    labelled = ~pc.is_null(table["label"]).to_numpy(zero_copy_only=False)
    mature = t <= settled
    rows = {"total": len(t), "pending": int((~labelled).sum()),
            "unsettled": int((labelled & ~mature).sum())}
    keep = labelled & mature
    start = int(t.min()) if len(t) else 0
    warm = t >= start + warmup_ms
    if (keep & warm).sum() >= 0.5 * keep.sum():
        rows["warmup"] = int((keep & ~warm).sum())
        keep &= warm
    else:
        rows["warmup"] = 0
        print(f"{name}: keeping the first {warmup_ms / 3_600_000:g}h (warm-up) rows: the log is too short to drop them",
              file=sys.stderr)
    idx = np.flatnonzero(keep)
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False)[idx] for c in features]).astype(np.float32)
    bad = ~np.isfinite(x).all(axis=0)
    if bad.any():
        raise SystemExit(f"{path}: non-finite values in {', '.join(np.array(features)[bad])}")
    y = table["label"].to_numpy(zero_copy_only=False)[idx].astype(np.int8)
    rows["used"] = len(idx)
    return Dataset(name, path, meta, x, y, t[idx], table["rules_score"].to_numpy()[idx].astype(np.float64),
                   table[id_col].to_numpy(zero_copy_only=False)[idx], rows)


def time_split(t: np.ndarray, valid_share: float, test_share: float):
    """Boolean masks train / validation / test by event time (ties stay together)."""
    t_valid = np.quantile(t, 1.0 - valid_share - test_share, method="lower")
    t_test = np.quantile(t, 1.0 - test_share, method="lower")
    train, test = t < t_valid, t >= t_test
    return train, ~train & ~test, test


# ---------------------------------------------------------------------------
# Metrics, thresholds, histograms.

def recall_at_fpr(y: np.ndarray, s: np.ndarray, fpr_max: float) -> float:
    from sklearn.metrics import roc_curve
    fpr, tpr, _ = roc_curve(y, s)
    return float(tpr[fpr <= fpr_max].max())


def metrics(y: np.ndarray, s: np.ndarray) -> dict:
    from sklearn.metrics import average_precision_score, roc_auc_score
    return {"roc_auc": float(roc_auc_score(y, s)), "pr_auc": float(average_precision_score(y, s)),
            "recall_at_1pct_fpr": recall_at_fpr(y, s, FPR_POINT)}


def at_threshold(y: np.ndarray, s: np.ndarray, thr: float) -> dict:
    flagged = s >= thr
    tp = int((flagged & (y == 1)).sum())
    return {"flagged_share": float(flagged.mean()), "precision": tp / max(int(flagged.sum()), 1),
            "recall": tp / max(int((y == 1).sum()), 1), "fpr": float((flagged & (y == 0)).sum() / max(int((y == 0).sum()), 1))}


def fpr_threshold(y: np.ndarray, s: np.ndarray, fpr_max: float) -> float:
    """The lowest score t with FPR(score >= t) <= fpr_max."""
    neg = np.sort(s[y == 0])[::-1]
    k = int(np.floor(fpr_max * len(neg)))  # at most k negatives may be flagged
    if k >= len(neg):
        return float(neg[-1])
    # Strictly above the (k+1)-th highest negative: the next float32 up.
    return float(np.nextafter(np.float32(neg[k]), np.float32(np.inf)))


def choose_thresholds(name: str, y: np.ndarray, s: np.ndarray) -> tuple[str, list[dict], list[dict]]:
    default, rules = THRESHOLD_RULES[name]
    out, doc, floor = [], [], 0.0
    for decision, rule in rules:
        how = rule[0]
        if rule[0] == "fpr":
            thr = fpr_threshold(y, s, rule[1])
        else:
            target, fallback = rule[1], rule[2]
            from sklearn.metrics import precision_recall_curve
            precision, recall, cands = precision_recall_curve(y, s)  # cands ascend; precision of s >= cand
            tp = np.round(recall[:-1] * int((y == 1).sum()))
            ok = np.flatnonzero((cands >= floor) & (precision[:-1] >= target) & (tp >= MIN_FLAGGED))
            thr = float(cands[ok[0]]) if len(ok) else None
            if thr is None:
                thr, how = fpr_threshold(y, s, fallback), f"fpr {fallback} (precision {target} not reached)"
        thr = min(max(thr, floor), 1.0)
        floor = thr
        out.append({"decision": decision, "min_score": thr})
        doc.append({"decision": decision, "rule": list(rule), "applied": how, "min_score": thr,
                    "validation": at_threshold(y, s, thr)})
    return default, out, doc


def histograms(x: np.ndarray, names: list[str], scores: np.ndarray, bins: int = 10) -> dict:
    """Reference histograms of each input and of the score over the training rows.

    `edges` ascend; bin i counts values in [edges[i], edges[i+1]), the last bin
    is closed. A column with at most `bins` distinct values gets one bin per
    value (edges = the values and one past the last); otherwise the edges are
    the deciles (deduplicated). Values outside [edges[0], edges[-1]] count into
    the first or last bin when comparing live traffic (PSI / Jensen-Shannon).
    """
    out = {}
    for i, name in enumerate(names + ["score"]):
        col = scores.astype(np.float64) if name == "score" else x[:, i].astype(np.float64)
        distinct = np.unique(col)
        if len(distinct) <= bins:
            edges = np.append(distinct, distinct[-1] + 1.0)
        else:
            edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)))
        counts, edges = np.histogram(col, bins=edges)
        out[name] = {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}
    return out


# ---------------------------------------------------------------------------
# Plots.

def plots(out: Path, name: str, y: np.ndarray, model: np.ndarray, rules: np.ndarray,
          importance: list[tuple[str, float]]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.calibration import calibration_curve
    from sklearn.metrics import precision_recall_curve, roc_curve

    out.mkdir(parents=True, exist_ok=True)
    files = []
    scores = {"LightGBM": model, "rules (rule-based-v1)": rules}

    def save(fig, file):
        fig.tight_layout()
        fig.savefig(out / file, dpi=110)
        plt.close(fig)
        files.append(out / file)

    fig, ax = plt.subplots(figsize=(6, 5))
    for label, s in scores.items():
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{label} (AUC {metrics(y, s)['roc_auc']:.3f})")
    ax.axvline(FPR_POINT, color="grey", ls=":", label="1% FPR")
    ax.plot([0, 1], [0, 1], color="lightgrey", ls="--")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{name}: ROC, held-out test")
    ax.legend(loc="lower right")
    save(fig, "roc.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    for label, s in scores.items():
        p, r, _ = precision_recall_curve(y, s)
        ax.plot(r, p, label=f"{label} (AP {metrics(y, s)['pr_auc']:.3f})")
    ax.axhline(y.mean(), color="lightgrey", ls="--", label=f"base rate {y.mean():.4f}")
    ax.set(xlabel="recall", ylabel="precision", title=f"{name}: precision-recall, held-out test")
    ax.legend(loc="upper right")
    save(fig, "pr.png")

    fig, ax = plt.subplots(figsize=(7, max(3, 0.28 * len(importance))))
    names, gains = zip(*importance)
    ax.barh(range(len(names)), gains)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="total gain", title=f"{name}: feature importance")
    save(fig, "feature_importance.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (label, s) in zip(axes, scores.items()):
        bins = np.linspace(min(s.min(), 0), max(s.max(), 1e-9), 40)
        for cls, color in ((0, "tab:blue"), (1, "tab:red")):
            ax.hist(s[y == cls], bins=bins, density=True, alpha=0.5, color=color, label=f"label {cls}")
        ax.set_yscale("log")
        ax.set(xlabel="score", ylabel="density", title=label)
        ax.legend()
    fig.suptitle(f"{name}: scores by class, held-out test")
    save(fig, "score_histograms.png")

    fig, ax = plt.subplots(figsize=(6, 5))
    for label, s in scores.items():
        frac, mean = calibration_curve(y, np.clip(s, 0, 1), n_bins=10, strategy="quantile")
        ax.plot(mean, frac, marker="o", label=label)
    ax.plot([0, 1], [0, 1], color="lightgrey", ls="--", label="perfect")
    ax.set(xlabel="mean predicted score", ylabel="observed positive rate",
           title=f"{name}: calibration, held-out test (decile bins)")
    ax.set_xscale("symlog", linthresh=1e-3)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.legend()
    save(fig, "calibration.png")
    return files


# ---------------------------------------------------------------------------
# Training, export, tracking, publication.

def lgb_params(seed: int, n_train: int) -> dict:
    return {
        "objective": "binary", "learning_rate": 0.1, "num_leaves": 31,
        "min_data_in_leaf": int(min(100, max(5, n_train // 200))),
        "feature_fraction": 0.9, "bagging_fraction": 0.8, "bagging_freq": 1, "lambda_l2": 1.0,
        "metric": ["average_precision", "auc"], "seed": seed, "deterministic": True,
        "force_row_wise": True, "num_threads": int(os.environ.get("TRAIN_THREADS", "2")), "verbose": -1,
    }


def newest_published(models: Path, name: str) -> int:
    versions = [int(p.name) for p in (models / name).glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0)


def write_atomically(final: Path, files: dict[str, bytes]) -> None:
    """The server polls the registry: a version folder must appear whole."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    tmp.chmod(0o755)
    for file, data in files.items():
        (tmp / file).write_bytes(data)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)


def train_one(name: str, args, defs: Definitions) -> dict:
    import lightgbm as lgb
    import mlflow
    import onnx
    import onnxmltools
    import onnxruntime as ort
    from mlflow.models import infer_signature
    from onnxmltools.convert.common.data_types import FloatTensorType
    from sklearn.metrics import brier_score_loss, log_loss

    t0 = time.time()
    features = model_features(defs, name)
    ds = read_backfill(args.backfill / f"{name}.parquet", name, features, defs.widest_window_ms())
    fsv = ds.meta["sfs.feature_set_version"]
    if args.feature_set_version and args.feature_set_version != fsv:
        raise SystemExit(f"{ds.path}: built from feature set {fsv}, not --feature-set-version {args.feature_set_version}")
    train, valid, test = time_split(ds.t, args.valid_share, args.test_share)
    parts = {"train": train, "validation": valid, "test": test}
    for part, mask in parts.items():
        n_pos = int(ds.y[mask].sum())
        if n_pos == 0 or n_pos == mask.sum():
            raise SystemExit(f"{name}: the {part} part ({int(mask.sum())} rows) has only one class: "
                             "generate a longer log or more users")
    print(f"{name}: {ds.rows['used']} labelled rows of {ds.rows['total']} "
          f"(train {train.sum()}, validation {valid.sum()}, test {test.sum()}; "
          f"positive rate {ds.y.mean():.4f}); training LightGBM", flush=True)

    params = lgb_params(args.seed, int(train.sum()))
    dtrain = lgb.Dataset(ds.x[train], ds.y[train], feature_name=[f.replace(".", "__") for f in features],
                         free_raw_data=False)
    dvalid = lgb.Dataset(ds.x[valid], ds.y[valid], reference=dtrain)
    evals: dict = {}
    booster = lgb.train(params, dtrain, num_boost_round=args.rounds, valid_sets=[dvalid], valid_names=["validation"],
                        callbacks=[lgb.early_stopping(50, first_metric_only=True, verbose=False),
                                   lgb.record_evaluation(evals), lgb.log_evaluation(0)])
    best = booster.best_iteration or booster.current_iteration()
    print(f"{name}: {best} rounds ({time.time() - t0:.0f}s); exporting to ONNX and evaluating", flush=True)
    booster = booster.model_from_string(booster.model_to_string(num_iteration=best))

    onx = onnxmltools.convert_lightgbm(booster, name=f"sfs-{name}",
                                       initial_types=[("features", FloatTensorType([None, len(features)]))],
                                       zipmap=False, target_opset=15)
    onnx.checker.check_model(onx)
    onnx_bytes = onx.SerializeToString()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    score = lambda x: sess.run(["probabilities"], {"features": x})[0][:, 1].astype(np.float64)
    s_valid, s_test, s_train = score(ds.x[valid]), score(ds.x[test]), score(ds.x[train])
    lgb_test = booster.predict(ds.x[test])
    diff = float(np.max(np.abs(lgb_test - s_test)))
    if diff > ONNX_TOLERANCE:
        raise SystemExit(f"{name}: ONNX and LightGBM differ by {diff:.3g} on the test set (> {ONNX_TOLERANCE})")

    y_test, y_valid = ds.y[test], ds.y[valid]
    test_metrics = {"model": metrics(y_test, s_test), "rules": metrics(y_test, ds.rules[test])}
    test_metrics["model"].update(log_loss=float(log_loss(y_test, np.clip(s_test, 1e-7, 1 - 1e-7))),
                                 brier=float(brier_score_loss(y_test, s_test)))
    valid_metrics = {"model": metrics(y_valid, s_valid), "rules": metrics(y_valid, ds.rules[valid])}
    default, thresholds, threshold_doc = choose_thresholds(name, y_valid, s_valid)
    for d in threshold_doc:
        d["test"] = at_threshold(y_test, s_test, d["min_score"])
    gains = booster.feature_importance(importance_type="gain")
    importance = sorted(zip(features, (float(g) for g in gains)), key=lambda p: -p[1])

    report = args.report / name
    if report.exists():
        shutil.rmtree(report)
    pngs = plots(report, name, y_test, s_test, ds.rules[test], importance)
    print(f"{name}: plots in {report} ({time.time() - t0:.0f}s); logging to MLflow", flush=True)

    # Test vectors for the Rust check: a sample of the test set (every
    # positive up to a quarter of it), its extremes, and a cold start.
    rng = np.random.default_rng(args.seed)
    test_idx = np.flatnonzero(test)
    pos = test_idx[ds.y[test_idx] == 1]
    k = min(args.test_vectors, len(test_idx))
    pick = rng.choice(pos, min(len(pos), k // 4), replace=False)
    rest = np.setdiff1d(test_idx, pick)
    pick = np.concatenate([pick, rng.choice(rest, min(len(rest), k - len(pick)), replace=False)])
    extremes = test_idx[[int(np.argmax(s_test)), int(np.argmin(s_test))]]
    vectors = np.vstack([ds.x[np.sort(pick)], ds.x[extremes]])
    cold = np.array([[{"amount_to_mean_24h": 1.0, "seconds_since_last_txn": MAX_SECONDS_SINCE_LAST_TXN,
                       "amount_log1p": float(np.log1p(5000.0))}.get(f, 1.0 if f.endswith("_cold_start") else 0.0)
                      for f in features]], dtype=np.float32)
    vectors = np.vstack([vectors, cold])
    vector_scores = score(vectors)
    vector_lgb = booster.predict(vectors)

    def span(mask):
        return [iso(ds.t[mask].min()), iso(ds.t[mask].max())]

    # MLflow: a run with the parameters, metrics, plots and the ONNX model, registered as `name`.
    args.mlflow.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(f"sqlite:///{(args.mlflow / 'mlflow.db').resolve()}")
    exp = mlflow.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else mlflow.create_experiment(
        name, artifact_location=(args.mlflow / "artifacts" / name).resolve().as_uri())
    with mlflow.start_run(experiment_id=exp_id, run_name=f"{name}-{fsv}") as run:
        mlflow.log_params({**{f"lgb.{k}": v for k, v in params.items()}, "rounds_max": args.rounds,
                           "best_iteration": best, "feature_set_version": fsv, "features": len(features),
                           "backfill": str(ds.path), "seed": args.seed, "valid_share": args.valid_share,
                           "test_share": args.test_share,
                           **{f"rows.{k}": v for k, v in ds.rows.items()},
                           **{f"rows.{p}": int(m.sum()) for p, m in parts.items()},
                           **{f"split.{p}": " .. ".join(span(m)) for p, m in parts.items()},
                           **{f"backfill.{k[4:]}": v for k, v in ds.meta.items()}})
        flat = {f"test.{who}.{k}": v for who, m in test_metrics.items() for k, v in m.items()}
        flat.update({f"validation.{who}.{k}": v for who, m in valid_metrics.items() for k, v in m.items()})
        flat.update({f"threshold.{d['decision']}": d["min_score"] for d in threshold_doc})
        flat["max_abs_diff_lightgbm_vs_onnx"] = diff
        mlflow.log_metrics(flat)
        for i, v in enumerate(evals["validation"]["average_precision"]):
            mlflow.log_metric("validation.pr_auc_by_round", v, step=i + 1)
        for png in pngs:
            mlflow.log_artifact(str(png), artifact_path="plots")
        info = mlflow.onnx.log_model(
            onx, name="model", registered_model_name=name,
            signature=infer_signature(vectors[:5], sess.run(["probabilities"], {"features": vectors[:5]})[0]),
            pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={ort.__version__}"])
        registered = int(info.registered_model_version)
        # Publish as the registered version, unless models/ already holds it
        # (a fresh tracking store next to a used registry): then the next free one.
        newest = newest_published(args.models, name)
        version = args.publish_version or (registered if registered > newest else newest + 1)
        training = {
            "algorithm": "LightGBM",
            "roc_auc": test_metrics["model"]["roc_auc"],
            "average_precision": test_metrics["model"]["pr_auc"],
            "recall_at_1pct_fpr": test_metrics["model"]["recall_at_1pct_fpr"],
            "rows_train": int(train.sum()), "rows_validation": int(valid.sum()), "rows_test": int(test.sum()),
            "positive_rate_test": float(y_test.mean()),
            "metrics": {"test": test_metrics, "validation": valid_metrics},
            "thresholds": threshold_doc,
            "threshold_rules": "fraud: review at 1% FPR, decline at 90% precision (else 0.1% FPR); "
                               "propensity: medium at 10% FPR, high at 1% FPR; chosen on validation scores",
            "split": {p: span(m) for p, m in parts.items()},
            "rows": ds.rows,
            "best_iteration": int(best),
            "params": params,
            "feature_importance_gain": dict(importance),
            "max_abs_diff_lightgbm_vs_onnx": diff,
            "data": f"sfs backfill point-in-time training set ({name}.parquet)",
            "backfill": ds.meta,
            "mlflow": {"experiment": name, "run_id": run.info.run_id, "registered_model": name,
                       "registered_version": registered},
            "versions": {"lightgbm": lgb.__version__, "onnxmltools": onnxmltools.__version__,
                         "onnx": onnx.__version__, "onnxruntime": ort.__version__, "mlflow": mlflow.__version__},
        }
        metadata = {
            "name": name, "version": version, "feature_set_version": fsv, "features": features,
            "input_name": "features", "output_name": "probabilities", "positive_class_index": 1,
            "default_decision": default, "thresholds": thresholds, "training": training,
            "reference_histograms": histograms(ds.x[train], features, s_train),
        }
        vectors_doc = {
            "model": name, "version": version, "onnxruntime": ort.__version__, "features": features,
            "vectors": [[float(v) for v in row] for row in vectors],
            "scores": [float(s) for s in vector_scores],
            "lightgbm_scores": [float(s) for s in vector_lgb],
        }
        files = {"model.onnx": onnx_bytes,
                 "metadata.json": (json.dumps(metadata, indent=1) + "\n").encode(),
                 "test_vectors.json": (json.dumps(vectors_doc) + "\n").encode()}
        for file in ("metadata.json", "test_vectors.json"):
            (report / file).write_bytes(files[file])
            mlflow.log_artifact(str(report / file), artifact_path="published")
        client = mlflow.MlflowClient()
        client.set_model_version_tag(name, str(registered), "published_version", str(version))
        client.set_model_version_tag(name, str(registered), "feature_set_version", fsv)
        final = args.models / name / str(version)
        write_atomically(final, files)
    m, r = test_metrics["model"], test_metrics["rules"]
    print(f"{name} v{version} (mlflow {name} v{registered}, {time.time() - t0:.0f}s): held-out "
          f"ROC-AUC {m['roc_auc']:.4f} vs rules {r['roc_auc']:.4f}, PR-AUC {m['pr_auc']:.4f} vs {r['pr_auc']:.4f}, "
          f"recall@1%FPR {m['recall_at_1pct_fpr']:.4f} vs {r['recall_at_1pct_fpr']:.4f}; "
          f"ONNX-LightGBM {diff:.1e} -> {final}", flush=True)
    return {"name": name, "version": version, "path": str(final), "test": test_metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: python training/train.py --backfill .data/train/backfill",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backfill", type=Path, required=True,
                        help="directory with fraud.parquet and propensity.parquet from `sfs backfill`")
    parser.add_argument("--features", type=Path, default=Path(os.environ.get("SFS_FEATURES", ROOT / "features.toml")),
                        help="feature definitions (default: $SFS_FEATURES, else features.toml)")
    parser.add_argument("--feature-set-version", help="refuse a backfill of another feature set (fs-...)")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="the model registry folder to publish to")
    parser.add_argument("--mlflow", type=Path, default=ROOT / ".data" / "mlflow",
                        help="MLflow tracking store: mlflow.db (SQLite) and artifacts/ in this directory")
    parser.add_argument("--report", type=Path, default=ROOT / ".data" / "train" / "report",
                        help="plots and the published metadata, per model")
    parser.add_argument("--only", choices=["fraud", "propensity"], help="train one model")
    parser.add_argument("--publish-version", type=int, help="publish as this version (default: the registered one)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=1000, help="most boosting rounds (early stopping on validation)")
    parser.add_argument("--valid-share", type=float, default=0.15)
    parser.add_argument("--test-share", type=float, default=0.15)
    parser.add_argument("--test-vectors", type=int, default=400, help="test rows written to test_vectors.json")
    args = parser.parse_args()
    if args.feature_set_version and not re.fullmatch(r"fs-[0-9a-f]{16}", args.feature_set_version):
        parser.error(f"--feature-set-version {args.feature_set_version!r} is not fs- and 16 hex digits")
    if not (0 < args.valid_share < 1 and 0 < args.test_share < 1 and args.valid_share + args.test_share < 0.9):
        parser.error("--valid-share and --test-share must be in (0, 1) and leave at least 10% to train on")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    defs = load_definitions(args.features)
    t0 = time.time()
    done = [train_one(n, args, defs) for n in (["fraud", "propensity"] if args.only is None else [args.only])]
    print("trained " + ", ".join(f"{d['name']} v{d['version']}" for d in done)
          + f" on {args.backfill} in {time.time() - t0:.0f}s; MLflow store {args.mlflow}")


if __name__ == "__main__":
    main()
