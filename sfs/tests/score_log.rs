//! The served-vector log of `sfs serve` against real Kafka and Redis: every
//! sampled request lands on the topic exactly once, keyed by its request id,
//! with the vector the response showed and the rows/frontier the test wrote;
//! and a log whose brokers are unreachable drops (and counts) records while
//! every request is still served.

mod stream_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::message::Message;
use redis::Commands;
use schemas::features::{FeatureRow, Value, ValueKind};
use schemas::score::ScoreRecord;
use serde_json::json;
use stream_support::*;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// `sfs serve` with `extra` TOML appended to a config over the shipped
/// models and definitions, the test's key prefix, on a free port.
fn serve(prefix: &str, extra: &str, dir: &Path) -> (KillOnDrop, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let config = dir.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"{addr}\"\nredis_url = \"{}\"\nkey_prefix = \"{prefix}\"\nmodels_dir = \"{ROOT}/models\"\nfeatures = \"{ROOT}/features.toml\"\nlog_sample_every = 0\n{extra}",
            redis_url()
        ),
    )
    .unwrap();
    let proc = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_sfs"))
            .args(["serve", "--config"])
            .arg(&config)
            .current_dir(ROOT)
            .env("SFS_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < deadline, "sfs serve did not become ready");
        if ureq::get(&format!("http://{addr}/ready")).call().is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    (proc, addr)
}

/// POSTs `body`; returns the response's `x-request-id` header and JSON.
fn post(
    addr: &str,
    path: &str,
    body: &serde_json::Value,
    id: Option<&str>,
) -> (String, serde_json::Value) {
    let mut req = ureq::post(&format!("http://{addr}{path}"))
        .timeout(Duration::from_secs(10))
        .set("content-type", "application/json");
    if let Some(id) = id {
        req = req.set("x-request-id", id);
    }
    let resp = req
        .send_string(&body.to_string())
        .unwrap_or_else(|e| panic!("{path} {body}: {e}"));
    let header = resp
        .header("x-request-id")
        .expect("an x-request-id header")
        .to_owned();
    let json: serde_json::Value = serde_json::from_str(&resp.into_string().unwrap()).unwrap();
    (header, json)
}

fn metrics(addr: &str) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

/// The sum of every sample of `name` whose labels contain `label`.
fn metric(text: &str, name: &str, label: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| series.split('{').next() == Some(name) && series.contains(label))
        .map(|(_, v)| v.parse::<f64>().unwrap())
        .sum()
}

/// Waits until `cond` holds on the server's /metrics; returns them.
fn wait_metrics(addr: &str, what: &str, cond: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = metrics(addr);
        if cond(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// SIGTERM, and the server exits cleanly (flushing the log) in time.
fn terminate(mut proc: KillOnDrop) {
    let pid = proc.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = proc.0.try_wait().unwrap() {
            assert!(status.success(), "sfs serve exited with {status}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sfs serve did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A row of `entity` with a value of the right kind for each feature.
fn row(entity: &str, id: &str, as_of_ms: i64, seed: i64) -> FeatureRow {
    let entity = shipped().entity(entity).unwrap().clone();
    let values = entity
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let v = seed * 7 + i as i64;
            match f.kind() {
                ValueKind::Int => Value::Int(v % 50),
                ValueKind::Float => Value::Float((v % 50) as f64 * 12.25),
            }
        })
        .collect();
    FeatureRow {
        entity,
        id: id.into(),
        as_of_ms,
        values,
    }
}

/// What one request should have logged.
struct Expected {
    model: &'static str,
    /// (entity, id, as_of_ms)
    entities: Vec<(&'static str, String, Option<i64>)>,
    event_time_ms: Option<i64>,
    amount_minor: i64,
    country: Option<&'static str>,
    channel: Option<&'static str>,
    response: serde_json::Value,
}

#[test]
fn every_sampled_request_is_logged_with_the_vector_it_was_served() {
    let prefix = format!("{}:", unique("score-log"));
    let topic = unique("score-log");
    let dir = std::env::temp_dir().join(unique("score-log"));
    std::fs::create_dir_all(&dir).unwrap();
    let set = shipped();
    let version = set.version.clone();

    // Rows on both sides of the frontier, and ids with no row (cold starts).
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_connection()
        .unwrap();
    let frontier: i64 = 1_700_000_000_000;
    let mut as_of = BTreeMap::new();
    for i in 0..6i64 {
        for (entity, ahead) in [("card", 1), ("user", 2)] {
            let id = format!("{entity}{i}");
            // Half before the frontier (served as of the frontier), half after.
            let t = frontier
                + if i % 2 == 0 {
                    -(i + 1) * 60_000
                } else {
                    ahead * 1_000 + i
                };
            let row = row(entity, &id, t, i + ahead);
            let fields = row.encode_fields(&version);
            let _: () = redis
                .hset_multiple(row.entity.redis_key(&prefix, &id), &fields)
                .unwrap();
            as_of.insert((entity, id), t);
        }
    }
    let _: () = redis
        .hset(format!("{prefix}_progress"), "frontier_ms", frontier)
        .unwrap();
    let expect_as_of = |entity: &'static str, id: &str| {
        as_of
            .get(&(entity, id.to_owned()))
            .map(|&t: &i64| t.max(frontier))
    };

    let (server, addr) = serve(
        &prefix,
        &format!(
            "score_log_brokers = \"{}\"\nscore_log_topic = \"{topic}\"\nscore_log_sample_rate = 1.0\n",
            brokers()
        ),
        &dir,
    );

    let mut expected: BTreeMap<String, Expected> = BTreeMap::new();
    let channels = ["pos", "ecom", "atm"];
    for i in 0..24usize {
        let given_id = (i % 3 == 0).then(|| format!("client-req-{i}"));
        let (header, response, exp) = if i % 4 == 3 {
            // Propensity: one user read (user7.. have no row).
            let user = format!("user{}", i % 8);
            let (h, r) = post(
                &addr,
                "/score/propensity?explain=true",
                &json!({"user_id": user}),
                given_id.as_deref(),
            );
            let ents = vec![("user", user.clone(), expect_as_of("user", &user))];
            (
                h,
                r.clone(),
                Expected {
                    model: "propensity",
                    entities: ents,
                    event_time_ms: None,
                    amount_minor: 0,
                    country: None,
                    channel: None,
                    response: r,
                },
            )
        } else {
            let card = format!("card{}", i % 8);
            let user = (i % 5 != 0).then(|| format!("user{}", (i + 1) % 8));
            let event_time = frontier + 90_000 + i as i64;
            let country = ["de", "FR", "us"][i % 3];
            let channel = channels[i % 3];
            let mut body = json!({"card_id": card, "amount_minor": 1000 + i as i64 * 37,
                "country": country, "channel": channel.to_uppercase(), "event_time_ms": event_time});
            if let Some(u) = &user {
                body["user_id"] = json!(u);
            }
            let (h, r) = post(
                &addr,
                "/score/fraud?explain=true",
                &body,
                given_id.as_deref(),
            );
            let mut ents = vec![("card", card.clone(), expect_as_of("card", &card))];
            if let Some(u) = &user {
                ents.push(("user", u.clone(), expect_as_of("user", u)));
            }
            (
                h,
                r.clone(),
                Expected {
                    model: "fraud",
                    entities: ents,
                    event_time_ms: Some(event_time),
                    amount_minor: 1000 + i as i64 * 37,
                    country: Some(["DE", "FR", "US"][i % 3]),
                    channel: Some(channel),
                    response: r,
                },
            )
        };
        let id = response["request_id"]
            .as_str()
            .expect("a request_id")
            .to_owned();
        assert_eq!(header, id, "the header and the body carry the same id");
        if let Some(given) = &given_id {
            assert_eq!(&id, given, "a client's x-request-id is honoured");
        }
        assert!(expected.insert(id, exp).is_none(), "request ids are unique");
    }
    let n = expected.len() as f64;

    // Every record is acknowledged; none dropped.
    let text = wait_metrics(&addr, "every record acknowledged", |t| {
        metric(t, "sfs_serve_score_log_records_total", "") >= n
    });
    assert_eq!(metric(&text, "sfs_serve_score_log_records_total", ""), n);
    assert_eq!(metric(&text, "sfs_serve_score_log_sampled_total", ""), n);
    assert_eq!(metric(&text, "sfs_serve_score_log_dropped_total", ""), 0.0);

    let messages = read_all(&topic);
    assert_eq!(
        messages.len(),
        expected.len(),
        "exactly one record per request"
    );
    let mut seen = std::collections::BTreeSet::new();
    for message in &messages {
        let record = ScoreRecord::decode(message.payload().unwrap()).unwrap();
        let key = std::str::from_utf8(message.key().unwrap()).unwrap();
        assert_eq!(key, record.request_id, "keyed by request id");
        assert!(seen.insert(record.request_id.clone()), "logged once");
        let exp = expected
            .get(&record.request_id)
            .unwrap_or_else(|| panic!("{} was not a response's id", record.request_id));
        let r = &exp.response;
        let id = &record.request_id;
        assert_eq!(record.model, exp.model, "{id}");
        assert_eq!(
            record.model_version,
            r["model_version"].as_str().unwrap(),
            "{id}"
        );
        assert_eq!(record.feature_set_version, version, "{id}");
        assert_eq!(record.frontier_ms, Some(frontier), "{id}");
        let entities: Vec<(&str, &str, Option<i64>)> = record
            .entities
            .iter()
            .map(|e| (e.entity.as_str(), e.id.as_str(), e.as_of_ms))
            .collect();
        let want: Vec<(&str, &str, Option<i64>)> = exp
            .entities
            .iter()
            .map(|(e, i, t)| (*e, i.as_str(), *t))
            .collect();
        assert_eq!(entities, want, "{id}");
        if let Some(t) = exp.event_time_ms {
            assert_eq!(record.event_time_ms, t, "{id}");
        } else {
            // Propensity: scored at the wall clock.
            assert!(
                (record.event_time_ms - record.scored_at).abs() < 1_000,
                "{id}"
            );
        }
        assert_eq!(record.amount_minor, exp.amount_minor, "{id}");
        assert_eq!(record.country.as_deref(), exp.country, "{id}");
        assert_eq!(record.channel.as_deref(), exp.channel, "{id}");
        let vector = r["feature_vector"]
            .as_array()
            .expect("explain=true shows the vector");
        assert_eq!(record.features.len(), vector.len(), "{id}");
        for (logged, shown) in record.features.iter().zip(vector) {
            assert_eq!(logged.name, shown["name"].as_str().unwrap(), "{id}");
            // The JSON shows the f32 (shortest round-trip form): exact.
            assert_eq!(
                logged.value,
                shown["value"].as_f64().unwrap() as f32,
                "{id} {}",
                logged.name
            );
        }
        assert_eq!(
            record.score as f32,
            r["score"].as_f64().unwrap() as f32,
            "{id}"
        );
        assert_eq!(record.decision, r["decision"].as_str().unwrap(), "{id}");
    }
    // The response's as_of is the oldest of the served rows' as_of.
    for exp in expected.values() {
        let min = exp.entities.iter().filter_map(|e| e.2).min();
        assert_eq!(exp.response["as_of_ms"].as_i64(), min);
    }

    terminate(server);
    let keys: Vec<String> = redis.keys(format!("{prefix}*")).unwrap();
    if !keys.is_empty() {
        let _: () = redis.del(keys).unwrap();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unreachable_kafka_drops_log_records_and_serving_goes_on() {
    let prefix = format!("{}:", unique("score-log-down"));
    let dir = std::env::temp_dir().join(unique("score-log-down"));
    std::fs::create_dir_all(&dir).unwrap();
    // Nothing listens there.
    let dead = format!("127.0.0.1:{}", free_port());
    let (server, addr) = serve(
        &prefix,
        &format!(
            "score_log_brokers = \"{dead}\"\nscore_log_topic = \"{}\"\nscore_log_sample_rate = 1.0\nscore_log_message_timeout_ms = 1000\n",
            unique("score-log-down")
        ),
        &dir,
    );
    let n = 40;
    for i in 0..n {
        let (id, r) = if i % 2 == 0 {
            post(
                &addr,
                "/score/fraud",
                &json!({"card_id": format!("c{i}"), "amount_minor": 500}),
                None,
            )
        } else {
            post(
                &addr,
                "/score/propensity",
                &json!({"user_id": format!("u{i}")}),
                None,
            )
        };
        assert_eq!(r["request_id"].as_str(), Some(id.as_str()));
        assert!(r["score"].is_number(), "{r}");
    }
    // Every record was attempted and, with no broker, dropped.
    let text = wait_metrics(&addr, "the records to be dropped", |t| {
        metric(t, "sfs_serve_score_log_dropped_total", "") >= n as f64
    });
    assert_eq!(
        metric(&text, "sfs_serve_score_log_sampled_total", ""),
        n as f64
    );
    assert_eq!(metric(&text, "sfs_serve_score_log_records_total", ""), 0.0);
    assert_eq!(
        metric(&text, "sfs_serve_score_log_dropped_total", ""),
        n as f64
    );
    assert_eq!(
        metric(
            &text,
            "sfs_serve_score_log_dropped_total",
            "reason=\"kafka_timeout\""
        ),
        n as f64,
        "{text}"
    );
    // Serving is unaffected: every request answered, /ready still ready.
    assert!(ureq::get(&format!("http://{addr}/ready")).call().is_ok());
    terminate(server);
    let _ = std::fs::remove_dir_all(&dir);
}
