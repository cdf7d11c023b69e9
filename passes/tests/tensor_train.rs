//! `factorize(method=tt)` end to end on one linear: the ops the pass writes on the cores
//! rebuild exactly the weight TT-SVD gives (computed here from the public [`Train`]), the
//! interpreter runs them, and the report counts the train's parameters and error.

mod common;

use common::values;
use kiln_interp::{Interpreter, Tensor, Value};
use kiln_ir::TensorData;
use kiln_passes::factorize::tt::{Train, modes};
use kiln_passes::{Context, PassReport, manager};
use std::collections::HashMap;

const MODEL: &str = "graph g {
  %0 = input \"x\" : f32[r, 12]
  %1 = weight \"w\" f32 : f32[24, 12] @l
  %2 = weight \"b\" f32 : f32[24] @l
  %3 = linear %0, %1, %2 : f32[r, 24] @l
  output \"y\" = %3
}
";

#[test]
fn the_ops_on_the_cores_rebuild_the_trains_weight() {
    let (w, bias, x) = (values(24 * 12, 1), values(24, 2), values(5 * 12, 3));
    let mut graph = kiln_ir::parse(MODEL).expect("the test IR parses");
    graph.store.insert("w", TensorData::from_f32(vec![24, 12], &w));
    graph.store.insert("b", TensorData::from_f32(vec![24], &bias));
    let calls = manager::parse("factorize(method=tt, bond=2)").expect("the pipeline parses");
    let ctx = Context::new(None, vec![], &|_, _, _| {});
    let reports = manager::run(&mut graph, &calls, &ctx, &mut |_, _| {}).expect("factorize runs");

    // 24 = 2 x 3 x 4 and 12 = 2 x 2 x 3; bonds min(2, ...) at both cuts.
    let (outs, ins) = (modes(24, 3), modes(12, 3));
    assert_eq!((outs.as_slice(), ins.as_slice()), ([2, 3, 4].as_slice(), [2, 2, 3].as_slice()));
    let train = Train::new(&w, &outs, &ins, 2).expect("TT-SVD");
    let rebuilt = train.weight();
    let [PassReport::Factorize(report)] = reports.as_slice() else { panic!("one factorize report") };
    let layer = &report.layers[0];
    assert_eq!((layer.bonds.as_slice(), layer.params), ([2, 2].as_slice(), train.params() as u64));
    assert_eq!(train.params(), 2 * 2 * 2 + 2 * 3 * 2 * 2 + 2 * 4 * 3);
    let energy: f64 = w.iter().map(|v| (*v as f64).powi(2)).sum();
    let error: f64 = w.iter().zip(&rebuilt).map(|(a, b)| (*a as f64 - b).powi(2)).sum();
    assert!(
        (layer.relative_error - error / energy).abs() < 1e-9,
        "{} against {}",
        layer.relative_error,
        error / energy
    );
    // A train stores fewer values than the SVD at the same count can keep of a random
    // matrix, but both lose something.
    let svd = layer.svd_relative_error.expect("the SVD's error beside the train's");
    assert!(svd > 0.0 && layer.relative_error > 0.0);
    assert!(graph.store.get("w").is_none(), "the dense weight is gone from the store");

    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![5, 12], x.clone())))]);
    let outputs = Interpreter::new(&graph).expect("the graph runs").run(&inputs).expect("runs");
    let Value::F32(y) = &outputs[0].1 else { panic!("f32 outputs") };
    let mut worst = 0f64;
    let mut from_dense = 0f64;
    for r in 0..5 {
        for (o, &b) in bias.iter().enumerate() {
            let dot = |m: &dyn Fn(usize) -> f64| (0..12).map(|i| x[r * 12 + i] as f64 * m(o * 12 + i)).sum::<f64>();
            let got = y.data[r * 24 + o] as f64 - b as f64;
            worst = worst.max((got - dot(&|at| rebuilt[at])).abs());
            from_dense = from_dense.max((got - dot(&|at| w[at] as f64)).abs());
        }
    }
    assert!(worst < 1e-5, "the interpreter's outputs are {worst} from the train's");
    assert!(from_dense > 1e-2, "bond 2 changes the layer (max {from_dense} from the dense outputs)");
}

/// A width with no three factors above 1 leaves its layer dense, with the reason in the
/// report; an override's bond that saves nothing is an error, as an override's rank is.
#[test]
fn layers_trains_cannot_take_stay_dense_and_say_why() {
    const TWO: &str = "graph g {
  %0 = input \"x\" : f32[r, 12]
  %1 = weight \"w1\" f32 : f32[24, 12] @a
  %2 = linear %0, %1 : f32[r, 24] @a
  %3 = input \"z\" : f32[r, 13]
  %4 = weight \"w2\" f32 : f32[24, 13] @b
  %5 = linear %3, %4 : f32[r, 24] @b
  output \"y\" = %2
  output \"u\" = %5
}
";
    let graph = || {
        let mut g = kiln_ir::parse(TWO).expect("the test IR parses");
        g.store.insert("w1", TensorData::from_f32(vec![24, 12], &values(24 * 12, 4)));
        g.store.insert("w2", TensorData::from_f32(vec![24, 13], &values(24 * 13, 5)));
        g
    };
    let run = |overrides: Vec<(String, String)>| {
        let mut g = graph();
        let calls = manager::parse("factorize(method=tt, bond=2)").expect("the pipeline parses");
        let ctx = Context::new(None, overrides, &|_, _, _| {});
        manager::run(&mut g, &calls, &ctx, &mut |_, _| {}).map(|r| (g, r)).map_err(|e| e.to_string())
    };
    let (g, reports) = run(vec![]).expect("factorize runs");
    let [PassReport::Factorize(report)] = reports.as_slice() else { panic!("one factorize report") };
    let b = report.layers.iter().find(|l| l.name == "b").expect("layer b is reported");
    assert_eq!(b.rank, None);
    assert!(b.why_dense.as_deref().is_some_and(|w| w.contains("no 3 factors above 1")), "{b:?}");
    assert!(report.notes.iter().any(|n| n.contains("1 of 2 layers stay dense: b")), "{:?}", report.notes);
    assert!(
        g.layers.get("a").is_some_and(kiln_ir::Layer::is_train)
            && g.layers.get("b").is_some_and(|l| l.main().is_some())
    );
    // 24 x 12 as 2 x 3 x 4 by 2 x 2 x 3: bond 12 keeps bonds 4 and 12, 16 + 288 + 144 = 448
    // values against 288.
    let err = run(vec![("a".into(), "rank:12".into())]).unwrap_err();
    assert!(
        err.contains("--override rank:12 on layer a") && err.contains("no fewer than the [24, 12] matrix"),
        "{err}"
    );
}
