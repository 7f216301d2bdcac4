//! The generator's stream: deterministic, ordered, valid, realistic in shape,
//! and delivered intact to files and to a real Kafka broker.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use clap::Parser;
use generator::cli::{generate, GenerateArgs};
use generator::output::{FileFormat, FileSink, Sink};
use generator::{FraudKind, GenEvent, Generator, GeneratorConfig};
use schemas::codec::Decoder;
use schemas::{ClickAction, EventKind, Topics};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: GenerateArgs,
}

fn parse(flags: &[&str]) -> GenerateArgs {
    Cli::try_parse_from(flags)
        .map_err(|e| e.to_string())
        .unwrap()
        .args
}

fn events(config: GeneratorConfig, n: usize) -> Vec<GenEvent> {
    Generator::new(config).take(n).collect()
}

fn config() -> GeneratorConfig {
    GeneratorConfig {
        fraud_rate: 0.02,
        label_delay_ms: 3_600_000,
        ..GeneratorConfig::default()
    }
}

#[test]
fn the_same_seed_gives_the_same_events_and_another_seed_does_not() {
    let a = events(config(), 20_000);
    assert_eq!(a, events(config(), 20_000));
    assert_ne!(
        a,
        events(
            GeneratorConfig {
                seed: 7,
                ..config()
            },
            20_000
        )
    );
}

#[test]
fn events_are_ordered_valid_and_consistent() {
    // 0.5 events per simulated second: 100k events span about two days, long
    // enough for compromised-merchant fraud (1-10 days after the breach).
    let all = events(
        GeneratorConfig {
            events_per_sec: 0.5,
            ..config()
        },
        100_000,
    );
    let mut decoder = Decoder::default();
    let mut txns = HashMap::new();
    let mut card_owner: HashMap<String, String> = HashMap::new();
    let mut carted: HashSet<(String, String)> = HashSet::new();
    let mut kinds = HashSet::new();
    let (mut n_txn, mut n_fraud, mut n_labels, mut purchases) = (0u64, 0u64, 0u64, 0u64);
    let mut last = i64::MIN;
    for e in &all {
        assert!(e.time_ms() >= last, "event times never decrease");
        last = e.time_ms();
        let now = e.time_ms();
        match e {
            GenEvent::Txn { txn, fraud } => {
                let mut bytes = Vec::new();
                schemas::Encoder::default()
                    .encode_avro(txn, 2, &mut bytes)
                    .unwrap();
                assert_eq!(&decoder.decode_txn(&bytes, now).unwrap(), txn);
                let owner = card_owner
                    .entry(txn.card_id.clone())
                    .or_insert_with(|| txn.user_id.clone());
                assert_eq!(owner, &txn.user_id, "a card belongs to one user");
                txns.insert(txn.event_id.clone(), (txn.clone(), *fraud));
                n_txn += 1;
                n_fraud += u64::from(fraud.is_some());
                if let Some(f) = fraud {
                    kinds.insert(*f);
                }
            }
            GenEvent::Click(c) => {
                decoder
                    .decode_click(&serde_json::to_vec(c).unwrap(), now)
                    .unwrap();
                match c.action {
                    ClickAction::AddToCart => {
                        carted.insert((c.session_id.clone(), c.item_id.clone()));
                    }
                    ClickAction::Purchase => {
                        purchases += 1;
                        assert!(
                            carted.contains(&(c.session_id.clone(), c.item_id.clone())),
                            "purchase follows add_to_cart"
                        );
                    }
                    ClickAction::View => {}
                }
            }
            GenEvent::Label(l) => {
                let (txn, fraud) = txns
                    .get(&l.event_id)
                    .expect("a label follows its transaction");
                assert_eq!(l.card_id, txn.card_id);
                assert!(l.label_time >= txn.event_time);
                assert_eq!(l.is_fraud, fraud.is_some());
                assert_eq!(l.fraud_type.as_deref(), fraud.map(FraudKind::as_str));
                n_labels += 1;
            }
        }
    }
    assert_eq!(kinds.len(), 3, "all fraud patterns occur: {kinds:?}");
    let rate = n_fraud as f64 / n_txn as f64;
    assert!(
        (0.008..0.04).contains(&rate),
        "fraud rate {rate} near the 0.02 target"
    );
    assert!(n_labels > 0 && n_labels <= n_fraud);
    assert!(purchases > 100);
    // The simulated rate is near the configured 0.5 events/s.
    let span_s = (last - all[0].time_ms()) as f64 / 1_000.0;
    let rate = all.len() as f64 / span_s;
    assert!(
        (0.25..1.0).contains(&rate),
        "{rate} events per simulated second"
    );
}

#[test]
fn file_output_is_readable_avro_and_json_lines() {
    let dir = std::env::temp_dir().join(format!("sfs-gen-files-{}", std::process::id()));
    let all = events(config(), 5_000);
    let topics = Topics::default();
    for format in [FileFormat::Avro, FileFormat::JsonLines] {
        let mut sink: Box<dyn Sink> = Box::new(FileSink::new(&dir, &topics, format).unwrap());
        for e in &all {
            sink.send(e).unwrap();
        }
        sink.finish().unwrap();
    }
    for kind in EventKind::ALL {
        let expected = all.iter().filter(|e| e.kind() == kind).count();
        let avro = std::fs::read(dir.join(format!("{}.avro", kind.topic()))).unwrap();
        assert_eq!(
            apache_avro::Reader::new(&avro[..]).unwrap().count(),
            expected
        );
        let json = std::fs::read_to_string(dir.join(format!("{}.jsonl", kind.topic()))).unwrap();
        assert_eq!(json.lines().count(), expected);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn duration_and_event_limits_stop_the_run() {
    let args = parse(&[
        "generate",
        "--out",
        "json",
        "--duration",
        "10m",
        "--start-time",
        "2024-01-01T00:00:00Z",
        "--sim-rate",
        "50",
        "--users",
        "100",
        "--merchants",
        "50",
        "--items",
        "100",
    ]);
    let sink = Box::new(generator::output::MemorySink::default());
    let summary = generate(
        Generator::new(args.generator_config()),
        sink,
        &args,
        &indicatif::ProgressBar::hidden(),
    )
    .unwrap();
    let start = 1_704_067_200_000;
    assert!(summary.last_event_ms.unwrap() < start + 600_000);
    assert!(summary.last_event_ms.unwrap() > start + 500_000);
    assert!(
        summary.events > 3_000 && summary.events < 60_000,
        "{summary:?}"
    );
}

#[test]
fn kafka_output_is_keyed_and_decodable() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;

    let brokers = std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    let prefix = format!(
        "gen-test-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let args = parse(&[
        "generate",
        "--events",
        "3000",
        "--start-time",
        "2024-01-01T00:00:00Z",
        "--partitions",
        "3",
        "--v1-share",
        "0.3",
        "--label-delay",
        "10m",
        "--fraud-rate",
        "0.05",
        "--users",
        "200",
        "--merchants",
        "50",
        "--items",
        "100",
        "--brokers",
        &brokers,
        "--txn-topic",
        &format!("{prefix}.txn"),
        "--click-topic",
        &format!("{prefix}.click"),
        "--label-topic",
        &format!("{prefix}.label"),
    ]);
    let expected: Vec<GenEvent> = Generator::new(args.generator_config()).take(3000).collect();
    generator::run(args).unwrap();

    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", &prefix)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let topics = [
        format!("{prefix}.txn"),
        format!("{prefix}.click"),
        format!("{prefix}.label"),
    ];
    consumer
        .subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())
        .unwrap();
    let mut decoder = Decoder::default();
    let mut got = 0;
    let mut partitions = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while got < expected.len() && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.unwrap();
        let payload = message.payload().unwrap();
        let key = std::str::from_utf8(message.key().unwrap())
            .unwrap()
            .to_owned();
        let (id, owner) = if message.topic() == topics[0] {
            let t = decoder.read::<schemas::Txn>(payload).unwrap();
            (t.event_id, t.card_id)
        } else if message.topic() == topics[1] {
            let c = decoder.read::<schemas::Click>(payload).unwrap();
            (c.event_id, c.user_id)
        } else {
            let l = decoder.read::<schemas::Label>(payload).unwrap();
            (l.event_id, l.card_id)
        };
        assert_eq!(key, owner, "keyed by card (txn, label) or user (click)");
        assert!(!id.is_empty());
        partitions.insert((message.topic().to_owned(), message.partition()));
        got += 1;
    }
    assert_eq!(got, expected.len());
    assert!(
        partitions.len() >= 6,
        "spread over the created partitions: {partitions:?}"
    );
}

#[test]
fn next_into_gives_the_iterator_stream_and_the_queue_stays_small() {
    let expected = events(config(), 50_000);
    let mut generator = Generator::new(config());
    let mut buf = generator::EventBuf::default();
    for e in &expected {
        assert_eq!(generator.next_into(&mut buf), e);
    }
    // Sessions schedule one step at a time: the queue holds live sessions
    // and delayed labels, not whole sessions laid out ahead.
    let mut generator = Generator::new(GeneratorConfig {
        events_per_sec: 2_000.0,
        ..config()
    });
    for _ in 0..300_000 {
        generator.next();
    }
    assert!(generator.pending() < 60_000, "{}", generator.pending());
}

#[test]
fn undelivered_kafka_events_are_an_error() {
    use generator::output::{KafkaOutput, KafkaSink, WireFormat};
    let mut sink: Box<dyn Sink> = Box::new(
        KafkaSink::new(KafkaOutput {
            brokers: "127.0.0.1:1".into(),
            topics: Topics::default(),
            partitions: 1,
            replication_factor: 1,
            format: WireFormat::Avro,
            v1_share: 0.0,
            linger_ms: 5,
            batch_bytes: 100_000,
            compression: "lz4".into(),
            extra: vec![("message.timeout.ms".into(), "1500".into())],
        })
        .unwrap(),
    );
    for e in events(config(), 5_000) {
        sink.send(&e).unwrap();
    }
    let err = sink.finish().unwrap_err().to_string();
    assert!(err.contains("not delivered"), "{err}");
}
