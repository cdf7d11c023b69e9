//! The JIT engine against the interpreter (the oracle), and its determinism rules: the
//! same bits for any thread count, and for a sequence alone or inside a batch.

use kiln_rt::Value;
use kiln_tests::*;
use std::collections::HashMap;

fn tiny() -> kiln_ir::Graph {
    let dir = temp_dir("jit-tiny");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 3);
    compile_bound("tiny/tiny.kiln", &weights).0
}

fn feed(rows: &[&[i64]]) -> HashMap<String, Value> {
    let mask: Vec<Vec<i64>> = rows.iter().map(|r| vec![1; r.len()]).collect();
    let mask: Vec<&[i64]> = mask.iter().map(|r| r.as_slice()).collect();
    [("input_ids".to_string(), ids(rows)), ("attention_mask".to_string(), ids(&mask))].into()
}

fn f32s(outputs: &[(String, Value)], name: &str) -> Vec<f32> {
    let (_, v) = outputs.iter().find(|(n, _)| n == name).expect("output present");
    v.as_f32().expect("f32").data.clone()
}

const ROWS: [&[i64]; 3] = [&[3, 1, 4, 1, 5, 9, 2], &[6, 5, 3, 5, 8, 9, 7], &[9, 3, 2, 3, 8, 4, 6]];

#[test]
fn jit_matches_the_interpreter_on_the_tiny_model() {
    let g = tiny();
    let engine = Prepared::new(&g, Exec::Jit { threads: 2 });
    if let Prepared::Jit(e) = &engine {
        let linears = g.node_ids().filter(|&n| g.node(n).op == kiln_ir::Op::Linear).count();
        assert_eq!(linears, 13, "4 attention linears per layer, a gated and a plain MLP");
        assert_eq!(e.compiled_linears(), linears, "every linear runs compiled");
    }
    let inputs = feed(&ROWS);
    let (got, want) = (engine.run(&inputs), Prepared::new(&g, Exec::Interp).run(&inputs));
    for name in ["logits", "hidden"] {
        let (a, b) = (f32s(&got, name), f32s(&want, name));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max diff {diff} (scale {scale})");
    }
}

#[test]
fn jit_outputs_do_not_depend_on_the_thread_count() {
    let g = tiny();
    let inputs = feed(&ROWS);
    let one = Prepared::new(&g, Exec::Jit { threads: 1 }).run(&inputs);
    for threads in [2, 3] {
        assert_eq!(one, Prepared::new(&g, Exec::Jit { threads }).run(&inputs), "threads = {threads}");
    }
}

#[test]
fn jit_sequence_alone_equals_the_same_sequence_in_a_batch() {
    let g = tiny();
    let engine = Prepared::new(&g, Exec::Jit { threads: 2 });
    let batch = engine.run(&feed(&ROWS));
    let logits = f32s(&batch, "logits");
    let per_row = logits.len() / ROWS.len();
    for (i, row) in ROWS.iter().enumerate() {
        let alone = f32s(&engine.run(&feed(&[row])), "logits");
        assert!(alone == logits[i * per_row..(i + 1) * per_row], "row {i} differs inside the batch");
    }
}
