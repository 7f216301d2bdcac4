//! Window edge cases, asserted directly on the graph's output: an event at
//! exactly `F - W` is in the row as of `F`, one at `F` is not; money
//! retractions cancel exactly; the std of identical amounts is 0;
//! `top_country_24h` follows the 24h mode (ties to the smallest country).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use common::{parse, run_shared, Log, Shared, SHIPPED, T0};
use dataflow::GraphConfig;
use schemas::event::{Channel, Txn};
use schemas::features::{pack_country, unpack_country};
use schemas::{Row, Value};

const MINUTE: u64 = 60_000;
/// The card windows of the shipped definitions: 1m, 5m, 1h, 24h.
const CARD_WINDOWS: [u64; 4] = [MINUTE, 5 * MINUTE, 60 * MINUTE, 24 * 60 * MINUTE];

/// Index of card feature `name` in the row of the shipped definitions.
fn card(name: &str) -> usize {
    parse(SHIPPED)
        .entity("card")
        .unwrap()
        .position(name)
        .unwrap()
}

fn txn(card: &str, event_time: i64, amount_minor: i64) -> Txn {
    Txn {
        event_id: format!("{card}-{event_time}-{amount_minor}"),
        card_id: card.into(),
        user_id: "u".into(),
        merchant_id: "m".into(),
        mcc: 1,
        amount_minor,
        currency: "EUR".into(),
        country: "FR".into(),
        channel: Channel::Pos,
        event_time,
        device_id: None,
        ip_country: None,
    }
}

/// Runs `txns` through the shipped definitions on 2 workers and returns
/// every change `(row, time, diff)`, in timestamp order.
fn updates(txns: Vec<Txn>, frontiers: Vec<u64>) -> Vec<(Row, u64, isize)> {
    let shared = Shared::default();
    let log = Arc::new(Log {
        txns,
        clicks: Vec::new(),
    });
    run_shared(
        timely::Config::process(2),
        log,
        Arc::new(SHIPPED.to_owned()),
        GraphConfig::default(),
        Arc::new(frontiers),
        false,
        &shared,
    );
    let mut all = std::mem::take(&mut *shared.output.lock().unwrap());
    all.sort_by_key(|(_, t, diff)| (*t, *diff));
    all
}

/// The card row as of `frontier`: the changes before it, accumulated.
fn card_as_of(updates: &[(Row, u64, isize)], card: &str, frontier: u64) -> Option<Vec<Value>> {
    let mut rows: BTreeMap<Vec<Value>, isize> = BTreeMap::new();
    for (row, _, diff) in updates
        .iter()
        .filter(|(row, t, _)| *t < frontier && row.entity == 0 && &*row.id == card)
    {
        *rows.entry(row.values.to_vec()).or_default() += diff;
    }
    rows.retain(|_, n| *n != 0);
    assert!(
        rows.values().all(|n| *n == 1) && rows.len() <= 1,
        "one row per key"
    );
    rows.into_keys().next()
}

fn int(row: &[Value], i: usize) -> i64 {
    match row[i] {
        Value::Int(v) => v,
        Value::Float(v) => panic!("feature {i} is a float {v}"),
    }
}

#[test]
fn an_event_at_f_minus_w_is_in_and_one_at_f_is_out() {
    let t = T0 as u64; // a multiple of the tick
    let all = updates(vec![txn("c", T0, 100)], vec![t + 1000]);
    assert_eq!(
        card_as_of(&all, "c", t),
        None,
        "an event at F is not in the row as of F"
    );
    for (i, w) in CARD_WINDOWS.iter().enumerate() {
        let at_edge = card_as_of(&all, "c", t + w).expect("24h window holds the event");
        assert_eq!(
            int(&at_edge, i),
            1,
            "event at exactly F - W is in window {w}"
        );
        match card_as_of(&all, "c", t + w + 1) {
            Some(row) => assert_eq!(int(&row, i), 0, "event before F - W left window {w}"),
            None => assert_eq!(i, 3, "only leaving the 24h window deletes the row"),
        }
    }
    assert_eq!(
        int(
            &card_as_of(&all, "c", t + 1).unwrap(),
            card("last_txn_time")
        ),
        T0,
        "last_txn_time is raw"
    );
}

fn in_country(mut t: Txn, country: &str) -> Txn {
    t.country = country.into();
    t.event_id = format!("{}-{country}", t.event_id);
    t
}

#[test]
fn top_country_is_the_24h_mode_with_ties_to_the_smallest() {
    let top = card("top_country_24h");
    let h: i64 = 3_600_000;
    // t0: FR, US; t0+1h: US, DE, DE; t0+2h: FR, FR.
    let txns = vec![
        in_country(txn("c", T0, 1), "FR"),
        in_country(txn("c", T0, 2), "US"),
        in_country(txn("c", T0 + h, 3), "US"),
        in_country(txn("c", T0 + h, 4), "DE"),
        in_country(txn("c", T0 + h, 5), "DE"),
        in_country(txn("c", T0 + 2 * h, 6), "FR"),
        in_country(txn("c", T0 + 2 * h, 7), "FR"),
    ];
    let all = updates(txns, vec![]);
    let (t, day, h) = (T0 as u64, CARD_WINDOWS[3], h as u64);
    let country = |f: u64| {
        let row = card_as_of(&all, "c", f)?;
        unpack_country(int(&row, top))
    };
    // FR 1, US 1: tie, the smallest.
    assert_eq!(country(t + 1).as_deref(), Some("FR"));
    // FR 1, US 2, DE 2: DE < US.
    assert_eq!(country(t + h + 1).as_deref(), Some("DE"));
    // FR 3, US 2, DE 2.
    assert_eq!(country(t + 2 * h + 1).as_deref(), Some("FR"));
    // The first hour leaves: FR 2, US 1, DE 2: tie, DE.
    assert_eq!(country(t + day + 1).as_deref(), Some("DE"));
    // Only the last hour is left: FR.
    assert_eq!(country(t + day + h + 1).as_deref(), Some("FR"));
    assert_eq!(country(t + day + 2 * h + 1), None, "row deleted");
    let row = card_as_of(&all, "c", t + 1).unwrap();
    assert_eq!(row[top], Value::Int(pack_country("FR").unwrap()));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn money_retractions_cancel_exactly(
        amounts in proptest::collection::vec((-1_000_000_000_000i64..1_000_000_000_000, 0i64..7_200_000), 1..20),
    ) {
        let txns: Vec<Txn> = amounts.iter().map(|(a, dt)| txn("c", T0 + dt, *a)).collect();
        let all = updates(txns.clone(), vec![]);
        let config = GraphConfig::default();
        // At every update time the 1h and 24h sums equal the exact sums.
        for (_, t, _) in &all {
            let f = t + 1;
            let row = card_as_of(&all, "c", f);
            let within = |w: u64| txns.iter().filter(|x| {
                let q = config.quantize(x.event_time);
                q < f && q + w >= f
            }).map(|x| x.amount_minor as i128).sum::<i128>();
            match row {
                Some(row) => {
                    prop_assert_eq!(int(&row, card("amount_sum_1h")) as i128, within(CARD_WINDOWS[2]));
                    prop_assert_eq!(int(&row, card("amount_sum_24h")) as i128, within(CARD_WINDOWS[3]));
                }
                None => prop_assert_eq!(within(CARD_WINDOWS[3]), 0),
            }
        }
        // Everything retracted: the row is deleted, not left at zero.
        prop_assert_eq!(card_as_of(&all, "c", u64::MAX), None);
    }

    #[test]
    fn std_of_identical_amounts_is_zero(amount in -1_000_000_000i64..1_000_000_000, n in 1usize..30, spread in 1i64..100_000_000) {
        let txns: Vec<Txn> = (0..n).map(|i| txn("c", T0 + (i as i64 * spread) % 80_000_000, amount)).collect();
        let all = updates(txns, vec![]);
        for (row, _, _) in all.iter().filter(|(row, _, diff)| row.entity == 0 && *diff == 1) {
            prop_assert_eq!(row.values[card("amount_std_24h")], Value::Float(0.0));
            prop_assert_eq!(row.values[card("amount_mean_24h")], Value::Float(amount as f64));
        }
    }
}
