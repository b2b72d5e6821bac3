//! The implicit-feedback model: BPR pairwise SGD with sampled negatives,
//! item biases and a log-popularity prior, learned online one event (or a
//! group of up to [`GROUP`] events) at a time, and exact top-k over its
//! items. Pure: no I/O; deterministic given the seed and the event order.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashSet};

use rand::SeedableRng;

use super::config::{ModelRng, RecoConfig, Sampling};
use super::ids::{Index, Slot, put};
#[cfg(target_arch = "x86_64")]
use super::kernels::steps32xn_avx2;
use super::kernels::{
    below, bpr_update, dot, dot_diff, dot_diff32_tree, ln_1p_count, neg_sigmoid, normal, prefetch,
    unseeded,
};
use super::packed::{self, FactorRecord, same_len};
use super::reservoir::{RESERVOIR_SLOTS, Reservoir};
use super::ring::{Ring, RingFilter};

/// Heap entry ordered so that the *worst* candidate is on top: lower score,
/// then higher dense index, is worse.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cand(f32, usize);

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
pub(super) fn top_k(
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
    pub(super) cfg: RecoConfig,
    #[serde(skip, default = "unseeded")]
    pub(super) rng: ModelRng,
    pub(super) users: Index,
    pub(super) items: Index,
    #[serde(with = "packed")]
    pub(super) user_f: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) item_f: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) item_b: Vec<f32>,
    #[serde(with = "packed")]
    pub(super) item_n: Vec<u32>,
    /// `pop_prior * ln(1 + item_n)`, recomputed only when `item_n` changes.
    #[serde(default, with = "packed")]
    pub(super) prior: Vec<f32>,
    /// Past positives, for popularity-proportional negatives.
    #[serde(default)]
    pub(super) pool: Reservoir,
    #[serde(with = "packed::rings")]
    pub(super) recent: Vec<Ring>,
    /// One bit per user slot: learned from since [`Bpr::take_touched_users`]
    /// (a bit per slot instead of a set of ids: no hashing per event).
    #[serde(skip)]
    pub(super) touched: Vec<u64>,
    /// Scratch: the (positive, negative, step) triples of the current event.
    #[serde(skip)]
    pub(super) pairs: Vec<(u32, u32, f32)>,
    /// Scratch: each event's triples in [`Bpr::learn_group`].
    #[serde(skip)]
    pub(super) group: [Vec<(u32, u32, f32)>; GROUP],
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
    pub(super) fn fresh_row(
        rng: &mut ModelRng,
        table: &mut Vec<f32>,
        i: usize,
        dim: usize,
        std: f32,
    ) {
        if table.len() == i * dim {
            table.resize((i + 1) * dim, 0.0);
        }
        for x in &mut table[i * dim..(i + 1) * dim] {
            *x = normal(rng) * std;
        }
    }

    pub(super) fn user_index(&mut self, user: u64) -> usize {
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

    /// Marks every user held as learned from: the next
    /// [`Bpr::take_touched_users`] lists them all (a full re-publish).
    pub fn touch_all_users(&mut self) {
        let n = self.users.ids.len();
        self.touched = vec![u64::MAX; n / 64];
        if !n.is_multiple_of(64) {
            self.touched.push((1u64 << (n % 64)) - 1);
        }
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

    pub(super) fn item_index(&mut self, item: u64) -> usize {
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
    pub(super) fn sample_negative(
        &mut self,
        u: usize,
        pos: usize,
        recent: &RingFilter,
    ) -> Option<usize> {
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
    pub(super) fn offset(&self, i: usize) -> f32 {
        self.item_b[i] + self.prior[i]
    }

    /// Whether the tables agree with the index sizes and each other (see
    /// [`RecoModel::check_shape`]).
    pub(super) fn check_shape(&self) -> Result<(), String> {
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
    pub(super) fn step(&mut self, u: usize, i: usize, j: usize, lr: f32) -> f32 {
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
    /// (see `kernels::steps32xn_avx2`), then their recent items. Draws never
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

    pub(super) fn learn_inner(
        &mut self,
        user: u64,
        item: u64,
        w: f32,
        want_loss: bool,
    ) -> Option<f32> {
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
    pub(super) fn learn_avx2(
        &mut self,
        user: u64,
        item: u64,
        w: f32,
        want_loss: bool,
    ) -> Option<f32> {
        self.learn_body::<true>(user, item, w, want_loss)
    }

    /// [`Bpr::learn_group_body`] compiled for AVX2 (see [`Bpr::learn_avx2`]).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    pub(super) fn learn_group_avx2(&mut self, events: &[(u64, u64, f32)]) {
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
    pub(super) fn draw(
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

    /// [`steps32xn_avx2`] on this model's tables.
    ///
    /// # Safety
    /// The CPU must support AVX2: called from the `AVX2` bodies only.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn steps_avx2<const N: usize>(
        &mut self,
        users: [usize; N],
        steps: [&[(u32, u32, f32)]; N],
        margin: &mut impl FnMut(usize, usize, f32),
    ) {
        let tables = (
            &mut self.user_f[..],
            &mut self.item_f[..],
            &mut self.item_b[..],
        );
        // SAFETY: AVX2 by this function's contract.
        unsafe {
            steps32xn_avx2(
                tables,
                (self.cfg.reg, self.cfg.bias_reg),
                users,
                steps,
                margin,
            )
        }
    }

    /// One event's SGD steps on user row `u`, in order ([`Bpr::step`], or
    /// `kernels::steps32xn_avx2` where it applies); `margin(k, x)` gets each
    /// step's margin before it.
    #[inline(always)]
    pub(super) fn steps<const AVX2: bool>(
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
                self.steps_avx2([u], [pairs], &mut |_, k, x| margin(k, x))
            };
        } else {
            for (k, &(p, j, lr)) in pairs.iter().enumerate() {
                margin(k, self.step(u, p as usize, j as usize, lr));
            }
        }
    }

    #[inline(always)]
    pub(super) fn learn_body<const AVX2: bool>(
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
    pub(super) fn learn_group_body<const AVX2: bool>(&mut self, events: &[(u64, u64, f32)]) {
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
    pub(super) fn finish_group<const AVX2: bool>(
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
                self.steps_avx2([u(0), u(1)], [s(0), s(1)], &mut |_, _, _| {})
            },
            #[cfg(target_arch = "x86_64")]
            3 if AVX2 && self.cfg.dim == 32 => unsafe {
                self.steps_avx2([u(0), u(1), u(2)], [s(0), s(1), s(2)], &mut |_, _, _| {})
            },
            #[cfg(target_arch = "x86_64")]
            4 if AVX2 && self.cfg.dim == 32 => unsafe {
                let s4 = [s(0), s(1), s(2), s(3)];
                self.steps_avx2([u(0), u(1), u(2), u(3)], s4, &mut |_, _, _| {})
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
    pub(super) fn distinct_recent(&self, u: usize, seen: &mut Vec<u32>) {
        seen.clear();
        for &(i, _) in self.recent[u].newest_first() {
            if !seen.contains(&i) {
                seen.push(i);
            }
        }
    }

    /// What the store publishes for a user, built straight as bytes: its
    /// record ([`FactorRecord::to_bytes`], bias 0) and its recent items as
    /// u64 little-endian ids ([`crate::factors::packed::encode_items`] of
    /// [`Bpr::recent_items`]); `None` for an unknown user. `seen` is scratch.
    pub fn user_bytes(&self, user: u64, seen: &mut Vec<u32>) -> Option<(Vec<u8>, Vec<u8>)> {
        let u = self.users.get(user)?;
        let d = self.cfg.dim;
        let mut rec = Vec::with_capacity(4 * (1 + d));
        FactorRecord::write(&mut rec, 0.0, &self.user_f[u * d..(u + 1) * d]);
        self.distinct_recent(u, seen);
        let hist =
            crate::factors::packed::encode_items(seen.iter().map(|&i| self.items.ids[i as usize]));
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::RngCore;

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

    #[test]
    fn top_k_orders_and_breaks_ties_by_index() {
        let s = [0.5f32, 2.0, 0.5, 3.0, -1.0];
        let t = top_k(s.len(), 3, |j| s[j], |j| j == 3);
        assert_eq!(t, vec![(1, 2.0), (0, 0.5), (2, 0.5)]);
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
}
