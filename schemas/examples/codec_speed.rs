//! Decode throughput of the hand-written fast path against apache-avro's
//! Value decoding with resolution (the path an unshipped writer schema takes).
//! `cargo run --release -p schemas --example codec_speed` prints one JSON line.

use std::time::Instant;

use schemas::codec::{Decoder, Encoder};
use schemas::{Channel, EventKind, Txn};

fn main() {
    let n = 1_000_000;
    let encoder = Encoder::default();
    let payloads: Vec<Vec<u8>> = (0..1024)
        .map(|i| {
            let t = Txn {
                event_id: format!("t-5eed-{i:08}"),
                card_id: format!("c-{:06}", i * 7 % 5000),
                user_id: format!("u-{:06}", i * 3 % 4000),
                merchant_id: format!("m-{:05}", i % 900),
                mcc: 5411,
                amount_minor: 1_000 + i,
                currency: "EUR".into(),
                country: "FR".into(),
                channel: Channel::Ecom,
                event_time: 1_700_000_000_000 + i,
                device_id: Some(format!("d-{i}")),
                ip_country: Some("FR".into()),
            };
            let mut out = Vec::new();
            encoder.encode_avro(&t, 2, &mut out).expect("v2 is shipped");
            out
        })
        .collect();

    let mut d = Decoder::default();
    let start = Instant::now();
    let mut sum = 0i64;
    for i in 0..n {
        sum += d
            .decode_txn(&payloads[i % payloads.len()], 1_800_000_000_000)
            .expect("valid")
            .amount_minor;
    }
    let fast = n as f64 / start.elapsed().as_secs_f64();

    let schema = EventKind::Txn.schema(2).expect("shipped");
    let m = n / 10;
    let start = Instant::now();
    for i in 0..m {
        let mut datum = &payloads[i % payloads.len()][5..];
        let v = apache_avro::from_avro_datum(schema, &mut datum, Some(schema)).expect("valid");
        sum += matches!(v, apache_avro::types::Value::Record(_)) as i64;
    }
    let generic = m as f64 / start.elapsed().as_secs_f64();
    println!(
        "{{\"bench\":\"codec_speed\",\"fast_path_decode_validate_per_s\":{fast:.0},\"apache_avro_value_decode_per_s\":{generic:.0},\"checksum\":{sum}}}"
    );
}
