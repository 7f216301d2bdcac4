//! `sfs backfill`: the log replayed through the feature graph, bounded, and
//! each transaction (and product view) joined with its entities' rows as of
//! its own time ([`crate::asof`]), written as training rows.
//!
//! Per transaction at F (its event time quantized down to the tick), one
//! lookup of each entity the fraud model reads; per product view, one of the
//! user. Each answered lookup becomes a Parquet row: the model inputs
//! computed by the server's own code ([`server::features`]) from the rows
//! (absent: cold start), the rule-based score, and the label as of the
//! cutoff.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use dataflow::compile::Event;
use dataflow::GraphConfig;
use operators::window::FxBuildHasher;
use schemas::{ClickAction, FeatureSet, Label};
use server::features::{Context, TxnContext};
use server::model::{Model, ModelKind};

use crate::asof::{rows_as_of, Lookup};
use crate::keys::{KeyIds, Replayed};
use crate::log::EventLog;
use crate::output::{FraudRow, Output, ViewRow};

/// How a backfill runs.
#[derive(Debug, Clone)]
pub struct BackfillConfig {
    /// The dataflow tick (ms); the stream job's, for rows equal to the online ones.
    pub tick_ms: u64,
    /// Worker threads.
    pub workers: usize,
    /// Labels that arrived after this time (ms) are unknown; default: the end of the log.
    pub label_cutoff_ms: Option<i64>,
    /// A transaction with no fraud label by the cutoff counts as legitimate
    /// only if it is at least this old (ms) at the cutoff; else pending.
    pub label_maturity_ms: i64,
    /// A view is labelled by a purchase of its user within this long after it (ms).
    pub purchase_window_ms: i64,
    /// Draw a progress bar.
    pub progress: bool,
}

/// What a backfill did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    pub events: u64,
    pub transactions: u64,
    pub fraud: u64,
    pub legit: u64,
    pub pending: u64,
    pub views: u64,
    pub views_purchased: u64,
    pub views_pending: u64,
    pub skipped_records: u64,
    pub label_cutoff_ms: i64,
    pub log_end_ms: i64,
    /// Reading the log into memory (set by the caller that read it).
    pub read_secs: f64,
    /// The replay: from the log in memory to both Parquet files closed.
    pub elapsed_secs: f64,
}

/// What the backfill looks up: per transaction or product view, in event
/// order, its entities as of its own time.
#[derive(Debug)]
struct Queries {
    lookups: Vec<Lookup>,
    /// The index into `EventLog::events` of each lookup's event.
    events: Vec<usize>,
}

/// The entities a model's requests read.
fn lookups_of(set: &FeatureSet, kind: ModelKind) -> Vec<u8> {
    kind.entities()
        .iter()
        .filter_map(|name| Some(set.entity_index(name)? as u8))
        .collect()
}

/// The lookups of `log`'s transactions and product views, their keys'
/// ids left to [`Queries::identify`] (so that the keys are interned
/// meanwhile).
fn queries(log: &EventLog, set: &FeatureSet, graph: &GraphConfig) -> Queries {
    let fraud = lookups_of(set, ModelKind::Fraud);
    let views = lookups_of(set, ModelKind::Propensity);
    // The entities a transaction or a product view asks for; other clicks: none.
    let asks = |event: &Event| match event {
        Event::Txn(_) => Some(&fraud),
        Event::Click(c) if c.action == ClickAction::View => Some(&views),
        Event::Click(_) => None,
    };
    // Room for every event (a bound: the memory past the lookups is never
    // touched), where counting them first would read the whole log again.
    let mut queries = Queries {
        lookups: Vec::with_capacity(log.events.len()),
        events: Vec::with_capacity(log.events.len()),
    };
    for (i, (_, event)) in log.events.iter().enumerate() {
        let Some(entities) = asks(event) else {
            continue;
        };
        let keys = entities.iter().map(|&entity| (entity, 0)).collect();
        queries.lookups.push(Lookup {
            // The event's own time, quantized down to the tick: its rows
            // aggregate earlier ticks only, never the event itself.
            as_of: graph.quantize(event.event_time()),
            feed_at: i,
            keys,
        });
        queries.events.push(i);
    }
    queries
}

impl Queries {
    /// Sets each lookup's key ids, leaving out the entities whose key its
    /// event lacks.
    fn identify(&mut self, keys: &KeyIds) {
        for (lookup, &event) in self.lookups.iter_mut().zip(&self.events) {
            lookup
                .keys
                .retain(|(entity, id)| match keys.of(event as u32, *entity) {
                    Some(key) => {
                        *id = key;
                        true
                    }
                    None => false,
                });
        }
    }
}

/// Runs the backfill of `log` into `output`.
pub fn run(
    log: EventLog,
    set: Arc<FeatureSet>,
    config: &BackfillConfig,
    mut output: Output,
) -> anyhow::Result<Summary> {
    let started = Instant::now();
    let graph = GraphConfig {
        tick_ms: config.tick_ms,
    };
    graph
        .validate(&set)
        .map_err(|e| anyhow::anyhow!("--tick-ms {}: {e}", config.tick_ms))?;
    let log_end_ms = log.end_ms().unwrap_or(0);
    let cutoff = config.label_cutoff_ms.unwrap_or(log_end_ms);
    let labels = Labels::new(&log.labels, cutoff);
    // The clicks' users are numbered by the key ids of an entity keyed by
    // `user_id`, if there is one (so no click's user is hashed twice).
    let clicks_user = set
        .entities
        .iter()
        .position(|e| e.key == CLICK_USER_FIELD)
        .map(|e| e as u8);
    // All walk the whole log: side by side (the keys, one thread per entity).
    let (keys, mut queries, numbered) = std::thread::scope(|s| {
        let keys = s.spawn(|| KeyIds::build(&log, &set));
        let numbered = s.spawn(|| clicks_user.is_none().then(|| Purchases::new(&log, None)));
        let queries = queries(&log, &set, &graph);
        let keys = keys.join().expect("keys");
        (keys, queries, numbered.join().expect("purchases"))
    });
    let mut purchases = std::thread::scope(|s| {
        let purchases = s.spawn(|| {
            numbered.unwrap_or_else(|| Purchases::new(&log, clicks_user.map(|e| (&keys, e))))
        });
        queries.identify(&keys);
        purchases.join().expect("purchases")
    });
    let Queries { lookups, events } = queries;
    let lookups_total = lookups.len() as u64;
    let lookups = Arc::new(lookups);
    let log = Arc::new(log);
    let fraud_model = Model::rules(ModelKind::Fraud, &set)?;
    let view_model = Model::rules(ModelKind::Propensity, &set)?;

    let progress = if config.progress {
        let bar = indicatif::ProgressBar::new(lookups_total);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "backfill {bar:40} {pos}/{len} lookups {per_sec} eta {eta}",
            )
            .expect("template"),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };

    let mut summary = Summary {
        events: log.events.len() as u64,
        skipped_records: log.skipped,
        label_cutoff_ms: cutoff,
        log_end_ms,
        ..Summary::default()
    };
    let mut scratch = Vec::new();
    let mut context = Context::default();
    let (replayed, asked) = (Arc::clone(&log), Arc::clone(&lookups));
    let replay = Replayed {
        log,
        keys: Arc::new(keys),
    };
    rows_as_of(replay, set, graph, config.workers, lookups, |i, rows| {
        let as_of = asked[i].as_of as i64;
        let (_, event) = &replayed.events[events[i]];
        // The context borrows the rows, and gives them back for the next.
        std::mem::swap(&mut context.rows, rows);
        context.frontier_ms = Some(as_of);
        context.txn = TxnContext::default();
        match event {
            Event::Txn(txn) => {
                context.txn = TxnContext {
                    amount_minor: txn.amount_minor,
                    country: Some(txn.country.clone()),
                    channel: Some(txn.channel),
                    time_ms: txn.event_time,
                };
                context.vector(&fraud_model.plan, &mut scratch);
                let label = labels.of(&txn.event_id, txn.event_time, config);
                match label.status {
                    LabelStatus::Fraud => summary.fraud += 1,
                    LabelStatus::Legit => summary.legit += 1,
                    LabelStatus::Pending => summary.pending += 1,
                }
                summary.transactions += 1;
                output.fraud(FraudRow {
                    txn,
                    as_of_ms: as_of,
                    context: &context,
                    rules_score: f64::from(fraud_model.score(&scratch)?),
                    label: label.status,
                    fraud_type: label.fraud_type,
                })?;
            }
            Event::Click(click) => {
                context.vector(&view_model.plan, &mut scratch);
                let label = purchases.label(
                    events[i],
                    click.event_time,
                    config.purchase_window_ms,
                    log_end_ms,
                );
                summary.views += 1;
                match label {
                    Some(true) => summary.views_purchased += 1,
                    None => summary.views_pending += 1,
                    Some(false) => {}
                }
                output.view(ViewRow {
                    click,
                    as_of_ms: as_of,
                    context: &context,
                    rules_score: f64::from(view_model.score(&scratch)?),
                    label,
                })?;
            }
        }
        std::mem::swap(&mut context.rows, rows);
        if i % 1024 == 1023 {
            progress.inc(1024);
        }
        Ok(())
    })?;
    progress.set_position(lookups_total);
    progress.finish_and_clear();
    output.finish(&summary)?;
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Whether a transaction's label is known at the cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelStatus {
    /// A fraud label arrived by the cutoff.
    Fraud,
    /// A negative label arrived, or the transaction is old enough at the
    /// cutoff that a fraud label would have.
    Legit,
    /// Too young for its label to have arrived.
    Pending,
}

impl LabelStatus {
    /// `fraud`, `legit` or `pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            LabelStatus::Fraud => "fraud",
            LabelStatus::Legit => "legit",
            LabelStatus::Pending => "pending",
        }
    }
}

struct KnownLabel {
    status: LabelStatus,
    fraud_type: Option<String>,
}

/// The labels known at the cutoff, by transaction id.
struct Labels {
    cutoff: i64,
    by_txn: HashMap<String, (bool, Option<String>)>,
}

impl Labels {
    fn new(labels: &[Label], cutoff: i64) -> Labels {
        let mut by_txn: HashMap<String, (bool, Option<String>)> = HashMap::new();
        for l in labels.iter().filter(|l| l.label_time <= cutoff) {
            let entry = by_txn.entry(l.event_id.clone()).or_insert((false, None));
            // A fraud verdict stands against a later negative one.
            if l.is_fraud || !entry.0 {
                *entry = (l.is_fraud, l.fraud_type.clone());
            }
        }
        Labels { cutoff, by_txn }
    }

    fn of(&self, txn_id: &str, event_time: i64, config: &BackfillConfig) -> KnownLabel {
        let (status, fraud_type) = match self.by_txn.get(txn_id) {
            Some((true, kind)) => (LabelStatus::Fraud, kind.clone()),
            Some((false, _)) => (LabelStatus::Legit, None),
            None if event_time <= self.cutoff - config.label_maturity_ms => {
                (LabelStatus::Legit, None)
            }
            None => (LabelStatus::Pending, None),
        };
        KnownLabel { status, fraud_type }
    }
}

/// Purchase times per user, ascending, with a cursor per user: the first
/// purchase after the last view asked about. Each click knows its user's
/// number, so labelling a view reads no string.
struct Purchases {
    /// Per event: its user's number if it is a click, else [`NO_USER`].
    user_of: Vec<u32>,
    /// Per user: purchase times, and the cursor.
    users: Vec<(Vec<i64>, usize)>,
}

/// Not a click.
const NO_USER: u32 = u32::MAX;

/// The field of a click that names its user.
const CLICK_USER_FIELD: &str = "user_id";

impl Purchases {
    /// `ids`: the key ids of an entity keyed by [`CLICK_USER_FIELD`], which
    /// number every click's user (its field in the click schema); without,
    /// users are numbered here as their first click comes.
    fn new(log: &EventLog, ids: Option<(&KeyIds, u8)>) -> Purchases {
        let mut number: HashMap<&str, u32, FxBuildHasher> = HashMap::default();
        let mut purchases = Purchases {
            user_of: Vec::with_capacity(log.events.len()),
            users: Vec::new(),
        };
        for (i, (_, event)) in log.events.iter().enumerate() {
            let Event::Click(c) = event else {
                purchases.user_of.push(NO_USER);
                continue;
            };
            let user = match ids {
                Some((keys, entity)) => keys
                    .of(i as u32, entity)
                    .expect("a click's user_id is interned"),
                None => {
                    let next = number.len() as u32;
                    *number.entry(c.user_id.as_str()).or_insert(next)
                }
            };
            let users = &mut purchases.users;
            if users.len() <= user as usize {
                users.resize_with(user as usize + 1, Default::default);
            }
            if c.action == ClickAction::Purchase {
                users[user as usize].0.push(c.event_time);
            }
            purchases.user_of.push(user);
        }
        purchases
    }

    /// For the view that is event `event`, at `t`: `Some(true)`: a purchase
    /// of its user in (t, t + window]; `Some(false)`: none and the window
    /// ended within the log; `None`: the window is not over. Views come in
    /// time order, so the cursor only moves forward (a view earlier than
    /// the last one asked about searches again).
    fn label(&mut self, event: usize, t: i64, window: i64, log_end: i64) -> Option<bool> {
        let (times, cursor) = &mut self.users[self.user_of[event] as usize];
        if *cursor > 0 && times[*cursor - 1] > t {
            *cursor = times.partition_point(|&p| p <= t);
        }
        while times.get(*cursor).is_some_and(|&p| p <= t) {
            *cursor += 1;
        }
        let next = times.get(*cursor).copied();
        if next.is_some_and(|p| p <= t + window) {
            Some(true)
        } else if t + window <= log_end {
            Some(false)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(id: &str, fraud: bool, at: i64) -> Label {
        Label {
            event_id: id.into(),
            card_id: "c".into(),
            is_fraud: fraud,
            fraud_type: fraud.then(|| "card_testing".into()),
            label_time: at,
        }
    }

    fn config(maturity: i64) -> BackfillConfig {
        BackfillConfig {
            tick_ms: 1000,
            workers: 1,
            label_cutoff_ms: None,
            label_maturity_ms: maturity,
            purchase_window_ms: 1_800_000,
            progress: false,
        }
    }

    #[test]
    fn labels_are_known_as_of_the_cutoff_and_young_transactions_are_pending() {
        let labels = Labels::new(
            &[
                label("early", true, 100),
                label("late", true, 5_000),
                label("negative", false, 200),
                label("flipped", false, 100),
                label("flipped", true, 300),
            ],
            1_000,
        );
        let c = config(400);
        let status = |id: &str, t: i64| labels.of(id, t, &c).status;
        assert_eq!(status("early", 50), LabelStatus::Fraud);
        assert_eq!(
            labels.of("early", 50, &c).fraud_type.as_deref(),
            Some("card_testing")
        );
        // Arrived after the cutoff: unknown, so old enough counts as legit...
        assert_eq!(status("late", 600), LabelStatus::Legit);
        // ...and too young is pending, never legit.
        assert_eq!(status("late", 601), LabelStatus::Pending);
        assert_eq!(status("negative", 990), LabelStatus::Legit);
        assert_eq!(status("flipped", 990), LabelStatus::Fraud);
        assert_eq!(status("unlabelled", 600), LabelStatus::Legit);
        assert_eq!(status("unlabelled", 700), LabelStatus::Pending);
    }

    #[test]
    fn views_get_the_same_labels_whether_users_are_numbered_by_key_ids_or_here() {
        let set = FeatureSet::parse("features.toml", include_str!("../../features.toml")).unwrap();
        let user = set.entity_index("user").unwrap() as u8;
        assert_eq!(set.entities[user as usize].key, CLICK_USER_FIELD);
        let source = |name: &str| set.sources.iter().position(|s| s.name == name).unwrap();
        let click = |user: &str, action, at| {
            let c = schemas::Click {
                event_id: format!("{user}@{at}"),
                user_id: user.into(),
                session_id: "s".into(),
                item_id: "i".into(),
                category: "books".into(),
                action,
                event_time: at,
                dwell_ms: None,
            };
            (source("click"), Event::Click(c))
        };
        let txn = |user: &str, at| {
            let t = schemas::Txn {
                event_id: format!("t{at}"),
                card_id: "c".into(),
                user_id: user.into(),
                merchant_id: "m".into(),
                mcc: 5411,
                amount_minor: 100,
                currency: "EUR".into(),
                country: "DE".into(),
                channel: schemas::Channel::Pos,
                event_time: at,
                device_id: None,
                ip_country: None,
            };
            (source("txn"), Event::Txn(t))
        };
        use ClickAction::{Purchase, View};
        // "t" only pays (its key id comes first), "a" buys 500 after a view,
        // "b" only views.
        let log = EventLog {
            events: vec![
                txn("t", 0),
                click("b", View, 10),
                click("a", View, 100),
                txn("a", 150),
                click("a", Purchase, 600),
                click("b", View, 700),
                click("a", View, 800),
            ],
            ..EventLog::default()
        };
        let keys = KeyIds::build(&log, &set);
        let labels = |mut purchases: Purchases| {
            [(1, 10), (2, 100), (5, 700), (6, 800)]
                .map(|(event, t)| purchases.label(event, t, 1_000, 10_000))
        };
        let expected = [Some(false), Some(true), Some(false), Some(false)];
        assert_eq!(labels(Purchases::new(&log, None)), expected);
        assert_eq!(labels(Purchases::new(&log, Some((&keys, user)))), expected);
    }

    #[test]
    fn a_view_is_labelled_by_a_later_purchase_within_the_window() {
        // Event 0 is a view of "u", who purchased at 100 and 5 000; event 1
        // one of a user with no purchase.
        let mut purchases = Purchases {
            user_of: vec![0, 1],
            users: vec![(vec![100, 5_000], 0), (vec![], 0)],
        };
        // (t, t + window]: a purchase at the view's own time does not count.
        // Asked out of time order too: the cursor goes back.
        assert_eq!(purchases.label(0, 100, 1_000, 10_000), Some(false));
        assert_eq!(purchases.label(0, 99, 1_000, 10_000), Some(true));
        assert_eq!(purchases.label(0, 4_000, 1_000, 10_000), Some(true));
        assert_eq!(purchases.label(0, 3_999, 1_000, 10_000), Some(false));
        // The window runs past the end of the log: not known yet.
        assert_eq!(purchases.label(0, 9_500, 1_000, 10_000), None);
        assert_eq!(purchases.label(1, 9_000, 1_000, 10_000), Some(false));
    }
}
