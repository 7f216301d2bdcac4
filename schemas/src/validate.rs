//! Semantic validation of decoded events: what the schema cannot say.

use crate::event::{Click, Label, Txn};

/// Bounds applied by [`validate_txn`], [`validate_click`] and [`validate_label`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted transaction amount, in minor units (inclusive).
    pub max_amount_minor: i64,
    /// How far past the caller's `now` an event or label time may lie.
    pub max_future_ms: i64,
    /// Longest accepted identifier, in bytes.
    pub max_id_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_amount_minor: 1_000_000_000,
            max_future_ms: 24 * 3_600_000,
            max_id_len: 128,
        }
    }
}

/// Why a well-formed event is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("{0} is empty")]
    EmptyId(&'static str),
    #[error("{0} is longer than the limit")]
    IdTooLong(&'static str),
    #[error("amount_minor {0} is out of range")]
    AmountOutOfRange(i64),
    #[error("mcc {0} is not a 4-digit merchant category code")]
    BadMcc(i32),
    #[error("currency {0:?} is not 3 uppercase letters")]
    BadCurrency(Box<str>),
    #[error("{field} {value:?} is not 2 uppercase letters")]
    BadCountry {
        field: &'static str,
        value: Box<str>,
    },
    #[error("{field} {time_ms} is more than the allowed skew after now {now_ms}")]
    TimeInFuture {
        field: &'static str,
        time_ms: i64,
        now_ms: i64,
    },
    #[error("{field} {time_ms} is before the unix epoch")]
    TimeBeforeEpoch { field: &'static str, time_ms: i64 },
    #[error("dwell_ms {0} is negative")]
    NegativeDwell(i32),
}

impl ValidationError {
    /// A short stable identifier, e.g. for a dead-letter header.
    pub fn reason(&self) -> &'static str {
        match self {
            ValidationError::EmptyId(_) => "empty_id",
            ValidationError::IdTooLong(_) => "id_too_long",
            ValidationError::AmountOutOfRange(_) => "amount_out_of_range",
            ValidationError::BadMcc(_) => "bad_mcc",
            ValidationError::BadCurrency(_) => "bad_currency",
            ValidationError::BadCountry { .. } => "bad_country",
            ValidationError::TimeInFuture { .. } => "time_in_future",
            ValidationError::TimeBeforeEpoch { .. } => "time_before_epoch",
            ValidationError::NegativeDwell(_) => "negative_dwell",
        }
    }
}

fn id(field: &'static str, value: &str, limits: &Limits) -> Result<(), ValidationError> {
    if value.is_empty() {
        Err(ValidationError::EmptyId(field))
    } else if value.len() > limits.max_id_len {
        Err(ValidationError::IdTooLong(field))
    } else {
        Ok(())
    }
}

fn upper(value: &str, len: usize) -> bool {
    value.len() == len && value.bytes().all(|b| b.is_ascii_uppercase())
}

fn country(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if upper(value, 2) {
        Ok(())
    } else {
        Err(ValidationError::BadCountry {
            field,
            value: value.into(),
        })
    }
}

fn time(
    field: &'static str,
    time_ms: i64,
    now_ms: i64,
    limits: &Limits,
) -> Result<(), ValidationError> {
    if time_ms < 0 {
        Err(ValidationError::TimeBeforeEpoch { field, time_ms })
    } else if time_ms > now_ms.saturating_add(limits.max_future_ms) {
        Err(ValidationError::TimeInFuture {
            field,
            time_ms,
            now_ms,
        })
    } else {
        Ok(())
    }
}

/// Checks a transaction; `now_ms` bounds its event time (pass the Kafka
/// record timestamp to keep the decision replayable, or the wall clock).
pub fn validate_txn(t: &Txn, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
    id("event_id", &t.event_id, limits)?;
    id("card_id", &t.card_id, limits)?;
    id("user_id", &t.user_id, limits)?;
    id("merchant_id", &t.merchant_id, limits)?;
    if !(0..=9999).contains(&t.mcc) {
        return Err(ValidationError::BadMcc(t.mcc));
    }
    if !(0..=limits.max_amount_minor).contains(&t.amount_minor) {
        return Err(ValidationError::AmountOutOfRange(t.amount_minor));
    }
    if !upper(&t.currency, 3) {
        return Err(ValidationError::BadCurrency(t.currency.as_str().into()));
    }
    country("country", &t.country)?;
    if let Some(device) = &t.device_id {
        id("device_id", device, limits)?;
    }
    if let Some(ip) = &t.ip_country {
        country("ip_country", ip)?;
    }
    time("event_time", t.event_time, now_ms, limits)
}

/// Checks a browsing event; see [`validate_txn`] for `now_ms`.
pub fn validate_click(c: &Click, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
    id("event_id", &c.event_id, limits)?;
    id("user_id", &c.user_id, limits)?;
    id("session_id", &c.session_id, limits)?;
    id("item_id", &c.item_id, limits)?;
    id("category", &c.category, limits)?;
    if let Some(dwell) = c.dwell_ms.filter(|d| *d < 0) {
        return Err(ValidationError::NegativeDwell(dwell));
    }
    time("event_time", c.event_time, now_ms, limits)
}

/// Checks a label; see [`validate_txn`] for `now_ms`.
pub fn validate_label(l: &Label, now_ms: i64, limits: &Limits) -> Result<(), ValidationError> {
    id("event_id", &l.event_id, limits)?;
    id("card_id", &l.card_id, limits)?;
    if let Some(kind) = &l.fraud_type {
        id("fraud_type", kind, limits)?;
    }
    time("label_time", l.label_time, now_ms, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Channel;

    fn txn() -> Txn {
        Txn {
            event_id: "t-1".into(),
            card_id: "c-1".into(),
            user_id: "u-1".into(),
            merchant_id: "m-1".into(),
            mcc: 5411,
            amount_minor: 1234,
            currency: "EUR".into(),
            country: "FR".into(),
            channel: Channel::Pos,
            event_time: 1_000,
            device_id: None,
            ip_country: Some("DE".into()),
        }
    }

    #[test]
    fn each_rule_rejects_with_its_reason() {
        let l = Limits::default();
        assert_eq!(validate_txn(&txn(), 1_000, &l), Ok(()));
        type Case = (fn(&mut Txn), &'static str);
        let cases: Vec<Case> = vec![
            (|t| t.card_id.clear(), "empty_id"),
            (|t| t.merchant_id = "m".repeat(129), "id_too_long"),
            (|t| t.amount_minor = -1, "amount_out_of_range"),
            (|t| t.amount_minor = 1_000_000_001, "amount_out_of_range"),
            (|t| t.mcc = 10_000, "bad_mcc"),
            (|t| t.currency = "eur".into(), "bad_currency"),
            (|t| t.currency = "EURO".into(), "bad_currency"),
            (|t| t.country = "FRA".into(), "bad_country"),
            (|t| t.ip_country = Some("d".into()), "bad_country"),
            (|t| t.device_id = Some(String::new()), "empty_id"),
            (
                |t| t.event_time = 1_000 + 24 * 3_600_000 + 1,
                "time_in_future",
            ),
            (|t| t.event_time = -5, "time_before_epoch"),
        ];
        for (mutate, reason) in cases {
            let mut t = txn();
            mutate(&mut t);
            let err = validate_txn(&t, 1_000, &l).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
        let mut t = txn();
        t.event_time = 1_000 + 24 * 3_600_000;
        assert_eq!(
            validate_txn(&t, 1_000, &l),
            Ok(()),
            "the skew bound is inclusive"
        );
    }

    #[test]
    fn clicks_and_labels_are_checked() {
        let l = Limits::default();
        let mut c = Click {
            event_id: "k".into(),
            user_id: "u".into(),
            session_id: "s".into(),
            item_id: "i".into(),
            category: "books".into(),
            action: crate::event::ClickAction::View,
            event_time: 5,
            dwell_ms: Some(-1),
        };
        assert_eq!(
            validate_click(&c, 5, &l).unwrap_err().reason(),
            "negative_dwell"
        );
        c.dwell_ms = None;
        assert_eq!(validate_click(&c, 5, &l), Ok(()));
        let label = Label {
            event_id: String::new(),
            card_id: "c".into(),
            is_fraud: true,
            fraud_type: None,
            label_time: 5,
        };
        assert_eq!(
            validate_label(&label, 5, &l).unwrap_err(),
            ValidationError::EmptyId("event_id")
        );
    }
}
