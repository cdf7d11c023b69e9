//! Clean-up passes: rewrites that keep a model's results and drop work or data it does not
//! need.
//!
//! - [`last_position`]: an output at its last sequence position only (generation needs the
//!   next token's logits, not every position's).
//! - [`dead_code`]: nodes that no output depends on, and stored tensors no weight reads.

pub mod dead_code;
pub mod last_position;

pub use dead_code::DeadCode;
pub use last_position::LastPosition;
