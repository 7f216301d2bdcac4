//! Open-loop load generator for `sfs serve` (bench/serve). Each connection is a
//! thread with a fixed schedule: request i of the run is due at t0 + i/rate,
//! spread round-robin over the connections. Latency is measured from the due
//! time, not the send time, so a stalled server is charged for the requests it
//! delayed (no coordinated omission). Prints one JSON line per rate and a
//! summary line with the machine, commit and configuration.
//!
//! usage: serve-loadgen [--addr 127.0.0.1:8080] [--rates 1000,5000,10000]
//!        [--duration-secs 10] [--connections 64] [--find-max]
//!        [--seed-redis redis://127.0.0.1:6379 --key-prefix bench: --entities 10000]
//!        [--features features.toml] [--bodies FILE [--path /score/fraud]]
//!
//! Seeding writes a row for ids `{entity}-0` .. `{entity}-{n-1}` of every
//! entity of the feature definitions (`--features`, else `$SFS_FEATURES`,
//! else `features.toml`), which must be the server's.
//!
//! `--bodies FILE` sends the JSON request bodies of FILE (one per line, in
//! order, round and round) to `--path` instead of synthetic `card-{i}` requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use schemas::features::{FeatureRow, FeatureSet, Value, ValueKind};
use server::features::{request_feature, AMOUNT_MEAN, AMOUNT_STD, LAST_TIME};

struct Args {
    addr: SocketAddr,
    rates: Vec<u64>,
    duration: Duration,
    connections: usize,
    find_max: bool,
    max_p99_ms: f64,
    seed_redis: Option<String>,
    key_prefix: String,
    entities: usize,
    features: Option<PathBuf>,
    bodies: Option<PathBuf>,
    path: String,
}

fn parse_args() -> Args {
    let mut a = Args {
        addr: "127.0.0.1:8080".parse().expect("literal address"),
        rates: vec![1000, 5000, 10000],
        duration: Duration::from_secs(10),
        connections: 64,
        find_max: false,
        max_p99_ms: 10.0,
        seed_redis: None,
        key_prefix: "bench:".into(),
        entities: 10_000,
        features: None,
        bodies: None,
        path: "/score/fraud".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--addr" => a.addr = val().parse().expect("--addr host:port"),
            "--rates" => {
                a.rates = val()
                    .split(',')
                    .map(|r| r.trim().parse().expect("--rates n,n"))
                    .collect()
            }
            "--duration-secs" => {
                a.duration = Duration::from_secs_f64(val().parse().expect("--duration-secs"))
            }
            "--connections" => a.connections = val().parse().expect("--connections"),
            "--find-max" => a.find_max = true,
            "--max-p99-ms" => a.max_p99_ms = val().parse().expect("--max-p99-ms"),
            "--seed-redis" => a.seed_redis = Some(val()),
            "--key-prefix" => a.key_prefix = val(),
            "--entities" => a.entities = val().parse().expect("--entities"),
            "--features" => a.features = Some(val().into()),
            "--bodies" => a.bodies = Some(val().into()),
            "--path" => a.path = val(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

/// Writes `n` rows of every entity with the shared encoding.
fn seed(url: &str, prefix: &str, n: usize, set: &FeatureSet) -> redis::RedisResult<()> {
    let mut conn = redis::Client::open(url)?.get_connection()?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            let mean = 1000.0 + (i % 97) as f64 * 100.0;
            for entity in &set.entities {
                let values = entity
                    .features
                    .iter()
                    .map(|f| match (Some(f.name.as_str()), f.kind()) {
                        (n, _) if n == request_feature(set, AMOUNT_MEAN) => Value::Float(mean),
                        (n, _) if n == request_feature(set, AMOUNT_STD) => Value::Float(mean / 3.0),
                        (n, _) if n == request_feature(set, LAST_TIME) => {
                            Value::Int(now - (i as i64 % 3600) * 1000)
                        }
                        (_, ValueKind::Float) => Value::Float(mean),
                        (_, ValueKind::Int) => Value::Int((i % 7) as i64 + 1),
                    })
                    .collect();
                let row = FeatureRow {
                    entity: entity.clone(),
                    id: format!("{}-{i}", entity.name),
                    as_of_ms: now,
                    values,
                };
                pipe.hset_multiple(
                    entity.redis_key(prefix, &row.id),
                    &row.encode_fields(&set.version),
                )
                .ignore();
            }
        }
        pipe.query::<()>(&mut conn)?;
    }
    Ok(())
}

fn synthetic_body(i: usize, entities: usize) -> String {
    let e = (i * 7919) % entities.max(1);
    format!(
        r#"{{"card_id":"card-{e}","user_id":"user-{e}","amount_minor":{},"country":"DE","channel":"pos"}}"#,
        500 + (i * 37) % 20_000
    )
}

fn request_bytes(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// The requests the connections cycle through: `--bodies`' lines, else 64
/// synthetic ones per connection.
fn requests(args: &Args) -> std::sync::Arc<Vec<Vec<u8>>> {
    let requests: Vec<Vec<u8>> = match &args.bodies {
        Some(file) => std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading --bodies {}: {e}", file.display()))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|body| request_bytes(&args.path, body))
            .collect(),
        None => (0..64 * args.connections.max(1))
            .map(|i| request_bytes(&args.path, &synthetic_body(i, args.entities)))
            .collect(),
    };
    assert!(!requests.is_empty(), "--bodies has no request bodies");
    std::sync::Arc::new(requests)
}

/// Reads one response; returns its status.
fn read_response(reader: &mut BufReader<TcpStream>, line: &mut String) -> std::io::Result<u16> {
    line.clear();
    reader.read_line(line)?;
    let status = line.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut len = 0usize;
    loop {
        line.clear();
        if reader.read_line(line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body)?;
    Ok(status)
}

struct Outcome {
    latencies_ns: Vec<u64>,
    errors: u64,
    late_sends: u64,
}

fn run_rate(args: &Args, rate: u64) -> serde_json::Value {
    let total = (rate as f64 * args.duration.as_secs_f64()) as usize;
    let conns = args.connections.max(1);
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let all = requests(args);
    let t0 = Instant::now() + Duration::from_millis(200);
    let threads: Vec<_> = (0..conns)
        .map(|c| {
            let (addr, requests) = (args.addr, std::sync::Arc::clone(&all));
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).expect("connecting to the server");
                stream.set_nodelay(true).expect("nodelay");
                let mut writer = stream.try_clone().expect("cloning the socket");
                let mut reader = BufReader::new(stream);
                let mut line = String::new();
                let mut out = Outcome {
                    latencies_ns: Vec::with_capacity(total / conns + 1),
                    errors: 0,
                    late_sends: 0,
                };
                let mut i = c;
                while i < total {
                    let due = t0 + interval * i as u32;
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    } else if now - due > Duration::from_millis(1) {
                        out.late_sends += 1;
                    }
                    let ok = writer
                        .write_all(&requests[i % requests.len()])
                        .and_then(|()| read_response(&mut reader, &mut line));
                    let latency = Instant::now().saturating_duration_since(due);
                    match ok {
                        Ok(200) => out.latencies_ns.push(latency.as_nanos() as u64),
                        Ok(_) => out.errors += 1,
                        Err(_) => {
                            out.errors += 1;
                            break;
                        }
                    }
                    i += conns;
                }
                out
            })
        })
        .collect();
    let mut lat = Vec::with_capacity(total);
    let (mut errors, mut late) = (0, 0);
    for t in threads {
        let o = t.join().expect("load thread");
        lat.extend(o.latencies_ns);
        errors += o.errors;
        late += o.late_sends;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            f64::NAN
        } else {
            lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1] as f64 / 1e6
        }
    };
    let achieved = lat.len() as f64 / elapsed;
    serde_json::json!({
        "offered_rps": rate,
        "achieved_rps": (achieved * 10.0).round() / 10.0,
        "requests": total,
        "ok": lat.len(),
        "errors": errors,
        "sends_over_1ms_late": late,
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": pct(1.0),
    })
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
    });
    serde_json::json!({
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "cpu": cpu,
        "os": std::env::consts::OS,
    })
}

fn commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned()).filter(|s| !s.is_empty())
}

fn main() {
    let args = parse_args();
    if let Some(url) = &args.seed_redis {
        let set = FeatureSet::load_default(args.features.as_deref())
            .unwrap_or_else(|e| panic!("loading the feature definitions: {e}"));
        seed(url, &args.key_prefix, args.entities, &set).expect("seeding Redis");
        eprintln!(
            "seeded {} rows of each entity ({}) under {} (feature set {})",
            args.entities,
            set.entities
                .iter()
                .map(|e| e.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            args.key_prefix,
            set.version
        );
    }
    let config = serde_json::json!({
        "addr": args.addr.to_string(),
        "duration_secs": args.duration.as_secs_f64(),
        "connections": args.connections,
        "entities": args.entities,
        "route": args.path,
        "bodies": args.bodies.as_ref().map(|p| p.display().to_string()),
    });
    let header = serde_json::json!({"bench": "serve", "machine": machine(), "commit": commit(), "config": config});
    let mut results = Vec::new();
    for &rate in &args.rates {
        let r = run_rate(&args, rate);
        println!(
            "{}",
            serde_json::json!({"bench": "serve", "kind": "rate", "result": r})
        );
        results.push(r);
    }
    let mut max_sustainable = None;
    if args.find_max {
        // Double, then bisect, the offered rate while the server keeps up:
        // >= 98% of the offered rate answered and p99 under --max-p99-ms.
        let keeps_up = |r: &serde_json::Value| {
            r["errors"] == 0
                && r["achieved_rps"].as_f64().unwrap_or(0.0)
                    >= 0.98 * r["offered_rps"].as_f64().unwrap_or(1.0)
                && r["p99_ms"].as_f64().is_some_and(|p| p <= args.max_p99_ms)
        };
        let (mut lo, mut hi) = (0u64, 0u64);
        let mut rate = args.rates.iter().copied().max().unwrap_or(1000);
        for _ in 0..10 {
            let r = run_rate(&args, rate);
            println!(
                "{}",
                serde_json::json!({"bench": "serve", "kind": "search", "result": r})
            );
            if keeps_up(&r) {
                lo = rate;
                if hi == 0 {
                    rate *= 2;
                } else {
                    rate = (lo + hi) / 2;
                }
            } else {
                hi = rate;
                rate = (lo + hi) / 2;
            }
            if hi > 0 && hi - lo <= hi / 10 {
                break;
            }
        }
        max_sustainable = Some(lo);
    }
    println!(
        "{}",
        serde_json::json!({
            "bench": "serve",
            "kind": "summary",
            "machine": header["machine"],
            "commit": header["commit"],
            "config": header["config"],
            "results": results,
            "max_sustainable_rps": max_sustainable,
            "max_sustainable_rule": format!(">= 98% answered, no errors, p99 <= {} ms", args.max_p99_ms),
        })
    );
}
