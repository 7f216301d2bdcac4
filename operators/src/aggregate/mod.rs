//! Windowed aggregates: per-key rows of aggregates over several sliding
//! windows at once (`WindowedAggregate`), built from the single-window
//! aggregates in [`functions`] and the window primitive [`WindowStore`].

pub mod functions;

pub use functions::{Aggregate, Count, DistinctCount, LastTime, Max, Min, Mode, Moments, Sum};

use std::collections::BTreeMap;
use std::hash::Hash;
use std::marker::PhantomData;

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;
use timely::ExchangeData;

use crate::window::{key_hash, WindowFold, WindowStore};

/// Units of work (values entering or leaving windows) one activation of a
/// windowed aggregate does before yielding, so progress keeps flowing.
pub const WORK_PER_ACTIVATION: usize = 1 << 16;

/// A per-key fold over several windows that reports a row.
///
/// The windows are those passed to [`WindowedAggregate::windowed_aggregate`],
/// by index. A value enters every window at its time and leaves window `w`
/// `windows[w]` later; see [`WindowFold`].
pub trait RowAggregate<V>: WindowFold<V> + 'static {
    /// The row reported for a key with at least one value in some window.
    type Row: Clone + PartialEq + 'static;
    /// The current row.
    fn row(&self) -> Self::Row;
    /// Writes the current row into `row`, reusing its allocation if it can.
    fn row_into(&self, row: &mut Self::Row) {
        *row = self.row();
    }
}

/// The same aggregate `A` over every window: the row is one output per window.
#[derive(Debug, Clone)]
pub struct PerWindow<A>(pub Vec<A>);

impl<A> Default for PerWindow<A> {
    fn default() -> Self {
        PerWindow(Vec::new())
    }
}

impl<V, A: Aggregate<V>> WindowFold<V> for PerWindow<A> {
    #[inline]
    fn enter(&mut self, window: usize, value: &V) {
        if self.0.len() <= window {
            self.0.resize_with(window + 1, A::default);
        }
        self.0[window].insert(value);
    }
    #[inline]
    fn leave(&mut self, window: usize, value: &V) {
        self.0[window].retract(value);
    }
}

impl<V: 'static, A: Aggregate<V> + 'static> RowAggregate<V> for PerWindow<A>
where
    A::Output: 'static,
{
    type Row = Vec<A::Output>;
    fn row(&self) -> Self::Row {
        self.0.iter().map(|a| a.value()).collect()
    }
}

/// A row fold plus the row last emitted for its key.
struct Memo<F: RowAggregate<V>, V> {
    fold: F,
    last: Option<F::Row>,
    _value: PhantomData<fn(&V)>,
}

impl<F: RowAggregate<V>, V> Default for Memo<F, V> {
    fn default() -> Self {
        Memo {
            fold: F::default(),
            last: None,
            _value: PhantomData,
        }
    }
}

impl<F: RowAggregate<V>, V> WindowFold<V> for Memo<F, V> {
    #[inline]
    fn enter(&mut self, window: usize, value: &V) {
        self.fold.enter(window, value);
    }
    #[inline]
    fn leave(&mut self, window: usize, value: &V) {
        self.fold.leave(window, value);
    }
}

/// Maintains, per key, a row of aggregates over several sliding windows.
pub trait WindowedAggregate<'scope, K, V> {
    /// Routes `(key, value)` records by a deterministic hash of the key and
    /// maintains for each key a fold `F` over the values inside each window.
    ///
    /// Time contract: a value received at time `t` is inside window `w` at
    /// times `t <= s < t + windows[w]`. Times are processed in order once the
    /// input frontier has passed them; whenever the row of a key changes at
    /// time `s` (values entered at `s`, or left at `s` because they arrived at
    /// `s - windows[w]`) the operator emits `(key, Some(row))` at `s`, and
    /// `(key, None)` at `s` when every window of the key became empty (its
    /// state is then freed). Nothing is emitted for keys whose row did not
    /// change. Retractions happen without new input: the operator holds a
    /// capability for the earliest pending departure, so its output frontier
    /// trails the input frontier by at most that. It does at most
    /// [`WORK_PER_ACTIVATION`] units of work per activation and reschedules
    /// itself. The output is identical for any number of workers.
    ///
    /// # Examples
    /// ```
    /// use timely::dataflow::operators::{Capture, Input};
    /// use timely::dataflow::operators::capture::Extract;
    /// use operators::aggregate::{Count, PerWindow, WindowedAggregate};
    ///
    /// let captured = timely::execute_directly(|worker| {
    ///     let (mut input, captured) = worker.dataflow::<u64, _, _>(|scope| {
    ///         let (input, stream) = scope.new_input::<Vec<(char, ())>>();
    ///         let counts = stream.windowed_aggregate::<PerWindow<Count>>("Counts", &[10, 5]);
    ///         (input, counts.capture())
    ///     });
    ///     input.send(('a', ()));
    ///     input.send(('a', ()));
    ///     input.advance_to(3);
    ///     input.send(('a', ()));
    ///     captured
    /// });
    /// // Counts over the last 10 and the last 5 time units, emitted on change.
    /// assert_eq!(
    ///     captured.extract(),
    ///     vec![
    ///         (0, vec![('a', Some(vec![2, 2]))]),
    ///         (3, vec![('a', Some(vec![3, 3]))]),
    ///         (5, vec![('a', Some(vec![3, 1]))]),
    ///         (8, vec![('a', Some(vec![3, 0]))]),
    ///         (10, vec![('a', Some(vec![1, 0]))]),
    ///         (13, vec![('a', None)]),
    ///     ]
    /// );
    /// ```
    fn windowed_aggregate<F>(
        self,
        name: &str,
        windows: &[u64],
    ) -> StreamVec<'scope, u64, (K, Option<F::Row>)>
    where
        F: RowAggregate<V>;

    /// [`windowed_aggregate`](Self::windowed_aggregate), with each change
    /// shaped by `emit(key, row)` inside the operator (no separate map pass).
    fn windowed_aggregate_with<F, R, E>(
        self,
        name: &str,
        windows: &[u64],
        emit: E,
    ) -> StreamVec<'scope, u64, R>
    where
        F: RowAggregate<V>,
        R: 'static,
        E: FnMut(&K, Option<F::Row>) -> R + 'static;

    /// [`windowed_aggregate_with`](Self::windowed_aggregate_with) doing at
    /// most about `work_per_activation` units of work per activation (instead
    /// of [`WORK_PER_ACTIVATION`]). The output does not depend on it; tests
    /// use tiny values so that every time is resumed mid-way.
    ///
    /// # Examples
    /// ```
    /// use timely::dataflow::operators::{Capture, Input};
    /// use timely::dataflow::operators::capture::Extract;
    /// use operators::aggregate::{Count, PerWindow, WindowedAggregate};
    ///
    /// let captured = timely::execute_directly(|worker| {
    ///     let (mut input, captured) = worker.dataflow::<u64, _, _>(|scope| {
    ///         let (input, stream) = scope.new_input::<Vec<(char, ())>>();
    ///         let counts = stream.windowed_aggregate_budgeted::<PerWindow<Count>, _, _>(
    ///             "Counts", &[4], 1, |key, row| (*key, row),
    ///         );
    ///         (input, counts.capture())
    ///     });
    ///     input.send(('a', ()));
    ///     input.send(('b', ()));
    ///     captured
    /// });
    /// // One unit of work per activation: each change still lands at its own time.
    /// let mut out = captured.extract();
    /// out.iter_mut().for_each(|(_, data)| data.sort());
    /// assert_eq!(
    ///     out,
    ///     vec![
    ///         (0, vec![('a', Some(vec![1])), ('b', Some(vec![1]))]),
    ///         (4, vec![('a', None), ('b', None)]),
    ///     ]
    /// );
    /// ```
    fn windowed_aggregate_budgeted<F, R, E>(
        self,
        name: &str,
        windows: &[u64],
        work_per_activation: usize,
        emit: E,
    ) -> StreamVec<'scope, u64, R>
    where
        F: RowAggregate<V>,
        R: 'static,
        E: FnMut(&K, Option<F::Row>) -> R + 'static;
}

impl<'scope, K, V> WindowedAggregate<'scope, K, V> for StreamVec<'scope, u64, (K, V)>
where
    K: ExchangeData + Hash + Eq + Clone,
    V: ExchangeData,
{
    fn windowed_aggregate<F>(
        self,
        name: &str,
        windows: &[u64],
    ) -> StreamVec<'scope, u64, (K, Option<F::Row>)>
    where
        F: RowAggregate<V>,
    {
        self.windowed_aggregate_with::<F, _, _>(name, windows, |key: &K, row| (key.clone(), row))
    }

    fn windowed_aggregate_with<F, R, E>(
        self,
        name: &str,
        windows: &[u64],
        emit: E,
    ) -> StreamVec<'scope, u64, R>
    where
        F: RowAggregate<V>,
        R: 'static,
        E: FnMut(&K, Option<F::Row>) -> R + 'static,
    {
        self.windowed_aggregate_budgeted::<F, R, E>(name, windows, WORK_PER_ACTIVATION, emit)
    }

    fn windowed_aggregate_budgeted<F, R, E>(
        self,
        name: &str,
        windows: &[u64],
        work_per_activation: usize,
        mut emit: E,
    ) -> StreamVec<'scope, u64, R>
    where
        F: RowAggregate<V>,
        R: 'static,
        E: FnMut(&K, Option<F::Row>) -> R + 'static,
    {
        assert!(
            work_per_activation > 0,
            "work_per_activation must be positive"
        );
        let budget = work_per_activation;
        let mut store = WindowStore::<K, V, Memo<F, V>>::new(windows);
        let scope = self.scope();
        let pact = Exchange::new(|(key, _): &(K, V)| key_hash(key));
        self.unary_frontier(pact, name, move |_initial, info| {
            let activator = scope.activator_for(info.address);
            // Received batches by time, not yet inserted.
            let mut pending: BTreeMap<u64, Vec<Vec<(K, V)>>> = BTreeMap::new();
            // Invariant: held iff work is pending, at a time <= all of it.
            let mut held: Option<Capability<u64>> = None;
            // A spare row, so comparing with the last row allocates nothing.
            let mut scratch: Option<F::Row> = None;
            move |(input, frontier), output| {
                let port = output.output_index();
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    if held.as_ref().is_none_or(|h| time < *h.time()) {
                        held = cap.retain_least(port);
                    }
                    pending.entry(time).or_default().push(std::mem::take(data));
                });

                // Work is capped per activation. Whether `time` is finished is
                // decided by the state (no departure due at or before `time`,
                // no batch left at `time`), never by the budget: the rows
                // changed at `time` are emitted at `time` before the
                // capability may move past it.
                let mut work = 0;
                while let Some(time) = next_time(&pending, &store) {
                    if frontier.less_equal(&time) {
                        break; // `time` may still receive input.
                    }
                    if work >= budget {
                        activator.activate();
                        break; // Yield between times; resume at `time`.
                    }
                    work += store.retract_until(time, budget - work);
                    if store.next_due().is_some_and(|due| due <= time) {
                        // Departures at `time` remain: `next_time` stays `time`.
                        activator.activate();
                        break;
                    }
                    if let Some(batches) = pending.get_mut(&time) {
                        while work < budget {
                            let Some(batch) = batches.pop() else { break };
                            work += batch.len();
                            for (key, value) in batch {
                                store.insert(time, key, value);
                            }
                        }
                        if !batches.is_empty() {
                            // Insertions at `time` remain: `pending` keeps `time`.
                            activator.activate();
                            break;
                        }
                        pending.remove(&time);
                    }
                    // All work at `time` is done: emit the rows that changed.
                    let cap = held
                        .as_mut()
                        .expect("a capability is held while work is pending");
                    cap.downgrade(&time);
                    let mut session = output.session(cap);
                    store.drain_touched(|key, memo, empty| {
                        if empty {
                            if memo.last.take().is_some() {
                                session.give(emit(key, None));
                            }
                            return;
                        }
                        let row = match scratch.take() {
                            Some(mut row) => {
                                memo.fold.row_into(&mut row);
                                row
                            }
                            None => memo.fold.row(),
                        };
                        if memo.last.as_ref() == Some(&row) {
                            scratch = Some(row);
                        } else {
                            session.give(emit(key, Some(row.clone())));
                            // Keep the replaced row's allocation for the next key.
                            scratch = memo.last.replace(row);
                        }
                    });
                }
                // Touched keys exist only mid-time, and then `next_time` is
                // that time, so the capability below never passes them.
                match next_time(&pending, &store) {
                    Some(time) => {
                        if let Some(cap) = held.as_mut() {
                            cap.downgrade(&time);
                        }
                    }
                    None => held = None,
                }
            }
        })
    }
}

fn next_time<K, V, F>(
    pending: &BTreeMap<u64, Vec<Vec<(K, V)>>>,
    store: &WindowStore<K, V, F>,
) -> Option<u64>
where
    K: Hash + Eq + Clone,
    F: WindowFold<V>,
{
    match (pending.keys().next().copied(), store.next_due()) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::{Capture, Input};

    use super::*;

    /// Regression: with a cap reached by the retraction that finished the
    /// departures due at a time with no insertion at it, the operator yielded,
    /// moved its capability to the next time and emitted the changed rows
    /// there, one time late. A cap of one unit hits that at every departure.
    #[test]
    fn departures_finished_on_the_work_cap_are_emitted_at_their_time() {
        let captured = timely::execute_directly(|worker| {
            let (mut handle, captured) = worker.dataflow::<u64, _, _>(|scope| {
                let (handle, stream) = scope.new_input::<Vec<(u32, ())>>();
                let rows = stream.windowed_aggregate_budgeted::<PerWindow<Count>, _, _>(
                    "Counts",
                    &[2, 5],
                    1,
                    |key, row| (*key, row),
                );
                (handle, rows.capture())
            });
            handle.send((1, ()));
            handle.send((2, ()));
            handle.advance_to(1);
            handle.send((1, ()));
            captured
        });
        let mut updates = captured.extract();
        updates.iter_mut().for_each(|(_, data)| data.sort());
        assert_eq!(
            updates,
            vec![
                (0, vec![(1, Some(vec![1, 1])), (2, Some(vec![1, 1]))]),
                (1, vec![(1, Some(vec![2, 2]))]),
                (2, vec![(1, Some(vec![1, 2])), (2, Some(vec![0, 1]))]),
                (3, vec![(1, Some(vec![0, 2]))]),
                (5, vec![(1, Some(vec![0, 1])), (2, None)]),
                (6, vec![(1, None)]),
            ]
        );
    }

    /// More values at one time than one activation may process: the operator
    /// must yield, resume mid-time, and still emit exactly one row per change.
    #[test]
    fn work_beyond_one_activation_resumes_mid_time() {
        let windows = [10u64, 3];
        let batches: Vec<(u64, Vec<(u32, ())>)> = vec![
            (0, (0..100_000u32).map(|i| (i % 1000, ())).collect()),
            (5, (0..50_000u32).map(|i| (i % 700, ())).collect()),
        ];
        assert!(batches[0].1.len() > WORK_PER_ACTIVATION);
        let input = batches.clone();
        let captured = timely::execute_directly(move |worker| {
            let (mut handle, captured) = worker.dataflow::<u64, _, _>(|scope| {
                let (handle, stream) = scope.new_input::<Vec<(u32, ())>>();
                let rows = stream.windowed_aggregate::<PerWindow<Count>>("Counts", &windows);
                (handle, rows.capture())
            });
            for (time, data) in input {
                handle.advance_to(time);
                data.into_iter().for_each(|d| handle.send(d));
            }
            captured
        });
        let mut rows: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        let updates = captured.extract();
        for s in 0..20u64 {
            for (_, data) in updates.iter().filter(|(t, _)| *t == s) {
                let mut keys = std::collections::BTreeSet::new();
                for (key, row) in data {
                    assert!(keys.insert(*key), "one update per key and time");
                    assert_ne!(rows.get(key), row.as_ref(), "only changes are emitted");
                    match row {
                        Some(row) => rows.insert(*key, row.clone()),
                        None => rows.remove(key),
                    };
                }
            }
            let mut expected: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
            for (t, data) in &batches {
                for (key, ()) in data {
                    let row = expected
                        .entry(*key)
                        .or_insert_with(|| vec![0; windows.len()]);
                    for (w, len) in windows.iter().enumerate() {
                        if *t <= s && s < t + len {
                            row[w] += 1;
                        }
                    }
                }
            }
            expected.retain(|_, row| row.iter().any(|c| *c > 0));
            assert_eq!(rows, expected, "rows at time {s}");
        }
    }
}
