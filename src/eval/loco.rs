//! Leave-one-category-out evaluation of the detector on a NAB corpus, behind
//! `pulse nab --loco`. Consumes the labelled files (their category is the
//! folder of their name), the profiles and a grid of detector settings;
//! produces, per held-out category and profile, the setting and corpus-wide
//! threshold that score best on the other categories, and what they score on
//! the held-out one. Settings are never chosen per file, and the held-out
//! category never takes part in choosing them: its score estimates how the
//! detector does on a kind of series it was not tuned on.

use std::collections::BTreeSet;

use crate::detect::{Detector, DetectorConfig};
use crate::eval::nab::{DataFile, Profile, ProfileResult, Scorer};

/// The settings tried: the defaults with each of the sliding window, the
/// sustained-surprise average, the calibration history and the suppression
/// varied around them (72 settings).
pub fn grid() -> Vec<DetectorConfig> {
    let mut out = Vec::new();
    for window in [100, 200, 400, 800] {
        for short_window in [4, 12, 36] {
            for long_window in [500, 2000] {
                for suppress in [50, 100, 200] {
                    for spatial_tolerance in [0.0, 0.1, 0.3] {
                        out.push(DetectorConfig {
                            window,
                            short_window,
                            long_window,
                            suppress,
                            spatial_tolerance,
                            ..DetectorConfig::default()
                        });
                    }
                }
            }
        }
    }
    out
}

/// A file's category: the folder part of its name.
pub fn category(f: &DataFile) -> &str {
    f.name.split_once('/').map_or("", |(c, _)| c)
}

/// One held-out category under one profile.
#[derive(Debug, Clone)]
pub struct Fold {
    /// The held-out category; empty holds nothing out (`train` is then the
    /// whole corpus's choice and `test` scores the empty set).
    pub category: String,
    pub profile: String,
    /// Index into the grid of the setting chosen on the other categories.
    pub setting: usize,
    /// Its result on the other categories (threshold chosen there).
    pub train: ProfileResult,
    /// The held-out category scored with that setting and threshold.
    pub test: ProfileResult,
    /// Anomaly windows in the held-out category (0: its normalised score is
    /// not defined; judge it by its false positives).
    pub windows: usize,
}

/// Scores every file under every setting, then runs one fold per category
/// and profile.
pub fn loco(
    files: &[DataFile],
    profiles: &[(String, Profile)],
    settings: &[DetectorConfig],
) -> Vec<Fold> {
    // scores[setting][file]
    let scores: Vec<Vec<Vec<f64>>> = settings
        .iter()
        .map(|cfg| {
            files
                .iter()
                .map(|f| {
                    let mut d = Detector::new(cfg.clone());
                    f.timestamps
                        .iter()
                        .zip(&f.values)
                        .map(|(&t, &v)| d.update(t, v).score)
                        .collect()
                })
                .collect()
        })
        .collect();
    let scorer = |s: usize, keep: &dyn Fn(&DataFile) -> bool| {
        let mut sc = Scorer::new();
        for (f, xs) in files.iter().zip(&scores[s]) {
            if keep(f) {
                sc.add_file(&f.timestamps, &f.windows, xs);
            }
        }
        sc
    };
    let categories: BTreeSet<&str> = files.iter().map(category).collect();
    let mut out = Vec::new();
    // "" holds nothing out: the setting the whole corpus chooses (the defaults' candidate).
    for held in std::iter::once("").chain(categories) {
        let windows = files
            .iter()
            .filter(|f| category(f) == held)
            .map(|f| f.windows.len())
            .sum();
        for (pname, profile) in profiles {
            let (setting, train) = (0..settings.len())
                .map(|s| (s, scorer(s, &|f| category(f) != held).best(profile)))
                .fold(None::<(usize, ProfileResult)>, |best, (s, r)| match best {
                    Some((_, b)) if b.normalised >= r.normalised => best,
                    _ => Some((s, r)),
                })
                .expect("a non-empty grid");
            let test = scorer(setting, &|f| category(f) == held).score_at(profile, train.threshold);
            out.push(Fold {
                category: held.to_string(),
                profile: pname.clone(),
                setting,
                train,
                test,
                windows,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A noisy daily series with one spike at `spike` (its window around it).
    fn file(name: &str, seed: u64, spike: Option<usize>) -> DataFile {
        let n = 3000;
        let step = 300_000i64;
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut noise = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 1000) as f64 / 1000.0
        };
        let timestamps: Vec<i64> = (0..n as i64).map(|i| i * step).collect();
        let values: Vec<f64> = (0..n)
            .map(|i| {
                let base = 10.0 + (i as f64 / 288.0 * std::f64::consts::TAU).sin() + noise();
                if spike == Some(i) { base + 40.0 } else { base }
            })
            .collect();
        let windows = spike
            .map(|i| vec![(timestamps[i - 20], timestamps[(i + 20).min(n - 1)])])
            .unwrap_or_default();
        DataFile {
            name: name.into(),
            timestamps,
            values,
            windows,
        }
    }

    #[test]
    fn each_category_is_held_out_and_scored_with_the_others_choice() {
        let files = vec![
            file("a/1.csv", 1, Some(2000)),
            file("a/2.csv", 2, Some(2500)),
            file("b/1.csv", 3, Some(2200)),
            file("c/1.csv", 4, None),
        ];
        let profiles = vec![("standard".to_string(), Profile::STANDARD)];
        let settings = vec![
            DetectorConfig::default(),
            DetectorConfig {
                window: 100,
                ..DetectorConfig::default()
            },
        ];
        let folds = loco(&files, &profiles, &settings);
        let held: Vec<&str> = folds.iter().map(|f| f.category.as_str()).collect();
        assert_eq!(held, ["", "a", "b", "c"]);
        let folds = &folds[1..];
        for f in folds {
            assert!(f.setting < settings.len());
            assert!(f.train.threshold.is_finite(), "{f:?}");
        }
        // The spikes are obvious: held out, a category with windows finds them.
        let a = &folds[0];
        assert_eq!((a.windows, a.test.detected_windows), (2, 2), "{a:?}");
        assert!(a.test.normalised > 50.0, "{a:?}");
        // The category without windows is judged by its false positives.
        assert_eq!(folds[2].windows, 0);
    }
}
