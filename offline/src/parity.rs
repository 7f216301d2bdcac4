//! `sfs parity`: online/offline parity of served feature vectors.
//!
//! Each record of the served-vector log (`scores.log`, written by `sfs serve`)
//! says which rows a request read and the time each was exact as of. The
//! rows are recomputed from the event log as of those times by the backfill's
//! own path ([`crate::asof`]: the feature graph and a point-in-time join),
//! the model inputs by the server's code ([`server::features`]), and each
//! input is compared with the value that was served.
//!
//! Per model and input:
//! - mismatch: the served and recomputed values differ (bit for bit, f32);
//! - missing: the row behind the input was present on one side only (a
//!   served cold start the log says had a row, or the reverse);
//! - SMAPE: the mean over records of `|s - r| / ((|s| + |r|) / 2)`, in
//!   percent (0 when both are 0).
//!
//! A record is unverifiable (counted, with the reason) when it was served
//! under another feature-set version, names an input the definitions cannot
//! compute, or has no time to recompute a cold-start entity at (no frontier).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use std::sync::atomic::AtomicU64;

use dataflow::GraphConfig;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use schemas::features::FeatureRow;
use schemas::score::ScoreRecord;
use schemas::{Channel, FeatureSet, Key};
use serde::Serialize;
use server::features::{resolve, Context, Source, TxnContext};

use crate::asof::{feed_position, rows_as_of, Lookup};
use crate::keys::{KeyIds, Replayed};
use crate::log::EventLog;

/// Mismatches kept as examples in the report.
const EXAMPLES: usize = 20;

/// Parity of one model input.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FeatureParity {
    pub model: String,
    pub feature: String,
    /// Records checked that carry this input.
    pub checked: u64,
    pub mismatched: u64,
    pub missing: u64,
    /// The sum of per-record SMAPE terms (percent); see `smape`.
    #[serde(skip)]
    smape_sum: f64,
    pub mismatch_rate: f64,
    pub missing_rate: f64,
    /// Mean symmetric absolute percentage error, percent.
    pub smape: f64,
}

/// One input that differed.
#[derive(Debug, Clone, Serialize)]
pub struct Mismatch {
    pub request_id: String,
    pub model: String,
    pub feature: String,
    pub served: f32,
    pub recomputed: f32,
}

/// Parity of one model's vectors.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModelParity {
    pub model: String,
    pub checked: u64,
    /// Vectors equal to the recomputed one in every input.
    pub identical: u64,
    pub identical_rate: f64,
}

/// What `sfs parity` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Score records read.
    pub records: u64,
    /// Records whose vectors were recomputed and compared.
    pub checked: u64,
    /// Of those, vectors identical in every input.
    pub identical: u64,
    pub identical_rate: f64,
    /// Records that could not be checked, by reason.
    pub unverifiable: BTreeMap<String, u64>,
    pub models: Vec<ModelParity>,
    pub features: Vec<FeatureParity>,
    /// Up to 20 differing inputs, the earliest first.
    pub examples: Vec<Mismatch>,
    /// Events replayed.
    pub events: u64,
    pub elapsed_secs: f64,
}

/// A model's inputs, resolved against the feature definitions.
type Plan = Arc<Vec<Source>>;

/// A record ready to check: its inputs resolved, its lookups made.
struct Pending {
    record: usize,
    sources: Plan,
    /// (entity index, served row present) per entity read.
    served: Vec<(usize, bool)>,
    rows: Vec<Option<FeatureRow>>,
    /// Lookups still unanswered.
    waiting: usize,
}

fn channel(name: &str) -> Option<Channel> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).ok()
}

/// The SMAPE term of one pair, percent.
pub fn smape_term(served: f64, recomputed: f64) -> f64 {
    let scale = (served.abs() + recomputed.abs()) / 2.0;
    if served == recomputed || scale == 0.0 {
        0.0
    } else {
        100.0 * (served - recomputed).abs() / scale
    }
}

fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()) || (a == 0.0 && b == 0.0)
}

/// Checks `records` against the rows recomputed from `log`.
pub fn check(
    records: &[ScoreRecord],
    log: EventLog,
    set: Arc<FeatureSet>,
    tick_ms: u64,
    workers: usize,
    progress: bool,
) -> anyhow::Result<Report> {
    let started = Instant::now();
    let graph = GraphConfig { tick_ms };
    graph
        .validate(&set)
        .map_err(|e| anyhow::anyhow!("--tick-ms {tick_ms}: {e}"))?;
    let mut report = Report {
        records: records.len() as u64,
        events: log.events.len() as u64,
        ..Report::default()
    };
    let mut skip = |reason: &str| *report.unverifiable.entry(reason.to_owned()).or_default() += 1;

    // Resolve each model version's inputs once.
    let mut plans: HashMap<(String, Vec<String>), Option<Plan>> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    let mut asks: Vec<(u64, usize, u8, Key)> = Vec::new();
    for (i, r) in records.iter().enumerate() {
        if r.feature_set_version != set.version {
            skip("served under another feature-set version");
            continue;
        }
        let names: Vec<String> = r.features.iter().map(|f| f.name.clone()).collect();
        let plan = plans
            .entry((r.model.clone(), names))
            .or_insert_with_key(|(_, names)| {
                names
                    .iter()
                    .map(|n| resolve(n, &set).ok())
                    .collect::<Option<Vec<_>>>()
                    .map(Arc::new)
            })
            .clone();
        let Some(sources) = plan else {
            skip("an input the feature definitions cannot compute");
            continue;
        };
        let mut served = Vec::new();
        let mut times = Vec::new();
        for e in &r.entities {
            let Some(entity) = set.entity_index(&e.entity) else {
                break;
            };
            let Some(at) = e.as_of_ms.or(r.frontier_ms) else {
                break;
            };
            served.push((entity, e.as_of_ms.is_some()));
            times.push((at.max(0) as u64, entity as u8, Key::from(e.id.as_str())));
        }
        if served.len() != r.entities.len() {
            skip("an entity read with no time to recompute it at");
            continue;
        }
        let p = pending.len();
        for (at, entity, id) in times {
            asks.push((at, p, entity, id));
        }
        pending.push(Pending {
            record: i,
            sources,
            served,
            rows: vec![None; set.entities.len()],
            waiting: r.entities.len(),
        });
    }

    // One lookup per row read, by time.
    asks.sort_by_key(|(at, p, _, _)| (*at, *p));
    let owners: Vec<usize> = asks.iter().map(|(_, p, _, _)| *p).collect();
    let mut keys = KeyIds::build(&log, &set);
    let lookups: Vec<Lookup> = asks
        .into_iter()
        .map(|(at, _, entity, id)| Lookup {
            as_of: at,
            feed_at: feed_position(&log, &graph, at),
            keys: smallvec::smallvec![(entity, keys.id(entity, &id))],
        })
        .collect();

    let mut stats: BTreeMap<(String, usize), FeatureParity> = BTreeMap::new();
    let mut models: BTreeMap<String, ModelParity> = BTreeMap::new();
    // Records with no entity to look up are complete already.
    let mut finish = |p: &mut Pending, report: &mut Report| {
        let r = &records[p.record];
        let context = Context {
            rows: std::mem::take(&mut p.rows),
            frontier_ms: r.frontier_ms,
            txn: TxnContext {
                amount_minor: r.amount_minor,
                country: r.country.clone(),
                channel: r.channel.as_deref().and_then(channel),
                time_ms: r.event_time_ms,
            },
        };
        let mut identical = true;
        for (k, (served, source)) in r.features.iter().zip(p.sources.iter()).enumerate() {
            let recomputed = context.value(*source) as f32;
            let s = stats
                .entry((r.model.clone(), k))
                .or_insert_with(|| FeatureParity {
                    model: r.model.clone(),
                    feature: served.name.clone(),
                    ..FeatureParity::default()
                });
            s.checked += 1;
            if let Some(entity) = source.entity() {
                let online = p.served.iter().any(|&(e, present)| e == entity && present);
                if online != context.row(entity).is_some() {
                    s.missing += 1;
                }
            }
            if !same(served.value, recomputed) {
                s.mismatched += 1;
                identical = false;
                if report.examples.len() < EXAMPLES {
                    report.examples.push(Mismatch {
                        request_id: r.request_id.clone(),
                        model: r.model.clone(),
                        feature: served.name.clone(),
                        served: served.value,
                        recomputed,
                    });
                }
            }
            s.smape_sum += smape_term(f64::from(served.value), f64::from(recomputed));
        }
        let m = models
            .entry(r.model.clone())
            .or_insert_with(|| ModelParity {
                model: r.model.clone(),
                ..ModelParity::default()
            });
        m.checked += 1;
        report.checked += 1;
        if identical {
            m.identical += 1;
            report.identical += 1;
        }
    };
    for p in pending.iter_mut().filter(|p| p.waiting == 0) {
        finish(p, &mut report);
    }
    let bar = if progress {
        let bar = indicatif::ProgressBar::new(lookups.len() as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "parity {bar:40} {pos}/{len} rows recomputed {per_sec} eta {eta}",
            )
            .expect("template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    let lookups = Arc::new(lookups);
    let asked = Arc::clone(&lookups);
    let replay = Replayed {
        log: Arc::new(log),
        keys: Arc::new(keys),
    };
    rows_as_of(replay, set, graph, workers, lookups, |i, rows| {
        bar.inc(1);
        let p = &mut pending[owners[i]];
        let (entity, _) = asked[i].keys[0];
        p.rows[entity as usize] = rows[entity as usize].take();
        p.waiting -= 1;
        if p.waiting == 0 {
            finish(p, &mut report);
        }
        Ok(())
    })?;
    bar.finish_and_clear();

    let rate = |n: u64, d: u64| if d == 0 { 0.0 } else { n as f64 / d as f64 };
    report.features = stats
        .into_values()
        .map(|mut s| {
            s.mismatch_rate = rate(s.mismatched, s.checked);
            s.missing_rate = rate(s.missing, s.checked);
            s.smape = if s.checked == 0 {
                0.0
            } else {
                s.smape_sum / s.checked as f64
            };
            s
        })
        .collect();
    report.models = models
        .into_values()
        .map(|mut m| {
            m.identical_rate = rate(m.identical, m.checked);
            m
        })
        .collect();
    report.identical_rate = rate(report.identical, report.checked);
    report.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(report)
}

impl Report {
    /// The report as a text table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<12} {:<28} {:>9} {:>10} {:>10} {:>10}\n",
            "model", "feature", "checked", "mismatch%", "missing%", "smape%"
        ));
        for f in &self.features {
            out.push_str(&format!(
                "{:<12} {:<28} {:>9} {:>10.4} {:>10.4} {:>10.4}\n",
                f.model,
                f.feature,
                f.checked,
                100.0 * f.mismatch_rate,
                100.0 * f.missing_rate,
                f.smape
            ));
        }
        for m in &self.models {
            out.push_str(&format!(
                "{}: {} of {} vectors identical ({:.3}%)\n",
                m.model,
                m.identical,
                m.checked,
                100.0 * m.identical_rate
            ));
        }
        for e in &self.examples {
            out.push_str(&format!(
                "differs: request {} {} {}: served {} recomputed {}\n",
                e.request_id, e.model, e.feature, e.served, e.recomputed
            ));
        }
        for (reason, n) in &self.unverifiable {
            out.push_str(&format!("unverifiable: {n} records: {reason}\n"));
        }
        out
    }
}

/// The report as Prometheus gauges (`sfs parity --watch`).
#[derive(Clone)]
pub struct Gauges {
    registry: Arc<std::sync::Mutex<Registry>>,
    mismatch: Family<FeatureLabels, Gauge<f64, AtomicU64>>,
    missing: Family<FeatureLabels, Gauge<f64, AtomicU64>>,
    smape: Family<FeatureLabels, Gauge<f64, AtomicU64>>,
    identical: Family<ModelLabels, Gauge<f64, AtomicU64>>,
    checked: Family<ModelLabels, Gauge>,
    unverifiable: Gauge,
    last_run: Gauge,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    model: String,
    feature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

impl Default for Gauges {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("sfs_parity");
        let gauges = Gauges {
            registry: Arc::default(),
            mismatch: Family::default(),
            missing: Family::default(),
            smape: Family::default(),
            identical: Family::default(),
            checked: Family::default(),
            unverifiable: Gauge::default(),
            last_run: Gauge::default(),
        };
        registry.register(
            "mismatch_ratio",
            "Fraction of served values of a model input that differ from the recomputed ones",
            gauges.mismatch.clone(),
        );
        registry.register(
            "missing_ratio",
            "Fraction of served vectors whose row behind this input was present on one side only",
            gauges.missing.clone(),
        );
        registry.register(
            "smape_percent",
            "Mean symmetric absolute percentage error of a model input, served against recomputed",
            gauges.smape.clone(),
        );
        registry.register(
            "identical_ratio",
            "Fraction of a model's served vectors identical to the recomputed ones in every input",
            gauges.identical.clone(),
        );
        registry.register(
            "checked_vectors",
            "Served vectors checked in the last run",
            gauges.checked.clone(),
        );
        registry.register(
            "unverifiable_records",
            "Served-vector records the last run could not check",
            gauges.unverifiable.clone(),
        );
        registry.register(
            "last_run_timestamp_seconds",
            "When the last parity run finished",
            gauges.last_run.clone(),
        );
        *gauges.registry.lock().expect("registry") = registry;
        gauges
    }
}

impl Gauges {
    /// Sets every gauge from `report`.
    pub fn publish(&self, report: &Report) {
        for f in &report.features {
            let labels = FeatureLabels {
                model: f.model.clone(),
                feature: f.feature.clone(),
            };
            self.mismatch.get_or_create(&labels).set(f.mismatch_rate);
            self.missing.get_or_create(&labels).set(f.missing_rate);
            self.smape.get_or_create(&labels).set(f.smape);
        }
        for m in &report.models {
            let labels = ModelLabels {
                model: m.model.clone(),
            };
            self.identical.get_or_create(&labels).set(m.identical_rate);
            self.checked.get_or_create(&labels).set(m.checked as i64);
        }
        self.unverifiable
            .set(report.unverifiable.values().sum::<u64>() as i64);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.last_run.set(now as i64);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("registry");
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("encoding into a String cannot fail");
        out
    }

    /// Serves the gauges on `addr` (`/metrics`).
    pub fn serve(&self, addr: &str) -> std::io::Result<std::net::SocketAddr> {
        let gauges = self.clone();
        dataflow::metrics::serve_text(addr, move || gauges.encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smape_terms() {
        assert_eq!(smape_term(0.0, 0.0), 0.0);
        assert_eq!(smape_term(5.0, 5.0), 0.0);
        assert!((smape_term(1.0, 3.0) - 100.0).abs() < 1e-12);
        assert!((smape_term(0.0, 2.0) - 200.0).abs() < 1e-12);
        assert!((smape_term(-1.0, 1.0) - 200.0).abs() < 1e-12);
    }

    #[test]
    fn values_compare_bit_for_bit_but_zeros_and_nans_are_equal() {
        assert!(same(1.5, 1.5));
        assert!(!same(1.5, 1.5000001));
        assert!(same(0.0, -0.0));
        assert!(same(f32::NAN, f32::NAN));
    }

    #[test]
    fn channels_parse_as_the_request_names_them() {
        assert_eq!(channel("ecom"), Some(Channel::Ecom));
        assert_eq!(channel("pos"), Some(Channel::Pos));
        assert_eq!(channel("teleport"), None);
    }
}
