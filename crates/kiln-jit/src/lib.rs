//! kiln's Cranelift JIT backend.
//!
//! This crate turns kiln's IR into native code with Cranelift. Today it holds the
//! foundation and the first kernel family:
//! - [`isa`]: the host ISA (always detected with `cranelift_native`) and the CPU features
//!   kernels choose variants by;
//! - [`module`]: a small owner of a `cranelift_jit::JITModule` that defines functions,
//!   finalizes them, and hands out typed function pointers tied to the code's lifetime;
//! - [`linear`]: fused linear kernels `y = r + act(x W^T + b)` over weights in their stored
//!   format (f32, f16, bf16, GGUF Q8_0/Q4_0/Q4_1), decoded in registers;
//! - [`math`]: activations as inline polynomials.
//!
//! Emitters are written against Cranelift 0.135's x86-64 backend, which has 128-bit vectors
//! only (see `../shared/KERNELS.md` for what it emits); they also build for any target
//! Cranelift supports, but are tuned and tested on x86-64.

pub mod arena_plan;
pub mod engine;
pub mod epilogue;
pub mod gemm_f32;
pub mod gemm_i8;
pub mod gemm_q8;
pub mod isa;
pub mod linear;
pub mod linear_i8;
pub mod linear_i8row;
pub mod math;
pub mod module;
pub mod repack;

mod decode;
mod emit;
#[cfg(test)]
mod testing;

pub use engine::{AOT_THREADS, Activations, Engine, EngineOptions, KernelEntries, LinkedKernels, emit_object};
pub use isa::{HostFeatures, HostIsa, IsaOptions, OptLevel};
pub use linear::{LinearFn, LinearKernel, LinearSpec, LinearTiles, Residual, emit_linear};
pub use linear_i8::{
    LinearI8Fn, LinearI8Kernel, LinearI8Spec, LinearI8Tiles, QBlock, QuantizedActivations, emit_linear_i8,
    quantize_rows,
};
pub use math::Activation;
pub use module::{CodeModule, FunctionId, FunctionStats, JitCode, JitFn, JitModule, ObjectCodeModule, ObjectFile};

/// Errors of the JIT.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    /// The host ISA could not be built (unsupported CPU, bad setting).
    #[error("host ISA: {0}")]
    Isa(String),
    /// Cranelift rejected or failed to compile a function (a bug in an emitter).
    #[error("code generation failed: {0}")]
    Codegen(String),
    /// Declaring, defining or linking in the JIT module failed.
    #[error("JIT module: {0}")]
    Module(String),
    /// A kernel was asked for something it cannot be specialized to.
    #[error("invalid kernel spec: {0}")]
    Spec(String),
    /// A kernel was called with arguments that do not match its spec.
    #[error("invalid kernel arguments: {0}")]
    Arguments(String),
}
