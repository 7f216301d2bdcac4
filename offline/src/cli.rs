//! `sfs backfill` and `sfs parity`: flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dataflow::cli::{load_features_or_exit, parse_topic, EXIT_INVALID};
use generator::cli::{parse_duration_ms, parse_start};
use schemas::FeatureSet;

use crate::backfill::{self, BackfillConfig};
use crate::log::{self, LogSource, Topics};
use crate::output::{self, Output};

/// Replay the event log through the feature graph into point-in-time
/// training sets (Parquet): one row per transaction with its features as of
/// its own time and its label as known at the cutoff, one row per product view.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  sfs generate --out avro --out-dir .data/log --start-time 2026-01-01 --duration 30d
  sfs backfill --input .data/log --out .data/backfill
  sfs backfill --from-kafka --label-cutoff 2026-01-25 --out .data/backfill")]
pub struct BackfillArgs {
    /// Directory of the generator's files (`<topic>.avro` or `<topic>.jsonl`).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "from_kafka",
        conflicts_with = "from_kafka"
    )]
    pub input: Option<PathBuf>,
    /// Read the topics from Kafka, from the beginning to their ends at start.
    #[arg(long)]
    pub from_kafka: bool,
    #[command(flatten)]
    pub replay: ReplayArgs,
    /// Directory to write fraud.parquet and propensity.parquet into.
    #[arg(long, value_name = "DIR", default_value = ".data/backfill")]
    pub out: PathBuf,
    /// Topic (or file stem) of the fraud labels.
    #[arg(long, default_value = schemas::event::LABEL_TOPIC)]
    pub label_topic: String,
    /// Labels that arrived after this are unknown: epoch ms or RFC 3339
    /// (default: the end of the log).
    #[arg(long, value_parser = parse_start)]
    pub label_cutoff: Option<i64>,
    /// A transaction without a fraud label by the cutoff counts as legitimate
    /// only when at least this old at the cutoff; younger ones are pending.
    #[arg(long, default_value = "7d", value_parser = parse_duration_ms)]
    pub label_maturity: i64,
    /// A product view is labelled by a purchase of its user within this long.
    #[arg(long, default_value = "30m", value_parser = parse_duration_ms)]
    pub purchase_window: i64,

    #[arg(long)]
    pub summary_json: bool,
}

/// Runs `sfs backfill`.
pub fn run(args: BackfillArgs) -> anyhow::Result<()> {
    without_huge_pages();
    let replay = &args.replay;
    let set = replay.feature_set();
    let topics = replay.topics(&set, &args.label_topic);
    let source = replay.source(args.input.as_ref());
    tracing::info!(?source, "reading the log");
    let reading = std::time::Instant::now();
    let log = log::read(&source, &set, &topics)?;
    let read_secs = reading.elapsed().as_secs_f64();
    anyhow::ensure!(
        !log.events.is_empty(),
        "the log has no events: generate some first (sfs generate --out avro --out-dir DIR)"
    );
    let config = BackfillConfig {
        tick_ms: replay.tick_ms,
        workers: replay.workers,
        label_cutoff_ms: args.label_cutoff,
        label_maturity_ms: args.label_maturity,
        purchase_window_ms: args.purchase_window,
        progress: replay.progress(),
    };
    let end = log.end_ms().unwrap_or(0);
    let metadata = vec![
        ("sfs.feature_set_version".to_owned(), set.version.clone()),
        ("sfs.tick_ms".to_owned(), replay.tick_ms.to_string()),
        (
            "sfs.label_cutoff_ms".to_owned(),
            args.label_cutoff.unwrap_or(end).to_string(),
        ),
        (
            "sfs.label_maturity_ms".to_owned(),
            args.label_maturity.to_string(),
        ),
        (
            "sfs.label_horizon_ms".to_owned(),
            args.purchase_window.to_string(),
        ),
        ("sfs.log_end_ms".to_owned(), end.to_string()),
        (
            "sfs.generated_by".to_owned(),
            format!("sfs {} backfill", env!("CARGO_PKG_VERSION")),
        ),
    ];
    tracing::info!(
        events = log.events.len(),
        labels = log.labels.len(),
        skipped = log.skipped,
        "replaying the log through the feature graph"
    );
    let output_files = Output::create(&args.out, &set, &metadata)?;
    let mut summary = backfill::run(log, set, &config, output_files)?;
    summary.read_secs = read_secs;
    let (fraud, views) = output::paths(&args.out);
    if args.summary_json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "backfill: {} events -> {} transactions ({} fraud, {} legit, {} pending) and {} views ({} purchased, {} pending) in {:.1} s ({:.0} transactions/s; the log read in {:.1} s before); wrote {} and {}",
            summary.events,
            summary.transactions,
            summary.fraud,
            summary.legit,
            summary.pending,
            summary.views,
            summary.views_purchased,
            summary.views_pending,
            summary.elapsed_secs,
            summary.transactions as f64 / summary.elapsed_secs.max(1e-9),
            summary.read_secs,
            fraud.display(),
            views.display(),
        );
    }
    Ok(())
}

/// Turns transparent huge pages off for this process. A replay allocates
/// its whole log at once and frees it in bulk, and the allocator asks for
/// huge pages (`madvise`), so with memory fragmented (after a build, or
/// another process) each fault first compacts memory: measured on the
/// 2-day log, 3.2-4.7 s more system time and a 7-7.5 s backfill taking
/// 10-11.4 s. Without them the replay's time does not depend on what ran before.
/// The stream job keeps them: its windows' state gains from them.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(PR_SET_THP_DISABLE) takes integer arguments only and
    // changes nothing but this process's page policy.
    #[allow(unsafe_code)]
    unsafe {
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
            tracing::debug!("could not turn transparent huge pages off");
        }
    }
}

/// What `sfs backfill` and `sfs parity` share: where the event log comes
/// from and how it is replayed.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Give up reading Kafka after this long (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration_ms)]
    pub kafka_timeout: i64,
    /// Read source SOURCE from TOPIC (or file TOPIC.avro) instead of its topic
    /// in the feature definitions (repeatable).
    #[arg(long = "topic", value_name = "SOURCE=TOPIC", value_parser = parse_topic)]
    pub topics: Vec<(String, String)>,
    /// Feature definitions (default: features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
    /// Dataflow tick (ms): the stream job's, so rows equal the online ones.
    #[arg(long, env = "SFS_TICK_MS", default_value_t = 1000)]
    pub tick_ms: u64,
    /// Worker threads.
    #[arg(
        short = 'w',
        long = "workers",
        env = "SFS_WORKERS",
        default_value_t = 2
    )]
    pub workers: usize,
    /// Never draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

impl ReplayArgs {
    /// The feature definitions, valid at `--tick-ms` (else exit 2).
    fn feature_set(&self) -> Arc<FeatureSet> {
        let set = load_features_or_exit(self.features.as_deref());
        if let Err(e) = set.check_tick(self.tick_ms) {
            eprintln!("error: --tick-ms {}: {e}", self.tick_ms);
            std::process::exit(EXIT_INVALID);
        }
        Arc::new(set)
    }

    /// The topics to read: each source's from the definitions unless
    /// overridden by `--topic SOURCE=TOPIC` (exit 2 naming an unknown source).
    fn topics(&self, set: &FeatureSet, labels: &str) -> Topics {
        let mut sources: Vec<String> = set.sources.iter().map(|s| s.topic.clone()).collect();
        for (name, topic) in &self.topics {
            let Some(i) = set.sources.iter().position(|s| &s.name == name) else {
                eprintln!(
                    "error: --topic {name}={topic}: no source {name} in the feature definitions"
                );
                std::process::exit(EXIT_INVALID);
            };
            sources[i] = topic.clone();
        }
        Topics {
            sources,
            labels: labels.to_owned(),
        }
    }

    fn kafka_timeout(&self) -> Duration {
        Duration::from_millis(self.kafka_timeout.max(1) as u64)
    }

    /// The generator's files in `input`, else Kafka.
    fn source(&self, input: Option<&PathBuf>) -> LogSource {
        match input {
            Some(dir) => LogSource::Files(dir.clone()),
            None => LogSource::Kafka {
                brokers: self.brokers.clone(),
                timeout: self.kafka_timeout(),
            },
        }
    }

    /// Whether to draw a progress bar: not asked not to, and on a terminal.
    fn progress(&self) -> bool {
        !self.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr())
    }
}

/// Check served feature vectors against the same vectors recomputed from the
/// event log: read the served-vector log (`scores.log`, written by `sfs
/// serve`), replay the events through the backfill's feature graph as of
/// each served row's time, and report per model input the mismatch rate, the
/// missing rate and SMAPE.
#[derive(Debug, Clone, clap::Args)]
#[command(after_help = "Examples:
  sfs parity                                  # scores.log and the events, from Kafka
  sfs parity --json --fail-below 0.999        # for CI: exit 1 below 99.9% identical
  sfs parity --watch 1m --metrics-listen 127.0.0.1:9465   # continuously, as gauges")]
pub struct ParityArgs {
    #[arg(long, default_value = schemas::score::SCORES_TOPIC)]
    pub scores_topic: String,
    /// Read the events from the generator's files in DIR instead of Kafka.
    #[arg(long, value_name = "DIR")]
    pub input: Option<PathBuf>,
    #[command(flatten)]
    pub replay: ReplayArgs,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit 1 when fewer than this fraction of the checked vectors are identical.
    #[arg(long, value_name = "FRACTION")]
    pub fail_below: Option<f64>,
    /// Run again every INTERVAL (e.g. 1m), publishing the report as gauges.
    #[arg(long, value_name = "INTERVAL", value_parser = parse_duration_ms)]
    pub watch: Option<i64>,
    /// Serve the gauges on HOST:PORT/metrics (with --watch).
    #[arg(long, value_name = "HOST:PORT", requires = "watch")]
    pub metrics_listen: Option<String>,
}

/// Runs `sfs parity`.
pub fn run_parity(args: ParityArgs) -> anyhow::Result<()> {
    without_huge_pages();
    let set = args.replay.feature_set();
    let topics = args.replay.topics(&set, schemas::event::LABEL_TOPIC);
    let gauges = crate::parity::Gauges::default();
    if let Some(addr) = &args.metrics_listen {
        gauges.serve(addr)?;
    }
    loop {
        let report = parity_pass(&args, &set, &topics)?;
        gauges.publish(&report);
        if args.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            print!("{}", report.table());
            println!(
                "parity: {} of {} served vectors identical ({:.3}%), {} unverifiable, {} events replayed in {:.1} s",
                report.identical,
                report.checked,
                100.0 * report.identical_rate,
                report.unverifiable.values().sum::<u64>(),
                report.events,
                report.elapsed_secs
            );
        }
        let Some(every) = args.watch else {
            if let Some(min) = args.fail_below {
                if report.checked == 0 || report.identical_rate < min {
                    eprintln!(
                        "error: {:.4} of {} vectors identical, below --fail-below {min}",
                        report.identical_rate, report.checked
                    );
                    std::process::exit(1);
                }
            }
            return Ok(());
        };
        std::thread::sleep(Duration::from_millis(every.max(1) as u64));
    }
}

/// One parity check of the whole served-vector log.
fn parity_pass(
    args: &ParityArgs,
    set: &Arc<FeatureSet>,
    topics: &Topics,
) -> anyhow::Result<crate::parity::Report> {
    let replay = &args.replay;
    // The scores first: every event a served row aggregated is in the
    // event log by the time the events are read after them.
    let mut records = Vec::new();
    let mut unreadable = 0u64;
    log::read_topics(
        &replay.brokers,
        replay.kafka_timeout(),
        std::slice::from_ref(&args.scores_topic),
        |_, m| match schemas::score::ScoreRecord::decode(
            rdkafka::Message::payload(m).unwrap_or_default(),
        ) {
            Ok(r) => records.push(r),
            Err(e) => {
                unreadable += 1;
                tracing::debug!(error = %e, offset = rdkafka::Message::offset(m), "unreadable score record");
            }
        },
    )?;
    tracing::info!(records = records.len(), unreadable, topic = %args.scores_topic, "read the served-vector log");
    let log = log::read(&replay.source(args.input.as_ref()), set, topics)?;
    tracing::info!(events = log.events.len(), "replaying the log");
    let mut report = crate::parity::check(
        &records,
        log,
        Arc::clone(set),
        replay.tick_ms,
        replay.workers,
        replay.progress(),
    )?;
    if unreadable > 0 {
        report
            .unverifiable
            .insert("unreadable record".into(), unreadable);
        report.records += unreadable;
    }
    Ok(report)
}
