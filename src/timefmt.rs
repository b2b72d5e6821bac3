//! Time and text formats shared by every stage: calendar days, RFC 3339
//! timestamps, hex, and this process's random id. Pure: no I/O (the id is
//! drawn once from the thread RNG).

/// RFC 3339 UTC with milliseconds.
pub fn fmt_ts(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// [`days_from_civil`] for a four-digit year (0..=9999), in unsigned
/// arithmetic: shifted one 400-year era up, every quotient is of a
/// non-negative number by a constant, which compiles to a multiply and a
/// shift (the signed `div_euclid` did not; every event's timestamp passes here).
#[inline]
pub fn days_from_civil_4digit(y: u32, m: u32, d: u32) -> i64 {
    debug_assert!(y <= 9999 && (1..=12).contains(&m) && (1..=31).contains(&d));
    let y = y + 400 - u32::from(m <= 2);
    let (era, yoe) = (y / 400, y % 400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    i64::from(era * 146_097 + doe) - 719_468 - 146_097
}

/// Lower-case hex of bytes.
pub fn to_hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

/// Bytes of lower- or upper-case hex; `None` if it is not hex.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    let v = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(v(p[0])? << 4 | v(p[1])?))
        .collect()
}

/// A random id of this process, in in-progress file names (several
/// instances may share the data directory).
pub fn instance_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| format!("{:016x}", rand::random::<u64>()))
}

/// `<process id> <instance id>`: who wrote something, for operators and
/// tests (lease holder, epoch markers, model versions, file lineage).
pub fn instance_label() -> String {
    format!("{} {}", std::process::id(), instance_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_odd_length() {
        let b = vec![0u8, 1, 0xab, 0xff, 0x10];
        assert_eq!(to_hex(&b), "0001abff10");
        assert_eq!(from_hex(&to_hex(&b)).unwrap(), b);
        assert!(from_hex("abc").is_none());
        assert!(from_hex("zz").is_none());
    }

    #[test]
    fn calendar_days_and_timestamps_agree_with_chrono() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(
            days_from_civil_4digit(2024, 2, 29),
            days_from_civil(2024, 2, 29)
        );
        assert_eq!(fmt_ts(86_400_000 + 1_234), "1970-01-02T00:00:01.234Z");
    }
}
