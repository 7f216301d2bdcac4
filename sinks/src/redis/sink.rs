//! The sink and progress-stage operators.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use operators::kafka::{OffsetCommitter, PartitionMark, SourceHandle, TopicPartition};
use operators::window::FxBuildHasher;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;
use timely::progress::frontier::MutableAntichain;

use differential_dataflow::VecCollection;
use schemas::{Key, Row, Value};

use super::writer::{Job, Writer};
use super::{
    AppendTimes, PartitionProgress, ProgressRecord, RedisSinkConfig, RowWrite, SinkMetrics,
};

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The frontier a sink or stage may act on: its input frontier, capped by the
/// bounded source's final frontier. `None` while nothing can be said.
fn target(frontier: &MutableAntichain<u64>, source: &SourceHandle) -> Option<u64> {
    let input = frontier.frontier().first().copied();
    match (input, source.final_frontier()) {
        (Some(f), Some(end)) => Some(f.min(end)),
        (Some(f), None) => Some(f),
        (None, Some(end)) if end != u64::MAX => Some(end),
        _ => None,
    }
}

/// A key's changes since its last write.
struct Ready {
    /// The time of its first and of its last change.
    first: u64,
    last: u64,
    /// Its values after the last change (`None`: deleted).
    values: Option<Arc<[Value]>>,
    /// Its values before the first change (the retraction at `first`): what
    /// the last write left in Redis, if the row existed.
    old: Option<Arc<[Value]>>,
}

/// Pending rows by key.
type ReadyRows = HashMap<(u8, Key), Ready, FxBuildHasher>;

/// Writes row changes to Redis, exactly once and monotonically.
pub trait RedisSink<'scope> {
    /// Routes each change to the worker owning its key; when the input
    /// frontier passes `F`, writes the last change before `F` of every key
    /// with `_as_of = F` (changes before `floor`, the durable frontier at
    /// start, are already in Redis and are skipped; `ceiling` is the write
    /// ceiling at start, see [`super::Ownership`]). Returns the
    /// acknowledgements: an empty stream whose frontier passes `F` only once
    /// this worker's rows before `F` are durable in Redis.
    fn redis_sink(
        self,
        config: &RedisSinkConfig,
        floor: u64,
        ceiling: u64,
        source: SourceHandle,
        metrics: SinkMetrics,
    ) -> Stream<'scope, u64, Vec<()>>;
}

impl<'scope> RedisSink<'scope> for VecCollection<'scope, u64, Row, isize> {
    fn redis_sink(
        self,
        config: &RedisSinkConfig,
        floor: u64,
        ceiling: u64,
        source: SourceHandle,
        metrics: SinkMetrics,
    ) -> Stream<'scope, u64, Vec<()>> {
        let scope = self.scope();
        let mut builder = OperatorBuilder::new("RedisSink".to_owned(), scope);
        let info = builder.operator_info();
        // Rows arrive on the worker their key was routed to upstream.
        let mut input = builder.new_input(self.inner, Pipeline);
        let (_acks_out, acks) = builder.new_output::<Vec<()>>();
        let activator = scope.worker().sync_activator_for(info.address.to_vec());
        let name = format!("sfs-redis-sink-{}", scope.index());
        let mut writer = Writer::spawn(name, config.clone(), ceiling, metrics, activator);

        builder.build(move |mut caps| {
            let mut held: Option<Capability<u64>> = caps.pop();
            // Changes not yet before the frontier, by time.
            let mut pending: BTreeMap<u64, Vec<(Row, isize)>> = BTreeMap::new();
            // The last change of each key before `ready_at`.
            let mut ready: ReadyRows = HashMap::default();
            let mut ready_at = floor;
            let mut sent_at = floor;

            move |frontiers| {
                input.for_each(|_cap, data| {
                    // A batch usually holds one time: look it up once per run.
                    let mut run: Option<(u64, &mut Vec<(Row, isize)>)> = None;
                    for (row, time, diff) in data.drain(..) {
                        if time < floor {
                            continue;
                        }
                        let bucket = match run.take() {
                            Some((t, bucket)) if t == time => bucket,
                            _ => pending.entry(time).or_default(),
                        };
                        bucket.push((row, diff));
                        run = Some((time, bucket));
                    }
                });
                while let Some(done) = writer.try_done() {
                    if let Some(cap) = held.as_mut() {
                        if *cap.time() < done.frontier {
                            cap.downgrade(&done.frontier);
                        }
                    }
                }
                let Some(frontier) = target(&frontiers[0], &source) else {
                    if frontiers[0].frontier().is_empty() && writer.idle() {
                        held = None;
                    }
                    return;
                };
                if frontier > ready_at {
                    let later = pending.split_off(&frontier);
                    for (time, changes) in std::mem::replace(&mut pending, later) {
                        // Consolidate: a key's change at `time` is its old row
                        // at -1 and its new row (if any) at +1. Times ascend,
                        // so a later change replaces an earlier one; within a
                        // time the +1 wins over the -1, in either order. The
                        // -1 of the first change is what Redis holds.
                        for (row, diff) in changes {
                            let key = (row.entity, row.id);
                            let (values, old) = if diff > 0 {
                                (Some(row.values), None)
                            } else {
                                (None, Some(row.values))
                            };
                            match ready.entry(key) {
                                Entry::Vacant(entry) => {
                                    entry.insert(Ready {
                                        first: time,
                                        last: time,
                                        values,
                                        old,
                                    });
                                }
                                Entry::Occupied(mut entry) => {
                                    let ready = entry.get_mut();
                                    if old.is_some() && ready.first == time && ready.old.is_none() {
                                        ready.old = old;
                                    }
                                    if values.is_some() || ready.last != time {
                                        ready.last = time;
                                        ready.values = values;
                                    }
                                }
                            }
                        }
                    }
                    ready_at = frontier;
                }
                if writer.idle() && ready_at > sent_at {
                    let rows: Vec<RowWrite> = ready
                        .drain()
                        .map(|((entity, id), ready)| RowWrite {
                            entity,
                            id,
                            values: ready.values,
                            old: ready.old,
                        })
                        .collect();
                    if rows.is_empty() {
                        if let Some(cap) = held.as_mut() {
                            cap.downgrade(&ready_at);
                        }
                    } else {
                        writer.send(Job::Apply {
                            frontier: ready_at,
                            rows,
                            progress: None,
                        });
                    }
                    sent_at = ready_at;
                }
                let finished = frontiers[0].frontier().is_empty()
                    || source.final_frontier().is_some_and(|end| sent_at >= end);
                if finished && writer.idle() && sent_at >= ready_at {
                    held = None;
                }
            }
        });
        acks
    }
}

/// Handles of a progress stage.
#[derive(Debug, Clone, Default)]
pub struct ProgressStage {
    durable: Rc<RefCell<Option<ProgressRecord>>>,
    finished: Rc<std::cell::Cell<bool>>,
    settled: Rc<std::cell::Cell<bool>>,
}

impl ProgressStage {
    /// Bounded runs: every worker's rows before the final frontier are
    /// durable and (on worker 0) the progress record says so. The dataflow may
    /// be dropped from here on: what remains are retractions past the end of
    /// the log, which are never written.
    pub fn finished(&self) -> bool {
        self.finished.get()
    }

    /// Worker 0: no progress write is in flight and the record covers every
    /// frontier the sinks have acknowledged (a draining job may stop here).
    pub fn settled(&self) -> bool {
        self.settled.get()
    }

    /// The last progress record this worker wrote (worker 0 only).
    pub fn durable(&self) -> Option<ProgressRecord> {
        self.durable.borrow().clone()
    }
}

/// Records progress once every worker's sinks are durable.
///
/// `marks` are routed to worker 0; `acks` is the concatenation of every
/// sink's acknowledgements, whose frontier (seen identically on every
/// worker) passes `F` only once all rows before `F` are durable. When it
/// passes `F`, worker 0 writes the progress record for `F` with each
/// partition's last mark before `F` (seeded from `start`), then commits the
/// durable offsets to the consumer group. Every worker also observes the
/// freshness of the records it read (`append_times`).
#[allow(clippy::too_many_arguments)]
pub fn progress_stage<'scope>(
    marks: Stream<'scope, u64, Vec<PartitionMark>>,
    acks: Stream<'scope, u64, Vec<()>>,
    config: &RedisSinkConfig,
    start: Option<ProgressRecord>,
    source: SourceHandle,
    append_times: AppendTimes,
    committer: Option<OffsetCommitter>,
    metrics: SinkMetrics,
) -> ProgressStage {
    let scope = marks.scope();
    let index = scope.index();
    let mut builder = OperatorBuilder::new("ProgressStage".to_owned(), scope);
    let info = builder.operator_info();
    let mut marks_in = builder.new_input(marks, Exchange::new(|_: &PartitionMark| 0));
    let mut acks_in = builder.new_input(acks, Pipeline);
    let activator = scope.worker().sync_activator_for(info.address.to_vec());
    let mut writer = (index == 0).then(|| {
        Writer::spawn(
            "sfs-redis-progress".to_owned(),
            config.clone(),
            u64::MAX,
            metrics.clone(),
            activator,
        )
    });
    let stage = ProgressStage::default();
    let durable = Rc::clone(&stage.durable);
    let finished = Rc::clone(&stage.finished);
    let settled = Rc::clone(&stage.settled);
    let fv = config.features.version.clone();
    let floor = start.as_ref().map_or(0, |p| p.frontier_ms);

    builder.build_reschedule(move |_caps| {
        // Per partition: marks by time; the entry below the frontier is the one to record.
        let mut latest: BTreeMap<TopicPartition, BTreeMap<u64, PartitionMark>> = BTreeMap::new();
        if let Some(start) = &start {
            for p in &start.partitions {
                let mark = PartitionMark {
                    topic: p.topic.clone(),
                    partition: p.partition,
                    resume: p.resume,
                    durable_offset: p.durable_offset,
                };
                latest
                    .entry(TopicPartition::new(p.topic.clone(), p.partition))
                    .or_default()
                    .insert(0, mark);
            }
        }
        let mut written_at = floor;
        let mut in_flight: Option<ProgressRecord> = None;

        move |frontiers| {
            marks_in.for_each(|cap, data| {
                let time = *cap.least().expect("marks are sent under a capability");
                for mark in data.drain(..) {
                    let tp = TopicPartition::new(mark.topic.clone(), mark.partition);
                    latest.entry(tp).or_default().insert(time, mark);
                }
            });
            acks_in.for_each(|_, _| {});

            let now = wall_ms();
            let acked = target(&frontiers[1], &source);
            if let Some(acked) = acked {
                append_times.visible(acked, now, &metrics.freshness_seconds);
                if index == 0 && acked != u64::MAX {
                    metrics
                        .frontier_lag_seconds
                        .set((now - acked as i64).max(0) as f64 / 1000.0);
                }
            }

            let final_acked = source.final_frontier().is_some_and(|end| {
                end != u64::MAX && frontiers[1].frontier().first().is_none_or(|a| *a >= end)
            });
            let Some(writer) = writer.as_mut() else {
                finished.set(final_acked);
                return false;
            };
            while let Some(done) = writer.try_done() {
                if let Some(record) = in_flight.take() {
                    metrics.durable_frontier_ms.set(done.frontier as i64);
                    if let Some(committer) = &committer {
                        let offsets: Vec<_> = record
                            .partitions
                            .iter()
                            .map(|p| (p.topic.as_str(), p.partition, p.durable_offset))
                            .collect();
                        committer.commit(&offsets);
                    }
                    tracing::debug!(
                        frontier_ms = done.frontier,
                        applied = done.applied.progressed,
                        "progress recorded"
                    );
                    *durable.borrow_mut() = Some(record);
                }
            }
            let frontier = match (target(&frontiers[0], &source), acked) {
                (Some(m), Some(a)) => Some(m.min(a)),
                (None, a) => a,
                (m, None) if frontiers[1].frontier().is_empty() => m,
                _ => None,
            };
            if let Some(frontier) = frontier.filter(|f| *f > written_at && *f != u64::MAX) {
                if writer.idle() {
                    let mut partitions = Vec::with_capacity(latest.len());
                    for (tp, marks) in latest.iter_mut() {
                        // Keep only the last mark before the frontier, and later ones.
                        let later = marks.split_off(&frontier);
                        let before = std::mem::replace(marks, later);
                        if let Some((time, mark)) = before.into_iter().next_back() {
                            marks.insert(time, mark);
                        }
                        if let Some((_, mark)) = marks.range(..frontier).next_back() {
                            partitions.push(PartitionProgress {
                                topic: tp.topic.clone(),
                                partition: tp.partition,
                                resume: mark.resume,
                                durable_offset: mark.durable_offset,
                            });
                        }
                    }
                    let record = ProgressRecord {
                        frontier_ms: frontier,
                        feature_set_version: fv.clone(),
                        partitions,
                    };
                    let json =
                        serde_json::to_string(&record.partitions).expect("progress serializes");
                    writer.send(Job::Apply {
                        frontier,
                        rows: Vec::new(),
                        progress: Some(json),
                    });
                    in_flight = Some(record);
                    written_at = frontier;
                }
            }
            settled.set(writer.idle() && frontier.is_none_or(|f| f <= written_at || f == u64::MAX));
            if final_acked
                && writer.idle()
                && source.final_frontier().is_some_and(|end| written_at >= end)
            {
                finished.set(true);
            }
            // Stay alive until the last progress write lands.
            !writer.idle()
        }
    });
    stage
}
