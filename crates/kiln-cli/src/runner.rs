//! Choosing and building the executor that runs a model (`--engine`, `--threads`).

use kiln_interp::Interpreter;
use kiln_ir::Graph;
use kiln_jit::Engine;
use kiln_rt::exec::RunError;
use kiln_rt::{KvCache, Value};
use miette::{IntoDiagnostic, Result};
use std::collections::HashMap;
use std::time::Instant;

/// Which executor runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The reference interpreter: f32, op by op; the numeric oracle.
    Interp,
    /// Cranelift-compiled kernels: linear layers (with bias, activation and residual fused)
    /// on weights in their stored format; other ops still run reference kernels.
    Jit,
}

/// Execution flags shared by `run`, `eval` and `bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecArgs {
    /// Execution engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Interp)]
    pub engine: EngineKind,
    /// Worker threads for compiled kernels (default: all cores). Outputs are bitwise the
    /// same for any thread count.
    #[arg(long)]
    pub threads: Option<usize>,
}

pub enum Runner<'g> {
    Interp(Interpreter<'g>),
    Jit(Engine<'g>),
}

impl<'g> Runner<'g> {
    /// Builds the executor; returns it and the milliseconds it took (decoding weights and,
    /// for the JIT, compiling kernels).
    pub fn new(graph: &'g Graph, exec: &ExecArgs) -> Result<(Runner<'g>, f64)> {
        let start = Instant::now();
        let threads = exec.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let runner = match exec.engine {
            EngineKind::Interp => Runner::Interp(Interpreter::new(graph).into_diagnostic()?),
            EngineKind::Jit => Runner::Jit(Engine::new(graph, threads).into_diagnostic()?),
        };
        Ok((runner, start.elapsed().as_secs_f64() * 1e3))
    }

    pub fn run(&self, inputs: &HashMap<String, Value>) -> Result<Vec<(String, Value)>, RunError> {
        match self {
            Runner::Interp(i) => i.run(inputs),
            Runner::Jit(e) => e.run(inputs),
        }
    }

    /// Runs over new tokens of the sequences in `cache`, adding them to it.
    pub fn run_cached(
        &self,
        inputs: &HashMap<String, Value>,
        cache: &mut KvCache,
    ) -> Result<Vec<(String, Value)>, RunError> {
        match self {
            Runner::Interp(i) => i.run_cached(inputs, cache),
            Runner::Jit(e) => e.run_cached(inputs, cache),
        }
    }

    /// Milliseconds spent compiling kernels (0 for the interpreter).
    pub fn compile_ms(&self) -> f64 {
        match self {
            Runner::Interp(_) => 0.0,
            Runner::Jit(e) => e.compile_time().as_secs_f64() * 1e3,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Runner::Interp(_) => "interp",
            Runner::Jit(_) => "jit",
        }
    }
}
