//! `pulse detect` and `pulse nab`: the live detector run over series in NAB's
//! CSV format. Consumes `timestamp,value` CSV (header row; timestamps
//! `YYYY-MM-DD HH:MM:SS` or RFC 3339); produces
//! `timestamp,value,anomaly_score,label` rows (label 1 where flagged), and
//! NAB's normalised scores over a labelled corpus.

use std::io::{self, BufRead, Write};
use std::path::Path;

use crate::detect::{Detector, DetectorConfig};
use crate::eval::nab::{ProfileResult, Scorer, load_corpus, load_profiles, parse_timestamp};

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Streams `input` through one detector into `out`; returns rows written.
pub fn detect_csv(
    input: impl BufRead,
    mut out: impl Write,
    cfg: &DetectorConfig,
) -> io::Result<usize> {
    let mut d = Detector::new(cfg.clone());
    writeln!(out, "timestamp,value,anomaly_score,label")?;
    let mut n = 0;
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if i == 0 || line.trim().is_empty() {
            continue; // header
        }
        let (t, v) = line.split_once(',').ok_or_else(|| {
            bad(format!(
                "line {}: expected timestamp,value: {line:?}",
                i + 1
            ))
        })?;
        let ts = parse_timestamp(t)
            .or_else(|| crate::decode::parse_ts(t.trim()))
            .ok_or_else(|| bad(format!("line {}: bad timestamp {t:?}", i + 1)))?;
        let value: f64 = v
            .trim()
            .parse()
            .map_err(|e| bad(format!("line {}: bad value {v:?}: {e}", i + 1)))?;
        let p = d.update(ts, value);
        writeln!(
            out,
            "{},{},{:.6},{}",
            t.trim(),
            v.trim(),
            p.score,
            u8::from(p.flagged)
        )?;
        n += 1;
    }
    out.flush()?;
    Ok(n)
}

/// Scores the detector on a NAB corpus directory (`combined_windows.json`,
/// `profiles.json` and the CSV files): (profile name, result) per profile.
pub fn nab_scores(dir: &Path, cfg: &DetectorConfig) -> io::Result<Vec<(String, ProfileResult)>> {
    let files = load_corpus(dir)?;
    let profiles = load_profiles(&dir.join("profiles.json"))?;
    let mut scorer = Scorer::new();
    for f in &files {
        let mut d = Detector::new(cfg.clone());
        let scores: Vec<f64> = f
            .timestamps
            .iter()
            .zip(&f.values)
            .map(|(&t, &v)| d.update(t, v).score)
            .collect();
        scorer.add_file(&f.timestamps, &f.windows, &scores);
    }
    Ok(profiles
        .into_iter()
        .map(|(n, p)| (n, scorer.best(&p)))
        .collect())
}
