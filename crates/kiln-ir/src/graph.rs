//! The graph: nodes (op + result type + scope path + source span) on a petgraph
//! `StableGraph`, with ordered operand edges, named outputs and the tensor store.

use crate::format::Format;
use crate::layers::LayerTable;
use crate::op::{Activations, Op, TypeError, WeightRef};
use crate::sparse::{Sparse, SparseError};
use crate::store::{TensorData, TensorStore};
use crate::types::{Dim, Type};
use petgraph::Direction;
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Identifies a node. Indices are stable under removal of other nodes.
pub type NodeId = NodeIndex<u32>;

/// A byte range in the model source a node came from (for diagnostics).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

/// One value of the graph.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    /// The result type; always equal to `op.infer(operand types)` (the verifier checks).
    pub ty: Type,
    /// Dotted path of the layer this node belongs to (`encoder.layer.3.attention.self.query`),
    /// empty at the top level. Passes and user overrides address layers by it.
    pub scope: String,
    pub span: Option<Span>,
}

/// A model as a dataflow graph. Edge weights are operand positions.
#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub name: String,
    graph: StableDiGraph<Node, u32>,
    outputs: Vec<(String, NodeId)>,
    /// The tensors that `weight` nodes refer to.
    pub store: TensorStore,
    /// The logical layers: which weight nodes make up each layer, in which role.
    pub layers: LayerTable,
}

/// Error from building a graph.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum GraphError {
    #[error(transparent)]
    Type(#[from] TypeError),
    #[error("output `{0}` is defined twice")]
    DuplicateOutput(String),
}

impl Graph {
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), ..Graph::default() }
    }

    /// Adds a node whose type is inferred from its operands.
    pub fn add(&mut self, op: Op, operands: &[NodeId], scope: &str, span: Option<Span>) -> Result<NodeId, GraphError> {
        let types: Vec<&Type> = operands.iter().map(|&o| &self.graph[o].ty).collect();
        let ty = op.infer(&types)?;
        Ok(self.add_typed(op, operands, ty, scope, span))
    }

    /// Adds a node with a given type (inputs, weights, and the IR text parser, whose types
    /// the verifier checks afterwards).
    pub fn add_typed(&mut self, op: Op, operands: &[NodeId], ty: Type, scope: &str, span: Option<Span>) -> NodeId {
        let id = self.graph.add_node(Node { op, ty, scope: scope.to_string(), span });
        for (i, &o) in operands.iter().enumerate() {
            self.graph.add_edge(o, id, i as u32);
        }
        id
    }

    /// Stores `data` as tensor `name` and adds a dense `weight` node reading it, of the
    /// tensor's shape and format, with its checksum (how passes add the weights they make).
    pub fn add_weight(&mut self, name: &str, data: TensorData, scope: &str) -> NodeId {
        let op = Op::Weight(WeightRef::dense(name, data.format, Some(data.checksum())));
        let ty = Type::f32(data.shape.iter().map(|&d| Dim::Known(d)));
        self.store.insert(name, data);
        self.add_typed(op, &[], ty, scope, None)
    }

    /// Stores a sparse weight of logical shape `[rows, cols]` and pattern `n:m` (see
    /// [`crate::sparse`]) and adds the `weight` node reading it: `values` (its format any,
    /// its shape `[rows, cols / m * n]`) as tensor `{name}.values` and `mask` (the bits of
    /// [`crate::sparse::pack`]) as `u8[rows, cols / 8]` tensor `{name}.mask`, both with their
    /// checksums (how pruning passes write the weights they sparsify). Errors, storing
    /// nothing, if the pattern cannot hold over rows of `cols` or a tensor has the wrong size.
    #[allow(clippy::too_many_arguments)]
    pub fn add_sparse_weight(
        &mut self,
        name: &str,
        (n, m): (u64, u64),
        rows: u64,
        cols: u64,
        values: TensorData,
        mask: Vec<u8>,
        scope: &str,
    ) -> Result<NodeId, SparseError> {
        Sparse::check(n, m, cols)?;
        let expected = vec![rows, cols / m * n];
        if values.shape != expected {
            let (expected, found) = (expected.iter().product(), values.shape.iter().product());
            return Err(SparseError::Size { what: "values", rows, cols, expected, found });
        }
        if mask.len() as u64 != rows * cols / 8 {
            return Err(SparseError::Size {
                what: "mask",
                rows,
                cols,
                expected: rows * cols / 8,
                found: mask.len() as u64,
            });
        }
        let mask = TensorData {
            format: Format::U8,
            shape: Sparse::mask_shape(rows, cols),
            bytes: crate::store::Bytes::from_vec(mask),
        };
        let (values_name, mask_name) = (format!("{name}.values"), format!("{name}.mask"));
        let sparse = Sparse { n, m, mask: mask_name.clone(), mask_checksum: Some(mask.checksum()) };
        let op = Op::Weight(WeightRef {
            tensor: values_name.clone(),
            format: values.format,
            checksum: Some(values.checksum()),
            sparse: Some(sparse),
        });
        self.store.insert(values_name, values);
        self.store.insert(mask_name, mask);
        Ok(self.add_typed(op, &[], Type::f32([Dim::Known(rows), Dim::Known(cols)]), scope, None))
    }

    /// Stores `data` as dense weight `node`'s tensor (its format and checksum follow);
    /// returns the data it held. `None`, and nothing changed, if `node` is not a dense
    /// weight of `data`'s shape.
    pub fn set_weight(&mut self, node: NodeId, data: TensorData) -> Option<TensorData> {
        let shape = self.graph[node].ty.known_shape()?;
        let Op::Weight(w) = &mut self.graph[node].op else { return None };
        if w.sparse.is_some() || shape != data.shape {
            return None;
        }
        self.replace_tensor(node, data)
    }

    /// Stores `data` as dense weight `node`'s tensor whatever its shape: the node's type
    /// becomes `f32[data.shape]` and its format and checksum follow. Returns the data it held,
    /// `None` (nothing changed) if `node` is not a dense weight. The nodes that read it keep
    /// their old types until [`Graph::retype`]: how structural passes shrink a matrix.
    pub fn resize_weight(&mut self, node: NodeId, data: TensorData) -> Option<TensorData> {
        let Op::Weight(w) = &self.graph[node].op else { return None };
        if w.sparse.is_some() {
            return None;
        }
        self.graph[node].ty = Type::f32(data.shape.iter().map(|&d| Dim::Known(d)));
        self.replace_tensor(node, data)
    }

    /// Infers the type of every node computed from others anew from its operands, in
    /// topological order (inputs, weights and constants keep theirs), after a pass changed
    /// shapes: a resized weight, a reshape's new shape. Errors on the first node whose
    /// operands no longer fit its op, naming it; the graph then holds the types inferred so
    /// far.
    pub fn retype(&mut self) -> Result<(), GraphError> {
        let order = self.topo_order().expect("a graph is acyclic");
        for n in order {
            if matches!(self.graph[n].op, Op::Input { .. } | Op::Weight(_) | Op::Const { .. }) {
                continue;
            }
            let operands = self.operands(n);
            let types: Vec<&Type> = operands.iter().map(|&o| &self.graph[o].ty).collect();
            let ty = self.graph[n].op.infer(&types).map_err(|e| {
                let scope = &self.graph[n].scope;
                TypeError { op: e.op, message: format!("{} (node %{} in `{scope}`)", e.message, n.index()) }
            })?;
            self.graph[n].ty = ty;
        }
        Ok(())
    }

    /// Stores `data` as the values of sparse weight `node` (see [`crate::sparse`]): its
    /// format and checksum follow, its pattern and mask stay. Returns the values it held.
    /// `None`, and nothing changed, if `node` is not a sparse weight whose values have
    /// `data`'s shape (`[rows, cols / m * n]`).
    pub fn set_sparse_values(&mut self, node: NodeId, data: TensorData) -> Option<TensorData> {
        let shape = self.graph[node].ty.known_shape()?;
        let Op::Weight(w) = &mut self.graph[node].op else { return None };
        let (&[rows, cols], Some(s)) = (&shape[..], &w.sparse) else { return None };
        if s.values_shape(rows, cols) != data.shape {
            return None;
        }
        self.replace_tensor(node, data)
    }

    /// Stores `data` as weight `node`'s tensor, checked by the caller to fit: its format and
    /// checksum follow. Returns the data it held.
    fn replace_tensor(&mut self, node: NodeId, data: TensorData) -> Option<TensorData> {
        let Op::Weight(w) = &mut self.graph[node].op else { return None };
        w.format = data.format;
        w.checksum = Some(data.checksum());
        let tensor = w.tensor.clone();
        let old = self.store.get(&tensor).cloned();
        self.store.insert(&tensor, data);
        old
    }

    /// Names of the store tensors some `weight` node reads (every tensor of a sparse one).
    pub fn read_tensors(&self) -> std::collections::BTreeSet<String> {
        self.node_ids()
            .flat_map(|n| match &self.node(n).op {
                Op::Weight(w) => w.tensors().map(String::from).collect(),
                _ => vec![],
            })
            .collect()
    }

    pub fn set_output(&mut self, name: &str, id: NodeId) -> Result<(), GraphError> {
        if self.outputs.iter().any(|(n, _)| n == name) {
            return Err(GraphError::DuplicateOutput(name.to_string()));
        }
        self.outputs.push((name.to_string(), id));
        Ok(())
    }

    /// Makes output `name` (which must exist) the value of `id`.
    pub fn replace_output(&mut self, name: &str, id: NodeId) {
        for (n, o) in &mut self.outputs {
            if n == name {
                *o = id;
            }
        }
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.graph[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.graph[id]
    }

    pub fn contains(&self, id: NodeId) -> bool {
        self.graph.contains_node(id)
    }

    pub fn len(&self) -> usize {
        self.graph.node_count()
    }

    pub fn is_empty(&self) -> bool {
        self.graph.node_count() == 0
    }

    /// Operands of `id`, in operand order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut edges: Vec<(u32, NodeId)> =
            self.graph.edges_directed(id, Direction::Incoming).map(|e| (*e.weight(), e.source())).collect();
        edges.sort_unstable();
        edges.into_iter().map(|(_, n)| n).collect()
    }

    /// Nodes that use `id` as an operand (each once), in index order.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut users: Vec<NodeId> = self.graph.edges_directed(id, Direction::Outgoing).map(|e| e.target()).collect();
        users.sort_unstable();
        users.dedup();
        users
    }

    /// Named outputs, in declaration order.
    pub fn outputs(&self) -> &[(String, NodeId)] {
        &self.outputs
    }

    /// Input nodes in declaration (creation) order.
    pub fn inputs(&self) -> Vec<NodeId> {
        self.graph.node_indices().filter(|&n| matches!(self.graph[n].op, Op::Input { .. })).collect()
    }

    /// All nodes in a deterministic topological order: among ready nodes, the one created
    /// first goes first. Printing, passes and executors all iterate in this order.
    /// Returns `None` if the graph has a cycle.
    pub fn topo_order(&self) -> Option<Vec<NodeId>> {
        let mut indegree: Vec<usize> = vec![0; self.graph.node_bound()];
        for n in self.graph.node_indices() {
            indegree[n.index()] = self.graph.edges_directed(n, Direction::Incoming).count();
        }
        let mut ready: BinaryHeap<Reverse<NodeId>> =
            self.graph.node_indices().filter(|n| indegree[n.index()] == 0).map(Reverse).collect();
        let mut order = Vec::with_capacity(self.graph.node_count());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.graph.edges_directed(n, Direction::Outgoing) {
                let t = e.target();
                indegree[t.index()] -= 1;
                if indegree[t.index()] == 0 {
                    ready.push(Reverse(t));
                }
            }
        }
        (order.len() == self.graph.node_count()).then_some(order)
    }

    /// Makes every user of `old` (and every output naming it) use `new` instead.
    pub fn replace_uses(&mut self, old: NodeId, new: NodeId) {
        self.replace_uses_except(old, new, new);
    }

    /// [`Graph::replace_uses`] but for `except`, which keeps reading `old` (a node that
    /// wraps `old` takes its place everywhere else).
    pub fn replace_uses_except(&mut self, old: NodeId, new: NodeId, except: NodeId) {
        let edges: Vec<_> = self
            .graph
            .edges_directed(old, Direction::Outgoing)
            .filter(|e| e.target() != except)
            .map(|e| (e.id(), e.target(), *e.weight()))
            .collect();
        for (e, target, pos) in edges {
            self.graph.remove_edge(e);
            self.graph.add_edge(new, target, pos);
        }
        for (_, o) in &mut self.outputs {
            if *o == old {
                *o = new;
            }
        }
    }

    /// Removes nodes that no output depends on (inputs are kept: they are the interface),
    /// and their entries in the layer table. Returns how many nodes were removed.
    pub fn remove_dead(&mut self) -> usize {
        let mut live = vec![false; self.graph.node_bound()];
        let mut stack: Vec<NodeId> = self.outputs.iter().map(|(_, n)| *n).collect();
        stack.extend(self.inputs());
        while let Some(n) = stack.pop() {
            if !std::mem::replace(&mut live[n.index()], true) {
                stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        let dead: Vec<NodeId> = self.graph.node_indices().filter(|n| !live[n.index()]).collect();
        for &n in &dead {
            self.graph.remove_node(n);
            self.layers.remove_node(n);
        }
        dead.len()
    }

    /// Node ids in index order (not necessarily topological).
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.graph.node_indices()
    }

    /// The stored weight a `linear` reads: the format of its weight operand and its rows'
    /// length `k`, when that operand is a `weight` node of known shape `[n, k]`; `None` for
    /// a linear on a computed weight (and for any other node).
    pub fn linear_weight(&self, id: NodeId) -> Option<(Format, u64)> {
        if !matches!(self.node(id).op, Op::Linear { .. }) {
            return None;
        }
        let weight = *self.operands(id).get(1)?;
        let Op::Weight(w) = &self.node(weight).op else { return None };
        let k = self.node(weight).ty.shape.get(1)?.known()?;
        Some((w.format, k))
    }

    /// The activations `linear` node `id` is allowed under `mode`: what
    /// [`Activations::for_weight`] gives its stored weight, `F32` on a computed or a sparse
    /// weight (whose kernels, sparse or on its dense value, take f32 activations).
    pub fn allowed_activations(&self, id: NodeId, mode: Activations) -> Activations {
        let sparse =
            self.operands(id).get(1).is_some_and(|&w| matches!(&self.node(w).op, Op::Weight(w) if w.sparse.is_some()));
        match self.linear_weight(id) {
            Some((format, k)) if !sparse => mode.for_weight(format, k),
            _ => Activations::F32,
        }
    }

    /// The activations of the linears, as one mode: `Int8Row` if any linear takes it, else
    /// `Int8` if any does, else `F32` (what reports and `kiln bench` name).
    pub fn activations(&self) -> Activations {
        let mut most = Activations::F32;
        for id in self.node_ids() {
            match self.node(id).op {
                Op::Linear { activations: Activations::Int8Row } => return Activations::Int8Row,
                Op::Linear { activations: Activations::Int8 } => most = Activations::Int8,
                _ => {}
            }
        }
        most
    }
}

/// Sets the activations of every `linear` of `graph` by the rule of [`Op::Linear`]: each
/// takes `mode.for_weight(format, k)` of its stored weight (`F32` on a computed weight),
/// whatever it took before. This is the one way a mode is applied to a graph: the quantize
/// pass's `activations=`, `kiln run --activations`, old artifacts' `kiln.activations`.
/// Returns how many linears take int8 activations afterwards.
pub fn set_activations(graph: &mut Graph, mode: Activations) -> usize {
    let mut int8 = 0;
    for id in graph.node_ids().collect::<Vec<_>>() {
        if !matches!(graph.node(id).op, Op::Linear { .. }) {
            continue;
        }
        let activations = graph.allowed_activations(id, mode);
        int8 += usize::from(activations != Activations::F32);
        graph.node_mut(id).op = Op::Linear { activations };
    }
    int8
}
