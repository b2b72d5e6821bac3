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

use crate::model::{ChunkPool, Position, RawChunk};
use crate::source::SourceMsg;

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
/// `progress` is told the byte length of each finished file. Chunks are
/// filled straight from the reader's buffer (a line is copied once, into its
/// chunk) and, after decoding, come back through `pool` to be filled again.
pub fn read_files(
    paths: &[PathBuf],
    batch_size: usize,
    tx: &mpsc::Sender<SourceMsg>,
    pool: &ChunkPool,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<u64, FileSourceError> {
    let mut total = 0u64;
    for (idx, path) in paths.iter().enumerate() {
        let (mut reader, len) = open(path)?;
        let io = |source| FileSourceError::Io {
            path: path.clone(),
            source,
        };
        let source: Arc<str> = path.display().to_string().into();
        let mut chunk = RawChunk::new(source.clone());
        // A line split across two reads of the buffer is put together here.
        let mut split = Vec::new();
        let mut lineno: i64 = 0;
        let mut blank = 0u64;
        loop {
            let buf = reader.fill_buf().map_err(io)?;
            if buf.is_empty() && split.is_empty() {
                break;
            }
            // The next line: up to a newline, or the rest of the file.
            let (line, used, ends_line) = match memchr::memchr(b'\n', buf) {
                Some(i) => (&buf[..i], i + 1, true),
                None if buf.is_empty() => (&buf[..0], 0, true),
                None => (buf, buf.len(), false),
            };
            if !ends_line {
                split.extend_from_slice(line);
                reader.consume(used);
                continue;
            }
            let line = if split.is_empty() {
                line
            } else {
                split.extend_from_slice(line);
                &split[..]
            };
            lineno += 1;
            let mut end = line.len();
            while end > 0 && (line[end - 1] == b'\n' || line[end - 1] == b'\r') {
                end -= 1;
            }
            let rec = &line[..end];
            if rec.iter().all(u8::is_ascii_whitespace) {
                blank += 1;
            } else {
                chunk.push(
                    rec,
                    Position {
                        partition: idx as i32,
                        offset: lineno,
                    },
                );
                total += 1;
            }
            split.clear();
            reader.consume(used);
            if chunk.len() >= batch_size {
                let next = RawChunk::reused_like(&chunk, pool);
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

/// [`read_files`] with a progress bar on a terminal's stderr.
pub fn read_files_shown(
    paths: &[PathBuf],
    batch_size: usize,
    tx: &mpsc::Sender<SourceMsg>,
    pool: &ChunkPool,
) -> Result<u64, FileSourceError> {
    let bar = progress_bar(total_bytes(paths));
    let done = |n: u64| {
        if let Some(b) = &bar {
            b.inc(n)
        }
    };
    let lines = read_files(paths, batch_size, tx, pool, &done)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(lines)
}

fn progress_bar(total: u64) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() || total == 0 {
        return None;
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    ) {
        b.set_style(style);
    }
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn lines_longer_than_the_read_buffer_are_whole_and_the_last_needs_no_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("long.jsonl");
        // Longer than the 1 MiB read buffer, so each spans several reads.
        let long = format!("{{\"pad\":\"{}\"}}", "x".repeat(2_500_000));
        let body = format!("{long}\r\n{{\"a\":1}}\n \t\n{long}\n{{\"b\":2}}");
        std::fs::write(&path, body).unwrap();
        let (tx, mut rx) = mpsc::channel(100);
        let pool = ChunkPool::new(2);
        let n = read_files(std::slice::from_ref(&path), 2, &tx, &pool, &|_| {}).unwrap();
        drop(tx);
        assert_eq!(n, 4);
        let mut got = Vec::new();
        while let Some(SourceMsg::Chunk(c)) = rx.blocking_recv() {
            for i in 0..c.len() {
                got.push((c.positions[i].offset, c.record(i).to_vec()));
            }
            pool.put(c);
        }
        assert_eq!(got.len(), 4);
        assert_eq!((got[0].0, got[0].1.len()), (1, long.len()));
        assert_eq!(got[0].1, long.as_bytes());
        assert_eq!(got[1], (2, b"{\"a\":1}".to_vec()));
        // Line 3 is blank: skipped, but it still counts for line numbers.
        assert_eq!(got[2].0, 4);
        assert_eq!(got[2].1, long.as_bytes());
        assert_eq!(got[3], (5, b"{\"b\":2}".to_vec()));
    }

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
        let n = read_files(&[plain, gz], 2, &tx, &ChunkPool::new(0), &|_| {}).unwrap();
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
