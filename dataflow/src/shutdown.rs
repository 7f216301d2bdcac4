//! Graceful stop of `sfs stream` on SIGTERM or Ctrl-C: the workers keep
//! stepping until worker 0 has recorded progress for every frontier the sinks
//! acknowledged, then drop the dataflow and the process exits 0. Work not yet
//! recorded is replayed on the next start, exactly as after a crash.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long the workers drain after the signal before they stop anyway.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// How long after the signal the process exits even if a sink is stuck
/// (Redis down): exit code [`EXIT_FORCED`].
pub const FORCE_EXIT_AFTER: Duration = Duration::from_millis(4_500);

/// How long a stopped job waits for its Kafka clients to close (so that the
/// last offset commit goes out) before it exits without them.
pub const CLOSE_WAIT: Duration = Duration::from_secs(1);

// A drain that ends at its limit still leaves the closes their time.
const _: () =
    assert!(DRAIN_LIMIT.as_millis() + CLOSE_WAIT.as_millis() < FORCE_EXIT_AFTER.as_millis());

/// Exit code when the drain did not finish in time.
pub const EXIT_FORCED: i32 = 3;

/// Shared between the signal handler and the workers of one process.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    requested: Arc<AtomicBool>,
    drained: Arc<AtomicBool>,
}

impl Shutdown {
    /// A stop has been asked for.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Asks the workers to drain and stop.
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Worker 0 has recorded the last acknowledged frontier.
    pub fn drained(&self) -> bool {
        self.drained.load(Ordering::SeqCst)
    }

    pub(crate) fn set_drained(&self) {
        self.drained.store(true, Ordering::SeqCst);
    }

    /// Installs the SIGTERM / Ctrl-C handler on its own thread. After the
    /// signal, a watchdog exits the process with [`EXIT_FORCED`] should the
    /// drain hang (a sink retrying against a Redis that is down).
    pub fn on_signal() -> std::io::Result<Shutdown> {
        let shutdown = Shutdown::default();
        let handler = shutdown.clone();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()?;
        std::thread::Builder::new()
            .name("sfs-signals".into())
            .spawn(move || {
                runtime.block_on(async {
                    let Ok(mut term) =
                        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    else {
                        tracing::warn!("cannot install a SIGTERM handler: SIGTERM kills the job");
                        return;
                    };
                    tokio::select! {
                        _ = term.recv() => tracing::info!("SIGTERM received: draining"),
                        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received: draining"),
                    }
                });
                handler.request();
                std::thread::sleep(FORCE_EXIT_AFTER);
                tracing::error!(
                    after_ms = FORCE_EXIT_AFTER.as_millis() as u64,
                    "drain did not finish (is Redis reachable?): exiting; unrecorded work replays on the next start"
                );
                std::process::exit(EXIT_FORCED);
            })?;
        Ok(shutdown)
    }
}
