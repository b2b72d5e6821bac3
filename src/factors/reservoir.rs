//! The reservoir of past positives that popularity-proportional negative
//! sampling draws from. Pure, bounded memory.

use rand::RngCore;

use super::config::ModelRng;
use super::kernels::below;
use super::packed;

/// Slots of the reservoir of past positives ([`Reservoir`]): 256 KB, so a
/// draw stays in the L2 cache (with 4 MB, the slot load was 82% of the
/// sampler's time in `perf annotate`);
/// 65,536 samples resolve every item with more than ~1/65,536 of the
/// positives, and the rarer ones are drawn in proportion on average.
pub const RESERVOIR_SLOTS: usize = 1 << 16;

/// A uniform sample (Vitter's algorithm R) of the item of every positive
/// seen so far: drawing a slot uniformly draws an item with probability
/// proportional to its interaction count, in O(1) (instead of an O(log n)
/// search of cumulative counts), with bounded memory.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(super) struct Reservoir {
    #[serde(with = "packed")]
    pub(super) slots: Vec<u32>,
    /// Positives offered so far.
    pub(super) seen: u64,
}

impl Reservoir {
    pub(super) fn offer(&mut self, rng: &mut ModelRng, cap: usize, item: u32) {
        self.seen += 1;
        if self.slots.len() < cap {
            self.slots.push(item);
        } else {
            // Uniform below `seen` by multiply-shift (bias ≤ seen/2^64).
            let r = ((u128::from(rng.next_u64()) * u128::from(self.seen)) >> 64) as u64;
            if r < cap as u64 {
                self.slots[r as usize] = item;
            }
        }
    }

    pub(super) fn draw(&self, rng: &mut ModelRng) -> Option<usize> {
        (!self.slots.is_empty()).then(|| self.slots[below(rng, self.slots.len())] as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn reservoir_draws_items_in_proportion_to_their_positives() {
        let mut rng = ModelRng::seed_from_u64(5);
        let mut r = Reservoir::default();
        // item 0 seen 9,000 times, item 1 1,000 times, item 2 never, into 500 slots
        for n in 0..10_000u32 {
            r.offer(&mut rng, 500, u32::from(n % 10 == 9));
        }
        assert_eq!(r.seen, 10_000);
        assert_eq!(r.slots.len(), 500);
        let mut hits = [0u32; 3];
        for _ in 0..20_000 {
            hits[r.draw(&mut rng).unwrap()] += 1;
        }
        assert_eq!(hits[2], 0);
        let share = f64::from(hits[1]) / 20_000.0;
        assert!((0.06..0.14).contains(&share), "item 1 share {share}");
        assert!(Reservoir::default().draw(&mut rng).is_none());
    }
}
