//! Single-thread speed of the W8A8 linear kernels (`linear_i8`, no epilogue) against the
//! f32-activation kernels (`LinearKernel`) on the same weights, GEMV (M = 1) and GEMM
//! (M = 128), plus the cost of quantizing the activations.
//!
//! ```sh
//! cargo run --release -p kiln-jit --example i8_timing [-- --formats q4_1,q4_0,q8_0]
//!     [--shapes 576x1536,...] [--m 1,128] [--tiles D,R,X,MIN] [--panel P] [--best] [--no-f32]
//! cargo run --release -p kiln-jit --example i8_timing -- --disasm q4_1 576 1536 [--tiles ..]
//! cargo run --release -p kiln-jit --example i8_timing -- --sweep M --formats q4_1 --shapes 576x576 \
//!     --tiles D,R,X,MIN --tiles ...
//! ```
//!
//! `--panel P` times the kernels on weights packed into panels of `P` rows (`pack_weight`),
//! and the 256-bit prefill GEMM (`gemm_i8`, "g256") on them, and for Q8_0 the GEMM on its
//! own layout (`gemm_q8`, "q8").
//! `--cold` times GEMV on weights streamed from memory instead (see `cold`), for each
//! `--tiles` and each of `--panels 0,16,..` (0: as stored), with `--threads T` splitting
//! columns as the engine does:
//!
//! ```sh
//! cargo run --release -p kiln-jit --example i8_timing -- --cold --threads 2 --panels 0,16 \
//!     --formats q4_1,q8_0 --shapes 576x1536,576x49152
//! ```
//!
//! `--sweep M` compares tilings on one problem, timing them interleaved and keeping each
//! one's best time (robust on a machine shared with other work).
//!
//! GOP/s counts `2 M N K` operations (a multiply and an add per weight and row), for both
//! kernels. "quant" is the time of `quantize_rows` for the `[M, K]` activations, included
//! in the "+q" column. GEMV is timed "hot" (the same weight every call).

use kiln_exec::linear_i8::{pack_weight, quantize_rows};
use kiln_ir::Format;
use kiln_jit::{
    HostIsa, LinearI8Kernel, LinearI8Spec, LinearI8Tiles, LinearKernel, LinearSpec, QuantizedActivations, Residual,
};
use std::time::{Duration, Instant};

const SHAPES: [(usize, usize); 4] = [(576, 1536), (1536, 576), (576, 576), (576, 49152)];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| args.iter().position(|a| a == name).map(|i| args[i + 1].clone());
    let tiles = opt("--tiles").map(|t| parse_tiles(&t)).unwrap_or_default();
    let isa = HostIsa::native().unwrap();
    if let Some(i) = args.iter().position(|a| a == "--disasm") {
        let format: Format = args[i + 1].parse().expect("format");
        let (k, n) = (args[i + 2].parse().expect("K"), args[i + 3].parse().expect("N"));
        eprintln!("host: {}  tiles: {tiles:?}", isa.features());
        let kernel = LinearI8Kernel::compile_with(&isa, LinearI8Spec::new(k, n, format), tiles, true).unwrap();
        let stats = kernel.stats();
        eprintln!("{} code bytes, compiled in {:?} (+{:?} IR build)", stats.code_bytes, stats.compile, stats.build);
        print!("{}", stats.disasm.as_deref().unwrap_or(""));
        return;
    }
    let all_tiles: Vec<LinearI8Tiles> =
        args.iter().enumerate().filter(|(_, a)| *a == "--tiles").map(|(i, _)| parse_tiles(&args[i + 1])).collect();
    let formats: Vec<Format> = opt("--formats")
        .unwrap_or_else(|| "q4_1,q4_0,q8_0".into())
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
    let ms: Vec<usize> =
        opt("--m").unwrap_or_else(|| "1,128".into()).split(',').map(|m| m.parse().expect("M")).collect();
    if args.iter().any(|a| a == "--cold") {
        let threads = opt("--threads").map_or(1, |t| t.parse().expect("threads"));
        let panels: Vec<usize> =
            opt("--panels").unwrap_or_else(|| "0".into()).split(',').map(|p| p.parse().expect("panel")).collect();
        cold(&isa, &formats, &shapes, &all_tiles, &panels, threads);
        return;
    }
    if let Some(m) = opt("--sweep") {
        sweep(&isa, formats[0], shapes[0], m.parse().expect("M"), &all_tiles);
        return;
    }
    BEST.store(args.iter().any(|a| a == "--best"), std::sync::atomic::Ordering::Relaxed);
    let with_f32 = !args.iter().any(|a| a == "--no-f32");
    let panel: usize = opt("--panel").map_or(0, |p| p.parse().expect("panel"));

    println!("host: {}  tiles: {tiles:?}", isa.features());
    println!(
        "{:<6} {:>5} {:>6} {:>4} | {:>9} {:>8} {:>8} {:>8} {:>8} | {:>9} {:>8} | {:>6} | {:>8} {:>8}",
        "format",
        "K",
        "N",
        "M",
        "i8 us",
        "GOP/s",
        "quant us",
        "+q GOP/s",
        "GB/s(W)",
        "f32 us",
        "GFLOP/s",
        "speedup",
        "g256 GOP/s",
        "q8 GOP/s"
    );
    for &format in &formats {
        for &(k, n) in &shapes {
            let spec = LinearI8Spec::new(k, n, format).packed(panel);
            let kernel = LinearI8Kernel::compile_with(&isa, spec, tiles, false).unwrap();
            let f32_kernel = with_f32.then(|| LinearKernel::compile(&isa, LinearSpec::new(k, n, format)).unwrap());
            let w = weight(format, n, k, 1);
            let w_i8 = match panel {
                0 => w.clone(),
                _ => {
                    let mut out = vec![0; w.len()];
                    pack_weight(&spec, &w, &mut out).unwrap();
                    out
                }
            };
            for &m in &ms {
                let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
                let mut xq = QuantizedActivations::new();
                quantize_rows(&x, k, &mut xq);
                let mut y = vec![0.0f32; m * n];
                let ops = 2.0 * (m * n * k) as f64;
                let t_i8 = time(|| kernel.run(&xq, &w_i8, None, Residual::None, &mut y, 0..m).unwrap()).as_secs_f64();
                let t_q = time(|| quantize_rows(&x, k, &mut xq)).as_secs_f64();
                // The 256-bit GEMM on the same packed weight (`--panel` only).
                let g256 = (panel > 0 && kiln_exec::gemm_i8::available()).then(|| {
                    let t = time(|| kiln_exec::gemm_i8::run(&spec, &xq, &w_i8, &mut y, 0..m).unwrap()).as_secs_f64();
                    format!("{:.1}", ops / t * 1e-9)
                });
                // Q8_0 on the GEMM's own layout (`gemm_q8`), for the same products.
                let q8 = (panel > 0 && format == kiln_ir::Format::Q8_0 && kiln_exec::gemm_q8::available()).then(|| {
                    let mut lw = vec![0u8; kiln_exec::gemm_q8::layout_bytes(n, k)];
                    kiln_exec::gemm_q8::pack(&w, n, k, &mut lw).unwrap();
                    let t = time(|| kiln_exec::gemm_q8::run(n, &xq, &lw, &mut y, 0..m).unwrap()).as_secs_f64();
                    format!("{:.1}", ops / t * 1e-9)
                });
                let (f32_us, f32_rate, speedup) = match &f32_kernel {
                    Some(fk) => {
                        let t = time(|| fk.run(&x, &w, None, Residual::None, &mut y, 0..m).unwrap()).as_secs_f64();
                        (
                            format!("{:.1}", t * 1e6),
                            format!("{:.1}", ops / t * 1e-9),
                            format!("{:.2}x", t / (t_i8 + t_q)),
                        )
                    }
                    None => Default::default(),
                };
                println!(
                    "{:<6} {:>5} {:>6} {:>4} | {:>9.1} {:>8.1} {:>8.2} {:>8.1} {:>8.1} | {:>9} {:>8} | {:>6} | {:>8} {:>8}",
                    format.name(),
                    k,
                    n,
                    m,
                    t_i8 * 1e6,
                    ops / t_i8 * 1e-9,
                    t_q * 1e6,
                    ops / (t_i8 + t_q) * 1e-9,
                    w.len() as f64 / t_i8 * 1e-9,
                    f32_us,
                    f32_rate,
                    speedup,
                    g256.unwrap_or_default(),
                    q8.unwrap_or_default()
                );
            }
        }
    }
}

fn parse_tiles(t: &str) -> LinearI8Tiles {
    let v: Vec<usize> = t.split(',').map(|v| v.parse().expect("tiles: D,R,X,MIN")).collect();
    LinearI8Tiles { direct_rows: v[0], gemm_rows: v[1], gemm_xrows: v[2], gemm_min_rows: v[3] }
}

/// Best time per call of each tiling on one problem, runs interleaved.
fn sweep(isa: &HostIsa, format: Format, (k, n): (usize, usize), m: usize, all: &[LinearI8Tiles]) {
    let spec = LinearI8Spec::new(k, n, format);
    let kernels: Vec<LinearI8Kernel> =
        all.iter().map(|&t| LinearI8Kernel::compile_with(isa, spec, t, false).unwrap()).collect();
    let w = weight(format, n, k, 1);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    let mut xq = QuantizedActivations::new();
    quantize_rows(&x, k, &mut xq);
    let mut y = vec![0.0f32; m * n];
    let mut best = vec![f64::MAX; kernels.len()];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        for (kernel, best) in kernels.iter().zip(&mut best) {
            let t = Instant::now();
            kernel.run(&xq, &w, None, Residual::None, &mut y, 0..m).unwrap();
            *best = best.min(t.elapsed().as_secs_f64());
        }
    }
    let ops = 2.0 * (m * n * k) as f64;
    for (t, s) in all.iter().zip(best) {
        println!("{format} K={k} N={n} M={m} {t:?}: {:.1} us, {:.1} GOP/s", s * 1e6, ops / s * 1e-9);
    }
}

/// GEMV (M = 1) with weights streamed from memory: each kernel cycles through copies of its
/// weight totaling >= 256 MB, as decode does (every weight read once per token). Tilings are
/// timed interleaved, best of ~2 s; a plain sequential read of the same bytes is the
/// reference. With `--threads T` the columns are split across a pool as the engine does.
fn cold(
    isa: &HostIsa,
    formats: &[Format],
    shapes: &[(usize, usize)],
    tiles: &[LinearI8Tiles],
    panels: &[usize],
    threads: usize,
) {
    let tiles = if tiles.is_empty() { vec![LinearI8Tiles::default()] } else { tiles.to_vec() };
    let all: Vec<(LinearI8Tiles, usize)> = tiles.iter().flat_map(|&t| panels.iter().map(move |&p| (t, p))).collect();
    let pool = kiln_rt::Pool::new(threads);
    for &format in formats {
        for &(k, n) in shapes {
            let spec = LinearI8Spec::new(k, n, format);
            let w = weight(format, n, k, 1);
            let copies = (256usize << 20).div_ceil(w.len()).max(2);
            // Per panel size, the copies in that layout.
            let ws: Vec<Vec<Vec<u8>>> = panels
                .iter()
                .map(|&p| {
                    let w = match p {
                        0 => w.clone(),
                        p => {
                            let mut out = vec![0; w.len()];
                            pack_weight(&spec.packed(p), &w, &mut out).unwrap();
                            let t = time(|| pack_weight(&spec.packed(p), &w, &mut out).unwrap());
                            println!(
                                "{format} {k}x{n} pack_weight panel {p}: {:.2} GB/s",
                                w.len() as f64 / t.as_secs_f64() * 1e-9
                            );
                            out
                        }
                    };
                    (0..copies).map(|_| w.clone()).collect()
                })
                .collect();
            let parts = kiln_rt::split(n, threads, 16);
            let kernels: Vec<Vec<(usize, LinearI8Kernel)>> = all
                .iter()
                .map(|&(t, panel)| {
                    parts
                        .iter()
                        .map(|p| {
                            let s = LinearI8Spec { n: p.len(), panel, ..spec };
                            (p.start, LinearI8Kernel::compile_with(isa, s, t, false).unwrap())
                        })
                        .collect()
                })
                .collect();
            let x: Vec<f32> = (0..k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
            let mut xq = QuantizedActivations::new();
            quantize_rows(&x, k, &mut xq);
            let mut y = vec![0.0f32; n];
            let row_bytes = w.len() / n;
            let yp = y.as_mut_ptr() as usize;
            let mut best = vec![f64::MAX; all.len() + 1];
            let start = Instant::now();
            let mut c = 0;
            while start.elapsed() < Duration::from_secs(2) {
                for (i, best) in best.iter_mut().enumerate() {
                    c = (c + 1) % copies;
                    let wc = &ws[if i == all.len() { 0 } else { i % panels.len() }][c];
                    let t = Instant::now();
                    if i == all.len() {
                        pool.for_ranges(wc.len() / 64, 1, 0, |r| {
                            std::hint::black_box(read_all(&wc[r.start * 64..r.end * 64]));
                        });
                    } else {
                        pool.for_ranges(kernels[i].len(), 1, 0, |r| {
                            for (n0, kernel) in &kernels[i][r] {
                                let s = kernel.spec();
                                // SAFETY: columns n0.. of the weight, x and y as the contract says.
                                unsafe {
                                    (kernel.entry())(
                                        xq.as_ptr(),
                                        wc.as_ptr().add(n0 * row_bytes),
                                        std::ptr::null(),
                                        std::ptr::null(),
                                        (yp as *mut f32).add(*n0),
                                        0,
                                        1,
                                    )
                                };
                                let _ = s;
                            }
                        });
                    }
                    *best = best.min(t.elapsed().as_secs_f64());
                }
            }
            let gb = w.len() as f64 * 1e-9;
            let names = all.iter().map(|(t, p)| {
                let (d, r, x, m) = (t.direct_rows, t.gemm_rows, t.gemm_xrows, t.gemm_min_rows);
                format!("tiles {d},{r},{x},{m} panel {p}")
            });
            for (t, s) in names.chain(["sequential read".into()]).zip(best) {
                println!("{format} {k}x{n} cold x{threads}: {t}: {:.1} us, {:.2} GB/s", s * 1e6, gb / s);
            }
        }
    }
}

/// Sums the bytes as u64 words (a plain sequential read).
fn read_all(b: &[u8]) -> u64 {
    b.chunks_exact(64)
        .map(|c| c.chunks_exact(8).fold(0u64, |a, w| a ^ u64::from_le_bytes(w.try_into().unwrap())))
        .fold(0, |a, v| a.wrapping_add(v))
}

/// Report the best sample instead of the median (`--best`).
static BEST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Median (or best, `--best`) time of one call over repeated runs after a warm-up, at least
/// ~0.2 s in total; each sample averages a batch of calls of ~5 ms.
fn time(mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    let mut warm = 0;
    while start.elapsed() < Duration::from_millis(30) || warm < 3 {
        f();
        warm += 1;
    }
    let per = start.elapsed() / warm;
    let batch = ((Duration::from_millis(5).as_secs_f64() / per.as_secs_f64()) as u32).max(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(200) || samples.len() < 5 {
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
    let f16 = |v: f32| half_bits(v).to_le_bytes();
    let per = format.block_bytes() as usize;
    let mut out = Vec::with_capacity(format.byte_len((n * k) as u64).unwrap() as usize);
    for _ in 0..n * k / 32 {
        out.extend(f16(0.01));
        if format == Format::Q4_1 {
            out.extend(f16(-0.08));
        }
        let q = per - if format == Format::Q4_1 { 4 } else { 2 };
        out.extend((0..q).map(|_| next() as u8));
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
