//! What passes get besides the graph and their options: statistics of the calibration
//! inputs and a probe of end-to-end fidelity (both through an [`Executor`] the caller
//! provides), the user's overrides, and a place to report progress.
//!
//! Statistics are gathered lazily, on the graph as it stands when a pass asks, and kept
//! until the graph changes: a pass after `last_position` or after another compression pass
//! sees the activations of the model those passes left, never stale ones keyed by the node
//! ids of an earlier graph.

use crate::PassError;
use crate::calibration::{Calibration, Executor, linear_inputs};
use kiln_ir::Graph;
use std::sync::{Arc, Mutex};

/// Runs a changed copy of the graph, its linears taking the activations their attributes
/// say, on held-out calibration inputs, and says how far its outputs moved from the
/// unchanged model's (see [`Executor::probe`]).
pub type Probe<'a> = dyn Fn(&Graph) -> Result<f64, String> + 'a;

/// What passes get besides the graph and their options.
pub struct Context<'a> {
    executor: Option<&'a dyn Executor>,
    /// `--override PATTERN=VALUE` as written, in order; the passes that choose per layer
    /// parse the values and must honor every one (a pattern that matches no layer is an
    /// error, never skipped).
    pub overrides: Vec<(String, String)>,
    /// `progress(done, total, what)`.
    pub progress: &'a (dyn Fn(usize, usize, &str) + Sync),
    /// The last statistics gathered, with the fingerprint of the graph they describe.
    statistics: Mutex<Option<(u64, Arc<Calibration>)>>,
}

impl<'a> Context<'a> {
    /// A context whose statistics and probes come from `executor` (none: the passes run
    /// without calibration).
    pub fn new(
        executor: Option<&'a dyn Executor>,
        overrides: Vec<(String, String)>,
        progress: &'a (dyn Fn(usize, usize, &str) + Sync),
    ) -> Context<'a> {
        Context { executor, overrides, progress, statistics: Mutex::new(None) }
    }

    /// A context with nothing: no calibration, no probe, no overrides, progress ignored.
    pub fn empty() -> Context<'static> {
        Context::new(None, Vec::new(), &|_, _, _| {})
    }

    /// The `--override` values parsed as pass `pass` takes them, in order, with their
    /// patterns; a value that does not parse is an error naming the override.
    pub fn overrides_as<T: std::str::FromStr<Err = String>>(
        &self,
        pass: &'static str,
    ) -> Result<Vec<(String, T)>, PassError> {
        self.overrides
            .iter()
            .map(|(pattern, value)| {
                let parsed = value
                    .parse()
                    .map_err(|e: String| PassError::options(pass, format!("--override `{pattern}={value}`: {e}")))?;
                Ok((pattern.clone(), parsed))
            })
            .collect()
    }

    /// What runs the model for statistics and probes, if calibration inputs were given.
    pub fn executor(&self) -> Option<&'a dyn Executor> {
        self.executor
    }

    /// Whether calibration inputs were given.
    pub fn calibrated(&self) -> bool {
        self.executor.is_some()
    }

    /// `x^T x` of every linear's input over the calibration rows, on `graph` as it stands
    /// (keyed by its node ids); `None` without calibration. Gathered once per state of the
    /// graph: asking again about an unchanged graph costs nothing.
    pub fn calibration(&self, graph: &Graph) -> Result<Option<Arc<Calibration>>, PassError> {
        let Some(executor) = self.executor else { return Ok(None) };
        let fingerprint = fingerprint(graph);
        let mut cached = self.statistics.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((f, c)) = cached.as_ref()
            && *f == fingerprint
        {
            return Ok(Some(c.clone()));
        }
        let progress = |done: usize, total: usize| (self.progress)(done, total, "calibrating");
        let calibration = executor
            .second_moments(graph, &linear_inputs(graph), &progress)
            .map_err(|e| PassError::not_applicable("calibration", e))?;
        let calibration = Arc::new(calibration);
        *cached = Some((fingerprint, calibration.clone()));
        Ok(Some(calibration))
    }

    /// The probe, if the executor has rows to probe with.
    pub fn probe(&self) -> Option<Box<Probe<'a>>> {
        let executor = self.executor.filter(|e| e.can_probe())?;
        Some(Box::new(move |g: &Graph| executor.probe(g)))
    }
}

/// Identifies a state of a graph: its printed text (structure, formats, checksums of every
/// weight's bytes) and the node ids in printing order (statistics are keyed by ids, which
/// the text renumbers), hashed.
fn fingerprint(graph: &Graph) -> u64 {
    let mut text = kiln_ir::print(graph);
    for id in graph.topo_order().unwrap_or_default() {
        text.push_str(&format!(" {}", id.index()));
    }
    kiln_ir::store::fnv1a(text.as_bytes())
}
