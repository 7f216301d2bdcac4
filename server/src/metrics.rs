//! The server's Prometheus metrics, registered once; every label set is bounded.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::breaker::BreakerState;

/// The routes, as a bounded label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Route {
    score_fraud,
    score_propensity,
    features,
    health,
    ready,
    metrics,
    models,
    /// The status page and its JSON.
    status,
    get_online_features,
    other,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    pub status: u16,
}

/// How a Redis call ended.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RedisOutcome {
    ok,
    error,
    timeout,
    /// Not sent: the circuit breaker is open.
    rejected,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedisLabels {
    pub outcome: RedisOutcome,
}

/// Which model (name) and kind (onnx or rules) scored.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: &'static str,
    pub kind: &'static str,
}

/// An entity of the feature set (a handful: the label set stays bounded).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EntityLabels {
    pub entity: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub model: &'static str,
    pub outcome: &'static str,
}

/// A model input watched for drift (the model's inputs: a bounded set).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftLabels {
    pub model: &'static str,
    pub feature: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriftModelLabels {
    pub model: &'static str,
}

type FloatGauge = Gauge<f64, AtomicU64>;

type Hist<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.00005, 2.0, 16))
}

fn score_histogram() -> Histogram {
    Histogram::new(linear_buckets(0.05, 0.05, 20))
}

/// All metrics of the server.
pub struct Metrics {
    pub registry: Registry,
    requests: Hist<RequestLabels>,
    redis: Hist<RedisLabels>,
    model: Hist<ModelLabels>,
    scores: Hist<ModelLabels>,
    cold_starts: Family<EntityLabels, Counter>,
    breaker_state: Gauge,
    breaker_transitions: Counter,
    reloads: Family<ReloadLabels, Counter>,
    model_version: Family<ModelLabels, Gauge>,
    drift_psi: Family<DriftLabels, FloatGauge>,
    drift_js: Family<DriftLabels, FloatGauge>,
    drift_samples: Family<DriftModelLabels, Gauge>,
    /// The features each model's PSI / JS gauges were last set for.
    drift_reported: Mutex<HashMap<&'static str, Vec<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sfs_serve");
        let requests: Hist<RequestLabels> = Family::new_with_constructor(latency_histogram);
        let redis: Hist<RedisLabels> = Family::new_with_constructor(latency_histogram);
        let model: Hist<ModelLabels> = Family::new_with_constructor(latency_histogram);
        let scores: Hist<ModelLabels> = Family::new_with_constructor(score_histogram);
        let cold_starts = Family::<EntityLabels, Counter>::default();
        let breaker_state = Gauge::default();
        let breaker_transitions = Counter::default();
        let reloads = Family::<ReloadLabels, Counter>::default();
        let model_version = Family::<ModelLabels, Gauge>::default();
        let drift_psi = Family::<DriftLabels, FloatGauge>::default();
        let drift_js = Family::<DriftLabels, FloatGauge>::default();
        let drift_samples = Family::<DriftModelLabels, Gauge>::default();
        registry.register(
            "request_duration_seconds",
            "HTTP request latency by route and status",
            requests.clone(),
        );
        registry.register(
            "redis_duration_seconds",
            "Redis round-trip latency by outcome",
            redis.clone(),
        );
        registry.register(
            "model_duration_seconds",
            "Model inference latency",
            model.clone(),
        );
        registry.register(
            "score",
            "Distribution of the scores returned",
            scores.clone(),
        );
        registry.register(
            "cold_starts",
            "Requests scored with cold-start defaults, by entity",
            cold_starts.clone(),
        );
        registry.register(
            "breaker_state",
            "Redis circuit breaker: 0 closed, 1 half-open, 2 open",
            breaker_state.clone(),
        );
        registry.register(
            "breaker_transitions",
            "Changes of the breaker state",
            breaker_transitions.clone(),
        );
        registry.register(
            "model_reloads",
            "Model loads from the registry by outcome",
            reloads.clone(),
        );
        registry.register(
            "model_version",
            "Version of the active model (0: rule-based fallback)",
            model_version.clone(),
        );
        registry.register(
            "feature_drift_psi",
            "Population stability index of a model input's served values over the drift window \
             against the model's reference histogram (natural log, empty buckets at 1e-4)",
            drift_psi.clone(),
        );
        registry.register(
            "feature_drift_js",
            "Jensen-Shannon divergence (log2, 0..1) of a model input's served values over the \
             drift window against the model's reference histogram",
            drift_js.clone(),
        );
        registry.register(
            "drift_window_samples",
            "Requests scored by the active model within the drift window",
            drift_samples.clone(),
        );
        Metrics {
            registry,
            requests,
            redis,
            model,
            scores,
            cold_starts,
            breaker_state,
            breaker_transitions,
            reloads,
            model_version,
            drift_psi,
            drift_js,
            drift_samples,
            drift_reported: Mutex::new(HashMap::new()),
        }
    }

    pub fn request(&self, route: Route, status: u16, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, status })
            .observe(elapsed.as_secs_f64());
    }

    pub fn redis(&self, outcome: RedisOutcome, elapsed: Duration) {
        self.redis
            .get_or_create(&RedisLabels { outcome })
            .observe(elapsed.as_secs_f64());
    }

    pub fn scored(&self, model: &'static str, kind: &'static str, score: f32, elapsed: Duration) {
        let labels = ModelLabels { model, kind };
        self.model
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        self.scores.get_or_create(&labels).observe(f64::from(score));
    }

    /// The cold-start counter of an entity, created once per entity at
    /// start-up so that counting allocates nothing.
    pub fn cold_start_counter(&self, entity: &str) -> Counter {
        self.cold_starts
            .get_or_create(&EntityLabels {
                entity: entity.to_owned(),
            })
            .clone()
    }

    pub fn breaker(&self, state: BreakerState) {
        self.breaker_state.set(state as i64);
        self.breaker_transitions.inc();
    }

    pub fn reload(&self, model: &'static str, outcome: &'static str) {
        self.reloads
            .get_or_create(&ReloadLabels { model, outcome })
            .inc();
    }

    pub fn active_model(&self, model: &'static str, kind: &'static str, version: u32) {
        for k in ["onnx", "rules"] {
            let gauge = self
                .model_version
                .get_or_create(&ModelLabels { model, kind: k });
            gauge.set(if k == kind { i64::from(version) } else { -1 });
        }
    }

    /// Publishes the drift of `model`'s active version: without a window
    /// (no reference histograms) no drift series at all; with fewer than
    /// `min_samples` requests in the window only the sample count (PSI and
    /// JS of a few values would mislead). Series of features no longer
    /// reported are removed.
    pub fn drift(
        &self,
        model: &'static str,
        snapshot: Option<&crate::drift::Snapshot>,
        min_samples: u64,
    ) {
        let labels = |feature: &str| DriftLabels {
            model,
            feature: feature.to_owned(),
        };
        let mut now = Vec::new();
        match snapshot {
            Some(s) => {
                self.drift_samples
                    .get_or_create(&DriftModelLabels { model })
                    .set(s.samples as i64);
                if s.samples >= min_samples.max(1) {
                    for f in &s.features {
                        let l = labels(&f.feature);
                        self.drift_psi.get_or_create(&l).set(f.psi);
                        self.drift_js.get_or_create(&l).set(f.js);
                        now.push(f.feature.clone());
                    }
                }
            }
            None => {
                self.drift_samples.remove(&DriftModelLabels { model });
            }
        }
        let mut reported = self
            .drift_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let before = reported.insert(model, now.clone()).unwrap_or_default();
        for gone in before.iter().filter(|f| !now.contains(f)) {
            self.drift_psi.remove(&labels(gone));
            self.drift_js.remove(&labels(gone));
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("encoding into a String");
        out
    }
}
