//! Kafka source and producer (rdkafka, bundled librdkafka). The consumer
//! joins the configured group (cooperative-sticky, auto-commit off) on a
//! thread of its own and hands the pipeline [`SourceMsg`]s: chunks of up to
//! `batch_size` messages (or what arrived within `batch_timeout_ms`) with
//! partition/offset positions and message timestamps, and the group's
//! assignment changes.
//!
//! pulse owns the offsets: on assignment each partition starts at the
//! `replay_from` of its checkpoint (or the beginning, without one); on
//! revocation the chunk in the making is delivered, then the source waits
//! until the pipeline has checkpointed and forgotten the partitions before
//! releasing them, so the next owner resumes from a complete checkpoint.
//! The offsets committed back to the group are only a progress hint for lag
//! monitoring. The producer side is used by `pulse gen` and the tests.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::checkpoint::CheckpointStore;
use crate::config::{KafkaConfig, Secrets};
use crate::model::{ChunkPool, Position, RawChunk};
use crate::source::SourceMsg;

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("kafka: {0} message(s) were not delivered")]
    Undelivered(u64),
}

fn base_config(cfg: &KafkaConfig, secrets: &Secrets) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.properties {
        c.set(k, v);
    }
    if let (Some(u), Some(p)) = (&secrets.kafka_sasl_username, &secrets.kafka_sasl_password) {
        c.set("sasl.username", u).set("sasl.password", p);
    }
    c
}

/// Sets `k` unless the user's properties already did.
fn set_default(c: &mut ClientConfig, k: &str, v: &str) {
    if c.get(k).is_none() {
        c.set(k, v);
    }
}

/// The consumer's context: rebalance handling and lag statistics.
pub struct PulseContext {
    topic: Arc<str>,
    checkpoints: CheckpointStore,
    /// Epochs claimed on assignment, before the checkpoint is read.
    fence: Arc<crate::fence::Fence>,
    start_at_end: bool,
    tx: mpsc::Sender<SourceMsg>,
    /// The chunk in the making, delivered before any assignment change.
    building: Mutex<RawChunk>,
    /// Set once the pipeline stopped listening.
    closed: AtomicBool,
    /// Decoded chunks to fill again.
    pool: ChunkPool,
}

impl PulseContext {
    fn send(&self, m: SourceMsg) -> bool {
        if self.closed.load(Ordering::Relaxed) {
            return false;
        }
        if self.tx.blocking_send(m).is_err() {
            self.closed.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Sends the chunk in the making, if any.
    fn flush(&self) -> bool {
        let chunk = {
            let mut b = self.building.lock().unwrap_or_else(|e| e.into_inner());
            if b.is_empty() {
                return true;
            }
            let next = RawChunk::reused_like(&b, &self.pool);
            std::mem::replace(&mut *b, next)
        };
        count_consumed(&chunk);
        self.send(SourceMsg::Chunk(chunk))
    }
}

fn new_chunk(topic: &Arc<str>) -> RawChunk {
    let mut c = RawChunk::new(topic.clone());
    c.partitioned_time = true;
    c
}

fn count_consumed(chunk: &RawChunk) {
    let mut per_part: BTreeMap<i32, u64> = BTreeMap::new();
    for pos in &chunk.positions {
        *per_part.entry(pos.partition).or_default() += 1;
    }
    for (p, n) in per_part {
        metrics::counter!("pulse_records_consumed_total", "source" => "kafka", "partition" => p.to_string())
            .increment(n);
    }
}

impl ClientContext for PulseContext {
    fn stats(&self, s: rdkafka::Statistics) {
        LagContext.stats(s)
    }
}

impl ConsumerContext for PulseContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let parts: Vec<i32> = tpl
            .elements_for_topic(&self.topic)
            .iter()
            .map(|e| e.partition())
            .collect();
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                let mut resumes = Vec::new();
                for &p in &parts {
                    // Fences the previous owner before reading what it left.
                    let epoch = match self.fence.claim(p) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::error!(partition = p, error = %e, "cannot claim the partition's epoch, stopping");
                            self.closed.store(true, Ordering::Relaxed);
                            return;
                        }
                    };
                    let cp = match self.checkpoints.load(p) {
                        Ok(cp) => cp,
                        Err(e) => {
                            // Refusing the assignment would stall the group; a corrupt
                            // checkpoint is a bug or a disk fault an operator must see.
                            tracing::error!(partition = p, error = %e, "cannot read checkpoint, stopping");
                            self.closed.store(true, Ordering::Relaxed);
                            return;
                        }
                    };
                    let offset = match &cp {
                        Some(c) => Offset::Offset(c.replay_from),
                        None if self.start_at_end => Offset::End,
                        None => Offset::Beginning,
                    };
                    tracing::info!(partition = p, epoch, offset = ?offset, checkpoint = cp.is_some(), "partition assigned");
                    if let Err(e) = tpl.set_partition_offset(&self.topic, p, offset) {
                        tracing::error!(partition = p, error = %e, "cannot set start offset");
                    }
                    resumes.push((p, cp));
                }
                if !self.flush() || !self.send(SourceMsg::Assigned(resumes)) {
                    return;
                }
                let r = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "assign failed");
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                tracing::info!(partitions = ?parts, lost = consumer.assignment_lost(), "partitions revoked");
                let (ack_tx, ack_rx) = std::sync::mpsc::sync_channel(1);
                let mut confirmed = false;
                if self.flush() && self.send(SourceMsg::Revoked(parts.clone(), ack_tx)) {
                    // Released only once their work is checkpointed.
                    confirmed = ack_rx.recv_timeout(Duration::from_secs(60)).is_ok();
                    if !confirmed {
                        tracing::warn!("pipeline did not confirm the revocation in time");
                    }
                }
                // Unconfirmed (the pipeline stopped listening: a stop, or it
                // is late), the pipeline may still commit these partitions'
                // files and checkpoints: the claims stay, so those writes
                // are still checked against a newer owner's epoch.
                if confirmed {
                    for &p in &parts {
                        self.fence.release(p);
                    }
                }
                let r = if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(e) = r {
                    tracing::error!(error = %e, "unassign failed");
                }
            }
            other => {
                tracing::error!(error = ?other, "rebalance error");
                let _ = consumer.unassign();
            }
        }
    }
}

/// Publishes librdkafka's per-partition consumer lag as a gauge.
pub struct LagContext;

impl ClientContext for LagContext {
    fn stats(&self, s: rdkafka::Statistics) {
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    metrics::gauge!("pulse_consumer_lag_records", "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                }
            }
        }
    }
}

pub use crate::model::Progress;

/// How the consumer thread runs and where it delivers.
pub struct ConsumerRun {
    /// Where the checkpoints live (`parquet.state_dir`, by default `parquet.data_dir`).
    pub data_dir: std::path::PathBuf,
    /// Messages per chunk.
    pub batch: usize,
    /// Longest wait for a partial chunk.
    pub linger: Duration,
    /// Stop after this long without messages, once partitions are assigned.
    pub idle: Option<Duration>,
    pub stop: tokio::sync::watch::Receiver<bool>,
    pub tx: mpsc::Sender<SourceMsg>,
    pub progress: Progress,
    /// Decoded chunks handed back for refilling.
    pub pool: ChunkPool,
    /// The partitions' ownership epochs (shared with the stages that write).
    pub fence: Arc<crate::fence::Fence>,
}

/// Runs the consumer on the calling thread until `stop`, an idle period or
/// the pipeline hangs up.
pub fn run_consumer(
    cfg: &KafkaConfig,
    secrets: &Secrets,
    run: ConsumerRun,
) -> Result<(), KafkaError> {
    let ConsumerRun {
        data_dir,
        batch,
        linger,
        idle,
        stop,
        tx,
        progress,
        pool,
        fence,
    } = run;
    let mut c = base_config(cfg, secrets);
    c.set("group.id", &cfg.group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    set_default(&mut c, "auto.offset.reset", "earliest");
    set_default(
        &mut c,
        "partition.assignment.strategy",
        "cooperative-sticky",
    );
    set_default(&mut c, "session.timeout.ms", "10000");
    // A subscribed topic that does not exist yet is looked for again at
    // this interval (librdkafka's default, 5 min, left a topic created just
    // after the subscription unconsumed that long): a metadata request every
    // 2 s finds it, and the group rebalances onto it (first batch ~6 s after
    // the topic's creation on tansu).
    set_default(&mut c, "topic.metadata.refresh.interval.ms", "2000");
    set_default(&mut c, "fetch.wait.max.ms", "100");
    set_default(&mut c, "statistics.interval.ms", "5000");
    // Prefetch at most 16 MiB (librdkafka's default is 64 MiB): the pipeline
    // drains ~50 MB/s, so this is still ~0.3 s of input queued, and memory
    // stays within budget (Kafka bench: 540-582 -> 497-523 MB peak RSS).
    set_default(&mut c, "queued.max.messages.kbytes", "16384");
    // When that queue is full, librdkafka postpones the partition's next
    // fetch by this much (default 1 s). The pipeline drains 16 MiB in ~0.3 s,
    // so with the default every stage sat idle for ~0.7 s after each refill
    // (seen in a per-thread profile of the Kafka bench: all threads idle,
    // the broker thread too). Re-checking every 10 ms costs nothing.
    set_default(&mut c, "fetch.queue.backoff.ms", "10");
    let start_at_end = c
        .get("auto.offset.reset")
        .is_some_and(|v| v == "latest" || v == "largest" || v == "end");
    let topic: Arc<str> = cfg.topic.as_str().into();
    let ctx = PulseContext {
        topic: topic.clone(),
        checkpoints: CheckpointStore::new(&data_dir, &cfg.topic),
        fence,
        start_at_end,
        tx,
        building: Mutex::new(new_chunk(&topic)),
        closed: AtomicBool::new(false),
        pool,
    };
    let consumer: BaseConsumer<PulseContext> = c.create_with_context(ctx)?;
    consumer.subscribe(&[&cfg.topic])?;
    let ctx = consumer.context();
    let mut first_at: Option<Instant> = None;
    let mut last_msg = Instant::now();
    let mut last_commit = Instant::now();
    let mut committed: BTreeMap<i32, i64> = BTreeMap::new();
    // One clock read per poll: at hundreds of thousands of messages a second,
    // reading it for each check cost ~3% of the pipeline's CPU.
    let mut now = Instant::now();
    loop {
        if *stop.borrow() || ctx.closed.load(Ordering::Relaxed) {
            break;
        }
        let wait = match first_at {
            Some(t) => linger.saturating_sub(now.duration_since(t)),
            None => Duration::from_millis(100),
        };
        let polled = consumer.poll(wait.max(Duration::from_millis(1)));
        now = Instant::now();
        match polled {
            None => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "kafka consume error");
                metrics::counter!("pulse_kafka_errors_total").increment(1);
            }
            Some(Ok(m)) => {
                let pos = Position {
                    partition: m.partition(),
                    offset: m.offset(),
                };
                let ts = m.timestamp().to_millis();
                let full = {
                    let mut b = ctx.building.lock().unwrap_or_else(|e| e.into_inner());
                    b.push(m.payload().unwrap_or_default(), pos);
                    b.timestamps.push(ts.unwrap_or(-1));
                    b.len() >= batch
                };
                first_at.get_or_insert(now);
                last_msg = now;
                if full {
                    ctx.flush();
                    first_at = None;
                }
            }
        }
        if first_at.is_some_and(|t| now.duration_since(t) >= linger) {
            ctx.flush();
            first_at = None;
        }
        if let Some(d) = idle
            && first_at.is_none()
            && now.duration_since(last_msg) >= d
        {
            // Idle time only counts once the group gave us partitions
            // (asked only when idle: the call is not cheap).
            let assigned = consumer
                .assignment()
                .map(|a| a.count() > 0)
                .unwrap_or(false);
            if assigned {
                tracing::info!("kafka source idle, draining");
                break;
            }
            last_msg = now;
        }
        if now.duration_since(last_commit) >= Duration::from_secs(2) {
            commit_progress(&consumer, &topic, &progress, &mut committed);
            last_commit = now;
        }
    }
    ctx.flush();
    ctx.closed.store(true, Ordering::Relaxed);
    Ok(())
}

/// Every partition of the topic, read outside the consumer group from
/// positions the caller keeps (the fleet's factor trainer: one reader of
/// the whole topic, whatever instance it runs on). Partitions created later
/// are picked up from their beginning.
pub struct TopicReader {
    consumer: BaseConsumer,
    topic: Arc<str>,
    /// Next offset to read, per partition assigned.
    next: BTreeMap<i32, i64>,
    last_refresh: Instant,
}

impl TopicReader {
    /// Reads `cfg.topic` from `from` (next offset per partition; others
    /// from their beginning).
    pub fn open(
        cfg: &KafkaConfig,
        secrets: &Secrets,
        from: &BTreeMap<i32, i64>,
    ) -> Result<Self, KafkaError> {
        let mut c = base_config(cfg, secrets);
        // Never joins the group (assign, not subscribe): the id only names it.
        c.set("group.id", format!("{}.trainer", cfg.group))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false");
        set_default(&mut c, "auto.offset.reset", "earliest");
        set_default(&mut c, "fetch.wait.max.ms", "100");
        set_default(&mut c, "queued.max.messages.kbytes", "16384");
        for k in [
            "group.instance.id",
            "partition.assignment.strategy",
            "session.timeout.ms",
            "heartbeat.interval.ms",
        ] {
            // Group settings of the pipeline's consumer do not apply here.
            let _ = c.remove(k);
        }
        let mut r = TopicReader {
            consumer: c.create()?,
            topic: cfg.topic.as_str().into(),
            next: from.iter().map(|(p, o)| (*p, (*o).max(0))).collect(),
            last_refresh: Instant::now(),
        };
        r.refresh()?;
        Ok(r)
    }

    /// Assigns partitions the topic gained since the last look.
    fn refresh(&mut self) -> Result<(), KafkaError> {
        self.last_refresh = Instant::now();
        let md = self
            .consumer
            .fetch_metadata(Some(&self.topic), Duration::from_secs(5))?;
        let parts: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let assigned = self.consumer.assignment()?.count();
        if assigned == parts.len() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for p in parts {
            let off = self.next.entry(p).or_insert(0);
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(*off))?;
        }
        self.consumer.assign(&tpl)?;
        Ok(())
    }

    /// Up to `max` records into `chunk` (cleared first), waiting at most
    /// `linger` for the first; an empty chunk means nothing was waiting.
    pub fn read(
        &mut self,
        chunk: &mut RawChunk,
        max: usize,
        linger: Duration,
    ) -> Result<(), KafkaError> {
        chunk.data.clear();
        chunk.ends.clear();
        chunk.positions.clear();
        chunk.timestamps.clear();
        chunk.partitioned_time = true;
        if self.last_refresh.elapsed() >= Duration::from_secs(10) {
            self.refresh()?;
        }
        let started = Instant::now();
        while chunk.len() < max {
            let wait = if chunk.is_empty() {
                linger.saturating_sub(started.elapsed())
            } else {
                Duration::ZERO
            };
            match self.consumer.poll(wait) {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consume error (trainer)");
                    metrics::counter!("pulse_kafka_errors_total").increment(1);
                    break;
                }
                Some(Ok(m)) => {
                    let pos = Position {
                        partition: m.partition(),
                        offset: m.offset(),
                    };
                    chunk.push(m.payload().unwrap_or_default(), pos);
                    chunk
                        .timestamps
                        .push(m.timestamp().to_millis().unwrap_or(-1));
                    self.next.insert(pos.partition, pos.offset + 1);
                }
            }
        }
        Ok(())
    }

    /// Whether every partition has been read up to its end at the broker now.
    pub fn at_end(&self) -> Result<bool, KafkaError> {
        for (&p, &next) in &self.next {
            let (_, high) =
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(5))?;
            if next < high {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Commits the durable offsets of the partitions still assigned (a hint).
fn commit_progress(
    consumer: &BaseConsumer<PulseContext>,
    topic: &str,
    progress: &Progress,
    committed: &mut BTreeMap<i32, i64>,
) {
    let Ok(assigned) = consumer.assignment() else {
        return;
    };
    let owned: Vec<i32> = assigned
        .elements_for_topic(topic)
        .iter()
        .map(|e| e.partition())
        .collect();
    let p = progress.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let mut tpl = TopicPartitionList::new();
    for (part, off) in p {
        if owned.contains(&part)
            && committed.get(&part) != Some(&off)
            && tpl
                .add_partition_offset(topic, part, Offset::Offset(off))
                .is_ok()
        {
            committed.insert(part, off);
        }
    }
    if tpl.count() > 0
        && let Err(e) = consumer.commit(&tpl, CommitMode::Async)
    {
        tracing::debug!(error = %e, "progress commit failed");
    }
}

/// Creates `topic` with `partitions` partitions (an existing topic is fine).
pub async fn create_topic(
    cfg: &KafkaConfig,
    secrets: &Secrets,
    topic: &str,
    partitions: i32,
) -> Result<(), KafkaError> {
    let admin: AdminClient<DefaultClientContext> = base_config(cfg, secrets).create()?;
    let nt = NewTopic::new(topic, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(
            &[nt],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
        )
        .await?;
    for r in res {
        match r {
            Ok(_) => {}
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => {
                tracing::error!(topic = %t, error = %code, "create topic failed");
                return Err(KafkaError::Client(rdkafka::error::KafkaError::AdminOp(
                    code,
                )));
            }
        }
    }
    Ok(())
}

struct CountingContext {
    failed: Arc<AtomicU64>,
}

impl ClientContext for CountingContext {}

impl ProducerContext for CountingContext {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if r.is_err() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A producer that counts failed deliveries; `finish` flushes and reports them.
pub struct EventProducer {
    producer: ThreadedProducer<CountingContext>,
    failed: Arc<AtomicU64>,
    topic: String,
}

impl EventProducer {
    pub fn new(cfg: &KafkaConfig, secrets: &Secrets, topic: &str) -> Result<Self, KafkaError> {
        Self::with_properties(cfg, secrets, topic, &[])
    }

    /// A producer with extra librdkafka defaults (the configuration's
    /// `kafka.properties` still win).
    pub fn with_properties(
        cfg: &KafkaConfig,
        secrets: &Secrets,
        topic: &str,
        extra: &[(&str, &str)],
    ) -> Result<Self, KafkaError> {
        let failed = Arc::new(AtomicU64::new(0));
        let mut c = base_config(cfg, secrets);
        for (k, v) in extra {
            set_default(&mut c, k, v);
        }
        for (k, v) in [
            ("linger.ms", "20"),
            ("batch.num.messages", "10000"),
            ("queue.buffering.max.messages", "500000"),
            ("enable.idempotence", "false"),
        ] {
            set_default(&mut c, k, v);
        }
        let producer = c.create_with_context(CountingContext {
            failed: failed.clone(),
        })?;
        Ok(EventProducer {
            producer,
            failed,
            topic: topic.to_string(),
        })
    }

    /// Sends one record, waiting while the local queue is full.
    pub fn send(&self, key: &[u8], payload: &[u8]) -> Result<(), KafkaError> {
        let mut rec = BaseRecord::to(&self.topic).key(key).payload(payload);
        loop {
            match self.producer.send(rec) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(
                        rdkafka::types::RDKafkaErrorCode::QueueFull,
                    ),
                    r,
                )) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    }

    pub fn finish(self) -> Result<(), KafkaError> {
        use rdkafka::producer::Producer;
        self.producer.flush(Duration::from_secs(60))?;
        match self.failed.load(Ordering::Relaxed) {
            0 => Ok(()),
            n => Err(KafkaError::Undelivered(n)),
        }
    }
}

/// Whether the brokers answer a metadata request within `timeout` (blocking).
pub fn check_brokers(brokers: &str, timeout: Duration) -> Result<(), String> {
    let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .map_err(|e| e.to_string())?;
    c.fetch_metadata(None, timeout)
        .map(|_| ())
        .map_err(|e| e.to_string())
}
