//! Interop with an independent client: payloads serialized by the
//! confluent-kafka Python client's AvroSerializer and by Python's json module
//! decode to the values they were made from, and fastavro reads our object
//! container files. `tests/interop/golden.json` is committed; when the project
//! venv (`.venv`, or `SFS_PYTHON`) exists the script is run afresh too.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use schemas::codec::{Decoder, Event};
use schemas::container::ContainerWriter;
use schemas::registry::MemoryRegistry;
use schemas::{Click, EventKind, Label, Txn};

const NOW: i64 = 1_800_000_000_000;

fn interop_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The project venv's python, if it has the interop packages.
fn python() -> Option<PathBuf> {
    let python = std::env::var_os("SFS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"));
    let ok = Command::new(&python)
        .args([
            "-c",
            "import confluent_kafka.schema_registry.avro, fastavro",
        ])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Some(python)
    } else {
        eprintln!(
            "skipping the live python run: no venv with confluent-kafka and fastavro at {}",
            python.display()
        );
        None
    }
}

fn check<E: Event + PartialEq + std::fmt::Debug>(
    d: &mut Decoder,
    payload: &[u8],
    expected: &serde_json::Value,
) {
    let expected: E = serde_json::from_value(expected.clone()).unwrap();
    let decoded = d
        .decode::<E>(payload, NOW)
        .unwrap_or_else(|e| panic!("{e}: {expected:?}"));
    assert_eq!(decoded, expected);
}

/// Decodes every record of a golden file; returns how many were Avro.
fn check_golden(golden: &str) -> usize {
    let golden: serde_json::Value = serde_json::from_str(golden).unwrap();
    let registry = MemoryRegistry::new();
    for (id, text) in golden["schemas"].as_object().unwrap() {
        registry
            .insert(id.parse().unwrap(), "interop", text.as_str().unwrap())
            .unwrap();
    }
    let mut d = Decoder::new(Arc::new(registry));
    let mut avro = 0;
    let records = golden["records"].as_array().unwrap();
    assert!(records.len() >= 16);
    for r in records {
        let payload: Vec<u8> = (0..r["payload_hex"].as_str().unwrap().len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&r["payload_hex"].as_str().unwrap()[i..i + 2], 16).unwrap())
            .collect();
        avro += usize::from(r["format"] == "avro");
        let expected = &r["expected"];
        match r["kind"].as_str().unwrap() {
            "txn" => check::<Txn>(&mut d, &payload, expected),
            "click" => check::<Click>(&mut d, &payload, expected),
            "label" => check::<Label>(&mut d, &payload, expected),
            other => panic!("unknown kind {other}"),
        }
    }
    avro
}

#[test]
fn confluent_python_serializer_payloads_decode() {
    let golden = std::fs::read_to_string(interop_dir().join("golden.json")).unwrap();
    assert_eq!(check_golden(&golden), 8);
}

#[test]
fn a_fresh_python_run_decodes_and_fastavro_reads_our_container_files() {
    let Some(python) = python() else { return };
    let dir = std::env::temp_dir().join(format!("sfs-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("golden.json");
    let status = Command::new(&python)
        .arg(interop_dir().join("interop.py"))
        .arg("produce")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(check_golden(&std::fs::read_to_string(&out).unwrap()), 8);

    // Our container file, read back by fastavro.
    let txns: Vec<Txn> = (0..3)
        .map(|i| Txn {
            event_id: format!("t-{i}"),
            card_id: "c-é".into(),
            user_id: "u".into(),
            merchant_id: "m".into(),
            mcc: 5999,
            amount_minor: 100 * i,
            currency: "GBP".into(),
            country: "GB".into(),
            channel: schemas::Channel::Ecom,
            event_time: NOW - i,
            device_id: (i % 2 == 0).then(|| "d".into()),
            ip_country: None,
        })
        .collect();
    let file = dir.join("txn.avro");
    let mut w = ContainerWriter::new::<Txn>(
        std::fs::File::create(&file).unwrap(),
        EventKind::Txn.latest_version(),
    )
    .unwrap();
    for t in &txns {
        w.append(t).unwrap();
    }
    w.finish().unwrap();
    let output = Command::new(&python)
        .arg(interop_dir().join("interop.py"))
        .arg("read-ocf")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let read: Vec<Txn> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(read, txns);
    std::fs::remove_dir_all(&dir).ok();
}
