//! The factor-training stage: one thread feeding the [`Trainer`] from event
//! batches. Consumes [`TrainMsg`]s (events to learn, and with Kafka the
//! offsets each partition has reached); produces [`Delta`]s of what changed
//! for the Redis publisher every `reco.flush_ms`, and with Kafka a model
//! snapshot every `reco.snapshot_ms`. Guarantee (Kafka): each event is
//! learned once across restarts: the snapshot records the offsets it covers,
//! replayed events below them are skipped, and the shared [`Progress`] tells
//! checkpoints how far the durable model reaches.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

use super::store::Delta;
use super::trainer::Trainer;
use crate::config::Config;
use crate::model::Progress;

/// Events for the factor trainer and, with Kafka, the offset after the
/// batch per partition (it covers records the trainer does not get).
pub struct TrainMsg {
    pub batch: Option<RecordBatch>,
    pub upto: Vec<(i32, i64)>,
}

/// Where and how often the model is snapshotted (Kafka runs).
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub dir: PathBuf,
    pub name: String,
    pub every: Duration,
}

impl Snapshots {
    /// The snapshot of the fleet's model (one per topic: whichever instance
    /// writes the model writes it), for a Kafka run.
    pub fn of(cfg: &Config) -> Self {
        Snapshots {
            dir: crate::checkpoint::reco_dir(&cfg.parquet.data_dir, &cfg.kafka.topic),
            name: "model.cbor".to_string(),
            every: Duration::from_millis(cfg.reco.snapshot_ms.max(1)),
        }
    }
}

/// The trainer a run starts with: fresh, or with Kafka restored from its
/// snapshot, whose offsets are then published in `trained`.
pub fn prepare(
    cfg: &Config,
    snap: Option<&Snapshots>,
    trained: &Progress,
) -> Result<Trainer, String> {
    let seed = cfg.reco.seed;
    let model_cfg = cfg.reco.model_config();
    let mut t = Trainer::new(model_cfg.clone(), seed);
    if let Some(s) = snap {
        t.positioned = true;
        match std::fs::read(s.dir.join(&s.name)) {
            Ok(bytes) => {
                t = Trainer::restore(model_cfg, seed, &bytes).map_err(|e| e.to_string())?;
                tracing::info!(events = t.model.events(), offsets = ?t.offsets(), "factor model restored");
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("reading model snapshot: {e}")),
        }
        *trained.lock().unwrap_or_else(|e| e.into_inner()) = t.offsets().clone();
    }
    Ok(t)
}

/// Redis came back empty: the next delta carries the whole model.
fn check_lost(t: &mut Trainer, lost: Option<&crate::sink::redis_sink::Health>, seen: &mut u64) {
    let Some(h) = lost else { return };
    if h.lost_generation() == *seen {
        return;
    }
    *seen = h.lost_generation();
    t.republish_all();
    tracing::warn!(
        users = t.model.implicit.n_users(),
        items = t.model.implicit.n_items(),
        "re-publishing the factor model to an emptied store"
    );
}

/// The stage's loop, until its input closes or the publisher stops. With
/// `deltas`, a [`Delta`] goes out every `flush` (and a last one at the end).
/// Returns the events the model has learned and the stage's busy time.
pub fn run(
    mut t: Trainer,
    mut rx: mpsc::Receiver<TrainMsg>,
    deltas: Option<mpsc::Sender<Delta>>,
    flush: Duration,
    snap: Option<Snapshots>,
    trained: Progress,
    lost: Option<Arc<crate::sink::redis_sink::Health>>,
) -> (u64, Duration) {
    let mut lost_seen = lost.as_ref().map_or(0, |h| h.lost_generation());
    let mut last = Instant::now();
    let mut last_snap = Instant::now();
    let mut busy = Duration::ZERO;
    let save = |t: &Trainer| {
        let Some(s) = &snap else { return };
        let r = t.snapshot().map_err(|e| e.to_string()).and_then(|b| {
            crate::checkpoint::write_atomic(&s.dir, &s.name, &b).map_err(|e| e.to_string())
        });
        match r {
            // Durable: checkpoints may now stop replaying what it learned.
            Ok(()) => *trained.lock().unwrap_or_else(|e| e.into_inner()) = t.offsets().clone(),
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
        if let Some(s) = &snap
            && last_snap.elapsed() >= s.every
        {
            save(&t);
            last_snap = Instant::now();
        }
        busy += t0.elapsed();
        check_lost(&mut t, lost.as_deref(), &mut lost_seen);
        if let Some(tx) = &deltas
            && last.elapsed() >= flush
        {
            let d = t.flush(chrono::Utc::now().timestamp_millis());
            if tx.blocking_send(d).is_err() {
                break;
            }
            last = Instant::now();
        }
    }
    save(&t);
    check_lost(&mut t, lost.as_deref(), &mut lost_seen);
    if let Some(tx) = &deltas {
        let _ = tx.blocking_send(t.flush(chrono::Utc::now().timestamp_millis()));
    }
    if t.skipped > 0 {
        tracing::info!(
            rows = t.skipped,
            "replayed events the model had learned were skipped"
        );
    }
    (t.model.events(), busy)
}
