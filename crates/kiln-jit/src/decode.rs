//! Decoding stored weights to `f32x4` in registers, format by format.
//!
//! Every sequence produces **exactly** the values [`kiln_ir::Format::dequantize`] defines,
//! bit for bit, with two exceptions no finite result can show: a Q4_0 block whose scale is
//! ±inf decodes to NaN (see below), and an f16 signaling NaN stays signaling (`half` sets the
//! quiet bit). Four consecutive weights of one row per vector, in increasing `k` order.
//! Nothing is written to memory. Kernels consume each vector as soon as it is produced (the
//! `consume` callback), so only a few decoded values are live at a time.
//!
//! Instructions per 32 weights of one row in the direct (GEMV) loop, FMA into the
//! accumulator included, as Cranelift 0.135 emits them on x86-64 with AVX2 + FMA (from
//! `examples/linear_disasm.rs`):
//!
//! | format | instr. | per vector of 4 weights |
//! |---|---|---|
//! | f32  | 16 | `vmovups`; `vfmadd132ps` with `x` from memory |
//! | bf16 | 24 | `vpmovzxwd m64`, `vpslld 16`, FMA |
//! | f16  | ~113 | `vpmovsxwd m64`, shift, mask, multiply by 2^112, inf/NaN fix-up ([`crate::emit::f16_to_f32`]; 5 constants from the pool), FMA |
//! | q8_0 | ~47 | `vpmovsxbw m64`, `vpmovsxwd`, `vcvtdq2ps`, `vmulps d`, FMA; + block scale |
//! | q4_0 | ~52 | nibbles as below, `vfmadd213ps` (`q d + (-8 d)`) |
//! | q4_1 | ~54 | `vpmovzxbw m64` x 2 and `vpand`/`vpsrlw` per 16 bytes, `vpmovzxwd` or `vpunpckhwd`, `vcvtdq2ps`, `vfmadd213ps` (`q d + m`), FMA; + block scales |
//! | fp8 (g32) | — | `vpmovzxbw m64` per 8 weights; per vector a widening, 2 `vpand`, 2 shifts, `vpor`, `vmulps` by 2^120, a compare and a blend for the NaN code, `vmulps d`, FMA (not yet counted in the disassembly) |
//!
//! Block scales are gathered from four rows (`movzwl`/`movl`, `vpinsrd`) and widened once
//! for the four (about 10 instructions per row and block, broadcasts included).
//!
//! Why the block formats are exact: `d` is an f16 (11 significant bits) and `q` has at
//! most 8, so `d * q` is exact in f32; hence `fma(d, q, m) == fl(fl(d * q) + m)`, which is
//! what `dequantize` computes for Q4_1. For Q4_0, `fma(d, q, -8d) = fl(d q - 8 d)` equals
//! `fl(d * (q - 8))` (`d (q - 8)` is representable) for every finite `d`; if `d` is ±inf the
//! stored weights are ±inf or NaN and this form gives NaN for all of them.

use cranelift_codegen::ir::types::{F32, F32X4, I16X8, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;
use kiln_ir::Format;

use crate::emit::{
    broadcast_lane, cast, f16_to_f32, f32s, gather_f32, gather_i32, i32s, load_bf16x4, load_f16x4, ro, u16s,
};
use cranelift_codegen::ir::condcodes::IntCC;

/// How a tile's weight rows are stored in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rows {
    /// As stored in the checkpoint, in this format.
    Stored(Format),
    /// Plain f32 rows: a panel the kernel decoded into (same values as the stored rows).
    Panel,
}

impl Rows {
    pub(crate) fn format(self) -> Format {
        match self {
            Rows::Stored(f) => f,
            Rows::Panel => Format::F32,
        }
    }

    /// Bytes of `elems` consecutive weights of one row (`elems` a multiple of the block).
    pub(crate) fn bytes(self, elems: usize) -> i32 {
        let f = self.format();
        debug_assert_eq!(elems as u64 % f.block_len(), 0);
        (elems as u64 / f.block_len() * f.block_bytes()) as i32
    }

    /// Weights per decoded unit: a block for block formats, one vector otherwise.
    pub(crate) fn unit(self) -> usize {
        match self.format() {
            Format::F32 | Format::F16 | Format::BF16 => 4,
            Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => 32,
            Format::Fp8(f) if f.group == 32 => 32,
            Format::Int(_) => unreachable!("int formats run as GGUF blocks (repack.rs)"),
            Format::Fp8(_) => unreachable!("fp8 runs in groups of 32 (repack.rs)"),
            Format::U8 => unreachable!("u8 stores sparse masks, never a linear's values (the verifier)"),
        }
    }
}

/// Emits the decode of `elems` consecutive weights (a multiple of [`Rows::unit`]) of each
/// row `r` starting at byte `p + rows_at[r] + at`, calling `consume(b, r, i, w)` for the
/// `i`-th `f32x4` of row `r`.
///
/// Order: unit by unit (block or vector); within a unit, row by row, and within a row the
/// vectors in increasing `k`. Block scales are decoded for four rows at a time (one f16
/// widening for all of them) before those rows' weights.
pub(crate) fn decode_rows(
    b: &mut FunctionBuilder<'_>,
    rows: Rows,
    p: Value,
    rows_at: &[i32],
    at: i32,
    elems: usize,
    consume: &mut dyn FnMut(&mut FunctionBuilder<'_>, usize, usize, Value),
) {
    let unit = rows.unit();
    debug_assert_eq!(elems % unit, 0);
    let unit_bytes = rows.bytes(unit);
    for u in 0..elems / unit {
        let at = at + u as i32 * unit_bytes;
        let first = u * unit / 4;
        let format = rows.format();
        if unit == 4 {
            for (r, &row) in rows_at.iter().enumerate() {
                let w = match format {
                    Format::F32 => b.ins().load(F32X4, ro(), p, row + at),
                    Format::F16 => load_f16x4(b, p, row + at),
                    Format::BF16 => load_bf16x4(b, p, row + at),
                    _ => unreachable!(),
                };
                consume(b, r, first, w);
            }
            continue;
        }
        for (g, group) in rows_at.chunks(4).enumerate() {
            let (dv, mv) = block_scales(b, format, p, group, at);
            for (j, &row) in group.iter().enumerate() {
                let r = 4 * g + j;
                let d = broadcast_lane(b, dv, j as u8);
                let m = broadcast_lane(b, mv, j as u8);
                let mut each = |b: &mut FunctionBuilder<'_>, i: usize, w: Value| consume(b, r, first + i, w);
                match format {
                    Format::Q8_0 => q8_0_block(b, p, row + at, d, &mut each),
                    Format::Fp8(_) => fp8_block(b, p, row + at, d, &mut each),
                    Format::Q4_0 | Format::Q4_1 => q4_block(b, p, row + at, format, d, m, &mut each),
                    _ => unreachable!(),
                }
            }
        }
    }
}

/// The scales of one block in each of up to four rows (block at `p + row + at`), widened:
/// `(d, m)` with lane `j` for row `j`. `m` is Q4_1's minimum, `-8 d` for Q4_0 and unused
/// (zero) for Q8_0.
///
/// The f16 words are gathered into one vector (`d | m << 16` per lane for Q4_1, `d` in the
/// high half for the others) so that a single [`f16_to_f32`] serves four rows.
fn block_scales(b: &mut FunctionBuilder<'_>, format: Format, p: Value, group: &[i32], at: i32) -> (Value, Value) {
    let words: Vec<Value> = group
        .iter()
        .map(|&row| match format {
            Format::Q4_1 => b.ins().load(I32, ro(), p, row + at),
            _ => b.ins().uload16(I32, ro(), p, row + at),
        })
        .collect();
    let v = gather_i32(b, &words);
    // f16 in bits 31..16 -> `sshr 3` gives f16_to_f32's layout (sign in 31..28).
    let d_hi = b.ins().ishl_imm_u(v, 16);
    let d_t = b.ins().sshr_imm_u(d_hi, 3);
    let d = f16_to_f32(b, d_t);
    let m = match format {
        Format::Q4_1 => {
            let m_t = b.ins().sshr_imm_u(v, 3);
            f16_to_f32(b, m_t)
        }
        Format::Q4_0 => {
            let minus8 = f32s(b, -8.0);
            b.ins().fmul(d, minus8)
        }
        _ => f32s(b, 0.0),
    };
    (d, m)
}

/// Q8_0 block `{ d: f16, q: [i8; 32] }` at `p + at`: `w = d * q`.
fn q8_0_block(
    b: &mut FunctionBuilder<'_>,
    p: Value,
    at: i32,
    d: Value,
    each: &mut dyn FnMut(&mut FunctionBuilder<'_>, usize, Value),
) {
    // 8 bytes from q[4i] sign-extended to i16 (`pmovsxbw m64`), low 4 lanes widened to i32
    // (`pmovsxwd`). Overlapping loads are cheaper than `swiden_high` (`palignr` +
    // `pmovsxwd`) except for the last vector, whose 8-byte load would run past the block.
    let mut q16 = None;
    for i in 0..8 {
        let q32 = match q16 {
            Some(q) if i == 7 => b.ins().swiden_high(q), // q[24..32], loaded for i = 6
            _ => {
                let q = b.ins().sload8x8(ro(), p, at + 2 + 4 * i as i32);
                q16 = Some(q);
                b.ins().swiden_low(q)
            }
        };
        let qf = b.ins().fcvt_from_sint(F32X4, q32);
        let w = b.ins().fmul(qf, d);
        each(b, i, w);
    }
}

/// fp8 block of 32 `{ d: f16, q: [e4m3; 32] }` at `p + at` (Q8_0's layout): `w = d * e4m3(q)`.
///
/// An e4m3 byte `s eeee mmm` placed as the f32 `s 0000eeee mmm0...` (sign to bit 31, the
/// other seven bits to 26..20) reads `(1 + m/8) 2^(e - 127)`, or for `e = 0` the f32
/// subnormal `m/8 2^-126`; times `2^120` both are exactly the e4m3 value. The one NaN
/// code (`eeee mmm` all ones) is selected in. `d * v` is exact (11 x 4 significant bits).
fn fp8_block(
    b: &mut FunctionBuilder<'_>,
    p: Value,
    at: i32,
    d: Value,
    each: &mut dyn FnMut(&mut FunctionBuilder<'_>, usize, Value),
) {
    let (low7, sign) = (i32s(b, 0x7F), i32s(b, 0x80));
    let scale = f32s(b, f32::from_bits((127 + 120) << 23)); // 2^120
    let nan = i32s(b, f32::NAN.to_bits());
    for half in 0..4 {
        // Bytes 8 half .. 8 half + 8, zero-extended to i16 (`pmovzxbw m64`).
        let q16 = b.ins().uload8x8(ro(), p, at + 2 + 8 * half);
        for (i, q32) in [b.ins().uwiden_low(q16), b.ins().uwiden_high(q16)].into_iter().enumerate() {
            let em = b.ins().band(q32, low7);
            let s = b.ins().band(q32, sign);
            let s = b.ins().ishl_imm_u(s, 24);
            let e = b.ins().ishl_imm_u(em, 20);
            let bits = b.ins().bor(s, e);
            let bits = cast(b, F32X4, bits);
            let v = b.ins().fmul(bits, scale);
            let v = cast(b, I32X4, v);
            let is_nan = b.ins().icmp(IntCC::Equal, em, low7);
            let v = b.ins().bitselect(is_nan, nan, v);
            let v = cast(b, F32X4, v);
            let w = b.ins().fmul(v, d);
            each(b, 2 * half as usize + i, w);
        }
    }
}

/// Q4_0 `{ d, qs[16] }` (`w = d (q - 8)`, as `d q + (-8 d)`) and Q4_1 `{ d, m, qs[16] }`
/// (`w = d q + m`) at `p + at`; byte `j` holds weight `j` in its low nibble and weight
/// `j + 16` in its high nibble.
fn q4_block(
    b: &mut FunctionBuilder<'_>,
    p: Value,
    at: i32,
    format: Format,
    d: Value,
    m: Value,
    each: &mut dyn FnMut(&mut FunctionBuilder<'_>, usize, Value),
) {
    let qs = at + if format == Format::Q4_1 { 4 } else { 2 };
    // Bytes 0..8 and 8..16, zero-extended into i16 lanes (`pmovzxbw m64`).
    let bytes = [b.ins().uload8x8(ro(), p, qs), b.ins().uload8x8(ro(), p, qs + 8)];
    let low_mask = u16s(b, I16X8, 0x000F);
    // Vectors 0..4 come from the low nibbles, 4..8 from the high nibbles (`byte >> 4` needs
    // no mask in an i16 lane).
    for (half, shift) in [(0, false), (1, true)] {
        for (j, &v) in bytes.iter().enumerate() {
            let q16 = if shift { b.ins().ushr_imm_u(v, 4) } else { b.ins().band(v, low_mask) };
            for (k, high) in [(0, false), (1, true)] {
                let q32 = if high { b.ins().uwiden_high(q16) } else { b.ins().uwiden_low(q16) };
                let qf = b.ins().fcvt_from_sint(F32X4, q32);
                // `qf` first: the FMA's result is tied to its first operand, and `qf` dies
                // here while `d` lives on (no register copy).
                let w = b.ins().fma(qf, d, m);
                each(b, 4 * half + 2 * j + k, w);
            }
        }
    }
}

/// One weight per row for up to four rows (`(pointer, byte offset)` of each weight), as the
/// lanes of an `f32x4` (missing lanes zero). Used for the `k % 4` tail of the float formats
/// (block formats have no tail: K is a multiple of 32).
pub(crate) fn decode_lanes(b: &mut FunctionBuilder<'_>, rows: Rows, at: &[(Value, i32)]) -> Value {
    debug_assert!(at.len() <= 4);
    match rows.format() {
        Format::F32 => {
            let s: Vec<Value> = at.iter().map(|&(p, o)| b.ins().load(F32, ro(), p, o)).collect();
            gather_f32(b, &s)
        }
        Format::BF16 => {
            let s: Vec<Value> = at.iter().map(|&(p, o)| b.ins().uload16(I32, ro(), p, o)).collect();
            let v = gather_i32(b, &s);
            let v = b.ins().ishl_imm_u(v, 16);
            cast(b, F32X4, v)
        }
        Format::F16 => {
            let s: Vec<Value> = at.iter().map(|&(p, o)| b.ins().sload16(I32, ro(), p, o)).collect();
            let v = gather_i32(b, &s);
            debug_assert_eq!(b.func.dfg.value_type(v), I32X4);
            let t = b.ins().ishl_imm_u(v, 13);
            f16_to_f32(b, t)
        }
        Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Int(_) | Format::Fp8(_) => {
            unreachable!("block formats have no k tail")
        }
        Format::U8 => unreachable!("u8 stores sparse masks, never a linear's values (the verifier)"),
    }
}
