pub mod eval;
pub mod kernels;
pub mod tensor;

pub use eval::{InterpError, Interpreter, Value};
pub use tensor::Tensor;
