//! The writer thread of a sink: applies jobs to Redis in order, retrying
//! each with exponential backoff until it succeeds, so a Redis outage
//! stalls the sink (and the frontier) but drops nothing.

use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use schemas::resp;
use timely::scheduling::SyncActivator;

use schemas::Value;

use super::{
    connect, encode_value, load_function, Applied, Ownership, RedisSinkConfig, RowWrite, SinkError,
    SinkMetrics,
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
    pub applied: Applied,
}

/// Handle to a writer thread; dropping it ends the thread.
pub(crate) struct Writer {
    jobs: Option<Sender<Job>>,
    done: Receiver<Done>,
    thread: Option<JoinHandle<()>>,
    in_flight: usize,
}

impl Writer {
    /// A writer over a prefix whose write ceiling was `ceiling` at start
    /// (`u64::MAX`: every batch through the compare-and-set function).
    pub(crate) fn spawn(
        name: String,
        config: RedisSinkConfig,
        ceiling: u64,
        metrics: SinkMetrics,
        activator: SyncActivator,
    ) -> Writer {
        let (jobs_tx, jobs_rx) = channel::<Job>();
        let (done_tx, done_rx) = channel::<Done>();
        let ownership = Ownership::new(ceiling);
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(config, ownership, metrics, jobs_rx, done_tx, activator))
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
    mut ownership: Ownership,
    metrics: SinkMetrics,
    jobs: Receiver<Job>,
    done: Sender<Done>,
    activator: SyncActivator,
) {
    let mut conn: Option<::redis::Connection> = None;
    let mut calls = Calls::new(&config);
    while let Ok(Job::Apply {
        frontier,
        rows,
        progress,
    }) = jobs.recv()
    {
        let started = Instant::now();
        let build = |calls: &mut Calls, ownership: &mut Ownership| {
            calls.build(&config, ownership, frontier, &rows, progress.as_deref())
        };
        build(&mut calls, &mut ownership);
        let mut backoff = Duration::from_millis(config.backoff_initial_ms.max(1));
        let mut applied = Applied::default();
        let mut next_call = 0;
        while next_call < calls.len() {
            let attempt = (|| -> Result<usize, super::SinkError> {
                if conn.is_none() {
                    let mut c = connect(&config)?;
                    load_function(&mut c)?;
                    conn = Some(c);
                }
                let c = conn.as_mut().expect("connected above");
                let end = (next_call + config.calls_per_round_trip.max(1)).min(calls.len());
                calls.send(c, next_call..end, &mut applied)?;
                Ok(end)
            })();
            match attempt {
                Ok(end) => {
                    next_call = end;
                    metrics.stalled.set(0);
                    backoff = Duration::from_millis(config.backoff_initial_ms.max(1));
                }
                Err(error) => {
                    // Redis may have restarted and lost its last writes: forget
                    // what it holds and write the whole batch again, whole rows.
                    // Every call is idempotent (compare-and-set, or the same
                    // values at the same `_as_of`).
                    metrics.redis_errors.inc();
                    metrics.stalled.set(1);
                    tracing::warn!(%error, frontier, retry_in_ms = backoff.as_millis() as u64, "redis write failed, retrying");
                    conn = None;
                    ownership.forget();
                    build(&mut calls, &mut ownership);
                    applied = Applied::default();
                    next_call = 0;
                    std::thread::sleep(backoff);
                    backoff =
                        (backoff * 2).min(Duration::from_millis(config.backoff_max_ms.max(1)));
                }
            }
        }
        metrics.rows_written.inc_by(applied.written);
        metrics.rows_deleted.inc_by(applied.deleted);
        metrics.rows_skipped.inc_by(applied.skipped);
        metrics.rows_direct.inc_by(applied.direct);
        metrics.rows_partial.inc_by(applied.partial);
        if !rows.is_empty() {
            metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            metrics.batch_rows.observe(rows.len() as f64);
        }
        // Free the batch before reporting, off the worker thread.
        drop(rows);
        if done.send(Done { frontier, applied }).is_err() {
            return;
        }
        let _ = activator.activate();
    }
}

/// The commands of one job, packed as RESP in one reusable buffer, in
/// units of at most `rows_per_call` rows. A unit is either one `FCALL` of the
/// compare-and-set function (at or below the write ceiling; the progress
/// record, if any, rides with the last unit, so a batch that fits one call is
/// one atomic step), or, above the ceiling, one `FCALL` without rows that
/// raises the ceiling followed by the rows' plain commands.
///
/// Layout of one `FCALL` (see `function.lua`): the keys; `as_of`, `fv`, the
/// progress frontier and JSON (or two empty strings); the field-name lists
/// used by the call's rows (`s`, then per list its length `m` and `m` names);
/// then per row the 1-based list index (0: delete) and its `m` values.
#[derive(Debug)]
pub(crate) struct Calls {
    /// The progress hash and tombstone set of the prefix, formatted once.
    progress_key: String,
    tombstone_key: String,
    buf: Vec<u8>,
    units: Vec<Unit>,
    scratch: Vec<u8>,
    /// Field-name lists of the current call: (entity index, width).
    schemas: Vec<(u8, usize)>,
    row_schema: Vec<usize>,
    /// Indexes of the fields a partial write sends.
    changed: Vec<usize>,
}

/// One unit of [`Calls`]: where it ends in the buffer and what its replies mean.
#[derive(Debug, Clone, Copy)]
struct Unit {
    end: usize,
    /// Replies: 1 for an `FCALL`; 1 + the commands of its rows when direct.
    replies: usize,
    /// For a direct unit, what it does (known when built).
    direct: Option<Applied>,
}

impl Calls {
    pub(crate) fn new(config: &RedisSinkConfig) -> Calls {
        Calls {
            progress_key: config.progress_key(),
            tombstone_key: config.tombstone_key(),
            buf: Vec::new(),
            units: Vec::new(),
            scratch: Vec::new(),
            schemas: Vec::new(),
            row_schema: Vec::new(),
            changed: Vec::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.units.len()
    }

    /// Builds the units of `rows` at `frontier`, and records in `ownership`
    /// the rows they leave in Redis exactly as written.
    pub(crate) fn build(
        &mut self,
        config: &RedisSinkConfig,
        ownership: &mut Ownership,
        frontier: u64,
        rows: &[RowWrite],
        progress: Option<&str>,
    ) {
        self.buf.clear();
        self.units.clear();
        let per_call = config.rows_per_call.max(1);
        let mut as_of = itoa::Buffer::new();
        let as_of = as_of.format(frontier).as_bytes().to_vec();
        if ownership.direct(frontier) {
            for chunk in rows.chunks(per_call) {
                self.function_call(config, &as_of, &[], None);
                let mut unit = Applied::default();
                let mut replies = 1;
                for row in chunk {
                    replies += self.direct_row(config, ownership, &as_of, row, &mut unit);
                }
                self.units.push(Unit {
                    end: self.buf.len(),
                    replies,
                    direct: Some(unit),
                });
            }
            if let Some(json) = progress {
                self.function_call(config, &as_of, &[], Some(json));
                self.push_call();
            }
            return;
        }
        let chunks: Vec<&[RowWrite]> = if rows.is_empty() {
            vec![&[][..]]
        } else {
            rows.chunks(per_call).collect()
        };
        let last = chunks.len() - 1;
        for (i, chunk) in chunks.into_iter().enumerate() {
            self.function_call(config, &as_of, chunk, progress.filter(|_| i == last));
            self.push_call();
        }
    }

    fn push_call(&mut self) {
        self.units.push(Unit {
            end: self.buf.len(),
            replies: 1,
            direct: None,
        });
    }

    /// Appends one `FCALL` of the compare-and-set function over `chunk`.
    fn function_call(
        &mut self,
        config: &RedisSinkConfig,
        as_of: &[u8],
        chunk: &[RowWrite],
        progress: Option<&str>,
    ) {
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
        resp::bulk(&mut self.buf, self.progress_key.as_bytes());
        resp::bulk(&mut self.buf, self.tombstone_key.as_bytes());
        for row in chunk {
            self.row_key(config, row);
        }
        resp::bulk(&mut self.buf, as_of);
        resp::bulk(&mut self.buf, config.features.version.as_bytes());
        match progress {
            Some(json) => {
                resp::bulk(&mut self.buf, as_of);
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
                self.value(*value);
            }
        }
    }

    /// Appends one row's plain commands (above the write ceiling); returns
    /// how many. A row this process owns, with its old values known, sends
    /// only the fields that differ from them; any other row replaces what is
    /// stored (another feature set's fields included); a deletion leaves a
    /// tombstone, as the function's would.
    fn direct_row(
        &mut self,
        config: &RedisSinkConfig,
        ownership: &mut Ownership,
        as_of: &[u8],
        row: &RowWrite,
        unit: &mut Applied,
    ) -> usize {
        let key = (row.entity, row.id.clone());
        let names = &config.features.entities[row.entity as usize].features;
        unit.direct += 1;
        let Some(values) = &row.values else {
            ownership.release(&key);
            self.command(config, b"DEL", row, 2);
            resp::header(&mut self.buf, b'*', 4);
            resp::bulk(&mut self.buf, b"ZADD");
            resp::bulk(&mut self.buf, self.tombstone_key.as_bytes());
            resp::bulk(&mut self.buf, as_of);
            self.row_key(config, row);
            unit.deleted += 1;
            return 2;
        };
        unit.written += 1;
        self.changed.clear();
        let base = row
            .old
            .as_ref()
            .filter(|old| old.len() == values.len() && ownership.owns(&key));
        match base {
            Some(old) => {
                self.changed
                    .extend((0..values.len()).filter(|&i| !same(old[i], values[i])));
                unit.partial += 1;
                self.command(config, b"HSET", row, 2 + 2 * (self.changed.len() + 1));
                for c in 0..self.changed.len() {
                    let i = self.changed[c];
                    resp::bulk(&mut self.buf, names[i].name.as_bytes());
                    self.value(values[i]);
                }
                resp::bulk(&mut self.buf, b"_as_of");
                resp::bulk(&mut self.buf, as_of);
                1
            }
            None => {
                self.command(config, b"DEL", row, 2);
                self.command(config, b"HSET", row, 2 + 2 * (values.len() + 2));
                for (spec, value) in names.iter().zip(values.iter()) {
                    resp::bulk(&mut self.buf, spec.name.as_bytes());
                    self.value(*value);
                }
                resp::bulk(&mut self.buf, b"_as_of");
                resp::bulk(&mut self.buf, as_of);
                resp::bulk(&mut self.buf, b"_fv");
                resp::bulk(&mut self.buf, config.features.version.as_bytes());
                ownership.claim(key);
                2
            }
        }
    }

    /// Appends the header of a command of `args` arguments on the row's key:
    /// its name and the key.
    fn command(&mut self, config: &RedisSinkConfig, name: &[u8], row: &RowWrite, args: usize) {
        resp::header(&mut self.buf, b'*', args);
        resp::bulk(&mut self.buf, name);
        self.row_key(config, row);
    }

    fn row_key(&mut self, config: &RedisSinkConfig, row: &RowWrite) {
        let entity = &config.features.entities[row.entity as usize];
        resp::bulk_parts(
            &mut self.buf,
            &entity.redis_key_parts(&config.key_prefix, &row.id),
        );
    }

    fn value(&mut self, value: Value) {
        self.scratch.clear();
        encode_value(value, &mut self.scratch);
        resp::bulk(&mut self.buf, &self.scratch);
    }

    fn bulk_int(&mut self, n: u64) {
        resp::bulk(&mut self.buf, itoa::Buffer::new().format(n).as_bytes());
    }

    /// Sends units `range` in one round trip and adds what they did to `applied`.
    pub(crate) fn send(
        &self,
        conn: &mut ::redis::Connection,
        range: std::ops::Range<usize>,
        applied: &mut Applied,
    ) -> Result<(), SinkError> {
        use ::redis::ConnectionLike;
        let start = if range.start == 0 {
            0
        } else {
            self.units[range.start - 1].end
        };
        let units = &self.units[range];
        let end = units.last().map_or(start, |u| u.end);
        let count = units.iter().map(|u| u.replies).sum();
        let replies = conn.req_packed_commands(&self.buf[start..end], 0, count)?;
        let mut replies = replies.into_iter();
        for unit in units {
            let call = function_reply(replies.next())?;
            match unit.direct {
                None => {
                    applied.written += call[0];
                    applied.deleted += call[1];
                    applied.skipped += call[2];
                    applied.progressed |= call[3] == 1;
                }
                Some(direct) => {
                    for reply in replies.by_ref().take(unit.replies - 1) {
                        if let ::redis::Value::ServerError(e) = reply {
                            return Err(SinkError::Reply(e.to_string()));
                        }
                    }
                    applied.written += direct.written;
                    applied.deleted += direct.deleted;
                    applied.direct += direct.direct;
                    applied.partial += direct.partial;
                }
            }
        }
        Ok(())
    }
}

/// Whether two values encode the same (floats compared bit for bit).
fn same(a: Value, b: Value) -> bool {
    match (a, b) {
        (Value::Int(a), Value::Int(b)) => a == b,
        (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
        _ => false,
    }
}

/// The function's reply `[written, deleted, skipped, progressed]`.
fn function_reply(reply: Option<::redis::Value>) -> Result<[u64; 4], SinkError> {
    match reply {
        Some(::redis::Value::Array(items)) if items.len() == 4 => {
            let mut out = [0u64; 4];
            for (o, item) in out.iter_mut().zip(items) {
                match item {
                    ::redis::Value::Int(n) => *o = n.max(0) as u64,
                    other => return Err(SinkError::Reply(format!("{other:?}"))),
                }
            }
            Ok(out)
        }
        Some(::redis::Value::ServerError(e)) => Err(SinkError::Reply(e.to_string())),
        other => Err(SinkError::Reply(format!("{other:?}"))),
    }
}
