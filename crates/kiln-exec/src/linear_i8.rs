//! W8A8 fused linear kernels: `y[m, n] = r[m, n] + act(sum_k x[m, k] * W[n, k] + bias[n])`
//! with the activations quantized to int8 and the dot products done in integers.
//!
//! The weights are GGUF Q8_0, Q4_0 or Q4_1, read as stored; the activations are quantized
//! per row and per block of 32 along `K` by [`quantize_rows`] into [`QuantizedActivations`]
//! (llama.cpp's `q8_0`/`q8_1` scheme), which the kernel reads instead of f32 `x`.
//!
//! # Contract
//!
//! A kernel is specialized to a [`LinearI8Spec`] (`K`, `N`, the weight format and the same
//! epilogue as [`crate::LinearSpec`]: bias, [`Activation`], residual). It has the C signature
//! [`LinearI8Fn`]:
//!
//! ```text
//! fn(xq: *const u8, w: *const u8, bias: *const f32, residual: *const f32, y: *mut f32,
//!    m0: usize, m1: usize)
//! ```
//!
//! and computes rows `m0..m1` of `y` (nothing when `m0 >= m1`):
//! - `xq` points at row 0 of the quantized activations: row `m` is `K / 32` consecutive
//!   [`QBlock`]s (48 bytes each) at `xq + m * (K / 32) * 48` ([`QuantizedActivations::as_ptr`]);
//! - `w` is the weight `[N, K]` exactly as stored (`Format::byte_len(N * K)` bytes, blocks of
//!   32 along `K`), or with [`LinearI8Spec::panel`] the same bytes rearranged by
//!   [`pack_weight`]; `y` and `residual` are f32 row-major `[M, N]`, all pointing at row 0;
//! - `bias` (`[N]`) and `residual` are read only when the spec has them (may be null
//!   otherwise); `residual` may be *equal* to `y` (in-place residual add) but no other
//!   argument may overlap `y`. No alignment is required.
//!
//! **Numbers.** Activation quantization ([`quantize_rows`]), per row of `x` and per block of
//! 32 values `x[i]`:
//! 1. `amax = max |x[i]|`, `d = amax / 127` (f32 division), `id = 1 / d` (0 when `d == 0`);
//! 2. `q[i] = round_half_away_from_zero(x[i] * id)` as `i8`, in `[-127, 127]`;
//! 3. `sum = sum q[i]` (exact, `i32`) and `s = d * (sum as f32)` (one f32 product);
//!
//! and if the block holds a NaN, `d = s = NaN` (the NaN reaches the outputs instead of being
//! rounded away); an infinite `x` gives `d = inf` and non-finite outputs.
//!
//! The kernel, for every output `(m, n)`: with `dw` (and `mw` for Q4_1) the weight block's
//! f16 scale(s) widened exactly to f32 (finite values; see 3.), and `qw` the stored quant (Q8_0: the `i8`; Q4_0 and
//! Q4_1: the nibble `0..=15`, low nibbles are elements 0..16, high nibbles 16..32),
//! 1. `acc = +0.0`; for each block `b = 0, 1, ..` of `K / 32` in order:
//!    - `isum = sum_i q[i] * qw[i]` exactly in integers (Q4_0: minus `8 * sum`, i.e. the
//!      dot product with `qw - 8`); `|isum| <= 32 * 128 * 127 < 2^24`, so `isum as f32` is
//!      exact;
//!    - `acc = fma(dw * d, isum as f32, acc)` (the product `dw * d` rounded to f32 first);
//!    - Q4_1 only: `acc = fma(mw, s, acc)`;
//! 2. `acc + bias[n]`, then the activation (see `kiln-jit`'s `math`), then `residual[m, n] + acc`,
//!    exactly as in [`crate::linear`];
//! 3. except that if any block scale of row `n` of `W` (`dw`, or Q4_1's `mw`) is inf or NaN
//!    (no real checkpoint has one: its weights would be non-finite), every output `(m, n)`
//!    is NaN. (The scales are widened without `kiln-jit`'s `emit::f16_to_f32` inf/NaN fix-up,
//!    which cost 13% of the GEMV; a sticky maximum of their exponent bits, two instructions
//!    per four rows and block, finds them instead.)
//!
//! This sequence depends on nothing but the row of `x` and the row of `W`: not on `m0`, `m1`, the tile an output falls in or the code path taken, so splitting
//! rows across calls or threads, or changing the batch, gives bitwise identical results
//! (tested against a plain-Rust implementation of the list above, bit for bit).
//!
//! Accuracy against the f32 linear layer on the same (dequantized) weights: quantizing `x`
//! moves each value by at most `d / 2` of its block, so before the epilogue the result is
//! within `sum_b d_b / 2 * sum_{i in b} |w_i|` (plus f32 rounding) of the exact one.
//!
//! **Packed weights** ([`LinearI8Spec::panel`] > 0, [`pack_weight`]; what the engine uses).
//! In decode every weight is read once per token from memory, and the direct path over the
//! stored layout reads 16 rows of 360-612 bytes interleaved, block by block, which the
//! hardware prefetchers follow badly: cold weights streamed at 4-5 GB/s on one thread
//! against 13-15 GB/s for a plain sequential read (`i8_timing --cold`). Packed into panels
//! of 16 rows (by block, then by group of four rows: scales, then quants) the same kernel
//! reads strictly sequentially and takes the four rows' scales in one load: 10-12 GB/s cold
//! (Q4_1 and Q8_0, 576x576 to 576x49152), the same arithmetic in the same order. The direct
//! tile is then the panel (`direct_rows` is ignored) and the tile path takes
//! `ceil(gemm_rows / 4)` groups of a panel at a time. Panels of 8 and 4 rows streamed as
//! fast; 16 keeps the direct path's register tile.

use crate::ExecError;
use crate::activation::Activation;
use crate::linear::LinearSpec;
use kiln_ir::Format;

/// Values per quantization block (along `K`), for activations and weights alike.
pub const QBLOCK: usize = 32;

/// Bytes of one [`QBlock`] (its `#[repr(C)]` size).
pub const QBLOCK_BYTES: usize = 48;

/// One quantized block of 32 activations (see the module docs for how it is computed).
/// Byte offsets: `q` 0..32, `d` 32, `s` 36, `sum` 40 (then 4 bytes of padding).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QBlock {
    pub q: [i8; QBLOCK],
    /// Scale: `x[i] ~ d * q[i]`.
    pub d: f32,
    /// `d * sum` (one f32 product), for Q4_1's minimum.
    pub s: f32,
    /// `sum q[i]`.
    pub sum: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<QBlock>() == QBLOCK_BYTES);
pub const Q_OFF: i32 = 0;
pub const D_OFF: i32 = 32;
pub const S_OFF: i32 = 36;
pub const SUM_OFF: i32 = 40;

/// Quantized activations `[M, K]`: `K / 32` [`QBlock`]s per row, rows consecutive. The buffer
/// is reused across [`quantize_rows`] calls (it only grows).
#[derive(Clone, Debug, Default)]
pub struct QuantizedActivations {
    k: usize,
    rows: usize,
    blocks: Vec<QBlock>,
}

impl QuantizedActivations {
    pub fn new() -> QuantizedActivations {
        QuantizedActivations::default()
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// All blocks, row after row (`rows * K / 32`).
    pub fn blocks(&self) -> &[QBlock] {
        &self.blocks[..self.rows * self.k / QBLOCK]
    }

    /// The blocks of row `m`.
    pub fn row(&self, m: usize) -> &[QBlock] {
        let per = self.k / QBLOCK;
        &self.blocks[m * per..(m + 1) * per]
    }

    /// Row 0, as the kernels take it (`xq`); row `m` starts `m * K / 32 * 48` bytes later.
    pub fn as_ptr(&self) -> *const u8 {
        self.blocks.as_ptr().cast()
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.k / QBLOCK * QBLOCK_BYTES
    }
}

/// Quantizes the rows of `x` (`[M, K]`, row-major, `K` a positive multiple of 32) into `out`,
/// reusing its buffer (see the module docs for the exact arithmetic).
///
/// # Panics
/// If `K` is not a positive multiple of 32 or `x.len()` not a multiple of `K`.
pub fn quantize_rows(x: &[f32], k: usize, out: &mut QuantizedActivations) {
    assert!(k > 0 && k.is_multiple_of(QBLOCK), "quantize_rows: K = {k} is not a positive multiple of 32");
    assert!(x.len().is_multiple_of(k), "quantize_rows: {} values are not rows of K = {k}", x.len());
    let blocks = x.len() / QBLOCK;
    if out.blocks.len() < blocks {
        out.blocks.resize(blocks, QBlock::default());
    }
    out.k = k;
    out.rows = x.len() / k;
    let out = &mut out.blocks[..blocks];
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        unsafe { quantize_avx2(x, out) };
        return;
    }
    quantize_all(x, out);
}

/// [`quantize_block`] with AVX2 intrinsics: the same operations lane by lane, so the same
/// bits (tested).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_avx2(x: &[f32], out: &mut [QBlock]) {
    use std::arch::x86_64::*;
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let limit = _mm256_set1_ps(127.5);
    let half = _mm256_set1_ps(0.5);
    let zero = _mm256_setzero_ps();
    for (xb, qb) in x.chunks_exact(QBLOCK).zip(out) {
        let xb: &[f32; QBLOCK] = xb.try_into().unwrap();
        // SAFETY: `xb` holds 32 f32, read as four unaligned vectors of 8.
        let v: [__m256; 4] = std::array::from_fn(|i| unsafe { _mm256_loadu_ps(xb.as_ptr().add(8 * i)) });
        let (mut m, mut nan) = (zero, zero);
        for &v in &v {
            // max_ps(a, m) = a > m ? a : m, as `quantize_block`.
            m = _mm256_max_ps(_mm256_and_ps(v, abs_mask), m);
            nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        }
        let m4 = _mm_max_ps(_mm256_extractf128_ps::<1>(m), _mm256_castps256_ps128(m));
        let m2 = _mm_max_ps(_mm_movehl_ps(m4, m4), m4);
        let m1 = _mm_max_ss(_mm_shuffle_ps::<1>(m2, m2), m2);
        let amax = _mm_cvtss_f32(m1);
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let idv = _mm256_set1_ps(id);
        let r: [__m256i; 4] = v.map(|v| {
            let p = _mm256_mul_ps(v, idv);
            let a = _mm256_and_ps(p, abs_mask);
            let a = _mm256_and_ps(a, _mm256_cmp_ps::<_CMP_LE_OQ>(a, limit));
            let t = _mm256_cvttps_epi32(a);
            let up = _mm256_cmp_ps::<_CMP_GE_OQ>(_mm256_sub_ps(a, _mm256_cvtepi32_ps(t)), half);
            let r = _mm256_sub_epi32(t, _mm256_castps_si256(up)); // t + 1 where up
            let neg = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(v, zero));
            _mm256_sub_epi32(_mm256_xor_si256(r, neg), neg)
        });
        let s = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
        let s4 = _mm_add_epi32(_mm256_extracti128_si256::<1>(s), _mm256_castsi256_si128(s));
        let s2 = _mm_add_epi32(_mm_unpackhi_epi64(s4, s4), s4);
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(_mm_shuffle_epi32::<1>(s2), s2));
        // Packing works within 128-bit halves; the permute restores element order.
        let p01 = _mm256_packs_epi32(r[0], r[1]);
        let p23 = _mm256_packs_epi32(r[2], r[3]);
        let q = _mm256_packs_epi16(p01, p23);
        let q = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        // SAFETY: `qb.q` is 32 bytes.
        unsafe { _mm256_storeu_si256(qb.q.as_mut_ptr().cast(), q) };
        let d = if _mm256_movemask_ps(nan) != 0 { f32::NAN } else { d };
        (qb.d, qb.s, qb.sum, qb.pad) = (d, d * sum as f32, sum, 0);
    }
}

#[inline(always)]
fn quantize_all(x: &[f32], out: &mut [QBlock]) {
    for (xb, qb) in x.chunks_exact(QBLOCK).zip(out) {
        quantize_block(xb.try_into().unwrap(), qb);
    }
}

/// One block (see the module docs).
#[inline(always)]
fn quantize_block(x: &[f32; QBLOCK], out: &mut QBlock) {
    let mut q = [0i8; QBLOCK];
    let d = quantize_span(x, &mut q);
    let sum = q.iter().map(|&v| v as i32).sum::<i32>();
    *out = QBlock { q, d, s: d * sum as f32, sum, pad: 0 };
}

/// Quantizes `x` (a multiple of 8 values) into `q` with one scale over all of it, and
/// returns the scale `d` (NaN if `x` holds a NaN): a block here, a whole row in
/// [`crate::linear_i8row`]. Written to vectorize (lane-wise maxima, no calls, no branches).
#[inline(always)]
pub fn quantize_span(x: &[f32], q: &mut [i8]) -> f32 {
    debug_assert!(x.len().is_multiple_of(8) && q.len() == x.len());
    let mut amax = [0.0f32; 8];
    let mut nan = [false; 8];
    for c in x.chunks_exact(8) {
        for l in 0..8 {
            let a = c[l].abs();
            amax[l] = if a > amax[l] { a } else { amax[l] };
            nan[l] |= c[l].is_nan();
        }
    }
    let amax = amax.iter().fold(0.0f32, |m, &a| if a > m { a } else { m });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        // Round half away from zero: with t = trunc(|v id|), `|v id| - t` is exact.
        // `a <= 127.5` (false for NaN) keeps the conversion in range: |v id| <= 127 + 2^-16
        // whenever d is finite; a NaN product (NaN or infinite x) gives 0.
        let a = (v * id).abs();
        let a = if a <= 127.5 { a } else { 0.0 };
        // SAFETY: `a` is finite and in [0, 127.5].
        let t = unsafe { a.to_int_unchecked::<i32>() };
        let r = t + ((a - t as f32) >= 0.5) as i32;
        let r = if v < 0.0 { -r } else { r };
        *q = r as i8;
    }
    if nan.iter().any(|&n| n) { f32::NAN } else { d }
}

/// The C signature of a compiled W8A8 linear kernel (see the module docs for the contract).
pub type LinearI8Fn = unsafe extern "C" fn(
    xq: *const u8,
    w: *const u8,
    bias: *const f32,
    residual: *const f32,
    y: *mut f32,
    m0: usize,
    m1: usize,
);

/// What a W8A8 linear kernel computes: the fields of [`LinearSpec`], for the formats with an
/// integer dot product ([`LinearI8Spec::supports`]).
///
/// A type of its own rather than a flag on `LinearSpec`: the kernel takes different
/// arguments (quantized activations, not f32 `x`) and has a different numeric contract, so
/// a kernel cache keyed by spec can never hand one out for the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearI8Spec {
    /// Inputs per row (a multiple of 32).
    pub k: usize,
    /// Outputs per row (rows of `W`).
    pub n: usize,
    /// Storage format of `W`: Q8_0, Q4_0 or Q4_1.
    pub format: Format,
    pub bias: bool,
    pub activation: Activation,
    pub residual: bool,
    /// Layout of `W`: 0 for the bytes as stored, or the rows per panel (4, 8, 12 or 16) of
    /// the packed layout of [`pack_weight`].
    pub panel: usize,
}

impl LinearI8Spec {
    /// A plain `x @ W^T` with no epilogue, on the weight as stored.
    pub fn new(k: usize, n: usize, format: Format) -> LinearI8Spec {
        LinearI8Spec { k, n, format, bias: false, activation: Activation::None, residual: false, panel: 0 }
    }

    /// The same kernel on `W` packed into panels of `rows` rows ([`pack_weight`]), or as
    /// stored for 0.
    pub fn packed(self, rows: usize) -> LinearI8Spec {
        LinearI8Spec { panel: rows, ..self }
    }

    /// Whether weights in `format` have an int8 kernel.
    pub fn supports(format: Format) -> bool {
        matches!(format, Format::Q8_0 | Format::Q4_0 | Format::Q4_1)
    }

    /// The same layer with int8 activations, if its format has an int8 kernel.
    pub fn from_linear(spec: &LinearSpec) -> Option<LinearI8Spec> {
        LinearI8Spec::supports(spec.format).then_some(LinearI8Spec {
            k: spec.k,
            n: spec.n,
            format: spec.format,
            bias: spec.bias,
            activation: spec.activation,
            residual: spec.residual,
            panel: 0,
        })
    }

    /// The same layer with f32 activations.
    pub fn linear(&self) -> LinearSpec {
        LinearSpec {
            k: self.k,
            n: self.n,
            format: self.format,
            bias: self.bias,
            activation: self.activation,
            residual: self.residual,
        }
    }

    /// Bytes of the stored weight.
    pub fn weight_bytes(&self) -> usize {
        self.linear().weight_bytes()
    }

    /// Checks that a kernel can be specialized to this spec.
    pub fn validate(&self) -> Result<(), ExecError> {
        let bad = |why: String| Err(ExecError::Spec(format!("linear_i8 {self:?}: {why}")));
        if !LinearI8Spec::supports(self.format) {
            return bad(format!("no int8 kernel for {} weights", self.format));
        }
        if self.k == 0 || self.n == 0 || !self.k.is_multiple_of(QBLOCK) {
            return bad("K must be a positive multiple of 32 and N positive".into());
        }
        if !self.panel.is_multiple_of(4) || self.panel > MAX_PANEL {
            return bad("panels must have 4, 8, 12 or 16 rows".into());
        }
        let w = self.k.checked_mul(self.n).and_then(|e| e.checked_mul(2));
        let x = (self.k / QBLOCK).checked_mul(QBLOCK_BYTES * 8);
        if w.is_none_or(|b| b > i32::MAX as usize) || x.is_none_or(|b| b > i32::MAX as usize) {
            return bad("too large for 32-bit offsets".into());
        }
        Ok(())
    }
}

/// Most rows per panel of the packed weight layout ([`LinearI8Spec::panel`]).
pub const MAX_PANEL: usize = 16;

/// Bytes of a weight block's scales: `d` (f16), and Q4_1's `m`.
pub fn scale_bytes(format: Format) -> usize {
    if format == Format::Q4_1 { 4 } else { 2 }
}

/// Packs `w`, the weight `[N, K]` as stored, into `out` (as many bytes) for the kernels of
/// `spec`, whose `panel` (`P`) must be nonzero. Only where bytes live changes, not what the
/// kernel computes (tested bit for bit).
///
/// The packed layout: rows in panels of `P` (the last one holds the `N % P` remaining
/// rows); a panel of `L` rows is its `L * K / 32` blocks ordered by block along `K`, then by
/// group of four rows (the last group may have fewer, `g`), each group being the `g` rows'
/// scales (`d`, and `m` for Q4_1, as stored: 4 or 2 bytes per row) followed by their quants
/// (16 or 32 bytes per row), rows in order. So a kernel reads its weight strictly
/// sequentially and gets four rows' scales with one load; panel `p` starts at byte
/// `p * P * row_bytes` as in the stored layout, the packed size is the stored size, and the
/// rows from any panel boundary on are the packed weight of those rows alone (how the
/// engine splits columns across threads).
pub fn pack_weight(spec: &LinearI8Spec, w: &[u8], out: &mut [u8]) -> Result<(), ExecError> {
    spec.validate()?;
    let fail = |why: String| Err(ExecError::Arguments(format!("pack_weight {spec:?}: {why}")));
    if spec.panel == 0 {
        return fail("the spec has no panels".into());
    }
    if w.len() != spec.weight_bytes() || out.len() != w.len() {
        return fail(format!("{} bytes into {}, expected {}", w.len(), out.len(), spec.weight_bytes()));
    }
    match spec.format {
        Format::Q4_1 => pack_panels::<4, 16>(spec, w, out),
        Format::Q4_0 => pack_panels::<2, 16>(spec, w, out),
        _ => pack_panels::<2, 32>(spec, w, out),
    }
    Ok(())
}

/// [`pack_weight`] for blocks of `SB` bytes of scales and `QB` of quants (fixed-size copies).
fn pack_panels<const SB: usize, const QB: usize>(spec: &LinearI8Spec, w: &[u8], out: &mut [u8]) {
    let bb = SB + QB;
    let row = spec.k / QBLOCK * bb;
    let mut o = 0;
    for (panel_w, panel_out) in w.chunks(spec.panel * row).zip(out.chunks_mut(spec.panel * row)) {
        let rows: Vec<&[u8]> = panel_w.chunks_exact(row).collect();
        for blk in (0..row).step_by(bb) {
            for group in rows.chunks(4) {
                for r in group {
                    let src: &[u8; SB] = r[blk..blk + SB].try_into().unwrap();
                    panel_out[o..o + SB].copy_from_slice(src);
                    o += SB;
                }
                for r in group {
                    let src: &[u8; QB] = r[blk + SB..blk + bb].try_into().unwrap();
                    panel_out[o..o + QB].copy_from_slice(src);
                    o += QB;
                }
            }
        }
        debug_assert_eq!(o, panel_out.len());
        o = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The portable quantizer (used without AVX2) gives the same blocks as the AVX2 one.
    #[test]
    fn portable_and_avx2_quantizers_agree() {
        let mut s = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut x: Vec<f32> = (0..64 * 32)
            .map(|i| {
                let r = next();
                let v = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
                v * [1.0, 1e-3, 300.0, 1e-38][i / 32 % 4]
            })
            .collect();
        x[5 * 32..6 * 32].fill(0.0);
        x[7 * 32 + 3] = f32::NAN;
        x[9 * 32 + 4] = f32::INFINITY;
        x[11 * 32..12 * 32].iter_mut().enumerate().for_each(|(i, v)| *v = i as f32 - 15.5); // .5 steps
        let mut portable = vec![QBlock::default(); 64];
        quantize_all(&x, &mut portable);
        let mut q = QuantizedActivations::new();
        quantize_rows(&x, 32 * 8, &mut q);
        for (i, (a, b)) in portable.iter().zip(q.blocks()).enumerate() {
            assert_eq!(a.q, b.q, "block {i}");
            assert_eq!((a.d.to_bits(), a.s.to_bits(), a.sum), (b.d.to_bits(), b.s.to_bits(), b.sum), "block {i}");
        }
        assert!(portable[7].d.is_nan());
    }
}
