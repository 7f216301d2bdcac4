//! Feast-compatible online serving: `POST /get-online-features`, the route
//! of Feast's feature server (0.67), so that Feast's Python SDK with
//! `online_store: type: remote` (see `sfs feast init`) reads sfs's rows.
//!
//! Request (JSON): `entities` (join key -> column of ids), and either
//! `feature_service` (a `[[feature_services]]` name) or `features`
//! (`"view:feature"` references to `[[feature_views]]`), `full_feature_names`
//! (names `view__feature`), `include_feature_view_version_metadata`.
//!
//! Response, column-major like Feast's: `metadata.feature_names` (the join
//! keys the views need, in request order, then the features) and one
//! `results[]` entry per name with `values`, `statuses` and
//! `event_timestamps` (RFC 3339 UTC). A join key column is all `PRESENT` at
//! the epoch. A feature is `PRESENT` with the row's value and its `_as_of` as
//! timestamp, `NOT_FOUND` (null, epoch) without a row, `OUTSIDE_MAX_AGE` (with
//! the value) when the row is older than the view's `ttl`, or `NULL_VALUE`
//! (null) for a non-finite real. A row is as fresh as the later of its
//! `_as_of` and the stream job's durable frontier: a row that did not change
//! stays exact as of later frontiers, so only a stalled job makes rows stale.
//! Integers are JSON integers, reals always carry a decimal point or an
//! exponent (the SDK types `1` as int64 and `1.0` as double).
//!
//! Errors are Feast's: an unknown view or service is a 404 whose body is the
//! JSON string of `{"module", "class", "message"}` (what Feast's
//! `FeastError.to_error_detail` gives, so the SDK can rebuild the exception);
//! other bad requests are 400 with the JSON string of the message (Feast
//! answers some of those with 500: sfs never does for bad input); a body that
//! is not JSON of the right shape is a 422 `{"detail": [...]}` like FastAPI's.
//! All rows of a request come from one pipelined Redis round trip.

use std::fmt::Write as _;

use schemas::features::{FeatureRow, FeatureSet};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::json;

use crate::app::AppState;
use crate::error::ApiError;

/// Settings of the Feast route (`feast_*` keys of the serve config).
#[derive(Debug, Clone)]
pub struct FeastSettings {
    /// Most entity rows in one request.
    pub max_entities: usize,
    /// The Feast project name, as the generated repository and the error
    /// messages spell it.
    pub project: String,
}

impl Default for FeastSettings {
    fn default() -> Self {
        FeastSettings {
            max_entities: DEFAULT_MAX_ENTITIES,
            project: DEFAULT_PROJECT.into(),
        }
    }
}

/// Default of `feast_max_entities`.
pub const DEFAULT_MAX_ENTITIES: usize = 1000;
/// Default of `feast_project`.
pub const DEFAULT_PROJECT: &str = "sfs";
/// The timestamp Feast gives join keys and missing rows.
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// A failed Feast request: the status and the exact body.
#[derive(Debug, Clone, PartialEq)]
pub struct FeastError {
    pub status: u16,
    pub body: String,
}

impl FeastError {
    /// Feast's `FeastError.to_error_detail()`, as FastAPI sends it: a JSON
    /// string holding a JSON document.
    fn detail(status: u16, class: &str, message: String) -> FeastError {
        let doc = json!({"module": "feast.errors", "class": class, "message": message}).to_string();
        FeastError {
            status,
            body: serde_json::Value::String(doc).to_string(),
        }
    }

    /// A plain message, as the JSON string Feast sends for other errors.
    fn message(status: u16, message: String) -> FeastError {
        FeastError {
            status,
            body: serde_json::Value::String(message).to_string(),
        }
    }

    /// FastAPI's request-validation error.
    fn unprocessable(kind: &str, loc: serde_json::Value, msg: String) -> FeastError {
        FeastError {
            status: 422,
            body: json!({"detail": [{"type": kind, "loc": loc, "msg": msg}]}).to_string(),
        }
    }

    /// The error of a store failure (503) or an unreadable row (500): the
    /// server's own failures, not the request's.
    pub fn from_api(e: &ApiError) -> FeastError {
        FeastError::message(e.status().as_u16(), e.to_string())
    }
}

/// An entity value as sent: ids are strings; integers are taken as their
/// decimal form (Feast does the same for a string join key).
#[derive(Debug, Clone, PartialEq)]
struct EntityColumn {
    key: String,
    ids: Vec<String>,
}

/// The `entities` object, in request order.
#[derive(Debug, Default)]
struct Entities(Vec<EntityColumn>);

impl<'de> Deserialize<'de> for Entities {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Columns;
        impl<'de> Visitor<'de> for Columns {
            type Value = Entities;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of join key -> list of ids")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Entities, A::Error> {
                let mut out = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let Ids(ids) = map.next_value_seed(IdsOf(&key))?;
                    out.push(EntityColumn { key, ids });
                }
                Ok(Entities(out))
            }
        }
        d.deserialize_map(Columns)
    }
}

struct Ids(Vec<String>);
struct IdsOf<'a>(&'a str);

impl<'de> de::DeserializeSeed<'de> for IdsOf<'_> {
    type Value = Ids;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Ids, D::Error> {
        struct Seq<'a>(&'a str);
        impl<'de> Visitor<'de> for Seq<'_> {
            type Value = Ids;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "entities.{}: a list of string ids", self.0)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Ids, A::Error> {
                let mut ids = Vec::with_capacity(seq.size_hint().unwrap_or(1));
                while let Some(v) = seq.next_element::<serde_json::Value>()? {
                    let id = match v {
                        serde_json::Value::String(s) => s,
                        serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
                        other => {
                            return Err(de::Error::custom(format!(
                                "entities.{}[{}]: {other} is not an id (a string or an integer)",
                                self.0,
                                ids.len()
                            )))
                        }
                    };
                    ids.push(id);
                }
                Ok(Ids(ids))
            }
        }
        d.deserialize_seq(Seq(self.0))
    }
}

/// The request body (unknown members are ignored, as FastAPI does).
#[derive(Debug, Deserialize)]
struct FeastRequest {
    entities: Entities,
    #[serde(default)]
    feature_service: Option<String>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    full_feature_names: bool,
    #[serde(default)]
    include_feature_view_version_metadata: bool,
}

/// One requested feature: view index, position in the entity's row, name.
#[derive(Debug)]
struct Column {
    view: usize,
    feature: usize,
    name: String,
}

/// `POST /get-online-features` over the request body (or the error reading it).
pub async fn get_online_features(
    state: &AppState,
    body: Result<bytes::Bytes, ApiError>,
) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    let result = async {
        let body = body.map_err(|e| FeastError::message(e.status().as_u16(), e.to_string()))?;
        let set = state.store.features();
        let plan = Plan::parse(&body, set, &state.feast)?;
        let reads = plan.reads();
        let (rows, frontier) = state
            .store
            .rows_many(&state.metrics, &reads)
            .await
            .map_err(|e| FeastError::from_api(&e))?;
        Ok::<_, FeastError>(plan.respond(set, &rows, frontier, now_ms()))
    }
    .await;
    let (status, body) = match result {
        Ok(body) => (200, body),
        Err(e) => (e.status, e.body),
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
    *resp.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::BAD_REQUEST);
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A parsed and resolved request: what to read and how to answer.
#[derive(Debug)]
pub struct Plan {
    /// The join keys the views need, in request order, with their ids.
    keys: Vec<(String, Vec<String>)>,
    /// For each entity index of the set, the position in `keys` of its join
    /// key column, if the request reads it.
    key_of_entity: Vec<Option<usize>>,
    columns: Vec<Column>,
    /// Views in first-use order, for the version metadata.
    views_used: Vec<usize>,
    include_metadata: bool,
    rows: usize,
}

impl Plan {
    /// Parses `body` and resolves it against `set`.
    pub fn parse(body: &[u8], set: &FeatureSet, s: &FeastSettings) -> Result<Plan, FeastError> {
        let req: FeastRequest = serde_json::from_slice(body).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Syntax | Category::Eof | Category::Io => FeastError::unprocessable(
                    "json_invalid",
                    json!(["body", e.column()]),
                    format!("JSON decode error: {e}"),
                ),
                Category::Data => {
                    let text = e.to_string();
                    if text.starts_with("missing field `entities`") {
                        FeastError::unprocessable(
                            "missing",
                            json!(["body", "entities"]),
                            "Field required".into(),
                        )
                    } else {
                        FeastError::unprocessable("value_error", json!(["body"]), text)
                    }
                }
            }
        })?;
        Plan::resolve(req, set, s)
    }

    fn resolve(req: FeastRequest, set: &FeatureSet, s: &FeastSettings) -> Result<Plan, FeastError> {
        let project = &s.project;
        let mut columns: Vec<Column> = Vec::new();
        let name = |view: usize, feature: usize| {
            let v = &set.views[view];
            let f = &set.entities[v.entity].features[feature].name;
            if req.full_feature_names {
                format!("{}__{f}", v.name)
            } else {
                f.clone()
            }
        };
        if let Some(service) = &req.feature_service {
            let Some(svc) = set.service(service) else {
                return Err(FeastError::detail(
                    404,
                    "FeatureServiceNotFoundException",
                    format!("Feature service {service} does not exist in project {project}"),
                ));
            };
            for &(view, feature) in &svc.features {
                columns.push(Column {
                    view,
                    feature,
                    name: name(view, feature),
                });
            }
        } else {
            for reference in &req.features {
                let Some((view_name, feature)) = reference.split_once(':') else {
                    return Err(FeastError::message(
                        400,
                        format!("Invalid feature reference '{reference}'. Expected format: '<feature_view>:<feature>'"),
                    ));
                };
                let Some(view) = set.views.iter().position(|v| v.name == view_name) else {
                    return Err(FeastError::detail(
                        404,
                        "FeatureViewNotFoundException",
                        format!("Feature view {view_name} does not exist in project {project}"),
                    ));
                };
                let v = &set.views[view];
                let entity = &set.entities[v.entity];
                let Some(pos) = entity.position(feature).filter(|p| v.features.contains(p)) else {
                    return Err(FeastError::detail(
                        404,
                        "FeastObjectNotFoundException",
                        format!("Feature {feature} not found in projection {view_name}"),
                    ));
                };
                columns.push(Column {
                    view,
                    feature: pos,
                    name: name(view, pos),
                });
            }
        }
        if columns.is_empty() {
            return Err(FeastError::message(
                400,
                "No features specified for retrieval".into(),
            ));
        }
        let mut seen = std::collections::HashSet::with_capacity(columns.len());
        for c in &columns {
            if !seen.insert(c.name.as_str()) {
                let bare = &set.entities[set.views[c.view].entity].features[c.feature].name;
                return Err(FeastError::detail(
                    400,
                    "FeatureNameCollisionError",
                    if req.full_feature_names {
                        format!("Duplicate features named {} found.", c.name)
                    } else {
                        format!("Duplicate features named {bare} found.\nTo resolve this collision, either use the full feature name by setting 'full_feature_names=True', or ensure that the features in question have different names.")
                    },
                ));
            }
        }

        // Join keys: every entity a requested view reads needs its column.
        let mut views_used: Vec<usize> = Vec::new();
        let mut needed: Vec<usize> = Vec::new();
        for c in &columns {
            if !views_used.contains(&c.view) {
                views_used.push(c.view);
            }
            let e = set.views[c.view].entity;
            if !needed.contains(&e) {
                needed.push(e);
            }
        }
        let given: Vec<&str> = req.entities.0.iter().map(|c| c.key.as_str()).collect();
        let missing: Vec<String> = needed
            .iter()
            .map(|&e| set.entities[e].key.clone())
            .filter(|k| !given.contains(&k.as_str()))
            .collect();
        if !missing.is_empty() {
            return Err(FeastError::message(
                400,
                format!(
                    "Missing join key values for keys: {missing:?}. Provided join_key_values: {given:?}"
                ),
            ));
        }
        let rows = req.entities.0.first().map_or(0, |c| c.ids.len());
        if let Some(c) = req.entities.0.iter().find(|c| c.ids.len() != rows) {
            return Err(FeastError::message(
                400,
                format!(
                    "All entity rows must have the same columns: entities.{} has {} values, entities.{} has {rows}",
                    c.key,
                    c.ids.len(),
                    req.entities.0[0].key
                ),
            ));
        }
        if rows > s.max_entities {
            return Err(FeastError::message(
                400,
                format!(
                    "{rows} entity rows in one request, at most {} (feast_max_entities of the serve config)",
                    s.max_entities
                ),
            ));
        }
        let mut key_of_entity = vec![None; set.entities.len()];
        let mut keys = Vec::new();
        for col in req.entities.0 {
            let entities: Vec<usize> = needed
                .iter()
                .copied()
                .filter(|&e| set.entities[e].key == col.key)
                .collect();
            if entities.is_empty() {
                continue; // Feast drops join keys no requested view reads.
            }
            if let Some(bad) = col.ids.iter().position(|id| id.is_empty()) {
                return Err(FeastError::message(
                    400,
                    format!("entities.{}[{bad}] is empty", col.key),
                ));
            }
            for e in entities {
                key_of_entity[e] = Some(keys.len());
            }
            keys.push((col.key, col.ids));
        }
        Ok(Plan {
            keys,
            key_of_entity,
            columns,
            views_used,
            include_metadata: req.include_feature_view_version_metadata,
            rows,
        })
    }

    /// The reads of the plan, one per (needed entity, row), as
    /// `(entity index, id)`; `index(entity, row)` finds a read in them.
    pub fn reads(&self) -> Vec<(usize, &str)> {
        let mut reads = Vec::with_capacity(self.keys.len() * self.rows);
        for (entity, key) in self.key_of_entity.iter().enumerate() {
            if let Some(k) = key {
                reads.extend(self.keys[*k].1.iter().map(|id| (entity, id.as_str())));
            }
        }
        reads
    }

    /// The response body over the rows of [`Plan::reads`], in order.
    pub fn respond(
        &self,
        set: &FeatureSet,
        rows: &[Option<FeatureRow>],
        frontier_ms: Option<i64>,
        now_ms: i64,
    ) -> String {
        // Where each entity's rows start in `rows`.
        let mut start = vec![0usize; set.entities.len()];
        let mut at = 0;
        for (entity, key) in self.key_of_entity.iter().enumerate() {
            if key.is_some() {
                start[entity] = at;
                at += self.rows;
            }
        }
        let mut out = String::with_capacity(64 + self.columns.len() * self.rows * 48);
        out.push_str("{\"metadata\":{\"feature_names\":[");
        let names = self
            .keys
            .iter()
            .map(|(k, _)| k.as_str())
            .chain(self.columns.iter().map(|c| c.name.as_str()));
        for (i, name) in names.enumerate() {
            if i > 0 {
                out.push(',');
            }
            push_str(&mut out, name);
        }
        out.push(']');
        if self.include_metadata {
            out.push_str(",\"feature_view_metadata\":[");
            for (i, &v) in self.views_used.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str("{\"name\":");
                push_str(&mut out, &set.views[v].name);
                out.push('}');
            }
            out.push(']');
        }
        out.push_str("},\"results\":[");
        let mut first = true;
        let mut sep = |out: &mut String| {
            if !first {
                out.push(',');
            }
            first = false;
        };
        for (_, ids) in &self.keys {
            sep(&mut out);
            out.push_str("{\"values\":[");
            for (i, id) in ids.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_str(&mut out, id);
            }
            out.push_str("],\"statuses\":[");
            repeat(&mut out, "\"PRESENT\"", ids.len());
            out.push_str("],\"event_timestamps\":[");
            repeat(&mut out, "\"1970-01-01T00:00:00Z\"", ids.len());
            out.push_str("]}");
        }
        // Per row of each view: its status and timestamp, shared by its columns.
        let mut cache: Vec<Option<(Vec<Status>, Vec<String>)>> = vec![None; set.views.len()];
        for c in &self.columns {
            let view = &set.views[c.view];
            let base = start[view.entity];
            let (statuses, stamps) = cache[c.view].get_or_insert_with(|| {
                (0..self.rows)
                    .map(|r| match &rows[base + r] {
                        None => (Status::NotFound, EPOCH.to_owned()),
                        Some(row) => {
                            let fresh_as_of = row.as_of_ms.max(frontier_ms.unwrap_or(i64::MIN));
                            let stale = view
                                .ttl_ms
                                .is_some_and(|ttl| now_ms - fresh_as_of > ttl as i64);
                            let status = if stale {
                                Status::OutsideMaxAge
                            } else {
                                Status::Present
                            };
                            (status, rfc3339(row.as_of_ms))
                        }
                    })
                    .unzip()
            });
            sep(&mut out);
            out.push_str("{\"values\":[");
            let mut final_statuses = Vec::with_capacity(self.rows);
            for r in 0..self.rows {
                if r > 0 {
                    out.push(',');
                }
                let mut status = statuses[r];
                match &rows[base + r] {
                    None => out.push_str("null"),
                    Some(row) => match row.values[c.feature] {
                        schemas::Value::Int(i) => {
                            let _ = write!(out, "{i}");
                        }
                        schemas::Value::Float(f) if f.is_finite() => push_float(&mut out, f),
                        schemas::Value::Float(_) => {
                            out.push_str("null");
                            status = Status::NullValue;
                        }
                    },
                }
                final_statuses.push(status);
            }
            out.push_str("],\"statuses\":[");
            for (r, s) in final_statuses.iter().enumerate() {
                if r > 0 {
                    out.push(',');
                }
                out.push_str(s.json());
            }
            out.push_str("],\"event_timestamps\":[");
            for (r, t) in stamps.iter().enumerate() {
                if r > 0 {
                    out.push(',');
                }
                out.push('"');
                out.push_str(t);
                out.push('"');
            }
            out.push_str("]}");
        }
        out.push_str("]}");
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Present,
    NotFound,
    NullValue,
    OutsideMaxAge,
}

impl Status {
    fn json(self) -> &'static str {
        match self {
            Status::Present => "\"PRESENT\"",
            Status::NotFound => "\"NOT_FOUND\"",
            Status::NullValue => "\"NULL_VALUE\"",
            Status::OutsideMaxAge => "\"OUTSIDE_MAX_AGE\"",
        }
    }
}

fn repeat(out: &mut String, item: &str, n: usize) {
    for i in 0..n {
        if i > 0 {
            out.push(',');
        }
        out.push_str(item);
    }
}

/// A JSON string literal.
fn push_str(out: &mut String, s: &str) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&serde_json::Value::from(s).to_string());
    }
}

/// A finite real as JSON, always with a decimal point or an exponent (serde
/// writes `1.0`, never `1`), so the SDK reads it back as a double.
fn push_float(out: &mut String, f: f64) {
    let text = serde_json::Value::from(f).to_string();
    out.push_str(&text);
    if !text.contains(['.', 'e', 'E']) {
        out.push_str(".0");
    }
}

/// RFC 3339 UTC of a time in ms since the epoch, as Feast writes it: no
/// fraction on whole seconds, else milliseconds.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (tod / 3600, tod % 3600 / 60, tod % 60);
    if milli == 0 {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
    } else {
        format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED: &str = include_str!("../../features.toml");

    fn set() -> FeatureSet {
        FeatureSet::parse("features.toml", SHIPPED).unwrap()
    }

    fn plan(body: &str) -> Result<Plan, FeastError> {
        Plan::parse(body.as_bytes(), &set(), &FeastSettings::default())
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), EPOCH);
        // 2024-02-29T12:34:56.789Z, a leap day, computed by hand:
        // 19782 days after 1970-01-01, 45296.789 s into the day.
        assert_eq!(
            rfc3339(19_782 * 86_400_000 + 45_296_789),
            "2024-02-29T12:34:56.789Z"
        );
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(-1000), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn floats_keep_a_decimal_point() {
        let mut s = String::new();
        push_float(&mut s, 1.0);
        s.push(' ');
        push_float(&mut s, 2.5);
        s.push(' ');
        push_float(&mut s, 1e300);
        assert_eq!(s, "1.0 2.5 1e+300");
    }

    #[test]
    fn errors_name_what_is_unknown() {
        let e = plan(r#"{"features":["nope:x"],"entities":{"card_id":["c"]}}"#).unwrap_err();
        assert_eq!(e.status, 404);
        let doc: String = serde_json::from_str(&e.body).unwrap();
        let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
        assert_eq!(doc["class"], "FeatureViewNotFoundException");
        assert_eq!(
            doc["message"],
            "Feature view nope does not exist in project sfs"
        );

        let e = plan(r#"{"features":["card_features:nope"],"entities":{"card_id":["c"]}}"#)
            .unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e
            .body
            .contains("Feature nope not found in projection card_features"));

        let e = plan(r#"{"feature_service":"v9","entities":{"card_id":["c"]}}"#).unwrap_err();
        assert_eq!(e.status, 404);
        assert!(e.body.contains("Feature service v9 does not exist"));

        let e = plan(r#"{"features":["card_features:txn_count_1m"],"entities":{"user_id":["u"]}}"#)
            .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.contains("card_id"), "{}", e.body);

        let e = plan(r#"{"features":["card_features:txn_count_1m"]}"#).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.body.contains("entities"));

        let e =
            plan(r#"{"features":["card_features:txn_count_1m"],"entities":{"card_id":[null]}}"#)
                .unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.body.contains("entities.card_id[0]"), "{}", e.body);

        let e = plan("{").unwrap_err();
        assert_eq!(e.status, 422);
    }

    #[test]
    fn colliding_names_need_full_feature_names() {
        let both = r#"["card_features:txn_count_24h","user_features:txn_count_24h"]"#;
        let e = plan(&format!(
            r#"{{"features":{both},"entities":{{"card_id":["c"],"user_id":["u"]}}}}"#
        ))
        .unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.contains("FeatureNameCollisionError"));
        let p = plan(&format!(
            r#"{{"features":{both},"entities":{{"user_id":["u"],"card_id":["c"]}},"full_feature_names":true}}"#
        ))
        .unwrap();
        let keys: Vec<&str> = p.keys.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["user_id", "card_id"], "request order");
        assert_eq!(p.columns[0].name, "card_features__txn_count_24h");
    }

    #[test]
    fn too_many_entities_are_refused() {
        let ids: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
        let body =
            json!({"features": ["card_features:txn_count_1m"], "entities": {"card_id": ids}});
        let s = FeastSettings {
            max_entities: 2,
            ..Default::default()
        };
        let e = Plan::parse(body.to_string().as_bytes(), &set(), &s).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.contains("feast_max_entities"), "{}", e.body);
    }
}
