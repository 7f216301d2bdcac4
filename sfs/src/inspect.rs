//! `sfs inspect`: one terminal screen of the running system: per-topic
//! rates and consumer lag, the frontier and its lag, freshness, dead letters
//! per reason, a few live rows from Redis and the models in use. Refreshes
//! until Ctrl-C; `--once` prints one screen and exits.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use server::status::{job_counters, job_status, parse, scrape_blocking, Sample};

/// Show the stream job, Redis and the server on one screen.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  sfs inspect                      # refresh every 2 s until Ctrl-C\n  sfs inspect --once --rows 10\n  sfs inspect --metrics 127.0.0.1:8088 --server 127.0.0.1:8080 --key-prefix sfs:"
)]
pub struct InspectArgs {
    /// The stream job's /metrics address (repeatable, one per process).
    #[arg(long = "metrics", value_name = "HOST:PORT", default_values_t = vec!["127.0.0.1:8088".to_string()])]
    pub metrics: Vec<String>,
    /// The scoring server (for the models in use); empty skips it.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub server: String,
    /// Redis URL (live rows).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of the feature keys in Redis.
    #[arg(long, env = "SFS_KEY_PREFIX", default_value = "sfs:")]
    pub key_prefix: String,
    /// Live rows to show per entity.
    #[arg(long, default_value_t = 3)]
    pub rows: usize,
    /// Refresh interval (ms).
    #[arg(long, default_value_t = 2000)]
    pub interval_ms: u64,
    /// Print one screen and exit (rates measured over one second).
    #[arg(long)]
    pub once: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn iso(ms: f64) -> String {
    let secs = (ms / 1000.0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Scrapes every job address; the samples and the errors.
fn scrape_job(addrs: &[String]) -> (Vec<Sample>, Vec<String>) {
    let mut samples = Vec::new();
    let mut errors = Vec::new();
    for addr in addrs {
        match scrape_blocking(addr, Duration::from_millis(1000)) {
            Ok(text) => samples.extend(parse(&text)),
            Err(e) => errors.push(e),
        }
    }
    (samples, errors)
}

fn rates(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    secs: f64,
) -> BTreeMap<String, f64> {
    after
        .iter()
        .map(|(k, v)| {
            let b = before.get(k).copied().unwrap_or(0.0);
            (k.clone(), (v - b).max(0.0) / secs.max(1e-3))
        })
        .collect()
}

/// A few rows per entity: `(key, as_of_ms, fields)`.
type LiveRow = (String, Option<i64>, Vec<(String, String)>);

fn live_rows(args: &InspectArgs) -> Result<Vec<LiveRow>, String> {
    let client = redis::Client::open(args.redis_url.as_str())
        .map_err(|e| format!("bad --redis-url {}: {e}", args.redis_url))?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(1000))
        .map_err(|e| format!("cannot reach Redis at {}: {e}", args.redis_url))?;
    let mut out = Vec::new();
    for entity in ["card", "user"] {
        let pattern = format!("{}{entity}:*", args.key_prefix);
        let mut cursor = 0u64;
        let mut keys: Vec<String> = Vec::new();
        for _ in 0..50 {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query(&mut conn)
                .map_err(|e| format!("SCAN on Redis failed: {e}"))?;
            keys.extend(batch);
            cursor = next;
            if cursor == 0 || keys.len() >= args.rows {
                break;
            }
        }
        keys.sort();
        for key in keys.into_iter().take(args.rows) {
            let fields: BTreeMap<String, String> = redis::cmd("HGETALL")
                .arg(&key)
                .query(&mut conn)
                .map_err(|e| format!("HGETALL {key} failed: {e}"))?;
            let as_of = fields.get("_as_of").and_then(|v| v.parse().ok());
            let shown = fields
                .into_iter()
                .filter(|(k, _)| !k.starts_with('_'))
                .collect();
            out.push((key, as_of, shown));
        }
    }
    Ok(out)
}

fn models(server: &str) -> Result<Vec<serde_json::Value>, String> {
    let body = scrape_blocking(&format!("{server}/models"), Duration::from_millis(1000))?;
    let json: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("{server}/models is not JSON: {e}"))?;
    Ok(json["models"].as_array().cloned().unwrap_or_default())
}

/// One screen of text.
pub fn screen(args: &InspectArgs, gap: Duration) -> String {
    let (first, _) = scrape_job(&args.metrics);
    let started = Instant::now();
    std::thread::sleep(gap);
    let (samples, errors) = scrape_job(&args.metrics);
    let secs = started.elapsed().as_secs_f64();
    let rates = rates(&job_counters(&first), &job_counters(&samples), secs);
    let now = now_ms();
    let job = job_status(&samples, &rates, now);
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);

    let mut out = String::new();
    let _ = writeln!(
        out,
        "sfs inspect · job {} · redis {} prefix {} · {}",
        args.metrics.join(","),
        args.redis_url,
        args.key_prefix,
        iso(now as f64)
    );
    for e in &errors {
        let _ = writeln!(
            out,
            "! stream job: {e}: start `sfs stream` (it serves /metrics on --metrics-listen) or pass --metrics HOST:PORT"
        );
    }
    let _ = writeln!(
        out,
        "\n{:<44} {:>10} {:>10} {:>8} {:>7} {:>7}",
        "TOPIC", "RECORDS/S", "RECORDS", "LAG", "LAG S", "LATE"
    );
    for t in job["topics"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<44} {:>10.1} {:>10} {:>8} {:>7.2} {:>7}",
            t["topic"].as_str().unwrap_or(""),
            f(&t["records_per_s"]),
            f(&t["records_total"]),
            f(&t["lag_records"]),
            f(&t["lag_seconds"]),
            f(&t["late_total"]),
        );
    }
    let frontier = f(&job["frontier_ms"]);
    let _ = writeln!(
        out,
        "\nfrontier   {}  (lag {:.2} s)",
        if frontier > 0.0 {
            format!(
                "{} = {frontier} ms, {:.1} s ago",
                iso(frontier),
                (now as f64 - frontier) / 1000.0
            )
        } else {
            "none recorded yet".into()
        },
        f(&job["frontier_lag_seconds"])
    );
    let ms = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("-".to_string(), |s| format!("{:.1} ms", s * 1000.0))
    };
    let _ = writeln!(
        out,
        "freshness  p50 {}  p99 {}  ({} records)",
        ms(&job["freshness_p50_s"]),
        ms(&job["freshness_p99_s"]),
        f(&job["freshness_count"])
    );
    let _ = writeln!(
        out,
        "sink       {} rows written ({:.1}/s), {} redis errors{}",
        f(&job["rows_written_total"]),
        f(&job["rows_per_s"]),
        f(&job["redis_errors_total"]),
        if job["sink_stalled"].as_bool() == Some(true) {
            "  STALLED: retrying Redis"
        } else {
            ""
        }
    );
    let _ = writeln!(
        out,
        "\nDEAD LETTERS {} (fix, then `sfs dlq replay`)",
        f(&job["dead_letters_total"])
    );
    for d in job["dead_letters"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<44} {:<24} {:>6}",
            d["topic"].as_str().unwrap_or(""),
            d["reason"].as_str().unwrap_or(""),
            f(&d["count"])
        );
    }
    let _ = writeln!(out, "\nLIVE ROWS");
    match live_rows(args) {
        Ok(rows) if rows.is_empty() => {
            let _ = writeln!(
                out,
                "  no rows under {} yet: is `sfs stream` writing with this --key-prefix?",
                args.key_prefix
            );
        }
        Ok(rows) => {
            for (key, as_of, fields) in rows {
                let age = as_of.map_or("?".into(), |t| {
                    format!("{:.1} s ago", (now - t) as f64 / 1000.0)
                });
                let shown: Vec<String> = fields
                    .iter()
                    .take(5)
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = writeln!(out, "  {key}  as of {age}  {}", shown.join(" "));
            }
        }
        Err(e) => {
            let _ = writeln!(out, "  ! {e}: start Redis (make up) or pass --redis-url");
        }
    }
    let _ = writeln!(out, "\nMODELS");
    if args.server.is_empty() {
        let _ = writeln!(out, "  (no --server given)");
    } else {
        match models(&args.server) {
            Ok(models) => {
                for m in models {
                    let _ = writeln!(
                        out,
                        "  {:<12} {:<28} {}",
                        m["name"].as_str().unwrap_or(""),
                        m["model_version"].as_str().unwrap_or(""),
                        m["engine"].as_str().unwrap_or("")
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(
                    out,
                    "  ! scoring server: {e}: start `sfs serve` or pass --server HOST:PORT"
                );
            }
        }
    }
    out
}

/// `sfs inspect`.
pub fn run(args: InspectArgs) -> anyhow::Result<()> {
    if args.once {
        print!("{}", screen(&args, Duration::from_secs(1)));
        return Ok(());
    }
    let gap = Duration::from_millis(args.interval_ms.max(200));
    loop {
        let text = screen(&args, gap);
        // Clear the terminal and draw from the top.
        print!("\x1b[2J\x1b[H{text}");
        use std::io::Write;
        std::io::stdout().flush()?;
    }
}
