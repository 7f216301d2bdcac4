//! A brute-force interpreter of feature definitions: the rows as of a
//! frontier, recomputed from scratch over an event log.
//!
//! It reads the definitions as plain TOML (`toml::Value`), not through the
//! crate's parser, and shares no code or constants with the graph: fields,
//! aggregations, windows and the country encoding are all spelled out here,
//! from the documentation (docs/FEATURES.md).

use std::collections::{BTreeMap, BTreeSet};

use schemas::event::{Channel, Click, ClickAction, Txn};

/// A value as the interpreter computes it: integers, or floats by their bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Val {
    Int(i64),
    FloatBits(u64),
}

/// A field of an event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    Int(i64),
    Str(String),
}

/// Two uppercase ASCII letters as `(first << 8) | second`; 0 otherwise.
fn country_code(code: &str) -> i64 {
    let b = code.as_bytes();
    if b.len() == 2 && b.iter().all(|c| c.is_ascii_uppercase()) {
        (b[0] as i64) * 256 + b[1] as i64
    } else {
        0
    }
}

enum Ev<'a> {
    Txn(&'a Txn),
    Click(&'a Click),
}

impl Ev<'_> {
    fn get(&self, name: &str) -> Option<Field> {
        let s = |v: &String| Some(Field::Str(v.clone()));
        match self {
            Ev::Txn(t) => match name {
                "event_id" => s(&t.event_id),
                "card_id" => s(&t.card_id),
                "user_id" => s(&t.user_id),
                "merchant_id" => s(&t.merchant_id),
                "mcc" => Some(Field::Int(t.mcc as i64)),
                "amount_minor" => Some(Field::Int(t.amount_minor)),
                "currency" => s(&t.currency),
                "country" => Some(Field::Int(country_code(&t.country))),
                "channel" => Some(Field::Str(
                    match t.channel {
                        Channel::Pos => "pos",
                        Channel::Ecom => "ecom",
                        Channel::Atm => "atm",
                    }
                    .into(),
                )),
                "event_time" => Some(Field::Int(t.event_time)),
                "device_id" => t.device_id.as_ref().and_then(s),
                "ip_country" => t.ip_country.as_deref().map(|c| Field::Int(country_code(c))),
                other => panic!("interpreter: no txn field {other}"),
            },
            Ev::Click(c) => match name {
                "event_id" => s(&c.event_id),
                "user_id" => s(&c.user_id),
                "session_id" => s(&c.session_id),
                "item_id" => s(&c.item_id),
                "category" => s(&c.category),
                "action" => Some(Field::Str(
                    match c.action {
                        ClickAction::View => "view",
                        ClickAction::AddToCart => "add_to_cart",
                        ClickAction::Purchase => "purchase",
                    }
                    .into(),
                )),
                "event_time" => Some(Field::Int(c.event_time)),
                "dwell_ms" => c.dwell_ms.map(|d| Field::Int(d as i64)),
                other => panic!("interpreter: no click field {other}"),
            },
        }
    }

    fn time(&self) -> i64 {
        match self {
            Ev::Txn(t) => t.event_time,
            Ev::Click(c) => c.event_time,
        }
    }
}

fn window_ms(text: &str) -> u64 {
    let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n: u64 = digits.parse().expect("window number");
    n * match &text[digits.len()..] {
        "ms" => 1,
        "s" => 1000,
        "m" => 60 * 1000,
        "h" => 60 * 60 * 1000,
        "d" => 24 * 60 * 60 * 1000,
        unit => panic!("interpreter: unit {unit}"),
    }
}

struct Feature {
    name: String,
    schema: String,
    aggregation: String,
    field: Option<String>,
    window: u64,
    filter: Vec<(String, Field)>,
}

struct EntityDef {
    name: String,
    key: String,
    features: Vec<Feature>,
}

/// The definitions, as the interpreter understands them.
pub struct Definitions {
    entities: Vec<EntityDef>,
    tick_ms: u64,
}

impl Definitions {
    /// Reads `toml` for a graph quantizing time to `tick_ms`.
    pub fn new(toml_text: &str, tick_ms: u64) -> Definitions {
        let doc: toml::Value = toml::from_str(toml_text).expect("definitions are TOML");
        let table = |v: &toml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
        let mut schema_of = BTreeMap::new();
        for s in doc["sources"].as_array().expect("sources") {
            schema_of.insert(table(s, "name").unwrap(), table(s, "schema").unwrap());
        }
        let mut entities: Vec<EntityDef> = doc["entities"]
            .as_array()
            .expect("entities")
            .iter()
            .map(|e| EntityDef {
                name: table(e, "name").unwrap(),
                key: table(e, "key").unwrap(),
                features: Vec::new(),
            })
            .collect();
        for f in doc["features"].as_array().expect("features") {
            let entity = table(f, "entity").unwrap();
            let filter = f
                .get("filter")
                .and_then(|v| v.as_table())
                .map(|t| {
                    t.iter()
                        .map(|(k, v)| {
                            let value = match v {
                                toml::Value::Integer(i) => Field::Int(*i),
                                toml::Value::String(s) if k.ends_with("country") => {
                                    Field::Int(country_code(s))
                                }
                                toml::Value::String(s) => Field::Str(s.clone()),
                                other => panic!("interpreter: filter value {other}"),
                            };
                            (k.clone(), value)
                        })
                        .collect()
                })
                .unwrap_or_default();
            let feature = Feature {
                name: table(f, "name").unwrap(),
                schema: schema_of[&table(f, "source").unwrap()].clone(),
                aggregation: table(f, "aggregation").unwrap(),
                field: table(f, "field"),
                window: window_ms(&table(f, "window").unwrap()),
                filter,
            };
            entities
                .iter_mut()
                .find(|e| e.name == entity)
                .expect("entity")
                .features
                .push(feature);
        }
        Definitions { entities, tick_ms }
    }

    /// Every row as of `as_of`: `(entity, id) -> values in file order`.
    pub fn rows_as_of(
        &self,
        txns: &[Txn],
        clicks: &[Click],
        as_of: u64,
    ) -> BTreeMap<(String, String), Vec<Val>> {
        let events: Vec<(&str, Ev)> = txns
            .iter()
            .map(|t| ("txn", Ev::Txn(t)))
            .chain(clicks.iter().map(|c| ("click", Ev::Click(c))))
            .collect();
        let tick = self.tick_ms as i64;
        let quantized = |e: &Ev| {
            let t = e.time().max(0);
            (t - t % tick) as u64
        };
        let inside = |e: &Ev, window: u64| {
            let q = quantized(e);
            q < as_of && q + window >= as_of
        };
        let counts = |f: &Feature, schema: &str, e: &Ev| {
            f.schema == schema
                && f.field.as_ref().is_none_or(|name| e.get(name).is_some())
                && f.filter.iter().all(|(k, v)| e.get(k).as_ref() == Some(v))
        };
        let mut rows = BTreeMap::new();
        for entity in &self.entities {
            let widest = entity.features.iter().map(|f| f.window).max().unwrap();
            let mut keys = BTreeSet::new();
            for (schema, e) in &events {
                if inside(e, widest) && entity.features.iter().any(|f| counts(f, schema, e)) {
                    let Some(Field::Str(key)) = e.get(&entity.key) else {
                        panic!("keys are strings")
                    };
                    keys.insert(key);
                }
            }
            for key in keys {
                let values = entity
                    .features
                    .iter()
                    .map(|f| {
                        let mine: Vec<&Ev> = events
                            .iter()
                            .filter(|(schema, e)| {
                                counts(f, schema, e)
                                    && inside(e, f.window)
                                    && e.get(&entity.key) == Some(Field::Str(key.clone()))
                            })
                            .map(|(_, e)| e)
                            .collect();
                        aggregate(f, &mine)
                    })
                    .collect();
                rows.insert((entity.name.clone(), key), values);
            }
        }
        rows
    }
}

fn aggregate(f: &Feature, events: &[&Ev]) -> Val {
    let n = events.len() as i128;
    let ints = || -> Vec<i64> {
        events
            .iter()
            .map(|e| match e.get(f.field.as_ref().unwrap()) {
                Some(Field::Int(i)) => i,
                other => panic!("interpreter: {} reads {other:?}", f.name),
            })
            .collect()
    };
    let sum = || ints().iter().map(|v| *v as i128).sum::<i128>();
    let float = |x: f64| Val::FloatBits(x.to_bits());
    match f.aggregation.as_str() {
        "count" => Val::Int(n as i64),
        "sum" => Val::Int(sum().clamp(i64::MIN as i128, i64::MAX as i128) as i64),
        "mean" if n == 0 => float(0.0),
        "mean" => float(sum() as f64 / n as f64),
        "std" if n == 0 => float(0.0),
        "std" => {
            let squares: i128 = ints().iter().map(|v| (*v as i128) * (*v as i128)).sum();
            let s = sum();
            let spread = (n * squares - s * s).max(0);
            float((spread as f64).sqrt() / n as f64)
        }
        "min" => Val::Int(ints().into_iter().min().unwrap_or(0)),
        "max" => Val::Int(ints().into_iter().max().unwrap_or(0)),
        "distinct_count" => {
            let name = f.field.as_ref().unwrap();
            let set: BTreeSet<Field> = events.iter().filter_map(|e| e.get(name)).collect();
            Val::Int(set.len() as i64)
        }
        "mode" => {
            let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
            for v in ints() {
                *counts.entry(v).or_default() += 1;
            }
            let most = counts.values().copied().max().unwrap_or(0);
            Val::Int(
                counts
                    .into_iter()
                    .find(|(_, c)| *c == most)
                    .map_or(0, |(v, _)| v),
            )
        }
        "last" => Val::Int(
            events
                .iter()
                .zip(ints())
                .map(|(e, v)| (e.time(), v))
                .max()
                .map_or(0, |(_, v)| v),
        ),
        "last_time" => Val::Int(events.iter().map(|e| e.time()).max().unwrap_or(0)),
        other => panic!("interpreter: aggregation {other}"),
    }
}
