//! Anomaly and drift detection end to end: simulated hours from the generator
//! with its planted incidents or drift, through the whole pipeline (the drift
//! run also writes to a real redis-server).

mod common;

use pulse::app::{self, SourceSpec};
use pulse::config::{Config, Secrets};
use pulse::sink::store::{MemoryStore, Store};
use pulse::source::generator::{GenParams, Generator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_incidents_are_flagged_quickly_and_quiet_services_stay_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.path().to_path_buf();
    let hours = 2.0;
    let p = GenParams {
        events: 120_000,
        seed: 3,
        rate_per_sec: 120_000.0 / (hours * 3600.0),
        ..GenParams::default()
    };
    let incidents = Generator::new(p.clone()).incidents;
    assert_eq!(incidents.len(), 2);
    // The alert webhook is down until the run is well under way, then
    // answers 503 once before taking alerts: every alert still arrives,
    // in order.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    cfg.detect.webhook_url = format!("http://127.0.0.1:{port}/alerts");
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let hook = tokio::spawn(webhook(port, received.clone()));
    let mem = MemoryStore::default();
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Generator(p),
        Store::Memory(mem.clone()),
        rx,
    )
    .await
    .unwrap();
    hook.abort();
    let got: Vec<(String, String, i64)> = received
        .lock()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["kind"].as_str().unwrap().to_string(),
                v["service"].as_str().unwrap().to_string(),
                v["window_start_ms"].as_i64().unwrap(),
            )
        })
        .collect();
    let want: Vec<(String, String, i64)> = s
        .alerts
        .iter()
        .map(|a| (a.kind.to_string(), a.service.clone(), a.window_start_ms))
        .collect();
    assert_eq!(got, want, "every alert reached the webhook once, in order");
    let starts: Vec<_> = s.alerts.iter().filter(|a| a.kind == "start").collect();
    for inc in &incidents {
        let hit = starts.iter().find(|a| {
            a.service == inc.service
                && a.window_start_ms >= inc.start_ms
                && a.window_start_ms <= inc.start_ms + 120_000
        });
        assert!(
            hit.is_some(),
            "{} on {} not flagged within 2 minutes: {starts:?}",
            inc.kind,
            inc.service
        );
    }
    // false alarms: starts that are not at a planted incident
    for svc in pulse::source::generator::SERVICES {
        let false_alarms = starts
            .iter()
            .filter(|a| a.service == svc)
            .filter(|a| {
                !incidents.iter().any(|i| {
                    i.service == svc
                        && a.window_start_ms >= i.start_ms - 60_000
                        && a.window_start_ms < i.end_ms + 60_000
                })
            })
            .count();
        assert!(
            false_alarms <= 1,
            "{svc}: {false_alarms} false alarms in {hours} hours: {starts:?}"
        );
    }
    // anomalies are in Parquet and in the store
    let rows = common::sql(dir.path(), "SELECT service, metric FROM anomalies").await;
    let n: usize = rows.iter().map(|b| b.num_rows()).sum();
    assert_eq!(n as u64, s.anomalies);
    assert!(n >= 2);
    assert_eq!(mem.snapshot().anomalies.len() as u64, s.anomalies);
}

/// Eight simulated hours from the generator, with a gradual drift planted on
/// `reco` from the fourth (or none), through the pipeline.
async fn drift_run(
    dir: &std::path::Path,
    drift_at: Option<f64>,
    store: Store,
) -> (app::Summary, Option<pulse::source::generator::PlantedDrift>) {
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.to_path_buf();
    let hours = 8.0;
    let p = GenParams {
        events: 150_000,
        seed: 9,
        rate_per_sec: 150_000.0 / (hours * 3600.0),
        incidents: false,
        drift_at,
        ..GenParams::default()
    };
    let drift = Generator::new(p.clone()).drift;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Generator(p),
        store,
        rx,
    )
    .await
    .unwrap();
    (s, drift)
}

/// (hour_start_ms, service, feature, psi, ks, drifted) of the `drift` table.
async fn drift_rows(dir: &std::path::Path) -> Vec<(i64, String, String, f64, f64, bool)> {
    use datafusion::arrow::array::AsArray;
    use datafusion::arrow::datatypes::{Float64Type, Int64Type};
    let b = common::sql(
        dir,
        "SELECT CAST(hour_start AS BIGINT) AS h, service, feature, psi, ks, drifted FROM drift ORDER BY h, service, feature",
    )
    .await;
    let mut out = Vec::new();
    for b in &b {
        let h = b.column(0).as_primitive::<Int64Type>();
        let (svc, f) = (
            b.column(1).as_string::<i32>(),
            b.column(2).as_string::<i32>(),
        );
        let (psi, ks) = (
            b.column(3).as_primitive::<Float64Type>(),
            b.column(4).as_primitive::<Float64Type>(),
        );
        let d = b.column(5).as_boolean();
        for i in 0..b.num_rows() {
            out.push((
                h.value(i),
                svc.value(i).to_string(),
                f.value(i).to_string(),
                psi.value(i),
                ks.value(i),
                d.value(i),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_planted_gradual_drift_is_flagged_and_a_stable_stream_is_not() {
    const HOUR: i64 = 3_600_000;
    // The stable stream: every hour after the first is compared, none drifts.
    let stable = tempfile::tempdir().unwrap();
    let (s, none) = drift_run(stable.path(), None, Store::Memory(MemoryStore::default())).await;
    assert!(none.is_none());
    let rows = drift_rows(stable.path()).await;
    // Hours 1..=6 are compared (hour 0 has no reference, hour 7 is still open
    // when the input ends): 5 services, 3 features.
    assert_eq!(rows.len(), 6 * 5 * 3, "{rows:?}");
    let false_alarms: Vec<_> = rows.iter().filter(|r| r.5).collect();
    assert!(
        false_alarms.is_empty(),
        "stable stream flagged: {false_alarms:?}"
    );
    assert!(s.alerts.iter().all(|a| a.kind != "drift"), "{:?}", s.alerts);
    let worst = rows.iter().map(|r| r.3).fold(0.0, f64::max);
    eprintln!(
        "drift: stable stream, {} comparisons, worst PSI {worst:.4}, 0 flagged",
        rows.len()
    );

    // The drifting stream, through Redis.
    let redis_url = common::service("PULSE_TEST_REDIS");
    let prefix = common::unique("drift");
    let store = Store::Redis(
        pulse::sink::store::RedisStore::connect(&redis_url, None, &prefix, 3600)
            .await
            .unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let (s, drift) = drift_run(dir.path(), Some(0.5), store).await;
    let drift = drift.expect("a planted drift");
    assert_eq!(drift.service, "reco");
    let rows = drift_rows(dir.path()).await;
    let flagged: Vec<_> = rows.iter().filter(|r| r.5).collect();
    assert!(
        flagged.iter().all(|r| r.1 == "reco"),
        "only the drifting service is flagged: {flagged:?}"
    );
    let first = flagged.first().expect("the drift is flagged");
    // An hour is judged when it closes: the delay runs from the drift's
    // start to the end of the first hour flagged.
    let delay = first.0 + HOUR - drift.start_ms;
    assert!(
        first.0 >= drift.start_ms.div_euclid(HOUR) * HOUR && delay <= 2 * HOUR,
        "first flagged hour {} for a drift from {}: {rows:?}",
        first.0,
        drift.start_ms
    );
    let features: std::collections::BTreeSet<&str> = flagged.iter().map(|r| r.2.as_str()).collect();
    assert!(features.contains("latency"), "{features:?}");
    let alerts: Vec<_> = s.alerts.iter().filter(|a| a.kind == "drift").collect();
    assert!(
        !alerts.is_empty() && alerts.iter().all(|a| a.service == "reco"),
        "{alerts:?}"
    );
    assert_eq!(
        alerts.len(),
        features.len(),
        "one alert per drifting feature, not per hour: {alerts:?}"
    );
    eprintln!(
        "drift: planted at {} min into hour {}, first flagged hour {} ({features:?}), delay {} min after the drift began; {} alerts; 0 other services flagged",
        (drift.start_ms % HOUR) / 60_000,
        (drift.start_ms - 1_795_305_600_000) / HOUR,
        (first.0 - 1_795_305_600_000) / HOUR,
        delay / 60_000,
        alerts.len()
    );
    // Redis holds the last compared hour of each service.
    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let h: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:drift:reco"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let last = rows.iter().map(|r| r.0).max().unwrap();
    assert_eq!(h.get("hour_start_ms"), Some(&last.to_string()), "{h:?}");
    assert_eq!(
        h.get("latency_drifted").map(String::as_str),
        Some("1"),
        "{h:?}"
    );
    let psi: f64 = h["latency_psi"].parse().unwrap();
    assert!(psi >= 0.2, "{h:?}");
    let calm: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg(format!("{prefix}:drift:catalog"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        calm.get("latency_drifted").map(String::as_str),
        Some("0"),
        "{calm:?}"
    );
}

/// A webhook that is down for its first 1.5 s, then answers 503 to its
/// first request and 200 (recording the body) to the rest.
async fn webhook(port: u16, received: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let l = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    let mut first = true;
    loop {
        let (mut s, _) = l.accept().await.unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Headers, then Content-Length bytes of body.
        let body = loop {
            let n = s.read(&mut chunk).await.unwrap();
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= len || n == 0 {
                    break body.to_string();
                }
            }
            assert!(n > 0, "request cut short");
        };
        let status = if first {
            "503 Service Unavailable"
        } else {
            "200 OK"
        };
        if !first {
            received
                .lock()
                .unwrap()
                .push(serde_json::from_str(&body).unwrap());
        }
        first = false;
        let _ = s
            .write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await;
    }
}

/// A file run's last minute holds only part of its traffic (the input ends,
/// not the minute): it is written to `minute_stats` but not scored, so the
/// apparent drop of every service opens no incident.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partial_minute_at_the_end_of_the_input_is_written_but_not_scored() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.path().to_path_buf();
    // 60 full minutes of 1,200 events, then 10% of a minute.
    let p = GenParams {
        events: 60 * 1_200 + 120,
        seed: 5,
        rate_per_sec: 20.0,
        incidents: false,
        ..GenParams::default()
    };
    let last_window = p.start_ms + 60 * 60_000;
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Generator(p),
        Store::Memory(MemoryStore::default()),
        rx,
    )
    .await
    .unwrap();
    let late_starts: Vec<_> = s
        .alerts
        .iter()
        .filter(|a| a.kind == "start" && a.window_start_ms >= last_window)
        .collect();
    assert!(
        late_starts.is_empty(),
        "incidents opened by the end of the input: {late_starts:?}"
    );
    // ... while the partial minute is still in minute_stats
    let last: Vec<_> = s
        .final_rows
        .iter()
        .filter(|r| r.window_start_ms == last_window)
        .collect();
    assert!(!last.is_empty(), "the last minute was not written");
    let requests: i64 = last.iter().map(|r| r.requests).sum();
    assert!(requests > 0 && requests < 1_200, "{requests} requests");
}
