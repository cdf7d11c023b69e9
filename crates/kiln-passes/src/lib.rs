//! kiln's passes: rewrites from a graph to a graph, one file per pass. A pass depends on
//! the IR only; it never runs the model (passes that need activations take them as data).
//!
//! - [`last_position`]: compute an output at the last sequence position only (generation
//!   needs the next token's logits, not every position's).
//! - [`quantize`]: store matrices in fewer bits (a forced format or a budget; RTN or
//!   [`gptq`]; formats chosen by [`allocate`] over measured sensitivities).
//!
//! [`pipeline`] parses `--passes` and runs passes by name; [`calibration`] is the
//! activation data passes take.

pub mod allocate;
pub mod calibration;
pub mod clip;
pub mod gptq;
pub mod last_position;
pub mod lorc;
pub mod pipeline;
pub mod quantize;

/// Why a pass could not rewrite a graph.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The graph lacks what the pass needs (with the reason, for the user).
    #[error("{pass}: {message}")]
    NotApplicable { pass: &'static str, message: String },
    /// A rewrite produced an ill-typed node: a bug in the pass.
    #[error("{pass}: {source}")]
    Graph {
        pass: &'static str,
        #[source]
        source: kiln_ir::GraphError,
    },
}
