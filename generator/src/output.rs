//! Where generated events go: Kafka (a high-throughput idempotent producer)
//! or files (Avro object container or JSON lines, one file per topic).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::{ClientConfig, ClientContext};
use schemas::codec::{Encoder, Event};
use schemas::container::ContainerWriter;
use schemas::{Click, EventKind, Label, Topics, Txn};

use crate::sim::GenEvent;

/// A destination of events.
pub trait Sink {
    fn send(&mut self, event: &GenEvent) -> anyhow::Result<()>;
    /// The caller is about to wait (pacing): hand over anything buffered so
    /// that events leave at their wall-clock slot, not when a batch fills.
    fn idle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Flushes everything; errors if any event was not delivered.
    fn finish(self: Box<Self>) -> anyhow::Result<()>;
}

/// Payload encoding on Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WireFormat {
    /// Confluent framing + Avro binary.
    Avro,
    /// One JSON object per message.
    Json,
}

/// Kafka output settings.
#[derive(Debug, Clone)]
pub struct KafkaOutput {
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of topics this creates (existing topics are kept as they are).
    pub partitions: i32,
    pub replication_factor: i32,
    pub format: WireFormat,
    /// Share of transactions and clicks written with schema v1 (the rest v2).
    pub v1_share: f64,
    pub linger_ms: u32,
    pub batch_bytes: u32,
    pub compression: String,
    /// Extra librdkafka properties (`key=value`), applied last.
    pub extra: Vec<(String, String)>,
}

/// Creates the three topics if absent. Returns the names it created.
pub fn ensure_topics(
    brokers: &str,
    topics: &Topics,
    partitions: i32,
    replication: i32,
) -> anyhow::Result<Vec<String>> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .context("creating the kafka admin client")?;
    let names = [
        topics.txn.as_str(),
        topics.click.as_str(),
        topics.label.as_str(),
    ];
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(replication)))
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = runtime
        .block_on(admin.create_topics(&new, &options))
        .with_context(|| format!("creating topics on {brokers}"))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => bail!("creating topic {name}: {code}"),
        }
    }
    Ok(created)
}

#[derive(Default)]
struct Delivery {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if self.failed.fetch_add(1, Ordering::Relaxed) == 0 {
                *self.first_error.lock().expect("never poisoned") = Some(e.to_string());
            }
        }
    }
}

/// Records per hand-over from the simulation thread to the producing thread.
const BATCH_RECORDS: usize = 2048;
/// Batches in flight between the two threads (beyond that the simulation waits).
const BATCHES_IN_FLIGHT: usize = 4;

/// Encoded records on their way to the producing thread: keys and payloads
/// back to back in one buffer, reused once produced.
#[derive(Default)]
struct Batch {
    data: Vec<u8>,
    /// (topic index, end of key, end of payload) in `data`.
    records: Vec<(u8, u32, u32)>,
}

impl Batch {
    fn clear(&mut self) {
        self.data.clear();
        self.records.clear();
    }
}

/// Produces to Kafka: keyed, idempotent, acks=all, lz4, large batches.
///
/// `send` encodes on the caller's (simulation) thread into a reusable batch
/// buffer; a second thread hands the records to librdkafka (partitioning,
/// copying, queueing), whose broker threads batch, compress and send. The
/// three overlap on separate cores.
pub struct KafkaSink {
    encoder: Encoder,
    config: KafkaOutput,
    rng: Xoshiro256PlusPlus,
    batch: Batch,
    to_producer: Option<SyncSender<Batch>>,
    recycled: Receiver<Batch>,
    producer: Option<JoinHandle<anyhow::Result<()>>>,
}

impl KafkaSink {
    pub fn new(config: KafkaOutput) -> anyhow::Result<Self> {
        let registry = schemas::registry::from_env();
        let encoder =
            Encoder::register(registry.as_ref(), &config.topics).context("registering schemas")?;
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger_ms.to_string())
            .set("batch.size", config.batch_bytes.to_string())
            .set("batch.num.messages", "100000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("sticky.partitioning.linger.ms", "0")
            .set("message.timeout.ms", "120000");
        // Delivery reports stay on for every message (the default): the
        // producing thread then frees each message where it was allocated,
        // which measured cheaper than `delivery.report.only.error=true`
        // (frees on librdkafka's broker thread, the busiest one).
        for (k, v) in &config.extra {
            client.set(k, v);
        }
        let producer: BaseProducer<Delivery> = client
            .create_with_context(Delivery::default())
            .context("creating the kafka producer")?;
        // Connect and learn the partitions now: otherwise the first records
        // wait in librdkafka for the broker connection and topic metadata
        // (their timestamps are taken before), a burst at the start.
        for topic in [
            &config.topics.txn,
            &config.topics.click,
            &config.topics.label,
        ] {
            if let Err(error) = producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
            {
                tracing::warn!(%topic, %error, "could not fetch topic metadata up front");
            }
        }
        let (to_producer, batches) = sync_channel::<Batch>(BATCHES_IN_FLIGHT);
        let (recycle, recycled) = sync_channel::<Batch>(BATCHES_IN_FLIGHT + 2);
        let topics = config.topics.clone();
        let handle = std::thread::Builder::new()
            .name("sfs-produce".into())
            .spawn(move || produce_loop(&producer, &topics, &batches, &recycle))
            .context("starting the producing thread")?;
        Ok(KafkaSink {
            encoder,
            config,
            rng: Xoshiro256PlusPlus::seed_from_u64(7),
            batch: Batch::default(),
            to_producer: Some(to_producer),
            recycled,
            producer: Some(handle),
        })
    }

    fn encode<E: Event>(&mut self, event: &E) -> anyhow::Result<()> {
        let out = &mut self.batch.data;
        out.extend_from_slice(event.key().as_bytes());
        let key_end = out.len();
        match self.config.format {
            WireFormat::Json => Encoder::encode_json(event, out),
            WireFormat::Avro => {
                let latest = E::KIND.latest_version();
                let v1 = latest > 1
                    && self.config.v1_share > 0.0
                    && self.rng.gen_bool(self.config.v1_share.min(1.0));
                self.encoder
                    .encode_avro(event, if v1 { 1 } else { latest }, out)?;
            }
        }
        let topic = match E::KIND {
            EventKind::Txn => 0,
            EventKind::Click => 1,
            EventKind::Label => 2,
        };
        self.batch
            .records
            .push((topic, key_end as u32, out.len() as u32));
        Ok(())
    }

    /// Hands the current batch to the producing thread.
    fn ship(&mut self) -> anyhow::Result<()> {
        let next = self.recycled.try_recv().unwrap_or_default();
        let full = std::mem::replace(&mut self.batch, next);
        let sent = self
            .to_producer
            .as_ref()
            .is_some_and(|tx| tx.send(full).is_ok());
        if !sent {
            // The producing thread stopped: report why.
            return Err(self
                .join()
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("the producing thread stopped unexpectedly")));
        }
        Ok(())
    }

    fn join(&mut self) -> anyhow::Result<()> {
        self.to_producer = None;
        match self.producer.take() {
            Some(handle) => handle
                .join()
                .map_err(|_| anyhow::anyhow!("the producing thread panicked"))?,
            None => Ok(()),
        }
    }
}

/// The producing thread: sends every record of every batch, returns the
/// emptied batches, and flushes when the simulation hangs up.
fn produce_loop(
    producer: &BaseProducer<Delivery>,
    topics: &Topics,
    batches: &Receiver<Batch>,
    recycle: &SyncSender<Batch>,
) -> anyhow::Result<()> {
    let names = [
        topics.txn.as_str(),
        topics.click.as_str(),
        topics.label.as_str(),
    ];
    while let Ok(mut batch) = batches.recv() {
        // One clock read per batch (librdkafka would read it per message).
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let mut start = 0usize;
        for &(topic, key_end, end) in &batch.records {
            let (key_end, end) = (key_end as usize, end as usize);
            let topic = names[topic as usize];
            let key = &batch.data[start..key_end];
            let payload = &batch.data[key_end..end];
            loop {
                match producer.send(
                    BaseRecord::<[u8], [u8]>::to(topic)
                        .key(key)
                        .payload(payload)
                        .timestamp(now_ms),
                ) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        producer.poll(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(e).with_context(|| format!("producing to {topic}")),
                }
            }
            start = end;
        }
        producer.poll(Duration::ZERO);
        if producer.context().failed.load(Ordering::Relaxed) > 0 {
            bail!("delivery failed: {}", first_error(producer));
        }
        batch.clear();
        // Full means enough spares are around already: drop this one.
        let _ = recycle.try_send(batch);
    }
    producer
        .flush(Duration::from_secs(120))
        .context("flushing the kafka producer")?;
    let failed = producer.context().failed.load(Ordering::Relaxed);
    if failed > 0 {
        bail!(
            "{failed} events were not delivered: {}",
            first_error(producer)
        );
    }
    Ok(())
}

fn first_error(producer: &BaseProducer<Delivery>) -> String {
    producer
        .context()
        .first_error
        .lock()
        .expect("never poisoned")
        .clone()
        .unwrap_or_default()
}

impl Sink for KafkaSink {
    fn send(&mut self, event: &GenEvent) -> anyhow::Result<()> {
        match event {
            GenEvent::Txn { txn, .. } => self.encode(txn)?,
            GenEvent::Click(c) => self.encode(c)?,
            GenEvent::Label(l) => self.encode(l)?,
        }
        if self.batch.records.len() >= BATCH_RECORDS {
            self.ship()?;
        }
        Ok(())
    }

    fn idle(&mut self) -> anyhow::Result<()> {
        if !self.batch.records.is_empty() {
            self.ship()?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>) -> anyhow::Result<()> {
        if !self.batch.records.is_empty() {
            self.ship()?;
        }
        self.join()
    }
}

/// File format of `--out avro|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    Avro,
    JsonLines,
}

enum FileWriter {
    Avro(ContainerWriter<BufWriter<File>>),
    Json(BufWriter<File>),
}

/// Writes one file per topic into a directory: `<topic>.avro` or `<topic>.jsonl`.
pub struct FileSink {
    writers: [FileWriter; 3],
    buf: Vec<u8>,
}

impl FileSink {
    pub fn new(dir: &Path, topics: &Topics, format: FileFormat) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let open = |kind: EventKind| -> anyhow::Result<FileWriter> {
            let ext = if format == FileFormat::Avro {
                "avro"
            } else {
                "jsonl"
            };
            let path = dir.join(format!("{}.{ext}", topics.of(kind)));
            let file = BufWriter::with_capacity(
                1 << 20,
                File::create(&path).with_context(|| format!("creating {}", path.display()))?,
            );
            Ok(match format {
                FileFormat::JsonLines => FileWriter::Json(file),
                FileFormat::Avro => FileWriter::Avro(match kind {
                    EventKind::Txn => ContainerWriter::new::<Txn>(file, kind.latest_version())?,
                    EventKind::Click => ContainerWriter::new::<Click>(file, kind.latest_version())?,
                    EventKind::Label => ContainerWriter::new::<Label>(file, kind.latest_version())?,
                }),
            })
        };
        Ok(FileSink {
            writers: [
                open(EventKind::Txn)?,
                open(EventKind::Click)?,
                open(EventKind::Label)?,
            ],
            buf: Vec::new(),
        })
    }

    fn write<E: Event>(
        writer: &mut FileWriter,
        buf: &mut Vec<u8>,
        event: &E,
    ) -> anyhow::Result<()> {
        match writer {
            FileWriter::Avro(w) => w.append(event)?,
            FileWriter::Json(w) => {
                buf.clear();
                Encoder::encode_json(event, buf);
                buf.push(b'\n');
                w.write_all(buf)?;
            }
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn send(&mut self, event: &GenEvent) -> anyhow::Result<()> {
        let [txn, click, label] = &mut self.writers;
        match event {
            GenEvent::Txn { txn: t, .. } => Self::write(txn, &mut self.buf, t),
            GenEvent::Click(c) => Self::write(click, &mut self.buf, c),
            GenEvent::Label(l) => Self::write(label, &mut self.buf, l),
        }
    }

    fn finish(self: Box<Self>) -> anyhow::Result<()> {
        for writer in self.writers {
            match writer {
                FileWriter::Avro(w) => {
                    w.finish()?;
                }
                FileWriter::Json(mut w) => w.flush()?,
            }
        }
        Ok(())
    }
}

/// Keeps events in memory (for tests and dry runs).
#[derive(Debug, Default)]
pub struct MemorySink {
    pub events: Vec<GenEvent>,
}

impl Sink for MemorySink {
    fn send(&mut self, event: &GenEvent) -> anyhow::Result<()> {
        self.events.push(event.clone());
        Ok(())
    }

    fn finish(self: Box<Self>) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Discards events.
#[derive(Debug, Default)]
pub struct NullSink;

impl Sink for NullSink {
    fn send(&mut self, _: &GenEvent) -> anyhow::Result<()> {
        Ok(())
    }

    fn finish(self: Box<Self>) -> anyhow::Result<()> {
        Ok(())
    }
}
