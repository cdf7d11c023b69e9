//! What every family needs to address layers by name: `--override` patterns (globs over
//! layer names, each of which must match), and kinds (the same projection in every block,
//! `blk.*.attn_q`), which per-kind measurements group by. The layers themselves are the
//! IR's table (`kiln_ir::LayerTable`, `graph.layers`). [`read_by_linears`] finds the
//! layers whose matrix a family may rewrite.

use kiln_ir::{Graph, Layer, NodeId, Op, WeightRef};

/// The value each layer gets from `overrides` (`(pattern, value)` in the order given; a
/// later pattern wins where two match), for layers named `names`. A pattern that matches no
/// layer is an error naming a few layer names: an override is never skipped silently.
pub fn apply_overrides<T: Copy>(names: &[&str], overrides: &[(String, T)]) -> Result<Vec<Option<T>>, String> {
    let mut fixed = vec![None; names.len()];
    for (pattern, value) in overrides {
        let mut matched = false;
        for (slot, name) in fixed.iter_mut().zip(names) {
            if glob(pattern, name) {
                *slot = Some(*value);
                matched = true;
            }
        }
        if !matched {
            let examples: Vec<&str> = names.iter().take(3).copied().collect();
            return Err(format!(
                "--override `{pattern}` matches no layer (layer scopes look like {})",
                examples.join(", ")
            ));
        }
    }
    Ok(fixed)
}

/// Glob match: `*` any run of characters (dots included), `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A kind of layer: a scope with its numeric components as `*` (`blk.*.attn_q`), so that
/// the same projection in every block is one kind.
pub fn kind_of(scope: &str) -> String {
    let parts: Vec<&str> =
        scope.split('.').map(|c| if c.bytes().all(|b| b.is_ascii_digit()) { "*" } else { c }).collect();
    parts.join(".")
}

/// A layer whose main weight is a matrix that only linears read, as their weight.
pub struct ReadByLinears<'g> {
    pub name: &'g str,
    pub layer: &'g Layer,
    pub weight: NodeId,
    pub w: &'g WeightRef,
    pub linears: Vec<NodeId>,
    pub rows: u64,
    pub cols: u64,
}

/// The layers whose main weight is a matrix of known shape that only linears read (as
/// their weight), in name order: what the families that rewrite a layer's matrix may take.
/// Also a note naming the layers whose main weight something else reads too (a tied
/// embedding gathered by rows and read by the head, an output), which they leave alone.
pub fn read_by_linears(graph: &Graph) -> (Vec<ReadByLinears<'_>>, Option<String>) {
    let (mut out, mut by_rows) = (Vec::new(), Vec::new());
    for (name, layer) in graph.layers.iter() {
        let Some(weight) = layer.main() else { continue };
        let Op::Weight(w) = &graph.node(weight).op else { continue };
        let users = graph.users(weight);
        let linears: Vec<NodeId> = users
            .iter()
            .copied()
            .filter(|&u| matches!(graph.node(u).op, Op::Linear { .. }) && graph.operands(u)[1] == weight)
            .collect();
        if linears.is_empty() {
            continue;
        }
        if linears.len() != users.len() || graph.outputs().iter().any(|(_, o)| *o == weight) {
            by_rows.push(name);
            continue;
        }
        let Some(&[rows, cols]) = graph.node(weight).ty.known_shape().as_deref() else { continue };
        out.push(ReadByLinears { name, layer, weight, w, linears, rows, cols });
    }
    let note = (!by_rows.is_empty())
        .then(|| format!("left as they are (also read by rows or as an output): {}", by_rows.join(", ")));
    (out, note)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_replace_block_indices() {
        assert_eq!(kind_of("blk.12.ffn_down"), "blk.*.ffn_down");
        assert_eq!(kind_of("encoder.layer.3.attention.self.query"), "encoder.layer.*.attention.self.query");
        assert_eq!(kind_of("token_embd"), "token_embd");
    }

    #[test]
    fn globs_match_whole_scopes() {
        assert!(glob("blk.0.*", "blk.0.attn_q"));
        assert!(!glob("blk.0.*", "blk.10.attn_q"));
        assert!(glob("*attn_?", "blk.3.attn_q"));
        assert!(!glob("attn", "blk.3.attn_q"));
    }

    /// Later patterns win; a pattern that matches nothing is an error, not a no-op.
    #[test]
    fn overrides_are_applied_in_order_and_never_skipped() {
        let names = ["blk.0.q", "blk.0.k", "blk.1.q"];
        let o = |p: &str, v: u8| (p.to_string(), v);
        let fixed = apply_overrides(&names, &[o("blk.0.*", 1), o("*.q", 2)]).unwrap();
        assert_eq!(fixed, [Some(2), Some(1), Some(2)]);
        let err = apply_overrides(&names, &[o("blk.0.*", 1), o("head", 3)]).unwrap_err();
        assert!(err.contains("`head` matches no layer") && err.contains("blk.0.q"), "{err}");
    }
}
