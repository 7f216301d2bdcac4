//! Shared helpers of the `sfs stream` end-to-end tests (real Kafka and Redis).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use dataflow::config::StreamConfig;
use dataflow::worker::RunSummary;
use operators::kafka::Detached;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use schemas::codec::Decoder;
use schemas::features::{FeatureRow, Value};
use schemas::{Click, FeatureSet, Txn};

/// The brute-force interpreter of feature definitions the dataflow tests
/// check the graph against (it shares no code with the graph).
#[path = "../../../dataflow/tests/common/interpreter.rs"]
pub mod interpreter;

use interpreter::{Definitions, Val};

/// The shipped feature definitions.
pub const SHIPPED: &str = include_str!("../../../features.toml");

/// The shipped feature definitions, parsed.
pub fn shipped() -> std::sync::Arc<FeatureSet> {
    std::sync::Arc::new(FeatureSet::parse("features.toml", SHIPPED).unwrap())
}

/// The rows of `defs` as of `frontier` over the events, by the interpreter,
/// at the job's default tick (1 s).
pub fn oracle(
    defs: &str,
    txns: &[Txn],
    clicks: &[Click],
    frontier: u64,
) -> BTreeMap<(String, String), Vec<Val>> {
    Definitions::new(defs, 1000).rows_as_of(txns, clicks, frontier)
}

thread_local! {
    /// Per-thread overrides of the brokers and the Redis URL (drills that
    /// restart a service run their own instance of it).
    static SERVICES: std::cell::RefCell<(Option<String>, Option<String>)> =
        const { std::cell::RefCell::new((None, None)) };
}

/// Points this thread's helpers at other Kafka brokers and/or Redis.
pub fn use_services(brokers: Option<&str>, redis_url: Option<&str>) {
    SERVICES.with(|s| {
        *s.borrow_mut() = (brokers.map(String::from), redis_url.map(String::from));
    });
}

pub fn brokers() -> String {
    SERVICES.with(|s| s.borrow().0.clone()).unwrap_or_else(|| {
        std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
    })
}

pub fn redis_url() -> String {
    SERVICES.with(|s| s.borrow().1.clone()).unwrap_or_else(|| {
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    })
}

/// A loopback port free now (for a service a test starts itself).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A name no other run uses.
pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("test-{name}-{}-{nanos}", std::process::id())
}

/// The test's topics.
#[derive(Debug, Clone)]
pub struct Topics {
    pub txn: String,
    pub click: String,
    pub label: String,
}

impl Topics {
    pub fn new(name: &str) -> Topics {
        let base = unique(name);
        Topics {
            txn: format!("{base}.txn"),
            click: format!("{base}.click"),
            label: format!("{base}.label"),
        }
    }
}

#[derive(Parser)]
struct GenerateCli {
    #[command(flatten)]
    args: generator::GenerateArgs,
}

/// Runs the generator into the test's topics (4 partitions each).
pub fn generate(topics: &Topics, events: u64, seed: u64) {
    generate_from(topics, events, seed, "now-3h", &[]);
}

/// Like [`generate`], from simulated `start_time`, with extra flags
/// (e.g. `--rate 1000` to pace the events over wall-clock time).
pub fn generate_from(topics: &Topics, events: u64, seed: u64, start_time: &str, extra: &[&str]) {
    let events = events.to_string();
    let seed = seed.to_string();
    let brokers = brokers();
    let mut argv = vec![
        "generate",
        "--out",
        "kafka",
        "--no-progress",
        "--brokers",
        &brokers,
        "--txn-topic",
        &topics.txn,
        "--click-topic",
        &topics.click,
        "--label-topic",
        &topics.label,
        "--events",
        &events,
        "--seed",
        &seed,
        "--users",
        "300",
        "--merchants",
        "100",
        "--items",
        "200",
        "--sim-rate",
        "3",
        "--start-time",
        start_time,
        "--partitions",
        "4",
        "--summary-json",
    ];
    argv.extend_from_slice(extra);
    let cli = GenerateCli::parse_from(argv);
    generator::run(cli.args).expect("the generator writes to kafka");
}

/// A consumer of `group` (never subscribed, no auto-commit), closed on a
/// thread of its own as the job closes its consumers.
fn group_consumer(group: &str) -> Detached<BaseConsumer> {
    let consumer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    Detached::new(consumer, "test consumer")
}

/// Every record of `topic`, from the start to the high watermarks now.
pub fn read_all(topic: &str) -> Vec<rdkafka::message::OwnedMessage> {
    let consumer = group_consumer(&unique("reader"));
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut tpl = TopicPartitionList::new();
    let mut remaining = 0;
    let mut ends = HashMap::new();
    for p in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout).unwrap();
        tpl.add_partition_offset(topic, p, Offset::Offset(low))
            .unwrap();
        remaining += high - low;
        ends.insert(p, high);
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while remaining > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "reading {topic} timed out"
        );
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            if message.offset() < ends[&message.partition()] {
                remaining -= 1;
                out.push(message.detach());
            }
        }
    }
    out
}

/// Per partition of `topic`: its number, its high watermark now, and the
/// offset `group` has committed (None: nothing committed).
pub fn committed_and_ends(group: &str, topic: &str) -> Vec<(i32, i64, Option<i64>)> {
    let consumer = group_consumer(group);
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition(topic, p.id());
    }
    let committed = consumer.committed_offsets(tpl, timeout).unwrap();
    committed
        .elements()
        .iter()
        .map(|e| {
            let (_, high) = consumer
                .fetch_watermarks(topic, e.partition(), timeout)
                .unwrap();
            let offset = match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            (e.partition(), high, offset)
        })
        .collect()
}

/// The valid events of the topics, decoded as the job decodes them.
pub fn read_events(topics: &Topics) -> (Vec<Txn>, Vec<Click>) {
    let mut decoder = Decoder::default();
    let txns = read_all(&topics.txn)
        .iter()
        .filter_map(|m| {
            decoder
                .decode_txn(m.payload()?, m.timestamp().to_millis().unwrap_or(0))
                .ok()
        })
        .collect();
    let clicks = read_all(&topics.click)
        .iter()
        .filter_map(|m| {
            decoder
                .decode_click(m.payload()?, m.timestamp().to_millis().unwrap_or(0))
                .ok()
        })
        .collect();
    (txns, clicks)
}

/// Headers of a message as strings.
pub fn headers(message: &rdkafka::message::OwnedMessage) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            let value = header
                .value
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            out.insert(header.key.to_owned(), value);
        }
    }
    out
}

/// A bounded job over the test's topics and key prefix.
pub fn stream_config(topics: &Topics, prefix: &str, workers: usize) -> StreamConfig {
    let mut config = StreamConfig::default();
    config.kafka.brokers = brokers();
    config.kafka.group_id = format!("{prefix}group");
    config.kafka.topics = [("txn", &topics.txn), ("click", &topics.click)]
        .into_iter()
        .map(|(s, t)| (s.to_owned(), t.clone()))
        .collect();
    config.redis.url = redis_url();
    config.redis.key_prefix = prefix.to_owned();
    config.metrics.listen = String::new();
    config.cluster.workers = workers;
    config.cluster.until_end = true;
    config
}

/// How long an in-process bounded job may take before its test fails.
pub const JOB_LIMIT: Duration = Duration::from_secs(180);

/// Runs a bounded job in this process, on a thread of its own: a job that
/// does not end within [`JOB_LIMIT`] fails its test instead of holding the
/// whole suite until CI's own limit. The failure shows the job's metrics.
pub fn run_job(config: StreamConfig, metrics: dataflow::metrics::Metrics) -> RunSummary {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let watched = metrics.clone();
    std::thread::Builder::new()
        .name("test-job".into())
        .spawn(move || {
            let _ = done_tx.send(dataflow::worker::run(config, shipped(), metrics));
        })
        .expect("the job thread starts");
    done_rx
        .recv_timeout(JOB_LIMIT)
        .unwrap_or_else(|_| {
            let samples: Vec<String> = watched
                .encode()
                .lines()
                .filter(|l| !l.starts_with('#'))
                .map(str::to_owned)
                .collect();
            panic!(
                "the bounded job did not end within {JOB_LIMIT:?}; its metrics:\n{}",
                samples.join("\n")
            )
        })
        .expect("the bounded job runs")
}

pub fn redis() -> redis::Connection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap()
}

/// Stored rows by (entity, id).
pub type Rows = BTreeMap<(String, String), FeatureRow>;

/// Every feature row of `defs` under `prefix`.
pub fn redis_rows(conn: &mut redis::Connection, prefix: &str, defs: &str) -> Rows {
    let set = FeatureSet::parse("test", defs).unwrap();
    let mut rows = BTreeMap::new();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(conn)
        .unwrap();
    for key in keys {
        let Some(rest) = key.strip_prefix(prefix) else {
            continue;
        };
        let Some((entity, id)) = rest.split_once(':') else {
            continue;
        };
        let Some(entity) = set.entity(entity) else {
            continue;
        };
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(conn).unwrap();
        if let Some(row) = FeatureRow::decode(entity, &set.version, id, &fields).unwrap() {
            rows.insert((entity.name.clone(), id.to_owned()), row);
        }
    }
    rows
}

/// The stored progress frontier.
pub fn progress_frontier(conn: &mut redis::Connection, prefix: &str) -> Option<u64> {
    redis::cmd("HGET")
        .arg(format!("{prefix}_progress"))
        .arg("frontier_ms")
        .query(conn)
        .unwrap()
}

/// The sink's write ceiling under `prefix`: no stored row is newer.
pub fn write_ceiling(conn: &mut redis::Connection, prefix: &str) -> Option<u64> {
    redis::cmd("HGET")
        .arg(format!("{prefix}_progress"))
        .arg("written_ms")
        .query(conn)
        .unwrap()
}

/// Asserts the stored rows are the oracle's rows as of `frontier`.
pub fn assert_rows_match_oracle(
    stored: &Rows,
    oracle: &BTreeMap<(String, String), Vec<Val>>,
    frontier: u64,
) {
    let stored_keys: Vec<_> = stored.keys().collect();
    let oracle_keys: Vec<_> = oracle.keys().collect();
    assert_eq!(
        stored_keys.len(),
        oracle_keys.len(),
        "row count differs from the oracle's"
    );
    assert_eq!(stored_keys, oracle_keys);
    for (key, values) in oracle {
        let row = &stored[key];
        let got: Vec<Val> = row
            .values
            .iter()
            .map(|v| match *v {
                Value::Int(i) => Val::Int(i),
                Value::Float(f) => Val::FloatBits(f.to_bits()),
            })
            .collect();
        assert_eq!(&got, values, "row {key:?}");
        assert!(
            row.as_of_ms as u64 <= frontier,
            "row {key:?} is ahead of the frontier"
        );
    }
}

/// Starts the real `sfs stream --until-end` binary over the test's topics and
/// key prefix; `extra` adds flags (workers, cluster).
pub fn spawn_stream(topics: &Topics, prefix: &str, extra: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args(["stream", "--until-end", "--metrics-listen", ""])
        .args(extra)
        .args(["--topic", &format!("txn={}", topics.txn)])
        .args(["--topic", &format!("click={}", topics.click)])
        .args([
            "--key-prefix",
            prefix,
            "--group-id",
            &format!("{prefix}group"),
        ])
        .env("KAFKA_BROKERS", brokers())
        .env("REDIS_URL", redis_url())
        .env("SFS_LOG", "warn")
        .env(
            "SFS_FEATURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("the sfs binary starts")
}

/// Waits for every child to exit successfully, killing all on a timeout.
pub fn wait_all(mut children: Vec<Child>, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) {
        for (i, child) in children.iter_mut().enumerate() {
            if !done[i] {
                if let Some(status) = child.try_wait().unwrap() {
                    assert!(status.success(), "process {i} failed: {status}");
                    done[i] = true;
                }
            }
        }
        if Instant::now() > deadline {
            for child in &mut children {
                let _ = child.kill();
                let _ = child.wait();
            }
            panic!("the processes did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls every row under `prefix` (at `redis_url`) until `stop`, and records
/// any `_as_of` that went backwards. Redis errors (a restart) skip a poll.
pub fn watch_as_of(
    redis_url: String,
    prefix: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    regressions: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let client = redis::Client::open(redis_url).unwrap();
        let mut conn: Option<redis::Connection> = None;
        let mut highest: BTreeMap<String, i64> = BTreeMap::new();
        let mut polls = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
            if conn.is_none() {
                conn = client
                    .get_connection_with_timeout(Duration::from_millis(200))
                    .ok();
            }
            let Some(c) = conn.as_mut() else { continue };
            let poll = (|| -> redis::RedisResult<Vec<(String, i64)>> {
                let mut keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{prefix}card:*")).query(c)?;
                let user_keys: Vec<String> =
                    redis::cmd("KEYS").arg(format!("{prefix}user:*")).query(c)?;
                keys.extend(user_keys);
                let mut out = Vec::with_capacity(keys.len());
                for key in keys {
                    let as_of: Option<i64> = redis::cmd("HGET").arg(&key).arg("_as_of").query(c)?;
                    out.extend(as_of.map(|a| (key, a)));
                }
                Ok(out)
            })();
            let Ok(seen) = poll else {
                conn = None;
                continue;
            };
            for (key, as_of) in seen {
                let high = highest.entry(key.clone()).or_insert(as_of);
                if as_of < *high {
                    regressions
                        .lock()
                        .unwrap()
                        .push(format!("{key}: {high} -> {as_of}"));
                }
                *high = (*high).max(as_of);
            }
            polls += 1;
        }
        polls
    })
}

/// A child process killed (and reaped) when the test ends, pass or fail.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
