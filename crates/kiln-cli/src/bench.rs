//! `kiln bench`: time a model on synthetic inputs of a given shape.

use crate::generate::{Decoder, generation_graph, language_model};
use crate::load;
use crate::runner::{ExecArgs, Runner};
use kiln_interp::Value;
use kiln_ir::{DType, Dim, Graph, Op};
use miette::{IntoDiagnostic, Result, miette};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct BenchArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub shape: Option<String>,
    pub decode: Option<usize>,
    pub prompt_len: usize,
    pub runs: Option<usize>,
    pub warmup: usize,
    pub json: bool,
    pub exec: ExecArgs,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let mut model = load::load_runnable(&args.spec, args.weights.as_deref())?;
    args.exec.apply_activations(&mut model.graph);
    let graph = &model.graph;
    let exec = args.exec.clone();
    let shape = match (&args.shape, args.decode) {
        (Some(shape), None) => shape.clone(),
        (None, Some(tokens)) => return bench_decode(&args, &exec, graph, tokens),
        (Some(_), Some(_)) => return Err(miette!("give either --shape or --decode, not both")),
        (None, None) => {
            return Err(miette!(
                help = "--shape batch=1,seq=128 times one forward pass; --decode 64 --prompt-len 128 times generation",
                "what to time: give --shape or --decode"
            ));
        }
    };
    let symbols = parse_shape(&shape)?;
    let inputs = synthetic_inputs(graph, &symbols)?;
    let (runner, load_ms) = Runner::new(graph, &exec)?;
    for _ in 0..args.warmup {
        runner.run(&inputs).into_diagnostic()?;
    }
    let runs = args.runs.unwrap_or(20).max(1);
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        runner.run(&inputs).into_diagnostic()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tokens: u64 = symbols.values().product();
    runner.print_profile();
    let report = json!({
        "engine": runner.name(),
        "compile_ms": runner.compile_ms(),
        "shape": shape,
        "runs": times.len(),
        "median_ms": median,
        "min_ms": times[0],
        "max_ms": times[times.len() - 1],
        "load_ms": load_ms,
        "tokens_per_s": tokens as f64 / median * 1e3,
        "threads": exec.threads.unwrap_or_else(rayon_threads),
        "activations": graph.activations().to_string(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} ({}, {}): median {median:.2} ms, min {:.2} ms over {} runs; ready in {load_ms:.0} ms (compile {:.0} ms)",
            args.spec.display(),
            shape,
            runner.name(),
            times[0],
            times.len(),
            runner.compile_ms()
        );
    }
    Ok(())
}

/// Generation speed as the peers measure it: prefill a prompt of ids `1000..1000 + P` into a
/// fresh KV cache, then feed the ids `2000, 2001, ...` one token per step. `median_ms` is
/// the median over runs of the mean time per decoded token.
fn bench_decode(args: &BenchArgs, exec: &crate::runner::ExecArgs, graph: &Graph, tokens: usize) -> Result<()> {
    let lm = language_model(graph)?;
    let graph = &generation_graph(&lm, graph);
    if tokens == 0 || args.prompt_len == 0 {
        return Err(miette!("--decode and --prompt-len must be at least 1"));
    }
    let (runner, load_ms) = Runner::new(graph, exec)?;
    let prompt: Vec<i64> = (0..args.prompt_len as i64).map(|i| (1000 + i) % lm.vocab as i64).collect();
    let once = || -> Result<(f64, f64)> {
        let mut decoder = Decoder::new(&runner, &lm);
        let t = Instant::now();
        decoder.step(&prompt)?;
        let prefill = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        for i in 0..tokens as i64 {
            decoder.step(&[(2000 + i) % lm.vocab as i64])?;
        }
        Ok((prefill, t.elapsed().as_secs_f64() * 1e3 / tokens as f64))
    };
    for _ in 0..args.warmup.min(1) {
        once()?;
    }
    let runs = args.runs.unwrap_or(3).max(1);
    let (mut prefill, mut per_token): (Vec<f64>, Vec<f64>) =
        (0..runs).map(|_| once()).collect::<Result<Vec<_>>>()?.into_iter().unzip();
    prefill.sort_by(f64::total_cmp);
    per_token.sort_by(f64::total_cmp);
    let (median, prefill_median) = (per_token[runs / 2], prefill[runs / 2]);
    let report = json!({
        "engine": runner.name(),
        "compile_ms": runner.compile_ms(),
        "decode_tokens": tokens,
        "prompt_len": args.prompt_len,
        "runs": runs,
        "median_ms": median,
        "min_ms": per_token[0],
        "prefill_ms": prefill_median,
        "prefill_tokens_per_s": args.prompt_len as f64 / prefill_median * 1e3,
        "tokens_per_s": 1e3 / median,
        "load_ms": load_ms,
        "threads": exec.threads.unwrap_or_else(rayon_threads),
        "activations": graph.activations().to_string(),
    });
    runner.print_profile();
    if args.json {
        println!("{report}");
    } else {
        println!(
            "{} ({tokens} tokens after {}, {}): median {median:.2} ms/token ({:.1} tokens/s); prefill {prefill_median:.1} ms; ready in {load_ms:.0} ms (compile {:.0} ms)",
            args.spec.display(),
            args.prompt_len,
            runner.name(),
            1e3 / median,
            runner.compile_ms()
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `batch=1,seq=128` -> {batch: 1, seq: 128}.
fn parse_shape(s: &str) -> Result<HashMap<String, u64>> {
    s.split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                miette!("--shape takes NAME=SIZE pairs separated by commas, like batch=1,seq=128; got `{kv}`")
            })?;
            let n = v.trim().parse().map_err(|_| miette!("--shape: `{v}` is not a size"))?;
            Ok((k.trim().to_string(), n))
        })
        .collect()
}

/// Inputs of the given sizes: masks (i64 inputs that index no table) all ones, token ids
/// spread deterministically over the table they index, f32 inputs zero.
fn synthetic_inputs(graph: &Graph, symbols: &HashMap<String, u64>) -> Result<HashMap<String, Value>> {
    let mut inputs = HashMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let Op::Input { name } = &node.op else { continue };
        let shape = node
            .ty
            .shape
            .iter()
            .map(|d| match d {
                Dim::Known(n) => Ok(*n as usize),
                Dim::Sym(s) => symbols
                    .get(s.as_ref())
                    .map(|&n| n as usize)
                    .ok_or_else(|| miette!("--shape must give `{s}` (input `{name}` is {})", node.ty)),
            })
            .collect::<Result<Vec<_>>>()?;
        let n: usize = shape.iter().product();
        let value = match node.ty.dtype {
            DType::F32 => Value::F32(kiln_interp::Tensor::zeros(shape)),
            DType::I64 => {
                let rows = graph.users(id).into_iter().find_map(|u| match graph.node(u).op {
                    Op::Gather => graph.node(graph.operands(u)[0]).ty.shape[0].known(),
                    _ => None,
                });
                let data = match rows {
                    Some(rows) => (0..n as u64).map(|i| ((1000 + i * 7919) % rows) as i64).collect(),
                    None => vec![1; n],
                };
                Value::I64 { shape, data }
            }
        };
        inputs.insert(name.clone(), value);
    }
    Ok(inputs)
}
