//! Running the application on sockets: the accept loop, the model poller,
//! graceful shutdown, and `sfs serve`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use schemas::features::{DefinitionError, FeatureSet};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::app::{app, metrics_response, App, AppState};
use crate::breaker::Breaker;
use crate::config::{ServeArgs, ServeConfig};
use crate::metrics::Metrics;
use crate::model::registry::Registry;
use crate::score_log::{ScoreLog, ScoreLogConfig, ScoreLogMetrics};
use crate::store::FeatureStore;

/// Builds the application from a config and the loaded feature definitions
/// (see [`load_features`]): Redis client (lazy), models, metrics.
pub fn build(cfg: &ServeConfig, features: Arc<FeatureSet>) -> anyhow::Result<App> {
    let ServeConfig {
        listen: _,
        metrics_listen: _,
        redis_url,
        key_prefix,
        redis_deadline_ms,
        redis_connect_timeout_ms,
        breaker_failure_threshold,
        breaker_cooldown_ms,
        models_dir,
        model_poll_ms: _,
        ort_dylib_path,
        model_sessions,
        max_body_bytes,
        log_sample_every,
        drain_timeout_ms: _,
        worker_threads: _,
        features: _,
        stream_metrics,
        feast_max_entities,
        feast_project,
        score_log_brokers,
        score_log_sample_rate,
        score_log_topic,
        score_log_queue,
        score_log_message_timeout_ms,
        drift_window_secs: _,
        drift_slices: _,
        drift_min_samples: _,
    } = cfg;
    let mut metrics = Metrics::new();
    let score_log_metrics = ScoreLogMetrics::register(&mut metrics.registry);
    let metrics = Arc::new(metrics);
    let score_log = match score_log_brokers {
        Some(brokers) => ScoreLog::start(
            &ScoreLogConfig {
                brokers: brokers.clone(),
                topic: score_log_topic.clone(),
                sample_rate: *score_log_sample_rate,
                queue: *score_log_queue,
                message_timeout: Duration::from_millis(*score_log_message_timeout_ms),
            },
            score_log_metrics,
        )?,
        None => None,
    };
    let breaker = Breaker::new(
        *breaker_failure_threshold,
        Duration::from_millis(*breaker_cooldown_ms),
    );
    let store = FeatureStore::new(
        redis_url,
        features.clone(),
        key_prefix,
        Duration::from_millis(*redis_deadline_ms),
        Duration::from_millis(*redis_connect_timeout_ms),
        breaker,
    )?;
    let models = Registry::open_with_drift(
        models_dir,
        features,
        *model_sessions,
        ort_dylib_path.as_deref(),
        &metrics,
        cfg.drift()?,
    )?;
    let mut state = AppState::new(store, models, metrics, *max_body_bytes, *log_sample_every)
        .map_err(anyhow::Error::msg)?;
    state.status = crate::status::StatusState::new(stream_metrics.clone());
    state.feast = crate::feast::FeastSettings {
        max_entities: *feast_max_entities,
        project: feast_project.clone(),
    };
    state.score_log = score_log;
    Ok(app(state))
}

/// The feature definitions `sfs serve` reads: `path` (`--features` or the
/// config's `features`), else `$SFS_FEATURES`, else `./features.toml`. The
/// error lists every problem and says what to fix.
pub fn load_features(path: Option<&std::path::Path>) -> Result<FeatureSet, String> {
    FeatureSet::load_default(path).map_err(|e| {
        let fix = match e {
            DefinitionError::Read { .. } => {
                "point --features (or SFS_FEATURES, or `features` in the serve config) at the feature definitions"
            }
            DefinitionError::Syntax { .. } | DefinitionError::Invalid { .. } => {
                "fix the feature definitions (fields: docs/FEATURES.md) and start again"
            }
        };
        format!("sfs serve: cannot use the feature definitions: {e}\n{fix}")
    })
}

/// Polls the model registry every `every` and hot-swaps newer versions.
pub fn spawn_model_poller(app: &App, every: Duration) -> tokio::task::JoinHandle<()> {
    let app = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let polled = app.clone();
            let result = tokio::task::spawn_blocking(move || {
                let state = polled.state();
                state.models.poll(&state.metrics);
            })
            .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "model poll panicked");
            }
        }
    })
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting,
/// lets in-flight requests finish (up to `drain`) and returns.
pub async fn serve(
    listener: TcpListener,
    app: App,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let app = app.clone();
                let mut stop = stop_rx.clone();
                conns.spawn(async move {
                    let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), app);
                    let mut conn = std::pin::pin!(conn);
                    tokio::select! {
                        result = conn.as_mut() => {
                            if let Err(e) = result {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        _ = stop.changed() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    app.start_draining();
    drop(listener);
    let in_flight = conns.len();
    tracing::info!(
        connections = in_flight,
        "shutting down: draining in-flight requests"
    );
    let _ = stop_tx.send(true);
    let drained =
        tokio::time::timeout(drain, async { while conns.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!(
            left = conns.len(),
            "drain timeout passed, closing the remaining connections"
        );
        conns.shutdown().await;
    }
    tracing::info!("server stopped");
    Ok(())
}

/// Serves `/metrics` alone on its own listener.
async fn serve_metrics(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let svc =
                hyper::service::service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(metrics_response(&metrics)) }
                });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// `sfs serve`. Feature definitions that cannot be read or are invalid
/// print every problem and exit with code 2.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.resolve()?;
    let features = match load_features(cfg.features.as_deref()) {
        Ok(set) => Arc::new(set),
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    tracing::info!(version = %features.version, entities = features.entities.len(),
        features = features.entities.iter().map(|e| e.features.len()).sum::<usize>(), "feature set loaded");
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if cfg.worker_threads > 0 {
        rt.worker_threads(cfg.worker_threads);
    }
    let rt = rt.enable_all().thread_name("sfs-serve").build()?;
    rt.block_on(async move {
        let app = build(&cfg, features)?;
        let listener = TcpListener::bind(cfg.listen).await?;
        tracing::info!(addr = %listener.local_addr()?, redis = %cfg.redis_url, prefix = %cfg.key_prefix,
            models = %cfg.models_dir.display(), "serving");
        if let Some(addr) = cfg.metrics_listen {
            let metrics_listener = TcpListener::bind(addr).await?;
            tracing::info!(addr = %addr, "serving /metrics");
            tokio::spawn(serve_metrics(metrics_listener, app.state().metrics.clone()));
        }
        let poller = spawn_model_poller(&app, Duration::from_millis(cfg.model_poll_ms.max(50)));
        let drift = crate::drift::spawn_ticker(&app);
        serve(listener, app.clone(), termination(), Duration::from_millis(cfg.drain_timeout_ms)).await?;
        poller.abort();
        if let Some(ticker) = drift {
            ticker.abort();
        }
        if let Some(log) = &app.state().score_log {
            // Blocking, bounded by the message timeout: the server has stopped.
            let timeout = Duration::from_millis(cfg.score_log_message_timeout_ms);
            tokio::task::block_in_place(|| log.close(timeout));
        }
        Ok(())
    })
}
