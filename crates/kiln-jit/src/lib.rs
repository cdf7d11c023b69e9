//! kiln's Cranelift backend: it compiles the linear kernels that `kiln-exec` runs.
//!
//! - [`isa`]: the host ISA (detected with `cranelift_native`, or named) and the CPU
//!   features kernels choose variants by;
//! - [`module`]: one owner of a Cranelift module, JIT or object file ([`CodeModule`]), that
//!   defines functions and hands out their code;
//! - [`linear`], [`linear_i8`], [`epilogue`]: the emitters of the fused kernels whose
//!   contracts `kiln-exec` states (`y = r + act(x W^T + b)` over weights in their stored
//!   format, decoded in registers; W8A8; the epilogue after a Rust GEMM);
//! - [`math`]: activations as inline polynomials;
//! - [`compile()`] and [`emit_object`]: the kernels of an engine's plan, JIT-compiled at load
//!   time or written to an object file ahead of time (module `compile`).
//!
//! Emitters are written against Cranelift 0.135's x86-64 backend, which has 128-bit vectors
//! only (see `../shared/KERNELS.md` for what it emits); they also build for any target
//! Cranelift supports, but are tuned and tested on x86-64.

pub mod epilogue;
pub mod isa;
pub mod linear;
pub mod linear_i8;
pub mod math;
pub mod module;

mod compile;
mod decode;
mod emit;
#[cfg(test)]
mod testing;

pub use compile::{compile, emit_object, run_keeping};
pub use isa::{HostFeatures, HostIsa, IsaOptions, OptLevel};
// The engine `compile` returns and the options it and `emit_object` take; everything else
// of the executor's is used from `kiln_exec`.
pub use kiln_exec::engine::FACTOR;
pub use kiln_exec::{Activations, Engine, EngineOptions};
pub use linear::{LinearFn, LinearKernel, LinearSpec, LinearTiles, Residual, emit_linear};
pub use linear_i8::{LinearI8Fn, LinearI8Kernel, LinearI8Spec, LinearI8Tiles, QuantizedActivations, emit_linear_i8};
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
    /// The executor refused a spec, arguments or linked kernels.
    #[error(transparent)]
    Exec(#[from] kiln_exec::ExecError),
}
