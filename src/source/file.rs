//! JSONL file source. Consumes one or more files, plain or gzip (by `.gz`
//! name or magic bytes); produces [`RawChunk`]s of at most `batch_size` lines,
//! in file order, with positions (partition = file index, offset = 1-based
//! line number). Streams in fixed-size reads, so memory is bounded whatever the
//! file size. Whitespace-only lines carry no record and are skipped (counted).
//! Delivery: every line is sent exactly once per run, or the run fails.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::model::{Position, RawChunk, SourceMsg};

#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn open(path: &Path) -> Result<(Box<dyn BufRead + Send>, u64), FileSourceError> {
    let io = |source| FileSourceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(io)?;
    drop(f);
    let f = File::open(path).map_err(io)?;
    let gz = (n == 2 && magic == [0x1f, 0x8b]) || path.extension().is_some_and(|e| e == "gz");
    let reader: Box<dyn BufRead + Send> = if gz {
        Box::new(BufReader::with_capacity(
            1 << 20,
            flate2::read::MultiGzDecoder::new(BufReader::with_capacity(1 << 20, f)),
        ))
    } else {
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    Ok((reader, len))
}

/// Total bytes of the files, for progress reporting.
pub fn total_bytes(paths: &[PathBuf]) -> u64 {
    paths
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum()
}

/// Reads all files into `tx` (blocking; run on a blocking thread). Returns lines read.
/// `progress` is told the byte length of each finished file.
pub fn read_files(
    paths: &[PathBuf],
    batch_size: usize,
    tx: &mpsc::Sender<SourceMsg>,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, FileSourceError> {
    let mut total = 0u64;
    for (idx, path) in paths.iter().enumerate() {
        let (mut reader, len) = open(path)?;
        let source: Arc<str> = path.display().to_string().into();
        let mut chunk = RawChunk::new(source.clone());
        let mut line = Vec::with_capacity(1024);
        let mut lineno: i64 = 0;
        let mut blank = 0u64;
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|source| FileSourceError::Io {
                    path: path.clone(),
                    source,
                })?;
            if n == 0 {
                break;
            }
            lineno += 1;
            let mut end = line.len();
            while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
                end -= 1;
            }
            let rec = &line[..end];
            if rec.iter().all(u8::is_ascii_whitespace) {
                blank += 1;
                continue;
            }
            chunk.push(
                rec,
                Position {
                    partition: idx as i32,
                    offset: lineno,
                },
            );
            total += 1;
            if chunk.len() >= batch_size {
                let next = RawChunk::sized_like(&chunk);
                let full = std::mem::replace(&mut chunk, next);
                if tx.blocking_send(SourceMsg::Chunk(full)).is_err() {
                    return Ok(total); // the pipeline is shutting down
                }
            }
        }
        if !chunk.is_empty() && tx.blocking_send(SourceMsg::Chunk(chunk)).is_err() {
            return Ok(total);
        }
        if blank > 0 {
            metrics::counter!("pulse_blank_lines_total").increment(blank);
            tracing::info!(file = %path.display(), blank, "skipped whitespace-only lines");
        }
        progress(len);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_plain_and_gzip_in_bounded_chunks_with_line_numbers() {
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("a.jsonl");
        std::fs::write(&plain, "{\"a\":1}\n\n{\"a\":2}\r\n{\"a\":3}").unwrap();
        let gz = dir.path().join("b.jsonl.gz");
        let mut enc =
            flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        for i in 0..5 {
            writeln!(enc, "{{\"b\":{i}}}").unwrap();
        }
        enc.finish().unwrap();
        let (tx, mut rx) = mpsc::channel(100);
        let n = read_files(&[plain, gz], 2, &tx, &|_| {}).unwrap();
        drop(tx);
        assert_eq!(n, 8);
        let mut chunks = Vec::new();
        while let Some(SourceMsg::Chunk(c)) = rx.blocking_recv() {
            assert!(c.len() <= 2);
            chunks.push(c);
        }
        let all: Vec<(i32, i64, String)> = chunks
            .iter()
            .flat_map(|c| {
                (0..c.len()).map(move |i| {
                    (
                        c.positions[i].partition,
                        c.positions[i].offset,
                        String::from_utf8(c.record(i).to_vec()).unwrap(),
                    )
                })
            })
            .collect();
        assert_eq!(all[0], (0, 1, "{\"a\":1}".to_string()));
        assert_eq!(all[1], (0, 3, "{\"a\":2}".to_string()));
        assert_eq!(all[2], (0, 4, "{\"a\":3}".to_string()));
        assert_eq!(all[7], (1, 5, "{\"b\":4}".to_string()));
    }
}
