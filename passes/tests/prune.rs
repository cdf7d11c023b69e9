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
