//! The source operator itself.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::message::Message;
use rdkafka::statistics::Statistics;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::{Scope, Stream};

use super::metrics::PartitionMetrics;
use super::{
    assign, DeadLetter, KafkaSourceConfig, PartitionClock, PartitionMark, Placement, Rejection,
    ResumePoint, ResumeTracker, SourceError, SourceMetrics, SourceRecord, StartFrom,
    TopicPartition,
};

/// The streams of a Kafka source.
pub struct KafkaOutput<'scope, D, E> {
    /// Decoded records, each at its dataflow time.
    pub data: Stream<'scope, u64, Vec<D>>,
    /// Records that did not become data, at the watermark when read.
    pub errors: Stream<'scope, u64, Vec<DeadLetter<E>>>,
    /// Resume marks, each at the time it describes.
    pub marks: Stream<'scope, u64, Vec<PartitionMark>>,
    /// Shared with the sinks of this worker.
    pub handle: SourceHandle,
}

type Observer = Rc<RefCell<Option<Box<dyn FnMut(u64, i64)>>>>;

/// What the sinks of a worker need to know about its source.
#[derive(Clone, Default)]
pub struct SourceHandle {
    final_frontier: Rc<Cell<Option<u64>>>,
    observer: Observer,
}

impl std::fmt::Debug for SourceHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceHandle")
            .field("final_frontier", &self.final_frontier.get())
            .finish()
    }
}

impl SourceHandle {
    /// Calls `observer(dataflow time, Kafka timestamp ms)` for every record
    /// emitted as data (to measure freshness). One observer; the last set wins.
    pub fn observe(&self, observer: impl FnMut(u64, i64) + 'static) {
        *self.observer.borrow_mut() = Some(Box::new(observer));
    }

    /// In bounded mode, once every worker has read to its end: the final
    /// frontier, agreed by all workers. Outputs at or after it are not final
    /// (their windows reach past the end of the log) and must not be written.
    /// It is set on every worker before any frontier passes it.
    pub fn final_frontier(&self) -> Option<u64> {
        self.final_frontier.get()
    }
}

/// Builds a Kafka source in a scope whose timestamps are ms of event time.
pub trait KafkaSource<'scope> {
    /// Reads `config.topics`, decoding each record with `decode` into data
    /// and its event time (ms), or an error that travels to the dead letters.
    ///
    /// Time contract: data is emitted at its quantized event time, or at its
    /// partition's watermark if late; the output frontier is the least
    /// watermark of the partitions this worker owns, and only advances.
    fn kafka_source<D, E, F>(
        &self,
        config: KafkaSourceConfig,
        metrics: SourceMetrics,
        decode: F,
    ) -> Result<KafkaOutput<'scope, D, E>, SourceError>
    where
        D: Clone + 'static,
        E: Clone + 'static,
        F: FnMut(&SourceRecord<'_>) -> Result<(D, i64), E> + 'static;
}

/// Consumer context that publishes the high watermarks of librdkafka's
/// statistics to the operator without locks.
struct StatsContext {
    high: HashMap<(String, i32), Arc<AtomicI64>>,
}

impl ClientContext for StatsContext {
    fn stats(&self, statistics: Statistics) {
        for ((topic, partition), cell) in &self.high {
            let stats = statistics
                .topics
                .get(topic)
                .and_then(|t| t.partitions.get(partition));
            if let Some(p) = stats.filter(|p| p.hi_offset >= 0) {
                cell.store(p.hi_offset, Ordering::Relaxed);
            }
        }
    }
}

impl ConsumerContext for StatsContext {}

struct Partition {
    tp: TopicPartition,
    clock: PartitionClock,
    /// Resume points for frontiers minus the horizon.
    resume: ResumeTracker,
    /// Exact durable offsets (granularity of one tick).
    durable: ResumeTracker,
    next_offset: i64,
    /// Bounded mode: the high watermark at start.
    end: Option<i64>,
    done: bool,
    /// Last mark sent, at this time.
    marked: Option<u64>,
    last_record_wall_ms: u64,
    last_append_ms: Option<i64>,
    high: Arc<AtomicI64>,
    metrics: PartitionMetrics,
}

impl Partition {
    /// Whether this partition holds the frontier back: not when it is done
    /// (bounded) without ever having shown an event.
    fn constrains(&self) -> bool {
        !(self.done && self.clock.max_event().is_none())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Reading,
    /// Bounded: every owned partition is done; waiting for all workers.
    Finished,
    /// Bounded: final frontier known here; waiting for all workers to know it.
    Agreed,
    Closed,
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn partition_counts(
    consumer: &BaseConsumer<impl ConsumerContext>,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<(String, i32)>, SourceError> {
    let mut counts = Vec::with_capacity(topics.len());
    for topic in topics {
        let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
        let count = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if count == 0 {
            return Err(SourceError::MissingTopic(topic.clone()));
        }
        counts.push((topic.clone(), count as i32));
    }
    Ok(counts)
}

fn client_config(config: &KafkaSourceConfig) -> ClientConfig {
    let mut cc = ClientConfig::new();
    cc.set("bootstrap.servers", &config.brokers)
        .set("group.id", &config.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "1000")
        .set("fetch.wait.max.ms", "10")
        .set("client.id", format!("sfs-{}", config.group_id));
    for (k, v) in &config.consumer_properties {
        cc.set(k, v);
    }
    cc
}

impl<'scope> KafkaSource<'scope> for Scope<'scope, u64> {
    fn kafka_source<D, E, F>(
        &self,
        config: KafkaSourceConfig,
        metrics: SourceMetrics,
        mut decode: F,
    ) -> Result<KafkaOutput<'scope, D, E>, SourceError>
    where
        D: Clone + 'static,
        E: Clone + 'static,
        F: FnMut(&SourceRecord<'_>) -> Result<(D, i64), E> + 'static,
    {
        let index = self.index();
        let peers = self.peers();
        let timeout = Duration::from_millis(config.metadata_timeout_ms);

        // Metadata first, with a plain consumer: the assignment must be known
        // before the stats context can name its partitions.
        let probe_consumer: BaseConsumer = client_config(&config).create()?;
        let counts = partition_counts(&probe_consumer, &config.topics, timeout)?;
        let owned = assign(&counts, index, peers);
        let tick = config.clock.tick_ms.max(1);
        // Resume points need only be this fine: at most ~1024 entries per horizon.
        let granularity = (config.resume_horizon_ms / 1024).max(tick);

        let mut partitions = Vec::with_capacity(owned.len());
        let mut high = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for tp in owned {
            let (low, hi) = probe_consumer.fetch_watermarks(&tp.topic, tp.partition, timeout)?;
            let start = match config.resume.get(&tp) {
                Some(point) => *point,
                None => match config.start_from {
                    StartFrom::Earliest => ResumePoint::start(low),
                    StartFrom::Latest => ResumePoint::start(hi),
                },
            };
            // A resume point the log no longer retains restarts at its start.
            let start = if start.offset < low {
                ResumePoint {
                    offset: low,
                    ..start
                }
            } else {
                start
            };
            tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(start.offset))?;
            let cell = Arc::new(AtomicI64::new(hi));
            high.insert((tp.topic.clone(), tp.partition), Arc::clone(&cell));
            let end = config.bounded.then_some(hi);
            let done = end.is_some_and(|end| start.offset >= end);
            tracing::info!(
                topic = %tp.topic, partition = tp.partition, worker = index,
                offset = start.offset, watermark_ms = start.watermark_ms, end = ?end,
                "assigned partition"
            );
            partitions.push(Partition {
                metrics: metrics.partition(&tp.topic, tp.partition),
                clock: PartitionClock::new(config.clock, &start),
                resume: ResumeTracker::new(config.resume_horizon_ms, granularity, start),
                durable: ResumeTracker::new(0, tick, start),
                next_offset: start.offset,
                end,
                done,
                marked: None,
                last_record_wall_ms: wall_ms(),
                last_append_ms: None,
                high: cell,
                tp,
            });
        }
        drop(probe_consumer);

        let consumer: Option<BaseConsumer<StatsContext>> = if partitions.is_empty() {
            None
        } else {
            let consumer: BaseConsumer<StatsContext> =
                client_config(&config).create_with_context(StatsContext { high })?;
            consumer.assign(&tpl)?;
            Some(consumer)
        };
        // slots[topic index][partition] -> slot, for the hot path.
        let mut slots: Vec<Vec<Option<usize>>> = vec![Vec::new(); config.topics.len()];
        for (slot, p) in partitions.iter().enumerate() {
            let topic = config
                .topics
                .iter()
                .position(|t| *t == p.tp.topic)
                .expect("owned topics are configured topics");
            let partition = usize::try_from(p.tp.partition).expect("partitions are non-negative");
            let row = &mut slots[topic];
            if row.len() <= partition {
                row.resize(partition + 1, None);
            }
            row[partition] = Some(slot);
        }

        let mut builder = OperatorBuilder::new(config.name.clone(), *self);
        let info = builder.operator_info();
        let (data_out, data) = builder.new_output::<Vec<D>>();
        let (errors_out, errors) = builder.new_output::<Vec<DeadLetter<E>>>();
        let (marks_out, marks) = builder.new_output::<Vec<PartitionMark>>();
        let (_barrier_a_out, barrier_a) = builder.new_output::<Vec<()>>();
        let (_barrier_b_out, barrier_b) = builder.new_output::<Vec<()>>();
        let mut data_out = OutputBuilder::from(data_out);
        let mut errors_out = OutputBuilder::from(errors_out);
        let mut marks_out = OutputBuilder::from(marks_out);

        let barrier_a_probe = ProbeHandle::new();
        let barrier_b_probe = ProbeHandle::new();
        let handle = SourceHandle::default();
        let final_frontier = Rc::clone(&handle.final_frontier);
        let observer = Rc::clone(&handle.observer);
        let activator = self.activator_for(Rc::clone(&info.address));
        let mut consumer = consumer;
        if let Some(consumer) = consumer.as_mut() {
            let sync = self.worker().sync_activator_for(info.address.to_vec());
            consumer.set_nonempty_callback(move || {
                let _ = sync.activate();
            });
        }

        let probes = (barrier_a_probe.clone(), barrier_b_probe.clone());
        let topics = config.topics.clone();
        let max_records = config.max_records_per_activation.max(1);
        let poll_interval = Duration::from_millis(config.poll_interval_ms.max(1));
        let idle_timeout_ms = if config.bounded {
            None
        } else {
            config.idle_timeout_ms
        };
        let bounded = config.bounded;
        let source_metrics = metrics;

        builder.build(move |mut caps| {
            let barrier_b_cap = caps.pop();
            let barrier_a_cap = caps.pop();
            let mark_cap = caps.pop();
            let error_cap = caps.pop();
            let data_cap = caps.pop();
            let mut caps = Caps { data: data_cap, errors: error_cap, marks: mark_cap, barrier_a: barrier_a_cap, barrier_b: barrier_b_cap };
            if partitions.is_empty() {
                // Nothing to read here: hold nothing back.
                caps.data = None;
                caps.errors = None;
                caps.marks = None;
            }
            if !bounded {
                caps.barrier_a = None;
                caps.barrier_b = None;
            }
            let mut phase = Phase::Reading;
            let mut staged: Vec<(u64, D)> = Vec::new();
            let mut dead: Vec<DeadLetter<E>> = Vec::new();
            let mut last_idle_check = 0u64;
            activator.activate();

            move |_frontiers| {
                if phase == Phase::Closed {
                    return;
                }
                let now = wall_ms();
                let mut read = 0usize;

                if phase == Phase::Reading {
                    if let Some(consumer) = consumer.as_ref() {
                        while read < max_records {
                            let message = match consumer.poll(Duration::ZERO) {
                                None => break,
                                Some(Err(error)) => {
                                    source_metrics.consumer_errors.inc();
                                    tracing::warn!(worker = index, %error, "kafka consumer error");
                                    break;
                                }
                                Some(Ok(message)) => message,
                            };
                            read += 1;
                            let topic = message.topic();
                            let slot = topics
                                .iter()
                                .position(|t| t == topic)
                                .and_then(|t| slots[t].get(usize::try_from(message.partition()).ok()?).copied().flatten());
                            let Some(slot) = slot else {
                                continue;
                            };
                            let part = &mut partitions[slot];
                            let offset = message.offset();
                            if part.done || part.end.is_some_and(|end| offset >= end) || offset < part.next_offset {
                                continue;
                            }
                            let record = SourceRecord {
                                topic,
                                partition: message.partition(),
                                offset,
                                key: message.key(),
                                payload: message.payload(),
                                timestamp_ms: message.timestamp().to_millis(),
                            };
                            let before = part.clock.resume_point(offset);
                            let rejection = match decode(&record) {
                                Ok((datum, event_ms)) => match part.clock.place(event_ms) {
                                    Placement::TooLate { watermark_ms, .. } => {
                                        part.metrics.too_late.inc();
                                        Some(Rejection::TooLate { event_ms, watermark_ms })
                                    }
                                    placement => {
                                        let time = placement.time().expect("placed records have a time");
                                        if matches!(placement, Placement::Late { .. }) {
                                            part.metrics.late.inc();
                                        }
                                        staged.push((time, datum));
                                        if let (Some(observe), Some(ts)) = (observer.borrow_mut().as_mut(), record.timestamp_ms) {
                                            observe(time, ts);
                                        }
                                        let after = part.clock.resume_point(offset + 1);
                                        part.resume.record(time, before, after);
                                        part.durable.record(time, before, after);
                                        None
                                    }
                                },
                                Err(error) => {
                                    part.metrics.rejected.inc();
                                    Some(Rejection::Decode(error))
                                }
                            };
                            if let Some(reason) = rejection {
                                dead.push(DeadLetter {
                                    topic: record.topic.to_owned(),
                                    partition: record.partition,
                                    offset,
                                    timestamp_ms: record.timestamp_ms,
                                    key: record.key.map(<[u8]>::to_vec),
                                    payload: record.payload.map(<[u8]>::to_vec),
                                    reason,
                                });
                                let after = part.clock.resume_point(offset + 1);
                                part.resume.skip_to(after);
                                part.durable.skip_to(after);
                            }
                            part.metrics.records.inc();
                            part.next_offset = offset + 1;
                            part.last_record_wall_ms = now;
                            part.last_append_ms = record.timestamp_ms;
                        }
                    }

                    // Bounded: partitions at their end close and stop fetching.
                    let mut pause = TopicPartitionList::new();
                    for part in partitions.iter_mut() {
                        if !part.done && part.end.is_some_and(|end| part.next_offset >= end) {
                            part.done = true;
                            let _ = pause.add_partition(&part.tp.topic, part.tp.partition);
                        }
                        if part.done && part.end.is_some() {
                            part.clock.finish();
                        }
                    }
                    if pause.count() > 0 {
                        if let Some(consumer) = consumer.as_ref() {
                            if let Err(error) = consumer.pause(&pause) {
                                tracing::warn!(worker = index, %error, "could not pause finished partitions");
                            }
                        }
                    }

                    // Idle, caught-up partitions follow the wall clock.
                    if let Some(idle) = idle_timeout_ms {
                        if now >= last_idle_check + idle.min(100) {
                            last_idle_check = now;
                            for part in partitions.iter_mut() {
                                let caught_up = part.next_offset >= part.high.load(Ordering::Relaxed);
                                if caught_up && now.saturating_sub(part.last_record_wall_ms) >= idle && part.clock.advance_idle(now) {
                                    part.metrics.idle_advances.inc();
                                }
                            }
                        }
                    }
                }

                // Data, sorted into runs of equal time.
                if !staged.is_empty() {
                    let cap = caps.data.as_ref().expect("data capability held while reading");
                    staged.sort_by_key(|(t, _)| *t);
                    let mut output = data_out.activate();
                    let mut runs = staged.drain(..).peekable();
                    while let Some((time, first)) = runs.next() {
                        let delayed = cap.delayed(&time);
                        let mut session = output.session(&delayed);
                        session.give(first);
                        while let Some((_, datum)) = runs.next_if(|(t, _)| *t == time) {
                            session.give(datum);
                        }
                    }
                }
                if !dead.is_empty() {
                    let cap = caps.errors.as_ref().expect("error capability held while reading");
                    errors_out.activate().session(cap).give_iterator(dead.drain(..));
                }

                // Marks for partitions whose watermark moved, then the capabilities.
                if phase != Phase::Closed {
                    if let Some(mark_cap) = caps.marks.as_ref() {
                        let mut output = marks_out.activate();
                        for part in partitions.iter_mut() {
                            let watermark = part.clock.watermark();
                            part.metrics.watermark_ms.set(watermark as i64);
                            if part.marked.is_some_and(|m| m >= watermark) {
                                continue;
                            }
                            part.marked = Some(watermark);
                            let mark = PartitionMark {
                                topic: part.tp.topic.clone(),
                                partition: part.tp.partition,
                                resume: part.resume.resume_for(watermark),
                                durable_offset: part.durable.resume_for(watermark).offset,
                            };
                            output.session(&mark_cap.delayed(&watermark)).give(mark);
                        }
                    }
                    if let Some(least) = partitions.iter().filter(|p| p.constrains()).map(|p| p.clock.watermark()).min() {
                        caps.downgrade(least);
                    }
                }

                // Lag, at most once per activation per partition.
                for part in partitions.iter() {
                    let hi = part.high.load(Ordering::Relaxed);
                    let lag = (hi - part.next_offset).max(0);
                    part.metrics.lag_records.set(lag);
                    let seconds = match (lag > 0, part.last_append_ms) {
                        (true, Some(append)) => (now as i64 - append).max(0) as f64 / 1000.0,
                        _ => 0.0,
                    };
                    part.metrics.lag_seconds.set(seconds);
                }

                // Bounded close: agree on the final frontier, then release.
                match phase {
                    Phase::Reading if bounded && partitions.iter().all(|p| p.done) => {
                        // A partition that never had an event constrains nothing.
                        let least = partitions.iter().filter(|p| p.constrains()).map(|p| p.clock.watermark()).min();
                        // Encode "done, with least final time f" as f + 1, and "no partitions" as the top.
                        let at = least.map_or(u64::MAX, |f| f.saturating_add(1));
                        if let Some(cap) = caps.barrier_a.as_mut() {
                            cap.downgrade(&at);
                        }
                        phase = Phase::Finished;
                    }
                    Phase::Finished => {
                        let agreed = probes.0.with_frontier(|f| f.first().copied());
                        if let Some(at) = agreed.filter(|at| *at > 0) {
                            let frontier = if at == u64::MAX { None } else { Some(at - 1) };
                            tracing::info!(worker = index, final_frontier = ?frontier, "bounded source read to its end");
                            final_frontier.set(frontier.or(Some(u64::MAX)));
                            caps.barrier_b = None;
                            phase = Phase::Agreed;
                        }
                    }
                    Phase::Agreed if probes.1.done() => {
                        caps = Caps::default();
                        phase = Phase::Closed;
                        consumer = None;
                        return;
                    }
                    _ => {}
                }

                if read >= max_records {
                    activator.activate();
                } else {
                    activator.activate_after(poll_interval);
                }
            }
        });

        let barrier_a = barrier_a.probe_with(&barrier_a_probe);
        let barrier_b = barrier_b.probe_with(&barrier_b_probe);
        drop((barrier_a, barrier_b));

        Ok(KafkaOutput {
            data,
            errors,
            marks,
            handle,
        })
    }
}

#[derive(Default)]
struct Caps {
    data: Option<Capability<u64>>,
    errors: Option<Capability<u64>>,
    marks: Option<Capability<u64>>,
    barrier_a: Option<Capability<u64>>,
    barrier_b: Option<Capability<u64>>,
}

impl Caps {
    fn downgrade(&mut self, time: u64) {
        for cap in [&mut self.data, &mut self.errors, &mut self.marks]
            .into_iter()
            .flatten()
        {
            if *cap.time() < time {
                cap.downgrade(&time);
            }
        }
    }
}
