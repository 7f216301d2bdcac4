//! The read path's Redis client against a real Redis: database selection
//! from the URL, large replies, many concurrent requests over one connection,
//! a connection killed under it (Redis restarts), cancelled requests.
//! Checked with redis-rs, an independent client. Each test uses a database
//! of its own, so connections can be told apart in `CLIENT LIST`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use redis::AsyncCommands;
use server::resp::{Commands, Reply, RespClient};

fn url_with_db(db: u8) -> String {
    format!("{}/{db}", redis_url().trim_end_matches('/'))
}

fn client(db: u8) -> RespClient {
    RespClient::new(&url_with_db(db), Duration::from_millis(500)).expect("valid url")
}

/// Ids of the connections open to database `db`.
async fn connections(db: u8) -> Vec<String> {
    let mut admin = redis(&redis_url()).await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut admin)
        .await
        .unwrap();
    list.lines()
        .filter(|l| l.contains(&format!(" db={db} ")))
        .filter_map(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("id="))
                .map(String::from)
        })
        .collect()
}

fn ping() -> Commands {
    let mut ping = Commands::new();
    ping.push("PING", &[]);
    ping
}

#[tokio::test]
async fn reads_the_database_of_the_url_in_place() {
    const DB: u8 = 7;
    let key = format!("{}hash", unique_prefix("resp_db"));
    let mut conn = redis(&url_with_db(DB)).await;
    // 2,000 fields of 1 kB: a reply far larger than one read.
    let value = "v".repeat(1000);
    let fields: Vec<(String, String)> = (0..2000)
        .map(|i| (format!("f{i}"), format!("{i}{value}")))
        .collect();
    let _: () = conn.hset_multiple(&key, &fields).await.unwrap();
    let _: () = conn.expire(&key, 60).await.unwrap();

    let client = client(DB);
    let mut commands = Commands::new();
    commands.start("HMGET", 3);
    commands.arg(key.as_bytes());
    commands.arg(b"f1999");
    commands.arg(b"absent");
    commands.start("HGETALL", 1);
    commands.arg(key.as_bytes());
    commands.push("GET", &["no-such-key-in-db-7"]);
    let replies = client.query(&commands).await.unwrap();
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
    let all: Vec<Reply> = all.collect();
    assert_eq!(all.len(), 4000);
    let read: std::collections::HashMap<String, String> = all
        .chunks(2)
        .map(|kv| {
            (
                kv[0].as_str().unwrap().to_owned(),
                kv[1].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(read, fields.into_iter().collect());
    assert_eq!(replies.get(2), Some(Reply::Nil));
    // The same key does not exist in database 0.
    let mut db0 = redis(&redis_url()).await;
    let exists: bool = db0.exists(&key).await.unwrap();
    assert!(!exists, "the client read database {DB}, not 0");
}

/// Many requests at once, of different sizes: each gets exactly its own
/// replies, over a single connection.
#[tokio::test]
async fn concurrent_requests_share_one_connection_and_get_their_own_replies() {
    const DB: u8 = 8;
    let client = Arc::new(client(DB));
    let tasks: Vec<_> = (0..300)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut commands = Commands::new();
                let words: Vec<String> = (0..i % 7 + 1)
                    .map(|j| format!("{i}-{j}-{}", "x".repeat(i * 13 % 5000)))
                    .collect();
                for w in &words {
                    commands.push("ECHO", &[w]);
                }
                let replies = client.query(&commands).await.unwrap();
                assert_eq!(replies.len(), words.len());
                for (k, w) in words.iter().enumerate() {
                    assert_eq!(replies.get(k).and_then(|r| r.as_str()), Some(w.as_str()));
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        connections(DB).await.len(),
        1,
        "one connection for all requests"
    );
}

#[tokio::test]
async fn a_killed_connection_is_replaced_and_the_request_retried() {
    const DB: u8 = 9;
    let client = client(DB);
    client.query(&ping()).await.unwrap();
    let before = connections(DB).await;
    assert_eq!(before.len(), 1);
    // Kill it, as a Redis restart would.
    let mut admin = redis(&redis_url()).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&before[0])
        .query_async(&mut admin)
        .await
        .unwrap();
    assert_eq!(killed, 1, "the connection was killed");
    // The next request fails on the dead connection, reconnects and is
    // retried there.
    let replies = client
        .query(&ping())
        .await
        .expect("retried on a new connection");
    assert_eq!(replies.get(0), Some(Reply::Simple(b"PONG")));
    let after = connections(DB).await;
    assert_eq!(after.len(), 1);
    assert_ne!(after, before, "a new connection");
}

#[tokio::test]
async fn a_cancelled_request_never_leaves_its_reply_for_the_next() {
    const DB: u8 = 10;
    let client = client(DB);
    let key = format!("{}slow", unique_prefix("resp_cancel"));
    // A request cancelled while Redis is blocked in it (BLPOP 0.3 s), then
    // another on the same connection: it must get its own reply.
    let mut slow = Commands::new();
    slow.push("BLPOP", &[&key, "0.3"]);
    let cancelled = tokio::time::timeout(Duration::from_millis(50), client.query(&slow)).await;
    assert!(cancelled.is_err(), "the deadline cut the request");
    let mut echo = Commands::new();
    echo.push("ECHO", &["mine"]);
    let replies = client.query(&echo).await.unwrap();
    assert_eq!(replies.get(0), Some(Reply::Bulk(b"mine")));
    assert_eq!(connections(DB).await.len(), 1, "the connection was kept");
}
