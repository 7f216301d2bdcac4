//! Feature drift end to end: a real `sfs serve` (its own registry folder, its
//! own key prefix on the real Redis, a short drift window) scores traffic,
//! and its `/metrics` gauges are checked against this test's own histograms
//! and PSI / Jensen-Shannon (written here from the documented contract:
//! training/README.md "Reference histograms", README.md "Feature drift"; no
//! code shared with server/src/drift.rs).
//!
//! 1. Registry version 1 is the shipped fraud model without reference
//!    histograms: no drift series at all.
//! 2. Traffic from distribution A is scored with `?explain=true`; from its
//!    feature vectors the test builds reference histograms (decile edges,
//!    one bucket per value for few-valued inputs, one input left without a
//!    reference) and publishes them as version 2 (hot reload).
//! 3. A fresh sample of A: every PSI below 0.2, each gauge equal to the
//!    test's PSI / JS of the vectors it was served.
//! 4. The window slides past it: the sample count falls to 0 and the PSI /
//!    JS series go (below `drift_min_samples`).
//! 5. Traffic B (amounts x20, users whose rows hold other values): the
//!    amount and user inputs cross 0.2, every other input stays below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use schemas::features::{pack_country, Aggregation, FeatureRow, Value as Cell};
use schemas::FeatureSet;
use serde_json::{json, Value};

/// The alert threshold of `SfsFeatureDrift` (infra/prometheus/rules.yml).
const THRESHOLD: f64 = 0.2;
/// Requests per phase (above `drift_min_samples` = 200 of the config below).
const N: usize = 800;
const WINDOW_SECS: u64 = 10;
const SLICES: u64 = 5;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Kills the server and removes the test's keys and files, pass or fail.
struct Cleanup {
    server: Option<Child>,
    redis: String,
    prefix: String,
    dir: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        if let Ok(mut conn) =
            redis::Client::open(self.redis.as_str()).and_then(|c| c.get_connection())
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.prefix))
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: redis::RedisResult<()> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// splitmix64: reproducible traffic without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in lo..=hi.
    fn int(&mut self, lo: i64, hi: i64) -> i64 {
        lo + (self.next() % (hi - lo + 1) as u64) as i64
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

const COUNTRIES: [&str; 3] = ["DE", "FR", "US"];
const CHANNELS: [&str; 3] = ["pos", "ecom", "atm"];
const ENTITIES: usize = 300;

/// A row of `entity` with values drawn per aggregation; `shifted` rows hold
/// values 20x larger plus 50 (all above the unshifted range).
fn row(
    set: &FeatureSet,
    entity: &str,
    id: String,
    now: i64,
    shifted: bool,
    rng: &mut Rng,
) -> FeatureRow {
    let e = set.entity(entity).unwrap().clone();
    let usual_country = set.request.get("usual_country");
    let values = e
        .features
        .iter()
        .map(|f| {
            let shift = |v: i64| if shifted { v * 20 + 50 } else { v };
            match f.aggregation {
                Aggregation::LastTime => Cell::Int(now - rng.int(1, 3_600) * 1000),
                Aggregation::Mode | Aggregation::Last if usual_country == Some(&f.name) => {
                    Cell::Int(pack_country(rng.pick(&COUNTRIES)).unwrap())
                }
                Aggregation::Mode | Aggregation::Last => Cell::Int(rng.int(0, 5)),
                Aggregation::Mean | Aggregation::Std => {
                    Cell::Float(shift(rng.int(100, 8_000)) as f64)
                }
                Aggregation::Sum | Aggregation::Min | Aggregation::Max => {
                    Cell::Int(shift(rng.int(0, 40) * 1_000))
                }
                Aggregation::Count | Aggregation::DistinctCount => Cell::Int(shift(rng.int(0, 40))),
            }
        })
        .collect();
    FeatureRow {
        entity: e,
        id,
        as_of_ms: now,
        values,
    }
}

struct Client {
    agent: ureq::Agent,
    url: String,
}

impl Client {
    fn get(&self, path: &str) -> Option<String> {
        self.agent
            .get(&format!("{}{path}", self.url))
            .call()
            .ok()?
            .into_string()
            .ok()
    }

    fn models(&self) -> Value {
        serde_json::from_str(&self.get("/models").unwrap()).unwrap()
    }

    /// Scores `n` fraud requests (users `user_prefix{i}`, amounts times
    /// `amount_factor`) and returns the input names and the served vectors
    /// (each value as the f32 the model saw).
    fn score(
        &self,
        n: usize,
        user_prefix: &str,
        amount_factor: i64,
        event_time_ms: i64,
        rng: &mut Rng,
    ) -> (Vec<String>, Vec<Vec<f64>>) {
        let mut names = Vec::new();
        let mut vectors = Vec::with_capacity(n);
        for _ in 0..n {
            let body = json!({
                "card_id": format!("c{}", rng.int(0, ENTITIES as i64 - 1)),
                "user_id": format!("{user_prefix}{}", rng.int(0, ENTITIES as i64 - 1)),
                "amount_minor": rng.int(500, 20_000) * amount_factor,
                "country": rng.pick(&COUNTRIES),
                "channel": rng.pick(&CHANNELS),
                "event_time_ms": event_time_ms,
            });
            let resp = self
                .agent
                .post(&format!("{}/score/fraud?explain=true", self.url))
                .set("content-type", "application/json")
                .send_string(&body.to_string())
                .unwrap()
                .into_string()
                .unwrap();
            let resp: Value = serde_json::from_str(&resp).unwrap();
            assert_eq!(resp["cold_start"], false, "{resp}");
            let fv = resp["feature_vector"].as_array().unwrap();
            names = fv
                .iter()
                .map(|p| p["name"].as_str().unwrap().to_owned())
                .collect();
            vectors.push(
                fv.iter()
                    .map(|p| p["value"].as_f64().unwrap() as f32 as f64)
                    .collect(),
            );
        }
        (names, vectors)
    }

    /// `(samples in the window, psi by feature, js by feature)` of model fraud.
    fn drift(&self) -> (Option<u64>, BTreeMap<String, f64>, BTreeMap<String, f64>) {
        let text = self.get("/metrics").unwrap();
        let mut samples = None;
        let (mut psi, mut js) = (BTreeMap::new(), BTreeMap::new());
        for line in text.lines() {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Some((name, labels)) = series.split_once('{') else {
                continue;
            };
            let labels: BTreeMap<&str, &str> = labels
                .trim_end_matches('}')
                .split(',')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k, v.trim_matches('"')))
                .collect();
            if labels.get("model") != Some(&"fraud") {
                continue;
            }
            let v = || -> f64 { value.parse().unwrap() };
            match name {
                "sfs_serve_drift_window_samples" => samples = Some(v() as u64),
                "sfs_serve_feature_drift_psi" => {
                    psi.insert(labels["feature"].to_owned(), v());
                }
                "sfs_serve_feature_drift_js" => {
                    js.insert(labels["feature"].to_owned(), v());
                }
                _ => {}
            }
        }
        (samples, psi, js)
    }

    /// Polls `/metrics` until fraud's window holds `n` requests.
    fn wait_samples(&self, n: u64) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
        let deadline = Instant::now() + Duration::from_secs(WINDOW_SECS * 3);
        loop {
            let (samples, psi, js) = self.drift();
            if samples == Some(n) {
                return (psi, js);
            }
            assert!(
                Instant::now() < deadline,
                "the drift window never held {n} requests (last: {samples:?})"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The test's reference histogram of one column: one bucket per value when
/// there are at most 10 (edges: the values, then the last + 1), else decile
/// edges (nearest rank), deduplicated, closed by the maximum.
fn histogram(values: &[f64]) -> (Vec<f64>, Vec<u64>) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mut distinct = sorted.clone();
    distinct.dedup();
    let mut edges = if distinct.len() <= 10 {
        let mut e = distinct.clone();
        e.push(distinct.last().unwrap() + 1.0);
        e
    } else {
        let mut e: Vec<f64> = (0..10).map(|k| sorted[k * sorted.len() / 10]).collect();
        e.push(*sorted.last().unwrap());
        e
    };
    edges.dedup();
    let counts = bin(&edges, values);
    (edges, counts)
}

/// Counts `values` into the buckets of `edges`: `[e_i, e_i+1)`, the last
/// closed, below the first into the first, above the last into the last.
fn bin(edges: &[f64], values: &[f64]) -> Vec<u64> {
    let n = edges.len() - 1;
    let mut counts = vec![0u64; n];
    for &v in values {
        let mut i = 0;
        while i + 1 < n && v >= edges[i + 1] {
            i += 1;
        }
        counts[i] += 1;
    }
    counts
}

/// PSI (ln, proportions floored at 1e-4) and JS divergence (log2) of served
/// counts against reference counts.
fn psi_js(served: &[u64], reference: &[u64]) -> (f64, f64) {
    let share = |c: &[u64]| {
        let total: u64 = c.iter().sum();
        c.iter()
            .map(|&x| x as f64 / total as f64)
            .collect::<Vec<f64>>()
    };
    let (p, q) = (share(served), share(reference));
    let mut psi = 0.0;
    let mut js = 0.0;
    for (&a, &b) in p.iter().zip(&q) {
        let (fa, fb) = (a.max(1e-4), b.max(1e-4));
        psi += (fa - fb) * (fa / fb).ln();
        let m = (a + b) / 2.0;
        if a > 0.0 {
            js += 0.5 * a * (a / m).log2();
        }
        if b > 0.0 {
            js += 0.5 * b * (b / m).log2();
        }
    }
    (psi, js)
}

fn column(vectors: &[Vec<f64>], i: usize) -> Vec<f64> {
    vectors.iter().map(|v| v[i]).collect()
}

/// Checks every gauge against the test's PSI / JS of `vectors`, and returns the PSIs.
fn check_gauges(
    phase: &str,
    names: &[String],
    vectors: &[Vec<f64>],
    reference: &BTreeMap<String, (Vec<f64>, Vec<u64>)>,
    psi: &BTreeMap<String, f64>,
    js: &BTreeMap<String, f64>,
) {
    let watched: Vec<&String> = names
        .iter()
        .filter(|n| reference.contains_key(*n))
        .collect();
    assert_eq!(
        psi.keys().collect::<Vec<_>>(),
        {
            let mut w = watched.clone();
            w.sort();
            w
        },
        "{phase}: a PSI gauge for exactly the inputs with a reference"
    );
    assert_eq!(psi.len(), js.len());
    for (i, name) in names.iter().enumerate() {
        let Some((edges, counts)) = reference.get(name) else {
            continue;
        };
        let (want_psi, want_js) = psi_js(&bin(edges, &column(vectors, i)), counts);
        let (got_psi, got_js) = (psi[name], js[name]);
        assert!(
            (got_psi - want_psi).abs() <= 1e-9 * want_psi.max(1.0),
            "{phase}: {name}: PSI gauge {got_psi}, the test computes {want_psi}"
        );
        assert!(
            (got_js - want_js).abs() <= 1e-9,
            "{phase}: {name}: JS gauge {got_js}, the test computes {want_js}"
        );
        assert!(
            (0.0..=1.0).contains(&got_js),
            "{phase}: {name}: JS {got_js}"
        );
    }
}

/// Copies the shipped fraud model into `registry/fraud/{version}` with
/// `reference_histograms` replaced (or removed), published atomically.
fn publish(registry: &Path, version: u32, reference: Option<Value>) {
    let src = root().join("models/fraud/1");
    let parent = registry.join("fraud");
    let tmp = parent.join(format!(".{version}.tmp"));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("model.onnx"), tmp.join("model.onnx")).unwrap();
    let mut meta: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("metadata.json")).unwrap()).unwrap();
    meta["version"] = version.into();
    match reference {
        Some(r) => meta["reference_histograms"] = r,
        None => {
            meta.as_object_mut().unwrap().remove("reference_histograms");
        }
    }
    std::fs::write(tmp.join("metadata.json"), meta.to_string()).unwrap();
    std::fs::rename(&tmp, parent.join(version.to_string())).unwrap();
}

#[test]
fn shifted_traffic_drives_psi_over_the_threshold_and_unshifted_stays_below() {
    let redis_url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("test-drift-{}-{nanos}:", std::process::id());
    let dir = std::env::temp_dir().join(format!("sfs-drift-{}-{nanos}", std::process::id()));
    let registry = dir.join("models");
    std::fs::create_dir_all(&registry).unwrap();
    let mut cleanup = Cleanup {
        server: None,
        redis: redis_url.clone(),
        prefix: prefix.clone(),
        dir: dir.clone(),
    };
    let features_path = root().join("features.toml");
    let set = FeatureSet::load(&features_path).unwrap();
    publish(&registry, 1, None);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nredis_url = \"{redis_url}\"\nkey_prefix = \"{prefix}\"\n\
             models_dir = \"{}\"\nmodel_poll_ms = 100\nlog_sample_every = 0\nstream_metrics = []\n\
             drift_window_secs = {WINDOW_SECS}\ndrift_slices = {SLICES}\ndrift_min_samples = 200\n",
            registry.display()
        ),
    )
    .unwrap();
    cleanup.server = Some(
        Command::new(env!("CARGO_BIN_EXE_sfs"))
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--features")
            .arg(&features_path)
            .current_dir(root())
            .env("SFS_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let client = Client {
        agent: ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(),
        url: format!("http://127.0.0.1:{port}"),
    };
    let start = Instant::now();
    while client.get("/ready").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "sfs serve is not ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Rows: cards and users of A, users of B with shifted values.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let mut rng = Rng(0x5f5_d21f7 ^ nanos as u64);
    let mut conn = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_connection()
        .unwrap();
    let mut pipe = redis::pipe();
    for i in 0..ENTITIES {
        for (entity, id, shifted) in [
            ("card", format!("c{i}"), false),
            ("user", format!("a{i}"), false),
            ("user", format!("b{i}"), true),
        ] {
            let r = row(&set, entity, id, now, shifted, &mut rng);
            pipe.cmd("HSET")
                .arg(r.entity.redis_key(&prefix, &r.id))
                .arg(r.encode_fields(&set.version))
                .ignore();
        }
    }
    let _: () = pipe.query(&mut conn).unwrap();

    // 1. No reference histograms: no drift series.
    let (names, a1) = client.score(N, "a", 1, now, &mut rng);
    let text = client.get("/metrics").unwrap();
    assert!(
        !text.contains("sfs_serve_feature_drift_psi{")
            && !text.contains("sfs_serve_drift_window_samples{"),
        "no model has reference histograms, yet:\n{text}"
    );

    // 2. The test's reference from A, one input left out, and a `score`
    //    histogram (not an input) as training writes it; hot-reloaded.
    let left_out = names.last().unwrap().clone();
    let mut reference = BTreeMap::new();
    for (i, name) in names.iter().enumerate() {
        if *name != left_out {
            reference.insert(name.clone(), histogram(&column(&a1, i)));
        }
    }
    let mut doc: serde_json::Map<String, Value> = reference
        .iter()
        .map(|(k, (e, c))| (k.clone(), json!({"edges": e, "counts": c})))
        .collect();
    doc.insert(
        "score".into(),
        json!({"edges": [0.0, 0.5, 1.0], "counts": [5, 5]}),
    );
    publish(&registry, 2, Some(Value::Object(doc)));
    let start = Instant::now();
    while client.models()["models"][0]["model_version"] != "fraud-v2" {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "fraud-v2 was not loaded: {}",
            client.models()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // 3. A fresh sample of A: below the threshold everywhere.
    let (_, a2) = client.score(N, "a", 1, now, &mut rng);
    let (psi, js) = client.wait_samples(N as u64);
    check_gauges("A", &names, &a2, &reference, &psi, &js);
    assert!(!psi.contains_key(&left_out) && !psi.contains_key("score"));
    for (name, v) in &psi {
        assert!(*v < THRESHOLD, "A: {name}: PSI {v} on unshifted traffic");
    }
    let max = psi.values().fold(0.0f64, |a, b| a.max(*b));
    eprintln!("A: {} inputs, largest PSI {max:.4}", psi.len());

    // 4. The window slides past A: no samples, no PSI / JS series.
    let (psi, js) = client.wait_samples(0);
    assert!(
        psi.is_empty() && js.is_empty(),
        "below drift_min_samples: {psi:?}"
    );

    // 5. B: amounts x20 and shifted user rows.
    let (_, b) = client.score(N, "b", 20, now, &mut rng);
    let (psi, js) = client.wait_samples(N as u64);
    check_gauges("B", &names, &b, &reference, &psi, &js);
    let shifted = |name: &str| name.starts_with("amount_") || name.starts_with("user.");
    let (mut up, mut flat) = (0, 0);
    for (name, v) in &psi {
        if shifted(name) {
            assert!(*v > THRESHOLD, "B: {name}: PSI {v} on shifted traffic");
            up += 1;
        } else {
            assert!(*v < THRESHOLD, "B: {name}: PSI {v} on unshifted traffic");
            flat += 1;
        }
    }
    let (lo, hi) = psi.iter().fold((f64::MAX, 0.0f64), |(lo, hi), (n, v)| {
        if shifted(n) {
            (lo.min(*v), hi)
        } else {
            (lo, hi.max(*v))
        }
    });
    eprintln!(
        "B: {up} shifted inputs, smallest PSI {lo:.4}; {flat} unshifted, largest PSI {hi:.4}"
    );
    assert!(
        up >= 5 && flat >= 5,
        "{up} shifted and {flat} unshifted inputs checked"
    );
    drop(cleanup);
}
