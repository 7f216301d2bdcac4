//! Event contracts (transactions, clicks, labels), their codecs, and the
//! feature-row encoding shared by the Redis sink and the scoring server.
//!
//! This crate never imports timely, tokio, redis or ort.

pub mod event;
pub mod features;

pub use event::{Channel, Click, ClickAction, Label, Txn};
pub use features::{Entity, FeatureRow, FeatureSpec, RowError, Value, ValueKind};
