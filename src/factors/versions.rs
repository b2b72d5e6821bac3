//! The fleet's factor model as versions, and the rollback pin.
//!
//! Consumes the model writer's snapshots (every `reco.version_ms` of its
//! term and at its stop, when the model learned something since); produces
//! `<data_dir>/_pulse/reco/<topic>/versions/v<version>.cbor` (the snapshot)
//! and `v<version>.json` (its [`ModelVersion`] record: events learned, the
//! live quality figures at the time, lineage), keeping the newest
//! `reco.keep_versions` and the pinned one. A version is the number of
//! events the model had learned, the same number as `{p}:reco:meta`
//! `version` while it was served.
//!
//! Rollback is a pin in Redis, `{p}:reco:pin` = a version: the model writer
//! reads it every `reco.flush_ms`, loads that version and replaces the
//! served model with it in one switch (it goes on learning the live model,
//! unpublished); removing the pin replaces it with the live model again.
//!
//! Guarantee: a version's model is written (atomically) before its record,
//! so every listed version loads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why versions could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("model versions in {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("model version record {path}: {source}")]
    Record {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no model version {0} is kept (see `pulse model list`)")]
    Unknown(u64),
    #[error(transparent)]
    Write(#[from] crate::checkpoint::CheckpointError),
}

/// One recorded model version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Events the model had learned: its version.
    pub version: u64,
    /// When it was recorded (Unix ms).
    pub saved_ms: i64,
    pub users: usize,
    pub items: usize,
    /// The next offset per Kafka partition the model covers.
    pub offsets: BTreeMap<i32, i64>,
    /// The live model's prequential figures over its last scored samples.
    pub quality_samples: usize,
    pub recall_at_10: f64,
    pub ndcg_at_10: f64,
    pub popularity_recall_at_10: f64,
    pub popularity_ndcg_at_10: f64,
    /// Lineage: the writer instance, its lease token, pulse's version.
    pub instance: String,
    pub token: u64,
    pub pulse_version: String,
}

/// The versions directory of one topic's model.
#[derive(Debug, Clone)]
pub struct Versions {
    dir: PathBuf,
    keep: usize,
}

fn model_name(version: u64) -> String {
    format!("v{version:020}.cbor")
}

fn record_name(version: u64) -> String {
    format!("v{version:020}.json")
}

impl Versions {
    /// `<reco_dir>/versions`, keeping the newest `keep` (at least one).
    pub fn new(reco_dir: &Path, keep: usize) -> Self {
        Versions {
            dir: reco_dir.join("versions"),
            keep: keep.max(1),
        }
    }

    /// The versions of `cfg`'s topic.
    pub fn of(cfg: &crate::config::Config) -> Self {
        Self::new(
            &crate::checkpoint::reco_dir(&cfg.parquet.state_dir(), &cfg.kafka.topic),
            cfg.reco.keep_versions,
        )
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records a version: its model, then its record; then drops the
    /// oldest past `keep`, never `protect` (the pinned one).
    pub fn record(
        &self,
        v: &ModelVersion,
        model: &[u8],
        protect: Option<u64>,
    ) -> Result<(), VersionError> {
        crate::checkpoint::write_atomic(&self.dir, &model_name(v.version), model)?;
        let json = serde_json::to_vec_pretty(v).map_err(|source| VersionError::Record {
            path: self.dir.join(record_name(v.version)),
            source,
        })?;
        crate::checkpoint::write_atomic(&self.dir, &record_name(v.version), &json)?;
        self.prune(protect)
    }

    /// Every kept version, oldest first.
    pub fn list(&self) -> Result<Vec<ModelVersion>, VersionError> {
        let io = |source| VersionError::Io {
            path: self.dir.clone(),
            source,
        };
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut out = Vec::new();
        for entry in rd {
            let path = entry.map_err(io)?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if !(name.starts_with('v') && name.ends_with(".json")) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| VersionError::Io {
                path: path.clone(),
                source,
            })?;
            let v: ModelVersion = serde_json::from_slice(&bytes)
                .map_err(|source| VersionError::Record { path, source })?;
            out.push(v);
        }
        out.sort_by_key(|v| v.version);
        Ok(out)
    }

    /// The newest version recorded, if any.
    pub fn latest(&self) -> Option<u64> {
        self.list().ok()?.last().map(|v| v.version)
    }

    /// A kept version's model snapshot.
    pub fn load(&self, version: u64) -> Result<Vec<u8>, VersionError> {
        let path = self.dir.join(model_name(version));
        match std::fs::read(&path) {
            Ok(b) if self.dir.join(record_name(version)).exists() => Ok(b),
            Ok(_) => Err(VersionError::Unknown(version)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(VersionError::Unknown(version))
            }
            Err(source) => Err(VersionError::Io { path, source }),
        }
    }

    fn prune(&self, protect: Option<u64>) -> Result<(), VersionError> {
        let all = self.list()?;
        let excess = all.len().saturating_sub(self.keep);
        for v in all
            .iter()
            .take(excess)
            .filter(|v| Some(v.version) != protect)
        {
            // The record first: a listed version always has its model.
            for name in [record_name(v.version), model_name(v.version)] {
                let path = self.dir.join(name);
                if let Err(source) = std::fs::remove_file(&path)
                    && source.kind() != std::io::ErrorKind::NotFound
                {
                    return Err(VersionError::Io { path, source });
                }
            }
        }
        Ok(())
    }
}

/// `{p}:reco:pin`: the version served instead of the live model.
pub fn pin_key(prefix: &str) -> String {
    format!("{prefix}:reco:pin")
}

/// The pinned version (`None`: the live model is served).
pub async fn read_pin(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
    timeout: Duration,
) -> Result<Option<u64>, String> {
    let mut cmd = redis::cmd("GET");
    cmd.arg(pin_key(prefix));
    match tokio::time::timeout(timeout, cmd.query_async::<Option<String>>(conn)).await {
        Ok(Ok(v)) => Ok(v.and_then(|s| s.trim().parse().ok())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no reply within {} ms", timeout.as_millis())),
    }
}

/// Pins `version` (or, with `None`, goes back to the live model).
pub async fn set_pin(
    conn: &mut redis::aio::ConnectionManager,
    prefix: &str,
    version: Option<u64>,
) -> redis::RedisResult<()> {
    match version {
        Some(v) => {
            redis::cmd("SET")
                .arg(pin_key(prefix))
                .arg(v)
                .exec_async(conn)
                .await
        }
        None => {
            redis::cmd("DEL")
                .arg(pin_key(prefix))
                .exec_async(conn)
                .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(v: u64) -> ModelVersion {
        ModelVersion {
            version: v,
            saved_ms: 1_700_000_000_000 + v as i64,
            users: 3,
            items: 4,
            offsets: BTreeMap::from([(0, v as i64)]),
            quality_samples: 10,
            recall_at_10: 0.2,
            ndcg_at_10: 0.1,
            popularity_recall_at_10: 0.1,
            popularity_ndcg_at_10: 0.05,
            instance: "i".into(),
            token: 1,
            pulse_version: "0".into(),
        }
    }

    #[test]
    fn versions_are_listed_in_order_loaded_and_pruned_except_the_pinned_one() {
        let dir = tempfile::tempdir().unwrap();
        let vs = Versions::new(dir.path(), 2);
        assert!(vs.list().unwrap().is_empty());
        assert_eq!(vs.latest(), None);
        vs.record(&version(100), b"m100", None).unwrap();
        vs.record(&version(300), b"m300", None).unwrap();
        vs.record(&version(200), b"m200", Some(100)).unwrap();
        // Three kept: the one past `keep` is the oldest, and it is pinned.
        let listed: Vec<u64> = vs.list().unwrap().iter().map(|v| v.version).collect();
        assert_eq!(listed, vec![100, 200, 300]);
        assert_eq!(vs.list().unwrap()[1], version(200));
        assert_eq!(vs.load(300).unwrap(), b"m300");
        vs.record(&version(400), b"m400", None).unwrap();
        let listed: Vec<u64> = vs.list().unwrap().iter().map(|v| v.version).collect();
        assert_eq!(
            listed,
            vec![300, 400],
            "the newest two once nothing is pinned"
        );
        assert!(matches!(vs.load(100), Err(VersionError::Unknown(100))));
        assert_eq!(vs.latest(), Some(400));
        let left = std::fs::read_dir(vs.dir()).unwrap().count();
        assert_eq!(left, 4, "a model and a record per kept version");
    }
}
