//! Activation statistics gathered from calibration runs: the data that passes which need
//! activations take (passes never run the model themselves; the CLI runs the interpreter
//! and fills a [`Calibration`]).
//!
//! Memory is bounded by the model, not by the calibration set: one `k x k` sum per distinct
//! linear input (the q, k and v projections of a layer share one), whatever the number of
//! calibration rows.

use kiln_ir::NodeId;
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

/// What calibration runs measured, keyed by node ids of the graph they ran on (passes that
/// take a `Calibration` must run on that graph, before any pass that renumbers nodes).
#[derive(Clone, Debug, Default)]
pub struct Calibration {
    /// The input of linears: keyed by the node that *is* the input (a linear's operand 0).
    pub inputs: HashMap<NodeId, Gram>,
    /// Tokens (rows of the model's token inputs) the statistics were gathered over.
    pub tokens: u64,
}
