//! Byte encodings of the factor model: the compact serde encodings of its
//! numeric vectors for snapshots, the [`FactorRecord`]s (bias + vector) and
//! item-id lists published to Redis, and the size check of a decoded model.
//!
//! Snapshots: consumes a model's `Vec`s of numbers (and its users' recent-item rings);
//! produces one byte string each, the values little-endian back to back,
//! where serde's default wrote one CBOR item per number (for `f32`, a
//! header and a half-precision check each: a 15 MB model took 48 ms to
//! encode and 128 ms to read, now 8 and 16 ms). Reading accepts both forms,
//! so snapshots written before stay readable. Pure.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserialize, Deserializer, SeqAccess, Visitor};
use serde::ser::Serializer;

/// A number with a fixed-size little-endian form.
pub trait Le: Copy {
    const SIZE: usize;
    fn put(self, out: &mut Vec<u8>);
    /// `b` holds exactly [`Le::SIZE`] bytes.
    fn get(b: &[u8]) -> Self;
}

macro_rules! le {
    ($($t:ty),*) => {$(
        impl Le for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn put(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("exact size"))
            }
        }
    )*};
}
le!(u32, u64, f32, f64);

fn pack<T: Le>(v: &[T]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len() * T::SIZE);
    for x in v {
        x.put(&mut out);
    }
    out
}

fn unpack<T: Le, E: de::Error>(b: &[u8]) -> Result<Vec<T>, E> {
    if !b.len().is_multiple_of(T::SIZE) {
        return Err(E::custom(format_args!(
            "packed vector of {} bytes is not a multiple of {}",
            b.len(),
            T::SIZE
        )));
    }
    Ok(b.chunks_exact(T::SIZE).map(T::get).collect())
}

/// The elements of a sequence: the form serde wrote before packing.
fn seq_vec<'de, T: Deserialize<'de>, A: SeqAccess<'de>>(mut seq: A) -> Result<Vec<T>, A::Error> {
    let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
    while let Some(x) = seq.next_element()? {
        v.push(x);
    }
    Ok(v)
}

/// `#[serde(with = "packed")]` for a `Vec` of numbers.
pub fn serialize<T: Le, S: Serializer>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_bytes(&pack(v))
}

/// Reads the packed form, or the sequence of numbers serde wrote before.
pub fn deserialize<'de, T, D>(d: D) -> Result<Vec<T>, D::Error>
where
    T: Le + Deserialize<'de>,
    D: Deserializer<'de>,
{
    struct V<T>(PhantomData<T>);
    impl<'de, T: Le + Deserialize<'de>> Visitor<'de> for V<T> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a packed vector of numbers or a sequence of numbers")
        }
        fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Vec<T>, E> {
            unpack(b)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<T>, A::Error> {
            seq_vec(seq)
        }
    }
    d.deserialize_any(V(PhantomData))
}

/// `#[serde(with = "packed::rings")]` for the users' recent-item rings:
/// per ring its length and next position (u32 each), then its (item, weight)
/// pairs (u32, f32); read back from that or from serde's former form.
pub(crate) mod rings {
    use super::*;
    use crate::factors::ring::Ring;

    pub(crate) fn serialize<S: Serializer>(v: &[Ring], s: S) -> Result<S::Ok, S::Error> {
        let n: usize = v.iter().map(|r| 8 + 8 * r.items.len()).sum();
        let mut out = Vec::with_capacity(n);
        for r in v {
            (r.items.len() as u32).put(&mut out);
            (r.next as u32).put(&mut out);
            for &(i, w) in &r.items {
                i.put(&mut out);
                w.put(&mut out);
            }
        }
        s.serialize_bytes(&out)
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Ring>, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Vec<Ring>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "packed rings or a sequence of rings")
            }
            fn visit_bytes<E: de::Error>(self, mut b: &[u8]) -> Result<Vec<Ring>, E> {
                let short = || E::custom("packed rings are truncated");
                let mut out = Vec::new();
                while !b.is_empty() {
                    let head = b.get(..8).ok_or_else(short)?;
                    let len = u32::get(&head[..4]) as usize;
                    let next = u32::get(&head[4..]) as usize;
                    let body = b.get(8..8 + 8 * len).ok_or_else(short)?;
                    let items = body
                        .chunks_exact(8)
                        .map(|p| (u32::get(&p[..4]), f32::get(&p[4..])))
                        .collect();
                    out.push(Ring { items, next });
                    b = &b[8 + 8 * len..];
                }
                Ok(out)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Vec<Ring>, A::Error> {
                seq_vec(seq)
            }
        }
        d.deserialize_any(V)
    }
}

/// Packs item ids as the `{p}:reco:hist` values: u64 little-endian each.
pub fn encode_items(items: impl ExactSizeIterator<Item = u64>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 * items.len());
    for i in items {
        out.extend_from_slice(&i.to_le_bytes());
    }
    out
}

/// Inverse of [`encode_items`]; a trailing partial id is ignored.
pub fn decode_items(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .collect()
}

/// A user or item record as stored externally: bias, then the latent vector.
#[derive(Debug, Clone, PartialEq)]
pub struct FactorRecord {
    pub bias: f32,
    pub vector: Vec<f32>,
}

impl FactorRecord {
    /// `4 * (1 + dim)` bytes: the bias then each component, f32 little-endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 * (1 + self.vector.len()));
        Self::write(&mut out, self.bias, &self.vector);
        out
    }

    /// Appends the [`FactorRecord::to_bytes`] form of (`bias`, `vector`) to `out`.
    pub fn write(out: &mut Vec<u8>, bias: f32, vector: &[f32]) {
        out.extend_from_slice(&bias.to_le_bytes());
        for x in vector {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }

    /// Inverse of [`FactorRecord::to_bytes`]; `None` unless the length is a
    /// positive multiple of four.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.is_empty() || !b.len().is_multiple_of(4) {
            return None;
        }
        let mut it = b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
        let bias = it.next()?;
        Some(Self {
            bias,
            vector: it.collect(),
        })
    }
}

/// `Err` naming `what` unless it holds `want` values.
pub(super) fn same_len(what: &str, got: usize, want: usize) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!(
            "{what}: {got} values where the model's size needs {want}"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::FactorRecord;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Packed {
        #[serde(with = "super")]
        f: Vec<f32>,
        #[serde(with = "super")]
        u: Vec<u64>,
    }

    #[derive(serde::Serialize)]
    struct Plain {
        f: Vec<f32>,
        u: Vec<u64>,
    }

    fn cbor<T: serde::Serialize>(v: &T) -> Vec<u8> {
        let mut out = Vec::new();
        ciborium::into_writer(v, &mut out).unwrap();
        out
    }

    #[test]
    fn packed_vectors_round_trip_and_read_the_former_form() {
        let f: Vec<f32> = (0..5000).map(|i| (i as f32 * 0.37).sin() * 1e3).collect();
        let u: Vec<u64> = (0..300).map(|i| u64::MAX - i * 7919).collect();
        let p = Packed {
            f: f.clone(),
            u: u.clone(),
        };
        let packed = cbor(&p);
        let plain = cbor(&Plain { f, u });
        // 4 bytes a float, 8 an integer, plus headers
        assert!(packed.len() < 5000 * 4 + 300 * 8 + 64, "{}", packed.len());
        assert!(packed.len() < plain.len());
        let back: Packed = ciborium::from_reader(&packed[..]).unwrap();
        assert_eq!(back, p);
        let old: Packed = ciborium::from_reader(&plain[..]).unwrap();
        assert_eq!(old, p);
        // special values keep their bits
        let odd = Packed {
            f: vec![f32::NAN, f32::INFINITY, -0.0, f32::from_bits(1)],
            u: vec![],
        };
        let back: Packed = ciborium::from_reader(&cbor(&odd)[..]).unwrap();
        assert_eq!(
            back.f.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            odd.f.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_packed_vector_of_the_wrong_length_is_an_error() {
        #[derive(serde::Serialize)]
        struct Bytes {
            #[serde(with = "serde_bytes_like")]
            f: Vec<u8>,
            u: Vec<u64>,
        }
        mod serde_bytes_like {
            pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
                s.serialize_bytes(v)
            }
        }
        let bad = cbor(&Bytes {
            f: vec![0; 7],
            u: vec![],
        });
        let err = ciborium::from_reader::<Packed, _>(&bad[..]).unwrap_err();
        assert!(err.to_string().contains("not a multiple of 4"), "{err}");
    }

    #[test]
    fn record_round_trips() {
        let r = FactorRecord {
            bias: -0.25,
            vector: vec![1.0, -2.5, 3.125],
        };
        let b = r.to_bytes();
        assert_eq!(b.len(), 16);
        assert_eq!(&b[..4], &(-0.25f32).to_le_bytes());
        assert_eq!(FactorRecord::from_bytes(&b), Some(r));
        assert_eq!(FactorRecord::from_bytes(&b[..5]), None);
        assert_eq!(FactorRecord::from_bytes(&[]), None);
    }
}
