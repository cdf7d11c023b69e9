//! Single-thread speed of the per-row W8A8 GEMM (`linear_i8row`) at M = 128, best of
//! repeated runs interleaved over the shapes:
//!
//! ```sh
//! cargo run --release -p kiln-jit --example row_timing
//! ```

use kiln_exec::linear_i8row::{RowQuantized, RowWeights, quantize_per_row};
use std::time::{Duration, Instant};

fn main() {
    let m = 128;
    let shapes = [(384, 384), (384, 1536), (1536, 384), (576, 1536)];
    let cases: Vec<(RowWeights, RowQuantized, usize)> = shapes
        .iter()
        .map(|&(k, n)| {
            let f: kiln_ir::IntFormat = format!("int8g{k}").parse().unwrap();
            let values: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let w = RowWeights::from_int8(f, &f.quantize(&values), n, k).unwrap();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
            let mut xq = RowQuantized::new();
            quantize_per_row(&x, k, &mut xq);
            (w, xq, n)
        })
        .collect();
    let mut best = vec![f64::MAX; cases.len()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        for ((w, xq, n), best) in cases.iter().zip(&mut best) {
            let mut y = vec![0f32; m * n];
            let t = Instant::now();
            w.gemm(xq, &mut y, 0..m, 0..*n).unwrap();
            *best = best.min(t.elapsed().as_secs_f64());
        }
    }
    for ((k, n), t) in shapes.iter().zip(best) {
        println!("K={k} N={n} M={m}: {:.1} us, {:.1} GOP/s", t * 1e6, 2.0 * (m * n * k) as f64 / t * 1e-9);
    }
}
