//! One source partition's windows (its own watermark and window table) and
//! their serialisable snapshot, which checkpoints hold. Pure.

use std::collections::BTreeMap;

use super::partial::Partial;
use super::table::{WindowState, WindowTable};
use super::watermark::{WindowParams, Windower};

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
