//! `sfs dlq replay`: re-publishes dead letters to the topic they came from,
//! once the cause is fixed (a schema registered, a validation limit raised, a
//! producer bug fixed).
//!
//! The replay reads a dead-letter topic up to the high watermarks captured at
//! start, re-produces each record's key and payload to its source topic (the
//! `sfs.source.topic` header) with an `sfs.replayed_from` header naming the
//! dead letter, waits for every delivery, and only then commits the
//! dead-letter offsets to its consumer group. A second run therefore replays
//! nothing twice; a crash before the commit replays again (at least once,
//! which the stream job's exactly-once sink makes harmless for rows).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use operators::kafka::Detached;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sinks::kafka::{HEADER_REASON, HEADER_TOPIC};

/// Header added to every replayed record: `<dlq topic>/<partition>/<offset>`.
pub const HEADER_REPLAYED_FROM: &str = "sfs.replayed_from";

/// Arguments of `sfs dlq replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The dead-letter topic to replay, e.g. `txn.events.dlq`.
    #[arg(long)]
    pub topic: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Consumer group whose committed offsets mark what was already replayed.
    #[arg(long, default_value = "sfs-dlq-replay")]
    pub group_id: String,
    /// Replay only dead letters with this `sfs.error` reason (repeatable).
    #[arg(long = "reason")]
    pub reasons: Vec<String>,
    /// Count what would be replayed, produce and commit nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Give up when Kafka does not answer for this long.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records re-published, per source topic.
    pub replayed: BTreeMap<String, u64>,
    /// Records skipped by the reason filter.
    pub filtered: u64,
    /// Records without a source-topic header (not written by sfs): skipped.
    pub unknown_source: u64,
}

impl ReplaySummary {
    pub fn total(&self) -> u64 {
        self.replayed.values().sum()
    }
}

fn header<'a>(message: &'a impl Message, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Calls `f` until it succeeds or `limit` has passed; returns its last result.
fn retrying<T>(
    limit: Duration,
    mut f: impl FnMut() -> rdkafka::error::KafkaResult<T>,
) -> rdkafka::error::KafkaResult<T> {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "kafka group call failed, retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
            result => return result,
        }
    }
}

/// Replays `args.topic` to the end it had at start. Blocking.
pub async fn replay(args: &ReplayArgs) -> anyhow::Result<ReplaySummary> {
    let timeout = Duration::from_secs(args.timeout_secs);
    // Closed on a thread of its own (its close has no time limit).
    let consumer = Detached::new(
        ClientConfig::new()
            .set("bootstrap.servers", &args.brokers)
            .set("group.id", &args.group_id)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .create::<BaseConsumer>()
            .context("creating the dead-letter consumer")?,
        "dead-letter reader",
    );
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()
        .context("creating the replay producer")?;

    let metadata = consumer
        .fetch_metadata(Some(&args.topic), timeout)
        .with_context(|| format!("reading the metadata of {}", args.topic))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    if partitions.is_empty() {
        bail!("dead-letter topic {} does not exist", args.topic);
    }

    // Where to start (the group's committed offsets) and where to stop (the
    // high watermarks now), per partition.
    let mut wanted = TopicPartitionList::new();
    for &p in &partitions {
        wanted.add_partition(&args.topic, p);
    }
    // A fresh group coordinator answers NotCoordinator / load-in-progress for
    // a moment (the offsets topic is being created or loaded): retry until the
    // timeout, then report the last error.
    let committed = retrying(timeout, || {
        consumer.committed_offsets(wanted.clone(), timeout)
    })
    .context("reading the replay group's committed offsets")?;
    let mut assignment = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for &p in &partitions {
        let (low, high) = consumer.fetch_watermarks(&args.topic, p, timeout)?;
        let start = match committed.find_partition(&args.topic, p).map(|e| e.offset()) {
            Some(Offset::Offset(o)) => o.max(low),
            _ => low,
        };
        if start < high {
            assignment.add_partition_offset(&args.topic, p, Offset::Offset(start))?;
            ends.insert(p, high);
        }
    }
    let pending: i64 = ends.len() as i64;
    tracing::info!(topic = %args.topic, partitions_with_work = pending, "replaying dead letters");

    let mut summary = ReplaySummary::default();
    let mut next = BTreeMap::new();
    if !ends.is_empty() {
        consumer.assign(&assignment)?;
        let mut deliveries = Vec::new();
        let mut last_progress = Instant::now();
        let mut quiet_since = Instant::now();
        while !ends.is_empty() {
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                if quiet_since.elapsed() > timeout {
                    bail!(
                        "no records from {} for {timeout:?} before reaching its end",
                        args.topic
                    );
                }
                continue;
            };
            quiet_since = Instant::now();
            let message = message.context("reading a dead letter")?;
            let (p, offset) = (message.partition(), message.offset());
            next.insert(p, offset + 1);
            if ends.get(&p).is_some_and(|&end| offset + 1 >= end) {
                ends.remove(&p);
            }
            let reason = header(&message, HEADER_REASON).unwrap_or("");
            if !args.reasons.is_empty() && !args.reasons.iter().any(|r| r == reason) {
                summary.filtered += 1;
                continue;
            }
            let Some(source) = header(&message, HEADER_TOPIC) else {
                summary.unknown_source += 1;
                continue;
            };
            *summary.replayed.entry(source.to_owned()).or_default() += 1;
            if args.dry_run {
                continue;
            }
            let from = format!("{}/{p}/{offset}", args.topic);
            let headers = OwnedHeaders::new().insert(Header {
                key: HEADER_REPLAYED_FROM,
                value: Some(&from),
            });
            let mut record = FutureRecord::<[u8], [u8]>::to(source).headers(headers);
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            deliveries.push(producer.send_result(record).map_err(|(e, _)| e)?);
            if last_progress.elapsed() > Duration::from_secs(2) {
                tracing::info!(replayed = summary.total(), "replaying");
                last_progress = Instant::now();
            }
        }
        for delivery in deliveries {
            delivery
                .await
                .context("the replay producer was dropped")?
                .map_err(|(e, _)| e)
                .context("re-publishing a dead letter")?;
        }
    }

    if !args.dry_run && !next.is_empty() {
        let mut commit = TopicPartitionList::new();
        for (p, offset) in &next {
            commit.add_partition_offset(&args.topic, *p, Offset::Offset(*offset))?;
        }
        retrying(timeout, || consumer.commit(&commit, CommitMode::Sync))
            .context("committing the replayed dead-letter offsets")?;
    }
    Ok(summary)
}

/// `sfs dlq replay`: runs the replay and prints a one-line summary.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the replay runtime")?;
    let summary = runtime.block_on(replay(&args))?;
    let per_topic: Vec<String> = summary
        .replayed
        .iter()
        .map(|(t, n)| format!("{t}={n}"))
        .collect();
    println!(
        "dlq replay: {} dead letters from {} {} ({}), {} filtered by reason, {} without a source topic",
        summary.total(),
        args.topic,
        if args.dry_run { "would be re-published" } else { "re-published" },
        if per_topic.is_empty() { "none".to_owned() } else { per_topic.join(" ") },
        summary.filtered,
        summary.unknown_source,
    );
    Ok(())
}
