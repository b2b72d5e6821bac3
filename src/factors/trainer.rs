//! The factor-training stage. Consumes `events` batches in source order;
//! updates the [`RecoModel`] in groups of up to [`GROUP`] events, the last
//! group of a batch possibly smaller (deterministic for a given sequence of
//! batches and seed), and
//! produces [`Delta`]s — the user records touched, the item records whose
//! bytes changed since the last flush, the touched users' recent items, the
//! trending list — at most every `flush_ms` and at the end.
//! Pure apart from the clock that paces flushes.
//!
//! Exactly once for the model: with positions (Kafka), the trainer keeps per
//! source partition the next offset it learned from and skips anything below
//! it, and [`Trainer::snapshot`] captures model and offsets together; a run
//! restored from a snapshot is fed again from at most those offsets (the
//! pipeline's checkpoints never replay from later), so each event is in the
//! model's lineage once.

use std::collections::BTreeMap;
use std::hash::BuildHasher;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{
    Float32Type, Int32Type, Int64Type, TimestampMillisecondType, UInt64Type,
};
use datafusion::arrow::record_batch::RecordBatch;

use crate::factors::bpr::GROUP;
use crate::factors::config::FastHash;
use crate::factors::store::Delta;
use crate::factors::{Interaction, Kind, RecoConfig, RecoModel};

/// How many events ahead [`Trainer::train`] warms an event's user and item
/// rows (hash lookups, then row loads) and, nearer, the user's recent items:
/// far enough for the loads to land before the event's turn (a step chain of
/// ~12 SGD steps per event), near enough to stay in cache (4/1, 6/2, 12/2
/// and 16/3 measured within noise of 8/2; no prefetch clearly slower).
const PREFETCH_FAR: usize = 8;
const PREFETCH_NEAR: usize = 2;
/// How many events ahead it warms the id tables' entries that the lookups
/// at [`PREFETCH_FAR`] read.
const PREFETCH_KEYS: usize = 16;

/// Items published in the trending list.
pub const TRENDING_TOP: usize = 200;

pub struct Trainer {
    pub model: RecoModel,
    /// Per item slot of the model, in its order: the item and the
    /// fingerprint of the record last published for it.
    published: Vec<(u64, u64)>,
    /// Next offset to learn from, per source partition (positioned input).
    offsets: BTreeMap<i32, i64>,
    /// Whether batches carry Kafka positions to deduplicate on.
    pub positioned: bool,
    /// Rows skipped because the model already learned them.
    pub skipped: u64,
    /// The services each partition admitted up to `offsets` (the fleet's
    /// trainer decodes the topic itself and must decide every record as the
    /// pipeline did).
    pub admitted: BTreeMap<i32, Vec<String>>,
}

/// The durable state of a trainer, as read (written as [`SnapshotRef`]).
#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot {
    model: RecoModel,
    offsets: BTreeMap<i32, i64>,
    #[serde(default)]
    admitted: BTreeMap<i32, Vec<String>>,
}

/// [`Snapshot`] written from borrowed parts (the same encoding): no copy of
/// the model, which doubled its memory for each snapshot.
#[derive(serde::Serialize)]
struct SnapshotRef<'a> {
    model: &'a RecoModel,
    offsets: &'a BTreeMap<i32, i64>,
    admitted: &'a BTreeMap<i32, Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("model snapshot encoding: {0}")]
    Encode(String),
    #[error("model snapshot is corrupt: {0}")]
    Decode(String),
    #[error("model snapshot has dimension {got}, the configuration {want}")]
    Dimension { got: usize, want: usize },
}

impl Trainer {
    pub fn new(cfg: RecoConfig, seed: u64) -> Self {
        Trainer {
            model: RecoModel::new(cfg, seed),
            published: Vec::new(),
            offsets: BTreeMap::new(),
            positioned: false,
            skipped: 0,
            admitted: BTreeMap::new(),
        }
    }

    /// Next offset to learn from, per source partition.
    pub fn offsets(&self) -> &BTreeMap<i32, i64> {
        &self.offsets
    }

    /// Marks a partition's records before `next` as seen: the pipeline says
    /// so after each batch, so records the trainer never gets (dead letters,
    /// events without a user or item) do not hold its offset back, which
    /// would make a checkpoint replay rows only to skip them.
    pub fn advance(&mut self, partition: i32, next: i64) {
        let e = self.offsets.entry(partition).or_insert(i64::MIN);
        *e = (*e).max(next);
    }

    /// The model and its offsets, as bytes (CBOR, the model's vectors
    /// packed: see [`crate::factors::packed`]).
    pub fn snapshot(&self) -> Result<Vec<u8>, SnapshotError> {
        let s = SnapshotRef {
            model: &self.model,
            offsets: &self.offsets,
            admitted: &self.admitted,
        };
        let mut out = Vec::new();
        ciborium::into_writer(&s, &mut out).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        Ok(out)
    }

    /// A trainer continuing from a snapshot; the configuration must keep the model's shape.
    pub fn restore(cfg: RecoConfig, seed: u64, bytes: &[u8]) -> Result<Self, SnapshotError> {
        let s: Snapshot =
            ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode(e.to_string()))?;
        if s.model.cfg.dim != cfg.dim {
            return Err(SnapshotError::Dimension {
                got: s.model.cfg.dim,
                want: cfg.dim,
            });
        }
        s.model.check_shape().map_err(SnapshotError::Decode)?;
        let mut t = Trainer::new(cfg, seed);
        t.model = s.model;
        t.model.reseed(seed);
        t.model.implicit.repair();
        t.offsets = s.offsets;
        t.admitted = s.admitted;
        t.positioned = true;
        Ok(t)
    }

    /// Scores up to `max` of the batch's events, spread over it, on the
    /// live quality sample before the model learns them (rows it already
    /// learned, and events without a user or item, are passed over).
    /// Returns how many were scored.
    pub fn sample_quality(
        &self,
        b: &RecordBatch,
        q: &mut super::quality::LiveQuality,
        max: usize,
    ) -> usize {
        let (Some(user), Some(item)) = (
            b.column_by_name("user_id")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
            b.column_by_name("item_id")
                .and_then(|c| c.as_primitive_opt::<UInt64Type>()),
        ) else {
            return 0;
        };
        let pos = (
            b.column_by_name("src_partition")
                .and_then(|c| c.as_primitive_opt::<Int32Type>()),
            b.column_by_name("src_offset")
                .and_then(|c| c.as_primitive_opt::<Int64Type>()),
        );
        let rows = b.num_rows();
        if rows == 0 || max == 0 {
            return 0;
        }
        let learned = |i: usize| match pos {
            (Some(p), Some(o)) if self.positioned => self
                .offsets
                .get(&p.value(i))
                .is_some_and(|next| o.value(i) < *next),
            _ => false,
        };
        let mut scored = 0;
        let stride = (rows / max).max(1);
        for i in (0..rows).step_by(stride) {
            if scored == max {
                break;
            }
            if user.is_null(i) || item.is_null(i) || learned(i) {
                continue;
            }
            scored += usize::from(q.score(&self.model, user.value(i), item.value(i)));
        }
        scored
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
        let pos = if self.positioned {
            match (
                b.column_by_name("src_partition")
                    .and_then(|c| c.as_primitive_opt::<Int32Type>()),
                b.column_by_name("src_offset")
                    .and_then(|c| c.as_primitive_opt::<Int64Type>()),
            ) {
                (Some(p), Some(o)) => Some((p, o)),
                _ => return 0,
            }
        } else {
            None
        };
        let mut n = 0;
        let idle = Interaction {
            ts_ms: 0,
            user: 0,
            item: 0,
            kind: Kind::View,
        };
        let mut group = [idle; GROUP];
        let mut grouped = 0;
        let rows = b.num_rows();
        let ahead = |k: usize| {
            (k < rows && !user.is_null(k) && !item.is_null(k))
                .then(|| (user.value(k), item.value(k)))
        };
        for i in 0..rows {
            // Cache hints for the events ahead: their lookups and first loads
            // overlap with this event's steps (no effect on results).
            if let Some((u, it)) = ahead(i + PREFETCH_KEYS) {
                self.model.prefetch_keys(u, it);
            }
            if let Some((u, it)) = ahead(i + PREFETCH_FAR) {
                self.model.prefetch_event(u, it);
            }
            if let Some((u, _)) = ahead(i + PREFETCH_NEAR) {
                self.model.prefetch_ring(u);
            }
            if let Some((p, o)) = pos {
                let next = self.offsets.entry(p.value(i)).or_insert(i64::MIN);
                if o.value(i) < *next {
                    self.skipped += 1;
                    continue;
                }
                *next = o.value(i) + 1;
            }
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
            // Events are learned in groups (see `RecoModel::observe_group`).
            group[grouped] = ev;
            grouped += 1;
            if grouped == GROUP {
                self.model.observe_group(&group);
                grouped = 0;
            }
            n += 1;
        }
        self.model.observe_group(&group[..grouped]);
        n
    }

    /// What changed since the last flush.
    /// Makes the next [`Trainer::flush`] carry the whole model: every user's
    /// record and history and every item's record (the store lost them).
    pub fn republish_all(&mut self) {
        self.model.implicit.touch_all_users();
        self.published.clear();
    }

    pub fn flush(&mut self, now_ms: i64) -> Delta {
        let mut d = Delta {
            version: self.model.events(),
            updated_ms: now_ms,
            dim: self.model.cfg.dim,
            ..Delta::default()
        };
        let mut seen = Vec::new();
        for u in self.model.implicit.take_touched_users() {
            if let Some((rec, hist)) = self.model.implicit.user_bytes(u, &mut seen) {
                d.users.push((u, rec));
                d.history.push((u, hist));
            }
        }
        // Negative sampling touches items the events did not name, so compare
        // every item's bytes with what was last published, slot by slot (a
        // slot the model gave to another item, past `reco.max_items`, differs).
        let published = &mut self.published;
        let items = &mut d.items;
        let mut slot = 0;
        self.model.implicit.for_each_item_bytes(|item, bytes| {
            let now = (item, FastHash::default().hash_one(bytes));
            match published.get_mut(slot) {
                Some(last) if *last == now => {}
                Some(last) => {
                    *last = now;
                    items.push((item, bytes.to_vec()));
                }
                None => {
                    published.push(now);
                    items.push((item, bytes.to_vec()));
                }
            }
            slot += 1;
        });
        published.truncate(slot);
        d.trending = self.model.trending(TRENDING_TOP);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Position, RawChunk};
    use crate::source::generator::{GenParams, Generator};

    /// Decoded events of `n` generated records at offsets `first..` of partition 2.
    fn batch(n: u64, first: i64) -> RecordBatch {
        let mut g = Generator::new(GenParams {
            events: n + first as u64,
            seed: 3,
            ..GenParams::default()
        });
        let mut chunk = RawChunk::new("t".into());
        let mut line = Vec::new();
        for off in 0..(n as i64 + first) {
            line.clear();
            g.next_into(&mut line).unwrap();
            if off >= first {
                chunk.push(
                    &line,
                    Position {
                        partition: 2,
                        offset: off,
                    },
                );
            }
        }
        let mut d = crate::decode::Decoder::new(crate::config::ValidationConfig::default());
        d.decode(&chunk, 0).events
    }

    #[test]
    fn quality_samples_only_events_not_yet_learned() {
        let cfg = crate::config::RecoSection::default().model_config();
        let mut t = Trainer::new(cfg, 1);
        t.positioned = true;
        let mut q = crate::factors::quality::LiveQuality::new(10, 100);
        let first = batch(2000, 0);
        assert_eq!(t.sample_quality(&first, &mut q, 5), 0, "no user known yet");
        t.train(&first);
        // Already learned: a replay is not scored again.
        assert_eq!(t.sample_quality(&first, &mut q, 5), 0);
        let next = batch(2000, 2000);
        let n = t.sample_quality(&next, &mut q, 5);
        assert!((1..=5).contains(&n), "{n}");
        assert_eq!(q.figures().samples, n);
    }

    #[test]
    fn restored_trainer_skips_what_it_learned_and_keeps_learning() {
        let cfg = crate::config::RecoSection::default().model_config();
        let mut t = Trainer::new(cfg.clone(), 1);
        t.positioned = true;
        let first = t.train(&batch(500, 0));
        assert!(first > 400);
        let snap = t.snapshot().unwrap();
        // the same bytes as the owned form earlier versions wrote
        let mut owned = Vec::new();
        ciborium::into_writer(
            &Snapshot {
                model: t.model.clone(),
                offsets: t.offsets().clone(),
                admitted: BTreeMap::new(),
            },
            &mut owned,
        )
        .unwrap();
        assert_eq!(owned, snap);
        let mut r = Trainer::restore(cfg.clone(), 1, &snap).unwrap();
        assert_eq!(r.model.events(), t.model.events());
        assert_eq!(r.offsets(), t.offsets());
        // a replay of offsets 0..800 after the crash: the first 500 are skipped
        let more = r.train(&batch(800, 0));
        assert_eq!(r.skipped as usize, batch(500, 0).num_rows());
        assert_eq!(r.model.events(), t.model.events() + more as u64);
        assert_eq!(r.offsets()[&2], 800);
        // records it never got (dead letters at 800..803) move it on, never back
        r.advance(2, 803);
        r.advance(2, 790);
        assert_eq!(r.offsets()[&2], 803);
        let before = r.model.events();
        assert_eq!(r.train(&batch(803, 0)), 0);
        assert_eq!(r.model.events(), before);
        // the restored model's vectors are the snapshot's
        let u = (0..100_000u64)
            .find(|u| t.model.implicit.user_record(*u).is_some())
            .unwrap();
        let t2 = Trainer::restore(cfg.clone(), 1, &snap).unwrap();
        assert_eq!(
            t2.model.implicit.user_record(u),
            t.model.implicit.user_record(u)
        );
        // a model of another shape is refused, garbage too
        let mut other = cfg;
        other.dim += 1;
        assert!(matches!(
            Trainer::restore(other.clone(), 1, &snap),
            Err(SnapshotError::Dimension { .. })
        ));
        assert!(Trainer::restore(other, 1, b"nonsense").is_err());
    }

    /// A snapshot written before the model's vectors were packed (one CBOR
    /// item per number; `tests/data`, from 120 generated events) restores to
    /// the model that training on those events gives now, and is re-written
    /// packed, smaller.
    #[test]
    fn a_snapshot_in_the_former_encoding_restores_to_the_same_model() {
        let cfg = crate::config::RecoSection::default().model_config();
        let old = include_bytes!("../../tests/data/model-snapshot-cbor-v1.cbor");
        let restored = Trainer::restore(cfg.clone(), 1, old).unwrap();
        let mut t = Trainer::new(cfg, 1);
        t.positioned = true;
        assert!(t.train(&batch(120, 0)) > 100);
        assert_eq!(restored.model.events(), t.model.events());
        assert_eq!(restored.offsets(), t.offsets());
        let now = t.snapshot().unwrap();
        assert_eq!(restored.snapshot().unwrap(), now);
        assert!(now.len() < old.len(), "{} vs {}", now.len(), old.len());
    }

    /// A flush publishes every item whose record changed since the last one
    /// (named by the events or only drawn as a negative, or new in a slot the
    /// model gave it in place of a forgotten item), and nothing else.
    #[test]
    fn a_flush_publishes_exactly_the_items_whose_records_changed() {
        for cap in [None, Some(40)] {
            flush_publishes_changes(cap);
        }
    }

    fn flush_publishes_changes(max_items: Option<usize>) {
        let mut cfg = crate::config::RecoSection::default().model_config();
        if let Some(m) = max_items {
            cfg.max_items = m;
        }
        let mut t = Trainer::new(cfg, 1);
        let records = |t: &Trainer| {
            let mut m = std::collections::BTreeMap::new();
            t.model
                .implicit
                .for_each_item_bytes(|i, b| drop(m.insert(i, b.to_vec())));
            m
        };
        t.train(&batch(400, 0));
        let first = t.flush(1);
        let all = records(&t);
        assert_eq!(first.items.len(), all.len());
        assert!(!first.users.is_empty());
        // nothing learned since: nothing to publish
        let idle = t.flush(2);
        assert!(idle.items.is_empty() && idle.users.is_empty());
        let more = batch(30, 400);
        t.train(&more);
        let now = records(&t);
        let changed: Vec<(u64, Vec<u8>)> = now
            .iter()
            .filter(|(i, b)| all.get(i) != Some(b))
            .map(|(i, b)| (*i, b.clone()))
            .collect();
        assert!(!changed.is_empty());
        match max_items {
            // a few events change some items, not all
            None => assert!(changed.len() < now.len()),
            Some(m) => {
                assert_eq!(now.len(), m);
                assert!(now.keys().any(|i| !all.contains_key(i)), "a slot reused");
            }
        }
        let d = t.flush(3);
        let mut got = d.items;
        got.sort();
        assert_eq!(got, changed);
        // the users are those of the events learned from, each once
        let users = more
            .column_by_name("user_id")
            .unwrap()
            .as_primitive::<UInt64Type>();
        let kinds = more
            .column_by_name("event_type")
            .unwrap()
            .as_string::<i32>();
        let ratings = more
            .column_by_name("rating")
            .unwrap()
            .as_primitive::<Float32Type>();
        let want: std::collections::BTreeSet<u64> = (0..more.num_rows())
            .filter(|&i| !users.is_null(i) && !kinds.is_null(i))
            .filter(|&i| kinds.value(i) != "rating" || !ratings.is_null(i))
            .map(|i| users.value(i))
            .collect();
        let published: Vec<u64> = d.users.iter().map(|(u, _)| *u).collect();
        assert_eq!(published.len(), want.len());
        assert_eq!(
            published
                .into_iter()
                .collect::<std::collections::BTreeSet<_>>(),
            want
        );
    }
}
