//! The event as read from JSON, before validation: borrowed strings, and
//! the event time in any of its accepted forms (RFC 3339, epoch
//! milliseconds as a number or a numeric string). Shared by the serde path
//! and the flat parser ([`super::flat`]). Pure.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

/// Event time: RFC 3339 string, or epoch milliseconds as a number or numeric string.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Ts(pub(super) i64);

impl<'de> Deserialize<'de> for Ts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Ts;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an RFC 3339 timestamp or epoch milliseconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Ts, E> {
                i64::try_from(v)
                    .map(Ts)
                    .map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Ts, E> {
                Ok(Ts(v))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Ts, E> {
                if v.is_finite() && v.abs() < 9.0e15 {
                    Ok(Ts(v as i64))
                } else {
                    Err(E::custom("timestamp out of range"))
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Ts, E> {
                parse_ts(v).map(Ts).ok_or_else(|| {
                    E::custom(format!(
                        "cannot parse timestamp {v:?} (RFC 3339 or epoch ms)"
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses an RFC 3339 timestamp (or a numeric string of epoch ms) to epoch ms.
pub fn parse_ts(s: &str) -> Option<i64> {
    if let Some(ms) = parse_rfc3339_utc_fast(s.as_bytes()) {
        return Some(ms);
    }
    if let Ok(ms) = s.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Fast path for the common `YYYY-MM-DDTHH:MM:SS[.fff]Z` shape; anything else
/// falls back to chrono. The fixed 19-byte head is checked and read as one
/// array (no per-digit bounds checks or early exits: one test over all of its
/// digits), since every event's timestamp passes here.
pub(super) fn parse_rfc3339_utc_fast(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || *b.last()? != b'Z' {
        return None;
    }
    let h: &[u8; 19] = b[..19].try_into().ok()?;
    // Digit values; a non-digit gives a value above 9.
    let v = h.map(|c| c.wrapping_sub(b'0'));
    const DIGITS: [usize; 14] = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    if DIGITS.iter().fold(0u8, |m, &i| m | u8::from(v[i] > 9)) != 0
        || h[4] != b'-'
        || h[7] != b'-'
        || (h[10] != b'T' && h[10] != b' ')
        || h[13] != b':'
        || h[16] != b':'
    {
        return None;
    }
    let two = |i: usize| i64::from(v[i]) * 10 + i64::from(v[i + 1]);
    let (y, mo, da) = (two(0) * 100 + two(2), two(5), two(8));
    let (hh, mi, sec) = (two(11), two(14), two(17));
    if !(1..=12).contains(&mo) || !(1..=31).contains(&da) || hh > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let frac = &b[19..b.len() - 1];
    let mut ms = 0i64;
    if !frac.is_empty() {
        if frac[0] != b'.' || frac.len() < 2 || !frac[1..].iter().all(u8::is_ascii_digit) {
            return None;
        }
        let digits = &frac[1..];
        for k in 0..3 {
            ms = ms * 10 + digits.get(k).map_or(0, |c| (c - b'0') as i64);
        }
    }
    if da > days_in_month(y, mo) {
        return None;
    }
    let days = crate::timefmt::days_from_civil_4digit(y as u32, mo as u32, da as u32);
    Some(((days * 24 + hh) * 60 + mi) * 60_000 + sec * 1000 + ms)
}

pub(super) fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// A JSON string borrowed from the input when it has no escapes (the usual
/// case), owned only when unescaping changed it. serde's own `Option<Cow<str>>`
/// always allocates: its borrowing applies to a bare `Cow<str>` field only.
#[derive(Debug, PartialEq)]
pub(super) struct Text<'a>(pub(super) Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

impl std::ops::Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

#[derive(Deserialize, Default, Debug, PartialEq)]
pub(super) struct RawEvent<'a> {
    pub(super) event_id: Option<u64>,
    pub(super) ts: Option<Ts>,
    pub(super) user_id: Option<u64>,
    pub(super) item_id: Option<u64>,
    #[serde(borrow)]
    pub(super) event_type: Option<Text<'a>>,
    pub(super) rating: Option<f32>,
    pub(super) price: Option<f64>,
    #[serde(borrow)]
    pub(super) session_id: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) service: Option<Text<'a>>,
    #[serde(borrow)]
    pub(super) endpoint: Option<Text<'a>>,
    pub(super) status: Option<u16>,
    pub(super) latency_ms: Option<f64>,
}
