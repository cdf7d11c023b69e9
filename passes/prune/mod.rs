//! `prune`: sparsity in linear weights. A layer's weight `W [rows, cols]` becomes a sparse
//! weight ([`kiln_ir::sparse`]): the values it keeps, and a bitmask saying where they are.
//! The node keeps the layer's name and its `main` role; the linears that read it are
//! unchanged.
//!
//! - **Unstructured** (`sparsity=S`): per output row, as Wanda compares weights within each
//!   row, the `ceil((1 - S) cols)` highest-scoring weights are kept. The weight's pattern is
//!   `n:cols` with `n` that count, the format's unstructured form.
//! - **N:M** (`pattern=2:4`, `4:8`, any `N:M`): in every group of `M` consecutive weights
//!   along a row, the `N` highest-scoring are kept.
//! - **Methods** (`method=`):
//!   - `magnitude` keeps the largest `|W_ij|`;
//!   - `wanda` the largest `|W_ij| ||X_j||_2`, with `||X_j||_2` the norm of input column
//!     `j` over the calibration rows (the square root of the diagonal of the input's Gram
//!     matrix, from the model before the pass);
//!   - `sparsegpt` ([`sparsegpt`]) chooses the mask by OBS saliency as GPTQ's sweep goes,
//!     and updates the kept weights to make up for the removed ones. It runs layer by layer
//!     in execution order ([`Executor::sequential`]): each layer's `H` is the Gram matrix of
//!     the inputs the model pruned so far feeds it, summed over the linears that read it.
//!     The default with `--calib`.
//!
//!   Ties go to the lower column. With calibration, each layer's relative output error
//!   `trace(dW H dW^T) / trace(W H W^T)` is measured and reported, on the statistics its
//!   method used (the model before the pass for magnitude and Wanda).
//! - **Overrides**: `--override PATTERN=dense` leaves a layer alone; `PATTERN=0.3` prunes it
//!   unstructured at that sparsity whatever the call says.
//! - **Structured** (`heads=F`, `channels=F`): whole attention heads and FFN channels go and
//!   the matrices around them shrink ([`structured`]); a separate call from the masks.
//! - **Uniform by default.** Every layer gets the call's sparsity or pattern. With
//!   `adaptive=true` (unstructured only), `sparsity=S` is the average over the pruned
//!   weights and each layer's own is chosen by dynamic programming over its error at nine
//!   levels ([`adaptive_counts`]). Off by default: that error is each layer's own, and on
//!   SmolLM2 at 0.5 the allocation it chose (0.3 to 0.7) gave 1.876x perplexity against
//!   uniform's 1.677x (MiniLM: cosine 0.895 against 0.897); what a layer's error does to the
//!   model's output is what it misses (docs/measurements.md, section 7.4).
//!
//! The candidates are the layers whose main weight is a dense matrix read only by linears
//! (as their weight): tables read by rows (embeddings, a tied head) stay, with a note naming
//! them. A layer whose rows the pattern cannot split (the mask stores whole bytes, so 8 must
//! divide `cols`, and so must `M`) stays dense and the report says why. Factorized and
//! already sparse layers are left as they are, with a note; a layer that carries weights
//! besides its main one (LoRC corrections) is an error: prune runs before the pass that
//! added them.
//!
//! Kept values are stored in the weight's own float format (f32, f16 or bf16); a weight the
//! checkpoint stores in an integer format (a GGUF's Q4_1) is decoded and its kept values
//! stored f32, with a note (a `quantize` after it stores them in an integer format). The
//! engines run N:2N patterns over rows of a multiple of 32 by a sparse kernel for the few
//! rows of decode (`kiln_exec::sparse`), and every other sparse linear on its dense value:
//! smaller, not faster; the report says which.

use crate::calibration::{Calibration, Executor, Paired, Weighting};
use crate::layers::{ReadByLinears, apply_overrides, read_by_linears};
use crate::options::{Args, OptionHelp, Options};
use crate::quantize::gptq::relative_output_error;
use crate::{Context, Pass, PassError, PassReport};
use kiln_ir::sparse::pack;
use kiln_ir::{Format, Graph, Layer, NodeId, Op, Sparse, TensorData};
use rayon::prelude::*;
use structured::{Refit, Structured};

pub mod drop;
pub mod sparsegpt;
pub mod structured;

const PASS: &str = "prune";

/// The pass as a pipeline names it: `prune(...)`.
pub struct Prune;

impl Pass for Prune {
    const NAME: &'static str = PASS;
    const SUMMARY: &'static str = "sparsify linear weights, stored as kept values and a bitmask: unstructured per output row (sparsity=S) or N of every M along a row (pattern=2:4|4:8|N:M), by SparseGPT (masks and weight updates layer by layer on the pruned model's inputs), Wanda (|w| times the input's norm) or magnitude; uniform across layers, or allocated by adaptive=true; or whole attention heads and FFN channels (heads=F, channels=F), the matrices shrinking and their consumers refit; --override PATTERN=S|dense fixes layers";
    type Options = PruneOptions;
    const OVERRIDES: Option<crate::OverrideCheck> = Some(|v| v.parse::<Fixed>().map(|_| ()));

    fn probes(options: &PruneOptions) -> bool {
        options.structured.is_some_and(|s| s.refit != Refit::None)
    }

    fn run(graph: &mut Graph, options: &PruneOptions, ctx: &Context) -> Result<PassReport, PassError> {
        let overrides = ctx.overrides_as::<Fixed>(PASS)?;
        if let Some(s) = &options.structured {
            return Ok(PassReport::Structured(structured::prune_structured(graph, s, &overrides, ctx)?));
        }
        let needs =
            |what: &str| PassError::not_applicable(PASS, format!("method={} {what}: pass --calib", options.method));
        let progress = |done: usize, total: usize| (ctx.progress)(done, total, "pruning");
        let report = match options.method {
            Method::SparseGpt => {
                let executor = ctx.executor().ok_or_else(|| needs("runs on the inputs of each layer"))?;
                // The allocation's errors come from the model before the pass.
                let calibration = if options.adaptive { ctx.calibration(graph)? } else { None };
                let statistics = Statistics::Sequential(executor, &progress);
                prune_with(graph, options, &overrides, statistics, calibration.as_deref())?
            }
            Method::Wanda => {
                let calibration =
                    ctx.calibration(graph)?.ok_or_else(|| needs("scores weights by their inputs' norms"))?;
                prune(graph, options, &overrides, Statistics::OneShot(&calibration))?
            }
            // With calibration, only to measure each layer's error.
            Method::Magnitude => match ctx.calibration(graph)? {
                Some(calibration) => prune(graph, options, &overrides, Statistics::OneShot(&calibration))?,
                None => prune(graph, options, &overrides, Statistics::None)?,
            },
        };
        Ok(PassReport::Prune(report))
    }
}

/// How weights are scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `|W_ij|`.
    Magnitude,
    /// `|W_ij| ||X_j||_2` over the calibration rows.
    Wanda,
    /// GPTQ's sweep with a mask, layer by layer on the pruned model's inputs ([`sparsegpt`]).
    SparseGpt,
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Method::Magnitude => "magnitude",
            Method::Wanda => "wanda",
            Method::SparseGpt => "sparsegpt",
        })
    }
}

/// What every pruned layer keeps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// Unstructured: each row keeps `ceil((1 - S) cols)` weights.
    Sparsity(f64),
    /// `n` of every `m` consecutive weights along a row.
    Pattern(u64, u64),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sparsity(s) => write!(f, "sparsity={s}"),
            Target::Pattern(n, m) => write!(f, "pattern={n}:{m}"),
        }
    }
}

/// An override's value: a sparsity `S` (unstructured) or `dense`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fixed {
    Sparsity(f64),
    Dense,
}

impl std::str::FromStr for Fixed {
    type Err = String;
    fn from_str(s: &str) -> Result<Fixed, String> {
        if s == "dense" {
            return Ok(Fixed::Dense);
        }
        sparsity(s).map(Fixed::Sparsity).map_err(|_| format!("`{s}` is not a sparsity S (0 < S < 1) or `dense`"))
    }
}

/// A sparsity: a fraction strictly between 0 and 1.
fn sparsity(v: &str) -> Result<f64, String> {
    v.parse::<f64>().ok().filter(|s| *s > 0.0 && *s < 1.0).ok_or_else(|| "expected a fraction in (0, 1)".to_string())
}

/// The options of `prune(...)`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PruneOptions {
    pub method: Method,
    pub target: Target,
    /// SparseGPT's damping of `H`, relative to its mean diagonal ([`DAMP`]).
    pub damp: f64,
    /// `heads=` and `channels=`: whole units removed instead ([`structured`]).
    pub structured: Option<Structured>,
    /// Unstructured sparsity allocated across layers ([`adaptive_counts`]).
    pub adaptive: bool,
}

impl Options for PruneOptions {
    const HELP: &'static [OptionHelp] = &[
        OptionHelp {
            name: "sparsity",
            values: "S",
            default: "0.5 when no pattern is given",
            help: "unstructured: every row of every pruned layer keeps its ceil((1 - S) x cols) highest-scoring weights (0 < S < 1), the same S for every layer",
        },
        OptionHelp {
            name: "pattern",
            values: "2:4|4:8|N:M",
            default: "none",
            help: "semi-structured: in every group of M consecutive weights along a row, keep the N highest-scoring (layers whose rows M or 8 does not divide stay dense)",
        },
        OptionHelp {
            name: "method",
            values: "sparsegpt|wanda|magnitude",
            default: "sparsegpt with --calib, else magnitude",
            help: "sparsegpt: choose the mask by GPTQ's sweep and update the kept weights to make up for the removed ones, layer by layer on the inputs of the model pruned so far; wanda: keep the largest |w| x ||x||, ||x|| the norm of the input column over the calibration rows; magnitude: keep the largest |w|",
        },
        OptionHelp {
            name: "adaptive",
            values: "true|false",
            default: "false",
            help: "sparsity=S only: S is the average over the pruned weights, each layer's own sparsity (S - 0.2 to S + 0.2 in steps of 0.05) chosen by dynamic programming over its error at each level (the removed weights' w^2 x ||x||^2 on the calibration rows, relative to the layer's); needs --calib",
        },
        OptionHelp {
            name: "heads",
            values: "F",
            default: "none",
            help: "structured: remove that fraction of every attention's heads (with grouped key/value heads, query heads, the same number per group), the lowest-contributing on the calibration rows; q, k, v and the output projection shrink",
        },
        OptionHelp {
            name: "channels",
            values: "F",
            default: "none",
            help: "structured: remove that fraction of every FFN's hidden channels (a multiple of 32 stays), the lowest-contributing; the up/gate and down projections shrink",
        },
        OptionHelp {
            name: "refit",
            values: "reference|own|none",
            default: "own with --calib, else none",
            help: "structured: refit each consumer of removed units (output or down projection) by least squares on the pruned model's inputs, to its original weight's output on those inputs (own) or to the original model's output of the layer (reference; it fits the calibration text more closely and did worse on other text); each refit is kept only where the end-to-end probe improves",
        },
        OptionHelp {
            name: "damp",
            values: "D",
            default: "0.1",
            help: "sparsegpt: D x the mean diagonal is added to the inputs' Gram matrix before the sweep; larger trusts the calibration rows less (the paper's 0.01 fits them closely and does worse on text of another kind)",
        },
    ];

    fn parse(args: &mut Args) -> Result<PruneOptions, PassError> {
        let calibrated = args.calibrated();
        let fraction = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|f| *f > 0.0 && *f < 1.0)
                .ok_or_else(|| "expected a fraction in (0, 1)".to_string())
        };
        let heads = args.get_with("heads", fraction)?;
        let channels = args.get_with("channels", fraction)?;
        if heads.is_some() || channels.is_some() {
            for other in ["sparsity", "pattern", "method", "damp"] {
                if args.text(other).is_some() {
                    return Err(args.error(format!(
                        "{other}= is for masks within rows; heads= and channels= remove whole units (for both, run two calls: prune(channels=..), prune(sparsity=..))"
                    )));
                }
            }
            let refit = match args.text("refit") {
                None if calibrated => Refit::Own,
                None | Some("none") => Refit::None,
                Some(r @ ("own" | "reference")) if !calibrated => {
                    return Err(args.error(format!("refit={r} fits on calibration inputs: pass --calib")));
                }
                Some("own") => Refit::Own,
                Some("reference") => Refit::Reference,
                Some(v) => return Err(args.invalid("refit", v)),
            };
            let structured = Some(Structured { heads, channels, refit });
            return Ok(PruneOptions {
                method: Method::Magnitude,
                target: Target::Sparsity(0.0),
                damp: DAMP,
                structured,
                adaptive: false,
            });
        }
        if args.text("refit").is_some() {
            return Err(
                args.error("refit= refits the consumers of removed heads and channels: give heads= or channels=")
            );
        }
        let method = match args.text("method") {
            None if calibrated => Method::SparseGpt,
            None | Some("magnitude") => Method::Magnitude,
            Some("wanda") => Method::Wanda,
            Some("sparsegpt") => Method::SparseGpt,
            Some(v) => return Err(args.invalid("method", v)),
        };
        if method != Method::Magnitude && !calibrated {
            return Err(args.error(format!("method={method} needs the inputs of each layer: pass --calib")));
        }
        let s = args.get_with("sparsity", sparsity)?;
        let pattern = args.get_with("pattern", |v| {
            let (n, m) = v.split_once(':').ok_or("expected N:M, e.g. 2:4")?;
            let (n, m) = (n.parse::<u64>().ok(), m.parse::<u64>().ok());
            match (n, m) {
                (Some(n), Some(m)) if n >= 1 && n < m => Ok((n, m)),
                _ => Err("expected N:M with 1 <= N < M, e.g. 2:4".to_string()),
            }
        })?;
        let damp = args.get_with("damp", |v| {
            v.parse::<f64>()
                .ok()
                .filter(|d| d.is_finite() && *d >= 0.0)
                .ok_or_else(|| "expected a number >= 0".to_string())
        })?;
        if damp.is_some() && method != Method::SparseGpt {
            return Err(args.error(format!("damp= is SparseGPT's damping; method={method} has none")));
        }
        let target = match (s, pattern) {
            (Some(_), Some(_)) => return Err(args.error("give sparsity or pattern, not both")),
            (Some(s), None) => Target::Sparsity(s),
            (None, Some((n, m))) => Target::Pattern(n, m),
            (None, None) => Target::Sparsity(0.5),
        };
        let adaptive = match args.text("adaptive") {
            None | Some("false") => false,
            Some("true") if !calibrated => {
                return Err(args.error("adaptive=true measures each layer's error on calibration inputs: pass --calib"));
            }
            Some("true") => true,
            Some(v) => return Err(args.invalid("adaptive", v)),
        };
        if adaptive && matches!(target, Target::Pattern(..)) {
            return Err(args.error("adaptive=true allocates unstructured sparsity: give sparsity=S, not a pattern"));
        }
        Ok(PruneOptions { method, target, damp: damp.unwrap_or(DAMP), structured: None, adaptive })
    }
}

/// What `prune` did to one candidate layer.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneLayer {
    pub name: String,
    pub rows: u64,
    pub cols: u64,
    /// The stored pattern (`2:4`, or `192:384` for unstructured), `None` if dense.
    pub pattern: Option<String>,
    /// The fraction of the weights kept (1 when dense).
    pub kept: f64,
    /// Stored values before and after (`rows x cols`, then the values tensor's size).
    pub params_before: u64,
    pub params: u64,
    /// Bytes of the weight's tensors before and after (the mask's included).
    pub bytes_before: u64,
    pub bytes: u64,
    /// Bits per weight as stored ([`Sparse::bits_per_weight`]; the format's when dense).
    pub bits_per_weight: f64,
    /// With calibration, the relative output error of the pruned layer on the statistics
    /// its method used, `trace(dW H dW^T) / trace(W H W^T)`.
    pub error: Option<f64>,
    /// Why the layer stayed dense, if it did.
    pub why_dense: Option<String>,
}

/// The report of a `prune` call.
#[derive(Clone, Debug, PartialEq)]
pub struct PruneReport {
    pub method: Method,
    pub target: Target,
    pub layers: Vec<PruneLayer>,
    /// Over the candidate layers: stored values and bytes before and after.
    pub params_before: u64,
    pub params: u64,
    pub bytes_before: u64,
    pub bytes: u64,
    pub notes: Vec<String>,
}

impl PruneReport {
    /// Layers made sparse.
    pub fn pruned(&self) -> usize {
        self.layers.iter().filter(|l| l.pattern.is_some()).count()
    }

    /// The fraction of the candidate layers' weights removed.
    pub fn sparsity(&self) -> f64 {
        let total: f64 = self.layers.iter().map(|l| (l.rows * l.cols) as f64).sum();
        let kept: f64 = self.layers.iter().map(|l| l.kept * (l.rows * l.cols) as f64).sum();
        if total == 0.0 { 0.0 } else { 1.0 - kept / total }
    }
}

/// A candidate layer: its name, its main weight, the linears that read it, its values.
struct Candidate {
    name: String,
    weight: NodeId,
    tensor: String,
    /// The weight's stored format, and the format its kept values are stored in.
    format: Format,
    values_format: Format,
    linears: Vec<NodeId>,
    rows: u64,
    cols: u64,
    values: Vec<f32>,
}

/// Where `prune` gets the statistics its method needs.
pub enum Statistics<'a> {
    /// None: magnitude, without calibration.
    None,
    /// Of the model before the pass: Wanda's norms, and each layer's measured error.
    OneShot(&'a Calibration),
    /// SparseGPT's: the executor runs the model pruned so far, in execution order, and
    /// `progress(done, total)` counts its sites.
    Sequential(&'a dyn Executor, &'a (dyn Fn(usize, usize) + Sync)),
}

/// A pruned layer before it is written: its values with the removed ones 0, the mask, and
/// the measured error.
struct Outcome {
    values: Vec<f32>,
    keep: Vec<bool>,
    error: Option<f64>,
}

/// SparseGPT's damping of `H` by default, relative to its mean diagonal. The paper's
/// 0.01 fits the calibration text closely: on SmolLM2 at 50%, perplexity on the calibration
/// text itself was 1.19x the dense model's, and on held-out text of another domain 1.78x,
/// worse than Wanda's 1.75x; with 0.1, 1.68x on held-out text (MiniLM: cosine 0.881 with
/// 0.01, 0.897 with 0.1, 64 calibration sentences). docs/measurements.md, section 7.
pub const DAMP: f64 = 0.1;

/// Prunes `graph`'s candidate layers as `options` and `overrides` say (see the module
/// documentation), with the statistics `options.method` needs.
pub fn prune(
    graph: &mut Graph,
    options: &PruneOptions,
    overrides: &[(String, Fixed)],
    statistics: Statistics<'_>,
) -> Result<PruneReport, PassError> {
    let adaptive = match statistics {
        Statistics::OneShot(c) => Some(c),
        _ => None,
    };
    prune_with(graph, options, overrides, statistics, adaptive)
}

/// [`prune`], with the statistics the layer-adaptive allocation measures errors on.
fn prune_with(
    graph: &mut Graph,
    options: &PruneOptions,
    overrides: &[(String, Fixed)],
    statistics: Statistics<'_>,
    adaptive_statistics: Option<&Calibration>,
) -> Result<PruneReport, PassError> {
    let fail = |message: String| PassError::not_applicable(PASS, message);
    let (candidates, mut notes) = candidates(graph).map_err(fail)?;
    if candidates.is_empty() {
        return Err(fail("no layer is a dense matrix read only by linears".into()));
    }
    let names: Vec<&str> = candidates.iter().map(|c| c.name.as_str()).collect();
    let fixed = apply_overrides(&names, overrides).map_err(fail)?;
    let mut patterns: Vec<Result<(u64, u64), String>> = candidates
        .iter()
        .zip(&fixed)
        .map(|(c, fixed)| match fixed {
            Some(Fixed::Dense) => Err("--override says dense".to_string()),
            Some(Fixed::Sparsity(s)) => pattern_of(Target::Sparsity(*s), c.cols),
            None => pattern_of(options.target, c.cols),
        })
        .collect();
    let adapted = if let (true, Target::Sparsity(s)) = (options.adaptive, options.target) {
        let calibration = adaptive_statistics.ok_or_else(|| {
            fail("adaptive=true measures each layer's error on calibration inputs: pass --calib".into())
        })?;
        let free: Vec<bool> = fixed.iter().map(|f| f.is_none()).collect();
        let (counts, range) = adaptive_counts(graph, &candidates, &patterns, &free, s, calibration).map_err(fail)?;
        for (p, count) in patterns.iter_mut().zip(counts) {
            if let (Ok((n, _)), Some(c)) = (p.as_mut(), count) {
                *n = c;
            }
        }
        notes.push(format!(
            "layer-adaptive sparsity: from {:.2} to {:.2} across layers, {s} over the pruned weights (dynamic programming over each layer's error at 9 levels)",
            range.0, range.1
        ));
        true
    } else {
        false
    };
    let outcomes = match (options.method, statistics) {
        (Method::SparseGpt, Statistics::Sequential(executor, progress)) => {
            sequential(graph, &candidates, &patterns, options.damp, executor, progress).map_err(fail)?
        }
        (Method::SparseGpt, _) => {
            return Err(fail(
                "method=sparsegpt runs the model layer by layer: it needs an executor (pass --calib)".into(),
            ));
        }
        (method, statistics) => {
            let calibration = match statistics {
                Statistics::OneShot(c) => Some(c),
                _ if method == Method::Wanda => {
                    return Err(fail("method=wanda scores weights by their inputs' norms: pass --calib".into()));
                }
                _ => None,
            };
            one_shot(graph, &candidates, &patterns, method, calibration).map_err(fail)?
        }
    };
    let mut report = PruneReport {
        method: options.method,
        target: options.target,
        layers: vec![],
        params_before: 0,
        params: 0,
        bytes_before: 0,
        bytes: 0,
        notes: vec![],
    };
    for ((c, pattern), outcome) in candidates.iter().zip(&patterns).zip(outcomes) {
        let bytes_before = graph.store.get(&c.tensor).map_or(0, |t| t.bytes.len() as u64);
        let mut layer = PruneLayer {
            name: c.name.clone(),
            rows: c.rows,
            cols: c.cols,
            pattern: None,
            kept: 1.0,
            params_before: c.rows * c.cols,
            params: c.rows * c.cols,
            bytes_before,
            bytes: bytes_before,
            bits_per_weight: c.format.bits_per_weight(),
            error: None,
            why_dense: None,
        };
        match (pattern, outcome) {
            (Err(why), _) => layer.why_dense = Some(why.clone()),
            (Ok((n, m)), Some(o)) => {
                let (n, m) = (*n, *m);
                let kept = o.keep.iter().filter(|&&k| k).count();
                let sparse = Sparse { n, m, mask: String::new(), mask_checksum: None };
                rewrite(graph, c, (n, m), &o.values, &o.keep).map_err(fail)?;
                let new = graph.layers.get(&c.name).and_then(Layer::main).expect("the layer's new weight");
                let Op::Weight(w) = &graph.node(new).op else { unreachable!("a weight") };
                layer.bytes = w.stored_bytes(&graph.store);
                layer.params = c.rows * (c.cols / m * n);
                layer.pattern = Some(sparse.pattern());
                layer.kept = kept as f64 / (c.rows * c.cols) as f64;
                layer.bits_per_weight = sparse.bits_per_weight(c.values_format);
                layer.error = o.error;
            }
            (Ok(_), None) => unreachable!("every layer with a pattern is pruned"),
        }
        report.params_before += layer.params_before;
        report.params += layer.params;
        report.bytes_before += layer.bytes_before;
        report.bytes += layer.bytes;
        report.layers.push(layer);
    }
    graph.remove_dead();
    let read = graph.read_tensors();
    for c in &candidates {
        if !read.contains(&c.tensor) {
            graph.store.remove(&c.tensor);
        }
    }
    let dense: Vec<String> =
        report.layers.iter().filter_map(|l| l.why_dense.as_ref().map(|why| format!("{} ({why})", l.name))).collect();
    if !dense.is_empty() {
        notes.push(format!("{} of {} layers stay dense: {}", dense.len(), report.layers.len(), dense.join(", ")));
    }
    if !adapted {
        notes.push(format!(
            "uniform {}: every pruned layer gets the same {}{}",
            match options.target {
                Target::Sparsity(_) => "sparsity",
                Target::Pattern(..) => "pattern",
            },
            options.target,
            match options.target {
                Target::Sparsity(_) => " (adaptive=true allocates it across layers)",
                Target::Pattern(..) => "",
            }
        ));
    }
    notes.push(
        "N:2N patterns (2:4, 4:8, 8:16) over rows of a multiple of 32 run the sparse kernel for up to 4 rows (decode) and their dense value for more; other patterns (unstructured rows) always run their dense value: smaller, not faster"
            .into(),
    );
    report.notes = notes;
    kiln_ir::verify(graph).map_err(|e| PassError::Invalid { pass: PASS, message: e.to_string() })?;
    Ok(report)
}

/// The inputs of the linears that read a candidate (each once, in order).
fn inputs_of(graph: &Graph, c: &Candidate) -> Vec<NodeId> {
    let mut inputs: Vec<NodeId> = c.linears.iter().map(|&l| graph.operands(l)[0]).collect();
    inputs.sort();
    inputs.dedup();
    inputs
}

/// Magnitude and Wanda: each layer's mask from its scores, no weight changed; with
/// `calibration`, each layer's error measured on it.
fn one_shot(
    graph: &Graph,
    candidates: &[Candidate],
    patterns: &[Result<(u64, u64), String>],
    method: Method,
    calibration: Option<&Calibration>,
) -> Result<Vec<Option<Outcome>>, String> {
    candidates
        .par_iter()
        .zip(patterns)
        .map(|(c, pattern)| {
            let Ok((n, m)) = *pattern else { return Ok(None) };
            let gram = calibration.map(|cal| {
                cal.summed(&inputs_of(graph, c)).ok_or_else(|| {
                    format!("layer {}: the calibration runs gathered no statistics of its input", c.name)
                })
            });
            let gram = gram.transpose()?;
            let scores = match (method, &gram) {
                (Method::Wanda, Some(gram)) => wanda_scores(&c.values, c.cols as usize, &gram.diagonal()),
                _ => c.values.iter().map(|w| w.abs() as f64).collect(),
            };
            let keep = choose(&scores, c.cols as usize, n as usize, m as usize);
            let values: Vec<f32> = c.values.iter().zip(&keep).map(|(&v, &k)| if k { v } else { 0.0 }).collect();
            let (rows, cols) = (c.rows as usize, c.cols as usize);
            let error = gram.map(|g| relative_output_error(&c.values, &values, rows, cols, &g.sum));
            Ok(Some(Outcome { values, keep, error }))
        })
        .collect()
}

/// SparseGPT in execution order: the executor runs the model, each layer pruned once the
/// inputs of every linear that reads it are computed (on the model pruned so far), with `H`
/// their Gram matrices summed; the pruned values replace the layer's for the rest of the run.
fn sequential(
    graph: &Graph,
    candidates: &[Candidate],
    patterns: &[Result<(u64, u64), String>],
    damp: f64,
    executor: &dyn Executor,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<Vec<Option<Outcome>>, String> {
    let inputs: Vec<Vec<NodeId>> = candidates.iter().map(|c| inputs_of(graph, c)).collect();
    let mut pending: Vec<usize> =
        inputs.iter().zip(patterns).map(|(i, p)| if p.is_ok() { i.len() } else { 0 }).collect();
    let mut sites: Vec<NodeId> =
        inputs.iter().zip(&pending).filter(|(_, p)| **p > 0).flat_map(|(i, _)| i.iter().copied()).collect();
    sites.sort();
    sites.dedup();
    let mut grams: Vec<Option<Vec<f64>>> = vec![None; candidates.len()];
    let mut outcomes: Vec<Option<Outcome>> = (0..candidates.len()).map(|_| None).collect();
    let mut refit = |site: NodeId, paired: &Paired| -> Result<Vec<(NodeId, Vec<f32>)>, String> {
        let mut ready = Vec::new();
        for (i, reads) in inputs.iter().enumerate() {
            if pending[i] == 0 || !reads.contains(&site) {
                continue;
            }
            match &mut grams[i] {
                Some(sum) => sum.iter_mut().zip(&paired.own).for_each(|(s, v)| *s += v),
                none => *none = Some(paired.own.clone()),
            }
            pending[i] -= 1;
            if pending[i] == 0 {
                ready.push(i);
            }
        }
        let pruned: Vec<(usize, Outcome)> = ready
            .par_iter()
            .map(|&i| {
                let (c, h) = (&candidates[i], grams[i].as_deref().expect("summed above"));
                let Ok((n, m)) = patterns[i] else { unreachable!("only layers with a pattern are pending") };
                let (rows, cols) = (c.rows as usize, c.cols as usize);
                let p = sparsegpt::sparsegpt(&c.values, rows, cols, h, (n as usize, m as usize), damp)
                    .map_err(|e| format!("layer {}: SparseGPT: {e}", c.name))?;
                let error = relative_output_error(&c.values, &p.values, rows, cols, h);
                Ok((i, Outcome { values: p.values, keep: p.keep, error: Some(error) }))
            })
            .collect::<Result<_, String>>()?;
        let mut new = Vec::with_capacity(pruned.len());
        for (i, o) in pruned {
            grams[i] = None;
            new.push((candidates[i].weight, o.values.clone()));
            outcomes[i] = Some(o);
        }
        Ok(new)
    };
    executor.sequential(graph, &sites, None, Weighting::Uniform, &mut refit, progress)?;
    for ((c, p), o) in candidates.iter().zip(patterns).zip(&outcomes) {
        if p.is_ok() && o.is_none() {
            return Err(format!("layer {}: the calibration run never computed the input of its linears", c.name));
        }
    }
    Ok(outcomes)
}

/// The stored pattern of `target` over rows of `cols`: `n:m`, or why the layer stays dense.
/// The weights a row of `cols` keeps at sparsity `s`: `ceil((1 - s) cols)`, at least 1.
fn kept_per_row(s: f64, cols: u64) -> u64 {
    // The epsilon keeps 0.5 of 64 at 32, whatever the rounding of 1 - S.
    ((1.0 - s) * cols as f64 - 1e-9).ceil().max(1.0) as u64
}

fn pattern_of(target: Target, cols: u64) -> Result<(u64, u64), String> {
    let (n, m) = match target {
        Target::Sparsity(s) => (kept_per_row(s, cols), cols),
        Target::Pattern(n, m) => (n, m),
    };
    if let Target::Sparsity(s) = target
        && n >= cols
    {
        return Err(format!("sparsity {s} keeps every weight of a row of {cols}"));
    }
    Sparse::check(n, m, cols).map_err(|e| e.to_string())?;
    Ok((n, m))
}

/// The least and the greatest sparsity of the layers an allocation chose.
type SparsityRange = (f64, f64);

/// The levels of the layer-adaptive allocation around the target sparsity.
const LEVELS: [f64; 9] = [-0.2, -0.15, -0.1, -0.05, 0.0, 0.05, 0.1, 0.15, 0.2];

/// Layer-adaptive sparsity (`adaptive=true`): the weights each row of each `free` candidate
/// keeps, so that the pruned weights' sparsity is `s` over them all with the least total
/// error, and the range of the layers' sparsities. Layer `l` at sparsity `s_l` (`s` plus one
/// of [`LEVELS`], within 0.05..0.95) keeps `c_l = ceil((1 - s_l) cols)` weights per row; its
/// error is that of removing each row's `cols - c_l` weights of least `w_ij^2 d_j` (`d` the
/// diagonal of its input's Gram matrix: Wanda's score squared, the output error of removing
/// one weight with the others fixed), relative to `sum_ij w_ij^2 d_j`. The choice per layer
/// is [`crate::allocate`]'s dynamic program over kept weights, within the uniform
/// allocation's count.
fn adaptive_counts(
    graph: &Graph,
    candidates: &[Candidate],
    patterns: &[Result<(u64, u64), String>],
    free: &[bool],
    s: f64,
    calibration: &Calibration,
) -> Result<(Vec<Option<u64>>, SparsityRange), String> {
    use crate::allocate::{Choice, Layer as AllocLayer, allocate};
    let chosen: Vec<usize> = (0..candidates.len())
        .filter(|&i| free[i] && matches!(patterns[i], Ok((_, m)) if m == candidates[i].cols))
        .collect();
    let levels: Vec<Vec<(u64, f64)>> = chosen
        .par_iter()
        .map(|&i| {
            let c = &candidates[i];
            let (rows, cols) = (c.rows as usize, c.cols as usize);
            let gram = calibration
                .summed(&inputs_of(graph, c))
                .ok_or_else(|| format!("layer {}: the calibration runs gathered no statistics of its input", c.name))?;
            let d = gram.diagonal();
            // Per row, the errors of its weights in increasing order, summed as a prefix.
            let mut prefix = vec![0f64; rows * (cols + 1)];
            let mut total = 0.0;
            for (r, row) in c.values.chunks(cols).enumerate() {
                let mut e: Vec<f64> = row.iter().zip(&d).map(|(&w, &d)| (w as f64).powi(2) * d.max(0.0)).collect();
                e.sort_by(f64::total_cmp);
                let p = &mut prefix[r * (cols + 1)..(r + 1) * (cols + 1)];
                for j in 0..cols {
                    p[j + 1] = p[j] + e[j];
                }
                total += p[cols];
            }
            let total = if total > 0.0 { total } else { 1.0 };
            Ok(LEVELS
                .iter()
                .map(|l| (s + l).clamp(0.05, 0.95))
                .map(|sl| {
                    let keep = (kept_per_row(sl, cols as u64) as usize).min(cols - 1);
                    let removed = cols - keep;
                    let error: f64 = (0..rows).map(|r| prefix[r * (cols + 1) + removed]).sum();
                    ((rows * keep) as u64, error / total)
                })
                .collect::<Vec<(u64, f64)>>())
        })
        .collect::<Result<_, String>>()?;
    let layers: Vec<AllocLayer> = levels
        .iter()
        .map(|l| AllocLayer {
            choices: l.iter().map(|&(bits, sensitivity)| Choice { bits, sensitivity }).collect(),
            fixed: None,
        })
        .collect();
    // The budget: what the uniform sparsity keeps.
    let budget: u64 = chosen
        .iter()
        .map(|&i| match patterns[i] {
            Ok((n, _)) => n * candidates[i].rows,
            Err(_) => 0,
        })
        .sum();
    let allocation = allocate(&layers, budget).map_err(|e| e.to_string())?;
    let mut counts = vec![None; candidates.len()];
    let (mut lo, mut hi) = (1f64, 0f64);
    for ((&i, l), &pick) in chosen.iter().zip(&levels).zip(&allocation.picks) {
        let c = &candidates[i];
        let keep = l[pick].0 / c.rows;
        let sparsity = 1.0 - keep as f64 / c.cols as f64;
        (lo, hi) = (lo.min(sparsity), hi.max(sparsity));
        counts[i] = Some(keep);
    }
    Ok((counts, (lo, hi)))
}

/// Wanda's scores of a row-major `[rows, cols]` weight: `|W_ij| sqrt(diagonal_j)`, where
/// `diagonal` holds each input column's sum of squares over the calibration rows.
pub fn wanda_scores(values: &[f32], cols: usize, diagonal: &[f64]) -> Vec<f64> {
    assert_eq!(diagonal.len(), cols, "the statistics of another width");
    let norms: Vec<f64> = diagonal.iter().map(|d| d.max(0.0).sqrt()).collect();
    values.iter().enumerate().map(|(i, w)| w.abs() as f64 * norms[i % cols]).collect()
}

/// Which weights of a row-major matrix with rows of `cols` to keep: in every group of `m`
/// consecutive weights along a row (`m = cols`: the whole row), the `n` highest `scores`,
/// ties to the lower column.
pub fn choose(scores: &[f64], cols: usize, n: usize, m: usize) -> Vec<bool> {
    assert!(n < m && cols.is_multiple_of(m), "{n}:{m} over rows of {cols}");
    let mut keep = vec![false; scores.len()];
    keep.par_chunks_mut(cols).zip(scores.par_chunks(cols)).for_each(|(keep, scores)| {
        let mut order: Vec<usize> = Vec::with_capacity(m);
        for (keep, scores) in keep.chunks_mut(m).zip(scores.chunks(m)) {
            order.clear();
            order.extend(0..m);
            order.select_nth_unstable_by(n, |&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            for &j in &order[..n] {
                keep[j] = true;
            }
        }
    });
    keep
}

/// The layers `prune` may sparsify, in name order, and notes on those it leaves.
fn candidates(graph: &Graph) -> Result<(Vec<Candidate>, Vec<String>), String> {
    let mut out = Vec::new();
    let (mut sparse, mut decoded) = (vec![], vec![]);
    let factored: Vec<&str> =
        graph.layers.iter().filter(|(_, l)| l.is_factored() || l.is_train()).map(|(name, _)| name).collect();
    let (layers, by_rows) = read_by_linears(graph);
    for ReadByLinears { name, layer, weight, w, linears, rows, cols } in layers {
        if let Some(s) = &w.sparse {
            sparse.push(format!("{name} ({s})"));
            continue;
        }
        if layer.weights.len() > 1 {
            return Err(format!(
                "layer {name} has weights besides its main one ({}): run prune before the pass that added them",
                layer.weights.iter().map(|(r, _)| r.name()).collect::<Vec<_>>().join(", ")
            ));
        }
        // Kept values stay in a float format; a weight stored in another (a GGUF's Q4_1)
        // is decoded, and its kept values stored f32.
        let values_format = match w.format {
            f @ (Format::F32 | Format::F16 | Format::BF16) => f,
            f => {
                decoded.push(format!("{name} ({f})"));
                Format::F32
            }
        };
        let values = w.value(&graph.store, &[rows, cols]).map_err(|e| format!("layer {name}: {e}"))?;
        out.push(Candidate {
            name: name.to_string(),
            weight,
            tensor: w.tensor.clone(),
            format: w.format,
            values_format,
            linears,
            rows,
            cols,
            values,
        });
    }
    let mut notes: Vec<String> = by_rows.into_iter().collect();
    if !factored.is_empty() {
        notes.push(format!("left as they are (factorized; pruning factors is not built yet): {}", factored.join(", ")));
    }
    if !sparse.is_empty() {
        notes.push(format!("left as they are (already sparse): {}", sparse.join(", ")));
    }
    if !decoded.is_empty() {
        notes.push(format!(
            "{} layers stored in integer formats were decoded; their kept values are stored f32 (a quantize after prune stores them in an integer format): {}{}",
            decoded.len(),
            decoded[..decoded.len().min(3)].join(", "),
            if decoded.len() > 3 { ", ..." } else { "" }
        ));
    }
    Ok((out, notes))
}

/// Replaces the layer's weight by the sparse weight keeping `keep` of `dense`: values in the
/// weight's format as `{tensor}.values`, the mask as `{tensor}.mask`; every linear reads it,
/// and the layer's main weight is it.
fn rewrite(graph: &mut Graph, c: &Candidate, (n, m): (u64, u64), dense: &[f32], keep: &[bool]) -> Result<(), String> {
    let fail = |e: kiln_ir::SparseError| format!("layer {}: {e}", c.name);
    let (values, mask) = pack(n, m, c.rows, c.cols, dense, keep).map_err(fail)?;
    let shape = vec![c.rows, c.cols / m * n];
    let data = match c.values_format {
        Format::F16 => encoded(Format::F16, shape, values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes())),
        Format::BF16 => {
            encoded(Format::BF16, shape, values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()))
        }
        _ => TensorData::from_f32(shape, &values),
    };
    let scope = graph.node(c.weight).scope.clone();
    let new = graph.add_sparse_weight(&c.tensor, (n, m), c.rows, c.cols, data, mask, &scope).map_err(fail)?;
    graph.replace_uses(c.weight, new);
    graph.layers.insert(c.name.clone(), Layer::new(new));
    Ok(())
}

fn encoded(format: Format, shape: Vec<u64>, bytes: impl Iterator<Item = u8>) -> TensorData {
    TensorData::new(format, shape, kiln_ir::Bytes::from_vec(bytes.collect())).expect("two bytes per value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calibration::Gram;
    use crate::testing::values;
    use kiln_ir::sparse::densify;

    /// One linear `y = x W^T` with `W [rows, cols]` named `w` in layer `l`.
    fn one_linear(rows: u64, cols: u64, w: &[f32]) -> Graph {
        let text = format!(
            "graph g {{\n  %0 = input \"x\" : f32[r, {cols}]\n  %1 = weight \"w\" f32 : f32[{rows}, {cols}] @l\n  %2 = linear %0, %1 : f32[r, {rows}] @l\n  output \"y\" = %2\n}}\n"
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        g.store.insert("w", TensorData::from_f32(vec![rows, cols], w));
        g.layers = kiln_ir::LayerTable::derive(&g);
        g
    }

    /// The pruned layer's weight: its pattern, and its dense value read through the mask.
    fn pruned(g: &Graph) -> ((u64, u64), Vec<f32>) {
        let id = g.layers.get("l").and_then(Layer::main).expect("the layer keeps a main weight");
        let Op::Weight(w) = &g.node(id).op else { panic!("a weight") };
        let s = w.sparse.as_ref().expect("sparse");
        let shape = g.node(id).ty.known_shape().unwrap();
        let values = g.store.get(&w.tensor).unwrap().to_f32().unwrap();
        let mask = g.store.get(&s.mask).unwrap().bytes.as_slice().to_vec();
        let dense = densify(s.n, s.m, shape[0], shape[1], &values, &mask).unwrap();
        assert_eq!(dense, w.value(&g.store, &shape).unwrap());
        ((s.n, s.m), dense)
    }

    /// A weight the checkpoint stores in an integer format is decoded: the kept values are
    /// its decoded values, stored f32, and a note says so.
    #[test]
    fn integer_weights_are_decoded_and_kept_as_f32() {
        let (rows, cols) = (4u64, 32u64);
        let w = values((rows * cols) as usize, 9);
        let int8 = kiln_ir::IntFormat::new(8, 32, false).unwrap();
        let text = format!(
            "graph g {{\n  %0 = input \"x\" : f32[r, {cols}]\n  %1 = weight \"w\" {} : f32[{rows}, {cols}] @l\n  %2 = linear %0, %1 : f32[r, {rows}] @l\n  output \"y\" = %2\n}}\n",
            Format::Int(int8)
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        let data =
            TensorData::new(Format::Int(int8), vec![rows, cols], kiln_ir::Bytes::from_vec(int8.quantize(&w))).unwrap();
        let decoded = data.to_f32().unwrap();
        assert_ne!(decoded, w, "int8 rounds the values");
        g.store.insert("w", data);
        g.layers = kiln_ir::LayerTable::derive(&g);
        let report = prune(&mut g, &options(Method::Magnitude, Target::Pattern(2, 4)), &[], Statistics::None).unwrap();
        let (_, dense) = pruned(&g);
        for (got, want) in dense.iter().zip(&decoded) {
            assert!(*got == 0.0 || got == want, "a kept value is the decoded one: {got} against {want}");
        }
        let id = g.layers.get("l").and_then(Layer::main).unwrap();
        let Op::Weight(sw) = &g.node(id).op else { panic!("a weight") };
        assert_eq!(g.store.get(&sw.tensor).unwrap().format, Format::F32);
        assert!(report.notes.iter().any(|n| n.contains("decoded") && n.contains("l (int8g32)")), "{:?}", report.notes);
    }

    fn options(method: Method, target: Target) -> PruneOptions {
        PruneOptions { method, target, damp: DAMP, structured: None, adaptive: false }
    }

    /// Every row keeps exactly its count (unstructured), every group exactly N (N:M), and
    /// what is kept is the original weight, the largest magnitudes of its row or group.
    #[test]
    fn rows_and_groups_keep_their_counts() {
        let (rows, cols) = (6u64, 24u64);
        let w = values((rows * cols) as usize, 7);
        for (target, group, count) in [
            (Target::Sparsity(0.3), 24, 17), // ceil(0.7 x 24) = 16.8 -> 17
            (Target::Sparsity(0.5), 24, 12),
            (Target::Pattern(2, 4), 4, 2),
            (Target::Pattern(4, 8), 8, 4),
        ] {
            let mut g = one_linear(rows, cols, &w);
            let report = prune(&mut g, &options(Method::Magnitude, target), &[], Statistics::None).unwrap();
            let ((n, m), dense) = pruned(&g);
            assert_eq!((n, m as usize), (count, group), "{target}");
            assert!(g.store.get("w").is_none(), "the dense tensor is gone");
            for (gi, (got, orig)) in dense.chunks(group).zip(w.chunks(group)).enumerate() {
                let kept: Vec<usize> = (0..group).filter(|&j| got[j] != 0.0).collect();
                assert_eq!(kept.len() as u64, count, "{target}: group {gi}");
                let smallest_kept = kept.iter().map(|&j| orig[j].abs()).fold(f32::INFINITY, f32::min);
                for j in 0..group {
                    if kept.contains(&j) {
                        assert_eq!(got[j], orig[j], "{target}: a kept weight is the original");
                    } else {
                        assert!(orig[j].abs() <= smallest_kept, "{target}: group {gi} drops a larger weight");
                    }
                }
            }
            let l = &report.layers[0];
            assert_eq!(l.params, rows * (cols / m * n));
            assert_eq!(l.bytes, l.params * 4 + rows * cols / 8);
            assert_eq!(l.bits_per_weight, n as f64 / m as f64 * 32.0 + 1.0);
            assert!((l.kept - count as f64 / group as f64).abs() < 1e-12);
        }
    }

    /// Wanda weighs each weight by its input column's norm: with one column's inputs 100
    /// times larger, its small weights outrank larger ones that magnitude keeps.
    #[test]
    fn wanda_keeps_what_a_dominant_input_needs() {
        let (rows, cols) = (2u64, 8u64);
        // Column 5 holds each row's smallest weight.
        let w: Vec<f32> =
            [[0.9, -0.8, 0.7, -0.6, 0.5, 0.01, 0.4, -0.3], [-0.2, 0.3, 0.8, -0.9, 0.6, -0.02, 0.5, 0.7]].concat();
        let diag: Vec<f64> = (0..cols).map(|j| if j == 5 { 1e4 } else { 1.0 }).collect();
        let run = |method: Method| {
            let mut g = one_linear(rows, cols, &w);
            let linear = g.node_ids().find(|&n| matches!(g.node(n).op, Op::Linear { .. })).unwrap();
            let input = g.operands(linear)[0];
            let mut gram = Gram::new(cols as usize);
            for (j, d) in diag.iter().enumerate() {
                gram.sum[j * cols as usize + j] = *d;
            }
            let mut calibration = Calibration::default();
            calibration.inputs.insert(input, gram);
            prune(&mut g, &options(method, Target::Pattern(2, 4)), &[], Statistics::OneShot(&calibration)).unwrap();
            pruned(&g).1.iter().map(|v| *v != 0.0).collect::<Vec<bool>>()
        };
        let (magnitude, wanda) = (run(Method::Magnitude), run(Method::Wanda));
        for r in 0..rows as usize {
            assert!(!magnitude[r * 8 + 5], "magnitude drops row {r}'s smallest weight");
            assert!(wanda[r * 8 + 5], "wanda keeps row {r}'s weight on the dominant input");
        }
        assert_ne!(magnitude, wanda);
        // Wanda's other choices are magnitude's: the other norms are equal.
        assert_eq!(wanda[..4], magnitude[..4]);
    }

    /// Overrides fix one layer's sparsity or leave it dense; a width the mask cannot store
    /// stays dense with the reason in the report.
    #[test]
    fn overrides_and_widths_that_stay_dense() {
        let text = "graph g {
  %0 = input \"x\" : f32[r, 16]
  %1 = weight \"a\" f32 : f32[4, 16] @a
  %2 = linear %0, %1 : f32[r, 4] @a
  %3 = weight \"b\" f32 : f32[16, 16] @b
  %4 = linear %0, %3 : f32[r, 16] @b
  %5 = input \"z\" : f32[r, 12]
  %6 = weight \"c\" f32 : f32[4, 12] @c
  %7 = linear %5, %6 : f32[r, 4] @c
  output \"y\" = %2
  output \"u\" = %4
  output \"v\" = %7
}
";
        let mut g = kiln_ir::parse(text).unwrap();
        for (name, rows, cols, seed) in [("a", 4, 16, 1), ("b", 16, 16, 2), ("c", 4, 12, 3)] {
            g.store.insert(name, TensorData::from_f32(vec![rows, cols], &values((rows * cols) as usize, seed)));
        }
        g.layers = kiln_ir::LayerTable::derive(&g);
        let overrides = vec![("a".to_string(), Fixed::Dense), ("b".to_string(), Fixed::Sparsity(0.25))];
        let report =
            prune(&mut g, &options(Method::Magnitude, Target::Pattern(2, 4)), &overrides, Statistics::None).unwrap();
        let by = |n: &str| report.layers.iter().find(|l| l.name == n).unwrap();
        assert_eq!(by("a").why_dense.as_deref(), Some("--override says dense"));
        assert_eq!(by("b").pattern.as_deref(), Some("12:16"));
        let why = by("c").why_dense.as_deref().unwrap();
        assert!(why.contains("multiple of 8"), "{why}");
        assert_eq!((by("a").params, by("c").params), (64, 48));
        assert!(g.store.get("a").is_some() && g.store.get("c").is_some() && g.store.get("b").is_none());
        assert!(report.notes.iter().any(|n| n.contains("2 of 3 layers stay dense")), "{:?}", report.notes);
        assert!(
            report.notes.iter().any(|n| n.contains("uniform pattern: every pruned layer gets the same pattern=2:4"))
        );
        // The JSON `kiln compile` stores, layers in name order.
        let json = PassReport::Prune(report.clone()).to_json();
        assert_eq!((json["pass"].as_str(), json["method"].as_str()), (Some("prune"), Some("magnitude")));
        assert_eq!(json["layers"][0]["dense_because"], "--override says dense");
        assert_eq!(json["layers"][1]["pattern"], "12:16");
        assert_eq!(json["layers"][1]["bits_per_weight"], 12.0 / 16.0 * 32.0 + 1.0);
        assert_eq!(json["bytes"], 64 * 4 + (16 * 12 * 4 + 16 * 2) + 48 * 4);
        let err =
            prune(&mut g.clone(), &options(Method::Magnitude, Target::Sparsity(0.5)), &overrides, Statistics::None);
        assert!(err.unwrap_err().to_string().contains("`b` matches no layer"), "b is sparse now");
    }

    /// `adaptive=true` prunes a layer whose weight sits in a few large entries (little lost
    /// when the small ones go) more than a layer of even magnitudes, within the uniform
    /// count: the total kept is at most the uniform one, and the total error of its picks
    /// is at most the uniform allocation's.
    #[test]
    fn adaptive_sparsity_goes_where_it_costs_least() {
        let (rows, cols) = (8u64, 64u64);
        let text = "graph g {
  %0 = input \"x\" : f32[r, 64]
  %1 = weight \"spiky\" f32 : f32[8, 64] @spiky
  %2 = linear %0, %1 : f32[r, 8] @spiky
  %3 = weight \"even\" f32 : f32[8, 64] @even
  %4 = linear %0, %3 : f32[r, 8] @even
  output \"y\" = %2
  output \"z\" = %4
}
";
        let mut g = kiln_ir::parse(text).unwrap();
        let base = values((rows * cols) as usize, 3);
        // One weight in eight is large in `spiky`; `even` has magnitudes between 0.5 and 1.
        let spiky: Vec<f32> =
            base.iter().enumerate().map(|(i, v)| if i % 8 == 0 { 10.0 * v.signum() } else { 0.01 * v }).collect();
        let even: Vec<f32> = base.iter().map(|v| v.signum() * (0.5 + 0.5 * v.abs())).collect();
        g.store.insert("spiky", TensorData::from_f32(vec![rows, cols], &spiky));
        g.store.insert("even", TensorData::from_f32(vec![rows, cols], &even));
        g.layers = kiln_ir::LayerTable::derive(&g);
        let input = g.operands(g.node_ids().find(|&n| matches!(g.node(n).op, Op::Linear { .. })).unwrap())[0];
        let mut gram = Gram::new(cols as usize);
        (0..cols as usize).for_each(|j| gram.sum[j * cols as usize + j] = 1.0);
        let mut calibration = Calibration::default();
        calibration.inputs.insert(input, gram);
        let mut o = options(Method::Wanda, Target::Sparsity(0.5));
        o.adaptive = true;
        let report = prune(&mut g, &o, &[], Statistics::OneShot(&calibration)).unwrap();
        let by = |n: &str| report.layers.iter().find(|l| l.name == n).unwrap().clone();
        let (s, e) = (1.0 - by("spiky").kept, 1.0 - by("even").kept);
        assert!(s > 0.5 && e < 0.5, "spiky {s}, even {e}");
        assert!(s >= 0.65, "spiky loses only its small weights up to 7 in 8: {s}");
        let kept = by("spiky").params + by("even").params;
        assert!(kept <= 2 * rows * cols / 2, "within the uniform count: {kept}");
        assert!(report.notes.iter().any(|n| n.contains("layer-adaptive sparsity")), "{:?}", report.notes);
        // The relative errors of the picks, against the uniform 0.5 for both.
        let rel = |w: &[f32], keep: usize| -> f64 {
            let mut e: Vec<f64> = w.iter().map(|v| (*v as f64).powi(2)).collect();
            let total: f64 = e.iter().sum();
            let mut sum = 0.0;
            for row in e.chunks_mut(cols as usize) {
                row.sort_by(f64::total_cmp);
                sum += row[..cols as usize - keep].iter().sum::<f64>();
            }
            sum / total
        };
        let keep = |l: &PruneLayer| (l.params / rows) as usize;
        let adaptive = rel(&spiky, keep(&by("spiky"))) + rel(&even, keep(&by("even")));
        let uniform = rel(&spiky, 32) + rel(&even, 32);
        assert!(adaptive < uniform, "adaptive {adaptive} against uniform {uniform}");
    }

    /// Ties go to the lower column, in every group and in a whole row.
    #[test]
    fn ties_keep_the_lower_columns() {
        let scores = [1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0];
        let keep = choose(&scores, 8, 2, 4);
        assert_eq!(keep, [true, true, false, false, false, true, true, false]);
        let keep = choose(&scores, 8, 5, 8);
        assert_eq!(keep, [true, true, false, false, false, true, true, true]);
    }

    #[test]
    fn override_values_parse() {
        assert_eq!("dense".parse::<Fixed>(), Ok(Fixed::Dense));
        assert_eq!("0.3".parse::<Fixed>(), Ok(Fixed::Sparsity(0.3)));
        for bad in ["0", "1", "1.5", "-0.2", "2:4", "sparse"] {
            assert!(bad.parse::<Fixed>().is_err(), "{bad}");
        }
    }
}
