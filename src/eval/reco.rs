//! Prequential (test-then-train) evaluation of [`RecoModel`].
//!
//! Consumes a list of [`Interaction`]s, parsed from either MovieLens-style
//! text (`user<TAB>item<TAB>rating<TAB>unix_seconds`, every line a rating) or
//! the pipeline's JSON lines (`ts` as RFC 3339 `YYYY-MM-DDTHH:MM:SS.sssZ` or
//! epoch ms, `user_id`, `item_id`, `event_type` view|cart|purchase|rating,
//! `rating`); malformed lines are counted and skipped. Produces an
//! [`EvalReport`]: events are replayed in timestamp order (ties in input
//! order); each event of a user seen before is first ranked against all items
//! seen so far except that user's past items (recall@10 and NDCG@10, for the
//! model and for a popularity-count baseline under the same protocol), each
//! rating is first predicted (clipped to 1–5, for RMSE and MAE), then the
//! model learns from the event.

use std::collections::{HashMap, HashSet};

use crate::factors::bpr::GROUP;
use crate::factors::{Interaction, Kind, RecoConfig, RecoModel};

/// Input file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    MovieLens,
    Jsonl,
}

/// Metrics of one prequential run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalReport {
    /// Events replayed.
    pub events: u64,
    /// Lines skipped as malformed while parsing (filled by [`parse`]).
    pub skipped: u64,
    /// Events ranked (their user had been seen before).
    pub scored: u64,
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub popularity_recall_at_10: f64,
    pub popularity_ndcg_at_10: f64,
    /// Rating events predicted.
    pub ratings: u64,
    pub rmse: f64,
    pub mae: f64,
}

/// Epoch milliseconds of `YYYY-MM-DDTHH:MM:SS[.fff…](Z|±HH:MM)`.
pub fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            if i - start < 3 {
                ms = ms * 10 + i64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..3 {
            ms *= 10;
        }
    }
    let offset_min = match &s[i..] {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && matches!(rest.as_bytes()[0], b'+' | b'-') => {
            if rest.as_bytes()[3] != b':' {
                return None;
            }
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 60 + om)
        }
        _ => return None,
    };
    let days = crate::timefmt::days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_min * 60;
    Some(secs * 1000 + ms)
}

fn parse_json_line(line: &str) -> Option<Interaction> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let ts_ms = match v.get("ts")? {
        serde_json::Value::String(s) => parse_rfc3339_ms(s)?,
        n => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?,
    };
    let user = v.get("user_id")?.as_u64()?;
    let item = v.get("item_id")?.as_u64()?;
    let kind = match v.get("event_type")?.as_str()? {
        "view" => Kind::View,
        "cart" => Kind::Cart,
        "purchase" => Kind::Purchase,
        "rating" => {
            let r = v.get("rating")?.as_f64()? as f32;
            if !r.is_finite() {
                return None;
            }
            Kind::Rating(r)
        }
        _ => return None,
    };
    Some(Interaction {
        ts_ms,
        user,
        item,
        kind,
    })
}

fn parse_movielens_line(line: &str) -> Option<Interaction> {
    let mut f = line.split(['\t', ' ']).filter(|x| !x.is_empty());
    let user = f.next()?.parse().ok()?;
    let item = f.next()?.parse().ok()?;
    let rating: f32 = f.next()?.parse().ok()?;
    let ts: i64 = f.next()?.parse().ok()?;
    if !rating.is_finite() {
        return None;
    }
    Some(Interaction {
        ts_ms: ts.checked_mul(1000)?,
        user,
        item,
        kind: Kind::Rating(rating),
    })
}

/// Parses a whole input; returns the events in input order and how many
/// non-blank lines were skipped as malformed.
pub fn parse(text: &str, format: Format) -> (Vec<Interaction>, u64) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let ev = match format {
            Format::MovieLens => parse_movielens_line(line),
            Format::Jsonl => parse_json_line(line),
        };
        match ev {
            Some(e) => out.push(e),
            None => skipped += 1,
        }
    }
    (out, skipped)
}

/// Recall@k and NDCG@k accumulators.
#[derive(Debug, Default, Clone, Copy)]
struct Hits {
    hits: u64,
    dcg: f64,
}

impl Hits {
    fn add(&mut self, rank: Option<usize>, k: usize) {
        if let Some(r) = rank
            && r < k
        {
            self.hits += 1;
            self.dcg += 1.0 / ((r + 2) as f64).log2();
        }
    }
}

/// Interaction counts in order of first appearance, for the baseline.
#[derive(Debug, Default)]
struct Popularity {
    index: HashMap<u64, usize>,
    counts: Vec<u32>,
}

impl Popularity {
    fn add(&mut self, item: u64) {
        let n = self.counts.len();
        let i = *self.index.entry(item).or_insert(n);
        if i == n {
            self.counts.push(0);
        }
        self.counts[i] += 1;
    }

    /// Rank of `item` by count among seen items minus `exclude`; ties go to
    /// the earlier-seen item.
    fn rank_of(&self, item: u64, exclude: &HashSet<u64>) -> Option<usize> {
        if exclude.contains(&item) {
            return None;
        }
        let t = *self.index.get(&item)?;
        let ct = self.counts[t];
        let beats = |j: usize, c: u32| c > ct || (c == ct && j < t);
        let mut rank = self
            .counts
            .iter()
            .enumerate()
            .filter(|&(j, &c)| beats(j, c))
            .count();
        for x in exclude {
            if let Some(&j) = self.index.get(x)
                && beats(j, self.counts[j])
            {
                rank -= 1;
            }
        }
        Some(rank)
    }
}

/// Runs the prequential protocol with cutoff 10 on `events` (sorted here,
/// stably, by timestamp) and returns the metrics and the trained model.
pub fn evaluate(events: &mut [Interaction], cfg: RecoConfig, seed: u64) -> (EvalReport, RecoModel) {
    const K: usize = 10;
    events.sort_by_key(|e| e.ts_ms);
    let mut model = RecoModel::new(cfg, seed);
    let mut pop = Popularity::default();
    let mut past: HashMap<u64, HashSet<u64>> = HashMap::new();
    let (mut m, mut p) = (Hits::default(), Hits::default());
    let mut rep = EvalReport::default();
    let (mut se, mut ae) = (0.0f64, 0.0f64);
    // The model learns in groups, as the pipeline's trainer does
    // (`RecoModel::observe_group`): the events of a run of different users
    // are all tested before it learns from any; a user's second event is
    // tested after it learned the first.
    for chunk in events.chunks(GROUP) {
        let mut rest = chunk;
        while !rest.is_empty() {
            let run = (1..rest.len())
                .find(|&k| rest[..k].iter().any(|e| e.user == rest[k].user))
                .unwrap_or(rest.len());
            for ev in &rest[..run] {
                rep.events += 1;
                if let Some(seen) = past.get(&ev.user) {
                    rep.scored += 1;
                    m.add(model.implicit.rank_of(ev.user, ev.item, seen), K);
                    p.add(pop.rank_of(ev.item, seen), K);
                }
                if let Kind::Rating(r) = ev.kind {
                    let e = f64::from(r - model.predict_rating(ev.user, ev.item));
                    se += e * e;
                    ae += e.abs();
                    rep.ratings += 1;
                }
            }
            model.observe_group(&rest[..run]);
            for ev in &rest[..run] {
                pop.add(ev.item);
                past.entry(ev.user).or_default().insert(ev.item);
            }
            rest = &rest[run..];
        }
    }
    let n = rep.scored.max(1) as f64;
    rep.recall_at_10 = m.hits as f64 / n;
    rep.ndcg_at_10 = m.dcg / n;
    rep.popularity_recall_at_10 = p.hits as f64 / n;
    rep.popularity_ndcg_at_10 = p.dcg / n;
    if rep.ratings > 0 {
        rep.rmse = (se / rep.ratings as f64).sqrt();
        rep.mae = ae / rep.ratings as f64;
    }
    (rep, model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_parses() {
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339_ms("1970-01-01T00:00:01.5Z"), Some(1500));
        assert_eq!(
            parse_rfc3339_ms("2026-11-22T00:00:00.005Z"),
            Some(1_795_305_600_005)
        );
        assert_eq!(
            parse_rfc3339_ms("2000-03-01T01:00:00+01:00"),
            Some(951_868_800_000)
        );
        assert_eq!(parse_rfc3339_ms("not-a-time"), None);
        assert_eq!(parse_rfc3339_ms("2026-13-22T00:00:00Z"), None);
    }

    #[test]
    fn parses_both_formats_and_skips_junk() {
        let jsonl = concat!(
            r#"{"event_id":1,"ts":"1970-01-01T00:00:01.000Z","user_id":3,"item_id":4,"event_type":"cart","rating":null}"#,
            "\n",
            r#"{"event_id":2,"ts":2000,"user_id":3,"item_id":5,"event_type":"rating","rating":4}"#,
            "\n",
            r#"{"event_id": 3, "ts": "not-a-time""#,
            "\n",
            r#"{"event_id":4,"ts":3000,"user_id":null,"item_id":5,"event_type":"view"}"#,
            "\n\n"
        );
        let (ev, skipped) = parse(jsonl, Format::Jsonl);
        assert_eq!(skipped, 2);
        assert_eq!(ev.len(), 2);
        assert_eq!((ev[0].ts_ms, ev[0].kind), (1000, Kind::Cart));
        assert_eq!(ev[1].kind, Kind::Rating(4.0));
        let (ev, skipped) = parse("1\t2\t5\t881250949\nbad line\n", Format::MovieLens);
        assert_eq!(skipped, 1);
        assert_eq!(ev[0].ts_ms, 881_250_949_000);
        assert_eq!((ev[0].user, ev[0].item), (1, 2));
    }

    #[test]
    fn popularity_rank_excludes_and_breaks_ties() {
        let mut p = Popularity::default();
        for i in [1, 2, 2, 3, 3, 3, 4] {
            p.add(i);
        }
        let none = HashSet::new();
        assert_eq!(p.rank_of(3, &none), Some(0));
        assert_eq!(p.rank_of(1, &none), Some(2));
        assert_eq!(p.rank_of(4, &none), Some(3));
        let ex: HashSet<u64> = [3, 1].into_iter().collect();
        assert_eq!(p.rank_of(4, &ex), Some(1));
        assert_eq!(p.rank_of(3, &ex), None);
        assert_eq!(p.rank_of(9, &none), None);
    }

    #[test]
    fn protocol_counts_and_orders_by_time() {
        let mk = |ts, user, item, kind| Interaction {
            ts_ms: ts,
            user,
            item,
            kind,
        };
        // Out of order in the input; ts 5 ties keep input order.
        let mut evs = vec![
            mk(5, 1, 10, Kind::View),
            mk(1, 1, 11, Kind::View),
            mk(5, 2, 10, Kind::Rating(4.0)),
            mk(7, 2, 10, Kind::Rating(5.0)),
            mk(9, 1, 12, Kind::View),
        ];
        let (r, model) = evaluate(&mut evs, RecoConfig::default(), 1);
        assert_eq!(evs[0].item, 11);
        assert_eq!((evs[1].user, evs[2].user), (1, 2));
        assert_eq!(r.events, 5);
        // Scored: user 1 at ts 5 and 9, user 2 at ts 7.
        assert_eq!(r.scored, 3);
        // User 1 at ts 5: item 10 is unseen then, a miss; user 2's repeat of
        // item 10 is excluded, a miss; item 12 is unseen, a miss.
        assert_eq!(r.recall_at_10, 0.0);
        assert_eq!(r.ratings, 2);
        // First rating predicted at the prior mean 3, second near 4.
        assert!(r.rmse > 0.0 && r.mae > 0.0);
        assert_eq!(model.events(), 5);
    }

    #[test]
    fn ranks_a_hit_with_ndcg() {
        let mk = |ts, user, item| Interaction {
            ts_ms: ts,
            user,
            item,
            kind: Kind::View,
        };
        let mut evs = vec![mk(0, 1, 10), mk(1, 2, 20), mk(2, 1, 20)];
        let (r, _) = evaluate(&mut evs, RecoConfig::default(), 1);
        // User 1 has seen 10; the only other candidate is 20: rank 0.
        assert_eq!(r.scored, 1);
        assert_eq!(r.recall_at_10, 1.0);
        assert!((r.ndcg_at_10 - 1.0).abs() < 1e-12);
        assert_eq!(r.popularity_recall_at_10, 1.0);
    }
}
