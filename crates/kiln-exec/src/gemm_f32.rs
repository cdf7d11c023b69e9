//! The prefill GEMM of f32-activation linears on block-format weights (Q8_0, Q4_0, Q4_1,
//! and kiln's int formats repacked to them) in 256-bit AVX2: the numbers of
//! [`crate::linear`]'s kernels at twice their vector width.
//!
//! As for [`crate::gemm_i8`]: Cranelift emits 128-bit vectors only, a GEMM is bound by
//! arithmetic, so this one is Rust (`std::arch`) and the engine runs the linear's emitted
//! epilogue after it. Without it a quantized model prefilled slower than its f32 version
//! (whose sgemm is 256-bit).
//!
//! # Contract
//!
//! [`gemm_f32`] writes, for rows `rows` and columns `cols` of `y`, the sum `s` of steps 1-2
//! of the contract in [`crate::linear`] (before the bias): per output, four lane-wise
//! partial sums `acc[l] = fma(w[k], x[k], acc[l])` over `k = 4 j + l`, `j` increasing, from
//! +0, then `(acc[0] + acc[2]) + (acc[1] + acc[3])`, with `w` exactly the values
//! [`kiln_ir::Format::dequantize`] defines (`K` is a multiple of 32, so there is no tail).
//! So `gemm_f32` then the epilogue is bitwise the emitted kernel for finite weights (tested);
//! a NaN scale gives NaN outputs on both, though not necessarily the same NaN bits.
//!
//! # Code shape
//!
//! Per group of four weight rows: the rows are decoded (in registers, then stored) into a
//! panel of two pairs of rows, each pair interleaved by fours (`w_a[4j..4j+4], w_b[4j..4j+4]`
//! is one `f32x8`); then every four rows of `x` run a 2 x 4 tile of `f32x8` accumulators
//! over it: per step of four `k`, two panel loads and four broadcasts of `x[4j..4j+4]` feed
//! eight FMAs, each lane of an accumulator being one `acc[l]` of one output. Threads split
//! the columns (each decodes only its weights), so the epilogue runs after all of them.

use crate::ExecError;
use kiln_ir::Format;
use std::ops::Range;

/// Whether this CPU runs [`gemm_f32`] (x86-64 with AVX2, FMA and F16C).
pub fn available() -> bool {
    crate::gemm_i8::available()
}

/// Whether weights stored in `format` run here.
pub fn supports(format: Format) -> bool {
    matches!(format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1) || matches!(format, Format::Fp8(f) if f.group == 32)
}

/// [`gemm_f32`] with every length checked: `x` is `[M, K]`, `w` the weight `[N, K]` as
/// stored in `format`, `y` `[M, N]`.
#[allow(clippy::too_many_arguments)]
pub fn run(
    format: Format,
    k: usize,
    n: usize,
    x: &[f32],
    w: &[u8],
    y: &mut [f32],
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<(), ExecError> {
    let fail = |why: String| Err(ExecError::Arguments(format!("gemm_f32 {format} K={k} N={n}: {why}")));
    if !available() {
        return fail("this CPU lacks AVX2, FMA or F16C".into());
    }
    if !supports(format) || k == 0 || !k.is_multiple_of(32) {
        return fail("needs Q8_0, Q4_0 or Q4_1 weights and K a positive multiple of 32".into());
    }
    let m = x.len() / k;
    let row_bytes = k / 32 * format.block_bytes() as usize;
    if x.len() != m * k || w.len() != n * row_bytes || y.len() != m * n || rows.end > m || cols.end > n {
        return fail(format!(
            "x {} values, w {} bytes, y {} values, rows {rows:?}, cols {cols:?}",
            x.len(),
            w.len(),
            y.len()
        ));
    }
    // SAFETY: checked above.
    unsafe { gemm_f32(format, k, n, x.as_ptr(), w.as_ptr(), y.as_mut_ptr(), rows, cols) };
    Ok(())
}

/// Writes `s` (see the module docs) for `rows x cols` of `y`.
///
/// # Safety
/// [`available`] must hold and [`supports`]`(format)`, `K % 32 == 0`; `x` must hold rows
/// `0..rows.end` of `K` values, `w` the weight `[N, K]` as stored, `y` `[M, N]` values of
/// which no one else writes `rows x cols`, with `cols.end <= N`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    format: Format,
    k: usize,
    n: usize,
    x: *const f32,
    w: *const u8,
    y: *mut f32,
    rows: Range<usize>,
    cols: Range<usize>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("`available()` is false off x86-64");
    #[cfg(target_arch = "x86_64")]
    let row_bytes = k / 32 * format.block_bytes() as usize;
    #[cfg(target_arch = "x86_64")]
    let mut panel = vec![0f32; 4 * k];
    #[cfg(target_arch = "x86_64")]
    let mut n0 = cols.start;
    #[cfg(target_arch = "x86_64")]
    while n0 < cols.end {
        let g = 4.min(cols.end - n0);
        // The group's rows (a short last group repeats its last row; only real ones are stored).
        let rows_of: [usize; 4] = std::array::from_fn(|r| n0 + r.min(g - 1));
        // SAFETY: the rows lie inside the weight; the panel holds 4 K values.
        unsafe { avx2::decode_panel(format, k, rows_of.map(|r| w.add(r * row_bytes)), &mut panel) };
        let mut m = rows.start;
        while m < rows.end {
            let xs: [usize; 4] = std::array::from_fn(|i| (m + i).min(rows.end - 1));
            // SAFETY: rows below rows.end hold K values.
            let s = unsafe { avx2::tile(k, &panel, xs.map(|i| x.add(i * k))) };
            for (i, &mi) in xs.iter().enumerate().take(rows.end - m) {
                for (r, &v) in s[i].iter().enumerate().take(g) {
                    // SAFETY: (mi, n0 + r) is in rows x cols.
                    unsafe { *y.add(mi * n + n0 + r) = v };
                }
            }
            m += 4;
        }
        n0 += g;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use kiln_ir::Format;
    use std::arch::x86_64::*;

    /// 32 values of one block as stored, exactly as `Format::dequantize` computes them.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn decode_block(format: Format, b: *const u8) -> [__m256; 4] {
        // SAFETY: `b` points at one whole block (caller).
        unsafe {
            let d = _mm256_cvtph_ps(_mm_set1_epi16(b.cast::<i16>().read_unaligned()));
            match format {
                Format::Q8_0 => std::array::from_fn(|i| {
                    let q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(b.add(2 + 8 * i).cast()));
                    _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
                }),
                // e4m3 as the emitted kernel decodes it (`decode.rs`): the bits placed in an
                // f32, times 2^120, the NaN code selected in, times d.
                Format::Fp8(_) => std::array::from_fn(|i| {
                    let q = _mm256_cvtepu8_epi32(_mm_loadl_epi64(b.add(2 + 8 * i).cast()));
                    let low7 = _mm256_set1_epi32(0x7F);
                    let em = _mm256_and_si256(q, low7);
                    let sign = _mm256_slli_epi32::<24>(_mm256_and_si256(q, _mm256_set1_epi32(0x80)));
                    let bits = _mm256_or_si256(sign, _mm256_slli_epi32::<20>(em));
                    let v = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(f32::from_bits((127 + 120) << 23)));
                    let nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, low7));
                    let v = _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), nan);
                    _mm256_mul_ps(v, d)
                }),
                _ => {
                    let q1 = format == Format::Q4_1;
                    let qs = _mm_loadu_si128(b.add(crate::linear_i8::scale_bytes(format)).cast());
                    let nib = _mm_set1_epi8(15);
                    let lo = _mm_and_si128(qs, nib);
                    let hi = _mm_and_si128(_mm_srli_epi16::<4>(qs), nib);
                    // Elements 0..16 are the low nibbles, 16..32 the high ones.
                    let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                    if q1 {
                        let m = _mm256_cvtph_ps(_mm_set1_epi16(b.add(2).cast::<i16>().read_unaligned()));
                        parts.map(|p| _mm256_add_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(p))), m))
                    } else {
                        let eight = _mm256_set1_epi32(8);
                        parts.map(|p| {
                            let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(p), eight);
                            _mm256_mul_ps(d, _mm256_cvtepi32_ps(q))
                        })
                    }
                }
            }
        }
    }

    /// Decodes four weight rows (`K` values each) into the panel layout (see the module
    /// docs): pair `p` (rows `2p`, `2p + 1`) at `2 p K`, step `j` at `8 j` within it.
    ///
    /// # Safety
    /// AVX2, FMA, F16C; each row pointer at `K / 32` whole blocks of `format`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn decode_panel(format: Format, k: usize, rows: [*const u8; 4], panel: &mut [f32]) {
        debug_assert!(panel.len() >= 4 * k);
        let bb = format.block_bytes() as usize;
        let out = panel.as_mut_ptr();
        for (r, &row) in rows.iter().enumerate() {
            let (pair, half) = (r / 2, r % 2);
            for b in 0..k / 32 {
                // SAFETY: block `b` of the row; the panel has room for every (j, half).
                unsafe {
                    let v = decode_block(format, row.add(b * bb));
                    for (i, v) in v.iter().enumerate() {
                        // Values 8 i .. 8 i + 8 of the block: steps j0 and j0 + 1.
                        let j0 = (b * 32 + 8 * i) / 4;
                        let base = out.add(2 * pair * k + 4 * half);
                        _mm_storeu_ps(base.add(8 * j0), _mm256_castps256_ps128(*v));
                        _mm_storeu_ps(base.add(8 * (j0 + 1)), _mm256_extractf128_ps::<1>(*v));
                    }
                }
            }
        }
    }

    /// `(acc[0] + acc[2]) + (acc[1] + acc[3])` of both halves: lanes 0 and 4.
    #[inline]
    #[target_feature(enable = "avx")]
    fn reduce(a: __m256) -> (f32, f32) {
        let t = _mm256_add_ps(a, _mm256_permute_ps::<0b01_00_11_10>(a)); // [a0+a2, a1+a3, ..]
        let u = _mm256_add_ps(t, _mm256_permute_ps::<0b10_11_00_01>(t)); // lane 0: t0 + t1
        (_mm256_cvtss_f32(u), _mm_cvtss_f32(_mm256_extractf128_ps::<1>(u)))
    }

    /// The sums of four rows of `x` against the panel's four weight rows: `[x row][w row]`.
    ///
    /// # Safety
    /// AVX2, FMA; `x[i]` point at `K` values; the panel holds `4 K`.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile(k: usize, panel: &[f32], x: [*const f32; 4]) -> [[f32; 4]; 4] {
        let mut acc = [[_mm256_setzero_ps(); 4]; 2];
        let (p0, p1) = (panel.as_ptr(), panel[2 * k..].as_ptr());
        for j in 0..k / 4 {
            // SAFETY: step j of both pairs and of every row of x.
            unsafe {
                let w0 = _mm256_loadu_ps(p0.add(8 * j));
                let w1 = _mm256_loadu_ps(p1.add(8 * j));
                for i in 0..4 {
                    let xv = _mm_loadu_ps(x[i].add(4 * j));
                    let xb = _mm256_set_m128(xv, xv);
                    acc[0][i] = _mm256_fmadd_ps(w0, xb, acc[0][i]);
                    acc[1][i] = _mm256_fmadd_ps(w1, xb, acc[1][i]);
                }
            }
        }
        std::array::from_fn(|i| {
            let (a, b) = reduce(acc[0][i]);
            let (c, d) = reduce(acc[1][i]);
            [a, b, c, d]
        })
    }
}
