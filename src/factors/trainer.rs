//! The factor-training stage. Consumes `events` batches in source order;
//! updates the [`RecoModel`] one event at a time (deterministic for a given
//! event order and seed) and produces [`Delta`]s — the user records touched,
//! the item records whose bytes changed since the last flush, appended
//! history, the trending list — at most every `flush_ms` and at the end.
//! Pure apart from the clock that paces flushes.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{Float32Type, TimestampMillisecondType, UInt64Type};
use datafusion::arrow::record_batch::RecordBatch;

use crate::factors::store::Delta;
use crate::factors::{Interaction, Kind, RecoConfig, RecoModel};

/// Items published in the trending list.
pub const TRENDING_TOP: usize = 200;

pub struct Trainer {
    pub model: RecoModel,
    users: HashSet<u64>,
    history: Vec<(u64, u64)>,
    published: HashMap<u64, u64>,
    /// Every item named by an event: the model samples negatives among them.
    items: Vec<u64>,
    seen_items: HashSet<u64>,
}

fn fingerprint(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl Trainer {
    pub fn new(cfg: RecoConfig, seed: u64) -> Self {
        Trainer {
            model: RecoModel::new(cfg, seed),
            users: HashSet::new(),
            history: Vec::new(),
            published: HashMap::new(),
            items: Vec::new(),
            seen_items: HashSet::new(),
        }
    }

    /// Trains on every event of the batch with a user, an item and a known type.
    pub fn train(&mut self, b: &RecordBatch) -> usize {
        let (Some(ts), Some(user), Some(item), Some(kind), Some(rating)) = (
            b.column_by_name("ts")
                .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>()),
            b.column_by_name("user_id")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            b.column_by_name("item_id")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            b.column_by_name("event_type")
                .and_then(|c| c.as_string_opt::<i32>()),
            b.column_by_name("rating")
                .and_then(|c| c.as_primitive_opt::<Float32Type>()),
        ) else {
            return 0;
        };
        let mut n = 0;
        for i in 0..b.num_rows() {
            if user.is_null(i) || item.is_null(i) || kind.is_null(i) {
                continue;
            }
            let k = match kind.value(i) {
                "view" => Kind::View,
                "cart" => Kind::Cart,
                "purchase" => Kind::Purchase,
                "rating" if !rating.is_null(i) => Kind::Rating(rating.value(i)),
                _ => continue,
            };
            let ev = Interaction {
                ts_ms: ts.value(i),
                user: user.value(i),
                item: item.value(i),
                kind: k,
            };
            self.model.observe(&ev);
            self.users.insert(ev.user);
            if self.seen_items.insert(ev.item) {
                self.items.push(ev.item);
            }
            self.history.push((ev.user, ev.item));
            n += 1;
        }
        n
    }

    /// What changed since the last flush.
    pub fn flush(&mut self, now_ms: i64) -> Delta {
        let mut d = Delta {
            version: self.model.events(),
            updated_ms: now_ms,
            dim: self.model.cfg.dim,
            ..Delta::default()
        };
        for u in self.users.drain() {
            if let Some(r) = self.model.implicit.user_record(u) {
                d.users.insert(u, r.to_bytes());
            }
        }
        // Negative sampling touches items the events did not name, so compare
        // every item's bytes with what was last published.
        for &item in &self.items {
            if let Some(r) = self.model.implicit.item_record(item) {
                let bytes = r.to_bytes();
                let fp = fingerprint(&bytes);
                if self.published.insert(item, fp) != Some(fp) {
                    d.items.insert(item, bytes);
                }
            }
        }
        d.history = std::mem::take(&mut self.history);
        d.trending = self.model.trending(TRENDING_TOP);
        d
    }
}
