//! The sparse linear kernel: `y = x W^T` read from a half-sparse weight's kept values, for
//! the few rows of decode.
//!
//! # Which weights
//! Patterns `n:m` with `2n = m` and `m` dividing 16 (`2:4`, `4:8`, `8:16`) over rows
//! of a multiple of 32 columns: every *window* of 32 columns keeps exactly 16 values (a group
//! with fewer set bits than `n` pads its slots with zeros, as [`kiln_ir::sparse`] says). At
//! engine build the values and the mask become, per row and window, 16 values and their 16
//! column indices in the window (one byte each). (A group never spans more than half a
//! window, which the AVX2 path needs: slots `8h..8h + 8` read columns `16h..16h + 16`.)
//! - values stored as symmetric int8 (`int8gG`) stay int8, with the scale of their group
//!   (groups are multiples of 32 values, so one window has one scale): 2 bytes per kept
//!   value, the same bytes as the dense int8 row they stand for, but half the products;
//! - any other value format is decoded to f32: 5 bytes per kept value, 2.5 per weight
//!   against the 4 of the dense f32 weight.
//!
//! # The numbers
//! Output `o` of row `r` is `Σ_w Σ_{j<16} (s_w v_j) x[32 w + i_j]` (+ bias), with `s_w = 1`
//! for f32 values, summed in 16 lanes (lane `j` takes slot `j` of every window, products
//! rounded once by a fused multiply-add), and the lanes then summed pairwise (8 + 8, 4 + 4,
//! 2 + 2, 1 + 1). The AVX-512 and AVX2 paths and the portable one compute exactly this, so
//! the result does not depend on the host's vector width, the thread count or the row's
//! position in a batch. It differs from the dense weight's kernel by the order of the sum
//! (within the tolerance of `op.rs`'s `linear`).

use kiln_ir::{Format, TensorData};

/// Kept values per window, and the window's columns.
pub const SLOTS: usize = 16;
pub const WINDOW: usize = 32;

/// The kept values of a [`SparseWeight`].
#[derive(Clone, Debug)]
enum Values {
    /// int8 codes, and one scale per row and window.
    I8 {
        q: Vec<i8>,
        scales: Vec<f32>,
    },
    F32(Vec<f32>),
}

/// A half-sparse weight `[n, k]` laid out for [`SparseWeight::run`] (see the module
/// documentation).
#[derive(Clone, Debug)]
pub struct SparseWeight {
    pub n: usize,
    pub k: usize,
    values: Values,
    /// Per row and window, the column (within the window) of each slot.
    index: Vec<u8>,
    /// The lane sums for this host, chosen once when the layout is made.
    lanes: LanesFn,
}

/// A row's 16 lane sums: [`lanes_portable`] or a vector path with its bits.
type LanesFn = fn(&[f32], &[u8], Vals<'_>) -> [f32; SLOTS];

impl SparseWeight {
    /// Whether a sparse weight of pattern `pn:pm` over `k` columns has this layout.
    pub fn fits(pn: u64, pm: u64, k: u64) -> bool {
        2 * pn == pm && 16u64.is_multiple_of(pm) && k.is_multiple_of(WINDOW as u64)
    }

    /// The layout of the sparse weight `[n, k]` of pattern `pn:pm` with `values`
    /// (`[n, k / pm * pn]`, any format) and `mask` (`u8[n, k / 8]`), or why it has none.
    pub fn new(pn: u64, pm: u64, n: usize, k: usize, values: &TensorData, mask: &[u8]) -> Result<SparseWeight, String> {
        if !SparseWeight::fits(pn, pm, k as u64) {
            return Err(format!("pattern {pn}:{pm} over {k} columns keeps no 16 of every 32"));
        }
        let (pn, pm) = (pn as usize, pm as usize);
        let slots = k / 2;
        if values.shape != [n as u64, slots as u64] || mask.len() != n * k / 8 {
            return Err(format!("values {:?} and {} mask bytes for [{n}, {k}] {pn}:{pm}", values.shape, mask.len()));
        }
        let windows = k / WINDOW;
        // The column of every slot: the j-th set bit of its group, or the group's first
        // column for an unused slot (whose value is zero).
        let mut index = vec![0u8; n * slots];
        let mut used = vec![false; n * slots];
        for r in 0..n {
            for g in 0..k / pm {
                let mut j = 0;
                for c in g * pm..(g + 1) * pm {
                    if mask[r * k / 8 + c / 8] >> (c % 8) & 1 == 1 && j < pn {
                        index[r * slots + g * pn + j] = (c % WINDOW) as u8;
                        used[r * slots + g * pn + j] = true;
                        j += 1;
                    }
                }
                for j in j..pn {
                    index[r * slots + g * pn + j] = ((g * pm) % WINDOW) as u8;
                }
            }
        }
        let values = match values.format {
            Format::Int(f) if f.bits == 8 && !f.asym => {
                let group = f.group as usize;
                let mut q = vec![0i8; n * slots];
                let mut scales = vec![0f32; n * windows];
                let mut codes = vec![0u8; group];
                let bytes = values.bytes.as_slice();
                for (b, block) in bytes.chunks_exact(f.block_bytes()).enumerate() {
                    let s = f.unpack_block(block, &mut codes).d.to_f32();
                    for (j, &c) in codes.iter().enumerate() {
                        let slot = b * group + j;
                        q[slot] = if used[slot] { (c as i32 - f.zero_code() as i32) as i8 } else { 0 };
                    }
                    // Groups tile the rows (the verifier checks that the group divides them).
                    for slot in (b * group..(b + 1) * group).step_by(SLOTS) {
                        scales[slot / SLOTS] = s;
                    }
                }
                Values::I8 { q, scales }
            }
            _ => {
                let mut v = values.to_f32().map_err(|e| e.to_string())?;
                v.iter_mut().zip(&used).filter(|(_, u)| !**u).for_each(|(v, _)| *v = 0.0);
                Values::F32(v)
            }
        };
        Ok(SparseWeight { n, k, values, index, lanes: host_lanes() })
    }

    /// Bytes the kernel reads per call and row: values, scales and indices.
    pub fn bytes(&self) -> usize {
        self.index.len()
            + match &self.values {
                Values::I8 { q, scales } => q.len() + 4 * scales.len(),
                Values::F32(v) => 4 * v.len(),
            }
    }

    /// `y[r, o] = Σ x[r, :] W[o, :] (+ bias[o])` for the outputs `cols` of every row of `x`
    /// (`[m, k]`), written to `y` (`[m, n]`).
    ///
    /// # Safety
    /// `x` holds `m k` values, `y` has room for `m n`, `bias` is null or holds `n`; no one
    /// else writes `y`'s columns `cols` meanwhile.
    pub unsafe fn run(&self, x: *const f32, m: usize, y: *mut f32, bias: *const f32, cols: std::ops::Range<usize>) {
        let (k, n, windows) = (self.k, self.n, self.k / WINDOW);
        for r in 0..m {
            // SAFETY: the caller's.
            let xr = unsafe { std::slice::from_raw_parts(x.add(r * k), k) };
            for o in cols.clone() {
                let index = &self.index[o * windows * SLOTS..(o + 1) * windows * SLOTS];
                let lanes = match &self.values {
                    Values::I8 { q, scales } => {
                        let (q, s) = (&q[o * windows * SLOTS..(o + 1) * windows * SLOTS], &scales[o * windows..]);
                        (self.lanes)(xr, index, Vals::I8(q, &s[..windows]))
                    }
                    Values::F32(v) => {
                        (self.lanes)(xr, index, Vals::F32(&v[o * windows * SLOTS..(o + 1) * windows * SLOTS]))
                    }
                };
                let mut sum = reduce(lanes);
                if !bias.is_null() {
                    // SAFETY: the caller's.
                    sum += unsafe { *bias.add(o) };
                }
                // SAFETY: the caller's.
                unsafe { *y.add(r * n + o) = sum };
            }
        }
    }
}

/// One row's values: codes and window scales, or f32.
#[derive(Clone, Copy)]
enum Vals<'a> {
    I8(&'a [i8], &'a [f32]),
    F32(&'a [f32]),
}

/// The widest path this host runs for the 16 lane sums (lane `j` over slot `j` of every
/// window), detected once per layout rather than once per output.
fn host_lanes() -> LanesFn {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            // SAFETY: AVX-512F is present; the slices are a row's (checked by the caller).
            return |x, index, vals| unsafe { x86::lanes_avx512(x, index, vals) };
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: AVX2 and FMA are present.
            return |x, index, vals| unsafe { x86::lanes_avx2(x, index, vals) };
        }
    }
    lanes_portable
}

/// The lane sums in plain Rust, the definition the vector paths match bit for bit.
fn lanes_portable(x: &[f32], index: &[u8], vals: Vals<'_>) -> [f32; SLOTS] {
    let mut acc = [0f32; SLOTS];
    for (w, idx) in index.chunks_exact(SLOTS).enumerate() {
        let xw = &x[w * WINDOW..(w + 1) * WINDOW];
        for j in 0..SLOTS {
            let v = match vals {
                Vals::I8(q, s) => q[w * SLOTS + j] as f32 * s[w],
                Vals::F32(v) => v[w * SLOTS + j],
            };
            acc[j] = v.mul_add(xw[idx[j] as usize], acc[j]);
        }
    }
    acc
}

/// The lanes summed pairwise: 8 + 8, 4 + 4, 2 + 2, 1 + 1.
fn reduce(mut a: [f32; SLOTS]) -> f32 {
    let mut width = SLOTS / 2;
    while width > 0 {
        for j in 0..width {
            a[j] += a[j + width];
        }
        width /= 2;
    }
    a[0]
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{SLOTS, Vals, WINDOW};
    use std::arch::x86_64::*;

    /// 16 lanes in one register; the window's 32 inputs in two, permuted by the indices.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn lanes_avx512(x: &[f32], index: &[u8], vals: Vals<'_>) -> [f32; SLOTS] {
        let windows = index.len() / SLOTS;
        let mut acc = _mm512_setzero_ps();
        for w in 0..windows {
            // SAFETY: window w's inputs, indices and values are in bounds (x holds 32 per
            // window, index and values 16).
            unsafe {
                let xp = x.as_ptr().add(w * WINDOW);
                let (lo, hi) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(index.as_ptr().add(w * SLOTS) as *const __m128i));
                let xs = _mm512_permutex2var_ps(lo, idx, hi);
                let v = match vals {
                    Vals::I8(q, s) => {
                        let codes = _mm512_cvtepi8_epi32(_mm_loadu_si128(q.as_ptr().add(w * SLOTS) as *const __m128i));
                        _mm512_mul_ps(_mm512_cvtepi32_ps(codes), _mm512_set1_ps(s[w]))
                    }
                    Vals::F32(v) => _mm512_loadu_ps(v.as_ptr().add(w * SLOTS)),
                };
                acc = _mm512_fmadd_ps(v, xs, acc);
            }
        }
        let mut out = [0f32; SLOTS];
        // SAFETY: out holds 16 floats.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
        out
    }

    /// Two registers of 8 lanes; each half of the window (16 inputs) in two, permuted and
    /// blended by the indices.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn lanes_avx2(x: &[f32], index: &[u8], vals: Vals<'_>) -> [f32; SLOTS] {
        let windows = index.len() / SLOTS;
        let mut acc = [_mm256_setzero_ps(); 2];
        let seven = _mm256_set1_epi32(7);
        for w in 0..windows {
            for (h, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as in lanes_avx512; slots 8h.. of a window read its columns
                // 16h..16h+16 (four groups of at most 8 columns, never across the half).
                unsafe {
                    let xp = x.as_ptr().add(w * WINDOW + 16 * h);
                    let (a, b) = (_mm256_loadu_ps(xp), _mm256_loadu_ps(xp.add(8)));
                    let at = index.as_ptr().add(w * SLOTS + 8 * h) as *const __m128i;
                    let idx =
                        _mm256_sub_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(at)), _mm256_set1_epi32(16 * h as i32));
                    let (pa, pb) = (_mm256_permutevar8x32_ps(a, idx), _mm256_permutevar8x32_ps(b, idx));
                    let high = _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, seven));
                    let xs = _mm256_blendv_ps(pa, pb, high);
                    let v = match vals {
                        Vals::I8(q, s) => {
                            let at = q.as_ptr().add(w * SLOTS + 8 * h) as *const __m128i;
                            let codes = _mm256_cvtepi8_epi32(_mm_loadl_epi64(at));
                            _mm256_mul_ps(_mm256_cvtepi32_ps(codes), _mm256_set1_ps(s[w]))
                        }
                        Vals::F32(v) => _mm256_loadu_ps(v.as_ptr().add(w * SLOTS + 8 * h)),
                    };
                    *acc = _mm256_fmadd_ps(v, xs, *acc);
                }
            }
        }
        let mut out = [0f32; SLOTS];
        // SAFETY: out holds 16 floats.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), acc[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), acc[1]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::IntFormat;
    use kiln_ir::sparse::{densify, pack};

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A random `[n, k]` weight of pattern `pn:pm` (some groups keeping fewer), packed.
    fn weight(n: usize, k: usize, (pn, pm): (usize, usize), format: Format, seed: u64) -> (Vec<f32>, SparseWeight) {
        let w = values(n * k, seed);
        let keep: Vec<bool> = (0..n * k)
            .map(|i| {
                let (g, c) = ((i % k) / pm, (i % k) % pm);
                // Group 3 of every row keeps one value fewer than it could.
                let limit = if g == 3 { pn - 1 } else { pn };
                (c + g + i / k) % pm < limit
            })
            .collect();
        let (vals, mask) = pack(pn as u64, pm as u64, n as u64, k as u64, &w, &keep).unwrap();
        let shape = vec![n as u64, (k / pm * pn) as u64];
        let data = match format {
            Format::Int(f) => TensorData::new(format, shape, kiln_ir::Bytes::from_vec(f.quantize(&vals))).unwrap(),
            _ => TensorData::from_f32(shape, &vals),
        };
        let decoded = data.to_f32().unwrap();
        let dense = densify(pn as u64, pm as u64, n as u64, k as u64, &decoded, &mask).unwrap();
        (dense, SparseWeight::new(pn as u64, pm as u64, n, k, &data, &mask).unwrap())
    }

    /// The kernel against the dense product of the weight's meaning, for int8 and f32
    /// values, 2:4 and 4:8, with and without bias, on every path the host has; the paths
    /// agree bit for bit.
    #[test]
    fn kernel_matches_the_dense_product() {
        let int8 = Format::Int(IntFormat::new(8, 32, false).unwrap());
        for (format, pattern, (n, k), m) in [
            (int8, (2, 4), (7, 128), 3),
            (Format::F32, (2, 4), (5, 64), 2),
            (int8, (4, 8), (3, 192), 1),
            (Format::F32, (8, 16), (4, 32), 2),
        ] {
            let (dense, sw) = weight(n, k, pattern, format, 3);
            let x = values(m * k, 5);
            let bias = values(n, 7);
            for with_bias in [false, true] {
                let mut y = vec![f32::NAN; m * n];
                let b = if with_bias { bias.as_ptr() } else { std::ptr::null() };
                // Two calls over disjoint outputs, as threads split them.
                unsafe {
                    sw.run(x.as_ptr(), m, y.as_mut_ptr(), b, 0..n / 2);
                    sw.run(x.as_ptr(), m, y.as_mut_ptr(), b, n / 2..n);
                }
                for r in 0..m {
                    for o in 0..n {
                        let want: f64 = (0..k).map(|c| dense[o * k + c] as f64 * x[r * k + c] as f64).sum::<f64>()
                            + if with_bias { bias[o] as f64 } else { 0.0 };
                        let got = y[r * n + o] as f64;
                        assert!(
                            (got - want).abs() < 1e-4,
                            "{format} {pattern:?} row {r} out {o}: {got} against {want}"
                        );
                    }
                }
            }
            // Every path the host has gives the portable path's bits.
            let windows = k / WINDOW;
            for o in 0..n {
                let index = &sw.index[o * windows * SLOTS..(o + 1) * windows * SLOTS];
                let vals = match &sw.values {
                    Values::I8 { q, scales } => Vals::I8(
                        &q[o * windows * SLOTS..(o + 1) * windows * SLOTS],
                        &scales[o * windows..(o + 1) * windows],
                    ),
                    Values::F32(v) => Vals::F32(&v[o * windows * SLOTS..(o + 1) * windows * SLOTS]),
                };
                let portable = lanes_portable(&x[..k], index, vals);
                #[cfg(target_arch = "x86_64")]
                {
                    if std::is_x86_feature_detected!("avx512f") {
                        assert_eq!(unsafe { x86::lanes_avx512(&x[..k], index, vals) }, portable, "avx512 {format}");
                    }
                    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                        assert_eq!(unsafe { x86::lanes_avx2(&x[..k], index, vals) }, portable, "avx2 {format}");
                    }
                }
            }
        }
    }

    /// Layouts only where every 32 columns keep 16 values.
    #[test]
    fn which_patterns_fit() {
        assert!(SparseWeight::fits(2, 4, 576) && SparseWeight::fits(4, 8, 64) && SparseWeight::fits(8, 16, 32));
        assert!(!SparseWeight::fits(16, 32, 64), "a group wider than half a window");
        assert!(!SparseWeight::fits(1, 4, 64), "a quarter kept");
        assert!(!SparseWeight::fits(2, 4, 48), "48 columns are no whole windows");
        assert!(!SparseWeight::fits(288, 576, 576), "unstructured rows");
    }
}
