//! The live model's quality, measured prequentially on a sample of the
//! stream: before the model learns a sampled event, where does it rank the
//! event's item for the event's user, and where does the popularity
//! baseline (the trending list `/recommend` falls back to) rank it? Both
//! exclude the user's recent items, as `/recommend` does. Consumes the
//! model and sampled (user, item) pairs; produces recall@k and NDCG@k of
//! both over the last `window` scored samples. Pure: no I/O.

use std::collections::{HashSet, VecDeque};

use super::RecoModel;

/// One scored sample: the model's and the baseline's (hit, gain).
type Sample = ((bool, f64), (bool, f64));

/// Sliding-window recall@k and NDCG@k of the model and of popularity.
#[derive(Debug, Clone)]
pub struct LiveQuality {
    k: usize,
    window: usize,
    samples: VecDeque<Sample>,
    /// Sums over `samples`: model hits, model gain, baseline hits, baseline gain.
    sums: (u64, f64, u64, f64),
}

/// Recall@k and NDCG@k of the model and of the popularity baseline.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityFigures {
    pub samples: usize,
    pub recall: f64,
    pub ndcg: f64,
    pub popularity_recall: f64,
    pub popularity_ndcg: f64,
}

impl QualityFigures {
    /// Whether the model does worse than popularity on its sample.
    pub fn below_popularity(&self) -> bool {
        self.recall < self.popularity_recall
    }
}

/// (hit, DCG gain) of a zero-based rank at cutoff `k`.
fn gain(rank: Option<usize>, k: usize) -> (bool, f64) {
    match rank {
        Some(r) if r < k => (true, 1.0 / ((r + 2) as f64).log2()),
        _ => (false, 0.0),
    }
}

impl LiveQuality {
    pub fn new(k: usize, window: usize) -> Self {
        LiveQuality {
            k: k.max(1),
            window: window.max(1),
            samples: VecDeque::new(),
            sums: (0, 0.0, 0, 0.0),
        }
    }

    /// Scores one event before the model learns it: `false` (not counted)
    /// for a user the model does not know yet (nothing to rank for).
    pub fn score(&mut self, model: &RecoModel, user: u64, item: u64) -> bool {
        if !model.implicit.knows_user(user) {
            return false;
        }
        let recent: HashSet<u64> = model
            .implicit
            .recent_items(user)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let m = gain(model.implicit.rank_of(user, item, &recent), self.k);
        // The trending list as `/recommend` serves it to unknown users:
        // best first, without the user's recent items.
        let pop_rank = if recent.contains(&item) {
            None
        } else {
            model
                .trending(self.k + recent.len())
                .iter()
                .filter(|(i, _)| !recent.contains(i))
                .position(|(i, _)| *i == item)
        };
        let p = gain(pop_rank, self.k);
        self.push((m, p));
        true
    }

    fn push(&mut self, s: Sample) {
        let add = |sums: &mut (u64, f64, u64, f64), s: &Sample, sign: f64| {
            let ((mh, mg), (ph, pg)) = *s;
            if sign > 0.0 {
                sums.0 += u64::from(mh);
                sums.2 += u64::from(ph);
            } else {
                sums.0 -= u64::from(mh);
                sums.2 -= u64::from(ph);
            }
            sums.1 += sign * mg;
            sums.3 += sign * pg;
        };
        add(&mut self.sums, &s, 1.0);
        self.samples.push_back(s);
        if self.samples.len() > self.window
            && let Some(old) = self.samples.pop_front()
        {
            add(&mut self.sums, &old, -1.0);
        }
    }

    /// The figures over the window (zeros before any sample).
    pub fn figures(&self) -> QualityFigures {
        let n = self.samples.len();
        let d = n.max(1) as f64;
        QualityFigures {
            samples: n,
            recall: self.sums.0 as f64 / d,
            ndcg: self.sums.1.max(0.0) / d,
            popularity_recall: self.sums.2 as f64 / d,
            popularity_ndcg: self.sums.3.max(0.0) / d,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::factors::{Interaction, Kind, RecoConfig};

    /// Users of taste group g view items of group g only (4 groups of 200
    /// items, the lower ids of a group the more popular).
    fn stream(n: usize, seed: u64) -> Vec<Interaction> {
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .map(|i| {
                let user = next() % 200;
                let r = next() % 200;
                let item = (user % 4) * 200 + r * r / 200;
                Interaction {
                    ts_ms: i as i64,
                    user,
                    item,
                    kind: Kind::View,
                }
            })
            .collect()
    }

    #[test]
    fn a_model_that_learned_the_taste_beats_popularity_and_the_window_slides() {
        let mut model = RecoModel::new(RecoConfig::default(), 3);
        let mut q = LiveQuality::new(10, 500);
        assert_eq!(q.figures().samples, 0);
        for (i, ev) in stream(30_000, 9).into_iter().enumerate() {
            // A sample of the stream, as live.
            if i % 10 == 0 {
                q.score(&model, ev.user, ev.item);
            }
            model.observe(&ev);
        }
        let f = q.figures();
        assert_eq!(f.samples, 500, "the window keeps the last 500");
        // Popularity's top 10 mixes the four groups' favourites; a model
        // that learned the tastes ranks the user's group first.
        assert!(f.recall > 0.08, "{f:?}");
        assert!(f.recall > 2.0 * f.popularity_recall, "{f:?}");
        assert!(!f.below_popularity());
        assert!(f.ndcg > 0.0 && f.ndcg <= f.recall, "{f:?}");
    }

    #[test]
    fn a_model_scoring_against_the_taste_falls_below_popularity() {
        // The model learned the opposite taste (each user's items of the
        // next group); the live stream follows the original one.
        let mut model = RecoModel::new(RecoConfig::default(), 3);
        for ev in stream(30_000, 5) {
            let shifted = Interaction {
                item: (ev.item + 200) % 800,
                ..ev
            };
            model.observe(&shifted);
        }
        let mut q = LiveQuality::new(10, 2000);
        for ev in stream(600, 11) {
            q.score(&model, ev.user, ev.item);
        }
        let f = q.figures();
        assert!(f.samples > 500, "{f:?}");
        assert!(f.below_popularity(), "{f:?}");
    }

    #[test]
    fn unknown_users_are_not_counted() {
        let model = RecoModel::new(RecoConfig::default(), 3);
        let mut q = LiveQuality::new(10, 10);
        assert!(!q.score(&model, 1, 2));
        assert_eq!(q.figures().samples, 0);
    }
}
