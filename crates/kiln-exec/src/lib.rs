//! kiln's executor: everything that runs a compiled graph, and nothing that compiles one.
//!
//! The linear kernels are native functions with a C ABI, specialized to a spec. This crate
//! states that ABI and the numbers every kernel computes ([`linear`], [`linear_i8`],
//! [`epilogue`]), and runs graphs on kernels given as entry addresses ([`engine`]): from
//! `kiln-jit`'s JIT at load time, or from an object file compiled ahead of time and linked
//! into the program (native executables and libraries, which carry no Cranelift). Beside
//! them, the code that runs where Cranelift's 128-bit vectors do not reach, written in Rust
//! with `std::arch`: the 256-bit GEMMs ([`gemm_f32`], [`gemm_i8`], [`gemm_q8`],
//! [`linear_i8row`]), which compute the emitted kernels' bits, activation quantization and
//! the weight layouts the kernels read ([`linear_i8::pack_weight`], [`repack`]).

pub mod activation;
pub mod engine;
pub mod epilogue;
pub mod gemm_f32;
pub mod gemm_i8;
pub mod gemm_q8;
pub mod linear;
pub mod linear_i8;
pub mod linear_i8row;
pub mod repack;
pub mod sgemm;
pub mod sgemm_kn;
pub mod sparse;

pub use activation::Activation;
pub use engine::{
    AOT_THREADS, Activations, Engine, EngineOptions, Host, Impl, KernelEntries, KernelSpec, LinkedKernels,
};
pub use linear::{LinearFn, LinearSpec};
pub use linear_i8::{LinearI8Fn, LinearI8Spec, QBlock, QuantizedActivations, quantize_rows};

/// Errors of building an engine or calling the Rust kernels.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// A kernel was asked for something it cannot be specialized to, or the graph cannot be
    /// planned.
    #[error("invalid kernel spec: {0}")]
    Spec(String),
    /// A kernel was called with arguments that do not match its spec.
    #[error("invalid kernel arguments: {0}")]
    Arguments(String),
    /// Linked kernels that do not belong to this graph, these options or this CPU.
    #[error("the linked kernels were compiled for another model, options or CPU: {0}")]
    Linked(String),
}
