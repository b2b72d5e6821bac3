//! Factor storage in Redis. Consumes model deltas (changed user and item factor
//! records, appended history, the trending list); produces this layout
//! (`{p}` = `redis.prefix`), written in pipelined MULTI/EXEC batches:
//! - `{p}:reco:user` — hash user_id → record (`index::encode`: f32 LE bias, then the vector)
//! - `{p}:reco:item` — hash item_id → record
//! - `{p}:reco:hist:{user}` — list of the user's recent items, newest first, capped
//! - `{p}:reco:trending` — sorted set item_id → time-decayed popularity
//! - `{p}:reco:meta` — hash: version (events trained), updated_ms, dim
//!
//! Records are absolute values, so re-applying a delta is idempotent.

use std::collections::HashMap;

/// Longest user history kept.
pub const HISTORY_LEN: isize = 50;

/// Changes to publish, accumulated by the trainer between flushes.
#[derive(Debug, Default, Clone)]
pub struct Delta {
    pub users: HashMap<u64, Vec<u8>>,
    pub items: HashMap<u64, Vec<u8>>,
    /// (user, item) in event order.
    pub history: Vec<(u64, u64)>,
    pub trending: Vec<(u64, f32)>,
    pub version: u64,
    pub updated_ms: i64,
    pub dim: usize,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.items.is_empty() && self.history.is_empty()
    }
}

pub async fn write(
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
    let mut per_user: HashMap<u64, Vec<u64>> = HashMap::new();
    for (u, i) in &d.history {
        per_user.entry(*u).or_default().push(*i);
    }
    for (u, items) in per_user {
        let key = format!("{p}:reco:hist:{u}");
        pipe.lpush(&key, items)
            .ignore()
            .ltrim(&key, 0, HISTORY_LEN - 1)
            .ignore();
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
