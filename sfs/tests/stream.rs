//! `sfs stream` end to end against real Kafka and Redis: the generator's
//! events through the job equal the oracle over the same events read back
//! from Kafka; SIGKILLs at random moments change nothing; poison messages
//! land in the dead-letter topic while valid traffic flows.

mod stream_support;

use std::collections::BTreeMap;
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dataflow::metrics::Metrics;
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use schemas::codec::Encoder;
use schemas::{Channel, Txn};
use stream_support::*;

#[test]
fn generated_events_through_kafka_and_the_job_equal_the_oracle() {
    let topics = Topics::new("oracle");
    generate(&topics, 4000, 7);
    let prefix = format!("{}:", unique("oracle"));
    let config = stream_config(&topics, &prefix, 2);
    let metrics = Metrics::new();
    let summary = run_job(config, metrics.clone());
    let frontier = summary
        .progress
        .expect("worker 0 recorded progress")
        .frontier_ms;

    let mut conn = redis();
    assert_eq!(progress_frontier(&mut conn, &prefix), Some(frontier));
    let (txns, clicks) = read_events(&topics);
    assert!(
        txns.len() > 300 && clicks.len() > 1000,
        "{} txns, {} clicks",
        txns.len(),
        clicks.len()
    );
    let oracle = oracle(SHIPPED, &txns, &clicks, frontier);
    assert!(oracle.len() > 50, "the oracle has rows");
    assert_rows_match_oracle(&redis_rows(&mut conn, &prefix, SHIPPED), &oracle, frontier);
    // A fresh prefix has nothing stored: every row went the direct way
    // (`sinks/tests/sink_operator.rs` covers the partial writes that follow).
    let sink = &metrics.sink;
    assert_eq!(sink.rows_skipped.get(), 0);
    assert!(sink.rows_written.get() > 0);
    assert_eq!(
        sink.rows_direct.get(),
        sink.rows_written.get() + sink.rows_deleted.get()
    );
}

/// Adding a feature is one definition and no code: a 7-day count appended to
/// the shipped file, run by the real binary with `--features`, lands in Redis
/// under its name with the interpreter's values, and the replay horizon grows
/// with it.
#[test]
fn a_feature_added_to_the_definitions_flows_end_to_end() {
    let topics = Topics::new("txn7d");
    generate(&topics, 3000, 11);
    let prefix = format!("{}:", unique("txn7d"));
    let defs = format!(
        "{SHIPPED}\n[[features]]\nname = \"txn_count_7d\"\nentity = \"card\"\nsource = \"txn\"\naggregation = \"count\"\nwindow = \"7d\"\n"
    );
    let path = std::env::temp_dir().join(format!("{}.toml", unique("features")));
    std::fs::write(&path, &defs).unwrap();
    let child = spawn_stream(&topics, &prefix, &["--features", path.to_str().unwrap()]);
    wait_all(vec![child], Duration::from_secs(120));
    let _ = std::fs::remove_file(&path);

    let mut conn = redis();
    let frontier = progress_frontier(&mut conn, &prefix).expect("the job recorded progress");
    let (txns, clicks) = read_events(&topics);
    let expected = oracle(&defs, &txns, &clicks, frontier);
    let rows = redis_rows(&mut conn, &prefix, &defs);
    assert_rows_match_oracle(&rows, &expected, frontier);
    let card = rows
        .values()
        .find(|r| r.entity.name == "card")
        .expect("card rows");
    let count_7d = card
        .get("txn_count_7d")
        .expect("the new feature is in the row");
    assert!(count_7d.as_f64() >= card.get("txn_count_24h").unwrap().as_f64());
    let set = schemas::FeatureSet::parse("x", &defs).unwrap();
    assert_eq!(
        set.widest_window_ms(),
        7 * 86_400_000,
        "replay horizon follows the widest window"
    );
    assert_ne!(set.version, shipped().version);
}

fn txn(i: u64, base_ms: i64) -> Txn {
    Txn {
        event_id: format!("e{i}"),
        card_id: format!("c{}", i % 17),
        user_id: format!("u{}", i % 11),
        merchant_id: format!("m{}", i % 5),
        mcc: 5411,
        amount_minor: 100 + (i as i64 * 37) % 5000,
        currency: "EUR".into(),
        country: if i.is_multiple_of(3) {
            "DE".into()
        } else {
            "FR".into()
        },
        channel: Channel::Ecom,
        event_time: base_ms + i as i64 * 900,
        device_id: None,
        ip_country: None,
    }
}

#[test]
fn poison_messages_land_in_the_dead_letter_topic_while_valid_traffic_flows() {
    let topics = Topics::new("poison");
    let codec_topics = schemas::codec::Topics {
        txn: topics.txn.clone(),
        click: topics.click.clone(),
        label: topics.label.clone(),
    };
    generator::output::ensure_topics(&brokers(), &codec_topics, 2, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let encoder = Encoder::default();
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 3_600_000;
    let mut invalid = txn(999, base);
    invalid.amount_minor = -5;
    let poison: Vec<(&str, Vec<u8>)> = vec![
        ("unknown_format", b"\xffnot an event at all".to_vec()),
        (
            "unknown_schema_id",
            vec![0, 0x7f, 0xff, 0xff, 0x01, 2, 4, 6],
        ),
        ("invalid", serde_json::to_vec(&invalid).unwrap()),
    ];
    for i in 0..300u64 {
        let mut payload = Vec::new();
        encoder.encode_avro(&txn(i, base), 2, &mut payload).unwrap();
        let key = format!("c{}", i % 17);
        producer
            .send(
                BaseRecord::to(&topics.txn)
                    .key(&key)
                    .payload(&payload)
                    .partition((i % 2) as i32),
            )
            .unwrap();
        if i % 100 == 50 {
            let (_, bytes) = &poison[(i / 100) as usize];
            producer
                .send(
                    BaseRecord::to(&topics.txn)
                        .key(&key)
                        .payload(bytes)
                        .partition((i % 2) as i32),
                )
                .unwrap();
        }
    }
    producer.flush(Duration::from_secs(10)).unwrap();

    let prefix = format!("{}:", unique("poison"));
    let summary = run_job(stream_config(&topics, &prefix, 2), Metrics::new());
    let frontier = summary.progress.unwrap().frontier_ms;

    let letters = read_all(&schemas::event::dlq_topic(&topics.txn));
    assert_eq!(letters.len(), 3, "one dead letter per poison message");
    let mut seen = BTreeMap::new();
    for letter in &letters {
        let h = headers(letter);
        assert_eq!(h["sfs.source.topic"], topics.txn);
        let offset: i64 = h["sfs.source.offset"].parse().unwrap();
        let partition: i32 = h["sfs.source.partition"].parse().unwrap();
        assert!(offset >= 0 && (0..2).contains(&partition));
        assert!(!h["sfs.error.message"].is_empty());
        seen.insert(h["sfs.error"].clone(), letter.payload().unwrap().to_vec());
    }
    assert_eq!(seen.get("unknown_format"), Some(&poison[0].1));
    assert_eq!(seen.get("unknown_schema_id"), Some(&poison[1].1));
    let invalid_reason = seen
        .iter()
        .find(|(_, p)| **p == poison[2].1)
        .map(|(r, _)| r.clone())
        .expect("invalid txn dead-lettered");
    assert!(invalid_reason.contains("amount"), "{invalid_reason}");

    // Valid traffic flowed around the poison.
    let (txns, clicks) = read_events(&topics);
    assert_eq!(txns.len(), 300);
    let oracle = oracle(SHIPPED, &txns, &clicks, frontier);
    assert_rows_match_oracle(
        &redis_rows(&mut redis(), &prefix, SHIPPED),
        &oracle,
        frontier,
    );
}

/// Jobs that read at most 100 records per activation, so that their frontier
/// climbs in steps and they record progress several times before the end:
/// with the default 10,000, a fast fetch took the whole log in one step and
/// the first progress record was already the final one, so no kill could land
/// between the two. The config file lives as long as this value.
struct SmallSteps(std::path::PathBuf);

impl SmallSteps {
    fn new() -> SmallSteps {
        let path = std::env::temp_dir().join(format!("{}.toml", unique("small-steps")));
        std::fs::write(&path, "[kafka]\nmax_records_per_activation = 100\n").unwrap();
        SmallSteps(path)
    }

    fn spawn(&self, topics: &Topics, prefix: &str) -> Child {
        let config = self.0.to_str().expect("a UTF-8 temp path");
        spawn_stream(topics, prefix, &["-w", "2", "--config", config])
    }
}

impl Drop for SmallSteps {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Polls every row under `prefix` and records any `_as_of` that went backwards.
fn watch(
    prefix: String,
    stop: Arc<AtomicBool>,
    regressions: Arc<Mutex<Vec<String>>>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut conn = redis();
        let mut highest: BTreeMap<String, i64> = BTreeMap::new();
        let mut polls = 0;
        while !stop.load(Ordering::Relaxed) {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}card:*"))
                .query(&mut conn)
                .unwrap();
            let user_keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{prefix}user:*"))
                .query(&mut conn)
                .unwrap();
            for key in keys.into_iter().chain(user_keys) {
                let as_of: Option<i64> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("_as_of")
                    .query(&mut conn)
                    .unwrap();
                if let Some(as_of) = as_of {
                    let seen = highest.entry(key.clone()).or_insert(as_of);
                    if as_of < *seen {
                        regressions
                            .lock()
                            .unwrap()
                            .push(format!("{key}: {seen} -> {as_of}"));
                    }
                    *seen = (*seen).max(as_of);
                }
            }
            polls += 1;
            std::thread::sleep(Duration::from_millis(10));
        }
        polls
    })
}

#[test]
fn sigkill_at_random_moments_changes_nothing_and_no_row_regresses() {
    let topics = Topics::new("exactly-once");
    generate(&topics, 8000, 11);
    let jobs = SmallSteps::new();

    // The uninterrupted run, timed: the random kills fall within its duration.
    let mut conn = redis();
    let reference = format!("{}:", unique("reference"));
    let started = std::time::Instant::now();
    let status = jobs.spawn(&topics, &reference).wait().unwrap();
    let duration = started.elapsed().as_millis() as u64;
    assert!(status.success(), "uninterrupted run failed: {status}");
    let frontier = progress_frontier(&mut conn, &reference).unwrap();
    // Before it exited, its consumer group got the durable offsets of its last
    // progress record (for lag tools): the last commit goes out with the close.
    let offsets: String = redis::cmd("HGET")
        .arg(format!("{reference}_progress"))
        .arg("offsets")
        .query(&mut conn)
        .unwrap();
    let offsets: Vec<serde_json::Value> = serde_json::from_str(&offsets).unwrap();
    let mut checked = 0;
    for topic in [&topics.txn, &topics.click] {
        for (partition, end, committed) in committed_and_ends(&format!("{reference}group"), topic) {
            let durable = offsets
                .iter()
                .find(|p| p["topic"] == **topic && p["partition"] == partition)
                .and_then(|p| p["durable_offset"].as_i64());
            assert_eq!(committed, durable, "{topic}/{partition}: committed offset");
            assert!(durable.is_some_and(|d| d <= end), "{topic}/{partition}");
            checked += 1;
        }
    }
    assert_eq!(
        checked,
        offsets.len(),
        "every recorded partition was checked"
    );

    // The run killed again and again.
    let prefix = format!("{}:", unique("killed"));
    let stop = Arc::new(AtomicBool::new(false));
    let regressions = Arc::new(Mutex::new(Vec::new()));
    let watcher = watch(prefix.clone(), Arc::clone(&stop), Arc::clone(&regressions));
    // SFS_KILL_SEED=<seed> replays a failed run's kill schedule.
    let mut seed = std::env::var("SFS_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!(
        "uninterrupted run {duration} ms; kill schedule seed {seed} (replay: SFS_KILL_SEED={seed})"
    );
    let mut kills = Vec::new();
    for i in 0..6 {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut child = jobs.spawn(&topics, &prefix);
        let delay = if i == 0 {
            // The first kill lands the moment this run has recorded progress,
            // before its end: the next run starts over a half-written one.
            let waited = std::time::Instant::now();
            while progress_frontier(&mut conn, &prefix).is_none()
                && waited.elapsed() < Duration::from_secs(20)
                && child.try_wait().unwrap().is_none()
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            waited.elapsed().as_millis() as u64
        } else if i == 1 {
            // The second lands while rows past the recorded frontier are in
            // Redis (the write ceiling above it), if the run gets there
            // before its end: random moments alone rarely hit that window
            // when a whole run takes a few hundred ms.
            let waited = std::time::Instant::now();
            while waited.elapsed() < Duration::from_secs(20) && child.try_wait().unwrap().is_none()
            {
                // Both fields in one read: they move independently.
                let (recorded, ceiling): (Option<u64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(format!("{prefix}_progress"))
                    .arg("frontier_ms")
                    .arg("written_ms")
                    .query(&mut conn)
                    .unwrap();
                if recorded.is_some() && ceiling > recorded {
                    break;
                }
            }
            waited.elapsed().as_millis() as u64
        } else {
            // The others land anywhere within an uninterrupted run's duration.
            let delay = duration / 10 + (seed >> 33) % duration.max(1);
            std::thread::sleep(Duration::from_millis(delay));
            delay
        };
        // A kill lands mid-run when the process has not exited by itself.
        let running = child.try_wait().unwrap().is_none();
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        let recorded = progress_frontier(&mut conn, &prefix);
        kills.push((delay, running, recorded, write_ceiling(&mut conn, &prefix)));
    }
    let status = jobs.spawn(&topics, &prefix).wait().unwrap();
    assert!(status.success(), "final run failed: {status}");
    stop.store(true, Ordering::Relaxed);
    let polls = watcher.join().unwrap();
    eprintln!(
        "kills (delay ms, running, recorded frontier, write ceiling): {kills:?}; watcher polls: {polls}"
    );

    assert!(
        regressions.lock().unwrap().is_empty(),
        "rows went backwards: {:?}",
        regressions.lock().unwrap()
    );
    assert!(
        kills.iter().any(|(_, running, recorded, _)| {
            *running && recorded.is_some_and(|recorded| recorded < frontier)
        }),
        "no kill landed on a running job between its first progress and its end \
         (final frontier {frontier}): {kills:?}"
    );
    // Rows past the recorded frontier were in Redis when a job died: the
    // next run wrote those frontiers again through the compare-and-set, and
    // the watcher saw nothing go back.
    assert!(
        kills
            .iter()
            .any(|(_, _, recorded, ceiling)| ceiling.unwrap_or(0) > recorded.unwrap_or(0)),
        "no kill left rows past the recorded frontier: {kills:?}"
    );
    assert_eq!(progress_frontier(&mut conn, &prefix), Some(frontier));
    let expected = redis_rows(&mut conn, &reference, SHIPPED);
    let actual = redis_rows(&mut conn, &prefix, SHIPPED);
    assert_eq!(
        actual.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, row) in &expected {
        assert_eq!(actual[key].values, row.values, "row {key:?}");
        assert!(actual[key].as_of_ms as u64 <= frontier);
    }
    // Both equal the oracle.
    let (txns, clicks) = read_events(&topics);
    let oracle = oracle(SHIPPED, &txns, &clicks, frontier);
    assert_rows_match_oracle(&actual, &oracle, frontier);
}
