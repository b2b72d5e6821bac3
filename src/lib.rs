//! pulse: a streaming event pipeline.
//!
//! ```text
//!  Kafka topic ─┐
//!  JSONL files ─┼─▶ source ──RawChunk──▶ decode ──events, dead letters──▶ aggregate (the core stage)
//!  generator  ──┘  (thread)              (thread)                         │ window + SQL (sql/*.sql): partials per partition
//!                                                                         │ store: Redis | memory ─▶ rows merged over partitions
//!                                                                         │ detect: anomalies, incidents ─▶ notifier (webhook, Kafka)
//!                                                                         │ checkpoints (Kafka): windows, pending rows, positions
//!                                                                         ├─▶ parquet (thread): events, dead_letters, minute_stats,
//!                                                                         │   top_items, anomalies
//!                                                                         └─▶ factors (thread): trainer ─Delta─▶ publisher ─▶ Redis
//!  serve: dashboard, JSON API, /recommend, /metrics over Redis       query, eval: tools over the tables and the models
//! ```
//!
//! Modules, in data-flow order:
//! - [`config`]: TOML + `PULSE_*` overrides, validated; secrets from the environment.
//! - [`model`]: table schemas, row structs and the messages stages exchange (a leaf).
//! - [`timefmt`]: calendar days, timestamps, hex, the process id (a leaf).
//! - [`source`]: the source stage: Kafka consumer group, JSONL files (plain or gzip), the generator.
//! - [`decode`]: JSON → Arrow with validation and the per-partition service cap; invalid records
//!   become dead letters (pure), and the decode stage.
//! - [`window`]: event-time tumbling windows, watermarks, allowed lateness (pure), and
//!   [`window::sql`], the per-window DataFusion SQL and its sketch functions.
//! - [`sketch`]: mergeable HDR histograms and HyperLogLog (pure, a leaf).
//! - [`detect`]: the online anomaly detector (pure) and [`detect::incidents`], per-service scoring and incidents.
//! - [`aggregate`]: the core stage: per-partition windows + SQL, detection, store writes, checkpoints.
//! - [`factors`]: online factor models (pure maths and kernels), the trainer stage (file runs), the
//!   fleet's one model writer under a Redis lease (Kafka runs: it reads the topic itself), the Redis
//!   publisher, the model's versions and the rollback pin.
//! - [`sink`]: Parquet tables and their stage, the aggregate store (Redis | memory; Redis writes
//!   queue, coalesced per key, while Redis is down or slow), the alert notifier.
//! - [`checkpoint`]: per-partition checkpoints (window state, pending rows, positions).
//! - [`fence`]: ownership epochs of source partitions; an instance that lost a partition
//!   has its writes for it refused.
//! - [`error`]: the error of a pipeline run.
//! - [`app`]: wires the stages with bounded channels and owns the shutdown order.
//! - [`serve`]: the dashboard, JSON API, recommendations, /metrics and health over Redis.
//! - [`query`]: DataFusion SQL over the Parquet tables.
//! - [`eval`]: evaluation and benchmark tools (Kafka-path bench, NAB scorer, detector on CSV, reco-eval).
//!
//! Delivery: every record read lands in `events` or `dead_letters`; file runs
//! are complete or fail; Kafka runs are exactly-once per source partition
//! (pulse's own checkpoints, replay with skip of what is durable, guarded
//! Redis writes; see the README's "Exactly once" section). Redis, the
//! webhook and the alerts topic are side outputs: their faults degrade
//! pulse, visibly, and it catches up; they never stop the archive.
//!
//! No module imports another in a circle, and the pure ones import no I/O
//! module: `scripts/check_cycles.py` checks both.

pub mod aggregate;
pub mod app;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod detect;
pub mod error;
pub mod eval;
pub mod factors;
pub mod fence;
pub mod model;
pub mod query;
pub mod serve;
pub mod sink;
pub mod sketch;
pub mod source;
pub mod storage;
pub mod timefmt;
pub mod window;
