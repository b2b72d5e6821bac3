//! The factor models' hyper-parameters, event kinds and the random
//! generator and hasher they use. Pure definitions: no I/O.

use rand::rngs::SmallRng;

/// The models' random generator: xoshiro256++ (rand's `SmallRng`). Negative
/// sampling draws ~20 numbers per event, where ChaCha (`StdRng`) bought a
/// statistical quality the sampling does not need at several times the cost.
pub type ModelRng = SmallRng;

/// A fast, fixed-seed hasher for dense-id maps (the keys are ids, not input
/// an attacker picks bucket by bucket; SipHash cost a fifth of training).
pub type FastHash = foldhash::fast::FixedState;

/// What the user did with the item.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    View,
    Cart,
    Purchase,
    /// An explicit rating, nominally 1–5.
    Rating(f32),
}

/// One user–item event.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Interaction {
    /// Event time, epoch milliseconds.
    pub ts_ms: i64,
    pub user: u64,
    pub item: u64,
    pub kind: Kind,
}

/// How negatives are drawn for the pairwise loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Sampling {
    /// Uniformly over the items seen so far.
    Uniform,
    /// Proportionally to each item's interaction count so far.
    Popularity,
}

/// Hyper-parameters of all three models.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RecoConfig {
    /// Latent dimension of the implicit model.
    pub dim: usize,
    /// SGD step of the implicit model (scaled by the event weight).
    pub lr: f32,
    /// L2 on user and item vectors of the implicit model.
    pub reg: f32,
    /// L2 on item biases of the implicit model.
    pub bias_reg: f32,
    /// Sampled negatives per positive.
    pub negatives: usize,
    pub sampling: Sampling,
    /// Extra BPR steps per event on items from the user's recent ring.
    pub replay: usize,
    /// Recent items kept per user (excluded from negatives, used for replay).
    pub recent_len: usize,
    /// Standard deviation of the initial latent values.
    pub init_std: f32,
    /// Event weights: views, carts, purchases, ratings.
    pub w_view: f32,
    pub w_cart: f32,
    pub w_purchase: f32,
    pub w_rating: f32,
    /// Weight of the log-popularity prior `ln(1 + count_i)` added to scores
    /// (a logQ-style correction; pairs with popularity-sampled negatives).
    pub pop_prior: f32,
    /// Largest step multiplier an event weight can give (keeps SGD stable).
    pub max_step_weight: f32,
    /// Latent dimension of the explicit (rating) model.
    pub mf_dim: usize,
    pub mf_lr: f32,
    pub mf_lr_bias: f32,
    pub mf_reg: f32,
    pub mf_bias_reg: f32,
    /// Half-life of the trending model, in event-time milliseconds.
    pub half_life_ms: i64,
    /// Most users the implicit and explicit models each hold; past it a new
    /// user takes the slot of one not seen for the longest (CLOCK), which is
    /// forgotten (it gets trending items until it comes back).
    #[serde(default = "default_max_users")]
    pub max_users: usize,
    /// Most items each model holds, forgotten the same way past it (the
    /// slot's new item inherits nothing but stale references in recent-item
    /// rings and the negative-sampling reservoir, which fade as they turn over).
    #[serde(default = "default_max_items")]
    pub max_items: usize,
}

pub(super) fn default_max_users() -> usize {
    250_000
}

pub(super) fn default_max_items() -> usize {
    200_000
}

impl Default for RecoConfig {
    fn default() -> Self {
        Self {
            dim: 32,
            lr: 0.05,
            reg: 0.01,
            bias_reg: 0.01,
            negatives: 8,
            sampling: Sampling::Popularity,
            replay: 4,
            recent_len: 32,
            init_std: 0.1,
            w_view: 1.0,
            w_cart: 3.0,
            w_purchase: 5.0,
            w_rating: 1.0,
            pop_prior: 1.0,
            max_step_weight: 2.0,
            mf_dim: 10,
            mf_lr: 0.05,
            mf_lr_bias: 0.05,
            mf_reg: 0.05,
            mf_bias_reg: 0.01,
            half_life_ms: 3_600_000,
            max_users: default_max_users(),
            max_items: default_max_items(),
        }
    }
}

impl RecoConfig {
    /// The implicit-feedback weight of an event kind.
    pub fn weight(&self, kind: Kind) -> f32 {
        match kind {
            Kind::View => self.w_view,
            Kind::Cart => self.w_cart,
            Kind::Purchase => self.w_purchase,
            Kind::Rating(_) => self.w_rating,
        }
    }
}
