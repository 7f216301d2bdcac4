//! The feature vectors the models see: the names a model may list, where each
//! value comes from (a row of the loaded feature set, or the request), and the
//! cold-start defaults.
//!
//! Row features are named `{entity}.{feature}` after the loaded
//! [`FeatureSet`] (`features.toml`); without a row they are 0.
//! `{entity}_cold_start` is 1.0 when that entity's row was not found (or its
//! id was not given).
//!
//! Request-time features (documented in server/CONTEXT.md):
//! - `amount_log1p`: ln(1 + amount in minor units).
//! - `amount_to_mean_24h`: amount / card `amount_mean_24h`; 1.0 without a card row.
//! - `amount_zscore_24h`: (amount - mean) / max(card `amount_std_24h`, 1 minor
//!   unit), clamped to [-50, 50]; 0.0 without a card row.
//! - `country_mismatch`: 1.0 when the request names a country and the card row
//!   has a usual country (`top_country_24h`, decoded with
//!   `schemas::features::unpack_country`) and they differ (case-insensitive);
//!   0.0 otherwise (unknown is not a mismatch).
//! - `seconds_since_last_txn`: (request time - card `last_txn_time`) / 1000,
//!   clamped to [0, 86400]; 86400 without a card row.
//! - `channel_ecom`, `channel_atm`: one-hot of the request channel (pos: both 0).
//!
//! The card features these read are the only feature names the server knows
//! by name: a model listing a request-time feature whose card feature the
//! loaded set lacks is refused at load (never silently 0).

use schemas::features::{
    unpack_country, Aggregation, FeatureRow, FeatureSet, FieldType, Value, ValueKind,
};
use schemas::Channel;

/// The entity of the card being charged (keyed by the fraud request's `card_id`).
pub const CARD_ENTITY: &str = "card";
/// The entity of the customer (keyed by the requests' `user_id`).
pub const USER_ENTITY: &str = "user";
/// Request roles (`[request]` of features.toml), each bound to a card feature.
/// Mean amount (minor units), read by `amount_to_mean_24h` and `amount_zscore_24h`.
pub const AMOUNT_MEAN: &str = "amount_mean";
/// Amount standard deviation, read by `amount_zscore_24h`.
pub const AMOUNT_STD: &str = "amount_std";
/// Time (ms) of the card's latest transaction, read by `seconds_since_last_txn`.
pub const LAST_TIME: &str = "last_time";
/// The card's usual country (packed code), read by `country_mismatch`.
pub const USUAL_COUNTRY: &str = "usual_country";

/// The feature bound to request role `role`, if the set binds it.
pub fn request_feature<'a>(set: &'a FeatureSet, role: &str) -> Option<&'a str> {
    set.request.get(role).map(String::as_str)
}
/// The request-time features, in the order models list them by convention.
pub const REQUEST_TIME_FEATURES: &[&str] = &[
    "amount_log1p",
    "amount_to_mean_24h",
    "amount_zscore_24h",
    "country_mismatch",
    "seconds_since_last_txn",
    "channel_ecom",
    "channel_atm",
];

/// Suffix of the cold-start flags, `{entity}_cold_start`.
pub const COLD_START_SUFFIX: &str = "_cold_start";

/// Cap of `seconds_since_last_txn`, also its cold-start value (one day: the
/// models are trained with this cap).
pub const MAX_SECONDS_SINCE_LAST_TXN: f64 = 86_400.0;

/// A feature of the loaded set: indices into `FeatureSet::entities` and
/// that entity's `features` (its row order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureAt {
    pub entity: usize,
    pub feature: usize,
}

/// Where one model input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    AmountLog1p,
    AmountToMean {
        mean: FeatureAt,
    },
    AmountZscore {
        mean: FeatureAt,
        std: FeatureAt,
    },
    CountryMismatch {
        usual: FeatureAt,
    },
    SecondsSinceLastTxn {
        last: FeatureAt,
    },
    ChannelEcom,
    ChannelAtm,
    /// 1.0 when the row of this entity (index into `FeatureSet::entities`) is absent.
    ColdStart {
        entity: usize,
    },
    /// A feature of a row; 0 when the row is absent.
    Row(FeatureAt),
}

impl Source {
    /// Whether this input needs the transaction in the request (fraud only).
    pub fn needs_transaction(self) -> bool {
        !matches!(self, Source::Row(_) | Source::ColdStart { .. })
    }

    /// The entity whose row this input reads, if any.
    pub fn entity(self) -> Option<usize> {
        match self {
            Source::Row(at)
            | Source::AmountToMean { mean: at }
            | Source::AmountZscore { mean: at, .. }
            | Source::CountryMismatch { usual: at }
            | Source::SecondsSinceLastTxn { last: at } => Some(at.entity),
            Source::ColdStart { entity } => Some(entity),
            Source::AmountLog1p | Source::ChannelEcom | Source::ChannelAtm => None,
        }
    }
}

/// Why a model input name does not resolve against the loaded feature set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeatureError {
    #[error("unknown feature {name}: not a request-time feature, {{entity}}_cold_start or {{entity}}.{{feature}}")]
    Unknown { name: String },
    #[error("feature {name}: the feature set ({version}) has no entity {entity}")]
    NoEntity {
        name: String,
        entity: String,
        version: String,
    },
    #[error(
        "feature {name}: entity {entity} has no feature {feature} in the feature set ({version})"
    )]
    NoFeature {
        name: String,
        entity: String,
        feature: String,
        version: String,
    },
    #[error("request-time feature {name} needs the {CARD_ENTITY} feature bound to request role {needs} ([request] of the feature definitions), which the feature set ({version}) does not define")]
    NeedsCardFeature {
        name: &'static str,
        needs: &'static str,
        version: String,
    },
    #[error("request-time feature {name} needs {CARD_ENTITY}.{needs} to be the mode or last value of a country field")]
    NotACountry {
        name: &'static str,
        /// The card feature bound to the usual-country role.
        needs: String,
    },
}

/// The card feature `needs` of request-time feature `name`.
fn card_feature(
    set: &FeatureSet,
    name: &'static str,
    needs: &'static str,
) -> Result<FeatureAt, FeatureError> {
    let missing = || FeatureError::NeedsCardFeature {
        name,
        needs,
        version: set.version.clone(),
    };
    let entity = set.entity_index(CARD_ENTITY).ok_or_else(missing)?;
    let bound = request_feature(set, needs).ok_or_else(missing)?;
    let feature = set.entities[entity].position(bound).ok_or_else(missing)?;
    Ok(FeatureAt { entity, feature })
}

/// The usual-country feature: it must hold a packed country code.
fn country_feature(set: &FeatureSet, name: &'static str) -> Result<FeatureAt, FeatureError> {
    let at = card_feature(set, name, USUAL_COUNTRY)?;
    let def = &set.entities[at.entity].features[at.feature];
    let field = def
        .field
        .map(|i| set.sources[def.source].schema.fields()[i].ty);
    let holds_a_country = matches!(def.aggregation, Aggregation::Mode | Aggregation::Last)
        && def.kind() == ValueKind::Int
        && field == Some(FieldType::Country);
    if holds_a_country {
        Ok(at)
    } else {
        Err(FeatureError::NotACountry {
            name,
            needs: set.entities[at.entity].features[at.feature].name.clone(),
        })
    }
}

/// The source of the model input called `name`, against the loaded set.
pub fn resolve(name: &str, set: &FeatureSet) -> Result<Source, FeatureError> {
    Ok(match name {
        "amount_log1p" => Source::AmountLog1p,
        "amount_to_mean_24h" => Source::AmountToMean {
            mean: card_feature(set, "amount_to_mean_24h", AMOUNT_MEAN)?,
        },
        "amount_zscore_24h" => Source::AmountZscore {
            mean: card_feature(set, "amount_zscore_24h", AMOUNT_MEAN)?,
            std: card_feature(set, "amount_zscore_24h", AMOUNT_STD)?,
        },
        "country_mismatch" => Source::CountryMismatch {
            usual: country_feature(set, "country_mismatch")?,
        },
        "seconds_since_last_txn" => Source::SecondsSinceLastTxn {
            last: card_feature(set, "seconds_since_last_txn", LAST_TIME)?,
        },
        "channel_ecom" => Source::ChannelEcom,
        "channel_atm" => Source::ChannelAtm,
        _ => {
            if let Some((entity, feature)) = name.split_once('.') {
                let no_entity = || FeatureError::NoEntity {
                    name: name.to_owned(),
                    entity: entity.to_owned(),
                    version: set.version.clone(),
                };
                let e = set.entity_index(entity).ok_or_else(no_entity)?;
                let f =
                    set.entities[e]
                        .position(feature)
                        .ok_or_else(|| FeatureError::NoFeature {
                            name: name.to_owned(),
                            entity: entity.to_owned(),
                            feature: feature.to_owned(),
                            version: set.version.clone(),
                        })?;
                Source::Row(FeatureAt {
                    entity: e,
                    feature: f,
                })
            } else if let Some(entity) = name.strip_suffix(COLD_START_SUFFIX) {
                let entity = set
                    .entity_index(entity)
                    .ok_or_else(|| FeatureError::NoEntity {
                        name: name.to_owned(),
                        entity: entity.to_owned(),
                        version: set.version.clone(),
                    })?;
                Source::ColdStart { entity }
            } else {
                return Err(FeatureError::Unknown {
                    name: name.to_owned(),
                });
            }
        }
    })
}

/// The transaction being scored, as far as features need it.
#[derive(Debug, Clone, Default)]
pub struct TxnContext {
    pub amount_minor: i64,
    pub country: Option<String>,
    pub channel: Option<Channel>,
    /// Request time (ms since the epoch): now, unless the request says otherwise.
    pub time_ms: i64,
}

/// Everything a feature vector is computed from.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The rows read for this request by entity (index into
    /// `FeatureSet::entities`); `None` when not read or not found.
    pub rows: Vec<Option<FeatureRow>>,
    /// The stream job's durable frontier, when it has recorded one.
    pub frontier_ms: Option<i64>,
    pub txn: TxnContext,
}

impl Context {
    /// The row of entity `entity`, if it was read and found.
    pub fn row(&self, entity: usize) -> Option<&FeatureRow> {
        self.rows.get(entity)?.as_ref()
    }

    /// The value of one feature; `None` without its row.
    fn feature(&self, at: FeatureAt) -> Option<Value> {
        self.row(at.entity)?.values.get(at.feature).copied()
    }

    /// The card's usual country (`usual` is its `top_country_24h`), decoded;
    /// `None` without a card row or when the code is not a country.
    pub fn usual_country(&self, usual: FeatureAt) -> Option<String> {
        match self.feature(usual)? {
            Value::Int(code) => unpack_country(code),
            Value::Float(_) => None,
        }
    }

    /// The value of one input.
    pub fn value(&self, source: Source) -> f64 {
        let amount = self.txn.amount_minor as f64;
        let real = |at| self.feature(at).map(Value::as_f64);
        match source {
            Source::AmountLog1p => amount.max(0.0).ln_1p(),
            Source::AmountToMean { mean } => match real(mean) {
                Some(mean) if mean > 0.0 => amount / mean,
                _ => 1.0,
            },
            Source::AmountZscore { mean, std } => match (real(mean), real(std)) {
                (Some(mean), Some(std)) => ((amount - mean) / std.max(1.0)).clamp(-50.0, 50.0),
                _ => 0.0,
            },
            Source::CountryMismatch { usual } => {
                match (&self.txn.country, self.usual_country(usual)) {
                    (Some(req), Some(usual)) if !req.eq_ignore_ascii_case(&usual) => 1.0,
                    _ => 0.0,
                }
            }
            Source::SecondsSinceLastTxn { last } => match real(last) {
                Some(last) => ((self.txn.time_ms as f64 - last) / 1000.0)
                    .clamp(0.0, MAX_SECONDS_SINCE_LAST_TXN),
                None => MAX_SECONDS_SINCE_LAST_TXN,
            },
            Source::ChannelEcom => f64::from(u8::from(self.txn.channel == Some(Channel::Ecom))),
            Source::ChannelAtm => f64::from(u8::from(self.txn.channel == Some(Channel::Atm))),
            Source::ColdStart { entity } => f64::from(u8::from(self.row(entity).is_none())),
            Source::Row(at) => real(at).unwrap_or(0.0),
        }
    }

    /// The input vector of a model, in its feature order.
    pub fn vector(&self, plan: &[Source], out: &mut Vec<f32>) {
        out.clear();
        out.extend(plan.iter().map(|s| self.value(*s) as f32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::features::pack_country;

    const SHIPPED: &str = include_str!("../../features.toml");

    fn shipped() -> FeatureSet {
        FeatureSet::parse("features.toml", SHIPPED).unwrap()
    }

    /// The shipped definitions without the feature called `name`.
    fn without(name: &str) -> FeatureSet {
        let block = format!("[[features]]\nname = \"{name}\"\n");
        let start = SHIPPED.find(&block).expect("the feature is in the file");
        let end = SHIPPED[start + 1..]
            .find("[[features]]")
            .map_or(SHIPPED.len(), |i| start + 1 + i);
        // Its request binding goes too (a binding must name a feature).
        let binding = format!(" = \"{name}\"");
        let text: String = format!("{}{}", &SHIPPED[..start], &SHIPPED[end..])
            .lines()
            .filter(|l| !l.ends_with(&binding))
            .map(|l| format!("{l}\n"))
            .collect();
        FeatureSet::parse("test.toml", &text).unwrap()
    }

    fn card_row(set: &FeatureSet, mean: f64, std: f64, last_txn_time: i64) -> FeatureRow {
        let card = set.entity(CARD_ENTITY).unwrap();
        let values = card
            .features
            .iter()
            .map(|f| match Some(f.name.as_str()) {
                n if n == request_feature(set, AMOUNT_MEAN) => Value::Float(mean),
                n if n == request_feature(set, AMOUNT_STD) => Value::Float(std),
                n if n == request_feature(set, LAST_TIME) => Value::Int(last_txn_time),
                n if n == request_feature(set, USUAL_COUNTRY) => {
                    Value::Int(pack_country("DE").unwrap())
                }
                n if n == card.features.first().map(|f| f.name.as_str()) => Value::Int(3),
                _ => Value::Int(1),
            })
            .collect();
        FeatureRow {
            entity: card.clone(),
            id: "c".into(),
            as_of_ms: 0,
            values,
        }
    }

    /// A context whose only row is `card`.
    fn with_card(set: &FeatureSet, card: FeatureRow, txn: TxnContext) -> Context {
        let mut rows = vec![None; set.entities.len()];
        rows[set.entity_index(CARD_ENTITY).unwrap()] = Some(card);
        Context {
            rows,
            frontier_ms: None,
            txn,
        }
    }

    #[test]
    fn every_request_time_feature_resolves_and_reads_the_transaction() {
        let set = shipped();
        for name in REQUEST_TIME_FEATURES {
            let source = resolve(name, &set).unwrap();
            assert!(source.needs_transaction(), "{name}");
        }
    }

    #[test]
    fn every_name_resolves_against_the_set_and_unknown_names_do_not() {
        let set = shipped();
        let card = set.entity_index("card").unwrap();
        let user = set.entity_index("user").unwrap();
        let at = |entity, name| FeatureAt {
            entity,
            feature: set.entities[entity].position(name).unwrap(),
        };
        let first = set.entities[card].features[0].name.clone();
        let last = set.entities[user].features.last().unwrap().name.clone();
        assert_eq!(
            resolve(&format!("card.{first}"), &set),
            Ok(Source::Row(at(card, &first)))
        );
        assert_eq!(
            resolve(&format!("user.{last}"), &set),
            Ok(Source::Row(at(user, &last)))
        );
        assert_eq!(
            resolve("country_mismatch", &set),
            Ok(Source::CountryMismatch {
                usual: at(card, request_feature(&set, USUAL_COUNTRY).unwrap())
            })
        );
        assert_eq!(
            resolve("user_cold_start", &set),
            Ok(Source::ColdStart { entity: user })
        );
        for name in set.qualified_names() {
            assert!(resolve(&name, &set).is_ok(), "{name}");
        }
        let err = resolve("card.nope", &set).unwrap_err().to_string();
        assert!(err.contains("entity card has no feature nope"), "{err}");
        let err = resolve(&format!("merchant.{first}"), &set)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no entity merchant"), "{err}");
        let err = resolve("merchant_cold_start", &set)
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no entity merchant"), "{err}");
        assert!(matches!(
            resolve(&first, &set),
            Err(FeatureError::Unknown { .. })
        ));
    }

    #[test]
    fn a_request_time_feature_whose_card_feature_is_gone_does_not_resolve() {
        for (name, needs) in [
            ("amount_to_mean_24h", AMOUNT_MEAN),
            ("amount_zscore_24h", AMOUNT_MEAN),
            ("amount_zscore_24h", AMOUNT_STD),
            ("seconds_since_last_txn", LAST_TIME),
            ("country_mismatch", USUAL_COUNTRY),
        ] {
            let set = without(request_feature(&shipped(), needs).unwrap());
            let err = resolve(name, &set).unwrap_err();
            assert!(
                matches!(&err, FeatureError::NeedsCardFeature { name: n, needs: m, .. } if *n == name && *m == needs),
                "{name}: {err:?}"
            );
            assert!(err.to_string().contains(needs), "{err}");
            // The other request-time features are unaffected.
            assert!(resolve("amount_log1p", &set).is_ok());
        }
    }

    #[test]
    fn the_usual_country_must_be_a_country_code() {
        let text = SHIPPED.replacen(
            "aggregation = \"mode\"\nfield = \"country\"",
            "aggregation = \"distinct_count\"\nfield = \"country\"",
            1,
        );
        assert_ne!(text, SHIPPED);
        let set = FeatureSet::parse("test.toml", &text).unwrap();
        let err = resolve("country_mismatch", &set).unwrap_err().to_string();
        assert!(
            err.contains("card.top_country_24h to be the mode or last value of a country field"),
            "{err}"
        );
    }

    #[test]
    fn request_time_features_follow_their_definitions() {
        let set = shipped();
        let ctx = with_card(
            &set,
            card_row(&set, 2000.0, 500.0, 1_000_000),
            TxnContext {
                amount_minor: 5000,
                country: Some("FR".into()),
                channel: Some(Channel::Ecom),
                time_ms: 1_030_000,
            },
        );
        let v = |name| ctx.value(resolve(name, &set).unwrap());
        assert_eq!(v("amount_to_mean_24h"), 2.5);
        assert_eq!(v("amount_zscore_24h"), 6.0);
        assert_eq!(v("country_mismatch"), 1.0);
        assert_eq!(v("seconds_since_last_txn"), 30.0);
        assert_eq!(v("channel_ecom"), 1.0);
        assert_eq!(v("channel_atm"), 0.0);
        assert_eq!(v("card_cold_start"), 0.0);
        assert_eq!(v("user_cold_start"), 1.0);
        assert_eq!(v("card.txn_count_1m"), 3.0);
        assert_eq!(v("user.click_count_5m"), 0.0);
        assert_eq!(v("amount_log1p"), 5001f64.ln());
    }

    #[test]
    fn the_usual_country_is_the_rows_top_country() {
        let set = shipped();
        let Ok(Source::CountryMismatch { usual }) = resolve("country_mismatch", &set) else {
            panic!("country_mismatch resolves");
        };
        let mismatch = Source::CountryMismatch { usual };
        let mut ctx = with_card(
            &set,
            card_row(&set, 2000.0, 500.0, 1_000_000),
            TxnContext {
                country: Some("de".into()),
                ..Default::default()
            },
        );
        assert_eq!(ctx.usual_country(usual).as_deref(), Some("DE"));
        assert_eq!(ctx.value(mismatch), 0.0, "same, any case");
        ctx.txn.country = Some("FR".into());
        assert_eq!(ctx.value(mismatch), 1.0);
        // A code that is not a country (0: no top country): unknown, no mismatch.
        ctx.rows[usual.entity].as_mut().unwrap().values[usual.feature] = Value::Int(0);
        assert_eq!(ctx.usual_country(usual), None);
        assert_eq!(ctx.value(mismatch), 0.0);
        ctx.txn.country = None;
        assert_eq!(ctx.value(mismatch), 0.0);
    }

    #[test]
    fn cold_start_defaults() {
        let set = shipped();
        let ctx = Context {
            txn: TxnContext {
                amount_minor: 100,
                country: Some("FR".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let v = |name| ctx.value(resolve(name, &set).unwrap());
        assert_eq!(v("amount_to_mean_24h"), 1.0);
        assert_eq!(v("amount_zscore_24h"), 0.0);
        assert_eq!(v("country_mismatch"), 0.0, "no card row: no usual country");
        assert_eq!(v("seconds_since_last_txn"), MAX_SECONDS_SINCE_LAST_TXN);
        assert_eq!(v("card_cold_start"), 1.0);
        assert_eq!(v("card.amount_mean_24h"), 0.0);
    }

    #[test]
    fn a_zero_std_does_not_blow_up_and_clock_skew_clamps_to_zero() {
        let set = shipped();
        let ctx = with_card(
            &set,
            card_row(&set, 100.0, 0.0, 2_000_000),
            TxnContext {
                amount_minor: 1_000_000,
                time_ms: 1_000_000,
                ..Default::default()
            },
        );
        let v = |name| ctx.value(resolve(name, &set).unwrap());
        assert_eq!(v("amount_zscore_24h"), 50.0);
        assert_eq!(v("seconds_since_last_txn"), 0.0);
    }
}
