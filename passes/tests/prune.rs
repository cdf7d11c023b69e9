//! `prune` end to end on one linear: the interpreter runs the sparse weight the pass
//! writes, and its outputs are `x W_masked^T + b` with the mask computed here, apart from
//! the pass, from the magnitudes of each row.

mod common;

use common::values;
use kiln_interp::{Interpreter, Tensor, Value};
use kiln_ir::TensorData;
use kiln_passes::{Context, PassReport, manager};
use std::collections::HashMap;

const MODEL: &str = "graph g {
  %0 = input \"x\" : f32[r, 16]
  %1 = weight \"w\" f32 : f32[24, 16] @l
  %2 = weight \"b\" f32 : f32[24] @l
  %3 = linear %0, %1, %2 : f32[r, 24] @l
  output \"y\" = %3
}
";

#[test]
fn the_interpreter_runs_the_pruned_weight_as_its_masked_matrix() {
    let (rows, cols, batch) = (24usize, 16usize, 5usize);
    let (w, bias, x) = (values(rows * cols, 1), values(rows, 2), values(batch * cols, 3));
    let mut graph = kiln_ir::parse(MODEL).expect("the test IR parses");
    graph.store.insert("w", TensorData::from_f32(vec![rows as u64, cols as u64], &w));
    graph.store.insert("b", TensorData::from_f32(vec![rows as u64], &bias));
    let calls = manager::parse("prune(sparsity=0.6, method=magnitude)").expect("the pipeline parses");
    let ctx = Context::new(None, vec![], &|_, _, _| {});
    let reports = manager::run(&mut graph, &calls, &ctx, &mut |_, _| {}).expect("prune runs");
    let [PassReport::Prune(report)] = reports.as_slice() else { panic!("one prune report") };
    // ceil(0.4 x 16) = 7 of every row's 16.
    assert_eq!(report.layers[0].pattern.as_deref(), Some("7:16"));
    assert_eq!(report.layers[0].params, (rows * 7) as u64);
    assert!(
        graph.store.get("w").is_none() && graph.store.get("w.values").is_some() && graph.store.get("w.mask").is_some()
    );

    // The mask computed here: each row's 7 largest magnitudes.
    let mut masked = vec![0f32; rows * cols];
    for r in 0..rows {
        let row = &w[r * cols..][..cols];
        let mut order: Vec<usize> = (0..cols).collect();
        order.sort_by(|&a, &b| row[b].abs().total_cmp(&row[a].abs()));
        for &j in &order[..7] {
            masked[r * cols + j] = row[j];
        }
    }
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![batch, cols], x.clone())))]);
    let outputs = Interpreter::new(&graph).expect("the graph runs").run(&inputs).expect("runs");
    let Value::F32(y) = &outputs[0].1 else { panic!("f32 outputs") };
    let (mut worst, mut from_dense) = (0f64, 0f64);
    for i in 0..batch {
        for o in 0..rows {
            let dot = |m: &[f32]| (0..cols).map(|j| x[i * cols + j] as f64 * m[o * cols + j] as f64).sum::<f64>();
            let got = y.data[i * rows + o] as f64;
            worst = worst.max((got - dot(&masked) - bias[o] as f64).abs());
            from_dense = from_dense.max((got - dot(&w) - bias[o] as f64).abs());
        }
    }
    assert!(worst < 1e-5, "the interpreter's outputs are {worst} from x W_masked^T + b");
    assert!(from_dense > 1e-2, "pruning changes the layer (max {from_dense} from the dense outputs)");
}

/// The pruned layer's weight as a dense matrix (zeros where the mask removed a value).
fn dense_weight(graph: &kiln_ir::Graph, layer: &str) -> Vec<f32> {
    let id = graph.layers.get(layer).and_then(kiln_ir::Layer::main).expect("the layer has a main weight");
    let kiln_ir::Op::Weight(w) = &graph.node(id).op else { panic!("{layer}: not a weight") };
    assert!(w.sparse.is_some(), "{layer} is sparse");
    w.value(&graph.store, &graph.node(id).ty.known_shape().unwrap()).expect("the sparse weight reads")
}

/// `x^T x` of `x: [rows, k]`, in f64.
fn gram(x: &[f32], k: usize) -> Vec<f64> {
    let mut h = vec![0f64; k * k];
    for row in x.chunks(k) {
        for a in 0..k {
            for b in 0..k {
                h[a * k + b] += row[a] as f64 * row[b] as f64;
            }
        }
    }
    h
}

/// `relu(x W^T)` for `x: [rows, k]`, `W: [n, k]`.
fn relu_linear(x: &[f32], w: &[f32], k: usize, n: usize) -> Vec<f32> {
    x.chunks(k)
        .flat_map(|row| (0..n).map(move |o| (0..k).map(|j| row[j] * w[o * k + j]).sum::<f32>().max(0.0)))
        .collect()
}

/// SparseGPT (the default with calibration) runs layer by layer: the second layer is pruned
/// on the Gram matrix of the inputs the *pruned* first layer feeds it, computed here by
/// hand, and that differs from pruning it on the unpruned model's inputs.
#[test]
fn sparsegpt_prunes_each_layer_on_the_pruned_models_inputs() {
    use kiln_interp::calibrate::{Calibrator, interpreter_engine};
    use kiln_passes::prune::DAMP;
    use kiln_passes::prune::sparsegpt::sparsegpt;
    const TWO: &str = "graph g {
  %0 = input \"x\" : f32[r, 16]
  %1 = weight \"a\" f32 : f32[32, 16] @a
  %2 = linear %0, %1 : f32[r, 32] @a
  %3 = relu %2 : f32[r, 32] @a
  %4 = weight \"b\" f32 : f32[8, 32] @b
  %5 = linear %3, %4 : f32[r, 8] @b
  output \"y\" = %5
}
";
    let (rows, k, hidden, out) = (64usize, 16usize, 32usize, 8usize);
    let (a, b, x) = (values(hidden * k, 4), values(out * hidden, 5), values(rows * k, 6));
    let mut graph = kiln_ir::parse(TWO).expect("the test IR parses");
    graph.store.insert("a", TensorData::from_f32(vec![hidden as u64, k as u64], &a));
    graph.store.insert("b", TensorData::from_f32(vec![out as u64, hidden as u64], &b));
    graph.layers = kiln_ir::LayerTable::derive(&graph);
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![rows, k], x.clone())))]);
    let calibrator = Calibrator::new(&graph, inputs, false, interpreter_engine()).expect("calibrates");
    let calls = manager::parse("prune(sparsity=0.5)").expect("the pipeline parses");
    let ctx = Context::new(Some(&calibrator), vec![], &|_, _, _| {});
    let reports = manager::run(&mut graph, &calls, &ctx, &mut |_, _| {}).expect("prune runs");
    let [PassReport::Prune(report)] = reports.as_slice() else { panic!("one prune report") };
    assert_eq!(report.method.to_string(), "sparsegpt");
    assert!(report.layers.iter().all(|l| l.error.is_some_and(|e| e > 0.0 && e < 1.0)), "{:?}", report.layers);

    // By hand: a on the model's inputs, b on the inputs of the model with a pruned.
    let want_a = sparsegpt(&a, hidden, k, &gram(&x, k), (8, 16), DAMP).expect("prunes a").values;
    let after = relu_linear(&x, &want_a, k, hidden);
    let want_b = sparsegpt(&b, out, hidden, &gram(&after, hidden), (16, 32), DAMP).expect("prunes b").values;
    let before = relu_linear(&x, &a, k, hidden);
    let one_shot_b = sparsegpt(&b, out, hidden, &gram(&before, hidden), (16, 32), DAMP).expect("prunes b").values;
    let far = |p: &[f32], q: &[f32]| p.iter().zip(q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let (got_a, got_b) = (dense_weight(&graph, "a"), dense_weight(&graph, "b"));
    assert!(far(&got_a, &want_a) < 1e-4, "a: {}", far(&got_a, &want_a));
    assert!(far(&got_b, &want_b) < 1e-4, "b: {}", far(&got_b, &want_b));
    assert!(far(&one_shot_b, &want_b) > 1e-2, "the sequential statistics change b: {}", far(&one_shot_b, &want_b));
    // SparseGPT updates the kept weights: they are not the original ones.
    assert!(got_b.iter().zip(&b).any(|(g, o)| *g != 0.0 && (g - o).abs() > 1e-3));
}
