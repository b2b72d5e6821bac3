//! The numeric kernels of the factor models: dot products, the logistic
//! table of the BPR gradient, the 32-factor AVX2 SGD steps, prefetch hints,
//! uniform and normal draws. Every `unsafe` block of the SIMD and raw-pointer
//! code is here, each with its `SAFETY` argument; the models only choose,
//! after a runtime CPU check, whether to call the AVX2 variants. Pure: no
//! I/O, the same results bit for bit on every x86_64 machine.

use rand::{RngCore, SeedableRng};
use rand_distr::Distribution;

use super::config::ModelRng;

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
pub(super) const SIG_PER_UNIT: f32 = 64.0;
pub(super) const SIG_HALF_WIDTH: f32 = 16.0;
/// Knots in use: `x = −16 + k/64`, k = 0..=2048.
pub(super) const SIG_KNOTS: usize = 2 * 16 * 64 + 1;
/// Table length: a power of two, so an index masked to its bits is always in
/// bounds (a NaN margin gives some masked index; the entries past the knots
/// are NaN, so it stays NaN) without a comparison on the step's critical path.
pub(super) const SIG_LEN: usize = 4096;

/// `e^x` in `f64` for the table below, evaluated at compile time: `x = n·ln 2
/// + r` with |r| ≤ ln 2 / 2 and a Taylor series to r^20 (error far below the
/// `f32` the table holds).
pub(super) const fn exp_f64_const(x: f64) -> f64 {
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
pub(super) static NEG_SIGMOID: [[f32; 2]; SIG_LEN] = {
    pub(super) const fn knot(k: usize) -> f64 {
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
pub(super) fn neg_sigmoid(x: f32) -> f32 {
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
pub(super) fn ln_1p_count(n: u32) -> f32 {
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
pub(super) fn hsum8(a: [f32; 8]) -> f32 {
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

/// `p · (a − b)` over equal-length rows, with eight lane accumulators
/// reduced as a tree, so a vector build computes exactly what a scalar one
/// does.
#[inline(always)]
pub(super) fn dot_diff(p: &[f32], a: &[f32], b: &[f32]) -> f32 {
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
pub(super) fn dot_diff32_tree(p: &[f32; 32], a: &[f32; 32], b: &[f32; 32]) -> f32 {
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
pub(super) fn bpr_update(
    pu: &mut [f32],
    qi: &mut [f32],
    qj: &mut [f32],
    g: f32,
    lr: f32,
    reg: f32,
) {
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
pub(super) unsafe fn load32(row: &[f32]) -> [std::arch::x86_64::__m256; 4] {
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
pub(super) unsafe fn store32(row: &mut [f32], v: &[std::arch::x86_64::__m256; 4]) {
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
pub(super) struct Items32<'a> {
    pub(super) base: *mut f32,
    pub(super) rows: usize,
    pub(super) bias: &'a mut [f32],
    pub(super) reg: f32,
    pub(super) breg: f32,
}

#[cfg(target_arch = "x86_64")]
impl<'a> Items32<'a> {
    pub(super) fn new(item_f: &'a mut [f32], bias: &'a mut [f32], reg: f32, breg: f32) -> Self {
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
    pub(super) unsafe fn step(
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

/// The BPR SGD steps of `N` events of different users (one event's for
/// `N` = 1) for dimension 32 in AVX2 registers, round robin (first of
/// each event in turn, then the second of each, ...), as the portable `Bpr::step`
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
/// of event `e`'s step `k` before it. `(reg, breg)`: the L2 of the rows
/// and of the item biases.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) fn steps32xn_avx2<const N: usize>(
    (user_f, item_f, item_b): (&mut [f32], &mut [f32], &mut [f32]),
    (reg, breg): (f32, f32),
    users: [usize; N],
    steps: [&[(u32, u32, f32)]; N],
    margin: &mut impl FnMut(usize, usize, f32),
) {
    for a in 0..N {
        assert!((users[a] + 1) * 32 <= user_f.len(), "user row out of range");
        for b in 0..a {
            assert_ne!(
                users[a], users[b],
                "one user's events are learned one after the other"
            );
        }
    }
    let base = user_f.as_mut_ptr();
    // SAFETY: the rows are in bounds and pairwise different (asserted),
    // so these slices do not overlap.
    let rows: [&mut [f32]; N] =
        users.map(|u| unsafe { std::slice::from_raw_parts_mut(base.add(u * 32), 32) });
    let mut items = Items32::new(item_f, item_b, reg, breg);
    let len = steps.iter().map(|s| s.len()).max().unwrap_or(0);
    // SAFETY: this function runs only where AVX2 is enabled.
    unsafe {
        let mut pu: [[std::arch::x86_64::__m256; 4]; N] = std::array::from_fn(|e| load32(rows[e]));
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

/// A uniform index below `n` (1 ≤ n ≤ 2^32) by multiply-shift (Lemire)
/// without the rejection step: one 32-bit draw and one multiplication,
/// biased by at most n/2^32 (under 2·10^-5 for the 65,536-slot reservoir).
#[inline(always)]
pub(super) fn below(rng: &mut ModelRng, n: usize) -> usize {
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
pub(super) fn unseeded() -> ModelRng {
    ModelRng::seed_from_u64(0)
}

/// A standard normal draw (ziggurat; Box–Muller's `ln` and `cos` per value
/// were 1.5% of the pipeline's CPU), deterministic given the generator.
pub(super) fn normal(rng: &mut ModelRng) -> f32 {
    rand_distr::StandardNormal.sample(rng)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
