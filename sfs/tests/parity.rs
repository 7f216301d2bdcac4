//! `sfs parity` against a real `sfs serve`, Kafka and Redis: the served
//! vectors of untouched rows are identical to the recomputed ones, and rows
//! tampered with in Redis show up as exactly those mismatches.
//!
//! A generated log goes to fresh topics; the real `sfs stream --until-end`
//! writes its rows to Redis. The test then changes one feature of a few
//! card rows (by hand, in Redis), and scores fraud requests for tampered
//! and untouched cards, unknown cards (cold starts) and propensity requests
//! with the score log sampling every request into a fresh topic. `sfs parity`
//! must check every record and report mismatches on exactly the tampered
//! input of exactly the tampered requests.

mod stream_support;

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use schemas::features::{Aggregation, Value};
use serde_json::{json, Value as Json};
use stream_support::*;

fn post(agent: &ureq::Agent, url: &str, body: &Json) -> Json {
    let resp = agent
        .post(url)
        .set("content-type", "application/json")
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("POST {url} {body}: {e}"));
    serde_json::from_str(&resp.into_string().unwrap()).unwrap()
}

#[test]
fn parity_finds_exactly_the_rows_tampered_with() {
    let topics = Topics::new("parity");
    let prefix = format!("{}:", unique("parity"));
    let scores_topic = format!("{}.scores", unique("parity"));
    generate(&topics, 6_000, 23);
    wait_all(
        vec![spawn_stream(&topics, &prefix, &[])],
        Duration::from_secs(180),
    );
    let set = shipped();
    let (txns, clicks) = read_events(&topics);
    let card = set.entity("card").expect("a card entity");

    // The server, sampling every scored request into the test's topic.
    let port = free_port();
    let dir = std::env::temp_dir().join(unique("parity"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\n\
             models_dir = \"{}\"\nscore_log_sample_rate = 1.0\nscore_log_brokers = \"{}\"\n\
             score_log_topic = \"{scores_topic}\"\n",
            redis_url(),
            concat!(env!("CARGO_MANIFEST_DIR"), "/../models"),
            brokers(),
        ),
    )
    .unwrap();
    let _server = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sfs"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env(
                "SFS_FEATURES",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
            )
            .env("SFS_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .build();
    let start = Instant::now();
    while agent.get(&format!("{base}/ready")).call().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "sfs serve did not get ready"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The input to tamper with: a card count the fraud model reads as is
    // (model inputs name row features `{entity}.{feature}`).
    let models: Json = serde_json::from_str(
        &agent
            .get(&format!("{base}/models"))
            .call()
            .unwrap()
            .into_string()
            .unwrap(),
    )
    .unwrap();
    let fraud_inputs: Vec<String> = models["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "fraud")
        .expect("a fraud model")["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap().to_owned())
        .collect();
    let (field, tampered_feature, tampered_input) = card
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| (i, f, format!("{}.{}", card.name, f.name)))
        .find(|(_, f, input)| f.aggregation == Aggregation::Count && fraud_inputs.contains(input))
        .map(|(i, f, input)| (i, f.name.clone(), input))
        .expect("the fraud model reads a card count as is");

    // Distinct cards with a row, newest first, with a transaction of each.
    // The rows reflect the events before the run's final frontier, the least
    // of the partitions' watermarks: a card whose only transactions are at
    // or after it (in a partition that ran ahead) has no row.
    let mut conn = redis();
    let frontier = progress_frontier(&mut conn, &prefix).expect("the run recorded progress");
    let mut seen = BTreeSet::new();
    let requests: Vec<&schemas::Txn> = txns
        .iter()
        .rev()
        .filter(|t| (t.event_time as u64) < frontier)
        .filter(|t| seen.insert(t.card_id.clone()))
        .take(40)
        .collect();
    assert_eq!(requests.len(), 40, "the log has 40 cards");
    let tampered: BTreeSet<&str> = requests
        .iter()
        .step_by(13)
        .map(|t| t.card_id.as_str())
        .collect();
    for id in &tampered {
        let key = card.redis_key(&prefix, id);
        let raw: String = redis::cmd("HGET")
            .arg(&key)
            .arg(&tampered_feature)
            .query(&mut conn)
            .unwrap();
        let Some(Value::Int(count)) = Value::decode(card.features[field].kind(), &raw) else {
            panic!("{key} {tampered_feature} = {raw} is not a count");
        };
        let _: () = redis::cmd("HSET")
            .arg(&key)
            .arg(&tampered_feature)
            .arg(Value::Int(count + 1000).encode())
            .query(&mut conn)
            .unwrap();
    }

    let mut served: HashMap<String, &str> = HashMap::new();
    let mut score = |path: &str, body: Json, card: &str| {
        let resp = post(&agent, &format!("{base}{path}"), &body);
        let id = resp["request_id"]
            .as_str()
            .expect("a request id")
            .to_owned();
        served.insert(
            id,
            if tampered.contains(card) {
                "tampered"
            } else {
                "clean"
            },
        );
    };
    for t in &requests {
        let body = json!({
            "card_id": t.card_id, "user_id": t.user_id, "amount_minor": t.amount_minor,
            "mcc": t.mcc, "country": t.country, "channel": t.channel,
        });
        score("/score/fraud", body, &t.card_id);
    }
    for id in ["never-seen-1", "never-seen-2"] {
        score(
            "/score/fraud",
            json!({"card_id": id, "amount_minor": 1234, "channel": "ecom"}),
            id,
        );
    }
    let users: BTreeSet<&str> = clicks
        .iter()
        .rev()
        .map(|c| c.user_id.as_str())
        .take(10)
        .collect();
    for user in &users {
        score("/score/propensity", json!({ "user_id": user }), "");
    }
    let total = served.len();
    assert_eq!(total, 40 + 2 + users.len());

    // Every request is on the topic (the log is asynchronous).
    let start = Instant::now();
    loop {
        let logged = topic_len(&scores_topic);
        if logged >= total {
            assert_eq!(logged, total, "one record per scored request");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{logged} of {total} scored requests reached {scores_topic}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let out = Command::new(env!("CARGO_BIN_EXE_sfs"))
        .args(["parity", "--json", "--workers", "2"])
        .args(["--scores-topic", &scores_topic])
        .args(["--topic", &format!("txn={}", topics.txn)])
        .args(["--topic", &format!("click={}", topics.click)])
        .env("KAFKA_BROKERS", brokers())
        .env(
            "SFS_FEATURES",
            concat!(env!("CARGO_MANIFEST_DIR"), "/../features.toml"),
        )
        .env("SFS_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sfs parity failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Json = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["records"], total, "{report}");
    assert_eq!(report["checked"], total, "{report}");
    assert_eq!(report["unverifiable"], json!({}), "{report}");
    let clean = served.values().filter(|s| **s == "clean").count();
    assert_eq!(report["identical"], clean, "{report}");
    for f in report["features"].as_array().unwrap() {
        let (model, feature) = (f["model"].as_str().unwrap(), f["feature"].as_str().unwrap());
        let expected = if model == "fraud" && feature == tampered_input {
            tampered.len()
        } else {
            0
        };
        assert_eq!(f["mismatched"], expected, "{model} {feature}: {f}");
        assert_eq!(f["missing"], 0, "{model} {feature}: {f}");
    }
    let differing: BTreeSet<&str> = report["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["request_id"].as_str().unwrap())
        .collect();
    let expected: BTreeSet<&str> = served
        .iter()
        .filter(|(_, s)| **s == "tampered")
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(differing, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Records on `topic` now (0 when it does not exist yet).
fn topic_len(topic: &str) -> usize {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers())
        .create()
        .unwrap();
    let timeout = Duration::from_secs(5);
    let Ok(metadata) = consumer.fetch_metadata(Some(topic), timeout) else {
        return 0;
    };
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions())
        .filter_map(|p| consumer.fetch_watermarks(topic, p.id(), timeout).ok())
        .map(|(low, high)| (high - low) as usize)
        .sum()
}
