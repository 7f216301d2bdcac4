//! Shared harness: seeded random event logs, a driver that feeds them to
//! `build_features` out of order on any timely configuration, and a checker
//! that compares the materialized rows at frontiers with the oracle.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use timely::dataflow::operators::core::UnorderedInput;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;

use dataflow::graph::{build_features_budgeted, CARD_WINDOWS_MS, USER_WINDOWS_MS};
use dataflow::oracle::rows_as_of;
use dataflow::{GraphConfig, RowUpdate};
use operators::aggregate::WORK_PER_ACTIVATION;
use schemas::event::{Channel, Click, ClickAction, Txn};
use schemas::features::{Entity, Value, HOUR_MS};

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
                mcc: 5411,
                amount_minor,
                currency: "EUR".into(),
                country: ["FR", "DE", "US", "GB", "ES"][rng.gen_range(0..5)].into(),
                channel: Channel::Ecom,
                event_time,
                device_id: None,
                ip_country: None,
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
                dwell_ms: None,
            });
        }
    }
    log
}

/// The frontiers worth checking: around every event time and every
/// departure time (exactly at it and one tick after), plus random others.
pub fn frontiers(log: &Log, config: &GraphConfig, seed: u64) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(seed ^ 0xf00d);
    let times: BTreeSet<u64> = log
        .txns
        .iter()
        .map(|t| t.event_time)
        .chain(log.clicks.iter().map(|c| c.event_time))
        .map(|t| config.quantize(t))
        .collect();
    let mut out = BTreeSet::new();
    let windows: BTreeSet<u64> = CARD_WINDOWS_MS
        .iter()
        .chain(USER_WINDOWS_MS.iter())
        .copied()
        .collect();
    for &t in &times {
        for shift in std::iter::once(0).chain(windows.iter().copied()) {
            out.insert(t + shift);
            out.insert(t + shift + config.tick_ms);
        }
    }
    let (lo, hi) = (
        *times.first().unwrap(),
        *times.last().unwrap() + 2 * CARD_WINDOWS_MS[3],
    );
    for _ in 0..50 {
        out.insert(config.quantize(rng.gen_range(lo..hi) as i64));
    }
    out.into_iter().collect()
}

/// Every tick from the first event's to one past the last retraction, so a
/// change emitted at the wrong time is seen at the first frontier after it.
pub fn every_tick(log: &Log, config: &GraphConfig) -> Vec<u64> {
    let times = log
        .txns
        .iter()
        .map(|t| t.event_time)
        .chain(log.clicks.iter().map(|c| c.event_time))
        .map(|t| config.quantize(t));
    let (lo, hi) = times.fold((u64::MAX, 0), |(lo, hi), t| (lo.min(t), hi.max(t)));
    (lo..=hi + CARD_WINDOWS_MS[3] + config.tick_ms)
        .step_by(config.tick_ms as usize)
        .collect()
}

/// Everything a run produced: `(timestamp, update)` from every worker.
pub type Output = Arc<Mutex<Vec<(u64, RowUpdate)>>>;

/// Materializes the output the way the Redis sink does and compares it with
/// the oracle at each frontier, in increasing order.
pub struct Checker {
    log: Arc<Log>,
    config: GraphConfig,
    rows: BTreeMap<(Entity, String), Vec<Value>>,
    pub checked: usize,
}

impl Checker {
    pub fn new(log: Arc<Log>, config: GraphConfig) -> Self {
        Checker {
            log,
            config,
            rows: BTreeMap::new(),
            checked: 0,
        }
    }

    /// Applies every update with timestamp `< frontier` and compares.
    pub fn check(&mut self, output: &Output, frontier: u64) {
        let mut ready = Vec::new();
        output.lock().unwrap().retain(|(t, u)| {
            if *t < frontier {
                ready.push((*t, u.clone()));
                false
            } else {
                true
            }
        });
        ready.sort_by_key(|(t, _)| *t);
        let mut seen = BTreeSet::new();
        for (t, update) in ready {
            let key = (update.entity, update.id.clone());
            assert!(
                seen.insert((t, key.clone())),
                "two updates of {key:?} at {t}"
            );
            let before = self.rows.get(&key).cloned();
            assert_ne!(before, update.row, "no-op update of {key:?} at {t}");
            match update.row {
                Some(row) => self.rows.insert(key, row),
                None => self.rows.remove(&key),
            };
        }
        let expected = rows_as_of(&self.log.txns, &self.log.clicks, &self.config, frontier);
        if self.rows != expected {
            let keys: BTreeSet<_> = self.rows.keys().chain(expected.keys()).collect();
            for key in keys {
                let (got, want) = (self.rows.get(key), expected.get(key));
                assert_eq!(
                    got, want,
                    "row {key:?} as of {frontier} (tick {})",
                    self.config.tick_ms
                );
            }
        }
        self.checked += 1;
    }

    pub fn rows(&self) -> &BTreeMap<(Entity, String), Vec<Value>> {
        &self.rows
    }
}

/// Runs the log through `build_features` on `timely_config`; worker 0 checks
/// every frontier against the oracle when `check` is set. Each worker feeds
/// its share of the events out of order: all events before the next frontier
/// (shuffled) and some later ones early, then advances its input.
/// Returns every `(timestamp, update)` produced, sorted.
pub fn run(
    timely_config: timely::Config,
    log: Arc<Log>,
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
) -> Vec<(u64, String)> {
    run_budgeted(
        timely_config,
        log,
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
    /// Every `(timestamp, update)` produced, sorted.
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
    config: GraphConfig,
    frontiers: Arc<Vec<u64>>,
    check: bool,
    shared: &Shared,
) {
    run_shared_budgeted(
        timely_config,
        log,
        config,
        frontiers,
        check,
        WORK_PER_ACTIVATION,
        shared,
    )
}

/// [`run_shared`] with the windowed aggregates capped at `work_per_activation`.
pub fn run_shared_budgeted(
    timely_config: timely::Config,
    log: Arc<Log>,
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
    {
        timely::execute(timely_config, move |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let probe = ProbeHandle::new();
            let sink = output.clone();
            let record = all.clone();
            let ((mut txn_in, txn_cap), (mut click_in, click_cap)) =
                worker.dataflow::<u64, _, _>(|scope| {
                    let (txn_input, txns) = scope.new_unordered_input();
                    let (click_input, clicks) = scope.new_unordered_input();
                    build_features_budgeted(txns, clicks, &config, work_per_activation)
                        .inspect_core(move |event| {
                            if let Ok((stamp, data)) = event {
                                let t = *stamp.least().expect("data has a time");
                                let mut sink = sink.lock().unwrap();
                                let mut record = record.lock().unwrap();
                                for update in data.iter() {
                                    sink.push((t, update.clone()));
                                    record.push((t, format!("{update:?}")));
                                }
                            }
                        })
                        .probe_with(&probe);
                    (txn_input, click_input)
                });
            let (mut txn_cap, mut click_cap) = (Some(txn_cap), Some(click_cap));
            let mut rng = SmallRng::seed_from_u64(index as u64 * 7919 + 1);
            let mut txns: Vec<&Txn> = log.txns.iter().skip(index).step_by(peers).collect();
            let mut clicks: Vec<&Click> = log.clicks.iter().skip(index).step_by(peers).collect();
            txns.shuffle(&mut rng);
            clicks.shuffle(&mut rng);
            let mut checker = Checker::new(log.clone(), config.clone());
            for &frontier in frontiers.iter() {
                // Send what must precede `frontier`, and some later events early.
                let (tc, cc) = (txn_cap.as_ref().unwrap(), click_cap.as_ref().unwrap());
                txns.retain(|t| {
                    let time = config.quantize(t.event_time);
                    if time < frontier || rng.gen_bool(0.05) {
                        txn_in
                            .activate()
                            .session(&tc.delayed(&time))
                            .give((*t).clone());
                        false
                    } else {
                        true
                    }
                });
                clicks.retain(|c| {
                    let time = config.quantize(c.event_time);
                    if time < frontier || rng.gen_bool(0.05) {
                        click_in
                            .activate()
                            .session(&cc.delayed(&time))
                            .give((*c).clone());
                        false
                    } else {
                        true
                    }
                });
                txn_cap.as_mut().unwrap().downgrade(&frontier);
                click_cap.as_mut().unwrap().downgrade(&frontier);
                while probe.less_than(&frontier) {
                    worker.step_or_park(Some(std::time::Duration::from_millis(1)));
                }
                if check && index == 0 {
                    checker.check(&output, frontier);
                }
            }
            // Whatever is left lies at or after the last frontier.
            let (tc, cc) = (txn_cap.as_ref().unwrap(), click_cap.as_ref().unwrap());
            for t in txns.drain(..) {
                let time = config.quantize(t.event_time);
                txn_in
                    .activate()
                    .session(&tc.delayed(&time))
                    .give(t.clone());
            }
            for c in clicks.drain(..) {
                let time = config.quantize(c.event_time);
                click_in
                    .activate()
                    .session(&cc.delayed(&time))
                    .give(c.clone());
            }
            txn_cap = None;
            click_cap = None;
            drop((txn_cap, click_cap));
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
}
