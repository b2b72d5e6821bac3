//! The Parquet stage: one thread owning a writer per table. Consumes
//! [`ParquetMsg`]s (rows to append, hours to close, partitions gained and
//! lost, questions about open files) in the order the core stage sends them;
//! produces committed files ([`super::TableWriter`]) and, for Delta tables,
//! the log commits that put them in the tables. Guarantee: what it answers
//! about a partition reflects every message sent before the question; before
//! it answers (the core is about to checkpoint) every file written so far is
//! in the log, so no checkpoint covers rows a reader cannot see. Open files
//! are committed at the latest `commit_secs` after their first row, and
//! closed hours are compacted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot};

use super::{
    ParquetError, TableWriter, WrittenFile, anomalies_spec, dead_letters_spec, drift_spec,
    events_spec, minute_stats_spec, remove_in_progress, remove_in_progress_of, top_items_spec,
};

const HOUR_MS: i64 = 3_600_000;

fn log_failure(w: &TableWriter, failures: u32, e: &ParquetError) {
    metrics::counter!("pulse_delta_commit_failures_total", "table" => w.name()).increment(1);
    tracing::warn!(table = w.name(), failures, files = w.unlogged(), error = %e, "cannot commit to the table's log; retrying");
}

/// Deletes what left each Delta table more than `retention` ago (a failure
/// is logged: the files only take space until the next vacuum).
fn vacuum(tables: &mut [TableWriter], retention: Duration) {
    for w in tables {
        match w.vacuum(retention) {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                table = w.name(),
                files = n,
                "vacuum deleted files no longer in the table"
            ),
            Err(e) => tracing::warn!(table = w.name(), error = %e, "vacuum failed"),
        }
    }
}
use crate::config::{Config, TableFormat};
use crate::fence::Fence;

/// What the Parquet stage is asked to do.
pub enum ParquetMsg {
    Events(RecordBatch),
    Dead(RecordBatch),
    /// Final rows of closed hours: written and committed at once.
    MinuteStats(RecordBatch),
    TopItems(RecordBatch),
    Anomalies(RecordBatch),
    Drift(RecordBatch),
    /// Closes `events`/`dead_letters` files of hours ending at or before the
    /// time, of one partition or all.
    CloseHoursBefore(Option<i32>, i64),
    /// First position of the oldest open `events`/`dead_letters` file of a partition.
    OpenFirst(i32, oneshot::Sender<Option<i64>>),
    /// Commits every open file of a partition.
    ClosePartition(i32, oneshot::Sender<()>),
    /// Deletes a partition's unpublished files and forgets its positions.
    DropPartition(i32, oneshot::Sender<()>),
    /// Removes a newly owned partition's leftovers of interrupted writes.
    Adopt(i32),
}

/// Indices of the stage's writers.
const EVENTS: usize = 0;
const DEAD: usize = 1;
const STATS: usize = 2;
const TOP: usize = 3;
const ANOMALIES: usize = 4;
const DRIFT: usize = 5;

/// The parquet stage's loop: owns one writer per table, returns the files
/// it wrote and its busy time.
pub fn run(
    cfg: &Config,
    fence: Option<Arc<Fence>>,
    mut rx: mpsc::Receiver<ParquetMsg>,
) -> Result<(Vec<(String, WrittenFile)>, Duration), ParquetError> {
    let kafka = fence.is_some();
    let mut busy = Duration::ZERO;
    let pc = &cfg.parquet;
    let location = crate::storage::Location::parse(&pc.data_dir)?;
    // Files are written here: the tables' directories, or for tables on
    // object storage a local staging directory they are uploaded from.
    let files_root = match &location {
        crate::storage::Location::Local(d) => d.clone(),
        crate::storage::Location::Remote(_) => pc.state_dir().join("_pulse").join("staging"),
    };
    if !kafka {
        // Only a Kafka partition's owner may clean its files (instances share the directory).
        let removed = remove_in_progress(&files_root).unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "removed leftovers of interrupted writes");
        }
    }
    let mk = |spec| {
        TableWriter::new(
            &files_root,
            spec,
            pc.row_group_rows,
            pc.max_file_rows,
            pc.zstd_level,
        )
        .map(|w| {
            w.with_buffer_limit(pc.buffer_mb << 20)
                .with_fence(fence.clone())
        })
    };
    // One writer per table; `events` and `dead_letters` first (the tables of
    // positioned source rows, with files open across batches).
    let delta = pc.format == TableFormat::Delta;
    let mut tables = [
        events_spec(),
        dead_letters_spec(),
        minute_stats_spec(),
        top_items_spec(),
        anomalies_spec(),
        drift_spec(),
    ]
    .into_iter()
    .map(|spec| {
        let remote = match &location {
            crate::storage::Location::Remote(r) => Some(r.child(spec.name)),
            crate::storage::Location::Local(_) => None,
        };
        let w = mk(spec)?;
        if delta {
            w.with_delta_at(remote)
        } else {
            Ok(w)
        }
    })
    .collect::<Result<Vec<_>, _>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|source| ParquetError::Io {
            path: files_root.clone(),
            source,
        })?;
    let commit_after = pc.roll_after();
    let tick = pc.tick();
    let log_every = pc.log_every();
    let mut last_log = Instant::now();
    let mut last_tick = Instant::now();
    let started = Instant::now();
    let mut last_vacuum: Option<Instant> = None;
    // Before the core checkpoints, every file written must be in its table:
    // while the log's storage fails, the pipeline waits here (visibly) and
    // goes on once a commit succeeds.
    let log_all = |tables: &mut [TableWriter]| -> Result<(), ParquetError> {
        for w in tables.iter_mut() {
            let mut wait = Duration::from_millis(200);
            let mut failures = 0u32;
            while let Err(e) = w.commit_log() {
                failures += 1;
                log_failure(w, failures, &e);
                std::thread::sleep(wait);
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
        Ok(())
    };
    // On the timer a failed commit is only retried at the next tick.
    let try_log_all = |tables: &mut [TableWriter]| {
        for w in tables.iter_mut() {
            if let Err(e) = w.commit_log() {
                log_failure(w, 1, &e);
            }
        }
    };
    // Rows of closed hours and detections: written and committed at once.
    let commit_now = |w: &mut TableWriter, b: &RecordBatch| -> Result<(), ParquetError> {
        w.write(b)?;
        w.close_all()
    };
    loop {
        let m = match rt.block_on(async { tokio::time::timeout(tick, rx.recv()).await }) {
            Ok(Some(m)) => Some(m),
            Ok(None) => break,
            Err(_) => None,
        };
        let t0 = Instant::now();
        if last_tick.elapsed() >= tick {
            last_tick = Instant::now();
            for w in &mut tables {
                w.roll_older_than(commit_after)?;
            }
            if last_log.elapsed() >= log_every {
                last_log = Instant::now();
                try_log_all(&mut tables);
            }
            let vacuum_due = match last_vacuum {
                None => started.elapsed() >= Duration::from_secs(60),
                Some(t) => t.elapsed() >= Duration::from_secs(3600),
            };
            let owner = fence.as_ref().is_none_or(|f| f.holds(0, "vacuum"));
            if delta && vacuum_due && owner {
                last_vacuum = Some(Instant::now());
                vacuum(&mut tables, Duration::from_secs(pc.vacuum_hours * 3600));
            }
        }
        let Some(m) = m else {
            busy += t0.elapsed();
            continue;
        };
        match m {
            ParquetMsg::Events(b) => tables[EVENTS].write(&b)?,
            ParquetMsg::Dead(b) => tables[DEAD].write(&b)?,
            ParquetMsg::MinuteStats(b) => commit_now(&mut tables[STATS], &b)?,
            ParquetMsg::TopItems(b) => commit_now(&mut tables[TOP], &b)?,
            ParquetMsg::Anomalies(b) => commit_now(&mut tables[ANOMALIES], &b)?,
            ParquetMsg::Drift(b) => commit_now(&mut tables[DRIFT], &b)?,
            ParquetMsg::CloseHoursBefore(part, ms) => {
                for w in &mut tables[EVENTS..=DEAD] {
                    match part {
                        Some(p) => w.close_partition_hours_before(p, ms)?,
                        None => w.close_hours_before(ms)?,
                    }
                }
                if delta && pc.compact {
                    let closed = |k: &(i64, i32)| k.0 + HOUR_MS <= ms;
                    for (i, w) in tables.iter_mut().enumerate() {
                        // Detections belong to partition 0's owner (the scorer).
                        let mine = match part {
                            None => true,
                            Some(p) if i >= ANOMALIES => p == 0,
                            Some(_) => true,
                        };
                        if mine {
                            w.compact(|k| {
                                closed(k) && part.is_none_or(|p| i >= ANOMALIES || k.1 == p)
                            })?;
                        }
                    }
                }
            }
            ParquetMsg::OpenFirst(p, reply) => {
                // The core checkpoints next: what it no longer holds must be in the table.
                log_all(&mut tables)?;
                let first = tables[EVENTS..=DEAD]
                    .iter()
                    .filter_map(|w| w.open_first(p))
                    .min();
                let _ = reply.send(first);
            }
            ParquetMsg::ClosePartition(p, reply) => {
                for w in &mut tables[EVENTS..=DEAD] {
                    w.close_partition(p)?;
                }
                log_all(&mut tables)?;
                let _ = reply.send(());
            }
            ParquetMsg::DropPartition(p, reply) => {
                for w in &mut tables {
                    w.drop_partition(p);
                }
                let _ = reply.send(());
            }
            ParquetMsg::Adopt(p) => {
                match remove_in_progress_of(&files_root, p) {
                    Ok(0) => {}
                    Ok(n) => {
                        tracing::info!(
                            partition = p,
                            removed = n,
                            "removed leftovers of interrupted writes"
                        )
                    }
                    Err(e) => tracing::warn!(partition = p, error = %e, "cannot clean leftovers"),
                }
                for w in &mut tables {
                    w.adopt(p)?;
                }
            }
        }
        busy += t0.elapsed();
    }
    let t0 = Instant::now();
    let mut out = Vec::new();
    if !kafka {
        for w in &mut tables {
            w.close_all()?;
        }
    }
    log_all(&mut tables)?;
    if delta && pc.compact && !kafka {
        // The input has ended: no hour can change any more.
        for w in &mut tables {
            w.compact(|_| true)?;
        }
    }
    for w in &tables {
        out.extend(
            w.written()
                .iter()
                .map(|f| (w.name().to_string(), f.clone())),
        );
    }
    let fenced: u64 = tables.iter().map(|w| w.fenced).sum();
    if fenced > 0 {
        tracing::warn!(
            files = fenced,
            "files of partitions another instance took over were not published"
        );
    }
    let skipped = tables[EVENTS].skipped + tables[DEAD].skipped;
    if skipped > 0 {
        tracing::info!(
            rows = skipped,
            "replayed rows already in committed files were skipped"
        );
    }
    Ok((out, busy + t0.elapsed()))
}
