//! The served-vector log (`scores.log`): one record per sampled scored
//! request, as `sfs serve` answered it, read back by `sfs parity`.
//!
//! The schema is `schemas/avro/score.v1.avsc`. Records are framed with Avro's
//! single-object encoding (`C3 01`, the schema's 8-byte CRC-64-AVRO
//! fingerprint, little-endian, then the datum), so a reader needs no schema
//! registry and rejects anything written under another schema.

use std::sync::OnceLock;

use apache_avro::rabin::Rabin;
use apache_avro::Schema;
use serde::{Deserialize, Serialize};

/// Topic of the served-vector log.
pub const SCORES_TOPIC: &str = "scores.log";

/// The shipped schema text.
pub const SCHEMA_JSON: &str = include_str!("../avro/score.v1.avsc");

const MAGIC: [u8; 2] = [0xC3, 0x01];

/// One row a request read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EntityRead {
    /// Entity name in the feature definitions (e.g. `card`).
    pub entity: String,
    pub id: String,
    /// When the served row is exact as of (`max(row _as_of, frontier)`);
    /// `None` when there was no row (cold start).
    pub as_of_ms: Option<i64>,
}

/// One model input as served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureValue {
    pub name: String,
    pub value: f32,
}

/// One scored request (`Score` in `score.v1.avsc`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    pub request_id: String,
    /// `fraud` or `propensity`.
    pub model: String,
    /// The model's label, e.g. `fraud/3`.
    pub model_version: String,
    pub feature_set_version: String,
    /// Wall clock when scored, ms since the epoch.
    pub scored_at: i64,
    /// The stream job's durable frontier, read with the rows.
    pub frontier_ms: Option<i64>,
    pub entities: Vec<EntityRead>,
    /// The transaction time the request-time features used.
    pub event_time_ms: i64,
    pub amount_minor: i64,
    pub country: Option<String>,
    pub channel: Option<String>,
    /// The model input vector, in the model's order.
    pub features: Vec<FeatureValue>,
    pub score: f64,
    pub decision: String,
}

/// Why a payload is not a score record.
#[derive(Debug, thiserror::Error)]
pub enum ScoreDecodeError {
    #[error("not Avro single-object encoded (no C3 01 marker)")]
    NotSingleObject,
    #[error("written under another schema (fingerprint {0:016x}, expected score.v1)")]
    OtherSchema(u64),
    #[error("bad datum: {0}")]
    Datum(String),
}

fn schema() -> &'static (Schema, [u8; 8]) {
    static SCHEMA: OnceLock<(Schema, [u8; 8])> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        let schema = Schema::parse_str(SCHEMA_JSON).expect("the shipped score schema parses");
        let fp = schema.fingerprint::<Rabin>().bytes;
        let fingerprint: [u8; 8] = fp.as_slice().try_into().expect("Rabin is 8 bytes");
        (schema, fingerprint)
    })
}

impl ScoreRecord {
    /// The framed record.
    pub fn encode(&self) -> Vec<u8> {
        let (schema, fingerprint) = schema();
        let value = apache_avro::to_value(self).expect("a score record is serializable");
        let value = value
            .resolve(schema)
            .expect("a score record fits its own schema");
        let datum = apache_avro::to_avro_datum(schema, value).expect("a resolved value encodes");
        let mut out = Vec::with_capacity(10 + datum.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(fingerprint);
        out.extend_from_slice(&datum);
        out
    }

    /// Reads a framed record.
    pub fn decode(bytes: &[u8]) -> Result<ScoreRecord, ScoreDecodeError> {
        let (schema, fingerprint) = schema();
        if bytes.len() < 10 || bytes[..2] != MAGIC {
            return Err(ScoreDecodeError::NotSingleObject);
        }
        if bytes[2..10] != fingerprint[..] {
            let fp = u64::from_le_bytes(bytes[2..10].try_into().expect("8 bytes"));
            return Err(ScoreDecodeError::OtherSchema(fp));
        }
        let mut datum = &bytes[10..];
        let value = apache_avro::from_avro_datum(schema, &mut datum, None)
            .map_err(|e| ScoreDecodeError::Datum(e.to_string()))?;
        if !datum.is_empty() {
            return Err(ScoreDecodeError::Datum(format!(
                "{} trailing bytes",
                datum.len()
            )));
        }
        apache_avro::from_value(&value).map_err(|e| ScoreDecodeError::Datum(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ScoreRecord {
        ScoreRecord {
            request_id: "r-1".into(),
            model: "fraud".into(),
            model_version: "fraud/2".into(),
            feature_set_version: "fs-abc".into(),
            scored_at: 1_700_000_000_123,
            frontier_ms: Some(1_700_000_000_000),
            entities: vec![
                EntityRead {
                    entity: "card".into(),
                    id: "c1".into(),
                    as_of_ms: Some(1_700_000_000_000),
                },
                EntityRead {
                    entity: "user".into(),
                    id: "u1".into(),
                    as_of_ms: None,
                },
            ],
            event_time_ms: 1_700_000_000_100,
            amount_minor: 2500,
            country: Some("DE".into()),
            channel: None,
            features: vec![
                FeatureValue {
                    name: "a".into(),
                    value: 1.5,
                },
                FeatureValue {
                    name: "b".into(),
                    value: -0.25,
                },
            ],
            score: 0.125,
            decision: "approve".into(),
        }
    }

    #[test]
    fn round_trips() {
        let r = record();
        let bytes = r.encode();
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(ScoreRecord::decode(&bytes).unwrap(), r);
    }

    #[test]
    fn the_datum_is_readable_by_a_generic_avro_reader() {
        // Decode with apache-avro's generic Value, independent of the serde
        // mapping, to check the framing and field order.
        let bytes = record().encode();
        let schema = Schema::parse_str(SCHEMA_JSON).unwrap();
        let value = apache_avro::from_avro_datum(&schema, &mut &bytes[10..], None).unwrap();
        let apache_avro::types::Value::Record(fields) = value else {
            panic!("not a record")
        };
        assert_eq!(fields[0], ("request_id".into(), "r-1".into()));
        assert_eq!(fields.len(), 14);
    }

    #[test]
    fn rejects_other_framing_and_other_schemas() {
        let mut bytes = record().encode();
        assert!(matches!(
            ScoreRecord::decode(&bytes[1..]),
            Err(ScoreDecodeError::NotSingleObject)
        ));
        bytes[5] ^= 0xFF;
        assert!(matches!(
            ScoreRecord::decode(&bytes),
            Err(ScoreDecodeError::OtherSchema(_))
        ));
        let mut short = record().encode();
        short.truncate(short.len() - 3);
        assert!(matches!(
            ScoreRecord::decode(&short),
            Err(ScoreDecodeError::Datum(_))
        ));
    }
}
