//! The exactly-once, monotonic Redis online store.
//!
//! Rows are hashes `{prefix}{entity}:{id}` (see `schemas::features`). A
//! batch at or below the write ceiling (see [`Ownership`]) goes through the
//! `sfs_apply_v3` Redis function ([`LIBRARY`]): rows compare-and-set on
//! `_as_of` (a row is written only if newer than the stored one; deletes
//! leave a tombstone so a replay cannot resurrect an older row), and, in the
//! same atomic call, optionally the progress record `{prefix}_progress`
//! (frontier and per-partition resume offsets), which only moves forward. A
//! batch above the ceiling is newer than every stored row: after one call
//! that raises the ceiling, it is written with plain `HSET`/`DEL` commands,
//! and a row this process wrote itself gets only its changed fields.
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

use std::time::Duration;

use operators::kafka::{ResumePoint, TopicPartition};
use std::sync::Arc;

use schemas::{FeatureSet, Key, Row, Value};
use serde::{Deserialize, Serialize};

pub use freshness::AppendTimes;
pub use metrics::SinkMetrics;
pub use sink::{progress_stage, ProgressStage, RedisSink};

/// The Lua library holding `sfs_apply_v3`, loaded with `FUNCTION LOAD REPLACE`.
pub const LIBRARY: &str = include_str!("function.lua");
/// The function applying a batch.
pub const FUNCTION: &str = "sfs_apply_v3";
/// The progress-hash field holding the write ceiling.
const CEILING_FIELD: &str = "written_ms";

/// Connection and batching of the Redis sink.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisSinkConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key written (`sfs:` by default).
    pub key_prefix: String,
    /// The feature definitions: the entities' names and field names, and the
    /// version written as `_fv`.
    pub features: Arc<FeatureSet>,
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
    /// Local defaults for `url` and the rows of `features`.
    pub fn new(url: impl Into<String>, features: Arc<FeatureSet>) -> RedisSinkConfig {
        RedisSinkConfig {
            url: url.into(),
            key_prefix: schemas::features::DEFAULT_KEY_PREFIX.to_owned(),
            features,
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

/// A write of one row: its new values, or its deletion. The sink builds
/// these from the row collection it consolidates (one per key and frontier).
///
/// Values stay typed until the writer thread encodes them straight into the
/// Redis request (the encoding of `schemas::features`), so the many changes
/// superseded before they are written cost no formatting or allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    /// Index into the feature set's entities.
    pub entity: u8,
    /// The entity id.
    pub id: Key,
    /// Feature values in the entity's row order; `None` deletes the row.
    pub values: Option<Arc<[Value]>>,
    /// The values of the row's previous write, when the sink knows them
    /// (its first retraction since then): the base of a partial write.
    pub old: Option<Arc<[Value]>>,
}

impl RowWrite {
    /// The write of `row`'s values.
    pub fn upsert(row: Row) -> RowWrite {
        RowWrite {
            entity: row.entity,
            id: row.id,
            values: Some(row.values),
            old: None,
        }
    }

    /// The write of `row`'s values over `old`, the values of its previous write.
    pub fn change(old: Arc<[Value]>, row: Row) -> RowWrite {
        RowWrite {
            old: Some(old),
            ..RowWrite::upsert(row)
        }
    }

    /// The deletion of entity `entity`'s row `id`.
    pub fn delete(entity: u8, id: Key) -> RowWrite {
        RowWrite {
            entity,
            id,
            values: None,
            old: None,
        }
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
    /// Feature-set version of the rows (`FeatureSet::version`).
    pub feature_set_version: String,
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
    let (frontier, fv, offsets): (Option<u64>, Option<String>, Option<String>) =
        ::redis::cmd("HMGET")
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
        feature_set_version: fv.unwrap_or_default(),
        partitions,
    }))
}

/// Reads the write ceiling: no row stored under the prefix has an `_as_of`
/// above it. `0` for a prefix nothing was written to; `u64::MAX` (every
/// batch checked) for a prefix whose progress record predates the ceiling.
pub fn read_ceiling(
    conn: &mut ::redis::Connection,
    config: &RedisSinkConfig,
) -> Result<u64, SinkError> {
    let (ceiling, frontier): (Option<u64>, Option<u64>) = ::redis::cmd("HMGET")
        .arg(config.progress_key())
        .arg(CEILING_FIELD)
        .arg("frontier_ms")
        .query(conn)?;
    Ok(match (ceiling, frontier) {
        (Some(ceiling), _) => ceiling,
        (None, Some(_)) => u64::MAX,
        (None, None) => 0,
    })
}

/// What a sink knows about the rows stored under its prefix, which decides
/// how a batch is written.
///
/// - A batch at or below `ceiling` (the write ceiling read at start, see
///   [`read_ceiling`]) may meet rows a crashed run wrote after its last
///   progress record: it goes through `sfs_apply_v3`, compare-and-set per row.
/// - A batch above it is newer than every stored row, so the compare could
///   only succeed: one call of the function (no rows) raises the ceiling to
///   the batch, then the rows follow as plain commands on the same
///   connection (Redis applies and logs them in that order): a row is
///   replaced (`DEL` + `HSET`), a deletion is `DEL` + a tombstone.
/// - A row this process last wrote that way (`owned`) is in Redis exactly as
///   written, so its next write sends only the fields that changed since.
///   A lost connection forgets every owned row (Redis may have restarted and
///   lost its last writes), so the next writes are whole again.
///
/// This assumes the sink is the only writer under its prefix: one job per
/// prefix, as the progress record already requires.
#[derive(Debug, Clone)]
pub struct Ownership {
    ceiling: u64,
    owned: std::collections::HashSet<(u8, Key), operators::window::FxBuildHasher>,
}

impl Ownership {
    /// A sink starting over a prefix whose write ceiling is `ceiling`.
    pub fn new(ceiling: u64) -> Ownership {
        Ownership {
            ceiling,
            owned: Default::default(),
        }
    }

    /// Whether a batch at `frontier` is written directly.
    pub(crate) fn direct(&self, frontier: u64) -> bool {
        frontier > self.ceiling
    }

    /// Whether this process wrote `key`'s stored row directly (its stored
    /// image is exactly that write).
    pub(crate) fn owns(&self, key: &(u8, Key)) -> bool {
        self.owned.contains(key)
    }

    pub(crate) fn claim(&mut self, key: (u8, Key)) {
        self.owned.insert(key);
    }

    pub(crate) fn release(&mut self, key: &(u8, Key)) {
        self.owned.remove(key);
    }

    /// After a lost connection: nothing stored is known any more.
    pub(crate) fn forget(&mut self) {
        self.owned.clear();
    }
}

/// What one [`apply`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Applied {
    pub written: u64,
    pub deleted: u64,
    pub skipped: u64,
    /// Rows written or deleted directly (above the write ceiling).
    pub direct: u64,
    /// Rows written as their changed fields only.
    pub partial: u64,
    /// Whether the progress record moved.
    pub progressed: bool,
}

/// Applies `rows` as of `frontier` (and the progress record, if given,
/// last) synchronously, as the sink's writer does.
pub fn apply(
    conn: &mut ::redis::Connection,
    config: &RedisSinkConfig,
    ownership: &mut Ownership,
    frontier: u64,
    rows: &[RowWrite],
    progress: Option<&ProgressRecord>,
) -> Result<Applied, SinkError> {
    let json = progress.map(|p| serde_json::to_string(&p.partitions).expect("progress serializes"));
    let mut calls = writer::Calls::new(config);
    calls.build(config, ownership, frontier, rows, json.as_deref());
    let mut applied = Applied::default();
    for i in 0..calls.len() {
        calls.send(conn, i..i + 1, &mut applied)?;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::FeatureRow;

    fn features() -> FeatureSet {
        FeatureSet::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml")).unwrap()
    }

    #[test]
    fn row_writes_encode_values_as_the_shared_contract_does() {
        let set = features();
        let card = set.entity("card").unwrap();
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
        let mut values: Vec<Value> = card.features.iter().map(|_| Value::Int(7)).collect();
        for (i, v) in awkward.iter().enumerate() {
            values[i] = *v;
        }
        let row = FeatureRow {
            entity: card.clone(),
            id: "c".into(),
            as_of_ms: 0,
            values: values.clone(),
        };
        let expected: Vec<String> = row
            .encode_fields(&set.version)
            .into_iter()
            .take(values.len())
            .map(|(_, v)| v)
            .collect();
        let write = RowWrite::upsert(Row {
            entity: 0,
            id: "c".into(),
            values: values.into(),
        });
        assert_eq!(write.encoded_values().unwrap(), expected);
        assert_eq!(RowWrite::delete(0, "c".into()).encoded_values(), None);
    }
}
