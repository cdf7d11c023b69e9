//! Compressing a model with calibration from a program, without the CLI: the library calls
//! `kiln compile SPEC -w WEIGHTS --passes PASSES --calib CALIB -o OUT` makes, and the same
//! artifact bytes.
//!
//! ```sh
//! cargo run --release -p kiln-passes --example compress -- \
//!   examples/minilm/minilm.kiln ~/.cache/kiln/models/minilm/model.safetensors \
//!   ~/.cache/kiln/heldout/minilm_calib_docs.safetensors "quantize(bits=4.5)" minilm-q.kiln
//! ```
//!
//! The steps: compile the spec against its checkpoint (kiln-frontend); read the calibration
//! inputs; make the executor passes gather statistics and run probes with (a
//! `kiln_interp::Calibrator`, its probes on the JIT); run the pipeline (kiln-passes'
//! manager); write the artifact with the reports and the tokenizer found beside the weights
//! (kiln-rt). A GGUF's own tokenizer, which `kiln compile` rebuilds when no `tokenizer.json`
//! lies beside the file, is left out here.

use kiln_interp::Calibrator;
use kiln_interp::calibrate::ProbeEngine;
use kiln_passes::calibration::Executor;
use kiln_passes::{Context, manager, report};
use kiln_rt::artifact;
use std::collections::BTreeMap;
use std::path::Path;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [spec, weights, calib, passes, out] = args.as_slice() else {
        eprintln!("usage: compress SPEC WEIGHTS CALIB PASSES OUT.kiln");
        std::process::exit(2);
    };
    if let Err(e) = compress(Path::new(spec), Path::new(weights), Path::new(calib), passes, Path::new(out)) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn compress(spec: &Path, weights: &Path, calib: &Path, passes: &str, out: &Path) -> Result<(), String> {
    // The model: the spec bound to its checkpoint.
    let source = std::fs::read_to_string(spec).map_err(|e| format!("{}: {e}", spec.display()))?;
    let checkpoint = kiln_frontend::checkpoint::load(weights).map_err(|e| format!("{}: {e}", weights.display()))?;
    let mut graph = kiln_frontend::compile(&source, Some(&checkpoint)).map_err(|e| format!("{e:?}"))?.graph;

    // The pipeline, checked before anything runs.
    let calls = manager::parse(passes).map_err(|e| format!("--passes at byte {}: {e}", e.offset))?;
    manager::check(&calls, true, &[]).map_err(|e| e.to_string())?;

    // The calibration inputs, and the executor passes ask for statistics and probes.
    let bytes = std::fs::read(calib).map_err(|e| format!("{}: {e}", calib.display()))?;
    let file = kiln_rt::io::decode(&bytes).map_err(|e| format!("{}: {e}", calib.display()))?;
    let inputs = kiln_rt::io::inputs_from(&file, &calib.display().to_string(), &graph).map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let engine: ProbeEngine = Box::new(move |g, inputs, base| kiln_jit::run_keeping(g, threads, inputs, base));
    let calibrator = Calibrator::new(&graph, inputs, manager::probes_any(&calls), engine)?;
    let progress = |done: usize, total: usize, what: &str| eprint!("\r{what}: {done}/{total}\x1b[K");
    let ctx = Context::new(Some(&calibrator as &dyn Executor), Vec::new(), &progress);

    // The passes, the graph verified after each.
    let reports = manager::run(&mut graph, &calls, &ctx, &mut |_, _| {}).map_err(|e| e.to_string())?;
    eprintln!();
    let ran: Vec<_> = calls.into_iter().zip(reports).collect();

    // The artifact: the graph with its weights (and its linears' activations) as the passes
    // left them, and the metadata `kiln compile` writes.
    let mut metadata = BTreeMap::new();
    metadata.insert(artifact::PASSES_KEY.to_string(), report::pipeline_json(&ran));
    let tokenizer = weights.with_file_name("tokenizer.json");
    if tokenizer.exists() {
        let tok = tokenizers::Tokenizer::from_file(&tokenizer).map_err(|e| format!("{}: {e}", tokenizer.display()))?;
        metadata.insert(artifact::TOKENIZER_KEY.to_string(), tok.to_string(false).map_err(|e| e.to_string())?);
    }
    if let Some(eos) = checkpoint.meta_u64("tokenizer.ggml.eos_token_id") {
        metadata.insert(artifact::EOS_KEY.to_string(), eos.to_string());
    }
    let name = |p: &Path| p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned());
    metadata.insert(artifact::SOURCE_KEY.to_string(), format!("{} + {}", name(spec), name(weights)));
    artifact::write(out, &graph, &metadata).map_err(|e| e.to_string())?;
    for (call, report) in &ran {
        eprintln!("{call}");
        for note in report.notes() {
            eprintln!("  note: {note}");
        }
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
