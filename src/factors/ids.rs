//! Ids of users and items to the dense rows of the factor tables: [`Index`]
//! (dense ids in order of first appearance, optionally bounded by CLOCK
//! eviction) over [`IdTable`], an open-addressing hash table whose lookups
//! can be prefetched. Pure, in memory; an [`Index`] serialises its ids only
//! and rebuilds its table on restore.
//!
//! [`IdTable`] is an open-addressing hash table from `u64` keys (user and item ids) to the
//! dense `u32` slots of the factor tables. Consumes keys and slots, produces
//! lookups; pure, in memory, nothing durable (it is rebuilt from the slots'
//! keys when a model is restored).
//!
//! The factor trainer looks up a user and an item in three such tables per
//! event, and each lookup in a table of ~100k keys missed the cache: in
//! hashbrown's table the lookup that warmed an event's rows eight events
//! ahead stalled on its own miss (12% of the trainer's time). Here a key's
//! home entry is computable without touching memory, so [`IdTable::prefetch`]
//! can warm it further ahead still, and the lookup then hits the cache.
//! Linear probing over 16-byte entries (four per cache line) at most half
//! full: a lookup reads one line, rarely two.

use super::packed;

/// One entry: a key and its slot, or `FREE` in `slot` when unused.
#[derive(Debug, Clone, Copy)]
#[repr(C, align(16))]
struct Entry {
    key: u64,
    slot: u32,
}

const FREE: u32 = u32::MAX;
const EMPTY: Entry = Entry { key: 0, slot: FREE };

/// The hash table; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct IdTable {
    entries: Vec<Entry>,
    len: usize,
    /// `64 - log2(entries.len())`: a hash's top bits pick the home entry.
    shift: u32,
}

/// A key's 64-bit hash: the folded 128-bit product with an odd constant
/// (every key bit reaches the top bits, which pick the home entry).
#[inline(always)]
fn hash(key: u64) -> u64 {
    let p = u128::from(key ^ 0x2D35_8DCC_AA6C_78A5) * 0x9E37_79B9_7F4A_7C15u128;
    (p as u64) ^ ((p >> 64) as u64)
}

impl IdTable {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline(always)]
    fn home(&self, key: u64) -> usize {
        (hash(key) >> self.shift) as usize
    }

    #[inline(always)]
    fn mask(&self) -> usize {
        self.entries.len() - 1
    }

    /// Where `key` is (`Ok`), or the free entry that ends its probe run
    /// (`Err`). The table must have entries.
    #[inline(always)]
    fn probe(&self, key: u64) -> Result<usize, usize> {
        let mask = self.mask();
        let mut i = self.home(key);
        loop {
            let e = self.entries[i];
            if e.slot == FREE {
                return Err(i);
            }
            if e.key == key {
                return Ok(i);
            }
            i = (i + 1) & mask;
        }
    }

    /// The slot of `key`, if present.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        self.probe(key).ok().map(|i| self.entries[i].slot)
    }

    /// Hints the CPU to load `key`'s home entry. A hint only: reads and
    /// changes nothing.
    #[inline]
    pub fn prefetch(&self, key: u64) {
        if !self.entries.is_empty() {
            super::kernels::prefetch(std::slice::from_ref(&self.entries[self.home(key)]));
        }
    }

    /// Maps `key` to `slot` (replacing its slot if present).
    pub fn insert(&mut self, key: u64, slot: u32) {
        assert_ne!(slot, FREE, "slot number out of range");
        if (self.len + 1) * 2 > self.entries.len() {
            self.grow();
        }
        match self.probe(key) {
            Ok(i) => self.entries[i].slot = slot,
            Err(i) => {
                self.entries[i] = Entry { key, slot };
                self.len += 1;
            }
        }
    }

    /// Removes `key`; returns its slot if it was present. Later entries of
    /// the probe run move back into the gap, so every lookup still stops at
    /// the first free entry (no tombstones).
    pub fn remove(&mut self, key: u64) -> Option<u32> {
        if self.entries.is_empty() {
            return None;
        }
        let i = self.probe(key).ok()?;
        let mask = self.mask();
        let removed = self.entries[i].slot;
        let mut gap = i;
        let mut j = i;
        loop {
            j = (j + 1) & mask;
            let e = self.entries[j];
            if e.slot == FREE {
                break;
            }
            // An entry may fill the gap if its home is not cyclically in (gap, j].
            let h = self.home(e.key);
            let dist_home = j.wrapping_sub(h) & mask;
            let dist_gap = j.wrapping_sub(gap) & mask;
            if dist_home >= dist_gap {
                self.entries[gap] = e;
                gap = j;
            }
        }
        self.entries[gap] = EMPTY;
        self.len -= 1;
        Some(removed)
    }

    fn grow(&mut self) {
        let cap = (self.entries.len() * 2).max(16);
        let old = std::mem::replace(&mut self.entries, vec![EMPTY; cap]);
        self.shift = 64 - cap.trailing_zeros();
        self.len = 0;
        for e in old {
            if e.slot != FREE {
                self.insert(e.key, e.slot);
            }
        }
    }
}

/// Dense ids for sparse u64 keys, in order of first appearance.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "IndexParts")]
pub(super) struct Index {
    /// Key to slot; not serialised: rebuilt from `ids` (snapshots written
    /// before it existed also hold a `map`, which is ignored).
    #[serde(skip)]
    pub(super) map: IdTable,
    #[serde(with = "packed")]
    pub(super) ids: Vec<u64>,
    /// Bounded indexes ([`Index::insert_bounded`]): one CLOCK reference bit
    /// per slot, set when its key is seen again, and the clock hand.
    #[serde(default, with = "packed")]
    pub(super) refs: Vec<u64>,
    #[serde(default)]
    pub(super) hand: usize,
}

/// An [`Index`] as serialised.
#[derive(serde::Deserialize)]
pub(super) struct IndexParts {
    #[serde(with = "packed")]
    pub(super) ids: Vec<u64>,
    #[serde(default, with = "packed")]
    pub(super) refs: Vec<u64>,
    #[serde(default)]
    pub(super) hand: usize,
}

impl From<IndexParts> for Index {
    fn from(p: IndexParts) -> Self {
        let mut map = IdTable::default();
        for (slot, &id) in p.ids.iter().enumerate() {
            map.insert(id, slot as u32);
        }
        Index {
            map,
            ids: p.ids,
            refs: p.refs,
            hand: p.hand,
        }
    }
}

/// Where [`Index::insert_bounded`] put a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    /// The key was there.
    Known,
    /// A new slot at the end.
    New,
    /// The slot of another key, now forgotten.
    Reused,
}

/// `v[i] = x`, appending when `i` is the next index (a new key's slot).
pub(super) fn put<T>(v: &mut Vec<T>, i: usize, x: T) {
    if i == v.len() {
        v.push(x);
    } else {
        v[i] = x;
    }
}

impl Index {
    pub(super) fn get(&self, id: u64) -> Option<usize> {
        self.map.get(id).map(|i| i as usize)
    }

    /// Warms the table entry a lookup of `id` reads first (see [`IdTable::prefetch`]).
    pub(super) fn prefetch(&self, id: u64) {
        self.map.prefetch(id);
    }

    /// The dense index of `id` (a new one at the end if unknown), holding
    /// at most `cap` keys. At the cap a new key
    /// takes the slot the clock hand reaches first without a reference bit
    /// (bits are cleared as the hand passes): a key not seen again since the
    /// hand last passed it, an approximation of the least recently used.
    pub(super) fn insert_bounded(&mut self, id: u64, cap: usize) -> (usize, Slot) {
        if let Some(i) = self.map.get(id) {
            let i = i as usize;
            let w = i / 64;
            if w >= self.refs.len() {
                self.refs.resize(w + 1, 0);
            }
            self.refs[w] |= 1 << (i % 64);
            return (i, Slot::Known);
        }
        let n = self.ids.len();
        if n < cap.max(1) {
            self.map.insert(id, n as u32);
            self.ids.push(id);
            return (n, Slot::New);
        }
        self.refs.resize(n.div_ceil(64), 0);
        // Two turns at most: the first clears every bit it passes.
        let victim = loop {
            let h = self.hand % n;
            self.hand = (h + 1) % n;
            let (w, b) = (h / 64, 1u64 << (h % 64));
            if self.refs[w] & b == 0 {
                break h;
            }
            self.refs[w] &= !b;
        };
        self.map.remove(self.ids[victim]);
        self.ids[victim] = id;
        self.map.insert(id, victim as u32);
        (victim, Slot::Reused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn inserts_finds_and_removes() {
        let mut t = IdTable::default();
        assert_eq!(t.get(5), None);
        assert_eq!(t.remove(5), None);
        for k in 0..1000u64 {
            t.insert(k * 7919, k as u32);
        }
        assert_eq!(t.len(), 1000);
        assert_eq!(t.get(7919 * 3), Some(3));
        assert_eq!(t.get(1), None);
        t.insert(7919 * 3, 42);
        assert_eq!(t.get(7919 * 3), Some(42));
        assert_eq!(t.len(), 1000);
        assert_eq!(t.remove(7919 * 3), Some(42));
        assert_eq!(t.get(7919 * 3), None);
        assert_eq!(t.len(), 999);
        // extreme keys are ordinary keys
        t.insert(u64::MAX, 7);
        t.insert(0, 8);
        assert_eq!((t.get(u64::MAX), t.get(0)), (Some(7), Some(8)));
        t.prefetch(123);
    }

    proptest! {
        /// Any sequence of inserts and removes agrees with a `HashMap`,
        /// including keys that collide on their home entry (small key space).
        #[test]
        fn agrees_with_a_hash_map(ops in proptest::collection::vec((any::<bool>(), 0u64..64, 0u32..1000), 0..400)) {
            let mut t = IdTable::default();
            let mut m = HashMap::new();
            for (ins, k, v) in ops {
                let k = k.wrapping_mul(0x1_0000_0001);
                if ins {
                    t.insert(k, v);
                    m.insert(k, v);
                } else {
                    prop_assert_eq!(t.remove(k), m.remove(&k));
                }
                prop_assert_eq!(t.len(), m.len());
            }
            for k in 0..64u64 {
                let k = k.wrapping_mul(0x1_0000_0001);
                prop_assert_eq!(t.get(k), m.get(&k).copied());
            }
        }
    }

    #[test]
    fn a_bounded_index_forgets_the_key_not_seen_again_first() {
        let mut ix = Index::default();
        for id in [10, 20, 30] {
            assert_eq!(ix.insert_bounded(id, 3).1, Slot::New);
        }
        // 10 and 30 come back; 20 does not.
        assert_eq!(ix.insert_bounded(10, 3), (0, Slot::Known));
        assert_eq!(ix.insert_bounded(30, 3), (2, Slot::Known));
        assert_eq!(ix.insert_bounded(40, 3), (1, Slot::Reused));
        assert_eq!((ix.get(20), ix.get(40), ix.ids.len()), (None, Some(1), 3));
        // The hand cleared 10's bit on its way and 10 was not seen again:
        // it goes next (30 had its bit, so it only loses it).
        assert_eq!(ix.insert_bounded(50, 3), (0, Slot::Reused));
        assert_eq!((ix.get(10), ix.get(30)), (None, Some(2)));
        // 30 seen again keeps it; 40, not seen since it came, goes.
        assert_eq!(ix.insert_bounded(30, 3), (2, Slot::Known));
        assert_eq!(ix.insert_bounded(60, 3), (1, Slot::Reused));
        assert_eq!(
            (ix.get(40), ix.get(30), ix.get(50)),
            (None, Some(2), Some(0))
        );
        assert_eq!(ix.map.len(), 3);
        for (i, id) in ix.ids.iter().enumerate() {
            assert_eq!(ix.get(*id), Some(i));
        }
    }

    #[test]
    fn an_index_is_rebuilt_from_its_ids_on_restore_in_either_snapshot_format() {
        let mut ix = Index::default();
        for id in (0..500u64).map(|k| k * 1_000_003) {
            ix.insert_bounded(id, 300);
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(&ix, &mut bytes).unwrap();
        let back: Index = ciborium::from_reader(&bytes[..]).unwrap();
        // Snapshots before the slot table also held the map itself.
        #[derive(serde::Serialize)]
        struct Old<'a> {
            map: std::collections::HashMap<u64, u32>,
            ids: &'a [u64],
            refs: &'a [u64],
            hand: usize,
        }
        let old = Old {
            map: (ix.ids.iter().enumerate())
                .map(|(i, &id)| (id, i as u32))
                .collect(),
            ids: &ix.ids,
            refs: &ix.refs,
            hand: ix.hand,
        };
        let mut old_bytes = Vec::new();
        ciborium::into_writer(&old, &mut old_bytes).unwrap();
        let old_back: Index = ciborium::from_reader(&old_bytes[..]).unwrap();
        for r in [&back, &old_back] {
            assert_eq!((r.ids.len(), r.map.len(), r.hand), (300, 300, ix.hand));
            assert_eq!(r.refs, ix.refs);
            for k in 0..500u64 {
                assert_eq!(r.get(k * 1_000_003), ix.get(k * 1_000_003), "key {k}");
            }
        }
        assert_eq!(ix.get(499 * 1_000_003), Some(199));
    }
}
