//! Codec properties: round trips for every type and version, agreement with
//! apache-avro, schema evolution both ways, and malformed input.

use std::sync::Arc;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;
use proptest::prelude::*;
use schemas::codec::{DecodeError, Decoder, Encoder, Event};
use schemas::registry::MemoryRegistry;
use schemas::{Channel, Click, ClickAction, EventKind, Label, Txn};

const NOW: i64 = 1_700_000_000_000;

fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn id() -> impl Strategy<Value = String> {
    "[a-z0-9-]{1,16}"
}

fn txn() -> impl Strategy<Value = Txn> {
    (
        (text(), text(), text(), text(), any::<i32>(), any::<i64>()),
        (
            text(),
            text(),
            0..3u8,
            any::<i64>(),
            proptest::option::of(text()),
            proptest::option::of(text()),
        ),
    )
        .prop_map(
            |(
                (event_id, card_id, user_id, merchant_id, mcc, amount_minor),
                (currency, country, ch, event_time, device_id, ip_country),
            )| Txn {
                event_id,
                card_id,
                user_id,
                merchant_id,
                mcc,
                amount_minor,
                currency,
                country,
                channel: [Channel::Pos, Channel::Ecom, Channel::Atm][ch as usize],
                event_time,
                device_id,
                ip_country,
            },
        )
}

fn valid_txn() -> impl Strategy<Value = Txn> {
    (
        id(),
        id(),
        id(),
        id(),
        0..10_000i32,
        0..1_000_000_000i64,
        "[A-Z]{3}",
        "[A-Z]{2}",
        0..NOW,
        proptest::option::of(id()),
    )
        .prop_map(
            |(
                event_id,
                card_id,
                user_id,
                merchant_id,
                mcc,
                amount_minor,
                currency,
                country,
                event_time,
                device_id,
            )| Txn {
                event_id,
                card_id,
                user_id,
                merchant_id,
                mcc,
                amount_minor,
                currency,
                country,
                channel: Channel::Ecom,
                event_time,
                device_id,
                ip_country: Some("NL".into()),
            },
        )
}

fn click() -> impl Strategy<Value = Click> {
    (
        text(),
        text(),
        text(),
        text(),
        text(),
        0..3u8,
        any::<i64>(),
        proptest::option::of(any::<i32>()),
    )
        .prop_map(
            |(event_id, user_id, session_id, item_id, category, a, event_time, dwell_ms)| Click {
                event_id,
                user_id,
                session_id,
                item_id,
                category,
                action: [
                    ClickAction::View,
                    ClickAction::AddToCart,
                    ClickAction::Purchase,
                ][a as usize],
                event_time,
                dwell_ms,
            },
        )
}

fn label() -> impl Strategy<Value = Label> {
    (
        text(),
        text(),
        any::<bool>(),
        proptest::option::of(text()),
        any::<i64>(),
    )
        .prop_map(
            |(event_id, card_id, is_fraud, fraud_type, label_time)| Label {
                event_id,
                card_id,
                is_fraud,
                fraud_type,
                label_time,
            },
        )
}

fn opt_str(v: &Option<String>) -> Avro {
    match v {
        None => Avro::Union(0, Box::new(Avro::Null)),
        Some(s) => Avro::Union(1, Box::new(Avro::String(s.clone()))),
    }
}

/// The apache-avro value of a transaction at `version`.
fn txn_value(t: &Txn, version: u32) -> Avro {
    let (i, sym) = match t.channel {
        Channel::Pos => (0, "pos"),
        Channel::Ecom => (1, "ecom"),
        Channel::Atm => (2, "atm"),
    };
    let mut f = vec![
        ("event_id".to_owned(), Avro::String(t.event_id.clone())),
        ("card_id".into(), Avro::String(t.card_id.clone())),
        ("user_id".into(), Avro::String(t.user_id.clone())),
        ("merchant_id".into(), Avro::String(t.merchant_id.clone())),
        ("mcc".into(), Avro::Int(t.mcc)),
        ("amount_minor".into(), Avro::Long(t.amount_minor)),
        ("currency".into(), Avro::String(t.currency.clone())),
        ("country".into(), Avro::String(t.country.clone())),
        ("channel".into(), Avro::Enum(i, sym.into())),
        ("event_time".into(), Avro::TimestampMillis(t.event_time)),
    ];
    if version >= 2 {
        f.push(("device_id".into(), opt_str(&t.device_id)));
        f.push(("ip_country".into(), opt_str(&t.ip_country)));
    }
    Avro::Record(f)
}

fn click_value(c: &Click, version: u32) -> Avro {
    let (i, sym) = match c.action {
        ClickAction::View => (0, "view"),
        ClickAction::AddToCart => (1, "add_to_cart"),
        ClickAction::Purchase => (2, "purchase"),
    };
    let mut f = vec![
        ("event_id".to_owned(), Avro::String(c.event_id.clone())),
        ("user_id".into(), Avro::String(c.user_id.clone())),
        ("session_id".into(), Avro::String(c.session_id.clone())),
        ("item_id".into(), Avro::String(c.item_id.clone())),
        ("category".into(), Avro::String(c.category.clone())),
        ("action".into(), Avro::Enum(i, sym.into())),
        ("event_time".into(), Avro::TimestampMillis(c.event_time)),
    ];
    if version >= 2 {
        let dwell = match c.dwell_ms {
            None => Avro::Union(0, Box::new(Avro::Null)),
            Some(d) => Avro::Union(1, Box::new(Avro::Int(d))),
        };
        f.push(("dwell_ms".into(), dwell));
    }
    Avro::Record(f)
}

fn label_value(l: &Label) -> Avro {
    Avro::Record(vec![
        ("event_id".to_owned(), Avro::String(l.event_id.clone())),
        ("card_id".into(), Avro::String(l.card_id.clone())),
        ("is_fraud".into(), Avro::Boolean(l.is_fraud)),
        ("fraud_type".into(), opt_str(&l.fraud_type)),
        ("label_time".into(), Avro::TimestampMillis(l.label_time)),
    ])
}

fn framed(id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = vec![0];
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(datum);
    out
}

/// Checks, for one event at one writer version: our bytes equal apache-avro's,
/// the newest reader gets the event with newer fields defaulted, and a reader
/// of every older version gets those fields dropped.
fn check_round_trip<E: Event + PartialEq + std::fmt::Debug>(event: &E, version: u32, value: Avro) {
    let encoder = Encoder::default();
    let mut ours = Vec::new();
    encoder.encode_avro(event, version, &mut ours).unwrap();
    let schema = E::KIND.schema(version).unwrap();
    let theirs = apache_avro::to_avro_datum(schema, value).unwrap();
    assert_eq!(&ours[5..], &theirs[..], "datum differs from apache-avro's");
    let id = encoder.schema_id(E::KIND, version).unwrap();
    assert_eq!(ours[..5], framed(id, &[])[..]);

    for reader in E::KIND.versions() {
        let mut expected = event.clone();
        expected.drop_newer_than(version.min(reader));
        let mut decoder = Decoder::default()
            .with_reader_version(E::KIND, reader)
            .unwrap();
        assert_eq!(
            decoder.read::<E>(&ours).unwrap(),
            expected,
            "writer v{version} reader v{reader}"
        );
    }

    let mut json = Vec::new();
    Encoder::encode_json(event, &mut json);
    assert_eq!(Decoder::default().read::<E>(&json).unwrap(), *event);
}

proptest! {
    #[test]
    fn txn_round_trips_in_every_version(t in txn()) {
        for v in EventKind::Txn.versions() {
            check_round_trip(&t, v, txn_value(&t, v));
        }
    }

    #[test]
    fn click_round_trips_in_every_version(c in click()) {
        for v in EventKind::Click.versions() {
            check_round_trip(&c, v, click_value(&c, v));
        }
    }

    #[test]
    fn label_round_trips(l in label()) {
        check_round_trip(&l, 1, label_value(&l));
    }

    #[test]
    fn valid_events_pass_validation(t in valid_txn()) {
        let mut bytes = Vec::new();
        Encoder::default().encode_avro(&t, 2, &mut bytes).unwrap();
        prop_assert_eq!(Decoder::default().decode_txn(&bytes, NOW).unwrap(), t);
    }

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut d = Decoder::default();
        let _ = d.read::<Txn>(&bytes);
        let _ = d.read::<Click>(&bytes);
        let _ = d.read::<Label>(&bytes);
    }

    #[test]
    fn random_datums_under_every_known_id_give_typed_errors(id in 1..=5u32, datum in proptest::collection::vec(any::<u8>(), 0..48)) {
        let bytes = framed(id, &datum);
        let mut d = Decoder::default();
        for r in [d.decode_txn(&bytes, NOW).err(), d.decode_click(&bytes, NOW).err(), d.decode_label(&bytes, NOW).err()].into_iter().flatten() {
            prop_assert!(!r.reason().is_empty());
        }
    }

    #[test]
    fn every_truncation_is_an_error(t in txn()) {
        let mut bytes = Vec::new();
        Encoder::default().encode_avro(&t, 2, &mut bytes).unwrap();
        let mut d = Decoder::default();
        for cut in 0..bytes.len() {
            let err = d.read::<Txn>(&bytes[..cut]).unwrap_err();
            let expected = match cut { 0 => "empty", 1..=4 => "truncated_header", _ => "avro_truncated" };
            prop_assert_eq!(err.reason(), expected);
        }
    }
}

fn sample_txn() -> Txn {
    Txn {
        event_id: "t-1".into(),
        card_id: "c-1".into(),
        user_id: "u-1".into(),
        merchant_id: "m-1".into(),
        mcc: 5411,
        amount_minor: 4_250,
        currency: "EUR".into(),
        country: "FR".into(),
        channel: Channel::Pos,
        event_time: NOW - 1_000,
        device_id: Some("d-9".into()),
        ip_country: Some("FR".into()),
    }
}

fn reason<T: std::fmt::Debug>(r: Result<T, DecodeError>) -> &'static str {
    r.unwrap_err().reason()
}

#[test]
fn v1_bytes_read_as_v2_get_null_defaults() {
    let mut bytes = Vec::new();
    Encoder::default()
        .encode_avro(&sample_txn(), 1, &mut bytes)
        .unwrap();
    assert_eq!(bytes[..5], [0, 0, 0, 0, 1]);
    let t = Decoder::default().decode_txn(&bytes, NOW).unwrap();
    assert_eq!((t.device_id, t.ip_country), (None, None));
    assert_eq!(t.amount_minor, 4_250);
}

#[test]
fn v2_bytes_read_by_a_v1_reader_drop_the_new_fields() {
    let mut bytes = Vec::new();
    Encoder::default()
        .encode_avro(&sample_txn(), 2, &mut bytes)
        .unwrap();
    let mut v1 = Decoder::default()
        .with_reader_version(EventKind::Txn, 1)
        .unwrap();
    let t = v1.decode_txn(&bytes, NOW).unwrap();
    assert_eq!((t.device_id, t.ip_country), (None, None));
    // apache-avro's own resolution of the same bytes agrees: no v2 fields.
    let (w, r) = (
        EventKind::Txn.schema(2).unwrap(),
        EventKind::Txn.schema(1).unwrap(),
    );
    let Avro::Record(fields) = apache_avro::from_avro_datum(w, &mut &bytes[5..], Some(r)).unwrap()
    else {
        panic!()
    };
    assert_eq!(fields.len(), 10);
    assert!(fields.iter().all(|(n, _)| n != "device_id"));
}

/// A v3 another team registered: one more optional field, plus a field the
/// reader lacks. Not shipped here, so it takes the apache-avro path.
const TXN_V3: &str = r#"{"type": "record", "name": "Txn", "namespace": "sfs.events", "fields": [
    {"name": "event_id", "type": "string"}, {"name": "card_id", "type": "string"},
    {"name": "user_id", "type": "string"}, {"name": "merchant_id", "type": "string"},
    {"name": "mcc", "type": "int"}, {"name": "amount_minor", "type": "long"},
    {"name": "currency", "type": "string"}, {"name": "country", "type": "string"},
    {"name": "channel", "type": {"type": "enum", "name": "Channel", "symbols": ["pos", "ecom", "atm"]}},
    {"name": "event_time", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "device_id", "type": ["null", "string"], "default": null},
    {"name": "ip_country", "type": ["null", "string"], "default": null},
    {"name": "risk_score", "type": ["null", "double"], "default": null}]}"#;

#[test]
fn an_unshipped_newer_writer_schema_is_resolved_by_avro_rules() {
    let registry = MemoryRegistry::shipped();
    let id =
        schemas::registry::SchemaRegistry::register(&registry, "txn.events-value", TXN_V3).unwrap();
    assert_eq!(id, 6);
    let writer = Schema::parse_str(TXN_V3).unwrap();
    let t = sample_txn();
    let Avro::Record(mut fields) = txn_value(&t, 2) else {
        unreachable!()
    };
    fields.push((
        "risk_score".into(),
        Avro::Union(1, Box::new(Avro::Double(0.5))),
    ));
    let bytes = framed(
        id,
        &apache_avro::to_avro_datum(&writer, Avro::Record(fields)).unwrap(),
    );
    let mut d = Decoder::new(Arc::new(registry));
    assert_eq!(
        d.decode_txn(&bytes, NOW).map_err(|e| e.to_string()),
        Ok(t.clone())
    );
    assert_eq!(d.decode_txn(&bytes, NOW).unwrap(), t, "cached plan");
    let err = d.read::<Txn>(&bytes[..bytes.len() - 3]).unwrap_err();
    assert_eq!(err.reason(), "avro_truncated", "{err}");
    let err = d.read::<Txn>(&framed(id, &[0, 1, 2])).unwrap_err();
    assert_eq!(err.reason(), "avro_malformed", "negative length: {err}");
    // A label reader cannot read a transaction schema.
    assert_eq!(reason(d.decode_label(&bytes, NOW)), "incompatible_schema");
}

#[test]
fn malformed_avro_gives_typed_errors() {
    let mut d = Decoder::default();
    let mut good = Vec::new();
    Encoder::default()
        .encode_avro(&sample_txn(), 2, &mut good)
        .unwrap();
    assert_eq!(reason(d.read::<Txn>(&[])), "empty");
    assert_eq!(reason(d.read::<Txn>(&[0, 0, 0])), "truncated_header");
    let mut wrong_magic = good.clone();
    wrong_magic[0] = 1;
    assert_eq!(reason(d.read::<Txn>(&wrong_magic)), "unknown_format");
    let mut unknown = good.clone();
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    let err = d.read::<Txn>(&unknown).unwrap_err();
    assert!(matches!(err, DecodeError::UnknownSchemaId(999)), "{err}");
    let mut as_label = good.clone();
    as_label[1..5].copy_from_slice(&5u32.to_be_bytes());
    assert_eq!(
        reason(d.read::<Txn>(&as_label)),
        "wrong_schema",
        "a label id on the txn topic"
    );
    assert_eq!(reason(d.read::<Label>(&good)), "wrong_schema");
    let mut trailing = good.clone();
    trailing.push(7);
    assert_eq!(reason(d.read::<Txn>(&trailing)), "avro_trailing_bytes");
    let mut bad_enum = Vec::new();
    Encoder::default()
        .encode_avro(&sample_txn(), 1, &mut bad_enum)
        .unwrap();
    let channel_at = bad_enum.len() - 1 - 6; // channel byte precedes the 6-byte event_time varint
    assert_eq!(bad_enum[channel_at], 0, "pos is index 0");
    bad_enum[channel_at] = 6; // index 3
    let err = d.read::<Txn>(&bad_enum).unwrap_err();
    assert_eq!(err.reason(), "avro_malformed", "{err}");
    assert!(!err.is_retryable());
}

#[test]
fn malformed_json_gives_typed_errors() {
    let mut d = Decoder::default();
    let mut good = Vec::new();
    Encoder::encode_json(&sample_txn(), &mut good);
    let good = String::from_utf8(good).unwrap();
    assert_eq!(d.decode_txn(good.as_bytes(), NOW).unwrap(), sample_txn());
    assert_eq!(
        reason(d.read::<Txn>(&good.as_bytes()[..good.len() - 3])),
        "json_truncated"
    );
    assert_eq!(reason(d.read::<Txn>(b"{\"event_id\": }")), "json_syntax");
    let wrong_type = good.replace("\"amount_minor\":4250", "\"amount_minor\":\"4250\"");
    assert_ne!(wrong_type, good);
    assert_eq!(reason(d.read::<Txn>(wrong_type.as_bytes())), "json_invalid");
    let missing = good.replace("\"card_id\":\"c-1\",", "");
    assert_ne!(missing, good);
    let err = d.read::<Txn>(missing.as_bytes()).unwrap_err();
    assert_eq!(err.reason(), "json_invalid");
    assert!(err.to_string().contains("card_id"), "{err}");
    let bad_enum = good.replace("\"pos\"", "\"teleport\"");
    assert_eq!(reason(d.read::<Txn>(bad_enum.as_bytes())), "json_invalid");
    assert_eq!(reason(d.read::<Txn>(b"[1, 2]")), "unknown_format");
    // Optional fields may be absent or null, unknown fields are ignored.
    let minimal = r#" {"event_id":"t","card_id":"c","user_id":"u","merchant_id":"m","mcc":1,"amount_minor":5,
        "currency":"USD","country":"US","channel":"atm","event_time":10,"device_id":null,"extra":[1]}"#;
    let t = d.decode_txn(minimal.as_bytes(), NOW).unwrap();
    assert_eq!(
        (t.channel, t.device_id, t.ip_country),
        (Channel::Atm, None, None)
    );
}

#[test]
fn validation_runs_after_decoding() {
    let mut d = Decoder::default();
    let mut t = sample_txn();
    t.event_time = NOW + 2 * 24 * 3_600_000;
    let mut bytes = Vec::new();
    Encoder::default().encode_avro(&t, 2, &mut bytes).unwrap();
    assert_eq!(reason(d.decode_txn(&bytes, NOW)), "time_in_future");
    assert!(d.read::<Txn>(&bytes).is_ok(), "read skips validation");
    t.currency = "usd".into();
    bytes.clear();
    Encoder::default().encode_avro(&t, 2, &mut bytes).unwrap();
    assert_eq!(reason(d.decode_txn(&bytes, NOW)), "bad_currency");
}
