//! Differential tests of the fused linear kernels against an f64 reference that decodes
//! the weights with `kiln_ir::Format::dequantize`, and the bitwise determinism rules.

mod common;

use common::{Rng, assert_close, bits, random_weight, reference};
use kiln_ir::Format;
use kiln_jit::{Activation, HostIsa, LinearKernel, LinearSpec, LinearTiles, Residual};
use proptest::prelude::*;
use std::sync::OnceLock;

fn isa() -> &'static HostIsa {
    static ISA: OnceLock<HostIsa> = OnceLock::new();
    ISA.get_or_init(|| HostIsa::native().unwrap())
}

/// Relative tolerance against `sum |x w| + |bias| + |residual|`, plus an absolute floor for
/// the activations' polynomial approximations near zero.
const REL: f64 = 1e-5;
const ABS: f64 = 1e-6;

struct Case {
    spec: LinearSpec,
    m: usize,
    x: Vec<f32>,
    w: Vec<u8>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

impl Case {
    fn new(spec: LinearSpec, m: usize, seed: u64) -> Case {
        let mut rng = Rng::new(seed);
        let x = rng.vec(m * spec.k, 1.0);
        let w = random_weight(&mut rng, spec.format, spec.n, spec.k);
        let bias = spec.bias.then(|| rng.vec(spec.n, 0.5));
        let residual = spec.residual.then(|| rng.vec(m * spec.n, 1.0));
        Case { spec, m, x, w, bias, residual }
    }

    fn run(&self, kernel: &LinearKernel, rows: std::ops::Range<usize>, y: &mut [f32]) {
        let residual = match &self.residual {
            Some(r) => Residual::Input(r),
            None => Residual::None,
        };
        kernel.run(&self.x, &self.w, self.bias.as_deref(), residual, y, rows).unwrap();
    }

    fn output(&self, kernel: &LinearKernel) -> Vec<f32> {
        let mut y = vec![f32::NAN; self.m * self.spec.n];
        self.run(kernel, 0..self.m, &mut y);
        y
    }

    fn check(&self, kernel: &LinearKernel, what: &str) -> Vec<f32> {
        let y = self.output(kernel);
        let (want, scale) = reference(&self.spec, &self.x, &self.w, self.bias.as_deref(), self.residual.as_deref());
        assert_close(&format!("{what} {:?} m={}", self.spec, self.m), &y, &want, &scale, REL, ABS);
        y
    }
}

fn spec(k: usize, n: usize, format: Format, bias: bool, act: Activation, residual: bool) -> LinearSpec {
    LinearSpec { k, n, format, bias, activation: act, residual }
}

/// The formats kernels read: the six of [`Format::ALL`] and fp8 in groups of 32 (int
/// formats run as GGUF blocks, other fp8 groups as blocks of 32).
fn kernel_formats() -> Vec<Format> {
    Format::ALL.into_iter().chain([Format::Fp8(kiln_ir::Fp8Format { group: 32 })]).collect()
}

fn ks(format: Format) -> Vec<usize> {
    if format.block_len() == 32 { vec![32, 64, 96, 576] } else { vec![1, 3, 17, 40, 64, 96, 576] }
}

/// Every format x odd shapes (M in {1, 3, 7, 130}, N in {1, 5, 33, 97}, K per format),
/// cycling through the 16 epilogues so each appears with many shapes.
#[test]
fn every_format_and_shape_matches_the_reference() {
    let mut case_no = 0u64;
    for format in kernel_formats() {
        for k in ks(format) {
            for n in [1, 5, 33, 97] {
                let e = case_no as usize % 16;
                let act = Activation::ALL[e % 4];
                let s = spec(k, n, format, e & 4 != 0, act, e & 8 != 0);
                let kernel = LinearKernel::compile(isa(), s).unwrap();
                for m in [1, 3, 7, 130] {
                    Case::new(s, m, case_no * 31 + m as u64).check(&kernel, "shapes");
                }
                case_no += 1;
            }
        }
    }
}

/// fp8 decodes every e4m3 code exactly as `Format::dequantize` does: with one-hot rows of
/// `x`, each output is one weight (subnormal codes, zeros and the largest scales
/// included); the NaN code makes its row NaN.
#[test]
fn fp8_decodes_every_code_exactly() {
    let f = kiln_ir::Fp8Format { group: 32 };
    let format = Format::Fp8(f);
    let (n, k) = (8, 256);
    let scales = [1.0f32, 0.5e-3, 3.0e4, 1.0 / 448.0, 7.5, 6.1e-5, 1.0, 2.0];
    let mut w = Vec::new();
    for r in 0..n {
        for b in 0..k / 32 {
            w.extend(half::f16::from_f32(scales[(r + b) % 8]).to_le_bytes());
            // Codes 0..=255 over the row's blocks, the NaN codes (0x7F, 0xFF) left out.
            w.extend((0..32).map(|i| match ((b * 32 + i + 37 * r) % 256) as u8 {
                0x7F | 0xFF => 0x7E,
                c => c,
            }));
        }
    }
    let want = format.dequantize(&w, (n * k) as u64).unwrap();
    let kernel = LinearKernel::compile(isa(), spec(k, n, format, false, Activation::None, false)).unwrap();
    for m in [1, 9] {
        let mut y = vec![f32::NAN; k * n];
        for i0 in (0..k).step_by(m) {
            let rows = m.min(k - i0);
            let mut x = vec![0f32; rows * k];
            for i in 0..rows {
                x[i * k + i0 + i] = 1.0;
            }
            let mut part = vec![f32::NAN; rows * n];
            kernel.run(&x, &w, None, Residual::None, &mut part, 0..rows).unwrap();
            y[i0 * n..(i0 + rows) * n].copy_from_slice(&part);
        }
        for i in 0..k {
            for r in 0..n {
                // A sum of one weight and zeros: the weight (+0 for -0).
                assert_eq!(y[i * n + r], want[r * k + i] + 0.0, "m = {m}: row {r}, column {i}");
            }
        }
    }
    // The NaN code poisons its row's outputs, whatever x is.
    let mut nan = w.clone();
    nan[2 + 5] = 0xFF;
    let x = vec![0.5f32; k];
    let mut y = vec![0f32; n];
    kernel.run(&x, &nan, None, Residual::None, &mut y, 0..1).unwrap();
    assert!(y[0].is_nan() && y[1..].iter().all(|v| v.is_finite()), "{y:?}");
}

/// Every format x every epilogue (bias x activation x residual) on the direct (M = 3) and
/// the panel (M = 9) path.
#[test]
fn every_format_and_epilogue_matches_the_reference() {
    for format in kernel_formats() {
        let k = if format.block_len() == 32 { 64 } else { 43 };
        for bias in [false, true] {
            for act in Activation::ALL {
                for residual in [false, true] {
                    let s = spec(k, 13, format, bias, act, residual);
                    let kernel = LinearKernel::compile(isa(), s).unwrap();
                    for m in [3, 9] {
                        Case::new(s, m, 7 + m as u64).check(&kernel, "epilogue");
                    }
                }
            }
        }
    }
}

/// Rows split across calls (as threads do) give bitwise the same result as one call, and a
/// row computed alone equals the same row inside a batch. Splits cross the direct/panel
/// threshold and the x-row tiles.
#[test]
fn results_do_not_depend_on_the_row_split() {
    for format in Format::ALL {
        let k = if format.block_len() == 32 { 96 } else { 37 };
        let s = spec(k, 11, format, true, Activation::Gelu, true);
        let kernel = LinearKernel::compile(isa(), s).unwrap();
        let m = 23;
        let case = Case::new(s, m, 99);
        let whole = case.output(&kernel);
        for split in [1, 2, 3, 4, 5, 8, 13, 22] {
            let mut y = vec![f32::NAN; m * s.n];
            case.run(&kernel, 0..split, &mut y);
            case.run(&kernel, split..m, &mut y);
            assert_eq!(bits(&y), bits(&whole), "{format}: split at {split}");
        }
        for row in [0, 6, 22] {
            let alone = Case {
                spec: s,
                m: 1,
                x: case.x[row * k..(row + 1) * k].to_vec(),
                w: case.w.clone(),
                bias: case.bias.clone(),
                residual: case.residual.as_ref().map(|r| r[row * s.n..(row + 1) * s.n].to_vec()),
            };
            let y = alone.output(&kernel);
            assert_eq!(bits(&y), bits(&whole[row * s.n..(row + 1) * s.n]), "{format}: row {row} alone");
        }
    }
}

/// Different register tilings compute bitwise the same outputs.
#[test]
fn results_do_not_depend_on_the_tiling() {
    for format in Format::ALL {
        let k = if format.block_len() == 32 { 64 } else { 30 };
        let s = spec(k, 19, format, true, Activation::Silu, false);
        let case = Case::new(s, 11, 5);
        let base = case.check(&LinearKernel::compile(isa(), s).unwrap(), "default tiles");
        for (direct_rows, panel_rows, panel_xrows, panel_min_rows, unroll) in
            [(1, 1, 1, 1, 1), (3, 4, 2, usize::MAX, 3), (8, 8, 1, 1, 4), (5, 2, 4, 2, 1), (2, 3, 3, 5, 2)]
        {
            let tiles = LinearTiles { direct_rows, panel_rows, panel_xrows, panel_min_rows, unroll };
            let kernel = LinearKernel::compile_with(isa(), s, tiles, false).unwrap();
            assert_eq!(bits(&case.output(&kernel)), bits(&base), "{format} {tiles:?}");
        }
    }
}

#[test]
fn in_place_residual_equals_separate_residual() {
    let s = spec(64, 24, Format::Q4_1, true, Activation::None, true);
    let kernel = LinearKernel::compile(isa(), s).unwrap();
    for m in [1, 6] {
        let case = Case::new(s, m, 3);
        let separate = case.output(&kernel);
        let mut y = case.residual.clone().unwrap();
        kernel.run(&case.x, &case.w, case.bias.as_deref(), Residual::InPlace, &mut y, 0..m).unwrap();
        assert_eq!(bits(&y), bits(&separate));
    }
}

#[test]
fn rows_outside_the_range_are_untouched() {
    let s = spec(32, 7, Format::Q8_0, false, Activation::Relu, false);
    let kernel = LinearKernel::compile(isa(), s).unwrap();
    let case = Case::new(s, 9, 1);
    let mut y = vec![-7.0f32; 9 * 7];
    case.run(&kernel, 2..5, &mut y);
    assert!(y[..2 * 7].iter().chain(&y[5 * 7..]).all(|&v| v == -7.0));
    assert!(y[2 * 7..5 * 7].iter().all(|&v| v != -7.0));
    case.run(&kernel, 4..4, &mut y); // empty range: no-op
}

#[test]
fn mismatched_arguments_are_rejected() {
    let s = spec(32, 4, Format::Q4_0, true, Activation::None, false);
    let kernel = LinearKernel::compile(isa(), s).unwrap();
    let case = Case::new(s, 2, 1);
    let mut y = vec![0.0; 8];
    let r = |x: &[f32], w: &[u8], b: Option<&[f32]>, y: &mut [f32], rows| {
        kernel.run(x, w, b, Residual::None, y, rows).is_err()
    };
    assert!(r(&case.x[1..], &case.w, case.bias.as_deref(), &mut y, 0..2));
    assert!(r(&case.x, &case.w[1..], case.bias.as_deref(), &mut y, 0..2));
    assert!(r(&case.x, &case.w, None, &mut y, 0..2));
    assert!(r(&case.x, &case.w, case.bias.as_deref(), &mut y[1..], 0..2));
    assert!(r(&case.x, &case.w, case.bias.as_deref(), &mut y, 0..3));
    assert!(!r(&case.x, &case.w, case.bias.as_deref(), &mut y, 0..2));
    assert!(LinearKernel::compile(isa(), spec(48, 4, Format::Q4_1, false, Activation::None, false)).is_err());
}

/// The f32 kernel's inner loop uses the FMA instructions when the host has them (a named
/// preset without AVX would silently turn `fma` into libm calls).
#[test]
fn f32_kernel_uses_vfmadd() {
    let isa = isa();
    let kernel = LinearKernel::compile_with(
        isa,
        LinearSpec::new(64, 16, Format::F32),
        LinearTiles::for_format(Format::F32),
        true,
    )
    .unwrap();
    let disasm = kernel.stats().disasm.clone().unwrap();
    if isa.features().fma {
        assert!(disasm.contains("vfmadd"), "{disasm}");
        assert!(!disasm.lines().any(|l| l.trim_start().starts_with("call")), "{disasm}");
    } else {
        eprintln!("host has no FMA: skipped the vfmadd check");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random shapes, formats, epilogues and row ranges.
    #[test]
    fn random_shapes_match_the_reference(
        format in prop::sample::select(Format::ALL.to_vec()),
        kb in 1usize..24,
        n in 1usize..70,
        m in 1usize..12,
        e in 0usize..16,
        seed in any::<u64>(),
    ) {
        let k = if format.block_len() == 32 { 32 * (kb % 8 + 1) } else { kb * 7 % 150 + 1 };
        let s = spec(k, n, format, e & 4 != 0, Activation::ALL[e % 4], e & 8 != 0);
        let kernel = LinearKernel::compile(isa(), s).unwrap();
        Case::new(s, m, seed).check(&kernel, "proptest");
    }
}

/// Kernels are shared across threads (each calls it on its own rows).
#[test]
fn kernels_and_code_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<LinearKernel>();
    check::<kiln_jit::JitCode>();
    let s = spec(64, 8, Format::Q4_1, true, Activation::Relu, false);
    let kernel = LinearKernel::compile(isa(), s).unwrap();
    let case = Case::new(s, 4, 11);
    let whole = case.output(&kernel);
    let mut y = vec![f32::NAN; 4 * 8];
    let (a, b) = y.split_at_mut(2 * 8);
    // Each thread computes its rows into a private buffer laid out as y.
    let run = |rows: std::ops::Range<usize>, out: &mut [f32]| {
        let mut full = vec![0.0f32; 4 * 8];
        case.run(&kernel, rows.clone(), &mut full);
        out.copy_from_slice(&full[rows.start * 8..rows.end * 8]);
    };
    std::thread::scope(|scope| {
        scope.spawn(|| run(0..2, a));
        scope.spawn(|| run(2..4, b));
    });
    assert_eq!(bits(&y), bits(&whole));
}

/// The 256-bit prefill GEMM (`gemm_f32`) computes the emitted kernel's sums bit for bit on
/// the block formats: short last groups (`N % 4`), row tails, and any split of rows and
/// columns. (With the epilogue after it, that is the fused kernel: `tests/epilogue.rs`.)
#[test]
fn gemm_f32_is_the_emitted_kernel_bitwise() {
    if !kiln_exec::gemm_f32::available() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    let mut seed = 70;
    for format in [Format::Q8_0, Format::Q4_0, Format::Q4_1, Format::Fp8(kiln_ir::Fp8Format { group: 32 })] {
        for (k, n) in [(32, 4), (64, 7), (96, 37), (384, 48), (160, 19), (1536, 6)] {
            for m in [1, 3, 4, 9] {
                seed += 1;
                let case = Case::new(spec(k, n, format, false, Activation::None, false), m, seed);
                let want = case.output(&LinearKernel::compile(isa(), case.spec).unwrap());
                let mut y = vec![f32::NAN; m * n];
                let (rc, cc) = (seed as usize % (m + 1), seed as usize * 7 % (n + 1));
                for (rows, cols) in [(0..rc, 0..cc), (0..rc, cc..n), (rc..m, 0..n)] {
                    kiln_exec::gemm_f32::run(format, k, n, &case.x, &case.w, &mut y, rows, cols).unwrap();
                }
                assert_eq!(bits(&y), bits(&want), "{format} {k}x{n} m={m} split at ({rc}, {cc})");
            }
        }
    }
}
