//! How alike a model's blocks are, pair by pair: what a user looks at before tying layers,
//! and what `tie` chooses its groups from (Relaxed Recursive Transformers and CRaSh tie the
//! blocks that are alike).
//!
//! - **Weights,** per matrix role: a layer `PREFIX.ROLE` of each block (`blk.3.attn_q` has
//!   the role `attn_q`), compared as flattened matrices by their cosine
//!   `<W_i, W_j> / (|W_i| |W_j|)`. A pair whose matrices differ in shape has none.
//! - **Outputs,** with calibration rows: each block's output delta, the change it writes to
//!   the residual stream (`D = out - in`, one row per token, the same tokens for every block),
//!   compared two ways:
//!   - `cosine`: the mean over tokens of the cosine of two blocks' rows. Tying asks one
//!     block to do another's work on the same stream, so this is the direct measure: 1 when
//!     the deltas point the same way at every token.
//!   - `cka`: linear centred kernel alignment (Kornblith et al., 2019),
//!     `<K_i, K_j> / (|K_i| |K_j|)` with `K = X X^T` over the tokens, `X` the delta with each
//!     column's mean removed. It is invariant to rotations and scale of the deltas: it says
//!     whether two blocks compute related features, not whether they write the same ones.
//!
//! Blocks are the model's stack as `drop` finds it ([`find_blocks`]); a block that does not
//! read and write one stream has no output row. At most [`TOKENS`] tokens are compared (CKA
//! holds a `T x T` matrix per block).

use crate::calibration::Executor;
use crate::prune::drop::{Block, find_blocks};
use crate::quantize::gptq::clear_upper_ymm;
use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use kiln_ir::{Graph, NodeId, Op};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Most tokens the output comparisons take.
pub const TOKENS: usize = 1024;

/// Pairwise similarities of a model's blocks: see the module documentation.
#[derive(Clone, Debug, PartialEq)]
pub struct Similarity {
    /// The blocks' prefixes (`blk.3`), in stack order.
    pub blocks: Vec<String>,
    /// Weight cosine per matrix role, in role name order.
    pub weights: Vec<Table>,
    /// `cosine` and `cka` of the output deltas; empty without calibration rows.
    pub outputs: Vec<Table>,
    /// Tokens the output tables compare over.
    pub tokens: usize,
}

/// One similarity for every pair of blocks.
#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// The matrix role, or `cosine` / `cka`.
    pub name: String,
    /// `[blocks, blocks]` row-major, symmetric; `None` where the pair has no value.
    pub values: Vec<Option<f64>>,
}

impl Table {
    /// The value of blocks `i` and `j` (positions in [`Similarity::blocks`]).
    pub fn get(&self, n: usize, i: usize, j: usize) -> Option<f64> {
        self.values[i * n + j]
    }
}

/// The similarities of `graph`'s blocks; with an executor, its calibration rows give the
/// output tables. `progress(done, total, what)` is called as the work goes.
pub fn similarity(
    graph: &Graph,
    executor: Option<&dyn Executor>,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<Similarity, String> {
    let blocks = find_blocks(graph)?;
    if blocks.len() < 2 {
        return Err(format!("{} block found: similarity compares blocks pairwise", blocks.len()));
    }
    let n = blocks.len();
    // Each block's matrices by role.
    let mut roles: BTreeMap<String, Vec<Option<NodeId>>> = BTreeMap::new();
    for (b, block) in blocks.iter().enumerate() {
        let stem = format!("{}.", block.prefix);
        for (name, layer) in graph.layers.iter() {
            let Some(role) = name.strip_prefix(&stem) else { continue };
            let Some(w) = layer.main() else { continue };
            if graph.node(w).ty.shape.len() == 2 {
                roles.entry(role.to_string()).or_insert_with(|| vec![None; n])[b] = Some(w);
            }
        }
    }
    if roles.is_empty() {
        return Err("the blocks hold no matrices (layers `PREFIX.ROLE` with a two-dimensional main weight)".into());
    }
    let mut weights = Vec::new();
    for (r, (role, nodes)) in roles.iter().enumerate() {
        progress(r, roles.len(), &format!("weights: {role}"));
        weights.push(Table { name: role.clone(), values: weight_cosines(graph, nodes)? });
    }
    let mut out = Similarity {
        blocks: blocks.iter().map(|b| b.prefix.clone()).collect(),
        weights,
        outputs: Vec::new(),
        tokens: 0,
    };
    let Some(executor) = executor else { return Ok(out) };

    let (outputs, tokens) = outputs(graph, &blocks, executor, true, progress)?;
    out.outputs = outputs;
    out.tokens = tokens;
    Ok(out)
}

/// The output tables of `blocks` on the executor's calibration rows: `cosine`, and `cka`
/// when asked; and the tokens compared.
pub fn outputs(
    graph: &Graph,
    blocks: &[Block],
    executor: &dyn Executor,
    cka: bool,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<(Vec<Table>, usize), String> {
    let ends: Vec<Option<(NodeId, NodeId)>> = blocks.iter().map(|b| b.ends.as_ref().ok().copied()).collect();
    let nodes: Vec<NodeId> = ends.iter().flatten().flat_map(|&(i, o)| [i, o]).collect();
    progress(0, 1, "outputs: running the calibration rows");
    let acts = executor.activations(graph, &nodes, TOKENS, &|d, t| progress(d, t, "outputs: calibration rows"))?;
    let deltas: Vec<Option<Vec<f32>>> =
        ends.iter().map(|e| e.map(|(i, o)| acts[&o].iter().zip(&acts[&i]).map(|(o, i)| o - i).collect())).collect();
    let width = ends.iter().flatten().next().and_then(|&(i, _)| graph.node(i).ty.shape.last()?.known()).unwrap_or(1);
    let width = width as usize;
    let tokens = deltas.iter().flatten().next().map_or(0, |d| d.len() / width);
    if tokens == 0 {
        return Err("the calibration rows gave no tokens".into());
    }
    let mut tables = vec![Table { name: "cosine".into(), values: mean_cosines(&deltas, width) }];
    if cka {
        progress(0, 1, "outputs: cka");
        tables.push(Table { name: "cka".into(), values: linear_cka(&deltas, width) });
    }
    Ok((tables, tokens))
}

/// A matrix flattened: its shape, its values and their norm.
type Flat = (Vec<u64>, Vec<f32>, f64);

/// The cosine of every pair of matrices of one role, flattened.
fn weight_cosines(graph: &Graph, nodes: &[Option<NodeId>]) -> Result<Vec<Option<f64>>, String> {
    let values: Vec<Option<Flat>> = nodes
        .par_iter()
        .map(|node| {
            let Some(node) = *node else { return Ok(None) };
            let Op::Weight(w) = &graph.node(node).op else { return Ok(None) };
            let shape: Vec<u64> = graph.node(node).ty.shape.iter().map(|d| d.known().unwrap_or(0)).collect();
            let v = w.value(&graph.store, &shape).map_err(|e| format!("{}: {e}", graph.node(node).scope))?;
            let norm = v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
            Ok(Some((shape, v, norm)))
        })
        .collect::<Result<_, String>>()?;
    Ok(pairs(values.len(), |i, j| {
        let ((si, vi, ni), (sj, vj, nj)) = (values[i].as_ref()?, values[j].as_ref()?);
        (si == sj && *ni > 0.0 && *nj > 0.0).then(|| dot(vi, vj) / (ni * nj))
    }))
}

/// The mean over tokens of the cosine of two blocks' delta rows (a zero row counts 0).
fn mean_cosines(deltas: &[Option<Vec<f32>>], width: usize) -> Vec<Option<f64>> {
    let unit: Vec<Option<Vec<f32>>> = deltas
        .iter()
        .map(|d| {
            d.as_ref().map(|d| {
                let mut u = d.clone();
                for row in u.chunks_exact_mut(width) {
                    let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
                    let scale = if norm > 0.0 { (1.0 / norm) as f32 } else { 0.0 };
                    row.iter_mut().for_each(|x| *x *= scale);
                }
                u
            })
        })
        .collect();
    pairs(unit.len(), |i, j| {
        let (a, b) = (unit[i].as_ref()?, unit[j].as_ref()?);
        Some(dot(a, b) / (a.len() / width) as f64)
    })
}

/// Linear CKA of every pair of blocks' deltas: `<K_i, K_j> / (|K_i| |K_j|)`, `K = X X^T`
/// with `X` the delta, columns centred.
fn linear_cka(deltas: &[Option<Vec<f32>>], width: usize) -> Vec<Option<f64>> {
    let kernels: Vec<Option<Vec<f32>>> = deltas
        .par_iter()
        .map(|d| {
            let d = d.as_ref()?;
            let t = d.len() / width;
            let mut x = d.clone();
            for c in 0..width {
                let mean = (0..t).map(|r| x[r * width + c] as f64).sum::<f64>() / t as f64;
                (0..t).for_each(|r| x[r * width + c] -= mean as f32);
            }
            let mut k = vec![0f32; t * t];
            let xm = MatRef::from_row_major_slice(&x, t, width);
            matmul(
                MatMut::from_column_major_slice_mut(&mut k, t, t),
                Accum::Replace,
                xm,
                xm.transpose(),
                1.0f32,
                Par::Seq,
            );
            clear_upper_ymm();
            Some(k)
        })
        .collect();
    let norms: Vec<Option<f64>> = kernels.iter().map(|k| k.as_ref().map(|k| dot(k, k).sqrt())).collect();
    pairs(kernels.len(), |i, j| {
        let (ki, kj) = (kernels[i].as_ref()?, kernels[j].as_ref()?);
        let (ni, nj) = (norms[i]?, norms[j]?);
        (ni > 0.0 && nj > 0.0).then(|| dot(ki, kj) / (ni * nj))
    })
}

/// `f(i, j)` for every pair `i <= j` of `n`, in parallel, as a symmetric row-major table.
fn pairs(n: usize, f: impl Fn(usize, usize) -> Option<f64> + Sync) -> Vec<Option<f64>> {
    let upper: Vec<(usize, usize)> = (0..n).flat_map(|i| (i..n).map(move |j| (i, j))).collect();
    let values: Vec<Option<f64>> = upper.par_iter().map(|&(i, j)| f(i, j)).collect();
    let mut out = vec![None; n * n];
    for (&(i, j), v) in upper.iter().zip(values) {
        out[i * n + j] = v;
        out[j * n + i] = v;
    }
    out
}

/// `sum a_i b_i` in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}
