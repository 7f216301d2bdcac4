//! The writer thread of a sink: applies jobs to Redis in order, retrying
//! each with exponential backoff until it succeeds, so a Redis outage
//! stalls the sink (and the frontier) but drops nothing.

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use schemas::resp;
use timely::scheduling::SyncActivator;

use super::{
    connect, encode_value, load_function, RedisSinkConfig, RowWrite, SinkError, SinkMetrics,
};

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
    let fv = config.features.version.clone();
    let mut calls = Calls::default();
    while let Ok(Job::Apply {
        frontier,
        rows,
        progress,
    }) = jobs.recv()
    {
        let started = Instant::now();
        calls.build(
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
            let attempt = (|| -> Result<Vec<[u64; 4]>, super::SinkError> {
                if conn.is_none() {
                    let mut c = connect(&config)?;
                    load_function(&mut c)?;
                    conn = Some(c);
                }
                let c = conn.as_mut().expect("connected above");
                let end = (next_call + config.calls_per_round_trip.max(1)).min(calls.len());
                calls.send(c, next_call..end)
            })();
            match attempt {
                Ok(replies) => {
                    for reply in &replies {
                        result.written += reply[0];
                        result.deleted += reply[1];
                        result.skipped += reply[2];
                        result.progressed |= reply[3] == 1;
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
        // Free the batch before reporting, off the worker thread.
        drop(rows);
        if done.send(result).is_err() {
            return;
        }
        let _ = activator.activate();
    }
}

/// The `FCALL`s of one job, packed as RESP in one reusable buffer: rows in
/// chunks of `rows_per_call`, the progress record (if any) with the last
/// chunk, so a batch that fits one call is one atomic step.
///
/// Layout of one call (see `function.lua`): the keys; `as_of`, `fv`, the
/// progress frontier and JSON (or two empty strings); the field-name lists
/// used by the call's rows (`s`, then per list its length `m` and `m` names);
/// then per row the 1-based list index (0: delete) and its `m` values.
#[derive(Debug, Default)]
pub(crate) struct Calls {
    buf: Vec<u8>,
    /// End offset in `buf` of each call.
    ends: Vec<usize>,
    scratch: Vec<u8>,
    /// Field-name lists of the current call: (entity index, width).
    schemas: Vec<(u8, usize)>,
    row_schema: Vec<usize>,
}

impl Calls {
    pub(crate) fn len(&self) -> usize {
        self.ends.len()
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build(
        &mut self,
        config: &RedisSinkConfig,
        progress_key: &str,
        tombstone_key: &str,
        fv: &str,
        frontier: u64,
        rows: &[RowWrite],
        progress: Option<&str>,
    ) {
        self.buf.clear();
        self.ends.clear();
        let per_call = config.rows_per_call.max(1);
        let chunks: Vec<&[RowWrite]> = if rows.is_empty() {
            vec![&[][..]]
        } else {
            rows.chunks(per_call).collect()
        };
        let last = chunks.len() - 1;
        let mut as_of = itoa::Buffer::new();
        let as_of = as_of.format(frontier).as_bytes().to_vec();
        for (i, chunk) in chunks.into_iter().enumerate() {
            // Field-name lists and argument count first (RESP is length-prefixed).
            self.schemas.clear();
            self.row_schema.clear();
            let mut values = 0;
            for row in chunk {
                let index = match &row.values {
                    None => 0,
                    Some(v) => {
                        values += v.len();
                        let schema = (row.entity, v.len());
                        match self.schemas.iter().position(|s| *s == schema) {
                            Some(p) => p + 1,
                            None => {
                                self.schemas.push(schema);
                                self.schemas.len()
                            }
                        }
                    }
                };
                self.row_schema.push(index);
            }
            let names: usize = self.schemas.iter().map(|(_, m)| 1 + m).sum();
            let args = 3 + (2 + chunk.len()) + 4 + 1 + names + chunk.len() + values;
            resp::header(&mut self.buf, b'*', args);
            resp::bulk(&mut self.buf, b"FCALL");
            resp::bulk(&mut self.buf, super::FUNCTION.as_bytes());
            self.bulk_int((chunk.len() + 2) as u64);
            resp::bulk(&mut self.buf, progress_key.as_bytes());
            resp::bulk(&mut self.buf, tombstone_key.as_bytes());
            for row in chunk {
                let entity = &config.features.entities[row.entity as usize];
                resp::bulk_parts(
                    &mut self.buf,
                    &entity.redis_key_parts(&config.key_prefix, &row.id),
                );
            }
            resp::bulk(&mut self.buf, &as_of);
            resp::bulk(&mut self.buf, fv.as_bytes());
            match progress.filter(|_| i == last) {
                Some(json) => {
                    resp::bulk(&mut self.buf, &as_of);
                    resp::bulk(&mut self.buf, json.as_bytes());
                }
                None => {
                    resp::bulk(&mut self.buf, b"");
                    resp::bulk(&mut self.buf, b"");
                }
            }
            self.bulk_int(self.schemas.len() as u64);
            for s in 0..self.schemas.len() {
                let (entity, width) = self.schemas[s];
                self.bulk_int(width as u64);
                for spec in config.features.entities[entity as usize]
                    .features
                    .iter()
                    .take(width)
                {
                    resp::bulk(&mut self.buf, spec.name.as_bytes());
                }
            }
            for (row, index) in chunk.iter().zip(0..) {
                self.bulk_int(self.row_schema[index] as u64);
                for value in row.values.iter().flat_map(|v| v.iter()) {
                    self.scratch.clear();
                    encode_value(*value, &mut self.scratch);
                    resp::bulk(&mut self.buf, &self.scratch);
                }
            }
            self.ends.push(self.buf.len());
        }
    }

    fn bulk_int(&mut self, n: u64) {
        resp::bulk(&mut self.buf, itoa::Buffer::new().format(n).as_bytes());
    }

    /// Sends calls `range` in one round trip; their replies
    /// `[written, deleted, skipped, progressed]`.
    pub(crate) fn send(
        &self,
        conn: &mut ::redis::Connection,
        range: std::ops::Range<usize>,
    ) -> Result<Vec<[u64; 4]>, SinkError> {
        use ::redis::ConnectionLike;
        let start = if range.start == 0 {
            0
        } else {
            self.ends[range.start - 1]
        };
        let end = self.ends[range.end - 1];
        let replies = conn.req_packed_commands(&self.buf[start..end], 0, range.len())?;
        replies
            .into_iter()
            .map(|reply| match reply {
                ::redis::Value::Array(items) if items.len() == 4 => {
                    let mut out = [0u64; 4];
                    for (o, item) in out.iter_mut().zip(items) {
                        match item {
                            ::redis::Value::Int(n) => *o = n.max(0) as u64,
                            other => return Err(SinkError::Reply(format!("{other:?}"))),
                        }
                    }
                    Ok(out)
                }
                ::redis::Value::ServerError(e) => Err(SinkError::Reply(e.to_string())),
                other => Err(SinkError::Reply(format!("{other:?}"))),
            })
            .collect()
    }
}
