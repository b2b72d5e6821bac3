//! pulse: a streaming event pipeline.
//!
//! ```text
//!  Kafka topic ─┐                          ┌─▶ window + SQL (sql/*.sql) ─▶ store: Redis | memory
//!  JSONL files ─┼─▶ RawChunk ─▶ decode ─▶ events batch ─┤
//!  generator  ──┘               │                      └─▶ Parquet: events, minute_stats, top_items
//!                               └─▶ dead letters ─────────▶ Parquet: dead_letters
//! ```
//!
//! Modules, in data-flow order:
//! - [`config`]: TOML + `PULSE_*` overrides, validated; secrets from the environment.
//! - [`model`]: table schemas and the messages stages exchange.
//! - [`source`]: Kafka consumer group, JSONL files (plain or gzip), the generator.
//! - [`decode`]: JSON → Arrow with validation; invalid records become dead letters. Pure.
//! - [`window`]: event-time tumbling windows, watermark, allowed lateness. Pure.
//! - [`sketch`]: mergeable HDR histograms and HyperLogLog. Pure.
//! - [`sql`]: the per-window DataFusion SQL and its sketch functions.
//! - [`detect`]: online anomaly detector (pure); [`alert`]: per-service scoring and incidents.
//! - [`sink`]: Parquet tables (atomic, deterministically named files) and the aggregate store.
//! - [`checkpoint`]: per-partition checkpoints (window state, pending rows, positions).
//! - [`app`]: wires the stages with bounded channels and owns shutdown.
//! - [`query`]: DataFusion SQL over the Parquet tables.
//! - [`bench`]: the Kafka-path benchmarks of `pulse bench --kafka`.
//!
//! Delivery: every record read lands in `events` or `dead_letters`; file runs
//! are complete or fail; Kafka runs are exactly-once per source partition
//! (pulse's own checkpoints, replay with skip of what is durable, guarded
//! Redis writes; see the README's "Exactly once" section).

pub mod alert;
pub mod app;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod decode;
pub mod detect;
pub mod detect_csv;
pub mod factors;
pub mod model;
pub mod nab;
pub mod notify;
pub mod query;
pub mod serve;
pub mod sink;
pub mod sketch;
pub mod source;
pub mod sql;
pub mod window;
