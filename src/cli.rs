//! The `pulse` command line: the subcommands and their flags (clap).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pulse",
    version,
    about = "Streaming event pipeline: Kafka/files -> per-minute stats, anomalies, factors -> Redis + Parquet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the whole pipeline on generated events, with no Kafka and no Redis.
    Demo(DemoArgs),
    /// Generate the synthetic event stream to a file or a Kafka topic.
    Gen(GenArgs),
    /// Run the pipeline from Kafka, or from files with --input.
    Run(RunArgs),
    /// Dashboard, JSON API, /metrics and health over the Redis aggregates.
    Serve(ServeArgs),
    /// Benchmark the whole file pipeline: generate N events first (not timed), then run them.
    Bench(BenchArgs),
    /// Prequential evaluation of the recommendation model (the pipeline's update code).
    RecoEval(RecoEvalArgs),
    /// Run the anomaly detector over a NAB-format series (timestamp,value CSV).
    Detect(DetectArgs),
    /// Score the detector on a NAB corpus (normalised score per profile).
    Nab(NabArgs),
    /// SQL over the Parquet tables (events, minute_stats, dead_letters, top_items).
    Query(QueryArgs),
    /// The fleet's factor model versions: list them, serve an earlier one, or the live model again.
    Model(ModelArgs),
}

// Arguments of `pulse model`.
#[derive(Args, Debug)]
pub struct ModelArgs {
    #[command(subcommand)]
    pub action: ModelAction,
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[arg(long, global = true)]
    pub topic: Option<String>,
    #[arg(long, global = true)]
    pub redis: Option<String>,
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum ModelAction {
    /// The kept versions, oldest first, with their quality figures, and the one served.
    List,
    /// Serve VERSION instead of the live model (`latest`: the live model again).
    Rollback {
        #[arg(long)]
        to: String,
    },
}

// Arguments of `pulse demo`.
#[derive(Args, Debug)]
pub struct DemoArgs {
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    #[arg(long, default_value = "pulse-demo-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

// Arguments of `pulse gen`.
#[derive(Args, Debug)]
pub struct GenArgs {
    #[arg(long)]
    pub events: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Output JSONL file (".gz" compresses).
    #[arg(long, conflicts_with = "brokers")]
    pub out: Option<PathBuf>,
    #[arg(long, requires = "topic")]
    pub brokers: Option<String>,
    #[arg(long)]
    pub topic: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Events per second of event time.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Fraction of invalid records.
    #[arg(long, default_value_t = 0.001)]
    pub invalid: f64,
    /// Fraction of late records (behind the watermark, within allowed lateness).
    #[arg(long, default_value_t = 0.001)]
    pub late: f64,
    /// Do not plant the two incidents.
    #[arg(long)]
    pub no_incidents: bool,
    /// Plant a gradual drift on `reco` from this fraction of the stream's
    /// event time (latency doubles, more ratings and client errors over 2 h).
    #[arg(long)]
    pub drift_at: Option<f64>,
}

// Arguments of `pulse run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// JSONL files (plain or .gz): process them to the end and exit.
    #[arg(long, num_args = 1..)]
    pub input: Vec<PathBuf>,
    #[arg(long)]
    pub brokers: Option<String>,
    #[arg(long)]
    pub topic: Option<String>,
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub redis: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Exit after the Kafka source was idle this many milliseconds.
    #[arg(long)]
    pub idle_exit_ms: Option<u64>,
    /// Serve /metrics, /healthz and /readyz (and the dashboard API) on this address.
    #[arg(long)]
    pub listen: Option<String>,
}

// Arguments of `pulse serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub redis: Option<String>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Serving threads, each with its own listener, runtime and Redis
    /// connection (default: one per core).
    #[arg(long, env = "PULSE_SERVE_THREADS")]
    pub threads: Option<usize>,
}

// Arguments of `pulse bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    /// Include the Redis sink.
    #[arg(long)]
    pub redis: Option<String>,
    /// Keep the generated input and output here (default: a temp dir, removed).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Benchmark the Kafka path on these brokers instead: a raw consumer vs
    /// the pipeline on the same topic, then event-to-store freshness.
    #[arg(long)]
    pub kafka: Option<String>,
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Freshness phase: events per second, and for how long (0 = skip).
    #[arg(long, default_value_t = 5000.0)]
    pub fresh_rate: f64,
    #[arg(long, default_value_t = 30)]
    pub fresh_secs: u64,
}

// Arguments of `pulse reco-eval`.
#[derive(Args, Debug)]
pub struct RecoEvalArgs {
    #[arg(long)]
    pub ratings: PathBuf,
    /// movielens (tab-separated user item rating unix_ts) or jsonl (pipeline events).
    #[arg(long, default_value = "jsonl")]
    pub format: String,
    /// Cut-off of recall and NDCG (the protocol is defined at 10).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// Model hyper-parameters from this config's [reco] section (default: embedded).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

// Arguments of `pulse detect`.
#[derive(Args, Debug)]
pub struct DetectArgs {
    #[arg(long)]
    pub input: PathBuf,
    /// Output CSV (timestamp,value,anomaly_score,label); standard output when absent.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

// Arguments of `pulse nab`.
#[derive(Args, Debug)]
pub struct NabArgs {
    /// Folder with combined_windows.json, profiles.json and the CSV files.
    #[arg(long, default_value = "../shared/data/nab")]
    pub data: PathBuf,
    /// Leave one category out: per category and profile, choose the setting
    /// and threshold on the other categories and score the held-out one.
    #[arg(long)]
    pub loco: bool,
}

// Arguments of `pulse query`.
#[derive(Args, Debug)]
pub struct QueryArgs {
    #[arg(long, default_value = "pulse-data")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "table")]
    pub format: String,
    pub sql: String,
}
