//! Fast path of the decoder. Consumes one record's text; produces its
//! [`RawEvent`] when the record is the usual shape: one flat JSON object whose
//! values are strings without escapes, plain numbers or `null`. Anything else
//! (escapes, nesting, booleans, duplicate keys, a value of the wrong type,
//! out-of-range numbers, trailing bytes) yields `None`, and the caller parses
//! the record with serde_json, which gives the same event or the error. So
//! this path decides nothing on its own: it only skips serde_json's generic
//! machinery where the result is certain. Strings are scanned eight bytes at
//! a time, short numbers in one pass, and keys are first compared with the
//! one the producer's learned key order predicts: ~2,900 instructions per
//! typical 226-byte event (5,250 with a `memchr2` call per string). Pure code.

use std::borrow::Cow;

use super::event::{RawEvent, Text, Ts, parse_ts};

/// The known keys with their quotes, by field number.
const QUOTED: [&[u8]; 12] = [
    b"\"event_id\"",
    b"\"ts\"",
    b"\"user_id\"",
    b"\"item_id\"",
    b"\"event_type\"",
    b"\"rating\"",
    b"\"price\"",
    b"\"session_id\"",
    b"\"service\"",
    b"\"endpoint\"",
    b"\"status\"",
    b"\"latency_ms\"",
];

/// The order a producer writes its keys in, learned from the records seen:
/// for each field (and 12 for the start of a record), the known field that
/// followed it last time. A producer's records nearly always share one key
/// order, so the next key is first compared with the predicted one, which
/// spares scanning it as a string and looking it up. A wrong guess costs one
/// comparison and changes nothing else.
#[derive(Debug, Clone)]
pub(super) struct KeyOrder([u8; 13]);

impl Default for KeyOrder {
    /// The schema's order.
    fn default() -> Self {
        KeyOrder([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0])
    }
}

/// Parses `s` if it is a flat object of known shape; `None` means "ask serde_json".
#[cfg(test)]
pub(super) fn parse(s: &str) -> Option<RawEvent<'_>> {
    parse_with(s, &mut KeyOrder::default())
}

/// [`parse`], predicting keys from and teaching them to `order`.
pub(super) fn parse_with<'a>(s: &'a str, order: &mut KeyOrder) -> Option<RawEvent<'a>> {
    let mut c = Cursor {
        s,
        b: s.as_bytes(),
        i: 0,
    };
    let mut ev = RawEvent::default();
    let mut seen = 0u16;
    c.ws();
    c.eat(b'{')?;
    c.ws();
    if c.peek() == Some(b'}') {
        c.i += 1;
    } else {
        let mut prev = 12usize;
        loop {
            c.ws();
            let guess = usize::from(order.0[prev]);
            let bit = match QUOTED.get(guess) {
                Some(k) if starts_with_at(c.b, c.i, k) => {
                    c.i += k.len();
                    guess as u16
                }
                _ => field(c.string()?),
            };
            if bit < 12 {
                // serde_json refuses a repeated field.
                if seen & (1 << bit) != 0 {
                    return None;
                }
                seen |= 1 << bit;
                order.0[prev] = bit as u8;
                prev = usize::from(bit);
            }
            c.ws();
            c.eat(b':')?;
            c.ws();
            match bit {
                0 => ev.event_id = c.nullable(Cursor::u64)?,
                1 => ev.ts = c.nullable(Cursor::ts)?,
                2 => ev.user_id = c.nullable(Cursor::u64)?,
                3 => ev.item_id = c.nullable(Cursor::u64)?,
                4 => ev.event_type = c.nullable(Cursor::text)?,
                5 => ev.rating = c.nullable(Cursor::float32)?,
                6 => ev.price = c.nullable(Cursor::float)?,
                7 => ev.session_id = c.nullable(Cursor::text)?,
                8 => ev.service = c.nullable(Cursor::text)?,
                9 => ev.endpoint = c.nullable(Cursor::text)?,
                10 => ev.status = c.nullable(|c| u16::try_from(c.u64()?).ok())?,
                11 => ev.latency_ms = c.nullable(Cursor::float)?,
                _ => c.skip_scalar()?,
            }
            c.ws();
            match c.next()? {
                b',' => {}
                b'}' => break,
                _ => return None,
            }
        }
    }
    c.ws();
    (c.i == c.b.len()).then_some(ev)
}

/// The field's number (12 for any other key): picked by length and first
/// and last bytes, then confirmed with one comparison (a `match` on the
/// strings compared them one after another).
fn field(key: &str) -> u16 {
    let b = key.as_bytes();
    let (Some(&first), Some(&last)) = (b.first(), b.last()) else {
        return 12;
    };
    let (bit, name) = match (b.len(), first, last) {
        (8, b'e', b'd') => (0, "event_id"),
        (2, b't', b's') => (1, "ts"),
        (7, b'u', b'd') => (2, "user_id"),
        (7, b'i', b'd') => (3, "item_id"),
        (10, b'e', b'e') => (4, "event_type"),
        (6, b'r', b'g') => (5, "rating"),
        (5, b'p', b'e') => (6, "price"),
        (10, b's', b'd') => (7, "session_id"),
        (7, b's', b'e') => (8, "service"),
        (8, b'e', b't') => (9, "endpoint"),
        (6, b's', b's') => (10, "status"),
        (10, b'l', b's') => (11, "latency_ms"),
        _ => return 12,
    };
    if key == name { bit } else { 12 }
}

/// Whether `b[i..]` starts with `k` (4 to 16 bytes, a [`QUOTED`] key): two
/// overlapping word comparisons instead of a `memcmp` call.
#[inline(always)]
fn starts_with_at(b: &[u8], i: usize, k: &[u8]) -> bool {
    let n = k.len();
    debug_assert!((4..=16).contains(&n));
    let Some(w) = b.get(i..i + n) else {
        return false;
    };
    if n >= 8 {
        ends_equal::<8>(w, k)
    } else {
        ends_equal::<4>(w, k)
    }
}

/// Whether equal-length `w` and `k` (N to 2N bytes) agree in their first
/// and last N bytes, which together cover them: two N-byte comparisons.
#[inline(always)]
fn ends_equal<const N: usize>(w: &[u8], k: &[u8]) -> bool {
    let n = k.len();
    let word = |s: &[u8], at: usize| s.get(at..at + N).and_then(|x| <[u8; N]>::try_from(x).ok());
    word(w, 0) == word(k, 0) && word(w, n - N) == word(k, n - N)
}

/// Whether a byte ends a plain string: a quote, a backslash or a control
/// character.
fn is_special(c: u8) -> bool {
    c == b'"' || c == b'\\' || c < 0x20
}

/// The high bit of each byte of `w` (little-endian) that [`is_special`],
/// exact up to the first such byte (the bit tricks may also flag bytes after
/// it, never before).
fn special_bytes(w: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let zero = |x: u64| x.wrapping_sub(ONES) & !x;
    let quote = zero(w ^ (ONES * u64::from(b'"')));
    let backslash = zero(w ^ (ONES * u64::from(b'\\')));
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    (quote | backslash | control) & HIGH
}

/// Powers of ten exactly representable as f64.
const POW10: [f64; 16] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
];

enum Num {
    U(u64),
    I(i64),
    F(f64),
}

struct Cursor<'a> {
    s: &'a str,
    b: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    /// JSON whitespace only (serde_json refuses any other).
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// `null` as `Some(None)`, else the value `f` reads.
    fn nullable<T>(&mut self, f: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.b[self.i..].starts_with(b"null") {
            self.i += 4;
            return Some(None);
        }
        f(self).map(Some)
    }

    /// A string without escapes or control characters, borrowed. Scans
    /// eight bytes per step (the keys and values here are mostly shorter
    /// than a vector search's set-up and call).
    fn string(&mut self) -> Option<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let rest = &self.b[start..];
        let mut end = 0;
        while let Some(w) = rest.get(end..end + 8) {
            let w = u64::from_le_bytes(w.try_into().ok()?);
            let hits = special_bytes(w);
            if hits != 0 {
                end += hits.trailing_zeros() as usize / 8;
                break;
            }
            end += 8;
        }
        // The tail under eight bytes, byte by byte.
        while !is_special(*rest.get(end)?) {
            end += 1;
        }
        if rest[end] != b'"' {
            return None;
        }
        self.i = start + end + 1;
        // Both ends are ASCII quotes, so these are char boundaries.
        Some(&self.s[start..start + end])
    }

    fn text(&mut self) -> Option<Text<'a>> {
        self.string().map(|s| Text(Cow::Borrowed(s)))
    }

    /// The extent of a number in JSON's grammar, and whether it is an
    /// integer (no fraction or exponent).
    fn number(&mut self) -> Option<(&'a str, bool)> {
        let start = self.i;
        if self.peek() == Some(b'-') {
            self.i += 1;
        }
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.i += 1;
            self.digit()?;
            self.digits();
            integer = false;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.digit()?;
            self.digits();
            integer = false;
        }
        Some((&self.s[start..self.i], integer))
    }

    fn digit(&mut self) -> Option<()> {
        self.next()?.is_ascii_digit().then_some(())
    }

    fn digits(&mut self) {
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
    }

    /// A non-negative integer that fits in u64, read in one pass.
    fn u64(&mut self) -> Option<u64> {
        let b = self.b;
        let mut i = self.i;
        let mut v = u64::from(b.get(i)?.wrapping_sub(b'0'));
        if v > 9 {
            return None;
        }
        i += 1;
        if v != 0 {
            while let Some(d) = b.get(i).map(|c| c.wrapping_sub(b'0')).filter(|d| *d <= 9) {
                v = v.checked_mul(10)?.checked_add(u64::from(d))?;
                i += 1;
            }
        }
        // A fraction, an exponent or a digit after a leading zero: not a
        // plain u64 (serde_json refuses those for an integer field).
        if let Some(b'.' | b'e' | b'E' | b'0'..=b'9') = b.get(i) {
            return None;
        }
        self.i = i;
        Some(v)
    }

    /// A number as serde_json hands it to a visitor: a non-negative integer
    /// as u64, a negative one as i64, anything else (and `-0`) as f64; an
    /// integer beyond those or a float out of range is left to serde_json.
    fn num(&mut self) -> Option<Num> {
        // One pass over the usual short numbers: at most 15 digits, no
        // exponent. The digits as an integer divided by a power of ten, both
        // exact in f64, so the one rounding of the division is the correctly
        // rounded result, as `parse` (and serde_json with float_roundtrip)
        // would give. Anything else is re-read below.
        let (b, start) = (self.b, self.i);
        let mut i = start;
        let neg = b.get(i) == Some(&b'-');
        i += usize::from(neg);
        let digit = |i: usize| b.get(i).map(|c| c.wrapping_sub(b'0')).filter(|d| *d <= 9);
        let first = i;
        let mut m = u64::from(digit(i)?);
        i += 1;
        if m != 0 {
            while let Some(d) = digit(i) {
                m = m * 10 + u64::from(d);
                i += 1;
                if i - first > 15 {
                    return self.num_slow();
                }
            }
        }
        let mut frac = 0;
        if b.get(i) == Some(&b'.') {
            i += 1;
            while let Some(d) = digit(i) {
                m = m * 10 + u64::from(d);
                i += 1;
                frac += 1;
                if i - first - 1 > 15 {
                    return self.num_slow();
                }
            }
            if frac == 0 {
                return None;
            }
        }
        match b.get(i) {
            Some(b'e' | b'E') => return self.num_slow(),
            // A leading zero followed by digits is not JSON.
            Some(b'0'..=b'9') => return None,
            _ => {}
        }
        self.i = i;
        Some(match (frac, neg) {
            (0, false) => Num::U(m),
            (0, true) if m != 0 => Num::I(-(m as i64)),
            _ => {
                let v = m as f64 / POW10[frac];
                Num::F(if neg { -v } else { v })
            }
        })
    }

    /// [`Cursor::num`] for the numbers its one pass leaves: more than 15
    /// digits, or an exponent.
    fn num_slow(&mut self) -> Option<Num> {
        let (n, integer) = self.number()?;
        if integer {
            // Over 15 digits, so never `-0` (which serde_json reads as f64).
            return if n.starts_with('-') {
                n.parse().ok().map(Num::I)
            } else {
                n.parse().ok().map(Num::U)
            };
        }
        n.parse::<f64>().ok().filter(|v| v.is_finite()).map(Num::F)
    }

    /// An f64 field's number (serde's primitive visitor casts).
    fn float(&mut self) -> Option<f64> {
        Some(match self.num()? {
            Num::U(v) => v as f64,
            Num::I(v) => v as f64,
            Num::F(v) => v,
        })
    }

    /// An f32 field's number, cast straight from what was parsed; one
    /// beyond f32's range is left to serde_json (an error there).
    fn float32(&mut self) -> Option<f32> {
        let v = match self.num()? {
            Num::U(v) => v as f32,
            Num::I(v) => v as f32,
            Num::F(v) => v as f32,
        };
        v.is_finite().then_some(v)
    }

    /// Event time: an RFC 3339 (or numeric) string, or integer epoch ms.
    fn ts(&mut self) -> Option<Ts> {
        if self.peek() == Some(b'"') {
            return parse_ts(self.string()?).map(Ts);
        }
        match self.number()? {
            (n, true) => n.parse::<i64>().ok().map(Ts),
            _ => None,
        }
    }

    /// An ignored field's value, if it is a scalar this path reads.
    fn skip_scalar(&mut self) -> Option<()> {
        match self.peek()? {
            b'"' => self.string().map(drop),
            b'n' => self.nullable(|_| None::<()>).map(drop),
            _ => self.number().map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// What serde_json makes of `s` (the reference), or `None` on an error.
    fn reference(s: &str) -> Option<RawEvent<'_>> {
        serde_json::from_str(s).ok()
    }

    #[test]
    fn usual_records_take_the_fast_path_with_serdes_result() {
        let mut g = crate::source::generator::Generator::new(Default::default());
        let mut line = Vec::new();
        for _ in 0..2000 {
            line.clear();
            g.next_into(&mut line).unwrap();
            let s = std::str::from_utf8(&line).unwrap();
            if let Some(want) = reference(s) {
                assert_eq!(parse(s), Some(want), "{s}");
            }
        }
        let s = r#" { "event_id" : 7 , "ts" : 1700000000000, "rating": 4, "price": -0,
            "latency_ms": 1.5e2, "status": null, "extra": "x", "n": -3.25E-1, "z": null } "#;
        let ev = parse(s).unwrap();
        assert_eq!(ev, reference(s).unwrap());
        assert_eq!(
            (ev.rating, ev.latency_ms, ev.status),
            (Some(4.0), Some(150.0), None)
        );
        assert!(ev.price.unwrap().is_sign_negative());
    }

    #[test]
    fn a_learned_key_order_never_changes_a_result() {
        let mut g = crate::source::generator::Generator::new(Default::default());
        let mut order = KeyOrder::default();
        let mut line = Vec::new();
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for n in 0..600 {
            line.clear();
            g.next_into(&mut line).unwrap();
            let v: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&line).unwrap();
            let mut fields: Vec<_> = v.into_iter().collect();
            // Runs of records in one order, then another; some with an
            // unknown key, a dropped key or a near-miss of a known one.
            if n % 100 == 0 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            let mut y = x;
            for i in (1..fields.len()).rev() {
                y = y.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                fields.swap(i, (y >> 33) as usize % (i + 1));
            }
            match n % 7 {
                0 => fields.push(("extra".into(), 1.into())),
                1 => drop(fields.pop()),
                2 => fields.push(("ts2".into(), "x".into())),
                _ => {}
            }
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v)| format!("{}:{v}", serde_json::Value::from(k.as_str())))
                .collect();
            let s = format!("{{{}}}", body.join(","));
            let want = reference(&s);
            assert_eq!(parse_with(&s, &mut order), want, "{s}");
        }
    }

    #[test]
    fn anything_unusual_is_left_to_serde_json() {
        for s in [
            r#"{"service":"a\"b"}"#,               // escape
            r#"{"service":"tab	here"}"#,           // control character
            r#"{"user_id":1,"user_id":2}"#,        // duplicate
            r#"{"user_id":1.0}"#,                  // float for an integer
            r#"{"user_id":-1}"#,                   // negative for unsigned
            r#"{"user_id":18446744073709551616}"#, // u64 overflow
            r#"{"status":70000}"#,                 // u16 overflow
            r#"{"service":5}"#,                    // wrong type
            r#"{"extra":{"a":1}}"#,                // nesting
            r#"{"extra":true}"#,                   // boolean
            r#"{"price":1e400}"#,                  // out of range
            r#"{"price":01}"#,                     // leading zero
            r#"{"ts":"yesterday"}"#,               // unparseable time
            r#"{"ts":1.5}"#,                       // fractional ms
            r#"{"user\u005fid":1}"#,               // escaped key
            r#"{"a":1,}"#,                         // trailing comma
            r#"{"a":1} x"#,                        // trailing bytes
            r#"{"a":nul}"#,
            "",
        ] {
            assert!(parse(s).is_none(), "{s}");
        }
        // Which serde_json accepts or rejects on its own.
        assert_eq!(reference(r#"{"user\u005fid":1}"#).unwrap().user_id, Some(1));
        assert!(reference(r#"{"user_id":1,"user_id":2}"#).is_none());
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            any::<u64>().prop_map(|v| v.to_string()),
            any::<i64>().prop_map(|v| v.to_string()),
            (0u32..70_000).prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:?}")),
            any::<f64>().prop_map(|v| format!("{v:e}")),
            (-1.0e6f64..1.0e6).prop_map(|v| format!("{v}")),
            "[a-z0-9/ -]{0,12}".prop_map(|s| format!("\"{s}\"")),
            "[a-z\\\\\"]{0,6}".prop_map(|s| format!("\"{s}\"")),
            Just("\"2026-11-22T00:00:00.005Z\"".to_string()),
            Just("\"1700000000000\"".to_string()),
            Just("true".to_string()),
            Just("{}".to_string()),
            Just("-0".to_string()),
            Just("1.5e-7".to_string()),
        ]
    }

    proptest! {
        /// Whatever the fast path accepts, serde_json parses to the same event.
        #[test]
        fn the_fast_path_agrees_with_serde_json(
            fields in proptest::collection::vec(
                (prop_oneof![
                    Just("event_id"), Just("ts"), Just("user_id"), Just("item_id"),
                    Just("event_type"), Just("rating"), Just("price"), Just("session_id"),
                    Just("service"), Just("endpoint"), Just("status"), Just("latency_ms"),
                    Just("other"),
                ], value(), prop_oneof![Just(""), Just(" "), Just("\n\t")]),
                0..14,
            ),
        ) {
            let body: Vec<String> = fields
                .iter()
                .map(|(k, v, w)| format!("{w}\"{k}\"{w}:{w}{v}{w}"))
                .collect();
            let s = format!("{{{}}}", body.join(","));
            if let Some(fast) = parse(&s) {
                prop_assert_eq!(Some(fast), reference(&s), "{}", s);
            }
        }

        /// The eight-byte string scan ends where a byte-by-byte one does.
        #[test]
        fn the_string_scan_matches_a_naive_one(
            chars in proptest::collection::vec(
                prop_oneof![
                    Just('"'), Just('\\'), Just('\t'), Just('\u{1f}'), Just(' '), Just('~'),
                    Just('é'), Just('\u{7f}'), proptest::char::range('a', 'z'), any::<char>(),
                ],
                0..40,
            ),
        ) {
            let body: String = chars.iter().collect();
            let s = format!("\"{body}");
            let mut c = Cursor { s: &s, b: s.as_bytes(), i: 0 };
            let want = match body.find(|ch: char| ch == '"' || ch == '\\' || ch < ' ') {
                Some(k) if body[k..].starts_with('"') => Some(&body[..k]),
                _ => None,
            };
            prop_assert_eq!(c.string(), want);
        }

        /// Well-typed records, in any order and with any numbers, are all
        /// taken by the fast path, with serde_json's result.
        #[test]
        fn well_typed_records_all_take_the_fast_path(
            ids in proptest::collection::vec(any::<u64>(), 3),
            ms in 0i64..4_102_444_800_000,
            floats in proptest::collection::vec(
                prop_oneof![
                    any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| format!("{v:?}")),
                    any::<f64>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| format!("{v:e}")),
                    any::<i64>().prop_map(|v| v.to_string()),
                    any::<u64>().prop_map(|v| v.to_string()),
                    Just("null".to_string()),
                    // Short decimals, the usual prices and latencies.
                    (0u64..1_000_000_000_000_000, 1usize..16, any::<bool>()).prop_map(|(m, k, neg)| {
                        let d = format!("{m:0>16}");
                        let (int, frac) = d.split_at(16 - k);
                        let int = int.trim_start_matches('0');
                        let int = if int.is_empty() { "0" } else { int };
                        format!("{}{int}.{frac}", if neg { "-" } else { "" })
                    }),
                ],
                3,
            ),
            rating in prop_oneof![
                any::<f32>().prop_filter("finite", |v| v.is_finite()).prop_map(|v| format!("{v:?}")),
                any::<i64>().prop_map(|v| v.to_string()),
                Just("null".to_string()),
            ],
            texts in proptest::collection::vec("[a-zA-Z0-9/_ .:é-]{0,16}", 4),
            status in any::<u16>(),
            order in Just((0..12).collect::<Vec<usize>>()).prop_shuffle(),
        ) {
            let fields = [
                format!("\"event_id\":{}", ids[0]),
                format!("\"ts\":{ms}"),
                format!("\"user_id\":{}", ids[1]),
                format!("\"item_id\":{}", ids[2]),
                format!("\"event_type\":\"{}\"", texts[0]),
                format!("\"rating\":{rating}"),
                format!("\"price\":{}", floats[1]),
                format!("\"session_id\":\"{}\"", texts[1]),
                format!("\"service\":\"{}\"", texts[2]),
                format!("\"endpoint\":\"{}\"", texts[3]),
                format!("\"status\":{status}"),
                format!("\"latency_ms\":{}", floats[2]),
            ];
            let body: Vec<&str> = order.iter().map(|&i| fields[i].as_str()).collect();
            let s = format!("{{{}}}", body.join(","));
            let fast = parse(&s);
            prop_assert!(fast.is_some(), "{}", s);
            prop_assert_eq!(fast, reference(&s), "{}", s);
        }
    }
}
