//! Kafka payloads to events, with the schemas codec (Confluent Avro or
//! JSON, validated). Failures become data: a [`DecodeFailure`] that the
//! dead-letter sink writes to `<topic>.dlq` with its reason.

use std::fmt;

use operators::kafka::{Decoded, RecordDecoder, SourceRecord};
use schemas::codec::{DecodeError, Decoder};
use schemas::features::Schema;
use schemas::FeatureSet;

pub use crate::compile::Event;
use crate::graph::SourceEvent;

/// Why a record did not decode: a stable reason code and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeFailure {
    /// Short stable code (`unknown_schema_id`, `json_syntax`, `invalid_amount`, ...).
    pub reason: &'static str,
    /// Human-readable detail.
    pub message: String,
    /// A dependency (the schema registry) did not answer: the same record
    /// may decode later.
    pub retryable: bool,
}

impl fmt::Display for DecodeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl sinks::kafka::Reason for DecodeFailure {
    fn code(&self) -> &'static str {
        self.reason
    }
}

impl From<DecodeError> for DecodeFailure {
    fn from(e: DecodeError) -> Self {
        DecodeFailure {
            reason: e.reason(),
            message: e.to_string(),
            retryable: e.is_retryable(),
        }
    }
}

/// Decodes the records of the sources' topics.
#[derive(Debug, Clone)]
pub struct EventDecoder {
    decoder: Decoder,
    /// Per topic: the index of its source and the source's schema.
    topics: Vec<(String, usize, Schema)>,
}

impl EventDecoder {
    /// A decoder of the topics of `set`'s sources (`topic_of` gives each
    /// source's topic, with any override applied).
    pub fn new(decoder: Decoder, set: &FeatureSet, topic_of: impl Fn(&str) -> String) -> Self {
        let topics = set
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| (topic_of(&s.name), i, s.schema))
            .collect();
        EventDecoder { decoder, topics }
    }

    /// The event and its event time (ms), or why not: one attempt. A schema
    /// registry that is unreachable fails with reason `registry_unavailable`;
    /// the stream job does not dead-letter that but retries (see the
    /// [`RecordDecoder`] impl).
    pub fn decode(
        &mut self,
        record: &SourceRecord<'_>,
    ) -> Result<(SourceEvent, i64), DecodeFailure> {
        self.attempt(record)
    }

    fn attempt(&mut self, record: &SourceRecord<'_>) -> Result<(SourceEvent, i64), DecodeFailure> {
        let Some(payload) = record.payload else {
            return Err(DecodeFailure {
                reason: "empty",
                message: "record has no payload".into(),
                retryable: false,
            });
        };
        // Validation bounds future event times by the record's Kafka
        // timestamp, so a replay decides the same (the wall clock without one).
        let now_ms = record
            .timestamp_ms
            .filter(|ts| *ts > 0)
            .unwrap_or_else(wall_ms);
        let Some(&(_, source, schema)) = self.topics.iter().find(|(t, _, _)| t == record.topic)
        else {
            return Err(DecodeFailure {
                reason: "unknown_topic",
                message: format!("no decoder for topic {}", record.topic),
                retryable: false,
            });
        };
        let result = match schema {
            Schema::Txn => self.decoder.decode_txn(payload, now_ms).map(|t| {
                let time = t.event_time;
                ((source, Event::Txn(t)), time)
            }),
            Schema::Click => self.decoder.decode_click(payload, now_ms).map(|c| {
                let time = c.event_time;
                ((source, Event::Click(c)), time)
            }),
        };
        result.map_err(DecodeFailure::from)
    }
}

/// In the stream job: an unreachable schema registry is an infrastructure
/// fault, not bad data. The record is deferred ([`Decoded::Retry`]): the
/// decode stage pauses with the frontier held and retries after a backoff,
/// without blocking the worker, and never dead-letters it.
impl RecordDecoder<SourceEvent, DecodeFailure> for EventDecoder {
    fn decode(&mut self, record: &SourceRecord<'_>) -> Decoded<SourceEvent, DecodeFailure> {
        match self.attempt(record) {
            Ok((event, time)) => Decoded::Data(event, time),
            Err(failure) if failure.retryable => Decoded::Retry(failure.message),
            Err(failure) => Decoded::Rejected(failure),
        }
    }
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::codec::Encoder;
    use schemas::{Channel, Txn};

    fn record<'a>(topic: &'a str, payload: &'a [u8]) -> SourceRecord<'a> {
        SourceRecord {
            topic,
            partition: 0,
            offset: 7,
            key: None,
            payload: Some(payload),
            timestamp_ms: Some(1_700_000_000_000),
        }
    }

    fn txn() -> Txn {
        Txn {
            event_id: "e1".into(),
            card_id: "c1".into(),
            user_id: "u1".into(),
            merchant_id: "m1".into(),
            mcc: 5411,
            amount_minor: 1234,
            currency: "EUR".into(),
            country: "DE".into(),
            channel: Channel::Pos,
            event_time: 1_699_999_999_000,
            device_id: None,
            ip_country: None,
        }
    }

    fn decoder() -> EventDecoder {
        let set =
            FeatureSet::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml")).unwrap();
        EventDecoder::new(Decoder::default(), &set, |source| match source {
            "txn" => "t".into(),
            _ => "c".into(),
        })
    }

    #[test]
    fn avro_and_json_transactions_decode_with_their_event_time() {
        let mut bytes = Vec::new();
        Encoder::default()
            .encode_avro(&txn(), 2, &mut bytes)
            .unwrap();
        let (event, time) = decoder().decode(&record("t", &bytes)).unwrap();
        assert_eq!(event, (0, Event::Txn(txn())));
        assert_eq!(time, 1_699_999_999_000);
        let json = serde_json::to_vec(&txn()).unwrap();
        assert_eq!(
            decoder().decode(&record("t", &json)).unwrap().0,
            (0, Event::Txn(txn()))
        );
    }

    #[test]
    fn poison_payloads_fail_with_their_reason() {
        let mut d = decoder();
        assert_eq!(
            d.decode(&record("t", b"\xff\xfegarbage"))
                .unwrap_err()
                .reason,
            "unknown_format"
        );
        assert_eq!(
            d.decode(&record("t", &[0, 0, 0, 0x7f, 0x01, 2]))
                .unwrap_err()
                .reason,
            "unknown_schema_id"
        );
        let mut bad = txn();
        bad.amount_minor = -5;
        let json = serde_json::to_vec(&bad).unwrap();
        let failure = d.decode(&record("t", &json)).unwrap_err();
        assert_ne!(failure.reason, "json_syntax", "{failure}");
        assert_eq!(
            d.decode(&record("other", b"{}")).unwrap_err().reason,
            "unknown_topic"
        );
    }
}
