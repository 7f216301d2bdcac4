//! The writer thread of a sink: applies jobs to Redis in order, retrying
//! each with exponential backoff until it succeeds, so a Redis outage
//! stalls the sink (and the frontier) but drops nothing.

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use timely::scheduling::SyncActivator;

use super::{connect, load_function, RedisSinkConfig, RowWrite, SinkMetrics, FUNCTION};

/// Work for the writer.
#[derive(Debug)]
pub(crate) enum Job {
    /// Rows as of `frontier`, optionally with the progress record (JSON of
    /// the partitions) written in the last call of the batch.
    Apply {
        frontier: u64,
        rows: Vec<RowWrite>,
        progress: Option<String>,
    },
}

/// A finished job.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Done {
    pub frontier: u64,
    pub written: u64,
    pub deleted: u64,
    pub skipped: u64,
    pub progressed: bool,
}

/// Handle to a writer thread; dropping it ends the thread.
pub(crate) struct Writer {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
}

impl Writer {
    pub(crate) fn spawn(
        name: String,
        config: RedisSinkConfig,
        metrics: SinkMetrics,
        activator: SyncActivator,
    ) -> Writer {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(config, metrics, jobs_rx, done_tx, activator))
            .expect("spawning a thread succeeds unless the process is out of resources");
        Writer {
            jobs: Some(jobs_tx),
            done: done_rx,
            thread: Some(thread),
            in_flight: 0,
        }
    }

    pub(crate) fn send(&mut self, job: Job) {
        self.in_flight += 1;
        if let Some(jobs) = &self.jobs {
            // The thread only ends when this handle drops.
            let _ = jobs.send(job);
        }
    }

    pub(crate) fn try_done(&mut self) -> Option<Done> {
        match self.done.try_recv() {
            Ok(done) => {
                self.in_flight -= 1;
                Some(done)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }

    pub(crate) fn idle(&self) -> bool {
        self.in_flight == 0
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    config: RedisSinkConfig,
    metrics: SinkMetrics,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    activator: SyncActivator,
) {
    let mut conn: Option<::redis::Connection> = None;
    let progress_key = config.progress_key();
    let tombstone_key = config.tombstone_key();
    let fv = config.feature_set_version.to_string();
    while let Ok(Job::Apply {
        frontier,
        rows,
        progress,
    }) = jobs.recv()
    {
        let started = Instant::now();
        let calls = build_calls(
            &config,
            &progress_key,
            &tombstone_key,
            &fv,
            frontier,
            &rows,
            progress.as_deref(),
        );
        let mut backoff = Duration::from_millis(config.backoff_initial_ms.max(1));
        let mut result = Done {
            frontier,
            written: 0,
            deleted: 0,
            skipped: 0,
            progressed: false,
        };
        let mut next_call = 0;
        while next_call < calls.len() {
            let attempt = (|| -> Result<Vec<Vec<i64>>, super::SinkError> {
                if conn.is_none() {
                    let mut c = connect(&config)?;
                    load_function(&mut c)?;
                    conn = Some(c);
                }
                let c = conn.as_mut().expect("connected above");
                let end = (next_call + config.calls_per_round_trip.max(1)).min(calls.len());
                let mut pipe = ::redis::pipe();
                for call in &calls[next_call..end] {
                    pipe.add_command(call.clone());
                }
                Ok(pipe.query(c)?)
            })();
            match attempt {
                Ok(replies) => {
                    for reply in &replies {
                        result.written += reply.first().copied().unwrap_or(0) as u64;
                        result.deleted += reply.get(1).copied().unwrap_or(0) as u64;
                        result.skipped += reply.get(2).copied().unwrap_or(0) as u64;
                        result.progressed |= reply.get(3).copied().unwrap_or(0) == 1;
                    }
                    next_call += replies.len();
                    metrics.stalled.set(0);
                    backoff = Duration::from_millis(config.backoff_initial_ms.max(1));
                }
                Err(error) => {
                    // Calls are idempotent (compare-and-set), so retrying a
                    // round trip that partly applied is safe.
                    metrics.redis_errors.inc();
                    metrics.stalled.set(1);
                    tracing::warn!(%error, frontier, retry_in_ms = backoff.as_millis() as u64, "redis write failed, retrying");
                    conn = None;
                    std::thread::sleep(backoff);
                    backoff =
                        (backoff * 2).min(Duration::from_millis(config.backoff_max_ms.max(1)));
                }
            }
        }
        metrics.rows_written.inc_by(result.written);
        metrics.rows_deleted.inc_by(result.deleted);
        metrics.rows_skipped.inc_by(result.skipped);
        if !rows.is_empty() {
            metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.batch_rows.observe(rows.len() as f64);
        }
        if done.send(result).is_err() {
            return;
        }
        let _ = activator.activate();
    }
}

/// The `FCALL`s of one job: rows in chunks, the progress record (if any)
/// with the last chunk, so a batch that fits one call is one atomic step.
pub(crate) fn build_calls(
    config: &RedisSinkConfig,
    progress_key: &str,
    tombstone_key: &str,
    fv: &str,
    frontier: u64,
    rows: &[RowWrite],
    progress: Option<&str>,
) -> Vec<::redis::Cmd> {
    let per_call = config.rows_per_call.max(1);
    let chunks: Vec<&[RowWrite]> = if rows.is_empty() {
        vec![&[][..]]
    } else {
        rows.chunks(per_call).collect()
    };
    let last = chunks.len() - 1;
    let as_of = frontier.to_string();
    let mut key = String::new();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut cmd = ::redis::cmd("FCALL");
            cmd.arg(FUNCTION)
                .arg(chunk.len() + 2)
                .arg(progress_key)
                .arg(tombstone_key);
            for row in chunk {
                key.clear();
                key.push_str(&config.key_prefix);
                key.push_str(row.entity().as_str());
                key.push(':');
                key.push_str(&row.id);
                cmd.arg(key.as_str());
            }
            cmd.arg(as_of.as_str()).arg(fv);
            match progress.filter(|_| i == last) {
                Some(json) => cmd.arg(as_of.as_str()).arg(json),
                None => cmd.arg("").arg(""),
            };
            for row in chunk {
                match &row.values {
                    None => {
                        cmd.arg(0);
                    }
                    Some(values) => {
                        let specs = row.entity().features();
                        cmd.arg(values.len());
                        for spec in specs.iter().take(values.len()) {
                            cmd.arg(spec.name);
                        }
                        for value in values {
                            cmd.arg(value.as_str());
                        }
                    }
                }
            }
            cmd
        })
        .collect()
}
