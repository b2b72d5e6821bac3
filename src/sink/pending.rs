//! Redis writes waiting for Redis. Consumes the aggregate store's writes
//! (each an absolute value behind a version guard, keyed by the Redis key it
//! sets) while Redis is unreachable, frozen or behind; produces them again,
//! in key order, for the writer to apply when Redis answers. Writes to the
//! same key coalesce and the newest wins, so the set holds at most one write
//! per key however long the outage: its size is bounded by the keys touched,
//! not by the events. Stream entries keep their deterministic ids, so an
//! entry queued twice (a replay) is written once. Pure: no I/O.

use std::collections::BTreeMap;

/// What a pending write sets. Keys order the flush: stream entries in id
/// order, the watermark last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum OpKey {
    /// `{p}:parts:{service}:{minute}`, field group of one source partition.
    Partial {
        service: String,
        minute: i64,
        partition: i32,
    },
    /// `{p}:stats:{service}:{minute}` (and the service and minute indexes).
    Stats { service: String, minute: i64 },
    /// `{p}:top:{minute}:p{partition}` and the window's union.
    Top { minute: i64, partition: i32 },
    /// `{p}:status:{service}`.
    Status { service: String },
    /// `{p}:drift:{service}` (an [`OpBody::Status`]-like hash, versioned by hour).
    Drift { service: String },
    /// `{p}:anomalies` entry `{window_ms}-{n}`.
    Anomaly { window_ms: i64, n: u64 },
    /// `{p}:alerts` entry `{window_ms}-{n}`.
    Alert { window_ms: i64, n: u64 },
    /// `{p}:watermark`.
    Watermark,
}

/// The value a pending write sets.
#[derive(Debug, Clone, PartialEq)]
pub enum OpBody {
    /// `epoch`: the writer's ownership epoch of the partition (0: unfenced).
    Partial {
        is_final: bool,
        bytes: Vec<u8>,
        epoch: u64,
    },
    /// Field/value pairs of the merged row (without `version`).
    Stats {
        fields: Vec<(&'static str, String)>,
    },
    /// Items with their requests, best first; the union keeps `top_n`.
    Top {
        top_n: usize,
        items: Vec<(u64, i64)>,
        epoch: u64,
    },
    Status {
        fields: Vec<(&'static str, String)>,
    },
    /// Field/value pairs of the stream entry.
    Entry {
        fields: Vec<(&'static str, String)>,
    },
    Watermark,
}

/// One write: its guard version (the partition offset, the version sum of a
/// merged row, the window of a status, the watermark itself) and its value.
#[derive(Debug, Clone, PartialEq)]
pub struct Op {
    pub version: i64,
    pub body: OpBody,
}

impl Op {
    /// What orders two writes to one key: a newer ownership epoch of the
    /// partition first (its owner replays from a checkpoint, so its
    /// versions may restart lower), then the version.
    fn rank(&self) -> (u64, i64) {
        let epoch = match &self.body {
            OpBody::Partial { epoch, .. } | OpBody::Top { epoch, .. } => *epoch,
            _ => 0,
        };
        (epoch, self.version)
    }
}

/// The coalescing set of pending writes.
#[derive(Debug, Default)]
pub struct Pending {
    map: BTreeMap<OpKey, Op>,
    peak: usize,
}

impl Pending {
    /// Queues a write: a key already queued keeps the newer version (a
    /// stream entry keeps the first: its id fixes its content).
    pub fn insert(&mut self, key: OpKey, op: Op) {
        let keep_old = match self.map.get(&key) {
            None => false,
            Some(old) => {
                matches!(key, OpKey::Anomaly { .. } | OpKey::Alert { .. }) || old.rank() > op.rank()
            }
        };
        if !keep_old {
            self.map.insert(key, op);
        }
        self.peak = self.peak.max(self.map.len());
    }

    /// Takes up to `n` writes, in key order.
    pub fn take(&mut self, n: usize) -> Vec<(OpKey, Op)> {
        let mut out = Vec::with_capacity(n.min(self.map.len()));
        while out.len() < n {
            let Some(e) = self.map.pop_first() else { break };
            out.push(e);
        }
        out
    }

    /// Puts back writes that failed, unless a newer one for the key was
    /// queued meanwhile.
    pub fn restore(&mut self, ops: Vec<(OpKey, Op)>) {
        for (k, op) in ops {
            match self.map.get(&k) {
                Some(newer) if newer.rank() >= op.rank() => {}
                _ => {
                    self.map.insert(k, op);
                }
            }
        }
        self.peak = self.peak.max(self.map.len());
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The largest size the set has had.
    pub fn peak(&self) -> usize {
        self.peak
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial(v: i64, b: u8) -> Op {
        partial_of(1, v, b)
    }

    fn partial_of(epoch: u64, v: i64, b: u8) -> Op {
        Op {
            version: v,
            body: OpBody::Partial {
                is_final: false,
                bytes: vec![b],
                epoch,
            },
        }
    }

    #[test]
    fn a_newer_owner_epoch_wins_over_a_higher_version() {
        let mut p = Pending::default();
        p.insert(key("a", 1), partial_of(1, 900, 1));
        // The new owner replays from its checkpoint: lower offsets, newer epoch.
        p.insert(key("a", 1), partial_of(2, 500, 2));
        p.insert(key("a", 1), partial_of(1, 950, 3));
        let out = p.take(10);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, partial_of(2, 500, 2));
        // A failed write of the old epoch does not displace it when put back.
        p.insert(key("a", 1), partial_of(2, 600, 4));
        p.restore(vec![(key("a", 1), partial_of(1, 990, 5))]);
        assert_eq!(p.take(10)[0].1, partial_of(2, 600, 4));
    }

    fn key(svc: &str, m: i64) -> OpKey {
        OpKey::Partial {
            service: svc.into(),
            minute: m,
            partition: 0,
        }
    }

    #[test]
    fn writes_to_one_key_coalesce_and_the_newest_wins() {
        let mut p = Pending::default();
        for v in [3, 7, 5] {
            p.insert(key("a", 60), partial(v, v as u8));
        }
        p.insert(key("b", 60), partial(1, 1));
        assert_eq!(p.len(), 2);
        let all = p.take(10);
        assert_eq!(all[0], (key("a", 60), partial(7, 7)));
        assert_eq!(all[1], (key("b", 60), partial(1, 1)));
        assert!(p.is_empty());
        assert_eq!(p.peak(), 2);
    }

    #[test]
    fn stream_entries_keep_their_first_value_and_flush_in_id_order() {
        let mut p = Pending::default();
        let entry = |s: &str| Op {
            version: 0,
            body: OpBody::Entry {
                fields: vec![("json", s.into())],
            },
        };
        p.insert(
            OpKey::Alert {
                window_ms: 120,
                n: 0,
            },
            entry("b"),
        );
        p.insert(
            OpKey::Alert {
                window_ms: 60,
                n: 1,
            },
            entry("a1"),
        );
        p.insert(
            OpKey::Alert {
                window_ms: 60,
                n: 0,
            },
            entry("a0"),
        );
        p.insert(
            OpKey::Alert {
                window_ms: 60,
                n: 0,
            },
            entry("replayed"),
        );
        p.insert(
            OpKey::Watermark,
            Op {
                version: 99,
                body: OpBody::Watermark,
            },
        );
        let keys: Vec<OpKey> = p.take(2).into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                OpKey::Alert {
                    window_ms: 60,
                    n: 0
                },
                OpKey::Alert {
                    window_ms: 60,
                    n: 1
                }
            ]
        );
        let rest = p.take(10);
        assert_eq!(
            rest[0].0,
            OpKey::Alert {
                window_ms: 120,
                n: 0
            }
        );
        assert_eq!(rest[1].0, OpKey::Watermark, "the watermark goes last");
        let mut q = Pending::default();
        q.insert(
            OpKey::Alert {
                window_ms: 60,
                n: 0,
            },
            entry("a0"),
        );
        q.insert(
            OpKey::Alert {
                window_ms: 60,
                n: 0,
            },
            entry("replayed"),
        );
        assert_eq!(q.take(1)[0].1, entry("a0"));
    }

    #[test]
    fn failed_writes_come_back_unless_a_newer_one_was_queued() {
        let mut p = Pending::default();
        p.insert(key("a", 60), partial(1, 1));
        p.insert(key("b", 60), partial(1, 1));
        let failed = p.take(10);
        p.insert(key("a", 60), partial(2, 2));
        p.restore(failed);
        let all = p.take(10);
        assert_eq!(
            all,
            [(key("a", 60), partial(2, 2)), (key("b", 60), partial(1, 1))]
        );
    }
}
