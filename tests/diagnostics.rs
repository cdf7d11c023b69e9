//! Compiler-style diagnostics, pinned: every broken spec below is rendered as the CLI
//! shows it (`file:line:col`, the source line, a caret, a label and a help) and
//! snapshotted. Each case also states, by hand, the `line:col` the diagnostic must point
//! at, so a test fails on a wrong location even if its snapshot were accepted blindly.
//! Review with `cargo insta review` (or read the `.snap.new` files).

use kiln_frontend::{Checkpoint, Diagnostic};
use kiln_tests::*;

/// The diagnostic `source` fails to compile with.
fn diagnose(source: &str, checkpoint: Option<&Checkpoint>) -> Diagnostic {
    match kiln_frontend::compile(source, checkpoint) {
        Ok(_) => panic!("expected a diagnostic, but the spec compiles:\n{source}"),
        Err(d) => d,
    }
}

/// Checks where the diagnostic points and pins its rendering.
fn check(name: &str, source: &str, checkpoint: Option<&Checkpoint>, at: (usize, usize)) {
    let d = diagnose(source, checkpoint);
    assert_eq!(d.line_col(source), at, "{name}: wrong location for `{}`", d.message);
    insta::assert_snapshot!(name, render(d, &format!("{name}.kiln"), source));
}

/// `examples/tiny/tiny.kiln` with one edit (`from` must occur exactly once).
fn tiny_edited(from: &str, to: &str) -> String {
    let tiny = read_spec("tiny/tiny.kiln");
    assert_eq!(tiny.matches(from).count(), 1, "`{from}` must occur once in tiny.kiln");
    tiny.replace(from, to)
}

/// The tiny model's checkpoint (random weights), written into a fresh directory.
fn tiny_checkpoint(test: &str) -> Checkpoint {
    let path = temp_dir(test).join("tiny.safetensors");
    write_tiny_checkpoint(&path, 1);
    kiln_frontend::checkpoint::load(&path).expect("tiny checkpoint loads")
}

/// One test per case: `name at (line, col): source;`, compiled without a checkpoint.
macro_rules! cases {
    ($($(#[$doc:meta])* $name:ident at ($line:literal, $col:literal): $source:expr;)*) => {
        $(
            $(#[$doc])*
            #[test]
            fn $name() {
                check(stringify!($name), $source, None, ($line, $col));
            }
        )*
    };
}

cases! {
    // ---- syntax ----

    /// A call's `)` is missing.
    syntax_missing_close_paren at (3, 13): "\
model tiny
input x: f32[batch, 16]
let h = relu(x
output y: f32[batch, 16] = h
";

    /// The file does not start with `model NAME`.
    syntax_missing_model_header at (1, 1): "\
input x: f32[batch, 16]
output y: f32[batch, 16] = relu(x)
";

    /// A stray `;` after a statement.
    syntax_stray_token at (2, 16): "\
model tiny
let hidden = 16;
input x: f32[batch, hidden]
output y: f32[batch, hidden] = relu(x)
";

    /// A scope string that is not closed before the end of the line.
    syntax_unterminated_string at (3, 49): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 16] = Linear(x, 16, 16) as \"proj
";

    /// `let` without `=`.
    syntax_let_without_equals at (2, 12): "\
model tiny
let hidden 16
input x: f32[batch, hidden]
output y: f32[batch, hidden] = relu(x)
";

    // ---- names, blocks and arguments ----

    /// A misspelled config value: the help suggests the defined one.
    unknown_name at (4, 50): "\
model tiny
let hidden = 16
input x: f32[batch, hidden]
output y: f32[batch, hidden] = Linear(x, hidden, hiden) as \"proj\"
";

    /// A misspelled prelude block: the help lists what exists.
    unknown_block at (3, 28): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 16] = Lienar(x, 16, 16) as \"proj\"
";

    /// A builtin given more positional arguments than it has parameters.
    builtin_too_many_arguments at (3, 36): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 16] = relu(x, 2)
";

    /// A builtin given a keyword argument it does not have.
    builtin_unknown_keyword at (3, 39): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 16] = softmax(x, dim = -1)
";

    /// A builtin called without a required argument.
    builtin_missing_argument at (3, 35): "\
model tiny
input x: f32[batch, seq, 16]
output y: f32[batch, seq, 4, 4] = reshape(x)
";

    /// A user block given more positional arguments than it has parameters.
    block_too_many_arguments at (8, 39): "\
model tiny
input x: f32[batch, 16]

block Mlp(x, width) {
    return Linear(relu(Linear(x, 16, width) as \"up\"), width, 16) as \"down\"
}

output y: f32[batch, 16] = Mlp(x, 16, 64) as \"mlp\"
";

    /// A prelude block called without a required argument.
    block_missing_argument at (3, 27): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 8] = Linear(x, 16) as \"proj\"
";

    /// A prelude block given a keyword argument it does not have.
    block_unknown_keyword at (3, 44): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 8] = Linear(x, 16, 8, use_bias = false) as \"proj\"
";

    /// A user block may not replace a builtin the prelude is built on.
    block_shadows_builtin at (3, 7): "\
model tiny
input x: f32[batch, 16]
block gather(t, i) {
    return t
}
output y: f32[batch, 16] = x
";

    /// The same block defined twice.
    duplicate_block at (8, 7): "\
model tiny
input x: f32[batch, 16]

block Mlp(x) {
    return relu(x)
}

block Mlp(x) {
    return gelu(x)
}

output y: f32[batch, 16] = Mlp(x)
";

    /// A block that calls itself unconditionally.
    recursion_depth at (5, 12): "\
model tiny
input x: f32[batch, 16]

block Deep(x) {
    return Deep(relu(x))
}

output y: f32[batch, 16] = Deep(x)
";

    // ---- shapes ----

    /// `linear` whose weight's in dimension is not the input's width.
    shape_linear_width at (3, 27): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 8] = linear(x, param w[8, 32])
";

    /// `reshape` to a shape with a different element count.
    shape_reshape_element_count at (4, 35): "\
model tiny
let hidden = 16
input x: f32[batch, seq, hidden]
output y: f32[batch, seq, 3, 5] = reshape(x, [batch, seq, 3, 5])
";

    /// Query heads that are not a multiple of the key/value heads.
    shape_attention_heads at (4, 35): "\
model tiny
input q: f32[batch, 4, seq, 8]
input k: f32[batch, 3, seq, 8]
output y: f32[batch, 4, seq, 8] = attention(q, k, k)
";

    /// `+` on shapes that do not broadcast.
    shape_broadcast at (3, 28): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 16] = x + param bias[8]
";

    /// A wrong `d_in` for the prelude's `Linear`: reported at the user's call, not inside
    /// the prelude.
    shape_in_prelude_block at (3, 27): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 8] = Linear(x, 32, 8) as \"proj\"
";

    /// The computed output type differs from the declared one.
    output_type_mismatch at (3, 27): "\
model tiny
input x: f32[batch, 16]
output y: f32[batch, 8] = relu(x)
";

    /// A parameter shape that uses an input's symbolic dimension.
    symbolic_param_dim at (3, 47): "\
model tiny
input x: f32[batch, seq, 16]
output y: f32[batch, seq, 16] = x + param pos[seq, 16]
";

    // ---- evaluation ----

    /// A list indexed past its end.
    list_index_out_of_range at (4, 46): "\
model tiny
let ffn = [24, 40]
input x: f32[batch, 16]
output y: f32[batch, 16] = Linear(x, 16, ffn[2]) as \"up\"
";

    /// Assigning a variable that was never declared with `let`.
    assign_undeclared at (3, 1): "\
model tiny
input x: f32[batch, 16]
h = relu(x)
output y: f32[batch, 16] = h
";

    /// An `if` on an integer.
    non_boolean_condition at (6, 8): "\
model tiny
let gated = 1
input x: f32[batch, 16]

block Mlp(x) {
    if gated {
        return silu(x)
    }
    return gelu(x)
}

output y: f32[batch, 16] = Mlp(x)
";

    /// A model without `output`.
    no_outputs at (1, 7): "\
model tiny
input x: f32[batch, 16]
let h = relu(x)
";
}

// ---- against a checkpoint ----

/// A parameter whose declared shape disagrees with the checkpoint: layer 1's MLP width
/// is changed from 40 to 48. The parameter is inside the prelude's `Linear`, so the
/// diagnostic points at the user's call of it (tiny.kiln line 40).
#[test]
fn checkpoint_shape_mismatch() {
    let ck = tiny_checkpoint("diag-shape-mismatch");
    let source = tiny_edited("let ffn = [24, 40]", "let ffn = [24, 48]");
    check("checkpoint_shape_mismatch", &source, Some(&ck), (40, 24));
    let message = diagnose(&source, Some(&ck)).message;
    for part in ["layers.1.mlp.up.weight", "[48, 16]", "[40, 16]"] {
        assert!(message.contains(part), "`{part}` missing from: {message}");
    }
}

/// A misspelled tensor name: the checkpoint has `embed.weight`, which is suggested.
#[test]
fn checkpoint_missing_tensor() {
    let ck = tiny_checkpoint("diag-missing-tensor");
    let source = tiny_edited("param embed.weight[", "param embed.weights[");
    check("checkpoint_missing_tensor", &source, Some(&ck), (54, 55));
    let d = diagnose(&source, Some(&ck));
    let text = format!("{} {}", d.message, d.help.unwrap_or_default());
    for part in ["embed.weights", "did you mean `embed.weight`"] {
        assert!(text.contains(part), "`{part}` missing from: {text}");
    }
}

/// The unedited tiny spec compiles against its checkpoint (the edits above are the only
/// faults).
#[test]
fn tiny_compiles_against_its_checkpoint() {
    let ck = tiny_checkpoint("diag-tiny-ok");
    if let Err(d) = kiln_frontend::compile(&read_spec("tiny/tiny.kiln"), Some(&ck)) {
        panic!("{}", render(d, "tiny.kiln", &read_spec("tiny/tiny.kiln")));
    }
}
