//! The source stage: raw records from Kafka (a consumer group, [`kafka`]),
//! JSONL files ([`file`]) or the deterministic generator ([`generator`]).
//! Each source runs on a thread of its own and produces [`SourceMsg`]s in
//! order: chunks of records ([`crate::model::RawChunk`]) with the source
//! position of every record, and with Kafka the partitions gained (with the
//! checkpoint each resumes from) and lost. Delivery: files and the generator
//! are read once, to the end; Kafka partitions resume from their checkpoints.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::model::{ChunkPool, Position, RawChunk};

pub mod file;
pub mod generator;
pub mod kafka;

/// What a source hands the pipeline: chunks, and with Kafka the partitions
/// it gains (with their checkpoints) and loses.
pub type SourceMsg = crate::model::SourceMsg<crate::checkpoint::PartitionCheckpoint>;

/// What to read.
#[derive(Debug, Clone)]
pub enum SourceSpec {
    Files(Vec<PathBuf>),
    Kafka,
    Generator(generator::GenParams),
}

/// The generator's source loop: `p`'s events as chunks of `batch` records
/// (partition 0, offsets 1, 2, ...), until the generator ends or the
/// pipeline stops listening.
pub fn generate(
    p: generator::GenParams,
    batch: usize,
    tx: &mpsc::Sender<SourceMsg>,
    pool: &ChunkPool,
) {
    let mut g = generator::Generator::new(p);
    let source: Arc<str> = "generator".into();
    let mut line = Vec::with_capacity(512);
    let mut n = 0i64;
    let mut chunk = RawChunk::new(source.clone());
    loop {
        while chunk.len() < batch {
            line.clear();
            if g.next_into(&mut line).is_none() {
                break;
            }
            n += 1;
            chunk.push(
                &line,
                Position {
                    partition: 0,
                    offset: n,
                },
            );
        }
        let last = chunk.len() < batch;
        let next = RawChunk::reused_like(&chunk, pool);
        let full = std::mem::replace(&mut chunk, next);
        if !full.is_empty() && tx.blocking_send(SourceMsg::Chunk(full)).is_err() {
            break;
        }
        if last {
            break;
        }
    }
}
