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

/// The publisher's loop: writes each [`Delta`] to Redis as it comes, until
/// the trainer closes the channel. Returns how many it wrote.
pub async fn publish(
    mut rx: tokio::sync::mpsc::Receiver<Delta>,
    mut conn: redis::aio::ConnectionManager,
    prefix: String,
) -> redis::RedisResult<u64> {
    let mut n = 0u64;
    while let Some(d) = rx.recv().await {
        write(&mut conn, &prefix, &d).await?;
        n += 1;
    }
    Ok(n)
}
