//! Window edge cases, asserted directly on the graph's output: an event at
//! exactly `F - W` is in the row as of `F`, one at `F` is not; money
//! retractions cancel exactly; the std of identical amounts is 0;
//! `top_country_24h` follows the 24h mode (ties to the smallest country).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use proptest::prelude::*;

use common::{run_shared, Log, Shared, T0};
use dataflow::graph::CARD_WINDOWS_MS;
use dataflow::{GraphConfig, RowUpdate};
use schemas::event::{Channel, Txn};
use schemas::features::{pack_country, unpack_country, Entity, Value, CARD_FEATURES};

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

/// Runs `txns` on 2 workers and returns every update, in timestamp order.
fn updates(txns: Vec<Txn>, frontiers: Vec<u64>) -> Vec<(u64, RowUpdate)> {
    let shared = Shared::default();
    let log = Arc::new(Log {
        txns,
        clicks: Vec::new(),
    });
    run_shared(
        timely::Config::process(2),
        log,
        GraphConfig::default(),
        Arc::new(frontiers),
        false,
        &shared,
    );
    let mut all = std::mem::take(&mut *shared.output.lock().unwrap());
    all.sort_by_key(|(t, _)| *t);
    all
}

/// The card row as of `frontier`, as the Redis sink would write it.
fn card_as_of(updates: &[(u64, RowUpdate)], card: &str, frontier: u64) -> Option<Vec<Value>> {
    let mut rows = BTreeMap::new();
    for (t, u) in updates
        .iter()
        .filter(|(t, u)| *t < frontier && u.entity == Entity::Card)
    {
        let _ = t;
        rows.insert(u.id.clone(), u.row.clone());
    }
    rows.remove(card).flatten()
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
    for (i, w) in CARD_WINDOWS_MS.iter().enumerate() {
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
        int(&card_as_of(&all, "c", t + 1).unwrap(), 12),
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
    let top = CARD_FEATURES
        .iter()
        .position(|f| f.name == "top_country_24h")
        .unwrap();
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
    let (t, day, h) = (T0 as u64, CARD_WINDOWS_MS[3], h as u64);
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
        for (t, _) in &all {
            let f = t + 1;
            let row = card_as_of(&all, "c", f);
            let within = |w: u64| txns.iter().filter(|x| {
                let q = config.quantize(x.event_time);
                q < f && q + w >= f
            }).map(|x| x.amount_minor as i128).sum::<i128>();
            match row {
                Some(row) => {
                    prop_assert_eq!(int(&row, 4) as i128, within(CARD_WINDOWS_MS[2]));
                    prop_assert_eq!(int(&row, 5) as i128, within(CARD_WINDOWS_MS[3]));
                }
                None => prop_assert_eq!(within(CARD_WINDOWS_MS[3]), 0),
            }
        }
        // Everything retracted: the row is deleted, not left at zero.
        prop_assert_eq!(card_as_of(&all, "c", u64::MAX), None);
    }

    #[test]
    fn std_of_identical_amounts_is_zero(amount in -1_000_000_000i64..1_000_000_000, n in 1usize..30, spread in 1i64..100_000_000) {
        let txns: Vec<Txn> = (0..n).map(|i| txn("c", T0 + (i as i64 * spread) % 80_000_000, amount)).collect();
        let all = updates(txns, vec![]);
        for (_, u) in all.iter().filter(|(_, u)| u.entity == Entity::Card && u.row.is_some()) {
            let row = u.row.as_ref().unwrap();
            prop_assert_eq!(row[7], Value::Float(0.0));
            prop_assert_eq!(row[6], Value::Float(amount as f64));
        }
    }
}
