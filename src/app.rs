//! Wires the stages with bounded channels and threads, and owns the order
//! of shutdown. Each stage owns its loop in its own module; this file only
//! connects them:
//!
//! ```text
//! source ──SourceMsg──▶ decode ──DecodeMsg──▶ aggregate (core) ──Emission──▶ store (Redis | memory)
//! (kafka|files|gen)    (thread)               │ windows, SQL, detection, checkpoints
//!                                             ├──ParquetMsg──▶ parquet (thread) ──▶ tables
//!                                             └──TrainMsg──▶ factors (thread) ──Delta──▶ publisher ──▶ Redis
//! Kafka runs: factors::fleet (thread) reads the topic itself while it holds the model writer lease.
//! ```
//! Consumes a [`SourceSpec`]; produces Parquet tables, store updates and a
//! [`Summary`]. Every record read ends up in `events` or `dead_letters`.
//! Delivery: files and generator runs are complete or fail; Kafka runs are
//! exactly-once per source partition (see [`crate::aggregate`] and
//! [`crate::checkpoint`]). Shutdown order: the source stops, the core drains
//! what was sent, the trainer ends (the fleet's writer after reading up to
//! the topic's end and snapshotting), then the core finishes (checkpoints,
//! or with files the last windows), then the Parquet writer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, watch};

use crate::aggregate::Core;
pub use crate::aggregate::Summary;
use crate::config::{Config, Secrets};
use crate::decode::admit::AdmittedServices;
use crate::decode::stage::DecodeMsg;
pub use crate::error::PipelineError;
use crate::factors::stage::TrainMsg;
use crate::factors::store::Delta;
use crate::model::{ChunkPool, Progress};
use crate::sink::parquet::stage::ParquetMsg;
use crate::sink::store::Store;
use crate::source::SourceMsg;
pub use crate::source::SourceSpec;

/// Nice steps the stages around the factor trainer give up, see [`spawn_stage`].
const BELOW_TRAINER: i32 = 5;

/// How long a stopping run waits for Redis to take its last writes.
const REDIS_DRAIN: Duration = Duration::from_secs(10);

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
    let (dec_tx, mut dec_rx) = mpsc::channel::<DecodeMsg<_>>(cap);
    let (pq_tx, pq_rx) = mpsc::channel::<ParquetMsg>(cap * 4);
    let kafka = matches!(source, SourceSpec::Kafka);
    // Decoded chunks go back to the source to be refilled.
    let pool = ChunkPool::new(2);
    let progress: Progress = Default::default();

    // Kafka: the partitions' ownership epochs, claimed by the source and
    // checked by every stage that writes for a partition.
    let fence = kafka.then(|| {
        Arc::new(crate::fence::Fence::new(
            &cfg.parquet.state_dir(),
            &cfg.kafka.topic,
        ))
    });
    let pq_cfg = cfg.clone();
    let pq_fence = fence.clone();
    let pq_handle = spawn_stage("parquet", true, move || {
        crate::sink::parquet::stage::run(&pq_cfg, pq_fence, pq_rx)
    })?;

    let batch = cfg.pipeline.batch_size;
    let src_pool = pool.clone();
    let src_handle: oneshot::Receiver<Result<(), PipelineError>> = match source {
        SourceSpec::Files(paths) => spawn_stage("read", true, move || {
            crate::source::file::read_files_shown(&paths, batch, &chunk_tx, &src_pool)?;
            Ok(())
        })?,
        SourceSpec::Generator(p) => spawn_stage("generate", true, move || {
            crate::source::generate(p, batch, &chunk_tx, &src_pool);
            Ok(())
        })?,
        SourceSpec::Kafka => {
            let kcfg = cfg.kafka.clone();
            let secrets = secrets.clone();
            let run = crate::source::kafka::ConsumerRun {
                data_dir: cfg.parquet.state_dir(),
                batch,
                linger: Duration::from_millis(cfg.pipeline.batch_timeout_ms),
                idle: (cfg.pipeline.idle_exit_ms > 0)
                    .then(|| Duration::from_millis(cfg.pipeline.idle_exit_ms)),
                stop: shutdown.clone(),
                tx: chunk_tx,
                progress: progress.clone(),
                pool: src_pool,
                fence: fence.clone().expect("a Kafka run has a fence"),
            };
            spawn_stage("kafka", false, move || {
                crate::source::kafka::run_consumer(&kcfg, &secrets, run)?;
                Ok(())
            })?
        }
    };

    // Kafka: the fleet's one model writer (this instance trains while it
    // holds the lease, else stands by), reading the topic on its own.
    let (fleet_stop, fleet_handle) = if kafka && cfg.reco.enabled {
        let (stop_tx, stop_rx) = watch::channel(false);
        let redis = match &store {
            Store::Redis(r) => Some(r.connection()),
            Store::Memory(_) => None,
        };
        let role = crate::factors::fleet::FleetTrainer {
            cfg: cfg.clone(),
            secrets: secrets.clone(),
            lease: crate::factors::lease::Lease::new(
                redis.clone(),
                &cfg.redis.prefix,
                Duration::from_millis(cfg.reco.lease_ms.max(100)),
                Duration::from_millis(cfg.redis.timeout_ms.max(1)),
            ),
            redis,
            health: match &store {
                Store::Redis(r) => Some(r.health()),
                Store::Memory(_) => None,
            },
            handle: tokio::runtime::Handle::current(),
            stop: stop_rx,
        };
        let h = spawn_stage("factors", false, move || role.run())?;
        (Some(stop_tx), Some(h))
    } else {
        (None, None)
    };

    // Factor training fed by the pipeline (files, generator) and its Redis publisher.
    let (trainer_tx, trainer_handle, publisher) = if cfg.reco.enabled && !kafka {
        let (tx, rx) = mpsc::channel::<TrainMsg>(cap);
        let trainer = crate::factors::stage::prepare(cfg, None).map_err(PipelineError::Stage)?;
        let (delta_tx, publisher, health) = match &store {
            Store::Redis(r) => {
                let (delta_tx, delta_rx) = mpsc::channel::<Delta>(2);
                let p = tokio::spawn(crate::factors::store::publish(
                    delta_rx,
                    r.connection(),
                    cfg.redis.prefix.clone(),
                    Duration::from_millis(cfg.redis.timeout_ms.max(1)),
                    cfg.redis.max_pending.saturating_mul(4).max(1),
                    REDIS_DRAIN,
                    None,
                ));
                (Some(delta_tx), Some(p), Some(r.health()))
            }
            Store::Memory(_) => (None, None, None),
        };
        let flush = Duration::from_millis(cfg.reco.flush_ms);
        let handle = spawn_stage("factors", false, move || {
            crate::factors::stage::run(trainer, rx, delta_tx, flush, health)
        })?;
        (Some(tx), Some(handle), publisher)
    } else {
        (None, None, None)
    };

    let rules = cfg.validation.clone();
    let admitted = AdmittedServices::default();
    let dec_admitted = admitted.clone();
    let dec_handle = spawn_stage("decode", true, move || {
        crate::decode::stage::run(chunk_rx, dec_tx, rules, pool, dec_admitted)
    })?;

    let drain_store = store.clone();
    let mut core = Core::new(cfg, secrets, store, kafka, trainer_tx, progress);
    core.set_admitted(admitted);
    core.set_fence(fence);
    let core_result = core.run(&mut dec_rx, &pq_tx, &mut shutdown).await;
    // The trainer ends first (the core stops sending it events).
    core.stop_training();
    let (mut trained, mut train_busy) = match trainer_handle {
        Some(h) => join_stage("factors", h).await?,
        None => (0, Duration::ZERO),
    };
    if let (Some(stop), Some(h)) = (fleet_stop, fleet_handle) {
        let _ = stop.send(true);
        let f = join_stage("factors", h).await?;
        (trained, train_busy) = (f.learned, f.busy);
    }
    let core_result = match core_result {
        Ok(()) => core.finish(&pq_tx).await,
        Err(e) => Err(e),
    };
    drop(pq_tx);
    // Redis is a side output: what it has not taken by now waits a little
    // longer, then is logged as not written.
    drain_store.drain(REDIS_DRAIN).await;
    if let Some(p) = publisher {
        p.await.map_err(|e| PipelineError::Stage(e.to_string()))?;
    }
    drop(dec_rx);
    let src = join_stage("source", src_handle).await?;
    let decode_busy = dec_handle.await.unwrap_or_default();
    let (files, parquet_busy) = join_stage("parquet", pq_handle).await??;
    core_result?;
    src?;
    let core_busy = core.busy();
    let mut s = core.into_summary();
    s.files = files;
    s.elapsed = started.elapsed();
    s.stage_seconds = vec![
        ("decode".into(), decode_busy.as_secs_f64()),
        ("windows+sql+detect+store".into(), core_busy.as_secs_f64()),
        ("parquet".into(), parquet_busy.as_secs_f64()),
        ("factors".into(), train_busy.as_secs_f64()),
    ];
    s.trained = trained;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
