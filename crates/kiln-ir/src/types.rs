//! Value types: an element type and a shape whose dimensions may be symbolic.

use std::fmt;
use std::sync::Arc;

/// Element type of a value flowing through the graph.
///
/// Activations are `f32`; token ids and masks enter as `i64`. Storage formats of weights
/// (f16, q4_1, ...) are not value types: see [`crate::Format`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    F32,
    I64,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::I64 => "i64",
        }
    }

    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "f32" => Some(DType::F32),
            "i64" => Some(DType::I64),
            _ => None,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One dimension: a known size or a symbol bound when the graph runs (`batch`, `seq`).
///
/// A symbol has the same value everywhere in a graph: two dimensions named `seq` are equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dim {
    Known(u64),
    Sym(Arc<str>),
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.into())
    }

    pub fn known(self: &Dim) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(_) => None,
        }
    }

    /// The size of this dimension once symbols are bound.
    pub fn resolve(&self, lookup: &dyn Fn(&str) -> Option<u64>) -> Option<u64> {
        match self {
            Dim::Known(n) => Some(*n),
            Dim::Sym(s) => lookup(s),
        }
    }
}

impl From<u64> for Dim {
    fn from(n: u64) -> Dim {
        Dim::Known(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
        }
    }
}

/// A shape, outermost dimension first. The empty shape is a scalar.
pub type Shape = Vec<Dim>;

/// Writes `[a, b, c]`.
pub struct ShapeDisplay<'a>(pub &'a [Dim]);

impl fmt::Display for ShapeDisplay<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")
    }
}

/// The type of a value: element type and shape, printed `f32[batch, seq, 384]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Type {
    pub dtype: DType,
    pub shape: Shape,
}

impl Type {
    /// The shape as sizes, if every dimension is known (a weight's always is: the verifier
    /// checks it); `None` if a dimension is symbolic.
    pub fn known_shape(&self) -> Option<Vec<u64>> {
        self.shape.iter().map(|d| d.known()).collect()
    }

    pub fn new(dtype: DType, shape: impl IntoIterator<Item = Dim>) -> Type {
        Type { dtype, shape: shape.into_iter().collect() }
    }

    pub fn f32(shape: impl IntoIterator<Item = Dim>) -> Type {
        Type::new(DType::F32, shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }
}

impl fmt::Display for Type {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.dtype, ShapeDisplay(&self.shape))
    }
}

/// Element count of a shape as `(product of known dims, sorted symbols)`, so that two
/// shapes with symbolic dimensions can be compared for equal size (used by `reshape`).
pub fn symbolic_numel(shape: &[Dim]) -> (u64, Vec<Arc<str>>) {
    let mut known = 1u64;
    let mut syms = Vec::new();
    for d in shape {
        match d {
            Dim::Known(n) => known = known.saturating_mul(*n),
            Dim::Sym(s) => syms.push(s.clone()),
        }
    }
    syms.sort();
    (known, syms)
}
