//! Event contracts (transactions, clicks, labels), their Avro schemas and
//! codecs, schema ids, and the feature-row encoding shared by the Redis sink
//! and the scoring server.
//!
//! This crate never imports timely, tokio, redis or ort.

pub mod avro;
pub mod codec;
pub mod container;
pub mod event;
pub mod features;
pub mod key;
pub mod registry;
pub mod resp;
pub mod score;
pub mod validate;

pub use avro::EventKind;
pub use codec::{DecodeError, Decoder, EncodeError, Encoder, Event, Topics};
pub use event::{Channel, Click, ClickAction, Label, Txn};
pub use features::{
    Aggregation, DefinitionError, Entity, EntityDef, FeatureDef, FeatureRow, FeatureSet, Row,
    RowError, Value, ValueKind,
};
pub use key::Key;
pub use validate::{Limits, ValidationError};
