//! The in-process aggregate store (for `pulse demo` and runs without Redis,
//! and the Redis store's local mirror of this process's partials) and the
//! types every store shares. Consumes per-partition partials and emissions;
//! produces merge inputs and, in memory, the dashboard's data. Delivery: the
//! same version guards as Redis, so replays converge to the same values.

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

/// One source partition's partial aggregate of one (window, service), as it
/// stands after the partition's records before offset `version`.
#[derive(Debug, Clone)]
pub struct PartialUpdate {
    pub window_start_ms: i64,
    pub service: String,
    pub partition: i32,
    pub version: i64,
    /// The writer's ownership epoch of the partition (0: unfenced).
    pub epoch: u64,
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

pub(super) fn parse_parts(
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

impl MemoryStore {
    /// Stores per-partition partials (an older version for the same
    /// partition is ignored) and returns, per update, every partition's
    /// partial held here. A window is dropped once every partition's is final.
    pub fn put_partials_local(&self, ups: &[PartialUpdate]) -> Vec<MergeInput> {
        self.put(ups, true)
    }

    /// [`MemoryStore::put_partials_local`] without building the merge
    /// inputs: keeps the mirror current while Redis answers.
    pub fn record_partials(&self, ups: &[PartialUpdate]) {
        self.put(ups, false);
    }

    fn put(&self, ups: &[PartialUpdate], merge: bool) -> Vec<MergeInput> {
        let mut g = self.snapshot();
        let mut out = Vec::with_capacity(if merge { ups.len() } else { 0 });
        for u in ups {
            let e = g
                .parts
                .entry((u.service.clone(), u.window_start_ms))
                .or_default();
            if e.get(&u.partition).is_none_or(|c| c.0 < u.version) {
                e.insert(u.partition, (u.version, u.is_final, u.partial.clone()));
            }
            let all_final = e.values().all(|v| v.1);
            if merge {
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
            }
            if all_final {
                // No partition changes a final window again: keep memory flat.
                g.parts.remove(&(u.service.clone(), u.window_start_ms));
            }
        }
        out
    }
}
