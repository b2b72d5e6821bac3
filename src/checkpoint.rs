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

/// Where the factor model snapshots of a topic live.
pub fn reco_dir(data_dir: &Path, topic: &str) -> PathBuf {
    data_dir.join("_pulse").join("reco").join(safe_name(topic))
}

/// Checkpoint files of one topic.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

impl CheckpointStore {
    pub fn new(data_dir: &Path, topic: &str) -> Self {
        CheckpointStore {
            dir: data_dir
                .join("_pulse")
                .join("checkpoints")
                .join(safe_name(topic)),
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
        };
        st.save(&cp).unwrap();
        assert_eq!(st.load(3).unwrap().as_ref(), Some(&cp));
        cp.next_offset = 200;
        st.save(&cp).unwrap();
        assert_eq!(st.load(3).unwrap().unwrap().next_offset, 200);
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
