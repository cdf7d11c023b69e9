//! kiln's runtime: what compiled kernels run under, shared by the JIT and by native
//! executables, so it must not depend on Cranelift.
//!
//! - [`Pool`]: a fixed set of worker threads and a *static* split of work into contiguous
//!   ranges. Kernels compute every output element with a reduction order that does not
//!   depend on the range they are given, so outputs are bitwise identical for any thread
//!   count.
//! - [`KvCache`]: keys and values a decoder keeps between runs (generation).
//! - [`artifact`]: compiled models as one safetensors file (weights, IR, metadata).
//! - [`io`]: values in and out of safetensors files, and a model's inputs taken from them.
//! - [`lm`]: what generation needs of a language model (ids in, logits out, greedy choice).
//! - [`par`]: where the reference kernels run in parallel (rayon, or the engine's pool).
//! - [`eval`]: what every executor needs around the kernels: binding inputs and symbolic
//!   dimensions, decoding weights, evaluating one op with the reference kernels
//!   ([`eval::eval_node`]), and [`eval::RunError`].
//! - [`kernels`]: the reference kernels, one plain function per IR op over a contiguous
//!   [`Tensor`]: the interpreter's arithmetic, and the fallback of compiled programs for ops
//!   that have no emitted kernel yet.

pub mod artifact;
pub mod cache;
pub mod eval;
pub mod io;
pub mod kernels;
pub mod lm;
pub mod par;
mod pool;
pub mod tensor;

pub use cache::KvCache;
pub use pool::{Pool, split};
pub use tensor::{Tensor, Value};
