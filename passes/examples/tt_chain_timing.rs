//! A tensor train run as a chain of contractions on the activations, against the dense f32
//! linear on the rebuilt weight, one thread each (issue 16):
//! `cargo run --release -p kiln-passes --example tt_chain_timing -- [ROWS]` (default 1 and
//! 128). Random weights of SmolLM2's and MiniLM's shapes, three cores, bonds 16, 32, 64.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use kiln_passes::factorize::tt::{self, Train};
use std::time::Instant;

/// `c[m, n] = a[m, k] b[k, n]`, all row-major, on the calling thread.
fn mm(c: &mut [f32], a: &[f32], b: &[f32], m: usize, k: usize, n: usize) {
    let a = MatRef::from_row_major_slice(&a[..m * k], m, k);
    let b = MatRef::from_row_major_slice(&b[..k * n], k, n);
    matmul(MatMut::from_row_major_slice_mut(&mut c[..m * n], m, n), Accum::Replace, a, b, 1.0, Par::Seq);
}

/// The three cores as f32 matrices for a left-to-right chain (the order of
/// [`Train::chain_macs`]), and buffers for the intermediates.
struct Chain {
    o: [usize; 3],
    i: [usize; 3],
    r: [usize; 2],
    /// `[(o1 r1), i1]`, `[(o2 r2), (r1 i2)]`, `[(r2 i3), o3]`.
    g1: Vec<f32>,
    g2: Vec<f32>,
    g3: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
}

impl Chain {
    fn new(train: &Train, rows: usize) -> Chain {
        let [c1, c2, c3] = &train.cores[..] else { panic!("three cores") };
        let (o, i, r) = ([c1.out, c2.out, c3.out], [c1.inp, c2.inp, c3.inp], [c1.right, c2.right]);
        let (r1, r2) = (r[0], r[1]);
        let mut g1 = vec![0f32; o[0] * r1 * i[0]];
        for oo in 0..o[0] {
            for ii in 0..i[0] {
                for rr in 0..r1 {
                    g1[(oo * r1 + rr) * i[0] + ii] = c1.values[(oo * i[0] + ii) * r1 + rr] as f32;
                }
            }
        }
        let mut g2 = vec![0f32; o[1] * r2 * r1 * i[1]];
        for rr in 0..r1 {
            for oo in 0..o[1] {
                for ii in 0..i[1] {
                    for ss in 0..r2 {
                        g2[(oo * r2 + ss) * (r1 * i[1]) + rr * i[1] + ii] =
                            c2.values[((rr * o[1] + oo) * i[1] + ii) * r2 + ss] as f32;
                    }
                }
            }
        }
        let mut g3 = vec![0f32; r2 * i[2] * o[2]];
        for ss in 0..r2 {
            for oo in 0..o[2] {
                for ii in 0..i[2] {
                    g3[(ss * i[2] + ii) * o[2] + oo] = c3.values[(ss * o[2] + oo) * i[2] + ii] as f32;
                }
            }
        }
        // The largest intermediate: after core 1 `rows o1 r1 i2 i3`, after core 2
        // `rows o1 o2 r2 i3`.
        let len = rows * (o[0] * r1 * i[1] * i[2]).max(o[0] * o[1] * r2 * i[2]).max(i[0] * i[1] * i[2]);
        Chain { o, i, r, g1, g2, g3, a: vec![0.0; len], b: vec![0.0; len] }
    }

    /// `y [rows, o1 o2 o3] = x [rows, i1 i2 i3] W^T`, each step one matmul over all rows,
    /// with copies that bring the contracted indices together:
    /// 1. `x` as `[i1, (rows i2 i3)]` (a copy), `t1 = G1 x`: `[o1, r1, rows, i2, i3]`;
    /// 2. copied to `[(r1 i2), (rows o1 i3)]`, `t2 = G2 t1`: `[o2, r2, rows, o1, i3]`;
    /// 3. copied to `[(rows o1 o2), (r2 i3)]`, `y = t2 G3`.
    fn run_copies(&mut self, x: &[f32], y: &mut [f32], rows: usize) {
        let ([o1, o2, o3], [i1, i2, i3], [r1, r2]) = (self.o, self.i, self.r);
        let (a, b) = (&mut self.a, &mut self.b);
        let tail = i2 * i3;
        for bb in 0..rows {
            for ii in 0..i1 {
                let from = (bb * i1 + ii) * tail;
                a[(ii * rows + bb) * tail..][..tail].copy_from_slice(&x[from..from + tail]);
            }
        }
        mm(b, &self.g1, a, o1 * r1, i1, rows * tail);
        // [o1, r1, rows, i2, i3] -> [r1, i2, rows, o1, i3]
        for oo in 0..o1 {
            for rr in 0..r1 {
                for bb in 0..rows {
                    for ii in 0..i2 {
                        let from = (((oo * r1 + rr) * rows + bb) * i2 + ii) * i3;
                        let to = (((rr * i2 + ii) * rows + bb) * o1 + oo) * i3;
                        a[to..to + i3].copy_from_slice(&b[from..from + i3]);
                    }
                }
            }
        }
        mm(b, &self.g2, a, o2 * r2, r1 * i2, rows * o1 * i3);
        // [o2, r2, rows, o1, i3] -> [rows, o1, o2, r2, i3]
        for oo in 0..o2 {
            for ss in 0..r2 {
                for bo in 0..rows * o1 {
                    let from = ((oo * r2 + ss) * rows * o1 + bo) * i3;
                    let to = ((bo * o2 + oo) * r2 + ss) * i3;
                    a[to..to + i3].copy_from_slice(&b[from..from + i3]);
                }
            }
        }
        mm(y, a, &self.g3, rows * o1 * o2, r2 * i3, o3);
    }

    /// The same chain without copies, as batches of smaller matmuls on the layouts as they
    /// come: `t1 [rows, o1, r1, i2, i3]` one matmul per row, `t2 [rows, o1, o2, r2, i3]`
    /// one per row and `o1`, then `y = t2 G3` as one.
    fn run_batched(&mut self, x: &[f32], y: &mut [f32], rows: usize) {
        let ([o1, o2, o3], [i1, i2, i3], [r1, r2]) = (self.o, self.i, self.r);
        let (a, b) = (&mut self.a, &mut self.b);
        let (k, t1, t2) = (i1 * i2 * i3, o1 * r1 * i2 * i3, o2 * r2 * i3);
        for bb in 0..rows {
            mm(&mut a[bb * t1..], &self.g1, &x[bb * k..], o1 * r1, i1, i2 * i3);
        }
        let per = r1 * i2 * i3;
        for bo in 0..rows * o1 {
            mm(&mut b[bo * t2..], &self.g2, &a[bo * per..], o2 * r2, r1 * i2, i3);
        }
        mm(y, b, &self.g3, rows * o1 * o2, r2 * i3, o3);
    }
}

/// The median of `runs` timings of `f` in µs, after a few warm-up runs.
fn median_us(runs: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..5 {
        f();
    }
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// The largest difference over the largest magnitude of `reference`.
fn max_relative(got: &[f32], reference: &[f32]) -> f64 {
    let scale = reference.iter().fold(0f64, |m, &v| m.max(v.abs() as f64));
    got.iter().zip(reference).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs())) / scale
}

fn main() {
    let rows: Vec<usize> = match std::env::args().nth(1) {
        Some(r) => vec![r.parse().expect("ROWS, a number")],
        None => vec![1, 128],
    };
    assert!(kiln_exec::sgemm::available(), "kiln's sgemm needs AVX2 and FMA");
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("{cpu}, {cores} hardware threads; every side on 1 thread (faer Par::Seq, kiln sgemm on the caller)");
    println!("dense: y = x W^T on the rebuilt W, kiln_exec::sgemm (what the engine runs) and faer");
    println!("chain: faer matmuls per core, with copies (one matmul per core) or batched (no copies), best of the two");
    println!("median of 50 runs; chain MACs / dense MACs from Train::chain_macs");
    println!();
    println!(
        "{:>10} {:>4} {:>5} {:>9} {:>9} {:>10} {:>10} {:>12} {:>12}",
        "n x k", "rows", "bond", "kiln µs", "faer µs", "copies µs", "batched µs", "chain/dense", "MACs ratio"
    );
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut uniform = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    };
    for (n, k) in [(576, 576), (1536, 576), (576, 1536), (384, 384), (1536, 384)] {
        let w: Vec<f32> = (0..n * k).map(|_| (0.05 * uniform()) as f32).collect();
        let (out_modes, in_modes) = (tt::modes(n, 3), tt::modes(k, 3));
        for bond in [16, 32, 64] {
            let train = Train::new(&w, &out_modes, &in_modes, bond).expect("a train");
            let kept: Vec<usize> = train.cores[..2].iter().map(|c| c.right).collect();
            assert_eq!(kept, tt::bonds(&out_modes, &in_modes, bond), "the train's bonds");
            let dense: Vec<f32> = train.weight().iter().map(|&v| v as f32).collect();
            let ratio = train.chain_macs() as f64 / (n * k) as f64;
            for &m in &rows {
                let x: Vec<f32> = (0..m * k).map(|_| uniform() as f32).collect();
                let mut chain = Chain::new(&train, m);
                let (mut y_kiln, mut y_faer) = (vec![0f32; m * n], vec![0f32; m * n]);
                let (mut y_copies, mut y_batched) = (vec![0f32; m * n], vec![0f32; m * n]);
                let kiln = |y: &mut [f32]| {
                    kiln_exec::sgemm::run(k, n, &x, &dense, y, 0..m, 0..n).expect("sgemm");
                };
                let wt = MatRef::from_row_major_slice(&dense, n, k).transpose();
                let xm = MatRef::from_row_major_slice(&x, m, k);
                let faer = |y: &mut [f32]| {
                    matmul(MatMut::from_row_major_slice_mut(y, m, n), Accum::Replace, xm, wt, 1.0, Par::Seq);
                };
                kiln(&mut y_kiln);
                faer(&mut y_faer);
                chain.run_copies(&x, &mut y_copies, m);
                chain.run_batched(&x, &mut y_batched, m);
                for (name, y) in [("faer", &y_faer), ("chain (copies)", &y_copies), ("chain (batched)", &y_batched)] {
                    let e = max_relative(y, &y_kiln);
                    assert!(e < 1e-3, "{n} x {k} rows {m} bond {bond}: {name} is {e:.1e} off the dense product");
                }
                let t_kiln = median_us(50, || kiln(&mut y_kiln));
                let t_faer = median_us(50, || faer(&mut y_faer));
                let t_copies = median_us(50, || chain.run_copies(&x, &mut y_copies, m));
                let t_batched = median_us(50, || chain.run_batched(&x, &mut y_batched, m));
                println!(
                    "{:>10} {m:>4} {:>5} {t_kiln:>9.1} {t_faer:>9.1} {t_copies:>10.1} {t_batched:>10.1} {:>12.2} {ratio:>12.3}",
                    format!("{n}x{k}"),
                    format!("{}/{}", kept[0], kept[1]),
                    t_copies.min(t_batched) / t_kiln,
                );
            }
        }
    }
}
