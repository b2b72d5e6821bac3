//! Benchmarks of the Kafka path (`pulse bench --kafka`), run by hand against a
//! real broker, never by the test suite. Consumes a broker address and a
//! configuration; produces a report:
//! - throughput: N generated events are produced to a fresh topic first (not
//!   timed); then a raw rdkafka consumer that only counts messages and the
//!   whole pulse pipeline drain the same topic, each in its own group, timed
//!   from the first message to the last one processed (group joins excluded);
//! - freshness: events stamped with the wall clock are produced at a steady
//!   rate while the pipeline runs; freshness is the time from an event's
//!   timestamp until the store write of its batch completed; and a reader
//!   polling the tables' snapshots meanwhile measures when each event (from
//!   its timestamp) and each minute row (from the earliest moment its window
//!   could be final) became queryable.
//!
//! Delivery: the bench topics and groups are throw-away; the pipeline writes
//! to a temporary data directory.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

use crate::app::{PipelineError, SourceSpec, Summary};
use crate::config::{Config, Secrets};
use crate::sink::store::Store;
use crate::source::generator::{GenParams, Generator};
use crate::source::kafka::{EventProducer, KafkaError, create_topic};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("kafka: {0}")]
    Client(#[from] rdkafka::error::KafkaError),
    #[error("bench: {0}")]
    Other(String),
}

/// Throughput of the Kafka path.
#[derive(Debug, Clone)]
pub struct KafkaReport {
    pub events: u64,
    pub raw_secs: f64,
    pub pulse_secs: f64,
    pub summary: Summary,
    /// Peak RSS while the pipeline drained the topic (the high-water mark is
    /// reset after producing and the raw run; memory the allocator kept from
    /// them still counts, so this is an upper bound). `None` off Linux.
    pub pipeline_peak_rss: Option<u64>,
    /// RSS when the pipeline started (what the earlier phases left behind).
    pub rss_before_pipeline: Option<u64>,
    /// CPU seconds (all threads, user + system) this process spent in the
    /// raw consumer's run and in the pipeline's, group joins and the idle
    /// exit included; the broker's and Redis's are not. `None` off Linux.
    pub raw_cpu_secs: Option<f64>,
    pub pulse_cpu_secs: Option<f64>,
}

/// Resets this process's peak-RSS mark to the current RSS (Linux ≥ 4.0).
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// CPU seconds (user + system, all threads) this process has used (Linux:
/// `/proc/self/stat` in USER_HZ ticks, which the kernel fixes at 100/s).
pub fn process_cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/stat").ok()?;
    cpu_secs_of_stat(&s)
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds.
fn cpu_secs_of_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: fields are counted
    // after its closing parenthesis, from field 3 (the state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Seconds of CPU from `before` to now, if both are known.
fn cpu_since(before: Option<f64>) -> Option<f64> {
    Some(process_cpu_secs()? - before?)
}

/// This process's peak RSS in bytes since start or the last reset (Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("VmHWM:").map(|kb| kb * 1024)
}

/// This process's current RSS in bytes (Linux).
pub fn rss_bytes() -> Option<u64> {
    status_kb("VmRSS:").map(|kb| kb * 1024)
}

fn status_kb(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

impl KafkaReport {
    pub fn raw_rate(&self) -> f64 {
        self.events as f64 / self.raw_secs
    }
    pub fn pulse_rate(&self) -> f64 {
        self.events as f64 / self.pulse_secs
    }
}

fn unique(name: &str) -> String {
    format!(
        "{name}-{}-{}",
        std::process::id(),
        chrono::Utc::now().timestamp_millis()
    )
}

/// Generates the events straight into `topic` (keys spread over partitions;
/// the producer's own queue bounds what is in memory) and returns how many
/// were sent.
fn produce(cfg: &Config, topic: &str, p: GenParams) -> Result<u64, BenchError> {
    let prod = EventProducer::new(&cfg.kafka, &Secrets::default(), topic)?;
    let mut g = Generator::new(p);
    let mut line = Vec::with_capacity(512);
    let mut n = 0u64;
    loop {
        line.clear();
        if g.next_into(&mut line).is_none() {
            break;
        }
        prod.send(&(n % 97).to_le_bytes(), &line)?;
        n += 1;
    }
    prod.finish()?;
    Ok(n)
}

/// Counts `n` messages of `topic` with a plain consumer in a new group.
fn raw_consume(cfg: &Config, topic: &str, n: u64) -> Result<f64, BenchError> {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", unique("pulse-bench-raw"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()?;
    c.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < n {
        if Instant::now() > deadline {
            return Err(BenchError::Other(format!("raw consumer saw {seen} of {n}")));
        }
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            let m = m?;
            first.get_or_insert_with(Instant::now);
            // Touch the payload like a real consumer would.
            std::hint::black_box(m.payload().map(|p| p.len()));
            seen += 1;
        }
    }
    Ok(first.map_or(0.0, |t| t.elapsed().as_secs_f64()))
}

/// Raw consumer vs the pipeline on the same `events` events, same broker.
pub async fn kafka_throughput(
    cfg: &Config,
    store: Store,
    events: u64,
    partitions: i32,
) -> Result<KafkaReport, BenchError> {
    let topic = unique("pulse-bench");
    create_topic(&cfg.kafka, &Secrets::default(), &topic, partitions).await?;
    let t = Instant::now();
    let n = {
        let cfg = cfg.clone();
        let topic = topic.clone();
        let p = GenParams {
            events,
            seed: 7,
            ..GenParams::default()
        };
        tokio::task::spawn_blocking(move || produce(&cfg, &topic, p))
            .await
            .map_err(|e| BenchError::Other(e.to_string()))??
    };
    eprintln!(
        "produced {n} records to {topic} ({partitions} partitions) in {:.1}s (not timed)",
        t.elapsed().as_secs_f64()
    );
    let cpu = process_cpu_secs();
    let raw_secs = {
        let cfg = cfg.clone();
        let topic = topic.clone();
        tokio::task::spawn_blocking(move || raw_consume(&cfg, &topic, n))
            .await
            .map_err(|e| BenchError::Other(e.to_string()))??
    };
    let raw_cpu_secs = cpu_since(cpu);
    let mut pcfg = cfg.clone();
    pcfg.kafka.topic = topic;
    pcfg.kafka.group = unique("pulse-bench");
    // At least 1.5 s; longer when configured (slow runs: profilers, heaptrack).
    pcfg.pipeline.idle_exit_ms = cfg.pipeline.idle_exit_ms.max(1500);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let reset = reset_peak_rss();
    let rss_before_pipeline = rss_bytes();
    let cpu = process_cpu_secs();
    let s = crate::app::run(&pcfg, &Secrets::default(), SourceSpec::Kafka, store, rx).await?;
    let pulse_cpu_secs = cpu_since(cpu);
    let pipeline_peak_rss = if reset { peak_rss_bytes() } else { None };
    if s.records != n {
        return Err(BenchError::Other(format!(
            "pipeline processed {} of {n} records",
            s.records
        )));
    }
    let pulse_secs = match (s.first_batch_at, s.last_batch_done_at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => return Err(BenchError::Other("no batch processed".into())),
    };
    Ok(KafkaReport {
        events: n,
        raw_secs,
        pulse_secs,
        summary: s,
        pipeline_peak_rss,
        rss_before_pipeline,
        raw_cpu_secs,
        pulse_cpu_secs,
    })
}

/// When rows became queryable, ms, as a reader polling the tables saw them.
#[derive(Debug, Default, Clone)]
pub struct TableFreshness {
    /// From an event's timestamp until its row was in `events`.
    pub events: Vec<f64>,
    /// From the earliest moment a window could be final (its end plus the
    /// out-of-orderness and the allowed lateness) until its row was in `minute_stats`.
    pub minute_rows: Vec<f64>,
    /// The same two, with each row's visibility taken as the time of the
    /// log commit that added its file (the commit file's modification time):
    /// what any reader could see, without the polling reader's own delay.
    pub events_by_commit: Vec<f64>,
    pub minute_rows_by_commit: Vec<f64>,
    /// Per table, per (hour, source partition): files added as new data,
    /// and files in the final snapshot (after compaction).
    pub files: Vec<(&'static str, crate::sink::parquet::delta::FileCounts)>,
}

/// The `q` quantile of `v` (nearest rank), NaN when empty.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Polls the `events` and `minute_stats` tables under `root` every 250 ms
/// until `stop`, noting when each row was first seen (compacted files hold
/// rows seen before: those are not new).
fn poll_tables(
    root: std::path::PathBuf,
    since_ms: i64,
    final_after_ms: i64,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> TableFreshness {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Int32Type, TimestampMillisecondType, UInt64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = TableFreshness::default();
    let mut files_seen = std::collections::HashSet::new();
    let mut events_seen = std::collections::HashSet::new();
    let mut rows_seen = std::collections::HashSet::new();
    loop {
        let last = stop.load(std::sync::atomic::Ordering::Relaxed);
        for table in ["events", "minute_stats"] {
            let dir = root.join(table);
            let Some(files) = crate::sink::parquet::delta::snapshot_files(&dir) else {
                continue;
            };
            let now = chrono::Utc::now().timestamp_millis() as f64;
            for f in files {
                if !files_seen.insert(format!("{table}/{f}")) {
                    continue;
                }
                let Ok(file) = std::fs::File::open(dir.join(&f)) else {
                    continue;
                };
                let Ok(reader) =
                    ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build())
                else {
                    continue;
                };
                for b in reader.flatten() {
                    let col = |n: &str| b.column_by_name(n).cloned();
                    if table == "events" {
                        let (Some(id), Some(ts)) = (col("event_id"), col("ts")) else {
                            continue;
                        };
                        let id = id.as_primitive::<UInt64Type>();
                        let ts = ts.as_primitive::<TimestampMillisecondType>();
                        for i in 0..b.num_rows() {
                            // Rows of the throughput phase (older event times) are not timed.
                            if ts.value(i) >= since_ms && events_seen.insert(id.value(i)) {
                                out.events.push(now - ts.value(i) as f64);
                            }
                        }
                    } else {
                        let (Some(w), Some(svc), Some(p)) =
                            (col("window_start"), col("service"), col("src_partition"))
                        else {
                            continue;
                        };
                        let w = w.as_primitive::<TimestampMillisecondType>();
                        let p = p.as_primitive::<Int32Type>();
                        let svc = datafusion::arrow::compute::cast(
                            &svc,
                            &datafusion::arrow::datatypes::DataType::Utf8,
                        );
                        let Ok(svc) = svc else { continue };
                        let svc = svc.as_string::<i32>();
                        for i in 0..b.num_rows() {
                            if w.value(i) < since_ms {
                                continue;
                            }
                            let key = (w.value(i), svc.value(i).to_string(), p.value(i));
                            if rows_seen.insert(key) {
                                out.minute_rows
                                    .push(now - (w.value(i) + final_after_ms) as f64);
                            }
                        }
                    }
                }
            }
        }
        if last {
            return out;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs the pipeline while events stamped with the wall clock arrive at
/// `rate` per second for `secs`; the summary's freshness histogram has the
/// store's answer, the [`TableFreshness`] the tables'.
pub async fn freshness(
    cfg: &Config,
    store: Store,
    rate: f64,
    secs: u64,
) -> Result<(Summary, TableFreshness), BenchError> {
    let topic = unique("pulse-fresh");
    create_topic(&cfg.kafka, &Secrets::default(), &topic, 4).await?;
    let mut pcfg = cfg.clone();
    pcfg.kafka.topic = topic.clone();
    pcfg.kafka.group = unique("pulse-fresh");
    // Longer than the producer's start delay below.
    pcfg.pipeline.idle_exit_ms = 15000;
    let run = {
        let pcfg = pcfg.clone();
        tokio::spawn(async move {
            let (_tx, rx) = tokio::sync::watch::channel(false);
            crate::app::run(&pcfg, &Secrets::default(), SourceSpec::Kafka, store, rx).await
        })
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Events of this phase are stamped from now on; whole minutes after it.
    let since = chrono::Utc::now().timestamp_millis();
    let reader = {
        let root = pcfg.parquet.data_dir.clone();
        let w = &pcfg.window;
        let final_after =
            (w.size_secs * 1000 + w.out_of_orderness_ms + w.allowed_lateness_ms) as i64;
        let stop = stop.clone();
        std::thread::spawn(move || poll_tables(root, since, final_after, stop))
    };
    // Let the consumer join its group first: freshness is about steady state.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let kcfg = cfg.clone();
    tokio::task::spawn_blocking(move || -> Result<(), BenchError> {
        let p = EventProducer::new(&kcfg.kafka, &Secrets::default(), &topic)?;
        let start = chrono::Utc::now().timestamp_millis();
        let mut g = Generator::new(GenParams {
            events: (rate * secs as f64) as u64,
            seed: 11,
            rate_per_sec: rate,
            start_ms: start,
            late_fraction: 0.0,
            invalid_fraction: 0.0,
            disorder_fraction: 0.0,
            incidents: false,
            ..GenParams::default()
        });
        let t0 = Instant::now();
        let mut l = Vec::with_capacity(256);
        let mut i = 0u64;
        loop {
            l.clear();
            if g.next_into(&mut l).is_none() {
                break;
            }
            // Pace: event i is due at i / rate seconds.
            let due = Duration::from_secs_f64(i as f64 / rate);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
            p.send(&(i % 97).to_le_bytes(), &l)?;
            i += 1;
        }
        p.finish()?;
        Ok(())
    })
    .await
    .map_err(|e| BenchError::Other(e.to_string()))??;
    let s = run.await.map_err(|e| BenchError::Other(e.to_string()))??;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tables = reader
        .join()
        .map_err(|_| BenchError::Other("the table reader panicked".into()))?;
    for t in ["events", "minute_stats"] {
        let root = pcfg.parquet.data_dir.join(t);
        tables
            .files
            .push((t, crate::sink::parquet::delta::file_counts(&root)));
    }
    let w = &pcfg.window;
    let final_after = (w.size_secs * 1000 + w.out_of_orderness_ms + w.allowed_lateness_ms) as i64;
    let root = &pcfg.parquet.data_dir;
    tables.events_by_commit = by_commit(&root.join("events"), "ts", since, 0);
    tables.minute_rows_by_commit = by_commit(
        &root.join("minute_stats"),
        "window_start",
        since,
        final_after,
    );
    Ok((s, tables))
}

/// For every file a commit of the table at `root` added as new data: its
/// rows' time in `column` (at or after `since_ms`, plus `offset_ms`) to the
/// commit's time, ms.
fn by_commit(root: &std::path::Path, column: &str, since_ms: i64, offset_ms: i64) -> Vec<f64> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::TimestampMillisecondType;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut out = Vec::new();
    for (at, path) in crate::sink::parquet::delta::data_adds(root) {
        let Ok(f) = std::fs::File::open(root.join(&path)) else {
            continue;
        };
        let Ok(reader) = ParquetRecordBatchReaderBuilder::try_new(f).and_then(|b| b.build()) else {
            continue;
        };
        for b in reader.flatten() {
            let Some(c) = b.column_by_name(column) else {
                continue;
            };
            let mut seen = std::collections::BTreeSet::new();
            for &t in c.as_primitive::<TimestampMillisecondType>().values() {
                // A minute row per service: each window once per file.
                if t >= since_ms && (offset_ms == 0 || seen.insert(t)) {
                    out.push((at - t - offset_ms) as f64);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_read_after_the_command_name() {
        // A command name with spaces and a parenthesis; utime 250, stime 75 ticks.
        let stat = "4242 (a b) c)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 75 0 0 20 0 7 0 100";
        assert_eq!(cpu_secs_of_stat(stat), Some(3.25));
        assert_eq!(cpu_secs_of_stat("4242 (x) S 1 2"), None);
        assert_eq!(cpu_secs_of_stat("no name"), None);
    }

    #[test]
    fn process_cpu_time_grows_with_work() {
        let start = process_cpu_secs().expect("Linux /proc");
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut x = 1u64;
        while process_cpu_secs().unwrap() <= start {
            assert!(Instant::now() < deadline, "CPU time did not advance");
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
        }
    }
}
