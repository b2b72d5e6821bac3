//! The dashboard's JSON API under `/api/`: services, per-minute stats,
//! anomalies, alerts, top items, incident status and drift, read from the Redis
//! layout of [`crate::sink::store`]. Bounded: ranges, limits and service
//! names are checked before Redis is asked.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{ApiError, ServeState, bad, conn};

/// Longest range `/api/stats` returns, in minutes (7 days).
pub const MAX_MINUTES: i64 = 7 * 24 * 60;
pub const MAX_LIMIT: usize = 1000;

/// The ingest rule ([`crate::model::valid_service`]), as an API answer.
fn valid_service(s: &str) -> Result<(), ApiError> {
    if crate::model::valid_service(s) {
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

pub(super) async fn services(State(s): State<Arc<ServeState>>) -> Result<Json<Value>, ApiError> {
    let (svcs, wm) = service_list(&s).await?;
    let mut c = conn(&s)?;
    // When the pipeline last moved the watermark (wall clock): the page
    // tells a stalled pipeline from a quiet one.
    let at: Option<i64> = redis::cmd("GET")
        .arg(format!("{}:watermark_at", s.prefix))
        .query_async(&mut c)
        .await?;
    Ok(Json(
        json!({ "services": svcs, "watermark_ms": wm, "watermark_updated_ms": at }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StatsQuery {
    service: Option<String>,
    /// Minutes back from `to` (default 180).
    minutes: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

pub(super) fn parse_i64(name: &str, v: &Option<String>) -> Result<Option<i64>, ApiError> {
    v.as_deref()
        .map(|x| {
            x.parse::<i64>()
                .map_err(|_| bad(format!("{name} must be an integer, got {x:?}")))
        })
        .transpose()
}

pub(super) async fn stats(
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
pub(super) struct ListQuery {
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

pub(super) async fn anomalies(
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

pub(super) async fn alerts(
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
pub(super) struct TopQuery {
    /// Window start, epoch ms; default: the latest window.
    minute: Option<String>,
    k: Option<String>,
}

pub(super) async fn top(
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

/// Every service's `{p}:{kind}:{service}` hash, in one round trip.
async fn service_hashes(
    s: &ServeState,
    kind: &str,
) -> Result<(Vec<String>, Vec<HashMap<String, String>>), ApiError> {
    let (svcs, _) = service_list(s).await?;
    if svcs.is_empty() {
        return Ok((svcs, Vec::new()));
    }
    let mut c = conn(s)?;
    let mut pipe = redis::pipe();
    for svc in &svcs {
        pipe.hgetall(format!("{}:{kind}:{svc}", s.prefix));
    }
    let rows = pipe.query_async(&mut c).await?;
    Ok((svcs, rows))
}

pub(super) async fn status(State(s): State<Arc<ServeState>>) -> Result<Json<Value>, ApiError> {
    let (svcs, rows) = service_hashes(&s, "status").await?;
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

/// Each service's last compared hour: PSI, KS and whether it drifted, per
/// feature (latency, event_type, status_class).
pub(super) async fn drift(State(s): State<Arc<ServeState>>) -> Result<Json<Value>, ApiError> {
    let (svcs, rows) = service_hashes(&s, "drift").await?;
    let num = |h: &HashMap<String, String>, k: &str| h.get(k).and_then(|v| v.parse::<f64>().ok());
    let mut out = Vec::new();
    for (svc, h) in svcs.into_iter().zip(rows) {
        let Some(hour) = h.get("hour_start_ms").and_then(|v| v.parse::<i64>().ok()) else {
            continue;
        };
        let mut features = serde_json::Map::new();
        for f in crate::detect::drift::FEATURES {
            features.insert(
                f.to_string(),
                json!({
                    "psi": num(&h, &format!("{f}_psi")),
                    "ks": num(&h, &format!("{f}_ks")),
                    "drifted": h.get(&format!("{f}_drifted")).map(|v| v == "1"),
                }),
            );
        }
        out.push(json!({
            "service": svc,
            "hour_start_ms": hour,
            "requests": num(&h, "requests"),
            "reference_requests": num(&h, "reference_requests"),
            "features": features,
        }));
    }
    Ok(Json(json!({ "drift": out })))
}
