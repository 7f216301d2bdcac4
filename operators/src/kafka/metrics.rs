//! Metrics of the Kafka source, registered once per process and shared by
//! every worker. Label sets are bounded by the partitions owned; handles are
//! resolved at assignment, so nothing is allocated per record.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of a per-partition series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub topic: String,
    pub partition: i32,
}

/// Metrics of the Kafka source.
#[derive(Debug, Clone, Default)]
pub struct SourceMetrics {
    /// Records read, per partition.
    pub records: Family<PartitionLabels, Counter>,
    /// Records behind the watermark, clamped to it.
    pub late: Family<PartitionLabels, Counter>,
    /// Records past the late limit, dead-lettered.
    pub too_late: Family<PartitionLabels, Counter>,
    /// Records the decoder rejected, dead-lettered.
    pub rejected: Family<PartitionLabels, Counter>,
    /// High watermark minus the next offset to read.
    pub lag_records: Family<PartitionLabels, Gauge>,
    /// Wall clock minus the append time of the last record read, while lagging.
    pub lag_seconds: Family<PartitionLabels, Gauge<f64, AtomicU64>>,
    /// The partition's watermark (dataflow time, ms).
    pub watermark_ms: Family<PartitionLabels, Gauge>,
    /// Times an idle partition's watermark moved with the wall clock.
    pub idle_advances: Family<PartitionLabels, Counter>,
    /// Consumer errors (infrastructure faults, retried by the client).
    pub consumer_errors: Counter,
    /// Workers whose decode stage is paused (its decoder asked to retry,
    /// e.g. the schema registry is down).
    pub decode_paused: Gauge,
    /// Decode attempts deferred with a backoff.
    pub decode_retries: Counter,
}

impl SourceMetrics {
    /// Registers every metric under `registry` (names prefixed `source_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("source");
        r.register("records", "Records read from Kafka", self.records.clone());
        r.register(
            "late_records",
            "Records behind their partition's watermark, clamped to it",
            self.late.clone(),
        );
        r.register(
            "too_late_records",
            "Records past the late limit, sent to the dead-letter topic",
            self.too_late.clone(),
        );
        r.register(
            "rejected_records",
            "Records that failed to decode or validate, sent to the dead-letter topic",
            self.rejected.clone(),
        );
        r.register(
            "consumer_lag_records",
            "High watermark minus the next offset to read",
            self.lag_records.clone(),
        );
        r.register(
            "consumer_lag_seconds",
            "Wall clock minus the append time of the last record read, while behind",
            self.lag_seconds.clone(),
        );
        r.register(
            "watermark_ms",
            "The partition's watermark in dataflow time (ms)",
            self.watermark_ms.clone(),
        );
        r.register(
            "idle_advances",
            "Wall-clock advances of idle partitions' watermarks",
            self.idle_advances.clone(),
        );
        r.register(
            "consumer_errors",
            "Kafka consumer errors",
            self.consumer_errors.clone(),
        );
        r.register(
            "decode_paused",
            "Workers whose decoding is paused until a dependency (the schema registry) answers",
            self.decode_paused.clone(),
        );
        r.register(
            "decode_retries",
            "Decode attempts deferred with a backoff (the schema registry did not answer)",
            self.decode_retries.clone(),
        );
    }

    pub(crate) fn partition(&self, topic: &str, partition: i32) -> PartitionMetrics {
        let labels = PartitionLabels {
            topic: topic.to_owned(),
            partition,
        };
        PartitionMetrics {
            records: self.records.get_or_create_owned(&labels),
            late: self.late.get_or_create_owned(&labels),
            too_late: self.too_late.get_or_create_owned(&labels),
            rejected: self.rejected.get_or_create_owned(&labels),
            lag_records: self.lag_records.get_or_create_owned(&labels),
            lag_seconds: self.lag_seconds.get_or_create_owned(&labels),
            watermark_ms: self.watermark_ms.get_or_create_owned(&labels),
            idle_advances: self.idle_advances.get_or_create_owned(&labels),
        }
    }
}

/// Resolved handles of one partition.
#[derive(Debug, Clone)]
pub(crate) struct PartitionMetrics {
    pub records: Counter,
    pub late: Counter,
    pub too_late: Counter,
    pub rejected: Counter,
    pub lag_records: Gauge,
    pub lag_seconds: Gauge<f64, AtomicU64>,
    pub watermark_ms: Gauge,
    pub idle_advances: Counter,
}
