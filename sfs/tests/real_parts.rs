//! Proves the real parts work from Rust: a transactional producer and a
//! `read_committed` consumer round-trip records through a fresh multi-partition
//! topic on the real broker (an aborted transaction stays invisible), and a
//! Redis function is loaded and called on the real server.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

fn brokers() -> String {
    std::env::var("KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

async fn create_topic(topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .expect("admin client config is valid");
    let results = admin
        .create_topics(
            &[NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .expect("the broker answers CreateTopics");
    for result in results {
        result.expect("the fresh topic is created");
    }
}

fn send_batch(producer: &BaseProducer, topic: &str, tag: &str, n: usize) {
    for i in 0..n {
        let key = format!("k{i}");
        let payload = format!("{tag}-{i}");
        let partition = (i as i32) % PARTITIONS;
        producer
            .send(
                BaseRecord::to(topic)
                    .key(&key)
                    .payload(&payload)
                    .partition(partition),
            )
            .expect("the local queue has room");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactional_round_trip_hides_aborted_records() {
    let topic = unique("sfs-it-txn");
    create_topic(&topic).await;

    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .set("transactional.id", unique("sfs-it-producer"))
        .set("enable.idempotence", "true")
        .create()
        .expect("producer config is valid");
    let timeout = Duration::from_secs(30);
    producer
        .init_transactions(timeout)
        .expect("the broker runs the transaction coordinator");

    producer.begin_transaction().unwrap();
    send_batch(&producer, &topic, "committed", 30);
    producer
        .commit_transaction(timeout)
        .expect("commit succeeds");

    producer.begin_transaction().unwrap();
    send_batch(&producer, &topic, "aborted", 30);
    producer.flush(timeout).unwrap();
    producer.abort_transaction(timeout).expect("abort succeeds");

    producer.begin_transaction().unwrap();
    send_batch(&producer, &topic, "late", 6);
    producer
        .commit_transaction(timeout)
        .expect("commit succeeds");

    let consumer = operators::kafka::Detached::new(
        ClientConfig::new()
            .set("bootstrap.servers", brokers())
            .set("group.id", unique("sfs-it-group"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .create::<BaseConsumer>()
            .expect("consumer config is valid"),
        "test reader",
    );
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        assignment
            .add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();

    let mut seen = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 36 && Instant::now() < deadline {
        if let Some(message) = consumer.poll(Duration::from_millis(200)) {
            let message = message.expect("no consumer error");
            let payload = String::from_utf8(message.payload().unwrap().to_vec()).unwrap();
            let key = String::from_utf8(message.key().unwrap().to_vec()).unwrap();
            let i: i32 = key[1..].parse().unwrap();
            assert_eq!(
                message.partition(),
                i % PARTITIONS,
                "records keep their partition"
            );
            assert!(seen.insert(payload.clone()), "duplicate record {payload}");
        }
    }
    // Drain a little longer: nothing from the aborted transaction may appear.
    let drain_until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < drain_until {
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.unwrap();
            seen.insert(String::from_utf8_lossy(message.payload().unwrap()).into_owned());
        }
    }
    let expected: BTreeSet<String> = (0..30)
        .map(|i| format!("committed-{i}"))
        .chain((0..6).map(|i| format!("late-{i}")))
        .collect();
    assert_eq!(
        seen, expected,
        "read_committed sees exactly the committed records"
    );

    // The high watermark counts the aborted records and control markers, so the
    // committed records are not the whole log.
    let (_, high) = consumer.fetch_watermarks(&topic, 0, timeout).unwrap();
    assert!(
        high > 12,
        "partition 0 holds aborted records and markers too (high {high})"
    );
}

#[tokio::test]
async fn redis_function_is_loaded_and_called() {
    let client = redis::Client::open(redis_url()).expect("valid redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis answers on loopback");
    let library = unique("sfsit").replace('-', "_");
    let source = format!(
        "#!lua name={library}\n\
         redis.register_function('{library}_incr_by_twice', function(keys, args)\n\
           return redis.call('INCRBY', keys[1], 2 * tonumber(args[1]))\n\
         end)"
    );
    let loaded: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(&source)
        .query_async(&mut conn)
        .await
        .expect("Redis 7 accepts the function library");
    assert_eq!(loaded, library);

    let key = unique("sfs:it:counter");
    let function = format!("{library}_incr_by_twice");
    let first: i64 = redis::cmd("FCALL")
        .arg(&function)
        .arg(1)
        .arg(&key)
        .arg(5)
        .query_async(&mut conn)
        .await
        .unwrap();
    let second: i64 = redis::cmd("FCALL")
        .arg(&function)
        .arg(1)
        .arg(&key)
        .arg(7)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((first, second), (10, 24));

    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("FUNCTION")
        .arg("DELETE")
        .arg(&library)
        .query_async(&mut conn)
        .await
        .unwrap();
}
