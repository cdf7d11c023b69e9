//! GPTQ rounding of linear weights (Frantar et al., "GPTQ: Accurate Post-Training
//! Quantization for Generative Pre-trained Transformers", 2022).
//!
//! Round to nearest ([`IntFormat::quantize`]) minimizes each weight's own error. What a
//! model feels is the error of the layer's *output*: for a linear `y = W x` whose inputs
//! `x` come from a calibration set, that is
//!
//! ```text
//! sum over calibration rows of ||(W - Q) x||^2  =  trace((W - Q) H (W - Q)^T),   H = sum x x^T
//! ```
//!
//! ([`output_error`]). When inputs are correlated, the error of one rounded weight can be
//! partly cancelled by moving the weights of the other inputs of the same output row, which
//! is what GPTQ does. The rows of `W` are independent problems sharing the one `H`.
//!
//! # Conventions
//!
//! - `w` is the weight as the IR stores it: `[n, k]` row-major, `n` outputs by `k` inputs
//!   (`y = W x`), in f32. Groups of the format run along a row, so `k` must be a multiple
//!   of the group size.
//! - `h` is `[k, k]` row-major f64, symmetric: the sum of `x x^T` over calibration rows
//!   (the paper's `2 X^T X` without the 2, which scales every candidate alike). Only the
//!   direction of the data matters, so it need not be averaged either.
//! - The result is exactly the stored bytes of the format, block by block in natural
//!   order, built with [`IntFormat::fit`], [`IntFormat::code`], [`IntFormat::value`] and
//!   [`IntFormat::pack_block`], so `Format::Int(f).dequantize` of them gives back, bit for
//!   bit, the values the algorithm rounded to and spread the error of.
//!
//! # Algorithm
//!
//! 1. Dead inputs (`H_ii == 0`, never active in calibration) get `H_ii = 1` and their
//!    weight column set to 0: nothing observed depends on them, and 0 is what keeps them
//!    harmless (the reference implementation does the same).
//! 2. Damping: `damp * mean(diag H)` is added to the diagonal, which bounds the condition
//!    number and keeps the rank-deficient `H` of a small calibration set invertible. If the
//!    Cholesky factorization still fails, the damping is raised tenfold (to at least 1%),
//!    twice, before giving up with [`GptqError::NotPositiveDefinite`].
//! 3. `U`, the upper Cholesky factor of `H^-1` (`H^-1 = U^T U`), is computed once per
//!    layer in f64 with faer. With `J` the reversal permutation and `J H J = L L^T`,
//!    `U = J L^-1 J`: one Cholesky and one triangular inverse (`2/3 k^3` multiply-adds)
//!    instead of the paper's factorize, invert and factorize again.
//! 4. Columns are quantized in order. After rounding column `i` of a row to `q_i`, the
//!    scaled error `e_i = (w_i - q_i) / U_ii` is subtracted, times row `i` of `U`, from the
//!    columns not yet quantized: this is the optimal (OBS) correction of the remaining
//!    weights given the quantized ones, and `U_ii^2` is the inverse Hessian of the remaining
//!    problem that the correction needs. Since `w0 - q = U^T e`, the layer's output error is
//!    exactly `sum e_i^2` (with the damped `H`), which the tests check.
//! 5. Lazy batches: columns are taken in blocks of `block` (128). Within a block the
//!    updates are rank-1 and touch only the block; the updates of the columns after the
//!    block are accumulated and applied once per block as one matrix product
//!    `W[:, after] -= E U[block, after]`, which runs at matrix-multiply speed.
//!
//! Rows are independent, so the sweep runs over chunks of rows in parallel (rayon), each
//! chunk with its own sequential faer products, in f32 like the reference implementation;
//! the factorization of `H` stays in f64.
//!
//! # Groups and act-order
//!
//! Without act-order, a group's scales are fitted ([`IntFormat::fit`], round-to-nearest's
//! choice) when the sweep reaches the group's first column, from the weights *as updated*
//! so far, so the scales see the errors already pushed onto the group. To make "as updated"
//! exact, the block size is adjusted so every group starts a block (a group within a block,
//! or a group made of whole blocks): then all the pending updates have landed when its
//! first column is reached. (The reference implementation fits from a copy that misses the
//! updates of the current block.)
//!
//! With act-order, columns are processed by decreasing `H_ii`: the inputs with the most
//! energy are rounded first, while the most other columns remain to absorb their error.
//! The groups still are runs of consecutive columns of the natural order, as the stored
//! layout demands, but the sweep then reaches their columns in a scattered order; so the
//! scales are "static": fitted for every group up front, from the original weights.
//!
//! # Cost
//!
//! `2/3 k^3` multiply-adds (f64) to factor `H`, then `n k^2 / 2` (f32) for the sweep, most
//! of them in matrix products; memory `O(k^2 + n k)`. A `1536 x 576` or `576 x 1536` layer
//! takes tens of milliseconds on two cores.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use kiln_ir::format::{BlockScales, FormatError, IntFormat};
use rayon::prelude::*;

/// Tuning of [`gptq`].
#[derive(Clone, Debug, PartialEq)]
pub struct GptqOptions {
    /// Damping added to the diagonal of `H`, relative to its mean diagonal (0.01).
    pub damp: f64,
    /// Columns per lazy batch (128); adjusted so that groups start batches.
    pub block: usize,
    /// Quantize columns by decreasing `H_ii`, with scales fitted up front (false).
    pub act_order: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, block: 128, act_order: false }
    }
}

/// Why [`gptq`] could not quantize a weight.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum GptqError {
    #[error("the weight has {found} values, but {n} x {k} needs {}", n * k)]
    WeightShape { n: usize, k: usize, found: usize },
    #[error("the Hessian of {k} inputs needs {k} x {k} = {} values, found {found}", k * k)]
    HessianShape { k: usize, found: usize },
    #[error("{format} stores groups of {} values along a row; rows of {k} are not a multiple", format.group)]
    Group { format: IntFormat, k: usize },
    #[error(transparent)]
    Format(#[from] FormatError),
    #[error("GPTQ options: {0}")]
    Options(&'static str),
    #[error("the {0} holds a value that is not finite")]
    NonFinite(&'static str),
    #[error(
        "the Hessian is not positive definite even with damping {damp} (times the mean diagonal); the calibration statistics are broken"
    )]
    NotPositiveDefinite { damp: f64 },
}

/// Quantizes `w` (`[n, k]` row-major, `(out, in)`) to `format` by GPTQ, given `h`
/// (`[k, k]` row-major, the sum of `x x^T` over calibration inputs). Returns the stored
/// bytes: `n * k / group` blocks, in the natural order of [`IntFormat::quantize`].
pub fn gptq(
    w: &[f32],
    n: usize,
    k: usize,
    h: &[f64],
    format: IntFormat,
    opts: &GptqOptions,
) -> Result<Vec<u8>, GptqError> {
    run(w, n, k, h, format, opts, false).map(|r| r.bytes)
}

/// The layer's output error on the calibration data, for weights `w` replaced by `q` (both
/// `[n, k]` row-major): `trace((W - Q) H (W - Q)^T)`, i.e. the sum over calibration rows of
/// `||(W - Q) x||^2`. Computed in f64.
///
/// # Panics
///
/// If the slices do not have `n * k`, `n * k` and `k * k` elements.
pub fn output_error(w: &[f32], q: &[f32], n: usize, k: usize, h: &[f64]) -> f64 {
    assert_eq!(w.len(), n * k, "output_error: w is not {n} x {k}");
    assert_eq!(q.len(), n * k, "output_error: q is not {n} x {k}");
    assert_eq!(h.len(), k * k, "output_error: h is not {k} x {k}");
    if n == 0 || k == 0 {
        return 0.0;
    }
    const ROWS: usize = 64;
    let hm = MatRef::from_row_major_slice(h, k, k);
    let chunk = ROWS * k;
    w.par_chunks(chunk)
        .zip(q.par_chunks(chunk))
        .map(|(wc, qc)| {
            let rows = wc.len() / k;
            let e: Vec<f64> = wc.iter().zip(qc).map(|(&a, &b)| a as f64 - b as f64).collect();
            let mut eh = Mat::<f64>::zeros(rows, k);
            matmul(eh.as_mut(), Accum::Replace, MatRef::from_row_major_slice(&e, rows, k), hm, 1.0, Par::Seq);
            clear_upper_ymm();
            (0..rows).map(|r| (0..k).map(|c| eh[(r, c)] * e[r * k + c]).sum::<f64>()).sum::<f64>()
        })
        .sum()
}

/// What one GPTQ run produced.
struct Run {
    bytes: Vec<u8>,
    /// `sum e_i^2`: the output error under the damped `H` that was used, as tracked.
    loss: f64,
    /// The damping actually added to the diagonal (absolute, after retries).
    damp: f64,
    /// The values the sweep rounded to, `[n, k]` in natural order (when asked for).
    values: Option<Vec<f32>>,
}

/// [`gptq`], optionally keeping what the tests check against.
fn run(
    w: &[f32],
    n: usize,
    k: usize,
    h: &[f64],
    format: IntFormat,
    opts: &GptqOptions,
    keep_values: bool,
) -> Result<Run, GptqError> {
    let f = IntFormat::new(format.bits, format.group, format.asym)?;
    let g = f.group as usize;
    if w.len() != n * k {
        return Err(GptqError::WeightShape { n, k, found: w.len() });
    }
    if h.len() != k * k {
        return Err(GptqError::HessianShape { k, found: h.len() });
    }
    if !k.is_multiple_of(g) {
        return Err(GptqError::Group { format: f, k });
    }
    if opts.block == 0 {
        return Err(GptqError::Options("the block size must be positive"));
    }
    if !(opts.damp.is_finite() && opts.damp >= 0.0) {
        return Err(GptqError::Options("the damping must be finite and non-negative"));
    }
    if !w.iter().all(|x| x.is_finite()) {
        return Err(GptqError::NonFinite("weight"));
    }
    if !h.iter().all(|x| x.is_finite()) {
        return Err(GptqError::NonFinite("Hessian"));
    }
    if n == 0 || k == 0 {
        return Ok(Run { bytes: Vec::new(), loss: 0.0, damp: 0.0, values: keep_values.then(Vec::new) });
    }

    let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
    let diag: Vec<f64> = (0..k).map(|i| if dead[i] { 1.0 } else { h[i * k + i] }).collect();
    // perm[i]: the natural column processed i-th.
    let mut perm: Vec<usize> = (0..k).collect();
    if opts.act_order {
        perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
    }
    let (m, damp) = factor(h, k, &diag, &perm, opts.damp)?;

    // Every group must start a block unless scales are static (see the module doc).
    let block = if opts.act_order || opts.block.is_multiple_of(g) || g.is_multiple_of(opts.block) {
        opts.block
    } else {
        (opts.block / g).max(1) * g
    }
    .min(k);

    let sweep = Sweep { f, k, block, act_order: opts.act_order, dead: &dead, perm: &perm, m: &m };
    let rows = n.div_ceil(4 * rayon::current_num_threads()).clamp(16, 128);
    let parts: Vec<Part> = w.par_chunks(rows * k).map(|wc| sweep.rows(wc, keep_values)).collect();

    let mut bytes = Vec::with_capacity(n * (k / g) * f.block_bytes());
    let mut values = keep_values.then(|| Vec::with_capacity(n * k));
    let mut loss = 0.0;
    for p in parts {
        bytes.extend(p.bytes);
        loss += p.loss;
        if let (Some(all), Some(v)) = (values.as_mut(), p.values) {
            all.extend(v);
        }
    }
    Ok(Run { bytes, loss, damp, values })
}

/// `M` (row-major f32, `[k, k]`, upper triangular) with `M M^T = P^T H P + damp I`, dead
/// diagonal entries replaced by `diag`, `P` the permutation `perm`; and the absolute
/// damping used. Retries with more damping when the factorization fails.
fn factor(h: &[f64], k: usize, diag: &[f64], perm: &[usize], damp: f64) -> Result<(Vec<f32>, f64), GptqError> {
    let par = if std::env::var_os("FPAR").is_some() && k >= 256 { Par::rayon(0) } else { Par::Seq };
    let mean = diag.iter().sum::<f64>() / k as f64;
    let mut stack_mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(k, par, Default::default()));
    let mut relative = damp;
    for attempt in 0..3 {
        if attempt > 0 {
            relative = (relative * 10.0).max(0.01);
        }
        let add = relative * mean;
        // a = J (P^T H P + add I) J, in reversed order: with a = L L^T, M = J L J.
        let r = |i: usize| perm[k - 1 - i];
        let mut a = Mat::<f64>::from_fn(k, k, |i, j| if i == j { diag[r(i)] + add } else { h[r(j) * k + r(i)] });
        let ok =
            cholesky_in_place(a.as_mut(), Default::default(), par, MemStack::new(&mut stack_mem), Default::default())
                .is_ok();
        clear_upper_ymm();
        if ok {
            let mut m = vec![0f32; k * k];
            let mut finite = true;
            for j in 0..k {
                let l = a.col(k - 1 - j);
                for i in 0..=j {
                    let x = l[k - 1 - i] as f32;
                    finite &= x.is_finite();
                    m[i * k + j] = x;
                }
                finite &= m[j * k + j] > 0.0;
            }
            if finite {
                return Ok((m, add));
            }
        }
    }
    Err(GptqError::NotPositiveDefinite { damp: relative })
}

/// Runs `vzeroupper`. faer 0.24's x86 gemm kernels return with the upper halves of the
/// ymm registers dirty; until something clears them, the SSE and VEX-128 code that follows
/// (the f16 conversions in [`IntFormat::code`] and [`IntFormat::value`], the rank-1
/// updates) ran 5-10x slower on the Zen 3 this was measured on. Call it after faer work,
/// on the thread that did it.
fn clear_upper_ymm() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        #[target_feature(enable = "avx")]
        fn vzeroupper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        // SAFETY: the CPU has AVX, checked just above.
        unsafe { vzeroupper() }
    }
}

/// The per-layer state of the sweep, shared by the row chunks.
struct Sweep<'a> {
    f: IntFormat,
    k: usize,
    block: usize,
    act_order: bool,
    dead: &'a [bool],
    perm: &'a [usize],
    /// The factor `M` of the damped, permuted `H` (see the module doc).
    m: &'a [f32],
}

/// The result of a chunk of rows.
struct Part {
    bytes: Vec<u8>,
    loss: f64,
    values: Option<Vec<f32>>,
}

impl Sweep<'_> {
    /// Quantizes the rows `w` (natural order), returning their stored bytes.
    fn rows(&self, w: &[f32], keep_values: bool) -> Part {
        // This thread may have run faer's kernels for another call (see the function).
        clear_upper_ymm();
        let (f, k, g, m) = (self.f, self.k, self.f.group as usize, self.m);
        let rows = w.len() / k;
        let groups = k / g;
        // `orig`: the rows in processing order, dead columns zeroed; overwritten by the
        // quantized values as the sweep goes. `acc`: M^T d, the pending corrections.
        let mut orig = vec![0f32; rows * k];
        let mut acc = vec![0f32; rows * k];
        let mut scales = vec![BlockScales { d: Default::default(), m: Default::default() }; rows * groups];
        let mut natural = vec![0f32; k];
        for r in 0..rows {
            for (c, x) in natural.iter_mut().enumerate() {
                *x = if self.dead[c] { 0.0 } else { w[r * k + c] };
            }
            for (i, &c) in self.perm.iter().enumerate() {
                orig[r * k + i] = natural[c];
            }
            if self.act_order {
                for (s, group) in scales[r * groups..][..groups].iter_mut().zip(natural.chunks_exact(g)) {
                    *s = f.fit(group);
                }
            }
        }

        let mut codes = vec![0u8; rows * k];
        let mut delta = vec![0f32; rows * self.block];
        let mut group = vec![0f32; g];
        let mut loss = 0.0f64;
        for i1 in (0..k).step_by(self.block) {
            let i2 = (i1 + self.block).min(k);
            let width = i2 - i1;
            for r in 0..rows {
                let (orig, acc) = (&mut orig[r * k..(r + 1) * k], &mut acc[r * k..(r + 1) * k]);
                for i in i1..i2 {
                    let c = self.perm[i];
                    let s = &mut scales[r * groups + c / g];
                    if !self.act_order && c.is_multiple_of(g) {
                        // The group is columns i..i + g, all corrections from before landed in
                        // `acc`: solve M[G, G]^T y = acc[G] for the current weights.
                        group.copy_from_slice(&acc[i..i + g]);
                        for l in 0..g {
                            let mrow = &m[(i + l) * k + i..][..g];
                            let y = group[l] / mrow[l];
                            for (t, &mlj) in group[l + 1..].iter_mut().zip(&mrow[l + 1..]) {
                                *t -= mlj * y;
                            }
                            group[l] = orig[i + l] + y;
                        }
                        *s = f.fit(&group);
                    }
                    let mrow = &m[i * k..];
                    let x = orig[i] + acc[i] / mrow[i];
                    let q = f.code(*s, x);
                    let v = f.value(*s, q);
                    codes[r * k + c] = q;
                    let e = mrow[i] * (x - v);
                    loss += e as f64 * e as f64;
                    let d = orig[i] - v;
                    orig[i] = v;
                    for (a, &mij) in acc[i + 1..i2].iter_mut().zip(&mrow[i + 1..i2]) {
                        *a += mij * d;
                    }
                    delta[r * self.block + i - i1] = d;
                }
            }
            if i2 < k {
                // acc[:, i2..] += D M[i1..i2, i2..], transposed so that every operand is
                // column major: faer 0.24's x86 kernels mishandle a row-major destination
                // (wrong sums and heap corruption), so this form is the one to keep.
                let dst = MatMut::from_column_major_slice_with_stride_mut(&mut acc[i2..], k - i2, rows, k);
                let mt = MatRef::from_column_major_slice_with_stride(&m[i1 * k + i2..], k - i2, width, k);
                let dt = MatRef::from_column_major_slice_with_stride(&delta, width, rows, self.block);
                matmul(dst, Accum::Add, mt, dt, 1.0f32, Par::Seq);
                clear_upper_ymm();
            }
        }

        let mut bytes = Vec::with_capacity(rows * groups * f.block_bytes());
        for (s, c) in scales.iter().zip(codes.chunks_exact(g)) {
            f.pack_block(*s, c, &mut bytes);
        }
        let values = keep_values.then(|| {
            let mut v = vec![0f32; rows * k];
            for r in 0..rows {
                for (i, &c) in self.perm.iter().enumerate() {
                    v[r * k + c] = orig[r * k + i];
                }
            }
            v
        });
        Part { bytes, loss, values }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::Format;

    /// splitmix64, with Box-Muller normals: deterministic data without dependencies.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f64 {
            ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn normal(&mut self) -> f64 {
            (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
        }
    }

    fn int(name: &str) -> IntFormat {
        name.parse().unwrap()
    }

    fn weights(rng: &mut Rng, n: usize, k: usize) -> Vec<f32> {
        (0..n * k).map(|_| (0.05 * rng.normal()) as f32).collect()
    }

    /// `m` calibration inputs (`[m, k]`) `x = A z + noise`, `z` of `k / 4` dimensions and
    /// every input scaled by its own factor: strongly correlated, of uneven energy.
    fn correlated_inputs(rng: &mut Rng, k: usize, m: usize) -> Vec<f64> {
        let r = k / 4;
        let a: Vec<f64> = (0..k * r).map(|_| rng.normal()).collect();
        let scale: Vec<f64> = (0..k).map(|_| (0.7 * rng.normal()).exp()).collect();
        let mut x = Vec::with_capacity(m * k);
        for _ in 0..m {
            let z: Vec<f64> = (0..r).map(|_| rng.normal()).collect();
            for (i, s) in scale.iter().enumerate() {
                let mix: f64 = a[i * r..(i + 1) * r].iter().zip(&z).map(|(a, z)| a * z).sum();
                x.push(s * (mix + 0.3 * rng.normal()));
            }
        }
        x
    }

    /// `sum x x^T` over the rows of `x` (`[m, k]`).
    fn gram(x: &[f64], k: usize) -> Vec<f64> {
        let mut h = vec![0.0; k * k];
        for row in x.chunks_exact(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += row[i] * row[j];
                }
            }
        }
        h
    }

    fn correlated_h(rng: &mut Rng, k: usize) -> Vec<f64> {
        gram(&correlated_inputs(rng, k, 400), k)
    }

    fn decode(f: IntFormat, bytes: &[u8], n: usize, k: usize) -> Vec<f32> {
        Format::Int(f).dequantize(bytes, (n * k) as u64).unwrap()
    }

    fn rtn_error(w: &[f32], n: usize, k: usize, h: &[f64], f: IntFormat) -> f64 {
        output_error(w, &decode(f, &f.quantize(w), n, k), n, k, h)
    }

    fn gptq_error(w: &[f32], n: usize, k: usize, h: &[f64], f: IntFormat, opts: &GptqOptions) -> f64 {
        output_error(w, &decode(f, &gptq(w, n, k, h, f, opts).unwrap(), n, k), n, k, h)
    }

    fn act_order() -> GptqOptions {
        GptqOptions { act_order: true, ..Default::default() }
    }

    #[test]
    fn output_error_is_the_squared_error_of_the_outputs() {
        let mut rng = Rng(7);
        let (n, k, m) = (5, 64, 30);
        let x = correlated_inputs(&mut rng, k, m);
        let w = weights(&mut rng, n, k);
        let q: Vec<f32> = w.iter().map(|&v| v + (0.01 * rng.normal()) as f32).collect();
        let direct: f64 = x
            .chunks_exact(k)
            .map(|x| {
                (0..n)
                    .map(|r| {
                        let y: f64 = (0..k).map(|c| (w[r * k + c] as f64 - q[r * k + c] as f64) * x[c]).sum();
                        y * y
                    })
                    .sum::<f64>()
            })
            .sum();
        let e = output_error(&w, &q, n, k, &gram(&x, k));
        assert!((e - direct).abs() <= 1e-9 * direct, "{e} vs {direct}");
        assert_eq!(output_error(&w, &w, n, k, &gram(&x, k)), 0.0);
    }

    // Observed gptq/rtn: int4g32a 0.152, int4g64 0.141, int3g32a 0.173.
    #[test]
    fn gptq_beats_rtn_on_correlated_inputs() {
        let mut rng = Rng(1);
        let (n, k) = (48, 256);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        for name in ["int4g32a", "int4g64", "int3g32a"] {
            let f = int(name);
            let ratio = gptq_error(&w, n, k, &h, f, &GptqOptions::default()) / rtn_error(&w, n, k, &h, f);
            assert!(ratio < 0.5, "{name}: GPTQ / RTN output error = {ratio}");
        }
    }

    // Observed gptq/rtn with act-order: int4g32a 0.019, int4g64 0.016, int3g32a 0.020.
    #[test]
    fn act_order_beats_rtn_and_keeps_the_natural_layout() {
        let mut rng = Rng(2);
        let (n, k) = (48, 256);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        for name in ["int4g32a", "int4g64", "int3g32a"] {
            let f = int(name);
            let rtn = rtn_error(&w, n, k, &h, f);
            let ratio = gptq_error(&w, n, k, &h, f, &act_order()) / rtn;
            assert!(ratio < 0.5, "{name}: act-order GPTQ / RTN output error = {ratio}");
            // Column by column, the stored weights are still the originals, rounded and
            // nudged: a permuted layout would be as far off as unrelated weights (~1.4).
            let q = decode(f, &gptq(&w, n, k, &h, f, &act_order()).unwrap(), n, k);
            for c in 0..k {
                let norm = |v: &dyn Fn(usize) -> f32| (0..n).map(|r| (v(r) as f64).powi(2)).sum::<f64>().sqrt();
                let rel = norm(&|r| q[r * k + c] - w[r * k + c]) / norm(&|r| w[r * k + c]);
                assert!(rel < 0.7, "{name}: column {c} is {rel} away from the original");
            }
        }
    }

    /// With no correlation between inputs, `U` is diagonal: there is nothing to spread the
    /// error onto, and fitting each group from the (unchanged) weights is exactly RTN. The
    /// damping only scales the diagonal, so this holds bit for bit.
    #[test]
    fn uncorrelated_inputs_give_rtn_bit_for_bit() {
        let mut rng = Rng(3);
        let (n, k) = (40, 256);
        let w = weights(&mut rng, n, k);
        let identity: Vec<f64> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 } else { 0.0 }).collect();
        let diagonal: Vec<f64> =
            (0..k * k).map(|i| if i % (k + 1) == 0 { 0.1 + 10.0 * rng.uniform() } else { 0.0 }).collect();
        for h in [&identity, &diagonal] {
            for name in ["int4g32a", "int4g64", "int3g32a", "int2g32", "int8g128"] {
                let f = int(name);
                for opts in [GptqOptions::default(), act_order(), GptqOptions { block: 32, ..Default::default() }] {
                    assert!(gptq(&w, n, k, h, f, &opts).unwrap() == f.quantize(&w), "{name} {opts:?}");
                }
            }
        }
    }

    /// The bytes decode to exactly the values the sweep rounded to, and the error it tracked
    /// (`sum e_i^2`) is the output error of those values under the damped `H`: this checks
    /// the factor `U`, the error propagation and the packing at once.
    #[test]
    fn bytes_decode_to_the_values_gptq_computed_with() {
        let mut rng = Rng(4);
        for k in [192, 256] {
            let n = 40;
            let h = correlated_h(&mut rng, k);
            let w = weights(&mut rng, n, k);
            let blocks = [GptqOptions::default(), act_order(), GptqOptions { block: 48, ..Default::default() }];
            for name in ["int4g32a", "int4g64", "int3g32a", "int4g96", "int2g256a", "int8g64"] {
                let f = int(name);
                if !k.is_multiple_of(f.group as usize) {
                    continue;
                }
                for opts in &blocks {
                    let run = run(&w, n, k, &h, f, opts, true).unwrap();
                    assert_eq!(run.bytes.len(), n * k / f.group as usize * f.block_bytes());
                    let values = run.values.unwrap();
                    let decoded = decode(f, &run.bytes, n, k);
                    assert!(decoded.iter().zip(&values).all(|(a, b)| a.to_bits() == b.to_bits()), "{name} {opts:?}");
                    let mut damped = h.clone();
                    for i in 0..k {
                        damped[i * k + i] += run.damp;
                    }
                    let e = output_error(&w, &decoded, n, k, &damped);
                    assert!((run.loss - e).abs() < 1e-3 * e, "{name} {opts:?}: tracked {} vs {e}", run.loss);
                }
            }
        }
    }

    /// Lazy batching reorders the arithmetic only: any block size gives the same result, up
    /// to f32 rounding flipping the odd code.
    #[test]
    fn the_block_size_does_not_change_the_result() {
        let mut rng = Rng(5);
        let (n, k) = (32, 192);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        let f = int("int4g32a");
        let reference = gptq_error(&w, n, k, &h, f, &GptqOptions { block: k, ..Default::default() });
        for block in [1, 32, 100, 128] {
            let e = gptq_error(&w, n, k, &h, f, &GptqOptions { block, ..Default::default() });
            assert!((e - reference).abs() < 1e-3 * reference, "block {block}: {e} vs {reference}");
        }
    }

    #[test]
    fn dead_inputs_get_zero_weights() {
        let mut rng = Rng(6);
        let (n, k) = (16, 128);
        let mut h = correlated_h(&mut rng, k);
        let dead = [0, 5, 77, 127];
        for &d in &dead {
            for j in 0..k {
                h[d * k + j] = 0.0;
                h[j * k + d] = 0.0;
            }
        }
        let w = weights(&mut rng, n, k);
        let f = int("int4g32");
        for opts in [GptqOptions::default(), act_order()] {
            let q = decode(f, &gptq(&w, n, k, &h, f, &opts).unwrap(), n, k);
            for r in 0..n {
                for &d in &dead {
                    assert_eq!(q[r * k + d], 0.0);
                }
            }
            assert!(output_error(&w, &q, n, k, &h) < 0.5 * rtn_error(&w, n, k, &h, f));
        }
        // A layer whose inputs are all dead is all zeros.
        let q = decode(f, &gptq(&w, n, k, &vec![0.0; k * k], f, &GptqOptions::default()).unwrap(), n, k);
        assert!(q.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn an_indefinite_hessian_is_damped_harder_then_refused() {
        let f = int("int4g32");
        let w: Vec<f32> = (0..64).map(|i| i as f32 / 64.0).collect();
        // Eigenvalues 2.05 and -0.05: 1% damping is not enough, 10% is.
        let mut h = vec![0.0; 32 * 32];
        for i in 0..32 {
            h[i * 32 + i] = 1.0;
        }
        h[1] = 1.05;
        h[32] = 1.05;
        let r = run(&w, 2, 32, &h, f, &GptqOptions::default(), false).unwrap();
        assert_eq!(r.bytes.len(), 2 * f.block_bytes());
        assert!((r.damp - 0.1).abs() < 1e-12, "{}", r.damp);
        let negative: Vec<f64> = (0..32 * 32).map(|i| if i % 33 == 0 { -1.0 } else { 0.0 }).collect();
        assert_eq!(
            gptq(&w, 2, 32, &negative, f, &GptqOptions::default()),
            Err(GptqError::NotPositiveDefinite { damp: 1.0 })
        );
    }

    #[test]
    fn bad_shapes_and_options_are_refused() {
        let f = int("int4g32");
        let h = vec![0.0; 64 * 64];
        let w = vec![0.5f32; 2 * 64];
        let opts = GptqOptions::default();
        assert_eq!(gptq(&w[1..], 2, 64, &h, f, &opts), Err(GptqError::WeightShape { n: 2, k: 64, found: 127 }));
        assert_eq!(gptq(&w, 2, 64, &h[1..], f, &opts), Err(GptqError::HessianShape { k: 64, found: 4095 }));
        let h48 = vec![0.0; 48 * 48];
        let err = gptq(&w[..96], 2, 48, &h48, f, &opts).unwrap_err();
        assert_eq!(err, GptqError::Group { format: f, k: 48 });
        assert_eq!(err.to_string(), "int4g32 stores groups of 32 values along a row; rows of 48 are not a multiple");
        let bad_format = IntFormat { bits: 5, group: 32, asym: false };
        assert!(matches!(gptq(&w, 2, 64, &h, bad_format, &opts), Err(GptqError::Format(_))));
        assert!(matches!(
            gptq(&w, 2, 64, &h, f, &GptqOptions { block: 0, ..opts.clone() }),
            Err(GptqError::Options(_))
        ));
        assert!(matches!(
            gptq(&w, 2, 64, &h, f, &GptqOptions { damp: -1.0, ..opts.clone() }),
            Err(GptqError::Options(_))
        ));
        let mut nan = w.clone();
        nan[3] = f32::NAN;
        assert_eq!(gptq(&nan, 2, 64, &h, f, &opts), Err(GptqError::NonFinite("weight")));
        assert_eq!(gptq(&[], 0, 64, &h, f, &opts), Ok(Vec::new()));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use faer::linalg::triangular_inverse::invert_lower_triangular;
    use kiln_ir::Format;
    use std::time::Instant;

    fn cpu() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    fn h_of(k: usize, m: usize, seed: u64) -> Vec<f64> {
        let mut s = seed;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let r = k / 2;
        let z: Vec<f64> = (0..m * r).map(|_| next()).collect();
        let a: Vec<f64> = (0..r * k).map(|_| next()).collect();
        let mut x = Mat::<f64>::zeros(m, k);
        matmul(
            x.as_mut(),
            Accum::Replace,
            MatRef::from_row_major_slice(&z, m, r),
            MatRef::from_row_major_slice(&a, r, k),
            1.0,
            Par::rayon(0),
        );
        for i in 0..m {
            for j in 0..k {
                x[(i, j)] += 0.1 * next();
            }
        }
        let mut h = Mat::<f64>::zeros(k, k);
        matmul(h.as_mut(), Accum::Replace, x.transpose(), x.as_ref(), 1.0, Par::rayon(0));
        (0..k * k).map(|i| h[(i / k, i % k)]).collect()
    }

    #[path = "/tmp/gptq_uform.rs"]
    #[allow(dead_code, unused)]
    mod uform;

    #[test]
    fn gptq_compare_forms() {
        let k = 576;
        let h = h_of(k, 1024, 9);
        let n = 200;
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
        for name in ["int4g64a", "int4g32", "int3g32a", "int4g96", "int8g576", "int4g192a"] {
            let f: IntFormat = name.parse().unwrap();
            for opts in [GptqOptions::default(), GptqOptions { act_order: true, ..Default::default() }] {
                let a = gptq(&w, n, k, &h, f, &opts).unwrap();
                let b = uform::gptq(
                    &w,
                    n,
                    k,
                    &h,
                    f,
                    &uform::GptqOptions { damp: opts.damp, block: opts.block, act_order: opts.act_order },
                )
                .unwrap();
                let bb = f.block_bytes();
                let diff = a.chunks(bb).zip(b.chunks(bb)).filter(|(x, y)| x != y).count();
                let da = Format::Int(f).dequantize(&a, (n * k) as u64).unwrap();
                let db = Format::Int(f).dequantize(&b, (n * k) as u64).unwrap();
                eprintln!(
                    "{name} act {}: {diff}/{} blocks differ; errors {:.6} vs {:.6}",
                    opts.act_order,
                    a.len() / bb,
                    output_error(&w, &da, n, k, &h),
                    output_error(&w, &db, n, k, &h)
                );
            }
        }
    }

    #[test]
    fn gptq_factor() {
        let h = h_of(1536, 2048, 2);
        let k = 1536;
        for par in [Par::Seq, Par::rayon(0), Par::rayon(2)] {
            for _ in 0..2 {
                let mut a = Mat::<f64>::from_fn(k, k, |i, j| h[i * k + j] + if i == j { 10.0 } else { 0.0 });
                let mut mem = MemBuffer::new(cholesky_in_place_scratch::<f64>(k, par, Default::default()));
                let t = Instant::now();
                cholesky_in_place(a.as_mut(), Default::default(), par, MemStack::new(&mut mem), Default::default())
                    .unwrap();
                let t1 = t.elapsed();
                let mut linv = Mat::<f64>::zeros(k, k);
                let t = Instant::now();
                invert_lower_triangular(linv.as_mut(), a.as_ref(), par);
                clear_upper_ymm();
                let t2 = t.elapsed();
                let t = Instant::now();
                let mut c = Mat::<f64>::zeros(k, k);
                matmul(c.as_mut(), Accum::Replace, a.as_ref(), linv.as_ref(), 1.0, par);
                eprintln!("{par:?}: cholesky {t1:?} inverse {t2:?} gemm {:?}", t.elapsed());
            }
        }
    }

    #[test]
    fn gptq_prof() {
        let f: IntFormat = "int4g64a".parse().unwrap();
        let h576 = h_of(576, 2048, 1);
        let ww: Vec<f32> = (0..1536 * 576).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect();
        let t = Instant::now();
        for _ in 0..10 {
            gptq(&ww, 1536, 576, &h576, f, &GptqOptions::default()).unwrap();
        }
        clear_upper_ymm();
        eprintln!("10x 1536x576: {:?}", t.elapsed());
        let s = f.fit(&ww[..64]);
        let t = Instant::now();
        let mut acc = 0f32;
        for &x in &ww {
            let q = f.code(s, x);
            acc += f.value(s, q);
        }
        eprintln!("code+value over 1536x576: {:?} {acc}", t.elapsed());
        let hd: Vec<f64> = (0..576).map(|i| h576[i * 577]).collect();
        let p: Vec<usize> = (0..576).collect();
        let t = Instant::now();
        let (u, _) = factor(&h576, 576, &hd, &p, 0.01).unwrap();
        eprintln!("factor 576: {:?}", t.elapsed());
        let sw = Sweep { f, k: 576, block: 128, act_order: false, dead: &vec![false; 576], perm: &p, m: &u };
        let t = Instant::now();
        let part = sw.rows(&ww[..128 * 576], false);
        eprintln!("one chunk of 128 rows: {:?} {}", t.elapsed(), part.loss);
    }

    #[test]
    fn gptq_timing() {
        let f: IntFormat = "int4g64a".parse().unwrap();
        let h576 = h_of(576, 2048, 1);
        let h1536 = h_of(1536, 2048, 2);
        let w = |n: usize, k: usize| -> Vec<f32> {
            (0..n * k).map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5).collect()
        };
        for act in [false, true] {
            let opts = GptqOptions { act_order: act, ..Default::default() };
            for (n, k, h) in [(1536, 576, &h576), (576, 1536, &h1536)] {
                let ww = w(n, k);
                let t = Instant::now();
                let b = gptq(&ww, n, k, h, f, &opts).unwrap();
                let dt = t.elapsed();
                let deq = Format::Int(f).dequantize(&b, (n * k) as u64).unwrap();
                let rtn = Format::Int(f).dequantize(&f.quantize(&ww), (n * k) as u64).unwrap();
                eprintln!(
                    "act {act} {n}x{k}: {:?}  gptq/rtn {:.3}",
                    dt,
                    output_error(&ww, &deq, n, k, h) / output_error(&ww, &rtn, n, k, h)
                );
            }
        }
        let t = Instant::now();
        let _ = factor(
            &h1536,
            1536,
            &(0..1536).map(|i| h1536[i * 1537]).collect::<Vec<_>>(),
            &(0..1536).collect::<Vec<_>>(),
            0.01,
        )
        .unwrap();
        eprintln!("factor 1536: {:?}", t.elapsed());
        let opts = GptqOptions::default();
        if std::env::var("FULL").is_err() {
            return;
        }
        let c0 = cpu();
        let t = Instant::now();
        let shapes = [
            (576, 576, &h576),
            (192, 576, &h576),
            (192, 576, &h576),
            (576, 576, &h576),
            (1536, 576, &h576),
            (1536, 576, &h576),
            (576, 1536, &h1536),
        ];
        let ws: Vec<Vec<f32>> = shapes.iter().map(|&(n, k, _)| w(n, k)).collect();
        for _layer in 0..30 {
            for (&(n, k, h), ww) in shapes.iter().zip(&ws) {
                gptq(ww, n, k, h, f, &opts).unwrap();
            }
        }
        eprintln!("30 layers: {:?} cpu {:.2}s", t.elapsed(), cpu() - c0);
        let head = w(49152, 576);
        let t = Instant::now();
        gptq(&head, 49152, 576, &h576, f, &opts).unwrap();
        eprintln!("head: {:?}", t.elapsed());
        let t = Instant::now();
        let _ = output_error(&head, &head, 49152, 576, &h576);
        eprintln!("head output_error: {:?}", t.elapsed());
    }
}
