//! `sfs`: the one binary of the streaming feature store. Each subcommand is a
//! thin call into its crate.

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Streaming feature store with online inference.
#[derive(Debug, Parser)]
#[command(name = "sfs", version, about)]
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
    Version,
    /// Generate transactions, clicks and delayed fraud labels to Kafka or files.
    Generate(generator::GenerateArgs),
    /// Serve fraud and propensity scores over HTTP from the online store.
    Serve(server::ServeArgs),
    /// Run the streaming feature job: Kafka -> sliding-window features -> Redis.
    Stream(dataflow::cli::StreamArgs),
    /// Check the feature definitions (features.toml); print the catalogue and version.
    Features(dataflow::cli::FeaturesArgs),
    /// Replay the event log through the feature graph into point-in-time training sets (Parquet).
    Backfill(offline::cli::BackfillArgs),
    /// Dead-letter topics: replay fixed records to their source topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
}

#[derive(Debug, Subcommand)]
enum DlqCommand {
    /// Re-publish a dead-letter topic's records to the topics they came from.
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    match cli.command {
        Command::Version => println!("sfs {}", env!("CARGO_PKG_VERSION")),
        Command::Generate(args) => generator::run(args)?,
        Command::Serve(args) => server::run(args)?,
        Command::Stream(args) => dataflow::cli::run(args)?,
        Command::Features(args) => dataflow::cli::features(args)?,
        Command::Backfill(args) => offline::cli::run(args)?,
        Command::Dlq(DlqCommand::Replay(args)) => dataflow::dlq::run(args)?,
    }
    Ok(())
}
