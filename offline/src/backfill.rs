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
    let window = config.purchase_window_ms;
    let (keys, mut queries, numbered) = std::thread::scope(|s| {
        let keys = s.spawn(|| KeyIds::build(&log, &set));
        // Without such an entity, the views are labelled meanwhile.
        let numbered = clicks_user
            .is_none()
            .then(|| s.spawn(|| ViewLabels::new(&log, None, window, log_end_ms)));
        let queries = queries(&log, &set, &graph);
        let keys = keys.join().expect("keys");
        (
            keys,
            queries,
            numbered.map(|t| t.join().expect("view labels")),
        )
    });
    let view_labels = std::thread::scope(|s| {
        let labels = s.spawn(|| {
            numbered.unwrap_or_else(|| {
                let ids = clicks_user.map(|e| (&keys, e));
                ViewLabels::new(&log, ids, window, log_end_ms)
            })
        });
        queries.identify(&keys);
        labels.join().expect("view labels")
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
                let label = view_labels.0[events[i]];
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
    // Freeing the log's millions of strings takes a while (0.15 s for 3.4M
    // events): on a thread of its own, which the command's exit does not
    // wait for.
    std::thread::spawn(move || drop(replayed));
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

/// The label of each product view: `Some(true)` when its user purchased
/// within the window after it, in (t, t + window]; `Some(false)` when not
/// and the window ended within the log; `None` when the window is not over.
/// Indexed by event (`None` for any other event).
struct ViewLabels(Vec<Option<bool>>);

/// The field of a click that names its user.
const CLICK_USER_FIELD: &str = "user_id";

impl ViewLabels {
    /// Labels the views of `log` (ordered by event time) in one sweep from
    /// its end, keeping per user only its two earliest purchase times
    /// after the sweep (the second for a view at the time of the first).
    /// `ids`: the key ids of an entity keyed by [`CLICK_USER_FIELD`], which
    /// number every click's user (its field in the click schema); without,
    /// users are numbered here.
    fn new(log: &EventLog, ids: Option<(&KeyIds, u8)>, window: i64, log_end: i64) -> ViewLabels {
        let mut number: HashMap<&str, u32, FxBuildHasher> = HashMap::default();
        // Per user: its two earliest distinct purchase times after the
        // sweep, `i64::MAX` for none.
        let mut next: Vec<[i64; 2]> = Vec::new();
        let mut labels = vec![None; log.events.len()];
        for (i, (_, event)) in log.events.iter().enumerate().rev() {
            let Event::Click(c) = event else {
                continue;
            };
            let user = match ids {
                Some((keys, entity)) => keys
                    .of(i as u32, entity)
                    .expect("a click's user_id is interned"),
                None => {
                    let fresh = number.len() as u32;
                    *number.entry(c.user_id.as_str()).or_insert(fresh)
                }
            } as usize;
            if next.len() <= user {
                next.resize(user + 1, [i64::MAX; 2]);
            }
            let [first, second] = &mut next[user];
            let t = c.event_time;
            match c.action {
                ClickAction::Purchase if t < *first => (*first, *second) = (t, *first),
                ClickAction::View => {
                    // Every purchase after the sweep is at `t` or later.
                    let after = if *first > t { *first } else { *second };
                    labels[i] = if after <= t.saturating_add(window) {
                        Some(true)
                    } else if t.saturating_add(window) <= log_end {
                        Some(false)
                    } else {
                        None
                    };
                }
                _ => {}
            }
        }
        ViewLabels(labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{click, shipped, txn};

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

    /// A log of clicks, `(user, action, time)`, ordered by time, with a
    /// transaction first (so the users' key ids do not start at 0).
    fn clicks(set: &FeatureSet, clicks: &[(u8, ClickAction, i64)]) -> EventLog {
        let start = clicks.first().map_or(0, |c| c.2);
        let mut events = vec![txn(set, "c", "payer", start)];
        events.extend(
            clicks
                .iter()
                .map(|&(user, action, at)| click(set, &format!("u{user}"), action, at)),
        );
        EventLog {
            events,
            ..EventLog::default()
        }
    }

    /// The label of each view by brute force: any purchase of its user in
    /// (t, t + window]; else known only once the window is over.
    fn labels_by_search(log: &EventLog, window: i64, log_end: i64) -> Vec<Option<bool>> {
        let as_click = |e: &Event| match e {
            Event::Click(c) => Some(c.clone()),
            Event::Txn(_) => None,
        };
        log.events
            .iter()
            .map(|(_, e)| {
                let view = as_click(e).filter(|c| c.action == ClickAction::View)?;
                let t = view.event_time;
                let bought = log.events.iter().filter_map(|(_, e)| as_click(e)).any(|p| {
                    p.user_id == view.user_id
                        && p.action == ClickAction::Purchase
                        && t < p.event_time
                        && p.event_time <= t + window
                });
                if bought {
                    Some(true)
                } else if t + window <= log_end {
                    Some(false)
                } else {
                    None
                }
            })
            .collect()
    }

    #[test]
    fn a_view_is_labelled_by_a_later_purchase_within_the_window() {
        use ClickAction::{Purchase, View};
        let set = shipped();
        // Events 1.. are the clicks.
        let log = clicks(
            &set,
            &[
                (0, View, 99),
                (0, View, 100),
                (0, Purchase, 100),
                (1, View, 200),
                (0, View, 3_999),
                (0, View, 4_000),
                (0, Purchase, 5_000),
                (0, View, 9_500),
            ],
        );
        let labels = ViewLabels::new(&log, None, 1_000, 10_000).0;
        // (t, t + window]: a purchase at the view's own time does not count;
        // the window running past the end of the log: not known yet.
        assert_eq!(
            labels,
            [
                None,
                Some(true),
                Some(false),
                None,
                Some(false),
                Some(false),
                Some(true),
                None,
                None
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn views_are_labelled_as_a_search_of_the_purchases_finds(
            mut steps in proptest::collection::vec((0u8..4, 0u8..3, 0i64..20), 0..60),
            window in 0i64..40,
            past_end in 0i64..30,
        ) {
            let set = shipped();
            let user = set.entity_index("user").unwrap() as u8;
            assert_eq!(set.entities[user as usize].key, CLICK_USER_FIELD);
            steps.sort_by_key(|s| s.2);
            let action = |a| [ClickAction::View, ClickAction::Purchase, ClickAction::AddToCart][a as usize];
            let steps: Vec<_> = steps.into_iter().map(|(u, a, t)| (u, action(a), t)).collect();
            let log = clicks(&set, &steps);
            let log_end = steps.last().map_or(0, |s| s.2) + past_end;
            let expected = labels_by_search(&log, window, log_end);
            // Users numbered here, and by the user entity's key ids.
            proptest::prop_assert_eq!(&ViewLabels::new(&log, None, window, log_end).0, &expected);
            let keys = KeyIds::build(&log, &set);
            let by_ids = ViewLabels::new(&log, Some((&keys, user)), window, log_end).0;
            proptest::prop_assert_eq!(&by_ids, &expected);
        }
    }
}
