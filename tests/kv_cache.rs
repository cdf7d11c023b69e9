//! Running a sequence in pieces over a KV cache computes what one run over the whole
//! sequence computes (to rounding), under both executors; the cache's bookkeeping survives
//! failed runs and rejects what it cannot continue.

use kiln_rt::{KvCache, Value};
use kiln_tests::*;
use std::collections::HashMap;

fn tiny() -> kiln_ir::Graph {
    let dir = temp_dir("kv-tiny");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 11);
    compile_bound("tiny/tiny.kiln", &weights).0
}

fn feed(ids: &[i64], mask: &[i64]) -> HashMap<String, Value> {
    [("input_ids".to_string(), kiln_tests::ids(&[ids])), ("attention_mask".to_string(), kiln_tests::ids(&[mask]))]
        .into()
}

/// `[seq, width]` rows of an output of a batch-1 run.
fn rows(outputs: &[(String, Value)], name: &str) -> Vec<Vec<f32>> {
    let (_, v) = outputs.iter().find(|(n, _)| n == name).expect("output present");
    let t = v.as_f32().expect("f32");
    let width = *t.shape.last().expect("rank >= 1");
    t.data.chunks(width).map(<[f32]>::to_vec).collect()
}

const IDS: [i64; 9] = [3, 1, 4, 1, 5, 9, 2, 6, 5];
/// Position 2 is padding: later queries must keep ignoring it once it is in the cache.
const MASK: [i64; 9] = [1, 1, 0, 1, 1, 1, 1, 1, 1];

fn pieces_match_one_run(exec: Exec) {
    let g = tiny();
    let p = Prepared::new(&g, exec);
    let whole = p.run(&feed(&IDS, &MASK));
    let mut cache = KvCache::new();
    let mut got: HashMap<&str, Vec<Vec<f32>>> = HashMap::new();
    // A prompt of 4, single tokens, a chunk of 2, a single token.
    let mut at = 0;
    for len in [4, 1, 1, 2, 1] {
        let outputs = p.run_cached(&feed(&IDS[at..at + len], &MASK[at..at + len]), &mut cache).expect("runs");
        at += len;
        assert_eq!(cache.positions(), at, "the cache holds every token fed so far");
        // (`hidden`, a mean over the run's positions, has no per-position meaning.)
        got.entry("logits").or_default().extend(rows(&outputs, "logits"));
    }
    for name in ["logits"] {
        let want = rows(&whole, name);
        assert_eq!(got[name].len(), want.len());
        for (pos, (a, b)) in got[name].iter().zip(&want).enumerate() {
            let scale = b.iter().fold(1f32, |m, v| m.max(v.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(diff <= 1e-5 * scale, "{exec:?} {name} at position {pos}: max diff {diff} (scale {scale})");
        }
    }
}

#[test]
fn pieces_over_the_cache_match_one_run_interp() {
    pieces_match_one_run(Exec::Interp);
}

#[test]
fn pieces_over_the_cache_match_one_run_jit() {
    pieces_match_one_run(Exec::Jit { threads: 2 });
}

#[test]
fn a_failed_run_leaves_the_cache_as_it_was() {
    let g = tiny();
    let p = Prepared::new(&g, Exec::Interp);
    let whole = p.run(&feed(&IDS[..5], &MASK[..5]));
    let mut cache = KvCache::new();
    p.run_cached(&feed(&IDS[..3], &MASK[..3]), &mut cache).expect("runs");
    // Id 99 is outside the 32-row embedding: the run fails after nothing was committed.
    let err = p.run_cached(&feed(&[99, 1], &[1, 1]), &mut cache).expect_err("bad id");
    assert!(err.to_string().contains("99"), "{err}");
    assert_eq!(cache.positions(), 3);
    let rest = p.run_cached(&feed(&IDS[3..5], &MASK[3..5]), &mut cache).expect("runs");
    let (a, b) = (rows(&rest, "logits"), rows(&whole, "logits"));
    for (x, y) in a.iter().flatten().zip(b[3..].iter().flatten()) {
        assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{x} vs {y}");
    }
}

#[test]
fn the_cache_keeps_its_batch_size() {
    let g = tiny();
    let p = Prepared::new(&g, Exec::Interp);
    let mut cache = KvCache::new();
    p.run_cached(&feed(&IDS[..3], &MASK[..3]), &mut cache).expect("runs");
    let two = [("input_ids".to_string(), ids(&[&[1], &[2]])), ("attention_mask".to_string(), ids(&[&[1], &[1]]))];
    let err = p.run_cached(&two.into(), &mut cache).expect_err("batch changed");
    assert!(err.to_string().contains("holds 1 sequences, this run has 2"), "{err}");
    cache.clear();
    assert_eq!(cache.positions(), 0);
}
