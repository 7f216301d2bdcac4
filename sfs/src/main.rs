//! `sfs`: the one binary of the streaming feature store. Each subcommand is a
//! thin call into its crate.

use clap::{Parser, Subcommand};

mod allocator;
mod inspect;

/// Streaming feature store with online inference.
#[derive(Debug, Parser)]
#[command(
    name = "sfs",
    version,
    about,
    after_help = "Example:\n  make up && sfs generate --events 100000 && sfs stream -w 2 --until-end && sfs serve"
)]
struct Cli {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, global = true, env = "SFS_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the build version and exit.
    #[command(after_help = "Example:\n  sfs version")]
    Version,
    /// Generate transactions, clicks and delayed fraud labels to Kafka or files.
    #[command(
        after_help = "Examples:\n  sfs generate --start-time now-1h --duration 1h --sim-rate 100\n  sfs generate --rate 20000                       # live traffic\n  sfs generate --out json --out-dir /tmp/events --events 1000"
    )]
    Generate(generator::GenerateArgs),
    /// Serve fraud and propensity scores over HTTP from the online store.
    Serve(server::ServeArgs),
    /// Run the streaming feature job: Kafka -> sliding-window features -> Redis.
    Stream(dataflow::cli::StreamArgs),
    /// Check the feature definitions (features.toml); print the catalogue and version.
    Features(dataflow::cli::FeaturesArgs),
    /// Replay the event log through the feature graph into point-in-time training sets (Parquet).
    Backfill(offline::cli::BackfillArgs),
    /// Check served feature vectors (scores.log) against the same vectors recomputed from the event log.
    Parity(offline::cli::ParityArgs),
    /// Feast compatibility: write a Feast repository whose online store is sfs serve.
    #[command(
        subcommand,
        after_help = "Example:\n  sfs feast init feast_repo --url http://127.0.0.1:8080"
    )]
    Feast(FeastCommand),
    /// Dead-letter topics: replay fixed records to their source topic.
    #[command(subcommand, after_help = "Example:\n  sfs dlq replay --help")]
    Dlq(DlqCommand),
    /// One terminal screen of the running system: topic rates, lag, frontier, dead letters, live rows, models.
    Inspect(inspect::InspectArgs),
}

#[derive(Debug, Subcommand)]
enum FeastCommand {
    /// Write feature_store.yaml (online store: this server) and the entity,
    /// feature view and feature service definitions of features.toml.
    Init(server::feast_init::FeastInitArgs),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Re-publish a dead-letter topic's records to the topics they came from.
    #[command(
        after_help = "Examples:\n  sfs dlq replay --topic txn.events.dlq\n  sfs dlq replay --topic txn.events.dlq --reason unknown_schema_id"
    )]
    Replay(dataflow::dlq::ReplayArgs),
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    let (result, next) = match cli.command {
        Command::Version => {
            println!("sfs {}", env!("CARGO_PKG_VERSION"));
            (Ok(()), "")
        }
        Command::Generate(args) => (
            generator::run(args),
            "check that Kafka answers at --brokers (make up; make health), then run again",
        ),
        Command::Serve(args) => (
            server::run(args),
            "check the serve config and flags (sfs serve --help) and that the listen address is free",
        ),
        Command::Stream(args) => (
            dataflow::cli::run(args),
            "check that Kafka (--brokers, KAFKA_BROKERS) and Redis (--redis-url, REDIS_URL) answer (make up; make health) and that the metrics port is free, then run again: it resumes from its progress record",
        ),
        Command::Features(args) => (
            dataflow::cli::features(args),
            "fix the feature definitions (docs/FEATURES.md), then run again",
        ),
        Command::Dlq(DlqCommand::Replay(args)) => (
            dataflow::dlq::run(args),
            "check that Kafka answers at --brokers and the dead-letter topic exists, then run again",
        ),
        Command::Backfill(args) => (
            {
                allocator::keep_freed_memory();
                offline::cli::run(args)
            },
            "check --input (the --out-dir of sfs generate --out avro|json) or that Kafka answers at --brokers with --from-kafka, then run again",
        ),
        Command::Parity(args) => (
            {
                allocator::keep_freed_memory();
                offline::cli::run_parity(args)
            },
            "check that Kafka answers at --brokers and that sfs serve logs scored requests to --scores-topic (score_log_sample_rate), then run again",
        ),
        Command::Feast(FeastCommand::Init(args)) => (
            server::feast_init::run(args),
            "check that DIR is writable and --url is where sfs serve listens, then run again",
        ),
        Command::Inspect(args) => (inspect::run(args), "make up; make health"),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        if !next.is_empty() {
            eprintln!("next: {next}");
        }
        std::process::exit(1);
    }
}
