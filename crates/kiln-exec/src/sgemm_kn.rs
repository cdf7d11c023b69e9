//! The GEMM of linears whose reduction is short (the second half of a low-rank pair, `K` =
//! its rank), `y[M, N] = x[M, K] Wt[K, N]`, on the weight transposed once at engine build.
//!
//! [`crate::sgemm`] takes dot products along `K` and reduces eight lanes per output at the
//! end: at `K` = 96..192 that reduction is a large part of the work, and those linears ran
//! at 45-73 GFLOP/s on two threads where the square ones ran at 95-105 (`kiln bench
//! --profile` on MiniLM `factorize(keep=0.5)` at 1 x 128). Here each output is one chain
//! of FMAs along `K`, sixteen outputs of a row to a pair of vectors: no reduction at all.
//!
//! # Contract
//!
//! [`sgemm_kn`] writes, for rows `rows` and columns `cols` of `y`, `y[i, j] = s` where `s`
//! starts at +0 and `s = fma(x[i, k], wt[k, j], s)` for `k = 0..K`, increasing.
//! [`reference`] is this contract in scalar code, and the tests hold the kernel to it bit
//! for bit. An output's sum depends on `K` only, never on the rows and columns computed
//! with it, so any split across threads gives the same bits.
//!
//! # Code shape
//!
//! Tiles of 4 rows x 16 columns: eight `f32x8` accumulators; per `k`, two weight loads and
//! four broadcasts of `x` feed eight FMAs. Columns go outside, rows inside: a column tile's
//! weights (`16 K` values) stay in L1 while the rows pass over them.

use crate::ExecError;
use std::ops::Range;

/// Whether this CPU runs [`sgemm_kn`] (x86-64 with AVX2 and FMA).
pub fn available() -> bool {
    crate::sgemm::available()
}

/// `w[N, K]` (a linear's weight, PyTorch layout) transposed to `[K, N]`, what [`sgemm_kn`]
/// reads.
pub fn transpose(k: usize, n: usize, w: &[f32]) -> Vec<f32> {
    let mut wt = vec![0f32; k * n];
    for (j, row) in w.chunks_exact(k).take(n).enumerate() {
        for (t, &v) in row.iter().enumerate() {
            wt[t * n + j] = v;
        }
    }
    wt
}

/// [`sgemm_kn`] with every length checked: `x` is `[M, K]`, `wt` `[K, N]`, `y` `[M, N]`.
pub fn run(
    k: usize,
    n: usize,
    x: &[f32],
    wt: &[f32],
    y: &mut [f32],
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<(), ExecError> {
    crate::sgemm::check("sgemm_kn", "wt", k, n, x.len(), wt.len(), y.len(), (&rows, &cols))?;
    // SAFETY: checked.
    unsafe { sgemm_kn(k, n, x.as_ptr(), wt.as_ptr(), y.as_mut_ptr(), rows, cols) };
    Ok(())
}

/// The contract (see the module docs) in scalar code: `y[i, j]` for `x` `[M, K]` and `wt`
/// `[K, N]`.
pub fn reference(k: usize, n: usize, x: &[f32], wt: &[f32], i: usize, j: usize) -> f32 {
    (0..k).fold(0f32, |s, t| x[i * k + t].mul_add(wt[t * n + j], s))
}

/// Writes `y[i, j]` (see the module docs) for `i` in `rows`, `j` in `cols`.
///
/// # Safety
/// [`available`] must hold; `x` must hold rows `0..rows.end` of `K` values, `wt` `K` rows of
/// `N` values, `y` `[rows.end, N]` values, with `cols.end <= N`; no one writes `x` or `wt`
/// during the call, nor reads or writes `y`'s `rows x cols`.
pub unsafe fn sgemm_kn(
    k: usize,
    n: usize,
    x: *const f32,
    wt: *const f32,
    y: *mut f32,
    rows: Range<usize>,
    cols: Range<usize>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("`available()` is false off x86-64");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's.
    unsafe {
        avx2::sgemm_kn(k, n, x, wt, y, rows, cols)
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// Rows of a tile; its columns are `V` vectors of 8.
    const MR: usize = 4;

    /// See [`super::sgemm_kn`].
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sgemm_kn(
        k: usize,
        n: usize,
        x: *const f32,
        wt: *const f32,
        y: *mut f32,
        rows: Range<usize>,
        cols: Range<usize>,
    ) {
        let mut j = cols.start;
        while j < cols.end {
            let left = cols.end - j;
            // SAFETY: columns j..j + width lie inside the caller's.
            unsafe {
                let width = if left >= 16 {
                    column::<2>(k, n, x, wt.add(j), y.add(j), rows.clone());
                    16
                } else if left >= 8 {
                    column::<1>(k, n, x, wt.add(j), y.add(j), rows.clone());
                    8
                } else {
                    for i in rows.clone() {
                        for c in 0..left {
                            let mut s = 0f32;
                            for t in 0..k {
                                s = (*x.add(i * k + t)).mul_add(*wt.add(t * n + j + c), s);
                            }
                            *y.add(i * n + j + c) = s;
                        }
                    }
                    left
                };
                j += width;
            }
        }
    }

    /// The `8 V` columns at `wt` and `y` (both offset to the first), over `rows`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn column<const V: usize>(
        k: usize,
        n: usize,
        x: *const f32,
        wt: *const f32,
        y: *mut f32,
        rows: Range<usize>,
    ) {
        for i in rows.clone().step_by(MR) {
            // SAFETY: rows i..i + MR.min(rows.end - i) lie inside the caller's.
            unsafe {
                let (xs, ys) = (x.add(i * k), y.add(i * n));
                match MR.min(rows.end - i) {
                    4 => tile::<4, V>(k, n, xs, wt, ys),
                    3 => tile::<3, V>(k, n, xs, wt, ys),
                    2 => tile::<2, V>(k, n, xs, wt, ys),
                    _ => tile::<1, V>(k, n, xs, wt, ys),
                }
            }
        }
    }

    /// `y[r, 8 v + l]` for the tile of `R` rows at `x` (rows of `K`) and `8 V` columns at
    /// `wt` (rows of `N`), `y` (rows of `N`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile<const R: usize, const V: usize>(k: usize, n: usize, x: *const f32, wt: *const f32, y: *mut f32) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for t in 0..k {
            // SAFETY: t < K; the tile's rows and columns are the caller's.
            unsafe {
                let wv: [__m256; V] = std::array::from_fn(|v| _mm256_loadu_ps(wt.add(t * n + 8 * v)));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_broadcast_ss(&*x.add(r * k + t));
                    for v in 0..V {
                        acc[v] = _mm256_fmadd_ps(xv, wv[v], acc[v]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, a) in acc.iter().enumerate() {
                // SAFETY: (r, 8 v..8 v + 8) is in the tile.
                unsafe { _mm256_storeu_ps(y.add(r * n + 8 * v), *a) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sgemm::tests::values;

    /// The kernel is the contract bit for bit, on every tile shape and tail, and on every
    /// split of rows and columns; and it computes `x w^T` of the untransposed weight.
    #[test]
    fn sgemm_kn_is_the_contract_bit_for_bit() {
        if !available() {
            eprintln!("skipped: no AVX2/FMA");
            return;
        }
        for (m, k, n) in [(1, 1, 1), (5, 13, 7), (4, 96, 16), (9, 64, 40), (13, 7, 25), (2, 160, 50), (17, 40, 33)] {
            let (x, w) = (values(m * k, k as u64), values(n * k, n as u64 + 99));
            let wt = transpose(k, n, &w);
            let mut y = vec![f32::NAN; m * n];
            run(k, n, &x, &wt, &mut y, 0..m, 0..n).expect("valid arguments");
            for i in 0..m {
                for j in 0..n {
                    let want = reference(k, n, &x, &wt, i, j);
                    assert_eq!(y[i * n + j].to_bits(), want.to_bits(), "m={m} k={k} n={n} at ({i}, {j})");
                    let exact: f64 = (0..k).map(|t| x[i * k + t] as f64 * w[j * k + t] as f64).sum();
                    let scale: f64 = (0..k).map(|t| (x[i * k + t] as f64 * w[j * k + t] as f64).abs()).sum();
                    assert!((want as f64 - exact).abs() <= 1e-5 * scale, "m={m} k={k} n={n}: {want} vs {exact}");
                }
            }
            // Parts computed separately give the same bits, and each writes only its part.
            let mut parts = vec![f32::NAN; m * n];
            let (mh, nh) = (m / 2, n / 3);
            for (r, c) in [(0..mh, 0..nh), (0..mh, nh..n), (mh..m, 0..n)] {
                let mut alone = vec![f32::NAN; m * n];
                run(k, n, &x, &wt, &mut alone, r.clone(), c.clone()).expect("valid arguments");
                for (at, v) in alone.iter().enumerate() {
                    let inside = r.contains(&(at / n)) && c.contains(&(at % n));
                    assert_eq!(v.is_nan(), !inside, "m={m} k={k} n={n}: part {r:?} x {c:?} at {at}");
                }
                run(k, n, &x, &wt, &mut parts, r, c).expect("valid arguments");
            }
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                parts.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn run_refuses_wrong_lengths() {
        if !available() {
            return;
        }
        let mut y = vec![0f32; 4];
        let err = run(8, 2, &[0.0; 16], &[0.0; 15], &mut y, 0..2, 0..2).unwrap_err();
        assert!(err.to_string().contains("wt 15 values"), "{err}");
        assert!(run(8, 2, &[0.0; 16], &[0.0; 16], &mut y, 0..3, 0..2).is_err());
    }
}
