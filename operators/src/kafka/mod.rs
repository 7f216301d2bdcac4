//! The Kafka source: exact per-partition progress in event time.
//!
//! Every worker of every process computes the same partition assignment from
//! the topic metadata ([`assign()`](fn@assign)) and reads its partitions with `assign`
//! (never a group subscription, never auto-commit). Each partition has a
//! [`PartitionClock`]: its watermark is the largest event time seen minus the
//! allowed lateness, quantized down to the tick, and the source holds its
//! capability at the least watermark of its partitions. Records behind the
//! watermark are clamped to it and counted, or past the late limit
//! dead-lettered; idle, caught-up partitions advance with the wall clock.
//!
//! Alongside the data, the source emits [`PartitionMark`]s: at dataflow time
//! `w`, partition `p`'s resume point for a frontier of `w` (see [`resume`]).
//! A sink that has made every output before `F` durable records, for each
//! partition, the last mark before `F`; restarting from those points
//! rebuilds every output at `F` and later exactly.
//!
//! In bounded mode the source reads up to the high watermarks captured at
//! start, then every partition's watermark moves past all its events, the
//! workers agree on the resulting final frontier (exposed through
//! [`SourceHandle::final_frontier`]) and the source closes.

pub mod assign;
pub mod clock;
pub mod close;
pub mod decode;
pub mod metrics;
pub mod resume;
mod source;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use assign::{assign, TopicPartition};
pub use clock::{ClockConfig, PartitionClock, Placement, ResumePoint};
pub use close::{wait_for_closes, Detached};
pub use decode::{Decoded, RecordDecoder};
pub use metrics::SourceMetrics;
pub use resume::ResumeTracker;
pub use source::{KafkaOutput, KafkaSource, SourceHandle};

/// Where a partition without a recorded resume point starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartFrom {
    /// The oldest retained record.
    #[default]
    Earliest,
    /// The high watermark at start: only new records.
    Latest,
}

/// Configuration of one Kafka source.
#[derive(Debug, Clone)]
pub struct KafkaSourceConfig {
    /// Operator name, e.g. `KafkaSource(txn.events,click.events)`.
    pub name: String,
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group the durable offsets are committed to (never subscribed).
    pub group_id: String,
    /// Topics to read; their partitions are dealt over all workers.
    pub topics: Vec<String>,
    /// Event time to dataflow time.
    pub clock: ClockConfig,
    /// How far before a frontier a restart must replay (the largest window
    /// plus slack); see [`resume`].
    pub resume_horizon_ms: u64,
    /// An idle, caught-up partition advances with the wall clock after this
    /// long without records. `None`: never (and always in bounded mode).
    pub idle_timeout_ms: Option<u64>,
    /// Read up to the high watermarks captured at start, then close.
    pub bounded: bool,
    /// Records read per activation before yielding.
    pub max_records_per_activation: usize,
    /// How long to wait before polling again when nothing arrived (the
    /// consumer also wakes the operator when its queue fills).
    pub poll_interval_ms: u64,
    /// Resume points recorded by a sink; partitions not listed use `start_from`.
    pub resume: BTreeMap<TopicPartition, ResumePoint>,
    /// Start of partitions without a resume point.
    pub start_from: StartFrom,
    /// Timeout of metadata and watermark queries at start.
    pub metadata_timeout_ms: u64,
    /// Extra librdkafka consumer properties, applied last.
    pub consumer_properties: BTreeMap<String, String>,
}

impl KafkaSourceConfig {
    /// A configuration with local defaults for `topics`.
    pub fn new(
        brokers: impl Into<String>,
        group_id: impl Into<String>,
        topics: Vec<String>,
    ) -> Self {
        KafkaSourceConfig {
            name: format!("KafkaSource({})", topics.join(",")),
            brokers: brokers.into(),
            group_id: group_id.into(),
            topics,
            clock: ClockConfig {
                tick_ms: 1000,
                allowed_lateness_ms: 0,
                late_limit_ms: None,
            },
            resume_horizon_ms: 0,
            idle_timeout_ms: None,
            bounded: false,
            max_records_per_activation: 10_000,
            poll_interval_ms: 5,
            resume: BTreeMap::new(),
            start_from: StartFrom::Earliest,
            metadata_timeout_ms: 10_000,
            consumer_properties: BTreeMap::new(),
        }
    }
}

/// One record as the decoder sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceRecord<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// The Kafka timestamp (create or append time), ms.
    pub timestamp_ms: Option<i64>,
}

/// Why a record did not become data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Rejection<E> {
    /// The decoder refused it.
    Decode(E),
    /// It was further behind its partition's watermark than the late limit.
    TooLate { event_ms: i64, watermark_ms: u64 },
}

/// A record that did not become data, with its source coordinates and bytes,
/// for the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter<E> {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub reason: Rejection<E>,
}

/// The resume state of one partition as of a dataflow time: sent at time
/// `w`, it says where to restart for a frontier of `w`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionMark {
    pub topic: String,
    pub partition: i32,
    /// Where a restart re-reads from.
    pub resume: ResumePoint,
    /// Records before this offset are reflected in outputs at `w`: the offset
    /// to commit to the consumer group.
    pub durable_offset: i64,
}

/// Why the source could not start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("kafka client error: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("topic {0} does not exist or has no partitions")]
    MissingTopic(String),
}

/// Commits durable offsets to the consumer group, so external lag tools see
/// what the sinks have made durable. The group is never subscribed: this
/// consumer only commits.
pub struct OffsetCommitter {
    consumer: Detached<rdkafka::consumer::BaseConsumer>,
}

impl std::fmt::Debug for OffsetCommitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OffsetCommitter")
    }
}

impl OffsetCommitter {
    /// A committer for `group_id`.
    pub fn new(brokers: &str, group_id: &str) -> Result<OffsetCommitter, SourceError> {
        let consumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .create()?;
        Ok(OffsetCommitter {
            consumer: Detached::new(consumer, "offset committer"),
        })
    }

    /// Commits `(topic, partition, next offset)` asynchronously; failures are
    /// logged (the next durable frontier commits again).
    pub fn commit(&self, offsets: &[(&str, i32, i64)]) {
        use rdkafka::consumer::Consumer;
        let mut tpl = rdkafka::TopicPartitionList::new();
        for (topic, partition, offset) in offsets {
            if let Err(error) =
                tpl.add_partition_offset(topic, *partition, rdkafka::Offset::Offset(*offset))
            {
                tracing::warn!(%error, topic, partition, "bad offset to commit");
            }
        }
        if let Err(error) = self
            .consumer
            .commit(&tpl, rdkafka::consumer::CommitMode::Async)
        {
            tracing::warn!(%error, "offset commit failed");
        }
        // Serve the commit callback queue.
        let _ = self.consumer.poll(std::time::Duration::ZERO);
    }
}
