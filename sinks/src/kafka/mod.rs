//! The dead-letter sink: records that did not become data go to
//! `<topic>.dlq` with their original key and bytes, and headers naming the
//! reason and the source coordinates.
//!
//! Delivery is at least once: the sink's acknowledgement frontier passes `F`
//! only once every dead letter before `F` is acknowledged by Kafka, and the
//! progress stage waits for it; a restart skips dead letters of offsets
//! before the durable offsets it resumed with, so duplicates are confined to
//! records read between the last durable frontier and a crash.

use std::collections::BTreeMap;
use std::fmt::Display;

use operators::kafka::{DeadLetter, Detached, Rejection, TopicPartition};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::ClientConfig;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

/// Header: short reason code (`decode`, `invalid`, `too_late`, ...).
pub const HEADER_REASON: &str = "sfs.error";
/// Header: the error message.
pub const HEADER_MESSAGE: &str = "sfs.error.message";
/// Header: source topic.
pub const HEADER_TOPIC: &str = "sfs.source.topic";
/// Header: source partition (decimal).
pub const HEADER_PARTITION: &str = "sfs.source.partition";
/// Header: source offset (decimal).
pub const HEADER_OFFSET: &str = "sfs.source.offset";
/// Header: source Kafka timestamp, ms (decimal), when known.
pub const HEADER_TIMESTAMP: &str = "sfs.source.timestamp";

/// The dead-letter topic of a source topic.
pub fn dlq_topic(topic: &str) -> String {
    schemas::event::dlq_topic(topic)
}

/// Something that can say why a record was rejected.
pub trait Reason {
    /// A short, stable code for the header.
    fn code(&self) -> &'static str;
}

/// Labels of the dead-letter counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeadLetterLabels {
    pub topic: String,
    pub reason: String,
}

/// Metrics of the dead-letter sink.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterMetrics {
    /// Dead letters produced, per source topic and reason.
    pub produced: Family<DeadLetterLabels, Counter>,
    /// Producer errors (retried).
    pub errors: Counter,
}

impl DeadLetterMetrics {
    /// Registers under `registry` (names prefixed `dlq_`).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("dlq");
        r.register(
            "records",
            "Records sent to dead-letter topics",
            self.produced.clone(),
        );
        r.register(
            "producer_errors",
            "Dead-letter producer errors, retried",
            self.errors.clone(),
        );
    }
}

/// The headers of a dead letter.
pub fn headers<E: Display + Reason>(letter: &DeadLetter<E>) -> OwnedHeaders {
    let (code, message) = match &letter.reason {
        Rejection::Decode(error) => (error.code(), error.to_string()),
        Rejection::TooLate {
            event_ms,
            watermark_ms,
        } => (
            "too_late",
            format!(
                "event time {event_ms} is past the late limit behind the watermark {watermark_ms}"
            ),
        ),
    };
    let partition = letter.partition.to_string();
    let offset = letter.offset.to_string();
    let mut headers = OwnedHeaders::new_with_capacity(6)
        .insert(Header {
            key: HEADER_REASON,
            value: Some(code),
        })
        .insert(Header {
            key: HEADER_MESSAGE,
            value: Some(&message),
        })
        .insert(Header {
            key: HEADER_TOPIC,
            value: Some(&letter.topic),
        })
        .insert(Header {
            key: HEADER_PARTITION,
            value: Some(&partition),
        })
        .insert(Header {
            key: HEADER_OFFSET,
            value: Some(&offset),
        });
    if let Some(ts) = letter.timestamp_ms {
        headers = headers.insert(Header {
            key: HEADER_TIMESTAMP,
            value: Some(&ts.to_string()),
        });
    }
    headers
}

/// Creates the dead-letter producer (idempotent, retrying for as long as it takes).
pub fn producer(
    brokers: &str,
    extra: &BTreeMap<String, String>,
) -> Result<ThreadedProducer<DefaultProducerContext>, KafkaError> {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("delivery.timeout.ms", "2147483647")
        .set("message.timeout.ms", "0");
    for (k, v) in extra {
        cc.set(k, v);
    }
    cc.create()
}

/// Writes dead letters to `<topic>.dlq`.
pub trait DeadLetterSink<'scope> {
    /// Produces each dead letter (skipping those of offsets before `skip_before`
    /// for their partition: a previous run delivered them). Returns the
    /// acknowledgements: their frontier passes `F` once every dead letter
    /// before `F` is acknowledged by Kafka.
    fn dead_letter_sink(
        self,
        producer: ThreadedProducer<DefaultProducerContext>,
        skip_before: BTreeMap<TopicPartition, i64>,
        metrics: DeadLetterMetrics,
    ) -> Stream<'scope, u64, Vec<()>>;
}

impl<'scope, E> DeadLetterSink<'scope> for Stream<'scope, u64, Vec<DeadLetter<E>>>
where
    E: Display + Reason + Clone + 'static,
{
    fn dead_letter_sink(
        self,
        producer: ThreadedProducer<DefaultProducerContext>,
        skip_before: BTreeMap<TopicPartition, i64>,
        metrics: DeadLetterMetrics,
    ) -> Stream<'scope, u64, Vec<()>> {
        let scope = self.scope();
        let mut builder = OperatorBuilder::new("DeadLetterSink".to_owned(), scope);
        let info = builder.operator_info();
        let mut input = builder.new_input(self, Pipeline);
        let (_acks_out, acks) = builder.new_output::<Vec<()>>();
        let activator = scope.activator_for(info.address);
        let mut dlq_topics: BTreeMap<String, String> = BTreeMap::new();
        let producer = Detached::new(producer, "dead-letter producer");

        builder.build(move |mut caps| {
            let mut held: Option<Capability<u64>> = caps.pop();
            let mut queue: Vec<DeadLetter<E>> = Vec::new();
            move |frontiers| {
                input.for_each(|_, data| queue.append(data));
                let mut retry = Vec::new();
                for letter in queue.drain(..) {
                    let tp = TopicPartition::new(letter.topic.clone(), letter.partition);
                    if skip_before.get(&tp).is_some_and(|skip| letter.offset < *skip) {
                        continue;
                    }
                    let topic = dlq_topics.entry(letter.topic.clone()).or_insert_with(|| dlq_topic(&letter.topic));
                    let code = match &letter.reason {
                        Rejection::Decode(error) => error.code(),
                        Rejection::TooLate { .. } => "too_late",
                    };
                    let mut record = BaseRecord::<[u8], [u8]>::to(topic).headers(headers(&letter));
                    if let Some(key) = &letter.key {
                        record = record.key(key.as_slice());
                    }
                    if let Some(payload) = &letter.payload {
                        record = record.payload(payload.as_slice());
                    }
                    match producer.send(record) {
                        Ok(()) => {
                            metrics.produced.get_or_create(&DeadLetterLabels { topic: letter.topic.clone(), reason: code.to_owned() }).inc();
                        }
                        Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => retry.push(letter),
                        Err((error, _)) => {
                            metrics.errors.inc();
                            tracing::warn!(%error, topic = %letter.topic, "dead-letter send failed, retrying");
                            retry.push(letter);
                        }
                    }
                }
                queue = retry;
                // Acknowledge up to the input frontier once Kafka has everything.
                if queue.is_empty() && producer.in_flight_count() == 0 {
                    match frontiers[0].frontier().first() {
                        Some(f) => {
                            if let Some(cap) = held.as_mut() {
                                if cap.time() < f {
                                    cap.downgrade(f);
                                }
                            }
                        }
                        None => held = None,
                    }
                } else {
                    activator.activate_after(std::time::Duration::from_millis(5));
                }
            }
        });
        acks
    }
}
