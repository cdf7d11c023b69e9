//! Evaluating a graph: bind the inputs, run every node in topological order with the
//! reference kernels of [`kiln_rt::kernels`], return the named outputs.

use kiln_ir::{DType, Dim, Graph, NodeId, Op};
use kiln_rt::kernels;
use kiln_rt::{Tensor, Value};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum InterpError {
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

/// A graph ready to run: weights decoded to f32 once, shared by every run.
pub struct Interpreter<'g> {
    graph: &'g Graph,
    order: Vec<NodeId>,
    weights: HashMap<NodeId, Arc<Value>>,
}

impl<'g> Interpreter<'g> {
    /// Decodes every weight of `graph` from its store (in parallel).
    pub fn new(graph: &'g Graph) -> Result<Interpreter<'g>, InterpError> {
        let order = graph.topo_order().ok_or(InterpError::Cycle)?;
        let weight_nodes: Vec<_> = order
            .iter()
            .filter_map(|&n| match &graph.node(n).op {
                Op::Weight(w) => Some((n, w)),
                _ => None,
            })
            .collect();
        let weights = weight_nodes
            .par_iter()
            .map(|&(n, w)| {
                let fail = |message: String| InterpError::Weight { tensor: w.tensor.clone(), message };
                let data = graph
                    .store
                    .get(&w.tensor)
                    .ok_or_else(|| fail("not bound to a checkpoint (pass --weights, or load an artifact)".into()))?;
                let values = data.to_f32().map_err(|e| fail(e.to_string()))?;
                let shape = data.shape.iter().map(|&d| d as usize).collect::<Vec<_>>();
                Ok((n, Arc::new(Value::F32(Tensor::new(shape, values)))))
            })
            .collect::<Result<HashMap<_, _>, InterpError>>()?;
        Ok(Interpreter { graph, order, weights })
    }

    /// Runs the graph on named inputs; returns every output by name, in declaration order.
    pub fn run(&self, inputs: &HashMap<String, Value>) -> Result<Vec<(String, Value)>, InterpError> {
        let g = self.graph;
        let symbols = self.bind_inputs(inputs)?;
        let resolve = |d: &Dim| d.resolve(&|s| symbols.get(s).copied()).map(|n| n as usize);
        // Remaining uses of each value, so intermediates are freed as soon as possible.
        let mut uses: HashMap<NodeId, usize> = HashMap::new();
        for &n in &self.order {
            for o in g.operands(n) {
                *uses.entry(o).or_default() += 1;
            }
        }
        for (_, o) in g.outputs() {
            *uses.entry(*o).or_default() += 1;
        }
        let mut values: HashMap<NodeId, Arc<Value>> = HashMap::new();
        for &id in &self.order {
            let node = g.node(id);
            let fail = |message: String| InterpError::Node { op: node.op.name(), scope: node.scope.clone(), message };
            let operands = g.operands(id);
            let args: Vec<Arc<Value>> = operands.iter().map(|o| values[o].clone()).collect();
            let f = |i: usize| -> Result<&Tensor, InterpError> {
                args[i].as_f32().ok_or_else(|| fail(format!("operand {i} must be f32")))
            };
            let value: Arc<Value> = match &node.op {
                Op::Input { name } => Arc::new(inputs[name].clone()),
                Op::Weight(_) => self.weights[&id].clone(),
                op => Arc::new(eval_op(op, &args, &f, &resolve).map_err(fail)?),
            };
            for o in operands {
                let left = uses.get_mut(&o).expect("counted above");
                *left -= 1;
                if *left == 0 {
                    values.remove(&o);
                }
            }
            values.insert(id, value);
        }
        Ok(g.outputs().iter().map(|(name, id)| (name.clone(), Value::clone(&values[id]))).collect())
    }

    /// Checks inputs against their declared types and binds the symbolic dimensions.
    fn bind_inputs(&self, inputs: &HashMap<String, Value>) -> Result<HashMap<String, u64>, InterpError> {
        let mut symbols: HashMap<String, u64> = HashMap::new();
        for id in self.graph.inputs() {
            let node = self.graph.node(id);
            let Op::Input { name } = &node.op else { unreachable!("inputs() returns input nodes") };
            let fail = |message: String| InterpError::Input { name: name.clone(), message };
            let value = inputs
                .get(name)
                .ok_or_else(|| InterpError::MissingInput { name: name.clone(), expected: node.ty.to_string() })?;
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
        Ok(symbols)
    }
}

/// Evaluates one op (not an input or weight) on its operand values.
fn eval_op<'a>(
    op: &Op,
    args: &'a [Arc<Value>],
    f: &dyn Fn(usize) -> Result<&'a Tensor, InterpError>,
    resolve: &dyn Fn(&Dim) -> Option<usize>,
) -> Result<Value, String> {
    let f = |i| f(i).map_err(|e| e.to_string());
    let resolved = |dims: &[Dim]| -> Result<Vec<usize>, String> {
        dims.iter().map(|d| resolve(d).ok_or_else(|| format!("dimension `{d}` is not bound"))).collect()
    };
    Ok(Value::F32(match op {
        Op::Input { .. } | Op::Weight(_) => unreachable!("bound before evaluation"),
        Op::Const { value } => Tensor::scalar(*value),
        Op::Linear => kernels::linear(f(0)?, f(1)?, if args.len() > 2 { Some(f(2)?) } else { None }),
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
        Op::Reshape { shape } => {
            let shape = resolved(shape)?;
            return Ok(match args[0].as_ref() {
                Value::F32(t) => Value::F32(kernels::reshape(t, &shape)),
                Value::I64 { data, .. } => Value::I64 { shape, data: data.clone() },
            });
        }
        Op::Transpose { perm } => kernels::transpose(f(0)?, perm),
        Op::Slice { axis, start, end } => {
            let x = f(0)?;
            let end = resolve(end).ok_or_else(|| format!("dimension `{end}` is not bound"))?;
            if end > x.shape[*axis] {
                return Err(format!("slice end {end} exceeds axis {axis} of size {}", x.shape[*axis]));
            }
            kernels::slice(x, *axis, *start as usize, end)
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
