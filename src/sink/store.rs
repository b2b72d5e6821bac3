//! The aggregate store the dashboard reads. Consumes window emissions
//! (`minute_stats` rows and top items per window, upserts); produces Redis keys
//! in the layout below, or the same data in process memory for `pulse demo`.
//! Every write sets absolute values, so re-applying an emission is idempotent.
//!
//! Redis layout (`{p}` = `redis.prefix`, `{m}` = window start in epoch seconds):
//! - `{p}:services` — set of service names.
//! - `{p}:minutes:{service}` — sorted set of `{m}` (score `{m}`), the index for range reads.
//! - `{p}:stats:{service}:{m}` — hash: requests, errors, client_errors, error_rate,
//!   latency_mean_ms, latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_max_ms,
//!   unique_users, final (0 while late events may still update it, 1 after).
//! - `{p}:top:{m}` — sorted set item_id → requests (top N of the window).
//! - `{p}:watermark` — string, epoch ms of the pipeline's watermark.
//! - `{p}:anomalies` — stream (capped ~10,000): window_start_ms, service, metric, value, score.
//! - `{p}:alerts` — stream (capped ~10,000): `json`, one entry per incident start or recovery.
//! - `{p}:status:{service}` — hash: status (ok | anomalous), since_ms, metrics, score.
//!
//! Per-minute keys expire after `redis.ttl_secs`; writes are pipelined, one
//! round trip per emission batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float64Type, Int64Type, TimestampMillisecondType};
use datafusion::arrow::record_batch::RecordBatch;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

impl StoreError {
    /// Connection-level failures are worth retrying; others are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Redis(e) => e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
        }
    }
}

/// One `minute_stats` row.
#[derive(Debug, Clone, PartialEq)]
pub struct MinuteRow {
    pub window_start_ms: i64,
    pub service: String,
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub error_rate: f64,
    pub latency_mean_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub unique_users: i64,
    pub is_final: bool,
}

/// Reads rows out of a batch with [`crate::model::minute_stats_schema`].
pub fn minute_rows(b: &RecordBatch, is_final: bool) -> Vec<MinuteRow> {
    let ws = b.column(0).as_primitive::<TimestampMillisecondType>();
    let svc = b.column(1).as_string::<i32>();
    let i = |c: usize| b.column(c).as_primitive::<Int64Type>().clone();
    let f = |c: usize| b.column(c).as_primitive::<Float64Type>().clone();
    let (req, err, cerr, users) = (i(2), i(3), i(4), i(11));
    let (rate, mean, p50, p95, p99, max) = (f(5), f(6), f(7), f(8), f(9), f(10));
    let opt =
        |a: &datafusion::arrow::array::Float64Array, r: usize| (!a.is_null(r)).then(|| a.value(r));
    (0..b.num_rows())
        .map(|r| MinuteRow {
            window_start_ms: ws.value(r),
            service: svc.value(r).to_string(),
            requests: req.value(r),
            errors: err.value(r),
            client_errors: cerr.value(r),
            error_rate: rate.value(r),
            latency_mean_ms: opt(&mean, r),
            latency_p50_ms: opt(&p50, r),
            latency_p95_ms: opt(&p95, r),
            latency_p99_ms: opt(&p99, r),
            latency_max_ms: opt(&max, r),
            unique_users: users.value(r),
            is_final,
        })
        .collect()
}

/// One window's emission, as the store receives it.
#[derive(Debug, Clone, Default)]
pub struct Emission {
    pub rows: Vec<MinuteRow>,
    /// (window_start_ms, top items as (item, requests)).
    pub top_items: Vec<(i64, Vec<(u64, i64)>)>,
    pub watermark_ms: i64,
    pub anomalies: Vec<crate::alert::Anomaly>,
    pub alerts: Vec<crate::alert::Alert>,
}

/// Length the anomaly and alert streams are capped at (approximately).
pub const STREAM_MAXLEN: usize = 10_000;

/// The JSON form of an alert (webhook body, Kafka alert message, Redis field).
pub fn alert_json(a: &crate::alert::Alert) -> String {
    serde_json::json!({
        "kind": a.kind,
        "service": a.service,
        "window_start": crate::source::generator::fmt_ts(a.window_start_ms),
        "window_start_ms": a.window_start_ms,
        "metrics": a.metrics,
        "score": a.score,
        "text": format!("pulse: {} {} ({}), score {:.2}", a.service, if a.kind == "start" { "anomalous" } else { "recovered" }, a.metrics.join(", "), a.score),
    })
    .to_string()
}

/// In-process store for `pulse demo` and file runs without Redis.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
pub struct MemoryInner {
    pub stats: BTreeMap<(String, i64), MinuteRow>,
    pub top: BTreeMap<i64, Vec<(u64, i64)>>,
    pub watermark_ms: i64,
    pub anomalies: Vec<crate::alert::Anomaly>,
    pub alerts: Vec<crate::alert::Alert>,
}

impl MemoryStore {
    pub fn snapshot(&self) -> std::sync::MutexGuard<'_, MemoryInner> {
        // A poisoned lock means a writer panicked mid-update; the data is still
        // the last complete emission, so reading it is sound.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Redis-backed store.
#[derive(Clone)]
pub struct RedisStore {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl_secs: u64,
}

impl RedisStore {
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        prefix: &str,
        ttl_secs: u64,
    ) -> Result<Self, StoreError> {
        let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
        if let Some(p) = password {
            let settings = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let conn = redis::aio::ConnectionManager::new(client).await?;
        Ok(RedisStore {
            conn,
            prefix: prefix.to_string(),
            ttl_secs,
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn connection(&self) -> redis::aio::ConnectionManager {
        self.conn.clone()
    }
}

/// The two real implementations, dispatched by enum.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    pub async fn apply(&self, e: &Emission) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                let mut g = m.snapshot();
                for r in &e.rows {
                    g.stats
                        .insert((r.service.clone(), r.window_start_ms), r.clone());
                }
                for (ws, items) in &e.top_items {
                    g.top.insert(*ws, items.clone());
                }
                g.watermark_ms = g.watermark_ms.max(e.watermark_ms);
                g.anomalies.extend(e.anomalies.iter().cloned());
                g.alerts.extend(e.alerts.iter().cloned());
                Ok(())
            }
            Store::Redis(r) => {
                let started = std::time::Instant::now();
                let mut pipe = redis::pipe();
                pipe.atomic();
                let p = &r.prefix;
                let ttl = r.ttl_secs as i64;
                for row in &e.rows {
                    let m = row.window_start_ms.div_euclid(1000);
                    let key = format!("{p}:stats:{}:{m}", row.service);
                    let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
                    pipe.hset_multiple(
                        &key,
                        &[
                            ("requests", row.requests.to_string()),
                            ("errors", row.errors.to_string()),
                            ("client_errors", row.client_errors.to_string()),
                            ("error_rate", row.error_rate.to_string()),
                            ("latency_mean_ms", opt(row.latency_mean_ms)),
                            ("latency_p50_ms", opt(row.latency_p50_ms)),
                            ("latency_p95_ms", opt(row.latency_p95_ms)),
                            ("latency_p99_ms", opt(row.latency_p99_ms)),
                            ("latency_max_ms", opt(row.latency_max_ms)),
                            ("unique_users", row.unique_users.to_string()),
                            ("final", u8::from(row.is_final).to_string()),
                        ],
                    )
                    .ignore()
                    .expire(&key, ttl)
                    .ignore()
                    .sadd(format!("{p}:services"), &row.service)
                    .ignore()
                    .zadd(format!("{p}:minutes:{}", row.service), m, m)
                    .ignore();
                }
                for (ws, items) in &e.top_items {
                    let m = ws.div_euclid(1000);
                    let key = format!("{p}:top:{m}");
                    pipe.del(&key).ignore();
                    if !items.is_empty() {
                        let members: Vec<(i64, u64)> =
                            items.iter().map(|(i, n)| (*n, *i)).collect();
                        pipe.zadd_multiple(&key, &members)
                            .ignore()
                            .expire(&key, ttl)
                            .ignore();
                    }
                }
                for a in &e.anomalies {
                    pipe.cmd("XADD")
                        .arg(format!("{p}:anomalies"))
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_MAXLEN)
                        .arg("*")
                        .arg("window_start_ms")
                        .arg(a.window_start_ms)
                        .arg("service")
                        .arg(&a.service)
                        .arg("metric")
                        .arg(a.metric)
                        .arg("value")
                        .arg(a.value)
                        .arg("score")
                        .arg(a.score)
                        .ignore();
                }
                for a in &e.alerts {
                    pipe.cmd("XADD")
                        .arg(format!("{p}:alerts"))
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_MAXLEN)
                        .arg("*")
                        .arg("json")
                        .arg(alert_json(a))
                        .ignore();
                    let status = if a.kind == "start" { "anomalous" } else { "ok" };
                    pipe.hset_multiple(
                        format!("{p}:status:{}", a.service),
                        &[
                            ("status", status.to_string()),
                            ("since_ms", a.window_start_ms.to_string()),
                            ("metrics", a.metrics.join(",")),
                            ("score", a.score.to_string()),
                        ],
                    )
                    .ignore();
                }
                if e.watermark_ms > i64::MIN {
                    pipe.set(format!("{p}:watermark"), e.watermark_ms).ignore();
                }
                let mut conn = r.conn.clone();
                pipe.exec_async(&mut conn).await?;
                metrics::histogram!("pulse_redis_write_seconds")
                    .record(started.elapsed().as_secs_f64());
                Ok(())
            }
        }
    }
}
