//! Storage formats of weights, and the exact meaning of each one.
//!
//! A weight node always has an `f32` value in the graph's semantics; its *format* says how
//! that value is stored. The numeric contract of the whole compiler is that a weight's value
//! is exactly [`Format::dequantize`] of its stored bytes: the interpreter materializes it
//! that way, and every backend kernel must read the same numbers.
//!
//! All layouts are row-major over the weight's logical shape (outermost dimension first),
//! so the last dimension is the contiguous one. Block formats group consecutive elements
//! of that flattened order; for a linear weight `[out, in]` a block therefore never crosses
//! an output row when `in` is a multiple of the block size (which the verifier checks).

use half::{bf16, f16};
use std::fmt;

/// How a weight tensor is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// IEEE binary32, little endian.
    F32,
    /// IEEE binary16, little endian; widened exactly to f32.
    F16,
    /// bfloat16 (the top half of an f32), little endian; widened exactly to f32.
    BF16,
    /// GGUF `Q8_0`: blocks of 32 values, each `{ d: f16, q: [i8; 32] }` (34 bytes);
    /// `x[j] = f32(d) * q[j]`.
    Q8_0,
    /// GGUF `Q4_0`: blocks of 32 values, each `{ d: f16, qs: [u8; 16] }` (18 bytes);
    /// `x[j] = f32(d) * ((qs[j] & 0xF) - 8)` and `x[j + 16] = f32(d) * ((qs[j] >> 4) - 8)`
    /// for `j < 16`.
    Q4_0,
    /// GGUF `Q4_1`: blocks of 32 values, each `{ d: f16, m: f16, qs: [u8; 16] }` (20 bytes);
    /// `x[j] = f32(d) * (qs[j] & 0xF) + f32(m)` and
    /// `x[j + 16] = f32(d) * (qs[j] >> 4) + f32(m)` for `j < 16`.
    Q4_1,
}

/// Error from decoding stored bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{format} data for {elements} elements must be {expected} bytes, found {found}")]
    Size { format: Format, elements: u64, expected: u64, found: u64 },
    #[error("{format} stores blocks of {block} values; {elements} elements is not a multiple")]
    Blocks { format: Format, elements: u64, block: u64 },
    #[error("unknown weight format `{0}` (expected f32, f16, bf16, q8_0, q4_0 or q4_1)")]
    Unknown(String),
}

impl Format {
    pub const ALL: [Format; 6] = [Format::F32, Format::F16, Format::BF16, Format::Q8_0, Format::Q4_0, Format::Q4_1];

    /// Name used in the IR text and in error messages.
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::BF16 => "bf16",
            Format::Q8_0 => "q8_0",
            Format::Q4_0 => "q4_0",
            Format::Q4_1 => "q4_1",
        }
    }

    /// Number of consecutive values that share one block (1 for plain formats).
    pub fn block_len(self) -> u64 {
        match self {
            Format::F32 | Format::F16 | Format::BF16 => 1,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => 32,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
        }
    }

    /// Storage bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.block_len() as f64
    }

    /// Exact byte size of `elements` values in this format.
    pub fn byte_len(self, elements: u64) -> Result<u64, FormatError> {
        let block = self.block_len();
        if !elements.is_multiple_of(block) {
            return Err(FormatError::Blocks { format: self, elements, block });
        }
        Ok(elements / block * self.block_bytes())
    }

    /// Decodes `bytes` holding `elements` values into f32, exactly as documented on each
    /// variant. This function *is* the meaning of a stored weight.
    pub fn dequantize(self, bytes: &[u8], elements: u64) -> Result<Vec<f32>, FormatError> {
        let expected = self.byte_len(elements)?;
        if bytes.len() as u64 != expected {
            return Err(FormatError::Size { format: self, elements, expected, found: bytes.len() as u64 });
        }
        let mut out = Vec::with_capacity(elements as usize);
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]).to_f32();
        match self {
            Format::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            Format::F16 => out.extend(bytes.chunks_exact(2).map(half)),
            Format::BF16 => out.extend(bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())),
            Format::Q8_0 => {
                for block in bytes.chunks_exact(34) {
                    let d = half(&block[0..2]);
                    out.extend(block[2..].iter().map(|&q| d * (q as i8) as f32));
                }
            }
            Format::Q4_0 => {
                for block in bytes.chunks_exact(18) {
                    let d = half(&block[0..2]);
                    let qs = &block[2..];
                    out.extend(qs.iter().map(|&q| d * ((q & 0xF) as i32 - 8) as f32));
                    out.extend(qs.iter().map(|&q| d * ((q >> 4) as i32 - 8) as f32));
                }
            }
            Format::Q4_1 => {
                for block in bytes.chunks_exact(20) {
                    let d = half(&block[0..2]);
                    let m = half(&block[2..4]);
                    let qs = &block[4..];
                    out.extend(qs.iter().map(|&q| d * (q & 0xF) as f32 + m));
                    out.extend(qs.iter().map(|&q| d * (q >> 4) as f32 + m));
                }
            }
        }
        Ok(out)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Format::ALL.into_iter().find(|f| f.name() == s).ok_or_else(|| FormatError::Unknown(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_decodes_low_nibbles_first() {
        // d = 0.5, m = -1.0; byte j holds element j (low) and j + 16 (high).
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.5).to_le_bytes());
        block.extend(f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|j| (15 - j) << 4 | j));
        let x = Format::Q4_1.dequantize(&block, 32).unwrap();
        assert_eq!(x[0], -1.0);
        assert_eq!(x[3], 0.5);
        assert_eq!(x[16], 6.5); // 15 * 0.5 - 1
        assert_eq!(x[31], -1.0);
    }

    #[test]
    fn q4_0_is_offset_by_eight() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(2.0).to_le_bytes());
        block.extend([0x8Fu8; 16]);
        let x = Format::Q4_0.dequantize(&block, 32).unwrap();
        assert_eq!(x[0], 14.0); // (15 - 8) * 2
        assert_eq!(x[16], 0.0); // (8 - 8) * 2
    }

    #[test]
    fn q8_0_is_signed() {
        let mut block = Vec::new();
        block.extend(f16::from_f32(0.25).to_le_bytes());
        block.extend((0..32).map(|j| if j == 1 { (-4i8) as u8 } else { 8 }));
        let x = Format::Q8_0.dequantize(&block, 32).unwrap();
        assert_eq!((x[0], x[1]), (2.0, -1.0));
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(Format::Q4_1.dequantize(&[0; 19], 32), Err(FormatError::Size { .. })));
        assert!(matches!(Format::Q8_0.byte_len(33), Err(FormatError::Blocks { .. })));
        assert_eq!(Format::Q4_1.bits_per_weight(), 5.0);
        assert_eq!(Format::BF16.dequantize(&[0x80, 0x3f], 1).unwrap(), vec![1.0]);
    }
}
