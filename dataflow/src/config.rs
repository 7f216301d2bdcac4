//! The configuration of `sfs stream`: a TOML file (see
//! `config/stream.example.toml`), overridden by flags and environment
//! variables. Every field has a default that runs against the local infra.

use std::collections::BTreeMap;
use std::path::Path;

use operators::kafka::StartFrom;
use serde::{Deserialize, Serialize};

/// Everything `sfs stream` needs.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    pub kafka: KafkaConfig,
    pub time: TimeConfig,
    pub redis: RedisConfig,
    pub sink: SinkConfig,
    pub metrics: MetricsConfig,
    pub cluster: ClusterConfig,
}

/// Where events come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Consumer group that durable offsets are committed to (for lag tools;
    /// partitions are assigned by the job, never by the group).
    pub group_id: String,
    /// Per source name, a topic replacing the source's `topic` in the
    /// feature definitions (tests and side-by-side runs use their own topics).
    pub topics: BTreeMap<String, String>,
    /// Start of partitions with no recorded progress: `earliest` or `latest`.
    pub start_from: StartFrom,
    /// Records read per operator activation before yielding to other operators.
    pub max_records_per_activation: usize,
    /// Poll interval when the consumer queue is empty (it also wakes the job on arrival).
    pub poll_interval_ms: u64,
    /// Timeout of metadata and watermark queries at start.
    pub metadata_timeout_ms: u64,
    /// Extra librdkafka consumer properties.
    pub consumer: BTreeMap<String, String>,
    /// Extra librdkafka properties of the dead-letter producer.
    pub producer: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            group_id: "sfs-stream".into(),
            topics: BTreeMap::new(),
            start_from: StartFrom::Earliest,
            max_records_per_activation: 10_000,
            poll_interval_ms: 5,
            metadata_timeout_ms: 10_000,
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
        }
    }
}

/// Event time and progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConfig {
    /// Dataflow time is event time quantized down to this; every feature's
    /// window must be a multiple of it.
    pub tick_ms: u64,
    /// A partition's watermark trails its largest event time by this much.
    pub allowed_lateness_ms: u64,
    /// Records further than this behind the watermark go to the dead-letter
    /// topic instead of being clamped (0: clamp all).
    pub late_limit_ms: u64,
    /// An idle, caught-up partition advances with the wall clock after this
    /// long (0: never). Ignored with `--until-end`.
    pub idle_timeout_ms: u64,
    /// Extra history replayed on restart beyond the widest feature window.
    pub resume_slack_ms: u64,
}

impl Default for TimeConfig {
    fn default() -> Self {
        TimeConfig {
            tick_ms: 1000,
            allowed_lateness_ms: 2_000,
            late_limit_ms: 600_000,
            idle_timeout_ms: 5_000,
            resume_slack_ms: 60_000,
        }
    }
}

/// The online store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prefix of every key written.
    pub key_prefix: String,
    /// Connect, read and write timeout.
    pub timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379".into(),
            key_prefix: schemas::features::DEFAULT_KEY_PREFIX.into(),
            timeout_ms: 5_000,
        }
    }
}

/// Batching and retries of the Redis sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Rows per Redis function call.
    pub rows_per_call: usize,
    /// Function calls per pipelined round trip.
    pub calls_per_round_trip: usize,
    /// First retry delay after a Redis error (doubles each retry).
    pub backoff_initial_ms: u64,
    /// Largest retry delay.
    pub backoff_max_ms: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            rows_per_call: 500,
            calls_per_round_trip: 32,
            backoff_initial_ms: 50,
            backoff_max_ms: 5_000,
        }
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of `/metrics` (process `p` listens on port + p); empty disables.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: "127.0.0.1:8088".into(),
        }
    }
}

/// The timely cluster.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Worker threads per process (0: 1).
    pub workers: usize,
    /// Number of processes (0: 1).
    pub processes: usize,
    /// This process's index, 0-based.
    pub process: usize,
    /// File of `host:port` lines, one per process (empty: localhost from port 2101).
    pub hostfile: String,
    /// Read to the high watermarks captured at start, write, record progress, exit.
    pub until_end: bool,
}

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl StreamConfig {
    /// Parses TOML text.
    pub fn parse(text: &str, path: &str) -> Result<StreamConfig, ConfigError> {
        let config: StreamConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads a TOML file.
    pub fn load(path: &Path) -> Result<StreamConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        StreamConfig::parse(&text, &path.display().to_string())
    }

    /// The topic of source `source` of `set`: the override, else the definition's.
    pub fn topic_of(&self, set: &schemas::FeatureSet, source: &str) -> String {
        self.kafka.topics.get(source).cloned().unwrap_or_else(|| {
            set.source(source)
                .map(|s| s.topic.clone())
                .unwrap_or_else(|| source.to_owned())
        })
    }

    /// Checks the config against the feature definitions: every window a
    /// multiple of the tick, every topic override naming a source, distinct topics.
    pub fn validate_with(&self, set: &schemas::FeatureSet) -> Result<(), ConfigError> {
        set.check_tick(self.time.tick_ms)
            .map_err(|e| ConfigError::Invalid(format!("time.tick_ms: {e}")))?;
        for name in self.kafka.topics.keys() {
            if set.source(name).is_none() {
                return Err(ConfigError::Invalid(format!(
                    "kafka.topics.{name}: no source {name} in the feature definitions"
                )));
            }
        }
        let mut topics: Vec<String> = set
            .sources
            .iter()
            .map(|s| self.topic_of(set, &s.name))
            .collect();
        topics.sort();
        if topics.windows(2).any(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!(
                "two sources read the same topic: {}",
                topics.join(", ")
            )));
        }
        Ok(())
    }

    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.time.tick_ms == 0 {
            return invalid("time.tick_ms must be positive".into());
        }
        if self.cluster.process >= self.cluster.processes.max(1) {
            return invalid(format!(
                "cluster.process = {} is not below cluster.processes",
                self.cluster.process
            ));
        }
        if self.sink.rows_per_call == 0 || self.sink.calls_per_round_trip == 0 {
            return invalid(
                "sink.rows_per_call and sink.calls_per_round_trip must be positive".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_parses_and_equals_the_defaults() {
        let text = include_str!("../../config/stream.example.toml");
        let config = StreamConfig::parse(text, "config/stream.example.toml").unwrap();
        assert_eq!(config, StreamConfig::default());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = StreamConfig::parse("[time]\ntick = 5\n", "x").unwrap_err();
        assert!(err.to_string().contains("tick"), "{err}");
    }

    #[test]
    fn ticks_must_be_positive() {
        let err = StreamConfig::parse("[time]\ntick_ms = 0\n", "x").unwrap_err();
        assert!(err.to_string().contains("tick_ms"), "{err}");
    }
}
