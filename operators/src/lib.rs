//! Reusable dataflow pieces with no knowledge of our events: the Kafka source with exact per-partition progress, sliding windows and windowed aggregates.

pub mod aggregate;
pub mod kafka;
pub mod window;
