//! JSON → Arrow. Consumes [`RawChunk`]s (one JSON object per record); produces
//! one `events` batch (schema [`decoded_schema`]) and one `dead_letters` batch per
//! chunk. Every input record lands in exactly one of the two: a record that fails
//! parsing or validation is never dropped, it becomes a dead letter with its raw
//! payload, source position and a reason. Pure code: no I/O.
//!
//! Records are parsed straight into typed, borrowed fields and appended to
//! column builders: no per-event `serde_json::Value` tree is built.

pub mod admit;
mod event;
mod flat;
pub mod stage;

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayBuilder, ArrayRef, Float32Builder, Float64Builder, Int32Builder, Int64Builder,
    StringBuilder, TimestampMillisecondBuilder, UInt16Builder, UInt64Builder,
};
use datafusion::arrow::record_batch::RecordBatch;

use crate::config::ValidationConfig;
use crate::model::{
    MAX_ENDPOINT_LEN, MAX_SERVICE_LEN, RawChunk, dead_letters_schema, decoded_schema,
    valid_endpoint, valid_service,
};
use event::RawEvent;
pub use event::parse_ts;

/// Why a record became a dead letter. `kind` is the low-cardinality metric label.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub kind: &'static str,
    pub message: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

/// The rejection of a service name outside the rule (rare: out of line).
#[cold]
#[inline(never)]
fn bad_service(s: &str) -> Rejection {
    reject(
        "name",
        format!(
            "service {:?} is not 1-{MAX_SERVICE_LEN} of A-Z a-z 0-9 _ - .",
            shown(s)
        ),
    )
}

/// The rejection of a service past the cardinality cap (out of line).
#[cold]
#[inline(never)]
fn over_cap(s: &str, max: usize) -> Rejection {
    reject(
        "cardinality",
        format!(
            "service {:?} is past validation.max_services ({max} distinct services per source partition)",
            shown(s)
        ),
    )
}

/// The rejection of an endpoint outside the rule (rare: out of line).
#[cold]
#[inline(never)]
fn bad_endpoint(e: &str) -> Rejection {
    reject(
        "name",
        format!(
            "endpoint {:?} is empty, longer than {MAX_ENDPOINT_LEN} bytes or holds a control character or one of <>\"'`\\",
            shown(e)
        ),
    )
}

/// At most the first 80 characters of a rejected value, for its message
/// (the whole record is in the dead letter's `raw`).
fn shown(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn reject(kind: &'static str, message: impl Into<String>) -> Rejection {
    Rejection {
        kind,
        message: message.into(),
    }
}

/// Which optional fields are required, as flags (checked per record).
#[derive(Debug, Clone)]
struct Required {
    user_id: bool,
    item_id: bool,
    event_type: bool,
    session_id: bool,
    endpoint: bool,
    status: bool,
    latency_ms: bool,
    price: bool,
}

/// Column builders for one chunk.
pub struct Decoder {
    rules: ValidationConfig,
    required: Required,
    event_id: UInt64Builder,
    ts: TimestampMillisecondBuilder,
    user_id: UInt64Builder,
    item_id: UInt64Builder,
    event_type: StringBuilder,
    rating: Float32Builder,
    price: Float64Builder,
    session_id: StringBuilder,
    service: StringBuilder,
    endpoint: StringBuilder,
    status: UInt16Builder,
    latency: Float64Builder,
    partition: Int32Builder,
    offset: Int64Builder,
    dead: DeadLetterBuilder,
    /// Bytes per row of each string column (event_type, session_id,
    /// service, endpoint) in the last chunk: the next chunk's builders are
    /// sized from them.
    str_bytes_per_row: [f64; 4],
    /// The key order of the records decoded so far (the fast path's guess).
    key_order: flat::KeyOrder,
    /// The service cardinality cap.
    admission: admit::Admission,
}

/// One decoded chunk.
#[derive(Debug)]
pub struct Decoded {
    pub events: RecordBatch,
    pub dead_letters: RecordBatch,
    /// Counts of dead letters by rejection kind.
    pub rejected: Vec<(&'static str, u64)>,
    /// Carried over from the chunk.
    pub assigned: Option<Vec<i32>>,
    pub partitioned_time: bool,
}

impl Decoder {
    pub fn new(rules: ValidationConfig) -> Self {
        Self::with_admitted(rules, Default::default())
    }

    /// A decoder publishing the services it admits per partition in `shared`.
    pub fn with_admitted(rules: ValidationConfig, shared: admit::AdmittedServices) -> Self {
        let has = |f: &str| rules.required.iter().any(|r| r == f);
        let required = Required {
            user_id: has("user_id"),
            item_id: has("item_id"),
            event_type: has("event_type"),
            session_id: has("session_id"),
            endpoint: has("endpoint"),
            status: has("status"),
            latency_ms: has("latency_ms"),
            price: has("price"),
        };
        let cap = 1024;
        Decoder {
            required,
            event_id: UInt64Builder::with_capacity(cap),
            ts: TimestampMillisecondBuilder::with_capacity(cap).with_timezone("UTC"),
            user_id: UInt64Builder::with_capacity(cap),
            item_id: UInt64Builder::with_capacity(cap),
            event_type: StringBuilder::new(),
            rating: Float32Builder::with_capacity(cap),
            price: Float64Builder::with_capacity(cap),
            session_id: StringBuilder::new(),
            service: StringBuilder::new(),
            endpoint: StringBuilder::new(),
            status: UInt16Builder::with_capacity(cap),
            latency: Float64Builder::with_capacity(cap),
            partition: Int32Builder::with_capacity(cap),
            offset: Int64Builder::with_capacity(cap),
            dead: DeadLetterBuilder::default(),
            str_bytes_per_row: [0.0; 4],
            key_order: flat::KeyOrder::default(),
            admission: admit::Admission::new(rules.max_services, shared),
            rules,
        }
    }

    /// Starts partition `p`'s service admission from a checkpoint's set.
    pub fn seed_services(&mut self, p: i32, services: &[String]) {
        self.admission.seed(p, services);
    }

    /// Sizes the (empty) column builders for `rows` records, so that
    /// appending never regrows a buffer: each doubling of a multi-megabyte
    /// column copied it and faulted in fresh pages.
    fn presize(&mut self, rows: usize) {
        let bytes = |k: usize| (self.str_bytes_per_row[k] * rows as f64 * 1.125) as usize;
        let (et, sid, svc, ep) = (bytes(0), bytes(1), bytes(2), bytes(3));
        self.event_id = UInt64Builder::with_capacity(rows);
        self.ts = TimestampMillisecondBuilder::with_capacity(rows).with_timezone("UTC");
        self.user_id = UInt64Builder::with_capacity(rows);
        self.item_id = UInt64Builder::with_capacity(rows);
        self.event_type = StringBuilder::with_capacity(rows, et);
        self.rating = Float32Builder::with_capacity(rows);
        self.price = Float64Builder::with_capacity(rows);
        self.session_id = StringBuilder::with_capacity(rows, sid);
        self.service = StringBuilder::with_capacity(rows, svc);
        self.endpoint = StringBuilder::with_capacity(rows, ep);
        self.status = UInt16Builder::with_capacity(rows);
        self.latency = Float64Builder::with_capacity(rows);
        self.partition = Int32Builder::with_capacity(rows);
        self.offset = Int64Builder::with_capacity(rows);
    }

    /// Decodes a whole chunk. `received_at_ms` stamps its dead letters that
    /// have no source timestamp.
    pub fn decode(&mut self, chunk: &RawChunk, received_at_ms: i64) -> Decoded {
        let mut rejected: Vec<(&'static str, u64)> = Vec::new();
        self.presize(chunk.len());
        // UTF-8 is checked once for the whole chunk (fast over ASCII) rather
        // than string by string inside the JSON parser (~3% of the file
        // path's CPU), with SIMD (std's check was still 1.1%); a chunk with
        // invalid bytes is parsed record by record, so only the records
        // holding them become dead letters.
        let text = simdutf8::basic::from_utf8(&chunk.data).ok();
        for i in 0..chunk.len() {
            let raw = chunk.record(i);
            let as_text = text.and_then(|t| t.get(chunk.span(i)));
            let pos = chunk.positions[i];
            if let Err(r) = self.push(raw, as_text, pos.partition) {
                match rejected.iter_mut().find(|(k, _)| *k == r.kind) {
                    Some((_, n)) => *n += 1,
                    None => rejected.push((r.kind, 1)),
                }
                self.dead.push(
                    chunk
                        .timestamps
                        .get(i)
                        .copied()
                        .filter(|t| *t >= 0)
                        .unwrap_or(received_at_ms),
                    &chunk.source,
                    pos.partition,
                    pos.offset,
                    &r,
                    raw,
                );
            } else {
                self.partition.append_value(pos.partition);
                self.offset.append_value(pos.offset);
            }
        }
        Decoded {
            events: self.finish_events(),
            dead_letters: self.dead.finish(),
            rejected,
            assigned: chunk.assigned.clone(),
            partitioned_time: chunk.partitioned_time,
        }
    }

    /// Parses, validates and appends one record (`text`: the same bytes,
    /// known to be UTF-8); on error nothing is appended.
    fn push(&mut self, raw: &[u8], text: Option<&str>, partition: i32) -> Result<(), Rejection> {
        if raw.len() > self.rules.max_payload_bytes {
            return Err(reject(
                "too_large",
                format!(
                    "payload of {} bytes exceeds {}",
                    raw.len(),
                    self.rules.max_payload_bytes
                ),
            ));
        }
        let parsed = match text {
            Some(t) => {
                let t = t.trim_ascii();
                match flat::parse_with(t, &mut self.key_order) {
                    Some(ev) => Ok(ev),
                    None => serde_json::from_str(t),
                }
            }
            None => serde_json::from_slice(trim_ascii(raw)),
        };
        let ev: RawEvent = parsed.map_err(|e| {
            let kind = match e.classify() {
                serde_json::error::Category::Data => "type",
                _ => "json",
            };
            reject(kind, e.to_string())
        })?;
        self.validate(&ev)?;
        if let Some(svc) = ev.service.as_deref()
            && !self.admission.admit(partition, svc)
        {
            return Err(over_cap(svc, self.rules.max_services));
        }
        // Validated: append every column. `validate` guarantees presence of required ones.
        self.event_id.append_option(ev.event_id);
        self.ts.append_option(ev.ts.map(|t| t.0));
        self.user_id.append_option(ev.user_id);
        self.item_id.append_option(ev.item_id);
        self.event_type.append_option(ev.event_type.as_deref());
        self.rating.append_option(ev.rating);
        self.price.append_option(ev.price);
        self.session_id.append_option(ev.session_id.as_deref());
        self.service.append_option(ev.service.as_deref());
        self.endpoint.append_option(ev.endpoint.as_deref());
        self.status.append_option(ev.status);
        self.latency.append_option(ev.latency_ms);
        Ok(())
    }

    fn validate(&self, ev: &RawEvent) -> Result<(), Rejection> {
        let r = &self.rules;
        let q = &self.required;
        let missing = |f: &str| {
            Err(reject(
                "missing_field",
                format!("missing required field {f}"),
            ))
        };
        if ev.event_id.is_none() {
            return missing("event_id");
        }
        let Some(ts) = ev.ts else {
            return missing("ts");
        };
        match ev.service.as_deref() {
            None => return missing("service"),
            Some("") => return Err(reject("range", "service is empty")),
            Some(s) if !valid_service(s) => return Err(bad_service(s)),
            Some(_) => {}
        }
        if let Some(e) = ev.endpoint.as_deref()
            && !valid_endpoint(e)
        {
            return Err(bad_endpoint(e));
        }
        let checks = [
            (q.user_id && ev.user_id.is_none(), "user_id"),
            (q.item_id && ev.item_id.is_none(), "item_id"),
            (q.event_type && ev.event_type.is_none(), "event_type"),
            (q.session_id && ev.session_id.is_none(), "session_id"),
            (q.endpoint && ev.endpoint.is_none(), "endpoint"),
            (q.status && ev.status.is_none(), "status"),
            (q.latency_ms && ev.latency_ms.is_none(), "latency_ms"),
            (q.price && ev.price.is_none(), "price"),
        ];
        if let Some((_, f)) = checks.iter().find(|(m, _)| *m) {
            return missing(f);
        }
        if ts.0 < r.ts_min_ms || ts.0 > r.ts_max_ms {
            return Err(reject(
                "range",
                format!("ts {} ms outside the accepted range", ts.0),
            ));
        }
        if let Some(t) = ev.event_type.as_deref()
            && !r.event_types.iter().any(|e| e == t)
        {
            return Err(reject("range", format!("unknown event_type {t:?}")));
        }
        if let Some(s) = ev.status
            && (s < r.status_min || s > r.status_max)
        {
            return Err(reject(
                "range",
                format!("status {s} outside {}..={}", r.status_min, r.status_max),
            ));
        }
        if let Some(l) = ev.latency_ms
            && !(l >= r.latency_min_ms && l <= r.latency_max_ms)
        {
            return Err(reject(
                "range",
                format!(
                    "latency_ms {l} outside {}..={}",
                    r.latency_min_ms, r.latency_max_ms
                ),
            ));
        }
        if let Some(p) = ev.price
            && (p.is_nan() || p < r.price_min)
        {
            return Err(reject("range", format!("price {p} below {}", r.price_min)));
        }
        let is_rating = ev.event_type.as_deref() == Some("rating");
        match (is_rating, ev.rating) {
            (true, None) => return Err(reject("missing_field", "rating event without rating")),
            (false, Some(_)) => {
                return Err(reject("range", "rating is only allowed on rating events"));
            }
            (true, Some(v)) if !(v >= r.rating_min && v <= r.rating_max) => {
                return Err(reject(
                    "range",
                    format!("rating {v} outside {}..={}", r.rating_min, r.rating_max),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    fn finish_events(&mut self) -> RecordBatch {
        let rows = self.event_id.len();
        if rows > 0 {
            let strs = [
                &self.event_type,
                &self.session_id,
                &self.service,
                &self.endpoint,
            ];
            for (k, b) in strs.iter().enumerate() {
                self.str_bytes_per_row[k] = b.values_slice().len() as f64 / rows as f64;
            }
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(self.event_id.finish()),
            Arc::new(self.ts.finish()),
            Arc::new(self.user_id.finish()),
            Arc::new(self.item_id.finish()),
            Arc::new(self.event_type.finish()),
            Arc::new(self.rating.finish()),
            Arc::new(self.price.finish()),
            Arc::new(self.session_id.finish()),
            Arc::new(self.service.finish()),
            Arc::new(self.endpoint.finish()),
            Arc::new(self.status.finish()),
            Arc::new(self.latency.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
        ];
        // The columns were appended in lockstep and match the schema by construction.
        RecordBatch::try_new(decoded_schema(), cols).expect("decoder columns match decoded_schema")
    }
}

fn trim_ascii(b: &[u8]) -> &[u8] {
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    let end = b
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &b[start..end]
}

/// Longest raw payload kept in a dead letter; longer ones are cut and marked.
const MAX_RAW_KEPT: usize = 16 * 1024;

/// Builds `dead_letters` batches.
#[derive(Default)]
pub struct DeadLetterBuilder {
    received_at: Vec<i64>,
    source: StringBuilder,
    partition: Int32Builder,
    offset: Int64Builder,
    reason: StringBuilder,
    raw: StringBuilder,
}

impl DeadLetterBuilder {
    pub fn push(
        &mut self,
        received_at_ms: i64,
        source: &str,
        partition: i32,
        offset: i64,
        reason: &Rejection,
        raw: &[u8],
    ) {
        self.received_at.push(received_at_ms);
        self.source.append_value(source);
        self.partition.append_value(partition);
        self.offset.append_value(offset);
        self.reason.append_value(reason.to_string());
        let kept = &raw[..raw.len().min(MAX_RAW_KEPT)];
        let mut text = String::from_utf8_lossy(kept).into_owned();
        if kept.len() < raw.len() {
            text.push_str(&format!("…[{} bytes cut]", raw.len() - kept.len()));
        }
        self.raw.append_value(text);
    }

    pub fn len(&self) -> usize {
        self.received_at.len()
    }

    pub fn is_empty(&self) -> bool {
        self.received_at.is_empty()
    }

    pub fn finish(&mut self) -> RecordBatch {
        let ts = datafusion::arrow::array::TimestampMillisecondArray::from(std::mem::take(
            &mut self.received_at,
        ))
        .with_timezone("UTC");
        let cols: Vec<ArrayRef> = vec![
            Arc::new(ts),
            Arc::new(self.source.finish()),
            Arc::new(self.partition.finish()),
            Arc::new(self.offset.finish()),
            Arc::new(self.reason.finish()),
            Arc::new(self.raw.finish()),
        ];
        RecordBatch::try_new(dead_letters_schema(), cols)
            .expect("dead letter columns match dead_letters_schema")
    }
}

#[cfg(test)]
mod tests {
    use super::event::{days_in_month, parse_rfc3339_utc_fast};
    use super::*;
    use crate::model::Position;
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{TimestampMillisecondType, UInt64Type};
    use std::borrow::Cow;

    #[test]
    fn strings_without_escapes_are_borrowed_and_escaped_ones_unescaped() {
        let line = r#"{"service":"cart","endpoint":"/a\"b","session_id":"s\u00e9"}"#;
        let ev: RawEvent = serde_json::from_str(line).unwrap();
        let svc = ev.service.unwrap();
        assert!(matches!(svc.0, Cow::Borrowed("cart")));
        let ep = ev.endpoint.unwrap();
        assert!(matches!(&ep.0, Cow::Owned(s) if s == "/a\"b"));
        assert_eq!(&*ev.session_id.unwrap(), "s\u{e9}");
        assert!(ev.event_type.is_none());
        // From bytes, too: serde_json borrows from a slice as well.
        let ev: RawEvent = serde_json::from_slice(br#"{"event_type":"view"}"#).unwrap();
        assert!(matches!(ev.event_type.unwrap().0, Cow::Borrowed("view")));
        let err = serde_json::from_str::<RawEvent>(r#"{"service":5}"#)
            .err()
            .unwrap();
        assert!(err.to_string().contains("a string"), "{err}");
    }

    fn chunk(lines: &[&str]) -> RawChunk {
        let mut c = RawChunk::new("test.jsonl".into());
        for (i, l) in lines.iter().enumerate() {
            c.push(
                l.as_bytes(),
                Position {
                    partition: 0,
                    offset: i as i64 + 1,
                },
            );
        }
        c
    }

    const GOOD: &str = r#"{"event_id": 123, "ts": "2026-11-22T01:23:45.123Z", "user_id": 4711, "item_id": 981, "event_type": "view", "rating": null, "price": 19.99, "session_id": "s-88", "service": "catalog", "endpoint": "/items/981", "status": 200, "latency_ms": 35.2}"#;

    #[test]
    fn decodes_the_contract_example() {
        let mut d = Decoder::new(ValidationConfig::default());
        let out = d.decode(&chunk(&[GOOD]), 0);
        assert_eq!(out.dead_letters.num_rows(), 0, "{:?}", out.dead_letters);
        assert_eq!(out.events.num_rows(), 1);
        let ts = out
            .events
            .column(1)
            .as_primitive::<TimestampMillisecondType>();
        let expect = chrono::DateTime::parse_from_rfc3339("2026-11-22T01:23:45.123Z")
            .unwrap()
            .timestamp_millis();
        assert_eq!(ts.value(0), expect);
        assert_eq!(
            out.events.column(0).as_primitive::<UInt64Type>().value(0),
            123
        );
        assert!(out.events.column(5).is_null(0));
        assert_eq!(out.events.column(8).as_string::<i32>().value(0), "catalog");
    }

    #[test]
    fn invalid_utf8_spoils_only_its_own_record() {
        // A service name with a stray continuation byte, between two good records.
        let mut bad = GOOD.as_bytes().to_vec();
        let at = bad.windows(7).position(|w| w == b"catalog").unwrap() + 3;
        bad.insert(at, 0x80);
        let mut c = RawChunk::new("test.jsonl".into());
        for (i, r) in [GOOD.as_bytes(), &bad, GOOD.as_bytes()]
            .into_iter()
            .enumerate()
        {
            c.push(
                r,
                Position {
                    partition: 0,
                    offset: i as i64 + 1,
                },
            );
        }
        let mut d = Decoder::new(ValidationConfig::default());
        let out = d.decode(&c, 0);
        assert_eq!(out.events.num_rows(), 2);
        assert_eq!(out.dead_letters.num_rows(), 1);
        let offsets = out
            .dead_letters
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(offsets.value(0), 2);
        let reason = out.dead_letters.column(4).as_string::<i32>().value(0);
        assert!(reason.starts_with("json: invalid unicode"), "{reason}");
    }

    #[test]
    fn epoch_ms_and_escaped_strings() {
        let line = r#"{"event_id":1,"ts":1763774625123,"user_id":1,"item_id":2,"event_type":"rating","rating":4,"service":"c\u0061rt","endpoint":"\/a\/b","status":404,"latency_ms":1}"#;
        let mut d = Decoder::new(ValidationConfig::default());
        let out = d.decode(&chunk(&[line]), 0);
        assert_eq!(out.events.num_rows(), 1, "{:?}", out.dead_letters);
        let ts = out
            .events
            .column(1)
            .as_primitive::<TimestampMillisecondType>();
        assert_eq!(ts.value(0), 1_763_774_625_123);
        assert_eq!(out.events.column(8).as_string::<i32>().value(0), "cart");
        assert_eq!(out.events.column(9).as_string::<i32>().value(0), "/a/b");
    }

    #[test]
    fn every_bad_record_becomes_a_dead_letter_with_a_reason() {
        let bad = [
            ("{not json", "json"),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","service":"a","status":999,"latency_ms":1}"#,
                "status 999",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","service":"a","status":200,"latency_ms":-1}"#,
                "latency_ms -1",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","item_id":1,"event_type":"view","service":"a","status":200,"latency_ms":1}"#,
                "missing required field user_id",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","rating":3,"service":"a","status":200,"latency_ms":1}"#,
                "only allowed on rating",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"rating","rating":9,"service":"a","status":200,"latency_ms":1}"#,
                "rating 9",
            ),
            (
                r#"{"event_id":"x","ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","service":"a","status":200,"latency_ms":1}"#,
                "invalid type",
            ),
            (
                r#"{"event_id":1,"ts":"yesterday","user_id":1,"item_id":1,"event_type":"view","service":"a","status":200,"latency_ms":1}"#,
                "cannot parse timestamp",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"click","service":"a","status":200,"latency_ms":1}"#,
                "unknown event_type",
            ),
            ("", "json"),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","service":"<img src=x onerror=alert(1)>","status":200,"latency_ms":1}"#,
                "name: service \"<img src=x onerror=alert(1)>\" is not",
            ),
            (
                r#"{"event_id":1,"ts":"2026-11-22T00:00:00Z","user_id":1,"item_id":1,"event_type":"view","service":"a","endpoint":"/x\u0000<b>","status":200,"latency_ms":1}"#,
                "name: endpoint",
            ),
        ];
        let lines: Vec<&str> = bad.iter().map(|(l, _)| *l).chain([GOOD]).collect();
        let mut d = Decoder::new(ValidationConfig::default());
        let out = d.decode(&chunk(&lines), 42);
        assert_eq!(out.events.num_rows(), 1);
        assert_eq!(out.dead_letters.num_rows(), bad.len());
        let reasons = out.dead_letters.column(4).as_string::<i32>();
        let offsets = out
            .dead_letters
            .column(3)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        for (i, (_, want)) in bad.iter().enumerate() {
            assert!(
                reasons.value(i).contains(want),
                "row {i}: {} lacks {want}",
                reasons.value(i)
            );
            assert_eq!(offsets.value(i), i as i64 + 1);
        }
        let total: u64 = out.rejected.iter().map(|(_, n)| n).sum();
        assert_eq!(total, bad.len() as u64);
        // the good record keeps its own position
        let off = out
            .events
            .column(13)
            .as_primitive::<datafusion::arrow::datatypes::Int64Type>();
        assert_eq!(off.value(0), bad.len() as i64 + 1);
    }

    #[test]
    fn fast_rfc3339_agrees_with_chrono() {
        for s in [
            "2026-11-22T01:23:45.123Z",
            "2024-02-29T23:59:59Z",
            "1999-12-31T00:00:00.5Z",
            "2026-01-01T00:00:00.123456Z",
        ] {
            let want = chrono::DateTime::parse_from_rfc3339(s)
                .unwrap()
                .timestamp_millis();
            assert_eq!(parse_rfc3339_utc_fast(s.as_bytes()), Some(want), "{s}");
        }
        assert_eq!(parse_rfc3339_utc_fast(b"2023-02-29T00:00:00Z"), None);
        assert_eq!(
            parse_ts("2026-11-22T01:23:45+01:00"),
            Some(
                chrono::DateTime::parse_from_rfc3339("2026-11-22T01:23:45+01:00")
                    .unwrap()
                    .timestamp_millis()
            )
        );
    }

    #[test]
    fn four_digit_days_match_the_general_formula() {
        for y in 0..=9999 {
            for m in 1..=12 {
                for d in [1, 15, 28, days_in_month(y, m)] {
                    let want = crate::timefmt::days_from_civil(y, m, d);
                    assert_eq!(
                        crate::timefmt::days_from_civil_4digit(y as u32, m as u32, d as u32),
                        want,
                        "{y}-{m}-{d}"
                    );
                }
            }
        }
        assert_eq!(crate::timefmt::days_from_civil_4digit(1970, 1, 1), 0);
        assert_eq!(crate::timefmt::days_from_civil_4digit(0, 1, 1), -719_528);
    }

    proptest::proptest! {
        /// The fast path gives chrono's answer or leaves the string to it,
        /// on valid times and on times with any one byte changed.
        #[test]
        fn fast_rfc3339_is_chronos_answer_or_none(
            t in (1i64..10_000, 1i64..13, 1i64..32, 0i64..24, 0i64..60, 0i64..60, 0i64..1000),
            at in 0usize..24,
            byte in proptest::prelude::any::<u8>(),
        ) {
            let (y, mo, d, h, mi, s, ms) = t;
            let good = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{ms:03}Z");
            let chrono_ms = |s: &[u8]| {
                std::str::from_utf8(s)
                    .ok()
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
                    .map(|t| t.timestamp_millis())
            };
            let want = chrono_ms(good.as_bytes());
            proptest::prop_assert_eq!(parse_rfc3339_utc_fast(good.as_bytes()), want);
            let mut bad = good.into_bytes();
            bad[at] = byte;
            let fast = parse_rfc3339_utc_fast(&bad);
            proptest::prop_assert!(fast.is_none() || fast == chrono_ms(&bad), "{fast:?}");
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_are_accounted(lines in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..20)) {
            let mut c = RawChunk::new("p".into());
            for (i, l) in lines.iter().enumerate() {
                c.push(l, Position { partition: 0, offset: i as i64 });
            }
            let mut d = Decoder::new(ValidationConfig::default());
            let out = d.decode(&c, 0);
            proptest::prop_assert_eq!(out.events.num_rows() + out.dead_letters.num_rows(), lines.len());
        }
    }
}
