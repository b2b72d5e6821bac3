//! Mergeable partial aggregates of one (window, service): counters, the
//! latency histogram and the distinct-user sketch, with their byte forms
//! (for the store and checkpoints). Pure.

use crate::sketch::{Hll, SparseHist};

/// A mergeable partial aggregate of one (window, service).
#[derive(Debug, Clone)]
pub struct Partial {
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub latency_sum_ms: f64,
    pub latency_count: i64,
    pub latency_max_ms: Option<f64>,
    pub hist: SparseHist,
    pub users: Hll,
    /// Requests by event type: view, cart, purchase, rating.
    pub types: [i64; 4],
}

impl Default for Partial {
    fn default() -> Self {
        Partial {
            requests: 0,
            errors: 0,
            client_errors: 0,
            latency_sum_ms: 0.0,
            latency_count: 0,
            latency_max_ms: None,
            hist: SparseHist::default(),
            users: Hll::default(),
            types: [0; 4],
        }
    }
}

impl Partial {
    /// Binary encoding (format 2): counts, latency sums, the HDR histogram
    /// (V2), the compact HLL and the event type counts. Used in checkpoints
    /// and Redis partials. Format 1 (without the event type counts, written
    /// by earlier versions) is still read.
    pub fn to_bytes(&self) -> Vec<u8> {
        let hist = self.hist.to_bytes();
        let mut out = Vec::with_capacity(96 + hist.len());
        out.push(2u8);
        for v in [
            self.requests,
            self.errors,
            self.client_errors,
            self.latency_count,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.latency_sum_ms.to_le_bytes());
        out.extend_from_slice(&self.latency_max_ms.unwrap_or(f64::NAN).to_le_bytes());
        out.extend_from_slice(&(hist.len() as u32).to_le_bytes());
        out.extend_from_slice(&hist);
        out.extend_from_slice(&self.users.to_compact());
        for v in self.types {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out
    }

    /// Decodes [`Partial::to_bytes`]; `None` for anything malformed.
    pub fn from_bytes(b: &[u8]) -> Option<Partial> {
        let s = StoredPartial::from_bytes(b)?;
        Some(Partial {
            requests: s.requests,
            errors: s.errors,
            client_errors: s.client_errors,
            latency_count: s.latency_count,
            latency_sum_ms: s.latency_sum_ms,
            latency_max_ms: s.latency_max_ms,
            hist: SparseHist::from_bytes(&s.hist)?,
            users: s.users,
            types: s.types,
        })
    }

    pub fn merge(&mut self, o: &Partial) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.client_errors += o.client_errors;
        self.latency_sum_ms += o.latency_sum_ms;
        self.latency_count += o.latency_count;
        self.latency_max_ms = match (self.latency_max_ms, o.latency_max_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.hist.merge(&o.hist);
        self.users.merge(&o.users);
        for (a, b) in self.types.iter_mut().zip(o.types) {
            *a += b;
        }
    }
}

/// A partial in the form the merge query takes: counters and the
/// distinct-user sketch decoded, the latency histogram serialised
/// ([`SparseHist::to_bytes`]). Read back from the store, the
/// histogram's bytes are used as they are: decoding an HDR histogram (and
/// allocating its ~92 KB of counts) only to serialise it again was ~8% of the
/// Kafka path's CPU.
#[derive(Debug, Clone)]
pub struct StoredPartial {
    pub requests: i64,
    pub errors: i64,
    pub client_errors: i64,
    pub latency_count: i64,
    pub latency_sum_ms: f64,
    pub latency_max_ms: Option<f64>,
    pub hist: Vec<u8>,
    pub users: Hll,
    pub types: [i64; 4],
}

impl StoredPartial {
    /// The serialised form of a partial held in memory.
    pub fn of(p: &Partial) -> StoredPartial {
        StoredPartial {
            requests: p.requests,
            errors: p.errors,
            client_errors: p.client_errors,
            latency_count: p.latency_count,
            latency_sum_ms: p.latency_sum_ms,
            latency_max_ms: p.latency_max_ms,
            hist: p.hist.to_bytes(),
            users: p.users.clone(),
            types: p.types,
        }
    }

    /// Reads [`Partial::to_bytes`] without decoding the histogram (its header
    /// and length are checked); `None` for anything malformed.
    pub fn from_bytes(b: &[u8]) -> Option<StoredPartial> {
        let format = *b.first()?;
        if format != 1 && format != 2 {
            return None;
        }
        let word = |i: usize| -> Option<[u8; 8]> { b.get(1 + i * 8..9 + i * 8)?.try_into().ok() };
        let i = |k: usize| word(k).map(i64::from_le_bytes);
        let f = |k: usize| word(k).map(f64::from_le_bytes);
        let max = f(5)?;
        let hl = u32::from_le_bytes(b.get(49..53)?.try_into().ok()?) as usize;
        let hist = b.get(53..53 + hl)?;
        if !crate::sketch::hist_bytes_framed(hist) {
            return None;
        }
        let (users, used) = Hll::from_compact(b.get(53 + hl..)?)?;
        let end = 53 + hl + used;
        let mut types = [0i64; 4];
        if format == 2 {
            for (k, t) in types.iter_mut().enumerate() {
                let at = end + 8 * k;
                *t = i64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?);
            }
        }
        if end + if format == 2 { 32 } else { 0 } != b.len() {
            return None;
        }
        Some(StoredPartial {
            requests: i(0)?,
            errors: i(1)?,
            client_errors: i(2)?,
            latency_count: i(3)?,
            latency_sum_ms: f(4)?,
            latency_max_ms: (!max.is_nan()).then_some(max),
            hist: hist.to_vec(),
            users,
            types,
        })
    }
}
