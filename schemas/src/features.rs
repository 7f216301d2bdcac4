//! The feature definitions (`features.toml`) and the feature-row encoding of
//! the online store.
//!
//! A [`FeatureSet`] is parsed and validated from TOML (documented field by
//! field in `docs/FEATURES.md`): sources (a topic and the schema of its
//! events), entities (a key field and the sources that feed them) and
//! features (entity, source, aggregation, field, window, filter). Everything
//! else derives from it: the row layout, the Redis field names, the server's
//! catalogue, the training columns, the replay horizon and the feature-set
//! version, a stable hash of the definitions.
//!
//! A row is one Redis hash, `{prefix}{entity}:{id}` (prefix `sfs:` by
//! default), whose fields are the feature names of its entity plus `_as_of`
//! (the dataflow frontier, in ms, that the row reflects) and `_fv` (the
//! feature-set version). Integer features are written as decimal integers;
//! real features (mean, std) with Rust's shortest round-trip float
//! formatting, so decoding gives back the same bits.
//!
//! Windows are `[t - W, t)`: the row as of `t` aggregates events strictly
//! before `t`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::event::{Channel, Click, ClickAction, Txn};
use crate::key::Key;

/// Default key prefix of every key the system writes to Redis.
pub const DEFAULT_KEY_PREFIX: &str = "sfs:";
/// Hash field holding the frontier time (ms) a row reflects.
pub const AS_OF_FIELD: &str = "_as_of";
/// Hash field holding the feature-set version of a row.
pub const VERSION_FIELD: &str = "_fv";
/// The file every command reads unless told otherwise.
pub const DEFAULT_FEATURES_PATH: &str = "features.toml";
/// Environment variable naming the feature-definition file.
pub const FEATURES_ENV: &str = "SFS_FEATURES";
/// The widest window a feature may have: 30 days.
pub const MAX_WINDOW_MS: u64 = 30 * 24 * 3_600_000;
/// Most distinct windows among the features of one entity.
pub const MAX_WINDOWS_PER_ENTITY: usize = 8;
/// Most features of one entity.
pub const MAX_FEATURES_PER_ENTITY: usize = 64;

// ---------------------------------------------------------------------------
// Event schemas and their fields.

/// The event schemas a source may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schema {
    /// Card transactions ([`Txn`]).
    Txn,
    /// Browsing events ([`Click`]).
    Click,
}

impl Schema {
    /// The fields of this schema's events.
    pub fn fields(self) -> &'static [FieldSpec] {
        match self {
            Schema::Txn => TXN_FIELDS,
            Schema::Click => CLICK_FIELDS,
        }
    }

    /// The field called `name`, with its index in [`Schema::fields`].
    pub fn field(self, name: &str) -> Option<(usize, &'static FieldSpec)> {
        self.fields()
            .iter()
            .enumerate()
            .find(|(_, f)| f.name == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Schema::Txn => "txn",
            Schema::Click => "click",
        }
    }
}

/// The type of an event field, as far as aggregations care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldType {
    /// An integer (money in minor units, codes).
    Int,
    /// Milliseconds since the Unix epoch.
    Time,
    /// An ISO 3166 alpha-2 code, aggregated as its [`pack_country`] integer.
    Country,
    /// A string (ids, categories).
    Str,
    /// One of a fixed set of strings (`channel`, `action`).
    Enum(&'static [&'static str]),
}

impl FieldType {
    /// Whether aggregations see an integer (min, max, mode, last need one).
    pub fn is_integer(self) -> bool {
        matches!(self, FieldType::Int | FieldType::Time | FieldType::Country)
    }

    fn describe(self) -> &'static str {
        match self {
            FieldType::Int => "integer",
            FieldType::Time => "time",
            FieldType::Country => "country",
            FieldType::Str => "string",
            FieldType::Enum(_) => "enum",
        }
    }
}

/// One field of an event schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldSpec {
    pub name: &'static str,
    pub ty: FieldType,
    /// Absent in some events (v1 writers): such events do not contribute to
    /// a feature on this field, nor pass a filter on it.
    pub optional: bool,
}

const fn field(name: &'static str, ty: FieldType) -> FieldSpec {
    FieldSpec {
        name,
        ty,
        optional: false,
    }
}

const fn optional(name: &'static str, ty: FieldType) -> FieldSpec {
    FieldSpec {
        name,
        ty,
        optional: true,
    }
}

const CHANNELS: &[&str] = &["pos", "ecom", "atm"];
const ACTIONS: &[&str] = &["view", "add_to_cart", "purchase"];

/// Fields of [`Txn`], in [`txn_field`] order.
pub const TXN_FIELDS: &[FieldSpec] = &[
    field("event_id", FieldType::Str),
    field("card_id", FieldType::Str),
    field("user_id", FieldType::Str),
    field("merchant_id", FieldType::Str),
    field("mcc", FieldType::Int),
    field("amount_minor", FieldType::Int),
    field("currency", FieldType::Str),
    field("country", FieldType::Country),
    field("channel", FieldType::Enum(CHANNELS)),
    field("event_time", FieldType::Time),
    optional("device_id", FieldType::Str),
    optional("ip_country", FieldType::Country),
];

/// Fields of [`Click`], in [`click_field`] order.
pub const CLICK_FIELDS: &[FieldSpec] = &[
    field("event_id", FieldType::Str),
    field("user_id", FieldType::Str),
    field("session_id", FieldType::Str),
    field("item_id", FieldType::Str),
    field("category", FieldType::Str),
    field("action", FieldType::Enum(ACTIONS)),
    field("event_time", FieldType::Time),
    optional("dwell_ms", FieldType::Int),
];

/// The value of an event field as aggregations see it: integers (country
/// codes packed by [`pack_country`], 0 when not a code) or strings.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Datum {
    Int(i64),
    Str(String),
}

impl Datum {
    /// The integer of an integer datum.
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Datum::Int(i) => Some(*i),
            Datum::Str(_) => None,
        }
    }
}

/// A field of an event as [`Datum`], borrowed: strings are not copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatumRef<'a> {
    Int(i64),
    Str(&'a str),
}

impl DatumRef<'_> {
    /// The owned datum.
    pub fn to_datum(self) -> Datum {
        match self {
            DatumRef::Int(i) => Datum::Int(i),
            DatumRef::Str(s) => Datum::Str(s.to_owned()),
        }
    }
}

fn country(code: &str) -> DatumRef<'static> {
    DatumRef::Int(pack_country(code).unwrap_or(0))
}

fn channel_str(c: Channel) -> &'static str {
    match c {
        Channel::Pos => "pos",
        Channel::Ecom => "ecom",
        Channel::Atm => "atm",
    }
}

fn action_str(a: ClickAction) -> &'static str {
    match a {
        ClickAction::View => "view",
        ClickAction::AddToCart => "add_to_cart",
        ClickAction::Purchase => "purchase",
    }
}

/// Field `index` of [`TXN_FIELDS`] of `t`; `None` when absent.
pub fn txn_field(t: &Txn, index: usize) -> Option<Datum> {
    txn_field_ref(t, index).map(DatumRef::to_datum)
}

/// Field `index` of [`TXN_FIELDS`] of `t`, borrowed; `None` when absent.
pub fn txn_field_ref(t: &Txn, index: usize) -> Option<DatumRef<'_>> {
    Some(match index {
        0 => DatumRef::Str(&t.event_id),
        1 => DatumRef::Str(&t.card_id),
        2 => DatumRef::Str(&t.user_id),
        3 => DatumRef::Str(&t.merchant_id),
        4 => DatumRef::Int(t.mcc as i64),
        5 => DatumRef::Int(t.amount_minor),
        6 => DatumRef::Str(&t.currency),
        7 => country(&t.country),
        8 => DatumRef::Str(channel_str(t.channel)),
        9 => DatumRef::Int(t.event_time),
        10 => DatumRef::Str(t.device_id.as_deref()?),
        11 => country(t.ip_country.as_deref()?),
        _ => return None,
    })
}

/// Field `index` of [`CLICK_FIELDS`] of `c`; `None` when absent.
pub fn click_field(c: &Click, index: usize) -> Option<Datum> {
    click_field_ref(c, index).map(DatumRef::to_datum)
}

/// Field `index` of [`CLICK_FIELDS`] of `c`, borrowed; `None` when absent.
pub fn click_field_ref(c: &Click, index: usize) -> Option<DatumRef<'_>> {
    Some(match index {
        0 => DatumRef::Str(&c.event_id),
        1 => DatumRef::Str(&c.user_id),
        2 => DatumRef::Str(&c.session_id),
        3 => DatumRef::Str(&c.item_id),
        4 => DatumRef::Str(&c.category),
        5 => DatumRef::Str(action_str(c.action)),
        6 => DatumRef::Int(c.event_time),
        7 => DatumRef::Int(c.dwell_ms? as i64),
        _ => return None,
    })
}

/// Whether field `index` of `t` is present, without copying it.
pub fn txn_has_field(t: &Txn, index: usize) -> bool {
    match index {
        10 => t.device_id.is_some(),
        11 => t.ip_country.is_some(),
        _ => index < TXN_FIELDS.len(),
    }
}

/// Whether field `index` of `c` is present, without copying it.
pub fn click_has_field(c: &Click, index: usize) -> bool {
    match index {
        7 => c.dwell_ms.is_some(),
        _ => index < CLICK_FIELDS.len(),
    }
}

/// Whether field `index` of `t` equals `value` (a filter), without copying.
pub fn txn_field_is(t: &Txn, index: usize, value: &Datum) -> bool {
    match (index, value) {
        (1, Datum::Str(v)) => t.card_id == *v,
        (2, Datum::Str(v)) => t.user_id == *v,
        (3, Datum::Str(v)) => t.merchant_id == *v,
        (8, Datum::Str(v)) => channel_str(t.channel) == v,
        _ => txn_field(t, index).as_ref() == Some(value),
    }
}

/// Whether field `index` of `c` equals `value` (a filter), without copying.
pub fn click_field_is(c: &Click, index: usize, value: &Datum) -> bool {
    match (index, value) {
        (4, Datum::Str(v)) => c.category == *v,
        (5, Datum::Str(v)) => action_str(c.action) == v,
        _ => click_field(c, index).as_ref() == Some(value),
    }
}

// ---------------------------------------------------------------------------
// The definitions.

/// How a feature aggregates the events in its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// Number of events (with `field`: of events where it is present).
    Count,
    /// Sum of an integer field (saturating to i64).
    Sum,
    /// Mean of an integer field (0.0 for an empty window).
    Mean,
    /// Population standard deviation of an integer field (0.0 when empty).
    Std,
    /// Smallest value of an integer field (0 when empty).
    Min,
    /// Largest value of an integer field (0 when empty).
    Max,
    /// Number of distinct values of any field.
    DistinctCount,
    /// Most frequent value of an integer field, ties to the smallest (0 when empty).
    Mode,
    /// Value of the latest event (greatest event time; ties to the largest value).
    Last,
    /// Event time (ms) of the latest event (0 when empty).
    LastTime,
}

impl Aggregation {
    /// The kind of value it yields.
    pub fn kind(self) -> ValueKind {
        match self {
            Aggregation::Mean | Aggregation::Std => ValueKind::Float,
            _ => ValueKind::Int,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Aggregation::Count => "count",
            Aggregation::Sum => "sum",
            Aggregation::Mean => "mean",
            Aggregation::Std => "std",
            Aggregation::Min => "min",
            Aggregation::Max => "max",
            Aggregation::DistinctCount => "distinct_count",
            Aggregation::Mode => "mode",
            Aggregation::Last => "last",
            Aggregation::LastTime => "last_time",
        }
    }
}

/// Whether a feature is an exact integer or a real number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueKind {
    Int,
    Float,
}

/// A source of events: a Kafka topic whose records follow one schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceDef {
    pub name: String,
    pub topic: String,
    pub schema: Schema,
    /// Fields that key entities.
    pub keys: Vec<String>,
    /// The event-time field (ms since the epoch).
    pub time_field: String,
}

/// One feature, resolved against its source's schema.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureDef {
    pub name: String,
    /// Index into [`FeatureSet::sources`].
    pub source: usize,
    pub aggregation: Aggregation,
    /// Index into the source schema's fields; `None` only for `count`.
    pub field: Option<usize>,
    pub window_ms: u64,
    /// Equality conditions on fields (index into the schema's fields), all of
    /// which an event must meet.
    pub filter: Vec<(usize, Datum)>,
}

impl FeatureDef {
    pub fn kind(&self) -> ValueKind {
        self.aggregation.kind()
    }
}

/// An entity: what a row is about, keyed by a field of its sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityDef {
    pub name: String,
    /// The key field, present in each of its sources.
    pub key: String,
    /// Indices into [`FeatureSet::sources`].
    pub sources: Vec<usize>,
    /// The features, in row order (file order).
    pub features: Vec<FeatureDef>,
}

impl EntityDef {
    /// The Redis key of the row of `id`.
    pub fn redis_key(&self, prefix: &str, id: &str) -> String {
        self.redis_key_parts(prefix, id)
            .iter()
            .map(|p| std::str::from_utf8(p).expect("parts of str"))
            .collect()
    }

    /// The parts of [`Entity::redis_key`], to write the key in place.
    pub fn redis_key_parts<'a>(&'a self, prefix: &'a str, id: &'a str) -> [&'a [u8]; 4] {
        [prefix.as_bytes(), self.name.as_bytes(), b":", id.as_bytes()]
    }

    /// The index of the feature called `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.features.iter().position(|f| f.name == name)
    }

    /// The distinct windows of the features, ascending.
    pub fn windows(&self) -> Vec<u64> {
        let set: BTreeSet<u64> = self.features.iter().map(|f| f.window_ms).collect();
        set.into_iter().collect()
    }
}

/// A handle on an entity of a feature set.
pub type Entity = Arc<EntityDef>;

/// Validated feature definitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureSet {
    pub sources: Vec<SourceDef>,
    pub entities: Vec<Entity>,
    /// Request roles bound to features (`[request]`: role -> feature name of
    /// some entity), for the server's request-time features. Not hashed into
    /// the version: rows do not depend on it.
    pub request: BTreeMap<String, String>,
    /// Feature views (`[[feature_views]]`): named selections of one entity's
    /// features with a max age, served over the Feast protocol. Not hashed
    /// into the version: rows do not depend on them.
    pub views: Vec<FeatureView>,
    /// Feature services (`[[feature_services]]`): named lists of view
    /// features, e.g. a model's inputs. Not hashed into the version.
    pub services: Vec<FeatureService>,
    /// The stable hash of the definitions, `fs-` and 16 hex digits.
    pub version: String,
}

/// A feature view: some features of one entity, read together, with a max
/// age (Feast's `ttl`) past which a row is reported `OUTSIDE_MAX_AGE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureView {
    pub name: String,
    /// Index into `FeatureSet::entities`.
    pub entity: usize,
    /// Positions in the entity's row, in the view's order.
    pub features: Vec<usize>,
    /// Max age of a row in ms; `None`: rows never age out.
    pub ttl_ms: Option<u64>,
}

/// A feature service: a named list of view features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureService {
    pub name: String,
    /// (index into `FeatureSet::views`, position in the entity's row), in order.
    pub features: Vec<(usize, usize)>,
}

/// A problem with feature definitions: what and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: invalid TOML: {reason}")]
    Syntax { path: String, reason: String },
    #[error("{path}: {problems} problem(s):\n  {}", .list.join("\n  "))]
    Invalid {
        path: String,
        problems: usize,
        list: Vec<String>,
    },
}

// The file as written.

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDef {
    #[serde(default)]
    sources: Vec<FileSource>,
    #[serde(default)]
    entities: Vec<FileEntity>,
    #[serde(default)]
    features: Vec<FileFeature>,
    #[serde(default)]
    request: BTreeMap<String, String>,
    #[serde(default)]
    feature_views: Vec<FileView>,
    #[serde(default)]
    feature_services: Vec<FileService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileView {
    name: String,
    entity: String,
    #[serde(default)]
    features: Option<Vec<String>>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileService {
    name: String,
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSource {
    name: String,
    topic: String,
    schema: String,
    keys: Vec<String>,
    time_field: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntity {
    name: String,
    key: String,
    sources: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileFeature {
    name: String,
    entity: String,
    source: String,
    aggregation: String,
    #[serde(default)]
    field: Option<String>,
    window: String,
    #[serde(default)]
    filter: BTreeMap<String, toml_value::Scalar>,
}

/// Scalars a filter may compare with.
mod toml_value {
    use serde::Deserialize;

    #[derive(Debug, Clone, Deserialize)]
    #[serde(untagged)]
    pub enum Scalar {
        Int(i64),
        Str(String),
    }
}

/// Parses a window such as `500ms`, `10s`, `5m`, `1h`, `30d` into ms.
pub fn parse_window(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("window {text:?} has no unit (ms, s, m, h, d)"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("window {text:?} does not start with a whole number"))?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(format!(
                "window {text:?}: unknown unit {unit:?} (ms, s, m, h, d)"
            ))
        }
    };
    let ms = n.saturating_mul(scale);
    if ms == 0 || ms > MAX_WINDOW_MS {
        return Err(format!("window {text:?} must be positive and at most 30d"));
    }
    Ok(ms)
}

/// Formats ms as the largest exact unit (`86400000` -> `1d`).
pub fn format_window(ms: u64) -> String {
    for (unit, scale) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1_000),
    ] {
        if ms.is_multiple_of(scale) {
            return format!("{}{unit}", ms / scale);
        }
    }
    format!("{ms}ms")
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.starts_with('_')
}

fn check_aggregation(agg: Aggregation, field: Option<&FieldSpec>, problem: &mut dyn FnMut(String)) {
    use Aggregation::*;
    match (agg, field) {
        (Count, _) | (LastTime, None) | (DistinctCount, Some(_)) => {}
        (_, None) => problem(format!("aggregation {} needs a field", agg.as_str())),
        (Sum | Mean | Std, Some(f)) if f.ty != FieldType::Int => problem(format!(
            "aggregation {} needs an integer field, {} is {}",
            agg.as_str(),
            f.name,
            f.ty.describe()
        )),
        (Min | Max | Mode | Last, Some(f)) if !f.ty.is_integer() => problem(format!(
            "aggregation {} needs an integer, time or country field, {} is {}",
            agg.as_str(),
            f.name,
            f.ty.describe()
        )),
        (LastTime, Some(f)) => problem(format!(
            "aggregation last_time takes no field (it reads the source's time field), got {}",
            f.name
        )),
        _ => {}
    }
}

impl FeatureSet {
    /// Reads and validates the file at `path`.
    pub fn load(path: impl AsRef<Path>) -> Result<FeatureSet, DefinitionError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| DefinitionError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        FeatureSet::parse(&path.display().to_string(), &text)
    }

    /// The file named by `path`, else `$SFS_FEATURES`, else `features.toml`.
    pub fn load_default(path: Option<&Path>) -> Result<FeatureSet, DefinitionError> {
        match path {
            Some(p) => FeatureSet::load(p),
            None => match std::env::var_os(FEATURES_ENV) {
                Some(p) => FeatureSet::load(p),
                None => FeatureSet::load(DEFAULT_FEATURES_PATH),
            },
        }
    }

    /// Parses and validates definitions; `origin` names them in errors.
    pub fn parse(origin: &str, text: &str) -> Result<FeatureSet, DefinitionError> {
        let file: FileDef = toml::from_str(text).map_err(|e| DefinitionError::Syntax {
            path: origin.to_owned(),
            reason: e.to_string(),
        })?;
        let mut problems = Vec::new();
        let set = resolve(file, &mut problems);
        if problems.is_empty() {
            Ok(set)
        } else {
            Err(DefinitionError::Invalid {
                path: origin.to_owned(),
                problems: problems.len(),
                list: problems,
            })
        }
    }

    /// The entity called `name`.
    pub fn entity(&self, name: &str) -> Option<&Entity> {
        self.entities.iter().find(|e| e.name == name)
    }

    /// The index of the entity called `name`.
    pub fn entity_index(&self, name: &str) -> Option<usize> {
        self.entities.iter().position(|e| e.name == name)
    }

    /// The feature view called `name`.
    pub fn view(&self, name: &str) -> Option<&FeatureView> {
        self.views.iter().find(|v| v.name == name)
    }

    /// The feature service called `name`.
    pub fn service(&self, name: &str) -> Option<&FeatureService> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceDef> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// The widest window of any feature (ms).
    pub fn widest_window_ms(&self) -> u64 {
        self.entities
            .iter()
            .flat_map(|e| &e.features)
            .map(|f| f.window_ms)
            .max()
            .unwrap_or(0)
    }

    /// Every feature as `entity.feature`, in row order, entity by entity.
    pub fn qualified_names(&self) -> Vec<String> {
        self.entities
            .iter()
            .flat_map(|e| {
                e.features
                    .iter()
                    .map(move |f| format!("{}.{}", e.name, f.name))
            })
            .collect()
    }

    /// Checks that every window is a multiple of `tick_ms`; the error names
    /// each feature that is not.
    pub fn check_tick(&self, tick_ms: u64) -> Result<(), String> {
        if tick_ms == 0 {
            return Err("tick_ms must be positive".into());
        }
        let bad: Vec<String> = self
            .entities
            .iter()
            .flat_map(|e| &e.features)
            .filter(|f| !f.window_ms.is_multiple_of(tick_ms))
            .map(|f| {
                format!(
                    "feature {}: window {} is not a multiple of the tick ({tick_ms} ms)",
                    f.name,
                    format_window(f.window_ms)
                )
            })
            .collect();
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

fn resolve(file: FileDef, problems: &mut Vec<String>) -> FeatureSet {
    let mut sources: Vec<SourceDef> = Vec::new();
    for s in file.sources {
        let mut bad = |p: String| problems.push(format!("source {}: {p}", s.name));
        if !is_identifier(&s.name) {
            bad("name must be lowercase letters, digits and _".into());
        }
        if sources.iter().any(|o| o.name == s.name) {
            bad("duplicate source name".into());
        }
        let schema = match s.schema.as_str() {
            "txn" => Schema::Txn,
            "click" => Schema::Click,
            other => {
                bad(format!("unknown schema {other:?} (txn, click)"));
                continue;
            }
        };
        for key in &s.keys {
            match schema.field(key) {
                Some((_, f)) if f.ty == FieldType::Str && !f.optional => {}
                Some(_) => bad(format!("key field {key} must be a required string field")),
                None => bad(format!("unknown key field {key} in schema {}", s.schema)),
            }
        }
        match schema.field(&s.time_field) {
            Some((_, f)) if f.ty == FieldType::Time => {}
            _ => bad(format!(
                "time_field {} is not a time field of schema {}",
                s.time_field, s.schema
            )),
        }
        sources.push(SourceDef {
            name: s.name,
            topic: s.topic,
            schema,
            keys: s.keys,
            time_field: s.time_field,
        });
    }

    let mut entities: Vec<EntityDef> = Vec::new();
    for e in file.entities {
        let mut bad = |p: String| problems.push(format!("entity {}: {p}", e.name));
        if !is_identifier(&e.name) {
            bad("name must be lowercase letters, digits and _".into());
        }
        if entities.iter().any(|o| o.name == e.name) {
            bad("duplicate entity name".into());
        }
        let mut indices = Vec::new();
        for name in &e.sources {
            match sources.iter().position(|s| &s.name == name) {
                Some(i) if sources[i].keys.contains(&e.key) => indices.push(i),
                Some(_) => bad(format!("source {name} does not list key {}", e.key)),
                None => bad(format!("unknown source {name}")),
            }
        }
        entities.push(EntityDef {
            name: e.name,
            key: e.key,
            sources: indices,
            features: Vec::new(),
        });
    }

    let mut names = BTreeSet::new();
    for f in file.features {
        let mut bad = |p: String| problems.push(format!("feature {}: {p}", f.name));
        if !is_identifier(&f.name) {
            bad("name must be lowercase letters, digits and _ (not starting with _)".into());
        }
        if !names.insert((f.entity.clone(), f.name.clone())) {
            bad(format!("duplicate feature name in entity {}", f.entity));
        }
        let Some(entity) = entities.iter().position(|e| e.name == f.entity) else {
            bad(format!("unknown entity {}", f.entity));
            continue;
        };
        let Some(source) = sources.iter().position(|s| s.name == f.source) else {
            bad(format!("unknown source {}", f.source));
            continue;
        };
        if !entities[entity].sources.contains(&source) {
            bad(format!(
                "source {} does not feed entity {}",
                f.source, f.entity
            ));
        }
        let schema = sources[source].schema;
        let aggregation = match serde_json::from_value::<Aggregation>(serde_json::Value::String(
            f.aggregation.clone(),
        )) {
            Ok(a) => a,
            Err(_) => {
                bad(format!(
                    "unknown aggregation {:?} (count, sum, mean, std, min, max, distinct_count, mode, last, last_time)",
                    f.aggregation
                ));
                continue;
            }
        };
        let field = match &f.field {
            Some(name) => match schema.field(name) {
                Some((i, spec)) => Some((i, spec)),
                None => {
                    bad(format!("unknown field {name} in source {}", f.source));
                    continue;
                }
            },
            None => None,
        };
        check_aggregation(aggregation, field.map(|(_, s)| s), &mut bad);
        let field = match aggregation {
            Aggregation::LastTime => schema.field(&sources[source].time_field).map(|(i, _)| i),
            _ => field.map(|(i, _)| i),
        };
        let window_ms = match parse_window(&f.window) {
            Ok(w) => w,
            Err(e) => {
                bad(e);
                continue;
            }
        };
        let mut filter = Vec::new();
        for (name, value) in &f.filter {
            let Some((i, spec)) = schema.field(name) else {
                bad(format!(
                    "filter on unknown field {name} in source {}",
                    f.source
                ));
                continue;
            };
            let datum = match (spec.ty, value) {
                (FieldType::Enum(allowed), toml_value::Scalar::Str(v)) => {
                    if !allowed.contains(&v.as_str()) {
                        bad(format!(
                            "filter {name} = {v:?}: not one of {}",
                            allowed.join(", ")
                        ));
                    }
                    Datum::Str(v.clone())
                }
                (FieldType::Str, toml_value::Scalar::Str(v)) => Datum::Str(v.clone()),
                (FieldType::Country, toml_value::Scalar::Str(v)) => match pack_country(v) {
                    Some(code) => Datum::Int(code),
                    None => {
                        bad(format!("filter {name} = {v:?}: not a country code"));
                        continue;
                    }
                },
                (FieldType::Int | FieldType::Time, toml_value::Scalar::Int(v)) => Datum::Int(*v),
                (ty, _) => {
                    bad(format!(
                        "filter {name}: value does not fit the {} field",
                        ty.describe()
                    ));
                    continue;
                }
            };
            filter.push((i, datum));
        }
        entities[entity].features.push(FeatureDef {
            name: f.name,
            source,
            aggregation,
            field,
            window_ms,
            filter,
        });
    }
    for e in &entities {
        if e.features.is_empty() {
            problems.push(format!("entity {}: has no features", e.name));
        }
        if e.features.len() > MAX_FEATURES_PER_ENTITY {
            problems.push(format!(
                "entity {}: {} features, at most {MAX_FEATURES_PER_ENTITY}",
                e.name,
                e.features.len()
            ));
        }
        let windows = e.windows().len();
        if windows > MAX_WINDOWS_PER_ENTITY {
            problems.push(format!(
                "entity {}: {windows} distinct windows, at most {MAX_WINDOWS_PER_ENTITY}",
                e.name
            ));
        }
    }
    if entities.is_empty() {
        problems.push("no entities defined".into());
    }
    if entities.len() > u8::MAX as usize {
        problems.push(format!("{} entities, at most {}", entities.len(), u8::MAX));
    }
    for (role, feature) in &file.request {
        if !entities.iter().any(|e| e.position(feature).is_some()) {
            problems.push(format!("request {role}: no feature {feature}"));
        }
    }
    let views = resolve_views(file.feature_views, &entities, problems);
    let services = resolve_services(file.feature_services, &views, &entities, problems);
    let version = version_of(&sources, &entities);
    FeatureSet {
        sources,
        entities: entities.into_iter().map(Arc::new).collect(),
        request: file.request,
        views,
        services,
        version,
    }
}

/// Feature views: a known entity, known features of it (all by default),
/// no feature twice, a valid `ttl`; unique names.
fn resolve_views(
    file: Vec<FileView>,
    entities: &[EntityDef],
    problems: &mut Vec<String>,
) -> Vec<FeatureView> {
    let mut views: Vec<FeatureView> = Vec::new();
    for v in file {
        let mut bad = |p: String| problems.push(format!("feature view {}: {p}", v.name));
        if !is_identifier(&v.name) {
            bad("name must be lowercase letters, digits and _ (not starting with _)".into());
        }
        if views.iter().any(|o| o.name == v.name) {
            bad("duplicate feature view name".into());
        }
        let Some(entity) = entities.iter().position(|e| e.name == v.entity) else {
            bad(format!("unknown entity {}", v.entity));
            continue;
        };
        let def = &entities[entity];
        let features = match &v.features {
            None => (0..def.features.len()).collect(),
            Some(names) => {
                if names.is_empty() {
                    bad("features is empty (leave it out for all the entity's features)".into());
                }
                let mut positions: Vec<usize> = Vec::new();
                for name in names {
                    match def.position(name) {
                        Some(p) if positions.contains(&p) => {
                            bad(format!("feature {name} listed twice"))
                        }
                        Some(p) => positions.push(p),
                        None => bad(format!("entity {} has no feature {name}", v.entity)),
                    }
                }
                positions
            }
        };
        let ttl_ms = match v.ttl.as_deref().map(parse_window).transpose() {
            Ok(t) => t,
            Err(e) => {
                bad(format!("ttl: {e}"));
                None
            }
        };
        views.push(FeatureView {
            name: v.name,
            entity,
            features,
            ttl_ms,
        });
    }
    views
}

/// Feature services: each reference is `view` (all its features) or
/// `view:feature`; no feature twice; unique names.
fn resolve_services(
    file: Vec<FileService>,
    views: &[FeatureView],
    entities: &[EntityDef],
    problems: &mut Vec<String>,
) -> Vec<FeatureService> {
    let mut services: Vec<FeatureService> = Vec::new();
    for s in file {
        let mut bad = |p: String| problems.push(format!("feature service {}: {p}", s.name));
        if !is_identifier(&s.name) {
            bad("name must be lowercase letters, digits and _ (not starting with _)".into());
        }
        if services.iter().any(|o| o.name == s.name) {
            bad("duplicate feature service name".into());
        }
        if s.features.is_empty() {
            bad("features is empty".into());
        }
        let mut features: Vec<(usize, usize)> = Vec::new();
        for reference in &s.features {
            let (view_name, feature) = match reference.split_once(':') {
                Some((v, f)) => (v, Some(f)),
                None => (reference.as_str(), None),
            };
            let Some(vi) = views.iter().position(|v| v.name == view_name) else {
                bad(format!("{reference}: unknown feature view {view_name}"));
                continue;
            };
            let view = &views[vi];
            let def = &entities[view.entity];
            let picked: Vec<usize> = match feature {
                None => view.features.clone(),
                Some(f) => match def.position(f).filter(|p| view.features.contains(p)) {
                    Some(p) => vec![p],
                    None => {
                        bad(format!(
                            "{reference}: feature view {view_name} has no feature {f}"
                        ));
                        continue;
                    }
                },
            };
            for p in picked {
                if features.contains(&(vi, p)) {
                    bad(format!("{view_name}:{} listed twice", def.features[p].name));
                } else {
                    features.push((vi, p));
                }
            }
        }
        services.push(FeatureService {
            name: s.name,
            features,
        });
    }
    services
}

/// FNV-1a over a canonical JSON form of the definitions that ignores the
/// order of lines and features (the row layout is by name everywhere it is
/// stored), comments and formatting.
fn version_of(sources: &[SourceDef], entities: &[EntityDef]) -> String {
    let source_name = |i: usize| sources[i].name.as_str();
    let mut canonical: BTreeSet<String> = BTreeSet::new();
    for s in sources {
        let keys: BTreeSet<&String> = s.keys.iter().collect();
        canonical.insert(
            serde_json::json!(["source", s.name, s.topic, s.schema, keys, s.time_field])
                .to_string(),
        );
    }
    for e in entities {
        let feeds: BTreeSet<&str> = e.sources.iter().map(|&i| source_name(i)).collect();
        canonical.insert(serde_json::json!(["entity", e.name, e.key, feeds]).to_string());
        for f in &e.features {
            canonical.insert(
                serde_json::json!([
                    "feature",
                    e.name,
                    f.name,
                    source_name(f.source),
                    f.aggregation,
                    f.field,
                    f.window_ms,
                    f.filter
                ])
                .to_string(),
            );
        }
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for line in &canonical {
        for b in line.bytes().chain(std::iter::once(b'\n')) {
            hash ^= b as u64;
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("fs-{hash:016x}")
}

impl fmt::Display for FeatureSet {
    /// A catalogue: one line per feature.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for e in &self.entities {
            for d in &e.features {
                let source = &self.sources[d.source];
                write!(
                    f,
                    "{}.{}: {} of {} over {} from {}",
                    e.name,
                    d.name,
                    d.aggregation.as_str(),
                    d.field.map_or("events", |i| source.schema.fields()[i].name),
                    format_window(d.window_ms),
                    source.name
                )?;
                for (n, (i, v)) in d.filter.iter().enumerate() {
                    let field = &source.schema.fields()[*i];
                    let value = match (field.ty, v) {
                        (FieldType::Country, Datum::Int(code)) => {
                            format!("{:?}", unpack_country(*code).unwrap_or_default())
                        }
                        (_, Datum::Int(i)) => i.to_string(),
                        (_, Datum::Str(s)) => format!("{s:?}"),
                    };
                    let joint = if n == 0 { "where" } else { "and" };
                    write!(f, " {joint} {} = {value}", field.name)?;
                }
                writeln!(f)?;
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Rows.

/// Encodes an ISO 3166 alpha-2 country code (two ASCII uppercase letters
/// `b0 b1`) as the integer `(b0 << 8) | b1` (e.g. `"FR"` = 70 * 256 + 82 =
/// 18002); `None` for anything else. The encoding preserves order: codes
/// compare like the strings.
pub fn pack_country(country: &str) -> Option<i64> {
    match country.as_bytes() {
        &[b0, b1] if b0.is_ascii_uppercase() && b1.is_ascii_uppercase() => {
            Some(((b0 as i64) << 8) | b1 as i64)
        }
        _ => None,
    }
}

/// Decodes [`pack_country`]: `Some("FR")` for 18002; `None` for any integer
/// that is not the code of two ASCII uppercase letters (0 included).
pub fn unpack_country(code: i64) -> Option<String> {
    if !(0..=0xffff).contains(&code) {
        return None;
    }
    let (b0, b1) = ((code >> 8) as u8, (code & 0xff) as u8);
    (b0.is_ascii_uppercase() && b1.is_ascii_uppercase())
        .then(|| String::from_utf8(vec![b0, b1]).expect("ASCII"))
}

/// A feature value. Equality, order and hash are bitwise on floats (as
/// `f64::total_cmp`), so values can be dataflow data and a row compares equal
/// exactly when its encoding does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    fn order_key(&self) -> (u8, i64) {
        match *self {
            Value::Int(i) => (0, i),
            Value::Float(f) => (1, f.to_bits() as i64),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        self.order_key() == other.order_key()
    }
}

impl Eq for Value {}

impl PartialOrd for Value {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Value {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        match (self, other) {
            (Value::Float(a), Value::Float(b)) => a.total_cmp(b),
            _ => self.order_key().cmp(&other.order_key()),
        }
    }
}

impl std::hash::Hash for Value {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.order_key().hash(state);
    }
}

/// One version of one feature row: the data of the graph's output collection
/// (a change is the old version at `-1` and the new at `+1`), which the Redis
/// sink consolidates per frontier. Reading a row back from the store gives a
/// [`FeatureRow`], which adds the frontier it reflects.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Row {
    /// Index into [`FeatureSet::entities`].
    pub entity: u8,
    /// The entity key (`card_id`, `user_id`, ...): inline when short, so a
    /// change copies it without touching any other memory.
    pub id: Key,
    /// One value per feature of the entity, in its row order, shared by the
    /// change's `+1` and the next change's `-1` (a change allocates once).
    pub values: Arc<[Value]>,
}

impl Value {
    /// The value as a model input.
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }

    /// The value as written to Redis.
    pub fn encode(self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => format!("{v:?}"),
        }
    }

    /// The value's 64 bits: an integer's two's complement, a float's IEEE
    /// 754 bits. Its kind is its feature's ([`FeatureDef::kind`]).
    pub fn to_bits(self) -> u64 {
        match self {
            Value::Int(v) => v as u64,
            Value::Float(v) => v.to_bits(),
        }
    }

    /// The value of `kind` whose bits ([`Value::to_bits`]) are `bits`.
    pub fn from_bits(kind: ValueKind, bits: u64) -> Value {
        match kind {
            ValueKind::Int => Value::Int(bits as i64),
            ValueKind::Float => Value::Float(f64::from_bits(bits)),
        }
    }

    /// Parses the Redis encoding of a value of `kind`.
    pub fn decode(kind: ValueKind, raw: &str) -> Option<Value> {
        match kind {
            ValueKind::Int => raw.parse::<i64>().map(Value::Int).ok(),
            ValueKind::Float => raw.parse::<f64>().map(Value::Float).ok(),
        }
    }
}

/// Why a stored row could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("row {key} lacks field {field}")]
    MissingField { key: String, field: String },
    #[error("row {key} field {field} is not a valid {kind:?}: {value:?}")]
    BadValue {
        key: String,
        field: String,
        kind: ValueKind,
        value: String,
    },
    #[error("row {key} has feature-set version {found}, expected {expected}")]
    Version {
        key: String,
        found: String,
        expected: String,
    },
}

/// The features of one entity as of a frontier time.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRow {
    pub entity: Entity,
    pub id: String,
    /// The frontier (ms) the row reflects: it aggregates events strictly before it.
    pub as_of_ms: i64,
    /// One value per `entity.features`, in that order.
    pub values: Vec<Value>,
}

impl FeatureRow {
    /// The value of the feature called `name`, if the entity has it.
    pub fn get(&self, name: &str) -> Option<Value> {
        self.values.get(self.entity.position(name)?).copied()
    }

    /// The hash fields of this row, including `_as_of` and `_fv` (`version`).
    pub fn encode_fields(&self, version: &str) -> Vec<(String, String)> {
        debug_assert_eq!(self.values.len(), self.entity.features.len());
        let mut fields = Vec::with_capacity(self.values.len() + 2);
        for (spec, value) in self.entity.features.iter().zip(&self.values) {
            fields.push((spec.name.clone(), value.encode()));
        }
        fields.push((AS_OF_FIELD.to_owned(), self.as_of_ms.to_string()));
        fields.push((VERSION_FIELD.to_owned(), version.to_owned()));
        fields
    }

    /// Decodes a row from the fields of its hash (as returned by `HGETALL`),
    /// written under feature-set `version`. Returns `Ok(None)` for an empty
    /// hash, which is how Redis reports a missing key.
    pub fn decode(
        entity: &Entity,
        version: &str,
        id: &str,
        fields: &HashMap<String, String>,
    ) -> Result<Option<FeatureRow>, RowError> {
        let values: Vec<Option<&str>> = FeatureRow::read_fields(entity)
            .iter()
            .map(|f| fields.get(f).map(String::as_str))
            .collect();
        FeatureRow::decode_fields(entity, version, id, &values)
    }

    /// The hash fields a row is read from, in the order [`decode_fields`]
    /// takes their values (`HMGET key ...fields`): `_fv`, `_as_of`, then
    /// each feature of the entity.
    ///
    /// [`decode_fields`]: FeatureRow::decode_fields
    pub fn read_fields(entity: &Entity) -> Vec<String> {
        [VERSION_FIELD, AS_OF_FIELD]
            .into_iter()
            .map(str::to_owned)
            .chain(entity.features.iter().map(|f| f.name.clone()))
            .collect()
    }

    /// Decodes a row from the values of [`read_fields`] (`None`: the field
    /// is absent), written under feature-set `version`. Returns `Ok(None)`
    /// when every field is absent, which is how Redis reports a missing key.
    ///
    /// [`read_fields`]: FeatureRow::read_fields
    pub fn decode_fields(
        entity: &Entity,
        version: &str,
        id: &str,
        values: &[Option<&str>],
    ) -> Result<Option<FeatureRow>, RowError> {
        debug_assert_eq!(values.len(), entity.features.len() + 2);
        if values.iter().all(Option::is_none) {
            return Ok(None);
        }
        let key = || entity.redis_key(DEFAULT_KEY_PREFIX, id);
        let get = |i: usize, field: &str| {
            values
                .get(i)
                .copied()
                .flatten()
                .ok_or_else(|| RowError::MissingField {
                    key: key(),
                    field: field.to_owned(),
                })
        };
        let found = get(0, VERSION_FIELD)?;
        if found != version {
            return Err(RowError::Version {
                key: key(),
                found: found.to_owned(),
                expected: version.to_owned(),
            });
        }
        let bad = |field: &str, kind, value: &str| RowError::BadValue {
            key: key(),
            field: field.to_owned(),
            kind,
            value: value.to_owned(),
        };
        let as_of = get(1, AS_OF_FIELD)?;
        let as_of_ms = as_of
            .parse::<i64>()
            .map_err(|_| bad(AS_OF_FIELD, ValueKind::Int, as_of))?;
        let mut values_out = Vec::with_capacity(entity.features.len());
        for (i, spec) in entity.features.iter().enumerate() {
            let raw = get(i + 2, &spec.name)?;
            values_out.push(
                Value::decode(spec.kind(), raw).ok_or_else(|| bad(&spec.name, spec.kind(), raw))?,
            );
        }
        Ok(Some(FeatureRow {
            entity: entity.clone(),
            id: id.to_owned(),
            as_of_ms,
            values: values_out,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED: &str = include_str!("../../features.toml");

    fn shipped() -> FeatureSet {
        FeatureSet::parse("features.toml", SHIPPED).unwrap()
    }

    /// Definitions with one feature replaced by `feature` (TOML body lines).
    fn with_feature(feature: &str) -> Result<FeatureSet, DefinitionError> {
        let text = format!(
            r#"
[[sources]]
name = "txn"
topic = "t"
schema = "txn"
keys = ["card_id"]
time_field = "event_time"
[[entities]]
name = "card"
key = "card_id"
sources = ["txn"]
[[features]]
entity = "card"
source = "txn"
{feature}
"#
        );
        FeatureSet::parse("test.toml", &text)
    }

    fn problem(feature: &str) -> String {
        match with_feature(feature) {
            Err(DefinitionError::Invalid { list, .. }) => list.join("\n"),
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn feature_views_and_services_resolve_and_stay_out_of_the_version() {
        let set = shipped();
        for view in &set.views {
            let entity = &set.entities[view.entity];
            if view.features.len() == entity.features.len() {
                assert!(view.features.iter().copied().eq(0..entity.features.len()));
            }
        }
        for service in &set.services {
            assert!(!service.features.is_empty(), "{}", service.name);
        }
        // A view of two features of the first entity, and a service of one.
        let entity = &set.entities[0];
        let (f0, f1) = (&entity.features[0].name, &entity.features[1].name);
        let extra = format!(
            "{SHIPPED}\n[[feature_views]]\nname = \"small_view\"\nentity = \"{}\"\nfeatures = [\"{f0}\", \"{f1}\"]\n[[feature_services]]\nname = \"small\"\nfeatures = [\"small_view:{f1}\"]\n",
            entity.name
        );
        let more = FeatureSet::parse("x", &extra).unwrap();
        assert_eq!(
            more.version, set.version,
            "views and services are not hashed"
        );
        let small = more.view("small_view").unwrap();
        assert_eq!(small.ttl_ms, None);
        assert_eq!(small.features, vec![0, 1]);
        let svc = more.service("small").unwrap();
        let (v, p) = svc.features[0];
        assert_eq!(more.views[v].name, "small_view");
        assert_eq!(&more.entities[small.entity].features[p].name, f1);
    }

    #[test]
    fn bad_views_and_services_are_named() {
        let set = shipped();
        let view = &set.views[0];
        let entity = &set.entities[view.entity].name;
        let first = &set.entities[view.entity].features[0].name;
        let vn = &view.name;
        let text = format!(
            "{SHIPPED}\n[[feature_views]]\nname = \"v\"\nentity = \"ship\"\n[[feature_views]]\nname = \"w\"\nentity = \"{entity}\"\nfeatures = [\"nope\"]\nttl = \"1 h\"\n[[feature_services]]\nname = \"s\"\nfeatures = [\"zz\", \"{vn}:nope\", \"{vn}\", \"{vn}:{first}\"]\n"
        );
        let Err(DefinitionError::Invalid { list, .. }) = FeatureSet::parse("x", &text) else {
            panic!("expected problems");
        };
        let all = list.join("\n");
        for needle in [
            "feature view v: unknown entity ship".to_owned(),
            format!("feature view w: entity {entity} has no feature nope"),
            "feature view w: ttl: ".to_owned(),
            "feature service s: zz: unknown feature view zz".to_owned(),
            format!("feature service s: {vn}:nope: feature view {vn} has no feature nope"),
            format!("feature service s: {vn}:{first} listed twice"),
        ] {
            assert!(all.contains(&needle), "{needle} not in:\n{all}");
        }
    }

    #[test]
    fn the_shipped_file_has_the_22_features_of_today() {
        let set = shipped();
        let card = set.entity("card").unwrap();
        let user = set.entity("user").unwrap();
        assert_eq!(card.features.len(), 14);
        assert_eq!(user.features.len(), 8);
        assert_eq!(card.windows(), vec![60_000, 300_000, 3_600_000, 86_400_000]);
        assert_eq!(set.widest_window_ms(), 86_400_000);
        let atc = &user.features[user.position("add_to_cart_count_1h").unwrap()];
        assert_eq!(atc.filter, vec![(5, Datum::Str("add_to_cart".into()))]);
        for f in &card.features {
            let float = matches!(f.aggregation, Aggregation::Mean | Aggregation::Std);
            assert!(!float || f.kind() == ValueKind::Float, "{}", f.name);
        }
        assert!(set.version.starts_with("fs-") && set.version.len() == 19);
    }

    #[test]
    fn the_version_ignores_layout_and_changes_with_meaning() {
        let set = shipped();
        let reformatted = format!("# a comment\n{}", SHIPPED.replace(" = ", "="));
        assert_eq!(
            FeatureSet::parse("x", &reformatted).unwrap().version,
            set.version
        );
        let changed = SHIPPED.replacen("window = \"1m\"", "window = \"2m\"", 1);
        assert_ne!(
            FeatureSet::parse("x", &changed).unwrap().version,
            set.version
        );
        // Moving a feature to the end keeps the version.
        let block = "[[features]]\nname = \"txn_count_1m\"\nentity = \"card\"\nsource = \"txn\"\naggregation = \"count\"\nwindow = \"1m\"\n";
        assert!(SHIPPED.contains(block));
        let moved = format!("{}\n{block}", SHIPPED.replacen(block, "", 1));
        assert_eq!(FeatureSet::parse("x", &moved).unwrap().version, set.version);
    }

    #[test]
    fn errors_name_the_feature_and_the_problem() {
        let p = problem(
            "name = \"a\"\naggregation = \"sum\"\nfield = \"merchant_id\"\nwindow = \"1h\"",
        );
        assert!(
            p.contains("feature a: aggregation sum needs an integer field, merchant_id is string"),
            "{p}"
        );
        let p = problem(
            "name = \"b\"\naggregation = \"count\"\nwindow = \"1h\"\nfilter = { nope = 1 }",
        );
        assert!(p.contains("feature b: filter on unknown field nope"), "{p}");
        let p = problem("name = \"c\"\naggregation = \"max\"\nfield = \"amount\"\nwindow = \"1h\"");
        assert!(
            p.contains("feature c: unknown field amount in source txn"),
            "{p}"
        );
        let p = problem("name = \"d\"\naggregation = \"count\"\nwindow = \"31d\"");
        assert!(
            p.contains("feature d: window \"31d\" must be positive and at most 30d"),
            "{p}"
        );
        let p = problem("name = \"e\"\naggregation = \"median\"\nwindow = \"1h\"");
        assert!(
            p.contains("feature e: unknown aggregation \"median\""),
            "{p}"
        );
        let p = problem("name = \"f\"\naggregation = \"count\"\nwindow = \"1h\"\nfilter = { channel = \"web\" }");
        assert!(
            p.contains("feature f: filter channel = \"web\": not one of pos, ecom, atm"),
            "{p}"
        );
        let p = problem(
            "name = \"g\"\naggregation = \"mode\"\nfield = \"merchant_id\"\nwindow = \"1h\"",
        );
        assert!(
            p.contains("feature g: aggregation mode needs an integer"),
            "{p}"
        );
        let dup = SHIPPED.replacen("name = \"txn_count_5m\"", "name = \"txn_count_1m\"", 1);
        match FeatureSet::parse("x", &dup) {
            Err(e) => assert!(
                e.to_string()
                    .contains("feature txn_count_1m: duplicate feature name in entity card"),
                "{e}"
            ),
            Ok(_) => panic!("duplicate accepted"),
        }
        let unknown_source = SHIPPED.replacen("source = \"txn\"", "source = \"txns\"", 1);
        let e = FeatureSet::parse("x", &unknown_source)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("feature txn_count_1m: unknown source txns"),
            "{e}"
        );
    }

    #[test]
    fn windows_must_be_multiples_of_the_tick() {
        let set =
            with_feature("name = \"w\"\naggregation = \"count\"\nwindow = \"1500ms\"").unwrap();
        assert!(set.check_tick(500).is_ok());
        let e = set.check_tick(1000).unwrap_err();
        assert!(
            e.contains("feature w: window 1500ms is not a multiple of the tick (1000 ms)"),
            "{e}"
        );
    }

    #[test]
    fn windows_parse_and_format() {
        for (text, ms) in [
            ("100ms", 100),
            ("10s", 10_000),
            ("5m", 300_000),
            ("24h", 86_400_000),
            ("30d", MAX_WINDOW_MS),
        ] {
            assert_eq!(parse_window(text), Ok(ms));
        }
        assert_eq!(format_window(86_400_000), "1d");
        assert_eq!(format_window(90_000), "90s");
        for bad in ["", "5", "m", "0m", "5 weeks", "-1h", "1.5h"] {
            assert!(parse_window(bad).is_err(), "{bad:?}");
        }
    }

    fn row(entity: &Entity, ints: &[i64], floats: &[f64], as_of_ms: i64) -> FeatureRow {
        let (mut i, mut f) = (ints.iter().cycle(), floats.iter().cycle());
        let values = entity
            .features
            .iter()
            .map(|spec| match spec.kind() {
                ValueKind::Int => Value::Int(*i.next().unwrap_or(&0)),
                ValueKind::Float => Value::Float(*f.next().unwrap_or(&0.0)),
            })
            .collect();
        FeatureRow {
            entity: entity.clone(),
            id: "c-1".into(),
            as_of_ms,
            values,
        }
    }

    fn as_map(row: &FeatureRow, version: &str) -> HashMap<String, String> {
        row.encode_fields(version).into_iter().collect()
    }

    proptest! {
        #[test]
        fn values_round_trip_through_their_bits(int in any::<i64>(), float in any::<f64>()) {
            // Every float, NaNs and -0.0 included: `Value` equality is bitwise.
            prop_assert_eq!(Value::from_bits(ValueKind::Int, Value::Int(int).to_bits()), Value::Int(int));
            prop_assert_eq!(
                Value::from_bits(ValueKind::Float, Value::Float(float).to_bits()),
                Value::Float(float)
            );
        }

        #[test]
        fn rows_round_trip_bit_exactly(
            ints in proptest::collection::vec(any::<i64>(), 1..14),
            floats in proptest::collection::vec(any::<f64>().prop_filter("finite", |f| f.is_finite()), 1..3),
            as_of in any::<i64>(),
        ) {
            let set = shipped();
            for entity in &set.entities {
                let original = row(entity, &ints, &floats, as_of);
                let decoded = FeatureRow::decode(entity, &set.version, "c-1", &as_map(&original, &set.version)).unwrap().unwrap();
                prop_assert_eq!(&decoded, &original);
            }
        }
    }

    #[test]
    fn an_empty_hash_is_a_missing_row() {
        let set = shipped();
        assert_eq!(
            FeatureRow::decode(&set.entities[0], &set.version, "x", &HashMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn decoding_names_the_broken_field_and_rejects_other_versions() {
        let set = shipped();
        let card = set.entity("card").unwrap();
        let mut fields = as_map(&row(card, &[1], &[2.5], 10), &set.version);
        let float = card
            .features
            .iter()
            .find(|f| f.kind() == ValueKind::Float)
            .unwrap()
            .name
            .clone();
        let first = card.features[0].name.clone();
        fields.insert(float.clone(), "abc".into());
        let err = FeatureRow::decode(card, &set.version, "x", &fields).unwrap_err();
        assert!(err.to_string().contains(&float), "{err}");
        fields.remove(&first);
        let err = FeatureRow::decode(card, &set.version, "x", &fields).unwrap_err();
        assert_eq!(
            err,
            RowError::MissingField {
                key: "sfs:card:x".into(),
                field: first
            }
        );
        let fields = as_map(&row(card, &[1], &[2.5], 10), "fs-0000000000000000");
        assert!(matches!(
            FeatureRow::decode(card, &set.version, "x", &fields),
            Err(RowError::Version { .. })
        ));
    }

    #[test]
    fn countries_pack_to_two_bytes_and_back() {
        assert_eq!(pack_country("FR"), Some(70 * 256 + 82));
        assert_eq!(unpack_country(70 * 256 + 82).as_deref(), Some("FR"));
        for bad in ["", "F", "fr", "FRA", "F1", "É"] {
            assert_eq!(pack_country(bad), None, "{bad:?}");
        }
        for bad in [0, -1, 65, 0x4161, 0x10000 + 0x4646, i64::MAX] {
            assert_eq!(unpack_country(bad), None, "{bad}");
        }
    }

    proptest! {
        #[test]
        fn every_country_round_trips_and_packing_preserves_order(
            a in "[A-Z]{2}", b in "[A-Z]{2}",
        ) {
            let (pa, pb) = (pack_country(&a).unwrap(), pack_country(&b).unwrap());
            prop_assert_eq!(unpack_country(pa), Some(a.clone()));
            prop_assert_eq!(pa.cmp(&pb), a.cmp(&b));
        }
    }

    #[test]
    fn field_accessors_follow_the_field_tables() {
        let t = Txn {
            event_id: "e".into(),
            card_id: "c".into(),
            user_id: "u".into(),
            merchant_id: "m".into(),
            mcc: 5411,
            amount_minor: 1234,
            currency: "EUR".into(),
            country: "FR".into(),
            channel: Channel::Ecom,
            event_time: 99,
            device_id: None,
            ip_country: Some("DE".into()),
        };
        let get = |name: &str| txn_field(&t, Schema::Txn.field(name).unwrap().0);
        assert_eq!(get("amount_minor"), Some(Datum::Int(1234)));
        assert_eq!(
            get("country"),
            Some(Datum::Int(pack_country("FR").unwrap()))
        );
        assert_eq!(get("channel"), Some(Datum::Str("ecom".into())));
        assert_eq!(get("device_id"), None);
        assert_eq!(
            get("ip_country"),
            Some(Datum::Int(pack_country("DE").unwrap()))
        );
        assert_eq!(get("event_time"), Some(Datum::Int(99)));
        for (i, _) in TXN_FIELDS.iter().enumerate() {
            assert_eq!(
                txn_has_field(&t, i),
                txn_field(&t, i).is_some(),
                "field {i}"
            );
            if let Some(d) = txn_field(&t, i) {
                assert!(txn_field_is(&t, i, &d), "field {i}");
            }
        }
        let c = Click {
            event_id: "e".into(),
            user_id: "u".into(),
            session_id: "s".into(),
            item_id: "i".into(),
            category: "books".into(),
            action: ClickAction::AddToCart,
            event_time: 7,
            dwell_ms: Some(30),
        };
        let get = |name: &str| click_field(&c, Schema::Click.field(name).unwrap().0);
        assert_eq!(get("action"), Some(Datum::Str("add_to_cart".into())));
        assert_eq!(get("dwell_ms"), Some(Datum::Int(30)));
        for (i, _) in CLICK_FIELDS.iter().enumerate() {
            assert_eq!(
                click_has_field(&c, i),
                click_field(&c, i).is_some(),
                "field {i}"
            );
            if let Some(d) = click_field(&c, i) {
                assert!(click_field_is(&c, i, &d), "field {i}");
            }
        }
    }
}
