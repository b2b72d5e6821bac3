//! Online anomaly detector for one univariate time series.
//!
//! Consumes `(timestamp_ms, value)` samples of one series, in time order, at a regular-ish
//! interval (one call to [`Detector::update`] per sample; no look-ahead). Produces for each
//! sample a [`Point`] with an anomaly score in `[0, 1]` and a `flagged` decision
//! (`score >= threshold`, with repeated flags suppressed for a while after a detection).
//! Memory per series is bounded by the configuration (a few sliding windows plus at most
//! `season_depth` values per time-of-day slot); no I/O, std only.
//!
//! Method: several robust predictors are run side by side, each giving a residual that is
//! turned into a robust z-score against that predictor's own recent residuals (sliding
//! median / MAD):
//! * level: the value against the recent window;
//! * change: the first difference against recent differences (abrupt jumps, spikes);
//! * season: the value minus the median of the same time-of-day slot on previous days
//!   (timestamp modulo `season_ms`), which absorbs daily patterns and slow trends.
//!
//! The per-sample surprise is the largest of these z-scores (compressed by `ln(1 + z)`).
//! As in Numenta's "anomaly likelihood", this raw surprise is then judged against its own
//! history: the average over a short recent window is compared with the mean and standard
//! deviation of the raw surprise over a long window, and the Gaussian tail probability `q`
//! of that average gives the score `min(1, -log10(q) / 10)` (so 0.5 ⇔ `q = 1e-5`). During
//! warm-up the score is 0; after a flag, scores are damped for `suppress` samples.
#![allow(dead_code)] // helpers kept for the detector variants under evaluation

/// Detector parameters. Window lengths are in samples.
#[derive(Debug, Clone, PartialEq)]
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
    /// Samples in the short average of the raw surprise.
    pub short_window: usize,
    /// Samples in the long history of the raw surprise.
    pub long_window: usize,
    /// Samples after a flag during which scores are damped and no new flag is raised.
    pub suppress: usize,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            threshold: 0.5,
            window: 288,
            warmup: 150,
            season_ms: 86_400_000,
            season_depth: 3,
            short_window: 1,
            long_window: 2000,
            suppress: 150,
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

/// Fixed-capacity ring buffer of `f64`.
#[derive(Debug, Clone)]
struct Ring {
    buf: Vec<f64>,
    cap: usize,
    head: usize,
}

impl Ring {
    fn new(cap: usize) -> Self {
        Self {
            buf: Vec::with_capacity(cap.max(1)),
            cap: cap.max(1),
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

    /// Most recent value.
    fn last(&self) -> Option<f64> {
        if self.buf.is_empty() {
            None
        } else if self.buf.len() < self.cap {
            self.buf.last().copied()
        } else {
            Some(self.buf[(self.head + self.cap - 1) % self.cap])
        }
    }
}

/// Median and robust scale (1.4826 MAD, floored by the mean absolute deviation) of `vals`.
/// `scratch` is reused to avoid allocation.
fn robust_stats(vals: &[f64], floor: f64, scratch: &mut Vec<f64>) -> (f64, f64) {
    scratch.clear();
    scratch.extend_from_slice(vals);
    let n = scratch.len();
    let mid = n / 2;
    let (_, &mut med, _) = scratch.select_nth_unstable_by(mid, f64::total_cmp);
    let mut mean_ad = 0.0;
    for v in scratch.iter_mut() {
        *v = (*v - med).abs();
        mean_ad += *v;
    }
    mean_ad /= n as f64;
    let (_, &mut mad, _) = scratch.select_nth_unstable_by(mid, f64::total_cmp);
    (med, (1.4826 * mad).max(0.5 * 1.2533 * mean_ad).max(floor))
}

/// Robust z-score of a residual against the recent residuals of one predictor.
#[derive(Debug, Clone)]
struct RobustZ {
    hist: Ring,
    min_len: usize,
}

impl RobustZ {
    fn new(window: usize) -> Self {
        Self {
            hist: Ring::new(window),
            min_len: (window / 4).clamp(8, 64),
        }
    }

    /// `(|z|, scale)` of `r` against past residuals (None while too few), then records `r`.
    fn update(&mut self, r: f64, floor: f64, scratch: &mut Vec<f64>) -> Option<(f64, f64)> {
        let z = (self.hist.len() >= self.min_len).then(|| {
            let (med, scale) = robust_stats(&self.hist.buf, floor, scratch);
            ((r - med) / scale, scale)
        });
        self.hist.push(r);
        z
    }
}

/// Same-time-of-day memory: the last `depth` values of each slot of the period.
#[derive(Debug, Clone)]
struct Seasonal {
    period_ms: i64,
    depth: usize,
    step_ms: Option<i64>,
    steps: Vec<i64>,
    slots: Vec<Ring>,
    surprises: Vec<Ring>,
}

impl Seasonal {
    fn new(period_ms: i64, depth: usize) -> Self {
        Self {
            period_ms,
            depth: depth.max(1),
            step_ms: None,
            steps: Vec::new(),
            slots: Vec::new(),
            surprises: Vec::new(),
        }
    }

    /// Learns the sampling step from the first intervals, then sets up the slots.
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
            // Only meaningful with a handful of samples per period, bounded memory.
            if (4..=20_000).contains(&n) {
                self.slots = vec![Ring::new(self.depth); n];
                self.surprises = vec![Ring::new(self.depth); n];
            }
        }
    }

    fn slot(&self, ts: i64) -> Option<usize> {
        let step = self.step_ms?;
        if self.slots.is_empty() {
            return None;
        }
        let phase = ts.rem_euclid(self.period_ms) as f64 / step as f64;
        Some(phase.round() as usize % self.slots.len())
    }

    /// Surprise typically seen around this time of day: for each stored period, the largest
    /// surprise within `jitter` slots of `ts`; the median over periods (0 without history).
    fn typical_surprise(&self, ts: i64, jitter_ms: i64) -> f64 {
        let (Some(slot), Some(step)) = (self.slot(ts), self.step_ms) else {
            return 0.0;
        };
        let n = self.surprises.len();
        let j = ((jitter_ms as f64 / step as f64).round() as usize).min(n / 2);
        let mut per_period: Vec<f64> = Vec::with_capacity(self.depth);
        for d in 0..self.depth {
            let mut m: Option<f64> = None;
            for k in 0..=2 * j {
                if let Some(&v) = self.surprises[(slot + n + k - j) % n].buf.get(d) {
                    m = Some(m.map_or(v, |m: f64| m.max(v)));
                }
            }
            per_period.extend(m);
        }
        if per_period.is_empty() {
            return 0.0;
        }
        per_period.sort_unstable_by(f64::total_cmp);
        per_period[per_period.len() / 2]
    }

    /// Records the surprise seen at `ts`.
    fn record_surprise(&mut self, ts: i64, raw: f64) {
        if let Some(slot) = self.slot(ts) {
            self.surprises[slot].push(raw);
        }
    }

    /// Residual of `x` against the slot's median (None without history), then records `x`.
    fn update(&mut self, ts: i64, x: f64) -> Option<f64> {
        let slot = self.slot(ts)?;
        let n = self.slots.len();
        let j = dev("SJ", 0.0) as usize;
        let r = if j == 0 {
            let ring = &self.slots[slot];
            (ring.len() > 0).then(|| {
                let mut v = ring.buf.clone();
                v.sort_unstable_by(f64::total_cmp);
                let n = v.len();
                let med = if n % 2 == 1 {
                    v[n / 2]
                } else {
                    0.5 * (v[n / 2 - 1] + v[n / 2])
                };
                x - med
            })
        } else {
            let mut best: Option<f64> = None;
            for k in 0..=2 * j {
                let ring = &self.slots[(slot + n + k - j) % n];
                for &v in &ring.buf {
                    let r = x - v;
                    if best.is_none_or(|b| r.abs() < b.abs()) {
                        best = Some(r);
                    }
                }
            }
            best
        };
        self.slots[slot].push(x);
        r
    }
}

/// Running mean and variance over a fixed-length window.
#[derive(Debug, Clone)]
struct WindowMoments {
    ring: Ring,
    sum: f64,
    sum_sq: f64,
}

impl WindowMoments {
    fn new(n: usize) -> Self {
        Self {
            ring: Ring::new(n),
            sum: 0.0,
            sum_sq: 0.0,
        }
    }

    fn push(&mut self, v: f64) {
        self.sum += v;
        self.sum_sq += v * v;
        if let Some(old) = self.ring.push(v) {
            self.sum -= old;
            self.sum_sq -= old * old;
        }
    }

    fn len(&self) -> usize {
        self.ring.len()
    }

    fn mean(&self) -> f64 {
        self.sum / self.len().max(1) as f64
    }

    fn std(&self) -> f64 {
        let n = self.len().max(1) as f64;
        (self.sum_sq / n - self.mean().powi(2)).max(0.0).sqrt()
    }
}

/// Gaussian upper tail `Q(z) = P(Z > z)`, accurate in the far tail (erfc approximation,
/// Numerical Recipes' Chebyshev fit, relative error < 1.2e-7).
fn gaussian_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * x.abs());
    let poly = -x * x - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    let erfc = if x >= 0.0 { erfc } else { 2.0 - erfc };
    0.5 * erfc
}

/// Probability that a value of the history's distribution is `>= x`: empirical below the
/// history's upper `TAIL_FRACTION` quantile `u`, above it an exponential tail fitted to the
/// excesses over `u` (peaks over threshold, as in extreme value theory).
fn tail_probability(hist: &[f64], x: f64, scratch: &mut Vec<f64>) -> f64 {
    let n = hist.len();
    let k = ((n as f64 * dev("TAILF", TAIL_FRACTION)).ceil() as usize).clamp(1, n);
    let above = hist.iter().filter(|&&h| h >= x).count();
    let empirical = (above as f64 + 1.0) / (n as f64 + 1.0);
    scratch.clear();
    scratch.extend_from_slice(hist);
    let (_, &mut u, upper) = scratch.select_nth_unstable_by(n - k, f64::total_cmp);
    if x <= u {
        return empirical;
    }
    // Generalised Pareto tail fitted to the excesses by the method of moments.
    let m =
        (upper.iter().map(|&h| h - u).sum::<f64>() / k as f64).max(dev("MINTS", MIN_TAIL_SCALE));
    let v = upper.iter().map(|&h| (h - u - m).powi(2)).sum::<f64>() / k as f64;
    let fitted = if dev("GPD", 0.0) > 0.0 && v > 0.0 {
        let xi = (0.5 * (1.0 - m * m / v)).clamp(-0.5, dev("XIMAX", 0.5));
        let sigma = 0.5 * m * (m * m / v + 1.0);
        let t = 1.0 + xi * (x - u) / sigma;
        if xi.abs() < 1e-6 {
            (k as f64 / (n as f64 + 1.0)) * (-(x - u) / m).exp()
        } else if t <= 0.0 {
            0.0
        } else {
            (k as f64 / (n as f64 + 1.0)) * t.powf(-1.0 / xi)
        }
    } else {
        (k as f64 / (n as f64 + 1.0)) * (-(x - u) / m).exp()
    };
    // The fitted tail never claims more rarity than what was actually seen.
    if above > 0 && dev("PURE", 0.0) == 0.0 {
        fitted.max(empirical)
    } else {
        fitted
    }
}

fn dev(k: &str, d: f64) -> f64 {
    std::env::var(format!("DEV_{k}"))
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Fraction of the surprise history treated as its tail.
const TAIL_FRACTION: f64 = 0.05;
/// Smallest scale of the fitted tail, in units of `ln(1 + z)`.
const MIN_TAIL_SCALE: f64 = 0.1;

/// Streaming detector for one series.
#[derive(Debug, Clone)]
pub struct Detector {
    cfg: DetectorConfig,
    seen: usize,
    last_ts: Option<i64>,
    last_x: Option<f64>,
    values: Ring,
    level: RobustZ,
    change: RobustZ,
    season: Seasonal,
    season_z: RobustZ,
    short: WindowMoments,
    short2: WindowMoments,
    long_avg2: Ring,
    long: Ring,
    long_avg: Ring,
    quiet: usize,
    magnitude: f64,
    ewma: Option<f64>,
    ewma_z: RobustZ,
    scratch: Vec<f64>,
    scratch2: Vec<f64>,
}

impl Detector {
    /// Creates a detector with the given configuration.
    pub fn new(cfg: DetectorConfig) -> Self {
        let w = cfg.window.max(8);
        Self {
            seen: 0,
            last_ts: None,
            last_x: None,
            values: Ring::new(w),
            level: RobustZ::new(w),
            change: RobustZ::new(w),
            season: Seasonal::new(cfg.season_ms, cfg.season_depth),
            season_z: RobustZ::new(w),
            short: WindowMoments::new(cfg.short_window.max(1)),
            short2: WindowMoments::new(dev("SHORT2", 1.0) as usize),
            long_avg2: Ring::new(cfg.long_window.max(2)),
            long: Ring::new(cfg.long_window.max(2)),
            long_avg: Ring::new(cfg.long_window.max(2)),
            quiet: 0,
            magnitude: 0.0,
            ewma: None,
            ewma_z: RobustZ::new(w),
            scratch: Vec::with_capacity(w),
            scratch2: Vec::new(),
            cfg,
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &DetectorConfig {
        &self.cfg
    }

    /// Raw surprise of `x`: the largest robust z-score of the predictors, log-compressed.
    fn surprise(&mut self, ts: i64, x: f64) -> Option<f64> {
        if let Some(prev) = self.last_ts {
            self.season.observe_step(ts - prev);
        }
        // The predictor with the smallest residual scale is the best model of the series;
        // its (signed) z-score is the surprise.
        let mut best: Option<(f64, f64)> = None;
        let mut take = |z: Option<(f64, f64)>| {
            if let Some((z, scale)) = z.filter(|(z, _)| z.is_finite())
                && best.is_none_or(|(_, s)| scale < s)
            {
                best = Some((z, scale));
            }
        };
        // Resolution floor for scales: a millionth of the series' typical magnitude.
        self.magnitude += (x.abs() - self.magnitude) / (self.seen.min(999) + 1) as f64;
        let floor = 1e-6 * self.magnitude + 1e-12;
        take(self.level.update(x, floor, &mut self.scratch));
        if let Some(prev) = self.last_x {
            take(self.change.update(x - prev, floor, &mut self.scratch));
        }
        if dev("EWMA", 0.0) > 0.0 {
            let a = dev("EWMA", 0.0);
            if let Some(e) = self.ewma {
                take(self.ewma_z.update(x - e, floor, &mut self.scratch));
                self.ewma = Some(e + a * (x - e));
            } else {
                self.ewma = Some(x);
            }
        }
        if let Some(r) = self.season.update(ts, x) {
            take(self.season_z.update(r, floor, &mut self.scratch));
        }
        self.values.push(x);
        best.map(|(z, _)| z)
    }

    /// Processes one sample (timestamps must not decrease) and returns its score.
    pub fn update(&mut self, ts_ms: i64, value: f64) -> Point {
        if !value.is_finite() {
            return Point {
                score: 0.0,
                flagged: false,
            };
        }
        let z = self.surprise(ts_ms, value);
        self.last_ts = Some(ts_ms);
        self.last_x = Some(value);
        self.seen += 1;
        let Some(z) = z else {
            return Point {
                score: 0.0,
                flagged: false,
            };
        };
        let raw0 = (1.0 + z.abs()).ln();
        let jit = dev("JIT", 0.0);
        let raw = if jit > 0.0 {
            let typical = self.season.typical_surprise(ts_ms, (jit * 60_000.0) as i64);
            self.season.record_surprise(ts_ms, raw0);
            (raw0 - dev("JITW", 1.0) * typical).max(0.0)
        } else {
            raw0
        };
        self.short
            .push(if dev("SIGNED", 1.0) > 0.0 { z } else { raw });
        self.short2.push(raw);
        let ready = self.seen > self.cfg.warmup && self.long.len() >= 16;
        let avg = if dev("SIGNED", 1.0) > 0.0 {
            (1.0 + self.short.mean().abs()).ln()
        } else {
            self.short.mean()
        };
        let q = if ready {
            // Point channel and sustained (short-average) channel, Bonferroni-combined.
            let q_point = tail_probability(&self.long.buf, raw, &mut self.scratch2);
            let q_avg = if self.cfg.short_window > 1 {
                tail_probability(&self.long_avg.buf, avg, &mut self.scratch2)
            } else {
                1.0
            };
            if dev("SHORT2", 1.0) > 1.0 {
                let q2 =
                    tail_probability(&self.long_avg2.buf, self.short2.mean(), &mut self.scratch2);
                (3.0 * q_point.min(q_avg).min(q2)).min(1.0)
            } else {
                (2.0 * q_point.min(q_avg)).min(1.0)
            }
        } else {
            1.0
        };
        self.long.push(raw);
        self.long_avg.push(avg);
        self.long_avg2.push(self.short2.mean());
        if !ready {
            return Point {
                score: 0.0,
                flagged: false,
            };
        }
        let mut score = (-q.max(1e-300).log10() / 10.0).clamp(0.0, 1.0);
        let mut flagged = false;
        if self.quiet > 0 {
            self.quiet -= 1;
            score *= dev("QF", 0.25);
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
    fn gaussian_tail_values() {
        assert!((gaussian_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((gaussian_tail(1.96) - 0.025).abs() < 1e-4);
        assert!((gaussian_tail(5.0) / 2.866_515_7e-7 - 1.0).abs() < 1e-5);
        assert!((gaussian_tail(-1.0) - 0.841_344_7).abs() < 1e-6);
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
        assert!(flagged.len() <= 3, "{flagged:?}");
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
                x = 50.0; // pattern flattens
            }
            if d.update(t, x).flagged {
                flags.push(i);
            }
        }
        let false_alarms = flags.iter().filter(|&&i| i < 288 * 8).count();
        assert!(false_alarms <= 2, "{flags:?}");
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
    }
}
