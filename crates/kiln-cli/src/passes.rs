//! `--passes`, `--calib` and `--override`: running a pass pipeline on a loaded model, and
//! the pass reports as JSON (stored in artifacts under `kiln.passes`, read by `kiln report`).

use crate::calibrate;
use kiln_ir::Graph;
use kiln_passes::pipeline::{self, Context, PassReport};
use kiln_passes::quantize::{Activations, Choice, QuantizeReport};
use miette::{Result, miette};
use serde_json::{Value as Json, json};
use std::collections::HashMap;
use std::path::PathBuf;

/// The pipeline flags shared by `compile` and `ir`.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct PassArgs {
    /// Passes to run, in order, e.g. "quantize(bits=4.5)" or
    /// "quantize(format=int4g64a, method=gptq)". Formats: f32, f16, bf16, int8 (per output
    /// channel), intBgG[a] (B bits in 2, 3, 4, 8; groups of G; `a`: asymmetric), fp8 (e4m3
    /// per output channel) or fp8gG.
    #[arg(long)]
    pub passes: Option<String>,
    /// Calibration inputs (safetensors, tensors named like the model's inputs, one sequence
    /// per row), for passes that measure activations (bits=..., method=gptq).
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// PATTERN=FORMAT: layers whose scope matches the glob get FORMAT whatever the search
    /// picks (e.g. "blk.0.*=int8"); repeatable. A pattern that matches nothing is an error.
    #[arg(long = "override", value_name = "PATTERN=FORMAT")]
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

/// Runs the pipeline of `args` on `graph` (nothing if no `--passes`).
pub fn apply(graph: &mut Graph, args: &PassArgs) -> Result<Vec<Ran>> {
    let Some(text) = &args.passes else {
        if args.calib.is_some() || !args.overrides.is_empty() {
            return Err(miette!("--calib and --override configure passes: give --passes too"));
        }
        return Ok(vec![]);
    };
    let calls = pipeline::parse(text).map_err(|e| {
        miette!(
            labels = vec![miette::LabeledSpan::at(e.offset..e.offset + 1, e.message.clone())],
            help = pass_help(),
            "invalid --passes: {}",
            e.message
        )
        .with_source_code(text.clone())
    })?;
    let mut overrides = Vec::new();
    for o in &args.overrides {
        let (pattern, format) =
            o.split_once('=').ok_or_else(|| miette!("--override `{o}`: expected PATTERN=FORMAT, e.g. blk.0.*=int8"))?;
        let choice: Choice = format.trim().parse().map_err(|e: String| miette!("--override `{o}`: {e}"))?;
        overrides.push((pattern.trim().to_string(), choice));
    }
    // The calibration file is read once: its first rows probe, the rest calibrate.
    let calib_inputs = args.calib.as_deref().map(|p| calibrate::read_inputs(graph, p)).transpose()?;
    // Only passes that probe (budgets, the choice of int8 activation scales) hold rows out;
    // everything else calibrates on every row.
    let probes = pipeline::probes(&calls);
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
    let probe_ref: Option<&kiln_passes::quantize::Probe> = reference.as_ref().map(|_| &probe as _);
    let ctx = Context { calibration: calibration.as_ref(), probe: probe_ref, overrides, progress: &progress };
    let reports = pipeline::run(graph, &calls, &ctx).map_err(|e| miette!("{e}"))?;
    bar.finish_and_clear();
    Ok(calls
        .iter()
        .zip(reports)
        .map(|(call, report)| Ran { call: call.to_string(), report: to_json(&report) })
        .collect())
}

fn pass_help() -> String {
    let lines: Vec<&str> = pipeline::REGISTRY.iter().map(|p| p.help).collect();
    format!("passes:\n  {}", lines.join("\n  "))
}

/// A pass report as JSON; a quantize report in the shape `kiln report --json` prints.
fn to_json(report: &PassReport) -> Json {
    match report {
        PassReport::Quantize(q) => quantize_json(q),
    }
}

fn quantize_json(q: &QuantizeReport) -> Json {
    let layers: Vec<Json> = q
        .layers
        .iter()
        .map(|l| {
            json!({
                "scope": l.scope,
                "tensor": l.tensor,
                "format": l.format.name(),
                "params": l.params,
                "bits_per_weight": l.bytes as f64 * 8.0 / l.params.max(1) as f64,
                "bytes": l.bytes,
                "sensitivity": l.sensitivity,
                "error": l.error,
            })
        })
        .collect();
    json!({
        "pass": "quantize",
        "layers": layers,
        "params": q.params,
        "bytes": q.bytes,
        "bits_per_weight": q.bits_per_weight(),
        "notes": q.notes,
        "activations": q.activations.to_string(),
    })
}

/// The JSON stored under `kiln.passes`.
pub fn metadata(ran: &[Ran]) -> String {
    let list: Vec<Json> = ran.iter().map(|r| json!({"call": r.call, "report": r.report})).collect();
    Json::Array(list).to_string()
}

/// Prints a one-paragraph summary of each pass to stderr (notes included).
pub fn summarize(ran: &[Ran]) {
    for r in ran {
        let bits = r.report["bits_per_weight"].as_f64().unwrap_or(0.0);
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
