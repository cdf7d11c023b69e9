//! The IR text form: a stable, line-per-node printer and a parser for the same text.
//!
//! ```text
//! graph tiny {
//!   %0 = input "input_ids" : i64[batch, seq]
//!   %1 = weight "embed.weight" f32 #5a1c0e33b1f1a2d4 : f32[16, 8] @embed
//!   %2 = gather %1, %0 : f32[batch, seq, 8] @embed
//!   %3 = layer_norm %2, %4, %5 {eps = 1e-5} : f32[batch, seq, 8] @norm
//!   output "hidden" = %3
//!   layer "embed" = main %1
//! }
//! ```
//! Values are numbered densely in the graph's deterministic topological order, so
//! printing is independent of how the graph was built or edited. Weights print as
//! references (tensor name, storage format, checksum of the bytes), never as numbers; a
//! sparse weight adds its pattern and mask: `weight "w.values" int4g32 #.. sparse 2:4
//! "w.mask" #..` (see [`crate::sparse`]).
//! After the outputs, one `layer` line per entry of the graph's layer table, in name order:
//! `layer "blk.0.up" = main %5, correction_a %9, correction_b %10` (roles as
//! [`Role::name`], entries in their recorded order). Text without any `layer` line (older
//! artifacts, hand-written IR) parses to a graph whose table is [`LayerTable::derive`]d, so
//! it keeps the layers it always had; text with layer lines gets exactly those.
//! `print(parse(text)) == text` for any printed graph.

use crate::format::Format;
use crate::graph::{Graph, NodeId};
use crate::layers::{Layer, LayerTable, Role};
use crate::op::{Activations, BinaryOp, Op, ReduceOp, UnaryOp, UnknownActivations, WeightRef};
use crate::sparse::Sparse;
use crate::types::{DType, Dim, ShapeDisplay, Type};
use std::collections::HashMap;
use std::fmt::Write;

/// Prints a graph. Panics only if the graph has a cycle (which the verifier rejects).
pub fn print(graph: &Graph) -> String {
    let order = graph.topo_order().expect("graph has a cycle");
    let number: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut out = String::new();
    writeln!(out, "graph {} {{", graph.name).unwrap();
    for &id in &order {
        let node = graph.node(id);
        write!(out, "  %{} = {}", number[&id], node.op.name()).unwrap();
        match &node.op {
            Op::Input { name } => write!(out, " {name:?}").unwrap(),
            Op::Weight(w) => {
                write!(out, " {:?} {}", w.tensor, w.format).unwrap();
                if let Some(sum) = w.checksum {
                    write!(out, " #{sum:016x}").unwrap();
                }
                if let Some(sparse) = &w.sparse {
                    write!(out, " sparse {sparse} {:?}", sparse.mask).unwrap();
                    if let Some(sum) = sparse.mask_checksum {
                        write!(out, " #{sum:016x}").unwrap();
                    }
                }
            }
            Op::Const { value } => write!(out, " {value:?}").unwrap(),
            _ => {}
        }
        for (i, o) in graph.operands(id).iter().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(out, "{sep}%{}", number[o]).unwrap();
        }
        let attrs = attributes(&node.op);
        if !attrs.is_empty() {
            let list: Vec<String> = attrs.iter().map(|(k, v)| format!("{k} = {v}")).collect();
            write!(out, " {{{}}}", list.join(", ")).unwrap();
        }
        write!(out, " : {}", node.ty).unwrap();
        if !node.scope.is_empty() {
            write!(out, " @{}", node.scope).unwrap();
        }
        out.push('\n');
    }
    for (name, id) in graph.outputs() {
        writeln!(out, "  output {name:?} = %{}", number[id]).unwrap();
    }
    for (name, layer) in graph.layers.iter() {
        let entries: Vec<String> = layer
            .weights
            .iter()
            .map(|(role, id)| match number.get(id) {
                Some(n) => format!("{role} %{n}"),
                None => format!("{role} %?"),
            })
            .collect();
        writeln!(out, "  layer {name:?} = {}", entries.join(", ")).unwrap();
    }
    out.push_str("}\n");
    out
}

/// Attributes of an op as `(name, printed value)`, in a fixed order.
fn attributes(op: &Op) -> Vec<(&'static str, String)> {
    let list = |v: &[usize]| format!("{v:?}");
    match op {
        Op::Softmax { axis } | Op::Concat { axis } => vec![("axis", axis.to_string())],
        Op::LayerNorm { eps } | Op::RmsNorm { eps } => vec![("eps", format!("{eps:?}"))],
        Op::Rope { theta, interleaved } => {
            vec![("theta", format!("{theta:?}")), ("interleaved", interleaved.to_string())]
        }
        Op::Reshape { shape } => vec![("shape", ShapeDisplay(shape).to_string())],
        Op::Transpose { perm } => vec![("perm", list(perm))],
        Op::Slice { axis, start, end } => {
            vec![("axis", axis.to_string()), ("start", start.to_string()), ("end", end.to_string())]
        }
        Op::Reduce { axes, keepdim, .. } => vec![("axes", list(axes)), ("keepdim", keepdim.to_string())],
        Op::Cast { to } => vec![("to", to.to_string())],
        Op::Attention { causal, scale } => {
            vec![("causal", causal.to_string()), ("scale", format!("{scale:?}"))]
        }
        // Printed only when not f32, so graphs without int8 activations print as they
        // always did.
        Op::Linear { activations } if *activations != Activations::F32 => {
            vec![("activations", activations.to_string())]
        }
        Op::Input { .. }
        | Op::Weight(_)
        | Op::Const { .. }
        | Op::Linear { .. }
        | Op::MatMul
        | Op::Binary(_)
        | Op::Unary(_)
        | Op::Gather => vec![],
    }
}

/// Attributes an op's text may leave out, taking their default: a linear's `activations`
/// (`f32`).
fn optional_attributes(op: &Op) -> &'static [&'static str] {
    match op {
        Op::Linear { .. } => &["activations"],
        _ => &[],
    }
}

/// A parse error at a 1-based line and column of the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{col}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub col: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Value(usize),
    Ident(String),
    Str(String),
    Num(String),
    Hash(u64),
    Scope(String),
    Punct(char),
}

struct Lexer<'a> {
    line: usize,
    text: &'a str,
    pos: usize,
}

impl<'a> Lexer<'a> {
    fn error(&self, message: impl Into<String>) -> ParseError {
        ParseError { line: self.line, col: self.pos + 1, message: message.into() }
    }

    fn tokens(mut self) -> Result<Vec<(usize, Tok)>, ParseError> {
        let bytes = self.text.as_bytes();
        let mut out = Vec::new();
        while self.pos < bytes.len() {
            let c = bytes[self.pos] as char;
            let start = self.pos;
            let take = |pos: &mut usize, pred: &dyn Fn(char) -> bool| {
                while *pos < bytes.len() && pred(bytes[*pos] as char) {
                    *pos += 1;
                }
            };
            let tok = if c.is_whitespace() {
                self.pos += 1;
                continue;
            } else if c == '%' {
                self.pos += 1;
                take(&mut self.pos, &|c| c.is_ascii_digit());
                let n = self.text[start + 1..self.pos]
                    .parse()
                    .map_err(|_| self.error("expected a value number after `%`"))?;
                Tok::Value(n)
            } else if c == '#' {
                self.pos += 1;
                take(&mut self.pos, &|c| c.is_ascii_hexdigit());
                let h = u64::from_str_radix(&self.text[start + 1..self.pos], 16)
                    .map_err(|_| self.error("expected a hexadecimal checksum after `#`"))?;
                Tok::Hash(h)
            } else if c == '@' {
                self.pos += 1;
                take(&mut self.pos, &|c| !c.is_whitespace());
                Tok::Scope(self.text[start + 1..self.pos].to_string())
            } else if c == '"' {
                self.pos += 1;
                take(&mut self.pos, &|c| c != '"');
                if self.pos >= bytes.len() {
                    return Err(self.error("unterminated string"));
                }
                self.pos += 1;
                Tok::Str(self.text[start + 1..self.pos - 1].to_string())
            } else if c.is_ascii_digit() || (c == '-' && self.pos + 1 < bytes.len()) {
                self.pos += 1;
                take(&mut self.pos, &|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '+');
                Tok::Num(self.text[start..self.pos].to_string())
            } else if c.is_ascii_alphabetic() || c == '_' {
                take(&mut self.pos, &|c| c.is_ascii_alphanumeric() || c == '_');
                Tok::Ident(self.text[start..self.pos].to_string())
            } else if "=:,[]{}".contains(c) {
                self.pos += 1;
                Tok::Punct(c)
            } else {
                return Err(self.error(format!("unexpected character `{c}`")));
            };
            out.push((start + 1, tok));
        }
        Ok(out)
    }
}

struct Line {
    line: usize,
    toks: Vec<(usize, Tok)>,
    at: usize,
    end_col: usize,
}

impl Line {
    fn error(&self, message: impl Into<String>) -> ParseError {
        let col = self.toks.get(self.at).map_or(self.end_col, |t| t.0);
        ParseError { line: self.line, col, message: message.into() }
    }
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.at).map(|t| &t.1)
    }
    fn next(&mut self) -> Option<Tok> {
        let t = self.toks.get(self.at).map(|t| t.1.clone());
        self.at += 1;
        t
    }
    fn punct(&mut self, c: char) -> Result<(), ParseError> {
        match self.peek() {
            Some(Tok::Punct(p)) if *p == c => {
                self.at += 1;
                Ok(())
            }
            _ => Err(self.error(format!("expected `{c}`"))),
        }
    }
    /// An optional `#hex` checksum.
    fn checksum(&mut self) -> Option<u64> {
        match self.peek() {
            Some(Tok::Hash(h)) => {
                let h = *h;
                self.at += 1;
                Some(h)
            }
            _ => None,
        }
    }
    fn eat(&mut self, c: char) -> bool {
        self.punct(c).is_ok()
    }
    fn ident(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => Err(self.error(format!("expected {what}"))),
        }
    }
    fn string(&mut self, what: &str) -> Result<String, ParseError> {
        match self.peek() {
            Some(Tok::Str(s)) => {
                let s = s.clone();
                self.at += 1;
                Ok(s)
            }
            _ => Err(self.error(format!("expected {what} in quotes"))),
        }
    }
    fn float(&mut self) -> Result<f32, ParseError> {
        let text = match self.peek() {
            Some(Tok::Num(s) | Tok::Ident(s)) => s.clone(),
            _ => return Err(self.error("expected a number")),
        };
        let v = text.parse::<f32>().map_err(|_| self.error(format!("`{text}` is not a number")))?;
        self.at += 1;
        Ok(v)
    }
    fn int(&mut self) -> Result<u64, ParseError> {
        self.number("a non-negative integer")
    }
    fn signed_int(&mut self) -> Result<i64, ParseError> {
        self.number("an integer")
    }
    fn number<T: std::str::FromStr>(&mut self, what: &str) -> Result<T, ParseError> {
        match self.peek() {
            Some(Tok::Num(s)) => {
                let v = s.parse().map_err(|_| self.error(format!("`{s}` is not {what}")))?;
                self.at += 1;
                Ok(v)
            }
            _ => Err(self.error("expected an integer")),
        }
    }
    fn dim(&mut self) -> Result<Dim, ParseError> {
        match self.peek() {
            Some(Tok::Ident(s)) => {
                let d = Dim::sym(s);
                self.at += 1;
                Ok(d)
            }
            _ => Ok(Dim::Known(self.int()?)),
        }
    }
    fn dims(&mut self) -> Result<Vec<Dim>, ParseError> {
        self.punct('[')?;
        let mut dims = Vec::new();
        if !self.eat(']') {
            loop {
                dims.push(self.dim()?);
                if self.eat(']') {
                    break;
                }
                self.punct(',')?;
            }
        }
        Ok(dims)
    }
    fn ints(&mut self) -> Result<Vec<usize>, ParseError> {
        self.dims()?
            .into_iter()
            .map(|d| d.known().map(|n| n as usize).ok_or_else(|| self.error("expected a list of integers")))
            .collect()
    }
    fn bool(&mut self) -> Result<bool, ParseError> {
        match self.ident("true or false")?.as_str() {
            "true" => Ok(true),
            "false" => Ok(false),
            _ => {
                self.at -= 1;
                Err(self.error("expected true or false"))
            }
        }
    }
    /// An [`Activations`] name: `f32`, `int8` or `int8-row` (which lexes as `int8` and a
    /// touching `-row`).
    fn activations(&mut self) -> Result<Activations, ParseError> {
        let start = self.at;
        let (col, mut name) = match self.toks.get(self.at) {
            Some((col, Tok::Ident(s))) => (*col, s.clone()),
            _ => return Err(self.error("expected f32, int8 or int8-row")),
        };
        self.at += 1;
        if let Some((c, Tok::Num(rest))) = self.toks.get(self.at)
            && rest.starts_with('-')
            && *c == col + name.len()
        {
            name.push_str(rest);
            self.at += 1;
        }
        name.parse().map_err(|e: UnknownActivations| {
            self.at = start;
            self.error(e.to_string())
        })
    }
    fn ty(&mut self) -> Result<Type, ParseError> {
        let name = self.ident("a type such as f32[4, 8]")?;
        let dtype = DType::parse(&name).ok_or_else(|| {
            self.at -= 1;
            self.error(format!("unknown element type `{name}` (expected f32 or i64)"))
        })?;
        Ok(Type::new(dtype, self.dims()?))
    }
}

/// Parses IR text into a graph with an empty tensor store (weights are references).
/// Types written in the text are taken as given; run the verifier to check them. Without
/// `layer` lines, the layer table is [`LayerTable::derive`]d.
pub fn parse(text: &str) -> Result<Graph, ParseError> {
    let mut graph = Graph::default();
    let mut layers: Option<LayerTable> = None;
    let mut values: HashMap<usize, NodeId> = HashMap::new();
    let mut header = false;
    let mut closed = false;
    for (i, raw) in text.lines().enumerate() {
        let toks = Lexer { line: i + 1, text: raw, pos: 0 }.tokens()?;
        if toks.is_empty() || raw.trim_start().starts_with("//") {
            continue;
        }
        let mut l = Line { line: i + 1, toks, at: 0, end_col: raw.len() + 1 };
        if closed {
            return Err(l.error("text after the closing `}`"));
        }
        if !header {
            if l.ident("`graph`")? != "graph" {
                l.at -= 1;
                return Err(l.error("expected `graph NAME {`"));
            }
            graph.name = l.ident("a graph name")?;
            l.punct('{')?;
            header = true;
        } else if l.eat('}') {
            closed = true;
        } else if matches!(l.peek(), Some(Tok::Ident(s)) if s == "output") {
            l.at += 1;
            let name = l.string("an output name")?;
            l.punct('=')?;
            let id = value_ref(&mut l, &values)?;
            graph.set_output(&name, id).map_err(|e| l.error(e.to_string()))?;
        } else if matches!(l.peek(), Some(Tok::Ident(s)) if s == "layer") {
            l.at += 1;
            let name = l.string("a layer name")?;
            let table = layers.get_or_insert_with(LayerTable::default);
            if table.get(&name).is_some() {
                l.at -= 1;
                return Err(l.error(format!("layer `{name}` is defined twice")));
            }
            l.punct('=')?;
            let mut layer = Layer::default();
            loop {
                let role = l.ident("a role (main, correction_a, ...)")?;
                let role = Role::from_name(&role).ok_or_else(|| {
                    l.at -= 1;
                    let names: Vec<&str> = Role::ALL.iter().map(|r| r.name()).collect();
                    l.error(format!("unknown role `{role}` (expected one of {})", names.join(", ")))
                })?;
                layer.weights.push((role, value_ref(&mut l, &values)?));
                if !l.eat(',') {
                    break;
                }
            }
            if l.peek().is_some() {
                return Err(l.error("expected `,` or the end of the line"));
            }
            table.insert(name, layer);
        } else {
            let number = match l.next() {
                Some(Tok::Value(n)) => n,
                _ => {
                    l.at -= 1;
                    return Err(l.error("expected `%N = ...`, `output \"name\" = %N`, `layer \"name\" = ...` or `}`"));
                }
            };
            if values.contains_key(&number) {
                l.at -= 1;
                return Err(l.error(format!("%{number} is defined twice")));
            }
            l.punct('=')?;
            let (op, operands) = op_line(&mut l, &values)?;
            l.punct(':')?;
            let ty = l.ty()?;
            let scope = match l.next() {
                Some(Tok::Scope(s)) => s,
                None => String::new(),
                Some(_) => {
                    l.at -= 1;
                    return Err(l.error("expected `@scope` or the end of the line"));
                }
            };
            if l.peek().is_some() {
                return Err(l.error("expected the end of the line"));
            }
            values.insert(number, graph.add_typed(op, &operands, ty, &scope, None));
        }
    }
    if !closed {
        let line = text.lines().count().max(1);
        return Err(ParseError { line, col: 1, message: "missing closing `}` of the graph".into() });
    }
    graph.layers = layers.unwrap_or_else(|| LayerTable::derive(&graph));
    Ok(graph)
}

fn value_ref(l: &mut Line, values: &HashMap<usize, NodeId>) -> Result<NodeId, ParseError> {
    match l.next() {
        Some(Tok::Value(n)) => values.get(&n).copied().ok_or_else(|| {
            l.at -= 1;
            l.error(format!("%{n} is used before it is defined"))
        }),
        _ => {
            l.at -= 1;
            Err(l.error("expected a value `%N`"))
        }
    }
}

fn op_line(l: &mut Line, values: &HashMap<usize, NodeId>) -> Result<(Op, Vec<NodeId>), ParseError> {
    let name = l.ident("an op name")?;
    let name_at = l.at - 1;
    let mut op = match name.as_str() {
        "input" => Op::Input { name: l.string("the input name")? },
        "weight" => {
            let tensor = l.string("the tensor name")?;
            let fmt = l.ident("a storage format")?;
            let format: Format = fmt.parse().map_err(|e: crate::FormatError| {
                l.at -= 1;
                l.error(e.to_string())
            })?;
            let checksum = l.checksum();
            let sparse = match l.peek() {
                Some(Tok::Ident(s)) if s == "sparse" => {
                    l.at += 1;
                    let n = l.int()?;
                    l.punct(':')?;
                    let m = l.int()?;
                    let mask = l.string("the mask's tensor name")?;
                    Some(Sparse { n, m, mask, mask_checksum: l.checksum() })
                }
                _ => None,
            };
            Op::Weight(WeightRef { tensor, format, checksum, sparse })
        }
        "const" => Op::Const { value: l.float()? },
        "linear" => Op::Linear { activations: Activations::F32 },
        "matmul" => Op::MatMul,
        "gather" => Op::Gather,
        "softmax" => Op::Softmax { axis: 0 },
        "layer_norm" => Op::LayerNorm { eps: 0.0 },
        "rms_norm" => Op::RmsNorm { eps: 0.0 },
        "rope" => Op::Rope { theta: 0.0, interleaved: false },
        "reshape" => Op::Reshape { shape: vec![] },
        "transpose" => Op::Transpose { perm: vec![] },
        "slice" => Op::Slice { axis: 0, start: 0, end: Dim::Known(0) },
        "concat" => Op::Concat { axis: 0 },
        "cast" => Op::Cast { to: DType::F32 },
        "attention" => Op::Attention { causal: false, scale: 0.0 },
        other => {
            if let Some(b) = BinaryOp::ALL.into_iter().find(|b| b.name() == other) {
                Op::Binary(b)
            } else if let Some(u) = UnaryOp::ALL.into_iter().find(|u| u.name() == other) {
                Op::Unary(u)
            } else if let Some(r) = ReduceOp::ALL.into_iter().find(|r| r.name() == other) {
                Op::Reduce { op: r, axes: vec![], keepdim: false }
            } else {
                l.at = name_at;
                return Err(l.error(format!("unknown op `{other}`")));
            }
        }
    };
    let mut operands = Vec::new();
    if matches!(l.peek(), Some(Tok::Value(_))) {
        loop {
            operands.push(value_ref(l, values)?);
            if !l.eat(',') {
                break;
            }
        }
    }
    let required: Vec<&str> = attributes(&op).iter().map(|(k, _)| *k).collect();
    let mut expected = required.clone();
    expected.extend(optional_attributes(&op));
    let mut seen = Vec::new();
    if l.eat('{') {
        loop {
            let key = l.ident("an attribute name")?;
            if !expected.contains(&key.as_str()) || seen.contains(&key) {
                l.at -= 1;
                return Err(
                    l.error(format!("unexpected attribute `{key}` for {name} (it takes: {})", expected.join(", ")))
                );
            }
            l.punct('=')?;
            set_attribute(&mut op, &key, l)?;
            seen.push(key);
            if l.eat('}') {
                break;
            }
            l.punct(',')?;
        }
    }
    if let Some(missing) = required.iter().find(|k| !seen.iter().any(|s| s == *k)) {
        return Err(l.error(format!("{name} needs attribute `{missing}`")));
    }
    Ok((op, operands))
}

fn set_attribute(op: &mut Op, key: &str, l: &mut Line) -> Result<(), ParseError> {
    match (op, key) {
        (Op::Softmax { axis } | Op::Concat { axis } | Op::Slice { axis, .. }, "axis") => *axis = l.int()? as usize,
        (Op::LayerNorm { eps } | Op::RmsNorm { eps }, "eps") => *eps = l.float()?,
        (Op::Rope { theta, .. }, "theta") => *theta = l.float()?,
        (Op::Rope { interleaved, .. }, "interleaved") => *interleaved = l.bool()?,
        (Op::Reshape { shape }, "shape") => *shape = l.dims()?,
        (Op::Transpose { perm }, "perm") => *perm = l.ints()?,
        (Op::Slice { start, .. }, "start") => *start = l.signed_int()?,
        (Op::Slice { end, .. }, "end") => *end = l.dim()?,
        (Op::Reduce { axes, .. }, "axes") => *axes = l.ints()?,
        (Op::Reduce { keepdim, .. }, "keepdim") => *keepdim = l.bool()?,
        (Op::Cast { to }, "to") => {
            let name = l.ident("an element type")?;
            *to = DType::parse(&name).ok_or_else(|| l.error(format!("unknown element type `{name}`")))?;
        }
        (Op::Linear { activations }, "activations") => *activations = l.activations()?,
        (Op::Attention { causal, .. }, "causal") => *causal = l.bool()?,
        (Op::Attention { scale, .. }, "scale") => *scale = l.float()?,
        _ => unreachable!("attribute names are checked against `attributes` first"),
    }
    Ok(())
}
