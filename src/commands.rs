//! What each `pulse` subcommand does, given its parsed arguments: builds
//! the configuration and the stores, runs the library, prints the results.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;

use crate::cli::{
    BenchArgs, DemoArgs, DetectArgs, GenArgs, ModelAction, ModelArgs, NabArgs, QueryArgs,
    RecoEvalArgs, RunArgs, ServeArgs,
};
use pulse::app::{self, SourceSpec, Summary};
use pulse::config::{Config, Secrets};
use pulse::eval::bench::peak_rss_bytes;
use pulse::sink::redis_sink::RedisOptions;
use pulse::sink::store::{MemoryStore, RedisStore, Store};
use pulse::source::generator::{GenParams, Generator};

/// `pulse demo`.
pub async fn demo(a: DemoArgs) -> Result<()> {
    let DemoArgs {
        events,
        data_dir,
        seed,
    } = a;
    run_demo(events, data_dir, seed).await
}

/// `pulse gen`.
pub async fn generate(a: GenArgs) -> Result<()> {
    let GenArgs {
        events,
        seed,
        out,
        brokers,
        topic,
        partitions,
        rate,
        invalid,
        late,
        no_incidents,
        drift_at,
    } = a;
    let p = GenParams {
        drift_at,
        events,
        seed,
        rate_per_sec: rate,
        invalid_fraction: invalid,
        late_fraction: late,
        incidents: !no_incidents,
        ..GenParams::default()
    };
    write_events(p, out, brokers, topic, partitions).await
}

/// `pulse run`.
pub async fn run(a: RunArgs) -> Result<()> {
    let RunArgs {
        config,
        input,
        brokers,
        topic,
        group,
        redis,
        data_dir,
        idle_exit_ms,
        listen,
    } = a;
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(b) = brokers {
        cfg.kafka.brokers = b;
    }
    if let Some(t) = topic {
        cfg.kafka.topic = t;
    }
    if let Some(g) = group {
        cfg.kafka.group = g;
    }
    if let Some(r) = redis {
        cfg.redis.url = r;
    }
    if let Some(d) = data_dir {
        cfg.parquet.data_dir = d;
    }
    if let Some(i) = idle_exit_ms {
        cfg.pipeline.idle_exit_ms = i;
    }
    cfg.validate()?;
    let source = if input.is_empty() {
        SourceSpec::Kafka
    } else {
        SourceSpec::Files(input)
    };
    run_pipeline(cfg, source, listen).await
}

/// `pulse serve`.
pub async fn serve(a: ServeArgs) -> Result<()> {
    let ServeArgs {
        config,
        redis,
        listen,
        threads,
    } = a;
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(r) = redis {
        cfg.redis.url = r;
    }
    let _ = pulse::serve::metrics_handle();
    let secrets = Secrets::from_env();
    let state = serve_state(&cfg, &secrets, None).await?;
    let addr = tokio::net::lookup_host(&listen)
        .await
        .with_context(|| format!("resolving {listen}"))?
        .next()
        .with_context(|| format!("{listen} resolves to no address"))?;
    let threads =
        threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let listeners =
        pulse::serve::bind_shards(addr, threads).with_context(|| format!("binding {listen}"))?;
    let bound = listeners[0].local_addr()?;
    tracing::info!(addr = %bound, threads, "dashboard at http://{bound}/");
    pulse::serve::serve_sharded(
        listeners,
        state,
        redis_client(&cfg, &secrets)?,
        shutdown_on_signals(),
    )
    .await?;
    Ok(())
}

/// `pulse bench`: the file pipeline, or with `--kafka` the Kafka path.
pub async fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        events,
        redis,
        dir,
        kafka,
        partitions,
        fresh_rate,
        fresh_secs,
    } = a;
    match kafka {
        Some(brokers) => {
            bench_kafka(
                events, redis, dir, brokers, partitions, fresh_rate, fresh_secs,
            )
            .await
        }
        None => bench_files(events, redis, dir).await,
    }
}

/// `pulse reco-eval`.
pub async fn reco_eval(a: RecoEvalArgs) -> Result<()> {
    let RecoEvalArgs {
        ratings,
        format,
        k,
        config,
    } = a;
    if k != 10 {
        bail!("--k: the prequential protocol is defined at k = 10");
    }
    let fmt = match format.as_str() {
        "movielens" => pulse::eval::reco::Format::MovieLens,
        "jsonl" => pulse::eval::reco::Format::Jsonl,
        other => bail!("--format must be movielens or jsonl, not {other:?}"),
    };
    let text = std::fs::read_to_string(&ratings)
        .with_context(|| format!("reading {}", ratings.display()))?;
    let t = std::time::Instant::now();
    let (mut events, skipped) = pulse::eval::reco::parse(&text, fmt);
    drop(text);
    let cfg = Config::load(config.as_deref())?;
    let (mut r, _) =
        pulse::eval::reco::evaluate(&mut events, cfg.reco.model_config(), cfg.reco.seed);
    r.skipped = skipped;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({
            "events": r.events,
            "skipped": r.skipped,
            "scored": r.scored,
            "recall_at_10": r.recall_at_10,
            "ndcg_at_10": r.ndcg_at_10,
            "popularity_recall_at_10": r.popularity_recall_at_10,
            "popularity_ndcg_at_10": r.popularity_ndcg_at_10,
            "ratings": r.ratings,
            "rmse": r.rmse,
            "mae": r.mae,
            "seconds": secs,
        })
    );
    Ok(())
}

/// `pulse detect`.
pub async fn detect(a: DetectArgs) -> Result<()> {
    let DetectArgs { input, output } = a;
    let cfg = pulse::detect::DetectorConfig::default();
    let inp = std::io::BufReader::new(
        std::fs::File::open(&input).with_context(|| format!("opening {}", input.display()))?,
    );
    let n = match output {
        Some(o) => pulse::eval::detect_csv::detect_csv(
            inp,
            std::io::BufWriter::new(
                std::fs::File::create(&o).with_context(|| format!("creating {}", o.display()))?,
            ),
            &cfg,
        )?,
        None => pulse::eval::detect_csv::detect_csv(inp, std::io::stdout().lock(), &cfg)?,
    };
    tracing::info!(rows = n, "scored");
    Ok(())
}

/// `pulse nab`.
pub async fn nab(a: NabArgs) -> Result<()> {
    let NabArgs { data, loco } = a;
    if loco {
        return nab_loco(&data);
    }
    let cfg = pulse::detect::DetectorConfig::default();
    for (name, r) in pulse::eval::detect_csv::nab_scores(&data, &cfg)? {
        println!(
            "{name:<20} {:6.2}  (threshold {:.3}, windows detected {}/{}, false positives {})",
            r.normalised,
            r.threshold,
            r.detected_windows,
            r.perfect.round(),
            r.false_positives
        );
    }
    Ok(())
}

/// A grid setting as `(window, short, long, suppress, spatial)`.
fn setting(c: &pulse::detect::DetectorConfig) -> String {
    format!(
        "({}, {}, {}, {}, {})",
        c.window, c.short_window, c.long_window, c.suppress, c.spatial_tolerance
    )
}

/// `pulse nab --loco`: one line per held-out category and profile, then the
/// mean and worst fold per profile over the categories with anomaly windows.
fn nab_loco(data: &std::path::Path) -> Result<()> {
    use pulse::eval::loco;
    let files = pulse::eval::nab::load_corpus(data)?;
    let profiles = pulse::eval::nab::load_profiles(&data.join("profiles.json"))?;
    let grid = loco::grid();
    let folds = loco::loco(&files, &profiles, &grid);
    for f in folds.iter().filter(|f| f.category.is_empty()) {
        let c = &grid[f.setting];
        println!(
            "all categories: {:<20} {:6.2} with {} threshold {:.3}",
            f.profile,
            f.train.normalised,
            setting(c),
            f.train.threshold
        );
    }
    println!(
        "{:<22} {:<20} {:>8} {:>9} {:>5} {:>8}  setting (window, short, long, suppress, spatial)",
        "held out", "profile", "held-out", "windows", "FP", "trained"
    );
    for f in folds.iter().filter(|f| !f.category.is_empty()) {
        let score = if f.windows > 0 {
            format!("{:8.2}", f.test.normalised)
        } else {
            format!("{:>8}", "–")
        };
        println!(
            "{:<22} {:<20} {score} {:>4}/{:<4} {:>5} {:8.2}  {} threshold {:.3}",
            f.category,
            f.profile,
            f.test.detected_windows,
            f.windows,
            f.test.false_positives,
            f.train.normalised,
            setting(&grid[f.setting]),
            f.train.threshold
        );
    }
    for (name, _) in &profiles {
        let s: Vec<f64> = folds
            .iter()
            .filter(|f| &f.profile == name && f.windows > 0 && !f.category.is_empty())
            .map(|f| f.test.normalised)
            .collect();
        let mean = s.iter().sum::<f64>() / s.len().max(1) as f64;
        let worst = s.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "{name:<20} mean of {} folds {mean:6.2}, worst {worst:6.2}",
            s.len()
        );
    }
    Ok(())
}

/// `pulse query`.
pub async fn query(a: QueryArgs) -> Result<()> {
    let QueryArgs {
        data_dir,
        format,
        sql,
    } = a;
    let batches = pulse::query::run_sql(&data_dir, &sql).await?;
    let text = pulse::query::render(&batches, &format)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", text.trim_end())?;
    Ok(())
}

/// `pulse model`.
pub async fn model(a: ModelArgs) -> Result<()> {
    use pulse::factors::versions::{self, Versions};
    let ModelArgs {
        action,
        config,
        topic,
        redis,
        data_dir,
    } = a;
    let mut cfg = Config::load(config.as_deref())?;
    if let Some(t) = topic {
        cfg.kafka.topic = t;
    }
    if let Some(r) = redis {
        cfg.redis.url = r;
    }
    if let Some(d) = data_dir {
        cfg.parquet.data_dir = d;
    }
    let vs = Versions::of(&cfg);
    let list = vs.list()?;
    let timeout = std::time::Duration::from_millis(cfg.redis.timeout_ms.max(1));
    let conn = if cfg.redis.url.is_empty() {
        None
    } else {
        let secrets = Secrets::from_env();
        Some(pulse::sink::redis_sink::lazy_connection(
            &cfg.redis.url,
            secrets.redis_password.as_deref(),
            timeout,
        )?)
    };
    let prefix = cfg.redis.prefix.clone();
    match action {
        ModelAction::List => {
            // What Redis serves; the versions are listed even without it.
            let (pin, served, unknown) = match conn {
                Some(mut c) => {
                    let served = async {
                        let pin = versions::read_pin(&mut c, &prefix, timeout).await?;
                        let served: Option<String> = redis::cmd("HGET")
                            .arg(format!("{prefix}:reco:meta"))
                            .arg("version")
                            .query_async(&mut c)
                            .await
                            .map_err(|e| e.to_string())?;
                        Ok::<_, String>((pin, served))
                    };
                    match served.await {
                        Ok((pin, served)) => (pin, served, None),
                        Err(e) => (None, None, Some(e)),
                    }
                }
                None => (None, None, Some("no redis.url".to_string())),
            };
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "{:>12}  {:<20}  {:>8}  {:>8}  {:>9}  {:>7}  {:>13}  {:>11}  writer",
                "version",
                "saved (UTC)",
                "users",
                "items",
                "recall@10",
                "ndcg@10",
                "pop recall@10",
                "pop ndcg@10"
            )?;
            for v in &list {
                let saved = chrono::DateTime::from_timestamp_millis(v.saved_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                writeln!(
                    out,
                    "{:>12}  {saved:<20}  {:>8}  {:>8}  {:>9.4}  {:>7.4}  {:>13.4}  {:>11.4}  {}{}",
                    v.version,
                    v.users,
                    v.items,
                    v.recall_at_10,
                    v.ndcg_at_10,
                    v.popularity_recall_at_10,
                    v.popularity_ndcg_at_10,
                    v.instance,
                    if pin == Some(v.version) {
                        "  (pinned, served)"
                    } else {
                        ""
                    }
                )?;
            }
            match (unknown, pin, served) {
                (Some(e), _, _) => writeln!(out, "serving: unknown ({e})")?,
                (None, Some(p), _) => writeln!(out, "serving: pinned version {p}")?,
                (None, None, Some(s)) => writeln!(out, "serving: the live model, version {s}")?,
                (None, None, None) => writeln!(out, "serving: nothing published")?,
            }
        }
        ModelAction::Rollback { to } => {
            let Some(mut c) = conn else {
                bail!("a rollback pins the version in Redis: set redis.url (or --redis)");
            };
            if to == "latest" {
                versions::set_pin(&mut c, &prefix, None).await?;
                println!(
                    "unpinned: the model writer serves the live model again within reco.flush_ms ({} ms)",
                    cfg.reco.flush_ms
                );
            } else {
                let v: u64 = to
                    .parse()
                    .with_context(|| format!("--to {to}: a version number or `latest`"))?;
                if !list.iter().any(|x| x.version == v) {
                    bail!(versions::VersionError::Unknown(v));
                }
                versions::set_pin(&mut c, &prefix, Some(v)).await?;
                println!(
                    "pinned version {v}: the model writer serves it within reco.flush_ms ({} ms); `pulse model rollback --to latest` serves the live model again",
                    cfg.reco.flush_ms
                );
            }
        }
    }
    Ok(())
}

/// Logs to stderr, filtered by `PULSE_LOG` (default `info`). The Delta
/// Lake libraries log every snapshot they build at `info`, and the kernel
/// logs at `error` what it returns as an error too (a table not created
/// yet): unless `PULSE_LOG` names them, the kernel is silent (pulse logs
/// the errors it gets) and the others log warnings only.
pub fn init_tracing() {
    let spec = std::env::var("PULSE_LOG").unwrap_or_else(|_| "info".into());
    let mut filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for (target, level) in [
        ("buoyant_kernel", "off"),
        ("deltalake_core", "warn"),
        ("object_store", "warn"),
    ] {
        if !spec.contains(target)
            && let Ok(d) = format!("{target}={level}").parse()
        {
            filter = filter.add_directive(d);
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn shutdown_on_signals() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("signal received, stopping");
        let _ = tx.send(true);
        // Keep the sender alive: a dropped sender would read as endless changes.
        std::future::pending::<()>().await;
    });
    rx
}

/// The Redis client of the configuration (password from the environment).
fn redis_client(cfg: &Config, secrets: &Secrets) -> Result<Option<redis::Client>> {
    if cfg.redis.url.is_empty() {
        return Ok(None);
    }
    let mut info = redis::IntoConnectionInfo::into_connection_info(cfg.redis.url.as_str())?;
    if let Some(p) = &secrets.redis_password {
        let settings = info.redis_settings().clone().set_password(p);
        info = info.set_redis_settings(settings);
    }
    Ok(Some(redis::Client::open(info)?))
}

async fn serve_state(
    cfg: &Config,
    secrets: &Secrets,
    kafka: Option<String>,
) -> Result<pulse::serve::ServeState> {
    // Lazy: the API answers 503 while Redis is down, and recovers with it.
    let redis = if cfg.redis.url.is_empty() {
        None
    } else {
        Some(pulse::sink::redis_sink::lazy_connection(
            &cfg.redis.url,
            secrets.redis_password.as_deref(),
            std::time::Duration::from_millis(cfg.redis.timeout_ms.max(1)),
        )?)
    };
    Ok(pulse::serve::ServeState::new(
        redis,
        &cfg.redis.prefix,
        kafka,
    ))
}

async fn run_pipeline(cfg: Config, source: SourceSpec, listen: Option<String>) -> Result<()> {
    let secrets = Secrets::from_env();
    let _ = pulse::serve::metrics_handle();
    let mut sink_health = None;
    if let Some(addr) = listen {
        let kafka = matches!(source, SourceSpec::Kafka).then(|| cfg.kafka.brokers.clone());
        let state = serve_state(&cfg, &secrets, kafka).await?;
        sink_health = Some(state.sink.clone());
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
        tokio::spawn(async move {
            if let Err(e) = pulse::serve::serve(listener, state, std::future::pending()).await {
                tracing::error!(error = %e, "metrics server stopped");
            }
        });
    }
    let store = if cfg.redis.url.is_empty() {
        Store::Memory(MemoryStore::default())
    } else {
        Store::Redis(
            RedisStore::open(
                &cfg.redis.url,
                secrets.redis_password.as_deref(),
                RedisOptions::from_config(&cfg.redis),
            )
            .context("setting up Redis")?,
        )
    };
    if let (Some(h), Store::Redis(r)) = (&sink_health, &store) {
        h.set(r.health()).ok();
    }
    let s = app::run(&cfg, &secrets, source, store, shutdown_on_signals()).await?;
    print_summary(&s, &cfg.parquet.data_dir, 0);
    Ok(())
}

async fn run_demo(events: u64, data_dir: PathBuf, seed: u64) -> Result<()> {
    let mut cfg = Config::load(None)?;
    cfg.parquet.data_dir = data_dir.clone();
    // Two hours of event time, so the detectors warm up before the planted incidents.
    let p = GenParams {
        events,
        seed,
        rate_per_sec: (events as f64 / 7200.0).max(1.0),
        ..GenParams::default()
    };
    let incidents = Generator::new(p.clone()).incidents;
    let mem = MemoryStore::default();
    let s = app::run(
        &cfg,
        &Secrets::default(),
        SourceSpec::Generator(p),
        Store::Memory(mem.clone()),
        shutdown_on_signals(),
    )
    .await?;
    print_summary(&s, &data_dir, 8);
    println!("planted incidents:");
    for i in incidents {
        println!(
            "  {:<13} on {:<8} {} .. {}",
            i.kind,
            i.service,
            pulse::timefmt::fmt_ts(i.start_ms),
            pulse::timefmt::fmt_ts(i.end_ms)
        );
    }
    println!("alerts ({} anomalous points):", s.anomalies);
    for a in &s.alerts {
        println!(
            "  {:<8} {:<9} at {} ({}, score {:.2})",
            a.kind,
            a.service,
            pulse::timefmt::fmt_ts(a.window_start_ms),
            a.metrics.join(", "),
            a.score
        );
    }
    let snap = mem.snapshot();
    println!(
        "in-process store: {} per-minute rows, {} windows of top items",
        snap.stats.len(),
        snap.top.len()
    );
    println!(
        "query it: pulse query --data-dir {} \"SELECT service, sum(requests) FROM minute_stats GROUP BY service\"",
        data_dir.display()
    );
    Ok(())
}

fn print_summary(s: &Summary, data_dir: &std::path::Path, sample_rows: usize) {
    let secs = s.elapsed.as_secs_f64().max(1e-9);
    println!(
        "pulse: {} records in {:.2}s ({:.0} records/s)",
        s.records,
        secs,
        s.records as f64 / secs
    );
    println!("  events (valid)      {}", s.events);
    println!("  invalid -> dead_letters {}", s.invalid);
    println!("  late (window re-emitted) {}", s.late);
    println!("  too late (kept, not aggregated) {}", s.too_late);
    println!("  windows emitted     {}", s.windows_emitted);
    println!("  minute_stats rows   {}", s.minute_rows_final);
    let bytes: u64 = s.files.iter().map(|f| f.1.bytes).sum();
    println!(
        "  files written       {} ({:.1} MB) under {}",
        s.files.len(),
        bytes as f64 / 1e6,
        data_dir.display()
    );
    for t in ["events", "dead_letters", "minute_stats", "top_items"] {
        let (n, rows) = s
            .files
            .iter()
            .filter(|f| f.0 == t)
            .fold((0, 0), |(n, r), f| (n + 1, r + f.1.rows));
        println!("    {t:<13} {n} files, {rows} rows");
    }
    if sample_rows > 0 && !s.final_rows.is_empty() {
        println!("  a few per-minute rows:");
        println!(
            "    {:<24} {:<9} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8}",
            "window_start",
            "service",
            "requests",
            "errors",
            "err_rate",
            "p50_ms",
            "p95_ms",
            "p99_ms"
        );
        let mid = s.final_rows.len() / 2;
        for r in s.final_rows.iter().skip(mid).take(sample_rows) {
            println!(
                "    {:<24} {:<9} {:>8} {:>7} {:>9.4} {:>8.1} {:>8.1} {:>8.1}",
                pulse::timefmt::fmt_ts(r.window_start_ms),
                r.service,
                r.requests,
                r.errors,
                r.error_rate,
                r.latency_p50_ms.unwrap_or(f64::NAN),
                r.latency_p95_ms.unwrap_or(f64::NAN),
                r.latency_p99_ms.unwrap_or(f64::NAN)
            );
        }
    }
}

async fn write_events(
    p: GenParams,
    out: Option<PathBuf>,
    brokers: Option<String>,
    topic: Option<String>,
    partitions: i32,
) -> Result<()> {
    let n = p.events;
    if let Some(path) = out {
        let f =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w: Box<dyn Write> = if path.extension().is_some_and(|e| e == "gz") {
            Box::new(flate2::write::GzEncoder::new(
                std::io::BufWriter::new(f),
                flate2::Compression::fast(),
            ))
        } else {
            Box::new(std::io::BufWriter::with_capacity(1 << 20, f))
        };
        let mut g = Generator::new(p);
        let mut line = Vec::with_capacity(512);
        loop {
            line.clear();
            if g.next_into(&mut line).is_none() {
                break;
            }
            line.push(b'\n');
            w.write_all(&line)?;
        }
        w.flush()?;
        drop(w);
        println!("wrote {n} events to {}", path.display());
        return Ok(());
    }
    let (Some(brokers), Some(topic)) = (brokers, topic) else {
        bail!("pulse gen needs --out FILE or --brokers HOST:PORT --topic T");
    };
    let kcfg = pulse::config::KafkaConfig {
        brokers,
        ..Default::default()
    };
    let secrets = Secrets::from_env();
    pulse::source::kafka::create_topic(&kcfg, &secrets, &topic, partitions).await?;
    tokio::task::spawn_blocking(move || -> Result<()> {
        let prod = pulse::source::kafka::EventProducer::new(&kcfg, &secrets, &topic)?;
        let mut g = Generator::new(p);
        let mut line = Vec::with_capacity(512);
        let mut i = 0u64;
        loop {
            line.clear();
            if g.next_into(&mut line).is_none() {
                break;
            }
            i += 1;
            // Key by user so one user's events stay in order within a partition.
            let key = user_key(&line).unwrap_or(i);
            prod.send(&key.to_le_bytes(), &line)?;
        }
        prod.finish()?;
        println!("produced {n} events to {topic}");
        Ok(())
    })
    .await??;
    Ok(())
}

/// The `user_id` of a generated line, found without parsing the whole object.
fn user_key(line: &[u8]) -> Option<u64> {
    let pat = b"\"user_id\":";
    let at = line.windows(pat.len()).position(|w| w == pat)? + pat.len();
    let digits: Vec<u8> = line[at..]
        .iter()
        .take_while(|c| c.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

async fn bench_files(events: u64, redis: Option<String>, dir: Option<PathBuf>) -> Result<()> {
    let tmp = tempfile_dir(dir)?;
    let input = tmp.join("bench-input.jsonl");
    let p = GenParams {
        events,
        seed: 7,
        ..GenParams::default()
    };
    let t = std::time::Instant::now();
    write_events(p, Some(input.clone()), None, None, 1).await?;
    let bytes = std::fs::metadata(&input)?.len();
    println!(
        "generated {events} events ({:.0} MB) in {:.1}s (not timed)",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let mut cfg = Config::load(None)?;
    cfg.parquet.data_dir = tmp.join("data");
    if let Some(r) = redis {
        cfg.redis.url = r;
        cfg.redis.prefix = format!("bench{}", std::process::id());
    }
    let secrets = Secrets::default();
    let store = if cfg.redis.url.is_empty() {
        Store::Memory(MemoryStore::default())
    } else {
        Store::Redis(RedisStore::connect(&cfg.redis.url, None, &cfg.redis.prefix, 600).await?)
    };
    let (_tx, rx) = watch::channel(false);
    let s = app::run(&cfg, &secrets, SourceSpec::Files(vec![input]), store, rx).await?;
    let secs = s.elapsed.as_secs_f64();
    println!(
        "pipeline: {} records in {:.2}s = {:.0} events/s ({:.0} MB/s)",
        s.records,
        secs,
        s.records as f64 / secs,
        bytes as f64 / 1e6 / secs
    );
    if let Some(rss) = peak_rss_bytes() {
        println!("peak RSS: {:.0} MB", rss as f64 / 1e6);
    }
    for (stage, busy) in &s.stage_seconds {
        println!(
            "  stage {stage:<26} busy {busy:6.2}s ({:.0}% of wall)",
            100.0 * busy / secs
        );
    }
    println!(
        "  invalid {}, late {}, minute rows {}, anomalies {}",
        s.invalid, s.late, s.minute_rows_final, s.anomalies
    );
    Ok(())
}

async fn bench_kafka(
    events: u64,
    redis: Option<String>,
    dir: Option<PathBuf>,
    brokers: String,
    partitions: i32,
    fresh_rate: f64,
    fresh_secs: u64,
) -> Result<()> {
    let tmp = tempfile_dir(dir)?;
    let mut cfg = Config::load(None)?;
    cfg.parquet.data_dir = tmp.join("data");
    cfg.kafka.brokers = brokers;
    let store = || async {
        Ok::<Store, anyhow::Error>(match &redis {
            Some(r) => Store::Redis(
                RedisStore::connect(r, None, &format!("bench{}", std::process::id()), 600).await?,
            ),
            None => Store::Memory(MemoryStore::default()),
        })
    };
    let r = pulse::eval::bench::kafka_throughput(&cfg, store().await?, events, partitions).await?;
    println!(
        "kafka path, {} records, {partitions} partitions (group joins excluded):",
        r.events
    );
    println!(
        "  raw rdkafka consumer (count only): {:.2}s = {:.0} records/s",
        r.raw_secs,
        r.raw_rate()
    );
    println!(
        "  pulse pipeline:                    {:.2}s = {:.0} records/s  ({:.0}% of raw)",
        r.pulse_secs,
        r.pulse_rate(),
        100.0 * r.pulse_rate() / r.raw_rate()
    );
    for (stage, busy) in &r.summary.stage_seconds {
        println!("    stage {stage:<26} busy {busy:6.2}s");
    }
    if let (Some(raw), Some(pipeline)) = (r.raw_cpu_secs, r.pulse_cpu_secs) {
        let per_m = |s: f64| s * 1e6 / r.events.max(1) as f64;
        println!(
            "  CPU of this process per 1M records: raw consumer {:.2}s, pipeline {:.2}s (the broker's and Redis's not included)",
            per_m(raw),
            per_m(pipeline)
        );
    }
    if let (Some(peak), Some(before)) = (r.pipeline_peak_rss, r.rss_before_pipeline) {
        println!(
            "  peak RSS while the pipeline drained: {:.0} MB (RSS at its start: {:.0} MB)",
            peak as f64 / 1e6,
            before as f64 / 1e6
        );
    }
    if fresh_secs > 0 {
        let (s, tables) =
            pulse::eval::bench::freshness(&cfg, store().await?, fresh_rate, fresh_secs).await?;
        let q = |x: f64| {
            s.freshness
                .as_ref()
                .and_then(|h| pulse::sketch::quantile_ms(h, x))
                .unwrap_or(f64::NAN)
        };
        println!(
            "freshness ({fresh_rate:.0} events/s for {fresh_secs}s, event time to {} write): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms over {} events",
            if redis.is_some() { "Redis" } else { "store" },
            q(0.5),
            q(0.99),
            q(1.0),
            s.events
        );
        println!(
            "  bound for the target: window.out_of_orderness_ms + 200 = {} ms",
            cfg.window.out_of_orderness_ms + 200
        );
        let qs = |v: &[f64]| {
            let q = |x| pulse::eval::bench::quantile(v, x) / 1000.0;
            format!(
                "p50 {:.1} s, p99 {:.1} s, max {:.1} s over {} rows",
                q(0.5),
                q(0.99),
                q(1.0),
                v.len()
            )
        };
        println!(
            "table freshness (a reader polling every 250 ms, parquet.commit_secs = {}):",
            cfg.parquet.commit_secs
        );
        println!("  events, from the event's time: {}", qs(&tables.events));
        println!(
            "  minute_stats, from the window's end + out-of-orderness + allowed lateness: {}",
            qs(&tables.minute_rows)
        );
        println!(
            "  by the log commit that added the row's file: events {}; minute_stats {}",
            qs(&tables.events_by_commit),
            qs(&tables.minute_rows_by_commit)
        );
        for (t, counts) in &tables.files {
            let hours: Vec<String> = counts
                .iter()
                .map(|((h, p), (w, k))| {
                    let at = chrono::DateTime::from_timestamp_millis(*h).unwrap_or_default();
                    format!("{} p{p}: {w}→{k}", at.format("%H:00"))
                })
                .collect();
            println!(
                "  {t} files per (hour, partition), written → in the table: {}",
                hours.join(", ")
            );
        }
    }
    if let Some(rss) = peak_rss_bytes() {
        println!("peak RSS: {:.0} MB", rss as f64 / 1e6);
    }
    Ok(())
}

/// The benchmark's working directory: `dir`, or a temporary one that is
/// removed when the returned guard drops (also on an error).
fn tempfile_dir(dir: Option<PathBuf>) -> Result<BenchDir> {
    let (d, temporary) = match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("pulse-bench-{}", std::process::id())),
            true,
        ),
    };
    if d.join("data").exists() {
        std::fs::remove_dir_all(d.join("data"))?;
    }
    std::fs::create_dir_all(&d)?;
    Ok(BenchDir { path: d, temporary })
}

struct BenchDir {
    path: PathBuf,
    temporary: bool,
}

impl std::ops::Deref for BenchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        if self.temporary {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
