//! `pulse serve` against real Redis filled by a real pipeline run (two
//! simulated hours with planted incidents): the JSON API, bad parameters,
//! /metrics, health, and the dashboard rendered by headless Chromium.

mod common;

use std::time::Duration;

use pulse::app::{self, SourceSpec};
use pulse::config::{Config, Secrets};
use pulse::serve::{ServeState, bind_shards, metrics_handle, serve_sharded};
use pulse::sink::store::{RedisStore, Store};
use pulse::source::generator::{GenParams, Generator};
use serde_json::Value;

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    common::http_get(addr, path).await
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

/// The stale banner of a dumped page: its opening tag and its text.
fn stale_banner(dom: &str) -> (String, String) {
    let at = dom
        .find("id=\"stale\"")
        .expect("the page has a stale banner");
    let start = dom[..at].rfind('<').unwrap();
    let rest = &dom[start..];
    let end = rest.find('>').unwrap();
    let text = rest[end + 1..].split("</div>").next().unwrap();
    (rest[..=end].to_string(), text.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_metrics_health_and_dashboard_in_a_browser() {
    let redis_url = common::service("PULSE_TEST_REDIS");
    let prefix = common::unique("srv");
    let dir = tempfile::tempdir().unwrap();
    let _ = metrics_handle();
    let mut cfg = Config::load_with_env(None, &[]).unwrap();
    cfg.parquet.data_dir = dir.path().join("data");
    cfg.redis.url = redis_url.clone();
    cfg.redis.prefix = prefix.clone();
    // Three hours: the second one closes and is compared with the first (drift).
    let p = GenParams {
        events: 100_000,
        seed: 2,
        rate_per_sec: 100_000.0 / 10_800.0,
        ..GenParams::default()
    };
    let incidents = Generator::new(p.clone()).incidents;
    let store = Store::Redis(
        RedisStore::connect(&redis_url, None, &prefix, 3600)
            .await
            .unwrap(),
    );
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
    assert!(s.anomalies > 0);

    let client = redis::Client::open(redis_url.as_str()).unwrap();
    let state = ServeState::new(
        Some(
            redis::aio::ConnectionManager::new(client.clone())
                .await
                .unwrap(),
        ),
        &prefix,
        None,
    );
    // thread-per-core serving, as `pulse serve` does: two listeners on one port
    let listeners = bind_shards("127.0.0.1:0".parse().unwrap(), 2).unwrap();
    assert_eq!(listeners.len(), 2);
    let addr = listeners[0].local_addr().unwrap();
    assert_ne!(addr.port(), 0);
    assert_eq!(listeners[1].local_addr().unwrap(), addr);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(serve_sharded(listeners, state, Some(client), stop_rx));

    // many connections at once, spread by the kernel over both shards, all answered
    let answers = futures::future::join_all((0..64).map(|_| get(addr, "/healthz"))).await;
    assert!(answers.iter().all(|(code, _)| *code == 200), "{answers:?}");

    // the API
    let (code, body) = get(addr, "/api/services").await;
    assert_eq!(code, 200);
    let v = json(&body);
    let services: Vec<&str> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap())
        .collect();
    assert_eq!(services, ["cart", "catalog", "checkout", "reco", "search"]);
    let (code, body) = get(addr, "/api/stats?service=checkout&minutes=180").await;
    assert_eq!(code, 200, "{body}");
    let pts = json(&body)["points"].as_array().unwrap().clone();
    assert!(pts.len() >= 110, "two hours of minutes, got {}", pts.len());
    let total: f64 = pts.iter().map(|p| p["requests"].as_f64().unwrap()).sum();
    let want: i64 = s
        .final_rows
        .iter()
        .filter(|r| r.service == "checkout")
        .map(|r| r.requests)
        .sum();
    assert_eq!(total as i64, want, "the API serves the pipeline's numbers");
    let (_, body) = get(addr, "/api/anomalies?limit=500").await;
    let anomalies = json(&body)["anomalies"].as_array().unwrap().clone();
    for inc in &incidents {
        assert!(
            anomalies.iter().any(|a| a["service"] == inc.service
                && a["window_start_ms"].as_i64().unwrap() >= inc.start_ms
                && a["window_start_ms"].as_i64().unwrap() < inc.end_ms),
            "{} missing from /api/anomalies",
            inc.service
        );
    }
    let (_, body) = get(addr, "/api/alerts").await;
    assert!(
        json(&body)["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a["kind"] == "start")
    );
    let (code, body) = get(addr, "/api/top?k=5").await;
    assert_eq!(code, 200);
    assert_eq!(json(&body)["items"].as_array().unwrap().len(), 5);
    let (code, body) = get(addr, "/api/status").await;
    assert_eq!(code, 200);
    assert!(json(&body)["services"]["checkout"]["status"].is_string());
    // Drift: every service's second hour against its first, none drifted.
    let (code, body) = get(addr, "/api/drift").await;
    assert_eq!(code, 200, "{body}");
    let drift = json(&body)["drift"].as_array().unwrap().clone();
    assert_eq!(drift.len(), 5, "{body}");
    for d in &drift {
        for f in ["latency", "event_type", "status_class"] {
            let x = &d["features"][f];
            assert!(x["psi"].as_f64().is_some_and(|v| v < 0.2), "{d}");
            assert_eq!(x["drifted"], false, "{d}");
        }
    }

    // bad parameters: 400 with a JSON error
    for path in [
        "/api/stats",
        "/api/stats?service=../etc",
        "/api/stats?service=checkout&minutes=abc",
        "/api/stats?service=checkout&minutes=999999",
        "/api/stats?service=checkout&nope=1",
        "/api/anomalies?limit=0",
        "/api/top?k=1000",
    ] {
        let (code, body) = get(addr, path).await;
        assert_eq!(code, 400, "{path}: {body}");
        assert!(json(&body)["error"].is_string(), "{path}: {body}");
    }

    // metrics and health
    assert_eq!(get(addr, "/recommend/1?k=5").await.0, 200);
    let (code, body) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    for m in [
        "pulse_events_total",
        "pulse_batch_seconds_bucket",
        "pulse_redis_write_seconds_bucket",
        "pulse_files_written_total",
        "pulse_bytes_written_total",
        "pulse_parquet_commit_seconds_bucket",
        "pulse_late_events_total{class=\"late\"}",
        "pulse_watermark_lag_seconds",
        "pulse_dead_letters_total{reason=",
        "pulse_rows_written_total{table=\"events\",partition=\"0\"}",
        // the server's own: requests by route and status, their latency
        "pulse_http_requests_total{route=\"/api/stats\",status=\"200\"}",
        "pulse_http_requests_total{route=\"/api/stats\",status=\"400\"}",
        "pulse_http_requests_total{route=\"/recommend/{user_id}\",status=\"200\"}",
        "pulse_http_request_duration_seconds_bucket{route=\"/api/services\"",
    ] {
        assert!(body.contains(m), "/metrics lacks {m}");
    }
    assert_eq!(get(addr, "/healthz").await.0, 200);
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(json(&body)["checks"]["redis"], "ok");

    // Names that ingest now refuses, as an older writer could have stored
    // them: the page draws the good services, shows these as text, runs none.
    let hostile = [
        "<img src=x onerror=\"document.title='pwned'\">",
        "\"><script>document.body.dataset.pwned=1</script>",
    ];
    let mut conn = redis::Client::open(redis_url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::AsyncCommands::sadd(&mut conn, format!("{prefix}:services"), &hostile[..])
        .await
        .unwrap();

    // the dashboard in a real browser
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is installed by scripts/test.sh");
    // Saved for people to look at: target/tmp/dashboard.png (README: docs/dashboard.png).
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{addr}/");
    let browser_at = |url: &str, extra: Vec<String>| {
        let mut cmd = std::process::Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            "--virtual-time-budget=10000",
            "--window-size=1400,1100",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(url);
        cmd
    };
    let browser = |extra: Vec<String>| browser_at(&url, extra);
    let dump = |url: String| {
        let mut cmd = browser_at(&url, vec!["--dump-dom".into()]);
        async move {
            let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
                .await
                .unwrap();
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    let dom = dump(url.clone()).await;
    assert!(
        dom.contains("data-loaded"),
        "the page finished loading its data"
    );
    let points: usize = dom
        .match_indices("data-points=\"")
        .map(|(i, m)| {
            dom[i + m.len()..]
                .split('"')
                .next()
                .unwrap()
                .parse::<usize>()
                .unwrap()
        })
        .sum();
    assert!(points >= 5 * 3 * 100, "charts have data points: {points}");
    // The drift panel lists every service's last compared hour.
    let table = dom
        .split("id=\"drift\"")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("the drift panel");
    assert_eq!(table.matches("<tr>").count(), 1 + 5, "{table}");
    assert!(
        table.contains("<td>reco</td>") && !table.contains("⚠"),
        "{table}"
    );
    assert!(
        !dom.contains("pwned=\"1\"") && !dom.contains("<title>pwned"),
        "a service name ran as script"
    );
    assert!(
        dom.contains("&lt;img src=x onerror="),
        "the hostile name is shown as text"
    );
    for inc in &incidents {
        assert!(
            dom.contains(&format!(
                "class=\"anomaly\" data-service=\"{}\"",
                inc.service
            )),
            "anomaly marker for {} on the charts",
            inc.service
        );
    }
    // Charts carry a labelled time axis; fresh data shows no stale banner.
    let ticks: Vec<usize> = dom
        .match_indices("data-ticks=\"")
        .map(|(i, m)| {
            dom[i + m.len()..]
                .split('"')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(ticks.len() >= 5 * 3, "every chart has an axis: {ticks:?}");
    assert!(
        ticks.iter().all(|&t| t >= 2),
        "time labels per chart: {ticks:?}"
    );
    assert!(
        dom.contains("data-stale=\"0\""),
        "fresh data is not marked stale"
    );

    // A pipeline whose watermark stopped moving ten minutes ago: stale, said so.
    let ago = chrono::Utc::now().timestamp_millis() - 600_000;
    let _: () = redis::AsyncCommands::set(&mut conn, format!("{prefix}:watermark_at"), ago)
        .await
        .unwrap();
    let stalled = dump(url.clone()).await;
    let (tag, text) = stale_banner(&stalled);
    assert!(
        tag.contains("data-stale=\"1\"") && tag.contains("data-reason=\"watermark-stalled\""),
        "a stalled watermark is shown as stale: {tag} {text}"
    );
    assert!(stalled.contains("data-loaded"), "its data is still shown");
    let _: () = redis::AsyncCommands::set(
        &mut conn,
        format!("{prefix}:watermark_at"),
        chrono::Utc::now().timestamp_millis(),
    )
    .await
    .unwrap();

    // Redis unreachable behind the API: the page says so instead of showing nothing.
    let dead = pulse::sink::redis_sink::lazy_connection(
        "redis://127.0.0.1:1/",
        None,
        Duration::from_millis(500),
    )
    .unwrap();
    let down = ServeState::new(Some(dead), &prefix, None);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let down_addr = l.local_addr().unwrap();
    let down_server = tokio::spawn(pulse::serve::serve(l, down, std::future::pending()));
    let unreachable = dump(format!("http://{down_addr}/")).await;
    down_server.abort();
    let (tag, text) = stale_banner(&unreachable);
    assert!(
        tag.contains("data-stale=\"1\"") && tag.contains("data-reason=\"refresh-failed\""),
        "an unreachable Redis is shown as stale: {tag} {text}"
    );
    assert!(text.contains("redis"), "with the reason: {text}");

    let out = tokio::task::spawn_blocking({
        let mut cmd = browser(vec![format!("--screenshot={}", shot.display())]);
        move || cmd.output().unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::metadata(&shot).unwrap().len() > 10_000,
        "screenshot saved"
    );

    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
