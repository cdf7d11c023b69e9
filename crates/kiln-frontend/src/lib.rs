//! kiln's front end: the model language and checkpoint readers.
//!
//! [`compile`] turns model source (plus an optional checkpoint to bind and check the
//! parameters against) into a verified [`kiln_ir::Graph`]. The grammar lives in
//! `grammar/kiln.pest`; the prelude of layers written in the language is
//! `src/prelude.kiln`.

// Diagnostics are large (spans, labels, help) but only built on the error path of the
// compiler; boxing them would cost more code than it saves.
#![allow(clippy::result_large_err)]

pub mod ast;
pub mod checkpoint;
pub mod diagnostic;
pub mod elaborate;
pub mod syntax;

pub use checkpoint::{Checkpoint, CheckpointError};
pub use diagnostic::Diagnostic;
pub use elaborate::Compiled;

/// The prelude's source text.
pub const PRELUDE: &str = include_str!("prelude.kiln");

/// Compiles model source into a verified IR graph. With a checkpoint, every parameter is
/// bound to its tensor and shape-checked; without one, weights are unbound references.
/// Errors carry a span into `source` (attach it with [`Diagnostic::with_source`]).
pub fn compile(source: &str, checkpoint: Option<&Checkpoint>) -> Result<Compiled, Diagnostic> {
    let prelude = syntax::parse(PRELUDE).expect("the prelude parses");
    let file = syntax::parse(source)?;
    elaborate::elaborate(&file, &prelude, checkpoint)
}
