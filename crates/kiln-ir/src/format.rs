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
    /// kiln's group-quantized integers; see [`IntFormat`] (`int4g64`, `int3g128a`, ...).
    Int(IntFormat),
    /// 8-bit floats (OCP e4m3, "fn": no infinities) with an f16 scale per group; see
    /// [`Fp8Format`] (`fp8g576`, `fp8g32`).
    Fp8(Fp8Format),
    /// Raw bytes, each read as its unsigned value. Not a format for a weight's values: it
    /// stores the bitmask of a sparse weight (see [`crate::Sparse`]).
    U8,
}

/// fp8 e4m3 values in groups of `group` consecutive values along a row, one f16 scale per
/// group: each block is `{ d: f16, q: [u8; group] }` and `x[j] = f32(d) * e4m3(q[j])`, where
/// [`e4m3`] decodes the byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0
/// is subnormal (`m / 8 * 2^-6`); `S.1111.111` is NaN and the largest finite value is 448.
/// `group` is a multiple of 32; per output channel is the group equal to the row. The value
/// is exact in f32 (an 11-bit scale times a 4-bit significand).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fp8Format {
    pub group: u32,
}

/// Integers of `bits` bits in groups of `group` consecutive values along a row, one f16
/// scale per group (and, if `asym`, one f16 offset). Each group is stored as one block
/// `{ d: f16, [m: f16,] q: [bits x group] }`, the codes packed least significant bit first:
/// code `j` occupies bits `j * bits .. (j + 1) * bits` of the little-endian code bytes, so
/// a block holds `2 (or 4) + group * bits / 8` bytes. Values, with `q` an unsigned code:
///
/// - symmetric (`int4g64`): `x = f32(d) * (q - 2^(bits - 1))`;
/// - asymmetric (`int4g64a`): `x = f32(d) * q + f32(m)`.
///
/// `bits` is 2, 3, 4 or 8 (8 is symmetric only); `group` is a multiple of 32. Per output
/// channel is the group equal to the row (`int8g576` for 576-wide rows). Both forms are exact
/// in f32 (an 11-bit scale times an 8-bit code), and for `group = 32` they are GGUF's
/// `Q4_0`, `Q4_1` and `Q8_0` values in another byte order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IntFormat {
    pub bits: u8,
    pub group: u32,
    pub asym: bool,
}

/// The scales of one block of an [`IntFormat`] (`m` is 0 for symmetric formats).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockScales {
    pub d: f16,
    pub m: f16,
}

/// Error from decoding stored bytes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("{format} data for {elements} elements must be {expected} bytes, found {found}")]
    Size { format: Format, elements: u64, expected: u64, found: u64 },
    #[error("{format} stores blocks of {block} values; {elements} elements is not a multiple")]
    Blocks { format: Format, elements: u64, block: u64 },
    #[error(
        "unknown weight format `{0}` (expected f32, f16, bf16, q8_0, q4_0, q4_1, intBgG[a]: B bits in 2, 3, 4, 8, groups of G (a multiple of 32), `a` for asymmetric, e.g. int4g64a, or fp8gG: e4m3 floats in groups of G; u8 for the bitmasks of sparse weights)"
    )]
    Unknown(String),
    #[error("`{0}`: {1}")]
    Invalid(String, &'static str),
}

impl Format {
    /// The formats of checkpoints (kiln's own [`IntFormat`]s are a family, not listed).
    pub const ALL: [Format; 6] = [Format::F32, Format::F16, Format::BF16, Format::Q8_0, Format::Q4_0, Format::Q4_1];

    /// Name used in the IR text and in error messages.
    pub fn name(self) -> String {
        match self {
            Format::F32 => "f32".into(),
            Format::F16 => "f16".into(),
            Format::BF16 => "bf16".into(),
            Format::Q8_0 => "q8_0".into(),
            Format::Q4_0 => "q4_0".into(),
            Format::Q4_1 => "q4_1".into(),
            Format::Int(i) => i.to_string(),
            Format::Fp8(f) => f.to_string(),
            Format::U8 => "u8".into(),
        }
    }

    /// Number of consecutive values that share one block (1 for plain formats).
    pub fn block_len(self) -> u64 {
        match self {
            Format::F32 | Format::F16 | Format::BF16 | Format::U8 => 1,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => 32,
            Format::Int(i) => i.group as u64,
            Format::Fp8(f) => f.group as u64,
        }
    }

    /// Bytes of one block.
    pub fn block_bytes(self) -> u64 {
        match self {
            Format::F32 => 4,
            Format::F16 | Format::BF16 => 2,
            Format::U8 => 1,
            Format::Q8_0 => 34,
            Format::Q4_0 => 18,
            Format::Q4_1 => 20,
            Format::Int(i) => i.block_bytes() as u64,
            Format::Fp8(f) => 2 + f.group as u64,
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
            Format::U8 => out.extend(bytes.iter().map(|&b| b as f32)),
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
            Format::Int(f) => {
                let mut codes = vec![0u8; f.group as usize];
                for block in bytes.chunks_exact(f.block_bytes()) {
                    let s = f.unpack_block(block, &mut codes);
                    out.extend(codes.iter().map(|&q| f.value(s, q)));
                }
            }
            Format::Fp8(f) => {
                for block in bytes.chunks_exact(2 + f.group as usize) {
                    let d = half(&block[0..2]);
                    out.extend(block[2..].iter().map(|&q| d * e4m3(q)));
                }
            }
        }
        Ok(out)
    }
}

/// The value of an fp8 e4m3 byte (see [`Fp8Format`]).
pub fn e4m3(q: u8) -> f32 {
    let sign = if q & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = ((q >> 3) & 0xF, q & 7);
    if e == 0xF && m == 7 {
        return f32::NAN;
    }
    let magnitude =
        if e == 0 { m as f32 / 8.0 * 2f32.powi(-6) } else { (1.0 + m as f32 / 8.0) * 2f32.powi(e as i32 - 7) };
    sign * magnitude
}

/// The e4m3 byte nearest to `x` (ties to the even code), saturating at +-448; NaN gives 0.
pub fn to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let a = x.abs().min(448.0);
    // The 127 non-negative finite values are increasing in their codes 0..=126.
    let (mut lo, mut hi) = (0u8, 126u8);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if e4m3(mid) <= a { lo = mid } else { hi = mid }
    }
    let (dl, dh) = (a - e4m3(lo), e4m3(hi) - a);
    let code = if dl < dh || (dl == dh && lo % 2 == 0) { lo } else { hi };
    code | if x.is_sign_negative() && code != 0 { 0x80 } else { 0 }
}

impl Fp8Format {
    /// Checks that the group is a positive multiple of 32.
    pub fn new(group: u32) -> Result<Fp8Format, FormatError> {
        if group == 0 || !group.is_multiple_of(32) {
            return Err(FormatError::Invalid(format!("fp8g{group}"), "the group must be a positive multiple of 32"));
        }
        Ok(Fp8Format { group })
    }

    /// Stored bytes of `values` (rows of a multiple of the group): per group the scale
    /// `absmax / 448` (rounded to f16), then each value divided by it, to nearest.
    pub fn quantize(self, values: &[f32]) -> Vec<u8> {
        let g = self.group as usize;
        let mut out = Vec::with_capacity(values.len() / g * (g + 2));
        for group in values.chunks_exact(g) {
            let max = group.iter().fold(0f32, |a, &v| a.max(v.abs()));
            let d = f16::from_f32(max / 448.0);
            out.extend(d.to_le_bytes());
            let d = d.to_f32();
            out.extend(group.iter().map(|&x| if d > 0.0 && d.is_finite() { to_e4m3(x / d) } else { 0 }));
        }
        out
    }
}

impl fmt::Display for Fp8Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "fp8g{}", self.group)
    }
}

impl IntFormat {
    /// Checks the constraints documented on the type.
    pub fn new(bits: u8, group: u32, asym: bool) -> Result<IntFormat, FormatError> {
        let f = IntFormat { bits, group, asym };
        let bad = |why| Err(FormatError::Invalid(f.to_string(), why));
        if ![2, 3, 4, 8].contains(&bits) {
            return bad("bits must be 2, 3, 4 or 8");
        }
        if group == 0 || !group.is_multiple_of(32) {
            return bad("the group must be a positive multiple of 32");
        }
        if bits == 8 && asym {
            return bad("int8 is symmetric only");
        }
        Ok(f)
    }

    /// Bytes of the scales at the start of each block.
    pub fn scale_bytes(self) -> usize {
        if self.asym { 4 } else { 2 }
    }

    /// Bytes of one block (one group).
    pub fn block_bytes(self) -> usize {
        self.scale_bytes() + self.group as usize * self.bits as usize / 8
    }

    /// The largest code.
    pub fn max_code(self) -> u8 {
        ((1u16 << self.bits) - 1) as u8
    }

    /// Whether rows of `k` values in this format are int8 with one symmetric scale per row
    /// (`int8gK`, what `quantize(format=int8)` writes): the weights per-row int8
    /// activation scales apply to.
    pub fn is_int8_per_row(self, k: u64) -> bool {
        self.bits == 8 && !self.asym && self.group as u64 == k
    }

    /// The code of zero in symmetric formats (`2^(bits - 1)`); 0 for asymmetric ones.
    pub fn zero_code(self) -> u8 {
        if self.asym { 0 } else { 1 << (self.bits - 1) }
    }

    /// The value of code `q` under the scales `s`, exactly as stored weights mean it.
    pub fn value(self, s: BlockScales, q: u8) -> f32 {
        if self.asym {
            s.d.to_f32() * q as f32 + s.m.to_f32()
        } else {
            s.d.to_f32() * (q as i32 - self.zero_code() as i32) as f32
        }
    }

    /// Round to nearest: the scales of one group of values. Symmetric formats map the
    /// value of largest magnitude to the most negative code (`-2^(bits-1) d`, as GGUF's
    /// Q4_0 does), which uses every code; asymmetric ones spread `[min, max]` over all
    /// codes. Scales are rounded to f16 before codes are chosen ([`IntFormat::code`]).
    pub fn fit(self, values: &[f32]) -> BlockScales {
        if self.asym {
            let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            if !lo.is_finite() || !hi.is_finite() {
                return BlockScales { d: f16::ZERO, m: f16::ZERO };
            }
            let m = f16::from_f32(lo);
            // The offset is rounded, so spread from the stored minimum.
            let d = f16::from_f32((hi - m.to_f32()).max(0.0) / self.max_code() as f32);
            BlockScales { d, m }
        } else {
            let max = values.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            BlockScales { d: f16::from_f32(max / -(self.zero_code() as f32)), m: f16::ZERO }
        }
    }

    /// The code nearest to `x` under `s`, clamped to the codes: `round((x - m) / d)` for
    /// asymmetric formats and `round(x / d) + 2^(bits-1)` for symmetric ones, rounding
    /// halves away from zero; every code is the zero code when `d` is 0 or not finite.
    pub fn code(self, s: BlockScales, x: f32) -> u8 {
        self.code_in(s.d.to_f32(), s.m.to_f32(), x)
    }

    /// [`IntFormat::code`] with the scales already widened (`d`, `m` from f16).
    #[inline]
    pub fn code_in(self, d: f32, m: f32, x: f32) -> u8 {
        if d == 0.0 || !d.is_finite() {
            return self.zero_code();
        }
        let q = if self.asym { (x - m) / d } else { x / d + self.zero_code() as f32 };
        // Clamped first, then rounded half away from zero by truncation: the same code as
        // `q.round().clamp(..)` (NaN gives 0), without a call to `roundf`.
        let q = q.clamp(0.0, self.max_code() as f32);
        let whole = q as u8;
        whole + (q - whole as f32 >= 0.5) as u8
    }

    /// Appends one block: the scales, then `codes` (one per value of the group) packed.
    pub fn pack_block(self, s: BlockScales, codes: &[u8], out: &mut Vec<u8>) {
        debug_assert_eq!(codes.len(), self.group as usize);
        out.extend(s.d.to_le_bytes());
        if self.asym {
            out.extend(s.m.to_le_bytes());
        }
        let (mut acc, mut filled) = (0u32, 0u32);
        for &q in codes {
            acc |= ((q & self.max_code()) as u32) << filled;
            filled += self.bits as u32;
            while filled >= 8 {
                out.push(acc as u8);
                acc >>= 8;
                filled -= 8;
            }
        }
    }

    /// Reads one block's scales, and its codes into `codes` (`group` of them).
    pub fn unpack_block(self, block: &[u8], codes: &mut [u8]) -> BlockScales {
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        let s = BlockScales { d: half(&block[0..2]), m: if self.asym { half(&block[2..4]) } else { f16::ZERO } };
        let packed = &block[self.scale_bytes()..];
        let bits = self.bits as usize;
        for (j, q) in codes.iter_mut().enumerate() {
            let (byte, shift) = (j * bits / 8, j * bits % 8);
            let word = packed[byte] as u16 | (packed.get(byte + 1).copied().unwrap_or(0) as u16) << 8;
            *q = (word >> shift) as u8 & self.max_code();
        }
        s
    }

    /// Round to nearest, group by group: the stored bytes of `values` (rows of a length
    /// that is a multiple of the group).
    pub fn quantize(self, values: &[f32]) -> Vec<u8> {
        let g = self.group as usize;
        let mut out = Vec::with_capacity(values.len() / g * self.block_bytes());
        let mut codes = vec![0u8; g];
        for group in values.chunks_exact(g) {
            let s = self.fit(group);
            for (q, &x) in codes.iter_mut().zip(group) {
                *q = self.code(s, x);
            }
            self.pack_block(s, &codes, &mut out);
        }
        out
    }

    /// Storage bits per weight, scales included.
    pub fn bits_per_weight(self) -> f64 {
        self.block_bytes() as f64 * 8.0 / self.group as f64
    }
}

impl fmt::Display for IntFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "int{}g{}{}", self.bits, self.group, if self.asym { "a" } else { "" })
    }
}

impl std::str::FromStr for IntFormat {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let unknown = || FormatError::Unknown(s.to_string());
        let rest = s.strip_prefix("int").ok_or_else(unknown)?;
        let (bits, rest) = rest.split_once('g').ok_or_else(unknown)?;
        let (group, asym) = match rest.strip_suffix('a') {
            Some(g) => (g, true),
            None => (rest, false),
        };
        let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(bits) || !digits(group) {
            return Err(unknown());
        }
        IntFormat::new(bits.parse().map_err(|_| unknown())?, group.parse().map_err(|_| unknown())?, asym)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl std::str::FromStr for Format {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.starts_with("int") {
            return s.parse().map(Format::Int);
        }
        if let Some(group) = s.strip_prefix("fp8g") {
            let group = group.parse().ok().filter(|_| group.bytes().all(|b| b.is_ascii_digit()));
            return Fp8Format::new(group.ok_or_else(|| FormatError::Unknown(s.to_string()))?).map(Format::Fp8);
        }
        Format::ALL
            .into_iter()
            .chain([Format::U8])
            .find(|f| f.name() == s)
            .ok_or_else(|| FormatError::Unknown(s.to_string()))
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

#[cfg(test)]
mod int_tests {
    use super::*;

    fn int(s: &str) -> IntFormat {
        s.parse().unwrap()
    }

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for name in ["int4g32", "int4g64a", "int3g128a", "int2g32", "int8g576"] {
            assert_eq!(int(name).to_string(), name);
            assert_eq!(name.parse::<Format>().unwrap().name(), name);
        }
        for bad in ["int5g32", "int4g48", "int8g32a", "int4g0", "int4", "int4g", "intxg32", "int4g32b"] {
            assert!(bad.parse::<Format>().is_err(), "{bad}");
        }
        assert_eq!(int("int4g64a").block_bytes(), 4 + 32);
        assert_eq!(int("int3g128").block_bytes(), 2 + 48);
        assert_eq!(Format::Int(int("int4g64a")).bits_per_weight(), 4.5);
        assert_eq!(Format::Int(int("int2g32")).bits_per_weight(), 2.5);
    }

    /// `code` rounds halves away from zero and clamps, as `f32::round` then `clamp` would,
    /// on ties, near-ties, out-of-range values, signed zeros and NaN.
    #[test]
    fn codes_round_half_away_from_zero_and_clamp() {
        let reference = |f: IntFormat, d: f32, m: f32, x: f32| -> u8 {
            let q = if f.asym { (x - m) / d } else { x / d + f.zero_code() as f32 };
            q.round().clamp(0.0, f.max_code() as f32) as u8
        };
        let d = 0.25f32;
        let mut xs = vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1e30, -1e30];
        for i in -80..80 {
            let x = i as f32 * d / 2.0; // every half step: exact ties
            xs.extend([x, x.next_up(), x.next_down()]);
        }
        for name in ["int4g32", "int4g32a", "int3g64", "int2g32a", "int8g32"] {
            let f = int(name);
            for &m in &[0.0f32, -1.125] {
                for &x in &xs {
                    assert_eq!(f.code_in(d, m, x), reference(f, d, m, x), "{name} m={m} x={x}");
                }
            }
        }
    }

    /// e4m3 by hand: 1.0 = 0.0111.000, 1.5 = 0.0111.100, 448 = 0.1111.110 (the largest),
    /// 2^-9 = 0.0000.001 (the smallest subnormal), NaN = S.1111.111.
    #[test]
    fn e4m3_bytes_decode_and_encode_by_hand() {
        assert_eq!(e4m3(0x38), 1.0);
        assert_eq!(e4m3(0x3C), 1.5);
        assert_eq!(e4m3(0xB8), -1.0);
        assert_eq!(e4m3(0x7E), 448.0);
        assert_eq!(e4m3(0x01), 2f32.powi(-9));
        assert_eq!(e4m3(0x08), 2f32.powi(-6));
        assert!(e4m3(0x7F).is_nan() && e4m3(0xFF).is_nan());
        assert_eq!(to_e4m3(1.0), 0x38);
        assert_eq!(to_e4m3(1e9), 0x7E, "saturates");
        assert_eq!(to_e4m3(-1e9), 0xFE);
        // Ties go to the even code: 1.0625 is halfway between 1.0 (0x38) and 1.125 (0x39);
        // 1.1875 between 1.125 (0x39) and 1.25 (0x3A).
        assert_eq!(to_e4m3(1.0625), 0x38);
        assert_eq!(to_e4m3(1.1875), 0x3A);
        assert_eq!(to_e4m3(1.07), 0x39);
        for code in (0u8..=0xFE).filter(|c| c & 0x7F != 0x7F && *c != 0x80) {
            assert_eq!(to_e4m3(e4m3(code)), code, "{code:#04x} round-trips");
        }
    }

    #[test]
    fn fp8_blocks_hold_a_scale_then_one_byte_per_value() {
        let f: Format = "fp8g32".parse().unwrap();
        assert_eq!(f.name(), "fp8g32");
        assert_eq!(f.bits_per_weight(), 8.5);
        assert!("fp8g48".parse::<Format>().is_err() && "fp8".parse::<Format>().is_err());
        let Format::Fp8(fp8) = f else { unreachable!() };
        // absmax 224 -> d = 0.5; values are then d * e4m3(x / d).
        let mut v = vec![0.0f32; 32];
        (v[0], v[1], v[2], v[3], v[4]) = (224.0, -0.75, 0.53, 0.00075, 1e-4);
        let bytes = fp8.quantize(&v);
        assert_eq!(bytes.len(), 34);
        assert_eq!(f16::from_le_bytes([bytes[0], bytes[1]]).to_f32(), 0.5);
        let x = f.dequantize(&bytes, 32).unwrap();
        assert_eq!(&x[..5], &[224.0, -0.75, 0.5, 0.5 * 2f32.powi(-9), 0.0], "the last one below half a subnormal");
    }

    #[test]
    fn three_bit_codes_are_packed_lsb_first_across_bytes() {
        let f = int("int3g32");
        let codes: Vec<u8> = (0..32).map(|j| (j % 8) as u8).collect();
        let mut block = Vec::new();
        f.pack_block(BlockScales { d: f16::from_f32(1.0), m: f16::ZERO }, &codes, &mut block);
        assert_eq!(block.len(), 2 + 12);
        // Codes 0, 1, 2 then 3: bits 000 100 010 | 110 ... -> first byte 0b10_001_000.
        assert_eq!(block[2], 0b1000_1000);
        assert_eq!(block[3], 0b1100_0110); // 2 >> 2 = 0, then code 3 (011), code 4 (100), code 5's low bit 1
        let mut back = vec![0; 32];
        f.unpack_block(&block, &mut back);
        assert_eq!(back, codes);
        // Symmetric: x = d (q - 4).
        let x = Format::Int(f).dequantize(&block, 32).unwrap();
        assert_eq!(&x[..8], &[-4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0]);
    }

    #[test]
    fn rtn_symmetric_maps_the_largest_magnitude_to_the_most_negative_code() {
        let f = int("int4g32");
        let mut v = vec![0.0f32; 32];
        v[0] = -1.6; // largest magnitude: d = -1.6 / -8 = 0.2
        v[1] = 0.7; // 0.7 / 0.2 = 3.5 -> rounds away from zero to 4 (code 12): 0.8
        v[2] = 1.6; // beyond +7 d: clamps to code 15 = 1.4
        let x = Format::Int(f).dequantize(&f.quantize(&v), 32).unwrap();
        let d = f16::from_f32(0.2).to_f32();
        assert_eq!(x[0], -8.0 * d);
        assert_eq!(x[1], 4.0 * d);
        assert_eq!(x[2], 7.0 * d);
        assert_eq!(x[3], 0.0);
    }

    #[test]
    fn rtn_asymmetric_spreads_min_to_max_over_all_codes() {
        let f = int("int2g32a");
        let mut v = vec![1.0f32; 32];
        v[0] = 1.0;
        v[1] = 4.0; // d = (4 - 1) / 3 = 1, m = 1: codes 0..3 are 1, 2, 3, 4
        v[2] = 2.4;
        v[3] = 2.6;
        let x = Format::Int(f).dequantize(&f.quantize(&v), 32).unwrap();
        assert_eq!(&x[..4], &[1.0, 4.0, 2.0, 3.0]);
        assert_eq!(x[4], 1.0);
    }

    #[test]
    fn group_32_is_q4_0_with_another_byte_order() {
        // The same values through GGUF's Q4_0 (byte j = elements j and j + 16).
        let f = int("int4g32");
        let codes: Vec<u8> = (0..32).map(|j| (j * 7 % 16) as u8).collect();
        let s = BlockScales { d: f16::from_f32(0.375), m: f16::ZERO };
        let mut ours = Vec::new();
        f.pack_block(s, &codes, &mut ours);
        let mut q4_0 = s.d.to_le_bytes().to_vec();
        q4_0.extend((0..16).map(|j| codes[j] | codes[j + 16] << 4));
        assert_eq!(Format::Int(f).dequantize(&ours, 32).unwrap(), Format::Q4_0.dequantize(&q4_0, 32).unwrap());
    }
}
