//! Evaluating a graph: bind the inputs, run every node in topological order with the
//! reference kernels of [`kiln_rt::kernels`], return the named outputs.
//!
//! Linears whose `activations` attribute is `int8` or `int8-row` run
//! [`kernels::linear_int8`] on their weight's stored integers instead: the numbers
//! [`Activations`] states, which the engine's W8A8 kernels compute too. To run a graph with
//! other activations, set them on it first ([`kiln_ir::set_activations`]).

use kiln_ir::{Activations, Graph, NodeId, Op};
use kiln_rt::eval::{RunError, bind_inputs, decode_weights, eval_node, use_counts};
use kiln_rt::kernels::{self, IntWeight};
use kiln_rt::{KvCache, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// What [`Interpreter::run_observed`] shows every computed value to.
pub type Observer<'a> = dyn FnMut(NodeId, &Value) + 'a;

/// What [`Interpreter::run_refitting`] calls at its nodes: new values for weights, by node.
pub type Refitter<'a> = dyn FnMut(NodeId, &Value) -> Result<Vec<(NodeId, Value)>, String> + 'a;

/// Errors of the interpreter are the runtime's.
pub type InterpError = RunError;

/// A graph ready to run: weights decoded to f32 once, shared by every run.
pub struct Interpreter<'g> {
    graph: &'g Graph,
    order: Vec<NodeId>,
    /// Operands of each node of `order`, and how often each value is read.
    operands: Vec<Vec<NodeId>>,
    uses: HashMap<NodeId, usize>,
    weights: HashMap<NodeId, Arc<Value>>,
    /// The linears that take int8 activations: their weight's integers, and whether with
    /// one scale per row (`Activations::Int8Row`) rather than per block of 32.
    int8: HashMap<NodeId, (Arc<IntWeight>, bool)>,
}

impl<'g> Interpreter<'g> {
    /// Decodes every weight of `graph` from its store (in parallel), and the integers of the
    /// weights of linears taking int8 activations (their attribute, see [`Activations`]);
    /// every other op computes in f32.
    pub fn new(graph: &'g Graph) -> Result<Interpreter<'g>, InterpError> {
        let order = graph.topo_order().ok_or(InterpError::Cycle)?;
        let weight_nodes: Vec<NodeId> =
            order.iter().copied().filter(|&n| matches!(graph.node(n).op, Op::Weight(_))).collect();
        let weights = decode_weights(graph, &weight_nodes)?;
        let operands = order.iter().map(|&n| graph.operands(n)).collect();
        let uses = use_counts(graph, &order);
        let mut int8 = HashMap::new();
        let mut by_weight: HashMap<NodeId, Arc<IntWeight>> = HashMap::new();
        for &id in &order {
            let Op::Linear { activations } = graph.node(id).op else { continue };
            let weight = graph.operands(id)[1];
            let Op::Weight(w) = &graph.node(weight).op else { continue };
            let shape = &graph.node(weight).ty.shape;
            let (Some(n), Some(k)) = (shape[0].known(), shape[1].known()) else { continue };
            // The attribute, held to the rule by the verifier (and here for graphs that were
            // not verified: f32 on sparse weights too), as the engine applies it.
            let mode = graph.allowed_activations(id, activations);
            if mode == Activations::F32 {
                continue;
            }
            let int = match by_weight.get(&weight) {
                Some(int) => int.clone(),
                None => {
                    let fail = |message: String| InterpError::Weight { tensor: w.tensor.clone(), message };
                    let data = graph.store.get(&w.tensor).ok_or_else(|| fail("not in the store".into()))?;
                    let int =
                        IntWeight::new(data.format, data.bytes.as_slice(), n as usize, k as usize).map_err(fail)?;
                    by_weight.entry(weight).or_insert(Arc::new(int)).clone()
                }
            };
            int8.insert(id, (int, mode == Activations::Int8Row));
        }
        Ok(Interpreter { graph, order, operands, uses, weights, int8 })
    }

    /// Runs the graph on named inputs; returns every output by name, in declaration order.
    pub fn run(&self, inputs: &HashMap<String, Value>) -> Result<Vec<(String, Value)>, InterpError> {
        self.run_inner(inputs, None, None)
    }

    /// [`Interpreter::run`], showing every value the graph computes to `observe` (node,
    /// value) before it is freed: how calibration gathers activation statistics without
    /// keeping them all.
    pub fn run_observed(
        &self,
        inputs: &HashMap<String, Value>,
        observe: &mut Observer<'_>,
    ) -> Result<Vec<(String, Value)>, InterpError> {
        let mut observe = |id, value: &Value| {
            observe(id, value);
            Ok(Vec::new())
        };
        self.run_inner(inputs, None, Some(&mut observe))
    }

    /// [`Interpreter::run_observed`] where the observer may also replace weights: the
    /// values it returns (weight node, new value of the same type) are what those weights
    /// hold for the rest of the run (in f32: linears taking int8 activations keep the
    /// integers decoded in [`Interpreter::new`], so run this on graphs set to f32
    /// activations). How healing refits layers in execution order, each on the inputs the
    /// refits before it produce.
    pub fn run_refitting(
        &self,
        inputs: &HashMap<String, Value>,
        refit: &mut Refitter<'_>,
    ) -> Result<Vec<(String, Value)>, InterpError> {
        self.run_inner(inputs, None, Some(refit))
    }

    /// Runs the graph over new tokens of the sequences held in `cache` (see
    /// [`kiln_rt::cache`]), and adds them to it.
    pub fn run_cached(
        &self,
        inputs: &HashMap<String, Value>,
        cache: &mut KvCache,
    ) -> Result<Vec<(String, Value)>, InterpError> {
        cache.step(|cache| self.run_inner(inputs, Some(cache), None))
    }

    fn run_inner(
        &self,
        inputs: &HashMap<String, Value>,
        mut cache: Option<&mut KvCache>,
        mut observe: Option<&mut Refitter<'_>>,
    ) -> Result<Vec<(String, Value)>, InterpError> {
        let g = self.graph;
        let symbols = bind_inputs(g, inputs)?;
        // Remaining uses of each value, so intermediates are freed as soon as possible.
        let mut uses = self.uses.clone();
        let mut values: HashMap<NodeId, Arc<Value>> = HashMap::new();
        // Weights an observer replaced before the run reached them.
        let mut replaced: HashMap<NodeId, Arc<Value>> = HashMap::new();
        for (&id, operands) in self.order.iter().zip(&self.operands) {
            let node = g.node(id);
            let value: Arc<Value> = match &node.op {
                Op::Input { name } => Arc::new(inputs[name].clone()),
                Op::Weight(_) => replaced.remove(&id).unwrap_or_else(|| self.weights[&id].clone()),
                op => {
                    let args: Vec<Arc<Value>> = operands.iter().map(|o| values[o].clone()).collect();
                    let value = match self.int8.get(&id) {
                        Some((w, per_row)) => linear_int8(&args, w, *per_row),
                        None => eval_node(id, op, &args, &symbols, cache.as_deref_mut()),
                    };
                    let value = value.map_err(|message| InterpError::Node {
                        op: node.op.name(),
                        scope: node.scope.clone(),
                        message,
                    })?;
                    Arc::new(value)
                }
            };
            if let Some(observe) = observe.as_mut() {
                for (weight, new) in observe(id, &value).map_err(|message| InterpError::Node {
                    op: node.op.name(),
                    scope: node.scope.clone(),
                    message,
                })? {
                    let node = g.node(weight);
                    let fits = matches!(node.op, Op::Weight(_))
                        && new.as_f32().is_some_and(|t| {
                            t.data.len() as u64 == node.ty.shape.iter().filter_map(|d| d.known()).product::<u64>()
                        });
                    if !fits {
                        return Err(InterpError::Node {
                            op: node.op.name(),
                            scope: node.scope.clone(),
                            message: "a refit replaced something other than an f32 weight of its shape".into(),
                        });
                    }
                    let new = Arc::new(new);
                    match values.get_mut(&weight) {
                        Some(v) => *v = new,
                        None => {
                            replaced.insert(weight, new);
                        }
                    }
                }
            }
            for o in operands {
                let left = uses.get_mut(o).expect("counted in new");
                *left -= 1;
                if *left == 0 {
                    values.remove(o);
                }
            }
            values.insert(id, value);
        }
        Ok(g.outputs().iter().map(|(name, id)| (name.clone(), Value::clone(&values[id]))).collect())
    }
}

/// A linear's value with int8 activations: `args` are `x`, the weight, and the bias if any.
fn linear_int8(args: &[Arc<Value>], w: &IntWeight, per_row: bool) -> Result<Value, String> {
    let f = |i: usize| args[i].as_f32().ok_or_else(|| format!("operand {i} must be f32"));
    let bias = if args.len() > 2 { Some(f(2)?) } else { None };
    Ok(Value::F32(kernels::linear_int8(f(0)?, w, bias, per_row)))
}
