//! Online recommendation models, updated one [`Interaction`] at a time.
//!
//! Consumes interaction events (`ts_ms`, user, item, [`Kind`]: view / cart /
//! purchase / rating) in the order they should be learned, and produces:
//! top-k recommendations and scores from an implicit-feedback model
//! ([`Bpr`]: BPR pairwise SGD with sampled negatives, item biases, weighted by
//! event kind), rating predictions from an explicit model ([`BiasedMf`]:
//! global mean + user/item biases + latent vectors, SGD), a time-decayed
//! popularity list for cold start ([`Trending`], half-life in event time), and
//! compact little-endian records ([`FactorRecord`]) of a user or item vector
//! plus bias for an external store. Everything is pure (no I/O), memory is
//! bounded per user and per item (a vector, a bias, a small ring of recent
//! items), and results are deterministic given the seed and the event order.

use std::collections::HashSet;

use rand::SeedableRng;

use super::bpr::{Bpr, GROUP};
pub use super::config::{FastHash, Interaction, Kind, ModelRng, RecoConfig, Sampling};
use super::mf::BiasedMf;
pub use super::packed::FactorRecord;
use super::packed::same_len;
use super::trending::Trending;

/// Recommendations and whether they came from the trending fallback.
#[derive(Debug, Clone, PartialEq)]
pub struct Recommendation {
    pub items: Vec<(u64, f32)>,
    pub fallback: bool,
}

/// The three models behind one `observe`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecoModel {
    pub cfg: RecoConfig,
    pub implicit: Bpr,
    pub explicit: BiasedMf,
    pub trending: Trending,
    events: u64,
}

impl RecoModel {
    /// Whether the model's tables agree in size with its indexes, its
    /// dimension and each other. A snapshot can decode and still not (a
    /// bug, an edit): learning from it would index out of bounds.
    pub fn check_shape(&self) -> Result<(), String> {
        for (what, d, want) in [
            ("implicit", self.implicit.cfg.dim, self.cfg.dim),
            ("rating", self.explicit.cfg.mf_dim, self.cfg.mf_dim),
        ] {
            if d != want {
                return Err(format!(
                    "{what} model of dimension {d} where {want} is configured"
                ));
            }
        }
        self.implicit.check_shape()?;
        self.explicit.check_shape()?;
        same_len(
            "trending scores",
            self.trending.acc.len(),
            self.trending.items.ids.len(),
        )
    }

    pub fn new(cfg: RecoConfig, seed: u64) -> Self {
        Self {
            implicit: Bpr::new(&cfg, seed),
            explicit: BiasedMf::new(&cfg, seed ^ 0x9E37_79B9_7F4A_7C15),
            trending: Trending::bounded(cfg.half_life_ms, cfg.max_items),
            cfg,
            events: 0,
        }
    }

    /// Cache hints for an event a few places ahead (see
    /// [`Bpr::prefetch_event`]). Changes nothing.
    pub fn prefetch_event(&self, user: u64, item: u64) {
        self.implicit.prefetch_event(user, item);
        self.trending.prefetch(item);
    }

    /// Cache hints for the table entries of an event further ahead (see
    /// [`Bpr::prefetch_keys`]). Changes nothing.
    pub fn prefetch_keys(&self, user: u64, item: u64) {
        self.implicit.prefetch_keys(user, item);
        self.trending.prefetch_key(item);
    }

    /// Cache hints for the ring of recent items of an event a place or two
    /// ahead (see [`Bpr::prefetch_ring`]). Changes nothing.
    pub fn prefetch_ring(&self, user: u64) {
        self.implicit.prefetch_ring(user);
    }

    /// Events learned so far.
    pub fn events(&self) -> u64 {
        self.events
    }

    /// Seeds the random generators of a restored model from `seed` and the
    /// number of events learned, so a restored run is deterministic too.
    pub fn reseed(&mut self, seed: u64) {
        let s = seed ^ self.events.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.implicit.rng = ModelRng::seed_from_u64(s);
        self.explicit.rng = ModelRng::seed_from_u64(s ^ 0x9E37_79B9_7F4A_7C15);
    }

    /// Learns from one event: every kind feeds the implicit and trending
    /// models with its weight; ratings also train the explicit model.
    pub fn observe(&mut self, ev: &Interaction) {
        let w = self.cfg.weight(ev.kind);
        self.trending.observe(ev.ts_ms, ev.item, w);
        self.implicit.learn(ev.user, ev.item, w);
        if let Kind::Rating(r) = ev.kind
            && r.is_finite()
        {
            self.explicit.observe(ev.user, ev.item, r);
        }
        self.events += 1;
    }

    /// Learns from up to [`GROUP`] consecutive events: the same as
    /// [`RecoModel::observe`] on each in turn, except that the implicit
    /// model takes their steps round robin ([`Bpr::learn_group`]), so that
    /// their step chains overlap on one core.
    pub fn observe_group(&mut self, events: &[Interaction]) {
        assert!(events.len() <= GROUP, "at most {GROUP} events at once");
        let mut implicit = [(0u64, 0u64, 0f32); GROUP];
        for (slot, ev) in implicit.iter_mut().zip(events) {
            let w = self.cfg.weight(ev.kind);
            self.trending.observe(ev.ts_ms, ev.item, w);
            *slot = (ev.user, ev.item, w);
        }
        self.implicit.learn_group(&implicit[..events.len()]);
        for ev in events {
            if let Kind::Rating(r) = ev.kind
                && r.is_finite()
            {
                self.explicit.observe(ev.user, ev.item, r);
            }
        }
        self.events += events.len() as u64;
    }

    /// Implicit score; `f32::NEG_INFINITY` for an item never seen.
    pub fn score(&self, user: u64, item: u64) -> f32 {
        self.implicit.score(user, item).unwrap_or(f32::NEG_INFINITY)
    }

    /// Top-k over the items seen so far; trending for an unknown user.
    pub fn recommend(&self, user: u64, k: usize, exclude: &HashSet<u64>) -> Recommendation {
        match self.implicit.recommend(user, k, exclude) {
            Some(items) => Recommendation {
                items,
                fallback: false,
            },
            None => Recommendation {
                items: self.trending.top(k, exclude),
                fallback: true,
            },
        }
    }

    /// Rating prediction clipped to 1..=5.
    pub fn predict_rating(&self, user: u64, item: u64) -> f32 {
        self.explicit.predict(user, item)
    }

    /// The k most trending items at the latest event time.
    pub fn trending(&self, k: usize) -> Vec<(u64, f32)> {
        self.trending.top(k, &HashSet::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand::rngs::StdRng;

    fn ev(ts_ms: i64, user: u64, item: u64, kind: Kind) -> Interaction {
        Interaction {
            ts_ms,
            user,
            item,
            kind,
        }
    }

    /// Two user groups, each consuming only its own half of 40 items.
    fn two_taste_stream(n: usize, seed: u64) -> Vec<Interaction> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|t| {
                let user: u64 = rng.random_range(0..20);
                let base = if user < 10 { 0 } else { 20 };
                let item = base + rng.random_range(0..20u64);
                ev(t as i64, user, item, Kind::View)
            })
            .collect()
    }

    /// A model whose tables disagree in size is refused, whichever table.
    #[test]
    fn check_shape_finds_every_table_out_of_size() {
        let mut m = RecoModel::new(RecoConfig::default(), 3);
        for e in two_taste_stream(300, 1) {
            m.observe_group(&[e]);
        }
        m.observe_group(&[ev(301, 4, 5, Kind::Rating(4.0))]);
        assert_eq!(m.check_shape(), Ok(()));
        type Break = fn(&mut RecoModel);
        let breaks: [(&str, Break); 8] = [
            ("implicit user vectors", |m| {
                m.implicit.user_f.pop();
            }),
            ("implicit item counts", |m| m.implicit.item_n.push(1)),
            ("recent items", |m| drop(m.implicit.recent.pop())),
            ("negative sampler", |m| m.implicit.pool.slots[0] = 1000),
            ("recent items name", |m| {
                m.implicit.recent[0].items[0].0 = 1000
            }),
            ("rating item biases", |m| m.explicit.item_b.push(0.0)),
            ("trending scores", |m| {
                m.trending.acc.pop();
            }),
            ("dimension", |m| m.explicit.cfg.mf_dim += 1),
        ];
        for (what, f) in breaks {
            let mut bad = m.clone();
            f(&mut bad);
            let err = bad.check_shape().unwrap_err();
            assert!(err.contains(what), "{what}: {err}");
        }
    }

    #[test]
    fn models_hold_at_most_max_users_and_keep_the_active_ones() {
        let cfg = RecoConfig {
            max_users: 50,
            ..RecoConfig::default()
        };
        let mut m = RecoModel::new(cfg, 5);
        // User 0 is active throughout; 1,000 others pass once each.
        for t in 0..2_000u64 {
            let (user, kind) = if t % 2 == 0 {
                (0, Kind::Rating(4.0))
            } else {
                (1 + t, Kind::View)
            };
            m.observe(&ev(t as i64, user, t % 40, kind));
        }
        assert_eq!(m.implicit.n_users(), 50);
        assert_eq!(m.implicit.user_f.len(), 50 * m.cfg.dim);
        assert_eq!(m.implicit.recent.len(), 50);
        assert!(m.implicit.knows_user(0), "the active user was forgotten");
        assert!(!m.implicit.knows_user(2), "an early one-off user was kept");
        assert!(
            m.implicit.knows_user(2_000),
            "the newest user was forgotten"
        );
        assert!(m.explicit.users.ids.len() <= 50);
        assert!(m.implicit.user_f.iter().all(|x| x.is_finite()));
        // A forgotten user comes back with a fresh vector and no history.
        m.observe(&ev(2_000, 2, 3, Kind::View));
        let u = m.implicit.users.get(2).expect("back");
        assert_eq!(m.implicit.recent[u].items.len(), 1);
        assert_eq!(m.implicit.n_users(), 50);
        // Below the cap nothing changes: same model as an unbounded one.
        let small = |cap| {
            let mut m = RecoModel::new(
                RecoConfig {
                    max_users: cap,
                    ..RecoConfig::default()
                },
                5,
            );
            for t in 0..500u64 {
                m.observe(&ev(t as i64, t % 30, t % 40, Kind::View));
            }
            m.implicit.user_f
        };
        assert_eq!(small(30), small(usize::MAX));
    }

    #[test]
    fn models_hold_at_most_max_items() {
        let cfg = RecoConfig {
            max_items: 10,
            ..RecoConfig::default()
        };
        let mut m = RecoModel::new(cfg, 5);
        // Item 0 is bought all the time; 300 others are seen once each.
        for t in 0..600u64 {
            let (item, kind) = if t % 2 == 0 {
                (0, Kind::Rating(5.0))
            } else {
                (1_000 + t, Kind::View)
            };
            m.observe(&ev(t as i64, t % 7, item, kind));
        }
        assert_eq!(m.implicit.n_items(), 10);
        assert_eq!(m.implicit.item_f.len(), 10 * m.cfg.dim);
        assert_eq!(m.trending.acc.len(), 10);
        assert!(m.explicit.items.ids.len() <= 10);
        assert!(
            m.implicit.item_ids().contains(&0),
            "the popular item was forgotten"
        );
        assert!(
            m.implicit.item_ids().contains(&1_599),
            "the newest item was forgotten"
        );
        assert!(!m.implicit.item_ids().contains(&1_001));
        assert!(m.implicit.item_f.iter().all(|x| x.is_finite()));
        let held: HashSet<u64> = m.implicit.item_ids().iter().copied().collect();
        let rec = m.recommend(3, 10, &HashSet::new());
        assert!(!rec.items.is_empty() && rec.items.iter().all(|(i, _)| held.contains(i)));
        assert_eq!(m.trending(1)[0].0, 0);
    }

    #[test]
    fn recent_items_are_the_last_interactions_distinct_and_newest_first() {
        let cfg = RecoConfig {
            recent_len: 4,
            ..RecoConfig::default()
        };
        let mut m = Bpr::new(&cfg, 1);
        assert_eq!(m.recent_items(7), None);
        m.learn(7, 10, 1.0);
        m.learn(7, 11, 1.0);
        m.learn(8, 99, 1.0);
        assert_eq!(m.recent_items(7), Some(vec![11, 10]));
        // the ring wraps: 10 and 11 fall out, the repeated 12 shows once
        for item in [12, 13, 12, 14, 15] {
            m.learn(7, item, 1.0);
        }
        assert_eq!(m.recent_items(7), Some(vec![15, 14, 12, 13]));
        m.learn(7, 13, 1.0);
        assert_eq!(m.recent_items(7), Some(vec![13, 15, 14, 12]));
        assert_eq!(m.recent_items(8), Some(vec![99]));
    }

    #[test]
    fn published_bytes_are_the_records_and_recent_items() {
        let mut m = Bpr::new(&RecoConfig::default(), 3);
        for (u, i) in [(1, 10), (1, 11), (2, 10), (1, 10), (3, 12)] {
            m.learn(u, i, 1.0);
        }
        let mut seen = Vec::new();
        for u in [1, 2, 3] {
            let (rec, hist) = m.user_bytes(u, &mut seen).unwrap();
            assert_eq!(rec, m.user_record(u).unwrap().to_bytes());
            let items = m.recent_items(u).unwrap();
            assert_eq!(
                hist,
                crate::factors::packed::encode_items(items.into_iter())
            );
        }
        assert_eq!(m.recent_items(1), Some(vec![10, 11]));
        assert!(m.user_bytes(4, &mut seen).is_none());
        let mut n = 0;
        m.for_each_item_bytes(|id, bytes| {
            assert_eq!(bytes, m.item_record(id).unwrap().to_bytes().as_slice());
            n += 1;
        });
        assert_eq!(n, 3);
    }

    #[test]
    fn bpr_loss_decreases_on_fixed_sample() {
        let cfg = RecoConfig {
            dim: 8,
            ..RecoConfig::default()
        };
        let mut m = Bpr::new(&cfg, 1);
        let data = two_taste_stream(4000, 3);
        let mut first = 0.0;
        let mut last = 0.0;
        for (t, e) in data.iter().enumerate() {
            let l = m.observe(e.user, e.item, 1.0).unwrap_or(0.0);
            if t < 500 {
                first += l;
            } else if t >= 3500 {
                last += l;
            }
        }
        assert!(last < 0.7 * first, "loss {first} -> {last}");
    }

    #[test]
    fn bpr_learns_group_taste() {
        for sampling in [Sampling::Uniform, Sampling::Popularity] {
            let cfg = RecoConfig {
                dim: 8,
                sampling,
                ..RecoConfig::default()
            };
            let mut m = Bpr::new(&cfg, 5);
            for e in two_taste_stream(6000, 4) {
                m.observe(e.user, e.item, 1.0);
            }
            let none = HashSet::new();
            let top = m.recommend(3, 10, &none).expect("known user");
            assert!(top.iter().all(|&(i, _)| i < 20), "{sampling:?} {top:?}");
            let top = m.recommend(13, 10, &none).expect("known user");
            assert!(top.iter().all(|&(i, _)| i >= 20), "{sampling:?} {top:?}");
        }
    }

    #[test]
    fn rank_of_agrees_with_recommend() {
        let mut m = Bpr::new(&RecoConfig::default(), 9);
        for e in two_taste_stream(2000, 8) {
            m.observe(e.user, e.item, 1.0);
        }
        let exclude: HashSet<u64> = [0, 5, 21].into_iter().collect();
        let top = m.recommend(4, 40, &exclude).expect("known user");
        for (r, &(item, s)) in top.iter().enumerate() {
            assert_eq!(m.rank_of(4, item, &exclude), Some(r));
            assert_eq!(m.score(4, item), Some(s));
        }
        assert_eq!(m.rank_of(4, 5, &exclude), None);
        assert_eq!(m.rank_of(4, 999, &exclude), None);
        // A diverged (NaN) user row scores nothing: a miss, not rank 0.
        let (item, _) = top[3];
        let u = m.users.get(4).expect("known user");
        let d = m.cfg.dim;
        m.user_f[u * d] = f32::NAN;
        assert_eq!(m.rank_of(4, item, &exclude), None);
    }

    #[test]
    fn updates_are_deterministic_given_seed_and_order() {
        let data = two_taste_stream(3000, 11);
        let run = |seed| {
            let mut m = RecoModel::new(RecoConfig::default(), seed);
            for (t, e) in data.iter().enumerate() {
                let mut e = *e;
                if t % 7 == 0 {
                    e.kind = Kind::Rating((t % 5) as f32 + 1.0);
                }
                m.observe(&e);
            }
            (0..40)
                .map(|i| {
                    let b = m.implicit.item_record(i).map(|r| r.to_bytes());
                    (b, m.predict_rating(2, i).to_bits())
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(run(42), run(42));
        assert_ne!(run(42), run(43));
        let d2 = {
            let mut d = data.clone();
            d.swap(10, 20);
            d
        };
        let mut a = RecoModel::new(RecoConfig::default(), 42);
        let mut b = RecoModel::new(RecoConfig::default(), 42);
        data.iter().for_each(|e| a.observe(e));
        d2.iter().for_each(|e| b.observe(e));
        assert_ne!(a.implicit.item_record(0), b.implicit.item_record(0));
    }

    #[test]
    fn biased_mf_fits_low_rank_ratings() {
        let cfg = RecoConfig::default();
        let mut m = BiasedMf::new(&cfg, 2);
        let mut rng = StdRng::seed_from_u64(6);
        let truth = |u: u64, i: u64| -> f32 {
            let like = (u % 2) == (i % 2);
            (if like { 4.3 } else { 2.2 }) + (i % 3) as f32 * 0.2
        };
        let mut first = 0.0;
        let mut last = 0.0;
        for t in 0..30_000 {
            let (u, i) = (rng.random_range(0..100u64), rng.random_range(0..50u64));
            let e2 = m.observe(u, i, truth(u, i));
            if t < 2000 {
                first += e2;
            } else if t >= 28_000 {
                last += e2;
            }
        }
        let rmse_last = (last / 2000.0).sqrt();
        assert!(last < 0.2 * first, "sse {first} -> {last}");
        assert!(rmse_last < 0.3, "rmse {rmse_last}");
        assert!((1.0..=5.0).contains(&m.predict(0, 0)));
        assert_eq!(m.predict(1_000, 1_000), m.mean().clamp(1.0, 5.0));
    }

    #[test]
    fn trending_decays_by_half_life() {
        let mut t = Trending::new(1000);
        t.observe(0, 1, 4.0);
        t.observe(1000, 2, 3.0);
        // At t = 1000 item 1 has decayed to 2.0.
        assert!((t.score(1) - 2.0).abs() < 1e-5);
        assert_eq!(t.top(2, &HashSet::new())[0].0, 2);
        // Far in the future both rescale without overflow.
        t.observe(1_000_000, 3, 1.0);
        assert_eq!(t.top(1, &HashSet::new())[0].0, 3);
        assert!(t.score(1) >= 0.0 && t.score(1) < 1e-30);
        // Out-of-order event counts with its own age.
        t.observe(999_000, 4, 8.0);
        assert!((t.score(4) - 4.0).abs() < 1e-4);
    }

    #[test]
    fn recommend_falls_back_to_trending_for_unknown_users() {
        let mut m = RecoModel::new(RecoConfig::default(), 1);
        for (t, item) in [7u64, 7, 8, 9, 7, 8].into_iter().enumerate() {
            m.observe(&ev(t as i64, 1, item, Kind::View));
        }
        let r = m.recommend(99, 2, &HashSet::new());
        assert!(r.fallback);
        assert_eq!(r.items.iter().map(|x| x.0).collect::<Vec<_>>(), vec![7, 8]);
        let r = m.recommend(1, 2, &[7].into_iter().collect());
        assert!(!r.fallback);
        assert!(r.items.iter().all(|x| x.0 != 7));
        assert_eq!(m.trending(1)[0].0, 7);
        assert_eq!(m.score(1, 12345), f32::NEG_INFINITY);
    }
}
