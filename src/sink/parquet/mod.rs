//! Hive-partitioned Parquet tables. Consumes `RecordBatch`es of one table;
//! produces zstd Parquet files under `<data_dir>/<table>/dt=YYYY-MM-DD/hour=HH/`.
//! Each file is written under a name readers ignore (`.inprogress-…`), synced,
//! and renamed into place, so no reader ever sees a partial file. Final names
//! are deterministic from the content: source partition and first/last source
//! offset (events, dead letters) or first/last window (aggregates); a rename
//! whose target exists is treated as already done, so re-committing the same
//! content after a crash is harmless. The covered positions are also stored in
//! the file's key-value metadata (`pulse.*`). Files roll by row count, when
//! their hour is closed, or at the end of input.
//!
//! Replays are harmless: per (hour, source partition) the writer knows the
//! last position already committed (its own commits, or the names of the files
//! found in the hour's directory on first use) and skips rows at or below it,
//! so a file never overlaps a committed one, whatever was in flight at a crash.

pub mod delta;
pub mod stage;

use std::collections::HashMap;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::{
    DataType, Int32Type, Int64Type, SchemaRef, TimestampMillisecondType,
};
use datafusion::arrow::record_batch::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    #[error("parquet I/O on {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parquet encoding: {0}")]
    Encode(#[from] parquet::errors::ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error("batch lacks column {0}")]
    Column(String),
    #[error(transparent)]
    Delta(#[from] delta::DeltaError),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

/// How a table is partitioned and named.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub name: &'static str,
    pub schema: SchemaRef,
    /// Timestamp column (ms) that picks the dt/hour partition.
    pub time_column: &'static str,
    /// Whether rows carry `src_partition` (files are then per source partition).
    pub positioned: bool,
    /// Int64 or timestamp column that orders a partition's rows (the source
    /// offset, or the window start); file names and the replay skip use it.
    pub position_column: &'static str,
    /// Columns written without a dictionary: those whose values rarely
    /// repeat (ids, offsets, timestamps), where it would only fill up and be
    /// abandoned, and `src_partition`, one value per file, where looking each
    /// row up in it costs more than bit-packed differences of zero.
    pub plain_columns: &'static [&'static str],
}

/// One file made visible.
#[derive(Debug, Clone, PartialEq)]
pub struct WrittenFile {
    pub path: PathBuf,
    pub rows: usize,
    pub bytes: u64,
}

struct OpenFile {
    writer: ArrowWriter<BufWriter<File>>,
    dir: PathBuf,
    tmp: PathBuf,
    rows: usize,
    first: i64,
    last: i64,
    time_min: i64,
    time_max: i64,
    opened: std::time::Instant,
}

/// Writer of one table; open files are keyed by (hour start, source partition).
pub struct TableWriter {
    root: PathBuf,
    spec: TableSpec,
    props: WriterProperties,
    max_file_rows: usize,
    /// Most bytes the open files may hold in unwritten row groups together.
    buffer_bytes: usize,
    open: HashMap<(i64, i32), OpenFile>,
    written: Vec<WrittenFile>,
    seq: u64,
    /// Last committed position per (hour, partition), once looked up.
    committed: HashMap<(i64, i32), Option<i64>>,
    /// Rows skipped because a committed file already holds them.
    pub skipped: u64,
    /// Kafka: partitions' ownership epochs; a commit for a partition another
    /// instance took over is refused (the file is deleted unpublished).
    fence: Option<Arc<crate::fence::Fence>>,
    /// Files refused that way.
    pub fenced: u64,
    /// Delta: the table's log; files are in the table once it commits them.
    log: Option<delta::DeltaLog>,
    /// Delta: last position per (hour, partition) in the loaded snapshot.
    logged: std::collections::BTreeMap<(i64, i32), i64>,
    /// Delta: files in the table per (hour, partition), as far as this
    /// writer knows (its snapshot and its own commits).
    file_count: HashMap<(i64, i32), usize>,
    /// Delta: (hour, partition)s holding more than one file: to compact.
    fragmented: std::collections::BTreeSet<(i64, i32)>,
    /// Object storage: where the table lives (files are written under
    /// `root`, a local staging directory, then uploaded).
    remote: Option<crate::storage::Remote>,
}

const HOUR_MS: i64 = 3_600_000;

/// `dt=YYYY-MM-DD/hour=HH` of an epoch-ms time.
pub fn partition_dir(ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default();
    format!("dt={}/hour={}", t.format("%Y-%m-%d"), t.format("%H"))
}

impl TableWriter {
    pub fn new(
        data_dir: &Path,
        spec: TableSpec,
        row_group_rows: usize,
        max_file_rows: usize,
        zstd_level: i32,
    ) -> Result<Self, ParquetError> {
        let level = ZstdLevel::try_new(zstd_level)?;
        let mut props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(level))
            .set_max_row_group_row_count(Some(row_group_rows.max(1)));
        for c in spec.plain_columns {
            props = props.set_column_dictionary_enabled((*c).into(), false);
            // Ids, offsets and times mostly grow: stored as bit-packed
            // differences they shrink to a few bits a value before zstd sees them.
            let integer = spec.schema.field_with_name(c).is_ok_and(|f| {
                f.data_type().is_integer() || matches!(f.data_type(), DataType::Timestamp(..))
            });
            if integer {
                props = props.set_column_encoding((*c).into(), Encoding::DELTA_BINARY_PACKED);
            }
        }
        let props = props.build();
        Ok(TableWriter {
            root: data_dir.join(spec.name),
            spec,
            props,
            max_file_rows: max_file_rows.max(1),
            buffer_bytes: usize::MAX,
            open: HashMap::new(),
            written: Vec::new(),
            seq: 0,
            committed: HashMap::new(),
            skipped: 0,
            fence: None,
            fenced: 0,
            log: None,
            logged: Default::default(),
            file_count: HashMap::new(),
            fragmented: Default::default(),
            remote: None,
        })
    }

    /// Makes the table a Delta Lake table (created if absent): files enter
    /// it by [`TableWriter::commit_log`], and the replay skip reads the
    /// positions its snapshot holds instead of the directory.
    pub fn with_delta(self) -> Result<Self, ParquetError> {
        self.with_delta_at(None)
    }

    /// [`TableWriter::with_delta`], the table living at `remote` when given:
    /// files are then written under the writer's directory (local staging)
    /// and uploaded when committed.
    pub fn with_delta_at(
        mut self,
        remote: Option<crate::storage::Remote>,
    ) -> Result<Self, ParquetError> {
        let at = match &remote {
            Some(r) => crate::storage::TableLocation::Remote(r.clone()),
            None => crate::storage::TableLocation::Local(self.root.clone()),
        };
        self.remote = remote;
        let log = delta::DeltaLog::open(
            &at,
            self.spec.name,
            &self.spec.schema,
            self.spec.time_column,
            self.spec.position_column == "src_offset",
        )?;
        self.log = Some(log);
        self.load_positions();
        Ok(self)
    }

    /// Rebuilds the logged positions from the loaded snapshot.
    fn load_positions(&mut self) {
        let Some(log) = &self.log else { return };
        let positions = log.positions(self.spec.positioned);
        self.fragmented.extend(delta::fragmented(&positions));
        self.file_count = positions.iter().map(|(k, (_, f))| (*k, f.len())).collect();
        self.logged = positions.into_iter().map(|(k, (l, _))| (k, l)).collect();
    }

    /// A partition this instance now owns: its positions are read afresh
    /// from the table's latest snapshot (another owner may have logged more).
    pub fn adopt(&mut self, partition: i32) -> Result<(), ParquetError> {
        self.committed.retain(|k, _| k.1 != partition);
        if let Some(log) = &mut self.log {
            log.refresh()?;
            self.load_positions();
        }
        Ok(())
    }

    /// Whether the table is a Delta table.
    pub fn is_delta(&self) -> bool {
        self.log.is_some()
    }

    /// Files made durable but not yet committed to the log.
    pub fn unlogged(&self) -> usize {
        self.log.as_ref().map_or(0, |l| l.pending().len())
    }

    /// Delta: commits the durable files not yet in the log, in one commit
    /// (files of partitions another instance took over are left out).
    pub fn commit_log(&mut self) -> Result<(), ParquetError> {
        let Some(log) = &mut self.log else {
            return Ok(());
        };
        if log.pending().is_empty() {
            return Ok(());
        }
        if let Some(fence) = &self.fence {
            let owners: std::collections::BTreeSet<i32> =
                log.pending().iter().map(|f| f.partition).collect();
            for p in owners {
                if !fence.holds(p, "delta") {
                    let n = log.unstage(p);
                    self.fenced += n as u64;
                    self.open.retain(|k, _| k.1 != p);
                    self.committed.retain(|k, _| k.1 != p);
                }
            }
        }
        for f in log.commit_pending()? {
            let n = self.file_count.entry((f.hour, f.partition)).or_insert(0);
            *n += 1;
            if *n > 1 {
                self.fragmented.insert((f.hour, f.partition));
            }
            let e = self.logged.entry((f.hour, f.partition)).or_insert(f.last);
            *e = (*e).max(f.last);
        }
        Ok(())
    }

    /// Uploads a finished local file to `rel` of the remote table, retrying
    /// while the object store fails (the pipeline waits meanwhile), then
    /// deletes the local file.
    /// Returns the size of the object kept when `keep_existing` found one.
    fn upload(
        &self,
        local: &Path,
        rel: &str,
        keep_existing: bool,
    ) -> Result<Option<u64>, ParquetError> {
        let (Some(r), Some(log)) = (&self.remote, &self.log) else {
            return Ok(None);
        };
        let mut wait = std::time::Duration::from_millis(200);
        let mut failures = 0u32;
        let kept = loop {
            let attempt = async {
                if keep_existing && let Some(size) = r.size_of(rel).await? {
                    return Ok(Some(size));
                }
                r.upload(local, rel).await.map(|()| None)
            };
            match log.block_on(attempt) {
                Ok(kept) => break kept,
                Err(e) => {
                    failures += 1;
                    metrics::counter!("pulse_object_store_errors_total", "op" => "upload")
                        .increment(1);
                    tracing::warn!(table = self.spec.name, file = rel, failures, error = %e, "upload failed; retrying");
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        let _ = std::fs::remove_file(local);
        Ok(kept)
    }

    /// Delta: deletes files that left the table more than `retention` ago.
    pub fn vacuum(&mut self, retention: std::time::Duration) -> Result<usize, ParquetError> {
        match &mut self.log {
            Some(log) => Ok(log.vacuum(retention)?),
            None => Ok(0),
        }
    }

    /// Commits the open files whose first row came `age` ago or earlier.
    pub fn roll_older_than(&mut self, age: std::time::Duration) -> Result<(), ParquetError> {
        let old: Vec<(i64, i32)> = self
            .open
            .iter()
            .filter(|(_, f)| f.opened.elapsed() >= age)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            if let Some(f) = self.open.remove(&k) {
                self.commit(k, f)?;
            }
        }
        Ok(())
    }

    /// Delta: rewrites the files of each (hour, partition) satisfying
    /// `closed` into one, swapped in by one commit. Commits pending files first.
    pub fn compact(&mut self, closed: impl Fn(&(i64, i32)) -> bool) -> Result<usize, ParquetError> {
        if self.log.is_none() {
            return Ok(0);
        }
        let keys: Vec<(i64, i32)> = self
            .fragmented
            .iter()
            .filter(|k| closed(k) && !self.open.contains_key(k))
            .copied()
            .collect();
        if keys.is_empty() {
            return Ok(0);
        }
        if let Err(e) = self.commit_log() {
            // Compacted at a later close, once the log takes commits again.
            tracing::warn!(table = self.spec.name, error = %e, "cannot commit to the table's log; compaction waits");
            return Ok(0);
        }
        let positions = self.log.as_ref().map(|l| l.positions(self.spec.positioned));
        let positions = positions.unwrap_or_default();
        let mut done = 0;
        for key in keys {
            self.fragmented.remove(&key);
            let owner = if self.spec.positioned { key.1 } else { 0 };
            // Only the partition's owner compacts it (an instance that was
            // given it back later has an epoch again).
            if let Some(fence) = &self.fence
                && (fence.epoch(owner) == 0 || !fence.holds(owner, "compaction"))
            {
                continue;
            }
            let Some((_, files)) = positions.get(&key) else {
                continue;
            };
            if files.len() < 2 {
                continue;
            }
            match self.compact_one(key, files) {
                Ok(()) => done += 1,
                Err(e) => {
                    // The files stay as they are: the table is unchanged.
                    metrics::counter!("pulse_delta_compaction_failures_total", "table" => self.spec.name)
                        .increment(1);
                    tracing::warn!(table = self.spec.name, hour = key.0, partition = key.1, error = %e, "compaction failed; the hour keeps its files");
                }
            }
        }
        Ok(done)
    }

    fn compact_one(&mut self, key: (i64, i32), files: &[String]) -> Result<(), ParquetError> {
        use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
        let mut files = files.to_vec();
        // In position order, so the rows keep the order they were written in.
        files.sort_by_key(|p| delta::parse_path(p, self.spec.positioned).map(|x| x.2));
        let dir = self.root.join(partition_dir(key.0));
        self.seq += 1;
        let tmp = dir.join(format!(
            ".inprogress-p{}-{}-{}.tmp",
            key.1,
            crate::timefmt::instance_id(),
            self.seq
        ));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ParquetError::Io { path, source }
        };
        let file = File::create(&tmp).map_err(io(&tmp))?;
        let writer = ArrowWriter::try_new(
            BufWriter::with_capacity(1 << 20, file),
            self.spec.schema.clone(),
            Some(self.props.clone()),
        )?;
        let mut out = OpenFile {
            writer,
            dir: dir.clone(),
            tmp: tmp.clone(),
            rows: 0,
            first: i64::MAX,
            last: i64::MIN,
            time_min: i64::MAX,
            time_max: i64::MIN,
            opened: std::time::Instant::now(),
        };
        let result = (|| -> Result<(), ParquetError> {
            for rel in &files {
                let reader = match (&self.remote, &self.log) {
                    (Some(r), Some(log)) => {
                        let bytes = log.block_on(r.get(rel))?;
                        ParquetRecordBatchReaderBuilder::try_new(bytes)?.build()?
                    }
                    _ => {
                        let path = self.root.join(rel);
                        let f = File::open(&path).map_err(io(&path))?;
                        ParquetRecordBatchReaderBuilder::try_new(f)?.build()?
                    }
                };
                for b in reader {
                    let b = b?;
                    let b = RecordBatch::try_new(self.spec.schema.clone(), b.columns().to_vec())?;
                    let pos = position_values(&b, self.spec.position_column)?;
                    let ts = position_values(&b, self.spec.time_column)?;
                    for (&p, &t) in pos.iter().zip(&ts) {
                        out.first = out.first.min(p);
                        out.last = out.last.max(p);
                        out.time_min = out.time_min.min(t);
                        out.time_max = out.time_max.max(t);
                    }
                    out.rows += b.num_rows();
                    out.writer.write(&b)?;
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            drop(out.writer);
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        // A name of its own (`-c<instance><seq>`): a compaction never
        // replaces a file in place, whatever another writer's view was.
        let suffix = format!("-c{}{}", crate::timefmt::instance_id(), self.seq);
        let (name, f) = self.finish_file(key, out, &suffix)?;
        let target = dir.join(&name);
        if self.remote.is_some() {
            self.upload(&f.tmp, &format!("{}/{name}", partition_dir(key.0)), false)?;
        } else {
            std::fs::rename(&f.tmp, &target).map_err(io(&target))?;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
        }
        let logged = delta::LoggedFile {
            path: format!("{}/{name}", partition_dir(key.0)),
            hour: key.0,
            partition: key.1,
            rows: f.rows,
            bytes: f.bytes,
            first: f.first,
            last: f.last,
            time_min: f.time_min,
            time_max: f.time_max,
        };
        let log = self.log.as_mut().expect("checked by compact");
        // The files to replace must all still be in the table's latest
        // snapshot (another writer may have compacted or added meanwhile);
        // else the new file is left unlogged, for the vacuum.
        log.refresh()?;
        let now: std::collections::HashSet<String> = log.files().into_iter().collect();
        if !files.iter().all(|f| now.contains(f)) {
            tracing::warn!(
                table = self.spec.name,
                hour = key.0,
                partition = key.1,
                "the hour's files changed meanwhile; compaction skipped"
            );
            return Ok(());
        }
        log.replace(&files, &logged)?;
        self.file_count.insert(key, 1);
        tracing::info!(
            table = self.spec.name,
            hour = key.0,
            partition = key.1,
            files = files.len(),
            rows = f.rows,
            "hour compacted"
        );
        Ok(())
    }

    /// Checks each commit against the partitions' ownership epochs (files
    /// without a source partition, `anomalies`, belong to partition 0's
    /// owner, the scorer).
    pub fn with_fence(mut self, fence: Option<Arc<crate::fence::Fence>>) -> Self {
        self.fence = fence;
        self
    }

    /// Bounds the bytes all open files buffer in unwritten row groups: past
    /// it, the largest row group is written early (smaller, never lost).
    /// Each open file (one per hour and source partition) would otherwise
    /// hold up to a full row group, so memory grew with the partitions owned.
    pub fn with_buffer_limit(mut self, bytes: usize) -> Self {
        self.buffer_bytes = bytes.max(1);
        self
    }

    /// Bytes buffered in the open files' unwritten row groups.
    pub fn buffered_bytes(&self) -> usize {
        self.open.values().map(|f| f.writer.memory_size()).sum()
    }

    fn enforce_buffer_limit(&mut self) -> Result<(), ParquetError> {
        if self.buffer_bytes == usize::MAX {
            return Ok(());
        }
        loop {
            let mut total = 0;
            let mut largest: Option<(usize, (i64, i32))> = None;
            for (k, f) in &self.open {
                let n = f.writer.memory_size();
                total += n;
                if largest.is_none_or(|(m, _)| n > m) {
                    largest = Some((n, *k));
                }
            }
            match largest {
                Some((n, key)) if total > self.buffer_bytes && n > 0 => {
                    let f = self.open.get_mut(&key).expect("listed above");
                    f.writer.flush()?;
                    metrics::counter!("pulse_parquet_early_row_groups_total", "table" => self.spec.name)
                        .increment(1);
                }
                _ => return Ok(()),
            }
        }
    }

    /// The last position committed for (hour, partition): from this writer's
    /// commits, or else from the names of the files in the hour's directory.
    fn committed_last(&mut self, key: (i64, i32)) -> Option<i64> {
        if let Some(v) = self.committed.get(&key) {
            return *v;
        }
        if self.log.is_some() {
            // Delta: only logged files count; a file renamed into place by
            // an instance that crashed before logging it is not in the table.
            let last = self.logged.get(&key).copied();
            self.committed.insert(key, last);
            return last;
        }
        let dir = self.root.join(partition_dir(key.0));
        let prefix = if self.spec.positioned {
            format!("part-{:05}-", key.1)
        } else {
            "part-".to_string()
        };
        let mut last = None;
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                let name = e.file_name();
                let Some(n) = name.to_str() else { continue };
                let Some(range) = n
                    .strip_prefix(&prefix)
                    .and_then(|r| r.strip_suffix(".parquet"))
                else {
                    continue;
                };
                if let Some(l) = range.rsplit('-').next().and_then(|x| x.parse::<i64>().ok()) {
                    last = Some(last.map_or(l, |m: i64| m.max(l)));
                }
            }
        }
        self.committed.insert(key, last);
        last
    }

    /// Smallest first position of the files still open for `partition`.
    pub fn open_first(&self, partition: i32) -> Option<i64> {
        self.open
            .iter()
            .filter(|(k, _)| k.1 == partition)
            .map(|(_, f)| f.first)
            .min()
    }

    /// Forgets a partition this process no longer owns: its open files are
    /// deleted unpublished (the next owner rewrites them from the checkpoint)
    /// and its committed positions are looked up afresh if it comes back.
    pub fn drop_partition(&mut self, partition: i32) {
        if let Some(log) = &mut self.log {
            log.unstage(partition);
        }
        for k in self.open_keys(|k| k.1 == partition) {
            if let Some(f) = self.open.remove(&k) {
                drop(f.writer);
                let _ = std::fs::remove_file(&f.tmp);
            }
        }
        self.committed.retain(|k, _| k.1 != partition);
        self.fragmented.retain(|k| k.1 != partition);
    }

    /// Closes every open file of `partition`.
    pub fn close_partition(&mut self, partition: i32) -> Result<(), ParquetError> {
        self.commit_where(|k| k.1 == partition)
    }

    /// Keys of the open files that satisfy `pred`.
    fn open_keys(&self, pred: impl Fn(&(i64, i32)) -> bool) -> Vec<(i64, i32)> {
        self.open.keys().filter(|k| pred(k)).copied().collect()
    }

    /// Commits the open files whose (hour, partition) satisfies `pred`.
    fn commit_where(&mut self, pred: impl Fn(&(i64, i32)) -> bool) -> Result<(), ParquetError> {
        for k in self.open_keys(pred) {
            // A refused commit drops the partition's other files too.
            if let Some(f) = self.open.remove(&k) {
                self.commit(k, f)?;
            }
        }
        Ok(())
    }

    /// The table's name.
    pub fn name(&self) -> &'static str {
        self.spec.name
    }

    pub fn written(&self) -> &[WrittenFile] {
        &self.written
    }

    pub fn open_files(&self) -> usize {
        self.open.len()
    }

    /// Appends a batch, splitting it by hour and source partition.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), ParquetError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let ts = batch
            .column_by_name(self.spec.time_column)
            .ok_or_else(|| ParquetError::Column(self.spec.time_column.into()))?
            .as_primitive_opt::<TimestampMillisecondType>()
            .ok_or_else(|| ParquetError::Column(self.spec.time_column.into()))?
            .clone();
        let parts = if self.spec.positioned {
            Some(
                batch
                    .column_by_name("src_partition")
                    .and_then(|c| c.as_primitive_opt::<Int32Type>().cloned())
                    .ok_or_else(|| ParquetError::Column("src_partition".into()))?,
            )
        } else {
            None
        };
        let pos = position_values(batch, self.spec.position_column)?;
        let key_of = |i: usize| -> (i64, i32) {
            let hour = ts.value(i).div_euclid(HOUR_MS) * HOUR_MS;
            (hour, parts.as_ref().map_or(0, |p| p.value(i)))
        };
        // Group rows by (hour, partition), dropping rows a committed file holds.
        let mut groups: Vec<((i64, i32), Vec<u32>)> = Vec::new();
        let mut idx: HashMap<(i64, i32), usize> = HashMap::new();
        // Rows mostly come in runs of one key: look a key up once per run
        // (two hash lookups per row were ~1% of the pipeline's instructions).
        let mut run: Option<((i64, i32), Option<i64>, usize)> = None;
        for (i, &at) in pos.iter().enumerate() {
            let key = key_of(i);
            let (floor, g) = match run {
                Some((k, floor, g)) if k == key => (floor, g),
                _ => {
                    let floor = self.committed_last(key);
                    let g = *idx.entry(key).or_insert_with(|| {
                        groups.push((key, Vec::new()));
                        groups.len() - 1
                    });
                    run = Some((key, floor, g));
                    (floor, g)
                }
            };
            if floor.is_some_and(|f| at <= f) {
                self.skipped += 1;
                continue;
            }
            groups[g].1.push(i as u32);
        }
        groups.retain(|g| !g.1.is_empty());
        groups.sort_by_key(|g| g.0);
        for (key, rows) in groups {
            let (first, last) = rows.iter().fold((i64::MAX, i64::MIN), |(a, b), &r| {
                (a.min(pos[r as usize]), b.max(pos[r as usize]))
            });
            let times = rows.iter().fold((i64::MAX, i64::MIN), |(a, b), &r| {
                let t = ts.value(r as usize);
                (a.min(t), b.max(t))
            });
            let part = if rows.len() == batch.num_rows() {
                batch.clone()
            } else {
                take_record_batch(batch, &UInt32Array::from(rows))?
            };
            self.append(key, &part, (first, last), times)?;
        }
        self.enforce_buffer_limit()
    }

    fn append(
        &mut self,
        key: (i64, i32),
        part: &RecordBatch,
        (first, last): (i64, i64),
        (time_min, time_max): (i64, i64),
    ) -> Result<(), ParquetError> {
        if !self.open.contains_key(&key) {
            let dir = self.root.join(partition_dir(key.0));
            std::fs::create_dir_all(&dir).map_err(|source| ParquetError::Io {
                path: dir.clone(),
                source,
            })?;
            self.seq += 1;
            let tmp = dir.join(format!(
                ".inprogress-p{}-{}-{}.tmp",
                key.1,
                crate::timefmt::instance_id(),
                self.seq
            ));
            let file = File::create(&tmp).map_err(|source| ParquetError::Io {
                path: tmp.clone(),
                source,
            })?;
            let writer = ArrowWriter::try_new(
                BufWriter::with_capacity(1 << 20, file),
                self.spec.schema.clone(),
                Some(self.props.clone()),
            )?;
            self.open.insert(
                key,
                OpenFile {
                    writer,
                    dir,
                    tmp,
                    rows: 0,
                    first,
                    last,
                    time_min,
                    time_max,
                    opened: std::time::Instant::now(),
                },
            );
        }
        let f = self.open.get_mut(&key).expect("inserted above");
        let part = if part.schema() == self.spec.schema {
            part.clone()
        } else {
            RecordBatch::try_new(self.spec.schema.clone(), part.columns().to_vec())?
        };
        f.writer.write(&part)?;
        f.rows += part.num_rows();
        metrics::counter!("pulse_rows_written_total", "table" => self.spec.name, "partition" => key.1.to_string())
            .increment(part.num_rows() as u64);
        f.first = f.first.min(first);
        f.last = f.last.max(last);
        f.time_min = f.time_min.min(time_min);
        f.time_max = f.time_max.max(time_max);
        if f.rows >= self.max_file_rows {
            let f = self.open.remove(&key).expect("present");
            self.commit(key, f)?;
        }
        Ok(())
    }

    /// Closes the files of hours that end at or before `ms`.
    pub fn close_hours_before(&mut self, ms: i64) -> Result<(), ParquetError> {
        self.commit_where(|k| k.0 + HOUR_MS <= ms)
    }

    /// Closes the files of `partition` whose hours end at or before `ms`.
    pub fn close_partition_hours_before(
        &mut self,
        partition: i32,
        ms: i64,
    ) -> Result<(), ParquetError> {
        self.commit_where(|k| k.1 == partition && k.0 + HOUR_MS <= ms)
    }

    /// Closes every open file.
    pub fn close_all(&mut self) -> Result<(), ParquetError> {
        self.close_hours_before(i64::MAX)
    }

    fn commit(&mut self, key: (i64, i32), f: OpenFile) -> Result<(), ParquetError> {
        let started = std::time::Instant::now();
        let owner = if self.spec.positioned { key.1 } else { 0 };
        if let Some(fence) = &self.fence
            && !fence.holds(owner, "parquet")
        {
            // Another instance owns the partition now and writes these rows
            // from its checkpoint: publishing them too would duplicate them.
            drop(f.writer);
            let _ = std::fs::remove_file(&f.tmp);
            self.fenced += 1;
            self.drop_partition(owner);
            return Ok(());
        }
        let dir = f.dir.clone();
        let (name, f) = self.finish_file(key, f, "")?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ParquetError::Io { path, source }
        };
        let target = dir.join(&name);
        // The size the log records: that of the file kept under the name
        // (its footer's lineage may differ from this writer's by a few bytes).
        let mut size = f.bytes;
        if self.remote.is_some() {
            // One PUT of the whole file; an object of this name holds the
            // same rows already (written before a crash or replay): kept.
            let rel = format!("{}/{name}", partition_dir(key.0));
            if let Some(existing) = self.upload(&f.tmp, &rel, true)? {
                size = existing;
            }
        } else if target.exists() {
            // Same content was written before a crash or replay: durable
            // already (and, for Delta, logged below if it was not yet).
            size = std::fs::metadata(&target).map_err(io(&target))?.len();
            std::fs::remove_file(&f.tmp).map_err(io(&f.tmp))?;
        } else {
            std::fs::rename(&f.tmp, &target).map_err(io(&target))?;
            if let Ok(d) = File::open(&dir) {
                let _ = d.sync_all();
            }
        }
        if let Some(log) = &mut self.log {
            log.stage(delta::LoggedFile {
                path: format!("{}/{name}", partition_dir(key.0)),
                hour: key.0,
                partition: owner,
                rows: f.rows,
                bytes: size,
                first: f.first,
                last: f.last,
                time_min: f.time_min,
                time_max: f.time_max,
            });
        }
        tracing::debug!(table = self.spec.name, file = %target.display(), rows = f.rows, "parquet file committed");
        metrics::histogram!("pulse_parquet_commit_seconds", "table" => self.spec.name)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("pulse_files_written_total", "table" => self.spec.name).increment(1);
        metrics::counter!("pulse_bytes_written_total", "table" => self.spec.name)
            .increment(f.bytes);
        let prev = self.committed.get(&key).copied().flatten();
        self.committed
            .insert(key, Some(prev.map_or(f.last, |p| p.max(f.last))));
        self.written.push(WrittenFile {
            path: target,
            rows: f.rows,
            bytes: f.bytes,
        });
        Ok(())
    }

    /// Writes a file's footer with pulse's key-value metadata and syncs it:
    /// returns its final name and what it holds.
    fn finish_file(
        &self,
        key: (i64, i32),
        mut f: OpenFile,
        suffix: &str,
    ) -> Result<(String, Finished), ParquetError> {
        let owner = if self.spec.positioned { key.1 } else { 0 };
        let name = if self.spec.positioned {
            format!(
                "part-{:05}-{:020}-{:020}{suffix}.parquet",
                key.1, f.first, f.last
            )
        } else {
            format!("part-{:020}-{:020}{suffix}.parquet", f.first, f.last)
        };
        let kv = |k: &str, v: String| KeyValue::new(format!("pulse.{k}"), v);
        f.writer
            .append_key_value_metadata(kv("table", self.spec.name.to_string()));
        f.writer.append_key_value_metadata(kv(
            "schema_version",
            crate::model::TABLE_SCHEMA_VERSION.to_string(),
        ));
        // Lineage: which pulse wrote it, and which owner of the partition.
        f.writer.append_key_value_metadata(kv(
            "writer",
            format!("pulse {}", env!("CARGO_PKG_VERSION")),
        ));
        f.writer
            .append_key_value_metadata(kv("instance", crate::timefmt::instance_label()));
        if let Some(fence) = &self.fence {
            f.writer
                .append_key_value_metadata(kv("epoch", fence.epoch(owner).to_string()));
        }
        if self.spec.positioned {
            f.writer
                .append_key_value_metadata(kv("partition", key.1.to_string()));
        }
        if self.spec.position_column == "src_offset" {
            f.writer
                .append_key_value_metadata(kv("first_offset", f.first.to_string()));
            f.writer
                .append_key_value_metadata(kv("last_offset", f.last.to_string()));
        } else {
            f.writer
                .append_key_value_metadata(kv("first_time_ms", f.first.to_string()));
            f.writer
                .append_key_value_metadata(kv("last_time_ms", f.last.to_string()));
        }
        let inner = f.writer.into_inner()?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| ParquetError::Io { path, source }
        };
        let file = inner.into_inner().map_err(|e| ParquetError::Io {
            path: f.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io(&f.tmp))?;
        let bytes = file.metadata().map_err(io(&f.tmp))?.len();
        drop(file);
        Ok((
            name,
            Finished {
                tmp: f.tmp,
                rows: f.rows,
                bytes,
                first: f.first,
                last: f.last,
                time_min: f.time_min,
                time_max: f.time_max,
            },
        ))
    }
}

/// A file written and synced under its in-progress name.
struct Finished {
    tmp: PathBuf,
    rows: usize,
    bytes: u64,
    first: i64,
    last: i64,
    time_min: i64,
    time_max: i64,
}

/// Removes leftovers of interrupted writes (never visible to readers anyway).
pub fn remove_in_progress(dir: &Path) -> std::io::Result<usize> {
    remove_matching(dir, ".inprogress-")
}

/// The tables pulse writes.
pub fn events_spec() -> TableSpec {
    TableSpec {
        name: "events",
        schema: crate::model::events_schema(),
        time_column: "ts",
        positioned: true,
        position_column: "src_offset",
        plain_columns: &[
            "event_id",
            "ts",
            "src_partition",
            "src_offset",
            "session_id",
            "latency_ms",
        ],
    }
}

pub fn dead_letters_spec() -> TableSpec {
    TableSpec {
        name: "dead_letters",
        schema: crate::model::dead_letters_schema(),
        time_column: "received_at",
        positioned: true,
        position_column: "src_offset",
        plain_columns: &["received_at", "src_partition", "src_offset", "raw"],
    }
}

pub fn minute_stats_spec() -> TableSpec {
    TableSpec {
        name: "minute_stats",
        schema: crate::model::minute_stats_schema(),
        time_column: "window_start",
        positioned: true,
        position_column: "window_start",
        plain_columns: &[],
    }
}

pub fn top_items_spec() -> TableSpec {
    TableSpec {
        name: "top_items",
        schema: crate::model::top_items_schema(),
        time_column: "window_start",
        positioned: true,
        position_column: "window_start",
        plain_columns: &[],
    }
}

pub fn drift_spec() -> TableSpec {
    TableSpec {
        name: "drift",
        schema: crate::model::drift_schema(),
        time_column: "hour_start",
        positioned: false,
        position_column: "hour_start",
        plain_columns: &[],
    }
}

pub fn anomalies_spec() -> TableSpec {
    TableSpec {
        name: "anomalies",
        schema: crate::model::anomalies_schema(),
        time_column: "window_start",
        positioned: false,
        position_column: "window_start",
        plain_columns: &[],
    }
}

/// Values of a position column (Int64 or millisecond timestamp) as i64.
fn position_values(b: &RecordBatch, name: &str) -> Result<Vec<i64>, ParquetError> {
    let c = b
        .column_by_name(name)
        .ok_or_else(|| ParquetError::Column(name.into()))?;
    if let Some(a) = c.as_primitive_opt::<Int64Type>() {
        return Ok(a.values().to_vec());
    }
    if let Some(a) = c.as_primitive_opt::<TimestampMillisecondType>() {
        return Ok(a.values().to_vec());
    }
    Err(ParquetError::Column(name.into()))
}

/// Deletes the in-progress files of `partition` under `data_dir` (left by a
/// crashed owner); only the partition's current owner may call this.
pub fn remove_in_progress_of(data_dir: &Path, partition: i32) -> std::io::Result<usize> {
    remove_matching(data_dir, &format!(".inprogress-p{partition}-"))
}

fn remove_matching(dir: &Path, prefix: &str) -> std::io::Result<usize> {
    let mut n = 0;
    if !dir.exists() {
        return Ok(0);
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let p = e.path();
            if e.file_type()?.is_dir() {
                if p.file_name().is_some_and(|n| n != "_pulse") {
                    stack.push(p);
                }
            } else if p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix))
            {
                std::fs::remove_file(&p)?;
                n += 1;
            }
        }
    }
    Ok(n)
}

/// Convenience for tests and tools: the data files of a table: those of its
/// latest snapshot for a Delta table, else every visible Parquet file.
pub fn list_files(data_dir: &Path, table: &str) -> Vec<PathBuf> {
    let root = data_dir.join(table);
    if let Some(files) = delta::snapshot_files(&root) {
        let mut out: Vec<PathBuf> = files.iter().map(|f| root.join(f)).collect();
        out.sort();
        return out;
    }
    let mut out = Vec::new();
    let mut stack = vec![data_dir.join(table)];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet")
                && !p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .starts_with(['.', '_'])
            {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[allow(dead_code)]
fn _assert_send(_: Arc<TableWriter>) {}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    fn dead(rows: &[(i64, i32, i64)]) -> RecordBatch {
        let n = rows.len();
        RecordBatch::try_new(
            crate::model::dead_letters_schema(),
            vec![
                Arc::new(
                    TimestampMillisecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())
                        .with_timezone("UTC"),
                ),
                Arc::new(StringArray::from(vec!["t"; n])),
                Arc::new(datafusion::arrow::array::Int32Array::from(
                    rows.iter().map(|r| r.1).collect::<Vec<_>>(),
                )),
                Arc::new(Int64Array::from(
                    rows.iter().map(|r| r.2).collect::<Vec<_>>(),
                )),
                Arc::new(StringArray::from(vec!["why"; n])),
                Arc::new(StringArray::from(vec!["{}"; n])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn splits_by_hour_and_partition_names_by_offsets_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 1000, 3).unwrap();
        // two hours on partition 0, one row on partition 1
        w.write(&dead(&[
            (0, 0, 10),
            (1000, 0, 11),
            (HOUR_MS + 5, 0, 12),
            (2000, 1, 7),
        ]))
        .unwrap();
        assert_eq!(w.open_files(), 3);
        // nothing visible before commit
        assert!(list_files(dir.path(), "dead_letters").is_empty());
        w.close_hours_before(HOUR_MS).unwrap();
        let files = list_files(dir.path(), "dead_letters");
        assert_eq!(files.len(), 2, "{files:?}");
        let names: Vec<String> = files
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert!(names.contains(&"dead_letters/dt=1970-01-01/hour=00/part-00000-00000000000000000010-00000000000000000011.parquet".to_string()), "{names:?}");
        w.close_all().unwrap();
        assert_eq!(list_files(dir.path(), "dead_letters").len(), 3);
        // a replay of committed rows (a new writer, as after a crash) writes
        // nothing for them; rows past the committed ones get a new file
        let mut w2 = TableWriter::new(dir.path(), dead_letters_spec(), 2, 1000, 3).unwrap();
        w2.write(&dead(&[(0, 0, 10), (1000, 0, 11), (1500, 0, 13)]))
            .unwrap();
        assert_eq!(w2.skipped, 2);
        assert_eq!(w2.open_first(0), Some(13));
        w2.close_all().unwrap();
        assert_eq!(list_files(dir.path(), "dead_letters").len(), 4);
        assert_eq!(w2.written()[0].rows, 1);
        // dropping a partition deletes its unpublished file
        let mut w3 = TableWriter::new(dir.path(), dead_letters_spec(), 2, 1000, 3).unwrap();
        w3.write(&dead(&[(1600, 0, 14), (1700, 1, 9)])).unwrap();
        w3.drop_partition(0);
        assert_eq!(w3.open_first(0), None);
        w3.close_all().unwrap();
        assert_eq!(list_files(dir.path(), "dead_letters").len(), 5);
        let f = File::open(&files[0]).unwrap();
        let r = ParquetRecordBatchReaderBuilder::try_new(f).unwrap();
        let kv = r
            .metadata()
            .file_metadata()
            .key_value_metadata()
            .unwrap()
            .clone();
        assert!(
            kv.iter()
                .any(|k| k.key == "pulse.first_offset" && k.value.as_deref() == Some("10"))
        );
        let version = crate::model::TABLE_SCHEMA_VERSION.to_string();
        assert!(
            kv.iter()
                .any(|k| k.key == "pulse.schema_version" && k.value.as_deref() == Some(&version))
        );
        let writer = format!("pulse {}", env!("CARGO_PKG_VERSION"));
        assert!(
            kv.iter()
                .any(|k| k.key == "pulse.writer" && k.value.as_deref() == Some(&writer))
        );
        assert!(kv.iter().any(|k| k.key == "pulse.instance"));
        let rows: usize = r.build().unwrap().map(|b| b.unwrap().num_rows()).sum();
        assert_eq!(rows, 2);
        assert_eq!(remove_in_progress(dir.path()).unwrap(), 0);
    }

    #[test]
    fn growing_integer_columns_are_delta_encoded_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 1000, 1000, 1).unwrap();
        let rows: Vec<(i64, i32, i64)> = (0..300).map(|i| (5 * i, 0, 1_000 + i)).collect();
        w.write(&dead(&rows)).unwrap();
        w.close_all().unwrap();
        let files = list_files(dir.path(), "dead_letters");
        let r = ParquetRecordBatchReaderBuilder::try_new(File::open(&files[0]).unwrap()).unwrap();
        let rg = r.metadata().row_group(0);
        let encodings = |name: &str| {
            let c = rg
                .columns()
                .iter()
                .find(|c| c.column_path().string() == name)
                .unwrap();
            c.encodings().collect::<Vec<_>>()
        };
        // Growing values, and the file's one source partition.
        for c in ["received_at", "src_offset", "src_partition"] {
            assert!(encodings(c).contains(&Encoding::DELTA_BINARY_PACKED), "{c}");
            assert!(!encodings(c).contains(&Encoding::RLE_DICTIONARY), "{c}");
        }
        // Strings keep theirs.
        assert!(!encodings("raw").contains(&Encoding::DELTA_BINARY_PACKED));
        let back: Vec<RecordBatch> = r.build().unwrap().map(|b| b.unwrap()).collect();
        let column = |name: &str| -> Vec<i64> {
            back.iter()
                .flat_map(|b| position_values(b, name).unwrap())
                .collect()
        };
        assert_eq!(column("src_offset"), (1_000..1_300).collect::<Vec<_>>());
        let parts: Vec<i32> = back
            .iter()
            .flat_map(|b| {
                b.column_by_name("src_partition")
                    .unwrap()
                    .as_primitive::<Int32Type>()
                    .values()
                    .to_vec()
            })
            .collect();
        assert_eq!(parts, vec![0; 300]);
        let times = column("received_at");
        assert_eq!(times, (0..300).map(|i| 5 * i).collect::<Vec<_>>());
    }

    #[test]
    fn a_commit_for_a_partition_taken_over_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mine = Arc::new(crate::fence::Fence::new(dir.path(), "t"));
        let other = crate::fence::Fence::new(dir.path(), "t");
        mine.claim(0).unwrap();
        mine.claim(1).unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 1000, 3)
            .unwrap()
            .with_fence(Some(mine.clone()));
        w.write(&dead(&[
            (0, 0, 10),
            (1, 0, 11),
            (HOUR_MS + 2, 0, 12),
            (3, 1, 7),
        ]))
        .unwrap();
        // Partition 0 moves to another instance while this one holds its files.
        other.claim(0).unwrap();
        w.close_all().unwrap();
        let files = list_files(dir.path(), "dead_letters");
        assert_eq!(files.len(), 1, "only partition 1's file is published");
        assert!(files[0].to_string_lossy().contains("part-00001-"));
        assert_eq!(w.fenced, 1, "one refusal drops the partition's other file");
        assert_eq!(w.open_files(), 0);
        // Nothing is left behind unpublished either.
        for hour in [0, HOUR_MS] {
            let dir = dir.path().join("dead_letters").join(partition_dir(hour));
            let leftovers = std::fs::read_dir(dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
                .count();
            assert_eq!(leftovers, 0);
        }
    }

    #[test]
    fn rolls_by_row_count() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 3, 3).unwrap();
        let rows: Vec<(i64, i32, i64)> = (0..7).map(|i| (i, 0, i)).collect();
        for r in &rows {
            w.write(&dead(&[*r])).unwrap();
        }
        w.close_all().unwrap();
        let files = w.written().to_vec();
        assert_eq!(
            files.iter().map(|f| f.rows).collect::<Vec<_>>(),
            vec![3, 3, 1]
        );
    }

    #[test]
    fn buffer_limit_writes_the_largest_row_group_early_and_keeps_every_row() {
        // Rows of four partitions, each file's row group large enough to matter.
        let batch = |base: i64| {
            let rows: Vec<(i64, i32, i64)> = (0..4000)
                .map(|i| (1_000 + i, (i % 4) as i32, base + i))
                .collect();
            dead(&rows)
        };
        let unbounded = tempfile::tempdir().unwrap();
        let mut w =
            TableWriter::new(unbounded.path(), dead_letters_spec(), 1 << 20, 1 << 30, 3).unwrap();
        for k in 0..8 {
            w.write(&batch(k * 4000)).unwrap();
        }
        let grown = w.buffered_bytes();
        assert_eq!(w.open_files(), 4);

        let limit = grown / 4;
        let dir = tempfile::tempdir().unwrap();
        let mut b = TableWriter::new(dir.path(), dead_letters_spec(), 1 << 20, 1 << 30, 3)
            .unwrap()
            .with_buffer_limit(limit);
        for k in 0..8 {
            b.write(&batch(k * 4000)).unwrap();
            assert!(
                b.buffered_bytes() <= limit,
                "{} > {limit}",
                b.buffered_bytes()
            );
        }
        b.close_all().unwrap();
        let files = list_files(dir.path(), "dead_letters");
        assert_eq!(files.len(), 4);
        let mut rows = 0;
        let mut groups = 0;
        for f in &files {
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap()).unwrap();
            groups += r.metadata().num_row_groups();
            rows += r
                .build()
                .unwrap()
                .map(|b| b.unwrap().num_rows())
                .sum::<usize>();
        }
        assert_eq!(rows, 32_000);
        assert!(groups > 4, "row groups written early: {groups}");
    }

    fn rows_of(files: &[PathBuf]) -> Vec<i64> {
        let mut out = Vec::new();
        for f in files {
            let r = ParquetRecordBatchReaderBuilder::try_new(File::open(f).unwrap()).unwrap();
            for b in r.build().unwrap() {
                out.extend(position_values(&b.unwrap(), "src_offset").unwrap());
            }
        }
        out.sort_unstable();
        out
    }

    #[test]
    fn delta_files_enter_the_table_by_commit_and_a_crash_before_it_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 2, 3)
            .unwrap()
            .with_delta()
            .unwrap();
        for r in [(0, 0, 10), (1, 0, 11), (2, 0, 12)] {
            w.write(&dead(&[r])).unwrap();
        }
        // One file rolled (2 rows) and renamed into place, but not logged.
        assert_eq!(w.unlogged(), 1);
        assert!(list_files(dir.path(), "dead_letters").is_empty());
        w.commit_log().unwrap();
        assert_eq!(
            rows_of(&list_files(dir.path(), "dead_letters")),
            vec![10, 11]
        );
        // A crash now: the file of 12..13 is durable but was never logged,
        // and 14's is open.
        w.write(&dead(&[(3, 0, 13)])).unwrap();
        w.write(&dead(&[(4, 0, 14)])).unwrap();
        assert_eq!(w.unlogged(), 1);
        drop(w);
        // The next owner (rolling at 3 rows) replays from 12: the unlogged
        // rows are written again, in other files, and the table holds each once.
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 3, 3)
            .unwrap()
            .with_delta()
            .unwrap();
        w.write(&dead(&[(2, 0, 12), (3, 0, 13), (4, 0, 14), (5, 0, 15)]))
            .unwrap();
        w.close_all().unwrap();
        w.commit_log().unwrap();
        assert_eq!(w.skipped, 0, "nothing logged at or past 12");
        let files = list_files(dir.path(), "dead_letters");
        assert_eq!(rows_of(&files), vec![10, 11, 12, 13, 14, 15]);
        // The directory also holds the never-logged file, which no table reader sees.
        let on_disk = std::fs::read_dir(dir.path().join("dead_letters").join(partition_dir(0)))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".parquet"))
            .count();
        assert_eq!(on_disk, files.len() + 1);
        // A third owner replaying the same rows skips them all.
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 2, 2, 3)
            .unwrap()
            .with_delta()
            .unwrap();
        w.write(&dead(&[(4, 0, 14), (5, 0, 15)])).unwrap();
        assert_eq!(w.skipped, 2);
        // Past the retention, the vacuum deletes the orphan and the crashed
        // writer's in-progress file of 14.
        assert_eq!(w.vacuum(std::time::Duration::ZERO).unwrap(), 2);
        let left: Vec<String> =
            std::fs::read_dir(dir.path().join("dead_letters").join(partition_dir(0)))
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
        assert_eq!(left.len(), 2, "{left:?}");
        assert_eq!(rows_of(&list_files(dir.path(), "dead_letters")).len(), 6);
    }

    #[test]
    fn compaction_swaps_an_hours_files_for_one_and_readers_never_see_a_row_twice_or_miss_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TableWriter::new(dir.path(), dead_letters_spec(), 64, 50, 1)
            .unwrap()
            .with_delta()
            .unwrap();
        let mut next = 0i64;
        let mut write_hour = |w: &mut TableWriter, n: i64| {
            let rows: Vec<(i64, i32, i64)> = (0..n).map(|i| (i, 0, next + i)).collect();
            next += n;
            for chunk in rows.chunks(50) {
                w.write(&dead(chunk)).unwrap();
            }
            w.close_all().unwrap();
            w.commit_log().unwrap();
        };
        write_hour(&mut w, 1_000);
        assert_eq!(list_files(dir.path(), "dead_letters").len(), 20);
        // A reader polls the table's snapshot while the hour is compacted.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let root = dir.path().to_path_buf();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0;
                let mut counts = std::collections::BTreeSet::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) || reads < 3 {
                    let rows = rows_of(&list_files(&root, "dead_letters"));
                    let distinct: std::collections::BTreeSet<i64> = rows.iter().copied().collect();
                    assert_eq!(distinct.len(), rows.len(), "a row read twice");
                    counts.insert(rows.len());
                    reads += 1;
                }
                (reads, counts)
            })
        };
        for _ in 0..3 {
            assert_eq!(w.compact(|_| true).unwrap(), 1);
            // More rows of the same hour arrive late; compacted again.
            write_hour(&mut w, 100);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (reads, counts) = reader.join().unwrap();
        assert!(reads >= 3);
        // Every snapshot read held the rows written so far: 1,000 plus whole
        // late batches, never part of a batch.
        assert!(counts.iter().all(|c| (c - 1_000) % 100 == 0), "{counts:?}");
        assert_eq!(w.compact(|_| true).unwrap(), 1);
        let files = list_files(dir.path(), "dead_letters");
        assert_eq!(files.len(), 1);
        assert_eq!(rows_of(&files), (0..1_300).collect::<Vec<_>>());
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("part-00000-00000000000000000000-00000000000000001299-c"),
            "{name}"
        );
        // A new writer (a restart) skips the compacted rows by the name.
        let mut again = TableWriter::new(dir.path(), dead_letters_spec(), 64, 50, 1)
            .unwrap()
            .with_delta()
            .unwrap();
        again.write(&dead(&[(5, 0, 1_299), (6, 0, 1_300)])).unwrap();
        assert_eq!(again.skipped, 1);
    }
}
