//! Times GPTQ's parts on layer shapes of SmolLM2-135M, with synthetic correlated inputs:
//! `cargo run --release -p kiln-passes --example gptq_timing [THREADS]`.

use kiln_ir::IntFormat;
use kiln_passes::quantize::gptq::{Factored, GptqOptions};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|t| t.parse().ok()).unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("a thread pool");
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for (n, k) in [(256, 576), (1536, 576), (288, 1536)] {
        // Inputs with a shared component, so that H is far from diagonal.
        let m = 512;
        let x: Vec<f64> = (0..m * k).map(|i| uniform() + 0.5 * ((i / k) as f64 * 0.37).sin()).collect();
        let mut h = vec![0f64; k * k];
        for r in x.chunks_exact(k) {
            for i in 0..k {
                for j in 0..k {
                    h[i * k + j] += r[i] * r[j];
                }
            }
        }
        let w: Vec<f32> = (0..n * k).map(|_| (0.05 * uniform()) as f32).collect();
        for clip in [false, true] {
            let opts = GptqOptions { clip, ..Default::default() };
            let t = Instant::now();
            let factored = Factored::new(&h, k, &opts).expect("positive definite");
            let factor = t.elapsed().as_secs_f64() * 1e3;
            for name in ["int4g64a", "int4g32", "int3g64"] {
                let f: IntFormat = name.parse().expect("a format");
                let runs = 3;
                let t = Instant::now();
                for _ in 0..runs {
                    pool.install(|| factored.quantize(&w, n, f).expect("quantized"));
                }
                let ms = t.elapsed().as_secs_f64() * 1e3 / runs as f64;
                println!(
                    "{n:5} x {k:4} clip={clip:5} {name:9} factor {factor:7.1} ms  sweep {ms:7.1} ms  ({:.1} ns/weight, {threads} threads)",
                    ms * 1e6 / (n * k) as f64
                );
            }
        }
    }
}
