//! The read path's RESP pool against a real Redis: database selection from
//! the URL, large replies, connections killed under it (Redis restarts),
//! cancelled requests, and the connection limit. Checked with redis-rs, an
//! independent client.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use server::resp::{Commands, Reply, RespPool};

const DB: i64 = 7;

fn url_with_db() -> String {
    format!("{}/{DB}", redis_url().trim_end_matches('/'))
}

fn pool(max: usize) -> RespPool {
    RespPool::new(&url_with_db(), Duration::from_millis(500), max).expect("valid url")
}

/// Client ids of the connections open to Redis (any database) whose last
/// command was `cmd`.
async fn clients_running(conn: &mut redis::aio::MultiplexedConnection, cmd: &str) -> Vec<String> {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" db={DB} ")) && l.contains(&format!(" cmd={cmd}")))
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(String::from)
        })
        .collect()
}

#[tokio::test]
async fn reads_the_database_of_the_url_in_place() {
    let key = format!("{}hash", unique_prefix("resp_db"));
    let mut conn = redis(&url_with_db()).await;
    // 2,000 fields of 1 kB: a reply far larger than one read.
    let value = "v".repeat(1000);
    let fields: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("f{i}"), format!("{i}{value}")))
        .collect();
    let _: () = conn.hset_multiple(&key, &fields).await.unwrap();
    let _: () = conn.expire(&key, 60).await.unwrap();

    let pool = pool(4);
    let mut commands = Commands::new();
    commands.start("HMGET", 3);
    commands.arg(key.as_bytes());
    commands.arg(b"f1999");
    commands.arg(b"absent");
    commands.start("HGETALL", 1);
    commands.arg(key.as_bytes());
    commands.push("GET", &["no-such-key-in-db-7"]);
    let replies = pool.query(&commands).await.unwrap();
    assert_eq!(replies.len(), 3);
    let Some(Reply::Array(hmget)) = replies.get(0) else {
        panic!("HMGET answers an array")
    };
    let hmget: Vec<Reply> = hmget.collect();
    assert_eq!(hmget[0].as_str(), Some(format!("1999{value}").as_str()));
    assert_eq!(hmget[1], Reply::Nil);
    let Some(Reply::Array(all)) = replies.get(1) else {
        panic!("HGETALL answers an array")
    };
    assert_eq!(all.len(), 4000);
    assert_eq!(replies.get(2), Some(Reply::Nil));
    // The same key does not exist in database 0.
    let mut db0 = redis(&redis_url()).await;
    let exists: bool = db0.exists(&key).await.unwrap();
    assert!(!exists, "the pool read database {DB}, not 0");
}

#[tokio::test]
async fn killed_connections_are_replaced_and_the_request_retried() {
    let pool = Arc::new(pool(8));
    let mut ping = Commands::new();
    ping.push("PING", &[]);
    // Open several pooled connections by overlapping requests.
    assert!(overlapping(&pool, &ping, 4).await);
    let mut admin = redis(&redis_url()).await;
    let pooled = clients_running(&mut admin, "ping").await;
    assert!(!pooled.is_empty(), "the pool keeps its connections open");
    // Kill every one of them, as a Redis restart would.
    for id in &pooled {
        let killed: i64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("ID")
            .arg(id)
            .query_async(&mut admin)
            .await
            .unwrap();
        assert_eq!(killed, 1, "connection {id} was killed");
    }
    // The next request lands on a dead pooled connection, drops the pool
    // and succeeds on a fresh one.
    let replies = pool
        .query(&ping)
        .await
        .expect("retried on a new connection");
    assert_eq!(replies.get(0), Some(Reply::Simple(b"PONG")));
    let now = clients_running(&mut admin, "ping").await;
    assert!(
        now.iter().all(|id| !pooled.contains(id)),
        "only new connections remain: {now:?} vs killed {pooled:?}"
    );
}

#[tokio::test]
async fn a_cancelled_request_never_leaves_its_reply_for_the_next() {
    let pool = pool(1);
    let key = format!("{}slow", unique_prefix("resp_cancel"));
    // A request cancelled while Redis is blocked in it (BLPOP 0.3 s), then
    // another on the only connection slot: it must get its own reply.
    let mut slow = Commands::new();
    slow.push("BLPOP", &[&key, "0.3"]);
    let cancelled = tokio::time::timeout(Duration::from_millis(50), pool.query(&slow)).await;
    assert!(cancelled.is_err(), "the deadline cut the request");
    let mut echo = Commands::new();
    echo.push("ECHO", &["mine"]);
    let replies = pool.query(&echo).await.unwrap();
    assert_eq!(replies.get(0), Some(Reply::Bulk(b"mine")));
}

#[tokio::test]
async fn the_connection_limit_queues_requests() {
    let pool = Arc::new(pool(2));
    let key = format!("{}queue", unique_prefix("resp_limit"));
    let mut slow = Commands::new();
    slow.push("BLPOP", &[&key, "0.2"]);
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let (pool, slow) = (pool.clone(), slow.clone());
            tokio::spawn(async move {
                pool.query(&slow)
                    .await
                    .map(|r| r.get(0) == Some(Reply::Nil))
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap().unwrap(), "BLPOP timed out with nil");
    }
    // 4 requests of 0.2 s over 2 connections: two rounds.
    assert!(
        started.elapsed() >= Duration::from_millis(390),
        "{:?}",
        started.elapsed()
    );
}

/// Runs `n` overlapping requests (each holds its own connection while Redis
/// blocks it for 0.1 s), then `commands` on each task; whether all succeeded.
async fn overlapping(pool: &Arc<RespPool>, commands: &Commands, n: usize) -> bool {
    let mut slow = Commands::new();
    slow.push("BLPOP", &["resp-pool-test-never-pushed", "0.1"]);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (pool, slow, commands) = (pool.clone(), slow.clone(), commands.clone());
            tokio::spawn(async move {
                pool.query(&slow).await.is_ok() && pool.query(&commands).await.is_ok()
            })
        })
        .collect();
    let mut ok = true;
    for t in tasks {
        ok &= t.await.unwrap();
    }
    ok
}
