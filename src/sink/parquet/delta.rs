//! The Delta Lake transaction log of one table. Consumes files the table
//! writer made durable under their content names ([`LoggedFile`]); produces
//! atomic commits to `<table>/_delta_log/`: the files' `add` actions, a
//! `txn` per Kafka partition (the last source offset it logged) and lineage
//! in `commitInfo` (pulse's version, the schema version, the instance, the
//! offsets), compactions (`remove` + `add` with `dataChange = false` in one
//! commit) and vacuums. Guarantee: a file is in the table exactly when a
//! commit adds it, so readers of the table's snapshot never see a file twice,
//! a partial file, or a compacted hour both before and after.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::time::Duration;

use datafusion::arrow::datatypes::SchemaRef;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitBuilder, CommitProperties};
use deltalake::kernel::{Action, Add, Remove, StructType, Transaction};
use deltalake::protocol::{DeltaOperation, OutputMode, SaveMode};
use deltalake::{DeltaTable, DeltaTableError};
use url::Url;

use crate::storage::TableLocation;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta table {table}: {source}")]
    Table {
        table: String,
        source: Box<DeltaTableError>,
    },
    #[error("delta table {table}: {reason}")]
    Setup { table: String, reason: String },
}

/// The partition columns of every table (the Hive directories' names).
pub const PARTITION_COLUMNS: [&str; 2] = ["dt", "hour"];

/// A durable file, named by its content, to be added to the table.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggedFile {
    /// Path relative to the table's root: `dt=…/hour=…/part-….parquet`.
    pub path: String,
    pub hour: i64,
    /// Source partition (0 for tables without one).
    pub partition: i32,
    pub rows: usize,
    pub bytes: u64,
    /// Positions (offsets or window starts) the file covers.
    pub first: i64,
    pub last: i64,
    /// Smallest and largest value of the time column (ms).
    pub time_min: i64,
    pub time_max: i64,
}

/// A table's log: its last loaded snapshot and the files waiting for a commit.
pub struct DeltaLog {
    rt: tokio::runtime::Runtime,
    table: DeltaTable,
    name: &'static str,
    time_column: &'static str,
    /// Whether positions are source offsets (then commits carry `txn`s).
    offsets: bool,
    pending: Vec<LoggedFile>,
    /// Last offset recorded in a `txn` per source partition.
    txn: HashMap<i32, i64>,
}

/// The `dt` and `hour` partition values of an hour start.
pub fn partition_values(hour: i64) -> (String, String) {
    let t = chrono::DateTime::from_timestamp_millis(hour).unwrap_or_default();
    (t.format("%Y-%m-%d").to_string(), t.format("%H").to_string())
}

/// (hour start, partition, first, last) of a data file's path relative to the
/// table root, as the writer names it; `None` for other names.
pub fn parse_path(path: &str, positioned: bool) -> Option<(i64, i32, i64, i64)> {
    let mut parts = path.rsplitn(3, '/');
    let name = parts.next()?;
    let hour = parts.next()?.strip_prefix("hour=")?.parse::<u32>().ok()?;
    let dt = parts.next()?.rsplit('/').next()?.strip_prefix("dt=")?;
    let day = chrono::NaiveDate::parse_from_str(dt, "%Y-%m-%d").ok()?;
    let start = day.and_hms_opt(hour, 0, 0)?.and_utc().timestamp_millis();
    let range = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let mut it = range.split('-');
    let partition = if positioned {
        it.next()?.parse::<i32>().ok()?
    } else {
        0
    };
    let first = it.next()?.parse::<i64>().ok()?;
    let last = it.next()?.parse::<i64>().ok()?;
    // A compacted file's own tag (`-c…`) follows the range.
    if it.next().is_some_and(|tag| !tag.starts_with('c')) || it.next().is_some() {
        return None;
    }
    Some((start, partition, first, last))
}

fn iso_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

impl DeltaLog {
    /// Opens the table at `at`, creating it with `schema` plus the
    /// partition columns if no log is there yet.
    pub fn open(
        at: &TableLocation,
        name: &'static str,
        schema: &SchemaRef,
        time_column: &'static str,
        offsets: bool,
    ) -> Result<DeltaLog, DeltaError> {
        let setup = |reason: String| DeltaError::Setup {
            table: name.to_string(),
            reason,
        };
        if let TableLocation::Local(root) = at {
            std::fs::create_dir_all(root).map_err(|e| setup(e.to_string()))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| setup(e.to_string()))?;
        let mut fields: Vec<_> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        for c in PARTITION_COLUMNS {
            fields.push(datafusion::arrow::datatypes::Field::new(
                c,
                datafusion::arrow::datatypes::DataType::Utf8,
                false,
            ));
        }
        let full = datafusion::arrow::datatypes::Schema::new(fields);
        let delta_schema: StructType = (&full)
            .try_into_kernel()
            .map_err(|e| setup(format!("schema: {e}")))?;
        let err = |source| DeltaError::Table {
            table: name.to_string(),
            source: Box::new(source),
        };
        let table = rt.block_on(async {
            let mut attempt = 0;
            loop {
                let t = load(at).await?;
                let created = t
                    .create()
                    .with_table_name(name)
                    .with_columns(delta_schema.fields().cloned())
                    .with_partition_columns(PARTITION_COLUMNS)
                    .with_save_mode(SaveMode::Ignore)
                    .with_commit_properties(lineage_properties(Vec::new()))
                    .await;
                match created {
                    // Another instance created it at the same moment: load theirs.
                    Err(e) if attempt < 3 => {
                        attempt += 1;
                        tracing::debug!(table = name, error = %e, "creating the table raced; loading it");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => return r,
                }
            }
        });
        let mut table = table.map_err(err)?;
        // The contract gained nullable columns since the table was created:
        // the table's schema gains them too (older files read them as NULL).
        let known: BTreeSet<String> = match table.snapshot() {
            Ok(s) => s.schema().fields().map(|f| f.name().clone()).collect(),
            Err(_) => BTreeSet::new(),
        };
        let missing: Vec<_> = delta_schema
            .fields()
            .filter(|f| !known.contains(f.name()))
            .cloned()
            .collect();
        if !known.is_empty() && !missing.is_empty() {
            let names: Vec<String> = missing.iter().map(|f| f.name().clone()).collect();
            tracing::info!(table = name, columns = ?names, "adding the contract's new columns to the table");
            table = rt
                .block_on(async {
                    table
                        .add_columns()
                        .with_fields(missing)
                        .with_commit_properties(lineage_properties(Vec::new()))
                        .await
                })
                .map_err(err)?;
        }
        Ok(DeltaLog {
            rt,
            table,
            name,
            time_column,
            offsets,
            pending: Vec::new(),
            txn: HashMap::new(),
        })
    }

    fn err(&self, source: DeltaTableError) -> DeltaError {
        DeltaError::Table {
            table: self.name.to_string(),
            source: Box::new(source),
        }
    }

    /// Runs `f` on the log's runtime (for the table writer's uploads).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Loads the commits made since the last load (by any instance).
    pub fn refresh(&mut self) -> Result<(), DeltaError> {
        let r = self.rt.block_on(self.table.update_state());
        r.map_err(|e| self.err(e))
    }

    /// The table's version (`None` before its first commit is loaded).
    pub fn version(&self) -> Option<u64> {
        self.table.version()
    }

    /// Paths (relative to the table root) of the files in the loaded snapshot.
    pub fn files(&self) -> Vec<String> {
        match self.table.snapshot() {
            Ok(s) => s.log_data().iter().map(|f| f.path().to_string()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The last position logged per (hour, partition), from the snapshot's
    /// file names, with the files of each.
    pub fn positions(&self, positioned: bool) -> BTreeMap<(i64, i32), (i64, Vec<String>)> {
        let mut out: BTreeMap<(i64, i32), (i64, Vec<String>)> = BTreeMap::new();
        for path in self.files() {
            if let Some((hour, p, _, last)) = parse_path(&path, positioned) {
                let e = out.entry((hour, p)).or_insert((last, Vec::new()));
                e.0 = e.0.max(last);
                e.1.push(path);
            }
        }
        out
    }

    /// Queues a durable file for the next commit.
    pub fn stage(&mut self, f: LoggedFile) {
        self.pending.push(f);
    }

    pub fn pending(&self) -> &[LoggedFile] {
        &self.pending
    }

    /// Forgets the queued files of `partition` (its new owner writes them
    /// again; the files themselves are left for the vacuum).
    pub fn unstage(&mut self, partition: i32) -> usize {
        let before = self.pending.len();
        self.pending.retain(|f| f.partition != partition);
        self.txn.remove(&partition);
        before - self.pending.len()
    }

    fn add_action(&self, f: &LoggedFile, data_change: bool) -> Add {
        let (dt, hour) = partition_values(f.hour);
        let t = self.time_column;
        let stats = serde_json::json!({
            "numRecords": f.rows,
            "minValues": { t: iso_ms(f.time_min) },
            "maxValues": { t: iso_ms(f.time_max) },
            "nullCount": { t: 0 },
        });
        Add {
            path: f.path.clone(),
            partition_values: HashMap::from([
                ("dt".to_string(), Some(dt)),
                ("hour".to_string(), Some(hour)),
            ]),
            size: f.bytes as i64,
            modification_time: chrono::Utc::now().timestamp_millis(),
            data_change,
            stats: Some(stats.to_string()),
            ..Default::default()
        }
    }

    /// Commits the queued files in one atomic commit, with a `txn` per
    /// source partition among them. Returns the files committed.
    pub fn commit_pending(&mut self) -> Result<Vec<LoggedFile>, DeltaError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let files = std::mem::take(&mut self.pending);
        let mut actions: Vec<Action> = Vec::with_capacity(files.len());
        let mut ranges: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for f in &files {
            actions.push(Action::Add(self.add_action(f, true)));
            let r = ranges.entry(f.partition).or_insert((f.first, f.last));
            r.0 = r.0.min(f.first);
            r.1 = r.1.max(f.last);
        }
        let now = chrono::Utc::now().timestamp_millis();
        let mut txns = Vec::new();
        if self.offsets {
            for (&p, &(_, last)) in &ranges {
                let v = self.txn.get(&p).map_or(last, |&v| v.max(last));
                self.txn.insert(p, v);
                txns.push(Transaction::new_with_last_update(app_id(p), v, Some(now)));
            }
        }
        let covered: serde_json::Map<String, serde_json::Value> = ranges
            .iter()
            .map(|(p, (a, b))| (p.to_string(), serde_json::json!([a, b])))
            .collect();
        let extra = vec![
            (
                if self.offsets {
                    "pulse.offsets"
                } else {
                    "pulse.positions"
                }
                .to_string(),
                serde_json::Value::Object(covered),
            ),
            ("pulse.files".to_string(), serde_json::json!(files.len())),
        ];
        let op = DeltaOperation::StreamingUpdate {
            output_mode: OutputMode::Append,
            query_id: format!("pulse-{}", self.name),
            epoch_id: self.version().map_or(0, |v| v as i64 + 1),
        };
        let props = lineage_properties(extra).with_application_transactions(txns);
        match self.commit(actions, op, props) {
            Ok(()) => {
                metrics::counter!("pulse_delta_commits_total", "table" => self.name).increment(1);
                Ok(files)
            }
            Err(e) => {
                // Nothing was logged: they stay queued for the next try.
                self.pending = files;
                Err(e)
            }
        }
    }

    fn commit(
        &mut self,
        actions: Vec<Action>,
        op: DeltaOperation,
        props: CommitProperties,
    ) -> Result<(), DeltaError> {
        let started = std::time::Instant::now();
        let snapshot = self.table.snapshot().map_err(|e| self.err(e))?;
        let fut = CommitBuilder::from(props).with_actions(actions).build(
            Some(snapshot),
            self.table.log_store(),
            op,
        );
        let done = self.rt.block_on(async { fut.await });
        let done = done.map_err(|e| self.err(e))?;
        self.table.state = Some(done.snapshot);
        metrics::histogram!("pulse_delta_commit_seconds", "table" => self.name)
            .record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Replaces `old` (files of the snapshot) by `new`, which holds the same
    /// rows, in one commit that changes no data (`dataChange = false`).
    pub fn replace(&mut self, old: &[String], new: &LoggedFile) -> Result<(), DeltaError> {
        let now = chrono::Utc::now().timestamp_millis();
        let sizes: HashMap<String, i64> = match self.table.snapshot() {
            Ok(s) => s
                .log_data()
                .iter()
                .map(|f| (f.path().to_string(), f.size()))
                .collect(),
            Err(_) => HashMap::new(),
        };
        let (dt, hour) = partition_values(new.hour);
        let mut actions: Vec<Action> = old
            .iter()
            .map(|p| {
                Action::Remove(Remove {
                    path: p.clone(),
                    data_change: false,
                    deletion_timestamp: Some(now),
                    extended_file_metadata: Some(true),
                    partition_values: Some(HashMap::from([
                        ("dt".to_string(), Some(dt.clone())),
                        ("hour".to_string(), Some(hour.clone())),
                    ])),
                    size: sizes.get(p).copied(),
                    ..Default::default()
                })
            })
            .collect();
        actions.push(Action::Add(self.add_action(new, false)));
        let op = DeltaOperation::Optimize {
            predicate: Some(format!("dt = '{dt}' AND hour = '{hour}'")),
            target_size: new.bytes as i64,
        };
        let extra = vec![(
            "pulse.compacted".to_string(),
            serde_json::json!({ "files": old.len(), "partition": new.partition }),
        )];
        self.commit(actions, op, lineage_properties(extra))?;
        metrics::counter!("pulse_delta_compactions_total", "table" => self.name).increment(1);
        Ok(())
    }

    /// Deletes files that left the table more than `retention` ago, and
    /// files never logged that are older than it. Returns how many.
    pub fn vacuum(&mut self, retention: Duration) -> Result<usize, DeltaError> {
        let table = self.table.clone();
        let r = self.rt.block_on(async move {
            table
                .vacuum()
                .with_retention_period(
                    chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7)),
                )
                .with_enforce_retention_duration(false)
                // Full: also the files no commit ever added (a crash between
                // a file's rename and its commit), not only tombstoned ones.
                .with_mode(deltalake::operations::vacuum::VacuumMode::Full)
                .with_commit_properties(lineage_properties(Vec::new()))
                .await
        });
        let (table, m) = r.map_err(|e| self.err(e))?;
        self.table = table;
        Ok(m.files_deleted.len())
    }
}

/// The table at `at`, loaded if it has a log (else still to be created).
pub async fn load(at: &TableLocation) -> Result<DeltaTable, DeltaTableError> {
    match at {
        TableLocation::Local(root) => {
            let abs =
                std::path::absolute(root).map_err(|e| DeltaTableError::Generic(e.to_string()))?;
            let url = Url::from_directory_path(&abs)
                .map_err(|_| DeltaTableError::InvalidTableLocation(abs.display().to_string()))?;
            DeltaTable::try_from_url(url).await
        }
        TableLocation::Remote(r) => {
            // object_store's S3 client from the environment; commits are
            // conditional PUTs (If-None-Match), safe among several writers.
            let prefixed: deltalake::logstore::ObjectStoreRef = Arc::new(
                object_store::prefix::PrefixStore::new(r.store.clone(), r.prefix.as_str()),
            );
            let log_store = deltalake::logstore::default_logstore(
                prefixed,
                r.store.clone(),
                &r.url,
                &deltalake::logstore::StorageConfig::default(),
            );
            let mut t = DeltaTable::new(log_store);
            match t.load().await {
                Ok(()) | Err(DeltaTableError::NotATable(_)) => Ok(t),
                Err(e) => Err(e),
            }
        }
    }
}

/// `txn` application id of a source partition.
pub fn app_id(partition: i32) -> String {
    format!("pulse-partition-{partition}")
}

/// Commit properties carrying pulse's lineage in `commitInfo`.
fn lineage_properties(extra: Vec<(String, serde_json::Value)>) -> CommitProperties {
    let mut meta = vec![
        (
            "pulse.writer".to_string(),
            serde_json::json!(format!("pulse {}", env!("CARGO_PKG_VERSION"))),
        ),
        (
            "pulse.schema_version".to_string(),
            serde_json::json!(crate::model::TABLE_SCHEMA_VERSION),
        ),
        (
            "pulse.instance".to_string(),
            serde_json::json!(crate::timefmt::instance_label()),
        ),
    ];
    meta.extend(extra);
    CommitProperties::default()
        .with_metadata(meta)
        .with_max_retries(100)
}

/// Paths (relative to `table_root`) of the files in a table's latest
/// snapshot, or `None` if no Delta log is there.
pub fn snapshot_files(table_root: &Path) -> Option<Vec<String>> {
    if !table_root.join("_delta_log").is_dir() {
        return None;
    }
    snapshot_files_at(&TableLocation::Local(table_root.to_path_buf()))
}

/// [`snapshot_files`] of a table anywhere (callable from async code too:
/// it loads the table on a thread of its own).
pub fn snapshot_files_at(at: &TableLocation) -> Option<Vec<String>> {
    std::thread::scope(|s| s.spawn(|| load_files(at)).join().ok().flatten())
}

fn load_files(at: &TableLocation) -> Option<Vec<String>> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    let table = rt.block_on(load(at)).ok()?;
    table.version()?;
    let files = table
        .snapshot()
        .ok()?
        .log_data()
        .iter()
        .map(|f| f.path().to_string())
        .collect();
    Some(files)
}

/// The files a local table's JSON commits added as new data
/// (`dataChange`), each with its commit file's modification time (ms).
pub fn data_adds(table_root: &Path) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(table_root.join("_delta_log")) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let at = e
            .metadata()
            .ok()
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let Ok(text) = std::fs::read_to_string(&p) else {
            continue;
        };
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let add = &v["add"];
            if add["dataChange"].as_bool() == Some(true)
                && let Some(path) = add["path"].as_str()
            {
                out.push((at, path.to_string()));
            }
        }
    }
    out
}

/// Files written → files in the table, per (hour, partition).
pub type FileCounts = BTreeMap<(i64, i32), (usize, usize)>;

/// Per (hour, partition) of a local table with source partitions: how many
/// files its commits added as new data (`dataChange`), and how many its
/// latest snapshot holds (fewer once compacted). From the log's JSON commits.
pub fn file_counts(table_root: &Path) -> FileCounts {
    let mut out = FileCounts::new();
    let key = |path: &str| parse_path(path, true).map(|k| (k.0, k.1));
    for (_, path) in data_adds(table_root) {
        if let Some(k) = key(&path) {
            out.entry(k).or_default().0 += 1;
        }
    }
    for f in snapshot_files(table_root).unwrap_or_default() {
        if let Some(k) = key(&f) {
            out.entry(k).or_default().1 += 1;
        }
    }
    out
}

/// Keys (hour, partition) with more than one file, from [`DeltaLog::positions`].
pub fn fragmented(positions: &BTreeMap<(i64, i32), (i64, Vec<String>)>) -> BTreeSet<(i64, i32)> {
    positions
        .iter()
        .filter(|(_, (_, files))| files.len() > 1)
        .map(|(k, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_into_hour_partition_and_range() {
        let p =
            "dt=2026-12-07/hour=05/part-00003-00000000000000000010-00000000000000000042.parquet";
        let hour = chrono::NaiveDate::from_ymd_opt(2026, 12, 7)
            .unwrap()
            .and_hms_opt(5, 0, 0)
            .unwrap()
            .and_utc()
            .timestamp_millis();
        assert_eq!(parse_path(p, true), Some((hour, 3, 10, 42)));
        let q = "dt=2026-12-07/hour=05/part-00000000000000000010-00000000000000000042.parquet";
        assert_eq!(parse_path(q, false), Some((hour, 0, 10, 42)));
        assert_eq!(parse_path(q, true), None, "no partition in the name");
        let c = "dt=2026-12-07/hour=05/part-00003-00000000000000000010-00000000000000000042-c1a2b3.parquet";
        assert_eq!(
            parse_path(c, true),
            Some((hour, 3, 10, 42)),
            "a compacted file"
        );
        assert_eq!(parse_path("dt=x/hour=05/part-1-2-3.parquet", true), None);
        assert_eq!(
            partition_values(hour),
            ("2026-12-07".to_string(), "05".to_string())
        );
        assert_eq!(hour % 3_600_000, 0);
    }
}
