//! The IR of every example spec, pinned: a changed snapshot is a claim about what the
//! front end emits. Review with `cargo insta review`.

use kiln_tests::*;

fn ir_of(rel: &str) -> String {
    let compiled =
        kiln_frontend::compile(&read_spec(rel), None).unwrap_or_else(|d| panic!("{}", render(d, rel, &read_spec(rel))));
    kiln_ir::print(&compiled.graph)
}

/// Printing, parsing and printing again gives the same text, and the parsed graph verifies.
fn assert_round_trips(text: &str) {
    let parsed = kiln_ir::parse(text).expect("printed IR parses");
    kiln_ir::verify(&parsed).expect("parsed IR verifies");
    assert_eq!(kiln_ir::print(&parsed), text);
}

#[test]
fn minilm_ir() {
    let ir = ir_of("minilm/minilm.kiln");
    assert_round_trips(&ir);
    insta::assert_snapshot!(ir);
}

#[test]
fn smollm2_ir() {
    let ir = ir_of("smollm2/smollm2.kiln");
    assert_round_trips(&ir);
    insta::assert_snapshot!(ir);
}

#[test]
fn tiny_ir() {
    let ir = ir_of("tiny/tiny.kiln");
    assert_round_trips(&ir);
    insta::assert_snapshot!(ir);
}

#[test]
fn bound_ir_records_formats_and_checksums() {
    let dir = temp_dir("bound-ir");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 7);
    let (graph, _) = compile_bound("tiny/tiny.kiln", &weights);
    let ir = kiln_ir::print(&graph);
    assert_round_trips(&ir);
    // Norm weights are stored as bf16, biases as f16: the IR says so, with checksums.
    let norm = ir.lines().find(|l| l.contains("\"layers.0.attn_norm.weight\"")).unwrap();
    assert!(norm.contains(" bf16 #"), "{norm}");
    let bias = ir.lines().find(|l| l.contains("\"layers.0.attn.q.bias\"")).unwrap();
    assert!(bias.contains(" f16 #"), "{bias}");
    // A different checkpoint gives different checksums.
    write_tiny_checkpoint(&weights, 8);
    let (other, _) = compile_bound("tiny/tiny.kiln", &weights);
    assert_ne!(kiln_ir::print(&other), ir);
}

#[test]
fn tied_head_is_one_weight_node() {
    let text = ir_of("smollm2/smollm2.kiln");
    let defs = text.lines().filter(|l| l.contains("weight \"token_embd.weight\"")).count();
    assert_eq!(defs, 1, "the tied embedding must be a single weight node");
    let graph = kiln_frontend::compile(&read_spec("smollm2/smollm2.kiln"), None).unwrap().graph;
    let embd = graph
        .node_ids()
        .find(|&n| matches!(&graph.node(n).op, kiln_ir::Op::Weight(w) if w.tensor == "token_embd.weight"))
        .unwrap();
    let users: Vec<&str> = graph.users(embd).iter().map(|&u| graph.node(u).op.name()).collect();
    assert_eq!(users, ["gather", "linear"]);
}
