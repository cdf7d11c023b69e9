//! The IR text form: hand-written IR in, printed IR out, and the verifier's verdicts.

use kiln_ir::{Dim, Op, parse, print, verify};

const BLOCK: &str = r#"graph tiny {
  %0 = input "input_ids" : i64[batch, seq]
  %1 = input "attention_mask" : i64[batch, seq]
  %2 = weight "embed.weight" f32 #00000000deadbeef : f32[16, 8] @embed
  %3 = gather %2, %0 : f32[batch, seq, 8] @embed
  %4 = weight "norm.weight" f16 : f32[8] @norm
  %5 = rms_norm %3, %4 {eps = 1e-5} : f32[batch, seq, 8] @norm
  %6 = weight "q.weight" q4_1 : f32[8, 32] @q
  %7 = reshape %5 {shape = [batch, seq, 2, 4]} : f32[batch, seq, 2, 4] @attn
  %8 = rope %7 {theta = 10000.0, interleaved = true} : f32[batch, seq, 2, 4] @attn
  %9 = transpose %8 {perm = [0, 2, 1, 3]} : f32[batch, 2, seq, 4] @attn
  %10 = attention %9, %9, %9, %1 {causal = true, scale = 0.5} : f32[batch, 2, seq, 4] @attn
  %11 = const -inf : f32[]
  %12 = max %10, %11 : f32[batch, 2, seq, 4]
  %13 = reduce_mean %12 {axes = [1, 3], keepdim = false} : f32[batch, seq]
  %14 = cast %1 {to = f32} : f32[batch, seq]
  %15 = mul %13, %14 : f32[batch, seq]
  %16 = slice %2 {axis = 0, start = 0, end = seq} : f32[seq, 8]
  %17 = concat %16, %16 {axis = 1} : f32[seq, 16]
  %18 = softmax %17 {axis = 1} : f32[seq, 16]
  output "pooled" = %15
  output "table" = %18
}
"#;

#[test]
fn printed_text_round_trips() {
    let g = parse(BLOCK).expect("parses");
    verify(&g).expect("verifies");
    assert_eq!(print(&g), BLOCK);
    assert_eq!(g.inputs().len(), 2);
    assert_eq!(g.outputs().len(), 2);
}

#[test]
fn numbering_follows_dataflow_not_construction_order() {
    // %1 is defined after its user in creation order once re-parsed from shuffled text:
    // printing renumbers densely in topological order.
    let text = "graph g {\n  %7 = input \"x\" : f32[4]\n  %3 = exp %7 : f32[4]\n  output \"y\" = %3\n}\n";
    let g = parse(text).unwrap();
    assert_eq!(print(&g), "graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = exp %0 : f32[4]\n  output \"y\" = %1\n}\n");
}

#[test]
fn attributes_parse_into_ops() {
    let g = parse(BLOCK).unwrap();
    let order = g.topo_order().unwrap();
    assert_eq!(g.node(order[16]).op, Op::Slice { axis: 0, start: 0, end: Dim::sym("seq") });
    assert_eq!(g.node(order[5]).op, Op::RmsNorm { eps: 1e-5 });
}

fn verify_error(text: &str) -> String {
    let g = parse(text).expect("parses");
    verify(&g).expect_err("must not verify").to_string()
}

#[test]
fn verifier_rejects_wrong_result_types() {
    let text = "graph g {\n  %0 = input \"x\" : f32[4, 8]\n  %1 = weight \"w\" f32 : f32[3, 8]\n  %2 = linear %0, %1 : f32[4, 8]\n  output \"y\" = %2\n}\n";
    assert_eq!(verify_error(text), "%2 (linear): type is f32[4, 8] but the operands give f32[4, 3]");
}

#[test]
fn verifier_rejects_shape_errors() {
    let text = "graph g {\n  %0 = input \"x\" : f32[4, 8]\n  %1 = weight \"w\" f32 : f32[3, 7]\n  %2 = linear %0, %1 : f32[4, 3] @fc\n  output \"y\" = %2\n}\n";
    assert_eq!(verify_error(text), "%2 (linear @fc): input width and weight's in dimension differ: 8 vs 7");
    let text = "graph g {\n  %0 = input \"x\" : f32[batch, 8]\n  %1 = reshape %0 {shape = [seq, 8]} : f32[seq, 8]\n  output \"y\" = %1\n}\n";
    assert!(verify_error(text).contains("element counts differ"), "{}", verify_error(text));
    let text = "graph g {\n  %0 = input \"x\" : f32[b, 9, s, 4]\n  %1 = input \"k\" : f32[b, 2, s, 4]\n  %2 = attention %0, %1, %1 {causal = false, scale = 1.0} : f32[b, 9, s, 4]\n  output \"y\" = %2\n}\n";
    assert!(verify_error(text).contains("must be a known multiple"));
}

#[test]
fn verifier_rejects_graph_without_outputs_and_duplicate_inputs() {
    assert!(verify_error("graph g {\n  %0 = input \"x\" : f32[4]\n}\n").contains("no outputs"));
    let text = "graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = input \"x\" : f32[4]\n  output \"y\" = %1\n}\n";
    assert!(verify_error(text).contains("declared twice"));
}

#[test]
fn parse_errors_have_positions() {
    let err = |t: &str| parse(t).expect_err("must not parse").to_string();
    assert_eq!(err("graph g {\n  %0 = frobnicate : f32[4]\n}\n"), "2:8: unknown op `frobnicate`");
    assert_eq!(err("graph g {\n  %0 = exp %3 : f32[4]\n}\n"), "2:12: %3 is used before it is defined");
    assert_eq!(
        err("graph g {\n  %0 = input \"x\" : f32[4]\n  %1 = softmax %0 {dim = 0} : f32[4]\n}\n"),
        "3:20: unexpected attribute `dim` for softmax (it takes: axis)"
    );
    assert_eq!(err("graph g {\n  %0 = input \"x\" : f32[4]\n"), "2:1: missing closing `}` of the graph");
    assert_eq!(
        err("graph g {\n  %0 = weight \"w\" q9 : f32[4]\n}\n"),
        "2:19: unknown weight format `q9` (expected f32, f16, bf16, q8_0, q4_0, q4_1, intBgG[a]: B bits in 2, 3, 4, 8, groups of G (a multiple of 32), `a` for asymmetric, e.g. int4g64a, or fp8gG: e4m3 floats in groups of G)"
    );
    assert_eq!(
        err("graph g {\n  %0 = weight \"w\" int4g48 : f32[4, 48]\n}\n"),
        "2:19: `int4g48`: the group must be a positive multiple of 32"
    );
}
