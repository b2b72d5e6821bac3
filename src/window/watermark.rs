//! Event-time bins, lateness classes and watermarks: per input partition
//! like Flink's, the minimum over the partitions that are not idle, minus
//! the out-of-orderness bound, never moving backwards. Pure.

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
pub(super) struct PartState {
    pub(super) key: i32,
    pub(super) max_ts: Option<i64>,
    pub(super) last_seen_ms: i64,
    pub(super) idle: bool,
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
    pub(super) idle_ms: i64,
    pub(super) parts: Vec<PartState>,
    pub(super) now_ms: i64,
    pub(super) wm: i64,
    pub(super) max_ts: Option<i64>,
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

    pub(super) fn part(&mut self, key: i32) -> usize {
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

    pub(super) fn recompute(&mut self) {
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
