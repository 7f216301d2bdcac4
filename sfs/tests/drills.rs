//! Failure drills on the real parts: the stream job (the real binary) keeps
//! streaming while the Kafka broker restarts, while Redis restarts, and
//! drains on SIGTERM. Each drill ends with a bounded run to the end of the
//! log and checks Redis against the oracle (the brute-force interpreter), and
//! a watcher checks that no row's `_as_of` ever went backwards.
//!
//! Drills that restart a service start their OWN instance of it on free ports
//! with their own data folder (infra/kafka.sh and infra/redis.sh honour
//! KAFKA_PORT, KAFKA_CONTROLLER_PORT, REDIS_PORT and SFS_DATA), never the
//! shared one, and stop it when they end (also on failure).

mod stream_support;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stream_support::*;

const INFRA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../infra");

/// A service started by its infra script on its own ports and data folder;
/// stopped (and its folder removed) on drop.
struct Own {
    script: &'static str,
    data: PathBuf,
    env: Vec<(&'static str, String)>,
}

impl Own {
    fn kafka() -> Own {
        let own = Own {
            script: "kafka",
            data: std::env::temp_dir().join(unique("drill-kafka")),
            env: vec![
                ("KAFKA_PORT", free_port().to_string()),
                ("KAFKA_CONTROLLER_PORT", free_port().to_string()),
                ("KAFKA_HEAP", "512m".into()),
            ],
        };
        own.run("start");
        own
    }

    fn redis() -> Own {
        let own = Own {
            script: "redis",
            data: std::env::temp_dir().join(unique("drill-redis")),
            env: vec![("REDIS_PORT", free_port().to_string())],
        };
        own.run("start");
        own
    }

    fn port(&self) -> &str {
        &self.env[0].1
    }

    fn run(&self, action: &str) {
        let status = Command::new("bash")
            .arg(format!("{INFRA}/{}.sh", self.script))
            .arg(action)
            .env("SFS_DATA", &self.data)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "infra/{}.sh {action} failed", self.script);
    }
}

impl Drop for Own {
    fn drop(&mut self) {
        self.run("stop");
        let _ = std::fs::remove_dir_all(&self.data);
    }
}

/// A streaming (unbounded) `sfs stream` over the test's topics, with idle
/// advances off so that its frontier never passes the bounded run's.
struct Job {
    child: Child,
    log: PathBuf,
    metrics: String,
}

impl Job {
    fn spawn(topics: &Topics, prefix: &str) -> Job {
        let metrics = format!("127.0.0.1:{}", free_port());
        let log = std::env::temp_dir().join(format!("{}.log", unique("drill-job")));
        let child = Command::new(env!("CARGO_BIN_EXE_sfs"))
            .args(["stream", "-w", "2", "--idle-timeout-ms", "0"])
            .args(["--metrics-listen", &metrics])
            .args(["--topic", &format!("txn={}", topics.txn)])
            .args(["--topic", &format!("click={}", topics.click)])
            .args(["--key-prefix", prefix])
            .args(["--group-id", &format!("{prefix}group")])
            .env("KAFKA_BROKERS", brokers())
            .env("REDIS_URL", redis_url())
            .env("SFS_LOG", "info")
            .env(
                "SFS_FEATURES",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
            )
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("the sfs binary starts");
        Job {
            child,
            log,
            metrics,
        }
    }

    /// The job's /metrics text (empty while it does not answer).
    fn scrape(&self) -> String {
        get(&self.metrics, "/metrics")
    }

    /// The sum of every sample of metric `name` (all label sets).
    fn metric(&self, name: &str) -> f64 {
        sum_samples(&self.scrape(), name)
    }

    /// SIGTERM; waits for the exit, which must be a success (else the test
    /// fails with the log's tail). Returns the time it took and stdout.
    fn terminate(mut self) -> (Duration, String) {
        let start = Instant::now();
        let sent = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let deadline = start + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "the job did not exit within 30 s of SIGTERM; log: {}",
                    self.tail_log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = start.elapsed();
        assert!(
            status.success(),
            "the job exited with {status} {elapsed:.1?} after SIGTERM; log: {}",
            self.tail_log()
        );
        let mut out = String::new();
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        (elapsed, out)
    }

    fn tail_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn log_count(&self, needle: &str) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches(needle)
            .count()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The body of `GET path` at `addr` (empty when it does not answer).
fn get(addr: &str, path: &str) -> String {
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut raw = String::new();
    let _ = stream.read_to_string(&mut raw);
    raw.split_once("\r\n\r\n")
        .map_or(String::new(), |x| x.1.to_owned())
}

/// `sfs serve` over the test's prefix, its status page scraping `job_metrics`.
fn spawn_server(prefix: &str, job_metrics: &str) -> (Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args(["serve", "--listen", &addr, "--key-prefix", prefix])
        .args(["--stream-metrics", job_metrics])
        .args([
            "--models-dir",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../models"),
        ])
        .args([
            "--features",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
        ])
        .env("REDIS_URL", redis_url())
        .env("SFS_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (child, addr)
}

/// Kills the process on drop.
struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `job.sink_stalled` of the server's `/status.json` (None while it does not answer).
fn page_says_stalled(server: &str) -> Option<bool> {
    let body = get(server, "/status.json");
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["job"]["sink_stalled"].as_bool()
}

fn sum_samples(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            (metric == name).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

fn wait_until(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

fn progress_of(prefix: &str) -> Option<u64> {
    let client = redis::Client::open(redis_url()).ok()?;
    let mut conn = client
        .get_connection_with_timeout(Duration::from_millis(500))
        .ok()?;
    redis::cmd("HGET")
        .arg(format!("{prefix}_progress"))
        .arg("frontier_ms")
        .query(&mut conn)
        .ok()?
}

/// The latest event time of the test's topics.
fn last_event_ms(topics: &Topics) -> i64 {
    let (txns, clicks) = read_events(topics);
    txns.iter()
        .map(|t| t.event_time)
        .chain(clicks.iter().map(|c| c.event_time))
        .max()
        .expect("events were generated")
}

/// Watches `_as_of` of every row under `prefix` until [`Watcher::finish`].
struct Watcher {
    stop: Arc<AtomicBool>,
    regressions: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Watcher {
    fn start(prefix: &str) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let regressions = Arc::new(Mutex::new(Vec::new()));
        let thread = watch_as_of(
            redis_url(),
            prefix.to_owned(),
            Arc::clone(&stop),
            Arc::clone(&regressions),
        );
        Watcher {
            stop,
            regressions,
            thread: Some(thread),
        }
    }

    /// Stops the watcher; asserts no row went backwards; returns its polls.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let polls = self.thread.take().unwrap().join().unwrap();
        let regressions = self.regressions.lock().unwrap();
        assert!(
            regressions.is_empty(),
            "rows went backwards: {regressions:?}"
        );
        assert!(polls > 10, "the watcher polled only {polls} times");
        polls
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs the job to the end of the log (`--until-end`) and checks every row
/// against the oracle as of the recorded frontier. Returns that frontier.
fn finish_and_check(topics: &Topics, prefix: &str) -> u64 {
    wait_all(
        vec![spawn_stream(topics, prefix, &["-w", "2"])],
        Duration::from_secs(120),
    );
    let mut conn = redis();
    let frontier = progress_frontier(&mut conn, prefix).expect("the final run recorded progress");
    let (txns, clicks) = read_events(topics);
    let expected = oracle(SHIPPED, &txns, &clicks, frontier);
    assert!(expected.len() > 50, "the oracle has rows");
    assert_rows_match_oracle(&redis_rows(&mut conn, prefix, SHIPPED), &expected, frontier);
    frontier
}

fn summary_frontier(stdout: &str) -> Option<u64> {
    let line = stdout.lines().rev().find(|l| l.contains("frontier_ms"))?;
    serde_json::from_str::<serde_json::Value>(line).ok()?["frontier_ms"].as_u64()
}

/// The broker is stopped and started again under the job; the job keeps
/// running, reads what is produced after the restart by itself, and the
/// final state equals the oracle.
#[test]
fn kafka_broker_restart_while_the_job_streams() {
    let kafka = Own::kafka();
    let own_brokers = format!("127.0.0.1:{}", kafka.port());
    use_services(Some(&own_brokers), None);
    let topics = Topics::new("drill-kafka");
    let prefix = format!("{}:", unique("drill-kafka"));
    generate(&topics, 3000, 21);
    let first_end = last_event_ms(&topics);

    let watcher = Watcher::start(&prefix);
    let mut job = Job::spawn(&topics, &prefix);
    wait_until(
        Duration::from_secs(60),
        "progress before the restart",
        || progress_of(&prefix).is_some(),
    );
    let before = progress_of(&prefix).unwrap();

    let down = Instant::now();
    kafka.run("stop");
    std::thread::sleep(Duration::from_secs(2));
    kafka.run("start");
    let outage = down.elapsed();
    assert!(job.child_alive(), "the job survived the broker restart");

    // Traffic after the restart: the job must pick it up by itself.
    generate_from(&topics, 2000, 22, &(first_end + 1000).to_string(), &[]);
    let resumed = wait_until(
        Duration::from_secs(90),
        "progress past the events produced after the restart",
        || progress_of(&prefix).is_some_and(|f| f as i64 > first_end),
    );
    let consumer_errors = job.metric("sfs_source_consumer_errors_total");
    let dlq_errors = job.metric("sfs_dlq_producer_errors_total");
    let warnings = job.log_count("WARN");
    let (took, stdout) = job.terminate();

    let frontier = finish_and_check(&topics, &prefix);
    let polls = watcher.finish();
    eprintln!(
        "drill kafka-restart: progress {before} before; broker down+up in {outage:.1?}; \
         progress past the post-restart events {resumed:.1?} after they were produced; \
         consumer errors {consumer_errors}, dlq producer errors {dlq_errors}, {warnings} WARN lines; \
         SIGTERM exit in {took:.1?} (summary frontier {:?}); final frontier {frontier} == oracle; \
         {polls} watcher polls, no _as_of regression",
        summary_frontier(&stdout)
    );
}

/// Redis is stopped under the job while events arrive: the sink stalls with
/// backoff (sfs_sink_stalled = 1, redis errors counted), then resumes by
/// itself once Redis is back; the final state equals the oracle.
#[test]
fn redis_restart_while_the_job_streams() {
    let own = Own::redis();
    let own_url = format!("redis://127.0.0.1:{}", own.port());
    use_services(None, Some(&own_url));
    let topics = Topics::new("drill-redis");
    let prefix = format!("{}:", unique("drill-redis"));
    generate(&topics, 3000, 31);
    let first_end = last_event_ms(&topics);

    let watcher = Watcher::start(&prefix);
    let mut job = Job::spawn(&topics, &prefix);
    wait_until(
        Duration::from_secs(60),
        "progress before the outage",
        || progress_of(&prefix).is_some(),
    );
    let before = progress_of(&prefix).unwrap();
    let (server, page) = spawn_server(&prefix, &job.metrics);
    let server = Kill(server);
    wait_until(Duration::from_secs(30), "the status page", || {
        page_says_stalled(&page) == Some(false)
    });

    own.run("stop");
    generate_from(&topics, 2000, 32, &(first_end + 1000).to_string(), &[]);
    let stalled_after = wait_until(
        Duration::from_secs(30),
        "sfs_sink_stalled = 1 while Redis is down",
        || job.metric("sfs_sink_stalled") >= 1.0,
    );
    std::thread::sleep(Duration::from_secs(2));
    let errors_down = job.metric("sfs_sink_redis_errors_total");
    assert!(errors_down >= 2.0, "the sink retried: {errors_down} errors");
    assert!(job.child_alive(), "the job survived the outage");
    assert_eq!(
        page_says_stalled(&page),
        Some(true),
        "the status page shows the stall"
    );

    own.run("start");
    let resumed = wait_until(
        Duration::from_secs(60),
        "the sink resuming and progress passing the events produced during the outage",
        || {
            job.metric("sfs_sink_stalled") == 0.0
                && progress_of(&prefix).is_some_and(|f| f as i64 > first_end)
        },
    );
    let errors = job.metric("sfs_sink_redis_errors_total");
    wait_until(
        Duration::from_secs(5),
        "the status page to clear the stall",
        || page_says_stalled(&page) == Some(false),
    );
    drop(server);
    let (took, _) = job.terminate();

    let frontier = finish_and_check(&topics, &prefix);
    let polls = watcher.finish();
    eprintln!(
        "drill redis-restart: progress {before} before; sink stalled {stalled_after:.1?} after Redis stopped; \
         {errors_down} redis errors while down ({errors} in all, retried with backoff); \
         the status page showed the stall and its end; resumed and recorded progress past the outage {resumed:.1?} after Redis restarted; \
         SIGTERM exit in {took:.1?}; final frontier {frontier} == oracle; {polls} watcher polls, no _as_of regression"
    );
}

/// SIGTERM while events stream in: the job records progress for what its
/// sinks acknowledged and exits 0 within 5 s; a restart finishes the log and
/// equals the oracle.
#[test]
fn sigterm_drains_the_job() {
    let topics = Topics::new("drill-term");
    let prefix = format!("{}:", unique("drill-term"));
    generate(&topics, 2000, 41);
    let first_end = last_event_ms(&topics);

    let watcher = Watcher::start(&prefix);
    let job = Job::spawn(&topics, &prefix);
    wait_until(Duration::from_secs(60), "first progress", || {
        progress_of(&prefix).is_some()
    });
    // Paced traffic: the job is busy when the signal arrives.
    let paced = {
        let topics = topics.clone();
        let (brokers, url) = (brokers(), redis_url());
        std::thread::spawn(move || {
            use_services(Some(&brokers), Some(&url));
            generate_from(
                &topics,
                6000,
                42,
                &(first_end + 1000).to_string(),
                &["--rate", "1500"],
            );
        })
    };
    wait_until(
        Duration::from_secs(60),
        "progress past the paced traffic's start",
        || progress_of(&prefix).is_some_and(|f| f as i64 > first_end),
    );
    std::thread::sleep(Duration::from_millis(700));
    let before = progress_of(&prefix).unwrap();
    let (took, stdout) = job.terminate();
    assert!(took < Duration::from_secs(5), "the drain took {took:?}");
    let recorded = progress_of(&prefix).expect("progress recorded");
    assert!(
        recorded >= before,
        "progress went back: {before} -> {recorded}"
    );
    assert_eq!(
        summary_frontier(&stdout),
        Some(recorded),
        "the job's last record is the stored one: {stdout}"
    );
    paced.join().unwrap();

    let frontier = finish_and_check(&topics, &prefix);
    let polls = watcher.finish();
    eprintln!(
        "drill sigterm: progress {before} at the signal, {recorded} recorded by the drain; \
         exit 0 in {took:.1?}; final frontier {frontier} == oracle; {polls} watcher polls, no _as_of regression"
    );
}

impl Job {
    fn child_alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}
