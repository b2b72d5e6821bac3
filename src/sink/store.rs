//! The aggregate store the dashboard reads. Consumes per-partition partial
//! aggregates of windows and the rows merged from them, top items, the
//! watermark and detections; produces Redis keys in the layout below, or the
//! same data in process memory for `pulse demo`.
//!
//! Redis layout (`{p}` = `redis.prefix`, `{m}` = window start in epoch seconds):
//! - `{p}:services` — set of service names.
//! - `{p}:minutes:{service}` — sorted set of `{m}` (score `{m}`), the index for range reads.
//! - `{p}:parts:{service}:{m}` — hash per source partition `P`: `v:P` version
//!   (offset), `f:P` final flag, `b:P` the partial ([`crate::window::Partial::to_bytes`]).
//! - `{p}:stats:{service}:{m}` — hash merged over partitions: requests, errors,
//!   client_errors, error_rate, latency_mean_ms, latency_p50_ms, latency_p95_ms,
//!   latency_p99_ms, latency_max_ms, unique_users, final, version (sum of the
//!   partition versions it was computed from).
//! - `{p}:top:{m}` — sorted set item_id → requests (union of the partitions' top
//!   lists, trimmed to N); `{p}:topv:{m}` and `{p}:top:{m}:pP` per partition.
//! - `{p}:watermark` — string, the highest watermark written, epoch ms;
//!   `{p}:watermark_at` — wall-clock epoch ms at which it last grew.
//! - `{p}:anomalies` — stream (capped ~10,000): window_start_ms, service, metric, value, score.
//! - `{p}:alerts` — stream (capped ~10,000): `json`, one entry per incident start or recovery.
//! - `{p}:status:{service}` — hash: status (ok | anomalous), since_ms, metrics,
//!   score, version (the window it was set for).
//! - `{p}:drift:{service}` — hash of the last compared hour: hour_start_ms,
//!   requests, reference_requests and per feature (latency, event_type,
//!   status_class) `<feature>_psi`, `<feature>_ks`, `<feature>_drifted` (0/1);
//!   version (the hour).
//! - `{p}:alive` — marker: missing after Redis lost its data, which makes
//!   pulse re-publish what it holds ([`super::redis_sink`]).
//!
//! Delivery: every write is an absolute value behind a guard (Lua): a
//! partition's partial only replaces an older version, a merged row only one
//! computed from an older read, stream entries have deterministic ids. So
//! replays after a crash and concurrent instances converge to exactly-once
//! values. Per-minute keys expire after `redis.ttl_secs`; writes are
//! pipelined, one round trip per step of a batch while Redis keeps up, and
//! queue (coalescing per key, bounded) while it does not.

use std::collections::BTreeMap;

pub use super::memory::{
    MemoryInner, MemoryStore, MergeInput, PartialUpdate, StoreError, VersionedPartial, VersionedTop,
};
use super::pending::{Op, OpBody, OpKey};
use crate::model::MinuteRow;

/// One partition's top items of a window, as of `version`.
#[derive(Debug, Clone, Default)]
pub struct TopUpdate {
    pub window_start_ms: i64,
    pub partition: i32,
    pub version: i64,
    /// The writer's ownership epoch of the partition (0: unfenced).
    pub epoch: u64,
    /// (item, requests), best first.
    pub items: Vec<(u64, i64)>,
}

/// What the store receives after a batch: merged rows (each with the
/// version sum it was computed from), top items, watermark, detections.
#[derive(Debug, Clone, Default)]
pub struct Emission {
    pub rows: Vec<(MinuteRow, i64)>,
    pub top_items: Vec<TopUpdate>,
    /// Length of the merged top-items list per window.
    pub top_n: usize,
    pub watermark_ms: i64,
    pub anomalies: Vec<crate::detect::incidents::Anomaly>,
    pub alerts: Vec<crate::detect::incidents::Alert>,
    /// Services' incident status to set (from the alerts, or all of them
    /// when re-publishing).
    pub status: Vec<ServiceStatus>,
    /// Comparisons of hours that closed.
    pub drift: Vec<crate::detect::drift::DriftRow>,
}

pub use crate::detect::incidents::ServiceStatus;

/// Deterministic stream ids `{window_start_ms}-{n}` (n counts entries of the
/// same window in this list), so a replayed entry gets the id it had.
pub(super) fn stream_ids(windows: impl Iterator<Item = i64>) -> Vec<(i64, u64)> {
    let mut last = (i64::MIN, 0u64);
    windows
        .map(|w| {
            last = if w == last.0 { (w, last.1 + 1) } else { (w, 0) };
            last
        })
        .collect()
}

pub use super::redis_sink::{RedisStore, STREAM_MAXLEN};

/// The JSON form of an alert (webhook body, Kafka alert message, Redis field).
pub fn alert_json(a: &crate::detect::incidents::Alert) -> String {
    serde_json::json!({
        "kind": a.kind,
        "service": a.service,
        "window_start": crate::timefmt::fmt_ts(a.window_start_ms),
        "window_start_ms": a.window_start_ms,
        "metrics": a.metrics,
        "score": a.score,
        "text": format!("pulse: {} {} ({}), score {:.2}", a.service, match a.kind { "start" => "anomalous", "drift" => "drifted", _ => "recovered" }, a.metrics.join(", "), a.score),
    })
    .to_string()
}

/// The two real implementations, dispatched by enum.
#[derive(Clone)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// The Redis writes of an emission.
fn emission_ops(e: &Emission) -> Vec<(OpKey, Op)> {
    let mut ops = Vec::new();
    for (row, version) in &e.rows {
        let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
        ops.push((
            OpKey::Stats {
                service: row.service.clone(),
                minute: row.window_start_ms.div_euclid(1000),
            },
            Op {
                version: *version,
                body: OpBody::Stats {
                    fields: vec![
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
                },
            },
        ));
    }
    for t in &e.top_items {
        ops.push((
            OpKey::Top {
                minute: t.window_start_ms.div_euclid(1000),
                partition: t.partition,
            },
            Op {
                version: t.version,
                body: OpBody::Top {
                    top_n: e.top_n,
                    items: t.items.clone(),
                    epoch: t.epoch,
                },
            },
        ));
    }
    for (a, (w, n)) in e
        .anomalies
        .iter()
        .zip(stream_ids(e.anomalies.iter().map(|a| a.window_start_ms)))
    {
        ops.push((
            OpKey::Anomaly { window_ms: w, n },
            Op {
                version: 0,
                body: OpBody::Entry {
                    fields: vec![
                        ("window_start_ms", a.window_start_ms.to_string()),
                        ("service", a.service.clone()),
                        ("metric", a.metric.to_string()),
                        ("value", a.value.to_string()),
                        ("score", a.score.to_string()),
                    ],
                },
            },
        ));
    }
    for (a, (w, n)) in e
        .alerts
        .iter()
        .zip(stream_ids(e.alerts.iter().map(|a| a.window_start_ms)))
    {
        ops.push((
            OpKey::Alert { window_ms: w, n },
            Op {
                version: 0,
                body: OpBody::Entry {
                    fields: vec![("json", alert_json(a))],
                },
            },
        ));
    }
    for st in &e.status {
        ops.push(status_op(st));
    }
    ops.extend(drift_ops(&e.drift));
    if e.watermark_ms > i64::MIN {
        ops.push((
            OpKey::Watermark,
            Op {
                version: e.watermark_ms,
                body: OpBody::Watermark,
            },
        ));
    }
    ops
}

/// `{p}:drift:{service}` of each service's last compared hour.
fn drift_ops(rows: &[crate::detect::drift::DriftRow]) -> Vec<(OpKey, Op)> {
    const NAMES: [(&str, [&str; 3]); 3] = [
        ("latency", ["latency_psi", "latency_ks", "latency_drifted"]),
        (
            "event_type",
            ["event_type_psi", "event_type_ks", "event_type_drifted"],
        ),
        (
            "status_class",
            [
                "status_class_psi",
                "status_class_ks",
                "status_class_drifted",
            ],
        ),
    ];
    let mut by: BTreeMap<(&str, i64), Vec<(&'static str, String)>> = BTreeMap::new();
    for r in rows {
        let fields = by.entry((r.service.as_str(), r.hour_start_ms)).or_default();
        if fields.is_empty() {
            fields.push(("hour_start_ms", r.hour_start_ms.to_string()));
            fields.push(("requests", r.requests.to_string()));
            fields.push(("reference_requests", r.reference_requests.to_string()));
        }
        if let Some((_, [psi, ks, drifted])) = NAMES.iter().find(|(f, _)| *f == r.feature) {
            fields.push((psi, r.psi.to_string()));
            fields.push((ks, r.ks.to_string()));
            fields.push((drifted, u8::from(r.drifted).to_string()));
        }
    }
    by.into_iter()
        .map(|((service, hour), fields)| {
            (
                OpKey::Drift {
                    service: service.to_string(),
                },
                Op {
                    version: hour,
                    body: OpBody::Status { fields },
                },
            )
        })
        .collect()
}

fn status_op(st: &ServiceStatus) -> (OpKey, Op) {
    (
        OpKey::Status {
            service: st.service.clone(),
        },
        Op {
            version: st.since_ms,
            body: OpBody::Status {
                fields: vec![
                    (
                        "status",
                        if st.anomalous { "anomalous" } else { "ok" }.to_string(),
                    ),
                    ("since_ms", st.since_ms.to_string()),
                    ("metrics", st.metrics.join(",")),
                    ("score", st.score.to_string()),
                ],
            },
        },
    )
}

impl Store {
    /// Stores per-partition partials (a write older than the stored one for
    /// the same partition is ignored: replays cannot go back in time) and
    /// returns, per (window, service) touched, every partition's partial
    /// (with Redis degraded: every partition's this process holds).
    pub async fn put_partials(&self, ups: &[PartialUpdate]) -> Result<Vec<MergeInput>, StoreError> {
        if ups.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Memory(m) => Ok(m.put_partials_local(ups)),
            Store::Redis(r) => r.put_partials(ups).await,
        }
    }

    /// Merge inputs read back from Redis after an outage, for writes nobody
    /// waited for: the core merges them at its next step.
    pub fn take_late_merges(&self) -> Vec<MergeInput> {
        match self {
            Store::Memory(_) => Vec::new(),
            Store::Redis(r) => r.take_late(),
        }
    }

    /// Every partition's stored partial of each (window, service), read
    /// fresh: the scorer's view of a window just before it scores it, so rows
    /// merged before another instance's last write are not scored stale.
    /// The memory store has nothing newer than this process's own merges
    /// (empty); `None` when Redis cannot answer now.
    pub async fn read_merged(&self, keys: &[(i64, String)]) -> Option<Vec<MergeInput>> {
        match self {
            // In memory, nothing is shared: the caller's rows are current.
            Store::Memory(_) => Some(Vec::new()),
            Store::Redis(r) => r.read_merged(keys).await,
        }
    }

    /// Whether Redis handed back merge inputs not merged yet.
    pub fn has_late_merges(&self) -> bool {
        match self {
            Store::Memory(_) => false,
            Store::Redis(r) => r.has_late(),
        }
    }

    /// Whether merged rows come from this process's partials only right now.
    pub fn degraded(&self) -> bool {
        match self {
            Store::Memory(_) => false,
            Store::Redis(r) => r.health().is_degraded(),
        }
    }

    /// Moves whenever the store lost its data (Redis restarted empty).
    pub fn lost_generation(&self) -> u64 {
        match self {
            Store::Memory(_) => 0,
            Store::Redis(r) => r.health().lost_generation(),
        }
    }

    pub async fn apply(&self, e: &Emission) -> Result<(), StoreError> {
        match self {
            Store::Memory(m) => {
                let mut g = m.snapshot();
                for (r, v) in &e.rows {
                    let key = (r.service.clone(), r.window_start_ms);
                    if g.merged_version.get(&key).is_none_or(|c| c < v) {
                        g.merged_version.insert(key.clone(), *v);
                        g.stats.insert(key, r.clone());
                    }
                }
                for t in &e.top_items {
                    let parts = g.top_parts.entry(t.window_start_ms).or_default();
                    if parts.get(&t.partition).is_some_and(|c| c.0 >= t.version) {
                        continue;
                    }
                    parts.insert(t.partition, (t.version, t.items.clone()));
                    let mut sum: BTreeMap<u64, i64> = BTreeMap::new();
                    for (_, items) in parts.values() {
                        for (i, n) in items {
                            *sum.entry(*i).or_default() += n;
                        }
                    }
                    let mut v: Vec<(u64, i64)> = sum.into_iter().collect();
                    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
                    v.truncate(e.top_n.max(1));
                    g.top.insert(t.window_start_ms, v);
                }
                g.watermark_ms = g.watermark_ms.max(e.watermark_ms);
                g.anomalies.extend(e.anomalies.iter().cloned());
                g.alerts.extend(e.alerts.iter().cloned());
                Ok(())
            }
            Store::Redis(r) => {
                r.write(emission_ops(e)).await;
                Ok(())
            }
        }
    }

    /// Waits up to `timeout` for queued Redis writes; returns how many were left.
    pub async fn drain(&self, timeout: std::time::Duration) -> usize {
        match self {
            Store::Memory(_) => 0,
            Store::Redis(r) => r.drain(timeout).await,
        }
    }
}
