//! Server configuration: a typed TOML file, with command-line overrides.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Everything `sfs serve` can be told. Defaults run locally.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address of the scoring API.
    pub listen: SocketAddr,
    /// Optional separate address for `/metrics` (it is always on `listen` too).
    pub metrics_listen: Option<SocketAddr>,
    /// Redis URL of the online store.
    pub redis_url: String,
    /// Prefix of every Redis key (`{prefix}card:{id}`).
    pub key_prefix: String,
    /// Deadline of one Redis round trip, after which the request fails with 503.
    pub redis_deadline_ms: u64,
    /// Timeout of one attempt to (re)connect to Redis.
    pub redis_connect_timeout_ms: u64,
    /// Consecutive Redis failures that open the circuit breaker.
    pub breaker_failure_threshold: u32,
    /// How long the breaker stays open before it lets one probe request through.
    pub breaker_cooldown_ms: u64,
    /// Model registry folder: `{models_dir}/{name}/{version}/model.onnx + metadata.json`.
    pub models_dir: PathBuf,
    /// How often the registry is polled for a newer version.
    pub model_poll_ms: u64,
    /// libonnxruntime to load; when unset, `ORT_DYLIB_PATH`, then `.venv`.
    pub ort_dylib_path: Option<PathBuf>,
    /// ONNX Runtime sessions per model (requests run on whichever is free).
    pub model_sessions: usize,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Log one `score computed` line every this many scored requests (0: never).
    pub log_sample_every: u64,
    /// How long SIGTERM waits for in-flight requests before it exits anyway.
    pub drain_timeout_ms: u64,
    /// Tokio worker threads (0: one per core).
    pub worker_threads: usize,
    /// Feature definitions (`features.toml`); unset: `$SFS_FEATURES`, else
    /// `features.toml` in the working directory.
    pub features: Option<PathBuf>,
    /// The stream job's `/metrics` addresses (`host:port`, one per process),
    /// scraped by the status page at `GET /`.
    pub stream_metrics: Vec<String>,
    /// Most entity rows in one `POST /get-online-features` request.
    pub feast_max_entities: usize,
    /// The Feast project name (`sfs feast init --project`), in Feast-style errors.
    pub feast_project: String,
    /// Kafka brokers of the served-vector log (`scores.log`); unset: no log.
    pub score_log_brokers: Option<String>,
    /// Fraction of scored requests logged (0..=1; 0: none).
    pub score_log_sample_rate: f64,
    /// Topic of the served-vector log.
    pub score_log_topic: String,
    /// Records waiting for the log's producer; more are dropped, never waited for.
    pub score_log_queue: usize,
    /// How long a record may wait for Kafka before it is dropped.
    pub score_log_message_timeout_ms: u64,
    /// Feature drift: the sliding window of served values compared with the
    /// models' reference histograms (0: drift detection off).
    pub drift_window_secs: u64,
    /// Time slices of the drift window; the oldest expires as it slides.
    pub drift_slices: usize,
    /// Fewer scored requests in the window: no PSI / JS gauges.
    pub drift_min_samples: u64,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            metrics_listen: None,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: schemas::features::DEFAULT_KEY_PREFIX.into(),
            redis_deadline_ms: 25,
            redis_connect_timeout_ms: 100,
            breaker_failure_threshold: 5,
            breaker_cooldown_ms: 500,
            models_dir: PathBuf::from("models"),
            model_poll_ms: 1000,
            ort_dylib_path: None,
            model_sessions: 2,
            max_body_bytes: 16 * 1024,
            log_sample_every: 1000,
            drain_timeout_ms: 10_000,
            worker_threads: 0,
            features: None,
            stream_metrics: vec!["127.0.0.1:8088".into()],
            feast_max_entities: crate::feast::DEFAULT_MAX_ENTITIES,
            feast_project: crate::feast::DEFAULT_PROJECT.into(),
            score_log_brokers: None,
            score_log_sample_rate: 0.01,
            score_log_topic: schemas::score::SCORES_TOPIC.into(),
            score_log_queue: 10_000,
            score_log_message_timeout_ms: 5_000,
            drift_window_secs: 600,
            drift_slices: 10,
            drift_min_samples: 200,
        }
    }
}

impl ServeConfig {
    /// Reads a TOML file; missing fields keep their defaults.
    pub fn from_file(path: &Path) -> anyhow::Result<ServeConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("parsing config {}: {e}", path.display()))
    }

    /// The drift window settings, checked (the error names the key).
    pub fn drift(&self) -> anyhow::Result<crate::drift::DriftConfig> {
        crate::drift::DriftConfig::new(
            self.drift_window_secs,
            self.drift_slices,
            self.drift_min_samples,
        )
        .map_err(anyhow::Error::msg)
    }
}

/// `sfs serve`: the scoring server.
#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Example:\n  sfs serve --listen 127.0.0.1:8080 --models-dir models --stream-metrics 127.0.0.1:8088\n  then open http://127.0.0.1:8080/ (the status page)\n  sfs serve --score-log-brokers 127.0.0.1:9092 --score-log-sample-rate 0.05   (log 5% of served vectors to scores.log)"
)]
pub struct ServeArgs {
    /// TOML config file (see server/serve.example.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address to listen on, overriding the config.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Separate address for /metrics, overriding the config.
    #[arg(long)]
    pub metrics_listen: Option<SocketAddr>,
    /// Redis URL, overriding the config.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Redis key prefix, overriding the config.
    #[arg(long)]
    pub key_prefix: Option<String>,
    /// Model registry folder, overriding the config.
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
    /// libonnxruntime path, overriding the config (else ORT_DYLIB_PATH).
    #[arg(long)]
    pub ort_dylib_path: Option<PathBuf>,
    /// Feature definitions, overriding the config (default features.toml).
    #[arg(long, env = "SFS_FEATURES")]
    pub features: Option<PathBuf>,
    /// The stream job's /metrics address for the status page (repeatable;
    /// overrides the config's stream_metrics).
    #[arg(long = "stream-metrics", value_name = "HOST:PORT")]
    pub stream_metrics: Vec<String>,
    /// Kafka brokers of the served-vector log (scores.log), overriding the
    /// config's score_log_brokers: setting them turns the log on.
    #[arg(long, value_name = "HOST:PORT")]
    pub score_log_brokers: Option<String>,
    /// Fraction of scored requests logged to scores.log (0..=1), overriding the config.
    #[arg(long, value_name = "FRACTION")]
    pub score_log_sample_rate: Option<f64>,
}

impl ServeArgs {
    /// The config file (or defaults) with the flags applied.
    pub fn resolve(&self) -> anyhow::Result<ServeConfig> {
        let ServeArgs {
            config,
            listen,
            metrics_listen,
            redis_url,
            key_prefix,
            models_dir,
            ort_dylib_path,
            features,
            stream_metrics,
            score_log_brokers,
            score_log_sample_rate,
        } = self.clone();
        let mut cfg = match config {
            Some(path) => ServeConfig::from_file(&path)?,
            None => ServeConfig::default(),
        };
        if let Some(v) = listen {
            cfg.listen = v;
        }
        if metrics_listen.is_some() {
            cfg.metrics_listen = metrics_listen;
        }
        if let Some(v) = redis_url {
            cfg.redis_url = v;
        }
        if let Some(v) = key_prefix {
            cfg.key_prefix = v;
        }
        if let Some(v) = models_dir {
            cfg.models_dir = v;
        }
        if ort_dylib_path.is_some() {
            cfg.ort_dylib_path = ort_dylib_path;
        }
        if features.is_some() {
            cfg.features = features;
        }
        if !stream_metrics.is_empty() {
            cfg.stream_metrics = stream_metrics;
        }
        if score_log_brokers.is_some() {
            cfg.score_log_brokers = score_log_brokers;
        }
        if let Some(v) = score_log_sample_rate {
            cfg.score_log_sample_rate = v;
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_example_config_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("serve.example.toml");
        let cfg = ServeConfig::from_file(&path).unwrap();
        assert_eq!(cfg.key_prefix, "sfs:");
        assert_eq!(cfg.listen.port(), 8080);
    }

    #[test]
    fn the_features_flag_overrides_the_config() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("serve.example.toml");
        let cli = Cli::parse_from([
            "serve".as_ref(),
            "--config".as_ref(),
            example.as_os_str(),
            "--features".as_ref(),
            "defs/other.toml".as_ref(),
        ]);
        let cfg = cli.serve.resolve().unwrap();
        assert_eq!(cfg.features.as_deref(), Some(Path::new("defs/other.toml")));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<ServeConfig>("listen_port = 1").unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
    }
}
