//! `drop` end to end on a stack of three residual blocks `h = h + W2 relu(W1 h)`: the probe
//! chooses the blocks whose removal changes the outputs least, and the interpreter runs the
//! model without them as computed here by hand.

mod common;

use common::values;
use kiln_interp::calibrate::{Calibrator, interpreter_engine};
use kiln_interp::{Interpreter, Tensor, Value};
use kiln_passes::{Context, PassReport, manager};
use std::collections::HashMap;

use common::stack::{HIDDEN, WIDTH, Weights, by_hand, residual_stack};

/// Three blocks whose down projections are scaled by `scales`, and their weights.
fn stack(scales: [f32; 3]) -> (kiln_ir::Graph, Vec<Weights>) {
    let weights: Vec<Weights> = scales
        .iter()
        .enumerate()
        .map(|(i, scale)| {
            let up = values(HIDDEN * WIDTH, 10 + i as u64);
            let down: Vec<f32> = values(WIDTH * HIDDEN, 20 + i as u64).iter().map(|v| v * scale).collect();
            (up, down)
        })
        .collect();
    (residual_stack(&weights), weights)
}

fn run(
    graph: &mut kiln_ir::Graph,
    pipeline: &str,
    calibrator: Option<&Calibrator>,
) -> kiln_passes::prune::drop::DropReport {
    let calls = manager::parse(pipeline).expect("the pipeline parses");
    let executor = calibrator.map(|c| c as &dyn kiln_passes::calibration::Executor);
    let ctx = Context::new(executor, vec![], &|_, _, _| {});
    let reports = manager::run(graph, &calls, &ctx, &mut |_, _| {}).expect("drop runs");
    let [PassReport::Drop(report)] = reports.as_slice() else { panic!("one drop report") };
    report.clone()
}

fn outputs(graph: &kiln_ir::Graph, x: &[f32]) -> Vec<f32> {
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![x.len() / WIDTH, WIDTH], x.to_vec())))]);
    let out = Interpreter::new(graph).expect("the graph runs").run(&inputs).expect("runs");
    let Value::F32(y) = &out[0].1 else { panic!("f32 outputs") };
    y.data.clone()
}

/// `blocks=2` drops the block whose output barely moves the stream first (block 1, scaled
/// by 0.01), then the smaller of the other two (block 2, 0.3 against 1).
#[test]
fn the_probe_chooses_the_blocks_that_matter_least() {
    let (mut graph, weights) = stack([1.0, 0.01, 0.3]);
    let x = values(64 * WIDTH, 3);
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![64, WIDTH], x.clone())))]);
    let calibrator = Calibrator::new(&graph, inputs, true, interpreter_engine()).expect("calibrates");
    let report = run(&mut graph, "drop(blocks=2)", Some(&calibrator));
    let dropped: Vec<usize> = report.dropped.iter().map(|b| b.index).collect();
    assert_eq!(dropped, [1, 2]);
    assert_eq!(report.blocks, 3);
    assert_eq!(report.rounds[0].len(), 3, "the first round tries every block");
    let p: Vec<f64> = report.dropped.iter().map(|b| b.probe.expect("measured")).collect();
    assert!(p[0] > 0.0 && p[0] < p[1], "the probe grows as blocks go: {p:?}");
    assert_eq!(report.dropped[0].params, (2 * HIDDEN * WIDTH) as u64);
    // Only block 0 is left, and the model computes just that.
    let want = by_hand(&x, &weights, &[0]);
    let got = outputs(&graph, &x);
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5), "the model without blocks 1 and 2");
    assert!(graph.store.get("blk.1.up").is_none() && graph.store.get("blk.2.down").is_none());
    assert!(graph.layers.get("blk.1.up").is_none() && graph.layers.get("blk.0.up").is_some());
}

/// `blocks=[0,1]` needs no calibration; adjacent blocks drop in either order, and the one
/// left reads the model's input.
#[test]
fn forced_blocks_drop_without_calibration() {
    let (mut graph, weights) = stack([1.0, 1.0, 1.0]);
    let x = values(5 * WIDTH, 4);
    let report = run(&mut graph, "drop(blocks=[1, 0])", None);
    assert_eq!(report.dropped.iter().map(|b| b.index).collect::<Vec<_>>(), [0, 1]);
    assert!(report.dropped.iter().all(|b| b.probe.is_none()));
    let want = by_hand(&x, &weights, &[2]);
    let got = outputs(&graph, &x);
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5), "only block 2 runs");

    let (mut graph, _) = stack([1.0, 1.0, 1.0]);
    let calls = manager::parse("drop(blocks=[0,1,2])").unwrap();
    let err = manager::run(&mut graph, &calls, &Context::empty(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("leaves none"), "{err}");
    let calls = manager::parse("drop(blocks=[5])").unwrap();
    let err = manager::run(&mut graph, &calls, &Context::empty(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("no block 5: the blocks are 0, 1, 2"), "{err}");
    let calls = manager::parse("drop(blocks=2)").unwrap();
    let err = manager::run(&mut graph, &calls, &Context::empty(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("pass --calib"), "{err}");
}

/// With `refit=true`, the first block after the gap is refit, each layer kept only where the
/// probe improves; by default its weights are the original ones.
#[test]
fn the_block_after_a_gap_is_refit() {
    let (original, weights) = stack([1.0, 1.0, 1.0]);
    let x = values(64 * WIDTH, 5);
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![64, WIDTH], x.clone())))]);
    let calibrator = Calibrator::new(&original, inputs, true, interpreter_engine()).expect("calibrates");
    let weight = |g: &kiln_ir::Graph, name: &str| g.store.get(name).unwrap().to_f32().unwrap();

    let mut plain = original.clone();
    let report = run(&mut plain, "drop(blocks=[0])", Some(&calibrator));
    assert!(report.refit.is_empty() && report.probe_refit.is_none());
    assert_eq!((weight(&plain, "blk.1.up"), weight(&plain, "blk.1.down")), weights[1].clone());

    let mut refit = original.clone();
    let report = run(&mut refit, "drop(blocks=[0], refit=true)", Some(&calibrator));
    let layers: Vec<&str> = report.refit.iter().map(|h| h.layer.as_str()).collect();
    assert_eq!(layers, ["blk.1.up", "blk.1.down"], "block 1 follows the gap; block 2 does not");
    let (before, after) = report.probe_refit.expect("probed");
    assert!(after <= before, "healing never makes the probe worse: {before} -> {after}");
    for h in &report.refit {
        let changed = weight(&refit, &h.layer) != weight(&plain, &h.layer);
        assert_eq!(changed, h.kept, "{}: the weight changes exactly when its refit is kept", h.layer);
        assert!(h.error_after < h.error_before, "{}: the refit lowers its layer-wise error: {h:?}", h.layer);
    }
    assert_eq!(weight(&refit, "blk.2.up"), weights[2].0, "the other blocks stay");
}
