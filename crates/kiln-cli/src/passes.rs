//! `--passes`, `--calib` and `--override`: running a pass pipeline on a loaded model, and
//! the pass reports as JSON (stored in artifacts under `kiln.passes`, read by `kiln report`).

use kiln_interp::Calibrator;
use kiln_interp::calibrate::ProbeEngine;
use kiln_ir::Graph;
use kiln_passes::calibration::Executor;
use kiln_passes::manager::{self, PassCall};
use kiln_passes::prune::structured::Kind;
use kiln_passes::{Context, PassReport};
use miette::{Result, miette};
use std::path::PathBuf;

/// The pipeline flags shared by `compile` and `ir`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PassArgs {
    /// Passes to run, in order, e.g. "quantize(bits=4.5)" or
    /// "quantize(format=int4g64a, method=gptq); dead_code". `kiln passes` lists every pass
    /// with its options and defaults.
    #[arg(long, value_name = "PIPELINE")]
    pub passes: Option<String>,
    /// Calibration inputs (safetensors, tensors named like the model's inputs, one sequence
    /// per row), for passes that measure activations (quantize's bits=..., method=gptq).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// PATTERN=VALUE: layers whose scope matches the glob get VALUE whatever the passes
    /// would choose (e.g. "blk.0.*=int8" for quantize); repeatable. A pattern that matches
    /// nothing is an error.
    #[arg(long = "override", value_name = "PATTERN=VALUE")]
    pub overrides: Vec<String>,
    /// Threads of the engine that probes run on (default: every core); the results do not
    /// depend on it.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl PassArgs {
    /// Whether no pass flag was given.
    pub fn is_empty(&self) -> bool {
        self.passes.is_none() && self.calib.is_none() && self.overrides.is_empty()
    }
}

/// One pass as it ran: how it was called, and its report.
pub type Ran = (PassCall, PassReport);

/// Runs the pipeline of `args` on `graph` (nothing if no `--passes`); `after(call, graph)`
/// sees the graph after each pass (`kiln ir --print-after`).
pub fn apply(graph: &mut Graph, args: &PassArgs, after: &mut dyn FnMut(&PassCall, &Graph)) -> Result<Vec<Ran>> {
    let Some(text) = &args.passes else {
        if args.calib.is_some() || !args.overrides.is_empty() {
            return Err(miette!("--calib and --override configure passes: give --passes too"));
        }
        return Ok(vec![]);
    };
    let calls = manager::parse(text).map_err(|e| {
        miette!(
            labels = vec![miette::LabeledSpan::at(e.offset..e.offset + 1, e.message.clone())],
            help = "`kiln passes` lists every pass with its options",
            "invalid --passes: {}",
            e.message
        )
        .with_source_code(text.clone())
    })?;
    let mut overrides = Vec::new();
    for o in &args.overrides {
        let (pattern, value) =
            o.split_once('=').ok_or_else(|| miette!("--override `{o}`: expected PATTERN=VALUE, e.g. blk.0.*=int8"))?;
        overrides.push((pattern.trim().to_string(), value.trim().to_string()));
    }
    // Names, options and overrides are checked before calibration runs.
    manager::check(&calls, args.calib.is_some(), &overrides)
        .map_err(|e| miette!(help = "`kiln passes` lists every pass with its options", "{e}"))?;
    // The calibration file is read once. Only pipelines that probe (budgets, the choice of
    // int8 activation scales) hold its first rows out for probes; the statistics come from
    // the rest, gathered when a pass first asks, on the graph as it stands then.
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let calibrator = match args.calib.as_deref() {
        Some(path) => {
            let inputs = crate::tensors::inputs_from(&crate::tensors::read(path)?, path, graph)?;
            // Probes run changed copies of the model under the JIT, with the activations
            // their linears say.
            let engine: ProbeEngine = Box::new(move |g, inputs, base| kiln_jit::run_keeping(g, threads, inputs, base));
            let calibrator = Calibrator::new(graph, inputs, manager::probes_any(&calls), engine)
                .map_err(|e| miette!("--calib {}: {e}", path.display()))?;
            if !calibrator.held_out() {
                eprintln!(
                    "note: the calibration file is too short to hold rows out for probes; probes reuse calibration rows"
                );
            }
            Some(calibrator)
        }
        None => None,
    };
    let bar = crate::progress::bar(0, "steps");
    let progress = crate::progress::steps(&bar);
    let executor = calibrator.as_ref().map(|c| c as &dyn Executor);
    let ctx = Context::new(executor, overrides, &progress);
    let mut after = |call: &PassCall, g: &Graph| {
        bar.suspend(|| after(call, g));
    };
    let reports = manager::run(graph, &calls, &ctx, &mut after).map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    Ok(calls.into_iter().zip(reports).collect())
}

/// Prints a one-paragraph summary of each pass to stderr (notes included).
pub fn summarize(ran: &[Ran]) {
    for (call, report) in ran {
        match report {
            PassReport::Quantize(q) => {
                let mut formats: std::collections::BTreeMap<String, u64> = Default::default();
                for l in &q.layers {
                    *formats.entry(l.format.name()).or_default() += 1;
                }
                let formats: Vec<String> = formats.iter().map(|(f, n)| format!("{n} x {f}")).collect();
                let bits = q.bits_per_weight();
                eprintln!("{call}: {bits:.3} bits per weight overall; layers: {}", formats.join(", "));
            }
            PassReport::Factorize(f) => {
                let factored = f.layers.iter().filter(|l| l.rank.is_some()).count();
                let kept = f.params as f64 / f.params_before.max(1) as f64;
                eprintln!(
                    "{call}: {factored} of {} layers factorized ({}), {:.1}% of their parameters kept",
                    f.layers.len(),
                    f.method,
                    100.0 * kept
                );
            }
            PassReport::Prune(p) => {
                eprintln!(
                    "{call}: {} of {} layers pruned ({}), {:.1}% of their weights removed; {} -> {} bytes, masks included",
                    p.pruned(),
                    p.layers.len(),
                    p.method,
                    100.0 * p.sparsity(),
                    p.bytes_before,
                    p.bytes
                );
            }
            PassReport::Drop(d) => {
                let dropped: Vec<String> = d
                    .dropped
                    .iter()
                    .map(|b| match b.probe {
                        Some(p) => format!("{} (probe {p:.4e})", b.prefix),
                        None => b.prefix.clone(),
                    })
                    .collect();
                let params: u64 = d.dropped.iter().map(|b| b.params).sum();
                eprintln!(
                    "{call}: dropped {} of {} blocks: {}; {params} parameters removed",
                    d.dropped.len(),
                    d.blocks,
                    dropped.join(", ")
                );
            }
            PassReport::Tie(t) => {
                let chosen: Vec<String> = t
                    .candidates
                    .iter()
                    .filter(|c| c.chosen)
                    .map(|c| format!("{}+{} (probe {:.4e})", c.blocks[0], c.blocks[1], c.probe))
                    .collect();
                if !t.candidates.is_empty() {
                    eprintln!("{call}: {} pairs measured, tied: {}", t.candidates.len(), chosen.join(", "));
                }
                eprintln!(
                    "{call}: {} roles tied (delta rank {}); {} -> {} parameters in the tied layers",
                    t.tied.len(),
                    t.delta_rank,
                    t.params_before(),
                    t.params()
                );
            }
            PassReport::Structured(s) => {
                let by_kind = |kind: Kind| {
                    let (units, kept) =
                        s.groups.iter().filter(|g| g.kind == kind).fold((0, 0), |(u, k), g| (u + g.units, k + g.kept));
                    (units > 0).then(|| format!("{kind}: {kept} of {units} kept"))
                };
                let kinds: Vec<String> = [Kind::Heads, Kind::Channels].into_iter().filter_map(by_kind).collect();
                eprintln!(
                    "{call}: {}; {} -> {} parameters in the {} groups",
                    kinds.join(", "),
                    s.params_before,
                    s.params,
                    s.groups.len()
                );
            }
            PassReport::Cleanup { .. } => eprintln!("{call}"),
        }
        for note in report.notes() {
            eprintln!("  note: {note}");
        }
    }
}
