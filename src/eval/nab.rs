//! NAB (Numenta Anomaly Benchmark) scorer.
//!
//! Consumes a labelled corpus (per file: row timestamps, labelled anomaly windows as
//! `[start, end]` timestamp pairs) together with one anomaly score in `[0, 1]` per row
//! produced by a detector, and a cost profile (`tpWeight`, `fpWeight`, `fnWeight`).
//! Produces NAB's result for that profile: the single corpus-wide threshold that maximises
//! the raw score, the raw score, the null (never-firing) and perfect baselines, and the
//! normalised score `100 * (raw - null) / (perfect - null)`.
//!
//! The rules follow NAB's published method (`nab/sweeper.py`): the first 15% of each file
//! (at most 750 rows) is a probation period and is not scored; in each window only the
//! earliest detection counts, weighted by a scaled sigmoid of its position relative to the
//! window end (`+tpWeight` at the window start, `0` at its end); every detection outside the
//! windows costs `fpWeight` times a scaled sigmoid of its distance past the preceding window
//! (the full `fpWeight` when there is no preceding window); every window without a detection
//! costs `fnWeight`. The loader for NAB's file layout ([`load_corpus`], [`load_profiles`]) is
//! the only part touching the file system.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::Path;

/// Weights of one NAB application profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Profile {
    /// Reward for a detection at the very start of a window.
    pub tp_weight: f64,
    /// Cost of a detection far from any window.
    pub fp_weight: f64,
    /// Cost of a window without detection.
    pub fn_weight: f64,
}

impl Profile {
    /// NAB's `standard` profile.
    pub const STANDARD: Profile = Profile {
        tp_weight: 1.0,
        fp_weight: 0.11,
        fn_weight: 1.0,
    };
    /// NAB's `reward_low_FP_rate` profile.
    pub const LOW_FP: Profile = Profile {
        tp_weight: 1.0,
        fp_weight: 0.22,
        fn_weight: 1.0,
    };
    /// NAB's `reward_low_FN_rate` profile.
    pub const LOW_FN: Profile = Profile {
        tp_weight: 1.0,
        fp_weight: 0.11,
        fn_weight: 2.0,
    };
}

/// One labelled data file: timestamps (ms since the Unix epoch), values, windows.
#[derive(Debug, Clone, Default)]
pub struct DataFile {
    /// Relative path, e.g. `realAdExchange/exchange-2_cpc_results.csv`.
    pub name: String,
    /// Row timestamps in milliseconds, ascending.
    pub timestamps: Vec<i64>,
    /// Row values.
    pub values: Vec<f64>,
    /// Anomaly windows as inclusive `(start_ms, end_ms)` pairs, ascending.
    pub windows: Vec<(i64, i64)>,
}

/// NAB's scaled sigmoid: `2 / (1 + exp(5x)) - 1`, and `-1` for `x >= 3`.
///
/// `x = -1` is a window's start (≈ 0.9866), `x = 0` its end (0), `x > 0` past its end.
pub fn scaled_sigmoid(x: f64) -> f64 {
    if x >= 3.0 {
        -1.0
    } else {
        2.0 / (1.0 + (5.0 * x).exp()) - 1.0
    }
}

/// Number of leading rows that are not scored: `min(floor(0.15 n), 750)`.
pub fn probation_len(rows: usize) -> usize {
    ((0.15 * rows as f64).floor() as usize).min(750)
}

/// A scorable row: its detector score, its weighted sweep score if it were a detection,
/// and the corpus-wide id of the window it lies in (if any).
#[derive(Debug, Clone, Copy)]
struct SweepPoint {
    score: f64,
    weight: f64,
    window: Option<usize>,
}

/// Row index range `[first, last]` of a window (rows with `start <= ts <= end`).
fn window_rows(timestamps: &[i64], (start, end): (i64, i64)) -> Option<(usize, usize)> {
    let first = timestamps.partition_point(|&t| t < start);
    let after = timestamps.partition_point(|&t| t <= end);
    (after > first).then(|| (first, after - 1))
}

/// Result of scoring a corpus for one profile.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProfileResult {
    /// Chosen threshold: a row is a detection when its score is `>= threshold`
    /// (`f64::INFINITY` when no detection at all is best).
    pub threshold: f64,
    /// Raw score (sum over files) at that threshold.
    pub raw: f64,
    /// Raw score of a detector that never fires.
    pub null: f64,
    /// Raw score of a perfect detector (`tpWeight` per window).
    pub perfect: f64,
    /// `100 * (raw - null) / (perfect - null)`.
    pub normalised: f64,
    /// Windows detected at the chosen threshold.
    pub detected_windows: usize,
    /// Detections outside windows at the chosen threshold.
    pub false_positives: usize,
}

/// Accumulates scored files and computes NAB results.
#[derive(Debug, Default)]
pub struct Scorer {
    // Per scorable row: its geometry and score; weights depend on the profile, so they
    // are computed on demand.
    rows: Vec<(RowGeom, f64)>,
    windows_total: usize,
    windows_scorable: usize,
}

#[derive(Debug, Clone, Copy)]
enum RowGeom {
    /// Inside a window: relative position `-(right - i + 1) / width`.
    InWindow { window: usize, position: f64 },
    /// Outside windows: relative distance past the previous window (3.0 if none).
    Outside { position: f64 },
}

impl Scorer {
    /// Creates an empty scorer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one file's rows, windows and detector scores (one per row).
    pub fn add_file(&mut self, timestamps: &[i64], windows: &[(i64, i64)], scores: &[f64]) {
        assert_eq!(timestamps.len(), scores.len(), "one score per row");
        let n = timestamps.len();
        let probation = probation_len(n);
        let spans: Vec<(usize, usize, usize)> = windows
            .iter()
            .enumerate()
            .filter_map(|(k, &w)| window_rows(timestamps, w).map(|(l, r)| (k, l, r)))
            .collect();
        self.windows_total += windows.len();
        let base = self.windows_total - windows.len();
        let mut prev: Option<(usize, f64)> = None; // (right index, width)
        let mut next_span = 0;
        let mut seen = vec![false; windows.len()];
        for (i, &score) in scores.iter().enumerate() {
            while next_span < spans.len() && spans[next_span].2 < i {
                let (_, l, r) = spans[next_span];
                prev = Some((r, (r - l + 1) as f64));
                next_span += 1;
            }
            let geom = match spans.get(next_span) {
                Some(&(k, l, r)) if l <= i => {
                    let width = (r - l + 1) as f64;
                    RowGeom::InWindow {
                        window: base + k,
                        position: -((r - i + 1) as f64) / width,
                    }
                }
                _ => RowGeom::Outside {
                    position: match prev {
                        Some((r, width)) if width > 1.0 => (i - r) as f64 / (width - 1.0),
                        _ => 3.0,
                    },
                },
            };
            if i < probation {
                continue;
            }
            if let RowGeom::InWindow { window, .. } = geom
                && !seen[window - base]
            {
                seen[window - base] = true;
                self.windows_scorable += 1;
            }
            self.rows.push((geom, score));
        }
    }

    fn points(&self, profile: &Profile) -> Vec<SweepPoint> {
        let max_tp = scaled_sigmoid(-1.0);
        self.rows
            .iter()
            .map(|&(geom, score)| match geom {
                RowGeom::InWindow { window, position } => SweepPoint {
                    score,
                    weight: scaled_sigmoid(position) * profile.tp_weight / max_tp,
                    window: Some(window),
                },
                RowGeom::Outside { position } => SweepPoint {
                    score,
                    weight: scaled_sigmoid(position) * profile.fp_weight,
                    window: None,
                },
            })
            .collect()
    }

    /// Raw score of a detector that never fires.
    pub fn null_score(&self, profile: &Profile) -> f64 {
        -profile.fn_weight * self.windows_scorable as f64
    }

    /// Raw score of a perfect detector.
    pub fn perfect_score(&self, profile: &Profile) -> f64 {
        profile.tp_weight * self.windows_total as f64
    }

    fn result(
        &self,
        profile: &Profile,
        threshold: f64,
        raw: f64,
        tp: usize,
        fp: usize,
    ) -> ProfileResult {
        let null = self.null_score(profile);
        let perfect = self.perfect_score(profile);
        let normalised = if perfect > null {
            100.0 * (raw - null) / (perfect - null)
        } else {
            100.0
        };
        ProfileResult {
            threshold,
            raw,
            null,
            perfect,
            normalised,
            detected_windows: tp,
            false_positives: fp,
        }
    }

    /// Scores the corpus with a fixed threshold (detection: `score >= threshold`).
    pub fn score_at(&self, profile: &Profile, threshold: f64) -> ProfileResult {
        let mut best_in_window: BTreeMap<usize, f64> = BTreeMap::new();
        let mut fp_sum = 0.0;
        let mut fp = 0;
        for p in self.points(profile) {
            if p.score < threshold {
                continue;
            }
            match p.window {
                Some(w) => {
                    let e = best_in_window.entry(w).or_insert(f64::NEG_INFINITY);
                    *e = e.max(p.weight);
                }
                None => {
                    fp_sum += p.weight;
                    fp += 1;
                }
            }
        }
        let tp = best_in_window.len();
        let raw = self.null_score(profile)
            + best_in_window
                .values()
                .map(|&w| w.max(-profile.fn_weight) + profile.fn_weight)
                .sum::<f64>()
            + fp_sum;
        self.result(profile, threshold, raw, tp, fp)
    }

    /// Sweeps all thresholds and returns the one maximising the raw score (ties: the
    /// highest threshold), as NAB's optimiser does for a whole corpus.
    pub fn best(&self, profile: &Profile) -> ProfileResult {
        let mut pts = self.points(profile);
        pts.sort_by(|a, b| b.score.total_cmp(&a.score));
        let mut window_best: BTreeMap<usize, f64> = BTreeMap::new();
        let mut raw = self.null_score(profile);
        let (mut tp, mut fp) = (0usize, 0usize);
        let mut best = self.result(profile, f64::INFINITY, raw, 0, 0);
        let mut i = 0;
        while i < pts.len() {
            let t = pts[i].score;
            while i < pts.len() && pts[i].score == t {
                let p = pts[i];
                match p.window {
                    Some(w) => {
                        let cur = window_best.entry(w).or_insert_with(|| {
                            tp += 1;
                            -profile.fn_weight
                        });
                        if p.weight > *cur {
                            raw += p.weight - *cur;
                            *cur = p.weight;
                        }
                    }
                    None => {
                        raw += p.weight;
                        fp += 1;
                    }
                }
                i += 1;
            }
            if raw > best.raw {
                best = self.result(profile, t, raw, tp, fp);
            }
        }
        best
    }
}

/// Parses `YYYY-MM-DD HH:MM:SS[.ffffff]` (UTC) into milliseconds since the Unix epoch.
pub fn parse_timestamp(s: &str) -> Option<i64> {
    let s = s.trim();
    let (date, time) = s.split_once([' ', 'T'])?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next().unwrap_or(Some(0))?);
    let ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        digits.parse::<i64>().ok()?
    };
    let days = crate::timefmt::days_from_civil(y, m, day);
    Some(((days * 24 + hh) * 60 + mm) * 60_000 + ss * 1000 + ms)
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads a `timestamp,value` CSV file (with a header row).
pub fn load_csv(path: &Path) -> io::Result<(Vec<i64>, Vec<f64>)> {
    let text = fs::read_to_string(path)?;
    let mut ts = Vec::new();
    let mut vs = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let (t, v) = line
            .split_once(',')
            .ok_or_else(|| bad(format!("{}: bad row {line:?}", path.display())))?;
        ts.push(parse_timestamp(t).ok_or_else(|| bad(format!("bad timestamp {t:?}")))?);
        vs.push(
            v.trim()
                .parse::<f64>()
                .map_err(|e| bad(format!("bad value {v:?}: {e}")))?,
        );
    }
    Ok((ts, vs))
}

/// Loads every file listed in `<dir>/combined_windows.json` with its windows, sorted by name.
pub fn load_corpus(dir: &Path) -> io::Result<Vec<DataFile>> {
    let text = fs::read_to_string(dir.join("combined_windows.json"))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .as_object()
        .ok_or_else(|| bad("combined_windows.json: not an object".into()))?;
    let mut files = Vec::new();
    for (name, wins) in map {
        let mut windows = Vec::new();
        for w in wins.as_array().into_iter().flatten() {
            let pair: Vec<i64> = w
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().and_then(parse_timestamp))
                .collect();
            if pair.len() != 2 {
                return Err(bad(format!("{name}: bad window {w}")));
            }
            windows.push((pair[0], pair[1]));
        }
        windows.sort_unstable();
        let (timestamps, values) = load_csv(&dir.join(name))?;
        files.push(DataFile {
            name: name.clone(),
            timestamps,
            values,
            windows,
        });
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(files)
}

/// Loads NAB's `profiles.json` as `(name, Profile)` pairs, sorted by name.
pub fn load_profiles(path: &Path) -> io::Result<Vec<(String, Profile)>> {
    let text = fs::read_to_string(path)?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .as_object()
        .ok_or_else(|| bad("profiles.json: not an object".into()))?;
    let mut out = Vec::new();
    for (name, p) in map {
        let cm = &p["CostMatrix"];
        let get = |k: &str| {
            cm[k]
                .as_f64()
                .ok_or_else(|| bad(format!("profile {name}: missing {k}")))
        };
        out.push((
            name.clone(),
            Profile {
                tp_weight: get("tpWeight")?,
                fp_weight: get("fpWeight")?,
                fn_weight: get("fnWeight")?,
            },
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    /// 1000 rows (probation 150), windows over rows 400..=449 and 700..=749.
    fn synthetic() -> (Vec<i64>, Vec<(i64, i64)>) {
        let ts: Vec<i64> = (0..1000).map(|i| i * MIN).collect();
        let windows = vec![(400 * MIN, 449 * MIN), (700 * MIN, 749 * MIN)];
        (ts, windows)
    }

    fn scorer_with(scores: &[f64]) -> Scorer {
        let (ts, windows) = synthetic();
        let mut s = Scorer::new();
        s.add_file(&ts, &windows, scores);
        s
    }

    #[test]
    fn sigmoid_endpoints() {
        assert!((scaled_sigmoid(-1.0) - 0.986_614_298).abs() < 1e-6);
        assert!(scaled_sigmoid(0.0).abs() < 1e-12);
        assert_eq!(scaled_sigmoid(3.0), -1.0);
        assert!((scaled_sigmoid(-0.5) - 0.848_283_639_9).abs() < 1e-6);
    }

    #[test]
    fn probation() {
        assert_eq!(probation_len(1000), 150);
        assert_eq!(probation_len(4032), 604);
        assert_eq!(probation_len(10_000), 750);
    }

    #[test]
    fn timestamps_parse() {
        assert_eq!(parse_timestamp("1970-01-01 00:00:00"), Some(0));
        assert_eq!(
            parse_timestamp("2014-04-10 07:15:00.000000"),
            Some(1_397_114_100_000)
        );
        assert_eq!(
            parse_timestamp("2000-03-01 00:00:01"),
            Some(951_868_801_000)
        );
        assert_eq!(parse_timestamp("garbage"), None);
    }

    #[test]
    fn perfect_detector_scores_100() {
        let mut scores = vec![0.0; 1000];
        scores[400] = 1.0;
        scores[700] = 1.0;
        let s = scorer_with(&scores);
        let r = s.best(&Profile::STANDARD);
        assert!((r.normalised - 100.0).abs() < 1e-9, "{r:?}");
        assert_eq!((r.detected_windows, r.false_positives), (2, 0));
        assert_eq!(r.threshold, 1.0);
    }

    #[test]
    fn never_firing_scores_0() {
        let s = scorer_with(&[0.0; 1000]);
        let r = s.best(&Profile::STANDARD);
        // Firing everywhere is worse than never firing, so nothing is detected.
        assert!(r.normalised.abs() < 1e-9, "{r:?}");
        assert_eq!(r.threshold, f64::INFINITY);
        assert_eq!(s.null_score(&Profile::STANDARD), -2.0);
        assert_eq!(s.perfect_score(&Profile::STANDARD), 2.0);
    }

    #[test]
    fn false_positive_lowers_score() {
        let mut scores = vec![0.0; 1000];
        scores[400] = 1.0;
        scores[700] = 1.0;
        scores[200] = 1.0; // no preceding window: full fpWeight
        let r = scorer_with(&scores).score_at(&Profile::STANDARD, 1.0);
        assert!((r.raw - (2.0 - 0.11)).abs() < 1e-9, "{r:?}");
        assert!((r.normalised - 100.0 * (4.0 - 0.11) / 4.0).abs() < 1e-9);
        // FP right after a window is cheap; far after it costs almost fpWeight.
        let mut near = vec![0.0; 1000];
        near[450] = 1.0;
        let mut far = vec![0.0; 1000];
        far[600] = 1.0;
        let rn = scorer_with(&near).score_at(&Profile::STANDARD, 1.0);
        let rf = scorer_with(&far).score_at(&Profile::STANDARD, 1.0);
        assert!(rn.raw < -2.0 && rn.raw > -2.01, "{rn:?}");
        assert!(rf.raw <= -2.1 && rf.raw >= -2.11 - 1e-9, "{rf:?}");
    }

    #[test]
    fn only_earliest_detection_counts_and_late_is_worth_less() {
        let mut early = vec![0.0; 1000];
        early[400] = 1.0;
        early[430] = 1.0;
        let r = scorer_with(&early).score_at(&Profile::STANDARD, 1.0);
        assert_eq!(r.false_positives, 0);
        assert!((r.raw - 0.0).abs() < 1e-9, "{r:?}"); // +1 for window 1, -1 for window 2
        let mut mid = vec![0.0; 1000];
        mid[424] = 1.0; // position -(449-424+1)/50 = -0.52
        let r = scorer_with(&mid).score_at(&Profile::STANDARD, 1.0);
        let expect = scaled_sigmoid(-0.52) / scaled_sigmoid(-1.0) - 1.0;
        assert!((r.raw - expect).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn probation_rows_are_ignored_and_threshold_is_swept() {
        let mut scores = vec![0.1; 1000];
        scores[10] = 1.0; // in probation: ignored
        scores[400] = 0.8;
        scores[700] = 0.6;
        scores[300] = 0.7; // FP between the two window detections
        let s = scorer_with(&scores);
        let r = s.best(&Profile::STANDARD);
        assert_eq!(r.threshold, 0.6);
        assert_eq!((r.detected_windows, r.false_positives), (2, 1));
        // With a tenfold FP weight the FP is not worth it... but missing a window is worse.
        let strict = Profile {
            fp_weight: 5.0,
            ..Profile::STANDARD
        };
        let r = s.best(&strict);
        assert_eq!(r.threshold, 0.8);
    }
}
