//! Factorize's refit for healing ([`crate::heal`]): new factors of one layer from the
//! [`Paired`] statistics of its input in the compressed model (`x_c`) and the reference
//! (`x_o`), and the layer-wise errors that go in the report.
//!
//! With `O = sum w_t x_c x_c^T` (own), `C = sum w_t x_o x_c^T` (cross) and
//! `R = sum w_t x_o x_o^T` (reference), two refits, each at the layer's rank:
//! - [`Refit::Own`]: SVD-LLM again on the compressed model's inputs: the SVD of `W` whitened
//!   by `O`. It keeps the layer's output on the inputs it now sees, as SparseGPT's update
//!   does, without chasing the reference's outputs. Its error is that output error,
//!   `E(M) = sum_t w_t |W x_c - M x_c|^2 = tr((W - M) O (W - M)^T)`; it needs no reference.
//! - [`Refit::Left`]: `V` from `Own`, then the left factor that fits the reference's
//!   outputs, regularized toward `Own`'s: `U = (W C V^T + lam U_own)(V O V^T + lam I)^-1`
//!   (SVD-LLM's sequential update, with `lam` [`LEFT_DAMP`] of the mean diagonal). An
//!   `r x r` system, far better conditioned than a refit of the whole matrix on a few
//!   hundred tokens of 1536-wide inputs. Its error is against the reference's output,
//!   `E(M) = sum_t w_t |W x_o - M x_c|^2 = tr(W R W^T) - 2 tr(W C M^T) + tr(M O M^T)`.

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
    let product = |u: &[f32], v: &[f32]| mat(u, n, r) * mat(v, r, k);
    let (error_before, error_after) = match how {
        Refit::Own => {
            // tr(D O D^T) for D = W - M.
            let error = |m: Mat<f64>| {
                let d = &wm - m;
                dot(&(&d * &o), &d).max(0.0)
            };
            (error(product(old.0, old.1)), error(product(&u, &v)))
        }
        Refit::Left => {
            let (Some(cross), Some(reference)) = (&paired.cross, &paired.reference) else {
                return Err("the left refit needs the reference model's inputs".into());
            };
            let c = Mat::<f64>::from_fn(k, k, |i, j| cross[i * k + j]);
            let rm = Mat::<f64>::from_fn(k, k, |i, j| reference[i * k + j]);
            // W C, shared by the errors and the refit.
            let wc = &wm * &c;
            let r_term = dot(&(&wm * &rm), &wm);
            let error = |u: &[f32], v: &[f32]| {
                let (um, vm) = (mat(u, n, r), mat(v, r, k));
                let cross = dot(&(&wc * vm.transpose()), &um);
                let quad = dot(&(&um * (&vm * &o * vm.transpose())), &um);
                (r_term - 2.0 * cross + quad).max(0.0)
            };
            let before = error(old.0, old.1);
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
            (before, error(&u, &v))
        }
    };
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
        Paired { k, own: m(x_c, x_c), cross: Some(m(x_o, x_c)), reference: Some(m(x_o, x_o)), rows: t as u64 }
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

    /// Each refit's reported errors are its own objective computed token by token: the
    /// own refit's, the output error on the inputs the layer now sees (`W x_c` against
    /// `M x_c`), which it lowers; the left refit's, against the reference's outputs
    /// (`W x_o`), which it lowers below the one-shot factors' and the own refit's. The
    /// inputs moved: `x_c` is `x_o` plus a correlated drift.
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
        let reference = crate::calibration::Gram { k, sum: p.reference.clone().unwrap(), rows: t as u64 };
        let (u0, v0) = Spectrum::new(&w, n, k, Whitening::Cholesky(&reference)).unwrap().factors(r);
        let close = |got: f64, want: f64| (got - want).abs() <= 1e-6 * want.max(1.0);

        let own = refit(&w, (n, k, r), (&u0, &v0), &p, Refit::Own).unwrap();
        let (before, after) = (
            output_error(&w, &u0, &v0, (n, k, r), &x_c, &x_c),
            output_error(&w, &own.u, &own.v, (n, k, r), &x_c, &x_c),
        );
        assert!(
            close(own.error_before, before) && close(own.error_after, after),
            "{} {} vs {before} {after}",
            own.error_before,
            own.error_after
        );
        assert!(after < before, "own: {after} vs {before}");

        let left = refit(&w, (n, k, r), (&u0, &v0), &p, Refit::Left).unwrap();
        let before = output_error(&w, &u0, &v0, (n, k, r), &x_o, &x_c);
        let after = output_error(&w, &left.u, &left.v, (n, k, r), &x_o, &x_c);
        assert!(
            close(left.error_before, before) && close(left.error_after, after),
            "{} {} vs {before} {after}",
            left.error_before,
            left.error_after
        );
        let own_against_reference = output_error(&w, &own.u, &own.v, (n, k, r), &x_o, &x_c);
        assert!(
            after < 0.9 * before && after < 0.9 * own_against_reference,
            "left {after} vs {before}, own {own_against_reference}"
        );

        // Without the reference's statistics the left refit cannot run.
        let alone = Paired { cross: None, reference: None, ..p };
        assert!(refit(&w, (n, k, r), (&u0, &v0), &alone, Refit::Left).is_err());
        assert!(refit(&w, (n, k, r), (&u0, &v0), &alone, Refit::Own).is_ok());
    }
}
