//! W8A8 linears with one scale per row of `x` and per row of `W`: for int8 weights with
//! one scale per output channel (`int8gK`, what `quantize(format=int8)` writes), the whole
//! dot product is one exact integer sum, with no per-block rescaling.
//!
//! [`crate::linear_i8`] quantizes activations per block of 32, which llama-class models
//! need (SmolLM2 loses 2.8% perplexity with per-row scales, 0.2% with blocks, measured in
//! PyTorch); its GEMM then reduces and rescales every block. With one scale per row on both
//! sides, the integer products accumulate across all of `K`: per 32 multiply-adds of a
//! (row of `x`, row of `W`) pair, a `vpsignb`, a `vpmaddubsw`, a `vpmaddwd` and a `vpaddd`,
//! and one reduction per pair at the end. Encoders such as MiniLM keep their accuracy with
//! per-row scales (measured: see the README).
//!
//! # Contract
//!
//! Activations, per row of `x` (`[M, K]`, `K` a positive multiple of 32), by
//! [`quantize_per_row`]: `amax = max |x[k]|`, `d = amax / 127` (f32 division), `id = 1 / d`
//! (0 when `d == 0`), `q[k] = round_half_away_from_zero(x[k] * id)` in `[-127, 127]`, all
//! exactly as [`crate::linear_i8`]'s blocks but over the whole row; a NaN anywhere in the
//! row makes `d` NaN (and so the row's outputs), an infinite `x` gives `d = inf`.
//!
//! Weights ([`RowWeights::from_int8`]): `int8gK` (symmetric, one group per row), `w[n, k] =
//! code - 128` as `i8` and `dw[n]` the row's f16 scale widened exactly, so that the stored
//! weight is `dw[n] * w[n, k]`.
//!
//! Output `(m, n)` before the epilogue: `isum = sum_k q[m, k] * w[n, k]` exactly in `i32`
//! (`|isum| <= K * 127 * 128`, so `K <= 2^17`), then `acc = (dw[n] * d[m]) * (isum as f32)`:
//! one rounding for the product of the scales, one for the conversion of `isum` (exact below
//! `2^24`), one for the final product. The engine then runs the linear's emitted epilogue
//! ([`crate::epilogue`]). One implementation serves every `M` (a GEMV is a GEMM of one
//! row), and every output depends on its two rows only, so splitting rows or columns across
//! threads never changes a bit.
//!
//! # Code shape
//!
//! 256-bit AVX2 in Rust (`std::arch`), as [`crate::gemm_i8`], and for the same reason. A
//! tile is four rows of `W` by two rows of `x`: eight `i32x8` accumulators, the four weight
//! vectors and their absolute values, two of `x`. Groups of fewer than four weight rows
//! (`N % 4`) and CPUs without AVX2 take a scalar path with the same integer sum.

use crate::ExecError;
use crate::linear_i8::quantize_span;
use kiln_ir::IntFormat;
use std::ops::Range;

/// Activations quantized per row (see the module docs); the buffers are reused.
#[derive(Clone, Debug, Default)]
pub struct RowQuantized {
    k: usize,
    rows: usize,
    q: Vec<i8>,
    d: Vec<f32>,
}

impl RowQuantized {
    pub fn new() -> RowQuantized {
        RowQuantized::default()
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// The quantized values of row `m`.
    pub fn q(&self, m: usize) -> &[i8] {
        &self.q[m * self.k..(m + 1) * self.k]
    }

    /// The scale of row `m`.
    pub fn d(&self, m: usize) -> f32 {
        self.d[m]
    }
}

/// Quantizes the rows of `x` (`[M, K]`) into `out`, reusing its buffers.
///
/// # Panics
/// If `K` is not a positive multiple of 32 or `x.len()` not a multiple of `K`.
pub fn quantize_per_row(x: &[f32], k: usize, out: &mut RowQuantized) {
    assert!(k > 0 && k.is_multiple_of(32), "quantize_per_row: K = {k} is not a positive multiple of 32");
    assert!(x.len().is_multiple_of(k), "quantize_per_row: {} values are not rows of K = {k}", x.len());
    out.k = k;
    out.rows = x.len() / k;
    out.q.resize(x.len(), 0);
    out.d.resize(out.rows, 0.0);
    for ((xr, qr), d) in x.chunks_exact(k).zip(out.q.chunks_exact_mut(k)).zip(&mut out.d) {
        *d = quantize_span(xr, qr);
    }
}

/// A weight `[N, K]` as the kernel reads it: `i8` rows and one f32 scale per row.
#[derive(Clone, Debug)]
pub struct RowWeights {
    n: usize,
    k: usize,
    w: Vec<i8>,
    scales: Vec<f32>,
}

impl RowWeights {
    /// Whether `format` runs here for rows of `k` values: symmetric int8, one group per row.
    pub fn supports(format: IntFormat, k: usize) -> bool {
        format.is_int8_per_row(k as u64)
    }

    /// The weight `[n, k]` stored as `format` (see [`RowWeights::supports`]).
    pub fn from_int8(format: IntFormat, bytes: &[u8], n: usize, k: usize) -> Result<RowWeights, ExecError> {
        if !RowWeights::supports(format, k) || !k.is_multiple_of(32) {
            return Err(ExecError::Spec(format!("per-row int8 kernels need int8g{k} weights, not {format}")));
        }
        if bytes.len() != n * format.block_bytes() {
            return Err(ExecError::Arguments(format!("{format} weight [{n}, {k}] has {} bytes", bytes.len())));
        }
        let mut w = vec![0i8; n * k];
        let mut scales = Vec::with_capacity(n);
        let mut codes = vec![0u8; k];
        for (block, row) in bytes.chunks_exact(format.block_bytes()).zip(w.chunks_exact_mut(k)) {
            let s = format.unpack_block(block, &mut codes);
            scales.push(s.d.to_f32());
            for (w, &c) in row.iter_mut().zip(&codes) {
                *w = c.wrapping_sub(128) as i8;
            }
        }
        Ok(RowWeights { n, k, w, scales })
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    /// Writes `acc` (see the module docs) for rows `rows` and columns `cols` of `y`
    /// (`[M, N]`, row-major) from `xq` (`[M, K]`). Columns are split at multiples of four
    /// for speed, but any split gives the same values.
    pub fn gemm(
        &self,
        xq: &RowQuantized,
        y: &mut [f32],
        rows: Range<usize>,
        cols: Range<usize>,
    ) -> Result<(), ExecError> {
        let m = xq.rows();
        if xq.k() != self.k || y.len() != m * self.n || rows.end > m || cols.end > self.n {
            return Err(ExecError::Arguments(format!(
                "per-row int8 GEMM [{}, {}]: x has K = {} and {m} rows, y {} values, rows {rows:?}, columns {cols:?}",
                self.n,
                self.k,
                xq.k(),
                y.len()
            )));
        }
        // SAFETY: checked above.
        unsafe { self.gemm_unchecked(xq, y.as_mut_ptr(), rows, cols) };
        Ok(())
    }

    /// [`RowWeights::gemm`] on a raw `y`.
    ///
    /// # Safety
    /// `xq` must have `K = self.k()` and rows `rows`, `y` must point at `[M, N]` writable
    /// values of which these threads write only `rows x cols`, with `cols.end <= N`.
    pub unsafe fn gemm_unchecked(&self, xq: &RowQuantized, y: *mut f32, rows: Range<usize>, cols: Range<usize>) {
        let mut n0 = cols.start;
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            while n0 + 4 <= cols.end {
                let mut m = rows.start;
                while m < rows.end {
                    let ms = [m, (m + 1).min(rows.end - 1)];
                    // SAFETY: rows and columns in range (the caller's contract).
                    let acc = unsafe { avx2::tile(self.k, ms.map(|r| xq.q(r).as_ptr()), &self.w[n0 * self.k..]) };
                    for (i, &mi) in ms.iter().enumerate().take(rows.end - m) {
                        for (r, &a) in acc[i].iter().enumerate() {
                            let v = (self.scales[n0 + r] * xq.d(mi)) * (a as f32);
                            // SAFETY: (mi, n0 + r) is in rows x cols.
                            unsafe { *y.add(mi * self.n + n0 + r) = v };
                        }
                    }
                    m += 2;
                }
                n0 += 4;
            }
        }
        for n in n0..cols.end {
            let w = &self.w[n * self.k..(n + 1) * self.k];
            for m in rows.clone() {
                let isum: i32 = xq.q(m).iter().zip(w).map(|(&q, &w)| q as i32 * w as i32).sum();
                // SAFETY: (m, n) is in rows x cols.
                unsafe { *y.add(m * self.n + n) = (self.scales[n] * xq.d(m)) * (isum as f32) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `isum` of two rows of `x` (`x[i]`, `K` values) against four consecutive rows of
    /// `w` (from `w[0]`, `K` values each): `[i][r]`.
    ///
    /// # Safety
    /// AVX2 present; `x[i]` point at `k` values, `w` holds at least `4 k`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn tile(k: usize, x: [*const i8; 2], w: &[i8]) -> [[i32; 4]; 2] {
        debug_assert!(w.len() >= 4 * k && k.is_multiple_of(32));
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_si256(); 8];
        let wp = w.as_ptr();
        for c in (0..k).step_by(32) {
            // SAFETY: c + 32 <= k, within every row.
            let (xa, xb) = unsafe { (_mm256_loadu_si256(x[0].add(c).cast()), _mm256_loadu_si256(x[1].add(c).cast())) };
            for r in 0..4 {
                // SAFETY: row r of the four, chunk c.
                let wr = unsafe { _mm256_loadu_si256(wp.add(r * k + c).cast()) };
                let ar = _mm256_abs_epi8(wr);
                let pa = _mm256_maddubs_epi16(ar, _mm256_sign_epi8(xa, wr));
                let pb = _mm256_maddubs_epi16(ar, _mm256_sign_epi8(xb, wr));
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(pa, ones));
                acc[4 + r] = _mm256_add_epi32(acc[4 + r], _mm256_madd_epi16(pb, ones));
            }
        }
        let s = crate::gemm_i8::avx2::reduce8(acc);
        let mut out = [0i32; 8];
        // SAFETY: 8 i32.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), s) };
        [[out[0], out[1], out[2], out[3]], [out[4], out[5], out[6], out[7]]]
    }
}
