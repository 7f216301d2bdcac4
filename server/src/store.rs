//! The online store client: the rows of any entities of the loaded feature
//! set in one pipelined round trip, under a deadline and behind the circuit
//! breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use schemas::features::{Entity, FeatureRow, FeatureSet, RowError};

use crate::breaker::{Admit, Breaker, BreakerState};
use crate::error::ApiError;
use crate::metrics::{Metrics, RedisOutcome};
use crate::resp::{Commands, Replies, Reply, RespClient, RespError};

/// The decoded rows of one request.
#[derive(Debug, Clone, Default)]
pub struct Rows {
    /// By entity (index into `FeatureSet::entities`); `None` when not asked
    /// for, absent, or of another feature-set version.
    pub rows: Vec<Option<FeatureRow>>,
    /// The stream job's durable frontier (`{prefix}_progress` `frontier_ms`):
    /// every row stored is exact as of it, including rows unchanged since
    /// their own `_as_of`. `None` before the job has recorded progress.
    pub frontier_ms: Option<i64>,
}

/// Reads feature rows from Redis.
pub struct FeatureStore {
    redis: RespClient,
    features: Arc<FeatureSet>,
    prefix: String,
    progress_key: String,
    deadline: Duration,
    breaker: Breaker,
    /// Per entity, the hash fields a row is read from (`HMGET`), in
    /// `FeatureRow::decode_fields` order.
    read_fields: Vec<Vec<String>>,
    /// `PING`, encoded once.
    ping: Commands,
}

impl FeatureStore {
    /// Creates the client without connecting: the first request connects, so
    /// the server starts (not ready) while Redis is down. Rows are decoded
    /// with the layout and version of `features`.
    pub fn new(
        url: &str,
        features: Arc<FeatureSet>,
        prefix: &str,
        deadline: Duration,
        connect_timeout: Duration,
        breaker: Breaker,
    ) -> Result<FeatureStore, RespError> {
        let redis = RespClient::new(url, connect_timeout)?;
        let mut ping = Commands::new();
        ping.push("PING", &[]);
        let read_fields = features
            .entities
            .iter()
            .map(FeatureRow::read_fields)
            .collect();
        Ok(FeatureStore {
            read_fields,
            redis,
            ping,
            features,
            prefix: prefix.to_owned(),
            progress_key: format!("{prefix}_progress"),
            deadline,
            breaker,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The feature set the rows are decoded with.
    pub fn features(&self) -> &Arc<FeatureSet> {
        &self.features
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Runs one Redis call under the breaker and the deadline.
    async fn call<T, F>(&self, metrics: &Metrics, f: F) -> Result<T, ApiError>
    where
        F: std::future::Future<Output = Result<T, RespError>>,
    {
        if self.breaker.admit() == Admit::No {
            metrics.redis(RedisOutcome::rejected, Duration::ZERO);
            return Err(ApiError::StoreUnavailable);
        }
        let start = Instant::now();
        let outcome = tokio::time::timeout(self.deadline, f).await;
        let elapsed = start.elapsed();
        let (result, label) = match outcome {
            Ok(Ok(v)) => (Ok(v), RedisOutcome::ok),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis call failed");
                (Err(ApiError::StoreUnavailable), RedisOutcome::error)
            }
            Err(_) => (Err(ApiError::StoreUnavailable), RedisOutcome::timeout),
        };
        metrics.redis(label, elapsed);
        let changed = if result.is_ok() {
            self.breaker.success()
        } else {
            self.breaker.failure()
        };
        if let Some(state) = changed {
            tracing::warn!(state = ?state, "redis circuit breaker changed state");
            metrics.breaker(state);
        }
        result
    }

    /// The rows of `reads`, (entity index into `FeatureSet::entities`, id)
    /// pairs, and the job's durable frontier, in one round trip.
    pub async fn rows(&self, metrics: &Metrics, reads: &[(usize, &str)]) -> Result<Rows, ApiError> {
        let mut rows = Rows {
            rows: vec![None; self.features.entities.len()],
            frontier_ms: None,
        };
        let (found, frontier) = self.rows_many(metrics, reads).await?;
        rows.frontier_ms = frontier;
        for (&(entity, _), row) in reads.iter().zip(found) {
            rows.rows[entity] = row;
        }
        Ok(rows)
    }

    /// The rows of many `(entity index, id)` reads, in order, and the job's
    /// durable frontier: one pipelined round trip for the whole batch (the
    /// Feast route's `POST /get-online-features`). The reads are one
    /// `MULTI`/`EXEC` transaction, so they are a single snapshot: the stream
    /// job's atomic commit (rows + frontier, one Lua script) lands wholly
    /// before or wholly after them, and the rows are exact as of the
    /// frontier read with them.
    pub async fn rows_many(
        &self,
        metrics: &Metrics,
        reads: &[(usize, &str)],
    ) -> Result<(Vec<Option<FeatureRow>>, Option<i64>), ApiError> {
        if reads.is_empty() {
            return Ok((Vec::new(), None));
        }
        let mut commands = Commands::new();
        commands.push("MULTI", &[]);
        for &(entity, id) in reads {
            let fields = &self.read_fields[entity];
            commands.start("HMGET", 1 + fields.len());
            commands.arg_parts(&self.features.entities[entity].redis_key_parts(&self.prefix, id));
            fields.iter().for_each(|f| commands.arg(f.as_bytes()));
        }
        commands.push("HGET", &[&self.progress_key, "frontier_ms"]);
        commands.push("EXEC", &[]);
        let replies: Replies = self.call(metrics, self.redis.query(&commands)).await?;
        // MULTI's OK and one QUEUED per command come first; EXEC's array last.
        let exec = replies.get(replies.len() - 1);
        let Some(Reply::Array(mut items)) = exec else {
            return Err(ApiError::BadRow(format!("EXEC answered {exec:?}")));
        };
        if items.len() != reads.len() + 1 {
            return Err(ApiError::BadRow(format!(
                "{} replies to {} row reads",
                items.len(),
                reads.len()
            )));
        }
        let mut values: Vec<Option<&str>> = Vec::new();
        let mut rows = Vec::with_capacity(reads.len());
        for &(entity, id) in reads {
            let reply = items.next().expect("counted");
            rows.push(self.decode(&self.features.entities[entity], id, reply, &mut values)?);
        }
        let frontier = match items.next().expect("counted") {
            Reply::Nil => None,
            reply => Some(reply.as_str().and_then(|s| s.parse().ok()).ok_or_else(|| {
                ApiError::BadRow(format!("{} frontier_ms is {reply:?}", self.progress_key))
            })?),
        };
        Ok((rows, frontier))
    }

    /// One row, for `GET /features/{entity}/{id}`.
    pub async fn row(
        &self,
        metrics: &Metrics,
        entity: &Entity,
        id: &str,
    ) -> Result<Option<FeatureRow>, ApiError> {
        let index = self
            .features
            .entity_index(&entity.name)
            .expect("an entity of the store's feature set");
        let (mut rows, _) = self.rows_many(metrics, &[(index, id)]).await?;
        Ok(rows.pop().flatten())
    }

    /// Decodes a stored row. A row of another feature-set version is one the
    /// stream job has not rewritten yet after a feature-set change: it is
    /// treated as missing (the response says cold start) rather than failing
    /// the request.
    fn decode<'a>(
        &self,
        entity: &Entity,
        id: &str,
        reply: Reply<'a>,
        values: &mut Vec<Option<&'a str>>,
    ) -> Result<Option<FeatureRow>, ApiError> {
        // HMGET's reply: one bulk string or nil per field, read in place.
        let Reply::Array(items) = reply else {
            return Err(ApiError::BadRow(format!(
                "HMGET of {} {id} answered {reply:?}",
                entity.name
            )));
        };
        values.clear();
        values.extend(items.map(|v| v.as_str()));
        match FeatureRow::decode_fields(entity, &self.features.version, id, values) {
            Ok(row) => Ok(row),
            Err(e @ RowError::Version { .. }) => {
                tracing::debug!(error = %e, "row of another feature-set version treated as missing");
                Ok(None)
            }
            Err(e) => Err(ApiError::BadRow(e.to_string())),
        }
    }

    /// Whether Redis answers a PING within the deadline (and the breaker lets it).
    pub async fn ping(&self, metrics: &Metrics) -> bool {
        let pong = self.call(metrics, self.redis.query(&self.ping)).await;
        matches!(
            pong.as_ref().map(|r| r.get(0)),
            Ok(Some(Reply::Simple(b"PONG")))
        )
    }
}
