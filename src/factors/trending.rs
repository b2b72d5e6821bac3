//! Time-decayed item popularity (half-life in event time), the cold-start
//! fallback of recommendations. Pure: no I/O, O(1) per event, exact for
//! out-of-order events.

use std::collections::HashSet;

use super::bpr::top_k;
use super::config::default_max_items;
use super::ids::{Index, Slot, put};
use super::kernels::prefetch;
use super::packed;

/// Time-decayed popularity: each item's score is `Σ w · 2^(-(now - ts)/h)`.
/// Stored as `Σ w · 2^((ts - t_ref)/h)`, rescaled when the exponent grows, so
/// an update is O(1) and out-of-order events are exact.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Trending {
    pub(super) half_life_ms: f64,
    pub(super) t_ref: i64,
    pub(super) latest: i64,
    pub(super) items: Index,
    #[serde(with = "packed")]
    pub(super) acc: Vec<f64>,
    /// Most items held (see [`RecoConfig::max_items`]).
    #[serde(default = "default_max_items")]
    pub(super) max_items: usize,
}

impl Trending {
    pub fn new(half_life_ms: i64) -> Self {
        Self::bounded(half_life_ms, default_max_items())
    }

    /// A trending model holding at most `max_items` items.
    pub fn bounded(half_life_ms: i64, max_items: usize) -> Self {
        Self {
            half_life_ms: half_life_ms.max(1) as f64,
            t_ref: i64::MIN,
            latest: i64::MIN,
            items: Index::default(),
            acc: Vec::new(),
            max_items,
        }
    }

    pub fn observe(&mut self, ts_ms: i64, item: u64, w: f32) {
        if self.t_ref == i64::MIN {
            self.t_ref = ts_ms;
            self.latest = ts_ms;
        }
        self.latest = self.latest.max(ts_ms);
        let mut e = (ts_ms - self.t_ref) as f64 / self.half_life_ms;
        if e > 256.0 {
            let scale = (-e).exp2();
            for a in &mut self.acc {
                *a *= scale;
            }
            self.t_ref = ts_ms;
            e = 0.0;
        }
        let (i, slot) = self.items.insert_bounded(item, self.max_items);
        if slot != Slot::Known {
            put(&mut self.acc, i, 0.0);
        }
        self.acc[i] += f64::from(w) * e.exp2();
    }

    /// Warms the item's table entry (see [`Bpr::prefetch_keys`]).
    pub fn prefetch_key(&self, item: u64) {
        self.items.prefetch(item);
    }

    /// Warms the item's accumulator (see [`Bpr::prefetch_event`]).
    pub fn prefetch(&self, item: u64) {
        if let Some(i) = self.items.get(item) {
            prefetch(&self.acc[i..=i]);
        }
    }

    pub(super) fn now_scale(&self) -> f64 {
        (-((self.latest - self.t_ref) as f64) / self.half_life_ms).exp2()
    }

    /// Decayed score of an item at the latest event time seen.
    pub fn score(&self, item: u64) -> f32 {
        self.items
            .get(item)
            .map_or(0.0, |i| (self.acc[i] * self.now_scale()) as f32)
    }

    /// Top-k (item, decayed score) at the latest event time, skipping `exclude`.
    pub fn top(&self, k: usize, exclude: &HashSet<u64>) -> Vec<(u64, f32)> {
        let s = self.now_scale();
        top_k(
            self.acc.len(),
            k,
            |j| self.acc[j] as f32,
            |j| exclude.contains(&self.items.ids[j]),
        )
        .into_iter()
        .map(|(j, a)| (self.items.ids[j], (f64::from(a) * s) as f32))
        .collect()
    }
}
