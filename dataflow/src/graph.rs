//! The feature graph: txn and click streams in, changed feature rows out.
//!
//! Time contract: dataflow timestamps are event time in ms quantized down to
//! `tick_ms` ([`GraphConfig::quantize`]); every window is a multiple of the
//! tick. An event contributes to the row "as of F" iff
//! `F - W <= quantized(event_time) < F`. A [`RowUpdate`] at timestamp `s` is the
//! row's value after all events with quantized time `<= s`; the row as of `F`
//! is the last update with timestamp `< F`. An event at `t` is retracted from
//! window `W` by an update at `t + W`, emitted once the frontier passes it,
//! without new input.

use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::{Operator, OutputBuilder};
use timely::dataflow::operators::Concat;
use timely::dataflow::StreamVec;
use timely::progress::operate::FrontierInterest;

use operators::aggregate::{
    Aggregate, Count, DistinctCount, LastTime, Max, Mode, Moments, RowAggregate, Sum,
    WindowedAggregate, WORK_PER_ACTIVATION,
};
use operators::window::WindowFold;
use schemas::event::{Click, ClickAction, Txn};
use schemas::features::{
    pack_country, Entity, Value, CARD_FEATURES, DAY_MS, HOUR_MS, MINUTE_MS, USER_FEATURES,
};

/// Configuration of the feature graph.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GraphConfig {
    /// Event times are quantized down to multiples of this (ms). It must divide
    /// every window (1m, 5m, 1h, 24h), i.e. divide 60 000.
    pub tick_ms: u64,
}

impl Default for GraphConfig {
    fn default() -> Self {
        GraphConfig { tick_ms: 1000 }
    }
}

impl GraphConfig {
    /// Whether `tick_ms` is positive and divides every window.
    pub fn validate(&self) -> Result<(), String> {
        if self.tick_ms == 0 || !(MINUTE_MS as u64).is_multiple_of(self.tick_ms) {
            return Err(format!(
                "tick_ms {} must be positive and divide 60000",
                self.tick_ms
            ));
        }
        Ok(())
    }

    /// The dataflow timestamp of an event time: quantized down to the tick
    /// (negative times clamp to 0).
    pub fn quantize(&self, event_time_ms: i64) -> u64 {
        let t = event_time_ms.max(0) as u64;
        t - t % self.tick_ms
    }
}

/// A change of one feature row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowUpdate {
    pub entity: Entity,
    /// `card_id` or `user_id`.
    pub id: String,
    /// One value per `entity.features()`, in order; `None` when every window
    /// of the entity is empty (delete the row).
    pub row: Option<Vec<Value>>,
}

/// Card windows, by fold index.
pub const CARD_WINDOWS_MS: [u64; 4] = [
    MINUTE_MS as u64,
    5 * MINUTE_MS as u64,
    HOUR_MS as u64,
    DAY_MS as u64,
];
/// User windows, by fold index.
pub const USER_WINDOWS_MS: [u64; 3] = [5 * MINUTE_MS as u64, HOUR_MS as u64, DAY_MS as u64];

/// What a card row needs of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardEvent {
    /// Raw (unquantized) event time, ms.
    pub event_time: i64,
    pub amount_minor: i64,
    pub merchant_id: String,
    pub country: String,
}

/// What a user row needs of a click or a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserEvent {
    Click {
        category: String,
        action: ClickAction,
    },
    Txn {
        amount_minor: i64,
    },
}

/// Saturating conversion of an exact sum to a feature value.
pub fn sum_value(sum: i128) -> Value {
    Value::Int(sum.clamp(i64::MIN as i128, i64::MAX as i128) as i64)
}

/// The `top_country_24h` value of the most frequent country: its
/// [`pack_country`] code, 0 when there is none or it cannot be packed.
pub fn top_country(country: Option<&String>) -> i64 {
    country.and_then(|c| pack_country(c)).unwrap_or(0)
}

#[derive(Default)]
struct CardFold {
    counts: [Count; 4],
    sum_1h: Sum,
    merchants_1h: DistinctCount<String>,
    moments_24h: Moments,
    max_24h: Max<i64>,
    merchants_24h: DistinctCount<String>,
    /// Countries in 24h: `distinct_countries_24h` and `top_country_24h`.
    countries_24h: Mode<String>,
    last_24h: LastTime,
}

impl WindowFold<CardEvent> for CardFold {
    #[inline]
    fn enter(&mut self, w: usize, e: &CardEvent) {
        Aggregate::<CardEvent>::insert(&mut self.counts[w], e);
        match w {
            2 => {
                self.sum_1h.insert(&e.amount_minor);
                self.merchants_1h.insert(&e.merchant_id);
            }
            3 => {
                self.moments_24h.insert(&e.amount_minor);
                self.max_24h.insert(&e.amount_minor);
                self.merchants_24h.insert(&e.merchant_id);
                self.countries_24h.insert(&e.country);
                self.last_24h.insert(&e.event_time);
            }
            _ => {}
        }
    }
    #[inline]
    fn leave(&mut self, w: usize, e: &CardEvent) {
        Aggregate::<CardEvent>::retract(&mut self.counts[w], e);
        match w {
            2 => {
                self.sum_1h.retract(&e.amount_minor);
                self.merchants_1h.retract(&e.merchant_id);
            }
            3 => {
                self.moments_24h.retract(&e.amount_minor);
                self.max_24h.retract(&e.amount_minor);
                self.merchants_24h.retract(&e.merchant_id);
                self.countries_24h.retract(&e.country);
                self.last_24h.retract(&e.event_time);
            }
            _ => {}
        }
    }
}

impl RowAggregate<CardEvent> for CardFold {
    /// Inline, so the last row lives in the key's slot (no allocation, no
    /// extra cache miss when comparing).
    type Row = [Value; CARD_FEATURES.len()];
    fn row(&self) -> Self::Row {
        // Called only while the 24h window is non-empty.
        let m = &self.moments_24h;
        [
            Value::Int(self.counts[0].0),
            Value::Int(self.counts[1].0),
            Value::Int(self.counts[2].0),
            Value::Int(self.counts[3].0),
            sum_value(self.sum_1h.0),
            sum_value(m.sum),
            Value::Float(m.mean().unwrap_or(0.0)),
            Value::Float(m.population_std().unwrap_or(0.0)),
            Value::Int(self.max_24h.value().unwrap_or(0)),
            Value::Int(Aggregate::<String>::value(&self.merchants_1h)),
            Value::Int(Aggregate::<String>::value(&self.merchants_24h)),
            Value::Int(self.countries_24h.distinct()),
            Value::Int(self.last_24h.value().unwrap_or(0)),
            Value::Int(top_country(self.countries_24h.mode())),
        ]
    }
}

#[derive(Default)]
struct UserFold {
    clicks: [i64; 3],
    add_to_cart_1h: i64,
    purchases_24h: i64,
    categories_1h: DistinctCount<String>,
    txns_24h: i64,
    amount_24h: i128,
}

impl UserFold {
    #[inline]
    fn apply(&mut self, w: usize, e: &UserEvent, sign: i64) {
        match e {
            UserEvent::Click { category, action } => {
                self.clicks[w] += sign;
                match (w, action) {
                    (1, ClickAction::AddToCart) => self.add_to_cart_1h += sign,
                    (2, ClickAction::Purchase) => self.purchases_24h += sign,
                    _ => {}
                }
                if w == 1 {
                    if sign > 0 {
                        self.categories_1h.insert(category);
                    } else {
                        self.categories_1h.retract(category);
                    }
                }
            }
            UserEvent::Txn { amount_minor } => {
                if w == 2 {
                    self.txns_24h += sign;
                    self.amount_24h += sign as i128 * *amount_minor as i128;
                }
            }
        }
    }
}

impl WindowFold<UserEvent> for UserFold {
    /// A user's transactions count only over 24h: they skip the 5m and 1h
    /// windows (no departures scheduled there).
    #[inline]
    fn windows_of(e: &UserEvent) -> u32 {
        match e {
            UserEvent::Click { .. } => u32::MAX,
            UserEvent::Txn { .. } => 1 << 2,
        }
    }
    #[inline]
    fn enter(&mut self, w: usize, e: &UserEvent) {
        self.apply(w, e, 1);
    }
    #[inline]
    fn leave(&mut self, w: usize, e: &UserEvent) {
        self.apply(w, e, -1);
    }
}

impl RowAggregate<UserEvent> for UserFold {
    type Row = [Value; USER_FEATURES.len()];
    fn row(&self) -> Self::Row {
        [
            Value::Int(self.clicks[0]),
            Value::Int(self.clicks[1]),
            Value::Int(self.clicks[2]),
            Value::Int(self.add_to_cart_1h),
            Value::Int(self.purchases_24h),
            Value::Int(Aggregate::<String>::value(&self.categories_1h)),
            Value::Int(self.txns_24h),
            sum_value(self.amount_24h),
        ]
    }
}

/// Builds the feature graph. Inputs arrive at timestamps = quantized event
/// time (see the module docs for the time contract); the output holds one
/// update per row change, on the worker that owns the row's key (keys are
/// routed by a deterministic hash, so the rows do not depend on the number of
/// workers or processes).
///
/// Operators: "SplitTxns" (a txn to its card and user parts, without
/// cloning), "UserClickEvents" (projection),
/// "CardFeatures" and "UserFeatures" (windowed aggregates emitting
/// [`RowUpdate`]s).
///
/// When the inputs close, the pending retractions still fire (up to 24h past
/// the last event), so every row ends deleted: a bounded run should stop
/// writing at the frontier it meant to reach.
pub fn build_features<'scope>(
    txns: StreamVec<'scope, u64, Txn>,
    clicks: StreamVec<'scope, u64, Click>,
    config: &GraphConfig,
) -> StreamVec<'scope, u64, RowUpdate> {
    build_features_budgeted(txns, clicks, config, WORK_PER_ACTIVATION)
}

/// [`build_features`] with the windowed aggregates doing at most about
/// `work_per_activation` units of work per activation (default
/// [`WORK_PER_ACTIVATION`]). The output does not depend on it: tests use tiny
/// values so that every time is resumed mid-way.
pub fn build_features_budgeted<'scope>(
    txns: StreamVec<'scope, u64, Txn>,
    clicks: StreamVec<'scope, u64, Click>,
    config: &GraphConfig,
    work_per_activation: usize,
) -> StreamVec<'scope, u64, RowUpdate> {
    if let Err(e) = config.validate() {
        panic!("invalid graph config: {e}");
    }
    let (card_txns, user_txns) = split_txns(txns);
    let cards = card_txns.windowed_aggregate_budgeted::<CardFold, _, _>(
        "CardFeatures",
        &CARD_WINDOWS_MS,
        work_per_activation,
        |id: &String, row: Option<[Value; CARD_FEATURES.len()]>| RowUpdate {
            entity: Entity::Card,
            id: id.clone(),
            row: row.map(|r| r.to_vec()),
        },
    );

    let user_clicks = project(clicks, "UserClickEvents", |c: Click| {
        (
            c.user_id,
            UserEvent::Click {
                category: c.category,
                action: c.action,
            },
        )
    });
    let users = user_txns
        .concat(user_clicks)
        .windowed_aggregate_budgeted::<UserFold, _, _>(
            "UserFeatures",
            &USER_WINDOWS_MS,
            work_per_activation,
            |id: &String, row: Option<[Value; USER_FEATURES.len()]>| RowUpdate {
                entity: Entity::User,
                id: id.clone(),
                row: row.map(|r| r.to_vec()),
            },
        );

    cards.concat(users)
}

/// A named, record-at-a-time map.
fn project<'scope, D: 'static, D2: 'static>(
    stream: StreamVec<'scope, u64, D>,
    name: &str,
    mut logic: impl FnMut(D) -> D2 + 'static,
) -> StreamVec<'scope, u64, D2> {
    stream.unary(Pipeline, name, move |_, _| {
        move |input, output| {
            input.for_each(|cap, data| {
                output
                    .session(&cap)
                    .give_iterator(data.drain(..).map(&mut logic));
            });
        }
    })
}

/// Splits each transaction into its card part and its user part, moving the
/// strings (a stream used twice would clone every `Txn`).
#[allow(clippy::type_complexity)]
fn split_txns<'scope>(
    txns: StreamVec<'scope, u64, Txn>,
) -> (
    StreamVec<'scope, u64, (String, CardEvent)>,
    StreamVec<'scope, u64, (String, UserEvent)>,
) {
    let mut builder = OperatorBuilder::new("SplitTxns".to_owned(), txns.scope());
    let mut input = builder.new_input(txns, Pipeline);
    builder.set_notify_for(0, FrontierInterest::Never);
    let (card_output, cards) = builder.new_output::<Vec<(String, CardEvent)>>();
    let (user_output, users) = builder.new_output::<Vec<(String, UserEvent)>>();
    let mut card_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(card_output);
    let mut user_output = OutputBuilder::<_, CapacityContainerBuilder<_>>::from(user_output);
    builder.build(move |_capabilities| {
        move |_frontiers| {
            let mut card_output = card_output.activate();
            let mut user_output = user_output.activate();
            input.for_each(|cap, data| {
                let mut card_session = card_output.session(&cap);
                let mut user_session = user_output.session(&cap);
                for t in data.drain(..) {
                    user_session.give((
                        t.user_id,
                        UserEvent::Txn {
                            amount_minor: t.amount_minor,
                        },
                    ));
                    card_session.give((
                        t.card_id,
                        CardEvent {
                            event_time: t.event_time,
                            amount_minor: t.amount_minor,
                            merchant_id: t.merchant_id,
                            country: t.country,
                        },
                    ));
                }
            });
        }
    });
    (cards, users)
}
