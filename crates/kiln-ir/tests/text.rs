//! The IR text form: hand-written IR in, printed IR out, and the verifier's verdicts.

use kiln_ir::{Activations, Dim, LayerTable, Op, Role, parse, print, verify};

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
  layer "embed" = main %2
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
        "2:19: unknown weight format `q9` (expected f32, f16, bf16, q8_0, q4_0, q4_1, intBgG[a]: B bits in 2, 3, 4, 8, groups of G (a multiple of 32), `a` for asymmetric, e.g. int4g64a, or fp8gG: e4m3 floats in groups of G; u8 for the bitmasks of sparse weights)"
    );
    assert_eq!(
        err("graph g {\n  %0 = weight \"w\" int4g48 : f32[4, 48]\n}\n"),
        "2:19: `int4g48`: the group must be a positive multiple of 32"
    );
}

/// A tied embedding (gathered and read by the head), a linear with a LoRC correction, and
/// a weight in the top-level scope.
const LAYERS: &str = r#"graph toy {
  %0 = input "ids" : i64[b, s]
  %1 = weight "embd" f32 : f32[16, 8] @embd
  %2 = gather %1, %0 : f32[b, s, 8] @embd
  %3 = weight "up" f32 : f32[12, 8] @blk.0.up
  %4 = linear %2, %3 : f32[b, s, 12] @blk.0.up
  %5 = weight "up.lorc_a" f32 : f32[12, 2] @blk.0.up
  %6 = weight "up.lorc_b" f32 : f32[2, 8] @blk.0.up
  %7 = linear %2, %6 : f32[b, s, 2] @blk.0.up
  %8 = linear %7, %5 : f32[b, s, 12] @blk.0.up
  %9 = add %4, %8 : f32[b, s, 12] @blk.0.up
  %10 = weight "down" f32 : f32[8, 12]
  %11 = linear %9, %10 : f32[b, s, 8]
  %12 = linear %11, %1 : f32[b, s, 16] @head
  output "logits" = %12
  layer "blk.0.up" = main %3, correction_a %5, correction_b %6
  layer "down" = main %10
  layer "embd" = main %1
}
"#;

#[test]
fn layer_lines_round_trip() {
    let g = parse(LAYERS).expect("parses");
    verify(&g).expect("verifies");
    assert_eq!(print(&g), LAYERS);
    let up = g.layers.get("blk.0.up").unwrap();
    let roles: Vec<Role> = up.weights.iter().map(|&(r, _)| r).collect();
    assert_eq!(roles, [Role::Main, Role::CorrectionA, Role::CorrectionB]);
    let names: Vec<&str> = g.layers.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["blk.0.up", "down", "embd"]);
    for role in Role::ALL {
        assert_eq!(Role::from_name(role.name()), Some(role));
    }
}

#[test]
fn text_without_layer_lines_gets_the_derived_table() {
    // Without layer lines, every matrix read by a linear or by rows is its own layer: the
    // LoRC factors of an older artifact too, named by their tensors since their scope is
    // taken. The tied embedding is one layer although two nodes read it.
    let old: String =
        LAYERS.lines().filter(|l| !l.trim_start().starts_with("layer ")).map(|l| format!("{l}\n")).collect();
    let g = parse(&old).expect("parses");
    verify(&g).expect("verifies");
    assert_eq!(g.layers, LayerTable::derive(&g));
    let order = g.topo_order().unwrap();
    let layers: Vec<(&str, Vec<(Role, usize)>)> = g
        .layers
        .iter()
        .map(|(n, l)| (n, l.weights.iter().map(|&(r, id)| (r, order.iter().position(|&o| o == id).unwrap())).collect()))
        .collect();
    assert_eq!(
        layers,
        [
            ("blk.0.up", vec![(Role::Main, 3)]),
            ("down", vec![(Role::Main, 10)]),
            ("embd", vec![(Role::Main, 1)]),
            ("up.lorc_a", vec![(Role::Main, 5)]),
            ("up.lorc_b", vec![(Role::Main, 6)]),
        ]
    );
    // ... and prints them, so the printed text round-trips.
    let printed = print(&g);
    assert!(printed.contains("  layer \"up.lorc_b\" = main %6\n"), "{printed}");
    assert_eq!(print(&parse(&printed).unwrap()), printed);
}

#[test]
fn remove_dead_drops_the_entries_of_removed_nodes() {
    // %5 and %6 are read by nothing once the correction is cut off.
    let text = LAYERS.replace("  %12 = linear %11, %1", "  %12 = linear %2, %1").replace("%9, %10", "%2, %10");
    let mut g = parse(&text).unwrap();
    g.remove_dead();
    let names: Vec<&str> = g.layers.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["embd"]);
}

#[test]
fn verifier_checks_the_layer_table() {
    let with = |layers: &str| LAYERS.replace("  layer \"down\" = main %10\n", layers);
    assert_eq!(
        verify_error(&with("  layer \"down\" = main %10, delta_a %11\n")),
        "layer \"down\": its delta_a entry %11 is a linear, not a weight"
    );
    assert_eq!(
        verify_error(&with("  layer \"down\" = main %10, main %6\n")),
        "layer \"down\": a layer has exactly one main weight (or, factorized, one lowrank_u and one lowrank_v, or two or more tt_cores, or, tied, one shared_base and at most one delta_a and delta_b), this one has 2"
    );
    assert_eq!(
        verify_error(&with("  layer \"down\" = delta_a %10\n")),
        "layer \"down\": a layer has exactly one main weight (or, factorized, one lowrank_u and one lowrank_v, or two or more tt_cores, or, tied, one shared_base and at most one delta_a and delta_b), this one has 0"
    );
    assert_eq!(
        verify_error(&with("  layer \"down\" = main %10, shared_base %10\n")),
        "layer \"down\": %10 has two roles in the layer"
    );
}

#[test]
fn layer_lines_parse_errors() {
    let err = |t: &str| parse(t).expect_err("must not parse").to_string();
    assert_eq!(
        err(&LAYERS.replace("main %10", "base %10")),
        "17:18: unknown role `base` (expected one of main, lowrank_u, lowrank_v, correction_a, correction_b, shared_base, delta_a, delta_b, tt_core, column_scale)"
    );
    assert_eq!(
        err(&LAYERS.replace("\"down\" = main %10", "\"embd\" = main %10")),
        "18:9: layer `embd` is defined twice"
    );
}

const SPARSE: &str = r#"graph sparse {
  %0 = input "x" : f32[b, 64]
  %1 = weight "up.values" int4g32 #00000000000000aa sparse 2:4 "up.mask" #00000000000000bb : f32[16, 64] @up
  %2 = linear %0, %1 : f32[b, 16] @up
  %3 = weight "down.values" f16 sparse 5:16 "down.mask" : f32[64, 16] @down
  %4 = linear %2, %3 : f32[b, 64] @down
  output "y" = %4
  layer "down" = main %3
  layer "up" = main %1
}
"#;

#[test]
fn sparse_weights_round_trip() {
    let g = parse(SPARSE).expect("parses");
    verify(&g).expect("verifies");
    assert_eq!(print(&g), SPARSE);
    let order = g.topo_order().unwrap();
    let Op::Weight(w) = &g.node(order[1]).op else { panic!("%1 is a weight") };
    let s = w.sparse.as_ref().expect("sparse");
    assert_eq!((s.n, s.m, s.mask.as_str(), s.mask_checksum), (2, 4, "up.mask", Some(0xbb)));
    let parts: Vec<(&str, &str, String, Vec<u64>)> =
        w.parts(&[16, 64]).into_iter().map(|p| (p.role, p.tensor, p.format.name(), p.shape)).collect();
    assert_eq!(
        parts,
        [("values", "up.values", "int4g32".into(), vec![16, 32]), ("mask", "up.mask", "u8".into(), vec![16, 8])]
    );
    assert_eq!(w.tensors().collect::<Vec<_>>(), ["up.values", "up.mask"]);
}

#[test]
fn verifier_checks_sparse_weights() {
    let with = |from: &str, to: &str| {
        assert!(SPARSE.contains(from), "{from}");
        verify_error(&SPARSE.replace(from, to))
    };
    // 3:4 keeps 48 of 64 values per row: not a whole number of int4g32 blocks.
    assert_eq!(
        with("sparse 2:4", "sparse 3:4"),
        "%1 (weight @up): int4g32 stores blocks of 32 values, which must divide the rows of [16, 48]"
    );
    assert_eq!(
        with("sparse 2:4", "sparse 4:4"),
        "%1 (weight @up): sparsity 4:4 over rows of 64: n must be at least 1 and less than m"
    );
    assert_eq!(
        with("sparse 5:16", "sparse 5:12"),
        "%3 (weight @down): sparsity 5:12 over rows of 16: m must divide the row"
    );
    assert_eq!(
        with("\"down.values\" f16", "\"down.values\" u8"),
        "%3 (weight @down): u8 stores the masks of sparse weights, not a weight's values"
    );
}

/// A sparse weight's value is its dense matrix, read from the values and the mask.
#[test]
fn a_sparse_weight_means_its_dense_matrix() {
    use kiln_ir::{Bytes, Format, TensorData};
    let text = "graph g {\n  %0 = weight \"w\" f32 sparse 2:4 \"w.mask\" : f32[2, 8]\n  output \"y\" = %0\n}\n";
    let mut g = parse(text).unwrap();
    let values: Vec<f32> = (1..=8).map(|v| v as f32).collect();
    g.store.insert("w", TensorData::from_f32(vec![2, 4], &values));
    let mask = TensorData::new(Format::U8, vec![2, 1], Bytes::from_vec(vec![0b1001_0011, 0b0110_1000])).unwrap();
    g.store.insert("w.mask", mask);
    verify(&g).expect("verifies");
    let Op::Weight(w) = g.node(g.topo_order().unwrap()[0]).op.clone() else { panic!() };
    let dense = w.value(&g.store, &[2, 8]).unwrap();
    // Row 1's first group stores one value: its second slot (6) is never read.
    assert_eq!(dense, [1.0, 2.0, 0.0, 0.0, 3.0, 0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 5.0, 0.0, 7.0, 8.0, 0.0]);
    // A mask stored with the wrong shape is refused by the verifier and by `value`.
    let bad = TensorData::new(Format::U8, vec![1, 2], Bytes::from_vec(vec![0, 0])).unwrap();
    g.store.insert("w.mask", bad);
    let err = verify(&g).unwrap_err().to_string();
    assert!(err.contains("tensor `w.mask` is stored as u8 [1, 2]; the weight's mask must be u8 [2, 1]"), "{err}");
    assert!(w.value(&g.store, &[2, 8]).is_err());
}

/// A linear's activations print as an attribute when not f32 (so graphs without int8
/// activations print as before) and parse back; names are exactly `Activations`'.
#[test]
fn linear_activations_round_trip() {
    let text = r#"graph w8a8 {
  %0 = input "x" : f32[batch, 64]
  %1 = weight "up.weight" q4_1 : f32[128, 64] @up
  %2 = linear %0, %1 {activations = int8} : f32[batch, 128] @up
  %3 = weight "down.weight" int8g128 : f32[64, 128] @down
  %4 = linear %2, %3 {activations = int8-row} : f32[batch, 64] @down
  %5 = weight "head.weight" f16 : f32[8, 64] @head
  %6 = linear %4, %5 : f32[batch, 8] @head
  output "y" = %6
  layer "down" = main %3
  layer "head" = main %5
  layer "up" = main %1
}
"#;
    let g = parse(text).expect("parses");
    verify(&g).expect("verifies");
    assert_eq!(print(&g), text);
    let order = g.topo_order().unwrap();
    let activations = |i: usize| match g.node(order[i]).op {
        Op::Linear { activations } => activations,
        ref op => panic!("%{i} is {op:?}"),
    };
    assert_eq!(
        [activations(2), activations(4), activations(6)],
        [Activations::Int8, Activations::Int8Row, Activations::F32]
    );
    // f32 may be written; it prints as nothing.
    let explicit = text.replace("%6 = linear %4, %5 :", "%6 = linear %4, %5 {activations = f32} :");
    assert_eq!(print(&parse(&explicit).unwrap()), text);
    // Any other name is an error at the value, naming the accepted ones.
    for bad in ["int8-block", "int8_row", "int4", "INT8"] {
        let err = parse(&text.replace("{activations = int8}", &format!("{{activations = {bad}}}"))).unwrap_err();
        assert_eq!(err.line, 4, "{bad}: {err}");
        assert!(err.message.contains("f32, int8 or int8-row"), "{bad}: {err}");
    }
    // Other ops do not take it.
    let err = parse(&text.replace("%6 = linear %4, %5 :", "%6 = linear %4, %5 {axis = 1} :")).unwrap_err();
    assert!(err.message.contains("it takes: activations"), "{err}");
}

/// `set_activations` applies a mode by the rule of `Activations::for_weight`, per linear:
/// every f32, f16, bf16 or fp8 weight's linear stays f32.
#[test]
fn set_activations_follows_each_weight() {
    let text = r#"graph g {
  %0 = input "x" : f32[batch, 64]
  %1 = weight "a" q8_0 : f32[64, 64] @a
  %2 = linear %0, %1 : f32[batch, 64] @a
  %3 = weight "b" int8g64 : f32[64, 64] @b
  %4 = linear %2, %3 : f32[batch, 64] @b
  %5 = weight "c" fp8g64 : f32[64, 64] @c
  %6 = linear %4, %5 : f32[batch, 64] @c
  %7 = weight "d" f32 : f32[64, 64] @d
  %8 = linear %6, %7 : f32[batch, 64] @d
  output "y" = %8
  layer "a" = main %1
  layer "b" = main %3
  layer "c" = main %5
  layer "d" = main %7
}
"#;
    let mut g = parse(text).unwrap();
    assert_eq!(g.activations(), Activations::F32);
    assert_eq!(kiln_ir::set_activations(&mut g, Activations::Int8Row), 2);
    verify(&g).unwrap();
    let printed = print(&g);
    assert!(printed.contains("%2 = linear %0, %1 {activations = int8} :"), "{printed}");
    assert!(printed.contains("%4 = linear %2, %3 {activations = int8-row} :"), "{printed}");
    assert!(printed.contains("%6 = linear %4, %5 : "), "{printed}");
    assert!(printed.contains("%8 = linear %6, %7 : "), "{printed}");
    assert_eq!(g.activations(), Activations::Int8Row);
    assert_eq!(kiln_ir::set_activations(&mut g, Activations::Int8), 2);
    assert!(print(&g).contains("%4 = linear %2, %3 {activations = int8} :"));
    assert_eq!(g.activations(), Activations::Int8);
    assert_eq!(kiln_ir::set_activations(&mut g, Activations::F32), 0);
    assert_eq!(print(&g), text);
}

/// `Graph::add_sparse_weight` stores `NAME.values` and `NAME.mask` with their checksums
/// under one weight node that verifies and means the packed matrix; wrong sizes and
/// patterns the rows cannot take are errors that store nothing.
#[test]
fn add_sparse_weight_stores_values_and_mask() {
    use kiln_ir::{Format, Graph, TensorData};
    let dense: Vec<f32> = (1..=16).map(|v| v as f32).collect();
    let keep: Vec<bool> = (0..16).map(|i| i % 4 == 1 || i % 4 == 2).collect();
    let (values, mask) = kiln_ir::sparse::pack(2, 4, 2, 8, &dense, &keep).unwrap();
    let mut g = Graph::new("g");
    let data = TensorData::from_f32(vec![2, 4], &values);
    let id = g.add_sparse_weight("w", (2, 4), 2, 8, data, mask.clone(), "l").unwrap();
    g.set_output("y", id).unwrap();
    verify(&g).expect("verifies");
    let Op::Weight(w) = &g.node(id).op else { panic!("a weight") };
    let s = w.sparse.as_ref().unwrap();
    assert_eq!((w.tensor.as_str(), s.mask.as_str(), s.n, s.m), ("w.values", "w.mask", 2, 4));
    assert_eq!(g.store.get("w.mask").unwrap().format, Format::U8);
    assert_eq!(s.mask_checksum, Some(g.store.get("w.mask").unwrap().checksum()));
    assert_eq!(w.checksum, Some(g.store.get("w.values").unwrap().checksum()));
    let want: Vec<f32> = (0..16).map(|i| if keep[i] { dense[i] } else { 0.0 }).collect();
    assert_eq!(w.value(&g.store, &[2, 8]).unwrap(), want);
    let bad = TensorData::from_f32(vec![2, 3], &values[..6]);
    assert!(g.add_sparse_weight("v", (2, 4), 2, 8, bad, mask.clone(), "l").is_err());
    let data = TensorData::from_f32(vec![2, 4], &values);
    assert!(g.add_sparse_weight("v", (2, 4), 2, 8, data.clone(), mask[..1].to_vec(), "l").is_err());
    assert!(g.add_sparse_weight("v", (2, 3), 2, 6, data, vec![0; 2], "l").is_err());
    assert!(g.store.get("v.values").is_none() && g.store.get("v.mask").is_none());
}
