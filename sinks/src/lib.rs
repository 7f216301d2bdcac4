//! Sinks: the exactly-once Redis online store and Kafka (dead letters).

pub mod kafka;
pub mod redis;
