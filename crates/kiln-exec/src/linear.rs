//! Fused linear kernels: `y[m, n] = r[m, n] + act(sum_k x[m, k] * W[n, k] + bias[n])`.
//!
//! # Contract
//!
//! A kernel is specialized to a [`LinearSpec`]: `K` (inputs) and `N` (outputs), the weight
//! format, and the epilogue (bias or not, an [`Activation`], residual or not). It has the
//! C signature [`LinearFn`]:
//!
//! ```text
//! fn(x: *const f32, w: *const u8, bias: *const f32, residual: *const f32, y: *mut f32,
//!    m0: usize, m1: usize)
//! ```
//!
//! and computes rows `m0..m1` of `y` (nothing when `m0 >= m1`):
//! - `x` is f32 row-major `[M, K]`, `y` and `residual` f32 row-major `[M, N]`; all three
//!   point at row 0, so several calls with disjoint row ranges (threads) share them;
//! - `w` is the weight `[N, K]` exactly as stored: row-major, `Format::byte_len(N * K)`
//!   bytes, blocks along `K` for the block formats (which need `K % 32 == 0`);
//! - `bias` (`[N]`) and `residual` are read only when the spec has them (may be null
//!   otherwise); `residual` may be *equal* to `y` (in-place residual add) but no other
//!   argument may overlap `y`. No alignment is required.
//!
//! **Numbers.** The kernel reads exactly the weights [`kiln_ir::Format::dequantize`] defines
//! (decoded in registers, see `kiln-jit`'s `decode`), and for every output computes
//! 1. four lane-wise partial sums `acc[l] = fma(w[k], x[k], acc[l])` over `k = 4j + l`,
//!    `j` increasing, starting from +0;
//! 2. `s = (acc[0] + acc[2]) + (acc[1] + acc[3])`;
//! 3. for the `K % 4` trailing `k` in order, `s = fma(w[k], x[k], s)`;
//! 4. `s + bias[n]`, then the activation (see `kiln-jit`'s `math` for its accuracy), then
//!    `residual[m, n] + s`.
//!
//! This sequence depends on nothing but the row of `x` and the row of `W`: not on `m0`,
//! `m1`, the tile an output falls in or the code path taken. Splitting rows across calls
//! or threads, or computing a sequence alone or inside a batch, gives bitwise identical
//! results (tested).

use crate::ExecError;
use crate::activation::Activation;
use kiln_ir::Format;

/// The C signature of a compiled linear kernel (see the module docs for the contract).
pub type LinearFn = unsafe extern "C" fn(
    x: *const f32,
    w: *const u8,
    bias: *const f32,
    residual: *const f32,
    y: *mut f32,
    m0: usize,
    m1: usize,
);

/// What a linear kernel computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearSpec {
    /// Inputs per row (the reduction length).
    pub k: usize,
    /// Outputs per row (rows of `W`).
    pub n: usize,
    /// Storage format of `W`.
    pub format: Format,
    pub bias: bool,
    pub activation: Activation,
    pub residual: bool,
}

impl LinearSpec {
    /// A plain `x @ W^T` with no epilogue.
    pub fn new(k: usize, n: usize, format: Format) -> LinearSpec {
        LinearSpec { k, n, format, bias: false, activation: Activation::None, residual: false }
    }

    /// Bytes of the stored weight.
    pub fn weight_bytes(&self) -> usize {
        self.format.byte_len((self.n * self.k) as u64).map(|b| b as usize).unwrap_or(0)
    }

    /// Checks that a kernel can be specialized to this spec.
    pub fn validate(&self) -> Result<(), ExecError> {
        let bad = |why: String| Err(ExecError::Spec(format!("linear {self:?}: {why}")));
        if self.k == 0 || self.n == 0 {
            return bad("K and N must be positive".into());
        }
        let block = self.format.block_len() as usize;
        if !self.k.is_multiple_of(block) {
            return bad(format!("{} stores blocks of {block} along K", self.format));
        }
        if self.k.checked_mul(self.n).and_then(|e| e.checked_mul(8)).is_none_or(|b| b > i32::MAX as usize) {
            return bad("weight too large for 32-bit offsets".into());
        }
        Ok(())
    }
}
