//! `kiln eval`: perplexity of a language model, or agreement with reference outputs.

use crate::load;
use crate::runner::{ExecArgs, Runner};
use crate::tensors;
use kiln_interp::Value;
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use serde_json::{Map, json};
use std::path::PathBuf;

pub struct EvalArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub data: PathBuf,
    pub json: bool,
    pub batch: usize,
    pub exec: ExecArgs,
}

/// Running metrics over batches.
#[derive(Default)]
struct Metrics {
    nll_sum: f64,
    tokens: usize,
    nll_ref_diff: f64,
    nll_ref_count: usize,
    cosines: Vec<f64>,
    /// `(reference name, max |difference|)`.
    max_abs: Vec<(String, f32)>,
}

pub fn eval(args: EvalArgs) -> Result<()> {
    let mut model = load::load_runnable(&args.spec, args.weights.as_deref())?;
    args.exec.apply_activations(&mut model.graph);
    let graph = &model.graph;
    let (interp, _) = Runner::new(graph, &args.exec)?;
    let file = tensors::read(&args.data)?;
    let inputs = tensors::inputs_from(&file, &args.data, graph)?;
    let rows = tensors::batch_of(&inputs)?;
    let output_names: Vec<String> = graph.outputs().iter().map(|(n, _)| n.clone()).collect();
    // Perplexity needs next-token logits `[batch, seq, vocab]` for the ids `[batch, seq]`.
    let is_lm = graph.outputs().iter().any(|(n, id)| n == "logits" && graph.node(*id).ty.rank() == 3)
        && inputs.get("input_ids").is_some_and(|ids| ids.shape().len() == 2);
    let references: Vec<(String, String)> = output_names
        .iter()
        .flat_map(|o| [o.clone(), format!("first_{o}"), format!("last_{o}")].into_iter().map(move |r| (o.clone(), r)))
        .filter(|(_, r)| file.tensors.contains_key(r))
        .collect();
    if !is_lm && references.is_empty() {
        return Err(miette!(
            help = "a language model (output `logits` [batch, seq, vocab], input `input_ids` [batch, seq]) gets perplexity; otherwise put reference outputs in the file under the output's name",
            "{} holds nothing to evaluate against: no reference for the outputs {}",
            args.data.display(),
            output_names.join(", ")
        ));
    }
    if rows == 0 {
        return Err(miette!("{} has no rows to evaluate: its inputs have batch size 0", args.data.display()));
    }
    let nll_reference = if is_lm { file.tensors.get("nll") } else { None };
    let mut checked: Vec<(&str, &Value)> = references.iter().map(|(_, r)| (r.as_str(), &file.tensors[r])).collect();
    checked.extend(nll_reference.map(|v| ("nll", v)));
    for (r, value) in checked {
        if value.as_f32().is_none() {
            return Err(miette!(
                "reference `{r}` in {} must be f32, but it is {}{:?}",
                args.data.display(),
                value.dtype(),
                value.shape()
            ));
        }
        let Some(&rows_of_ref) = value.shape().first() else {
            return Err(miette!(
                "reference `{r}` in {} is a scalar; it needs one row per input row ({rows})",
                args.data.display()
            ));
        };
        if rows_of_ref != rows {
            return Err(miette!(
                "reference `{r}` in {} has {rows_of_ref} rows but the inputs have {rows}",
                args.data.display()
            ));
        }
    }
    let bar = crate::progress::bar(rows as u64, "rows");
    bar.set_message("eval");
    let mut m = Metrics::default();
    let batch = args.batch.max(1);
    for start in (0..rows).step_by(batch) {
        let end = (start + batch).min(rows);
        let chunk = inputs.iter().map(|(k, v)| (k.clone(), v.rows(start, end))).collect();
        let outputs = interp.run(&chunk).into_diagnostic().wrap_err_with(|| {
            format!("cannot run {} on rows {start}..{end} of {}", args.spec.display(), args.data.display())
        })?;
        for (name, value) in &outputs {
            let Some(out) = value.as_f32() else { continue };
            if is_lm && name == "logits" {
                let ids = &chunk["input_ids"];
                let mask = chunk.get("attention_mask");
                let nll = next_token_nll(out, ids, mask)?;
                if let Some(reference @ Value::F32(_)) = nll_reference {
                    let r = reference.rows(start, end);
                    let r = r.as_f32().expect("f32 rows");
                    if r.data.len() == nll.iter().filter(|x| x.is_some()).count() {
                        for (a, b) in nll.iter().flatten().zip(&r.data) {
                            m.nll_ref_diff += (a - *b as f64).abs();
                            m.nll_ref_count += 1;
                        }
                    }
                }
                for x in nll.into_iter().flatten() {
                    m.nll_sum += x;
                    m.tokens += 1;
                }
            }
            for (_, r) in references.iter().filter(|(o, _)| o == name) {
                if file.tensors[r].as_f32().is_none() {
                    return Err(miette!("reference `{r}` must be f32"));
                }
                let reference = file.tensors[r].rows(start, end);
                let reference = reference.as_f32().expect("f32 rows");
                let got = pick(out, r.starts_with("first_"), r.starts_with("last_"));
                if got.len() != reference.data.len() {
                    return Err(miette!(
                        "reference `{r}` has shape {:?}, which does not match output `{name}` {:?}",
                        reference.shape,
                        out.shape
                    ));
                }
                let width = *reference.shape.last().unwrap_or(&1);
                if r == name && reference.shape.len() == 2 {
                    for (a, b) in got.chunks(width).zip(reference.data.chunks(width)) {
                        m.cosines.push(cosine(a, b));
                    }
                }
                let diff = got.iter().zip(&reference.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                match m.max_abs.iter_mut().find(|(n, _)| n == r) {
                    Some((_, d)) => *d = d.max(diff),
                    None => m.max_abs.push((r.clone(), diff)),
                }
            }
        }
        bar.inc((end - start) as u64);
    }
    bar.finish_and_clear();
    if references.is_empty() && m.tokens == 0 {
        return Err(miette!(
            "{} has no next-token targets to score: every sequence is shorter than 2 tokens or masked out",
            args.data.display()
        ));
    }
    report(&m, args.json);
    Ok(())
}

/// The output rows at position 0 or the last position (for `[batch, seq, vocab]`
/// outputs checked against `first_`/`last_` references), or everything.
fn pick(out: &kiln_interp::Tensor, first: bool, last: bool) -> Vec<f32> {
    if !(first || last) || out.shape.len() != 3 {
        return out.data.clone();
    }
    let (b, s, v) = (out.shape[0], out.shape[1], out.shape[2]);
    let pos = if first { 0 } else { s - 1 };
    (0..b).flat_map(|i| out.data[(i * s + pos) * v..(i * s + pos + 1) * v].iter().copied()).collect()
}

/// Negative log-likelihood of each next token under teacher forcing:
/// `-log softmax(logits[t])[ids[t + 1]]`, `None` where the mask drops the target.
fn next_token_nll(logits: &kiln_interp::Tensor, ids: &Value, mask: Option<&Value>) -> Result<Vec<Option<f64>>> {
    let [b, s, v] = logits.shape[..] else {
        return Err(miette!("output `logits` is {:?}, but perplexity needs [batch, seq, vocab]", logits.shape));
    };
    let Value::I64 { data: ids, shape: ids_shape } = ids else { return Err(miette!("input `input_ids` must be i64")) };
    if ids_shape[..] != [b, s] {
        return Err(miette!("input `input_ids` is {ids_shape:?}, but output `logits` is {:?}", logits.shape));
    }
    let mask = match mask {
        Some(Value::I64 { data, shape }) if shape[..] == [b, s] => Some(data),
        Some(m) => {
            return Err(miette!(
                "input `attention_mask` is {}{:?}, but perplexity needs i64{:?}",
                m.dtype(),
                m.shape(),
                [b, s]
            ));
        }
        None => None,
    };
    let mut out = Vec::with_capacity(b * s.saturating_sub(1));
    for i in 0..b {
        for t in 0..s.saturating_sub(1) {
            if mask.is_some_and(|m| m[i * s + t + 1] == 0) {
                out.push(None);
                continue;
            }
            let row = &logits.data[(i * s + t) * v..(i * s + t + 1) * v];
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &x| a.max(x)) as f64;
            let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            let target = ids[i * s + t + 1];
            let logit = usize::try_from(target).ok().and_then(|t| row.get(t)).copied().unwrap_or(f32::NAN);
            out.push(Some(max + sum.ln() - logit as f64));
        }
    }
    Ok(out)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb).max(f64::MIN_POSITIVE)
}

fn report(m: &Metrics, as_json: bool) {
    let mut obj = Map::new();
    if m.tokens > 0 {
        obj.insert("perplexity".into(), json!((m.nll_sum / m.tokens as f64).exp()));
        obj.insert("tokens".into(), json!(m.tokens));
        obj.insert("nll_mean".into(), json!(m.nll_sum / m.tokens as f64));
    }
    if m.nll_ref_count > 0 {
        obj.insert("nll_mean_abs_diff".into(), json!(m.nll_ref_diff / m.nll_ref_count as f64));
    }
    if !m.cosines.is_empty() {
        let mean = m.cosines.iter().sum::<f64>() / m.cosines.len() as f64;
        let min = m.cosines.iter().copied().fold(f64::INFINITY, f64::min);
        obj.insert("cosine_mean".into(), json!(mean));
        obj.insert("cosine_min".into(), json!(min));
        obj.insert("rows".into(), json!(m.cosines.len()));
    }
    for (name, d) in &m.max_abs {
        obj.insert(format!("max_abs_diff_{name}"), json!(d));
    }
    if as_json {
        println!("{}", serde_json::Value::Object(obj));
    } else {
        for (k, v) in obj {
            println!("{k:>24}: {v}");
        }
    }
}
