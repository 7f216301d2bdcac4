//! The event log a backfill replays: the feature sources' events and the
//! fraud labels, read from the generator's files (`sfs generate --out
//! avro|json`) or from Kafka up to the high watermarks seen at start.
//!
//! The log is held in memory, each stream ordered by event time (a stable
//! sort: the generator already writes in order, Kafka partitions are merged).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use dataflow::compile::Event;
use operators::kafka::Detached;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::BorrowedMessage;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use schemas::container::ContainerReader;
use schemas::features::Schema;
use schemas::{Click, FeatureSet, Label, Txn};

/// The events of a log, by time.
#[derive(Debug, Default)]
pub struct EventLog {
    /// Every event of a feature source, with the index of its source in the
    /// feature set, ordered by event time.
    pub events: Vec<(usize, Event)>,
    /// The fraud labels, ordered by label time.
    pub labels: Vec<Label>,
    /// Records left out as the stream job dead-letters them: unreadable
    /// (Kafka only: a file that does not parse fails as a whole) or invalid.
    pub skipped: u64,
}

impl EventLog {
    /// The latest event or label time, if any.
    pub fn end_ms(&self) -> Option<i64> {
        let events = self.events.last().map(|(_, e)| e.event_time());
        let labels = self.labels.last().map(|l| l.label_time);
        events.max(labels)
    }

    fn sort(&mut self) {
        self.events.sort_by_key(|(_, e)| e.event_time());
        self.labels.sort_by_key(|l| l.label_time);
    }
}

/// Where the log comes from.
#[derive(Debug, Clone)]
pub enum LogSource {
    /// A directory of `<topic>.avro` or `<topic>.jsonl` files.
    Files(PathBuf),
    /// Kafka topics, read from the beginning to the high watermarks at start.
    Kafka { brokers: String, timeout: Duration },
}

/// The topics to read: each feature source's (after overrides) and the labels'.
#[derive(Debug, Clone)]
pub struct Topics {
    /// One per `FeatureSet::sources`, in order.
    pub sources: Vec<String>,
    pub labels: String,
}

/// Reads the whole log.
pub fn read(source: &LogSource, set: &FeatureSet, topics: &Topics) -> anyhow::Result<EventLog> {
    let mut log = match source {
        LogSource::Files(dir) => read_files(dir, set, topics)?,
        LogSource::Kafka { brokers, timeout } => read_kafka(brokers, *timeout, set, topics)?,
    };
    log.sort();
    Ok(log)
}

fn file_of(dir: &Path, topic: &str) -> Option<PathBuf> {
    ["avro", "jsonl"]
        .iter()
        .map(|ext| dir.join(format!("{topic}.{ext}")))
        .find(|p| p.is_file())
}

/// Reads `path` (`.avro` container or `.jsonl`) as events of type `E`
/// into `out` (each through `wrap`), leaving out (and counting) those the
/// stream job would dead-letter as invalid. Files carry no record
/// timestamp, so the future-time bound is not applied. `out` grows once, by
/// the number of records the file holds.
fn read_valid<E: schemas::Event, T>(
    path: &Path,
    skipped: &mut u64,
    out: &mut Vec<T>,
    wrap: impl Fn(E) -> T,
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let what = || format!("{}", path.display());
    let reader = if path.extension().is_some_and(|e| e == "avro") {
        Some(ContainerReader::<E>::new(&bytes).with_context(what)?)
    } else {
        None
    };
    out.reserve(match &reader {
        Some(reader) => reader.remaining().unwrap_or(0),
        None => bytes.iter().filter(|b| **b == b'\n').count(),
    });
    let limits = schemas::Limits::default();
    let mut push = |event: E| {
        if event.validate(event.time_ms(), &limits).is_ok() {
            out.push(wrap(event));
        } else {
            *skipped += 1;
        }
    };
    match reader {
        Some(reader) => {
            for event in reader {
                push(event.with_context(what)?);
            }
        }
        None => {
            let lines = bytes.split(|b| *b == b'\n').enumerate();
            for (i, line) in lines.filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace)) {
                let event = serde_json::from_slice(line)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))?;
                push(event);
            }
        }
    }
    Ok(())
}

fn read_files(dir: &Path, set: &FeatureSet, topics: &Topics) -> anyhow::Result<EventLog> {
    anyhow::ensure!(
        dir.is_dir(),
        "{} is not a directory: give the --out-dir of `sfs generate --out avro|json`",
        dir.display()
    );
    let mut log = EventLog::default();
    for (index, (def, topic)) in set.sources.iter().zip(&topics.sources).enumerate() {
        let path = file_of(dir, topic).with_context(|| {
            format!(
                "no {topic}.avro or {topic}.jsonl in {} (source {})",
                dir.display(),
                def.name
            )
        })?;
        let (events, skipped) = (&mut log.events, &mut log.skipped);
        match def.schema {
            Schema::Txn => read_valid(&path, skipped, events, |t: Txn| (index, Event::Txn(t)))?,
            Schema::Click => {
                read_valid(&path, skipped, events, |c: Click| (index, Event::Click(c)))?
            }
        }
    }
    match file_of(dir, &topics.labels) {
        Some(path) => read_valid(&path, &mut log.skipped, &mut log.labels, |l: Label| l)?,
        None => tracing::warn!(
            dir = %dir.display(),
            topic = %topics.labels,
            "no label file: every transaction's label is unknown"
        ),
    }
    Ok(log)
}

/// What one topic holds in the log.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Source(usize, Schema),
    Labels,
}

fn read_kafka(
    brokers: &str,
    timeout: Duration,
    set: &FeatureSet,
    topics: &Topics,
) -> anyhow::Result<EventLog> {
    let mut kinds: Vec<(String, Kind)> = set
        .sources
        .iter()
        .zip(&topics.sources)
        .enumerate()
        .map(|(i, (def, topic))| (topic.clone(), Kind::Source(i, def.schema)))
        .collect();
    kinds.push((topics.labels.clone(), Kind::Labels));
    let names: Vec<String> = kinds.iter().map(|(t, _)| t.clone()).collect();
    let mut log = EventLog::default();
    let mut decoder = schemas::codec::Decoder::new(schemas::registry::from_env());
    read_topics(brokers, timeout, &names, |topic, message| {
        let payload = message.payload().unwrap_or_default();
        // As the stream job: the record's timestamp bounds future event times.
        let now_ms = message
            .timestamp()
            .to_millis()
            .filter(|t| *t > 0)
            .unwrap_or(i64::MAX / 2);
        let read = match kinds[topic].1 {
            Kind::Source(i, Schema::Txn) => decoder
                .decode::<Txn>(payload, now_ms)
                .map(|t| log.events.push((i, Event::Txn(t)))),
            Kind::Source(i, Schema::Click) => decoder
                .decode::<Click>(payload, now_ms)
                .map(|c| log.events.push((i, Event::Click(c)))),
            Kind::Labels => decoder
                .decode::<Label>(payload, now_ms)
                .map(|l| log.labels.push(l)),
        };
        if let Err(e) = read {
            log.skipped += 1;
            tracing::debug!(topic = %names[topic], partition = message.partition(), offset = message.offset(), error = %e, "skipped an unreadable record");
        }
    })?;
    Ok(log)
}

/// Reads every partition of `topics` from the beginning up to its high
/// watermark at start, handing each record to `each` with the index of its
/// topic. A missing or empty topic is skipped with a warning.
pub fn read_topics(
    brokers: &str,
    timeout: Duration,
    topics: &[String],
    mut each: impl FnMut(usize, &BorrowedMessage<'_>),
) -> anyhow::Result<()> {
    // Closed on a thread of its own (its close has no time limit).
    let consumer = Detached::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", "sfs-offline")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create::<BaseConsumer>()
            .with_context(|| format!("creating a Kafka consumer for {brokers}"))?,
        "log reader",
    );
    let meta_timeout = Duration::from_secs(10);
    let mut assignment = TopicPartitionList::new();
    // (topic, partition) -> the high watermark at start: read up to it.
    let mut ends = std::collections::HashMap::new();
    for topic in topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), meta_timeout)
            .with_context(|| format!("Kafka metadata of {topic} from {brokers}"))?;
        for t in metadata.topics() {
            for p in t.partitions() {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p.id(), meta_timeout)
                    .with_context(|| format!("watermarks of {topic}/{}", p.id()))?;
                if high > low {
                    assignment.add_partition_offset(topic, p.id(), Offset::Beginning)?;
                    ends.insert((topic.clone(), p.id()), high);
                }
            }
        }
        if ends.keys().all(|(t, _)| t != topic) {
            tracing::warn!(topic = %topic, "topic is missing or empty");
        }
    }
    if ends.is_empty() {
        return Ok(());
    }
    consumer.assign(&assignment)?;
    let deadline = Instant::now() + timeout;
    while !ends.is_empty() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading Kafka took longer than {} s with {} partitions unfinished: \
             is the broker at {brokers} up? (raise --kafka-timeout for a bigger log)",
            timeout.as_secs(),
            ends.len()
        );
        let Some(message) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let message = message.context("consuming from Kafka")?;
        let key = (message.topic().to_owned(), message.partition());
        let Some(&end) = ends.get(&key) else { continue };
        if message.offset() >= end {
            ends.remove(&key);
            continue;
        }
        if message.offset() + 1 >= end {
            ends.remove(&key);
        }
        let topic = topics
            .iter()
            .position(|t| *t == key.0)
            .expect("assigned topics only");
        each(topic, &message);
    }
    Ok(())
}
