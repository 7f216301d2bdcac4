//! Rows as of any time: the log replayed through the feature graph, bounded,
//! and a set of lookups ((entity, key) as of a time) answered by the graph
//! itself ([`dataflow::lookup_features`]). `sfs backfill` looks up each
//! transaction's and product view's entities as of its own time; `sfs
//! parity` looks up each served row as of the time it was served as.
//!
//! The dataflow, per worker:
//! - "Events": the whole log (every worker holds it, with its keys interned
//!   per entity: [`KeyIds`](crate::keys::KeyIds), and is fed every event, by its number), at
//!   event time quantized to the tick. Each entity's "Features(entity)"
//!   operator keeps the events of the key ids its worker owns and projects
//!   them itself, into the windows and folds the stream job runs
//!   ([`dataflow::compile`]): no record crosses workers.
//! - "Lookups": per lookup at F, one record per key ((entity, key id),
//!   lookup) at F, fed on the key's worker, into the entity's operator.
//!   Where the stream job's operator emits every row change, this one
//!   answers each lookup at F with the key's row accumulated over the times
//!   `< F`, computed from its windows when asked, key by key
//!   ([`operators::aggregate::windowed_lookup`]).
//! - "Collect": once the frontier passes some lookups, sends their rows to
//!   the caller's thread in one flat buffer, in lookup order, then the
//!   frontier.
//!
//! The caller's thread hands each lookup, in order, to a callback once every
//! worker's frontier has passed its time.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use differential_dataflow::input::Input;
use operators::aggregate::WORK_PER_ACTIVATION;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

use dataflow::{lookup_features, worker_of, Found, GraphConfig, RowKey};
use schemas::features::{FeatureRow, Value, ValueKind};
use schemas::FeatureSet;
use smallvec::SmallVec;

use crate::keys::Replayed;
use crate::log::EventLog;

/// The rows of some entities as of one time.
#[derive(Debug, Clone)]
pub struct Lookup {
    /// The as-of time F (ms): the rows aggregate events at times `< F`.
    pub as_of: u64,
    /// The lookup goes into the dataflow just before `log.events[feed_at]`
    /// (`events.len()`: after the last): no event before it may be later
    /// than `as_of` after quantization.
    pub feed_at: usize,
    /// (entity index, key id in the replay's [`KeyIds`](crate::keys::KeyIds)) per row to find
    /// (inline: no allocation per lookup of up to two entities).
    pub keys: SmallVec<[RowKey; 2]>,
}

/// The index of the first event of `log` at or after `as_of` (quantized):
/// where a lookup at `as_of` is fed.
pub fn feed_position(log: &EventLog, graph: &GraphConfig, as_of: u64) -> usize {
    log.events
        .partition_point(|(_, e)| graph.quantize(e.event_time()) < as_of)
}

/// From the workers to the caller's thread.
enum Note {
    /// Rows found, ordered by lookup then entity: each lookup's rows from
    /// this worker, of the lookups before the frontier its next note
    /// reports, not yet sent.
    Rows { worker: usize, rows: Rows },
    /// Worker `worker` will send nothing more before `frontier` (`None`: done).
    Frontier {
        worker: usize,
        frontier: Option<u64>,
    },
}

/// Rows found, flat: `(lookup, entity, length)` per row, and the rows'
/// values one after the other, as their bits ([`Value::to_bits`]).
#[derive(Default)]
struct Rows {
    heads: Vec<(u64, u8, u32)>,
    values: Vec<u64>,
}

/// A worker's rows being read in order: the next row is `heads[row]`, its
/// values at `values[value..]`.
struct Reading {
    rows: Rows,
    row: usize,
    value: usize,
}

/// Events fed per advance of the inputs' time.
const FEED_BATCH: usize = 65_536;

/// Answers `lookups` (ordered by `as_of`, then `feed_at`) over the log of
/// `replay` with `workers` threads. `answer(i, rows)` is called for each lookup in order,
/// `rows` indexed by entity (`None`: no row as of its time, or not asked);
/// the callback may take rows out, and the vector is refilled for the next.
pub fn rows_as_of(
    replay: Replayed,
    set: Arc<FeatureSet>,
    graph: GraphConfig,
    workers: usize,
    lookups: Arc<Vec<Lookup>>,
    mut answer: impl FnMut(usize, &mut Vec<Option<FeatureRow>>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    debug_assert!(lookups.windows(2).all(|w| w[0].as_of <= w[1].as_of));
    anyhow::ensure!(
        u32::try_from(replay.log.events.len()).is_ok(),
        "a replay holds at most {} events in memory ({} given)",
        u32::MAX,
        replay.log.events.len()
    );
    let workers = workers.max(1);
    let (tx, rx) = mpsc::channel::<Note>();
    // Per worker, the row buffers read, given back to be filled again.
    let (returns, spares): (Vec<_>, Vec<_>) = (0..workers)
        .map(|_| {
            let (give, take) = mpsc::channel::<Rows>();
            (give, Some(take))
        })
        .unzip();
    let done = Arc::new(AtomicBool::new(false));
    let keys = Arc::clone(&replay.keys);
    let guards = {
        let (lookups, set, done) = (Arc::clone(&lookups), Arc::clone(&set), Arc::clone(&done));
        let tx = std::sync::Mutex::new(tx);
        let spares = std::sync::Mutex::new(spares);
        let config = if workers > 1 {
            timely::Config::process(workers)
        } else {
            timely::Config::thread()
        };
        timely::execute(config, move |worker| {
            let tx = tx.lock().expect("sender").clone();
            let spare = spares.lock().expect("spares")[worker.index()]
                .take()
                .expect("one worker per index");
            worker_main(worker, &replay, &lookups, &set, &graph, (tx, spare), &done);
        })
        .map_err(|e| anyhow::anyhow!("timely: {e}"))?
    };

    // Collect rows and frontiers; answer lookups in order as every worker's
    // frontier passes their time.
    let mut frontiers: Vec<Option<u64>> = vec![Some(0); workers];
    let mut next = 0usize;
    let entities = set.entities.clone();
    // Per entity, its values' kinds, to read the bits rows come as.
    let kinds: Vec<Vec<ValueKind>> = entities
        .iter()
        .map(|e| e.features.iter().map(|f| f.kind()).collect())
        .collect();
    // Per worker, its rows not yet read, in lookup order.
    let mut pending: Vec<VecDeque<Reading>> = (0..workers).map(|_| VecDeque::new()).collect();
    // The rows handed to `answer`, refilled in place from lookup to lookup
    // (no allocation per row); `spare` keeps those of entities not found.
    let mut found: Vec<Option<FeatureRow>> = vec![None; entities.len()];
    let mut spare: Vec<Option<FeatureRow>> = vec![None; entities.len()];
    let mut have: Vec<bool> = vec![false; entities.len()];
    let result = (|| {
        while next < lookups.len() {
            let note = match rx.recv_timeout(Duration::from_secs(60)) {
                Ok(note) => note,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    anyhow::bail!("the dataflow stopped before every lookup was answered")
                }
            };
            match note {
                Note::Rows { worker, rows } => {
                    pending[worker].push_back(Reading {
                        rows,
                        row: 0,
                        value: 0,
                    });
                    continue;
                }
                Note::Frontier { worker, frontier } => frontiers[worker] = frontier,
            }
            let until = frontiers
                .iter()
                .map(|f| f.unwrap_or(u64::MAX))
                .min()
                .unwrap_or(u64::MAX);
            while let Some(lookup) = lookups.get(next).filter(|l| l.as_of < until) {
                // This lookup's rows: at the head of the workers' rows, as a
                // worker sends a lookup's rows before its frontier passes it.
                have.iter_mut().for_each(|h| *h = false);
                for (worker, queue) in pending.iter_mut().enumerate() {
                    while let Some(reading) = queue.front_mut() {
                        let Some(&(at, entity, len)) = reading.rows.heads.get(reading.row) else {
                            let mut rows = queue.pop_front().expect("read").rows;
                            rows.heads.clear();
                            rows.values.clear();
                            let _ = returns[worker].send(rows);
                            continue;
                        };
                        debug_assert!(at as usize >= next, "rows come in lookup order");
                        if at as usize != next {
                            break;
                        }
                        let values = &reading.rows.values[reading.value..][..len as usize];
                        reading.row += 1;
                        reading.value += len as usize;
                        // A row is found only for an entity the lookup asked for.
                        let Some(&(_, id)) = lookup.keys.iter().find(|(e, _)| *e == entity) else {
                            continue;
                        };
                        let key = keys.key(entity, id);
                        let entity = entity as usize;
                        have[entity] = true;
                        let row = found[entity].get_or_insert_with(|| {
                            spare[entity].take().unwrap_or_else(|| FeatureRow {
                                entity: Arc::clone(&entities[entity]),
                                id: String::new(),
                                as_of_ms: 0,
                                values: Vec::new(),
                            })
                        });
                        row.id.clear();
                        row.id.push_str(key);
                        row.as_of_ms = lookup.as_of as i64;
                        row.values.clear();
                        row.values.extend(
                            values
                                .iter()
                                .zip(&kinds[entity])
                                .map(|(&bits, &kind)| Value::from_bits(kind, bits)),
                        );
                    }
                }
                for (entity, slot) in found.iter_mut().enumerate() {
                    if !have[entity] {
                        if let Some(row) = slot.take() {
                            spare[entity] = Some(row);
                        }
                    }
                }
                answer(next, &mut found)?;
                next += 1;
            }
        }
        Ok(())
    })();
    done.store(true, Ordering::SeqCst);
    drop(rx);
    for joined in guards.join() {
        joined.map_err(|e| anyhow::anyhow!("dataflow worker panicked: {e}"))?;
    }
    result
}

/// A worker's "Collect": the rows found and not yet sent to the caller's
/// thread, and the buffers it has read and given back.
struct Collector {
    worker: usize,
    tx: mpsc::Sender<Note>,
    spare: mpsc::Receiver<Rows>,
    /// The rows received, flat: their values one after the other (a row's
    /// values are copied once, not its whole inline vector).
    staged: Vec<Staged>,
    values: Vec<u64>,
    /// Scratch: (lookup, entity, index into `staged`) of the rows to send.
    order: Vec<(u64, u8, u32)>,
    /// The frontier last sent.
    reported: Option<u64>,
}

/// A row received: its time, lookup, entity and values, at
/// `values[start..][..len]` of the [`Collector`].
struct Staged {
    time: u64,
    lookup: u64,
    entity: u8,
    start: usize,
    len: usize,
}

impl Collector {
    fn receive(&mut self, data: &mut Vec<(Found, u64, isize)>) {
        for ((lookup, entity, row), time, diff) in data.iter() {
            debug_assert_eq!(*diff, 1, "one row per key as of a time");
            self.staged.push(Staged {
                time: *time,
                lookup: *lookup,
                entity: *entity,
                start: self.values.len(),
                len: row.len(),
            });
            self.values.extend_from_slice(row);
        }
        data.clear();
    }

    /// The lookup operators emit a lookup's rows at its time, before their
    /// frontier passes that time: once it has (`bound`), sends them, in
    /// lookup order, then the frontier.
    fn advance(&mut self, bound: Option<u64>) {
        if bound == self.reported {
            return;
        }
        self.reported = bound;
        let complete = |time: u64| bound.is_none_or(|b| time < b);
        self.order.clear();
        self.order.extend(
            self.staged
                .iter()
                .enumerate()
                .filter(|(_, row)| complete(row.time))
                .map(|(i, row)| (row.lookup, row.entity, i as u32)),
        );
        if !self.order.is_empty() {
            self.order.sort_unstable();
            // A buffer the caller has read, emptied, if any: no fresh
            // memory per batch.
            let mut rows = self.spare.try_recv().unwrap_or_default();
            rows.heads.reserve(self.order.len());
            for &(lookup, entity, i) in &self.order {
                let row = &self.staged[i as usize];
                rows.heads.push((lookup, entity, row.len as u32));
                rows.values
                    .extend_from_slice(&self.values[row.start..][..row.len]);
            }
            // Keep the rows not sent, their values moved to the front.
            let mut kept = 0;
            let values = &mut self.values;
            self.staged.retain_mut(|row| {
                if complete(row.time) {
                    return false;
                }
                values.copy_within(row.start..row.start + row.len, kept);
                row.start = kept;
                kept += row.len;
                true
            });
            values.truncate(kept);
            let _ = self.tx.send(Note::Rows {
                worker: self.worker,
                rows,
            });
        }
        let _ = self.tx.send(Note::Frontier {
            worker: self.worker,
            frontier: bound,
        });
    }
}

/// One worker: feeds its share of the log and the lookups, and runs its
/// part of the graph and the collection until the caller has every answer.
fn worker_main(
    worker: &mut timely::worker::Worker,
    replay: &Replayed,
    lookups: &[Lookup],
    set: &FeatureSet,
    graph: &GraphConfig,
    (tx, spare): (mpsc::Sender<Note>, mpsc::Receiver<Rows>),
    done: &AtomicBool,
) {
    let index = worker.index();
    let probe = ProbeHandle::new();
    let (mut events, mut lookups_in) = worker.dataflow::<u64, _, _>(|scope| {
        // Events are fed by their number in the log, which every worker holds.
        let (events_in, events) = scope.new_collection::<u32, isize>();
        let replay = Rc::new(replay.clone());
        let (lookups_in, lookups) = scope.new_collection::<(RowKey, u64), isize>();
        let mut collect = Collector {
            worker: index,
            tx,
            spare,
            staged: Vec::new(),
            values: Vec::new(),
            order: Vec::new(),
            reported: Some(0),
        };
        lookup_features(events, replay, lookups, set, graph, WORK_PER_ACTIVATION)
            .inner
            .probe_with(&probe)
            .sink(Pipeline, "Collect", move |(input, frontier)| {
                input.for_each(|_, data| collect.receive(data));
                collect.advance(frontier.frontier().first().copied());
            });
        (events_in, lookups_in)
    });

    // Every worker walks the whole log and feeds every event (the graph
    // keeps the records of this worker's keys) and the lookups of its keys,
    // advancing at the same points: no record crosses workers.
    let peers = worker.peers();
    let mut next = 0usize;
    let mut feed =
        |upto: usize, lookups_in: &mut differential_dataflow::input::InputSession<_, _, _>| {
            while let Some(lookup) = lookups.get(next).filter(|l| l.feed_at <= upto) {
                for &key in &lookup.keys {
                    if worker_of(&key.1, peers) == index {
                        lookups_in.update_at((key, next as u64), lookup.as_of, 1);
                    }
                }
                next += 1;
            }
        };
    // Each event goes in at its own time, but the inputs advance only once
    // per batch: one round of progress tracking covers a batch's thousands
    // of ticks, where the stream job pays one per tick, and the lookup
    // operators visit each key once per batch.
    let mut time = 0u64;
    let mut previous = 0u64;
    for (i, (_, event)) in replay.log.events.iter().enumerate() {
        feed(i, &mut lookups_in);
        time = graph.quantize(event.event_time()).max(time);
        events.update_at(i as u32, time, 1);
        if i % FEED_BATCH == FEED_BATCH - 1 {
            events.advance_to(time);
            lookups_in.advance_to(time);
            events.flush();
            lookups_in.flush();
            // Let the dataflow finish the batch before last: one batch in
            // flight, memory bounded.
            while probe.less_than(&previous) && !done.load(Ordering::Relaxed) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
            previous = time;
        }
    }
    feed(usize::MAX, &mut lookups_in);
    events.close();
    lookups_in.close();
    while !done.load(Ordering::Relaxed) && worker.step_or_park(Some(Duration::from_millis(10))) {}
    // The caller has every answer: what remains are retractions past the
    // end of the log. Stop instead of draining them.
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
}
