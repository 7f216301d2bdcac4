//! The Confluent REST client against an in-process stand-in that speaks the
//! same endpoints (no Confluent-compatible registry can run on this machine:
//! see schemas/CONTEXT.md). What is under test is our client: its paths,
//! bodies, status handling, and that the decoder asks once per schema id.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use schemas::codec::{Decoder, Encoder, Topics};
use schemas::registry::{MemoryRegistry, RegistryError, RestRegistry, SchemaRegistry};
use schemas::{Channel, EventKind, Txn};

type Log = Arc<Mutex<Vec<String>>>;

/// Serves the Confluent endpoints we use from a `MemoryRegistry`.
fn serve(registry: MemoryRegistry) -> (String, Log) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let log: Log = Arc::default();
    let seen = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let mut length = 0;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some(v) = header.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let mut parts = line.split_whitespace();
            let (method, path) = (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            );
            seen.lock().unwrap().push(format!("{method} {path}"));
            let schema = || {
                let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                v["schema"].as_str().unwrap().to_owned()
            };
            let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            let (status, reply) = match (method.as_str(), segments.as_slice()) {
                ("GET", ["schemas", "ids", id]) => {
                    match registry.schema_by_id(id.parse().unwrap()).unwrap() {
                        Some(s) => (200, serde_json::json!({ "schema": s })),
                        None => (
                            404,
                            serde_json::json!({ "error_code": 40403, "message": "Schema not found" }),
                        ),
                    }
                }
                ("POST", ["subjects", subject, "versions"]) => {
                    match registry.register(subject, &schema()) {
                        Ok(id) => (200, serde_json::json!({ "id": id })),
                        Err(_) => (
                            409,
                            serde_json::json!({ "error_code": 409, "message": "incompatible" }),
                        ),
                    }
                }
                ("POST", ["compatibility", "subjects", subject, "versions", "latest"]) => (
                    200,
                    serde_json::json!({ "is_compatible": registry.check_compatibility(subject, &schema()).unwrap() }),
                ),
                ("GET", ["broken"]) => (500, serde_json::json!({ "error_code": 50001 })),
                _ => (404, serde_json::json!({ "error_code": 404 })),
            };
            let body = reply.to_string();
            let reason = if status == 200 { "OK" } else { "Error" };
            let response = format!(
                "HTTP/1.1 {status} {reason}\r\nContent-Type: application/vnd.schemaregistry.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).ok();
        }
    });
    (url, log)
}

fn txn() -> Txn {
    Txn {
        event_id: "t".into(),
        card_id: "c".into(),
        user_id: "u".into(),
        merchant_id: "m".into(),
        mcc: 5411,
        amount_minor: 10,
        currency: "EUR".into(),
        country: "DE".into(),
        channel: Channel::Pos,
        event_time: 1,
        device_id: Some("d".into()),
        ip_country: None,
    }
}

#[test]
fn encoder_registers_and_decoder_fetches_each_id_once() {
    let (url, log) = serve(MemoryRegistry::new());
    let rest = Arc::new(RestRegistry::new(&url));
    let topics = Topics {
        txn: "rest.txn".into(),
        click: "rest.click".into(),
        label: "rest.label".into(),
    };
    let encoder = Encoder::register(rest.as_ref(), &topics).unwrap();
    assert_eq!(encoder.schema_id(EventKind::Txn, 1), Some(1));
    assert_eq!(encoder.schema_id(EventKind::Label, 1), Some(5));
    assert!(log
        .lock()
        .unwrap()
        .contains(&"POST /subjects/rest.txn-value/versions".to_owned()));

    let mut d = Decoder::new(rest.clone());
    let mut bytes = Vec::new();
    encoder.encode_avro(&txn(), 2, &mut bytes).unwrap();
    for _ in 0..3 {
        assert_eq!(d.decode_txn(&bytes, 10).unwrap(), txn());
    }
    let fetches = log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("GET /schemas/ids/"))
        .count();
    assert_eq!(fetches, 1, "cached by id");

    bytes[1..5].copy_from_slice(&77u32.to_be_bytes());
    assert_eq!(
        d.decode_txn(&bytes, 10).unwrap_err().reason(),
        "unknown_schema_id"
    );

    // Compatibility: the shipped v2 may follow v1; a breaking change may not.
    let v1 = EventKind::Txn.known(1).unwrap().text;
    let breaking = v1.replace(r#""type": "int""#, r#""type": "string""#);
    assert!(rest
        .check_compatibility("rest.txn-value", EventKind::Txn.known(2).unwrap().text)
        .unwrap());
    assert!(!rest
        .check_compatibility("rest.txn-value", &breaking)
        .unwrap());
    assert_eq!(
        rest.register("rest.txn-value", &breaking),
        Err(RegistryError::Incompatible("rest.txn-value".into()))
    );
}

#[test]
fn an_unreachable_registry_is_a_retryable_error_not_a_dead_letter() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let mut d = Decoder::new(Arc::new(RestRegistry::new(&url)));
    let err = d.read::<Txn>(&[0, 0, 0, 0, 9, 1, 2]).unwrap_err();
    assert_eq!(err.reason(), "registry_unavailable");
    assert!(err.is_retryable(), "{err}");
}
