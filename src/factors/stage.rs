//! The factor-training stage of file and generator runs: one thread feeding
//! the [`Trainer`] from the pipeline's event batches. Consumes
//! [`TrainMsg`]s (events to learn, or a wake-up); produces [`Delta`]s of
//! what changed for the Redis publisher every `reco.flush_ms`. Such runs are
//! complete or fail, so the model is not snapshotted. Kafka runs train the
//! fleet's one model apart ([`super::fleet`]); the snapshot helpers here
//! serve it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use tokio::sync::mpsc;

use super::store::Delta;
use super::trainer::Trainer;
use crate::config::Config;

/// Events for the factor trainer (`None`: only look at the store).
pub struct TrainMsg {
    pub batch: Option<RecordBatch>,
}

/// Where and how often the fleet's model is snapshotted (Kafka runs).
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
            dir: crate::checkpoint::reco_dir(&cfg.parquet.state_dir(), &cfg.kafka.topic),
            name: "model.cbor".to_string(),
            every: Duration::from_millis(cfg.reco.snapshot_ms.max(1)),
        }
    }
}

/// The trainer a run starts with: fresh, or restored from the snapshot
/// (then positioned: it skips events below the offsets it covers).
pub fn prepare(cfg: &Config, snap: Option<&Snapshots>) -> Result<Trainer, String> {
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
    }
    Ok(t)
}

/// Writes the trainer's snapshot atomically.
pub(super) fn write_snapshot(t: &Trainer, s: &Snapshots) -> Result<(), String> {
    let bytes = t.snapshot().map_err(|e| e.to_string())?;
    crate::checkpoint::write_atomic(&s.dir, &s.name, &bytes).map_err(|e| e.to_string())
}

/// Redis came back empty: the next delta carries the whole model.
pub(super) fn check_lost(
    t: &mut Trainer,
    lost: Option<&crate::sink::redis_sink::Health>,
    seen: &mut u64,
) {
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
    lost: Option<Arc<crate::sink::redis_sink::Health>>,
) -> (u64, Duration) {
    let mut lost_seen = lost.as_ref().map_or(0, |h| h.lost_generation());
    let mut last = Instant::now();
    let mut busy = Duration::ZERO;
    while let Some(m) = rx.blocking_recv() {
        let t0 = Instant::now();
        if let Some(b) = &m.batch {
            t.train(b);
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
    check_lost(&mut t, lost.as_deref(), &mut lost_seen);
    if let Some(tx) = &deltas {
        let _ = tx.blocking_send(t.flush(chrono::Utc::now().timestamp_millis()));
    }
    (t.model.events(), busy)
}
