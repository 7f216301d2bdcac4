//! Shared harness: seeded random event logs and feature definitions, a
//! driver that feeds the logs to `build_features` out of order on any timely
//! configuration, and a checker that materializes the row collection the way
//! the Redis sink does and compares it at frontiers with the interpreter.

#![allow(dead_code)]

pub mod interpreter;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use timely::dataflow::operators::core::UnorderedInput;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

use dataflow::compile::Event;
use dataflow::graph::build_features_budgeted;
use dataflow::{events_collection, GraphConfig};
use operators::aggregate::WORK_PER_ACTIVATION;
use schemas::event::{Channel, Click, ClickAction, Txn};
use schemas::{FeatureSet, Row, Value};

use interpreter::{Definitions, Val};

/// The shipped feature definitions.
pub const SHIPPED: &str = include_str!("../../../features.toml");

const HOUR_MS: i64 = 3_600_000;

pub const T0: i64 = 1_700_000_000_000;

/// A seeded random log: bursts of activity separated by idle gaps (some longer
/// than 24h), many events per key, duplicate amounts, raw times off the tick.
#[derive(Debug, Clone)]
pub struct Log {
    pub txns: Vec<Txn>,
    pub clicks: Vec<Click>,
}

pub fn random_log(seed: u64, events: usize) -> Log {
    let mut rng = SmallRng::seed_from_u64(seed);
    let cards = rng.gen_range(3..25);
    let users = rng.gen_range(3..15);
    // Burst start times: gaps from seconds to two days.
    let mut bursts = Vec::new();
    let mut t = T0 + rng.gen_range(0..1000);
    for _ in 0..rng.gen_range(2..7) {
        bursts.push(t);
        t += match rng.gen_range(0..4) {
            0 => rng.gen_range(1_000..120_000),
            1 => rng.gen_range(0..2 * HOUR_MS),
            2 => rng.gen_range(20 * HOUR_MS..26 * HOUR_MS),
            _ => rng.gen_range(25 * HOUR_MS..50 * HOUR_MS),
        };
    }
    let mut log = Log {
        txns: Vec::new(),
        clicks: Vec::new(),
    };
    for i in 0..events {
        let start = bursts[rng.gen_range(0..bursts.len())];
        let spread = [10_000, 400_000, 2 * HOUR_MS][rng.gen_range(0..3)];
        let event_time = start + rng.gen_range(0..spread);
        let user = rng.gen_range(0..users);
        if rng.gen_bool(0.5) {
            let amount_minor = if rng.gen_bool(0.3) {
                2500
            } else {
                rng.gen_range(1..200_000)
            };
            log.txns.push(Txn {
                event_id: format!("t{i}"),
                card_id: format!("c{}", rng.gen_range(0..cards)),
                user_id: format!("u{user}"),
                merchant_id: format!("m{}", rng.gen_range(0..30)),
                mcc: [5411, 5812, 6011][rng.gen_range(0..3)],
                amount_minor,
                currency: "EUR".into(),
                country: ["FR", "DE", "US", "GB", "ES"][rng.gen_range(0..5)].into(),
                channel: [Channel::Pos, Channel::Ecom, Channel::Atm][rng.gen_range(0..3)],
                event_time,
                device_id: rng
                    .gen_bool(0.5)
                    .then(|| format!("d{}", rng.gen_range(0..4))),
                ip_country: rng
                    .gen_bool(0.5)
                    .then(|| ["FR", "DE", "US"][rng.gen_range(0..3)].into()),
            });
        } else {
            log.clicks.push(Click {
                event_id: format!("k{i}"),
                user_id: format!("u{user}"),
                session_id: format!("s{}", rng.gen_range(0..5)),
                item_id: format!("i{}", rng.gen_range(0..50)),
                category: format!("cat{}", rng.gen_range(0..8)),
                action: [
                    ClickAction::View,
                    ClickAction::AddToCart,
                    ClickAction::Purchase,
                ][rng.gen_range(0..3)],
                event_time,
                dwell_ms: rng.gen_bool(0.6).then(|| rng.gen_range(0..5_000)),
            });
        }
    }
    log
}

/// Seeded random feature definitions (TOML) whose windows are multiples of
/// `tick_ms`: a card entity fed by transactions and a user entity fed by
/// clicks and transactions, with random aggregations, fields, windows and
/// filters.
pub fn random_definitions(seed: u64, tick_ms: u64) -> String {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xdef5);
    let mut out = String::from(
        r#"
[[sources]]
name = "txn"
topic = "t"
schema = "txn"
keys = ["card_id", "user_id"]
time_field = "event_time"

[[sources]]
name = "click"
topic = "c"
schema = "click"
keys = ["user_id"]
time_field = "event_time"

[[entities]]
name = "card"
key = "card_id"
sources = ["txn"]

[[entities]]
name = "user"
key = "user_id"
sources = ["click", "txn"]
"#,
    );
    // Windows in ticks: short ones, around the log's bursts, and days.
    let choices: Vec<u64> = [1, 2, 3, 7, 60, 300, 3_600, 7_200, 86_400, 172_800]
        .iter()
        .map(|s| s * 1000)
        .filter(|w| w % tick_ms == 0)
        .chain([tick_ms, 2 * tick_ms, 5 * tick_ms])
        .collect();
    let aggregations = [
        "count",
        "sum",
        "mean",
        "std",
        "min",
        "max",
        "distinct_count",
        "mode",
        "last",
        "last_time",
    ];
    for entity in ["card", "user"] {
        let n = rng.gen_range(1..9);
        for i in 0..n {
            let source = if entity == "card" || rng.gen_bool(0.4) {
                "txn"
            } else {
                "click"
            };
            let aggregation = aggregations[rng.gen_range(0..aggregations.len())];
            let (ints, any): (&[&str], &[&str]) = match source {
                "txn" => (
                    &["amount_minor", "mcc", "country", "ip_country", "event_time"],
                    &[
                        "merchant_id",
                        "country",
                        "channel",
                        "device_id",
                        "user_id",
                        "amount_minor",
                    ],
                ),
                _ => (
                    &["dwell_ms", "event_time"],
                    &["category", "item_id", "action", "dwell_ms"],
                ),
            };
            let field = match aggregation {
                "count" if rng.gen_bool(0.7) => None,
                "count" => Some(any[rng.gen_range(0..any.len())]),
                "last_time" => None,
                "distinct_count" => Some(any[rng.gen_range(0..any.len())]),
                "sum" | "mean" | "std" => Some(match source {
                    "txn" => ["amount_minor", "mcc"][rng.gen_range(0..2)],
                    _ => "dwell_ms",
                }),
                _ => Some(ints[rng.gen_range(0..ints.len())]),
            };
            let window = choices[rng.gen_range(0..choices.len())];
            let filter = match (source, rng.gen_range(0..4)) {
                ("txn", 0) => Some(format!(
                    "{{ channel = \"{}\" }}",
                    ["pos", "ecom", "atm"][rng.gen_range(0..3)]
                )),
                ("txn", 1) => Some("{ country = \"FR\" }".to_owned()),
                ("click", 0) => Some(format!(
                    "{{ action = \"{}\" }}",
                    ["view", "add_to_cart", "purchase"][rng.gen_range(0..3)]
                )),
                _ => None,
            };
            out += &format!(
                "\n[[features]]\nname = \"f{i}\"\nentity = \"{entity}\"\nsource = \"{source}\"\naggregation = \"{aggregation}\"\nwindow = \"{window}ms\"\n"
            );
            if let Some(field) = field {
                out += &format!("field = \"{field}\"\n");
            }
            if let Some(filter) = filter {
                out += &format!("filter = {filter}\n");
            }
        }
    }
    out
}

/// The definitions parsed by the crate (for the graph and the harness).
pub fn parse(defs: &str) -> FeatureSet {
    FeatureSet::parse("test definitions", defs).expect("valid definitions")
}

fn all_windows(set: &FeatureSet) -> BTreeSet<u64> {
    set.entities.iter().flat_map(|e| e.windows()).collect()
}

/// The frontiers worth checking: around every event time and every
/// departure time (exactly at it and one tick after), plus random others.
pub fn frontiers(log: &Log, defs: &str, config: &GraphConfig, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xf00d);
    let times: BTreeSet<u64> = log
        .txns
        .iter()
        .map(|t| t.event_time)
        .chain(log.clicks.iter().map(|c| c.event_time))
        .map(|t| config.quantize(t))
        .collect();
    let windows = all_windows(&parse(defs));
    let widest = *windows.last().unwrap();
    let mut out = BTreeSet::new();
    for &t in &times {
        for shift in std::iter::once(0).chain(windows.iter().copied()) {
            out.insert(t + shift);
            out.insert(t + shift + config.tick_ms);
        }
    }
    let (lo, hi) = (*times.first().unwrap(), *times.last().unwrap() + 2 * widest);
    for _ in 0..50 {
        out.insert(config.quantize(rng.gen_range(lo..hi) as i64));
    }
    out.into_iter().collect()
}

/// Every tick from the first event's to one past the last retraction, so a
/// change emitted at the wrong time is seen at the first frontier after it.
pub fn every_tick(log: &Log, defs: &str, config: &GraphConfig) -> Vec<u64> {
    let widest = *all_windows(&parse(defs)).last().unwrap();
    let times = log
        .txns
        .iter()
        .map(|t| t.event_time)
        .chain(log.clicks.iter().map(|c| c.event_time))
        .map(|t| config.quantize(t));
    let (lo, hi) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    (lo..=hi + widest + config.tick_ms)
        .step_by(config.tick_ms as usize)
        .collect()
}

/// Everything a run produced: `(row, timestamp, diff)` from every worker.
pub type Output = Arc<Mutex<Vec<(Row, u64, isize)>>>;

/// Materializes the row collection the way the Redis sink does and compares
/// it with the interpreter at each frontier, in increasing order.
pub struct Checker {
    log: Arc<Log>,
    interpreter: Definitions,
    entities: Vec<String>,
    rows: BTreeMap<(String, String), Vec<Value>>,
    pub checked: usize,
}

fn val(v: &Value) -> Val {
    match *v {
        Value::Int(i) => Val::Int(i),
        Value::Float(f) => Val::FloatBits(f.to_bits()),
    }
}

impl Checker {
    pub fn new(log: Arc<Log>, defs: &str, config: &GraphConfig) -> Self {
        Checker {
            log,
            interpreter: Definitions::new(defs, config.tick_ms),
            entities: parse(defs)
                .entities
                .iter()
                .map(|e| e.name.clone())
                .collect(),
            rows: BTreeMap::new(),
            checked: 0,
        }
    }

    /// Applies every change with timestamp `< frontier` and compares.
    pub fn check(&mut self, output: &Output, frontier: u64) {
        let mut ready: BTreeMap<u64, Vec<(Row, isize)>> = BTreeMap::new();
        output.lock().unwrap().retain(|(row, t, diff)| {
            if *t < frontier {
                ready.entry(*t).or_default().push((row.clone(), *diff));
                false
            } else {
                true
            }
        });
        for (t, changes) in ready {
            // Per key and time: at most one retraction (of the current row)
            // and one insertion, and never the same row out and in.
            let mut outs: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
            let mut ins: BTreeMap<(String, String), Vec<Value>> = BTreeMap::new();
            for (row, diff) in changes {
                let key = (
                    self.entities[row.entity as usize].clone(),
                    row.id.to_string(),
                );
                let side = match diff {
                    1 => &mut ins,
                    -1 => &mut outs,
                    d => panic!("difference {d} of {key:?} at {t}"),
                };
                assert!(
                    side.insert(key.clone(), row.values.to_vec()).is_none(),
                    "two changes of {key:?} at {t}"
                );
            }
            for (key, old) in &outs {
                assert_eq!(
                    self.rows.get(key),
                    Some(old),
                    "retraction of {key:?} at {t} is not its row"
                );
                assert_ne!(ins.get(key), Some(old), "no-op change of {key:?} at {t}");
                self.rows.remove(key);
            }
            for (key, new) in ins {
                assert!(
                    !self.rows.contains_key(&key),
                    "{key:?} inserted twice at {t}"
                );
                self.rows.insert(key, new);
            }
        }
        let expected = self
            .interpreter
            .rows_as_of(&self.log.txns, &self.log.clicks, frontier);
        let got: BTreeMap<(String, String), Vec<Val>> = self
            .rows
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().map(val).collect()))
            .collect();
        if got != expected {
            let keys: BTreeSet<_> = got.keys().chain(expected.keys()).collect();
            for key in keys {
                assert_eq!(
                    got.get(key),
                    expected.get(key),
                    "row {key:?} as of {frontier}"
                );
            }
        }
        self.checked += 1;
    }

    pub fn rows(&self) -> &BTreeMap<(String, String), Vec<Value>> {
        &self.rows
    }
}

/// Runs the log through the graph of `defs` on `timely_config`; worker 0
/// checks every frontier against the interpreter when `check` is set. Each
/// worker feeds its share of the events out of order: all events before the
/// next frontier (shuffled) and some later ones early, then advances its
/// input. Returns every `(timestamp, change)` produced, sorted.
pub fn run(
    timely_config: timely::Config,
    log: Arc<Log>,
    defs: Arc<String>,
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
) -> Vec<(u64, String)> {
    run_budgeted(
        timely_config,
        log,
        defs,
        config,
        frontiers,
        check,
        WORK_PER_ACTIVATION,
    )
}

/// [`run`] with the windowed aggregates capped at `work_per_activation`.
pub fn run_budgeted(
    timely_config: timely::Config,
    log: Arc<Log>,
    defs: Arc<String>,
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
    work_per_activation: usize,
) -> Vec<(u64, String)> {
    let shared = Shared::default();
    let wanted = frontiers.len();
    run_shared_budgeted(
        timely_config,
        log,
        defs,
        config,
        frontiers,
        check,
        work_per_activation,
        &shared,
    );
    if check {
        assert!(
            *shared.checks.lock().unwrap() > wanted,
            "worker 0 checked every frontier"
        );
    }
    shared.sorted()
}

/// What the workers of a run share, possibly across several `timely::execute`
/// calls (the processes of a cluster, run as threads of this test).
#[derive(Clone, Default)]
pub struct Shared {
    pub output: Output,
    pub all: Arc<Mutex<Vec<(u64, String)>>>,
    pub checks: Arc<Mutex<usize>>,
}

impl Shared {
    /// Every `(timestamp, change)` produced, sorted.
    pub fn sorted(&self) -> Vec<(u64, String)> {
        let mut all = std::mem::take(&mut *self.all.lock().unwrap());
        all.sort();
        all
    }
}

/// [`run`] with caller-provided shared state.
pub fn run_shared(
    timely_config: timely::Config,
    log: Arc<Log>,
    defs: Arc<String>,
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
    shared: &Shared,
) {
    run_shared_budgeted(
        timely_config,
        log,
        defs,
        config,
        frontiers,
        check,
        WORK_PER_ACTIVATION,
        shared,
    )
}

/// [`run_shared`] with the windowed aggregates capped at `work_per_activation`.
#[allow(clippy::too_many_arguments)]
pub fn run_shared_budgeted(
    timely_config: timely::Config,
    log: Arc<Log>,
    defs: Arc<String>,
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
    work_per_activation: usize,
    shared: &Shared,
) {
    let (output, all, checks) = (
        shared.output.clone(),
        shared.all.clone(),
        shared.checks.clone(),
    );
    let set = Arc::new(parse(&defs));
    let txn_source = set.sources.iter().position(|s| s.name == "txn").unwrap();
    let click_source = set.sources.iter().position(|s| s.name == "click").unwrap();
    timely::execute(timely_config, move |worker| {
        let (index, peers) = (worker.index(), worker.peers());
        let probe = ProbeHandle::new();
        let sink = output.clone();
        let record = all.clone();
        let (mut input, cap) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_unordered_input();
            build_features_budgeted(
                events_collection(events),
                &set,
                &config,
                work_per_activation,
            )
            .inner
            .inspect(move |(row, t, diff)| {
                sink.lock().unwrap().push((row.clone(), *t, *diff));
                record.lock().unwrap().push((*t, format!("{row:?} {diff}")));
            })
            .probe_with(&probe);
            input
        });
        let mut cap = Some(cap);
        let mut rng = SmallRng::seed_from_u64(index as u64 * 7919 + 1);
        let mut events: Vec<(u64, (usize, Event))> = log
            .txns
            .iter()
            .map(|t| {
                (
                    config.quantize(t.event_time),
                    (txn_source, Event::Txn(t.clone())),
                )
            })
            .chain(log.clicks.iter().map(|c| {
                (
                    config.quantize(c.event_time),
                    (click_source, Event::Click(c.clone())),
                )
            }))
            .skip(index)
            .step_by(peers)
            .collect();
        events.shuffle(&mut rng);
        let mut checker = Checker::new(log.clone(), &defs, &config);
        for &frontier in frontiers.iter() {
            // Send what must precede `frontier`, and some later events early.
            let c = cap.as_ref().unwrap();
            events.retain(|(time, event)| {
                if *time < frontier || rng.gen_bool(0.05) {
                    input
                        .activate()
                        .session(&c.delayed(time))
                        .give(event.clone());
                    false
                } else {
                    true
                }
            });
            cap.as_mut().unwrap().downgrade(&frontier);
            while probe.less_than(&frontier) {
                worker.step_or_park(Some(std::time::Duration::from_millis(1)));
            }
            if check && index == 0 {
                checker.check(&output, frontier);
            }
        }
        // Whatever is left lies at or after the last frontier.
        let c = cap.take().unwrap();
        for (time, event) in events.drain(..) {
            input.activate().session(&c.delayed(&time)).give(event);
        }
        drop(c);
        while !probe.done() {
            worker.step_or_park(Some(std::time::Duration::from_millis(1)));
        }
        if check && index == 0 {
            // Every window eventually empties: all rows end deleted.
            checker.check(&output, u64::MAX);
            assert!(checker.rows().is_empty());
            *checks.lock().unwrap() = checker.checked;
        }
    })
    .expect("timely runs");
}
