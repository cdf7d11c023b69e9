//! Calibration: the interpreter as the [`Executor`] passes gather their statistics with.
//!
//! A [`Calibrator`] holds the calibration inputs (one sequence per row). Passes that probe
//! (quantize's budgets, its choice of int8 activation scales) get the first ~256 tokens held
//! out of the statistics and run changed models on them, on an engine the caller chooses
//! (the CLI's is the JIT, [`interpreter_engine`] the interpreter). Statistics run on the
//! interpreter, a few sequences at a time: memory holds one `k x k` sum per distinct linear
//! input, whatever the number of rows.

use crate::Interpreter;
use kiln_ir::Activations;
use kiln_ir::{Graph, NodeId, Op};
use kiln_passes::calibration::{Calibration, Executor, Gram, Paired, Prober, Refit, Weighting};
use kiln_rt::Value;
use kiln_rt::eval::Snapshot;
use rayon::prelude::*;
use std::collections::HashMap;

/// Sequences per interpreter run.
const BATCH: usize = 4;

/// Tokens the probes run (each probe is one forward pass over them).
pub const PROBE_TOKENS: usize = 256;

/// Named inputs, one sequence per row of their first dimension.
pub type Inputs = HashMap<String, Value>;

/// Named outputs of a run.
pub type Outputs = Vec<(String, Value)>;

/// Runs a graph on inputs, its linears taking the activations their attributes say: what
/// probes run changed models on. With a base, the [`Snapshot`] of a run on the same inputs
/// of a graph that differs from this one only in the values of the weights listed, the
/// engine may take from it every value those weights do not reach. It returns the outputs
/// and the snapshot of this run, for the next; an engine that keeps none returns an empty
/// one, and is then given no base.
pub type ProbeEngine =
    Box<dyn Fn(&Graph, &Inputs, Option<(&Snapshot, &[NodeId])>) -> Result<(Outputs, Snapshot), String> + Sync>;

/// The interpreter as a probe engine (int8 linears with the engine's W8A8 numerics); it
/// runs every graph whole.
pub fn interpreter_engine() -> ProbeEngine {
    Box::new(|g, inputs, _| {
        let outputs = Interpreter::new(g).and_then(|i| i.run(inputs)).map_err(|e| e.to_string())?;
        Ok((outputs, Snapshot::default()))
    })
}

/// Calibration inputs and the engine probes run on: see the module documentation.
pub struct Calibrator {
    /// The rows statistics come from.
    statistics: Inputs,
    /// The rows probes run on, and the unchanged model's outputs on them.
    probe: Option<(Inputs, Wanted)>,
    engine: ProbeEngine,
    held_out: bool,
}

impl Calibrator {
    /// Calibration on `inputs` for `graph` (the model before any pass). With `probes`, the
    /// first rows (about [`PROBE_TOKENS`] tokens) are held out for probes, and the unchanged
    /// model's outputs on them, with f32 activations, are computed now by `engine`; with too
    /// few rows to spare, the same rows do both ([`Calibrator::held_out`] says which).
    pub fn new(graph: &Graph, inputs: Inputs, probes: bool, engine: ProbeEngine) -> Result<Calibrator, String> {
        let rows = inputs.values().next().and_then(|v| v.shape().first().copied()).unwrap_or(0);
        if rows == 0 || inputs.values().any(|v| v.shape().first() != Some(&rows)) {
            return Err("the calibration inputs must share a nonzero first dimension (one sequence per row)".into());
        }
        if !probes {
            return Ok(Calibrator { statistics: inputs, probe: None, engine, held_out: true });
        }
        let (probe_rows, statistics, held_out) = split_probe(&inputs);
        // The model's f32 meaning, whatever activations its linears were given.
        let mut exact = graph.clone();
        kiln_ir::set_activations(&mut exact, Activations::F32);
        let (reference, _) = engine(&exact, &probe_rows, None).map_err(|e| format!("probe: {e}"))?;
        Ok(Calibrator { statistics, probe: Some((probe_rows, Wanted::new(reference))), engine, held_out })
    }

    /// Whether the probe rows are held out of the statistics (false when the inputs were
    /// too short to spare them, and every row does both).
    pub fn held_out(&self) -> bool {
        self.held_out
    }
}

impl Executor for Calibrator {
    fn second_moments(
        &self,
        graph: &Graph,
        nodes: &[NodeId],
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<Calibration, String> {
        second_moments(graph, &self.statistics, nodes, progress)
    }

    fn activations(
        &self,
        graph: &Graph,
        nodes: &[NodeId],
        max_rows: usize,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<HashMap<NodeId, Vec<f32>>, String> {
        activations(graph, &self.statistics, nodes, max_rows, progress)
    }

    fn can_probe(&self) -> bool {
        self.probe.is_some()
    }

    fn probe(&self, graph: &Graph) -> Result<f64, String> {
        let (inputs, want) = self.probe.as_ref().ok_or("no calibration inputs to probe with")?;
        Ok(distance(want, &(self.engine)(graph, inputs, None)?.0))
    }

    fn prober<'s>(&'s self, graph: &Graph) -> Result<(Box<dyn Prober + 's>, f64), String> {
        let (inputs, want) = self.probe.as_ref().ok_or("no calibration inputs to probe with")?;
        let (outputs, base) = (self.engine)(graph, inputs, None)?;
        let prober = Rerun { calibrator: self, base, last: None };
        Ok((Box::new(prober), distance(want, &outputs)))
    }

    fn sequential(
        &self,
        graph: &Graph,
        sites: &[NodeId],
        reference: Option<(&Graph, &[NodeId])>,
        weighting: Weighting,
        refit: &mut Refit<'_>,
        progress: &(dyn Fn(usize, usize) + Sync),
    ) -> Result<(), String> {
        sequential(graph, sites, reference, &self.statistics, weighting, refit, progress)
    }
}

/// The [`Prober`] of a [`Calibrator`]: each probe reruns the engine from the snapshot of
/// the graph last kept.
struct Rerun<'c> {
    calibrator: &'c Calibrator,
    /// The snapshot of the graph last kept (empty if the engine keeps none).
    base: Snapshot,
    /// The last probe's snapshot.
    last: Option<Snapshot>,
}

impl Prober for Rerun<'_> {
    fn probe(&mut self, graph: &Graph, changed: &[NodeId]) -> Result<f64, String> {
        let Some((inputs, want)) = &self.calibrator.probe else { return Err("no probe rows".into()) };
        let base = (!self.base.values.is_empty()).then_some((&self.base, changed));
        let (outputs, snapshot) = (self.calibrator.engine)(graph, inputs, base)?;
        self.last = Some(snapshot);
        Ok(distance(want, &outputs))
    }

    fn keep(&mut self) {
        if let Some(snapshot) = self.last.take() {
            self.base = snapshot;
        }
    }
}

/// Most memory [`sequential`] holds of the reference model's inputs at the sites.
pub const SEQUENTIAL_BYTES: u64 = 8 << 30;

/// [`Executor::sequential`] on the interpreter: the reference model, if any, runs first, a
/// few sequences at a time, keeping its inputs at the sites (the rows of every token that
/// counts); then `graph` runs every row at once, refitting at the sites.
pub fn sequential(
    graph: &Graph,
    sites: &[NodeId],
    reference: Option<(&Graph, &[NodeId])>,
    inputs: &Inputs,
    weighting: Weighting,
    refit: &mut Refit<'_>,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<(), String> {
    let rows = inputs.values().next().and_then(|v| v.shape().first().copied()).unwrap_or(0);
    let width = |g: &Graph, n: NodeId| {
        let k = g.node(n).ty.shape.last().and_then(|d| d.known());
        k.map(|k| k as usize).ok_or_else(|| format!("{}: no known last dimension", g.node(n).scope))
    };
    let widths: HashMap<NodeId, usize> =
        sites.iter().map(|&x| Ok((x, width(graph, x)?))).collect::<Result<_, String>>()?;
    let keep = kept_positions(inputs);

    // The reference's inputs at the sites, in row order, keyed by the site.
    let mut kept: HashMap<NodeId, Vec<f32>> = HashMap::new();
    if let Some((reference, at)) = reference {
        if at.len() != sites.len() {
            return Err("a reference node for every site".into());
        }
        let mut site_of: HashMap<NodeId, NodeId> = HashMap::new();
        for (&x, &x_o) in sites.iter().zip(at) {
            if width(reference, x_o)? != widths[&x] {
                return Err(format!("{}: its width differs from the reference's", graph.node(x).scope));
            }
            site_of.insert(x_o, x);
        }
        let tokens = keep.as_ref().map_or_else(
            || inputs.values().next().map_or(0, |v| v.shape().iter().take(2).product::<usize>()),
            |k| k.iter().filter(|&&b| b).count(),
        );
        let bytes = 4 * tokens as u64 * widths.values().map(|&k| k as u64).sum::<u64>();
        if bytes > SEQUENTIAL_BYTES {
            return Err(format!(
                "healing would hold {:.1} GiB of reference activations ({tokens} tokens): give fewer calibration rows",
                bytes as f64 / (1u64 << 30) as f64
            ));
        }
        let reference = f32_trunk(reference);
        let interp = Interpreter::new(&reference).map_err(|e| e.to_string())?;
        for start in (0..rows).step_by(BATCH) {
            let end = (start + BATCH).min(rows);
            let chunk: Inputs = inputs.iter().map(|(k, v)| (k.clone(), v.rows(start, end))).collect();
            let mask = kept_positions(&chunk);
            interp
                .run_observed(&chunk, &mut |id, value| {
                    let (Some(&site), Some(x)) = (site_of.get(&id), value.as_f32()) else { return };
                    kept.entry(site).or_default().extend(kept_rows(&x.data, widths[&site], mask.as_deref()));
                })
                .map_err(|e| format!("cannot run the reference model on calibration rows {start}..{end}: {e}"))?;
        }
    }

    // The compressed model over every row at once, refitting as it goes.
    let trunk = f32_trunk(graph);
    let present: std::collections::HashSet<NodeId> = trunk.node_ids().collect();
    let interp = Interpreter::new(&trunk).map_err(|e| e.to_string())?;
    let mut done = 0;
    interp
        .run_refitting(inputs, &mut |id, value| {
            let Some(&k) = widths.get(&id) else { return Ok(Vec::new()) };
            let x = value.as_f32().ok_or("a site's input is not f32")?;
            let mut x_c: Vec<f32> = kept_rows(&x.data, k, keep.as_deref()).collect();
            let mut x_o = match reference {
                Some(_) => {
                    let x_o = kept.remove(&id).unwrap_or_default();
                    if x_o.len() != x_c.len() {
                        return Err(format!("the models saw {} and {} tokens", x_o.len() / k, x_c.len() / k));
                    }
                    Some(x_o)
                }
                None => None,
            };
            if weighting == Weighting::Relative {
                relative_weights(x_o.as_deref_mut(), &mut x_c, k);
            }
            let moment = |a: &[f32], b: Option<&[f32]>| {
                let mut m = vec![0f32; k * k];
                match b {
                    None => kiln_rt::kernels::gram(a, k, &mut m),
                    Some(b) => kiln_rt::kernels::cross_gram(a, b, k, &mut m),
                }
                m.into_iter().map(f64::from).collect::<Vec<f64>>()
            };
            let paired = Paired {
                k,
                own: moment(&x_c, None),
                cross: x_o.as_ref().map(|x_o| moment(x_o, Some(&x_c))),
                reference: x_o.as_ref().map(|x_o| moment(x_o, None)),
                rows: (x_c.len() / k) as u64,
            };
            let new = refit(id, &paired)?;
            done += 1;
            progress(done, sites.len());
            new.into_iter()
                // A weight only an output linear reads (a head) is not in the trunk.
                .filter(|(w, _)| present.contains(w))
                .map(|(w, values)| {
                    let shape: Vec<usize> =
                        trunk.node(w).ty.shape.iter().filter_map(|d| d.known()).map(|d| d as usize).collect();
                    if shape.iter().product::<usize>() != values.len() {
                        return Err(format!("{}: a refit of another size", trunk.node(w).scope));
                    }
                    Ok((w, Value::F32(kiln_rt::Tensor::new(shape, values))))
                })
                .collect()
        })
        .map_err(|e| format!("cannot run the compressed model on the calibration rows: {e}"))?;
    Ok(())
}

/// Scales the rows of `x_o` and `x_c` (the same tokens) by `sqrt(w_t)`, `w_t = 1 / |x_t|^2` of
/// the reference's input (or the own one, without), normalized to a mean of 1
/// ([`Weighting::Relative`]); rows of zeros keep weight 0.
fn relative_weights(mut x_o: Option<&mut [f32]>, x_c: &mut [f32], k: usize) {
    let inverse: Vec<f64> = x_o
        .as_deref()
        .unwrap_or(x_c)
        .chunks_exact(k)
        .map(|r| {
            let norm: f64 = r.iter().map(|&v| (v as f64).powi(2)).sum();
            if norm > 0.0 { 1.0 / norm } else { 0.0 }
        })
        .collect();
    let mean = inverse.iter().sum::<f64>() / inverse.len().max(1) as f64;
    let scale: Vec<f32> = inverse.iter().map(|w| if mean > 0.0 { (w / mean).sqrt() as f32 } else { 0.0 }).collect();
    for x in x_o.iter_mut().map(|x| &mut **x).chain([x_c]) {
        for (row, s) in x.chunks_exact_mut(k).zip(&scale) {
            row.iter_mut().for_each(|v| *v *= s);
        }
    }
}

/// The graph as calibration runs it: f32 activations everywhere, and the linears that
/// compute outputs (a language model's head: a fifth of SmolLM2's multiply-adds over
/// calibration tokens) not run, their inputs made the outputs. Node ids stay the same.
fn f32_trunk(graph: &Graph) -> Graph {
    let mut trimmed = graph.clone();
    let outputs = trimmed.outputs().to_vec();
    for (name, id) in outputs {
        if matches!(trimmed.node(id).op, Op::Linear { .. }) {
            trimmed.replace_output(&name, trimmed.operands(id)[0]);
        }
    }
    trimmed.remove_dead();
    kiln_ir::set_activations(&mut trimmed, Activations::F32);
    trimmed
}

/// The rows of `x` (`[rows, k]`) that `keep` selects: all if `None`, or if the rows are not
/// the mask's positions (after `last_position`, one per sequence).
fn kept_rows<'x>(x: &'x [f32], k: usize, keep: Option<&'x [bool]>) -> impl Iterator<Item = f32> + 'x {
    let rows = x.len() / k;
    let keep = keep.filter(|keep| keep.len() == rows);
    x.chunks_exact(k)
        .enumerate()
        .filter(move |(i, _)| keep.is_none_or(|keep| keep[*i]))
        .flat_map(|(_, r)| r.iter().copied())
}

/// Runs `inputs` through `graph` on the interpreter and returns `x^T x` of every node in
/// `nodes` (rows of its last dimension). Positions whose `attention_mask` is 0 (padding) are
/// left out.
pub fn second_moments(
    graph: &Graph,
    inputs: &Inputs,
    nodes: &[NodeId],
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Calibration, String> {
    let rows = inputs.values().next().and_then(|v| v.shape().first().copied()).unwrap_or(0);
    let widths: HashMap<NodeId, usize> = nodes
        .iter()
        .map(|&n| {
            let k = graph.node(n).ty.shape.last().and_then(|d| d.known());
            k.map(|k| (n, k as usize)).ok_or_else(|| format!("{}: no known last dimension", graph.node(n).scope))
        })
        .collect::<Result<_, String>>()?;
    // Statistics of the model's f32 values, also where its linears take int8 activations.
    let trimmed = f32_trunk(graph);
    let interp = Interpreter::new(&trimmed).map_err(|e| e.to_string())?;
    let mut calibration = Calibration::default();
    for start in (0..rows).step_by(BATCH) {
        let end = (start + BATCH).min(rows);
        let chunk: Inputs = inputs.iter().map(|(k, v)| (k.clone(), v.rows(start, end))).collect();
        let keep = kept_positions(&chunk);
        calibration.tokens += keep.as_ref().map_or_else(
            || chunk.values().next().map_or(0, |v| v.shape().iter().take(2).product::<usize>()),
            |k| k.iter().filter(|&&b| b).count(),
        ) as u64;
        interp
            .run_observed(&chunk, &mut |id, value| {
                let Some(&k) = widths.get(&id) else { return };
                let Some(x) = value.as_f32() else { return };
                let (xtx, used) = gram_of(&x.data, k, keep.as_deref());
                calibration.inputs.entry(id).or_insert_with(|| Gram::new(k)).add(&xtx, used);
            })
            .map_err(|e| format!("cannot run calibration rows {start}..{end}: {e}"))?;
        progress(end, rows);
    }
    Ok(calibration)
}

/// [`Executor::activations`] on the interpreter: `inputs` run a few sequences at a time
/// until `max_rows` tokens (padding left out) are in, and every node of `nodes` keeps its
/// value's rows of those tokens.
pub fn activations(
    graph: &Graph,
    inputs: &Inputs,
    nodes: &[NodeId],
    max_rows: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<HashMap<NodeId, Vec<f32>>, String> {
    let rows = inputs.values().next().and_then(|v| v.shape().first().copied()).unwrap_or(0);
    let mut widths: HashMap<NodeId, usize> = HashMap::new();
    for &n in nodes {
        let k = graph.node(n).ty.shape.last().and_then(|d| d.known());
        widths.insert(n, k.ok_or_else(|| format!("{}: no known last dimension", graph.node(n).scope))? as usize);
    }
    let trimmed = f32_trunk(graph);
    let interp = Interpreter::new(&trimmed).map_err(|e| e.to_string())?;
    let mut out: HashMap<NodeId, Vec<f32>> = nodes.iter().map(|&n| (n, Vec::new())).collect();
    let mut taken = 0;
    for start in (0..rows).step_by(BATCH) {
        if taken >= max_rows {
            break;
        }
        let end = (start + BATCH).min(rows);
        let chunk: Inputs = inputs.iter().map(|(k, v)| (k.clone(), v.rows(start, end))).collect();
        let keep = kept_positions(&chunk);
        let room = max_rows - taken;
        let mut got = 0;
        interp
            .run_observed(&chunk, &mut |id, value| {
                let (Some(&k), Some(x)) = (widths.get(&id), value.as_f32()) else { return };
                let rows: Vec<f32> = kept_rows(&x.data, k, keep.as_deref()).take(room * k).collect();
                got = rows.len() / k;
                out.entry(id).or_default().extend(rows);
            })
            .map_err(|e| format!("cannot run calibration rows {start}..{end}: {e}"))?;
        taken += got;
        progress(end, rows);
    }
    for (&n, v) in &out {
        if v.len() != taken * widths[&n] {
            return Err(format!("{}: not one row per token (a value of another shape)", graph.node(n).scope));
        }
    }
    Ok(out)
}

/// The calibration inputs split in two: the first rows, about [`PROBE_TOKENS`] tokens, that
/// probes run changed models on, and the rest, that calibration statistics come from.
/// Probes judge what GPTQ fitted, so they must not see the rows it fitted to: that would
/// favour the formats that fit calibration data closest, not those that generalize. With
/// too few rows for both, every row does both (the third value is `false`).
pub fn split_probe(inputs: &Inputs) -> (Inputs, Inputs, bool) {
    let shape = inputs.values().next().map(|v| v.shape().to_vec()).unwrap_or_default();
    let (rows, seq) = (shape.first().copied().unwrap_or(0), shape.get(1).copied().unwrap_or(1).max(1));
    let take = (PROBE_TOKENS / seq).clamp(1, rows.max(1)).min(rows);
    let probe = inputs.iter().map(|(k, v)| (k.clone(), v.rows(0, take))).collect();
    if rows >= 4 * take {
        (probe, inputs.iter().map(|(k, v)| (k.clone(), v.rows(take, rows))).collect(), true)
    } else {
        (probe, inputs.clone(), false)
    }
}

/// The unchanged model's outputs on the probe rows, with what every probe's KL needs of its
/// logits computed once: each row's softmax `p` and `sum p a - logsumexp(a)`.
pub struct Wanted {
    outputs: Outputs,
    /// For the `logits` output, if any: `p` of every row, and each row's constant.
    softmax: Option<(Vec<f32>, Vec<f64>)>,
}

impl Wanted {
    pub fn new(outputs: Outputs) -> Wanted {
        let softmax = outputs.iter().find(|(name, _)| name == "logits").and_then(|(_, v)| v.as_f32()).map(|a| {
            let d = a.shape.last().copied().unwrap_or(1).max(1);
            let mut p = a.data.clone();
            let constants: Vec<f64> = p
                .par_chunks_exact_mut(d)
                .zip(a.data.par_chunks_exact(d))
                .map(|(p, a)| {
                    let lse = log_sum_exp(a, p);
                    for (p, &x) in p.iter_mut().zip(a) {
                        *p = x - lse as f32;
                    }
                    kiln_rt::kernels::exp_nonpositive(p);
                    p.iter().zip(a).map(|(&p, &x)| p as f64 * x as f64).sum::<f64>() - lse
                })
                .collect();
            (p, constants)
        });
        Wanted { outputs, softmax }
    }
}

/// How far `got` moved from `want` (outputs by name): for `logits`, the mean KL divergence
/// of the next-token distributions over positions; for other outputs, the mean of
/// 1 - cosine over rows of the last dimension.
pub fn distance(want: &Wanted, got: &[(String, Value)]) -> f64 {
    let mut total = 0.0;
    for ((name, a), (_, b)) in want.outputs.iter().zip(got) {
        let (Some(a), Some(b)) = (a.as_f32(), b.as_f32()) else { continue };
        let d = a.shape.last().copied().unwrap_or(1).max(1);
        let rows = a.data.chunks_exact(d).zip(b.data.chunks_exact(d));
        let n = (a.data.len() / d).max(1) as f64;
        if let (true, Some((p, constants))) = (name == "logits", &want.softmax) {
            // Per row in parallel, summed in order: the same bits on any thread count.
            let kl: Vec<f64> = p
                .par_chunks_exact(d)
                .zip(b.data.par_chunks_exact(d))
                .zip(constants)
                .map(|((p, b), &c)| kl_divergence(p, c, b))
                .collect();
            total += kl.iter().sum::<f64>() / n;
        } else {
            total += rows
                .map(|(p, q)| {
                    let dot: f64 = p.iter().zip(q).map(|(x, y)| *x as f64 * *y as f64).sum();
                    let np: f64 = p.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    let nq: f64 = q.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
                    1.0 - dot / (np * nq).max(f64::MIN_POSITIVE)
                })
                .sum::<f64>()
                / n;
        }
    }
    total
}

/// `KL(softmax(a) || softmax(b))` of a row of logits `b` against the reference row `a`
/// given by `p = softmax(a)` and `c = sum p a - logsumexp(a)`: `c - sum p b +
/// logsumexp(b)`, one `exp` per logit.
fn kl_divergence(p: &[f32], c: f64, b: &[f32]) -> f64 {
    let mut scratch = vec![0f32; b.len()];
    let cross: f64 = p.iter().zip(b).map(|(&p, &y)| p as f64 * y as f64).sum();
    c - cross + log_sum_exp(b, &mut scratch)
}

/// `log sum exp(x)` in f64, the exponentials in f32 ([`kiln_rt::kernels::exp_nonpositive`],
/// 2 ulp) after subtracting the maximum; `scratch` (as long as `x`) takes them.
fn log_sum_exp(x: &[f32], scratch: &mut [f32]) -> f64 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for (s, &v) in scratch.iter_mut().zip(x) {
        *s = v - max;
    }
    kiln_rt::kernels::exp_nonpositive(scratch);
    max as f64 + scratch.iter().map(|&e| e as f64).sum::<f64>().ln()
}

/// Which token positions count: the attention mask's nonzero ones, if there is a mask.
fn kept_positions(chunk: &Inputs) -> Option<Vec<bool>> {
    match chunk.get("attention_mask")? {
        Value::I64 { data, .. } => Some(data.iter().map(|&v| v != 0).collect()),
        Value::F32(m) => Some(m.data.iter().map(|&v| v != 0.0).collect()),
    }
}

/// `x^T x` of the rows of `x` (`[rows, k]`) that `keep` selects (all if `None`, or if the rows
/// are not the mask's positions, e.g. after `last_position`), and how many rows that was.
fn gram_of(x: &[f32], k: usize, keep: Option<&[bool]>) -> (Vec<f32>, u64) {
    let kept: Vec<f32>;
    let x = match keep {
        Some(_) => {
            kept = kept_rows(x, k, keep).collect();
            &kept[..]
        }
        None => x,
    };
    let mut xtx = vec![0f32; k * k];
    kiln_rt::kernels::gram(x, k, &mut xtx);
    (xtx, (x.len() / k) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_divergence_is_the_textbook_sum() {
        let a = [1.0f32, -2.0, 0.5, 3.0, 0.0];
        let b = [0.5f32, -1.0, 0.5, 2.0, 1.0];
        let log_softmax = |x: &[f32]| -> Vec<f64> {
            let z = x.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            x.iter().map(|&v| v as f64 - z).collect()
        };
        let (la, lb) = (log_softmax(&a), log_softmax(&b));
        let want: f64 = la.iter().zip(&lb).map(|(p, q)| p.exp() * (p - q)).sum();
        let logits = |x: &[f32]| vec![("logits".to_string(), Value::F32(kiln_rt::Tensor::new(vec![1, 5], x.to_vec())))];
        let reference = Wanted::new(logits(&a));
        let got = distance(&reference, &logits(&b));
        assert!((got - want).abs() < 1e-5 * want, "{got} vs {want}");
        assert!(distance(&reference, &logits(&a)).abs() < 1e-12);
        // Shifting logits changes no distribution.
        let shifted: Vec<f32> = b.iter().map(|v| v + 100.0).collect();
        assert!((distance(&reference, &logits(&shifted)) - want).abs() < 1e-5 * want);
    }

    fn ids(rows: usize, seq: usize) -> Inputs {
        let data = (0..(rows * seq) as i64).collect();
        HashMap::from([("input_ids".to_string(), Value::I64 { shape: vec![rows, seq], data })])
    }

    fn first_ids(v: &Inputs) -> Vec<i64> {
        match &v["input_ids"] {
            Value::I64 { data, shape } => data.iter().step_by(shape[1]).copied().collect(),
            Value::F32(_) => unreachable!(),
        }
    }

    /// A linear that computes an output (a head) is not run, yet its input's `x^T x` is
    /// gathered, exactly, along with every other linear's.
    #[test]
    fn an_output_linear_still_gets_its_input_statistics() {
        let text = "graph g {\n  %0 = input \"x\" : f32[n, 2]\n  %1 = weight \"w\" f32 : f32[2, 2]\n  %2 = linear %0, %1 : f32[n, 2]\n  %3 = relu %2 : f32[n, 2]\n  %4 = linear %3, %1 : f32[n, 2]\n  output \"y\" = %4\n}\n";
        let mut g = kiln_ir::parse(text).unwrap();
        g.store.insert("w", kiln_ir::TensorData::from_f32(vec![2, 2], &[1.0, -1.0, 2.0, 0.5]));
        let x = Value::F32(kiln_rt::Tensor::new(vec![3, 2], vec![1.0, 2.0, -1.0, 0.5, 3.0, -2.0]));
        let inputs = HashMap::from([("x".to_string(), x)]);
        let c = second_moments(&g, &inputs, &kiln_passes::calibration::linear_inputs(&g), &|_, _| {}).unwrap();
        let nodes: Vec<NodeId> = g.node_ids().collect();
        let (x_id, hidden) = (nodes[0], nodes[3]);
        // x^T x of x, and of relu(x W^T): rows (0, 3), (0, 0), (5, 5).
        assert_eq!(c.inputs[&x_id].sum, vec![11.0, -4.5, -4.5, 8.25]);
        assert_eq!(c.inputs[&hidden].sum, vec![25.0, 25.0, 25.0, 34.0]);
        assert_eq!(c.inputs.len(), 2);
    }

    /// Probes get the first ~256 tokens; calibration the other rows, never the same ones.
    #[test]
    fn probe_rows_are_held_out_of_calibration() {
        let (probe, calib, held_out) = split_probe(&ids(16, 128));
        assert!(held_out);
        assert_eq!(first_ids(&probe), vec![0, 128]);
        assert_eq!(first_ids(&calib), (2..16).map(|r| r * 128).collect::<Vec<_>>());

        // Too few rows to spare: every row does both, and the caller is told.
        let (probe, calib, held_out) = split_probe(&ids(3, 128));
        assert!(!held_out);
        assert_eq!((first_ids(&probe).len(), first_ids(&calib).len()), (2, 3));
    }
}
