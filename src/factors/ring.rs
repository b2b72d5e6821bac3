//! A user's ring of recent items (excluded from negatives, replayed) and its
//! 256-bit membership filter. Pure, bounded memory.

/// Fixed-capacity ring of a user's recent (item index, weight) pairs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Ring {
    pub(crate) items: Vec<(u32, f32)>,
    pub(crate) next: usize,
}

impl Ring {
    pub(super) fn push(&mut self, cap: usize, v: (u32, f32)) {
        if cap == 0 {
            return;
        }
        if self.items.len() < cap {
            self.items.push(v);
        } else {
            self.items[self.next] = v;
            self.next = (self.next + 1) % cap;
        }
    }

    pub(super) fn contains(&self, item: u32) -> bool {
        self.items.iter().any(|&(i, _)| i == item)
    }

    /// The entries, newest first.
    pub(super) fn newest_first(&self) -> impl Iterator<Item = &(u32, f32)> {
        let n = self.items.len();
        (0..n).map(move |k| &self.items[(self.next + n - 1 - k) % n])
    }
}

/// A 256-bit filter of a ring's items: `may_contain` is false only for items
/// certainly not in the ring. Built once per event, it spares most of the
/// ring scans of negative sampling (a dozen draws per event, each checked
/// against the user's recent items).
pub(super) struct RingFilter(pub(super) [u64; 4]);

impl RingFilter {
    #[inline]
    pub(super) fn bit(item: u32) -> usize {
        (item.wrapping_mul(0x9E37_79B1) >> 24) as usize
    }

    pub(super) fn of(ring: &Ring) -> Self {
        let mut f = [0u64; 4];
        for &(i, _) in &ring.items {
            let b = Self::bit(i);
            f[b >> 6] |= 1 << (b & 63);
        }
        RingFilter(f)
    }

    #[inline]
    pub(super) fn may_contain(&self, item: u32) -> bool {
        let b = Self::bit(item);
        self.0[b >> 6] & (1 << (b & 63)) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_filter_never_misses_a_member() {
        let mut ring = Ring::default();
        for i in 0..40u32 {
            ring.push(32, (i * 7919, 1.0));
        }
        let f = RingFilter::of(&ring);
        for &(i, _) in &ring.items {
            assert!(f.may_contain(i));
        }
        // Mostly sparse: far fewer than all non-members pass.
        let passed = (0..10_000u32)
            .filter(|&i| !ring.contains(i) && f.may_contain(i))
            .count();
        assert!(passed < 2_500, "{passed} of 10,000 non-members passed");
    }
}
