//! The HTTP application: routes, handlers, the JSON responses. `app(state)`
//! builds it; tests call `App::handle` without a socket, `serve` runs it on one.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Body;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use schemas::features::FeatureRow;
use serde_json::{json, Value};

use crate::error::ApiError;
use crate::features::{Context, TxnContext, CARD_ENTITY, USER_ENTITY};
use crate::metrics::{Metrics, Route};
use crate::model::registry::Registry;
use crate::model::{now_ms, Model, ModelKind};
use crate::request::{check_id, FraudRequest, PropensityRequest, RequestIds, REQUEST_ID_HEADER};
use crate::store::{FeatureStore, Rows};

/// What the handlers share.
pub struct AppState {
    pub store: FeatureStore,
    pub models: Registry,
    pub metrics: Arc<Metrics>,
    pub max_body_bytes: usize,
    pub log_sample_every: u64,
    /// Index of the card entity in the feature set (keyed by `card_id`).
    card: usize,
    /// Index of the user entity in the feature set (keyed by `user_id`).
    user: usize,
    /// The cold-start counter of each entity of the feature set.
    cold_starts: Vec<Counter>,
    scored: AtomicU64,
    draining: AtomicBool,
    /// The status page's scrape targets and rate samples.
    pub status: crate::status::StatusState,
    /// Settings of the Feast route (`POST /get-online-features`).
    pub feast: crate::feast::FeastSettings,
    /// The served-vector log (`scores.log`), when on.
    pub score_log: Option<crate::score_log::ScoreLog>,
    request_ids: RequestIds,
}

impl AppState {
    /// The state over the store's feature set, which must define the
    /// entities the scoring routes read (the error says which is missing).
    pub fn new(
        store: FeatureStore,
        models: Registry,
        metrics: Arc<Metrics>,
        max_body_bytes: usize,
        log_sample_every: u64,
    ) -> Result<AppState, String> {
        let set = store.features().clone();
        let entity = |name: &str| {
            set.entity_index(name).ok_or_else(|| {
                format!(
                    "the feature set ({}) has no entity {name}, which the scoring routes read",
                    set.version
                )
            })
        };
        let (card, user) = (entity(CARD_ENTITY)?, entity(USER_ENTITY)?);
        let cold_starts = set
            .entities
            .iter()
            .map(|e| metrics.cold_start_counter(&e.name))
            .collect();
        Ok(AppState {
            store,
            models,
            metrics,
            max_body_bytes,
            log_sample_every,
            card,
            user,
            cold_starts,
            scored: AtomicU64::new(0),
            draining: AtomicBool::new(false),
            status: Default::default(),
            feast: Default::default(),
            score_log: None,
            request_ids: RequestIds::new(),
        })
    }
}

/// Who asked for a score: the request id and the `(entity index, id)`
/// reads, in order (for the served-vector log).
struct Served<'a> {
    request_id: &'a str,
    reads: &'a [(usize, &'a str)],
}

/// The application: cheap to clone, one per connection.
#[derive(Clone)]
pub struct App {
    state: Arc<AppState>,
}

/// Builds the application over its state.
pub fn app(state: AppState) -> App {
    App {
        state: Arc::new(state),
    }
}

type Resp = Response<Full<Bytes>>;

fn json_response(status: StatusCode, body: &Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError) -> Resp {
    json_response(e.status(), &e.body())
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

impl App {
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Marks the server as draining: `/ready` turns 503 so balancers stop
    /// sending, while requests still in flight or arriving are served.
    pub fn start_draining(&self) {
        self.state.draining.store(true, Ordering::SeqCst);
    }

    /// Answers one request.
    pub async fn handle<B>(&self, req: Request<B>) -> Resp
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let start = Instant::now();
        let request_id = self
            .state
            .request_ids
            .of(req.headers().get(REQUEST_ID_HEADER));
        let (route, result) = self.route(req, start, &request_id).await;
        let mut resp = result.unwrap_or_else(|e| error_response(&e));
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(REQUEST_ID_HEADER, v);
        }
        self.state
            .metrics
            .request(route, resp.status().as_u16(), start.elapsed());
        resp
    }

    async fn route<B>(
        &self,
        req: Request<B>,
        start: Instant,
        request_id: &str,
    ) -> (Route, Result<Resp, ApiError>)
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let path = req.uri().path().to_owned();
        let explain = req.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv == "explain=true" || kv == "explain=1")
        });
        let method = req.method().clone();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let post = method == Method::POST;
        let get = method == Method::GET || method == Method::HEAD;
        match segments.as_slice() {
            ["score", "fraud"] => (
                Route::score_fraud,
                if post {
                    self.fraud(req, explain, start, request_id).await
                } else {
                    Err(ApiError::MethodNotAllowed)
                },
            ),
            ["score", "propensity"] => (
                Route::score_propensity,
                if post {
                    self.propensity(req, explain, start, request_id).await
                } else {
                    Err(ApiError::MethodNotAllowed)
                },
            ),
            ["get-online-features"] => (
                Route::get_online_features,
                if post {
                    let body = self.body(req.into_body()).await;
                    Ok(crate::feast::get_online_features(&self.state, body).await)
                } else {
                    Err(ApiError::MethodNotAllowed)
                },
            ),
            ["features", entity, id] if get => (Route::features, self.features(entity, id).await),
            ["health"] if get => (
                Route::health,
                // As Feast's feature server answers: 200, empty body.
                Ok(Response::new(Full::new(Bytes::new()))),
            ),
            ["ready"] if get => (Route::ready, Ok(self.ready().await)),
            ["metrics"] if get => (Route::metrics, Ok(metrics_response(&self.state.metrics))),
            ["models"] if get => (Route::models, Ok(self.models())),
            [""] if get => (Route::status, Ok(status_page())),
            ["status.json"] if get => (Route::status, Ok(self.status_json().await)),
            ["features", _, _] | ["health"] | ["ready"] | ["metrics"] | ["models"] => {
                (Route::other, Err(ApiError::MethodNotAllowed))
            }
            _ => (Route::other, Err(ApiError::NotFound)),
        }
    }

    async fn body<B>(&self, body: B) -> Result<Bytes, ApiError>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limit = self.state.max_body_bytes;
        if body.size_hint().lower() > limit as u64 {
            return Err(ApiError::TooLarge(limit));
        }
        match Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                Err(ApiError::TooLarge(limit))
            }
            Err(e) => Err(ApiError::BadJson(format!("reading the body: {e}"))),
        }
    }

    async fn fraud<B>(
        &self,
        req: Request<B>,
        explain: bool,
        start: Instant,
        request_id: &str,
    ) -> Result<Resp, ApiError>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body = self.body(req.into_body()).await?;
        let r = FraudRequest::parse(&body)?;
        let (card, user) = (self.state.card, self.state.user);
        let mut reads = vec![(card, r.card_id.as_str())];
        reads.extend(r.user_id.as_deref().map(|id| (user, id)));
        let Rows { rows, frontier_ms } = self.state.store.rows(&self.state.metrics, &reads).await?;
        let now = now_ms();
        let ctx = Context {
            rows,
            frontier_ms,
            txn: TxnContext {
                amount_minor: r.amount_minor,
                country: r.country,
                channel: r.channel,
                time_ms: r.event_time_ms.unwrap_or(now),
            },
        };
        let served = Served {
            request_id,
            reads: &reads,
        };
        self.score(
            ModelKind::Fraud,
            &ctx,
            &[card, user],
            &served,
            explain,
            now,
            start,
        )
    }

    async fn propensity<B>(
        &self,
        req: Request<B>,
        explain: bool,
        start: Instant,
        request_id: &str,
    ) -> Result<Resp, ApiError>
    where
        B: Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let body = self.body(req.into_body()).await?;
        let r = PropensityRequest::parse(&body)?;
        let user = self.state.user;
        let reads = [(user, r.user_id.as_str())];
        let Rows { rows, frontier_ms } = self.state.store.rows(&self.state.metrics, &reads).await?;
        let now = now_ms();
        let ctx = Context {
            rows,
            frontier_ms,
            txn: TxnContext {
                time_ms: now,
                ..Default::default()
            },
        };
        let served = Served {
            request_id,
            reads: &reads,
        };
        self.score(
            ModelKind::Propensity,
            &ctx,
            &[user],
            &served,
            explain,
            now,
            start,
        )
    }

    /// Scores `ctx` with the active model of `kind`; `entities` are the
    /// entities the route reads, reported as cold starts when absent.
    #[allow(clippy::too_many_arguments)]
    fn score(
        &self,
        kind: ModelKind,
        ctx: &Context,
        entities: &[usize],
        served: &Served<'_>,
        explain: bool,
        now: i64,
        start: Instant,
    ) -> Result<Resp, ApiError> {
        let model: Arc<Model> = self.state.models.slot(kind).get();
        let mut x = Vec::with_capacity(model.plan.len());
        ctx.vector(&model.plan, &mut x);
        let model_start = Instant::now();
        let score = model
            .score(&x)
            .map_err(|e| ApiError::Model(e.to_string()))?;
        let metrics = &self.state.metrics;
        metrics.scored(
            kind.name(),
            model.engine_name(),
            score,
            model_start.elapsed(),
        );
        if let Some(drift) = &model.drift {
            drift.record(&x);
        }

        let features = self.state.store.features();
        let mut cold = Vec::with_capacity(entities.len());
        for &e in entities {
            if ctx.row(e).is_none() {
                self.state.cold_starts[e].inc();
                cold.push(features.entities[e].name.as_str());
            }
        }
        // A stored row is exact as of the job's durable frontier even when it
        // has not changed (and so not been rewritten) since its own `_as_of`.
        let as_of = ctx
            .rows
            .iter()
            .flatten()
            .map(|r| r.as_of_ms.max(ctx.frontier_ms.unwrap_or(i64::MIN)))
            .min();
        let decision = model.decide(score);
        let latency = start.elapsed();
        let mut body = json!({
            "score": score,
            "decision": decision,
            "model_version": model.label,
            "model_engine": model.engine_name(),
            "latency_ms": ms(latency),
            "features_used": model.features,
            "as_of_ms": as_of,
            "feature_age_ms": as_of.map(|t| (now - t).max(0)),
            "cold_start": !cold.is_empty(),
            "cold_start_entities": cold,
            "request_id": served.request_id,
        });
        if explain {
            body["feature_vector"] = model
                .features
                .iter()
                .zip(&x)
                .map(|(name, v)| json!({"name": name, "value": v}))
                .collect();
        }
        if let Some(log) = &self.state.score_log {
            if log.sample() {
                log.offer(crate::score_log::record(
                    served.request_id,
                    kind,
                    &model,
                    features,
                    ctx,
                    served.reads,
                    &x,
                    score,
                    decision,
                    now,
                ));
            }
        }
        let n = self.state.scored.fetch_add(1, Ordering::Relaxed);
        let every = self.state.log_sample_every;
        if every > 0 && n.is_multiple_of(every) {
            tracing::info!(
                model = kind.name(),
                version = %model.label,
                score,
                decision,
                cold_start = !cold.is_empty(),
                feature_age_ms = as_of.map(|t| now - t),
                latency_us = latency.as_micros() as u64,
                sampled_1_in = every,
                "score computed"
            );
        }
        Ok(json_response(StatusCode::OK, &body))
    }

    async fn features(&self, name: &str, id: &str) -> Result<Resp, ApiError> {
        let set = self.state.store.features();
        let Some(entity) = set.entity(name) else {
            let known: Vec<&str> = set.entities.iter().map(|e| e.name.as_str()).collect();
            return Err(ApiError::NoSuchEntity(format!(
                "unknown entity {name}: the feature set defines {}",
                known.join(", ")
            )));
        };
        check_id("id", id)?;
        let row = self
            .state
            .store
            .row(&self.state.metrics, entity, id)
            .await?;
        let Some(row) = row else {
            return Err(ApiError::NoSuchEntity(format!("no {name} row for {id}")));
        };
        Ok(json_response(
            StatusCode::OK,
            &row_json(&row, &set.version, now_ms()),
        ))
    }

    async fn ready(&self) -> Resp {
        let draining = self.state.draining.load(Ordering::SeqCst);
        let redis = !draining && self.state.store.ping(&self.state.metrics).await;
        let models: serde_json::Map<String, Value> = self
            .state
            .models
            .slots()
            .iter()
            .map(|s| (s.kind.name().to_owned(), Value::from(s.get().label.clone())))
            .collect();
        let ready = redis && !draining;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({
                "status": if ready { "ready" } else if draining { "draining" } else { "not ready" },
                "redis": if redis { "ok" } else { "unavailable" },
                "breaker": format!("{:?}", self.state.store.breaker_state()).to_lowercase(),
                "models": models,
            }),
        )
    }

    async fn status_json(&self) -> Resp {
        let models = self.models_json()["models"].take();
        let own = self.state.metrics.encode();
        let body = self.state.status.snapshot(&own, models, now_ms()).await;
        json_response(StatusCode::OK, &body)
    }

    fn models(&self) -> Resp {
        json_response(StatusCode::OK, &self.models_json())
    }

    fn models_json(&self) -> Value {
        let models: Vec<Value> = self
            .state
            .models
            .slots()
            .iter()
            .map(|slot| {
                let m = slot.get();
                json!({
                    "name": slot.kind.name(),
                    "model_version": m.label,
                    "version": m.version,
                    "engine": m.engine_name(),
                    "features": m.features,
                    "default_decision": m.default_decision,
                    "thresholds": m.thresholds,
                    "path": m.path,
                    "loaded_at_ms": m.loaded_at_ms,
                    "training": m.training,
                    "last_load_error": slot.last_error(),
                })
            })
            .collect();
        json!({
            "registry": self.state.models.dir(),
            "feature_set_version": self.state.store.features().version,
            "models": models,
        })
    }
}

/// The JSON of a feature row, read under feature-set `version`.
pub fn row_json(row: &FeatureRow, version: &str, now: i64) -> Value {
    let features: serde_json::Map<String, Value> = row
        .entity
        .features
        .iter()
        .zip(&row.values)
        .map(|(spec, v)| {
            let value = match v {
                schemas::Value::Int(i) => Value::from(*i),
                schemas::Value::Float(f) => Value::from(*f),
            };
            (spec.name.clone(), value)
        })
        .collect();
    json!({
        "entity": row.entity.name,
        "id": row.id,
        "as_of_ms": row.as_of_ms,
        "age_ms": (now - row.as_of_ms).max(0),
        "feature_set_version": version,
        "features": features,
    })
}

/// `GET /`: the status page (self-contained; it polls `status.json`).
fn status_page() -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from_static(
        crate::status::PAGE.as_bytes(),
    )));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// `/metrics` in the Prometheus text format.
pub fn metrics_response(metrics: &Metrics) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(metrics.encode())));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

impl<B> hyper::service::Service<Request<B>> for App
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Resp;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, Infallible>> + Send>>;

    fn call(&self, req: Request<B>) -> Self::Future {
        let app = self.clone();
        Box::pin(async move { Ok(app.handle(req).await) })
    }
}
