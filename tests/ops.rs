//! The operators' kit (`docker-compose.yml`, `deploy/`): the Grafana dashboard
//! and the alert rules use only metric names pulse exports (scanned from the
//! `metrics::counter!/gauge!/histogram!` calls in src/); a real Prometheus
//! (Debian's `prometheus`, installed by scripts/test.sh) scrapes a real
//! `pulse run` (Kafka, real tansu) and `pulse serve`, loads the rules, and
//! answers every dashboard query; `promtool` passes the config and the rules'
//! unit tests.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// Names pulse exports: the first argument of every `metrics::counter!`,
/// `gauge!` and `histogram!` call in src/ (histograms as the exporter renders
/// them: `_bucket`, `_sum`, `_count`).
fn exported() -> BTreeSet<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&root().join("src"), &mut files);
    let mut names = BTreeSet::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (at, _) in text.match_indices("metrics::") {
            let rest = &text[at + "metrics::".len()..];
            let Some((kind, args)) = ["counter!(", "gauge!(", "histogram!("]
                .iter()
                .find_map(|k| rest.strip_prefix(k).map(|a| (*k, a)))
            else {
                continue;
            };
            let args = args.trim_start();
            let name = args
                .strip_prefix('"')
                .and_then(|a| a.split('"').next())
                .unwrap_or_else(|| panic!("{}: a {kind} call without a literal name", f.display()));
            if kind == "histogram!(" {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            } else {
                names.insert(name.to_string());
            }
        }
    }
    names
}

const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "inf",
    "nan",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

/// Metric names a PromQL expression selects: identifiers that are not
/// functions, aggregations, keywords, label names (in `{}` or in the label
/// lists of by/without/on/ignoring/group_*), strings or ranges.
fn metric_names(expr: &str) -> Vec<String> {
    let b = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_to = |i: usize, close: u8| -> usize {
        let mut j = i + 1;
        let mut quote = None;
        while j < b.len() {
            match (quote, b[j]) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), b'\\') => j += 1,
                (Some(_), _) => {}
                (None, b'"' | b'\'' | b'`') => quote = Some(b[j]),
                (None, c) if c == close => return j + 1,
                _ => {}
            }
            j += 1;
        }
        panic!("unbalanced expression: {expr}")
    };
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            let mut j = i + 1;
            while j < b.len() && b[j] != c {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            i = j + 1;
        } else if c == b'{' {
            i = skip_to(i, b'}');
        } else if c == b'[' {
            i = skip_to(i, b']');
        } else if c.is_ascii_digit() || c == b'.' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.') {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == b'_' || c == b':' {
            let start = i;
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let mut k = i;
            while k < b.len() && b[k].is_ascii_whitespace() {
                k += 1;
            }
            let next = &expr[k..];
            // a function or aggregation: `f(`, or `sum by (..) (` / `sum without (..) (`
            let call = next.starts_with('(')
                || ["by", "without"].iter().any(|kw| {
                    next.strip_prefix(kw)
                        .is_some_and(|r| r.trim_start().starts_with('('))
                });
            if KEYWORDS.contains(&word) {
                let list = !["and", "or", "unless", "bool"].contains(&word);
                if list && k < b.len() && b[k] == b'(' {
                    i = skip_to(k, b')'); // a label list
                }
            } else if !call {
                out.push(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The `expr:` values of a rules file (inline, or a `>`/`|` block).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    for (n, l) in lines.iter().enumerate() {
        let t = l.trim_start();
        let Some(v) = t.strip_prefix("expr:") else {
            continue;
        };
        let v = v.trim();
        if v.starts_with('>') || v.starts_with('|') {
            let indent = l.len() - t.len();
            let block: Vec<&str> = lines[n + 1..]
                .iter()
                .take_while(|x| x.trim().is_empty() || x.len() - x.trim_start().len() > indent)
                .map(|x| x.trim())
                .collect();
            out.push(block.join(" "));
        } else {
            out.push(v.trim_matches(|c| c == '\'' || c == '"').to_string());
        }
    }
    out
}

/// Every `expr` of the dashboard's panels (rows' nested panels included).
fn dashboard_exprs(v: &Value, out: &mut Vec<(String, String)>) {
    for p in v["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("?").to_string();
        for t in p["targets"].as_array().into_iter().flatten() {
            let e = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((title.clone(), e.to_string()));
        }
        dashboard_exprs(p, out);
    }
}

fn dashboard() -> Vec<(String, String)> {
    let v: Value = serde_json::from_str(&read("deploy/grafana/dashboards/pulse.json"))
        .expect("the dashboard is JSON");
    let mut out = Vec::new();
    dashboard_exprs(&v, &mut out);
    out
}

#[test]
fn dashboard_and_rules_use_only_metrics_pulse_exports() {
    let known = exported();
    for m in [
        "pulse_events_total",
        "pulse_consumer_lag_records",
        "pulse_http_requests_total",
        "pulse_batch_seconds_bucket",
    ] {
        assert!(known.contains(m), "the source scan misses {m}: {known:?}");
    }
    // the checker itself: a histogram quantile is one name; a made-up name is caught
    assert_eq!(
        metric_names(
            r#"histogram_quantile(0.95, sum by (route, le) (rate(pulse_http_request_duration_seconds_bucket{route!="x y"}[$__rate_interval]))) > 2.5"#
        ),
        ["pulse_http_request_duration_seconds_bucket"]
    );
    assert_eq!(
        metric_names("a > 1 and on (job) sum without (x) (b) / ignoring(y) group_left(z) c"),
        ["a", "b", "c"]
    );

    let unknown = |what: &str, expr: &str| -> Vec<String> {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{what}: selects no metric: {expr}");
        names
            .into_iter()
            .filter(|n| !known.contains(n))
            .map(|n| format!("{what}: {n} (in {expr})"))
            .collect()
    };
    let mut bad = Vec::new();

    let panels = dashboard();
    assert!(panels.len() >= 20, "dashboard has {} queries", panels.len());
    let mut used = BTreeSet::new();
    for (title, e) in &panels {
        bad.extend(unknown(&format!("dashboard panel {title:?}"), e));
        used.extend(metric_names(e));
    }
    for m in [
        "pulse_records_consumed_total",
        "pulse_consumer_lag_records",
        "pulse_watermark_lag_seconds",
        "pulse_late_events_total",
        "pulse_dead_letters_total",
        "pulse_batch_seconds_bucket",
        "pulse_redis_write_seconds_bucket",
        "pulse_parquet_commit_seconds_bucket",
        "pulse_redis_pending_writes",
        "pulse_redis_degraded",
        "pulse_http_requests_total",
        "pulse_http_request_duration_seconds_bucket",
    ] {
        assert!(used.contains(m), "the dashboard shows no {m}");
    }

    let rules = read("deploy/prometheus/rules.yml");
    let exprs = rule_exprs(&rules);
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(str::trim)
        .collect();
    assert!(alerts.len() >= 8, "rules: {alerts:?}");
    assert_eq!(exprs.len(), alerts.len(), "one expr per alert");
    for (a, e) in alerts.iter().zip(&exprs) {
        bad.extend(unknown(&format!("rule {a}"), e));
    }

    // the rules' unit tests: every alert is tested, on series pulse exports
    let tests = read("deploy/prometheus/rules_test.yml");
    for a in &alerts {
        assert!(
            tests.contains(&format!("alertname: {a}\n")),
            "rules_test.yml does not test {a}"
        );
    }
    for l in tests.lines() {
        if let Some(s) = l.trim().strip_prefix("- series:") {
            let name = s.trim().trim_matches('\'').split('{').next().unwrap();
            if !known.contains(name) {
                bad.push(format!("rules_test.yml series: {name}"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "metric names pulse does not export:\n{}",
        bad.join("\n")
    );
}

fn tool(name: &str) -> Command {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: scripts/test.sh installs it (Debian package `prometheus`: apt-get install -y prometheus)"
    );
    Command::new(name)
}

fn run_ok(mut cmd: Command) -> String {
    let out = cmd.current_dir(root()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

#[test]
fn promtool_checks_the_config_and_passes_the_rules_unit_tests() {
    let mut c = tool("promtool");
    c.args(["check", "config", "deploy/prometheus/prometheus.yml"]);
    let out = run_ok(c);
    assert!(out.contains("SUCCESS"), "{out}");
    let mut t = tool("promtool");
    t.args(["test", "rules", "deploy/prometheus/rules_test.yml"]);
    let out = run_ok(t);
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Children stopped (SIGTERM, then SIGKILL) when the test ends, pass or fail.
struct Procs(Vec<(String, Child)>);

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
        for (_, c) in &mut self.0 {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Procs {
    /// Fails with the log if a child has exited.
    fn check_alive(&mut self, logs: &Path) {
        for (name, c) in &mut self.0 {
            if let Ok(Some(st)) = c.try_wait() {
                let log =
                    std::fs::read_to_string(logs.join(format!("{name}.log"))).unwrap_or_default();
                panic!("{name} exited ({st}) early:\n{log}");
            }
        }
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn prom(addr: SocketAddr, path: &str) -> Value {
    let (code, body) = common::http_get(addr, path).await;
    let v: Value = serde_json::from_str(&body)
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}), {code}: {body}"));
    assert_eq!(v["status"], "success", "{path}: {code} {body}");
    v["data"].clone()
}

async fn query(addr: SocketAddr, q: &str) -> Vec<Value> {
    let d = prom(addr, &format!("/api/v1/query?query={}", urlencode(q))).await;
    d["result"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_pulse_run_and_serve_and_loads_the_rules() {
    let brokers = common::service("PULSE_TEST_BROKERS");
    let redis = common::service("PULSE_TEST_REDIS");
    let t_start = Instant::now();
    let mut prometheus = tool("prometheus");
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let log = |name: &str| std::fs::File::create(logs.join(format!("{name}.log"))).unwrap();
    let topic = common::unique("ops");
    let prefix = common::unique("ops");
    let pulse = env!("CARGO_BIN_EXE_pulse");

    // events in Kafka first, so that the run has something to count
    let st = Command::new(pulse)
        .args([
            "gen",
            "--events",
            "10000",
            "--seed",
            "5",
            "--partitions",
            "2",
        ])
        .args(["--brokers", &brokers, "--topic", &topic])
        .stdout(Stdio::null())
        .stderr(log("gen"))
        .status()
        .unwrap();
    assert!(st.success(), "pulse gen failed");

    let (run_port, serve_port) = (common::free_port(), common::free_port());
    let addr = |p: u16| -> SocketAddr { format!("127.0.0.1:{p}").parse().unwrap() };
    let mut procs = Procs(Vec::new());
    let run = Command::new(pulse)
        .args(["run", "--brokers", &brokers, "--topic", &topic])
        .args(["--group", &common::unique("ops-group"), "--redis", &redis])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--idle-exit-ms", "120000"])
        .args(["--listen", &addr(run_port).to_string()])
        .env("PULSE_REDIS__PREFIX", &prefix)
        .env("PULSE_RECO__ENABLED", "true")
        .env("PULSE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log("pulse-run"))
        .spawn()
        .unwrap();
    procs.0.push(("pulse-run".into(), run));
    let serve = Command::new(pulse)
        .args(["serve", "--redis", &redis, "--threads", "1"])
        .args(["--listen", &addr(serve_port).to_string()])
        .env("PULSE_REDIS__PREFIX", &prefix)
        .env("PULSE_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log("pulse-serve"))
        .spawn()
        .unwrap();
    procs.0.push(("pulse-serve".into(), serve));

    // Prometheus with the kit's rules, scraping both every second
    let rules = root().join("deploy/prometheus/rules.yml");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: pulse-run\n    static_configs:\n      - targets: ['127.0.0.1:{run_port}']\n\
             \x20 - job_name: pulse-serve\n    static_configs:\n      - targets: ['127.0.0.1:{serve_port}']\n",
            rules = rules.display()
        ),
    )
    .unwrap();
    // Picked just before it binds: a port picked earlier was taken once by
    // an outgoing connection of the processes started meanwhile.
    let prom_port = common::free_port();
    let p = prometheus
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(log("prometheus"))
        .spawn()
        .unwrap();
    procs.0.push(("prometheus".into(), p));

    // wait: the run has counted events, serve answers, Prometheus is ready
    let deadline = Instant::now() + Duration::from_secs(120);
    let wait = |what: &str| {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
    };
    loop {
        procs.check_alive(&logs);
        wait("pulse run to count events");
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(addr(run_port)),
        )
        .await
        {
            drop(s);
            let (code, body) = common::http_get(addr(run_port), "/metrics").await;
            if code == 200 && body.contains("pulse_events_total ") {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        procs.check_alive(&logs);
        wait("pulse serve");
        if tokio::net::TcpStream::connect(addr(serve_port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for path in ["/api/services", "/api/status", "/healthz", "/readyz"] {
        let (code, _) = common::http_get(addr(serve_port), path).await;
        assert!(code < 500, "pulse serve {path}: {code}");
    }
    loop {
        procs.check_alive(&logs);
        wait("prometheus to be ready");
        if tokio::net::TcpStream::connect(addr(prom_port))
            .await
            .is_ok()
            && common::http_get(addr(prom_port), "/-/ready").await.0 == 200
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // the series, as Prometheus stored them
    let pa = addr(prom_port);
    let mut seen = Vec::new();
    for (q, job) in [
        ("pulse_events_total", "pulse-run"),
        ("pulse_records_consumed_total", "pulse-run"),
        ("pulse_batch_seconds_count", "pulse-run"),
        // the model writer's live quality sample
        ("pulse_model_quality_samples", "pulse-run"),
        ("pulse_http_requests_total", "pulse-serve"),
        ("pulse_http_request_duration_seconds_bucket", "pulse-serve"),
    ] {
        loop {
            procs.check_alive(&logs);
            wait(&format!("{q} in Prometheus"));
            let r = query(pa, &format!("{q}{{job=\"{job}\"}} > 0")).await;
            if !r.is_empty() {
                seen.push(format!("{q}: {} series", r.len()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let events = query(pa, "pulse_events_total{job=\"pulse-run\"}").await;
    let n: f64 = events[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(n > 0.0 && n <= 10000.0, "pulse_events_total = {n}");
    let served = query(
        pa,
        "sum(pulse_http_requests_total{job=\"pulse-serve\",route=\"/api/services\"})",
    )
    .await;
    assert!(!served.is_empty(), "no /api/services requests counted");

    // every pulse series Prometheus scraped is in the source scan
    let known = exported();
    let names = prom(pa, "/api/v1/label/__name__/values").await;
    let scraped: Vec<String> = names
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .filter(|n| n.starts_with("pulse_"))
        .map(str::to_string)
        .collect();
    let missing: Vec<&String> = scraped.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "scraped but not found by the source scan: {missing:?}"
    );

    // every dashboard query is valid PromQL for this Prometheus
    for (title, e) in dashboard() {
        let q = e.replace("$__rate_interval", "1m");
        let path = format!("/api/v1/query?query={}", urlencode(&q));
        let (code, body) = common::http_get(pa, &path).await;
        assert!(
            code == 200 && body.contains("\"status\":\"success\""),
            "panel {title:?}: {q}: {code} {body}"
        );
    }

    // the rules loaded and evaluated without error
    let expected = exprs_count();
    loop {
        procs.check_alive(&logs);
        wait("rule evaluation");
        let d = prom(pa, "/api/v1/rules").await;
        let rules: Vec<Value> = d["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        assert_eq!(rules.len(), expected, "rules loaded: {rules:?}");
        let evaluated = rules.iter().all(|r| {
            r["lastEvaluation"]
                .as_str()
                .is_some_and(|t| !t.starts_with("0001"))
        });
        if evaluated {
            for r in &rules {
                assert_eq!(r["health"], "ok", "rule {}: {}", r["name"], r["lastError"]);
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // both targets up
    let up = query(pa, "up == 1").await;
    assert_eq!(up.len(), 2, "targets up: {up:?}");
    procs.check_alive(&logs);
    eprintln!(
        "ops: {} in {:.1}s",
        seen.join(", "),
        t_start.elapsed().as_secs_f64()
    );
}

fn exprs_count() -> usize {
    rule_exprs(&read("deploy/prometheus/rules.yml")).len()
}
