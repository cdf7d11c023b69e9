//! Elaboration: evaluates a parsed model file and emits the IR graph.
//!
//! Everything static is evaluated here, at compile time: config numbers, lists, string
//! interpolation, `for` loops (unrolled), `if` (on static conditions), and block calls
//! (inlined, with the scope path extended by `as "..."`). Every tensor operation becomes
//! one IR node carrying the current scope path and its source span. `param` expressions
//! become weight nodes, bound to checkpoint tensors and shape-checked when a checkpoint
//! is given; naming the same tensor twice reuses one node (a tied weight).

use crate::ast::*;
use crate::checkpoint::{Checkpoint, CheckpointError};
use crate::diagnostic::Diagnostic;
use kiln_ir::{BinaryOp, DType, Dim, Format, Graph, NodeId, Op, ReduceOp, Span, Type, UnaryOp, WeightRef};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::rc::Rc;
use std::sync::Arc;

type Result<T> = std::result::Result<T, Diagnostic>;

/// A compile-time value.
#[derive(Clone, Debug)]
enum Value {
    None,
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    List(Rc<Vec<Value>>),
    /// A symbolic dimension declared by an input (`batch`, `seq`).
    Sym(Arc<str>),
    Tensor(NodeId),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "none",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Str(_) => "a string",
            Value::List(_) => "a list",
            Value::Sym(_) => "a symbolic dimension",
            Value::Tensor(_) => "a tensor",
        }
    }
    fn number(&self) -> Option<f64> {
        match self {
            Value::Int(i) => Some(*i as f64),
            Value::Float(f) => Some(*f),
            _ => None,
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::None => f.write_str("none"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => f.write_str(s),
            Value::List(l) => {
                let items: Vec<String> = l.iter().map(|v| v.to_string()).collect();
                write!(f, "[{}]", items.join(", "))
            }
            Value::Sym(s) => f.write_str(s),
            Value::Tensor(_) => f.write_str("<tensor>"),
        }
    }
}

/// The result of compiling a model file.
pub struct Compiled {
    pub graph: Graph,
    /// Checkpoint tensors the model does not use (reported, never silently dropped).
    pub unused_tensors: Vec<String>,
}

/// Where code being evaluated comes from: user errors inside prelude blocks are reported
/// at the user's call.
#[derive(Clone)]
enum Origin {
    User,
    /// Inside the prelude, entered from the user's call at this span to this block.
    Prelude(Span, Rc<str>),
}

struct Frame {
    vars: Vec<HashMap<String, Value>>,
    scope: String,
    origin: Origin,
}

impl Frame {
    fn lookup(&self, name: &str) -> Option<&Value> {
        self.vars.iter().rev().find_map(|v| v.get(name))
    }
}

struct Block {
    def: Rc<BlockDef>,
    prelude: bool,
}

struct Elaborator<'a> {
    graph: Graph,
    checkpoint: Option<&'a Checkpoint>,
    blocks: HashMap<String, Block>,
    globals: HashMap<String, Value>,
    params: HashMap<String, NodeId>,
    depth: usize,
}

const MAX_CALL_DEPTH: usize = 64;

/// Compiles a parsed model file (plus the prelude) into a verified IR graph.
pub fn elaborate(file: &File, prelude: &File, checkpoint: Option<&Checkpoint>) -> Result<Compiled> {
    let mut e = Elaborator {
        graph: Graph::new(file.model.name.clone()),
        checkpoint,
        blocks: HashMap::new(),
        globals: HashMap::new(),
        params: HashMap::new(),
        depth: 0,
    };
    for (f, prelude) in [(prelude, true), (file, false)] {
        for item in &f.items {
            if let Item::Block(def) = item {
                if let Some(first) = e.blocks.get(&def.name.name).filter(|b| !prelude && !b.prelude) {
                    return Err(Diagnostic::new(
                        format!("block `{}` is defined twice", def.name.name),
                        def.name.span,
                        "defined again here",
                    )
                    .with_label(first.def.name.span, "first defined here"));
                }
                if !prelude && (BUILTINS.contains(&def.name.name.as_str()) || e.blocks.contains_key(&def.name.name)) {
                    let what = if BUILTINS.contains(&def.name.name.as_str()) { "a builtin" } else { "a prelude block" };
                    return Err(Diagnostic::new(
                        format!("block `{}` would replace {what} of the same name", def.name.name),
                        def.name.span,
                        "choose another name",
                    )
                    .with_help(
                        "the prelude's layers are built on the builtins; redefining either would change them silently",
                    ));
                }
                e.blocks.insert(def.name.name.clone(), Block { def: def.clone(), prelude });
            }
        }
    }
    let mut top = Frame { vars: vec![HashMap::new()], scope: String::new(), origin: Origin::User };
    let mut outputs = 0;
    for item in &file.items {
        match item {
            Item::Block(_) => {}
            Item::Input { name, ty } => e.input(&mut top, name, ty)?,
            Item::Output { name, ty, value } => {
                e.output(&mut top, name, ty, value)?;
                outputs += 1;
            }
            Item::Stmt(s) => {
                if let Some(v) = e.stmts(&mut top, std::slice::from_ref(s))? {
                    let _ = v;
                    let span = match s {
                        Stmt::Return(x) => x.span,
                        _ => file.model.span,
                    };
                    return Err(Diagnostic::new("`return` outside a block", span, "here")
                        .with_help("a model's results are declared with `output name: type = value`"));
                }
                // Top-level `let`s are globals, visible inside blocks.
                for (k, v) in &top.vars[0] {
                    e.globals.insert(k.clone(), v.clone());
                }
            }
        }
    }
    if outputs == 0 {
        return Err(Diagnostic::new("the model declares no outputs", file.model.span, "this model")
            .with_help("add `output name: f32[...] = expression`"));
    }
    e.graph.remove_dead();
    e.graph.layers = kiln_ir::LayerTable::derive(&e.graph);
    if let Err(err) = kiln_ir::verify(&e.graph) {
        return Err(Diagnostic::new(
            format!("internal compiler error: {err}"),
            file.model.span,
            "while compiling this model",
        ));
    }
    let unused_tensors = match checkpoint {
        Some(ck) => {
            ck.tensors.iter().map(|(n, _)| n).filter(|n| e.graph.store.get(n).is_none()).map(String::from).collect()
        }
        None => vec![],
    };
    Ok(Compiled { graph: e.graph, unused_tensors })
}

/// An error that arose at `span` in `frame`; inside the prelude it is reported at the
/// user's call instead.
fn diag(frame: &Frame, message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
    match &frame.origin {
        Origin::User => Diagnostic::new(message, span, label),
        // The label would describe prelude code the user does not see.
        Origin::Prelude(call, block) => {
            Diagnostic::new(message, *call, format!("in this call of the prelude's `{block}`"))
        }
    }
}

fn join(scope: &str, path: &str) -> String {
    match (scope.is_empty(), path.is_empty()) {
        (true, _) => path.to_string(),
        (_, true) => scope.to_string(),
        _ => format!("{scope}.{path}"),
    }
}

impl Elaborator<'_> {
    fn error(&self, frame: &Frame, message: impl Into<String>, span: Span, label: impl Into<String>) -> Diagnostic {
        diag(frame, message, span, label)
    }

    fn input(&mut self, frame: &mut Frame, name: &Ident, ty: &TypeExpr) -> Result<()> {
        if frame.lookup(&name.name).is_some() || self.globals.contains_key(&name.name) {
            return Err(Diagnostic::new(format!("`{}` is already defined", name.name), name.span, "redefined here"));
        }
        let mut dims = Vec::new();
        for d in &ty.dims {
            match &d.kind {
                ExprKind::Name(n) if frame.lookup(n).is_none() && !self.globals.contains_key(n) => {
                    let sym: Arc<str> = n.as_str().into();
                    self.globals.insert(n.clone(), Value::Sym(sym.clone()));
                    frame.vars[0].insert(n.clone(), Value::Sym(sym.clone()));
                    dims.push(Dim::Sym(sym));
                }
                _ => dims.push(self.dim(frame, d)?),
            }
        }
        let id = self.graph.add_typed(
            Op::Input { name: name.name.clone() },
            &[],
            Type::new(ty.dtype, dims),
            "",
            Some(name.span),
        );
        frame.vars[0].insert(name.name.clone(), Value::Tensor(id));
        self.globals.insert(name.name.clone(), Value::Tensor(id));
        Ok(())
    }

    fn output(&mut self, frame: &mut Frame, name: &Ident, ty: &TypeExpr, value: &Expr) -> Result<()> {
        let v = self.expr(frame, value)?;
        let Value::Tensor(id) = v else {
            return Err(Diagnostic::new(
                format!("an output must be a tensor, found {}", v.kind()),
                value.span,
                "this value",
            ));
        };
        let dims = ty.dims.iter().map(|d| self.dim(frame, d)).collect::<Result<Vec<_>>>()?;
        let declared = Type::new(ty.dtype, dims);
        let actual = &self.graph.node(id).ty;
        if *actual != declared {
            return Err(Diagnostic::new(
                format!("output `{}` is declared {declared} but the model computes {actual}", name.name),
                value.span,
                format!("this is {actual}"),
            ));
        }
        self.graph.set_output(&name.name, id).map_err(|e| Diagnostic::new(e.to_string(), name.span, "here"))
    }

    fn stmts(&mut self, frame: &mut Frame, stmts: &[Stmt]) -> Result<Option<Value>> {
        for s in stmts {
            match s {
                Stmt::Let(name, x) => {
                    let v = self.expr(frame, x)?;
                    frame.vars.last_mut().expect("a frame has a scope").insert(name.name.clone(), v);
                }
                Stmt::Assign(name, x) => {
                    let v = self.expr(frame, x)?;
                    match frame.vars.iter_mut().rev().find(|vars| vars.contains_key(&name.name)) {
                        Some(vars) => {
                            vars.insert(name.name.clone(), v);
                        }
                        None => {
                            return Err(self
                                .error(frame, format!("`{}` is not defined", name.name), name.span, "assigned here")
                                .with_help(format!("declare it first: `let {} = ...`", name.name)));
                        }
                    }
                }
                Stmt::For { var, start, end, body } => {
                    let lo = self.int(frame, start)?;
                    let hi = self.int(frame, end)?;
                    for i in lo..hi {
                        frame.vars.push(HashMap::from([(var.name.clone(), Value::Int(i))]));
                        let r = self.stmts(frame, body);
                        frame.vars.pop();
                        if let Some(v) = r? {
                            return Ok(Some(v));
                        }
                    }
                }
                Stmt::If { cond, then, otherwise } => {
                    let branch = match self.expr(frame, cond)? {
                        Value::Bool(b) => b,
                        v => {
                            return Err(self
                                .error(
                                    frame,
                                    format!("a condition must be a boolean, found {}", v.kind()),
                                    cond.span,
                                    "this condition",
                                )
                                .with_help("`if` is decided at compile time on `true` or `false`: compare the value, e.g. `n > 0`"));
                        }
                    };
                    frame.vars.push(HashMap::new());
                    let r = self.stmts(frame, if branch { then } else { otherwise });
                    frame.vars.pop();
                    if let Some(v) = r? {
                        return Ok(Some(v));
                    }
                }
                Stmt::Return(x) => return Ok(Some(self.expr(frame, x)?)),
            }
        }
        Ok(None)
    }

    fn int(&mut self, frame: &mut Frame, x: &Expr) -> Result<i64> {
        match self.expr(frame, x)? {
            Value::Int(i) => Ok(i),
            v => Err(self.error(frame, format!("expected an integer, found {}", v.kind()), x.span, "this value")),
        }
    }

    /// A dimension: a non-negative integer or a symbol.
    fn dim(&mut self, frame: &mut Frame, x: &Expr) -> Result<Dim> {
        let v = self.expr(frame, x)?;
        self.to_dim(frame, &v, x.span)
    }

    fn to_dim(&self, frame: &Frame, v: &Value, span: Span) -> Result<Dim> {
        match v {
            Value::Int(i) if *i >= 0 => Ok(Dim::Known(*i as u64)),
            Value::Sym(s) => Ok(Dim::Sym(s.clone())),
            v => Err(self.error(
                frame,
                format!("expected a dimension (a non-negative integer or a symbol), found {v}"),
                span,
                "this value",
            )),
        }
    }

    fn lookup(&self, frame: &Frame, name: &str) -> Option<Value> {
        frame.lookup(name).or_else(|| self.globals.get(name)).cloned()
    }

    fn interpolate(&self, frame: &Frame, s: &str, span: Span) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                return Err(self.error(frame, "unclosed `{` in string", span, "in this string"));
            };
            let name = rest[open + 1..open + close].trim();
            match self.lookup(frame, name) {
                Some(v @ (Value::Int(_) | Value::Str(_) | Value::Float(_) | Value::Bool(_))) => {
                    out.push_str(&v.to_string())
                }
                Some(v) => {
                    return Err(self.error(
                        frame,
                        format!("cannot put {} `{name}` into a string", v.kind()),
                        span,
                        "in this string",
                    ));
                }
                None => {
                    return Err(self.error(frame, format!("unknown name `{name}` in string"), span, "in this string"));
                }
            }
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    fn expr(&mut self, frame: &mut Frame, x: &Expr) -> Result<Value> {
        match &x.kind {
            ExprKind::Int(i) => Ok(Value::Int(*i)),
            ExprKind::Float(f) => Ok(Value::Float(*f)),
            ExprKind::Bool(b) => Ok(Value::Bool(*b)),
            ExprKind::Str(s) => Ok(Value::Str(self.interpolate(frame, s, x.span)?)),
            ExprKind::Name(n) => self.lookup(frame, n).ok_or_else(|| {
                let mut d = self.error(frame, format!("unknown name `{n}`"), x.span, "not defined");
                if self.blocks.contains_key(n) || BUILTINS.contains(&n.as_str()) {
                    d = d.with_help(format!("`{n}` is a block or builtin; call it: `{n}(...)`"));
                } else {
                    let names = frame.vars.iter().flat_map(|v| v.keys()).chain(self.globals.keys());
                    if let Some(similar) = closest(n, names.map(String::as_str)) {
                        d = d.with_help(format!("did you mean `{similar}`?"));
                    }
                }
                d
            }),
            ExprKind::List(items) => {
                let vs = items.iter().map(|i| self.expr(frame, i)).collect::<Result<Vec<_>>>()?;
                Ok(Value::List(Rc::new(vs)))
            }
            ExprKind::Index(list, index) => {
                let l = self.expr(frame, list)?;
                let i = self.int(frame, index)?;
                match l {
                    Value::List(items) => {
                        let len = items.len() as i64;
                        let at = if i < 0 { i + len } else { i };
                        if at < 0 || at >= len {
                            return Err(self.error(
                                frame,
                                format!("index {i} is out of range for a list of length {len}"),
                                index.span,
                                "this index",
                            ));
                        }
                        Ok(items[at as usize].clone())
                    }
                    v => Err(self.error(
                        frame,
                        format!("only lists can be indexed, found {}", v.kind()),
                        list.span,
                        "this value",
                    )),
                }
            }
            ExprKind::Neg(inner) => match self.expr(frame, inner)? {
                Value::Int(i) => Ok(Value::Int(-i)),
                Value::Float(f) => Ok(Value::Float(-f)),
                Value::Tensor(t) => self.emit(frame, Op::Unary(UnaryOp::Neg), &[t], x.span, None),
                v => Err(self.error(frame, format!("cannot negate {}", v.kind()), x.span, "here")),
            },
            ExprKind::Binary(op, a, b) => {
                let (va, vb) = (self.expr(frame, a)?, self.expr(frame, b)?);
                self.binary(frame, *op, va, vb, x.span)
            }
            ExprKind::Param { path, dims } => self.param(frame, path, dims, x.span),
            ExprKind::Call { callee, args, kwargs, scope } => {
                self.call(frame, callee, args, kwargs, scope.as_ref(), x.span)
            }
        }
    }

    fn binary(&mut self, frame: &mut Frame, op: BinOp, a: Value, b: Value, span: Span) -> Result<Value> {
        use Value::*;
        let mismatch = |this: &Self, frame: &Frame| {
            this.error(
                frame,
                format!("cannot apply `{}` to {} and {}", binop_symbol(op), a.kind(), b.kind()),
                span,
                "here",
            )
        };
        match (&a, &b) {
            (Int(x), Int(y)) => Ok(match op {
                BinOp::Add => Int(x + y),
                BinOp::Sub => Int(x - y),
                BinOp::Mul => Int(x * y),
                BinOp::Div if *y != 0 && x % y == 0 => Int(x / y),
                BinOp::Div => Float(*x as f64 / *y as f64),
                BinOp::MatMul => return Err(mismatch(self, frame)),
                cmp => Bool(compare(cmp, *x as f64, *y as f64)),
            }),
            (Int(_) | Float(_), Int(_) | Float(_)) => {
                let (x, y) = (a.number().unwrap_or_default(), b.number().unwrap_or_default());
                Ok(match op {
                    BinOp::Add => Float(x + y),
                    BinOp::Sub => Float(x - y),
                    BinOp::Mul => Float(x * y),
                    BinOp::Div => Float(x / y),
                    BinOp::MatMul => return Err(mismatch(self, frame)),
                    cmp => Bool(compare(cmp, x, y)),
                })
            }
            (Str(x), Str(y)) if op == BinOp::Eq || op == BinOp::Ne => Ok(Bool((x == y) == (op == BinOp::Eq))),
            (Bool(x), Bool(y)) if op == BinOp::Eq || op == BinOp::Ne => Ok(Bool((x == y) == (op == BinOp::Eq))),
            (Tensor(_), _) | (_, Tensor(_)) => {
                let ir = match op {
                    BinOp::Add => Op::Binary(BinaryOp::Add),
                    BinOp::Sub => Op::Binary(BinaryOp::Sub),
                    BinOp::Mul => Op::Binary(BinaryOp::Mul),
                    BinOp::Div => Op::Binary(BinaryOp::Div),
                    BinOp::MatMul => Op::MatMul,
                    _ => return Err(mismatch(self, frame)),
                };
                let x = self.tensor(frame, &a, span)?;
                let y = self.tensor(frame, &b, span)?;
                self.emit(frame, ir, &[x, y], span, Option::None)
            }
            _ => Err(mismatch(self, frame)),
        }
    }

    /// A tensor operand: tensors as they are, numbers as scalar constants.
    fn tensor(&mut self, frame: &Frame, v: &Value, span: Span) -> Result<NodeId> {
        match v {
            Value::Tensor(t) => Ok(*t),
            Value::Int(_) | Value::Float(_) => {
                let value = v.number().unwrap_or_default() as f32;
                match self.emit(frame, Op::Const { value }, &[], span, None)? {
                    Value::Tensor(t) => Ok(t),
                    _ => unreachable!("emit returns tensors"),
                }
            }
            v => Err(self.error(frame, format!("expected a tensor, found {}", v.kind()), span, "this value")),
        }
    }

    fn emit(&mut self, frame: &Frame, op: Op, operands: &[NodeId], span: Span, scope: Option<&str>) -> Result<Value> {
        let scope = scope.map_or_else(|| frame.scope.clone(), |s| join(&frame.scope, s));
        let name = op.name();
        self.graph.add(op, operands, &scope, Some(span)).map(Value::Tensor).map_err(|e| {
            let types: Vec<String> = operands.iter().map(|&o| self.graph.node(o).ty.to_string()).collect();
            let help = match types.len() {
                1 => format!("the operand is {}", types[0]),
                _ => format!("the operands are {}", and_list(&types)),
            };
            self.error(frame, format!("shape error in `{name}`: {}", err_message(&e)), span, "in this operation")
                .with_help(help)
        })
    }

    fn param(&mut self, frame: &mut Frame, path: &str, dims: &[Expr], span: Span) -> Result<Value> {
        let name = join(&frame.scope, &self.interpolate(frame, path, span)?);
        let mut shape = Vec::new();
        for d in dims {
            match self.dim(frame, d)? {
                Dim::Known(n) => shape.push(n),
                Dim::Sym(s) => {
                    return Err(self
                        .error(
                            frame,
                            format!("a parameter's shape must be known, but `{s}` is symbolic"),
                            d.span,
                            "this dimension",
                        )
                        .with_help(format!("declare a fixed (maximum) size and `slice` the parameter to `{s}`")));
                }
            }
        }
        let ty = Type::f32(shape.iter().map(|&n| Dim::Known(n)));
        if let Some(&id) = self.params.get(&name) {
            let existing = &self.graph.node(id).ty;
            if *existing != ty {
                return Err(self.error(
                    frame,
                    format!("parameter `{name}` is used as {existing} elsewhere and as {ty} here"),
                    span,
                    "conflicting shape",
                ));
            }
            return Ok(Value::Tensor(id));
        }
        let mut weight = WeightRef::dense(name.clone(), Format::F32, None);
        if let Some(ck) = self.checkpoint {
            let data = ck.require(&name).map_err(|e| match e {
                CheckpointError::MissingTensor { path, name, nearest } => {
                    let file = path.file_name().map_or(path.to_string_lossy(), |f| f.to_string_lossy());
                    let d = self.error(
                        frame,
                        format!("checkpoint `{file}` has no tensor named `{name}`"),
                        span,
                        "this parameter",
                    );
                    match nearest.is_empty() {
                        true => d,
                        false => {
                            let names: Vec<String> = nearest.iter().map(|n| format!("`{n}`")).collect();
                            d.with_help(format!("did you mean {}?", names.join(" or ")))
                        }
                    }
                }
                e => self.error(frame, e.to_string(), span, "this parameter"),
            })?;
            if data.shape != shape {
                return Err(self.error(
                    frame,
                    format!(
                        "parameter `{name}` is declared {:?} but the checkpoint {} has {:?}",
                        shape,
                        ck.path
                            .file_name()
                            .map_or_else(|| ck.path.display().to_string(), |f| f.to_string_lossy().into_owned()),
                        data.shape
                    ),
                    span,
                    format!("declared {:?}", shape),
                ));
            }
            weight.format = data.format;
            weight.checksum = Some(data.checksum());
            self.graph.store.insert(name.clone(), data.clone());
        }
        let scope = frame.scope.clone();
        let id = self.graph.add_typed(Op::Weight(weight), &[], ty, &scope, Some(span));
        self.params.insert(name, id);
        Ok(Value::Tensor(id))
    }

    fn call(
        &mut self,
        frame: &mut Frame,
        callee: &Ident,
        args: &[Expr],
        kwargs: &[(Ident, Expr)],
        scope: Option<&(String, Span)>,
        span: Span,
    ) -> Result<Value> {
        let scope = match scope {
            Some((s, sp)) => Some(self.interpolate(frame, s, *sp)?),
            None => None,
        };
        let mut positional = Vec::new();
        for a in args {
            positional.push((self.expr(frame, a)?, a.span));
        }
        let mut named = Vec::new();
        for (k, v) in kwargs {
            if named.iter().any(|(n, _, _): &(String, Value, Span)| *n == k.name) {
                return Err(self.error(frame, format!("argument `{}` is given twice", k.name), k.span, "repeated"));
            }
            named.push((k.name.clone(), self.expr(frame, v)?, k.span));
        }
        if let Some(block) = self.blocks.get(&callee.name) {
            let (def, prelude) = (block.def.clone(), block.prelude);
            return self.call_block(frame, &def, prelude, positional, named, scope, span);
        }
        let spec = builtin_spec(&callee.name).ok_or_else(|| {
            let mut known: Vec<&str> = self.blocks.keys().map(String::as_str).chain(BUILTINS.iter().copied()).collect();
            known.sort();
            let similar = match closest(&callee.name, known.iter().copied()) {
                Some(s) => format!("did you mean `{s}`? "),
                None => String::new(),
            };
            self.error(frame, format!("unknown block or builtin `{}`", callee.name), callee.span, "not defined")
                .with_help(format!("{similar}known: {}", known.join(", ")))
        })?;
        let values = self.bind(frame, &callee.name, &spec, positional, named, span)?;
        self.builtin(frame, &callee.name, values, span, scope.as_deref())
    }

    /// Binds positional and keyword arguments to parameter names, filling defaults.
    fn bind(
        &self,
        frame: &Frame,
        callee: &str,
        params: &[(&str, Option<Value>)],
        positional: Vec<(Value, Span)>,
        named: Vec<(String, Value, Span)>,
        span: Span,
    ) -> Result<Vec<(Value, Span)>> {
        let signature = || {
            let ps: Vec<String> = params
                .iter()
                .map(|(n, d)| match d {
                    Some(d) => format!("{n} = {d}"),
                    None => n.to_string(),
                })
                .collect();
            format!("the parameters of `{callee}` are ({})", ps.join(", "))
        };
        if let Some((_, extra)) = positional.get(params.len()) {
            let plural = if params.len() == 1 { "" } else { "s" };
            return Err(self
                .error(
                    frame,
                    format!("`{callee}` takes {} argument{plural}, {} given", params.len(), positional.len()),
                    *extra,
                    "unexpected argument",
                )
                .with_help(signature()));
        }
        let mut slots: Vec<Option<(Value, Span)>> = positional.into_iter().map(Some).collect();
        slots.resize(params.len(), None);
        for (name, v, sp) in named {
            let Some(i) = params.iter().position(|(n, _)| *n == name) else {
                return Err(self
                    .error(frame, format!("`{callee}` has no parameter `{name}`"), sp, "unknown argument")
                    .with_help(signature()));
            };
            if slots[i].is_some() {
                return Err(self.error(
                    frame,
                    format!("argument `{name}` of `{callee}` is given twice"),
                    sp,
                    "repeated",
                ));
            }
            slots[i] = Some((v, sp));
        }
        slots
            .into_iter()
            .zip(params)
            .map(|(slot, (name, default))| match (slot, default) {
                (Some(v), _) => Ok(v),
                (None, Some(d)) => Ok((d.clone(), span)),
                (None, None) => Err(self
                    .error(
                        frame,
                        format!("missing argument `{name}` of `{callee}`"),
                        span,
                        format!("`{name}` is not given"),
                    )
                    .with_help(signature())),
            })
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn call_block(
        &mut self,
        frame: &mut Frame,
        def: &BlockDef,
        prelude: bool,
        positional: Vec<(Value, Span)>,
        named: Vec<(String, Value, Span)>,
        scope: Option<String>,
        span: Span,
    ) -> Result<Value> {
        if self.depth >= MAX_CALL_DEPTH {
            return Err(self
                .error(
                    frame,
                    format!("blocks nest deeper than {MAX_CALL_DEPTH} calls (is `{}` recursive?)", def.name.name),
                    span,
                    "in this call",
                )
                .with_help("block calls are inlined at compile time: a recursive block needs an `if` that stops it"));
        }
        // Defaults are evaluated in the block's own (global) context.
        let mut defaults = Vec::new();
        for (p, d) in &def.params {
            let v = match d {
                Some(d) => {
                    let mut global =
                        Frame { vars: vec![HashMap::new()], scope: frame.scope.clone(), origin: frame.origin.clone() };
                    Some(self.expr(&mut global, d)?)
                }
                None => None,
            };
            defaults.push((p.name.as_str(), v));
        }
        let values = self.bind(frame, &def.name.name, &defaults, positional, named, span)?;
        let vars = def.params.iter().zip(values).map(|((p, _), (v, _))| (p.name.clone(), v)).collect();
        let origin = match (&frame.origin, prelude) {
            (Origin::Prelude(..), _) => frame.origin.clone(),
            (Origin::User, true) => Origin::Prelude(span, def.name.name.as_str().into()),
            (Origin::User, false) => Origin::User,
        };
        let scope = scope.map_or_else(|| frame.scope.clone(), |s| join(&frame.scope, &s));
        let mut inner = Frame { vars: vec![vars], scope, origin };
        self.depth += 1;
        let result = self.stmts(&mut inner, &def.body);
        self.depth -= 1;
        match result? {
            Some(v) => Ok(v),
            None => Err(self.error(
                frame,
                format!("block `{}` ended without `return`", def.name.name),
                span,
                "in this call",
            )),
        }
    }

    fn builtin(
        &mut self,
        frame: &mut Frame,
        name: &str,
        args: Vec<(Value, Span)>,
        span: Span,
        scope: Option<&str>,
    ) -> Result<Value> {
        let tensor = |this: &mut Self, i: usize| this.tensor(frame, &args[i].0, args[i].1);
        let float = |i: usize| {
            args[i].0.number().ok_or_else(|| {
                diag(
                    frame,
                    format!("`{name}` needs a number here, found {}", args[i].0.kind()),
                    args[i].1,
                    "this argument",
                )
            })
        };
        let boolean = |i: usize| match args[i].0 {
            Value::Bool(b) => Ok(b),
            ref v => Err(diag(
                frame,
                format!("`{name}` needs true or false here, found {}", v.kind()),
                args[i].1,
                "this argument",
            )),
        };
        let rank = |this: &Self, t: NodeId| this.graph.node(t).ty.rank();
        let axis = |this: &Self, t: NodeId, i: usize| -> Result<usize> {
            let r = rank(this, t) as i64;
            match args[i].0 {
                Value::Int(a) if -r <= a && a < r => Ok(if a < 0 { (a + r) as usize } else { a as usize }),
                ref v => Err(this.error(
                    frame,
                    format!("axis {v} is out of range for a tensor of rank {r}"),
                    args[i].1,
                    "this axis",
                )),
            }
        };
        if let Some(op) = UnaryOp::ALL.iter().find(|u| u.name() == name) {
            if let Some(x) = args[0].0.number() {
                let y = match op {
                    UnaryOp::Exp => Some(x.exp()),
                    UnaryOp::Log => Some(x.ln()),
                    UnaryOp::Sqrt => Some(x.sqrt()),
                    UnaryOp::Rsqrt => Some(1.0 / x.sqrt()),
                    UnaryOp::Recip => Some(1.0 / x),
                    UnaryOp::Tanh => Some(x.tanh()),
                    _ => None,
                };
                if let Some(y) = y {
                    return Ok(Value::Float(y));
                }
            }
            let x = tensor(self, 0)?;
            return self.emit(frame, Op::Unary(*op), &[x], span, scope);
        }
        let op = match name {
            "max" | "min" | "pow" => {
                if let (Some(a), Some(b)) = (args[0].0.number(), args[1].0.number()) {
                    return Ok(Value::Float(match name {
                        "max" => a.max(b),
                        "min" => a.min(b),
                        _ => a.powf(b),
                    }));
                }
                let (a, b) = (tensor(self, 0)?, tensor(self, 1)?);
                let op = match name {
                    "max" => BinaryOp::Max,
                    "min" => BinaryOp::Min,
                    _ => BinaryOp::Pow,
                };
                return self.emit(frame, Op::Binary(op), &[a, b], span, scope);
            }
            "linear" => {
                let mut operands = vec![tensor(self, 0)?, tensor(self, 1)?];
                if !matches!(args[2].0, Value::None) {
                    operands.push(tensor(self, 2)?);
                }
                return self.emit(frame, Op::Linear { activations: kiln_ir::Activations::F32 }, &operands, span, scope);
            }
            "matmul" => Op::MatMul,
            "gather" => Op::Gather,
            "softmax" => {
                let x = tensor(self, 0)?;
                return self.emit(frame, Op::Softmax { axis: axis(self, x, 1)? }, &[x], span, scope);
            }
            "layer_norm" => Op::LayerNorm { eps: float(3)? as f32 },
            "rms_norm" => Op::RmsNorm { eps: float(2)? as f32 },
            "rope" => Op::Rope { theta: float(1)? as f32, interleaved: boolean(2)? },
            "float" => Op::Cast { to: DType::F32 },
            "reshape" => {
                let dims = self.dims(frame, &args[1])?;
                Op::Reshape { shape: dims }
            }
            "transpose" => {
                let perm = self.dims(frame, &args[1])?;
                let perm = perm.iter().map(|d| d.known().unwrap_or(u64::MAX) as usize).collect();
                Op::Transpose { perm }
            }
            "slice" => {
                let x = tensor(self, 0)?;
                let ax = axis(self, x, 1)?;
                let start = match self.to_dim(frame, &args[2].0, args[2].1)? {
                    Dim::Known(n) => n,
                    Dim::Sym(_) => {
                        return Err(self.error(frame, "a slice must start at a known index", args[2].1, "this start"));
                    }
                };
                let end = self.to_dim(frame, &args[3].0, args[3].1)?;
                return self.emit(frame, Op::Slice { axis: ax, start: start as i64, end }, &[x], span, scope);
            }
            "concat" => {
                let Value::List(items) = &args[0].0 else {
                    return Err(self.error(frame, "`concat` takes a list of tensors", args[0].1, "not a list"));
                };
                let items = items.clone();
                let xs = items.iter().map(|v| self.tensor(frame, v, args[0].1)).collect::<Result<Vec<_>>>()?;
                let Some(&first) = xs.first() else {
                    return Err(self.error(frame, "`concat` needs at least one tensor", args[0].1, "empty list"));
                };
                let ax = axis(self, first, 1)?;
                return self.emit(frame, Op::Concat { axis: ax }, &xs, span, scope);
            }
            "sum" | "mean" | "amax" => {
                let x = tensor(self, 0)?;
                let mut axes = BTreeSet::new();
                let list = match &args[1].0 {
                    Value::List(l) => l.as_ref().clone(),
                    v => vec![v.clone()],
                };
                for a in list {
                    let r = rank(self, x) as i64;
                    match a {
                        Value::Int(i) if -r <= i && i < r => {
                            axes.insert(if i < 0 { (i + r) as usize } else { i as usize });
                        }
                        v => {
                            return Err(self.error(
                                frame,
                                format!("axis {v} is out of range for a tensor of rank {r}"),
                                args[1].1,
                                "these axes",
                            ));
                        }
                    }
                }
                let op = match name {
                    "sum" => ReduceOp::Sum,
                    "mean" => ReduceOp::Mean,
                    _ => ReduceOp::Max,
                };
                let keepdim = boolean(2)?;
                return self.emit(
                    frame,
                    Op::Reduce { op, axes: axes.into_iter().collect(), keepdim },
                    &[x],
                    span,
                    scope,
                );
            }
            "attention" => {
                let (q, k, v) = (tensor(self, 0)?, tensor(self, 1)?, tensor(self, 2)?);
                let mut operands = vec![q, k, v];
                if !matches!(args[3].0, Value::None) {
                    operands.push(tensor(self, 3)?);
                }
                let causal = boolean(4)?;
                let scale = match args[5].0 {
                    Value::None => {
                        let d = self.graph.node(q).ty.shape.last().and_then(Dim::known).unwrap_or(1);
                        1.0 / (d as f64).sqrt()
                    }
                    _ => float(5)?,
                };
                return self.emit(frame, Op::Attention { causal, scale: scale as f32 }, &operands, span, scope);
            }
            other => unreachable!("builtin `{other}` has a spec but no implementation"),
        };
        let n = match op {
            Op::LayerNorm { .. } => 3,
            Op::RmsNorm { .. } | Op::MatMul | Op::Gather => 2,
            _ => 1,
        };
        let operands = (0..n).map(|i| tensor(self, i)).collect::<Result<Vec<_>>>()?;
        self.emit(frame, op, &operands, span, scope)
    }

    fn dims(&self, frame: &Frame, arg: &(Value, Span)) -> Result<Vec<Dim>> {
        match &arg.0 {
            Value::List(items) => items.iter().map(|v| self.to_dim(frame, v, arg.1)).collect(),
            v => Err(self.error(
                frame,
                format!("expected a list of dimensions, found {}", v.kind()),
                arg.1,
                "this argument",
            )),
        }
    }
}

fn err_message(e: &kiln_ir::GraphError) -> String {
    match e {
        kiln_ir::GraphError::Type(t) => t.message.clone(),
        other => other.to_string(),
    }
}

/// `a`, `a and b`, `a, b and c`.
fn and_list(items: &[String]) -> String {
    match items.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} and {last}", rest.join(", ")),
    }
}

/// The candidate closest to `name` by edit distance, if it is close enough to be a typo.
fn closest<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut diagonal = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let substitute = diagonal + usize::from(ca != cb);
                diagonal = row[j + 1];
                row[j + 1] = substitute.min(row[j] + 1).min(diagonal + 1);
            }
        }
        row[b.len()]
    };
    let len = name.chars().count();
    candidates
        .filter(|&c| c != name)
        .map(|c| (distance(name, c), c))
        .filter(|&(d, _)| d <= (len / 3).max(1) && d < len)
        .min()
        .map(|(_, c)| c)
}

fn compare(op: BinOp, x: f64, y: f64) -> bool {
    match op {
        BinOp::Eq => x == y,
        BinOp::Ne => x != y,
        BinOp::Lt => x < y,
        BinOp::Le => x <= y,
        BinOp::Gt => x > y,
        BinOp::Ge => x >= y,
        _ => unreachable!("not a comparison"),
    }
}

fn binop_symbol(op: BinOp) -> &'static str {
    match op {
        BinOp::Add => "+",
        BinOp::Sub => "-",
        BinOp::Mul => "*",
        BinOp::Div => "/",
        BinOp::MatMul => "@",
        BinOp::Eq => "==",
        BinOp::Ne => "!=",
        BinOp::Lt => "<",
        BinOp::Le => "<=",
        BinOp::Gt => ">",
        BinOp::Ge => ">=",
    }
}

/// Names of the primitive operations callable from the language.
pub const BUILTINS: &[&str] = &[
    "neg",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "recip",
    "tanh",
    "sigmoid",
    "relu",
    "silu",
    "gelu",
    "max",
    "min",
    "pow",
    "linear",
    "matmul",
    "gather",
    "softmax",
    "layer_norm",
    "rms_norm",
    "rope",
    "float",
    "reshape",
    "transpose",
    "slice",
    "concat",
    "sum",
    "mean",
    "amax",
    "attention",
];

/// Parameter names and defaults of each builtin, or `None` if `name` is not one.
fn builtin_spec(name: &str) -> Option<Vec<(&'static str, Option<Value>)>> {
    let req = |n: &'static str| (n, None);
    let opt = |n: &'static str, v: Value| (n, Some(v));
    Some(match name {
        _ if UnaryOp::ALL.iter().any(|u| u.name() == name) => vec![req("x")],
        "max" | "min" | "pow" | "matmul" => vec![req("a"), req("b")],
        "linear" => vec![req("x"), req("weight"), opt("bias", Value::None)],
        "gather" => vec![req("table"), req("ids")],
        "softmax" => vec![req("x"), opt("axis", Value::Int(-1))],
        "layer_norm" => vec![req("x"), req("weight"), req("bias"), opt("eps", Value::Float(1e-5))],
        "rms_norm" => vec![req("x"), req("weight"), opt("eps", Value::Float(1e-6))],
        "rope" => vec![req("x"), opt("theta", Value::Float(10000.0)), opt("interleaved", Value::Bool(false))],
        "float" => vec![req("x")],
        "reshape" => vec![req("x"), req("shape")],
        "transpose" => vec![req("x"), req("perm")],
        "slice" => vec![req("x"), req("axis"), req("start"), req("end")],
        "concat" => vec![req("tensors"), opt("axis", Value::Int(0))],
        "sum" | "mean" | "amax" => vec![req("x"), req("axis"), opt("keepdim", Value::Bool(false))],
        "attention" => vec![
            req("q"),
            req("k"),
            req("v"),
            opt("mask", Value::None),
            opt("causal", Value::Bool(false)),
            opt("scale", Value::None),
        ],
        _ => return None,
    })
}
