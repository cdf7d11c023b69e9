//! `--passes`, `--calib` and `--override`: running a pass pipeline on a loaded model, and
//! the pass reports as JSON (stored in artifacts under `kiln.passes`, read by `kiln report`).

use crate::calibrate;
use kiln_ir::Graph;
use kiln_passes::manager::{self, PassCall};
use kiln_passes::quantize::Activations;
use kiln_passes::{Context, Probe};
use miette::{Result, miette};
use serde_json::{Value as Json, json};
use std::collections::HashMap;
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
}

impl PassArgs {
    /// Whether no pass flag was given.
    pub fn is_empty(&self) -> bool {
        self.passes.is_none() && self.calib.is_none() && self.overrides.is_empty()
    }
}

/// One pass as it ran: how it was called, and its report as JSON.
pub struct Ran {
    pub call: String,
    pub report: Json,
}

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
    // Names and options are checked before calibration runs.
    manager::check(&calls, args.calib.is_some())
        .map_err(|e| miette!(help = "`kiln passes` lists every pass with its options", "{e}"))?;
    let mut overrides = Vec::new();
    for o in &args.overrides {
        let (pattern, value) =
            o.split_once('=').ok_or_else(|| miette!("--override `{o}`: expected PATTERN=VALUE, e.g. blk.0.*=int8"))?;
        overrides.push((pattern.trim().to_string(), value.trim().to_string()));
    }
    // The calibration file is read once: its first rows probe, the rest calibrate.
    let calib_inputs = args.calib.as_deref().map(|p| calibrate::read_inputs(graph, p)).transpose()?;
    // Only passes that probe (budgets, the choice of int8 activation scales) hold rows out;
    // everything else calibrates on every row.
    let probes = manager::probes_any(&calls);
    let split = calib_inputs
        .as_ref()
        .map(|i| if probes { calibrate::split_probe(i) } else { (HashMap::new(), i.clone(), true) });
    if let Some((_, _, false)) = &split {
        eprintln!("note: the calibration file is too short to hold rows out for probes; probes reuse calibration rows");
    }
    let calibration = split.as_ref().map(|(_, c, _)| calibrate::calibrate(graph, c)).transpose()?;
    let bar = crate::progress::bar(0, "steps");
    let progress = |done: usize, total: usize, what: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    };
    // Probes run changed copies of the model under the JIT on the first calibration rows.
    let probe_inputs = split.map(|(p, _, _)| p).filter(|p| !p.is_empty());
    let run = |g: &Graph, inputs: &HashMap<String, kiln_interp::Value>, activations: Activations| {
        let activations = crate::runner::ActivationsKind::from(activations).into();
        let options = kiln_jit::EngineOptions { threads: 2, activations, profile: false };
        let engine = kiln_jit::compile(g, options).map_err(|e| e.to_string())?;
        engine.run(inputs).map_err(|e| e.to_string())
    };
    let reference = probe_inputs
        .as_ref()
        .map(|i| run(graph, i, Activations::F32))
        .transpose()
        .map_err(|e| miette!("probe: {e}"))?;
    let probe = |g: &Graph, activations: Activations| -> Result<f64, String> {
        match (&probe_inputs, &reference) {
            (Some(inputs), Some(want)) => Ok(calibrate::distance(want, &run(g, inputs, activations)?)),
            _ => Err("no calibration inputs to probe with".into()),
        }
    };
    let probe_ref: Option<&Probe> = reference.as_ref().map(|_| &probe as _);
    let ctx = Context { calibration: calibration.as_ref(), probe: probe_ref, overrides, progress: &progress };
    let mut after = |call: &PassCall, g: &Graph| {
        bar.suspend(|| after(call, g));
    };
    let reports = manager::run(graph, &calls, &ctx, &mut after).map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    Ok(calls
        .iter()
        .zip(reports)
        .map(|(call, report)| Ran { call: call.to_string(), report: report.to_json() })
        .collect())
}

/// The JSON stored under `kiln.passes`.
pub fn metadata(ran: &[Ran]) -> String {
    let list: Vec<Json> = ran.iter().map(|r| json!({"call": r.call, "report": r.report})).collect();
    Json::Array(list).to_string()
}

/// Prints a one-paragraph summary of each pass to stderr (notes included).
pub fn summarize(ran: &[Ran]) {
    for r in ran {
        let Some(bits) = r.report["bits_per_weight"].as_f64() else {
            eprintln!("{}", r.call);
            for note in r.report["notes"].as_array().into_iter().flatten() {
                eprintln!("  note: {}", note.as_str().unwrap_or_default());
            }
            continue;
        };
        let mut formats: std::collections::BTreeMap<String, u64> = Default::default();
        for l in r.report["layers"].as_array().into_iter().flatten() {
            *formats.entry(l["format"].as_str().unwrap_or("?").to_string()).or_default() += 1;
        }
        let formats: Vec<String> = formats.iter().map(|(f, n)| format!("{n} x {f}")).collect();
        eprintln!("{}: {bits:.3} bits per weight overall; layers: {}", r.call, formats.join(", "));
        for note in r.report["notes"].as_array().into_iter().flatten() {
            eprintln!("  note: {}", note.as_str().unwrap_or_default());
        }
    }
}
