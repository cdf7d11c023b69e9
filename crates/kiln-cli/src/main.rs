//! `kiln`: the command-line compiler. Thin: it parses flags and calls the crates.

mod analyze;
mod bench;
mod compile;
mod eval;
mod generate;
mod gguf_tokenizer;
mod load;
mod native;
mod passes;
mod progress;
mod report;
mod run;
mod runner;
mod tensors;

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
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF) to bind the parameters to.
        #[arg(long, short)]
        weights: Option<PathBuf>,
    },
    /// Print the IR of a model spec or artifact (the text form pinned by the snapshot tests).
    Ir {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint to bind: weight formats and checksums appear in the IR.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Print the IR after these passes (`kiln passes` lists them).
        #[command(flatten)]
        passes: passes::PassArgs,
        /// Print the IR after each pass of --passes (`all`) or after the passes of one name,
        /// each section headed by `; after NAME(options)`, instead of once at the end.
        #[arg(long, value_name = "all|NAME", requires = "passes")]
        print_after: Option<String>,
    },
    /// Compile a spec and its checkpoint into one artifact file (weights as stored, IR, tokenizer),
    /// or with --emit exe|lib into a native executable or static library.
    #[command(
        after_help = "The artifact is a safetensors file: the weights in their stored formats, the IR text and\nformat version in its metadata, the pass reports, and the tokenizer when one is found.\n`run`, `eval`, `generate` and `bench` take it in place of SPEC --weights W and give bitwise\nthe same outputs; `kiln report` prints what the passes did.\n\nWith --emit exe, the kernels `kiln run` would JIT-compile are compiled ahead of time and linked\nby the system's C compiler (cc, or $CC) with kiln's runtime library (libkiln_native.a, beside\nthe kiln binary or at $KILN_NATIVE_LIB) into one program holding the weights:\n`PROGRAM --input IN --output OUT` computes kiln run's outputs bit for bit, `PROGRAM --help` says\nmore. --emit lib -o libNAME.a writes a static library and NAME.h (a C API; see\nexamples/c/minilm.c). Either takes a spec with --weights, or an artifact.\n\n--passes runs compression and clean-up passes first: `kiln passes` lists each with its\noptions and defaults.\n\nExamples:\n  kiln compile smollm2.kiln -w model.gguf -o smollm2.kiln.st && kiln generate smollm2.kiln.st --prompt \"Hi\"\n  kiln compile minilm.kiln -w model.safetensors --passes \"quantize(bits=4.5)\" --calib calib.safetensors -o minilm-q.kiln.st\n  kiln compile minilm-q.kiln.st --emit exe -o minilm && ./minilm --input in.safetensors --output out.safetensors\n  kiln compile minilm.kiln -w model.safetensors --emit lib -o build/libminilm.a"
    )]
    Compile {
        /// The model spec (.kiln source), or with --emit exe or lib a compiled artifact.
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); a spec needs one, an artifact holds its own.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Where to write the artifact (or the executable).
        #[arg(long, short)]
        output: PathBuf,
        /// tokenizer.json to store (default: beside the weights, else the GGUF's own).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        passes: passes::PassArgs,
        /// What to write: an artifact, or a standalone executable (kernels compiled ahead of
        /// time, weights inside; links with the system's `cc`).
        #[arg(long, value_enum, default_value_t = native::Emit::Artifact)]
        emit: native::Emit,
        /// With --emit exe or lib: the CPU the kernels are compiled for: `native` (this one)
        /// or a name such as x86-64-v2, x86-64-v3, haswell, znver3. The program refuses to run
        /// on a CPU that lacks a feature its kernels may use.
        #[arg(long, default_value = "native")]
        target_cpu: String,
        /// With --emit exe or lib: set every linear's activations by this mode before the
        /// kernels are chosen (int8 only where its weight's format allows it); default: what
        /// the IR says (the quantize pass's choice). The program runs as `kiln run
        /// --activations` would.
        #[arg(long, value_parser = runner::activations_parser())]
        activations: Option<kiln_ir::Activations>,
        /// With --emit exe: keep the weights in a file beside the program (PROGRAM.kiln, an
        /// artifact), mapped when it starts, instead of inside it.
        #[arg(long)]
        weights_beside: bool,
    },
    /// Analyze a model before compressing it: --similarity compares its blocks pair by pair.
    #[command(after_help = "--similarity: for every pair of blocks (the model's stack, `blk.3` or `encoder.layer.3`),
the cosine of their matrices of each role (a layer PREFIX.ROLE of each block, flattened),
and with --calib, of the blocks' output deltas (what each block adds to the residual stream,
token by token): their mean cosine over tokens, and linear CKA (alike up to rotation and
scale). Up to 1024 calibration tokens are compared. It is what `tie` chooses groups from.

The text gives each table as a matrix and its five most alike pairs; --json gives the tables
as {\"blocks\", \"tokens\", \"weights\": {ROLE: [[...]]}, \"outputs\": {\"cosine\", \"cka\"}} (null:
no value, e.g. matrices of different shapes); --plot FILE.svg draws one heatmap per table.

Example:
  kiln analyze smollm2.kiln -w model.gguf --calib calib.safetensors --similarity --plot similarity.svg")]
    Analyze {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); not with an artifact.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Calibration inputs (safetensors, one sequence per row), for the output comparisons.
        #[arg(long)]
        calib: Option<PathBuf>,
        /// Compare the blocks pair by pair.
        #[arg(long)]
        similarity: bool,
        /// Write the heatmaps as SVG.
        #[arg(long, value_name = "FILE.svg")]
        plot: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print what the passes did to an artifact: per layer its format, bits, bytes and error.
    #[command(
        after_help = "Columns: scope, format, bits per weight (scales included), bytes, sensitivity (the\nsearch's estimate of the output error it adds), error (measured output error relative to the\nlayer's output energy on the calibration data).\n\nAfter factorize, per candidate layer (a factor's rows show its layer's): rank (\"dense\" for a\ncandidate left dense, - for no candidate), params before (rows * columns) and params after\n(rank * (rows + columns), or rows * columns when dense), rank error (the discarded share of the\nlayer's spectrum, whitened by the calibration data for whitened and asvd) and, when healing ran, healed error (the refit's layer-wise error\nover the one-shot factors', and whether the probe kept it); then the candidates' parameters\nbefore and after in total and their ratio. --json gives them as rank, params_before,\nparams_after, rank_error, healed, and the totals as factorized.\n\nAfter prune, per candidate layer: pattern (N kept of every M weights along a row, N:columns\nwhen unstructured, \"dense\" for a candidate left dense, - for no candidate), sparsity (the share\nof its weights removed), bytes before and after (the weight's, its mask included), pruned bits\n(bits per weight as pruned), prune error (the layer's output error relative to its output\nenergy on the calibration data, when measured), kernel (what runs it, when given) and why it\nstayed dense; then the pass's sparsity, bytes before and after, and notes. --json gives them\nper layer under prune, and the totals as pruned.\n\nAfter tie, per matrix role tied across a group: its members, the shared weight's shape, the\nrank of each member's delta, the parameters before and after (the shared weight counted once)\nand each member's output error relative to its output energy on the calibration data; --json\ngives them under tied.\n\n--plot FILE.svg draws bits per weight and sensitivity by layer; after factorize, each\ncandidate's rank as a fraction of its full rank min(rows, columns) (a dense one at 1.0, marked);\nafter prune, each candidate's sparsity (a dense one at 0, marked).\n\nExample:\n  kiln report minilm-q.kiln.st --plot layers.svg"
    )]
    Report {
        /// A compiled artifact (`kiln compile`).
        artifact: PathBuf,
        /// Print one JSON object {"layers": [...], "bits_per_weight": ...}.
        #[arg(long)]
        json: bool,
        /// Write an SVG plot of bits and sensitivity by layer, of ranks after factorize, and
        /// of sparsity after prune.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Run a model on tensors from a safetensors file (by input name) or on text.
    #[command(
        after_help = "Examples:\n  kiln run minilm.kiln -w model.safetensors --text \"A sentence.\"\n  kiln run minilm.kiln -w model.safetensors --input in.safetensors --output out.safetensors"
    )]
    Run {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); not with an artifact, which holds its weights.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Input tensors, taken by the model's input names (other tensors are ignored).
        #[arg(long, short)]
        input: Option<PathBuf>,
        /// Where to write every output, by name.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Text to tokenize into input_ids (and attention_mask); repeat for a batch.
        #[arg(long)]
        text: Vec<String>,
        /// tokenizer.json (default: beside the weights).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        exec: runner::ExecArgs,
    },
    /// Perplexity of a language model on `input_ids`, or agreement with reference outputs.
    #[command(
        after_help = "FILE holds the model's inputs by name. For a language model (output `logits`)\nkiln reports perplexity under teacher forcing (and, with an `nll` tensor, the mean\ndifference to it). Reference outputs stored under an output's name (`embeddings`) are\ncompared by cosine per row and max abs difference; `first_logits`/`last_logits` compare\nthe logits at the first/last position."
    )]
    Eval {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); not with an artifact, which holds its weights.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Inputs (and optional references) as safetensors.
        #[arg(long, short)]
        data: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// Rows per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        #[command(flatten)]
        exec: runner::ExecArgs,
    },
    /// Continue a prompt with a language model (greedy by default), over a KV cache.
    #[command(
        after_help = "The model needs an input `input_ids: i64[batch, seq]` and an output `logits: f32[batch, seq, vocab]`.\nThe tokenizer is tokenizer.json beside the weights, or the one in the GGUF metadata;\ngeneration stops at the GGUF's end-of-sequence token unless --ignore-eos.\n\nExamples:\n  kiln generate smollm2.kiln -w model.gguf --prompt \"The capital of France is\" --max-tokens 16\n  kiln generate smollm2.kiln -w model.gguf --prompt-ids 504,1646,2359 --max-tokens 8 --json"
    )]
    Generate {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); not with an artifact, which holds its weights.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Text to continue (tokenized with the model's tokenizer).
        #[arg(long)]
        prompt: Option<String>,
        /// Token ids to continue, comma-separated.
        #[arg(long)]
        prompt_ids: Option<String>,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Keep going after the end-of-sequence token.
        #[arg(long)]
        ignore_eos: bool,
        /// Print one JSON object {"ids": [generated ids], "text": "..."}.
        #[arg(long)]
        json: bool,
        /// tokenizer.json (default: beside the weights, else the GGUF's own).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        #[command(flatten)]
        sampling: generate::Sampling,
        #[command(flatten)]
        exec: runner::ExecArgs,
    },
    /// List every pass --passes can name, with its options and their defaults.
    #[command(
        after_help = "A pipeline is a list of calls separated by `,` or `;`, run in order:\n  kiln compile minilm.kiln -w model.safetensors --calib calib.safetensors \\\n    --passes \"quantize(bits=4.5); dead_code\" -o minilm-q.kiln\n  kiln ir smollm2.kiln -w model.gguf --passes \"quantize(format=int8), last_position\" --print-after all"
    )]
    Passes,
    /// Time a model on synthetic inputs (median of repeated runs after warm-up).
    #[command(
        after_help = "Token ids are spread over the embedding table; masks are all ones.\nExamples:\n  kiln bench minilm.kiln -w model.safetensors --shape batch=1,seq=128 --json\n  kiln bench smollm2.kiln -w model.gguf --decode 64 --prompt-len 128 --engine jit"
    )]
    Bench {
        /// The model spec (.kiln source) or a compiled artifact (`kiln compile`).
        spec: PathBuf,
        /// Checkpoint (safetensors or GGUF); not with an artifact, which holds its weights.
        #[arg(long, short)]
        weights: Option<PathBuf>,
        /// Time one forward pass with these sizes of the symbolic dimensions, e.g. batch=1,seq=128.
        #[arg(long)]
        shape: Option<String>,
        /// Time generation instead: this many tokens, one per step over a KV cache, after a
        /// prompt of --prompt-len tokens (language models).
        #[arg(long)]
        decode: Option<usize>,
        /// Prompt tokens before --decode.
        #[arg(long, default_value_t = 128)]
        prompt_len: usize,
        /// Timed runs (default 20 for --shape, 3 for --decode).
        #[arg(long)]
        runs: Option<usize>,
        /// Untimed runs first.
        #[arg(long, default_value_t = 3)]
        warmup: usize,
        /// Print one JSON object (median_ms, min_ms, tokens_per_s, ...).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        exec: runner::ExecArgs,
    },
}

fn main() -> Result<()> {
    // Like other Unix tools, end quietly when the reader of stdout goes away (`kiln ir | head`).
    // SAFETY: resetting a signal disposition to its default before any threads start.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    miette::set_hook(Box::new(|_| Box::new(miette::MietteHandlerOpts::new().context_lines(1).build())))?;
    let cli = Cli::parse();
    match cli.command {
        Command::Check { spec, weights } => {
            let model = load::load(&spec, weights.as_deref())?;
            let g = &model.graph;
            let params: u64 = g
                .node_ids()
                .filter_map(|n| match &g.node(n).op {
                    kiln_ir::Op::Weight(_) => {
                        Some(g.node(n).ty.shape.iter().filter_map(|d| d.known()).product::<u64>())
                    }
                    _ => None,
                })
                .sum();
            println!("{}: ok ({} nodes, {} parameters)", spec.display(), g.len(), params);
            if model.is_artifact() {
                println!("  a compiled artifact, weights included");
            }
            if let Some(ck) = model.checkpoint() {
                println!("  weights bound from {} ({})", ck.path.display(), ck.kind);
                let unused = &model.unused_tensors;
                if !unused.is_empty() {
                    println!(
                        "  note: {} checkpoint tensors are not used by the model: {}",
                        unused.len(),
                        unused.join(", ")
                    );
                }
            }
        }
        Command::Ir { spec, weights, passes, print_after } => {
            let mut model = load::load(&spec, weights.as_deref())?;
            if let Some(name) = &print_after
                && name != "all"
            {
                kiln_passes::manager::lookup(name).map_err(|e| miette::miette!("--print-after: {e}"))?;
                let pipeline = passes.passes.as_deref().unwrap_or_default();
                let calls = kiln_passes::manager::parse(pipeline).unwrap_or_default();
                if !calls.iter().any(|c| c.name == *name) {
                    return Err(miette::miette!("--print-after {name}: the pipeline `{pipeline}` does not run {name}"));
                }
            }
            let mut after = |call: &kiln_passes::PassCall, g: &kiln_ir::Graph| match &print_after {
                Some(name) if name == "all" || *name == call.name => {
                    print!("; after {call}\n{}", kiln_ir::print(g));
                }
                _ => {}
            };
            let ran = passes::apply(&mut model.graph, &passes, &mut after)?;
            passes::summarize(&ran);
            if print_after.is_none() {
                print!("{}", kiln_ir::print(&model.graph));
            }
        }
        Command::Compile {
            spec,
            weights,
            output,
            tokenizer,
            passes,
            emit,
            target_cpu,
            activations,
            weights_beside,
        } => {
            compile::compile(compile::CompileArgs {
                spec,
                weights,
                output,
                tokenizer,
                passes,
                emit,
                target_cpu,
                activations,
                weights_beside,
            })?;
        }
        Command::Analyze { spec, weights, calib, similarity, plot, json } => {
            analyze::analyze(analyze::AnalyzeArgs { spec, weights, calib, similarity, plot, json })?;
        }
        Command::Report { artifact, json, plot } => report::report(&artifact, json, plot.as_deref())?,
        Command::Run { spec, weights, input, output, text, tokenizer, exec } => {
            run::run(run::RunArgs { spec, weights, input, output, text, tokenizer, exec })?;
        }
        Command::Eval { spec, weights, data, json, batch, exec } => {
            eval::eval(eval::EvalArgs { spec, weights, data, json, batch, exec })?;
        }
        Command::Generate {
            spec,
            weights,
            prompt,
            prompt_ids,
            max_tokens,
            ignore_eos,
            json,
            tokenizer,
            sampling,
            exec,
        } => {
            generate::generate(generate::GenerateArgs {
                spec,
                weights,
                prompt,
                prompt_ids,
                max_tokens,
                sampling,
                ignore_eos,
                json,
                tokenizer,
                exec,
            })?;
        }
        Command::Passes => print!("{}", kiln_passes::manager::help()),
        Command::Bench { spec, weights, shape, decode, prompt_len, runs, warmup, json, exec } => {
            bench::bench(bench::BenchArgs { spec, weights, shape, decode, prompt_len, runs, warmup, json, exec })?;
        }
    }
    Ok(())
}
