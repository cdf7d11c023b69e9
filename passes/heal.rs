//! Healing: refitting compressed layers on the compressed model's own activations, each
//! refit kept only where it brings the model closer to the original end to end.
//!
//! A family (factorize; pruning and tying to come) compresses layers one-shot, then hands
//! [`heal`] the graph, the model before the pass (the *reference*), and the *sites* to refit
//! at: a linear input and the layers that read it (a block's q, k and v share one). Then:
//! 1. The compressed model runs over the calibration rows in execution order
//!    ([`Executor::sequential`]). At each site the family gets [`Paired`] statistics of the
//!    inputs the compressed model feeds it so far (`x_c`) and, for refits that aim at the
//!    reference's outputs, the reference's (`x_o`), and proposes new weights for the site's
//!    layers, with their layer-wise errors.
//! 2. The proposal is written into the graph and probed end to end (KL of next-token
//!    distributions, or 1 - cosine of embeddings, on held-out calibration rows). It is kept
//!    only if the probe improves; otherwise the old weights come back. Either way the run
//!    goes on with what was kept, so later sites fit on the inputs of the model as it will
//!    be.
//!
//! Why the probe judges, not the layer-wise error: in PyTorch on SmolLM2, a refit of the
//! left factors lowered the held-out output error of 194 of 210 layers and multiplied
//! perplexity by 112 (../shared/COMPRESSION.md, "Healing"). A layer's squared error says
//! nothing of the directions later layers amplify, and a few tokens with massive
//! activations dominate it ([`Weighting::Relative`] weighs every token by its own size).

use crate::calibration::{Paired, Weighting};
use crate::{Context, PassError};
use kiln_ir::{Graph, NodeId, Op, TensorData};
use std::collections::HashMap;

/// Where healing refits: `input`, a node of the compressed graph, stands for `reference`,
/// a node of the model before the pass; `layers` are read from it.
#[derive(Clone, Debug)]
pub struct Site {
    pub input: NodeId,
    pub reference: NodeId,
    pub layers: Vec<String>,
}

/// A family's refit of one layer: new values for its weights (node, f32 values in its
/// shape), and the layer-wise error its refit minimizes, over the calibration rows,
/// token-weighted, before and after (e.g. `sum |W x_c - W' x_c|^2`, the output on the inputs
/// the layer now sees, or `sum |W x_o - W' x_c|^2`, the reference's output).
#[derive(Clone, Debug)]
pub struct Proposal {
    pub layer: String,
    pub weights: Vec<(NodeId, Vec<f32>)>,
    pub error_before: f64,
    pub error_after: f64,
}

/// What the family proposes at a site: one [`Proposal`] per layer it refits there.
/// It reads the weights as they stand in the graph it is given.
pub type Propose<'a> = dyn FnMut(&Graph, &Site, &Paired) -> Result<Vec<Proposal>, String> + 'a;

/// What healing did to one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct HealedLayer {
    pub layer: String,
    /// Whether its refit was kept.
    pub kept: bool,
    /// The layer-wise error (see [`Proposal`]) of the one-shot weights on the inputs of
    /// the model healed so far, and of the refit.
    pub error_before: f64,
    pub error_after: f64,
}

/// What [`heal`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct HealReport {
    /// The probe's distance of the one-shot model, and of the healed one.
    pub probe_before: f64,
    pub probe_after: f64,
    pub layers: Vec<HealedLayer>,
    pub weighting: Weighting,
}

/// Refits `graph` at `sites` in execution order, keeping each site's refit only where the
/// probe improves (see the module documentation). With `reference` (the model before the
/// pass), the statistics pair the two models' inputs, for refits aimed at the reference's
/// outputs; without, they hold the compressed model's own inputs only (and the reference
/// model is not run). `propose` is the family's refit. Needs calibration rows held out for
/// probes ([`crate::Pass::probes`]).
pub fn heal(
    pass: &'static str,
    graph: &mut Graph,
    reference: Option<&Graph>,
    sites: &[Site],
    ctx: &Context,
    weighting: Weighting,
    propose: &mut Propose<'_>,
) -> Result<HealReport, PassError> {
    let fail = |message: String| PassError::not_applicable(pass, format!("healing: {message}"));
    let Some(executor) = ctx.executor().filter(|e| e.can_probe()) else {
        return Err(fail("needs calibration rows to refit on and to probe with: pass --calib".into()));
    };
    let progress = ctx.progress;
    // Each probe differs from the model last kept in one site's weights: the prober reruns
    // only what they reach.
    let (mut prober, probe_before) = executor.prober(graph).map_err(&fail)?;
    let mut best = probe_before;
    let mut layers = Vec::new();
    let by_input: HashMap<NodeId, &Site> = sites.iter().map(|s| (s.input, s)).collect();
    let inputs: Vec<NodeId> = sites.iter().map(|s| s.input).collect();
    let at: Vec<NodeId> = sites.iter().map(|s| s.reference).collect();
    // The executor runs its own copy; `graph` takes what is kept, for the probes.
    let running = graph.clone();
    let mut refit = |input: NodeId, paired: &Paired| -> Result<Vec<(NodeId, Vec<f32>)>, String> {
        let site = by_input[&input];
        let proposals = propose(graph, site, paired)?;
        if proposals.is_empty() {
            return Ok(Vec::new());
        }
        let old: Vec<(NodeId, TensorData)> = proposals
            .iter()
            .flat_map(|p| &p.weights)
            .map(|(w, values)| write(graph, *w, values))
            .collect::<Result<_, String>>()?;
        let changed: Vec<NodeId> = old.iter().map(|(w, _)| *w).collect();
        let distance = prober.probe(graph, &changed)?;
        let kept = distance < best;
        if kept {
            best = distance;
            prober.keep();
        } else {
            for (w, data) in old {
                graph.set_weight(w, data);
            }
        }
        let mut new = Vec::new();
        for p in proposals {
            layers.push(HealedLayer { layer: p.layer, kept, error_before: p.error_before, error_after: p.error_after });
            if kept {
                new.extend(p.weights);
            }
        }
        Ok(new)
    };
    let count = |done: usize, total: usize| progress(done, total, "healing");
    let reference = reference.map(|g| (g, &at[..]));
    executor.sequential(&running, &inputs, reference, weighting, &mut refit, &count).map_err(&fail)?;
    Ok(HealReport { probe_before, probe_after: best, layers, weighting })
}

/// Stores `values` as weight `w`'s f32 tensor; returns the old data, to put back with
/// [`Graph::set_weight`].
fn write(graph: &mut Graph, w: NodeId, values: &[f32]) -> Result<(NodeId, TensorData), String> {
    let shape = graph.node(w).ty.known_shape().unwrap_or_default();
    let scope = graph.node(w).scope.clone();
    let what = || format!("{scope}: healing refits dense f32 weights of the same shape");
    if shape.iter().product::<u64>() != values.len() as u64
        || !matches!(&graph.node(w).op, Op::Weight(x) if x.format == kiln_ir::Format::F32)
    {
        return Err(what());
    }
    let old = graph.set_weight(w, TensorData::from_f32(shape, values)).ok_or_else(what)?;
    Ok((w, old))
}
