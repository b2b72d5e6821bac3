//! The Redis side output of the aggregate store. Consumes the store's writes
//! ([`Op`]s: absolute values behind version guards, see [`super::store`]);
//! produces them in Redis, in one pipelined round trip per step while Redis
//! answers within `redis.timeout_ms`. Redis is never a dependency of the
//! archive: when a round trip fails or is slow, Redis is marked degraded,
//! writes go to a bounded coalescing set ([`Pending`], one write per key,
//! the newest wins) and a background writer applies them with backoff,
//! reconnecting forever. Merged rows are then computed from this process's
//! own partials (a local mirror); the writer hands the partials Redis held
//! back to the core once it catches up, so every minute converges to the
//! merge over every partition. Past `redis.max_pending` writes, submitting
//! waits (backpressure pauses consumption) rather than dropping. A marker key
//! (`{p}:alive`) tells when Redis came back empty: the lost-data generation
//! moves and the core and trainer re-publish what they hold.
//!
//! Delivery: at least once per write, converging to exactly-once values by
//! the guards; writes still pending when the process stops after its drain
//! timeout are logged and counted (`pulse_redis_dropped_writes_total`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::memory::{MemoryStore, MergeInput, PartialUpdate, StoreError, parse_parts};
use super::pending::{Op, OpBody, OpKey, Pending};

/// Writes per round trip of the background writer.
const FLUSH_BATCH: usize = 2_000;
/// Longest wait between two attempts while Redis is unreachable: Redis is
/// caught up within about this long of its return.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often the writer checks the marker key.
const MARKER_EVERY: Duration = Duration::from_secs(2);
/// Length the anomaly and alert streams are capped at (approximately).
pub const STREAM_MAXLEN: usize = 10_000;

/// Stores a partition's partial unless a newer one is stored; returns all
/// partitions' fields. A write whose owner epoch (ARGV[6], 0: unfenced) is
/// below the partition's newest in `{p}:epochs` is refused (and says so
/// with a `fenced` field).
const PUT_PARTIAL_LUA: &str = r#"
local e = tonumber(ARGV[6])
if e > 0 then
  local held = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
  if e < held then
    local r = redis.call('HGETALL', KEYS[1])
    r[#r + 1] = 'fenced'
    r[#r + 1] = '1'
    return r
  end
  if e > held then redis.call('HSET', KEYS[2], ARGV[1], ARGV[6]) end
end
local cur = redis.call('HGET', KEYS[1], 'v:' .. ARGV[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'v:' .. ARGV[1], ARGV[2], 'f:' .. ARGV[1], ARGV[3], 'b:' .. ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
end
return redis.call('HGETALL', KEYS[1])
"#;

/// Writes a merged stats hash unless one from a later read is stored, and
/// indexes its service and minute.
const PUT_MERGED_LUA: &str = r#"
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[4], ARGV[4])
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 5))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"#;

/// Replaces a partition's top items of a window (if newer, and unless its
/// owner epoch ARGV[5] is fenced as in [`PUT_PARTIAL_LUA`]) and rebuilds the
/// window's union over partitions, trimmed to the top N.
const PUT_TOP_LUA: &str = r#"
local e = tonumber(ARGV[5])
if e > 0 then
  local held = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
  if e < held then return -1 end
  if e > held then redis.call('HSET', KEYS[3], ARGV[1], ARGV[5]) end
end
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and tonumber(cur) >= tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
local pk = KEYS[2] .. ':p' .. ARGV[1]
redis.call('DEL', pk)
if #ARGV > 5 then
  redis.call('ZADD', pk, unpack(ARGV, 6))
  redis.call('EXPIRE', pk, ARGV[3])
end
local keys = {}
for i, p in ipairs(redis.call('HKEYS', KEYS[1])) do keys[i] = KEYS[2] .. ':p' .. p end
redis.call('ZUNIONSTORE', KEYS[2], #keys, unpack(keys))
redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[4]) + 1))
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"#;

/// Replaces a hash unless it holds a version at or above this one.
const PUT_STATUS_LUA: &str = r#"
local cur = redis.call('HGET', KEYS[1], 'version')
if cur and tonumber(cur) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], unpack(ARGV, 2))
return 1
"#;

/// Sets a number if it is larger than the stored one, and the wall-clock
/// time it last grew.
const PUT_MAX_LUA: &str = r#"
local cur = redis.call('GET', KEYS[1])
if (not cur) or tonumber(cur) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('SET', KEYS[2], ARGV[2])
end
return 0
"#;

/// Adds a stream entry with an explicit id; an id at or below the last one
/// (a replayed entry) is refused by Redis and ignored here.
const XADD_ONCE_LUA: &str = r#"
redis.pcall('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], ARGV[2], unpack(ARGV, 3))
return 0
"#;

/// The Redis side output's state, for `/readyz` and the metrics.
#[derive(Debug, Default)]
pub struct Health {
    degraded: AtomicBool,
    /// When the current outage began (epoch ms), 0 when healthy.
    since_ms: AtomicI64,
    reason: Mutex<String>,
    /// Writes pending (queued plus in flight).
    pending: AtomicUsize,
    peak: AtomicUsize,
    reconnects: AtomicU64,
    /// Times Redis was found without the marker key (its data lost).
    lost: AtomicU64,
    /// Outages so far, and their total length in ms.
    outages: AtomicU64,
    degraded_ms: AtomicU64,
}

impl Health {
    /// The reason Redis is degraded, with how long it has been, or `None`.
    pub fn degraded(&self) -> Option<String> {
        if !self.degraded.load(Ordering::Acquire) {
            return None;
        }
        let since = self.since_ms.load(Ordering::Relaxed);
        let secs = (chrono::Utc::now().timestamp_millis() - since).max(0) as f64 / 1000.0;
        let reason = self
            .reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        Some(format!(
            "redis degraded for {secs:.1} s ({reason}); {} writes pending",
            self.pending.load(Ordering::Relaxed)
        ))
    }

    pub fn is_degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Moves when Redis came back without its data.
    pub fn lost_generation(&self) -> u64 {
        self.lost.load(Ordering::Acquire)
    }

    /// The pending set's largest size so far.
    pub fn peak_pending(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    /// Outages so far and their total length.
    pub fn outages(&self) -> (u64, Duration) {
        (
            self.outages.load(Ordering::Relaxed),
            Duration::from_millis(self.degraded_ms.load(Ordering::Relaxed)),
        )
    }

    fn set_pending(&self, n: usize) {
        self.pending.store(n, Ordering::Relaxed);
        let peak = self.peak.fetch_max(n, Ordering::Relaxed).max(n);
        metrics::gauge!("pulse_redis_pending_writes").set(n as f64);
        metrics::gauge!("pulse_redis_pending_writes_peak").set(peak as f64);
    }

    fn degrade(&self, reason: &str) {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = reason.to_string();
        if !self.degraded.swap(true, Ordering::AcqRel) {
            self.since_ms
                .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
            self.outages.fetch_add(1, Ordering::Relaxed);
            metrics::gauge!("pulse_redis_degraded").set(1.0);
            tracing::warn!(
                error = reason,
                "redis degraded: writes are queued and retried"
            );
        }
    }

    /// Time degraded so far, the current outage included, as a counter.
    fn export_degraded_seconds(&self) {
        let since = self.since_ms.load(Ordering::Relaxed);
        let current = if since > 0 {
            (chrono::Utc::now().timestamp_millis() - since).max(0) as u64
        } else {
            0
        };
        let total = self.degraded_ms.load(Ordering::Relaxed) + current;
        metrics::counter!("pulse_redis_degraded_seconds_total").absolute(total / 1000);
    }

    fn recover(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            let since = self.since_ms.swap(0, Ordering::Relaxed);
            let ms = (chrono::Utc::now().timestamp_millis() - since).max(0) as u64;
            self.degraded_ms.fetch_add(ms, Ordering::Relaxed);
            metrics::gauge!("pulse_redis_degraded").set(0.0);
            self.export_degraded_seconds();
            tracing::info!(
                outage_ms = ms,
                peak_pending = self.peak_pending(),
                "redis caught up: pending writes applied"
            );
        }
    }
}

struct Shared {
    conn: redis::aio::ConnectionManager,
    prefix: String,
    ttl_secs: u64,
    timeout: Duration,
    max_pending: usize,
    pending: Mutex<Pending>,
    inflight: AtomicUsize,
    /// Every partition's partials Redis returned for writes the core did not
    /// wait for, per (service, window): merged by the core at its next step.
    late: Mutex<BTreeMap<(String, i64), MergeInput>>,
    /// This process's own partials, merged locally while Redis is degraded.
    mirror: MemoryStore,
    health: Arc<Health>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
}

impl Shared {
    fn queued(&self) -> usize {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).len()
            + self.inflight.load(Ordering::Acquire)
    }

    fn publish_pending(&self) {
        self.health.set_pending(self.queued());
    }
}

/// Redis-backed store: direct writes while Redis keeps up, queued ones while not.
#[derive(Clone)]
pub struct RedisStore {
    sh: Arc<Shared>,
}

/// Redis connection settings beyond the URL.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub prefix: String,
    pub ttl_secs: u64,
    pub max_pending: usize,
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn new(prefix: &str, ttl_secs: u64) -> Self {
        RedisOptions {
            prefix: prefix.to_string(),
            ttl_secs,
            max_pending: 200_000,
            timeout: Duration::from_secs(2),
        }
    }

    pub fn from_config(c: &crate::config::RedisConfig) -> Self {
        RedisOptions {
            prefix: c.prefix.clone(),
            ttl_secs: c.ttl_secs,
            max_pending: c.max_pending.max(1),
            timeout: Duration::from_millis(c.timeout_ms.max(1)),
        }
    }
}

/// A connection manager that connects lazily, times out slow replies and
/// leaves retrying to its caller.
pub fn lazy_connection(
    url: &str,
    password: Option<&str>,
    timeout: Duration,
) -> Result<redis::aio::ConnectionManager, redis::RedisError> {
    let mut info = redis::IntoConnectionInfo::into_connection_info(url)?;
    if let Some(p) = password {
        let settings = info.redis_settings().clone().set_password(p);
        info = info.set_redis_settings(settings);
    }
    let client = redis::Client::open(info)?;
    let cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500));
    redis::aio::ConnectionManager::new_lazy_with_config(client, cfg)
}

impl RedisStore {
    /// Connects (lazily: Redis may be down when pulse starts) with default options.
    pub async fn connect(
        url: &str,
        password: Option<&str>,
        prefix: &str,
        ttl_secs: u64,
    ) -> Result<Self, StoreError> {
        Self::open(url, password, RedisOptions::new(prefix, ttl_secs))
    }

    /// Sets up the store and starts its background writer (needs a Tokio runtime).
    pub fn open(url: &str, password: Option<&str>, o: RedisOptions) -> Result<Self, StoreError> {
        let conn = lazy_connection(url, password, o.timeout)?;
        let sh = Arc::new(Shared {
            conn,
            prefix: o.prefix,
            ttl_secs: o.ttl_secs,
            timeout: o.timeout,
            max_pending: o.max_pending,
            pending: Mutex::new(Pending::default()),
            inflight: AtomicUsize::new(0),
            late: Mutex::new(BTreeMap::new()),
            mirror: MemoryStore::default(),
            health: Arc::new(Health::default()),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
        });
        tokio::spawn(writer(sh.clone()));
        Ok(RedisStore { sh })
    }

    pub fn prefix(&self) -> &str {
        &self.sh.prefix
    }

    pub fn connection(&self) -> redis::aio::ConnectionManager {
        self.sh.conn.clone()
    }

    pub fn health(&self) -> Arc<Health> {
        self.sh.health.clone()
    }

    /// Stores partials: directly while Redis keeps up (returning every
    /// partition's partials Redis holds), else queued (returning the merge
    /// over this process's own partials).
    pub(super) async fn put_partials(
        &self,
        ups: &[PartialUpdate],
    ) -> Result<Vec<MergeInput>, StoreError> {
        let ops: Vec<(OpKey, Op)> = ups
            .iter()
            .map(|u| {
                (
                    OpKey::Partial {
                        service: u.service.clone(),
                        minute: u.window_start_ms.div_euclid(1000),
                        partition: u.partition,
                    },
                    Op {
                        version: u.version,
                        body: OpBody::Partial {
                            is_final: u.is_final,
                            bytes: u.partial.to_bytes(),
                            epoch: u.epoch,
                        },
                    },
                )
            })
            .collect();
        match self.direct(&ops).await {
            Some(merges) => {
                self.sh.mirror.record_partials(ups);
                merges.into_iter().collect()
            }
            None => {
                let local = self.sh.mirror.put_partials_local(ups);
                self.enqueue(ops).await;
                Ok(local)
            }
        }
    }

    /// Reads every partition's partial of each (window, service) in one
    /// round trip; `None` (leaving the caller's rows as they are) while Redis
    /// is degraded or writes are queued before the read.
    pub(super) async fn read_merged(&self, keys: &[(i64, String)]) -> Option<Vec<MergeInput>> {
        let sh = &self.sh;
        if keys.is_empty() || sh.health.is_degraded() || sh.queued() > 0 {
            return None;
        }
        let p = &sh.prefix;
        let mut pipe = redis::pipe();
        for (w, service) in keys {
            pipe.cmd("HGETALL")
                .arg(format!("{p}:parts:{service}:{}", w.div_euclid(1000)));
        }
        let mut conn = sh.conn.clone();
        let hashes: Vec<Vec<Vec<u8>>> =
            match tokio::time::timeout(sh.timeout, pipe.query_async(&mut conn)).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the partials before scoring");
                    return None;
                }
                Err(_) => {
                    tracing::warn!("no reply reading the partials before scoring");
                    return None;
                }
            };
        let mut out = Vec::with_capacity(keys.len());
        for ((w, service), flat) in keys.iter().zip(hashes) {
            if flat.is_empty() {
                continue;
            }
            match parse_parts(*w, service, flat) {
                Ok(m) => out.push(m),
                Err(e) => tracing::warn!(error = %e, "unreadable partials before scoring"),
            }
        }
        Some(out)
    }

    /// Writes ops directly, or queues them.
    pub(super) async fn write(&self, ops: Vec<(OpKey, Op)>) {
        if ops.is_empty() {
            return;
        }
        if self.direct(&ops).await.is_none() {
            self.enqueue(ops).await;
        }
    }

    /// One round trip with the ops when Redis is healthy and nothing is
    /// queued before them, returning [`exec`]'s merge inputs; `None` (and
    /// Redis marked degraded on failure) otherwise.
    async fn direct(&self, ops: &[(OpKey, Op)]) -> Option<Vec<Result<MergeInput, StoreError>>> {
        let sh = &self.sh;
        if sh.health.is_degraded() || sh.queued() > 0 {
            return None;
        }
        let started = Instant::now();
        match exec(sh, ops).await {
            Ok(r) => {
                metrics::histogram!("pulse_redis_write_seconds")
                    .record(started.elapsed().as_secs_f64());
                Some(r)
            }
            Err(e) => {
                sh.health.degrade(&e);
                sh.wake.notify_one();
                None
            }
        }
    }

    /// Queues ops for the writer, waiting while the set is full.
    async fn enqueue(&self, ops: Vec<(OpKey, Op)>) {
        let sh = &self.sh;
        let mut waited = None;
        while sh.queued() >= sh.max_pending {
            if waited.is_none() {
                tracing::warn!(
                    max_pending = sh.max_pending,
                    "redis pending writes at their bound: consumption paused"
                );
                waited = Some(Instant::now());
            }
            sh.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Some(t) = waited {
            metrics::histogram!("pulse_redis_backpressure_wait_seconds")
                .record(t.elapsed().as_secs_f64());
        }
        {
            let mut p = sh.pending.lock().unwrap_or_else(|e| e.into_inner());
            for (k, op) in ops {
                p.insert(k, op);
            }
        }
        sh.publish_pending();
        sh.wake.notify_one();
    }

    pub(super) fn has_late(&self) -> bool {
        !self
            .sh
            .late
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Merge inputs the writer got back for queued partials (each
    /// (service, window) once, the latest read).
    pub(super) fn take_late(&self) -> Vec<MergeInput> {
        let mut l = self.sh.late.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *l).into_values().collect()
    }

    /// Waits up to `timeout` for the queued writes to be applied, then stops
    /// the writer; returns how many were left.
    pub async fn drain(&self, timeout: Duration) -> usize {
        let started = Instant::now();
        while self.sh.queued() > 0 && started.elapsed() < timeout {
            self.sh.wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.sh.stop.store(true, Ordering::Release);
        self.sh.wake.notify_one();
        let left = self.sh.queued();
        let h = &self.sh.health;
        let (outages, degraded) = h.outages();
        tracing::info!(
            outages,
            degraded_ms = degraded.as_millis() as u64,
            peak_pending = h.peak_pending(),
            reconnects = h.reconnects(),
            lost = h.lost_generation(),
            "redis side output"
        );
        if left > 0 {
            metrics::counter!("pulse_redis_dropped_writes_total").increment(left as u64);
            tracing::error!(
                pending = left,
                "stopping with Redis writes not applied (Redis unreachable)"
            );
        }
        left
    }
}

/// Renders ops into one atomic pipeline; partial writes return their hash.
fn pipeline(sh: &Shared, ops: &[(OpKey, Op)]) -> redis::Pipeline {
    let p = &sh.prefix;
    let ttl = sh.ttl_secs;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for (k, op) in ops {
        match (k, &op.body) {
            (
                OpKey::Partial {
                    service,
                    minute,
                    partition,
                },
                OpBody::Partial {
                    is_final,
                    bytes,
                    epoch,
                },
            ) => {
                pipe.cmd("EVAL")
                    .arg(PUT_PARTIAL_LUA)
                    .arg(2)
                    .arg(format!("{p}:parts:{service}:{minute}"))
                    .arg(format!("{p}:epochs"))
                    .arg(*partition)
                    .arg(op.version)
                    .arg(u8::from(*is_final))
                    .arg(bytes.as_slice())
                    .arg(ttl)
                    .arg(*epoch);
            }
            (OpKey::Stats { service, minute }, OpBody::Stats { fields }) => {
                let cmd = pipe.cmd("EVAL");
                cmd.arg(PUT_MERGED_LUA)
                    .arg(3)
                    .arg(format!("{p}:stats:{service}:{minute}"))
                    .arg(format!("{p}:services"))
                    .arg(format!("{p}:minutes:{service}"))
                    .arg(op.version)
                    .arg(ttl)
                    .arg(service)
                    .arg(*minute);
                for (f, v) in fields {
                    cmd.arg(*f).arg(v);
                }
                cmd.ignore();
            }
            (
                OpKey::Top { minute, partition },
                OpBody::Top {
                    top_n,
                    items,
                    epoch,
                },
            ) => {
                let cmd = pipe.cmd("EVAL");
                cmd.arg(PUT_TOP_LUA)
                    .arg(3)
                    .arg(format!("{p}:topv:{minute}"))
                    .arg(format!("{p}:top:{minute}"))
                    .arg(format!("{p}:epochs"))
                    .arg(*partition)
                    .arg(op.version)
                    .arg(ttl)
                    .arg((*top_n).max(1))
                    .arg(*epoch);
                for (i, n) in items {
                    cmd.arg(*n).arg(*i);
                }
                cmd.ignore();
            }
            (OpKey::Status { service }, OpBody::Status { fields })
            | (OpKey::Drift { service }, OpBody::Status { fields }) => {
                let kind = if matches!(k, OpKey::Drift { .. }) {
                    "drift"
                } else {
                    "status"
                };
                let cmd = pipe.cmd("EVAL");
                cmd.arg(PUT_STATUS_LUA)
                    .arg(1)
                    .arg(format!("{p}:{kind}:{service}"))
                    .arg(op.version);
                for (f, v) in fields {
                    cmd.arg(*f).arg(v);
                }
                cmd.ignore();
            }
            (OpKey::Anomaly { window_ms, n }, OpBody::Entry { fields })
            | (OpKey::Alert { window_ms, n }, OpBody::Entry { fields }) => {
                let stream = if matches!(k, OpKey::Anomaly { .. }) {
                    "anomalies"
                } else {
                    "alerts"
                };
                let cmd = pipe.cmd("EVAL");
                cmd.arg(XADD_ONCE_LUA)
                    .arg(1)
                    .arg(format!("{p}:{stream}"))
                    .arg(STREAM_MAXLEN)
                    .arg(format!("{}-{n}", (*window_ms).max(0)));
                for (f, v) in fields {
                    cmd.arg(*f).arg(v);
                }
                cmd.ignore();
            }
            (OpKey::Watermark, OpBody::Watermark) => {
                pipe.cmd("EVAL")
                    .arg(PUT_MAX_LUA)
                    .arg(2)
                    .arg(format!("{p}:watermark"))
                    .arg(format!("{p}:watermark_at"))
                    .arg(op.version)
                    .arg(chrono::Utc::now().timestamp_millis())
                    .ignore();
            }
            (k, _) => {
                // Built only by this module's callers, always matched.
                tracing::error!(key = ?k, "mismatched pending write skipped");
            }
        }
    }
    pipe
}

/// Applies ops in one round trip bounded by the timeout; returns, per
/// partial write in order, the merge input Redis answered with (every
/// partition's partial of that service and minute).
async fn exec(
    sh: &Shared,
    ops: &[(OpKey, Op)],
) -> Result<Vec<Result<MergeInput, StoreError>>, String> {
    let pipe = pipeline(sh, ops);
    let mut conn = sh.conn.clone();
    let hashes: Vec<Vec<Vec<u8>>> =
        match tokio::time::timeout(sh.timeout, pipe.query_async(&mut conn)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err(format!("no reply within {} ms", sh.timeout.as_millis())),
        };
    let partials = ops.iter().filter_map(|(k, _)| match k {
        OpKey::Partial {
            service, minute, ..
        } => Some((service, *minute)),
        _ => None,
    });
    Ok(partials
        .zip(hashes)
        .map(|((service, minute), flat)| {
            // PUT_PARTIAL_LUA appends the marker as the reply's last pair.
            if flat.len() >= 2 && flat[flat.len() - 2] == b"fenced" {
                metrics::counter!("pulse_fenced_writes_total", "target" => "redis").increment(1);
                tracing::warn!(
                    service = %service,
                    minute,
                    "redis refused a partial: another instance took its partition over"
                );
            }
            parse_parts(minute * 1000, service, flat)
        })
        .collect())
}

/// Sets the marker key if it is missing: `Ok(true)` when it was missing.
async fn marker_missing(sh: &Shared) -> Result<bool, String> {
    let mut conn = sh.conn.clone();
    let r: Option<String> = tokio::time::timeout(
        sh.timeout,
        redis::cmd("SET")
            .arg(format!("{}:alive", sh.prefix))
            .arg(1)
            .arg("NX")
            .query_async(&mut conn),
    )
    .await
    .map_err(|_| "no reply".to_string())?
    .map_err(|e| e.to_string())?;
    Ok(r.is_some())
}

/// The background writer: applies queued writes with backoff, forever (until
/// [`RedisStore::drain`]), and watches the marker key.
async fn writer(sh: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut first_marker = true;
    let mut last_marker = Instant::now() - MARKER_EVERY;
    loop {
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let idle = sh
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        if idle && !sh.health.is_degraded() {
            let _ = tokio::time::timeout(MARKER_EVERY, sh.wake.notified()).await;
        }
        if sh.stop.load(Ordering::Acquire) {
            return;
        }
        let check_marker = sh.health.is_degraded() || last_marker.elapsed() >= MARKER_EVERY;
        if check_marker {
            match marker_missing(&sh).await {
                Ok(missing) => {
                    last_marker = Instant::now();
                    if missing && !first_marker {
                        sh.health.lost.fetch_add(1, Ordering::AcqRel);
                        metrics::counter!("pulse_redis_data_lost_total").increment(1);
                        tracing::warn!(
                            "redis came back without pulse's keys: re-publishing what this process holds"
                        );
                    }
                    first_marker = false;
                }
                Err(e) => {
                    fail(&sh, &e, &mut backoff).await;
                    continue;
                }
            }
        }
        let batch = {
            let mut p = sh.pending.lock().unwrap_or_else(|e| e.into_inner());
            let b = p.take(FLUSH_BATCH);
            sh.inflight.store(b.len(), Ordering::Release);
            b
        };
        if batch.is_empty() {
            if sh.health.is_degraded() {
                sh.health.recover();
            }
            backoff = Duration::from_millis(100);
            continue;
        }
        match exec(&sh, &batch).await {
            Ok(merges) => {
                sh.inflight.store(0, Ordering::Release);
                let mut late = sh.late.lock().unwrap_or_else(|e| e.into_inner());
                for m in merges {
                    match m {
                        Ok(m) => {
                            let key = (m.service.clone(), m.window_start_ms);
                            if late
                                .get(&key)
                                .is_none_or(|c| c.version_sum <= m.version_sum)
                            {
                                late.insert(key, m);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable partials in Redis"),
                    }
                }
                drop(late);
                sh.publish_pending();
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                {
                    let mut p = sh.pending.lock().unwrap_or_else(|e| e.into_inner());
                    p.restore(batch);
                    sh.inflight.store(0, Ordering::Release);
                }
                sh.publish_pending();
                fail(&sh, &e, &mut backoff).await;
            }
        }
    }
}

async fn fail(sh: &Shared, e: &str, backoff: &mut Duration) {
    sh.health.degrade(e);
    sh.health.export_degraded_seconds();
    sh.health.reconnects.fetch_add(1, Ordering::Relaxed);
    metrics::counter!("pulse_redis_reconnects_total").increment(1);
    tracing::debug!(
        error = e,
        backoff_ms = backoff.as_millis() as u64,
        "redis retry"
    );
    tokio::time::sleep(*backoff).await;
    *backoff = (*backoff * 2).min(MAX_BACKOFF);
}
