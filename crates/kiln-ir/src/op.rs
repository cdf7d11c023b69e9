//! Every operation of the IR: operands, attributes, result type and numeric meaning.
//!
//! This file is the specification. Each variant of [`Op`] documents
//! - **operands**, in order (edges of the graph carry the operand index);
//! - **attributes** (the variant's fields);
//! - **result** type, as computed by [`Op::infer`] below, which is the single source of
//!   truth for shapes (the builder, the parser and the verifier all call it);
//! - **semantics**, in f32 arithmetic. The reference interpreter (`kiln-interp`) implements
//!   exactly this text; a backend may reorder floating-point reductions but nothing else.
//!
//! Conventions:
//! - Shapes are row-major, outermost first. "`[..., d]`" means any number of leading dims.
//! - *Broadcasting* is numpy's: shapes align at the right; two dims are compatible when equal
//!   (a symbol equals only itself) or when one of them is 1.
//! - Axis attributes are non-negative (the front end resolves `-1`).
//!
//! The op set is deliberately small. Layers (`linear` with bias, attention blocks, MLPs)
//! are written in the model language's prelude over these primitives; the backend fuses.
//! Weights are ordinary values, so a compression pass rewrites weights by changing a
//! [`WeightRef`]'s storage format, and factorizations by rewriting the graph (a low-rank
//! `W ~= U V` is two `linear`s, a tensor train a chain of `reshape`/`matmul`); a tied weight
//! is one store entry referenced by several layers.

use crate::format::Format;
use crate::sparse::Sparse;
use crate::types::{DType, Dim, Shape, ShapeDisplay, Type, symbolic_numel};
use std::fmt;

/// A reference from a `weight` node to the tensors of the graph's [`crate::TensorStore`]
/// that hold its value: one tensor for a dense weight; values and a mask for a sparse one.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightRef {
    /// Name of the store entry (the checkpoint tensor name, e.g. `blk.0.attn_q.weight`):
    /// the whole weight, or a sparse weight's values.
    pub tensor: String,
    /// How the entry is stored; its values are `format.dequantize(bytes)`.
    pub format: Format,
    /// FNV-1a hash of the stored bytes, when the graph is bound to a checkpoint.
    pub checksum: Option<u64>,
    /// The sparse layout, if only some values are stored (see [`crate::sparse`]).
    pub sparse: Option<Sparse>,
}

/// One store tensor a weight is made of, with the format and shape it must have.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightPart<'w> {
    /// `"values"` or `"mask"`.
    pub role: &'static str,
    pub tensor: &'w str,
    pub format: Format,
    pub checksum: Option<u64>,
    pub shape: Vec<u64>,
}

/// Why a weight's value could not be read from the store.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightError {
    #[error("tensor `{0}` is not in the store")]
    Missing(String),
    #[error("tensor `{tensor}` is stored as {found} {found_shape:?}, not {format} {shape:?}")]
    Stored { tensor: String, format: Format, shape: Vec<u64>, found: Format, found_shape: Vec<u64> },
    #[error(transparent)]
    Format(#[from] crate::FormatError),
    #[error(transparent)]
    Sparse(#[from] crate::sparse::SparseError),
}

impl WeightRef {
    /// A dense weight: all its values in one tensor.
    pub fn dense(tensor: impl Into<String>, format: Format, checksum: Option<u64>) -> WeightRef {
        WeightRef { tensor: tensor.into(), format, checksum, sparse: None }
    }

    /// The store tensors of a weight of logical `shape`, values first.
    pub fn parts(&self, shape: &[u64]) -> Vec<WeightPart<'_>> {
        let values = |shape| WeightPart {
            role: "values",
            tensor: &self.tensor,
            format: self.format,
            checksum: self.checksum,
            shape,
        };
        match (&self.sparse, shape) {
            (Some(s), &[rows, cols]) => vec![
                values(s.values_shape(rows, cols)),
                WeightPart {
                    role: "mask",
                    tensor: &s.mask,
                    format: Format::U8,
                    checksum: s.mask_checksum,
                    shape: Sparse::mask_shape(rows, cols),
                },
            ],
            _ => vec![values(shape.to_vec())],
        }
    }

    /// The value of a weight of logical `shape`, from `store`: `format.dequantize` of its
    /// tensor, or for a sparse weight [`crate::sparse::densify`] of its dequantized values
    /// and its mask. This function *is* the meaning of a `weight` node.
    pub fn value(&self, store: &crate::TensorStore, shape: &[u64]) -> Result<Vec<f32>, WeightError> {
        let parts = self.parts(shape);
        let mut stored = Vec::with_capacity(parts.len());
        for p in &parts {
            let t = store.get(p.tensor).ok_or_else(|| WeightError::Missing(p.tensor.to_string()))?;
            if t.format != p.format || t.shape != p.shape {
                return Err(WeightError::Stored {
                    tensor: p.tensor.to_string(),
                    format: p.format,
                    shape: p.shape.clone(),
                    found: t.format,
                    found_shape: t.shape.clone(),
                });
            }
            stored.push(t);
        }
        let values = stored[0].to_f32()?;
        match (&self.sparse, shape) {
            (Some(s), &[rows, cols]) => {
                Ok(crate::sparse::densify(s.n, s.m, rows, cols, &values, stored[1].bytes.as_slice())?)
            }
            _ => Ok(values),
        }
    }

    /// Names of the store tensors this weight reads.
    pub fn tensors(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.tensor.as_str()).chain(self.sparse.as_ref().map(|s| s.mask.as_str()))
    }

    /// Bytes of this weight's tensors that `store` holds.
    pub fn stored_bytes(&self, store: &crate::TensorStore) -> u64 {
        self.tensors().filter_map(|t| store.get(t)).map(|t| t.bytes.len() as u64).sum()
    }

    /// The storage as reports name it: the format, and the pattern if sparse
    /// (`int4g32`, `int4g32 2:4`).
    pub fn storage(&self) -> String {
        match &self.sparse {
            Some(s) => format!("{} {s}", self.format),
            None => self.format.name(),
        }
    }
}

/// Elementwise binary operations; both operands broadcast (see module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    /// `a + b`
    Add,
    /// `a - b`
    Sub,
    /// `a * b`
    Mul,
    /// `a / b` (IEEE division; `x / 0` is `±inf`)
    Div,
    /// `max(a, b)`
    Max,
    /// `min(a, b)`
    Min,
    /// `a ^ b` (`powf`)
    Pow,
}

/// Elementwise unary operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    /// `-x`
    Neg,
    /// `e^x`
    Exp,
    /// natural logarithm
    Log,
    /// `sqrt(x)`
    Sqrt,
    /// `1 / sqrt(x)`
    Rsqrt,
    /// `1 / x`
    Recip,
    /// `tanh(x)`
    Tanh,
    /// `1 / (1 + e^-x)`
    Sigmoid,
    /// `max(x, 0)`
    Relu,
    /// `x * sigmoid(x)` (SiLU, "swish")
    Silu,
    /// `0.5 x (1 + erf(x / sqrt 2))`: the exact GELU, not the tanh approximation.
    Gelu,
}

/// Reductions over a set of axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
}

/// An operation. See the module documentation for conventions.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// A graph input, bound by `name` when the graph runs.
    /// - operands: none; result: the declared type (symbols in it are bound from the
    ///   actual input's shape, and must agree across inputs).
    Input { name: String },

    /// A parameter. - operands: none. - result: `f32[shape]`, shape fully known.
    /// - semantics: [`WeightRef::value`]: `weight.format.dequantize(store[weight.tensor])`,
    ///   whose stored shape equals the result shape; or, for a sparse weight (2-D only), the
    ///   dense matrix of its values and mask as [`crate::sparse`] defines.
    Weight(WeightRef),

    /// A scalar constant. - operands: none. - result: `f32[]`.
    Const { value: f32 },

    /// Fully connected layer, PyTorch layout.
    /// - operands: `x: f32[..., in]`, `w: f32[out, in]`, optionally `b: f32[out]`.
    /// - attributes: `activations` (printed `{activations = int8}` or `int8-row`; not
    ///   printed when `f32`, the default).
    /// - result: `f32[..., out]`.
    /// - semantics: with `activations = f32`, `y[..., o] = sum_i x[..., i] * w[o, i] (+ b[o])`.
    ///   With `int8` the linear quantizes each row of `x` to int8 with one scale per block of
    ///   32 values and sums integer products of them with its weight's stored integers
    ///   (W8A8); with `int8-row`, one scale per row and whole rows summed in integers. The
    ///   exact numbers, and how far they are from the f32 value, are [`Activations`]'
    ///   documentation.
    ///
    /// Which weights allow which attribute (the verifier checks it): `int8` needs `w` to be
    /// a `weight` node stored in an integer block format (`q8_0`, `q4_0`, `q4_1`,
    /// `intBgG[a]`); `int8-row` needs `w` stored in symmetric int8 with one group per row
    /// (`int8gK`, `K` = `in`); `f32` is always allowed. Formally, a linear on a `weight` node
    /// of format `F` with rows of `k` values must have `activations ==
    /// activations.for_weight(F, k)` ([`Activations::for_weight`]), and a linear whose
    /// weight is computed by other ops must have `f32`. So an `f32`, `f16`, `bf16` or `fp8`
    /// weight's linear is always `f32`, and `int8-row` on a weight that is not `int8gK` is
    /// an error, not `int8`: [`crate::set_activations`] is what applies a mode to every
    /// linear by this rule.
    Linear { activations: Activations },

    /// Batched matrix product.
    /// - operands: `a: f32[..., m, k]`, `b: f32[..., k, n]`, rank >= 2; leading dims broadcast.
    /// - result: `f32[broadcast(...), m, n]`; `y[.., i, j] = sum_p a[.., i, p] * b[.., p, j]`.
    MatMul,

    /// Elementwise binary op. - operands: `a`, `b` of the same dtype (f32), broadcast.
    /// - result: `f32[broadcast(a, b)]`.
    Binary(BinaryOp),

    /// Elementwise unary op. - operands: `x: f32[s]`. - result: `f32[s]`.
    Unary(UnaryOp),

    /// Softmax along `axis`: `y = exp(x - max) / sum(exp(x - max))`.
    /// - operands: `x: f32[s]`. - result: `f32[s]`.
    Softmax { axis: usize },

    /// Layer normalization over the last axis (biased variance, as PyTorch).
    /// - operands: `x: f32[..., d]`, `gamma: f32[d]`, `beta: f32[d]`. - result: `f32[..., d]`.
    /// - semantics: `(x - mean) / sqrt(var + eps) * gamma + beta`.
    LayerNorm { eps: f32 },

    /// RMS normalization over the last axis.
    /// - operands: `x: f32[..., d]`, `gamma: f32[d]`. - result: `f32[..., d]`.
    /// - semantics: `x / sqrt(mean(x^2) + eps) * gamma`.
    RmsNorm { eps: f32 },

    /// Rotary position embedding.
    /// - operands: `x: f32[b, s, h, d]`, `d` even. - result: `f32[b, s, h, d]`.
    /// - semantics: at position `p` (the index along `s`), for each pair index
    ///   `i < d/2` with angle `p * theta^(-2i/d)`, the pair `(u, v)` becomes
    ///   `(u cos - v sin, u sin + v cos)`. `interleaved`: pairs are `(x[2i], x[2i+1])`
    ///   (GPT-J, llama.cpp's layout for GGUF llama weights); otherwise `(x[i], x[i + d/2])`
    ///   (HF `rotate_half`).
    Rope { theta: f32, interleaved: bool },

    /// Row lookup (embedding).
    /// - operands: `table: f32[n, d]`, `ids: i64[s]`. - result: `f32[s, d]`.
    /// - semantics: `y[s.., :] = table[ids[s..], :]`; an id outside `0..n` is a run-time error.
    Gather,

    /// Same elements, new shape. - operands: `x`. - result: `x.dtype[shape]`; the element
    /// counts must be provably equal (same known product and same multiset of symbols).
    Reshape { shape: Shape },

    /// Axis permutation: result dim `i` is operand dim `perm[i]`.
    /// - operands: `x` of rank `perm.len()`. - result: permuted shape, same dtype.
    Transpose { perm: Vec<usize> },

    /// Elements `start..end` along `axis`. - operands: `x`. - result: `x` with that axis of
    /// size `end - start`. `end` may be a symbol (`slice(pos, 0, seq)`), checked against the
    /// axis size when the graph runs. A negative `start` counts from the end of the axis, as
    /// in Python, and then `end` must be the axis' own size: `start = -1, end = seq` on an
    /// axis of size `seq` keeps its last element (size 1, known even though `seq` is not).
    Slice { axis: usize, start: i64, end: Dim },

    /// Concatenation along `axis`. - operands: one or more values of one dtype whose other
    /// dims agree. - result: that shape with `axis` summed (known sizes only).
    Concat { axis: usize },

    /// Reduction over `axes` (sorted, distinct). - operands: `x: f32`. - result: `x`'s shape
    /// without those axes, or with them set to 1 when `keepdim`.
    Reduce { op: ReduceOp, axes: Vec<usize>, keepdim: bool },

    /// Element type conversion (`i64 -> f32` is exact up to 2^24).
    /// - operands: `x`. - result: `to[x.shape]`.
    Cast { to: DType },

    /// Scaled dot-product attention with grouped key/value heads.
    /// - operands: `q: f32[b, hq, s, d]`, `k: f32[b, hkv, t, d]`, `v: f32[b, hkv, t, e]`,
    ///   optionally `key_mask: [b, t]` (i64 or f32; nonzero = may attend). `hq` must be a
    ///   multiple of `hkv`; query head `h` reads key/value head `h / (hq / hkv)`.
    /// - result: `f32[b, hq, s, e]`.
    /// - semantics: `softmax(scale * q k^T + mask) v` where masked scores are `-inf`:
    ///   keys with `key_mask == 0`, and with `causal`, keys `j > i + (t - s)` for query `i`.
    ///   A query row with every key masked yields zeros.
    Attention { causal: bool, scale: f32 },
}

/// A shape or type error found by [`Op::infer`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{op}: {message}")]
pub struct TypeError {
    pub op: String,
    pub message: String,
}

impl BinaryOp {
    pub const ALL: [BinaryOp; 7] =
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div, BinaryOp::Max, BinaryOp::Min, BinaryOp::Pow];
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Pow => "pow",
        }
    }
}

impl UnaryOp {
    pub const ALL: [UnaryOp; 11] = [
        UnaryOp::Neg,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Sqrt,
        UnaryOp::Rsqrt,
        UnaryOp::Recip,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Silu,
        UnaryOp::Gelu,
    ];
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Recip => "recip",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::Silu => "silu",
            UnaryOp::Gelu => "gelu",
        }
    }
}

impl ReduceOp {
    pub const ALL: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Mean, ReduceOp::Max];
    /// IR text name: `reduce_sum`, `reduce_mean`, `reduce_max`.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "reduce_sum",
            ReduceOp::Mean => "reduce_mean",
            ReduceOp::Max => "reduce_max",
        }
    }
}

impl Op {
    /// The op's name in the IR text.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { .. } => "input",
            Op::Weight(_) => "weight",
            Op::Const { .. } => "const",
            Op::Linear { .. } => "linear",
            Op::MatMul => "matmul",
            Op::Binary(b) => b.name(),
            Op::Unary(u) => u.name(),
            Op::Softmax { .. } => "softmax",
            Op::LayerNorm { .. } => "layer_norm",
            Op::RmsNorm { .. } => "rms_norm",
            Op::Rope { .. } => "rope",
            Op::Gather => "gather",
            Op::Reshape { .. } => "reshape",
            Op::Transpose { .. } => "transpose",
            Op::Slice { .. } => "slice",
            Op::Concat { .. } => "concat",
            Op::Reduce { op, .. } => op.name(),
            Op::Cast { .. } => "cast",
            Op::Attention { .. } => "attention",
        }
    }

    /// Result type from operand types: the shape rules of the specification above.
    /// `Input` and `Weight` carry their type on the node and are not inferred here.
    pub fn infer(&self, operands: &[&Type]) -> Result<Type, TypeError> {
        let err = |message: String| TypeError { op: self.name().to_string(), message };
        let arity = |lo: usize, hi: usize| {
            if operands.len() < lo || operands.len() > hi {
                let want = if lo == hi { format!("{lo}") } else { format!("{lo} to {hi}") };
                Err(err(format!("takes {want} operands, got {}", operands.len())))
            } else {
                Ok(())
            }
        };
        let f32_operand = |i: usize, what: &str| -> Result<&Type, TypeError> {
            let t = operands[i];
            if t.dtype != DType::F32 {
                return Err(err(format!("{what} must be f32, found {t}")));
            }
            Ok(t)
        };
        let rank_at_least = |t: &Type, r: usize, what: &str| {
            if t.rank() < r { Err(err(format!("{what} must have rank >= {r}, found {t}"))) } else { Ok(()) }
        };
        let same_dim = |a: &Dim, b: &Dim, what: &str| {
            if a != b { Err(err(format!("{what} differ: {a} vs {b}"))) } else { Ok(()) }
        };
        match self {
            Op::Input { .. } | Op::Weight(_) => Err(err("inputs and weights carry their declared type".to_string())),
            Op::Const { .. } => {
                arity(0, 0)?;
                Ok(Type::f32([]))
            }
            Op::Linear { .. } => {
                arity(2, 3)?;
                let x = f32_operand(0, "input")?;
                let w = f32_operand(1, "weight")?;
                rank_at_least(x, 1, "input")?;
                if w.rank() != 2 {
                    return Err(err(format!("weight must be [out, in], found {w}")));
                }
                let d_in = &x.shape[x.rank() - 1];
                same_dim(d_in, &w.shape[1], "input width and weight's in dimension")?;
                if operands.len() == 3 {
                    let b = f32_operand(2, "bias")?;
                    if b.shape != [w.shape[0].clone()] {
                        return Err(err(format!("bias must be f32[{}], found {b}", w.shape[0])));
                    }
                }
                let mut shape = x.shape.clone();
                *shape.last_mut().expect("rank >= 1") = w.shape[0].clone();
                Ok(Type::f32(shape))
            }
            Op::MatMul => {
                arity(2, 2)?;
                let (a, b) = (f32_operand(0, "lhs")?, f32_operand(1, "rhs")?);
                rank_at_least(a, 2, "lhs")?;
                rank_at_least(b, 2, "rhs")?;
                let (ra, rb) = (a.rank(), b.rank());
                same_dim(&a.shape[ra - 1], &b.shape[rb - 2], "contracted dimensions")?;
                let mut shape = broadcast(&a.shape[..ra - 2], &b.shape[..rb - 2]).map_err(err)?;
                shape.push(a.shape[ra - 2].clone());
                shape.push(b.shape[rb - 1].clone());
                Ok(Type::f32(shape))
            }
            Op::Binary(_) => {
                arity(2, 2)?;
                let (a, b) = (f32_operand(0, "lhs")?, f32_operand(1, "rhs")?);
                Ok(Type::f32(broadcast(&a.shape, &b.shape).map_err(err)?))
            }
            Op::Unary(_) => {
                arity(1, 1)?;
                Ok(f32_operand(0, "operand")?.clone())
            }
            Op::Softmax { axis } => {
                arity(1, 1)?;
                let x = f32_operand(0, "operand")?;
                check_axis(*axis, x).map_err(err)?;
                Ok(x.clone())
            }
            Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
                let n = if matches!(self, Op::LayerNorm { .. }) { 3 } else { 2 };
                arity(n, n)?;
                let x = f32_operand(0, "input")?;
                rank_at_least(x, 1, "input")?;
                let d = &x.shape[x.rank() - 1];
                for (i, what) in ["gamma", "beta"].iter().enumerate().take(n - 1) {
                    let p = f32_operand(i + 1, what)?;
                    if p.shape != [d.clone()] {
                        return Err(err(format!("{what} must be f32[{d}], found {p}")));
                    }
                }
                Ok(x.clone())
            }
            Op::Rope { .. } => {
                arity(1, 1)?;
                let x = f32_operand(0, "input")?;
                if x.rank() != 4 {
                    return Err(err(format!("input must be [batch, seq, heads, head_dim], found {x}")));
                }
                match x.shape[3].known() {
                    Some(d) if d % 2 == 0 => Ok(x.clone()),
                    _ => Err(err(format!("head_dim must be a known even size, found {x}"))),
                }
            }
            Op::Gather => {
                arity(2, 2)?;
                let table = f32_operand(0, "table")?;
                let ids = operands[1];
                if table.rank() != 2 {
                    return Err(err(format!("table must be [rows, width], found {table}")));
                }
                if ids.dtype != DType::I64 {
                    return Err(err(format!("ids must be i64, found {ids}")));
                }
                let mut shape = ids.shape.clone();
                shape.push(table.shape[1].clone());
                Ok(Type::f32(shape))
            }
            Op::Reshape { shape } => {
                arity(1, 1)?;
                let x = operands[0];
                if symbolic_numel(&x.shape) != symbolic_numel(shape) {
                    return Err(err(format!("cannot reshape {x} to {}: element counts differ", ShapeDisplay(shape))));
                }
                Ok(Type::new(x.dtype, shape.clone()))
            }
            Op::Transpose { perm } => {
                arity(1, 1)?;
                let x = operands[0];
                let mut seen = vec![false; perm.len()];
                let valid = perm.len() == x.rank()
                    && perm.iter().all(|&p| p < perm.len() && !std::mem::replace(&mut seen[p], true));
                if !valid {
                    return Err(err(format!("{perm:?} is not a permutation of the axes of {x}")));
                }
                Ok(Type::new(x.dtype, perm.iter().map(|&p| x.shape[p].clone())))
            }
            Op::Slice { axis, start, end } => {
                arity(1, 1)?;
                let x = operands[0];
                check_axis(*axis, x).map_err(err)?;
                let len = &x.shape[*axis];
                let size = match (u64::try_from(*start), end, len) {
                    (Err(_), _, _) if end == len => Dim::Known(start.unsigned_abs()),
                    (Ok(s), Dim::Known(e), Dim::Known(n)) if s <= *e && *e <= *n => Dim::Known(e - s),
                    (Ok(s), Dim::Known(e), Dim::Sym(_)) if s <= *e => Dim::Known(e - s),
                    (Ok(0), Dim::Sym(_), _) => end.clone(),
                    _ => {
                        return Err(err(format!("range {start}..{end} does not fit axis {axis} of {x}")));
                    }
                };
                let mut shape = x.shape.clone();
                shape[*axis] = size;
                Ok(Type::new(x.dtype, shape))
            }
            Op::Concat { axis } => {
                arity(1, usize::MAX)?;
                let first = operands[0];
                check_axis(*axis, first).map_err(err)?;
                let mut total = 0u64;
                for t in operands {
                    let same_rest = t.dtype == first.dtype
                        && t.rank() == first.rank()
                        && (0..t.rank()).all(|i| i == *axis || t.shape[i] == first.shape[i]);
                    if !same_rest {
                        return Err(err(format!("operands {first} and {t} do not agree off axis {axis}")));
                    }
                    total += t.shape[*axis]
                        .known()
                        .ok_or_else(|| err(format!("axis {axis} of {t} must have a known size")))?;
                }
                let mut shape = first.shape.clone();
                shape[*axis] = Dim::Known(total);
                Ok(Type::new(first.dtype, shape))
            }
            Op::Reduce { axes, keepdim, .. } => {
                arity(1, 1)?;
                let x = f32_operand(0, "operand")?;
                if axes.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(err(format!("axes {axes:?} must be sorted and distinct")));
                }
                for &a in axes {
                    check_axis(a, x).map_err(err)?;
                }
                let shape = x.shape.iter().enumerate().filter_map(|(i, d)| match axes.contains(&i) {
                    false => Some(d.clone()),
                    true if *keepdim => Some(Dim::Known(1)),
                    true => None,
                });
                Ok(Type::f32(shape))
            }
            Op::Cast { to } => {
                arity(1, 1)?;
                Ok(Type::new(*to, operands[0].shape.clone()))
            }
            Op::Attention { .. } => {
                arity(3, 4)?;
                let q = f32_operand(0, "q")?;
                let k = f32_operand(1, "k")?;
                let v = f32_operand(2, "v")?;
                for (t, what) in [(q, "q"), (k, "k"), (v, "v")] {
                    if t.rank() != 4 {
                        return Err(err(format!("{what} must be [batch, heads, seq, head_dim], found {t}")));
                    }
                }
                same_dim(&q.shape[0], &k.shape[0], "batch sizes of q and k")?;
                same_dim(&k.shape[0], &v.shape[0], "batch sizes of k and v")?;
                same_dim(&q.shape[3], &k.shape[3], "head sizes of q and k")?;
                same_dim(&k.shape[1], &v.shape[1], "head counts of k and v")?;
                same_dim(&k.shape[2], &v.shape[2], "sequence lengths of k and v")?;
                match (q.shape[1].known(), k.shape[1].known()) {
                    (Some(hq), Some(hkv)) if hkv > 0 && hq % hkv == 0 => {}
                    _ => {
                        return Err(err(format!(
                            "query heads ({}) must be a known multiple of key/value heads ({})",
                            q.shape[1], k.shape[1]
                        )));
                    }
                }
                if let Some(mask) = operands.get(3)
                    && mask.shape != [k.shape[0].clone(), k.shape[2].clone()]
                {
                    return Err(err(format!("key_mask must be [{}, {}], found {mask}", k.shape[0], k.shape[2])));
                }
                let mut shape = q.shape.clone();
                shape[3] = v.shape[3].clone();
                Ok(Type::f32(shape))
            }
        }
    }
}

fn check_axis(axis: usize, x: &Type) -> Result<(), String> {
    if axis >= x.rank() { Err(format!("axis {axis} is out of range for {x}")) } else { Ok(()) }
}

/// Numpy broadcasting of two shapes.
pub fn broadcast(a: &[Dim], b: &[Dim]) -> Result<Shape, String> {
    let rank = a.len().max(b.len());
    let one = Dim::Known(1);
    let at =
        |s: &[Dim], i: usize| -> Dim { if i + s.len() >= rank { s[i + s.len() - rank].clone() } else { one.clone() } };
    (0..rank)
        .map(|i| {
            let (x, y) = (at(a, i), at(b, i));
            if x == y || y == one {
                Ok(x)
            } else if x == one {
                Ok(y)
            } else {
                Err(format!("shapes {} and {} do not broadcast", ShapeDisplay(a), ShapeDisplay(b)))
            }
        })
        .collect()
}

impl fmt::Display for BinaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for UnaryOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How a `linear` on integer weights treats its input: in f32 (the default) or quantized to
/// int8 with the dot products summed in integers ("W8A8", llama.cpp's numerics class). An
/// attribute of each [`Op::Linear`], so part of the graph's meaning: the engine
/// (`kiln-exec`) runs it on its kernels and the interpreter (`kiln-interp`) on plain loops,
/// with the numbers below. The quantize pass's `activations=` sets it
/// ([`crate::set_activations`]); `kiln run --activations` overrides it the same way before a
/// run. The IR text, those flags and the pass's report name the variants as
/// [`Activations::name`] does: `f32`, `int8`, `int8-row`.
///
/// # Which linears
///
/// Only a `linear` whose weight operand is a `weight` node stored in an integer block
/// format may take int8 activations: GGUF `q8_0`, `q4_0`, `q4_1` or kiln's `intBgG[a]`.
/// Every other linear (weights in f32, f16, bf16 or fp8, or computed by other ops) and
/// every other op keeps f32. `Int8Row` is for weights in symmetric int8 with one group per
/// row (`int8gK`, `K` the row length) only. Setting a mode on a whole graph
/// ([`crate::set_activations`]: the quantize pass, `--activations`) gives each linear
/// [`Activations::for_weight`]: under `Int8Row`, `int8gK` weights take one activation
/// scale per row and other integer weights `Int8`'s blocks. The verifier accepts exactly
/// the attributes this rule gives (see [`Op::Linear`]).
///
/// # Numbers
///
/// **Weights.** Each row `n` of `W: [N, K]` is cut into blocks of 32 along `K`; a block has
/// integers `w[i]` and an f32 scale `dw`, and for asymmetric formats an offset `mw`, both
/// widened exactly from the stored f16, such that the weight's value
/// ([`crate::Format::dequantize`]) is `dw * w[i]` (`+ mw`): `q8_0` `w = q`; `q4_0`
/// `w = nibble - 8`; `q4_1` `w = nibble` with `mw = m`; `intBgG` `w = code - 2^(B-1)`;
/// `intBgGa` `w = code` with `mw = m`. A group of `G` values lends its scales to each of
/// its `G / 32` blocks.
///
/// **Activations.** One scale per block of 32 values of an input row (`Int8`), or per
/// whole row (`Int8Row`):
/// 1. `amax = max |x[i]|`, `d = amax / 127` (f32 division), `id = 1 / d`, or 0 if `d == 0`;
/// 2. `q[i] = round_half_away_from_zero(x[i] * id)` (`x[i] * id` rounded to f32 first), in
///    `[-127, 127]`; a product that is NaN or infinite (a NaN or infinite `x[i]`, or an
///    infinite `id`, which a `d` below `2^-128` gives) makes `q[i] = 0`;
/// 3. if the span holds a NaN, `d = NaN`; for `Int8`, also `s = d * (sum_i q[i] as f32)`
///    (the integer sum is exact).
///
/// **`Int8` output** `(m, n)`: `acc = +0.0`; for each block in order along `K`,
/// `isum = sum_i q[i] * w[i]` exactly in integers (`|isum| <= 32 * 127 * 128 < 2^24`, so
/// `isum as f32` is exact), then `acc = fma(dw * d, isum as f32, acc)` (the product of the
/// scales rounded to f32, then one fused multiply-add), and with an offset
/// `acc = fma(mw, s, acc)`. If any `dw` or `mw` of row `n` is infinite or NaN, `acc` is NaN.
///
/// **`Int8Row` output** (`int8gK` weights, `w = code - 128`, one `dw[n]` per row; `d[m]` the
/// row's activation scale): `isum = sum_k q[m, k] * w[n, k]` exactly in integers over all of
/// `K`, then `acc = (dw[n] * d[m]) * (isum as f32)`, three roundings.
///
/// **Then**, as with f32 activations, `acc + b[n]` when the linear has a bias; the ops after
/// it (activation, residual `add`) compute as usual. The engine fuses those into the
/// kernel with the same operations, except that its `silu` and `gelu` are polynomials
/// (`kiln-jit`'s `math`: silu within a few ulp, gelu within `0.5 |v| * 5e-7` absolute).
///
/// # Interpreter against engine
///
/// Both compute every number above with the same operations in the same order, so the
/// output of each W8A8 linear, with its bias, a `relu` and a residual `add`, is bitwise the
/// same (tested for every integer format, per block and per row, on single rows and on the
/// row counts that take the engine's 256-bit GEMMs). After a fused `silu` or `gelu` they
/// differ by the polynomials' error: within `1e-6` of the output's largest magnitude
/// (`tests/jit.rs`, `the_interpreter_computes_w8a8_linears_bit_for_bit`). Further on in a
/// model that difference is carried along, so whole models agree within a tolerance, not
/// bitwise: on the tiny test model widened to multiples of 32 with every linear on int2 to
/// int8 weights, within `1e-5` of each output's largest magnitude
/// (`the_interpreter_reproduces_w8a8_models_within_the_stated_bound`). A larger difference
/// is possible in principle: where a carried difference moves `x[i] * id` across a rounding
/// boundary of a later quantization, that `q[i]` differs by one and the linear's output by
/// `dw * d * w[i]`, one quantization step.
///
/// Against f32 activations on the same weights: quantizing moves each `x[i]` by at most
/// `d / 2`, so before the bias `acc` is within `sum_b d_b / 2 * sum_{i in b} |dw w[i] + mw|`
/// (plus f32 rounding) of the f32 linear's value, `b` over the blocks (one block of
/// `K` values under `Int8Row`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Activations {
    /// f32 activations against the exactly decoded weights: the graph's meaning.
    #[default]
    F32,
    /// int8 activations with one scale per block of 32 values, for every linear on integer
    /// weights.
    Int8,
    /// As `Int8`, except that linears on int8 weights with one scale per row (`int8gK`)
    /// quantize their input with one scale per row and sum whole rows in integers.
    Int8Row,
}

impl Activations {
    pub const ALL: [Activations; 3] = [Activations::F32, Activations::Int8, Activations::Int8Row];

    /// The name `--activations`, artifacts and reports use: `f32`, `int8`, `int8-row`.
    pub fn name(self) -> &'static str {
        match self {
            Activations::F32 => "f32",
            Activations::Int8 => "int8",
            Activations::Int8Row => "int8-row",
        }
    }

    /// What a `linear` on a `weight` node stored in `format`, with rows of `k` values, takes
    /// under `self` (see "Which linears"): `F32` for a weight that is not in an integer
    /// block format, `Int8Row` only for `int8gK` weights.
    pub fn for_weight(self, format: Format, k: u64) -> Activations {
        match (self, format) {
            (Activations::F32, _) => Activations::F32,
            (Activations::Int8Row, Format::Int(f)) if f.is_int8_per_row(k) => Activations::Int8Row,
            (_, Format::Q8_0 | Format::Q4_0 | Format::Q4_1 | Format::Int(_)) => Activations::Int8,
            _ => Activations::F32,
        }
    }
}

impl fmt::Display for Activations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is not one of [`Activations::name`]'s.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown activations `{0}` (expected f32, int8 or int8-row)")]
pub struct UnknownActivations(pub String);

impl std::str::FromStr for Activations {
    type Err = UnknownActivations;

    /// Exactly the names of [`Activations::name`].
    fn from_str(s: &str) -> Result<Activations, UnknownActivations> {
        Activations::ALL.into_iter().find(|a| a.name() == s).ok_or_else(|| UnknownActivations(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activations_parse_exactly_their_names() {
        for a in Activations::ALL {
            assert_eq!(a.name().parse::<Activations>(), Ok(a));
            assert_eq!(a.to_string(), a.name());
        }
        assert_eq!(Activations::default(), Activations::F32);
        for bad in ["int8-block", "INT8", "int8_row", "", "f16"] {
            let err = bad.parse::<Activations>().unwrap_err();
            assert_eq!(err, UnknownActivations(bad.to_string()));
            assert!(err.to_string().contains("f32, int8 or int8-row"), "{err}");
        }
    }

    #[test]
    fn activations_apply_to_integer_weights_only() {
        let int = |s: &str| Format::Int(s.parse().unwrap());
        use Activations::*;
        for (format, k, f32, int8, int8_row) in [
            (Format::F32, 64, F32, F32, F32),
            (Format::F16, 64, F32, F32, F32),
            (Format::BF16, 64, F32, F32, F32),
            (Format::Fp8(crate::Fp8Format { group: 64 }), 64, F32, F32, F32),
            (Format::Q8_0, 64, F32, Int8, Int8),
            (Format::Q4_0, 64, F32, Int8, Int8),
            (Format::Q4_1, 64, F32, Int8, Int8),
            (int("int4g64a"), 64, F32, Int8, Int8),
            (int("int2g32"), 64, F32, Int8, Int8),
            (int("int8g32"), 64, F32, Int8, Int8),
            (int("int8g64"), 64, F32, Int8, Int8Row),
            (int("int8g64"), 128, F32, Int8, Int8),
        ] {
            assert_eq!(F32.for_weight(format, k), f32, "{format}");
            assert_eq!(Int8.for_weight(format, k), int8, "{format}");
            assert_eq!(Int8Row.for_weight(format, k), int8_row, "{format}, k = {k}");
        }
    }
}
