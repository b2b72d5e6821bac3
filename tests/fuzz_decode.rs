//! Fuzzing the decoder with hostile input: raw bytes, mutated valid records,
//! truncations, deep nesting, huge and non-finite numbers, invalid UTF-8,
//! duplicate keys and overlong fields. For every chunk: no panic, and every
//! record lands exactly once, in `events` or in `dead_letters`.
//!
//! CI runs `PULSE_FUZZ_CASES` cases (default 3,000 chunks of 1–8 records). A
//! long run: `PULSE_FUZZ_CASES=1500000 cargo test --release --test fuzz_decode`.

use datafusion::arrow::array::AsArray;
use datafusion::arrow::datatypes::Int64Type;
use proptest::prelude::*;
use pulse::config::ValidationConfig;
use pulse::decode::Decoder;
use pulse::model::{Position, RawChunk};

const GOOD: &str = r#"{"event_id": 123, "ts": "2026-11-22T01:23:45.123Z", "user_id": 4711, "item_id": 981, "event_type": "view", "rating": null, "price": 19.99, "session_id": "s-88", "service": "catalog", "endpoint": "/items/981", "status": 200, "latency_ms": 35.2}"#;

/// Hand-made hostile shapes, each a real-world failure.
fn hostile() -> Vec<Vec<u8>> {
    let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes();
    let with = |k: &str, v: &str| {
        GOOD.replacen(
            &format!("\"{k}\": "),
            &format!("\"{k}\": {v}, \"x_{k}\": "),
            1,
        )
        .into_bytes()
    };
    vec![
        deep(10_000),
        [b"{\"a\":".to_vec(), deep(100_000), b"}".to_vec()].concat(),
        with("latency_ms", "1e999"),
        with("latency_ms", "NaN"),
        with("latency_ms", "-0"),
        with("event_id", "18446744073709551616"),
        with("event_id", "-1"),
        with("ts", "\"9999-12-31T23:59:59.999Z\""),
        with("ts", "99999999999999999999"),
        with("service", &format!("\"{}\"", "s".repeat(100_000))),
        with("endpoint", "\"/\\ud800\""),
        GOOD.replacen("\"status\": 200", "\"status\": 200, \"status\": 500", 1)
            .into_bytes(),
        GOOD.replacen("catalog", "cat\u{0}alog", 1).into_bytes(),
        b"{\"event_id\": 1, \"service\": \"\xff\xfe\"}".to_vec(),
        Vec::new(),
        b"null".to_vec(),
        b"\n\n\n".to_vec(),
        vec![b'{'; 70_000],
    ]
}

/// One record: raw bytes, a mutation of a valid one, or a hostile shape.
fn record() -> impl Strategy<Value = Vec<u8>> {
    let raw = proptest::collection::vec(any::<u8>(), 0..300);
    let mutated = (
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(edits, cut)| {
            let mut b = GOOD.as_bytes().to_vec();
            for (at, byte, op) in edits {
                if b.is_empty() {
                    break;
                }
                let i = at.index(b.len());
                match op {
                    0 => b[i] = byte,
                    1 => b.insert(i, byte),
                    2 => {
                        b.remove(i);
                    }
                    _ => b.truncate(cut.index(b.len() + 1)),
                }
            }
            b
        });
    let shapes = hostile();
    let shape = (0..shapes.len()).prop_map(move |i| shapes[i].clone());
    prop_oneof![3 => raw, 6 => mutated, 1 => shape, 1 => Just(GOOD.as_bytes().to_vec())]
}

fn cases() -> u32 {
    std::env::var("PULSE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

#[test]
fn every_record_lands_once_in_events_or_dead_letters() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let mut runner = proptest::test_runner::TestRunner::new(config);
    let inputs = AtomicU64::new(0);
    let started = std::time::Instant::now();
    // One decoder for every chunk, as in the pipeline (it keeps state between chunks).
    let d = std::cell::RefCell::new(Decoder::new(ValidationConfig::default()));
    let result = runner.run(&proptest::collection::vec(record(), 1..9), |records| {
        let mut c = RawChunk::new("fuzz".into());
        for (i, r) in records.iter().enumerate() {
            c.push(
                r,
                Position {
                    partition: 3,
                    offset: i as i64 + 100,
                },
            );
        }
        let out = d.borrow_mut().decode(&c, 0);
        let offsets = |b: &datafusion::arrow::record_batch::RecordBatch| -> Vec<i64> {
            b.column_by_name("src_offset")
                .unwrap()
                .as_primitive::<Int64Type>()
                .values()
                .to_vec()
        };
        let mut seen: Vec<i64> = offsets(&out.events);
        seen.extend(offsets(&out.dead_letters));
        seen.sort_unstable();
        let want: Vec<i64> = (0..records.len() as i64).map(|i| i + 100).collect();
        prop_assert_eq!(seen, want);
        let rejected: u64 = out.rejected.iter().map(|(_, n)| n).sum();
        prop_assert_eq!(rejected, out.dead_letters.num_rows() as u64);
        inputs.fetch_add(records.len() as u64, Ordering::Relaxed);
        Ok(())
    });
    eprintln!(
        "fuzz_decode: {} chunks, {} records in {:.1} s",
        cases(),
        inputs.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}
