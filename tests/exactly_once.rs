//! Exactly-once across crashes, rebalances and restarts, against the real
//! broker (tansu) and redis-server: `pulse run` runs as a child process and
//! is killed with SIGKILL, stopped with SIGTERM, or joined by a second
//! instance in its group while events keep arriving. Afterwards `events`
//! must hold every valid event exactly once, `minute_stats` (Parquet, per
//! partition) and the merged Redis rows must equal a recomputation from the
//! events, and no partial file may be visible.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use rand::{Rng, SeedableRng};

struct Harness {
    dir: tempfile::TempDir,
    /// `parquet.data_dir`: a local directory, or `s3://…` on the test S3 server.
    data: PathBuf,
    /// pulse's own state (`parquet.state_dir()`).
    state: PathBuf,
    config: PathBuf,
    cfg: pulse::config::Config,
    redis: String,
    prefix: String,
    /// Train the factor model too (and check it learned each event once).
    reco: bool,
    /// `pulse run --listen` address (readiness and metrics).
    listen: Option<String>,
    /// Further environment of every `pulse run` (configuration overrides).
    env: Vec<(String, String)>,
}

impl Harness {
    /// `static_id`: a `group.instance.id` (static membership) for runs that
    /// replace each other one at a time; a restart then takes over the dead
    /// member's assignment without waiting out its session.
    fn new(static_id: Option<&str>, reco: bool) -> Self {
        Self::new_at(static_id, reco, false, None)
    }

    /// [`Harness::new`] with the tables on the test S3 server (a bucket of
    /// the test's own), pulse's state in a local directory.
    fn on_s3(static_id: Option<&str>, reco: bool) -> Self {
        Self::new_at(static_id, reco, true, None)
    }

    fn new_at(static_id: Option<&str>, reco: bool, s3: bool, endpoint: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (data, state) = if s3 {
            let bucket = unique("pulse-t").to_lowercase().replace('_', "-");
            create_bucket_at(endpoint, &bucket);
            (
                PathBuf::from(format!("s3://{bucket}/tables")),
                dir.path().join("state"),
            )
        } else {
            (dir.path().join("data"), dir.path().join("data"))
        };
        let state_line = if s3 {
            format!("state_dir = \"{}\"\n", state.display())
        } else {
            String::new()
        };
        let config = dir.path().join("pulse.toml");
        // Small batches, frequent checkpoints and files rolled by size keep
        // every crash in the middle of something.
        std::fs::write(
            &config,
            r#"
[pipeline]
batch_size = 2000
checkpoint_ms = 300

[parquet]
max_file_rows = 8000
{STATE}
[kafka.properties]
"session.timeout.ms" = "6000"
"heartbeat.interval.ms" = "1000"
"#
            .replace("{STATE}", &state_line)
                + &static_id.map_or(String::new(), |id| {
                    format!("\"group.instance.id\" = \"{id}\"\n")
                }),
        )
        .unwrap();
        let mut cfg = pulse::config::Config::load_with_env(Some(&config), &[]).unwrap();
        cfg.kafka.brokers = service("PULSE_TEST_BROKERS");
        cfg.kafka.topic = unique("eo");
        cfg.kafka.group = unique("eo-g");
        cfg.parquet.data_dir = data.clone();
        let redis = service("PULSE_TEST_REDIS");
        let prefix = unique("eo");
        cfg.redis.url = redis.clone();
        cfg.redis.prefix = prefix.clone();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        Harness {
            dir,
            data,
            state,
            config,
            cfg,
            redis,
            prefix,
            reco,
            listen: None,
            env: Vec::new(),
        }
    }

    /// Starts `pulse run` on the topic; its log goes to `logs/<name>.log`.
    fn spawn(&self, name: &str, idle_exit_ms: u64) -> Child {
        self.spawn_in(name, idle_exit_ms, &self.cfg.kafka.group)
    }

    /// [`Harness::spawn`] in another consumer group: pulse starts every
    /// partition from its own checkpoint, so any group reads on where the
    /// last owner stopped.
    fn spawn_in(&self, name: &str, idle_exit_ms: u64, group: &str) -> Child {
        let log = std::fs::File::create(self.log_path(name)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pulse"));
        cmd.args(["run"]);
        if let Some(l) = &self.listen {
            cmd.args(["--listen", l]);
        }
        cmd.arg("--config")
            .arg(&self.config)
            .args(["--brokers", &self.cfg.kafka.brokers])
            .args(["--topic", &self.cfg.kafka.topic])
            .args(["--group", group])
            .args(["--redis", &self.redis])
            .arg("--data-dir")
            .arg(&self.data)
            .args(["--idle-exit-ms", &idle_exit_ms.to_string()])
            .env("PULSE_REDIS__PREFIX", &self.prefix)
            .env("PULSE_RECO__ENABLED", self.reco.to_string())
            .env("PULSE_RECO__SNAPSHOT_MS", "1500")
            .env("PULSE_RECO__LEASE_MS", "3000")
            .env("PULSE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    /// `pulse model ARGS` on the harness's topic, data and Redis: its stdout.
    fn model_cmd(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_pulse"))
            .arg("model")
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .args(["--topic", &self.cfg.kafka.topic])
            .args(["--redis", &self.redis])
            .arg("--data-dir")
            .arg(&self.data)
            .env("PULSE_REDIS__PREFIX", &self.prefix)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pulse model {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join("logs").join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Every instance's log lines about the model writer lease and terms.
    fn model_writer_log(&self) -> String {
        let mut out = String::new();
        for path in walk(&self.dir.path().join("logs")) {
            for line in std::fs::read_to_string(&path).unwrap_or_default().lines() {
                if line.contains("model writer") || line.contains("standing by") {
                    out.push_str(&format!("{path}: {line}\n"));
                }
            }
        }
        out
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.state
            .join("_pulse/checkpoints")
            .join(&self.cfg.kafka.topic)
    }

    /// Polls `check` until it holds (`Err` says what is still missing),
    /// failing if the instance exits first or after 90 s; returns the wait.
    fn wait_until(
        &self,
        child: &mut Child,
        mut check: impl FnMut(&Path) -> Result<(), String>,
    ) -> Duration {
        let dir = self.checkpoint_dir();
        let t0 = Instant::now();
        loop {
            let missing = match check(&dir) {
                Ok(()) => return t0.elapsed(),
                Err(m) => m,
            };
            if let Ok(Some(st)) = child.try_wait() {
                panic!("pulse run exited early: {st}");
            }
            assert!(t0.elapsed() < Duration::from_secs(90), "{missing}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Checks for `d` that the instance `name` keeps running.
    fn stays_up(&self, child: &mut Child, name: &str, d: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < d {
            if let Ok(Some(st)) = child.try_wait() {
                panic!("{name} exited: {st}\n{}", self.log(name));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits until some partition checkpoint is newer than `since`: the
    /// instance has joined, restored and processed data.
    fn wait_checkpoint_after(&self, since: SystemTime, child: &mut Child) -> Duration {
        self.wait_until(child, |dir| {
            let newest = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| e.metadata().ok()?.modified().ok())
                        .max()
                })
                .ok()
                .flatten();
            match newest {
                Some(m) if m > since => Ok(()),
                _ => Err("no checkpoint within 90 s".into()),
            }
        })
    }

    /// Waits until the checkpoints' next offsets cover `n` records in all.
    fn wait_checkpointed(&self, n: i64, child: &mut Child) {
        self.wait_until(child, |dir| {
            let covered: i64 = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .filter_map(|e| std::fs::read(e.path()).ok())
                        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                        .filter_map(|v| v["next_offset"].as_i64())
                        .sum()
                })
                .unwrap_or(0);
            if covered >= n {
                Ok(())
            } else {
                Err(format!(
                    "checkpoints cover {covered} of {n} records after 90 s"
                ))
            }
        });
    }

    async fn produce(&self, lines: &[Vec<u8>], first_key: usize) {
        let records = lines
            .iter()
            .enumerate()
            .map(|(i, l)| (((first_key + i) % 97) as u64, l.clone()))
            .collect();
        produce(&self.cfg, 4, records).await;
    }

    /// Per partition: the broker's log end offset and the checkpoint's
    /// (next_offset, replay_from).
    fn positions(&self) -> Vec<Position> {
        let store = pulse::checkpoint::CheckpointStore::new(&self.state, &self.cfg.kafka.topic);
        let consumer: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.cfg.kafka.brokers)
            .set("group.id", unique("diag"))
            .create()
            .expect("diagnostic consumer");
        (0..4)
            .map(|p| {
                let (_, end) = rdkafka::consumer::Consumer::fetch_watermarks(
                    &consumer,
                    &self.cfg.kafka.topic,
                    p,
                    Duration::from_secs(10),
                )
                .expect("watermarks");
                let cp = store.load(p).ok().flatten();
                (p, end, cp.map(|c| (c.next_offset, c.replay_from)))
            })
            .collect()
    }

    /// `pulse run --idle-exit-ms` stops after that long without a message,
    /// which a broker stall can also cause before a partition's last records
    /// arrive (tansu has stalled for seconds under load). A run that stopped
    /// short is followed by another one, as an operator would restart it:
    /// exactly once must hold across any number of restarts, and records
    /// that were consumed but lost would still fail the checks (their
    /// checkpoints are at the end). The tail runs join a group of their own:
    /// tansu has been seen to hold a join to the test's group for minutes
    /// after a fleet with killed members left it (no assignment in 120 s),
    /// and pulse does not need the group's offsets.
    fn drain_tails(&self, name: &str) {
        for round in 0..3 {
            let short: Vec<_> = self
                .positions()
                .into_iter()
                .filter(|(_, end, cp)| cp.map_or(*end > 0, |(next, _)| next < *end))
                .collect();
            if short.is_empty() {
                return;
            }
            eprintln!("{name}: stopped before the end of partitions {short:?}, draining again");
            let run = format!("{name}-tail-{round}");
            let group = format!("{}-{run}", self.cfg.kafka.group);
            let mut c = self.spawn_in(&run, 4000, &group);
            let st = wait_exit_or(&mut c, Duration::from_secs(120))
                .unwrap_or_else(|| panic!("{run} did not exit within 120 s:\n{}", self.log(&run)));
            assert!(st.success(), "{run}: {st}\n{}", self.log(&run));
        }
        panic!("partitions still not drained: {:?}", self.positions());
    }

    /// What the dead-letter table holds, per source partition, and its
    /// committed files (names carry their offset ranges), for a failure message.
    async fn dead_letter_diagnosis(&self) -> String {
        let q = "SELECT src_partition, count(*) AS n, count(DISTINCT src_offset) AS distinct_offsets, \
                 min(src_offset) AS first, max(src_offset) AS last \
                 FROM dead_letters GROUP BY src_partition ORDER BY src_partition";
        let summary =
            datafusion::arrow::util::pretty::pretty_format_batches(&sql(&self.data, q).await)
                .map(|t| t.to_string())
                .unwrap_or_else(|e| e.to_string());
        let mut files: Vec<String> = pulse::sink::parquet::list_files(&self.data, "dead_letters")
            .iter()
            .filter_map(|p| {
                p.strip_prefix(&self.data)
                    .ok()
                    .map(|r| r.display().to_string())
            })
            .collect();
        files.sort();
        let mut positions = String::new();
        for (p, end, cp) in self.positions() {
            positions.push_str(&format!(
                "partition {p}: broker log end {end}, checkpoint (next_offset, replay_from) {cp:?}\n"
            ));
        }
        format!("{summary}\n{positions}files:\n{}", files.join("\n"))
    }

    /// The whole guarantee, checked on what the instances left behind.
    async fn verify(&self, exp: &Expected) {
        self.verify_archive(exp).await;
        let merged = recompute(&self.data, None).await;
        assert_stats_match(&redis_stats(&self.redis, &self.prefix).await, &merged);
    }

    /// The guarantee of the Parquet archive (and of the model's lineage).
    async fn verify_archive(&self, exp: &Expected) {
        let ids = event_ids(&self.data).await;
        let unique: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len(), unique.len(), "duplicated events");
        assert_eq!(unique, ids_set(exp), "missing or unknown events");
        let dead: usize = sql(&self.data, "SELECT src_offset FROM dead_letters")
            .await
            .iter()
            .map(|b| b.num_rows())
            .sum();
        if dead != exp.invalid {
            panic!(
                "dead letters exactly once: {dead} rows, {} expected\n{}",
                exp.invalid,
                self.dead_letter_diagnosis().await
            );
        }

        let got = minute_stats(&self.data).await;
        let want = recompute(&self.data, Some(true)).await;
        let closed = closed_hours(&self.data, &self.cfg).await;
        assert_closed_stats_match(&got, &want, &closed);

        // Readers see only complete files: pyarrow reads every visible file,
        // and no in-progress file is left once the last owner stopped.
        let (ev, req, dl) = pyarrow_counts(&self.data);
        assert_eq!((ev as usize, dl as usize), (exp.valid.len(), exp.invalid));
        assert_eq!(req as i64, got.values().map(|v| v.0).sum::<i64>());
        let leftovers = walk(&self.state)
            .into_iter()
            .filter(|p| p.contains(".inprogress"))
            .count();
        assert_eq!(leftovers, 0, "in-progress files left behind");

        if self.reco {
            // The fleet's model holds every valid event exactly once.
            let path =
                pulse::checkpoint::reco_dir(&self.state, &self.cfg.kafka.topic).join("model.cbor");
            let bytes = std::fs::read(&path).unwrap();
            let t = pulse::factors::trainer::Trainer::restore(
                self.cfg.reco.model_config(),
                self.cfg.reco.seed,
                &bytes,
            )
            .unwrap();
            assert_eq!(
                t.model.events() as usize,
                exp.valid.len(),
                "events learned by the factor model; the model writers' lines:\n{}",
                self.model_writer_log()
            );
        }
    }

    /// Per (source partition, hour) of a local Delta table: the median
    /// number of files its commits added as new data, and of files in its
    /// latest snapshot (after compaction).
    fn files_per_partition_hour(&self, table: &str) -> (usize, usize) {
        let counts = pulse::sink::parquet::delta::file_counts(&self.data.join(table));
        let median = |mut v: Vec<usize>| {
            v.sort_unstable();
            v.get(v.len() / 2).copied().unwrap_or(0)
        };
        (
            median(counts.values().map(|c| c.0).collect()),
            median(counts.values().map(|c| c.1).collect()),
        )
    }

    /// Median size of the `events` files, MB.
    fn median_events_file_mb(&self) -> f64 {
        let mut sizes: Vec<u64> = walk(&self.data.join("events"))
            .iter()
            .filter(|p| p.ends_with(".parquet"))
            .map(|p| std::fs::metadata(p).unwrap().len())
            .collect();
        sizes.sort_unstable();
        sizes
            .get(sizes.len() / 2)
            .map_or(f64::NAN, |&s| s as f64 / 1e6)
    }
}

/// A partition, its log end offset, its checkpoint's (next_offset, replay_from).
type Position = (i32, i64, Option<(i64, i64)>);

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            if e.path().is_dir() {
                stack.push(e.path());
            } else {
                out.push(e.path().display().to_string());
            }
        }
    }
    out
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    wait_exit_or(child, limit).unwrap_or_else(|| panic!("pulse run did not exit within {limit:?}"))
}

/// The child's exit status, or `None` (and the child killed) after `limit`.
fn wait_exit_or(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_while_consuming() {
    let h = Harness::new(Some(&unique("chaos")), true);
    const N: u64 = 200_000;
    const KILLS: usize = 10;
    // ~1.4 h of event time, so hours close and their files are committed.
    let lines = input_lines_at(N, 21, 40.0);
    let exp = expected(&lines);
    let waves: Vec<&[Vec<u8>]> = lines.chunks(lines.len().div_ceil(KILLS)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut recover = Vec::new();
    let mut child = h.spawn("run-0", 4000);
    let mut sent = 0;
    for (i, wave) in waves.iter().enumerate() {
        let since = SystemTime::now();
        h.produce(wave, sent).await;
        sent += wave.len();
        recover.push(h.wait_checkpoint_after(since, &mut child));
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        child = h.spawn(&format!("run-{}", i + 1), 4000);
    }
    let t0 = Instant::now();
    let st = wait_exit(&mut child, Duration::from_secs(240));
    assert!(st.success(), "final drain: {st}\n{}", h.log("run-10"));
    h.drain_tails("run-10");
    h.verify(&exp).await;
    recover.sort();
    eprintln!(
        "chaos: N={N} kills={KILLS} time to first checkpoint after a restart: median {:?} max {:?}; final drain {:?}; median events file {:.2} MB",
        recover[recover.len() / 2],
        recover.last().unwrap(),
        t0.elapsed(),
        h.median_events_file_mb()
    );
    for table in ["events", "minute_stats"] {
        let (written, kept) = h.files_per_partition_hour(table);
        eprintln!(
            "chaos: {table} files per (partition, hour), median: {written} written, {kept} after compaction"
        );
    }
}

/// The chaos test with the tables on an S3-API server (moto): kill -9 at
/// random instants, restarts, and every record exactly once in the Delta
/// tables, read through `pulse query` and the `deltalake` Python package.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_with_tables_on_s3() {
    let h = Harness::on_s3(Some(&unique("chaos-s3")), false);
    const N: u64 = 100_000;
    const KILLS: usize = 5;
    // ~1.4 h of event time, so hours close and are compacted.
    let lines = input_lines_at(N, 27, 20.0);
    let exp = expected(&lines);
    let waves: Vec<&[Vec<u8>]> = lines.chunks(lines.len().div_ceil(KILLS)).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut recover = Vec::new();
    let mut child = h.spawn("run-0", 4000);
    let mut sent = 0;
    for (i, wave) in waves.iter().enumerate() {
        let since = SystemTime::now();
        h.produce(wave, sent).await;
        sent += wave.len();
        recover.push(h.wait_checkpoint_after(since, &mut child));
        std::thread::sleep(Duration::from_millis(rng.random_range(100..1500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        child = h.spawn(&format!("run-{}", i + 1), 4000);
    }
    let t0 = Instant::now();
    let last = format!("run-{KILLS}");
    let st = wait_exit(&mut child, Duration::from_secs(240));
    assert!(st.success(), "final drain: {st}\n{}", h.log(&last));
    h.drain_tails(&last);
    h.verify(&exp).await;
    // The tables are on S3 only: no Parquet file is left on the local disk.
    let local: Vec<String> = walk(h.dir.path())
        .into_iter()
        .filter(|p| p.ends_with(".parquet") || p.contains(".inprogress"))
        .collect();
    assert!(local.is_empty(), "{local:?}");
    assert!(
        !Path::new("s3:").exists(),
        "an s3:// data_dir was taken for a local path"
    );
    recover.sort();
    eprintln!(
        "chaos on S3: N={N} kills={KILLS} time to first checkpoint after a restart: median {:?} max {:?}; final drain {:?}",
        recover[recover.len() / 2],
        recover.last().unwrap(),
        t0.elapsed(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_two_instances_one_killed() {
    let h = Harness::new(None, false);
    let lines = input_lines_at(60_000, 22, 12.0);
    let exp = expected(&lines);
    let third = lines.len() / 3;
    let mut a = h.spawn("a", 30_000);
    h.produce(&lines[..third], 0).await;
    h.wait_checkpoint_after(SystemTime::UNIX_EPOCH, &mut a);
    let mut b = h.spawn("b", 15_000);
    // B joins: the group rebalances and B gets partitions of its own.
    let t0 = Instant::now();
    while !h.log("b").contains("partition owned") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "b never got a partition"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(h.log("a").contains("partition released after checkpoint"));
    h.produce(&lines[third..2 * third], third).await;
    std::thread::sleep(Duration::from_millis(1500));
    a.kill().unwrap();
    a.wait().unwrap();
    h.produce(&lines[2 * third..], 2 * third).await;
    let st = wait_exit(&mut b, Duration::from_secs(180));
    assert!(st.success(), "b: {st}\n{}", h.log("b"));
    h.drain_tails("b");
    // B took over everything A had.
    let owned_by_b = h.log("b").matches("partition owned").count();
    assert!(
        owned_by_b >= 4,
        "b owned {owned_by_b} partitions:\n{}",
        h.log("b")
    );
    h.verify(&exp).await;
}

/// A zombie: instance A is frozen (SIGSTOP) mid-stream past the group's
/// session timeout, B takes its partitions over and moves on, then A is
/// resumed with its stale state. A's writes for the lost partitions must be
/// refused (ownership epochs), A must rejoin the group, and the archive and
/// Redis must still be exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_frozen_past_its_session_is_fenced() {
    let h = Harness::new(None, true);
    let lines = input_lines_at(60_000, 24, 12.0);
    let exp = expected(&lines);
    let q = lines.len() / 4;
    let owned = |name: &str| h.log(name).matches("partition owned").count();
    let wait_log = |what: &str, cond: &dyn Fn() -> bool, limit: Duration| {
        let t0 = Instant::now();
        while !cond() {
            assert!(
                t0.elapsed() < limit,
                "{what} not within {limit:?}\n--- a ---\n{}\n--- b ---\n{}",
                h.log("a"),
                h.log("b")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        t0.elapsed()
    };
    let mut a = h.spawn("a", 0);
    h.produce(&lines[..q], 0).await;
    h.wait_checkpoint_after(SystemTime::UNIX_EPOCH, &mut a);
    let mut b = h.spawn("b", 0);
    wait_log(
        "b's first partitions",
        &|| owned("b") > 0,
        Duration::from_secs(60),
    );
    h.produce(&lines[q..2 * q], q).await;
    std::thread::sleep(Duration::from_millis(300));
    let a_wrote_model = model_writer(&h).await == Some(a.id());
    signal(&a, "STOP");
    let a_owned = owned("a");
    // B takes A's partitions once A's session (6 s) has run out.
    let takeover = wait_log(
        "b owning every partition",
        &|| owned("b") >= 4,
        Duration::from_secs(60),
    );
    h.produce(&lines[2 * q..3 * q], 2 * q).await;
    h.wait_checkpointed((3 * q) as i64, &mut b);
    signal(&a, "CONT");
    // A finds out at its first write for a lost partition, drops it
    // unwritten, and rejoins the group.
    wait_log(
        "a's writes refused",
        &|| h.log("a").contains("partition lost to another instance"),
        Duration::from_secs(60),
    );
    wait_log(
        "a rejoining",
        &|| owned("a") > a_owned,
        Duration::from_secs(90),
    );
    h.produce(&lines[3 * q..], 3 * q).await;
    h.wait_checkpointed(lines.len() as i64, &mut b);
    for (name, c) in [("a", &mut a), ("b", &mut b)] {
        sigterm(c);
        let st = wait_exit(c, Duration::from_secs(60));
        assert!(st.success(), "{name}: {st}\n{}", h.log(name));
    }
    h.drain_tails("b");
    let log_a = h.log("a");
    let refused = log_a.matches("write refused").count();
    let refused_redis = log_a.matches("redis refused a partial").count();
    assert!(refused >= 1, "no write of a was refused:\n{log_a}");
    if a_wrote_model {
        // A wrote the model when frozen: b took the lease, a stood down.
        assert!(
            log_a.contains("model writer lease lost"),
            "a kept writing the model:\n{log_a}"
        );
    }
    let refused_model = log_a.matches("model write refused").count();
    h.verify(&exp).await;
    eprintln!(
        "zombie: b took over {takeover:?} after the freeze; a's refused writes: {refused} \
         (checkpoints and files), {refused_redis} Redis partials, {refused_model} model writes \
         (a wrote the model: {a_wrote_model}); 0 duplicates"
    );
}

/// The process id holding the model writer lease.
async fn model_writer(h: &Harness) -> Option<u32> {
    let client = redis::Client::open(h.redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let v: Option<String> = redis::cmd("GET")
        .arg(format!("{}:reco:lease", h.prefix))
        .query_async(&mut conn)
        .await
        .ok()?;
    v?.split_whitespace().next()?.parse().ok()
}

/// `{p}:reco:meta` `version`: the events the published model learned.
async fn model_version(h: &Harness) -> Option<u64> {
    let client = redis::Client::open(h.redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let v: Option<String> = redis::cmd("HGET")
        .arg(format!("{}:reco:meta", h.prefix))
        .arg("version")
        .query_async(&mut conn)
        .await
        .ok()?;
    v?.parse().ok()
}

/// One model for a fleet of three: the instance writing the factor model is
/// SIGKILLed five times while events keep arriving; a standby takes the
/// lease over each time from the shared snapshot. The published model
/// version never goes back, and in the end it (and the snapshot) counts
/// every valid event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_of_three_one_model_writer_killed_five_times() {
    const KILLS: usize = 5;
    let h = Harness::new(None, true);
    let lines = input_lines_at(60_000, 25, 12.0);
    let exp = expected(&lines);
    let waves: Vec<&[Vec<u8>]> = lines.chunks(lines.len().div_ceil(KILLS + 1)).collect();
    let mut fleet: Vec<(String, Child)> = ["a", "b", "c"]
        .iter()
        .map(|n| (n.to_string(), h.spawn(n, 0)))
        .collect();
    // The published version, sampled all along: it must never go back.
    let versions = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u64>::new()));
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let (url, key) = (h.redis.clone(), format!("{}:reco:meta", h.prefix));
        let (versions, sampling) = (versions.clone(), sampling.clone());
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url.as_str())
                .unwrap()
                .get_connection()
                .unwrap();
            while sampling.load(std::sync::atomic::Ordering::Relaxed) {
                let v: Option<String> = redis::cmd("HGET")
                    .arg(&key)
                    .arg("version")
                    .query(&mut conn)
                    .unwrap_or(None);
                if let Some(v) = v.and_then(|v| v.parse().ok()) {
                    versions.lock().unwrap().push(v);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut failovers = Vec::new();
    let mut sent = 0;
    for (i, wave) in waves.iter().enumerate() {
        h.produce(wave, sent).await;
        sent += wave.len();
        if i == KILLS {
            break;
        }
        std::thread::sleep(Duration::from_millis(1500));
        // The writer: the lease holder, one of the fleet.
        let t0 = Instant::now();
        let writer = loop {
            if let Some(pid) = model_writer(&h).await
                && let Some(k) = fleet.iter().position(|(_, c)| c.id() == pid)
            {
                break k;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no model writer");
            std::thread::sleep(Duration::from_millis(100));
        };
        let (name, mut child) = fleet.remove(writer);
        child.kill().unwrap();
        child.wait().unwrap();
        let killed = Instant::now();
        let resumed = |n: &str| h.log(n).matches("model writer resumed").count();
        let before: Vec<usize> = fleet.iter().map(|(n, _)| resumed(n)).collect();
        // A standby takes over: lease taken, snapshot loaded, reading.
        loop {
            if fleet.iter().zip(&before).any(|((n, _), b)| resumed(n) > *b) {
                break;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(60),
                "no standby took the model over after {name} was killed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        failovers.push(killed.elapsed());
        let next = format!("{name}{}", i + 1);
        fleet.push((next.clone(), h.spawn(&next, 0)));
    }
    h.wait_checkpointed(lines.len() as i64, &mut fleet[0].1);
    for (name, c) in fleet.iter_mut() {
        sigterm(c);
        let st = wait_exit(c, Duration::from_secs(90));
        assert!(st.success(), "{name}: {st}\n{}", h.log(name));
    }
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    h.drain_tails("fleet");
    let versions = versions.lock().unwrap().clone();
    assert!(
        versions.windows(2).all(|w| w[0] <= w[1]),
        "the published model version went back: {versions:?}"
    );
    assert_eq!(
        model_version(&h).await,
        Some(exp.valid.len() as u64),
        "the published model learned every valid event once"
    );
    h.verify(&exp).await;
    failovers.sort();
    eprintln!(
        "fleet: model writer failovers (kill to the standby reading from the snapshot): \
         median {:?}, min {:?}, max {:?}; {} version samples, monotone",
        failovers[failovers.len() / 2],
        failovers[0],
        failovers.last().unwrap(),
        versions.len()
    );
}

/// When a log line was written (its leading timestamp, ANSI colours aside).
fn log_time(line: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let first = plain.split_whitespace().next()?;
    chrono::DateTime::parse_from_rfc3339(first)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

/// The process id holding partition `p` (its newest ownership epoch marker).
fn holder(h: &Harness, p: i32) -> Option<u32> {
    let dir = h
        .data
        .join("_pulse/epochs")
        .join(&h.cfg.kafka.topic)
        .join(format!("partition-{p:05}"));
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .max()?;
    std::fs::read_to_string(newest)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Where scoring stands in partition 0's checkpoint (its owner scores).
fn scored_upto(h: &Harness) -> Option<i64> {
    let cp = pulse::checkpoint::CheckpointStore::new(&h.data, &h.cfg.kafka.topic)
        .load(0)
        .ok()??;
    cp.scorer.map(|s| s.scored_upto)
}

/// Scoring fails over warm: two instances share the stream; the one that
/// scores (partition 0's owner) is SIGKILLed two minutes before a planted
/// error surge. The other one takes partition 0 over with the detectors'
/// stored state and flags both planted incidents within their first two
/// minutes (a cold detector would still be warming up for 30 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scorer_killed_before_an_incident_fails_over_warm() {
    use pulse::source::generator::{GenParams, Generator};
    let h = Harness::new(None, false);
    let p = GenParams {
        events: 72_000,
        seed: 5,
        rate_per_sec: 72_000.0 / 7_200.0,
        ..GenParams::default()
    };
    let mut g = Generator::new(p.clone());
    let incidents = g.incidents.clone();
    let lines = generated_lines(&mut g);
    // The base rate is constant before the first incident: the event two
    // minutes before it is at this index.
    let cut_ms = incidents[0].start_ms - 120_000;
    let cut = ((cut_ms - p.start_ms) as f64 / 1000.0 * p.rate_per_sec) as usize;
    let exp = expected(&lines);
    let mut a = h.spawn("a", 0);
    let mut b = h.spawn("b", 0);
    h.produce(&lines[..cut], 0).await;
    h.wait_checkpointed(cut as i64, &mut a);
    // Scoring has caught up with the data so far (the watermark trails it).
    h.wait_until(&mut b, |_| match scored_upto(&h) {
        Some(s) if s >= cut_ms - 5 * 60_000 => Ok(()),
        s => Err(format!(
            "scoring stands at {s:?}, wants {}",
            cut_ms - 5 * 60_000
        )),
    });
    let scorer = holder(&h, 0).expect("partition 0 has an owner");
    let (mut victim, victim_name, mut survivor, survivor_name) = if scorer == a.id() {
        (a, "a", b, "b")
    } else {
        assert_eq!(scorer, b.id(), "partition 0 held by neither instance");
        (b, "b", a, "a")
    };
    victim.kill().unwrap();
    victim.wait().unwrap();
    let killed_at = chrono::Utc::now();
    h.produce(&lines[cut..], cut).await;
    h.wait_checkpointed(lines.len() as i64, &mut survivor);
    // The survivor owns partition 0 and scored past the second incident.
    let end = incidents[1].start_ms + 10 * 60_000;
    h.wait_until(&mut survivor, |_| match scored_upto(&h) {
        Some(s) if s >= end => Ok(()),
        s => Err(format!("scoring stands at {s:?}, wants {end}")),
    });
    sigterm(&survivor);
    let st = wait_exit(&mut survivor, Duration::from_secs(60));
    assert!(
        st.success(),
        "{survivor_name}: {st}\n{}",
        h.log(survivor_name)
    );
    // Alerts, from Redis's alerts stream.
    let client = redis::Client::open(h.redis.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(format!("{}:alerts", h.prefix))
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    let starts: Vec<(String, i64)> = entries
        .ids
        .iter()
        .filter_map(|e| {
            let json: String = e.get("json")?;
            let v: serde_json::Value = serde_json::from_str(&json).ok()?;
            (v["kind"] == "start").then(|| {
                (
                    v["service"].as_str().unwrap_or_default().to_string(),
                    v["window_start_ms"].as_i64().unwrap_or_default(),
                )
            })
        })
        .collect();
    // Around the move nothing else is flagged: the new scorer's first
    // windows are merged over every instance's partials, not the stale rows
    // the killed one stored (they look like a traffic drop).
    let early: Vec<&(String, i64)> = starts
        .iter()
        .filter(|(_, w)| *w >= cut_ms - 5 * 60_000 && *w < incidents[0].start_ms)
        .collect();
    assert!(
        early.is_empty(),
        "false alarms around the scorer's move (cut at {cut_ms}): {early:?}"
    );
    for inc in &incidents {
        let hit = starts.iter().find(|(svc, w)| {
            svc == inc.service && *w >= inc.start_ms && *w <= inc.start_ms + 120_000
        });
        let delay = hit.map(|(_, w)| (w - inc.start_ms) / 60_000);
        assert!(
            hit.is_some(),
            "{} on {} not flagged within 2 minutes after the scorer ({victim_name}) was killed: {starts:?}",
            inc.kind,
            inc.service
        );
        eprintln!(
            "scorer failover: {} on {} flagged {} minute(s) after its start",
            inc.kind,
            inc.service,
            delay.unwrap_or_default()
        );
    }
    let log = h.log(survivor_name);
    let resumed = log
        .lines()
        .find(|l| l.contains("scoring resumed from the stored detector state"));
    assert!(
        resumed.is_some(),
        "{survivor_name} did not restore the detectors:\n{log}"
    );
    if let Some(at) = resumed.and_then(log_time) {
        eprintln!(
            "scorer failover: {} ms from the kill to scoring resumed on {survivor_name}",
            (at - killed_at).num_milliseconds()
        );
    }
    h.drain_tails(survivor_name);
    h.verify(&exp).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_and_restart_mid_stream() {
    let h = Harness::new(None, true);
    let mut lines = input_lines_at(60_000, 23, 12.0);
    // Every partition's last records before the stop are dead letters: the
    // model's offsets must move past them too, or the restart replays.
    let mut half = lines.len() / 2;
    for i in 0..64 {
        lines.insert(half, format!("not an event {i}").into_bytes());
    }
    half += 64;
    let exp = expected(&lines);
    let mut c = h.spawn("first", 30_000);
    h.produce(&lines[..half], 0).await;
    h.wait_checkpointed(half as i64, &mut c);
    let t0 = Instant::now();
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(30));
    let stop = t0.elapsed();
    assert!(st.success(), "SIGTERM exit: {st}\n{}", h.log("first"));
    h.produce(&lines[half..], half).await;
    let since = SystemTime::now();
    let mut c = h.spawn("second", 4000);
    let resumed = h.wait_checkpoint_after(since, &mut c);
    let st = wait_exit(&mut c, Duration::from_secs(120));
    assert!(st.success(), "{st}\n{}", h.log("second"));
    // A graceful stop commits its open files: the restart replays nothing.
    assert!(
        !h.log("second")
            .contains("replayed rows already in committed files"),
        "the restart replayed committed rows\n--- first (stopped) ---\n{}\n--- second ---\n{}",
        h.log("first"),
        h.log("second")
    );
    h.drain_tails("second");
    h.verify(&exp).await;
    eprintln!("graceful: stop took {stop:?}, restart processing again after {resumed:?}");
}

/// An S3-API server (moto) of the test's own, to freeze under a running pipeline.
struct OwnS3 {
    child: Child,
    port: u16,
}

impl OwnS3 {
    fn start(dir: &Path) -> Self {
        let port = free_port();
        let log = std::fs::File::create(dir.join("moto.log")).unwrap();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("moto_server (scripts/services.sh installs it)");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        OwnS3 { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnS3 {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pulse query SQL` on the harness's tables, against the S3 server at
/// `endpoint`: its CSV rows.
fn query_at(h: &Harness, endpoint: &str, sql: &str) -> Vec<Vec<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_pulse"))
        .arg("query")
        .arg("--data-dir")
        .arg(&h.data)
        .args(["--format", "csv"])
        .arg(sql)
        .env("AWS_ENDPOINT_URL", endpoint)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pulse query: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect()
}

/// The object store freezes for 40 s mid-stream: pulse waits (its
/// uploads and log commits retry), stays up, and once the store answers it
/// catches up, every record exactly once in the tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_frozen_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = OwnS3::start(dir.path());
    let mut h = Harness::new_at(None, false, true, Some(&s3.url()));
    h.env.push(("AWS_ENDPOINT_URL".into(), s3.url()));
    h.env
        .push(("PULSE_PARQUET__COMMIT_SECS".into(), "2".into()));
    let lines = input_lines_at(30_000, 31, 8.0);
    let exp = expected(&lines);
    let third = lines.len() / 3;
    let mut c = h.spawn("run", 120_000);
    h.produce(&lines[..third], 0).await;
    h.wait_checkpointed(third as i64, &mut c);
    signal(&s3.child, "STOP");
    let frozen = Instant::now();
    h.produce(&lines[third..2 * third], third).await;
    h.stays_up(&mut c, "run", Duration::from_secs(40));
    signal(&s3.child, "CONT");
    let thawed = Instant::now();
    h.produce(&lines[2 * third..], 2 * third).await;
    h.wait_checkpointed(lines.len() as i64, &mut c);
    let caught_up = thawed.elapsed();
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(60));
    assert!(st.success(), "{st}\n{}", h.log("run"));
    let ev = query_at(
        &h,
        &s3.url(),
        "SELECT count(*), count(DISTINCT event_id) FROM events",
    );
    let want = exp.valid.len().to_string();
    assert_eq!(ev[0], vec![want.clone(), want], "events exactly once");
    let dl = query_at(&h, &s3.url(), "SELECT count(*) FROM dead_letters");
    assert_eq!(
        dl[0][0],
        exp.invalid.to_string(),
        "dead letters exactly once"
    );
    eprintln!(
        "object store frozen {:?}: every record checkpointed {caught_up:?} after the thaw",
        thawed - frozen
    );
}

/// A redis-server of the test's own (append-only file, fsync always), to
/// stop, freeze and restart under a running pipeline.
struct OwnRedis {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl OwnRedis {
    fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let mut r = OwnRedis {
            dir: dir.to_path_buf(),
            port: free_port(),
            child: None,
        };
        r.launch();
        r
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server on its port and directory and waits for its PONG.
    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed by scripts/services.sh");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            use std::io::{Read, Write};
            let pong = std::net::TcpStream::connect(("127.0.0.1", self.port))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(1)))?;
                    s.write_all(b"PING\r\n")?;
                    let mut b = [0u8; 7];
                    s.read_exact(&mut b)?;
                    Ok(&b == b"+PONG\r\n")
                })
                .unwrap_or(false);
            if pong {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Shuts the server down (its append-only file keeps the data).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, "TERM");
            let st = wait_exit(&mut c, Duration::from_secs(20));
            assert!(st.success(), "redis-server stop: {st}");
        }
    }

    /// Deletes the data the server would load at its next start.
    fn wipe(&self) {
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir_all(&self.dir).unwrap();
    }

    fn signal(&self, sig: &str) {
        signal(self.child.as_ref().expect("running"), sig);
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Outage {
    /// Shut down, then started again with its data.
    Restart,
    /// SIGSTOP, then SIGCONT: connections hang rather than fail.
    Freeze,
    /// Shut down, then started again empty (its data lost).
    RestartEmpty,
}

/// The readiness answer and one gauge of `/metrics`.
async fn readiness(addr: std::net::SocketAddr) -> (u16, String) {
    http_get(addr, "/readyz").await
}

async fn gauge(addr: std::net::SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Redis goes away for 35 s in the middle of a Kafka run: pulse keeps
/// consuming and committing Parquet, says it is degraded, catches up when
/// Redis returns, and stops cleanly; every event is exactly once in Parquet
/// and Redis equals the recomputation (or, after losing its data, holds
/// what pulse re-published).
async fn redis_outage(kind: Outage) {
    let mut h = Harness::new(None, true);
    let mut r = OwnRedis::start(&h.dir.path().join("redis"));
    h.redis = r.url();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    h.listen = Some(addr.to_string());
    let lines = input_lines_at(60_000, 29, 8.0);
    let exp = expected(&lines);
    let third = lines.len() / 3;
    let mut c = h.spawn("run", 120_000);
    h.produce(&lines[..third], 0).await;
    h.wait_checkpointed(third as i64, &mut c);
    let committed_before = event_ids(&h.data).await.len();

    let outage = Instant::now();
    match kind {
        Outage::Restart | Outage::RestartEmpty => r.stop(),
        Outage::Freeze => r.signal("STOP"),
    }
    h.produce(&lines[third..2 * third], third).await;
    h.wait_checkpointed(2 * third as i64, &mut c);
    let committed_during = event_ids(&h.data).await.len();
    assert!(
        committed_during > committed_before,
        "Parquet commits go on without Redis: {committed_before} -> {committed_during}"
    );
    let (code, body) = readiness(addr).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("redis degraded for"), "{body}");
    let pending = gauge(addr, "pulse_redis_pending_writes")
        .await
        .unwrap_or(0.0);
    assert!(pending > 0.0, "writes wait for Redis: {pending}");
    h.stays_up(
        &mut c,
        "run",
        Duration::from_secs(35).saturating_sub(outage.elapsed()),
    );

    match kind {
        Outage::Restart => r.launch(),
        Outage::RestartEmpty => {
            r.wipe();
            r.launch();
        }
        Outage::Freeze => r.signal("CONT"),
    }
    let back = Instant::now();
    // The last third flows while Redis catches up.
    h.produce(&lines[2 * third..], 2 * third).await;
    let caught_up = loop {
        let (code, _) = readiness(addr).await;
        if code == 200 {
            break back.elapsed();
        }
        assert!(
            c.try_wait().unwrap().is_none(),
            "pulse stayed up\n{}",
            h.log("run")
        );
        assert!(
            back.elapsed() < Duration::from_secs(90),
            "Redis never caught up\n{}",
            h.log("run")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    h.wait_checkpointed(lines.len() as i64, &mut c);
    let peak = gauge(addr, "pulse_redis_pending_writes_peak")
        .await
        .unwrap_or(0.0);
    // Let the live values of the last batches reach Redis, then stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(60));
    assert!(st.success(), "SIGTERM exit: {st}\n{}", h.log("run"));
    let log = h.log("run");
    assert!(
        !log.contains("writes not applied") && !log.contains("records not written"),
        "every Redis write was applied\n{log}"
    );
    // The model writer paused while its lease went unconfirmed and went
    // on with its model once Redis answered: nobody else had taken over.
    assert!(
        log.contains("training resumes") && !log.contains("model writer lease lost"),
        "the model writer resumes its term\n{}",
        h.model_writer_log()
    );
    h.drain_tails("run");
    eprintln!("redis {kind:?}: exact again {caught_up:?} after its return, pending peak {peak}");
    if kind != Outage::RestartEmpty {
        h.verify(&exp).await;
        return;
    }
    h.verify_archive(&exp).await;
    assert!(log.contains("re-publishing open windows"), "{log}");
    assert!(log.contains("re-publishing the factor model"), "{log}");
    // What Redis holds is exact, and it holds every minute from the
    // restart on (the open windows re-published, the later ones written);
    // minutes closed before the loss stay in Parquet only.
    let merged = recompute(&h.data, None).await;
    let in_redis = redis_stats(&h.redis, &h.prefix).await;
    let mut ts: Vec<i64> = lines[2 * third..]
        .iter()
        .filter_map(|l| serde_json::from_slice::<serde_json::Value>(l).ok()?["ts"].as_i64())
        .collect();
    ts.sort_unstable();
    let from = ts[ts.len() / 10].div_euclid(60_000) * 60_000 - 5 * 60_000;
    let mut covered = 0;
    for (k, w) in &merged {
        match in_redis.get(k) {
            Some(g) => {
                assert_eq!((g.0, g.1, g.2), (w.0, w.1, w.2), "counts of {k:?}");
            }
            None => assert!(k.0 < from, "Redis lacks {k:?}, a minute after its restart"),
        }
        covered += usize::from(k.0 >= from);
    }
    assert!(covered > 20, "minutes after the restart: {covered}");
    // The factor model is whole again: every user and item it holds.
    let path = pulse::checkpoint::reco_dir(&h.data, &h.cfg.kafka.topic).join("model.cbor");
    let t = pulse::factors::trainer::Trainer::restore(
        h.cfg.reco.model_config(),
        h.cfg.reco.seed,
        &std::fs::read(&path).unwrap(),
    )
    .unwrap();
    let client = redis::Client::open(h.redis.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let users: usize = redis::AsyncCommands::hlen(&mut con, format!("{}:reco:user", h.prefix))
        .await
        .unwrap();
    let items: usize = redis::AsyncCommands::hlen(&mut con, format!("{}:reco:item", h.prefix))
        .await
        .unwrap();
    assert_eq!(
        users,
        t.model.implicit.n_users(),
        "user records re-published"
    );
    assert_eq!(
        items,
        t.model.implicit.n_items(),
        "item records re-published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_data_mid_stream() {
    redis_outage(Outage::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_frozen_mid_stream() {
    redis_outage(Outage::Freeze).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_mid_stream() {
    redis_outage(Outage::RestartEmpty).await;
}

/// A tansu broker of the test's own (memory storage), to freeze.
struct OwnBroker {
    child: Child,
    addr: String,
}

impl OwnBroker {
    fn start() -> Self {
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(service("PULSE_TEST_TANSU"))
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu is installed by scripts/services.sh");
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "tansu did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnBroker {
            child,
            addr: format!("127.0.0.1:{port}"),
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker frozen (SIGSTOP) for 60 s mid-stream: pulse rides it out
/// without a restart, takes the rest once it thaws, stops cleanly, and every
/// event is exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_frozen_for_a_minute_mid_stream() {
    let mut h = Harness::new(None, false);
    let broker = OwnBroker::start();
    h.cfg.kafka.brokers = broker.addr.clone();
    let lines = input_lines_at(40_000, 31, 10.0);
    let exp = expected(&lines);
    let half = lines.len() / 2;
    let mut c = h.spawn("run", 120_000);
    h.produce(&lines[..half], 0).await;
    h.wait_checkpointed(half as i64, &mut c);
    signal(&broker.child, "STOP");
    h.stays_up(&mut c, "run", Duration::from_secs(60));
    signal(&broker.child, "CONT");
    let thawed = Instant::now();
    h.produce(&lines[half..], half).await;
    h.wait_checkpointed(lines.len() as i64, &mut c);
    let resumed = thawed.elapsed();
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(60));
    assert!(st.success(), "SIGTERM exit: {st}\n{}", h.log("run"));
    h.drain_tails("run");
    h.verify(&exp).await;
    eprintln!("broker frozen 60 s: every record checkpointed {resumed:?} after the thaw");
}

/// Waits until `{p}:reco:meta` (`meta_key`) shows `version` served with
/// `pinned` ("1": a rolled-back version, "0": the live model); the wait.
async fn wait_served(
    con: &mut redis::aio::MultiplexedConnection,
    meta_key: &str,
    version: u64,
    pinned: &str,
    log: impl Fn() -> String,
) -> Duration {
    use redis::AsyncCommands;
    let t0 = Instant::now();
    loop {
        let m: std::collections::HashMap<String, String> = con.hgetall(meta_key).await.unwrap();
        if m.get("version") == Some(&version.to_string())
            && m.get("pinned").map(String::as_str) == Some(pinned)
        {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "version {version} (pinned {pinned}) not served: {m:?}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Model versions and rollback, against real tansu and redis-server: the
/// writer records a version per `reco.version_ms` with its quality
/// figures; `pulse model rollback --to V` makes Redis serve exactly that
/// version's model (users learned later are gone from it, and serving's
/// catalogue follows) while the live model goes on learning unpublished;
/// `--to latest` serves the live model again, with every event learned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_versions_are_recorded_and_rolled_back() {
    use redis::AsyncCommands;
    let mut h = Harness::new(None, true);
    h.env.push(("PULSE_RECO__VERSION_MS".into(), "500".into()));
    h.env
        .push(("PULSE_RECO__KEEP_VERSIONS".into(), "1000".into()));
    let lines = input_lines_at(24_000, 31, 10.0);
    let exp = expected(&lines);
    let (a, b) = (lines.len() / 3, 2 * lines.len() / 3);
    let valid_upto = |n: usize| expected(&lines[..n]).valid.len() as u64;
    let versions = pulse::factors::versions::Versions::new(
        &pulse::checkpoint::reco_dir(&h.data, &h.cfg.kafka.topic),
        24,
    );
    let wait_version = |c: &mut Child, v: u64| {
        h.wait_until(c, |_| {
            let have: Vec<u64> = versions.list().unwrap().iter().map(|x| x.version).collect();
            if have.contains(&v) {
                Ok(())
            } else {
                Err(format!("no model version {v} recorded: {have:?}"))
            }
        });
    };
    let client = redis::Client::open(h.redis.as_str()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let meta_key = format!("{}:reco:meta", h.prefix);
    let user_key = format!("{}:reco:user", h.prefix);

    let mut c = h.spawn("run", 120_000);
    h.produce(&lines[..a], 0).await;
    let v1 = valid_upto(a);
    wait_version(&mut c, v1);
    h.produce(&lines[a..b], a).await;
    let v2 = valid_upto(b);
    wait_version(&mut c, v2);

    let listed = h.model_cmd(&["list"]);
    for v in [v1, v2] {
        assert!(
            listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(&v.to_string())),
            "version {v} listed\n{listed}"
        );
    }
    let rec = versions.list().unwrap();
    let r2 = rec.iter().find(|x| x.version == v2).unwrap();
    // The live quality figures at the time (a sample every 100 ms: few here).
    assert!(r2.quality_samples > 0, "{r2:?}");
    assert!((0.0..=1.0).contains(&r2.recall_at_10), "{r2:?}");
    assert!(
        r2.users > 0 && r2.items > 0 && !r2.offsets.is_empty(),
        "{r2:?}"
    );

    // Roll back to v1: Redis serves exactly v1's model.
    let pinned_model = pulse::factors::trainer::Trainer::restore(
        h.cfg.reco.model_config(),
        h.cfg.reco.seed,
        &versions.load(v1).unwrap(),
    )
    .unwrap();
    let live_users: Vec<u64> = con.hkeys(&user_key).await.unwrap();
    let mut seen = Vec::new();
    let later: Vec<u64> = live_users
        .iter()
        .copied()
        .filter(|u| {
            pinned_model
                .model
                .implicit
                .user_bytes(*u, &mut seen)
                .is_none()
        })
        .collect();
    assert!(!later.is_empty(), "users first seen after version {v1}");
    let out = h.model_cmd(&["rollback", "--to", &v1.to_string()]);
    assert!(out.contains(&format!("pinned version {v1}")), "{out}");
    let rolled_back_in = wait_served(&mut con, &meta_key, v1, "1", || h.log("run")).await;
    let served: usize = con.hlen(&user_key).await.unwrap();
    assert_eq!(
        served,
        pinned_model.model.implicit.n_users(),
        "users served after the rollback"
    );
    for u in live_users.iter().take(50) {
        let got: Option<Vec<u8>> = con.hget(&user_key, u).await.unwrap();
        let want = pinned_model
            .model
            .implicit
            .user_bytes(*u, &mut seen)
            .map(|(r, _)| r);
        assert_eq!(got, want, "user {u}'s record is version {v1}'s");
    }
    for u in &later {
        let got: Option<Vec<u8>> = con.hget(&user_key, u).await.unwrap();
        assert!(
            got.is_none(),
            "user {u}, learned after version {v1}, is not served"
        );
    }
    let state = pulse::serve::ServeState::new(
        Some(
            redis::aio::ConnectionManager::new(client.clone())
                .await
                .unwrap(),
        ),
        &h.prefix,
        None,
    );
    state.refresh_items().await.unwrap();
    assert_eq!(
        state.catalogue().version,
        Some(v1),
        "serving's catalogue follows"
    );
    assert!(
        h.model_cmd(&["list"])
            .contains(&format!("serving: pinned version {v1}"))
    );

    // While pinned, the live model learns but is not published.
    h.produce(&lines[b..], b).await;
    h.wait_checkpointed(lines.len() as i64, &mut c);
    let all = exp.valid.len() as u64;
    wait_version(&mut c, all);
    let m: std::collections::HashMap<String, String> = con.hgetall(&meta_key).await.unwrap();
    assert_eq!(
        m["version"],
        v1.to_string(),
        "the pinned version stays served"
    );

    // Back to the live model: every event learned, the later users served.
    let out = h.model_cmd(&["rollback", "--to", "latest"]);
    assert!(out.contains("unpinned"), "{out}");
    let back_in = wait_served(&mut con, &meta_key, all, "0", || h.log("run")).await;
    for u in &later {
        let got: Option<Vec<u8>> = con.hget(&user_key, u).await.unwrap();
        assert!(got.is_some(), "user {u} is served again");
    }
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(60));
    assert!(st.success(), "SIGTERM exit: {st}\n{}", h.log("run"));
    h.drain_tails("run");
    h.verify(&exp).await;
    eprintln!(
        "model versions: {} recorded; rollback served in {rolled_back_in:?}, the live model again in {back_in:?}",
        versions.list().unwrap().len()
    );
}

/// Rows are queryable while pulse runs, within `parquet.commit_secs` of
/// their arrival (events) or of their window becoming final (minute
/// rows), long before their hour closes; a reader polling the Delta tables
/// meanwhile never sees a row twice; and the stop leaves the tables exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_are_queryable_within_commit_secs_while_pulse_runs() {
    let mut h = Harness::new(None, false);
    h.env
        .push(("PULSE_PARQUET__COMMIT_SECS".into(), "2".into()));
    // Half an hour of event time: no hour closes while pulse runs.
    let lines = input_lines_at(20_000, 41, 12.0);
    let exp = expected(&lines);
    let mut c = h.spawn("fresh", 60_000);
    let half = lines.len() / 2;
    let mut seen = Vec::new();
    for (from, to) in [(0, half), (half, lines.len())] {
        h.produce(&lines[from..to], from).await;
        let want = expected(&lines[..to]).valid.len();
        let t0 = Instant::now();
        loop {
            let ids = event_ids(&h.data).await;
            let unique: BTreeSet<u64> = ids.iter().copied().collect();
            assert_eq!(ids.len(), unique.len(), "a reader saw a row twice");
            if ids.len() >= want {
                assert_eq!(ids.len(), want, "rows not produced yet");
                break;
            }
            if let Ok(Some(st)) = c.try_wait() {
                panic!("pulse exited: {st}\n{}", h.log("fresh"));
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "{} of {want} events queryable after 60 s\n{}",
                ids.len(),
                h.log("fresh")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        seen.push(t0.elapsed());
    }
    // Final minute rows are queryable too, though their hour is still open.
    let stats = minute_stats(&h.data).await;
    assert!(!stats.is_empty(), "no minute rows while pulse runs");
    assert!(
        c.try_wait().unwrap().is_none(),
        "pulse is still running: nothing was committed by its stop"
    );
    sigterm(&c);
    let st = wait_exit(&mut c, Duration::from_secs(30));
    assert!(st.success(), "{st}\n{}", h.log("fresh"));
    h.verify(&exp).await;
    eprintln!("freshness: every produced event queryable {seen:?} after its produce call returned");
}
