//! The prefill GEMM of W8A8 linears on Q8_0 weights, on a layout of its own: eight weight
//! rows interleaved four bytes at a time.
//!
//! [`crate::gemm_i8`] reads the panels the emitted kernels read, where each row's 32 quants
//! of a block are contiguous. A product of a row block with an `x` block then ends as eight
//! partial sums in one vector, which a tree of shuffles and adds reduces before the block's
//! scales apply. Here a 32-byte vector holds quants `4c..4c+4` of eight rows, and `x`'s
//! four quants `4c..4c+4` are broadcast to all eight lanes (a load, no ALU work), so
//! `vpmaddubsw` + `vpmaddwd` leave in lane `r` row `r`'s partial sum: eight such products,
//! added lane by lane, are the eight rows' exact block sums, with no reduction at all.
//! On MiniLM's shapes at 128 rows, 1.3-1.7x `gemm_i8`'s speed (`i8_timing --formats q8_0
//! --shapes 384x384,384x1536,1536x384 --m 128 --panel 16`, columns "g256" and "q8").

//! # Layout
//!
//! Rows in groups of eight (the last group padded with rows of zeros whose scales are 0),
//! and per group, block by block: the eight rows' f16 scales (16 bytes), then for
//! `c` in `0..8` the quants `4c..4c+4` of rows 0..8 (32 bytes). [`layout_bytes`] in all.
//! The engine keeps this copy beside the panels (which the emitted kernels read for single
//! rows), so Q8_0 weights with int8 activations take twice their stored size in memory.
//!
//! # Contract
//!
//! The same as [`crate::gemm_i8`]'s for Q8_0: for every row `m` and column `n`, `acc` of step
//! 1 of the contract in [`crate::linear_i8`] (`acc = fma(d_w * d_x, isum as f32, acc)` per
//! block, in block order), or NaN when a block scale of row `n` is not finite. The integer
//! sums are exact and the float operations the same ones in the same order, so the result
//! is bitwise `gemm_i8`'s and the emitted kernel's (tested).

use crate::ExecError;
use crate::linear_i8::{QBLOCK, QBlock, QuantizedActivations};
use std::ops::Range;

/// Rows per group of the layout.
pub const ROWS: usize = 8;
/// Bytes of one block of a group: eight f16 scales, then eight rows of 32 quants.
pub const GROUP_BLOCK_BYTES: usize = ROWS * 2 + ROWS * QBLOCK;
/// Bytes of one stored Q8_0 block (f16 scale, 32 quants).
const Q8_0_BLOCK: usize = 2 + QBLOCK;

/// Whether this CPU runs [`gemm_q8`] (the same features as [`crate::gemm_i8`]).
pub fn available() -> bool {
    crate::gemm_i8::available()
}

/// Bytes of an `[N, K]` weight in the layout.
pub fn layout_bytes(n: usize, k: usize) -> usize {
    n.div_ceil(ROWS) * (k / QBLOCK) * GROUP_BLOCK_BYTES
}

/// Writes the Q8_0 weight `w` (`[N, K]`, as stored: rows of `K / 32` blocks) into `out`
/// ([`layout_bytes`]) in the layout.
pub fn pack(w: &[u8], n: usize, k: usize, out: &mut [u8]) -> Result<(), ExecError> {
    if k == 0 || !k.is_multiple_of(QBLOCK) || w.len() != n * k / QBLOCK * Q8_0_BLOCK || out.len() != layout_bytes(n, k)
    {
        return Err(ExecError::Arguments(format!(
            "gemm_q8::pack: {} bytes of Q8_0 as [{n}, {k}] into {}",
            w.len(),
            out.len()
        )));
    }
    let nb = k / QBLOCK;
    out.fill(0);
    for (g, group) in out.chunks_exact_mut(nb * GROUP_BLOCK_BYTES).enumerate() {
        for (b, dst) in group.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for r in 0..ROWS.min(n - g * ROWS) {
                let src = &w[((g * ROWS + r) * nb + b) * Q8_0_BLOCK..][..Q8_0_BLOCK];
                dst[2 * r..2 * r + 2].copy_from_slice(&src[..2]);
                for c in 0..QBLOCK / 4 {
                    let at = 2 * ROWS + c * 4 * ROWS + 4 * r;
                    dst[at..at + 4].copy_from_slice(&src[2 + 4 * c..2 + 4 * c + 4]);
                }
            }
        }
    }
    Ok(())
}

/// [`gemm_q8`] with every length checked: rows `rows` of `y` (`[M, N]`) from the quantized
/// `xq` (`[M, K]`) and `w` in the layout of an `[N, K]` weight.
pub fn run(n: usize, xq: &QuantizedActivations, w: &[u8], y: &mut [f32], rows: Range<usize>) -> Result<(), ExecError> {
    let (m, k) = (xq.rows(), xq.k());
    if !available() {
        return Err(ExecError::Arguments("gemm_q8: this CPU lacks AVX2, FMA or F16C".into()));
    }
    if w.len() != layout_bytes(n, k) || y.len() != m * n || rows.end > m || rows.start > rows.end {
        return Err(ExecError::Arguments(format!(
            "gemm_q8: x [{m}, {k}], w {} bytes, y {} values, rows {rows:?}, N = {n}",
            w.len(),
            y.len()
        )));
    }
    // SAFETY: checked above: the CPU features and every length.
    unsafe { gemm_q8(n, k, xq.blocks().as_ptr(), w.as_ptr(), y.as_mut_ptr(), rows.start, rows.end) };
    Ok(())
}

/// Writes `acc` (see the module docs) for rows `m0..m1` of `y` (`[M, N]`, row 0 at `y`)
/// from the quantized rows `xq` (row 0; `K / 32` blocks each) and the weight `w` in the
/// layout.
///
/// # Safety
/// [`available`] must hold; `K` a positive multiple of 32; `w` must hold
/// [`layout_bytes`]`(N, K)` bytes, `xq` rows `0..m1` and `y` `m1 * N` writable values, not
/// overlapping the others.
pub unsafe fn gemm_q8(n: usize, k: usize, xq: *const QBlock, w: *const u8, y: *mut f32, m0: usize, m1: usize) {
    let nb = k / QBLOCK;
    for g in 0..n.div_ceil(ROWS) {
        // SAFETY: forwarded from the caller; group `g` lies inside the weight.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx2::group(n, nb, g, xq, w.add(g * nb * GROUP_BLOCK_BYTES), y, m0, m1)
        };
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{GROUP_BLOCK_BYTES, ROWS};
    use crate::linear_i8::QBlock;
    use std::arch::x86_64::*;

    /// Rows of `x` per tile (four spill registers: `i8_timing`, 1.1-1.3x `gemm_i8` against
    /// 1.3-1.7x with three or two).
    const XROWS: usize = 3;

    /// Group `g` (its blocks at `w`) against rows `m0..m1` of `x`, [`XROWS`] at a time (the last
    /// tile repeats row `m1 - 1` and stores only the rows it has).
    ///
    /// # Safety
    /// As `gemm_q8`, with AVX2, FMA and F16C present.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group(
        n: usize,
        nb: usize,
        g: usize,
        xq: *const QBlock,
        w: *const u8,
        y: *mut f32,
        m0: usize,
        m1: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let exponent = _mm_set1_epi16(0x7C00);
        let cols = ROWS.min(n - g * ROWS);
        let mut m = m0;
        while m < m1 {
            // SAFETY: rows below m1.
            let x: [*const QBlock; XROWS] = std::array::from_fn(|i| unsafe { xq.add((m + i).min(m1 - 1) * nb) });
            let mut acc = [_mm256_setzero_ps(); XROWS];
            let mut bad = _mm_setzero_si128();
            for b in 0..nb {
                // SAFETY: block `b` of the group: eight scales, then eight chunks of quants.
                let blk = unsafe { w.add(b * GROUP_BLOCK_BYTES) };
                let h = unsafe { _mm_loadu_si128(blk.cast()) };
                bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent));
                let dw = _mm256_cvtph_ps(h);
                let xb: [&QBlock; XROWS] = std::array::from_fn(|i| unsafe { &*x[i].add(b) });
                let mut isum = [_mm256_setzero_si256(); XROWS];
                for c in 0..8 {
                    // SAFETY: chunk `c` of the block's quants.
                    let wv = unsafe { _mm256_loadu_si256(blk.add(2 * ROWS + 32 * c).cast()) };
                    let wa = _mm256_abs_epi8(wv);
                    for i in 0..XROWS {
                        // SAFETY: quants 4c..4c + 4 of the block.
                        let q = unsafe { std::ptr::read_unaligned(xb[i].q.as_ptr().add(4 * c).cast::<i32>()) };
                        let s = _mm256_sign_epi8(_mm256_set1_epi32(q), wv);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(wa, s), ones);
                        isum[i] = _mm256_add_epi32(isum[i], p);
                    }
                }
                for i in 0..XROWS {
                    let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb[i].d));
                    acc[i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum[i]), acc[i]);
                }
            }
            // Rows with a non-finite scale: NaN.
            let nan = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(bad));
            let nan_v = _mm256_set1_ps(f32::NAN);
            for (i, &a) in acc.iter().enumerate().take(m1 - m) {
                let v = _mm256_blendv_ps(a, nan_v, nan);
                // SAFETY: row m + i < m1, columns g * 8 .. g * 8 + cols <= N.
                let dst = unsafe { y.add((m + i) * n + g * ROWS) };
                if cols == ROWS {
                    unsafe { _mm256_storeu_ps(dst, v) };
                } else {
                    let mut lanes = [0.0f32; ROWS];
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
                    unsafe { std::ptr::copy_nonoverlapping(lanes.as_ptr(), dst, cols) };
                }
            }
            m += XROWS;
        }
    }
}
