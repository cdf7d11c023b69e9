//! Structured `prune(heads=, channels=)` end to end: the shrunk model computes exactly the
//! original model with the removed units' columns of the consumers zeroed (the units chosen
//! here by hand from the consumers' column norms), for a block with as many key/value heads
//! as query heads and one with grouped key/value heads; and the refit, with calibration,
//! brings the pruned model closer to the original than plain removal.

mod common;

use common::values;
use kiln_interp::calibrate::{Calibrator, interpreter_engine};
use kiln_interp::{Interpreter, Value};
use kiln_ir::{Graph, TensorData};
use kiln_passes::prune::structured::{Kind, StructuredReport};
use kiln_passes::{Context, PassReport, manager};
use std::collections::HashMap;

const D: usize = 8;

/// One pre-norm block on a gathered embedding: attention with `hq` query and `hkv`
/// key/value heads of size 8 (rope on q and k), a SiLU-gated FFN of `ffn` channels, and
/// logits by the tied embedding.
fn block(hq: usize, hkv: usize, ffn: usize) -> Graph {
    let (h, q, kv) = (32, hq * D, hkv * D);
    let text = format!(
        "graph g {{
  %0 = input \"ids\" : i64[b, s]
  %1 = weight \"embd\" f32 : f32[64, {h}] @embd
  %2 = gather %1, %0 : f32[b, s, {h}] @embd
  %3 = weight \"norm\" f32 : f32[{h}] @blk.0.norm
  %4 = rms_norm %2, %3 {{eps = 1e-5}} : f32[b, s, {h}] @blk.0.norm
  %5 = weight \"q\" f32 : f32[{q}, {h}] @blk.0.q
  %6 = linear %4, %5 : f32[b, s, {q}] @blk.0.q
  %7 = reshape %6 {{shape = [b, s, {hq}, {D}]}} : f32[b, s, {hq}, {D}] @blk.0
  %8 = rope %7 {{theta = 10000.0, interleaved = false}} : f32[b, s, {hq}, {D}] @blk.0
  %9 = transpose %8 {{perm = [0, 2, 1, 3]}} : f32[b, {hq}, s, {D}] @blk.0
  %10 = weight \"k\" f32 : f32[{kv}, {h}] @blk.0.k
  %11 = linear %4, %10 : f32[b, s, {kv}] @blk.0.k
  %12 = reshape %11 {{shape = [b, s, {hkv}, {D}]}} : f32[b, s, {hkv}, {D}] @blk.0
  %13 = rope %12 {{theta = 10000.0, interleaved = false}} : f32[b, s, {hkv}, {D}] @blk.0
  %14 = transpose %13 {{perm = [0, 2, 1, 3]}} : f32[b, {hkv}, s, {D}] @blk.0
  %15 = weight \"v\" f32 : f32[{kv}, {h}] @blk.0.v
  %16 = linear %4, %15 : f32[b, s, {kv}] @blk.0.v
  %17 = reshape %16 {{shape = [b, s, {hkv}, {D}]}} : f32[b, s, {hkv}, {D}] @blk.0
  %18 = transpose %17 {{perm = [0, 2, 1, 3]}} : f32[b, {hkv}, s, {D}] @blk.0
  %19 = attention %9, %14, %18 {{causal = true, scale = 0.35355338}} : f32[b, {hq}, s, {D}] @blk.0
  %20 = transpose %19 {{perm = [0, 2, 1, 3]}} : f32[b, s, {hq}, {D}] @blk.0
  %21 = reshape %20 {{shape = [b, s, {q}]}} : f32[b, s, {q}] @blk.0
  %22 = weight \"o\" f32 : f32[{h}, {q}] @blk.0.o
  %23 = linear %21, %22 : f32[b, s, {h}] @blk.0.o
  %24 = add %2, %23 : f32[b, s, {h}] @blk.0
  %25 = weight \"gate\" f32 : f32[{ffn}, {h}] @blk.0.gate
  %26 = linear %24, %25 : f32[b, s, {ffn}] @blk.0.gate
  %27 = silu %26 : f32[b, s, {ffn}] @blk.0
  %28 = weight \"up\" f32 : f32[{ffn}, {h}] @blk.0.up
  %29 = linear %24, %28 : f32[b, s, {ffn}] @blk.0.up
  %30 = mul %27, %29 : f32[b, s, {ffn}] @blk.0
  %31 = weight \"down\" f32 : f32[{h}, {ffn}] @blk.0.down
  %32 = linear %30, %31 : f32[b, s, {h}] @blk.0.down
  %33 = add %24, %32 : f32[b, s, {h}] @blk.0
  %34 = linear %33, %1 : f32[b, s, 64] @head
  output \"logits\" = %34
}}
"
    );
    let mut g = kiln_ir::parse(&text).expect("the test IR parses");
    for (i, (name, shape)) in [
        ("embd", vec![64, h]),
        ("norm", vec![h]),
        ("q", vec![q, h]),
        ("k", vec![kv, h]),
        ("v", vec![kv, h]),
        ("o", vec![h, q]),
        ("gate", vec![ffn, h]),
        ("up", vec![ffn, h]),
        ("down", vec![h, ffn]),
    ]
    .into_iter()
    .enumerate()
    {
        let len = shape.iter().product();
        let mut v = values(len, 40 + i as u64);
        if name == "norm" {
            v.iter_mut().for_each(|x| *x = 1.0 + 0.1 * *x);
        }
        g.store.insert(name, TensorData::from_f32(shape.iter().map(|&d| d as u64).collect(), &v));
    }
    g.layers = kiln_ir::LayerTable::derive(&g);
    g
}

fn ids(rows: usize, seq: usize, seed: u64) -> HashMap<String, Value> {
    let v: Vec<i64> = values(rows * seq, seed).iter().map(|x| ((x.abs() * 997.0) as i64) % 64).collect();
    HashMap::from([("ids".to_string(), Value::I64 { shape: vec![rows, seq], data: v })])
}

fn logits(g: &Graph, inputs: &HashMap<String, Value>) -> Vec<f32> {
    let out = Interpreter::new(g).expect("the graph runs").run(inputs).expect("runs");
    let Value::F32(y) = &out[0].1 else { panic!("f32 logits") };
    y.data.clone()
}

fn prune(g: &mut Graph, pipeline: &str, calibrator: Option<&Calibrator>) -> StructuredReport {
    let calls = manager::parse(pipeline).expect("the pipeline parses");
    let executor = calibrator.map(|c| c as &dyn kiln_passes::calibration::Executor);
    let ctx = Context::new(executor, vec![], &|_, _, _| {});
    let reports = manager::run(g, &calls, &ctx, &mut |_, _| {}).expect("prune runs");
    let [PassReport::Structured(report)] = reports.as_slice() else { panic!("one structured report") };
    report.clone()
}

/// `w [n, k]` with the columns of the units (`unit` columns each) not in `kept` zero.
fn zero_units(g: &mut Graph, name: &str, unit: usize, kept: &[usize]) {
    let t = g.store.get(name).unwrap();
    let (n, k) = (t.shape[0] as usize, t.shape[1] as usize);
    let mut w = t.to_f32().unwrap();
    for i in 0..n {
        for c in 0..k {
            if !kept.contains(&(c / unit)) {
                w[i * k + c] = 0.0;
            }
        }
    }
    g.store.insert(name, TensorData::from_f32(vec![n as u64, k as u64], &w));
}

/// The `keep` units (of `unit` columns) of `name` with the largest column norms, in each of
/// `sets` sets.
fn by_norm(g: &Graph, name: &str, unit: usize, sets: usize, keep: usize) -> Vec<usize> {
    let t = g.store.get(name).unwrap();
    let (n, k) = (t.shape[0] as usize, t.shape[1] as usize);
    let w = t.to_f32().unwrap();
    let norm = |u: usize| -> f64 {
        (0..n)
            .flat_map(|i| (u * unit..(u + 1) * unit).map(move |c| (i, c)))
            .map(|(i, c)| (w[i * k + c] as f64).powi(2))
            .sum()
    };
    let per = k / unit / sets;
    let mut kept = Vec::new();
    for s in 0..sets {
        let mut units: Vec<usize> = (s * per..(s + 1) * per).collect();
        units.sort_by(|&a, &b| norm(b).total_cmp(&norm(a)));
        kept.extend_from_slice(&units[..keep]);
    }
    kept.sort();
    kept
}

/// Without calibration, nothing is refit: the pruned model is the original with the
/// removed heads' and channels' consumer columns zero, exactly, for plain multi-head
/// attention (q, k and v lose the head) and grouped key/value heads (query heads only).
#[test]
fn the_shrunk_model_is_the_masked_one() {
    for (hq, hkv, heads, keep_per_set, sets) in [(4, 4, "0.25", 3, 1), (6, 2, "0.34", 2, 2)] {
        let mut g = block(hq, hkv, 96);
        let original = g.clone();
        let report = prune(&mut g, &format!("prune(heads={heads}, channels=0.34)"), None);
        let kinds: Vec<(Kind, usize, usize)> = report.groups.iter().map(|g| (g.kind, g.units, g.kept)).collect();
        assert_eq!(kinds, [(Kind::Heads, hq, keep_per_set * sets), (Kind::Channels, 96, 64)], "{hq}/{hkv}");
        let heads_kept = by_norm(&original, "o", D, sets, keep_per_set);
        let channels_kept = by_norm(&original, "down", 1, 1, 64);
        let mut masked = original.clone();
        zero_units(&mut masked, "o", D, &heads_kept);
        zero_units(&mut masked, "down", 1, &channels_kept);
        let inputs = ids(2, 7, 5);
        let (want, got) = (logits(&masked, &inputs), logits(&g, &inputs));
        let worst = want.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "{hq}/{hkv}: the shrunk model differs from the masked one by {worst}");
        assert_ne!(want, logits(&original, &inputs), "removing units changes the model");
        let shape = |n: &str| g.store.get(n).unwrap().shape.clone();
        let qkept = (keep_per_set * sets * D) as u64;
        assert_eq!((shape("q"), shape("o")), (vec![qkept, 32], vec![32, qkept]));
        let kv = if hq == hkv { qkept } else { (hkv * D) as u64 };
        assert_eq!((shape("k"), shape("v")), (vec![kv, 32], vec![kv, 32]), "k and v lose rows only without groups");
        assert_eq!((shape("gate"), shape("up"), shape("down")), (vec![64, 32], vec![64, 32], vec![32, 64]));
        assert_eq!(
            report.params_before - report.params,
            (3 * 32 * 32 + 32 * (hq - keep_per_set * sets) * D * if hq == hkv { 4 } else { 2 }) as u64
        );
    }
}

/// With calibration, units are scored by their contribution on the calibration rows and the
/// consumers refit: the refit model is closer to the original on rows it has not seen than
/// the same removal without the refit.
#[test]
fn the_refit_brings_the_model_closer() {
    let original = block(4, 4, 96);
    let calibrator = Calibrator::new(&original, ids(32, 16, 11), true, interpreter_engine()).expect("calibrates");
    let distance = |g: &Graph| {
        let inputs = ids(4, 16, 99);
        let (a, b) = (logits(&original, &inputs), logits(g, &inputs));
        a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>()
    };
    let mut plain = original.clone();
    let r0 = prune(&mut plain, "prune(heads=0.25, channels=0.34, refit=none)", Some(&calibrator));
    let mut refit = original.clone();
    let r1 = prune(&mut refit, "prune(heads=0.25, channels=0.34)", Some(&calibrator));
    assert!(r0.heal.is_none() && r1.heal.is_some());
    let kept: Vec<bool> = r1.groups.iter().map(|g| g.healed.as_ref().expect("healed").kept).collect();
    assert!(kept.iter().any(|&k| k), "some refit is kept: {r1:?}");
    for g in &r1.groups {
        let h = g.healed.as_ref().unwrap();
        assert!(h.error_after < h.error_before, "{}: the refit lowers its layer-wise error", g.name);
        assert!(g.error.unwrap() > 0.0 && g.error.unwrap() < 1.0, "{}: measured error {:?}", g.name, g.error);
    }
    let (d0, d1) = (distance(&plain), distance(&refit));
    assert!(d1 < d0, "refit {d1} against plain removal {d0}");
}
