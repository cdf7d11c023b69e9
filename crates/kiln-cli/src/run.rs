//! `kiln run`: tensors (or text) in, every model output out.

use crate::load;
use crate::runner::{ExecArgs, Runner};
use crate::tensors;
use kiln_interp::Value;
use kiln_ir::Op;
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use std::collections::HashMap;
use std::path::PathBuf;

pub struct RunArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub input: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub text: Vec<String>,
    pub tokenizer: Option<PathBuf>,
    pub exec: ExecArgs,
}

pub fn run(args: RunArgs) -> Result<()> {
    let mut model = load::load_runnable(&args.spec, args.weights.as_deref())?;
    args.exec.apply_activations(&mut model.graph);
    let graph = &model.graph;
    let (interp, _) = Runner::new(graph, &args.exec)?;
    let mut tokenizer = None;
    let inputs = match (&args.input, args.text.is_empty()) {
        (Some(path), true) => {
            let file = tensors::read(path)?;
            tensors::inputs_from(&file, path, graph)?
        }
        (None, false) => {
            let tok = model.tokenizer(args.tokenizer.as_deref())?;
            let inputs = text_inputs(&tok, &args.text, graph)?;
            tokenizer = Some(tok);
            inputs
        }
        (Some(_), false) => return Err(miette!("give either --input or --text, not both")),
        (None, true) => {
            return Err(miette!(
                help = "kiln run SPEC --weights W --input IN.safetensors --output OUT.safetensors",
                "nothing to run: give --input FILE or --text TEXT"
            ));
        }
    };
    let outputs = interp.run(&inputs).into_diagnostic().wrap_err_with(|| match &args.input {
        Some(path) => format!("cannot run {} on {}", args.spec.display(), path.display()),
        None => format!("cannot run {} on the given text", args.spec.display()),
    })?;
    if let Some(path) = &args.output {
        tensors::write(path, &outputs)?;
        eprintln!("wrote {} output(s) to {}", outputs.len(), path.display());
    }
    if args.output.is_none() || !args.text.is_empty() {
        print_outputs(&outputs, &args.text, tokenizer.as_ref(), &inputs);
    }
    Ok(())
}

/// Tokenizes `texts` into the model's `input_ids` (and `attention_mask` if it has one),
/// padded on the right to the longest text.
pub fn text_inputs(
    tok: &tokenizers::Tokenizer,
    texts: &[String],
    graph: &kiln_ir::Graph,
) -> Result<HashMap<String, Value>> {
    let names: Vec<String> = graph
        .inputs()
        .into_iter()
        .filter_map(|n| match &graph.node(n).op {
            Op::Input { name } => Some(name.clone()),
            _ => None,
        })
        .collect();
    for n in &names {
        if !matches!(n.as_str(), "input_ids" | "attention_mask" | "token_type_ids") {
            return Err(miette!("--text cannot fill the model's input `{n}`; use --input"));
        }
    }
    let has_mask = names.iter().any(|n| n == "attention_mask");
    // Whole texts, padded here to the longest: a tokenizer.json may ask for fixed-length
    // padding or truncation (MiniLM's pads to 128), which would feed pad tokens as text or
    // silently drop the end of a long text.
    let mut tok = tok.clone();
    tok.with_padding(None);
    tok.with_truncation(None).map_err(|e| miette!("cannot configure the tokenizer: {e}"))?;
    let encodings = texts
        .iter()
        .map(|t| tok.encode(t.as_str(), true).map_err(|e| miette!("cannot tokenize {t:?}: {e}")))
        .collect::<Result<Vec<_>>>()?;
    let len = encodings.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
    if !has_mask && encodings.iter().any(|e| e.get_ids().len() != len) {
        return Err(miette!(
            "the model has no attention_mask input, so texts of different token lengths cannot share a batch; run them one at a time"
        ));
    }
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for e in &encodings {
        let n = e.get_ids().len();
        ids.extend(e.get_ids().iter().map(|&i| i as i64));
        ids.extend(std::iter::repeat_n(0, len - n));
        mask.extend(std::iter::repeat_n(1, n));
        mask.extend(std::iter::repeat_n(0, len - n));
    }
    let shape = vec![texts.len(), len];
    let mut inputs = HashMap::new();
    for n in names {
        let data = match n.as_str() {
            "input_ids" => ids.clone(),
            "attention_mask" => mask.clone(),
            _ => vec![0; ids.len()],
        };
        inputs.insert(n, Value::I64 { shape: shape.clone(), data });
    }
    Ok(inputs)
}

fn print_outputs(
    outputs: &[(String, Value)],
    texts: &[String],
    tokenizer: Option<&tokenizers::Tokenizer>,
    inputs: &HashMap<String, Value>,
) {
    for (name, value) in outputs {
        let shape = value.shape();
        println!("{name}: {}{:?}", value.dtype(), shape);
        let Some(t) = value.as_f32() else { continue };
        if let (Some(tok), "logits", [_, seq, vocab]) = (tokenizer, name.as_str(), shape) {
            print_next_tokens(tok, t, *seq, *vocab, texts, inputs);
            continue;
        }
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let per_row = t.data.len() / rows;
        for r in 0..rows {
            let row = &t.data[r * per_row..(r + 1) * per_row];
            if let Some(text) = texts.get(r) {
                println!("  [{r}] {text:?}");
            }
            println!("  [{r}] {}", preview(row, 16));
        }
    }
}

/// For language-model logits: the most likely next tokens after each text's last token.
fn print_next_tokens(
    tok: &tokenizers::Tokenizer,
    logits: &kiln_interp::Tensor,
    seq: usize,
    vocab: usize,
    texts: &[String],
    inputs: &HashMap<String, Value>,
) {
    for (r, text) in texts.iter().enumerate() {
        // The last real token: padded positions have mask 0.
        let len = match inputs.get("attention_mask") {
            Some(Value::I64 { data, .. }) => data[r * seq..(r + 1) * seq].iter().filter(|&&m| m != 0).count(),
            _ => seq,
        };
        let Some(last) = len.checked_sub(1) else { continue };
        let row = &logits.data[(r * seq + last) * vocab..(r * seq + last + 1) * vocab];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        let top: Vec<String> = order
            .iter()
            .take(5)
            .map(|&i| {
                let p = ((row[i] as f64 - max).exp() / z) * 100.0;
                let piece = tok.decode(&[i as u32], false).unwrap_or_else(|_| format!("<{i}>"));
                format!("{piece:?} {p:.1}%")
            })
            .collect();
        println!("  [{r}] {text:?}");
        println!("  [{r}] next token: {}", top.join(", "));
    }
}

fn preview(row: &[f32], max: usize) -> String {
    let shown: Vec<String> = row.iter().take(max).map(|v| format!("{v:.6}")).collect();
    if row.len() > max {
        format!("[{}, ... ({} values)]", shown.join(", "), row.len())
    } else {
        format!("[{}]", shown.join(", "))
    }
}
