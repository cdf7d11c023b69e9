//! Small emitters shared by kernels: 128-bit vector constants, lane shuffles, loads with the
//! right memory flags, the exact f16/bf16 -> f32 widening sequences, and the fixed-order
//! horizontal sum.
//!
//! Everything works on the only vector width Cranelift's x86-64 backend can emit: 128 bits
//! (`f32x4`, `i32x4`, `i16x8`, `i8x16`). Helpers take the `FunctionBuilder` explicitly and
//! emit instructions at its current position, in the order written: kernels are scheduled
//! by their emitter (see `isa::OptLevel`).

use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I32, I32X4};
use cranelift_codegen::ir::{BlockArg, ConstantData, Endianness, InstBuilder, MemFlagsData, Type, Value};
use cranelift_frontend::{FunctionBuilder, Variable};

/// Flags for loads of kernel inputs that do not change while the kernel runs (activations,
/// weights, bias, a weight panel after it was written... ): the caller guarantees the
/// address is valid (`notrap`) and the memory is not written by this call (`readonly`).
/// No alignment is claimed: VEX-encoded instructions accept unaligned memory operands.
pub(crate) fn ro() -> MemFlagsData {
    MemFlagsData::new().with_notrap().with_readonly()
}

/// Flags for valid, possibly written memory (outputs, the residual which may alias the
/// output, scratch).
pub(crate) fn rw() -> MemFlagsData {
    MemFlagsData::new().with_notrap()
}

/// Reinterprets the 128 bits of `v` as `ty` (lane order is little-endian, as in memory).
pub(crate) fn cast(b: &mut FunctionBuilder<'_>, ty: Type, v: Value) -> Value {
    if b.func.dfg.value_type(v) == ty {
        return v;
    }
    b.ins().bitcast(ty, MemFlagsData::new().with_endianness(Endianness::Little), v)
}

/// A 128-bit constant of type `ty` from its little-endian bytes (lives in the constant pool;
/// the x86-64 backend uses it as a memory operand where it can).
pub(crate) fn vconst_bytes(b: &mut FunctionBuilder<'_>, ty: Type, bytes: [u8; 16]) -> Value {
    let c = b.func.dfg.constants.insert(ConstantData::from(&bytes[..]));
    b.ins().vconst(ty, c)
}

/// `f32x4` with every lane `v`.
pub(crate) fn f32s(b: &mut FunctionBuilder<'_>, v: f32) -> Value {
    f32x4(b, [v; 4])
}

pub(crate) fn f32x4(b: &mut FunctionBuilder<'_>, lanes: [f32; 4]) -> Value {
    let mut bytes = [0u8; 16];
    for (i, l) in lanes.iter().enumerate() {
        bytes[4 * i..4 * i + 4].copy_from_slice(&l.to_le_bytes());
    }
    vconst_bytes(b, F32X4, bytes)
}

/// `i32x4` with every lane `v` (given as bits).
pub(crate) fn i32s(b: &mut FunctionBuilder<'_>, v: u32) -> Value {
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        bytes[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
    vconst_bytes(b, I32X4, bytes)
}

/// A vector of type `ty` with every 16-bit lane `v`.
pub(crate) fn u16s(b: &mut FunctionBuilder<'_>, ty: Type, v: u16) -> Value {
    let mut bytes = [0u8; 16];
    for i in 0..8 {
        bytes[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    vconst_bytes(b, ty, bytes)
}

/// Lane shuffle of two 4-lane vectors: result lane `i` is lane `idx[i]` of `x ++ y`
/// (0-3 from `x`, 4-7 from `y`). The result has `x`'s type. Cranelift recognizes the
/// `unpck*`, `movlhps`/`movhlps`, `shufps` and `pshufd` patterns.
pub(crate) fn shuffle4(b: &mut FunctionBuilder<'_>, x: Value, y: Value, idx: [u8; 4]) -> Value {
    let ty = b.func.dfg.value_type(x);
    let mut mask = [0u8; 16];
    for (i, &l) in idx.iter().enumerate() {
        debug_assert!(l < 8);
        for j in 0..4 {
            mask[4 * i + j] = 4 * l + j as u8;
        }
    }
    let imm = b.func.dfg.immediates.push(ConstantData::from(&mask[..]));
    let (xb, yb) = (cast(b, I8X16, x), cast(b, I8X16, y));
    let r = b.ins().shuffle(xb, yb, imm);
    cast(b, ty, r)
}

/// Broadcast lane `lane` of a 4-lane vector.
pub(crate) fn broadcast_lane(b: &mut FunctionBuilder<'_>, v: Value, lane: u8) -> Value {
    shuffle4(b, v, v, [lane; 4])
}

/// Horizontal sums of four `f32x4` vectors in one transpose: lane `r` of the result is
/// `(a_r[0] + a_r[2]) + (a_r[1] + a_r[3])`.
///
/// That order is part of the kernels' numeric contract: every output is reduced the same
/// way whatever tile it was computed in, so results never depend on tiling (9 instructions
/// for 4 outputs: 6 shuffles, 3 adds).
pub(crate) fn hsum4(b: &mut FunctionBuilder<'_>, a: [Value; 4]) -> Value {
    // [a0 b0 a1 b1] + [a2 b2 a3 b3] = [a0+a2, b0+b2, a1+a3, b1+b3]
    let lo = shuffle4(b, a[0], a[1], [0, 4, 1, 5]);
    let hi = shuffle4(b, a[0], a[1], [2, 6, 3, 7]);
    let ab = b.ins().fadd(lo, hi);
    let lo = shuffle4(b, a[2], a[3], [0, 4, 1, 5]);
    let hi = shuffle4(b, a[2], a[3], [2, 6, 3, 7]);
    let cd = b.ins().fadd(lo, hi);
    // [ab0 ab1 cd0 cd1] + [ab2 ab3 cd2 cd3]
    let lo = shuffle4(b, ab, cd, [0, 1, 4, 5]);
    let hi = shuffle4(b, ab, cd, [2, 3, 6, 7]);
    b.ins().fadd(lo, hi)
}

/// Widens f16 values to f32 exactly. The input `t` is an `i32x4` whose lanes hold an f16 in
/// this layout: bits 31..28 all equal the f16's sign, bits 27..13 its exponent and mantissa,
/// bits 12..0 anything (`ishl(sext(h), 13)` of a sign-extended f16 `h` gives it).
///
/// Sequence (6 instructions after the shift that produced `t`):
/// 1. keep sign + exponent/mantissa: `o = t & 0x8FFF_E000`. Read as an f32, `o` is the
///    f16's value times 2^-112 (exponent bias 15 vs 127; f16 subnormals land on f32
///    subnormals with the same bits), so
/// 2. `f = o * 2^112` is exact for zero, subnormal and normal inputs (the product has at
///    most 11 significant bits and is a normal f32 or zero);
/// 3. inf/NaN (f16 exponent 31) came out as finite `|f| >= 2^16` with the payload in the
///    mantissa: set the f32 exponent to 255 there (`f | 0x7F80_0000`), which keeps the
///    sign and the payload bits (f16 quiet bit -> f32 quiet bit).
///
/// Exact for all 65536 inputs (tested against `half`; NaNs keep sign and payload, and a
/// signaling NaN stays signaling where `half` sets the quiet bit, a difference no
/// arithmetic result can show since every operation quiets it). Subnormal f16 inputs make
/// the multiply see a subnormal operand, which costs time on some CPUs (a weight made only
/// of subnormals decodes ~30% slower on Zen 3; real checkpoints have few). Assumes the MXCSR's DAZ bit is off
/// (the default for Rust programs): subnormal `o` must not read as zero.
pub(crate) fn f16_to_f32(b: &mut FunctionBuilder<'_>, t: Value) -> Value {
    let mask = i32s(b, 0x8FFF_E000);
    let o = b.ins().band(t, mask);
    let o = cast(b, F32X4, o);
    let scale = f32s(b, f32::from_bits((127 + 112) << 23)); // 2^112
    let f = b.ins().fmul(o, scale);
    let fi = cast(b, I32X4, f);
    let abs = b.ins().fabs(f);
    let big = f32s(b, 65536.0);
    let is_special = b.ins().fcmp(FloatCC::GreaterThanOrEqual, abs, big);
    let exp_ones = i32s(b, 0x7F80_0000);
    let fix = b.ins().band(is_special, exp_ones);
    let r = b.ins().bor(fi, fix);
    cast(b, F32X4, r)
}

/// Loads 4 consecutive little-endian f16 at `p + off` and widens them exactly to f32
/// (8 instructions plus 5 constant-pool loads; see [`f16_to_f32`]).
pub(crate) fn load_f16x4(b: &mut FunctionBuilder<'_>, p: Value, off: i32) -> Value {
    let h = b.ins().sload16x4(ro(), p, off);
    let t = b.ins().ishl_imm_u(h, 13);
    f16_to_f32(b, t)
}

/// Loads 4 consecutive little-endian bf16 at `p + off` and widens them to f32: bf16 is the
/// top half of an f32, so this is a zero-extending load and a shift (exact for all inputs,
/// NaN payloads included).
pub(crate) fn load_bf16x4(b: &mut FunctionBuilder<'_>, p: Value, off: i32) -> Value {
    let h = b.ins().uload16x4(ro(), p, off);
    let t = b.ins().ishl_imm_u(h, 16);
    cast(b, F32X4, t)
}

/// Builds an `f32x4` from one to four f32 scalars (missing lanes are zero).
pub(crate) fn gather_f32(b: &mut FunctionBuilder<'_>, lanes: &[Value]) -> Value {
    gather(b, F32X4, F32, lanes)
}

/// Builds an `i32x4` from one to four i32 scalars (missing lanes are zero).
pub(crate) fn gather_i32(b: &mut FunctionBuilder<'_>, lanes: &[Value]) -> Value {
    gather(b, I32X4, I32, lanes)
}

fn gather(b: &mut FunctionBuilder<'_>, ty: Type, lane_ty: Type, lanes: &[Value]) -> Value {
    debug_assert!((1..=4).contains(&lanes.len()));
    debug_assert!(lanes.iter().all(|&s| b.func.dfg.value_type(s) == lane_ty));
    // `scalar_to_vector` zeroes the other lanes (`movd`/`movss`), then `pinsrd`/`insertps`.
    let mut v = b.ins().scalar_to_vector(ty, lanes[0]);
    for (i, &s) in lanes.iter().enumerate().skip(1) {
        v = b.ins().insertlane(v, s, i as u8);
    }
    v
}

/// Loads `n <= 4` consecutive f32 at `p + off` into the low lanes of an `f32x4` (a full
/// vector load when `n == 4`; otherwise lane by lane, never touching memory past the
/// `n` values). Missing lanes are zero.
pub(crate) fn load_f32_partial(
    b: &mut FunctionBuilder<'_>,
    flags: MemFlagsData,
    p: Value,
    off: i32,
    n: usize,
) -> Value {
    debug_assert!((1..=4).contains(&n));
    if n == 4 {
        return b.ins().load(F32X4, flags, p, off);
    }
    let lanes: Vec<Value> = (0..n).map(|i| b.ins().load(F32, flags, p, off + 4 * i as i32)).collect();
    gather_f32(b, &lanes)
}

/// Stores the low `n <= 4` lanes of an `f32x4` to consecutive f32 at `p + off`.
pub(crate) fn store_f32_partial(b: &mut FunctionBuilder<'_>, v: Value, p: Value, off: i32, n: usize) {
    debug_assert!((1..=4).contains(&n));
    if n == 4 {
        b.ins().store(rw(), v, p, off);
        return;
    }
    for i in 0..n {
        let s = b.ins().extractlane(v, i as u8);
        b.ins().store(rw(), s, p, off + 4 * i as i32);
    }
}

/// Lane-wise `mask ? x : y` for a comparison mask (all-ones/all-zeros lanes, as `fcmp` and
/// `icmp` produce them); `x` and `y` share a type, the mask is reinterpreted to it.
pub(crate) fn select_lanes(b: &mut FunctionBuilder<'_>, mask: Value, x: Value, y: Value) -> Value {
    let ty = b.func.dfg.value_type(x);
    let mask = cast(b, ty, mask);
    b.ins().bitselect(mask, x, y)
}

/// Emits `trips` iterations of `body`, which receives the current value of each pointer in
/// `ptrs` (`(initial, step)`; the first pointer's step must be nonzero: it is the loop
/// counter). A single trip is emitted straight; zero trips emit nothing. Returns the
/// pointers after the last iteration.
///
/// The loop has the `while` shape: a header that tests and branches to the body or the
/// exit without block arguments, and a body that jumps back. Values leaving the loop are
/// then the header's block parameters, and every value computed in the body has a single
/// use (the back edge). That matters to instruction selection: Cranelift only folds a load
/// into its user (e.g. `vfmadd132ps xmm, xmm, [mem]`) when no user of the loaded value's
/// dependents may be emitted twice, and a `brif` passing an accumulator to both the loop
/// and the exit counts as two uses, which poisons the whole chain.
pub(crate) fn counted_loop(
    b: &mut FunctionBuilder<'_>,
    ptr_ty: Type,
    trips: usize,
    ptrs: &[(Value, i64)],
    mut body: impl FnMut(&mut FunctionBuilder<'_>, &[Value]),
) -> Vec<Value> {
    let advance = |b: &mut FunctionBuilder<'_>, cur: &[Value], times: i64| -> Vec<Value> {
        cur.iter().zip(ptrs).map(|(&p, &(_, step))| b.ins().iadd_imm_s(p, step * times)).collect()
    };
    let init: Vec<Value> = ptrs.iter().map(|&(p, _)| p).collect();
    match trips {
        0 => return init,
        1 => {
            body(b, &init);
            return advance(b, &init, 1);
        }
        _ => {}
    }
    debug_assert_ne!(ptrs[0].1, 0);
    let end = b.ins().iadd_imm_s(init[0], ptrs[0].1 * trips as i64);
    let vars: Vec<Variable> = init
        .iter()
        .map(|&p| {
            let v = b.declare_var(ptr_ty);
            b.def_var(v, p);
            v
        })
        .collect();
    let header = b.create_block();
    let lp = b.create_block();
    let done = b.create_block();
    b.ins().jump(header, &[]);
    b.switch_to_block(header);
    let cur: Vec<Value> = vars.iter().map(|&v| b.use_var(v)).collect();
    let more = b.ins().icmp(IntCC::NotEqual, cur[0], end);
    b.ins().brif(more, lp, &[], done, &[]);
    b.switch_to_block(lp);
    body(b, &cur);
    let next = advance(b, &cur, 1);
    for (&v, &n) in vars.iter().zip(&next) {
        b.def_var(v, n);
    }
    b.ins().jump(header, &[]);
    b.switch_to_block(done);
    cur
}

/// Routes the current values of `vars` through the parameters of a fresh block (a jump the
/// code layout turns into a fall-through). Block parameters are roots for instruction
/// selection: values used several times after this point (the horizontal sums use each
/// accumulator twice) no longer count as multiply used before it, so the loads feeding
/// the accumulation can still be folded into the FMAs (see [`counted_loop`]).
pub(crate) fn barrier(b: &mut FunctionBuilder<'_>, vars: &[Variable], ty: Type) {
    let next = b.create_block();
    let args: Vec<BlockArg> = vars.iter().map(|&v| BlockArg::Value(b.use_var(v))).collect();
    let params: Vec<Value> = vars.iter().map(|_| b.append_block_param(next, ty)).collect();
    b.ins().jump(next, &args);
    b.switch_to_block(next);
    for (&v, p) in vars.iter().zip(params) {
        b.def_var(v, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Map4, f32_bytes};
    use cranelift_codegen::ir::types::I64;
    use half::{bf16, f16};

    fn all_halves() -> Vec<u8> {
        (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect()
    }

    /// Same bits, except for the quiet bit of NaNs: `half` quiets signaling NaNs (as F16C's
    /// `vcvtph2ps` does) while the emitted code keeps every bit; sign and payload agree.
    fn assert_widened(name: &str, got: &[f32], nan_patterns: usize, want: impl Fn(u16) -> f32) {
        let mut nans = 0;
        for (h, &g) in got.iter().enumerate() {
            let w = want(h as u16);
            let (mut gb, mut wb) = (g.to_bits(), w.to_bits());
            if w.is_nan() {
                nans += 1;
                assert!(g.is_nan(), "{name}: {h:#06x} -> {g} ({gb:#010x}), want NaN");
                (gb, wb) = (gb | 0x0040_0000, wb | 0x0040_0000);
            }
            assert_eq!(gb, wb, "{name}: {h:#06x} -> {g}, want {w}");
        }
        assert_eq!(nans, nan_patterns, "{name}: every NaN pattern was checked");
    }

    #[test]
    fn f16_widening_is_exact_for_all_65536_inputs() {
        let src = all_halves();
        let want = |h: u16| f16::from_bits(h).to_f32();
        // The vector path used for weight rows (`sload16x4` + shift).
        let vector = Map4::new(8, |b, p| load_f16x4(b, p, 0)).run(&src);
        assert_widened("load_f16x4", &vector, 2 * 1023, want);
        // The lane-gathering path used for row tails.
        let lanes = Map4::new(8, |b, p| {
            let s: Vec<Value> = (0..4).map(|i| b.ins().sload16(I32, ro(), p, 2 * i)).collect();
            let v = gather_i32(b, &s);
            let t = b.ins().ishl_imm_u(v, 13);
            f16_to_f32(b, t)
        })
        .run(&src);
        assert_widened("gathered f16", &lanes, 2 * 1023, want);
    }

    #[test]
    fn bf16_widening_is_exact_for_all_65536_inputs() {
        let got = Map4::new(8, |b, p| load_bf16x4(b, p, 0)).run(&all_halves());
        assert_widened("load_bf16x4", &got, 2 * 127, |h| bf16::from_bits(h).to_f32());
    }

    #[test]
    fn hsum4_adds_lane_pairs_in_the_documented_order() {
        // Values chosen so every association order gives a different f32.
        let a = [1.0f32, 1e8, -1e8, 3.0];
        let src: Vec<f32> = (0..4).flat_map(|r| a.map(|v| v * (r as f32 + 1.0))).collect();
        let got = Map4::new(64, |b, p| {
            let v: [Value; 4] = std::array::from_fn(|i| b.ins().load(F32X4, ro(), p, 16 * i as i32));
            hsum4(b, v)
        })
        .run(&f32_bytes(&src));
        for r in 0..4 {
            let l = &src[4 * r..4 * r + 4];
            assert_eq!(got[r], (l[0] + l[2]) + (l[1] + l[3]), "row {r}");
        }
        let _ = I64;
    }
}
