//! Scales by search: the scales of a group that minimize its weighted rounding error.
//!
//! Round to nearest ([`IntFormat::fit`]) spreads a group's whole range over the codes, so
//! one outlier coarsens the step for every other weight of the group. Clipping the range
//! trades a larger error on the few largest weights for a finer step on the rest, and
//! which trade is best depends on the group. [`fit`] tries the range shrunk by each factor
//! of [`SHRINK`] (both ends toward zero, as GPTQ's reference `mse` grid does), keeps the
//! scales with the least error `sum_i h_i (x_i - Q(x_i))^2`, and then refits the step (and
//! offset) by weighted least squares given the chosen codes, keeping that if it is better.
//! `h` is the importance of each column, the diagonal of the layer input's `H = sum x x^T`
//! (or 1): the error the layer's output feels, not the weight's own.
//!
//! The result is always one of the format's scale pairs, rounded to f16 as stored, so
//! everything downstream ([`IntFormat::code`], the GPTQ sweep, the kernels) is unchanged;
//! and since shrink factor 1 is tried, the error never exceeds round-to-nearest's.

use half::f16;
use kiln_ir::format::{BlockScales, IntFormat};

/// The range factors tried: 1, 0.98, ..., 0.60.
pub const SHRINK: std::ops::RangeInclusive<u32> = 0..=20;

fn factor(i: u32) -> f32 {
    1.0 - 0.02 * i as f32
}

/// How finely [`fit`] searches: every factor of [`SHRINK`], or every fourth (1, 0.92, ...,
/// 0.60: a quarter of the work, for estimates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grid {
    Fine,
    Coarse,
}

/// The scales of `values` (one group) with the least `h`-weighted rounding error; `h` holds
/// one non-negative weight per value, or is empty for equal weights.
pub fn fit(f: IntFormat, values: &[f32], h: &[f32]) -> BlockScales {
    fit_on(Grid::Fine, f, values, h)
}

/// [`fit`] on the given grid.
pub fn fit_on(grid: Grid, f: IntFormat, values: &[f32], h: &[f32]) -> BlockScales {
    debug_assert!(h.is_empty() || h.len() == values.len());
    let mut best = f.fit(values);
    let mut best_error = error(f, best, values, h);
    if best_error <= 0.0 || !best_error.is_finite() {
        return best;
    }
    let range = Range::of(f, values);
    let stride = if grid == Grid::Fine { 1 } else { 4 };
    for i in SHRINK.skip(1).step_by(stride) {
        let s = range.shrunk(f, factor(i));
        let e = error(f, s, values, h);
        if e < best_error {
            (best, best_error) = (s, e);
        }
    }
    if let Some(s) = refit(f, best, values, h) {
        let e = error(f, s, values, h);
        if e < best_error {
            best = s;
        }
    }
    best
}

/// Stored bytes of `values` (rows of `h.len()` values, or of any multiple of the group when
/// `h` is empty), group by group with [`fit_on`]'s scales and round-to-nearest codes.
pub fn quantize(grid: Grid, f: IntFormat, values: &[f32], h: &[f32]) -> Vec<u8> {
    let g = f.group as usize;
    let mut out = Vec::with_capacity(values.len() / g * f.block_bytes());
    let mut codes = vec![0u8; g];
    for (j, group) in values.chunks_exact(g).enumerate() {
        let weights = if h.is_empty() {
            &[][..]
        } else {
            let start = j * g % h.len();
            &h[start..start + g]
        };
        let s = fit_on(grid, f, group, weights);
        for (q, &x) in codes.iter_mut().zip(group) {
            *q = f.code(s, x);
        }
        f.pack_block(s, &codes, &mut out);
    }
    out
}

/// What [`IntFormat::fit`] spreads over the codes: `[lo, hi]`, or the value of largest
/// magnitude for symmetric formats (in `hi`).
struct Range {
    lo: f32,
    hi: f32,
}

impl Range {
    fn of(f: IntFormat, values: &[f32]) -> Range {
        if f.asym {
            let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
            Range { lo, hi }
        } else {
            let max = values.iter().fold(0f32, |a, &v| if v.abs() > a.abs() { v } else { a });
            Range { lo: 0.0, hi: max }
        }
    }

    /// Round to nearest's scales for the range shrunk by `p` toward zero.
    fn shrunk(&self, f: IntFormat, p: f32) -> BlockScales {
        if f.asym {
            let m = f16::from_f32(self.lo * p);
            let d = f16::from_f32((self.hi * p - m.to_f32()).max(0.0) / f.max_code() as f32);
            BlockScales { d, m }
        } else {
            BlockScales { d: f16::from_f32(self.hi * p / -(f.zero_code() as f32)), m: f16::ZERO }
        }
    }
}

/// `sum h_i (x_i - Q(x_i))^2` under the scales `s`, rounding as [`IntFormat::code`] does
/// up to exact ties (this only ranks candidate scales).
fn error(f: IntFormat, s: BlockScales, values: &[f32], h: &[f32]) -> f32 {
    let (d, m) = (s.d.to_f32(), s.m.to_f32());
    let zero = f.zero_code() as f32;
    if d == 0.0 || !d.is_finite() {
        // Every value decodes to the offset (asymmetric) or to zero.
        let m = if f.asym { m } else { 0.0 };
        return weighted(values, h, |x| x - m);
    }
    let (inv, top) = (1.0 / d, f.max_code() as f32);
    // Rounded by adding and subtracting 2^23 (exact for 0 <= t < 2^23, halves to even where
    // `IntFormat::code` rounds them away from zero): plain vector arithmetic, where
    // `f32::round` is a library call without SSE4.1 and `as i32` a scalar conversion.
    const SHIFT: f32 = 8_388_608.0;
    weighted(values, h, |x| {
        let t = ((x - m) * inv + zero).clamp(0.0, top);
        let q = (t + SHIFT) - SHIFT;
        x - (d * (q - zero) + m)
    })
}

/// `sum h_i r(x_i)^2` (`h` empty: weights 1), in eight lanes so that it vectorizes.
#[inline(always)]
fn weighted(values: &[f32], h: &[f32], r: impl Fn(f32) -> f32) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0f32; LANES];
    let chunks = values.len() / LANES * LANES;
    if h.is_empty() {
        for x in values[..chunks].chunks_exact(LANES) {
            for (a, &x) in acc.iter_mut().zip(x) {
                let e = r(x);
                *a += e * e;
            }
        }
    } else {
        for (x, w) in values[..chunks].chunks_exact(LANES).zip(h.chunks_exact(LANES)) {
            for ((a, &x), &w) in acc.iter_mut().zip(x).zip(w) {
                let e = r(x);
                *a += w * e * e;
            }
        }
    }
    let tail: f32 = values[chunks..]
        .iter()
        .enumerate()
        .map(|(i, &x)| h.get(chunks + i).copied().unwrap_or(1.0) * r(x) * r(x))
        .sum();
    acc.iter().sum::<f32>() + tail
}

/// The step (and for asymmetric formats the offset) that best fit the codes `s` gives the
/// values, by weighted least squares; `None` if the system is degenerate.
fn refit(f: IntFormat, s: BlockScales, values: &[f32], h: &[f32]) -> Option<BlockScales> {
    let zero = f.zero_code() as f64;
    let (mut sw, mut sq, mut sqq, mut sx, mut sqx) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (i, &x) in values.iter().enumerate() {
        let w = if h.is_empty() { 1.0 } else { h[i] as f64 };
        let q = f.code(s, x) as f64 - zero;
        let x = x as f64;
        sw += w;
        sq += w * q;
        sqq += w * q * q;
        sx += w * x;
        sqx += w * q * x;
    }
    let (d, m) = if f.asym {
        let det = sw * sqq - sq * sq;
        if det.abs() <= f64::EPSILON * sw * sqq {
            return None;
        }
        ((sw * sqx - sq * sx) / det, (sqq * sx - sq * sqx) / det)
    } else {
        if sqq <= 0.0 {
            return None;
        }
        (sqx / sqq, 0.0)
    };
    let s = BlockScales { d: f16::from_f32(d as f32), m: f16::from_f32(m as f32) };
    (s.d.to_f32().is_finite() && s.m.to_f32().is_finite()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn int(name: &str) -> IntFormat {
        name.parse().expect("a valid format")
    }

    fn decode(f: IntFormat, bytes: &[u8], len: usize) -> Vec<f32> {
        kiln_ir::Format::Int(f).dequantize(bytes, len as u64).expect("decodes")
    }

    fn sq_error(a: &[f32], b: &[f32], h: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .enumerate()
            .map(|(i, (x, y))| h.get(i % h.len().max(1)).map_or(1.0, |&w| w as f64) * ((x - y) as f64).powi(2))
            .sum()
    }

    /// A group with one outlier: clipping it buys a finer step for the other 31 values.
    #[test]
    fn an_outlier_is_clipped_when_that_lowers_the_error() {
        let f = int("int4g32");
        let mut values: Vec<f32> = (0..32).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
        values[5] = 0.5;
        let rtn = f.quantize(&values);
        let searched = quantize(Grid::Fine, f, &values, &[]);
        let (e_rtn, e_search) =
            (sq_error(&values, &decode(f, &rtn, 32), &[]), sq_error(&values, &decode(f, &searched, 32), &[]));
        assert!(e_search < 0.95 * e_rtn, "search {e_search} vs round-to-nearest {e_rtn}");
        // The outlier's own error went up: it was clipped.
        let (q_rtn, q_search) = (decode(f, &rtn, 32)[5], decode(f, &searched, 32)[5]);
        assert!((q_search - 0.5).abs() > (q_rtn - 0.5).abs());
    }

    /// Never worse than round to nearest, for every format family, weighted or not.
    #[test]
    fn never_worse_than_round_to_nearest() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        for name in ["int2g32a", "int3g64", "int3g32a", "int4g32", "int4g64a", "int8g64"] {
            let f = int(name);
            let g = f.group as usize;
            let mut wins = 0;
            for trial in 0..50 {
                let values: Vec<f32> = (0..4 * g).map(|_| next() * next().abs().powi(2) * 8.0).collect();
                let h: Vec<f32> = if trial % 2 == 0 { vec![] } else { (0..4 * g).map(|_| next() + 0.5).collect() };
                let rtn = sq_error(&values, &decode(f, &f.quantize(&values), 4 * g), &h);
                let on = |grid| sq_error(&values, &decode(f, &quantize(grid, f, &values, &h), 4 * g), &h);
                let (fine, coarse) = (on(Grid::Fine), on(Grid::Coarse));
                assert!(fine <= rtn * (1.0 + 1e-6), "{name} trial {trial}: search {fine} > round-to-nearest {rtn}");
                assert!(coarse <= rtn * (1.0 + 1e-6), "{name} trial {trial}: coarse {coarse} > {rtn}");
                wins += (fine < 0.99 * rtn) as usize;
            }
            assert!(wins >= 10, "{name}: the search helped only {wins} times in 50 heavy-tailed trials");
        }
    }

    /// The weights steer the fit toward the values that matter.
    #[test]
    fn heavy_columns_are_fitted_first() {
        let f = int("int2g32a");
        let values: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut h = vec![1e-3f32; 32];
        for w in &mut h[..4] {
            *w = 1.0;
        }
        let weighted = decode(f, &quantize(Grid::Fine, f, &values, &h), 32);
        let plain = decode(f, &quantize(Grid::Fine, f, &values, &[]), 32);
        let heavy = |q: &[f32]| sq_error(&values[..4], &q[..4], &[]);
        assert!(heavy(&weighted) < heavy(&plain), "{} vs {}", heavy(&weighted), heavy(&plain));
    }
}
