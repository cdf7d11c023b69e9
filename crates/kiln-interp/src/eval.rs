//! Evaluating a graph: bind the inputs, run every node in topological order with the
//! reference kernels of [`kiln_rt::kernels`], return the named outputs.

use kiln_ir::{Graph, NodeId, Op};
use kiln_rt::eval::{RunError, bind_inputs, decode_weights, eval_node, use_counts};
use kiln_rt::{KvCache, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// What [`Interpreter::run_observed`] shows every computed value to.
pub type Observer<'a> = dyn FnMut(NodeId, &Value) + 'a;

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
}

impl<'g> Interpreter<'g> {
    /// Decodes every weight of `graph` from its store (in parallel).
    pub fn new(graph: &'g Graph) -> Result<Interpreter<'g>, InterpError> {
        let order = graph.topo_order().ok_or(InterpError::Cycle)?;
        let weight_nodes: Vec<NodeId> =
            order.iter().copied().filter(|&n| matches!(graph.node(n).op, Op::Weight(_))).collect();
        let weights = decode_weights(graph, &weight_nodes)?;
        let operands = order.iter().map(|&n| graph.operands(n)).collect();
        let uses = use_counts(graph, &order);
        Ok(Interpreter { graph, order, operands, uses, weights })
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
        self.run_inner(inputs, None, Some(observe))
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
        mut observe: Option<&mut Observer<'_>>,
    ) -> Result<Vec<(String, Value)>, InterpError> {
        let g = self.graph;
        let symbols = bind_inputs(g, inputs)?;
        // Remaining uses of each value, so intermediates are freed as soon as possible.
        let mut uses = self.uses.clone();
        let mut values: HashMap<NodeId, Arc<Value>> = HashMap::new();
        for (&id, operands) in self.order.iter().zip(&self.operands) {
            let node = g.node(id);
            let value: Arc<Value> = match &node.op {
                Op::Input { name } => Arc::new(inputs[name].clone()),
                Op::Weight(_) => self.weights[&id].clone(),
                op => {
                    let args: Vec<Arc<Value>> = operands.iter().map(|o| values[o].clone()).collect();
                    let value = eval_node(id, op, &args, &symbols, cache.as_deref_mut()).map_err(|message| {
                        InterpError::Node { op: node.op.name(), scope: node.scope.clone(), message }
                    })?;
                    Arc::new(value)
                }
            };
            if let Some(observe) = observe.as_mut() {
                observe(id, &value);
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
