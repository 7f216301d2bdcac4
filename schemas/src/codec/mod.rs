//! Wire formats of the event topics: the Confluent Avro framing (magic byte
//! 0, 4-byte big-endian schema id, Avro binary datum) and plain JSON objects
//! (field names as in the `.avsc`, optional fields may be absent or null,
//! enums as their symbol strings).
//!
//! [`Decoder`] detects the format from the first byte, resolves the writer
//! schema to the reader's version, and validates ([`crate::validate`]).
//! Shipped schema versions decode through a hand-written fast path; any other
//! writer schema found in the registry is decoded with apache-avro and
//! resolved by the Avro rules. Both are cached per schema id.

pub(crate) mod binary;
mod generic;

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use binary::AvroError;

use crate::avro::{self, EventKind};
use crate::event::{Click, Label, Txn};
use crate::registry::{MemoryRegistry, RegistryError, SchemaRegistry};
use crate::validate::{validate_click, validate_label, validate_txn, Limits, ValidationError};

/// The first byte of a Confluent-framed Avro payload.
pub const MAGIC: u8 = 0;

/// Why a payload is not an acceptable event. Every variant is at most a
/// pointer wide so `Result<Event, DecodeError>` stays small.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty payload")]
    Empty,
    #[error("payload starts with byte {0:#04x}, neither avro magic 0 nor json")]
    UnknownFormat(u8),
    #[error("payload shorter than the 5-byte confluent header")]
    TruncatedHeader,
    #[error("schema id {0} is not in the registry")]
    UnknownSchemaId(u32),
    #[error("schema id {} is a {} schema, expected {}", .0.id, .0.found, .0.expected)]
    WrongSchema(Box<WrongSchema>),
    #[error("schema id {} cannot be read as {}: {}", .0.id, .0.expected, .0.detail)]
    IncompatibleSchema(Box<Incompatible>),
    #[error("schema registry: {0}")]
    Registry(Box<RegistryError>),
    #[error("avro: {0}")]
    Avro(Box<AvroError>),
    #[error("json: {0}")]
    Json(Box<serde_json::Error>),
    #[error("invalid event: {0}")]
    Invalid(Box<ValidationError>),
}

/// Details of [`DecodeError::WrongSchema`].
#[derive(Debug)]
pub struct WrongSchema {
    pub id: u32,
    pub found: EventKind,
    pub expected: EventKind,
}

/// Details of [`DecodeError::IncompatibleSchema`].
#[derive(Debug)]
pub struct Incompatible {
    pub id: u32,
    pub expected: EventKind,
    pub detail: String,
}

impl DecodeError {
    /// A short stable identifier of the failure, for the `reason` header of
    /// a dead letter and for metric labels (a bounded set).
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty",
            DecodeError::UnknownFormat(_) => "unknown_format",
            DecodeError::TruncatedHeader => "truncated_header",
            DecodeError::UnknownSchemaId(_) => "unknown_schema_id",
            DecodeError::WrongSchema(_) => "wrong_schema",
            DecodeError::IncompatibleSchema(_) => "incompatible_schema",
            DecodeError::Registry(_) => "registry_unavailable",
            DecodeError::Avro(e) => e.reason(),
            DecodeError::Json(e) => match e.classify() {
                serde_json::error::Category::Syntax | serde_json::error::Category::Io => {
                    "json_syntax"
                }
                serde_json::error::Category::Eof => "json_truncated",
                serde_json::error::Category::Data => "json_invalid",
            },
            DecodeError::Invalid(e) => e.reason(),
        }
    }

    /// Whether the payload itself is fine and the failure is infrastructure
    /// (the registry is unreachable): retry, do not dead-letter.
    pub fn is_retryable(&self) -> bool {
        matches!(self, DecodeError::Registry(e) if e.is_retryable())
    }
}

impl From<AvroError> for DecodeError {
    fn from(e: AvroError) -> Self {
        DecodeError::Avro(Box::new(e))
    }
}

/// Why an event could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("{kind} has no schema version {version}")]
    UnknownVersion { kind: EventKind, version: u32 },
}

/// An event type of one of the topics. Implemented for [`Txn`], [`Click`]
/// and [`Label`] only.
pub trait Event: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {
    const KIND: EventKind;
    /// Event time in ms (`label_time` for labels).
    fn time_ms(&self) -> i64;
    /// The Kafka key: `card_id` for transactions and labels, `user_id` for clicks.
    fn key(&self) -> &str;
    /// Semantic validation; see [`crate::validate`].
    fn validate(&self, now_ms: i64, limits: &Limits) -> Result<(), ValidationError>;
    /// Clears the fields that `version` does not have (a reader of `version`
    /// never sees them).
    fn drop_newer_than(&mut self, version: u32);
    #[doc(hidden)]
    fn read_datum(r: &mut binary::Reader<'_>, version: u32) -> Result<Self, AvroError>;
    #[doc(hidden)]
    fn write_datum(&self, version: u32, out: &mut Vec<u8>);
    #[doc(hidden)]
    fn from_fields(f: generic::Fields) -> Result<Self, AvroError>;
}

impl Event for Txn {
    const KIND: EventKind = EventKind::Txn;
    fn time_ms(&self) -> i64 {
        self.event_time
    }
    fn key(&self) -> &str {
        &self.card_id
    }
    fn validate(&self, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
        validate_txn(self, now_ms, limits)
    }
    fn drop_newer_than(&mut self, version: u32) {
        if version < 2 {
            self.device_id = None;
            self.ip_country = None;
        }
    }
    fn read_datum(r: &mut binary::Reader<'_>, version: u32) -> Result<Self, AvroError> {
        binary::read_txn(r, version)
    }
    fn write_datum(&self, version: u32, out: &mut Vec<u8>) {
        binary::write_txn(self, version, out)
    }
    fn from_fields(f: generic::Fields) -> Result<Self, AvroError> {
        f.txn()
    }
}

impl Event for Click {
    const KIND: EventKind = EventKind::Click;
    fn time_ms(&self) -> i64 {
        self.event_time
    }
    fn key(&self) -> &str {
        &self.user_id
    }
    fn validate(&self, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
        validate_click(self, now_ms, limits)
    }
    fn drop_newer_than(&mut self, version: u32) {
        if version < 2 {
            self.dwell_ms = None;
        }
    }
    fn read_datum(r: &mut binary::Reader<'_>, version: u32) -> Result<Self, AvroError> {
        binary::read_click(r, version)
    }
    fn write_datum(&self, version: u32, out: &mut Vec<u8>) {
        binary::write_click(self, version, out)
    }
    fn from_fields(f: generic::Fields) -> Result<Self, AvroError> {
        f.click()
    }
}

impl Event for Label {
    const KIND: EventKind = EventKind::Label;
    fn time_ms(&self) -> i64 {
        self.label_time
    }
    fn key(&self) -> &str {
        &self.card_id
    }
    fn validate(&self, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
        validate_label(self, now_ms, limits)
    }
    fn drop_newer_than(&mut self, _version: u32) {}
    fn read_datum(r: &mut binary::Reader<'_>, version: u32) -> Result<Self, AvroError> {
        binary::read_label(r, version)
    }
    fn write_datum(&self, version: u32, out: &mut Vec<u8>) {
        binary::write_label(self, version, out)
    }
    fn from_fields(f: generic::Fields) -> Result<Self, AvroError> {
        f.label()
    }
}

/// Writes the Avro binary datum of `event` under shipped schema `version`,
/// without framing (as in an object container file).
pub fn write_datum<E: Event>(
    event: &E,
    version: u32,
    out: &mut Vec<u8>,
) -> Result<(), EncodeError> {
    if E::KIND.known(version).is_none() {
        return Err(EncodeError::UnknownVersion {
            kind: E::KIND,
            version,
        });
    }
    event.write_datum(version, out);
    Ok(())
}

/// How the decoder reads one writer schema id.
#[derive(Debug, Clone)]
enum Plan {
    /// A shipped version: the hand-written fast path.
    Known { kind: EventKind, version: u32 },
    /// Another schema: apache-avro with resolution; compatibility with each
    /// reader kind is checked once (`None` = not yet checked).
    Foreign {
        writer: Arc<Schema>,
        readable: [Option<Result<(), Arc<str>>>; 3],
    },
    /// Not in the registry.
    Unknown,
}

const MAX_PLANS: usize = 4096;

fn kind_index(kind: EventKind) -> usize {
    match kind {
        EventKind::Txn => 0,
        EventKind::Click => 1,
        EventKind::Label => 2,
    }
}

/// Decodes payloads of the three topics. Cheap to clone (one per worker);
/// the registry is asked once per new schema id, never per record.
#[derive(Debug, Clone)]
pub struct Decoder {
    registry: Arc<dyn SchemaRegistry>,
    limits: Limits,
    /// Reader schema version per kind (index by `kind_index`).
    readers: [u32; 3],
    plans: HashMap<u32, Plan>,
}

impl Default for Decoder {
    /// Reads with the newest shipped versions and the shipped registry file.
    fn default() -> Self {
        Decoder::new(Arc::new(MemoryRegistry::shipped()))
    }
}

impl Decoder {
    /// A decoder reading with the newest shipped schema versions.
    pub fn new(registry: Arc<dyn SchemaRegistry>) -> Self {
        let readers =
            [EventKind::Txn, EventKind::Click, EventKind::Label].map(EventKind::latest_version);
        Decoder {
            registry,
            limits: Limits::default(),
            readers,
            plans: HashMap::new(),
        }
    }

    /// Sets the validation limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Reads `kind` as shipped `version` (an older consumer), dropping newer fields.
    pub fn with_reader_version(
        mut self,
        kind: EventKind,
        version: u32,
    ) -> Result<Self, EncodeError> {
        if kind.known(version).is_none() {
            return Err(EncodeError::UnknownVersion { kind, version });
        }
        self.readers[kind_index(kind)] = version;
        Ok(self)
    }

    /// The validation limits in force.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Decodes and validates a transaction; `now_ms` bounds its time (see
    /// [`validate_txn`]).
    pub fn decode_txn(&mut self, bytes: &[u8], now_ms: i64) -> Result<Txn, DecodeError> {
        self.decode(bytes, now_ms)
    }

    /// Decodes and validates a browsing event.
    pub fn decode_click(&mut self, bytes: &[u8], now_ms: i64) -> Result<Click, DecodeError> {
        self.decode(bytes, now_ms)
    }

    /// Decodes and validates a label.
    pub fn decode_label(&mut self, bytes: &[u8], now_ms: i64) -> Result<Label, DecodeError> {
        self.decode(bytes, now_ms)
    }

    /// Decodes (format detected from the first byte) and validates.
    pub fn decode<E: Event>(&mut self, bytes: &[u8], now_ms: i64) -> Result<E, DecodeError> {
        let event = self.read::<E>(bytes)?;
        event
            .validate(now_ms, &self.limits)
            .map_err(|e| DecodeError::Invalid(Box::new(e)))?;
        Ok(event)
    }

    /// Decodes without semantic validation.
    pub fn read<E: Event>(&mut self, bytes: &[u8]) -> Result<E, DecodeError> {
        let reader_version = self.readers[kind_index(E::KIND)];
        let mut event = match bytes.first() {
            None => return Err(DecodeError::Empty),
            Some(&MAGIC) => self.read_avro::<E>(bytes, reader_version)?,
            Some(b'{' | b' ' | b'\t' | b'\r' | b'\n') => {
                serde_json::from_slice::<E>(bytes).map_err(|e| DecodeError::Json(Box::new(e)))?
            }
            Some(&other) => return Err(DecodeError::UnknownFormat(other)),
        };
        event.drop_newer_than(reader_version);
        Ok(event)
    }

    fn read_avro<E: Event>(&mut self, bytes: &[u8], reader_version: u32) -> Result<E, DecodeError> {
        let Some(header) = bytes.get(..5) else {
            return Err(DecodeError::TruncatedHeader);
        };
        let id = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let datum = &bytes[5..];
        if !self.plans.contains_key(&id) {
            let plan = self.plan(id)?;
            if self.plans.len() >= MAX_PLANS {
                self.plans.retain(|_, p| !matches!(p, Plan::Unknown));
            }
            self.plans.insert(id, plan);
        }
        let plan = self.plans.get_mut(&id).expect("inserted above");
        match plan {
            Plan::Known { kind, version } if *kind == E::KIND => {
                let mut r = binary::Reader::new(datum);
                let event = E::read_datum(&mut r, *version)?;
                r.finish()?;
                Ok(event)
            }
            Plan::Known { kind, .. } => Err(DecodeError::WrongSchema(Box::new(WrongSchema {
                id,
                found: *kind,
                expected: E::KIND,
            }))),
            Plan::Unknown => Err(DecodeError::UnknownSchemaId(id)),
            Plan::Foreign { writer, readable } => {
                let reader = E::KIND
                    .schema(reader_version)
                    .expect("reader versions are shipped ones");
                let check = readable[kind_index(E::KIND)].get_or_insert_with(|| {
                    SchemaCompatibility::can_read(writer, reader)
                        .map_err(|e| Arc::from(e.to_string()))
                });
                if let Err(detail) = check {
                    let detail = detail.to_string();
                    return Err(DecodeError::IncompatibleSchema(Box::new(Incompatible {
                        id,
                        expected: E::KIND,
                        detail,
                    })));
                }
                let fields = generic::decode(writer, reader, datum)?;
                Ok(E::from_fields(fields)?)
            }
        }
    }

    fn plan(&self, id: u32) -> Result<Plan, DecodeError> {
        let text = match self.registry.schema_by_id(id) {
            Ok(Some(text)) => text,
            Ok(None) => return Ok(Plan::Unknown),
            Err(e) => return Err(DecodeError::Registry(Box::new(e))),
        };
        let schema = Schema::parse_str(&text).map_err(|e| {
            DecodeError::Registry(Box::new(RegistryError::InvalidSchema(format!(
                "schema id {id}: {e}"
            ))))
        })?;
        Ok(match avro::identify(&schema) {
            Some(known) => Plan::Known {
                kind: known.kind,
                version: known.version,
            },
            None => Plan::Foreign {
                writer: Arc::new(schema),
                readable: [None, None, None],
            },
        })
    }
}

/// Encodes events in the Confluent Avro framing (ids from a registry) or JSON.
#[derive(Debug, Clone)]
pub struct Encoder {
    /// Schema id per shipped (kind, version).
    ids: HashMap<(EventKind, u32), u32>,
}

impl Default for Encoder {
    /// The ids of the shipped registry file.
    fn default() -> Self {
        Encoder::register(&MemoryRegistry::shipped(), &Topics::default())
            .expect("the shipped registry holds every shipped schema (tested)")
    }
}

/// The topic of each event kind (the registry subject is `<topic>-value`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub txn: String,
    pub click: String,
    pub label: String,
}

impl Default for Topics {
    fn default() -> Self {
        Topics {
            txn: EventKind::Txn.topic().to_owned(),
            click: EventKind::Click.topic().to_owned(),
            label: EventKind::Label.topic().to_owned(),
        }
    }
}

impl Topics {
    /// The topic of `kind`.
    pub fn of(&self, kind: EventKind) -> &str {
        match kind {
            EventKind::Txn => &self.txn,
            EventKind::Click => &self.click,
            EventKind::Label => &self.label,
        }
    }
}

impl Encoder {
    /// Registers every shipped schema version under its topic's subject
    /// (oldest first, as a registry in BACKWARD mode requires) and keeps the ids.
    pub fn register(registry: &dyn SchemaRegistry, topics: &Topics) -> Result<Self, RegistryError> {
        let mut ids = HashMap::new();
        for known in avro::KNOWN_SCHEMAS {
            let subject = EventKind::subject_for(topics.of(known.kind));
            ids.insert(
                (known.kind, known.version),
                registry.register(&subject, known.text)?,
            );
        }
        Ok(Encoder { ids })
    }

    /// The schema id written for `kind` at `version`.
    pub fn schema_id(&self, kind: EventKind, version: u32) -> Option<u32> {
        self.ids.get(&(kind, version)).copied()
    }

    /// Appends the Confluent framing and the Avro datum of `event` under
    /// shipped schema `version` (fields newer than `version` are dropped).
    pub fn encode_avro<E: Event>(
        &self,
        event: &E,
        version: u32,
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let id = self
            .schema_id(E::KIND, version)
            .ok_or(EncodeError::UnknownVersion {
                kind: E::KIND,
                version,
            })?;
        out.push(MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        event.write_datum(version, out);
        Ok(())
    }

    /// Appends `event` as one JSON object.
    pub fn encode_json<E: Event>(event: &E, out: &mut Vec<u8>) {
        serde_json::to_writer(out, event).expect("events serialize to json infallibly");
    }
}

/// Appends the Avro zig-zag varint encoding of `v`.
pub fn write_long_to(out: &mut Vec<u8>, v: i64) {
    binary::write_long(out, v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_stay_two_words() {
        assert!(
            std::mem::size_of::<DecodeError>() <= 16,
            "{}",
            std::mem::size_of::<DecodeError>()
        );
        assert!(std::mem::size_of::<Result<Txn, DecodeError>>() <= std::mem::size_of::<Txn>() + 8);
    }
}
