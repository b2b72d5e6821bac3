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
//! - `{p}:watermark` — string, the highest watermark written, epoch ms.
//! - `{p}:anomalies` — stream (capped ~10,000): window_start_ms, service, metric, value, score.
//! - `{p}:alerts` — stream (capped ~10,000): `json`, one entry per incident start or recovery.
//! - `{p}:status:{service}` — hash: status (ok | anomalous), since_ms, metrics, score.
//!
//! Delivery: every write is an absolute value behind a guard (Lua): a
//! partition's partial only replaces an older version, a merged row only one
//! computed from an older read, stream entries have deterministic ids. So
//! replays after a crash and concurrent instances converge to exactly-once
//! values. Per-minute keys expire after `redis.ttl_secs`; writes are
//! pipelined, one round trip per step of a batch.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::model::MinuteRow;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("corrupt value in the store: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Connection-level failures are worth retrying; others are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            StoreError::Redis(e) => e.is_io_error() || e.is_connection_dropped() || e.is_timeout(),
            StoreError::Corrupt(_) => false,
        }
    }
}

/// One partition's top items of a window, as of `version`.
#[derive(Debug, Clone, Default)]
pub struct TopUpdate {
    pub window_start_ms: i64,
    pub partition: i32,
    pub version: i64,
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
}

/// Deterministic stream ids `{window_start_ms}-{n}` (n counts entries of the
/// same window in this list), so a replayed entry gets the id it had.
fn stream_ids(windows: impl Iterator<Item = i64>) -> Vec<String> {
    let mut last = (i64::MIN, 0u64);
    windows
        .map(|w| {
            last = if w == last.0 { (w, last.1 + 1) } else { (w, 0) };
            format!("{}-{}", w.max(0), last.1)
        })
        .collect()
}

/// Length the anomaly and alert streams are capped at (approximately).
pub const STREAM_MAXLEN: usize = 10_000;

/// The JSON form of an alert (webhook body, Kafka alert message, Redis field).
pub fn alert_json(a: &crate::detect::incidents::Alert) -> String {
    serde_json::json!({
        "kind": a.kind,
        "service": a.service,
        "window_start": crate::timefmt::fmt_ts(a.window_start_ms),
        "window_start_ms": a.window_start_ms,
        "metrics": a.metrics,
        "score": a.score,
        "text": format!("pulse: {} {} ({}), score {:.2}", a.service, if a.kind == "start" { "anomalous" } else { "recovered" }, a.metrics.join(", "), a.score),
    })
    .to_string()
}

/// (version, top items) of one partition.
pub type VersionedTop = (i64, Vec<(u64, i64)>);
/// (version, final, partial) of one partition.
pub type VersionedPartial = (i64, bool, crate::window::Partial);

/// In-process store for `pulse demo` and file runs without Redis.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

#[derive(Debug, Default)]
pub struct MemoryInner {
    pub stats: BTreeMap<(String, i64), MinuteRow>,
    /// window → partition → (version, top items).
    pub top_parts: BTreeMap<i64, BTreeMap<i32, VersionedTop>>,
    /// (service, window) → partition → (version, final, partial).
    pub parts: BTreeMap<(String, i64), BTreeMap<i32, VersionedPartial>>,
    /// (service, window) → version sum of the stored merged row.
    pub merged_version: BTreeMap<(String, i64), i64>,
    pub top: BTreeMap<i64, Vec<(u64, i64)>>,
    pub watermark_ms: i64,
    pub anomalies: Vec<crate::detect::incidents::Anomaly>,
    pub alerts: Vec<crate::detect::incidents::Alert>,
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

/// One source partition's partial aggregate of one (window, service), as it
/// stands after the partition's records before offset `version`.
#[derive(Debug, Clone)]
pub struct PartialUpdate {
    pub window_start_ms: i64,
    pub service: String,
    pub partition: i32,
    pub version: i64,
    pub is_final: bool,
    pub partial: crate::window::Partial,
}

/// Every partition's stored partial of one (window, service), read in one
/// atomic step with a write: the input of the merged `minute_stats` row.
#[derive(Debug, Clone)]
pub struct MergeInput {
    pub window_start_ms: i64,
    pub service: String,
    pub parts: Vec<(i32, crate::window::StoredPartial)>,
    pub all_final: bool,
    /// Sum of the partitions' versions: grows with every accepted write, so the
    /// merged row computed from a later read always wins.
    pub version_sum: i64,
}

/// Stores a partition's partial unless a newer one is stored; returns all partitions' fields.
const PUT_PARTIAL_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'v:' .. ARGV[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], ARGV[2], 'f:' .. ARGV[1], ARGV[3], 'b:' .. ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return redis.call('HGETALL', KEYS[1])
"#;

/// Writes a merged stats hash unless one from a later read is stored.
const PUT_MERGED_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Replaces a partition's top items of a window (if newer) and rebuilds the
/// window's union over partitions, trimmed to the top N.
const PUT_TOP_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local pk = KEYS[2] .. ':p' .. ARGV[1]
redis.call('DEL', pk)
if #ARGV > 4 then
  redis.call('ZADD', pk, unpack(ARGV, 5))
  redis.call('EXPIRE', pk, ARGV[3])
end
local keys = {}
for i, p in ipairs(redis.call('HKEYS', KEYS[1])) do keys[i] = KEYS[2] .. ':p' .. p end
redis.call('ZUNIONSTORE', KEYS[2], #keys, unpack(keys))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"#;

/// Sets a number if it is larger than the stored one.
const PUT_MAX_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"#;

/// Adds a stream entry with an explicit id; an id at or below the last one
/// (a replayed entry) is refused by Redis and ignored here.
const XADD_ONCE_LUA: &str = r#"
redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[2], unpack(ARGV, 3))
return 0
"#;

fn parse_parts(
    window_start_ms: i64,
    service: &str,
    flat: Vec<Vec<u8>>,
) -> Result<MergeInput, StoreError> {
    let mut vers: BTreeMap<i32, i64> = BTreeMap::new();
    let mut fin: BTreeMap<i32, bool> = BTreeMap::new();
    let mut blobs: BTreeMap<i32, crate::window::StoredPartial> = BTreeMap::new();
    for kv in flat.chunks_exact(2) {
        let k = String::from_utf8_lossy(&kv[0]);
        let Some((kind, part)) = k.split_once(':') else {
            continue;
        };
        let Ok(part) = part.parse::<i32>() else {
            continue;
        };
        match kind {
            "v" => {
                vers.insert(
                    part,
                    String::from_utf8_lossy(&kv[1]).parse().unwrap_or_default(),
                );
            }
            "f" => {
                fin.insert(part, kv[1] == b"1");
            }
            "b" => {
                let p = crate::window::StoredPartial::from_bytes(&kv[1]).ok_or_else(|| {
                    StoreError::Corrupt(format!("partial of {service} at {window_start_ms}"))
                })?;
                blobs.insert(part, p);
            }
            _ => {}
        }
    }
    Ok(MergeInput {
        window_start_ms,
        service: service.to_string(),
        all_final: !blobs.is_empty() && blobs.keys().all(|p| fin.get(p) == Some(&true)),
        version_sum: vers.values().sum(),
        parts: blobs.into_iter().collect(),
    })
}

impl Store {
    /// Stores per-partition partials (a write older than the stored one for
    /// the same partition is ignored: replays cannot go back in time) and
    /// returns, per (window, service) touched, every partition's partial.
    pub async fn put_partials(&self, ups: &[PartialUpdate]) -> Result<Vec<MergeInput>, StoreError> {
        if ups.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Store::Memory(m) => {
                let mut g = m.snapshot();
                let mut out = Vec::with_capacity(ups.len());
                for u in ups {
                    let e = g
                        .parts
                        .entry((u.service.clone(), u.window_start_ms))
                        .or_default();
                    if e.get(&u.partition).is_none_or(|c| c.0 < u.version) {
                        e.insert(u.partition, (u.version, u.is_final, u.partial.clone()));
                    }
                    let all_final = e.values().all(|v| v.1);
                    out.push(MergeInput {
                        window_start_ms: u.window_start_ms,
                        service: u.service.clone(),
                        all_final,
                        version_sum: e.values().map(|v| v.0).sum(),
                        parts: e
                            .iter()
                            .map(|(p, v)| (*p, crate::window::StoredPartial::of(&v.2)))
                            .collect(),
                    });
                    if all_final {
                        // No partition changes a final window again: keep memory flat.
                        g.parts.remove(&(u.service.clone(), u.window_start_ms));
                    }
                }
                Ok(out)
            }
            Store::Redis(r) => {
                let started = std::time::Instant::now();
                let p = &r.prefix;
                let mut pipe = redis::pipe();
                pipe.atomic();
                for u in ups {
                    let m = u.window_start_ms.div_euclid(1000);
                    pipe.cmd("EVAL")
                        .arg(PUT_PARTIAL_LUA)
                        .arg(1)
                        .arg(format!("{p}:parts:{}:{m}", u.service))
                        .arg(u.partition)
                        .arg(u.version)
                        .arg(u8::from(u.is_final))
                        .arg(u.partial.to_bytes())
                        .arg(r.ttl_secs);
                }
                let mut conn = r.conn.clone();
                let res: Vec<Vec<Vec<u8>>> = pipe.query_async(&mut conn).await?;
                metrics::histogram!("pulse_redis_write_seconds")
                    .record(started.elapsed().as_secs_f64());
                ups.iter()
                    .zip(res)
                    .map(|(u, flat)| parse_parts(u.window_start_ms, &u.service, flat))
                    .collect()
            }
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
                let started = std::time::Instant::now();
                let mut pipe = redis::pipe();
                pipe.atomic();
                let p = &r.prefix;
                let ttl = r.ttl_secs as i64;
                for (row, version) in &e.rows {
                    let m = row.window_start_ms.div_euclid(1000);
                    let key = format!("{p}:stats:{}:{m}", row.service);
                    let opt = |v: Option<f64>| v.map_or(String::new(), |x| x.to_string());
                    let cmd = pipe.cmd("EVAL");
                    cmd.arg(PUT_MERGED_LUA)
                        .arg(1)
                        .arg(&key)
                        .arg(version)
                        .arg(ttl);
                    for (f, v) in [
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
                    ] {
                        cmd.arg(f).arg(v);
                    }
                    cmd.ignore();
                    pipe.sadd(format!("{p}:services"), &row.service)
                        .ignore()
                        .zadd(format!("{p}:minutes:{}", row.service), m, m)
                        .ignore();
                }
                for t in &e.top_items {
                    let m = t.window_start_ms.div_euclid(1000);
                    let cmd = pipe.cmd("EVAL");
                    cmd.arg(PUT_TOP_LUA)
                        .arg(2)
                        .arg(format!("{p}:topv:{m}"))
                        .arg(format!("{p}:top:{m}"))
                        .arg(t.partition)
                        .arg(t.version)
                        .arg(ttl)
                        .arg(e.top_n.max(1));
                    for (i, n) in &t.items {
                        cmd.arg(*n).arg(*i);
                    }
                    cmd.ignore();
                }
                for (a, id) in e
                    .anomalies
                    .iter()
                    .zip(stream_ids(e.anomalies.iter().map(|a| a.window_start_ms)))
                {
                    pipe.cmd("EVAL")
                        .arg(XADD_ONCE_LUA)
                        .arg(1)
                        .arg(format!("{p}:anomalies"))
                        .arg(STREAM_MAXLEN)
                        .arg(id)
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
                for (a, id) in e
                    .alerts
                    .iter()
                    .zip(stream_ids(e.alerts.iter().map(|a| a.window_start_ms)))
                {
                    pipe.cmd("EVAL")
                        .arg(XADD_ONCE_LUA)
                        .arg(1)
                        .arg(format!("{p}:alerts"))
                        .arg(STREAM_MAXLEN)
                        .arg(id)
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
                    pipe.cmd("EVAL")
                        .arg(PUT_MAX_LUA)
                        .arg(1)
                        .arg(format!("{p}:watermark"))
                        .arg(e.watermark_ms)
                        .ignore();
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
