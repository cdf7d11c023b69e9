//! `kiln`: the command-line compiler. Thin: it parses flags and calls the crates.

mod load;

use clap::{Parser, Subcommand};
use miette::Result;
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "kiln", version, about = "A model compiler: model specs + checkpoints -> small, fast CPU programs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Parse and type-check a model spec; with --weights, check every parameter against the checkpoint.
    Check {
        /// The model spec (.kiln).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF) to bind the parameters to.
        #[arg(long, short)]
        weights: Option<PathBuf>,
    },
    /// Print the IR of a model spec (the text form pinned by the snapshot tests).
    Ir {
        /// The model spec (.kiln).
        spec: PathBuf,
        /// Checkpoint to bind: weight formats and checksums appear in the IR.
        #[arg(long, short)]
        weights: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    miette::set_hook(Box::new(|_| {
        Box::new(miette::MietteHandlerOpts::new().context_lines(1).build())
    }))?;
    let cli = Cli::parse();
    match cli.command {
        Command::Check { spec, weights } => {
            let model = load::load(&spec, weights.as_deref())?;
            let g = &model.compiled.graph;
            let params: u64 = g
                .node_ids()
                .filter_map(|n| match &g.node(n).op {
                    kiln_ir::Op::Weight(_) => Some(g.node(n).ty.shape.iter().filter_map(|d| d.known()).product::<u64>()),
                    _ => None,
                })
                .sum();
            println!("{}: ok ({} nodes, {} parameters)", spec.display(), g.len(), params);
            if let Some(ck) = &model.checkpoint {
                println!("  weights bound from {} ({})", ck.path.display(), ck.kind);
                let unused = &model.compiled.unused_tensors;
                if !unused.is_empty() {
                    println!("  note: {} checkpoint tensors are not used by the model: {}", unused.len(), unused.join(", "));
                }
            }
        }
        Command::Ir { spec, weights } => {
            let model = load::load(&spec, weights.as_deref())?;
            print!("{}", kiln_ir::print(&model.compiled.graph));
        }
    }
    Ok(())
}
