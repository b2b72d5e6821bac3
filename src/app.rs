//! Wires the stages with bounded channels and owns shutdown.
//!
//! ```text
//! source ──RawChunk──▶ decode ──Decoded──▶ core (windows + SQL) ──Emission──▶ store (Redis | memory)
//! (kafka|files|gen)   (thread)      │                 │
//!                                   └──events, dead letters, minute_stats, top_items──▶ parquet (thread)
//! ```
//! Consumes a [`SourceSpec`]; produces Parquet tables, store updates and a
//! [`Summary`]. Every record read ends up in `events` or `dead_letters`.
//! Delivery: files and generator runs are complete or fail; Kafka runs commit
//! offsets to the group only after the Parquet files covering them are
//! committed, at shutdown (at-least-once).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{
    ArrayRef, AsArray, BooleanArray, StringBuilder, TimestampMillisecondArray,
};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::TimestampMillisecondType;
use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Secrets};
use crate::decode::{Decoded, Decoder};
use crate::model::{RawChunk, events_schema};
use crate::sink::parquet::{
    TableWriter, WrittenFile, anomalies_spec, dead_letters_spec, events_spec, minute_stats_spec,
    remove_in_progress, top_items_spec,
};
use crate::sink::store::{Emission, MinuteRow, Store, StoreError, minute_rows};
use crate::source::generator::{GenParams, Generator};
use crate::source::kafka::{KafkaError, KafkaSource};
use crate::sql::{SqlEngine, SqlError, partials_to_batch};
use crate::window::{Lateness, WindowEmit, WindowParams, WindowTable, Windower};

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
}

enum ParquetMsg {
    Events(RecordBatch),
    Dead(RecordBatch),
    MinuteStats(RecordBatch),
    TopItems(RecordBatch),
    Anomalies(RecordBatch),
    CloseHoursBefore(i64),
}

/// The parquet stage: owns one writer per table.
fn parquet_stage(
    cfg: &Config,
    mut rx: mpsc::Receiver<ParquetMsg>,
) -> Result<(Vec<(String, WrittenFile)>, Duration), PipelineError> {
    let mut busy = Duration::ZERO;
    let pc = &cfg.parquet;
    let removed = remove_in_progress(&pc.data_dir).unwrap_or(0);
    if removed > 0 {
        tracing::info!(removed, "removed leftovers of interrupted writes");
    }
    let mk = |spec| {
        TableWriter::new(
            &pc.data_dir,
            spec,
            pc.row_group_rows,
            pc.max_file_rows,
            pc.zstd_level,
        )
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
            ParquetMsg::MinuteStats(b) => stats.write(&b)?,
            ParquetMsg::TopItems(b) => top.write(&b)?,
            ParquetMsg::Anomalies(b) => anom.write(&b)?,
            ParquetMsg::CloseHoursBefore(ms) => {
                events.close_hours_before(ms)?;
                dead.close_hours_before(ms)?;
                stats.close_hours_before(ms)?;
                top.close_hours_before(ms)?;
                anom.close_hours_before(ms)?;
            }
        }
        busy += t0.elapsed();
    }
    let t0 = Instant::now();
    let mut out = Vec::new();
    for w in [&mut events, &mut dead, &mut stats, &mut top, &mut anom] {
        w.close_all()?;
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
    Ok((out, busy + t0.elapsed()))
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
    let (chunk_tx, chunk_rx) = mpsc::channel::<RawChunk>(cap);
    let (dec_tx, mut dec_rx) = mpsc::channel::<Decoded>(cap);
    let (pq_tx, pq_rx) = mpsc::channel::<ParquetMsg>(cap * 4);

    // parquet stage
    let pq_cfg = cfg.clone();
    let pq_handle = tokio::task::spawn_blocking(move || parquet_stage(&pq_cfg, pq_rx));

    // source stage
    let batch = cfg.pipeline.batch_size;
    let src_handle: tokio::task::JoinHandle<Result<Option<KafkaSource>, PipelineError>> =
        match source {
            SourceSpec::Files(paths) => tokio::task::spawn_blocking(move || {
                let total = crate::source::file::total_bytes(&paths);
                let bar = progress_bar(total);
                let done = |n: u64| {
                    if let Some(b) = &bar {
                        b.inc(n)
                    }
                };
                crate::source::file::read_files(&paths, batch, &chunk_tx, &done)?;
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                Ok(None)
            }),
            SourceSpec::Generator(p) => tokio::task::spawn_blocking(move || {
                let mut g = Generator::new(p);
                let source: Arc<str> = "generator".into();
                let mut line = Vec::with_capacity(512);
                let mut n = 0i64;
                loop {
                    let mut chunk = RawChunk::new(source.clone());
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
                    if !chunk.is_empty() && chunk_tx.blocking_send(chunk).is_err() {
                        break;
                    }
                    if last {
                        break;
                    }
                }
                Ok(None)
            }),
            SourceSpec::Kafka => {
                let mut src = KafkaSource::new(&cfg.kafka, secrets)?;
                let linger = Duration::from_millis(cfg.pipeline.batch_timeout_ms);
                let idle = (cfg.pipeline.idle_exit_ms > 0)
                    .then(|| Duration::from_millis(cfg.pipeline.idle_exit_ms));
                let stop = shutdown.clone();
                tokio::spawn(async move {
                    loop {
                        if *stop.borrow() {
                            break;
                        }
                        // Not cancelled by the stop signal: a chunk in the making
                        // holds consumed messages, so it is finished and delivered.
                        let next = src.next_chunk(batch, linger, idle, Some(&stop)).await?;
                        match next {
                            Some(c) => {
                                if chunk_tx.send(c).await.is_err() {
                                    break;
                                }
                            }
                            None => {
                                tracing::info!("kafka source idle, draining");
                                break;
                            }
                        }
                    }
                    Ok(Some(src))
                })
            }
        };

    // factor training stage (and its Redis publisher)
    let (trainer_tx, trainer_handle, publisher) = if cfg.reco.enabled {
        let (tx, mut rx) = mpsc::channel::<RecordBatch>(cap);
        let (delta_tx, mut delta_rx) = mpsc::channel::<crate::factors::store::Delta>(2);
        let redis = match &store {
            Store::Redis(r) => Some(r.connection()),
            Store::Memory(_) => None,
        };
        let publish = redis.is_some();
        let flush = Duration::from_millis(cfg.reco.flush_ms);
        let seed = cfg.reco.seed;
        let model_cfg = cfg.reco.model_config();
        let handle = tokio::task::spawn_blocking(move || {
            let mut t = crate::factors::trainer::Trainer::new(model_cfg, seed);
            let mut last = Instant::now();
            let mut busy = Duration::ZERO;
            while let Some(b) = rx.blocking_recv() {
                let t0 = Instant::now();
                t.train(&b);
                busy += t0.elapsed();
                if publish && last.elapsed() >= flush {
                    let d = t.flush(chrono::Utc::now().timestamp_millis());
                    if delta_tx.blocking_send(d).is_err() {
                        break;
                    }
                    last = Instant::now();
                }
            }
            if publish {
                let _ = delta_tx.blocking_send(t.flush(chrono::Utc::now().timestamp_millis()));
            }
            (t.model.events(), busy)
        });
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
    let dec_handle = tokio::task::spawn_blocking(move || {
        let mut rx = chunk_rx;
        let mut d = Decoder::new(rules);
        let mut busy = Duration::ZERO;
        while let Some(c) = rx.blocking_recv() {
            let t0 = Instant::now();
            let now = chrono::Utc::now().timestamp_millis();
            let out = d.decode(&c, now);
            busy += t0.elapsed();
            if dec_tx.blocking_send(out).is_err() {
                break;
            }
        }
        busy
    });

    // core stage
    let mut core = Core::new(cfg, secrets, store);
    core.trainer = trainer_tx;
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
            core.on_batch(d, &pq_tx).await?;
            core.busy += t0.elapsed();
        }
        let t0 = Instant::now();
        let r = core.finish(&pq_tx).await;
        core.busy += t0.elapsed();
        r
    }
    .await;
    drop(pq_tx);
    core.trainer = None;
    let (trained, train_busy) = match trainer_handle {
        Some(h) => h.await.map_err(|e| PipelineError::Stage(e.to_string()))?,
        None => (0, Duration::ZERO),
    };
    if let Some(p) = publisher {
        p.await.map_err(|e| PipelineError::Stage(e.to_string()))??;
    }
    drop(dec_rx);
    let src = src_handle
        .await
        .map_err(|e| PipelineError::Stage(e.to_string()))?;
    let decode_busy = dec_handle.await.unwrap_or_default();
    let (files, parquet_busy) = pq_handle
        .await
        .map_err(|e| PipelineError::Stage(e.to_string()))??;
    core_result?;
    // Only now are the consumed records durable in Parquet: commit the hint.
    if let Some(k) = src? {
        k.commit()?;
    }
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
        .windower
        .max_event_time()
        .map(|_| core.windower.watermark());
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

/// Windows and SQL over decoded batches.
struct Core {
    sql: SqlEngine,
    windower: Windower,
    table: WindowTable,
    store: Store,
    lateness_ms: i64,
    summary: Summary,
    tracker: crate::alert::AnomalyTracker,
    busy: Duration,
    trainer: Option<mpsc::Sender<RecordBatch>>,
    notifier: Option<crate::notify::Notifier>,
}

impl Core {
    fn new(cfg: &Config, secrets: &Secrets, store: Store) -> Self {
        let params = WindowParams::from_config(&cfg.window);
        Core {
            sql: SqlEngine::new(),
            windower: Windower::with_idleness(params, cfg.window.idle_partition_ms as i64),
            table: WindowTable::new(params, cfg.window.top_items),
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
        }
    }

    async fn on_batch(
        &mut self,
        d: Decoded,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        let t0 = Instant::now();
        let n_dead = d.dead_letters.num_rows() as u64;
        self.summary.records += n_dead + d.events.num_rows() as u64;
        self.summary.invalid += n_dead;
        for (kind, n) in &d.rejected {
            metrics::counter!("pulse_dead_letters_total", "reason" => *kind).increment(*n);
        }
        if n_dead > 0 {
            tracing::debug!(
                dead_letters = n_dead,
                "invalid records sent to dead_letters"
            );
            send(pq, ParquetMsg::Dead(d.dead_letters)).await?;
        }
        let ev = d.events;
        let n = ev.num_rows();
        if n == 0 {
            return Ok(());
        }
        self.summary.events += n as u64;
        metrics::counter!("pulse_events_total").increment(n as u64);
        // Processing time first, so newly assigned partitions start their idleness clock now.
        self.windower.tick(chrono::Utc::now().timestamp_millis());
        if let Some(a) = &d.assigned {
            self.windower.set_partitions(a);
        }
        let ts = ev.column(1).as_primitive::<TimestampMillisecondType>();
        let parts = ev
            .column_by_name("src_partition")
            .and_then(|c| {
                c.as_primitive_opt::<datafusion::arrow::datatypes::Int32Type>()
                    .cloned()
            })
            .ok_or_else(|| PipelineError::Stage("missing src_partition".into()))?;
        let (late0, too_late0) = (self.summary.late, self.summary.too_late);
        let mut ws = Vec::with_capacity(n);
        let mut counted = Vec::with_capacity(n);
        let mut lateness = StringBuilder::with_capacity(n, n * 7);
        for (i, &t) in ts.values().iter().enumerate() {
            let key = if d.partitioned_time {
                parts.value(i)
            } else {
                0
            };
            let (w, class) = self.windower.observe(key, t);
            ws.push(w);
            counted.push(class != Lateness::TooLate);
            lateness.append_value(class.as_str());
            match class {
                Lateness::OnTime => {}
                Lateness::Late => self.summary.late += 1,
                Lateness::TooLate => self.summary.too_late += 1,
            }
        }
        let mut cols = ev.columns().to_vec();
        cols.push(Arc::new(lateness.finish()) as ArrayRef);
        let full = RecordBatch::try_new(events_schema(), cols)?;

        // The SQL input: the counted events' grouping columns and their bins.
        let ws_arr = Arc::new(TimestampMillisecondArray::from(ws).with_timezone("UTC")) as ArrayRef;
        let pick = |name: &str| -> Result<ArrayRef, PipelineError> {
            full.column_by_name(name)
                .cloned()
                .ok_or_else(|| PipelineError::Stage(format!("missing column {name}")))
        };
        let schema = crate::sql::batch_input_schema();
        let sql_in = RecordBatch::try_new(
            schema,
            vec![
                ws_arr,
                pick("service")?,
                pick("status")?,
                pick("latency_ms")?,
                pick("user_id")?,
                pick("item_id")?,
            ],
        )?;
        let mask = BooleanArray::from(counted);
        let sql_in = if mask.true_count() == n {
            sql_in
        } else {
            filter_record_batch(&sql_in, &mask)?
        };
        if let Some(t) = &self.trainer {
            t.send(full.clone())
                .await
                .map_err(|_| PipelineError::Stage("factor trainer stopped".into()))?;
        }
        send(pq, ParquetMsg::Events(full)).await?;

        if sql_in.num_rows() > 0 {
            for (w, svc, p) in self.sql.partials(sql_in.clone()).await? {
                self.table.add_partial(w, &svc, &p);
            }
            for (w, item, c) in self.sql.item_counts(sql_in).await? {
                self.table.add_item_counts(w, item, c);
            }
        }
        let wm = self.windower.watermark();
        metrics::gauge!("pulse_watermark_ms").set(wm as f64);
        if wm > i64::MIN {
            let lag = chrono::Utc::now().timestamp_millis().saturating_sub(wm);
            metrics::gauge!("pulse_watermark_lag_seconds").set(lag as f64 / 1000.0);
        }
        let (late, too_late) = (self.summary.late - late0, self.summary.too_late - too_late0);
        if late > 0 {
            metrics::counter!("pulse_late_events_total", "class" => "late").increment(late);
        }
        if too_late > 0 {
            metrics::counter!("pulse_late_events_total", "class" => "too_late").increment(too_late);
        }
        let emits = self.table.advance(wm, false);
        self.emit(emits, pq).await?;
        // Hours whose events can no longer change their windows are complete.
        send(
            pq,
            ParquetMsg::CloseHoursBefore(wm.saturating_sub(self.lateness_ms)),
        )
        .await?;
        metrics::histogram!("pulse_batch_seconds").record(t0.elapsed().as_secs_f64());
        Ok(())
    }

    async fn emit(
        &mut self,
        emits: Vec<WindowEmit>,
        pq: &mpsc::Sender<ParquetMsg>,
    ) -> Result<(), PipelineError> {
        if emits.is_empty() {
            return Ok(());
        }
        self.summary.windows_emitted += emits.len() as u64;
        let rows: Vec<(i64, &str, &crate::window::Partial)> = emits
            .iter()
            .flat_map(|e| {
                e.services
                    .iter()
                    .map(move |(s, p)| (e.window_start, s.as_str(), p))
            })
            .collect();
        let stats = self.sql.minute_stats(partials_to_batch(&rows)).await?;
        let finals: std::collections::HashSet<i64> = emits
            .iter()
            .filter(|e| e.is_final)
            .map(|e| e.window_start)
            .collect();
        let mut mrows = minute_rows(&stats, false);
        for r in &mut mrows {
            r.is_final = finals.contains(&r.window_start_ms);
        }
        // Score each window once, at its first emission, in window order.
        let mut anomalies = Vec::new();
        let mut alerts = Vec::new();
        for e in emits.iter().filter(|e| e.first) {
            let rows: Vec<&MinuteRow> = mrows
                .iter()
                .filter(|r| r.window_start_ms == e.window_start)
                .collect();
            let (a, al) = self.tracker.observe_window(e.window_start, &rows);
            anomalies.extend(a);
            alerts.extend(al);
        }
        for a in &alerts {
            tracing::warn!(kind = a.kind, service = %a.service, metrics = ?a.metrics, score = a.score,
                window_start = %crate::source::generator::fmt_ts(a.window_start_ms), "incident");
            metrics::counter!("pulse_alerts_total", "kind" => a.kind).increment(1);
        }
        self.summary.anomalies += anomalies.len() as u64;
        self.summary.alerts.extend(alerts.iter().cloned());
        let emission = Emission {
            rows: mrows,
            top_items: emits
                .iter()
                .map(|e| (e.window_start, e.top_items.clone()))
                .collect(),
            watermark_ms: self.windower.watermark(),
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
        if !finals.is_empty() {
            let ws = stats.column(0).as_primitive::<TimestampMillisecondType>();
            let mask = BooleanArray::from(
                ws.values()
                    .iter()
                    .map(|w| finals.contains(w))
                    .collect::<Vec<_>>(),
            );
            let final_stats = filter_record_batch(&stats, &mask)?;
            self.summary.minute_rows_final += final_stats.num_rows() as u64;
            self.summary
                .final_rows
                .extend(emission.rows.iter().filter(|r| r.is_final).cloned());
            send(pq, ParquetMsg::MinuteStats(final_stats)).await?;
            send(
                pq,
                ParquetMsg::TopItems(top_items_batch(emits.iter().filter(|e| e.is_final))?),
            )
            .await?;
        }
        Ok(())
    }

    async fn apply_with_retry(&self, e: &Emission) -> Result<(), PipelineError> {
        let mut delay = Duration::from_millis(100);
        for attempt in 1.. {
            match self.store.apply(e).await {
                Ok(()) => return Ok(()),
                Err(err) if err.is_retryable() && attempt < 8 => {
                    tracing::warn!(error = %err, attempt, "store write failed, retrying");
                    metrics::counter!("pulse_store_retries_total").increment(1);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(err) => return Err(err.into()),
            }
        }
        unreachable!("the loop returns")
    }

    async fn finish(&mut self, pq: &mpsc::Sender<ParquetMsg>) -> Result<(), PipelineError> {
        let emits = self.table.advance(self.windower.watermark(), true);
        self.emit(emits, pq).await
    }
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

fn top_items_batch<'a>(
    emits: impl Iterator<Item = &'a WindowEmit>,
) -> Result<RecordBatch, PipelineError> {
    let (mut ws, mut rank, mut item, mut n) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for e in emits {
        for (r, (i, c)) in e.top_items.iter().enumerate() {
            ws.push(e.window_start);
            rank.push(r as u64 + 1);
            item.push(*i);
            n.push(*c);
        }
    }
    Ok(RecordBatch::try_new(
        crate::model::top_items_schema(),
        vec![
            Arc::new(TimestampMillisecondArray::from(ws).with_timezone("UTC")),
            Arc::new(datafusion::arrow::array::UInt64Array::from(rank)),
            Arc::new(datafusion::arrow::array::UInt64Array::from(item)),
            Arc::new(datafusion::arrow::array::Int64Array::from(n)),
        ],
    )?)
}

async fn send(pq: &mpsc::Sender<ParquetMsg>, m: ParquetMsg) -> Result<(), PipelineError> {
    pq.send(m)
        .await
        .map_err(|_| PipelineError::Stage("parquet writer stopped".into()))
}
