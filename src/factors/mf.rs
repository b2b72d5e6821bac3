//! The explicit-rating model: biased matrix factorisation (global mean,
//! user and item biases, latent vectors) learned by SGD one rating at a
//! time. Pure: no I/O; deterministic given the seed and the event order.

use rand::SeedableRng;

use super::bpr::Bpr;
use super::config::{ModelRng, RecoConfig};
use super::ids::{Index, Slot, put};
use super::kernels::{dot, unseeded};
use super::packed::{self, same_len};

/// Explicit-rating model: `r̂ = μ + b_u + b_i + p_u · q_i`, SGD on squared
/// error (Koren 2009), μ the running mean of ratings seen.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BiasedMf {
    pub(super) cfg: RecoConfig,
    #[serde(skip, default = "unseeded")]
    pub(super) rng: ModelRng,
    pub(super) sum: f64,
    pub(super) n: u64,
    pub(super) users: Index,
    pub(super) items: Index,
    #[serde(with = "packed")]
    pub(super) user_f: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) item_f: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) user_b: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) item_b: Vec<f32>,
}

impl BiasedMf {
    pub(super) fn check_shape(&self) -> Result<(), String> {
        let (nu, ni, d) = (self.users.ids.len(), self.items.ids.len(), self.cfg.mf_dim);
        same_len("rating user vectors", self.user_f.len(), nu * d)?;
        same_len("rating item vectors", self.item_f.len(), ni * d)?;
        same_len("rating user biases", self.user_b.len(), nu)?;
        same_len("rating item biases", self.item_b.len(), ni)
    }

    pub fn new(cfg: &RecoConfig, seed: u64) -> Self {
        Self {
            cfg: cfg.clone(),
            rng: ModelRng::seed_from_u64(seed),
            sum: 0.0,
            n: 0,
            users: Index::default(),
            items: Index::default(),
            user_f: Vec::new(),
            item_f: Vec::new(),
            user_b: Vec::new(),
            item_b: Vec::new(),
        }
    }

    /// Global mean of ratings seen (3 before any).
    pub fn mean(&self) -> f32 {
        if self.n == 0 {
            3.0
        } else {
            (self.sum / self.n as f64) as f32
        }
    }

    /// Unclipped prediction; unknown users or items contribute nothing.
    pub fn predict_raw(&self, user: u64, item: u64) -> f32 {
        let d = self.cfg.mf_dim;
        let u = self.users.get(user);
        let i = self.items.get(item);
        let mut p = self.mean();
        if let Some(u) = u {
            p += self.user_b[u];
        }
        if let Some(i) = i {
            p += self.item_b[i];
        }
        if let (Some(u), Some(i)) = (u, i) {
            p += dot(
                &self.user_f[u * d..(u + 1) * d],
                &self.item_f[i * d..(i + 1) * d],
            );
        }
        p
    }

    /// Prediction clipped to 1..=5.
    pub fn predict(&self, user: u64, item: u64) -> f32 {
        self.predict_raw(user, item).clamp(1.0, 5.0)
    }

    /// One SGD step on a rating; returns the squared error before the step.
    pub fn observe(&mut self, user: u64, item: u64, rating: f32) -> f32 {
        let d = self.cfg.mf_dim;
        let std = self.cfg.init_std;
        let (u, slot) = self.users.insert_bounded(user, self.cfg.max_users);
        if slot != Slot::Known {
            Bpr::fresh_row(&mut self.rng, &mut self.user_f, u, d, std);
            put(&mut self.user_b, u, 0.0);
        }
        let (i, slot) = self.items.insert_bounded(item, self.cfg.max_items);
        if slot != Slot::Known {
            Bpr::fresh_row(&mut self.rng, &mut self.item_f, i, d, std);
            put(&mut self.item_b, i, 0.0);
        }
        self.sum += f64::from(rating);
        self.n += 1;
        let e = rating - self.predict_raw(user, item);
        let (lr, lrb) = (self.cfg.mf_lr, self.cfg.mf_lr_bias);
        let (reg, breg) = (self.cfg.mf_reg, self.cfg.mf_bias_reg);
        self.user_b[u] += lrb * (e - breg * self.user_b[u]);
        self.item_b[i] += lrb * (e - breg * self.item_b[i]);
        for f in 0..d {
            let p = self.user_f[u * d + f];
            let q = self.item_f[i * d + f];
            self.user_f[u * d + f] += lr * (e * q - reg * p);
            self.item_f[i * d + f] += lr * (e * p - reg * q);
        }
        e * e
    }
}
