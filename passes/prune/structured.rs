//! Structured pruning, `prune(heads=F, channels=F)`: whole attention heads and FFN channels
//! go, and the matrices around them shrink. The result runs as smaller dense linears on
//! every engine, so what it saves shows up in time as well as in bytes.
//!
//! # Groups
//! A *group* is a linear (the *consumer*) whose input columns fall into *units* that only
//! the consumer reads, with the linears that write them (the *producers*). They are found by
//! walking the graph, not by names:
//! - **channels**: the consumer's input is computed from producers of its width by
//!   elementwise ops only, each node read once (`gelu(up(x))`, `silu(gate(x)) * up(x)`).
//!   Channel `c` is row `c` of every producer (and of its bias) and column `c` of the
//!   consumer.
//! - **heads**: the consumer reads `reshape(transpose(attention(q, k, v), [0, 2, 1, 3]),
//!   [b, s, h d])`, and `q`, `k`, `v` are `transpose([rope](reshape(linear(x), [b, s, h,
//!   d])), [0, 2, 1, 3])`, each node read once. Head `j` is rows `j d .. (j + 1) d` of its
//!   producers and those columns of the consumer. With as many key/value heads as query
//!   heads, a head goes from q, k and v. With grouped key/value heads (`h_q = G h_kv`) only
//!   query heads go, the same number from every group, so that query head `j` still reads
//!   key/value head `j / G'` ([`Op::Attention`]); k and v stay.
//!
//! # Which units go
//! Each group loses `round(F x units)` of its units; for heads, the same number from every
//! key/value group; for channels, rounded so that a multiple of 32 channels stay (the
//! groups of the integer formats a `quantize` after it may use). A unit's score is its
//! contribution to the consumer's output over the calibration rows, `tr(W_u Σ_uu W_u^T)`,
//! with `W_u` the consumer's columns of the unit and `Σ` the Gram matrix of the consumer's
//! input in the model before the pass; without calibration, `|W_u|_F^2`. The lowest-scoring
//! units go, ties to the higher unit.
//!
//! # Refit
//! With calibration (and `refit=` not `none`) the consumers are refit by healing
//! ([`crate::heal`]): in execution order, on the pruned model's own inputs `x_c`, a
//! consumer's kept columns `S` become the least-squares fit of
//! - `refit=own` (the default): the consumer's original weight applied to the inputs it
//!   now sees,
//!   `W_S' = W Σ_{:,S} (Σ_SS + λ)^-1` with `Σ = Σ_t x_c x_c^T` (the removed columns' share
//!   of the output carried by the kept ones);
//! - `refit=reference`: the original model's output of the layer, `W_S' = W C_{:,S}
//!   (Σ_SS + λ)^-1` with `C = Σ_t x_o x_c^T`, `x_o` the original model's input.
//!
//! with `λ` [`REFIT_DAMP`] of the mean diagonal of `Σ_SS`. Each refit is kept only where the
//! end-to-end probe improves. `own` is the default: on MiniLM with `heads=0.25,
//! channels=0.25`, held-out cosine was 0.858 with it, 0.830 with `reference` and 0.832
//! without a refit; `reference` fits the calibration text more closely (docs/measurements.md,
//! section 7).
//!
//! # The rewrite
//! While units are chosen and refit, the graph keeps its shapes: the removed units are zero
//! columns of the consumer, which makes the model exactly the pruned one, so every service
//! of the framework (statistics, probes, healing) applies unchanged. Then the producers lose
//! the rows, the consumer the columns and the reshapes their head counts, and every type is
//! inferred anew ([`Graph::retype`]). Weights that change are stored f32, decoded from an
//! integer format if they had one (a note says so).

use super::{Fixed, PASS};
use crate::calibration::{Paired, Weighting};
use crate::heal::{HealedLayer, Proposal, Site, heal};
use crate::layers::apply_overrides;
use crate::quantize::gptq::relative_output_error;
use crate::{Context, PassError};
use faer::linalg::solvers::Solve;
use faer::{Mat, Side};
use kiln_ir::{Dim, Format, Graph, NodeId, Op, Role, TensorData};
use std::collections::HashMap;

/// The damping `λ` of a refit's system, relative to its mean diagonal.
pub const REFIT_DAMP: f64 = 0.01;

/// What a group's units are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Heads,
    Channels,
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Heads => "heads",
            Kind::Channels => "channels",
        })
    }
}

/// What the consumers are refit to (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refit {
    None,
    Own,
    Reference,
}

impl std::fmt::Display for Refit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refit::None => "none",
            Refit::Own => "own",
            Refit::Reference => "reference",
        })
    }
}

/// The options of a structured `prune(heads=F, channels=F)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Structured {
    /// The fraction of every attention's heads removed.
    pub heads: Option<f64>,
    /// The fraction of every FFN's channels removed.
    pub channels: Option<f64>,
    pub refit: Refit,
}

/// A producer: a linear writing the units, its weight and bias, the rows of one unit.
#[derive(Clone, Debug)]
struct Producer {
    weight: NodeId,
    bias: Option<NodeId>,
}

/// A group (see the module documentation).
#[derive(Clone, Debug)]
struct Group {
    kind: Kind,
    /// The consumer's layer name, its weight and input.
    name: String,
    weight: NodeId,
    input: NodeId,
    producers: Vec<Producer>,
    /// Reshapes whose `axis` counts units, `per` elements each.
    reshapes: Vec<(NodeId, usize, u64)>,
    units: usize,
    /// Columns (rows of a producer) per unit.
    unit: usize,
    /// Units come in `sets` consecutive sets that lose the same number (key/value groups).
    sets: usize,
}

/// What the structured prune did to one group.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuredGroup {
    /// The consumer's layer.
    pub name: String,
    pub kind: Kind,
    pub units: usize,
    pub kept: usize,
    /// The producers' and consumer's weights (biases included), before and after.
    pub params_before: u64,
    pub params: u64,
    /// With calibration, the consumer's relative output error with the units removed and
    /// no refit, on the model before the pass: `tr(dW Σ dW^T) / tr(W Σ W^T)`.
    pub error: Option<f64>,
    /// Healing's refit of the consumer, if it ran.
    pub healed: Option<HealedLayer>,
    /// Why the group kept every unit, if it did.
    pub why_unchanged: Option<String>,
}

/// The report of a structured `prune`.
#[derive(Clone, Debug, PartialEq)]
pub struct StructuredReport {
    pub options: Structured,
    pub groups: Vec<StructuredGroup>,
    pub params_before: u64,
    pub params: u64,
    /// The probe's distance before and after healing, if it ran.
    pub heal: Option<(f64, f64)>,
    pub notes: Vec<String>,
}

/// Removes heads and channels as `options` say, refit with calibration ([`Context`]).
pub fn prune_structured(
    graph: &mut Graph,
    options: &Structured,
    overrides: &[(String, Fixed)],
    ctx: &Context,
) -> Result<StructuredReport, PassError> {
    let fail = |message: String| PassError::not_applicable(PASS, message);
    let all = groups(graph);
    let wanted: Vec<&Group> = all
        .iter()
        .filter(|g| match g.kind {
            Kind::Heads => options.heads.is_some(),
            Kind::Channels => options.channels.is_some(),
        })
        .collect();
    for (kind, fraction) in [(Kind::Heads, options.heads), (Kind::Channels, options.channels)] {
        if fraction.is_some() && !wanted.iter().any(|g| g.kind == kind) {
            return Err(fail(format!(
                "{kind}= found no {}: no linear reads {}",
                if kind == Kind::Heads { "attention" } else { "FFN" },
                if kind == Kind::Heads {
                    "the merged heads of an attention whose q, k and v are projections of its own"
                } else {
                    "an elementwise function of projections that nothing else reads"
                }
            )));
        }
    }
    let names: Vec<&str> = wanted.iter().map(|g| g.name.as_str()).collect();
    let fixed = apply_overrides(&names, overrides).map_err(fail)?;
    let calibration = ctx.calibration(graph)?;
    let reference = graph.clone();
    let mut notes = Vec::new();
    let mut decoded = Vec::new();
    let mut report =
        StructuredReport { options: *options, groups: vec![], params_before: 0, params: 0, heal: None, notes: vec![] };
    // Choose each group's units and zero the consumer's removed columns.
    let mut plans: Vec<(&Group, Vec<usize>)> = Vec::new();
    for (g, fixed) in wanted.iter().zip(&fixed) {
        let fraction = match (fixed, g.kind) {
            (Some(Fixed::Dense), _) => None,
            (Some(Fixed::Sparsity(s)), _) => Some(*s),
            (None, Kind::Heads) => options.heads,
            (None, Kind::Channels) => options.channels,
        };
        let (w, n, k) = matrix(graph, g.weight).map_err(fail)?;
        let params_before = params(graph, g);
        let mut out = StructuredGroup {
            name: g.name.clone(),
            kind: g.kind,
            units: g.units,
            kept: g.units,
            params_before,
            params: params_before,
            error: None,
            healed: None,
            why_unchanged: None,
        };
        let keep = match fraction {
            None => Err("--override says dense".to_string()),
            Some(f) => kept_count(g, f),
        };
        match keep {
            Err(why) => out.why_unchanged = Some(why),
            Ok(per_set) => {
                let sigma = match &calibration {
                    Some(c) => Some(c.inputs.get(&g.input).ok_or_else(|| {
                        fail(format!("layer {}: the calibration runs gathered no statistics of its input", g.name))
                    })?),
                    None => None,
                };
                let scores = unit_scores(&w, n, k, g.unit, sigma.map(|s| s.sum.as_slice()));
                let kept = keep_units(&scores, g.sets, per_set);
                let masked = mask_columns(&w, n, k, g.unit, &kept);
                out.error = sigma.map(|s| relative_output_error(&w, &masked, n, k, &s.sum));
                out.kept = kept.len();
                if !matches!(graph.node(g.weight).op, Op::Weight(ref r) if r.format == Format::F32) {
                    decoded.push(g.name.clone());
                }
                graph.set_weight(g.weight, TensorData::from_f32(vec![n as u64, k as u64], &masked));
                plans.push((g, kept));
            }
        }
        report.groups.push(out);
    }
    // Heal the consumers on the pruned model's inputs.
    if options.refit != Refit::None && calibration.is_some() && !plans.is_empty() {
        let sites: Vec<Site> = plans
            .iter()
            .map(|(g, _)| Site { input: g.input, reference: g.input, layers: vec![g.name.clone()] })
            .collect();
        let by_input: HashMap<NodeId, (&Group, &[usize])> =
            plans.iter().map(|(g, kept)| (g.input, (*g, kept.as_slice()))).collect();
        let mut propose = |now: &Graph, site: &Site, paired: &Paired| -> Result<Vec<Proposal>, String> {
            let (g, kept) = by_input[&site.input];
            let (original, n, k) = matrix(&reference, g.weight)?;
            let (current, _, _) = matrix(now, g.weight)?;
            let columns = columns(g.unit, kept);
            let fitted = refit(&original, n, k, &columns, paired, options.refit)?;
            let error = |m: &[f32]| layer_error(&original, m, n, k, paired, options.refit);
            Ok(vec![Proposal {
                layer: g.name.clone(),
                error_before: error(&current),
                error_after: error(&fitted),
                weights: vec![(g.weight, fitted)],
            }])
        };
        let aim = (options.refit == Refit::Reference).then_some(&reference);
        let healed = heal(PASS, graph, aim, &sites, ctx, Weighting::Relative, &mut propose)?;
        let kept = healed.layers.iter().filter(|h| h.kept).count();
        for h in healed.layers {
            if let Some(g) = report.groups.iter_mut().find(|g| g.name == h.layer) {
                g.healed = Some(h);
            }
        }
        report.heal = Some((healed.probe_before, healed.probe_after));
        notes.push(format!(
            "the refit ({}) was kept for {kept} of {} consumers: the probe moved from {:.4e} to {:.4e}",
            options.refit,
            plans.len(),
            healed.probe_before,
            healed.probe_after
        ));
    } else if calibration.is_none() {
        notes.push("without --calib: units scored by their consumer's column norms, and nothing refit".into());
    }
    // Shrink.
    for (g, kept) in &plans {
        shrink(graph, g, kept).map_err(fail)?;
    }
    graph.retype().map_err(|source| PassError::Graph { pass: PASS, source })?;
    for (out, g) in report.groups.iter_mut().zip(&wanted) {
        out.params = params(graph, g);
        report.params_before += out.params_before;
        report.params += out.params;
    }
    if !decoded.is_empty() {
        notes.push(format!(
            "the weights around {} groups were decoded and are stored f32 (a quantize after prune stores them in an integer format)",
            decoded.len()
        ));
    }
    let unchanged: Vec<String> = report
        .groups
        .iter()
        .filter_map(|g| g.why_unchanged.as_ref().map(|why| format!("{} ({why})", g.name)))
        .collect();
    if !unchanged.is_empty() {
        notes.push(format!("{} groups keep every unit: {}", unchanged.len(), unchanged.join(", ")));
    }
    report.notes = notes;
    kiln_ir::verify(graph).map_err(|e| PassError::Invalid { pass: PASS, message: e.to_string() })?;
    Ok(report)
}

/// How many units each set keeps when `fraction` of the group's go, or why none go.
fn kept_count(g: &Group, fraction: f64) -> Result<usize, String> {
    let per_set = g.units / g.sets;
    let keep = match g.kind {
        Kind::Heads => per_set - (fraction * per_set as f64).round() as usize,
        Kind::Channels => {
            let step = [32, 8, 1].into_iter().find(|s| g.units.is_multiple_of(*s)).unwrap_or(1);
            let keep = ((1.0 - fraction) * g.units as f64 / step as f64).round() as usize * step;
            keep.max(step)
        }
    };
    if keep == 0 {
        return Err(format!("{fraction} of {per_set} heads per key/value head leaves none"));
    }
    if keep >= per_set {
        return Err(format!("{fraction} of {} {} rounds to none", g.units, g.kind));
    }
    Ok(keep)
}

/// Each unit's score: `tr(W_u Σ_uu W_u^T)` over the consumer's columns of unit `u` (`unit`
/// columns each), `|W_u|_F^2` without `sigma`.
pub fn unit_scores(w: &[f32], n: usize, k: usize, unit: usize, sigma: Option<&[f64]>) -> Vec<f64> {
    (0..k / unit)
        .map(|u| {
            let cols = u * unit..(u + 1) * unit;
            let mut score = 0.0;
            for row in w.chunks(k).take(n) {
                for i in cols.clone() {
                    match sigma {
                        None => score += (row[i] as f64).powi(2),
                        Some(s) => {
                            let wi = row[i] as f64;
                            score += cols.clone().map(|j| wi * row[j] as f64 * s[i * k + j]).sum::<f64>();
                        }
                    }
                }
            }
            score
        })
        .collect()
}

/// The units kept, in order: in each of `sets` consecutive sets of units, the `keep`
/// highest-scoring, ties to the lower unit.
pub fn keep_units(scores: &[f64], sets: usize, keep: usize) -> Vec<usize> {
    let per_set = scores.len() / sets;
    let mut kept = Vec::new();
    for set in 0..sets {
        let mut order: Vec<usize> = (set * per_set..(set + 1) * per_set).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        kept.extend_from_slice(&order[..keep]);
    }
    kept.sort_unstable();
    kept
}

/// The columns of the kept units.
fn columns(unit: usize, kept: &[usize]) -> Vec<usize> {
    kept.iter().flat_map(|&u| u * unit..(u + 1) * unit).collect()
}

/// `w [n, k]` with the columns of units not `kept` zero.
fn mask_columns(w: &[f32], n: usize, k: usize, unit: usize, kept: &[usize]) -> Vec<f32> {
    let mut keep = vec![false; k];
    for c in columns(unit, kept) {
        keep[c] = true;
    }
    let mut out = w[..n * k].to_vec();
    for row in out.chunks_mut(k) {
        row.iter_mut().zip(&keep).filter(|(_, k)| !**k).for_each(|(v, _)| *v = 0.0);
    }
    out
}

/// The refit of the consumer `w [n, k]` on the kept `columns` (see the module
/// documentation), full width with the other columns zero.
pub(crate) fn refit(
    w: &[f32],
    n: usize,
    k: usize,
    columns: &[usize],
    paired: &Paired,
    how: Refit,
) -> Result<Vec<f32>, String> {
    if paired.k != k {
        return Err(format!("input statistics of width {} for a consumer of {k} columns", paired.k));
    }
    let target = match how {
        Refit::Reference => paired.cross.as_ref().ok_or("refit=reference needs the original model's inputs")?,
        _ => &paired.own,
    };
    let s = columns.len();
    let mut a = Mat::<f64>::from_fn(s, s, |i, j| paired.own[columns[i] * k + columns[j]]);
    let mean = (0..s).map(|i| a[(i, i)]).sum::<f64>() / s.max(1) as f64;
    let lam = REFIT_DAMP * if mean > 0.0 { mean } else { 1.0 };
    for i in 0..s {
        a[(i, i)] += lam;
    }
    // B = W T_{:,S} [n, s]; the fit X [n, s] solves X A = B, i.e. A X^T = B^T.
    let wm = Mat::<f64>::from_fn(n, k, |i, j| w[i * k + j] as f64);
    let t = Mat::<f64>::from_fn(k, s, |i, j| target[i * k + columns[j]]);
    let bt = (&wm * &t).transpose().to_owned();
    let llt = a.llt(Side::Lower).map_err(|e| format!("the refit's system is singular: {e:?}"))?;
    let xt = llt.solve(bt);
    let mut out = vec![0.0f32; n * k];
    for i in 0..n {
        for (j, &c) in columns.iter().enumerate() {
            out[i * k + c] = xt[(j, i)] as f32;
        }
    }
    Ok(out)
}

/// The layer-wise error a refit minimizes, of consumer weights `m` against the original
/// `w`: `Σ_t |W x_c - M x_c|^2` (own) or `Σ_t |W x_o - M x_c|^2` (reference).
pub(crate) fn layer_error(w: &[f32], m: &[f32], n: usize, k: usize, paired: &Paired, how: Refit) -> f64 {
    let quad = |a: &[f32], g: &[f64], b: &[f32]| -> f64 {
        // Σ_rows a_r^T G b_r.
        let mut total = 0.0;
        for r in 0..n {
            let (ar, br) = (&a[r * k..(r + 1) * k], &b[r * k..(r + 1) * k]);
            for i in 0..k {
                if ar[i] == 0.0 {
                    continue;
                }
                let gi = &g[i * k..(i + 1) * k];
                total += ar[i] as f64 * gi.iter().zip(br).map(|(g, b)| g * *b as f64).sum::<f64>();
            }
        }
        total
    };
    let error = match (how, &paired.cross, &paired.reference) {
        (Refit::Reference, Some(c), Some(r)) => quad(w, r, w) - 2.0 * quad(w, c, m) + quad(m, &paired.own, m),
        _ => {
            let d: Vec<f32> = w.iter().zip(m).map(|(a, b)| a - b).collect();
            quad(&d, &paired.own, &d)
        }
    };
    error.max(0.0)
}

/// A dense weight's value as `[n, k]`.
pub(crate) fn matrix(graph: &Graph, weight: NodeId) -> Result<(Vec<f32>, usize, usize), String> {
    let shape = graph.node(weight).ty.known_shape().unwrap_or_default();
    let Op::Weight(w) = &graph.node(weight).op else { return Err("not a weight".into()) };
    let values = w.value(&graph.store, &shape).map_err(|e| e.to_string())?;
    match shape[..] {
        [n, k] => Ok((values, n as usize, k as usize)),
        [n] => Ok((values, n as usize, 1)),
        _ => Err(format!("a weight of shape {shape:?}")),
    }
}

/// Stored values of a group's weights: its producers', their biases', its consumer's.
fn params(graph: &Graph, g: &Group) -> u64 {
    let count = |w: NodeId| graph.node(w).ty.known_shape().map_or(0, |s| s.iter().product::<u64>());
    g.producers.iter().map(|p| count(p.weight) + p.bias.map_or(0, count)).sum::<u64>() + count(g.weight)
}

/// Removes the units not `kept`: the producers' rows, the consumer's columns, and the units
/// from the reshapes. Types are inferred afterwards.
fn shrink(graph: &mut Graph, g: &Group, kept: &[usize]) -> Result<(), String> {
    let rows = columns(g.unit, kept);
    let take_rows = |graph: &mut Graph, w: NodeId| -> Result<(), String> {
        let (values, n, k) = matrix(graph, w)?;
        debug_assert_eq!(n, g.units * g.unit);
        let out: Vec<f32> = rows.iter().flat_map(|&r| values[r * k..(r + 1) * k].iter().copied()).collect();
        let shape =
            if graph.node(w).ty.shape.len() == 1 { vec![rows.len() as u64] } else { vec![rows.len() as u64, k as u64] };
        graph.resize_weight(w, TensorData::from_f32(shape, &out)).ok_or("a dense weight")?;
        Ok(())
    };
    for p in &g.producers {
        take_rows(graph, p.weight)?;
        if let Some(b) = p.bias {
            take_rows(graph, b)?;
        }
    }
    let (values, n, k) = matrix(graph, g.weight)?;
    let out: Vec<f32> =
        (0..n).flat_map(|i| rows.iter().map(move |&c| (i, c))).map(|(i, c)| values[i * k + c]).collect();
    graph
        .resize_weight(g.weight, TensorData::from_f32(vec![n as u64, rows.len() as u64], &out))
        .ok_or("a dense weight")?;
    for &(node, axis, per) in &g.reshapes {
        let Op::Reshape { shape } = &mut graph.node_mut(node).op else { return Err("not a reshape".into()) };
        shape[axis] = Dim::Known(kept.len() as u64 * per);
    }
    Ok(())
}

/// Every group of `graph`, in node order (see the module documentation).
fn groups(graph: &Graph) -> Vec<Group> {
    let mut out = Vec::new();
    for n in graph.topo_order().unwrap_or_default() {
        if !matches!(graph.node(n).op, Op::Linear { .. }) {
            continue;
        }
        if let Some(g) = heads(graph, n).or_else(|| channels(graph, n)) {
            out.push(g);
        }
    }
    out
}

/// The node's single user, if it has exactly one.
fn only_user(graph: &Graph, n: NodeId) -> Option<NodeId> {
    match graph.users(n)[..] {
        [u] => Some(u),
        _ => None,
    }
}

/// A linear's weight (dense, read by it alone, its layer's only weight) and layer name, and
/// its bias (read by it alone).
fn own_weight(graph: &Graph, linear: NodeId) -> Option<(String, Producer)> {
    let operands = graph.operands(linear);
    let w = operands[1];
    let dense = |w: NodeId| {
        matches!(&graph.node(w).op, Op::Weight(r) if r.sparse.is_none()) && only_user(graph, w) == Some(linear)
    };
    if !dense(w) {
        return None;
    }
    let (name, layer) = graph.layers.iter().find(|(_, l)| l.main() == Some(w))?;
    if layer.weights.iter().any(|&(r, _)| r != Role::Main) {
        return None;
    }
    let bias = operands.get(2).copied();
    if bias.is_some_and(|b| !dense(b)) {
        return None;
    }
    Some((name.to_string(), Producer { weight: w, bias }))
}

/// The last dimension of a node's type, if known.
fn width(graph: &Graph, n: NodeId) -> Option<u64> {
    match graph.node(n).ty.shape.last() {
        Some(Dim::Known(d)) => Some(*d),
        _ => None,
    }
}

/// The channel group `consumer` closes, if it is one.
fn channels(graph: &Graph, consumer: NodeId) -> Option<Group> {
    let (name, own) = own_weight(graph, consumer)?;
    let input = graph.operands(consumer)[0];
    let f = width(graph, input)?;
    if only_user(graph, input) != Some(consumer) {
        return None;
    }
    let mut producers = Vec::new();
    let mut stack = vec![input];
    while let Some(n) = stack.pop() {
        if width(graph, n) != Some(f) {
            return None;
        }
        match &graph.node(n).op {
            Op::Linear { .. } => producers.push(own_weight(graph, n)?.1),
            Op::Unary(_) => stack.push(graph.operands(n)[0]),
            Op::Binary(_) => {
                for o in graph.operands(n) {
                    match graph.node(o).op {
                        Op::Const { .. } => {}
                        _ if only_user(graph, o) == Some(n) => stack.push(o),
                        _ => return None,
                    }
                }
            }
            _ => return None,
        }
    }
    if producers.is_empty() {
        return None;
    }
    Some(Group {
        kind: Kind::Channels,
        name,
        weight: own.weight,
        input,
        producers,
        reshapes: vec![],
        units: f as usize,
        unit: 1,
        sets: 1,
    })
}

/// The head group `consumer` closes, if it is one.
fn heads(graph: &Graph, consumer: NodeId) -> Option<Group> {
    let (name, own) = own_weight(graph, consumer)?;
    let known = |d: &Dim| match d {
        Dim::Known(v) => Some(*v),
        _ => None,
    };
    let is_swap = |n: NodeId| matches!(&graph.node(n).op, Op::Transpose { perm } if perm[..] == [0, 2, 1, 3]);
    let input = graph.operands(consumer)[0];
    let Op::Reshape { shape } = &graph.node(input).op else { return None };
    let merged = known(shape.last()?)?;
    let merge = input;
    let t = graph.operands(merge)[0];
    let a = graph.operands(t)[0];
    if shape.len() != 3
        || only_user(graph, input) != Some(consumer)
        || !is_swap(t)
        || only_user(graph, t) != Some(merge)
        || !matches!(graph.node(a).op, Op::Attention { .. })
        || only_user(graph, a) != Some(t)
    {
        return None;
    }
    // q, k, v back to their projections: (reshape, its head count, head size, producer).
    let side = |x: NodeId| -> Option<(NodeId, u64, u64, Producer)> {
        if !is_swap(x) || only_user(graph, x) != Some(a) {
            return None;
        }
        let (mut next, mut n) = (x, graph.operands(x)[0]);
        if matches!(graph.node(n).op, Op::Rope { .. }) {
            if only_user(graph, n) != Some(x) {
                return None;
            }
            (next, n) = (n, graph.operands(n)[0]);
        }
        let Op::Reshape { shape } = &graph.node(n).op else { return None };
        let (h, d) = match &shape[..] {
            [_, _, h, d] => (known(h)?, known(d)?),
            _ => return None,
        };
        let linear = graph.operands(n)[0];
        if only_user(graph, n) != Some(next)
            || !matches!(graph.node(linear).op, Op::Linear { .. })
            || width(graph, linear) != Some(h * d)
            || only_user(graph, linear) != Some(n)
        {
            return None;
        }
        Some((n, h, d, own_weight(graph, linear)?.1))
    };
    let operands = graph.operands(a);
    // The same node twice (q = k) would lose rows twice.
    if operands[0] == operands[1] || operands[1] == operands[2] || operands[0] == operands[2] {
        return None;
    }
    let (q, k, v) = (side(operands[0])?, side(operands[1])?, side(operands[2])?);
    let (hq, d) = (q.1, q.2);
    if k.1 != v.1 || k.2 != d || v.2 != d || hq % k.1 != 0 || merged != hq * d {
        return None;
    }
    let (producers, reshapes) = if k.1 == hq {
        (vec![q.3, k.3, v.3], vec![(q.0, 2, 1), (k.0, 2, 1), (v.0, 2, 1), (merge, 2, d)])
    } else {
        (vec![q.3], vec![(q.0, 2, 1), (merge, 2, d)])
    };
    Some(Group {
        kind: Kind::Heads,
        name,
        weight: own.weight,
        input,
        producers,
        reshapes,
        units: hq as usize,
        unit: d as usize,
        sets: if k.1 == hq { 1 } else { k.1 as usize },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores by hand: `tr(W_u Σ_uu W_u^T)` reads the unit's block of `Σ`, cross terms
    /// included; without `Σ`, the squared norm of the unit's columns.
    #[test]
    fn scores_read_the_units_block() {
        // W [2, 4], units of 2 columns.
        let w = [1.0, 2.0, 0.5, 0.0, -1.0, 1.0, 0.0, 3.0];
        let mut sigma = vec![0.0; 16];
        for (i, j, v) in [(0, 0, 1.0), (1, 1, 2.0), (0, 1, 0.5), (1, 0, 0.5), (2, 2, 4.0), (3, 3, 1.0), (0, 2, 9.0)] {
            sigma[i * 4 + j] = v;
        }
        // Unit 0: rows (1, 2) and (-1, 1): 1 + 2·4 + 2·0.5·2 = 11, 1 + 2 - 2·0.5 = 2.
        // Unit 1: rows (0.5, 0) and (0, 3): 4·0.25 = 1, 9. Σ_02 lies outside both blocks.
        assert_eq!(unit_scores(&w, 2, 4, 2, Some(&sigma)), [13.0, 10.0]);
        assert_eq!(unit_scores(&w, 2, 4, 2, None), [7.0, 9.25]);
    }

    /// Each set keeps the same number, its highest scores, ties to the lower unit.
    #[test]
    fn every_set_keeps_its_share() {
        let scores = [3.0, 1.0, 2.0, 5.0, 5.0, 0.0];
        assert_eq!(keep_units(&scores, 1, 4), [0, 2, 3, 4]);
        assert_eq!(keep_units(&scores, 2, 2), [0, 2, 3, 4]);
        assert_eq!(keep_units(&scores, 3, 1), [0, 3, 4]);
        assert_eq!(keep_units(&[1.0, 1.0, 1.0], 1, 2), [0, 1]);
    }

    /// A removed column that is a combination of kept ones (x_2 = 2 x_0 - x_1) is carried by
    /// them after the refit: its weight moves onto them, and the output barely changes,
    /// where removing it alone changes the output a lot (the weights within the pull of the
    /// damping, 1% of the mean diagonal).
    #[test]
    fn the_refit_carries_a_dependent_column() {
        let (n, k, rows) = (3usize, 3usize, 64usize);
        let xs: Vec<[f64; 3]> = (0..rows)
            .map(|t| {
                let (a, b) = (((t * 7919) % 97) as f64 / 50.0 - 1.0, ((t * 104729) % 89) as f64 / 45.0 - 1.0);
                [a, b, 2.0 * a - b]
            })
            .collect();
        let mut own = vec![0.0; k * k];
        for x in &xs {
            for i in 0..k {
                for j in 0..k {
                    own[i * k + j] += x[i] * x[j];
                }
            }
        }
        let paired = Paired { k, own, cross: None, reference: None, rows: rows as u64 };
        let w: Vec<f32> = vec![1.0, 0.5, 2.0, -1.0, 1.0, 0.5, 0.0, 0.3, -1.5];
        let fitted = refit(&w, n, k, &[0, 1], &paired, Refit::Own).unwrap();
        let masked = mask_columns(&w, n, k, 1, &[0, 1]);
        let error = |m: &[f32]| layer_error(&w, m, n, k, &paired, Refit::Own);
        let total = error(&vec![0.0; n * k]);
        assert!(error(&masked) > 0.1 * total, "removing the column alone loses much");
        assert!(error(&fitted) < 1e-3 * total, "the refit carries it: {} of {total}", error(&fitted));
        for r in 0..n {
            assert_eq!(fitted[r * k + 2], 0.0);
            let (w0, w1, w2) = (w[r * k] as f64, w[r * k + 1] as f64, w[r * k + 2] as f64);
            assert!((fitted[r * k] as f64 - (w0 + 2.0 * w2)).abs() < 0.1, "row {r}: {:?}", &fitted[r * k..]);
            assert!((fitted[r * k + 1] as f64 - (w1 - w2)).abs() < 0.1, "row {r}: {:?}", &fitted[r * k..]);
        }
    }
}
