//! Rows as of any time: the log replayed through the feature graph, bounded,
//! and a set of lookups ((entity, key) as of a time) answered by a
//! point-in-time join of the two collections ([`as_of_join`]). `sfs backfill` looks
//! up each transaction's and product view's entities as of its own time;
//! `sfs parity` looks up each served row as of the time it was served as.
//!
//! The dataflow, per worker:
//! - "Events": the log's events, at their event time quantized to the tick,
//!   into [`dataflow::build_features`], the graph the stream job runs.
//! - "Lookups": per lookup at F, one record per key ((entity, key), lookup)
//!   at F.
//! - "AsOf" ([`as_of_join`]): the rows and the lookups, both routed by key;
//!   its output at F is each lookup's rows as of F: the rows accumulated over
//!   the times `< F`.
//! - "Collect": sends the rows found to the caller's thread, then the
//!   frontier.
//!
//! The caller's thread hands each lookup, in order, to a callback once every
//! worker's frontier has passed its time.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use differential_dataflow::input::Input;
use differential_dataflow::{AsCollection, VecCollection};
use operators::window::{key_hash, FxBuildHasher};
use smallvec::SmallVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::ProbeHandle;

use dataflow::{build_features, GraphConfig};
use schemas::features::{FeatureRow, Value};
use schemas::{FeatureSet, Key};

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
    /// (entity index, key) per row to find.
    pub keys: Vec<(u8, Key)>,
}

/// The index of the first event of `log` at or after `as_of` (quantized):
/// where a lookup at `as_of` is fed.
pub fn feed_position(log: &EventLog, graph: &GraphConfig, as_of: u64) -> usize {
    log.events
        .partition_point(|(_, e)| graph.quantize(e.event_time()) < as_of)
}

/// A row found for a lookup: (lookup, entity, values).
type Found = (u64, u8, Arc<[Value]>);

/// From the workers to the caller's thread.
enum Note {
    /// Rows found: (lookup, entity, values), the row of `entity` as of
    /// `lookup`'s time.
    Rows(Vec<Found>),
    /// Worker `worker` will send nothing more before `frontier` (`None`: done).
    Frontier {
        worker: usize,
        frontier: Option<u64>,
    },
}

/// Events fed per advance of the inputs' time.
const FEED_BATCH: usize = 16_384;

/// Answers `lookups` (ordered by `as_of`, then `feed_at`) over `log` with
/// `workers` threads. `answer(i, rows)` is called for each lookup in order,
/// `rows` indexed by entity (`None`: no row as of its time, or not asked).
/// `answered()` is called after each with the number answered so far.
pub fn rows_as_of(
    log: Arc<EventLog>,
    set: Arc<FeatureSet>,
    graph: GraphConfig,
    workers: usize,
    lookups: Arc<Vec<Lookup>>,
    mut answer: impl FnMut(usize, Vec<Option<FeatureRow>>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    debug_assert!(lookups.windows(2).all(|w| w[0].as_of <= w[1].as_of));
    let workers = workers.max(1);
    let (tx, rx) = mpsc::channel::<Note>();
    let done = Arc::new(AtomicBool::new(false));
    let guards = {
        let (log, lookups, set, done) = (
            Arc::clone(&log),
            Arc::clone(&lookups),
            Arc::clone(&set),
            Arc::clone(&done),
        );
        let tx = std::sync::Mutex::new(tx);
        let config = if workers > 1 {
            timely::Config::process(workers)
        } else {
            timely::Config::thread()
        };
        timely::execute(config, move |worker| {
            let tx = tx.lock().expect("sender").clone();
            worker_main(worker, &log, &lookups, &set, &graph, tx, &done);
        })
        .map_err(|e| anyhow::anyhow!("timely: {e}"))?
    };

    // Collect rows and frontiers; answer lookups in order as every worker's
    // frontier passes their time.
    let mut rows: HashMap<(u64, u8), Arc<[Value]>, FxBuildHasher> = HashMap::default();
    let mut frontiers: Vec<Option<u64>> = vec![Some(0); workers];
    let mut next = 0usize;
    let entities = set.entities.clone();
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
                Note::Rows(found) => {
                    for (lookup, entity, values) in found {
                        rows.insert((lookup, entity), values);
                    }
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
                let mut found = vec![None; entities.len()];
                for (entity, key) in &lookup.keys {
                    if let Some(values) = rows.remove(&(next as u64, *entity)) {
                        found[*entity as usize] = Some(FeatureRow {
                            entity: Arc::clone(&entities[*entity as usize]),
                            id: key.to_string(),
                            as_of_ms: lookup.as_of as i64,
                            values: values.to_vec(),
                        });
                    }
                }
                answer(next, found)?;
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

/// One worker: worker 0 feeds the log and the lookups; every worker runs its
/// part of the graph, the join and the collection, until the caller has
/// every answer.
fn worker_main(
    worker: &mut timely::worker::Worker,
    log: &EventLog,
    lookups: &[Lookup],
    set: &FeatureSet,
    graph: &GraphConfig,
    tx: mpsc::Sender<Note>,
    done: &AtomicBool,
) {
    let index = worker.index();
    let probe = ProbeHandle::new();
    let (mut events, mut lookups_in) = worker.dataflow::<u64, _, _>(|scope| {
        let (events_in, events) = scope.new_collection::<dataflow::SourceEvent, isize>();
        let (lookups_in, lookups) = scope.new_collection::<(RowKey, u64), isize>();
        let rows = build_features(events, set, graph).map(|row| ((row.entity, row.id), row.values));
        let mut reported = Some(0u64);
        as_of_join(rows, lookups).inner.probe_with(&probe).sink(
            Pipeline,
            "Collect",
            move |(input, frontier)| {
                // The join emits a lookup's rows at its time, before its
                // frontier passes that time: forward them, then the frontier.
                let mut found = Vec::new();
                input.for_each(|_, data| {
                    found.extend(data.drain(..).map(|(row, _, diff)| {
                        debug_assert_eq!(diff, 1, "one row per key as of a time");
                        row
                    }));
                });
                if !found.is_empty() {
                    let _ = tx.send(Note::Rows(found));
                }
                let bound = frontier.frontier().first().copied();
                if bound != reported {
                    reported = bound;
                    let _ = tx.send(Note::Frontier {
                        worker: index,
                        frontier: bound,
                    });
                }
            },
        );
        (events_in, lookups_in)
    });

    // Every worker walks the whole log and feeds its share of the events
    // and lookups (every `peers`-th), advancing at the same points.
    let peers = worker.peers();
    let mut next = 0usize;
    let mut feed =
        |upto: usize, lookups_in: &mut differential_dataflow::input::InputSession<_, _, _>| {
            while let Some(lookup) = lookups.get(next).filter(|l| l.feed_at <= upto) {
                if next % peers == index {
                    for (entity, key) in &lookup.keys {
                        let record = ((*entity, key.clone()), next as u64);
                        lookups_in.update_at(record, lookup.as_of, 1);
                    }
                }
                next += 1;
            }
        };
    // Each event goes in at its own time, but the inputs advance only once
    // per batch: one round of progress tracking covers a batch's thousands
    // of ticks, where the stream job pays one per tick.
    let mut time = 0u64;
    let mut previous = 0u64;
    for (i, (source, event)) in log.events.iter().enumerate() {
        feed(i, &mut lookups_in);
        time = graph.quantize(event.event_time()).max(time);
        if i % peers == index {
            events.update_at((*source, event.clone()), time, 1);
        }
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

/// An entity's key: (entity index, key).
type RowKey = (u8, Key);

/// A change of a key's row: `((key, values), diff)`.
type RowChange = ((RowKey, Arc<[Value]>), isize);

/// The point-in-time join: for each lookup `((entity, key), lookup)` at time
/// F, the row `rows` held for `(entity, key)` accumulated over the times
/// `< F` (strictly before: an event at F never sees itself), output at F as
/// `(lookup, entity, values)`; nothing when the key had no row.
///
/// Both inputs are routed by the key's hash, so each worker keeps its keys'
/// rows: the current row per key only. Row changes are applied in time
/// order as the rows' frontier passes them, and a lookup at F is answered
/// once the rows are complete up to F and no lookup at F can still arrive.
/// So its memory is one row per live key plus what is in flight, where an
/// arrangement of `rows` joined with `join_core` keeps (and merges) every
/// row change up to the join's frontier. That join (`arrange_by_key` of the
/// rows and of the lookups, then `join_core`) took half of a backfill's
/// time; this operator is its specialization to lookups that are events
/// (each asked once, at one time) rather than a collection that persists.
///
/// `rows` must hold at most one row per key at any time (the feature graph's
/// contract); a violation panics.
pub fn as_of_join<'scope>(
    rows: VecCollection<'scope, u64, (RowKey, Arc<[Value]>), isize>,
    lookups: VecCollection<'scope, u64, (RowKey, u64), isize>,
) -> VecCollection<'scope, u64, Found, isize> {
    let route_rows =
        Exchange::new(|((key, _), _, _): &((RowKey, Arc<[Value]>), u64, isize)| key_hash(&key.1));
    let route_lookups =
        Exchange::new(|((key, _), _, _): &((RowKey, u64), u64, isize)| key_hash(&key.1));
    rows.inner
        .binary_frontier(
            lookups.inner,
            route_rows,
            route_lookups,
            "AsOf",
            |_initial, _info| {
                let mut current: HashMap<RowKey, Arc<[Value]>, FxBuildHasher> = HashMap::default();
                // Received row changes and lookups, by time.
                let mut changes: BTreeMap<u64, Vec<RowChange>> = BTreeMap::new();
                let mut asked: BTreeMap<u64, Vec<(RowKey, u64)>> = BTreeMap::new();
                // Held iff a lookup is pending, at a time <= all of them.
                let mut held: Option<Capability<u64>> = None;
                let mut touched: HashMap<RowKey, RowChanges, FxBuildHasher> = HashMap::default();
                move |(rows, rows_frontier), (lookups, lookups_frontier), output| {
                    rows.for_each(|_, data| {
                        for (record, time, diff) in data.drain(..) {
                            changes.entry(time).or_default().push((record, diff));
                        }
                    });
                    let port = output.output_index();
                    lookups.for_each(|cap, data| {
                        let Some(&at) = cap.least() else { return };
                        if held.as_ref().is_none_or(|h| at < *h.time()) {
                            held = cap.retain_least(port);
                        }
                        for (lookup, time, diff) in data.drain(..) {
                            assert!(diff > 0, "AsOf: lookups are events (diff {diff})");
                            let at = asked.entry(time).or_default();
                            for _ in 1..diff {
                                at.push(lookup.clone());
                            }
                            at.push(lookup);
                        }
                    });
                    loop {
                        let next_lookup = asked.keys().next().copied();
                        let next_change = changes.keys().next().copied();
                        match (next_lookup, next_change) {
                            // Lookups at F go before the changes at F.
                            (Some(at), change) if change.is_none_or(|t| at <= t) => {
                                // Complete when no change before F and no
                                // lookup at F can still arrive.
                                if rows_frontier.less_than(&at) || lookups_frontier.less_equal(&at)
                                {
                                    break;
                                }
                                let cap = held.as_mut().expect("held while lookups are pending");
                                cap.downgrade(&at);
                                let mut session = output.session(cap);
                                for ((entity, key), lookup) in asked.remove(&at).unwrap_or_default()
                                {
                                    if let Some(values) = current.get(&(entity, key)) {
                                        session.give(((lookup, entity, values.clone()), at, 1));
                                    }
                                }
                            }
                            (_, Some(t)) => {
                                // Applied once complete, and once no lookup
                                // at or before `t` can still arrive.
                                if rows_frontier.less_equal(&t) || lookups_frontier.less_equal(&t) {
                                    break;
                                }
                                let batch = changes.remove(&t).unwrap_or_default();
                                apply(&mut current, &mut touched, batch);
                            }
                            _ => break,
                        }
                    }
                    match asked.keys().next() {
                        Some(&at) => {
                            if let Some(cap) = held.as_mut() {
                                cap.downgrade(&at);
                            }
                        }
                        None => held = None,
                    }
                }
            },
        )
        .as_collection()
}

/// The changes to one key's row at one time, with its row before them.
type RowChanges = SmallVec<[(Arc<[Value]>, isize); 3]>;

/// Applies one time's row changes to `current`.
fn apply(
    current: &mut HashMap<RowKey, Arc<[Value]>, FxBuildHasher>,
    touched: &mut HashMap<RowKey, RowChanges, FxBuildHasher>,
    batch: Vec<RowChange>,
) {
    for ((key, values), diff) in batch {
        let changes = match touched.entry(key) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let mut changes = RowChanges::new();
                if let Some(row) = current.remove(entry.key()) {
                    changes.push((row, 1));
                }
                entry.insert(changes)
            }
        };
        // The graph shares a row between its `+1` and the next `-1`.
        match changes
            .iter_mut()
            .find(|(row, _)| Arc::ptr_eq(row, &values) || *row == values)
        {
            Some((_, count)) => *count += diff,
            None => changes.push((values, diff)),
        }
    }
    for (key, mut changes) in touched.drain() {
        changes.retain(|(_, count)| *count != 0);
        match changes.pop() {
            None => {}
            Some((row, 1)) if changes.is_empty() => {
                current.insert(key, row);
            }
            Some(_) => panic!(
                "AsOf: the rows of {key:?} do not accumulate to at most one row: {} more",
                changes.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::Range;
    use std::sync::Mutex;

    use differential_dataflow::input::InputSession;
    use timely::dataflow::operators::Inspect;

    use super::*;

    /// xorshift64*: a small deterministic generator for the histories.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
        }
    }

    type Update = ((u8, String), Vec<i64>, u64, isize);
    /// A lookup of (entity, key) at a time.
    type Asked = ((u8, String), u64);

    /// A random history of rows, at most one per key at any time: per key,
    /// creations, changes (`-old`, `+new` at one time, in either order),
    /// deletions and no-op pairs (`+r`, `-r`); and random lookups.
    fn history(seed: u64) -> (Vec<Update>, Vec<Asked>) {
        let mut rng = Rng(seed | 1);
        let mut updates = Vec::new();
        for entity in 0..2u8 {
            for k in 0..6 {
                let key = (entity, format!("key-{k}"));
                let mut row: Option<Vec<i64>> = None;
                let mut time = rng.below(5);
                for _ in 0..rng.below(12) {
                    time += 1 + rng.below(4);
                    let next = match rng.below(5) {
                        0 => None,
                        _ => Some(vec![rng.below(3) as i64, time as i64]),
                    };
                    let mut changes = Vec::new();
                    if let Some(old) = row.take() {
                        changes.push((key.clone(), old, time, -1));
                    }
                    if let Some(new) = next.clone() {
                        changes.push((key.clone(), new, time, 1));
                    }
                    if rng.below(4) == 0 {
                        let noise = vec![-1, rng.below(3) as i64];
                        changes.push((key.clone(), noise.clone(), time, 1));
                        changes.push((key.clone(), noise, time, -1));
                    }
                    if rng.below(2) == 0 {
                        changes.reverse();
                    }
                    updates.extend(changes);
                    row = next;
                }
            }
        }
        let lookups = (0..40)
            .map(|_| {
                let key = (rng.below(2) as u8, format!("key-{}", rng.below(7)));
                (key, rng.below(50))
            })
            .collect();
        (updates, lookups)
    }

    /// The row of `key` accumulated over times `< at`, by brute force.
    fn brute_force(updates: &[Update], key: &(u8, String), at: u64) -> Option<Vec<i64>> {
        let mut counts: Vec<(Vec<i64>, isize)> = Vec::new();
        for (k, row, time, diff) in updates {
            if k == key && *time < at {
                match counts.iter_mut().find(|(r, _)| r == row) {
                    Some((_, c)) => *c += diff,
                    None => counts.push((row.clone(), *diff)),
                }
            }
        }
        let mut live: Vec<_> = counts.into_iter().filter(|(_, c)| *c != 0).collect();
        assert!(live.len() <= 1 && live.iter().all(|(_, c)| *c == 1));
        live.pop().map(|(r, _)| r)
    }

    fn values(row: &[i64]) -> Arc<[Value]> {
        row.iter().map(|v| Value::Int(*v)).collect()
    }

    /// Runs the join over `updates` and `lookups` on `workers` threads, the
    /// inputs fed in shuffled batches on every worker; returns, per lookup
    /// index, the row found and the time it was output at.
    fn run(
        workers: usize,
        seed: u64,
        updates: &[Update],
        lookups: &[Asked],
    ) -> Vec<Option<(Vec<i64>, u64)>> {
        let found = Arc::new(Mutex::new(vec![None; lookups.len()]));
        let (updates, lookups, out) = (updates.to_vec(), lookups.to_vec(), Arc::clone(&found));
        timely::execute(timely::Config::process(workers), move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let out = Arc::clone(&out);
            let probe = ProbeHandle::new();
            let (mut rows_in, mut lookups_in) = worker.dataflow::<u64, _, _>(|scope| {
                let (rows_in, rows) = scope.new_collection::<(RowKey, Arc<[Value]>), isize>();
                let (lookups_in, asked) = scope.new_collection::<(RowKey, u64), isize>();
                as_of_join(rows, asked)
                    .inner
                    .inspect(move |((lookup, _, values), time, diff)| {
                        assert_eq!(*diff, 1);
                        let row = values
                            .iter()
                            .map(|v| match v {
                                Value::Int(i) => *i,
                                Value::Float(_) => unreachable!(),
                            })
                            .collect();
                        let mut found = out.lock().unwrap();
                        assert!(found[*lookup as usize].is_none(), "answered twice");
                        found[*lookup as usize] = Some((row, *time));
                    })
                    .probe_with(&probe);
                (rows_in, lookups_in)
            });
            // This worker's share, fed time by time in a shuffled order. By
            // the seed, the lookups run ahead of the rows (all of them
            // before the first row), or behind them, or in step.
            let mut rng = Rng(seed ^ ((index as u64 + 1) * 0x9e37_79b9));
            let horizon = 60u64;
            let feed_lookups = |lookups_in: &mut InputSession<_, _, _>, times: Range<u64>| {
                for (i, (key, at)) in lookups.iter().enumerate() {
                    if i % peers == index && times.contains(at) {
                        let key = (key.0, Key::from(key.1.as_str()));
                        lookups_in.update_at((key, i as u64), *at, 1);
                    }
                }
                lookups_in.advance_to(times.end);
                lookups_in.flush();
            };
            let lookups_ahead = seed % 3 == 1;
            let rows_ahead = seed % 3 == 2;
            if lookups_ahead {
                feed_lookups(&mut lookups_in, 0..horizon);
            }
            for time in 0..horizon {
                let mut mine: Vec<_> = updates
                    .iter()
                    .enumerate()
                    .filter(|(i, u)| i % peers == index && u.2 == time)
                    .map(|(_, u)| u.clone())
                    .collect();
                for i in (1..mine.len()).rev() {
                    mine.swap(i, rng.below(i as u64 + 1) as usize);
                }
                for (key, row, t, diff) in mine {
                    let key = (key.0, Key::from(key.1.as_str()));
                    rows_in.update_at((key, values(&row)), t, diff);
                    if rng.below(3) == 0 {
                        rows_in.flush();
                        worker.step();
                    }
                }
                rows_in.advance_to(time + 1);
                rows_in.flush();
                if !lookups_ahead && !rows_ahead {
                    feed_lookups(&mut lookups_in, time..time + 1);
                }
                worker.step();
            }
            if rows_ahead {
                feed_lookups(&mut lookups_in, 0..horizon);
            }
            rows_in.close();
            lookups_in.close();
            while worker.step_or_park(None) {}
        })
        .expect("timely runs");
        let found = found.lock().unwrap().clone();
        found
    }

    #[test]
    fn lookups_see_the_rows_accumulated_strictly_before_their_time() {
        for seed in 1..=24u64 {
            let (updates, lookups) = history(seed);
            for workers in [1, 2] {
                let found = run(workers, seed, &updates, &lookups);
                for (i, (key, at)) in lookups.iter().enumerate() {
                    let expected = brute_force(&updates, key, *at).map(|row| (row, *at));
                    assert_eq!(
                        found[i], expected,
                        "seed {seed}, {workers} workers: lookup {i} of {key:?} at {at}"
                    );
                }
            }
        }
    }
}
