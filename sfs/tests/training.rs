//! `make train` end to end at a tiny scale: `infra/train.sh` generates a
//! two-day log, backfills it with `sfs backfill`, trains both models with
//! training/train.py (LightGBM), registers them in a fresh MLflow store and
//! publishes them to a temporary registry folder. The published models must be
//! complete, ONNX must match LightGBM, Rust must match Python, and the server
//! must load them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use schemas::features::{Aggregation, FeatureSet};
use serde_json::Value;
use server::metrics::Metrics;
use server::model::registry::{load_version, Registry};
use server::model::ModelKind;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn num(doc: &Value, path: &[&str]) -> f64 {
    let mut v = doc;
    for p in path {
        v = &v[*p];
    }
    v.as_f64()
        .unwrap_or_else(|| panic!("metadata {} is not a number: {v}", path.join(".")))
}

/// The inputs a model must take, from the definitions: every card / user
/// feature whose value is a quantity (not a time or a code).
fn quantity_features(set: &FeatureSet, entity: &str) -> Vec<String> {
    let e = set
        .entities
        .iter()
        .find(|e| e.name == entity)
        .unwrap_or_else(|| panic!("no entity {entity}"));
    e.features
        .iter()
        .filter(|f| {
            !matches!(
                f.aggregation,
                Aggregation::LastTime | Aggregation::Last | Aggregation::Mode
            )
        })
        .map(|f| format!("{entity}.{}", f.name))
        .collect()
}

#[test]
fn make_train_publishes_models_the_server_loads() {
    let root = workspace();
    let tmp = std::env::temp_dir().join(format!("sfs-train-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let models = tmp.join("models");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(root.join("infra/train.sh"))
        .arg("run")
        .current_dir(&root)
        .env("SFS_BIN", env!("CARGO_BIN_EXE_sfs"))
        .env("TRAIN_DAYS", "2")
        .env("TRAIN_USERS", "1000")
        .env("TRAIN_SIM_RATE", "0.4")
        .env("TRAIN_FRAUD_RATE", "0.05")
        .env("TRAIN_LABEL_DELAY", "2h")
        .env("TRAIN_LABEL_MATURITY", "12h")
        .env("TRAIN_DIR", tmp.join("train"))
        .env("TRAIN_MODELS", &models)
        .env("MLFLOW_DIR", tmp.join("mlflow"))
        .env("TRAIN_THREADS", "1")
        .output()
        .unwrap();
    let log = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "infra/train.sh failed:\n{log}");
    // Wall time depends on the machine's load: reported, not asserted.
    eprintln!("the tiny pipeline took {:?}", started.elapsed());
    assert!(tmp.join("mlflow/mlflow.db").is_file(), "no MLflow store");

    let set = FeatureSet::load(root.join("features.toml")).unwrap();
    for kind in ModelKind::ALL {
        let dir = models.join(kind.name()).join("1");
        for file in ["model.onnx", "metadata.json", "test_vectors.json"] {
            assert!(
                dir.join(file).is_file(),
                "{} missing:\n{log}",
                dir.join(file).display()
            );
        }
        let meta: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("metadata.json")).unwrap())
                .unwrap();
        assert_eq!(meta["name"], kind.name());
        assert_eq!(meta["version"], 1);
        assert_eq!(meta["feature_set_version"], set.version.as_str());
        let features: Vec<String> = serde_json::from_value(meta["features"].clone()).unwrap();
        let mut want = Vec::new();
        for entity in kind.entities() {
            want.extend(quantity_features(&set, entity));
        }
        for f in &want {
            assert!(
                features.contains(f),
                "{}: quantity {f} is not an input",
                kind.name()
            );
        }
        for entity in kind.entities() {
            assert!(features.contains(&format!("{entity}_cold_start")));
        }
        // Thresholds: ascending, in [0, 1], each documented with its rule.
        let thresholds = meta["thresholds"].as_array().unwrap();
        assert_eq!(thresholds.len(), 2);
        assert!(num(&thresholds[0], &["min_score"]) <= num(&thresholds[1], &["min_score"]));
        for t in thresholds {
            assert!((0.0..=1.0).contains(&num(t, &["min_score"])));
        }
        assert_eq!(meta["training"]["thresholds"].as_array().unwrap().len(), 2);
        // Model and rules on the held-out part.
        for who in ["model", "rules"] {
            for m in ["roc_auc", "pr_auc", "recall_at_1pct_fpr"] {
                let v = num(&meta, &["training", "metrics", "test", who, m]);
                assert!((0.0..=1.0).contains(&v), "{who} {m} = {v}");
            }
        }
        assert!(num(&meta, &["training", "rows_test"]) > 0.0);
        assert!(num(&meta, &["training", "max_abs_diff_lightgbm_vs_onnx"]) <= 1e-5);
        assert_eq!(meta["training"]["mlflow"]["registered_version"], 1);
        // The split is by time: train ends before validation, validation before test.
        let split = &meta["training"]["split"];
        assert!(split["train"][1].as_str() <= split["validation"][0].as_str());
        assert!(split["validation"][1].as_str() <= split["test"][0].as_str());
        // A reference histogram per input and the score, over the training rows.
        let rows_train = num(&meta, &["training", "rows_train"]) as u64;
        for name in features.iter().map(String::as_str).chain(["score"]) {
            let h = &meta["reference_histograms"][name];
            let edges = h["edges"]
                .as_array()
                .unwrap_or_else(|| panic!("no histogram of {name}"));
            let counts = h["counts"].as_array().unwrap();
            assert_eq!(edges.len(), counts.len() + 1, "{name}");
            let total: u64 = counts.iter().map(|c| c.as_u64().unwrap()).sum();
            assert_eq!(total, rows_train, "{name}");
        }

        // Rust (ort) against Python (onnxruntime) and LightGBM on the test vectors.
        let model = load_version(kind, &dir, &set, 1, None)
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        let doc: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("test_vectors.json")).unwrap())
                .unwrap();
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 20);
        for (i, x) in vectors.iter().enumerate() {
            let x: Vec<f32> = x
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let rust = f64::from(model.score(&x).unwrap());
            let onnx = doc["scores"][i].as_f64().unwrap();
            let lgb = doc["lightgbm_scores"][i].as_f64().unwrap();
            assert!(
                (rust - onnx).abs() <= 1e-5,
                "{}: rust {rust} vs python {onnx}",
                kind.name()
            );
            assert!(
                (rust - lgb).abs() <= 1e-5,
                "{}: rust {rust} vs lightgbm {lgb}",
                kind.name()
            );
        }
    }
    // The server opens the registry with both models active.
    let registry = Registry::open(&models, set.into(), 1, None, &Metrics::new()).unwrap();
    for kind in ModelKind::ALL {
        assert_eq!(
            registry.slot(kind).get().label,
            format!("{}-v1", kind.name())
        );
    }
    std::fs::remove_dir_all(&tmp).unwrap();
}
