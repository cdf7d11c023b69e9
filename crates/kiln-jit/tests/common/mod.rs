//! Shared test support: deterministic random data in every weight format and the f64
//! reference of a fused linear layer (weights decoded by `Format::dequantize`).

#![allow(dead_code)]

use half::{bf16, f16};
use kiln_ir::Format;
use kiln_jit::{Activation, LinearSpec};

/// The bits of each value, for bitwise comparisons that show where they differ.
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// xorshift64*: deterministic and dependency-free.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        ((self.u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.u64() % n as u64) as usize
    }
}

/// Random stored bytes for an `[n, k]` weight in `format`, with realistic magnitudes
/// (values around 0.1, as in trained layers).
pub fn random_weight(rng: &mut Rng, format: Format, n: usize, k: usize) -> Vec<u8> {
    let elems = n * k;
    let mut out = Vec::with_capacity(format.byte_len(elems as u64).unwrap() as usize);
    match format {
        Format::F32 => (0..elems).for_each(|_| out.extend((rng.f32() * 0.2).to_le_bytes())),
        Format::F16 => (0..elems).for_each(|_| out.extend(f16::from_f32(rng.f32() * 0.2).to_le_bytes())),
        Format::BF16 => (0..elems).for_each(|_| out.extend(bf16::from_f32(rng.f32() * 0.2).to_le_bytes())),
        Format::Q8_0 => {
            for _ in 0..elems / 32 {
                out.extend(f16::from_f32(0.2 / 127.0 * (0.5 + rng.f32().abs())).to_le_bytes());
                out.extend((0..32).map(|_| rng.u64() as u8));
            }
        }
        Format::Q4_0 => {
            for _ in 0..elems / 32 {
                out.extend(f16::from_f32(0.2 / 8.0 * (0.5 + rng.f32().abs())).to_le_bytes());
                out.extend((0..16).map(|_| rng.u64() as u8));
            }
        }
        Format::Q4_1 => {
            for _ in 0..elems / 32 {
                out.extend(f16::from_f32(0.4 / 15.0 * (0.5 + rng.f32().abs())).to_le_bytes());
                out.extend(f16::from_f32(-0.2 + 0.05 * rng.f32()).to_le_bytes());
                out.extend((0..16).map(|_| rng.u64() as u8));
            }
        }
        Format::Int(f) => {
            let values: Vec<f32> = (0..elems).map(|_| rng.f32() * 0.2).collect();
            out = f.quantize(&values);
        }
        Format::Fp8(f) => {
            let values: Vec<f32> = (0..elems).map(|_| rng.f32() * 0.2).collect();
            out = f.quantize(&values);
        }
        Format::U8 => unreachable!("u8 is not a linear weight format"),
    }
    out
}

/// `erf` in f64 (the runtime's reference, accurate to ~1e-15).
pub use kiln_rt::kernels::erf as erf64;

pub fn activation64(act: Activation, v: f64) -> f64 {
    match act {
        Activation::None => v,
        Activation::Relu => {
            if v < 0.0 {
                0.0
            } else {
                v
            }
        }
        Activation::Silu => v / (1.0 + (-v).exp()),
        Activation::Gelu => 0.5 * v * (1.0 + erf64(v * std::f64::consts::FRAC_1_SQRT_2)),
    }
}

/// Reference outputs `[m, n]` in f64 and, per output, the error scale
/// `sum |x w| + |bias| + |residual|`.
pub fn reference(
    spec: &LinearSpec,
    x: &[f32],
    w: &[u8],
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let (k, n) = (spec.k, spec.n);
    let m = x.len() / k;
    let wf = spec.format.dequantize(w, (n * k) as u64).unwrap();
    let mut want = vec![0.0; m * n];
    let mut scale = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for t in 0..k {
                let p = x[i * k + t] as f64 * wf[j * k + t] as f64;
                s += p;
                a += p.abs();
            }
            if let Some(b) = bias {
                s += b[j] as f64;
                a += (b[j] as f64).abs();
            }
            let mut v = activation64(spec.activation, s);
            if let Some(r) = residual {
                v += r[i * n + j] as f64;
                a += (r[i * n + j] as f64).abs();
            }
            want[i * n + j] = v;
            scale[i * n + j] = a;
        }
    }
    (want, scale)
}

/// Asserts `got` matches the reference within `rel * scale + abs`, element by element.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], scale: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len());
    for (i, ((&g, &w), &s)) in got.iter().zip(want).zip(scale).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(err <= rel * s + abs, "{what}: element {i}: got {g}, want {w} (err {err:.3e}, scale {s:.3e})");
    }
}
