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
//! Not built yet: refitting the block after each gap (the healing of the next
//! block on the dropped model's activations); the report says so.

use crate::options::{Args, OptionHelp, Options};
use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::{Graph, NodeId, Op};
use std::collections::{BTreeMap, HashSet};

const PASS: &str = "drop";

/// The pass as a pipeline names it: `drop(...)`.
pub struct Drop;

impl Pass for Drop {
    const NAME: &'static str = PASS;
    const SUMMARY: &'static str = "remove whole blocks: blocks=K chosen greedily, each the one whose removal moves the outputs least end to end on held-out calibration rows, or blocks=[i,j] forced";
    type Options = DropOptions;

    fn probes(options: &DropOptions) -> bool {
        matches!(options.blocks, Blocks::Count(_))
    }

    fn run(graph: &mut Graph, options: &DropOptions, ctx: &Context) -> Result<PassReport, PassError> {
        let fail = |message: String| PassError::not_applicable(PASS, message);
        let blocks = find_blocks(graph).map_err(fail)?;
        let report = match &options.blocks {
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
}

impl Options for DropOptions {
    const HELP: &'static [OptionHelp] = &[OptionHelp {
        name: "blocks",
        values: "K|[i,j,...]",
        default: "required",
        help: "K: drop K blocks, each round the one whose removal moves the outputs least on held-out calibration rows (needs --calib); [i,j,...]: drop those blocks by index",
    }];

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
        Ok(DropOptions { blocks })
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
    let notes = vec![
        "the blocks after each gap are not refit yet: the model runs on as it was trained, minus the blocks".into(),
    ];
    Ok(DropReport { blocks: blocks.len(), dropped, rounds, notes })
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
