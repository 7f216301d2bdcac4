//! The status page: `GET /` (one self-contained HTML page, `status.html`)
//! and the JSON it polls, `GET /status.json`, built from the server's own
//! metrics and the stream job's `/metrics` (scraped from the addresses in
//! `stream_metrics` of the serve config). The parsing and summaries here are
//! also what `sfs inspect` shows.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The page.
pub const PAGE: &str = include_str!("status.html");

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// Parses the Prometheus / OpenMetrics text format (comments skipped).
pub fn parse(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(open) => match line[open..].find('}') {
                Some(close) => (&line[..open + close + 1], &line[open + close + 1..]),
                None => continue,
            },
            None => match line.split_once(' ') {
                Some((s, r)) => (s, r),
                None => continue,
            },
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
        else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, parse_labels(labels.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        out.push(Sample {
            name: name.to_owned(),
            labels,
            value,
        });
    }
    out
}

fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_matches([',', ' ']).to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// Sum of every sample of `name` whose labels include `matching`.
pub fn sum(samples: &[Sample], name: &str, matching: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name && matching.iter().all(|(k, v)| s.label(k) == *v))
        .map(|s| s.value)
        .sum::<f64>()
        // An empty f64 sum is -0.0.
        + 0.0
}

/// Distinct values of label `key` over the samples of `name`.
pub fn label_values(samples: &[Sample], name: &str, key: &str) -> Vec<String> {
    let mut values: Vec<String> = samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| s.label(key).to_owned())
        .collect();
    values.sort();
    values.dedup();
    values
}

/// The cumulative buckets `(le, count)` of histogram `name` (summed over the
/// label sets matching), in increasing `le`.
pub fn buckets(samples: &[Sample], name: &str, matching: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in samples
        .iter()
        .filter(|s| s.name == bucket && matching.iter().all(|(k, v)| s.label(k) == *v))
    {
        let le = match s.label("le") {
            "+Inf" => f64::INFINITY,
            v => match v.parse::<f64>() {
                Ok(le) => le,
                Err(_) => continue,
            },
        };
        // Order by the float's bits: all `le` are non-negative.
        by_le.entry(le.to_bits()).or_insert((le, 0.0)).1 += s.value;
    }
    by_le.into_values().collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the
/// bucket where the rank falls (as Prometheus' `histogram_quantile`); `None`
/// without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let within = if width > 0.0 {
                (rank - lower.1) / width
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

/// Fetches `GET /metrics` from `addr` (`host:port` or `http://host:port/metrics`).
pub async fn scrape(addr: &str, timeout: Duration) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (host, path) = split_url(addr);
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(&host)
            .await
            .map_err(|e| format!("cannot connect to {host}: {e}"))?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut body = Vec::new();
        stream
            .read_to_end(&mut body)
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(body)
    };
    let raw = tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| format!("{host} did not answer within {timeout:?}"))??;
    http_body(&raw, &host)
}

/// Blocking variant of [`scrape`] (for `sfs inspect`).
pub fn scrape_blocking(addr: &str, timeout: Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::net::ToSocketAddrs;
    let (host, path) = split_url(addr);
    let socket = host
        .to_socket_addrs()
        .map_err(|e| format!("bad address {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("bad address {host}"))?;
    let mut stream = std::net::TcpStream::connect_timeout(&socket, timeout)
        .map_err(|e| format!("cannot connect to {host}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    http_body(&raw, &host)
}

fn split_url(addr: &str) -> (String, String) {
    let rest = addr.strip_prefix("http://").unwrap_or(addr);
    match rest.split_once('/') {
        Some((host, path)) => (host.to_owned(), format!("/{path}")),
        None => (rest.to_owned(), "/metrics".to_owned()),
    }
}

fn http_body(raw: &[u8], host: &str) -> Result<String, String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{host} sent no HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        let status = head.lines().next().unwrap_or("");
        return Err(format!("{host} answered {status}"));
    }
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return Ok(dechunk(body));
    }
    Ok(body.to_owned())
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

/// Per-second rates of counters between two scrapes.
#[derive(Debug, Default)]
pub struct Rates {
    previous: Mutex<Option<(Instant, BTreeMap<String, f64>)>>,
    last: Mutex<BTreeMap<String, f64>>,
}

impl Rates {
    /// Rates of the counters in `now` (keyed by the caller) since the last
    /// sample at least `min_gap` old; until then, the previous rates.
    pub fn update(&self, now: BTreeMap<String, f64>, min_gap: Duration) -> BTreeMap<String, f64> {
        let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let at = Instant::now();
        match previous.as_ref() {
            Some((then, values)) if at.duration_since(*then) >= min_gap => {
                let dt = at.duration_since(*then).as_secs_f64();
                *last = now
                    .iter()
                    .map(|(k, v)| {
                        let before = values.get(k).copied().unwrap_or(0.0);
                        // A restarted process resets its counters.
                        (k.clone(), ((v - before).max(0.0)) / dt)
                    })
                    .collect();
                *previous = Some((at, now));
            }
            Some(_) => {}
            None => *previous = Some((at, now)),
        }
        last.clone()
    }
}

fn round(v: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (v * f).round() / f
}

fn opt(v: Option<f64>, digits: i32) -> Value {
    v.map_or(Value::Null, |v| json!(round(v, digits)))
}

/// The stream job's part of the status: per-topic ingest, lag, frontier,
/// freshness, dead letters, sink. `rates` holds per-second counter rates
/// under the keys this function uses (see [`job_counters`]).
pub fn job_status(samples: &[Sample], rates: &BTreeMap<String, f64>, now_ms: i64) -> Value {
    let topics: Vec<Value> = label_values(samples, "sfs_source_records_total", "topic")
        .into_iter()
        .map(|topic| {
            let t = [("topic", topic.as_str())];
            let lag_seconds = samples
                .iter()
                .filter(|s| s.name == "sfs_source_consumer_lag_seconds" && s.label("topic") == topic)
                .map(|s| s.value)
                .fold(0.0, f64::max);
            json!({
                "topic": topic,
                "records_total": sum(samples, "sfs_source_records_total", &t),
                "records_per_s": round(rates.get(&format!("records:{topic}")).copied().unwrap_or(0.0), 1),
                "lag_records": sum(samples, "sfs_source_consumer_lag_records", &t),
                "lag_seconds": round(lag_seconds, 3),
                "late_total": sum(samples, "sfs_source_late_records_total", &t),
                "rejected_total": sum(samples, "sfs_source_rejected_records_total", &t),
            })
        })
        .collect();
    let dead_letters: Vec<Value> = samples
        .iter()
        .filter(|s| s.name == "sfs_dlq_records_total")
        .map(|s| json!({"topic": s.label("topic"), "reason": s.label("reason"), "count": s.value}))
        .collect();
    let freshness = buckets(samples, "sfs_sink_feature_freshness_seconds", &[]);
    let frontier_ms = sum(samples, "sfs_sink_durable_frontier_ms", &[]);
    json!({
        "topics": topics,
        "frontier_ms": frontier_ms,
        "frontier_age_s": if frontier_ms > 0.0 { json!(round((now_ms as f64 - frontier_ms) / 1000.0, 1)) } else { Value::Null },
        "frontier_lag_seconds": round(sum(samples, "sfs_sink_frontier_lag_seconds", &[]), 3),
        "freshness_p50_s": opt(quantile(&freshness, 0.5), 4),
        "freshness_p99_s": opt(quantile(&freshness, 0.99), 4),
        "freshness_count": freshness.last().map_or(0.0, |b| b.1),
        "dead_letters": dead_letters,
        "dead_letters_total": sum(samples, "sfs_dlq_records_total", &[]),
        "rows_written_total": sum(samples, "sfs_sink_rows_written_total", &[]),
        "rows_per_s": round(rates.get("rows").copied().unwrap_or(0.0), 1),
        "redis_errors_total": sum(samples, "sfs_sink_redis_errors_total", &[]),
        "sink_stalled": sum(samples, "sfs_sink_stalled", &[]) > 0.0,
        "consumer_errors_total": sum(samples, "sfs_source_consumer_errors_total", &[]),
    })
}

/// The job counters whose rates [`job_status`] shows.
pub fn job_counters(samples: &[Sample]) -> BTreeMap<String, f64> {
    let mut out: BTreeMap<String, f64> = label_values(samples, "sfs_source_records_total", "topic")
        .into_iter()
        .map(|t| {
            let v = sum(samples, "sfs_source_records_total", &[("topic", &t)]);
            (format!("records:{t}"), v)
        })
        .collect();
    out.insert(
        "rows".into(),
        sum(samples, "sfs_sink_rows_written_total", &[]),
    );
    out
}

const SCORING_ROUTES: [&str; 3] = ["score_fraud", "score_propensity", "features"];

/// The server's own part: per-route rate and latency, breaker, score
/// distributions per model, active model versions.
pub fn serving_status(samples: &[Sample], rates: &BTreeMap<String, f64>) -> Value {
    let hist = "sfs_serve_request_duration_seconds";
    let routes: Vec<Value> = SCORING_ROUTES
        .iter()
        .map(|route| {
            let r = [("route", *route)];
            let b = buckets(samples, hist, &r);
            let errors: f64 = samples
                .iter()
                .filter(|s| {
                    s.name == format!("{hist}_count")
                        && s.label("route") == *route
                        && !s.label("status").starts_with('2')
                })
                .map(|s| s.value)
                .sum::<f64>()
                + 0.0;
            json!({
                "route": route,
                "requests_total": sum(samples, &format!("{hist}_count"), &r),
                "errors_total": errors,
                "requests_per_s": round(rates.get(&format!("route:{route}")).copied().unwrap_or(0.0), 1),
                "p50_ms": opt(quantile(&b, 0.5).map(|s| s * 1000.0), 3),
                "p99_ms": opt(quantile(&b, 0.99).map(|s| s * 1000.0), 3),
            })
        })
        .collect();
    let scores: Vec<Value> = label_values(samples, "sfs_serve_score_count", "model")
        .into_iter()
        .map(|model| {
            let b = buckets(samples, "sfs_serve_score", &[("model", &model)]);
            let mut below = 0.0;
            let bars: Vec<Value> = b
                .iter()
                .map(|&(le, cum)| {
                    let n = cum - below;
                    below = cum;
                    json!({"le": if le.is_infinite() { Value::from("+Inf") } else { json!(round(le, 3)) }, "count": n})
                })
                .collect();
            json!({
                "model": model,
                "count": b.last().map_or(0.0, |x| x.1),
                "p50": opt(quantile(&b, 0.5), 3),
                "buckets": bars,
            })
        })
        .collect();
    let breaker = sum(samples, "sfs_serve_breaker_state", &[]);
    json!({
        "routes": routes,
        "breaker_state": breaker,
        "breaker": match breaker as i64 { 0 => "closed", 1 => "half-open", _ => "open" },
        "scores": scores,
    })
}

/// The server counters whose rates [`serving_status`] shows.
pub fn serving_counters(samples: &[Sample]) -> BTreeMap<String, f64> {
    SCORING_ROUTES
        .iter()
        .map(|route| {
            (
                format!("route:{route}"),
                sum(
                    samples,
                    "sfs_serve_request_duration_seconds_count",
                    &[("route", route)],
                ),
            )
        })
        .collect()
}

/// Drift and parity metrics (`sfs_drift_psi`, `sfs_parity_*`) wherever found.
pub fn quality_status(samples: &[Sample]) -> Value {
    let pick = |f: &dyn Fn(&str) -> bool| -> Vec<Value> {
        samples
            .iter()
            .filter(|s| f(&s.name))
            .map(|s| json!({"metric": s.name, "labels": s.labels, "value": s.value}))
            .collect()
    };
    json!({
        "drift": pick(&|n| n.starts_with("sfs_drift_psi")),
        "parity": pick(&|n| n.starts_with("sfs_parity_")),
    })
}

/// What `/status.json` needs beyond the app state.
#[derive(Debug, Default)]
pub struct StatusState {
    /// The stream job's `/metrics` addresses (one per process).
    pub stream_metrics: Vec<String>,
    job_rates: Rates,
    serve_rates: Rates,
}

impl StatusState {
    pub fn new(stream_metrics: Vec<String>) -> StatusState {
        StatusState {
            stream_metrics,
            ..Default::default()
        }
    }

    /// The status JSON: `own` is the server's metrics text, `models` the active models.
    pub async fn snapshot(&self, own: &str, models: Value, now_ms: i64) -> Value {
        let mut job_text = String::new();
        let mut errors = Vec::new();
        for addr in &self.stream_metrics {
            match scrape(addr, Duration::from_millis(500)).await {
                Ok(text) => job_text.push_str(&text),
                Err(e) => errors.push(e),
            }
        }
        let job = parse(&job_text);
        let serve = parse(own);
        let gap = Duration::from_millis(900);
        let job_rates = self.job_rates.update(job_counters(&job), gap);
        let serve_rates = self.serve_rates.update(serving_counters(&serve), gap);
        let mut all = job.clone();
        all.extend(serve.iter().cloned());
        let mut job_status = job_status(&job, &job_rates, now_ms);
        job_status["up"] = json!(!job.is_empty());
        job_status["sources"] = json!(self.stream_metrics);
        job_status["errors"] = json!(errors);
        json!({
            "at_ms": now_ms,
            "job": job_status,
            "serving": serving_status(&serve, &serve_rates),
            "models": models,
            "quality": quality_status(&all),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_labels_and_quantiles() {
        let text = "# HELP x y\nsfs_a_total{topic=\"t\\\"1\",partition=\"0\"} 3\nsfs_a_total{topic=\"u\",partition=\"1\"} 4.5\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"2.0\"} 4\nh_bucket{le=\"+Inf\"} 4\nplain 7 1700000000\n";
        let s = parse(text);
        assert_eq!(s.len(), 6);
        assert_eq!(s[0].label("topic"), "t\"1");
        assert_eq!(sum(&s, "sfs_a_total", &[]), 7.5);
        assert_eq!(sum(&s, "sfs_a_total", &[("topic", "u")]), 4.5);
        assert_eq!(sum(&s, "plain", &[]), 7.0);
        let b = buckets(&s, "h", &[]);
        assert_eq!(b.len(), 3);
        assert_eq!(quantile(&b, 0.5), Some(1.0));
        assert_eq!(quantile(&b, 0.75), Some(1.5));
        assert_eq!(quantile(&[], 0.5), None);
        assert!(sum(&s, "absent", &[]).is_sign_positive());
    }

    #[test]
    fn chunked_bodies_are_joined() {
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(http_body(raw, "h").unwrap(), "abcde");
        assert!(http_body(b"HTTP/1.1 404 Not Found\r\n\r\n", "h").is_err());
    }
}
