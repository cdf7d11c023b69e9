//! The prefill GEMM of W8A8 linears in 256-bit AVX2: the numbers of
//! [`crate::linear_i8`]'s kernels at twice their vector width.
//!
//! Cranelift emits 128-bit vectors only (`../shared/KERNELS.md`). A GEMV (decode) streams its
//! weight once and is bound by memory, so the emitted kernels serve it well; a GEMM over
//! many rows of `x` (prefill, encoders) is bound by arithmetic, where a 256-bit
//! `vpmaddubsw` does twice the work per instruction. So, like the runtime's sgemm for f32
//! weights, this GEMM is Rust (`std::arch`), and the engine runs the linear's emitted
//! epilogue ([`crate::epilogue`]) after it.
//!
//! # Contract
//!
//! [`gemm_i8`] takes the arguments of a [`crate::LinearI8Fn`] of a packed spec (panels of
//! 4..=16 rows, [`crate::linear_i8::pack_weight`]) minus the epilogue's, and writes for
//! every row `m` in `m0..m1` and column `n` the sum `acc` of step 1 of the contract in
//! [`crate::linear_i8`] (or NaN when a block scale of row `n` is not finite, step 3). The
//! integer sums are exact and the float operations the same ones in the same order, so
//! `gemm_i8` followed by the epilogue of the spec is bitwise the emitted kernel (tested),
//! and the engine may take either for any rows.
//!
//! # Code shape
//!
//! A tile is one group of four weight rows (as packed: four scales, then four rows of
//! quants, per block) by four rows of `x`. Per block of 32 it computes the 16 products with
//! one `vpmaddubsw` + `vpmaddwd` each (Q8_0 with the sign trick of the emitted kernels,
//! `vpmaddubsw(|w|, sign(q, w))`; Q4: the nibbles unsigned, no saturation possible for the
//! same reasons as there), reduces them to two `i32x8` of exact block sums with a tree of
//! interleaves and adds (lane `4 i + r` = row `i` of a pair of `x` rows, weight row `r`), and updates
//! two `f32x8` accumulators with one `vcvtdq2ps`, one product of scales and one FMA each.
//! Groups with fewer than four rows (`N % 4`) take a scalar path with the same arithmetic.

use crate::ExecError;
use crate::linear_i8::{LinearI8Spec, MAX_PANEL, QBLOCK, QBlock, QuantizedActivations, scale_bytes};
use half::f16;
use kiln_ir::Format;
use std::ops::Range;

/// Whether this CPU runs [`gemm_i8`] (x86-64 with AVX2, FMA and F16C).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Where one group of rows of a packed weight keeps its blocks.
#[derive(Clone, Copy)]
struct Group {
    /// Its first block.
    at: usize,
    /// Bytes from one block of the group to the next (the panel's rows times the block size).
    stride: usize,
    /// Rows (1..=4) and the first of them.
    rows: usize,
    n0: usize,
}

/// Bytes per block and row: scales (`d`, and Q4_1's `m`), then quants.
fn block_sizes(format: Format) -> (usize, usize) {
    let sb = scale_bytes(format);
    (sb, format.block_bytes() as usize - sb)
}

/// The groups of four rows of a weight packed for `spec`, in row order.
fn groups(spec: &LinearI8Spec) -> impl Iterator<Item = Group> + '_ {
    let (sb, qb) = block_sizes(spec.format);
    let bb = sb + qb;
    let row_bytes = spec.k / QBLOCK * bb;
    (0..spec.n).step_by(spec.panel).flat_map(move |p0| {
        let rows = spec.panel.min(spec.n - p0);
        (0..rows).step_by(4).map(move |g0| Group {
            at: p0 * row_bytes + g0 * bb,
            stride: rows * bb,
            rows: 4.min(rows - g0),
            n0: p0 + g0,
        })
    })
}

/// [`gemm_i8`] with every length checked: rows `rows` of `y` (`[M, N]`) from the quantized
/// `xq` (`[M, K]`) and `w`, packed for `spec`.
pub fn run(
    spec: &LinearI8Spec,
    xq: &QuantizedActivations,
    w: &[u8],
    y: &mut [f32],
    rows: Range<usize>,
) -> Result<(), ExecError> {
    let fail = |why: String| Err(ExecError::Arguments(format!("gemm_i8 {spec:?}: {why}")));
    if !available() {
        return fail("this CPU lacks AVX2, FMA or F16C".into());
    }
    if spec.panel == 0 || !spec.panel.is_multiple_of(4) || spec.panel > MAX_PANEL {
        return fail("the weight must be packed in panels of 4, 8, 12 or 16 rows".into());
    }
    if !LinearI8Spec::supports(spec.format) || spec.k == 0 || !spec.k.is_multiple_of(QBLOCK) {
        return fail("needs Q8_0, Q4_0 or Q4_1 weights and K a positive multiple of 32".into());
    }
    let m = xq.rows();
    if xq.k() != spec.k || w.len() != spec.weight_bytes() || y.len() != m * spec.n || rows.end > m {
        return fail(format!(
            "x has K = {} and {m} rows, w {} bytes, y {} values, rows {rows:?}",
            xq.k(),
            w.len(),
            y.len()
        ));
    }
    // SAFETY: checked above: the CPU features, the spec, and every length.
    unsafe { gemm_i8(spec, xq.blocks().as_ptr(), w.as_ptr(), y.as_mut_ptr(), rows.start, rows.end) };
    Ok(())
}

/// Writes `acc` (see the module docs) for rows `m0..m1` of `y` (`[M, N]`, row 0 at `y`)
/// from the quantized rows `xq` (row 0; `K / 32` blocks each) and the weight `w` packed for
/// `spec`.
///
/// # Safety
/// [`available`] must hold; `spec` must be valid with `spec.panel` in 4, 8, 12, 16 and a
/// format with an int8 kernel; `w` must hold the packed weight (`spec.weight_bytes()`
/// bytes), `xq` rows `0..m1` and `y` `m1 * N` writable values, not overlapping the others.
pub unsafe fn gemm_i8(spec: &LinearI8Spec, xq: *const QBlock, w: *const u8, y: *mut f32, m0: usize, m1: usize) {
    debug_assert!(spec.panel > 0 && spec.panel.is_multiple_of(4));
    debug_assert!(LinearI8Spec::supports(spec.format));
    let nb = spec.k / QBLOCK;
    for g in groups(spec) {
        if g.rows == 4 {
            // SAFETY: forwarded from the caller; the group lies inside the packed weight.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                match spec.format {
                    Format::Q8_0 => avx2::group::<{ avx2::Q8_0 }>(spec.n, nb, g, xq, w, y, m0, m1),
                    Format::Q4_0 => avx2::group::<{ avx2::Q4_0 }>(spec.n, nb, g, xq, w, y, m0, m1),
                    _ => avx2::group::<{ avx2::Q4_1 }>(spec.n, nb, g, xq, w, y, m0, m1),
                }
            }
        } else {
            // SAFETY: forwarded from the caller.
            unsafe { scalar_group(spec, nb, g, xq, w, y, m0, m1) }
        }
    }
}

/// The contract, output by output, for a group of any size.
///
/// # Safety
/// As [`gemm_i8`].
#[allow(clippy::too_many_arguments)]
unsafe fn scalar_group(
    spec: &LinearI8Spec,
    nb: usize,
    g: Group,
    xq: *const QBlock,
    w: *const u8,
    y: *mut f32,
    m0: usize,
    m1: usize,
) {
    let (sb, qb) = block_sizes(spec.format);
    for r in 0..g.rows {
        for m in m0..m1 {
            let mut acc = 0.0f32;
            let mut finite = true;
            for b in 0..nb {
                // SAFETY: block `b` of the group, row `r`: scales at `r * sb`, quants after
                // the group's scales; `xq` holds row `m`'s `nb` blocks.
                let (blk, x) = unsafe { (w.add(g.at + b * g.stride), &*xq.add(m * nb + b)) };
                let scale = |at: usize| unsafe { f16::from_bits(u16::from_le_bytes([*blk.add(at), *blk.add(at + 1)])) };
                let dw = scale(r * sb);
                let mw = scale(r * sb + 2);
                finite &= dw.is_finite() && (spec.format != Format::Q4_1 || mw.is_finite());
                let quants = unsafe { std::slice::from_raw_parts(blk.add(g.rows * sb + r * qb), qb) };
                let isum: i32 = match spec.format {
                    Format::Q8_0 => quants.iter().zip(&x.q).map(|(&w, &q)| w as i8 as i32 * q as i32).sum(),
                    _ => {
                        let nib = |i: usize| if i < 16 { quants[i] & 15 } else { quants[i - 16] >> 4 } as i32;
                        let dot: i32 = (0..QBLOCK).map(|i| nib(i) * x.q[i] as i32).sum();
                        if spec.format == Format::Q4_0 { dot - 8 * x.sum } else { dot }
                    }
                };
                acc = (dw.to_f32() * x.d).mul_add(isum as f32, acc);
                if spec.format == Format::Q4_1 {
                    acc = mw.to_f32().mul_add(x.s, acc);
                }
            }
            // SAFETY: row `m` < m1, column `g.n0 + r` < N.
            unsafe { *y.add(m * spec.n + g.n0 + r) = if finite { acc } else { f32::NAN } };
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::Group;
    use crate::linear_i8::QBlock;
    use std::arch::x86_64::*;

    pub const Q8_0: u8 = 0;
    pub const Q4_0: u8 = 1;
    pub const Q4_1: u8 = 2;

    /// Sums of the lanes of eight `i32x8`: lane `i` of the result is the sum of `p[i]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) fn reduce8(p: [__m256i; 8]) -> __m256i {
        // Interleaves and adds rather than `vphaddd` (several micro-ops each on Zen 3).
        // `i8_timing --formats q4_1,q4_0 --shapes 576x576,576x1536,1536x576 --m 128 --panel
        // 16`, three alternating runs against `vphaddd`: 56.0 against 50.9 GOP/s on average
        // (noisy; per run -25% to +60%). Per 128-bit half: `pair` leaves lanes
        // `[a0+a2, b0+b2, a1+a3, b1+b3]`, `quad` of two pairs the four sums `[a, b, c, d]`.
        let pair = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi32(a, b), _mm256_unpackhi_epi32(a, b));
        let quad = |a: __m256i, b: __m256i| _mm256_add_epi32(_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
        let q0 = quad(pair(p[0], p[1]), pair(p[2], p[3]));
        let q1 = quad(pair(p[4], p[5]), pair(p[6], p[7]));
        let lo = _mm256_permute2x128_si256::<0x20>(q0, q1);
        let hi = _mm256_permute2x128_si256::<0x31>(q0, q1);
        _mm256_add_epi32(lo, hi)
    }

    /// `[a, a, a, a, b, b, b, b]`.
    #[inline]
    #[target_feature(enable = "avx")]
    fn pair_ps(a: f32, b: f32) -> __m256 {
        _mm256_set_m128(_mm_set1_ps(b), _mm_set1_ps(a))
    }

    /// One full group of four weight rows against rows `m0..m1` of `x`, four at a time (the
    /// last tile repeats row `m1 - 1` and stores only the rows it has).
    ///
    /// # Safety
    /// As `gemm_i8`, with AVX2, FMA and F16C present and `g.rows == 4`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn group<const F: u8>(
        n: usize,
        nb: usize,
        g: Group,
        xq: *const QBlock,
        w: *const u8,
        y: *mut f32,
        m0: usize,
        m1: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let nibble = _mm_set1_epi8(15);
        let exponent = _mm_set1_epi16(0x7C00);
        // Q4_1's four (d, m) pairs as [d0, d1, d2, d3, m0, m1, m2, m3].
        let deinterleave = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        let scale_bytes = if F == Q4_1 { 4 } else { 2 };
        let quant_bytes = if F == Q8_0 { 32 } else { 16 };
        let mut m = m0;
        while m < m1 {
            let rows: [usize; 4] = std::array::from_fn(|i| (m + i).min(m1 - 1));
            // SAFETY: rows below m1.
            let x: [*const QBlock; 4] = rows.map(|r| unsafe { xq.add(r * nb) });
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut bad = _mm_setzero_si128();
            for b in 0..nb {
                // SAFETY: block `b` of the group: its four rows' scales, then their quants.
                let blk = unsafe { w.add(g.at + b * g.stride) };
                let qs = unsafe { blk.add(4 * scale_bytes) };
                let (dw, mw) = if F == Q4_1 {
                    let h = unsafe { _mm_loadu_si128(blk.cast()) };
                    bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent));
                    let f = _mm256_cvtph_ps(_mm_shuffle_epi8(h, deinterleave));
                    (_mm256_permute2f128_ps::<0x00>(f, f), _mm256_permute2f128_ps::<0x11>(f, f))
                } else {
                    let h = unsafe { _mm_loadl_epi64(blk.cast()) };
                    bad = _mm_or_si128(bad, _mm_cmpeq_epi16(_mm_and_si128(h, exponent), exponent));
                    let d = _mm_cvtph_ps(h);
                    (_mm256_set_m128(d, d), _mm256_setzero_ps())
                };
                // The four weight rows as the unsigned operand of `vpmaddubsw`, and for Q8_0
                // the signs to move onto `q`.
                let (wu, ws): ([__m256i; 4], [__m256i; 4]) = if F == Q8_0 {
                    let ws: [__m256i; 4] =
                        std::array::from_fn(|r| unsafe { _mm256_loadu_si256(qs.add(32 * r).cast()) });
                    (ws.map(|v| _mm256_abs_epi8(v)), ws)
                } else {
                    let wu = std::array::from_fn(|r| {
                        let v = unsafe { _mm_loadu_si128(qs.add(quant_bytes * r).cast()) };
                        let lo = _mm_and_si128(v, nibble);
                        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), nibble);
                        _mm256_set_m128i(hi, lo)
                    });
                    (wu, wu)
                };
                for half in 0..2 {
                    let (xa, xb) = unsafe { (&*x[2 * half].add(b), &*x[2 * half + 1].add(b)) };
                    let qa = unsafe { _mm256_loadu_si256(xa.q.as_ptr().cast()) };
                    let qb = unsafe { _mm256_loadu_si256(xb.q.as_ptr().cast()) };
                    let dot = |q: __m256i, r: usize| {
                        let q = if F == Q8_0 { _mm256_sign_epi8(q, ws[r]) } else { q };
                        _mm256_madd_epi16(_mm256_maddubs_epi16(wu[r], q), ones)
                    };
                    let p = [
                        dot(qa, 0),
                        dot(qa, 1),
                        dot(qa, 2),
                        dot(qa, 3),
                        dot(qb, 0),
                        dot(qb, 1),
                        dot(qb, 2),
                        dot(qb, 3),
                    ];
                    let mut isum = reduce8(p);
                    if F == Q4_0 {
                        let sums = _mm256_set_m128i(_mm_set1_epi32(xb.sum), _mm_set1_epi32(xa.sum));
                        isum = _mm256_sub_epi32(isum, _mm256_slli_epi32::<3>(sums));
                    }
                    let scale = _mm256_mul_ps(dw, pair_ps(xa.d, xb.d));
                    acc[half] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(isum), acc[half]);
                    if F == Q4_1 {
                        acc[half] = _mm256_fmadd_ps(mw, pair_ps(xa.s, xb.s), acc[half]);
                    }
                }
            }
            // Rows with a non-finite scale: NaN (the f16 lanes of row r: r, or Q4_1's d and m
            // at 2 r and 2 r + 1, as stored).
            let mask = _mm_movemask_epi8(bad) as u32;
            let per_row = |r: usize| {
                let lane = |l: usize| mask >> (2 * l) & 1 != 0;
                if F == Q4_1 { lane(2 * r) || lane(2 * r + 1) } else { lane(r) }
            };
            let nan = _mm_castsi128_ps(_mm_setr_epi32(
                if per_row(0) { -1 } else { 0 },
                if per_row(1) { -1 } else { 0 },
                if per_row(2) { -1 } else { 0 },
                if per_row(3) { -1 } else { 0 },
            ));
            let nan_v = _mm_set1_ps(f32::NAN);
            for i in 0..4.min(m1 - m) {
                let half = acc[i / 2];
                let v = if i % 2 == 0 { _mm256_castps256_ps128(half) } else { _mm256_extractf128_ps::<1>(half) };
                let v = _mm_blendv_ps(v, nan_v, nan);
                // SAFETY: row m + i < m1, columns n0..n0 + 4 <= N.
                unsafe { _mm_storeu_ps(y.add((m + i) * n + g.n0), v) };
            }
            m += 4;
        }
    }
}
