//! Tensor-train (MPO) factors of one weight, for `factorize(method=tt)`.
//!
//! `W [n, k]` with `n = o_1 ... o_d` and `k = i_1 ... i_d` ([`modes`]) is read as the tensor
//! `T[o_1, i_1, o_2, i_2, ..., o_d, i_d] = W[(o_1 ... o_d), (i_1 ... i_d)]` (row-major
//! indices), and TT-SVD (Oseledets 2011) cuts it into cores `G_j [r_{j-1}, o_j, i_j, r_j]`
//! (`r_0 = r_d = 1`): `T = G_1 G_2 ... G_d` contracted over the bonds. Each step takes the
//! SVD of what is left, reshaped `[r_{j-1} o_j i_j, rest]`, keeps at most `max_bond`
//! singular vectors, and carries `S V^T` on. With every bond at its full rank the cores
//! reproduce `W`; truncated, the squared Frobenius error is at most the sum of the
//! discarded squared singular values of all steps (each step's projection is orthogonal).
//!
//! **Whitening** ([`Kronecker`]). A layer's output error on the calibration rows is
//! `||(W - W') L||^2` for `L L^T = H`, the input Gram; SVD-LLM takes the SVD of `W L`. A
//! train cannot absorb a dense `L^-1`, but it can absorb one factor per input mode. So `H`
//! is approximated as `D (C_1 x ... x C_d) D`: `D` the diagonal of root mean squares (the
//! few massive channels of a model's activations live there), and `C_j` the partial trace
//! of the correlation `D^-1 H D^-1` over every mode but `j`. TT-SVD runs on `W D (L_1 x ...
//! x L_d)` with `C_j = L_j L_j^T`; each core's input index is mapped back by `L_j^-1`, and
//! `D^-1` is kept as a scale of the rebuilt weight's columns (`k` more values).
use faer::Mat;
use faer::linalg::solvers::DenseSolveCore;

/// `n` as `d` factors, ascending, as even as possible (the least ratio of the largest to
/// the smallest): 576 = 8 x 8 x 9, 1536 = 8 x 12 x 16, 384 = 6 x 8 x 8.
pub fn modes(n: usize, d: usize) -> Vec<usize> {
    fn search(n: usize, d: usize, from: usize, current: &mut Vec<usize>, best: &mut Option<Vec<usize>>) {
        if d == 1 {
            if n >= from {
                current.push(n);
                let ratio = |m: &[usize]| m[m.len() - 1] as f64 / m[0] as f64;
                if best.as_ref().is_none_or(|b| ratio(current) < ratio(b)) {
                    *best = Some(current.clone());
                }
                current.pop();
            }
            return;
        }
        let mut f = from.max(1);
        while f.pow(d as u32) <= n {
            if n.is_multiple_of(f) {
                current.push(f);
                search(n / f, d - 1, f, current, best);
                current.pop();
            }
            f += 1;
        }
    }
    let mut best = None;
    search(n, d.max(1), 1, &mut Vec::new(), &mut best);
    best.unwrap_or_else(|| vec![n])
}

/// One core, `[left, out, inp, right]` row-major.
#[derive(Clone, Debug)]
pub struct Core {
    pub left: usize,
    pub out: usize,
    pub inp: usize,
    pub right: usize,
    pub values: Vec<f64>,
}

/// The cores of one weight, and the singular values each step discarded.
#[derive(Clone, Debug)]
pub struct Train {
    pub cores: Vec<Core>,
    /// The sum of the squared singular values discarded at every step.
    pub discarded: f64,
}

impl Train {
    /// TT-SVD of `w` (`[n, k]`, row-major) with the modes given (their products must be
    /// `n` and `k`, and their counts equal) and bonds of at most `max_bond`.
    pub fn new(w: &[f32], out_modes: &[usize], in_modes: &[usize], max_bond: usize) -> Result<Train, String> {
        let w: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        Train::of(&w, out_modes, in_modes, max_bond)
    }

    /// [`Train::new`] in the whitened space of `whitening`: the cores' error is the
    /// layer's output error under the Kronecker-factored Gram. Also returns the scale of
    /// the rebuilt weight's columns (`D^-1`, see the module documentation).
    pub fn whitened(
        w: &[f32],
        out_modes: &[usize],
        in_modes: &[usize],
        max_bond: usize,
        whitening: &Kronecker,
    ) -> Result<(Train, Vec<f32>), String> {
        let x = whitening.apply(w, in_modes)?;
        let mut train = Train::of(&x, out_modes, in_modes, max_bond)?;
        for (core, l) in train.cores.iter_mut().zip(&whitening.factors) {
            let inverse = l.partial_piv_lu().inverse();
            // The core as `[left * out, inp, right]`: its input index mapped by L^-1.
            along_mode(&mut core.values, &[core.left * core.out, core.inp, core.right], 1, &inverse);
        }
        Ok((train, whitening.columns.iter().map(|&d| (1.0 / d) as f32).collect()))
    }

    /// TT-SVD of `w` (`[n, k]`, row-major, f64).
    fn of(w: &[f64], out_modes: &[usize], in_modes: &[usize], max_bond: usize) -> Result<Train, String> {
        let (n, k) = (out_modes.iter().product::<usize>(), in_modes.iter().product::<usize>());
        let d = out_modes.len();
        if d == 0 || in_modes.len() != d || w.len() != n * k || max_bond == 0 {
            return Err(format!("modes {out_modes:?} x {in_modes:?} for a weight of {} values", w.len()));
        }
        let t = interleave(w, out_modes, in_modes);
        let (mut cores, mut discarded) = (Vec::with_capacity(d), 0.0);
        // What is left, `[left * o_j * i_j, rest]`.
        let (mut left, mut rest) = (1usize, t);
        for j in 0..d {
            let (o, i) = (out_modes[j], in_modes[j]);
            let rows = left * o * i;
            let cols = rest.len() / rows;
            if j == d - 1 {
                cores.push(Core { left, out: o, inp: i, right: 1, values: rest });
                break;
            }
            let c = Mat::<f64>::from_fn(rows, cols, |r, c| rest[r * cols + c]);
            let svd = c.thin_svd().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
            let full = rows.min(cols);
            let keep = full.min(max_bond);
            discarded += (keep..full).map(|s| svd.S()[s] * svd.S()[s]).sum::<f64>();
            let (u, v) = (svd.U(), svd.V());
            let mut values = vec![0.0; rows * keep];
            for r in 0..rows {
                for s in 0..keep {
                    values[r * keep + s] = u[(r, s)];
                }
            }
            cores.push(Core { left, out: o, inp: i, right: keep, values });
            // S V^T, `[keep, cols]`.
            rest = (0..keep * cols).map(|at| svd.S()[at / cols] * v[(at % cols, at / cols)]).collect();
            left = keep;
        }
        Ok(Train { cores, discarded })
    }

    /// The multiply-adds per input row of contracting the cores with the activations one by
    /// one, `x [i_1 .. i_d]` to `y [o_1 .. o_d]`, instead of rebuilding `W` (core `j` meets
    /// `o_1 .. o_(j-1), r_(j-1), i_j .. i_d`).
    pub fn chain_macs(&self) -> usize {
        let mut total = 0;
        for (j, g) in self.cores.iter().enumerate() {
            let done: usize = self.cores[..j].iter().map(|c| c.out).product();
            let rest: usize = self.cores[j + 1..].iter().map(|c| c.inp).product();
            total += done * g.left * g.inp * g.out * g.right * rest;
        }
        total
    }

    /// The number of values in the cores.
    pub fn params(&self) -> usize {
        self.cores.iter().map(|c| c.values.len()).sum()
    }

    /// `W` rebuilt from the cores, `[n, k]` row-major.
    pub fn weight(&self) -> Vec<f64> {
        // Contract left to right into `[o_1 i_1 ... o_j i_j, r_j]`.
        let mut acc = vec![1.0];
        let mut width = 1; // the current left bond
        for c in &self.cores {
            let lead = acc.len() / width;
            let tail = c.out * c.inp * c.right;
            let mut next = vec![0.0; lead * tail];
            for a in 0..lead {
                for l in 0..width {
                    let x = acc[a * width + l];
                    for (t, g) in c.values[l * tail..(l + 1) * tail].iter().enumerate() {
                        next[a * tail + t] += x * g;
                    }
                }
            }
            acc = next;
            width = c.right;
        }
        let out_modes: Vec<usize> = self.cores.iter().map(|c| c.out).collect();
        let in_modes: Vec<usize> = self.cores.iter().map(|c| c.inp).collect();
        deinterleave(&acc, &out_modes, &in_modes)
    }
}

/// `W [n, k]` as the tensor `[o_1, i_1, ..., o_d, i_d]`, row-major.
fn interleave(w: &[f64], out_modes: &[usize], in_modes: &[usize]) -> Vec<f64> {
    let k: usize = in_modes.iter().product();
    let mut t = vec![0.0; w.len()];
    for (at, &v) in w.iter().enumerate() {
        t[tensor_index(at / k, at % k, out_modes, in_modes)] = v;
    }
    t
}

/// The bonds TT-SVD keeps with `max_bond` (each at most the rank the cut allows), `r_1` to
/// `r_(d-1)`.
pub fn bonds(out_modes: &[usize], in_modes: &[usize], max_bond: usize) -> Vec<usize> {
    let sizes: Vec<usize> = out_modes.iter().zip(in_modes).map(|(o, i)| o * i).collect();
    let mut out = Vec::new();
    let mut left = 1;
    for j in 0..sizes.len().saturating_sub(1) {
        let rest: usize = sizes[j + 1..].iter().product();
        let r = max_bond.min(left * sizes[j]).min(rest);
        out.push(r);
        left = r;
    }
    out
}

/// The values a train with these bonds stores.
pub fn params(out_modes: &[usize], in_modes: &[usize], bonds: &[usize]) -> usize {
    let edge = |j: usize| if j == 0 || j > bonds.len() { 1 } else { bonds[j - 1] };
    (0..out_modes.len()).map(|j| edge(j) * out_modes[j] * in_modes[j] * edge(j + 1)).sum()
}

/// The input Gram `H` (`k x k`, positive definite) approximated as `D (C_1 x ... x C_d) D`
/// for the input modes `i_1 ... i_d` (see the module documentation): `columns` is `D`'s
/// diagonal, `factors` the lower Cholesky factors `L_j` of the `C_j`.
#[derive(Clone, Debug)]
pub struct Kronecker {
    pub columns: Vec<f64>,
    pub factors: Vec<Mat<f64>>,
}

impl Kronecker {
    /// From `h` (row-major `k x k`, damped so that it is positive definite).
    pub fn new(h: &[f64], in_modes: &[usize]) -> Result<Kronecker, String> {
        let k: usize = in_modes.iter().product();
        if h.len() != k * k {
            return Err(format!("a Gram of {} values for {k} columns", h.len()));
        }
        let columns: Vec<f64> = (0..k).map(|j| h[j * k + j].max(0.0).sqrt()).collect();
        if columns.iter().any(|&d| d <= 0.0 || !d.is_finite()) {
            return Err("an input column with no energy: the Gram is not positive definite".into());
        }
        let mut factors = Vec::with_capacity(in_modes.len());
        for (j, &m) in in_modes.iter().enumerate() {
            let inner: usize = in_modes[j + 1..].iter().product();
            let outer = k / (m * inner);
            // C_j[a, b]: the mean over the other modes' digits of the correlation between
            // columns whose digit j is a and b.
            let mut c = Mat::<f64>::zeros(m, m);
            for p in 0..outer {
                for q in 0..inner {
                    for a in 0..m {
                        let ca = (p * m + a) * inner + q;
                        for b in 0..m {
                            let cb = (p * m + b) * inner + q;
                            c[(a, b)] += h[ca * k + cb] / (columns[ca] * columns[cb]);
                        }
                    }
                }
            }
            let others = (outer * inner) as f64;
            let c = Mat::from_fn(m, m, |a, b| c[(a, b)] / others);
            let llt = c
                .llt(faer::Side::Lower)
                .map_err(|e| format!("mode {j}'s correlation has no Cholesky factor: {e:?}"))?;
            factors.push(llt.L().to_owned());
        }
        Ok(Kronecker { columns, factors })
    }
}

impl Kronecker {
    /// `W D (L_1 x ... x L_d)`, row-major `[n, k]`.
    pub fn apply(&self, w: &[f32], in_modes: &[usize]) -> Result<Vec<f64>, String> {
        let k: usize = in_modes.iter().product();
        if self.factors.len() != in_modes.len() || self.columns.len() != k {
            return Err(format!("a whitening for {} columns in other modes than {in_modes:?}", self.columns.len()));
        }
        let mut x: Vec<f64> = w.iter().enumerate().map(|(at, &v)| v as f64 * self.columns[at % k]).collect();
        for (j, l) in self.factors.iter().enumerate() {
            along_mode(&mut x, in_modes, j, l);
        }
        Ok(x)
    }
}

/// The squared singular values of the tensor's unfolding at each cut, `[o_1 i_1 .. o_j i_j,
/// rest]` for `j = 1 .. d-1`, of `w` (whitened by `whitening`, if given): the spectra
/// TT-SVD cuts. [`estimate`] reads errors at any bonds from them.
pub fn unfoldings(
    w: &[f32],
    out_modes: &[usize],
    in_modes: &[usize],
    whitening: Option<&Kronecker>,
) -> Result<Vec<Vec<f64>>, String> {
    let x = match whitening {
        Some(wh) => wh.apply(w, in_modes)?,
        None => w.iter().map(|&v| v as f64).collect(),
    };
    let t = interleave(&x, out_modes, in_modes);
    let mut out = Vec::new();
    let mut rows = 1;
    for j in 0..out_modes.len().saturating_sub(1) {
        rows *= out_modes[j] * in_modes[j];
        let cols = t.len() / rows;
        let m = Mat::<f64>::from_fn(rows, cols, |r, c| t[r * cols + c]);
        let sigma = m.singular_values().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        out.push(sigma.iter().map(|s| s * s).collect());
    }
    Ok(out)
}

/// The error of a train with these bonds, estimated from the [`unfoldings`]: the sum over
/// cuts of the energy each cut's bond leaves out (TT-SVD's bound; exact for one cut).
pub fn estimate(unfoldings: &[Vec<f64>], bonds: &[usize]) -> f64 {
    unfoldings.iter().zip(bonds).map(|(s, &b)| s.iter().skip(b).sum::<f64>()).sum()
}

/// `x`, read as a row-major tensor of dims `modes` (and any leading dims before them),
/// multiplied along axis `axis` by `m`: `y[.., i, ..] = sum_j x[.., j, ..] m[j, i]`.
fn along_mode(x: &mut [f64], modes: &[usize], axis: usize, m: &Mat<f64>) {
    let size = modes[axis];
    let inner: usize = modes[axis + 1..].iter().product();
    let outer = x.len() / (size * inner);
    let mut column = vec![0.0; size];
    for p in 0..outer {
        for q in 0..inner {
            for (j, c) in column.iter_mut().enumerate() {
                *c = x[(p * size + j) * inner + q];
            }
            for i in 0..size {
                let mut sum = 0.0;
                for (j, c) in column.iter().enumerate() {
                    sum += c * m[(j, i)];
                }
                x[(p * size + i) * inner + q] = sum;
            }
        }
    }
}

/// The inverse of [`interleave`].
fn deinterleave(t: &[f64], out_modes: &[usize], in_modes: &[usize]) -> Vec<f64> {
    let k: usize = in_modes.iter().product();
    (0..t.len()).map(|at| t[tensor_index(at / k, at % k, out_modes, in_modes)]).collect()
}

/// Where `W[row, col]` lies in the interleaved tensor.
fn tensor_index(row: usize, col: usize, out_modes: &[usize], in_modes: &[usize]) -> usize {
    let digits = |mut v: usize, modes: &[usize]| {
        let mut d = vec![0; modes.len()];
        for (j, &m) in modes.iter().enumerate().rev() {
            d[j] = v % m;
            v /= m;
        }
        d
    };
    let (o, i) = (digits(row, out_modes), digits(col, in_modes));
    let mut at = 0;
    for j in 0..out_modes.len() {
        at = (at * out_modes[j] + o[j]) * in_modes[j] + i[j];
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::values;

    #[test]
    fn modes_are_as_even_as_the_factors_allow() {
        assert_eq!(modes(576, 3), [8, 8, 9]);
        assert_eq!(modes(1536, 3), [8, 12, 16]);
        assert_eq!(modes(384, 3), [6, 8, 8]);
        assert_eq!(modes(1152, 3), [8, 12, 12]);
        assert_eq!(modes(7, 3), [1, 1, 7], "a prime has no other split");
        for (n, d) in [(576, 2), (1536, 4), (96, 3)] {
            assert_eq!(modes(n, d).iter().product::<usize>(), n);
        }
    }

    /// At full bond dimension the cores reproduce `W`; truncated, the error is within the
    /// discarded energy, and the parameter count follows the bonds.
    #[test]
    fn tt_svd_at_full_bond_reproduces_the_weight() {
        let (out_modes, in_modes) = ([2, 3, 4], [3, 2, 2]);
        let (n, k) = (24, 12);
        let w = values(n * k, 7);
        let full = Train::new(&w, &out_modes, &in_modes, usize::MAX).expect("decomposes");
        let back = full.weight();
        let worst = w.iter().zip(&back).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-9, "max error {worst}");
        assert!(full.discarded < 1e-18);
        for bond in [1, 2, 4] {
            let t = Train::new(&w, &out_modes, &in_modes, bond).expect("decomposes");
            let error: f64 = w.iter().zip(t.weight()).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
            assert!(error <= t.discarded * (1.0 + 1e-9) + 1e-12, "bond {bond}: {error} > {}", t.discarded);
            assert!(error > 0.0, "bond {bond} loses something on a random weight");
            let bonds: Vec<usize> = t.cores.iter().map(|c| c.right).collect();
            let params: usize = t.cores.iter().map(|c| c.left * c.out * c.inp * c.right).sum();
            assert_eq!(t.params(), params);
            assert!(bonds.iter().all(|&b| b <= bond), "{bonds:?}");
        }
        // A weight that is a Kronecker product of its modes' blocks has bond 1 exactly.
        let (a, b) = (values(2 * 3, 1), values(12 * 4, 2)); // [2, 3] and [12, 4] blocks
        let kron: Vec<f32> =
            (0..24 * 12).map(|at| a[(at / 12 / 12) * 3 + (at % 12) / 4] * b[(at / 12 % 12) * 4 + at % 4]).collect();
        let t = Train::new(&kron, &[2, 12], &[3, 4], 1).expect("decomposes");
        let worst = kron.iter().zip(t.weight()).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "a Kronecker product at bond 1: max error {worst}");
    }

    /// Row-major `a x b` (Kronecker product) of two square matrices.
    fn kron(a: &[f64], m: usize, b: &[f64], p: usize) -> Vec<f64> {
        let k = m * p;
        (0..k * k).map(|at| a[(at / k / p) * m + (at % k) / p] * b[(at / k % p) * p + at % k % p]).collect()
    }

    /// A positive definite `m x m` matrix with unit diagonal and off-diagonal correlation.
    fn correlation(m: usize, seed: u64) -> Vec<f64> {
        let x = values(m * 3 * m, seed);
        let mut c = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..m {
                c[i * m + j] =
                    (0..3 * m).map(|t| (x[i * 3 * m + t] + 0.3) as f64 * (x[j * 3 * m + t] + 0.3) as f64).sum();
            }
        }
        let d: Vec<f64> = (0..m).map(|i| c[i * m + i].sqrt()).collect();
        (0..m * m).map(|at| c[at] / (d[at / m] * d[at % m])).collect()
    }

    /// A Gram that is `D (C_1 x C_2) D` exactly is factored back into its parts.
    #[test]
    fn kronecker_whitening_recovers_a_kronecker_gram() {
        let (c1, c2) = (correlation(3, 1), correlation(4, 2));
        let d: Vec<f64> = (0..12).map(|j| 0.5 + j as f64).collect();
        let c = kron(&c1, 3, &c2, 4);
        let h: Vec<f64> = (0..144).map(|at| d[at / 12] * c[at] * d[at % 12]).collect();
        let w = Kronecker::new(&h, &[3, 4]).expect("factors");
        for (got, want) in w.columns.iter().zip(&d) {
            assert!((got - want).abs() < 1e-9, "{got} against {want}");
        }
        for (l, (c, m)) in w.factors.iter().zip([(&c1, 3), (&c2, 4)]) {
            let back = l * l.transpose();
            for i in 0..m {
                for j in 0..m {
                    assert!((back[(i, j)] - c[i * m + j]).abs() < 1e-9, "C[{i}, {j}]");
                }
            }
        }
        assert!(Kronecker::new(&h[..143], &[3, 4]).is_err());
    }

    /// Whitened, full bonds still reproduce `W` (cores and column scale); truncated, the
    /// error the layer's outputs see, `|dW L|^2` for a Kronecker-factored Gram, is within
    /// what the whitened steps discarded, and below the plain train's at the same bonds.
    #[test]
    fn whitened_trains_rebuild_the_weight_and_lose_less_where_inputs_are() {
        let (outs, ins) = ([2, 3, 4], [3, 2, 2]);
        let (n, k) = (24, 12);
        let w = values(n * k, 11);
        let c = kron(&kron(&correlation(3, 3), 3, &correlation(2, 4), 2), 6, &correlation(2, 5), 2);
        // Columns of very different sizes, as a model's activations have.
        let d: Vec<f64> = (0..k).map(|j| if j % 5 == 0 { 20.0 } else { 1.0 + j as f64 / 4.0 }).collect();
        let h: Vec<f64> = (0..k * k).map(|at| d[at / k] * c[at] * d[at % k]).collect();
        let whitening = Kronecker::new(&h, &ins).expect("factors");
        let rebuilt = |t: &Train, scale: &[f32]| -> Vec<f64> {
            t.weight().iter().enumerate().map(|(at, v)| v * scale[at % k] as f64).collect()
        };
        let (full, scale) = Train::whitened(&w, &outs, &ins, usize::MAX, &whitening).expect("decomposes");
        let worst = w.iter().zip(rebuilt(&full, &scale)).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-5, "max error {worst}");
        // |dW L|^2 = sum over rows of dw H dw^T.
        let seen = |dw: &[f64]| -> f64 {
            (0..n)
                .map(|r| {
                    let row = &dw[r * k..(r + 1) * k];
                    (0..k).map(|i| (0..k).map(|j| row[i] * h[i * k + j] * row[j]).sum::<f64>()).sum::<f64>()
                })
                .sum()
        };
        for bond in [1, 2, 3] {
            let (t, scale) = Train::whitened(&w, &outs, &ins, bond, &whitening).expect("decomposes");
            let dw: Vec<f64> = w.iter().zip(rebuilt(&t, &scale)).map(|(a, b)| *a as f64 - b).collect();
            let whitened = seen(&dw);
            assert!(whitened <= t.discarded * (1.0 + 1e-6), "bond {bond}: {whitened} > {}", t.discarded);
            let plain = Train::new(&w, &outs, &ins, bond).expect("decomposes");
            let dw: Vec<f64> = w.iter().zip(plain.weight()).map(|(a, b)| *a as f64 - b).collect();
            assert!(whitened < seen(&dw), "bond {bond}: whitened {whitened} against plain {}", seen(&dw));
            let planned = bonds(&outs, &ins, bond);
            assert_eq!(t.cores[..2].iter().map(|c| c.right).collect::<Vec<_>>(), planned);
            assert_eq!(t.params(), params(&outs, &ins, &planned));
        }
    }

    /// The bonds a cut allows, and the parameters they store.
    #[test]
    fn bonds_are_capped_by_what_each_cut_allows() {
        // 576 x 1536 as 8 x 8 x 9 by 8 x 12 x 16: cuts of 64 and 96 x 144 values.
        assert_eq!(bonds(&[8, 12, 16], &[8, 8, 9], 64), [64, 64]);
        assert_eq!(bonds(&[8, 12, 16], &[8, 8, 9], 1000), [64, 144]);
        assert_eq!(bonds(&[2, 3], &[3, 2], 100), [6]);
        assert_eq!(params(&[2, 3], &[3, 2], &[6]), 6 * 6 + 6 * 6);
        assert_eq!(params(&[8, 12, 16], &[8, 8, 9], &[64, 64]), 64 * 64 + 64 * 96 * 64 + 64 * 144);
        let t = Train::new(&values(24 * 12, 3), &[2, 3, 4], &[3, 2, 2], 2).expect("decomposes");
        // Contracting x [3, 2, 2] core by core: 1*3*2*2 * (2*2), then 2*2*2*3*2 * 2, then 2*3*2*2*4.
        assert_eq!(t.chain_macs(), 12 * 2 * 2 + 2 * 2 * 2 * 3 * 2 * 2 + 2 * 3 * 2 * 2 * 4);
    }

    /// With one cut the estimate is TT-SVD's error exactly; with two, it bounds it.
    #[test]
    fn estimates_from_the_unfoldings_bound_the_error() {
        let w = values(24 * 12, 21);
        let error = |t: &Train| w.iter().zip(t.weight()).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>();
        let one = unfoldings(&w, &[4, 6], &[3, 4], None).expect("spectra");
        assert_eq!(one.len(), 1);
        for bond in [1, 3, 7] {
            let t = Train::new(&w, &[4, 6], &[3, 4], bond).expect("decomposes");
            let e = estimate(&one, &bonds(&[4, 6], &[3, 4], bond));
            assert!((error(&t) - e).abs() <= 1e-9 * e.max(1.0), "bond {bond}: {} against {e}", error(&t));
        }
        let two = unfoldings(&w, &[2, 3, 4], &[3, 2, 2], None).expect("spectra");
        for bond in [1, 2, 4] {
            let t = Train::new(&w, &[2, 3, 4], &[3, 2, 2], bond).expect("decomposes");
            let e = estimate(&two, &bonds(&[2, 3, 4], &[3, 2, 2], bond));
            assert!(error(&t) <= e * (1.0 + 1e-9), "bond {bond}: {} above {e}", error(&t));
        }
    }

    #[test]
    fn wrong_modes_are_refused() {
        assert!(Train::new(&[0.0; 12], &[3, 4], &[1], 2).is_err());
        assert!(Train::new(&[0.0; 12], &[3, 2], &[2, 2], 2).is_err());
    }
}
