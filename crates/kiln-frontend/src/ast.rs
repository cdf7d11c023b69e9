//! The syntax tree of a model file, as parsed from `grammar/kiln.pest`.

use kiln_ir::{DType, Span};
use std::rc::Rc;

#[derive(Clone, Debug)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug)]
pub struct File {
    pub model: Ident,
    pub items: Vec<Item>,
}

#[derive(Debug)]
pub enum Item {
    Block(Rc<BlockDef>),
    Input { name: Ident, ty: TypeExpr },
    Output { name: Ident, ty: TypeExpr, value: Expr },
    Stmt(Stmt),
}

/// `block Name(a, b = default) { ... }`: a reusable layer, inlined at every call.
#[derive(Debug)]
pub struct BlockDef {
    pub name: Ident,
    pub params: Vec<(Ident, Option<Expr>)>,
    pub body: Vec<Stmt>,
}

#[derive(Debug)]
pub enum Stmt {
    Let(Ident, Expr),
    Assign(Ident, Expr),
    For { var: Ident, start: Expr, end: Expr, body: Vec<Stmt> },
    If { cond: Expr, then: Vec<Stmt>, otherwise: Vec<Stmt> },
    Return(Expr),
}

/// `f32[batch, seq, hidden]`: dimensions are expressions (config values) or new symbols.
#[derive(Debug)]
pub struct TypeExpr {
    pub dtype: DType,
    pub dims: Vec<Expr>,
    pub span: Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
    MatMul,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

#[derive(Debug)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Debug)]
pub enum ExprKind {
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
    Name(String),
    List(Vec<Expr>),
    Index(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
    /// `callee(args, key = value) as "scope"`.
    Call {
        callee: Ident,
        args: Vec<Expr>,
        kwargs: Vec<(Ident, Expr)>,
        scope: Option<(String, Span)>,
    },
    /// `param path[dims]`: a checkpoint tensor named `scope.path`, of the given shape.
    Param {
        path: String,
        dims: Vec<Expr>,
    },
}
