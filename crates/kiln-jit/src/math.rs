//! Elementwise activations on `f32x4`, written as inline polynomials (Cranelift has no
//! `exp`, `erf` or `tanh`, and calling back into Rust costs ~4 ns per call plus spills).
//!
//! Semantics follow the reference interpreter (`kiln-interp`'s `UnaryOp` kernels):
//! - `relu(v) = if v < 0 { 0 } else { v }` (NaN and -0 pass through), exact;
//! - `silu(v) = v * sigmoid(v)`, `sigmoid(v) = 1 / (1 + e^-v)` for `v >= 0` and
//!   `e^v / (1 + e^v)` otherwise; `exp` is Cephes' `expf` polynomial with a two-step
//!   scaling so that the subnormal range is rounded once, as libm does (a few ulp);
//! - `gelu(v) = 0.5 v (1 + erf(v / sqrt 2))`, the exact (erf) GELU. `erf` is a rational
//!   approximation (odd degree-13 / even degree-8, Eigen's single-precision coefficients)
//!   with max abs error 4.5e-7 vs the exact function, and exactly `±1` for `|x| >= 4`.
//!   GELU's abs error is then below `0.5 |v| * 5e-7`; for very negative `v` the result is 0
//!   where the exact one is below 5e-8 in magnitude.

use cranelift_codegen::ir::condcodes::FloatCC;
use cranelift_codegen::ir::types::{F32X4, I32X4};
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use crate::emit::{cast, f32s, i32s, select_lanes};

pub use kiln_exec::Activation;

/// Emits `act(v)` for an `f32x4`.
pub(crate) fn activation(b: &mut FunctionBuilder<'_>, act: Activation, v: Value) -> Value {
    match act {
        Activation::None => v,
        Activation::Relu => relu(b, v),
        Activation::Silu => silu(b, v),
        Activation::Gelu => gelu(b, v),
    }
}

/// `select(c < lim, lim, c)` lane-wise, keeping NaN (an `fcmp` + `bitselect`).
fn max_keep_nan(b: &mut FunctionBuilder<'_>, v: Value, lim: f32) -> Value {
    let l = f32s(b, lim);
    let below = b.ins().fcmp(FloatCC::LessThan, v, l);
    select_lanes(b, below, l, v)
}

fn min_keep_nan(b: &mut FunctionBuilder<'_>, v: Value, lim: f32) -> Value {
    let l = f32s(b, lim);
    let above = b.ins().fcmp(FloatCC::GreaterThan, v, l);
    select_lanes(b, above, l, v)
}

pub(crate) fn relu(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let zero = f32s(b, 0.0);
    let neg = b.ins().fcmp(FloatCC::LessThan, v, zero);
    select_lanes(b, neg, zero, v)
}

/// `2^n` for integral `n` in [-126, 127] given as f32 lanes: the exponent field built with
/// the 1.5 * 2^23 trick (adding it puts `n` in the low mantissa bits).
fn pow2i(b: &mut FunctionBuilder<'_>, n: Value) -> Value {
    let magic = f32s(b, 12_582_912.0);
    let t = b.ins().fadd(n, magic);
    let t = cast(b, I32X4, t);
    let bias = i32s(b, 127u32.wrapping_sub(0x4B40_0000));
    let e = b.ins().iadd(t, bias);
    let e = b.ins().ishl_imm_u(e, 23);
    cast(b, F32X4, e)
}

/// `e^x` for `x <= 0` (and NaN): Cody-Waite reduction `x = n ln2 + r`, `|r| <= ln2/2`,
/// Cephes' degree-5 polynomial for `(e^r - 1 - r) / r^2`, then `2^n` applied in two halves
/// so that subnormal results are rounded once. Below -104 the result is 0.
pub(crate) fn exp_nonpositive(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    let x = max_keep_nan(b, x, -104.0);
    let log2e = f32s(b, std::f32::consts::LOG2_E);
    let t = b.ins().fmul(x, log2e);
    let n = b.ins().nearest(t);
    let c1 = f32s(b, -0.693_359_4); // -ln2, high part (exact in few bits)
    let r = b.ins().fma(n, c1, x);
    let c2 = f32s(b, 2.121_944_4e-4); // -ln2 - c1
    let r = b.ins().fma(n, c2, r);
    let coef = [1.987_569_3e-4f32, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_66, 0.5];
    let mut p = f32s(b, coef[0]);
    for &c in &coef[1..] {
        let c = f32s(b, c);
        p = b.ins().fma(p, r, c);
    }
    let r2 = b.ins().fmul(r, r);
    let y = b.ins().fma(p, r2, r);
    let one = f32s(b, 1.0);
    let y = b.ins().fadd(y, one);
    // n in [-150, 0]: n1 = round(n / 2), n2 = n - n1, both in [-75, 0].
    let half = f32s(b, 0.5);
    let n1 = b.ins().fmul(n, half);
    let n1 = b.ins().nearest(n1);
    let n2 = b.ins().fsub(n, n1);
    let s1 = pow2i(b, n1);
    let s2 = pow2i(b, n2);
    let y = b.ins().fmul(y, s1);
    b.ins().fmul(y, s2)
}

/// `sigmoid(v)`, branch-free form of the interpreter's two-sided formula.
pub(crate) fn sigmoid(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let vi = cast(b, I32X4, v);
    let sign = i32s(b, 0x8000_0000);
    let neg_abs = b.ins().bor(vi, sign);
    let neg_abs = cast(b, F32X4, neg_abs);
    let e = exp_nonpositive(b, neg_abs); // e^-|v|
    let one = f32s(b, 1.0);
    let zero = f32s(b, 0.0);
    let nonneg = b.ins().fcmp(FloatCC::GreaterThanOrEqual, v, zero);
    let num = select_lanes(b, nonneg, one, e);
    let den = b.ins().fadd(one, e);
    b.ins().fdiv(num, den)
}

pub(crate) fn silu(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let s = sigmoid(b, v);
    b.ins().fmul(v, s)
}

/// `erf(x)`: rational approximation on [-4, 4], `±1` outside (see the module docs).
pub(crate) fn erf(b: &mut FunctionBuilder<'_>, x: Value) -> Value {
    // Single-precision coefficients (shortest decimal of each f32).
    const ALPHA: [f32; 7] =
        [-2.726_142e-10, 2.770_681_5e-8, -2.101_024e-6, -5.692_506_2e-5, -7.349_906_4e-4, -2.954_6e-3, -1.609_603_3e-2];
    const BETA: [f32; 5] = [-1.456_607_2e-5, -2.133_740_6e-4, -1.682_827e-3, -7.373_329_3e-3, -1.426_474e-2];
    let c = max_keep_nan(b, x, -4.0);
    let c = min_keep_nan(b, c, 4.0);
    let x2 = b.ins().fmul(c, c);
    let mut p = f32s(b, ALPHA[0]);
    for &a in &ALPHA[1..] {
        let a = f32s(b, a);
        p = b.ins().fma(x2, p, a);
    }
    let p = b.ins().fmul(c, p);
    let mut q = f32s(b, BETA[0]);
    for &be in &BETA[1..] {
        let be = f32s(b, be);
        q = b.ins().fma(x2, q, be);
    }
    let r = b.ins().fdiv(p, q);
    // |x| >= 4: exactly ±1 (erf(4) = 1 - 1.5e-8 rounds to 1 in f32).
    let xi = cast(b, I32X4, x);
    let abs = b.ins().fabs(x);
    let four = f32s(b, 4.0);
    let big = b.ins().fcmp(FloatCC::GreaterThanOrEqual, abs, four);
    let sign_mask = i32s(b, 0x8000_0000);
    let sign = b.ins().band(xi, sign_mask);
    let one = i32s(b, 1.0f32.to_bits());
    let sign_one = b.ins().bor(sign, one);
    let sign_one = cast(b, F32X4, sign_one);
    select_lanes(b, big, sign_one, r)
}

/// `0.5 v (1 + erf(v / sqrt 2))`, evaluated as `fma(h, erf, h)` with `h = v / 2`.
pub(crate) fn gelu(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let s = f32s(b, std::f32::consts::FRAC_1_SQRT_2);
    let t = b.ins().fmul(v, s);
    let e = erf(b, t);
    let half = f32s(b, 0.5);
    let h = b.ins().fmul(v, half);
    b.ins().fma(h, e, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::ro;
    use crate::testing::{Map4, f32_bytes};

    fn map(f: fn(&mut FunctionBuilder<'_>, Value) -> Value, xs: &[f32]) -> Vec<f32> {
        let mut padded = xs.to_vec();
        padded.resize(xs.len().div_ceil(4) * 4, 0.0);
        let got = Map4::new(16, |b, p| {
            let v = b.ins().load(F32X4, ro(), p, 0);
            f(b, v)
        })
        .run(&f32_bytes(&padded));
        got[..xs.len()].to_vec()
    }

    /// A dense grid over [lo, hi] plus the specials.
    fn grid(lo: f32, hi: f32, n: usize) -> Vec<f32> {
        let mut v: Vec<f32> = (0..=n).map(|i| lo + (hi - lo) * i as f32 / n as f32).collect();
        v.extend([0.0, -0.0, f32::MIN_POSITIVE, -1e-30, 1e-30, 1e-7, -1e-7, 5.0, -5.0]);
        v
    }

    fn ulp_err(got: f32, want: f64) -> f64 {
        let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
        let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// The runtime's f64 erf (accurate to ~1e-15) is the reference.
    use kiln_rt::kernels::erf as erf64;

    #[test]
    fn exp_is_within_two_ulp_including_subnormal_results() {
        let xs = grid(-110.0, 0.0, 200_000);
        let got = map(exp_nonpositive, &xs);
        let mut worst = 0.0f64;
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            if want < f32::MIN_POSITIVE as f64 {
                // Subnormal (or zero) results: one rounding, so within one subnormal ulp.
                assert!((g as f64 - want).abs() <= 1.5e-45, "exp({x}) = {g:e}, want {want:e}");
            } else {
                worst = worst.max(ulp_err(g, want));
            }
        }
        assert!(worst <= 2.0, "exp: max {worst} ulp");
        let special = map(exp_nonpositive, &[f32::NEG_INFINITY, f32::NAN, -104.5, -0.0]);
        assert_eq!(special[0], 0.0);
        assert!(special[1].is_nan());
        assert_eq!(special[2], 0.0);
        assert_eq!(special[3], 1.0);
    }

    #[test]
    fn silu_and_sigmoid_are_within_a_few_ulp() {
        let xs = grid(-100.0, 100.0, 400_000);
        for (name, f, reference) in [
            (
                "sigmoid",
                sigmoid as fn(&mut FunctionBuilder<'_>, Value) -> Value,
                (|v: f64| 1.0 / (1.0 + (-v).exp())) as fn(f64) -> f64,
            ),
            ("silu", silu, |v: f64| v / (1.0 + (-v).exp())),
        ] {
            let got = map(f, &xs);
            let mut worst = (0.0f64, 0.0f32);
            for (&x, &g) in xs.iter().zip(&got) {
                let want = reference(x as f64);
                let sig = 1.0 / (1.0 + (-(x as f64)).exp());
                if sig >= f32::MIN_POSITIVE as f64 {
                    let e = ulp_err(g, want);
                    if e > worst.0 {
                        worst = (e, x);
                    }
                } else {
                    // Subnormal e^v, rounded once, then scaled by v.
                    let tol = 1.5e-45 * (1.0 + x.abs() as f64);
                    assert!((g as f64 - want).abs() <= tol, "{name}({x}) = {g:e}, want {want:e}");
                }
            }
            assert!(worst.0 <= 4.0, "{name}: max {} ulp at {}", worst.0, worst.1);
        }
        // The interpreter's semantics at the edges: silu(-inf) = -inf * 0 = NaN.
        let s = map(silu, &[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0]);
        assert_eq!(s[0], f32::INFINITY);
        assert!(s[1].is_nan() && s[2].is_nan());
        assert_eq!(s[3].to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn erf_and_gelu_meet_their_error_bounds() {
        let xs = grid(-8.0, 8.0, 400_000);
        let got = map(erf, &xs);
        let worst = xs.iter().zip(&got).map(|(&x, &g)| (g as f64 - erf64(x as f64)).abs()).fold(0.0, f64::max);
        assert!(worst <= 5e-7, "erf: max abs error {worst:e}");

        let xs = grid(-30.0, 30.0, 400_000);
        let got = map(gelu, &xs);
        for (&x, &g) in xs.iter().zip(&got) {
            let v = x as f64;
            let want = 0.5 * v * (1.0 + erf64(v * std::f64::consts::FRAC_1_SQRT_2));
            let err = (g as f64 - want).abs();
            assert!(err <= 2e-7 * v.abs() + 2e-7 * want.abs() + 1e-30, "gelu({x}) = {g}, want {want}");
        }
        let s = map(gelu, &[f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -0.0, -1e4]);
        assert_eq!(s[0], f32::INFINITY);
        assert!(s[1].is_nan() && s[2].is_nan(), "gelu(-inf) = -inf * 0, as the interpreter");
        assert_eq!(s[3], 0.0);
        assert_eq!(s[4], 0.0);
    }

    #[test]
    fn relu_matches_the_interpreter_bit_for_bit() {
        let xs = [1.5f32, -1.5, 0.0, -0.0, f32::NAN, f32::NEG_INFINITY, f32::INFINITY, -1e-45];
        let got = map(relu, &xs);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = if x < 0.0 { 0.0 } else { x };
            assert_eq!(g.to_bits(), want.to_bits(), "relu({x})");
        }
    }
}
