//! Operations endpoints: Prometheus metrics (`/metrics`, the process-wide
//! recorder) and readiness (`/readyz`: Redis answers, the pipeline's Redis
//! writes are not queued behind an outage, and the brokers answer when
//! configured; 503 with the reasons otherwise).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use super::state::{ApiError, ServeState};

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

pub(super) async fn metrics_text() -> Response {
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

pub(super) async fn readyz(State(s): State<Arc<ServeState>>) -> Response {
    let mut checks = serde_json::Map::new();
    let mut ok = true;
    if let Some(h) = s.sink.get() {
        // The pipeline's own view: its writes queue while Redis lags.
        let d = h.degraded();
        ok &= d.is_none();
        checks.insert(
            "redis_writes".into(),
            json!(d.unwrap_or_else(|| "ok".to_string())),
        );
    }
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
