//! `sfs backfill`: the log replayed through the feature graph, bounded, and
//! each transaction (and product view) joined with its entities' rows as of
//! its own time.
//!
//! The dataflow, per worker:
//! - "Events": the log's events, at their event time quantized to the tick,
//!   into [`dataflow::build_features`], the graph the stream job runs.
//! - The rows it outputs, delayed by 1 ms and arranged by (entity, key): the
//!   row as of F aggregates times `< F`, i.e. the rows accumulated at `F - 1`,
//!   which the delay moves to `F`.
//! - "Queries": per transaction at F, one lookup per entity the fraud model
//!   reads ((entity, key), (query, F)), inserted at F and retracted at F + 1;
//!   per product view, one for the user. Arranged and joined with the rows
//!   (`join_core`): the join's output at time F is the row as of F.
//! - "Collect": keeps the join's updates at each query's own time, and once
//!   the frontier passes F, sends the consolidated rows to the writer with
//!   the frontier.
//!
//! The writer (the calling thread) turns each query, once every worker's
//! frontier has passed its time, into a Parquet row: the model inputs
//! computed by the server's own code ([`server::features`]) from the rows
//! (absent: cold start), the rule-based score, and the label as of the
//! cutoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use differential_dataflow::input::Input;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

use dataflow::compile::Event;
use dataflow::{build_features, GraphConfig};
use schemas::features::{FeatureRow, Schema, Value};
use schemas::{ClickAction, FeatureSet, Label};
use server::features::{Context, TxnContext};
use server::model::{Model, ModelKind};

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
    pub elapsed_secs: f64,
}

/// What the backfill looks up for one transaction or product view.
#[derive(Debug, Clone)]
struct Query {
    /// Index into `EventLog::events`.
    event: usize,
    /// The as-of time F: the event's time quantized down to the tick.
    as_of: u64,
    /// (entity index, key) per entity the query reads.
    lookups: Vec<(u8, Arc<str>)>,
}

/// The queries of a log, in event order: transactions and product views.
#[derive(Debug)]
struct Queries {
    list: Vec<Query>,
    /// Whether `list[i]` is a transaction (else a product view).
    is_txn: Vec<bool>,
}

/// The entities (index, key field per schema) a model's requests read.
fn lookups_of(set: &FeatureSet, kind: ModelKind, schema: Schema) -> Vec<(u8, usize)> {
    kind.entities()
        .iter()
        .filter_map(|name| {
            let index = set.entity_index(name)?;
            let (field, _) = schema.field(&set.entities[index].key)?;
            Some((index as u8, field))
        })
        .collect()
}

fn queries(log: &EventLog, set: &FeatureSet, graph: &GraphConfig) -> Queries {
    let fraud = lookups_of(set, ModelKind::Fraud, Schema::Txn);
    let views = lookups_of(set, ModelKind::Propensity, Schema::Click);
    let mut list = Vec::new();
    let mut is_txn = Vec::new();
    for (i, (_, event)) in log.events.iter().enumerate() {
        let lookups = match event {
            Event::Txn(_) => &fraud,
            Event::Click(c) if c.action == ClickAction::View => &views,
            Event::Click(_) => continue,
        };
        let lookups = lookups
            .iter()
            .filter_map(|&(entity, field)| match event.field(field)? {
                schemas::features::Datum::Str(key) => Some((entity, Arc::from(key))),
                _ => None,
            })
            .collect();
        list.push(Query {
            event: i,
            as_of: graph.quantize(event.event_time()),
            lookups,
        });
        is_txn.push(matches!(event, Event::Txn(_)));
    }
    Queries { list, is_txn }
}

/// A row found for a lookup: (query, entity, values).
type Found = (u64, u8, Vec<Value>);

/// From the workers to the writer.
enum Note {
    /// The row of entity `entity` as of query `query`'s time.
    Row {
        query: u64,
        entity: u8,
        values: Vec<Value>,
    },
    /// Worker `worker` will send nothing more before `frontier` (`None`: done).
    Frontier {
        worker: usize,
        frontier: Option<u64>,
    },
}

/// Events fed per step of the input worker before it lets the dataflow catch up.
const FEED_BATCH: usize = 4096;
/// How far (ms of event time) the input may run ahead of the collected frontier.
const MAX_AHEAD_TICKS: u64 = 64;

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
    let purchases = Purchases::new(&log);
    let queries = Arc::new(queries(&log, &set, &graph));
    let log = Arc::new(log);
    let fraud_model = Model::rules(ModelKind::Fraud, &set)?;
    let view_model = Model::rules(ModelKind::Propensity, &set)?;

    let workers = config.workers.max(1);
    let (tx, rx) = mpsc::channel::<Note>();
    let done = Arc::new(AtomicBool::new(false));
    let guards = {
        let (log, queries, set, done) = (
            Arc::clone(&log),
            Arc::clone(&queries),
            Arc::clone(&set),
            Arc::clone(&done),
        );
        let tx = std::sync::Mutex::new(tx);
        let config = if workers > 1 {
            timely::Config::process(workers)
        } else {
            timely::Config::thread()
        };
        timely::execute(config, move |worker| {
            let tx = tx.lock().expect("sender").clone();
            worker_main(worker, &log, &queries, &set, &graph, tx, &done);
        })
        .map_err(|e| anyhow::anyhow!("timely: {e}"))?
    };

    let progress = if config.progress {
        let bar = indicatif::ProgressBar::new(queries.list.len() as u64);
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

    // Collect rows and frontiers; finalize queries in order as every
    // worker's frontier passes their time.
    let mut summary = Summary {
        events: log.events.len() as u64,
        skipped_records: log.skipped,
        label_cutoff_ms: cutoff,
        log_end_ms,
        ..Summary::default()
    };
    let mut rows: HashMap<(u64, u8), Vec<Value>> = HashMap::new();
    let mut frontiers: Vec<Option<Option<u64>>> = vec![Some(Some(0)); workers];
    let mut next = 0usize;
    let mut scratch = Vec::new();
    let entities: Vec<_> = set.entities.clone();
    let finalize_until = |frontiers: &[Option<Option<u64>>]| -> u64 {
        frontiers
            .iter()
            .map(|f| match f {
                Some(Some(t)) => *t,
                _ => u64::MAX,
            })
            .min()
            .unwrap_or(u64::MAX)
    };
    while next < queries.list.len() {
        let note = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(note) => note,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("the dataflow stopped before every lookup was answered")
            }
        };
        match note {
            Note::Row {
                query,
                entity,
                values,
            } => {
                rows.insert((query, entity), values);
                continue;
            }
            Note::Frontier { worker, frontier } => frontiers[worker] = Some(frontier),
        }
        let until = finalize_until(&frontiers);
        while let Some(query) = queries.list.get(next).filter(|q| q.as_of < until) {
            let id = next as u64;
            let (_, event) = &log.events[query.event];
            let mut context = Context {
                rows: vec![None; entities.len()],
                frontier_ms: Some(query.as_of as i64),
                txn: TxnContext::default(),
            };
            for (entity, key) in &query.lookups {
                if let Some(values) = rows.remove(&(id, *entity)) {
                    context.rows[*entity as usize] = Some(FeatureRow {
                        entity: Arc::clone(&entities[*entity as usize]),
                        id: key.to_string(),
                        as_of_ms: query.as_of as i64,
                        values,
                    });
                }
            }
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
                        as_of_ms: query.as_of as i64,
                        context: &context,
                        rules_score: f64::from(fraud_model.score(&scratch)?),
                        label: label.status,
                        fraud_type: label.fraud_type,
                    })?;
                }
                Event::Click(click) => {
                    context.vector(&view_model.plan, &mut scratch);
                    let label = purchases.label(
                        &click.user_id,
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
                        as_of_ms: query.as_of as i64,
                        context: &context,
                        rules_score: f64::from(view_model.score(&scratch)?),
                        label,
                    })?;
                }
            }
            debug_assert_eq!(queries.is_txn[next], matches!(event, Event::Txn(_)));
            next += 1;
            progress.inc(1);
        }
    }
    done.store(true, Ordering::SeqCst);
    drop(rx);
    for result in guards.join() {
        result.map_err(|e| anyhow::anyhow!("backfill worker panicked: {e}"))?;
    }
    progress.finish_and_clear();
    summary.elapsed_secs = started.elapsed().as_secs_f64();
    output.finish(&summary)?;
    Ok(summary)
}

/// One worker: worker 0 feeds the log; every worker runs its part of the
/// graph, the join and the collection, until the writer has what it needs.
fn worker_main(
    worker: &mut timely::worker::Worker,
    log: &EventLog,
    queries: &Queries,
    set: &FeatureSet,
    graph: &GraphConfig,
    tx: mpsc::Sender<Note>,
    done: &AtomicBool,
) {
    let index = worker.index();
    let probe = ProbeHandle::new();
    let (mut events, mut lookups) = worker.dataflow::<u64, _, _>(|scope| {
        let (events_in, events) = scope.new_collection::<dataflow::SourceEvent, isize>();
        let (lookups_in, lookups) = scope.new_collection::<((u8, Arc<str>), (u64, u64)), isize>();
        let rows = build_features(events, set, graph)
            .map(|row| ((row.entity, row.id), row.values))
            .delay(|t| t + 1)
            .arrange_by_key_named("Rows");
        let found = lookups
            .arrange_by_key_named("Lookups")
            .join_core(rows, |&(entity, _), &(query, as_of), values| {
                Some((query, as_of, entity, values.clone()))
            });
        let tx = tx.clone();
        // Rows found at each query's time, until the frontier passes it.
        let mut pending: BTreeMap<u64, Vec<(Found, isize)>> = BTreeMap::new();
        let mut reported = Some(0u64);
        found
            .inner
            .probe_with(&probe)
            .sink(Pipeline, "Collect", move |(input, frontier)| {
                input.for_each(|_, data| {
                    for ((query, as_of, entity, values), time, diff) in data.drain(..) {
                        // Updates at later times are the lookup's
                        // retraction or rows changing after it.
                        if time == as_of {
                            pending
                                .entry(time)
                                .or_default()
                                .push(((query, entity, values), diff));
                        }
                    }
                });
                let bound = frontier.frontier().first().copied();
                while let Some(entry) = pending.first_entry() {
                    if bound.is_some_and(|b| *entry.key() >= b) {
                        break;
                    }
                    let mut updates = entry.remove();
                    differential_dataflow::consolidation::consolidate(&mut updates);
                    for ((query, entity, values), diff) in updates {
                        debug_assert_eq!(diff, 1, "one row per key as of a time");
                        if diff > 0 {
                            let _ = tx.send(Note::Row {
                                query,
                                entity,
                                values,
                            });
                        }
                    }
                }
                if bound != reported {
                    reported = bound;
                    let _ = tx.send(Note::Frontier {
                        worker: index,
                        frontier: bound,
                    });
                }
            });
        (events_in, lookups_in)
    });

    if index == 0 {
        let mut next_query = 0usize;
        let mut time = 0u64;
        for (i, (source, event)) in log.events.iter().enumerate() {
            let at = graph.quantize(event.event_time());
            if at > time {
                time = at;
                events.advance_to(time);
                lookups.advance_to(time);
            }
            events.insert((*source, event.clone()));
            while let Some(query) = queries.list.get(next_query).filter(|q| q.event == i) {
                for (entity, key) in &query.lookups {
                    let record = ((*entity, Arc::clone(key)), (next_query as u64, query.as_of));
                    lookups.update_at(record.clone(), query.as_of, 1);
                    lookups.update_at(record, query.as_of + 1, -1);
                }
                next_query += 1;
            }
            if i % FEED_BATCH == FEED_BATCH - 1 {
                events.flush();
                lookups.flush();
                let behind = time.saturating_sub(MAX_AHEAD_TICKS * graph.tick_ms);
                while probe.less_than(&behind) && !done.load(Ordering::Relaxed) {
                    worker.step();
                }
            }
        }
    }
    events.close();
    lookups.close();
    while !done.load(Ordering::Relaxed) && worker.step_or_park(Some(Duration::from_millis(10))) {}
    // The writer has every answer: what remains are retractions past the
    // end of the log. Stop instead of draining them.
    for dataflow in worker.installed_dataflows() {
        worker.drop_dataflow(dataflow);
    }
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

/// Purchase times per user, ascending.
struct Purchases(HashMap<String, Vec<i64>>);

impl Purchases {
    fn new(log: &EventLog) -> Purchases {
        let mut by_user: HashMap<String, Vec<i64>> = HashMap::new();
        for (_, event) in &log.events {
            if let Event::Click(c) = event {
                if c.action == ClickAction::Purchase {
                    by_user
                        .entry(c.user_id.clone())
                        .or_default()
                        .push(c.event_time);
                }
            }
        }
        Purchases(by_user)
    }

    /// `Some(true)`: a purchase in (t, t + window]; `Some(false)`: none and
    /// the window ended within the log; `None`: the window is not over.
    fn label(&self, user: &str, t: i64, window: i64, log_end: i64) -> Option<bool> {
        let times = self.0.get(user).map_or(&[][..], Vec::as_slice);
        let after = times.partition_point(|&p| p <= t);
        if times.get(after).is_some_and(|&p| p <= t + window) {
            Some(true)
        } else if t + window <= log_end {
            Some(false)
        } else {
            None
        }
    }
}
