//! The sink's writes against a real Redis: below the write ceiling the
//! `sfs_apply` function (compare-and-set on `_as_of`, deletes with
//! tombstones, a forward-only progress record); above it plain commands,
//! whole rows first, then only the fields that changed.

use std::collections::HashMap;
use std::sync::Arc;

use operators::kafka::ResumePoint;
use schemas::{Entity, FeatureRow, FeatureSet, Row, Value};
use sinks::redis::{
    apply, connect, load_function, read_ceiling, read_progress, Ownership, PartitionProgress,
    ProgressRecord, RedisSinkConfig, RowWrite,
};

fn config(test: &str) -> RedisSinkConfig {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut config = RedisSinkConfig::new(url, features());
    config.key_prefix = format!("test:{test}:{nonce}:");
    config.rows_per_call = 2;
    config
}

/// Every batch through the compare-and-set function.
fn checked() -> Ownership {
    Ownership::new(u64::MAX)
}

fn features() -> Arc<FeatureSet> {
    Arc::new(FeatureSet::load(concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml")).unwrap())
}

fn entity(config: &RedisSinkConfig, name: &str) -> (u8, Entity) {
    let index = config.features.entity_index(name).unwrap();
    (index as u8, config.features.entities[index].clone())
}

fn user_row(n: i64) -> Vec<Value> {
    let set = features();
    set.entity("user")
        .unwrap()
        .features
        .iter()
        .map(|_| Value::Int(n))
        .collect()
}

/// A write of user `id`'s row (`None`: its deletion).
fn user(config: &RedisSinkConfig, id: &str, values: Option<Vec<Value>>) -> RowWrite {
    let (entity, _) = entity(config, "user");
    match values {
        Some(values) => RowWrite::upsert(Row {
            entity,
            id: id.into(),
            values: values.into(),
        }),
        None => RowWrite::delete(entity, id.into()),
    }
}

fn stored(conn: &mut redis::Connection, config: &RedisSinkConfig, id: &str) -> Option<FeatureRow> {
    let (_, user) = entity(config, "user");
    let key = user.redis_key(&config.key_prefix, id);
    let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(conn).unwrap();
    FeatureRow::decode(&user, &config.features.version, id, &fields).unwrap()
}

fn progress(frontier_ms: u64, offset: i64) -> ProgressRecord {
    ProgressRecord {
        frontier_ms,
        feature_set_version: features().version.clone(),
        partitions: vec![PartitionProgress {
            topic: "t".into(),
            partition: 0,
            resume: ResumePoint {
                offset,
                watermark_ms: frontier_ms,
                max_event_ms: Some(frontier_ms as i64),
            },
            durable_offset: offset,
        }],
    }
}

#[test]
fn rows_only_move_forward_and_deletes_cannot_be_undone_by_a_replay() -> anyhow::Result<()> {
    let config = config("cas");
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    load_function(&mut conn)?; // idempotent

    let rows: Vec<RowWrite> = (0..5)
        .map(|i| user(&config, &format!("u{i}"), Some(user_row(i))))
        .collect();
    let applied = apply(&mut conn, &config, &mut checked(), 2000, &rows, None)?;
    assert_eq!((applied.written, applied.skipped), (5, 0));
    let row = stored(&mut conn, &config, "u3").unwrap();
    assert_eq!((row.as_of_ms, row.values[0]), (2000, Value::Int(3)));

    // An older or equal frontier is skipped; a newer one wins.
    let older = vec![user(&config, "u3", Some(user_row(99)))];
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 1000, &older, None)?.skipped,
        1
    );
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 2000, &older, None)?.skipped,
        1
    );
    assert_eq!(
        stored(&mut conn, &config, "u3").unwrap().values[0],
        Value::Int(3)
    );
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 3000, &older, None)?.written,
        1
    );
    assert_eq!(
        stored(&mut conn, &config, "u3").unwrap().values[0],
        Value::Int(99)
    );

    // A delete at 4000 leaves no row, and a replayed write at 3500 cannot bring it back.
    let delete = vec![user(&config, "u3", None)];
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 4000, &delete, None)?.deleted,
        1
    );
    assert_eq!(stored(&mut conn, &config, "u3"), None);
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 3500, &older, None)?.skipped,
        1
    );
    assert_eq!(stored(&mut conn, &config, "u3"), None);
    assert_eq!(
        apply(&mut conn, &config, &mut checked(), 4500, &older, None)?.written,
        1
    );
    assert_eq!(stored(&mut conn, &config, "u3").unwrap().as_of_ms, 4500);
    Ok(())
}

#[test]
fn the_progress_record_only_moves_forward_and_prunes_tombstones() -> anyhow::Result<()> {
    let config = config("progress");
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    assert_eq!(read_progress(&mut conn, &config)?, None);

    let delete = vec![user(&config, "gone", None)];
    assert!(
        apply(
            &mut conn,
            &config,
            &mut checked(),
            5000,
            &delete,
            Some(&progress(5000, 10))
        )?
        .progressed
    );
    assert_eq!(read_progress(&mut conn, &config)?, Some(progress(5000, 10)));
    let tombstones: u64 = redis::cmd("ZCARD")
        .arg(config.tombstone_key())
        .query(&mut conn)?;
    assert_eq!(
        tombstones, 0,
        "a tombstone at the durable frontier can never win again"
    );

    assert!(
        !apply(
            &mut conn,
            &config,
            &mut checked(),
            4000,
            &[],
            Some(&progress(4000, 5))
        )?
        .progressed
    );
    assert_eq!(
        read_progress(&mut conn, &config)?.unwrap().frontier_ms,
        5000
    );
    assert!(
        apply(
            &mut conn,
            &config,
            &mut checked(),
            6000,
            &[],
            Some(&progress(6000, 12))
        )?
        .progressed
    );
    assert_eq!(read_progress(&mut conn, &config)?, Some(progress(6000, 12)));
    Ok(())
}

#[test]
fn one_call_mixes_entities_and_deletes_with_exact_encoding() -> anyhow::Result<()> {
    mixed_batch("mixed", checked())
}

#[test]
fn direct_writes_mix_entities_and_deletes_with_exact_encoding() -> anyhow::Result<()> {
    mixed_batch("mixed-direct", Ownership::new(0))
}

fn mixed_batch(test: &str, mut ownership: Ownership) -> anyhow::Result<()> {
    let mut config = config(test);
    config.rows_per_call = 100;
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    let (card_index, card_entity) = entity(&config, "card");
    let card: Vec<Value> = card_entity
        .features
        .iter()
        .enumerate()
        .map(|(i, spec)| match spec.kind() {
            schemas::features::ValueKind::Int => Value::Int(i as i64 - 3),
            schemas::features::ValueKind::Float => Value::Float(0.1 + i as f64 / 3.0),
        })
        .collect();
    let card_write = |id: &str| {
        RowWrite::upsert(Row {
            entity: card_index,
            id: id.into(),
            values: card.clone().into(),
        })
    };
    let rows = vec![
        user(&config, "u1", Some(user_row(7))),
        card_write("c1"),
        user(&config, "u2", None),
        card_write("c2"),
        user(&config, "u3", Some(user_row(9))),
    ];
    let applied = apply(&mut conn, &config, &mut ownership, 7000, &rows, None)?;
    assert_eq!((applied.written, applied.deleted), (4, 1));
    for id in ["c1", "c2"] {
        let key = card_entity.redis_key(&config.key_prefix, id);
        let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(&mut conn)?;
        let row = FeatureRow::decode(&card_entity, &config.features.version, id, &fields)?.unwrap();
        assert_eq!((row.as_of_ms, &row.values), (7000, &card));
        // Byte-exact with the shared contract's encoding.
        let expected = FeatureRow {
            entity: card_entity.clone(),
            id: id.into(),
            as_of_ms: 7000,
            values: card.clone(),
        };
        for (name, value) in expected.encode_fields(&config.features.version) {
            assert_eq!(fields[&name], value, "{name}");
        }
        assert_eq!(fields.len(), card_entity.features.len() + 2);
    }
    assert_eq!(
        stored(&mut conn, &config, "u1").unwrap().values,
        user_row(7)
    );
    assert_eq!(
        stored(&mut conn, &config, "u3").unwrap().values,
        user_row(9)
    );
    assert_eq!(stored(&mut conn, &config, "u2"), None);
    Ok(())
}

/// A row written under another feature-set version is replaced whole: the
/// fields of features the new definitions dropped do not linger.
#[test]
fn a_row_of_another_feature_set_is_replaced_not_merged() -> anyhow::Result<()> {
    // Older, but of another version: written.
    replaced_across_versions("version", checked(), 1000)
}

#[test]
fn a_direct_write_replaces_a_row_of_another_feature_set() -> anyhow::Result<()> {
    // Above the ceiling, so newer than every stored row.
    replaced_across_versions("version-direct", Ownership::new(9000), 10_000)
}

fn replaced_across_versions(
    test: &str,
    mut ownership: Ownership,
    frontier: u64,
) -> anyhow::Result<()> {
    let config = config(test);
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    let (_, user_entity) = entity(&config, "user");
    let key = user_entity.redis_key(&config.key_prefix, "u1");
    redis::cmd("HSET")
        .arg(&key)
        .arg(&[
            "_as_of",
            "9000",
            "_fv",
            "fs-0000000000000000",
            "dropped_feature",
            "5",
        ])
        .query::<()>(&mut conn)?;
    let applied = apply(
        &mut conn,
        &config,
        &mut ownership,
        frontier,
        &[user(&config, "u1", Some(user_row(4)))],
        None,
    )?;
    assert_eq!(applied.written, 1);
    let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(&mut conn)?;
    assert!(!fields.contains_key("dropped_feature"), "{fields:?}");
    assert_eq!(fields.len(), user_entity.features.len() + 2);
    assert_eq!(
        stored(&mut conn, &config, "u1").unwrap().values,
        user_row(4)
    );
    Ok(())
}

/// Above the write ceiling rows are written without the compare: whole the
/// first time, then (for a row this process wrote) only the fields that
/// changed. Below it, after a restart, the compare keeps every row from
/// going back.
#[test]
fn above_the_ceiling_rows_are_written_whole_then_as_their_changes() -> anyhow::Result<()> {
    let config = config("direct");
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    let (_, user_entity) = entity(&config, "user");
    let key = user_entity.redis_key(&config.key_prefix, "u1");
    let field = |i: usize| user_entity.features[i].name.clone();
    assert_eq!(read_ceiling(&mut conn, &config)?, 0, "nothing written yet");

    let mut run = Ownership::new(0);
    let rows = vec![
        user(&config, "u1", Some(user_row(1))),
        user(&config, "u2", Some(user_row(2))),
    ];
    let applied = apply(&mut conn, &config, &mut run, 1000, &rows, None)?;
    assert_eq!(
        (applied.written, applied.direct, applied.partial),
        (2, 2, 0)
    );
    assert_eq!(
        read_ceiling(&mut conn, &config)?,
        1000,
        "raised before the rows"
    );

    // Tamper with a field the next change leaves alone: a partial write
    // does not touch it, which shows only the changed fields were sent.
    redis::cmd("HSET")
        .arg(&key)
        .arg(field(1))
        .arg("tampered")
        .query::<()>(&mut conn)?;
    let mut changed = user_row(1);
    changed[0] = Value::Int(10);
    let change = RowWrite::change(
        user_row(1).into(),
        Row {
            entity: entity(&config, "user").0,
            id: "u1".into(),
            values: changed.clone().into(),
        },
    );
    let applied = apply(
        &mut conn,
        &config,
        &mut run,
        2000,
        std::slice::from_ref(&change),
        None,
    )?;
    assert_eq!((applied.written, applied.partial), (1, 1));
    let fields: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query(&mut conn)?;
    assert_eq!(fields[&field(0)], "10");
    assert_eq!(fields[&field(1)], "tampered");
    assert_eq!(fields["_as_of"], "2000");

    // A new process (or a lost connection) owns nothing: the same change is
    // written whole, which repairs the field.
    let mut restarted = Ownership::new(read_ceiling(&mut conn, &config)?);
    let applied = apply(&mut conn, &config, &mut restarted, 3000, &[change], None)?;
    assert_eq!((applied.direct, applied.partial), (1, 0));
    let row = stored(&mut conn, &config, "u1").unwrap();
    assert_eq!((row.as_of_ms, row.values), (3000, changed));

    // A direct delete leaves a tombstone that a checked replay respects.
    let delete = vec![user(&config, "u2", None)];
    let applied = apply(&mut conn, &config, &mut restarted, 4000, &delete, None)?;
    assert_eq!((applied.deleted, applied.direct), (1, 1));
    assert_eq!(stored(&mut conn, &config, "u2"), None);
    let tombstone: Option<u64> = redis::cmd("ZSCORE")
        .arg(config.tombstone_key())
        .arg(user_entity.redis_key(&config.key_prefix, "u2"))
        .query(&mut conn)?;
    assert_eq!(tombstone, Some(4000));

    // A restart replays frontiers at or below the ceiling through the
    // compare: nothing goes back, and only later frontiers are direct.
    let ceiling = read_ceiling(&mut conn, &config)?;
    assert_eq!(ceiling, 4000);
    let mut replay = Ownership::new(ceiling);
    let stale = vec![
        user(&config, "u1", Some(user_row(7))),
        user(&config, "u2", Some(user_row(7))),
    ];
    let applied = apply(&mut conn, &config, &mut replay, 3000, &stale, None)?;
    assert_eq!((applied.skipped, applied.direct), (2, 0));
    assert_eq!(stored(&mut conn, &config, "u1").unwrap().as_of_ms, 3000);
    assert_eq!(stored(&mut conn, &config, "u2"), None);
    let applied = apply(&mut conn, &config, &mut replay, 4500, &stale, None)?;
    assert_eq!((applied.written, applied.direct), (2, 2));
    assert_eq!(read_ceiling(&mut conn, &config)?, 4500);
    Ok(())
}

/// A prefix whose progress record was written by a sink without the
/// ceiling can hold rows past any frontier it knows: every batch stays checked.
#[test]
fn a_progress_record_without_a_ceiling_keeps_every_batch_checked() -> anyhow::Result<()> {
    let config = config("legacy");
    let mut conn = connect(&config)?;
    load_function(&mut conn)?;
    redis::cmd("HSET")
        .arg(config.progress_key())
        .arg("frontier_ms")
        .arg("100")
        .query::<()>(&mut conn)?;
    assert_eq!(read_ceiling(&mut conn, &config)?, u64::MAX);
    let rows = vec![user(&config, "u1", Some(user_row(1)))];
    let applied = apply(&mut conn, &config, &mut checked(), 200, &rows, None)?;
    assert_eq!((applied.written, applied.direct), (1, 0));
    assert_eq!(read_ceiling(&mut conn, &config)?, u64::MAX, "still unknown");
    Ok(())
}
