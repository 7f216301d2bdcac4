//! The served-vector log: a sample of scored requests published to Kafka
//! (`scores.log`, one [`ScoreRecord`] per request, keyed by request id) so
//! that `sfs parity` can recompute each served vector offline.
//!
//! Never on the request's path: the handler offers the record to a bounded
//! queue with a non-blocking `try_send` (a full queue drops the record and
//! counts it); one background thread encodes the records and hands them to
//! librdkafka, whose own queue is bounded too and whose messages give up
//! after a short timeout. Kafka slow or down costs records, counted by
//! reason (`sfs_serve_score_log_dropped_total{reason}`), never latency.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use schemas::features::FeatureSet;
use schemas::score::{EntityRead, FeatureValue, ScoreRecord};
use schemas::Channel;

use crate::features::Context;
use crate::model::{Model, ModelKind};

/// How often a dropping log warns at most.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Settings of the log (`score_log_*` in the serve config).
#[derive(Debug, Clone)]
pub struct ScoreLogConfig {
    pub brokers: String,
    pub topic: String,
    /// Fraction of scored requests logged, 0..=1.
    pub sample_rate: f64,
    /// Capacity of the queue between the handlers and the producer thread
    /// (and of librdkafka's own queue).
    pub queue: usize,
    /// How long a record may wait for Kafka before it is dropped.
    pub message_timeout: Duration,
}

/// Why a sampled record did not reach Kafka.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// The queue to the producer thread was full (the producer is behind).
    queue_full,
    /// librdkafka's queue was full (Kafka slow or down for a while).
    kafka_queue_full,
    /// Not acknowledged within the message timeout (Kafka slow or down).
    kafka_timeout,
    /// Kafka refused it (any other delivery error).
    kafka_error,
    /// Still unacknowledged when the server's shutdown flush gave up.
    shutdown,
}

const REASONS: [DropReason; 5] = [
    DropReason::queue_full,
    DropReason::kafka_queue_full,
    DropReason::kafka_timeout,
    DropReason::kafka_error,
    DropReason::shutdown,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: DropReason,
}

/// The log's counters, registered whether or not the log is on (so that
/// dashboards see zeros rather than nothing).
#[derive(Clone)]
pub struct ScoreLogMetrics {
    sampled: Counter,
    records: Counter,
    /// By `REASONS` index, created up front so counting never allocates.
    dropped: [Counter; 5],
}

impl ScoreLogMetrics {
    pub fn register(registry: &mut Registry) -> ScoreLogMetrics {
        let sampled = Counter::default();
        let records = Counter::default();
        let family = Family::<DropLabels, Counter>::default();
        let dropped = REASONS.map(|reason| family.get_or_create(&DropLabels { reason }).clone());
        registry.register(
            "score_log_sampled",
            "Scored requests sampled for the served-vector log (scores.log)",
            sampled.clone(),
        );
        registry.register(
            "score_log_records",
            "Served-vector records acknowledged by Kafka",
            records.clone(),
        );
        registry.register(
            "score_log_dropped",
            "Sampled served-vector records dropped, by reason",
            family,
        );
        ScoreLogMetrics {
            sampled,
            records,
            dropped,
        }
    }

    fn drop(&self, reason: DropReason, n: u64) {
        self.dropped[reason as usize].inc_by(n);
    }

    fn dropped_total(&self) -> [u64; 5] {
        std::array::from_fn(|i| self.dropped[i].get())
    }
}

enum Msg {
    Record(Box<ScoreRecord>),
    /// Flush what is queued and stop, giving up at the deadline.
    Close(Instant),
}

/// The handle the handlers use: sampling and a non-blocking hand-off.
pub struct ScoreLog {
    tx: SyncSender<Msg>,
    metrics: ScoreLogMetrics,
    /// Sample when `mix(n) < threshold`; `None`: every request.
    threshold: Option<u64>,
    seed: u64,
    next: AtomicU64,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl ScoreLog {
    /// Creates the producer (it connects in the background: Kafka down does
    /// not stop the server from starting), creates the topic if missing, and
    /// starts the producer thread. `None` when the sample rate is 0.
    pub fn start(
        cfg: &ScoreLogConfig,
        metrics: ScoreLogMetrics,
    ) -> anyhow::Result<Option<ScoreLog>> {
        let rate = cfg.sample_rate;
        if !(0.0..=1.0).contains(&rate) {
            anyhow::bail!("score_log_sample_rate must be between 0 and 1, got {rate}");
        }
        if cfg.queue == 0 {
            anyhow::bail!("score_log_queue must be at least 1");
        }
        if cfg.topic.is_empty() {
            anyhow::bail!("score_log_topic must not be empty");
        }
        if rate == 0.0 {
            return Ok(None);
        }
        let context = LogContext {
            metrics: metrics.clone(),
            last_error_warn_ms: AtomicI64::new(i64::MIN),
        };
        let producer: ThreadedProducer<LogContext> = ClientConfig::new()
            .set("bootstrap.servers", &cfg.brokers)
            .set("client.id", "sfs-serve-score-log")
            .set("acks", "1")
            .set("enable.idempotence", "false")
            .set("linger.ms", "100")
            .set("compression.type", "lz4")
            .set("queue.buffering.max.messages", cfg.queue.to_string())
            .set(
                "message.timeout.ms",
                cfg.message_timeout.as_millis().max(1).to_string(),
            )
            .set("socket.connection.setup.timeout.ms", "3000")
            .create_with_context(context)
            .map_err(|e| {
                anyhow::anyhow!(
                    "score log: creating the Kafka producer for {}: {e}",
                    cfg.brokers
                )
            })?;
        let (tx, rx) = sync_channel(cfg.queue);
        let topic = cfg.topic.clone();
        let worker_metrics = metrics.clone();
        let worker = std::thread::Builder::new()
            .name("sfs-score-log".into())
            .spawn(move || produce(rx, producer, topic, worker_metrics))?;
        ensure_topic(cfg.brokers.clone(), cfg.topic.clone());
        tracing::info!(brokers = %cfg.brokers, topic = %cfg.topic, sample_rate = rate,
            queue = cfg.queue, "served-vector log on");
        Ok(Some(ScoreLog {
            tx,
            metrics,
            threshold: (rate < 1.0).then(|| (rate * 2f64.powi(64)) as u64),
            seed: std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish(),
            next: AtomicU64::new(0),
            worker: Mutex::new(Some(worker)),
        }))
    }

    /// Whether to log this request (a pseudo-random `rate` of them).
    pub fn sample(&self) -> bool {
        let Some(threshold) = self.threshold else {
            return true;
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        mix(n ^ self.seed) < threshold
    }

    /// Hands a record to the producer thread without waiting; a full queue
    /// drops it (counted).
    pub fn offer(&self, record: ScoreRecord) {
        self.metrics.sampled.inc();
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.metrics.drop(DropReason::queue_full, 1),
            // The producer thread has stopped (shutdown): nothing to send to.
            Err(TrySendError::Disconnected(_)) => self.metrics.drop(DropReason::shutdown, 1),
        }
    }

    /// At shutdown: flushes what is queued, waiting at most `timeout`;
    /// records still unacknowledged then count as dropped (`shutdown`).
    pub fn close(&self, timeout: Duration) {
        let Some(worker) = self.worker.lock().expect("never poisoned").take() else {
            return;
        };
        let deadline = Instant::now() + timeout;
        // Blocks only while the queue is full, which the worker is draining.
        if self.tx.send(Msg::Close(deadline)).is_ok() {
            let _ = worker.join();
        }
    }
}

/// splitmix64's finaliser: a well-spread 64-bit hash of a counter.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The producer's callbacks: delivery reports count records and drops;
/// client errors (brokers down) warn, at most every `WARN_EVERY`.
struct LogContext {
    metrics: ScoreLogMetrics,
    last_error_warn_ms: AtomicI64,
}

impl ClientContext for LogContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let now = crate::model::now_ms();
        let last = self.last_error_warn_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY.as_millis() as i64
            && self
                .last_error_warn_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(%error, reason, "score log: Kafka client error (records may be dropped; serving is not affected)");
        }
    }
}

impl ProducerContext for LogContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => {
                self.metrics.records.inc();
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)) => {
                self.metrics.drop(DropReason::kafka_timeout, 1);
            }
            Err(_) => self.metrics.drop(DropReason::kafka_error, 1),
        }
    }
}

/// The producer thread: encodes and produces until closed.
fn produce(
    rx: Receiver<Msg>,
    producer: ThreadedProducer<LogContext>,
    topic: String,
    metrics: ScoreLogMetrics,
) {
    let mut warned_at = Instant::now();
    let mut warned_counts = metrics.dropped_total();
    let send = |record: &ScoreRecord| {
        let payload = record.encode();
        let message = BaseRecord::<str, [u8]>::to(&topic)
            .key(record.request_id.as_str())
            .payload(&payload);
        if let Err((e, _)) = producer.send(message) {
            let reason = match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    DropReason::kafka_queue_full
                }
                _ => DropReason::kafka_error,
            };
            metrics.drop(reason, 1);
        }
    };
    let deadline = loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(Msg::Record(record)) => send(&record),
            Ok(Msg::Close(deadline)) => break deadline,
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break Instant::now() + Duration::from_secs(5),
        }
        if warned_at.elapsed() >= WARN_EVERY {
            let counts = metrics.dropped_total();
            if counts != warned_counts {
                let since: Vec<String> = REASONS
                    .iter()
                    .zip(counts.iter().zip(&warned_counts))
                    .filter(|(_, (now, before))| now > before)
                    .map(|(reason, (now, before))| format!("{reason:?}={}", now - before))
                    .collect();
                tracing::warn!(dropped = %since.join(","), topic = %topic,
                    "score log dropping records (serving is not affected)");
                warned_counts = counts;
            }
            warned_at = Instant::now();
        }
    };
    // Shutting down: what is still queued, then librdkafka's queue.
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Record(record) = msg {
            send(&record);
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    if let Err(e) = producer.flush(left) {
        let unsent = producer.in_flight_count().max(0) as u64;
        metrics.drop(DropReason::shutdown, unsent);
        tracing::warn!(error = %e, unsent, "score log: flush gave up at shutdown");
    } else {
        tracing::info!(
            records = metrics.records.get(),
            "score log flushed at shutdown"
        );
    }
}

/// Creates the topic with the broker's default partitions and replication
/// if it is missing, in the background (a broker down only warns).
fn ensure_topic(brokers: String, topic: String) {
    let spawned = std::thread::Builder::new()
        .name("sfs-score-log-admin".into())
        .spawn(move || {
            let result = (|| -> anyhow::Result<bool> {
                let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .create()?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let options = AdminOptions::new()
                    .request_timeout(Some(Duration::from_secs(10)))
                    .operation_timeout(Some(Duration::from_secs(10)));
                // -1: the broker's num.partitions and default replication.
                let new = NewTopic::new(&topic, -1, TopicReplication::Fixed(-1));
                let results = runtime.block_on(admin.create_topics([&new], &options))?;
                match results.into_iter().next() {
                    Some(Ok(_)) => Ok(true),
                    Some(Err((_, RDKafkaErrorCode::TopicAlreadyExists))) | None => Ok(false),
                    Some(Err((_, code))) => Err(anyhow::anyhow!("{code}")),
                }
            })();
            match result {
                Ok(true) => tracing::info!(%topic, "score log: created the topic"),
                Ok(false) => {}
                Err(error) => tracing::warn!(%topic, %brokers, %error,
                    "score log: could not create the topic (producing anyway)"),
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "score log: could not start the topic check");
    }
}

/// The record of one scored request (see `schemas/avro/score.v1.avsc`):
/// `reads` are the `(entity index, id)` pairs the request read, in order;
/// `x` the model input as scored.
#[allow(clippy::too_many_arguments)]
pub fn record(
    request_id: &str,
    kind: ModelKind,
    model: &Model,
    set: &FeatureSet,
    ctx: &Context,
    reads: &[(usize, &str)],
    x: &[f32],
    score: f32,
    decision: &str,
    scored_at: i64,
) -> ScoreRecord {
    let frontier = ctx.frontier_ms.unwrap_or(i64::MIN);
    ScoreRecord {
        request_id: request_id.to_owned(),
        model: kind.name().to_owned(),
        model_version: model.label.clone(),
        feature_set_version: set.version.clone(),
        scored_at,
        frontier_ms: ctx.frontier_ms,
        entities: reads
            .iter()
            .map(|&(entity, id)| EntityRead {
                entity: set.entities[entity].name.clone(),
                id: id.to_owned(),
                as_of_ms: ctx.row(entity).map(|r| r.as_of_ms.max(frontier)),
            })
            .collect(),
        event_time_ms: ctx.txn.time_ms,
        amount_minor: ctx.txn.amount_minor,
        country: ctx.txn.country.clone(),
        channel: ctx.txn.channel.map(|c| {
            match c {
                Channel::Pos => "pos",
                Channel::Ecom => "ecom",
                Channel::Atm => "atm",
            }
            .to_owned()
        }),
        features: model
            .features
            .iter()
            .zip(x)
            .map(|(name, &value)| FeatureValue {
                name: name.clone(),
                value,
            })
            .collect(),
        score: f64::from(score),
        decision: decision.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_hits_about_its_rate() {
        let threshold = (0.1 * 2f64.powi(64)) as u64;
        let hits = (0..100_000u64)
            .filter(|&n| mix(n ^ 12345) < threshold)
            .count();
        assert!((9_000..11_000).contains(&hits), "{hits} of 100000 at 0.1");
    }
}
