//! `last_position`: an output `[.., seq, ..]` becomes `[.., 1, ..]`, holding only the last
//! position, and the row-wise ops that produce it run on that position only.
//!
//! For a language model this keeps the output head (vocabulary x hidden, the largest matmul
//! of a small model) off every prompt position but the one whose logits pick the next token.
//!
//! The rewrite walks back from the output through ops that treat every position alike
//! (`linear`, the norms, unary ops, on their first operand), as long as each value has no
//! other user, and inserts `slice(start = -1, end = seq)` before the first of them. Every
//! one of those ops computes a position from that position's row alone, so the result is
//! the original output's last position; executors whose kernels sum a row in an order that
//! does not depend on the other rows (the JIT's) give it bitwise.

use crate::options::{Args, OptionHelp, Options};
use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::{Graph, NodeId, Op};

const PASS: &str = "last_position";

/// The pass as a pipeline names it: `last_position(output=NAME, axis=A)`.
pub struct LastPosition;

/// The options of [`LastPosition`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastPositionOptions {
    /// The output to cut; `None`: the graph's only output.
    pub output: Option<String>,
    pub axis: usize,
}

impl Options for LastPositionOptions {
    const HELP: &'static [OptionHelp] = &[
        OptionHelp {
            name: "output",
            values: "NAME",
            default: "the graph's only output",
            help: "the output to keep at its last position",
        },
        OptionHelp { name: "axis", values: "A", default: "1", help: "the sequence axis of that output" },
    ];

    fn parse(args: &mut Args) -> Result<LastPositionOptions, PassError> {
        Ok(LastPositionOptions {
            output: args.text("output").map(str::to_string),
            axis: args.get("axis")?.unwrap_or(1),
        })
    }
}

impl Pass for LastPosition {
    const NAME: &'static str = "last_position";
    const SUMMARY: &'static str = "compute an output at its last sequence position only, and the row-wise ops before it (final norm, output head) on that position only";
    type Options = LastPositionOptions;

    fn run(graph: &mut Graph, options: &LastPositionOptions, _: &Context) -> Result<PassReport, PassError> {
        let name = match &options.output {
            Some(name) => name.clone(),
            None => match graph.outputs() {
                [(name, _)] => name.clone(),
                outputs => {
                    let names: Vec<&str> = outputs.iter().map(|(n, _)| n.as_str()).collect();
                    return Err(PassError::options(
                        Self::NAME,
                        format!(
                            "the graph has {} outputs ({}): name one with output=NAME",
                            names.len(),
                            names.join(", ")
                        ),
                    ));
                }
            },
        };
        let before = graph.len();
        *graph = last_position(graph, &name, options.axis)?;
        let notes = vec![format!("`{name}` keeps the last position of axis {}", options.axis)];
        Ok(PassReport::Cleanup { pass: Self::NAME, nodes: graph.len().abs_diff(before), notes })
    }
}

/// Rewrites `graph` so output `name` keeps only the last element of `axis`.
pub fn last_position(graph: &Graph, name: &str, axis: usize) -> Result<Graph, PassError> {
    let fail = |message: String| PassError::NotApplicable { pass: PASS, message };
    let mut g = graph.clone();
    let &(_, out) = g.outputs().iter().find(|(n, _)| n == name).ok_or_else(|| fail(format!("no output `{name}`")))?;
    let dim = g.node(out).ty.shape.get(axis).cloned().ok_or_else(|| fail(format!("`{name}` has no axis {axis}")))?;

    // The chain of row-wise nodes ending at the output, last first.
    let uses = |g: &Graph, n: NodeId| g.users(n).len() + g.outputs().iter().filter(|(_, o)| *o == n).count();
    let mut chain = vec![];
    let mut cur = out;
    while row_wise(&g.node(cur).op, axis, g.node(cur).ty.rank()) && g.node(cur).ty.shape.get(axis) == Some(&dim) {
        chain.push(cur);
        let x = g.operands(cur)[0];
        if uses(&g, x) != 1 || g.node(x).ty.shape.get(axis) != Some(&dim) {
            break;
        }
        cur = x;
    }
    if uses(&g, out) != 1 {
        return Err(fail(format!("`{name}` is also used inside the graph")));
    }
    let Some(&first) = chain.last() else {
        // Nothing row-wise to move past: slice the output itself.
        let scope = g.node(out).scope.clone();
        let sliced = g
            .add(Op::Slice { axis, start: -1, end: dim }, &[out], &scope, None)
            .map_err(|source| PassError::Graph { pass: PASS, source })?;
        g.replace_output(name, sliced);
        return Ok(g);
    };
    let frontier = g.operands(first)[0];
    let node = g.node(first);
    let (scope, span) = (node.scope.clone(), node.span);
    let mut x = g
        .add(Op::Slice { axis, start: -1, end: dim }, &[frontier], &scope, span)
        .map_err(|source| PassError::Graph { pass: PASS, source })?;
    for &n in chain.iter().rev() {
        let node = g.node(n).clone();
        let mut operands = g.operands(n);
        operands[0] = x;
        x = g
            .add(node.op, &operands, &node.scope, node.span)
            .map_err(|source| PassError::Graph { pass: PASS, source })?;
    }
    g.replace_output(name, x);
    g.remove_dead();
    Ok(g)
}

/// Whether the op's result at an index of `axis` depends on its first operand at that index
/// only (and on operands without that axis: weights, biases, scales). Linears and norms work
/// along the last axis, so any other axis qualifies.
fn row_wise(op: &Op, axis: usize, rank: usize) -> bool {
    match op {
        Op::Unary(_) => true,
        Op::Linear { .. } | Op::RmsNorm { .. } | Op::LayerNorm { .. } => axis + 1 < rank,
        _ => false,
    }
}
