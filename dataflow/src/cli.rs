//! `sfs stream`: flags and environment over the TOML config.

use std::path::PathBuf;

use schemas::FeatureSet;

use crate::config::StreamConfig;
use crate::metrics::Metrics;

/// Exit code of a command given invalid feature definitions or config.
pub const EXIT_INVALID: i32 = 2;

/// Run the streaming feature job: Kafka -> features -> Redis.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(after_help = "Example:\n  sfs stream --features features.toml -w 2 --until-end")]
pub struct StreamArgs {
    /// TOML config file (see config/stream.example.toml); flags and env override it.
    #[arg(long, short = 'c', env = "SFS_STREAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Feature definitions (default: features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
    /// Worker threads per process.
    #[arg(short = 'w', long = "workers", env = "SFS_WORKERS")]
    pub workers: Option<usize>,
    /// Processes in the timely cluster.
    #[arg(short = 'n', long = "processes", env = "SFS_PROCESSES")]
    pub processes: Option<usize>,
    /// This process's index in the cluster.
    #[arg(short = 'p', long = "process", env = "SFS_PROCESS")]
    pub process: Option<usize>,
    /// File of host:port lines, one per process.
    #[arg(long, env = "SFS_HOSTFILE")]
    pub hostfile: Option<String>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Consumer group for committed offsets.
    #[arg(long, env = "SFS_GROUP_ID")]
    pub group_id: Option<String>,
    /// Read source SOURCE from TOPIC instead of its topic in the feature
    /// definitions (repeatable: --topic txn=txn.test --topic click=click.test).
    #[arg(long = "topic", value_name = "SOURCE=TOPIC", value_parser = parse_topic)]
    pub topics: Vec<(String, String)>,
    /// Redis URL.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key written.
    #[arg(long, env = "SFS_KEY_PREFIX")]
    pub key_prefix: Option<String>,
    /// Dataflow tick (ms); every feature window must be a multiple of it.
    #[arg(long, env = "SFS_TICK_MS")]
    pub tick_ms: Option<u64>,
    /// Allowed lateness (ms).
    #[arg(long, env = "SFS_ALLOWED_LATENESS_MS")]
    pub allowed_lateness_ms: Option<u64>,
    /// Idle-partition timeout (ms, 0 = never).
    #[arg(long, env = "SFS_IDLE_TIMEOUT_MS")]
    pub idle_timeout_ms: Option<u64>,
    /// Address of /metrics (empty disables).
    #[arg(long, env = "SFS_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Read up to the high watermarks captured at start, then exit (replay, tests).
    #[arg(long, env = "SFS_UNTIL_END")]
    pub until_end: bool,
}

impl StreamArgs {
    /// The config file (or defaults) with every given flag applied.
    pub fn resolve(&self) -> anyhow::Result<StreamConfig> {
        let mut config = match &self.config {
            Some(path) => StreamConfig::load(path)?,
            None => StreamConfig::default(),
        };
        let StreamArgs {
            config: _,
            workers,
            processes,
            process,
            hostfile,
            brokers,
            group_id,
            features: _,
            topics,
            redis_url,
            key_prefix,
            tick_ms,
            allowed_lateness_ms,
            idle_timeout_ms,
            metrics_listen,
            until_end,
        } = self.clone();
        fn set<T>(target: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *target = v;
            }
        }
        set(&mut config.cluster.workers, workers);
        set(&mut config.cluster.processes, processes);
        set(&mut config.cluster.process, process);
        set(&mut config.cluster.hostfile, hostfile);
        set(&mut config.kafka.brokers, brokers);
        set(&mut config.kafka.group_id, group_id);
        config.kafka.topics.extend(topics);
        set(&mut config.redis.url, redis_url);
        set(&mut config.redis.key_prefix, key_prefix);
        set(&mut config.time.tick_ms, tick_ms);
        set(&mut config.time.allowed_lateness_ms, allowed_lateness_ms);
        set(&mut config.time.idle_timeout_ms, idle_timeout_ms);
        set(&mut config.metrics.listen, metrics_listen);
        config.cluster.until_end |= until_end;
        config.validate()?;
        Ok(config)
    }
}

/// A `--topic SOURCE=TOPIC` flag.
pub fn parse_topic(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((source, topic)) if !source.is_empty() && !topic.is_empty() => {
            Ok((source.to_owned(), topic.to_owned()))
        }
        _ => Err(format!("{text:?} is not SOURCE=TOPIC")),
    }
}

/// The feature definitions at `path` (else `$SFS_FEATURES`, else
/// `features.toml`); on a problem, prints every one and exits with code 2.
pub fn load_features_or_exit(path: Option<&std::path::Path>) -> FeatureSet {
    match FeatureSet::load_default(path) {
        Ok(set) => set,
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("fix the feature definitions (docs/FEATURES.md), then run again");
            std::process::exit(EXIT_INVALID);
        }
    }
}

/// Check the feature definitions and print their catalogue and version.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(
    after_help = "Examples:\n  sfs features\n  sfs features --features my.toml --tick-ms 100\n  sfs features --version"
)]
pub struct FeaturesArgs {
    /// Feature definitions (default: features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
    /// Also check that every window is a multiple of this tick (ms).
    #[arg(long)]
    pub tick_ms: Option<u64>,
    /// Print only the feature-set version.
    #[arg(long)]
    pub version: bool,
    /// Print the definitions as one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `sfs features`: exit 0 with the catalogue, or 2 with every problem.
pub fn features(args: FeaturesArgs) -> anyhow::Result<()> {
    let set = load_features_or_exit(args.features.as_deref());
    if let Some(tick_ms) = args.tick_ms {
        if let Err(e) = set.check_tick(tick_ms) {
            eprintln!("error: {e}");
            std::process::exit(EXIT_INVALID);
        }
    }
    if args.version {
        println!("{}", set.version);
        return Ok(());
    }
    let count: usize = set.entities.iter().map(|e| e.features.len()).sum();
    if args.json {
        let entities: Vec<_> = set
            .entities
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "key": e.key,
                    "features": e.features.iter().map(|f| {
                        let schema = set.sources[f.source].schema;
                        let filter: serde_json::Map<String, serde_json::Value> = f
                            .filter
                            .iter()
                            .map(|(i, v)| (schema.fields()[*i].name.to_owned(), serde_json::json!(v)))
                            .collect();
                        serde_json::json!({
                            "name": f.name,
                            "source": set.sources[f.source].name,
                            "aggregation": f.aggregation,
                            "field": f.field.map(|i| schema.fields()[i].name),
                            "window_ms": f.window_ms,
                            "filter": filter,
                            "kind": f.kind(),
                        })
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        // A view's or service's features by name, as Feast names them.
        let row_name = |view: &schemas::features::FeatureView, position: usize| {
            set.entities[view.entity].features[position].name.clone()
        };
        let views: Vec<_> = set
            .views
            .iter()
            .map(|v| {
                serde_json::json!({
                    "name": v.name,
                    "entity": set.entities[v.entity].name,
                    "features": v.features.iter().map(|&p| row_name(v, p)).collect::<Vec<_>>(),
                    "ttl_ms": v.ttl_ms,
                })
            })
            .collect();
        let services: Vec<_> = set
            .services
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "features": s.features.iter().map(|&(v, p)| {
                        format!("{}:{}", set.views[v].name, row_name(&set.views[v], p))
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "version": set.version,
                "widest_window_ms": set.widest_window_ms(),
                "sources": set.sources,
                "entities": entities,
                "feature_views": views,
                "feature_services": services,
            })
        );
    } else {
        print!("{set}");
        println!(
            "{count} features over {} entities, widest window {}, version {}",
            set.entities.len(),
            schemas::features::format_window(set.widest_window_ms()),
            set.version
        );
    }
    Ok(())
}

/// `sfs stream`.
pub fn run(args: StreamArgs) -> anyhow::Result<()> {
    let set = load_features_or_exit(args.features.as_deref());
    let config = match args
        .resolve()
        .and_then(|c| Ok(c.validate_with(&set).map(|_| c)?))
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(EXIT_INVALID);
        }
    };
    let metrics = Metrics::new();
    if !config.metrics.listen.is_empty() {
        let addr = offset_port(&config.metrics.listen, config.cluster.process)?;
        metrics.serve(&addr)?;
    }
    tracing::info!(version = %set.version, entities = set.entities.len(), "feature definitions loaded");
    let shutdown = crate::shutdown::Shutdown::on_signal()?;
    let sink = metrics.sink.clone();
    let summary =
        crate::worker::run_until(config, std::sync::Arc::new(set), metrics, shutdown.clone())?;
    // The last offset commit goes out with the committer's close.
    operators::kafka::wait_for_closes(crate::shutdown::CLOSE_WAIT);
    if shutdown.requested() {
        tracing::info!("stream job stopped on request");
    }
    if let Some(progress) = summary.progress {
        tracing::info!(frontier_ms = progress.frontier_ms, "stream job finished");
        println!(
            "{}",
            serde_json::json!({
                "frontier_ms": progress.frontier_ms,
                "partitions": progress.partitions.len(),
                "rows_written": sink.rows_written.get(),
                "rows_deleted": sink.rows_deleted.get(),
                "rows_skipped": sink.rows_skipped.get(),
                "rows_direct": sink.rows_direct.get(),
                "rows_partial": sink.rows_partial.get(),
            })
        );
    }
    Ok(())
}

/// `host:port` with the port moved up by `by` (one metrics port per process).
fn offset_port(addr: &str, by: usize) -> anyhow::Result<String> {
    if by == 0 {
        return Ok(addr.to_owned());
    }
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow::anyhow!("metrics address {addr} has no port"))?;
    let port: u16 = port.parse()?;
    Ok(format!("{host}:{}", port as usize + by))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file() {
        let args = StreamArgs {
            workers: Some(4),
            key_prefix: Some("t:".into()),
            until_end: true,
            ..Default::default()
        };
        let config = args.resolve().unwrap();
        assert_eq!(config.cluster.workers, 4);
        assert_eq!(config.redis.key_prefix, "t:");
        assert!(config.cluster.until_end);
        assert!(config.kafka.topics.is_empty());
        let args = StreamArgs {
            topics: vec![parse_topic("txn=t.x").unwrap()],
            ..Default::default()
        };
        assert_eq!(args.resolve().unwrap().kafka.topics["txn"], "t.x");
        assert!(parse_topic("txn").is_err());
        assert_eq!(offset_port("127.0.0.1:8088", 2).unwrap(), "127.0.0.1:8090");
    }
}
