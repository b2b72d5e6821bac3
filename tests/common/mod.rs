//! Shared helpers of the integration tests: real services from the
//! environment (started by scripts/test.sh), generated input, and an
//! independent recomputation of what the pipeline should have produced.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{
    Float64Type, Int32Type, Int64Type, TimestampMillisecondType, UInt64Type,
};
use pulse::source::generator::{GenParams, Generator};

/// Address of a service the test script started; a missing one is a setup error.
pub fn service(var: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the suite with scripts/test.sh, which starts redis-server and tansu")
    })
}

/// A loopback port free right now (for a server the test starts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// Generated lines plus hand-made invalid records of every kind.
pub fn input_lines(events: u64, seed: u64) -> Vec<Vec<u8>> {
    input_lines_at(events, seed, 100.0)
}

/// [`input_lines`] at `rate_per_sec` events per second of event time.
pub fn input_lines_at(events: u64, seed: u64, rate_per_sec: f64) -> Vec<Vec<u8>> {
    let mut out = generated_lines(&mut Generator::new(GenParams {
        events,
        seed,
        rate_per_sec,
        invalid_fraction: 0.002,
        late_fraction: 0.003,
        ..GenParams::default()
    }));
    out.push(b"\xff\xfe not utf8".to_vec());
    out.push(br#"{"event_id": 99999999, "ts": "2026-11-22T00:10:00Z"}"#.to_vec());
    out.push(br#"[1,2,3]"#.to_vec());
    out
}

/// Every line the generator has left.
pub fn generated_lines(g: &mut Generator) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let mut l = Vec::new();
        if g.next_into(&mut l).is_none() {
            return out;
        }
        out.push(l);
    }
}

/// What a valid event is, decided independently of the pipeline's decoder.
#[derive(Debug, Clone)]
pub struct Expected {
    pub valid: BTreeMap<u64, (i64, String, u16, f64)>,
    pub invalid: usize,
}

pub fn expected(lines: &[Vec<u8>]) -> Expected {
    let mut valid = BTreeMap::new();
    let mut invalid = 0;
    for l in lines {
        match check(l) {
            Some((id, rest)) => {
                assert!(
                    valid.insert(id, rest).is_none(),
                    "generator repeated id {id}"
                );
            }
            None => invalid += 1,
        }
    }
    Expected { valid, invalid }
}

fn check(l: &[u8]) -> Option<(u64, (i64, String, u16, f64))> {
    let v: serde_json::Value = serde_json::from_slice(l).ok()?;
    let o = v.as_object()?;
    let id = o.get("event_id")?.as_u64()?;
    let ts = o.get("ts")?;
    let ts = match ts {
        serde_json::Value::Number(n) => n.as_i64()?,
        serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
            .ok()?
            .timestamp_millis(),
        _ => return None,
    };
    o.get("user_id")?.as_u64()?;
    o.get("item_id")?.as_u64()?;
    let et = o.get("event_type")?.as_str()?;
    if !["view", "cart", "purchase", "rating"].contains(&et) {
        return None;
    }
    let svc = o.get("service")?.as_str()?.to_string();
    let name_ok = |s: &str| {
        (1..=64).contains(&s.len())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    };
    if !name_ok(&svc) {
        return None;
    }
    let status = o.get("status")?.as_u64()?;
    if !(100..=599).contains(&status) {
        return None;
    }
    let lat = o.get("latency_ms")?.as_f64()?;
    if lat < 0.0 {
        return None;
    }
    let rating = o.get("rating").and_then(|r| r.as_f64());
    match (et == "rating", rating) {
        (true, Some(r)) if (1.0..=5.0).contains(&r) => {}
        (false, None) => {}
        _ => return None,
    }
    Some((id, (ts, svc, status as u16, lat)))
}

pub async fn sql(dir: &Path, q: &str) -> Vec<datafusion::arrow::record_batch::RecordBatch> {
    pulse::query::run_sql(dir, q).await.unwrap()
}

/// event_ids in `events` (with duplicates, if any).
pub async fn event_ids(dir: &Path) -> Vec<u64> {
    let mut ids = Vec::new();
    for b in sql(dir, "SELECT event_id FROM events").await {
        ids.extend(
            b.column(0)
                .as_primitive::<UInt64Type>()
                .values()
                .iter()
                .copied(),
        );
    }
    ids.sort_unstable();
    ids
}

/// (window_start, service, partition) -> (requests, errors, client_errors, p95):
/// per source partition from `minute_stats`, or merged (partition -1).
pub type StatRows = BTreeMap<(i64, String, i32), (i64, i64, i64, f64)>;

/// The `minute_stats` table; a (window, service, partition) twice is a failure.
pub async fn minute_stats(dir: &Path) -> StatRows {
    let mut m = StatRows::new();
    let q = "SELECT window_start, service, requests, errors, client_errors, latency_p95_ms, src_partition FROM minute_stats";
    for b in sql(dir, q).await {
        let ws = b.column(0).as_primitive::<TimestampMillisecondType>();
        let svc = b.column(1).as_string::<i32>();
        let r = b.column(2).as_primitive::<Int64Type>();
        let e = b.column(3).as_primitive::<Int64Type>();
        let c = b.column(4).as_primitive::<Int64Type>();
        let p = b.column(5).as_primitive::<Float64Type>();
        let part = b.column(6).as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            let k = (ws.value(i), svc.value(i).to_string(), part.value(i));
            let prev = m.insert(k.clone(), (r.value(i), e.value(i), c.value(i), p.value(i)));
            assert!(prev.is_none(), "minute_stats holds {k:?} twice");
        }
    }
    m
}

/// requests, errors, client errors, latencies of one (window, service).
type Acc = (i64, i64, i64, Vec<f64>);

/// Recomputes minute_stats from the events the pipeline stored (all but
/// too-late ones), with exact percentiles: per source partition
/// (`by_partition`), all in partition 0 (a file run), or merged (`None`: -1).
pub async fn recompute(dir: &Path, by_partition: Option<bool>) -> StatRows {
    let q = "SELECT ts, service, status, latency_ms, src_partition FROM events WHERE lateness <> 'too_late'";
    let mut groups: BTreeMap<(i64, String, i32), Acc> = BTreeMap::new();
    for b in sql(dir, q).await {
        let ts = b.column(0).as_primitive::<TimestampMillisecondType>();
        let svc = b.column(1).as_string::<i32>();
        let st = b
            .column(2)
            .as_primitive::<datafusion::arrow::datatypes::UInt16Type>();
        let lat = b.column(3).as_primitive::<Float64Type>();
        let part = b.column(4).as_primitive::<Int32Type>();
        for i in 0..b.num_rows() {
            let ws = ts.value(i).div_euclid(60_000) * 60_000;
            let p = match by_partition {
                Some(true) => part.value(i),
                Some(false) => 0,
                None => -1,
            };
            let g = groups.entry((ws, svc.value(i).to_string(), p)).or_default();
            g.0 += 1;
            let s = st.value(i);
            g.1 += i64::from(s >= 500);
            g.2 += i64::from((400..500).contains(&s));
            if !lat.is_null(i) {
                g.3.push(lat.value(i));
            }
        }
    }
    groups
        .into_iter()
        .map(|(k, (r, e, c, mut l))| {
            l.sort_by(f64::total_cmp);
            let rank = ((0.95 * l.len() as f64).ceil() as usize).clamp(1, l.len()) - 1;
            (k, (r, e, c, l[rank]))
        })
        .collect()
}

fn assert_row(k: &(i64, String, i32), g: &(i64, i64, i64, f64), w: &(i64, i64, i64, f64)) {
    assert_eq!((g.0, g.1, g.2), (w.0, w.1, w.2), "counts of {k:?}");
    let tol = w.3 * 0.05 + 1.0;
    assert!(
        (g.3 - w.3).abs() <= tol,
        "p95 of {k:?}: {} vs exact {}",
        g.3,
        w.3
    );
}

/// Asserts counts are equal and p95 agrees within HDR precision (+ one rank).
pub fn assert_stats_match(got: &StatRows, want: &StatRows) {
    assert_eq!(got.len(), want.len(), "number of (window, service) rows");
    for (k, w) in want {
        let g = got
            .get(k)
            .unwrap_or_else(|| panic!("minute_stats lacks {k:?}"));
        assert_row(k, g, w);
    }
}

/// Per partition: the hour before which every window is final and written
/// (the partition's watermark minus allowed lateness, down to the hour).
pub async fn closed_hours(dir: &Path, cfg: &pulse::config::Config) -> BTreeMap<i32, i64> {
    let q = "SELECT src_partition, max(ts) FROM events GROUP BY src_partition";
    let mut out = BTreeMap::new();
    for b in sql(dir, q).await {
        let p = b.column(0).as_primitive::<Int32Type>();
        let t = b.column(1).as_primitive::<TimestampMillisecondType>();
        for i in 0..b.num_rows() {
            let wm = t.value(i) - cfg.window.out_of_orderness_ms as i64;
            let closed = wm - cfg.window.allowed_lateness_ms as i64;
            out.insert(p.value(i), closed.div_euclid(3_600_000) * 3_600_000);
        }
    }
    out
}

/// Kafka runs stop without finalising open windows: `got` (per partition)
/// must equal `want` on every row it has, and have every row of closed hours.
pub fn assert_closed_stats_match(got: &StatRows, want: &StatRows, closed: &BTreeMap<i32, i64>) {
    for (k, g) in got {
        let w = want
            .get(k)
            .unwrap_or_else(|| panic!("minute_stats has {k:?}, the events do not"));
        assert_row(k, g, w);
    }
    let mut complete = 0;
    for k in want.keys() {
        if k.0 < closed.get(&k.2).copied().unwrap_or(i64::MIN) {
            assert!(
                got.contains_key(k),
                "minute_stats lacks {k:?} of a closed hour"
            );
            complete += 1;
        }
    }
    assert!(complete > 0, "no hour was closed: the input is too short");
}

/// Merged per-minute stats as Redis holds them (the dashboard's view).
pub async fn redis_stats(url: &str, prefix: &str) -> StatRows {
    use redis::AsyncCommands;
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let services: BTreeSet<String> = con.smembers(format!("{prefix}:services")).await.unwrap();
    let mut out = StatRows::new();
    for svc in services {
        let minutes: Vec<i64> = con
            .zrange(format!("{prefix}:minutes:{svc}"), 0, -1)
            .await
            .unwrap();
        for m in minutes {
            let h: std::collections::HashMap<String, String> = con
                .hgetall(format!("{prefix}:stats:{svc}:{m}"))
                .await
                .unwrap();
            let n = |f: &str| h[f].parse::<i64>().unwrap();
            out.insert(
                (m * 1000, svc.clone(), -1),
                (
                    n("requests"),
                    n("errors"),
                    n("client_errors"),
                    h["latency_p95_ms"].parse().unwrap(),
                ),
            );
        }
    }
    out
}

/// Row counts read by pyarrow, an independent Parquet reader.
pub fn pyarrow_counts(dir: &Path) -> (u64, u64, u64) {
    let script = r#"
import os, sys, pyarrow.dataset as ds
root = sys.argv[1]
def table(name):
    path = root + "/" + name
    if root.startswith("s3://"):
        from deltalake import DeltaTable
        opts = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
        return DeltaTable(path, storage_options=opts).to_pyarrow_dataset()
    if os.path.isdir(path + "/_delta_log"):
        # A Delta table: what the deltalake package reads from its log.
        from deltalake import DeltaTable
        return DeltaTable(path).to_pyarrow_dataset()
    return ds.dataset(path, format="parquet", partitioning="hive")
ev = table("events")
ms = table("minute_stats")
dl = table("dead_letters")
req = ms.to_table(columns=["requests"]).column("requests").to_pylist()
print(ev.count_rows(), sum(req), dl.count_rows())
"#;
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(dir)
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "pyarrow failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = String::from_utf8(out.stdout).unwrap();
    let v: Vec<u64> = s.split_whitespace().map(|x| x.parse().unwrap()).collect();
    (v[0], v[1], v[2])
}

/// Creates `bucket` on the test S3 server (`AWS_ENDPOINT_URL`, set by
/// `scripts/services.sh` with the server's credentials).
pub fn create_bucket(bucket: &str) {
    create_bucket_at(None, bucket)
}

/// [`create_bucket`] on the S3 server at `endpoint` (else `AWS_ENDPOINT_URL`'s).
pub fn create_bucket_at(endpoint: Option<&str>, bucket: &str) {
    let script = r#"
import sys, boto3
boto3.client("s3").create_bucket(Bucket=sys.argv[1])
"#;
    let mut cmd = std::process::Command::new("python3");
    cmd.arg("-c").arg(script).arg(bucket);
    if let Some(e) = endpoint {
        cmd.env("AWS_ENDPOINT_URL", e);
    }
    let out = cmd.output().expect("python3 runs");
    assert!(
        out.status.success(),
        "creating bucket {bucket} (is AWS_ENDPOINT_URL set by scripts/services.sh?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn ids_set(e: &Expected) -> BTreeSet<u64> {
    e.valid.keys().copied().collect()
}

/// Creates `topic` and produces `(key, payload)` records to it, all delivered.
pub async fn produce(cfg: &pulse::config::Config, partitions: i32, records: Vec<(u64, Vec<u8>)>) {
    let secrets = pulse::config::Secrets::default();
    pulse::source::kafka::create_topic(&cfg.kafka, &secrets, &cfg.kafka.topic, partitions)
        .await
        .unwrap();
    let kc = cfg.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let p = pulse::source::kafka::EventProducer::new(&kc, &secrets, &kc.topic).unwrap();
        for (k, l) in &records {
            p.send(&k.to_le_bytes(), l).unwrap();
        }
        p.finish().unwrap();
    })
    .await
    .unwrap();
}

/// Runs the pipeline on the Kafka source with the Redis store of `cfg`.
pub async fn run_kafka(cfg: &pulse::config::Config) -> pulse::app::Summary {
    let store = pulse::sink::store::Store::Redis(
        pulse::sink::store::RedisStore::connect(&cfg.redis.url, None, &cfg.redis.prefix, 3600)
            .await
            .unwrap(),
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    pulse::app::run(
        cfg,
        &pulse::config::Secrets::default(),
        pulse::app::SourceSpec::Kafka,
        store,
        rx,
    )
    .await
    .unwrap()
}

/// GET over a real TCP connection: (status, body), de-chunked.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).to_string();
    let code = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return (code, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    (code, out)
}
