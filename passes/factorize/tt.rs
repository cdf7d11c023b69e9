//! Tensor-train (MPO) factors of one weight, for `factorize(method=tt)` (not wired into
//! the pass yet; ARCHITECTURE.md, "Decisions", says how the IR will hold them).
//!
//! `W [n, k]` with `n = o_1 ... o_d` and `k = i_1 ... i_d` ([`modes`]) is read as the tensor
//! `T[o_1, i_1, o_2, i_2, ..., o_d, i_d] = W[(o_1 ... o_d), (i_1 ... i_d)]` (row-major
//! indices), and TT-SVD (Oseledets 2011) cuts it into cores `G_j [r_{j-1}, o_j, i_j, r_j]`
//! (`r_0 = r_d = 1`): `T = G_1 G_2 ... G_d` contracted over the bonds. Each step takes the
//! SVD of what is left, reshaped `[r_{j-1} o_j i_j, rest]`, keeps at most `max_bond`
//! singular vectors, and carries `S V^T` on. With every bond at its full rank the cores
//! reproduce `W`; truncated, the squared Frobenius error is at most the sum of the
//! discarded squared singular values of all steps (each step's projection is orthogonal).

use faer::Mat;

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
fn interleave(w: &[f32], out_modes: &[usize], in_modes: &[usize]) -> Vec<f64> {
    let k: usize = in_modes.iter().product();
    let mut t = vec![0.0; w.len()];
    for (at, &v) in w.iter().enumerate() {
        t[tensor_index(at / k, at % k, out_modes, in_modes)] = v as f64;
    }
    t
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

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

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

    #[test]
    fn wrong_modes_are_refused() {
        assert!(Train::new(&[0.0; 12], &[3, 4], &[1], 2).is_err());
        assert!(Train::new(&[0.0; 12], &[3, 2], &[2, 2], 2).is_err());
    }
}
