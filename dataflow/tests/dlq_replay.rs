//! `sfs dlq replay` against the real broker: dead letters go back to their
//! source topic with their key and payload, the reason filter holds, and a
//! second run replays nothing twice.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dataflow::dlq::{replay, ReplayArgs, HEADER_REPLAYED_FROM};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use sinks::kafka::{HEADER_REASON, HEADER_TOPIC};

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

fn dead_letter<'a>(
    dlq: &'a str,
    key: &'a str,
    payload: &'a str,
    source: &'a str,
    reason: &'a str,
) -> BaseRecord<'a, str, str> {
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: HEADER_REASON,
            value: Some(reason),
        })
        .insert(Header {
            key: HEADER_TOPIC,
            value: Some(source),
        });
    BaseRecord::to(dlq)
        .key(key)
        .payload(payload)
        .partition(0)
        .headers(headers)
}

/// Every record of `topic`, sorted: (key, payload, replayed-from header).
fn read_all(topic: &str, expect: usize) -> Vec<(String, String, Option<String>)> {
    let consumer = operators::kafka::Detached::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("dlq-test-reader"))
            .create::<BaseConsumer>()
            .unwrap(),
        "test reader",
    );
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in metadata.topics()[0].partitions() {
        tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut quiet_until = None;
    while Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                let text =
                    |b: Option<&[u8]>| String::from_utf8_lossy(b.unwrap_or_default()).into_owned();
                let from = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == HEADER_REPLAYED_FROM)
                        .map(|h| text(h.value))
                });
                out.push((text(m.key()), text(m.payload()), from));
            }
            Some(Err(e)) => panic!("consumer error: {e}"),
            None if out.len() >= expect => {
                // Linger a little: more records than expected must fail the test.
                let until =
                    *quiet_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(1));
                if Instant::now() > until {
                    break;
                }
            }
            None => {}
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_return_to_their_source_once() {
    let source = unique("sfs-it-dlq-source");
    let dlq = format!("{source}.dlq");
    // Idempotent: a retried first send (the topic is created by it) cannot
    // write a dead letter twice and shift the offsets asserted below.
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    producer
        .send(dead_letter(
            &dlq,
            "k1",
            "fixed-1",
            &source,
            "unknown_schema_id",
        ))
        .unwrap();
    producer
        .send(dead_letter(
            &dlq,
            "k2",
            "bad-forever",
            &source,
            "amount_out_of_range",
        ))
        .unwrap();
    producer
        .send(dead_letter(
            &dlq,
            "k3",
            "fixed-2",
            &source,
            "unknown_schema_id",
        ))
        .unwrap();
    producer.flush(Duration::from_secs(20)).unwrap();
    // The source topic must exist for the replay to produce into it.
    producer
        .send(
            BaseRecord::<str, str>::to(&source)
                .key("k0")
                .payload("original")
                .partition(0),
        )
        .unwrap();
    producer.flush(Duration::from_secs(20)).unwrap();

    let args = ReplayArgs {
        topic: dlq.clone(),
        brokers: brokers(),
        group_id: unique("dlq-test-group"),
        reasons: vec!["unknown_schema_id".into()],
        dry_run: false,
        timeout_secs: 20,
    };
    let first = replay(&args).await.expect("the replay succeeds");
    assert_eq!(first.total(), 2, "{first:?}");
    assert_eq!(first.filtered, 1);
    assert_eq!(first.replayed.get(&source), Some(&2));

    let second = replay(&args).await.expect("the second replay succeeds");
    assert_eq!(second.total(), 0, "nothing is replayed twice: {second:?}");

    let records = read_all(&source, 3);
    let replayed: Vec<_> = records.iter().filter(|r| r.2.is_some()).collect();
    assert_eq!(records.len(), 3, "{records:?}");
    assert_eq!(replayed.len(), 2, "{records:?}");
    assert_eq!(
        (replayed[0].0.as_str(), replayed[0].1.as_str()),
        ("k1", "fixed-1")
    );
    assert_eq!(
        (replayed[1].0.as_str(), replayed[1].1.as_str()),
        ("k3", "fixed-2")
    );
    assert_eq!(
        replayed[0].2.as_deref(),
        Some(format!("{dlq}/0/0").as_str())
    );
}
