//! Sources of raw records: Kafka (consumer group), JSONL files, and the
//! deterministic generator. Each produces [`crate::model::RawChunk`]s with the
//! source position of every record.

pub mod file;
pub mod generator;
pub mod kafka;
