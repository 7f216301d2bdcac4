//! The feature sets and the feature-row encoding of the online store.
//!
//! A row is one Redis hash, `{prefix}{entity}:{id}` (prefix `sfs:` by default),
//! whose fields are the feature names of its entity plus `_as_of` (the
//! dataflow frontier, in ms, that the row reflects) and `_fv` (the
//! feature-set version). Integer features (counts, minor-unit money, times)
//! are written as decimal integers; real features (mean, std) with Rust's
//! shortest round-trip float formatting, so decoding gives back the same bits.
//!
//! Windows are `[t - W, t)`: the row as of `t` aggregates events strictly
//! before `t`.

use std::collections::HashMap;
use std::fmt;

/// Version of the feature definitions below; bump on any change of meaning.
pub const FEATURE_SET_VERSION: u32 = 2;
/// Default key prefix of every key the system writes to Redis.
pub const DEFAULT_KEY_PREFIX: &str = "sfs:";
/// Hash field holding the frontier time (ms) a row reflects.
pub const AS_OF_FIELD: &str = "_as_of";
/// Hash field holding the feature-set version of a row.
pub const VERSION_FIELD: &str = "_fv";

/// Window lengths in milliseconds.
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 60 * MINUTE_MS;
pub const DAY_MS: i64 = 24 * HOUR_MS;

/// The entities that own feature rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entity {
    /// Keyed by `card_id`, from `txn.events`.
    Card,
    /// Keyed by `user_id`, from `click.events` and `txn.events`.
    User,
}

impl Entity {
    pub const ALL: [Entity; 2] = [Entity::Card, Entity::User];

    /// The name used in keys and URLs.
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Card => "card",
            Entity::User => "user",
        }
    }

    /// Parses `card` or `user`.
    pub fn parse(s: &str) -> Option<Entity> {
        match s {
            "card" => Some(Entity::Card),
            "user" => Some(Entity::User),
            _ => None,
        }
    }

    /// The features of this entity, in row order.
    pub fn features(self) -> &'static [FeatureSpec] {
        match self {
            Entity::Card => CARD_FEATURES,
            Entity::User => USER_FEATURES,
        }
    }

    /// The Redis key of the row of `id`.
    pub fn key(self, prefix: &str, id: &str) -> String {
        format!("{prefix}{}:{id}", self.as_str())
    }
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether a feature is an exact integer or a real number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    Int,
    Float,
}

/// One feature: its name and kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureSpec {
    pub name: &'static str,
    pub kind: ValueKind,
}

const fn int(name: &'static str) -> FeatureSpec {
    FeatureSpec {
        name,
        kind: ValueKind::Int,
    }
}

const fn float(name: &'static str) -> FeatureSpec {
    FeatureSpec {
        name,
        kind: ValueKind::Float,
    }
}

/// Card features, from `txn.events` keyed by `card_id`. Money in minor units.
/// A card row exists only while the card has a transaction in the last 24h, so
/// the 24h mean, std and max are always defined. `amount_std_24h` is the
/// population standard deviation. `last_txn_time` is in ms.
/// `top_country_24h` is the country with the most transactions of the card in
/// the 24h window (ties: the lexicographically smallest), encoded as an
/// integer by [`pack_country`] (decode with [`unpack_country`]); 0 if that
/// country is not two ASCII uppercase letters (validated events always are).
pub const CARD_FEATURES: &[FeatureSpec] = &[
    int("txn_count_1m"),
    int("txn_count_5m"),
    int("txn_count_1h"),
    int("txn_count_24h"),
    int("amount_sum_1h"),
    int("amount_sum_24h"),
    float("amount_mean_24h"),
    float("amount_std_24h"),
    int("amount_max_24h"),
    int("distinct_merchants_1h"),
    int("distinct_merchants_24h"),
    int("distinct_countries_24h"),
    int("last_txn_time"),
    int("top_country_24h"),
];

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

/// User features, from `click.events` and `txn.events` keyed by `user_id`.
pub const USER_FEATURES: &[FeatureSpec] = &[
    int("click_count_5m"),
    int("click_count_1h"),
    int("click_count_24h"),
    int("add_to_cart_count_1h"),
    int("purchase_count_24h"),
    int("distinct_categories_1h"),
    int("txn_count_24h"),
    int("amount_sum_24h"),
];

/// A feature value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
}

impl Value {
    /// The value as a model input.
    pub fn as_f64(self) -> f64 {
        match self {
            Value::Int(v) => v as f64,
            Value::Float(v) => v,
        }
    }

    fn encode(self) -> String {
        match self {
            Value::Int(v) => v.to_string(),
            Value::Float(v) => format!("{v:?}"),
        }
    }
}

/// Why a stored row could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RowError {
    #[error("row {key} lacks field {field}")]
    MissingField { key: String, field: &'static str },
    #[error("row {key} field {field} is not a valid {kind:?}: {value:?}")]
    BadValue {
        key: String,
        field: &'static str,
        kind: ValueKind,
        value: String,
    },
    #[error("row {key} has feature-set version {found}, expected {expected}")]
    Version {
        key: String,
        found: String,
        expected: u32,
    },
}

/// The features of one entity as of a frontier time.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureRow {
    pub entity: Entity,
    pub id: String,
    /// The frontier (ms) the row reflects: it aggregates events strictly before it.
    pub as_of_ms: i64,
    /// One value per `entity.features()`, in that order.
    pub values: Vec<Value>,
}

impl FeatureRow {
    /// The value of the feature called `name`, if the entity has it.
    pub fn get(&self, name: &str) -> Option<Value> {
        let index = self.entity.features().iter().position(|f| f.name == name)?;
        self.values.get(index).copied()
    }

    /// The hash fields of this row, including `_as_of` and `_fv`.
    pub fn encode_fields(&self) -> Vec<(&'static str, String)> {
        debug_assert_eq!(self.values.len(), self.entity.features().len());
        let mut fields = Vec::with_capacity(self.values.len() + 2);
        for (spec, value) in self.entity.features().iter().zip(&self.values) {
            fields.push((spec.name, value.encode()));
        }
        fields.push((AS_OF_FIELD, self.as_of_ms.to_string()));
        fields.push((VERSION_FIELD, FEATURE_SET_VERSION.to_string()));
        fields
    }

    /// Decodes a row from the fields of its hash (as returned by `HGETALL`).
    /// Returns `Ok(None)` for an empty hash, which is how Redis reports a
    /// missing key.
    pub fn decode(
        entity: Entity,
        id: &str,
        fields: &HashMap<String, String>,
    ) -> Result<Option<FeatureRow>, RowError> {
        if fields.is_empty() {
            return Ok(None);
        }
        let key = || entity.key(DEFAULT_KEY_PREFIX, id);
        let get = |field: &'static str| {
            fields
                .get(field)
                .ok_or_else(|| RowError::MissingField { key: key(), field })
        };
        let version = get(VERSION_FIELD)?;
        if version.parse::<u32>().ok() != Some(FEATURE_SET_VERSION) {
            return Err(RowError::Version {
                key: key(),
                found: version.clone(),
                expected: FEATURE_SET_VERSION,
            });
        }
        let bad = |field: &'static str, kind, value: &String| RowError::BadValue {
            key: key(),
            field,
            kind,
            value: value.clone(),
        };
        let as_of = get(AS_OF_FIELD)?;
        let as_of_ms = as_of
            .parse::<i64>()
            .map_err(|_| bad(AS_OF_FIELD, ValueKind::Int, as_of))?;
        let mut values = Vec::with_capacity(entity.features().len());
        for spec in entity.features() {
            let raw = get(spec.name)?;
            let value = match spec.kind {
                ValueKind::Int => raw.parse::<i64>().map(Value::Int).ok(),
                ValueKind::Float => raw.parse::<f64>().map(Value::Float).ok(),
            };
            values.push(value.ok_or_else(|| bad(spec.name, spec.kind, raw))?);
        }
        Ok(Some(FeatureRow {
            entity,
            id: id.to_owned(),
            as_of_ms,
            values,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(entity: Entity, ints: &[i64], floats: &[f64], as_of_ms: i64) -> FeatureRow {
        let (mut i, mut f) = (ints.iter(), floats.iter());
        let values = entity
            .features()
            .iter()
            .map(|spec| match spec.kind {
                ValueKind::Int => Value::Int(*i.next().unwrap_or(&0)),
                ValueKind::Float => Value::Float(*f.next().unwrap_or(&0.0)),
            })
            .collect();
        FeatureRow {
            entity,
            id: "c-1".into(),
            as_of_ms,
            values,
        }
    }

    fn as_map(row: &FeatureRow) -> HashMap<String, String> {
        row.encode_fields()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect()
    }

    proptest! {
        #[test]
        fn rows_round_trip_bit_exactly(
            ints in proptest::collection::vec(any::<i64>(), 13),
            floats in proptest::collection::vec(any::<f64>().prop_filter("finite", |f| f.is_finite()), 2),
            as_of in any::<i64>(),
        ) {
            for entity in Entity::ALL {
                let original = row(entity, &ints, &floats, as_of);
                let decoded = FeatureRow::decode(entity, "c-1", &as_map(&original)).unwrap().unwrap();
                prop_assert_eq!(&decoded, &original);
            }
        }
    }

    #[test]
    fn an_empty_hash_is_a_missing_row() {
        assert_eq!(
            FeatureRow::decode(Entity::Card, "x", &HashMap::new()),
            Ok(None)
        );
    }

    #[test]
    fn decoding_names_the_broken_field() {
        let mut fields = as_map(&row(Entity::Card, &[1; 13], &[2.5, 0.5], 10));
        fields.insert("amount_std_24h".into(), "abc".into());
        let err = FeatureRow::decode(Entity::Card, "x", &fields).unwrap_err();
        assert!(err.to_string().contains("amount_std_24h"), "{err}");
        fields.remove("txn_count_1m");
        let err = FeatureRow::decode(Entity::Card, "x", &fields).unwrap_err();
        assert_eq!(
            err,
            RowError::MissingField {
                key: "sfs:card:x".into(),
                field: "txn_count_1m"
            }
        );
    }

    #[test]
    fn another_feature_set_version_is_rejected() {
        let mut fields = as_map(&row(Entity::User, &[1; 8], &[], 10));
        fields.insert(VERSION_FIELD.into(), "999".into());
        assert!(matches!(
            FeatureRow::decode(Entity::User, "x", &fields),
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
        assert_eq!(CARD_FEATURES.last().unwrap().name, "top_country_24h");
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
    fn get_reads_by_name() {
        let r = row(Entity::Card, &[1, 2, 3, 4], &[7.5], 10);
        assert_eq!(r.get("txn_count_5m"), Some(Value::Int(2)));
        assert_eq!(r.get("amount_mean_24h"), Some(Value::Float(7.5)));
        assert_eq!(r.get("nope"), None);
    }
}
