//! Windowed aggregates: per-key rows of aggregates over several sliding
//! windows at once (`WindowedAggregate`), a differential operator built from
//! the single-window aggregates in [`functions`] and the window primitive
//! [`WindowStore`].
//!
//! Why a custom operator: on this machine DD's built-ins over sliding windows
//! (`explode` + `count_total` for the abelian aggregates, `distinct_total`,
//! `reduce` for max) measured 27k-114k events/s together against 188k-341k
//! for per-key FIFO window state (`shared/NOTES-dd-performance.md`, and
//! `bench/dataflow` keeps the comparison). So the windows live here, as one
//! DD operator: a collection of events in, a collection of row changes out.

pub mod functions;

pub use functions::{Aggregate, Count, DistinctCount, LastTime, Max, Min, Mode, Moments, Sum};

use std::borrow::Borrow;
use std::collections::BTreeMap;
use std::hash::Hash;

use differential_dataflow::{AsCollection, VecCollection};
use timely::dataflow::channels::pact::{Exchange, ParallelizationContract};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, InputCapability};
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
pub trait RowAggregate<V>: WindowFold<V> + Clone + 'static {
    /// The row reported for a key with at least one value in some window.
    type Row: Clone + PartialEq + 'static;
    /// The current row.
    fn row(&self) -> Self::Row;
    /// The row after some values entered or left the windows in `windows`
    /// (a bit set over window indices; no other window changed), given `row`,
    /// the row before; `None` when it is unchanged. Implementations may
    /// recompute only the outputs over those windows, and should copy `row`
    /// only once an output differs. Default: the whole row.
    fn refresh(&self, windows: u32, row: &Self::Row) -> Option<Self::Row> {
        let _ = windows;
        let new = self.row();
        (new != *row).then_some(new)
    }
    /// A hint that `row` will be read soon (see [`WindowFold::prefetch`]).
    #[inline]
    fn prefetch_row(row: &Self::Row) {
        let _ = row;
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

impl<V: 'static, A: Aggregate<V> + Clone + 'static> RowAggregate<V> for PerWindow<A>
where
    A::Output: 'static,
{
    type Row = Vec<A::Output>;
    fn row(&self) -> Self::Row {
        self.0.iter().map(|a| a.value()).collect()
    }
}

/// A row fold plus the row last emitted for its key and the windows changed
/// since (so that [`RowAggregate::refresh`] recomputes only their outputs).
struct Memo<F: RowAggregate<V>, V> {
    fold: F,
    last: Option<F::Row>,
    /// Bit set of the windows values entered or left since `last`.
    changed: u32,
    _value: std::marker::PhantomData<fn(&V)>,
}

impl<F: RowAggregate<V>, V> Clone for Memo<F, V> {
    fn clone(&self) -> Self {
        Memo {
            fold: self.fold.clone(),
            last: self.last.clone(),
            changed: self.changed,
            _value: std::marker::PhantomData,
        }
    }
}

impl<F: RowAggregate<V>, V> WindowFold<V> for Memo<F, V> {
    #[inline]
    fn windows_of(&self, value: &V) -> u32 {
        self.fold.windows_of(value)
    }
    #[inline]
    fn enter(&mut self, window: usize, value: &V) {
        self.changed |= 1 << window;
        self.fold.enter(window, value);
    }
    #[inline]
    fn leave(&mut self, window: usize, value: &V) {
        self.changed |= 1 << window;
        self.fold.leave(window, value);
    }
    #[inline]
    fn prefetch(&self, window: Option<usize>) {
        self.fold.prefetch(window);
        if window.is_none() {
            // The row is compared with the new values once the time is done.
            if let Some(row) = &self.last {
                F::prefetch_row(row);
            }
        }
    }
}

/// Maintains, per key, a row of aggregates over several sliding windows.
pub trait WindowedAggregate<'scope, K, V> {
    /// Routes the `(key, value)` events of an append-only collection by a
    /// deterministic hash of the key and maintains for each key a fold over
    /// the values inside each window (a clone of `fold` per new key). The
    /// output is the collection of `(key, row)`: one record per key with a
    /// value in some window.
    ///
    /// Time contract: a value at time `t` is inside window `w` at times
    /// `t <= s < t + windows[w]`. Times are processed in order once the input
    /// frontier has passed them; whenever the row of a key changes at time `s`
    /// (values entered at `s`, or left at `s` because they arrived at
    /// `s - windows[w]`) the operator emits at `s` the retraction of the old
    /// row (`-1`) and the new row (`+1`); when every window of the key became
    /// empty only the retraction (its state is then freed). Nothing is emitted
    /// for keys whose row did not change. Retractions happen without new
    /// input: the operator holds a capability for the earliest pending
    /// departure, so its output frontier trails the input frontier by at most
    /// that. Input differences must be positive (a difference `n` is `n`
    /// copies; events are never retracted). It does at most
    /// [`WORK_PER_ACTIVATION`] units of work per activation and reschedules
    /// itself. The output is identical for any number of workers, and each
    /// key's changes stay on the worker its hash routed it to.
    ///
    /// # Examples
    /// ```
    /// use differential_dataflow::input::Input;
    /// use timely::dataflow::operators::Capture;
    /// use timely::dataflow::operators::capture::Extract;
    /// use operators::aggregate::{Count, PerWindow, WindowedAggregate};
    ///
    /// let captured = timely::execute_directly(|worker| {
    ///     let (mut input, captured) = worker.dataflow::<u64, _, _>(|scope| {
    ///         let (input, events) = scope.new_collection::<(char, ()), isize>();
    ///         let counts = events.windowed_aggregate("Counts", &[10, 5], PerWindow::<Count>::default());
    ///         (input, counts.inner.capture())
    ///     });
    ///     input.insert(('a', ()));
    ///     input.insert(('a', ()));
    ///     input.advance_to(3);
    ///     input.insert(('a', ()));
    ///     captured
    /// });
    /// // Counts over the last 10 and the last 5 time units, as changes.
    /// let mut changes: Vec<_> = captured.extract().into_iter().flat_map(|(_, d)| d).collect();
    /// changes.sort_by_key(|(row, time, diff)| (*time, *diff, row.clone()));
    /// assert_eq!(
    ///     changes,
    ///     vec![
    ///         (('a', vec![2, 2]), 0, 1),
    ///         (('a', vec![2, 2]), 3, -1),
    ///         (('a', vec![3, 3]), 3, 1),
    ///         (('a', vec![3, 3]), 5, -1),
    ///         (('a', vec![3, 1]), 5, 1),
    ///         (('a', vec![3, 1]), 8, -1),
    ///         (('a', vec![3, 0]), 8, 1),
    ///         (('a', vec![3, 0]), 10, -1),
    ///         (('a', vec![1, 0]), 10, 1),
    ///         (('a', vec![1, 0]), 13, -1),
    ///     ]
    /// );
    /// ```
    fn windowed_aggregate<F>(
        self,
        name: &str,
        windows: &[u64],
        fold: F,
    ) -> VecCollection<'scope, u64, (K, F::Row), isize>
    where
        F: RowAggregate<V>;

    /// [`windowed_aggregate`](Self::windowed_aggregate), with each output
    /// record shaped by `emit(key, row)` inside the operator (no separate map
    /// pass), doing at most about `work_per_activation` units of work per
    /// activation. The output does not depend on the budget; tests use tiny
    /// values so that every time is resumed mid-way.
    fn windowed_aggregate_with<F, D, E>(
        self,
        name: &str,
        windows: &[u64],
        fold: F,
        work_per_activation: usize,
        emit: E,
    ) -> VecCollection<'scope, u64, D, isize>
    where
        F: RowAggregate<V>,
        D: Clone + 'static,
        E: FnMut(&K, F::Row) -> D + 'static;

    /// The windows of [`windowed_aggregate_with`](Self::windowed_aggregate_with)
    /// queried instead of reported: for each lookup `(key, lookup)` at time
    /// `F`, outputs `answer(key, lookup, row)` at `F`, where `row` is the
    /// key's row accumulated over the times `< F` (strictly before: the
    /// values at `F` are not in it); nothing when the key has no row then.
    ///
    /// The windows are the same store and fold as for the row changes,
    /// but a row is computed only when a lookup asks for it, and no change
    /// is emitted. A replay that needs the rows only at some times (a
    /// backfill asks at each event's own time) so skips most of the work:
    /// every value leaving a window changes a row, and most changed rows
    /// are never asked for.
    ///
    /// Lookups are routed by the same hash as the events. The operator
    /// works key by key ([`WindowStore::on_demand`]): once both inputs'
    /// frontiers have passed some times, it visits each key with events or
    /// lookups at those times and does them in time order, the lookups at
    /// `F` before the values at `F` enter, each lookup after the key's
    /// values due by then have left. So a key's windows are touched once
    /// per visit rather than once per time, and no queue of departures by
    /// time is kept; a key's expired values stay until its next visit. The
    /// operator holds a capability only while a lookup is pending; event
    /// and lookup differences must be positive (a difference `n` is `n`
    /// copies).
    fn windowed_lookup_with<F, L, D, E>(
        self,
        lookups: VecCollection<'scope, u64, (K, L), isize>,
        name: &str,
        windows: &[u64],
        fold: F,
        work_per_activation: usize,
        answer: E,
    ) -> VecCollection<'scope, u64, D, isize>
    where
        F: RowAggregate<V>,
        L: ExchangeData + Clone,
        D: Clone + 'static,
        E: FnMut(&K, L, F::Row) -> D + 'static;
}

impl<'scope, K, V> WindowedAggregate<'scope, K, V> for VecCollection<'scope, u64, (K, V), isize>
where
    K: ExchangeData + Hash + Eq + Clone,
    V: ExchangeData + Clone,
{
    fn windowed_aggregate<F>(
        self,
        name: &str,
        windows: &[u64],
        fold: F,
    ) -> VecCollection<'scope, u64, (K, F::Row), isize>
    where
        F: RowAggregate<V>,
    {
        self.windowed_aggregate_with(name, windows, fold, WORK_PER_ACTIVATION, |key: &K, row| {
            (key.clone(), row)
        })
    }

    fn windowed_aggregate_with<F, D, E>(
        self,
        name: &str,
        windows: &[u64],
        fold: F,
        work_per_activation: usize,
        mut emit: E,
    ) -> VecCollection<'scope, u64, D, isize>
    where
        F: RowAggregate<V>,
        D: Clone + 'static,
        E: FnMut(&K, F::Row) -> D + 'static,
    {
        assert!(
            work_per_activation > 0,
            "work_per_activation must be positive"
        );
        let budget = work_per_activation;
        let memo = Memo {
            fold,
            last: None,
            changed: 0,
            _value: std::marker::PhantomData,
        };
        let mut windows = Windows::new(name, windows, memo);
        let scope = self.scope();
        self.inner
            .unary_frontier(route::<K, V>(), name, move |_initial, info| {
                let activator = scope.activator_for(info.address);
                // Invariant: held iff work is pending, at a time <= all of it.
                let mut held: Option<Capability<u64>> = None;
                move |(input, frontier), output| {
                    let port = output.output_index();
                    input.for_each(|cap, data| {
                        hold(&mut held, &cap, port);
                        windows.receive(data);
                    });

                    // Work is capped per activation. Whether `time` is finished is
                    // decided by the state (no departure due at or before `time`,
                    // no batch left at `time`), never by the budget: the rows
                    // changed at `time` are emitted at `time` before the
                    // capability may move past it.
                    let mut work = 0;
                    while let Some(time) = windows.next_time() {
                        if frontier.less_equal(&time) {
                            break; // `time` may still receive input.
                        }
                        if work >= budget || !windows.advance(time, budget, &mut work) {
                            activator.activate();
                            break; // Yield; resume at `time`.
                        }
                        // All work at `time` is done: emit the rows that changed.
                        let cap = held
                            .as_mut()
                            .expect("a capability is held while work is pending");
                        cap.downgrade(&time);
                        let mut session = output.session(cap);
                        windows.store.drain_touched(|key, memo, empty| {
                            let changed = std::mem::take(&mut memo.changed);
                            if empty {
                                if let Some(old) = memo.last.take() {
                                    session.give((emit(key, old), time, -1));
                                }
                                return;
                            }
                            let Some(last) = memo.last.as_mut() else {
                                let row = memo.fold.row();
                                memo.last = Some(row.clone());
                                session.give((emit(key, row), time, 1));
                                return;
                            };
                            if let Some(row) = memo.fold.refresh(changed, last) {
                                let old = std::mem::replace(last, row);
                                session.give((emit(key, old), time, -1));
                                session.give((emit(key, last.clone()), time, 1));
                            }
                        });
                    }
                    // Touched keys exist only mid-time, and then `next_time` is
                    // that time, so the capability below never passes them.
                    settle(&mut held, windows.next_time());
                }
            })
            .as_collection()
    }

    fn windowed_lookup_with<F, L, D, E>(
        self,
        lookups: VecCollection<'scope, u64, (K, L), isize>,
        name: &str,
        windows: &[u64],
        fold: F,
        work_per_activation: usize,
        mut answer: E,
    ) -> VecCollection<'scope, u64, D, isize>
    where
        F: RowAggregate<V>,
        L: ExchangeData + Clone,
        D: Clone + 'static,
        E: FnMut(&K, L, F::Row) -> D + 'static,
    {
        windowed_lookup(
            Events {
                collection: self,
                pact: route::<K, V>(),
                split: |(key, value): &(K, V), each: &mut dyn FnMut(&K, V)| {
                    each(key, value.clone())
                },
                own: K::clone,
            },
            lookups,
            name,
            windows,
            fold,
            work_per_activation,
            move |key: &K, lookup, fold: &F| answer(key, lookup, fold.row()),
        )
    }
}

/// The events of a lookup operator ([`windowed_lookup`]): a collection of
/// handles `H` that reach the operator by `pact`, each split into its
/// `(key, value)`s by `split(handle, each)` calling `each(&key, value)`
/// (zero or more times). `own` turns a borrowed key into the stored one.
pub struct Events<'scope, H: 'static, P, S, Q: ?Sized, K> {
    pub collection: VecCollection<'scope, u64, H, isize>,
    pub pact: P,
    pub split: S,
    pub own: fn(&Q) -> K,
}

/// [`WindowedAggregate::windowed_lookup_with`] over events given as
/// handles ([`Events`]): a replay whose workers all hold the log feeds each
/// worker every event as an index into it, by a
/// [`Pipeline`](timely::dataflow::channels::pact::Pipeline), and its
/// `split` keeps the events of the keys that the lookups' route (the key's
/// hash) brings to that worker, projected there. Its values then go
/// straight from the log into the keys' queues, instead of through an
/// operator of their own and a channel. The lookups are routed by the
/// key's hash, and an event's key must be routed, or kept, likewise.
/// `answer(key, lookup, fold)` is given the key's fold as of the lookup's
/// time, to read the row from as it needs.
pub fn windowed_lookup<'scope, H, P, S, Q, K, V, L, F, D, E>(
    events: Events<'scope, H, P, S, Q, K>,
    lookups: VecCollection<'scope, u64, (K, L), isize>,
    name: &str,
    windows: &[u64],
    fold: F,
    work_per_activation: usize,
    mut answer: E,
) -> VecCollection<'scope, u64, D, isize>
where
    H: Clone + 'static,
    P: ParallelizationContract<u64, Vec<(H, u64, isize)>>,
    S: FnMut(&H, &mut dyn FnMut(&Q, V)) + 'static,
    Q: ?Sized + Hash + Eq + 'static,
    K: ExchangeData + Hash + Eq + Clone + Borrow<Q>,
    V: Clone + 'static,
    L: ExchangeData + Clone,
    F: RowAggregate<V>,
    D: Clone + 'static,
    E: FnMut(&K, L, &F) -> D + 'static,
{
    assert!(
        work_per_activation > 0,
        "work_per_activation must be positive"
    );
    let budget = work_per_activation;
    let Events {
        collection,
        pact,
        mut split,
        own,
    } = events;
    let mut keys = Queued::new(name, windows, fold);
    let scope = collection.scope();
    collection
        .inner
        .binary_frontier(
            lookups.inner,
            pact,
            route::<K, L>(),
            name,
            move |_initial, info| {
                let activator = scope.activator_for(info.address);
                // Invariant: held iff a lookup is pending, at a time <= all of them.
                let mut held: Option<Capability<u64>> = None;
                // The pass under way: the keys to visit and the time
                // before which their items are complete.
                let mut pass: Option<Pass> = None;
                move |(events, events_frontier), (lookups, lookups_frontier), output| {
                    events.for_each(|_, data| keys.receive_events(data, &mut split, own));
                    let port = output.output_index();
                    lookups.for_each(|cap, data| {
                        hold(&mut held, &cap, port);
                        keys.receive_lookups(data);
                    });
                    // Items before the earlier of the two frontiers are
                    // complete (`u64::MAX`: both inputs closed).
                    let complete = [events_frontier.frontier(), lookups_frontier.frontier()]
                        .iter()
                        .map(|f| f.first().copied().unwrap_or(u64::MAX))
                        .min()
                        .expect("two frontiers");
                    let mut work = 0;
                    loop {
                        let current = match pass.as_mut() {
                            Some(current) => current,
                            None if keys.earliest.is_some_and(|t| t < complete) => {
                                pass.insert(keys.start(complete))
                            }
                            None => break,
                        };
                        let mut session = held.as_ref().map(|cap| output.session(cap));
                        let done =
                            current.run(&mut keys, budget, &mut work, |key, lookup, fold, time| {
                                session
                                    .as_mut()
                                    .expect("held while lookups are pending")
                                    .give((answer(key, lookup, fold), time, 1));
                            });
                        drop(session);
                        if !done {
                            activator.activate();
                            break; // Resume the pass.
                        }
                        // Every lookup before the pass's time is answered.
                        let until = current.until;
                        pass = None;
                        if keys.lookups == 0 {
                            held = None;
                        } else if let Some(cap) = held.as_mut().filter(|c| *c.time() < until) {
                            cap.downgrade(&until);
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Retains `cap` for output `port` in `held` if it is earlier than what is held.
fn hold(held: &mut Option<Capability<u64>>, cap: &InputCapability<u64>, port: usize) {
    let Some(&at) = cap.least() else { return };
    if held.as_ref().is_none_or(|h| at < *h.time()) {
        *held = cap.retain_least(port);
    }
}

/// Moves the held capability to `next`, the earliest pending work, or
/// drops it when nothing is pending.
fn settle(held: &mut Option<Capability<u64>>, next: Option<u64>) {
    match next {
        Some(time) => {
            if let Some(cap) = held.as_mut() {
                cap.downgrade(&time);
            }
        }
        None => *held = None,
    }
}

/// Routes `((key, _), time, diff)` updates by the key's deterministic hash.
/// The hash is a closure, inlined at each record (a `fn` pointer would be
/// an indirect call per record).
fn route<K: ExchangeData + Hash, T: ExchangeData>(
) -> Exchange<Keyed<K, T>, impl FnMut(&Keyed<K, T>) -> u64 + 'static> {
    Exchange::new(|((key, _), _, _): &Keyed<K, T>| key_hash(key))
}

/// A keyed update: `((key, payload), time, diff)`.
type Keyed<K, T> = ((K, T), u64, isize);

fn min_some(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The state of a lookup operator: its windows, kept key by key
/// ([`WindowStore::on_demand`]), and per key the events and lookups
/// received and not yet done.
struct Queued<K, V, L, F> {
    operator: String,
    store: WindowStore<K, V, F>,
    /// By store slot: the key's values to insert, `(time, value)`, in
    /// arrival order.
    events: Vec<Vec<(u64, V)>>,
    /// By store slot: the key's lookups, `(time, lookup)`, in arrival order.
    asked: Vec<Vec<(u64, L)>>,
    /// The slots with items for the next pass, each once (`listed`).
    dirty: Vec<usize>,
    listed: Vec<bool>,
    /// The earliest time of a queued item (exact between passes).
    earliest: Option<u64>,
    /// Lookups received and not yet answered.
    lookups: usize,
}

/// A pass over the keys with items: each key's items before `until` (the
/// inputs' frontier when it started, so they are complete) are done in
/// time order, key after key.
struct Pass {
    until: u64,
    slots: Vec<usize>,
    next: usize,
}

impl<K, V, L, F> Queued<K, V, L, F>
where
    K: Hash + Eq + Clone,
    V: Clone,
    L: Clone,
    F: RowAggregate<V>,
{
    fn new(operator: &str, windows: &[u64], fold: F) -> Self {
        Queued {
            operator: operator.to_owned(),
            store: WindowStore::on_demand(windows, fold),
            events: Vec::new(),
            asked: Vec::new(),
            dirty: Vec::new(),
            listed: Vec::new(),
            earliest: None,
            lookups: 0,
        }
    }

    /// The slot of `key`, listed for the next pass, with an item at `time`.
    fn enlist<Q>(&mut self, key: &Q, own: fn(&Q) -> K, time: u64) -> usize
    where
        Q: ?Sized + Hash + Eq,
        K: Borrow<Q>,
    {
        let slot = self.store.slot_for(key, own);
        if slot >= self.listed.len() {
            self.events.resize_with(slot + 1, Vec::new);
            self.asked.resize_with(slot + 1, Vec::new);
            self.listed.resize(slot + 1, false);
        }
        self.earliest = min_some(self.earliest, Some(time));
        if !self.listed[slot] {
            self.listed[slot] = true;
            self.dirty.push(slot);
        }
        slot
    }

    /// Queues the values of a batch of received event handles.
    fn receive_events<H, Q>(
        &mut self,
        data: &mut Vec<(H, u64, isize)>,
        split: &mut impl FnMut(&H, &mut dyn FnMut(&Q, V)),
        own: fn(&Q) -> K,
    ) where
        Q: ?Sized + Hash + Eq,
        K: Borrow<Q>,
    {
        for (handle, time, diff) in data.drain(..) {
            assert!(
                diff > 0,
                "{}: events are append-only (diff {diff})",
                self.operator
            );
            split(&handle, &mut |key, value| {
                let slot = self.enlist(key, own, time);
                let events = &mut self.events[slot];
                for _ in 1..diff {
                    events.push((time, value.clone()));
                }
                events.push((time, value));
            });
        }
    }

    /// Queues a batch of received lookups.
    fn receive_lookups(&mut self, data: &mut Vec<((K, L), u64, isize)>) {
        for ((key, lookup), time, diff) in data.drain(..) {
            assert!(
                diff > 0,
                "{}: lookups are append-only (diff {diff})",
                self.operator
            );
            let slot = self.enlist(&key, K::clone, time);
            self.lookups += diff as usize;
            let asked = &mut self.asked[slot];
            for _ in 1..diff {
                asked.push((time, lookup.clone()));
            }
            asked.push((time, lookup));
        }
    }

    /// Starts a pass over the keys with items, for the items before `until`.
    fn start(&mut self, until: u64) -> Pass {
        // Recomputed by the pass, from the items it leaves and those received.
        self.earliest = None;
        Pass {
            until,
            slots: std::mem::take(&mut self.dirty),
            next: 0,
        }
    }

    /// Does `slot`'s items before `until` in time order, the lookups at a
    /// time before the values at it, calling `give(key, lookup, fold, time)`
    /// for each lookup that finds a row. Returns the units of work done.
    fn visit(&mut self, slot: usize, until: u64, give: &mut impl FnMut(&K, L, &F, u64)) -> usize {
        self.listed[slot] = false;
        let mut events = std::mem::take(&mut self.events[slot]);
        let mut asked = std::mem::take(&mut self.asked[slot]);
        // Each input arrives in time order when fed so (a replay's are);
        // otherwise, sort (stably: a key's values keep their order).
        if !events.is_sorted_by_key(|(time, _)| *time) {
            events.sort_by_key(|(time, _)| *time);
        }
        if !asked.is_sorted_by_key(|(time, _)| *time) {
            asked.sort_by_key(|(time, _)| *time);
        }
        let ready_events = events.partition_point(|(time, _)| *time < until);
        let ready_asked = asked.partition_point(|(time, _)| *time < until);
        let mut work = ready_events + ready_asked;
        let mut values = events.drain(..ready_events).peekable();
        for (time, lookup) in asked.drain(..ready_asked) {
            while let Some((at, value)) = values.next_if(|(at, _)| *at < time) {
                work += self.store.retract_key(slot, at);
                self.store.insert_into(slot, at, value);
            }
            // As of `time`: the values with `t + window >= time` stay.
            work += self.store.retract_key(slot, time.saturating_sub(1));
            self.lookups -= 1;
            if let Some((key, fold)) = self.store.at(slot) {
                give(key, lookup, fold, time);
            }
        }
        for (at, value) in values {
            work += self.store.retract_key(slot, at);
            self.store.insert_into(slot, at, value);
        }
        let left = min_some(
            events.first().map(|(t, _)| *t),
            asked.first().map(|(t, _)| *t),
        );
        match left {
            Some(time) => {
                self.earliest = min_some(self.earliest, Some(time));
                self.listed[slot] = true;
                self.dirty.push(slot);
            }
            None => {
                self.store.release_if_empty(slot);
            }
        }
        self.events[slot] = events;
        self.asked[slot] = asked;
        work
    }
}

impl Pass {
    /// Visits the pass's keys until `work` reaches `budget`; returns
    /// whether every key was visited.
    fn run<K, V, L, F>(
        &mut self,
        keys: &mut Queued<K, V, L, F>,
        budget: usize,
        work: &mut usize,
        mut give: impl FnMut(&K, L, &F, u64),
    ) -> bool
    where
        K: Hash + Eq + Clone,
        V: Clone,
        L: Clone,
        F: RowAggregate<V>,
    {
        while let Some(&slot) = self.slots.get(self.next) {
            if *work >= budget {
                return false;
            }
            self.next += 1;
            *work += keys.visit(slot, self.until, &mut give);
        }
        true
    }
}

/// The window state of one operator: the received events not yet inserted,
/// by time, and the store they go into.
struct Windows<K, V, F> {
    operator: String,
    pending: BTreeMap<u64, Vec<Vec<(K, V)>>>,
    store: WindowStore<K, V, F>,
}

impl<K, V, F> Windows<K, V, F>
where
    K: Hash + Eq + Clone,
    V: Clone,
    F: WindowFold<V> + Clone,
{
    fn new(operator: &str, windows: &[u64], fold: F) -> Self {
        Windows {
            operator: operator.to_owned(),
            pending: BTreeMap::new(),
            store: WindowStore::new(windows, fold),
        }
    }

    /// Takes a batch of received events (times >= its capability's).
    fn receive(&mut self, data: &mut Vec<((K, V), u64, isize)>) {
        // A batch usually holds one time, so group runs of equal times.
        let mut run: Vec<(K, V)> = Vec::with_capacity(data.len());
        let mut run_time = None;
        for ((key, value), time, diff) in data.drain(..) {
            assert!(
                diff > 0,
                "{}: events are append-only (diff {diff})",
                self.operator
            );
            if run_time != Some(time) {
                if let Some(t) = run_time {
                    self.pending
                        .entry(t)
                        .or_default()
                        .push(std::mem::take(&mut run));
                }
                run_time = Some(time);
            }
            for _ in 1..diff {
                run.push((key.clone(), value.clone()));
            }
            run.push((key, value));
        }
        if let Some(t) = run_time {
            self.pending.entry(t).or_default().push(run);
        }
    }

    /// The earliest time with values to insert or to retract.
    fn next_time(&self) -> Option<u64> {
        min_some(self.pending.keys().next().copied(), self.store.next_due())
    }

    /// Retracts the values due at `time` and inserts those received at
    /// `time` (the earliest [`Self::next_time`], complete), adding the units
    /// done to `work` and stopping near `budget`. Returns whether `time` is
    /// finished; if not, the caller yields and calls again later.
    fn advance(&mut self, time: u64, budget: usize, work: &mut usize) -> bool {
        *work += self.store.retract_until(time, budget.saturating_sub(*work));
        if self.store.next_due().is_some_and(|due| due <= time) {
            return false; // Departures at `time` remain.
        }
        if let Some(batches) = self.pending.get_mut(&time) {
            while *work < budget {
                let Some(batch) = batches.pop() else { break };
                *work += batch.len();
                self.store.insert_batch(time, batch);
            }
            if !batches.is_empty() {
                return false; // Insertions at `time` remain.
            }
            self.pending.remove(&time);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use differential_dataflow::input::Input;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::Capture;

    use super::*;

    type Changes = Vec<(u64, Vec<(u32, Option<Vec<i64>>)>)>;
    type Updates = BTreeMap<u64, Vec<((u32, Vec<i64>), isize)>>;

    /// Runs `PerWindow<Count>` over `batches` (time, keys) and returns, per
    /// time, each changed key's new row (`None`: deleted), checking that every
    /// retraction removes the row emitted before.
    fn run(windows: &'static [u64], budget: usize, batches: Vec<(u64, Vec<u32>)>) -> Changes {
        let captured = timely::execute_directly(move |worker| {
            let (mut input, captured) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, events) = scope.new_collection::<(u32, ()), isize>();
                let rows = events.windowed_aggregate_with(
                    "Counts",
                    windows,
                    PerWindow::<Count>::default(),
                    budget,
                    |key, row| (*key, row),
                );
                (input, rows.inner.capture())
            });
            for (time, keys) in batches {
                input.advance_to(time);
                keys.into_iter().for_each(|k| input.insert((k, ())));
            }
            captured
        });
        let mut by_time: Updates = BTreeMap::new();
        for (_, data) in captured.extract() {
            for (row, time, diff) in data {
                by_time.entry(time).or_default().push((row, diff));
            }
        }
        let mut current: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        let mut out = Vec::new();
        for (time, changes) in by_time {
            let mut changed = BTreeMap::new();
            for ((key, row), diff) in &changes {
                if *diff == -1 {
                    assert_eq!(
                        current.get(key),
                        Some(row),
                        "retracts the last row at {time}"
                    );
                    changed.entry(*key).or_insert(None);
                }
            }
            for ((key, row), diff) in changes {
                assert!(diff == 1 || diff == -1, "unit changes");
                if diff == 1 {
                    changed.insert(key, Some(row));
                }
            }
            for (key, row) in &changed {
                match row {
                    Some(row) => current.insert(*key, row.clone()),
                    None => current.remove(key),
                };
            }
            out.push((time, changed.into_iter().collect()));
        }
        out
    }

    /// Regression: with a cap reached by the retraction that finished the
    /// departures due at a time with no insertion at it, the operator yielded,
    /// moved its capability to the next time and emitted the changed rows
    /// there, one time late. A cap of one unit hits that at every departure.
    #[test]
    fn departures_finished_on_the_work_cap_are_emitted_at_their_time() {
        let updates = run(&[2, 5], 1, vec![(0, vec![1, 2]), (1, vec![1])]);
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
    /// must yield, resume mid-time, and still emit exactly one change per key.
    #[test]
    fn work_beyond_one_activation_resumes_mid_time() {
        const WINDOWS: &[u64] = &[10, 3];
        let batches: Vec<(u64, Vec<u32>)> = vec![
            (0, (0..100_000u32).map(|i| i % 1000).collect()),
            (5, (0..50_000u32).map(|i| i % 700).collect()),
        ];
        assert!(batches[0].1.len() > WORK_PER_ACTIVATION);
        let updates = run(WINDOWS, WORK_PER_ACTIVATION, batches.clone());
        let mut rows: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
        for s in 0..20u64 {
            for (_, data) in updates.iter().filter(|(t, _)| *t == s) {
                let mut keys = BTreeSet::new();
                for (key, row) in data {
                    assert!(keys.insert(*key), "one change per key and time");
                    assert_ne!(rows.get(key), row.as_ref(), "only changes are emitted");
                    match row {
                        Some(row) => rows.insert(*key, row.clone()),
                        None => rows.remove(key),
                    };
                }
            }
            let mut expected: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
            for (t, keys) in &batches {
                for key in keys {
                    let row = expected
                        .entry(*key)
                        .or_insert_with(|| vec![0; WINDOWS.len()]);
                    for (w, len) in WINDOWS.iter().enumerate() {
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
