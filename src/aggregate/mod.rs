//! The core stage: per-partition event-time windows, the per-window SQL,
//! anomaly scoring and the aggregate store, over the decoded batches.
//!
//! Consumes the decode stage's [`DecodeMsg`]s in source order: batches of
//! events and dead letters, and (Kafka) partitions gained, with the
//! checkpoint each resumes from, and lost. Produces: every record to the
//! Parquet stage (`events` with its lateness class, `dead_letters`), window
//! partials to the store and merged rows back, scored windows' anomalies and
//! incidents (store, `anomalies`, notifier), final `minute_stats` and
//! `top_items` rows once their hour closes, fresh events to the factor
//! trainer, and per-partition checkpoints. Delivery: files and generator runs
//! are complete or fail; with Kafka, each partition's checkpoint holds every
//! effect of its records that is not yet durable, with the offset to replay
//! the still-open Parquet files from ([`crate::checkpoint`]); on assignment
//! the partition resumes from there, the Parquet writer skips rows already
//! committed, and the store's writes are version-guarded. Revocation and
//! shutdown checkpoint first; shutdown never finalises open windows. Every
//! write for a partition is fenced by its ownership epoch ([`crate::fence`]):
//! a partition another instance took over is dropped unwritten. Scoring runs
//! on partition 0's owner and its state (detectors, last window scored,
//! unscored rows) is checkpointed with partition 0, so it moves warm.

mod task;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::{Int32Type, Int64Type, TimestampMillisecondType};
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, oneshot, watch};

use crate::checkpoint::{CheckpointStore, PartitionCheckpoint, ScorerCheckpoint};
use crate::config::{Config, Secrets};
use crate::decode::Decoded;
use crate::decode::admit::AdmittedServices;
use crate::decode::stage::DecodeMsg;
use crate::detect::incidents::{AnomalyTracker, anomalies_batch};
use crate::error::PipelineError;
use crate::factors::stage::TrainMsg;
use crate::fence::Fence;
use crate::model::{
    MinuteRow, Progress, TopItemRow, events_schema, minute_rows, minute_rows_batch, top_items_batch,
};
use crate::sink::notify::Notifier;
use crate::sink::parquet::WrittenFile;
use crate::sink::parquet::stage::ParquetMsg;
use crate::sink::store::{Emission, MergeInput, PartialUpdate, ServiceStatus, Store, TopUpdate};
use crate::window::sql::{PartialRef, SqlEngine, partials_to_batch};
use crate::window::{Lateness, StoredPartial, WindowEmit, WindowParams, Windower};
use task::{FinalRows, Task, flush_pending};

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
    pub alerts: Vec<crate::detect::incidents::Alert>,
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

/// How long a stopping run waits for its alerts to be delivered.
const ALERT_DRAIN: Duration = Duration::from_secs(10);

/// Hours: final rows are written, and files closed, by the hour.
const HOUR_MS: i64 = 3_600_000;

/// The rows of a decoded batch this instance owns.
struct OwnedRows {
    dead: RecordBatch,
    events: RecordBatch,
    /// Source partition and offset of each event.
    parts: Vec<i32>,
    offsets: Vec<i64>,
    /// Per owned partition key: first and last offset in the batch (events
    /// and dead letters).
    span: BTreeMap<i32, (i64, i64)>,
}

/// A batch's events classified against the watermarks.
struct Classified {
    /// The events with their `lateness` column.
    full: RecordBatch,
    /// Per event: its window's start, its partition key, whether it counts
    /// in the windows (fresh and not too late), whether it is fresh (not a
    /// replay).
    bins: Vec<i64>,
    keys: Vec<i32>,
    counted: Vec<bool>,
    fresh: Vec<bool>,
}

/// The core stage's state: windows, SQL, detection and the store over
/// decoded batches, for every owned partition.
pub struct Core {
    sql: SqlEngine,
    params: WindowParams,
    top_n: usize,
    tasks: BTreeMap<i32, Task>,
    /// The instance's watermark over its partitions (with idleness): when a
    /// window is complete enough to score.
    instance: Windower,
    store: Store,
    lateness_ms: i64,
    /// Final minute rows wait for their hour to close (one file per hour)
    /// at most this long: then they are written, for readers' freshness.
    commit_after: Duration,
    last_final_flush: Instant,
    summary: Summary,
    tracker: AnomalyTracker,
    busy: Duration,
    trainer: Option<mpsc::Sender<TrainMsg>>,
    notifier: Option<Notifier>,
    kafka: bool,
    checkpoints: Option<CheckpointStore>,
    checkpoint_every: Duration,
    last_checkpoint: Instant,
    progress: Option<Progress>,
    /// Latest merged rows per window, until scored.
    latest: BTreeMap<i64, BTreeMap<String, MinuteRow>>,
    scored_upto: i64,
    /// Version of file-source emissions (Kafka uses offsets).
    seq: i64,
    live_every: Option<Duration>,
    last_live: Instant,
    /// Event times of events not yet visible in the store (until the next live tick).
    unseen_ts: Vec<i64>,
    /// The store's lost-data generation last acted on.
    lost_seen: u64,
    /// Batches were processed since the last checkpoint.
    since_checkpoint: bool,
    /// The services each partition admitted (decode stage), for checkpoints.
    admitted: AdmittedServices,
    /// The next emission carries every service's incident status.
    republish_status: bool,
    /// Merged rows have included partitions other instances own: while the
    /// store is degraded, scoring waits for their partials.
    remote_parts: bool,
    /// Kafka: the partitions' ownership epochs (a partition another
    /// instance took over is dropped at the first write that finds it out).
    fence: Option<Arc<Fence>>,
    /// The tracker's last scored window when its state was last saved.
    detectors_saved: Option<i64>,
}

impl Core {
    /// `trainer`: where fresh events go to be learned (file and generator
    /// runs; Kafka runs train the fleet's model apart); `progress`: where
    /// checkpointed offsets are published.
    pub fn new(
        cfg: &Config,
        secrets: &Secrets,
        store: Store,
        kafka: bool,
        trainer: Option<mpsc::Sender<TrainMsg>>,
        progress: Progress,
    ) -> Self {
        let params = WindowParams::from_config(&cfg.window);
        let store_lost = store.lost_generation();
        Core {
            sql: SqlEngine::new(),
            params,
            top_n: cfg.window.top_items,
            tasks: BTreeMap::new(),
            instance: Windower::with_idleness(params, cfg.window.idle_partition_ms as i64),
            store,
            lateness_ms: params.allowed_lateness_ms,
            commit_after: cfg.parquet.roll_after(),
            last_final_flush: Instant::now(),
            summary: Summary::default(),
            tracker: AnomalyTracker::new(cfg.detect.detector(), cfg.detect.recover_windows)
                .with_drift(cfg.detect.drift_config()),
            detectors_saved: None,
            busy: Duration::ZERO,
            trainer,
            notifier: Notifier::from_config(&cfg.detect, &cfg.kafka, secrets),
            kafka,
            checkpoints: kafka
                .then(|| CheckpointStore::new(&cfg.parquet.state_dir(), &cfg.kafka.topic)),
            checkpoint_every: Duration::from_millis(cfg.pipeline.checkpoint_ms.max(1)),
            last_checkpoint: Instant::now(),
            progress: Some(progress),
            latest: BTreeMap::new(),
            scored_upto: i64::MIN,
            seq: 0,
            live_every: (cfg.window.live_emit_ms > 0)
                .then(|| Duration::from_millis(cfg.window.live_emit_ms)),
            last_live: Instant::now(),
            unseen_ts: Vec::new(),
            lost_seen: store_lost,
            since_checkpoint: false,
            admitted: AdmittedServices::default(),
            republish_status: false,
            remote_parts: false,
            fence: None,
        }
    }

    /// Scoring moves away (partition 0 revoked or lost): forget its state;
    /// the next owner resumes from the checkpoint.
    fn stop_scoring(&mut self) {
        self.tracker = self.tracker.fresh();
        self.latest.clear();
        self.scored_upto = i64::MIN;
        self.detectors_saved = None;
    }

    /// Scoring moves here (partition 0 assigned with a checkpoint): the
    /// detectors, the last window scored and the rows still unscored, as the
    /// previous owner left them. No warm-up, no window scored twice.
    fn resume_scoring(&mut self, sc: &ScorerCheckpoint) {
        let Some(store) = &self.checkpoints else {
            return;
        };
        let restored = match store.load_detectors() {
            Ok(Some(bytes)) => match ciborium::from_reader::<AnomalyTracker, _>(bytes.as_slice()) {
                Ok(t) if t.same_settings(&self.tracker) => {
                    Some(t.with_drift(self.tracker.drift_config().cloned()))
                }
                Ok(_) => {
                    tracing::warn!(
                        "stored detector state has other settings: detectors start cold"
                    );
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stored detector state unreadable: detectors start cold");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the detector state: detectors start cold");
                None
            }
        };
        if let Some(t) = restored {
            tracing::info!(
                services = t.services(),
                last_window = ?t.last_window().map(crate::timefmt::fmt_ts),
                scored_upto = %crate::timefmt::fmt_ts(sc.scored_upto),
                unscored_rows = sc.unscored.len(),
                "scoring resumed from the stored detector state"
            );
            self.detectors_saved = t.last_window();
            self.tracker = t;
        }
        self.scored_upto = sc.scored_upto;
        // The stored rows were merged by the previous owner before other
        // instances' last writes: re-read before scoring.
        self.remote_parts = true;
        for r in &sc.unscored {
            self.latest
                .entry(r.window_start_ms)
                .or_default()
                .insert(r.service.clone(), r.clone());
        }
    }

    /// Re-reads, just before scoring, every service's merged row of the
    /// windows about to be scored. A row merged at this instance's last
    /// write of a window lacks what other instances wrote to it since (and a
    /// row restored from the previous scorer, what was written after its
    /// checkpoint): scored stale, it would look like a traffic drop. Returns
    /// the fresh rows with their versions, for the store; `None` when Redis
    /// could not be read (degraded, writes queued, no reply): the windows
    /// then wait for a later step rather than be scored stale.
    async fn refresh_rows(
        &mut self,
        ready: &[i64],
    ) -> Result<Option<Vec<(MinuteRow, i64)>>, PipelineError> {
        let mut keys: Vec<(i64, String)> = Vec::new();
        for w in ready {
            let mut names: BTreeSet<&str> = self.tracker.service_names().collect();
            if let Some(rows) = self.latest.get(w) {
                names.extend(rows.keys().map(String::as_str));
            }
            keys.extend(names.into_iter().map(|s| (*w, s.to_string())));
        }
        let Some(inputs) = self.store.read_merged(&keys).await else {
            return Ok(None);
        };
        let inputs: Vec<&MergeInput> = inputs.iter().collect();
        self.merged_rows(&inputs).await.map(Some)
    }

    /// The merged rows of (window, service) inputs, each over every
    /// partition's partial, with the version sums they were computed from.
    /// The scorer keeps the rows of windows it has not scored yet, with their
    /// distributions for drift detection.
    async fn merged_rows(
        &mut self,
        inputs: &[&MergeInput],
    ) -> Result<Vec<(MinuteRow, i64)>, PipelineError> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let parts: Vec<PartialRef> = inputs
            .iter()
            .flat_map(|m| {
                m.parts.iter().map(move |(_, p)| PartialRef {
                    partition: -1,
                    window_start_ms: m.window_start_ms,
                    service: m.service.as_str(),
                    partial: p,
                })
            })
            .collect();
        let stats = self.sql.minute_stats(partials_to_batch(&parts)).await?;
        let by_key: BTreeMap<(i64, &str), &MergeInput> = inputs
            .iter()
            .map(|m| ((m.window_start_ms, m.service.as_str()), *m))
            .collect();
        let scoring = self.detects();
        let drift = self.tracker.drift_config().is_some();
        let mut out = Vec::with_capacity(inputs.len());
        for mut r in minute_rows(&stats, false) {
            let Some(&m) = by_key.get(&(r.window_start_ms, r.service.as_str())) else {
                continue;
            };
            r.is_final = m.all_final;
            if scoring && r.window_start_ms > self.scored_upto {
                let mut kept = r.clone();
                if drift {
                    kept.dist = Some(Box::new(drift_sketch(m)));
                }
                self.latest
                    .entry(r.window_start_ms)
                    .or_default()
                    .insert(r.service.clone(), kept);
            }
            out.push((r, m.version_sum));
        }
        Ok(out)
    }

    /// Where the source claims the partitions' ownership epochs.
    pub fn set_fence(&mut self, fence: Option<Arc<Fence>>) {
        self.fence = fence;
    }

    /// The epoch this instance's writes for partition `p` carry (0 without Kafka).
    fn epoch(&self, p: i32) -> u64 {
        self.fence.as_ref().map_or(0, |f| f.epoch(p))
    }

    /// Partition `p` was taken over by another instance while this one was
    /// away (frozen, cut off): its state here is stale. Forget it without
    /// writing anything; the group gives it back if it ever must.
    async fn fenced_out(
        &mut self,
        p: i32,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        ask(pq, |tx| ParquetMsg::DropPartition(p, tx)).await?;
        self.tasks.remove(&p);
        if p == 0 {
            self.stop_scoring();
        }
        if let Some(pr) = &self.progress {
            pr.lock().unwrap_or_else(|e| e.into_inner()).remove(&p);
        }
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        self.instance.set_partitions(&keys);
        tracing::error!(
            partition = p,
            "partition lost to another instance: its state here was dropped unwritten"
        );
        Ok(())
    }

    /// The stage's loop over the decode stage's messages, until that
    /// channel closes (the source ended or stopped). A shutdown request only
    /// stops watching `shutdown`: the source stops and what it sent before
    /// is drained here.
    pub async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<DecodeMsg<PartitionCheckpoint>>,
        pq: &mpsc::Sender<ParquetMsg>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<(), PipelineError> {
        let mut watching = true;
        // Between batches: checkpoints of what the last batches did, and
        // merges Redis handed back after an outage.
        let mut tick = tokio::time::interval(self.checkpoint_every.max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let d = if watching {
                tokio::select! {
                    d = rx.recv() => d,
                    _ = tick.tick() => {
                        let t0 = Instant::now();
                        self.on_tick(pq).await?;
                        self.busy += t0.elapsed();
                        continue;
                    }
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
                rx.recv().await
            };
            let Some(d) = d else { break };
            let t0 = Instant::now();
            match d {
                DecodeMsg::Batch(d) => self.on_batch(d, pq).await?,
                DecodeMsg::Assigned(a) => self.on_assigned(a, pq).await?,
                DecodeMsg::Revoked(parts, ack) => {
                    self.on_revoked(&parts, pq).await?;
                    let _ = ack.send(());
                }
            }
            self.busy += t0.elapsed();
        }
        Ok(())
    }

    /// Where the decode stage publishes the services each partition admitted.
    pub fn set_admitted(&mut self, a: AdmittedServices) {
        self.admitted = a;
    }

    /// Stops sending events to the factor trainer (its input closes once
    /// every other sender is gone).
    pub fn stop_training(&mut self) {
        self.trainer = None;
    }

    /// The stage's busy time so far.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    /// What the stage did: counts, final rows, alerts, freshness, and the
    /// instance's watermark where it saw events.
    pub fn into_summary(self) -> Summary {
        let mut s = self.summary;
        s.watermark_ms = self
            .instance
            .max_event_time()
            .map(|_| self.instance.watermark());
        s
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
            if p == 0
                && let Some(sc) = cp.as_ref().and_then(|c| c.scorer.as_ref())
            {
                self.resume_scoring(sc);
            }
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
            if p == 0 {
                self.stop_scoring();
            }
            tracing::info!(partition = p, "partition released after checkpoint");
        }
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        self.instance.set_partitions(&keys);
        Ok(())
    }

    /// Checkpoints every owned partition.
    async fn checkpoint_all(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
        let keys: Vec<i32> = self.tasks.keys().copied().collect();
        for k in keys {
            self.checkpoint(k, pq).await?;
        }
        self.last_checkpoint = Instant::now();
        self.since_checkpoint = false;
        Ok(())
    }

    /// No batch for a while: checkpoint what the last ones did (a quiet
    /// stream must not leave it to the next batch), and merge what Redis
    /// handed back after an outage or needs again after losing its data.
    async fn on_tick(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
        if self.kafka
            && self.since_checkpoint
            && self.last_checkpoint.elapsed() >= self.checkpoint_every
        {
            self.checkpoint_all(pq).await?;
        }
        let republish = self.republish_if_lost();
        if republish.is_some() {
            // The trainer looks at the store between messages: wake it.
            if let Some(tr) = &self.trainer {
                to_trainer(tr, None).await?;
            }
        }
        if republish.is_some() || self.store.has_late_merges() {
            self.emit(republish.unwrap_or_default(), pq).await?;
        }
        Ok(())
    }

    /// When the store lost its data since the last call: every open window
    /// of every owned partition, and the incident status with the next
    /// emission, which is what such a store needs again.
    fn republish_if_lost(&mut self) -> Option<Vec<(i32, WindowEmit)>> {
        let lost = self.store.lost_generation();
        if lost == self.lost_seen {
            return None;
        }
        self.lost_seen = lost;
        let mut emits = Vec::new();
        for (&k, t) in self.tasks.iter() {
            emits.extend(t.pw.table.emit_open().into_iter().map(|e| (k, e)));
        }
        tracing::warn!(
            windows = emits.len(),
            services = self.tracker.statuses().len(),
            "re-publishing open windows and incident status to an emptied store"
        );
        self.republish_status = true;
        Some(emits)
    }

    /// Writes partition `p`'s checkpoint (its effects so far are durable or in it).
    async fn checkpoint(
        &mut self,
        p: i32,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        if self.checkpoints.is_none() || !self.tasks.contains_key(&p) {
            return Ok(());
        }
        if let Some(f) = &self.fence
            && !f.holds(p, "checkpoint")
        {
            return self.fenced_out(p, pq).await;
        }
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
        let (replay_from, replay_max_ts) = t.replay_point(open_first);
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
            services: self
                .admitted
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&p)
                .cloned()
                .unwrap_or_default(),
            scorer: (p == 0).then(|| ScorerCheckpoint {
                scored_upto: self.scored_upto,
                unscored: self
                    .latest
                    .values()
                    .flat_map(|m| m.values().cloned())
                    .collect(),
            }),
        };
        let started = Instant::now();
        if p == 0 && self.tracker.last_window() != self.detectors_saved {
            // The detectors scored something new: store them first, so the
            // checkpoint never points past the state they are in.
            let mut bytes = Vec::new();
            ciborium::into_writer(&self.tracker, &mut bytes).map_err(|e| {
                PipelineError::Stage(format!("cannot encode the detector state: {e}"))
            })?;
            store.save_detectors(&bytes)?;
            metrics::gauge!("pulse_detector_state_bytes").set(bytes.len() as f64);
            self.detectors_saved = self.tracker.last_window();
        }
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
        let now = chrono::Utc::now().timestamp_millis();
        self.instance.tick(now);
        let keyed = d.partitioned_time;
        let OwnedRows {
            dead,
            events: ev,
            parts: eparts,
            offsets: eoffs,
            span,
        } = self.own_rows(d.dead_letters, d.events, keyed)?;
        self.mark_batch_starts(&span);

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
            let (late0, too_late0) = (self.summary.late, self.summary.too_late);
            let Classified {
                full,
                bins: ws,
                keys,
                counted,
                fresh,
            } = self.classify(&ev, &eparts, &eoffs, keyed)?;

            // The SQL input: counted events' grouping columns, bins and partition key.
            let ws_arr =
                Arc::new(TimestampMillisecondArray::from(ws).with_timezone("UTC")) as ArrayRef;
            let pick = |name: &str| -> Result<ArrayRef, PipelineError> {
                full.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| PipelineError::Stage(format!("missing column {name}")))
            };
            let sql_in = RecordBatch::try_new(
                crate::window::sql::batch_input_schema(),
                vec![
                    ws_arr,
                    pick("service")?,
                    pick("status")?,
                    pick("latency_ms")?,
                    pick("user_id")?,
                    pick("item_id")?,
                    Arc::new(datafusion::arrow::array::Int32Array::from(keys)) as ArrayRef,
                    pick("event_type")?,
                ],
            )?;
            let mask = BooleanArray::from(counted);
            let sql_in = if mask.true_count() == n {
                sql_in
            } else {
                filter_record_batch(&sql_in, &mask)?
            };
            if let Some(t) = &self.trainer {
                let fresh = BooleanArray::from(fresh);
                let train = if fresh.true_count() == n {
                    full.clone()
                } else {
                    filter_record_batch(&full, &fresh)?
                };
                if train.num_rows() > 0 {
                    to_trainer(t, Some(train)).await?;
                }
            }
            send(pq, ParquetMsg::Events(full)).await?;
            if sql_in.num_rows() > 0 {
                for r in self.sql.partials(sql_in.clone()).await? {
                    if let Some(t) = self.tasks.get_mut(&r.partition) {
                        t.pw.table
                            .add_partial(r.window_start_ms, &r.service, &r.partial);
                    }
                }
                for c in self.sql.item_counts(sql_in).await? {
                    if let Some(t) = self.tasks.get_mut(&c.partition) {
                        t.pw.table
                            .add_item_counts(c.window_start_ms, c.item, c.requests);
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
        // Redis came back empty: every open window again, with the status.
        if let Some(again) = self.republish_if_lost() {
            emits = again;
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
        // Freshness (of the fresh events `classify` noted): from event time
        // to the store showing the event (the next live tick, or this batch
        // when live values are off).
        if live || self.live_every.is_none() {
            self.record_freshness();
        }
        self.close_hours(&span.keys().copied().collect::<Vec<_>>(), pq)
            .await?;
        let wm = self.instance.watermark();
        metrics::gauge!("pulse_watermark_timestamp_seconds").set(wm as f64 / 1000.0);
        if wm > i64::MIN {
            let lag = now.saturating_sub(wm);
            metrics::gauge!("pulse_watermark_lag_seconds").set(lag as f64 / 1000.0);
        }
        self.since_checkpoint = true;
        if self.kafka && self.last_checkpoint.elapsed() >= self.checkpoint_every {
            self.checkpoint_all(pq).await?;
        }
        metrics::histogram!("pulse_batch_seconds").record(t0.elapsed().as_secs_f64());
        self.summary.last_batch_done_at = Some(Instant::now());
        Ok(())
    }

    /// Splits a decoded batch into the rows of partitions this instance
    /// owns (a chunk read just before a revocation is left to the new
    /// owner), with each owned partition's first and last offset in it.
    /// File and generator runs own every partition they see.
    fn own_rows(
        &mut self,
        dead_letters: RecordBatch,
        events: RecordBatch,
        keyed: bool,
    ) -> Result<OwnedRows, PipelineError> {
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
        let (dparts, doffs) = part_col(&dead_letters)?;
        let (eparts, eoffs) = part_col(&events)?;
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
        let (dead, ev, eparts, eoffs) = if unowned > 0 {
            metrics::counter!("pulse_records_unowned_total").increment(unowned as u64);
            let dm = BooleanArray::from(dparts.iter().map(owned).collect::<Vec<_>>());
            let em = BooleanArray::from(eparts.iter().map(owned).collect::<Vec<_>>());
            let ev = filter_record_batch(&events, &em)?;
            let (eparts, eoffs) = part_col(&ev)?;
            (filter_record_batch(&dead_letters, &dm)?, ev, eparts, eoffs)
        } else {
            (dead_letters, events, eparts, eoffs)
        };
        span.retain(|k, _| self.tasks.contains_key(k));
        Ok(OwnedRows {
            dead,
            events: ev,
            parts: eparts,
            offsets: eoffs,
            span,
        })
    }

    /// Kafka: records where each partition's batch starts and the
    /// partition's max event time before it (the points a checkpoint can
    /// replay from).
    fn mark_batch_starts(&mut self, span: &BTreeMap<i32, (i64, i64)>) {
        for (k, (first, _)) in span {
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
    }

    /// Classifies each event against its partition's watermark (a replayed
    /// one as it was classified the first time), assigns its window, counts
    /// late ones and notes fresh ones' event times for freshness; returns
    /// the events with their lateness column.
    fn classify(
        &mut self,
        ev: &RecordBatch,
        eparts: &[i32],
        eoffs: &[i64],
        keyed: bool,
    ) -> Result<Classified, PipelineError> {
        let key = |p: i32| if keyed { p } else { 0 };
        let n = ev.num_rows();
        let ts = ev.column(1).as_primitive::<TimestampMillisecondType>();
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
                // shown once the store has it (see `record_freshness`)
                self.unseen_ts.push(t);
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
        Ok(Classified {
            full,
            bins: ws,
            keys,
            counted,
            fresh,
        })
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
        if self.last_final_flush.elapsed() >= self.commit_after {
            self.last_final_flush = Instant::now();
            for t in self.tasks.values_mut() {
                let flush = flush_pending(t, i64::MAX);
                write_rows(flush, pq, &mut self.summary).await?;
            }
        }
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
                    epoch: self.epoch(*k),
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
                epoch: self.epoch(*k),
                items: e.top_items.clone(),
            });
        }
        // Final rows per partition, kept until their hour closes.
        if !finals.is_empty() {
            let refs: Vec<PartialRef> = finals
                .iter()
                .map(|(k, w, s, p)| PartialRef {
                    partition: *k,
                    window_start_ms: *w,
                    service: s,
                    partial: p,
                })
                .collect();
            let stats = self.sql.minute_stats(partials_to_batch(&refs)).await?;
            for r in minute_rows(&stats, true) {
                if let Some(t) = self.tasks.get_mut(&r.partition) {
                    t.pending_stats.push(r);
                }
            }
            for (k, e) in emits.iter().filter(|(_, e)| e.is_final) {
                if let Some(t) = self.tasks.get_mut(k) {
                    for (rank, (item, n)) in e.top_items.iter().enumerate() {
                        t.pending_top.push(TopItemRow {
                            window_start_ms: e.window_start,
                            rank: rank as u64 + 1,
                            item: *item,
                            requests: *n,
                        });
                    }
                }
            }
        }
        // Merged rows over every partition's stored partial.
        let mut inputs = self.store.put_partials(&updates).await?;
        let degraded = self.store.degraded();
        if !degraded {
            let owned = &self.tasks;
            self.remote_parts |= inputs
                .iter()
                .any(|m| m.parts.iter().any(|(p, _)| !owned.contains_key(p)));
        }
        inputs.extend(self.store.take_late_merges());
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
        let inputs: Vec<&MergeInput> = latest_input.values().collect();
        let mut rows = self.merged_rows(&inputs).await?;
        // Score complete windows once, in order, from the merged rows.
        let (mut anomalies, mut alerts, mut drift_rows) = (Vec::new(), Vec::new(), Vec::new());
        // With other instances' partitions in the merge and Redis degraded,
        // the merged rows lack their part: scoring waits for Redis.
        if self.detects() && !(degraded && self.remote_parts) {
            // Only windows the watermark closed: at the end of a file run
            // the rest are written but not scored (the input ended, not
            // their minute; a partial last minute looks like a traffic drop).
            let wm = self.instance.watermark();
            let size = self.params.size_ms;
            let ready: Vec<i64> = self
                .latest
                .range(self.scored_upto.saturating_add(1)..)
                .map(|(w, _)| *w)
                .take_while(|w| w + size <= wm)
                .collect();
            // One scorer at a time: alerts are not fenced downstream (a
            // webhook cannot refuse them), so scoring checks first.
            let mut ready = if !ready.is_empty()
                && self.fence.as_ref().is_some_and(|f| !f.holds(0, "scoring"))
            {
                self.fenced_out(0, pq).await?;
                Vec::new()
            } else {
                ready
            };
            if self.remote_parts && !ready.is_empty() {
                match self.refresh_rows(&ready).await? {
                    Some(fresh) => rows.extend(fresh),
                    None => {
                        tracing::debug!(
                            windows = ready.len(),
                            "scoring waits: the partials could not be re-read"
                        );
                        ready.clear();
                    }
                }
            }
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
                let (d, dal) = self.tracker.observe_drift(w, &refs);
                drift_rows.extend(d);
                alerts.extend(dal);
                self.scored_upto = w;
            }
        }
        let floor = self.scored_upto;
        self.latest.retain(|w, _| *w > floor);
        for a in &alerts {
            tracing::warn!(kind = a.kind, service = %a.service, metrics = ?a.metrics, score = a.score,
                window_start = %crate::timefmt::fmt_ts(a.window_start_ms), "incident");
            metrics::counter!("pulse_alerts_total", "kind" => a.kind).increment(1);
        }
        self.summary.anomalies += anomalies.len() as u64;
        self.summary.alerts.extend(alerts.iter().cloned());
        for r in &drift_rows {
            metrics::gauge!("pulse_drift_psi", "service" => r.service.clone(), "feature" => r.feature)
                .set(r.psi);
            metrics::gauge!("pulse_drift_drifted", "service" => r.service.clone(), "feature" => r.feature)
                .set(if r.drifted { 1.0 } else { 0.0 });
            if r.drifted {
                tracing::warn!(service = %r.service, feature = r.feature, psi = r.psi, ks = r.ks,
                    hour = %crate::timefmt::fmt_ts(r.hour_start_ms), "distribution drift");
            }
        }
        let status: Vec<ServiceStatus> = if std::mem::take(&mut self.republish_status) {
            self.tracker.statuses()
        } else {
            alerts.iter().filter_map(ServiceStatus::of_alert).collect()
        };
        if rows.is_empty()
            && tops.is_empty()
            && anomalies.is_empty()
            && status.is_empty()
            && drift_rows.is_empty()
            && alerts.is_empty()
        {
            return Ok(());
        }
        let emission = Emission {
            rows,
            top_items: tops,
            top_n: self.top_n,
            watermark_ms: self.instance.watermark(),
            anomalies,
            alerts,
            status,
            drift: drift_rows,
        };
        self.store.apply(&emission).await?;
        if !emission.drift.is_empty() {
            send(
                pq,
                ParquetMsg::Drift(crate::detect::drift::drift_batch(&emission.drift)?),
            )
            .await?;
        }
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
            n.notify(&emission.alerts).await;
        }
        Ok(())
    }

    /// End of the run. Files and the generator ended: every window is
    /// finalised and written (those the watermark has not closed are not
    /// scored). Kafka only stopped: open windows stay open in
    /// the checkpoints (finalising them now would count their later events
    /// twice), open files are committed so the restart replays nothing.
    pub async fn finish(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
        let t0 = Instant::now();
        let r = self.finish_inner(pq).await;
        if let Some(n) = &self.notifier {
            n.drain(ALERT_DRAIN).await;
        }
        self.busy += t0.elapsed();
        r
    }

    async fn finish_inner(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
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
        self.emit(emits, pq).await?;
        for k in keys {
            let t = self.tasks.get_mut(&k).expect("listed");
            let flush = flush_pending(t, i64::MAX);
            write_rows(flush, pq, &mut self.summary).await?;
        }
        Ok(())
    }
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
) -> Result<(), PipelineError> {
    t.send(TrainMsg { batch })
        .await
        .map_err(|_| PipelineError::Stage("factor trainer stopped".into()))
}

async fn send(pq: &mpsc::Sender<ParquetMsg>, m: ParquetMsg) -> Result<(), PipelineError> {
    pq.send(m)
        .await
        .map_err(|_| PipelineError::Stage("parquet writer stopped".into()))
}

/// The distributions drift detection compares, over every partition's
/// partial of one (window, service).
fn drift_sketch(m: &MergeInput) -> crate::model::DriftSketch {
    let mut d = crate::model::DriftSketch::default();
    for (_, p) in &m.parts {
        d.add_status(p.requests, p.errors, p.client_errors);
        for (a, b) in d.event_types.iter_mut().zip(p.types) {
            *a += b.max(0) as u64;
        }
        if let Some(h) = crate::sketch::SparseHist::from_bytes(&p.hist) {
            for (ms, n) in h.iter_ms() {
                d.add_latency(ms, n);
            }
        }
    }
    d
}
