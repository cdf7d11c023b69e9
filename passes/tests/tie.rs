//! `tie` end to end on a stack of three residual blocks: the shared weight is the
//! least-squares fit (checked against its optimality condition, computed here), full-rank
//! deltas give the original model back, the mean without calibration runs as computed by
//! hand, and the shared tensor is stored once.

mod common;

use common::stack::{HIDDEN, WIDTH, Weights, by_hand, residual_stack};
use common::values;
use kiln_interp::calibrate::{Calibrator, interpreter_engine};
use kiln_interp::{Interpreter, Tensor, Value};
use kiln_passes::calibration::{Executor, Gram};
use kiln_passes::tie::shared_weight;
use kiln_passes::{Context, PassReport, manager};
use std::collections::HashMap;

fn stack() -> (kiln_ir::Graph, Vec<Weights>) {
    let weights: Vec<Weights> =
        (0..3).map(|i| (values(HIDDEN * WIDTH, 10 + i), values(WIDTH * HIDDEN, 20 + i))).collect();
    (residual_stack(&weights), weights)
}

fn inputs(x: &[f32]) -> HashMap<String, Value> {
    HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![x.len() / WIDTH, WIDTH], x.to_vec())))])
}

fn outputs(graph: &kiln_ir::Graph, x: &[f32]) -> Vec<f32> {
    let out = Interpreter::new(graph).expect("the graph runs").run(&inputs(x)).expect("runs");
    let Value::F32(y) = &out[0].1 else { panic!("f32 outputs") };
    y.data.clone()
}

fn tie(graph: &mut kiln_ir::Graph, pipeline: &str, calibrator: Option<&Calibrator>) -> kiln_passes::tie::TieReport {
    let calls = manager::parse(pipeline).expect("the pipeline parses");
    let executor = calibrator.map(|c| c as &dyn Executor);
    let ctx = Context::new(executor, vec![], &|_, _, _| {});
    let reports = manager::run(graph, &calls, &ctx, &mut |_, _| {}).expect("tie runs");
    let [PassReport::Tie(report)] = reports.as_slice() else { panic!("one tie report") };
    report.clone()
}

/// `S` minimizes `sum_l |(W_l - S) X_l|^2 + damp |S|^2`: the gradient
/// `sum_l (S - W_l) H_l + damp S` vanishes.
#[test]
fn the_shared_weight_is_the_least_squares_fit() {
    let (n, k, t) = (5, 12, 40);
    let ws: Vec<Vec<f32>> = (0..3).map(|l| values(n * k, 100 + l)).collect();
    let grams: Vec<Gram> = (0..3)
        .map(|l| {
            // Inputs of different scales per member and per column.
            let x: Vec<f64> = values(t * k, 200 + l)
                .iter()
                .enumerate()
                .map(|(i, &v)| v as f64 * (1.0 + (i % k) as f64 * l as f64))
                .collect();
            let mut g = Gram::new(k);
            for r in 0..t {
                for a in 0..k {
                    for b in 0..k {
                        g.sum[a * k + b] += x[r * k + a] * x[r * k + b];
                    }
                }
            }
            g.rows = t as u64;
            g
        })
        .collect();
    let s = shared_weight(&ws, Some(&grams), n, k).expect("solves");
    let total: Vec<f64> = (0..k * k).map(|i| grams.iter().map(|g| g.sum[i]).sum()).collect();
    let damp = kiln_passes::tie::DAMP * (0..k).map(|i| total[i * k + i]).sum::<f64>() / k as f64;
    let scale = s.iter().fold(0f64, |m, &v| m.max(v.abs() as f64)) * total.iter().fold(0f64, |m, &v| m.max(v.abs()));
    for i in 0..n {
        for j in 0..k {
            let mut gradient = damp * s[i * k + j] as f64;
            for (w, g) in ws.iter().zip(&grams) {
                gradient += (0..k).map(|c| (s[i * k + c] - w[i * k + c]) as f64 * g.sum[c * k + j]).sum::<f64>();
            }
            assert!(gradient.abs() < 1e-5 * scale, "({i}, {j}): {gradient}");
        }
    }
    // It is not the mean: the members' inputs weigh them differently.
    let mean = shared_weight(&ws, None, n, k).unwrap();
    assert!(s.iter().zip(&mean).any(|(a, b)| (a - b).abs() > 1e-3));
    for (i, &m) in mean.iter().enumerate() {
        let want = (ws[0][i] + ws[1][i] + ws[2][i]) / 3.0;
        assert!((m - want).abs() < 1e-6);
    }
}

/// Deltas of full rank (WIDTH = 8 = min(HIDDEN, WIDTH)) make each member's matrix its own
/// again: the tied model computes the original's outputs to 1e-4 relative.
#[test]
fn full_rank_deltas_reproduce_the_model() {
    let (mut graph, weights) = stack();
    let x = values(48 * WIDTH, 5);
    let calibrator = Calibrator::new(&graph, inputs(&x), false, interpreter_engine()).expect("calibrates");
    let report = tie(&mut graph, "tie(groups=[[0,2]], delta_rank=8)", Some(&calibrator));
    assert_eq!(report.tied.len(), 2);
    assert!(report.tied.iter().all(|t| t.rank == 8 && t.errors.iter().all(|e| e.is_some_and(|e| e < 1e-8))));
    assert!(report.notes.iter().any(|n| n.contains("nothing saved")), "{:?}", report.notes);
    let want = by_hand(&x, &weights, &[0, 1, 2]);
    let got = outputs(&graph, &x);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 1e-4 * scale, "{worst} against {scale}");
}

/// Without calibration and without deltas, blocks 0 and 2 both run the mean of their
/// weights, stored once; block 1 is untouched.
#[test]
fn the_mean_without_calibration_is_stored_once() {
    let (mut graph, weights) = stack();
    let report = tie(&mut graph, "tie(groups=[[0,2]], delta_rank=0)", None);
    assert_eq!(report.tied.iter().map(|t| t.role.as_str()).collect::<Vec<_>>(), ["down", "up"]);
    let n = (HIDDEN * WIDTH) as u64;
    assert_eq!((report.params_before(), report.params()), (4 * n, 2 * n));
    let mean = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x + y) / 2.0).collect::<Vec<f32>>();
    let shared = (mean(&weights[0].0, &weights[2].0), mean(&weights[0].1, &weights[2].1));
    let tied = vec![shared.clone(), weights[1].clone(), shared];
    let x = values(6 * WIDTH, 9);
    let want = by_hand(&x, &tied, &[0, 1, 2]);
    let got = outputs(&graph, &x);
    assert!(got.iter().zip(&want).all(|(g, w)| (g - w).abs() < 1e-5));
    assert!(graph.store.get("blk.0.up").is_none() && graph.store.get("blk.2.down").is_none());
    assert!(graph.store.get("blk.0.up.shared").is_some() && graph.store.get("blk.1.up").is_some());
    // The tied graph prints and parses back to the same text.
    let text = kiln_ir::print(&graph);
    assert_eq!(kiln_ir::print(&kiln_ir::parse(&text).expect("parses")), text);
}

#[test]
fn bad_groups_are_errors() {
    for (pipeline, message) in [
        ("tie(groups=[[0,5]])", "no block 5: the blocks are 0, 1, 2"),
        ("tie(groups=[[0]])", "has one block"),
        ("tie(groups=[[0,1],[1,2]])", "block 1 is in two groups"),
        ("tie(delta_rank=4)", "give groups="),
    ] {
        let (mut graph, _) = stack();
        let err = manager::parse(pipeline)
            .map_err(|e| e.message)
            .and_then(|calls| {
                manager::run(&mut graph, &calls, &Context::empty(), &mut |_, _| {}).map_err(|e| e.to_string())
            })
            .unwrap_err();
        assert!(err.contains(message), "{pipeline}: {err}");
    }
}

/// `keep=F` with one pair needed: of the three pairs, tying blocks 0 and 2 (the same
/// weights) changes least, so the probe chooses them, and the model computes nearly what
/// it did.
#[test]
fn keep_chooses_the_pair_the_probe_finds_closest() {
    let mut weights: Vec<Weights> =
        (0..3).map(|i| (values(HIDDEN * WIDTH, 30 + i), values(WIDTH * HIDDEN, 40 + i))).collect();
    weights[2] = weights[0].clone();
    let mut graph = residual_stack(&weights);
    let x = values(64 * WIDTH, 6);
    let calibrator = Calibrator::new(&graph, inputs(&x), true, interpreter_engine()).expect("calibrates");
    // 3 blocks of 256 parameters; one pair without deltas saves 256, and keep=0.7 needs 231.
    let report = tie(&mut graph, "tie(keep=0.7, delta_rank=0)", Some(&calibrator));
    assert_eq!(report.candidates.len(), 3, "every pair is measured");
    let chosen: Vec<[usize; 2]> = report.candidates.iter().filter(|c| c.chosen).map(|c| c.blocks).collect();
    assert_eq!(chosen, [[0, 2]]);
    let probe = |a: usize, b: usize| report.candidates.iter().find(|c| c.blocks == [a, b]).unwrap().probe;
    let (p02, p01, p12) = (probe(0, 2), probe(0, 1), probe(1, 2));
    assert!(p02 < 0.05 * p01.min(p12), "{p02} against {p01}, {p12}");
    assert_eq!(report.params_before() - report.params(), 256);
    // The fit of two equal weights is that weight, but for the damping's pull toward zero
    // (1% of the Gram's mean diagonal, on inputs 8 wide).
    let want = by_hand(&x, &weights, &[0, 1, 2]);
    let got = outputs(&graph, &x);
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f32, f32::max);
    assert!(worst < 0.05 * scale, "{worst} against {scale}");

    // Without calibration, keep=F is refused before anything runs.
    let (mut graph, _) = stack();
    let calls = manager::parse("tie(keep=0.7)").unwrap();
    let err = manager::run(&mut graph, &calls, &Context::empty(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(err.contains("pass --calib"), "{err}");
}
