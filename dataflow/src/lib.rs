//! The feature graph: config, decode, graph, worker orchestration (threads and processes), replay.

pub mod cli;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod graph;
pub mod metrics;
pub mod oracle;
pub mod stream;
pub mod worker;

pub use graph::{build_features, GraphConfig, RowUpdate};
