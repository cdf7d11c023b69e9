//! Healing keeps a refit only where the model improves end to end, whatever the layer-wise
//! error says. The case is built so that the layer-wise error and the model disagree: a
//! spurious correlation in the calibration rows, absent from the rows the probe holds out.
//!
//! The model is `y = x + W2 (W1 x)` on 4 features, with `W1 = W2 = I`. Compression drops
//! feature 1 from `W1` (`diag(1, 0, 1, 1)`). In the calibration rows feature 1 equals
//! feature 0, so the least-squares refit of `W2` to the reference's outputs learns to
//! rebuild it from feature 0: the layer's error on those rows falls to nothing. In the probe
//! rows feature 1 is minus feature 0, and the same refit doubles the error there.

use kiln_interp::calibrate::{Calibrator, ProbeEngine, interpreter_engine};
use kiln_ir::{Graph, NodeId, TensorData};
use kiln_passes::Context;
use kiln_passes::calibration::{Executor, Paired, Weighting};
use kiln_passes::heal::{Proposal, Site, heal};
use kiln_rt::{Tensor, Value};
use std::collections::HashMap;

const MODEL: &str = "graph g {
  %0 = input \"x\" : f32[b, s, 4]
  %1 = weight \"w1\" f32 : f32[4, 4] @l1
  %2 = linear %0, %1 : f32[b, s, 4] @l1
  %3 = weight \"w2\" f32 : f32[4, 4] @l2
  %4 = linear %2, %3 : f32[b, s, 4] @l2
  %5 = add %0, %4 : f32[b, s, 4]
  output \"y\" = %5
}
";

fn matrix(diagonal: [f32; 4]) -> Vec<f32> {
    (0..16).map(|i| if i % 5 == 0 { diagonal[i / 5] } else { 0.0 }).collect()
}

fn model(w1: [f32; 4]) -> Graph {
    let mut g = kiln_ir::parse(MODEL).expect("the test IR parses");
    g.store.insert("w1", TensorData::from_f32(vec![4, 4], &matrix(w1)));
    g.store.insert("w2", TensorData::from_f32(vec![4, 4], &matrix([1.0; 4])));
    g
}

/// 16 sequences of 64 tokens. The first 4 (what probes hold out: 256 tokens) have feature 1
/// equal to `probe_sign` times feature 0; the others have it equal.
fn inputs(probe_sign: f32) -> HashMap<String, Value> {
    let mut seed = 11u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let (rows, seq) = (16, 64);
    let mut data = Vec::with_capacity(rows * seq * 4);
    for row in 0..rows {
        for _ in 0..seq {
            let (a, b, c) = (next(), next(), next());
            let sign = if row < 4 { probe_sign } else { 1.0 };
            data.extend([a, sign * a, b, c]);
        }
    }
    HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![rows, seq, 4], data)))])
}

fn node(g: &Graph, index: usize) -> NodeId {
    g.node_ids().nth(index).expect("the node exists")
}

/// The refit of `W2` to the reference's outputs, `W2 C O^-1` (tiny damping), with its
/// layer-wise errors `sum |W2 x_o - W x_c|^2` before and after, from the statistics.
fn least_squares(g: &Graph, site: &Site, paired: &Paired) -> Result<Vec<Proposal>, String> {
    let k = paired.k;
    // W2 = I: W2 C = C; solve W O = C row by row (O symmetric) by Gauss-Jordan.
    let mut a: Vec<f64> = paired.own.clone();
    for i in 0..k {
        a[i * k + i] += 1e-9;
    }
    let cross = paired.cross.as_ref().ok_or("no reference statistics")?;
    let reference = paired.reference.as_ref().ok_or("no reference statistics")?;
    let mut b: Vec<f64> = cross.clone();
    // Solve O X = C^T for X = W^T.
    let mut bt: Vec<f64> = (0..k * k).map(|ij| b[(ij % k) * k + ij / k]).collect();
    for col in 0..k {
        let pivot = (col..k).max_by(|&x, &y| a[x * k + col].abs().total_cmp(&a[y * k + col].abs())).unwrap();
        for j in 0..k {
            a.swap(col * k + j, pivot * k + j);
            bt.swap(col * k + j, pivot * k + j);
        }
        let p = a[col * k + col];
        for j in 0..k {
            a[col * k + j] /= p;
            bt[col * k + j] /= p;
        }
        for r in (0..k).filter(|&r| r != col) {
            let f = a[r * k + col];
            for j in 0..k {
                a[r * k + j] -= f * a[col * k + j];
                bt[r * k + j] -= f * bt[col * k + j];
            }
        }
    }
    b = (0..k * k).map(|ij| bt[(ij % k) * k + ij / k]).collect(); // W
    let error = |w: &[f64]| {
        // tr(R) - 2 tr(C^T W^T)... with W2 = I: |x_o|^2 - 2 tr(W C^T) + tr(W O W^T).
        let tr_r: f64 = (0..k).map(|i| reference[i * k + i]).sum();
        let cross: f64 = (0..k * k).map(|ij| w[ij] * cross[ij]).sum();
        let quad: f64 = (0..k)
            .map(|i| {
                (0..k)
                    .map(|p| (0..k).map(|q| w[i * k + p] * paired.own[p * k + q] * w[i * k + q]).sum::<f64>())
                    .sum::<f64>()
            })
            .sum();
        tr_r - 2.0 * cross + quad
    };
    let identity: Vec<f64> = (0..k * k).map(|i| if i % (k + 1) == 0 { 1.0 } else { 0.0 }).collect();
    Ok(vec![Proposal {
        layer: site.layers[0].clone(),
        weights: vec![(node(g, 3), b.iter().map(|&v| v as f32).collect())],
        error_before: error(&identity),
        error_after: error(&b),
    }])
}

/// Heals the compressed model on `inputs`, probing on `engine`; returns the report, the
/// healed `W2`, and the probe of the refit alone, by a whole run.
fn run_on(inputs: HashMap<String, Value>, engine: ProbeEngine) -> (kiln_passes::heal::HealReport, Vec<f32>, f64) {
    let reference = model([1.0; 4]);
    let mut compressed = model([1.0, 0.0, 1.0, 1.0]);
    let calibrator = Calibrator::new(&reference, inputs, true, engine).expect("calibrates");
    assert!(calibrator.held_out());
    let ctx = Context::new(Some(&calibrator as &dyn Executor), vec![], &|_, _, _| {});
    let sites = [Site { input: node(&compressed, 2), reference: node(&reference, 2), layers: vec!["l2".into()] }];
    // What the refit alone does to the probe, measured here, outside `heal`.
    let mut refitted = compressed.clone();
    let mut alone = 0.0;
    let mut measure = |g: &Graph, site: &Site, paired: &Paired| {
        let proposals = least_squares(g, site, paired)?;
        refitted.set_weight(node(g, 3), TensorData::from_f32(vec![4, 4], &proposals[0].weights[0].1));
        alone = calibrator.probe(&refitted)?;
        Ok(proposals)
    };
    let report =
        heal("test", &mut compressed, Some(&reference), &sites, &ctx, Weighting::Uniform, &mut measure).expect("heals");
    let w2 = compressed.store.get("w2").expect("w2").to_f32().expect("f32");
    (report, w2, alone)
}

fn run(inputs: HashMap<String, Value>) -> (kiln_passes::heal::HealReport, Vec<f32>, f64) {
    run_on(inputs, interpreter_engine())
}

#[test]
fn a_refit_that_lowers_the_layer_error_but_hurts_the_model_is_not_kept() {
    let (report, w2, alone) = run(inputs(-1.0));
    let layer = &report.layers[0];
    // The layer-wise judge says yes: the refit removes most of the layer's error on the
    // calibration rows.
    assert!(layer.error_after < 0.01 * layer.error_before, "{layer:?}");
    // The model says no: on the probe rows the refit moves the outputs further.
    assert!(alone > 1.5 * report.probe_before, "the refit alone: {alone} vs {}", report.probe_before);
    assert!(!layer.kept);
    assert_eq!(report.probe_after, report.probe_before);
    assert_eq!(w2, matrix([1.0; 4]), "W2 is as it was");
}

#[test]
fn a_refit_that_helps_the_model_is_kept() {
    // The probe rows share the calibration rows' correlation: the refit restores the model.
    let (report, w2, alone) = run(inputs(1.0));
    let layer = &report.layers[0];
    assert!(layer.kept && layer.error_after < 0.01 * layer.error_before, "{layer:?}");
    assert!(report.probe_after < 0.01 * report.probe_before, "{report:?}");
    assert_eq!(report.probe_after, alone);
    // W2 now rebuilds feature 1 from feature 0.
    assert!((w2[4] - 1.0).abs() < 1e-3, "{w2:?}");
}

/// Under the JIT, probes after the first rerun only what the refitted weight reaches, from
/// the values of the model last kept: the same bits as a whole run (`alone`), so the same
/// decisions.
#[test]
fn probes_that_rerun_from_the_model_last_kept_decide_as_whole_runs() {
    for sign in [-1.0, 1.0] {
        let engine: ProbeEngine = Box::new(|g, inputs, base| kiln_jit::run_keeping(g, 2, inputs, base));
        let (report, _, alone) = run_on(inputs(sign), engine);
        assert_eq!(report.layers[0].kept, sign > 0.0, "{report:?}");
        if sign > 0.0 {
            assert_eq!(report.probe_after, alone, "the rerun's probe is the whole run's");
        }
    }
}
