//! Single-thread speed of the f32-weight GEMM (`sgemm`) on MiniLM's and SmolLM2's shapes,
//! best of repeated runs interleaved over the shapes:
//!
//! ```sh
//! cargo run --release -p kiln-exec --example sgemm_timing [M]
//! ```

use std::time::{Duration, Instant};

fn main() {
    let m: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(128);
    let shapes = [(384, 384), (384, 1536), (1536, 384), (576, 1536), (1536, 576)];
    let cases: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(k, n)| {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
            (x, w)
        })
        .collect();
    let mut best = vec![f64::MAX; cases.len()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(4) {
        for (((k, n), (x, w)), best) in shapes.iter().zip(&cases).zip(&mut best) {
            let mut y = vec![0f32; m * n];
            let t = Instant::now();
            kiln_exec::sgemm::run(*k, *n, x, w, &mut y, 0..m, 0..*n).expect("AVX2 and FMA");
            *best = best.min(t.elapsed().as_secs_f64());
        }
    }
    for ((k, n), t) in shapes.iter().zip(best) {
        println!("K={k} N={n} M={m}: {:.1} us, {:.1} GFLOP/s", t * 1e6, 2.0 * (m * n * k) as f64 / t * 1e-9);
    }
}
