//! `pulse serve` (and the side port of `pulse run`): an axum router over the
//! Redis aggregates. Consumes the Redis layout of [`crate::sink::store`];
//! produces the dashboard page (assets embedded, no CDN), a bounded JSON API
//! under `/api/`, Prometheus metrics at `/metrics`, `/healthz` and `/readyz`.
//! Read-only: it never writes Redis, so any number of `pulse run` instances
//! can feed it.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};

const DASHBOARD: &str = include_str!("dashboard.html");
/// Longest range `/api/stats` returns, in minutes (7 days).
pub const MAX_MINUTES: i64 = 7 * 24 * 60;
pub const MAX_LIMIT: usize = 1000;

static METRICS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once; `None` if another recorder owns the slot.
pub fn metrics_handle() -> Option<PrometheusHandle> {
    METRICS
        .get_or_init(|| {
            let b = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ])
                .ok()?;
            b.install_recorder().ok()
        })
        .clone()
}

/// What the router reads.
#[derive(Clone)]
pub struct ServeState {
    pub redis: Option<redis::aio::ConnectionManager>,
    pub prefix: String,
    /// When set, `/readyz` also checks that the brokers answer.
    pub kafka_brokers: Option<String>,
    /// Item factors cached in process, refreshed by [`serve`] on an interval.
    pub items: ItemCache,
}

/// The in-process item factor cache.
pub type ItemCache =
    std::sync::Arc<std::sync::RwLock<std::sync::Arc<crate::factors::index::ItemIndex>>>;

/// How often the item factor cache is reloaded from Redis.
pub const ITEM_REFRESH: Duration = Duration::from_secs(5);

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
        }
    }

    /// Reloads the item factor cache from Redis.
    pub async fn refresh_items(&self) -> Result<usize, redis::RedisError> {
        let Some(mut c) = self.redis.clone() else {
            return Ok(0);
        };
        let idx = crate::factors::store::load_index(&mut c, &self.prefix).await?;
        let n = idx.len();
        *self.items.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(idx);
        Ok(n)
    }
}

/// A JSON error with its status.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("redis: {e}"))
    }
}

pub fn router(state: ServeState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/api/services", get(services))
        .route("/api/stats", get(stats))
        .route("/api/anomalies", get(anomalies))
        .route("/api/alerts", get(alerts))
        .route("/api/top", get(top))
        .route("/api/status", get(status))
        .route("/recommend/{user_id}", get(recommend))
        .route("/metrics", get(metrics_text))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "alive" })) }),
        )
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServeState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if state.redis.is_some() {
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = st.refresh_items().await {
                    tracing::warn!(error = %e, "item factor refresh failed");
                }
                tokio::time::sleep(ITEM_REFRESH).await;
            }
        });
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

fn conn(s: &ServeState) -> Result<redis::aio::ConnectionManager, ApiError> {
    s.redis.clone().ok_or_else(|| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "no Redis configured".into(),
        )
    })
}

fn valid_service(s: &str) -> Result<(), ApiError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_-.".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(bad(format!("invalid service name {s:?}")))
    }
}

async fn service_list(s: &ServeState) -> Result<(Vec<String>, Option<i64>), ApiError> {
    let mut c = conn(s)?;
    let p = &s.prefix;
    let (mut svcs, wm): (Vec<String>, Option<i64>) = redis::pipe()
        .smembers(format!("{p}:services"))
        .get(format!("{p}:watermark"))
        .query_async(&mut c)
        .await?;
    svcs.sort();
    Ok((svcs, wm))
}

async fn services(State(s): State<ServeState>) -> Result<Json<Value>, ApiError> {
    let (svcs, wm) = service_list(&s).await?;
    Ok(Json(json!({ "services": svcs, "watermark_ms": wm })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StatsQuery {
    service: Option<String>,
    /// Minutes back from `to` (default 180).
    minutes: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn parse_i64(name: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|x| {
            x.parse::<i64>()
                .map_err(|_| bad(format!("{name} must be an integer, got {x:?}")))
        })
        .transpose()
}

async fn stats(
    State(s): State<ServeState>,
    q: Result<Query<StatsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let service = q
        .service
        .clone()
        .ok_or_else(|| bad("service is required"))?;
    valid_service(&service)?;
    let (_, wm) = service_list(&s).await?;
    let now_ms = chrono::Utc::now().timestamp_millis();
    let to = parse_i64("to", &q.to)?.unwrap_or_else(|| wm.unwrap_or(now_ms));
    let minutes = parse_i64("minutes", &q.minutes)?.unwrap_or(180);
    if !(1..=MAX_MINUTES).contains(&minutes) {
        return Err(bad(format!("minutes must be within 1..={MAX_MINUTES}")));
    }
    let from = parse_i64("from", &q.from)?.unwrap_or(to - minutes * 60_000);
    if from > to || to - from > MAX_MINUTES * 60_000 {
        return Err(bad(format!(
            "from..to must be ordered and span at most {MAX_MINUTES} minutes"
        )));
    }
    let p = &s.prefix;
    let mut c = conn(&s)?;
    let ms: Vec<i64> = redis::cmd("ZRANGEBYSCORE")
        .arg(format!("{p}:minutes:{service}"))
        .arg(from.div_euclid(1000))
        .arg(to.div_euclid(1000))
        .query_async(&mut c)
        .await?;
    let mut pipe = redis::pipe();
    for m in &ms {
        pipe.hgetall(format!("{p}:stats:{service}:{m}"));
    }
    let rows: Vec<HashMap<String, String>> = if ms.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut c).await?
    };
    let num = |h: &HashMap<String, String>, k: &str| -> Value {
        h.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(Value::Null, |x| json!(x))
    };
    let points: Vec<Value> = ms
        .iter()
        .zip(&rows)
        .filter(|(_, h)| !h.is_empty())
        .map(|(m, h)| {
            json!({
                "t": m * 1000,
                "requests": num(h, "requests"),
                "errors": num(h, "errors"),
                "error_rate": num(h, "error_rate"),
                "latency_p50_ms": num(h, "latency_p50_ms"),
                "latency_p95_ms": num(h, "latency_p95_ms"),
                "latency_p99_ms": num(h, "latency_p99_ms"),
                "unique_users": num(h, "unique_users"),
                "final": h.get("final").map(|v| v == "1"),
            })
        })
        .collect();
    Ok(Json(
        json!({ "service": service, "from_ms": from, "to_ms": to, "points": points }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<String>,
    since: Option<String>,
}

fn limit(q: &ListQuery) -> Result<usize, ApiError> {
    let l = parse_i64("limit", &q.limit)?.unwrap_or(100);
    if !(1..=MAX_LIMIT as i64).contains(&l) {
        return Err(bad(format!("limit must be within 1..={MAX_LIMIT}")));
    }
    Ok(l as usize)
}

/// (limit, since) of a list query.
fn list_params(
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<(usize, i64), ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    Ok((
        limit(&q)?,
        parse_i64("since", &q.since)?.unwrap_or(i64::MIN),
    ))
}

type StreamEntries = Vec<(String, Vec<(String, String)>)>;

async fn read_stream(s: &ServeState, name: &str, n: usize) -> Result<StreamEntries, ApiError> {
    let mut c = conn(s)?;
    let v: StreamEntries = redis::cmd("XREVRANGE")
        .arg(format!("{}:{name}", s.prefix))
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(n)
        .query_async(&mut c)
        .await?;
    Ok(v)
}

async fn anomalies(
    State(s): State<ServeState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (n, since) = list_params(q)?;
    let out: Vec<Value> = read_stream(&s, "anomalies", n)
        .await?
        .into_iter()
        .filter_map(|(_, fields)| {
            let f: HashMap<String, String> = fields.into_iter().collect();
            let ws: i64 = f.get("window_start_ms")?.parse().ok()?;
            (ws >= since).then(|| {
                json!({
                    "window_start_ms": ws,
                    "service": f.get("service"),
                    "metric": f.get("metric"),
                    "value": f.get("value").and_then(|v| v.parse::<f64>().ok()),
                    "score": f.get("score").and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0),
                })
            })
        })
        .collect();
    Ok(Json(json!({ "anomalies": out })))
}

async fn alerts(
    State(s): State<ServeState>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let (n, since) = list_params(q)?;
    let out: Vec<Value> = read_stream(&s, "alerts", n)
        .await?
        .into_iter()
        .filter_map(|(_, fields)| {
            let json = fields.into_iter().find(|(k, _)| k == "json")?.1;
            let v: Value = serde_json::from_str(&json).ok()?;
            (v["window_start_ms"].as_i64()? >= since).then_some(v)
        })
        .collect();
    Ok(Json(json!({ "alerts": out })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopQuery {
    /// Window start, epoch ms; default: the latest window.
    minute: Option<String>,
    k: Option<String>,
}

async fn top(
    State(s): State<ServeState>,
    q: Result<Query<TopQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let k = parse_i64("k", &q.k)?.unwrap_or(10);
    if !(1..=100).contains(&k) {
        return Err(bad("k must be within 1..=100"));
    }
    let p = s.prefix.clone();
    let mut c = conn(&s)?;
    let minute_s = match parse_i64("minute", &q.minute)? {
        Some(ms) => Some(ms.div_euclid(1000)),
        None => {
            let (svcs, _) = service_list(&s).await?;
            let mut latest = None;
            for svc in svcs {
                let v: Vec<i64> = redis::cmd("ZREVRANGE")
                    .arg(format!("{p}:minutes:{svc}"))
                    .arg(0)
                    .arg(0)
                    .query_async(&mut c)
                    .await?;
                latest = latest.max(v.first().copied());
            }
            latest
        }
    };
    let Some(m) = minute_s else {
        return Ok(Json(json!({ "window_start_ms": null, "items": [] })));
    };
    let items: Vec<(String, f64)> = redis::cmd("ZREVRANGE")
        .arg(format!("{p}:top:{m}"))
        .arg(0)
        .arg(k - 1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await?;
    let items: Vec<Value> = items
        .into_iter()
        .map(|(i, n)| json!({ "item_id": i.parse::<u64>().ok(), "requests": n as i64 }))
        .collect();
    Ok(Json(json!({ "window_start_ms": m * 1000, "items": items })))
}

async fn status(State(s): State<ServeState>) -> Result<Json<Value>, ApiError> {
    let (svcs, _) = service_list(&s).await?;
    let mut c = conn(&s)?;
    let mut pipe = redis::pipe();
    for svc in &svcs {
        pipe.hgetall(format!("{}:status:{svc}", s.prefix));
    }
    let rows: Vec<HashMap<String, String>> = if svcs.is_empty() {
        Vec::new()
    } else {
        pipe.query_async(&mut c).await?
    };
    let mut out = serde_json::Map::new();
    for (svc, h) in svcs.into_iter().zip(rows) {
        let st = h.get("status").cloned().unwrap_or_else(|| "ok".into());
        out.insert(
            svc,
            json!({ "status": st, "since_ms": h.get("since_ms"), "metrics": h.get("metrics") }),
        );
    }
    Ok(Json(json!({ "services": out })))
}

async fn metrics_text() -> Response {
    match metrics_handle() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder unavailable".into(),
        )
        .into_response(),
    }
}

async fn readyz(State(s): State<ServeState>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    if let Some(mut c) = s.redis.clone() {
        let r: Result<String, _> = tokio::time::timeout(
            Duration::from_secs(2),
            redis::cmd("PING").query_async(&mut c),
        )
        .await
        .unwrap_or_else(|_| Err(redis::RedisError::from((redis::ErrorKind::Io, "timeout"))));
        ok &= r.is_ok();
        checks.insert(
            "redis".into(),
            json!(
                r.map(|_| "ok".to_string())
                    .unwrap_or_else(|e| e.to_string())
            ),
        );
    }
    if let Some(b) = s.kafka_brokers.clone() {
        let r = tokio::task::spawn_blocking(move || {
            crate::source::kafka::check_brokers(&b, Duration::from_secs(2))
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        ok &= r.is_ok();
        checks.insert(
            "kafka".into(),
            json!(r.map(|_| "ok".to_string()).unwrap_or_else(|e| e)),
        );
    }
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(json!({ "ready": ok, "checks": checks }))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecoQuery {
    k: Option<String>,
}

async fn recommend(
    State(s): State<ServeState>,
    axum::extract::Path(user): axum::extract::Path<String>,
    q: Result<Query<RecoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| bad(e.body_text()))?;
    let user: u64 = user.parse().map_err(|_| {
        bad(format!(
            "user_id must be a non-negative integer, got {user:?}"
        ))
    })?;
    let k = parse_i64("k", &q.k)?.unwrap_or(10);
    if !(1..=100).contains(&k) {
        return Err(bad("k must be within 1..=100"));
    }
    let k = k as usize;
    let p = &s.prefix;
    let mut c = conn(&s)?;
    let (rec, hist, meta): (Option<Vec<u8>>, Vec<u64>, HashMap<String, String>) = redis::pipe()
        .hget(format!("{p}:reco:user"), user)
        .lrange(
            format!("{p}:reco:hist:{user}"),
            0,
            crate::factors::store::HISTORY_LEN - 1,
        )
        .hgetall(format!("{p}:reco:meta"))
        .query_async(&mut c)
        .await?;
    let exclude: std::collections::HashSet<u64> = hist.iter().copied().collect();
    let index = s.items.read().unwrap_or_else(|e| e.into_inner()).clone();
    let personal = rec
        .as_deref()
        .and_then(crate::factors::index::decode)
        .map(|(_, v)| index.top_k(&v, k, &exclude))
        .filter(|v| !v.is_empty());
    let (items, fallback) = match personal {
        Some(v) => (v, false),
        None => {
            let t: Vec<(u64, f64)> = redis::cmd("ZREVRANGE")
                .arg(format!("{p}:reco:trending"))
                .arg(0)
                .arg((k + exclude.len()) as i64 - 1)
                .arg("WITHSCORES")
                .query_async(&mut c)
                .await?;
            let v = t
                .into_iter()
                .filter(|(i, _)| !exclude.contains(i))
                .take(k)
                .map(|(i, s)| (i, s as f32))
                .collect();
            (v, true)
        }
    };
    let items: Vec<Value> = items
        .iter()
        .map(|(i, s)| json!({ "item_id": i, "score": s }))
        .collect();
    Ok(Json(json!({
        "user_id": user,
        "items": items,
        "fallback": fallback,
        "model_version": meta.get("version").and_then(|v| v.parse::<u64>().ok()),
        "updated_ms": meta.get("updated_ms").and_then(|v| v.parse::<i64>().ok()),
    })))
}
