//! Event-time tumbling windows. Consumes event timestamps (to assign bins and
//! classify lateness) and partial aggregates per (window_start, service)
//! computed by the SQL stage; produces window emissions: an *update* when the
//! watermark passes a window's end (and again, as an upsert, whenever a late
//! event within the allowed lateness changes it) and a *final* when the
//! watermark passes end + allowed lateness, after which the state is purged.
//! At end of input every window is emitted and finalised. Pure code.
//!
//! Watermark = max event time seen − out-of-orderness bound, advanced per event
//! in source order. An event whose window end + allowed lateness is at or
//! behind the watermark is *too late*: it is kept in `events` and counted, but
//! changes no window, so a finalised window never reopens.

pub mod sql;

use std::collections::{BTreeMap, HashMap};

use crate::sketch::{Hll, SparseHist};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowParams {
    pub size_ms: i64,
    pub out_of_orderness_ms: i64,
    pub allowed_lateness_ms: i64,
}

impl WindowParams {
    pub fn from_config(c: &crate::config::WindowConfig) -> Self {
        WindowParams {
            size_ms: (c.size_secs * 1000) as i64,
            out_of_orderness_ms: c.out_of_orderness_ms as i64,
            allowed_lateness_ms: c.allowed_lateness_ms as i64,
        }
    }
    pub fn bin(&self, ts: i64) -> i64 {
        ts.div_euclid(self.size_ms) * self.size_ms
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lateness {
    OnTime,
    Late,
    TooLate,
}

impl Lateness {
    pub fn as_str(self) -> &'static str {
        match self {
            Lateness::OnTime => crate::model::ON_TIME,
            Lateness::Late => crate::model::LATE,
            Lateness::TooLate => crate::model::TOO_LATE,
        }
    }
}

/// One input partition's progress.
#[derive(Debug, Clone)]
struct PartState {
    key: i32,
    max_ts: Option<i64>,
    last_seen_ms: i64,
    idle: bool,
}

/// Watermark tracking and bin assignment.
///
/// Like Flink's per-partition watermarks: each input partition tracks its own
/// max event time, and the watermark is the minimum over the partitions that
/// are not idle (no record for `idle_ms` of processing time), minus the
/// out-of-orderness bound. A partition that is assigned but has produced
/// nothing yet holds the watermark back until it turns idle. The watermark
/// never moves backwards.
#[derive(Debug, Clone)]
pub struct Windower {
    pub params: WindowParams,
    idle_ms: i64,
    parts: Vec<PartState>,
    now_ms: i64,
    wm: i64,
    max_ts: Option<i64>,
}

impl Windower {
    pub fn new(params: WindowParams) -> Self {
        Self::with_idleness(params, i64::MAX)
    }

    /// `idle_ms`: processing time after which a silent partition stops holding the watermark back.
    pub fn with_idleness(params: WindowParams, idle_ms: i64) -> Self {
        Windower {
            params,
            idle_ms,
            parts: Vec::new(),
            now_ms: 0,
            wm: i64::MIN,
            max_ts: None,
        }
    }

    pub fn watermark(&self) -> i64 {
        self.wm
    }

    pub fn max_event_time(&self) -> Option<i64> {
        self.max_ts
    }

    fn part(&mut self, key: i32) -> usize {
        match self.parts.iter().position(|p| p.key == key) {
            Some(i) => i,
            None => {
                self.parts.push(PartState {
                    key,
                    max_ts: None,
                    last_seen_ms: self.now_ms,
                    idle: false,
                });
                self.parts.len() - 1
            }
        }
    }

    /// A one-partition windower that has seen events up to `max_ts`.
    pub fn restored(params: WindowParams, key: i32, max_ts: Option<i64>) -> Self {
        let mut w = Windower::new(params);
        w.set_partitions(&[key]);
        w.parts[0].max_ts = max_ts;
        w.max_ts = max_ts;
        w.recompute();
        w
    }

    /// Declares the partitions currently assigned: new ones hold the watermark
    /// back until they produce data or turn idle; unassigned ones are dropped.
    pub fn set_partitions(&mut self, keys: &[i32]) {
        self.parts.retain(|p| keys.contains(&p.key));
        for &k in keys {
            self.part(k);
        }
        self.recompute();
    }

    /// Advances processing time (epoch ms) and re-evaluates idleness.
    pub fn tick(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
        for p in &mut self.parts {
            p.idle = now_ms.saturating_sub(p.last_seen_ms) >= self.idle_ms;
        }
        self.recompute();
    }

    fn recompute(&mut self) {
        let active = self.parts.iter().filter(|p| !p.idle);
        let min_active = if self.parts.iter().any(|p| !p.idle) {
            // An active partition with no data yet holds the watermark at its minimum.
            active.map(|p| p.max_ts.unwrap_or(i64::MIN)).min()
        } else {
            // Everything idle: follow the most advanced partition.
            self.parts.iter().filter_map(|p| p.max_ts).max()
        };
        if let Some(m) = min_active {
            let cand = m.saturating_sub(self.params.out_of_orderness_ms);
            self.wm = self.wm.max(cand);
        }
    }

    /// Classifies one event of `partition` against the watermark as it
    /// stands, then advances that partition (and the watermark).
    pub fn observe(&mut self, partition: i32, ts: i64) -> (i64, Lateness) {
        let ws = self.params.bin(ts);
        let end = ws + self.params.size_ms;
        let wm = self.wm;
        let class = if end > wm {
            Lateness::OnTime
        } else if end + self.params.allowed_lateness_ms > wm {
            Lateness::Late
        } else {
            Lateness::TooLate
        };
        self.max_ts = Some(self.max_ts.map_or(ts, |m| m.max(ts)));
        let i = self.part(partition);
        let now = self.now_ms;
        let p = &mut self.parts[i];
        p.last_seen_ms = now;
        let was_idle = std::mem::replace(&mut p.idle, false);
        let old = p.max_ts;
        if old.is_none_or(|m| ts > m) {
            p.max_ts = Some(ts);
            // Only the partition holding the minimum (or one waking up) can move it.
            let held =
                old.is_none_or(|m| m.saturating_sub(self.params.out_of_orderness_ms) <= self.wm);
            if held || was_idle || self.parts.len() == 1 {
                self.recompute();
            }
        } else if was_idle {
            self.recompute();
        }
        (ws, class)
    }
}

/// A mergeable partial aggregate of one (window, service).
#[derive(Debug, Clone)]
pub struct Partial {
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub latency_sum_ms: f64,
    pub latency_count: i64,
    pub latency_max_ms: Option<f64>,
    pub hist: SparseHist,
    pub users: Hll,
}

impl Default for Partial {
    fn default() -> Self {
        Partial {
            requests: 0,
            errors: 0,
            client_errors: 0,
            latency_sum_ms: 0.0,
            latency_count: 0,
            latency_max_ms: None,
            hist: SparseHist::default(),
            users: Hll::default(),
        }
    }
}

impl Partial {
    /// Binary encoding (format 1): counts, latency sums, the HDR histogram
    /// (V2) and the compact HLL. Used in checkpoints and Redis partials.
    pub fn to_bytes(&self) -> Vec<u8> {
        let hist = self.hist.to_bytes();
        let mut out = Vec::with_capacity(64 + hist.len());
        out.push(1u8);
        for v in [
            self.requests,
            self.errors,
            self.client_errors,
            self.latency_count,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.latency_sum_ms.to_le_bytes());
        out.extend_from_slice(&self.latency_max_ms.unwrap_or(f64::NAN).to_le_bytes());
        out.extend_from_slice(&(hist.len() as u32).to_le_bytes());
        out.extend_from_slice(&hist);
        out.extend_from_slice(&self.users.to_compact());
        out
    }

    /// Decodes [`Partial::to_bytes`]; `None` for anything malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Partial> {
        let s = StoredPartial::from_bytes(b)?;
        Some(Partial {
            requests: s.requests,
            errors: s.errors,
            client_errors: s.client_errors,
            latency_count: s.latency_count,
            latency_sum_ms: s.latency_sum_ms,
            latency_max_ms: s.latency_max_ms,
            hist: SparseHist::from_bytes(&s.hist)?,
            users: s.users,
        })
    }

    pub fn merge(&mut self, o: &Partial) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.client_errors += o.client_errors;
        self.latency_sum_ms += o.latency_sum_ms;
        self.latency_count += o.latency_count;
        self.latency_max_ms = match (self.latency_max_ms, o.latency_max_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.hist.merge(&o.hist);
        self.users.merge(&o.users);
    }
}

/// A partial in the form the merge query takes: counters and the
/// distinct-user sketch decoded, the latency histogram serialised
/// ([`SparseHist::to_bytes`]). Read back from the store, the
/// histogram's bytes are used as they are: decoding an HDR histogram (and
/// allocating its ~92 KB of counts) only to serialise it again was ~8% of the
/// Kafka path's CPU.
#[derive(Debug, Clone)]
pub struct StoredPartial {
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub latency_count: i64,
    pub latency_sum_ms: f64,
    pub latency_max_ms: Option<f64>,
    pub hist: Vec<u8>,
    pub users: Hll,
}

impl StoredPartial {
    /// The serialised form of a partial held in memory.
    pub fn of(p: &Partial) -> StoredPartial {
        StoredPartial {
            requests: p.requests,
            errors: p.errors,
            client_errors: p.client_errors,
            latency_count: p.latency_count,
            latency_sum_ms: p.latency_sum_ms,
            latency_max_ms: p.latency_max_ms,
            hist: p.hist.to_bytes(),
            users: p.users.clone(),
        }
    }

    /// Reads [`Partial::to_bytes`] without decoding the histogram (its header
    /// and length are checked); `None` for anything malformed.
    pub fn from_bytes(b: &[u8]) -> Option<StoredPartial> {
        if *b.first()? != 1 {
            return None;
        }
        let word = |i: usize| -> Option<[u8; 8]> { b.get(1 + i * 8..9 + i * 8)?.try_into().ok() };
        let i = |k: usize| word(k).map(i64::from_le_bytes);
        let f = |k: usize| word(k).map(f64::from_le_bytes);
        let max = f(5)?;
        let hl = u32::from_le_bytes(b.get(49..53)?.try_into().ok()?) as usize;
        let hist = b.get(53..53 + hl)?;
        if !crate::sketch::hist_bytes_framed(hist) {
            return None;
        }
        let (users, used) = Hll::from_compact(b.get(53 + hl..)?)?;
        if 53 + hl + used != b.len() {
            return None;
        }
        Some(StoredPartial {
            requests: i(0)?,
            errors: i(1)?,
            client_errors: i(2)?,
            latency_count: i(3)?,
            latency_sum_ms: f(4)?,
            latency_max_ms: (!max.is_nan()).then_some(max),
            hist: hist.to_vec(),
            users,
        })
    }
}

#[derive(Debug, Default)]
struct WindowState {
    services: BTreeMap<String, Partial>,
    /// Requests per item. foldhash, randomly seeded per process: SipHash
    /// on every (window, item) count of every batch was ~1% of the
    /// pipeline's instructions.
    items: HashMap<u64, i64, foldhash::fast::RandomState>,
    /// Emitted at least once.
    emitted: bool,
    /// Changed since the last emission.
    dirty: bool,
}

impl WindowState {
    fn emit(&self, window_start: i64, top: usize, is_final: bool, first: bool) -> WindowEmit {
        WindowEmit {
            window_start,
            services: self
                .services
                .iter()
                .map(|(s, p)| (s.clone(), p.clone()))
                .collect(),
            top_items: top_n(&self.items, top),
            is_final,
            first,
        }
    }
}

/// One window's current aggregate, as emitted.
#[derive(Debug, Clone)]
pub struct WindowEmit {
    pub window_start: i64,
    pub services: Vec<(String, Partial)>,
    /// Top items by requests, ties by item id.
    pub top_items: Vec<(u64, i64)>,
    /// No later change is possible: the window was purged.
    pub is_final: bool,
    /// The window's first emission.
    pub first: bool,
}

/// Open windows, keyed by start; bins below the watermark are popped.
#[derive(Debug)]
pub struct WindowTable {
    params: WindowParams,
    top_n: usize,
    /// Also emit changed windows that are still open (live values).
    pub live: bool,
    open: BTreeMap<i64, WindowState>,
    finalised_upto: i64,
}

impl WindowTable {
    pub fn new(params: WindowParams, top_n: usize) -> Self {
        WindowTable {
            params,
            top_n,
            live: false,
            open: BTreeMap::new(),
            finalised_upto: i64::MIN,
        }
    }

    pub fn open_windows(&self) -> usize {
        self.open.len()
    }

    /// Adds a partial for (window, service). Partials of finalised windows are a
    /// logic error upstream (too-late events are filtered) and are refused.
    pub fn add_partial(&mut self, window_start: i64, service: &str, p: &Partial) -> bool {
        if window_start < self.finalised_upto {
            return false;
        }
        let w = self.open.entry(window_start).or_default();
        w.dirty = true;
        match w.services.get_mut(service) {
            Some(cur) => cur.merge(p),
            None => {
                w.services.insert(service.to_string(), p.clone());
            }
        }
        true
    }

    pub fn add_item_counts(&mut self, window_start: i64, item: u64, n: i64) {
        if window_start < self.finalised_upto {
            return;
        }
        let w = self.open.entry(window_start).or_default();
        w.dirty = true;
        *w.items.entry(item).or_default() += n;
    }

    /// Emissions due at `watermark`: updates for windows that closed or changed
    /// after closing, finals (and purge) for windows past allowed lateness;
    /// with `live`, also updates of changed windows still open.
    /// `end_of_input` closes and finalises everything.
    pub fn advance(&mut self, watermark: i64, end_of_input: bool) -> Vec<WindowEmit> {
        let size = self.params.size_ms;
        let lateness = self.params.allowed_lateness_ms;
        let mut out = Vec::new();
        let mut purge = Vec::new();
        for (&ws, w) in self.open.iter_mut() {
            let end = ws + size;
            if !end_of_input && end > watermark {
                if self.live && w.dirty {
                    // A live (provisional) value of a window still open.
                    out.push(w.emit(ws, self.top_n, false, false));
                    w.dirty = false;
                }
                continue;
            }
            let is_final = end_of_input || end + lateness <= watermark;
            if w.dirty || !w.emitted || is_final {
                out.push(w.emit(ws, self.top_n, is_final, !w.emitted));
                w.emitted = true;
                w.dirty = false;
            }
            if is_final {
                purge.push(ws);
            }
        }
        for ws in purge {
            self.open.remove(&ws);
            self.finalised_upto = self.finalised_upto.max(ws + size);
        }
        out
    }
}

/// One source partition's windows: its own watermark (no idleness: it moves
/// only with the partition's own records, so the state after a given offset
/// is a pure function of the records before it) and its window table.
#[derive(Debug)]
pub struct PartitionWindows {
    pub key: i32,
    pub windower: Windower,
    pub table: WindowTable,
}

/// A serialisable copy of [`PartitionWindows`] (for checkpoints).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSnapshot {
    pub max_ts: Option<i64>,
    pub watermark: i64,
    pub finalised_upto: i64,
    pub windows: Vec<WindowSnap>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WindowSnap {
    pub start: i64,
    pub emitted: bool,
    pub dirty: bool,
    /// (service, [`Partial::to_bytes`] as hex).
    pub services: Vec<(String, String)>,
    pub items: Vec<(u64, i64)>,
}

impl PartitionWindows {
    pub fn new(params: WindowParams, top_n: usize, key: i32) -> Self {
        let mut windower = Windower::new(params);
        windower.set_partitions(&[key]);
        PartitionWindows {
            key,
            windower,
            table: WindowTable::new(params, top_n),
        }
    }

    pub fn snapshot(&self) -> WindowSnapshot {
        WindowSnapshot {
            max_ts: self.windower.max_ts,
            watermark: self.windower.wm,
            finalised_upto: self.table.finalised_upto,
            windows: self
                .table
                .open
                .iter()
                .map(|(&start, w)| WindowSnap {
                    start,
                    emitted: w.emitted,
                    dirty: w.dirty,
                    services: w
                        .services
                        .iter()
                        .map(|(s, p)| (s.clone(), crate::timefmt::to_hex(&p.to_bytes())))
                        .collect(),
                    items: {
                        let mut v: Vec<(u64, i64)> =
                            w.items.iter().map(|(&i, &n)| (i, n)).collect();
                        v.sort_unstable();
                        v
                    },
                })
                .collect(),
        }
    }

    /// Rebuilds the state of a snapshot; `None` if a partial is corrupt.
    pub fn restore(
        params: WindowParams,
        top_n: usize,
        key: i32,
        s: &WindowSnapshot,
    ) -> Option<Self> {
        let mut pw = PartitionWindows::new(params, top_n, key);
        pw.windower.wm = s.watermark;
        pw.windower.max_ts = s.max_ts;
        if let Some(p) = pw.windower.parts.first_mut() {
            p.max_ts = s.max_ts;
        }
        pw.table.finalised_upto = s.finalised_upto;
        for w in &s.windows {
            let mut services = BTreeMap::new();
            for (svc, hex) in &w.services {
                services.insert(
                    svc.clone(),
                    Partial::from_bytes(&crate::timefmt::from_hex(hex)?)?,
                );
            }
            pw.table.open.insert(
                w.start,
                WindowState {
                    services,
                    items: w.items.iter().copied().collect(),
                    emitted: w.emitted,
                    dirty: w.dirty,
                },
            );
        }
        Some(pw)
    }
}

fn top_n<S>(items: &HashMap<u64, i64, S>, n: usize) -> Vec<(u64, i64)> {
    let mut v: Vec<(u64, i64)> = items.iter().map(|(&k, &c)| (k, c)).collect();
    let order = |a: &(u64, i64), b: &(u64, i64)| b.1.cmp(&a.1).then(a.0.cmp(&b.0));
    // Select the top n first (linear), then sort only those: a window is
    // emitted after every batch that touched it, with thousands of items.
    if n == 0 {
        return Vec::new();
    }
    if v.len() > n {
        v.select_nth_unstable_by(n - 1, order);
        v.truncate(n);
    }
    v.sort_unstable_by(order);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params() -> WindowParams {
        WindowParams {
            size_ms: 60_000,
            out_of_orderness_ms: 5_000,
            allowed_lateness_ms: 60_000,
        }
    }

    fn one(n: i64) -> Partial {
        Partial {
            requests: n,
            ..Default::default()
        }
    }

    #[test]
    fn partial_bytes_roundtrip_and_reject_garbage() {
        let mut p = one(3);
        p.hist = SparseHist::of_ms([12.5]);
        p.users.add(42);
        p.latency_max_ms = Some(12.5);
        let b = p.to_bytes();
        let q = Partial::from_bytes(&b).unwrap();
        assert_eq!(q.requests, 3);
        assert_eq!(q.latency_max_ms, Some(12.5));
        assert_eq!(q.hist, p.hist);
        assert_eq!(q.users, p.users);
        assert!(Partial::from_bytes(&b[..b.len() - 1]).is_none());
        assert!(Partial::from_bytes(&[2]).is_none());
        assert_eq!(
            crate::timefmt::from_hex(&crate::timefmt::to_hex(&b)).unwrap(),
            b
        );
        assert!(crate::timefmt::from_hex("abc").is_none());
    }

    #[test]
    fn stored_partial_keeps_the_histogram_bytes_and_rejects_garbage() {
        let mut p = one(5);
        p.errors = 2;
        p.latency_count = 5;
        p.latency_sum_ms = 60.0;
        p.hist = SparseHist::of_ms([3.0, 7.5, 12.5, 18.0, 19.0]);
        p.users.add(7);
        p.latency_max_ms = Some(19.0);
        let b = p.to_bytes();
        let s = StoredPartial::from_bytes(&b).unwrap();
        assert_eq!(
            (s.requests, s.errors, s.client_errors, s.latency_count),
            (p.requests, p.errors, p.client_errors, p.latency_count)
        );
        assert_eq!(s.latency_sum_ms, 60.0);
        assert_eq!(s.latency_max_ms, Some(19.0));
        assert_eq!(s.users, p.users);
        assert_eq!(s.hist, p.hist.to_bytes());
        let dense = crate::sketch::hist_from_bytes(&s.hist).unwrap();
        assert_eq!(dense.len(), 5);
        assert_eq!(SparseHist::from_dense(&dense), p.hist);
        assert!(StoredPartial::from_bytes(&b[..b.len() - 1]).is_none());
        assert!(StoredPartial::from_bytes(&[2]).is_none());
        // A damaged histogram header is caught without decoding it.
        let mut bad = b.clone();
        bad[53] ^= 0xff;
        assert!(StoredPartial::from_bytes(&bad).is_none());
        assert!(Partial::from_bytes(&bad).is_none());
    }

    #[test]
    fn snapshot_restore_continues_identically() {
        // Two copies fed the same records, one snapshotted and restored midway,
        // emit the same windows: replay from a checkpoint is deterministic.
        let recs: Vec<i64> = (0..600).map(|i| i * 1_000 - (i % 7) * 3_000).collect();
        let feed = |pw: &mut PartitionWindows, ts: &[i64]| -> Vec<(i64, i64, bool)> {
            let mut out = Vec::new();
            for &t in ts {
                let (w, c) = pw.windower.observe(pw.key, t);
                if c != Lateness::TooLate {
                    pw.table.add_partial(w, "s", &one(1));
                    pw.table.add_item_counts(w, 7, 1);
                }
                for e in pw.table.advance(pw.windower.watermark(), false) {
                    out.push((e.window_start, e.services[0].1.requests, e.is_final));
                }
            }
            out
        };
        let mut a = PartitionWindows::new(params(), 5, 3);
        let mut b = PartitionWindows::new(params(), 5, 3);
        let mut ea = feed(&mut a, &recs[..250]);
        let mut eb = feed(&mut b, &recs[..250]);
        let snap = b.snapshot();
        let json = serde_json::to_string(&snap).unwrap();
        let back: WindowSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, snap);
        let mut c = PartitionWindows::restore(params(), 5, 3, &back).unwrap();
        ea.extend(feed(&mut a, &recs[250..]));
        eb.extend(feed(&mut c, &recs[250..]));
        assert_eq!(ea, eb);
        assert!(ea.iter().any(|e| e.2));
    }

    #[test]
    fn classifies_on_time_late_too_late() {
        let mut w = Windower::new(params());
        assert_eq!(w.observe(0, 61_000), (60_000, Lateness::OnTime));
        assert_eq!(w.observe(0, 125_000), (120_000, Lateness::OnTime)); // wm = 120_000
        // window [60s,120s) ended at 120s <= wm: late, still within lateness
        assert_eq!(w.observe(0, 119_000), (60_000, Lateness::Late));
        assert_eq!(w.observe(0, 200_000).1, Lateness::OnTime); // wm = 195_000
        // end 120s + lateness 60s = 180s <= wm 195s: too late
        assert_eq!(w.observe(0, 100_000), (60_000, Lateness::TooLate));
    }

    #[test]
    fn emits_update_then_upsert_then_final() {
        let mut t = WindowTable::new(params(), 3);
        t.add_partial(0, "a", &one(2));
        assert!(t.advance(59_999, false).is_empty());
        let e = t.advance(60_000, false);
        assert_eq!(e.len(), 1);
        assert!(!e[0].is_final);
        assert_eq!(e[0].services[0].1.requests, 2);
        assert!(
            t.advance(70_000, false).is_empty(),
            "unchanged windows are not re-emitted"
        );
        t.add_partial(0, "a", &one(1)); // late event within lateness
        let e = t.advance(80_000, false);
        assert_eq!(e[0].services[0].1.requests, 3);
        let e = t.advance(120_000, false);
        assert!(e[0].is_final);
        assert_eq!(t.open_windows(), 0);
        assert!(
            !t.add_partial(0, "a", &one(1)),
            "a finalised window never reopens"
        );
    }

    #[test]
    fn watermark_is_the_minimum_over_active_partitions() {
        let mut w = Windower::with_idleness(params(), 10_000);
        w.set_partitions(&[0, 1]);
        w.observe(0, 600_000);
        assert_eq!(
            w.watermark(),
            i64::MIN,
            "partition 1 has produced nothing yet"
        );
        w.observe(1, 300_000);
        assert_eq!(w.watermark(), 295_000);
        // partition 1's older data is on time although partition 0 is far ahead
        assert_eq!(w.observe(1, 310_000).1, Lateness::OnTime);
        assert_eq!(w.watermark(), 305_000);
        // partition 1 goes quiet: after the idleness timeout partition 0 leads
        w.tick(20_000);
        assert_eq!(w.watermark(), 595_000);
        // the watermark never moves back when partition 1 speaks again
        assert_eq!(w.observe(1, 320_000).1, Lateness::TooLate);
        assert_eq!(w.watermark(), 595_000);
    }

    proptest! {
        #[test]
        fn top_n_equals_a_full_sort(
            counts in proptest::collection::vec((0u64..500, 1i64..20), 0..300),
            n in 0usize..40,
        ) {
            let mut items: HashMap<u64, i64, foldhash::fast::RandomState> = HashMap::default();
            for (k, c) in counts {
                *items.entry(k).or_default() += c;
            }
            let mut all: Vec<(u64, i64)> = items.iter().map(|(&k, &c)| (k, c)).collect();
            all.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(n);
            prop_assert_eq!(top_n(&items, n), all);
        }

        /// Each event lands in exactly one bin, the bin contains it, and the sum
        /// over final emissions equals the number of events not too late.
        #[test]
        fn every_event_counted_once(ts in proptest::collection::vec(0i64..3_600_000, 1..400)) {
            let p = params();
            let mut w = Windower::new(p);
            let mut t = WindowTable::new(p, 5);
            let mut counted = 0i64;
            let mut finals: BTreeMap<i64, i64> = BTreeMap::new();
            for &x in &ts {
                let (ws, class) = w.observe((x % 3) as i32, x);
                prop_assert!(ws <= x && x < ws + p.size_ms);
                if class != Lateness::TooLate {
                    prop_assert!(t.add_partial(ws, "s", &one(1)));
                    counted += 1;
                }
                for e in t.advance(w.watermark(), false) {
                    if e.is_final {
                        prop_assert!(finals.insert(e.window_start, e.services[0].1.requests).is_none());
                    }
                }
            }
            for e in t.advance(w.watermark(), true) {
                prop_assert!(e.is_final);
                prop_assert!(finals.insert(e.window_start, e.services[0].1.requests).is_none());
            }
            prop_assert_eq!(finals.values().sum::<i64>(), counted);
        }
    }
}
