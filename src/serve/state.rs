//! What every handler reads: the Redis connection, the key prefix, the
//! brokers `/readyz` checks, and the in-process catalogue of the published
//! recommendation model (refreshed when `{p}:reco:meta` shows a new
//! version); and the JSON error every handler answers with.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::factors::index::ItemIndex;
use crate::factors::mips::MipsIndex;
use crate::sink::redis_sink::Health;

/// What the router reads.
#[derive(Clone)]
pub struct ServeState {
    pub redis: Option<redis::aio::ConnectionManager>,
    pub prefix: String,
    /// When set, `/readyz` also checks that the brokers answer.
    pub kafka_brokers: Option<String>,
    /// The published model's items and trending list, cached in process and
    /// refreshed by [`serve`] on an interval.
    pub items: ItemCache,
    /// In `pulse run`: the pipeline's Redis side output, whose degraded
    /// state `/readyz` reports (set once the store exists).
    pub sink: Arc<OnceLock<Arc<Health>>>,
}

/// One snapshot of the published recommendation model, as `/recommend` serves it.
#[derive(Debug, Default)]
pub struct Catalogue {
    /// Every item factor, clustered for exact top-k.
    pub index: MipsIndex,
    /// The trending list, best first (the fallback for unknown users).
    pub trending: Vec<(u64, f32)>,
    /// `version` and `updated_ms` of `{p}:reco:meta` read with the items.
    pub version: Option<u64>,
    pub updated_ms: Option<i64>,
}

/// The in-process catalogue cache.
pub type ItemCache = Arc<RwLock<Arc<Catalogue>>>;

/// How often the catalogue cache checks Redis for a new model version.
pub const ITEM_REFRESH: Duration = Duration::from_secs(5);
/// Trending items kept in the cache: the writer keeps 200, and a fallback
/// needs at most `k` (≤ 100) plus the excluded history (≤ `recent_len`, 32).
pub const TRENDING_KEPT: isize = 200;

/// Item records, trending (item, score) and the meta hash, as read from Redis.
type Snapshot = (
    Vec<(u64, Vec<u8>)>,
    Vec<(u64, f64)>,
    HashMap<String, String>,
);

/// Why the catalogue could not be refreshed.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("building the item index: {0}")]
    Build(#[from] tokio::task::JoinError),
}

impl ServeState {
    pub fn new(
        redis: Option<redis::aio::ConnectionManager>,
        prefix: &str,
        kafka_brokers: Option<String>,
    ) -> Self {
        ServeState {
            redis,
            prefix: prefix.to_string(),
            kafka_brokers,
            items: Default::default(),
            sink: Default::default(),
        }
    }

    /// Exports the cached model's version and its age (from the writer's
    /// `updated_ms`) as gauges.
    pub fn export_model_gauges(&self) {
        let cat = self.catalogue();
        if let Some(v) = cat.version {
            metrics::gauge!("pulse_serve_model_version").set(v as f64);
        }
        if let Some(t) = cat.updated_ms {
            let age_ms = chrono::Utc::now()
                .timestamp_millis()
                .saturating_sub(t)
                .max(0);
            metrics::gauge!("pulse_serve_model_age_seconds").set(age_ms as f64 / 1000.0);
        }
    }

    /// The current catalogue snapshot.
    pub fn catalogue(&self) -> Arc<Catalogue> {
        self.items.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reloads the catalogue from Redis unless the cached one already has the
    /// published model version; returns the number of items cached. Items,
    /// trending and meta are read in one MULTI/EXEC, so they belong to one
    /// flush of the writer; the index is built off the async workers.
    pub async fn refresh_items(&self) -> Result<usize, RefreshError> {
        let Some(mut c) = self.redis.clone() else {
            return Ok(0);
        };
        let p = &self.prefix;
        let version: Option<u64> = redis::cmd("HGET")
            .arg(format!("{p}:reco:meta"))
            .arg("version")
            .query_async(&mut c)
            .await?;
        let cur = self.catalogue();
        if version.is_some() && cur.version == version && !cur.index.is_empty() {
            return Ok(cur.index.len());
        }
        let (items, trending, meta): Snapshot = redis::pipe()
            .atomic()
            .hgetall(format!("{p}:reco:item"))
            .zrevrange_withscores(format!("{p}:reco:trending"), 0, TRENDING_KEPT - 1)
            .hgetall(format!("{p}:reco:meta"))
            .query_async(&mut c)
            .await?;
        let started = std::time::Instant::now();
        let cat = tokio::task::spawn_blocking(move || Catalogue {
            index: MipsIndex::build(&ItemIndex::from_records(items), 0x5eed),
            trending: trending.into_iter().map(|(i, s)| (i, s as f32)).collect(),
            version: meta.get("version").and_then(|v| v.parse().ok()),
            updated_ms: meta.get("updated_ms").and_then(|v| v.parse().ok()),
        })
        .await?;
        let n = cat.index.len();
        tracing::debug!(
            items = n,
            clusters = cat.index.clusters(),
            version = cat.version,
            build_ms = started.elapsed().as_millis() as u64,
            "item index rebuilt"
        );
        *self.items.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(cat);
        Ok(n)
    }
}

/// A JSON error with its status.
pub struct ApiError(pub(super) StatusCode, pub(super) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

pub(super) fn bad(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        metrics::counter!("pulse_serve_redis_errors_total").increment(1);
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}"))
    }
}

pub(super) fn conn(s: &ServeState) -> Result<redis::aio::ConnectionManager, ApiError> {
    s.redis.clone().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Redis configured".into(),
        )
    })
}
