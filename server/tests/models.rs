//! The shipped ONNX models scored from Rust against Python's onnxruntime
//! scores, and a model swapped while requests flow.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use server::model::registry::load_version;
use server::model::ModelKind;
use server::serve::{build, spawn_model_poller};

#[test]
fn shipped_models_match_python_scores_on_the_fixed_vectors() {
    let ort = ort_path();
    for kind in ModelKind::ALL {
        // The newest published version, as the server picks it.
        let versions = workspace().join("models").join(kind.name());
        let newest = std::fs::read_dir(&versions)
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().to_str()?.parse::<u32>().ok())
            .max()
            .unwrap_or_else(|| panic!("no version under {}", versions.display()));
        let dir = versions.join(newest.to_string());
        let model = load_version(kind, &dir, &features(), 1, Some(&ort))
            .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display()));
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("test_vectors.json")).unwrap())
                .unwrap();
        assert_eq!(
            doc["features"],
            serde_json::json!(model.features),
            "vector columns follow the metadata"
        );
        let vectors = doc["vectors"].as_array().unwrap();
        let scores = doc["scores"].as_array().unwrap();
        assert!(vectors.len() >= 20 && vectors.len() == scores.len());
        // Python's onnxruntime against the trainer's own model (LightGBM), when recorded.
        if let Some(trainer) = doc["lightgbm_scores"].as_array() {
            assert_eq!(trainer.len(), scores.len());
            for (a, b) in trainer.iter().zip(scores) {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!(
                    (a - b).abs() <= 1e-5,
                    "{}: lightgbm {a} vs onnx {b}",
                    kind.name()
                );
            }
        }
        for (x, want) in vectors.iter().zip(scores) {
            let x: Vec<f32> = x
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap() as f32)
                .collect();
            let got = model.score(&x).unwrap();
            let want = want.as_f64().unwrap();
            assert!(
                (f64::from(got) - want).abs() <= 1e-5,
                "{}: rust {got} vs python {want} on {x:?}",
                kind.name()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_model_is_swapped_in_while_requests_flow() {
    let registry = temp_dir("reload");
    publish(&registry, "fraud", 1, |_| {});
    let cfg = config("reload", &registry);
    let app = build(&cfg, features()).unwrap();
    let poller = spawn_model_poller(&app, Duration::from_millis(cfg.model_poll_ms));

    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let seen_v2 = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..4 {
        let (app, stop, failures, seen_v2) =
            (app.clone(), stop.clone(), failures.clone(), seen_v2.clone());
        clients.push(tokio::spawn(async move {
            let mut sent = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let body = format!(r#"{{"card_id":"c{i}","amount_minor":{}}}"#, 1000 + sent);
                let (status, resp) = call(&app, "POST", "/score/fraud", &body).await;
                if status != StatusCode::OK {
                    failures.fetch_add(1, Ordering::Relaxed);
                    eprintln!("failed during reload: {status} {resp}");
                } else if resp["model_version"] == "fraud-v3" {
                    seen_v2.fetch_add(1, Ordering::Relaxed);
                }
                sent += 1;
                tokio::task::yield_now().await;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A broken version 2 (wrong feature count) is skipped and reported, v1 stays.
    publish(&registry, "fraud", 2, |meta| {
        meta["features"].as_array_mut().unwrap().truncate(3);
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, models) = call(&app, "GET", "/models", "").await;
        if models["models"][0]["last_load_error"].is_string() {
            assert_eq!(models["models"][0]["model_version"], "fraud-v1");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the broken version was never reported: {models}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A good version 3 replaces it.
    publish(&registry, "fraud", 3, |_| {});
    while seen_v2.load(Ordering::Relaxed) == 0 {
        let (_, models) = call(&app, "GET", "/models", "").await;
        if models["models"][0]["model_version"] == "fraud-v3" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "version 3 was never loaded: {models}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = 0;
    for c in clients {
        sent += c.await.unwrap();
    }
    poller.abort();
    let (_, body) = call(
        &app,
        "POST",
        "/score/fraud",
        r#"{"card_id":"c","amount_minor":1}"#,
    )
    .await;
    assert_eq!(body["model_version"], "fraud-v3");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "requests failed during the swap ({sent} sent)"
    );
    assert!(sent > 100, "requests kept flowing: {sent}");
    let metrics = call(&app, "GET", "/metrics", "").await.1;
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains("sfs_serve_model_reloads_total{model=\"fraud\",outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("sfs_serve_model_reloads_total{model=\"fraud\",outcome=\"error\"} 1"),
        "{text}"
    );
    std::fs::remove_dir_all(registry).unwrap();
}
