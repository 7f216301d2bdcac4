//! The decode stage: raw Kafka records in, decoded records out, in order.
//!
//! Decoding is its own operator between the reader and the placer. A decoder
//! may answer [`Decoded::Retry`] (its schema registry is down, say): the stage
//! then keeps that record and every later one, with the capability for their
//! time, and asks to be scheduled again after a backoff (timely's
//! `activate_after`), so the worker thread never sleeps and every other
//! operator of the worker keeps running. Nothing after the stalled record
//! reaches the placer, so no partition's watermark, resume point or durable
//! offset moves past an undecoded record, and no good record is rejected.

use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::Stream;

use super::{SourceMetrics, SourceRecord};

/// What a decoder made of one record.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded<D, E> {
    /// The datum and its event time (ms).
    Data(D, i64),
    /// Bad input: it goes to the dead letters.
    Rejected(E),
    /// The decoder cannot tell now (a dependency is down): try again later.
    Retry(String),
}

/// Decodes records; implemented by every `FnMut(&SourceRecord) -> Result<(D, ms), E>`
/// (which never asks to retry).
pub trait RecordDecoder<D, E>: 'static {
    fn decode(&mut self, record: &SourceRecord<'_>) -> Decoded<D, E>;
}

impl<D, E, F> RecordDecoder<D, E> for F
where
    F: FnMut(&SourceRecord<'_>) -> Result<(D, i64), E> + 'static,
{
    fn decode(&mut self, record: &SourceRecord<'_>) -> Decoded<D, E> {
        match self(record) {
            Ok((datum, event_ms)) => Decoded::Data(datum, event_ms),
            Err(error) => Decoded::Rejected(error),
        }
    }
}

/// A record as read, owned: `slot` is its partition's index in the source.
#[derive(Debug, Clone)]
pub struct RawRecord {
    pub slot: usize,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub timestamp_ms: Option<i64>,
}

impl RawRecord {
    pub(crate) fn view<'a>(&'a self, topic: &'a str) -> SourceRecord<'a> {
        SourceRecord {
            topic,
            partition: self.partition,
            offset: self.offset,
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            timestamp_ms: self.timestamp_ms,
        }
    }
}

/// A record with what the decoder made of it (never `Retry`).
#[derive(Debug, Clone)]
pub struct DecodedRecord<D, E> {
    pub raw: RawRecord,
    pub outcome: Result<(D, i64), E>,
}

/// First and longest wait before retrying a record the decoder deferred.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The decode stage's state between activations.
struct DecodeStage<D, E, R> {
    decoder: R,
    /// Topic name per partition slot.
    topics: Rc<[String]>,
    /// Records not yet decoded, in arrival order, with the capability for their time.
    pending: VecDeque<(Capability<u64>, VecDeque<RawRecord>)>,
    /// While paused: when to try again, and the next backoff.
    retry_at: Option<Instant>,
    backoff: Duration,
    metrics: SourceMetrics,
    _types: std::marker::PhantomData<(D, E)>,
}

/// What one decode attempt over the pending records ended with.
enum Progress {
    /// Everything pending was decoded.
    Drained,
    /// A record was deferred: wait this long.
    Paused(Duration),
}

impl<D: Clone + 'static, E: Clone + 'static, R: RecordDecoder<D, E>> DecodeStage<D, E, R> {
    /// Decodes pending records in order until done or one is deferred;
    /// `out` gets each run of records decoded under one capability.
    fn decode_pending(
        &mut self,
        mut out: impl FnMut(&Capability<u64>, &mut Vec<DecodedRecord<D, E>>),
    ) -> Progress {
        let mut batch = Vec::new();
        while let Some((cap, records)) = self.pending.front_mut() {
            while let Some(raw) = records.front() {
                let topic = &self.topics[raw.slot];
                let outcome = match self.decoder.decode(&raw.view(topic)) {
                    Decoded::Data(datum, event_ms) => Ok((datum, event_ms)),
                    Decoded::Rejected(error) => Err(error),
                    Decoded::Retry(why) => {
                        let wait = self.backoff;
                        if self.retry_at.is_none() {
                            tracing::warn!(topic = %topic, partition = raw.partition, offset = raw.offset,
                                reason = %why, "decoding paused, retrying with backoff");
                            self.metrics.decode_paused.inc();
                        }
                        self.metrics.decode_retries.inc();
                        self.retry_at = Some(Instant::now() + wait);
                        self.backoff = (wait * 2).min(BACKOFF_MAX);
                        if !batch.is_empty() {
                            out(cap, &mut batch);
                        }
                        return Progress::Paused(wait);
                    }
                };
                if self.retry_at.take().is_some() {
                    tracing::info!(topic = %topic, "decoding resumed");
                    self.metrics.decode_paused.dec();
                }
                self.backoff = BACKOFF_FIRST;
                let raw = records.pop_front().expect("front exists");
                batch.push(DecodedRecord { raw, outcome });
            }
            if !batch.is_empty() {
                out(cap, &mut batch);
            }
            self.pending.pop_front();
        }
        Progress::Drained
    }
}

/// Decodes `raw` with `decoder`, in order, pausing on [`Decoded::Retry`].
pub(crate) fn decode_stage<'scope, D, E, R>(
    raw: Stream<'scope, u64, Vec<RawRecord>>,
    name: String,
    topics: Rc<[String]>,
    decoder: R,
    metrics: SourceMetrics,
) -> Stream<'scope, u64, Vec<DecodedRecord<D, E>>>
where
    D: Clone + 'static,
    E: Clone + 'static,
    R: RecordDecoder<D, E>,
{
    let scope = raw.scope();
    let mut builder = OperatorBuilder::new(name, scope);
    let info = builder.operator_info();
    let activator = scope.activator_for(Rc::clone(&info.address));
    let mut input = builder.new_input(raw, Pipeline);
    let (output, decoded) = builder.new_output::<Vec<DecodedRecord<D, E>>>();
    let mut output = OutputBuilder::from(output);
    let mut stage = DecodeStage {
        decoder,
        topics,
        pending: VecDeque::new(),
        retry_at: None,
        backoff: BACKOFF_FIRST,
        metrics,
        _types: std::marker::PhantomData,
    };
    builder.build(move |_initial| {
        move |_frontiers| {
            input.for_each(|cap, data| {
                if let Some(cap) = cap.retain_least(0) {
                    stage.pending.push_back((cap, data.drain(..).collect()));
                }
            });
            if stage.retry_at.is_some_and(|at| Instant::now() < at) {
                // Woken by new input while paused: the scheduled retry stands.
                return;
            }
            let mut out = output.activate();
            match stage.decode_pending(|cap, batch| out.session(cap).give_container(batch)) {
                Progress::Drained => {}
                Progress::Paused(wait) => activator.activate_after(wait),
            }
        }
    });
    decoded
}
