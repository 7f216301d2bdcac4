//! The model registry folder, `{dir}/{name}/{version}/` with `model.onnx` and
//! `metadata.json`, and the active model of each kind, swapped atomically when
//! a newer version appears. A version folder must appear whole (write it under
//! a dot-name and rename it); a version that fails to load is skipped, logged
//! and retried only when its files change.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use schemas::features::FeatureSet;

use super::onnx::{init_runtime, OnnxEngine};
use super::{now_ms, Engine, Metadata, Model, ModelError, ModelKind};
use crate::drift::{DriftConfig, Window};
use crate::metrics::Metrics;

/// The active model of one kind.
pub struct Slot {
    pub kind: ModelKind,
    current: ArcSwap<Model>,
    /// The version that last failed to load and its files' modification time.
    failed: Mutex<Option<(u32, SystemTime, String)>>,
}

impl Slot {
    /// The model to score with; a request keeps its `Arc` while a reload swaps.
    pub fn get(&self) -> Arc<Model> {
        self.current.load_full()
    }

    /// The last load error, if the newest version could not be loaded.
    pub fn last_error(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|f| f.2.clone())
    }
}

/// The registry and one slot per model kind.
pub struct Registry {
    dir: PathBuf,
    features: Arc<FeatureSet>,
    sessions: usize,
    ort_path: Option<PathBuf>,
    slots: Vec<Slot>,
    drift: DriftConfig,
}

/// The newest complete version folder of `name`: (version, folder, newest mtime).
fn newest(dir: &Path, name: &str) -> Option<(u32, PathBuf, SystemTime)> {
    let entries = std::fs::read_dir(dir.join(name)).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let path = e.path();
            let mtime = ["model.onnx", "metadata.json"]
                .iter()
                .map(|f| std::fs::metadata(path.join(f)).and_then(|m| m.modified()))
                .collect::<Result<Vec<_>, _>>()
                .ok()?
                .into_iter()
                .max()?;
            (version > 0).then_some((version, path, mtime))
        })
        .max_by_key(|(v, _, _)| *v)
}

/// Loads one registry version; its inputs must resolve against `features`,
/// the feature set the server reads, and it must have been trained on it.
/// Drift detection with the default window.
pub fn load_version(
    kind: ModelKind,
    dir: &Path,
    features: &FeatureSet,
    sessions: usize,
    ort_path: Option<&Path>,
) -> Result<Model, ModelError> {
    load_version_with(
        kind,
        dir,
        features,
        sessions,
        ort_path,
        &DriftConfig::default(),
    )
}

/// [`load_version`] with drift detection configured by `drift`. Reference
/// histograms that cannot be used are logged and skipped, never an error.
pub fn load_version_with(
    kind: ModelKind,
    dir: &Path,
    features: &FeatureSet,
    sessions: usize,
    ort_path: Option<&Path>,
    drift: &DriftConfig,
) -> Result<Model, ModelError> {
    let invalid = |problem: String| ModelError::Invalid {
        path: dir.display().to_string(),
        problem,
    };
    let meta_path = dir.join("metadata.json");
    let text =
        std::fs::read_to_string(&meta_path).map_err(|e| invalid(format!("metadata.json: {e}")))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("metadata.json: {e}")))?;
    if let Some(v) = doc.get("feature_set_version").filter(|v| !v.is_string()) {
        return Err(invalid(format!(
            "metadata.json: feature_set_version {v} is not a feature-set version string (fs-...): \
             retrain on {} with `make train`",
            features.version
        )));
    }
    let meta: Metadata =
        serde_json::from_value(doc).map_err(|e| invalid(format!("metadata.json: {e}")))?;
    let folder_version = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse::<u32>().ok());
    if meta.name != kind.name() || Some(meta.version) != folder_version {
        return Err(invalid(format!(
            "metadata names {} v{}, not this folder",
            meta.name, meta.version
        )));
    }
    let plan = kind.plan(&meta.features, features).map_err(invalid)?;
    if meta.feature_set_version != features.version {
        return Err(invalid(format!(
            "trained on feature-set version {}, the server reads {}: retrain with `make train` \
             (sfs backfill, then training/train.py)",
            meta.feature_set_version, features.version
        )));
    }
    let ascending = meta
        .thresholds
        .windows(2)
        .all(|w| w[0].min_score <= w[1].min_score);
    if !ascending
        || meta
            .thresholds
            .iter()
            .any(|t| !(0.0..=1.0).contains(&t.min_score))
    {
        return Err(invalid("thresholds must ascend within [0, 1]".into()));
    }
    init_runtime(ort_path)?;
    let engine = OnnxEngine::load(&dir.join("model.onnx"), &meta, sessions)?;
    let (window, problems) =
        Window::from_metadata(&meta.features, &meta.reference_histograms, drift);
    for problem in &problems {
        tracing::warn!(model = kind.name(), version = meta.version, problem = %problem,
            "reference histogram unusable, no drift gauges for it");
    }
    if let Some(w) = &window {
        tracing::info!(
            model = kind.name(),
            version = meta.version,
            features = w.features().count(),
            inputs = meta.features.len(),
            "drift detection on"
        );
    }
    Ok(Model {
        kind,
        version: meta.version,
        label: format!("{}-v{}", meta.name, meta.version),
        features: meta.features,
        plan,
        default_decision: meta.default_decision,
        thresholds: meta.thresholds,
        path: Some(dir.to_path_buf()),
        training: meta.training,
        loaded_at_ms: now_ms(),
        engine: Engine::Onnx(engine),
        drift: window,
    })
}

impl Registry {
    /// Loads the newest version of every model, or its rule-based fallback
    /// when the registry has none. A version that exists but does not load is
    /// an error here (a misconfigured start), unlike during hot reload.
    pub fn open(
        dir: &Path,
        features: Arc<FeatureSet>,
        sessions: usize,
        ort_path: Option<&Path>,
        metrics: &Metrics,
    ) -> Result<Registry, ModelError> {
        Registry::open_with_drift(
            dir,
            features,
            sessions,
            ort_path,
            metrics,
            DriftConfig::default(),
        )
    }

    /// [`Registry::open`] with drift detection configured by `drift`.
    pub fn open_with_drift(
        dir: &Path,
        features: Arc<FeatureSet>,
        sessions: usize,
        ort_path: Option<&Path>,
        metrics: &Metrics,
        drift: DriftConfig,
    ) -> Result<Registry, ModelError> {
        let mut slots = Vec::new();
        for kind in ModelKind::ALL {
            let model = match newest(dir, kind.name()) {
                Some((_, path, _)) => {
                    load_version_with(kind, &path, &features, sessions, ort_path, &drift)?
                }
                None => {
                    tracing::warn!(model = kind.name(), dir = %dir.display(), "no model in the registry, using rules");
                    Model::rules(kind, &features)?
                }
            };
            tracing::info!(model = kind.name(), version = %model.label, "model active");
            metrics.active_model(kind.name(), model.engine_name(), model.version);
            slots.push(Slot {
                kind,
                current: ArcSwap::from_pointee(model),
                failed: Mutex::new(None),
            });
        }
        Ok(Registry {
            dir: dir.to_path_buf(),
            features,
            sessions,
            ort_path: ort_path.map(Path::to_path_buf),
            slots,
            drift,
        })
    }

    /// The drift window settings of the models it loads.
    pub fn drift_config(&self) -> DriftConfig {
        self.drift
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn slot(&self, kind: ModelKind) -> &Slot {
        self.slots
            .iter()
            .find(|s| s.kind == kind)
            .expect("open creates a slot per kind")
    }

    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Loads and activates any version newer than the active one. Blocking
    /// (file reads, session creation): run it off the request threads.
    /// Returns the kinds that changed.
    pub fn poll(&self, metrics: &Metrics) -> Vec<ModelKind> {
        let mut changed = Vec::new();
        for slot in &self.slots {
            let Some((version, path, mtime)) = newest(&self.dir, slot.kind.name()) else {
                continue;
            };
            if version <= slot.get().version {
                continue;
            }
            let mut failed = slot.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed
                .as_ref()
                .is_some_and(|(v, t, _)| *v == version && *t == mtime)
            {
                continue;
            }
            match load_version_with(
                slot.kind,
                &path,
                &self.features,
                self.sessions,
                self.ort_path.as_deref(),
                &self.drift,
            ) {
                Ok(model) => {
                    tracing::info!(model = slot.kind.name(), version = %model.label, "hot-reloaded model");
                    metrics.reload(slot.kind.name(), "ok");
                    metrics.active_model(slot.kind.name(), model.engine_name(), model.version);
                    slot.current.store(Arc::new(model));
                    *failed = None;
                    changed.push(slot.kind);
                }
                Err(e) => {
                    tracing::error!(model = slot.kind.name(), version, error = %e, "new model version failed to load, keeping the active one");
                    metrics.reload(slot.kind.name(), "error");
                    *failed = Some((version, mtime, e.to_string()));
                }
            }
        }
        changed
    }
}
