//! `sfs generate`: flags, pacing (rate and speedup), progress and summary.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use schemas::{EventKind, Topics};

use crate::output::{
    ensure_topics, FileFormat, FileSink, KafkaOutput, KafkaSink, NullSink, Sink, WireFormat,
};
use crate::sim::{rhythm_at, EventBuf, GenEvent, Generator, GeneratorConfig};

/// Where `sfs generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Out {
    /// Produce to Kafka.
    Kafka,
    /// Avro object container files in --out-dir.
    Avro,
    /// JSON lines files in --out-dir.
    Json,
    /// Discard (measures the simulation alone).
    Null,
}

/// Generate card transactions, clicks and delayed fraud labels.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Seed: the same seed and flags give the same events.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Wall-clock events per second, or `max`.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// Stop after this many events.
    #[arg(long)]
    pub events: Option<u64>,
    /// Stop when simulated time has advanced this long (e.g. 90s, 2h, 30d).
    #[arg(long, value_parser = parse_duration_ms)]
    pub duration: Option<i64>,
    /// Simulated start: `now`, `now-30d`, RFC 3339 (`2024-05-01T00:00:00Z`) or epoch ms.
    #[arg(long, default_value = "now", value_parser = parse_start)]
    pub start_time: i64,
    /// Simulated seconds per wall-clock second (event times run this much faster).
    /// Without it, pacing follows --rate only.
    #[arg(long)]
    pub speedup: Option<f64>,
    /// Mean events per simulated second over a day. Default: when --rate and
    /// --speedup are both set, --rate/--speedup divided by the daily rhythm at
    /// --start-time (so the steady-state rate at the start is --rate);
    /// --rate when only it is set; else 1000.
    #[arg(long)]
    pub sim_rate: Option<f64>,
    /// Simulate this long before --start-time without emitting (e.g. 10m):
    /// sessions already under way at the start, so the event rate is at its
    /// steady state from the first event instead of ramping up over minutes.
    /// Under --speedup 1 the events are moved by the time it (and the setup)
    /// took, so they stay in step with the wall clock.
    #[arg(long, default_value = "0s", value_parser = parse_duration_ms)]
    pub warmup: i64,
    /// Number of users.
    #[arg(long, default_value_t = 100_000)]
    pub users: u32,
    /// Mean cards per user (at least one each).
    #[arg(long, default_value_t = 1.5)]
    pub cards_per_user: f64,
    /// Number of merchants.
    #[arg(long, default_value_t = 5_000)]
    pub merchants: u32,
    /// Number of catalogue items.
    #[arg(long, default_value_t = 20_000)]
    pub items: u32,
    /// Target share of transactions that are fraudulent.
    #[arg(long, default_value_t = 0.01)]
    pub fraud_rate: f64,
    /// Mean delay from a fraudulent transaction to its label (chargeback).
    #[arg(long, default_value = "1d", value_parser = parse_duration_ms)]
    pub label_delay: i64,
    /// Share of genuine transactions that also get a negative label.
    #[arg(long, default_value_t = 0.0)]
    pub negative_label_rate: f64,
    /// Destination.
    #[arg(long, value_enum, default_value_t = Out::Kafka)]
    pub out: Out,
    /// Directory of --out avro|json files.
    #[arg(long, default_value = "data/generated")]
    pub out_dir: PathBuf,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    #[arg(long, default_value = schemas::event::TXN_TOPIC)]
    pub txn_topic: String,
    #[arg(long, default_value = schemas::event::CLICK_TOPIC)]
    pub click_topic: String,
    #[arg(long, default_value = schemas::event::LABEL_TOPIC)]
    pub label_topic: String,
    /// Partitions of topics created here (existing topics are left as they are).
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Replication factor of topics created here.
    #[arg(long, default_value_t = 1)]
    pub replication_factor: i32,
    /// Kafka payload encoding.
    #[arg(long, value_enum, default_value_t = WireFormat::Avro)]
    pub format: WireFormat,
    /// Share of transactions and clicks written with schema v1 (exercises evolution).
    #[arg(long, default_value_t = 0.0)]
    pub v1_share: f64,
    /// Producer linger.ms.
    #[arg(long, default_value_t = 20)]
    pub linger_ms: u32,
    /// Producer batch.size in bytes.
    #[arg(long, default_value_t = 1_000_000)]
    pub batch_bytes: u32,
    /// Producer compression.type.
    #[arg(long, default_value = "lz4")]
    pub compression: String,
    /// Extra librdkafka producer properties, `key=value` (repeatable).
    #[arg(long = "producer-property", value_parser = parse_kv)]
    pub producer_properties: Vec<(String, String)>,
    /// Print the summary as one JSON object on stdout instead of a text line.
    #[arg(long)]
    pub summary_json: bool,
    /// Never draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Wall-clock ms when the flags were read (set by `run`): under
    /// --speedup 1 the simulation moves by the setup time after it.
    #[arg(skip)]
    pub read_at_ms: Option<i64>,
}

/// `--rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    Max,
    PerSec(f64),
}

fn parse_rate(s: &str) -> Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSec(r)),
        _ => Err(format!("expected a positive number or `max`, got {s:?}")),
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected key=value, got {s:?}"))
}

/// `500ms`, `90s`, `15m`, `2h`, `30d` (a bare number is seconds).
pub fn parse_duration_ms(s: &str) -> Result<i64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let unit_ms = match unit {
        "ms" => 1.0,
        "" | "s" => 1_000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        "d" => 86_400_000.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h, d)")),
    };
    Ok((n * unit_ms) as i64)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `now`, `now-30d`, epoch ms, `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM:SS[.fff]Z`.
pub fn parse_start(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if s == "now" {
        return Ok(now_ms());
    }
    if let Some(ago) = s.strip_prefix("now-") {
        return Ok(now_ms() - parse_duration_ms(ago)?);
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let bad =
        || format!("bad start time {s:?}: use now, now-30d, epoch ms or 2024-05-01T00:00:00Z");
    let (date, time) = s.split_once('T').unwrap_or((s, "00:00:00Z"));
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    let time = time.strip_suffix('Z').ok_or_else(bad)?;
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let t: Vec<i64> = hms
        .split(':')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    if d.len() != 3 || t.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    let millis: i64 = format!("{frac:0<3}")[..3].parse().map_err(|_| bad())?;
    let secs = days_from_civil(d[0], d[1], d[2]) * 86_400 + t[0] * 3_600 + t[1] * 60 + t[2];
    Ok(secs * 1_000 + millis)
}

/// Counts of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub events: u64,
    pub txns: u64,
    pub clicks: u64,
    pub labels: u64,
    pub fraud_txns: u64,
    pub first_event_ms: Option<i64>,
    pub last_event_ms: Option<i64>,
    pub elapsed_secs: f64,
}

impl Summary {
    fn add(&mut self, e: &GenEvent) {
        self.events += 1;
        match e {
            GenEvent::Txn { fraud, .. } => {
                self.txns += 1;
                self.fraud_txns += u64::from(fraud.is_some());
            }
            GenEvent::Click(_) => self.clicks += 1,
            GenEvent::Label(_) => self.labels += 1,
        }
        self.first_event_ms.get_or_insert(e.time_ms());
        self.last_event_ms = Some(e.time_ms());
    }

    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed_secs.max(1e-9)
    }

    fn json(&self, topics: &Topics) -> serde_json::Value {
        serde_json::json!({
            "events": self.events,
            "per_topic": { topics.txn.clone(): self.txns, topics.click.clone(): self.clicks, topics.label.clone(): self.labels },
            "fraud_txns": self.fraud_txns,
            "elapsed_secs": self.elapsed_secs,
            "events_per_sec": self.rate(),
            "first_event_ms": self.first_event_ms,
            "last_event_ms": self.last_event_ms,
        })
    }

    fn line(&self, topics: &Topics) -> String {
        let span_h = match (self.first_event_ms, self.last_event_ms) {
            (Some(a), Some(b)) => (b - a) as f64 / 3_600_000.0,
            _ => 0.0,
        };
        format!(
            "generated {} events in {:.1}s ({:.0} events/s): {}={} {}={} {}={}; fraud txns {} ({:.2}%); {:.1}h of event time",
            self.events,
            self.elapsed_secs,
            self.rate(),
            topics.txn,
            self.txns,
            topics.click,
            self.clicks,
            topics.label,
            self.labels,
            self.fraud_txns,
            100.0 * self.fraud_txns as f64 / self.txns.max(1) as f64,
            span_h,
        )
    }
}

impl GenerateArgs {
    /// The simulation config these flags describe.
    pub fn generator_config(&self) -> GeneratorConfig {
        let events_per_sec = self.sim_rate.unwrap_or(match (self.rate, self.speedup) {
            (Rate::PerSec(r), Some(s)) if s > 0.0 => r / s / rhythm_at(self.start_time),
            (Rate::PerSec(r), None) => r,
            _ => 1_000.0,
        });
        GeneratorConfig {
            seed: self.seed,
            start_time_ms: self.start_time - self.warmup.max(0),
            users: self.users,
            cards_per_user: self.cards_per_user,
            merchants: self.merchants,
            items: self.items,
            events_per_sec,
            session_share: 0.5,
            fraud_rate: self.fraud_rate,
            label_delay_ms: self.label_delay,
            negative_label_rate: self.negative_label_rate,
        }
    }

    fn topics(&self) -> Topics {
        Topics {
            txn: self.txn_topic.clone(),
            click: self.click_topic.clone(),
            label: self.label_topic.clone(),
        }
    }
}

/// Paces events so that event `n` at simulated `time_ms` is not emitted
/// before its wall-clock slot under --rate and --speedup.
struct Pacer {
    start: Instant,
    sim_start_ms: i64,
    rate: Option<f64>,
    speedup: Option<f64>,
}

impl Pacer {
    /// How long event `n` at `time_ms` must wait for its slot.
    fn ahead(&self, n: u64, time_ms: i64) -> Option<Duration> {
        let mut due = 0.0f64;
        if let Some(rate) = self.rate {
            due = due.max(n as f64 / rate);
        }
        if let Some(speedup) = self.speedup {
            due = due.max((time_ms - self.sim_start_ms) as f64 / 1_000.0 / speedup);
        }
        let ahead = due - self.start.elapsed().as_secs_f64();
        (ahead > 0.0).then(|| Duration::from_secs_f64(ahead))
    }
}

/// Runs `sfs generate`.
pub fn run(mut args: GenerateArgs) -> anyhow::Result<()> {
    args.read_at_ms.get_or_insert_with(now_ms);
    if args.events.is_none()
        && args.duration.is_none()
        && args.rate == Rate::Max
        && args.speedup.is_none()
    {
        bail!("refusing to generate forever at max rate: pass --events, --duration, --rate or --speedup");
    }
    if !(0.0..=0.5).contains(&args.fraud_rate) {
        bail!("--fraud-rate must be within [0, 0.5]");
    }
    let topics = args.topics();
    let sink: Box<dyn Sink> = match args.out {
        Out::Kafka => {
            let created = ensure_topics(
                &args.brokers,
                &topics,
                args.partitions,
                args.replication_factor,
            )?;
            if !created.is_empty() {
                tracing::info!(topics = ?created, partitions = args.partitions, "created topics");
            }
            Box::new(KafkaSink::new(KafkaOutput {
                brokers: args.brokers.clone(),
                topics: topics.clone(),
                partitions: args.partitions,
                replication_factor: args.replication_factor,
                format: args.format,
                v1_share: args.v1_share,
                linger_ms: args.linger_ms,
                batch_bytes: args.batch_bytes,
                compression: args.compression.clone(),
                extra: args.producer_properties.clone(),
            })?)
        }
        Out::Avro => Box::new(FileSink::new(&args.out_dir, &topics, FileFormat::Avro)?),
        Out::Json => Box::new(FileSink::new(
            &args.out_dir,
            &topics,
            FileFormat::JsonLines,
        )?),
        Out::Null => Box::new(NullSink),
    };
    let config = args.generator_config();
    tracing::info!(seed = config.seed, start_time_ms = config.start_time_ms, events_per_sim_sec = config.events_per_sec, out = ?args.out, "generating");
    let progress = progress_bar(&args);
    let summary = generate(Generator::new(config), sink, &args, &progress)?;
    progress.finish_and_clear();
    if args.summary_json {
        println!("{}", summary.json(&topics));
    } else {
        eprintln!("{}", summary.line(&topics));
    }
    Ok(())
}

fn progress_bar(args: &GenerateArgs) -> indicatif::ProgressBar {
    if args.no_progress || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match args.events {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} {per_sec} {msg}",
        )
        .expect("the template is valid"),
    );
    bar
}

/// Drives `generator` into `sink` under the limits and pacing of `args`.
pub fn generate(
    mut generator: Generator,
    mut sink: Box<dyn Sink>,
    args: &GenerateArgs,
    progress: &indicatif::ProgressBar,
) -> anyhow::Result<Summary> {
    let mut sim_start = args.start_time;
    let began = Instant::now();
    if args.warmup > 0 {
        // The generator started --warmup earlier: run it up to the start
        // without emitting.
        let skipped = generator.skip_until(sim_start);
        tracing::info!(
            skipped,
            took_ms = began.elapsed().as_millis() as u64,
            "warmed up"
        );
    }
    if args.speedup == Some(1.0) {
        // Event times keep their relation to the wall clock as of when the
        // flags were read (with `--start-time now` the first event is at about
        // now, not behind it by the setup and warm-up, which would make a
        // consumer that advanced idle partitions with the clock see it late):
        // what is still to come moves by the time that took.
        let setup_ms = match args.read_at_ms {
            Some(read) => now_ms() - read,
            None => began.elapsed().as_millis() as i64,
        };
        if setup_ms > 0 {
            generator.shift(setup_ms);
            sim_start += setup_ms;
        }
    }
    let start = Instant::now();
    let end_ms = args.duration.map(|d| sim_start.saturating_add(d));
    let pacer = Pacer {
        start,
        sim_start_ms: sim_start,
        rate: match args.rate {
            Rate::PerSec(r) => Some(r),
            Rate::Max => None,
        },
        speedup: args.speedup.filter(|s| *s > 0.0),
    };
    let paced = pacer.rate.is_some() || pacer.speedup.is_some();
    let mut summary = Summary::default();
    let mut buf = EventBuf::default();
    loop {
        let event = generator.next_into(&mut buf);
        if args.events.is_some_and(|n| summary.events >= n)
            || end_ms.is_some_and(|end| event.time_ms() >= end)
        {
            break;
        }
        if paced {
            // Before waiting, everything earlier leaves (a partial batch
            // must not sit in a buffer while the generator sleeps: the
            // events would reach Kafka late and in bursts).
            if pacer.ahead(summary.events, event.time_ms()).is_some() {
                sink.idle()?;
                if let Some(ahead) = pacer.ahead(summary.events, event.time_ms()) {
                    if ahead > Duration::from_millis(1) {
                        std::thread::sleep(ahead);
                    }
                }
            }
        }
        sink.send(event)
            .with_context(|| format!("sending a {} event", event.kind()))?;
        summary.add(event);
        if summary.events.is_multiple_of(8192) {
            progress.set_position(summary.events);
            if progress.length().is_none() {
                progress.set_message(format!("{} of event time", format_ms(event.time_ms())));
            }
        }
    }
    sink.finish()?;
    summary.elapsed_secs = start.elapsed().as_secs_f64();
    debug_assert!(EventKind::ALL.len() == 3);
    Ok(summary)
}

fn format_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    format!("day {} {:02}:{:02}", days, rem / 3_600, rem % 3_600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_start_times_parse() {
        assert_eq!(parse_duration_ms("90s"), Ok(90_000));
        assert_eq!(parse_duration_ms("1.5h"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("30d"), Ok(30 * 86_400_000));
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert!(parse_duration_ms("3w").is_err());
        assert_eq!(parse_start("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(parse_start("1970-01-02"), Ok(86_400_000));
        assert_eq!(parse_start("2024-02-29T00:00:00.5Z"), Ok(1_709_164_800_500));
        assert_eq!(parse_start("12345"), Ok(12_345));
        let ago = parse_start("now-1d").unwrap();
        assert!((now_ms() - 86_400_000 - ago).abs() < 60_000);
        assert!(parse_start("yesterday").is_err());
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("2500"), Ok(Rate::PerSec(2500.0)));
        assert!(parse_rate("-1").is_err());
    }
}
