//! Numeric kernels of the reference interpreter.
//!
//! Every kernel is a pure function: it borrows its inputs and returns a fresh, contiguous,
//! row-major [`Tensor`]. Shapes are validated by the caller; the kernels only `debug_assert`
//! their preconditions. In release builds a violated precondition never causes undefined
//! behaviour (all indexing is bounds-checked, and the only `unsafe` — the `sgemm` call — is
//! guarded by real bounds assertions), but it may panic or produce garbage.
//!
//! Numerics, in one place:
//! * Matrix products (`linear`, `matmul`, `attention`) use `matrixmultiply::sgemm` (f32
//!   accumulation, blocked; FMA/AVX kernels selected at run time), like any BLAS.
//! * Reductions whose result is a single number per row (`layer_norm`, `rms_norm`, the
//!   softmax denominators, `reduce` Sum/Mean) accumulate in f64.
//! * Transcendentals are evaluated in f32 with the platform libm (`exp`, `ln`, `tanh`),
//!   except `gelu`/`erf`, `rsqrt`, and the rope angles, which are evaluated in f64 and rounded
//!   once to f32.
//! * NaN propagates like in PyTorch: `Max`/`Min` (binary and reduce) return NaN if either
//!   operand is NaN, `relu(NaN) = NaN`.
//!
//! Parallelism (through [`crate::par`]: rayon, or the JIT engine's pool): `attention` runs
//! (batch, head) pairs in parallel; batched `matmul`s run batches in parallel, and large
//! single products (`linear`, `matmul`) split their rows, each part one sgemm; the
//! compute-heavy elementwise / row kernels (exp, tanh, sigmoid, silu, gelu, log, softmax,
//! layer/rms norm) go parallel above [`PAR_MIN_ELEMS`] elements. Cheap elementwise kernels
//! (add, mul, ...) and data movement are memory bound and stay sequential.

use crate::par::{for_each_chunk, for_each_chunk_init};
use crate::tensor::{Tensor, contiguous_strides, numel_of};
pub use kiln_ir::{BinaryOp, ReduceOp, UnaryOp};
use kiln_ir::{Format, IntFormat};

/// Errors a kernel can report at run time (everything else is a caller-validated
/// precondition).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum KernelError {
    /// `gather` got a token id outside `0..n`.
    #[error("id {id} is out of range for a table with {n} rows")]
    IdOutOfRange { id: i64, n: usize },
}

/// Elementwise kernels that are compute bound (transcendentals) and the row-wise kernels are
/// split across rayon threads when the tensor has at least this many elements.
pub const PAR_MIN_ELEMS: usize = 1 << 15;

/// Multiply-adds from which one product splits its rows across threads.
const GEMM_PARALLEL: usize = 1 << 18;

// ---------------------------------------------------------------------------------------------
// sgemm wrapper
// ---------------------------------------------------------------------------------------------

/// Largest element offset touched by a `rows x cols` matrix with strides `(rs, cs)`.
#[inline]
fn last_offset(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    (rows - 1) * rs + (cols - 1) * cs
}

/// `C = alpha * A B + beta * C` where `A(i, p) = a[i*rsa + p*csa]` (m x k),
/// `B(p, j) = b[p*rsb + j*csb]` (k x n), `C(i, j) = c[i*rsc + j*csc]` (m x n).
/// With `beta == 0` the previous contents of C are ignored (not even NaNs survive).
///
/// Safe wrapper around `matrixmultiply::sgemm`: the slices are checked to cover every
/// addressed element (and `&mut c` cannot alias `a` or `b`).
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: &[f32],
    rsa: usize,
    csa: usize,
    b: &[f32],
    rsb: usize,
    csb: usize,
    beta: f32,
    c: &mut [f32],
    rsc: usize,
    csc: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(last_offset(m, n, rsc, csc) < c.len(), "gemm: C out of bounds");
    // The output strides must not make distinct (i, j) alias each other.
    debug_assert!((m == 1 || rsc != 0) && (n == 1 || csc != 0), "gemm: aliasing C strides");
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let o = &mut c[i * rsc + j * csc];
                *o = if beta == 0.0 { 0.0 } else { beta * *o };
            }
        }
        return;
    }
    assert!(last_offset(m, k, rsa, csa) < a.len(), "gemm: A out of bounds");
    assert!(last_offset(k, n, rsb, csb) < b.len(), "gemm: B out of bounds");
    // SAFETY: the asserts above guarantee every element of A, B and C addressed through the
    // given dimensions and strides lies inside the respective slice; `c` is a unique borrow so
    // it does not alias `a`/`b`; C's strides do not alias distinct elements (checked above,
    // and all call sites use row-major C with rsc >= n, csc == 1).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            rsc as isize,
            csc as isize,
        );
    }
}

/// Dot product with 16 independent f32 accumulators (so it vectorizes).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    const L: usize = 16;
    let mut acc = [0f32; L];
    let ca = a.chunks_exact(L);
    let cb = b.chunks_exact(L);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = 0f32;
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    // pairwise fold of the lanes
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + s
}

// ---------------------------------------------------------------------------------------------
// linear / matmul
// ---------------------------------------------------------------------------------------------

/// Fully connected layer: `y = x W^T + b`.
///
/// * `x`: `[..., in]` (rank >= 1), `w`: `[out, in]` (PyTorch layout), `b`: `[out]`.
/// * Returns `[..., out]` with `y[r, j] = sum_p x[r, p] * w[j, p] + b[j]`.
///
/// Uses sgemm reading `w` through strides (no transposed copy). A single row (`m == 1`, i.e.
/// decode) uses a parallel dot-product GEMV instead, which reads `w` once.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Tensor {
    debug_assert!(x.rank() >= 1, "linear: x must have rank >= 1");
    debug_assert_eq!(w.rank(), 2, "linear: w must be [out, in]");
    let (n, k) = (w.shape[0], w.shape[1]);
    debug_assert_eq!(x.shape[x.rank() - 1], k, "linear: x last dim != w in-dim");
    if let Some(b) = b {
        debug_assert_eq!(b.shape, [n], "linear: bias must be [out]");
    }
    let lead = &x.shape[..x.rank() - 1];
    let m = numel_of(lead);
    let mut shape = lead.to_vec();
    shape.push(n);

    if m == 1 && k > 0 {
        let mut y = vec![0f32; n];
        let row = &x.data[..k];
        let fill = |j0: usize, out: &mut [f32]| {
            for (jj, o) in out.iter_mut().enumerate() {
                let j = j0 + jj;
                *o = dot(row, &w.data[j * k..(j + 1) * k]) + b.map_or(0.0, |b| b.data[j]);
            }
        };
        if n * k >= 1 << 18 {
            const CH: usize = 64;
            for_each_chunk(&mut y, CH, |c, out| fill(c * CH, out));
        } else {
            fill(0, &mut y);
        }
        return Tensor::new(shape, y);
    }

    let (mut y, beta) = match b {
        Some(b) => {
            let mut y = Vec::with_capacity(m * n);
            for _ in 0..m {
                y.extend_from_slice(&b.data);
            }
            (y, 1.0)
        }
        None => (vec![0f32; m * n], 0.0),
    };
    // A = x as [m, k] row-major; B = W^T: B(p, j) = w[j*k + p].
    gemm_rows(m, k, n, &x.data, &w.data, (1, k), beta, &mut y);
    Tensor::new(shape, y)
}

/// `c = a b + beta c` for row-major `a` (`[m, k]`) and `c` (`[m, n]`) and `b` (`[k, n]`)
/// with row and column strides `(rsb, csb)`, its rows split across threads (one sgemm per
/// part) when the product is large. sgemm sums every output in an order that depends on
/// `k` only, so the split never changes a bit.
#[allow(clippy::too_many_arguments)]
fn gemm_rows(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], (rsb, csb): (usize, usize), beta: f32, c: &mut [f32]) {
    let parts = if m * n * k >= GEMM_PARALLEL { crate::par::threads().min(m) } else { 1 };
    if parts <= 1 || n == 0 {
        gemm(m, k, n, 1.0, a, k, 1, b, rsb, csb, beta, c, n, 1);
        return;
    }
    let rows = m.div_ceil(parts);
    for_each_chunk(c, rows * n, |i, part| {
        let r0 = i * rows;
        let len = part.len() / n;
        gemm(len, k, n, 1.0, &a[r0 * k..(r0 + len) * k], k, 1, b, rsb, csb, beta, part, n, 1);
    });
}

/// `y = x W^T (+ b)` over rows of `x` (`[m, k]` row-major, `w` `[n, k]`, `y` `[m, n]`), always
/// with sgemm. Each output is summed in an order that depends only on `k` (sgemm's blocking
/// along `k`), never on `m`, so calls over any split of the rows give the same bits; that
/// is what executors that split rows across threads need (unlike [`linear`], which takes
/// a GEMV path for a single row).
pub fn linear_rows(x: &[f32], k: usize, w: &[f32], n: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    let m = x.len().checked_div(k).unwrap_or(y.len() / n.max(1));
    debug_assert!(x.len() == m * k && w.len() == n * k && y.len() == m * n, "linear_rows: shapes");
    let beta = match bias {
        Some(b) => {
            for row in y.chunks_exact_mut(n.max(1)) {
                row.copy_from_slice(b);
            }
            1.0
        }
        None => 0.0,
    };
    if m > 0 && n > 0 {
        gemm_rows(m, k, n, x, w, (1, k), beta, y);
    }
}

/// `c = a^T b` (`k x k`, row-major) for two row-major `[m, k]` matrices whose rows pair up:
/// `sum over rows r of a_r b_r^T`, the cross moment of two views of the same tokens. Rows of
/// `c` are split across threads; each output sums in an order that depends on `m` only.
pub fn cross_gram(a: &[f32], b: &[f32], k: usize, c: &mut [f32]) {
    assert_eq!(c.len(), k * k, "cross_gram: the output is not {k} x {k}");
    let m = a.len().checked_div(k).unwrap_or(0);
    assert_eq!((a.len(), b.len()), (m * k, m * k), "cross_gram: a and b are not the same rows of {k}");
    if m == 0 {
        c.fill(0.0);
        return;
    }
    let rows = k.div_ceil(crate::par::threads().max(1) * 4).max(1);
    for_each_chunk(c, rows * k, |i, part| {
        let r0 = i * rows;
        let len = part.len() / k;
        // Rows r0.. of a^T (columns r0.. of a: strides 1 and k) times b.
        gemm(len, m, k, 1.0, &a[r0..], 1, k, b, k, 1, 0.0, part, k, 1);
    });
}

/// `g = x^T x` for row-major `x` (`[m, k]`) into row-major `g` (`[k, k]`): the part on and
/// below the diagonal by sgemm, in bands of rows of equal work spread across threads, the
/// rest mirrored; a little over half the multiply-adds of the full product. Every entry
/// is summed in an order that depends on `m` only.
pub fn gram(x: &[f32], k: usize, g: &mut [f32]) {
    assert_eq!(g.len(), k * k, "gram: the output is not {k} x {k}");
    let m = x.len().checked_div(k).unwrap_or(0);
    assert_eq!(x.len(), m * k, "gram: x is not rows of {k}");
    if m == 0 {
        g.fill(0.0);
        return;
    }
    // Band t holds rows bounds[t]..bounds[t + 1]: the triangle below row r has area r^2 / 2.
    const BANDS: usize = 8;
    let bounds: Vec<usize> =
        (0..=BANDS).map(|t| ((k as f64 * (t as f64 / BANDS as f64).sqrt()).round() as usize).min(k)).collect();
    let mut bands: Vec<(usize, &mut [f32])> = Vec::with_capacity(BANDS);
    let mut rest = &mut g[..];
    for t in 0..BANDS {
        let (band, tail) = rest.split_at_mut((bounds[t + 1] - bounds[t]) * k);
        bands.push((bounds[t], band));
        rest = tail;
    }
    for_each_chunk(&mut bands, 1, |_, band| {
        let (r0, ref mut c) = band[0];
        let rows = c.len() / k;
        // Rows r0.. of x^T (column r0.. of x, strides 1 and k) times columns 0..r0 + rows.
        gemm(rows, m, r0 + rows, 1.0, &x[r0..], 1, k, x, k, 1, 0.0, c, k, 1);
    });
    for i in 0..k {
        for j in i + 1..k {
            g[i * k + j] = g[j * k + i];
        }
    }
}

/// Numpy broadcasting of two shapes (right-aligned; a dim of 1 stretches).
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Vec<usize> {
    let r = a.len().max(b.len());
    (0..r)
        .map(|i| {
            let da = if i + a.len() >= r { a[i + a.len() - r] } else { 1 };
            let db = if i + b.len() >= r { b[i + b.len() - r] } else { 1 };
            debug_assert!(da == db || da == 1 || db == 1, "shapes {a:?} and {b:?} do not broadcast");
            if da == 1 { db } else { da }
        })
        .collect()
}

/// Element strides that read a contiguous tensor of `shape` as if it had shape `out`
/// (which `shape` broadcasts to): stride 0 on broadcast (size-1 or missing) dims.
fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    debug_assert!(shape.len() <= out.len());
    let st = contiguous_strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len()).map(|i| if i < pad || shape[i - pad] == 1 { 0 } else { st[i - pad] }).collect()
}

/// Batched matrix product with numpy broadcasting of the batch dims.
///
/// * `a`: `[...A, m, k]`, `b`: `[...B, k, n]` (both rank >= 2).
/// * Returns `[...broadcast(A, B), m, n]` with `out[i.., r, j] = sum_p a[i.., r, p] * b[i.., p, j]`
///   (batch indices taken modulo broadcasting).
pub fn matmul(a: &Tensor, b: &Tensor) -> Tensor {
    let (ra, rb) = (a.rank(), b.rank());
    debug_assert!(ra >= 2 && rb >= 2, "matmul: operands must have rank >= 2");
    let (m, k) = (a.shape[ra - 2], a.shape[ra - 1]);
    let n = b.shape[rb - 1];
    debug_assert_eq!(b.shape[rb - 2], k, "matmul: inner dims differ");
    let (bsa, bsb) = (&a.shape[..ra - 2], &b.shape[..rb - 2]);
    let batch = broadcast_shape(bsa, bsb);
    let nb = numel_of(&batch);
    let mut shape = batch.clone();
    shape.extend([m, n]);
    let mut out = vec![0f32; nb * m * n];
    if out.is_empty() {
        return Tensor::new(shape, out);
    }
    let mat = m * n;
    // One right-hand matrix shared by all batches: fold the batch into the rows.
    if numel_of(bsb) == 1 && numel_of(bsa) == nb {
        gemm_rows(nb * m, k, n, &a.data, &b.data, (n, 1), 0.0, &mut out);
        return Tensor::new(shape, out);
    }
    let sa = broadcast_strides(bsa, &batch);
    let sb = broadcast_strides(bsb, &batch);
    let offsets: Vec<(usize, usize)> = (0..nb)
        .map(|mut bi| {
            let (mut oa, mut ob) = (0, 0);
            for d in (0..batch.len()).rev() {
                let i = bi % batch[d];
                bi /= batch[d];
                oa += i * sa[d];
                ob += i * sb[d];
            }
            (oa * m * k, ob * k * n)
        })
        .collect();
    let one = |o: &mut [f32], &(oa, ob): &(usize, usize)| {
        gemm(m, k, n, 1.0, &a.data[oa..oa + m * k], k, 1, &b.data[ob..ob + k * n], n, 1, 0.0, o, n, 1)
    };
    if nb > 1 {
        for_each_chunk(&mut out, mat, |i, o| one(o, &offsets[i]));
    } else if nb == 1 {
        let (oa, ob) = offsets[0];
        gemm_rows(m, k, n, &a.data[oa..oa + m * k], &b.data[ob..ob + k * n], (n, 1), 0.0, &mut out);
    } else {
        for (o, off) in out.chunks_mut(mat).zip(&offsets) {
            one(o, off);
        }
    }
    Tensor::new(shape, out)
}

// ---------------------------------------------------------------------------------------------
// elementwise
// ---------------------------------------------------------------------------------------------

#[inline(always)]
fn nan_max(x: f32, y: f32) -> f32 {
    if x > y || x.is_nan() { x } else { y }
}

#[inline(always)]
fn nan_min(x: f32, y: f32) -> f32 {
    if x < y || x.is_nan() { x } else { y }
}

/// `a op b` with full numpy broadcasting; the result has shape `broadcast(a.shape, b.shape)`.
///
/// Fast paths: equal shapes, a scalar operand, and one operand's shape being a suffix of the
/// other's (bias-like broadcast). Everything else goes through a loop over the broadcast
/// result with the dims coalesced, whose innermost run is contiguous or constant.
pub fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Tensor {
    match op {
        BinaryOp::Add => binary_with(a, b, |x, y| x + y),
        BinaryOp::Sub => binary_with(a, b, |x, y| x - y),
        BinaryOp::Mul => binary_with(a, b, |x, y| x * y),
        BinaryOp::Div => binary_with(a, b, |x, y| x / y),
        BinaryOp::Max => binary_with(a, b, nan_max),
        BinaryOp::Min => binary_with(a, b, nan_min),
        BinaryOp::Pow => binary_with(a, b, f32::powf),
    }
}

/// `true` if `small` (ignoring leading 1s) equals the trailing dims of `big`.
fn is_suffix(small: &[usize], big: &[usize]) -> bool {
    let lead_ones = small.iter().take_while(|&&d| d == 1).count();
    let s = &small[lead_ones..];
    s.len() <= big.len() && big[big.len() - s.len()..] == *s
}

fn binary_with(a: &Tensor, b: &Tensor, f: impl Fn(f32, f32) -> f32 + Copy) -> Tensor {
    let out_shape = broadcast_shape(&a.shape, &b.shape);
    let total = numel_of(&out_shape);
    if total == 0 {
        return Tensor::zeros(out_shape);
    }
    let data: Vec<f32> = if a.shape == b.shape {
        a.data.iter().zip(&b.data).map(|(&x, &y)| f(x, y)).collect()
    } else if out_shape == a.shape && is_suffix(&b.shape, &a.shape) {
        // includes b being a scalar
        let mut out = Vec::with_capacity(total);
        for row in a.data.chunks_exact(b.numel()) {
            out.extend(row.iter().zip(&b.data).map(|(&x, &y)| f(x, y)));
        }
        out
    } else if out_shape == b.shape && is_suffix(&a.shape, &b.shape) {
        let mut out = Vec::with_capacity(total);
        for row in b.data.chunks_exact(a.numel()) {
            out.extend(a.data.iter().zip(row).map(|(&x, &y)| f(x, y)));
        }
        out
    } else {
        binary_general(a, b, &out_shape, f)
    };
    Tensor::new(out_shape, data)
}

fn binary_general(a: &Tensor, b: &Tensor, out_shape: &[usize], f: impl Fn(f32, f32) -> f32 + Copy) -> Vec<f32> {
    let sa = broadcast_strides(&a.shape, out_shape);
    let sb = broadcast_strides(&b.shape, out_shape);
    // Coalesce: (size, stride_a, stride_b), outermost first; merge a dim into its outer
    // neighbour when both operands continue contiguously (or both stay broadcast).
    let mut dims: Vec<(usize, usize, usize)> = Vec::new();
    for (i, &n) in out_shape.iter().enumerate() {
        if n == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut()
            && last.1 == sa[i] * n
            && last.2 == sb[i] * n
        {
            *last = (last.0 * n, sa[i], sb[i]);
            continue;
        }
        dims.push((n, sa[i], sb[i]));
    }
    let total = numel_of(out_shape);
    let mut out = vec![0f32; total];
    let Some((n_in, ia, ib)) = dims.pop() else {
        out[0] = f(a.data[0], b.data[0]);
        return out;
    };
    let mut idx = vec![0usize; dims.len()];
    let (mut oa, mut ob) = (0usize, 0usize);
    for row in out.chunks_exact_mut(n_in) {
        match (ia, ib) {
            (1, 1) => {
                let (xa, xb) = (&a.data[oa..oa + n_in], &b.data[ob..ob + n_in]);
                for ((o, &x), &y) in row.iter_mut().zip(xa).zip(xb) {
                    *o = f(x, y);
                }
            }
            (1, 0) => {
                let y = b.data[ob];
                for (o, &x) in row.iter_mut().zip(&a.data[oa..oa + n_in]) {
                    *o = f(x, y);
                }
            }
            (0, 1) => {
                let x = a.data[oa];
                for (o, &y) in row.iter_mut().zip(&b.data[ob..ob + n_in]) {
                    *o = f(x, y);
                }
            }
            _ => {
                for (j, o) in row.iter_mut().enumerate() {
                    *o = f(a.data[oa + j * ia], b.data[ob + j * ib]);
                }
            }
        }
        // advance the odometer over the outer dims
        for d in (0..dims.len()).rev() {
            let (n, da, db) = dims[d];
            idx[d] += 1;
            oa += da;
            ob += db;
            if idx[d] < n {
                break;
            }
            idx[d] = 0;
            oa -= da * n;
            ob -= db * n;
        }
    }
    out
}

#[inline]
fn sigmoid(v: f32) -> f32 {
    if v >= 0.0 {
        1.0 / (1.0 + (-v).exp())
    } else {
        let e = v.exp();
        e / (1.0 + e)
    }
}

/// Exact GELU of one f32, see [`UnaryOp::Gelu`].
#[inline]
pub fn gelu(v: f32) -> f32 {
    let x = v as f64;
    (0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

fn map_unary(x: &Tensor, heavy: bool, f: impl Fn(f32) -> f32 + Sync + Send) -> Tensor {
    let data: Vec<f32> = if heavy && x.numel() >= PAR_MIN_ELEMS {
        let mut out = x.data.clone();
        for_each_chunk(&mut out, 4096, |_, c| c.iter_mut().for_each(|v| *v = f(*v)));
        out
    } else {
        x.data.iter().map(|&v| f(v)).collect()
    };
    Tensor::new(x.shape.clone(), data)
}

/// `op(x)` elementwise; same shape as `x`. See [`UnaryOp`] for each op's exact definition.
pub fn unary(op: UnaryOp, x: &Tensor) -> Tensor {
    let heavy =
        matches!(op, UnaryOp::Exp | UnaryOp::Log | UnaryOp::Tanh | UnaryOp::Sigmoid | UnaryOp::Silu | UnaryOp::Gelu);
    map_unary(x, heavy, unary_fn(op))
}

/// The scalar function of a unary op (what [`unary`] applies to every element).
pub fn unary_fn(op: UnaryOp) -> fn(f32) -> f32 {
    match op {
        UnaryOp::Neg => |v| -v,
        UnaryOp::Exp => f32::exp,
        UnaryOp::Log => f32::ln,
        UnaryOp::Sqrt => f32::sqrt,
        UnaryOp::Rsqrt => |v| (1.0 / (v as f64).sqrt()) as f32,
        UnaryOp::Recip => |v| 1.0 / v,
        UnaryOp::Tanh => f32::tanh,
        UnaryOp::Sigmoid => sigmoid,
        UnaryOp::Relu => |v| if v < 0.0 { 0.0 } else { v },
        UnaryOp::Silu => |v| v * sigmoid(v),
        UnaryOp::Gelu => gelu,
    }
}

// ---------------------------------------------------------------------------------------------
// erf / erfc (f64)
// ---------------------------------------------------------------------------------------------

const ERF_TAYLOR_TERMS: usize = 17;

/// Maclaurin coefficients `c_n = (2/sqrt(pi)) (-1)^n / (n! (2n+1))`, so that
/// `erf(x) = x * sum_n c_n x^(2n)`. For |x| < 1 the first omitted term is below 1e-16.
const ERF_TAYLOR: [f64; ERF_TAYLOR_TERMS] = {
    let mut c = [0.0; ERF_TAYLOR_TERMS];
    let mut fact = 1.0f64;
    let mut n = 0;
    while n < ERF_TAYLOR_TERMS {
        if n > 0 {
            fact *= n as f64;
        }
        let sign = if n % 2 == 0 { 1.0 } else { -1.0 };
        c[n] = sign * std::f64::consts::FRAC_2_SQRT_PI / (fact * (2 * n + 1) as f64);
        n += 1;
    }
    c
};

// Near-minimax (Chebyshev) polynomial fits, generated with mpmath (50 digits) by the script
// below (chebyfit lists the highest degree first; the tables here are in ascending order):
//
//   g = lambda y: mp.erfc(y) * mp.exp(y*y)
//   h = lambda t: 1/mp.sqrt(mp.pi) if t == 0 else g(1/t) / t
//   fit = lambda f, a, b, n: mp.chebyfit(lambda u: f(a + (b-a)*(u+1)/2), [-1, 1], n)
//   ERFC_1_2   = fit(g, 1, 2, 17)      # u = 2y - 3,   max rel. error 1.4e-18
//   ERFC_2_INF = fit(h, 0, 0.5, 24)    # u = 4/y - 1,  max rel. error 1.4e-17
//
// Checked in f64 against mpmath on 20k random points: erf rel. error <= 2.5e-16,
// erfc rel. error <= 6e-14 on [0, 26] (the latter from rounding y*y inside exp(-y*y)).

/// `erfc(y) * exp(y^2)` for y in [1, 2], in `u = 2y - 3`.
const ERFC_1_2: [f64; 17] = [
    0.3215854164543175,
    -0.08181145886628002,
    0.01903775996386935,
    -0.004116363162445659,
    0.0008360838095667121,
    -0.0001608111733699307,
    2.947085745299996e-05,
    -5.171328672722121e-06,
    8.72304473829848e-07,
    -1.4191186135917107e-07,
    2.2328417586062252e-08,
    -3.405938587821499e-09,
    5.04654734183512e-10,
    -7.257032617086992e-11,
    1.0201594788774491e-11,
    -1.512018061489917e-12,
    2.0206514750441873e-13,
];

/// `y * erfc(y) * exp(y^2)` for y in [2, inf), in `u = 4/y - 1` (tends to 1/sqrt(pi)).
const ERFC_2_INF: [f64; 24] = [
    0.5479978305002455,
    -0.02986173297990228,
    -0.010486636862003731,
    0.003429890672478946,
    -0.00010971184711430387,
    -0.00026637073848546905,
    0.00010036643710693037,
    -5.975210918159142e-06,
    -1.0805375612670901e-05,
    5.641214842104234e-06,
    -9.730757404943622e-07,
    -4.5831588643468804e-07,
    4.143098491685717e-07,
    -1.4219601240746822e-07,
    3.7177862271998884e-10,
    2.8741893558248475e-08,
    -1.8222882126493014e-08,
    5.5824774444587336e-09,
    9.810265549849388e-10,
    -2.3492398597390144e-09,
    1.077579627428007e-09,
    6.490717773596494e-11,
    -2.0984925187892776e-10,
    5.047298326810628e-11,
];

/// `sum_i c[i] u^i`, evaluated as four interleaved Horner chains in `u^4` (an Estrin-like
/// split: same accuracy for these well-conditioned polynomials with |u| <= 1, a quarter of
/// the dependency-chain latency).
#[inline(always)]
fn poly<const N: usize>(c: &[f64; N], u: f64) -> f64 {
    let u2 = u * u;
    let u4 = u2 * u2;
    let mut acc = [0f64; 4];
    for g in (0..N.div_ceil(4)).rev() {
        for (l, a) in acc.iter_mut().enumerate() {
            let i = 4 * g + l;
            *a = *a * u4 + if i < N { c[i] } else { 0.0 };
        }
    }
    (acc[0] + u * acc[1]) + u2 * (acc[2] + u * acc[3])
}

/// `erf(x)/x` for |x| < 1 via the Maclaurin series, given `x2 = x*x`.
#[inline(always)]
fn erf_taylor(x2: f64) -> f64 {
    poly(&ERF_TAYLOR, x2)
}

/// `erfc(y)` for `y >= 1` (or NaN).
#[inline]
fn erfc_ge1(y: f64) -> f64 {
    let e = (-y * y).exp();
    if y < 2.0 {
        e * poly(&ERFC_1_2, 2.0 * y - 3.0)
    } else {
        let t = 1.0 / y;
        e * t * poly(&ERFC_2_INF, 4.0 * t - 1.0)
    }
}

/// The error function, accurate to a few f64 ulps (relative error <= ~3e-16).
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    if ax < 1.0 { x * erf_taylor(x * x) } else { (1.0 - erfc_ge1(ax)).copysign(x) }
}

/// The complementary error function `1 - erf(x)`, with small *relative* error also in the
/// tail (<= ~1e-15 for x < 6, <= ~6e-14 up to the f64 underflow at x ~ 26.5).
pub fn erfc(x: f64) -> f64 {
    let ax = x.abs();
    let c = if ax < 1.0 { 1.0 - ax * erf_taylor(ax * ax) } else { erfc_ge1(ax) };
    if x >= 0.0 { c } else { 2.0 - c }
}

// ---------------------------------------------------------------------------------------------
// row-wise: softmax, norms
// ---------------------------------------------------------------------------------------------

/// Runs `f(row_index, row)` over the `row_len`-sized rows of `out`, in parallel for large
/// outputs.
fn for_each_row(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    if out.len() >= PAR_MIN_ELEMS {
        for_each_chunk(out, row_len, f);
    } else {
        out.chunks_mut(row_len).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// Lanes of the partial sums and maxima of the row reductions below.
const LANES: usize = 8;

/// `sum f(x[i])` in f64 in a fixed order that vectorizes: element `i` goes to partial sum
/// `i % 8` (in index order), the partial sums combine as a balanced tree, and the tail of
/// `len % 8` elements follows in order. Row reductions (norms, softmax) are latency bound
/// with one running sum: eight cut `layer_norm` of 128 x 384 by 4x.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] += f(c[l]);
        }
    }
    let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for &v in tail {
        sum += f(v);
    }
    sum
}

/// `max x[i]` as `f32::max` folds it (NaN ignored unless all are), over eight lanes.
#[inline(always)]
fn max_f32(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..LANES {
            acc[l] = acc[l].max(c[l]);
        }
    }
    tail.iter().fold(acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)), |m, &v| m.max(v))
}

/// Stable softmax of one row, in place. A row with a NaN or with max = +-inf follows IEEE
/// (NaN results), like PyTorch.
#[inline]
fn softmax_row_inplace(row: &mut [f32]) {
    let mx = max_f32(row);
    for v in row.iter_mut() {
        *v = (*v - mx).exp();
    }
    let inv = 1.0 / sum_f64(row, |v| v as f64);
    for v in row.iter_mut() {
        *v = (*v as f64 * inv) as f32;
    }
}

/// Softmax along `axis`: `y = exp(x - max) / sum(exp(x - max))`, max and sum taken over
/// `axis` (exp in f32, sum in f64). Same shape as `x`.
pub fn softmax(x: &Tensor, axis: usize) -> Tensor {
    debug_assert!(axis < x.rank(), "softmax: axis out of range");
    let n = x.shape[axis];
    let inner = numel_of(&x.shape[axis + 1..]);
    let mut out = x.data.clone();
    if out.is_empty() {
        return Tensor::new(x.shape.clone(), out);
    }
    if inner == 1 {
        for_each_row(&mut out, n, |_, row| softmax_row_inplace(row));
    } else {
        // each [n, inner] block: reduce over its rows, vectorized over the columns
        for_each_row(&mut out, n * inner, |_, blk| {
            let mut mx = vec![f32::NEG_INFINITY; inner];
            for row in blk.chunks_exact(inner) {
                for (m, &v) in mx.iter_mut().zip(row) {
                    *m = m.max(v);
                }
            }
            let mut sum = vec![0f64; inner];
            for row in blk.chunks_exact_mut(inner) {
                for ((v, &m), s) in row.iter_mut().zip(&mx).zip(sum.iter_mut()) {
                    *v = (*v - m).exp();
                    *s += *v as f64;
                }
            }
            for s in sum.iter_mut() {
                *s = 1.0 / *s;
            }
            for row in blk.chunks_exact_mut(inner) {
                for (v, &s) in row.iter_mut().zip(&sum) {
                    *v = (*v as f64 * s) as f32;
                }
            }
        });
    }
    Tensor::new(x.shape.clone(), out)
}

/// Layer normalization over the last axis (PyTorch `F.layer_norm(x, [d], gamma, beta, eps)`):
/// `y = (x - mean) / sqrt(var + eps) * gamma + beta` with `mean`, biased `var` over the last
/// axis. Computed in f64, rounded once. `x`: `[..., d]`, `gamma`, `beta`: `[d]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Tensor {
    debug_assert!(x.rank() >= 1, "layer_norm: x must have rank >= 1");
    let d = x.shape[x.rank() - 1];
    debug_assert_eq!(gamma.shape, [d], "layer_norm: gamma must be [d]");
    debug_assert_eq!(beta.shape, [d], "layer_norm: beta must be [d]");
    let mut out = vec![0f32; x.numel()];
    for_each_row(&mut out, d, |r, y| {
        let xr = &x.data[r * d..(r + 1) * d];
        let mean = sum_f64(xr, |v| v as f64) / d as f64;
        let var = sum_f64(xr, |v| {
            let c = v as f64 - mean;
            c * c
        }) / d as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for (((o, &v), &g), &b) in y.iter_mut().zip(xr).zip(&gamma.data).zip(&beta.data) {
            *o = ((v as f64 - mean) * rstd * g as f64 + b as f64) as f32;
        }
    });
    Tensor::new(x.shape.clone(), out)
}

/// RMS normalization over the last axis (llama): `y = x / sqrt(mean(x^2) + eps) * gamma`.
/// Computed in f64, rounded once. `x`: `[..., d]`, `gamma`: `[d]`.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f32) -> Tensor {
    debug_assert!(x.rank() >= 1, "rms_norm: x must have rank >= 1");
    let d = x.shape[x.rank() - 1];
    debug_assert_eq!(gamma.shape, [d], "rms_norm: gamma must be [d]");
    let mut out = vec![0f32; x.numel()];
    for_each_row(&mut out, d, |r, y| {
        let xr = &x.data[r * d..(r + 1) * d];
        let ms = sum_f64(xr, |v| (v as f64) * (v as f64)) / d as f64;
        let rinv = 1.0 / (ms + eps as f64).sqrt();
        for ((o, &v), &g) in y.iter_mut().zip(xr).zip(&gamma.data) {
            *o = (v as f64 * rinv * g as f64) as f32;
        }
    });
    Tensor::new(x.shape.clone(), out)
}

// ---------------------------------------------------------------------------------------------
// rope
// ---------------------------------------------------------------------------------------------

/// Rotary position embedding of `x: [b, s, h, d]` (d even). The token at sequence index
/// `si` has position `p = position_offset + si`. For each pair index `i in 0..d/2`,
/// `angle = p * theta^(-2i/d)` (computed in f64; cos/sin in f64, then rounded to f32) and the
/// pair `(a, b)` becomes `(a cos - b sin, a sin + b cos)` (in f32). The pairs are
/// * `interleaved == true`: `(x[2i], x[2i+1])` (GPT-J / llama.cpp "normal" layout);
/// * `interleaved == false`: `(x[i], x[i + d/2])` (HF `rotate_half` / NeoX layout).
pub fn rope(x: &Tensor, theta: f32, interleaved: bool, position_offset: usize) -> Tensor {
    debug_assert_eq!(x.rank(), 4, "rope: x must be [b, s, h, d]");
    let (s, h, d) = (x.shape[1], x.shape[2], x.shape[3]);
    debug_assert!(d % 2 == 0, "rope: head dim must be even");
    let half = d / 2;
    let mut out = x.data.clone();
    if out.is_empty() || half == 0 {
        return Tensor::new(x.shape.clone(), out);
    }
    let freqs: Vec<f64> = (0..half).map(|i| (theta as f64).powf(-2.0 * i as f64 / d as f64)).collect();
    let mut cos = Vec::with_capacity(s * half);
    let mut sin = Vec::with_capacity(s * half);
    for si in 0..s {
        let p = (position_offset + si) as f64;
        for &f in &freqs {
            let (sn, cs) = (p * f).sin_cos();
            cos.push(cs as f32);
            sin.push(sn as f32);
        }
    }
    for (r, row) in out.chunks_exact_mut(d).enumerate() {
        let si = (r / h) % s;
        let (c, sn) = (&cos[si * half..][..half], &sin[si * half..][..half]);
        if interleaved {
            for ((pair, &c), &s) in row.chunks_exact_mut(2).zip(c).zip(sn) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * c - b * s;
                pair[1] = a * s + b * c;
            }
        } else {
            let (lo, hi) = row.split_at_mut(half);
            for (((a, b), &c), &s) in lo.iter_mut().zip(hi.iter_mut()).zip(c).zip(sn) {
                let (x0, x1) = (*a, *b);
                *a = x0 * c - x1 * s;
                *b = x0 * s + x1 * c;
            }
        }
    }
    Tensor::new(x.shape.clone(), out)
}

// ---------------------------------------------------------------------------------------------
// gather and data movement
// ---------------------------------------------------------------------------------------------

/// Embedding lookup: `out[idx.., :] = table[ids[idx..], :]`.
/// `table`: `[n, d]`, `ids`: row-major with shape `ids_shape`; returns `[...ids_shape, d]`.
/// An id `< 0` or `>= n` is reported as [`KernelError::IdOutOfRange`].
pub fn gather(table: &Tensor, ids: &[i64], ids_shape: &[usize]) -> Result<Tensor, KernelError> {
    debug_assert_eq!(table.rank(), 2, "gather: table must be [n, d]");
    debug_assert_eq!(ids.len(), numel_of(ids_shape), "gather: ids / ids_shape mismatch");
    let (n, d) = (table.shape[0], table.shape[1]);
    let mut out = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        if id < 0 || id as u64 >= n as u64 {
            return Err(KernelError::IdOutOfRange { id, n });
        }
        let r = id as usize;
        out.extend_from_slice(&table.data[r * d..(r + 1) * d]);
    }
    let mut shape = ids_shape.to_vec();
    shape.push(d);
    Ok(Tensor::new(shape, out))
}

/// The same elements under a new shape (copied; see [`Tensor::reshaped`] for the zero-copy
/// owning variant). The element counts must match.
pub fn reshape(x: &Tensor, shape: &[usize]) -> Tensor {
    debug_assert_eq!(numel_of(shape), x.numel(), "reshape: element count differs");
    Tensor::new(shape, x.data.clone())
}

/// General axis permutation: `out.shape[i] = x.shape[perm[i]]` and
/// `out[j_0, .., j_{r-1}] = x[i]` with `i[perm[a]] = j_a` (numpy `transpose(x, perm)`).
///
/// Axes that stay adjacent are coalesced first; when the innermost output axis is also the
/// innermost input axis (e.g. `[b,s,h,d] -> [b,h,s,d]`), rows are block-copied.
pub fn transpose(x: &Tensor, perm: &[usize]) -> Tensor {
    let r = x.rank();
    debug_assert_eq!(perm.len(), r, "transpose: perm has wrong length");
    debug_assert!(
        {
            let mut seen = vec![false; r];
            perm.iter().all(|&p| p < r && !std::mem::replace(&mut seen[p], true))
        },
        "transpose: {perm:?} is not a permutation"
    );
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
    let st = contiguous_strides(&x.shape);
    // (size, input stride) in output order, size-1 axes dropped, adjacent axes merged
    let mut dims: Vec<(usize, usize)> = Vec::new();
    for &p in perm {
        let (n, s) = (x.shape[p], st[p]);
        if n == 1 {
            continue;
        }
        if let Some(last) = dims.last_mut()
            && last.1 == s * n
        {
            *last = (last.0 * n, s);
            continue;
        }
        dims.push((n, s));
    }
    if x.numel() == 0 || dims.len() <= 1 {
        return Tensor::new(out_shape, x.data.clone());
    }
    let mut out = vec![0f32; x.numel()];
    let (n_in, s_in) = dims.pop().unwrap();
    let mut idx = vec![0usize; dims.len()];
    let mut off = 0usize;
    for row in out.chunks_exact_mut(n_in) {
        if s_in == 1 {
            row.copy_from_slice(&x.data[off..off + n_in]);
        } else {
            let src = &x.data[off..=off + (n_in - 1) * s_in];
            for (o, &v) in row.iter_mut().zip(src.iter().step_by(s_in)) {
                *o = v;
            }
        }
        for d in (0..dims.len()).rev() {
            let (n, s) = dims[d];
            idx[d] += 1;
            off += s;
            if idx[d] < n {
                break;
            }
            idx[d] = 0;
            off -= s * n;
        }
    }
    Tensor::new(out_shape, out)
}

/// `x[.., start..end, ..]` along `axis` (step 1). Requires `start <= end <= x.shape[axis]`.
pub fn slice(x: &Tensor, axis: usize, start: usize, end: usize) -> Tensor {
    debug_assert!(axis < x.rank(), "slice: axis out of range");
    debug_assert!(start <= end && end <= x.shape[axis], "slice: bad range {start}..{end}");
    let n = x.shape[axis];
    let outer = numel_of(&x.shape[..axis]);
    let inner = numel_of(&x.shape[axis + 1..]);
    let len = (end - start) * inner;
    let mut out = Vec::with_capacity(outer * len);
    for o in 0..outer {
        let base = (o * n + start) * inner;
        out.extend_from_slice(&x.data[base..base + len]);
    }
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    Tensor::new(shape, out)
}

/// Concatenation along `axis`. All inputs have the same rank and agree on every other axis;
/// `xs` is non-empty.
pub fn concat(xs: &[&Tensor], axis: usize) -> Tensor {
    debug_assert!(!xs.is_empty(), "concat: no inputs");
    let first = xs[0];
    debug_assert!(axis < first.rank(), "concat: axis out of range");
    debug_assert!(
        xs.iter().all(|t| t.rank() == first.rank()
            && t.shape.iter().zip(&first.shape).enumerate().all(|(i, (a, b))| i == axis || a == b)),
        "concat: shapes disagree off the concat axis"
    );
    let outer = numel_of(&first.shape[..axis]);
    let inner = numel_of(&first.shape[axis + 1..]);
    let total_axis: usize = xs.iter().map(|t| t.shape[axis]).sum();
    let mut out = Vec::with_capacity(outer * total_axis * inner);
    for o in 0..outer {
        for t in xs {
            let len = t.shape[axis] * inner;
            out.extend_from_slice(&t.data[o * len..(o + 1) * len]);
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = total_axis;
    Tensor::new(shape, out)
}

// ---------------------------------------------------------------------------------------------
// reduce
// ---------------------------------------------------------------------------------------------

/// Reduces `x` over `axes` (distinct, each `< rank`, any order). With `keepdim` the reduced
/// axes stay as size 1, otherwise they are removed. An empty `axes` reduces nothing (returns
/// a copy) — pass every axis to reduce to a scalar.
pub fn reduce(op: ReduceOp, x: &Tensor, axes: &[usize], keepdim: bool) -> Tensor {
    let r = x.rank();
    let mut red = vec![false; r];
    for &a in axes {
        debug_assert!(a < r, "reduce: axis {a} out of range");
        debug_assert!(!red[a], "reduce: axis {a} repeated");
        red[a] = true;
    }
    let mut out_shape = Vec::with_capacity(r);
    for (i, &n) in x.shape.iter().enumerate() {
        if !red[i] {
            out_shape.push(n);
        } else if keepdim {
            out_shape.push(1);
        }
    }
    let kept: Vec<usize> = (0..r).filter(|&i| !red[i]).collect();
    let rlen: usize = (0..r).filter(|&i| red[i]).map(|i| x.shape[i]).product();
    let rows = numel_of(&out_shape);
    // bring the reduced axes innermost (no copy when they already are)
    let perm: Vec<usize> = kept.iter().copied().chain((0..r).filter(|&i| red[i])).collect();
    let moved;
    let src: &[f32] = if perm.iter().enumerate().all(|(i, &p)| i == p) {
        &x.data
    } else {
        moved = transpose(x, &perm);
        &moved.data
    };
    let out: Vec<f32> = (0..rows)
        .map(|row| {
            let v = &src[row * rlen..(row + 1) * rlen];
            match op {
                ReduceOp::Sum => v.iter().map(|&e| e as f64).sum::<f64>() as f32,
                ReduceOp::Mean => (v.iter().map(|&e| e as f64).sum::<f64>() / rlen as f64) as f32,
                ReduceOp::Max => v.iter().fold(f32::NEG_INFINITY, |m, &e| nan_max(e, m)),
            }
        })
        .collect();
    Tensor::new(out_shape, out)
}

// ---------------------------------------------------------------------------------------------
// attention
// ---------------------------------------------------------------------------------------------

/// Scaled dot-product attention with grouped-query heads, causal and key-padding masks.
///
/// * `q`: `[b, hq, s, d]`, `k`: `[b, hkv, t, d]`, `v`: `[b, hkv, t, dv]`, `hq % hkv == 0`;
///   query head `h` uses kv head `h / (hq / hkv)`.
/// * `key_mask`: `[b, t]` row-major; nonzero = attend, `0` = masked out.
/// * `causal`: query `i` may only attend to keys `j <= i + (t - s)` (queries are the last
///   `s` of `t` positions, so this also serves a KV cache).
/// * `scores = scale * q k^T`; masked scores are excluded from the softmax (as if -inf);
///   `out = softmax(scores) v`, shape `[b, hq, s, dv]`. A query row whose keys are all
///   masked produces zeros (not NaN).
///
/// Runs the (batch, head) pairs in parallel; each does `q k^T` and `p v` with sgemm (the
/// transposed `k` is read through strides), softmax in between (exp in f32, sum in f64).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, key_mask: Option<&[f32]>, causal: bool, scale: f32) -> Tensor {
    debug_assert!(q.rank() == 4 && k.rank() == 4 && v.rank() == 4, "attention: rank 4");
    debug_assert!(k.shape[0] == q.shape[0] && v.shape[0] == q.shape[0], "attention: batch mismatch");
    debug_assert!(v.shape[1] == k.shape[1] && v.shape[2] == k.shape[2], "attention: k/v mismatch");
    let (hkv, t) = (k.shape[1], k.shape[2]);
    let keys = KeyValues { k: &k.data, v: &v.data, heads: hkv, len: t, capacity: t, d: k.shape[3], dv: v.shape[3] };
    attention_over(q, &keys, key_mask, causal, scale)
}

/// `e^x` in place for `x <= 0` (the shifted scores of a softmax), within 2 ulp of the exact
/// value; `-inf` and anything below `-87.33` (where `e^x` leaves the normal f32 range) give 0. Branch-free so that it
/// vectorizes: `x = n ln2 + r` with `|r| <= ln2 / 2` (Cody-Waite), `e^r` by its Taylor
/// series to `r^7` (truncation below 6e-9 relative), times `2^n` built in the exponent bits.
pub fn exp_nonpositive(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    for v in xs.iter_mut() {
        let x = v.max(-87.33);
        let n = (x * LOG2E + ROUND) - ROUND;
        let r = (x - n * LN2_HI) - n * LN2_LO;
        let mut p = 1.0 / 5040.0;
        p = p * r + 1.0 / 720.0;
        p = p * r + 1.0 / 120.0;
        p = p * r + 1.0 / 24.0;
        p = p * r + 1.0 / 6.0;
        p = p * r + 0.5;
        p = p * r + 1.0;
        p = p * r + 1.0;
        // 2^n from the exponent bits: `n + 127` (an integer in 1..=127) sits in the low
        // mantissa bits of `n + 127 + ROUND` (no float-to-int conversion, so this vectorizes).
        let scale = f32::from_bits(((n + 127.0 + ROUND).to_bits() - ROUND.to_bits()) << 23);
        *v = if *v < -87.33 { 0.0 } else { p * scale };
    }
}

/// Query rows per head up to which attention uses dot products instead of a GEMM.
const FEW_QUERIES: usize = 4;

/// Keys and values `[b, heads, capacity, d]` / `[b, heads, capacity, dv]` of which the first
/// `len` positions of every head are valid: the layout of a KV cache with room to grow.
#[derive(Clone, Copy, Debug)]
pub struct KeyValues<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub heads: usize,
    pub len: usize,
    pub capacity: usize,
    pub d: usize,
    pub dv: usize,
}

/// [`attention`] over keys and values held in a [`KeyValues`] layout; `key_mask` is
/// `[b, len]`. The result is bitwise the same as [`attention`] on the same valid values.
pub fn attention_over(q: &Tensor, kv: &KeyValues, key_mask: Option<&[f32]>, causal: bool, scale: f32) -> Tensor {
    debug_assert!(q.rank() == 4, "attention: q must be rank 4");
    let (b, hq, s, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
    let (hkv, t, cap, dv) = (kv.heads, kv.len, kv.capacity, kv.dv);
    debug_assert_eq!(kv.d, d, "attention: q/k head dim mismatch");
    debug_assert!(t <= cap && kv.k.len() >= b * hkv * cap * d && kv.v.len() >= b * hkv * cap * dv);
    debug_assert!(hkv > 0 && hq % hkv == 0, "attention: hq must be a multiple of hkv");
    if let Some(m) = key_mask {
        debug_assert_eq!(m.len(), b * t, "attention: key_mask must be [b, t]");
    }
    let shape = vec![b, hq, s, dv];
    let mut out = vec![0f32; b * hq * s * dv];
    if out.is_empty() {
        return Tensor::new(shape, out);
    }
    let group = hq / hkv;
    let shift = t as isize - s as isize;

    // The query heads that share a key/value head are computed together: their query rows
    // are consecutive (`group * s` rows), so one pass over the keys serves all of them.
    let rows = group * s;
    let heads = |scores: &mut Vec<f32>, bg: usize, o: &mut [f32]| {
        let (bi, kvh) = (bg / hkv, bg % hkv);
        let qb = &q.data[(bi * hq + kvh * group) * s * d..][..rows * d];
        let kb = &kv.k[(bi * hkv + kvh) * cap * d..][..t * d];
        let vb = &kv.v[(bi * hkv + kvh) * cap * dv..][..t * dv];
        let mrow = key_mask.map(|m| &m[bi * t..(bi + 1) * t]);
        scores.resize(rows * t, 0.0);
        // scores[r, j] = scale * sum_p q[r, p] k[j, p]
        if s <= FEW_QUERIES {
            // Decoding: a few query rows against many cached keys; packing for a GEMM
            // would cost more than the dot products. Key-major, so each key is read once.
            for j in 0..t {
                let kj = &kb[j * d..][..d];
                for r in 0..rows {
                    scores[r * t + j] = scale * dot(&qb[r * d..][..d], kj);
                }
            }
        } else {
            gemm(rows, d, t, scale, qb, d, 1, kb, 1, d, 0.0, scores, t, 1);
        }
        for (r, row) in scores.chunks_exact_mut(t.max(1)).enumerate().take(rows) {
            let i = r % s;
            let lim = if causal { (i as isize + shift + 1).clamp(0, t as isize) as usize } else { t };
            let (live, dead) = row.split_at_mut(lim);
            dead.fill(0.0);
            // Masked keys score -inf: they do not move the maximum of the others, and their
            // weight is exactly 0. (If every allowed score is -inf or NaN, so is the maximum,
            // and the whole row becomes NaN as before.)
            if let Some(m) = mrow {
                if !m[..lim].iter().any(|&k| k != 0.0) {
                    live.fill(0.0);
                    continue;
                }
                for (sc, &k) in live.iter_mut().zip(m) {
                    *sc = if k != 0.0 { *sc } else { f32::NEG_INFINITY };
                }
            }
            if live.is_empty() {
                continue;
            }
            let mx = max_f32(live);
            for sc in live.iter_mut() {
                *sc -= mx;
            }
            exp_nonpositive(live);
            let inv = 1.0 / sum_f64(live, |p| p as f64);
            for sc in live.iter_mut() {
                *sc = (*sc as f64 * inv) as f32;
            }
        }
        // out[r, c] = sum_j p[r, j] v[j, c]
        if s <= FEW_QUERIES {
            o.fill(0.0);
            for j in 0..t {
                let vj = &vb[j * dv..][..dv];
                for (r, or) in o.chunks_exact_mut(dv.max(1)).enumerate().take(rows) {
                    let p = scores[r * t + j];
                    if p != 0.0 {
                        for (acc, &vv) in or.iter_mut().zip(vj) {
                            *acc += p * vv;
                        }
                    }
                }
            }
        } else {
            gemm(rows, t, dv, 1.0, scores, t, 1, vb, dv, 1, 0.0, o, dv, 1);
        }
    };

    let per_group = rows * dv;
    // Threads only pay off for more than a few microseconds of work (not for decoding).
    if b * hkv > 1 && b * hq * s * t * (d + dv) >= 1 << 18 {
        for_each_chunk_init(&mut out, per_group, Vec::new, heads);
    } else {
        let mut scores = Vec::new();
        for (bg, o) in out.chunks_mut(per_group).enumerate() {
            heads(&mut scores, bg, o);
        }
    }
    Tensor::new(shape, out)
}

// ---------------------------------------------------------------------------------------------
// linear with int8 activations (W8A8)
// ---------------------------------------------------------------------------------------------

/// A weight `[n, k]` in an integer block format as a linear with int8 activations reads it
/// (see [`kiln_ir::Activations`]): per block of 32 values along a row, integers `w` and
/// the f32 scale `d` (and offset `m`) with `value = d * w (+ m)`, exactly
/// [`Format::dequantize`]'s value (tested).
#[derive(Clone, Debug, PartialEq)]
pub struct IntWeight {
    pub n: usize,
    pub k: usize,
    /// The integers, `[n, k]`.
    pub w: Vec<i8>,
    /// The scale of each block of 32, `[n, k / 32]`.
    pub d: Vec<f32>,
    /// The offset of each block, for asymmetric formats (`q4_1`, `intBgGa`).
    pub m: Option<Vec<f32>>,
}

impl IntWeight {
    /// The integers and scales of `bytes`, a weight `[n, k]` stored in `format`: `q8_0`,
    /// `q4_0`, `q4_1` or an [`IntFormat`], with `k` a multiple of its blocks.
    pub fn new(format: Format, bytes: &[u8], n: usize, k: usize) -> Result<IntWeight, String> {
        let expected = format.byte_len((n * k) as u64).map_err(|e| e.to_string())?;
        if bytes.len() as u64 != expected || !k.is_multiple_of(32) || !(k as u64).is_multiple_of(format.block_len()) {
            return Err(format!(
                "{format} weight [{n}, {k}]: {} bytes, or rows that are not whole blocks",
                bytes.len()
            ));
        }
        let f16_at = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let (mut w, mut d, mut m) = (Vec::with_capacity(n * k), Vec::with_capacity(n * k / 32), Vec::new());
        match format {
            Format::Q8_0 => {
                for block in bytes.chunks_exact(34) {
                    d.push(f16_at(&block[0..2]));
                    w.extend(block[2..].iter().map(|&q| q as i8));
                }
            }
            Format::Q4_0 | Format::Q4_1 => {
                let asym = format == Format::Q4_1;
                let at = if asym { 4 } else { 2 };
                for block in bytes.chunks_exact(at + 16) {
                    d.push(f16_at(&block[0..2]));
                    if asym {
                        m.push(f16_at(&block[2..4]));
                    }
                    let zero = if asym { 0 } else { 8 };
                    let qs = &block[at..];
                    w.extend(qs.iter().map(|&q| (q & 0xF) as i8 - zero));
                    w.extend(qs.iter().map(|&q| (q >> 4) as i8 - zero));
                }
            }
            Format::Int(f) => {
                let mut codes = vec![0u8; f.group as usize];
                for block in bytes.chunks_exact(f.block_bytes()) {
                    let s = f.unpack_block(block, &mut codes);
                    for _ in 0..f.group / 32 {
                        d.push(s.d.to_f32());
                        if f.asym {
                            m.push(s.m.to_f32());
                        }
                    }
                    w.extend(codes.iter().map(|&q| (q as i32 - f.zero_code() as i32) as i8));
                }
            }
            _ => return Err(format!("{format} is not an integer block format")),
        }
        let asym = matches!(format, Format::Q4_1 | Format::Int(IntFormat { asym: true, .. }));
        Ok(IntWeight { n, k, w, d, m: asym.then_some(m) })
    }
}

/// `x` (a block of 32 activations, or a row) quantized to int8 with one scale, as
/// [`kiln_ir::Activations`] states: `(q, d)`.
pub fn quantize_int8(x: &[f32]) -> (Vec<i8>, f32) {
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
        }
    }
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut q = Vec::with_capacity(x.len());
    for &v in x {
        let p = v * id;
        // `round` rounds halves away from zero; NaN and infinite products fail the test.
        q.push(if p.abs() <= 127.5 { p.round() as i8 } else { 0 });
    }
    let d = if x.iter().any(|v| v.is_nan()) { f32::NAN } else { d };
    (q, d)
}

/// `linear(x, w, b)` with int8 activations, as [`kiln_ir::Activations`] states it:
/// `per_row` for `Int8Row` (`w` must then be `int8gK`, one scale per row), else `Int8`'s
/// blocks of 32. `x`: `[..., k]`, `b`: `[n]`; returns `[..., n]`. Plain loops, each output
/// computed on its own (rows of `x` in parallel), for the interpreter: the engine's kernels
/// compute the same bits.
pub fn linear_int8(x: &Tensor, w: &IntWeight, b: Option<&Tensor>, per_row: bool) -> Tensor {
    let (n, k) = (w.n, w.k);
    debug_assert_eq!(x.shape[x.rank() - 1], k, "linear_int8: x's last dim != w's in-dim");
    let mut shape = x.shape[..x.rank() - 1].to_vec();
    shape.push(n);
    let blocks = k / 32;
    let mut y = vec![0f32; numel_of(&shape)];
    for_each_chunk(&mut y, n.max(1), |r, out| {
        let x = &x.data[r * k..(r + 1) * k];
        if per_row {
            let (q, dx) = quantize_int8(x);
            for (j, out) in out.iter_mut().enumerate() {
                let wj = &w.w[j * k..(j + 1) * k];
                let isum: i64 = q.iter().zip(wj).map(|(&q, &w)| q as i64 * w as i64).sum();
                // int8gK: every block of the row has the row's scale.
                *out = (w.d[j * blocks] * dx) * (isum as f32);
            }
        } else {
            let xq: Vec<(Vec<i8>, f32)> = x.chunks_exact(32).map(quantize_int8).collect();
            for (j, out) in out.iter_mut().enumerate() {
                let mut acc = 0.0f32;
                let mut finite = true;
                for (bi, (q, dx)) in xq.iter().enumerate() {
                    let wb = &w.w[j * k + bi * 32..j * k + bi * 32 + 32];
                    let isum: i32 = q.iter().zip(wb).map(|(&q, &w)| q as i32 * w as i32).sum();
                    let dw = w.d[j * blocks + bi];
                    acc = (dw * dx).mul_add(isum as f32, acc);
                    finite &= dw.is_finite();
                    if let Some(m) = &w.m {
                        let sum: i32 = q.iter().map(|&q| q as i32).sum();
                        let s = dx * sum as f32;
                        let mw = m[j * blocks + bi];
                        acc = mw.mul_add(s, acc);
                        finite &= mw.is_finite();
                    }
                }
                *out = if finite { acc } else { f32::NAN };
            }
        }
        if let Some(b) = b {
            for (o, &b) in out.iter_mut().zip(&b.data) {
                *o += b;
            }
        }
    });
    Tensor::new(shape, y)
}

// ---------------------------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
// reference values keep all their digits; references index explicitly on purpose
#[allow(clippy::excessive_precision, clippy::needless_range_loop, clippy::type_complexity)]
mod tests {
    //! Every kernel is checked against a naive reference written with explicit indices and
    //! f64 accumulation (proptest over random shapes, including odd sizes), plus hand-computed
    //! values.
    use super::*;

    /// Each integer format's integers and scales give exactly its decoded values.
    #[test]
    fn int_weights_have_the_decoded_values() {
        let (n, k) = (3, 128);
        let mut s = 7u32;
        let mut byte = move || {
            s = s.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (s >> 16) as u8
        };
        // GGUF blocks with f16 scales in [2^-8, 2^-7) (and offsets for Q4_1), random codes.
        let gguf = |format: Format, byte: &mut dyn FnMut() -> u8| -> Vec<u8> {
            let per = format.block_bytes() as usize;
            (0..n * k / 32)
                .flat_map(|_| {
                    let mut block: Vec<u8> = (0..per).map(|_| byte()).collect();
                    block[1] = 0x1C; // f16 exponent 7: 2^-8 times 1.mantissa
                    if format == Format::Q4_1 {
                        block[3] = 0xA0 | (block[3] & 3); // a negative offset
                    }
                    block
                })
                .collect()
        };
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0).collect();
        let mut formats: Vec<(Format, Vec<u8>)> =
            [Format::Q8_0, Format::Q4_0, Format::Q4_1].into_iter().map(|f| (f, gguf(f, &mut byte))).collect();
        for name in ["int4g64", "int4g32a", "int3g128a", "int2g32", "int8g128", "int8g32"] {
            let f: IntFormat = name.parse().unwrap();
            formats.push((Format::Int(f), f.quantize(&values)));
        }
        for (format, bytes) in formats {
            let want = format.dequantize(&bytes, (n * k) as u64).unwrap();
            let w = IntWeight::new(format, &bytes, n, k).unwrap();
            assert_eq!((w.w.len(), w.d.len()), (n * k, n * k / 32), "{format}");
            for (i, &want) in want.iter().enumerate() {
                let (d, q) = (w.d[i / 32], w.w[i] as f32);
                let got = match &w.m {
                    Some(m) => d * q + m[i / 32],
                    None => d * q,
                };
                assert_eq!(got.to_bits(), want.to_bits(), "{format}, value {i}");
            }
        }
        assert!(IntWeight::new(Format::BF16, &[0; 2 * 32], 1, 32).is_err());
        assert!(IntWeight::new(Format::Q8_0, &[0; 33], 1, 32).is_err());
    }

    /// Activations quantize as `kiln_ir::Activations` states, on hand-computed values.
    #[test]
    fn int8_quantization_of_hand_computed_values() {
        // amax 2.54: d = 0.02, and 0.03 / 0.02 = 1.5 (up to rounding) rounds away from zero.
        let (q, d) = quantize_int8(&[2.54, -2.54, 0.0, 1.0, -0.01, 0.03, -0.03, 0.0099]);
        assert_eq!(d, 2.54f32 / 127.0);
        assert_eq!(q, [127, -127, 0, 50, -1, 2, -2, 0]);
        // Exact halves: amax 127 gives d = 1.
        assert_eq!(
            quantize_int8(&[127.0, 0.5, -0.5, 1.5, -2.5, 0.49, 126.5, -127.0]).0,
            [127, 1, -1, 2, -3, 0, 127, -127]
        );
        assert_eq!(quantize_int8(&[0.0; 8]), (vec![0; 8], 0.0));
        let (q, d) = quantize_int8(&[1.0, f32::NAN, -1.0, 0.5]);
        assert!(d.is_nan());
        assert_eq!(q, [127, 0, -127, 64]);
        let (q, d) = quantize_int8(&[1.0, f32::INFINITY, -1.0, 0.5]);
        assert_eq!((q, d), (vec![0; 4], f32::INFINITY));
        // 1 / d overflows: every value quantizes to 0.
        let tiny = f32::from_bits(1 << 21); // 2^-128, so d < 2^-134
        let (q, d) = quantize_int8(&[tiny, -tiny, 0.0]);
        assert!(d > 0.0 && (1.0 / d).is_infinite());
        assert_eq!(q, [0, 0, 0]);
    }

    /// W8A8 linears on hand-computed numbers: per block, with an offset, per row, a bias,
    /// and a non-finite weight scale.
    #[test]
    fn int8_linear_of_hand_computed_values() {
        // x: one row of 64, block 0 all 1.27 (d = 0.01, q = 127), block 1 all -0.254 (d =
        // 0.002, q = -127). W: 2 rows; weights [1; 32] then [2; 32], scales 0.5, 0.25.
        let mut xs = vec![1.27f32; 32];
        xs.extend([-0.254f32; 32]);
        let x = Tensor::new(vec![1, 64], xs);
        let (d0, d1) = (1.27f32 / 127.0, 0.254f32 / 127.0);
        let mut w = IntWeight {
            n: 2,
            k: 64,
            w: [[1i8; 32], [2; 32], [-3; 32], [0; 32]].concat(),
            d: vec![0.5, 0.25, 1.0, 1.0],
            m: None,
        };
        let acc0 = (0.25 * d1).mul_add((-127 * 2 * 32) as f32, (0.5 * d0).mul_add((127 * 32) as f32, 0.0));
        let acc1 = (1.0 * d1).mul_add(0.0, (1.0 * d0).mul_add((127 * -3 * 32) as f32, 0.0));
        let b = Tensor::new(vec![2], vec![0.125, -1.0]);
        let y = linear_int8(&x, &w, Some(&b), false);
        assert_eq!(y.shape, [1, 2]);
        assert_eq!(y.data, [acc0 + 0.125, acc1 - 1.0]);
        // An offset per block adds m * d * sum(q).
        w.m = Some(vec![0.0625, 0.0, 0.0, -0.5]);
        let s0 = d0 * (127 * 32) as f32;
        let s1 = -d1 * (127 * 32) as f32;
        let block0 = 0.0625f32.mul_add(s0, (0.5 * d0).mul_add((127 * 32) as f32, 0.0));
        let with_m = 0.0f32.mul_add(s1, (0.25 * d1).mul_add((-127 * 2 * 32) as f32, block0));
        assert_eq!(linear_int8(&x, &w, None, false).data[0], with_m);
        // Per row: one scale over the row (amax 1.27, so block 1 quantizes to -25.4 -> -25).
        let w = IntWeight { n: 1, k: 64, w: vec![1; 64], d: vec![0.5, 0.5], m: None };
        let y = linear_int8(&x, &w, None, true);
        assert_eq!(y.data, [(0.5 * d0) * ((127 - 25) * 32) as f32]);
        // A non-finite weight scale makes its row NaN under blocks.
        let w = IntWeight { n: 2, k: 64, w: vec![1; 128], d: vec![1.0, f32::INFINITY, 1.0, 1.0], m: None };
        let y = linear_int8(&x, &w, None, false);
        assert!(y.data[0].is_nan() && y.data[1].is_finite(), "{:?}", y.data);
    }

    #[test]
    fn gram_is_x_transpose_x() {
        for (m, k) in [(5, 37), (1, 1), (3, 9), (64, 130)] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 23) as f32 - 11.0) / 8.0).collect();
            let mut g = vec![f32::NAN; k * k];
            gram(&x, k, &mut g);
            for i in 0..k {
                for j in 0..k {
                    let want: f64 = (0..m).map(|r| x[r * k + i] as f64 * x[r * k + j] as f64).sum();
                    assert!(
                        (g[i * k + j] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "({i}, {j}) of {m} x {k}"
                    );
                }
            }
        }
        let mut g = vec![f32::NAN; 4];
        gram(&[], 2, &mut g);
        assert_eq!(g, [0.0; 4]);
    }

    /// `a^T b` of two different matrices: not symmetric, so a transposed or mirrored
    /// result fails.
    #[test]
    fn cross_gram_is_a_transpose_b() {
        for (m, k) in [(5, 37), (1, 1), (3, 9), (64, 130)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919 % 23) as f32 - 11.0) / 8.0).collect();
            let b: Vec<f32> = (0..m * k).map(|i| ((i * 104729 % 19) as f32 - 7.0) / 4.0).collect();
            let mut c = vec![f32::NAN; k * k];
            cross_gram(&a, &b, k, &mut c);
            for i in 0..k {
                for j in 0..k {
                    let want: f64 = (0..m).map(|r| a[r * k + i] as f64 * b[r * k + j] as f64).sum();
                    assert!(
                        (c[i * k + j] as f64 - want).abs() <= 1e-4 * want.abs().max(1.0),
                        "({i}, {j}) of {m} x {k}"
                    );
                }
            }
        }
    }
    use proptest::prelude::*;

    // ---- test utilities ----------------------------------------------------------------

    /// splitmix64 -> uniform f32 in [-1, 1)
    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
        fn uniform(&mut self) -> f32 {
            ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }

    fn rand_tensor(shape: &[usize], seed: u64, scale: f32) -> Tensor {
        let mut rng = Rng(seed);
        let n = shape.iter().product();
        Tensor::new(shape, (0..n).map(|_| rng.uniform() * scale).collect())
    }

    fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for d in (0..shape.len()).rev() {
            idx[d] = i % shape[d];
            i /= shape[d];
        }
        idx
    }

    fn ravel(idx: &[usize], shape: &[usize]) -> usize {
        assert_eq!(idx.len(), shape.len());
        let mut flat = 0;
        for (&i, &d) in idx.iter().zip(shape) {
            assert!(i < d);
            flat = flat * d + i;
        }
        flat
    }

    /// Flat index into `shape` (right-aligned, size-1 dims broadcast) for output index `idx`.
    fn bcast_index(idx: &[usize], shape: &[usize]) -> usize {
        let off = idx.len() - shape.len();
        let sub: Vec<usize> = shape.iter().enumerate().map(|(k, &d)| if d == 1 { 0 } else { idx[off + k] }).collect();
        ravel(&sub, shape)
    }

    fn ref_bshape(a: &[usize], b: &[usize]) -> Vec<usize> {
        let r = a.len().max(b.len());
        let pa: Vec<usize> = std::iter::repeat_n(1, r - a.len()).chain(a.iter().copied()).collect();
        let pb: Vec<usize> = std::iter::repeat_n(1, r - b.len()).chain(b.iter().copied()).collect();
        pa.iter()
            .zip(&pb)
            .map(|(&x, &y)| {
                assert!(x == y || x == 1 || y == 1);
                if x == 1 { y } else { x }
            })
            .collect()
    }

    #[track_caller]
    fn assert_close(got: &Tensor, shape: &[usize], want: &[f64], atol: f64, rtol: f64) {
        assert_eq!(got.shape, shape, "shape");
        assert_eq!(got.data.len(), want.len(), "len");
        for (i, (&g, &w)) in got.data.iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || (g as f64 - w).abs() <= atol + rtol * w.abs();
            assert!(ok, "element {i} (index {:?}): got {g}, want {w}", unravel(i, shape));
        }
    }

    /// A shape that broadcasts to a suffix of `out`: the last `len` dims, with the dims whose
    /// `ones` flag is set replaced by 1.
    fn sub_shape(out: &[usize], len: usize, ones: &[bool]) -> Vec<usize> {
        let len = len.min(out.len());
        out[out.len() - len..].iter().zip(ones).map(|(&d, &one)| if one { 1 } else { d }).collect()
    }

    // ---- linear / matmul ---------------------------------------------------------------

    fn ref_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> (Vec<usize>, Vec<f64>) {
        let (n, k) = (w.shape[0], w.shape[1]);
        let lead = &x.shape[..x.shape.len() - 1];
        let m: usize = lead.iter().product();
        let mut out = Vec::new();
        for r in 0..m {
            for j in 0..n {
                let mut acc = b.map_or(0.0, |b| b.data[j] as f64);
                for p in 0..k {
                    acc += x.data[r * k + p] as f64 * w.data[j * k + p] as f64;
                }
                out.push(acc);
            }
        }
        let mut shape = lead.to_vec();
        shape.push(n);
        (shape, out)
    }

    fn check_linear(lead: &[usize], k: usize, n: usize, bias: bool, seed: u64) {
        let mut xs = lead.to_vec();
        xs.push(k);
        let x = rand_tensor(&xs, seed, 1.0);
        let w = rand_tensor(&[n, k], seed ^ 1, 1.0);
        let b = rand_tensor(&[n], seed ^ 2, 1.0);
        let b = bias.then_some(&b);
        let (shape, want) = ref_linear(&x, &w, b);
        assert_close(&linear(&x, &w, b), &shape, &want, 1e-5, 1e-5);
    }

    fn ref_matmul(a: &Tensor, b: &Tensor) -> (Vec<usize>, Vec<f64>) {
        let (ra, rb) = (a.shape.len(), b.shape.len());
        let (m, k, n) = (a.shape[ra - 2], a.shape[ra - 1], b.shape[rb - 1]);
        let batch = ref_bshape(&a.shape[..ra - 2], &b.shape[..rb - 2]);
        let mut shape = batch.clone();
        shape.extend([m, n]);
        let total: usize = shape.iter().product();
        let mut out = Vec::new();
        for o in 0..total {
            let idx = unravel(o, &shape);
            let (bidx, i, j) = (&idx[..batch.len()], idx[batch.len()], idx[batch.len() + 1]);
            let mut acc = 0f64;
            for p in 0..k {
                let mut ia = bidx.to_vec();
                ia.extend([i, p]);
                let mut ib = bidx.to_vec();
                ib.extend([p, j]);
                acc += a.data[bcast_index(&ia, &a.shape)] as f64 * b.data[bcast_index(&ib, &b.shape)] as f64;
            }
            out.push(acc);
        }
        (shape, out)
    }

    /// `exp_nonpositive` against f64 `exp` over the whole range it serves, within 2 ulp.
    #[test]
    fn exp_nonpositive_is_within_two_ulp() {
        let mut xs: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 88.0 / 200_000.0).collect();
        xs.extend([0.0, -0.0, -1e-30, -87.2, -87.32, -87.34, -100.0, f32::NEG_INFINITY]);
        let mut got = xs.clone();
        exp_nonpositive(&mut got);
        for (&x, &g) in xs.iter().zip(&got) {
            let want = (x as f64).exp();
            if x < -87.33 {
                assert_eq!(g, 0.0, "exp({x})");
                continue;
            }
            // (near the bottom of the range, results are subnormal: absolute precision)
            let ulp = ((want as f32).abs() * f32::EPSILON).max(f32::from_bits(1));
            assert!(((g as f64) - want).abs() <= 2.0 * ulp as f64, "exp({x}) = {g}, want {want}");
        }
    }

    /// `linear_rows` matches a naive f64 reference, and rows computed in separate calls
    /// (a thread split, a batch) are bitwise the rows of one call.
    #[test]
    fn linear_rows_is_split_invariant() {
        for (m, k, n) in [(1, 7, 5), (7, 384, 33), (13, 64, 130)] {
            let x = rand_tensor(&[m, k], 1, 1.0);
            let w = rand_tensor(&[n, k], 2, 1.0);
            let b = rand_tensor(&[n], 3, 1.0);
            let mut whole = vec![0f32; m * n];
            linear_rows(&x.data, k, &w.data, n, Some(&b.data), &mut whole);
            for r in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|p| x.data[r * k + p] as f64 * w.data[j * k + p] as f64).sum::<f64>()
                        + b.data[j] as f64;
                    assert!((whole[r * n + j] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "({m},{k},{n})");
                }
            }
            for r in 0..m {
                let mut one = vec![0f32; n];
                linear_rows(&x.data[r * k..][..k], k, &w.data, n, Some(&b.data), &mut one);
                assert!(one.iter().zip(&whole[r * n..]).all(|(a, b)| a.to_bits() == b.to_bits()), "row {r} alone");
            }
        }
    }

    #[test]
    fn linear_gemv_and_edge_cases() {
        // m == 1 takes the GEMV path; large enough to run in parallel
        check_linear(&[1], 600, 515, true, 11);
        check_linear(&[], 600, 515, false, 12);
        check_linear(&[1, 1], 33, 17, true, 13);
        // big gemm (matrixmultiply threading)
        check_linear(&[2, 64], 96, 130, true, 14);
        // empty batch / empty in-dim
        check_linear(&[0], 5, 3, true, 15);
        let x = Tensor::zeros([3, 0]);
        let w = Tensor::zeros([4, 0]);
        let b = Tensor::new([4], vec![1.0, 2.0, 3.0, 4.0]);
        let y = linear(&x, &w, Some(&b));
        assert_eq!(y.shape, vec![3, 4]);
        assert_eq!(&y.data[4..8], &[1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn matmul_paths() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[2, 3, 5, 7], &[7, 4]),       // folded into one gemm
            (&[3, 5, 7], &[1, 1, 7, 4]),    // folded, extra leading 1s
            (&[5, 7], &[3, 7, 4]),          // a broadcast over b's batch
            (&[2, 1, 5, 7], &[1, 3, 7, 4]), // both broadcast
            (&[2, 5, 200], &[2, 200, 180]), // big per-batch: sequential path
            (&[4, 3, 0], &[4, 0, 6]),       // k == 0 -> zeros
        ];
        for (i, (sa, sb)) in cases.iter().enumerate() {
            let a = rand_tensor(sa, 100 + i as u64, 1.0);
            let b = rand_tensor(sb, 200 + i as u64, 1.0);
            let (shape, want) = ref_matmul(&a, &b);
            assert_close(&matmul(&a, &b), &shape, &want, 1e-5, 1e-5);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn prop_linear(lead in prop::collection::vec(1usize..5, 0..3), k in 1usize..40,
                       n in 1usize..40, bias: bool, seed: u64) {
            check_linear(&lead, k, n, bias, seed);
        }

        #[test]
        fn prop_matmul(batch in prop::collection::vec(1usize..4, 0..=3),
                       la in 0usize..=3, lb in 0usize..=3,
                       oa in prop::collection::vec(any::<bool>(), 3),
                       ob in prop::collection::vec(any::<bool>(), 3),
                       m in 1usize..9, k in 1usize..20, n in 1usize..9, seed: u64) {
            let mut sa = sub_shape(&batch, la, &oa);
            sa.extend([m, k]);
            let mut sb = sub_shape(&batch, lb, &ob);
            sb.extend([k, n]);
            let a = rand_tensor(&sa, seed, 1.0);
            let b = rand_tensor(&sb, seed ^ 7, 1.0);
            let (shape, want) = ref_matmul(&a, &b);
            assert_close(&matmul(&a, &b), &shape, &want, 1e-5, 1e-5);
        }
    }

    // ---- binary ------------------------------------------------------------------------

    const BINARY_OPS: [BinaryOp; 7] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Pow];

    fn ref_apply(op: BinaryOp, x: f32, y: f32) -> f32 {
        match op {
            BinaryOp::Add => x + y,
            BinaryOp::Sub => x - y,
            BinaryOp::Mul => x * y,
            BinaryOp::Div => x / y,
            BinaryOp::Max if x.is_nan() || y.is_nan() => f32::NAN,
            BinaryOp::Min if x.is_nan() || y.is_nan() => f32::NAN,
            BinaryOp::Max => {
                if x >= y {
                    x
                } else {
                    y
                }
            }
            BinaryOp::Min => {
                if x <= y {
                    x
                } else {
                    y
                }
            }
            BinaryOp::Pow => x.powf(y),
        }
    }

    /// f32 ops are evaluated identically, so the comparison is exact (NaN == NaN).
    fn check_binary(op: BinaryOp, a: &Tensor, b: &Tensor) {
        let shape = ref_bshape(&a.shape, &b.shape);
        let total: usize = shape.iter().product();
        let got = binary(op, a, b);
        assert_eq!(got.shape, shape, "{op:?} {:?} {:?}", a.shape, b.shape);
        for o in 0..total {
            let idx = unravel(o, &shape);
            let want = ref_apply(op, a.data[bcast_index(&idx, &a.shape)], b.data[bcast_index(&idx, &b.shape)]);
            let g = got.data[o];
            assert!(
                g == want || (g.is_nan() && want.is_nan()),
                "{op:?} {:?} {:?} at {idx:?}: got {g}, want {want}",
                a.shape,
                b.shape
            );
        }
    }

    #[test]
    fn binary_fast_paths_and_nan() {
        let cases: &[(&[usize], &[usize])] = &[
            (&[3, 5], &[3, 5]),             // same shape
            (&[3, 5], &[]),                 // scalar
            (&[], &[3, 5]),                 // scalar on the left
            (&[3, 5], &[1, 1]),             // scalar-like
            (&[2, 3, 5], &[5]),             // bias suffix
            (&[2, 3, 5], &[1, 3, 5]),       // suffix with leading 1
            (&[5], &[2, 3, 5]),             // suffix on the left
            (&[2, 3, 5], &[3, 1]),          // column broadcast
            (&[4, 1], &[1, 6]),             // outer product
            (&[2, 3, 4, 5], &[2, 1, 1, 5]), // attention-mask-like
            (&[], &[]),
            (&[0, 3], &[3]), // empty
        ];
        for (i, (sa, sb)) in cases.iter().enumerate() {
            let a = rand_tensor(sa, 300 + i as u64, 2.0);
            let b = rand_tensor(sb, 400 + i as u64, 2.0);
            for op in BINARY_OPS {
                check_binary(op, &a, &b);
            }
        }
        let a = Tensor::new([3], vec![f32::NAN, 1.0, 2.0]);
        let b = Tensor::new([3], vec![0.0, f32::NAN, 1.0]);
        for op in [BinaryOp::Max, BinaryOp::Min] {
            let y = binary(op, &a, &b);
            assert!(y.data[0].is_nan() && y.data[1].is_nan(), "{op:?} must propagate NaN");
            assert_eq!(y.data[2], if op == BinaryOp::Max { 2.0 } else { 1.0 });
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_binary(out in prop::collection::vec(1usize..5, 0..=4),
                       la in 0usize..=4, lb in 0usize..=4,
                       oa in prop::collection::vec(any::<bool>(), 4),
                       ob in prop::collection::vec(any::<bool>(), 4),
                       op in 0usize..7, seed: u64) {
            let a = rand_tensor(&sub_shape(&out, la, &oa), seed, 2.0);
            let b = rand_tensor(&sub_shape(&out, lb, &ob), seed ^ 3, 2.0);
            check_binary(BINARY_OPS[op], &a, &b);
            check_binary(BINARY_OPS[op], &b, &a);
        }
    }

    // ---- unary / erf -------------------------------------------------------------------

    /// erf by the everywhere-positive series erf(x) = 2/sqrt(pi) e^{-x^2} sum (2x^2)^n x / (2n+1)!!
    fn erf_series(x: f64) -> f64 {
        let ax = x.abs();
        let (mut term, mut sum, mut n) = (ax, 0.0, 0.0);
        while term > 1e-19 * sum || n < 5.0 {
            sum += term;
            n += 1.0;
            term *= 2.0 * ax * ax / (2.0 * n + 1.0);
        }
        (std::f64::consts::FRAC_2_SQRT_PI * (-ax * ax).exp() * sum).copysign(x)
    }

    /// erfc by its continued fraction (x >= 2), evaluated bottom-up.
    fn erfc_cf(x: f64) -> f64 {
        let mut f = x;
        for k in (1..=4000).rev() {
            f = x + (k as f64 / 2.0) / f;
        }
        (-x * x).exp() / std::f64::consts::PI.sqrt() / f
    }

    #[test]
    fn erf_known_values() {
        // (x, erf(x)) from mpmath at 30 digits
        let table = [
            (0.5, 0.520_499_877_813_046_537_68),
            (1.0, 0.842_700_792_949_714_869_34),
            (2.0, 0.995_322_265_018_952_734_16),
            (-3.0, -0.999_977_909_503_001_414_56),
            (1e-4, 1.128_379_163_334_248_748_9e-4),
            (0.999_999, 0.842_700_377_841_802_329_17),
            (1.000_000_1, 0.842_700_834_460_460_484_56),
            (1.5, 0.966_105_146_475_310_727_07),
            (1.999_999_9, 0.995_322_262_952_253_784_21),
            (2.5, 0.999_593_047_982_555_041_06),
            (3.7, 0.999_999_832_848_942_090_85),
            (-0.75, -0.711_155_633_653_515_131_6),
        ];
        for (x, want) in table {
            let got = erf(x);
            assert!(((got - want) / want).abs() < 1e-15, "erf({x}) = {got}, want {want}");
            assert_eq!(erf(x as f32 as f64) as f32, want as f32, "f32 erf({x})");
        }
        // (x, erfc(x))
        let table = [
            (0.3, 0.671_373_240_540_872_583_81),
            (1.0, 0.157_299_207_050_285_130_66),
            (1.5, 0.033_894_853_524_689_272_933),
            (2.0, 0.004_677_734_981_047_265_837_9),
            (3.0, 2.209_049_699_858_544_137_3e-5),
            (5.0, 1.537_459_794_428_034_850_2e-12),
            (10.0, 2.088_487_583_762_544_757e-45),
            (20.0, 5.395_865_611_607_900_928_9e-176),
            (-1.0, 1.842_700_792_949_714_869_3),
            (-2.5, 1.999_593_047_982_555_041_1),
        ];
        for (x, want) in table {
            let got = erfc(x);
            assert!(((got - want) / want).abs() < 1e-14, "erfc({x}) = {got}, want {want}");
        }
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f64::INFINITY), 1.0);
        assert_eq!(erf(f64::NEG_INFINITY), -1.0);
        assert_eq!(erfc(f64::INFINITY), 0.0);
        assert_eq!(erfc(f64::NEG_INFINITY), 2.0);
        assert!(erf(f64::NAN).is_nan() && erfc(f64::NAN).is_nan());
    }

    #[test]
    fn erf_matches_independent_references() {
        for i in -6000..=6000 {
            let x = i as f64 * 1e-3;
            let (got, want) = (erf(x), erf_series(x));
            assert!((got - want).abs() <= 2e-15 * want.abs() + 1e-300, "erf({x}) = {got}, series {want}");
        }
        for i in 0..=2400 {
            let x = 2.0 + i as f64 * 1e-2;
            let (got, want) = (erfc(x), erfc_cf(x));
            assert!(((got - want) / want).abs() <= 2e-15, "erfc({x}) = {got}, cf {want}");
        }
    }

    #[test]
    fn gelu_values() {
        assert!((gelu(1.0) as f64 - 0.841_344_746_068_542_9).abs() < 1e-7);
        // mpmath: 0.5 x erfc(-x/sqrt 2)
        let table = [
            (1.0, 0.841_344_746_068_542_948_59),
            (-1.0, -0.158_655_253_931_457_051_41),
            (0.5, 0.345_731_230_637_006_551_82),
            (3.0, 2.995_950_305_905_109_716_4),
            (-3.0, -0.004_049_694_094_890_283_58),
            (-8.0, -4.976_768_459_417_427_298_8e-15),
            (-12.0, -2.131_778_534_493_214_797_2e-32),
        ];
        for (x, want) in table {
            let got = gelu(x as f32) as f64;
            assert!(((got - want) / want).abs() < 1.2e-7, "gelu({x}) = {got}, want {want}");
        }
        assert_eq!(gelu(0.0), 0.0);
        let t = unary(UnaryOp::Gelu, &Tensor::new([2], vec![1.0, -1.0]));
        assert_eq!(t.data, vec![gelu(1.0), gelu(-1.0)]);
    }

    #[test]
    fn unary_vs_f64_reference() {
        // a grid plus a large random tensor (exercises the parallel path)
        let mut vals: Vec<f32> = (-1200..=1200).map(|i| i as f32 * 0.005).collect();
        vals.extend(rand_tensor(&[PAR_MIN_ELEMS + 17], 5, 8.0).data);
        let x = Tensor::new([vals.len()], vals);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let gelu_ref = |v: f64| {
            let y = v / 2f64.sqrt();
            // 1 + erf(y) = erfc(-y); use the continued fraction where 1 + erf cancels
            0.5 * v * if y < -2.0 { erfc_cf(-y) } else { 1.0 + erf_series(y) }
        };
        type Ref = fn(f64) -> f64;
        let cases: Vec<(UnaryOp, Box<dyn Fn(f64) -> f64>, f64)> = vec![
            (UnaryOp::Neg, Box::new(|v| -v), 0.0),
            (UnaryOp::Exp, Box::new(f64::exp), 3e-7),
            (UnaryOp::Log, Box::new(f64::ln), 3e-7),
            (UnaryOp::Sqrt, Box::new(f64::sqrt as Ref), 1.2e-7),
            (UnaryOp::Rsqrt, Box::new(|v| 1.0 / v.sqrt()), 1.2e-7),
            (UnaryOp::Recip, Box::new(|v| 1.0 / v), 1.2e-7),
            (UnaryOp::Tanh, Box::new(f64::tanh), 3e-7),
            (UnaryOp::Sigmoid, Box::new(sig), 3e-7),
            (UnaryOp::Relu, Box::new(|v| v.max(0.0)), 0.0),
            (UnaryOp::Silu, Box::new(move |v| v * sig(v)), 3e-7),
            (UnaryOp::Gelu, Box::new(gelu_ref), 1.2e-7),
        ];
        for (op, f, rtol) in cases {
            let y = unary(op, &x);
            assert_eq!(y.shape, x.shape);
            for (&v, &g) in x.data.iter().zip(&y.data) {
                let w = f(v as f64);
                if w.is_nan() {
                    assert!(g.is_nan(), "{op:?}({v}) = {g}, want NaN");
                    continue;
                }
                // the reference is exact up to f64 rounding; allow rtol plus f32 underflow
                let ok = g as f64 == w || (g as f64 - w).abs() <= rtol * w.abs() + 1e-38;
                assert!(ok, "{op:?}({v}) = {g}, want {w}");
            }
        }
        let nan = Tensor::new([1], vec![f32::NAN]);
        assert!(unary(UnaryOp::Relu, &nan).data[0].is_nan());
        let big = Tensor::new([2], vec![-200.0, 200.0]);
        assert_eq!(unary(UnaryOp::Sigmoid, &big).data, vec![0.0, 1.0]);
    }

    // ---- softmax / norms ---------------------------------------------------------------

    fn ref_softmax(x: &Tensor, axis: usize) -> Vec<f64> {
        let total = x.data.len();
        let mut out = vec![0f64; total];
        for o in 0..total {
            let idx = unravel(o, &x.shape);
            let along = |l: usize| {
                let mut j = idx.clone();
                j[axis] = l;
                x.data[ravel(&j, &x.shape)] as f64
            };
            let n = x.shape[axis];
            let mx = (0..n).map(along).fold(f64::NEG_INFINITY, f64::max);
            let den: f64 = (0..n).map(|l| (along(l) - mx).exp()).sum();
            out[o] = (along(idx[axis]) - mx).exp() / den;
        }
        out
    }

    #[test]
    fn softmax_hand_and_large() {
        let y = softmax(&Tensor::new([2], vec![0.0, 3f32.ln()]), 0);
        assert_close(&y, &[2], &[0.25, 0.75], 1e-7, 0.0);
        // stability: huge logits
        let y = softmax(&Tensor::new([3], vec![1000.0, 1000.0, -1000.0]), 0);
        assert_close(&y, &[3], &[0.5, 0.5, 0.0], 1e-7, 0.0);
        // parallel paths, last and non-last axis
        for (shape, axis) in [(vec![70, 600], 1), (vec![3, 70, 200], 1)] {
            let x = rand_tensor(&shape, 9, 10.0);
            assert_close(&softmax(&x, axis), &shape, &ref_softmax(&x, axis), 1e-7, 1e-6);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn prop_softmax(shape in prop::collection::vec(1usize..7, 1..=4), axis in 0usize..4,
                        seed: u64) {
            let axis = axis % shape.len();
            let x = rand_tensor(&shape, seed, 8.0);
            assert_close(&softmax(&x, axis), &shape, &ref_softmax(&x, axis), 1e-7, 1e-6);
        }
    }

    fn ref_layer_norm(x: &Tensor, g: &Tensor, b: &Tensor, eps: f64) -> Vec<f64> {
        let d = *x.shape.last().unwrap();
        let mut out = Vec::new();
        for r in 0..x.data.len() / d {
            let row: Vec<f64> = (0..d).map(|j| x.data[r * d + j] as f64).collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            for j in 0..d {
                out.push((row[j] - mean) / (var + eps).sqrt() * g.data[j] as f64 + b.data[j] as f64);
            }
        }
        out
    }

    #[test]
    fn layer_norm_hand_and_random() {
        let x = Tensor::new([1, 4], vec![1.0, 2.0, 3.0, 4.0]);
        let y = layer_norm(&x, &Tensor::full([4], 1.0), &Tensor::zeros([4]), 0.0);
        assert_close(&y, &[1, 4], &[-1.3416407, -0.4472136, 0.4472136, 1.3416407], 1e-6, 0.0);
        for (shape, seed) in [(vec![3, 5, 7], 1), (vec![1], 2), (vec![128, 384], 3), (vec![2, 0, 4], 4)] {
            let d = *shape.last().unwrap();
            let x = rand_tensor(&shape, seed, 3.0);
            let (g, b) = (rand_tensor(&[d], seed + 10, 1.0), rand_tensor(&[d], seed + 20, 1.0));
            let want = ref_layer_norm(&x, &g, &b, 1e-5);
            assert_close(&layer_norm(&x, &g, &b, 1e-5), &shape, &want, 1e-6, 1e-6);
        }
    }

    #[test]
    fn rms_norm_random() {
        let x = Tensor::new([2], vec![3.0, 4.0]);
        let y = rms_norm(&x, &Tensor::full([2], 2.0), 0.0);
        let r = (12.5f64).sqrt();
        assert_close(&y, &[2], &[6.0 / r, 8.0 / r], 1e-6, 0.0);
        for (shape, seed) in [(vec![3, 5, 7], 1), (vec![128, 576], 2)] {
            let d = *shape.last().unwrap();
            let x = rand_tensor(&shape, seed, 3.0);
            let g = rand_tensor(&[d], seed + 10, 1.0);
            let eps = 1e-5;
            let mut want = Vec::new();
            for r in 0..x.data.len() / d {
                let ms = (0..d).map(|j| (x.data[r * d + j] as f64).powi(2)).sum::<f64>() / d as f64;
                for j in 0..d {
                    want.push(x.data[r * d + j] as f64 / (ms + eps).sqrt() * g.data[j] as f64);
                }
            }
            assert_close(&rms_norm(&x, &g, eps as f32), &shape, &want, 1e-6, 1e-6);
        }
    }

    // ---- rope --------------------------------------------------------------------------

    fn ref_rope(x: &Tensor, theta: f64, interleaved: bool, offset: usize) -> Vec<f64> {
        let (b, s, h, d) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3]);
        let mut out: Vec<f64> = x.data.iter().map(|&v| v as f64).collect();
        for bi in 0..b {
            for si in 0..s {
                for hi in 0..h {
                    for i in 0..d / 2 {
                        let p = (offset + si) as f64;
                        let angle = p * (-((2 * i) as f64) / d as f64 * theta.ln()).exp();
                        let (ia, ib) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + d / 2) };
                        let fa = ravel(&[bi, si, hi, ia], &x.shape);
                        let fb = ravel(&[bi, si, hi, ib], &x.shape);
                        let (va, vb) = (x.data[fa] as f64, x.data[fb] as f64);
                        out[fa] = va * angle.cos() - vb * angle.sin();
                        out[fb] = va * angle.sin() + vb * angle.cos();
                    }
                }
            }
        }
        out
    }

    #[test]
    fn rope_hand() {
        let x = rand_tensor(&[2, 1, 3, 8], 1, 1.0);
        for inter in [false, true] {
            // position 0 is the identity
            assert_eq!(rope(&x, 10000.0, inter, 0), x);
            // d = 2 at position 1 rotates (1, 0) by exactly 1 radian
            let y = rope(&Tensor::new([1, 2, 1, 2], vec![5.0, 5.0, 1.0, 0.0]), 10000.0, inter, 0);
            assert_close(&y, &[1, 2, 1, 2], &[5.0, 5.0, 1f64.cos(), 1f64.sin()], 1e-7, 0.0);
        }
        // the two layouts differ for d >= 4
        let x = rand_tensor(&[1, 2, 1, 4], 2, 1.0);
        assert_ne!(rope(&x, 10.0, true, 3), rope(&x, 10.0, false, 3));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn prop_rope(b in 1usize..3, s in 1usize..6, h in 1usize..4, half in 1usize..7,
                     th in 0usize..3, inter: bool, offset in 0usize..60, seed: u64) {
            let theta = [100.0, 10000.0, 500000.0][th];
            let shape = [b, s, h, 2 * half];
            let x = rand_tensor(&shape, seed, 1.0);
            let want = ref_rope(&x, theta as f64, inter, offset);
            assert_close(&rope(&x, theta, inter, offset), &shape, &want, 1e-6, 1e-6);
        }
    }

    // ---- gather / movement -------------------------------------------------------------

    #[test]
    fn gather_ok_and_errors() {
        let table = Tensor::new([3, 2], vec![0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        let y = gather(&table, &[2, 0, 1, 2], &[2, 2]).unwrap();
        assert_eq!(y.shape, vec![2, 2, 2]);
        assert_eq!(y.data, vec![20.0, 21.0, 0.0, 1.0, 10.0, 11.0, 20.0, 21.0]);
        assert_eq!(gather(&table, &[0, 3], &[2]).unwrap_err(), KernelError::IdOutOfRange { id: 3, n: 3 });
        assert_eq!(gather(&table, &[-1], &[1]).unwrap_err(), KernelError::IdOutOfRange { id: -1, n: 3 });
        assert!(gather(&table, &[i64::MAX], &[1]).is_err());
        assert_eq!(gather(&table, &[], &[0]).unwrap().shape, vec![0, 2]);
    }

    #[test]
    fn reshape_slice_concat() {
        let x = rand_tensor(&[2, 3, 4], 1, 1.0);
        let r = reshape(&x, &[6, 4]);
        assert_eq!((r.shape.clone(), &r.data), (vec![6, 4], &x.data));
        for axis in 0..3 {
            let n = x.shape[axis];
            for start in 0..=n {
                for end in start..=n {
                    let y = slice(&x, axis, start, end);
                    let mut shape = x.shape.clone();
                    shape[axis] = end - start;
                    assert_eq!(y.shape, shape);
                    for (o, &v) in y.data.iter().enumerate() {
                        let mut idx = unravel(o, &shape);
                        idx[axis] += start;
                        assert_eq!(v, x.data[ravel(&idx, &x.shape)]);
                    }
                }
            }
            // concat of the pieces [0, 1), [1, n) and an empty one gives x back; and a
            // concat of three distinct tensors matches the naive definition
            let parts = [slice(&x, axis, 0, 1), slice(&x, axis, 1, 1), slice(&x, axis, 1, n)];
            assert_eq!(concat(&[&parts[0], &parts[1], &parts[2]], axis), x);
            let mut sy = x.shape.clone();
            sy[axis] = 2;
            let y = rand_tensor(&sy, 2, 1.0);
            let c = concat(&[&y, &x, &y], axis);
            let mut sc = x.shape.clone();
            sc[axis] = n + 4;
            assert_eq!(c.shape, sc);
            for (o, &v) in c.data.iter().enumerate() {
                let mut idx = unravel(o, &sc);
                let want = if idx[axis] < 2 {
                    y.data[ravel(&idx, &sy)]
                } else if idx[axis] < 2 + n {
                    idx[axis] -= 2;
                    x.data[ravel(&idx, &x.shape)]
                } else {
                    idx[axis] -= 2 + n;
                    y.data[ravel(&idx, &sy)]
                };
                assert_eq!(v, want);
            }
        }
    }

    fn check_transpose(x: &Tensor, perm: &[usize]) {
        let y = transpose(x, perm);
        let shape: Vec<usize> = perm.iter().map(|&p| x.shape[p]).collect();
        assert_eq!(y.shape, shape);
        for (o, &v) in y.data.iter().enumerate() {
            let j = unravel(o, &shape);
            let mut i = vec![0; perm.len()];
            for (a, &p) in perm.iter().enumerate() {
                i[p] = j[a];
            }
            assert_eq!(v, x.data[ravel(&i, &x.shape)], "perm {perm:?} at {j:?}");
        }
    }

    #[test]
    fn transpose_common() {
        let x = rand_tensor(&[2, 5, 3, 4], 1, 1.0);
        check_transpose(&x, &[0, 2, 1, 3]); // [b,s,h,d] -> [b,h,s,d]
        check_transpose(&x, &[0, 1, 3, 2]); // k^T
        check_transpose(&x, &[3, 2, 1, 0]);
        check_transpose(&rand_tensor(&[37, 53], 2, 1.0), &[1, 0]);
        check_transpose(&rand_tensor(&[0, 3], 3, 1.0), &[1, 0]);
        check_transpose(&Tensor::scalar(3.0), &[]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_transpose((shape, perm) in prop::collection::vec(1usize..5, 0..=5)
                              .prop_flat_map(|s| {
                                  let r = s.len();
                                  (Just(s), Just((0..r).collect::<Vec<_>>()).prop_shuffle())
                              }),
                          seed: u64) {
            check_transpose(&rand_tensor(&shape, seed, 1.0), &perm);
        }
    }

    // ---- reduce ------------------------------------------------------------------------

    fn ref_reduce(op: ReduceOp, x: &Tensor, axes: &[usize], keepdim: bool) -> (Vec<usize>, Vec<f64>) {
        let r = x.shape.len();
        let kshape: Vec<usize> = (0..r).map(|i| if axes.contains(&i) { 1 } else { x.shape[i] }).collect();
        let n: usize = kshape.iter().product();
        let mut acc = vec![
            match op {
                ReduceOp::Max => f64::NEG_INFINITY,
                _ => 0.0,
            };
            n
        ];
        let mut count = vec![0usize; n];
        for (f, &v) in x.data.iter().enumerate() {
            let mut idx = unravel(f, &x.shape);
            for &a in axes {
                idx[a] = 0;
            }
            let o = ravel(&idx, &kshape);
            count[o] += 1;
            let v = v as f64;
            acc[o] = match op {
                ReduceOp::Max if v.is_nan() || acc[o].is_nan() => f64::NAN,
                ReduceOp::Max => acc[o].max(v),
                _ => acc[o] + v,
            };
        }
        if op == ReduceOp::Mean {
            for (a, &c) in acc.iter_mut().zip(&count) {
                *a /= c as f64;
            }
        }
        let shape = if keepdim { kshape } else { (0..r).filter(|i| !axes.contains(i)).map(|i| x.shape[i]).collect() };
        (shape, acc)
    }

    #[test]
    fn reduce_edge_cases() {
        let x = Tensor::new([2, 2], vec![1.0, f32::NAN, 3.0, 4.0]);
        let y = reduce(ReduceOp::Max, &x, &[1], false);
        assert!(y.data[0].is_nan());
        assert_eq!(y.data[1], 4.0);
        let y = reduce(ReduceOp::Sum, &x, &[], true);
        assert!(y.shape == x.shape && y.data[2] == 3.0);
        let e = Tensor::zeros([3, 0]);
        assert_eq!(reduce(ReduceOp::Sum, &e, &[1], false).data, vec![0.0; 3]);
        assert_eq!(reduce(ReduceOp::Max, &e, &[1], true).data, vec![f32::NEG_INFINITY; 3]);
        let s = reduce(ReduceOp::Mean, &rand_tensor(&[4, 5], 1, 1.0), &[1, 0], false);
        assert_eq!(s.shape, Vec::<usize>::new());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_reduce(shape in prop::collection::vec(1usize..6, 1..=4),
                       which in prop::collection::vec(any::<bool>(), 4),
                       op in 0usize..3, keepdim: bool, rev: bool, seed: u64) {
            let op = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max][op];
            let mut axes: Vec<usize> = (0..shape.len()).filter(|&i| which[i]).collect();
            if rev {
                axes.reverse();
            }
            let x = rand_tensor(&shape, seed, 2.0);
            let (oshape, want) = ref_reduce(op, &x, &axes, keepdim);
            assert_close(&reduce(op, &x, &axes, keepdim), &oshape, &want, 1e-6, 1e-6);
        }
    }

    // ---- attention ---------------------------------------------------------------------

    fn ref_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&[f32]>, causal: bool, scale: f32) -> Vec<f64> {
        let (b, hq, s, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3]);
        let (hkv, t, dv) = (k.shape[1], k.shape[2], v.shape[3]);
        let mut out = vec![0f64; b * hq * s * dv];
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                for i in 0..s {
                    let allowed: Vec<usize> = (0..t)
                        .filter(|&j| mask.is_none_or(|m| m[bi * t + j] != 0.0))
                        .filter(|&j| !causal || j as isize <= i as isize + t as isize - s as isize)
                        .collect();
                    if allowed.is_empty() {
                        continue;
                    }
                    let score = |j: usize| {
                        (0..d)
                            .map(|p| {
                                q.data[ravel(&[bi, h, i, p], &q.shape)] as f64
                                    * k.data[ravel(&[bi, kh, j, p], &k.shape)] as f64
                            })
                            .sum::<f64>()
                            * scale as f64
                    };
                    let sc: Vec<f64> = allowed.iter().map(|&j| score(j)).collect();
                    let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let den: f64 = sc.iter().map(|x| (x - mx).exp()).sum();
                    for c in 0..dv {
                        let mut acc = 0.0;
                        for (&j, &x) in allowed.iter().zip(&sc) {
                            acc += (x - mx).exp() / den * v.data[ravel(&[bi, kh, j, c], &v.shape)] as f64;
                        }
                        out[ravel(&[bi, h, i, c], &[b, hq, s, dv])] = acc;
                    }
                }
            }
        }
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn check_attention(
        b: usize,
        hkv: usize,
        group: usize,
        s: usize,
        t: usize,
        d: usize,
        dv: usize,
        causal: bool,
        mask: Option<Vec<f32>>,
        scale: f32,
        seed: u64,
    ) {
        let hq = hkv * group;
        let q = rand_tensor(&[b, hq, s, d], seed, 1.0);
        let k = rand_tensor(&[b, hkv, t, d], seed ^ 1, 1.0);
        let v = rand_tensor(&[b, hkv, t, dv], seed ^ 2, 1.0);
        let want = ref_attention(&q, &k, &v, mask.as_deref(), causal, scale);
        let got = attention(&q, &k, &v, mask.as_deref(), causal, scale);
        assert_close(&got, &[b, hq, s, dv], &want, 2e-6, 1e-5);
    }

    #[test]
    fn attention_hand() {
        // masking a key is the same as removing it
        let q = rand_tensor(&[1, 2, 3, 4], 1, 1.0);
        let k = rand_tensor(&[1, 1, 5, 4], 2, 1.0);
        let v = rand_tensor(&[1, 1, 5, 3], 3, 1.0);
        let mask = [1.0, 1.0, 0.0, 1.0, 1.0];
        let masked = attention(&q, &k, &v, Some(&mask), false, 0.5);
        let keep = |x: &Tensor| concat(&[&slice(x, 2, 0, 2), &slice(x, 2, 3, 5)], 2);
        let removed = attention(&q, &keep(&k), &keep(&v), None, false, 0.5);
        assert_close(&masked, &[1, 2, 3, 3], &removed.data.iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-6, 1e-6);
        // a fully masked row (batch 1) gives zeros, batch 0 does not
        let q = rand_tensor(&[2, 2, 3, 4], 4, 1.0);
        let k = rand_tensor(&[2, 1, 2, 4], 5, 1.0);
        let v = rand_tensor(&[2, 1, 2, 3], 6, 1.0);
        let y = attention(&q, &k, &v, Some(&[1.0, 0.0, 0.0, 0.0]), false, 1.0);
        assert!(y.data[..18].iter().all(|&x| x != 0.0 && x.is_finite()));
        assert!(y.data[18..].iter().all(|&x| x == 0.0));
        // causal with t < s: the first query rows see no key at all -> zeros
        let q = rand_tensor(&[1, 1, 3, 4], 7, 1.0);
        let k = rand_tensor(&[1, 1, 2, 4], 8, 1.0);
        let v = rand_tensor(&[1, 1, 2, 2], 9, 1.0);
        let y = attention(&q, &k, &v, None, true, 1.0);
        assert_eq!(&y.data[..2], &[0.0, 0.0]);
        // row 1 sees only key 0 -> exactly v[0]
        assert_close(
            &slice(&slice(&y, 2, 1, 2), 3, 0, 2),
            &[1, 1, 1, 2],
            &[v.data[0] as f64, v.data[1] as f64],
            1e-7,
            0.0,
        );
        // no keys at all
        let e = attention(&q, &Tensor::zeros([1, 1, 0, 4]), &Tensor::zeros([1, 1, 0, 2]), None, false, 1.0);
        assert_eq!(e.data, vec![0.0; 6]);
    }

    #[test]
    fn attention_realistic_sizes() {
        // prefill (BERT/llama-like head sizes, GQA), and decode (s = 1 against a cache)
        let mut rng = Rng(3);
        let mask: Vec<f32> = (0..128).map(|_| if rng.uniform() > -0.8 { 1.0 } else { 0.0 }).collect();
        check_attention(1, 2, 2, 128, 128, 64, 64, true, None, 0.125, 1);
        check_attention(1, 3, 1, 128, 128, 32, 32, false, Some(mask.clone()), 32f32.powf(-0.5), 2);
        check_attention(1, 1, 3, 1, 128, 64, 64, true, Some(mask), 0.125, 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn prop_attention(b in 1usize..3, hkv in 1usize..3, group in 1usize..4,
                          s in 1usize..7, t in 0usize..9, d in 1usize..9, dv in 1usize..9,
                          causal: bool, masked: bool, scale in 0.1f32..2.0, seed: u64) {
            let mask = masked.then(|| {
                let mut rng = Rng(seed ^ 99);
                (0..b * t).map(|_| if rng.uniform() > -0.4 { 1.0 } else { 0.0 }).collect()
            });
            check_attention(b, hkv, group, s, t, d, dv, causal, mask, scale, seed);
        }
    }
}
