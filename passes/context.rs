//! What passes get besides the graph and their options: calibration statistics, a probe of
//! end-to-end fidelity, the user's overrides, and a place to report progress.

use crate::calibration::Calibration;
use crate::quantize::Activations;
use kiln_ir::Graph;

/// Runs a changed copy of the graph, its linears on quantized weights taking the given
/// activations, on held-out calibration inputs, and says how far its outputs moved from the
/// unchanged model's (the CLI measures KL divergence of next-token distributions, or
/// 1 - cosine of embeddings). Passes never run models themselves.
pub type Probe<'a> = dyn Fn(&Graph, Activations) -> Result<f64, String> + 'a;

/// What passes get besides the graph and their options.
pub struct Context<'a> {
    /// Statistics of the calibration inputs, if the user gave any.
    pub calibration: Option<&'a Calibration>,
    /// Measures how far a changed graph's outputs move (see [`Probe`]).
    pub probe: Option<&'a Probe<'a>>,
    /// `--override PATTERN=VALUE` as written, in order; the passes that choose per layer
    /// parse the values and must honor every one (a pattern that matches no layer is an
    /// error, never skipped).
    pub overrides: Vec<(String, String)>,
    /// `progress(done, total, what)`.
    pub progress: &'a (dyn Fn(usize, usize, &str) + Sync),
}

impl<'a> Context<'a> {
    /// A context with nothing: no calibration, no probe, no overrides, progress ignored.
    pub fn empty() -> Context<'static> {
        Context { calibration: None, probe: None, overrides: Vec::new(), progress: &|_, _, _| {} }
    }
}
