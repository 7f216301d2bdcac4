//! The online store client: the rows of any entities of the loaded feature
//! set in one pipelined round trip, under a deadline and behind the circuit
//! breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use schemas::features::{Entity, FeatureRow, FeatureSet, RowError};

use crate::breaker::{Admit, Breaker, BreakerState};
use crate::error::ApiError;
use crate::metrics::{Metrics, RedisOutcome};

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
    conn: ConnectionManager,
    features: Arc<FeatureSet>,
    prefix: String,
    progress_key: String,
    deadline: Duration,
    breaker: Breaker,
    /// Per entity, the hash fields a row is read from (`HMGET`), in
    /// `FeatureRow::decode_fields` order.
    read_fields: Vec<Vec<String>>,
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
    ) -> Result<FeatureStore, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(deadline))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(5))
            .set_max_delay(Duration::from_millis(50));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        let read_fields = features
            .entities
            .iter()
            .map(FeatureRow::read_fields)
            .collect();
        Ok(FeatureStore {
            read_fields,
            conn,
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
        F: std::future::Future<Output = redis::RedisResult<T>>,
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
        let mut pipe = redis::pipe();
        pipe.atomic();
        for &(entity, id) in reads {
            pipe.cmd("HMGET")
                .arg(self.features.entities[entity].redis_key(&self.prefix, id))
                .arg(&self.read_fields[entity]);
        }
        pipe.hget(&self.progress_key, "frontier_ms");
        let mut conn = self.conn.clone();
        let (replies, frontier): (Vec<redis::Value>, Option<i64>) = self
            .call(metrics, async move {
                let mut replies: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                let frontier: Option<Option<i64>> =
                    replies.pop().map(redis::from_redis_value).transpose()?;
                Ok((replies, frontier.flatten()))
            })
            .await?;
        if replies.len() != reads.len() {
            return Err(ApiError::BadRow(format!(
                "{} replies to {} row reads",
                replies.len(),
                reads.len()
            )));
        }
        let rows = reads
            .iter()
            .zip(&replies)
            .map(|(&(entity, id), reply)| self.decode(&self.features.entities[entity], id, reply))
            .collect::<Result<_, _>>()?;
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
    fn decode(
        &self,
        entity: &Entity,
        id: &str,
        reply: &redis::Value,
    ) -> Result<Option<FeatureRow>, ApiError> {
        // HMGET's reply: one bulk string or nil per field, read in place.
        let redis::Value::Array(items) = reply else {
            return Err(ApiError::BadRow(format!(
                "HMGET of {} {id} answered {reply:?}",
                entity.name
            )));
        };
        let values: Vec<Option<&str>> = items
            .iter()
            .map(|v| match v {
                redis::Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
                _ => None,
            })
            .collect();
        match FeatureRow::decode_fields(entity, &self.features.version, id, &values) {
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
        let mut conn = self.conn.clone();
        let pong: Result<String, _> = self
            .call(metrics, async move {
                redis::cmd("PING").query_async(&mut conn).await
            })
            .await;
        pong.is_ok()
    }
}
