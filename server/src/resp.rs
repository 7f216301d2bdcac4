//! The read path's Redis client: many concurrent requests over one
//! connection. Each request's commands are encoded into one buffer; a writer
//! task writes all the requests waiting at that moment in one write
//! (pipelining across requests, as redis-rs's multiplexed connection does),
//! and a reader task parses the replies in place, bulk strings as ranges of
//! the read buffer (no allocation per value), handing each request its own
//! in order.
//!
//! Why not redis-rs: on 100-row Feast batches its combinator parser and one
//! `Vec` per bulk string took about 30% of the server's CPU (perf under
//! `bench/feast`), and the batch tail is CPU on 2 shared cores.
//!
//! Failure contract: a request dropped before its replies arrive (the
//! caller's deadline) leaves the connection in order: its replies are read
//! and discarded. An I/O error closes the connection and fails every request
//! waiting on it; the next request reconnects, and a request that failed on a
//! connection opened before it (Redis restarted) is retried once on a new
//! one: reads are idempotent.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use schemas::resp;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Errors of a round trip.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    #[error("redis i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("redis connect timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("redis protocol: {0}")]
    Protocol(String),
    /// An error reply where the caller needed success (connection setup).
    #[error("redis replied: {0}")]
    Reply(String),
    #[error("redis url: {0}")]
    Url(String),
}

/// Commands to send in one write, encoded as RESP arrays of bulk strings.
#[derive(Debug, Default, Clone)]
pub struct Commands {
    buf: Vec<u8>,
    count: usize,
}

impl Commands {
    pub fn new() -> Commands {
        Commands::default()
    }

    /// Appends a command of `name` and `args`.
    pub fn push(&mut self, name: &str, args: &[&str]) {
        self.start(name, args.len());
        args.iter().for_each(|arg| self.arg(arg.as_bytes()));
    }

    /// Starts a command of `name` with `args` arguments, to be appended next
    /// with [`Commands::arg`].
    pub fn start(&mut self, name: &str, args: usize) {
        resp::header(&mut self.buf, b'*', 1 + args);
        resp::bulk(&mut self.buf, name.as_bytes());
        self.count += 1;
    }

    /// Appends an argument of the command started last.
    pub fn arg(&mut self, arg: &[u8]) {
        resp::bulk(&mut self.buf, arg);
    }

    /// Appends an argument made of `parts` concatenated.
    pub fn arg_parts(&mut self, parts: &[&[u8]]) {
        resp::bulk_parts(&mut self.buf, parts);
    }

    /// Number of commands (= replies expected).
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

/// One parsed value; strings are ranges of the reply buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    Simple(Range<usize>),
    Error(Range<usize>),
    Int(i64),
    Bulk(Range<usize>),
    Nil,
    /// Number of elements and the index just past the array's subtree (the
    /// elements follow it in pre-order).
    Array {
        len: usize,
        end: usize,
    },
}

/// A reply, borrowing the buffer it was parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    Simple(&'a [u8]),
    Error(&'a [u8]),
    Int(i64),
    Bulk(&'a [u8]),
    Nil,
    Array(Items<'a>),
}

impl<'a> Reply<'a> {
    /// The text of a bulk or simple string (`None` for other replies and
    /// invalid UTF-8).
    pub fn as_str(&self) -> Option<&'a str> {
        match self {
            Reply::Bulk(b) | Reply::Simple(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

/// The elements of an array reply.
#[derive(Debug, Clone, Copy)]
pub struct Items<'a> {
    replies: &'a Replies,
    next: usize,
    left: usize,
}

impl<'a> Iterator for Items<'a> {
    type Item = Reply<'a>;
    fn next(&mut self) -> Option<Reply<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let at = self.next;
        self.next = match self.replies.frames[at] {
            Frame::Array { end, .. } => end,
            _ => at + 1,
        };
        Some(self.replies.reply(at))
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl ExactSizeIterator for Items<'_> {}

/// Arrays are equal when their elements are.
impl PartialEq for Items<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.zip(*other).all(|(a, b)| a == b)
    }
}

impl Eq for Items<'_> {}

/// The replies of one round trip, one per command.
#[derive(Debug, Default)]
pub struct Replies {
    buf: Vec<u8>,
    frames: Vec<Frame>,
    tops: Vec<usize>,
}

impl Replies {
    /// Number of replies.
    pub fn len(&self) -> usize {
        self.tops.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tops.is_empty()
    }

    /// Reply `i` (in command order).
    pub fn get(&self, i: usize) -> Option<Reply<'_>> {
        self.tops.get(i).map(|&at| self.reply(at))
    }

    fn reply(&self, at: usize) -> Reply<'_> {
        match &self.frames[at] {
            Frame::Simple(r) => Reply::Simple(&self.buf[r.clone()]),
            Frame::Error(r) => Reply::Error(&self.buf[r.clone()]),
            Frame::Int(n) => Reply::Int(*n),
            Frame::Bulk(r) => Reply::Bulk(&self.buf[r.clone()]),
            Frame::Nil => Reply::Nil,
            Frame::Array { len, .. } => Reply::Array(Items {
                replies: self,
                next: at + 1,
                left: *len,
            }),
        }
    }

    /// Moves every string range `by` bytes down (the buffer lost its first
    /// `by` bytes).
    fn shift(&mut self, by: usize) {
        let down = |r: &mut Range<usize>| *r = r.start - by..r.end - by;
        for frame in &mut self.frames {
            match frame {
                Frame::Simple(r) | Frame::Error(r) | Frame::Bulk(r) => down(r),
                Frame::Int(_) | Frame::Nil | Frame::Array { .. } => {}
            }
        }
    }

    /// Parses as many complete replies as `buf` holds past `pos`, up to
    /// `want` in all; returns the new position.
    fn parse(&mut self, mut pos: usize, want: usize) -> Result<usize, RespError> {
        while self.tops.len() < want {
            let mark = self.frames.len();
            match parse_value(&self.buf, pos, &mut self.frames)? {
                Some(end) => {
                    self.tops.push(mark);
                    pos = end;
                }
                None => {
                    self.frames.truncate(mark);
                    break;
                }
            }
        }
        Ok(pos)
    }
}

/// The line starting at `pos` (without its CRLF) and the position after it;
/// `None` when incomplete.
fn line(buf: &[u8], pos: usize) -> Option<(Range<usize>, usize)> {
    let rest = buf.get(pos..)?;
    let cr = rest.iter().position(|&b| b == b'\r')?;
    (rest.get(cr + 1)? == &b'\n').then_some((pos..pos + cr, pos + cr + 2))
}

fn number(buf: &[u8], range: Range<usize>) -> Result<i64, RespError> {
    std::str::from_utf8(&buf[range.clone()])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            RespError::Protocol(format!(
                "bad number {:?}",
                String::from_utf8_lossy(&buf[range])
            ))
        })
}

/// Parses one value at `pos` into `frames`; the position after it, or `None`
/// when `buf` does not hold all of it yet (frames pushed are then garbage).
fn parse_value(
    buf: &[u8],
    pos: usize,
    frames: &mut Vec<Frame>,
) -> Result<Option<usize>, RespError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    let Some((head, after)) = line(buf, pos + 1) else {
        return Ok(None);
    };
    match kind {
        b'+' => frames.push(Frame::Simple(head)),
        b'-' => frames.push(Frame::Error(head)),
        b':' => frames.push(Frame::Int(number(buf, head)?)),
        b'$' => {
            let n = number(buf, head)?;
            if n < 0 {
                frames.push(Frame::Nil);
                return Ok(Some(after));
            }
            let end = after + n as usize;
            if buf.len() < end + 2 {
                return Ok(None);
            }
            if &buf[end..end + 2] != b"\r\n" {
                return Err(RespError::Protocol("bulk string without CRLF".into()));
            }
            frames.push(Frame::Bulk(after..end));
            return Ok(Some(end + 2));
        }
        b'*' => {
            let n = number(buf, head)?;
            if n < 0 {
                frames.push(Frame::Nil);
                return Ok(Some(after));
            }
            let at = frames.len();
            frames.push(Frame::Array {
                len: n as usize,
                end: 0,
            });
            let mut pos = after;
            for _ in 0..n {
                match parse_value(buf, pos, frames)? {
                    Some(next) => pos = next,
                    None => return Ok(None),
                }
            }
            let end = frames.len();
            if let Frame::Array { end: e, .. } = &mut frames[at] {
                *e = end;
            }
            return Ok(Some(pos));
        }
        other => {
            return Err(RespError::Protocol(format!(
                "unexpected reply type {:?}",
                other as char
            )))
        }
    }
    Ok(Some(after))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A request on its way: its encoded commands and where its replies go.
struct Job {
    bytes: Vec<u8>,
    count: usize,
    reply: oneshot::Sender<Result<Replies, RespError>>,
}

/// A request written and waiting for its replies, in write order.
struct Waiting {
    count: usize,
    reply: oneshot::Sender<Result<Replies, RespError>>,
}

/// One connection and the two tasks that drive it. Dropping it stops them
/// (and so closes the socket); requests still waiting then fail.
struct Link {
    jobs: mpsc::UnboundedSender<Job>,
    dead: Arc<AtomicBool>,
    tasks: [tokio::task::JoinHandle<()>; 2],
}

impl Drop for Link {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

fn closed() -> RespError {
    RespError::Io(std::io::ErrorKind::ConnectionAborted.into())
}

impl Link {
    fn start(io: Box<dyn Io>) -> Link {
        let (read, write) = tokio::io::split(io);
        let (jobs, queued) = mpsc::unbounded_channel();
        let (sent, waiting) = mpsc::unbounded_channel();
        let dead = Arc::new(AtomicBool::new(false));
        let writer = tokio::spawn(write_loop(write, queued, sent, dead.clone()));
        let reader = tokio::spawn(read_loop(read, waiting, dead.clone()));
        Link {
            jobs,
            dead,
            tasks: [writer, reader],
        }
    }

    fn alive(&self) -> bool {
        !self.dead.load(Ordering::Acquire)
    }
}

/// Writes the queued requests, all that are waiting at once in one write
/// (pipelining across requests), after announcing them to the reader.
async fn write_loop(
    mut io: tokio::io::WriteHalf<Box<dyn Io>>,
    mut queued: mpsc::UnboundedReceiver<Job>,
    sent: mpsc::UnboundedSender<Waiting>,
    dead: Arc<AtomicBool>,
) {
    const MAX_WRITE: usize = 1 << 20;
    let mut buf = Vec::new();
    while let Some(job) = queued.recv().await {
        buf.clear();
        let mut next = Some(job);
        while let Some(job) = next.take() {
            buf.extend_from_slice(&job.bytes);
            let waiting = Waiting {
                count: job.count,
                reply: job.reply,
            };
            if let Err(e) = sent.send(waiting) {
                let _ = e.0.reply.send(Err(closed()));
            }
            if buf.len() < MAX_WRITE {
                next = queued.try_recv().ok();
            }
        }
        if let Err(e) = io.write_all(&buf).await {
            tracing::debug!(error = %e, "redis write failed");
            break;
        }
    }
    dead.store(true, Ordering::Release);
    queued.close();
    while let Ok(job) = queued.try_recv() {
        let _ = job.reply.send(Err(closed()));
    }
}

/// Parses replies in order and hands each request its own. A request whose
/// caller went away (deadline) still has its replies read, then dropped.
async fn read_loop(
    mut io: tokio::io::ReadHalf<Box<dyn Io>>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
    dead: Arc<AtomicBool>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    // The request being read: its replies so far (frames at positions of
    // `buf`), where they start, and how far `buf` is parsed.
    let mut current: Option<(Waiting, Replies, usize)> = None;
    let mut pos = 0;
    let error = 'connection: loop {
        // Hand out every request whose replies are complete.
        loop {
            if current.is_none() {
                match waiting.try_recv() {
                    Ok(w) => {
                        let replies = Replies {
                            tops: Vec::with_capacity(w.count),
                            ..Replies::default()
                        };
                        current = Some((w, replies, pos));
                    }
                    Err(_) => break,
                }
            }
            let (w, replies, _) = current.as_mut().expect("set above");
            replies.buf = std::mem::take(&mut buf);
            let parsed = replies.parse(pos, w.count);
            buf = std::mem::take(&mut replies.buf);
            match parsed {
                Ok(end) => pos = end,
                Err(e) => break 'connection e,
            }
            if replies.tops.len() < w.count {
                break;
            }
            let (w, mut replies, start) = current.take().expect("set above");
            replies.buf = buf[start..pos].to_vec();
            replies.shift(start);
            let _ = w.reply.send(Ok(replies));
        }
        // Drop what every finished request has consumed.
        let keep = current.as_ref().map_or(pos, |(_, _, start)| *start);
        if keep > 0 {
            buf.drain(..keep);
            pos -= keep;
            if let Some((_, replies, start)) = current.as_mut() {
                replies.shift(*start);
                *start = 0;
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match io.read_buf(&mut buf).await {
            Ok(0) => break RespError::Io(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                if current.is_none() && waiting.is_empty() {
                    break RespError::Protocol("reply with no request waiting".into());
                }
            }
            Err(e) => break RespError::Io(e),
        }
    };
    tracing::debug!(error = %error, "redis connection closed");
    dead.store(true, Ordering::Release);
    waiting.close();
    let error = error.to_string();
    let fail = |w: Waiting| {
        let _ = w
            .reply
            .send(Err(RespError::Io(std::io::Error::other(error.clone()))));
    };
    if let Some((w, _, _)) = current.take() {
        fail(w);
    }
    while let Ok(w) = waiting.try_recv() {
        fail(w);
    }
}

enum Target {
    Tcp(String, u16),
    #[cfg(unix)]
    Unix(std::path::PathBuf),
}

/// A Redis client for many concurrent requests over one connection: each
/// request's commands are written as one buffer, the requests waiting at a
/// moment in one write, and the replies parsed in place and handed back in
/// order. Connects lazily and reconnects after a failure.
pub struct RespClient {
    target: Target,
    /// Sent on every new connection (AUTH, SELECT), each must answer OK.
    setup: Commands,
    connect_timeout: Duration,
    link: Mutex<Option<Arc<Link>>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl RespClient {
    /// A client for `url` (`redis://[user:password@]host[:port][/db]` or a
    /// `redis+unix://` / `unix://` path, as redis-rs parses them).
    pub fn new(url: &str, connect_timeout: Duration) -> Result<RespClient, RespError> {
        let client = redis::Client::open(url).map_err(|e| RespError::Url(e.to_string()))?;
        let info = client.get_connection_info();
        let target = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => Target::Tcp(host.clone(), *port),
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => Target::Unix(path.clone()),
            other => {
                return Err(RespError::Url(format!(
                    "{other:?}: only plain TCP and unix sockets are supported"
                )))
            }
        };
        let settings = info.redis_settings();
        let mut setup = Commands::new();
        if let Some(password) = settings.password() {
            match settings.username() {
                Some(user) => setup.push("AUTH", &[user, password]),
                None => setup.push("AUTH", &[password]),
            }
        }
        if settings.db() != 0 {
            setup.push("SELECT", &[&settings.db().to_string()]);
        }
        Ok(RespClient {
            target,
            setup,
            connect_timeout,
            link: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    fn current(&self) -> Option<Arc<Link>> {
        let link = self.link.lock().expect("link lock");
        link.as_ref().filter(|l| l.alive()).cloned()
    }

    async fn open(&self) -> Result<Box<dyn Io>, RespError> {
        Ok(match &self.target {
            Target::Tcp(host, port) => {
                let stream = tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::TcpStream::connect((host.as_str(), *port)),
                )
                .await
                .map_err(|_| RespError::ConnectTimeout(self.connect_timeout))??;
                stream.set_nodelay(true)?;
                Box::new(stream)
            }
            #[cfg(unix)]
            Target::Unix(path) => Box::new(
                tokio::time::timeout(self.connect_timeout, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| RespError::ConnectTimeout(self.connect_timeout))??,
            ),
        })
    }

    /// The live connection, connecting if there is none (or it died).
    async fn connect(&self) -> Result<Arc<Link>, RespError> {
        let _one = self.connecting.lock().await;
        if let Some(link) = self.current() {
            return Ok(link); // Another request connected meanwhile.
        }
        let link = Arc::new(Link::start(self.open().await?));
        if !self.setup.is_empty() {
            let replies = send(&link, &self.setup).await?;
            for i in 0..replies.len() {
                if let Some(Reply::Error(e)) = replies.get(i) {
                    return Err(RespError::Reply(String::from_utf8_lossy(e).into_owned()));
                }
            }
        }
        *self.link.lock().expect("link lock") = Some(link.clone());
        Ok(link)
    }

    /// Sends `commands` and returns their replies. Cancel-safe: a request
    /// dropped before its replies arrive leaves the connection in order.
    /// A failure of a connection opened before this call (Redis restarted)
    /// is retried once on a new one: reads are idempotent.
    pub async fn query(&self, commands: &Commands) -> Result<Replies, RespError> {
        let (link, reused) = match self.current() {
            Some(link) => (link, true),
            None => (self.connect().await?, false),
        };
        match send(&link, commands).await {
            Err(RespError::Io(e)) if reused => {
                tracing::debug!(error = %e, "redis connection failed; reconnecting");
                drop(link);
                let link = self.connect().await?;
                send(&link, commands).await
            }
            result => result,
        }
    }
}

async fn send(link: &Link, commands: &Commands) -> Result<Replies, RespError> {
    let (reply, replies) = oneshot::channel();
    let job = Job {
        bytes: commands.buf.clone(),
        count: commands.len(),
        reply,
    };
    link.jobs.send(job).map_err(|_| closed())?;
    replies.await.map_err(|_| closed())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(bytes: &[u8], want: usize) -> Result<(Replies, usize), RespError> {
        let mut replies = Replies {
            buf: bytes.to_vec(),
            ..Replies::default()
        };
        let pos = replies.parse(0, want)?;
        Ok((replies, pos))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut c = Commands::new();
        c.push("HMGET", &["k", "a", ""]);
        c.push("EXEC", &[]);
        c.start("GET", 1);
        c.arg_parts(&[b"p:", b"card", b":", b"c1"]);
        assert_eq!(
            c.buf,
            b"*4\r\n$5\r\nHMGET\r\n$1\r\nk\r\n$1\r\na\r\n$0\r\n\r\n*1\r\n$4\r\nEXEC\r\n*2\r\n$3\r\nGET\r\n$9\r\np:card:c1\r\n"
        );
        assert_eq!(c.len(), 3);
    }

    #[test]
    fn parses_every_reply_type_and_nested_arrays() {
        let bytes = b"+OK\r\n-ERR bad\r\n:-42\r\n$3\r\nabc\r\n$-1\r\n*3\r\n$1\r\nx\r\n*2\r\n:1\r\n$-1\r\n$0\r\n\r\n*-1\r\n";
        let (r, pos) = parse_all(bytes, 7).unwrap();
        assert_eq!(pos, bytes.len());
        assert_eq!(r.get(0), Some(Reply::Simple(b"OK")));
        assert_eq!(r.get(1), Some(Reply::Error(b"ERR bad")));
        assert_eq!(r.get(2), Some(Reply::Int(-42)));
        assert_eq!(r.get(3), Some(Reply::Bulk(b"abc")));
        assert_eq!(r.get(4), Some(Reply::Nil));
        let Some(Reply::Array(items)) = r.get(5) else {
            panic!("array")
        };
        let items: Vec<Reply> = items.collect();
        assert_eq!(items.len(), 3);
        assert_eq!(items[0], Reply::Bulk(b"x"));
        let Reply::Array(inner) = items[1] else {
            panic!("nested array")
        };
        assert_eq!(inner.collect::<Vec<_>>(), vec![Reply::Int(1), Reply::Nil]);
        assert_eq!(items[2], Reply::Bulk(b""));
        assert_eq!(r.get(6), Some(Reply::Nil));
        assert_eq!(r.get(7), None);
    }

    /// Any prefix of a valid reply stream parses to the complete replies it
    /// holds and resumes where it stopped.
    #[test]
    fn incomplete_input_resumes_at_every_split() {
        let bytes: &[u8] = b"+QUEUED\r\n*2\r\n*2\r\n$2\r\nab\r\n$-1\r\n:7\r\n$4\r\nr\r\nn\r\n";
        for split in 0..bytes.len() {
            let mut r = Replies {
                buf: bytes[..split].to_vec(),
                ..Replies::default()
            };
            let pos = r.parse(0, 3).unwrap();
            assert!(r.len() < 3, "split {split}");
            r.buf.extend_from_slice(&bytes[split..]);
            let pos = r.parse(pos, 3).unwrap();
            assert_eq!((r.len(), pos), (3, bytes.len()), "split {split}");
            assert_eq!(r.get(2), Some(Reply::Bulk(b"r\r\nn")));
            let Some(Reply::Array(mut items)) = r.get(1) else {
                panic!("array")
            };
            let Some(Reply::Array(inner)) = items.next() else {
                panic!("nested")
            };
            assert_eq!(
                inner.collect::<Vec<_>>(),
                vec![Reply::Bulk(b"ab"), Reply::Nil]
            );
            assert_eq!(items.next(), Some(Reply::Int(7)));
        }
    }

    #[test]
    fn malformed_input_is_a_protocol_error() {
        assert!(matches!(
            parse_all(b"?x\r\n", 1),
            Err(RespError::Protocol(_))
        ));
        assert!(matches!(
            parse_all(b":1x\r\n", 1),
            Err(RespError::Protocol(_))
        ));
        assert!(matches!(
            parse_all(b"$1\r\nabc\r\n", 1),
            Err(RespError::Protocol(_))
        ));
    }
}
