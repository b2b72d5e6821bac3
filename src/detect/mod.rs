//! Online anomaly detector for one univariate time series.
//!
//! Consumes `(timestamp_ms, value)` samples of one series in time order, at a regular-ish
//! interval (one call to [`Detector::update`] per sample; no look-ahead). Produces for each
//! sample a [`Point`]: an anomaly score in `[0, 1]` and a `flagged` decision
//! (`score >= threshold`, with repeated flags suppressed for a while after a detection).
//! Memory per series is bounded by the configuration (a few sliding windows, each with a
//! sorted copy, plus `season_depth` values per time-of-day slot); std only, no I/O. The
//! sorted copies make a step a few binary searches and at most one pass over a window
//! (about 1 µs with the defaults) instead of selections over every window.
//!
//! Method, in three stages:
//! 1. *Surprise.* Three robust predictors run side by side: level (the value against the
//!    recent window), change (the first difference against recent differences) and season
//!    (the value minus the median of the same time-of-day slot on the previous
//!    `season_depth` days, slots taken from `timestamp mod season_ms`). Each residual gets a
//!    robust z-score against that predictor's own recent residuals (sliding median and
//!    MAD). The predictor with the smallest residual scale is the best model of the series
//!    right now, and its `|z|` is the sample's surprise, compressed as `ln(1 + |z|)`.
//! 2. *Calibration.* Surprise is judged against its own history (`long_window` samples), on
//!    two channels: the current surprise, and its average over `short_window` samples
//!    (sustained changes). Each channel's tail probability is empirical inside the range of
//!    the history and, beyond its upper 5% quantile, an exponential tail fitted to the
//!    excesses (peaks over threshold); it never claims more rarity than was actually seen.
//!    The two are Bonferroni-combined into `q`, and the score is `1 - q^(1/8)`
//!    (so `0.5` ⇔ `q = 1/256`).
//! 3. *Decision.* Scores are 0 during warm-up; a flag is raised when the score reaches the
//!    threshold, after which scores are quartered and no flag is raised for `suppress`
//!    samples (one alert per event); those samples are also kept out of the surprise
//!    history, so an alerted event does not mask the next one (declustering).

pub mod drift;
pub mod incidents;

use std::hint::select_unpredictable;

use serde::{Deserialize, Serialize};

/// Detector parameters. Window lengths are in samples.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DetectorConfig {
    /// Score at or above which a sample is flagged.
    pub threshold: f64,
    /// Samples in the sliding windows of the robust statistics.
    pub window: usize,
    /// Samples before any score is produced.
    pub warmup: usize,
    /// Seasonal period in milliseconds (one day); 0 disables the seasonal predictor.
    pub season_ms: i64,
    /// Previous periods kept per time-of-day slot.
    pub season_depth: usize,
    /// Samples in the average of the sustained-surprise channel.
    pub short_window: usize,
    /// Samples of surprise history against which surprise is calibrated.
    pub long_window: usize,
    /// Samples after a flag during which scores are damped and no new flag is raised.
    pub suppress: usize,
    /// A value beyond the range of the level window by more than this fraction of the
    /// range scores at least [`SPATIAL_SCORE`] (a new extreme, however calm the series
    /// was); 0 turns the rule off.
    #[serde(default)]
    pub spatial_tolerance: f64,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            window: 400,
            warmup: 150,
            season_ms: 86_400_000,
            season_depth: 3,
            short_window: 12,
            long_window: 2000,
            suppress: 100,
            spatial_tolerance: 0.0,
        }
    }
}

/// Output for one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Anomaly score in `[0, 1]`.
    pub score: f64,
    /// Whether this sample is reported as an anomaly.
    pub flagged: bool,
}

impl Point {
    const QUIET: Point = Point {
        score: 0.0,
        flagged: false,
    };
}

/// Fraction of the surprise history treated as its tail.
const TAIL_FRACTION: f64 = 0.05;
/// Smallest mean excess of the fitted tail, in units of `ln(1 + z)`.
const MIN_TAIL_SCALE: f64 = 0.1;
/// Score exponent: `score = 1 - q^(1 / SCORE_EXPONENT)`.
const SCORE_EXPONENT: f64 = 8.0;
/// Least score of a value beyond the level window's range (see
/// [`DetectorConfig::spatial_tolerance`]).
const SPATIAL_SCORE: f64 = 0.9;
/// Factor applied to scores while alerts are suppressed.
const SUPPRESSED_FACTOR: f64 = 0.25;

/// Fixed-capacity ring buffer of `f64`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ring {
    buf: Vec<f64>,
    cap: usize,
    head: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            buf: Vec::with_capacity(cap),
            cap,
            head: 0,
        }
    }

    /// Pushes a value, returning the evicted one.
    fn push(&mut self, v: f64) -> Option<f64> {
        if self.buf.len() < self.cap {
            self.buf.push(v);
            None
        } else {
            let old = std::mem::replace(&mut self.buf[self.head], v);
            self.head = (self.head + 1) % self.cap;
            Some(old)
        }
    }

    fn len(&self) -> usize {
        self.buf.len()
    }
}

/// A window of the last `cap` values kept as `f32`, in a ring and a copy sorted in
/// `f32::total_cmp` order, so that order statistics cost a binary search instead of a
/// selection. `f32` halves the bytes of `f64` copies: with thousands of series out of cache,
/// a step's cost is the memory it touches and moves. The values (residuals, surprises) need
/// no more digits: a residual is compared with the window's median at `f32` precision, and
/// scales have a floor of a millionth of the series' magnitude, far above `f32` rounding.
///
/// Its statistics equal [`robust_stats`] and [`tail_probability`] over the ring's values
/// up to the order in which sums are added (their order statistics are the same values).
///
/// Serialized as its ring alone: the sorted copy is rebuilt when it is read back.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(from = "Ring32", into = "Ring32")]
struct SortedWindow {
    ring: Ring32,
    sorted: Vec<f32>,
}

/// [`SortedWindow`]'s ring, oldest value at `head` once full.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Ring32 {
    buf: Vec<f32>,
    cap: usize,
    head: usize,
}

impl From<Ring32> for SortedWindow {
    fn from(ring: Ring32) -> Self {
        let mut sorted = ring.buf.clone();
        sorted.sort_unstable_by(f32::total_cmp);
        Self { ring, sorted }
    }
}

impl From<SortedWindow> for Ring32 {
    fn from(s: SortedWindow) -> Self {
        s.ring
    }
}

impl SortedWindow {
    fn new(cap: usize) -> Self {
        let cap = cap.max(1);
        Self {
            ring: Ring32 {
                buf: Vec::with_capacity(cap),
                cap,
                head: 0,
            },
            sorted: Vec::with_capacity(cap),
        }
    }

    fn len(&self) -> usize {
        self.ring.buf.len()
    }

    /// The ring's values, as `f64` (the references' input).
    fn values(&self) -> Vec<f64> {
        self.ring.buf.iter().map(|&v| f64::from(v)).collect()
    }

    /// Pushes `v` (rounded to `f32`), evicting the oldest value from both copies when full.
    fn push(&mut self, v: f64) {
        let v = v as f32;
        let r = &mut self.ring;
        if r.buf.len() < r.cap {
            r.buf.push(v);
            let i = self.sorted.partition_point(|p| p.total_cmp(&v).is_lt());
            self.sorted.insert(i, v);
            return;
        }
        let old = std::mem::replace(&mut r.buf[r.head], v);
        r.head = (r.head + 1) % r.cap;
        replace_sorted(&mut self.sorted, old, v);
    }

    /// Median of the window and its [`robust_stats`] scale: median and MAD from the sorted
    /// copy; the mean absolute deviation (one pass) only when a cheap upper bound says it can
    /// exceed the other terms.
    fn robust_stats(&self, floor: f64, scratch: &mut Vec<f64>) -> (f64, f64) {
        let s = &self.sorted;
        let n = s.len();
        if !(s[0].is_finite() && s[n - 1].is_finite()) {
            return robust_stats(&self.values(), floor, scratch);
        }
        let med = f64::from(s[n / 2]);
        let mad = median_abs_deviation(s, med);
        let base = (1.4826 * mad).max(floor);
        let len = n as f64;
        // The bound is within a few ulp of an upper bound: pad it.
        let bound =
            0.5 * 1.2533 * (abs_deviation_bound(s, med) * (1.0 + 4.0 * len * f64::EPSILON) / len);
        if bound <= base {
            return (med, base);
        }
        let mean_ad = abs_deviation_sum(s, med) / len;
        (med, base.max(0.5 * 1.2533 * mean_ad))
    }

    /// [`tail_probability`] of `x` against the window, from the sorted copy: a binary
    /// search for the count, the top `k` values for the fitted tail.
    fn tail_probability(&self, x: f64, scratch: &mut Vec<f64>) -> f64 {
        let s = &self.sorted;
        let n = s.len();
        if !(s[0].is_finite() && s[n - 1].is_finite() && x.is_finite()) {
            return tail_probability(&self.values(), x, scratch);
        }
        let k = ((n as f64 * TAIL_FRACTION).ceil() as usize).clamp(1, n);
        let above = n - s.partition_point(|&h| f64::from(h) < x);
        let empirical = (above as f64 + 1.0) / (n as f64 + 1.0);
        let u = f64::from(s[n - k]);
        if x <= u {
            return empirical;
        }
        let sum = s[n - k + 1..]
            .iter()
            .map(|&h| f64::from(h) - u)
            .sum::<f64>();
        let mean_excess = (sum / k as f64).max(MIN_TAIL_SCALE);
        let fitted = (k as f64 / (n as f64 + 1.0)) * (-(x - u) / mean_excess).exp();
        if above > 0 {
            fitted.max(empirical)
        } else {
            fitted
        }
    }
}

/// Replaces one occurrence of `old` by `new` in the sorted slice, moving only the elements
/// between their two positions.
fn replace_sorted(sorted: &mut [f32], old: f32, new: f32) {
    let (i, j) = ranks(sorted, old, new);
    debug_assert_eq!(
        sorted[i].to_bits(),
        old.to_bits(),
        "evicted value is in the sorted copy"
    );
    if j > i {
        // `old` is among the `j` elements below `new`: `new` goes to `j - 1` once it is out.
        sorted.copy_within(i + 1..j, i);
        sorted[j - 1] = new;
    } else {
        sorted.copy_within(j..i, j + 1);
        sorted[j] = new;
    }
}

/// Numbers of elements of the sorted, nonempty `s` below `a` and below `b` in
/// `f32::total_cmp` order: two branchless binary searches run side by side, so that their
/// memory accesses overlap.
fn ranks(s: &[f32], a: f32, b: f32) -> (usize, usize) {
    // `total_cmp` as a comparison of integers.
    let key = |x: f32| {
        let bits = x.to_bits() as i32;
        bits ^ (((bits >> 31) as u32) >> 1) as i32
    };
    let (ka, kb) = (key(a), key(b));
    let (mut base_a, mut base_b) = (0, 0);
    let mut size = s.len();
    while size > 1 {
        let half = size / 2;
        base_a = select_unpredictable(key(s[base_a + half]) < ka, base_a + half, base_a);
        base_b = select_unpredictable(key(s[base_b + half]) < kb, base_b + half, base_b);
        size -= half;
    }
    (
        base_a + usize::from(key(s[base_a]) < ka),
        base_b + usize::from(key(s[base_b]) < kb),
    )
}

/// Element of rank `n / 2` among the deviations `|v - med|` of the sorted, finite `s`, where
/// `med = s[n / 2]`. The deviations below the median decrease and those from it on increase
/// (rounding is monotone), so this is a selection from two sorted sequences.
fn median_abs_deviation(s: &[f32], med: f64) -> f64 {
    let mid = s.len() / 2;
    // Ascending: `a(j)` walks down from the median, `b(j)` up from it.
    let a = |j: usize| (f64::from(s[mid - 1 - j]) - med).abs();
    let b = |j: usize| (f64::from(s[mid + j]) - med).abs();
    let (len_a, len_b) = (mid, s.len() - mid);
    let take = mid + 1;
    // `i` smallest from `a` and `take - i` from `b`: the least `i` with `a(i) >= b(take - 1 - i)`.
    let (mut lo, mut hi) = (take.saturating_sub(len_b), take.min(len_a));
    while lo < hi {
        let i = lo + (hi - lo) / 2;
        if b(take - 1 - i) > a(i) {
            lo = i + 1;
        } else {
            hi = i;
        }
    }
    let (i, j) = (lo, take - lo);
    match (i, j) {
        (0, _) => b(j - 1),
        (_, 0) => a(i - 1),
        _ => a(i - 1).max(b(j - 1)),
    }
}

/// Upper bound on the sum of `|v - med|` over the sorted `s`, up to a few ulp of rounding,
/// from O(log n) of its elements: every deviation is bounded by that of the outermost element
/// of its block, with blocks halving in size from the median towards either end.
fn abs_deviation_bound(s: &[f32], med: f64) -> f64 {
    let (n, mid) = (s.len(), s.len() / 2);
    let mut total = 0.0;
    let mut start = mid;
    while start < n {
        let end = start + ((n - start) / 2).max(1);
        total += (end - start) as f64 * (f64::from(s[end - 1]) - med).abs();
        start = end;
    }
    let mut end = mid;
    while end > 0 {
        let start = end - (end / 2).max(1);
        total += (end - start) as f64 * (f64::from(s[start]) - med).abs();
        end = start;
    }
    total
}

/// Sum of `|v - med|` over `vals`, in no particular order (four independent accumulators).
fn abs_deviation_sum(vals: &[f32], med: f64) -> f64 {
    let mut acc = [0.0; 4];
    let chunks = vals.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += (f64::from(v) - med).abs();
        }
    }
    let tail: f64 = rest.iter().map(|&v| (f64::from(v) - med).abs()).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Median and robust scale of `vals`: `1.4826 MAD`, floored by half the Gaussian-consistent
/// mean absolute deviation (quantised data) and by `floor`. `scratch` avoids allocation.
/// The reference for [`SortedWindow::robust_stats`], used as is for non-finite windows.
fn robust_stats(vals: &[f64], floor: f64, scratch: &mut Vec<f64>) -> (f64, f64) {
    scratch.clear();
    scratch.extend_from_slice(vals);
    let mid = scratch.len() / 2;
    let (_, &mut med, _) = scratch.select_nth_unstable_by(mid, f64::total_cmp);
    let mut mean_ad = 0.0;
    for v in scratch.iter_mut() {
        *v = (*v - med).abs();
        mean_ad += *v;
    }
    mean_ad /= vals.len() as f64;
    let (_, &mut mad, _) = scratch.select_nth_unstable_by(mid, f64::total_cmp);
    (med, (1.4826 * mad).max(0.5 * 1.2533 * mean_ad).max(floor))
}

/// Robust z-score of one predictor's residual against its recent residuals.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RobustZ {
    hist: SortedWindow,
    min_len: usize,
}

impl RobustZ {
    fn new(window: usize) -> Self {
        Self {
            hist: SortedWindow::new(window),
            min_len: (window / 4).clamp(8, 64),
        }
    }

    /// `(z, scale)` of `r` against past residuals (None while too few), then records `r`.
    fn update(&mut self, r: f64, floor: f64, scratch: &mut Vec<f64>) -> Option<(f64, f64)> {
        let z = (self.hist.len() >= self.min_len).then(|| {
            let (med, scale) = self.hist.robust_stats(floor, scratch);
            // At the window's precision: a value equal to the median is 0, not its rounding.
            ((f64::from(r as f32) - med) / scale, scale)
        });
        self.hist.push(r);
        z
    }
}

/// Same-time-of-period memory: the last `depth` values of each slot of the period, all
/// slots in one flat array (a slot per `Vec` cost a pointer chase and ~70 bytes of overhead
/// per slot: with 1,440 slots, most of a detector's memory and a cache miss per step).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Seasonal {
    period_ms: i64,
    depth: usize,
    step_ms: Option<i64>,
    steps: Vec<i64>,
    /// Slot `k`'s values are `vals[k * depth..][..lens[k]]`, written round-robin from
    /// `heads[k]` once full.
    vals: Vec<f64>,
    lens: Vec<u8>,
    heads: Vec<u8>,
}

impl Seasonal {
    fn new(period_ms: i64, depth: usize) -> Self {
        Self {
            period_ms,
            depth: depth.clamp(1, u8::MAX as usize),
            step_ms: None,
            steps: Vec::new(),
            vals: Vec::new(),
            lens: Vec::new(),
            heads: Vec::new(),
        }
    }

    /// Learns the sampling step (median of the first 16 intervals), then sets up the slots.
    fn observe_step(&mut self, dt: i64) {
        if self.step_ms.is_some() || self.period_ms <= 0 || dt <= 0 {
            return;
        }
        self.steps.push(dt);
        if self.steps.len() >= 16 {
            self.steps.sort_unstable();
            let step = self.steps[self.steps.len() / 2];
            self.step_ms = Some(step);
            self.steps = Vec::new();
            let n = (self.period_ms as f64 / step as f64).round() as usize;
            // Only meaningful with a handful of samples per period; bounded memory.
            if (4..=20_000).contains(&n) {
                self.vals = vec![0.0; n * self.depth];
                self.lens = vec![0; n];
                self.heads = vec![0; n];
            }
        }
    }

    /// Residual of `x` against its slot's median (None without history), then records `x`.
    fn update(&mut self, ts: i64, x: f64) -> Option<f64> {
        let step = self.step_ms?;
        if self.lens.is_empty() {
            return None;
        }
        let phase = ts.rem_euclid(self.period_ms) as f64 / step as f64;
        let k = phase.round() as usize % self.lens.len();
        let d = self.depth;
        let slot = &mut self.vals[k * d..(k + 1) * d];
        let len = usize::from(self.lens[k]);
        let r = (len > 0).then(|| x - median_of(&slot[..len]));
        if len < d {
            slot[len] = x;
            self.lens[k] += 1;
        } else {
            let h = usize::from(self.heads[k]);
            slot[h] = x;
            self.heads[k] = ((h + 1) % d) as u8;
        }
        r
    }
}

/// Median of a few values (the mean of the middle two for an even count), without
/// allocating: a copy sorted on the stack for up to 16 values.
fn median_of(v: &[f64]) -> f64 {
    let mut buf = [0.0f64; 16];
    let mut heap;
    let s: &mut [f64] = if v.len() <= buf.len() {
        buf[..v.len()].copy_from_slice(v);
        &mut buf[..v.len()]
    } else {
        heap = v.to_vec();
        &mut heap
    };
    s.sort_unstable_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Running mean over a fixed-length window.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunningMean {
    ring: Ring,
    sum: f64,
}

impl RunningMean {
    fn new(n: usize) -> Self {
        Self {
            ring: Ring::new(n),
            sum: 0.0,
        }
    }

    fn push(&mut self, v: f64) {
        self.sum += v;
        if let Some(old) = self.ring.push(v) {
            self.sum -= old;
        }
    }

    fn mean(&self) -> f64 {
        self.sum / self.ring.len().max(1) as f64
    }
}

/// Probability that a value of the history's distribution is `>= x`: empirical up to the
/// history's upper [`TAIL_FRACTION`] quantile `u`; above it, an exponential tail fitted to the
/// excesses over `u` (peaks over threshold), but never below the empirical frequency.
/// The reference for [`SortedWindow::tail_probability`], used as is for non-finite windows.
fn tail_probability(hist: &[f64], x: f64, scratch: &mut Vec<f64>) -> f64 {
    let n = hist.len();
    let k = ((n as f64 * TAIL_FRACTION).ceil() as usize).clamp(1, n);
    let above = hist.iter().filter(|&&h| h >= x).count();
    let empirical = (above as f64 + 1.0) / (n as f64 + 1.0);
    scratch.clear();
    scratch.extend_from_slice(hist);
    let (_, &mut u, upper) = scratch.select_nth_unstable_by(n - k, f64::total_cmp);
    if x <= u {
        return empirical;
    }
    let mean_excess = (upper.iter().map(|&h| h - u).sum::<f64>() / k as f64).max(MIN_TAIL_SCALE);
    let fitted = (k as f64 / (n as f64 + 1.0)) * (-(x - u) / mean_excess).exp();
    if above > 0 {
        fitted.max(empirical)
    } else {
        fitted
    }
}

/// Streaming detector for one series. Its state serializes (Serde), so a
/// detector can move between processes and go on as if it had not moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Detector {
    cfg: DetectorConfig,
    seen: usize,
    last_ts: Option<i64>,
    last_x: Option<f64>,
    magnitude: f64,
    level: RobustZ,
    change: RobustZ,
    season: Seasonal,
    season_z: RobustZ,
    short: RunningMean,
    history: SortedWindow,
    history_avg: SortedWindow,
    quiet: usize,
    #[serde(skip)]
    scratch: Vec<f64>,
}

impl Detector {
    /// Creates a detector with the given configuration.
    pub fn new(cfg: DetectorConfig) -> Self {
        let w = cfg.window.max(8);
        Self {
            seen: 0,
            last_ts: None,
            last_x: None,
            magnitude: 0.0,
            level: RobustZ::new(w),
            change: RobustZ::new(w),
            season: Seasonal::new(cfg.season_ms, cfg.season_depth),
            season_z: RobustZ::new(w),
            short: RunningMean::new(cfg.short_window),
            history: SortedWindow::new(cfg.long_window.max(16)),
            history_avg: SortedWindow::new(cfg.long_window.max(16)),
            quiet: 0,
            scratch: Vec::with_capacity(cfg.long_window.max(w)),
            cfg,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// `|z|` of `x` under the predictor with the smallest residual scale (None while no
    /// predictor has enough history).
    fn surprise(&mut self, ts: i64, x: f64) -> Option<f64> {
        if let Some(prev) = self.last_ts {
            self.season.observe_step(ts - prev);
        }
        // Resolution floor for scales: a millionth of the series' typical magnitude.
        self.magnitude += (x.abs() - self.magnitude) / (self.seen.min(999) + 1) as f64;
        let floor = 1e-6 * self.magnitude + 1e-12;
        let residuals = [
            Some(x),
            self.last_x.map(|prev| x - prev),
            self.season.update(ts, x),
        ];
        let predictors = [&mut self.level, &mut self.change, &mut self.season_z];
        let scratch = &mut self.scratch;
        // The predictor with the smallest scale wins (the first on ties).
        let mut best: Option<(f64, f64)> = None;
        for (r, predictor) in residuals.into_iter().zip(predictors) {
            let Some(r) = r else { continue };
            if let Some((z, scale)) = predictor.update(r, floor, scratch)
                && z.is_finite()
                && best.is_none_or(|(_, s)| scale < s)
            {
                best = Some((z, scale));
            }
        }
        best.map(|(z, _)| z.abs())
    }

    /// `2 min(q_point, q_avg)` capped at 1, where each `q` is the [`tail_probability`] of a
    /// channel (Bonferroni).
    fn tail_q(&mut self, raw: f64, avg: f64) -> f64 {
        let q_point = self.history.tail_probability(raw, &mut self.scratch);
        let q_avg = self.history_avg.tail_probability(avg, &mut self.scratch);
        (2.0 * q_point.min(q_avg)).min(1.0)
    }

    /// Whether `x` lies beyond the level window's range by more than the spatial tolerance.
    fn beyond_range(&self, x: f64) -> bool {
        let tol = self.cfg.spatial_tolerance;
        let s = &self.level.hist.sorted;
        if tol <= 0.0 || s.len() < self.level.min_len {
            return false;
        }
        let (lo, hi) = (f64::from(s[0]), f64::from(s[s.len() - 1]));
        let margin = tol * (hi - lo);
        margin > 0.0 && (x > hi + margin || x < lo - margin)
    }

    /// Processes one sample (timestamps must not decrease) and returns its score.
    /// Non-finite values are ignored (score 0, not flagged).
    pub fn update(&mut self, ts_ms: i64, value: f64) -> Point {
        if !value.is_finite() {
            return Point::QUIET;
        }
        let beyond = self.beyond_range(value);
        let z = self.surprise(ts_ms, value);
        self.last_ts = Some(ts_ms);
        self.last_x = Some(value);
        self.seen += 1;
        let Some(z) = z else {
            return Point::QUIET;
        };
        let raw = (1.0 + z).ln();
        self.short.push(raw);
        let avg = self.short.mean();
        let ready = self.seen > self.cfg.warmup && self.history.len() >= 16;
        let q = if ready { self.tail_q(raw, avg) } else { 1.0 };
        // Samples of an event already alerted on are not evidence of what is normal.
        if self.quiet == 0 {
            self.history.push(raw);
            self.history_avg.push(avg);
        }
        if !ready {
            return Point::QUIET;
        }
        let mut score = (1.0 - q.powf(1.0 / SCORE_EXPONENT)).clamp(0.0, 1.0);
        if beyond {
            score = score.max(SPATIAL_SCORE);
        }
        let mut flagged = false;
        if self.quiet > 0 {
            self.quiet -= 1;
            score *= SUPPRESSED_FACTOR;
        } else if score >= self.cfg.threshold {
            flagged = true;
            self.quiet = self.cfg.suppress;
        }
        Point { score, flagged }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn noise(i: usize) -> f64 {
        // Deterministic pseudo-random noise in [-0.5, 0.5).
        let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        x ^= x >> 29;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 32;
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    #[test]
    fn tail_probability_is_empirical_then_fitted() {
        let hist: Vec<f64> = (0..1000).map(|i| i as f64 / 1000.0).collect();
        let mut s = Vec::new();
        let p = tail_probability(&hist, 0.5, &mut s);
        assert!((p - 501.0 / 1001.0).abs() < 1e-12);
        let inside = tail_probability(&hist, 0.99, &mut s);
        let beyond = tail_probability(&hist, 3.0, &mut s);
        assert!(inside >= 10.0 / 1001.0, "{inside}");
        assert!(beyond < 1e-6 && beyond > 0.0, "{beyond}");
    }

    #[test]
    fn scores_are_bounded_and_spike_is_flagged() {
        let mut d = Detector::new(DetectorConfig::default());
        let mut flagged = Vec::new();
        for i in 0..3000 {
            let x = 10.0 + noise(i) + if i == 2000 { 15.0 } else { 0.0 };
            let p = d.update(i as i64 * MIN, x);
            assert!((0.0..=1.0).contains(&p.score));
            if p.flagged {
                flagged.push(i);
            }
        }
        assert!(flagged.contains(&2000), "{flagged:?}");
        assert!(flagged.len() <= 8, "{flagged:?}");
    }

    #[test]
    fn daily_pattern_is_not_flagged_but_break_is() {
        let mut d = Detector::new(DetectorConfig::default());
        let step = 5 * MIN;
        let mut flags = Vec::new();
        for i in 0..(288 * 10) {
            let t = i as i64 * step;
            let phase = (t % 86_400_000) as f64 / 86_400_000.0 * std::f64::consts::TAU;
            let mut x = 50.0 + 20.0 * phase.sin() + 0.5 * noise(i);
            if (288 * 8 + 100..288 * 8 + 140).contains(&i) {
                x = 50.0; // the pattern flattens
            }
            if d.update(t, x).flagged {
                flags.push(i);
            }
        }
        let false_alarms = flags.iter().filter(|&&i| i < 288 * 8).count();
        assert!(false_alarms <= 4, "{flags:?}");
        assert!(
            flags
                .iter()
                .any(|&i| (288 * 8 + 100..288 * 8 + 160).contains(&i)),
            "{flags:?}"
        );
    }

    #[test]
    fn warmup_and_constant_series_are_quiet() {
        let mut d = Detector::new(DetectorConfig::default());
        for i in 0..2000 {
            let p = d.update(i * MIN, 3.0);
            assert!(!p.flagged);
            if i < 150 {
                assert_eq!(p.score, 0.0);
            }
        }
        assert!(!d.update(2000 * MIN, f64::NAN).flagged);
    }

    #[test]
    fn level_shift_is_flagged_once() {
        let mut d = Detector::new(DetectorConfig::default());
        let mut flags = Vec::new();
        for i in 0..3000 {
            let x = noise(i) + if i >= 2000 { 8.0 } else { 0.0 };
            if d.update(i as i64 * MIN, x).flagged {
                flags.push(i);
            }
        }
        let at_shift: Vec<_> = flags
            .iter()
            .filter(|&&i| (2000..2100).contains(&i))
            .collect();
        assert_eq!(at_shift.len(), 1, "{flags:?}");
        assert!(*at_shift[0] < 2005, "{flags:?}");
    }

    /// Windows of noisy, quantised, tied and signed-zero values.
    fn sample_windows() -> Vec<Vec<f64>> {
        let mut out = Vec::new();
        for (w, n) in [(8, 0), (9, 1), (64, 2), (400, 3), (401, 4), (2000, 5)] {
            out.push((0..w).map(|i| noise(i + 7919 * n)).collect());
            out.push((0..w).map(|i| (noise(i + n) * 6.0).round()).collect());
            out.push((0..w).map(|i| (noise(i + n) * 3.0).round() * 0.1).collect());
            out.push(
                (0..w)
                    .map(|i| if i % 3 == 0 { -0.0 } else { 0.0 })
                    .collect(),
            );
            out.push((0..w).map(|i| if i % 5 == 0 { 1e6 } else { 2.5 }).collect());
        }
        out
    }

    fn sorted_copy(w: &[f64]) -> SortedWindow {
        let mut r = SortedWindow::new(w.len());
        for &v in w {
            r.push(v);
        }
        r
    }

    #[test]
    fn sorted_window_follows_its_ring() {
        let mut r = SortedWindow::new(50);
        for i in 0..2000 {
            let v = if i % 7 == 0 {
                -0.0
            } else {
                (noise(i) * 10.0).round()
            };
            r.push(v);
            let mut expect = r.ring.buf.clone();
            expect.sort_by(f32::total_cmp);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&r.sorted), bits(&expect), "step {i}");
        }
    }

    /// Equal up to a few ulp of the sums' order (the order statistics exactly).
    fn close(a: f64, b: f64) -> bool {
        a == b || (a - b).abs() <= 1e-12 * a.abs().max(b.abs())
    }

    #[test]
    fn sorted_stats_match_selection() {
        let mut s = Vec::new();
        for w in sample_windows() {
            let r = sorted_copy(&w);
            // The reference sees the values the window holds.
            let w = r.values();
            let med = f64::from(r.sorted[w.len() / 2]);
            let mut dev: Vec<f64> = w.iter().map(|&v| (v - med).abs()).collect();
            dev.sort_by(f64::total_cmp);
            let mad = median_abs_deviation(&r.sorted, med);
            assert_eq!(mad.to_bits(), dev[w.len() / 2].to_bits());
            for floor in [1e-12, 0.3] {
                let (m0, s0) = robust_stats(&w, floor, &mut s);
                let (m1, s1) = r.robust_stats(floor, &mut s);
                assert_eq!(m0.to_bits(), m1.to_bits());
                assert!(close(s0, s1), "{s0} {s1}");
            }
            for x in [-1.0, 0.0, 0.3, 0.49, 0.5, 1.0, 3.0, 1e6, 2e6] {
                let want = tail_probability(&w, x, &mut s);
                let got = r.tail_probability(x, &mut s);
                assert!(close(want, got), "{x}: {want} {got}");
            }
        }
    }

    #[test]
    fn a_surprise_window_matches_the_reference_on_its_f32_values() {
        let mut h = SortedWindow::new(300);
        let mut s = Vec::new();
        for i in 0..2000 {
            h.push((1.0 + (noise(i) * 4.0).abs()).ln());
            let mut expect = h.ring.buf.clone();
            expect.sort_by(f32::total_cmp);
            assert_eq!(h.sorted, expect, "step {i}");
            if i % 97 == 0 {
                let vals: Vec<f64> = h.ring.buf.iter().map(|&v| f64::from(v)).collect();
                for x in [0.0, 0.2, 0.7, 1.2, 1.6, 3.0, 9.0] {
                    let want = tail_probability(&vals, x, &mut s);
                    let got = h.tail_probability(x, &mut s);
                    assert!(close(want, got), "{x}: {want} {got}");
                }
            }
        }
        // It round-trips through its serialized ring.
        let mut bytes = Vec::new();
        ciborium::into_writer(&h, &mut bytes).unwrap();
        let back: SortedWindow = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(back.sorted, h.sorted);
    }

    #[test]
    fn the_spatial_rule_scores_a_new_extreme() {
        // A noisy series between 90 and 110, then 125: beyond the range by 75% of it, yet
        // within a few typical jumps of the noise.
        let run = |tol: f64| {
            let mut d = Detector::new(DetectorConfig {
                spatial_tolerance: tol,
                warmup: 50,
                ..DetectorConfig::default()
            });
            for i in 0..600 {
                d.update(i as i64 * MIN, 100.0 + 20.0 * noise(i));
            }
            let beyond = d.update(600 * MIN, 125.0).score;
            let inside = d.update(601 * MIN, 105.0).score;
            (beyond, inside)
        };
        let (on, inside) = run(0.1);
        assert!(on >= SPATIAL_SCORE, "{on}");
        assert!(inside < SPATIAL_SCORE, "{inside}");
        let (off, _) = run(0.0);
        assert!(off < on, "{off} vs {on}");
        // Not beyond the range by the tolerance: no floor.
        let (wide, _) = run(2.0);
        assert_eq!(wide.to_bits(), off.to_bits());
    }

    #[test]
    fn the_deviation_bound_bounds_the_sum() {
        let w: Vec<f64> = (0..401).map(|i| (noise(i) * 100.0).round() * 0.5).collect();
        let r = sorted_copy(&w);
        let med = f64::from(r.sorted[200]);
        assert!(abs_deviation_bound(&r.sorted, med) >= abs_deviation_sum(&r.sorted, med));
    }
}
