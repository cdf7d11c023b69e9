//! Passes on real graphs: a rewritten graph computes what the original computes.

use kiln_interp::Value;
use kiln_ir::Op;
use kiln_passes::cleanup::last_position::last_position;
use kiln_tests::*;
use std::collections::HashMap;

fn logits(outputs: &[(String, Value)]) -> &kiln_interp::Tensor {
    outputs.iter().find(|(n, _)| n == "logits").and_then(|(_, v)| v.as_f32()).expect("f32 logits")
}

/// The rewritten graph's logits are the original's at the last position: bitwise under the
/// JIT (whose kernels compute every row alone, in a fixed order), to rounding under the
/// interpreter (whose sgemm may sum a row differently in a smaller matrix).
fn last_position_is_exact(graph: &kiln_ir::Graph, inputs: &HashMap<String, Value>) -> kiln_ir::Graph {
    let rewritten = last_position(graph, "logits", 1).expect("applies");
    kiln_ir::verify(&rewritten).expect("verifies");
    for exec in [Exec::Interp, Exec::Jit { threads: 2 }] {
        let whole = Prepared::new(graph, exec).run(inputs);
        let last = Prepared::new(&rewritten, exec).run(inputs);
        let (whole, last) = (logits(&whole), logits(&last));
        let (b, s, v) = (whole.shape[0], whole.shape[1], whole.shape[2]);
        assert_eq!(last.shape, [b, 1, v]);
        for r in 0..b {
            let want = &whole.data[(r * s + s - 1) * v..][..v];
            let got = &last.data[r * v..][..v];
            if exec == Exec::Interp {
                let diff = want.iter().zip(got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(diff <= 1e-4, "{exec:?}: row {r} differs by {diff}");
            } else {
                assert!(want.iter().zip(got).all(|(a, b)| a.to_bits() == b.to_bits()), "{exec:?}: row {r} differs");
            }
        }
    }
    rewritten
}

#[test]
fn last_position_on_the_tiny_model() {
    let dir = temp_dir("passes-tiny");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 5);
    let (graph, _) = compile_bound("tiny/tiny.kiln", &weights);
    let inputs = [
        ("input_ids".to_string(), ids(&[&[3, 1, 4, 1, 5], &[9, 2, 6, 5, 3]])),
        ("attention_mask".to_string(), ids(&[&[1, 1, 1, 1, 1], &[1, 1, 1, 0, 0]])),
    ]
    .into();
    last_position_is_exact(&graph, &inputs);
}

#[test]
fn last_position_on_smollm2_skips_the_head_for_the_prompt() {
    let Some(weights) = real_checkpoint(SMOLLM2_WEIGHTS) else { return };
    let (graph, _) = compile_bound("smollm2/smollm2.kiln", &weights);
    let inputs = [("input_ids".to_string(), ids(&[&[504, 1646, 2359, 282, 1681, 29]]))].into();
    let rewritten = last_position_is_exact(&graph, &inputs);
    // The slice sits before the final norm, so both it and the head see one position.
    let slice = rewritten.node_ids().find(|&n| matches!(rewritten.node(n).op, Op::Slice { .. })).expect("a slice");
    let users = rewritten.users(slice);
    assert_eq!(users.len(), 1);
    assert!(matches!(rewritten.node(users[0]).op, Op::RmsNorm { .. }), "{:?}", rewritten.node(users[0]).op);
    assert_eq!(rewritten.node(users[0]).scope, "output_norm");
}

/// `factorize` rewires each factored linear as `linear(linear(x, V), U, bias)`: the
/// factorized tiny model computes what the original computes with each factored weight
/// replaced by the product `U V` of its factors (to rounding), and its layer table names
/// the factors under the original layers.
#[test]
fn factorize_on_the_tiny_model_computes_the_factors_product() {
    use kiln_ir::{Role, TensorData, WeightRef};
    use kiln_passes::factorize::{Allocation, FactorizeOptions, Method, Target, factorize};
    let dir = temp_dir("passes-factorize");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 7);
    let (graph, _) = compile_bound("tiny/tiny.kiln", &weights);
    let mut factored = graph.clone();
    let options = FactorizeOptions {
        method: Method::Svd,
        target: Target::Rank(4),
        allocation: Allocation::Uniform,
        heal: None,
        cores: 3,
    };
    let report = factorize(&mut factored, &options, &[], None, None, &|_, _, _| {}).expect("factorizes");
    let ranks: Vec<Option<usize>> = report.layers.iter().map(|l| l.rank).collect();
    assert!(ranks.iter().filter(|r| **r == Some(4)).count() >= 10, "{:?}", report.layers);

    let value = |g: &kiln_ir::Graph, id| {
        let Op::Weight(w) = &g.node(id).op else { panic!("a weight") };
        let shape: Vec<u64> = g.node(id).ty.shape.iter().map(|d| d.known().unwrap()).collect();
        (w.value(&g.store, &shape).unwrap(), shape)
    };
    let mut reference = graph.clone();
    let mut replaced = 0;
    for (name, layer) in factored.layers.iter().filter(|(_, l)| l.is_factored()) {
        let (u, us) = value(&factored, layer.role(Role::LowRankU).next().unwrap());
        let (v, vs) = value(&factored, layer.role(Role::LowRankV).next().unwrap());
        let (n, r, k) = (us[0] as usize, us[1] as usize, vs[1] as usize);
        let product: Vec<f32> = (0..n * k).map(|i| (0..r).map(|p| u[i / k * r + p] * v[p * k + i % k]).sum()).collect();
        let main = reference.layers.main_of(name).expect("the original layer");
        let tensor = format!("{name}.product");
        reference.store.insert(tensor.clone(), TensorData::from_f32(vec![n as u64, k as u64], &product));
        reference.node_mut(main).op = Op::Weight(WeightRef::dense(tensor, kiln_ir::Format::F32, None));
        replaced += 1;
    }
    assert_eq!(replaced, ranks.iter().flatten().count());
    kiln_ir::verify(&reference).unwrap();
    let inputs: HashMap<String, Value> = [
        ("input_ids".to_string(), ids(&[&[3, 1, 4, 1, 5], &[9, 2, 6, 5, 3]])),
        ("attention_mask".to_string(), ids(&[&[1, 1, 1, 1, 1], &[1, 1, 1, 1, 1]])),
    ]
    .into();
    let (want, got) =
        (Prepared::new(&reference, Exec::Interp).run(&inputs), Prepared::new(&factored, Exec::Interp).run(&inputs));
    let (want, got) = (logits(&want), logits(&got));
    let scale = want.data.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = want.data.iter().zip(&got.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(diff <= 1e-4 * scale, "factorized vs product: {diff}");
    // And the factorization changed the model (rank 4 of 16-wide layers is lossy).
    let original = Prepared::new(&graph, Exec::Interp).run(&inputs);
    let moved = logits(&original).data.iter().zip(&got.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(moved > 1e-3, "{moved}");
}
