//! `main` of a native executable: `kiln run` and `kiln generate --prompt-ids` for the one
//! model linked into it, with the same inputs, outputs and error messages.

use crate::{ModelData, Program};
use clap::{CommandFactory, FromArgMatches, Parser};
use kiln_ir::{Graph, Op};
use kiln_rt::KvCache;
use kiln_rt::lm::{LanguageModel, argmax};
use std::ffi::{CStr, c_char, c_int};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Parser)]
#[command(disable_version_flag = true)]
struct Args {
    /// Input tensors, taken by the model's input names (other tensors are ignored).
    #[arg(long, short)]
    input: Option<PathBuf>,
    /// Where to write every output, by name (safetensors). Without it, their shapes are
    /// printed.
    #[arg(long, short)]
    output: Option<PathBuf>,
    /// Language models: continue these token ids (comma-separated), greedily.
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Language models: how many tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Language models: keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Language models: print one JSON object {"ids": [...]}.
    #[arg(long)]
    json: bool,
    /// Worker threads (default: all cores). Outputs are bitwise the same for any count.
    #[arg(long)]
    threads: Option<usize>,
    /// With --input: run the model this many more times after the first and print the
    /// median and fastest time of those runs (as `kiln bench` does).
    #[arg(long, value_name = "N")]
    runs: Option<usize>,
}

/// The executable's `main`, called by the generated C with the linked model.
///
/// # Safety
/// `argv` must hold `argc` C strings, and `model` describe a model linked into this program
/// (see [`Program::from_data`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_native_main(argc: c_int, argv: *const *const c_char, model: *const ModelData) -> c_int {
    // SAFETY: the caller's.
    let args: Vec<String> = (0..argc.max(0) as usize)
        .map(|i| unsafe { CStr::from_ptr(*argv.add(i)) }.to_string_lossy().into_owned())
        .collect();
    // A panic is a bug, reported as one, with the exit status of an error (no unwinding
    // into C).
    // SAFETY: the caller's.
    let main = std::panic::AssertUnwindSafe(|| unsafe { main(args, &*model) });
    std::panic::catch_unwind(main).unwrap_or_else(|_| fail("internal error (a panic in kiln's runtime)", None))
}

/// # Safety
/// As [`kiln_native_main`]'s `model`.
unsafe fn main(args: Vec<String>, model: &ModelData) -> c_int {
    // SAFETY: the caller's.
    let program = unsafe { Program::from_data(model) };
    // `--help` works even when the model cannot be read (say, its weights file is missing).
    let about = match &program {
        Ok(p) => about(p),
        Err(e) => format!("A model compiled by kiln into this executable, which cannot be read: {e}"),
    };
    let name =
        args.first().map(std::path::Path::new).and_then(|p| p.file_name()).map(|n| n.to_string_lossy().into_owned());
    let command = Args::command().bin_name(name.unwrap_or_else(|| "model".into())).about(about);
    let args = match command.try_get_matches_from(args).and_then(|m| Args::from_arg_matches(&m)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    let program = match program {
        Ok(p) => p,
        Err(e) => return fail(&e.to_string(), None),
    };
    match run(&program, &args) {
        Ok(()) => 0,
        Err((message, help)) => fail(&message, help.as_deref()),
    }
}

/// Prints an error as `kiln` does (message, then help), and returns the exit status.
fn fail(message: &str, help: Option<&str>) -> c_int {
    eprintln!("Error: {message}");
    if let Some(help) = help {
        eprintln!("  help: {help}");
    }
    1
}

type Failure = (String, Option<String>);

fn failure(e: impl std::fmt::Display) -> Failure {
    (e.to_string(), None)
}

fn run(program: &Program, args: &Args) -> Result<(), Failure> {
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        return Err(failure("--threads must be at least 1"));
    }
    match (&args.input, &args.prompt_ids) {
        (Some(input), None) => run_tensors(program, input, args, threads),
        (None, Some(ids)) => generate(program, ids, args, threads),
        (Some(_), Some(_)) => Err(failure("give either --input or --prompt-ids, not both")),
        (None, None) => Err((
            "nothing to run: give --input FILE".into(),
            Some("PROGRAM --input IN.safetensors --output OUT.safetensors (see --help)".into()),
        )),
    }
}

fn run_tensors(program: &Program, input: &std::path::Path, args: &Args, threads: usize) -> Result<(), Failure> {
    let graph = program.graph();
    let bytes = std::fs::read(input).map_err(|e| failure(format!("cannot read {}: {e}", input.display())))?;
    let file = kiln_rt::io::decode(&bytes)
        .map_err(|e| failure(format!("{} is not a valid safetensors file: {e}", input.display())))?;
    let inputs =
        kiln_rt::io::inputs_from(&file, &input.display().to_string(), graph).map_err(|e| (e.message, e.help))?;
    let start = Instant::now();
    let engine = program.engine(graph, threads).map_err(failure)?;
    let ready = start.elapsed();
    let run = || engine.run(&inputs).map_err(|e| failure(format!("cannot run the model on {}: {e}", input.display())));
    let outputs = run()?;
    if let Some(runs) = args.runs.filter(|&r| r > 0) {
        let mut times = Vec::with_capacity(runs);
        for _ in 0..runs {
            let t = Instant::now();
            run()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        eprintln!(
            "median {:.2} ms, min {:.2} ms over {runs} runs; ready in {:.1} ms",
            times[runs / 2],
            times[0],
            ready.as_secs_f64() * 1e3
        );
    }
    match args.output.as_deref() {
        Some(path) => {
            let bytes = kiln_rt::io::encode(&outputs).map_err(failure)?;
            std::fs::write(path, bytes).map_err(|e| failure(format!("cannot write {}: {e}", path.display())))?;
            eprintln!("wrote {} output(s) to {}", outputs.len(), path.display());
        }
        None => {
            for (name, value) in &outputs {
                println!("{name}: {}{:?}", value.dtype(), value.shape());
            }
        }
    }
    Ok(())
}

fn generate(program: &Program, ids: &str, args: &Args, threads: usize) -> Result<(), Failure> {
    let lm = LanguageModel::of(program.graph())
        .map_err(|e| (e.to_string(), Some(kiln_rt::lm::NotLanguageModel::HELP.into())))?;
    let prompt = kiln_rt::lm::parse_ids(ids).map_err(failure)?;
    lm.check_prompt(&prompt).map_err(failure)?;
    let eos: Option<i64> = match args.ignore_eos {
        true => None,
        false => program.artifact.metadata.get(kiln_rt::artifact::EOS_KEY).and_then(|e| e.parse().ok()),
    };
    let graph: Graph = match program.generation_graph() {
        Some(g) => g.map_err(failure)?,
        None => program.graph().clone(),
    };
    let engine = program.engine(&graph, threads).map_err(failure)?;
    let mut cache = KvCache::new();
    let step = |ids: &[i64], cache: &mut KvCache| -> Result<Vec<f32>, Failure> {
        let at = cache.positions();
        let outputs = engine
            .run_cached(&lm.step_inputs(ids), cache)
            .map_err(|e| failure(format!("generation failed at position {at}: {e}")))?;
        lm.last_logits(outputs).ok_or_else(|| failure("the model produced no f32 logits"))
    };
    let start = Instant::now();
    let mut logits = step(&prompt, &mut cache)?;
    let prefill = start.elapsed();
    let decode_start = Instant::now();
    let mut out: Vec<i64> = Vec::new();
    while out.len() < args.max_tokens {
        let next = argmax(&logits);
        out.push(next);
        if Some(next) == eos || out.len() == args.max_tokens {
            break;
        }
        logits = step(&[next], &mut cache)?;
    }
    let decode = decode_start.elapsed();
    let list = out.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    match args.json {
        true => println!("{{\"ids\": [{list}]}}"),
        false => println!("{list}"),
    }
    // As `kiln generate` reports it.
    eprintln!(
        "{} prompt tokens in {:.1} ms; {} tokens generated, {:.1} ms/token (cache {:.1} MB)",
        prompt.len(),
        prefill.as_secs_f64() * 1e3,
        out.len(),
        decode.as_secs_f64() * 1e3 / out.len().saturating_sub(1).max(1) as f64,
        cache.bytes() as f64 / 1e6,
    );
    Ok(())
}

/// `--help`'s description: which model this is, its inputs and outputs, and what built it.
fn about(program: &Program) -> String {
    let g = program.graph();
    let meta = &program.artifact.metadata;
    let mut s = format!("The model `{}`, compiled by kiln into this executable", g.name);
    if let Some(source) = meta.get(kiln_rt::artifact::SOURCE_KEY) {
        s += &format!(" from {source}");
    }
    s += ".\n\nInputs:\n";
    for id in g.inputs() {
        if let Op::Input { name } = &g.node(id).op {
            s += &format!("  {name}: {}\n", g.node(id).ty);
        }
    }
    s += "Outputs:\n";
    for (name, id) in g.outputs() {
        s += &format!("  {name}: {}\n", g.node(*id).ty);
    }
    let passes = pass_list(program.artifact.passes());
    s += &format!("Passes: {}\n", if passes.is_empty() { "none".into() } else { passes });
    s += &format!("Activations: {}\n", program.activations());
    if let Some(target) = meta.get(crate::TARGET_KEY) {
        s += &format!("Kernels compiled for: {target}\n");
    }
    if LanguageModel::of(g).is_ok() {
        s += "\nA language model: --prompt-ids 1,2,3 --max-tokens N continues token ids greedily.";
    }
    s
}

/// The pass calls of an artifact's pass reports (a JSON array of `{"call", "report"}` objects).
fn pass_list(reports: &str) -> String {
    let parsed: serde_json::Value = serde_json::from_str(reports).unwrap_or_default();
    let calls: Vec<String> = parsed
        .as_array()
        .map(|a| a.iter().filter_map(|r| r.get("call").and_then(|p| p.as_str()).map(String::from)).collect())
        .unwrap_or_default();
    calls.join(", ")
}
