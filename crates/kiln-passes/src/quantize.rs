//! `quantize`: stores the model's matrices in lower-precision formats.
//!
//! **Layers.** Every rank-2 weight that a `linear` reads as its weight or a `gather` reads as
//! its table (embeddings, and a tied output head that is both) is one layer; other weights
//! (norms, biases) stay as they are. A layer is named by its weight node's scope
//! (`blk.0.attn_q`), which is what `--override` patterns match.
//!
//! **Formats.** A [`Choice`] per layer: `f32` (keep), `f16`, `bf16`, `int8` (one scale per
//! output channel: `int8g<K>`), or an [`IntFormat`] such as `int4g64a`. A group that does not
//! divide a layer's rows falls back to the largest multiple of 32 below it that does
//! (`int4g128` on 576-wide rows becomes `int4g64`), and the report shows the format used.
//!
//! **Targets.** Either one format for every layer (`quantize(format=int4g64a)`), or a budget
//! (`quantize(bits=4.5)`): the average storage bits per parameter over *all* of the model's
//! parameters (scales, offsets and unquantized weights included) may not exceed it. Each
//! layer then gets the format that minimizes the summed sensitivity under that budget,
//! solved exactly by [`crate::allocate`]. A layer's sensitivity at a format starts from its
//! output error on the calibration data under round-to-nearest, `sum_j H_jj |dW_:j|^2` with
//! `H = sum x x^T` of its input (the diagonal of the exact `trace(dW H dW^T)`: cheap enough
//! for every candidate of every layer); an embedding table read only by a gather counts
//! `|dE|^2` per row times the calibration tokens per row. With a [`Probe`] (the CLI's: KL
//! divergence of next-token distributions, or 1 - cosine of embeddings, on a few
//! calibration rows), each *kind* of layer (`blk.*.ffn_down`) is measured end to end at
//! [`PROBE_FORMATS`], and a layer's sensitivity is its kind's interpolated distortion shared
//! out in proportion to its error; without one, it is the layer's error relative to its
//! output energy. Formats more than [`MAX_BITS_BELOW`] bits per weight below the budget
//! (or below 8, for budgets above 8) are not searched: far from the probed formats,
//! per-layer errors stop adding up. A layer no candidate fits stays as it is.
//! Overrides are fixed before the search and always honored.
//!
//! **Methods.** `rtn` rounds each group to nearest ([`IntFormat::quantize`]); `gptq`
//! ([`crate::gptq`]) spreads each column's rounding error over the columns not yet
//! quantized, using the layer input's `H`. A weight read by a linear (the tied head too) is
//! GPTQ'd against that linear's input; a table read only by gathers has no `H` and is
//! rounded. With `clip` (the pipeline's default), both methods take each group's scales
//! from [`crate::clip::fit`]'s search, weighted by `H_ii`, instead of the group's full
//! range; the search's errors are measured the same way.
//!
//! The pass replaces the weights' bytes in the tensor store and the formats in their
//! `weight` nodes; the graph's structure does not change.

use crate::PassError;
use crate::allocate::{self, Choice as Candidate, Layer as Knapsack};
use crate::calibration::{Calibration, Gram};
use crate::gptq::{self, GptqOptions};
use half::{bf16, f16};
use kiln_ir::{Bytes, Format, Graph, IntFormat, NodeId, Op, TensorData};
use rayon::prelude::*;
use std::collections::BTreeMap;

const PASS: &str = "quantize";

/// Runs a changed copy of the graph on calibration inputs and says how far its outputs
/// moved from the unchanged model's (the CLI measures KL divergence of next-token
/// distributions, or 1 - cosine of embeddings). Passes never run models themselves.
pub type Probe<'a> = dyn Fn(&Graph) -> Result<f64, String> + 'a;

/// How one layer is stored, as a user names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Leave the weight as it is.
    Keep,
    F16,
    BF16,
    /// int8, one scale per output channel.
    Int8,
    Int(IntFormat),
}

impl Choice {
    /// The format for a layer with rows of `k` values, or `None` if no group of this kind
    /// divides them.
    pub fn resolve(self, k: u64, current: Format) -> Option<Format> {
        match self {
            Choice::Keep => Some(current),
            Choice::F16 => Some(Format::F16),
            Choice::BF16 => Some(Format::BF16),
            Choice::Int8 => IntFormat::new(8, u32::try_from(k).ok()?, false).ok().map(Format::Int),
            Choice::Int(f) => {
                let group = (1..=f.group / 32).rev().map(|m| m * 32).find(|&g| k.is_multiple_of(g as u64))?;
                Some(Format::Int(IntFormat { group, ..f }))
            }
        }
    }
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Choice, String> {
        Ok(match s {
            "f32" | "keep" => Choice::Keep,
            "f16" => Choice::F16,
            "bf16" => Choice::BF16,
            "int8" => Choice::Int8,
            _ => Choice::Int(s.parse().map_err(|e: kiln_ir::FormatError| e.to_string())?),
        })
    }
}

impl std::fmt::Display for Choice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Choice::Keep => f.write_str("f32"),
            Choice::F16 => f.write_str("f16"),
            Choice::BF16 => f.write_str("bf16"),
            Choice::Int8 => f.write_str("int8"),
            Choice::Int(i) => write!(f, "{i}"),
        }
    }
}

/// What the formats are chosen by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// At most this many bits per parameter on average, over all parameters.
    Bits(f64),
    /// This format for every layer (overrides aside).
    Format(Choice),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Rtn,
    Gptq,
}

#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    pub target: Target,
    pub method: Method,
    /// `(scope glob, choice)`, fixed before any search; each must match some layer.
    pub overrides: Vec<(String, Choice)>,
    pub gptq: GptqOptions,
}

/// The formats the budgeted search chooses from (those whose groups divide a layer's rows).
pub const CANDIDATES: &[&str] = &[
    "int2g32a",
    "int2g64a",
    "int3g32",
    "int3g64",
    "int3g128",
    "int3g32a",
    "int3g64a",
    "int3g128a",
    "int4g32",
    "int4g64",
    "int4g128",
    "int4g32a",
    "int4g64a",
    "int4g128a",
    "int8",
    "bf16",
];

/// A candidate format of a layer as measured: the format, its storage bits, and the
/// absolute and relative output errors of rounding to it.
type Measured = (Format, u64, f64, f64);

/// How far below the budget (bits per weight, counted from at most 8) a layer's format may
/// go in the search.
pub const MAX_BITS_BELOW: f64 = 1.25;

/// One layer as the pass left it.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerReport {
    pub scope: String,
    pub tensor: String,
    pub format: Format,
    pub params: u64,
    pub bytes: u64,
    /// Estimated output error at this format (the search's measure; 0 without calibration).
    pub sensitivity: f64,
    /// Output error after quantization relative to the output's energy on the calibration
    /// data, `trace(dW H dW^T) / trace(W H W^T)` over up to 256 evenly spaced rows (output
    /// channels); `None` without an `H` for this layer.
    pub error: Option<f64>,
}

/// What the pass did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct QuantizeReport {
    pub layers: Vec<LayerReport>,
    /// Parameters and stored bytes of the whole model (every weight).
    pub params: u64,
    pub bytes: u64,
    /// Things the user should know (fallback groups, layers left as they were).
    pub notes: Vec<String>,
}

impl QuantizeReport {
    /// Average storage bits per parameter over every weight of the model.
    pub fn bits_per_weight(&self) -> f64 {
        self.bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// A matrix the pass may store differently.
struct Layer {
    node: NodeId,
    scope: String,
    tensor: String,
    n: u64,
    k: u64,
    format: Format,
    values: Vec<f32>,
    /// The input statistics of the linears reading it (the first one's, if several).
    gram: Option<Gram>,
    /// Read by a gather (an embedding table).
    gathered: bool,
}

/// Runs the pass: see the module documentation. `progress(done, total, what)` is called as
/// layers are quantized.
pub fn quantize(
    graph: &mut Graph,
    options: &QuantizeOptions,
    calibration: Option<&Calibration>,
    probe: Option<&Probe<'_>>,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<QuantizeReport, PassError> {
    let fail = |message: String| PassError::NotApplicable { pass: PASS, message };
    let mut layers = find_layers(graph, calibration).map_err(fail)?;
    let mut notes = Vec::new();

    // Overrides first: every pattern must name a layer.
    let mut fixed: Vec<Option<Choice>> = vec![None; layers.len()];
    for (pattern, choice) in &options.overrides {
        let mut matched = false;
        for (l, layer) in layers.iter().enumerate() {
            if glob(pattern, &layer.scope) {
                fixed[l] = Some(*choice);
                matched = true;
            }
        }
        if !matched {
            let examples: Vec<&str> = layers.iter().take(3).map(|l| l.scope.as_str()).collect();
            return Err(fail(format!(
                "--override `{pattern}` matches no layer (layer scopes look like {})",
                examples.join(", ")
            )));
        }
    }

    // Parameters and bytes that no layer accounts for (norms, biases).
    let mut other_params = 0u64;
    let mut other_bytes = 0u64;
    for n in graph.node_ids() {
        if let Op::Weight(w) = &graph.node(n).op
            && !layers.iter().any(|l| l.node == n)
            && let Some(t) = graph.store.get(&w.tensor)
        {
            other_params += t.elements();
            other_bytes += t.bytes.len() as u64;
        }
    }

    let resolve = |choice: Choice, layer: &Layer, notes: &mut Vec<String>| -> Format {
        match choice.resolve(layer.k, layer.format) {
            Some(f) => {
                if let (Choice::Int(want), Format::Int(got)) = (choice, f)
                    && want.group != got.group
                {
                    notes.push(format!(
                        "{}: rows of {} take groups of {}, not {}",
                        layer.scope, layer.k, got.group, want.group
                    ));
                }
                f
            }
            None => {
                notes.push(format!(
                    "{}: rows of {} fit no {choice} group; left as {}",
                    layer.scope, layer.k, layer.format
                ));
                layer.format
            }
        }
    };

    let mut sensitivities = vec![0.0; layers.len()];
    let formats: Vec<Format> = match options.target {
        Target::Format(choice) => {
            let formats: Vec<Format> =
                layers.iter().zip(&fixed).map(|(l, f)| resolve(f.unwrap_or(choice), l, &mut notes)).collect();
            if calibration.is_some() {
                let tokens = calibration.map_or(0, |c| c.tokens);
                sensitivities =
                    layers.par_iter().zip(&formats).map(|(l, &f)| errors(l, f, tokens, options.gptq.clip).1).collect();
            }
            formats
        }
        Target::Bits(bits) => {
            let Some(calibration) = calibration else {
                return Err(fail(
                    "quantize(bits=...) measures each layer's sensitivity on calibration data: pass --calib".into(),
                ));
            };
            let tokens = calibration.tokens;
            let total_params = other_params + layers.iter().map(|l| l.n * l.k).sum::<u64>();
            let budget = (bits * total_params as f64).floor() as u64;
            let Some(budget) = budget.checked_sub(other_bytes * 8) else {
                return Err(fail(format!("{bits} bits per weight leave nothing for the matrices")));
            };
            let candidates: Vec<Choice> = CANDIDATES.iter().map(|c| c.parse().expect("valid candidates")).collect();
            let budget_bits = bits;
            progress(0, layers.len(), "measuring sensitivities");
            // Per layer and candidate: the format, its bits, and the absolute and relative
            // output errors of rounding to it.
            let measured: Vec<Vec<Option<Measured>>> = layers
                .par_iter()
                .map(|layer| {
                    candidates
                        .iter()
                        .map(|c| {
                            let f = c.resolve(layer.k, layer.format)?;
                            let bytes = f.byte_len(layer.n * layer.k).ok()?;
                            let (absolute, relative) = errors(layer, f, tokens, options.gptq.clip);
                            Some((f, bytes * 8, absolute, relative))
                        })
                        .collect()
                })
                .collect();
            // With a probe: each kind's measured end-to-end curve, shared out among its
            // layers by their absolute errors; without: each layer's relative error.
            let curves = match probe {
                Some(p) => Some(kind_curves(graph, &layers, &measured, p, options.gptq.clip, progress).map_err(fail)?),
                None => None,
            };
            let options_per_layer: Vec<Vec<(Format, u64, f64)>> = layers
                .iter()
                .enumerate()
                .map(|(l, layer)| -> Result<Vec<(Format, u64, f64)>, PassError> {
                    if let Some(c) = fixed[l] {
                        let f = c.resolve(layer.k, layer.format).unwrap_or(layer.format);
                        let bytes = f.byte_len(layer.n * layer.k).map_err(|e| fail(e.to_string()))?;
                        return Ok(vec![(f, bytes * 8, 0.0)]);
                    }
                    let mut opts: Vec<(Format, u64, f64)> = Vec::new();
                    for (c, m) in measured[l].iter().enumerate() {
                        let Some((f, bits, absolute, relative)) = *m else { continue };
                        // Far below the budget, errors stop adding up (a model with many
                        // 2-bit layers is not the sum of models with one): not searched.
                        if opts.iter().any(|o| o.0 == f) || f.bits_per_weight() < budget_bits.min(8.0) - MAX_BITS_BELOW
                        {
                            continue;
                        }
                        let sensitivity = match &curves {
                            Some(k) => k.layer_share(l, c, absolute),
                            None => relative,
                        };
                        opts.push((f, bits, sensitivity));
                    }
                    if opts.is_empty() {
                        // No candidate fits its rows: it stays as it is.
                        let bytes = layer.format.byte_len(layer.n * layer.k).map_err(|e| fail(e.to_string()))?;
                        opts.push((layer.format, bytes * 8, 0.0));
                    }
                    Ok(opts)
                })
                .collect::<Result<_, _>>()?;
            let knapsack: Vec<Knapsack> = options_per_layer
                .iter()
                .zip(&fixed)
                .map(|(opts, fixed)| Knapsack {
                    choices: opts.iter().map(|&(_, bits, sensitivity)| Candidate { bits, sensitivity }).collect(),
                    fixed: fixed.map(|_| 0),
                })
                .collect();
            let picked = allocate::allocate(&knapsack, budget).map_err(|e| fail(format!("bits={bits}: {e}")))?;
            picked
                .picks
                .iter()
                .zip(&options_per_layer)
                .enumerate()
                .map(|(l, (&p, opts))| {
                    sensitivities[l] = opts[p].2;
                    opts[p].0
                })
                .collect()
        }
    };

    // Quantize, largest layers first so that the threads finish together.
    let total = layers.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let method = options.method;
    let results: Vec<Result<Option<Encoded>, String>> = layers
        .par_iter()
        .zip(&formats)
        .map(|(layer, &format)| {
            let r = encode(layer, format, method, &options.gptq);
            let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(d, total, &layer.scope);
            r
        })
        .collect();

    let mut report = QuantizeReport { notes, ..Default::default() };
    for ((layer, format), (result, sensitivity)) in
        layers.iter_mut().zip(&formats).zip(results.into_iter().zip(sensitivities))
    {
        let changed = result.map_err(|e| fail(format!("{}: {e}", layer.scope)))?;
        let error = changed.as_ref().map_or(layer.gram.as_ref().map(|_| 0.0), |(_, e)| *e);
        if let Some((bytes, _)) = changed {
            set_weight(graph, layer, *format, bytes).map_err(|e| fail(format!("{}: {e}", layer.scope)))?;
        }
        let bytes = graph.store.get(&layer.tensor).map_or(0, |t| t.bytes.len() as u64);
        report.layers.push(LayerReport {
            scope: layer.scope.clone(),
            tensor: layer.tensor.clone(),
            format: *format,
            params: layer.n * layer.k,
            bytes,
            sensitivity,
            error,
        });
        layer.values = Vec::new();
    }
    report.params = other_params + report.layers.iter().map(|l| l.params).sum::<u64>();
    report.bytes = other_bytes + report.layers.iter().map(|l| l.bytes).sum::<u64>();
    kiln_ir::verify(graph).map_err(|e| fail(format!("the rewritten graph does not verify: {e}")))?;
    Ok(report)
}

/// The layers of `graph`, in topological order, with their values decoded.
fn find_layers(graph: &Graph, calibration: Option<&Calibration>) -> Result<Vec<Layer>, String> {
    let order = graph.topo_order().ok_or("the graph has a cycle")?;
    let mut layers: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut out: Vec<Layer> = Vec::new();
    for &id in &order {
        let node = graph.node(id);
        let (table, x) = match node.op {
            Op::Linear => (graph.operands(id)[1], Some(graph.operands(id)[0])),
            Op::Gather => (graph.operands(id)[0], None),
            _ => continue,
        };
        let Op::Weight(w) = &graph.node(table).op else { continue };
        let shape = &graph.node(table).ty.shape;
        let (Some(n), Some(k)) = (shape.first().and_then(|d| d.known()), shape.get(1).and_then(|d| d.known())) else {
            continue;
        };
        if shape.len() != 2 {
            continue;
        }
        let l = match layers.get(&table) {
            Some(&l) => l,
            None => {
                let data = graph.store.get(&w.tensor).ok_or_else(|| format!("weight `{}` is not bound", w.tensor))?;
                let values = data.to_f32().map_err(|e| format!("weight `{}`: {e}", w.tensor))?;
                let scope = graph.node(table).scope.clone();
                let scope = if scope.is_empty() { w.tensor.clone() } else { scope };
                out.push(Layer {
                    node: table,
                    scope,
                    tensor: w.tensor.clone(),
                    n,
                    k,
                    format: w.format,
                    values,
                    gram: None,
                    gathered: false,
                });
                layers.insert(table, out.len() - 1);
                out.len() - 1
            }
        };
        match x {
            Some(x) => {
                if out[l].gram.is_none() {
                    out[l].gram = calibration.and_then(|c| c.inputs.get(&x)).cloned();
                }
            }
            None => out[l].gathered = true,
        }
    }
    Ok(out)
}

/// The output error of `layer` stored as `format` by rounding, on the calibration data:
/// `(absolute, relative)`, the relative one divided by the output's energy (see the module
/// doc). Gathered tables count `|dE|^2` per calibration token.
fn errors(layer: &Layer, format: Format, tokens: u64, clip: bool) -> (f64, f64) {
    let Ok(q) = round(layer, format, clip).and_then(|b| format.dequantize(&b, layer.n * layer.k)) else {
        return (f64::INFINITY, f64::INFINITY);
    };
    let k = layer.k as usize;
    let (mut absolute, mut relative) = (0.0, 0.0);
    if let Some(g) = &layer.gram {
        let diag = g.diagonal();
        let (mut error, mut energy) = (0.0, 0.0);
        for (row_w, row_q) in layer.values.chunks_exact(k).zip(q.chunks_exact(k)) {
            for ((&w, &q), h) in row_w.iter().zip(row_q).zip(&diag) {
                error += h * ((w - q) as f64).powi(2);
                energy += h * (w as f64).powi(2);
            }
        }
        absolute += error;
        relative += error / energy.max(f64::MIN_POSITIVE);
    }
    if layer.gathered {
        let error: f64 = layer.values.iter().zip(&q).map(|(w, q)| ((w - q) as f64).powi(2)).sum();
        let energy: f64 = layer.values.iter().map(|&w| (w as f64).powi(2)).sum();
        absolute += error * tokens as f64 / layer.n as f64;
        relative += error / energy.max(f64::MIN_POSITIVE);
    }
    (absolute, relative)
}

/// A layer's kind: its scope with numeric components as `*` (`blk.*.attn_q`), so that the
/// same projection in every block is one kind.
fn kind_of(scope: &str) -> String {
    let parts: Vec<&str> =
        scope.split('.').map(|c| if c.bytes().all(|b| b.is_ascii_digit()) { "*" } else { c }).collect();
    parts.join(".")
}

/// The formats every kind of layer is probed at (all its layers rounded to one of them).
const PROBE_FORMATS: &[&str] = &["int3g64a", "int4g64a", "int4g32a"];

/// Measured end-to-end effect of each kind of layer: for each kind, points `(A, D)` where
/// `A` is the kind's summed absolute layer error at a probed format and `D` how far the
/// model's outputs moved with the whole kind at that format.
struct KindCurves {
    /// Kind of each layer.
    kind: Vec<usize>,
    /// Per kind: `(ln A, ln D)`, sorted by `A`.
    points: Vec<Vec<(f64, f64)>>,
    /// Per kind and candidate: `A` at that candidate.
    totals: Vec<Vec<f64>>,
}

impl KindCurves {
    /// The part of its kind's interpolated distortion at candidate `c` that layer `l`
    /// causes, in proportion to its absolute error.
    fn layer_share(&self, l: usize, c: usize, absolute: f64) -> f64 {
        let kind = self.kind[l];
        let total = self.totals[kind][c];
        if total <= 0.0 || absolute <= 0.0 {
            return 0.0;
        }
        interpolate(&self.points[kind], total.ln()).exp() * absolute / total
    }
}

/// Piecewise-linear interpolation of sorted points, extrapolated with the end segments'
/// slopes (at least 1: distortion grows at least in proportion to the error).
fn interpolate(points: &[(f64, f64)], x: f64) -> f64 {
    match points {
        [] => f64::NEG_INFINITY,
        [(x0, y0)] => y0 + (x - x0),
        _ => {
            let i = points.partition_point(|p| p.0 < x).clamp(1, points.len() - 1);
            let ((x0, y0), (x1, y1)) = (points[i - 1], points[i]);
            let slope = if x1 > x0 { (y1 - y0) / (x1 - x0) } else { 1.0 };
            if x > x1 {
                y1 + slope.max(1.0) * (x - x1)
            } else if x < x0 {
                y0 + slope.max(1.0) * (x - x0)
            } else {
                y0 + slope * (x - x0)
            }
        }
    }
}

/// Probes every kind of layer (scope with block indices as `*`) at [`PROBE_FORMATS`].
fn kind_curves(
    graph: &Graph,
    layers: &[Layer],
    measured: &[Vec<Option<Measured>>],
    probe: &Probe<'_>,
    clip: bool,
    progress: &(dyn Fn(usize, usize, &str) + Sync),
) -> Result<KindCurves, String> {
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let kind: Vec<usize> = layers
        .iter()
        .map(|layer| {
            let n = names.len();
            *names.entry(kind_of(&layer.scope)).or_insert(n)
        })
        .collect();
    let kinds = names.len();
    let mut totals = vec![vec![0.0; CANDIDATES.len()]; kinds];
    for (l, m) in measured.iter().enumerate() {
        for (c, entry) in m.iter().enumerate() {
            if let Some((_, _, absolute, _)) = entry {
                totals[kind[l]][c] += absolute;
            }
        }
    }
    let mut points = vec![Vec::new(); kinds];
    let runs = kinds * PROBE_FORMATS.len();
    for (name, &k) in &names {
        for (i, p) in PROBE_FORMATS.iter().enumerate() {
            progress(k * PROBE_FORMATS.len() + i, runs, &format!("probing {name} at {p}"));
            let c = CANDIDATES.iter().position(|c| c == p).expect("probe formats are candidates");
            let mut g = graph.clone();
            for (l, layer) in layers.iter().enumerate().filter(|(l, _)| kind[*l] == k) {
                let Some((f, ..)) = measured[l][c] else { continue };
                let bytes = round(layer, f, clip).map_err(|e| e.to_string())?;
                set_weight(&mut g, layer, f, bytes).map_err(|e| format!("{}: {e}", layer.scope))?;
            }
            let moved = probe(&g)?;
            if totals[k][c] > 0.0 {
                points[k].push((totals[k][c].ln(), moved.max(1e-12).ln()));
            }
        }
        points[k].sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    Ok(KindCurves { kind, points, totals })
}

/// Stores `bytes` in `format` as the layer's weight in `graph`.
fn set_weight(graph: &mut Graph, layer: &Layer, format: Format, bytes: Vec<u8>) -> Result<(), kiln_ir::FormatError> {
    let data = TensorData::new(format, vec![layer.n, layer.k], Bytes::from_vec(bytes))?;
    let checksum = data.checksum();
    graph.store.insert(layer.tensor.clone(), data);
    if let Op::Weight(w) = &mut graph.node_mut(layer.node).op {
        w.format = format;
        w.checksum = Some(checksum);
    }
    Ok(())
}

/// The stored bytes of `values` in `format` by rounding to nearest.
fn encode_rtn(values: &[f32], format: Format) -> Result<Vec<u8>, kiln_ir::FormatError> {
    Ok(match format {
        Format::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Format::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Format::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        Format::Int(f) => f.quantize(values),
        other => {
            return Err(kiln_ir::FormatError::Unknown(format!("{other} (the quantize pass writes kiln's formats)")));
        }
    })
}

/// The stored bytes of the layer in `format` by rounding to nearest, with searched scales
/// (weighted by the diagonal of its input's `H`, if any) when `clip` is set.
fn round(layer: &Layer, format: Format, clip: bool) -> Result<Vec<u8>, kiln_ir::FormatError> {
    match format {
        Format::Int(f) if clip => {
            let importance: Vec<f32> =
                layer.gram.as_ref().map_or(Vec::new(), |g| g.diagonal().iter().map(|&h| h as f32).collect());
            Ok(crate::clip::quantize(f, &layer.values, &importance))
        }
        _ => encode_rtn(&layer.values, format),
    }
}

/// Rows of a layer its reported error is measured on (evenly spaced).
const ERROR_ROWS: usize = 256;

/// A layer's new bytes, and its relative output error if it has calibration data.
type Encoded = (Vec<u8>, Option<f64>);

/// The layer's bytes in `format` by `method`, and its relative output error; `None` if
/// the format does not change (the stored bytes stay, a GGUF block format as it is).
fn encode(layer: &Layer, format: Format, method: Method, opts: &GptqOptions) -> Result<Option<Encoded>, String> {
    let (n, k) = (layer.n as usize, layer.k as usize);
    if format == layer.format {
        return Ok(None);
    }
    let bytes = match (format, method, &layer.gram) {
        (Format::Int(f), Method::Gptq, Some(g)) => {
            gptq::gptq(&layer.values, n, k, &g.sum, f, opts).map_err(|e| e.to_string())?
        }
        _ => round(layer, format, opts.clip).map_err(|e| e.to_string())?,
    };
    let error = match &layer.gram {
        Some(g) => {
            // On every `step`-th row: the exact error costs `n k^2` per layer, which for all
            // of a model's rows takes longer than GPTQ itself.
            let q = format.dequantize(&bytes, layer.n * layer.k).map_err(|e| e.to_string())?;
            let step = (n / ERROR_ROWS).max(1);
            let sample = |m: &[f32]| -> Vec<f32> { m.chunks_exact(k).step_by(step).flatten().copied().collect() };
            let (w, q) = (sample(&layer.values), sample(&q));
            let rows = w.len() / k;
            let energy = gptq::output_error(&w, &vec![0f32; w.len()], rows, k, &g.sum);
            Some(gptq::output_error(&w, &q, rows, k, &g.sum) / energy.max(f64::MIN_POSITIVE))
        }
        None => None,
    };
    Ok(Some((bytes, error)))
}

/// Glob match: `*` any run of characters (dots included), `?` one character.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn curves_interpolate_in_between_and_extrapolate_at_least_linearly() {
        let points = [(0.0, 0.0), (1.0, 2.0), (2.0, 2.5)];
        assert_eq!(interpolate(&points, 0.5), 1.0);
        assert_eq!(interpolate(&points, 1.5), 2.25);
        // Beyond the ends: the end segment's slope, but never below 1.
        assert_eq!(interpolate(&points, -1.0), -2.0);
        assert_eq!(interpolate(&points, 3.0), 3.5);
        assert_eq!(interpolate(&[(1.0, 1.0)], 2.0), 2.0);
    }

    #[test]
    fn kinds_replace_block_indices() {
        assert_eq!(kind_of("blk.12.ffn_down"), "blk.*.ffn_down");
        assert_eq!(kind_of("encoder.layer.3.attention.self.query"), "encoder.layer.*.attention.self.query");
        assert_eq!(kind_of("token_embd"), "token_embd");
    }

    #[test]
    fn globs_match_whole_scopes() {
        assert!(glob("blk.0.*", "blk.0.attn_q"));
        assert!(!glob("blk.0.*", "blk.10.attn_q"));
        assert!(glob("*attn_?", "blk.3.attn_q"));
        assert!(!glob("attn", "blk.3.attn_q"));
    }
}
