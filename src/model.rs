//! The schemas of pulse's tables and the typed messages its stages exchange.
//! Pure definitions: no I/O. Every stage consumes and produces Arrow
//! `RecordBatch`es with these schemas, tagged with the source positions they cover.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use datafusion::arrow::array::{
    Array, AsArray, Float64Array, Int32Array, Int64Array, StringArray, TimestampMillisecondArray,
    UInt64Array,
};
use datafusion::arrow::datatypes::{
    DataType, Field, Float64Type, Int32Type, Int64Type, Schema, SchemaRef, TimeUnit,
    TimestampMillisecondType,
};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::record_batch::RecordBatch;

/// Longest service name, in bytes.
pub const MAX_SERVICE_LEN: usize = 64;
/// Longest endpoint, in bytes.
pub const MAX_ENDPOINT_LEN: usize = 512;

/// Bytes allowed in a service name: ASCII letters, digits, `_`, `-`, `.`.
const SERVICE_BYTES: [bool; 256] = {
    let mut t = [false; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        t[c] = b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.';
        c += 1;
    }
    t
};

/// Whether `s` is a service name pulse accepts, at ingest (otherwise the
/// record is a dead letter, reason `name`) and in the API: 1 to
/// [`MAX_SERVICE_LEN`] ASCII letters, digits, `_`, `-` or `.`. Names become
/// Redis keys, URL parameters and dashboard text.
#[inline]
pub fn valid_service(s: &str) -> bool {
    // No early exit: a branch per byte cost more than the lookups.
    !s.is_empty()
        && s.len() <= MAX_SERVICE_LEN
        && s.bytes().fold(true, |ok, b| ok & SERVICE_BYTES[b as usize])
}

/// Whether `s` is an endpoint pulse accepts at ingest: 1 to
/// [`MAX_ENDPOINT_LEN`] bytes (UTF-8 allowed) with no control character and
/// none of `<>"'`, backquote or backslash. Eight bytes at a time.
#[inline]
pub fn valid_endpoint(s: &str) -> bool {
    const LO: u64 = 0x0101_0101_0101_0101;
    const HI: u64 = 0x8080_8080_8080_8080;
    // A high bit set in each byte of `x` that is zero (exact for the
    // "any" question it answers).
    let zero = |x: u64| x.wrapping_sub(LO) & !x & HI;
    let has = |x: u64, b: u8| zero(x ^ (LO * u64::from(b)));
    let bad = |w: u64| {
        // bytes below 0x20 (UTF-8 bytes ≥ 0x80 have the high bit: `!w` clears them)
        (w.wrapping_sub(LO * 0x20) & !w & HI)
            | has(w, 0x7f)
            | has(w, b'<')
            | has(w, b'>')
            | has(w, b'"')
            | has(w, b'\'')
            | has(w, b'`')
            | has(w, b'\\')
    };
    let b = s.as_bytes();
    if b.is_empty() || b.len() > MAX_ENDPOINT_LEN {
        return false;
    }
    let mut acc = 0u64;
    let mut words = b.chunks_exact(8);
    for c in &mut words {
        acc |= bad(u64::from_le_bytes(c.try_into().expect("chunks of 8")));
    }
    // The tail, padded with an allowed byte.
    let mut last = [b'a'; 8];
    last[..words.remainder().len()].copy_from_slice(words.remainder());
    acc |= bad(u64::from_le_bytes(last));
    acc == 0
}

/// Timestamps are UTC milliseconds.
pub fn ts_type() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

/// Lateness classes stored in `events.lateness`.
pub const ON_TIME: &str = "on_time";
/// Behind the watermark but within allowed lateness: its window was updated and re-emitted.
pub const LATE: &str = "late";
/// Beyond allowed lateness: kept in `events`, not counted in `minute_stats`.
pub const TOO_LATE: &str = "too_late";

/// The version of the tables' schemas, written into every Parquet file's
/// metadata as `pulse.schema_version`. The rule of evolution: a version
/// only adds nullable columns (never renames, retypes or removes one), so
/// files of every version read under the newest schema, the columns they
/// lack as NULL. Version 1: the six tables as documented.
pub const TABLE_SCHEMA_VERSION: u32 = 1;

/// `events`: one row per valid event, plus where it came from.
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("event_id", DataType::UInt64, false),
        Field::new("ts", ts_type(), false),
        Field::new("user_id", DataType::UInt64, true),
        Field::new("item_id", DataType::UInt64, true),
        Field::new("event_type", DataType::Utf8, true),
        Field::new("rating", DataType::Float32, true),
        Field::new("price", DataType::Float64, true),
        Field::new("session_id", DataType::Utf8, true),
        Field::new("service", DataType::Utf8, false),
        Field::new("endpoint", DataType::Utf8, true),
        Field::new("status", DataType::UInt16, true),
        Field::new("latency_ms", DataType::Float64, true),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("src_offset", DataType::Int64, false),
        Field::new("lateness", DataType::Utf8, false),
    ]))
}

/// What the decoder produces: `events` without the `lateness` column, which the
/// window stage appends once it has compared each event with the watermark.
pub fn decoded_schema() -> SchemaRef {
    let full = events_schema();
    let fields: Vec<_> = full
        .fields()
        .iter()
        .take(full.fields().len() - 1)
        .cloned()
        .collect();
    Arc::new(Schema::new(fields))
}

/// `dead_letters`: every record that failed decoding or validation.
pub fn dead_letters_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("received_at", ts_type(), false),
        Field::new("source", DataType::Utf8, false),
        Field::new("src_partition", DataType::Int32, false),
        Field::new("src_offset", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
        Field::new("raw", DataType::Utf8, false),
    ]))
}

/// `minute_stats`: one final row per (window_start, service).
pub fn minute_stats_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("requests", DataType::Int64, false),
        Field::new("errors", DataType::Int64, false),
        Field::new("client_errors", DataType::Int64, false),
        Field::new("error_rate", DataType::Float64, false),
        Field::new("latency_mean_ms", DataType::Float64, true),
        Field::new("latency_p50_ms", DataType::Float64, true),
        Field::new("latency_p95_ms", DataType::Float64, true),
        Field::new("latency_p99_ms", DataType::Float64, true),
        Field::new("latency_max_ms", DataType::Float64, true),
        Field::new("unique_users", DataType::Int64, false),
        Field::new("src_partition", DataType::Int32, false),
    ]))
}

/// `top_items`: the most requested items per window.
pub fn top_items_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("rank", DataType::UInt64, false),
        Field::new("item_id", DataType::UInt64, false),
        Field::new("requests", DataType::Int64, false),
        Field::new("src_partition", DataType::Int32, false),
    ]))
}

/// Latency buckets: bucket 0 holds latencies under 1 ms, bucket `b` ≥ 1 those
/// in `[2^((b-1)/4), 2^(b/4))` ms, the last one everything from ~3 minutes.
pub const LATENCY_BUCKETS: usize = 72;

/// The latency bucket of a value in milliseconds.
pub fn latency_bucket(ms: f64) -> usize {
    if ms.is_nan() || ms < 1.0 {
        return 0;
    }
    ((ms.log2() * 4.0).floor() as usize + 1).min(LATENCY_BUCKETS - 1)
}

/// The distributions of one service over some span (a window, an hour, a
/// reference): plain counts, so they add.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DriftSketch {
    pub latency: Vec<u64>,
    pub event_types: [u64; 4],
    pub status: [u64; 3],
}

impl Default for DriftSketch {
    fn default() -> Self {
        DriftSketch {
            latency: vec![0; LATENCY_BUCKETS],
            event_types: [0; 4],
            status: [0; 3],
        }
    }
}

impl DriftSketch {
    /// Counts `n` latencies of `ms` milliseconds.
    pub fn add_latency(&mut self, ms: f64, n: u64) {
        if self.latency.len() != LATENCY_BUCKETS {
            self.latency.resize(LATENCY_BUCKETS, 0);
        }
        self.latency[latency_bucket(ms)] += n;
    }

    /// Counts requests by status class from a window's counters.
    pub fn add_status(&mut self, requests: i64, server_errors: i64, client_errors: i64) {
        let (r, e, c) = (requests.max(0), server_errors.max(0), client_errors.max(0));
        self.status[0] += (r - e - c).max(0) as u64;
        self.status[1] += c as u64;
        self.status[2] += e as u64;
    }

    pub fn add(&mut self, o: &DriftSketch) {
        if self.latency.len() < o.latency.len() {
            self.latency.resize(o.latency.len(), 0);
        }
        for (a, b) in self.latency.iter_mut().zip(&o.latency) {
            *a += b;
        }
        for (a, b) in self.event_types.iter_mut().zip(o.event_types) {
            *a += b;
        }
        for (a, b) in self.status.iter_mut().zip(o.status) {
            *a += b;
        }
    }

    /// Requests counted (by status class).
    pub fn requests(&self) -> u64 {
        self.status.iter().sum()
    }

    /// The counts of feature `f`: 0 latency buckets, 1 event types, 2 status classes.
    pub fn feature(&self, f: usize) -> &[u64] {
        match f {
            0 => &self.latency,
            1 => &self.event_types,
            _ => &self.status,
        }
    }
}

/// `drift`: one row per compared (hour, service, feature): the hour's
/// distribution of the feature against its reference.
pub fn drift_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("hour_start", ts_type(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("feature", DataType::Utf8, false),
        Field::new("psi", DataType::Float64, false),
        Field::new("ks", DataType::Float64, false),
        Field::new("requests", DataType::UInt64, false),
        Field::new("reference_requests", DataType::UInt64, false),
        Field::new("drifted", DataType::Boolean, false),
    ]))
}

/// `anomalies`: one row per flagged (window, service, metric).
pub fn anomalies_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("window_start", ts_type(), false),
        Field::new("service", DataType::Utf8, false),
        Field::new("metric", DataType::Utf8, false),
        Field::new("value", DataType::Float64, false),
        Field::new("score", DataType::Float64, false),
    ]))
}

/// One `minute_stats` row: one source partition's (`partition` ≥ 0) or
/// merged over partitions (`partition` = -1).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MinuteRow {
    pub window_start_ms: i64,
    pub service: String,
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub error_rate: f64,
    pub latency_mean_ms: Option<f64>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub latency_max_ms: Option<f64>,
    pub unique_users: i64,
    pub is_final: bool,
    pub partition: i32,
    /// The distributions drift detection compares, on merged rows the
    /// scorer holds (not a `minute_stats` column).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dist: Option<Box<DriftSketch>>,
}

/// One `top_items` row of a partition: an item's rank by requests in a
/// window. Stored in checkpoints as the array `[window_start_ms, rank, item,
/// requests]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(from = "(i64, u64, u64, i64)", into = "(i64, u64, u64, i64)")]
pub struct TopItemRow {
    pub window_start_ms: i64,
    /// 1 for the most requested item.
    pub rank: u64,
    pub item: u64,
    pub requests: i64,
}

impl From<(i64, u64, u64, i64)> for TopItemRow {
    fn from((window_start_ms, rank, item, requests): (i64, u64, u64, i64)) -> Self {
        TopItemRow {
            window_start_ms,
            rank,
            item,
            requests,
        }
    }
}

impl From<TopItemRow> for (i64, u64, u64, i64) {
    fn from(r: TopItemRow) -> Self {
        (r.window_start_ms, r.rank, r.item, r.requests)
    }
}

/// Reads rows out of a batch with [`minute_stats_schema`].
pub fn minute_rows(b: &RecordBatch, is_final: bool) -> Vec<MinuteRow> {
    let ws = b.column(0).as_primitive::<TimestampMillisecondType>();
    let svc = b.column(1).as_string::<i32>();
    let i = |c: usize| b.column(c).as_primitive::<Int64Type>().clone();
    let f = |c: usize| b.column(c).as_primitive::<Float64Type>().clone();
    let (req, err, cerr, users) = (i(2), i(3), i(4), i(11));
    let part = b.column(12).as_primitive::<Int32Type>().clone();
    let (rate, mean, p50, p95, p99, max) = (f(5), f(6), f(7), f(8), f(9), f(10));
    let opt = |a: &Float64Array, r: usize| (!a.is_null(r)).then(|| a.value(r));
    (0..b.num_rows())
        .map(|r| MinuteRow {
            window_start_ms: ws.value(r),
            service: svc.value(r).to_string(),
            requests: req.value(r),
            errors: err.value(r),
            client_errors: cerr.value(r),
            error_rate: rate.value(r),
            latency_mean_ms: opt(&mean, r),
            latency_p50_ms: opt(&p50, r),
            latency_p95_ms: opt(&p95, r),
            latency_p99_ms: opt(&p99, r),
            latency_max_ms: opt(&max, r),
            unique_users: users.value(r),
            is_final,
            partition: part.value(r),
            dist: None,
        })
        .collect()
}

/// The `minute_stats` batch of rows (inverse of [`minute_rows`]).
pub fn minute_rows_batch(rows: &[MinuteRow]) -> RecordBatch {
    let f = |g: fn(&MinuteRow) -> Option<f64>| {
        Arc::new(Float64Array::from(rows.iter().map(g).collect::<Vec<_>>()))
    };
    let i = |g: fn(&MinuteRow) -> i64| {
        Arc::new(Int64Array::from(rows.iter().map(g).collect::<Vec<_>>()))
    };
    RecordBatch::try_new(
        minute_stats_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    rows.iter().map(|r| r.window_start_ms).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from(
                rows.iter().map(|r| r.service.as_str()).collect::<Vec<_>>(),
            )),
            i(|r| r.requests),
            i(|r| r.errors),
            i(|r| r.client_errors),
            Arc::new(Float64Array::from(
                rows.iter().map(|r| r.error_rate).collect::<Vec<_>>(),
            )),
            f(|r| r.latency_mean_ms),
            f(|r| r.latency_p50_ms),
            f(|r| r.latency_p95_ms),
            f(|r| r.latency_p99_ms),
            f(|r| r.latency_max_ms),
            i(|r| r.unique_users),
            Arc::new(Int32Array::from(
                rows.iter().map(|r| r.partition).collect::<Vec<_>>(),
            )),
        ],
    )
    .expect("columns match minute_stats_schema")
}

/// The `top_items` batch of one partition's rows.
pub fn top_items_batch(rows: &[TopItemRow], partition: i32) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(
        top_items_schema(),
        vec![
            Arc::new(
                TimestampMillisecondArray::from(
                    rows.iter().map(|r| r.window_start_ms).collect::<Vec<_>>(),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(UInt64Array::from(
                rows.iter().map(|r| r.rank).collect::<Vec<_>>(),
            )),
            Arc::new(UInt64Array::from(
                rows.iter().map(|r| r.item).collect::<Vec<_>>(),
            )),
            Arc::new(Int64Array::from(
                rows.iter().map(|r| r.requests).collect::<Vec<_>>(),
            )),
            Arc::new(Int32Array::from(vec![partition; rows.len()])),
        ],
    )
}

/// The next offset per source partition that some stage has made durable
/// (the checkpoints, the model snapshot), shared with the stages that report
/// it (the Kafka source commits it as a progress hint).
pub type Progress = Arc<Mutex<BTreeMap<i32, i64>>>;

/// Where a record came from: a Kafka topic-partition-offset, or a file's index and line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub partition: i32,
    pub offset: i64,
}

/// A chunk of raw records from one source, in source order.
#[derive(Debug, Default)]
pub struct RawChunk {
    /// Topic name or file path.
    pub source: Arc<str>,
    /// Concatenated payloads; record `i` is `data[ends[i-1]..ends[i]]`.
    pub data: Vec<u8>,
    pub ends: Vec<usize>,
    pub positions: Vec<Position>,
    /// Kafka: the partitions assigned to this consumer when the chunk was read
    /// (they take part in the watermark even before they produce data).
    pub assigned: Option<Vec<i32>>,
    /// Whether `Position::partition` is an independent stream for watermarks
    /// (Kafka partitions) or only a position (the index of a file read in turn).
    pub partitioned_time: bool,
    /// Per-record source timestamps (Kafka message time), if known; they
    /// stamp dead letters, so a replayed dead letter lands where it did.
    pub timestamps: Vec<i64>,
}

/// Decoded chunks handed back to the source, so that it fills the same
/// buffers again instead of allocating fresh ones: a new multi-megabyte
/// buffer costs a page fault and a zeroed page for every 4 KiB written, and
/// the allocator returns freed ones to the OS at once (flat memory). Holds at
/// most a few chunks; a cloned pool is the same pool.
#[derive(Debug, Clone)]
pub struct ChunkPool {
    free: Arc<std::sync::Mutex<Vec<RawChunk>>>,
    keep: usize,
}

impl ChunkPool {
    pub fn new(keep: usize) -> Self {
        ChunkPool {
            free: Default::default(),
            keep,
        }
    }

    /// Keeps `c`'s buffers (emptied) for a later [`RawChunk::reused_like`],
    /// unless the pool is full.
    pub fn put(&self, mut c: RawChunk) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < self.keep {
            c.data.clear();
            c.ends.clear();
            c.positions.clear();
            c.timestamps.clear();
            c.assigned = None;
            free.push(c);
        }
    }

    fn take(&self) -> Option<RawChunk> {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    pub fn len(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the source hands the pipeline, in order. `C` is the state a newly
/// owned partition resumes from (the pipeline's checkpoint); stages between
/// the source and the one that restores it pass it on untouched.
#[derive(Debug)]
pub enum SourceMsg<C> {
    Chunk(RawChunk),
    /// Partitions newly owned, with the checkpoint each resumes from.
    Assigned(Vec<(i32, Option<C>)>),
    /// Partitions to give up: the pipeline checkpoints them, forgets them and
    /// then answers on the channel (the source waits before releasing them).
    Revoked(Vec<i32>, std::sync::mpsc::SyncSender<()>),
}

impl RawChunk {
    pub fn new(source: Arc<str>) -> Self {
        RawChunk {
            source,
            ..Default::default()
        }
    }
    /// An empty chunk sized like `prev` (plus an eighth): a source filling
    /// chunks of similar size then never regrows one (each doubling of a
    /// multi-megabyte buffer copied it and faulted in fresh zeroed pages).
    pub fn sized_like(prev: &RawChunk) -> Self {
        let records = prev.len() + prev.len() / 8;
        RawChunk {
            source: prev.source.clone(),
            data: Vec::with_capacity(prev.data.len() + prev.data.len() / 8),
            ends: Vec::with_capacity(records),
            positions: Vec::with_capacity(records),
            assigned: None,
            partitioned_time: prev.partitioned_time,
            timestamps: Vec::with_capacity(if prev.timestamps.is_empty() {
                0
            } else {
                records
            }),
        }
    }
    /// An empty chunk like `prev`, reusing a drained chunk's buffers from
    /// `pool` when there is one (else [`RawChunk::sized_like`]).
    pub fn reused_like(prev: &RawChunk, pool: &ChunkPool) -> Self {
        match pool.take() {
            Some(mut c) => {
                c.source = prev.source.clone();
                c.partitioned_time = prev.partitioned_time;
                c
            }
            None => RawChunk::sized_like(prev),
        }
    }
    pub fn push(&mut self, payload: &[u8], pos: Position) {
        self.data.extend_from_slice(payload);
        self.ends.push(self.data.len());
        self.positions.push(pos);
    }
    pub fn len(&self) -> usize {
        self.ends.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    pub fn record(&self, i: usize) -> &[u8] {
        &self.data[self.span(i)]
    }

    /// Where record `i` lies in `data`.
    pub fn span(&self, i: usize) -> std::ops::Range<usize> {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        start..self.ends[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_one_rule() {
        for good in ["cart", "checkout-v2", "api.search_1", &"a".repeat(64)] {
            assert!(valid_service(good), "{good}");
        }
        for bad in [
            "",
            "<img src=x onerror=alert(1)>",
            "a b",
            "caf\u{e9}",
            "x/y",
            &"a".repeat(65),
        ] {
            assert!(!valid_service(bad), "{bad}");
        }
        for good in [
            "/items/981",
            "/search?q=a&b=c",
            "/caf\u{e9}",
            "/a",
            "/abcdefgh",
            &"/".repeat(512),
        ] {
            assert!(valid_endpoint(good), "{good}");
        }
        let bad_bytes = [
            "<", ">", "\"", "'", "`", "\\", "\n", "\u{0}", "\u{1f}", "\u{7f}",
        ];
        for b in bad_bytes {
            // the bad byte at every position of a 17-byte endpoint (words and the tail)
            for at in 0..17 {
                let mut e = "/".repeat(16);
                e.insert_str(at, b);
                assert!(!valid_endpoint(&e), "{e:?}");
            }
        }
        assert!(!valid_endpoint(""));
        assert!(!valid_endpoint(&"/".repeat(513)));
    }

    fn filled(source: &str, n: usize) -> RawChunk {
        let mut c = RawChunk::new(source.into());
        c.partitioned_time = true;
        c.assigned = Some(vec![3]);
        for i in 0..n {
            c.push(
                b"{\"event_id\":1}",
                Position {
                    partition: 0,
                    offset: i as i64,
                },
            );
            c.timestamps.push(i as i64);
        }
        c
    }

    #[test]
    fn pooled_chunks_come_back_empty_with_their_buffers_and_the_pool_is_bounded() {
        let pool = ChunkPool::new(2);
        let prev = filled("topic-b", 1);
        // Empty pool: a fresh chunk sized like the previous one.
        let fresh = RawChunk::reused_like(&prev, &pool);
        assert!(fresh.is_empty());
        assert!(fresh.data.capacity() >= prev.data.len());

        let big = filled("topic-a", 1000);
        let cap = big.data.capacity();
        let data_ptr = big.data.as_ptr();
        pool.put(big);
        pool.put(filled("x", 1));
        pool.put(filled("y", 1)); // over `keep`: dropped
        assert_eq!(pool.len(), 2);

        let _small = RawChunk::reused_like(&prev, &pool);
        let reused = RawChunk::reused_like(&prev, &pool);
        assert!(pool.is_empty());
        // The big chunk's own buffer, emptied, labelled like `prev`.
        assert_eq!(reused.data.as_ptr(), data_ptr);
        assert_eq!(reused.data.capacity(), cap);
        assert!(reused.is_empty() && reused.positions.is_empty());
        assert!(reused.timestamps.is_empty() && reused.assigned.is_none());
        assert_eq!(&*reused.source, "topic-b");
        assert!(reused.partitioned_time);
    }
}
