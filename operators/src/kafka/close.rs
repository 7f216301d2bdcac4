//! Kafka clients are closed on a thread of their own.
//!
//! Dropping an rdkafka consumer that has a `group.id` closes it: librdkafka
//! stops its fetchers and terminates its group handle, and rust-rdkafka
//! polls until that is done, with no time limit. librdkafka's issues report
//! that close hanging for good in rare states (after broker restarts, with
//! paused partitions: a bounded source pauses its finished ones). A worker
//! dropping its clients inline waited with it and held the whole job: in CI
//! a bounded job never returned, and a draining job overran its forced-exit
//! deadline after a broker restart. The job owes a closing
//! client nothing (the durable offsets are in Redis and were committed
//! before), so it hands the client to a closer thread and moves on. A
//! command about to exit gives the closes a bounded time to end
//! ([`wait_for_closes`]): a close that ends sends the last offset commit
//! and leaves cleanly; one that does not is abandoned with the process.

use std::ops::{Deref, DerefMut};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A close that takes longer than this is logged as a warning when it ends.
const SLOW_CLOSE: Duration = Duration::from_secs(5);

/// Closes under way in this process, and a signal when one ends.
static PENDING: (Mutex<usize>, Condvar) = (Mutex::new(0), Condvar::new());

fn pending() -> std::sync::MutexGuard<'static, usize> {
    PENDING
        .0
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One close has ended.
fn ended() {
    *pending() -= 1;
    PENDING.1.notify_all();
}

/// Waits until every close begun in this process has ended, at most
/// `limit`; returns whether they all did.
pub fn wait_for_closes(limit: Duration) -> bool {
    let (left, _) = PENDING
        .1
        .wait_timeout_while(pending(), limit, |n| *n > 0)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if *left > 0 {
        tracing::warn!(
            closes = *left,
            waited_ms = limit.as_millis() as u64,
            "kafka clients still closing: exiting without them"
        );
    }
    *left == 0
}

/// Owns a Kafka client and drops it on a closer thread.
#[derive(Debug)]
pub struct Detached<T: Send + 'static> {
    client: Option<T>,
    what: &'static str,
}

impl<T: Send + 'static> Detached<T> {
    /// `what` names the client in the closer's logs.
    pub fn new(client: T, what: &'static str) -> Self {
        Detached {
            client: Some(client),
            what,
        }
    }
}

impl<T: Send + 'static> Deref for Detached<T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.client.as_ref().expect("present until dropped")
    }
}

impl<T: Send + 'static> DerefMut for Detached<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.client.as_mut().expect("present until dropped")
    }
}

impl<T: Send + 'static> Drop for Detached<T> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        let what = self.what;
        *pending() += 1;
        let close = move || {
            let start = Instant::now();
            drop(client);
            ended();
            start.elapsed()
        };
        let spawned = std::thread::Builder::new()
            .name("sfs-kafka-close".into())
            .spawn(move || {
                let elapsed = close();
                if elapsed >= SLOW_CLOSE {
                    tracing::warn!(
                        client = what,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "kafka client was slow to close"
                    );
                } else {
                    tracing::debug!(
                        client = what,
                        elapsed_ms = elapsed.as_millis() as u64,
                        "kafka client closed"
                    );
                }
            });
        if spawned.is_err() {
            // The closure, and the client in it, was dropped on this thread
            // (the old behaviour): that close has ended.
            ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Its drop blocks until `release` is sent (at most 5 s), then reports on `dropped`.
    struct StuckClient {
        release: mpsc::Receiver<()>,
        dropped: mpsc::Sender<std::thread::ThreadId>,
    }

    impl Drop for StuckClient {
        fn drop(&mut self) {
            let _ = self.release.recv_timeout(Duration::from_secs(5));
            let _ = self.dropped.send(std::thread::current().id());
        }
    }

    #[test]
    fn a_client_whose_close_blocks_does_not_block_its_owner() {
        let (release_tx, release) = mpsc::channel();
        let (dropped, dropped_rx) = mpsc::channel();
        let owner = Detached::new(StuckClient { release, dropped }, "stuck");
        // Dropped inline, this would wait 5 s for a release that only comes
        // after it, and report as closed before the release.
        drop(owner);
        assert!(
            dropped_rx.try_recv().is_err(),
            "not closed before the release"
        );
        assert!(
            !wait_for_closes(Duration::from_millis(50)),
            "a close that has not ended is waited for"
        );
        release_tx.send(()).unwrap();
        assert!(
            wait_for_closes(Duration::from_secs(10)),
            "every close ends once released"
        );
        let closer = dropped_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the client is closed once its close can finish");
        assert_ne!(
            closer,
            std::thread::current().id(),
            "closed on another thread"
        );
    }

    #[test]
    fn the_client_is_reachable_through_its_owner() {
        let mut owner = Detached::new(vec![1, 2], "vec");
        owner.push(3);
        assert_eq!(owner.len(), 3);
    }
}
