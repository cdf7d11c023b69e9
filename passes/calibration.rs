//! Activation statistics gathered from calibration runs, and the [`Executor`] trait through
//! which passes get them: passes never run the model themselves.
//!
//! Memory is bounded by the model, not by the calibration set: one `k x k` sum per distinct
//! linear input (the q, k and v projections of a layer share one), whatever the number of
//! calibration rows.

use kiln_ir::{Graph, NodeId, Op};
use std::collections::HashMap;

/// The second moment of one linear input `x: [rows, k]`: `sum` holds `sum over rows of x x^T`
/// (row-major `k x k`, symmetric), so a layer's output error on the calibration data is
/// `trace(dW sum dW^T)` for a weight change `dW` (GPTQ's H up to a factor 2).
#[derive(Clone, Debug)]
pub struct Gram {
    pub k: usize,
    pub sum: Vec<f64>,
    pub rows: u64,
}

impl Gram {
    pub fn new(k: usize) -> Gram {
        Gram { k, sum: vec![0.0; k * k], rows: 0 }
    }

    /// Adds `x^T x` of a batch of `rows` rows, computed by the caller (in f32: a few
    /// hundred rows at a time lose nothing that matters to a sum kept in f64).
    pub fn add(&mut self, xtx: &[f32], rows: u64) {
        assert_eq!(xtx.len(), self.k * self.k, "x^T x of another width");
        for (s, &v) in self.sum.iter_mut().zip(xtx) {
            *s += v as f64;
        }
        self.rows += rows;
    }

    /// `sum over rows of x_j^2` for each input column `j`.
    pub fn diagonal(&self) -> Vec<f64> {
        (0..self.k).map(|j| self.sum[j * self.k + j]).collect()
    }
}

/// What calibration runs measured, keyed by node ids of the graph they ran on ([`crate::Context::calibration`]
/// gathers it anew for each state of the graph a pass asks about).
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// The input of linears: keyed by the node that *is* the input (a linear's operand 0).
    pub inputs: HashMap<NodeId, Gram>,
    /// Tokens (rows of the model's token inputs) the statistics were gathered over.
    pub tokens: u64,
}

impl Calibration {
    /// The statistics of a weight read by the linears whose inputs are `inputs` (one entry
    /// per linear): the sum of their inputs' Gram matrices, since the layer's output error
    /// is the sum of the errors of every linear that reads it (`trace(dW (H_1 + H_2) dW^T)`).
    /// Inputs without statistics add nothing; `None` if none has any.
    pub fn summed(&self, inputs: &[NodeId]) -> Option<Gram> {
        let mut grams = inputs.iter().filter_map(|x| self.inputs.get(x));
        let mut sum = grams.next()?.clone();
        for g in grams {
            for (s, v) in sum.sum.iter_mut().zip(&g.sum) {
                *s += v;
            }
            sum.rows += g.rows;
        }
        Some(sum)
    }
}

/// What passes need of a model's activations, computed by whoever can run models: the
/// engines implement it (`kiln_interp::Calibrator` runs the interpreter for statistics and
/// takes an engine for probes), so that passes never run a model themselves. The passes ask
/// through their [`crate::Context`], which gathers lazily, on the graph as it stands.
pub trait Executor: Sync {
    /// Runs `graph` over the calibration rows and returns `x^T x` of the value of every
    /// node in `nodes`, over the rows of its last dimension (positions the inputs mark as
    /// padding left out), keyed by those nodes, with the tokens the rows held.
    /// `progress(done, total)` counts rows.
    fn second_moments(
        &self,
        graph: &Graph,
        nodes: &[NodeId],
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Calibration, String>;

    /// Runs `graph` over the calibration rows and returns the value of every node in
    /// `nodes` as rows of its last dimension (positions the inputs mark as padding left
    /// out), the same tokens for every node, at most `max_rows` of them (the first),
    /// keyed by those nodes. Analyses that compare activations token by token take these;
    /// the default has none to give.
    fn activations(
        &self,
        graph: &Graph,
        nodes: &[NodeId],
        max_rows: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<HashMap<NodeId, Vec<f32>>, String> {
        let _ = (graph, nodes, max_rows, progress);
        Err("this executor keeps no activations".into())
    }

    /// Whether the executor has rows to probe with (held out of the statistics).
    fn can_probe(&self) -> bool;

    /// How far `graph`'s outputs move from the unchanged model's (with f32 activations) on
    /// the probe rows, its linears taking the activations their attributes say (KL
    /// divergence of next-token distributions for logits, 1 - cosine for other outputs).
    fn probe(&self, graph: &Graph) -> Result<f64, String>;

    /// Probes of `graph` as it changes a few weights at a time (healing's search), and the
    /// distance of `graph` as it is. Executors whose engine can rerun a changed graph from
    /// an earlier run's values recompute only what the changed weights reach; the default
    /// probes each graph whole.
    fn prober<'s>(&'s self, graph: &Graph) -> Result<(Box<dyn Prober + 's>, f64), String> {
        let whole = move |g: &Graph, _: &[NodeId]| self.probe(g);
        Ok((Box::new(Whole(whole)), self.probe(graph)?))
    }

    /// Runs `graph` (a compressed model) over every calibration row at once, node by node.
    /// Once each node of `sites` is computed, calls `refit` with its [`Paired`] statistics,
    /// weighted per token as `weighting` says; the weights `refit` returns (node of
    /// `graph`, new f32 values in its shape) replace the old ones for the rest of the run.
    /// So each refit sees the inputs of the model compressed and refitted so far, in
    /// execution order. With `reference` (the model before compression, and for each site
    /// the node of it that the site stands for), that model runs first on the same rows and
    /// the statistics pair both models' inputs. `progress(done, total)` counts sites.
    fn sequential(
        &self,
        graph: &Graph,
        sites: &[NodeId],
        reference: Option<(&Graph, &[NodeId])>,
        weighting: Weighting,
        refit: &mut Refit<'_>,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<(), String>;
}

/// [`Executor::probe`] on a model that changes a few weights at a time: made by
/// [`Executor::prober`] for a graph, which is the first *kept* graph.
pub trait Prober {
    /// The probe's distance of `graph`, which differs from the graph last kept only in the
    /// values of the weights `changed`.
    fn probe(&mut self, graph: &Graph, changed: &[NodeId]) -> Result<f64, String>;
    /// Makes the graph last probed the one the next probes differ from.
    fn keep(&mut self);
}

/// The default [`Prober`]: each graph probed whole.
struct Whole<F>(F);

impl<F: FnMut(&Graph, &[NodeId]) -> Result<f64, String>> Prober for Whole<F> {
    fn probe(&mut self, graph: &Graph, changed: &[NodeId]) -> Result<f64, String> {
        (self.0)(graph, changed)
    }
    fn keep(&mut self) {}
}

/// What [`Executor::sequential`] calls at each site: new values for weights.
pub type Refit<'a> = dyn FnMut(NodeId, &Paired) -> Result<Vec<(NodeId, Vec<f32>)>, String> + 'a;

/// How the tokens of a calibration run count in [`Paired`] sums.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weighting {
    /// Every token alike: the sums are of squared errors, where a few tokens with massive
    /// activations (a language model's first position) can outweigh all others.
    Uniform,
    /// Each token by `1 / |x|^2` (the squared norm of its reference input, or of its own
    /// input without a reference), scaled so that the weights average 1: every token's
    /// error counts relative to its own size.
    Relative,
}

/// Second moments of one linear input over the calibration rows: `x_c` in the compressed
/// model and, with a reference, `x_o` in the reference, each `[k]` per token `t`, with
/// token weights `w_t` ([`Weighting`]). All `k x k`, row-major.
#[derive(Clone, Debug)]
pub struct Paired {
    pub k: usize,
    /// `sum_t w_t x_c x_c^T`.
    pub own: Vec<f64>,
    /// `sum_t w_t x_o x_c^T` (row index from `x_o`, column from `x_c`), with a reference.
    pub cross: Option<Vec<f64>>,
    /// `sum_t w_t x_o x_o^T`, with a reference.
    pub reference: Option<Vec<f64>>,
    pub rows: u64,
}

impl Paired {
    /// `own` as a [`Gram`].
    pub fn own_gram(&self) -> Gram {
        Gram { k: self.k, sum: self.own.clone(), rows: self.rows }
    }
}

/// The nodes whose second moments passes use: the input of every `linear` (operand 0), in
/// node order, each once.
pub fn linear_inputs(graph: &Graph) -> Vec<NodeId> {
    let mut nodes: Vec<NodeId> = graph
        .node_ids()
        .filter(|&n| matches!(graph.node(n).op, Op::Linear { .. }))
        .map(|n| graph.operands(n)[0])
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}
