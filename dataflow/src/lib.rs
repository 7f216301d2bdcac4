//! The feature graph: config, features.toml compiled to differential
//! operators, decode, worker orchestration (threads and processes), replay.

pub mod cli;
pub mod compile;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod graph;
pub mod metrics;
pub mod shutdown;
pub mod stream;
pub mod worker;

pub use graph::{
    build_features, events_collection, lookup_features, worker_of, Found, GraphConfig, Replay,
    RowKey, SourceEvent,
};
