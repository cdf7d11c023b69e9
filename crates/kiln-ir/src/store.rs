//! The tensor store: checkpoint tensors that weight nodes refer to by name.
//!
//! A weight node names a store entry; two nodes naming the same entry (or one node used by
//! several ops) is a *tied* weight, stored once. The store keeps the bytes exactly as they
//! were read (memory-mapped where possible), so quantized blocks stay addressable by the
//! backend; [`TensorData::to_f32`] is the only way to get numbers out.

use crate::format::{Format, FormatError};
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A shared, immutable byte range: a slice of a `Vec<u8>` or of a memory map.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Bytes {
    /// Wraps a whole owner (a `Vec<u8>`, an `memmap2::Mmap`, ...).
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>) -> Bytes {
        let len = (*owner).as_ref().len();
        Bytes { owner, range: 0..len }
    }

    pub fn from_vec(v: Vec<u8>) -> Bytes {
        Bytes::new(Arc::new(v))
    }

    /// A sub-range of these bytes; `None` if it is out of bounds.
    pub fn slice(&self, range: Range<usize>) -> Option<Bytes> {
        if range.start > range.end || range.end > self.range.len() {
            return None;
        }
        let start = self.range.start + range.start;
        Some(Bytes { owner: self.owner.clone(), range: start..start + range.len() })
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.owner).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({} bytes)", self.len())
    }
}

/// One stored tensor: its logical shape (row-major, outermost first), format and bytes.
#[derive(Clone, Debug)]
pub struct TensorData {
    pub format: Format,
    pub shape: Vec<u64>,
    pub bytes: Bytes,
}

impl TensorData {
    /// Checks that the byte length matches shape and format.
    pub fn new(format: Format, shape: Vec<u64>, bytes: Bytes) -> Result<TensorData, FormatError> {
        let elements: u64 = shape.iter().product();
        let expected = format.byte_len(elements)?;
        if bytes.len() as u64 != expected {
            return Err(FormatError::Size { format, elements, expected, found: bytes.len() as u64 });
        }
        Ok(TensorData { format, shape, bytes })
    }

    pub fn from_f32(shape: Vec<u64>, values: &[f32]) -> TensorData {
        assert_eq!(shape.iter().product::<u64>(), values.len() as u64, "shape and data disagree");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        TensorData { format: Format::F32, shape, bytes: Bytes::from_vec(bytes) }
    }

    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// The tensor's values, decoded exactly as [`Format::dequantize`] defines.
    pub fn to_f32(&self) -> Result<Vec<f32>, FormatError> {
        self.format.dequantize(self.bytes.as_slice(), self.elements())
    }

    /// A 64-bit FNV-1a hash of the stored bytes, printed in the IR text so that two IR
    /// dumps show whether they refer to the same weights.
    pub fn checksum(&self) -> u64 {
        fnv1a(self.bytes.as_slice())
    }
}

pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Tensors by name, iterated in name order.
#[derive(Clone, Debug, Default)]
pub struct TensorStore {
    tensors: BTreeMap<String, TensorData>,
}

impl TensorStore {
    pub fn new() -> TensorStore {
        TensorStore::default()
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: TensorData) {
        self.tensors.insert(name.into(), tensor);
    }

    pub fn get(&self, name: &str) -> Option<&TensorData> {
        self.tensors.get(name)
    }

    pub fn remove(&mut self, name: &str) -> Option<TensorData> {
        self.tensors.remove(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &TensorData)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_slice_bounds() {
        let b = Bytes::from_vec((0..10).collect());
        let s = b.slice(2..5).unwrap();
        assert_eq!(s.as_slice(), &[2, 3, 4]);
        assert_eq!(s.slice(1..3).unwrap().as_slice(), &[3, 4]);
        assert!(s.slice(2..4).is_none());
    }

    #[test]
    fn tensor_size_is_checked() {
        let err = TensorData::new(Format::F16, vec![2, 3], Bytes::from_vec(vec![0; 10])).unwrap_err();
        assert_eq!(err.to_string(), "f16 data for 6 elements must be 12 bytes, found 10");
    }
}
