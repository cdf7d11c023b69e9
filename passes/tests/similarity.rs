//! The similarity of blocks on a stack of three residual blocks whose weights are chosen to
//! be alike: block 2 is block 0's copy, block 1's down projection is block 0's negated. The
//! tables are checked against cosines and CKA computed here by hand, in f64, CKA by its
//! feature-space formula `|X^T Y|_F^2 / (|X^T X|_F |Y^T Y|_F)` (the analysis computes it
//! over tokens).

mod common;

use common::stack::{HIDDEN, WIDTH, Weights, by_hand, residual_stack};
use common::values;
use kiln_interp::Tensor;
use kiln_interp::Value;
use kiln_interp::calibrate::{Calibrator, interpreter_engine};
use kiln_passes::calibration::Executor;
use kiln_passes::tie::similarity::similarity;
use std::collections::HashMap;

fn weights() -> Vec<Weights> {
    let (up0, down0) = (values(HIDDEN * WIDTH, 1), values(WIDTH * HIDDEN, 2));
    let up1 = values(HIDDEN * WIDTH, 3);
    let minus: Vec<f32> = down0.iter().map(|v| -v).collect();
    vec![(up0.clone(), down0.clone()), (up1, minus), (up0, down0)]
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
    dot(a, b) / (dot(a, a) * dot(b, b)).sqrt()
}

/// `X^T Y` of two `[t, WIDTH]` matrices, columns centred.
fn cross(x: &[f64], y: &[f64]) -> Vec<f64> {
    let t = x.len() / WIDTH;
    let centred = |m: &[f64]| -> Vec<f64> {
        let mean: Vec<f64> = (0..WIDTH).map(|c| (0..t).map(|r| m[r * WIDTH + c]).sum::<f64>() / t as f64).collect();
        m.iter().enumerate().map(|(i, v)| v - mean[i % WIDTH]).collect()
    };
    let (x, y) = (centred(x), centred(y));
    let mut out = vec![0f64; WIDTH * WIDTH];
    for r in 0..t {
        for a in 0..WIDTH {
            for b in 0..WIDTH {
                out[a * WIDTH + b] += x[r * WIDTH + a] * y[r * WIDTH + b];
            }
        }
    }
    out
}

fn frobenius2(m: &[f64]) -> f64 {
    m.iter().map(|v| v * v).sum()
}

#[test]
fn blocks_compare_by_weights_and_outputs() {
    let w = weights();
    let graph = residual_stack(&w);
    let rows = 40;
    let x = values(rows * WIDTH, 7);
    let inputs = HashMap::from([("x".to_string(), Value::F32(Tensor::new(vec![rows, WIDTH], x.clone())))]);
    let calibrator = Calibrator::new(&graph, inputs, false, interpreter_engine()).expect("calibrates");
    let s = similarity(&graph, Some(&calibrator as &dyn Executor), &|_, _, _| {}).expect("analyzes");

    assert_eq!(s.blocks, ["blk.0", "blk.1", "blk.2"]);
    assert_eq!(s.weights.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(), ["down", "up"]);
    assert_eq!(s.tokens, rows);
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let (down, up) = (&s.weights[0], &s.weights[1]);
    let close = |got: Option<f64>, want: f64, what: &str| {
        let got = got.unwrap_or_else(|| panic!("{what}: no value"));
        assert!((got - want).abs() < 1e-5, "{what}: {got} against {want}");
    };
    close(down.get(3, 0, 1), -1.0, "down 0~1");
    close(down.get(3, 0, 2), 1.0, "down 0~2");
    close(down.get(3, 1, 2), -1.0, "down 1~2");
    close(up.get(3, 0, 2), 1.0, "up 0~2");
    close(up.get(3, 1, 0), cosine(&f64s(&w[1].0), &f64s(&w[0].0)), "up 1~0");
    close(up.get(3, 1, 1), 1.0, "up 1~1");

    // The deltas by hand: each block's output minus its input.
    let streams: Vec<Vec<f64>> = (0..=3).map(|k| f64s(&by_hand(&x, &w, &(0..k).collect::<Vec<_>>()))).collect();
    let deltas: Vec<Vec<f64>> =
        (0..3).map(|b| streams[b + 1].iter().zip(&streams[b]).map(|(o, i)| o - i).collect()).collect();
    let names: Vec<&str> = s.outputs.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["cosine", "cka"]);
    let (cos, cka) = (&s.outputs[0], &s.outputs[1]);
    for i in 0..3 {
        for j in 0..3 {
            let mean_cos = (0..rows)
                .map(|r| cosine(&deltas[i][r * WIDTH..(r + 1) * WIDTH], &deltas[j][r * WIDTH..(r + 1) * WIDTH]))
                .sum::<f64>()
                / rows as f64;
            close(cos.get(3, i, j), mean_cos, &format!("cosine {i}~{j}"));
            let want = frobenius2(&cross(&deltas[i], &deltas[j]))
                / (frobenius2(&cross(&deltas[i], &deltas[i])) * frobenius2(&cross(&deltas[j], &deltas[j]))).sqrt();
            close(cka.get(3, i, j), want, &format!("cka {i}~{j}"));
        }
    }
    // The same weights on different streams write different deltas.
    assert!(cos.get(3, 0, 2).unwrap() < 0.999);

    // Without calibration, weights only.
    let s = similarity(&graph, None, &|_, _, _| {}).expect("analyzes");
    assert!(s.outputs.is_empty() && s.weights.len() == 2);
}

#[test]
fn one_block_is_an_error() {
    let graph = residual_stack(&weights()[..1]);
    let err = similarity(&graph, None, &|_, _, _| {}).unwrap_err();
    assert!(err.contains("no stack of blocks"), "{err}");
}
