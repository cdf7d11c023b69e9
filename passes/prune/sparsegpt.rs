//! SparseGPT (Frantar and Alistarh, "SparseGPT: Massive Language Models Can Be Accurately
//! Pruned in One-Shot", 2023): GPTQ's sweep with a mask instead of a rounding grid.
//!
//! For a linear `y = W x` with `H = sum x x^T` over calibration inputs, pruning changes the
//! layer's output by `trace((W - P) H (W - P)^T)`. Going through the columns in order, each
//! weight is either kept or set to 0, and the error of a removed one is spread onto the
//! columns not yet visited, the optimal (OBS) correction given the ones already fixed: the
//! same update as GPTQ's, whose sweep this module shares ([`Factored`]: `M` upper
//! triangular with `M M^T = H + damp I`; see `quantize::gptq`'s documentation). A kept
//! weight takes its corrected value `x = w0 + a / M_ii`; a removed one leaves `e = M_ii x`
//! to spread.
//!
//! # The mask
//!
//! The mask is chosen as the sweep goes, from the weights as corrected so far, by OBS's
//! saliency `w^2 / [H^-1]_jj^2 = (w M_jj)^2` (the diagonal of the upper Cholesky factor of
//! `H^-1` is `1 / M_jj`):
//! - **N:M**: at the first column of each group of `M`, the group's `N` most salient weights
//!   of each row are kept (the paper's choice).
//! - **Unstructured** (`N` of every row of `cols`, kiln's format): the paper chooses the mask
//!   of each block of 128 columns at the block's start, by one threshold over the block's
//!   weights of every row. kiln's format stores the same count in every row, so the row's
//!   `N` is shared out over its blocks in proportion to their widths (largest remainders
//!   first, ties to the earlier block), and each row keeps its block's share of its most
//!   salient weights.
//!
//! The current weights of a group or block, `w0[G] + y` with `M[G, G]^T y = a[G]`, come
//! from one triangular solve for every row of a chunk (as GPTQ fits a group's scales); all
//! corrections from earlier columns have landed by then, because within a block each
//! column's correction reaches the rest of the block at once (rank-1 updates), and the
//! block's reach the later columns as one product when it ends. Ties go to the lower column.
//!
//! # Quantizing kept weights
//!
//! [`round_kept`] runs the same sweep with a given mask and rounds each kept weight, as its
//! column comes, to the value it will be stored as: GPTQ on the kept weights (the paper's
//! joint pruning and quantization), which the quantize pass runs on pruned layers.
//!
//! Rows are independent given `H`: chunks of rows run in parallel, each column major so
//! that a column's step is vector work over the rows.

use crate::quantize::gptq::{Factored, GptqError, GptqOptions, clear_upper_ymm};
use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

/// Columns per block: the unit of the lazy updates, and of the unstructured mask.
pub const BLOCK: usize = 128;

/// What [`sparsegpt`] produced for a weight `[rows, cols]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pruned {
    /// The pruned weight, row-major: kept weights as corrected, the others 0.
    pub values: Vec<f32>,
    /// Which weights are kept.
    pub keep: Vec<bool>,
    /// `sum e^2`: the output error `trace((W - P) H (W - P)^T)` under the damped `H`, as the
    /// sweep tracked it.
    pub loss: f64,
}

/// Prunes `w` (`[rows, cols]` row-major, `(out, in)`) to keep `n` of every `m` consecutive
/// weights along a row (`m = cols`: `n` per row, unstructured), given `h` (`[cols, cols]`
/// row-major, the sum of `x x^T` over calibration inputs), with `damp` times the mean
/// diagonal added to it (GPTQ's damping, raised if the factorization fails).
pub fn sparsegpt(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    (n, m): (usize, usize),
    damp: f64,
) -> Result<Pruned, GptqError> {
    if n == 0 || n >= m || m > cols || !cols.is_multiple_of(m) {
        return Err(GptqError::Options("the pattern keeps 1 <= n < m of every m columns, m dividing the row"));
    }
    let block = if m == cols || BLOCK.is_multiple_of(m) { BLOCK } else { (BLOCK / m).max(1) * m }.min(cols);
    sweep(w, rows, cols, h, damp, block, Rule::Choose(&units(cols, block, n, m)))
}

/// GPTQ on the kept weights of a sparse layer (SparseGPT's joint pruning and quantization,
/// with the mask given): the sweep keeps the weights `keep` marks (`[rows, cols]`
/// row-major), each rounded by `round(row, col, x)` to the value it will store, sets the
/// others to 0, and spreads each one's error onto the columns not yet visited. `w` is the
/// dense weight (removed weights 0, or not: they are removed either way).
pub fn round_kept(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    keep: &[bool],
    damp: f64,
    round: &(dyn Fn(usize, usize, f32) -> f32 + Sync),
) -> Result<Pruned, GptqError> {
    if keep.len() != rows * cols {
        return Err(GptqError::WeightShape { n: rows, k: cols, found: keep.len() });
    }
    sweep(w, rows, cols, h, damp, BLOCK.min(cols), Rule::Round { keep, round })
}

/// The sweep over every row of `w`, in parallel chunks of rows.
fn sweep(
    w: &[f32],
    rows: usize,
    cols: usize,
    h: &[f64],
    damp: f64,
    block: usize,
    rule: Rule<'_>,
) -> Result<Pruned, GptqError> {
    if w.len() != rows * cols {
        return Err(GptqError::WeightShape { n: rows, k: cols, found: w.len() });
    }
    if !w.iter().all(|x| x.is_finite()) {
        return Err(GptqError::NonFinite("weight"));
    }
    let factored = Factored::new(h, cols, &GptqOptions { damp, block: BLOCK, act_order: false, clip: false })?;
    let sweep = Sweep { k: cols, block, m: factored.factor(), dead: factored.dead(), rule };
    let chunk = rows.div_ceil(4 * rayon::current_num_threads()).clamp(16, 128);
    let parts: Vec<Pruned> =
        w.par_chunks(chunk * cols.max(1)).enumerate().map(|(i, wc)| sweep.rows(wc, i * chunk)).collect();
    let mut out = Pruned { values: Vec::with_capacity(w.len()), keep: Vec::with_capacity(w.len()), loss: 0.0 };
    for p in parts {
        out.values.extend(p.values);
        out.keep.extend(p.keep);
        out.loss += p.loss;
    }
    Ok(out)
}

/// The units the mask is chosen over, `(start, end, kept per row)`, in column order: the
/// groups of `m` for N:M; for unstructured rows (`m = cols`), the blocks, sharing out `n`.
fn units(cols: usize, block: usize, n: usize, m: usize) -> Vec<(usize, usize, usize)> {
    if m < cols {
        return (0..cols).step_by(m).map(|s| (s, s + m, n)).collect();
    }
    let blocks: Vec<(usize, usize)> = (0..cols).step_by(block).map(|s| (s, (s + block).min(cols))).collect();
    let mut share: Vec<usize> = blocks.iter().map(|(s, e)| n * (e - s) / cols).collect();
    let mut order: Vec<usize> = (0..blocks.len()).collect();
    // Largest remainder first (n (e - s) mod cols), ties to the earlier block.
    order.sort_by_key(|&b| (std::cmp::Reverse(n * (blocks[b].1 - blocks[b].0) % cols), b));
    let short = n - share.iter().sum::<usize>();
    for &b in &order[..short] {
        share[b] += 1;
    }
    blocks.iter().zip(share).map(|(&(s, e), c)| (s, e, c)).collect()
}

/// What the sweep does with each weight when its column comes.
enum Rule<'a> {
    /// Choose the mask over these units (`(start, end, kept per row)`, in column order) as
    /// the sweep reaches each, and keep the chosen weights as corrected.
    Choose(&'a [(usize, usize, usize)]),
    /// Keep the weights of a given mask (`[rows, cols]` row-major), each rounded by
    /// `round(row, col, x)`.
    Round { keep: &'a [bool], round: &'a (dyn Fn(usize, usize, f32) -> f32 + Sync) },
}

/// The per-layer state of the sweep, shared by the chunks of rows.
struct Sweep<'a> {
    k: usize,
    block: usize,
    /// The factor of the damped `H` ([`Factored::factor`]).
    m: &'a [f32],
    dead: &'a [bool],
    rule: Rule<'a>,
}

impl Sweep<'_> {
    /// `acc[:, to] += D[:, from] M[from, to]`, all column major but `M` (as in GPTQ).
    fn correct(&self, acc: &mut [f32], rows: usize, (f1, f2): (usize, usize), (t1, t2): (usize, usize), delta: &[f32]) {
        if t1 == t2 {
            return;
        }
        let k = self.k;
        let dst = MatMut::from_column_major_slice_with_stride_mut(&mut acc[t1 * rows..], rows, t2 - t1, rows);
        let d = MatRef::from_column_major_slice_with_stride(delta, rows, f2 - f1, rows);
        let mm = MatRef::from_row_major_slice_with_stride(&self.m[f1 * k + t1..], f2 - f1, t2 - t1, k);
        matmul(dst, Accum::Add, d, mm, 1.0f32, Par::Seq);
        clear_upper_ymm();
    }

    /// Chooses the kept weights of unit `(s, e, count)` for every row (column major `keep`),
    /// from the current weights `orig[G] + y`, `M[G, G]^T y = acc[G]`.
    fn choose(&self, orig: &[f32], acc: &[f32], rows: usize, (s, e, count): (usize, usize, usize), keep: &mut [bool]) {
        let (k, g) = (self.k, e - s);
        let mut current = vec![0f32; rows * g];
        for t in 0..g {
            for r in 0..rows {
                current[r * g + t] = acc[(s + t) * rows + r];
            }
        }
        let mt = MatRef::from_column_major_slice_with_stride(&self.m[s * k + s..], g, g, k);
        solve_lower_triangular_in_place(mt, MatMut::from_column_major_slice_mut(&mut current, g, rows), Par::Seq);
        clear_upper_ymm();
        let mut order: Vec<usize> = Vec::with_capacity(g);
        let mut score = vec![0f32; g];
        for r in 0..rows {
            for t in 0..g {
                let x = current[r * g + t] + orig[(s + t) * rows + r];
                score[t] = (x * self.m[(s + t) * k + s + t]).powi(2);
            }
            order.clear();
            order.extend(0..g);
            if count < g {
                order.select_nth_unstable_by(count, |&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
            }
            for &t in &order[..count] {
                keep[(s + t) * rows + r] = true;
            }
        }
    }

    /// Prunes the rows `w` (row-major, natural order), the first of which is the layer's
    /// row `row0`.
    fn rows(&self, w: &[f32], row0: usize) -> Pruned {
        // This thread may have run faer's kernels for another call.
        clear_upper_ymm();
        let (k, m) = (self.k, self.m);
        let rows = w.len() / k;
        // Column major: `orig`, the rows (dead columns zeroed), overwritten by the pruned
        // values as the sweep goes; `acc`, the pending corrections M^T d.
        let mut orig = vec![0f32; k * rows];
        for r in 0..rows {
            for c in 0..k {
                orig[c * rows + r] = if self.dead[c] { 0.0 } else { w[r * k + c] };
            }
        }
        let mut acc = vec![0f32; k * rows];
        let mut keep = vec![false; k * rows];
        let (units, round) = match self.rule {
            Rule::Choose(units) => (units, None),
            Rule::Round { keep: given, round } => {
                for r in 0..rows {
                    for c in 0..k {
                        keep[c * rows + r] = given[(row0 + r) * k + c];
                    }
                }
                (&[][..], Some(round))
            }
        };
        let mut delta = vec![0f32; self.block * rows];
        let mut units = units.iter().peekable();
        let mut loss = 0.0f64;
        for i1 in (0..k).step_by(self.block) {
            let i2 = (i1 + self.block).min(k);
            for i in i1..i2 {
                if let Some(&&unit) = units.peek().filter(|u| u.0 == i) {
                    self.choose(&orig, &acc, rows, unit, &mut keep);
                    units.next();
                }
                let mrow = &m[i * k..(i + 1) * k];
                let mii = mrow[i];
                let (column, kept) = (&mut orig[i * rows..(i + 1) * rows], &keep[i * rows..(i + 1) * rows]);
                let (done, later) = acc[i * rows..i2 * rows].split_at_mut(rows);
                let d = &mut delta[(i - i1) * rows..(i - i1 + 1) * rows];
                for r in 0..rows {
                    let x = column[r] + done[r] / mii;
                    let v = match (kept[r], round) {
                        (false, _) => 0.0,
                        (true, None) => x,
                        (true, Some(round)) => round(row0 + r, i, x),
                    };
                    let e = mii * (x - v);
                    loss += e as f64 * e as f64;
                    d[r] = column[r] - v;
                    column[r] = v;
                }
                // The rest of the block: acc[:, t] += M[i, t] d.
                for (a, &mit) in later.chunks_exact_mut(rows).zip(&mrow[i + 1..i2]) {
                    for (a, &d) in a.iter_mut().zip(d.iter()) {
                        *a += mit * d;
                    }
                }
            }
            // acc[:, i2..] += D M[i1..i2, i2..]
            self.correct(&mut acc, rows, (i1, i2), (i2, k), &delta);
        }
        let mut values = vec![0f32; rows * k];
        let mut kept = vec![false; rows * k];
        for r in 0..rows {
            for c in 0..k {
                values[r * k + c] = orig[c * rows + r];
                kept[r * k + c] = keep[c * rows + r];
            }
        }
        Pruned { values, keep: kept, loss }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prune::{choose, wanda_scores};
    use crate::quantize::gptq::output_error;
    use crate::testing::values;

    /// `H = X^T X` of `t` inputs of width `k` whose columns are correlated (each a mix of
    /// a few shared sources) and of very different sizes.
    fn correlated(k: usize, t: usize, seed: u64) -> Vec<f64> {
        let sources = 6;
        let z = values(t * sources, seed);
        let mix = values(sources * k, seed + 1);
        let noise = values(t * k, seed + 2);
        let mut x = vec![0f64; t * k];
        for i in 0..t {
            for j in 0..k {
                let scale = 1.0 + (j % 5) as f64;
                let mixed: f64 = (0..sources).map(|s| z[i * sources + s] as f64 * mix[s * k + j] as f64).sum();
                x[i * k + j] = scale * (mixed + 0.1 * noise[i * k + j] as f64);
            }
        }
        let mut h = vec![0f64; k * k];
        for i in 0..t {
            for a in 0..k {
                for b in 0..k {
                    h[a * k + b] += x[i * k + a] * x[i * k + b];
                }
            }
        }
        h
    }

    fn damped(h: &[f64], k: usize, damp: f64) -> Vec<f64> {
        let add = damp * (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
        let mut h = h.to_vec();
        (0..k).for_each(|i| h[i * k + i] += add);
        h
    }

    /// The paper's algorithm as written, in f64, one column at a time: `U` the upper
    /// Cholesky factor of `H^-1`, the weights updated in place, the mask of a unit chosen
    /// from the weights as they stand at its first column.
    fn reference(w: &[f32], rows: usize, k: usize, h: &[f64], units: &[(usize, usize, usize)]) -> Vec<f64> {
        let hm = faer::Mat::<f64>::from_fn(k, k, |i, j| h[i * k + j]);
        use faer::linalg::solvers::DenseSolveCore;
        let inv = hm.llt(faer::Side::Lower).unwrap().inverse();
        // Upper U with U^T U = H^-1: U = L^T for H^-1 = L L^T.
        let l = inv.llt(faer::Side::Lower).unwrap().L().to_owned();
        let u = |i: usize, j: usize| l[(j, i)];
        let mut out = vec![0f64; rows * k];
        for r in 0..rows {
            let mut wr: Vec<f64> = w[r * k..(r + 1) * k].iter().map(|&x| x as f64).collect();
            let mut keep = vec![false; k];
            for i in 0..k {
                if let Some(&(s, e, count)) = units.iter().find(|un| un.0 == i) {
                    let mut order: Vec<usize> = (s..e).collect();
                    let score = |j: usize| (wr[j] / u(j, j)).powi(2);
                    order.sort_by(|&a, &b| score(b).total_cmp(&score(a)).then(a.cmp(&b)));
                    order[..count].iter().for_each(|&j| keep[j] = true);
                }
                let q = if keep[i] { wr[i] } else { 0.0 };
                let err = (wr[i] - q) / u(i, i);
                for (j, w) in wr.iter_mut().enumerate().skip(i) {
                    *w -= err * u(i, j);
                }
                wr[i] = q;
            }
            out[r * k..(r + 1) * k].copy_from_slice(&wr);
        }
        out
    }

    /// The blocked, column-major sweep computes what the paper's algorithm computes, for N:M
    /// and unstructured rows, across block boundaries; and its tracked loss is the output
    /// error under the damped H.
    #[test]
    fn matches_the_papers_algorithm() {
        let (rows, k) = (20, 320); // 320 = 2.5 blocks
        let w = values(rows * k, 11);
        let h = correlated(k, 600, 3);
        for (n, m) in [(2, 4), (4, 8), (150, 320)] {
            let p = sparsegpt(&w, rows, k, &h, (n, m), 0.01).unwrap();
            let block = BLOCK.min(k);
            let want = reference(&w, rows, k, &damped(&h, k, 0.01), &units(k, block, n, m));
            let scale = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
            let mut differ = 0;
            for (i, (&got, &want)) in p.values.iter().zip(&want).enumerate() {
                if (got == 0.0) != (want == 0.0) {
                    differ += 1;
                } else {
                    assert!((got as f64 - want).abs() < 2e-3 * scale, "{n}:{m} at {i}: {got} against {want}");
                }
            }
            // f32 against f64 may flip a near tie; the masks agree otherwise.
            assert!(differ <= rows * k / 500, "{n}:{m}: {differ} mask entries differ");
            let error = output_error(&w, &p.values, rows, k, &damped(&h, k, 0.01));
            assert!((p.loss - error).abs() < 1e-3 * error, "{n}:{m}: tracked {} against {error}", p.loss);
        }
    }

    /// Every group keeps exactly N, every row of an unstructured mask exactly its count,
    /// and the values are zero exactly where the mask says so.
    #[test]
    fn masks_keep_their_counts() {
        let (rows, k) = (9, 256);
        let w = values(rows * k, 5);
        let h = correlated(k, 400, 8);
        for (n, m) in [(2, 4), (1, 4), (4, 8), (100, 256), (255, 256)] {
            let p = sparsegpt(&w, rows, k, &h, (n, m), 0.01).unwrap();
            for (g, keep) in p.keep.chunks(m).enumerate() {
                assert_eq!(keep.iter().filter(|&&b| b).count(), n, "{n}:{m}: group {g}");
            }
            for (v, &kept) in p.values.iter().zip(&p.keep) {
                assert!(kept || *v == 0.0, "a removed weight is 0");
            }
        }
        // The unstructured share: 100 of 256 over two blocks of 128 is 50 and 50; 255 of
        // 320 over 128, 128, 64 is 102, 102, 51.
        assert_eq!(units(256, 128, 100, 256), [(0, 128, 50), (128, 256, 50)]);
        assert_eq!(units(320, 128, 255, 320), [(0, 128, 102), (128, 256, 102), (256, 320, 51)]);
        assert_eq!(units(320, 128, 101, 320), [(0, 128, 41), (128, 256, 40), (256, 320, 20)]);
    }

    /// With uncorrelated inputs of equal energy there is nothing to spread: the mask is
    /// magnitude's and the kept weights are the original ones.
    #[test]
    fn uncorrelated_inputs_prune_by_magnitude() {
        let (rows, k) = (7, 64);
        let w = values(rows * k, 2);
        let mut h = vec![0f64; k * k];
        (0..k).for_each(|i| h[i * k + i] = 3.0);
        let p = sparsegpt(&w, rows, k, &h, (2, 4), 0.01).unwrap();
        let magnitude: Vec<f64> = w.iter().map(|x| x.abs() as f64).collect();
        assert_eq!(p.keep, choose(&magnitude, k, 2, 4));
        for ((&v, &o), &kept) in p.values.iter().zip(&w).zip(&p.keep) {
            assert_eq!(v, if kept { o } else { 0.0 });
        }
    }

    /// On a layer with correlated inputs, SparseGPT's output error is below Wanda's, and
    /// Wanda's below magnitude's, at 50% and at 2:4.
    #[test]
    fn sparsegpt_beats_wanda_beats_magnitude() {
        let (rows, k) = (32, 128);
        let w = values(rows * k, 17);
        let h = correlated(k, 512, 21);
        let diagonal: Vec<f64> = (0..k).map(|i| h[i * k + i]).collect();
        for (n, m) in [(64, 128), (2, 4)] {
            let masked = |keep: Vec<bool>| -> Vec<f32> {
                w.iter().zip(keep).map(|(&v, kept)| if kept { v } else { 0.0 }).collect()
            };
            let magnitude = masked(choose(&w.iter().map(|x| x.abs() as f64).collect::<Vec<_>>(), k, n, m));
            let wanda = masked(choose(&wanda_scores(&w, k, &diagonal), k, n, m));
            let sparse = sparsegpt(&w, rows, k, &h, (n, m), 0.01).unwrap().values;
            let [e_mag, e_wanda, e_sparse] = [magnitude, wanda, sparse].map(|p| output_error(&w, &p, rows, k, &h));
            assert!(e_sparse < 0.8 * e_wanda, "{n}:{m}: SparseGPT {e_sparse} against Wanda {e_wanda}");
            assert!(e_wanda < e_mag, "{n}:{m}: Wanda {e_wanda} against magnitude {e_mag}");
        }
    }

    /// With the mask SparseGPT chose fixed and nothing rounded, the sweep computes what
    /// SparseGPT computed, bit for bit (37 rows: chunks that start past row 0).
    #[test]
    fn a_fixed_mask_reproduces_the_chosen_one() {
        let (rows, k) = (37, 320);
        let w = values(rows * k, 13);
        let h = correlated(k, 600, 4);
        for (n, m) in [(2, 4), (160, 320)] {
            let p = sparsegpt(&w, rows, k, &h, (n, m), 0.01).unwrap();
            let q = round_kept(&w, rows, k, &h, &p.keep, 0.01, &|_, _, x| x).unwrap();
            assert_eq!(q, p, "{n}:{m}");
        }
    }

    /// GPTQ on kept values: every kept value lands on the grid, every removed weight stays
    /// 0, and the output error is well below that of rounding the kept values to nearest.
    #[test]
    fn rounding_kept_values_spreads_their_error() {
        let (rows, k) = (24, 256);
        let w = values(rows * k, 19);
        let h = correlated(k, 512, 7);
        let p = sparsegpt(&w, rows, k, &h, (2, 4), 0.01).unwrap();
        // int4-like: 16 steps per row, the largest kept value at -8 or 7 steps.
        let step: Vec<f32> = p.values.chunks(k).map(|r| r.iter().fold(0f32, |a, &b| a.max(b.abs())) / 7.0).collect();
        let grid = |r: usize, _: usize, x: f32| (x / step[r]).round().clamp(-8.0, 7.0) * step[r];
        let nearest: Vec<f32> =
            p.values.iter().enumerate().map(|(i, &v)| if p.keep[i] { grid(i / k, 0, v) } else { 0.0 }).collect();
        let q = round_kept(&p.values, rows, k, &h, &p.keep, 0.01, &grid).unwrap();
        assert_eq!(q.keep, p.keep);
        for (i, &v) in q.values.iter().enumerate() {
            assert_eq!(v, if p.keep[i] { grid(i / k, 0, v) } else { 0.0 }, "at {i}");
        }
        let [e_nearest, e_swept] = [nearest, q.values].map(|v| output_error(&p.values, &v, rows, k, &h));
        assert!(e_swept < 0.7 * e_nearest, "GPTQ {e_swept} against rounding {e_nearest}");
        assert!(round_kept(&p.values, rows, k, &h, &p.keep[1..], 0.01, &grid).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        let h = vec![1.0; 64];
        assert!(sparsegpt(&[0.0; 15], 2, 8, &h, (2, 4), 0.01).is_err());
        assert!(sparsegpt(&[0.0; 16], 2, 8, &h, (4, 4), 0.01).is_err());
        assert!(sparsegpt(&[0.0; 16], 2, 8, &h, (2, 3), 0.01).is_err());
        assert!(sparsegpt(&[0.0; 16], 2, 8, &h[..63], (2, 4), 0.01).is_err());
        assert!(sparsegpt(&[f32::NAN; 16], 2, 8, &h, (2, 4), 0.01).is_err());
    }
}
