//! Mergeable sketches used by the per-minute aggregates: an HDR latency
//! histogram (the `hdrhistogram` crate's layout and V2 encoding, values in
//! microseconds, 3 significant digits; aggregates keep it sparse as
//! [`SparseHist`]) and a HyperLogLog distinct counter for unique users. Both serialise
//! to bytes so partial aggregates can cross SQL, Redis and instances, and merge
//! exactly (HDR) or losslessly for the sketch (HLL). Pure code.

use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};

/// Latency histogram in microseconds. `u32` counts (saturating, 4.29 billion
/// per bucket: far beyond one window of one service) halve the memory of a
/// histogram (~92 KB instead of ~184 KB), which every open window of every
/// service and partition holds. Serialised counts are width-independent.
pub type LatencyHist = Histogram<u32>;

/// Highest trackable latency: one hour, in microseconds.
const MAX_US: u64 = 3_600_000_000;

pub fn new_hist() -> LatencyHist {
    // Bounds are constants within what the crate accepts, so this cannot fail.
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid HDR bounds")
}

/// Records a latency given in milliseconds (clamped into the trackable range).
pub fn record_ms(h: &mut LatencyHist, ms: f64) {
    h.saturating_record(us_of_ms(ms));
}

/// A latency in milliseconds as the microseconds a histogram records.
fn us_of_ms(ms: f64) -> u64 {
    (ms * 1000.0).round().clamp(1.0, MAX_US as f64) as u64
}

/// Quantile in milliseconds, `None` for an empty histogram.
pub fn quantile_ms(h: &LatencyHist, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0)
}

pub fn hist_to_bytes(h: &LatencyHist) -> Vec<u8> {
    let mut out = Vec::new();
    // Writing into a Vec cannot fail for a well-formed histogram.
    V2Serializer::new()
        .serialize(h, &mut out)
        .expect("serialize HDR histogram into memory");
    out
}

/// hdrhistogram's cookie of its uncompressed V2 encoding, and the length of
/// that encoding's header (the counts follow).
const V2_COOKIE: u32 = 0x1c84_9313;
const V2_HEADER: usize = 40;

/// Whether `b` is framed like [`hist_to_bytes`]'s output (hdrhistogram's
/// uncompressed V2 cookie, and a payload length matching the bytes), without
/// decoding the counts.
pub fn hist_bytes_framed(b: &[u8]) -> bool {
    let be = |r: std::ops::Range<usize>| {
        b.get(r)
            .and_then(|w| w.try_into().ok())
            .map(u32::from_be_bytes)
    };
    be(0..4) == Some(V2_COOKIE) && be(4..8).is_some_and(|n| V2_HEADER + n as usize == b.len())
}

pub fn hist_from_bytes(b: &[u8]) -> Option<LatencyHist> {
    let h: LatencyHist = Deserializer::new().deserialize(&mut &b[..]).ok()?;
    Some(h)
}

/// Merges `other` into `h`; values beyond the bounds are clamped, never lost.
pub fn hist_merge(h: &mut LatencyHist, other: &LatencyHist) {
    if h.add(other).is_err() {
        for v in other.iter_recorded() {
            h.saturating_record_n(v.value_iterated_to().min(MAX_US), v.count_at_value());
        }
    }
}

/// HDR's index → value mapping for [`new_hist`]'s layout: lowest value 1
/// (unit magnitude 0) and 3 significant digits, i.e. 2048 sub-buckets per
/// bucket of which the upper 1024 (2^10) are used above bucket 0. The
/// lowest value of the index's range, so recording it lands in index `i`.
fn value_at_index(i: usize) -> u64 {
    const HALF_MAG: u32 = 10;
    let half = 1usize << HALF_MAG;
    let sub = ((i & (half - 1)) + half) as u64;
    match (i >> HALF_MAG).checked_sub(1) {
        Some(bucket) => sub << bucket,
        None => sub - half as u64,
    }
}

/// The non-zero (index, count) pairs of `b`, counts saturated to `u32`, if
/// it is hdrhistogram's plain V2 encoding of a histogram with [`new_hist`]'s
/// bounds and precision and no index beyond `len`; `None` for anything else
/// (other layouts, truncated or corrupt bytes).
fn own_layout_counts(b: &[u8], len: usize) -> Option<Vec<(u32, u32)>> {
    let u32_at = |o: usize| Some(u32::from_be_bytes(b.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_be_bytes(b.get(o..o + 8)?.try_into().ok()?));
    let own = hist_bytes_framed(b)
        && u32_at(8)? == 0 // normalising index offset
        && u32_at(12)? == 3 // significant digits
        && u64_at(16)? == 1 // lowest discernible value
        && u64_at(24)? == MAX_US
        && f64::from_bits(u64_at(32)?) == 1.0; // integer to double ratio
    if !own {
        return None;
    }
    let mut out = Vec::new();
    let (mut pos, mut index) = (V2_HEADER, 0usize);
    while pos < b.len() {
        // LEB128, except that a ninth byte contributes all its 8 bits.
        let mut zz = 0u64;
        let mut shift = 0;
        loop {
            let byte = *b.get(pos)?;
            pos += 1;
            if shift == 56 {
                zz |= u64::from(byte) << 56;
                break;
            }
            zz |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        // Zig-zag: a negative number is a run of that many zero counts.
        let v = ((zz >> 1) as i64) ^ -((zz & 1) as i64);
        if v < 0 {
            index = index.checked_add(v.unsigned_abs() as usize)?;
        } else {
            if v > 0 {
                if index >= len {
                    return None;
                }
                out.push((index as u32, u32::try_from(v).unwrap_or(u32::MAX)));
            }
            index += 1;
        }
    }
    Some(out)
}

/// Number of counts in [`new_hist`]'s layout (indices `0..own_len()`).
fn own_len() -> usize {
    static LEN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LEN.get_or_init(|| new_hist().distinct_values())
}

/// The counts index of `v` (≥ 1, ≤ [`MAX_US`]) in [`new_hist`]'s layout:
/// the inverse of [`value_at_index`].
fn index_of(v: u64) -> usize {
    // 2048 sub-buckets (mask 2047): bucket 0 holds 0..2048, bucket k the
    // upper half of 0..2048 << k.
    let bucket = 53 - (v | 2047).leading_zeros();
    let sub = (v >> bucket) as usize;
    ((bucket as usize) << 10) + sub
}

/// The highest value counted at index `i` (HDR's `highest_equivalent`).
fn highest_at_index(i: usize) -> u64 {
    let bucket = (i >> 10).saturating_sub(1);
    value_at_index(i) + (1u64 << bucket) - 1
}

/// An HDR latency histogram in [`new_hist`]'s layout kept as its non-zero
/// counts only: (index, count) by ascending index, counts saturating at
/// `u32::MAX` like [`LatencyHist`]'s. A window of one service touches a few
/// hundred of the ~23,000 indices, so merging, serialising and reading
/// quantiles walk those instead of a ~92 KB dense array that had to be
/// allocated, zeroed and scanned each time (~7% of the pipeline's
/// instructions). Serialises to the same bytes as [`hist_to_bytes`] of the
/// equivalent [`LatencyHist`], and gives the same quantiles.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseHist {
    counts: Vec<(u32, u32)>,
}

impl SparseHist {
    /// A histogram of latencies in milliseconds, each recorded as
    /// [`record_ms`] would.
    pub fn of_ms(values: impl IntoIterator<Item = f64>) -> SparseHist {
        let mut idx: Vec<u32> = values
            .into_iter()
            .map(|ms| index_of(us_of_ms(ms)) as u32)
            .collect();
        idx.sort_unstable();
        let mut counts: Vec<(u32, u32)> = Vec::new();
        for i in idx {
            match counts.last_mut() {
                Some((j, n)) if *j == i => *n = n.saturating_add(1),
                _ => counts.push((i, 1)),
            }
        }
        SparseHist { counts }
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }

    /// Memory held on the heap, in bytes.
    pub fn heap_bytes(&self) -> usize {
        self.counts.capacity() * std::mem::size_of::<(u32, u32)>()
    }

    /// Total count (saturating).
    pub fn len(&self) -> u64 {
        self.counts
            .iter()
            .fold(0u64, |t, &(_, n)| t.saturating_add(u64::from(n)))
    }

    /// Adds `o`'s counts (saturating per index, as [`hist_merge`] does).
    pub fn merge(&mut self, o: &SparseHist) {
        if o.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts.clone_from(&o.counts);
            return;
        }
        let (a, b) = (&self.counts, &o.counts);
        let mut out = Vec::with_capacity(a.len() + b.len());
        let (mut x, mut y) = (0, 0);
        while x < a.len() && y < b.len() {
            let (ia, na) = a[x];
            let (ib, nb) = b[y];
            if ia < ib {
                out.push((ia, na));
                x += 1;
            } else if ib < ia {
                out.push((ib, nb));
                y += 1;
            } else {
                out.push((ia, na.saturating_add(nb)));
                x += 1;
                y += 1;
            }
        }
        out.extend_from_slice(&a[x..]);
        out.extend_from_slice(&b[y..]);
        self.counts = out;
    }

    /// Merges serialised bytes; `false` (and `self` unchanged) when `b` is
    /// not a histogram.
    pub fn merge_bytes(&mut self, b: &[u8]) -> bool {
        match SparseHist::from_bytes(b) {
            Some(o) => {
                self.merge(&o);
                true
            }
            None => false,
        }
    }

    /// Reads any V2 histogram: [`new_hist`]'s layout directly, others by
    /// decoding and merging into that layout (values beyond it clamped).
    pub fn from_bytes(b: &[u8]) -> Option<SparseHist> {
        if let Some(counts) = own_layout_counts(b, own_len()) {
            return Some(SparseHist { counts });
        }
        let o = hist_from_bytes(b)?;
        let mut h = new_hist();
        hist_merge(&mut h, &o);
        Some(SparseHist::from_dense(&h))
    }

    /// The counts of a dense histogram of [`new_hist`]'s layout.
    pub fn from_dense(h: &LatencyHist) -> SparseHist {
        SparseHist {
            counts: h
                .iter_recorded()
                .map(|v| {
                    (
                        index_of(v.value_iterated_to().clamp(1, MAX_US)) as u32,
                        v.count_at_value(),
                    )
                })
                .collect(),
        }
    }

    /// hdrhistogram's plain V2 encoding, byte for byte what [`hist_to_bytes`]
    /// writes for the same counts: the header, then zig-zag LEB128 counts up
    /// to the highest non-zero one, a run of zeros written as its negated
    /// length (a single zero as a zero count).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(V2_HEADER + 3 * self.counts.len() + 1);
        out.extend_from_slice(&V2_COOKIE.to_be_bytes());
        out.extend_from_slice(&0u32.to_be_bytes()); // payload length, below
        out.extend_from_slice(&0u32.to_be_bytes()); // normalising index offset
        out.extend_from_slice(&3u32.to_be_bytes()); // significant digits
        out.extend_from_slice(&1u64.to_be_bytes()); // lowest discernible value
        out.extend_from_slice(&MAX_US.to_be_bytes());
        out.extend_from_slice(&1.0f64.to_bits().to_be_bytes());
        let zz = |v: i64| ((v << 1) ^ (v >> 63)) as u64;
        let mut next = 0u32;
        for &(i, n) in &self.counts {
            match i - next {
                0 => {}
                1 => leb128(&mut out, 0),
                gap => leb128(&mut out, zz(-i64::from(gap))),
            }
            leb128(&mut out, zz(i64::from(n)));
            next = i + 1;
        }
        if self.counts.is_empty() {
            // An empty histogram's one count (index 0).
            leb128(&mut out, 0);
        }
        let payload = (out.len() - V2_HEADER) as u32;
        out[4..8].copy_from_slice(&payload.to_be_bytes());
        out
    }

    /// (lowest value in milliseconds, count) of each non-empty bucket, by
    /// ascending value.
    pub fn iter_ms(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        self.counts
            .iter()
            .map(|&(i, n)| (value_at_index(i as usize) as f64 / 1000.0, u64::from(n)))
    }

    /// Quantile in milliseconds (`q` clamped to 0..=1), as
    /// [`quantile_ms`] gives for the equivalent [`LatencyHist`]; `None` when
    /// empty.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let q = q.clamp(0.0, 1.0);
        let total = self.len();
        if total == 0 {
            return None;
        }
        let target = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0u64;
        for &(i, n) in &self.counts {
            seen = seen.saturating_add(u64::from(n));
            if seen >= target {
                let i = i as usize;
                let v = if q == 0.0 {
                    value_at_index(i)
                } else {
                    highest_at_index(i)
                };
                return Some(v as f64 / 1000.0);
            }
        }
        self.counts
            .last()
            .map(|&(i, _)| highest_at_index(i as usize) as f64 / 1000.0)
    }
}

/// LEB128 as hdrhistogram writes it (values here stay far below 2^56, where
/// its 9-byte form would differ).
fn leb128(out: &mut Vec<u8>, mut v: u64) {
    debug_assert!(v < 1 << 56);
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `2^-r`, exactly, from the exponent bits: `powi` per register (4,096 per
/// count, a count per minute row) was ~0.5% of the pipeline's CPU.
fn inv_pow2(r: u8) -> f64 {
    // Registers hold at most 64 - HLL_P + 1 = 53: a normal f64 exponent.
    f64::from_bits(u64::from(1023 - u16::from(r).min(1022)) << 52)
}

/// HyperLogLog with 2^12 registers (≈1.6% standard error), small-range corrected.
#[derive(Clone, Debug, PartialEq)]
pub struct Hll {
    regs: Vec<u8>,
}

const HLL_P: u32 = 12;
const HLL_M: usize = 1 << HLL_P;

impl Default for Hll {
    fn default() -> Self {
        Hll {
            regs: vec![0; HLL_M],
        }
    }
}

/// splitmix64: a fixed, well-mixed hash so sketches agree across processes.
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Hll {
    pub fn add(&mut self, v: u64) {
        let h = mix64(v);
        let idx = (h >> (64 - HLL_P)) as usize;
        let rest = h << HLL_P;
        let rank = (rest.leading_zeros() + 1).min(64 - HLL_P + 1) as u8;
        if self.regs[idx] < rank {
            self.regs[idx] = rank;
        }
    }

    pub fn merge(&mut self, o: &Hll) {
        for (a, b) in self.regs.iter_mut().zip(&o.regs) {
            *a = (*a).max(*b);
        }
    }

    pub fn count(&self) -> u64 {
        let m = HLL_M as f64;
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let (sum, zeros) = self.regs.iter().fold((0.0, 0usize), |(s, z), &r| {
            (s + inv_pow2(r), z + usize::from(r == 0))
        });
        let est = alpha * m * m / sum;
        let est = if est <= 2.5 * m && zeros > 0 {
            m * (m / zeros as f64).ln()
        } else {
            est
        };
        est.round() as u64
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        self.regs.clone()
    }

    pub fn from_bytes(b: &[u8]) -> Option<Hll> {
        (b.len() == HLL_M).then(|| Hll { regs: b.to_vec() })
    }

    /// Compact encoding: the non-zero registers as (u16 index, u8 value)
    /// after a u16 count, or the dense registers when that is smaller.
    pub fn to_compact(&self) -> Vec<u8> {
        let nz = self.regs.iter().filter(|&&r| r != 0).count();
        if nz * 3 + 3 > HLL_M {
            let mut out = Vec::with_capacity(HLL_M + 1);
            out.push(1u8);
            out.extend_from_slice(&self.regs);
            return out;
        }
        let mut out = Vec::with_capacity(3 + nz * 3);
        out.push(0u8);
        out.extend_from_slice(&(nz as u16).to_le_bytes());
        for (i, &r) in self.regs.iter().enumerate() {
            if r != 0 {
                out.extend_from_slice(&(i as u16).to_le_bytes());
                out.push(r);
            }
        }
        out
    }

    /// Decodes [`Hll::to_compact`]; returns the sketch and the bytes read.
    pub fn from_compact(b: &[u8]) -> Option<(Hll, usize)> {
        match *b.first()? {
            1 => Some((Hll::from_bytes(b.get(1..1 + HLL_M)?)?, 1 + HLL_M)),
            0 => {
                let n = u16::from_le_bytes([*b.get(1)?, *b.get(2)?]) as usize;
                let body = b.get(3..3 + n * 3)?;
                let mut h = Hll::default();
                for e in body.chunks_exact(3) {
                    let i = u16::from_le_bytes([e[0], e[1]]) as usize;
                    *h.regs.get_mut(i)? = e[2];
                }
                Some((h, 3 + n * 3))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hist_roundtrip_and_merge_is_exact() {
        let mut a = new_hist();
        let mut b = new_hist();
        for i in 1..=1000 {
            record_ms(&mut a, i as f64);
            record_ms(&mut b, (i + 1000) as f64);
        }
        let a2 = hist_from_bytes(&hist_to_bytes(&a)).unwrap();
        assert_eq!(a2.len(), 1000);
        let mut m = a2;
        hist_merge(&mut m, &b);
        assert_eq!(m.len(), 2000);
        let p50 = quantile_ms(&m, 0.5).unwrap();
        assert!((p50 - 1000.0).abs() <= 1.0, "{p50}");
        let p99 = quantile_ms(&m, 0.99).unwrap();
        assert!((p99 - 1980.0).abs() <= 2.5, "{p99}");
        assert_eq!(quantile_ms(&new_hist(), 0.5), None);
    }

    #[test]
    fn hist_reads_wide_counts_and_saturates_instead_of_overflowing() {
        // Blobs written with u64 counts (checkpoints and Redis partials of
        // earlier versions) read back as long as every count fits.
        let mut wide: Histogram<u64> = Histogram::new_with_bounds(1, MAX_US, 3).unwrap();
        wide.record_n(1500, 7).unwrap();
        wide.record_n(250_000, 3).unwrap();
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&wide, &mut bytes).unwrap();
        let h = hist_from_bytes(&bytes).unwrap();
        assert_eq!(h.len(), 10);
        assert_eq!(h.count_at(1500), 7);
        assert_eq!(quantile_ms(&h, 1.0).map(|v| v.round()), Some(250.0));
        // Merging past u32::MAX saturates the bucket instead of failing.
        let mut a = new_hist();
        a.saturating_record_n(2000, u32::MAX - 1);
        let mut b = new_hist();
        b.saturating_record_n(2000, 5);
        b.saturating_record_n(9000, 1);
        let (sa, sb) = (SparseHist::from_dense(&a), SparseHist::from_dense(&b));
        hist_merge(&mut a, &b);
        assert_eq!(a.count_at(2000), u32::MAX);
        assert_eq!(a.count_at(9000), 1);
        let mut s = sa;
        s.merge(&sb);
        assert_eq!(s.to_bytes(), hist_to_bytes(&a));
        // A wide count read sparse saturates too.
        let mut huge: Histogram<u64> = Histogram::new_with_bounds(1, MAX_US, 3).unwrap();
        huge.record_n(1500, u64::from(u32::MAX) + 9).unwrap();
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&huge, &mut bytes).unwrap();
        assert_eq!(
            SparseHist::from_bytes(&bytes).unwrap().len(),
            u64::from(u32::MAX)
        );
    }

    #[test]
    fn merging_bytes_equals_merging_the_decoded_histogram() {
        let mut src = new_hist();
        // Every bucket's range, its edges and the extremes.
        for e in 0..32 {
            let v = 1u64 << e;
            for x in [v, v + 1, v + v / 3, (v * 2).saturating_sub(1)] {
                src.saturating_record_n(x.min(MAX_US), (e % 5 + 1) as u32);
            }
        }
        src.saturating_record_n(MAX_US, 2);
        let bytes = hist_to_bytes(&src);
        let mut slow = new_hist();
        slow.saturating_record_n(2000, 3);
        let mut fast = SparseHist::from_dense(&slow);
        assert!(fast.merge_bytes(&bytes));
        hist_merge(&mut slow, &hist_from_bytes(&bytes).unwrap());
        assert_eq!(fast, SparseHist::from_dense(&slow));
        assert_eq!(fast.to_bytes(), hist_to_bytes(&slow));
        assert_eq!(fast.len(), slow.len());
        for q in [0.0, 0.5, 0.99, 1.0] {
            assert_eq!(fast.quantile_ms(q), quantile_ms(&slow, q));
        }
    }

    proptest::proptest! {
        #[test]
        fn merging_bytes_matches_the_decoder(
            values in proptest::collection::vec((1u64..=MAX_US, 1u32..1000), 0..200),
            base in proptest::collection::vec(1u64..=MAX_US, 0..20),
        ) {
            let mut src = new_hist();
            for (v, n) in values {
                src.saturating_record_n(v, n);
            }
            let mut slow = new_hist();
            for v in base {
                slow.saturating_record(v);
            }
            let mut fast = SparseHist::from_dense(&slow);
            let bytes = hist_to_bytes(&src);
            proptest::prop_assert!(fast.merge_bytes(&bytes));
            hist_merge(&mut slow, &hist_from_bytes(&bytes).unwrap());
            proptest::prop_assert_eq!(fast.to_bytes(), hist_to_bytes(&slow));
            proptest::prop_assert_eq!(&fast, &SparseHist::from_dense(&slow));
        }
    }

    #[test]
    fn index_of_inverts_value_at_index_and_agrees_with_hdr() {
        let h = new_hist();
        for v in [
            1u64, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 123_456, MAX_US,
        ] {
            let i = index_of(v);
            assert!(value_at_index(i) <= v && v <= highest_at_index(i), "{v}");
            assert_eq!(value_at_index(i), h.lowest_equivalent(v), "{v}");
            assert_eq!(highest_at_index(i), h.highest_equivalent(v), "{v}");
        }
        assert!(index_of(MAX_US) < own_len());
    }

    #[test]
    fn empty_sparse_histogram_is_an_empty_hdr_one() {
        let e = SparseHist::default();
        assert_eq!(e.to_bytes(), hist_to_bytes(&new_hist()));
        assert_eq!(SparseHist::from_bytes(&e.to_bytes()), Some(e.clone()));
        assert_eq!(e.quantile_ms(0.5), None);
        assert!(SparseHist::from_bytes(b"junk").is_none());
        let mut m = SparseHist::of_ms([2.0]);
        assert!(!m.merge_bytes(b"junk"));
        assert_eq!(m, SparseHist::of_ms([2.0]));
    }

    proptest::proptest! {
        #[test]
        fn sparse_histogram_matches_hdrhistogram(
            a in proptest::collection::vec(0.0f64..4.0e6, 0..300),
            b in proptest::collection::vec(0.0f64..2.0e3, 0..300),
            q in 0.0f64..=1.0,
        ) {
            let dense = |vs: &[f64]| {
                let mut h = new_hist();
                for &v in vs {
                    record_ms(&mut h, v);
                }
                h
            };
            let (da, db) = (dense(&a), dense(&b));
            let (sa, sb) = (SparseHist::of_ms(a.iter().copied()), SparseHist::of_ms(b.iter().copied()));
            proptest::prop_assert_eq!(sa.to_bytes(), hist_to_bytes(&da));
            proptest::prop_assert_eq!(&SparseHist::from_dense(&da), &sa);
            proptest::prop_assert_eq!(SparseHist::from_bytes(&hist_to_bytes(&da)), Some(sa.clone()));
            let mut dm = da.clone();
            hist_merge(&mut dm, &db);
            let mut sm = sa.clone();
            proptest::prop_assert!(sm.merge_bytes(&sb.to_bytes()));
            proptest::prop_assert_eq!(sm.to_bytes(), hist_to_bytes(&dm));
            proptest::prop_assert_eq!(sm.len(), dm.len());
            for q in [q, 0.0, 0.5, 0.99, 1.0] {
                proptest::prop_assert_eq!(sm.quantile_ms(q), quantile_ms(&dm, q));
            }
        }
    }

    #[test]
    fn merging_bytes_of_other_layouts_or_garbage() {
        // A histogram of other bounds goes through the decoder, same result.
        let mut other: Histogram<u64> = Histogram::new_with_bounds(10, 1_000_000, 2).unwrap();
        other.record_n(12_345, 4).unwrap();
        let mut bytes = Vec::new();
        V2Serializer::new().serialize(&other, &mut bytes).unwrap();
        let mut h = SparseHist::default();
        assert!(h.merge_bytes(&bytes));
        let mut slow = new_hist();
        hist_merge(&mut slow, &hist_from_bytes(&bytes).unwrap());
        assert_eq!(h, SparseHist::from_dense(&slow));
        assert_eq!(h.len(), 4);
        // Garbage and truncated bytes are refused and leave `h` as it was.
        let mut own = new_hist();
        own.record_n(777, 2).unwrap();
        let good = hist_to_bytes(&own);
        let before = h.clone();
        for bad in [&b"nope"[..], &good[..good.len() - 1], &good[..20], &[]] {
            assert!(!h.merge_bytes(bad));
        }
        assert_eq!(h, before);
    }

    #[test]
    fn inv_pow2_is_exact() {
        for r in 0..=64u8 {
            let want = 2f64.powi(-(r as i32));
            assert_eq!(inv_pow2(r).to_bits(), want.to_bits(), "r = {r}");
        }
        assert_eq!(inv_pow2(0), 1.0);
        assert_eq!(inv_pow2(53), 1.0 / 9_007_199_254_740_992.0);
    }

    #[test]
    fn hll_compact_roundtrip_sparse_and_dense() {
        for n in [0u64, 10, 500, 100_000] {
            let mut h = Hll::default();
            for v in 0..n {
                h.add(v);
            }
            let b = h.to_compact();
            let (back, used) = Hll::from_compact(&b).unwrap();
            assert_eq!(back, h);
            assert_eq!(used, b.len());
            assert!(b.len() <= HLL_M + 1);
        }
        assert!(Hll::from_compact(&[0, 5, 0, 1]).is_none());
    }

    #[test]
    fn hll_counts_within_error_and_merges() {
        let mut a = Hll::default();
        for v in 0..50 {
            a.add(v);
        }
        assert_eq!(a.count(), 50);
        let mut b = Hll::default();
        for v in 0..100_000u64 {
            b.add(v);
        }
        let c = b.count() as f64;
        assert!((c - 100_000.0).abs() / 100_000.0 < 0.05, "{c}");
        let mut x = Hll::default();
        let mut y = Hll::default();
        for v in 0..1000 {
            x.add(v);
            y.add(v + 500);
        }
        x.merge(&y);
        let c = x.count() as f64;
        assert!((c - 1500.0).abs() < 45.0, "{c}");
        assert_eq!(Hll::from_bytes(&x.to_bytes()).unwrap(), x);
    }
}
