//! The Redis sink operator over many small batches, against a real Redis: a
//! random history of row changes (updates, deletions, re-creations, several
//! changes of a key in one batch, retractions before or after insertions)
//! goes through the sink one frontier at a time, so most keys are written
//! again and again, as their changed fields. Redis must end with the last
//! row of every key, whole, and no row of a deleted key.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use differential_dataflow::input::InputSession;
use operators::kafka::SourceHandle;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use schemas::features::ValueKind;
use schemas::{FeatureRow, FeatureSet, Row, Value};
use sinks::redis::{RedisSink, RedisSinkConfig, SinkMetrics};
use timely::dataflow::operators::Probe;
use timely::dataflow::ProbeHandle;

const KEYS: usize = 40;
const TIMES: u64 = 300;

fn config() -> RedisSinkConfig {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let features = FeatureSet::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"))
        .expect("the shipped definitions load");
    let mut config = RedisSinkConfig::new(url, Arc::new(features));
    config.key_prefix = format!("test:sink-operator:{nonce}:");
    config.rows_per_call = 7;
    config
}

/// A row (of fields of `kinds`) whose fields change a few at a time.
fn next_values(
    rng: &mut SmallRng,
    kinds: &[ValueKind],
    previous: Option<&Vec<Value>>,
) -> Vec<Value> {
    let mut values = previous.cloned().unwrap_or_else(|| {
        kinds
            .iter()
            .map(|kind| match kind {
                ValueKind::Int => Value::Int(0),
                ValueKind::Float => Value::Float(0.0),
            })
            .collect()
    });
    for _ in 0..rng.gen_range(1..=3) {
        let i = rng.gen_range(0..kinds.len());
        values[i] = match kinds[i] {
            ValueKind::Int => Value::Int(rng.gen_range(-5..50)),
            ValueKind::Float => Value::Float(rng.gen_range(-2.0..2.0)),
        };
    }
    values
}

#[test]
fn many_small_batches_leave_the_last_row_of_every_key_whole() {
    let config = config();
    let user = config.features.entity_index("user").unwrap();
    let kinds: Vec<ValueKind> = config.features.entities[user]
        .features
        .iter()
        .map(|spec| spec.kind())
        .collect();
    let width = kinds.len();
    let metrics = SinkMetrics::default();
    let seed: u64 = std::env::var("SFS_SINK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos() as u64
        });
    eprintln!("seed {seed} (replay: SFS_SINK_SEED={seed})");

    let (sink_config, sink_metrics) = (config.clone(), metrics.clone());
    let expected = timely::execute_directly(move |worker| {
        let mut rng = SmallRng::seed_from_u64(seed);
        let probe = ProbeHandle::new();
        let mut input = InputSession::<u64, Row, isize>::new();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_collection(scope)
                .redis_sink(
                    &sink_config,
                    0,
                    0,
                    SourceHandle::default(),
                    sink_metrics.clone(),
                )
                .probe_with(&probe);
        });
        let row = |id: usize, values: &Vec<Value>| Row {
            entity: user as u8,
            id: format!("u{id}").as_str().into(),
            values: values.clone().into(),
        };
        let mut current: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
        for time in 1..=TIMES {
            input.advance_to(time);
            // A key changes at most once per time (the collection is
            // consolidated); its -1 and +1 arrive in either order.
            let mut ids: Vec<usize> = (0..rng.gen_range(0..8))
                .map(|_| rng.gen_range(0..KEYS))
                .collect();
            ids.sort_unstable();
            ids.dedup();
            for id in ids {
                let old = current.get(&id).cloned();
                let new = if old.is_some() && rng.gen_bool(0.1) {
                    None
                } else {
                    Some(next_values(&mut rng, &kinds, old.as_ref()))
                };
                current.remove(&id);
                let mut changes = Vec::new();
                if let Some(old) = &old {
                    changes.push((row(id, old), -1));
                }
                if let Some(new) = &new {
                    changes.push((row(id, new), 1));
                    current.insert(id, new.clone());
                }
                if rng.gen_bool(0.5) {
                    changes.reverse();
                }
                for (row, diff) in changes {
                    input.update(row, diff);
                }
            }
            input.advance_to(time + 1);
            input.flush();
            // Usually one frontier per batch; sometimes several coalesce.
            if rng.gen_bool(0.8) {
                while probe.less_than(&(time + 1)) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
            }
        }
        // Every change is acknowledged once the frontier passes the last time.
        input.advance_to(TIMES + 1);
        input.flush();
        while probe.less_than(&(TIMES + 1)) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        current
    });

    let mut conn = sinks::redis::connect(&config).unwrap();
    let entity = &config.features.entities[user];
    for id in 0..KEYS {
        let key = entity.redis_key(&config.key_prefix, &format!("u{id}"));
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query(&mut conn).unwrap();
        let stored =
            FeatureRow::decode(entity, &config.features.version, &format!("u{id}"), &fields)
                .unwrap()
                .map(|row| row.values);
        assert_eq!(stored.as_ref(), expected.get(&id), "row u{id}: {fields:?}");
        if stored.is_some() {
            assert_eq!(fields.len(), width + 2, "u{id} has exactly its fields");
        }
    }
    let (written, partial) = (metrics.rows_written.get(), metrics.rows_partial.get());
    eprintln!("{written} rows written, {partial} as their changes");
    assert_eq!(
        metrics.rows_direct.get(),
        written + metrics.rows_deleted.get()
    );
    assert!(
        partial * 2 > written,
        "most writes should be partial: {partial} of {written}"
    );
}
