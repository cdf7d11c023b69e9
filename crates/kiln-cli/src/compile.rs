//! `kiln compile`: a spec bound to its checkpoint, written as one artifact file or, with
//! `--emit exe`, as a native executable (see [`crate::native`]).

use crate::load::{self, EOS_KEY, SOURCE_KEY, TOKENIZER_KEY};
use crate::native::Emit;
use kiln_ir::Op;
use miette::{IntoDiagnostic, Result, miette};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct CompileArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub output: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub passes: crate::passes::PassArgs,
    pub emit: Emit,
    pub target_cpu: String,
    pub activations: Option<kiln_ir::Activations>,
    pub weights_beside: bool,
}

pub fn compile(args: CompileArgs) -> Result<()> {
    let start = Instant::now();
    let is_artifact = kiln_rt::artifact::looks_like_artifact(&args.spec);
    if args.emit == Emit::Artifact && args.target_cpu != "native" {
        return Err(miette!("--target-cpu chooses the CPU of compiled kernels: it needs --emit exe or lib"));
    }
    if args.emit != Emit::Exe && args.weights_beside {
        return Err(miette!("--weights-beside puts an executable's weights in a file beside it: it needs --emit exe"));
    }
    if args.emit == Emit::Artifact && args.activations.is_some() {
        return Err(miette!(
            help = "an artifact's linears take the activations `quantize(..., activations=int8)` gives them; `kiln run --activations` overrides them",
            "--activations on `kiln compile` overrides the activations of --emit exe or lib"
        ));
    }
    let (model, metadata) = match (is_artifact, args.emit) {
        (true, Emit::Artifact) => return Err(miette!("{} is already a compiled artifact", args.spec.display())),
        (true, _) => {
            if !args.passes.is_empty() {
                return Err(miette!(
                    help = "run the passes when compiling the spec, or compile the artifact without --passes",
                    "{} is a compiled artifact: its passes have run",
                    args.spec.display()
                ));
            }
            let model = load::load_runnable(&args.spec, args.weights.as_deref())?;
            let metadata = match &model.origin {
                load::Origin::Artifact { metadata, .. } => metadata.clone(),
                load::Origin::Spec { .. } => unreachable!("read as an artifact"),
            };
            (model, metadata)
        }
        (false, _) => {
            let weights = args.weights.as_deref().ok_or_else(|| {
                miette!(
                    help = "pass --weights CHECKPOINT (safetensors or GGUF)",
                    "{} is a model spec: compiling it needs its weights",
                    args.spec.display()
                )
            })?;
            let mut model = load::load(&args.spec, Some(weights))?;
            let metadata = bind(&mut model, &args, weights)?;
            (model, metadata)
        }
    };
    if args.emit != Emit::Artifact {
        // Without --activations, what the IR says (the passes' choice, for a spec as for an
        // artifact).
        let native = crate::native::NativeArgs {
            activations: args.activations,
            target_cpu: &args.target_cpu,
            weights_beside: args.weights_beside,
        };
        crate::native::emit(args.emit, &model.graph, metadata, &native, &args.output)?;
        eprintln!("in {:.1} s", start.elapsed().as_secs_f64());
        return Ok(());
    }
    kiln_rt::artifact::write(&args.output, &model.graph, &metadata).into_diagnostic()?;
    let g = &model.graph;
    let mut by_format: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut seen = std::collections::HashSet::new();
    for n in g.node_ids() {
        if let Op::Weight(w) = &g.node(n).op
            && seen.insert(w.tensor.clone())
            && g.store.get(&w.tensor).is_some()
        {
            let e = by_format.entry(w.storage()).or_default();
            e.0 += g.node(n).ty.shape.iter().filter_map(|d| d.known()).product::<u64>();
            e.1 += w.stored_bytes(&g.store);
        }
    }
    let size = std::fs::metadata(&args.output).map(|m| m.len()).unwrap_or(0);
    let (params, bytes) = by_format.values().fold((0, 0), |(p, b), (ep, eb)| (p + ep, b + eb));
    let formats: Vec<String> =
        by_format.iter().map(|(f, (p, _))| format!("{f} {:.1}%", *p as f64 / params.max(1) as f64 * 100.0)).collect();
    println!(
        "wrote {} ({:.1} MB, {} parameters at {:.2} bits each: {}) in {:.0} ms",
        args.output.display(),
        size as f64 / 1e6,
        params,
        bytes as f64 * 8.0 / params.max(1) as f64,
        formats.join(", "),
        start.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// Runs the passes on a spec's graph and gathers the artifact's metadata: the pass
/// reports, the tokenizer, the end of sequence and the source (the activations the passes
/// chose are the linears' attributes, in the IR).
fn bind(model: &mut load::Model, args: &CompileArgs, weights: &std::path::Path) -> Result<BTreeMap<String, String>> {
    let ran = crate::passes::apply(&mut model.graph, &args.passes, &mut |_, _| {})?;
    crate::passes::summarize(&ran);
    let mut metadata = BTreeMap::new();
    metadata.insert(kiln_rt::artifact::PASSES_KEY.to_string(), kiln_passes::report::pipeline_json(&ran));
    // The tokenizer travels with the model, so that text in and out needs only the artifact.
    match model.tokenizer(args.tokenizer.as_deref()) {
        Ok(tok) => {
            let json = tok.to_string(false).map_err(|e| miette!("cannot store the tokenizer: {e}"))?;
            metadata.insert(TOKENIZER_KEY.to_string(), json);
        }
        Err(e) if args.tokenizer.is_some() => return Err(e),
        Err(_) => eprintln!("note: no tokenizer found beside the weights; the artifact will take tensors, not text"),
    }
    if let Some(eos) = model.eos_token_id() {
        metadata.insert(EOS_KEY.to_string(), eos.to_string());
    }
    let source = format!("{} + {}", file_name(&args.spec), file_name(weights));
    metadata.insert(SOURCE_KEY.to_string(), source);
    Ok(metadata)
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}
