//! Per-partition checkpoints: what pulse needs to resume a source partition
//! exactly where its durable effects end. Consumes the state of one
//! partition (window state, pending `minute_stats`/`top_items` rows of hours
//! not yet closed, positions); produces one JSON file per partition under
//! `<data_dir>/_pulse/checkpoints/<topic>/`, written under a temporary name,
//! synced and renamed, so a checkpoint is either the old or the new one.
//!
//! Guarantee: every effect of the partition's records before `next_offset`
//! is either durable (committed Parquet files, guarded Redis writes) or held
//! in this checkpoint; records from `replay_from` to `next_offset` are read
//! again only to rebuild the `events`/`dead_letters` files that were still
//! open, with the lateness classification they had (`replay_max_ts`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::model::{MinuteRow, TopItemRow};
use crate::window::WindowSnapshot;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("checkpoint {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The state of one source partition at a batch boundary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionCheckpoint {
    pub topic: String,
    pub partition: i32,
    /// First offset whose effects are not in this state.
    pub next_offset: i64,
    /// Where reading resumes: the first offset of the oldest `events` or
    /// `dead_letters` file still open at checkpoint time (≤ `next_offset`).
    pub replay_from: i64,
    /// The partition's max event time before `replay_from`.
    pub replay_max_ts: Option<i64>,
    pub windows: WindowSnapshot,
    /// Final rows of hours not yet closed (written when the hour closes).
    pub pending_stats: Vec<MinuteRow>,
    /// `top_items` rows of hours not yet closed.
    pub pending_top: Vec<TopItemRow>,
    pub written_ms: i64,
    /// Services the partition's records admitted under
    /// `validation.max_services` (possibly a few records past `next_offset`:
    /// the set only grows, so a replay still decides every record as before).
    #[serde(default)]
    pub services: Vec<String>,
    /// Partition 0 only (its owner scores): where scoring stands.
    #[serde(default)]
    pub scorer: Option<ScorerCheckpoint>,
}

/// Where anomaly scoring stands, saved with partition 0's checkpoint. The
/// detectors themselves are in [`CheckpointStore::save_detectors`]' file,
/// written with it whenever they scored something new.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScorerCheckpoint {
    /// The last window scored.
    pub scored_upto: i64,
    /// Merged rows of windows not scored yet (complete windows wait for
    /// the watermark; a partition may have closed them already).
    pub unscored: Vec<MinuteRow>,
}

impl crate::decode::stage::AdmittedIn for PartitionCheckpoint {
    fn admitted_services(&self) -> &[String] {
        &self.services
    }
}

/// Writes `bytes` to `dir/name` atomically and durably (temporary file,
/// fsync, rename, directory fsync).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CheckpointError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", crate::timefmt::instance_id()));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A topic name made safe as a directory name.
fn safe_name(topic: &str) -> String {
    topic
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `<data_dir>/_pulse/<kind>/<topic>`: where pulse keeps a topic's state of one kind.
pub fn pulse_dir(data_dir: &Path, kind: &str, topic: &str) -> PathBuf {
    data_dir.join("_pulse").join(kind).join(safe_name(topic))
}

/// Where the factor model snapshots of a topic live.
pub fn reco_dir(data_dir: &Path, topic: &str) -> PathBuf {
    pulse_dir(data_dir, "reco", topic)
}

/// Checkpoint files of one topic.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
    /// `<data_dir>/_pulse/detect/<topic>`: the detectors' state.
    detect: PathBuf,
}

impl CheckpointStore {
    pub fn new(data_dir: &Path, topic: &str) -> Self {
        CheckpointStore {
            dir: pulse_dir(data_dir, "checkpoints", topic),
            detect: pulse_dir(data_dir, "detect", topic),
        }
    }

    fn path(&self, partition: i32) -> PathBuf {
        self.dir.join(format!("partition-{partition:05}.json"))
    }

    /// The partition's checkpoint, `None` if it never had one.
    pub fn load(&self, partition: i32) -> Result<Option<PartitionCheckpoint>, CheckpointError> {
        let path = self.path(partition);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(CheckpointError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| CheckpointError::Corrupt { path, source })
    }

    /// The detectors' state file (see [`ScorerCheckpoint`]).
    fn detectors_name() -> &'static str {
        "detectors.cbor"
    }

    /// Replaces the detectors' state (already encoded) atomically and durably.
    pub fn save_detectors(&self, bytes: &[u8]) -> Result<(), CheckpointError> {
        write_atomic(&self.detect, Self::detectors_name(), bytes)
    }

    /// The detectors' state last saved, `None` if never.
    pub fn load_detectors(&self) -> Result<Option<Vec<u8>>, CheckpointError> {
        let path = self.detect.join(Self::detectors_name());
        match std::fs::read(&path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(CheckpointError::Io { path, source }),
        }
    }

    /// Replaces the partition's checkpoint atomically and durably.
    pub fn save(&self, cp: &PartitionCheckpoint) -> Result<(), CheckpointError> {
        let path = self.path(cp.partition);
        let body = serde_json::to_vec(cp).map_err(|source| CheckpointError::Corrupt {
            path: path.clone(),
            source,
        })?;
        write_atomic(
            &self.dir,
            &format!("partition-{:05}.json", cp.partition),
            &body,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_load_roundtrip_and_replace() {
        let dir = tempfile::tempdir().unwrap();
        let st = CheckpointStore::new(dir.path(), "ev/ents");
        assert_eq!(st.load(3).unwrap(), None);
        let mut cp = PartitionCheckpoint {
            topic: "ev/ents".into(),
            partition: 3,
            next_offset: 100,
            replay_from: 40,
            replay_max_ts: Some(5),
            windows: WindowSnapshot {
                max_ts: Some(9),
                watermark: 4,
                finalised_upto: 0,
                windows: vec![],
            },
            pending_stats: vec![],
            pending_top: vec![(60_000, 1, 7, 3).into()],
            written_ms: 1,
            services: vec!["checkout".into()],
            scorer: Some(ScorerCheckpoint {
                scored_upto: 120_000,
                unscored: vec![],
            }),
        };
        st.save(&cp).unwrap();
        assert_eq!(st.load(3).unwrap().as_ref(), Some(&cp));
        cp.next_offset = 200;
        st.save(&cp).unwrap();
        assert_eq!(st.load(3).unwrap().unwrap().next_offset, 200);
        assert_eq!(st.load_detectors().unwrap(), None);
        st.save_detectors(b"state").unwrap();
        assert_eq!(st.load_detectors().unwrap().as_deref(), Some(&b"state"[..]));
        // no temporary file is left behind
        let names: Vec<_> = std::fs::read_dir(dir.path().join("_pulse/checkpoints/ev_ents"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::write(st.path(3), b"{").unwrap();
        assert!(matches!(st.load(3), Err(CheckpointError::Corrupt { .. })));
    }
}
