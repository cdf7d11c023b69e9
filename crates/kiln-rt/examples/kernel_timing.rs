//! Quick kernel timings (no criterion): median of 20 calls after a warm-up.
//!
//!     cargo run --release -p kiln-interp --example kernel_timing
//!
//! Also runs whole-model estimates built from the kernels with random weights: a 6-layer
//! all-MiniLM-L6-v2-shaped BERT and a 30-layer SmolLM2-135M-shaped llama, both on 1 x 128
//! tokens (the llama reuses one layer's weights for all 30 layers, so its weights stay warmer
//! in cache than in a real model).

use kiln_rt::kernels::*;
use kiln_rt::tensor::Tensor;
use std::hint::black_box;
use std::time::Instant;

fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let n = shape.iter().product();
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::new(shape, data)
}

/// Median wall time in ms of `iters` calls (after one warm-up call).
fn time<R>(iters: usize, mut f: impl FnMut() -> R) -> f64 {
    black_box(f());
    let mut v: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(name: &str, ms: f64) {
    println!("{name:<48} {ms:9.3} ms");
}

/// [1, s, h*d] -> [1, h, s, d]
fn heads(x: &Tensor, h: usize) -> Tensor {
    let (s, hd) = (x.shape[1], x.shape[2]);
    transpose(&reshape(x, &[1, s, h, hd / h]), &[0, 2, 1, 3])
}

/// [1, h, s, d] -> [1, s, h*d]
fn unheads(x: &Tensor) -> Tensor {
    let (h, s, d) = (x.shape[1], x.shape[2], x.shape[3]);
    reshape(&transpose(x, &[0, 2, 1, 3]), &[1, s, h * d])
}

struct BertLayer {
    wq: Tensor,
    bq: Tensor,
    wk: Tensor,
    bk: Tensor,
    wv: Tensor,
    bv: Tensor,
    wo: Tensor,
    bo: Tensor,
    g1: Tensor,
    b1: Tensor,
    w1: Tensor,
    bb1: Tensor,
    w2: Tensor,
    bb2: Tensor,
    g2: Tensor,
    b2: Tensor,
}

impl BertLayer {
    fn new(seed: u64) -> Self {
        let (d, f) = (384, 1536);
        let w = |o, i, s| rand(&[o, i], seed * 100 + s, (1.0 / i as f32).sqrt());
        let v = |n, s| rand(&[n], seed * 100 + s, 0.1);
        BertLayer {
            wq: w(d, d, 1),
            bq: v(d, 2),
            wk: w(d, d, 3),
            bk: v(d, 4),
            wv: w(d, d, 5),
            bv: v(d, 6),
            wo: w(d, d, 7),
            bo: v(d, 8),
            g1: Tensor::full([d], 1.0),
            b1: v(d, 9),
            w1: w(f, d, 10),
            bb1: v(f, 11),
            w2: w(d, f, 12),
            bb2: v(d, 13),
            g2: Tensor::full([d], 1.0),
            b2: v(d, 14),
        }
    }

    fn forward(&self, x: &Tensor, mask: &[f32]) -> Tensor {
        let q = heads(&linear(x, &self.wq, Some(&self.bq)), 12);
        let k = heads(&linear(x, &self.wk, Some(&self.bk)), 12);
        let v = heads(&linear(x, &self.wv, Some(&self.bv)), 12);
        let a = unheads(&attention(&q, &k, &v, Some(mask), false, 32f32.powf(-0.5)));
        let a = linear(&a, &self.wo, Some(&self.bo));
        let x = layer_norm(&binary(BinaryOp::Add, &a, x), &self.g1, &self.b1, 1e-12);
        let h = unary(UnaryOp::Gelu, &linear(&x, &self.w1, Some(&self.bb1)));
        let h = linear(&h, &self.w2, Some(&self.bb2));
        layer_norm(&binary(BinaryOp::Add, &h, &x), &self.g2, &self.b2, 1e-12)
    }
}

struct LlamaLayer {
    n1: Tensor,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    n2: Tensor,
    wg: Tensor,
    wu: Tensor,
    wd: Tensor,
}

impl LlamaLayer {
    fn new(seed: u64) -> Self {
        let (d, kv, f) = (576, 192, 1536);
        let w = |o, i, s| rand(&[o, i], seed * 100 + s, (1.0 / i as f32).sqrt());
        LlamaLayer {
            n1: Tensor::full([d], 1.0),
            wq: w(d, d, 1),
            wk: w(kv, d, 2),
            wv: w(kv, d, 3),
            wo: w(d, d, 4),
            n2: Tensor::full([d], 1.0),
            wg: w(f, d, 5),
            wu: w(f, d, 6),
            wd: w(d, f, 7),
        }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.shape[1];
        let h = rms_norm(x, &self.n1, 1e-5);
        let q = reshape(&linear(&h, &self.wq, None), &[1, s, 9, 64]);
        let k = reshape(&linear(&h, &self.wk, None), &[1, s, 3, 64]);
        let v = reshape(&linear(&h, &self.wv, None), &[1, s, 3, 64]);
        let q = transpose(&rope(&q, 100000.0, false, 0), &[0, 2, 1, 3]);
        let k = transpose(&rope(&k, 100000.0, false, 0), &[0, 2, 1, 3]);
        let v = transpose(&v, &[0, 2, 1, 3]);
        let a = unheads(&attention(&q, &k, &v, None, true, 0.125));
        let x = binary(BinaryOp::Add, x, &linear(&a, &self.wo, None));
        let h = rms_norm(&x, &self.n2, 1e-5);
        let g = unary(UnaryOp::Silu, &linear(&h, &self.wg, None));
        let u = linear(&h, &self.wu, None);
        let m = linear(&binary(BinaryOp::Mul, &g, &u), &self.wd, None);
        binary(BinaryOp::Add, &x, &m)
    }
}

fn main() {
    println!("threads: rayon {}", rayon::current_num_threads());

    let x = rand(&[128, 384], 1, 1.0);
    let w = rand(&[1536, 384], 2, 0.05);
    let b = rand(&[1536], 3, 0.1);
    let ms = time(20, || linear(&x, &w, Some(&b)));
    let gflops = 2.0 * 128.0 * 384.0 * 1536.0 / (ms * 1e6);
    report("linear [128,384] x [1536,384]^T + b", ms);
    println!("{:<48} {gflops:9.1} GFLOP/s", "");

    let w2 = rand(&[384, 1536], 4, 0.05);
    let h = rand(&[128, 1536], 5, 1.0);
    report("linear [128,1536] x [384,1536]^T", time(20, || linear(&h, &w2, None)));

    let lm = rand(&[49152, 576], 6, 0.05);
    let xl = rand(&[128, 576], 7, 1.0);
    let ms = time(5, || linear(&xl, &lm, None));
    report("linear [128,576] x [49152,576]^T (lm head)", ms);
    println!("{:<48} {:9.1} GFLOP/s", "", 2.0 * 128.0 * 576.0 * 49152.0 / (ms * 1e6));
    let x1 = rand(&[1, 576], 8, 1.0);
    report("linear [1,576] x [49152,576]^T (decode gemv)", time(20, || linear(&x1, &lm, None)));
    drop(lm);

    let q = rand(&[1, 12, 128, 32], 10, 1.0);
    let k = rand(&[1, 12, 128, 32], 11, 1.0);
    let v = rand(&[1, 12, 128, 32], 12, 1.0);
    let mask = vec![1.0f32; 128];
    report("attention [1,12,128,32] key_mask", time(20, || attention(&q, &k, &v, Some(&mask), false, 0.17)));
    let q9 = rand(&[1, 9, 128, 64], 13, 1.0);
    let k3 = rand(&[1, 3, 128, 64], 14, 1.0);
    let v3 = rand(&[1, 3, 128, 64], 15, 1.0);
    report("attention [1,9,128,64] GQA kv=3 causal", time(20, || attention(&q9, &k3, &v3, None, true, 0.125)));

    let ln_x = rand(&[128, 384], 20, 2.0);
    let g = Tensor::full([384], 1.0);
    let be = rand(&[384], 21, 0.1);
    report("layer_norm [128,384]", time(20, || layer_norm(&ln_x, &g, &be, 1e-12)));
    let g2 = Tensor::full([1536], 1.0);
    let be2 = rand(&[1536], 22, 0.1);
    report("layer_norm [128,1536]", time(20, || layer_norm(&h, &g2, &be2, 1e-12)));
    let hx = rand(&[128, 1536], 23, 3.0);
    report("gelu [128,1536]", time(20, || unary(UnaryOp::Gelu, &hx)));
    report("silu [128,1536]", time(20, || unary(UnaryOp::Silu, &hx)));
    report("softmax [12,128,128] last axis", time(20, || softmax(&rand(&[12, 128, 128], 24, 4.0), 2)));
    let t4 = rand(&[1, 128, 12, 32], 25, 1.0);
    report("transpose [1,128,12,32] -> [1,12,128,32]", time(20, || transpose(&t4, &[0, 2, 1, 3])));
    let r4 = rand(&[1, 128, 9, 64], 26, 1.0);
    report("rope [1,128,9,64]", time(20, || rope(&r4, 100000.0, false, 0)));
    let add_b = rand(&[128, 1536], 27, 1.0);
    report("add [128,1536] + [128,1536]", time(20, || binary(BinaryOp::Add, &hx, &add_b)));

    // ---- whole-model estimates --------------------------------------------------------
    let layers: Vec<BertLayer> = (0..6).map(BertLayer::new).collect();
    let x0 = rand(&[1, 128, 384], 30, 1.0);
    let mask = vec![1.0f32; 128];
    let ms = time(10, || {
        let mut x = x0.clone();
        for l in &layers {
            x = l.forward(&x, &mask);
        }
        x
    });
    report("BERT 6 layers (MiniLM-L6 shapes), 1x128", ms);

    let layer = LlamaLayer::new(40);
    let norm = Tensor::full([576], 1.0);
    let lm = rand(&[49152, 576], 41, 0.05);
    let x0 = rand(&[1, 128, 576], 42, 1.0);
    let ms_layer = time(5, || layer.forward(&x0));
    report("llama 1 layer (SmolLM2-135M shapes), 1x128", ms_layer);
    let ms = time(3, || {
        let mut x = x0.clone();
        for _ in 0..30 {
            x = layer.forward(&x);
        }
        linear(&rms_norm(&x, &norm, 1e-5), &lm, None)
    });
    report("llama 30 layers + lm head, 1x128", ms);
}
