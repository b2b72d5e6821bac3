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

pub mod partial;
pub mod partition;
pub mod sql;
pub mod table;
pub mod watermark;

pub use partial::{Partial, StoredPartial};
pub use partition::{PartitionWindows, WindowSnap, WindowSnapshot};
pub use table::{WindowEmit, WindowTable};
pub use watermark::{Lateness, WindowParams, Windower};

#[cfg(test)]
mod tests {
    use super::table::top_n;
    use super::*;
    use crate::sketch::SparseHist;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, HashMap};

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
        p.types = [2, 0, 0, 1];
        let b = p.to_bytes();
        let q = Partial::from_bytes(&b).unwrap();
        assert_eq!(q.types, [2, 0, 0, 1]);
        // Format 1 (no event type counts) still reads, with zero counts.
        let mut v1 = b[..b.len() - 32].to_vec();
        v1[0] = 1;
        let old = Partial::from_bytes(&v1).unwrap();
        assert_eq!((old.requests, old.types), (3, [0; 4]));
        assert_eq!(old.hist, p.hist);
        assert!(Partial::from_bytes(&b[..b.len() - 8]).is_none());
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
