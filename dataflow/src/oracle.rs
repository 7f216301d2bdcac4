//! A brute-force, sequential reference for the feature graph: the rows as of
//! a frontier, recomputed from scratch over an event log. Tests compare the
//! dataflow against it; it shares no aggregation code with the graph.

use std::collections::{BTreeMap, BTreeSet};

use schemas::event::{Click, ClickAction, Txn};
use schemas::features::{Entity, Value};

use schemas::features::pack_country;

use crate::graph::{sum_value, GraphConfig, CARD_WINDOWS_MS, USER_WINDOWS_MS};

/// Every non-empty row as of `as_of`: aggregates of the events with
/// `as_of - W <= quantized(event_time) < as_of`, keyed by entity and id.
pub fn rows_as_of(
    txns: &[Txn],
    clicks: &[Click],
    config: &GraphConfig,
    as_of: u64,
) -> BTreeMap<(Entity, String), Vec<Value>> {
    let within = |event_time: i64, window: u64| {
        let t = config.quantize(event_time);
        t < as_of && t + window >= as_of
    };
    let day = CARD_WINDOWS_MS[3];
    let mut cards: BTreeMap<&str, Vec<&Txn>> = BTreeMap::new();
    for t in txns.iter().filter(|t| within(t.event_time, day)) {
        cards.entry(&t.card_id).or_default().push(t);
    }
    let mut rows = BTreeMap::new();
    for (card, txns) in cards {
        let count = |w: u64| txns.iter().filter(|t| within(t.event_time, w)).count() as i64;
        let hour: Vec<&&Txn> = txns
            .iter()
            .filter(|t| within(t.event_time, CARD_WINDOWS_MS[2]))
            .collect();
        let n = txns.len() as i128;
        let sum: i128 = txns.iter().map(|t| t.amount_minor as i128).sum();
        let sum_sq: i128 = txns.iter().map(|t| (t.amount_minor as i128).pow(2)).sum();
        let spread = (n * sum_sq - sum * sum).max(0);
        let row = vec![
            Value::Int(count(CARD_WINDOWS_MS[0])),
            Value::Int(count(CARD_WINDOWS_MS[1])),
            Value::Int(count(CARD_WINDOWS_MS[2])),
            Value::Int(count(CARD_WINDOWS_MS[3])),
            sum_value(hour.iter().map(|t| t.amount_minor as i128).sum()),
            sum_value(sum),
            Value::Float(sum as f64 / n as f64),
            Value::Float((spread as f64).sqrt() / n as f64),
            Value::Int(
                txns.iter()
                    .map(|t| t.amount_minor)
                    .max()
                    .expect("non-empty"),
            ),
            Value::Int(
                hour.iter()
                    .map(|t| &t.merchant_id)
                    .collect::<BTreeSet<_>>()
                    .len() as i64,
            ),
            Value::Int(
                txns.iter()
                    .map(|t| &t.merchant_id)
                    .collect::<BTreeSet<_>>()
                    .len() as i64,
            ),
            Value::Int(
                txns.iter()
                    .map(|t| &t.country)
                    .collect::<BTreeSet<_>>()
                    .len() as i64,
            ),
            Value::Int(txns.iter().map(|t| t.event_time).max().expect("non-empty")),
            Value::Int(top_country(&txns)),
        ];
        rows.insert((Entity::Card, card.to_owned()), row);
    }

    let [m5, h1, d1] = USER_WINDOWS_MS;
    let mut users: BTreeMap<&str, (Vec<&Click>, Vec<&Txn>)> = BTreeMap::new();
    for c in clicks.iter().filter(|c| within(c.event_time, d1)) {
        users.entry(&c.user_id).or_default().0.push(c);
    }
    for t in txns.iter().filter(|t| within(t.event_time, d1)) {
        users.entry(&t.user_id).or_default().1.push(t);
    }
    for (user, (clicks, txns)) in users {
        let clicks_in = |w: u64| clicks.iter().filter(move |c| within(c.event_time, w));
        let row = vec![
            Value::Int(clicks_in(m5).count() as i64),
            Value::Int(clicks_in(h1).count() as i64),
            Value::Int(clicks_in(d1).count() as i64),
            Value::Int(
                clicks_in(h1)
                    .filter(|c| c.action == ClickAction::AddToCart)
                    .count() as i64,
            ),
            Value::Int(
                clicks_in(d1)
                    .filter(|c| c.action == ClickAction::Purchase)
                    .count() as i64,
            ),
            Value::Int(
                clicks_in(h1)
                    .map(|c| &c.category)
                    .collect::<BTreeSet<_>>()
                    .len() as i64,
            ),
            Value::Int(txns.len() as i64),
            sum_value(txns.iter().map(|t| t.amount_minor as i128).sum()),
        ];
        rows.insert((Entity::User, user.to_owned()), row);
    }
    rows
}

/// The country with the most transactions (the smallest on ties), packed;
/// 0 if it is not two uppercase letters.
fn top_country(txns: &[&Txn]) -> i64 {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for t in txns {
        *counts.entry(&t.country).or_default() += 1;
    }
    let most = counts.values().copied().max().unwrap_or(0);
    counts
        .into_iter()
        .find(|(_, n)| *n == most)
        .and_then(|(country, _)| pack_country(country))
        .unwrap_or(0)
}
