//! The per-row W8A8 GEMM against a plain-Rust implementation of its contract (bit for bit),
//! against the exact f32 layer, and the determinism rules (any row or column split).

mod common;

use common::{Rng, bits};
use kiln_exec::linear_i8row::{RowQuantized, RowWeights, quantize_per_row};
use kiln_ir::IntFormat;

/// The activation contract written plainly (f32::round rounds half away from zero).
fn reference_row(x: &[f32]) -> (Vec<i8>, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| if v.abs() > m { v.abs() } else { m });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let q =
        x.iter().map(|&v| if (v * id).is_finite() { (v * id).round().clamp(-127.0, 127.0) as i8 } else { 0 }).collect();
    (q, if x.iter().any(|v| v.is_nan()) { f32::NAN } else { d })
}

/// A random int8g`k` weight `[n, k]`: scales of very different sizes, codes over the full
/// range 0..=255 (so `w = -128` occurs).
fn weight(rng: &mut Rng, n: usize, k: usize) -> (IntFormat, Vec<u8>) {
    let f: IntFormat = format!("int8g{k}").parse().unwrap();
    let mut bytes = Vec::new();
    for _ in 0..n {
        let d = half::f16::from_f32([0.01f32, 3e-5, 2.0][rng.below(3)] * (1.0 + rng.f32()));
        bytes.extend(d.to_le_bytes());
        bytes.extend((0..k).map(|_| if rng.below(20) == 0 { [0u8, 255][rng.below(2)] } else { rng.u64() as u8 }));
    }
    (f, bytes)
}

#[test]
fn quantize_per_row_matches_the_contract() {
    let mut rng = Rng::new(3);
    for k in [32, 96, 384] {
        let mut x: Vec<f32> = (0..5 * k).map(|i| rng.f32() * [1.0, 1e-4, 50.0][i / k % 3]).collect();
        x[k..2 * k].fill(0.0); // an all-zero row: d = 0, q = 0
        x[3 * k + 7] = 0.5 * (x[3 * k..4 * k].iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0); // a tie
        x[4 * k + 1] = f32::NAN;
        let mut q = RowQuantized::new();
        quantize_per_row(&x, k, &mut q);
        assert_eq!(q.rows(), 5);
        for m in 0..5 {
            let (want_q, want_d) = reference_row(&x[m * k..(m + 1) * k]);
            assert_eq!(q.d(m).to_bits(), want_d.to_bits(), "k={k} row {m}");
            if m != 4 {
                assert_eq!(q.q(m), &want_q[..], "k={k} row {m}");
            }
        }
        assert!(q.q(1).iter().all(|&v| v == 0));
    }
}

/// Every output is `(dw * d) * isum` with `isum` the exact integer dot product: shapes with
/// `N % 4 != 0`, odd `M`, and every split of rows and columns give the same bits.
#[test]
fn gemm_matches_the_contract_for_any_split() {
    let mut rng = Rng::new(11);
    for (m, k, n) in [(1, 32, 4), (3, 64, 7), (8, 384, 48), (5, 160, 13), (2, 1536, 9)] {
        let (f, bytes) = weight(&mut rng, n, k);
        let w = RowWeights::from_int8(f, &bytes, n, k).unwrap();
        let x: Vec<f32> = (0..m * k).map(|_| rng.f32() * 4.0).collect();
        let mut xq = RowQuantized::new();
        quantize_per_row(&x, k, &mut xq);
        let mut y = vec![f32::NAN; m * n];
        w.gemm(&xq, &mut y, 0..m, 0..n).unwrap();
        let mut codes = vec![0u8; k];
        for (row, block) in bytes.chunks_exact(f.block_bytes()).enumerate() {
            let s = f.unpack_block(block, &mut codes);
            for i in 0..m {
                let isum: i32 = xq.q(i).iter().zip(&codes).map(|(&q, &c)| q as i32 * (c as i32 - 128)).sum();
                let want = (s.d.to_f32() * xq.d(i)) * isum as f32;
                assert_eq!(y[i * n + row].to_bits(), want.to_bits(), "{m}x{k}x{n} ({i}, {row})");
                // Against the exact layer: |sum (x - d q) w| <= d / 2 sum |w|.
                let (mut exact, mut bound) = (0f64, 0f64);
                for t in 0..k {
                    let wv = f.value(s, codes[t]) as f64;
                    exact += x[i * k + t] as f64 * wv;
                    bound += xq.d(i) as f64 / 2.0 * wv.abs();
                }
                let err = (y[i * n + row] as f64 - exact).abs();
                assert!(err <= bound * 1.001 + 1e-6 * exact.abs() + 1e-30, "{m}x{k}x{n}: {err} > {bound}");
            }
        }
        // Splits: rows one by one, columns in odd pieces.
        let mut parts = vec![f32::NAN; m * n];
        for i in 0..m {
            let cut = (i * 5 + 1) % (n + 1);
            w.gemm(&xq, &mut parts, i..i + 1, cut..n).unwrap();
            w.gemm(&xq, &mut parts, i..i + 1, 0..cut).unwrap();
        }
        assert_eq!(bits(&parts), bits(&y), "{m}x{k}x{n} split");
    }
}

#[test]
fn nan_rows_and_bad_arguments() {
    let mut rng = Rng::new(5);
    let (m, k, n) = (3, 64, 8);
    let (f, bytes) = weight(&mut rng, n, k);
    let w = RowWeights::from_int8(f, &bytes, n, k).unwrap();
    let mut x: Vec<f32> = (0..m * k).map(|_| rng.f32()).collect();
    x[k + 3] = f32::NAN;
    let mut xq = RowQuantized::new();
    quantize_per_row(&x, k, &mut xq);
    let mut y = vec![0.0; m * n];
    w.gemm(&xq, &mut y, 0..m, 0..n).unwrap();
    assert!(y[n..2 * n].iter().all(|v| v.is_nan()) && y[..n].iter().chain(&y[2 * n..]).all(|v| v.is_finite()));
    assert!(w.gemm(&xq, &mut y, 0..m + 1, 0..n).is_err(), "rows out of range");
    assert!(w.gemm(&xq, &mut y[1..], 0..m, 0..n).is_err(), "y too short");
    assert!(RowWeights::from_int8("int8g32".parse().unwrap(), &bytes, n, k).is_err(), "groups of 32 are not rows");
    assert!(RowWeights::from_int8(f, &bytes[1..], n, k).is_err(), "truncated weight");
}
