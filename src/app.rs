//! Wires the stages with bounded channels and owns shutdown.
//!
//! ```text
//! source ──SourceMsg──▶ decode ──CoreMsg──▶ core: per-partition windows + SQL ──▶ store (Redis | memory)
//! (kafka thread|files|gen)  (thread)          │  merged rows ─▶ detection        partials in, merged rows out
//!                                              ├──events, dead letters, closed hours' rows──▶ parquet (thread)
//!                                              └──fresh events──▶ factor trainer (thread) ──▶ Redis
//! ```
//! Consumes a [`SourceSpec`]; produces Parquet tables, store updates and a
//! [`Summary`]. Every record read ends up in `events` or `dead_letters`.
//! Delivery: files and generator runs are complete or fail. Kafka runs are
//! exactly-once per source partition: the core checkpoints each partition's
//! window state and pending rows with the offset they cover and the offset to
//! replay the still-open Parquet files from ([`crate::checkpoint`]); on
//! assignment it resumes from there, the Parquet writer skips rows already
//! committed, and the store's writes are version-guarded. Revocation and
//! shutdown checkpoint first; shutdown never finalises open windows.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int32Type, Int64Type, TimestampMillisecondType};
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::{CheckpointStore, PartitionCheckpoint};
use crate::config::{Config, Secrets};
use crate::decode::{Decoded, Decoder};
use crate::model::{RawChunk, SourceMsg, events_schema};
use crate::sink::parquet::{
    TableWriter, WrittenFile, anomalies_spec, dead_letters_spec, events_spec, minute_stats_spec,
    remove_in_progress, top_items_spec,
};
use crate::sink::store::{
    Emission, MergeInput, MinuteRow, PartialUpdate, Store, StoreError, TopUpdate, minute_rows,
    minute_rows_batch,
};
use crate::source::generator::{GenParams, Generator};
use crate::source::kafka::KafkaError;
use crate::sql::{SqlEngine, SqlError, partials_to_batch};
use crate::window::{
    Lateness, PartitionWindows, StoredPartial, WindowEmit, WindowParams, Windower,
};

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Parquet(#[from] crate::sink::parquet::ParquetError),
    #[error(transparent)]
    File(#[from] crate::source::file::FileSourceError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error("arrow: {0}")]
    Arrow(#[from] datafusion::arrow::error::ArrowError),
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    #[error("a pipeline stage stopped unexpectedly: {0}")]
    Stage(String),
}

/// What to read.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Files(Vec<PathBuf>),
    Kafka,
    Generator(GenParams),
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub records: u64,
    pub events: u64,
    pub invalid: u64,
    pub late: u64,
    pub too_late: u64,
    pub windows_emitted: u64,
    pub minute_rows_final: u64,
    pub final_rows: Vec<MinuteRow>,
    pub anomalies: u64,
    pub alerts: Vec<crate::alert::Alert>,
    pub files: Vec<(String, WrittenFile)>,
    pub elapsed: Duration,
    /// Events the recommendation model trained on.
    pub trained: u64,
    /// Busy time of each stage (they run concurrently).
    pub stage_seconds: Vec<(String, f64)>,
    pub watermark_ms: Option<i64>,
    /// When the first batch reached the core, and when the last one was done.
    pub first_batch_at: Option<Instant>,
    pub last_batch_done_at: Option<Instant>,
    /// Event freshness: event time to its batch's store write, ms (HDR).
    pub freshness: Option<crate::sketch::LatencyHist>,
}

/// Events for the factor trainer and, with Kafka, the offset after the
/// batch per partition (it covers records the trainer does not get).
struct TrainMsg {
    batch: Option<RecordBatch>,
    upto: Vec<(i32, i64)>,
}

enum ParquetMsg {
    Events(RecordBatch),
    Dead(RecordBatch),
    /// Final rows of closed hours: written and committed at once.
    MinuteStats(RecordBatch),
    TopItems(RecordBatch),
    Anomalies(RecordBatch),
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

/// The parquet stage: owns one writer per table.
fn parquet_stage(
    cfg: &Config,
    kafka: bool,
    mut rx: mpsc::Receiver<ParquetMsg>,
) -> Result<(Vec<(String, WrittenFile)>, Duration), PipelineError> {
    let mut busy = Duration::ZERO;
    let pc = &cfg.parquet;
    if !kafka {
        // Only a Kafka partition's owner may clean its files (instances share the directory).
        let removed = remove_in_progress(&pc.data_dir).unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "removed leftovers of interrupted writes");
        }
    }
    let mk = |spec| {
        TableWriter::new(
            &pc.data_dir,
            spec,
            pc.row_group_rows,
            pc.max_file_rows,
            pc.zstd_level,
        )
        .map(|w| w.with_buffer_limit(pc.buffer_mb << 20))
    };
    let mut events = mk(events_spec())?;
    let mut dead = mk(dead_letters_spec())?;
    let mut stats = mk(minute_stats_spec())?;
    let mut top = mk(top_items_spec())?;
    let mut anom = mk(anomalies_spec())?;
    while let Some(m) = rx.blocking_recv() {
        let t0 = Instant::now();
        match m {
            ParquetMsg::Events(b) => events.write(&b)?,
            ParquetMsg::Dead(b) => dead.write(&b)?,
            ParquetMsg::MinuteStats(b) => {
                stats.write(&b)?;
                stats.close_all()?;
            }
            ParquetMsg::TopItems(b) => {
                top.write(&b)?;
                top.close_all()?;
            }
            ParquetMsg::Anomalies(b) => {
                anom.write(&b)?;
                anom.close_all()?;
            }
            ParquetMsg::CloseHoursBefore(part, ms) => {
                for w in [&mut events, &mut dead] {
                    match part {
                        Some(p) => w.close_partition_hours_before(p, ms)?,
                        None => w.close_hours_before(ms)?,
                    }
                }
            }
            ParquetMsg::OpenFirst(p, reply) => {
                let first = [events.open_first(p), dead.open_first(p)]
                    .into_iter()
                    .flatten()
                    .min();
                let _ = reply.send(first);
            }
            ParquetMsg::ClosePartition(p, reply) => {
                events.close_partition(p)?;
                dead.close_partition(p)?;
                let _ = reply.send(());
            }
            ParquetMsg::DropPartition(p, reply) => {
                for w in [&mut events, &mut dead, &mut stats, &mut top, &mut anom] {
                    w.drop_partition(p);
                }
                let _ = reply.send(());
            }
            ParquetMsg::Adopt(p) => {
                match crate::sink::parquet::remove_in_progress_of(&pc.data_dir, p) {
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
            }
        }
        busy += t0.elapsed();
    }
    let t0 = Instant::now();
    let mut out = Vec::new();
    if !kafka {
        for w in [&mut events, &mut dead, &mut stats, &mut top, &mut anom] {
            w.close_all()?;
        }
    }
    for (name, w) in [
        ("events", &events),
        ("dead_letters", &dead),
        ("minute_stats", &stats),
        ("top_items", &top),
        ("anomalies", &anom),
    ] {
        out.extend(w.written().iter().map(|f| (name.to_string(), f.clone())));
    }
    let skipped = events.skipped + dead.skipped;
    if skipped > 0 {
        tracing::info!(
            rows = skipped,
            "replayed rows already in committed files were skipped"
        );
    }
    Ok((out, busy + t0.elapsed()))
}

/// Nice steps the stages around the factor trainer give up, see [`spawn_stage`].
const BELOW_TRAINER: i32 = 5;

/// Runs a blocking stage on a thread of its own named `pulse-<name>`; the
/// receiver gets its result (closed without one: the stage panicked).
///
/// With `yield_to_trainer` the thread first lowers its scheduling priority
/// by [`BELOW_TRAINER`] nice steps. The factor trainer is the longest stage
/// that runs on one thread (~40% of the pipeline's CPU) and everything else
/// fits in the time it leaves. When the cores are saturated, the kernel
/// shares them equally among the runnable threads, so the trainer got ~60% of
/// a core, fell behind and finished alone while the other core idled. At a
/// lower weight, the reader, decoder and Parquet writer get what the trainer
/// leaves and catch up while it runs. Only the stage's own thread changes:
/// the Kafka consumer (whose librdkafka threads would inherit it) and the
/// core are not lowered, and a thread never runs a second stage.
fn spawn_stage<T: Send + 'static>(
    name: &str,
    yield_to_trainer: bool,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<oneshot::Receiver<T>, PipelineError> {
    let (tx, rx) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("pulse-{name}"))
        .spawn(move || {
            if yield_to_trainer {
                lower_priority(BELOW_TRAINER);
            }
            let _ = tx.send(f());
        })
        .map_err(|e| PipelineError::Stage(format!("starting the {name} stage: {e}")))?;
    Ok(rx)
}

/// Raises the calling thread's nice value by `steps` (on Linux a thread has
/// its own). Best effort: without it the stages only share the cores evenly.
fn lower_priority(steps: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: two syscalls that read and set the calling thread's own nice value.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        let now = libc::getpriority(libc::PRIO_PROCESS, tid);
        if libc::setpriority(libc::PRIO_PROCESS, tid, (now + steps).min(19)) != 0 {
            tracing::debug!("could not lower a stage's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = steps;
}

/// Waits for a stage started by [`spawn_stage`].
async fn join_stage<T>(name: &str, rx: oneshot::Receiver<T>) -> Result<T, PipelineError> {
    rx.await
        .map_err(|_| PipelineError::Stage(format!("the {name} stage panicked")))
}

/// Runs the pipeline until the source ends (files, generator), the Kafka
/// source is idle for `pipeline.idle_exit_ms`, or `shutdown` turns true.
pub async fn run(
    cfg: &Config,
    secrets: &Secrets,
    source: SourceSpec,
    store: Store,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Summary, PipelineError> {
    let started = Instant::now();
    let cap = cfg.pipeline.channel_capacity;
    let (chunk_tx, chunk_rx) = mpsc::channel::<SourceMsg>(cap);
    let (dec_tx, mut dec_rx) = mpsc::channel::<CoreMsg>(cap);
    let (pq_tx, pq_rx) = mpsc::channel::<ParquetMsg>(cap * 4);
    let kafka = matches!(source, SourceSpec::Kafka);
    // Decoded chunks go back to the source to be refilled.
    let pool = crate::model::ChunkPool::new(2);
    let progress: crate::source::kafka::Progress = Default::default();

    // parquet stage
    let pq_cfg = cfg.clone();
    let pq_handle = spawn_stage("parquet", true, move || {
        parquet_stage(&pq_cfg, kafka, pq_rx)
    })?;

    // source stage
    let batch = cfg.pipeline.batch_size;
    let src_pool = pool.clone();
    let src_handle: oneshot::Receiver<Result<(), PipelineError>> = match source {
        SourceSpec::Files(paths) => spawn_stage("read", true, move || {
            let total = crate::source::file::total_bytes(&paths);
            let bar = progress_bar(total);
            let done = |n: u64| {
                if let Some(b) = &bar {
                    b.inc(n)
                }
            };
            crate::source::file::read_files(&paths, batch, &chunk_tx, &src_pool, &done)?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            Ok(())
        })?,
        SourceSpec::Generator(p) => spawn_stage("generate", true, move || {
            let mut g = Generator::new(p);
            let source: Arc<str> = "generator".into();
            let mut line = Vec::with_capacity(512);
            let mut n = 0i64;
            let mut chunk = RawChunk::new(source.clone());
            loop {
                while chunk.len() < batch {
                    line.clear();
                    if g.next_into(&mut line).is_none() {
                        break;
                    }
                    n += 1;
                    chunk.push(
                        &line,
                        crate::model::Position {
                            partition: 0,
                            offset: n,
                        },
                    );
                }
                let last = chunk.len() < batch;
                let next = RawChunk::reused_like(&chunk, &src_pool);
                let full = std::mem::replace(&mut chunk, next);
                if !full.is_empty() && chunk_tx.blocking_send(SourceMsg::Chunk(full)).is_err() {
                    break;
                }
                if last {
                    break;
                }
            }
            Ok(())
        })?,
        SourceSpec::Kafka => {
            let kcfg = cfg.kafka.clone();
            let secrets = secrets.clone();
            let data_dir = cfg.parquet.data_dir.clone();
            let linger = Duration::from_millis(cfg.pipeline.batch_timeout_ms);
            let idle = (cfg.pipeline.idle_exit_ms > 0)
                .then(|| Duration::from_millis(cfg.pipeline.idle_exit_ms));
            let stop = shutdown.clone();
            let progress = progress.clone();
            spawn_stage("kafka", false, move || {
                crate::source::kafka::run_consumer(
                    &kcfg,
                    &secrets,
                    crate::source::kafka::ConsumerRun {
                        data_dir,
                        batch,
                        linger,
                        idle,
                        stop,
                        tx: chunk_tx,
                        progress,
                        pool: src_pool,
                    },
                )?;
                Ok(())
            })?
        }
    };

    // factor training stage (and its Redis publisher)
    let trained: crate::source::kafka::Progress = Default::default();
    let (trainer_tx, trainer_handle, publisher) = if cfg.reco.enabled {
        let (tx, mut rx) = mpsc::channel::<TrainMsg>(cap);
        let (delta_tx, mut delta_rx) = mpsc::channel::<crate::factors::store::Delta>(2);
        let redis = match &store {
            Store::Redis(r) => Some(r.connection()),
            Store::Memory(_) => None,
        };
        let publish = redis.is_some();
        let flush = Duration::from_millis(cfg.reco.flush_ms);
        let seed = cfg.reco.seed;
        let model_cfg = cfg.reco.model_config();
        // Kafka: the model continues from its snapshot, learning each event once.
        let snap = kafka.then(|| {
            let id = cfg
                .kafka
                .properties
                .get("group.instance.id")
                .map_or("default".to_string(), |s| s.replace(['/', '.'], "_"));
            (
                crate::checkpoint::reco_dir(&cfg.parquet.data_dir, &cfg.kafka.topic),
                format!("model-{id}.cbor"),
                Duration::from_millis(cfg.reco.snapshot_ms.max(1)),
            )
        });
        let mut t = crate::factors::trainer::Trainer::new(model_cfg.clone(), seed);
        if let Some((dir, name, _)) = &snap {
            t.positioned = true;
            match std::fs::read(dir.join(name)) {
                Ok(bytes) => {
                    t = crate::factors::trainer::Trainer::restore(model_cfg, seed, &bytes)
                        .map_err(|e| PipelineError::Stage(e.to_string()))?;
                    tracing::info!(events = t.model.events(), offsets = ?t.offsets(), "factor model restored");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(PipelineError::Stage(format!("reading model snapshot: {e}"))),
            }
            *trained.lock().unwrap_or_else(|e| e.into_inner()) = t.offsets().clone();
        }
        let trained_w = trained.clone();
        let handle = spawn_stage("factors", false, move || {
            let mut last = Instant::now();
            let mut last_snap = Instant::now();
            let mut busy = Duration::ZERO;
            let save = |t: &crate::factors::trainer::Trainer| {
                let Some((dir, name, _)) = &snap else { return };
                let r = t.snapshot().map_err(|e| e.to_string()).and_then(|b| {
                    crate::checkpoint::write_atomic(dir, name, &b).map_err(|e| e.to_string())
                });
                match r {
                    // Durable: checkpoints may now stop replaying what it learned.
                    Ok(()) => {
                        *trained_w.lock().unwrap_or_else(|e| e.into_inner()) = t.offsets().clone()
                    }
                    Err(e) => tracing::warn!(error = %e, "model snapshot failed"),
                }
            };
            while let Some(m) = rx.blocking_recv() {
                let t0 = Instant::now();
                if let Some(b) = &m.batch {
                    t.train(b);
                }
                for (p, next) in m.upto {
                    t.advance(p, next);
                }
                if let Some((_, _, every)) = &snap
                    && last_snap.elapsed() >= *every
                {
                    save(&t);
                    last_snap = Instant::now();
                }
                busy += t0.elapsed();
                if publish && last.elapsed() >= flush {
                    let d = t.flush(chrono::Utc::now().timestamp_millis());
                    if delta_tx.blocking_send(d).is_err() {
                        break;
                    }
                    last = Instant::now();
                }
            }
            save(&t);
            if publish {
                let _ = delta_tx.blocking_send(t.flush(chrono::Utc::now().timestamp_millis()));
            }
            if t.skipped > 0 {
                tracing::info!(
                    rows = t.skipped,
                    "replayed events the model had learned were skipped"
                );
            }
            (t.model.events(), busy)
        })?;
        let prefix = cfg.redis.prefix.clone();
        let publisher = tokio::spawn(async move {
            let mut n = 0u64;
            if let Some(mut conn) = redis {
                while let Some(d) = delta_rx.recv().await {
                    crate::factors::store::write(&mut conn, &prefix, &d)
                        .await
                        .map_err(StoreError::from)?;
                    n += 1;
                }
            }
            Ok::<u64, PipelineError>(n)
        });
        (Some(tx), Some(handle), Some(publisher))
    } else {
        (None, None, None)
    };

    // decode stage
    let rules = cfg.validation.clone();
    let dec_handle = spawn_stage("decode", true, move || {
        let mut rx = chunk_rx;
        let mut d = Decoder::new(rules);
        let mut busy = Duration::ZERO;
        while let Some(m) = rx.blocking_recv() {
            let out = match m {
                SourceMsg::Chunk(c) => {
                    let t0 = Instant::now();
                    let now = chrono::Utc::now().timestamp_millis();
                    let out = d.decode(&c, now);
                    pool.put(c);
                    busy += t0.elapsed();
                    CoreMsg::Batch(out)
                }
                SourceMsg::Assigned(a) => CoreMsg::Assigned(a),
                SourceMsg::Revoked(p, ack) => CoreMsg::Revoked(p, ack),
            };
            if dec_tx.blocking_send(out).is_err() {
                break;
            }
        }
        busy
    })?;

    // core stage
    let mut core = Core::new(cfg, secrets, store, kafka);
    core.trainer = trainer_tx;
    core.progress = Some(progress);
    core.trained = (kafka && cfg.reco.enabled).then_some(trained);
    let core_result: Result<(), PipelineError> = async {
        let mut watching = true;
        loop {
            let d = if watching {
                tokio::select! {
                    d = dec_rx.recv() => d,
                    r = shutdown.changed() => {
                        // A dropped sender can signal nothing more: stop watching it.
                        if r.is_err() || *shutdown.borrow() {
                            watching = false;
                        }
                        if *shutdown.borrow() {
                            tracing::info!("shutdown requested, draining in-flight batches");
                        }
                        continue;
                    }
                }
            } else {
                dec_rx.recv().await
            };
            let Some(d) = d else { break };
            let t0 = Instant::now();
            match d {
                CoreMsg::Batch(d) => core.on_batch(d, &pq_tx).await?,
                CoreMsg::Assigned(a) => core.on_assigned(a, &pq_tx).await?,
                CoreMsg::Revoked(parts, ack) => {
                    core.on_revoked(&parts, &pq_tx).await?;
                    let _ = ack.send(());
                }
            }
            core.busy += t0.elapsed();
        }
        Ok(())
    }
    .await;
    // The trainer ends first: its final snapshot lets the last checkpoints
    // start after everything it learned.
    core.trainer = None;
    let (trained, train_busy) = match trainer_handle {
        Some(h) => join_stage("factors", h).await?,
        None => (0, Duration::ZERO),
    };
    let core_result = match core_result {
        Ok(()) => {
            let t0 = Instant::now();
            let r = core.finish(&pq_tx).await;
            core.busy += t0.elapsed();
            r
        }
        Err(e) => Err(e),
    };
    drop(pq_tx);
    if let Some(p) = publisher {
        p.await.map_err(|e| PipelineError::Stage(e.to_string()))??;
    }
    drop(dec_rx);
    let src = join_stage("source", src_handle).await?;
    let decode_busy = dec_handle.await.unwrap_or_default();
    let (files, parquet_busy) = join_stage("parquet", pq_handle).await??;
    core_result?;
    src?;
    let mut s = core.summary;
    s.files = files;
    s.elapsed = started.elapsed();
    s.stage_seconds = vec![
        ("decode".into(), decode_busy.as_secs_f64()),
        ("windows+sql+detect+store".into(), core.busy.as_secs_f64()),
        ("parquet".into(), parquet_busy.as_secs_f64()),
        ("factors".into(), train_busy.as_secs_f64()),
    ];
    s.trained = trained;
    s.watermark_ms = core
        .instance
        .max_event_time()
        .map(|_| core.instance.watermark());
    Ok(s)
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    Some(b)
}

/// What the core stage receives, in source order.
enum CoreMsg {
    Batch(Decoded),
    Assigned(Vec<(i32, Option<PartitionCheckpoint>)>),
    Revoked(Vec<i32>, std::sync::mpsc::SyncSender<()>),
}

const HOUR_MS: i64 = 3_600_000;

/// One source partition's state in the core stage.
struct Task {
    pw: PartitionWindows,
    /// First offset not yet applied to the windows: records below it are a
    /// replay for the Parquet files that were open at the last checkpoint.
    next_offset: i64,
    /// Classifies the replayed records as they were classified the first time.
    replay: Option<Windower>,
    /// While `replay` is set: the restored checkpoint's replay point. Until
    /// the replay has been written again, what the last run left uncommitted
    /// exists only in the log from there on.
    replay_floor: i64,
    /// (first offset of a batch, the partition's max event time before it):
    /// the points a checkpoint can ask to replay from.
    history: VecDeque<(i64, Option<i64>)>,
    pending_stats: Vec<MinuteRow>,
    pending_top: Vec<(i64, u64, u64, i64)>,
}

impl Task {
    fn fresh(params: WindowParams, top_n: usize, key: i32) -> Self {
        let pw = PartitionWindows::new(params, top_n, key);
        Task {
            pw,
            next_offset: i64::MIN,
            replay: None,
            replay_floor: i64::MAX,
            history: VecDeque::new(),
            pending_stats: Vec::new(),
            pending_top: Vec::new(),
        }
    }

    fn restore(
        params: WindowParams,
        top_n: usize,
        key: i32,
        cp: &PartitionCheckpoint,
    ) -> Option<Self> {
        let pw = PartitionWindows::restore(params, top_n, key, &cp.windows)?;
        let replay = (cp.replay_from < cp.next_offset)
            .then(|| Windower::restored(params, key, cp.replay_max_ts));
        Some(Task {
            pw,
            next_offset: cp.next_offset,
            replay,
            replay_floor: cp.replay_from,
            history: VecDeque::from([(cp.replay_from, cp.replay_max_ts)]),
            pending_stats: cp.pending_stats.clone(),
            pending_top: cp.pending_top.clone(),
        })
    }

    /// Where a checkpoint written now resumes reading, and the partition's
    /// max event time before that point. Replay must cover the oldest open
    /// file (`open_first`), what the model snapshot lacks (`trained_floor`)
    /// and, while a restored replay is under way, all of it: a checkpoint can
    /// come before the partition's first replayed batch (another partition's
    /// batch triggers it), when no file of this run holds the previous run's
    /// uncommitted rows yet. Forgets the history before the point.
    fn replay_point(&mut self, open_first: Option<i64>, trained_floor: i64) -> (i64, Option<i64>) {
        let replay_floor = if self.replay.is_some() {
            self.replay_floor
        } else {
            i64::MAX
        };
        let wanted = open_first
            .map_or(self.next_offset, |f| f.min(self.next_offset))
            .min(trained_floor)
            .min(replay_floor);
        if wanted >= self.next_offset {
            self.history.clear();
        } else {
            // The latest batch start at or before it; if none, the oldest known
            // point (where this partition was restored or started).
            let i = self
                .history
                .iter()
                .rposition(|(o, _)| *o <= wanted)
                .unwrap_or(0);
            self.history.drain(..i);
        }
        match self.history.front() {
            Some(&(o, ts)) if o < self.next_offset => (o, ts),
            _ => (self.next_offset, self.pw.windower.max_event_time()),
        }
    }
}

/// Windows, SQL, detection and the store over decoded batches.
struct Core {
    sql: SqlEngine,
    params: WindowParams,
    top_n: usize,
    tasks: BTreeMap<i32, Task>,
    /// The instance's watermark over its partitions (with idleness): when a
    /// window is complete enough to score.
    instance: Windower,
    store: Store,
    lateness_ms: i64,
    summary: Summary,
    tracker: crate::alert::AnomalyTracker,
    busy: Duration,
    trainer: Option<mpsc::Sender<TrainMsg>>,
    notifier: Option<crate::notify::Notifier>,
    kafka: bool,
    checkpoints: Option<CheckpointStore>,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    progress: Option<crate::source::kafka::Progress>,
    /// Latest merged rows per window, until scored.
    latest: BTreeMap<i64, BTreeMap<String, MinuteRow>>,
    scored_upto: i64,
    /// Version of file-source emissions (Kafka uses offsets).
    seq: i64,
    /// The input ended (files, generator): every window is complete.
    ended: bool,
    live_every: Option<Duration>,
    last_live: Instant,
    /// Event times of events not yet visible in the store (until the next live tick).
    unseen_ts: Vec<i64>,
    /// Kafka with training: offsets the model snapshot covers, per partition
    /// (a checkpoint never replays from later than these).
    trained: Option<crate::source::kafka::Progress>,
}

impl Core {
    fn new(cfg: &Config, secrets: &Secrets, store: Store, kafka: bool) -> Self {
        let params = WindowParams::from_config(&cfg.window);
        Core {
            sql: SqlEngine::new(),
            params,
            top_n: cfg.window.top_items,
            tasks: BTreeMap::new(),
            instance: Windower::with_idleness(params, cfg.window.idle_partition_ms as i64),
            store,
            lateness_ms: params.allowed_lateness_ms,
            summary: Summary::default(),
            tracker: crate::alert::AnomalyTracker::new(
                cfg.detect.detector(),
                cfg.detect.recover_windows,
            ),
            busy: Duration::ZERO,
            trainer: None,
            notifier: crate::notify::Notifier::from_config(&cfg.detect, &cfg.kafka, secrets),
            kafka,
            checkpoints: kafka
                .then(|| CheckpointStore::new(&cfg.parquet.data_dir, &cfg.kafka.topic)),
            checkpoint_every: Duration::from_millis(cfg.pipeline.checkpoint_ms.max(1)),
            last_checkpoint: Instant::now(),
            progress: None,
            latest: BTreeMap::new(),
            scored_upto: i64::MIN,
            seq: 0,
            ended: false,
            live_every: (cfg.window.live_emit_ms > 0)
                .then(|| Duration::from_millis(cfg.window.live_emit_ms)),
            last_live: Instant::now(),
            unseen_ts: Vec::new(),
            trained: None,
        }
    }

    /// Anomaly detection needs every partition's rows of a window: with
    /// several instances, the owner of partition 0 scores (from the merged rows).
    fn detects(&self) -> bool {
        !self.kafka || self.tasks.contains_key(&0)
    }

    async fn on_assigned(
        &mut self,
        list: Vec<(i32, Option<PartitionCheckpoint>)>,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        for (p, cp) in list {
            send(pq, ParquetMsg::Adopt(p)).await?;
            let task = match &cp {
                Some(cp) => Task::restore(self.params, self.top_n, p, cp).ok_or_else(|| {
                    PipelineError::Stage(format!("checkpoint of partition {p} is corrupt"))
                })?,
                None => Task::fresh(self.params, self.top_n, p),
            };
            tracing::info!(
                partition = p,
                resume = task.next_offset,
                replay_from = cp.as_ref().map(|c| c.replay_from),
                open_windows = task.pw.table.open_windows(),
                "partition owned"
            );
            self.tasks.insert(p, task);
        }
        self.instance.tick(chrono::Utc::now().timestamp_millis());
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        self.instance.set_partitions(&keys);
        Ok(())
    }

    async fn on_revoked(
        &mut self,
        parts: &[i32],
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        for &p in parts {
            if !self.tasks.contains_key(&p) {
                continue;
            }
            self.checkpoint(p, pq).await?;
            ask(pq, |tx| ParquetMsg::DropPartition(p, tx)).await?;
            self.tasks.remove(&p);
            tracing::info!(partition = p, "partition released after checkpoint");
        }
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        self.instance.set_partitions(&keys);
        Ok(())
    }

    /// Writes partition `p`'s checkpoint (its effects so far are durable or in it).
    async fn checkpoint(
        &mut self,
        p: i32,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        let Some(store) = &self.checkpoints else {
            return Ok(());
        };
        let open_first = ask(pq, |tx| ParquetMsg::OpenFirst(p, tx)).await?;
        let Some(t) = self.tasks.get_mut(&p) else {
            return Ok(());
        };
        if t.next_offset == i64::MIN {
            return Ok(()); // nothing consumed yet
        }
        let trained_floor = match &self.trained {
            Some(tr) => tr
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&p)
                .copied()
                .unwrap_or(i64::MIN),
            None => i64::MAX,
        };
        let (replay_from, replay_max_ts) = t.replay_point(open_first, trained_floor);
        let cp = PartitionCheckpoint {
            topic: String::new(),
            partition: p,
            next_offset: t.next_offset,
            replay_from,
            replay_max_ts,
            windows: t.pw.snapshot(),
            pending_stats: t.pending_stats.clone(),
            pending_top: t.pending_top.clone(),
            written_ms: chrono::Utc::now().timestamp_millis(),
        };
        let started = Instant::now();
        store.save(&cp)?;
        metrics::histogram!("pulse_checkpoint_write_seconds")
            .record(started.elapsed().as_secs_f64());
        if let Some(pr) = &self.progress {
            pr.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(p, t.next_offset);
        }
        tracing::debug!(
            partition = p,
            next_offset = cp.next_offset,
            replay_from,
            "checkpoint"
        );
        Ok(())
    }

    async fn on_batch(
        &mut self,
        d: Decoded,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        let t0 = Instant::now();
        self.summary.first_batch_at.get_or_insert(t0);
        let mut fresh_ts: Vec<i64> = Vec::new();
        let now = chrono::Utc::now().timestamp_millis();
        self.instance.tick(now);
        let part_col = |b: &RecordBatch| -> Result<(Vec<i32>, Vec<i64>), PipelineError> {
            let p = b
                .column_by_name("src_partition")
                .and_then(|c| c.as_primitive_opt::<Int32Type>().cloned())
                .ok_or_else(|| PipelineError::Stage("missing src_partition".into()))?;
            let o = b
                .column_by_name("src_offset")
                .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
                .ok_or_else(|| PipelineError::Stage("missing src_offset".into()))?;
            Ok((p.values().to_vec(), o.values().to_vec()))
        };
        let keyed = d.partitioned_time;
        let (dparts, doffs) = part_col(&d.dead_letters)?;
        let (eparts, eoffs) = part_col(&d.events)?;
        let key = |p: i32| if keyed { p } else { 0 };
        // Per partition: first and last offset in this batch (events and dead letters).
        let mut span: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        for (p, o) in dparts.iter().zip(&doffs).chain(eparts.iter().zip(&eoffs)) {
            let e = span.entry(key(*p)).or_insert((*o, *o));
            e.0 = e.0.min(*o);
            e.1 = e.1.max(*o);
        }
        if !self.kafka {
            for &k in span.keys() {
                self.tasks
                    .entry(k)
                    .or_insert_with(|| Task::fresh(self.params, self.top_n, k));
            }
        }
        // Rows of partitions this instance does not own (a chunk read just
        // before a revocation) are left to the owner.
        let owned = |p: &i32| self.tasks.contains_key(&key(*p));
        let unowned = dparts.iter().filter(|p| !owned(p)).count()
            + eparts.iter().filter(|p| !owned(p)).count();
        let (dead, ev) = if unowned > 0 {
            metrics::counter!("pulse_records_unowned_total").increment(unowned as u64);
            let dm = BooleanArray::from(dparts.iter().map(owned).collect::<Vec<_>>());
            let em = BooleanArray::from(eparts.iter().map(owned).collect::<Vec<_>>());
            (
                filter_record_batch(&d.dead_letters, &dm)?,
                filter_record_batch(&d.events, &em)?,
            )
        } else {
            (d.dead_letters, d.events)
        };
        let (eparts, eoffs) = part_col(&ev)?;
        span.retain(|k, _| self.tasks.contains_key(k));
        for (k, (first, _)) in &span {
            if let Some(t) = self.tasks.get_mut(k) {
                let before = match &t.replay {
                    Some(r) if self.kafka && *first < t.next_offset => r.max_event_time(),
                    _ => t.pw.windower.max_event_time(),
                };
                if self.kafka {
                    t.history.push_back((*first, before));
                }
            }
        }

        // The trainer's offsets move past the whole batch, dead letters included.
        let mut trainer_upto: Vec<(i32, i64)> = if self.kafka && self.trainer.is_some() {
            span.iter().map(|(k, (_, last))| (*k, last + 1)).collect()
        } else {
            Vec::new()
        };
        let n_dead = dead.num_rows() as u64;
        self.summary.records += n_dead + ev.num_rows() as u64;
        self.summary.invalid += n_dead;
        for (kind, n) in &d.rejected {
            metrics::counter!("pulse_dead_letters_total", "reason" => *kind).increment(*n);
        }
        if n_dead > 0 {
            send(pq, ParquetMsg::Dead(dead)).await?;
        }
        let n = ev.num_rows();
        if n > 0 {
            self.summary.events += n as u64;
            metrics::counter!("pulse_events_total").increment(n as u64);
            let ts = ev.column(1).as_primitive::<TimestampMillisecondType>();
            let (late0, too_late0) = (self.summary.late, self.summary.too_late);
            let mut ws = Vec::with_capacity(n);
            let mut counted = Vec::with_capacity(n);
            let mut fresh = Vec::with_capacity(n);
            let mut keys = Vec::with_capacity(n);
            let mut lateness = StringBuilder::with_capacity(n, n * 7);
            for (i, &t) in ts.values().iter().enumerate() {
                let k = key(eparts[i]);
                let task = self.tasks.get_mut(&k).expect("owned rows only");
                let replayed = self.kafka && eoffs[i] < task.next_offset;
                let (w, class) = match (&mut task.replay, replayed) {
                    (Some(r), true) => r.observe(k, t),
                    (None, true) => {
                        return Err(PipelineError::Stage(format!(
                            "partition {k} replays offset {} without a replay state",
                            eoffs[i]
                        )));
                    }
                    (_, false) => {
                        self.instance.observe(k, t);
                        task.pw.windower.observe(k, t)
                    }
                };
                if !replayed {
                    fresh_ts.push(t);
                }
                ws.push(w);
                keys.push(k);
                counted.push(!replayed && class != Lateness::TooLate);
                fresh.push(!replayed);
                lateness.append_value(class.as_str());
                if !replayed {
                    match class {
                        Lateness::OnTime => {}
                        Lateness::Late => self.summary.late += 1,
                        Lateness::TooLate => self.summary.too_late += 1,
                    }
                }
            }
            let mut cols = ev.columns().to_vec();
            cols.push(Arc::new(lateness.finish()) as ArrayRef);
            let full = RecordBatch::try_new(events_schema(), cols)?;

            // The SQL input: counted events' grouping columns, bins and partition key.
            let ws_arr =
                Arc::new(TimestampMillisecondArray::from(ws).with_timezone("UTC")) as ArrayRef;
            let pick = |name: &str| -> Result<ArrayRef, PipelineError> {
                full.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| PipelineError::Stage(format!("missing column {name}")))
            };
            let sql_in = RecordBatch::try_new(
                crate::sql::batch_input_schema(),
                vec![
                    ws_arr,
                    pick("service")?,
                    pick("status")?,
                    pick("latency_ms")?,
                    pick("user_id")?,
                    pick("item_id")?,
                    Arc::new(datafusion::arrow::array::Int32Array::from(keys)) as ArrayRef,
                ],
            )?;
            let mask = BooleanArray::from(counted);
            let sql_in = if mask.true_count() == n {
                sql_in
            } else {
                filter_record_batch(&sql_in, &mask)?
            };
            if let Some(t) = &self.trainer {
                // With Kafka the trainer sees replays too and skips what its
                // snapshot holds (it may be older than this checkpoint).
                let fresh = BooleanArray::from(if self.kafka { vec![true; n] } else { fresh });
                let train = if fresh.true_count() == n {
                    full.clone()
                } else {
                    filter_record_batch(&full, &fresh)?
                };
                if train.num_rows() > 0 {
                    let upto = std::mem::take(&mut trainer_upto);
                    to_trainer(t, Some(train), upto).await?;
                }
            }
            send(pq, ParquetMsg::Events(full)).await?;
            if sql_in.num_rows() > 0 {
                for (p, w, svc, part) in self.sql.partials(sql_in.clone()).await? {
                    if let Some(t) = self.tasks.get_mut(&p) {
                        t.pw.table.add_partial(w, &svc, &part);
                    }
                }
                for (p, w, item, c) in self.sql.item_counts(sql_in).await? {
                    if let Some(t) = self.tasks.get_mut(&p) {
                        t.pw.table.add_item_counts(w, item, c);
                    }
                }
            }
            let (late, too_late) = (self.summary.late - late0, self.summary.too_late - too_late0);
            if late > 0 {
                metrics::counter!("pulse_late_events_total", "class" => "late").increment(late);
            }
            if too_late > 0 {
                metrics::counter!("pulse_late_events_total", "class" => "too_late")
                    .increment(too_late);
            }
        }
        if !trainer_upto.is_empty()
            && let Some(t) = &self.trainer
        {
            to_trainer(t, None, trainer_upto).await?;
        }
        // Positions advance, replays end.
        for (k, (_, last)) in &span {
            if let Some(t) = self.tasks.get_mut(k)
                && self.kafka
            {
                t.next_offset = t.next_offset.max(last + 1);
                if t.replay.is_some() && t.history.back().is_some_and(|h| h.0 >= t.next_offset) {
                    t.replay = None;
                }
            }
        }
        let touched: Vec<i32> = span.keys().copied().collect();
        let mut emits = Vec::new();
        // Live values of open windows at most every `live_emit_ms`.
        let live = self
            .live_every
            .is_some_and(|d| self.last_live.elapsed() >= d);
        if live {
            self.last_live = Instant::now();
        }
        for (&k, t) in self.tasks.iter_mut() {
            if !live && !touched.contains(&k) {
                continue;
            }
            t.pw.table.live = live;
            let wm = t.pw.windower.watermark();
            emits.extend(t.pw.table.advance(wm, false).into_iter().map(|e| (k, e)));
        }
        self.emit(emits, pq).await?;
        // Freshness: from event time to the store showing the event (the
        // next live tick, or this batch when live values are off).
        self.unseen_ts.extend(fresh_ts);
        if live || self.live_every.is_none() {
            self.record_freshness();
        }
        self.close_hours(&span.keys().copied().collect::<Vec<_>>(), pq)
            .await?;
        let wm = self.instance.watermark();
        metrics::gauge!("pulse_watermark_ms").set(wm as f64);
        if wm > i64::MIN {
            let lag = now.saturating_sub(wm);
            metrics::gauge!("pulse_watermark_lag_seconds").set(lag as f64 / 1000.0);
        }
        if self.kafka && self.last_checkpoint.elapsed() >= self.checkpoint_every {
            let keys: Vec<i32> = self.tasks.keys().copied().collect();
            for k in keys {
                self.checkpoint(k, pq).await?;
            }
            self.last_checkpoint = Instant::now();
        }
        metrics::histogram!("pulse_batch_seconds").record(t0.elapsed().as_secs_f64());
        self.summary.last_batch_done_at = Some(Instant::now());
        Ok(())
    }

    /// Records the freshness of the events the store now shows.
    fn record_freshness(&mut self) {
        if self.unseen_ts.is_empty() {
            return;
        }
        let done = chrono::Utc::now().timestamp_millis();
        let h = self
            .summary
            .freshness
            .get_or_insert_with(crate::sketch::new_hist);
        let mut worst = 0i64;
        for t in self.unseen_ts.drain(..) {
            let age = done.saturating_sub(t).max(0);
            worst = worst.max(age);
            crate::sketch::record_ms(h, age as f64);
        }
        metrics::histogram!("pulse_event_freshness_seconds").record(worst as f64 / 1000.0);
    }

    /// Writes the pending final rows of hours the partitions' watermarks closed,
    /// and closes their `events`/`dead_letters` files of those hours.
    async fn close_hours(
        &mut self,
        keys: &[i32],
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        for &k in keys {
            let Some(t) = self.tasks.get_mut(&k) else {
                continue;
            };
            let wm = t.pw.windower.watermark();
            if wm == i64::MIN {
                continue;
            }
            let closed = wm.saturating_sub(self.lateness_ms);
            let upto = closed.div_euclid(HOUR_MS) * HOUR_MS;
            let flush = flush_pending(t, upto);
            write_rows(flush, pq, &mut self.summary).await?;
            let part = if self.kafka { Some(k) } else { None };
            send(pq, ParquetMsg::CloseHoursBefore(part, closed)).await?;
        }
        Ok(())
    }

    /// Partials to the store, merged rows back, detection, finals to pending.
    async fn emit(
        &mut self,
        emits: Vec<(i32, WindowEmit)>,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        if emits.is_empty() && !self.detects() {
            return Ok(());
        }
        self.seq += 1;
        self.summary.windows_emitted += emits.len() as u64;
        let mut updates = Vec::new();
        let mut tops = Vec::new();
        let mut finals: Vec<(i32, i64, &str, crate::window::StoredPartial)> = Vec::new();
        for (k, e) in &emits {
            let version = if self.kafka {
                self.tasks.get(k).map_or(0, |t| t.next_offset)
            } else {
                self.seq
            };
            for (svc, p) in &e.services {
                updates.push(PartialUpdate {
                    window_start_ms: e.window_start,
                    service: svc.clone(),
                    partition: *k,
                    version,
                    is_final: e.is_final,
                    partial: p.clone(),
                });
                if e.is_final {
                    finals.push((*k, e.window_start, svc.as_str(), StoredPartial::of(p)));
                }
            }
            tops.push(TopUpdate {
                window_start_ms: e.window_start,
                partition: *k,
                version,
                items: e.top_items.clone(),
            });
        }
        // Final rows per partition, kept until their hour closes.
        if !finals.is_empty() {
            let refs: Vec<_> = finals.iter().map(|(k, w, s, p)| (*k, *w, *s, p)).collect();
            let stats = self.sql.minute_stats(partials_to_batch(&refs)).await?;
            for r in minute_rows(&stats, true) {
                if let Some(t) = self.tasks.get_mut(&r.partition) {
                    t.pending_stats.push(r);
                }
            }
            for (k, e) in emits.iter().filter(|(_, e)| e.is_final) {
                if let Some(t) = self.tasks.get_mut(k) {
                    for (rank, (item, n)) in e.top_items.iter().enumerate() {
                        t.pending_top
                            .push((e.window_start, rank as u64 + 1, *item, *n));
                    }
                }
            }
        }
        // Merged rows over every partition's stored partial.
        let inputs = self.apply_partials_with_retry(&updates).await?;
        let mut latest_input: BTreeMap<(i64, String), MergeInput> = BTreeMap::new();
        for m in inputs {
            let key = (m.window_start_ms, m.service.clone());
            if latest_input
                .get(&key)
                .is_none_or(|c| c.version_sum <= m.version_sum)
            {
                latest_input.insert(key, m);
            }
        }
        let mut rows = Vec::new();
        if !latest_input.is_empty() {
            let all: Vec<(i32, i64, &str, &crate::window::StoredPartial)> = latest_input
                .values()
                .flat_map(|m| {
                    m.parts
                        .iter()
                        .map(move |(_, p)| (-1, m.window_start_ms, m.service.as_str(), p))
                })
                .collect();
            let stats = self.sql.minute_stats(partials_to_batch(&all)).await?;
            for mut r in minute_rows(&stats, false) {
                if let Some(m) = latest_input.get(&(r.window_start_ms, r.service.clone())) {
                    r.is_final = m.all_final;
                    self.latest
                        .entry(r.window_start_ms)
                        .or_default()
                        .insert(r.service.clone(), r.clone());
                    rows.push((r, m.version_sum));
                }
            }
        }
        // Score complete windows once, in order, from the merged rows.
        let (mut anomalies, mut alerts) = (Vec::new(), Vec::new());
        if self.detects() {
            let wm = if self.ended {
                i64::MAX
            } else {
                self.instance.watermark()
            };
            let size = self.params.size_ms;
            let ready: Vec<i64> = self
                .latest
                .range(self.scored_upto.saturating_add(1)..)
                .map(|(w, _)| *w)
                .take_while(|w| w + size <= wm)
                .collect();
            for w in ready {
                let rows_w: Vec<MinuteRow> = self
                    .latest
                    .remove(&w)
                    .unwrap_or_default()
                    .into_values()
                    .collect();
                let refs: Vec<&MinuteRow> = rows_w.iter().collect();
                let (a, al) = self.tracker.observe_window(w, &refs);
                anomalies.extend(a);
                alerts.extend(al);
                self.scored_upto = w;
            }
        }
        let floor = self.scored_upto;
        self.latest.retain(|w, _| *w > floor);
        for a in &alerts {
            tracing::warn!(kind = a.kind, service = %a.service, metrics = ?a.metrics, score = a.score,
                window_start = %crate::source::generator::fmt_ts(a.window_start_ms), "incident");
            metrics::counter!("pulse_alerts_total", "kind" => a.kind).increment(1);
        }
        self.summary.anomalies += anomalies.len() as u64;
        self.summary.alerts.extend(alerts.iter().cloned());
        if rows.is_empty() && tops.is_empty() && anomalies.is_empty() && alerts.is_empty() {
            return Ok(());
        }
        let emission = Emission {
            rows,
            top_items: tops,
            top_n: self.top_n,
            watermark_ms: self.instance.watermark(),
            anomalies,
            alerts,
        };
        self.apply_with_retry(&emission).await?;
        if !emission.anomalies.is_empty() {
            send(
                pq,
                ParquetMsg::Anomalies(anomalies_batch(&emission.anomalies)?),
            )
            .await?;
        }
        if !emission.alerts.is_empty()
            && let Some(n) = &self.notifier
        {
            n.notify(&emission.alerts);
        }
        Ok(())
    }

    async fn apply_partials_with_retry(
        &self,
        ups: &[PartialUpdate],
    ) -> Result<Vec<MergeInput>, PipelineError> {
        with_retry(|| self.store.put_partials(ups)).await
    }

    async fn apply_with_retry(&self, e: &Emission) -> Result<(), PipelineError> {
        with_retry(|| self.store.apply(e)).await
    }

    /// End of the run. Files and the generator ended: every window is
    /// finalised and written. Kafka only stopped: open windows stay open in
    /// the checkpoints (finalising them now would count their later events
    /// twice), open files are committed so the restart replays nothing.
    async fn finish(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        if self.kafka {
            // The store gets the latest values of the windows still open.
            let mut emits = Vec::new();
            for (&k, t) in self.tasks.iter_mut() {
                t.pw.table.live = true;
                let wm = t.pw.windower.watermark();
                emits.extend(t.pw.table.advance(wm, false).into_iter().map(|e| (k, e)));
            }
            self.emit(emits, pq).await?;
            self.record_freshness();
            for k in keys {
                ask(pq, |tx| ParquetMsg::ClosePartition(k, tx)).await?;
                self.checkpoint(k, pq).await?;
            }
            return Ok(());
        }
        let mut emits = Vec::new();
        for &k in &keys {
            let t = self.tasks.get_mut(&k).expect("listed");
            let wm = t.pw.windower.watermark();
            emits.extend(t.pw.table.advance(wm, true).into_iter().map(|e| (k, e)));
        }
        // Score what is left, as if the watermark had passed everything.
        self.ended = true;
        self.emit(emits, pq).await?;
        for k in keys {
            let t = self.tasks.get_mut(&k).expect("listed");
            let flush = flush_pending(t, i64::MAX);
            write_rows(flush, pq, &mut self.summary).await?;
        }
        Ok(())
    }
}

/// Runs a store write, retrying connection-level failures with backoff.
async fn with_retry<T, F, Fut>(mut f: F) -> Result<T, PipelineError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(err) if err.is_retryable() && attempt < 8 => {
                tracing::warn!(error = %err, attempt, "store write failed, retrying");
                metrics::counter!("pulse_store_retries_total").increment(1);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// A partition's final rows to write: minute_stats rows, top items
/// (window_start_ms, rank, item, requests), and the partition.
type FinalRows = (Vec<MinuteRow>, Vec<(i64, u64, u64, i64)>, i32);

/// Takes a task's pending final rows of windows before `upto`.
fn flush_pending(t: &mut Task, upto: i64) -> FinalRows {
    let (stats, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.pending_stats)
        .into_iter()
        .partition(|r| r.window_start_ms < upto);
    t.pending_stats = keep;
    let (top, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut t.pending_top)
        .into_iter()
        .partition(|r| r.0 < upto);
    t.pending_top = keep;
    (stats, top, t.pw.key)
}

async fn write_rows(
    (stats, top, key): FinalRows,
    pq: &mpsc::Sender<ParquetMsg>,
    summary: &mut Summary,
) -> Result<(), PipelineError> {
    if !stats.is_empty() {
        summary.minute_rows_final += stats.len() as u64;
        let b = minute_rows_batch(&stats);
        summary.final_rows.extend(stats);
        send(pq, ParquetMsg::MinuteStats(b)).await?;
    }
    if !top.is_empty() {
        send(pq, ParquetMsg::TopItems(top_items_batch(&top, key)?)).await?;
    }
    Ok(())
}

fn anomalies_batch(a: &[crate::alert::Anomaly]) -> Result<RecordBatch, PipelineError> {
    use datafusion::arrow::array::{Float64Array, StringArray};
    Ok(RecordBatch::try_new(
        crate::model::anomalies_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    a.iter().map(|x| x.window_start_ms).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                a.iter().map(|x| x.service.as_str()).collect::<Vec<_>>(),
            )),
            Arc::new(StringArray::from(
                a.iter().map(|x| x.metric).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                a.iter().map(|x| x.value).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                a.iter().map(|x| x.score).collect::<Vec<_>>(),
            )),
        ],
    )?)
}

fn top_items_batch(rows: &[(i64, u64, u64, i64)], key: i32) -> Result<RecordBatch, PipelineError> {
    Ok(RecordBatch::try_new(
        crate::model::top_items_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())
                    .with_timezone("UTC"),
            ),
            Arc::new(datafusion::arrow::array::UInt64Array::from(
                rows.iter().map(|r| r.1).collect::<Vec<_>>(),
            )),
            Arc::new(datafusion::arrow::array::UInt64Array::from(
                rows.iter().map(|r| r.2).collect::<Vec<_>>(),
            )),
            Arc::new(datafusion::arrow::array::Int64Array::from(
                rows.iter().map(|r| r.3).collect::<Vec<_>>(),
            )),
            Arc::new(datafusion::arrow::array::Int32Array::from(vec![
                key;
                rows.len()
            ])),
        ],
    )?)
}

/// Sends a request to the parquet stage and waits for its answer (it comes
/// after every message sent before).
async fn ask<T>(
    pq: &mpsc::Sender<ParquetMsg>,
    make: impl FnOnce(oneshot::Sender<T>) -> ParquetMsg,
) -> Result<T, PipelineError> {
    let (tx, rx) = oneshot::channel();
    send(pq, make(tx)).await?;
    rx.await
        .map_err(|_| PipelineError::Stage("parquet writer stopped".into()))
}

async fn to_trainer(
    t: &mpsc::Sender<TrainMsg>,
    batch: Option<RecordBatch>,
    upto: Vec<(i32, i64)>,
) -> Result<(), PipelineError> {
    t.send(TrainMsg { batch, upto })
        .await
        .map_err(|_| PipelineError::Stage("factor trainer stopped".into()))
}

async fn send(pq: &mpsc::Sender<ParquetMsg>, m: ParquetMsg) -> Result<(), PipelineError> {
    pq.send(m)
        .await
        .map_err(|_| PipelineError::Stage("parquet writer stopped".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> WindowParams {
        WindowParams::from_config(&crate::config::WindowConfig::default())
    }

    #[cfg(target_os = "linux")]
    fn own_nice() -> i32 {
        // SAFETY: reads the calling thread's own nice value.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        }
    }

    /// Stages run on their own named threads; the trainer's neighbours at a
    /// lower priority, the rest (and the caller) at the caller's.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn stages_yielding_to_the_trainer_run_at_a_lower_priority() {
        let base = own_nice();
        let probe = || {
            let name = std::thread::current().name().map(str::to_string);
            (name, own_nice())
        };
        let low = spawn_stage("probe-low", true, probe).unwrap();
        let same = spawn_stage("probe-same", false, probe).unwrap();
        let (low_name, low_nice) = join_stage("probe-low", low).await.unwrap();
        let (same_name, same_nice) = join_stage("probe-same", same).await.unwrap();
        assert_eq!(low_name.as_deref(), Some("pulse-probe-low"));
        assert_eq!(same_name.as_deref(), Some("pulse-probe-same"));
        assert_eq!(low_nice, (base + BELOW_TRAINER).min(19));
        assert_eq!(same_nice, base);
        assert_eq!(own_nice(), base, "the caller keeps its priority");
        let panicked = spawn_stage("probe-panic", false, || panic!("boom")).unwrap();
        let err = join_stage("probe-panic", panicked).await.unwrap_err();
        assert!(
            err.to_string().contains("probe-panic stage panicked"),
            "{err}"
        );
    }

    /// A partition restored from a checkpoint that asks to replay 100..500.
    fn restored() -> Task {
        let cp = PartitionCheckpoint {
            topic: String::new(),
            partition: 1,
            next_offset: 500,
            replay_from: 100,
            replay_max_ts: Some(1_000),
            windows: Task::fresh(params(), 10, 1).pw.snapshot(),
            pending_stats: Vec::new(),
            pending_top: Vec::new(),
            written_ms: 0,
        };
        Task::restore(params(), 10, 1, &cp).expect("valid checkpoint")
    }

    #[test]
    fn a_checkpoint_before_the_replay_arrives_keeps_the_replay_point() {
        // No file of this run is open for the partition yet and the model
        // snapshot covers everything: the rows 100..500 the last run left
        // uncommitted are still only in the log.
        let mut t = restored();
        assert_eq!(t.replay_point(None, 500), (100, Some(1_000)));
        assert_eq!(t.replay_point(None, i64::MAX), (100, Some(1_000)));
        // the replay under way: batches from 100 on, files open from 100
        t.history.push_back((100, Some(1_000)));
        t.history.push_back((300, Some(1_200)));
        assert_eq!(t.replay_point(Some(100), 500).0, 100);
    }

    #[test]
    fn once_the_replay_is_done_the_point_follows_the_open_files() {
        let mut t = restored();
        t.replay = None; // a batch from 500 on ended it
        t.history.push_back((500, Some(2_000)));
        t.history.push_back((800, Some(3_000)));
        t.next_offset = 900;
        // the oldest open file starts at 820: resume from the batch holding it
        assert_eq!(t.replay_point(Some(820), i64::MAX), (800, Some(3_000)));
        // the model snapshot lacks 600..: the batch starting at or before 600
        t.history.push_front((500, Some(2_000)));
        assert_eq!(t.replay_point(Some(820), 600), (500, Some(2_000)));
        // everything committed and learned: nothing to replay
        assert_eq!(t.replay_point(None, 900).0, 900);
        assert!(t.history.is_empty());
    }
}
