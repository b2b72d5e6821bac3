//! The fleet's factor trainer: one model for every `pulse run` instance of a
//! consumer group. Every instance runs this role; the one holding the model
//! writer lease ([`super::lease`]) trains, the others stand by.
//!
//! Consumes the whole topic, outside the group (its own reader of every
//! partition, [`TopicReader`]), decoded with the pipeline's rules and its
//! per-partition service admission, so it learns exactly the events the
//! pipeline keeps. Produces the model's changes in Redis (through the
//! fenced publisher, with the lease's token) and a snapshot of the model
//! with its offsets and admitted services every `reco.snapshot_ms` at
//! `<data_dir>/_pulse/reco/<topic>/model.cbor`, where any instance reads it;
//! every `reco.version_ms`, a model version ([`super::versions`]). While
//! `{p}:reco:pin` names a version, it serves that version instead of the
//! live model, which goes on learning unpublished.
//!
//! Guarantee: every valid event is learned once fleet-wide. A snapshot is
//! the model and the offsets it covers, so whichever instance takes the
//! lease next resumes from the latest snapshot and learns what follows once.
//! A writer that lost its lease (frozen, cut off) has its model writes
//! refused, stops and stands by; one that Redis cannot answer for the
//! lease's lifetime pauses until it can, and goes on if nobody took over.
//! A new writer publishes nothing until it has caught up with the version
//! it found in `{p}:reco:meta`, so the served model never goes back to an
//! older state.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::lease::Lease;
use super::quality::LiveQuality;
use super::stage::Snapshots;
use super::store::Delta;
use super::trainer::Trainer;
use super::versions::{ModelVersion, Versions};
use crate::config::{Config, Secrets};
use crate::decode::Decoder;
use crate::decode::admit::AdmittedServices;
use crate::model::RawChunk;
use crate::sink::redis_sink::Health;
use crate::source::kafka::TopicReader;

/// Records per chunk the trainer reads.
const CHUNK: usize = 4096;

/// How often an event is scored for the live quality figures (each costs
/// a pass over the items' vectors), and over how many of the last scored
/// samples the figures are taken.
const QUALITY_EVERY: Duration = Duration::from_millis(100);
const QUALITY_WINDOW: usize = 2000;

/// What the role did in this process.
#[derive(Debug, Default, Clone)]
pub struct FleetSummary {
    /// Events the model held when this instance last stopped writing it.
    pub learned: u64,
    /// Times this instance took the lease.
    pub terms: u32,
    /// Time spent decoding and learning.
    pub busy: Duration,
}

/// The live quality figures as gauges (the writer's own; standbys export none).
fn publish_quality(q: &LiveQuality) {
    let f = q.figures();
    metrics::gauge!("pulse_model_quality_samples").set(f.samples as f64);
    metrics::gauge!("pulse_model_recall_at_10", "model" => "factors").set(f.recall);
    metrics::gauge!("pulse_model_ndcg_at_10", "model" => "factors").set(f.ndcg);
    metrics::gauge!("pulse_model_recall_at_10", "model" => "popularity").set(f.popularity_recall);
    metrics::gauge!("pulse_model_ndcg_at_10", "model" => "popularity").set(f.popularity_ndcg);
}

/// The role's inputs.
pub struct FleetTrainer {
    pub cfg: Config,
    pub secrets: Secrets,
    pub lease: Lease,
    /// Redis (publisher and meta), `None` with a memory store.
    pub redis: Option<redis::aio::ConnectionManager>,
    pub health: Option<Arc<Health>>,
    pub handle: tokio::runtime::Handle,
    /// Turns true when the instance stops.
    pub stop: watch::Receiver<bool>,
}

/// Why a term as the writer ended.
enum TermEnd {
    Stopped,
    LeaseLost,
    /// The instance stopped while Redis could not confirm the lease: the
    /// model is neither saved nor published (another instance may hold it).
    StoppedUnconfirmed,
}

/// The lease after a renewal.
enum Renewal {
    Held,
    Lost,
    StoppedUnconfirmed,
}

impl FleetTrainer {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stands by and trains while holding the lease, until the instance stops.
    pub fn run(self) -> FleetSummary {
        let mut summary = FleetSummary::default();
        let poll =
            (self.lease.ttl() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut waiting_since = Instant::now();
        let mut said_standby = false;
        metrics::gauge!("pulse_model_writer").set(0.0);
        while !self.stopping() {
            match self.handle.block_on(self.lease.acquire()) {
                Ok(Some(token)) => {
                    tracing::info!(
                        token,
                        waited_ms = waiting_since.elapsed().as_millis() as u64,
                        "model writer lease taken: training the fleet's model"
                    );
                    metrics::gauge!("pulse_model_writer").set(1.0);
                    summary.terms += 1;
                    let (end, learned) = match self.lead(token, &mut summary.busy) {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::error!(error = %e, "model writer failed; standing by");
                            (TermEnd::LeaseLost, summary.learned)
                        }
                    };
                    metrics::gauge!("pulse_model_writer").set(0.0);
                    summary.learned = learned;
                    if matches!(end, TermEnd::Stopped | TermEnd::StoppedUnconfirmed) {
                        self.handle.block_on(self.lease.release());
                        break;
                    }
                    waiting_since = Instant::now();
                    said_standby = false;
                }
                Ok(None) => {
                    if !said_standby {
                        tracing::info!("standing by: another instance writes the model");
                        said_standby = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "model writer lease unavailable"),
            }
            std::thread::sleep(poll);
        }
        summary
    }

    /// One term as the model's writer: from the latest snapshot, until the
    /// stop (then caught up with the topic's end first) or the lease is lost.
    fn lead(&self, token: u64, busy: &mut Duration) -> Result<(TermEnd, u64), String> {
        let cfg = &self.cfg;
        let snap = Snapshots::of(cfg);
        let loaded = Instant::now();
        let mut t = super::stage::prepare(cfg, Some(&snap))?;
        let admitted = AdmittedServices::default();
        let mut decoder = Decoder::with_admitted(cfg.validation.clone(), admitted.clone());
        for (p, services) in &t.admitted {
            decoder.seed_services(*p, services);
        }
        let mut reader =
            TopicReader::open(&cfg.kafka, &self.secrets, t.offsets()).map_err(|e| e.to_string())?;
        // What the previous writer published: nothing goes out until this
        // model is at least there (or has read everything there is).
        let published = self.published_version();
        // A pinned version is served as it is: the live model goes out
        // whole when the pin is removed.
        let pinned_at_start = self.read_pin().ok().flatten();
        if self.redis.is_some() && pinned_at_start.is_none() && published < t.model.events() {
            // Redis is behind the snapshot: emptied, or never written.
            t.republish_all();
            tracing::warn!(
                published,
                snapshot = t.model.events(),
                "re-publishing the factor model: the store is behind the snapshot"
            );
        }
        tracing::info!(
            events = t.model.events(),
            published,
            load_ms = loaded.elapsed().as_millis() as u64,
            "model writer resumed from the latest snapshot"
        );
        let (delta_tx, publisher) = match &self.redis {
            Some(conn) => {
                let (tx, rx) = mpsc::channel::<Delta>(2);
                let p = self.handle.spawn(super::store::publish(
                    rx,
                    conn.clone(),
                    cfg.redis.prefix.clone(),
                    Duration::from_millis(cfg.redis.timeout_ms.max(1)),
                    cfg.redis.max_pending.saturating_mul(4).max(1),
                    Duration::from_secs(10),
                    Some(token),
                ));
                (Some(tx), Some(p))
            }
            None => (None, None),
        };
        let flush_every = Duration::from_millis(cfg.reco.flush_ms.max(1));
        let snap_every = snap.every;
        let renew_every = self.lease.ttl() / 3;
        let mut last_flush = Instant::now();
        let mut last_snap = Instant::now();
        let mut last_renew = Instant::now();
        let mut renewed_at = Instant::now();
        let mut lost_seen = self.health.as_ref().map_or(0, |h| h.lost_generation());
        let mut caught_up = false;
        let mut chunk = RawChunk::new(cfg.kafka.topic.as_str().into());
        let mut stop_by: Option<Instant> = None;
        let mut quality = LiveQuality::new(10, QUALITY_WINDOW);
        let mut last_quality = Instant::now();
        let versions = Versions::of(cfg);
        let version_every = Duration::from_millis(cfg.reco.version_ms.max(1));
        let mut last_version = Instant::now();
        let mut recorded = versions.latest().unwrap_or(0);
        // The version served instead of the live model, and the pin last read.
        let mut pin: Option<u64> = None;
        let mut pin_read: Option<Option<u64>> = None;
        let mut last_pin_check: Option<Instant> = None;
        let end = loop {
            if stop_by.is_none() && self.stopping() {
                // Learn what the topic holds now before the last snapshot.
                stop_by = Some(Instant::now() + Duration::from_secs(30));
            }
            reader
                .read(&mut chunk, CHUNK, Duration::from_millis(100))
                .map_err(|e| e.to_string())?;
            if chunk.is_empty() {
                caught_up = true;
                if let Some(by) = stop_by
                    && (Instant::now() >= by || reader.at_end().unwrap_or(true))
                {
                    break TermEnd::Stopped;
                }
            } else {
                let started = Instant::now();
                let d = decoder.decode(&chunk, chrono::Utc::now().timestamp_millis());
                if (last_quality.elapsed() >= QUALITY_EVERY || quality.figures().samples == 0)
                    && t.sample_quality(&d.events, &mut quality, 1) > 0
                {
                    last_quality = Instant::now();
                    publish_quality(&quality);
                }
                t.train(&d.events);
                let mut upto: BTreeMap<i32, i64> = BTreeMap::new();
                for pos in &chunk.positions {
                    let e = upto.entry(pos.partition).or_insert(pos.offset + 1);
                    *e = (*e).max(pos.offset + 1);
                }
                for (p, next) in upto {
                    t.advance(p, next);
                }
                *busy += started.elapsed();
            }
            if last_renew.elapsed() >= renew_every {
                last_renew = Instant::now();
                match self.renew(token, &mut renewed_at) {
                    Renewal::Held => {}
                    Renewal::Lost => break TermEnd::LeaseLost,
                    Renewal::StoppedUnconfirmed => break TermEnd::StoppedUnconfirmed,
                }
            }
            super::stage::check_lost(&mut t, self.health.as_deref(), &mut lost_seen);
            let publishing = caught_up || t.model.events() >= published;
            if let Some(tx) = &delta_tx
                && last_pin_check.is_none_or(|at| at.elapsed() >= flush_every)
            {
                last_pin_check = Some(Instant::now());
                if let Ok(want) = self.read_pin()
                    && pin_read != Some(want)
                    && (want.is_some() || publishing)
                {
                    pin_read = Some(want);
                    if want != pin {
                        match self.switch(want, &mut t, &versions) {
                            Ok(d) => {
                                if tx.blocking_send(d).is_err() {
                                    break TermEnd::LeaseLost;
                                }
                                metrics::gauge!("pulse_model_pinned_version")
                                    .set(want.unwrap_or(0) as f64);
                                match want {
                                    Some(v) => tracing::warn!(
                                        version = v,
                                        live = t.model.events(),
                                        "serving pinned model version (rollback); the live model goes on learning, unpublished"
                                    ),
                                    None => tracing::info!(
                                        version = t.model.events(),
                                        "pin removed: serving the live model again"
                                    ),
                                }
                                pin = want;
                            }
                            Err(e) => tracing::error!(
                                version = want,
                                error = %e,
                                "cannot serve the pinned model version; the served model is unchanged"
                            ),
                        }
                    }
                }
            }
            if publishing
                && pin.is_none()
                && last_flush.elapsed() >= flush_every
                && let Some(tx) = &delta_tx
            {
                last_flush = Instant::now();
                if tx
                    .blocking_send(t.flush(chrono::Utc::now().timestamp_millis()))
                    .is_err()
                {
                    // The publisher was refused: a newer writer holds the lease.
                    break TermEnd::LeaseLost;
                }
            }
            if last_snap.elapsed() >= snap_every {
                last_snap = Instant::now();
                self.save(&mut t, &admitted, &snap, token, &mut renewed_at);
            }
            if last_version.elapsed() >= version_every && t.model.events() > recorded {
                last_version = Instant::now();
                if self.record_version(&t, &versions, &quality, token, pin, renewed_at) {
                    recorded = t.model.events();
                }
            }
        };
        if !matches!(end, TermEnd::Stopped) {
            if matches!(end, TermEnd::LeaseLost) {
                metrics::counter!("pulse_model_writer_lost_total").increment(1);
                tracing::error!(
                    token,
                    "model writer lease lost (another instance took it over): this model is dropped unpublished"
                );
            } else {
                tracing::warn!(
                    token,
                    events = t.model.events(),
                    "stopped while Redis could not confirm the model writer lease: the model is left unsaved; the next writer resumes from the last snapshot"
                );
            }
            drop(delta_tx);
            if let Some(p) = publisher {
                p.abort();
            }
            return Ok((end, t.model.events()));
        }
        self.save(&mut t, &admitted, &snap, token, &mut renewed_at);
        if t.model.events() > recorded {
            self.record_version(&t, &versions, &quality, token, pin, renewed_at);
        }
        if let Some(tx) = &delta_tx
            && pin.is_none()
        {
            let _ = tx.blocking_send(t.flush(chrono::Utc::now().timestamp_millis()));
        }
        drop(delta_tx);
        if let Some(p) = publisher {
            let _ = self.handle.block_on(p);
        }
        if t.skipped > 0 {
            tracing::info!(
                rows = t.skipped,
                "events the model had learned were skipped"
            );
        }
        Ok((end, t.model.events()))
    }

    /// The pinned version in Redis (`None`: serve the live model).
    fn read_pin(&self) -> Result<Option<u64>, String> {
        let Some(conn) = &self.redis else {
            return Ok(None);
        };
        let mut conn = conn.clone();
        let timeout = Duration::from_millis(self.cfg.redis.timeout_ms.max(1));
        self.handle.block_on(super::versions::read_pin(
            &mut conn,
            &self.cfg.redis.prefix,
            timeout,
        ))
    }

    /// The whole model to serve from now on, replacing the served one: the
    /// pinned version `want`, or the live model `t` when unpinned.
    fn switch(
        &self,
        want: Option<u64>,
        t: &mut Trainer,
        versions: &Versions,
    ) -> Result<super::store::Delta, String> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut d = match want {
            Some(v) => {
                let bytes = versions.load(v).map_err(|e| e.to_string())?;
                let mut pinned =
                    Trainer::restore(self.cfg.reco.model_config(), self.cfg.reco.seed, &bytes)
                        .map_err(|e| e.to_string())?;
                pinned.republish_all();
                let mut d = pinned.flush(now);
                d.pinned = true;
                d
            }
            None => {
                t.republish_all();
                t.flush(now)
            }
        };
        d.replace = true;
        Ok(d)
    }

    /// Records the model as a version (only while the lease is confirmed
    /// within its lifetime); `true` when recorded.
    fn record_version(
        &self,
        t: &Trainer,
        versions: &Versions,
        quality: &LiveQuality,
        token: u64,
        pin: Option<u64>,
        renewed_at: Instant,
    ) -> bool {
        if !self.lease_fresh(renewed_at) {
            return false;
        }
        let f = quality.figures();
        let v = ModelVersion {
            version: t.model.events(),
            saved_ms: chrono::Utc::now().timestamp_millis(),
            users: t.model.implicit.n_users(),
            items: t.model.implicit.n_items(),
            offsets: t.offsets().clone(),
            quality_samples: f.samples,
            recall_at_10: f.recall,
            ndcg_at_10: f.ndcg,
            popularity_recall_at_10: f.popularity_recall,
            popularity_ndcg_at_10: f.popularity_ndcg,
            instance: crate::timefmt::instance_label(),
            token,
            pulse_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let recorded = t
            .snapshot()
            .map_err(|e| e.to_string())
            .and_then(|bytes| versions.record(&v, &bytes, pin).map_err(|e| e.to_string()));
        match recorded {
            Ok(()) => {
                tracing::info!(
                    version = v.version,
                    recall_at_10 = v.recall_at_10,
                    "model version recorded"
                );
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "recording a model version failed");
                false
            }
        }
    }

    /// The model version last published (`{p}:reco:meta` `version`).
    fn published_version(&self) -> u64 {
        let Some(conn) = &self.redis else { return 0 };
        let mut conn = conn.clone();
        let key = format!("{}:reco:meta", self.cfg.redis.prefix);
        let q = async move {
            let v: Option<String> = redis::cmd("HGET")
                .arg(key)
                .arg("version")
                .query_async(&mut conn)
                .await
                .ok()?;
            v?.parse().ok()
        };
        self.handle
            .block_on(async { tokio::time::timeout(Duration::from_secs(2), q).await })
            .ok()
            .flatten()
            .unwrap_or(0)
    }

    /// Whether the lease, last confirmed at `renewed_at`, is still this
    /// writer's while Redis does not answer: within its lifetime (always,
    /// for the local lease of a memory store).
    fn lease_fresh(&self, renewed_at: Instant) -> bool {
        self.redis.is_none() || renewed_at.elapsed() < self.lease.ttl()
    }

    /// Renews the lease held with `token`. While Redis does not answer,
    /// the writer goes on within the lease's lifetime since its last
    /// renewal; past it another instance may have taken the lease, so the
    /// writer pauses (learns, publishes and saves nothing) until Redis
    /// answers: it resumes with the model in memory if nobody took the
    /// lease meanwhile, and its term ends if somebody did.
    fn renew(&self, token: u64, renewed_at: &mut Instant) -> Renewal {
        let poll =
            (self.lease.ttl() / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
        let mut paused: Option<Instant> = None;
        loop {
            match self.handle.block_on(self.lease.renew(token)) {
                Ok(true) => {
                    *renewed_at = Instant::now();
                    if let Some(since) = paused {
                        metrics::gauge!("pulse_model_writer").set(1.0);
                        tracing::info!(
                            token,
                            paused_ms = since.elapsed().as_millis() as u64,
                            "model writer lease confirmed again: training resumes"
                        );
                    }
                    return Renewal::Held;
                }
                Ok(false) => return Renewal::Lost,
                Err(e) => {
                    if self.lease_fresh(*renewed_at) {
                        tracing::warn!(error = %e, "cannot renew the model writer lease");
                        return Renewal::Held;
                    }
                    if paused.is_none() {
                        paused = Some(Instant::now());
                        metrics::gauge!("pulse_model_writer").set(0.0);
                        tracing::warn!(
                            token,
                            error = %e,
                            "model writer paused: its lease went unconfirmed for its lifetime"
                        );
                    }
                    if self.stopping() {
                        return Renewal::StoppedUnconfirmed;
                    }
                    std::thread::sleep(poll);
                }
            }
        }
    }

    /// Snapshots the model with its offsets and admitted services, if this
    /// instance holds the lease: confirmed now, or within the lease's
    /// lifetime while Redis does not answer.
    fn save(
        &self,
        t: &mut Trainer,
        admitted: &AdmittedServices,
        snap: &Snapshots,
        token: u64,
        renewed_at: &mut Instant,
    ) {
        if self.redis.is_some() {
            match self.handle.block_on(self.lease.renew(token)) {
                Ok(true) => *renewed_at = Instant::now(),
                Ok(false) => return,
                Err(_) if !self.lease_fresh(*renewed_at) => return,
                Err(_) => {}
            }
        }
        t.admitted = admitted.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let started = Instant::now();
        match super::stage::write_snapshot(t, snap) {
            Ok(()) => {
                metrics::histogram!("pulse_model_snapshot_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(e) => tracing::warn!(error = %e, "model snapshot failed"),
        }
    }
}
