//! Typed configuration. Consumes a TOML file (or the embedded defaults in
//! `config/pulse.toml`) plus `PULSE_<SECTION>__<KEY>` environment overrides;
//! produces a validated [`Config`]. Unknown keys are errors, never ignored.
//! Secrets are read from the environment only (see [`Secrets`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The defaults shipped in `config/pulse.toml`, embedded so `pulse demo` needs no file.
pub const DEFAULT_TOML: &str = include_str!("../config/pulse.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid environment override {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config value: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub kafka: KafkaConfig,
    pub pipeline: PipelineConfig,
    pub validation: ValidationConfig,
    pub window: WindowConfig,
    pub redis: RedisConfig,
    pub parquet: ParquetConfig,
    pub detect: DetectConfig,
    pub reco: RecoSection,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecoSection {
    /// Train the online recommendation factors from the event stream.
    pub enabled: bool,
    /// Publish changed factors to Redis at most this often, ms.
    pub flush_ms: u64,
    /// Seed of the model's initialisation and negative sampling.
    pub seed: u64,
    /// Latent dimension of the implicit factors.
    pub dim: usize,
    /// Negatives sampled (by popularity) per event.
    pub negatives: usize,
    /// Extra steps on the user's recent items per event.
    pub replay: usize,
    /// Implicit feedback weight per event type.
    pub weight_view: f32,
    pub weight_cart: f32,
    pub weight_purchase: f32,
    /// Half-life of the trending model, seconds of event time.
    pub trending_half_life_secs: u64,
    /// Kafka: how often the model and its offsets are snapshotted, ms.
    pub snapshot_ms: u64,
    /// Kafka: how long the model writer's lease lasts unless renewed, ms
    /// (a standby takes over this long after the writer died, at most).
    pub lease_ms: u64,
    /// Kafka: how often the model writer records a version of the model
    /// (`pulse model list`), ms; also at its stop.
    pub version_ms: u64,
    /// Model versions kept (the pinned one is kept besides).
    pub keep_versions: usize,
    /// Most users each model holds (least recently seen forgotten first).
    pub max_users: usize,
    /// Most items each model holds (the same way).
    pub max_items: usize,
}

impl RecoSection {
    /// The model's hyper-parameters: these keys over the model's defaults.
    pub fn model_config(&self) -> crate::factors::RecoConfig {
        crate::factors::RecoConfig {
            dim: self.dim,
            negatives: self.negatives,
            replay: self.replay,
            w_view: self.weight_view,
            w_cart: self.weight_cart,
            w_purchase: self.weight_purchase,
            half_life_ms: (self.trending_half_life_secs * 1000) as i64,
            max_users: self.max_users,
            max_items: self.max_items,
            ..crate::factors::RecoConfig::default()
        }
    }
}

impl Default for RecoSection {
    fn default() -> Self {
        RecoSection {
            enabled: true,
            flush_ms: 1000,
            seed: 7,
            dim: 32,
            negatives: 8,
            replay: 4,
            weight_view: 1.0,
            weight_cart: 3.0,
            weight_purchase: 5.0,
            trending_half_life_secs: 3600,
            snapshot_ms: 10000,
            lease_ms: 10000,
            version_ms: 3_600_000,
            keep_versions: 24,
            max_users: 250_000,
            max_items: 200_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectConfig {
    /// Score in [0,1] at or above which a point is flagged.
    pub threshold: f64,
    /// Windows seen before any point is scored.
    pub warmup_windows: usize,
    /// Windows in the sliding robust statistics.
    pub history_windows: usize,
    /// Windows after a flag during which the same series raises no new flag.
    pub suppress_windows: usize,
    /// Quiet windows after which an incident is declared recovered.
    pub recover_windows: u32,
    /// Optional webhook (http://) that receives each alert as a JSON POST.
    pub webhook_url: String,
    /// Optional Kafka topic that receives each alert as a JSON message.
    pub alerts_topic: String,
    /// Compare every service's hourly distributions of latency, event types
    /// and status classes with a reference.
    pub drift: bool,
    /// "rolling" (the pooled `drift_reference_hours` before the hour) or
    /// "previous_day" (the same hour a day earlier).
    pub drift_reference: String,
    pub drift_reference_hours: u32,
    /// A (service, feature) drifts at or above this PSI...
    pub drift_psi_threshold: f64,
    /// ...or this two-sample KS statistic.
    pub drift_ks_threshold: f64,
    /// Hours (current and reference) with fewer requests are not compared.
    pub drift_min_requests: u64,
}

impl Default for DetectConfig {
    fn default() -> Self {
        DetectConfig {
            threshold: 0.8,
            warmup_windows: 30,
            history_windows: 120,
            suppress_windows: 3,
            recover_windows: 5,
            webhook_url: String::new(),
            alerts_topic: String::new(),
            drift: true,
            drift_reference: "rolling".into(),
            drift_reference_hours: 24,
            drift_psi_threshold: 0.2,
            drift_ks_threshold: 0.15,
            drift_min_requests: 500,
        }
    }
}

impl DetectConfig {
    /// The drift settings; `None` when drift detection is off.
    pub fn drift_config(&self) -> Option<crate::detect::drift::DriftConfig> {
        use crate::detect::drift::{DriftConfig, Reference};
        self.drift.then(|| DriftConfig {
            reference: if self.drift_reference == "previous_day" {
                Reference::PreviousDay
            } else {
                Reference::Rolling(self.drift_reference_hours.max(1))
            },
            psi_threshold: self.drift_psi_threshold,
            ks_threshold: self.drift_ks_threshold,
            min_requests: self.drift_min_requests,
        })
    }

    /// The detector parameters for per-minute series.
    pub fn detector(&self) -> crate::detect::DetectorConfig {
        crate::detect::DetectorConfig {
            threshold: self.threshold,
            warmup: self.warmup_windows,
            window: self.history_windows,
            suppress: self.suppress_windows,
            ..crate::detect::DetectorConfig::default()
        }
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    pub brokers: String,
    /// Topic the events are read from.
    pub topic: String,
    /// Consumer group.
    pub group: String,
    /// librdkafka properties passed through verbatim.
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Records per decoded batch.
    pub batch_size: usize,
    /// Longest wait for a partial Kafka batch, ms.
    pub batch_timeout_ms: u64,
    /// Bounded channel capacity between stages, in batches.
    pub channel_capacity: usize,
    /// Exit after this long without Kafka messages (0 = never).
    pub idle_exit_ms: u64,
    /// Kafka: how often each owned partition is checkpointed, ms.
    pub checkpoint_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Fields that must be present and non-null.
    pub required: Vec<String>,
    /// Accepted event types.
    pub event_types: Vec<String>,
    pub status_min: u16,
    pub status_max: u16,
    pub latency_min_ms: f64,
    pub latency_max_ms: f64,
    pub rating_min: f32,
    pub rating_max: f32,
    pub price_min: f64,
    /// Longest accepted payload in bytes.
    pub max_payload_bytes: usize,
    /// Accepted event-time range, epoch ms.
    pub ts_min_ms: i64,
    pub ts_max_ms: i64,
    /// Distinct services each source partition admits (in order of first
    /// appearance); events of further services are dead letters
    /// (`cardinality`). 0 = no cap.
    pub max_services: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Tumbling window size, seconds.
    pub size_secs: u64,
    /// Watermark bound, ms.
    pub out_of_orderness_ms: u64,
    /// Allowed lateness behind the watermark, ms.
    pub allowed_lateness_ms: u64,
    /// Top items kept per window.
    pub top_items: usize,
    /// A Kafka partition with no record for this long (processing time, ms)
    /// stops holding the watermark back.
    pub idle_partition_ms: u64,
    /// How often windows still open are written to the store as live values
    /// (processing time, ms; 0 = only when they close).
    pub live_emit_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL; empty disables the Redis sink.
    pub url: String,
    /// Key prefix.
    pub prefix: String,
    /// Retention of per-minute keys, seconds.
    pub ttl_secs: u64,
    /// Writes held while Redis is unreachable or slow (one per key: later
    /// writes to a key replace earlier ones); past this, consumption pauses.
    pub max_pending: usize,
    /// A Redis round trip taking longer than this marks Redis degraded (ms).
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ParquetConfig {
    /// Root of the tables: `<data_dir>/<table>/dt=YYYY-MM-DD/hour=HH/`; a
    /// local directory or `s3://bucket/prefix` (credentials from the environment).
    pub data_dir: PathBuf,
    /// pulse's own state (checkpoints, ownership epochs, factor model
    /// snapshots and versions, files being written): empty for
    /// `<data_dir>/_pulse`; required, and local, when `data_dir` is on S3.
    pub state_dir: PathBuf,
    /// `delta`: each table is a Delta Lake table whose log says which files
    /// are in it (fresh commits, atomic compaction); `hive`: plain
    /// Hive-partitioned Parquet, where every file in the directories is data.
    pub format: TableFormat,
    /// An open file is committed at the latest this many seconds after its
    /// first row, and final minute rows are written at the latest this long
    /// after they became final: what an analyst waits for fresh rows.
    pub commit_secs: u64,
    /// Delta: once an hour can no longer change, its files are rewritten
    /// into one per (table, source partition, hour) in one atomic commit.
    pub compact: bool,
    /// Delta: files no longer in the table (compacted away, or written by
    /// an instance that crashed before logging them) are deleted this many
    /// hours after they left it; readers of older snapshots need them until then.
    pub vacuum_hours: u64,
    /// Rows per row group.
    pub row_group_rows: usize,
    /// Roll a file at this many rows.
    pub max_file_rows: usize,
    /// Most bytes the open files of one table buffer in unwritten row groups.
    pub buffer_mb: usize,
    /// zstd level.
    pub zstd_level: i32,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            topic: "events".into(),
            group: "pulse".into(),
            properties: BTreeMap::new(),
        }
    }
}

impl Default for PipelineConfig {
    fn default() -> Self {
        PipelineConfig {
            batch_size: 16384,
            batch_timeout_ms: 200,
            channel_capacity: 4,
            idle_exit_ms: 0,
            checkpoint_ms: 5000,
        }
    }
}

impl Default for ValidationConfig {
    fn default() -> Self {
        ValidationConfig {
            required: [
                "event_id",
                "ts",
                "user_id",
                "item_id",
                "event_type",
                "service",
                "status",
                "latency_ms",
            ]
            .map(String::from)
            .to_vec(),
            event_types: ["view", "cart", "purchase", "rating"]
                .map(String::from)
                .to_vec(),
            status_min: 100,
            status_max: 599,
            latency_min_ms: 0.0,
            latency_max_ms: 3_600_000.0,
            rating_min: 1.0,
            rating_max: 5.0,
            price_min: 0.0,
            max_payload_bytes: 65536,
            ts_min_ms: 946_684_800_000,
            ts_max_ms: 4_102_444_800_000,
            max_services: 1_000,
        }
    }
}

impl Default for WindowConfig {
    fn default() -> Self {
        WindowConfig {
            size_secs: 60,
            out_of_orderness_ms: 5000,
            allowed_lateness_ms: 60000,
            top_items: 10,
            idle_partition_ms: 10000,
            live_emit_ms: 250,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            prefix: "pulse".into(),
            ttl_secs: 604_800,
            max_pending: 200_000,
            timeout_ms: 2_000,
        }
    }
}

impl ParquetConfig {
    /// How often the Parquet stage looks at its open files' ages.
    pub fn tick(&self) -> std::time::Duration {
        std::time::Duration::from_millis(500).min(std::time::Duration::from_secs(self.commit_secs))
    }

    /// Files written are logged at the next checkpoint, or at the latest
    /// this long after (a tenth of `commit_secs`, 0.5-5 s): each log commit
    /// costs a few milliseconds.
    pub fn log_every(&self) -> std::time::Duration {
        (std::time::Duration::from_secs(self.commit_secs) / 10)
            .clamp(self.tick(), std::time::Duration::from_secs(5))
    }

    /// An open file is committed, and final minute rows are written, this
    /// long after their first row: `commit_secs` less the time a file may
    /// wait for its log commit (and a second for the rows' way through the
    /// pipeline), so rows are in the table within `commit_secs`.
    pub fn roll_after(&self) -> std::time::Duration {
        let c = std::time::Duration::from_secs(self.commit_secs);
        let wait = self.log_every() + self.tick() * 2 + std::time::Duration::from_secs(1);
        c.saturating_sub(wait).max(c / 2)
    }

    /// Where pulse keeps its own state: `state_dir`, or else `data_dir`.
    pub fn state_dir(&self) -> PathBuf {
        if self.state_dir.as_os_str().is_empty() {
            self.data_dir.clone()
        } else {
            self.state_dir.clone()
        }
    }
}

/// How the tables say which files they hold.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    Delta,
    Hive,
}

impl Default for ParquetConfig {
    fn default() -> Self {
        ParquetConfig {
            data_dir: PathBuf::from("pulse-data"),
            state_dir: PathBuf::new(),
            format: TableFormat::Delta,
            commit_secs: 60,
            compact: true,
            vacuum_hours: 24,
            row_group_rows: 131_072,
            max_file_rows: 4_000_000,
            buffer_mb: 32,
            zstd_level: 1,
        }
    }
}

/// The fields a record may carry; `required` entries must be among them.
pub const EVENT_FIELDS: [&str; 12] = [
    "event_id",
    "ts",
    "user_id",
    "item_id",
    "event_type",
    "rating",
    "price",
    "session_id",
    "service",
    "endpoint",
    "status",
    "latency_ms",
];

/// Secrets, from the environment only.
#[derive(Debug, Clone, Default)]
pub struct Secrets {
    pub redis_password: Option<String>,
    pub kafka_sasl_username: Option<String>,
    pub kafka_sasl_password: Option<String>,
}

impl Secrets {
    pub fn from_env() -> Self {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Secrets {
            redis_password: get("PULSE_REDIS_PASSWORD"),
            kafka_sasl_username: get("PULSE_KAFKA_SASL_USERNAME"),
            kafka_sasl_password: get("PULSE_KAFKA_SASL_PASSWORD"),
        }
    }
}

/// Environment variables that are secrets or test plumbing, not config keys.
const NON_CONFIG_VARS: [&str; 4] = [
    "PULSE_REDIS_PASSWORD",
    "PULSE_KAFKA_SASL_USERNAME",
    "PULSE_KAFKA_SASL_PASSWORD",
    "PULSE_LOG",
];

impl Config {
    /// Loads `path` (or the embedded defaults when `None`), applies `PULSE_*`
    /// overrides from the process environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::load_with_env(path, &env)
    }

    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?,
                format!(" in {}", p.display()),
            ),
            None => (DEFAULT_TOML.to_string(), " (embedded defaults)".to_string()),
        };
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: origin.clone(),
                    message: e.to_string(),
                })?;
        apply_env(&mut table, env)?;
        let cfg: Config = table
            .try_into()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                origin,
                message: e.to_string(),
            })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        for f in &self.validation.required {
            if !EVENT_FIELDS.contains(&f.as_str()) {
                return bad(format!("validation.required names unknown field {f:?}"));
            }
        }
        for f in ["event_id", "ts", "service"] {
            if !self.validation.required.iter().any(|r| r == f) {
                return bad(format!("validation.required must include {f:?}"));
            }
        }
        if self.reco.max_users == 0 || self.reco.max_items == 0 {
            return bad("reco.max_users and reco.max_items must be > 0".into());
        }
        if self.window.size_secs == 0 {
            return bad("window.size_secs must be > 0".into());
        }
        if !["rolling", "previous_day"].contains(&self.detect.drift_reference.as_str()) {
            return bad(format!(
                "detect.drift_reference must be \"rolling\" or \"previous_day\", not {:?}",
                self.detect.drift_reference
            ));
        }
        if self.pipeline.batch_size == 0 || self.pipeline.channel_capacity == 0 {
            return bad("pipeline.batch_size and pipeline.channel_capacity must be > 0".into());
        }
        if self.parquet.row_group_rows == 0
            || self.parquet.max_file_rows == 0
            || self.parquet.buffer_mb == 0
        {
            return bad(
                "parquet.row_group_rows, parquet.max_file_rows and parquet.buffer_mb must be > 0"
                    .into(),
            );
        }
        if crate::storage::is_remote(&self.parquet.data_dir) {
            if self.parquet.format != TableFormat::Delta {
                return bad("parquet.data_dir on S3 needs parquet.format = \"delta\"".into());
            }
            if self.parquet.state_dir.as_os_str().is_empty()
                || crate::storage::is_remote(&self.parquet.state_dir)
            {
                return bad(
                    "parquet.data_dir on S3 needs parquet.state_dir, a local directory".into(),
                );
            }
        }
        if self.parquet.commit_secs == 0 {
            return bad("parquet.commit_secs must be > 0".into());
        }
        // The vacuum deletes unlogged files older than its retention, files
        // still being written included: the retention must outlast them.
        if self.parquet.vacuum_hours * 3600 < 2 * self.parquet.commit_secs {
            return bad("parquet.vacuum_hours must be at least twice parquet.commit_secs".into());
        }
        if !(1..=22).contains(&self.parquet.zstd_level) {
            return bad("parquet.zstd_level must be 1..=22".into());
        }
        if self.validation.status_min > self.validation.status_max {
            return bad("validation.status_min > status_max".into());
        }
        if !(0.0..=1.0).contains(&self.detect.threshold) {
            return bad("detect.threshold must be within 0..=1".into());
        }
        if !self.detect.webhook_url.is_empty() && !self.detect.webhook_url.starts_with("http://") {
            return bad(
                "detect.webhook_url must be an http:// URL (put TLS in a local relay)".into(),
            );
        }
        if self
            .kafka
            .properties
            .keys()
            .any(|k| k == "enable.auto.commit")
        {
            return bad(
                "kafka.properties may not set enable.auto.commit: pulse owns its offsets".into(),
            );
        }
        Ok(())
    }
}

/// Applies `PULSE_<SECTION>__<KEY>=value` overrides onto the raw TOML table.
fn apply_env(table: &mut toml::Table, env: &[(String, String)]) -> Result<(), ConfigError> {
    for (var, value) in env {
        let Some(rest) = var.strip_prefix("PULSE_") else {
            continue;
        };
        if NON_CONFIG_VARS.contains(&var.as_str()) || rest.starts_with("TEST_") {
            continue;
        }
        let Some((section, key)) = rest.split_once("__") else {
            // PULSE_SERVICES_DIR and similar plumbing variables carry no "__".
            continue;
        };
        let section = section.to_ascii_lowercase();
        let key = key.to_ascii_lowercase();
        let parsed = parse_env_value(value);
        let entry = table
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let toml::Value::Table(sec) = entry else {
            return Err(ConfigError::Env {
                var: var.clone(),
                message: format!("{section} is not a section"),
            });
        };
        // `properties` of kafka is a map: PULSE_KAFKA__PROPERTIES__FETCH.MAX.BYTES is not
        // expressible portably, so the map is set as a whole inline table instead.
        sec.insert(key, parsed);
    }
    Ok(())
}

fn parse_env_value(value: &str) -> toml::Value {
    let probe = format!("v = {value}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_file_equals_code_defaults() {
        let cfg = Config::load_with_env(None, &[]).unwrap();
        assert_eq!(cfg, Config::default());
    }

    #[test]
    fn unknown_key_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[window]\nsize_sec = 30\n").unwrap();
        let err = Config::load_with_env(Some(&p), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("size_sec"), "{err}");
    }

    #[test]
    fn env_overrides_and_unknown_env_key() {
        let env = vec![
            ("PULSE_WINDOW__SIZE_SECS".to_string(), "30".to_string()),
            ("PULSE_KAFKA__BROKERS".to_string(), "h:1".to_string()),
            ("PULSE_TEST_REDIS".to_string(), "ignored".to_string()),
        ];
        let cfg = Config::load_with_env(None, &env).unwrap();
        assert_eq!(cfg.window.size_secs, 30);
        assert_eq!(cfg.kafka.brokers, "h:1");
        let env = vec![("PULSE_WINDOW__NOPE".to_string(), "1".to_string())];
        let err = Config::load_with_env(None, &env).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn validation_rejects_bad_values() {
        let env = vec![("PULSE_WINDOW__SIZE_SECS".to_string(), "0".to_string())];
        assert!(Config::load_with_env(None, &env).is_err());
        let env = vec![(
            "PULSE_VALIDATION__REQUIRED".to_string(),
            "[\"ts\", \"service\"]".to_string(),
        )];
        let err = Config::load_with_env(None, &env).unwrap_err().to_string();
        assert!(err.contains("event_id"), "{err}");
    }
}
