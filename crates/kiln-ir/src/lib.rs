//! kiln's intermediate representation: a typed dataflow graph of a neural network.
//!
//! # The graph
//! A [`Graph`] is a petgraph `StableGraph` whose nodes are values: an [`Op`], the value's
//! [`Type`], the *scope path* of the layer it belongs to, and the source span it came from.
//! Edges are ordered operands. Graph inputs are `input` nodes; outputs are named
//! references to nodes. Iteration is always in [`Graph::topo_order`], which is
//! deterministic, so printing and passes never depend on hash order.
//!
//! # Values, weights and symbols
//! Every value is `f32` or `i64` with a shape whose dimensions are known sizes or symbols
//! (`batch`, `seq`) bound when the graph runs; a symbol has one value across the graph.
//! Parameters are `weight` nodes: `f32` values of fully known shape whose numbers live in
//! the graph's [`TensorStore`] in some storage [`Format`] (f32, f16, bf16, GGUF blocks,
//! and the formats compression passes introduce), densely or as a [`Sparse`] values and
//! mask pair.
//!
//! # Numeric contract
//! The meaning of a graph is f32 arithmetic as specified op by op in [`op`], where a
//! weight's value is exactly [`WeightRef::value`] of its stored tensors ([`Format::dequantize`]
//! of its bytes, scattered by its mask if it is sparse). The reference
//! interpreter implements that meaning; backends must agree with it up to the order of
//! floating-point reductions.
//!
//! # Layers
//! `graph.layers` ([`LayerTable`]) names the model's logical layers and the weight nodes
//! each is made of, with their [`Role`]s; passes, overrides and reports key by it.
//!
//! # Text form
//! [`text::print`] and [`text::parse`] convert to and from a stable line-per-node text
//! (see the module docs); [`verify::verify`] checks every invariant.

pub mod format;
pub mod graph;
pub mod layers;
pub mod op;
pub mod sparse;
pub mod store;
pub mod text;
pub mod types;
pub mod verify;

pub use format::{BlockScales, Format, FormatError, Fp8Format, IntFormat};
pub use graph::{Graph, GraphError, Node, NodeId, Span, set_activations};
pub use layers::{Layer, LayerTable, Role};
pub use op::{
    Activations, BinaryOp, Op, ReduceOp, TypeError, UnaryOp, UnknownActivations, WeightError, WeightPart, WeightRef,
    broadcast,
};
pub use sparse::{Sparse, SparseError};
pub use store::{Bytes, TensorData, TensorStore};
pub use text::{ParseError, parse, print};
pub use types::{DType, Dim, Shape, Type};
pub use verify::{VerifyError, verify};
