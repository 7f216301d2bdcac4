//! Sinks: the exactly-once Redis online store, the offline training-row sink, and Kafka (dead letters).

pub mod kafka;
pub mod redis;
