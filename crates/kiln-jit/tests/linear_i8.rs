//! The W8A8 linear kernels against a plain-Rust implementation of their numeric contract
//! (bit for bit), against the exact f32 layer (within the bound activation quantization
//! allows), and the determinism rules.

mod common;

use common::{Rng, activation64, bits, random_weight};
use half::f16;
use kiln_exec::linear_i8::{MAX_PANEL, QBLOCK, QBLOCK_BYTES, QBlock, pack_weight, quantize_rows};
use kiln_ir::Format;
use kiln_jit::{Activation, HostIsa, LinearI8Kernel, LinearI8Spec, LinearI8Tiles, QuantizedActivations, Residual};
use proptest::prelude::*;
use std::ops::Range;
use std::sync::OnceLock;

fn isa() -> &'static HostIsa {
    static ISA: OnceLock<HostIsa> = OnceLock::new();
    ISA.get_or_init(|| HostIsa::native().unwrap())
}

const FORMATS: [Format; 3] = [Format::Q8_0, Format::Q4_0, Format::Q4_1];

// ---------------------------------------------------------------------------------------
// The contract, written plainly.

/// Round half away from zero, as `f32::round` does.
fn reference_block(x: &[f32]) -> QBlock {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut q = [0i8; QBLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round();
        assert!(r.is_nan() || r.abs() <= 127.0, "{v} * {id} rounds to {r}");
        *q = if r.is_nan() { 0 } else { r as i8 };
    }
    let sum: i32 = q.iter().map(|&v| v as i32).sum();
    let d = if x.iter().any(|v| v.is_nan()) { f32::NAN } else { d };
    QBlock { q, d, s: d * sum as f32, sum, pad: 0 }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// `sum_b` of the contract for output `(row of xq, row n of w)`, before the epilogue.
fn reference_dot(format: Format, xq: &[QBlock], w_row: &[u8]) -> f32 {
    let bb = format.block_bytes() as usize;
    let mut acc = 0.0f32;
    for (xb, wb) in xq.iter().zip(w_row.chunks_exact(bb)) {
        let dw = f16_at(wb, 0);
        let qw: Vec<i32> = match format {
            Format::Q8_0 => wb[2..34].iter().map(|&q| q as i8 as i32).collect(),
            Format::Q4_0 => {
                let qs = &wb[2..18];
                qs.iter().map(|&q| (q & 15) as i32 - 8).chain(qs.iter().map(|&q| (q >> 4) as i32 - 8)).collect()
            }
            Format::Q4_1 => {
                let qs = &wb[4..20];
                qs.iter().map(|&q| (q & 15) as i32).chain(qs.iter().map(|&q| (q >> 4) as i32)).collect()
            }
            _ => unreachable!(),
        };
        let isum: i32 = xb.q.iter().zip(&qw).map(|(&a, &b)| a as i32 * b).sum();
        acc = (dw * xb.d).mul_add(isum as f32, acc);
        if format == Format::Q4_1 {
            acc = xb.s.mul_add(f16_at(wb, 2), acc);
        }
    }
    acc
}

/// Whether a block scale of the weight row (`d`, or Q4_1's `m`) is inf or NaN: the
/// contract makes the whole output column NaN then.
fn special_scale(format: Format, w_row: &[u8]) -> bool {
    w_row
        .chunks_exact(format.block_bytes() as usize)
        .any(|wb| !f16_at(wb, 0).is_finite() || (format == Format::Q4_1 && !f16_at(wb, 2).is_finite()))
}

/// The f32 activation the kernels apply, as a bit-exact Rust model is not available: the
/// epilogue is therefore only compared bitwise for `None` and `Relu` (exact operations);
/// for Silu/Gelu the kernel's epilogue is compared with `activation64` within 1e-6 relative.
fn epilogue_exact(act: Activation, v: f32) -> Option<f32> {
    match act {
        Activation::None => Some(v),
        Activation::Relu => Some(if v < 0.0 { 0.0 } else { v }),
        _ => None,
    }
}

struct Case {
    spec: LinearI8Spec,
    m: usize,
    x: Vec<f32>,
    xq: QuantizedActivations,
    w: Vec<u8>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

impl Case {
    fn new(spec: LinearI8Spec, m: usize, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        // Rows of very different magnitudes, some all-zero blocks, some outliers.
        let mut x = Vec::with_capacity(m * spec.k);
        for _ in 0..m {
            let scale = [1.0f32, 1e-3, 30.0, 0.25][rng.below(4)];
            for i in 0..spec.k {
                let v = match rng.below(16) {
                    0 if i % 64 < 32 => 0.0,
                    1 => rng.f32() * scale * 8.0,
                    _ => rng.f32() * scale,
                };
                x.push(v);
            }
            if rng.below(3) == 0 {
                let start = x.len() - spec.k;
                x[start..start + 32].fill(0.0); // an all-zero block: d = 0
            }
        }
        let mut xq = QuantizedActivations::new();
        quantize_rows(&x, spec.k, &mut xq);
        let w = random_weight(&mut rng, spec.format, spec.n, spec.k);
        let bias = spec.bias.then(|| rng.vec(spec.n, 0.5));
        let residual = spec.residual.then(|| rng.vec(m * spec.n, 1.0));
        Case { spec, m, x, xq, w, bias, residual }
    }

    /// A copy (for struct updates that replace the weight).
    fn clone_inputs(&self) -> Case {
        Case {
            spec: self.spec,
            m: self.m,
            x: self.x.clone(),
            xq: self.xq.clone(),
            w: self.w.clone(),
            bias: self.bias.clone(),
            residual: self.residual.clone(),
        }
    }

    fn run(&self, kernel: &LinearI8Kernel, rows: std::ops::Range<usize>, y: &mut [f32]) {
        let residual = match &self.residual {
            Some(r) => Residual::Input(r),
            None => Residual::None,
        };
        kernel.run(&self.xq, &self.w, self.bias.as_deref(), residual, y, rows).unwrap();
    }

    fn output(&self, kernel: &LinearI8Kernel) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.m * self.spec.n];
        self.run(kernel, 0..self.m, &mut y);
        y
    }

    /// Checks `y` against the contract (bitwise up to the activation) and against the exact
    /// f32 layer (within the quantization bound).
    fn check(&self, y: &[f32], what: &str) {
        let s = &self.spec;
        let (k, n) = (s.k, s.n);
        let bb = s.format.block_bytes() as usize;
        let row_bytes = k / 32 * bb;
        let wf = s.format.dequantize(&self.w, (n * k) as u64).unwrap();
        for i in 0..self.m {
            let xq = self.xq.row(i);
            for j in 0..n {
                let what = || format!("{what} {s:?} m={} output ({i}, {j})", self.m);
                let got = y[i * n + j];
                let w_row = &self.w[j * row_bytes..(j + 1) * row_bytes];
                if special_scale(s.format, w_row) {
                    assert!(got.is_nan(), "{}: a row with an inf/NaN scale must give NaN, got {got}", what());
                    continue;
                }
                let dot = reference_dot(s.format, xq, w_row);
                let pre = match &self.bias {
                    Some(b) => dot + b[j],
                    None => dot,
                };
                let r = self.residual.as_ref().map(|r| r[i * n + j]);
                match epilogue_exact(s.activation, pre) {
                    Some(a) => {
                        let want = match r {
                            Some(r) => r + a,
                            None => a,
                        };
                        assert_eq!(got.to_bits(), want.to_bits(), "{}: got {got}, want {want}", what());
                    }
                    None => {
                        let want = activation64(s.activation, pre as f64) + r.unwrap_or(0.0) as f64;
                        let tol = 1e-6 * (pre.abs() as f64 + r.unwrap_or(0.0).abs() as f64) + 1e-6;
                        assert!((got as f64 - want).abs() <= tol, "{}: got {got}, want {want}", what());
                    }
                }

                // Against the exact layer: |sum (x - d q) w| <= sum_b d_b / 2 sum |w|.
                let (mut exact, mut bound, mut mag) = (0.0f64, 0.0f64, 0.0f64);
                for t in 0..k {
                    let (xv, wv) = (self.x[i * k + t] as f64, wf[j * k + t] as f64);
                    exact += xv * wv;
                    mag += (xv * wv).abs();
                    bound += xq[t / 32].d as f64 / 2.0 * wv.abs();
                }
                let err = (dot as f64 - exact).abs();
                let allowed = bound * (1.0 + 1e-5) + 1e-5 * mag + 1e-30;
                assert!(err <= allowed, "{}: dot {dot} vs exact {exact}: err {err:e} > {allowed:e}", what());
            }
        }
    }
}

fn spec(k: usize, n: usize, format: Format, bias: bool, act: Activation, residual: bool) -> LinearI8Spec {
    LinearI8Spec { k, n, format, bias, activation: act, residual, panel: 0 }
}

/// `w` packed for `spec.packed(panel)`.
fn packed(spec: LinearI8Spec, w: &[u8], panel: usize) -> Vec<u8> {
    let mut out = vec![0xAA; w.len()];
    pack_weight(&spec.packed(panel), w, &mut out).unwrap();
    out
}

// ---------------------------------------------------------------------------------------

#[test]
fn quantize_rows_matches_the_contract() {
    let mut rng = Rng::new(7);
    let k = 96;
    let mut x = rng.vec(5 * k, 3.0);
    x[32..64].fill(0.0);
    x[100] = 1e-40; // subnormal alone in its block
    // Values that land exactly on .5 steps: amax 127 makes d = 1, id = 1.
    for (i, v) in x[96 * 3..96 * 3 + 32].iter_mut().enumerate() {
        *v = if i == 0 { 127.0 } else { (i as f32 - 16.0) + 0.5 };
    }
    let mut xq = QuantizedActivations::new();
    quantize_rows(&x, k, &mut xq);
    assert_eq!((xq.rows(), xq.k(), xq.blocks().len()), (5, k, 15));
    for (b, (got, xb)) in xq.blocks().iter().zip(x.chunks_exact(32)).enumerate() {
        let want = reference_block(xb);
        assert_eq!(got.q, want.q, "block {b}");
        assert_eq!((got.d.to_bits(), got.s.to_bits(), got.sum), (want.d.to_bits(), want.s.to_bits(), want.sum));
    }
    let half_steps = &xq.blocks()[9].q;
    assert_eq!(&half_steps[1..4], &[-15, -14, -13], "-14.5 -> -15, -13.5 -> -14 (away from zero)");
    assert_eq!(half_steps[16], 1, "0.5 -> 1");
    assert_eq!(xq.blocks()[1].d, 0.0);
    assert_eq!(xq.blocks()[1].q, [0; 32]);

    // NaN poisons its block's scale; the buffer is reused for a smaller input.
    let mut y = x[..k].to_vec();
    y[33] = f32::NAN;
    quantize_rows(&y, k, &mut xq);
    assert_eq!(xq.rows(), 1);
    assert!(xq.blocks()[1].d.is_nan() && !xq.blocks()[0].d.is_nan() && !xq.blocks()[2].d.is_nan());
    assert_eq!(std::mem::size_of::<QBlock>(), QBLOCK_BYTES);
}

/// Every format x odd shapes, cycling through the 16 epilogues.
#[test]
fn every_format_and_shape_matches_the_contract_bitwise() {
    let mut case_no = 0u64;
    for format in FORMATS {
        for k in [32, 64, 96, 576] {
            for n in [1, 3, 5, 8, 33, 97] {
                let e = case_no as usize % 16;
                let act = Activation::ALL[e % 4];
                let s = spec(k, n, format, e & 4 != 0, act, e & 8 != 0);
                let kernel = LinearI8Kernel::compile(isa(), s).unwrap();
                for m in [1, 2, 3, 7, 130] {
                    case_no += 1;
                    let case = Case::new(s, m, case_no);
                    case.check(&case.output(&kernel), "default tiles");
                }
            }
        }
    }
}

/// Every tiling gives the same bits (both paths, every tile shape, remainders).
#[test]
fn tilings_and_row_splits_do_not_change_a_bit() {
    let tilings = [
        LinearI8Tiles::default(),
        LinearI8Tiles { direct_rows: 1, gemm_rows: 1, gemm_xrows: 1, gemm_min_rows: 1 },
        LinearI8Tiles { direct_rows: 3, gemm_rows: 7, gemm_xrows: 3, gemm_min_rows: 3 },
        LinearI8Tiles { direct_rows: 16, gemm_rows: 8, gemm_xrows: 4, gemm_min_rows: 2 },
        LinearI8Tiles { direct_rows: 5, gemm_rows: 6, gemm_xrows: 2, gemm_min_rows: usize::MAX },
    ];
    for (c, format) in FORMATS.into_iter().enumerate() {
        let s = spec(96, 37, format, true, Activation::Silu, true);
        let case = Case::new(s, 11, 100 + c as u64);
        let mut first: Option<Vec<f32>> = None;
        for t in tilings {
            let kernel = LinearI8Kernel::compile_with(isa(), s, t, false).unwrap();
            let all = case.output(&kernel);
            case.check(&all, &format!("{t:?}"));
            // Row by row and in uneven chunks: the same bits.
            for splits in [vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], vec![0, 3, 4, 9, 11]] {
                let mut y = vec![f32::NAN; case.m * s.n];
                for w in splits.windows(2) {
                    case.run(&kernel, w[0]..w[1], &mut y);
                }
                assert_eq!(bits(&y), bits(&all), "{format} {t:?} split {splits:?}");
            }
            match &first {
                None => first = Some(all),
                Some(f) => assert_eq!(bits(f), bits(&all), "{format} {t:?}"),
            }
        }
    }
}

#[test]
fn in_place_residual_and_empty_ranges() {
    for format in FORMATS {
        let s = spec(64, 9, format, true, Activation::Gelu, true);
        let case = Case::new(s, 5, 9);
        let kernel = LinearI8Kernel::compile(isa(), s).unwrap();
        let want = case.output(&kernel);
        let mut y = case.residual.clone().unwrap();
        kernel.run(&case.xq, &case.w, case.bias.as_deref(), Residual::InPlace, &mut y, 0..5).unwrap();
        assert_eq!(bits(&y), bits(&want), "{format}");
        let before = bits(&y);
        kernel.run(&case.xq, &case.w, case.bias.as_deref(), Residual::InPlace, &mut y, 3..3).unwrap();
        kernel
            .run(&case.xq, &case.w, case.bias.as_deref(), Residual::InPlace, &mut y, Range { start: 4, end: 2 })
            .unwrap();
        assert_eq!(bits(&y), before);
    }
}

/// A kernel that ignored the activations' scale (or offsets) would fail this.
#[test]
fn results_track_the_f32_layer() {
    for format in FORMATS {
        let s = LinearI8Spec::new(576, 20, format);
        let case = Case::new(s, 4, 77);
        let kernel = LinearI8Kernel::compile(isa(), s).unwrap();
        let y = case.output(&kernel);
        case.check(&y, "accuracy");
        let wf = format.dequantize(&case.w, (20 * 576) as u64).unwrap();
        let (mut err2, mut ref2) = (0.0f64, 0.0f64);
        for i in 0..4 {
            for j in 0..20 {
                let exact: f64 = (0..576).map(|t| case.x[i * 576 + t] as f64 * wf[j * 576 + t] as f64).sum();
                err2 += (y[i * 20 + j] as f64 - exact).powi(2);
                ref2 += exact * exact;
            }
        }
        assert!((err2 / ref2).sqrt() < 0.02, "{format}: relative rms error {}", (err2 / ref2).sqrt());
    }
}

#[test]
fn extreme_inputs_stay_exact_and_non_finite_inputs_show() {
    for format in FORMATS {
        let s = LinearI8Spec::new(64, 6, format);
        let kernel = LinearI8Kernel::compile(isa(), s).unwrap();
        let mut rng = Rng::new(5);
        let mut w = random_weight(&mut rng, format, 6, 64);
        // Largest quants everywhere in row 0 (saturation would show), -128 in Q8_0.
        let bb = format.block_bytes() as usize;
        let first = if format == Format::Q4_1 { 4 } else { 2 };
        for blk in 0..2 {
            w[blk * bb + first..(blk + 1) * bb].fill(if format == Format::Q8_0 { 0x80 } else { 0xFF });
            w[2 * bb + blk * bb + first..2 * bb + (blk + 1) * bb].fill(0x7F);
        }
        let mut x: Vec<f32> = (0..3 * 64).map(|i| if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        x[64..128].fill(-2.5); // all at -127
        x[128] = f32::NAN;
        let mut xq = QuantizedActivations::new();
        quantize_rows(&x, 64, &mut xq);
        let mut y = vec![0.0; 3 * 6];
        kernel.run(&xq, &w, None, Residual::None, &mut y, 0..3).unwrap();
        let case =
            Case { spec: s, m: 2, x: x[..128].to_vec(), xq: xq.clone(), w: w.clone(), bias: None, residual: None };
        let mut q2 = QuantizedActivations::new();
        quantize_rows(&case.x, 64, &mut q2);
        let case = Case { xq: q2, ..case };
        case.check(&y[..12], "extremes");
        assert!(y[12..].iter().all(|v| v.is_nan()), "{format}: a NaN input must reach the outputs: {:?}", &y[12..]);
    }
}

#[test]
fn inf_and_nan_weight_scales_make_their_column_nan() {
    for format in FORMATS {
        let s = spec(96, 11, format, true, Activation::Relu, true);
        let mut case = Case::new(s, 5, 31);
        let bb = format.block_bytes() as usize;
        let row = 3 * bb;
        // Row 1: inf d in block 2; row 4: NaN d in block 0; row 9: -inf (Q4_1: in m).
        let at = |n: usize, blk: usize| n * row + blk * bb;
        case.w[at(1, 2)..at(1, 2) + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        case.w[at(4, 0)..at(4, 0) + 2].copy_from_slice(&f16::NAN.to_le_bytes());
        let m_off = if format == Format::Q4_1 { 2 } else { 0 };
        case.w[at(9, 1) + m_off..at(9, 1) + m_off + 2].copy_from_slice(&f16::NEG_INFINITY.to_le_bytes());
        // A finite f16 whose bits look special in the quants' half for Q8_0/Q4_0 must not count.
        if format != Format::Q4_1 {
            case.w[at(6, 0) + 2..at(6, 0) + 4].copy_from_slice(&[0x00, 0x7C]);
        }
        for t in
            [LinearI8Tiles::default(), LinearI8Tiles { direct_rows: 3, gemm_rows: 5, gemm_xrows: 3, gemm_min_rows: 2 }]
        {
            let kernel = LinearI8Kernel::compile_with(isa(), s, t, false).unwrap();
            let y = case.output(&kernel);
            case.check(&y, "special scales");
            for i in 0..5 {
                for j in 0..11 {
                    assert_eq!(y[i * 11 + j].is_nan(), [1, 4, 9].contains(&j), "{format} {t:?} ({i}, {j})");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_shapes_match_the_contract(
        f in 0usize..3, blocks in 1usize..24, n in 1usize..70, m in 1usize..12,
        e in 0usize..16, seed in any::<u64>(),
        direct in 1usize..=16, rows in 1usize..=8, xrows in 1usize..=4, min in 1usize..6,
        panel in 0usize..=4,
    ) {
        let s = spec(32 * blocks, n, FORMATS[f], e & 4 != 0, Activation::ALL[e % 4], e & 8 != 0);
        let case = Case::new(s, m, seed);
        let t = LinearI8Tiles { direct_rows: direct, gemm_rows: rows, gemm_xrows: xrows, gemm_min_rows: min };
        let kernel = LinearI8Kernel::compile_with(isa(), s, t, false).unwrap();
        let y = case.output(&kernel);
        case.check(&y, &format!("{t:?}"));
        if panel > 0 {
            let pcase = Case { w: packed(s, &case.w, 4 * panel), ..case.clone_inputs() };
            let pk = LinearI8Kernel::compile_with(isa(), s.packed(4 * panel), t, false).unwrap();
            prop_assert_eq!(bits(&pcase.output(&pk)), bits(&y), "panel {}", 4 * panel);
        }
        let lo = seed as usize % m;
        let mut part = vec![f32::NAN; m * n];
        case.run(&kernel, lo..m, &mut part);
        case.run(&kernel, 0..lo, &mut part);
        prop_assert_eq!(bits(&part), bits(&y));
    }
}

/// The packed layout, written plainly: panels of `p` rows, by block, by group of four rows:
/// the group's scales, then its quants.
fn reference_pack(format: Format, w: &[u8], n: usize, k: usize, p: usize) -> Vec<u8> {
    let bb = format.block_bytes() as usize;
    let sb = if format == Format::Q4_1 { 4 } else { 2 };
    let row = k / 32 * bb;
    let mut out = Vec::new();
    for panel in (0..n).collect::<Vec<_>>().chunks(p) {
        for blk in 0..k / 32 {
            for group in panel.chunks(4) {
                let block = |r: usize| &w[r * row + blk * bb..r * row + (blk + 1) * bb];
                group.iter().for_each(|&r| out.extend_from_slice(&block(r)[..sb]));
                group.iter().for_each(|&r| out.extend_from_slice(&block(r)[sb..]));
            }
        }
    }
    out
}

/// Packed weights give the same bits as the stored layout: every format, panel size, odd
/// `N` (short last panel and group), both paths and several tilings, and the rows of any
/// panel boundary on are the packed weight of those rows alone (the engine's column split).
#[test]
fn packed_weights_give_the_same_bits() {
    let tilings = [
        LinearI8Tiles::default(),
        LinearI8Tiles { direct_rows: 3, gemm_rows: 8, gemm_xrows: 3, gemm_min_rows: 3 },
        LinearI8Tiles { direct_rows: 5, gemm_rows: 1, gemm_xrows: 1, gemm_min_rows: 1 },
        LinearI8Tiles { direct_rows: 5, gemm_rows: 6, gemm_xrows: 2, gemm_min_rows: usize::MAX },
    ];
    let mut seed = 500;
    for format in FORMATS {
        for (k, n) in [(32, 1), (64, 3), (96, 37), (576, 50), (64, 64), (160, 19)] {
            seed += 1;
            let e = seed as usize % 16;
            let s = spec(k, n, format, e & 4 != 0, Activation::ALL[e % 4], e & 8 != 0);
            for m in [1, 2, 6] {
                let case = Case::new(s, m, seed * 7 + m as u64);
                let plain = case.output(&LinearI8Kernel::compile(isa(), s).unwrap());
                for panel in [4, 8, 12, MAX_PANEL] {
                    let pw = packed(s, &case.w, panel);
                    assert_eq!(pw, reference_pack(format, &case.w, n, k, panel), "{format} {k}x{n} panel {panel}");
                    let pcase = Case { w: pw.clone(), ..case.clone_inputs() };
                    for t in tilings {
                        let kernel = LinearI8Kernel::compile_with(isa(), s.packed(panel), t, false).unwrap();
                        let y = pcase.output(&kernel);
                        assert_eq!(bits(&y), bits(&plain), "{format} {k}x{n} m={m} panel {panel} {t:?}");
                    }
                    // Columns split at a panel boundary, each part a kernel of its own.
                    if m == 1 && n > panel {
                        let row = pw.len() / n;
                        let mut y = vec![f32::NAN; n];
                        let (a, b) = (panel, n - panel);
                        for (n0, len) in [(0, a), (a, b)] {
                            let sub = LinearI8Spec { n: len, ..s }.packed(panel);
                            let kernel = LinearI8Kernel::compile(isa(), sub).unwrap();
                            let sub_w = &pw[n0 * row..(n0 + len) * row];
                            let plain_sub = &case.w[n0 * row..(n0 + len) * row];
                            assert_eq!(sub_w, &packed(LinearI8Spec { n: len, ..s }, plain_sub, panel)[..]);
                            let bias = case.bias.as_ref().map(|b| &b[n0..n0 + len]);
                            let mut part = match &case.residual {
                                Some(r) => r[n0..n0 + len].to_vec(),
                                None => vec![0.0; len],
                            };
                            let residual = if s.residual { Residual::InPlace } else { Residual::None };
                            kernel.run(&case.xq, sub_w, bias, residual, &mut part, 0..1).unwrap();
                            y[n0..n0 + len].copy_from_slice(&part);
                        }
                        assert_eq!(bits(&y), bits(&plain), "{format} {k}x{n} panel {panel} split");
                    }
                }
            }
        }
    }
}

#[test]
fn packed_weights_keep_inf_and_nan_scales() {
    for format in FORMATS {
        let s = spec(96, 23, format, true, Activation::Relu, false);
        let mut case = Case::new(s, 3, 41);
        let bb = format.block_bytes() as usize;
        let at = |n: usize, blk: usize| n * 3 * bb + blk * bb;
        case.w[at(1, 2)..at(1, 2) + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
        case.w[at(21, 0)..at(21, 0) + 2].copy_from_slice(&f16::NAN.to_le_bytes());
        if format == Format::Q4_1 {
            case.w[at(9, 1) + 2..at(9, 1) + 4].copy_from_slice(&f16::NEG_INFINITY.to_le_bytes());
        } else {
            // Quant bytes after a short group's scales that look like an inf scale.
            case.w[at(20, 0) + 2..at(20, 0) + 4].copy_from_slice(&[0x00, 0x7C]);
            case.w[at(9, 1)..at(9, 1) + 2].copy_from_slice(&f16::NEG_INFINITY.to_le_bytes());
        }
        let plain = case.output(&LinearI8Kernel::compile(isa(), s).unwrap());
        case.check(&plain, "special scales");
        for panel in [4, 8, 12, 16] {
            let pcase = Case { w: packed(s, &case.w, panel), ..case.clone_inputs() };
            let y = pcase.output(&LinearI8Kernel::compile(isa(), s.packed(panel)).unwrap());
            assert_eq!(bits(&y), bits(&plain), "{format} panel {panel}");
            for (j, v) in y.iter().enumerate() {
                assert_eq!(v.is_nan(), [1, 9, 21].contains(&(j % 23)), "{format} panel {panel} output {j}");
            }
        }
    }
}

#[test]
fn argument_checks() {
    let s = LinearI8Spec::new(64, 3, Format::Q4_1);
    let kernel = LinearI8Kernel::compile(isa(), s).unwrap();
    let mut xq = QuantizedActivations::new();
    quantize_rows(&[0.5; 128], 64, &mut xq);
    let w = vec![0u8; s.weight_bytes()];
    let mut y = vec![0.0; 6];
    assert!(kernel.run(&xq, &w, None, Residual::None, &mut y, 0..2).is_ok());
    assert!(kernel.run(&xq, &w, None, Residual::None, &mut y, 0..3).is_err());
    assert!(kernel.run(&xq, &w[1..], None, Residual::None, &mut y, 0..2).is_err());
    assert!(kernel.run(&xq, &w, Some(&[0.0; 3]), Residual::None, &mut y, 0..2).is_err());
    assert!(kernel.run(&xq, &w, None, Residual::InPlace, &mut y, 0..2).is_err());
    assert!(kernel.run(&xq, &w, None, Residual::None, &mut y[..3], 0..1).is_err());
    assert!(LinearI8Kernel::compile(isa(), LinearI8Spec::new(64, 3, Format::F32)).is_err());
    assert!(LinearI8Kernel::compile(isa(), LinearI8Spec::new(48, 3, Format::Q8_0)).is_err());
    for bad in [2, 6, 20] {
        assert!(LinearI8Kernel::compile(isa(), s.packed(bad)).is_err(), "panel {bad}");
    }
    let mut out = vec![0u8; w.len()];
    assert!(pack_weight(&s, &w, &mut out).is_err(), "no panel");
    assert!(pack_weight(&s.packed(8), &w[1..], &mut out[1..]).is_err());
    assert!(pack_weight(&s.packed(8), &w, &mut out[1..]).is_err());
    assert!(pack_weight(&s.packed(8), &w, &mut out).is_ok());
}

/// The 256-bit prefill GEMMs (`gemm_i8`, and `gemm_q8` on Q8_0) compute the emitted kernel's
/// sums bit for bit:
/// every format, panels, short last panels and groups (`N % 4`), row tails, row splits,
/// inf/NaN scales (their columns NaN) and NaN inputs. (With the epilogue after it, that is
/// the fused kernel: `tests/epilogue.rs`.)
#[test]
fn gemm_i8_is_the_emitted_kernel_bitwise() {
    if !kiln_exec::gemm_i8::available() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    let mut seed = 900;
    for format in FORMATS {
        for (k, n) in [(32, 4), (64, 7), (96, 37), (384, 48), (160, 19), (64, 18)] {
            for m in [1, 3, 4, 9, 13] {
                seed += 1;
                let s = spec(k, n, format, false, Activation::None, false);
                let mut case = Case::new(s, m, seed);
                if seed % 3 == 0 {
                    // A NaN input in row m - 1, and a non-finite scale in row 2 % n.
                    case.x[(m - 1) * k + 5] = f32::NAN;
                    quantize_rows(&case.x.clone(), k, &mut case.xq);
                    let bb = format.block_bytes() as usize;
                    let at = (2 % n) * (k / 32) * bb + (k / 32 - 1) * bb;
                    let off = if format == Format::Q4_1 && seed % 2 == 0 { 2 } else { 0 };
                    case.w[at + off..at + off + 2].copy_from_slice(&f16::INFINITY.to_le_bytes());
                }
                let want = case.output(&LinearI8Kernel::compile(isa(), s).unwrap());
                for panel in [4, 8, 16] {
                    let ps = s.packed(panel);
                    let pw = packed(s, &case.w, panel);
                    let mut y = vec![f32::NAN; m * n];
                    let cut = seed as usize % (m + 1);
                    kiln_exec::gemm_i8::run(&ps, &case.xq, &pw, &mut y, cut..m).unwrap();
                    kiln_exec::gemm_i8::run(&ps, &case.xq, &pw, &mut y, 0..cut).unwrap();
                    assert_eq!(bits(&y), bits(&want), "{format} {k}x{n} m={m} panel {panel} split at {cut}");
                }
                if format == Format::Q8_0 {
                    let mut lw = vec![0u8; kiln_exec::gemm_q8::layout_bytes(n, k)];
                    kiln_exec::gemm_q8::pack(&case.w, n, k, &mut lw).unwrap();
                    let mut y = vec![f32::NAN; m * n];
                    let cut = (seed as usize / 3) % (m + 1);
                    kiln_exec::gemm_q8::run(n, &case.xq, &lw, &mut y, cut..m).unwrap();
                    kiln_exec::gemm_q8::run(n, &case.xq, &lw, &mut y, 0..cut).unwrap();
                    assert_eq!(bits(&y), bits(&want), "gemm_q8 {k}x{n} m={m} split at {cut}");
                }
            }
        }
    }
}
