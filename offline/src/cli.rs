//! `sfs backfill`: flags.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dataflow::cli::{load_features_or_exit, parse_topic, EXIT_INVALID};
use generator::cli::{parse_duration_ms, parse_start};

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
    /// Kafka bootstrap servers (with --from-kafka).
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Give up reading Kafka after this long (e.g. 10m).
    #[arg(long, default_value = "10m", value_parser = parse_duration_ms)]
    pub kafka_timeout: i64,
    /// Directory to write fraud.parquet and propensity.parquet into.
    #[arg(long, value_name = "DIR", default_value = ".data/backfill")]
    pub out: PathBuf,
    /// Feature definitions (default: features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
    /// Read source SOURCE from TOPIC (or file TOPIC.avro) instead of its topic
    /// in the feature definitions (repeatable).
    #[arg(long = "topic", value_name = "SOURCE=TOPIC", value_parser = parse_topic)]
    pub topics: Vec<(String, String)>,
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
    /// Print the summary as one JSON object instead of a text line.
    #[arg(long)]
    pub summary_json: bool,
}

/// Runs `sfs backfill`.
pub fn run(args: BackfillArgs) -> anyhow::Result<()> {
    let set = Arc::new(load_features_or_exit(args.features.as_deref()));
    if let Err(e) = set.check_tick(args.tick_ms) {
        eprintln!("error: --tick-ms {}: {e}", args.tick_ms);
        std::process::exit(EXIT_INVALID);
    }
    let mut sources: Vec<String> = set.sources.iter().map(|s| s.topic.clone()).collect();
    for (name, topic) in &args.topics {
        let Some(i) = set.sources.iter().position(|s| &s.name == name) else {
            eprintln!("error: --topic {name}={topic}: no source {name} in the feature definitions");
            std::process::exit(EXIT_INVALID);
        };
        sources[i] = topic.clone();
    }
    let topics = Topics {
        sources,
        labels: args.label_topic.clone(),
    };
    let source = match &args.input {
        Some(dir) => LogSource::Files(dir.clone()),
        None => LogSource::Kafka {
            brokers: args.brokers.clone(),
            timeout: Duration::from_millis(args.kafka_timeout.max(1) as u64),
        },
    };
    tracing::info!(?source, "reading the log");
    let log = log::read(&source, &set, &topics)?;
    anyhow::ensure!(
        !log.events.is_empty(),
        "the log has no events: generate some first (sfs generate --out avro --out-dir DIR)"
    );
    let config = BackfillConfig {
        tick_ms: args.tick_ms,
        workers: args.workers,
        label_cutoff_ms: args.label_cutoff,
        label_maturity_ms: args.label_maturity,
        purchase_window_ms: args.purchase_window,
        progress: !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let end = log.end_ms().unwrap_or(0);
    let metadata = vec![
        ("sfs.feature_set_version".to_owned(), set.version.clone()),
        ("sfs.tick_ms".to_owned(), args.tick_ms.to_string()),
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
    let summary = backfill::run(log, set, &config, output_files)?;
    let (fraud, views) = output::paths(&args.out);
    if args.summary_json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "backfill: {} events -> {} transactions ({} fraud, {} legit, {} pending) and {} views ({} purchased, {} pending) in {:.1} s ({:.0} transactions/s); wrote {} and {}",
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
            fraud.display(),
            views.display(),
        );
    }
    Ok(())
}
