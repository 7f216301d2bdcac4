//! One worker's streaming job: Kafka source -> decode -> feature graph ->
//! Redis sink, dead letters -> Kafka, and the progress stage.

use std::collections::BTreeMap;

use operators::kafka::{
    KafkaSource, KafkaSourceConfig, OffsetCommitter, SourceError, TopicPartition,
};
use std::sync::Arc;

use schemas::codec::Decoder;
use schemas::FeatureSet;
use sinks::kafka::DeadLetterSink;
use sinks::redis::{
    progress_stage, AppendTimes, ProgressRecord, ProgressStage, RedisSink, RedisSinkConfig,
};
use timely::dataflow::operators::Concat;
use timely::dataflow::Scope;

use crate::config::StreamConfig;
use crate::decode::EventDecoder;
use crate::metrics::Metrics;
use crate::{build_features, events_collection, GraphConfig};

/// What every worker of a process shares, prepared once before the workers start.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub config: StreamConfig,
    /// The feature definitions the graph computes.
    pub features: Arc<FeatureSet>,
    /// The progress record to resume from (`None`: a fresh start).
    pub progress: Option<ProgressRecord>,
    /// The write ceiling at start (see `sinks::redis::Ownership`).
    pub ceiling: u64,
    pub decoder: Decoder,
    pub metrics: Metrics,
}

impl Prepared {
    /// The sink configuration.
    pub fn sink_config(&self) -> RedisSinkConfig {
        let c = &self.config;
        RedisSinkConfig {
            url: c.redis.url.clone(),
            key_prefix: c.redis.key_prefix.clone(),
            features: Arc::clone(&self.features),
            rows_per_call: c.sink.rows_per_call,
            calls_per_round_trip: c.sink.calls_per_round_trip,
            backoff_initial_ms: c.sink.backoff_initial_ms,
            backoff_max_ms: c.sink.backoff_max_ms,
            timeout_ms: c.redis.timeout_ms,
        }
    }

    /// The source configuration, resuming from the progress record.
    pub fn source_config(&self) -> KafkaSourceConfig {
        let c = &self.config;
        let topics = self
            .features
            .sources
            .iter()
            .map(|s| c.topic_of(&self.features, &s.name))
            .collect();
        let mut source =
            KafkaSourceConfig::new(c.kafka.brokers.clone(), c.kafka.group_id.clone(), topics);
        source.clock = operators::kafka::ClockConfig {
            tick_ms: c.time.tick_ms,
            allowed_lateness_ms: c.time.allowed_lateness_ms,
            late_limit_ms: (c.time.late_limit_ms > 0).then_some(c.time.late_limit_ms),
        };
        // Rows at F aggregate events in [F - W, F) for the widest window W:
        // replay those, plus slack.
        source.resume_horizon_ms =
            self.features.widest_window_ms() + c.time.tick_ms + c.time.resume_slack_ms;
        source.idle_timeout_ms = (c.time.idle_timeout_ms > 0).then_some(c.time.idle_timeout_ms);
        source.bounded = c.cluster.until_end;
        source.max_records_per_activation = c.kafka.max_records_per_activation;
        source.poll_interval_ms = c.kafka.poll_interval_ms;
        source.metadata_timeout_ms = c.kafka.metadata_timeout_ms;
        source.start_from = c.kafka.start_from;
        source.consumer_properties = c.kafka.consumer.clone();
        if let Some(progress) = &self.progress {
            source.resume = progress.resume_points();
        }
        source
    }

    /// Dead letters of offsets before these were delivered by a previous run.
    fn delivered_dead_letters(&self) -> BTreeMap<TopicPartition, i64> {
        self.progress
            .iter()
            .flat_map(|p| &p.partitions)
            .map(|p| {
                (
                    TopicPartition::new(p.topic.clone(), p.partition),
                    p.durable_offset,
                )
            })
            .collect()
    }
}

/// Why a worker could not build its dataflow.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("dead-letter producer: {0}")]
    Producer(#[from] rdkafka::error::KafkaError),
}

/// Builds this worker's part of the job in `scope`.
pub fn build<'scope>(
    scope: Scope<'scope, u64>,
    prepared: &Prepared,
) -> Result<ProgressStage, BuildError> {
    let config = &prepared.config;
    let features = &prepared.features;
    let decoder = EventDecoder::new(prepared.decoder.clone(), features, |source| {
        config.topic_of(features, source)
    });
    let output = scope.kafka_source(
        prepared.source_config(),
        prepared.metrics.source.clone(),
        decoder,
    )?;
    let append_times = AppendTimes::default();
    {
        let append_times = append_times.clone();
        output
            .handle
            .observe(move |time, append_ms| append_times.record(time, append_ms));
    }

    let graph = GraphConfig {
        tick_ms: config.time.tick_ms,
    };
    let rows = build_features(events_collection(output.data), features, &graph);

    let sink_config = prepared.sink_config();
    let floor = prepared.progress.as_ref().map_or(0, |p| p.frontier_ms);
    let row_acks = rows.redis_sink(
        &sink_config,
        floor,
        prepared.ceiling,
        output.handle.clone(),
        prepared.metrics.sink.clone(),
    );
    let producer = sinks::kafka::producer(&config.kafka.brokers, &config.kafka.producer)?;
    let dlq_acks = output.errors.dead_letter_sink(
        producer,
        prepared.delivered_dead_letters(),
        prepared.metrics.dead_letters.clone(),
    );
    let committer = if scope.index() == 0 {
        Some(OffsetCommitter::new(
            &config.kafka.brokers,
            &config.kafka.group_id,
        )?)
    } else {
        None
    };
    Ok(progress_stage(
        output.marks,
        row_acks.concat(dlq_acks),
        &sink_config,
        prepared.progress.clone(),
        output.handle,
        append_times,
        committer,
        prepared.metrics.sink.clone(),
    ))
}
