//! The routes, and serving them: on one listener ([`serve`]) or one
//! listener, thread and runtime per core ([`serve_sharded`]), each keeping
//! the catalogue cache fresh. Every request is counted by route and status
//! (`pulse_http_requests_total`) and timed (`pulse_http_request_duration_seconds`).

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::{Html, Response};
use axum::routing::get;
use axum::serve::ListenerExt;
use serde_json::json;

use super::api::{alerts, anomalies, drift, services, stats, status, top};
use super::health::{metrics_text, readyz};
use super::recommend::recommend;
use super::state::{ITEM_REFRESH, ServeState};

const DASHBOARD: &str = include_str!("dashboard.html");

/// The route's label for metrics: the matched pattern, from a fixed set
/// (no label per user id or per unknown path).
fn route_label(req: &Request) -> &'static str {
    let Some(p) = req.extensions().get::<MatchedPath>() else {
        return "other";
    };
    match p.as_str() {
        "/" => "/",
        "/api/services" => "/api/services",
        "/api/stats" => "/api/stats",
        "/api/anomalies" => "/api/anomalies",
        "/api/alerts" => "/api/alerts",
        "/api/top" => "/api/top",
        "/api/status" => "/api/status",
        "/recommend/{user_id}" => "/recommend/{user_id}",
        "/metrics" => "/metrics",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    }
}

/// Counts each request by route and status and records its latency.
async fn record(req: Request, next: Next) -> Response {
    let route = route_label(&req);
    let started = Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_str().to_owned();
    metrics::counter!("pulse_http_requests_total", "route" => route, "status" => status)
        .increment(1);
    metrics::histogram!("pulse_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    res
}

/// The router over `state`.
pub fn router(state: ServeState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/api/services", get(services))
        .route("/api/stats", get(stats))
        .route("/api/anomalies", get(anomalies))
        .route("/api/alerts", get(alerts))
        .route("/api/top", get(top))
        .route("/api/status", get(status))
        .route("/api/drift", get(drift))
        .route("/recommend/{user_id}", get(recommend))
        .route("/metrics", get(metrics_text))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "alive" })) }),
        )
        .route("/readyz", get(readyz))
        .route_layer(axum::middleware::from_fn(record))
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
                    metrics::counter!("pulse_serve_redis_errors_total").increment(1);
                    tracing::warn!(error = %e, "item factor refresh failed");
                }
                st.export_model_gauges();
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
