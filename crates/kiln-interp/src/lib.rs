//! kiln's reference interpreter: the f32 meaning of every IR op, the numeric oracle that
//! backends are tested against, and the engine compression passes calibrate with.
//!
//! [`Interpreter`] runs a graph node by node with the reference kernels of
//! [`kiln_rt::kernels`] (plain, contiguous, tested against naive loops). [`calibrate`]
//! makes it the executor compression passes gather their statistics with.

pub mod calibrate;
pub mod eval;

pub use calibrate::Calibrator;
pub use eval::{InterpError, Interpreter};
pub use kiln_rt::{Tensor, Value, kernels};
