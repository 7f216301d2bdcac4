//! The source itself: three operators of one worker, in a pipeline.
//!
//! - [`Reader`] polls the consumer and emits raw records (owned bytes) in
//!   partition order; it holds back when too many records are in flight.
//! - the decode stage ([`super::decode`]) turns them into data or rejections,
//!   pausing (never sleeping) while its decoder asks to retry.
//! - [`Placer`] owns the partition clocks: it places each decoded record at
//!   its dataflow time, dead-letters rejections, sends resume marks, holds the
//!   capabilities at the least watermark and, bounded, agrees on the final
//!   frontier. Its outputs are not connected to its input: its capabilities
//!   alone set the source's frontier, which a stalled decode stage holds back
//!   because records it has not passed on are not counted as read.

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

use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;

use super::decode::{decode_stage, DecodedRecord, RawRecord, RecordDecoder};
use super::metrics::PartitionMetrics;
use super::{
    assign, DeadLetter, Detached, KafkaSourceConfig, PartitionClock, PartitionMark, Placement,
    Rejection, ResumePoint, ResumeTracker, SourceError, SourceMetrics, StartFrom, TopicPartition,
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
    /// `decode` is a closure `|record: &SourceRecord| -> Result<(D, i64), E>`
    /// or any [`RecordDecoder`], which may also defer a record
    /// ([`super::Decoded::Retry`]): decoding then pauses, with the frontier
    /// held, and retries after a backoff.
    ///
    /// Time contract: data is emitted at its quantized event time, or at its
    /// partition's watermark if late; the output frontier is the least
    /// watermark of the partitions this worker owns, and only advances.
    fn kafka_source<D, E, R>(
        &self,
        config: KafkaSourceConfig,
        metrics: SourceMetrics,
        decode: R,
    ) -> Result<KafkaOutput<'scope, D, E>, SourceError>
    where
        D: Clone + 'static,
        E: Clone + 'static,
        R: RecordDecoder<D, E>;
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

/// The partitions this worker owns, opened at their start points.
struct Opened {
    partitions: Vec<Partition>,
    consumer: Option<Detached<BaseConsumer<StatsContext>>>,
}

/// Reads metadata, assigns partitions and positions the consumer.
fn open(
    config: &KafkaSourceConfig,
    metrics: &SourceMetrics,
    index: usize,
    peers: usize,
) -> Result<Opened, SourceError> {
    let timeout = Duration::from_millis(config.metadata_timeout_ms);
    // Metadata first, with a plain consumer: the assignment must be known
    // before the stats context can name its partitions.
    let probe_consumer = Detached::new(
        client_config(config).create::<BaseConsumer>()?,
        "metadata probe",
    );
    let counts = partition_counts(&*probe_consumer, &config.topics, timeout)?;
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

    let consumer = if partitions.is_empty() {
        None
    } else {
        let consumer: BaseConsumer<StatsContext> =
            client_config(config).create_with_context(StatsContext { high })?;
        consumer.assign(&tpl)?;
        Some(Detached::new(consumer, "source consumer"))
    };
    Ok(Opened {
        partitions,
        consumer,
    })
}

/// What the reader knows of one partition.
struct ReadPosition {
    tp: TopicPartition,
    next_offset: i64,
    /// Bounded mode: the high watermark at start.
    end: Option<i64>,
    done: bool,
}

/// Polls the consumer into raw records, in partition order.
struct Reader {
    consumer: Option<Detached<BaseConsumer<StatsContext>>>,
    positions: Vec<ReadPosition>,
    topics: Vec<String>,
    /// slots[topic index][partition] -> slot, for the hot path.
    slots: Vec<Vec<Option<usize>>>,
    /// Records emitted and not yet placed (shared with the placer).
    in_flight: Rc<Cell<usize>>,
    max_records: usize,
    worker: usize,
    metrics: SourceMetrics,
}

impl Reader {
    fn new(
        consumer: Option<Detached<BaseConsumer<StatsContext>>>,
        partitions: &[Partition],
        config: &KafkaSourceConfig,
        in_flight: Rc<Cell<usize>>,
        worker: usize,
        metrics: SourceMetrics,
    ) -> Self {
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
        let positions = partitions
            .iter()
            .map(|p| ReadPosition {
                tp: p.tp.clone(),
                next_offset: p.next_offset,
                end: p.end,
                done: p.done,
            })
            .collect();
        Reader {
            consumer,
            positions,
            topics: config.topics.clone(),
            slots,
            in_flight,
            max_records: config.max_records_per_activation.max(1),
            worker,
            metrics,
        }
    }

    fn slot(&self, topic: &str, partition: i32) -> Option<usize> {
        let t = self.topics.iter().position(|t| t == topic)?;
        self.slots[t]
            .get(usize::try_from(partition).ok()?)
            .copied()
            .flatten()
    }

    /// Polls up to one activation's worth of records into `out`; returns
    /// whether it stopped because the budget ran out (more may be waiting).
    fn poll(&mut self, out: &mut Vec<RawRecord>) -> bool {
        let Some(consumer) = self.consumer.as_ref() else {
            return false;
        };
        // Hold back while the decode stage is behind (paused, say).
        let budget = (4 * self.max_records)
            .saturating_sub(self.in_flight.get())
            .min(self.max_records);
        if budget == 0 {
            return false;
        }
        let mut polled = 0;
        while polled < budget {
            let message = match consumer.poll(Duration::ZERO) {
                None => break,
                Some(Err(error)) => {
                    self.metrics.consumer_errors.inc();
                    tracing::warn!(worker = self.worker, %error, "kafka consumer error");
                    break;
                }
                Some(Ok(message)) => message,
            };
            polled += 1;
            let Some(slot) = self.slot(message.topic(), message.partition()) else {
                continue;
            };
            let position = &mut self.positions[slot];
            let offset = message.offset();
            if position.done
                || position.end.is_some_and(|end| offset >= end)
                || offset < position.next_offset
            {
                continue;
            }
            position.next_offset = offset + 1;
            out.push(RawRecord {
                slot,
                partition: message.partition(),
                offset,
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().map(<[u8]>::to_vec),
                timestamp_ms: message.timestamp().to_millis(),
            });
        }
        self.in_flight.set(self.in_flight.get() + out.len());
        polled >= budget
    }

    /// Bounded: partitions read to their end stop fetching.
    fn pause_finished(&mut self) {
        let mut pause = TopicPartitionList::new();
        for position in self.positions.iter_mut() {
            if !position.done && position.end.is_some_and(|end| position.next_offset >= end) {
                position.done = true;
                let _ = pause.add_partition(&position.tp.topic, position.tp.partition);
            }
        }
        if pause.count() > 0 {
            if let Some(consumer) = self.consumer.as_ref() {
                if let Err(error) = consumer.pause(&pause) {
                    tracing::warn!(worker = self.worker, %error, "could not pause finished partitions");
                }
            }
        }
    }

    /// Bounded: every partition read to its end.
    fn finished(&self) -> bool {
        self.positions.iter().all(|p| p.done)
    }
}

/// Builds the reader operator: raw records, all at time 0 (their dataflow
/// time is decided by the placer, whose outputs do not depend on it).
fn reader_operator<'scope>(
    scope: Scope<'scope, u64>,
    name: String,
    mut reader: Reader,
    bounded: bool,
    poll_interval: Duration,
) -> Stream<'scope, u64, Vec<RawRecord>> {
    let mut builder = OperatorBuilder::new(name, scope);
    let info = builder.operator_info();
    let (output, raw) = builder.new_output::<Vec<RawRecord>>();
    let mut output = OutputBuilder::from(output);
    let activator = scope.activator_for(Rc::clone(&info.address));
    if let Some(consumer) = reader.consumer.as_mut() {
        let sync = scope.worker().sync_activator_for(info.address.to_vec());
        consumer.set_nonempty_callback(move || {
            let _ = sync.activate();
        });
    }
    builder.build(move |mut caps| {
        let mut cap = caps.pop();
        if reader.positions.is_empty() || (bounded && reader.finished()) {
            cap = None;
        }
        activator.activate();
        let mut batch = Vec::new();
        move |_frontiers| {
            let Some(held) = cap.as_ref() else {
                return;
            };
            let more = reader.poll(&mut batch);
            if !batch.is_empty() {
                output.activate().session(held).give_container(&mut batch);
                batch.clear();
            }
            if bounded {
                reader.pause_finished();
                if reader.finished() {
                    cap = None;
                    reader.consumer = None;
                    return;
                }
            }
            if more {
                activator.activate();
            } else {
                activator.activate_after(poll_interval);
            }
        }
    });
    raw
}

/// The placer's state: partition clocks, staged outputs, the bounded close.
struct Placer<D, E> {
    partitions: Vec<Partition>,
    caps: Caps,
    phase: Phase,
    staged: Vec<(u64, D)>,
    dead: Vec<DeadLetter<E>>,
    in_flight: Rc<Cell<usize>>,
    observer: Observer,
    final_frontier: Rc<Cell<Option<u64>>>,
    probes: (ProbeHandle<u64>, ProbeHandle<u64>),
    idle_timeout_ms: Option<u64>,
    last_idle_check: u64,
    bounded: bool,
    worker: usize,
}

impl<D, E> Placer<D, E> {
    /// Places decoded records at their dataflow times, or dead-letters them.
    fn place(&mut self, records: &mut Vec<DecodedRecord<D, E>>, now: u64) {
        self.in_flight
            .set(self.in_flight.get().saturating_sub(records.len()));
        for DecodedRecord { raw, outcome } in records.drain(..) {
            let part = &mut self.partitions[raw.slot];
            let offset = raw.offset;
            let before = part.clock.resume_point(offset);
            let rejection = match outcome {
                Ok((datum, event_ms)) => match part.clock.place(event_ms) {
                    Placement::TooLate { watermark_ms, .. } => {
                        part.metrics.too_late.inc();
                        Some(Rejection::TooLate {
                            event_ms,
                            watermark_ms,
                        })
                    }
                    placement => {
                        let time = placement.time().expect("placed records have a time");
                        if matches!(placement, Placement::Late { .. }) {
                            part.metrics.late.inc();
                        }
                        self.staged.push((time, datum));
                        if let (Some(observe), Some(ts)) =
                            (self.observer.borrow_mut().as_mut(), raw.timestamp_ms)
                        {
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
                let after = part.clock.resume_point(offset + 1);
                part.resume.skip_to(after);
                part.durable.skip_to(after);
                self.dead.push(DeadLetter {
                    topic: part.tp.topic.clone(),
                    partition: raw.partition,
                    offset,
                    timestamp_ms: raw.timestamp_ms,
                    key: raw.key,
                    payload: raw.payload,
                    reason,
                });
            }
            part.metrics.records.inc();
            part.next_offset = offset + 1;
            part.last_record_wall_ms = now;
            part.last_append_ms = raw.timestamp_ms;
        }
    }

    /// Bounded: partitions placed to their end are done; their clocks finish.
    fn finish_partitions(&mut self) {
        for part in self.partitions.iter_mut() {
            if !part.done && part.end.is_some_and(|end| part.next_offset >= end) {
                part.done = true;
            }
            if part.done && part.end.is_some() {
                part.clock.finish();
            }
        }
    }

    /// Idle, caught-up partitions follow the wall clock. A partition with
    /// records still in the decode stage is not caught up.
    fn advance_idle(&mut self, now: u64) {
        let Some(idle) = self.idle_timeout_ms else {
            return;
        };
        if now < self.last_idle_check + idle.min(100) {
            return;
        }
        self.last_idle_check = now;
        for part in self.partitions.iter_mut() {
            let caught_up = part.next_offset >= part.high.load(Ordering::Relaxed);
            if caught_up
                && now.saturating_sub(part.last_record_wall_ms) >= idle
                && part.clock.advance_idle(now)
            {
                part.metrics.idle_advances.inc();
            }
        }
    }

    /// Data, sorted into runs of equal time.
    fn emit_data(&mut self, out: &mut OutputBuilder<u64, CapacityContainerBuilder<Vec<D>>>)
    where
        D: Clone + 'static,
    {
        if self.staged.is_empty() {
            return;
        }
        let cap = self
            .caps
            .data
            .as_ref()
            .expect("data capability held while reading");
        self.staged.sort_by_key(|(t, _)| *t);
        let mut output = out.activate();
        let mut runs = self.staged.drain(..).peekable();
        while let Some((time, first)) = runs.next() {
            let delayed = cap.delayed(&time);
            let mut session = output.session(&delayed);
            session.give(first);
            while let Some((_, datum)) = runs.next_if(|(t, _)| *t == time) {
                session.give(datum);
            }
        }
    }

    fn emit_dead(
        &mut self,
        out: &mut OutputBuilder<u64, CapacityContainerBuilder<Vec<DeadLetter<E>>>>,
    ) where
        E: Clone + 'static,
    {
        if self.dead.is_empty() {
            return;
        }
        let cap = self
            .caps
            .errors
            .as_ref()
            .expect("error capability held while reading");
        out.activate()
            .session(cap)
            .give_iterator(self.dead.drain(..));
    }

    /// Marks for partitions whose watermark moved, then the capabilities
    /// follow the least watermark.
    fn emit_marks(
        &mut self,
        out: &mut OutputBuilder<u64, CapacityContainerBuilder<Vec<PartitionMark>>>,
    ) {
        if let Some(mark_cap) = self.caps.marks.as_ref() {
            let mut output = out.activate();
            for part in self.partitions.iter_mut() {
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
        if let Some(least) = self.least_watermark() {
            self.caps.downgrade(least);
        }
    }

    fn least_watermark(&self) -> Option<u64> {
        self.partitions
            .iter()
            .filter(|p| p.constrains())
            .map(|p| p.clock.watermark())
            .min()
    }

    /// Lag, once per activation per partition.
    fn report_lag(&self, now: u64) {
        for part in self.partitions.iter() {
            let hi = part.high.load(Ordering::Relaxed);
            let lag = (hi - part.next_offset).max(0);
            part.metrics.lag_records.set(lag);
            let seconds = match (lag > 0, part.last_append_ms) {
                (true, Some(append)) => (now as i64 - append).max(0) as f64 / 1000.0,
                _ => 0.0,
            };
            part.metrics.lag_seconds.set(seconds);
        }
    }

    /// Bounded close: agree on the final frontier with every worker, then release.
    fn close_bounded(&mut self) {
        match self.phase {
            Phase::Reading if self.bounded && self.partitions.iter().all(|p| p.done) => {
                // A partition that never had an event constrains nothing.
                // Encode "done, with least final time f" as f + 1, and "no partitions" as the top.
                let at = self
                    .least_watermark()
                    .map_or(u64::MAX, |f| f.saturating_add(1));
                if let Some(cap) = self.caps.barrier_a.as_mut() {
                    cap.downgrade(&at);
                }
                self.phase = Phase::Finished;
            }
            Phase::Finished => {
                let agreed = self.probes.0.with_frontier(|f| f.first().copied());
                if let Some(at) = agreed.filter(|at| *at > 0) {
                    let frontier = if at == u64::MAX { None } else { Some(at - 1) };
                    tracing::info!(worker = self.worker, final_frontier = ?frontier, "bounded source read to its end");
                    self.final_frontier.set(frontier.or(Some(u64::MAX)));
                    self.caps.barrier_b = None;
                    self.phase = Phase::Agreed;
                }
            }
            Phase::Agreed if self.probes.1.done() => {
                self.caps = Caps::default();
                self.phase = Phase::Closed;
            }
            _ => {}
        }
    }
}

impl<'scope> KafkaSource<'scope> for Scope<'scope, u64> {
    fn kafka_source<D, E, R>(
        &self,
        config: KafkaSourceConfig,
        metrics: SourceMetrics,
        decode: R,
    ) -> Result<KafkaOutput<'scope, D, E>, SourceError>
    where
        D: Clone + 'static,
        E: Clone + 'static,
        R: RecordDecoder<D, E>,
    {
        let index = self.index();
        let Opened {
            partitions,
            consumer,
        } = open(&config, &metrics, index, self.peers())?;
        let in_flight = Rc::new(Cell::new(0));
        let poll_interval = Duration::from_millis(config.poll_interval_ms.max(1));

        // Read, then decode: raw records flow through a pipeline on this worker.
        let topic_of_slot: Rc<[String]> = partitions.iter().map(|p| p.tp.topic.clone()).collect();
        let reader = Reader::new(
            consumer,
            &partitions,
            &config,
            Rc::clone(&in_flight),
            index,
            metrics.clone(),
        );
        let raw = reader_operator(
            *self,
            format!("{}Read", config.name),
            reader,
            config.bounded,
            poll_interval,
        );
        let decoded = decode_stage(
            raw,
            format!("{}Decode", config.name),
            topic_of_slot,
            decode,
            metrics,
        );

        // Place: outputs first, so the decoded input connects to none of them.
        let mut builder = OperatorBuilder::new(config.name.clone(), *self);
        let info = builder.operator_info();
        let (data_out, data) = builder.new_output::<Vec<D>>();
        let (errors_out, errors) = builder.new_output::<Vec<DeadLetter<E>>>();
        let (marks_out, marks) = builder.new_output::<Vec<PartitionMark>>();
        let (_barrier_a_out, barrier_a) = builder.new_output::<Vec<()>>();
        let (_barrier_b_out, barrier_b) = builder.new_output::<Vec<()>>();
        let mut input = builder.new_input_connection(decoded, Pipeline, std::iter::empty());
        let mut data_out = OutputBuilder::from(data_out);
        let mut errors_out = OutputBuilder::from(errors_out);
        let mut marks_out = OutputBuilder::from(marks_out);

        let barrier_a_probe = ProbeHandle::new();
        let barrier_b_probe = ProbeHandle::new();
        let handle = SourceHandle::default();
        let activator = self.activator_for(Rc::clone(&info.address));
        let bounded = config.bounded;
        let mut placer = Placer {
            partitions,
            caps: Caps::default(),
            phase: Phase::Reading,
            staged: Vec::new(),
            dead: Vec::new(),
            in_flight,
            observer: Rc::clone(&handle.observer),
            final_frontier: Rc::clone(&handle.final_frontier),
            probes: (barrier_a_probe.clone(), barrier_b_probe.clone()),
            idle_timeout_ms: if bounded {
                None
            } else {
                config.idle_timeout_ms
            },
            last_idle_check: 0,
            bounded,
            worker: index,
        };

        builder.build(move |mut caps| {
            let barrier_b_cap = caps.pop();
            let barrier_a_cap = caps.pop();
            let mark_cap = caps.pop();
            let error_cap = caps.pop();
            let data_cap = caps.pop();
            placer.caps = Caps {
                data: data_cap,
                errors: error_cap,
                marks: mark_cap,
                barrier_a: barrier_a_cap,
                barrier_b: barrier_b_cap,
            };
            if placer.partitions.is_empty() {
                // Nothing to read here: hold nothing back.
                placer.caps.data = None;
                placer.caps.errors = None;
                placer.caps.marks = None;
            }
            if !bounded {
                placer.caps.barrier_a = None;
                placer.caps.barrier_b = None;
            }
            activator.activate();

            move |_frontiers| {
                let now = wall_ms();
                input.for_each(|_cap, records| placer.place(records, now));
                if placer.phase == Phase::Closed {
                    return;
                }
                if placer.phase == Phase::Reading {
                    placer.finish_partitions();
                    placer.advance_idle(now);
                }
                placer.emit_data(&mut data_out);
                placer.emit_dead(&mut errors_out);
                placer.emit_marks(&mut marks_out);
                placer.report_lag(now);
                placer.close_bounded();
                if placer.phase != Phase::Closed {
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
