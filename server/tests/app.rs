//! The application without a socket, against a real Redis and the shipped models.

mod common;

use common::*;
use hyper::StatusCode;
use schemas::features::{FeatureRow, Value};
use server::serve::build;

fn shipped_models() -> std::path::PathBuf {
    workspace().join("models")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn as_of_is_the_stream_frontier_for_rows_unchanged_since() {
    let cfg = config("frontier", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &card_row("c1", now - 60_000, now - 90_000),
        &[],
    )
    .await;
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &user_row("u1", now - 30_000, 1),
        &[],
    )
    .await;
    let body = r#"{"card_id":"c1","user_id":"u1","amount_minor":100}"#;

    // No progress record yet: the rows' own as_of.
    let (_, scored) = call(&app, "POST", "/score/fraud", body).await;
    assert_eq!(scored["as_of_ms"], now - 60_000, "{scored}");

    // The job recorded a newer durable frontier: both rows are exact as of it.
    let mut conn = redis(&cfg.redis_url).await;
    let progress = format!("{}_progress", cfg.key_prefix);
    let _: () = redis::cmd("HSET")
        .arg(&progress)
        .arg("frontier_ms")
        .arg(now - 2_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let (_, scored) = call(&app, "POST", "/score/fraud", body).await;
    assert_eq!(scored["as_of_ms"], now - 2_000, "{scored}");
    assert!(scored["feature_age_ms"].as_i64().unwrap() >= 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_of_another_feature_set_version_scores_as_cold_start() {
    let cfg = config("oldfv", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &card_row("c1", now, now - 1_000),
        &[("_fv", "1")],
    )
    .await;
    let (status, body) = call(
        &app,
        "POST",
        "/score/fraud",
        r#"{"card_id":"c1","amount_minor":100}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["cold_start_entities"],
        serde_json::json!(["card", "user"]),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_scores_known_and_cold_start_entities() {
    let cfg = config("fraud", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &card_row("c1", now - 500, now - 60_000),
        // Stale field of the old contract: ignored, the row's top_country_24h (DE) counts.
        &[("usual_country", "FR")],
    )
    .await;
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &user_row("u1", now - 1500, 1),
        &[],
    )
    .await;

    let (status, body) = call(
        &app,
        "POST",
        "/score/fraud?explain=true",
        r#"{"card_id":"c1","user_id":"u1","transaction_amount":45.00,"country":"FR","channel":"ecom","mcc":5411,"merchant_id":"m1"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for field in [
        "score",
        "decision",
        "model_version",
        "latency_ms",
        "features_used",
        "as_of_ms",
        "feature_age_ms",
        "cold_start",
    ] {
        assert!(body.get(field).is_some(), "response lacks {field}: {body}");
    }
    assert_eq!(body["model_version"], "fraud-v1");
    assert_eq!(body["cold_start"], false);
    assert_eq!(body["as_of_ms"], now - 1500, "the oldest row's as_of");
    assert!(body["feature_age_ms"].as_i64().unwrap() >= 1500);
    let score = body["score"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert!(["approve", "review", "decline"].contains(&body["decision"].as_str().unwrap()));
    let vector = body["feature_vector"].as_array().unwrap();
    let value = |name: &str| {
        vector.iter().find(|f| f["name"] == name).unwrap()["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(value("amount_to_mean_24h"), 4500.0 / 4000.0);
    assert_eq!(value("country_mismatch"), 1.0);
    assert!((59.0..=70.0).contains(&value("seconds_since_last_txn")));
    assert_eq!(value("channel_ecom"), 1.0);
    assert_eq!(value("user.add_to_cart_count_1h"), 1.0);
    assert_eq!(value("card_cold_start"), 0.0);

    // Without explain there is no vector; unknown card and user: cold start, said so.
    let (status, body) = call(
        &app,
        "POST",
        "/score/fraud",
        r#"{"card_id":"nobody","user_id":"nobody","amount_minor":4500}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("feature_vector").is_none());
    assert_eq!(body["cold_start"], true);
    assert_eq!(
        body["cold_start_entities"],
        serde_json::json!(["card", "user"])
    );
    assert!(body["as_of_ms"].is_null());

    // A big first purchase on a card-not-present channel from a new country scores higher than a usual one.
    let (_, risky) = call(
        &app,
        "POST",
        "/score/fraud",
        r#"{"card_id":"c1","user_id":"u1","amount_minor":400000,"country":"BR","channel":"ecom"}"#,
    )
    .await;
    assert!(risky["score"].as_f64().unwrap() > score, "{risky}");

    let metrics = call(&app, "GET", "/metrics", "").await.1;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("sfs_serve_cold_starts_total{entity=\"card\"} 1"),
        "{text}"
    );
    assert!(text.contains(
        "sfs_serve_request_duration_seconds_count{route=\"score_fraud\",status=\"200\"} 3"
    ));
    assert!(text.contains("sfs_serve_redis_duration_seconds_count{outcome=\"ok\"}"));
    assert!(text.contains("sfs_serve_score_bucket"));
    assert!(text.contains("sfs_serve_breaker_state 0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propensity_and_feature_lookup() {
    let cfg = config("propensity", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &user_row("keen", now, 3),
        &[],
    )
    .await;
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &user_row("idle", now, 0),
        &[],
    )
    .await;
    let (s1, keen) = call(&app, "POST", "/score/propensity", r#"{"user_id":"keen"}"#).await;
    let (s2, idle) = call(&app, "POST", "/score/propensity", r#"{"user_id":"idle"}"#).await;
    assert_eq!((s1, s2), (StatusCode::OK, StatusCode::OK));
    assert_eq!(keen["model_version"], "propensity-v1");
    // The trained model's ranking is the data's, not this test's: both
    // score as probabilities from their own rows.
    for response in [&keen, &idle] {
        let score = response["score"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&score), "{response}");
    }
    assert_eq!(keen["cold_start"], false);

    let (status, row) = call(&app, "GET", "/features/user/keen", "").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(row["features"]["add_to_cart_count_1h"], 3);
    assert_eq!(row["as_of_ms"], now);
    assert_eq!(row["entity"], "user");
    assert_eq!(row["feature_set_version"], features().version.as_str());
    let user = features().entity("user").unwrap().clone();
    let names: Vec<&String> = row["features"].as_object().unwrap().keys().collect();
    assert_eq!(names.len(), user.features.len(), "{row}");
    for f in &user.features {
        assert!(
            row["features"].get(&f.name).is_some(),
            "{row} lacks {}",
            f.name
        );
    }
    assert_eq!(
        call(&app, "GET", "/features/user/ghost", "").await.0,
        StatusCode::NOT_FOUND
    );
    let (status, err) = call(&app, "GET", "/features/merchant/x", "").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{err}");
    assert_eq!(
        err["error"],
        "unknown entity merchant: the feature set defines card, user"
    );
    assert_eq!(
        call(&app, "GET", "/nope", "").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, "GET", "/score/fraud", "").await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_field() {
    let cfg = config("bad-input", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    let cases = [
        ("{not json", None),
        ("[]", None),
        (r#"{"transaction_amount":1}"#, Some("card_id")),
        (r#"{"card_id":12,"transaction_amount":1}"#, Some("card_id")),
        (r#"{"card_id":"c"}"#, Some("transaction_amount")),
        (
            r#"{"card_id":"c","transaction_amount":"ten"}"#,
            Some("transaction_amount"),
        ),
        (
            r#"{"card_id":"c","amount_minor":5,"channel":7}"#,
            Some("channel"),
        ),
        (
            r#"{"card_id":"c","amount_minor":5,"country":"Germany"}"#,
            Some("country"),
        ),
        (r#"{"card_id":"c","amount_minor":5,"mcc":-3}"#, Some("mcc")),
    ];
    for (body, field) in cases {
        let (status, err) = call(&app, "POST", "/score/fraud", body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body} -> {err}");
        assert!(err["error"].is_string(), "{err}");
        assert_eq!(err["field"].as_str(), field, "{body} -> {err}");
        if let Some(f) = field {
            assert!(err["error"].as_str().unwrap().contains(f), "{err}");
        }
    }
    let (status, err) = call(&app, "POST", "/score/propensity", r#"{"user_id":false}"#).await;
    assert_eq!(
        (status, err["field"].as_str()),
        (StatusCode::BAD_REQUEST, Some("user_id"))
    );

    let huge = format!(
        r#"{{"card_id":"c","amount_minor":1,"pad":"{}"}}"#,
        "x".repeat(cfg.max_body_bytes)
    );
    let (status, err) = call(&app, "POST", "/score/fraud", &huge).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_ready_and_models() {
    let cfg = config("ready", &shipped_models());
    let app = build(&cfg, features()).unwrap();
    assert_eq!(call(&app, "GET", "/health", "").await.0, StatusCode::OK);
    let (status, ready) = call(&app, "GET", "/ready", "").await;
    assert_eq!(status, StatusCode::OK, "{ready}");
    assert_eq!(ready["models"]["fraud"], "fraud-v1");
    let (_, models) = call(&app, "GET", "/models", "").await;
    assert_eq!(models["feature_set_version"], features().version.as_str());
    let fraud = &models["models"][0];
    assert_eq!(fraud["name"], "fraud");
    assert_eq!(fraud["engine"], "onnx");
    assert!(fraud["training"]["roc_auc"].as_f64().unwrap() > 0.7);
    assert_eq!(fraud["thresholds"][0]["decision"], "review");
    app.start_draining();
    assert_eq!(
        call(&app, "GET", "/ready", "").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_model_the_rules_score_and_say_so() {
    let empty = temp_dir("rules");
    let cfg = config("rules", &empty);
    let app = build(&cfg, features()).unwrap();
    let (status, body) = call(
        &app,
        "POST",
        "/score/fraud",
        r#"{"card_id":"c","amount_minor":80000,"channel":"ecom"}"#,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["model_version"], "rule-based-v1");
    assert_eq!(body["model_engine"], "rules");
    let (_, body) = call(&app, "POST", "/score/propensity", r#"{"user_id":"u"}"#).await;
    assert_eq!(body["model_version"], "rule-based-v1");
    let (_, ready) = call(&app, "GET", "/ready", "").await;
    assert_eq!(ready["models"]["propensity"], "rule-based-v1");
    std::fs::remove_dir_all(empty).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_whose_input_does_not_match_its_metadata_is_refused() {
    let registry = temp_dir("shape");
    // One feature too few: the ONNX input is [N, 29], the metadata now lists 28.
    publish(&registry, "fraud", 1, |meta| {
        meta["features"].as_array_mut().unwrap().pop();
    });
    let err = build(&config("shape", &registry), features())
        .err()
        .expect("load must fail")
        .to_string();
    assert!(err.contains("input") && err.contains("28"), "{err}");
    std::fs::remove_dir_all(registry).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalogue_follows_the_loaded_feature_set() {
    // One more card feature and a third entity: served without a code change.
    let set = edited_features("catalogue", |text| {
        format!(
            "{text}
[[entities]]
name = \"merchant\"
key = \"merchant_id\"
sources = [\"txn\"]

[[features]]
name = \"txn_count_1h\"
entity = \"merchant\"
source = \"txn\"
aggregation = \"count\"
window = \"1h\"
"
        )
        .replace(
            "[[sources]]\nname = \"txn\"\ntopic = \"txn.events\"\nschema = \"txn\"\nkeys = [\"card_id\", \"user_id\"]",
            "[[sources]]\nname = \"txn\"\ntopic = \"txn.events\"\nschema = \"txn\"\nkeys = [\"card_id\", \"user_id\", \"merchant_id\"]",
        )
    });
    assert_ne!(set.version, features().version);
    // The shipped models were trained on another version: use the rules.
    let empty = temp_dir("catalogue");
    let cfg = config("catalogue", &empty);
    let app = build(&cfg, set.clone()).unwrap();
    let merchant = set.entity("merchant").unwrap();
    let row = FeatureRow {
        entity: merchant.clone(),
        id: "m1".into(),
        as_of_ms: 1_000,
        values: vec![Value::Int(42)],
    };
    let mut conn = redis(&cfg.redis_url).await;
    let _: () = redis::cmd("HSET")
        .arg(merchant.redis_key(&cfg.key_prefix, "m1"))
        .arg(row.encode_fields(&set.version))
        .query_async(&mut conn)
        .await
        .unwrap();
    let (status, body) = call(&app, "GET", "/features/merchant/m1", "").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["features"], serde_json::json!({"txn_count_1h": 42}));
    assert_eq!(body["feature_set_version"], set.version.as_str());
    let (_, models) = call(&app, "GET", "/models", "").await;
    assert_eq!(models["feature_set_version"], set.version.as_str());
    std::fs::remove_dir_all(empty).unwrap();
}

#[tokio::test]
async fn a_model_naming_a_feature_the_set_lacks_is_refused_naming_it() {
    let set = edited_features("lacks", |text| without_feature(text, "amount_max_24h"));
    let err = build(&config("lacks", &workspace().join("models")), set)
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains("feature card.amount_max_24h: entity card has no feature amount_max_24h"),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_time_feature_whose_card_feature_is_gone_fails_the_model() {
    // The feature and its request binding go (a binding must name a feature).
    let drop = |text: String| {
        without_feature(text, "last_txn_time").replace("last_time = \"last_txn_time\"\n", "")
    };
    let set = edited_features("no-last-txn", drop);
    let err = build(&config("no-last-txn", &workspace().join("models")), set)
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains("request-time feature seconds_since_last_txn needs the card feature bound to request role last_time"),
        "{err}"
    );
    // The rule-based fallback reads it too, and fails the same way.
    let set = edited_features("no-last-txn-rules", drop);
    let empty = temp_dir("no-last-txn-rules");
    let err = build(&config("no-last-txn-rules", &empty), set)
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains("rule-based-v1 for fraud: request-time feature seconds_since_last_txn needs the card feature bound to request role last_time"),
        "{err}"
    );
    std::fs::remove_dir_all(empty).unwrap();
}

#[tokio::test]
async fn a_model_of_another_feature_set_version_is_refused() {
    let registry = temp_dir("other-fv");
    publish(&registry, "fraud", 1, |meta| {
        meta["feature_set_version"] = "fs-0000000000000000".into();
    });
    let err = build(&config("other-fv", &registry), features())
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains(&format!(
            "trained on feature-set version fs-0000000000000000, the server reads {}",
            features().version
        )),
        "{err}"
    );
    // The integer versions of before the feature definitions: say what to do.
    publish(&registry, "fraud", 2, |meta| {
        meta["feature_set_version"] = 2.into();
    });
    let err = build(&config("other-fv", &registry), features())
        .err()
        .expect("load must fail")
        .to_string();
    assert!(
        err.contains("feature_set_version 2 is not a feature-set version string"),
        "{err}"
    );
    std::fs::remove_dir_all(registry).unwrap();
}

#[test]
fn invalid_feature_definitions_list_every_problem_and_what_to_fix() {
    let dir = temp_dir("bad-defs");
    let path = dir.join("features.toml");
    let text = std::fs::read_to_string(workspace().join("features.toml"))
        .unwrap()
        .replacen("window = \"1m\"", "window = \"1 minute\"", 1)
        .replacen("aggregation = \"max\"", "aggregation = \"median\"", 1);
    std::fs::write(&path, text).unwrap();
    let err = server::serve::load_features(Some(&path)).unwrap_err();
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(err.contains("feature txn_count_1m: window"), "{err}");
    assert!(
        err.contains("feature amount_max_24h: unknown aggregation \"median\""),
        "{err}"
    );
    assert!(err.contains("fix the feature definitions"), "{err}");
    let err = server::serve::load_features(Some(&dir.join("missing.toml"))).unwrap_err();
    assert!(
        err.contains("missing.toml") && err.contains("--features"),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}
