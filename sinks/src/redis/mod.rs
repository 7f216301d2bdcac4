//! The exactly-once, monotonic Redis online store.
//!
//! Rows are hashes `{prefix}{entity}:{id}` (see `schemas::features`). Every
//! write goes through the `sfs_apply_v2` Redis function ([`LIBRARY`]): a batch
//! of rows compare-and-set on `_as_of` (a row is written only if newer than
//! the stored one; deletes leave a tombstone so a replay cannot resurrect an
//! older row), and, in the same atomic call, optionally the progress record
//! `{prefix}_progress` (frontier and per-partition resume offsets), which
//! only moves forward.
//!
//! The dataflow side ([`sink`]): each worker's [`RedisSink`] writes the rows
//! of the keys it owns when its input frontier passes `F`, with `_as_of = F`,
//! and only then lets its acknowledgement frontier pass `F`. The
//! [`progress_stage`] (acting on worker 0) sees the acknowledgement frontier
//! of all workers' sinks, so it records frontier `F` and the resume points of
//! `F` only once every row before `F` is durable everywhere. See CONTEXT.md
//! for why a restart from that record is exactly-once.

mod freshness;
mod metrics;
mod sink;
mod writer;

use std::hash::Hasher;
use std::time::Duration;

use operators::kafka::{ResumePoint, TopicPartition};
use schemas::{Entity, Value};
use serde::{Deserialize, Serialize};

pub use freshness::AppendTimes;
pub use metrics::SinkMetrics;
pub use sink::{progress_stage, ProgressStage, RedisSink};

/// The Lua library holding `sfs_apply_v2`, loaded with `FUNCTION LOAD REPLACE`.
pub const LIBRARY: &str = include_str!("function.lua");
/// The function applying a batch.
pub const FUNCTION: &str = "sfs_apply_v2";

/// Connection and batching of the Redis sink.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSinkConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key written (`sfs:` by default).
    pub key_prefix: String,
    /// Feature-set version written as `_fv` and compared by the CAS.
    pub feature_set_version: u32,
    /// Rows per `FCALL`.
    pub rows_per_call: usize,
    /// `FCALL`s per pipelined round trip.
    pub calls_per_round_trip: usize,
    /// First retry delay after a Redis error; doubles up to the maximum.
    pub backoff_initial_ms: u64,
    /// Largest retry delay.
    pub backoff_max_ms: u64,
    /// Connect, read and write timeout.
    pub timeout_ms: u64,
}

impl RedisSinkConfig {
    /// Local defaults for `url`.
    pub fn new(url: impl Into<String>) -> RedisSinkConfig {
        RedisSinkConfig {
            url: url.into(),
            key_prefix: schemas::features::DEFAULT_KEY_PREFIX.to_owned(),
            feature_set_version: schemas::features::FEATURE_SET_VERSION,
            rows_per_call: 500,
            calls_per_round_trip: 32,
            backoff_initial_ms: 50,
            backoff_max_ms: 5_000,
            timeout_ms: 5_000,
        }
    }

    /// The progress hash.
    pub fn progress_key(&self) -> String {
        format!("{}_progress", self.key_prefix)
    }

    /// The tombstone sorted set.
    pub fn tombstone_key(&self) -> String {
        format!("{}_tombstones", self.key_prefix)
    }
}

/// Redis errors, as seen by the startup path (the sink itself retries).
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
    #[error("unexpected reply from {FUNCTION}: {0}")]
    Reply(String),
    #[error("progress record {key} is unreadable: {reason}")]
    BadProgress { key: String, reason: String },
}

/// A row change routed to the sink: the new value of a row, or its deletion.
///
/// Values stay typed until the writer thread encodes them straight into the
/// Redis request (the encoding of `schemas::features`), so the many changes
/// superseded before they are written cost no formatting or allocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowWrite {
    /// Index into `Entity::ALL`.
    entity: u8,
    /// The entity id.
    pub id: String,
    /// Feature values in `entity.features()` order; `None` deletes the row.
    #[serde(with = "values_serde")]
    pub values: Option<Vec<Value>>,
}

/// Serde for row values between processes (`schemas::Value` has none).
mod values_serde {
    use schemas::Value;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    enum Wire {
        I(i64),
        F(f64),
    }

    fn wire(v: &Value) -> Wire {
        match *v {
            Value::Int(i) => Wire::I(i),
            Value::Float(f) => Wire::F(f),
        }
    }

    struct Seq<'a>(&'a [Value]);

    impl Serialize for Seq<'_> {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(self.0.iter().map(wire))
        }
    }

    pub fn serialize<S: Serializer>(v: &Option<Vec<Value>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(v) => s.serialize_some(&Seq(v)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<Value>>, D::Error> {
        let wire: Option<Vec<Wire>> = Option::deserialize(d)?;
        Ok(wire.map(|v| {
            v.into_iter()
                .map(|w| match w {
                    Wire::I(i) => Value::Int(i),
                    Wire::F(f) => Value::Float(f),
                })
                .collect()
        }))
    }
}

impl RowWrite {
    /// The change of `entity`'s row `id` to `values` (`None`: all windows empty).
    pub fn new(entity: Entity, id: String, values: Option<&[Value]>) -> RowWrite {
        RowWrite::from_values(entity, id, values.map(<[Value]>::to_vec))
    }

    /// Like [`RowWrite::new`], taking the values without copying them.
    pub fn from_values(entity: Entity, id: String, values: Option<Vec<Value>>) -> RowWrite {
        RowWrite {
            entity: entity_index(entity),
            id,
            values,
        }
    }

    pub(crate) fn from_parts(entity: u8, id: String, values: Option<Vec<Value>>) -> RowWrite {
        RowWrite { entity, id, values }
    }

    /// Index of the entity in `Entity::ALL`.
    pub(crate) fn entity_index(&self) -> u8 {
        self.entity
    }

    /// The entity of the row.
    pub fn entity(&self) -> Entity {
        Entity::ALL[self.entity as usize]
    }

    /// The values as written to the row's hash (the shared contract's encoding).
    pub fn encoded_values(&self) -> Option<Vec<String>> {
        self.values.as_ref().map(|values| {
            let mut scratch = Vec::new();
            values
                .iter()
                .map(|v| {
                    scratch.clear();
                    encode_value(*v, &mut scratch);
                    String::from_utf8(scratch.clone()).expect("numbers are ASCII")
                })
                .collect()
        })
    }

    /// A stable hash of the row's key, to route it to one worker (the same
    /// in every process: FNV-1a over the entity and id).
    pub fn route(&self) -> u64 {
        let mut h = Fnv::default();
        h.write_u8(self.entity);
        h.write(self.id.as_bytes());
        h.finish()
    }
}

fn entity_index(entity: Entity) -> u8 {
    Entity::ALL
        .iter()
        .position(|e| *e == entity)
        .expect("entity is in Entity::ALL") as u8
}

/// Appends `value` as `schemas::features` encodes it in a row hash: integers
/// in decimal, floats as Rust's shortest round-trip `{:?}`.
pub(crate) fn encode_value(value: Value, out: &mut Vec<u8>) {
    match value {
        Value::Int(v) => out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes()),
        Value::Float(v) => {
            use std::io::Write;
            write!(out, "{v:?}").expect("writing to a Vec cannot fail");
        }
    }
}

/// FNV-1a: deterministic across processes and cheap for short keys.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        // Mix the high bits down: exchange and hash tables use the low ones.
        let h = self.0;
        h ^ (h >> 29) ^ (h >> 47)
    }
}

/// The progress of one partition in the progress record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// Where a restart re-reads from, with the partition clock there.
    pub resume: ResumePoint,
    /// Records before this offset are reflected in the rows (committed to the group).
    pub durable_offset: i64,
}

/// The progress record `{prefix}_progress`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProgressRecord {
    /// Every row change before this time is durable.
    pub frontier_ms: u64,
    /// Feature-set version of the rows.
    pub feature_set_version: u32,
    pub partitions: Vec<PartitionProgress>,
}

impl ProgressRecord {
    /// The resume points, keyed for the source.
    pub fn resume_points(&self) -> std::collections::BTreeMap<TopicPartition, ResumePoint> {
        self.partitions
            .iter()
            .map(|p| (TopicPartition::new(p.topic.clone(), p.partition), p.resume))
            .collect()
    }
}

/// Opens a connection with the configured timeouts.
pub fn connect(config: &RedisSinkConfig) -> Result<::redis::Connection, SinkError> {
    let timeout = Duration::from_millis(config.timeout_ms.max(1));
    let client = ::redis::Client::open(config.url.as_str())?;
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_write_timeout(Some(timeout))?;
    Ok(conn)
}

/// Loads (or replaces) the sink's Redis function library. Idempotent.
pub fn load_function(conn: &mut ::redis::Connection) -> Result<(), SinkError> {
    ::redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query::<String>(conn)?;
    Ok(())
}

/// Reads the progress record, if any. A record of another feature-set
/// version is returned as is; the caller decides (rows of another version
/// are always overwritten by the CAS).
pub fn read_progress(
    conn: &mut ::redis::Connection,
    config: &RedisSinkConfig,
) -> Result<Option<ProgressRecord>, SinkError> {
    let key = config.progress_key();
    let (frontier, fv, offsets): (Option<u64>, Option<u32>, Option<String>) = ::redis::cmd("HMGET")
        .arg(&key)
        .arg("frontier_ms")
        .arg("fv")
        .arg("offsets")
        .query(conn)?;
    let Some(frontier_ms) = frontier else {
        return Ok(None);
    };
    let partitions: Vec<PartitionProgress> = match offsets {
        Some(json) => serde_json::from_str(&json).map_err(|e| SinkError::BadProgress {
            key: key.clone(),
            reason: e.to_string(),
        })?,
        None => Vec::new(),
    };
    Ok(Some(ProgressRecord {
        frontier_ms,
        feature_set_version: fv.unwrap_or(0),
        partitions,
    }))
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub written: u64,
    pub deleted: u64,
    pub skipped: u64,
    /// Whether the progress record moved.
    pub progressed: bool,
}

/// Applies `rows` as of `frontier` (and the progress record, if given, with
/// the last call) synchronously, with the same function calls as the sink.
pub fn apply(
    conn: &mut ::redis::Connection,
    config: &RedisSinkConfig,
    frontier: u64,
    rows: &[RowWrite],
    progress: Option<&ProgressRecord>,
) -> Result<Applied, SinkError> {
    let json = progress.map(|p| serde_json::to_string(&p.partitions).expect("progress serializes"));
    let mut calls = writer::Calls::default();
    calls.build(
        config,
        &config.progress_key(),
        &config.tombstone_key(),
        &config.feature_set_version.to_string(),
        frontier,
        rows,
        json.as_deref(),
    );
    let mut applied = Applied::default();
    for i in 0..calls.len() {
        let replies = calls.send(conn, i..i + 1)?;
        for reply in replies {
            applied.written += reply[0];
            applied.deleted += reply[1];
            applied.skipped += reply[2];
            applied.progressed |= reply[3] == 1;
        }
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::FeatureRow;

    #[test]
    fn row_writes_encode_values_as_the_shared_contract_does() {
        let values: Vec<Value> = Entity::User
            .features()
            .iter()
            .enumerate()
            .map(|(i, _)| Value::Int(i as i64 * 10))
            .collect();
        let write = RowWrite::new(Entity::User, "u1".into(), Some(&values));
        assert_eq!(write.entity(), Entity::User);
        assert_eq!(write.encoded_values().unwrap()[3], "30");
        let mut card: Vec<Value> = Entity::Card
            .features()
            .iter()
            .map(|_| Value::Int(1))
            .collect();
        card[6] = Value::Float(2.5);
        let write = RowWrite::new(Entity::Card, "c".into(), Some(&card));
        assert_eq!(write.encoded_values().unwrap()[6], "2.5");
        assert_eq!(RowWrite::new(Entity::Card, "c".into(), None).values, None);
        // Exactly the shared contract's encoding, for awkward values too.
        let awkward = [
            Value::Int(i64::MIN),
            Value::Int(0),
            Value::Float(1.0),
            Value::Float(0.1 + 0.2),
            Value::Float(1e21),
            Value::Float(1.5e-9),
            Value::Float(f64::MAX),
            Value::Float(-0.0),
        ];
        let mut values: Vec<Value> = Entity::Card
            .features()
            .iter()
            .map(|_| Value::Int(7))
            .collect();
        for (i, v) in awkward.iter().enumerate() {
            values[i] = *v;
        }
        let row = FeatureRow {
            entity: Entity::Card,
            id: "c".into(),
            as_of_ms: 0,
            values: values.clone(),
        };
        let expected: Vec<String> = row
            .encode_fields()
            .into_iter()
            .take(values.len())
            .map(|(_, v)| v)
            .collect();
        let write = RowWrite::from_values(Entity::Card, "c".into(), Some(values));
        assert_eq!(write.encoded_values().unwrap(), expected);
    }

    #[test]
    fn row_writes_round_trip_through_serde() {
        let write = RowWrite::from_values(
            Entity::Card,
            "c".into(),
            Some(vec![Value::Int(-3), Value::Float(0.25)]),
        );
        let json = serde_json::to_string(&write).unwrap();
        assert_eq!(serde_json::from_str::<RowWrite>(&json).unwrap(), write);
        let gone = RowWrite::new(Entity::User, "u".into(), None);
        let json = serde_json::to_string(&gone).unwrap();
        assert_eq!(serde_json::from_str::<RowWrite>(&json).unwrap(), gone);
    }

    #[test]
    fn routing_is_stable_across_processes() {
        let a = RowWrite::new(Entity::Card, "c-1".into(), None);
        assert_eq!(
            a.route(),
            RowWrite::new(Entity::Card, "c-1".into(), None).route()
        );
        assert_ne!(
            a.route(),
            RowWrite::new(Entity::User, "c-1".into(), None).route()
        );
    }
}
