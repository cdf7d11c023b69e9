//! Single-thread speed of the f32-weight GEMMs, `sgemm` (dot products along `K`) and
//! `sgemm_kn` (on the weight transposed: FMA chains along `K`), on MiniLM's and SmolLM2's
//! shapes and the low-rank factors' short reductions, best of repeated runs interleaved
//! over the shapes:
//!
//! ```sh
//! cargo run --release -p kiln-exec --example sgemm_timing [M]
//! ```

use std::time::{Duration, Instant};

fn main() {
    let m: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(128);
    let shapes = [
        (384, 384),
        (384, 1536),
        (1536, 384),
        (576, 1536),
        (1536, 576),
        (32, 384),
        (64, 384),
        (96, 384),
        (128, 384),
        (160, 1536),
        (192, 1536),
        (256, 1536),
        (384, 96),
        (1536, 128),
    ];
    let cases: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|&(k, n)| {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
            let wt = kiln_exec::sgemm_kn::transpose(k, n, &w);
            (x, w, wt)
        })
        .collect();
    let mut best = vec![[f64::MAX; 2]; cases.len()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(6) {
        for (((k, n), (x, w, wt)), best) in shapes.iter().zip(&cases).zip(&mut best) {
            let mut y = vec![0f32; m * n];
            let t = Instant::now();
            kiln_exec::sgemm::run(*k, *n, x, w, &mut y, 0..m, 0..*n).expect("AVX2 and FMA");
            best[0] = best[0].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            kiln_exec::sgemm_kn::run(*k, *n, x, wt, &mut y, 0..m, 0..*n).expect("AVX2 and FMA");
            best[1] = best[1].min(t.elapsed().as_secs_f64());
        }
    }
    let gflops = |k: usize, n: usize, t: f64| 2.0 * (m * n * k) as f64 / t * 1e-9;
    for ((k, n), [dot, kn]) in shapes.iter().zip(best) {
        println!(
            "K={k} N={n} M={m}: sgemm {:.1} us, {:.1} GFLOP/s; sgemm_kn {:.1} us, {:.1} GFLOP/s",
            dot * 1e6,
            gflops(*k, *n, dot),
            kn * 1e6,
            gflops(*k, *n, kn)
        );
    }
}
