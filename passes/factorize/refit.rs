//! Factorize's refit for healing ([`crate::heal`]): new factors of one layer from the
//! [`Paired`] statistics of its input in the compressed model (`x_c`) and the reference
//! (`x_o`), and the layer-wise errors that go in the report.
//!
//! The layer-wise error of factors `M = U V` is `E(M) = sum_t w_t |W x_o - M x_c|^2`
//! `= tr(W R W^T) - 2 tr(W C M^T) + tr(M O M^T)`, with `O = sum w_t x_c x_c^T` (own),
//! `C = sum w_t x_o x_c^T` (cross) and `R = sum w_t x_o x_o^T` (reference).
//!
//! Two refits, each at the layer's rank:
//! - [`Refit::Own`]: SVD-LLM again on the compressed model's inputs: the SVD of `W` whitened
//!   by `O`. It keeps the layer's output on the inputs it now sees, as SparseGPT's update
//!   does, without chasing the reference's outputs.
//! - [`Refit::Left`]: `V` from `Own`, then the left factor that fits the reference's
//!   outputs, regularized toward `Own`'s: `U = (W C V^T + lam U_own)(V O V^T + lam I)^-1`
//!   (SVD-LLM's sequential update, with `lam` [`LEFT_DAMP`] of the mean diagonal). An
//!   `r x r` system, far better conditioned than a refit of the whole matrix on a few
//!   hundred tokens of 1536-wide inputs.

use super::lowrank::{Spectrum, Whitening};
use crate::calibration::Paired;
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};

/// How a layer is refitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refit {
    Own,
    Left,
}

impl std::fmt::Display for Refit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refit::Own => "own",
            Refit::Left => "left",
        })
    }
}

/// The damping of [`Refit::Left`]'s system, relative to its mean diagonal.
pub const LEFT_DAMP: f64 = 0.01;

/// A refit's factors (`U [n, r]`, `V [r, k]`, row-major) and the errors before and after.
pub struct Refitted {
    pub u: Vec<f32>,
    pub v: Vec<f32>,
    pub error_before: f64,
    pub error_after: f64,
}

/// Refits the rank-`r` factors `old = (U, V)` of `w` (`[n, k]`, the layer's weight before
/// the pass) on `paired` (see the module documentation).
pub fn refit(
    w: &[f32],
    (n, k, r): (usize, usize, usize),
    old: (&[f32], &[f32]),
    paired: &Paired,
    how: Refit,
) -> Result<Refitted, String> {
    if paired.k != k {
        return Err(format!("input statistics of width {} for a weight of {k} columns", paired.k));
    }
    let own = paired.own_gram();
    let spectrum = Spectrum::new(w, n, k, Whitening::Cholesky(&own))?;
    let (mut u, v) = spectrum.factors(r);
    let wm = mat(w, n, k);
    let o = Mat::<f64>::from_fn(k, k, |i, j| paired.own[i * k + j]);
    let c = Mat::<f64>::from_fn(k, k, |i, j| paired.cross[i * k + j]);
    // W C, shared by every error and by the left refit.
    let wc = &wm * &c;
    let error = |u: &[f32], v: &[f32]| {
        let (u, v) = (mat(u, n, r), mat(v, r, k));
        let vt = v.transpose();
        let cross = dot(&(&wc * vt), &u);
        let a = &v * &o * vt;
        let quad = dot(&(&u * &a), &u);
        (cross, quad)
    };
    let r_term = {
        let rm = Mat::<f64>::from_fn(k, k, |i, j| paired.reference[i * k + j]);
        dot(&(&wm * &rm), &wm)
    };
    let total = |(cross, quad): (f64, f64)| (r_term - 2.0 * cross + quad).max(0.0);
    let error_before = total(error(old.0, old.1));
    if how == Refit::Left {
        let vm = mat(&v, r, k);
        let mut a = &vm * &o * vm.transpose();
        let mean = (0..r).map(|i| a[(i, i)]).sum::<f64>() / r.max(1) as f64;
        let lam = LEFT_DAMP * if mean > 0.0 { mean } else { 1.0 };
        for i in 0..r {
            a[(i, i)] += lam;
        }
        let own_u = mat(&u, n, r);
        // U (A + lam I) = W C V^T + lam U_own, solved as (A + lam I) U^T = (...)^T.
        let rhs = (&wc * vm.transpose() + own_u * faer::Scale(lam)).transpose().to_owned();
        let llt = a.llt(Side::Lower).map_err(|e| format!("the left refit's system is singular: {e:?}"))?;
        let ut = llt.solve(rhs);
        u = (0..n).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| ut[(j, i)] as f32).collect();
    }
    let error_after = total(error(&u, &v));
    Ok(Refitted { u, v, error_before, error_after })
}

fn mat(x: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| x[i * cols + j] as f64)
}

/// `sum_ij a_ij b_ij`.
fn dot(a: &Mat<f64>, b: &Mat<f64>) -> f64 {
    let mut s = 0.0;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += a[(i, j)] * b[(i, j)];
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(mut seed: u64) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    /// The statistics of token rows `x_o` and `x_c` (`[t, k]`), weights 1.
    fn paired(x_o: &[f32], x_c: &[f32], k: usize) -> Paired {
        let t = x_o.len() / k;
        let m = |a: &[f32], b: &[f32]| -> Vec<f64> {
            (0..k * k).map(|ij| (0..t).map(|r| a[r * k + ij / k] as f64 * b[r * k + ij % k] as f64).sum()).collect()
        };
        Paired { k, own: m(x_c, x_c), cross: m(x_o, x_c), reference: m(x_o, x_o), rows: t as u64 }
    }

    /// `sum_t |W x_o - U V x_c|^2`, directly.
    fn output_error(
        w: &[f32],
        u: &[f32],
        v: &[f32],
        (n, k, r): (usize, usize, usize),
        x_o: &[f32],
        x_c: &[f32],
    ) -> f64 {
        let t = x_o.len() / k;
        let mut e = 0.0;
        for row in 0..t {
            let (xo, xc) = (&x_o[row * k..][..k], &x_c[row * k..][..k]);
            let z: Vec<f64> = (0..r).map(|p| (0..k).map(|j| v[p * k + j] as f64 * xc[j] as f64).sum()).collect();
            for i in 0..n {
                let want: f64 = (0..k).map(|j| w[i * k + j] as f64 * xo[j] as f64).sum();
                let got: f64 = (0..r).map(|p| u[i * r + p] as f64 * z[p]).sum();
                e += (want - got).powi(2);
            }
        }
        e
    }

    /// The reported errors are the layer's output errors computed token by token. On inputs
    /// that moved (`x_c` = `x_o` plus a correlated drift), the left refit, which aims at the
    /// reference's outputs, lowers that error below the one-shot factors' and the own
    /// refit's (which keeps the layer's output on `x_c` and does not chase the reference).
    #[test]
    fn errors_are_output_errors_and_refits_lower_them() {
        let mut next = rng(9);
        let (n, k, r, t) = (12, 10, 4, 300);
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let x_o: Vec<f32> = (0..t * k).map(|_| next()).collect();
        // The compressed model's inputs: a drift that mixes columns.
        let x_c: Vec<f32> =
            (0..t * k).map(|i| x_o[i] + 0.3 * x_o[i - i % k + (i % k + 1) % k] + 0.05 * next()).collect();
        let p = paired(&x_o, &x_c, k);
        // One-shot factors: whitened by the reference's inputs.
        let reference = crate::calibration::Gram { k, sum: p.reference.clone(), rows: t as u64 };
        let (u0, v0) = Spectrum::new(&w, n, k, Whitening::Cholesky(&reference)).unwrap().factors(r);
        let before = output_error(&w, &u0, &v0, (n, k, r), &x_o, &x_c);
        let mut after = Vec::new();
        for how in [Refit::Own, Refit::Left] {
            let f = refit(&w, (n, k, r), (&u0, &v0), &p, how).unwrap();
            let direct = output_error(&w, &f.u, &f.v, (n, k, r), &x_o, &x_c);
            assert!((f.error_before - before).abs() <= 1e-6 * before, "{how}: {} vs {before}", f.error_before);
            assert!((f.error_after - direct).abs() <= 1e-6 * direct.max(1.0), "{how}: {} vs {direct}", f.error_after);
            after.push(f.error_after);
        }
        assert!(
            after[1] < 0.9 * before && after[1] < 0.9 * after[0],
            "left {} vs {before}, own {}",
            after[1],
            after[0]
        );
    }
}
