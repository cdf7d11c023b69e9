//! Single-thread speed of the fused linear kernels (no epilogue), GEMV (M = 1) and GEMM
//! (M = 128), against `matrixmultiply::sgemm` for f32 GEMM.
//!
//! ```sh
//! cargo run --release -p kiln-jit --example linear_timing [-- --formats f32,q8_0,q4_1]
//!     [--opt none|speed] [--shapes 576x576,...] [--tiles D,P,X,MIN,U] [--best]
//! cargo run --release -p kiln-jit --example linear_timing -- --sweep M \
//!     --formats f32 --shapes 576x576 --tiles D,P,X,MIN,U --tiles ...
//! ```
//!
//! `--sweep M` compares tilings (each `--tiles` is direct rows, panel rows, panel x rows,
//! panel threshold, unroll) on one problem, timing them interleaved and keeping each one's
//! best time, which is robust on a machine shared with other work.
//!
//! GEMV is measured twice: "hot" (the same weight every call, cache resident when it fits)
//! and "cold" (cycling through enough copies of the weight to miss the 32 MB L3, as in a
//! real decode step where each layer's weights come from DRAM).

use kiln_ir::Format;
use kiln_jit::{HostIsa, IsaOptions, LinearKernel, LinearSpec, LinearTiles, OptLevel, Residual};
use std::time::{Duration, Instant};

const SHAPES: [(usize, usize); 5] = [(576, 576), (576, 1536), (1536, 576), (384, 1536), (576, 49152)];

fn main() {
    // matrixmultiply is built with its `threading` feature in this workspace: one thread.
    // SAFETY: set before any other thread exists.
    unsafe { std::env::set_var("MATMUL_NUM_THREADS", "1") };

    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let formats: Vec<Format> = opt("--formats")
        .unwrap_or_else(|| "f32,q8_0,q4_1".into())
        .split(',')
        .map(|f| f.parse().expect("format"))
        .collect();
    let shapes: Vec<(usize, usize)> = match opt("--shapes") {
        Some(s) => s
            .split(',')
            .map(|kn| {
                let (k, n) = kn.split_once('x').expect("KxN");
                (k.parse().unwrap(), n.parse().unwrap())
            })
            .collect(),
        None => SHAPES.to_vec(),
    };
    BEST.store(args.iter().any(|a| a == "--best"), std::sync::atomic::Ordering::Relaxed);
    let opt_level = match opt("--opt").as_deref() {
        Some("speed") => OptLevel::Speed,
        _ => OptLevel::None,
    };
    let tiles_override: Option<Vec<usize>> = opt("--tiles").map(|t| t.split(',').map(|v| v.parse().unwrap()).collect());
    if let Some(m) = opt("--sweep") {
        let all: Vec<LinearTiles> =
            args.iter().enumerate().filter(|(_, a)| *a == "--tiles").map(|(i, _)| parse_tiles(&args[i + 1])).collect();
        let isa = HostIsa::with_options(IsaOptions { opt_level, ..IsaOptions::default() }).unwrap();
        sweep(&isa, formats[0], shapes[0], m.parse().unwrap(), &all);
        return;
    }
    let isa = HostIsa::with_options(IsaOptions { opt_level, ..IsaOptions::default() }).unwrap();
    println!("host: {}  opt_level: {opt_level:?}", isa.features());
    println!(
        "{:<6} {:>5} {:>6} {:>4} {:>9} {:>8} {:>8} {:>10}  note",
        "format", "K", "N", "M", "us/call", "GFLOP/s", "GB/s(W)", "compile"
    );

    for &format in &formats {
        for &(k, n) in &shapes {
            let spec = LinearSpec::new(k, n, format);
            let mut tiles = LinearTiles::for_format(format);
            if let Some(t) = &tiles_override {
                tiles = LinearTiles {
                    direct_rows: t[0],
                    panel_rows: t[1],
                    panel_xrows: t[2],
                    panel_min_rows: t[3],
                    unroll: t[4],
                };
            }
            let start = Instant::now();
            let kernel = LinearKernel::compile_with(&isa, spec, tiles, false).unwrap();
            let compile = start.elapsed();
            let wbytes = spec.weight_bytes();
            // Enough copies to exceed L3 (~32 MB) twice over for the cold GEMV.
            let copies = (96 << 20) / wbytes + 1;
            let weights: Vec<Vec<u8>> = (0..copies).map(|c| weight(format, n, k, c as u64)).collect();
            for m in [1usize, 128] {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
                let mut y = vec![0.0f32; m * n];
                let flops = 2.0 * (m * n * k) as f64;
                let report = |t: Duration, note: &str, compile: Option<Duration>| {
                    let s = t.as_secs_f64();
                    println!(
                        "{:<6} {:>5} {:>6} {:>4} {:>9.1} {:>8.1} {:>8.1} {:>10}  {}",
                        format.name(),
                        k,
                        n,
                        m,
                        s * 1e6,
                        flops / s * 1e-9,
                        wbytes as f64 / s * 1e-9,
                        compile.map(|c| format!("{:.2} ms", c.as_secs_f64() * 1e3)).unwrap_or_default(),
                        note
                    );
                };
                let run = |w: &[u8], y: &mut [f32]| {
                    kernel.run(&x, w, None, Residual::None, y, 0..m).unwrap();
                };
                let hot = time(|| run(&weights[0], &mut y));
                report(hot, if m == 1 { "jit, hot" } else { "jit" }, Some(compile));
                if m == 1 && copies > 1 {
                    let mut c = 0;
                    let cold = time(|| {
                        c = (c + 1) % copies;
                        run(&weights[c], &mut y)
                    });
                    report(cold, "jit, cold (weights from DRAM)", None);
                }
                if format == Format::F32 && m == 128 {
                    let w = &weights[0];
                    let wf: Vec<f32> = w.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
                    let t = time(|| unsafe {
                        // SAFETY: x is [m, k], wf is [n, k] read as its transpose [k, n]
                        // (row stride 1, column stride k), y is [m, n]; all in bounds.
                        matrixmultiply::sgemm(
                            m,
                            k,
                            n,
                            1.0,
                            x.as_ptr(),
                            k as isize,
                            1,
                            wf.as_ptr(),
                            1,
                            k as isize,
                            0.0,
                            y.as_mut_ptr(),
                            n as isize,
                            1,
                        )
                    });
                    report(t, "matrixmultiply::sgemm", None);
                }
            }
        }
    }
}

fn parse_tiles(t: &str) -> LinearTiles {
    let v: Vec<usize> = t.split(',').map(|v| v.parse().expect("tiles: D,P,X,MIN,U")).collect();
    LinearTiles { direct_rows: v[0], panel_rows: v[1], panel_xrows: v[2], panel_min_rows: v[3], unroll: v[4] }
}

/// Best time per call of each tiling on one problem, runs interleaved.
fn sweep(isa: &HostIsa, format: Format, (k, n): (usize, usize), m: usize, all: &[LinearTiles]) {
    let spec = LinearSpec::new(k, n, format);
    let kernels: Vec<LinearKernel> =
        all.iter().map(|&t| LinearKernel::compile_with(isa, spec, t, false).unwrap()).collect();
    let w = weight(format, n, k, 1);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut y = vec![0.0f32; m * n];
    let mut best = vec![f64::MAX; kernels.len()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for (kernel, best) in kernels.iter().zip(&mut best) {
            let t = Instant::now();
            kernel.run(&x, &w, None, Residual::None, &mut y, 0..m).unwrap();
            *best = best.min(t.elapsed().as_secs_f64());
        }
    }
    let flops = 2.0 * (m * n * k) as f64;
    for (t, s) in all.iter().zip(best) {
        println!("{format} K={k} N={n} M={m} {t:?}: {:.1} us, {:.1} GFLOP/s", s * 1e6, flops / s * 1e-9);
    }
}

/// Report the best sample instead of the median (`--best`).
static BEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Median (or best, `--best`) time of one call over repeated runs after a warm-up, at least
/// ~0.3 s in total; each sample averages a batch of calls of ~10 ms.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut warm = 0;
    while start.elapsed() < Duration::from_millis(50) || warm < 3 {
        f();
        warm += 1;
    }
    let per = start.elapsed() / warm;
    let batch = ((Duration::from_millis(10).as_secs_f64() / per.as_secs_f64()) as u32).max(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(300) || samples.len() < 5 {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        samples.push(t.elapsed() / batch);
    }
    samples.sort();
    if BEST.load(std::sync::atomic::Ordering::Relaxed) { samples[0] } else { samples[samples.len() / 2] }
}

/// Deterministic weight bytes with realistic values (finite scales, varied quants).
fn weight(format: Format, n: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let elems = n * k;
    let f16 = |v: f32| half_bits(v).to_le_bytes();
    let mut out = Vec::with_capacity(format.byte_len(elems as u64).unwrap() as usize);
    match format {
        Format::F32 => (0..elems).for_each(|_| out.extend(((next() % 2001) as f32 / 1e4 - 0.1).to_le_bytes())),
        Format::F16 | Format::BF16 => (0..elems).for_each(|_| out.extend(f16(0.01))),
        Format::Q8_0 | Format::Q4_0 | Format::Q4_1 => {
            let per = format.block_bytes() as usize;
            for _ in 0..elems / 32 {
                out.extend(f16(0.01));
                if format == Format::Q4_1 {
                    out.extend(f16(-0.08));
                }
                let q = per - if format == Format::Q4_1 { 4 } else { 2 };
                out.extend((0..q).map(|_| next() as u8));
            }
        }
        Format::Int(f) => {
            let values: Vec<f32> = (0..elems).map(|_| (next() % 2001) as f32 / 1e4 - 0.1).collect();
            out = f.quantize(&values);
        }
        Format::Fp8(f) => {
            let values: Vec<f32> = (0..elems).map(|_| (next() % 2001) as f32 / 1e4 - 0.1).collect();
            out = f.quantize(&values);
        }
        Format::U8 => unreachable!("u8 is not a linear weight format"),
    }
    out
}

/// f16 bits of a normal value (enough for the constants above).
fn half_bits(v: f32) -> u16 {
    let b = v.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xFF) as i32 - 127 + 15;
    let mant = ((b >> 13) & 0x3FF) as u16;
    sign | ((exp as u16) << 10) | mant
}
