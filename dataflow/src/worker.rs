//! Runs the streaming job on a timely cluster: threads (`-w`) and processes
//! (`-n`, `-p`, `--hostfile`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use schemas::FeatureSet;
use sinks::redis::{connect, load_function, read_ceiling, read_progress, ProgressRecord};
use timely::{CommunicationConfig, WorkerConfig};

use crate::config::StreamConfig;
use crate::metrics::Metrics;
use crate::shutdown::{Shutdown, DRAIN_LIMIT};
use crate::stream::{build, Prepared};

/// What a finished (bounded) run reports.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    /// The progress record worker 0 wrote last, if this process hosts it.
    pub progress: Option<ProgressRecord>,
}

/// Loads the Redis function and reads the progress record to resume from.
pub fn prepare(
    config: &StreamConfig,
    features: Arc<FeatureSet>,
    metrics: Metrics,
) -> anyhow::Result<Prepared> {
    let probe = Prepared {
        config: config.clone(),
        features,
        progress: None,
        ceiling: u64::MAX,
        decoder: Default::default(),
        metrics,
    };
    let sink = probe.sink_config();
    let mut conn = connect(&sink)?;
    load_function(&mut conn)?;
    let mut progress = read_progress(&mut conn, &sink)?;
    if let Some(p) = &progress {
        if p.feature_set_version != sink.features.version {
            tracing::warn!(
                found = %p.feature_set_version,
                expected = %sink.features.version,
                "progress record is of another feature-set version: starting over"
            );
            progress = None;
        } else {
            tracing::info!(
                frontier_ms = p.frontier_ms,
                partitions = p.partitions.len(),
                "resuming from progress record"
            );
        }
    }
    let ceiling = read_ceiling(&mut conn, &sink)?;
    let decoder = schemas::codec::Decoder::new(schemas::registry::from_env());
    Ok(Prepared {
        progress,
        ceiling,
        decoder,
        ..probe
    })
}

fn timely_config(config: &StreamConfig) -> anyhow::Result<timely::Config> {
    let c = &config.cluster;
    let threads = c.workers.max(1);
    let processes = c.processes.max(1);
    let communication = if processes > 1 {
        let addresses = if c.hostfile.is_empty() {
            (0..processes)
                .map(|p| format!("localhost:{}", 2101 + p))
                .collect()
        } else {
            let text = std::fs::read_to_string(&c.hostfile)
                .map_err(|e| anyhow::anyhow!("cannot read hostfile {}: {e}", c.hostfile))?;
            let addresses: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            anyhow::ensure!(
                addresses.len() >= processes,
                "hostfile {} lists {} hosts for {processes} processes",
                c.hostfile,
                addresses.len()
            );
            addresses
        };
        CommunicationConfig::Cluster {
            threads,
            process: c.process,
            addresses,
            report: false,
            zerocopy: false,
        }
    } else if threads > 1 {
        CommunicationConfig::Process(threads)
    } else {
        CommunicationConfig::Thread
    };
    Ok(timely::Config {
        communication,
        worker: WorkerConfig::default(),
    })
}

/// Runs the job until it ends (bounded) or forever.
pub fn run(
    config: StreamConfig,
    features: Arc<FeatureSet>,
    metrics: Metrics,
) -> anyhow::Result<RunSummary> {
    run_until(config, features, metrics, Shutdown::default())
}

/// Runs the job until it ends (bounded) or `shutdown` is requested; then
/// drains: worker 0 records progress for every acknowledged frontier (at
/// most [`crate::shutdown::DRAIN_LIMIT`]) and every worker stops.
pub fn run_until(
    config: StreamConfig,
    features: Arc<FeatureSet>,
    metrics: Metrics,
    shutdown: Shutdown,
) -> anyhow::Result<RunSummary> {
    config.validate()?;
    config.validate_with(&features)?;
    let prepared = prepare(&config, features, metrics)?;
    let timely = timely_config(&config)?;
    tracing::info!(
        workers = config.cluster.workers.max(1),
        processes = config.cluster.processes.max(1),
        process = config.cluster.process,
        until_end = config.cluster.until_end,
        "starting stream job"
    );
    let guards = timely::execute(
        timely,
        move |worker| -> Result<Option<ProgressRecord>, String> {
            let prepared = prepared.clone();
            let stage = worker
                .dataflow::<u64, _, _>(|scope| build(scope, &prepared))
                .map_err(|e| e.to_string())?;
            let mut drain_until: Option<Instant> = None;
            while worker.has_dataflows() {
                if shutdown.requested() {
                    let now = Instant::now();
                    let first = drain_until.is_none();
                    let until = *drain_until.get_or_insert(now + DRAIN_LIMIT);
                    // One step after the signal, so that what the sinks
                    // acknowledged by then reaches the progress stage.
                    if !first && worker.index() == 0 && stage.settled() {
                        shutdown.set_drained();
                    }
                    if shutdown.drained() || now >= until {
                        if worker.index() == 0 {
                            let frontier_ms = stage.durable().map(|p| p.frontier_ms);
                            if shutdown.drained() {
                                tracing::info!(?frontier_ms, "drained: progress recorded");
                            } else {
                                tracing::warn!(?frontier_ms, "drain limit passed: stopping");
                            }
                        }
                        for dataflow in worker.installed_dataflows() {
                            worker.drop_dataflow(dataflow);
                        }
                        break;
                    }
                }
                if stage.finished() {
                    // Bounded run: every row before the final frontier is
                    // durable (and recorded, on worker 0). What remains are
                    // retractions past the end of the log, which no sink
                    // writes: stop instead of draining them.
                    for dataflow in worker.installed_dataflows() {
                        worker.drop_dataflow(dataflow);
                    }
                    break;
                }
                worker.step_or_park(Some(Duration::from_millis(20)));
            }
            Ok(stage.durable())
        },
    )
    .map_err(|e| anyhow::anyhow!("timely: {e}"))?;
    let mut summary = RunSummary::default();
    for result in guards.join() {
        let progress = result
            .map_err(|e| anyhow::anyhow!("worker panicked: {e}"))?
            .map_err(|e| anyhow::anyhow!(e))?;
        if progress.is_some() {
            summary.progress = progress;
        }
    }
    Ok(summary)
}
