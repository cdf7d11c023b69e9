//! Low-rank compensation (LoRC, ZeroQuant-V2): a rank-`r` correction `A B` of a quantized
//! layer's error, run beside it: `y = Q x + A (B x)`.
//!
//! The correction minimizes the error the layer's *outputs* feel on the calibration inputs,
//! `|(W - Q - A B) X|^2` over the columns of `X`, not the error of the weights: with
//! `H = X X^T + damp I = L L^T` (Cholesky), that is `|(E - A B) L|_F` for `E = W - Q`, whose
//! minimum over rank `r` is the truncated SVD of `E L`: `E L ~ U_r S_r V_r^T`, so
//! `A = U_r S_r` (`[n, r]`) and `B = V_r^T L^-1` (`[r, k]`, one triangular solve). The
//! damping is GPTQ's (a fraction of the mean diagonal of `H`), so dead inputs stay defined.
//!
//! In the graph the correction is two linears on the layer's input and an `add` of their
//! result to the layer's output ([`attach`]); the JIT fuses that `add` into the main
//! kernel as its residual. The factors are stored as f32, `32 (n + k) r` bits, which the
//! budget counts.

use faer::linalg::triangular_solve::solve_upper_triangular_in_place;
use faer::{Mat, Par, Side};
use kiln_ir::{BinaryOp, Graph, NodeId, Op, Role, TensorData};

/// The factors `A` (`[n, r]`, row-major) and `B` (`[r, k]`) of the best rank-`rank`
/// correction of `q` towards `w` (both `[n, k]` row-major) under `h` (`[k, k]`, the sum of
/// `x x^T`), damped by `damp` times its mean diagonal.
pub fn factors(
    w: &[f32],
    q: &[f32],
    n: usize,
    k: usize,
    h: &[f64],
    rank: usize,
    damp: f64,
) -> Result<(Vec<f32>, Vec<f32>), String> {
    if w.len() != n * k || q.len() != n * k || h.len() != k * k {
        return Err(format!("LoRC: shapes do not agree with {n} x {k}"));
    }
    let rank = rank.min(n).min(k);
    let mean = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k.max(1) as f64;
    let add = damp.max(1e-6) * mean.max(f64::MIN_POSITIVE);
    let hm = Mat::<f64>::from_fn(k, k, |i, j| h[i * k + j] + if i == j { add } else { 0.0 });
    let llt =
        hm.llt(Side::Lower).map_err(|e| format!("LoRC: the inputs' Gram matrix is not positive definite ({e:?})"))?;
    let l = llt.L();
    let e = Mat::<f64>::from_fn(n, k, |r, c| w[r * k + c] as f64 - q[r * k + c] as f64);
    let el = &e * l;
    let svd = el.thin_svd().map_err(|e| format!("LoRC: the SVD did not converge ({e:?})"))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    let a: Vec<f32> = (0..n).flat_map(|r| (0..rank).map(move |j| (u[(r, j)] * s[j]) as f32)).collect();
    super::gptq::clear_upper_ymm();
    // B^T = L^-T V_r: solve L^T X = V_r.
    let mut bt = Mat::<f64>::from_fn(k, rank, |i, j| v[(i, j)]);
    solve_upper_triangular_in_place(l.transpose(), bt.as_mut(), Par::Seq);
    let bt = &bt;
    let b: Vec<f32> = (0..rank).flat_map(|j| (0..k).map(move |c| bt[(c, j)] as f32)).collect();
    Ok((a, b))
}

/// Adds `A (B x)` to the output of every linear that reads `weight` (`[n, k]`): two new
/// weights `{tensor}.lorc_a` (`[n, r]`) and `{tensor}.lorc_b` (`[r, k]`), two linears on the
/// linear's input, and an `add` whose result replaces the linear's everywhere. The factors
/// join the layer whose main weight is `weight` in the layer table, as its `correction_a`
/// and `correction_b`.
pub fn attach(
    graph: &mut Graph,
    weight: NodeId,
    tensor: &str,
    a: Vec<f32>,
    b: Vec<f32>,
    n: u64,
    k: u64,
) -> Result<(), String> {
    let r = b.len() as u64 / k.max(1);
    let linears: Vec<NodeId> = graph
        .users(weight)
        .into_iter()
        .filter(|&u| matches!(graph.node(u).op, Op::Linear { .. }) && graph.operands(u).get(1) == Some(&weight))
        .collect();
    if linears.is_empty() {
        return Ok(());
    }
    let scope = graph.node(weight).scope.clone();
    let weight_a = graph.add_weight(&format!("{tensor}.lorc_a"), TensorData::from_f32(vec![n, r], &a), &scope);
    let weight_b = graph.add_weight(&format!("{tensor}.lorc_b"), TensorData::from_f32(vec![r, k], &b), &scope);
    if let Some(name) = graph.layers.layer_of_main(weight).map(str::to_string)
        && let Some(layer) = graph.layers.get_mut(&name)
    {
        layer.weights.extend([(Role::CorrectionA, weight_a), (Role::CorrectionB, weight_b)]);
    }
    for linear in linears {
        let scope = graph.node(linear).scope.clone();
        add_low_rank(graph, linear, weight_a, weight_b).map_err(|e| format!("LoRC on {scope}: {e}"))?;
    }
    Ok(())
}

/// Adds `A (B x)` to the output of `linear` (reading `x`): two f32 linears on its input,
/// `weight_b` (`[r, k]`) then `weight_a` (`[n, r]`), and an `add` whose result replaces the
/// linear's everywhere. LoRC's corrections and `tie`'s deltas take this form.
pub fn add_low_rank(
    graph: &mut Graph,
    linear: NodeId,
    weight_a: NodeId,
    weight_b: NodeId,
) -> Result<(), kiln_ir::GraphError> {
    let x = graph.operands(linear)[0];
    let scope = graph.node(linear).scope.clone();
    let f32 = Op::Linear { activations: kiln_ir::Activations::F32 };
    let low = graph.add(f32.clone(), &[x, weight_b], &scope, None)?;
    let correction = graph.add(f32, &[low, weight_a], &scope, None)?;
    let sum = graph.add(Op::Binary(BinaryOp::Add), &[linear, correction], &scope, None)?;
    graph.replace_uses_except(linear, sum, sum);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-0.5, 0.5).
    fn values(seed: u64, len: usize) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    /// `|(w - q - A B) X|^2` for the rows of `x` (`[m, k]`).
    fn output_error(w: &[f32], q: &[f32], ab: Option<(&[f32], &[f32])>, x: &[f64], n: usize, k: usize) -> f64 {
        let mut total = 0.0;
        for row in x.chunks_exact(k) {
            for o in 0..n {
                let mut d = 0.0;
                for c in 0..k {
                    let mut e = w[o * k + c] as f64 - q[o * k + c] as f64;
                    if let Some((a, b)) = ab {
                        let r = b.len() / k;
                        e -= (0..r).map(|j| a[o * r + j] as f64 * b[j * k + c] as f64).sum::<f64>();
                    }
                    d += e * row[c];
                }
                total += d * d;
            }
        }
        total
    }

    #[test]
    fn the_correction_lowers_the_output_error_and_full_rank_is_exact() {
        let (n, k, m) = (24, 16, 200);
        // Correlated inputs: a shared component, so that H is far from diagonal.
        let base = values(1, m);
        let x: Vec<f64> = values(2, m * k).iter().enumerate().map(|(i, v)| v + 2.0 * base[i / k]).collect();
        let mut h = vec![0f64; k * k];
        for row in x.chunks_exact(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += row[i] * row[j];
                }
            }
        }
        let w: Vec<f32> = values(3, n * k).iter().map(|&v| v as f32).collect();
        // A crude quantizer: steps of 1/8.
        let q: Vec<f32> = w.iter().map(|v| (v * 8.0).round() / 8.0).collect();
        let before = output_error(&w, &q, None, &x, n, k);
        let mut last = before;
        for rank in [1, 4, 8] {
            let (a, b) = factors(&w, &q, n, k, &h, rank, 0.0).unwrap();
            assert_eq!((a.len(), b.len()), (n * rank, rank * k));
            let after = output_error(&w, &q, Some((&a, &b)), &x, n, k);
            assert!(after < last, "rank {rank}: {after} vs {last}");
            last = after;
        }
        let (a, b) = factors(&w, &q, n, k, &h, k, 0.0).unwrap();
        let after = output_error(&w, &q, Some((&a, &b)), &x, n, k);
        assert!(after < 1e-9 * before, "full rank leaves {after} of {before}");
        assert!(factors(&w, &q, n, k + 1, &h, 2, 0.0).is_err(), "shapes are checked");
    }
}
