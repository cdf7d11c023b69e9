//! Choosing and building the executor that runs a model (`--engine`, `--threads`).

use kiln_interp::Interpreter;
use kiln_ir::{Activations, Graph};
use kiln_jit::{Engine, EngineOptions};
use kiln_rt::eval::RunError;
use kiln_rt::{KvCache, Value};
use miette::{IntoDiagnostic, Result};
use std::collections::HashMap;
use std::time::Instant;

/// Which executor runs a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EngineKind {
    /// The reference interpreter, op by op: the numeric oracle. Linears taking int8
    /// activations (in the IR, or by --activations) compute the compiled engine's W8A8
    /// numbers in plain loops.
    Interp,
    /// Compiled kernels (the default): linear layers with bias, activation and residual
    /// fused, on weights in their stored format (Cranelift kernels; sgemm plus a Cranelift
    /// epilogue for f32 weights); other ops run the runtime's reference kernels.
    Jit,
}

/// The `--activations` values, each with its help, parsed into [`Activations`] by name.
pub fn activations_parser() -> impl clap::builder::TypedValueParser<Value = Activations> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let help = |a: Activations| match a {
        Activations::F32 => "f32 activations against the exactly decoded weights: the exact mode",
        Activations::Int8 => {
            "int8 activations per block of 32 and integer dot products (W8A8, llama.cpp's numerics) for Q8_0/Q4_0/Q4_1 weights and kiln's int formats"
        }
        Activations::Int8Row => {
            "As int8, but linears on int8 weights with one scale per row (`quantize(format=int8)`) take one activation scale per row and sum whole rows in integers: faster, and as accurate for encoders (MiniLM); llama-class models want int8"
        }
    };
    PossibleValuesParser::new(Activations::ALL.map(|a| PossibleValue::new(a.name()).help(help(a))))
        .map(|name| name.parse::<Activations>().expect("a possible value is a name"))
}

/// Execution flags shared by `run`, `eval`, `generate` and `bench`.
#[derive(Clone, Debug, clap::Args)]
pub struct ExecArgs {
    /// Execution engine.
    #[arg(long, value_enum, default_value_t = EngineKind::Jit)]
    pub engine: EngineKind,
    /// Worker threads for compiled kernels (default: all cores). Outputs are bitwise the
    /// same for any thread count.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Override the activations of the model's linears: each takes what this mode gives
    /// its weight (int8 only on integer block formats, int8-row only on int8gK weights;
    /// the others stay f32). Default: what the IR says, which `quantize(...,
    /// activations=int8)` sets in an artifact; f32 for a spec.
    #[arg(long, value_parser = activations_parser())]
    pub activations: Option<Activations>,
    /// Print where the time went (per linear shape and per op), JIT engine.
    #[arg(long)]
    pub profile: bool,
}

impl ExecArgs {
    /// `--activations`, if given, set on `graph`'s linears by the rule
    /// ([`kiln_ir::set_activations`]) before an executor is built on it; without it, every
    /// engine runs what the IR says.
    pub fn apply_activations(&self, graph: &mut Graph) {
        if let Some(mode) = self.activations {
            kiln_ir::set_activations(graph, mode);
        }
    }
}

pub enum Runner<'g> {
    Interp(Interpreter<'g>),
    Jit(Box<Engine<'g>>),
}

impl<'g> Runner<'g> {
    /// Builds the executor for `graph` as it is (apply `--activations` to it first,
    /// [`ExecArgs::apply_activations`]); returns it and the milliseconds it took (decoding
    /// weights and, for the JIT, compiling kernels).
    pub fn new(graph: &'g Graph, exec: &ExecArgs) -> Result<(Runner<'g>, f64)> {
        let start = Instant::now();
        let threads = exec.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let runner = match exec.engine {
            EngineKind::Interp => Runner::Interp(Interpreter::new(graph).into_diagnostic()?),
            EngineKind::Jit => {
                let options = EngineOptions { threads, profile: exec.profile };
                Runner::Jit(Box::new(kiln_jit::compile(graph, options).into_diagnostic()?))
            }
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

    /// With `--profile`, prints the time per kind of work to stderr.
    pub fn print_profile(&self) {
        let Runner::Jit(e) = self else { return };
        let rows = e.profile();
        let total: f64 = rows.iter().map(|r| r.1.as_secs_f64()).sum();
        if rows.is_empty() || total == 0.0 {
            return;
        }
        eprintln!("{:>10} {:>6} {:>9}  work", "ms", "%", "calls");
        let mut factors = 0.0;
        for (kind, t, calls) in rows {
            let ms = t.as_secs_f64() * 1e3;
            eprintln!("{ms:>10.1} {:>5.1}% {calls:>9}  {kind}", ms / total / 10.0);
            if kind.ends_with(kiln_jit::FACTOR) {
                factors += ms;
            }
        }
        if factors > 0.0 {
            eprintln!(
                "{factors:>10.1} {:>5.1}%            the linears of low-rank factors, together",
                factors / total / 10.0
            );
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Runner::Interp(_) => "interp",
            Runner::Jit(_) => "jit",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        exec: ExecArgs,
    }

    /// The flag takes exactly the names the IR text prints (`Activations`' `FromStr`), and
    /// lists them in `--help`.
    #[test]
    fn the_flag_takes_the_names_of_the_ir() {
        for a in Activations::ALL {
            let flags = Flags::try_parse_from(["kiln", "--activations", a.name()]).unwrap();
            assert_eq!(flags.exec.activations, Some(a));
        }
        assert!(Flags::try_parse_from(["kiln", "--activations", "int8-block"]).is_err());
        assert_eq!(Flags::try_parse_from(["kiln"]).unwrap().exec.activations, None);
        use clap::CommandFactory;
        let help = Flags::command().render_long_help().to_string();
        assert!(help.contains("- int8-row:") && help.contains("- f32:"), "{help}");
        let short = Flags::command().render_help().to_string();
        assert!(short.contains("[possible values: f32, int8, int8-row]"), "{short}");
    }
}
