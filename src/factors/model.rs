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

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use rand::rngs::SmallRng;
use rand::{RngCore, SeedableRng};
use rand_distr::Distribution;

use super::packed;
use super::slots::IdTable;

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

fn default_max_users() -> usize {
    250_000
}

fn default_max_items() -> usize {
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

/// Dot product with eight independent accumulators (auto-vectorises).
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    let mut acc = [0f32; 8];
    for (x, y) in ca.zip(cb) {
        for ((s, x), y) in acc.iter_mut().zip(x).zip(y) {
            *s += x * y;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Knots of the logistic table per unit of the SGD margin, and its half-width:
/// margins beyond ±16 get the end values (`1/(1+e^16)` ≈ 1.1e-7 from 0).
const SIG_PER_UNIT: f32 = 64.0;
const SIG_HALF_WIDTH: f32 = 16.0;
/// Knots in use: `x = −16 + k/64`, k = 0..=2048.
const SIG_KNOTS: usize = 2 * 16 * 64 + 1;
/// Table length: a power of two, so an index masked to its bits is always in
/// bounds (a NaN margin gives some masked index; the entries past the knots
/// are NaN, so it stays NaN) without a comparison on the step's critical path.
const SIG_LEN: usize = 4096;

/// `e^x` in `f64` for the table below, evaluated at compile time: `x = n·ln 2
/// + r` with |r| ≤ ln 2 / 2 and a Taylor series to r^20 (error far below the
/// `f32` the table holds).
const fn exp_f64_const(x: f64) -> f64 {
    let n = if x >= 0.0 {
        (x / std::f64::consts::LN_2 + 0.5) as i64
    } else {
        (x / std::f64::consts::LN_2 - 0.5) as i64
    };
    let r = x - n as f64 * std::f64::consts::LN_2;
    let (mut term, mut sum, mut k) = (1.0f64, 1.0f64, 1);
    while k <= 20 {
        term = term * r / k as f64;
        sum += term;
        k += 1;
    }
    sum * f64::from_bits(((n + 1023) as u64) << 52)
}

/// `1 / (1 + e^x)` at `x = −16 + k/64`, k = 0..=2048, computed at compile
/// time (so every build and machine trains with the same values), each with
/// its slope per knot (central difference of the neighbouring knots,
/// one-sided at the ends): `[value, slope]`, one 8-byte load.
static NEG_SIGMOID: [[f32; 2]; SIG_LEN] = {
    const fn knot(k: usize) -> f64 {
        let x = -(SIG_HALF_WIDTH as f64) + k as f64 / SIG_PER_UNIT as f64;
        1.0 / (1.0 + exp_f64_const(x))
    }
    let mut t = [[f32::NAN; 2]; SIG_LEN];
    let mut k = 0;
    while k < SIG_KNOTS {
        let (lo, hi) = (
            if k > 0 { k - 1 } else { k },
            if k + 1 < SIG_KNOTS { k + 1 } else { k },
        );
        let slope = (knot(hi) - knot(lo)) / (hi - lo) as f64;
        t[k] = [knot(k) as f32, slope as f32];
        k += 1;
    }
    t
};

/// `1 / (1 + e^x)`, the BPR step's gradient scale, from the table: the
/// nearest knot plus its slope times the offset (at most half a knot away):
/// absolute error ≤ 3e-6, far below the SGD's sampling noise. Each of an
/// event's twelve steps waits for the previous one's scale, so this is
/// written for latency: a clamp, a multiply and one add that rounds to the
/// nearest knot (its number lands in the low mantissa bits), a mask, one
/// load of value and slope, a multiply-add — no exp, no division, no
/// float-to-integer conversion, no bounds check. NaN stays NaN.
#[inline(always)]
fn neg_sigmoid(x: f32) -> f32 {
    // 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // The knot number of margin 0, plus ROUND (an integer: exact).
    const ZERO: f32 = SIG_HALF_WIDTH * SIG_PER_UNIT + ROUND;
    let s = x.clamp(-SIG_HALF_WIDTH, SIG_HALF_WIDTH) * SIG_PER_UNIT;
    // r − ROUND is the nearest knot's number, 0..=2048.
    let r = s + ZERO;
    let k = (r.to_bits() & (SIG_LEN as u32 - 1)) as usize;
    // Offset from that knot in knots, exact: both are small.
    let f = s - (r - ZERO);
    let [a, slope] = NEG_SIGMOID[k];
    a + f * slope
}

/// `ln(1 + n)` of a count, for the popularity prior that every event
/// updates: relative error below 3e-7 (f32 rounding is 6e-8) at a fraction
/// of libm's `log1pf` call (1.5% of the pipeline's CPU). `1 + n` is exact
/// below 2^24 (above, within f32 rounding); split into 2^e · m with m in
/// [√½, √2), `ln m = 2·atanh(t)`, t = (m − 1)/(m + 1), |t| ≤ 0.172, by its
/// series to t^9. Plain f32 operations: the same result on every machine.
#[inline]
fn ln_1p_count(n: u32) -> f32 {
    let y = 1.0 + n as f32;
    let bits = y.to_bits();
    // Exponent and mantissa with m in [√½, √2): shift the split point by
    // the mantissa bits of √2 (0x3504F3), as frexp-based logs do.
    let adj = bits.wrapping_sub(0x3F35_04F3);
    let e = (adj as i32) >> 23;
    let m = f32::from_bits(bits.wrapping_sub((e as u32) << 23));
    let t = (m - 1.0) / (m + 1.0);
    let t2 = t * t;
    let series =
        t * (2.0 + t2 * (2.0 / 3.0 + t2 * (2.0 / 5.0 + t2 * (2.0 / 7.0 + t2 * (2.0 / 9.0)))));
    e as f32 * std::f32::consts::LN_2 + series
}

/// Sum of eight lanes as a tree (the order an 8-lane vector reduces in).
#[inline(always)]
fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `p · (a − b)` over equal-length rows, with eight lane accumulators
/// reduced as a tree, so a vector build computes exactly what a scalar one
/// does.
#[inline(always)]
fn dot_diff(p: &[f32], a: &[f32], b: &[f32]) -> f32 {
    let n = p.len();
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 8];
    let (p8, a8, b8) = (
        p.as_chunks::<8>().0,
        a.as_chunks::<8>().0,
        b.as_chunks::<8>().0,
    );
    for ((x, y), z) in p8.iter().zip(a8).zip(b8) {
        for l in 0..8 {
            acc[l] += x[l] * (y[l] - z[l]);
        }
    }
    for k in n - n % 8..n {
        acc[k % 8] += p[k] * (a[k] - b[k]);
    }
    hsum8(acc)
}

/// `p · (a − b)` on 32 factors for the SGD step, whose latency each next
/// step waits for: four 8-lane chunks of products summed as a tree
/// (`(c0 + c1) + (c2 + c3)`), then the lanes as in [`hsum8`].
#[inline(always)]
fn dot_diff32_tree(p: &[f32; 32], a: &[f32; 32], b: &[f32; 32]) -> f32 {
    let m = |c: usize, l: usize| p[c * 8 + l] * (a[c * 8 + l] - b[c * 8 + l]);
    hsum8(std::array::from_fn(|l| {
        (m(0, l) + m(1, l)) + (m(2, l) + m(3, l))
    }))
}

/// The update of one BPR SGD step with gradient scale `g` = `σ(−x_uij)`:
/// the user row `pu` moves along the old item rows and the positive and
/// negative rows `qi`, `qj` along the old user row, in one pass. Called on
/// fixed-size arrays, the loop unrolls into whole vector operations (the
/// same operations per factor, so the same results). Each row is written as
/// `keep·old + step·other` (`keep` = 1 − lr·reg, `step` = lr·g): ten vector
/// operations per eight factors.
#[inline(always)]
fn bpr_update(pu: &mut [f32], qi: &mut [f32], qj: &mut [f32], g: f32, lr: f32, reg: f32) {
    let n = pu.len();
    let (qi, qj) = (&mut qi[..n], &mut qj[..n]);
    let (keep, step) = (1.0 - lr * reg, lr * g);
    for k in 0..n {
        let (p0, a0, b0) = (pu[k], qi[k], qj[k]);
        let moved = step * p0;
        pu[k] = keep * p0 + step * (a0 - b0);
        qi[k] = keep * a0 + moved;
        qj[k] = keep * b0 - moved;
    }
}

/// A user row of 32 factors in four AVX2 registers.
///
/// # Safety
/// The CPU must support AVX2 (inlined into AVX2 code only).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load32(row: &[f32]) -> [std::arch::x86_64::__m256; 4] {
    use std::arch::x86_64::*;
    let row = &row[..32];
    // SAFETY: `row` holds 32 floats, chunk c is floats 8c..8c+8; AVX2 by
    // the caller's contract.
    std::array::from_fn(|c| unsafe { _mm256_loadu_ps(row.as_ptr().add(c * 8)) })
}

/// Writes a row held by [`load32`] back.
///
/// # Safety
/// As for [`load32`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store32(row: &mut [f32], v: &[std::arch::x86_64::__m256; 4]) {
    use std::arch::x86_64::*;
    let row = &mut row[..32];
    for (c, v) in v.iter().enumerate() {
        // SAFETY: as in `load32`.
        unsafe { _mm256_storeu_ps(row.as_mut_ptr().add(c * 8), *v) };
    }
}

/// The item side of the 32-factor AVX2 steps: the item rows (as a raw
/// base, so that a step may read and write two rows of the table) and
/// biases, shared by the steps of up to [`GROUP`] users.
#[cfg(target_arch = "x86_64")]
struct Items32<'a> {
    base: *mut f32,
    rows: usize,
    bias: &'a mut [f32],
    reg: f32,
    breg: f32,
}

#[cfg(target_arch = "x86_64")]
impl<'a> Items32<'a> {
    fn new(item_f: &'a mut [f32], bias: &'a mut [f32], reg: f32, breg: f32) -> Self {
        Items32 {
            rows: item_f.len() / 32,
            base: item_f.as_mut_ptr(),
            bias,
            reg,
            breg,
        }
    }

    /// One [`Bpr::step`] of the user row `pu` on (positive, negative, rate);
    /// returns the margin before it. Always inlined, so the user row stays
    /// in registers (a call passed it through memory, on the critical path).
    ///
    /// # Safety
    /// As for [`load32`].
    #[inline(always)]
    unsafe fn step(
        &mut self,
        pu: &mut [std::arch::x86_64::__m256; 4],
        (p, j, lr): (u32, u32, f32),
    ) -> f32 {
        use std::arch::x86_64::*;
        const D: usize = 32;
        let (i, j) = (p as usize, j as usize);
        debug_assert_ne!(i, j);
        assert!(i < self.rows && j < self.rows, "item row out of range");
        let (reg, breg, item_b) = (self.reg, self.breg, &mut *self.bias);
        // SAFETY: both rows are in bounds (asserted), raw pointers (so even
        // i == j would only give different numbers, never UB); AVX2 by the
        // caller's contract.
        unsafe {
            let (qi_p, qj_p) = (self.base.add(i * D), self.base.add(j * D));
            let bias = item_b[i] - item_b[j];
            let load = |row: *mut f32, c: usize| _mm256_loadu_ps(row.add(c * 8));
            let qi: [__m256; 4] = std::array::from_fn(|c| load(qi_p, c));
            let qj: [__m256; 4] = std::array::from_fn(|c| load(qj_p, c));
            let dd: [__m256; 4] = std::array::from_fn(|c| _mm256_sub_ps(qi[c], qj[c]));
            let m: [__m256; 4] = std::array::from_fn(|c| _mm256_mul_ps(pu[c], dd[c]));
            // dot_diff32_tree: the chunks as a tree, then the lanes as hsum8
            // ([a0+a4, a1+a5, a2+a6, a3+a7], then (b0+b2) + (b1+b3)).
            let acc = _mm256_add_ps(_mm256_add_ps(m[0], m[1]), _mm256_add_ps(m[2], m[3]));
            let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
            let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
            let x = bias + _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps::<0b01>(q, q)));
            let g = neg_sigmoid(x);
            // bpr_update: keep·old + step·other.
            let (keep, step) = (1.0 - lr * reg, lr * g);
            let (kv, sv) = (_mm256_set1_ps(keep), _mm256_set1_ps(step));
            for c in 0..4 {
                let moved = _mm256_mul_ps(sv, pu[c]);
                pu[c] = _mm256_add_ps(_mm256_mul_ps(kv, pu[c]), _mm256_mul_ps(sv, dd[c]));
                _mm256_storeu_ps(
                    qi_p.add(c * 8),
                    _mm256_add_ps(_mm256_mul_ps(kv, qi[c]), moved),
                );
                _mm256_storeu_ps(
                    qj_p.add(c * 8),
                    _mm256_sub_ps(_mm256_mul_ps(kv, qj[c]), moved),
                );
            }
            item_b[i] += lr * (g - breg * item_b[i]);
            item_b[j] += lr * (-g - breg * item_b[j]);
            x
        }
    }
}

/// A uniform index below `n` (1 ≤ n ≤ 2^32) by multiply-shift (Lemire)
/// without the rejection step: one 32-bit draw and one multiplication,
/// biased by at most n/2^32 (under 2·10^-5 for the 65,536-slot reservoir).
#[inline(always)]
fn below(rng: &mut ModelRng, n: usize) -> usize {
    debug_assert!(n > 0 && n as u64 <= 1 << 32);
    ((u64::from(rng.next_u32()) * n as u64) >> 32) as usize
}

/// Hints the CPU to load the cache lines of `row` (a factor vector, a ring,
/// a bias) ahead of use. A hint only: it never faults and changes no result.
#[inline(always)]
pub(super) fn prefetch<T>(row: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        // One hint per 64-byte line the row touches.
        let start = row.as_ptr().cast::<i8>();
        let end = start.wrapping_add(std::mem::size_of_val(row)) as usize;
        let mut line = start.wrapping_sub(start as usize & 63);
        while (line as usize) < end {
            // SAFETY: `_mm_prefetch` reads nothing architecturally (and the
            // line holds part of the row). SSE is part of the x86_64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line) }
            line = line.wrapping_add(64);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Placeholder generator of a deserialised model, until [`RecoModel::reseed`].
fn unseeded() -> ModelRng {
    ModelRng::seed_from_u64(0)
}

/// A standard normal draw (ziggurat; Box–Muller's `ln` and `cos` per value
/// were 1.5% of the pipeline's CPU), deterministic given the generator.
fn normal(rng: &mut ModelRng) -> f32 {
    rand_distr::StandardNormal.sample(rng)
}

/// A user or item record as stored externally: bias, then the latent vector.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorRecord {
    pub bias: f32,
    pub vector: Vec<f32>,
}

impl FactorRecord {
    /// `4 * (1 + dim)` bytes: the bias then each component, f32 little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * (1 + self.vector.len()));
        Self::write(&mut out, self.bias, &self.vector);
        out
    }

    /// Appends the [`FactorRecord::to_bytes`] form of (`bias`, `vector`) to `out`.
    pub fn write(out: &mut Vec<u8>, bias: f32, vector: &[f32]) {
        out.extend_from_slice(&bias.to_le_bytes());
        for x in vector {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Inverse of [`FactorRecord::to_bytes`]; `None` unless the length is a
    /// positive multiple of four.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.is_empty() || !b.len().is_multiple_of(4) {
            return None;
        }
        let mut it = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let bias = it.next()?;
        Some(Self {
            bias,
            vector: it.collect(),
        })
    }
}

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
struct Reservoir {
    #[serde(with = "packed")]
    slots: Vec<u32>,
    /// Positives offered so far.
    seen: u64,
}

impl Reservoir {
    fn offer(&mut self, rng: &mut ModelRng, cap: usize, item: u32) {
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

    fn draw(&self, rng: &mut ModelRng) -> Option<usize> {
        (!self.slots.is_empty()).then(|| self.slots[below(rng, self.slots.len())] as usize)
    }
}

/// Dense ids for sparse u64 keys, in order of first appearance.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(from = "IndexParts")]
struct Index {
    /// Key to slot; not serialised: rebuilt from `ids` (snapshots written
    /// before it existed also hold a `map`, which is ignored).
    #[serde(skip)]
    map: IdTable,
    #[serde(with = "packed")]
    ids: Vec<u64>,
    /// Bounded indexes ([`Index::insert_bounded`]): one CLOCK reference bit
    /// per slot, set when its key is seen again, and the clock hand.
    #[serde(default, with = "packed")]
    refs: Vec<u64>,
    #[serde(default)]
    hand: usize,
}

/// An [`Index`] as serialised.
#[derive(serde::Deserialize)]
struct IndexParts {
    #[serde(with = "packed")]
    ids: Vec<u64>,
    #[serde(default, with = "packed")]
    refs: Vec<u64>,
    #[serde(default)]
    hand: usize,
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
enum Slot {
    /// The key was there.
    Known,
    /// A new slot at the end.
    New,
    /// The slot of another key, now forgotten.
    Reused,
}

/// `v[i] = x`, appending when `i` is the next index (a new key's slot).
fn put<T>(v: &mut Vec<T>, i: usize, x: T) {
    if i == v.len() {
        v.push(x);
    } else {
        v[i] = x;
    }
}

impl Index {
    fn get(&self, id: u64) -> Option<usize> {
        self.map.get(id).map(|i| i as usize)
    }

    /// Warms the table entry a lookup of `id` reads first (see [`IdTable::prefetch`]).
    fn prefetch(&self, id: u64) {
        self.map.prefetch(id);
    }

    /// The dense index of `id` (a new one at the end if unknown), holding
    /// at most `cap` keys. At the cap a new key
    /// takes the slot the clock hand reaches first without a reference bit
    /// (bits are cleared as the hand passes): a key not seen again since the
    /// hand last passed it, an approximation of the least recently used.
    fn insert_bounded(&mut self, id: u64, cap: usize) -> (usize, Slot) {
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

/// Fixed-capacity ring of a user's recent (item index, weight) pairs.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Ring {
    pub(crate) items: Vec<(u32, f32)>,
    pub(crate) next: usize,
}

impl Ring {
    fn push(&mut self, cap: usize, v: (u32, f32)) {
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

    fn contains(&self, item: u32) -> bool {
        self.items.iter().any(|&(i, _)| i == item)
    }

    /// The entries, newest first.
    fn newest_first(&self) -> impl Iterator<Item = &(u32, f32)> {
        let n = self.items.len();
        (0..n).map(move |k| &self.items[(self.next + n - 1 - k) % n])
    }
}

/// A 256-bit filter of a ring's items: `may_contain` is false only for items
/// certainly not in the ring. Built once per event, it spares most of the
/// ring scans of negative sampling (a dozen draws per event, each checked
/// against the user's recent items).
struct RingFilter([u64; 4]);

impl RingFilter {
    #[inline]
    fn bit(item: u32) -> usize {
        (item.wrapping_mul(0x9E37_79B1) >> 24) as usize
    }

    fn of(ring: &Ring) -> Self {
        let mut f = [0u64; 4];
        for &(i, _) in &ring.items {
            let b = Self::bit(i);
            f[b >> 6] |= 1 << (b & 63);
        }
        RingFilter(f)
    }

    #[inline]
    fn may_contain(&self, item: u32) -> bool {
        let b = Self::bit(item);
        self.0[b >> 6] & (1 << (b & 63)) != 0
    }
}

/// Heap entry ordered so that the *worst* candidate is on top: lower score,
/// then higher dense index, is worse.
#[derive(Debug, Clone, Copy)]
struct Cand(f32, usize);

impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// Top-`k` of `(score, dense index)` pairs, best first; ties go to the lower
/// index. `skip` filters candidates out. O(n log k).
pub(crate) fn top_k(
    n: usize,
    k: usize,
    mut score: impl FnMut(usize) -> f32,
    skip: impl Fn(usize) -> bool,
) -> Vec<(usize, f32)> {
    if k == 0 {
        return Vec::new();
    }
    let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
    for j in 0..n {
        if skip(j) {
            continue;
        }
        let c = Cand(score(j), j);
        if heap.len() < k {
            heap.push(c);
        } else if let Some(worst) = heap.peek()
            && c < *worst
        {
            heap.pop();
            heap.push(c);
        }
    }
    let mut v = heap.into_sorted_vec();
    v.reverse();
    let mut out: Vec<(usize, f32)> = v.into_iter().map(|Cand(s, j)| (j, s)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

/// Implicit-feedback model: BPR (Rendle et al. 2009) trained online, one
/// positive at a time against sampled negatives from the items seen so far.
/// Score of (u, i) = `b_i + β·ln(1 + n_i) + p_u · q_i` (β = `pop_prior`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Bpr {
    cfg: RecoConfig,
    #[serde(skip, default = "unseeded")]
    rng: ModelRng,
    users: Index,
    items: Index,
    #[serde(with = "packed")]
    user_f: Vec<f32>,
    #[serde(with = "packed")]
    item_f: Vec<f32>,
    #[serde(with = "packed")]
    item_b: Vec<f32>,
    #[serde(with = "packed")]
    item_n: Vec<u32>,
    /// `pop_prior * ln(1 + item_n)`, recomputed only when `item_n` changes.
    #[serde(default, with = "packed")]
    prior: Vec<f32>,
    /// Past positives, for popularity-proportional negatives.
    #[serde(default)]
    pool: Reservoir,
    #[serde(with = "packed::rings")]
    recent: Vec<Ring>,
    /// One bit per user slot: learned from since [`Bpr::take_touched_users`]
    /// (a bit per slot instead of a set of ids: no hashing per event).
    #[serde(skip)]
    touched: Vec<u64>,
    /// Scratch: the (positive, negative, step) triples of the current event.
    #[serde(skip)]
    pairs: Vec<(u32, u32, f32)>,
    /// Scratch: each event's triples in [`Bpr::learn_group`].
    #[serde(skip)]
    group: [Vec<(u32, u32, f32)>; GROUP],
}

/// Most events [`Bpr::learn_group`] learns at once: four step chains
/// interleaved on one core (with two, part of each step's ~80-cycle wait
/// stayed idle; four user rows already fill the sixteen AVX2 registers).
pub const GROUP: usize = 4;

impl Bpr {
    pub fn new(cfg: &RecoConfig, seed: u64) -> Self {
        Self {
            cfg: cfg.clone(),
            rng: ModelRng::seed_from_u64(seed),
            users: Index::default(),
            items: Index::default(),
            user_f: Vec::new(),
            item_f: Vec::new(),
            item_b: Vec::new(),
            item_n: Vec::new(),
            prior: Vec::new(),
            pool: Reservoir::default(),
            recent: Vec::new(),
            touched: Vec::new(),
            pairs: Vec::new(),
            group: Default::default(),
        }
    }

    pub fn n_users(&self) -> usize {
        self.users.ids.len()
    }

    pub fn n_items(&self) -> usize {
        self.items.ids.len()
    }

    /// Every item learned so far, in order of first appearance.
    pub fn item_ids(&self) -> &[u64] {
        &self.items.ids
    }

    pub fn knows_user(&self, user: u64) -> bool {
        self.users.get(user).is_some()
    }

    /// Fresh initial values for row `i` of a `dim`-wide table: appended
    /// when `i` is the next row, else overwriting a forgotten key's row.
    #[inline(never)]
    fn fresh_row(rng: &mut ModelRng, table: &mut Vec<f32>, i: usize, dim: usize, std: f32) {
        if table.len() == i * dim {
            table.resize((i + 1) * dim, 0.0);
        }
        for x in &mut table[i * dim..(i + 1) * dim] {
            *x = normal(rng) * std;
        }
    }

    fn user_index(&mut self, user: u64) -> usize {
        let (u, slot) = self.users.insert_bounded(user, self.cfg.max_users);
        if slot != Slot::Known {
            let (d, std) = (self.cfg.dim, self.cfg.init_std);
            Self::fresh_row(&mut self.rng, &mut self.user_f, u, d, std);
            put(&mut self.recent, u, Ring::default());
        }
        let w = u / 64;
        if w >= self.touched.len() {
            self.touched.resize(w + 1, 0);
        }
        self.touched[w] |= 1 << (u % 64);
        u
    }

    /// The users learned from since the last call (each once, as they hold
    /// their slots now: a user forgotten since is not among them).
    pub fn take_touched_users(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (w, bits) in self.touched.iter_mut().enumerate() {
            let mut b = std::mem::take(bits);
            while b != 0 {
                let slot = w * 64 + b.trailing_zeros() as usize;
                out.push(self.users.ids[slot]);
                b &= b - 1;
            }
        }
        out
    }

    /// Warms what learning from (`user`, `item`) reads first — the user's
    /// row and ring header, the item's row, bias and count — for an event a
    /// few places ahead: the hash lookups and row loads of the next events
    /// then overlap with this one's steps instead of stalling the next. A
    /// hint only: reads nothing it changes, changes no result.
    pub fn prefetch_event(&self, user: u64, item: u64) {
        let d = self.cfg.dim;
        if let Some(u) = self.users.get(user)
            && let Some(row) = self.user_f.get(u * d..(u + 1) * d)
        {
            prefetch(row);
            prefetch(std::slice::from_ref(&self.recent[u]));
        }
        if let Some(i) = self.items.get(item)
            && let Some(row) = self.item_f.get(i * d..(i + 1) * d)
        {
            prefetch(row);
            prefetch(&self.item_b[i..=i]);
            prefetch(&self.item_n[i..=i]);
            prefetch(&self.prior[i..=i]);
        }
    }

    /// Warms the table entries [`Bpr::prefetch_event`] then looks `user` and
    /// `item` up in, for an event further ahead: that lookup, which waited
    /// for its own cache miss, then hits. A hint only.
    pub fn prefetch_keys(&self, user: u64, item: u64) {
        self.users.prefetch(user);
        self.items.prefetch(item);
    }

    /// Warms the items of `user`'s ring of recent items (read by every
    /// negative draw's filter), for the next event or two: the ring's header
    /// was warmed by [`Bpr::prefetch_event`] earlier.
    pub fn prefetch_ring(&self, user: u64) {
        if let Some(u) = self.users.get(user) {
            prefetch(&self.recent[u].items);
        }
    }

    fn item_index(&mut self, item: u64) -> usize {
        let (i, slot) = self.items.insert_bounded(item, self.cfg.max_items);
        if slot != Slot::Known {
            let (d, std) = (self.cfg.dim, self.cfg.init_std);
            Self::fresh_row(&mut self.rng, &mut self.item_f, i, d, std);
            put(&mut self.item_b, i, 0.0);
            put(&mut self.item_n, i, 0);
            put(&mut self.prior, i, 0.0);
        }
        i
    }

    #[inline(always)]
    fn sample_negative(&mut self, u: usize, pos: usize, recent: &RingFilter) -> Option<usize> {
        let n = self.n_items();
        if n < 2 {
            return None;
        }
        for _ in 0..8 {
            let j = match self.cfg.sampling {
                Sampling::Uniform => below(&mut self.rng, n),
                Sampling::Popularity => match self.pool.draw(&mut self.rng) {
                    Some(j) => j,
                    None => below(&mut self.rng, n),
                },
            };
            if j != pos && !(recent.may_contain(j as u32) && self.recent[u].contains(j as u32)) {
                return Some(j);
            }
        }
        None
    }

    /// The item's score offset: bias plus popularity prior.
    #[inline]
    fn offset(&self, i: usize) -> f32 {
        self.item_b[i] + self.prior[i]
    }

    /// Whether the tables agree with the index sizes and each other (see
    /// [`RecoModel::check_shape`]).
    fn check_shape(&self) -> Result<(), String> {
        let (nu, ni, d) = (self.users.ids.len(), self.items.ids.len(), self.cfg.dim);
        same_len("implicit user vectors", self.user_f.len(), nu * d)?;
        same_len("implicit item vectors", self.item_f.len(), ni * d)?;
        same_len("implicit item biases", self.item_b.len(), ni)?;
        same_len("implicit item counts", self.item_n.len(), ni)?;
        same_len("recent items", self.recent.len(), nu)?;
        if self.pool.slots.iter().any(|&i| i as usize >= ni) {
            return Err("the negative sampler names an item the model lacks".into());
        }
        let bad_ring = |r: &Ring| {
            (!r.items.is_empty() && r.next >= r.items.len())
                || r.items.iter().any(|&(i, _)| i as usize >= ni)
        };
        if self.recent.iter().any(bad_ring) {
            return Err("a user's recent items name an item the model lacks".into());
        }
        Ok(())
    }

    /// Rebuilds what a snapshot may lack (the prior cache, the reservoir of
    /// positives, from the counts); called after deserialising.
    pub fn repair(&mut self) {
        if self.prior.len() != self.item_n.len() {
            self.prior = self
                .item_n
                .iter()
                .map(|&n| self.cfg.pop_prior * ln_1p_count(n))
                .collect();
        }
        if self.pool.slots.is_empty() {
            for (i, &n) in self.item_n.iter().enumerate() {
                for _ in 0..n {
                    self.pool.offer(&mut self.rng, RESERVOIR_SLOTS, i as u32);
                }
            }
        }
    }

    /// One BPR SGD step on (u, pos ≻ neg) with step `lr`; returns the margin
    /// `x_uij = b_i − b_j + p_u·(q_i − q_j)` before the step.
    #[inline(always)]
    fn step(&mut self, u: usize, i: usize, j: usize, lr: f32) -> f32 {
        debug_assert_ne!(i, j);
        let d = self.cfg.dim;
        let (reg, breg) = (self.cfg.reg, self.cfg.bias_reg);
        let pu = &mut self.user_f[u * d..(u + 1) * d];
        let (qi, qj) = if i < j {
            let (a, b) = self.item_f.split_at_mut(j * d);
            (&mut a[i * d..(i + 1) * d], &mut b[..d])
        } else {
            let (a, b) = self.item_f.split_at_mut(i * d);
            (&mut b[..d], &mut a[j * d..(j + 1) * d])
        };
        let bias = self.item_b[i] - self.item_b[j];
        // The default dimension gets its own compiled copy of the step.
        let (x, g) = match (
            <&mut [f32; 32]>::try_from(&mut *pu),
            <&mut [f32; 32]>::try_from(&mut *qi),
            <&mut [f32; 32]>::try_from(&mut *qj),
        ) {
            (Ok(pu), Ok(qi), Ok(qj)) => {
                let x = bias + dot_diff32_tree(pu, qi, qj);
                let g = neg_sigmoid(x);
                bpr_update(pu, qi, qj, g, lr, reg);
                (x, g)
            }
            _ => {
                let x = bias + dot_diff(pu, qi, qj);
                let g = neg_sigmoid(x);
                bpr_update(pu, qi, qj, g, lr, reg);
                (x, g)
            }
        };
        self.item_b[i] += lr * (g - breg * self.item_b[i]);
        self.item_b[j] += lr * (-g - breg * self.item_b[j]);
        x
    }

    /// The SGD steps of `N` events of different users (one event's for
    /// `N` = 1) for dimension 32 in AVX2 registers, round robin (first of
    /// each event in turn, then the second of each, ...), as [`Bpr::step`]
    /// in that order (tested bit for bit). Each user's row stays in four
    /// registers from its first step to its last instead of being stored and
    /// reloaded by each (the store-to-load round trip was on the critical
    /// path of every step); each step still waits ~80 cycles for the one
    /// before it on the same row, and the other users' chains fill that
    /// wait. Rows several events touch are read and written in memory in
    /// that order, so the result is that of running the steps one by one.
    /// Written with intrinsics because LLVM's SLP vectoriser splits the
    /// portable dot product plus its reduction tree into 2-lane vectors
    /// (~100 instructions instead of ~20). `margin(e, k, x)` gets the margin
    /// of event `e`'s step `k` before it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn steps32xn_avx2<const N: usize>(
        &mut self,
        users: [usize; N],
        steps: [&[(u32, u32, f32)]; N],
        margin: &mut impl FnMut(usize, usize, f32),
    ) {
        for a in 0..N {
            assert!(
                (users[a] + 1) * 32 <= self.user_f.len(),
                "user row out of range"
            );
            for b in 0..a {
                assert_ne!(
                    users[a], users[b],
                    "one user's events are learned one after the other"
                );
            }
        }
        let (reg, breg) = (self.cfg.reg, self.cfg.bias_reg);
        let Self {
            user_f,
            item_f,
            item_b,
            ..
        } = self;
        let base = user_f.as_mut_ptr();
        // SAFETY: the rows are in bounds and pairwise different (asserted),
        // so these slices do not overlap.
        let rows: [&mut [f32]; N] =
            users.map(|u| unsafe { std::slice::from_raw_parts_mut(base.add(u * 32), 32) });
        let mut items = Items32::new(item_f, item_b, reg, breg);
        let len = steps.iter().map(|s| s.len()).max().unwrap_or(0);
        // SAFETY: this function runs only where AVX2 is enabled.
        unsafe {
            let mut pu: [[std::arch::x86_64::__m256; 4]; N] =
                std::array::from_fn(|e| load32(rows[e]));
            for k in 0..len {
                for e in 0..N {
                    if let Some(&t) = steps[e].get(k) {
                        margin(e, k, items.step(&mut pu[e], t));
                    }
                }
            }
            for (row, p) in rows.into_iter().zip(&pu) {
                store32(row, p);
            }
        }
    }

    /// Learns from one event with implicit weight `w`; returns the mean
    /// pairwise loss of the steps taken (before each step), or `None` when no
    /// negative could be drawn.
    pub fn observe(&mut self, user: u64, item: u64, w: f32) -> Option<f32> {
        self.learn_inner(user, item, w, true)
    }

    /// [`Bpr::observe`] without computing the loss (the pipeline's path).
    pub fn learn(&mut self, user: u64, item: u64, w: f32) {
        self.learn_inner(user, item, w, false);
    }

    /// Learns from up to [`GROUP`] consecutive events, each a (user, item,
    /// weight): the events' draws in order, then their steps round robin
    /// (see [`Bpr::steps32xn_avx2`]), then their recent items. Draws never
    /// depend on steps, so this is learning the events one after the other
    /// with the steps reordered — except that an event of a user already in
    /// the group, or bringing a new user or item (whose slot may be one an
    /// earlier event just used), first has the events before it finish
    /// their steps. Deterministic like [`Bpr::learn`].
    pub fn learn_group(&mut self, events: &[(u64, u64, f32)]) {
        assert!(events.len() <= GROUP, "at most {GROUP} events at once");
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has just been checked to support AVX2.
            return unsafe { self.learn_group_avx2(events) };
        }
        self.learn_group_body::<false>(events)
    }

    fn learn_inner(&mut self, user: u64, item: u64, w: f32, want_loss: bool) -> Option<f32> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has just been checked to support AVX2.
            return unsafe { self.learn_avx2(user, item, w, want_loss) };
        }
        self.learn_body::<false>(user, item, w, want_loss)
    }

    /// [`Bpr::learn_body`] compiled for AVX2: the factor loops run 8 lanes
    /// wide instead of SSE's 4. No FMA, so each lane rounds as the portable
    /// code does and the results are the same bit for bit.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn learn_avx2(&mut self, user: u64, item: u64, w: f32, want_loss: bool) -> Option<f32> {
        self.learn_body::<true>(user, item, w, want_loss)
    }

    /// [`Bpr::learn_group_body`] compiled for AVX2 (see [`Bpr::learn_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn learn_group_avx2(&mut self, events: &[(u64, u64, f32)]) {
        self.learn_group_body::<true>(events)
    }

    /// Everything of an event's learning before its SGD steps: the rows of
    /// the user and the item (new ones initialised), the item's count and
    /// the reservoir of positives, and every (positive, negative, step)
    /// triple, drawn into `pairs`. The draws do not depend on the steps. The
    /// negatives' rows are random reads across the whole item table, so
    /// they are prefetched now and their memory latency overlaps instead of
    /// stalling each step in turn. Returns the user's and the item's rows
    /// and how many triples are the event's own (the rest are replays).
    #[inline(always)]
    fn draw(
        &mut self,
        user: u64,
        item: u64,
        w: f32,
        pairs: &mut Vec<(u32, u32, f32)>,
    ) -> (usize, usize, usize) {
        let u = self.user_index(user);
        let i = self.item_index(item);
        self.pool.offer(&mut self.rng, RESERVOIR_SLOTS, i as u32);
        self.item_n[i] += 1;
        self.prior[i] = self.cfg.pop_prior * ln_1p_count(self.item_n[i]);
        pairs.clear();
        let lr = self.cfg.lr * w.clamp(0.0, self.cfg.max_step_weight);
        let recent = RingFilter::of(&self.recent[u]);
        for _ in 0..self.cfg.negatives {
            if let Some(j) = self.sample_negative(u, i, &recent) {
                pairs.push((i as u32, j as u32, lr));
            }
        }
        let steps = pairs.len();
        for _ in 0..self.cfg.replay {
            let ring = &self.recent[u];
            if ring.items.is_empty() {
                break;
            }
            let (p, pw) = ring.items[below(&mut self.rng, ring.items.len())];
            if let Some(j) = self.sample_negative(u, p as usize, &recent) {
                let lr = self.cfg.lr * pw.clamp(0.0, self.cfg.max_step_weight);
                pairs.push((p, j as u32, lr));
            }
        }
        let d = self.cfg.dim;
        for &(p, _, _) in &pairs[steps..] {
            prefetch(&self.item_f[p as usize * d..(p as usize + 1) * d]);
        }
        for &(_, j, _) in pairs.iter() {
            prefetch(&self.item_f[j as usize * d..(j as usize + 1) * d]);
        }
        (u, i, steps)
    }

    /// One event's SGD steps on user row `u`, in order ([`Bpr::step`], or
    /// [`Bpr::steps32xn_avx2`] where it applies); `margin(k, x)` gets each
    /// step's margin before it.
    #[inline(always)]
    fn steps<const AVX2: bool>(
        &mut self,
        u: usize,
        pairs: &[(u32, u32, f32)],
        margin: &mut impl FnMut(usize, f32),
    ) {
        if cfg!(target_arch = "x86_64") && AVX2 && self.cfg.dim == 32 {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `AVX2` is only set by `Bpr::learn_avx2` and
            // `Bpr::learn_group_avx2`, which run only on CPUs detected to
            // support AVX2.
            unsafe {
                self.steps32xn_avx2([u], [pairs], &mut |_, k, x| margin(k, x))
            };
        } else {
            for (k, &(p, j, lr)) in pairs.iter().enumerate() {
                margin(k, self.step(u, p as usize, j as usize, lr));
            }
        }
    }

    #[inline(always)]
    fn learn_body<const AVX2: bool>(
        &mut self,
        user: u64,
        item: u64,
        w: f32,
        want_loss: bool,
    ) -> Option<f32> {
        let mut pairs = std::mem::take(&mut self.pairs);
        let (u, i, steps) = self.draw(user, item, w, &mut pairs);
        let mut loss = 0.0;
        let mut margin = |k: usize, x: f32| {
            if want_loss && k < steps {
                // -ln σ(x), numerically stable.
                loss += if x > 0.0 {
                    (-x).exp().ln_1p()
                } else {
                    -x + x.exp().ln_1p()
                };
            }
        };
        self.steps::<AVX2>(u, &pairs, &mut margin);
        self.pairs = pairs;
        let cap = self.cfg.recent_len;
        self.recent[u].push(cap, (i as u32, w));
        (steps > 0).then(|| loss / steps as f32)
    }

    #[inline(always)]
    fn learn_group_body<const AVX2: bool>(&mut self, events: &[(u64, u64, f32)]) {
        let mut steps = std::mem::take(&mut self.group);
        // The drawn events waiting for their steps: user id, user row, item
        // row, weight.
        let mut drawn = [(0u64, 0usize, 0usize, 0f32); GROUP];
        let mut n = 0;
        for &(user, item, w) in events {
            // Checked after the earlier events' draws: they may have taken
            // this user's or item's slot.
            let apart = drawn[..n].iter().all(|d| d.0 != user)
                && self.users.get(user).is_some()
                && self.items.get(item).is_some();
            if !apart {
                self.finish_group::<AVX2>(&drawn[..n], &steps);
                n = 0;
            }
            let (u, i, _) = self.draw(user, item, w, &mut steps[n]);
            drawn[n] = (user, u, i, w);
            n += 1;
        }
        self.finish_group::<AVX2>(&drawn[..n], &steps);
        self.group = steps;
    }

    /// The steps of drawn events of different users (round robin), then
    /// their recent items.
    #[inline(always)]
    fn finish_group<const AVX2: bool>(
        &mut self,
        drawn: &[(u64, usize, usize, f32)],
        steps: &[Vec<(u32, u32, f32)>; GROUP],
    ) {
        let u = |k: usize| drawn[k].1;
        let s = |k: usize| steps[k].as_slice();
        match drawn.len() {
            0 => return,
            1 => self.steps::<AVX2>(u(0), s(0), &mut |_, _| {}),
            #[cfg(target_arch = "x86_64")]
            // SAFETY (all three): as in `Bpr::steps`.
            2 if AVX2 && self.cfg.dim == 32 => unsafe {
                self.steps32xn_avx2([u(0), u(1)], [s(0), s(1)], &mut |_, _, _| {})
            },
            #[cfg(target_arch = "x86_64")]
            3 if AVX2 && self.cfg.dim == 32 => unsafe {
                self.steps32xn_avx2([u(0), u(1), u(2)], [s(0), s(1), s(2)], &mut |_, _, _| {})
            },
            #[cfg(target_arch = "x86_64")]
            4 if AVX2 && self.cfg.dim == 32 => unsafe {
                let s4 = [s(0), s(1), s(2), s(3)];
                self.steps32xn_avx2([u(0), u(1), u(2), u(3)], s4, &mut |_, _, _| {})
            },
            n => {
                let len = steps[..n].iter().map(Vec::len).max().unwrap_or(0);
                for t in 0..len {
                    for (d, s) in drawn.iter().zip(&steps[..n]) {
                        if let Some(&(p, j, lr)) = s.get(t) {
                            self.step(d.1, p as usize, j as usize, lr);
                        }
                    }
                }
            }
        }
        let cap = self.cfg.recent_len;
        for &(_, u, i, w) in drawn {
            self.recent[u].push(cap, (i as u32, w));
        }
    }

    /// `b_i + p_u · q_i`; the item bias alone for an unknown user, `None` for
    /// an unknown item.
    pub fn score(&self, user: u64, item: u64) -> Option<f32> {
        let i = self.items.get(item)?;
        let d = self.cfg.dim;
        let qi = &self.item_f[i * d..(i + 1) * d];
        Some(match self.users.get(user) {
            Some(u) => self.offset(i) + dot(&self.user_f[u * d..(u + 1) * d], qi),
            None => self.offset(i),
        })
    }

    /// Top-k items (id, score) for a known user, skipping `exclude`; `None`
    /// for an unknown user.
    pub fn recommend(
        &self,
        user: u64,
        k: usize,
        exclude: &HashSet<u64>,
    ) -> Option<Vec<(u64, f32)>> {
        let u = self.users.get(user)?;
        let d = self.cfg.dim;
        let pu = &self.user_f[u * d..(u + 1) * d];
        let top = top_k(
            self.n_items(),
            k,
            |j| self.offset(j) + dot(pu, &self.item_f[j * d..(j + 1) * d]),
            |j| exclude.contains(&self.items.ids[j]),
        );
        Some(
            top.into_iter()
                .map(|(j, s)| (self.items.ids[j], s))
                .collect(),
        )
    }

    /// Zero-based rank of `item` among all seen items except `exclude`
    /// (ties broken towards the earlier-seen item, as in
    /// [`Bpr::recommend`]). `None` if the user or item is unknown, the item
    /// is excluded or its score is NaN. O(items · dim) but allocation-free.
    pub fn rank_of(&self, user: u64, item: u64, exclude: &HashSet<u64>) -> Option<usize> {
        if exclude.contains(&item) {
            return None;
        }
        let u = self.users.get(user)?;
        let t = self.items.get(item)?;
        let d = self.cfg.dim;
        let pu = &self.user_f[u * d..(u + 1) * d];
        let sc = |j: usize| self.offset(j) + dot(pu, &self.item_f[j * d..(j + 1) * d]);
        let st = sc(t);
        if st.is_nan() {
            // Nothing compares above NaN: it would rank first. A broken
            // score is a miss, never a hit.
            return None;
        }
        let beats = |j: usize, s: f32| s > st || (s == st && j < t);
        let mut rank = 0usize;
        for (j, q) in self.item_f.chunks_exact(d).enumerate() {
            let s = self.offset(j) + dot(pu, q);
            rank += usize::from(beats(j, s));
        }
        for x in exclude {
            if let Some(j) = self.items.get(*x)
                && beats(j, sc(j))
            {
                rank -= 1;
            }
        }
        Some(rank)
    }

    /// The stored record of a user (bias 0) or item.
    pub fn user_record(&self, user: u64) -> Option<FactorRecord> {
        let u = self.users.get(user)?;
        let d = self.cfg.dim;
        Some(FactorRecord {
            bias: 0.0,
            vector: self.user_f[u * d..(u + 1) * d].to_vec(),
        })
    }

    /// The distinct items of the user's recent ring (the last `recent_len`
    /// interactions), newest first; `None` for an unknown user.
    pub fn recent_items(&self, user: u64) -> Option<Vec<u64>> {
        let u = self.users.get(user)?;
        let mut seen = Vec::new();
        self.distinct_recent(u, &mut seen);
        Some(seen.iter().map(|&i| self.items.ids[i as usize]).collect())
    }

    /// The item indices of [`Bpr::recent_items`] into `seen`.
    fn distinct_recent(&self, u: usize, seen: &mut Vec<u32>) {
        seen.clear();
        for &(i, _) in self.recent[u].newest_first() {
            if !seen.contains(&i) {
                seen.push(i);
            }
        }
    }

    /// What the store publishes for a user, built straight as bytes: its
    /// record ([`FactorRecord::to_bytes`], bias 0) and its recent items as
    /// u64 little-endian ids ([`crate::factors::store::encode_items`] of
    /// [`Bpr::recent_items`]); `None` for an unknown user. `seen` is scratch.
    pub fn user_bytes(&self, user: u64, seen: &mut Vec<u32>) -> Option<(Vec<u8>, Vec<u8>)> {
        let u = self.users.get(user)?;
        let d = self.cfg.dim;
        let mut rec = Vec::with_capacity(4 * (1 + d));
        FactorRecord::write(&mut rec, 0.0, &self.user_f[u * d..(u + 1) * d]);
        self.distinct_recent(u, seen);
        let hist =
            crate::factors::store::encode_items(seen.iter().map(|&i| self.items.ids[i as usize]));
        Some((rec, hist))
    }

    /// Calls `f(item id, record bytes)` for every item in order of first
    /// appearance, the bytes ([`FactorRecord::to_bytes`] of
    /// [`Bpr::item_record`]) in one reused buffer: no lookup or allocation
    /// per item.
    pub fn for_each_item_bytes(&self, mut f: impl FnMut(u64, &[u8])) {
        let d = self.cfg.dim;
        let mut buf = Vec::with_capacity(4 * (1 + d));
        for (i, &id) in self.items.ids.iter().enumerate() {
            buf.clear();
            FactorRecord::write(&mut buf, self.offset(i), &self.item_f[i * d..(i + 1) * d]);
            f(id, &buf);
        }
    }

    pub fn item_record(&self, item: u64) -> Option<FactorRecord> {
        let i = self.items.get(item)?;
        let d = self.cfg.dim;
        Some(FactorRecord {
            bias: self.offset(i),
            vector: self.item_f[i * d..(i + 1) * d].to_vec(),
        })
    }
}

/// Explicit-rating model: `r̂ = μ + b_u + b_i + p_u · q_i`, SGD on squared
/// error (Koren 2009), μ the running mean of ratings seen.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BiasedMf {
    cfg: RecoConfig,
    #[serde(skip, default = "unseeded")]
    rng: ModelRng,
    sum: f64,
    n: u64,
    users: Index,
    items: Index,
    #[serde(with = "packed")]
    user_f: Vec<f32>,
    #[serde(with = "packed")]
    item_f: Vec<f32>,
    #[serde(with = "packed")]
    user_b: Vec<f32>,
    #[serde(with = "packed")]
    item_b: Vec<f32>,
}

impl BiasedMf {
    fn check_shape(&self) -> Result<(), String> {
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

/// Time-decayed popularity: each item's score is `Σ w · 2^(-(now - ts)/h)`.
/// Stored as `Σ w · 2^((ts - t_ref)/h)`, rescaled when the exponent grows, so
/// an update is O(1) and out-of-order events are exact.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Trending {
    half_life_ms: f64,
    t_ref: i64,
    latest: i64,
    items: Index,
    #[serde(with = "packed")]
    acc: Vec<f64>,
    /// Most items held (see [`RecoConfig::max_items`]).
    #[serde(default = "default_max_items")]
    max_items: usize,
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

    fn now_scale(&self) -> f64 {
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

/// `Err` naming `what` unless it holds `want` values.
fn same_len(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: {got} values where the model's size needs {want}"
        ))
    }
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
    fn dot_matches_naive() {
        let a: Vec<f32> = (0..37).map(|x| x as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|x| (x as f32).sin()).collect();
        let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((dot(&a, &b) - naive).abs() < 1e-3);
    }

    #[test]
    fn neg_sigmoid_table_matches_the_logistic() {
        let mut worst = 0f64;
        for k in 0..=400_000 {
            let x = -20.0 + k as f32 * 1e-4;
            let want = 1.0 / (1.0 + f64::from(x).exp());
            worst = worst.max((f64::from(neg_sigmoid(x)) - want).abs());
        }
        assert!(worst < 3e-6, "absolute error {worst}");
        assert_eq!(neg_sigmoid(0.0), 0.5);
        // The compile-time exp agrees with libm to f64 rounding.
        for x in [-16.0, -3.7, -0.2, 0.0, 0.9, 5.5, 16.0] {
            let (got, want) = (exp_f64_const(x), x.exp());
            assert!(((got - want) / want).abs() < 1e-14, "{x}: {got} vs {want}");
        }
        // Saturates at the ends, monotone, and NaN is not turned into a number.
        assert!(neg_sigmoid(1e6) < 2e-7 && neg_sigmoid(1e6) >= 0.0);
        assert!(neg_sigmoid(-1e6) > 0.999_999 && neg_sigmoid(-1e6) <= 1.0);
        assert!(
            NEG_SIGMOID[..SIG_KNOTS]
                .windows(2)
                .all(|w| w[1][0] <= w[0][0])
        );
        assert!(
            NEG_SIGMOID[..SIG_KNOTS]
                .iter()
                .all(|[_, slope]| *slope <= 0.0)
        );
        assert!(neg_sigmoid(f32::NAN).is_nan());
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
    fn the_count_logarithm_is_ln_1p_to_f32_precision() {
        let worst = (0..200_000u32)
            .chain((0..2_000).map(|k| k * 2_147_483 + 7))
            .chain([u32::MAX, 1 << 24, (1 << 24) + 1])
            .map(|n| {
                let exact = f64::from(n).ln_1p();
                let err = (f64::from(ln_1p_count(n)) - exact).abs();
                if n == 0 { err } else { err / exact }
            })
            .fold(0.0f64, f64::max);
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(ln_1p_count(0), 0.0);
    }

    #[test]
    fn below_is_uniform_and_in_range() {
        let mut rng = ModelRng::seed_from_u64(9);
        let mut counts = [0u32; 7];
        for _ in 0..70_000 {
            counts[below(&mut rng, 7)] += 1;
        }
        for c in counts {
            assert!((9_500..10_500).contains(&c), "{counts:?}");
        }
        assert!((0..1000).all(|_| below(&mut rng, 1) == 0));
    }

    /// The next number of a xorshift64 sequence.
    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Asserts that two models hold the same user rows, item rows and item
    /// biases, bit for bit.
    fn assert_same_rows(a: &Bpr, b: &Bpr, context: &str) {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.user_f), bits(&b.user_f), "{context}");
        assert_eq!(bits(&a.item_f), bits(&b.item_f), "{context}");
        assert_eq!(bits(&a.item_b), bits(&b.item_b), "{context}");
    }

    #[test]
    fn dispatched_update_equals_the_portable_one_bit_for_bit() {
        let cfg = RecoConfig::default();
        let (mut fast, mut portable) = (Bpr::new(&cfg, 3), Bpr::new(&cfg, 3));
        let mut x = 88_172_645_463_325_252u64;
        for _ in 0..5_000 {
            let x = xorshift(&mut x);
            let (u, i, w) = (x % 300, (x >> 20) % 500, 1.0 + (x >> 40) as f32 % 3.0);
            let a = fast.observe(u, i, w);
            let b = portable.learn_body::<false>(u, i, w, true);
            assert_eq!(a.map(f32::to_bits), b.map(f32::to_bits));
        }
        assert_same_rows(&fast, &portable, "single events");
    }

    #[test]
    fn dispatched_group_update_equals_the_portable_one_bit_for_bit() {
        let cfg = RecoConfig::default();
        let (mut fast, mut portable) = (Bpr::new(&cfg, 3), Bpr::new(&cfg, 3));
        let mut x = 88_172_645_463_325_252u64;
        let mut next = || {
            let x = xorshift(&mut x);
            (x % 300, (x >> 20) % 500, 1.0 + (x >> 40) as f32 % 3.0)
        };
        for k in 0..3_000 {
            // Groups of every size, with repeated and new users among them.
            let group: Vec<_> = (0..=k % GROUP).map(|_| next()).collect();
            fast.learn_group(&group);
            portable.learn_group_body::<false>(&group);
        }
        assert_same_rows(&fast, &portable, "groups");
    }

    /// A group is its events learned one after the other, with only the
    /// order of their steps changed: where their steps touch different items
    /// (and always for one user's events), it is bit for bit the same.
    #[test]
    fn a_group_learns_what_its_events_one_by_one_learn() {
        let cfg = RecoConfig {
            sampling: Sampling::Uniform,
            ..RecoConfig::default()
        };
        let mut x = 2_463_534_242u64;
        let mut next = |users: u64| {
            let x = xorshift(&mut x);
            (x % users, (x >> 16) % 5_000, 1.0 + (x >> 40) as f32 % 3.0)
        };
        let mut model = Bpr::new(&cfg, 9);
        for _ in 0..20_000 {
            let e = next(2_000);
            model.learn(e.0, e.1, e.2);
        }
        let items = |v: &[(u32, u32, f32)]| {
            v.iter()
                .flat_map(|&(i, j, _)| [i, j])
                .collect::<HashSet<u32>>()
        };
        let (mut disjoint, mut one_user) = (0, 0);
        for k in 0..400 {
            let n = 2 + k % (GROUP - 1);
            let group: Vec<_> = if k % 4 == 0 {
                // One user's events.
                let u = next(2_000).0;
                (0..n).map(|_| (u, next(2_000).1, 1.0)).collect()
            } else {
                (0..n).map(|_| next(2_000)).collect()
            };
            let (mut p, mut s) = (model.clone(), model.clone());
            p.learn_group(&group);
            for e in &group {
                s.learn(e.0, e.1, e.2);
            }
            let users: HashSet<u64> = group.iter().map(|e| e.0).collect();
            let mut seen = HashSet::new();
            // Known users and items: no event started a new group, so each
            // slot of the scratch holds its event's steps.
            let known = group
                .iter()
                .all(|e| model.users.get(e.0).is_some() && model.items.get(e.1).is_some());
            let apart = known
                && users.len() == n
                && p.group[..n]
                    .iter()
                    .all(|steps| items(steps).iter().all(|&i| seen.insert(i)));
            if users.len() == 1 || apart {
                assert_same_rows(&p, &s, &format!("group {k}"));
                for e in &group {
                    assert_eq!(p.recent_items(e.0), s.recent_items(e.0));
                }
                disjoint += usize::from(apart);
                one_user += usize::from(users.len() == 1);
            }
            // Either way the draws were the same: the generators agree.
            assert_eq!(p.rng.next_u64(), s.rng.next_u64());
            // Both continue from the group's state.
            model = p;
        }
        assert!(disjoint > 100 && one_user == 100, "{disjoint} {one_user}");
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
            assert_eq!(hist, crate::factors::store::encode_items(items.into_iter()));
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

    #[test]
    fn record_round_trips() {
        let r = FactorRecord {
            bias: -0.25,
            vector: vec![1.0, -2.5, 3.125],
        };
        let b = r.to_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[..4], &(-0.25f32).to_le_bytes());
        assert_eq!(FactorRecord::from_bytes(&b), Some(r));
        assert_eq!(FactorRecord::from_bytes(&b[..5]), None);
        assert_eq!(FactorRecord::from_bytes(&[]), None);
    }

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

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let s = [0.5f32, 2.0, 0.5, 3.0, -1.0];
        let t = top_k(s.len(), 3, |j| s[j], |j| j == 3);
        assert_eq!(t, vec![(1, 2.0), (0, 0.5), (2, 0.5)]);
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
