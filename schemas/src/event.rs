//! The event types carried on `txn.events`, `click.events` and `txn.labels`.
//!
//! Field meanings follow `schemas/avro/*.avsc`; these structs are the reader
//! shape of the newest schema version (optional fields are `Option`).

use serde::{Deserialize, Serialize};

/// Topic carrying card transactions, keyed by `card_id`.
pub const TXN_TOPIC: &str = "txn.events";
/// Topic carrying browsing events, keyed by `user_id`.
pub const CLICK_TOPIC: &str = "click.events";
/// Topic carrying (late) fraud labels, keyed by `card_id`.
pub const LABEL_TOPIC: &str = "txn.labels";

/// The dead-letter topic of a source topic.
pub fn dlq_topic(topic: &str) -> String {
    format!("{topic}.dlq")
}

/// Where a card transaction happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// Card present at a point of sale.
    Pos,
    /// Card not present (online).
    Ecom,
    /// Cash withdrawal.
    Atm,
}

/// A card transaction (`txn` v2 reader shape).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Txn {
    pub event_id: String,
    pub card_id: String,
    pub user_id: String,
    pub merchant_id: String,
    pub mcc: i32,
    /// Amount in minor currency units (cents).
    pub amount_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// ISO 3166 alpha-2 code.
    pub country: String,
    pub channel: Channel,
    /// Event time, milliseconds since the Unix epoch.
    pub event_time: i64,
    /// Added in v2.
    #[serde(default)]
    pub device_id: Option<String>,
    /// Added in v2.
    #[serde(default)]
    pub ip_country: Option<String>,
}

/// What a user did with an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickAction {
    View,
    AddToCart,
    Purchase,
}

/// A browsing event (`click` v2 reader shape).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Click {
    pub event_id: String,
    pub user_id: String,
    pub session_id: String,
    pub item_id: String,
    pub category: String,
    pub action: ClickAction,
    /// Event time, milliseconds since the Unix epoch.
    pub event_time: i64,
    /// Added in v2.
    #[serde(default)]
    pub dwell_ms: Option<i32>,
}

/// A fraud label for a transaction, arriving after a delay.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Label {
    /// The `event_id` of the labelled transaction.
    pub event_id: String,
    pub card_id: String,
    pub is_fraud: bool,
    pub fraud_type: Option<String>,
    /// When the label became known, milliseconds since the Unix epoch.
    pub label_time: i64,
}
