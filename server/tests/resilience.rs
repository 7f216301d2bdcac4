//! Through a real socket, and through a Redis outage: this test starts its own
//! redis-server on a free port, kills it mid-test and starts it again.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use hyper::StatusCode;
use server::serve::{build, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends one HTTP/1.1 request on a keep-alive connection; returns status and body.
async fn http(
    conn: &mut TcpStream,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, serde_json::Value) {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap();
        if buf.len() >= end + 4 + len {
            let status = head[9..12].parse().unwrap();
            // `/health` answers with an empty body, as Feast's does.
            let body = &buf[end + 4..end + 4 + len];
            let json = if body.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_slice(body).unwrap()
            };
            return (status, json);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_through_a_real_socket_and_drains_on_shutdown() {
    let cfg = config("socket", &workspace().join("models"));
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    write_row(
        &cfg.redis_url,
        &cfg.key_prefix,
        &card_row("c1", now, now - 5_000),
        &[],
    )
    .await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        listener,
        app,
        async { stop_rx.await.unwrap_or(()) },
        Duration::from_secs(5),
    ));

    let mut conn = TcpStream::connect(addr).await.unwrap();
    let (status, body) = http(
        &mut conn,
        "POST",
        "/score/fraud",
        r#"{"card_id":"c1","transaction_amount":12.5}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], "fraud-v1");
    assert_eq!(body["cold_start_entities"], serde_json::json!(["user"]));
    let (status, _) = http(&mut conn, "GET", "/health", "").await;
    assert_eq!(status, 200);

    // Shut down while the keep-alive connection is open: serve returns once it is drained.
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("serve drains and returns")
        .unwrap()
        .unwrap();
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
}

fn redis_server_binary() -> String {
    ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .map_or_else(|| "redis-server".to_owned(), |p| p.to_string())
}

fn start_redis(port: u16) -> Child {
    let child = Command::new(redis_server_binary())
        .args([
            "--bind",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (bash infra/redis.sh install)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "redis-server did not start on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_is_a_fast_503_and_the_server_recovers_by_itself() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = start_redis(port);
    let mut cfg = config("outage", &workspace().join("models"));
    cfg.redis_url = format!("redis://127.0.0.1:{port}");
    cfg.breaker_cooldown_ms = 200;
    let app = build(&cfg, features()).unwrap();
    let now = now_ms();
    let row = card_row("c1", now, now - 5_000);
    write_row(&cfg.redis_url, &cfg.key_prefix, &row, &[]).await;
    let score = r#"{"card_id":"c1","transaction_amount":12.5}"#;
    let (status, body) = call(&app, "POST", "/score/fraud", score).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["cold_start"],
        serde_json::json!(true),
        "no user id given"
    );

    redis.kill().unwrap();
    redis.wait().unwrap();
    let mut slowest = Duration::ZERO;
    for _ in 0..50 {
        let start = Instant::now();
        let (status, body) = call(&app, "POST", "/score/fraud", score).await;
        slowest = slowest.max(start.elapsed());
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert_eq!(
            body,
            serde_json::json!({"error": "feature store unavailable"})
        );
    }
    eprintln!("slowest 503 during the outage: {slowest:?}");
    // Generous bound: the point is that nothing waits on a dead Redis; the
    // breaker metrics below prove the fast path was taken.
    assert!(
        slowest < Duration::from_secs(1),
        "503s must not hang: {slowest:?}"
    );
    let (status, ready) = call(&app, "GET", "/ready", "").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{ready}");
    let text = call(&app, "GET", "/metrics", "")
        .await
        .1
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("sfs_serve_breaker_state 2"),
        "breaker open: {text}"
    );
    assert!(
        text.contains("sfs_serve_redis_duration_seconds_count{outcome=\"rejected\"}"),
        "{text}"
    );

    // Redis comes back (empty, as after a crash without persistence): the
    // breaker's probe finds it and scoring resumes with no restart.
    let mut redis = start_redis(port);
    write_row(&cfg.redis_url, &cfg.key_prefix, &row, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = call(&app, "POST", "/score/fraud", score).await;
        if status == StatusCode::OK {
            assert_eq!(
                body["cold_start_entities"],
                serde_json::json!(["user"]),
                "the card row is read again"
            );
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "no recovery within 15 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(call(&app, "GET", "/ready", "").await.0, StatusCode::OK);
    let text = call(&app, "GET", "/metrics", "")
        .await
        .1
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        text.contains("sfs_serve_breaker_state 0"),
        "breaker closed: {text}"
    );
    redis.kill().unwrap();
    redis.wait().unwrap();
}
