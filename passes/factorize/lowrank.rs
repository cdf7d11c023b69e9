//! Low-rank factors of one weight, `W [n, k] ~ A [n, r] B [r, k]`, by a truncated SVD taken
//! in the space the error is measured in.
//!
//! With a *whitening* `T` (`k x k`, invertible), the SVD is of `W T = U S V^T`, and rank `r`
//! keeps `W' = U_r S_r V_r^T T^-1`. The factors are balanced, `A = U_r S_r^(1/2)` and
//! `B = S_r^(1/2) V_r^T T^-1`, so that neither holds all the scale (what a later quantize
//! wants). The error `||(W - W') T||_F^2` is exactly the sum of the discarded `S_i^2`.
//! - `svd`: `T = I`; the error is the weight's Frobenius error.
//! - `whitened` (SVD-LLM): `T = L`, the Cholesky factor of the input Gram `H = L L^T`
//!   (`sum over calibration rows of x x^T`, damped by [`DAMP`] of its mean diagonal so that it
//!   is positive definite). Then `||(W - W') L||_F^2 = trace(dW H dW^T)` is the layer's
//!   squared output error summed over the calibration rows: errors of different layers add
//!   up to a model's, which is what the rank allocation assumes.
//! - `asvd`: `T = diag(s)`, `s_j = rms(x_j)^(1/2)` (ASVD scales columns by the mean
//!   magnitude of their input to the power 0.5; the statistics hold second moments, so the
//!   root mean square stands in for the mean magnitude).

use crate::calibration::Gram;
use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Mat, Par, Side};

/// Damping added to the input Gram's diagonal before its Cholesky factor, relative to the
/// mean diagonal (GPTQ's `percdamp`).
pub const DAMP: f64 = 0.01;

/// What the SVD is taken against (see the module docs).
#[derive(Clone, Copy, Debug)]
pub enum Whitening<'a> {
    None,
    Cholesky(&'a Gram),
    Columns(&'a Gram),
}

/// The SVD of one weight in its error's space, from which factors of any rank are cut.
pub struct Spectrum {
    n: usize,
    k: usize,
    /// Singular values, non-increasing.
    pub sigma: Vec<f64>,
    /// `U`, `n x m` for `m = min(n, k)`.
    u: Mat<f64>,
    /// `V^T T^-1`, `m x k`: the right factors mapped back to the weight's input space.
    vt: Mat<f64>,
}

impl Spectrum {
    /// The SVD of `w` (`[n, k]`, row-major) whitened by `whitening`.
    pub fn new(w: &[f32], n: usize, k: usize, whitening: Whitening) -> Result<Spectrum, String> {
        assert_eq!(w.len(), n * k, "a weight of another shape");
        let w = Mat::<f64>::from_fn(n, k, |i, j| w[i * k + j] as f64);
        let gram = |g: &Gram| damped(g, k);
        // `t` is the whitening, `solve` maps the right factors back: V^T T^-1.
        let (t, upper): (Option<Mat<f64>>, bool) = match whitening {
            Whitening::None => (None, false),
            Whitening::Cholesky(g) => {
                let llt =
                    gram(g)?.llt(Side::Lower).map_err(|e| format!("the input Gram has no Cholesky factor: {e:?}"))?;
                (Some(llt.L().to_owned()), true)
            }
            Whitening::Columns(g) => {
                let h = gram(g)?;
                let rows = g.rows.max(1) as f64;
                (Some(Mat::from_fn(k, k, |i, j| if i == j { (h[(i, i)] / rows).sqrt().sqrt() } else { 0.0 })), false)
            }
        };
        let wt = match &t {
            Some(t) => &w * t,
            None => w,
        };
        let svd = wt.thin_svd().map_err(|e| format!("the SVD did not converge: {e:?}"))?;
        let m = n.min(k);
        let sigma: Vec<f64> = (0..m).map(|i| svd.S()[i]).collect();
        let u = svd.U().to_owned();
        let v = svd.V().to_owned(); // k x m
        let vt = match &t {
            None => v.transpose().to_owned(),
            Some(t) if upper => {
                // V^T L^-1 = (L^-T V)^T: solve L^T X = V.
                let mut x = v;
                solve_upper_triangular_in_place(t.transpose(), x.as_mut(), Par::Seq);
                x.transpose().to_owned()
            }
            Some(t) => Mat::from_fn(m, k, |i, j| v[(j, i)] / t[(j, j)]),
        };
        Ok(Spectrum { n, k, sigma, u, vt })
    }

    /// The largest rank (`min(n, k)`).
    pub fn full_rank(&self) -> usize {
        self.sigma.len()
    }

    /// The error of keeping rank `r`: the sum of the discarded singular values squared.
    pub fn error(&self, r: usize) -> f64 {
        self.sigma[r.min(self.sigma.len())..].iter().map(|s| s * s).sum()
    }

    /// The least rank keeping a fraction `energy` of the sum of squared singular values.
    pub fn rank_for_energy(&self, energy: f64) -> usize {
        let total: f64 = self.sigma.iter().map(|s| s * s).sum();
        let mut kept = 0.0;
        for (r, s) in self.sigma.iter().enumerate() {
            if kept >= energy * total {
                return r;
            }
            kept += s * s;
        }
        self.sigma.len()
    }

    /// The balanced factors of rank `r`: `A [n, r]` and `B [r, k]`, row-major, in f32.
    pub fn factors(&self, r: usize) -> (Vec<f32>, Vec<f32>) {
        let r = r.min(self.sigma.len());
        let root: Vec<f64> = self.sigma[..r].iter().map(|s| s.sqrt()).collect();
        let a = (0..self.n).flat_map(|i| (0..r).map(move |j| (i, j))).map(|(i, j)| (self.u[(i, j)] * root[j]) as f32);
        let b = (0..r).flat_map(|i| (0..self.k).map(move |j| (i, j))).map(|(i, j)| (root[i] * self.vt[(i, j)]) as f32);
        (a.collect(), b.collect())
    }
}

/// The input Gram of a weight of `k` columns with [`DAMP`] of its mean diagonal added to
/// the diagonal.
pub fn damped(g: &Gram, k: usize) -> Result<Mat<f64>, String> {
    if g.k != k {
        return Err(format!("input statistics of width {} for a weight of {k} columns", g.k));
    }
    let mean = g.diagonal().iter().sum::<f64>() / k as f64;
    let damp = DAMP * if mean > 0.0 { mean } else { 1.0 };
    Ok(Mat::from_fn(k, k, |i, j| g.sum[i * k + j] + if i == j { damp } else { 0.0 }))
}

/// Whether rank `r` stores fewer parameters than the dense `[n, k]` matrix.
pub fn saves(r: usize, n: usize, k: usize) -> bool {
    r * (n + k) < n * k
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn f32(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        }
    }

    fn product(a: &[f32], b: &[f32], n: usize, r: usize, k: usize) -> Vec<f64> {
        (0..n * k).map(|i| (0..r).map(|p| a[i / k * r + p] as f64 * b[p * k + i % k] as f64).sum()).collect()
    }

    /// Rows of `x` (`[rows, k]`) and their Gram.
    fn inputs(rng: &mut Rng, rows: usize, k: usize) -> (Vec<f32>, Gram) {
        // Columns of very different scales, so whitening matters.
        let x: Vec<f32> = (0..rows * k).map(|i| rng.f32() * (1 + i % k) as f32).collect();
        let mut g = Gram::new(k);
        let xtx: Vec<f32> =
            (0..k * k).map(|ij| (0..rows).map(|t| x[t * k + ij / k] * x[t * k + ij % k]).sum()).collect();
        g.add(&xtx, rows as u64);
        (x, g)
    }

    /// At full rank the factors rebuild W (to 1e-5 relative) for every whitening.
    #[test]
    fn full_rank_factors_rebuild_the_weight() {
        let mut rng = Rng(7);
        let (n, k) = (12, 20);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
        let (_, g) = inputs(&mut rng, 64, k);
        for whitening in [Whitening::None, Whitening::Cholesky(&g), Whitening::Columns(&g)] {
            let s = Spectrum::new(&w, n, k, whitening).unwrap();
            assert_eq!(s.full_rank(), n);
            let (a, b) = s.factors(n);
            let back = product(&a, &b, n, n, k);
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
            let diff = back.iter().zip(&w).map(|(x, &y)| (x - y as f64).abs()).fold(0.0, f64::max);
            assert!(diff <= 1e-5 * scale, "{whitening:?}: {diff}");
            assert!(s.error(n) == 0.0 && s.error(0) > 0.0);
        }
    }

    /// The whitened error of a rank is the layer's squared output error on the calibration
    /// rows (with the damping's share), and it is lower than plain SVD's output error at
    /// the same rank.
    #[test]
    fn whitened_error_is_the_output_error() {
        let mut rng = Rng(3);
        let (n, k, rows, r) = (10, 16, 200, 4);
        let w: Vec<f32> = (0..n * k).map(|_| rng.f32()).collect();
        let (x, g) = inputs(&mut rng, rows, k);
        let output_error = |a: &[f32], b: &[f32]| -> f64 {
            let dw: Vec<f64> = product(a, b, n, r, k).iter().zip(&w).map(|(p, &v)| v as f64 - p).collect();
            (0..rows)
                .map(|t| {
                    (0..n)
                        .map(|o| (0..k).map(|i| dw[o * k + i] * x[t * k + i] as f64).sum::<f64>().powi(2))
                        .sum::<f64>()
                })
                .sum()
        };
        let white = Spectrum::new(&w, n, k, Whitening::Cholesky(&g)).unwrap();
        let (a, b) = white.factors(r);
        let measured = output_error(&a, &b);
        // The damping adds DAMP * mean diag * ||dW||^2 to the predicted error: a few percent.
        let predicted = white.error(r);
        assert!(measured <= predicted && measured >= 0.9 * predicted, "{measured} vs {predicted}");
        let plain = Spectrum::new(&w, n, k, Whitening::None).unwrap();
        let (a, b) = plain.factors(r);
        assert!(output_error(&a, &b) > 1.2 * measured, "whitening lowers the output error");
    }

    #[test]
    fn energy_and_savings() {
        let s = Spectrum { n: 3, k: 3, sigma: vec![3.0, 2.0, 1.0], u: Mat::identity(3, 3), vt: Mat::identity(3, 3) };
        assert_eq!(s.rank_for_energy(0.5), 1); // 9 of 14
        assert_eq!(s.rank_for_energy(0.9), 2); // 13 of 14
        assert_eq!(s.rank_for_energy(1.0), 3);
        assert_eq!(s.error(1), 5.0);
        assert!(saves(127, 576, 576) && saves(287, 576, 576) && !saves(288, 576, 576));
    }
}
