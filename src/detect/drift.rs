//! Distribution drift per service and hour. Consumes each scored window's
//! per-service [`DriftSketch`] (latency histogram in fixed log buckets, event
//! type counts, status class counts), in window order; produces, when an hour
//! closes, one [`DriftRow`] per (service, feature) comparing the hour's
//! distribution with a reference (the same hour of the previous day, or the
//! pooled hours before it) by the population stability index (PSI) and the
//! two-sample Kolmogorov–Smirnov statistic, and a [`DriftOnset`] when a
//! (service, feature) crosses a threshold (the tracker raises it as an alert). The whole state serializes with the
//! detectors, so it fails over with them. Pure code.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use datafusion::arrow::array::{
    BooleanArray, Float64Array, StringArray, TimestampMillisecondArray, UInt64Array,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

use serde::{Deserialize, Serialize};

pub use crate::model::{DriftSketch, LATENCY_BUCKETS, latency_bucket};

/// The event types counted, in this order.
pub const EVENT_TYPES: [&str; 4] = ["view", "cart", "purchase", "rating"];

/// The status classes counted, in this order (1xx–3xx are `ok`).
pub const STATUS_CLASSES: [&str; 3] = ["ok", "4xx", "5xx"];

/// The features compared, as named in the `drift` table.
pub const FEATURES: [&str; 3] = ["latency", "event_type", "status_class"];

const HOUR_MS: i64 = 3_600_000;

/// Population stability index of `cur` against `refc` over the same bins:
/// Σ (c − r)·ln(c / r) over the bins' shares, each share smoothed by half a
/// count so an empty bin stays finite. 0 for identical shares; 0.1 is
/// commonly read as a moderate shift, 0.25 as a large one.
pub fn psi(refc: &[u64], cur: &[u64]) -> f64 {
    let k = refc.len().max(cur.len());
    let get = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0) as f64;
    let (rt, ct) = (
        refc.iter().sum::<u64>() as f64 + 0.5 * k as f64,
        cur.iter().sum::<u64>() as f64 + 0.5 * k as f64,
    );
    (0..k)
        .map(|i| {
            let r = (get(refc, i) + 0.5) / rt;
            let c = (get(cur, i) + 0.5) / ct;
            (c - r) * (c / r).ln()
        })
        .sum()
}

/// PSI over about ten bins of equal reference mass, formed by merging
/// adjacent fine bins (the usual decile binning: fine histogram buckets
/// would make PSI grow with their number, not with the shift).
pub fn psi_quantile_bins(refc: &[u64], cur: &[u64], bins: usize) -> f64 {
    let total: u64 = refc.iter().sum();
    if total == 0 {
        return psi(refc, cur);
    }
    let step = total as f64 / bins.max(1) as f64;
    let (mut r, mut c) = (Vec::new(), Vec::new());
    let (mut ra, mut ca, mut seen) = (0u64, 0u64, 0u64);
    let mut next = step;
    for i in 0..refc.len().max(cur.len()) {
        let (x, y) = (
            refc.get(i).copied().unwrap_or(0),
            cur.get(i).copied().unwrap_or(0),
        );
        ra += x;
        ca += y;
        seen += x;
        if seen as f64 >= next {
            r.push(ra);
            c.push(ca);
            (ra, ca) = (0, 0);
            while next <= seen as f64 {
                next += step;
            }
        }
    }
    if ra > 0 || ca > 0 {
        r.push(ra);
        c.push(ca);
    }
    psi(&r, &c)
}

/// The two-sample Kolmogorov–Smirnov statistic over ordered bins: the
/// largest gap between the two cumulative shares (0 when either is empty).
pub fn ks(a: &[u64], b: &[u64]) -> f64 {
    let (ta, tb) = (a.iter().sum::<u64>() as f64, b.iter().sum::<u64>() as f64);
    if ta == 0.0 || tb == 0.0 {
        return 0.0;
    }
    let (mut ca, mut cb, mut d) = (0.0f64, 0.0f64, 0.0f64);
    for i in 0..a.len().max(b.len()) {
        ca += a.get(i).copied().unwrap_or(0) as f64 / ta;
        cb += b.get(i).copied().unwrap_or(0) as f64 / tb;
        d = d.max((ca - cb).abs());
    }
    d
}

/// What an hour is compared with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reference {
    /// The pooled distributions of up to this many hours before it.
    Rolling(u32),
    /// The same hour of the previous day.
    PreviousDay,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftConfig {
    pub reference: Reference,
    /// A (service, feature) drifts at or above this PSI...
    pub psi_threshold: f64,
    /// ...or this KS statistic.
    pub ks_threshold: f64,
    /// Hours (current and reference) with fewer requests are not compared.
    pub min_requests: u64,
}

impl Default for DriftConfig {
    fn default() -> Self {
        DriftConfig {
            reference: Reference::Rolling(24),
            psi_threshold: 0.2,
            ks_threshold: 0.15,
            min_requests: 500,
        }
    }
}

/// One (service, hour, feature) comparison: a `drift` table row.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftRow {
    pub hour_start_ms: i64,
    pub service: String,
    pub feature: &'static str,
    pub psi: f64,
    pub ks: f64,
    pub requests: u64,
    pub reference_requests: u64,
    pub drifted: bool,
}

/// A (service, feature) that started drifting with the hour just closed.
#[derive(Debug, Clone, PartialEq)]
pub struct DriftOnset {
    pub hour_start_ms: i64,
    pub service: String,
    pub feature: &'static str,
    pub psi: f64,
}

/// Hourly distributions of every service and the comparisons of closed hours.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DriftMonitor {
    /// The hour being accumulated.
    hour: Option<i64>,
    current: BTreeMap<String, DriftSketch>,
    /// Closed hours per service, oldest first (up to a day and one hour).
    history: BTreeMap<String, VecDeque<(i64, DriftSketch)>>,
    /// (service, feature) pairs drifting as of the last closed hour.
    drifting: BTreeSet<(String, String)>,
}

impl DriftMonitor {
    /// Adds one scored window's sketches; when the window opens a new hour,
    /// first closes the previous one and returns its comparisons and the
    /// drift alerts they raise.
    pub fn observe<'a>(
        &mut self,
        cfg: &DriftConfig,
        window_start_ms: i64,
        sketches: impl IntoIterator<Item = (&'a str, &'a DriftSketch)>,
    ) -> (Vec<DriftRow>, Vec<DriftOnset>) {
        let hour = window_start_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let closed = match self.hour {
            Some(h) if hour > h => self.close(cfg),
            Some(h) if hour < h => return (Vec::new(), Vec::new()),
            _ => (Vec::new(), Vec::new()),
        };
        self.hour = Some(hour);
        for (svc, s) in sketches {
            self.current.entry(svc.to_string()).or_default().add(s);
        }
        closed
    }

    /// Closes the hour being accumulated (at the end of the input).
    pub fn finish(&mut self, cfg: &DriftConfig) -> (Vec<DriftRow>, Vec<DriftOnset>) {
        let r = self.close(cfg);
        self.hour = None;
        r
    }

    /// (service, feature) pairs drifting as of the last closed hour.
    pub fn drifting(&self) -> impl Iterator<Item = (&str, &str)> {
        self.drifting.iter().map(|(s, f)| (s.as_str(), f.as_str()))
    }

    fn reference(&self, cfg: &DriftConfig, svc: &str, hour: i64) -> Option<DriftSketch> {
        let hist = self.history.get(svc)?;
        match cfg.reference {
            Reference::PreviousDay => hist
                .iter()
                .find(|(h, _)| *h == hour - 24 * HOUR_MS)
                .map(|(_, s)| s.clone()),
            Reference::Rolling(n) => {
                let from = hour - i64::from(n.max(1)) * HOUR_MS;
                let mut acc: Option<DriftSketch> = None;
                for (_, s) in hist.iter().filter(|(h, _)| *h >= from && *h < hour) {
                    acc.get_or_insert_with(DriftSketch::default).add(s);
                }
                acc
            }
        }
    }

    fn close(&mut self, cfg: &DriftConfig) -> (Vec<DriftRow>, Vec<DriftOnset>) {
        let (mut rows, mut alerts) = (Vec::new(), Vec::new());
        let Some(hour) = self.hour else {
            return (rows, alerts);
        };
        let current = std::mem::take(&mut self.current);
        for (svc, cur) in &current {
            let Some(refs) = self.reference(cfg, svc, hour) else {
                continue;
            };
            let (n, m) = (cur.requests(), refs.requests());
            if n < cfg.min_requests || m < cfg.min_requests {
                continue;
            }
            for (f, name) in FEATURES.iter().enumerate() {
                let (r, c) = (refs.feature(f), cur.feature(f));
                let psi = if f == 0 {
                    psi_quantile_bins(r, c, 10)
                } else {
                    psi(r, c)
                };
                let ks = ks(r, c);
                let drifted = psi >= cfg.psi_threshold || ks >= cfg.ks_threshold;
                let key = (svc.clone(), name.to_string());
                let was = self.drifting.contains(&key);
                if drifted && !was {
                    alerts.push(DriftOnset {
                        hour_start_ms: hour,
                        service: svc.clone(),
                        feature: name,
                        psi,
                    });
                    self.drifting.insert(key);
                } else if !drifted && was {
                    self.drifting.remove(&key);
                }
                rows.push(DriftRow {
                    hour_start_ms: hour,
                    service: svc.clone(),
                    feature: name,
                    psi,
                    ks,
                    requests: n,
                    reference_requests: m,
                    drifted,
                });
            }
        }
        // Keep what a reference can still use: a day and an hour.
        let keep_from = hour - 25 * HOUR_MS;
        for (svc, cur) in current {
            let h = self.history.entry(svc).or_default();
            h.push_back((hour, cur));
            while h.front().is_some_and(|(t, _)| *t < keep_from) {
                h.pop_front();
            }
        }
        self.history.retain(|_, h| !h.is_empty());
        (rows, alerts)
    }
}

/// The `drift` batch of comparisons.
pub fn drift_batch(rows: &[DriftRow]) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(
        crate::model::drift_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    rows.iter().map(|r| r.hour_start_ms).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.service.as_str()).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.feature).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.psi).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.ks).collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from(
                rows.iter().map(|r| r.requests).collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from(
                rows.iter()
                    .map(|r| r.reference_requests)
                    .collect::<Vec<_>>(),
            )),
            Arc::new(BooleanArray::from(
                rows.iter().map(|r| r.drifted).collect::<Vec<_>>(),
            )),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, LogNormal};

    /// One hour of a service: log-normal latencies around `median_ms`,
    /// `rating_share` of the events ratings (the rest views), `e404` of
    /// them client errors.
    fn hour(rng: &mut StdRng, n: u64, median_ms: f64, rating_share: f64, e404: f64) -> DriftSketch {
        let ln = LogNormal::new(median_ms.ln(), 0.5).unwrap();
        let mut s = DriftSketch::default();
        let (mut ratings, mut c4) = (0i64, 0i64);
        for _ in 0..n {
            s.add_latency(ln.sample(rng), 1);
            if rng.random::<f64>() < rating_share {
                ratings += 1;
            }
            if rng.random::<f64>() < e404 {
                c4 += 1;
            }
        }
        s.event_types = [n - ratings as u64, 0, 0, ratings as u64];
        s.add_status(n as i64, 0, c4);
        s
    }

    fn run(
        m: &mut DriftMonitor,
        cfg: &DriftConfig,
        hours: impl IntoIterator<Item = DriftSketch>,
    ) -> (Vec<DriftRow>, Vec<DriftOnset>) {
        let (mut rows, mut alerts) = (Vec::new(), Vec::new());
        for (i, s) in hours.into_iter().enumerate() {
            // One window per hour is enough for the monitor.
            let (r, a) = m.observe(cfg, i as i64 * HOUR_MS, [("svc", &s)]);
            rows.extend(r);
            alerts.extend(a);
        }
        let (r, a) = m.finish(cfg);
        rows.extend(r);
        alerts.extend(a);
        (rows, alerts)
    }

    #[test]
    fn statistics_of_identical_and_shifted_distributions() {
        let a = [10, 20, 30, 40];
        assert!(psi(&a, &a).abs() < 1e-12);
        assert_eq!(ks(&a, &a), 0.0);
        let b = [40, 30, 20, 10];
        assert!(psi(&a, &b) > 0.5, "{}", psi(&a, &b));
        assert!((ks(&a, &b) - 0.4).abs() < 1e-9, "{}", ks(&a, &b));
        // Disjoint supports: KS is 1 and PSI finite.
        assert!((ks(&[5, 0], &[0, 5]) - 1.0).abs() < 1e-12);
        assert!(psi(&[5, 0], &[0, 5]).is_finite());
        assert_eq!(latency_bucket(0.2), 0);
        assert_eq!(latency_bucket(1.0), 1);
        assert_eq!(latency_bucket(2.0), 5);
        assert_eq!(latency_bucket(1e9), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn a_stable_stream_is_not_flagged() {
        let mut rng = StdRng::seed_from_u64(3);
        let cfg = DriftConfig::default();
        let mut m = DriftMonitor::default();
        let (rows, alerts) = run(
            &mut m,
            &cfg,
            (0..30).map(|_| hour(&mut rng, 3_000, 40.0, 0.05, 0.01)),
        );
        assert!(rows.len() >= 29 * 3, "{} rows", rows.len());
        assert!(alerts.is_empty(), "{alerts:?}");
        let worst = rows.iter().map(|r| r.psi).fold(0.0, f64::max);
        assert!(worst < 0.05, "worst PSI {worst}");
    }

    #[test]
    fn a_gradual_shift_is_flagged_per_feature_and_recovers() {
        let mut rng = StdRng::seed_from_u64(4);
        let cfg = DriftConfig::default();
        let mut m = DriftMonitor::default();
        // Ten stable hours, then latency climbs 20% an hour for five hours.
        let mut hours: Vec<DriftSketch> = (0..10)
            .map(|_| hour(&mut rng, 3_000, 40.0, 0.05, 0.01))
            .collect();
        for k in 1..=5 {
            hours.push(hour(
                &mut rng,
                3_000,
                40.0 * (1.0 + 0.2 * k as f64),
                0.05,
                0.01,
            ));
        }
        let (rows, alerts) = run(&mut m, &cfg, hours);
        let first = rows
            .iter()
            .find(|r| r.drifted)
            .expect("the latency shift is flagged");
        assert_eq!(first.feature, "latency");
        assert!(
            first.hour_start_ms >= 10 * HOUR_MS && first.hour_start_ms <= 12 * HOUR_MS,
            "flagged at hour {}",
            first.hour_start_ms / HOUR_MS
        );
        assert!(rows.iter().all(|r| !r.drifted || r.feature == "latency"));
        assert_eq!(
            alerts.len(),
            1,
            "one alert per drift, not per hour: {alerts:?}"
        );
        assert_eq!(alerts[0].feature, "latency");
        assert_eq!(alerts[0].hour_start_ms, first.hour_start_ms);
        assert!(m.drifting().any(|(s, f)| s == "svc" && f == "latency"));

        // The event mix and the client errors drift too.
        let mut m = DriftMonitor::default();
        let mut hours: Vec<DriftSketch> = (0..6)
            .map(|_| hour(&mut rng, 3_000, 40.0, 0.05, 0.01))
            .collect();
        for _ in 0..3 {
            hours.push(hour(&mut rng, 3_000, 40.0, 0.25, 0.15));
        }
        let (rows, _) = run(&mut m, &cfg, hours);
        let flagged: BTreeSet<&str> = rows
            .iter()
            .filter(|r| r.drifted)
            .map(|r| r.feature)
            .collect();
        assert_eq!(flagged, BTreeSet::from(["event_type", "status_class"]));
    }

    #[test]
    fn previous_day_reference_and_thin_hours() {
        let mut rng = StdRng::seed_from_u64(5);
        let cfg = DriftConfig {
            reference: Reference::PreviousDay,
            ..DriftConfig::default()
        };
        let mut m = DriftMonitor::default();
        // A daily pattern: latency doubles from 12:00 to 18:00 every day.
        // Against the previous day it is no drift; the first day has no
        // reference at all.
        let day = |rng: &mut StdRng| -> Vec<DriftSketch> {
            (0..24)
                .map(|h| {
                    let med = if (12..18).contains(&h) { 80.0 } else { 40.0 };
                    hour(rng, 2_000, med, 0.05, 0.01)
                })
                .collect()
        };
        let mut hours = day(&mut rng);
        hours.extend(day(&mut rng));
        let (rows, alerts) = run(&mut m, &cfg, hours);
        assert_eq!(rows.len(), 24 * 3, "only the second day is compared");
        assert!(alerts.is_empty(), "{alerts:?}");
        // Thin hours are not compared.
        let mut m = DriftMonitor::default();
        let (rows, _) = run(
            &mut m,
            &DriftConfig::default(),
            (0..5).map(|_| hour(&mut rng, 100, 40.0, 0.05, 0.01)),
        );
        assert!(rows.is_empty());
    }

    #[test]
    fn state_round_trips() {
        let mut rng = StdRng::seed_from_u64(6);
        let cfg = DriftConfig::default();
        let mut m = DriftMonitor::default();
        for i in 0..4 {
            let s = hour(&mut rng, 1_000, 40.0, 0.05, 0.01);
            m.observe(&cfg, i * HOUR_MS, [("svc", &s)]);
        }
        let mut bytes = Vec::new();
        ciborium::into_writer(&m, &mut bytes).unwrap();
        let mut back: DriftMonitor = ciborium::from_reader(bytes.as_slice()).unwrap();
        let s = hour(&mut rng, 1_000, 40.0, 0.05, 0.01);
        let a = m.observe(&cfg, 5 * HOUR_MS, [("svc", &s)]);
        let b = back.observe(&cfg, 5 * HOUR_MS, [("svc", &s)]);
        assert_eq!(a.0, b.0);
        assert_eq!(a.0.len(), 3);
    }
}
