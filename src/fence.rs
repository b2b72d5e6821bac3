//! Ownership epochs of source partitions: what keeps an instance that lost a
//! partition (frozen past the group's session timeout, cut off from the
//! broker) from writing for it after another instance took it over.
//!
//! Consumes assignments (the Kafka source claims an epoch for each partition
//! it is given, before it reads the partition's checkpoint) and the checks of
//! the stages that write for a partition; produces one empty marker file per
//! claim under `<data_dir>/_pulse/epochs/<topic>/partition-NNNNN/`, named by
//! the epoch, created exclusively (so two instances never hold the same
//! epoch) and holding the claimer's process id and instance id. The instance holds partition `p` while no marker above its own
//! exists. Every checkpoint save and Parquet commit made for `p` first checks
//! that it still holds `p`, and its Redis writes carry the epoch for Redis
//! to refuse when a newer owner has written (see `sink::redis_sink`).
//!
//! Guarantee: once the new owner has claimed its epoch (before it reads the
//! checkpoint and the committed files it resumes from), a write the old
//! owner starts for the partition is refused, counted
//! (`pulse_fenced_writes_total`) and logged, and the old owner drops the
//! partition until the group gives it back. A shared POSIX directory offers
//! no conditional rename, so a write already past its check when the old
//! owner froze can still land: that window is the few microseconds between
//! the check and the rename.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How many markers of a partition are kept (older ones are removed).
const KEEP: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error("epoch marker I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The epochs this instance holds, and where every instance's claims live.
#[derive(Debug)]
pub struct Fence {
    dir: PathBuf,
    mine: Mutex<BTreeMap<i32, u64>>,
}

impl Fence {
    pub fn new(data_dir: &Path, topic: &str) -> Self {
        Fence {
            dir: crate::checkpoint::pulse_dir(data_dir, "epochs", topic),
            mine: Mutex::new(BTreeMap::new()),
        }
    }

    fn part_dir(&self, p: i32) -> PathBuf {
        self.dir.join(format!("partition-{p:05}"))
    }

    /// The epochs claimed so far for partition `p`, ascending.
    fn claimed(&self, p: i32) -> Result<Vec<u64>, FenceError> {
        let dir = self.part_dir(p);
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(FenceError::Io { path: dir, source }),
        };
        let mut out: Vec<u64> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    /// Claims the next epoch of partition `p` for this instance: every
    /// earlier owner is fenced from now on.
    pub fn claim(&self, p: i32) -> Result<u64, FenceError> {
        let dir = self.part_dir(p);
        std::fs::create_dir_all(&dir).map_err(|source| FenceError::Io {
            path: dir.clone(),
            source,
        })?;
        let mut next = self.claimed(p)?.last().copied().unwrap_or(0) + 1;
        loop {
            let path = dir.join(format!("{next:020}"));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    // Who holds it, for operators: process id and instance id.
                    use std::io::Write;
                    let _ = writeln!(f, "{}", crate::timefmt::instance_label());
                    break;
                }
                // Another instance claimed it first: the next one is ours.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => next += 1,
                Err(source) => return Err(FenceError::Io { path, source }),
            }
        }
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        let all = self.claimed(p)?;
        for old in all.iter().take(all.len().saturating_sub(KEEP)) {
            let _ = std::fs::remove_file(dir.join(format!("{old:020}")));
        }
        self.mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p, next);
        metrics::gauge!("pulse_partition_epoch", "partition" => p.to_string()).set(next as f64);
        Ok(next)
    }

    /// The epoch this instance claimed for `p` (0: never claimed).
    pub fn epoch(&self, p: i32) -> u64 {
        self.mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&p)
            .copied()
            .unwrap_or(0)
    }

    /// Whether this instance still holds `p`: it claimed it and no later
    /// claim exists. A write for `p` that finds it lost is refused and
    /// counted under `target`. Unreadable markers count as held (a disk
    /// fault shows at the write itself).
    pub fn holds(&self, p: i32, target: &'static str) -> bool {
        let mine = self.epoch(p);
        if mine == 0 {
            return true;
        }
        let newest = match self.claimed(p) {
            Ok(c) => c.last().copied().unwrap_or(0),
            Err(_) => return true,
        };
        if newest <= mine {
            return true;
        }
        metrics::counter!("pulse_fenced_writes_total", "target" => target).increment(1);
        tracing::warn!(
            partition = p,
            epoch = mine,
            newer = newest,
            target,
            "write refused: another instance took this partition over"
        );
        false
    }

    /// Forgets `p` (revoked or lost).
    pub fn release(&self, p: i32) {
        self.mine
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_claim_fences_the_older_owner() {
        let dir = tempfile::tempdir().unwrap();
        let a = Fence::new(dir.path(), "events");
        let b = Fence::new(dir.path(), "events");
        assert!(a.holds(3, "test"), "an unclaimed partition is not fenced");
        assert_eq!(a.claim(3).unwrap(), 1);
        assert!(a.holds(3, "test"));
        assert_eq!(b.claim(3).unwrap(), 2);
        assert!(!a.holds(3, "test"), "the older owner must be refused");
        assert!(b.holds(3, "test"));
        // Other partitions are independent.
        assert_eq!(a.claim(4).unwrap(), 1);
        assert!(a.holds(4, "test"));
        // Taking it back fences the other one.
        assert_eq!(a.claim(3).unwrap(), 3);
        assert!(a.holds(3, "test"));
        assert!(!b.holds(3, "test"));
        assert_eq!(a.epoch(3), 3);
        a.release(3);
        assert_eq!(a.epoch(3), 0);
    }

    #[test]
    fn old_markers_are_pruned_and_epochs_keep_growing() {
        let dir = tempfile::tempdir().unwrap();
        let f = Fence::new(dir.path(), "t");
        let mut last = 0;
        for _ in 0..(KEEP + 5) {
            let e = f.claim(0).unwrap();
            assert!(e > last);
            last = e;
        }
        assert_eq!(last, (KEEP + 5) as u64);
        assert_eq!(f.claimed(0).unwrap().len(), KEEP);
    }
}
