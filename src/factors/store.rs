//! Factor storage in Redis. Consumes model deltas (changed user and item factor
//! records, the touched users' recent items, the trending list); produces this layout
//! (`{p}` = `redis.prefix`), written in pipelined MULTI/EXEC batches:
//! - `{p}:reco:user` — hash user_id → record (`index::encode`: f32 LE bias, then the vector)
//! - `{p}:reco:item` — hash item_id → record
//! - `{p}:reco:hist` — hash user_id → the user's recent items ([`encode_items`](crate::factors::packed::encode_items):
//!   u64 LE item ids, distinct, newest first; the last `recent_len` interactions)
//! - `{p}:reco:trending` — sorted set item_id → time-decayed popularity
//! - `{p}:reco:meta` — hash: version (events trained), updated_ms, dim
//!
//! Records and histories are absolute values, so re-applying a delta is
//! idempotent: a replay after a crash rewrites the same bytes.

/// Changes to publish, accumulated by the trainer between flushes.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    /// (user, record), each user once.
    pub users: Vec<(u64, Vec<u8>)>,
    /// (item, record), each item once.
    pub items: Vec<(u64, Vec<u8>)>,
    /// (user, [`encode_items`](crate::factors::packed::encode_items) of the user's recent items), each user once.
    pub history: Vec<(u64, Vec<u8>)>,
    pub trending: Vec<(u64, f32)>,
    pub version: u64,
    pub updated_ms: i64,
    pub dim: usize,
    /// The records are a whole model replacing the served one (a rollback
    /// or its end): written aside and switched in at the last part.
    pub replace: bool,
    /// The model is a pinned version, not the live one (`{p}:reco:meta` `pinned`).
    pub pinned: bool,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.items.is_empty() && self.history.is_empty()
    }
}

/// Writes a delta's records to `KEYS[1..4]` (user, item, history hashes,
/// trending set) and the meta hash `KEYS[5]`, unless `{p}:reco:token`
/// (`KEYS[6]`) is newer than the writer's token `ARGV[1]`: 0 then, else 1.
/// `ARGV[2..5]`: how many user, item and history pairs and trending
/// entries follow (field, value / score, member); then version,
/// updated_ms, dim and pinned when `ARGV[6]` is 1 (the delta's last part).
/// A replacing delta (`ARGV[7]` 1) writes to staging hashes `KEYS[1..3]`,
/// emptied at its first part (`ARGV[8]` 1), and its last part renames them
/// over the served ones `KEYS[7..9]` in one step.
const FENCED_WRITE_LUA: &str = r#"
if tonumber(redis.call('GET', KEYS[6]) or '0') > tonumber(ARGV[1]) then return 0 end
local replace = ARGV[7] == '1'
if replace and ARGV[8] == '1' then redis.call('DEL', KEYS[1], KEYS[2], KEYS[3]) end
local i = 9
for k = 1, 3 do
  local key = KEYS[k]
  for _ = 1, tonumber(ARGV[k + 1]) do
    redis.call('HSET', key, ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
local nt = tonumber(ARGV[5])
if nt > 0 then
  redis.call('DEL', KEYS[4])
  for _ = 1, nt do
    redis.call('ZADD', KEYS[4], ARGV[i], ARGV[i + 1])
    i = i + 2
  end
end
if ARGV[6] == '1' then
  if replace then
    for k = 1, 3 do
      if redis.call('EXISTS', KEYS[k]) == 1 then
        redis.call('RENAME', KEYS[k], KEYS[k + 6])
      else
        redis.call('DEL', KEYS[k + 6])
      end
    end
  end
  redis.call('HSET', KEYS[5], 'version', ARGV[i], 'updated_ms', ARGV[i + 1], 'dim', ARGV[i + 2], 'pinned', ARGV[i + 3])
end
return 1
"#;

/// Records per fenced script call (a call blocks Redis while it runs).
const FENCED_CHUNK: usize = 2048;

/// Writes a delta. With the writer lease's `token`, through
/// [`FENCED_WRITE_LUA`] in parts of [`FENCED_CHUNK`] records: `Ok(false)`
/// when Redis refused it (a newer writer holds the lease).
pub async fn write(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
    d: &Delta,
    token: Option<u64>,
) -> redis::RedisResult<bool> {
    if let Some(token) = token {
        return write_fenced(conn, prefix, d, token).await;
    }
    write_plain(conn, prefix, d).await.map(|()| true)
}

async fn write_fenced(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
    d: &Delta,
    token: u64,
) -> redis::RedisResult<bool> {
    let p = prefix;
    // The records in order (users, items, histories), cut into parts; the
    // trending list and the meta go with the last part.
    // (which of the three hashes, the record)
    type Rec<'a> = (usize, &'a (u64, Vec<u8>));
    let all: Vec<Rec> = [&d.users, &d.items, &d.history]
        .iter()
        .enumerate()
        .flat_map(|(k, v)| v.iter().map(move |r| (k, r)))
        .collect();
    let parts: Vec<&[Rec]> = if all.is_empty() {
        vec![&[]]
    } else {
        all.chunks(FENCED_CHUNK).collect()
    };
    let n = parts.len();
    for (i, part) in parts.into_iter().enumerate() {
        let last = i + 1 == n;
        let mut counts = [0usize; 3];
        for (k, _) in part {
            counts[*k] += 1;
        }
        let staging = if d.replace { ":staging" } else { "" };
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(FENCED_WRITE_LUA)
            .arg(9)
            .arg(format!("{p}:reco:user{staging}"))
            .arg(format!("{p}:reco:item{staging}"))
            .arg(format!("{p}:reco:hist{staging}"))
            .arg(format!("{p}:reco:trending"))
            .arg(format!("{p}:reco:meta"))
            .arg(format!("{p}:reco:token"))
            .arg(format!("{p}:reco:user"))
            .arg(format!("{p}:reco:item"))
            .arg(format!("{p}:reco:hist"))
            .arg(token)
            .arg(counts[0])
            .arg(counts[1])
            .arg(counts[2])
            .arg(if last { d.trending.len() } else { 0 })
            .arg(u8::from(last))
            .arg(u8::from(d.replace))
            .arg(u8::from(i == 0));
        for (_, (id, bytes)) in part {
            cmd.arg(*id).arg(bytes.as_slice());
        }
        if last {
            for (item, score) in &d.trending {
                cmd.arg(*score).arg(*item);
            }
            cmd.arg(d.version)
                .arg(d.updated_ms)
                .arg(d.dim)
                .arg(u8::from(d.pinned));
        }
        let ok: i64 = cmd.query_async(conn).await?;
        if ok != 1 {
            return Ok(false);
        }
    }
    Ok(true)
}

async fn write_plain(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
    d: &Delta,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    pipe.atomic();
    let p = prefix;
    if !d.users.is_empty() {
        let v: Vec<(u64, &[u8])> = d.users.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        pipe.hset_multiple(format!("{p}:reco:user"), &v).ignore();
    }
    if !d.items.is_empty() {
        let v: Vec<(u64, &[u8])> = d.items.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        pipe.hset_multiple(format!("{p}:reco:item"), &v).ignore();
    }
    if !d.history.is_empty() {
        let v: Vec<(u64, &[u8])> = d.history.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        pipe.hset_multiple(format!("{p}:reco:hist"), &v).ignore();
    }
    if !d.trending.is_empty() {
        let key = format!("{p}:reco:trending");
        let members: Vec<(f32, u64)> = d.trending.iter().map(|(i, s)| (*s, *i)).collect();
        pipe.del(&key)
            .ignore()
            .zadd_multiple(&key, &members)
            .ignore();
    }
    pipe.hset_multiple(
        format!("{p}:reco:meta"),
        &[
            ("version", d.version.to_string()),
            ("updated_ms", d.updated_ms.to_string()),
            ("dim", d.dim.to_string()),
        ],
    )
    .ignore();
    pipe.exec_async(conn).await
}

/// Factor writes waiting for Redis, one per key: the newest record of each
/// user and item, the newest history, trending list and meta.
#[derive(Debug, Default)]
pub struct PendingDelta {
    users: std::collections::HashMap<u64, Vec<u8>>,
    items: std::collections::HashMap<u64, Vec<u8>>,
    history: std::collections::HashMap<u64, Vec<u8>>,
    /// The newest delta's trending list and meta (version, updated, dim, pinned).
    last: Option<Delta>,
    /// The records replace the served model (a replacing delta came in).
    replace: bool,
}

impl PendingDelta {
    /// Folds a delta in: later records replace earlier ones; a replacing
    /// delta drops every record held before it.
    pub fn add(&mut self, d: Delta) {
        let Delta {
            users,
            items,
            history,
            trending,
            version,
            updated_ms,
            dim,
            replace,
            pinned,
        } = d;
        if replace {
            self.users.clear();
            self.items.clear();
            self.history.clear();
            self.replace = true;
        }
        self.users.extend(users);
        self.items.extend(items);
        self.history.extend(history);
        let trending = if trending.is_empty() {
            self.last.take().map(|l| l.trending).unwrap_or_default()
        } else {
            trending
        };
        self.last = Some(Delta {
            trending,
            version,
            updated_ms,
            dim,
            pinned,
            ..Delta::default()
        });
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.users.len() + self.items.len() + self.history.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// The pending writes as one delta.
    pub fn to_delta(&self) -> Delta {
        let mut d = self.last.clone().unwrap_or_default();
        d.replace = self.replace;
        d.users = self.users.iter().map(|(k, v)| (*k, v.clone())).collect();
        d.items = self.items.iter().map(|(k, v)| (*k, v.clone())).collect();
        d.history = self.history.iter().map(|(k, v)| (*k, v.clone())).collect();
        d
    }

    pub fn clear(&mut self) {
        *self = PendingDelta::default();
    }
}

/// The publisher's loop: writes each [`Delta`] to Redis as it comes, until
/// the trainer closes the channel. While Redis fails or is slow (`timeout`),
/// deltas coalesce in a [`PendingDelta`] retried with backoff; past
/// `max_records` held, it stops taking deltas (the trainer, and so
/// consumption, waits). At the end it tries for `drain` more, then logs
/// what it could not write. Returns how many writes it applied.
pub async fn publish(
    mut rx: tokio::sync::mpsc::Receiver<Delta>,
    mut conn: redis::aio::ConnectionManager,
    prefix: String,
    timeout: std::time::Duration,
    max_records: usize,
    drain: std::time::Duration,
    token: Option<u64>,
) -> u64 {
    use std::time::{Duration, Instant};
    let mut n = 0u64;
    let mut pending = PendingDelta::default();
    let mut open = true;
    let mut backoff = Duration::from_millis(100);
    let mut closed_at: Option<Instant> = None;
    loop {
        // Take what the trainer sent (waiting only when nothing is pending).
        if open && pending.len() < max_records {
            if pending.is_empty() {
                match rx.recv().await {
                    Some(d) => pending.add(d),
                    None => open = false,
                }
            }
            while open && pending.len() < max_records {
                match rx.try_recv() {
                    Ok(d) => pending.add(d),
                    Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                    Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => open = false,
                }
            }
        }
        if pending.is_empty() {
            if open {
                continue;
            }
            return n;
        }
        if !open {
            let t = *closed_at.get_or_insert_with(Instant::now);
            if t.elapsed() >= drain {
                metrics::counter!("pulse_redis_dropped_writes_total")
                    .increment(pending.len() as u64 + 1);
                tracing::error!(
                    records = pending.len(),
                    "stopping with factor records not written (Redis unreachable)"
                );
                return n;
            }
        }
        let d = pending.to_delta();
        match tokio::time::timeout(timeout, write(&mut conn, &prefix, &d, token)).await {
            Ok(Ok(false)) => {
                // A newer writer holds the lease: this one's model is stale.
                metrics::counter!("pulse_fenced_writes_total", "target" => "model").increment(1);
                tracing::error!(
                    token,
                    records = pending.len(),
                    "model write refused: another instance holds the model writer lease"
                );
                pending.clear();
                return n;
            }
            Ok(Ok(true)) => {
                pending.clear();
                n += 1;
                backoff = Duration::from_millis(100);
                metrics::gauge!("pulse_redis_pending_factor_records").set(0.0);
            }
            res => {
                let e = match res {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no reply within {} ms", timeout.as_millis()),
                };
                metrics::gauge!("pulse_redis_pending_factor_records").set(pending.len() as f64);
                metrics::counter!("pulse_redis_reconnects_total").increment(1);
                tracing::warn!(error = %e, records = pending.len(), "factor publish failed, retrying");
                // Keep taking deltas while waiting, up to the bound.
                let wait = tokio::time::sleep(backoff);
                tokio::pin!(wait);
                loop {
                    if !open || pending.len() >= max_records {
                        (&mut wait).await;
                        break;
                    }
                    tokio::select! {
                        _ = &mut wait => break,
                        d = rx.recv() => match d {
                            Some(d) => pending.add(d),
                            None => open = false,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_deltas_keep_the_newest_record_per_key() {
        let mut p = PendingDelta::default();
        p.add(Delta {
            users: vec![(1, vec![1]), (2, vec![2])],
            items: vec![(7, vec![7])],
            history: vec![(1, vec![9])],
            trending: vec![(7, 1.0)],
            version: 10,
            updated_ms: 100,
            dim: 4,
            ..Delta::default()
        });
        p.add(Delta {
            users: vec![(1, vec![11])],
            items: vec![],
            history: vec![],
            trending: vec![],
            version: 20,
            updated_ms: 200,
            dim: 4,
            ..Delta::default()
        });
        assert_eq!(p.len(), 4);
        let mut d = p.to_delta();
        d.users.sort();
        assert_eq!(d.users, vec![(1, vec![11]), (2, vec![2])]);
        assert_eq!(d.items, vec![(7, vec![7])]);
        assert_eq!(
            d.trending,
            vec![(7, 1.0)],
            "an empty list keeps the last one"
        );
        assert_eq!((d.version, d.updated_ms), (20, 200));
        assert!(!d.replace);

        // A replacing delta drops what was held before it.
        p.add(Delta {
            users: vec![(3, vec![3])],
            version: 30,
            replace: true,
            pinned: true,
            ..Delta::default()
        });
        p.add(Delta {
            items: vec![(8, vec![8])],
            version: 31,
            pinned: true,
            ..Delta::default()
        });
        let d = p.to_delta();
        assert!(d.replace && d.pinned);
        assert_eq!(d.users, vec![(3, vec![3])]);
        assert_eq!(d.items, vec![(8, vec![8])]);
        assert!(d.history.is_empty());
        assert_eq!(d.version, 31);
        p.clear();
        assert!(p.is_empty());
    }
}
