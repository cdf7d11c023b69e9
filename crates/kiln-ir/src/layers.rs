//! The logical-layer table: which weight nodes make up each layer of the model, and in
//! which role.
//!
//! # What a layer is
//! A *layer* is one matrix of the model as a user thinks of it (`blk.0.attn_q`, the token
//! embedding) together with the weights that compression passes derive from it. Passes
//! that reason per layer (sensitivity, `--override` patterns, reports) key by the layer's
//! name, not by node ids or tensor names, so a layer keeps its name while passes replace,
//! factor or correct its weights. The table lives on the [`Graph`] (`graph.layers`),
//! prints as `layer` lines in the text form and is checked by the verifier: every entry
//! names a `weight` node of the graph, each layer has exactly one [`Role::Main`] weight
//! (or, factorized, a `lowrank_u` and a `lowrank_v`, or a tensor train's `tt_core`s,
//! instead), and no node has two roles in one layer. One weight node may be read by several nodes
//! (a tied embedding that is also the output head); it is still one layer.
//!
//! # Names
//! A layer is named by its main weight node's scope (`blk.0.attn_q`), or by its tensor
//! name when that scope is empty. Should two weights claim the same name (two matrices in
//! one scope, or an older artifact whose LoRC factors share their layer's scope), the
//! first in the order [`LayerTable::derive`] meets them keeps the name and the others take
//! their tensor names (numbered `name#1`, `name#2` if those are taken too): the simplest rule that keeps names unique and deterministic while
//! leaving every model without such a clash named exactly as before.
//!
//! # Roles
//! - `main`: the matrix a `linear` reads as its weight (operand 1), or that a `gather` or a
//!   `slice` along axis 0 reads by rows (embeddings, position tables).
//! - `correction_a`, `correction_b`: LoRC's factors `A` (`[n, r]`) and `B` (`[r, k]`) of a
//!   quantized main weight `[n, k]`; `A (B x)` is added to the main weight's output.
//! - `lowrank_u`, `lowrank_v`: the factors `U [n, r]` and `V [r, k]` of a factorized
//!   weight `W ~ U V`, read by two linears (`U (V x)`); they replace the main weight, so a
//!   factorized layer has no `main` entry.
//! - `tt_core`, `column_scale`: a tensor train's cores `G_j [r_(j-1), o_j, i_j, r_j]`, in
//!   the order they contract, and an optional scale `s [in]` of the rebuilt weight's
//!   columns; ops on the weight side rebuild `W [out, in]` from them, which the layer's
//!   linears read (`factorize(method=tt)` documents the chain). They replace the main
//!   weight too.
//!
//! A sparse weight has no role of its own: its mask is one of the tensors of its weight
//! node ([`crate::sparse`]), so a pruned layer's main weight is simply a sparse weight.
//! - `shared_base`, `delta_a`, `delta_b`: a tied layer (the `tie` pass). Its linears read
//!   the `shared_base` weight `S [n, k]`, one node that every layer of its group lists
//!   (the one weight node several layers name), instead of a main weight of their own; the
//!   layer's own low-rank delta, `A [n, r]` and `B [r, k]`, adds `A (B x)` to each of its
//!   linears' outputs (the layer's matrix is `S + A B`). A tied layer has no `main` entry
//!   and at most one delta.
//!
//! # Where the table comes from
//! The front end fills it with [`LayerTable::derive`]. Passes that add weights to a layer
//! record them (LoRC's factors); [`Graph::remove_dead`] drops the entries of removed nodes.
//! The IR text carries it; text without any `layer` line (older artifacts, hand-written
//! IR) gets the derived table, so that such text means what it always meant.

use crate::graph::{Graph, NodeId};
use crate::op::Op;
use std::collections::BTreeMap;

/// The part a weight plays in its layer (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Main,
    LowRankU,
    LowRankV,
    CorrectionA,
    CorrectionB,
    SharedBase,
    DeltaA,
    DeltaB,
    TtCore,
    ColumnScale,
}

impl Role {
    pub const ALL: [Role; 10] = [
        Role::Main,
        Role::LowRankU,
        Role::LowRankV,
        Role::CorrectionA,
        Role::CorrectionB,
        Role::SharedBase,
        Role::DeltaA,
        Role::DeltaB,
        Role::TtCore,
        Role::ColumnScale,
    ];

    /// The role's stable name in the text form.
    pub fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::LowRankU => "lowrank_u",
            Role::LowRankV => "lowrank_v",
            Role::CorrectionA => "correction_a",
            Role::CorrectionB => "correction_b",
            Role::SharedBase => "shared_base",
            Role::DeltaA => "delta_a",
            Role::DeltaB => "delta_b",
            Role::TtCore => "tt_core",
            Role::ColumnScale => "column_scale",
        }
    }

    /// The role named `name` in the text form.
    pub fn from_name(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One layer: its weights with their roles, in the order they were recorded (the main
/// weight first when derived).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layer {
    pub weights: Vec<(Role, NodeId)>,
}

impl Layer {
    /// A layer of one main weight.
    pub fn new(main: NodeId) -> Layer {
        Layer { weights: vec![(Role::Main, main)] }
    }

    /// The (first) main weight.
    pub fn main(&self) -> Option<NodeId> {
        self.role(Role::Main).next()
    }

    /// Whether the layer is factorized: no main weight, one `lowrank_u` and one `lowrank_v`.
    pub fn is_factored(&self) -> bool {
        self.main().is_none() && self.role(Role::LowRankU).count() == 1 && self.role(Role::LowRankV).count() == 1
    }

    /// Whether the layer is a tensor train: no main weight, and at least two `tt_core`s.
    pub fn is_train(&self) -> bool {
        self.main().is_none() && self.role(Role::TtCore).count() >= 2
    }

    /// Whether the layer is tied: no main weight, one `shared_base`, and at most one delta
    /// (`delta_a` with `delta_b`).
    pub fn is_tied(&self) -> bool {
        let (a, b) = (self.role(Role::DeltaA).count(), self.role(Role::DeltaB).count());
        self.main().is_none() && self.role(Role::SharedBase).count() == 1 && a == b && a <= 1
    }

    /// The weights in `role`, in recorded order.
    pub fn role(&self, role: Role) -> impl Iterator<Item = NodeId> + '_ {
        self.weights.iter().filter(move |(r, _)| *r == role).map(|&(_, n)| n)
    }
}

/// The layers of a graph by name (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerTable {
    layers: BTreeMap<String, Layer>,
}

impl LayerTable {
    /// The table the graph's structure implies: every rank-2 weight read as a `linear`'s
    /// weight (operand 1), or read by rows by a `gather` (operand 0) or a `slice` on axis 0
    /// (operand 0), is one layer with that weight as its main weight, named by its scope
    /// (its tensor name if the scope is empty; see the module documentation for clashes).
    /// Weights are met in the order of their first such reader in [`Graph::topo_order`].
    pub fn derive(graph: &Graph) -> LayerTable {
        let mut table = LayerTable::default();
        let Some(order) = graph.topo_order() else { return table };
        let mut seen = std::collections::HashSet::new();
        for id in order {
            let operands = graph.operands(id);
            let table_operand = match graph.node(id).op {
                Op::Linear { .. } => operands.get(1),
                Op::Gather | Op::Slice { axis: 0, .. } => operands.first(),
                _ => None,
            };
            let Some(&weight) = table_operand else { continue };
            let node = graph.node(weight);
            let Op::Weight(w) = &node.op else { continue };
            if node.ty.shape.len() != 2 || !seen.insert(weight) {
                continue;
            }
            let name = if node.scope.is_empty() { w.tensor.clone() } else { node.scope.clone() };
            let name = if table.layers.contains_key(&name) { w.tensor.clone() } else { name };
            // A tensor name taken too (a tensor named like another layer's scope): number it.
            let mut unique = name.clone();
            let mut i = 1;
            while table.layers.contains_key(&unique) {
                unique = format!("{name}#{i}");
                i += 1;
            }
            table.layers.insert(unique, Layer::new(weight));
        }
        table
    }

    /// Layers in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Layer)> {
        self.layers.iter().map(|(n, l)| (n.as_str(), l))
    }

    pub fn get(&self, name: &str) -> Option<&Layer> {
        self.layers.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Layer> {
        self.layers.get_mut(name)
    }

    /// Adds or replaces the layer `name`; returns the layer it replaced.
    pub fn insert(&mut self, name: impl Into<String>, layer: Layer) -> Option<Layer> {
        self.layers.insert(name.into(), layer)
    }

    /// Drops every entry naming `id` (a node being removed from the graph), and the layers
    /// this leaves without a main weight.
    pub fn remove_node(&mut self, id: NodeId) {
        for layer in self.layers.values_mut() {
            layer.weights.retain(|&(_, n)| n != id);
        }
        self.layers.retain(|_, l| l.main().is_some() || l.is_factored() || l.is_train() || l.is_tied());
    }

    /// The main weight of layer `name`.
    pub fn main_of(&self, name: &str) -> Option<NodeId> {
        self.layers.get(name).and_then(Layer::main)
    }

    /// The name of the layer whose main weight is `id`.
    pub fn layer_of_main(&self, id: NodeId) -> Option<&str> {
        self.iter().find(|(_, l)| l.main() == Some(id)).map(|(n, _)| n)
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}
