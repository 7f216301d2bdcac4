//! `sfs backfill` against the online path (real Kafka and Redis) and the
//! brute-force interpreter: offline equals online.
//!
//! A generated log is replayed into fresh topics in time-ordered chunks;
//! after each chunk the real `sfs stream --until-end` stops at its frontier
//! F, and the Redis rows of every entity a transaction or product view at F
//! reads are what serving would have read at that moment. The backfill of
//! the whole log (from Kafka and from the generator's files: the same
//! Parquet) must hold exactly those rows for those events, and every
//! backfilled vector at a sample of other times must equal the
//! interpreter's rows (which share no code with the graph).

mod stream_support;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use arrow_array::{Array, Float64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;
use schemas::features::Value;
use schemas::{Click, ClickAction, Txn};
use stream_support::interpreter::Val;
use stream_support::*;

/// One backfilled row: event id -> (as-of ms, column -> value).
type Table = HashMap<String, (i64, BTreeMap<String, f64>)>;

fn read_parquet(path: &Path) -> (Table, HashMap<String, String>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let metadata = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
        .collect();
    let mut table = Table::new();
    for batch in builder.build().unwrap() {
        let batch: RecordBatch = batch.unwrap();
        let id_column = ["txn_id", "click_id"]
            .into_iter()
            .find_map(|n| batch.column_by_name(n))
            .unwrap();
        let ids = id_column.as_any().downcast_ref::<StringArray>().unwrap();
        let as_of = batch
            .column_by_name("as_of")
            .unwrap()
            .as_any()
            .downcast_ref::<TimestampMillisecondArray>()
            .unwrap();
        let floats: Vec<(String, &Float64Array)> = batch
            .schema()
            .fields()
            .iter()
            .zip(batch.columns())
            .filter_map(|(f, c)| {
                Some((f.name().clone(), c.as_any().downcast_ref::<Float64Array>()?))
            })
            .collect();
        for row in 0..batch.num_rows() {
            let values = floats
                .iter()
                .map(|(name, column)| (name.clone(), column.value(row)))
                .collect();
            table.insert(ids.value(row).to_owned(), (as_of.value(row), values));
        }
    }
    (table, metadata)
}

fn backfill(args: &[&str], out: &Path) {
    let status = Command::new(env!("CARGO_BIN_EXE_sfs"))
        .arg("backfill")
        .args(args)
        .args(["--out", out.to_str().unwrap(), "--no-progress", "-w", "2"])
        .env("SFS_LOG", "warn")
        .env(
            "SFS_FEATURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
        )
        .status()
        .unwrap();
    assert!(status.success(), "sfs backfill {args:?}: {status}");
}

/// Produces events to the parity topics as JSON, keyed like the generator.
fn produce(producer: &BaseProducer, topics: &Topics, txns: &[&Txn], clicks: &[&Click]) {
    for t in txns {
        let payload = serde_json::to_vec(t).unwrap();
        producer
            .send(
                BaseRecord::to(&topics.txn)
                    .key(&t.card_id)
                    .payload(&payload),
            )
            .unwrap();
    }
    for c in clicks {
        let payload = serde_json::to_vec(c).unwrap();
        producer
            .send(
                BaseRecord::to(&topics.click)
                    .key(&c.user_id)
                    .payload(&payload),
            )
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

/// The value a backfill column holds for a row value.
fn as_f64(v: &Val) -> f64 {
    match *v {
        Val::Int(i) => i as f64,
        Val::FloatBits(b) => f64::from_bits(b),
    }
}

#[test]
fn backfilled_vectors_equal_the_rows_online_held_and_the_interpreter() {
    // The log: generated to Kafka (and the same events to files), from the
    // latest 12:00 UTC at least an hour ago: recent, and at a busy hour of
    // the generator's daily rhythm whatever the time the test runs, so
    // enough events share each checkpoint's tick.
    const HOUR_MS: i64 = 3_600_000;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let start = ((now - 13 * HOUR_MS).div_euclid(24 * HOUR_MS) * 24 + 12) * HOUR_MS;
    let start = start.to_string();
    let source = Topics::new("pit-log");
    let gen = [
        "--events",
        "12000",
        "--seed",
        "5",
        "--users",
        "200",
        "--merchants",
        "100",
        "--items",
        "200",
        "--sim-rate",
        "60",
        "--start-time",
        &start,
        "--fraud-rate",
        "0.05",
        "--label-delay",
        "2m",
        "--no-progress",
    ];
    let files = std::env::temp_dir().join(unique("pit-files"));
    for out in [
        vec!["--out", "kafka", "--partitions", "2"],
        vec!["--out", "json", "--out-dir", files.to_str().unwrap()],
    ] {
        let status = Command::new(env!("CARGO_BIN_EXE_sfs"))
            .arg("generate")
            .args(gen)
            .args(out)
            .args(["--txn-topic", &source.txn, "--click-topic", &source.click])
            .args(["--label-topic", &source.label, "--brokers", &brokers()])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }
    let (mut txns, mut clicks) = read_events(&source);
    txns.sort_by_key(|t| t.event_time);
    clicks.sort_by_key(|c| c.event_time);
    assert!(
        txns.len() > 1000 && clicks.len() > 5000,
        "{} txns",
        txns.len()
    );

    // The online path, stopped at several frontiers.
    let online = Topics::new("pit-online");
    let codec_topics = schemas::codec::Topics {
        txn: online.txn.clone(),
        click: online.click.clone(),
        label: online.label.clone(),
    };
    generator::output::ensure_topics(&brokers(), &codec_topics, 2, 1).unwrap();
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let prefix = format!("{}:", unique("pit"));
    let first = txns[0].event_time.min(clicks[0].event_time);
    let last = txns.last().unwrap().event_time;
    let chunks = 5;
    let mut produced = (0, 0);
    // (frontier, stored rows) after each chunk.
    let mut checkpoints = Vec::new();
    let mut conn = redis();
    for k in 1..=chunks {
        // On a tick boundary: a bounded run takes each partition's last
        // tick as complete (its frontier passes it), so a chunk must not
        // end inside a tick the next chunk adds to.
        let cut = first + (last - first) * k / (chunks + 1);
        let cut = cut - cut % 1000;
        let t_end = txns.partition_point(|t| t.event_time < cut);
        let c_end = clicks.partition_point(|c| c.event_time < cut);
        let t_new: Vec<&Txn> = txns[produced.0..t_end].iter().collect();
        let c_new: Vec<&Click> = clicks[produced.1..c_end].iter().collect();
        produce(&producer, &online, &t_new, &c_new);
        produced = (t_end, c_end);
        wait_all(
            vec![spawn_stream(&online, &prefix, &["-w", "2"])],
            Duration::from_secs(120),
        );
        let frontier = progress_frontier(&mut conn, &prefix).expect("progress recorded") as i64;
        checkpoints.push((frontier, redis_rows(&mut conn, &prefix, SHIPPED)));
    }

    // Offline: the whole log, from Kafka and from the files.
    let dir = std::env::temp_dir().join(unique("pit-out"));
    let (from_kafka, from_files) = (dir.join("kafka"), dir.join("files"));
    let topic_flags = [
        "--topic",
        &format!("txn={}", source.txn),
        "--topic",
        &format!("click={}", source.click),
        "--label-topic",
        &source.label,
    ]
    .map(String::from);
    let topic_flags: Vec<&str> = topic_flags.iter().map(String::as_str).collect();
    let mut kafka_args = vec!["--from-kafka", "--brokers"];
    let brokers = brokers();
    kafka_args.push(&brokers);
    kafka_args.extend(&topic_flags);
    backfill(&kafka_args, &from_kafka);
    let mut file_args = vec!["--input", files.to_str().unwrap()];
    file_args.extend(&topic_flags);
    backfill(&file_args, &from_files);

    let (fraud, meta) = read_parquet(&from_kafka.join("fraud.parquet"));
    let (views, _) = read_parquet(&from_kafka.join("propensity.parquet"));
    assert_eq!(meta["sfs.feature_set_version"], shipped().version);
    assert_eq!(fraud, read_parquet(&from_files.join("fraud.parquet")).0);
    assert_eq!(
        views,
        read_parquet(&from_files.join("propensity.parquet")).0
    );
    assert_eq!(fraud.len(), txns.len());
    let view_count = clicks
        .iter()
        .filter(|c| c.action == ClickAction::View)
        .count();
    assert_eq!(views.len(), view_count);

    // Offline equals the interpreter at a sample of times and at the
    // checkpoints.
    let set = shipped();
    let mut times: Vec<i64> = fraud.values().map(|(as_of, _)| *as_of).collect();
    times.sort_unstable();
    times.dedup();
    let step = (times.len() / 12).max(1);
    let sample = times.iter().step_by(step).copied();
    for as_of in sample.chain(checkpoints.iter().map(|(f, _)| *f)) {
        let rows = oracle(SHIPPED, &txns, &clicks, as_of as u64);
        for t in txns
            .iter()
            .filter(|t| t.event_time - t.event_time % 1000 == as_of)
        {
            let (_, values) = &fraud[&t.event_id];
            for (entity, id) in [("card", &t.card_id), ("user", &t.user_id)] {
                let expected = rows.get(&(entity.to_owned(), id.clone()));
                let def = set.entity(entity).unwrap();
                for (i, feature) in def.features.iter().enumerate() {
                    let want = expected.map_or(0.0, |r| as_f64(&r[i]));
                    let got = values[&format!("{entity}.{}", feature.name)];
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{}: {entity}.{} at {as_of}",
                        t.event_id,
                        feature.name
                    );
                }
            }
        }
    }
    // Offline equals online at every checkpoint: each event at F read the
    // rows Redis held when the job stood at F (absent: cold start).
    let mut compared = (0, 0);
    for (frontier, stored) in &checkpoints {
        let lookups = txns
            .iter()
            .filter(|t| t.event_time - t.event_time % 1000 == *frontier)
            .map(|t| {
                (
                    &t.event_id,
                    vec![("card", &t.card_id), ("user", &t.user_id)],
                )
            })
            .chain(
                clicks
                    .iter()
                    .filter(|c| {
                        c.action == ClickAction::View
                            && c.event_time - c.event_time % 1000 == *frontier
                    })
                    .map(|c| (&c.event_id, vec![("user", &c.user_id)])),
            );
        for (event, entities) in lookups {
            let (as_of, values) = fraud.get(event).or_else(|| views.get(event)).unwrap();
            assert_eq!(as_of, frontier, "{event}");
            for (entity, id) in entities {
                let row = stored.get(&(entity.to_owned(), id.clone()));
                assert_eq!(
                    values[&format!("{entity}_cold_start")],
                    f64::from(u8::from(row.is_none())),
                    "{event}: {entity} {id} cold start"
                );
                let def = set.entity(entity).unwrap();
                for (i, feature) in def.features.iter().enumerate() {
                    let online = row.map_or(0.0, |r| Value::as_f64(r.values[i]));
                    let offline = values[&format!("{entity}.{}", feature.name)];
                    if offline.to_bits() != online.to_bits() {
                        let rows = oracle(SHIPPED, &txns, &clicks, *frontier as u64);
                        let want = rows
                            .get(&(entity.to_owned(), id.clone()))
                            .map_or(0.0, |r| as_f64(&r[i]));
                        panic!(
                            "{event}: {entity}.{} offline {offline} online {online} \
                             interpreter {want} at {frontier}",
                            feature.name
                        );
                    }
                }
                compared.1 += 1;
            }
            compared.0 += 1;
        }
    }
    assert!(
        compared.0 >= 50,
        "only {} events fell on a checkpoint's frontier",
        compared.0
    );

    eprintln!(
        "compared {} events ({} rows) with the online path at {} frontiers",
        compared.0,
        compared.1,
        checkpoints.len()
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&files);
}
