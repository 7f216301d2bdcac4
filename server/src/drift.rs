//! Feature drift: the served values of each model input, binned with the
//! buckets of the model's reference histograms (`metadata.json`
//! `reference_histograms`, written by `training/train.py` `histograms()`),
//! over a sliding window, compared with the reference by PSI and
//! Jensen-Shannon divergence.
//!
//! Bucketing (as the training side documents it): bucket `i` holds values in
//! `[edges[i], edges[i+1])`, the last bucket is closed (`edges[n]` counts into
//! it); values below `edges[0]` count into the first bucket, values above
//! `edges[n]` into the last; NaN is not counted.
//!
//! The window is a ring of `slices` time slices of `window / slices` each.
//! Recording (on the scoring path) adds one to a few atomic counters of the
//! current slice: no lock, no allocation. A periodic tick (`spawn_ticker`)
//! moves the ring forward by wall-clock time, zeroing the slices that leave
//! the window, and computes the gauges from the sum of the slices. Memory per
//! model is `slices x (total buckets + 1)` counters, fixed at load.
//!
//! A hot-reloaded model is a new `Model` with a new, empty `Window` against
//! its own reference; the old one goes with the old `Arc<Model>`.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Floor of a bucket's proportion in PSI (window and reference alike), so an
/// empty bucket adds a large but finite term: `max(p, EPSILON)`. Not
/// renormalised. Jensen-Shannon needs no floor (0 * log 0 = 0).
pub const EPSILON: f64 = 1e-4;
/// Most buckets of one reference histogram (larger ones are skipped).
pub const MAX_BUCKETS: usize = 1024;
/// Most time slices of a window (`drift_slices`).
pub const MAX_SLICES: usize = 1000;

/// The window settings (`drift_window_secs`, `drift_slices`, `drift_min_samples`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DriftConfig {
    /// Length of the window; zero turns drift detection off.
    pub window: Duration,
    /// Time slices the window is made of; one expires at a time.
    pub slices: usize,
    /// Fewer scored requests than this in the window: no PSI / JS gauges.
    pub min_samples: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            window: Duration::from_secs(600),
            slices: 10,
            min_samples: 200,
        }
    }
}

impl DriftConfig {
    /// Checks the config keys; the error names the key.
    pub fn new(window_secs: u64, slices: usize, min_samples: u64) -> Result<DriftConfig, String> {
        if !(1..=MAX_SLICES).contains(&slices) {
            return Err(format!(
                "drift_slices = {slices}: must be between 1 and {MAX_SLICES}"
            ));
        }
        Ok(DriftConfig {
            window: Duration::from_secs(window_secs),
            slices,
            min_samples,
        })
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero()
    }

    /// The length of one slice.
    pub fn slice(&self) -> Duration {
        self.window / self.slices as u32
    }
}

/// A reference histogram: `counts.len() + 1` ascending `edges`.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub edges: Vec<f64>,
    pub counts: Vec<u64>,
}

impl Histogram {
    /// Parses `{"edges": [...], "counts": [...]}`; the error says what is wrong.
    pub fn parse(v: &Value) -> Result<Histogram, String> {
        let floats = |key: &str| -> Result<Vec<f64>, String> {
            v.get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| format!("{key} is not an array"))?
                .iter()
                .map(|e| {
                    e.as_f64()
                        .ok_or_else(|| format!("{key}: {e} is not a number"))
                })
                .collect()
        };
        let edges = floats("edges")?;
        let counts = v
            .get("counts")
            .and_then(Value::as_array)
            .ok_or("counts is not an array")?
            .iter()
            .map(|c| {
                c.as_u64()
                    .ok_or_else(|| format!("counts: {c} is not a non-negative integer"))
            })
            .collect::<Result<Vec<u64>, String>>()?;
        if counts.is_empty() || counts.len() > MAX_BUCKETS {
            return Err(format!(
                "{} buckets: must be between 1 and {MAX_BUCKETS}",
                counts.len()
            ));
        }
        if edges.len() != counts.len() + 1 {
            return Err(format!(
                "{} edges for {} counts: needs one more edge than counts",
                edges.len(),
                counts.len()
            ));
        }
        if edges.iter().any(|e| !e.is_finite()) || edges.windows(2).any(|w| w[0] >= w[1]) {
            return Err("edges must be finite and strictly ascending".into());
        }
        if counts.iter().sum::<u64>() == 0 {
            return Err("counts are all zero".into());
        }
        Ok(Histogram { edges, counts })
    }

    /// The bucket of `v` (see the module doc); `None` for NaN.
    pub fn bucket(&self, v: f64) -> Option<usize> {
        bucket(&self.edges, v)
    }

    /// `counts / sum(counts)`.
    pub fn proportions(&self) -> Vec<f64> {
        proportions(&self.counts)
    }
}

fn bucket(edges: &[f64], v: f64) -> Option<usize> {
    if v.is_nan() {
        return None;
    }
    // The inner edges at or below v: 0 below edges[1] (and below edges[0]),
    // n - 1 from edges[n - 1] on (the last bucket is closed and takes
    // everything above).
    Some(edges[1..edges.len() - 1].partition_point(|e| *e <= v))
}

fn proportions(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
        .collect()
}

/// Population stability index of proportions `p` (served) against `q`
/// (reference): `sum (p_i - q_i) * ln(p_i / q_i)`, natural log, each
/// proportion floored at [`EPSILON`].
pub fn psi(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .map(|(&p, &q)| {
            let (p, q) = (p.max(EPSILON), q.max(EPSILON));
            (p - q) * (p / q).ln()
        })
        .sum()
}

/// Jensen-Shannon divergence of proportions `p` and `q`, log base 2, so in
/// [0, 1]: `KL(p || m) / 2 + KL(q || m) / 2` with `m = (p + q) / 2` and
/// `0 * log 0 = 0`.
pub fn js(p: &[f64], q: &[f64]) -> f64 {
    let kl_to_m = |a: f64, b: f64| {
        let m = (a + b) / 2.0;
        if a > 0.0 {
            a * (a / m).log2()
        } else {
            0.0
        }
    };
    let d: f64 = p
        .iter()
        .zip(q)
        .map(|(&p, &q)| (kl_to_m(p, q) + kl_to_m(q, p)) / 2.0)
        .sum();
    d.clamp(0.0, 1.0)
}

/// One input watched for drift.
struct Input {
    name: String,
    /// Its column in the model's input vector.
    column: usize,
    edges: Box<[f64]>,
    reference: Box<[f64]>,
    /// Its first counter in a slice.
    offset: usize,
}

struct Slice {
    samples: AtomicU64,
    counts: Box<[AtomicU64]>,
}

impl Slice {
    fn clear(&self) {
        self.samples.store(0, Ordering::Relaxed);
        for c in self.counts.iter() {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// The drift of one input over the window.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureDrift {
    pub feature: String,
    /// Values binned (NaN is not).
    pub values: u64,
    pub psi: f64,
    pub js: f64,
}

/// The window's state: scored requests, and the drift of every input with
/// at least one value binned.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub samples: u64,
    pub features: Vec<FeatureDrift>,
}

/// The served-value histograms of one model over a sliding window.
pub struct Window {
    inputs: Vec<Input>,
    slices: Box<[Slice]>,
    current: AtomicUsize,
    slice: Duration,
    started: Instant,
    /// Slices begun since `started` as of the last `advance_to`.
    advanced: Mutex<u64>,
}

impl Window {
    /// The window of a model whose inputs are `features` (its column order),
    /// against `reference` (`metadata.json` `reference_histograms`). Inputs
    /// without a reference are skipped; an unusable reference is skipped and
    /// reported in the second value (`feature: problem`). `None` when no
    /// input has a usable reference or drift detection is off.
    pub fn from_metadata(
        features: &[String],
        reference: &Value,
        cfg: &DriftConfig,
    ) -> (Option<Window>, Vec<String>) {
        let mut problems = Vec::new();
        let Some(map) = reference.as_object() else {
            if !reference.is_null() {
                problems.push("reference_histograms is not an object".to_owned());
            }
            return (None, problems);
        };
        let mut inputs = Vec::new();
        for (column, name) in features.iter().enumerate() {
            let Some(h) = map.get(name) else { continue };
            match Histogram::parse(h) {
                Ok(h) => inputs.push((name.clone(), column, h)),
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        (Window::new(inputs, cfg, Instant::now()), problems)
    }

    /// A window over `(name, column, reference)` inputs, its first slice
    /// starting at `started`. `None` without inputs or when `cfg` is off.
    pub fn new(
        inputs: Vec<(String, usize, Histogram)>,
        cfg: &DriftConfig,
        started: Instant,
    ) -> Option<Window> {
        if inputs.is_empty() || !cfg.enabled() {
            return None;
        }
        let mut offset = 0;
        let inputs: Vec<Input> = inputs
            .into_iter()
            .map(|(name, column, h)| {
                let input = Input {
                    name,
                    column,
                    reference: h.proportions().into(),
                    offset,
                    edges: h.edges.into(),
                };
                offset += input.reference.len();
                input
            })
            .collect();
        let slices = (0..cfg.slices.max(1))
            .map(|_| Slice {
                samples: AtomicU64::new(0),
                counts: (0..offset).map(|_| AtomicU64::new(0)).collect(),
            })
            .collect();
        Some(Window {
            inputs,
            slices,
            current: AtomicUsize::new(0),
            slice: cfg.slice().max(Duration::from_millis(1)),
            started,
            advanced: Mutex::new(0),
        })
    }

    /// The watched inputs, in column order.
    pub fn features(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|i| i.name.as_str())
    }

    /// Counts one scored input vector (the model's columns) into the current
    /// slice. Lock-free, allocation-free.
    pub fn record(&self, x: &[f32]) {
        let slice = &self.slices[self.current.load(Ordering::Acquire)];
        slice.samples.fetch_add(1, Ordering::Relaxed);
        for input in &self.inputs {
            let Some(&v) = x.get(input.column) else {
                continue;
            };
            if let Some(b) = bucket(&input.edges, f64::from(v)) {
                slice.counts[input.offset + b].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Moves the ring to `now`: every slice begun since the last call is
    /// cleared (dropping what it held a full window ago) and the newest
    /// becomes current. Called by one ticker; never on the scoring path.
    pub fn advance_to(&self, now: Instant) {
        let due =
            (now.saturating_duration_since(self.started).as_nanos() / self.slice.as_nanos()) as u64;
        let mut advanced = self.advanced.lock().unwrap_or_else(|p| p.into_inner());
        if due <= *advanced {
            return;
        }
        let n = self.slices.len() as u64;
        let first = (*advanced + 1).max(due.saturating_sub(n - 1));
        for k in first..=due {
            self.slices[(k % n) as usize].clear();
        }
        self.current.store((due % n) as usize, Ordering::Release);
        *advanced = due;
    }

    /// The sums over the window's slices, compared with the references.
    pub fn snapshot(&self) -> Snapshot {
        let samples = self
            .slices
            .iter()
            .map(|s| s.samples.load(Ordering::Relaxed))
            .sum();
        let features = self
            .inputs
            .iter()
            .filter_map(|input| {
                let counts: Vec<u64> = (0..input.reference.len())
                    .map(|b| {
                        self.slices
                            .iter()
                            .map(|s| s.counts[input.offset + b].load(Ordering::Relaxed))
                            .sum()
                    })
                    .collect();
                let values: u64 = counts.iter().sum();
                (values > 0).then(|| {
                    let p = proportions(&counts);
                    FeatureDrift {
                        feature: input.name.clone(),
                        values,
                        psi: psi(&p, &input.reference),
                        js: js(&p, &input.reference),
                    }
                })
            })
            .collect();
        Snapshot { samples, features }
    }
}

/// Moves every active model's window to `now` and publishes its gauges.
pub fn update(
    models: &crate::model::registry::Registry,
    metrics: &crate::metrics::Metrics,
    now: Instant,
) {
    let min_samples = models.drift_config().min_samples;
    for slot in models.slots() {
        let model = slot.get();
        let snapshot = model.drift.as_ref().map(|w| {
            w.advance_to(now);
            w.snapshot()
        });
        metrics.drift(slot.kind.name(), snapshot.as_ref(), min_samples);
    }
}

/// Updates the drift gauges every slice (at most every 5 s, at least every
/// 50 ms); `None` when drift detection is off.
pub fn spawn_ticker(app: &crate::App) -> Option<tokio::task::JoinHandle<()>> {
    let cfg = app.state().models.drift_config();
    if !cfg.enabled() {
        return None;
    }
    let every = cfg
        .slice()
        .clamp(Duration::from_millis(50), Duration::from_secs(5));
    let app = app.clone();
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let state = app.state();
            update(&state.models, &state.metrics, Instant::now());
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn psi_and_js_match_hand_computed_values() {
        // PSI = (0.5-0.9) ln(0.5/0.9) + (0.5-0.1) ln(0.5/0.1)
        //     = 0.4 * 0.5877866649 + 0.4 * 1.6094379124 = 0.8788898309
        assert!(close(psi(&[0.5, 0.5], &[0.9, 0.1]), 0.878_889_830_9));
        // m = (0.7, 0.3); KL(p||m) = 0.5 log2(5/7) + 0.5 log2(5/3) = 0.1257693835
        // KL(q||m) = 0.9 log2(9/7) + 0.1 log2(1/3) = 0.1678168214; JS = 0.1467931024
        assert!(close(js(&[0.5, 0.5], &[0.9, 0.1]), 0.146_793_102_4));
        // Same distribution: both 0.
        let p = [0.2, 0.3, 0.5];
        assert!(close(psi(&p, &p), 0.0) && close(js(&p, &p), 0.0));
        // Disjoint: JS is 1 (log2), PSI is 2 (1 - eps) ln(1 / eps) with the floor.
        assert!(close(js(&[1.0, 0.0], &[0.0, 1.0]), 1.0));
        let want = 2.0 * (1.0 - 1e-4) * (1e4f64).ln();
        assert!(close(psi(&[1.0, 0.0], &[0.0, 1.0]), want), "{want}");
        // An empty served bucket: (1e-4 - 0.25) ln(1e-4 / 0.25) + (1 - 0.75) ln(1 / 0.75).
        let want = (1e-4 - 0.25) * (1e-4f64 / 0.25).ln() + 0.25 * (1.0f64 / 0.75).ln();
        assert!(close(psi(&[0.0, 1.0], &[0.25, 0.75]), want));
    }

    #[test]
    fn buckets_follow_the_training_side() {
        let h =
            Histogram::parse(&json!({"edges": [0.0, 1.0, 2.0, 4.0], "counts": [1, 2, 3]})).unwrap();
        let cases = [
            (-5.0, 0),
            (0.0, 0),
            (0.999, 0),
            (1.0, 1), // [1, 2)
            (2.0, 2),
            (4.0, 2), // the last bucket is closed
            (100.0, 2),
            (f64::INFINITY, 2),
            (f64::NEG_INFINITY, 0),
        ];
        for (v, b) in cases {
            assert_eq!(h.bucket(v), Some(b), "{v}");
        }
        assert_eq!(h.bucket(f64::NAN), None);
        assert_eq!(h.proportions(), vec![1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]);
        // One bucket per distinct value (training: the values, then last + 1).
        let flag = Histogram::parse(&json!({"edges": [0.0, 1.0, 2.0], "counts": [9, 1]})).unwrap();
        assert_eq!((flag.bucket(0.0), flag.bucket(1.0)), (Some(0), Some(1)));
    }

    #[test]
    fn unusable_references_are_skipped_and_named() {
        for (bad, why) in [
            (json!({"edges": [0.0, 1.0], "counts": [1, 2]}), "3 edges"),
            (json!({"edges": [0.0, 1.0], "counts": []}), "0 buckets"),
            (json!({"edges": [1.0, 0.0], "counts": [1]}), "ascending"),
            (json!({"edges": [0.0, 1.0], "counts": [0]}), "all zero"),
            (json!({"edges": [0.0, 1.0], "counts": [-1]}), "non-negative"),
            (json!({"counts": [1]}), "edges is not an array"),
        ] {
            let err = Histogram::parse(&bad).unwrap_err();
            let why = if why == "3 edges" { "2 edges" } else { why };
            assert!(err.contains(why), "{err}");
        }
        let features: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        let reference = json!({
            "a": {"edges": [0.0, 1.0, 2.0], "counts": [1, 1]},
            "b": {"edges": [0.0], "counts": []},
            "score": {"edges": [0.0, 1.0], "counts": [1]},
        });
        let (w, problems) = Window::from_metadata(&features, &reference, &DriftConfig::default());
        let w = w.unwrap();
        assert_eq!(w.features().collect::<Vec<_>>(), ["a"]);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].starts_with("b: "), "{problems:?}");
        // No reference at all, or drift off: no window, no problem.
        let (w, problems) = Window::from_metadata(&features, &Value::Null, &DriftConfig::default());
        assert!(w.is_none() && problems.is_empty());
        let off = DriftConfig::new(0, 10, 200).unwrap();
        assert!(Window::from_metadata(&features, &reference, &off)
            .0
            .is_none());
        assert!(DriftConfig::new(600, 0, 1)
            .unwrap_err()
            .contains("drift_slices"));
    }

    #[test]
    fn slices_expire_as_the_window_slides() {
        let h = Histogram::parse(&json!({"edges": [0.0, 1.0, 2.0], "counts": [1, 1]})).unwrap();
        let cfg = DriftConfig::new(4, 4, 1).unwrap(); // 4 slices of 1 s
        let t0 = Instant::now();
        let w = Window::new(vec![("f".into(), 1, h)], &cfg, t0).unwrap();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for _ in 0..10 {
            w.record(&[9.0, 0.5]); // column 1 is watched: bucket 0
        }
        w.advance_to(at(1_000));
        for _ in 0..5 {
            w.record(&[9.0, 1.5]);
        }
        w.advance_to(at(2_500)); // slice 2, nothing recorded
        let s = w.snapshot();
        assert_eq!(s.samples, 15);
        assert_eq!(s.features[0].values, 15);
        // p = (10/15, 5/15) against q = (1/2, 1/2).
        let p = [10.0 / 15.0, 5.0 / 15.0];
        assert!(close(s.features[0].psi, psi(&p, &[0.5, 0.5])));
        w.advance_to(at(3_999)); // still slice 3: the first slice is in
        assert_eq!(w.snapshot().samples, 15);
        w.advance_to(at(4_000)); // slice 4 reuses slice 0's counters
        let s = w.snapshot();
        assert_eq!((s.samples, s.features[0].values), (5, 5));
        assert!(close(s.features[0].psi, psi(&[0.0, 1.0], &[0.5, 0.5])));
        w.record(&[9.0, 0.1]);
        assert_eq!(w.snapshot().samples, 6);
        // A jump of more than a window clears everything, once per slice.
        w.advance_to(at(60_000));
        let s = w.snapshot();
        assert_eq!(s.samples, 0);
        assert!(s.features.is_empty(), "no values: nothing to compare");
        w.record(&[9.0, 0.1]);
        w.advance_to(at(62_999));
        assert_eq!(w.snapshot().samples, 1);
        w.advance_to(at(63_000));
        assert_eq!(w.snapshot().samples, 1);
        w.advance_to(at(64_000));
        assert_eq!(w.snapshot().samples, 0);
    }

    #[test]
    fn gauges_appear_above_the_minimum_and_go_with_their_feature() {
        let metrics = crate::metrics::Metrics::new();
        let series = |name: &str| {
            metrics
                .encode()
                .lines()
                .filter(|l| l.starts_with(&format!("sfs_serve_{name}{{")))
                .map(String::from)
                // A family's series come in hash order.
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect::<Vec<_>>()
        };
        let drift = |feature: &str, psi: f64| FeatureDrift {
            feature: feature.into(),
            values: 1,
            psi,
            js: psi / 10.0,
        };
        let snapshot = |samples, features| Snapshot { samples, features };
        metrics.drift("fraud", Some(&snapshot(199, vec![drift("a", 0.5)])), 200);
        assert_eq!(
            series("drift_window_samples"),
            ["sfs_serve_drift_window_samples{model=\"fraud\"} 199"]
        );
        assert!(series("feature_drift_psi").is_empty(), "below the minimum");
        let two = vec![drift("a", 0.5), drift("b", 0.25)];
        metrics.drift("fraud", Some(&snapshot(200, two)), 200);
        assert_eq!(
            series("feature_drift_psi"),
            [
                "sfs_serve_feature_drift_psi{model=\"fraud\",feature=\"a\"} 0.5",
                "sfs_serve_feature_drift_psi{model=\"fraud\",feature=\"b\"} 0.25"
            ]
        );
        assert_eq!(series("feature_drift_js").len(), 2);
        // A reloaded version without `b`, then one without any reference.
        metrics.drift("fraud", Some(&snapshot(300, vec![drift("a", 0.1)])), 200);
        assert_eq!(
            series("feature_drift_js"),
            ["sfs_serve_feature_drift_js{model=\"fraud\",feature=\"a\"} 0.01"]
        );
        metrics.drift("fraud", None, 200);
        assert!(series("feature_drift_psi").is_empty());
        assert!(series("drift_window_samples").is_empty());
    }

    #[test]
    fn nan_and_short_vectors_count_as_samples_but_not_values() {
        let h = Histogram::parse(&json!({"edges": [0.0, 1.0], "counts": [1]})).unwrap();
        let w = Window::new(
            vec![("f".into(), 2, h)],
            &DriftConfig::default(),
            Instant::now(),
        )
        .unwrap();
        w.record(&[0.0, 0.0, f32::NAN]);
        w.record(&[0.0]);
        w.record(&[0.0, 0.0, 0.5]);
        let s = w.snapshot();
        assert_eq!((s.samples, s.features[0].values), (3, 1));
    }
}
