//! kiln's passes: rewrites from a graph to a graph. A pass is a type implementing [`Pass`]:
//! a name, an options type that parses its part of the `--passes` text and carries its help
//! ([`options`]), and `run`. It depends on the IR only; it never runs the model (what it
//! needs of activations comes through its [`Context`]).
//!
//! One folder per family of passes, one file per pass or piece of one:
//! - [`quantize`]: mixed-precision lowering (a forced format or a bit budget; RTN or GPTQ;
//!   searched scales; LoRC corrections; W8A8).
//! - [`factorize`]: low-rank factorization (plain, whitened or ASVD truncated SVD; one
//!   rank, retained energy, or ranks allocated under a parameter budget), healed.
//! - [`prune`]: sparsity (unstructured per row or N:M; magnitude or Wanda scores), stored
//!   as kept values and a bitmask.
//! - [`tie`]: layer tying; so far the similarity of blocks that it chooses groups from.
//! - [`cleanup`]: `last_position` (an output at its last sequence position) and
//!   `dead_code`.
//!
//! The pieces every family shares: [`manager`] (the `--passes` syntax, the registry, a
//! pipeline run with the verifier after every pass), [`options`], [`context`],
//! [`report`], [`calibration`] (the statistics passes take), [`heal`] (refits on the
//! compressed model's own activations, judged end to end), [`allocate`] (one choice per
//! layer under a budget, by dynamic programming), [`layers`] (override
//! patterns and kinds of layers), [`budget`] (what a budget counts).
//!
//! Adding a pass: a file (or a folder, for a family) here, a type implementing [`Pass`]
//! with an options table, one entry in [`manager::REGISTRY`], and a filetest under
//! `tests/filetests/` for every option that rewrites differently.

pub mod allocate;
pub mod budget;
pub mod calibration;
pub mod cleanup;
pub mod context;
pub mod factorize;
pub mod heal;
pub mod layers;
pub mod manager;
pub mod options;
pub mod prune;
pub mod quantize;
pub mod report;
#[cfg(test)]
mod testing;
pub mod tie;

pub use context::{Context, Probe};
pub use manager::{PassCall, PipelineError};
pub use options::{Args, OptionHelp, Options};
pub use report::PassReport;

use kiln_ir::Graph;

/// How a pass checks the value of a `--override PATTERN=VALUE` it would take.
pub type OverrideCheck = fn(&str) -> Result<(), String>;

/// A pass: its name, one line saying what it does, its options, and the rewrite.
pub trait Pass {
    /// The name a pipeline calls it by.
    const NAME: &'static str;
    /// One line for `kiln passes`.
    const SUMMARY: &'static str;
    type Options: Options;

    /// How the pass checks a `--override PATTERN=VALUE`'s value, if it takes overrides
    /// (`None`: it takes none, and a pipeline whose passes take none refuses overrides).
    const OVERRIDES: Option<OverrideCheck> = None;

    /// Whether a call with these options measures changed models end to end through
    /// [`Context::probe`], which needs calibration rows held out from the statistics.
    fn probes(_options: &Self::Options) -> bool {
        false
    }

    fn run(graph: &mut Graph, options: &Self::Options, ctx: &Context) -> Result<PassReport, PassError>;
}

/// Why a pass could not rewrite a graph.
#[derive(Debug, thiserror::Error)]
pub enum PassError {
    /// The call's options are wrong (unknown, repeated, or a value out of range).
    #[error("{pass}: {message}")]
    Options { pass: &'static str, message: String },
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
    /// The graph a pass left does not verify: a bug in the pass.
    #[error("{pass} left a graph that does not verify: {message}")]
    Invalid { pass: &'static str, message: String },
}

impl PassError {
    pub fn options(pass: &'static str, message: String) -> PassError {
        PassError::Options { pass, message }
    }

    pub fn not_applicable(pass: &'static str, message: impl Into<String>) -> PassError {
        PassError::NotApplicable { pass, message: message.into() }
    }
}
