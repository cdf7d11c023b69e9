//! The GEMM of linears on f32 weights, `y[M, N] = x[M, K] W[N, K]^T`, in 256-bit AVX2,
//! reading `W` where it lies (the artifact's bytes, mapped): nothing is packed, not at
//! load and not per call.
//!
//! matrixmultiply's sgemm ran these before. It packs both operands on every call, and the
//! engine split the rows across threads, so every thread packed (transposed) all of `W`
//! on every call: a quarter of MiniLM's time at 1 x 128 (`perf record` on the MiniLM
//! program). Here `W[N, K]` and `x[M, K]` both have `K` contiguous, so the kernel takes
//! dot products along `K` directly, and threads split the columns (each reads only its
//! weights).
//!
//! # Contract
//!
//! [`sgemm`] writes, for rows `rows` and columns `cols` of `y`, `y[i, j] = s` where, with
//! `K8 = K - K % 8`:
//! 1. eight lane sums `acc[l] = fma(x[i, k], w[j, k], acc[l])` over `k = 8 t + l < K8`, `t`
//!    increasing, each from +0;
//! 2. `s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))`;
//! 3. `s = fma(x[i, k], w[j, k], s)` for `k = K8..K`, increasing.
//!
//! [`reference`] is this contract in scalar code, and the tests hold the kernel to it bit
//! for bit. An output's sum depends on `K` only, never on the rows and columns computed
//! with it, so any split across threads gives the same bits.
//!
//! # Code shape
//!
//! Tiles of 4 rows x 3 columns: twelve `f32x8` accumulators; per step of eight `k`, three
//! weight loads and four `x` loads feed twelve FMAs (16 registers in all). The accumulators
//! are reduced four at a time by two rounds of `hadd` and one add of the halves, which is
//! the order of step 2. Rows go in blocks of about 256 KB of `x`, and within them columns
//! in blocks of about 96 KB of weights: both stay in L2 while the tiles pass over them
//! (without the row blocks, MiniLM at 32 x 128 streamed all of `x` from memory once per
//! column block: 1534 ms, against ONNX Runtime's 1068-1118 in the same sitting).

use crate::ExecError;
use std::ops::Range;

/// Whether this CPU runs [`sgemm`] (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`sgemm`] with every length checked: `x` is `[M, K]`, `w` `[N, K]`, `y` `[M, N]`.
pub fn run(
    k: usize,
    n: usize,
    x: &[f32],
    w: &[f32],
    y: &mut [f32],
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<(), ExecError> {
    check("sgemm", "w", k, n, x.len(), w.len(), y.len(), (&rows, &cols))?;
    // SAFETY: checked.
    unsafe { sgemm(k, n, x.as_ptr(), w.as_ptr(), y.as_mut_ptr(), rows, cols) };
    Ok(())
}

/// The checks of [`run`] and [`crate::sgemm_kn::run`]: the CPU runs them, `x` is `[M, K]`
/// for some `M`, the weight (named `w`) holds `N K` values, `y` is `[M, N]`, and the rows
/// and columns lie inside.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check(
    kernel: &str,
    w: &str,
    k: usize,
    n: usize,
    x_len: usize,
    w_len: usize,
    y_len: usize,
    (rows, cols): (&Range<usize>, &Range<usize>),
) -> Result<(), ExecError> {
    let fail = |why: String| Err(ExecError::Arguments(format!("{kernel} K={k} N={n}: {why}")));
    if !available() {
        return fail("this CPU lacks AVX2 or FMA".into());
    }
    let m = x_len.checked_div(k).unwrap_or(0);
    let len = |a: usize, b: usize| a.checked_mul(b);
    if k == 0
        || len(m, k) != Some(x_len)
        || len(n, k) != Some(w_len)
        || len(m, n) != Some(y_len)
        || rows.end > m
        || cols.end > n
    {
        return fail(format!("x {x_len} values, {w} {w_len} values, y {y_len} values, rows {rows:?}, cols {cols:?}"));
    }
    Ok(())
}

/// The contract (see the module docs) in scalar code: `y[i, j]` for `x` `[M, K]` and `w`
/// `[N, K]`.
pub fn reference(k: usize, x: &[f32], w: &[f32], i: usize, j: usize) -> f32 {
    let (x, w) = (&x[i * k..(i + 1) * k], &w[j * k..(j + 1) * k]);
    let k8 = k - k % 8;
    let mut acc = [0f32; 8];
    for t in (0..k8).step_by(8) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a = x[t + l].mul_add(w[t + l], *a);
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for t in k8..k {
        s = x[t].mul_add(w[t], s);
    }
    s
}

/// Bytes of weights in a block of columns, and of `x` in a block of rows (see the module
/// docs): both stay in L2 (512 KB on Zen 3) while the tiles pass over them.
const COL_BLOCK_BYTES: usize = 96 * 1024;
const ROW_BLOCK_BYTES: usize = 256 * 1024;

/// Writes `y[i, j]` (see the module docs) for `i` in `rows`, `j` in `cols`.
///
/// # Safety
/// [`available`] must hold; `K > 0`; `x` must hold rows `0..rows.end` of `K` values, `w`
/// rows `0..cols.end` of `K` values, `y` `[rows.end, N]` values, with `cols.end <= N`; no
/// one writes `x` or `w` during the call, nor reads or writes `y`'s `rows x cols`.
pub unsafe fn sgemm(
    k: usize,
    n: usize,
    x: *const f32,
    w: *const f32,
    y: *mut f32,
    rows: Range<usize>,
    cols: Range<usize>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("`available()` is false off x86-64");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's.
    unsafe {
        avx2::sgemm(k, n, x, w, y, rows, cols)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{COL_BLOCK_BYTES, ROW_BLOCK_BYTES};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows and columns of a tile.
    const MR: usize = 4;
    const NR: usize = 3;

    /// See [`super::sgemm`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sgemm(
        k: usize,
        n: usize,
        x: *const f32,
        w: *const f32,
        y: *mut f32,
        rows: Range<usize>,
        cols: Range<usize>,
    ) {
        let row_bytes = k.saturating_mul(4);
        let col_block = (COL_BLOCK_BYTES / row_bytes / NR * NR).max(NR);
        let row_block = (ROW_BLOCK_BYTES / row_bytes / MR * MR).max(MR);
        for r0 in rows.clone().step_by(row_block) {
            let r1 = (r0 + row_block).min(rows.end);
            for c0 in cols.clone().step_by(col_block) {
                let c1 = (c0 + col_block).min(cols.end);
                for i in (r0..r1).step_by(MR) {
                    // SAFETY: rows i..i + MR.min(r1 - i) and columns c0..c1 lie inside the
                    // caller's ranges.
                    unsafe {
                        let (xs, ys) = (x.add(i * k), y.add(i * n));
                        match MR.min(r1 - i) {
                            4 => tiles::<4>(k, n, xs, w, ys, c0..c1),
                            3 => tiles::<3>(k, n, xs, w, ys, c0..c1),
                            2 => tiles::<2>(k, n, xs, w, ys, c0..c1),
                            _ => tiles::<1>(k, n, xs, w, ys, c0..c1),
                        }
                    }
                }
            }
        }
    }

    /// The tiles of the `R` rows at `x` (rows of `K`) over columns `cols` of `w` (rows of
    /// `K`) into `y` (the rows' start, rows of `N`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tiles<const R: usize>(k: usize, n: usize, x: *const f32, w: *const f32, y: *mut f32, cols: Range<usize>) {
        for j in cols.clone().step_by(NR) {
            // SAFETY: columns j..j + NR.min(cols.end - j) lie inside the caller's.
            unsafe {
                let (ws, ys) = (w.add(j * k), y.add(j));
                match NR.min(cols.end - j) {
                    3 => tile::<R, 3>(k, n, x, ws, ys),
                    2 => tile::<R, 2>(k, n, x, ws, ys),
                    _ => tile::<R, 1>(k, n, x, ws, ys),
                }
            }
        }
    }

    /// Sums of four accumulators, each `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
    #[inline]
    #[target_feature(enable = "avx")]
    fn reduce4(v: [__m256; 4]) -> [f32; 4] {
        // [v0 01, v0 23, v1 01, v1 23 | v0 45, v0 67, v1 45, v1 67] (lane pairs added).
        let h01 = _mm256_hadd_ps(v[0], v[1]);
        let h23 = _mm256_hadd_ps(v[2], v[3]);
        // [v0 01+23, v1 01+23, v2 01+23, v3 01+23 | the same of 45 and 67].
        let h = _mm256_hadd_ps(h01, h23);
        let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
        let mut out = [0f32; 4];
        // SAFETY: `out` holds four f32.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), s) };
        out
    }

    /// `y[r, c]` for the `R x C` tile at `x` (rows of `K`), `w` (rows of `K`), `y` (rows of
    /// `N`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const C: usize>(k: usize, n: usize, x: *const f32, w: *const f32, y: *mut f32) {
        let k8 = k - k % 8;
        let mut acc = [[_mm256_setzero_ps(); C]; R];
        let mut t = 0;
        while t < k8 {
            // SAFETY: t + 8 <= K in every row of the tile (caller).
            unsafe {
                let wv: [__m256; C] = std::array::from_fn(|c| _mm256_loadu_ps(w.add(c * k + t)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_ps(x.add(r * k + t));
                    for c in 0..C {
                        acc[c] = _mm256_fmadd_ps(xv, wv[c], acc[c]);
                    }
                }
            }
            t += 8;
        }
        // Reduce four accumulators at a time (the last group padded with zeros, which only
        // its unused outputs see), then the tail.
        let mut sums = [[0f32; C]; R];
        let mut q = 0;
        while q < R * C {
            let v: [__m256; 4] = std::array::from_fn(|e| {
                let f = q + e;
                if f < R * C { acc[f / C][f % C] } else { _mm256_setzero_ps() }
            });
            let s = reduce4(v);
            for (e, s) in s.iter().enumerate().take((R * C - q).min(4)) {
                let f = q + e;
                sums[f / C][f % C] = *s;
            }
            q += 4;
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            for (c, s) in sums.iter_mut().enumerate() {
                for t in k8..k {
                    // SAFETY: t < K in row r of x and row c of w.
                    unsafe { *s = (*x.add(r * k + t)).mul_add(*w.add(c * k + t), *s) };
                }
                // SAFETY: (r, c) is in the tile, inside the caller's rows x cols.
                unsafe { *y.add(r * n + c) = *s };
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Values of every magnitude and sign, some cancelling: order-sensitive sums.
    pub(crate) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let m = ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5;
                m * 2f32.powi(((s >> 20) % 16) as i32 - 8)
            })
            .collect()
    }

    /// The kernel is the contract bit for bit, on every tile shape and tail, and on every
    /// split of rows and columns.
    #[test]
    fn sgemm_is_the_contract_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA");
            return;
        }
        for (m, k, n) in
            [(1, 8, 1), (5, 13, 7), (4, 64, 3), (9, 384, 10), (13, 7, 5), (2, 1536, 50), (17, 40, 33), (45, 1536, 20)]
        {
            let (x, w) = (values(m * k, k as u64), values(n * k, n as u64 + 99));
            let mut y = vec![f32::NAN; m * n];
            run(k, n, &x, &w, &mut y, 0..m, 0..n).expect("valid arguments");
            for i in 0..m {
                for j in 0..n {
                    let want = reference(k, &x, &w, i, j);
                    assert_eq!(y[i * n + j].to_bits(), want.to_bits(), "m={m} k={k} n={n} at ({i}, {j})");
                }
            }
            // Parts computed separately give the same bits, and each writes only its part.
            let mut parts = vec![f32::NAN; m * n];
            let (mh, nh) = (m / 2, n / 3);
            for (r, c) in [(0..mh, 0..nh), (0..mh, nh..n), (mh..m, 0..n)] {
                let mut alone = vec![f32::NAN; m * n];
                run(k, n, &x, &w, &mut alone, r.clone(), c.clone()).expect("valid arguments");
                for (at, v) in alone.iter().enumerate() {
                    let inside = r.contains(&(at / n)) && c.contains(&(at % n));
                    assert_eq!(v.is_nan(), !inside, "m={m} k={k} n={n}: part {r:?} x {c:?} at {at}");
                }
                run(k, n, &x, &w, &mut parts, r, c).expect("valid arguments");
            }
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                parts.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    /// The contract sums in an order of its own, not left to right (else the bit-for-bit
    /// test above could pass on a kernel that ignores the lanes), and close to the exact sum.
    #[test]
    fn the_contract_is_not_a_plain_running_sum() {
        let k = 64;
        let mut differ = 0;
        for seed in 0..20 {
            let (x, w) = (values(k, seed), values(k, seed + 100));
            let plain = x.iter().zip(&w).fold(0f32, |s, (a, b)| a.mul_add(*b, s));
            let lanes = reference(k, &x, &w, 0, 0);
            differ += usize::from(plain.to_bits() != lanes.to_bits());
            let exact: f64 = x.iter().zip(&w).map(|(a, b)| *a as f64 * *b as f64).sum();
            let scale: f64 = x.iter().zip(&w).map(|(a, b)| (*a as f64 * *b as f64).abs()).sum();
            assert!((lanes as f64 - exact).abs() <= 1e-6 * scale, "seed {seed}: {lanes} against {exact}");
        }
        assert!(differ >= 5, "the lane order differed from a running sum on {differ} of 20 inputs");
    }

    #[test]
    fn run_refuses_wrong_lengths() {
        if !available() {
            return;
        }
        let mut y = vec![0f32; 4];
        let err = run(8, 2, &[0.0; 16], &[0.0; 15], &mut y, 0..2, 0..2).unwrap_err();
        assert!(err.to_string().contains("w 15 values"), "{err}");
        assert!(run(8, 2, &[0.0; 16], &[0.0; 16], &mut y, 0..3, 0..2).is_err());
        assert!(run(0, 2, &[], &[], &mut y, 0..0, 0..2).is_err());
    }
}
