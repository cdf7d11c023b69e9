//! `kiln generate`: text from a language model, one token at a time over a KV cache.

use crate::load;
use crate::runner::{ExecArgs, Runner};
use kiln_ir::Graph;
use kiln_rt::KvCache;
use kiln_rt::lm::LanguageModel;
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use serde_json::json;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

pub struct GenerateArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub prompt: Option<String>,
    pub prompt_ids: Option<String>,
    pub max_tokens: usize,
    pub sampling: Sampling,
    pub ignore_eos: bool,
    pub json: bool,
    pub tokenizer: Option<PathBuf>,
    pub exec: ExecArgs,
}

/// How the next token is chosen from the logits.
#[derive(Clone, Debug, clap::Args)]
pub struct Sampling {
    /// 0 picks the most likely token (greedy, the default); above 0, samples from
    /// softmax(logits / T).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only among the K most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Sample only among the most likely tokens whose probabilities sum to P (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler (sampling is deterministic for a given seed).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn generate(args: GenerateArgs) -> Result<()> {
    let mut model = load::load_runnable(&args.spec, args.weights.as_deref())?;
    args.exec.apply_activations(&mut model.graph);
    let lm = language_model(&model.graph)?;
    let graph = &generation_graph(&lm, &model.graph);
    args.sampling.validate()?;
    if args.prompt.is_some() && args.prompt_ids.is_some() {
        return Err(miette!("give either --prompt or --prompt-ids, not both"));
    }
    let tokenizer = match (&args.prompt, &args.tokenizer) {
        (Some(_), _) | (None, Some(_)) => Some(model.tokenizer(args.tokenizer.as_deref())?),
        (None, None) => model.tokenizer(None).ok(),
    };
    let prompt: Vec<i64> = match (&args.prompt, &args.prompt_ids) {
        (Some(text), None) => {
            let tok = tokenizer.as_ref().expect("loaded above for --prompt");
            let enc = tok.encode(text.as_str(), true).map_err(|e| miette!("cannot tokenize the prompt: {e}"))?;
            enc.get_ids().iter().map(|&i| i as i64).collect()
        }
        (None, Some(ids)) => kiln_rt::lm::parse_ids(ids).map_err(|e| miette!("{e}"))?,
        (Some(_), Some(_)) => unreachable!("rejected above"),
        (None, None) => {
            return Err(miette!(
                help = "kiln generate SPEC --weights W --prompt \"Once upon a time\" --max-tokens 32",
                "nothing to continue: give --prompt TEXT or --prompt-ids 1,2,3"
            ));
        }
    };
    lm.check_prompt(&prompt).map_err(|e| miette!("{e}"))?;
    let eos = if args.ignore_eos { None } else { model.eos_token_id() };

    let (runner, _) = Runner::new(graph, &args.exec)?;
    let mut decoder = Decoder::new(&runner, &lm);
    let mut sampler = Sampler::new(args.sampling.clone());
    let start = Instant::now();
    let mut logits = decoder.step(&prompt)?;
    let prefill = start.elapsed();
    let mut ids: Vec<i64> = Vec::new();
    let mut printed = String::new();
    let stream = !args.json && tokenizer.is_some();
    if stream && let Some(text) = &args.prompt {
        print!("{text}");
    }
    let decode_start = Instant::now();
    while ids.len() < args.max_tokens {
        let next = sampler.pick(&logits);
        ids.push(next);
        if stream && let Some(tok) = &tokenizer {
            // Decode the whole continuation each time: a token can complete a character
            // that its predecessor started.
            let text = decode(tok, &ids);
            if let Some(new) = text.strip_prefix(printed.as_str()) {
                print!("{new}");
                let _ = std::io::stdout().flush();
            }
            printed = text;
        }
        if Some(next) == eos || ids.len() == args.max_tokens {
            break;
        }
        logits = decoder.step(&[next])?;
    }
    let decode_time = decode_start.elapsed();
    let text = tokenizer.as_ref().map(|t| decode(t, &ids));
    if args.json {
        println!("{}", json!({ "ids": ids, "text": text }));
    } else if stream {
        println!();
    } else {
        println!("{}", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
    }
    let steps = ids.len().saturating_sub(1).max(1);
    eprintln!(
        "{} prompt tokens in {:.1} ms; {} tokens generated, {:.1} ms/token ({} engine, cache {:.1} MB)",
        prompt.len(),
        prefill.as_secs_f64() * 1e3,
        ids.len(),
        decode_time.as_secs_f64() * 1e3 / steps as f64,
        runner.name(),
        decoder.cache.bytes() as f64 / 1e6,
    );
    Ok(())
}

fn decode(tok: &tokenizers::Tokenizer, ids: &[i64]) -> String {
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    tok.decode(&ids, true).unwrap_or_default()
}

/// The graph's generation interface (see [`LanguageModel::of`]), as a diagnostic when it
/// has none.
pub fn language_model(graph: &Graph) -> Result<LanguageModel> {
    LanguageModel::of(graph).map_err(|e| miette!(help = kiln_rt::lm::NotLanguageModel::HELP, "{e}"))
}

/// The graph generation runs: logits at the last position only, so a prompt's other
/// positions skip the output head (see `kiln_passes::cleanup::last_position`). Falls back, with a
/// note, to the whole graph when the rewrite does not apply.
pub fn generation_graph(lm: &LanguageModel, graph: &Graph) -> Graph {
    match kiln_passes::cleanup::last_position::last_position(graph, &lm.logits, 1) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("note: {e}; computing logits at every position");
            graph.clone()
        }
    }
}

/// One sequence being continued: a runner and its KV cache.
pub struct Decoder<'a> {
    runner: &'a Runner<'a>,
    lm: &'a LanguageModel,
    pub cache: KvCache,
}

impl<'a> Decoder<'a> {
    pub fn new(runner: &'a Runner<'a>, lm: &'a LanguageModel) -> Decoder<'a> {
        Decoder { runner, lm, cache: KvCache::new() }
    }

    /// Feeds `ids` after the tokens so far; returns the logits at the last of them.
    pub fn step(&mut self, ids: &[i64]) -> Result<Vec<f32>> {
        let inputs = self.lm.step_inputs(ids);
        let outputs = self
            .runner
            .run_cached(&inputs, &mut self.cache)
            .into_diagnostic()
            .wrap_err_with(|| format!("generation failed at position {}", self.cache.positions()))?;
        self.lm.last_logits(outputs).ok_or_else(|| miette!("the model produced no f32 logits"))
    }
}

impl Sampling {
    fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(miette!("--temperature must be a finite number >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(miette!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Greedy or seeded sampling.
struct Sampler {
    config: Sampling,
    state: u64,
}

impl Sampler {
    fn new(config: Sampling) -> Sampler {
        let state = config.seed ^ 0x9E37_79B9_7F4A_7C15;
        Sampler { config, state }
    }

    /// A uniform number in [0, 1) (splitmix64).
    fn uniform(&mut self) -> f64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 11) as f64) / (1u64 << 53) as f64
    }

    fn pick(&mut self, logits: &[f32]) -> i64 {
        if self.config.temperature == 0.0 {
            return kiln_rt::lm::argmax(logits);
        }
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        if self.config.top_k > 0 {
            order.truncate(self.config.top_k);
        }
        let t = self.config.temperature as f64;
        let max = logits[order[0]] as f64;
        let mut probs: Vec<f64> = order.iter().map(|&i| ((logits[i] as f64 - max) / t).exp()).collect();
        let total: f64 = probs.iter().sum();
        let mut kept = 0;
        let mut mass = 0.0;
        for p in probs.iter_mut() {
            *p /= total;
            mass += *p;
            kept += 1;
            if mass >= self.config.top_p as f64 {
                break;
            }
        }
        let r = self.uniform() * mass;
        let mut acc = 0.0;
        for (&i, &p) in order.iter().zip(&probs[..kept]) {
            acc += p;
            if r < acc {
                return i as i64;
            }
        }
        order[kept - 1] as i64
    }
}
