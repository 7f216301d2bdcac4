//! The feature vectors the models see: names, where each value comes from
//! (card row, user row, the request), and the cold-start defaults.
//!
//! Request-time features (documented in server/CONTEXT.md):
//! - `amount_log1p`: ln(1 + amount in minor units).
//! - `amount_to_mean_24h`: amount / card `amount_mean_24h`; 1.0 without a card row.
//! - `amount_zscore_24h`: (amount - mean) / max(std, 1 minor unit), clamped to
//!   [-50, 50]; 0.0 without a card row.
//! - `country_mismatch`: 1.0 when the request names a country and the card row
//!   has a usual country (`top_country_24h`, the card's most frequent country
//!   over 24h, decoded with `schemas::features::unpack_country`) and they
//!   differ (case-insensitive); 0.0 otherwise (unknown is not a mismatch).
//! - `seconds_since_last_txn`: (request time - card `last_txn_time`) / 1000,
//!   clamped to [0, 86400]; 86400 without a card row (no txn in 24h).
//! - `channel_ecom`, `channel_atm`: one-hot of the request channel (pos: both 0).
//! - `card_cold_start`, `user_cold_start`: 1.0 when that row was not found (or
//!   no `user_id` was given).
//!
//! Row features are named `card.{feature}` and `user.{feature}` after
//! `schemas::features`; without a row they are 0.

use schemas::features::{unpack_country, Entity, FeatureRow, Value, DAY_MS};
use schemas::Channel;

/// The card feature holding the card's usual country (most frequent over 24h).
pub const USUAL_COUNTRY_FEATURE: &str = "top_country_24h";

/// Cap of `seconds_since_last_txn`, also its cold-start value.
pub const MAX_SECONDS_SINCE_LAST_TXN: f64 = (DAY_MS / 1000) as f64;

/// Where one model input comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    AmountLog1p,
    AmountToMean24h,
    AmountZscore24h,
    CountryMismatch,
    SecondsSinceLastTxn,
    ChannelEcom,
    ChannelAtm,
    CardColdStart,
    UserColdStart,
    /// Index into `Entity::Card.features()`.
    Card(usize),
    /// Index into `Entity::User.features()`.
    User(usize),
}

impl Source {
    /// Whether this input needs the transaction in the request (fraud only).
    pub fn needs_transaction(self) -> bool {
        !matches!(self, Source::User(_) | Source::UserColdStart)
    }
}

const REQUEST: &[(&str, Source)] = &[
    ("amount_log1p", Source::AmountLog1p),
    ("amount_to_mean_24h", Source::AmountToMean24h),
    ("amount_zscore_24h", Source::AmountZscore24h),
    ("country_mismatch", Source::CountryMismatch),
    ("seconds_since_last_txn", Source::SecondsSinceLastTxn),
    ("channel_ecom", Source::ChannelEcom),
    ("channel_atm", Source::ChannelAtm),
    ("card_cold_start", Source::CardColdStart),
    ("user_cold_start", Source::UserColdStart),
];

/// The source of the feature called `name`, if the server knows it.
pub fn resolve(name: &str) -> Option<Source> {
    if let Some((_, s)) = REQUEST.iter().find(|(n, _)| *n == name) {
        return Some(*s);
    }
    let (entity, feature) = name.split_once('.')?;
    let entity = Entity::parse(entity)?;
    let index = entity.features().iter().position(|f| f.name == feature)?;
    Some(match entity {
        Entity::Card => Source::Card(index),
        Entity::User => Source::User(index),
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
    pub card: Option<FeatureRow>,
    pub user: Option<FeatureRow>,
    /// The stream job's durable frontier, when it has recorded one.
    pub frontier_ms: Option<i64>,
    pub txn: TxnContext,
}

fn row_value(row: &Option<FeatureRow>, index: usize) -> f64 {
    row.as_ref()
        .and_then(|r| r.values.get(index))
        .map_or(0.0, |v| v.as_f64())
}

fn card(ctx: &Context, name: &str) -> Option<f64> {
    ctx.card
        .as_ref()
        .and_then(|r| r.get(name))
        .map(|v| v.as_f64())
}

impl Context {
    /// The card's usual country: its row's `top_country_24h`, decoded; `None`
    /// without a card row or when the code is not a country.
    pub fn usual_country(&self) -> Option<String> {
        match self.card.as_ref()?.get(USUAL_COUNTRY_FEATURE)? {
            Value::Int(code) => unpack_country(code),
            Value::Float(_) => None,
        }
    }

    /// The value of one input.
    pub fn value(&self, source: Source) -> f64 {
        let amount = self.txn.amount_minor as f64;
        match source {
            Source::AmountLog1p => amount.max(0.0).ln_1p(),
            Source::AmountToMean24h => match card(self, "amount_mean_24h") {
                Some(mean) if mean > 0.0 => amount / mean,
                _ => 1.0,
            },
            Source::AmountZscore24h => {
                match (card(self, "amount_mean_24h"), card(self, "amount_std_24h")) {
                    (Some(mean), Some(std)) => ((amount - mean) / std.max(1.0)).clamp(-50.0, 50.0),
                    _ => 0.0,
                }
            }
            Source::CountryMismatch => match (&self.txn.country, self.usual_country()) {
                (Some(req), Some(usual)) if !req.eq_ignore_ascii_case(&usual) => 1.0,
                _ => 0.0,
            },
            Source::SecondsSinceLastTxn => match card(self, "last_txn_time") {
                Some(last) => ((self.txn.time_ms as f64 - last) / 1000.0)
                    .clamp(0.0, MAX_SECONDS_SINCE_LAST_TXN),
                None => MAX_SECONDS_SINCE_LAST_TXN,
            },
            Source::ChannelEcom => f64::from(u8::from(self.txn.channel == Some(Channel::Ecom))),
            Source::ChannelAtm => f64::from(u8::from(self.txn.channel == Some(Channel::Atm))),
            Source::CardColdStart => f64::from(u8::from(self.card.is_none())),
            Source::UserColdStart => f64::from(u8::from(self.user.is_none())),
            Source::Card(i) => row_value(&self.card, i),
            Source::User(i) => row_value(&self.user, i),
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

    fn card_row(mean: f64, std: f64, last_txn_time: i64) -> FeatureRow {
        let values = Entity::Card
            .features()
            .iter()
            .map(|f| match f.name {
                "amount_mean_24h" => Value::Float(mean),
                "amount_std_24h" => Value::Float(std),
                "last_txn_time" => Value::Int(last_txn_time),
                "txn_count_1m" => Value::Int(3),
                "top_country_24h" => Value::Int(pack_country("DE").unwrap()),
                _ => Value::Int(1),
            })
            .collect();
        FeatureRow {
            entity: Entity::Card,
            id: "c".into(),
            as_of_ms: 0,
            values,
        }
    }

    #[test]
    fn every_name_resolves_and_unknown_names_do_not() {
        assert_eq!(resolve("card.txn_count_1m"), Some(Source::Card(0)));
        assert_eq!(resolve("user.amount_sum_24h"), Some(Source::User(7)));
        assert_eq!(resolve("country_mismatch"), Some(Source::CountryMismatch));
        assert_eq!(resolve("card.nope"), None);
        assert_eq!(resolve("txn_count_1m"), None);
    }

    #[test]
    fn request_time_features_follow_their_definitions() {
        let ctx = Context {
            card: Some(card_row(2000.0, 500.0, 1_000_000)),
            user: None,
            frontier_ms: None,
            txn: TxnContext {
                amount_minor: 5000,
                country: Some("FR".into()),
                channel: Some(Channel::Ecom),
                time_ms: 1_030_000,
            },
        };
        let v = |name| ctx.value(resolve(name).unwrap());
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
        assert_eq!(ctx.usual_country().as_deref(), Some("DE"));
    }

    #[test]
    fn the_usual_country_is_the_rows_top_country() {
        let mut ctx = Context {
            card: Some(card_row(2000.0, 500.0, 1_000_000)),
            txn: TxnContext {
                country: Some("de".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(ctx.value(Source::CountryMismatch), 0.0, "same, any case");
        ctx.txn.country = Some("FR".into());
        assert_eq!(ctx.value(Source::CountryMismatch), 1.0);
        // A code that is not a country (0: no top country): unknown, no mismatch.
        let top = Entity::Card
            .features()
            .iter()
            .position(|f| f.name == USUAL_COUNTRY_FEATURE)
            .unwrap();
        ctx.card.as_mut().unwrap().values[top] = Value::Int(0);
        assert_eq!(ctx.usual_country(), None);
        assert_eq!(ctx.value(Source::CountryMismatch), 0.0);
        ctx.txn.country = None;
        assert_eq!(ctx.value(Source::CountryMismatch), 0.0);
    }

    #[test]
    fn cold_start_defaults() {
        let ctx = Context {
            txn: TxnContext {
                amount_minor: 100,
                country: Some("FR".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let v = |name| ctx.value(resolve(name).unwrap());
        assert_eq!(v("amount_to_mean_24h"), 1.0);
        assert_eq!(v("amount_zscore_24h"), 0.0);
        assert_eq!(v("country_mismatch"), 0.0, "no card row: no usual country");
        assert_eq!(v("seconds_since_last_txn"), 86_400.0);
        assert_eq!(v("card_cold_start"), 1.0);
    }

    #[test]
    fn a_zero_std_does_not_blow_up_and_clock_skew_clamps_to_zero() {
        let ctx = Context {
            card: Some(card_row(100.0, 0.0, 2_000_000)),
            txn: TxnContext {
                amount_minor: 1_000_000,
                time_ms: 1_000_000,
                ..Default::default()
            },
            ..Default::default()
        };
        assert_eq!(ctx.value(Source::AmountZscore24h), 50.0);
        assert_eq!(ctx.value(Source::SecondsSinceLastTxn), 0.0);
    }
}
