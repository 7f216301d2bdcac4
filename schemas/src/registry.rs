//! Schema ids: the Confluent schema-registry REST API when
//! `SCHEMA_REGISTRY_URL` is set, otherwise the registry file shipped in
//! `schemas/registry.json`. Called only when a schema id is first seen, never
//! per record.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

use crate::avro::KNOWN_SCHEMAS;

/// Environment variable naming the schema registry base URL.
pub const REGISTRY_URL_ENV: &str = "SCHEMA_REGISTRY_URL";

/// The shipped registry file.
pub const SHIPPED_REGISTRY: &str = include_str!("../registry.json");

/// Why the registry could not answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("schema registry at {url} unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("schema registry answered {status} for {url}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("schema registry answer is not understood: {0}")]
    BadResponse(String),
    #[error("schema is not compatible with subject {0}")]
    Incompatible(String),
    #[error("schema does not parse: {0}")]
    InvalidSchema(String),
    #[error("registry file is invalid: {0}")]
    BadFile(String),
}

impl RegistryError {
    /// Whether the same call may succeed later (network or server trouble).
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Unreachable { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// A source of schemas by id, and of ids for schemas.
pub trait SchemaRegistry: Send + Sync + fmt::Debug {
    /// The schema text registered under `id`, or `None` if there is none.
    fn schema_by_id(&self, id: u32) -> Result<Option<String>, RegistryError>;
    /// Registers `schema` under `subject` (idempotent) and returns its id.
    fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError>;
    /// Whether `schema` may be registered as the next version of `subject`.
    fn check_compatibility(&self, subject: &str, schema: &str) -> Result<bool, RegistryError>;
}

/// The registry named by `SCHEMA_REGISTRY_URL`, or the shipped file.
pub fn from_env() -> Arc<dyn SchemaRegistry> {
    match std::env::var(REGISTRY_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => Arc::new(RestRegistry::new(url.trim())),
        _ => Arc::new(MemoryRegistry::shipped()),
    }
}

#[derive(Debug, Clone)]
struct Entry {
    id: u32,
    subject: String,
    schema: Schema,
    text: String,
}

/// An in-process registry: the shipped file, plus whatever is registered
/// while the process runs (compatibility mode BACKWARD, as Confluent's default).
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    entries: Mutex<Vec<Entry>>,
}

#[derive(serde::Deserialize)]
struct FileEntry {
    id: u32,
    subject: String,
    version: u32,
    file: String,
}

#[derive(serde::Deserialize)]
struct File {
    schemas: Vec<FileEntry>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// The registry of `schemas/registry.json`.
    pub fn shipped() -> Self {
        Self::from_file(SHIPPED_REGISTRY).expect("the shipped registry file is valid (tested)")
    }

    /// Parses a registry file whose entries name shipped `.avsc` files.
    pub fn from_file(json: &str) -> Result<Self, RegistryError> {
        let bad = |m: String| RegistryError::BadFile(m);
        let file: File = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
        let registry = MemoryRegistry::new();
        for e in file.schemas {
            let known = KNOWN_SCHEMAS
                .iter()
                .find(|k| format!("avro/{}.v{}.avsc", k.kind, k.version) == e.file)
                .ok_or_else(|| bad(format!("unknown schema file {}", e.file)))?;
            if known.version != e.version {
                return Err(bad(format!("{} is not version {}", e.file, e.version)));
            }
            registry.insert(e.id, &e.subject, known.text)?;
        }
        Ok(registry)
    }

    /// Adds `text` under a fixed `id`, with no compatibility check.
    pub fn insert(&self, id: u32, subject: &str, text: &str) -> Result<(), RegistryError> {
        let schema =
            Schema::parse_str(text).map_err(|e| RegistryError::InvalidSchema(e.to_string()))?;
        let mut entries = self
            .entries
            .lock()
            .expect("registry lock is never poisoned");
        if entries.iter().any(|e| e.id == id) {
            return Err(RegistryError::BadFile(format!("duplicate schema id {id}")));
        }
        entries.push(Entry {
            id,
            subject: subject.to_owned(),
            schema,
            text: text.to_owned(),
        });
        Ok(())
    }
}

fn parse(text: &str) -> Result<Schema, RegistryError> {
    Schema::parse_str(text).map_err(|e| RegistryError::InvalidSchema(e.to_string()))
}

impl SchemaRegistry for MemoryRegistry {
    fn schema_by_id(&self, id: u32) -> Result<Option<String>, RegistryError> {
        let entries = self
            .entries
            .lock()
            .expect("registry lock is never poisoned");
        Ok(entries.iter().find(|e| e.id == id).map(|e| e.text.clone()))
    }

    fn register(&self, subject: &str, text: &str) -> Result<u32, RegistryError> {
        let schema = parse(text)?;
        let canonical = schema.canonical_form();
        let mut entries = self
            .entries
            .lock()
            .expect("registry lock is never poisoned");
        let same = |e: &&Entry| e.schema.canonical_form() == canonical;
        if let Some(e) = entries.iter().filter(|e| e.subject == subject).find(same) {
            return Ok(e.id);
        }
        if let Some(latest) = entries.iter().rev().find(|e| e.subject == subject) {
            if SchemaCompatibility::can_read(&latest.schema, &schema).is_err() {
                return Err(RegistryError::Incompatible(subject.to_owned()));
            }
        }
        // Confluent gives one id to one schema, whatever the subject.
        let existing = entries.iter().find(same).map(|e| e.id);
        let id = existing.unwrap_or_else(|| entries.iter().map(|e| e.id).max().unwrap_or(0) + 1);
        entries.push(Entry {
            id,
            subject: subject.to_owned(),
            schema,
            text: text.to_owned(),
        });
        Ok(id)
    }

    fn check_compatibility(&self, subject: &str, text: &str) -> Result<bool, RegistryError> {
        let schema = parse(text)?;
        let entries = self
            .entries
            .lock()
            .expect("registry lock is never poisoned");
        Ok(match entries.iter().rev().find(|e| e.subject == subject) {
            Some(latest) => SchemaCompatibility::can_read(&latest.schema, &schema).is_ok(),
            None => true,
        })
    }
}

const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// A Confluent-compatible schema registry over HTTP (blocking; plain http).
#[derive(Debug, Clone)]
pub struct RestRegistry {
    base: String,
    agent: ureq::Agent,
}

impl RestRegistry {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:8081`).
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(3))
            .timeout(Duration::from_secs(10))
            .build();
        RestRegistry {
            base: base.trim_end_matches('/').to_owned(),
            agent,
        }
    }

    /// Sends a request; a 404 becomes `Ok(None)`.
    fn call(
        &self,
        path: &str,
        body: Option<&str>,
    ) -> Result<Option<serde_json::Value>, RegistryError> {
        let url = format!("{}{path}", self.base);
        let request = if body.is_some() {
            self.agent.post(&url)
        } else {
            self.agent.get(&url)
        }
        .set("Accept", CONTENT_TYPE);
        let result = match body {
            Some(b) => request.set("Content-Type", CONTENT_TYPE).send_string(b),
            None => request.call(),
        };
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(404, _)) => return Ok(None),
            Err(ureq::Error::Status(status, r)) => {
                let body = r.into_string().unwrap_or_default();
                return Err(RegistryError::Status { url, status, body });
            }
            Err(e) => {
                return Err(RegistryError::Unreachable {
                    url,
                    message: e.to_string(),
                })
            }
        };
        let text = response
            .into_string()
            .map_err(|e| RegistryError::Unreachable {
                url: url.clone(),
                message: e.to_string(),
            })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| RegistryError::BadResponse(e.to_string()))
    }

    fn schema_body(schema: &str) -> String {
        serde_json::json!({ "schema": schema }).to_string()
    }
}

fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl SchemaRegistry for RestRegistry {
    fn schema_by_id(&self, id: u32) -> Result<Option<String>, RegistryError> {
        let Some(body) = self.call(&format!("/schemas/ids/{id}"), None)? else {
            return Ok(None);
        };
        body.get("schema")
            .and_then(|s| s.as_str())
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| RegistryError::BadResponse(format!("no schema in {body}")))
    }

    fn register(&self, subject: &str, schema: &str) -> Result<u32, RegistryError> {
        let path = format!("/subjects/{}/versions", path_segment(subject));
        match self.call(&path, Some(&Self::schema_body(schema))) {
            Err(RegistryError::Status { status: 409, .. }) => {
                Err(RegistryError::Incompatible(subject.to_owned()))
            }
            Err(e) => Err(e),
            Ok(None) => Err(RegistryError::BadResponse(format!(
                "404 registering under {subject}"
            ))),
            Ok(Some(body)) => body
                .get("id")
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| RegistryError::BadResponse(format!("no id in {body}"))),
        }
    }

    fn check_compatibility(&self, subject: &str, schema: &str) -> Result<bool, RegistryError> {
        let path = format!(
            "/compatibility/subjects/{}/versions/latest",
            path_segment(subject)
        );
        match self.call(&path, Some(&Self::schema_body(schema)))? {
            // No subject yet: anything is compatible with nothing.
            None => Ok(true),
            Some(body) => body
                .get("is_compatible")
                .and_then(|v| v.as_bool())
                .ok_or_else(|| RegistryError::BadResponse(format!("no is_compatible in {body}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::avro::EventKind;

    #[test]
    fn the_shipped_file_covers_every_shipped_schema_with_stable_ids() {
        let r = MemoryRegistry::shipped();
        let expected = [
            (1, EventKind::Txn, 1),
            (2, EventKind::Txn, 2),
            (3, EventKind::Click, 1),
            (4, EventKind::Click, 2),
            (5, EventKind::Label, 1),
        ];
        for (id, kind, version) in expected {
            assert_eq!(
                r.schema_by_id(id).unwrap().as_deref(),
                Some(kind.known(version).unwrap().text)
            );
            assert_eq!(
                r.register(&kind.subject(), kind.known(version).unwrap().text),
                Ok(id)
            );
        }
        assert_eq!(r.schema_by_id(99), Ok(None));
    }

    #[test]
    fn memory_registry_enforces_backward_compatibility() {
        let r = MemoryRegistry::shipped();
        let breaking = EventKind::Txn.known(2).unwrap().text.replace(
            r#"{"name": "device_id", "type": ["null", "string"], "default": null},"#,
            r#"{"name": "device_id", "type": "string"},"#,
        );
        assert_ne!(breaking, EventKind::Txn.known(2).unwrap().text);
        assert_eq!(
            r.check_compatibility("txn.events-value", &breaking),
            Ok(false)
        );
        assert_eq!(
            r.register("txn.events-value", &breaking),
            Err(RegistryError::Incompatible("txn.events-value".into()))
        );
        assert_eq!(r.check_compatibility("new-subject", &breaking), Ok(true));
        // The same schema under another subject keeps its id.
        assert_eq!(
            r.register("other.txn-value", EventKind::Txn.known(1).unwrap().text),
            Ok(1)
        );
    }

    #[test]
    fn a_bad_registry_file_is_rejected() {
        let bad =
            r#"{"schemas": [{"id": 1, "subject": "s", "version": 1, "file": "avro/nope.avsc"}]}"#;
        assert!(matches!(
            MemoryRegistry::from_file(bad),
            Err(RegistryError::BadFile(_))
        ));
    }
}
