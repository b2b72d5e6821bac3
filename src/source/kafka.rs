//! Kafka source and producer (rdkafka, bundled librdkafka). The consumer joins
//! the configured group with auto-commit off and produces [`RawChunk`]s of up
//! to `batch_size` messages (or what arrived within `batch_timeout_ms`), with
//! topic/partition/offset positions. Offsets are committed back to the group
//! only by [`KafkaSource::commit`], which the pipeline calls once the effects
//! of the consumed messages are durable: at-least-once delivery. The producer
//! side is used by `pulse gen` and the tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::config::{KafkaConfig, Secrets};
use crate::model::{Position, RawChunk};

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

/// Publishes librdkafka's per-partition consumer lag as a gauge.
pub struct LagContext;

impl ClientContext for LagContext {
    fn stats(&self, s: rdkafka::Statistics) {
        for (topic, t) in &s.topics {
            for (p, part) in &t.partitions {
                if *p >= 0 && part.consumer_lag >= 0 {
                    metrics::gauge!("pulse_consumer_lag", "topic" => topic.clone(), "partition" => p.to_string())
                        .set(part.consumer_lag as f64);
                }
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LagContext {}

pub struct KafkaSource {
    consumer: StreamConsumer<LagContext>,
    topic: Arc<str>,
    /// Next offset to consume per partition, for commits.
    consumed: BTreeMap<i32, i64>,
}

impl KafkaSource {
    pub fn new(cfg: &KafkaConfig, secrets: &Secrets) -> Result<Self, KafkaError> {
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
        set_default(&mut c, "fetch.wait.max.ms", "100");
        set_default(&mut c, "statistics.interval.ms", "5000");
        let consumer: StreamConsumer<LagContext> = c.create_with_context(LagContext)?;
        consumer.subscribe(&[&cfg.topic])?;
        Ok(KafkaSource {
            consumer,
            topic: cfg.topic.as_str().into(),
            consumed: BTreeMap::new(),
        })
    }

    /// Waits for the next chunk: up to `max` messages, returning early once
    /// `linger` has passed since the first message. `None` after `idle`
    /// without any message (when `idle` is set).
    pub async fn next_chunk(
        &mut self,
        max: usize,
        linger: Duration,
        idle: Option<Duration>,
        stop: Option<&tokio::sync::watch::Receiver<bool>>,
    ) -> Result<Option<RawChunk>, KafkaError> {
        let mut chunk = RawChunk::new(self.topic.clone());
        let mut first_at: Option<Instant> = None;
        let mut idle_deadline = idle.map(|d| Instant::now() + d);
        loop {
            if stop.is_some_and(|s| *s.borrow()) {
                break;
            }
            let wait = match first_at {
                Some(t) => linger.saturating_sub(t.elapsed()),
                // Short waits so a stop request is seen within half a second.
                None => idle_deadline.map_or(Duration::from_millis(500), |d| {
                    d.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(500))
                }),
            };
            if wait.is_zero() {
                if first_at.is_none() && !self.has_assignment() {
                    // Idle time only counts once the group gave us partitions.
                    idle_deadline = idle.map(|d| Instant::now() + d);
                    continue;
                }
                break;
            }
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) => {
                    if first_at.is_some() {
                        break;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "kafka consume error");
                    metrics::counter!("pulse_kafka_errors_total").increment(1);
                }
                Ok(Ok(m)) => {
                    let pos = Position {
                        partition: m.partition(),
                        offset: m.offset(),
                    };
                    chunk.push(m.payload().unwrap_or_default(), pos);
                    self.consumed.insert(pos.partition, pos.offset + 1);
                    first_at.get_or_insert_with(Instant::now);
                    if chunk.len() >= max {
                        break;
                    }
                }
            }
        }
        chunk.partitioned_time = true;
        let mut per_part: BTreeMap<i32, u64> = BTreeMap::new();
        for pos in &chunk.positions {
            *per_part.entry(pos.partition).or_default() += 1;
        }
        for (p, n) in per_part {
            metrics::counter!("pulse_records_consumed_total", "source" => "kafka", "partition" => p.to_string())
                .increment(n);
        }
        chunk.assigned = self.consumer.assignment().ok().map(|tpl| {
            tpl.elements_for_topic(&self.topic)
                .iter()
                .map(|e| e.partition())
                .collect()
        });
        Ok((!chunk.is_empty()).then_some(chunk))
    }

    fn has_assignment(&self) -> bool {
        self.consumer
            .assignment()
            .map(|a| a.count() > 0)
            .unwrap_or(false)
    }

    /// Commits the consumed positions to the group (a progress hint for lag
    /// monitoring and the restart point of this at-least-once source).
    pub fn commit(&self) -> Result<(), KafkaError> {
        if self.consumed.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &o) in &self.consumed {
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(o))?;
        }
        self.consumer.commit(&tpl, CommitMode::Sync)?;
        Ok(())
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
        let failed = Arc::new(AtomicU64::new(0));
        let mut c = base_config(cfg, secrets);
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
