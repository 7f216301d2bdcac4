//! Metrics of the Redis sink and the progress stage, registered once per
//! process and shared by every worker.

use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Registry, Unit};

/// Metrics of the Redis sink.
#[derive(Debug, Clone)]
pub struct SinkMetrics {
    /// Rows written (new values).
    pub rows_written: Counter,
    /// Rows deleted (all windows empty).
    pub rows_deleted: Counter,
    /// Rows the compare-and-set skipped (a newer or equal row was stored).
    pub rows_skipped: Counter,
    /// Rows written or deleted directly, above the write ceiling (no compare).
    pub rows_direct: Counter,
    /// Rows written as their changed fields only.
    pub rows_partial: Counter,
    /// Seconds per batch (all round trips of one frontier).
    pub batch_seconds: Histogram,
    /// Rows per batch.
    pub batch_rows: Histogram,
    /// Redis errors; each is retried with backoff.
    pub redis_errors: Counter,
    /// 1 while a writer waits for Redis to come back.
    pub stalled: Gauge,
    /// The durable frontier (ms): every row before it is in Redis, and the progress record says so.
    pub durable_frontier_ms: Gauge,
    /// Wall clock minus the dataflow frontier, seconds.
    pub frontier_lag_seconds: Gauge<f64, AtomicU64>,
    /// Kafka append time to Redis visibility of each record, seconds.
    pub freshness_seconds: Histogram,
}

impl Default for SinkMetrics {
    fn default() -> Self {
        SinkMetrics {
            rows_written: Counter::default(),
            rows_deleted: Counter::default(),
            rows_skipped: Counter::default(),
            rows_direct: Counter::default(),
            rows_partial: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 12)),
            redis_errors: Counter::default(),
            stalled: Gauge::default(),
            durable_frontier_ms: Gauge::default(),
            frontier_lag_seconds: Gauge::default(),
            freshness_seconds: Histogram::new(exponential_buckets(0.001, 1.5, 30)),
        }
    }
}

impl SinkMetrics {
    /// Registers every metric under `registry` (names prefixed `sink_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("sink");
        r.register(
            "rows_written",
            "Feature rows written to Redis",
            self.rows_written.clone(),
        );
        r.register(
            "rows_deleted",
            "Feature rows deleted because all their windows are empty",
            self.rows_deleted.clone(),
        );
        r.register(
            "rows_skipped",
            "Rows the compare-and-set skipped because Redis held a newer one",
            self.rows_skipped.clone(),
        );
        r.register(
            "rows_direct",
            "Rows written or deleted above the write ceiling, without the compare-and-set",
            self.rows_direct.clone(),
        );
        r.register(
            "rows_partial",
            "Rows written as only the fields that changed since this process wrote them",
            self.rows_partial.clone(),
        );
        r.register_with_unit(
            "batch",
            "Latency of one sink batch (all round trips of one frontier)",
            Unit::Seconds,
            self.batch_seconds.clone(),
        );
        r.register("batch_rows", "Rows per sink batch", self.batch_rows.clone());
        r.register(
            "redis_errors",
            "Redis errors, each retried with backoff",
            self.redis_errors.clone(),
        );
        r.register(
            "stalled",
            "1 while a sink waits for Redis to come back",
            self.stalled.clone(),
        );
        r.register(
            "durable_frontier_ms",
            "Frontier recorded in the progress record (ms)",
            self.durable_frontier_ms.clone(),
        );
        r.register_with_unit(
            "frontier_lag",
            "Wall clock minus the acknowledged dataflow frontier",
            Unit::Seconds,
            self.frontier_lag_seconds.clone(),
        );
        r.register_with_unit(
            "feature_freshness",
            "Kafka append time to Redis visibility, per record",
            Unit::Seconds,
            self.freshness_seconds.clone(),
        );
    }
}
