//! The feature graph, compiled from a [`FeatureSet`]: a differential
//! collection of source events in, the collection of feature rows out.
//!
//! Time contract: dataflow timestamps are event time in ms quantized down to
//! `tick_ms` ([`GraphConfig::quantize`]); every window is a multiple of the
//! tick. An event contributes to the row "as of F" iff
//! `F - W <= quantized(event_time) < F`. The output collection at timestamp
//! `s` holds each row's value after all events with quantized time `<= s`, so
//! the row as of `F` is the collection accumulated over times `< F`. An event
//! at `t` is retracted from window `W` at `t + W`, once the frontier passes
//! it, without new input. A row exists while its entity has an event, of a
//! source that feeds one of its features, inside its widest window.
//!
//! Operators: "Events" (a stream of decoded events as a collection),
//! "Project" (each event to a record per entity it feeds), and per entity
//! "Features(name)" ([`WindowedAggregate`]).

use std::hash::Hash;
use std::rc::Rc;

use differential_dataflow::{AsCollection, VecCollection};
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Filter, Partition};
use timely::dataflow::StreamVec;

use operators::aggregate::{windowed_lookup, Events, WindowedAggregate, WORK_PER_ACTIVATION};
use operators::window::{key_hash, prefetch};
use schemas::{FeatureSet, Key, Row, Value};

use crate::compile::{compile, EntityFold, EntityPlan, Event, Record};

/// Configuration of the feature graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Event times are quantized down to multiples of this (ms). Every
    /// feature's window must be a multiple of it.
    pub tick_ms: u64,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig { tick_ms: 1000 }
    }
}

impl GraphConfig {
    /// Whether `tick_ms` is positive and divides every window of `set`.
    pub fn validate(&self, set: &FeatureSet) -> Result<(), String> {
        set.check_tick(self.tick_ms)
    }

    /// The dataflow timestamp of an event time: quantized down to the tick
    /// (negative times clamp to 0).
    pub fn quantize(&self, event_time_ms: i64) -> u64 {
        let t = event_time_ms.max(0) as u64;
        t - t % self.tick_ms
    }
}

/// An event with the index of its source in the feature set.
pub type SourceEvent = (usize, Event);

/// The events of a stream as a collection: each record at its capability's
/// time (the source's quantized event time), with difference 1.
pub fn events_collection<'scope>(
    events: StreamVec<'scope, u64, SourceEvent>,
) -> VecCollection<'scope, u64, SourceEvent, isize> {
    events
        .unary(Pipeline, "Events", |_, _| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    output
                        .session(&cap)
                        .give_iterator(data.drain(..).map(|e| (e, time, 1)));
                });
            }
        })
        .as_collection()
}

/// Builds the feature graph of `set` over a collection of source events.
/// The output holds one [`Row`] per live entity key, on the worker its key
/// hashes to (keys are routed by a deterministic hash, so the rows do not
/// depend on the number of workers or processes); see the module docs for
/// the time contract. Panics on a tick that does not divide every window
/// (validate first with [`GraphConfig::validate`]).
pub fn build_features<'scope>(
    events: VecCollection<'scope, u64, SourceEvent, isize>,
    set: &FeatureSet,
    config: &GraphConfig,
) -> VecCollection<'scope, u64, Row, isize> {
    build_features_budgeted(events, set, config, WORK_PER_ACTIVATION)
}

/// [`build_features`] with the windowed aggregates doing at most about
/// `work_per_activation` units of work per activation. The output does not
/// depend on it: tests use tiny values so that every time is resumed mid-way.
pub fn build_features_budgeted<'scope>(
    events: VecCollection<'scope, u64, SourceEvent, isize>,
    set: &FeatureSet,
    config: &GraphConfig,
    work_per_activation: usize,
) -> VecCollection<'scope, u64, Row, isize> {
    let scope = events.scope();
    let parts = project(events, set, config);
    let mut rows = Vec::with_capacity(parts.len());
    for (plan, part) in parts {
        let entity = plan.index;
        let fold = plan.fold();
        rows.push(part.windowed_aggregate_with(
            &format!("Features({})", plan.name),
            &plan.windows,
            fold,
            work_per_activation,
            move |id: &Key, values| Row {
                entity,
                id: id.clone(),
                values,
            },
        ));
    }
    differential_dataflow::collection::concatenate(scope, rows)
}

/// An entity's key in a replay: (entity index, the key's id, interned
/// per entity: [`Replay::key`]).
pub type RowKey = (u8, u32);

/// A row found for a lookup: (lookup, entity index, values).
pub type Found = (u64, u8, RowValues);

/// How many events ahead of the one it projects a replay's lookup operator
/// prefetches the next it will project.
const PREFETCH_EVENTS: u32 = 8;

/// A found row's values as their bits ([`Value::to_bits`]; each value's
/// kind is its feature's), inline up to 16: no allocation per row, and half
/// the bytes of the values to move from the operator to the caller.
pub type RowValues = SmallVec<[u64; 16]>;

/// The worker of `peers` that owns `key`: where the graph routes its
/// records and lookups.
pub fn worker_of<K: Hash + ?Sized>(key: &K, peers: usize) -> usize {
    // The exchange routes by `key_hash(key) % peers`.
    (key_hash(key) % peers as u64) as usize
}

/// A log every worker of a replay holds, its events numbered in order,
/// with each event's key of each entity interned as a number: the workers
/// route, keep and index keys by number and never read a key's string.
pub trait Replay: 'static {
    /// The source index and the event numbered `event`.
    fn event(&self, event: u32) -> (usize, &Event);
    /// The id of the key of entity `entity` in event `event`, if its
    /// source has the entity's key field (`None` past the end of the log);
    /// ids are per entity.
    fn key(&self, event: u32, entity: u8) -> Option<u32>;
}

/// The feature graph of `set` queried rather than reported: for each lookup
/// `((entity, key), lookup)` at time F, the row that [`build_features`]
/// holds for the key accumulated over the times `< F` (the row "as of F"),
/// output at F as `(lookup, entity, values)`; nothing when the key has no
/// row then. The same projection, windows and folds as
/// [`build_features`], in the same kind of operator per entity
/// ([`operators::aggregate::windowed_lookup`]), but rows are computed only
/// for lookups and no row change is emitted. Lookups of an entity with no
/// features find nothing.
///
/// For a replay: every worker holds `log` and is fed every event, by its
/// number. Each entity's operator keeps the events of the keys its worker
/// owns ([`worker_of`] the key's id: where the lookups are routed),
/// reading no other event, and projects them itself, so no record crosses
/// workers or channels. A lookup is answered on its key's worker; fed
/// there, it crosses no worker either.
pub fn lookup_features<'scope, R: Replay>(
    events: VecCollection<'scope, u64, u32, isize>,
    log: Rc<R>,
    lookups: VecCollection<'scope, u64, (RowKey, u64), isize>,
    set: &FeatureSet,
    config: &GraphConfig,
    work_per_activation: usize,
) -> VecCollection<'scope, u64, Found, isize> {
    let scope = events.scope();
    let plans = plans(set, config);
    let entities = plans.len() as u64;
    let asked = lookups
        .inner
        .filter(move |((key, _), _, _)| u64::from(key.0) < entities)
        .partition(entities, |(((entity, key), lookup), time, diff)| {
            (u64::from(entity), ((key, lookup), time, diff))
        });
    let (index, peers) = (scope.index(), scope.peers());
    let mut found = Vec::with_capacity(plans.len());
    for (plan, asked) in plans.into_iter().zip(asked) {
        let (entity, fold) = (plan.index, plan.fold());
        let (name, windows) = (format!("Features({})", plan.name), plan.windows.clone());
        let log = Rc::clone(&log);
        let split = move |&event: &u32, each: &mut dyn FnMut(&u32, Record)| {
            let owned = |event: u32| {
                log.key(event, entity)
                    .filter(|key| worker_of(key, peers) == index)
            };
            // Events come in order: fetch the one a few ahead, if this
            // worker projects it, while this one is done.
            let ahead = event.saturating_add(PREFETCH_EVENTS);
            if owned(ahead).is_some() {
                prefetch(log.event(ahead).1);
            }
            let Some(key) = owned(event) else {
                return;
            };
            let (source, event) = log.event(event);
            if let Some(record) = plan.record(source, event) {
                each(&key, record);
            }
        };
        found.push(windowed_lookup(
            Events {
                collection: events.clone(),
                pact: Pipeline,
                split,
                own: |key: &u32| *key,
            },
            asked.as_collection(),
            &name,
            &windows,
            fold,
            work_per_activation,
            move |_: &u32, lookup, fold: &EntityFold| {
                (lookup, entity, fold.values().map(Value::to_bits).collect())
            },
        ));
    }
    differential_dataflow::collection::concatenate(scope, found)
}

/// The compiled plans of `set`. Panics on a tick that does not divide
/// every window.
fn plans(set: &FeatureSet, config: &GraphConfig) -> Vec<Rc<EntityPlan>> {
    if let Err(e) = config.validate(set) {
        panic!("invalid graph config: {e}");
    }
    compile(set)
}

/// An entity's window records, keyed.
type Records<'scope> = VecCollection<'scope, u64, (Key, Record), isize>;

/// The plans of `set`, each with its "Project"ed part of `events`: each
/// event to a record per entity it feeds. Panics on a tick that does not
/// divide every window.
fn project<'scope>(
    events: VecCollection<'scope, u64, SourceEvent, isize>,
    set: &FeatureSet,
    config: &GraphConfig,
) -> Vec<(Rc<EntityPlan>, Records<'scope>)> {
    let plans = plans(set, config);
    let project = plans.clone();
    let parts = events
        .inner
        .unary(Pipeline, "Project", move |_, _| {
            move |input, output| {
                input.for_each(|cap, data| {
                    let mut session = output.session(&cap);
                    for ((source, event), time, diff) in data.drain(..) {
                        for plan in project.iter() {
                            if let Some(part) = plan.project(source, &event) {
                                session.give(((plan.index, part), time, diff));
                            }
                        }
                    }
                });
            }
        })
        .partition(plans.len() as u64, |((entity, part), time, diff)| {
            (entity as u64, (part, time, diff))
        })
        .into_iter()
        .map(|part| part.as_collection());
    plans.into_iter().zip(parts).collect()
}
