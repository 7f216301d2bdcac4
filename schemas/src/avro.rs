//! The versioned Avro schemas of `schemas/avro/`, embedded at build time,
//! and the event kinds they describe.

use std::sync::OnceLock;

use apache_avro::Schema;

use crate::event::{CLICK_TOPIC, LABEL_TOPIC, TXN_TOPIC};

/// The three event streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    Txn,
    Click,
    Label,
}

/// One schema version of one kind, as shipped in `schemas/avro/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KnownSchema {
    pub kind: EventKind,
    pub version: u32,
    /// The `.avsc` text.
    pub text: &'static str,
}

/// Every shipped schema, oldest version first within a kind.
pub const KNOWN_SCHEMAS: &[KnownSchema] = &[
    KnownSchema {
        kind: EventKind::Txn,
        version: 1,
        text: include_str!("../avro/txn.v1.avsc"),
    },
    KnownSchema {
        kind: EventKind::Txn,
        version: 2,
        text: include_str!("../avro/txn.v2.avsc"),
    },
    KnownSchema {
        kind: EventKind::Click,
        version: 1,
        text: include_str!("../avro/click.v1.avsc"),
    },
    KnownSchema {
        kind: EventKind::Click,
        version: 2,
        text: include_str!("../avro/click.v2.avsc"),
    },
    KnownSchema {
        kind: EventKind::Label,
        version: 1,
        text: include_str!("../avro/label.v1.avsc"),
    },
];

impl EventKind {
    pub const ALL: [EventKind; 3] = [EventKind::Txn, EventKind::Click, EventKind::Label];

    /// `txn`, `click` or `label`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Txn => "txn",
            EventKind::Click => "click",
            EventKind::Label => "label",
        }
    }

    /// The default topic of this kind.
    pub fn topic(self) -> &'static str {
        match self {
            EventKind::Txn => TXN_TOPIC,
            EventKind::Click => CLICK_TOPIC,
            EventKind::Label => LABEL_TOPIC,
        }
    }

    /// The registry subject of this kind on `topic` (Confluent's
    /// TopicNameStrategy: `<topic>-value`).
    pub fn subject_for(topic: &str) -> String {
        format!("{topic}-value")
    }

    /// The registry subject of this kind on its default topic.
    pub fn subject(self) -> String {
        Self::subject_for(self.topic())
    }

    /// The newest shipped version.
    pub fn latest_version(self) -> u32 {
        match self {
            EventKind::Txn | EventKind::Click => 2,
            EventKind::Label => 1,
        }
    }

    /// The shipped versions, oldest first.
    pub fn versions(self) -> impl Iterator<Item = u32> {
        1..=self.latest_version()
    }

    /// The shipped schema of `version`, if there is one.
    pub fn known(self, version: u32) -> Option<&'static KnownSchema> {
        KNOWN_SCHEMAS
            .iter()
            .find(|k| k.kind == self && k.version == version)
    }

    /// The parsed schema of `version`, parsed once per process.
    pub fn schema(self, version: u32) -> Option<&'static Schema> {
        let index = KNOWN_SCHEMAS
            .iter()
            .position(|k| k.kind == self && k.version == version)?;
        Some(&parsed()[index].0)
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The shipped schemas parsed, with their Parsing Canonical Form, in
/// `KNOWN_SCHEMAS` order.
fn parsed() -> &'static [(Schema, String)] {
    static PARSED: OnceLock<Vec<(Schema, String)>> = OnceLock::new();
    PARSED.get_or_init(|| {
        KNOWN_SCHEMAS
            .iter()
            .map(|k| {
                let schema =
                    Schema::parse_str(k.text).expect("shipped schemas are valid avro (tested)");
                let canonical = schema.canonical_form();
                (schema, canonical)
            })
            .collect()
    })
}

/// The shipped schema whose binary encoding equals that of `schema` (same
/// Parsing Canonical Form), if any.
pub fn identify(schema: &Schema) -> Option<&'static KnownSchema> {
    let canonical = schema.canonical_form();
    parsed()
        .iter()
        .position(|(_, c)| *c == canonical)
        .map(|i| &KNOWN_SCHEMAS[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_schema_parses_and_is_identified_as_itself() {
        for k in KNOWN_SCHEMAS {
            let schema = Schema::parse_str(k.text).unwrap();
            assert_eq!(identify(&schema), Some(k));
            assert!(k.kind.schema(k.version).is_some());
        }
        assert_eq!(
            KNOWN_SCHEMAS.len(),
            EventKind::ALL
                .iter()
                .map(|k| k.versions().count())
                .sum::<usize>()
        );
    }

    #[test]
    fn newer_versions_read_older_ones_and_the_reverse() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        for kind in EventKind::ALL {
            for v in kind.versions().skip(1) {
                let (old, new) = (kind.schema(v - 1).unwrap(), kind.schema(v).unwrap());
                SchemaCompatibility::mutual_read(old, new).unwrap();
            }
        }
    }
}
