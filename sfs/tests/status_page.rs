//! The status page of `sfs serve` (`GET /`) rendered by headless Chromium
//! against a real stream job and server: it updates live, and the numbers it
//! shows equal the two processes' `/metrics`. A screenshot lands in
//! `bench/out/status-page.png`.

mod stream_support;

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use stream_support::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request; returns (status, body).
fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return (0, String::new());
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = raw.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

/// The value of every sample of `name` whose label text contains each of `labels`, summed.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.rsplit_once(' ').map_or("", |x| x.0);
            series.split('{').next() == Some(name) && labels.iter().all(|w| series.contains(w))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The `data-value` of the element with `data-name="{name}"` after `anchor` in the DOM.
fn cell_after(dom: &str, anchor: &str, name: &str) -> f64 {
    let at = dom
        .find(anchor)
        .unwrap_or_else(|| panic!("{anchor} is not on the page"));
    let rest = &dom[at..];
    let needle = format!("data-name=\"{name}\" data-value=\"");
    let start = rest
        .find(&needle)
        .unwrap_or_else(|| panic!("{name} after {anchor}"))
        + needle.len();
    let value = &rest[start..start + rest[start..].find('"').unwrap()];
    value
        .parse()
        .unwrap_or_else(|_| panic!("{name} after {anchor} is {value:?}"))
}

/// The `data-value` of the element with `id`.
fn by_id(dom: &str, id: &str) -> String {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("#{id} is not on the page"));
    let rest = &dom[at..];
    let needle = "data-value=\"";
    let start = rest.find(needle).unwrap() + needle.len();
    rest[start..start + rest[start..].find('"').unwrap()].to_owned()
}

/// The upper bounds (`le`) around where the `q` quantile of histogram `name`
/// falls, from the raw cumulative buckets.
fn bucket_bounds(text: &str, name: &str, labels: &[&str], q: f64) -> (f64, f64) {
    let mut les: Vec<(f64, f64)> = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        if series.split('{').next() != Some(&format!("{name}_bucket")[..])
            || !labels.iter().all(|w| series.contains(w))
        {
            continue;
        }
        let le = series
            .split("le=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        let le: f64 = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().unwrap()
        };
        let v: f64 = value.parse().unwrap();
        match les.iter_mut().find(|(l, _)| *l == le) {
            Some(entry) => entry.1 += v,
            None => les.push((le, v)),
        }
    }
    les.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = les.last().unwrap().1;
    let mut lower = 0.0;
    for (le, count) in les {
        if count >= q * total {
            return (lower, le);
        }
        lower = le;
    }
    unreachable!()
}

fn chromium(args: &[&str]) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
        ])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("chromium runs (make test installs it: bash infra/chromium.sh install)");
    assert!(out.status.success(), "chromium failed: {}", out.status);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_status_page_shows_live_numbers_equal_to_metrics() {
    let topics = Topics::new("status");
    let prefix = format!("{}:", unique("status"));
    generate(&topics, 2000, 51);
    // Two poison messages: the page must count them per reason.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    for payload in [&b"\xffgarbage"[..], &b"\xfealso garbage"[..]] {
        producer
            .send(BaseRecord::<str, [u8]>::to(&topics.txn).payload(payload))
            .unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let job_metrics = format!("127.0.0.1:{}", free_port());
    let features = format!("{ROOT}/features.toml");
    let _job = Proc(
        Command::new(env!("CARGO_BIN_EXE_sfs"))
            .args(["stream", "-w", "2", "--idle-timeout-ms", "0"])
            .args(["--metrics-listen", &job_metrics])
            .args(["--topic", &format!("txn={}", topics.txn)])
            .args(["--topic", &format!("click={}", topics.click)])
            .args([
                "--key-prefix",
                &prefix,
                "--group-id",
                &format!("{prefix}group"),
            ])
            .env("KAFKA_BROKERS", brokers())
            .env("REDIS_URL", redis_url())
            .env("SFS_LOG", "warn")
            .env("SFS_FEATURES", &features)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let server = format!("127.0.0.1:{}", free_port());
    let _serve = Proc(
        Command::new(env!("CARGO_BIN_EXE_sfs"))
            .args(["serve", "--listen", &server, "--key-prefix", &prefix])
            .args(["--stream-metrics", &job_metrics])
            .args(["--models-dir", &format!("{ROOT}/models")])
            .args(["--features", &features])
            .env("REDIS_URL", redis_url())
            .env("SFS_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The job has read everything (the page's totals then hold still) and
    // the server is ready.
    let deadline = Instant::now() + Duration::from_secs(90);
    let scrape = |addr: &str, path: &str| http(addr, "GET", path, "").1;
    let mut last = (0.0, 0.0);
    loop {
        assert!(
            Instant::now() < deadline,
            "the job and server did not settle"
        );
        let job = scrape(&job_metrics, "/metrics");
        let letters = metric(&job, "sfs_dlq_records_total", &[]);
        let lag = metric(&job, "sfs_source_consumer_lag_records", &[]);
        let now = (
            metric(&job, "sfs_sink_rows_written_total", &[]),
            metric(&job, "sfs_sink_durable_frontier_ms", &[]),
        );
        let ready = http(&server, "GET", "/ready", "").0 == 200;
        if ready && letters == 2.0 && lag == 0.0 && now.1 > 0.0 && now == last {
            break;
        }
        last = now;
        std::thread::sleep(Duration::from_millis(1000));
    }
    let card = read_events(&topics).0[0].card_id.clone();
    for i in 0..40 {
        let body = format!(
            "{{\"card_id\":\"{card}\",\"transaction_amount\":{}.5}}",
            10 + i
        );
        assert_eq!(http(&server, "POST", "/score/fraud", &body).0, 200);
    }
    for i in 0..15 {
        let body = format!("{{\"user_id\":\"u{i}\"}}");
        assert_eq!(http(&server, "POST", "/score/propensity", &body).0, 200);
    }
    assert_eq!(
        http(&server, "POST", "/score/fraud", "{\"card_id\":1}").0,
        400
    );
    let page = http(&server, "GET", "/", "");
    assert_eq!(page.0, 200);
    assert!(
        !page.1.contains("http://") && !page.1.contains("https://") && !page.1.contains("src="),
        "the page loads nothing from elsewhere"
    );

    // Render: the page polls status.json once a second; 4.5 s of virtual time.
    let url = format!("http://{server}/");
    let dom = chromium(&["--virtual-time-budget=4500", "--dump-dom", &url]);
    let out = std::path::Path::new(ROOT).join("bench/out");
    std::fs::create_dir_all(&out).unwrap();
    let shot = out.join("status-page.png");
    chromium(&[
        "--virtual-time-budget=3000",
        "--window-size=1400,1400",
        &format!("--screenshot={}", shot.display()),
        &url,
    ]);
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot written"
    );

    let job = scrape(&job_metrics, "/metrics");
    let own = scrape(&server, "/metrics");
    let updates: u32 = dom
        .split("data-updates=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    assert!(updates >= 2, "the page updated {updates} times: {dom}");

    for topic in [&topics.txn, &topics.click] {
        let anchor = format!("data-topic=\"{topic}\"");
        let want = metric(
            &job,
            "sfs_source_records_total",
            &[&format!("topic=\"{topic}\"")],
        );
        assert!(want > 0.0);
        assert_eq!(
            cell_after(&dom, &anchor, "records"),
            want,
            "{topic} records"
        );
        assert_eq!(cell_after(&dom, &anchor, "lag_records"), 0.0);
    }
    assert_eq!(by_id(&dom, "dlq-total").parse::<f64>().unwrap(), 2.0);
    let reason = "data-reason=\"unknown_format\"";
    assert_eq!(
        cell_after(&dom, reason, "count"),
        metric(
            &job,
            "sfs_dlq_records_total",
            &["reason=\"unknown_format\""]
        )
    );
    assert_eq!(
        by_id(&dom, "frontier").parse::<f64>().unwrap(),
        metric(&job, "sfs_sink_durable_frontier_ms", &[])
    );
    assert_eq!(
        by_id(&dom, "rows").parse::<f64>().unwrap(),
        metric(&job, "sfs_sink_rows_written_total", &[])
    );
    let p99: f64 = by_id(&dom, "fresh-p99").parse().unwrap();
    let (lo, hi) = bucket_bounds(&job, "sfs_sink_feature_freshness_seconds", &[], 0.99);
    assert!(
        lo <= p99 && p99 <= hi,
        "freshness p99 {p99} outside ({lo}, {hi}]"
    );
    assert_eq!(by_id(&dom, "sink"), "0");

    let fraud = "data-route=\"score_fraud\"";
    let hist = "sfs_serve_request_duration_seconds";
    assert_eq!(cell_after(&dom, fraud, "requests"), 41.0);
    assert_eq!(
        metric(&own, &format!("{hist}_count"), &["route=\"score_fraud\""]),
        41.0
    );
    assert_eq!(cell_after(&dom, fraud, "errors"), 1.0);
    assert_eq!(
        cell_after(&dom, "data-route=\"score_propensity\"", "requests"),
        15.0
    );
    let p50 = cell_after(&dom, fraud, "p50_ms") / 1000.0;
    let (lo, hi) = bucket_bounds(&own, hist, &["route=\"score_fraud\""], 0.5);
    assert!(
        lo - 1e-6 <= p50 && p50 <= hi + 1e-6,
        "p50 {p50} outside ({lo}, {hi}]"
    );
    assert_eq!(
        by_id(&dom, "breaker"),
        metric(&own, "sfs_serve_breaker_state", &[]).to_string()
    );

    let models = scrape(&server, "/models");
    let models: serde_json::Value = serde_json::from_str(&models).unwrap();
    for m in models["models"].as_array().unwrap() {
        let row = format!(
            "data-model=\"{}\" data-version=\"{}\"",
            m["name"].as_str().unwrap(),
            m["model_version"].as_str().unwrap()
        );
        assert!(dom.contains(&row), "{row} is on the page");
    }
    let scored = metric(&own, "sfs_serve_score_count", &["model=\"fraud\""]);
    assert_eq!(scored, 40.0);
    assert!(dom.contains(&format!("data-model=\"fraud\" data-count=\"{scored}\"")));
    assert!(dom.contains("sfs_drift_psi: not measured yet"));
    // `sfs inspect --once` over the same job, Redis and server.
    let inspect = Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args([
            "inspect",
            "--once",
            "--metrics",
            &job_metrics,
            "--server",
            &server,
        ])
        .args([
            "--key-prefix",
            &prefix,
            "--redis-url",
            &redis_url(),
            "--rows",
            "2",
        ])
        .output()
        .unwrap();
    assert!(inspect.status.success());
    let text = String::from_utf8_lossy(&inspect.stdout);
    for topic in [&topics.txn, &topics.click] {
        let want = metric(
            &job,
            "sfs_source_records_total",
            &[&format!("topic=\"{topic}\"")],
        );
        let line = text
            .lines()
            .find(|l| l.starts_with(topic.as_str()))
            .unwrap_or_else(|| panic!("{topic} in {text}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cols[2].parse::<f64>().unwrap(), want, "{line}");
        assert_eq!(cols[3], "0", "lag: {line}");
    }
    let letters = text
        .lines()
        .find(|l| l.contains("unknown_format"))
        .expect("dead letters by reason");
    assert!(letters.trim_end().ends_with(" 2"), "{letters}");
    let frontier = metric(&job, "sfs_sink_durable_frontier_ms", &[]);
    assert!(text.contains(&format!("= {frontier} ms")), "{text}");
    let rows = text
        .lines()
        .filter(|l| l.trim_start().starts_with(&prefix))
        .count();
    assert_eq!(rows, 4, "two card and two user rows: {text}");
    for m in models["models"].as_array().unwrap() {
        assert!(
            text.contains(m["model_version"].as_str().unwrap()),
            "{text}"
        );
    }
    eprintln!("{text}");
    eprintln!(
        "status page: {updates} live updates in 4.5 s of virtual time; screenshot {}",
        shot.display()
    );
}
