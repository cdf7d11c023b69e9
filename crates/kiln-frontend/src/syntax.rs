//! Parsing: source text -> [`ast::File`] through the pest grammar.

use crate::ast::*;
use crate::diagnostic::Diagnostic;
use kiln_ir::{DType, Span};
use pest::Parser;
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use std::rc::Rc;
use std::sync::LazyLock;

#[derive(pest_derive::Parser)]
#[grammar = "../../grammar/kiln.pest"]
struct KilnParser;

static PRATT: LazyLock<PrattParser<Rule>> = LazyLock::new(|| {
    PrattParser::new()
        .op(Op::infix(Rule::eq, Assoc::Left)
            | Op::infix(Rule::ne, Assoc::Left)
            | Op::infix(Rule::lt, Assoc::Left)
            | Op::infix(Rule::le, Assoc::Left)
            | Op::infix(Rule::gt, Assoc::Left)
            | Op::infix(Rule::ge, Assoc::Left))
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left)
            | Op::infix(Rule::div, Assoc::Left)
            | Op::infix(Rule::matmul, Assoc::Left))
        .op(Op::prefix(Rule::neg))
});

fn span(p: &Pair<Rule>) -> Span {
    let s = p.as_span();
    Span { start: s.start() as u32, end: s.end() as u32 }
}

fn ident(p: Pair<Rule>) -> Ident {
    Ident { name: p.as_str().to_string(), span: span(&p) }
}

/// Parses a whole model file.
pub fn parse(source: &str) -> Result<File, Diagnostic> {
    // Record the literal tokens tried at the furthest position (`=`, `)`, ...), so that
    // errors can name them; the grammar's rules alone cannot. The setting is global to
    // pest and only ever switched on.
    pest::set_error_detail(true);
    let mut pairs = KilnParser::parse(Rule::file, source).map_err(|e| syntax_error(source, &e))?;
    let file = pairs.next().expect("the grammar's `file` rule matched");
    let mut inner = file.into_inner();
    let model = ident(inner.next().expect("model_decl").into_inner().next().expect("model name"));
    let items = inner.filter(|p| p.as_rule() != Rule::EOI).map(item).collect();
    Ok(File { model, items })
}

/// Describes a parse failure: what was expected at the furthest point the parser
/// reached and what was found there. An unterminated string, or a bracket left open on
/// an earlier line, is pointed at directly.
fn syntax_error(source: &str, e: &pest::error::Error<Rule>) -> Diagnostic {
    let at = |start: usize, end: usize| Span { start: start as u32, end: end as u32 };
    let attempts = e.parse_attempts().filter(|a| !a.expected_tokens().is_empty());
    let pos = match (&attempts, &e.location) {
        (Some(a), _) => a.max_position,
        (None, pest::error::InputLocation::Pos(p)) => *p,
        (None, pest::error::InputLocation::Span((s, _))) => *s,
    };
    let pos = pos.min(source.len());
    let scan = scan(source, pos);
    if let Some(open) = scan.unterminated_string {
        let end = source[open..].find('\n').map_or(source.len(), |n| open + n);
        return Diagnostic::new("syntax error: unterminated string", at(open, end), "this string is not closed")
            .with_help("a string ends with `\"` on the same line");
    }
    if let Some(attempts) = attempts {
        // Literals as they are, character ranges as `a..z`.
        let tokens: Vec<String> = attempts.expected_tokens().iter().map(|t| t.to_string()).collect();
        let found = found_at(source, pos);
        let expected = expected_list(&tokens);
        let message = match expected.is_empty() {
            true => format!("syntax error: unexpected {found}"),
            false => format!("syntax error: expected {expected}, found {found}"),
        };
        // A bracket still open from an earlier line, whose closer would fit before the
        // first token of this line (or the end of the file), was most likely never closed:
        // point at it.
        let line_start = source[..pos].rfind('\n').map_or(0, |n| n + 1);
        let open = scan.open.filter(|&(c, o)| {
            tokens.iter().any(|t| t == closer(c)) && o < line_start && source[line_start..pos].trim().is_empty()
        });
        let d = match open {
            Some((c, o)) => Diagnostic::new(message, at(o, o + 1), format!("this `{c}` is not closed"))
                .with_help(format!("add `{}` where it should end", closer(c))),
            None => {
                // At the end of the file, point just past its last text: that line is shown.
                let pos = if pos == source.len() { source.trim_end().len() } else { pos };
                Diagnostic::new(message, at(pos, pos), format!("unexpected {found}"))
            }
        };
        return match found.as_str() {
            "`;`" => d.with_help("statements end at the end of the line; kiln has no `;`"),
            _ => d,
        };
    }
    let (start, end) = match e.location {
        pest::error::InputLocation::Pos(p) => (p, p),
        pest::error::InputLocation::Span((s, e)) => (s, e),
    };
    let message = match &e.variant {
        pest::error::ErrorVariant::ParsingError { positives, .. } => {
            let mut names: Vec<String> = positives.iter().map(|r| rule_name(*r).to_string()).collect();
            names.sort();
            names.dedup();
            match names.len() {
                0 => "syntax error".to_string(),
                1 => format!("syntax error: expected {}", names[0]),
                _ => {
                    let last = names.pop().unwrap_or_default();
                    format!("syntax error: expected {} or {last}", names.join(", "))
                }
            }
        }
        pest::error::ErrorVariant::CustomError { message } => message.clone(),
    };
    Diagnostic::new(message, at(start, end), "here")
}

/// What the lexical scan of a failed parse found before the error position.
struct Scan {
    /// The innermost bracket still open, and its offset.
    open: Option<(char, usize)>,
    /// The offset of a string's opening `"` that has no closing one on its line.
    unterminated_string: Option<usize>,
}

/// Scans `source` up to `end` for open brackets, skipping comments and strings, and to
/// the end of that line for a string left unterminated (the parser stops inside it).
fn scan(source: &str, end: usize) -> Scan {
    let limit = source[end..].find('\n').map_or(source.len(), |n| end + n);
    let mut open = Vec::new();
    let mut chars = source[..limit].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '#' => {
                chars.by_ref().find(|&(_, c)| c == '\n');
            }
            '"' => loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\n')) | None => return Scan { open: None, unterminated_string: Some(i) },
                    Some(_) => {}
                }
            },
            '(' | '[' | '{' if i < end => open.push((c, i)),
            ')' | ']' | '}' if i < end => {
                open.pop();
            }
            _ => {}
        }
    }
    Scan { open: open.pop(), unterminated_string: None }
}

fn closer(open: char) -> &'static str {
    match open {
        '(' => ")",
        '[' => "]",
        _ => "}",
    }
}

/// The token at `pos`, for "found ..." in messages.
fn found_at(source: &str, pos: usize) -> String {
    let rest = &source[pos..];
    let word = rest.find(|c: char| !(c.is_alphanumeric() || c == '_')).unwrap_or(rest.len());
    match rest.chars().next() {
        None => "end of file".to_string(),
        Some(_) if word > 0 => format!("`{}`", &rest[..word]),
        Some(c) if c.is_whitespace() => "end of line".to_string(),
        Some(c) => match OPERATORS.iter().find(|op| op.len() == 2 && rest.starts_with(*op)) {
            Some(op) => format!("`{op}`"),
            None => format!("`{c}`"),
        },
    }
}

const OPERATORS: &[&str] = &["==", "!=", "<=", ">=", "<", ">", "+", "-", "*", "/", "@"];
const STATEMENTS: &[&str] = &["block", "input", "output", "let", "for", "if", "return"];

/// The tokens the parser tried at the error position, as a reader should see them:
/// operators, expression starts and statement starts collapse into one entry each, and
/// the continuations of a name or number just read are left out.
fn expected_list(tokens: &[String]) -> String {
    let has = |t: &str| tokens.iter().any(|x| x == t);
    // `param` is tried exactly where an expression may start.
    let expression = has("param");
    // An assignment (`name = ...`) is a statement, too.
    let statement = STATEMENTS.iter().any(|s| has(s));
    let closing = has(")") || has("]") || has("}");
    let mut names: Vec<String> = Vec::new();
    for t in tokens {
        let name = match t.as_str() {
            " " | "\t" | "\r" | "\n" | "#" | "." | "_" => continue,
            "(" | "[" | "\"" | "-" | "param" | "true" | "false" | "a..z" if expression => "an expression".to_string(),
            // After a name: it could have been a call or a keyword argument.
            "(" | "=" if closing => continue,
            op if OPERATORS.contains(&op) => "an operator".to_string(),
            s if STATEMENTS.contains(&s) => "a statement".to_string(),
            "model" => "`model NAME` at the top of the file".to_string(),
            "\"" => "a string".to_string(),
            "a..z" if statement => continue,
            "a..z" => "a name".to_string(),
            // Other ranges and case-insensitive letters: digits and exponents of a number.
            r if r.len() > 2 && r.contains("..") || r == "E" => continue,
            t => format!("`{t}`"),
        };
        names.push(name);
    }
    names.sort();
    names.dedup();
    match names.split_last() {
        None => String::new(),
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
    }
}

/// What a user should read for a grammar rule in "expected ..." messages.
fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of file",
        Rule::model_decl => "`model NAME` at the top of the file",
        Rule::block_def => "`block`",
        Rule::input_decl => "`input`",
        Rule::output_decl => "`output`",
        Rule::let_stmt => "`let`",
        Rule::assign_stmt => "an assignment",
        Rule::for_stmt => "`for`",
        Rule::if_stmt => "`if`",
        Rule::return_stmt => "`return`",
        Rule::expr | Rule::postfix | Rule::atom | Rule::call | Rule::param | Rule::list => "an expression",
        Rule::eq | Rule::ne | Rule::le | Rule::ge | Rule::lt | Rule::gt => "a comparison",
        Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::matmul => "an operator",
        Rule::neg => "`-`",
        Rule::index => "`[`",
        Rule::number => "a number",
        Rule::string | Rule::string_inner => "a string",
        Rule::boolean => "true or false",
        Rule::ident | Rule::keyword => "a name",
        Rule::path => "a parameter name",
        Rule::dtype => "an element type (f32 or i64)",
        Rule::type_expr => "a type such as f32[batch, 384]",
        Rule::kwarg | Rule::args => "an argument",
        Rule::params | Rule::param_decl => "a parameter",
        Rule::body => "`{`",
        _ => "something else",
    }
}

fn item(p: Pair<Rule>) -> Item {
    match p.as_rule() {
        Rule::block_def => {
            let mut it = p.into_inner();
            let name = ident(it.next().expect("block name"));
            let params = it
                .next()
                .expect("params")
                .into_inner()
                .map(|d| {
                    let mut d = d.into_inner();
                    let name = ident(d.next().expect("param name"));
                    (name, d.next().map(expr))
                })
                .collect();
            let body = body(it.next().expect("body"));
            Item::Block(Rc::new(BlockDef { name, params, body }))
        }
        Rule::input_decl => {
            let mut it = p.into_inner();
            let name = ident(it.next().expect("input name"));
            Item::Input { name, ty: type_expr(it.next().expect("type")) }
        }
        Rule::output_decl => {
            let mut it = p.into_inner();
            let name = ident(it.next().expect("output name"));
            let ty = type_expr(it.next().expect("type"));
            Item::Output { name, ty, value: expr(it.next().expect("value")) }
        }
        _ => Item::Stmt(stmt(p)),
    }
}

fn body(p: Pair<Rule>) -> Vec<Stmt> {
    p.into_inner().map(stmt).collect()
}

fn stmt(p: Pair<Rule>) -> Stmt {
    let rule = p.as_rule();
    let mut it = p.into_inner();
    match rule {
        Rule::let_stmt => Stmt::Let(ident(it.next().expect("name")), expr(it.next().expect("value"))),
        Rule::assign_stmt => Stmt::Assign(ident(it.next().expect("name")), expr(it.next().expect("value"))),
        Rule::for_stmt => Stmt::For {
            var: ident(it.next().expect("loop variable")),
            start: expr(it.next().expect("start")),
            end: expr(it.next().expect("end")),
            body: body(it.next().expect("body")),
        },
        Rule::if_stmt => {
            let cond = expr(it.next().expect("condition"));
            let then = body(it.next().expect("then"));
            let otherwise = match it.next() {
                None => vec![],
                Some(p) if p.as_rule() == Rule::if_stmt => vec![stmt(p)],
                Some(p) => body(p),
            };
            Stmt::If { cond, then, otherwise }
        }
        Rule::return_stmt => Stmt::Return(expr(it.next().expect("value"))),
        other => unreachable!("not a statement: {other:?}"),
    }
}

fn type_expr(p: Pair<Rule>) -> TypeExpr {
    let sp = span(&p);
    let mut it = p.into_inner();
    let dtype = match it.next().expect("dtype").as_str() {
        "i64" => DType::I64,
        _ => DType::F32,
    };
    TypeExpr { dtype, dims: it.map(expr).collect(), span: sp }
}

fn expr(p: Pair<Rule>) -> Expr {
    PRATT
        .map_primary(postfix)
        .map_prefix(|op, rhs| {
            let span = Span { start: span(&op).start, end: rhs.span.end };
            Expr { kind: ExprKind::Neg(Box::new(rhs)), span }
        })
        .map_infix(|lhs, op, rhs| {
            let op = match op.as_rule() {
                Rule::add => BinOp::Add,
                Rule::sub => BinOp::Sub,
                Rule::mul => BinOp::Mul,
                Rule::div => BinOp::Div,
                Rule::matmul => BinOp::MatMul,
                Rule::eq => BinOp::Eq,
                Rule::ne => BinOp::Ne,
                Rule::lt => BinOp::Lt,
                Rule::le => BinOp::Le,
                Rule::gt => BinOp::Gt,
                Rule::ge => BinOp::Ge,
                other => unreachable!("not an operator: {other:?}"),
            };
            let span = Span { start: lhs.span.start, end: rhs.span.end };
            Expr { kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)), span }
        })
        .parse(p.into_inner())
}

fn postfix(p: Pair<Rule>) -> Expr {
    let mut it = p.into_inner();
    let mut e = atom(it.next().expect("atom"));
    for index in it {
        let sp = Span { start: e.span.start, end: span(&index).end };
        let i = expr(index.into_inner().next().expect("index expression"));
        e = Expr { kind: ExprKind::Index(Box::new(e), Box::new(i)), span: sp };
    }
    e
}

fn string_value(p: Pair<Rule>) -> String {
    p.into_inner().next().map(|s| s.as_str().to_string()).unwrap_or_default()
}

fn atom(p: Pair<Rule>) -> Expr {
    let sp = span(&p);
    let kind = match p.as_rule() {
        Rule::number => {
            let s = p.as_str();
            match s.parse::<i64>() {
                Ok(i) => ExprKind::Int(i),
                Err(_) => ExprKind::Float(s.parse().unwrap_or(f64::NAN)),
            }
        }
        Rule::string => ExprKind::Str(string_value(p)),
        Rule::boolean => ExprKind::Bool(p.as_str() == "true"),
        Rule::ident => ExprKind::Name(p.as_str().to_string()),
        Rule::expr => return expr(p),
        Rule::list => ExprKind::List(p.into_inner().map(expr).collect()),
        Rule::param => {
            let mut it = p.into_inner();
            let name = it.next().expect("param name");
            let path = match name.as_rule() {
                Rule::string => string_value(name),
                _ => name.as_str().to_string(),
            };
            ExprKind::Param { path, dims: it.map(expr).collect() }
        }
        Rule::call => {
            let mut it = p.into_inner();
            let callee = ident(it.next().expect("callee"));
            let (mut args, mut kwargs) = (vec![], vec![]);
            for a in it.next().expect("args").into_inner() {
                if a.as_rule() == Rule::kwarg {
                    let mut kv = a.into_inner();
                    kwargs.push((ident(kv.next().expect("key")), expr(kv.next().expect("value"))));
                } else {
                    args.push(expr(a));
                }
            }
            let scope = it.next().map(|s| {
                let sp = span(&s);
                (string_value(s), sp)
            });
            ExprKind::Call { callee, args, kwargs, scope }
        }
        other => unreachable!("not an atom: {other:?}"),
    };
    Expr { kind, span: sp }
}
