//! What every executor needs around the kernels: binding inputs and symbolic dimensions,
//! decoding weights, and evaluating an op with the reference kernels.

use crate::cache::KvCache;
use crate::kernels;
use crate::{Tensor, Value};
use kiln_ir::{DType, Dim, Graph, NodeId, Op, WeightError};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

/// Why a graph could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("missing input `{name}` ({expected})")]
    MissingInput { name: String, expected: String },
    #[error("input `{name}`: {message}")]
    Input { name: String, message: String },
    #[error("weight `{tensor}`: {message}")]
    Weight { tensor: String, message: String },
    #[error("{op} @{scope}: {message}")]
    Node { op: &'static str, scope: String, message: String },
    #[error("the graph has a cycle")]
    Cycle,
}

/// Every value of one run of a graph, by node: what an engine's rerun of a copy of the
/// graph with a few weights changed starts from (`kiln_exec::Engine::rerun`).
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub values: HashMap<NodeId, Arc<Value>>,
    /// How many nodes the run that took it computed (the others came from its base).
    pub computed: usize,
}

/// Sizes of the symbolic dimensions for one run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Symbols(pub HashMap<String, u64>);

impl Symbols {
    /// The size of `d`, if it is known or bound.
    pub fn resolve(&self, d: &Dim) -> Option<usize> {
        d.resolve(&|s| self.0.get(s).copied()).map(|n| n as usize)
    }
}

/// Decodes the given weight nodes to f32 (in parallel), exactly as [`kiln_ir::WeightRef::value`].
pub fn decode_weights(graph: &Graph, nodes: &[NodeId]) -> Result<HashMap<NodeId, Arc<Value>>, RunError> {
    nodes
        .par_iter()
        .map(|&n| {
            let Op::Weight(w) = &graph.node(n).op else { unreachable!("decode_weights takes weight nodes") };
            let fail = |message: String| RunError::Weight { tensor: w.tensor.clone(), message };
            let shape = graph.node(n).ty.known_shape().unwrap_or_default();
            let values = w.value(&graph.store, &shape).map_err(|e| match e {
                WeightError::Missing(_) => {
                    fail("not bound to a checkpoint (pass --weights, or load an artifact)".into())
                }
                e => fail(e.to_string()),
            })?;
            let shape = shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
            Ok((n, Arc::new(Value::F32(Tensor::new(shape, values)))))
        })
        .collect()
}

/// How many times each node's value is read (as an operand or an output), so executors can
/// free a value after its last use.
pub fn use_counts(graph: &Graph, order: &[NodeId]) -> HashMap<NodeId, usize> {
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &n in order {
        for o in graph.operands(n) {
            *uses.entry(o).or_default() += 1;
        }
    }
    for (_, o) in graph.outputs() {
        *uses.entry(*o).or_default() += 1;
    }
    uses
}

/// Checks inputs against their declared types and binds the symbolic dimensions.
pub fn bind_inputs(graph: &Graph, inputs: &HashMap<String, Value>) -> Result<Symbols, RunError> {
    let mut symbols: HashMap<String, u64> = HashMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let Op::Input { name } = &node.op else { unreachable!("inputs() returns input nodes") };
        let fail = |message: String| RunError::Input { name: name.clone(), message };
        let value = inputs
            .get(name)
            .ok_or_else(|| RunError::MissingInput { name: name.clone(), expected: node.ty.to_string() })?;
        if value.dtype() != node.ty.dtype || value.shape().len() != node.ty.rank() {
            return Err(fail(format!("expected {}, got {}{:?}", node.ty, value.dtype(), value.shape())));
        }
        for (axis, (d, &n)) in node.ty.shape.iter().zip(value.shape()).enumerate() {
            match d {
                Dim::Known(k) if *k != n as u64 => {
                    return Err(fail(format!("expected {}, got size {n} on axis {axis}", node.ty)));
                }
                Dim::Sym(s) => match symbols.get(s.as_ref()) {
                    Some(&bound) if bound != n as u64 => {
                        return Err(fail(format!(
                            "`{s}` is {bound} from an earlier input, but this one has {n} on axis {axis}"
                        )));
                    }
                    _ => {
                        symbols.insert(s.to_string(), n as u64);
                    }
                },
                _ => {}
            }
        }
    }
    Ok(Symbols(symbols))
}

/// Evaluates node `id` (not an input or weight) with the reference kernels, continuing the
/// sequence held in `cache` when one is given (see [`crate::cache`]: `rope` starts at the
/// cached position, `attention` attends to the cached keys too). Errors are messages about
/// this node.
pub fn eval_node(
    id: NodeId,
    op: &Op,
    args: &[Arc<Value>],
    symbols: &Symbols,
    cache: Option<&mut KvCache>,
) -> Result<Value, String> {
    let Some(cache) = cache else { return eval_reference(op, args, symbols) };
    match op {
        Op::Attention { causal, scale } => {
            let args: Vec<&Value> = args.iter().map(|a| a.as_ref()).collect();
            Ok(Value::F32(cache.attention(id, &args, *causal, *scale)?))
        }
        Op::Rope { theta, interleaved } => {
            let x = args[0].as_f32().ok_or("operand 0 must be f32")?;
            cache.note_positions(x.shape[1])?;
            Ok(Value::F32(kernels::rope(x, *theta, *interleaved, cache.positions())))
        }
        _ => eval_reference(op, args, symbols),
    }
}

/// `reshape` to `dims` of a value the caller owns: the same buffer under the new shape
/// (executors call it with an operand no one else reads, instead of copying it).
pub fn reshape_owned(value: Value, dims: &[Dim], symbols: &Symbols) -> Result<Value, String> {
    let shape: Vec<usize> = dims
        .iter()
        .map(|d| symbols.resolve(d).ok_or_else(|| format!("dimension `{d}` is not bound")))
        .collect::<Result<_, _>>()?;
    let numel: usize = shape.iter().product();
    if numel != value.shape().iter().product::<usize>() {
        return Err(format!("cannot reshape {:?} to {shape:?}", value.shape()));
    }
    Ok(match value {
        Value::F32(t) => Value::F32(Tensor::new(shape, t.data)),
        Value::I64 { data, .. } => Value::I64 { shape, data },
    })
}

/// Evaluates one op (not an input or weight) with the reference kernels: the f32 meaning
/// of the op as `kiln_ir::op` specifies it. Errors are messages about this node.
pub fn eval_reference(op: &Op, args: &[Arc<Value>], symbols: &Symbols) -> Result<Value, String> {
    let resolve = |d: &Dim| symbols.resolve(d);
    let f =
        |i: usize| -> Result<&Tensor, String> { args[i].as_f32().ok_or_else(|| format!("operand {i} must be f32")) };
    Ok(Value::F32(match op {
        Op::Input { .. } | Op::Weight(_) => unreachable!("bound before evaluation"),
        Op::Const { value } => Tensor::scalar(*value),
        Op::Linear { .. } => kernels::linear(f(0)?, f(1)?, if args.len() > 2 { Some(f(2)?) } else { None }),
        Op::MatMul => kernels::matmul(f(0)?, f(1)?),
        Op::Binary(b) => kernels::binary(*b, f(0)?, f(1)?),
        Op::Unary(u) => kernels::unary(*u, f(0)?),
        Op::Softmax { axis } => kernels::softmax(f(0)?, *axis),
        Op::LayerNorm { eps } => kernels::layer_norm(f(0)?, f(1)?, f(2)?, *eps),
        Op::RmsNorm { eps } => kernels::rms_norm(f(0)?, f(1)?, *eps),
        Op::Rope { theta, interleaved } => kernels::rope(f(0)?, *theta, *interleaved, 0),
        Op::Gather => {
            let Value::I64 { shape, data } = args[1].as_ref() else {
                return Err("ids must be i64".into());
            };
            kernels::gather(f(0)?, data, shape).map_err(|e| e.to_string())?
        }
        Op::Reshape { shape } => return reshape_owned(Value::clone(&args[0]), shape, symbols),
        Op::Transpose { perm } => kernels::transpose(f(0)?, perm),
        Op::Slice { axis, start, end } => {
            let x = f(0)?;
            let len = x.shape[*axis];
            let end = resolve(end).ok_or_else(|| format!("dimension `{end}` is not bound"))?;
            let from = if *start < 0 { len.checked_sub(start.unsigned_abs() as usize) } else { Some(*start as usize) };
            match from {
                Some(from) if from <= end && end <= len => kernels::slice(x, *axis, from, end),
                _ => return Err(format!("slice {start}..{end} does not fit axis {axis} of size {len}")),
            }
        }
        Op::Concat { axis } => {
            let xs = (0..args.len()).map(f).collect::<Result<Vec<_>, _>>()?;
            kernels::concat(&xs, *axis)
        }
        Op::Reduce { op, axes, keepdim } => kernels::reduce(*op, f(0)?, axes, *keepdim),
        Op::Cast { to: DType::F32 } => match args[0].as_ref() {
            Value::F32(t) => t.clone(),
            Value::I64 { shape, data } => Tensor::new(shape.clone(), data.iter().map(|&v| v as f32).collect()),
        },
        Op::Cast { to: DType::I64 } => {
            return Err("casting to i64 is not supported by the interpreter".into());
        }
        Op::Attention { causal, scale } => {
            let mask: Option<Vec<f32>> = args.get(3).map(|m| match m.as_ref() {
                Value::F32(t) => t.data.clone(),
                Value::I64 { data, .. } => data.iter().map(|&v| (v != 0) as u8 as f32).collect(),
            });
            kernels::attention(f(0)?, f(1)?, f(2)?, mask.as_deref(), *causal, *scale)
        }
    }))
}
