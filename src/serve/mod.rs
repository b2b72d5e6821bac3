//! `pulse serve` (and the side port of `pulse run`): an axum router over the
//! Redis aggregates. Consumes the Redis layout of [`crate::sink::store`];
//! produces the dashboard page (assets embedded, no CDN), a bounded JSON API
//! under `/api/`, Prometheus metrics at `/metrics`, `/healthz` and `/readyz`,
//! and `/recommend/{user_id}` from the factor layout of
//! [`crate::factors::store`] (items, trending and meta cached in process per
//! model version; the user's record and history read per request).
//! Read-only: it never writes Redis, so any number of `pulse run` instances
//! can feed it.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::factors::index::ItemIndex;
use crate::factors::mips::MipsIndex;
use crate::factors::model::FactorRecord;

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
    /// The published model's items and trending list, cached in process and
    /// refreshed by [`serve`] on an interval.
    pub items: ItemCache,
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
        // one Arc per request instead of a deep clone of the state
        .with_state(Arc::new(state))
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ServeState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    spawn_refresh(&state);
    axum::serve(nodelay(listener), router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Keeps the catalogue cache of `state` fresh, on the current runtime.
fn spawn_refresh(state: &ServeState) {
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
}

/// Responses are single writes; no reason to hold any back.
fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
    })
}

/// Binds `shards` listening sockets to `addr` with `SO_REUSEPORT` (the
/// kernel spreads incoming connections over them); a port 0 is resolved by
/// the first. Returns them unregistered, to be served from other runtimes.
pub fn bind_shards(
    addr: std::net::SocketAddr,
    shards: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out: Vec<std::net::TcpListener> = Vec::with_capacity(shards.max(1));
    let mut addr = addr;
    for _ in 0..shards.max(1) {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.set_reuseport(true)?;
        sock.bind(addr)?;
        let l = sock.listen(1024)?.into_std()?;
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Serves the API thread-per-core: each listener of [`bind_shards`] gets an
/// OS thread with a single-threaded runtime and its own Redis connection
/// (from `client`), so a request is accepted, sent to Redis, woken and
/// answered on one thread, with no hand-over between workers; the shards
/// share the catalogue cache, which the calling runtime refreshes. Returns
/// when `stop` turns true and every shard has drained.
pub async fn serve_sharded(
    listeners: Vec<std::net::TcpListener>,
    state: ServeState,
    client: Option<redis::Client>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<()> {
    spawn_refresh(&state);
    let mut threads = Vec::new();
    for (i, l) in listeners.into_iter().enumerate() {
        let mut st = state.clone();
        let client = client.clone();
        let mut stop = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("pulse-serve-{i}"))
            .spawn(move || -> std::io::Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    if let Some(c) = client {
                        match redis::aio::ConnectionManager::new(c).await {
                            Ok(m) => st.redis = Some(m),
                            // the shared connection still works, with hand-overs
                            Err(e) => tracing::warn!(shard = i, error = %e,
                                "own Redis connection failed; sharing the main one"),
                        }
                    }
                    let l = tokio::net::TcpListener::from_std(l)?;
                    axum::serve(nodelay(l), router(st))
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|v| *v).await;
                        })
                        .await
                })
            })?;
        threads.push(t);
    }
    tokio::task::spawn_blocking(move || {
        for t in threads {
            match t.join() {
                Ok(r) => r?,
                Err(_) => return Err(std::io::Error::other("a serving thread panicked")),
            }
        }
        Ok(())
    })
    .await
    .map_err(std::io::Error::other)?
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

async fn services(State(s): State<Arc<ServeState>>) -> Result<Json<Value>, ApiError> {
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
    State(s): State<Arc<ServeState>>,
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
    State(s): State<Arc<ServeState>>,
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
    State(s): State<Arc<ServeState>>,
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
    State(s): State<Arc<ServeState>>,
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

async fn status(State(s): State<Arc<ServeState>>) -> Result<Json<Value>, ApiError> {
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

async fn readyz(State(s): State<Arc<ServeState>>) -> Response {
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

#[derive(serde::Serialize)]
struct RecoItem {
    item_id: u64,
    score: f32,
}

#[derive(serde::Serialize)]
struct RecoAnswer {
    user_id: u64,
    items: Vec<RecoItem>,
    fallback: bool,
    model_version: Option<u64>,
    updated_ms: Option<i64>,
}

/// `GET /recommend/{user_id}?k=`: one Redis round trip (the user's record and
/// recent history), then the cached catalogue: exact top-k by branch and
/// bound, or the cached trending list for unknown users. Both skip the history.
async fn recommend(
    State(s): State<Arc<ServeState>>,
    axum::extract::Path(user): axum::extract::Path<String>,
    q: Result<Query<RecoQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RecoAnswer>, ApiError> {
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
    let (rec, hist): (Option<Vec<u8>>, Option<Vec<u8>>) = redis::pipe()
        .hget(format!("{p}:reco:user"), user)
        .hget(format!("{p}:reco:hist"), user)
        .query_async(&mut c)
        .await?;
    let mut hist = crate::factors::packed::decode_items(hist.as_deref().unwrap_or_default());
    hist.sort_unstable();
    let excluded = |i: u64| hist.binary_search(&i).is_ok();
    let cat = s.catalogue();
    let personal = rec
        .as_deref()
        .and_then(FactorRecord::from_bytes)
        .map(|r| cat.index.top_k(&r.vector, k, excluded))
        .filter(|v| !v.is_empty());
    let fallback = personal.is_none();
    let items = match personal {
        Some(v) => v,
        None => cat
            .trending
            .iter()
            .copied()
            .filter(|&(i, _)| !excluded(i))
            .take(k)
            .collect(),
    };
    Ok(Json(RecoAnswer {
        user_id: user,
        items: items
            .into_iter()
            .map(|(item_id, score)| RecoItem { item_id, score })
            .collect(),
        fallback,
        model_version: cat.version,
        updated_ms: cat.updated_ms,
    }))
}
