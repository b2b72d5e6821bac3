//! Serving-side item index: consumes item factor records (the compact binary
//! encoding of [`encode`]); produces top-k items for a user vector, excluding
//! given items. Flat `f32` arrays and a bounded min-heap: one pass over the
//! catalogue per request, no allocation per item (the model's `dot` and
//! `top_k`). Pure code.

use std::collections::HashSet;

use crate::factors::bpr::top_k;
use crate::factors::kernels::dot;
use crate::factors::model::FactorRecord;

/// Encodes a factor record: little-endian `f32` bias followed by the vector.
pub fn encode(bias: f32, v: &[f32]) -> Vec<u8> {
    FactorRecord {
        bias,
        vector: v.to_vec(),
    }
    .to_bytes()
}

/// Decodes a factor record; `None` when the length is not a positive multiple of 4.
pub fn decode(b: &[u8]) -> Option<(f32, Vec<f32>)> {
    FactorRecord::from_bytes(b).map(|r| (r.bias, r.vector))
}

/// All item factors of one model version, laid out flat.
#[derive(Debug, Clone, Default)]
pub struct ItemIndex {
    pub dim: usize,
    pub ids: Vec<u64>,
    pub bias: Vec<f32>,
    pub vecs: Vec<f32>,
}

impl ItemIndex {
    /// Builds an index from (item, record) pairs; records of another dimension are skipped.
    pub fn from_records(records: impl IntoIterator<Item = (u64, Vec<u8>)>) -> Self {
        let mut idx = ItemIndex::default();
        for (id, rec) in records {
            let Some((b, v)) = decode(&rec) else { continue };
            if idx.ids.is_empty() {
                idx.dim = v.len();
            }
            if v.len() != idx.dim {
                continue;
            }
            idx.ids.push(id);
            idx.bias.push(b);
            idx.vecs.extend_from_slice(&v);
        }
        idx
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Top `k` items by `bias_i + u·v_i`, best first, skipping `exclude`.
    pub fn top_k(&self, user: &[f32], k: usize, exclude: &HashSet<u64>) -> Vec<(u64, f32)> {
        if user.len() != self.dim || self.dim == 0 {
            return Vec::new();
        }
        let d = self.dim;
        top_k(
            self.ids.len(),
            k,
            |j| self.bias[j] + dot(&self.vecs[j * d..(j + 1) * d], user),
            |j| exclude.contains(&self.ids[j]),
        )
        .into_iter()
        .map(|(j, s)| (self.ids[j], s))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn codec_roundtrip_and_rejects_garbage() {
        let b = encode(0.5, &[1.0, -2.0, 3.5]);
        assert_eq!(b.len(), 16);
        assert_eq!(decode(&b), Some((0.5, vec![1.0, -2.0, 3.5])));
        assert_eq!(decode(&[1, 2, 3]), None);
        assert_eq!(decode(&[]), None);
    }

    proptest! {
        #[test]
        fn top_k_equals_a_full_sort(
            items in proptest::collection::vec((-5.0f32..5.0, -5.0f32..5.0, -1.0f32..1.0), 1..200),
            user in (-2.0f32..2.0, -2.0f32..2.0),
            k in 1usize..20,
        ) {
            let idx = ItemIndex::from_records(items.iter().enumerate().map(|(i, (a, b, bias))| (i as u64, encode(*bias, &[*a, *b]))));
            let exclude: HashSet<u64> = (0..items.len() as u64).filter(|i| i % 7 == 3).collect();
            let got = idx.top_k(&[user.0, user.1], k, &exclude);
            let mut all: Vec<(u64, f32)> = items.iter().enumerate()
                .filter(|(i, _)| !exclude.contains(&(*i as u64)))
                .map(|(i, (a, b, bias))| (i as u64, bias + a * user.0 + b * user.1))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            prop_assert_eq!(got.len(), all.len());
            for (g, w) in got.iter().zip(&all) {
                prop_assert!((g.1 - w.1).abs() < 1e-4);
            }
        }
    }
}
