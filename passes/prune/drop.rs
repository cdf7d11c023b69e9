//! `drop`: removes whole blocks (depth pruning, after ShortGPT and EvoPress).
//!
//! **Blocks.** A block is the set of nodes whose scope is `STEM.I` or starts with `STEM.I.`
//! (`blk.3`, `encoder.layer.3`), `I` a number: the stem with the most such blocks is the
//! model's stack. A block can be dropped when exactly one of its values is read outside it
//! (its output, the residual stream after it) and exactly one value it reads from outside has
//! the output's type (its input, the stream before it): dropping it makes every reader of the
//! output read the input, and the block's nodes, layers and tensors go. That holds for a
//! pre-norm decoder block (SmolLM2: the output is the second residual add) and a post-norm
//! encoder block (MiniLM: the output is the second layer norm).
//!
//! **Choice.**
//! - `blocks=K`: greedily, K times, the block whose removal moves the model's outputs least
//!   end to end, measured by the probe on held-out calibration rows (KL divergence of the
//!   next-token distributions, or 1 - cosine of embeddings) on the model with the blocks
//!   chosen so far already dropped. The first round tries every block, later rounds the
//!   best [`FOLLOW`] (or `2K`) of the round before. EvoPress showed that depth errors do
//!   not add up, so each round measures anew rather than ranking once; ShortGPT's block influence
//!   (1 - cosine between a block's input and output) ranks blocks by their own change,
//!   which says nothing of what later blocks make of it.
//! - `blocks=[3,7]`: those blocks, by index, without calibration.
//!
//!
//! **Refit after each gap** (`refit=true`; off by default). The first block
//! after each run of dropped blocks now reads a stream the original model never gave it.
//! Its linears are refit by healing ([`crate::heal`]): in execution order, on the dropped
//! model's own inputs `x_c`, each weight becomes the least-squares fit of the original
//! model's output of the layer, `W' = W C (Σ + λ)^-1` with `C = Σ_t x_o x_c^T` and
//! `Σ = Σ_t x_c x_c^T` (the structured prune's `refit=reference` with every column kept),
//! kept only where the end-to-end probe improves. A refit weight is stored f32; a weight
//! whose refit is not kept keeps its stored format. Off by default: on SmolLM2 at
//! `blocks=3` it kept 6 of 21 refits and moved the probe from 0.353 to 0.329, and
//! perplexity on held-out text of another kind went from 1.296x to 1.322x (the refit fits
//! the calibration text; docs/measurements.md, section 7.3).

use super::structured::{Refit, layer_error, matrix, refit};
use crate::calibration::{Paired, Weighting};
use crate::heal::{HealedLayer, Proposal, Site, heal};
use crate::options::{Args, OptionHelp, Options};
use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::{Graph, Layer, NodeId, Op, TensorData};
use std::collections::{BTreeMap, HashSet};

const PASS: &str = "drop";

/// The pass as a pipeline names it: `drop(...)`.
pub struct Drop;

impl Pass for Drop {
    const NAME: &'static str = PASS;
    const SUMMARY: &'static str = "remove whole blocks: blocks=K chosen greedily, each the one whose removal moves the outputs least end to end on held-out calibration rows, or blocks=[i,j] forced; refit=true refits the first block after each gap";
    type Options = DropOptions;

    fn probes(options: &DropOptions) -> bool {
        matches!(options.blocks, Blocks::Count(_)) || options.refit
    }

    fn run(graph: &mut Graph, options: &DropOptions, ctx: &Context) -> Result<PassReport, PassError> {
        let fail = |message: String| PassError::not_applicable(PASS, message);
        let blocks = find_blocks(graph).map_err(fail)?;
        let reference = options.refit.then(|| graph.clone());
        let mut report = match &options.blocks {
            Blocks::Forced(indices) => {
                for i in indices {
                    if !blocks.iter().any(|b| b.index == *i) {
                        let known: Vec<String> = blocks.iter().map(|b| b.index.to_string()).collect();
                        return Err(fail(format!("there is no block {i}: the blocks are {}", known.join(", "))));
                    }
                }
                drop_blocks(graph, &blocks, indices, vec![], None).map_err(fail)?
            }
            Blocks::Count(k) => {
                let probe = ctx.probe().ok_or_else(|| {
                    fail("blocks=K measures each removal end to end: pass --calib (or force blocks=[i,j])".into())
                })?;
                greedy(graph, &blocks, *k, &*probe, ctx.progress).map_err(fail)?
            }
        };
        if let Some(reference) = &reference {
            refit_gaps(graph, reference, &blocks, &mut report, ctx)?;
        }
        kiln_ir::verify(graph).map_err(|e| PassError::Invalid { pass: PASS, message: e.to_string() })?;
        Ok(PassReport::Drop(report))
    }
}

/// Which blocks to drop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// This many, chosen by the probe.
    Count(usize),
    /// These, by index.
    Forced(Vec<usize>),
}

/// The options of `drop(...)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DropOptions {
    pub blocks: Blocks,
    /// Refit the block after each gap.
    pub refit: bool,
}

impl Options for DropOptions {
    const HELP: &'static [OptionHelp] = &[
        OptionHelp {
            name: "blocks",
            values: "K|[i,j,...]",
            default: "required",
            help: "K: drop K blocks, each round the one whose removal moves the outputs least on held-out calibration rows (needs --calib); [i,j,...]: drop those blocks by index",
        },
        OptionHelp {
            name: "refit",
            values: "true|false",
            default: "false",
            help: "refit the linears of the first block after each gap by least squares, on the dropped model's inputs, to the original model's outputs of each layer; each refit kept only where the end-to-end probe improves (needs --calib; it fits the calibration text, and on SmolLM2 made held-out text of another kind worse)",
        },
    ];

    fn parse(args: &mut Args) -> Result<DropOptions, PassError> {
        let blocks = args.get_with("blocks", |v| {
            if let Some(list) = v.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
                let mut indices = list
                    .split(',')
                    .map(|i| i.trim().parse::<usize>().map_err(|_| format!("`{}` is not a block index", i.trim())))
                    .collect::<Result<Vec<usize>, String>>()?;
                let count = indices.len();
                indices.sort_unstable();
                indices.dedup();
                if indices.len() != count {
                    return Err("a block is listed twice".into());
                }
                return Ok(Blocks::Forced(indices));
            }
            match v.parse::<usize>() {
                Ok(k) if k >= 1 => Ok(Blocks::Count(k)),
                _ => Err("expected a count K >= 1 or a list [i,j,...]".into()),
            }
        })?;
        let blocks = blocks.ok_or_else(|| args.error("give blocks=K or blocks=[i,j,...]"))?;
        if matches!(blocks, Blocks::Count(_)) && !args.calibrated() {
            return Err(args.error("blocks=K measures each removal end to end: pass --calib (or force blocks=[i,j])"));
        }
        let refit = match args.text("refit") {
            None | Some("false") => false,
            Some("true") if !args.calibrated() => {
                return Err(args.error("refit=true fits on calibration inputs: pass --calib"));
            }
            Some("true") => true,
            Some(v) => return Err(args.invalid("refit", v)),
        };
        Ok(DropOptions { blocks, refit })
    }
}

/// One block of the stack.
#[derive(Clone, Debug)]
pub struct Block {
    pub index: usize,
    /// `STEM.I`.
    pub prefix: String,
    /// The stream it reads and the value it writes, or why it cannot be dropped.
    pub ends: Result<(NodeId, NodeId), String>,
    /// Parameters of its weights.
    pub params: u64,
}

/// A dropped block, in the order chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct DroppedBlock {
    pub index: usize,
    pub prefix: String,
    pub params: u64,
    /// The probe's distance of the model once this block was dropped too (with `blocks=K`).
    pub probe: Option<f64>,
}

/// The report of a `drop` call.
#[derive(Clone, Debug, PartialEq)]
pub struct DropReport {
    /// The stack's blocks before the pass.
    pub blocks: usize,
    pub dropped: Vec<DroppedBlock>,
    /// With `blocks=K`, each round's probe distance for every block it tried, by index.
    pub rounds: Vec<Vec<(usize, f64)>>,
    /// The refit of the blocks after the gaps: each layer's, and the probe before and after.
    pub refit: Vec<HealedLayer>,
    pub probe_refit: Option<(f64, f64)>,
    pub notes: Vec<String>,
}

/// The block of a scope: `(stem, index)` for the first dot-separated component that is a
/// number (`blk.3.attn_q` is block 3 of `blk`).
fn block_of(scope: &str) -> Option<(&str, usize)> {
    let mut end = 0;
    for part in scope.split('.') {
        let start = end;
        end = start + part.len() + 1;
        if let Ok(i) = part.parse::<usize>() {
            return (start > 0).then(|| (&scope[..start - 1], i));
        }
    }
    None
}

/// The model's stack: the blocks of the stem with the most of them, by index.
pub fn find_blocks(graph: &Graph) -> Result<Vec<Block>, String> {
    let mut by_stem: BTreeMap<&str, BTreeMap<usize, Vec<NodeId>>> = BTreeMap::new();
    for n in graph.node_ids() {
        if let Some((stem, i)) = block_of(&graph.node(n).scope) {
            by_stem.entry(stem).or_default().entry(i).or_default().push(n);
        }
    }
    let (stem, blocks) = by_stem
        .into_iter()
        .max_by_key(|(stem, b)| (b.len(), std::cmp::Reverse(*stem)))
        .filter(|(_, b)| b.len() >= 2)
        .ok_or("the model has no stack of blocks (scopes STEM.0, STEM.1, ...)")?;
    let outputs: HashSet<NodeId> = graph.outputs().iter().map(|(_, n)| *n).collect();
    Ok(blocks
        .into_iter()
        .map(|(index, nodes)| {
            let inside: HashSet<NodeId> = nodes.iter().copied().collect();
            let read_outside: Vec<NodeId> = nodes
                .iter()
                .copied()
                .filter(|&n| outputs.contains(&n) || graph.users(n).iter().any(|u| !inside.contains(u)))
                .collect();
            let mut reads: Vec<NodeId> =
                nodes.iter().flat_map(|&n| graph.operands(n)).filter(|o| !inside.contains(o)).collect();
            reads.sort();
            reads.dedup();
            let params = nodes
                .iter()
                .filter(|&&n| matches!(graph.node(n).op, Op::Weight(_)))
                .map(|&n| graph.node(n).ty.known_shape().map_or(0, |s| s.iter().product::<u64>()))
                .sum();
            let ends = match read_outside.as_slice() {
                [out] => {
                    let ty = &graph.node(*out).ty;
                    match reads.iter().filter(|&&r| graph.node(r).ty == *ty).collect::<Vec<_>>().as_slice() {
                        [input] => Ok((**input, *out)),
                        [] => Err(format!("it reads no value of its output's type {ty}")),
                        _ => Err(format!("it reads several values of its output's type {ty}")),
                    }
                }
                [] => Err("nothing outside it reads it".to_string()),
                _ => Err(format!("{} of its values are read outside it", read_outside.len())),
            };
            Block { index, prefix: format!("{stem}.{index}"), ends, params }
        })
        .collect())
}

/// Drops `indices` (each a block of `blocks`, found on `graph` as it was) in that order, and
/// removes what nothing reads any more.
fn drop_blocks(
    graph: &mut Graph,
    blocks: &[Block],
    indices: &[usize],
    rounds: Vec<Vec<(usize, f64)>>,
    probes: Option<&[f64]>,
) -> Result<DropReport, String> {
    if indices.len() >= blocks.len() {
        return Err(format!("dropping {} of {} blocks leaves none", indices.len(), blocks.len()));
    }
    let mut dropped = Vec::new();
    // A block's input may be the output of a block dropped before it: it reads what that
    // one read.
    let mut replaced: std::collections::HashMap<NodeId, NodeId> = Default::default();
    for (j, &i) in indices.iter().enumerate() {
        let b = blocks.iter().find(|b| b.index == i).ok_or(format!("there is no block {i}"))?;
        let (mut input, output) =
            b.ends.clone().map_err(|why| format!("block {} cannot be dropped: {why}", b.prefix))?;
        while let Some(&earlier) = replaced.get(&input) {
            input = earlier;
        }
        graph.replace_uses(output, input);
        replaced.insert(output, input);
        dropped.push(DroppedBlock {
            index: i,
            prefix: b.prefix.clone(),
            params: b.params,
            probe: probes.map(|p| p[j]),
        });
    }
    let before = graph.read_tensors();
    graph.remove_dead();
    let read = graph.read_tensors();
    for t in before.difference(&read) {
        graph.store.remove(t);
    }
    Ok(DropReport { blocks: blocks.len(), dropped, rounds, refit: vec![], probe_refit: None, notes: vec![] })
}

/// Blocks each round after the first tries again (at least; twice the count asked for if
/// that is more): the best of the round before. Probes of SmolLM2 took 1.5-3 s each on a
/// busy machine (docs/measurements.md, section 7); every block in every round would be 87
/// probes at `blocks=3` rather than 46.
const FOLLOW: usize = 8;

/// `blocks=K`: K rounds, each dropping the block whose removal the probe measures closest
/// to the original model, given the blocks dropped before.
fn greedy(
    graph: &mut Graph,
    blocks: &[Block],
    k: usize,
    probe: &crate::Probe<'_>,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<DropReport, String> {
    let droppable: Vec<&Block> = blocks.iter().filter(|b| b.ends.is_ok()).collect();
    if k >= blocks.len() {
        return Err(format!("dropping {k} of {} blocks leaves none", blocks.len()));
    }
    if k > droppable.len() {
        let why: Vec<String> =
            blocks.iter().filter_map(|b| b.ends.as_ref().err().map(|why| format!("{} ({why})", b.prefix))).collect();
        return Err(format!("only {} blocks can be dropped; not {}", droppable.len(), why.join(", ")));
    }
    let width = FOLLOW.max(2 * k);
    let total: usize = droppable.len() + (1..k).map(|r| width.min(droppable.len() - r)).sum::<usize>();
    let (mut chosen, mut distances, mut rounds) = (Vec::new(), Vec::new(), Vec::<Vec<(usize, f64)>>::new());
    let mut done = 0;
    for _ in 0..k {
        // The first round tries every block; later ones the best `width` of the round
        // before, in its order.
        let tried: Vec<usize> = match rounds.last() {
            None => droppable.iter().map(|b| b.index).collect(),
            Some(last) => {
                let mut order: Vec<(usize, f64)> = last.iter().copied().filter(|(i, _)| !chosen.contains(i)).collect();
                order.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
                order.into_iter().take(width).map(|(i, _)| i).collect()
            }
        };
        let mut round = Vec::new();
        for b in tried.iter().filter_map(|i| droppable.iter().find(|b| b.index == *i)) {
            progress(done, total, "probing blocks");
            let mut trial = graph.clone();
            let order: Vec<usize> = chosen.iter().copied().chain([b.index]).collect();
            drop_blocks(&mut trial, blocks, &order, vec![], None)?;
            round.push((b.index, probe(&trial)?));
            done += 1;
        }
        let &(best, distance) =
            round.iter().min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0))).expect("a block is left to try");
        chosen.push(best);
        distances.push(distance);
        rounds.push(round);
    }
    progress(total, total, "probing blocks");
    drop_blocks(graph, blocks, &chosen, rounds, Some(&distances))
}

/// Refits the linears of the first block after each gap (see the module documentation).
fn refit_gaps(
    graph: &mut Graph,
    reference: &Graph,
    blocks: &[Block],
    report: &mut DropReport,
    ctx: &Context,
) -> Result<(), PassError> {
    let dropped: HashSet<usize> = report.dropped.iter().map(|b| b.index).collect();
    let mut after: Vec<&Block> = Vec::new();
    for (i, b) in blocks.iter().enumerate() {
        if !dropped.contains(&b.index) && i > 0 && dropped.contains(&blocks[i - 1].index) {
            after.push(b);
        }
    }
    if after.is_empty() {
        report.notes.push("no block follows a gap (only the last blocks were dropped): nothing to refit".into());
        return Ok(());
    }
    // The block's linears on dense weights that they alone read, by input.
    let mut sites: Vec<Site> = Vec::new();
    let mut stored: Vec<(NodeId, TensorData)> = Vec::new();
    for n in graph.topo_order().unwrap_or_default() {
        let inside =
            |scope: &str| after.iter().any(|b| scope == b.prefix || scope.starts_with(&format!("{}.", b.prefix)));
        if !matches!(graph.node(n).op, Op::Linear { .. }) || !inside(&graph.node(n).scope) {
            continue;
        }
        let (input, w) = (graph.operands(n)[0], graph.operands(n)[1]);
        let Op::Weight(weight) = &graph.node(w).op else { continue };
        let Some((name, _)) = graph.layers.iter().find(|(_, l)| l.main() == Some(w) && l.weights.len() == 1) else {
            continue;
        };
        if weight.sparse.is_some() || graph.users(w).len() != 1 {
            continue;
        }
        let name = name.to_string();
        // The linear is the same node in the reference; its input there may not be (a block
        // that reads the stream itself reads, in the reference, the dropped block's output).
        let theirs = reference.operands(n)[0];
        match sites.iter_mut().find(|s| s.input == input && s.reference == theirs) {
            Some(site) => site.layers.push(name),
            None => sites.push(Site { input, reference: theirs, layers: vec![name] }),
        }
        stored.push((
            w,
            graph
                .store
                .get(&weight.tensor)
                .cloned()
                .ok_or_else(|| PassError::not_applicable(PASS, format!("weight `{}` is not bound", weight.tensor)))?,
        ));
    }
    // Healing writes f32 weights: those it does not keep get their stored data back.
    for (w, data) in &stored {
        let values = data.to_f32().map_err(|e| PassError::not_applicable(PASS, e.to_string()))?;
        graph.set_weight(*w, TensorData::from_f32(data.shape.clone(), &values));
    }
    let mut propose = |now: &Graph, site: &Site, paired: &Paired| -> Result<Vec<Proposal>, String> {
        site.layers
            .iter()
            .map(|name| {
                let w = now.layers.get(name).and_then(Layer::main).ok_or_else(|| format!("layer {name}: no weight"))?;
                let (original, n, k) = matrix(reference, w).map_err(|e| format!("layer {name}: {e}"))?;
                let (current, ..) = matrix(now, w).map_err(|e| format!("layer {name}: {e}"))?;
                let columns: Vec<usize> = (0..k).collect();
                let fitted = refit(&original, n, k, &columns, paired, Refit::Reference)?;
                let error = |m: &[f32]| layer_error(&original, m, n, k, paired, Refit::Reference);
                Ok(Proposal {
                    layer: name.clone(),
                    error_before: error(&current),
                    error_after: error(&fitted),
                    weights: vec![(w, fitted)],
                })
            })
            .collect()
    };
    let healed = heal(PASS, graph, Some(reference), &sites, ctx, Weighting::Relative, &mut propose)?;
    let kept: HashSet<&str> = healed.layers.iter().filter(|h| h.kept).map(|h| h.layer.as_str()).collect();
    for (w, data) in stored {
        let name = graph.layers.iter().find(|(_, l)| l.main() == Some(w)).map(|(n, _)| n.to_string());
        if !name.is_some_and(|n| kept.contains(n.as_str())) {
            graph.set_weight(w, data);
        }
    }
    report.notes.push(format!(
        "the refit of the blocks after the gaps ({}) was kept for {} of {} layers: the probe moved from {:.4e} to {:.4e}",
        after.iter().map(|b| b.prefix.as_str()).collect::<Vec<_>>().join(", "),
        kept.len(),
        healed.layers.len(),
        healed.probe_before,
        healed.probe_after
    ));
    report.probe_refit = Some((healed.probe_before, healed.probe_after));
    report.refit = healed.layers;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_name_their_blocks() {
        assert_eq!(block_of("blk.3.attn_q"), Some(("blk", 3)));
        assert_eq!(block_of("blk.12"), Some(("blk", 12)));
        assert_eq!(block_of("encoder.layer.0.attention.self.query"), Some(("encoder.layer", 0)));
        assert_eq!(block_of("embd"), None);
        assert_eq!(block_of("3.x"), None);
        assert_eq!(block_of(""), None);
    }
}
