//! The reference interpreter on whole graphs: hand-written IR with hand-computed results,
//! run-time errors on bad inputs, and properties of the tiny model that a broken mask,
//! a broken causal rule or a broken batch would violate.

use kiln_interp::{Interpreter, Tensor, Value};
use kiln_ir::{TensorData, parse};
use kiln_tests::*;
use std::collections::HashMap;

fn f32v(shape: &[usize], data: &[f32]) -> Value {
    Value::F32(Tensor::new(shape.to_vec(), data.to_vec()))
}

fn inputs(pairs: &[(&str, Value)]) -> HashMap<String, Value> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

const LINEAR_GELU: &str = r#"graph g {
  %0 = input "x" : f32[n, 2]
  %1 = weight "w" f32 : f32[3, 2] @fc
  %2 = weight "b" f32 : f32[3] @fc
  %3 = linear %0, %1, %2 : f32[n, 3] @fc
  %4 = gelu %3 : f32[n, 3]
  output "y" = %4
}
"#;

fn linear_gelu() -> kiln_ir::Graph {
    let mut g = parse(LINEAR_GELU).unwrap();
    g.store.insert("w", TensorData::from_f32(vec![3, 2], &[1.0, 0.0, 0.0, 1.0, 1.0, -1.0]));
    g.store.insert("b", TensorData::from_f32(vec![3], &[0.0, 0.0, 1.0]));
    kiln_ir::verify(&g).unwrap();
    g
}

#[test]
fn hand_written_ir_computes_hand_computed_values() {
    let g = linear_gelu();
    let out = Interpreter::new(&g).unwrap().run(&inputs(&[("x", f32v(&[1, 2], &[1.0, -2.0]))])).unwrap();
    // linear: [1, -2, 1 + 2 + 1] = [1, -2, 4]; gelu(x) = x * Phi(x)
    let y = out[0].1.as_f32().unwrap();
    let want = [0.8413447460685429f64, -0.04550026389635842, 3.9998733660643475];
    for (a, b) in y.data.iter().zip(want) {
        assert!((*a as f64 - b).abs() < 1e-6, "{a} vs {b}");
    }
}

#[test]
fn bad_inputs_are_errors_naming_the_input() {
    let g = linear_gelu();
    let interp = Interpreter::new(&g).unwrap();
    let err = |i: HashMap<String, Value>| interp.run(&i).unwrap_err().to_string();
    assert_eq!(err(HashMap::new()), "missing input `x` (f32[n, 2])");
    assert_eq!(err(inputs(&[("x", f32v(&[1, 3], &[0.0; 3]))])), "input `x`: expected f32[n, 2], got size 3 on axis 1");
    assert_eq!(
        err(inputs(&[("x", Value::I64 { shape: vec![1, 2], data: vec![0, 0] })])),
        "input `x`: expected f32[n, 2], got i64[1, 2]"
    );
}

#[test]
fn unbound_weights_are_reported_by_name() {
    let g = parse(LINEAR_GELU).unwrap();
    let err = Interpreter::new(&g).err().expect("no weights bound").to_string();
    assert!(err.starts_with("weight `"), "{err}");
    assert!(err.contains("not bound to a checkpoint"), "{err}");
}

fn tiny() -> kiln_ir::Graph {
    let dir = temp_dir("interp-tiny");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 1);
    compile_bound("tiny/tiny.kiln", &weights).0
}

fn logits_at(out: &HashMap<String, Value>, row: usize, pos: usize) -> Vec<f32> {
    let t = out["logits"].as_f32().unwrap();
    let (s, v) = (t.shape[1], t.shape[2]);
    t.data[(row * s + pos) * v..(row * s + pos + 1) * v].to_vec()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn symbols_must_agree_across_inputs() {
    let g = tiny();
    let interp = Interpreter::new(&g).unwrap();
    let err = interp
        .run(&inputs(&[("input_ids", ids(&[&[1, 2, 3]])), ("attention_mask", ids(&[&[1, 1, 1, 1]]))]))
        .unwrap_err()
        .to_string();
    assert_eq!(err, "input `attention_mask`: `seq` is 3 from an earlier input, but this one has 4 on axis 1");
}

#[test]
fn out_of_range_token_is_an_error() {
    let g = tiny();
    let err = Interpreter::new(&g)
        .unwrap()
        .run(&inputs(&[("input_ids", ids(&[&[1, 32]])), ("attention_mask", ids(&[&[1, 1]]))]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("id 32 is out of range for a table with 32 rows"), "{err}");
}

#[test]
fn padding_and_batching_do_not_change_a_sequence() {
    let g = tiny();
    let alone = run(&g, &[("input_ids", ids(&[&[3, 1, 4, 1, 5]])), ("attention_mask", ids(&[&[1, 1, 1, 1, 1]]))]);
    // The same sequence padded to 7 with garbage ids, next to another sequence.
    let batch = run(
        &g,
        &[
            ("input_ids", ids(&[&[2, 7, 1, 8, 2, 8, 1], &[3, 1, 4, 1, 5, 9, 9]])),
            ("attention_mask", ids(&[&[1, 1, 1, 1, 1, 1, 1], &[1, 1, 1, 1, 1, 0, 0]])),
        ],
    );
    for pos in 0..5 {
        let d = max_diff(&logits_at(&alone, 0, pos), &logits_at(&batch, 1, pos));
        assert!(d < 1e-5, "position {pos} differs by {d}");
    }
}

#[test]
fn the_key_mask_hides_tokens() {
    // Masking key 2 must change what position 4 sees, and nothing before position 2.
    let g = tiny();
    let seq = [&[3i64, 1, 4, 1, 5][..]];
    let full = run(&g, &[("input_ids", ids(&seq)), ("attention_mask", ids(&[&[1, 1, 1, 1, 1]]))]);
    let masked = run(&g, &[("input_ids", ids(&seq)), ("attention_mask", ids(&[&[1, 1, 0, 1, 1]]))]);
    assert!(max_diff(&logits_at(&full, 0, 4), &logits_at(&masked, 0, 4)) > 1e-4);
    assert_eq!(logits_at(&full, 0, 1), logits_at(&masked, 0, 1), "positions before the mask see no change");
}

#[test]
fn attention_is_causal() {
    let g = tiny();
    let mask = ids(&[&[1, 1, 1, 1, 1]]);
    let a = run(&g, &[("input_ids", ids(&[&[3, 1, 4, 1, 5]])), ("attention_mask", mask.clone())]);
    let b = run(&g, &[("input_ids", ids(&[&[3, 1, 4, 1, 9]])), ("attention_mask", mask)]);
    for pos in 0..4 {
        assert_eq!(logits_at(&a, 0, pos), logits_at(&b, 0, pos), "position {pos} saw the future");
    }
    assert!(max_diff(&logits_at(&a, 0, 4), &logits_at(&b, 0, 4)) > 1e-4, "the last position must change");
}

#[test]
fn runs_are_deterministic() {
    let g = tiny();
    let feed = [("input_ids", ids(&[&[3, 1, 4, 1, 5]])), ("attention_mask", ids(&[&[1, 1, 1, 1, 1]]))];
    assert_eq!(run(&g, &feed), run(&g, &feed));
}
