//! Events of the shipped feature set's sources, for the unit tests.

use dataflow::compile::Event;
use schemas::{Channel, Click, ClickAction, FeatureSet, Txn};

/// The shipped feature definitions.
pub fn shipped() -> FeatureSet {
    FeatureSet::parse("features.toml", include_str!("../../features.toml")).unwrap()
}

fn source(set: &FeatureSet, name: &str) -> usize {
    set.sources.iter().position(|s| s.name == name).unwrap()
}

/// A transaction of `card` by `user` at `at`, from `set`'s source "txn".
pub fn txn(set: &FeatureSet, card: &str, user: &str, at: i64) -> (usize, Event) {
    let t = Txn {
        event_id: format!("t-{card}-{at}"),
        card_id: card.into(),
        user_id: user.into(),
        merchant_id: "m".into(),
        mcc: 5411,
        amount_minor: 100,
        currency: "EUR".into(),
        country: "DE".into(),
        channel: Channel::Pos,
        event_time: at,
        device_id: None,
        ip_country: None,
    };
    (source(set, "txn"), Event::Txn(t))
}

/// A click of `user` at `at`, from `set`'s source "click".
pub fn click(set: &FeatureSet, user: &str, action: ClickAction, at: i64) -> (usize, Event) {
    let c = Click {
        event_id: format!("c-{user}-{at}"),
        user_id: user.into(),
        session_id: "s".into(),
        item_id: "i".into(),
        category: "books".into(),
        action,
        event_time: at,
        dwell_ms: None,
    };
    (source(set, "click"), Event::Click(c))
}
