//! `last_position` on hand-written IR: where the slice goes and what it moves past.
//! (Value checks on real graphs are in the workspace's `tests/passes.rs`.)

use kiln_passes::cleanup::last_position::last_position;

fn rewrite(ir: &str) -> String {
    let g = kiln_ir::parse(ir).expect("test IR parses");
    let out = last_position(&g, "logits", 1).expect("applies");
    kiln_ir::verify(&out).expect("the rewritten graph verifies");
    kiln_ir::print(&out)
}

/// A decoder's tail: the slice moves past the head and the final norm, and stops at the
/// residual add (a binary op of two sequences).
#[test]
fn moves_past_the_head_and_the_final_norm() {
    let ir = r#"graph lm {
  %0 = input "x" : f32[batch, seq, 8]
  %1 = input "r" : f32[batch, seq, 8]
  %2 = add %0, %1 : f32[batch, seq, 8]
  %3 = weight "norm.weight" f32 : f32[8] @norm
  %4 = rms_norm %2, %3 {eps = 1e-5} : f32[batch, seq, 8] @norm
  %5 = weight "head.weight" f32 : f32[32, 8] @head
  %6 = linear %4, %5 : f32[batch, seq, 32] @head
  output "logits" = %6
}
"#;
    insta::assert_snapshot!(rewrite(ir), @r#"
    graph lm {
      %0 = input "x" : f32[batch, seq, 8]
      %1 = input "r" : f32[batch, seq, 8]
      %2 = add %0, %1 : f32[batch, seq, 8]
      %3 = weight "norm.weight" f32 : f32[8] @norm
      %4 = weight "head.weight" f32 : f32[32, 8] @head
      %5 = slice %2 {axis = 1, start = -1, end = seq} : f32[batch, 1, 8] @norm
      %6 = rms_norm %5, %3 {eps = 1e-5} : f32[batch, 1, 8] @norm
      %7 = linear %6, %4 : f32[batch, 1, 32] @head
      output "logits" = %7
      layer "head" = main %4
    }
    "#);
}

/// A value with another user stays whole: the slice goes after it.
#[test]
fn stops_at_a_shared_value() {
    let ir = r#"graph lm {
  %0 = input "x" : f32[batch, seq, 8]
  %1 = weight "head.weight" f32 : f32[32, 8] @head
  %2 = linear %0, %1 : f32[batch, seq, 32] @head
  %3 = gelu %2 : f32[batch, seq, 32]
  output "logits" = %3
  output "hidden" = %2
}
"#;
    insta::assert_snapshot!(rewrite(ir), @r#"
    graph lm {
      %0 = input "x" : f32[batch, seq, 8]
      %1 = weight "head.weight" f32 : f32[32, 8] @head
      %2 = linear %0, %1 : f32[batch, seq, 32] @head
      %3 = slice %2 {axis = 1, start = -1, end = seq} : f32[batch, 1, 32]
      %4 = gelu %3 : f32[batch, 1, 32]
      output "logits" = %4
      output "hidden" = %2
      layer "head" = main %1
    }
    "#);
}

#[test]
fn errors_name_the_problem() {
    let g = kiln_ir::parse(
        r#"graph lm {
  %0 = input "x" : f32[batch, seq, 8]
  output "logits" = %0
}
"#,
    )
    .expect("parses");
    let err = last_position(&g, "nope", 1).expect_err("no such output");
    assert_eq!(err.to_string(), "last_position: no output `nope`");
    let err = last_position(&g, "logits", 3).expect_err("no such axis");
    assert_eq!(err.to_string(), "last_position: `logits` has no axis 3");
}
