//! Deterministic synthetic event stream. Consumes a seed and [`GenParams`];
//! produces JSON event lines in the pipeline's contract, identical for the same
//! seed and parameters. Realistic skew: Zipf-like users and items, five
//! services, a planted low-rank taste model (users prefer a few of `k` item
//! genres, ratings follow user·item affinity) so recommendation quality is
//! measurable, injectable incidents (an error-rate surge on one service and a
//! traffic spike on another), ~2% of events out of order by up to a few
//! seconds, and optional invalid and late records. Pure code.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, LogNormal, Zipf};

pub const SERVICES: [&str; 5] = ["catalog", "search", "cart", "checkout", "reco"];

#[derive(Debug, Clone)]
pub struct GenParams {
    pub events: u64,
    pub seed: u64,
    /// Event time of the first event, epoch ms.
    pub start_ms: i64,
    /// Baseline events per second of event time.
    pub rate_per_sec: f64,
    pub users: u64,
    pub items: u64,
    /// Latent genres of the taste model.
    pub genres: u64,
    /// Plant the two incidents.
    pub incidents: bool,
    /// Fraction of events displaced back in time by up to `disorder_ms`.
    pub disorder_fraction: f64,
    pub disorder_ms: i64,
    /// Fraction of events that arrive late (behind the watermark, within allowed lateness).
    pub late_fraction: f64,
    pub late_ms: (i64, i64),
    /// Fraction of invalid records.
    pub invalid_fraction: f64,
    /// Plant a gradual drift on `reco` from this fraction of the stream's
    /// event-time span: over `drift_ramp_ms` its latency doubles, its share
    /// of ratings grows from 5% to 25% and its client errors from ~1% to ~7%.
    pub drift_at: Option<f64>,
    pub drift_ramp_ms: i64,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            events: 100_000,
            seed: 7,
            start_ms: 1_795_305_600_000, // 2026-11-22T00:00:00Z
            rate_per_sec: 200.0,
            users: 100_000,
            items: 20_000,
            genres: 8,
            incidents: true,
            disorder_fraction: 0.02,
            disorder_ms: 3_000,
            late_fraction: 0.001,
            late_ms: (10_000, 40_000),
            invalid_fraction: 0.001,
            drift_at: None,
            drift_ramp_ms: 2 * 3_600_000,
        }
    }
}

/// A planted gradual drift: from `start_ms` it grows linearly to its full
/// size at `start_ms + ramp_ms` and stays.
#[derive(Debug, Clone, PartialEq)]
pub struct PlantedDrift {
    pub service: &'static str,
    pub start_ms: i64,
    pub ramp_ms: i64,
}

impl PlantedDrift {
    /// How far the drift has gone at `t`: 0 before it, 1 once ramped.
    pub fn progress(&self, t: i64) -> f64 {
        if t < self.start_ms {
            0.0
        } else {
            ((t - self.start_ms) as f64 / self.ramp_ms.max(1) as f64).min(1.0)
        }
    }
}

/// A planted incident: `[start_ms, end_ms)` on `service`.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub kind: &'static str,
    pub service: &'static str,
    pub start_ms: i64,
    pub end_ms: i64,
}

pub struct Generator {
    p: GenParams,
    rng: StdRng,
    user_zipf: Zipf<f64>,
    item_zipf: Zipf<f64>,
    latency: [LogNormal<f64>; 5],
    n: u64,
    t_ms: f64,
    pub incidents: Vec<Incident>,
    pub drift: Option<PlantedDrift>,
}

/// A user's favourite genres, derived from the user id (no per-user state).
pub fn user_genres(user: u64, genres: u64) -> (u64, u64) {
    let h = crate::sketch::mix64(user ^ 0xA5A5_5A5A);
    (h % genres, (h >> 32) % genres)
}

/// An item's genre: items are numbered `rank * genres + genre + 1`.
pub fn item_genre(item: u64, genres: u64) -> u64 {
    item.saturating_sub(1) % genres.max(1)
}

impl Generator {
    pub fn new(p: GenParams) -> Self {
        let rng = StdRng::seed_from_u64(p.seed);
        // Zipf parameters within range by construction (n >= 1, s > 0).
        let user_zipf = Zipf::new(p.users.max(1) as f64, 1.05).expect("valid zipf");
        let item_zipf =
            Zipf::new((p.items / p.genres.max(1)).max(1) as f64, 1.1).expect("valid zipf");
        let ln = |mu: f64, s: f64| LogNormal::new(mu, s).expect("valid lognormal");
        let latency = [
            ln(3.3, 0.5),
            ln(3.8, 0.6),
            ln(3.0, 0.4),
            ln(4.3, 0.5),
            ln(3.6, 0.5),
        ];
        let span_ms = p.events as f64 / p.rate_per_sec * 1000.0;
        let incidents = if p.incidents {
            let at = |f: f64| p.start_ms + (span_ms * f) as i64 / 60_000 * 60_000;
            vec![
                Incident {
                    kind: "error_surge",
                    service: "checkout",
                    start_ms: at(0.45),
                    end_ms: at(0.45) + 5 * 60_000,
                },
                Incident {
                    kind: "traffic_spike",
                    service: "search",
                    start_ms: at(0.75),
                    end_ms: at(0.75) + 4 * 60_000,
                },
            ]
        } else {
            Vec::new()
        };
        let drift = p.drift_at.map(|f| PlantedDrift {
            service: "reco",
            start_ms: p.start_ms + (span_ms * f.clamp(0.0, 1.0)) as i64 / 60_000 * 60_000,
            ramp_ms: p.drift_ramp_ms,
        });
        Generator {
            drift,
            t_ms: p.start_ms as f64,
            p,
            rng,
            user_zipf,
            item_zipf,
            latency,
            n: 0,
            incidents,
        }
    }

    fn in_incident(&self, kind: &str, t: i64) -> Option<&Incident> {
        self.incidents
            .iter()
            .find(|i| i.kind == kind && t >= i.start_ms && t < i.end_ms)
    }

    /// Appends the next event line (without newline) to `out`; `None` at the end.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Option<()> {
        use std::io::Write;
        if self.n >= self.p.events {
            return None;
        }
        self.n += 1;
        let event_id = self.n;
        let mut t = self.t_ms as i64;
        // Advance event time; during a traffic spike the search service gets 3x traffic.
        let spike = self.in_incident("traffic_spike", t).is_some();
        let step = 1000.0 / self.p.rate_per_sec;
        let service_idx: usize;
        if spike && self.rng.random::<f64>() < 0.5 {
            service_idx = 1;
            self.t_ms += step * 0.5;
        } else {
            service_idx = self.pick_service();
            self.t_ms += step * if spike { 0.5 } else { 1.0 };
        }
        let service = SERVICES[service_idx];

        // Invalid records: a mix of malformed shapes, each a real-world failure.
        if self.rng.random::<f64>() < self.p.invalid_fraction {
            let kind = self.rng.random_range(0..5);
            let _ = match kind {
                0 => write!(out, "{{\"event_id\": {event_id}, \"ts\": \"not-a-time\""),
                1 => write!(
                    out,
                    "{{\"event_id\":{event_id},\"ts\":{t},\"user_id\":1,\"item_id\":1,\"event_type\":\"view\",\"service\":\"{service}\",\"status\":999,\"latency_ms\":5}}"
                ),
                2 => write!(
                    out,
                    "{{\"event_id\":{event_id},\"ts\":{t},\"user_id\":1,\"item_id\":1,\"event_type\":\"view\",\"service\":\"{service}\",\"status\":200,\"latency_ms\":-3}}"
                ),
                3 => write!(
                    out,
                    "{{\"event_id\":{event_id},\"ts\":{t},\"item_id\":1,\"event_type\":\"view\",\"service\":\"{service}\",\"status\":200,\"latency_ms\":5}}"
                ),
                _ => write!(
                    out,
                    "{{\"event_id\":{event_id},\"ts\":{t},\"user_id\":1,\"item_id\":1,\"event_type\":\"view\",\"rating\":4,\"service\":\"{service}\",\"status\":200,\"latency_ms\":5}}"
                ),
            };
            return Some(());
        }

        // Disorder and lateness displace the event time backwards.
        let r: f64 = self.rng.random();
        if r < self.p.late_fraction {
            t -= self.rng.random_range(self.p.late_ms.0..=self.p.late_ms.1);
        } else if r < self.p.late_fraction + self.p.disorder_fraction {
            t -= self.rng.random_range(0..=self.p.disorder_ms);
        }

        let user = self.user_zipf.sample(&mut self.rng) as u64;
        let (g1, g2) = user_genres(user, self.p.genres);
        let per_genre = (self.p.items / self.p.genres.max(1)).max(1);
        let roll: f64 = self.rng.random();
        let genre = if roll < 0.6 {
            g1
        } else if roll < 0.85 {
            g2
        } else {
            self.rng.random_range(0..self.p.genres)
        };
        // Items of a genre: id = rank * genres + genre, so Zipf rank maps into the genre.
        let rank = self.item_zipf.sample(&mut self.rng) as u64 - 1;
        let item = (rank.min(per_genre - 1)) * self.p.genres + genre + 1;

        let drift = self
            .drift
            .as_ref()
            .filter(|d| d.service == service)
            .map_or(0.0, |d| d.progress(t));
        let event_type = match service {
            "cart" => "cart",
            "checkout" => "purchase",
            _ => {
                if self.rng.random::<f64>() < 0.05 + 0.2 * drift {
                    "rating"
                } else {
                    "view"
                }
            }
        };
        let mut status = 200u16;
        let e: f64 = self.rng.random();
        let surge = service == "checkout" && self.in_incident("error_surge", t).is_some();
        if surge && e < 0.35 {
            status = 503;
        } else if e < 0.004 {
            status = 500;
        } else if e < 0.015 + 0.06 * drift {
            status = 404;
        }
        let mut latency = self.latency[service_idx].sample(&mut self.rng) * (1.0 + drift);
        if status >= 500 {
            latency *= 3.0;
        }
        let latency = (latency * 10.0).round() / 10.0;
        let price = 5.0 + (item % 200) as f64 * 0.5;
        let session = user * 7 + t as u64 / 1_800_000;
        let _ = write!(
            out,
            "{{\"event_id\":{event_id},\"ts\":\"{}\",\"user_id\":{user},\"item_id\":{item},\"event_type\":\"{event_type}\",",
            crate::timefmt::fmt_ts(t)
        );
        if event_type == "rating" {
            let liked = genre == g1 || genre == g2;
            let base = if liked { 4.2 } else { 2.4 };
            let noise: f64 = self.rng.random_range(-0.9..0.9);
            let rating = (base + noise + ((user % 5) as f64 - 2.0) * 0.15)
                .round()
                .clamp(1.0, 5.0);
            let _ = write!(out, "\"rating\":{rating},\"price\":null,");
        } else {
            let _ = write!(out, "\"rating\":null,\"price\":{price:.2},");
        }
        let _ = write!(
            out,
            "\"session_id\":\"s-{session}\",\"service\":\"{service}\",\"endpoint\":\"/{service}/{item}\",\"status\":{status},\"latency_ms\":{latency}}}"
        );
        Some(())
    }

    fn pick_service(&mut self) -> usize {
        // catalog 35%, search 25%, cart 15%, checkout 10%, reco 15%
        let r: f64 = self.rng.random();
        match r {
            x if x < 0.35 => 0,
            x if x < 0.60 => 1,
            x if x < 0.75 => 2,
            x if x < 0.85 => 3,
            _ => 4,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ValidationConfig;
    use crate::decode::Decoder;
    use crate::model::{Position, RawChunk};

    fn lines(p: GenParams) -> Vec<Vec<u8>> {
        let mut g = Generator::new(p);
        let mut v = Vec::new();
        loop {
            let mut buf = Vec::new();
            if g.next_into(&mut buf).is_none() {
                return v;
            }
            v.push(buf);
        }
    }

    #[test]
    fn deterministic_by_seed_and_mostly_valid() {
        let p = GenParams {
            events: 5000,
            invalid_fraction: 0.01,
            ..Default::default()
        };
        let a = lines(p.clone());
        assert_eq!(a, lines(p.clone()));
        assert_ne!(a, lines(GenParams { seed: 8, ..p }));
        let mut c = RawChunk::new("gen".into());
        for (i, l) in a.iter().enumerate() {
            c.push(
                l,
                Position {
                    partition: 0,
                    offset: i as i64,
                },
            );
        }
        let out = Decoder::new(ValidationConfig::default()).decode(&c, 0);
        let bad = out.dead_letters.num_rows();
        assert!(bad > 20 && bad < 90, "{bad} invalid of 5000");
        assert_eq!(out.events.num_rows() + bad, 5000);
    }

    #[test]
    fn a_planted_drift_changes_only_its_service_after_its_start() {
        let base = GenParams {
            events: 40_000,
            rate_per_sec: 40_000.0 / 14_400.0,
            invalid_fraction: 0.0,
            drift_ramp_ms: 3_600_000,
            ..Default::default()
        };
        let drifting = GenParams {
            drift_at: Some(0.5),
            ..base.clone()
        };
        let d = Generator::new(drifting.clone()).drift.unwrap();
        assert_eq!(d.start_ms, base.start_ms + 2 * 3_600_000);
        let (a, b) = (lines(base), lines(drifting));
        assert_eq!(a.len(), b.len());
        let parse = |l: &Vec<u8>| serde_json::from_slice::<serde_json::Value>(l).unwrap();
        // (service is reco, after the ramp) -> latencies
        let mut lat: std::collections::BTreeMap<(bool, bool), Vec<f64>> = Default::default();
        let mut same_before = 0;
        for (x, y) in a.iter().zip(&b) {
            let (x, y) = (parse(x), parse(y));
            let t = chrono::DateTime::parse_from_rfc3339(y["ts"].as_str().unwrap())
                .unwrap()
                .timestamp_millis();
            // The stream is unchanged up to the drift (later, the extra
            // ratings draw extra random numbers: the streams part ways).
            if t < d.start_ms - 10_000 {
                assert_eq!(x, y);
                same_before += 1;
            }
            let (before, after) = (t < d.start_ms, t >= d.start_ms + d.ramp_ms);
            if before || after {
                lat.entry((y["service"] == "reco", after))
                    .or_default()
                    .push(y["latency_ms"].as_f64().unwrap());
            }
        }
        assert!(same_before > 15_000, "{same_before}");
        let mut median = |k: (bool, bool)| {
            let v = lat.get_mut(&k).unwrap();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        let reco = median((true, true)) / median((true, false));
        assert!((1.8..2.2).contains(&reco), "reco latency ×{reco}");
        let rest = median((false, true)) / median((false, false));
        assert!(
            (0.9..1.1).contains(&rest),
            "other services' latency ×{rest}"
        );
    }

    #[test]
    fn users_and_items_are_skewed() {
        let ls = lines(GenParams {
            events: 20_000,
            ..Default::default()
        });
        let mut users = std::collections::HashMap::<u64, u32>::new();
        for l in &ls {
            let v: serde_json::Value = serde_json::from_slice(l).unwrap_or_default();
            if let Some(u) = v.get("user_id").and_then(|x| x.as_u64()) {
                *users.entry(u).or_default() += 1;
            }
        }
        let top = users.values().max().copied().unwrap_or(0);
        assert!(top > 200, "Zipf head user has {top} events");
    }
}
