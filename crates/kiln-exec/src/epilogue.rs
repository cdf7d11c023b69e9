//! Epilogue kernels: `y[m, n] = r[m, n] + act(y[m, n] + bias[n])` in place, for linear
//! layers whose matmul ran elsewhere (the runtime's sgemm for f32 weights).
//!
//! # Contract
//!
//! Specialized to an [`EpilogueSpec`] (`N`, bias or not, an [`Activation`], residual or
//! not); C signature [`EpilogueFn`]:
//!
//! ```text
//! fn(y: *mut f32, bias: *const f32, residual: *const f32, m0: usize, m1: usize)
//! ```
//!
//! For rows `m0..m1` of the row-major `[M, N]` `y`, every element becomes exactly what
//! [`crate::linear`]'s epilogue computes from a sum `s`: `s + bias[n]`, then the activation
//! (see `kiln-jit`'s `math`), then `residual[m, n] + s`. `bias` (`[N]`) and `residual` (`[M, N]`,
//! row 0) are read only when the spec has them; `residual` may equal `y`'s own buffer only
//! if it is the same pointer. Elements are independent, so any row split gives the same
//! bits.

use crate::activation::Activation;

/// The C signature of an epilogue kernel (see the module docs).
pub type EpilogueFn = unsafe extern "C" fn(y: *mut f32, bias: *const f32, residual: *const f32, m0: usize, m1: usize);

/// What an epilogue kernel applies to each row of `N` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EpilogueSpec {
    pub n: usize,
    pub bias: bool,
    pub activation: Activation,
    pub residual: bool,
}

impl EpilogueSpec {
    /// Whether the kernel changes anything (a plain matmul needs no epilogue).
    pub fn is_identity(&self) -> bool {
        !self.bias && !self.residual && self.activation == Activation::None
    }
}
