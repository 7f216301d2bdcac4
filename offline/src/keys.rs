//! The keys of a replayed log, interned: each event's key of each entity
//! as a dense number per entity, found once, as a replay starts. The replay's workers then route, keep and index keys by number
//! ([`dataflow::Replay`]) and never read a key's string: in a replay that
//! reads every event on every worker, that string was most of the cost of
//! skipping the events of another worker's keys.

use std::collections::HashMap;

use dataflow::compile::Event;
use operators::window::FxBuildHasher;
use schemas::features::DatumRef;
use schemas::{FeatureSet, Key};

use crate::log::EventLog;

/// The keys of a log's events, per entity.
#[derive(Debug, Default)]
pub struct KeyIds {
    entities: Vec<Interned>,
}

/// One entity's keys.
#[derive(Debug, Default)]
struct Interned {
    /// Per event: its key's id, or [`NONE`] (no key field in its source).
    of_event: Vec<u32>,
    /// Per id: the key.
    keys: Vec<Key>,
    index: HashMap<Key, u32, FxBuildHasher>,
}

/// No key.
const NONE: u32 = u32::MAX;

impl Interned {
    fn id(&mut self, key: &str) -> u32 {
        if let Some(&id) = self.index.get(key) {
            return id;
        }
        let id = u32::try_from(self.keys.len())
            .ok()
            .filter(|id| *id != NONE)
            .expect("fewer than 2^32 - 1 keys per entity");
        let key = Key::from(key);
        self.keys.push(key.clone());
        self.index.insert(key, id);
        id
    }
}

impl KeyIds {
    /// Interns the keys of `log`'s events: for each entity of `set`, the
    /// value of its key field in every event whose source has that field
    /// (whether or not the source feeds the entity, so that an event may
    /// look up any entity it names). One thread per entity.
    pub fn build(log: &EventLog, set: &FeatureSet) -> KeyIds {
        let entities = std::thread::scope(|s| {
            let threads: Vec<_> = set
                .entities
                .iter()
                .map(|entity| {
                    // Per source: the entity's key field in its schema.
                    let fields: Vec<Option<usize>> = set
                        .sources
                        .iter()
                        .map(|source| source.schema.field(&entity.key).map(|(f, _)| f))
                        .collect();
                    s.spawn(move || {
                        let mut interned = Interned {
                            of_event: Vec::with_capacity(log.events.len()),
                            ..Interned::default()
                        };
                        for (source, event) in &log.events {
                            let id = match fields[*source].and_then(|f| event.field_ref(f)) {
                                Some(DatumRef::Str(key)) => interned.id(key),
                                _ => NONE,
                            };
                            interned.of_event.push(id);
                        }
                        interned
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("interning panicked"))
                .collect()
        });
        KeyIds { entities }
    }

    /// The id of entity `entity`'s key in event `event`, if it has one
    /// (`None` past the end of the log).
    #[inline]
    pub fn of(&self, event: u32, entity: u8) -> Option<u32> {
        let id = *self
            .entities
            .get(entity as usize)?
            .of_event
            .get(event as usize)?;
        (id != NONE).then_some(id)
    }

    /// The id of `key` of entity `entity`, interned if new (a key no event
    /// has: a lookup of it finds no row).
    pub fn id(&mut self, entity: u8, key: &str) -> u32 {
        self.entities[entity as usize].id(key)
    }

    /// The key numbered `id` of entity `entity`.
    pub fn key(&self, entity: u8, id: u32) -> &Key {
        &self.entities[entity as usize].keys[id as usize]
    }
}

/// A log and its interned keys: what a replay's workers share.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub log: std::sync::Arc<EventLog>,
    pub keys: std::sync::Arc<KeyIds>,
}

impl dataflow::Replay for Replayed {
    #[inline]
    fn event(&self, event: u32) -> (usize, &Event) {
        let (source, event) = &self.log.events[event as usize];
        (*source, event)
    }

    #[inline]
    fn key(&self, event: u32, entity: u8) -> Option<u32> {
        self.keys.of(event, entity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::{click, shipped, txn};
    use schemas::ClickAction::View;

    #[test]
    fn each_entity_numbers_its_keys_and_events_without_the_field_have_none() {
        let set = shipped();
        let (card, user) = (
            set.entity_index("card").unwrap() as u8,
            set.entity_index("user").unwrap() as u8,
        );
        let log = EventLog {
            events: vec![
                txn(&set, "c1", "u1", 0),
                click(&set, "u2", View, 0),
                txn(&set, "c2", "u2", 0),
                txn(&set, "c1", "u3", 0),
            ],
            ..EventLog::default()
        };
        let mut keys = KeyIds::build(&log, &set);
        let ids = |entity| (0..4).map(|e| keys.of(e, entity)).collect::<Vec<_>>();
        assert_eq!(ids(card), vec![Some(0), None, Some(1), Some(0)]);
        assert_eq!(ids(user), vec![Some(0), Some(1), Some(1), Some(2)]);
        assert_eq!(keys.key(card, 1).as_str(), "c2");
        assert_eq!(keys.key(user, 2).as_str(), "u3");
        assert_eq!(keys.id(user, "u2"), 1);
        assert_eq!(keys.id(user, "never"), 3);
        assert_eq!(keys.key(user, 3).as_str(), "never");
        assert_eq!(keys.of(9, user), None);
    }
}
