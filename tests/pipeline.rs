//! End-to-end runs of the spine against real services: the file source, and
//! the Kafka source (tansu broker) with the Redis store (redis-server).

mod common;

use std::collections::BTreeSet;
use std::io::Write;

use common::*;
use datafusion::arrow::array::AsArray;
use pulse::app::{self, SourceSpec};
use pulse::config::{Config, Secrets};
use pulse::sink::store::{MemoryStore, Store};
use redis::AsyncCommands;

fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.to_path_buf();
    cfg.pipeline.batch_size = 4096;
    cfg
}

async fn check_dead_letters(dir: &std::path::Path, expect_invalid: usize) {
    let b = sql(dir, "SELECT reason, raw, src_offset FROM dead_letters").await;
    let n: usize = b.iter().map(|b| b.num_rows()).sum();
    assert_eq!(n, expect_invalid, "dead letters");
    for b in &b {
        let reason = b.column(0).as_string::<i32>();
        for i in 0..b.num_rows() {
            assert!(
                !reason.value(i).is_empty(),
                "every dead letter has a reason"
            );
        }
    }
    let reasons = sql(
        dir,
        "SELECT reason FROM dead_letters WHERE raw LIKE '%\"status\":999%'",
    )
    .await;
    let r = reasons[0].column(0).as_string::<i32>().value(0).to_string();
    assert!(r.contains("status 999"), "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_source_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lines = input_lines(30_000, 11);
    let exp = expected(&lines);
    // one plain file and one gzip file
    let (a, b) = lines.split_at(lines.len() / 2);
    let pa = dir.path().join("a.jsonl");
    let pb = dir.path().join("b.jsonl.gz");
    let mut fa = std::fs::File::create(&pa).unwrap();
    for l in a {
        fa.write_all(l).unwrap();
        fa.write_all(b"\n").unwrap();
    }
    let mut fb = flate2::write::GzEncoder::new(
        std::fs::File::create(&pb).unwrap(),
        flate2::Compression::fast(),
    );
    for l in b {
        fb.write_all(l).unwrap();
        fb.write_all(b"\n").unwrap();
    }
    fb.finish().unwrap();

    let cfg = config(&data);
    let mem = MemoryStore::default();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Files(vec![pa, pb]),
        Store::Memory(mem.clone()),
        rx,
    )
    .await
    .unwrap();
    assert_eq!(s.records as usize, lines.len());
    assert_eq!(s.invalid as usize, exp.invalid);
    assert!(
        s.late > 0,
        "the input has late events within allowed lateness"
    );

    let ids = event_ids(&data).await;
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), ids_set(&exp));
    assert_eq!(ids.len(), exp.valid.len(), "no duplicates");
    check_dead_letters(&data, exp.invalid).await;

    let got = minute_stats(&data).await;
    let want = recompute(&data, Some(false)).await;
    assert_stats_match(&got, &want);
    // nothing was too late here, so every valid event is counted
    let total: i64 = got.values().map(|v| v.0).sum();
    assert_eq!(total as usize, exp.valid.len());
    // the in-process store holds the same numbers
    let snap = mem.snapshot();
    for ((ws, svc, _), v) in &got {
        let r = &snap.stats[&(svc.clone(), *ws)];
        assert_eq!((r.requests, r.errors), (v.0, v.1));
        assert!(r.is_final);
    }
    // an independent reader agrees
    let (ev, req, dl) = pyarrow_counts(&data);
    assert_eq!(
        (ev as usize, req as i64, dl as usize),
        (exp.valid.len(), total, exp.invalid)
    );
    // no in-progress file is left behind
    let leftovers = walk(&data)
        .into_iter()
        .filter(|p| p.contains(".inprogress"))
        .count();
    assert_eq!(leftovers, 0);
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_source_to_parquet_and_redis() {
    let brokers = service("PULSE_TEST_BROKERS");
    let redis_url = service("PULSE_TEST_REDIS");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let topic = unique("events");
    let prefix = unique("t");

    // 20,000 events over ~1.4 h of event time: the first hour closes.
    let lines = input_lines_at(20_000, 5, 4.0);
    let exp = expected(&lines);
    let mut cfg = config(&data);
    cfg.kafka.brokers = brokers;
    cfg.kafka.topic = topic.clone();
    cfg.kafka.group = unique("g");
    cfg.pipeline.idle_exit_ms = 4000;
    cfg.redis.url = redis_url.clone();
    cfg.redis.prefix = prefix.clone();
    let records: Vec<(u64, Vec<u8>)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 % 97, l.clone()))
        .collect();
    common::produce(&cfg, 4, records).await;

    let metrics = pulse::serve::metrics_handle().expect("recorder installed");
    let s = common::run_kafka(&cfg).await;
    let text = metrics.render();
    for p in 0..4 {
        let m = format!("pulse_records_consumed_total{{source=\"kafka\",partition=\"{p}\"}}");
        assert!(text.contains(&m), "/metrics lacks {m}");
    }
    assert_eq!(
        s.records as usize,
        lines.len(),
        "every produced record was consumed"
    );

    let ids = event_ids(&data).await;
    assert_eq!(ids.len(), exp.valid.len());
    assert_eq!(ids.iter().copied().collect::<BTreeSet<_>>(), ids_set(&exp));
    // Each file names its writer and the partition owner's epoch (lineage).
    for p in walk(&data.join("events"))
        .iter()
        .filter(|p| p.ends_with(".parquet"))
    {
        let kv = file_metadata(p);
        let get = |k: &str| kv.get(k).cloned().unwrap_or_default();
        assert!(
            get("pulse.epoch").parse::<u64>().unwrap_or(0) >= 1,
            "{p}: {kv:?}"
        );
        assert!(get("pulse.writer").starts_with("pulse "), "{p}: {kv:?}");
    }
    check_dead_letters(&data, exp.invalid).await;
    // dead letters carry their Kafka position
    let pos = sql(
        &data,
        "SELECT count(DISTINCT src_partition) FROM dead_letters",
    )
    .await;
    assert!(
        pos[0]
            .column(0)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0)
            > 1
    );

    // Parquet: per-partition rows, exact on every row, complete for the
    // hours the watermarks closed (open windows wait in the checkpoints).
    let got = minute_stats(&data).await;
    let want = recompute(&data, Some(true)).await;
    let closed = closed_hours(&data, &cfg).await;
    assert_closed_stats_match(&got, &want, &closed);
    assert!(
        got.keys().map(|k| k.2).collect::<BTreeSet<_>>().len() > 1,
        "rows of several partitions"
    );
    // Per-partition watermarks: interleaved partitions do not make each other late.
    assert_eq!(
        s.too_late, 0,
        "no event of the input is beyond allowed lateness"
    );

    // Redis holds every window merged over the partitions, in the documented layout
    let merged = recompute(&data, None).await;
    let total: i64 = merged.values().map(|v| v.0).sum();
    assert_eq!(total as usize, exp.valid.len());
    assert_stats_match(&redis_stats(&redis_url, &prefix).await, &merged);
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let services: BTreeSet<String> = con.smembers(format!("{prefix}:services")).await.unwrap();
    let want_services: BTreeSet<String> = merged.keys().map(|k| k.1.clone()).collect();
    assert_eq!(services, want_services);
    let minutes: Vec<i64> = con
        .zrange(format!("{prefix}:minutes:checkout"), 0, -1)
        .await
        .unwrap();
    assert_eq!(
        minutes.len(),
        merged.keys().filter(|k| k.1 == "checkout").count()
    );
    let top: Vec<(String, f64)> = con
        .zrevrange_withscores(
            format!("{prefix}:top:{}", got.keys().next().unwrap().0 / 1000),
            0,
            2,
        )
        .await
        .unwrap();
    assert!(!top.is_empty() && top[0].1 >= 1.0);
    let (ev, _, dl) = pyarrow_counts(&data);
    assert_eq!((ev as usize, dl as usize), (exp.valid.len(), exp.invalid));
}

/// pulse subscribed before the topic existed (a deployment that starts the
/// consumers first): once the topic is created and filled, its records are
/// consumed within 10 s, all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_created_after_the_subscription_is_consumed() {
    let brokers = service("PULSE_TEST_BROKERS");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("data"));
    cfg.kafka.brokers = brokers;
    cfg.kafka.topic = unique("late");
    cfg.kafka.group = unique("g");
    // Long enough to outlast the wait for the topic; ends the run after it.
    cfg.pipeline.idle_exit_ms = 25_000;
    cfg.reco.enabled = false;
    let lines = input_lines_at(2_000, 9, 10.0);
    let exp = expected(&lines);
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let run_cfg = cfg.clone();
    let run = tokio::spawn(async move {
        app::run(
            &run_cfg,
            &Secrets::default(),
            SourceSpec::Kafka,
            Store::Memory(MemoryStore::default()),
            rx,
        )
        .await
    });
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let created = std::time::Instant::now();
    let records: Vec<(u64, Vec<u8>)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (i as u64 % 7, l.clone()))
        .collect();
    common::produce(&cfg, 2, records).await;
    let s = run.await.unwrap().unwrap();
    assert_eq!(s.events as usize, exp.valid.len(), "every valid event");
    assert_eq!(s.records as usize, lines.len(), "every record");
    let first = s.first_batch_at.expect("a batch arrived");
    let waited = first.saturating_duration_since(created);
    eprintln!("first batch {waited:?} after the topic was created");
    assert!(
        waited <= std::time::Duration::from_secs(10),
        "first batch {waited:?} after the topic was created"
    );
}

/// A hostile producer: script in service names, bad endpoints, overlong
/// names, and a flood of distinct services. Every record lands once, in
/// `events` or in `dead_letters` with its reason; past
/// `validation.max_services` a service's events are `cardinality` dead
/// letters, and only admitted services reach the minute rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_and_service_floods_become_dead_letters_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let ev = |id: usize, svc: &str, endpoint: &str| {
        let ts = 1_795_305_600_000i64 + id as i64 * 100;
        serde_json::json!({
            "event_id": id, "ts": ts, "user_id": 1 + id % 50, "item_id": 1 + id % 70,
            "event_type": "view", "service": svc, "endpoint": endpoint,
            "status": 200, "latency_ms": 5.0 + (id % 9) as f64,
        })
        .to_string()
    };
    let mut lines = Vec::new();
    let normal = ["cart", "catalog", "checkout", "reco", "search"];
    for i in 0..5_000 {
        lines.push(ev(i, normal[i % 5], "/api/v1/items"));
    }
    for i in 0..2_000 {
        lines.push(ev(10_000 + i, &format!("tenant-{i}"), "/x"));
    }
    for i in 0..40 {
        lines.push(ev(20_000 + i, "<img src=x onerror=alert(1)>", "/x"));
        lines.push(ev(20_100 + i, "cart", "/x\"><script>alert(1)</script>"));
        lines.push(ev(20_200 + i, &"s".repeat(65 + i), "/x"));
    }
    let path = dir.path().join("hostile.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let mut cfg = config(&data);
    cfg.validation.max_services = 100;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Files(vec![path]),
        Store::Memory(MemoryStore::default()),
        rx,
    )
    .await
    .unwrap();
    assert_eq!(s.records as usize, lines.len());
    let mut by_reason = std::collections::BTreeMap::new();
    for b in sql(&data, "SELECT reason FROM dead_letters").await {
        let r = b.column(0).as_string::<i32>();
        for i in 0..b.num_rows() {
            let kind = r.value(i).split(':').next().unwrap().to_string();
            *by_reason.entry(kind).or_insert(0usize) += 1;
        }
    }
    eprintln!("dead letters by reason: {by_reason:?}");
    // 5 normal services and the first 95 tenants are admitted.
    let expected: std::collections::BTreeMap<String, usize> = [
        ("cardinality".to_string(), 1_905),
        ("name".to_string(), 120),
    ]
    .into();
    assert_eq!(by_reason, expected);
    assert_eq!(s.events as usize, 5_000 + 95);
    let services: BTreeSet<String> = s.final_rows.iter().map(|r| r.service.clone()).collect();
    assert_eq!(
        services.len(),
        100,
        "only admitted services have minute rows"
    );
    assert!(services.contains("tenant-94") && !services.contains("tenant-95"));
}

/// A Parquet file's key-value metadata.
fn file_metadata(path: &str) -> std::collections::HashMap<String, String> {
    let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
        std::fs::File::open(path).unwrap(),
    )
    .unwrap();
    r.metadata()
        .file_metadata()
        .key_value_metadata()
        .into_iter()
        .flatten()
        .map(|kv| (kv.key.clone(), kv.value.clone().unwrap_or_default()))
        .collect()
}

/// Rewrites the Parquet file at `path` in place with `f` applied to each
/// batch and `pulse.schema_version` = `version`, as another schema version
/// of pulse would have written it; returns the rows it holds.
fn rewrite_as_version(
    path: &std::path::Path,
    version: &str,
    f: impl Fn(
        &datafusion::arrow::record_batch::RecordBatch,
    ) -> datafusion::arrow::record_batch::RecordBatch,
) -> usize {
    use parquet::arrow::ArrowWriter;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    use parquet::file::metadata::KeyValue;
    let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let batches: Vec<_> = reader.map(|b| f(&b.unwrap())).collect();
    let tmp = path.with_extension("rewrite");
    let mut w = ArrowWriter::try_new(
        std::fs::File::create(&tmp).unwrap(),
        batches[0].schema(),
        None,
    )
    .unwrap();
    for b in &batches {
        w.write(b).unwrap();
    }
    w.append_key_value_metadata(KeyValue::new(
        "pulse.schema_version".to_string(),
        version.to_string(),
    ));
    w.close().unwrap();
    // Out of the table while written: readers skip names starting with '.'.
    let hidden = path.with_file_name(".rewrite.tmp");
    std::fs::rename(&tmp, &hidden).unwrap();
    std::fs::rename(&hidden, path).unwrap();
    batches.iter().map(|b| b.num_rows()).sum()
}

/// The tables' schema evolution: every file says its schema version, and
/// a nullable column added to the contract reads under old and new files.
/// One `events` file is rewritten as an older version wrote it (without
/// `session_id`), another as a newer one would (with a further `region`
/// column): `pulse query` reads every row, the older file's `session_id`
/// as NULL, and pyarrow reads them all under the unified schema.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nullable_column_added_to_the_contract_reads_under_old_and_new_files() {
    use datafusion::arrow::array::{ArrayRef, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let lines = input_lines(20_000, 5);
    let exp = expected(&lines);
    let input = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&input).unwrap();
    for l in &lines {
        f.write_all(l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    drop(f);
    let mut cfg = config(&data);
    cfg.parquet.max_file_rows = 3000;
    // Plain Hive files, as directory readers (pyarrow, DuckDB, Polars, Spark) read them.
    cfg.parquet.format = pulse::config::TableFormat::Hive;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Files(vec![input]),
        Store::Memory(MemoryStore::default()),
        rx,
    )
    .await
    .unwrap();

    let mut files: Vec<String> = walk(&data.join("events"))
        .into_iter()
        .filter(|p| p.ends_with(".parquet"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    // Every file carries the schema version it was written with.
    let version = pulse::model::TABLE_SCHEMA_VERSION.to_string();
    for p in &files {
        let kv = file_metadata(p);
        assert_eq!(
            kv.get("pulse.schema_version"),
            Some(&version),
            "{p}: {kv:?}"
        );
    }
    let count = |b: &[RecordBatch], col: usize| -> i64 {
        b[0].column(col)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>()
            .value(0)
    };
    let before = sql(&data, "SELECT count(*), count(session_id) FROM events").await;
    let with_session = count(&before, 1);
    assert_eq!(count(&before, 0) as usize, exp.valid.len());

    // An older version's file: no session_id column.
    let old_sessions = {
        let r = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            std::fs::File::open(&files[0]).unwrap(),
        )
        .unwrap()
        .build()
        .unwrap();
        r.map(|b| {
            let b = b.unwrap();
            let c = b.column(b.schema().index_of("session_id").unwrap()).clone();
            (c.len() - c.null_count()) as i64
        })
        .sum::<i64>()
    };
    let old_rows = rewrite_as_version(std::path::Path::new(&files[0]), "0", |b| {
        let keep: Vec<usize> = (0..b.num_columns())
            .filter(|&i| b.schema().field(i).name() != "session_id")
            .collect();
        b.project(&keep).unwrap()
    });
    assert!(old_rows > 0 && old_sessions > 0);
    // A newer version's file: a further nullable column.
    let new_rows = rewrite_as_version(std::path::Path::new(&files[1]), "2", |b| {
        let mut fields: Vec<Field> = b
            .schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        fields.push(Field::new("region", DataType::Utf8, true));
        let mut cols: Vec<ArrayRef> = b.columns().to_vec();
        cols.push(Arc::new(StringArray::from(vec![
            Some("eu-west");
            b.num_rows()
        ])));
        RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap()
    });

    // pulse query: every row, the old file's session_id as NULL.
    let after = sql(
        &data,
        "SELECT count(*), count(session_id), count(DISTINCT event_id) FROM events",
    )
    .await;
    assert_eq!(
        count(&after, 0) as usize,
        exp.valid.len(),
        "every row reads"
    );
    assert_eq!(count(&after, 2) as usize, exp.valid.len());
    assert_eq!(count(&after, 1), with_session - old_sessions);
    // pyarrow, under the unified schema of the files (as the README says).
    let script = r#"
import sys, glob, pyarrow as pa, pyarrow.dataset as ds, pyarrow.parquet as pq, pyarrow.compute as pc
root = sys.argv[1] + "/events"
files = sorted(glob.glob(root + "/**/*.parquet", recursive=True))
schema = pa.unify_schemas([pq.read_schema(f) for f in files])
t = ds.dataset(root, format="parquet", partitioning="hive", schema=schema).to_table()
print(t.num_rows, t.column("session_id").null_count, pc.count(t.column("region")).as_py())
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<usize> = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(v[0], exp.valid.len(), "pyarrow reads every row");
    assert_eq!(v[2], new_rows, "the newer column where it was written");
    assert!(
        v[1] >= old_rows,
        "the older file's session_id is null: {v:?}"
    );
}
