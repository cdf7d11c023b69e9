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
//!    weight column set to 0: nothing observed depends on them, and 0 keeps them harmless
//!    (as in the reference implementation).
//! 2. Damping: `damp * mean(diag H)` is added to the diagonal, which bounds the condition
//!    number and keeps the rank-deficient `H` of a small calibration set invertible. If the
//!    Cholesky factorization still fails, the damping is raised tenfold (to at least 1%),
//!    twice, before giving up with [`GptqError::NotPositiveDefinite`].
//! 3. The paper sweeps the columns in order with `U`, the upper Cholesky factor of `H^-1`
//!    (`H^-1 = U^T U`): after rounding column `i` of a row to `q_i`, it subtracts the scaled
//!    error `e_i = (w_i - q_i) / U_ii`, times row `i` of `U`, from the columns not yet
//!    quantized, which is the optimal (OBS) correction of the remaining weights given the
//!    quantized ones. This module runs the same sweep with `M = U^-1` instead: upper
//!    triangular with `H = M M^T`, i.e. the Cholesky factor of `H` taken in reversed order
//!    (`J H J = L L^T`, `M = J L J`, `J` the reversal). That is one f64 Cholesky (`k^3 / 3`
//!    multiply-adds) where the paper factors, inverts and factors again (`k^3`).
//!    Since `w0 - q = U^T e`, `e = M^T d` with `d = w0 - q`: keeping the pending corrections
//!    `a_i = sum_{j<i} M_ji d_j`, column `i` holds `w0_i + a_i / M_ii` when its turn comes
//!    (the paper's updated weight), and `e_i = M_ii (w_i - q_i)`. The layer's output error
//!    is `(w0 - q)^T H (w0 - q) = |M^T d|^2 = sum e_i^2` under the damped `H`, exactly; the
//!    tests check the bytes against it.
//! 4. Lazy batches: columns are taken in blocks of `block` (128). Column `i`'s correction
//!    `d_i M[i, ..]` is applied at once only within its segment (32 aligned columns of the
//!    block); the rest of the block gets each segment's corrections as one matrix product,
//!    and the columns after the block get the block's as one product,
//!    `A[:, after] += D M[block, after]`. Nearly all the arithmetic runs at matrix-multiply
//!    speed.
//!
//! Rows are independent given `H`, so the sweep runs over chunks of rows in parallel
//! (rayon), each chunk with its own sequential faer products, in f32 like the reference
//! implementation; the factorization of `H` is f64.
//!
//! # Groups and act-order
//!
//! Without act-order, a group's scales are fitted ([`IntFormat::fit`], round-to-nearest's
//! choice) when the sweep reaches the group's first column, from the current weights: the
//! values the paper's sweep holds there, with the errors of the earlier columns already
//! spread onto the group. In terms of `M` these are `w0[G] + y` with `M[G, G]^T y = a[G]`
//! (the optimum of the remaining weights given the quantized ones is
//! `w0[R] + M[R, R]^-T a[R]`, and that triangular solve restricted to the group's first
//! columns only needs `M[G, G]`): one small triangular solve per group, for all the rows of
//! a chunk at once. It needs every correction from before the group to have landed, so the
//! block size is adjusted to make every group start a block or lie within one. (The
//! reference implementation fits from a copy that misses the current block's updates.)
//!
//! With act-order, columns are processed by decreasing `H_ii`: the inputs with the most
//! energy are rounded first, while the most other columns remain to absorb their error.
//! The groups are still runs of consecutive columns in the natural order, as the stored
//! layout demands, but the sweep reaches their columns scattered; so the scales are
//! static: fitted for every group up front, from the original weights.
//!
//! # Cost
//!
//! `k^3 / 3` multiply-adds (f64, sequential) to factor `H`, then `n k^2 / 2` (f32,
//! parallel over rows) for the sweep, plus `n k g / 2` for the group solves without
//! act-order; memory `O(k^2 + n k)`. The sweep keeps a chunk of rows column major, so that
//! each column's step (code, value, correction) is vector work across the rows; the scale
//! search of `clip` costs about as much again. Measured on one thread of the 2-core
//! development machine (`cargo run --release -p kiln-passes --example gptq_timing`, a
//! noisy machine): a `1536 x 576` layer in 33 ms (64 ms with `clip`), `288 x 1536` in
//! 26 ms (41 ms); factoring a `1536`-wide `H` takes 80-100 ms.
//!
//! [`output_error`] costs `n k^2` multiply-adds in f64: as much as the sweep, twice over.

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::cholesky::llt::factor::{cholesky_in_place, cholesky_in_place_scratch};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
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
    /// Fit each group's scales by [`super::clip::fit`]'s search, weighting columns by
    /// `H_ii`, instead of round-to-nearest's range (false).
    pub clip: bool,
}

impl Default for GptqOptions {
    fn default() -> Self {
        GptqOptions { damp: 0.01, block: 128, act_order: false, clip: false }
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

/// [`output_error`] of `q` relative to the output's energy (`output_error` of zeros), from
/// one f32 product `[w - q; w] H` instead of two in f64: for reports, where f32's rounding
/// is far below the differences that are read. Sequential (callers run layers in
/// parallel); 0 when the outputs have no energy.
///
/// # Panics
///
/// If the slices do not have `n * k`, `n * k` and `k * k` elements.
pub fn relative_output_error(w: &[f32], q: &[f32], n: usize, k: usize, h: &[f64]) -> f64 {
    assert_eq!(w.len(), n * k, "relative_output_error: w is not {n} x {k}");
    assert_eq!(q.len(), n * k, "relative_output_error: q is not {n} x {k}");
    assert_eq!(h.len(), k * k, "relative_output_error: h is not {k} x {k}");
    if n == 0 || k == 0 {
        return 0.0;
    }
    let stacked: Vec<f32> = w.iter().zip(q).map(|(&a, &b)| a - b).chain(w.iter().copied()).collect();
    let h32: Vec<f32> = h.iter().map(|&x| x as f32).collect();
    let mut product = Mat::<f32>::zeros(2 * n, k);
    let (x, hm) = (MatRef::from_row_major_slice(&stacked, 2 * n, k), MatRef::from_row_major_slice(&h32, k, k));
    matmul(product.as_mut(), Accum::Replace, x, hm, 1.0, Par::Seq);
    clear_upper_ymm();
    let form = |rows: std::ops::Range<usize>| -> f64 {
        rows.map(|r| (0..k).map(|c| product[(r, c)] as f64 * stacked[r * k + c] as f64).sum::<f64>()).sum()
    };
    let (error, energy) = (form(0..n), form(n..2 * n));
    if energy > 0.0 { error / energy } else { 0.0 }
}

/// What one GPTQ run produced (all but the bytes is for the tests to check).
#[cfg_attr(not(test), allow(dead_code))]
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
    Factored::new(h, k, opts)?.run(w, n, format, keep_values)
}

/// The part of GPTQ that depends on `H` and the options only: the factor of the damped,
/// permuted `H`. One factorization serves every format (and every subset of rows) of a
/// layer, which is how the quantize pass measures candidate formats cheaply.
pub struct Factored {
    k: usize,
    opts: GptqOptions,
    dead: Vec<bool>,
    perm: Vec<usize>,
    m: Vec<f32>,
    damp: f64,
    importance: Vec<f32>,
}

impl Factored {
    /// Factors `h` (`[k, k]` row-major, the sum of `x x^T`) for the sweeps of `opts`.
    pub fn new(h: &[f64], k: usize, opts: &GptqOptions) -> Result<Factored, GptqError> {
        if h.len() != k * k {
            return Err(GptqError::HessianShape { k, found: h.len() });
        }
        if opts.block == 0 {
            return Err(GptqError::Options("the block size must be positive"));
        }
        if !(opts.damp.is_finite() && opts.damp >= 0.0) {
            return Err(GptqError::Options("the damping must be finite and non-negative"));
        }
        if !h.iter().all(|x| x.is_finite()) {
            return Err(GptqError::NonFinite("Hessian"));
        }
        let dead: Vec<bool> = (0..k).map(|i| h[i * k + i] == 0.0).collect();
        let diag: Vec<f64> = (0..k).map(|i| if dead[i] { 1.0 } else { h[i * k + i] }).collect();
        // perm[i]: the natural column processed i-th.
        let mut perm: Vec<usize> = (0..k).collect();
        if opts.act_order {
            perm.sort_by(|&a, &b| diag[b].total_cmp(&diag[a]));
        }
        let (m, damp) = if k == 0 { (Vec::new(), 0.0) } else { factor(h, k, &diag, &perm, opts.damp)? };
        let importance: Vec<f32> = if opts.clip { (0..k).map(|i| h[i * k + i] as f32).collect() } else { Vec::new() };
        Ok(Factored { k, opts: opts.clone(), dead, perm, m, damp, importance })
    }

    /// `M`, row-major `[k, k]` f32, upper triangular: `M M^T` is the damped `H` (columns in
    /// processing order, natural without act-order), and `1 / M_ii` the diagonal of the upper
    /// Cholesky factor of `H^-1` (see the module documentation). SparseGPT sweeps with it.
    pub(crate) fn factor(&self) -> &[f32] {
        &self.m
    }

    /// Inputs never active in calibration (`H_ii == 0`), in natural order.
    pub(crate) fn dead(&self) -> &[bool] {
        &self.dead
    }

    /// GPTQ of `w` (`[n, k]` row-major) to `format`: the stored bytes, and the output error
    /// `trace((W - Q) H (W - Q)^T)` under the damped `H`, as the sweep tracked it.
    pub fn quantize(&self, w: &[f32], n: usize, format: IntFormat) -> Result<(Vec<u8>, f64), GptqError> {
        self.run(w, n, format, false).map(|r| (r.bytes, r.loss))
    }

    fn run(&self, w: &[f32], n: usize, format: IntFormat, keep_values: bool) -> Result<Run, GptqError> {
        let (k, opts) = (self.k, &self.opts);
        let f = IntFormat::new(format.bits, format.group, format.asym)?;
        let g = f.group as usize;
        if w.len() != n * k {
            return Err(GptqError::WeightShape { n, k, found: w.len() });
        }
        if !k.is_multiple_of(g) {
            return Err(GptqError::Group { format: f, k });
        }
        if !w.iter().all(|x| x.is_finite()) {
            return Err(GptqError::NonFinite("weight"));
        }
        if n == 0 || k == 0 {
            return Ok(Run { bytes: Vec::new(), loss: 0.0, damp: 0.0, values: keep_values.then(Vec::new) });
        }
        // Every group must start a block unless scales are static (see the module doc).
        let block = if opts.act_order || opts.block.is_multiple_of(g) || g.is_multiple_of(opts.block) {
            opts.block
        } else {
            (opts.block / g).max(1) * g
        }
        .min(k);
        let group_of: Vec<u32> = self.perm.iter().map(|&c| (c / g) as u32).collect();
        let sweep = Sweep {
            f,
            k,
            block,
            act_order: opts.act_order,
            dead: &self.dead,
            perm: &self.perm,
            group_of: &group_of,
            m: &self.m,
            importance: &self.importance,
        };
        // Chunks of rows: a few per thread to balance the load, big enough for the products.
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
        Ok(Run { bytes, loss, damp: self.damp, values })
    }
}

/// `M` (row-major f32, `[k, k]`, upper triangular) with `M M^T = P^T H P + damp I`, dead
/// diagonal entries replaced by `diag`, `P` the permutation `perm`; and the absolute
/// damping used. Retries with more damping when the factorization fails.
fn factor(h: &[f64], k: usize, diag: &[f64], perm: &[usize], damp: f64) -> Result<(Vec<f32>, f64), GptqError> {
    // Sequential: on the 2-core development machine faer's parallel Cholesky was slower
    // whenever the other core had work, and the sweep that follows is parallel anyway.
    let par = Par::Seq;
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
pub(crate) fn clear_upper_ymm() {
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
    /// The group of the column processed i-th (`perm[i] / group`).
    group_of: &'a [u32],
    /// The factor `M` of the damped, permuted `H` (see the module doc).
    m: &'a [f32],
    /// `H_ii` in natural order when scales are searched ([`GptqOptions::clip`]); empty
    /// for round-to-nearest's scales.
    importance: &'a [f32],
}

/// The result of a chunk of rows.
struct Part {
    bytes: Vec<u8>,
    loss: f64,
    values: Option<Vec<f32>>,
}

/// Columns per segment of a block: rank-1 updates stay within one (see [`Sweep::rows`]).
const SEGMENT: usize = 32;

impl Sweep<'_> {
    /// `acc[:, to] += D[:, from] M[from, to]` as one product, for `acc` column-major
    /// (`[rows, k]`, column `i` at `i * rows`) and `delta` holding `D[:, from]` the same
    /// way. Every operand but `M` is column major: faer 0.24's x86 kernels mishandle a
    /// row-major destination (wrong sums and heap corruption).
    fn correct(&self, acc: &mut [f32], rows: usize, from: (usize, usize), to: (usize, usize), delta: &[f32]) {
        let (k, (f1, f2), (t1, t2)) = (self.k, from, to);
        if t1 == t2 {
            return;
        }
        let dst = MatMut::from_column_major_slice_with_stride_mut(&mut acc[t1 * rows..], rows, t2 - t1, rows);
        let d = MatRef::from_column_major_slice_with_stride(delta, rows, f2 - f1, rows);
        let mm = MatRef::from_row_major_slice_with_stride(&self.m[f1 * k + t1..], f2 - f1, t2 - t1, k);
        matmul(dst, Accum::Add, d, mm, 1.0f32, Par::Seq);
        clear_upper_ymm();
    }

    /// The scales of one group, whose first column is `start` (natural order).
    fn fit(&self, group: &[f32], start: usize) -> BlockScales {
        if self.importance.is_empty() {
            self.f.fit(group)
        } else {
            super::clip::fit(self.f, group, &self.importance[start..start + group.len()])
        }
    }

    /// Quantizes the rows `w` (natural order), returning their stored bytes.
    fn rows(&self, w: &[f32], keep_values: bool) -> Part {
        // This thread may have run faer's kernels for another call (see the function).
        clear_upper_ymm();
        let (f, k, g, m) = (self.f, self.k, self.f.group as usize, self.m);
        let rows = w.len() / k;
        let groups = k / g;
        // Column major, columns in processing order (`(r, i)` at `i * rows + r`): each step
        // of the sweep is one column of every row, so it runs as vector work over the rows
        // (a row's columns are a chain of dependent steps). `orig`: the rows, dead columns
        // zeroed, overwritten by the quantized values as the sweep goes. `acc`: M^T d, the
        // pending corrections.
        let mut orig = vec![0f32; k * rows];
        let mut acc = vec![0f32; k * rows];
        let mut scales = vec![BlockScales { d: Default::default(), m: Default::default() }; rows * groups];
        // The scales widened to f32, by group then row: a column's are contiguous.
        let mut wide = vec![(0f32, 0f32); groups * rows];
        let mut natural = vec![0f32; k];
        for r in 0..rows {
            for (c, x) in natural.iter_mut().enumerate() {
                *x = if self.dead[c] { 0.0 } else { w[r * k + c] };
            }
            for (i, &c) in self.perm.iter().enumerate() {
                orig[i * rows + r] = natural[c];
            }
            if self.act_order {
                for (j, group) in natural.chunks_exact(g).enumerate() {
                    let s = self.fit(group, j * g);
                    scales[r * groups + j] = s;
                    wide[j * rows + r] = (s.d.to_f32(), s.m.to_f32());
                }
            }
        }

        let mut codes = vec![0u8; rows * k];
        let mut delta = vec![0f32; self.block * rows];
        // The current weights of a group, rows by `g`.
        let mut current = vec![0f32; rows * g];
        let (mut q, mut e) = (vec![0u8; rows], vec![0f32; rows]);
        let mut loss = 0.0f64;
        for i1 in (0..k).step_by(self.block) {
            let i2 = (i1 + self.block).min(k);
            // The block in segments of up to SEGMENT columns (aligned, so groups start
            // segments): rank-1 updates within a segment, products for the rest.
            let mut s1 = i1;
            while s1 < i2 {
                let s2 = ((s1 / SEGMENT + 1) * SEGMENT).min(i2);
                if !self.act_order && s1.is_multiple_of(g) {
                    // The group is columns s1..s1 + g; all the corrections from before it
                    // are in `acc` (the block rule): the current weights are
                    // orig + y with M[G, G]^T y = acc[G], solved for every row at once.
                    for t in 0..g {
                        for r in 0..rows {
                            current[r * g + t] = acc[(s1 + t) * rows + r];
                        }
                    }
                    let mt = MatRef::from_column_major_slice_with_stride(&m[s1 * k + s1..], g, g, k);
                    solve_lower_triangular_in_place(
                        mt,
                        MatMut::from_column_major_slice_mut(&mut current, g, rows),
                        Par::Seq,
                    );
                    clear_upper_ymm();
                    let j = s1 / g;
                    for r in 0..rows {
                        let y = &mut current[r * g..(r + 1) * g];
                        for (t, y) in y.iter_mut().enumerate() {
                            *y += orig[(s1 + t) * rows + r];
                        }
                        let s = self.fit(y, s1);
                        scales[r * groups + j] = s;
                        wide[j * rows + r] = (s.d.to_f32(), s.m.to_f32());
                    }
                }
                for i in s1..s2 {
                    let mrow = &m[i * k..(i + 1) * k];
                    let j = self.group_of[i] as usize;
                    let (done, later) = acc[i * rows..s2 * rows].split_at_mut(rows);
                    let d = &mut delta[(i - i1) * rows..(i - i1 + 1) * rows];
                    let column = &mut orig[i * rows..(i + 1) * rows];
                    step(f, mrow[i], &wide[j * rows..(j + 1) * rows], column, done, d, &mut q, &mut e);
                    // Summed in row order, in f64, as the error is tracked.
                    for &e in &e {
                        loss += e as f64 * e as f64;
                    }
                    let c = self.perm[i];
                    for (r, &q) in q.iter().enumerate() {
                        codes[r * k + c] = q;
                    }
                    // The rest of the segment: acc[:, t] += M[i, t] d.
                    for (a, &mit) in later.chunks_exact_mut(rows).zip(&mrow[i + 1..s2]) {
                        for (a, &d) in a.iter_mut().zip(d.iter()) {
                            *a += mit * d;
                        }
                    }
                }
                // acc[:, s2..i2] += D[:, segment] M[segment, s2..i2]
                self.correct(&mut acc, rows, (s1, s2), (s2, i2), &delta[(s1 - i1) * rows..]);
                s1 = s2;
            }
            // acc[:, i2..] += D M[i1..i2, i2..]
            self.correct(&mut acc, rows, (i1, i2), (i2, k), &delta);
        }

        let mut bytes = Vec::with_capacity(rows * groups * f.block_bytes());
        for (s, c) in scales.iter().zip(codes.chunks_exact(g)) {
            f.pack_block(*s, c, &mut bytes);
        }
        let values = keep_values.then(|| {
            let mut v = vec![0f32; rows * k];
            for r in 0..rows {
                for (i, &c) in self.perm.iter().enumerate() {
                    v[r * k + c] = orig[i * rows + r];
                }
            }
            v
        });
        Part { bytes, loss, values }
    }
}

/// One column of the sweep for every row: the weight with its pending correction,
/// `x = orig + acc / M_ii`, gets the code nearest under its row's scales
/// ([`IntFormat::code`]'s choice, exactly), whose value `v` replaces it; `d = orig - v`
/// (the correction the later columns take) and `e = M_ii (x - v)` (the error) come out.
/// Plain loops over the rows, which the compiler vectorizes.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn step(
    f: IntFormat,
    mii: f32,
    wide: &[(f32, f32)],
    orig: &mut [f32],
    acc: &[f32],
    d: &mut [f32],
    q: &mut [u8],
    e: &mut [f32],
) {
    let (zero, top) = (f.zero_code(), f.max_code() as f32);
    let n = orig.len();
    let (wide, acc, d, q, e) = (&wide[..n], &acc[..n], &mut d[..n], &mut q[..n], &mut e[..n]);
    for r in 0..n {
        let (scale, offset) = wide[r];
        let x = orig[r] + acc[r] / mii;
        // IntFormat::code_in and IntFormat::value, without branches.
        let t = if f.asym { (x - offset) / scale } else { x / scale + zero as f32 };
        let t = t.max(0.0).min(top);
        let whole = t as u8;
        let code = whole + (t - whole as f32 >= 0.5) as u8;
        let code = if scale == 0.0 || !scale.is_finite() { zero } else { code };
        let v = if f.asym { scale * code as f32 + offset } else { scale * (code as i32 - zero as i32) as f32 };
        q[r] = code;
        e[r] = mii * (x - v);
        d[r] = orig[r] - v;
        orig[r] = v;
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
    fn relative_output_error_is_the_f64_ratio() {
        let mut rng = Rng(7);
        let (n, k) = (5, 48);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        let q: Vec<f32> = w.iter().enumerate().map(|(i, x)| x + if i % 3 == 0 { 0.01 } else { -0.004 }).collect();
        let want = output_error(&w, &q, n, k, &h) / output_error(&w, &vec![0.0; n * k], n, k, &h);
        let got = relative_output_error(&w, &q, n, k, &h);
        assert!((got / want - 1.0).abs() < 1e-4, "{got} vs {want}");
        assert_eq!(relative_output_error(&w, &w, n, k, &h), 0.0);
        assert_eq!(relative_output_error(&vec![0.0; n * k], &q, n, k, &h), 0.0);
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

    // Observed gptq/rtn with act-order: int4g32a 0.013, int4g64 0.013, int3g32a 0.014; the
    // worst column is 0.50 away from the original (int3g32a).
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
    /// One factorization serves every format and every subset of rows: the same bytes as a
    /// fresh `gptq` call, and a tracked loss equal to the output error under the damped `H`.
    #[test]
    fn a_factorization_is_reused_across_formats_and_rows() {
        let mut rng = Rng(11);
        let (n, k) = (24, 128);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        for opts in [GptqOptions::default(), GptqOptions { act_order: true, clip: true, ..Default::default() }] {
            let factored = Factored::new(&h, k, &opts).unwrap();
            for f in [int("int3g32a"), int("int4g64"), int("int8g128")] {
                let (bytes, loss) = factored.quantize(&w, n, f).unwrap();
                assert_eq!(bytes, gptq(&w, n, k, &h, f, &opts).unwrap(), "{f} {opts:?}");
                let (rows, _) = factored.quantize(&w[..8 * k], 8, f).unwrap();
                assert_eq!(rows[..], bytes[..rows.len()], "the first 8 rows alone, {f}");
                let mut damped = h.clone();
                let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
                for i in 0..k {
                    damped[i * k + i] += opts.damp * mean;
                }
                let exact = output_error(&w, &decode(f, &bytes, n, k), n, k, &damped);
                assert!((loss - exact).abs() <= 1e-3 * exact, "{f}: tracked {loss} vs {exact}");
            }
        }
    }

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
            let blocks = [
                GptqOptions::default(),
                act_order(),
                GptqOptions { block: 48, ..Default::default() },
                GptqOptions { block: 48, act_order: true, ..Default::default() },
            ];
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
                    assert!((run.loss - e).abs() < 1e-5 * e, "{name} {opts:?}: tracked {} vs {e}", run.loss);
                }
            }
        }
    }

    /// Textbook GPTQ in f64, one column at a time with `U` from the explicit inverse (no
    /// dead inputs): the paper's algorithm, for the fast one to agree with.
    fn reference(w: &[f32], k: usize, h: &[f64], f: IntFormat, act_order: bool) -> Vec<u8> {
        let cholesky = |a: &[f64]| {
            let mut l = vec![0.0; k * k];
            for i in 0..k {
                for j in 0..=i {
                    let s: f64 = a[i * k + j] - (0..j).map(|t| l[i * k + t] * l[j * k + t]).sum::<f64>();
                    l[i * k + j] = if i == j { s.sqrt() } else { s / l[j * k + j] };
                }
            }
            l
        };
        let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let mut perm: Vec<usize> = (0..k).collect();
        if act_order {
            perm.sort_by(|&a, &b| h[b * k + b].total_cmp(&h[a * k + a]));
        }
        let mut hp: Vec<f64> = (0..k * k).map(|t| h[perm[t / k] * k + perm[t % k]]).collect();
        for i in 0..k {
            hp[i * k + i] += 0.01 * mean;
        }
        // H^-1 column by column from H = L L^T, then U^T = its lower Cholesky factor.
        let l = cholesky(&hp);
        let mut inv = vec![0.0; k * k];
        for c in 0..k {
            let mut y = vec![0.0; k];
            for i in 0..k {
                let s: f64 = (0..i).map(|t| l[i * k + t] * y[t]).sum();
                y[i] = (if i == c { 1.0 } else { 0.0 } - s) / l[i * k + i];
            }
            for i in (0..k).rev() {
                let s: f64 = (i + 1..k).map(|t| l[t * k + i] * inv[t * k + c]).sum();
                inv[i * k + c] = (y[i] - s) / l[i * k + i];
            }
        }
        let ut = cholesky(&inv);
        let g = f.group as usize;
        let mut out = Vec::new();
        for row in w.chunks_exact(k) {
            let mut x: Vec<f64> = perm.iter().map(|&c| row[c] as f64).collect();
            let mut scales: Vec<BlockScales> = row.chunks_exact(g).map(|group| f.fit(group)).collect();
            let mut codes = vec![0u8; k];
            for i in 0..k {
                if !act_order && i % g == 0 {
                    scales[i / g] = f.fit(&x[i..i + g].iter().map(|&v| v as f32).collect::<Vec<_>>());
                }
                let s = scales[perm[i] / g];
                let q = f.code(s, x[i] as f32);
                codes[perm[i]] = q;
                let e = (x[i] - f.value(s, q) as f64) / ut[i * k + i];
                for j in i + 1..k {
                    x[j] -= e * ut[j * k + i];
                }
            }
            for (s, c) in scales.iter().zip(codes.chunks_exact(g)) {
                f.pack_block(*s, c, &mut out);
            }
        }
        out
    }

    // Observed: no block differs. f32 against f64 could flip a code now and then (and the
    // row's later choices would follow it), hence the slack.
    #[test]
    fn agrees_with_the_textbook_algorithm() {
        let mut rng = Rng(8);
        let (n, k) = (24, 256);
        let h = correlated_h(&mut rng, k);
        let w = weights(&mut rng, n, k);
        for name in ["int4g64a", "int3g32a", "int4g256"] {
            let f = int(name);
            for act_order in [false, true] {
                let opts = GptqOptions { act_order, ..Default::default() };
                let ours = gptq(&w, n, k, &h, f, &opts).unwrap();
                let theirs = reference(&w, k, &h, f, act_order);
                assert_eq!(ours.len(), theirs.len());
                let blocks = ours.len() / f.block_bytes();
                let differ =
                    ours.chunks(f.block_bytes()).zip(theirs.chunks(f.block_bytes())).filter(|(a, b)| a != b).count();
                assert!(differ * 50 <= blocks, "{name} act-order {act_order}: {differ} of {blocks} blocks differ");
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
