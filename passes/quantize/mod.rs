//! `quantize`: stores the model's matrices in lower-precision formats.
//!
//! **Layers.** The layers are the graph's layer table's ([`kiln_ir::LayerTable`]): each
//! layer's main weight, when a `linear` reads it as its weight or a `gather` or a `slice`
//! along rows reads it as a table (embeddings, position tables, and a tied output head
//! that is both); other weights (norms, biases, a layer's LoRC factors) stay as they are.
//! A layer is named by its name in the table, its weight node's scope (`blk.0.attn_q`; see
//! [`kiln_ir::layers`] for weights sharing a scope), which is what `--override` patterns
//! match and what the report lists.
//!
//! **Formats.** A [`Choice`] per layer: `f32` (keep), `f16`, `bf16`, `int8` (one scale per
//! output channel: `int8g<K>`), an [`IntFormat`] such as `int4g64a`, or `fp8` (e4m3, one
//! scale per output channel: `fp8g<K>`; or per group, `fp8g32`; rounded, never GPTQ'd, and
//! not among the budget's candidates: int8 is as small and usually closer). A group that does not
//! divide a layer's rows falls back to the largest multiple of 32 below it that does
//! (`int4g128` on 576-wide rows becomes `int4g96`), and the report shows the format used.
//!
//! **Targets.** Either one format for every layer (`quantize(format=int4g64a)`), or a budget
//! (`quantize(bits=4.5)`): the average storage bits per parameter over *all* of the model's
//! parameters (scales, offsets and unquantized weights included) may not exceed it. Each
//! layer then gets the format that minimizes the summed sensitivity under that budget,
//! solved exactly by [`allocate`]:
//!
//! 1. Every candidate ([`CANDIDATES`], within [`BAND`] bits per weight of the budget;
//!    for budgets from 8 bits, anything from 7.5 up) is measured on every layer as the
//!    method would store it, on up to 256 evenly spaced rows: under `gptq`, GPTQ's
//!    own `trace(dW H dW^T)` from one factorization of the layer's `H` shared by all
//!    candidates ([`gptq::Factored`]); under `rtn`, the diagonal `sum_j H_jj |dW_:j|^2`. A
//!    table read by rows (an embedding) adds `|dE|^2` per row times the calibration tokens
//!    per row.
//! 2. The *anchor* is the candidate that, everywhere, spends the most of the budget
//!    (allowed to exceed it by 2%, since the budget counts norms and scales
//!    too). Every layer is quantized to it by the pass's method.
//! 3. With a [`Probe`] (the CLI's: KL divergence of next-token distributions, or
//!    1 - cosine of embeddings, on calibration rows held out from the statistics), each
//!    *kind* of layer (`blk.*.ffn_down`) is lowered alone to the anchor and measured end to
//!    end, which converts its layers' errors into distortion of the output. Without one, a
//!    layer's sensitivity is its error relative to its output's energy.
//! 4. After the allocation, the layers that moved are quantized. When the anchor fits the
//!    budget too, a probe measures the mix against it end to end and the one that moves the
//!    outputs less is kept. A note says which and by how much.
//!
//! Overrides are fixed before the search and always honored. A layer no candidate fits
//! stays as it is.
//!
//! **Methods.** `rtn` rounds each group to nearest ([`IntFormat::quantize`]); `gptq`
//! ([`gptq`]) spreads each column's rounding error over the columns not yet
//! quantized, using the layer input's `H`. A weight read by a linear (the tied head too) is
//! GPTQ'd against that linear's input; a weight read by several linears, against the sum
//! of their inputs' `H` (its output error is the sum of theirs); a table read only by
//! gathers has no `H` and is rounded. With `clip` (the pipeline's default), both methods take each group's scales
//! from [`clip::fit`]'s search, weighted by `H_ii`, instead of the group's full
//! range; the search's errors are measured the same way.
//!
//! **Sparse layers** (after `prune`; see [`kiln_ir::sparse`]). A sparse layer's matrix is
//! its stored values, `[rows, slots]`: the format applies to them, groups running along a
//! row of values (`int8` is one scale per row of values; a group that does not divide the
//! slots falls back as above). The mask stays as it is; the `weight` node keeps its
//! pattern and takes the values' new format and checksum. An unstructured layer (`n:cols`)
//! whose `n` no group of its format divides (50% of 96-wide rows is 48) is stored as
//! `n':cols` with the next `n'` that fits (a multiple of 32 under a budget), the added
//! slots zeros (the same meaning), with a note; an `n:m` layer so placed stays as it is,
//! with a note. Under `method=gptq` with statistics, its kept values are rounded by GPTQ
//! over the dense columns with the mask fixed ([`crate::prune::sparsegpt::round_kept`]: each
//! kept value's error spread onto the kept values of later columns, the removed weights
//! held at 0), under scales fixed beforehand as rounding to nearest fits them; otherwise
//! to nearest. Either way, with `clip` the scales are searched with each kept value
//! weighted by its column's `H_jj`; the budget search measures a sparse layer's candidate
//! formats rounded to nearest. Its bytes, in the report and the
//! budget, are the values' in the format plus the mask's `rows * cols / 8`; its parameters
//! are the dense `rows * cols`, as [`kiln_ir::Sparse::bits_per_weight`] counts (a 50%
//! int8 layer is about 5 bits per weight). Its errors are measured over its dense rows.
//! Sparse linears run on their dense value with f32 activations
//! ([`kiln_ir::Graph::allowed_activations`]), so `activations=int8` leaves them f32, and
//! `lorc_rank` gives them no correction; notes say so.
//!
//! The pass replaces the weights' bytes in the tensor store and the formats in their
//! `weight` nodes (and widened patterns); the graph's structure does not change.

pub mod clip;
pub mod gptq;
pub mod lorc;

use crate::allocate::{self, Choice as Candidate, Layer as Knapsack};
use crate::calibration::{Calibration, Gram};
use crate::layers::{apply_overrides, kind_of};
use crate::options::{Args, OptionHelp, Options};
use crate::prune::sparsegpt;
use crate::{Context, Pass, PassError, PassReport, Probe};
use clip::Grid;
use gptq::GptqOptions;
use half::{bf16, f16};
use kiln_ir::{Bytes, Format, Graph, IntFormat, NodeId, Op, Role, TensorData};
use rayon::prelude::*;
use std::collections::BTreeMap;

const PASS: &str = "quantize";

/// The pass as a pipeline names it: `quantize(...)`.
pub struct Quantize;

impl Pass for Quantize {
    const NAME: &'static str = PASS;
    const SUMMARY: &'static str = "store matrices in fewer bits: one format for all (format=F) or the formats that fit a budget (bits=B), chosen per layer from measured sensitivities; --override PATTERN=FORMAT fixes layers";
    type Options = QuantizeOptions;
    const OVERRIDES: Option<crate::OverrideCheck> = Some(|v| v.parse::<Choice>().map(|_| ()));

    /// Budgets probe each kind of layer and the mix; `activations=int8` probes per-block
    /// against per-row scales.
    fn probes(options: &QuantizeOptions) -> bool {
        matches!(options.target, Target::Bits(_)) || options.measure_activations
    }

    fn run(graph: &mut Graph, options: &QuantizeOptions, ctx: &Context) -> Result<PassReport, PassError> {
        let mut options = options.clone();
        options.overrides.extend(ctx.overrides_as::<Choice>(PASS)?);
        let calibration = ctx.calibration(graph)?;
        let probe = ctx.probe();
        quantize(graph, &options, calibration.as_deref(), probe.as_deref(), ctx.progress).map(PassReport::Quantize)
    }
}

impl Options for QuantizeOptions {
    const HELP: &'static [OptionHelp] = &[
        OptionHelp {
            name: "bits",
            values: "B",
            default: "none; give bits or format",
            help: "a budget: at most B storage bits per parameter on average over all of the model's parameters (1 to 32); needs --calib",
        },
        OptionHelp {
            name: "format",
            values: "f32|f16|bf16|int8|intBgG[a]|fp8|fp8gG",
            default: "none; give bits or format",
            help: "one format for every layer: int8 (one scale per output channel), intBgG (B bits in 2, 3, 4, 8, groups of G, `a` asymmetric), fp8 (e4m3 per output channel or per group of G)",
        },
        OptionHelp {
            name: "method",
            values: "rtn|gptq",
            default: "gptq with --calib, else rtn",
            help: "round to nearest, or GPTQ (each column's rounding error spread over the columns not yet quantized)",
        },
        OptionHelp {
            name: "act_order",
            values: "true|false",
            default: "true",
            help: "GPTQ takes columns in order of decreasing input energy",
        },
        OptionHelp {
            name: "damp",
            values: "D",
            default: "0.01",
            help: "GPTQ's dampening, a fraction of the mean diagonal of H",
        },
        OptionHelp {
            name: "clip",
            values: "true|false",
            default: "true",
            help: "each group's scales by search (the range shrunk toward zero, errors weighted by the input's energy), not the group's full range",
        },
        OptionHelp {
            name: "activations",
            values: "f32|int8|int8-block|int8-row",
            default: "f32",
            help: "int8: linears run W8A8, activation scales per block of 32 or per row, whichever a probe on held-out --calib rows measures closer; int8-block, int8-row force one",
        },
        OptionHelp {
            name: "lorc_rank",
            values: "R",
            default: "0, none",
            help: "a rank-R correction of each quantized linear's error fitted to its inputs (LoRC, 1 to 1024); needs --calib",
        },
    ];

    fn parse(args: &mut Args) -> Result<QuantizeOptions, PassError> {
        let calibrated = args.calibrated();
        let bits = args.get_with("bits", |v| {
            v.parse::<f64>()
                .ok()
                .filter(|b| (1.0..=32.0).contains(b))
                .ok_or_else(|| "expected between 1 and 32 bits per weight".to_string())
        })?;
        let format = args.get_with("format", |v| v.parse::<Choice>())?;
        let target = match (bits, format) {
            (Some(_), Some(_)) => {
                return Err(args.error("give bits=B (a budget) or format=F (one format for all), not both"));
            }
            (Some(b), None) => Target::Bits(b),
            (None, Some(f)) => Target::Format(f),
            (None, None) => return Err(args.error("give bits=B (a budget) or format=F (one format for all)")),
        };
        let method = match args.text("method") {
            None if calibrated => Method::Gptq,
            None | Some("rtn") => Method::Rtn,
            Some("gptq") => Method::Gptq,
            Some(v) => return Err(args.invalid("method", v)),
        };
        // Act-order by default: on SmolLM2 int4g64a it took held-out perplexity from 1.254x
        // to 1.161x of the unquantized model's, for 20% more time.
        // Searched scales by default: on SmolLM2 int4g64a they took GPTQ from 1.161x to
        // 1.089x, and round-to-nearest from 1.325x to 1.145x.
        let defaults = GptqOptions::default();
        let gptq = GptqOptions {
            act_order: args.get("act_order")?.unwrap_or(true),
            clip: args.get("clip")?.unwrap_or(true),
            damp: args.get("damp")?.unwrap_or(defaults.damp),
            ..defaults
        };
        let (activations, measure_activations) = match args.text("activations") {
            None | Some("f32") => (Activations::F32, false),
            Some("int8") => (Activations::Int8, true),
            Some("int8-block") => (Activations::Int8, false),
            Some("int8-row") => (Activations::Int8Row, false),
            Some(v) => return Err(args.invalid("activations", v)),
        };
        let lorc_rank = args
            .get_with("lorc_rank", |v| {
                v.parse()
                    .ok()
                    .filter(|r| (1..=1024).contains(r))
                    .ok_or_else(|| "expected a rank from 1 to 1024".to_string())
            })?
            .unwrap_or(0);
        if lorc_rank > 0 && !calibrated {
            return Err(args.error("lorc_rank fits corrections to the calibration inputs: pass --calib"));
        }
        if method == Method::Gptq && !calibrated {
            return Err(args.error("method=gptq needs calibration data: pass --calib"));
        }
        Ok(QuantizeOptions { target, method, overrides: Vec::new(), gptq, activations, measure_activations, lorc_rank })
    }
}

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
    /// fp8 e4m3 with one scale per output channel (`None`) or per group.
    Fp8(Option<u32>),
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
            Choice::Int(f) => Some(Format::Int(IntFormat { group: fallback(f.group, k)?, ..f })),
            Choice::Fp8(group) => {
                let group = fallback(group.unwrap_or(u32::try_from(k).ok()?), k)?;
                kiln_ir::Fp8Format::new(group).ok().map(Format::Fp8)
            }
        }
    }
}

/// The largest multiple of 32 up to `group` that divides rows of `k`.
fn fallback(group: u32, k: u64) -> Option<u32> {
    (1..=group / 32).rev().map(|m| m * 32).find(|&g| k.is_multiple_of(g as u64))
}

impl std::str::FromStr for Choice {
    type Err = String;
    fn from_str(s: &str) -> Result<Choice, String> {
        Ok(match s {
            "f32" | "keep" => Choice::Keep,
            "f16" => Choice::F16,
            "bf16" => Choice::BF16,
            "int8" => Choice::Int8,
            "fp8" => Choice::Fp8(None),
            _ if s.starts_with("fp8") => match s.parse::<Format>().map_err(|e| e.to_string())? {
                Format::Fp8(f) => Choice::Fp8(Some(f.group)),
                _ => unreachable!("fp8 names parse to fp8 formats"),
            },
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
            Choice::Fp8(None) => f.write_str("fp8"),
            Choice::Fp8(Some(g)) => write!(f, "fp8g{g}"),
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
    pub activations: Activations,
    /// With `activations: Int8` (the pass's `activations=int8`): per-block or per-row
    /// scales, whichever the probe measures moving the outputs less, for models with
    /// per-channel int8 weights (the only ones per-row scales apply to).
    pub measure_activations: bool,
    /// With calibration: the rank of a low-rank correction of each quantized linear's error
    /// ([`crate::lorc`]); 0 for none.
    pub lorc_rank: usize,
}

/// What the model's linears on quantized weights take as activations: set on each linear
/// by [`kiln_ir::set_activations`] and named in the report (the numbers are documented on
/// [`kiln_ir::Activations`]).
pub use kiln_ir::Activations;

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

/// A candidate format of a layer as measured.
struct Measured {
    format: Format,
    /// Storage bits of the layer in `format`.
    bits: u64,
    /// The absolute and relative output errors it leaves (see [`errors`]).
    absolute: f64,
    relative: f64,
    /// GPTQ's bytes of the sampled rows (see [`errors`]), which encoding the whole layer
    /// in this format reuses: rows are independent given `H`.
    sample: Option<Vec<u8>>,
}

/// How far below or above the budget (bits per weight; budgets from 8 bits search
/// everything from 7.5 up) a layer's format may go in the search. Far from the format the
/// search starts from, per-layer errors stop adding up (a model with many 2-bit layers is
/// not the sum of models with one): on SmolLM2 a band of 1.25 bits, and one reaching up
/// to int8, lost to this one.
pub const BAND: f64 = 0.5;

/// How far (relative) the uniform format the search starts from may exceed the budget.
const ANCHOR_SLACK: f64 = 0.02;

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
    /// The activations chosen for linears on quantized weights: the mode the pass set on
    /// the linears by [`kiln_ir::set_activations`] (each takes what its weight allows).
    pub activations: Activations,
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
    /// The layer's name in the graph's layer table.
    scope: String,
    /// Its kind ([`kind_of`] its weight's scope, or tensor name if the scope is empty).
    /// Kinds follow scopes, not layer names: two tables in one scope (MiniLM's position and
    /// token-type embeddings, layers `embeddings` and `embeddings.token_type_embeddings.weight`)
    /// are one kind, as before the layer table.
    kind: String,
    tensor: String,
    n: u64,
    k: u64,
    format: Format,
    values: Vec<f32>,
    /// The input statistics of the linears reading it (summed over them, if several).
    gram: Option<Gram>,
    /// Read by a gather or a slice (an embedding or position table).
    gathered: bool,
    /// Read by a linear (as its weight).
    linear: bool,
    /// For a sparse weight: `values` are its stored values, `[n, k]` with `k` the slots of a
    /// row, and this is its pattern, mask and dense statistics.
    sparse: Option<SparseLayer>,
}

/// The layout of a sparse layer (see [`kiln_ir::sparse`]), which quantizing keeps.
struct SparseLayer {
    n: u64,
    m: u64,
    /// The dense rows' length.
    cols: u64,
    /// The mask's bytes, `[rows, cols / 8]`.
    mask: Vec<u8>,
    /// The input statistics of the linears reading it, over the dense columns
    /// (`[cols, cols]`); the layer's own `gram` is `None`, its values having no columns of
    /// their own.
    gram: Option<Gram>,
}

impl SparseLayer {
    /// The dense column of each slot of row `row` (`None` for a slot its group leaves
    /// unused), as [`kiln_ir::sparse::densify`] reads them.
    fn columns(&self, row: usize) -> Vec<Option<usize>> {
        let (n, m, cols) = (self.n as usize, self.m as usize, self.cols as usize);
        let bits = &self.mask[row * cols / 8..(row + 1) * cols / 8];
        let mut out = vec![None; cols / m * n];
        for g in 0..cols / m {
            let set = (g * m..(g + 1) * m).filter(|&c| bits[c / 8] >> (c % 8) & 1 == 1);
            for (j, c) in set.take(n).enumerate() {
                out[g * n + j] = Some(c);
            }
        }
        out
    }

    /// The dense row of `values`, the stored values of row `row`.
    fn densify_row(&self, row: usize, values: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; self.cols as usize];
        for (slot, c) in self.columns(row).into_iter().enumerate() {
            if let Some(c) = c {
                out[c] = values[slot];
            }
        }
        out
    }
}

impl Layer {
    /// Its parameters: the dense `rows x cols`, for a sparse layer too (what
    /// [`kiln_ir::Sparse::bits_per_weight`] and budgets count bits over).
    fn params(&self) -> u64 {
        self.n * self.sparse.as_ref().map_or(self.k, |s| s.cols)
    }

    /// Its storage bits with its values in `format`, a sparse layer's mask included.
    fn bits(&self, format: Format) -> Result<u64, kiln_ir::FormatError> {
        let mask = self.sparse.as_ref().map_or(0, |s| s.mask.len() as u64);
        Ok((format.byte_len(self.n * self.k)? + mask) * 8)
    }

    /// The input energy `H_jj` each stored value's error is weighted by, for the stored rows
    /// `rows`: the diagonal of `H` (`k` values, every row's) for a dense layer; for a
    /// sparse one, each slot's column's, row after row (`0` for unused slots). `None`
    /// without statistics.
    fn importance(&self, rows: impl Iterator<Item = usize>) -> Option<Vec<f64>> {
        match &self.sparse {
            None => self.gram.as_ref().map(|g| g.diagonal()),
            Some(s) => {
                let diag = s.gram.as_ref()?.diagonal();
                Some(rows.flat_map(|r| s.columns(r).into_iter().map(|c| c.map_or(0.0, |c| diag[c]))).collect())
            }
        }
    }
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
    // The formats change, so the linears' activations are set anew at the end; until then
    // they are f32, which is what the search's probes measure.
    kiln_ir::set_activations(graph, Activations::F32);
    let mut layers = find_layers(graph, calibration).map_err(fail)?;
    let mut notes = Vec::new();
    // Tensor trains are ops on their cores, not matrices a linear reads: their cores stay
    // f32, counted in the budget as stored, like the weights outside layers.
    let trains: Vec<&str> = graph.layers.iter().filter(|(_, l)| l.is_train()).map(|(n, _)| n).collect();
    if !trains.is_empty() {
        notes.push(format!(
            "{} layers are tensor trains, whose cores stay f32 (counted in the budget as stored): {}",
            trains.len(),
            trains.join(", ")
        ));
    }

    // Overrides first: every pattern must name a layer.
    let names: Vec<&str> = layers.iter().map(|l| l.scope.as_str()).collect();
    let fixed: Vec<Option<Choice>> = apply_overrides(&names, &options.overrides).map_err(fail)?;

    // An unstructured sparse layer (`n:cols`) whose rows of `n` values no group of its
    // choice divides gets more slots (to a multiple of 32 under a budget, whose int
    // candidates all have such groups): `n':cols` with zeros in the added slots has the
    // same meaning (see `kiln_ir::sparse`).
    for (layer, fixed) in layers.iter_mut().zip(&fixed) {
        let Some(s) = &layer.sparse else { continue };
        let fits = |slots: u64| match (*fixed, options.target) {
            (Some(c), _) | (None, Target::Format(c)) => c.resolve(slots, layer.format).is_some(),
            (None, Target::Bits(_)) => slots.is_multiple_of(32),
        };
        if s.m != s.cols || fits(layer.k) {
            continue;
        }
        if let Some(slots) = (layer.k + 1..s.m).find(|&w| fits(w)) {
            notes.push(format!(
                "{}: rows of {} kept values ({}:{}) fit no group; stored as {slots}:{} (zeros in the added slots)",
                layer.scope, layer.k, s.n, s.m, s.m
            ));
            widen(layer, slots);
        }
    }

    // Parameters and bytes that no layer accounts for (norms, biases).
    let (other_params, other_bytes) = crate::budget::outside_layers(graph, |n| layers.iter().any(|l| l.node == n));

    // A sparse layer's rows are its stored values'.
    let rows_of = |layer: &Layer| match &layer.sparse {
        Some(s) => format!("rows of {} kept values ({}:{})", layer.k, s.n, s.m),
        None => format!("rows of {}", layer.k),
    };
    let resolve = |choice: Choice, layer: &Layer, notes: &mut Vec<String>| -> Format {
        match choice.resolve(layer.k, layer.format) {
            Some(f) => {
                if let (Choice::Int(want), Format::Int(got)) = (choice, f)
                    && want.group != got.group
                {
                    notes.push(format!(
                        "{}: {} take groups of {}, not {}",
                        layer.scope,
                        rows_of(layer),
                        got.group,
                        want.group
                    ));
                }
                f
            }
            None => {
                notes.push(format!(
                    "{}: {} fit no {choice} group; left as {}",
                    layer.scope,
                    rows_of(layer),
                    layer.format
                ));
                layer.format
            }
        }
    };

    let mut sensitivities = vec![0.0; layers.len()];
    // Layers already encoded by the search, by index.
    let mut encoded: Vec<Option<Encoded>> = vec![None; layers.len()];
    let formats: Vec<Format> = match options.target {
        Target::Format(choice) => {
            let formats: Vec<Format> =
                layers.iter().zip(&fixed).map(|(l, f)| resolve(f.unwrap_or(choice), l, &mut notes)).collect();
            if calibration.is_some() {
                let tokens = calibration.map_or(0, |c| c.tokens);
                sensitivities = layers
                    .par_iter()
                    .zip(&formats)
                    .map(|(l, &f)| errors(l, f, tokens, options.gptq.clip, None).relative)
                    .collect();
            }
            formats
        }
        Target::Bits(bits) => {
            let Some(calibration) = calibration else {
                return Err(fail(
                    "quantize(bits=...) measures each layer's sensitivity on calibration data: pass --calib".into(),
                ));
            };
            let total_params = other_params + layers.iter().map(Layer::params).sum::<u64>();
            let budget = (bits * total_params as f64).floor() as u64;
            let lorc_bits: u64 =
                layers.iter().filter(|l| lorc_applies(l, options)).map(|l| lorc_bits(l, options)).sum();
            let Some(budget) = budget.checked_sub(other_bytes * 8 + lorc_bits) else {
                return Err(fail(format!("{bits} bits per weight leave nothing for the matrices")));
            };
            let search = Search { layers: &layers, fixed: &fixed, options, tokens: calibration.tokens, progress };
            let found = search.run(graph, bits, budget, probe).map_err(fail)?;
            notes.extend(found.notes);
            sensitivities = found.sensitivities;
            encoded = found.encoded;
            found.formats
        }
    };

    // Quantize what the search has not, largest layers first so that the threads finish
    // together.
    let total = layers.len();
    let done = std::sync::atomic::AtomicUsize::new(0);
    let method = options.method;
    // Per layer: its bytes, their relative error, and its correction.
    type Finished = (Encoded, Option<f64>, Option<Correction>);
    let results: Vec<Result<Finished, String>> = layers
        .par_iter()
        .zip(&formats)
        .zip(encoded)
        .map(|((layer, &format), encoded)| {
            let r = match encoded {
                Some(e) => Ok(e),
                None => encode(layer, format, method, &options.gptq, None, None),
            }
            .and_then(|e| {
                let correction = match (&e, &layer.gram) {
                    (Some(bytes), Some(g)) if lorc_applies(layer, options) => {
                        let q = format.dequantize(bytes, layer.n * layer.k).map_err(|e| e.to_string())?;
                        let (n, k) = (layer.n as usize, layer.k as usize);
                        Some(lorc::factors(&layer.values, &q, n, k, &g.sum, options.lorc_rank, options.gptq.damp)?)
                    }
                    _ => None,
                };
                let error = relative_error(layer, format, e.as_deref(), correction.as_ref())?;
                Ok((e, error, correction))
            });
            let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress(d, total, &layer.scope);
            r
        })
        .collect();

    let fp8 = formats.iter().filter(|f| matches!(f, Format::Fp8(_))).count();
    if options.method == Method::Gptq && fp8 > 0 {
        notes.push(format!("{fp8} fp8 layers were rounded to nearest: GPTQ applies to int formats only"));
    }
    let sparse: Vec<&str> = layers
        .iter()
        .zip(&formats)
        .filter(|(l, f)| l.sparse.is_some() && **f != l.format)
        .map(|(l, _)| l.scope.as_str())
        .collect();
    if options.lorc_rank > 0 && !sparse.is_empty() {
        notes.push(format!(
            "lorc_rank={}: {} sparse layers carry no correction (e.g. {})",
            options.lorc_rank,
            sparse.len(),
            sparse[0]
        ));
    }
    if options.activations != Activations::F32 {
        let exact: Vec<&str> = layers
            .iter()
            .zip(&formats)
            .filter(|(l, f)| l.linear && l.sparse.is_none() && !matches!(f, Format::Int(_)))
            .map(|(l, _)| l.scope.as_str())
            .collect();
        if !exact.is_empty() {
            notes.push(format!(
                "activations={}: {} linears keep f32 activations, their weights being unquantized (e.g. {})",
                options.activations,
                exact.len(),
                exact[0]
            ));
        }
        // `Graph::allowed_activations`: a sparse weight runs on its dense value, in f32.
        let sparse: Vec<&str> =
            layers.iter().filter(|l| l.linear && l.sparse.is_some()).map(|l| l.scope.as_str()).collect();
        if !sparse.is_empty() {
            notes.push(format!(
                "activations={}: {} sparse linears keep f32 activations, sparse weights running on their dense value (e.g. {})",
                options.activations,
                sparse.len(),
                sparse[0]
            ));
        }
    }
    let mut report = QuantizeReport { notes, activations: options.activations, ..Default::default() };
    let mut corrected = 0;
    // Whether per-row activation scales apply to any linear (int8, one scale per row).
    let per_channel_int8 = layers
        .iter()
        .zip(&formats)
        .any(|(l, f)| l.linear && l.sparse.is_none() && matches!(f, Format::Int(i) if i.is_int8_per_row(l.k)));
    for ((layer, format), (result, sensitivity)) in
        layers.iter_mut().zip(&formats).zip(results.into_iter().zip(sensitivities))
    {
        let (changed, error, correction) = result.map_err(|e| fail(format!("{}: {e}", layer.scope)))?;
        if let Some(bytes) = changed {
            set_weight(graph, layer, *format, bytes).map_err(|e| fail(format!("{}: {e}", layer.scope)))?;
        }
        // A sparse layer's bytes are its values' and its mask's.
        let mask = layer.sparse.as_ref().map_or(0, |s| s.mask.len() as u64);
        let mut bytes = graph.store.get(&layer.tensor).map_or(0, |t| t.bytes.len() as u64) + mask;
        if let Some((a, b)) = correction {
            bytes += 4 * (a.len() + b.len()) as u64;
            corrected += 1;
            lorc::attach(graph, layer.node, &layer.tensor, a, b, layer.n, layer.k)
                .map_err(|e| fail(format!("{}: {e}", layer.scope)))?;
        }
        report.layers.push(LayerReport {
            scope: layer.scope.clone(),
            tensor: layer.tensor.clone(),
            format: *format,
            params: layer.params(),
            bytes,
            sensitivity,
            error,
        });
        layer.values = Vec::new();
    }
    if options.lorc_rank > 0 {
        report.notes.push(format!(
            "lorc_rank={}: {corrected} quantized linears carry a rank-{} correction of their error (f32 factors, counted in their bytes)",
            options.lorc_rank, options.lorc_rank
        ));
    }
    report.params = other_params + report.layers.iter().map(|l| l.params).sum::<u64>();
    report.bytes = other_bytes + report.layers.iter().map(|l| l.bytes).sum::<u64>();
    kiln_ir::verify(graph).map_err(|e| fail(format!("the rewritten graph does not verify: {e}")))?;
    if options.measure_activations && options.activations == Activations::Int8 {
        match probe {
            _ if !per_channel_int8 => report.notes.push(
                "activations=int8: per block of 32 (no linear has per-channel int8 weights, the only ones scales per row apply to)"
                    .into(),
            ),
            Some(probe) => {
                progress(0, 2, "measuring int8 activations per block and per row");
                let with = |mode: Activations| {
                    let mut g = graph.clone();
                    kiln_ir::set_activations(&mut g, mode);
                    g
                };
                let block = probe(&with(Activations::Int8)).map_err(fail)?;
                let row = probe(&with(Activations::Int8Row)).map_err(fail)?;
                report.activations = if row < block { Activations::Int8Row } else { Activations::Int8 };
                report.notes.push(format!(
                    "activations=int8: scales per row move the outputs by {row:.4e} on the probe rows, per block of 32 by {block:.4e}: {} kept",
                    if row < block { "per row (int8-row)" } else { "per block" }
                ));
            }
            None => report.notes.push(
                "activations=int8: per block of 32 (no probe rows to measure scales per row against it: pass --calib)"
                    .into(),
            ),
        }
    }
    // Each linear takes what the chosen mode gives its weight's new format: the attribute
    // engines run (f32 on weights left unquantized, and on LoRC's f32 factors).
    kiln_ir::set_activations(graph, report.activations);
    Ok(report)
}

/// The layers of `graph` (its layer table's main weights), in the topological order of
/// their first reader, with their values decoded. A layer whose main weight no `linear`,
/// `gather` or row `slice` reads, or that is not a matrix, is left alone.
fn find_layers(graph: &Graph, calibration: Option<&Calibration>) -> Result<Vec<Layer>, String> {
    let order = graph.topo_order().ok_or("the graph has a cycle")?;
    // Main weights by their layer's name; a factorized layer's factors as two layers of
    // their own, `NAME.lowrank_u` and `NAME.lowrank_v`, each with its own input statistics.
    let mut names: BTreeMap<NodeId, String> = BTreeMap::new();
    for (name, layer) in graph.layers.iter() {
        match layer.main() {
            Some(m) => {
                names.insert(m, name.to_string());
            }
            None if layer.is_factored() => {
                for role in [Role::LowRankU, Role::LowRankV] {
                    names.extend(layer.role(role).map(|n| (n, format!("{name}.{role}"))));
                }
            }
            // A shared weight is named after the first of its layers and quantized once.
            None if layer.is_tied() => {
                for role in [Role::SharedBase, Role::DeltaA, Role::DeltaB] {
                    for n in layer.role(role) {
                        names.entry(n).or_insert_with(|| format!("{name}.{role}"));
                    }
                }
            }
            None => {}
        }
    }
    let mut layers: BTreeMap<NodeId, usize> = BTreeMap::new();
    let mut out: Vec<Layer> = Vec::new();
    // Per layer, the inputs of the linears reading its main weight, in topological order.
    let mut inputs: Vec<Vec<NodeId>> = Vec::new();
    for &id in &order {
        let node = graph.node(id);
        let (table, x) = match node.op {
            Op::Linear { .. } => (graph.operands(id)[1], Some(graph.operands(id)[0])),
            // A table read by rows: an embedding, or a position table sliced to the
            // sequence.
            Op::Gather | Op::Slice { axis: 0, .. } => (graph.operands(id)[0], None),
            _ => continue,
        };
        let Some(name) = names.get(&table) else { continue };
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
                // A sparse layer's matrix is its stored values, `[n, slots]`.
                let (k, sparse) = match &w.sparse {
                    None => (k, None),
                    Some(s) => {
                        kiln_ir::Sparse::check(s.n, s.m, k).map_err(|e| format!("weight `{}`: {e}", w.tensor))?;
                        let slots = s.values_shape(n, k)[1];
                        let mask = graph.store.get(&s.mask).ok_or_else(|| format!("mask `{}` is not bound", s.mask))?;
                        if values.len() as u64 != n * slots || mask.bytes.len() as u64 != n * k / 8 {
                            return Err(format!(
                                "sparse weight `{}` ({s}) of [{n}, {k}]: values or mask of the wrong size",
                                w.tensor
                            ));
                        }
                        let mask = mask.bytes.as_slice().to_vec();
                        (slots, Some(SparseLayer { n: s.n, m: s.m, cols: k, mask, gram: None }))
                    }
                };
                let scope = &graph.node(table).scope;
                out.push(Layer {
                    node: table,
                    scope: name.to_string(),
                    kind: kind_of(if scope.is_empty() { &w.tensor } else { scope }),
                    tensor: w.tensor.clone(),
                    n,
                    k,
                    format: w.format,
                    values,
                    gram: None,
                    gathered: false,
                    linear: false,
                    sparse,
                });
                inputs.push(Vec::new());
                layers.insert(table, out.len() - 1);
                out.len() - 1
            }
        };
        match x {
            Some(x) => {
                out[l].linear = true;
                inputs[l].push(x);
            }
            None => out[l].gathered = true,
        }
    }
    if let Some(calibration) = calibration {
        for (layer, inputs) in out.iter_mut().zip(&inputs) {
            match &mut layer.sparse {
                Some(s) => s.gram = calibration.summed(inputs),
                None => layer.gram = calibration.summed(inputs),
            }
        }
    }
    Ok(out)
}

/// The output error of `layer` stored as `format`, on the calibration data, estimated from
/// the rows `sampled` picks (about [`ERROR_ROWS`], evenly spaced): absolute, and relative
/// to the output's energy. With `gptq` (the layer's factored `H`), int formats are
/// measured as GPTQ leaves them (its tracked `trace(dW H dW^T)`), and the sampled rows'
/// bytes are kept; otherwise rounded, with the diagonal `sum_j H_jj |dW_:j|^2`. Tables
/// read by rows count `|dE|^2` per calibration token.
fn errors(layer: &Layer, format: Format, tokens: u64, clip: bool, gptq: Option<&gptq::Factored>) -> Measured {
    let (n, k) = (layer.n as usize, layer.k as usize);
    let sample: Vec<f32> = layer.values.chunks_exact(k).step_by(sample_step(n)).flatten().copied().collect();
    let rows = sample.len() / k.max(1);
    let scale = n as f64 / rows.max(1) as f64;
    // The diagonal of `H` (every row's), or a sparse layer's per sampled row.
    let diag = layer.importance((0..n).step_by(sample_step(n)));
    let bits = layer.bits(format).unwrap_or(u64::MAX / 4);
    let mut measured = Measured { format, bits, absolute: f64::INFINITY, relative: f64::INFINITY, sample: None };
    let (bytes, loss) = match (format, gptq) {
        (Format::Int(f), Some(factored)) => match factored.quantize(&sample, rows, f) {
            Ok((b, loss)) => (b, Some(loss)),
            Err(_) => return measured,
        },
        _ => match round(&sample, diag.as_deref(), format, clip.then_some(Grid::Coarse)) {
            Ok(b) => (b, None),
            Err(_) => return measured,
        },
    };
    let Ok(q) = format.dequantize(&bytes, (rows * k) as u64) else { return measured };
    let (mut absolute, mut relative) = (0.0, 0.0);
    if let Some(diag) = &diag {
        let (mut error, mut energy) = (0.0, 0.0);
        for (i, (row_w, row_q)) in sample.chunks_exact(k).zip(q.chunks_exact(k)).enumerate() {
            let diag = if diag.len() == k { &diag[..] } else { &diag[i * k..(i + 1) * k] };
            for ((&w, &q), h) in row_w.iter().zip(row_q).zip(diag) {
                error += h * ((w - q) as f64).powi(2);
                energy += h * (w as f64).powi(2);
            }
        }
        let error = loss.unwrap_or(error);
        absolute += error * scale;
        relative += error / energy.max(f64::MIN_POSITIVE);
    }
    if layer.gathered {
        let error: f64 = sample.iter().zip(&q).map(|(w, q)| ((w - q) as f64).powi(2)).sum();
        let energy: f64 = sample.iter().map(|&w| (w as f64).powi(2)).sum();
        absolute += error * scale * tokens as f64 / layer.n as f64;
        relative += error / energy.max(f64::MIN_POSITIVE);
    }
    (measured.absolute, measured.relative) = (absolute, relative);
    measured.sample = loss.map(|_| bytes);
    measured
}

/// A low-rank correction's factors `A` (`[n, r]`) and `B` (`[r, k]`).
type Correction = (Vec<f32>, Vec<f32>);

/// Whether `layer` gets a LoRC correction: a linear (not a table read by rows) with
/// calibration statistics, when the pass asks for one.
fn lorc_applies(layer: &Layer, options: &QuantizeOptions) -> bool {
    options.lorc_rank > 0 && layer.linear && !layer.gathered && layer.gram.is_some()
}

/// The stored bits of `layer`'s correction (f32 factors).
fn lorc_bits(layer: &Layer, options: &QuantizeOptions) -> u64 {
    32 * (layer.n + layer.k) * options.lorc_rank.min(layer.n.min(layer.k) as usize) as u64
}

/// Every how many rows of an `n`-row layer one is sampled to measure errors on.
fn sample_step(n: usize) -> usize {
    (n / ERROR_ROWS).max(1)
}

/// The budgeted search (`bits=B`): see the module documentation.
struct Search<'a> {
    layers: &'a [Layer],
    fixed: &'a [Option<Choice>],
    options: &'a QuantizeOptions,
    tokens: u64,
    progress: &'a (dyn Fn(usize, usize, &str) + Sync),
}

/// What the search decided, with the layers it already encoded.
struct Found {
    formats: Vec<Format>,
    sensitivities: Vec<f64>,
    encoded: Vec<Option<Encoded>>,
    notes: Vec<String>,
}

impl Search<'_> {
    fn run(&self, graph: &Graph, bits: f64, budget: u64, probe: Option<&Probe<'_>>) -> Result<Found, String> {
        let (layers, clip, method) = (self.layers, self.options.gptq.clip, self.options.method);
        let candidates: Vec<Choice> = CANDIDATES.iter().map(|c| c.parse().expect("valid candidates")).collect();
        let floor = bits.min(8.0) - BAND;
        let ceiling = if bits >= 8.0 { f64::INFINITY } else { bits + BAND };

        // 1. Each free layer's distinct candidate formats near the budget, measured as the
        // method leaves them (GPTQ from one factorization of the layer's `H`).
        (self.progress)(0, layers.len(), "measuring candidate formats");
        let measured_count = std::sync::atomic::AtomicUsize::new(0);
        // Each free layer's GPTQ factorization, once for every phase below (measuring,
        // the anchor, the layers that move): ~1.2 GFLOP of f64 for a 1536-wide input.
        let factored: Vec<Option<gptq::Factored>> = layers
            .par_iter()
            .zip(self.fixed)
            .map(|(layer, fixed)| match (&layer.gram, self.options.method, fixed) {
                (Some(g), Method::Gptq, None) => gptq::Factored::new(&g.sum, layer.k as usize, &self.options.gptq)
                    .map(Some)
                    .map_err(|e| format!("{}: {e}", layer.scope)),
                _ => Ok(None),
            })
            .collect::<Result<_, String>>()?;
        let measured: Vec<Vec<Measured>> = layers
            .par_iter()
            .zip(self.fixed)
            .zip(&factored)
            .map(|((layer, fixed), factored)| -> Result<Vec<Measured>, String> {
                let mut out: Vec<Measured> = Vec::new();
                if fixed.is_some() {
                    return Ok(out);
                }
                for c in &candidates {
                    let Some(f) = c.resolve(layer.k, layer.format) else { continue };
                    let b = f.bits_per_weight();
                    if b < floor || b > ceiling || out.iter().any(|m| m.format == f) {
                        continue;
                    }
                    if layer.bits(f).is_err() {
                        continue;
                    }
                    out.push(errors(layer, f, self.tokens, clip, factored.as_ref()));
                }
                let d = measured_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                (self.progress)(d, layers.len(), &format!("measuring {}", layer.scope));
                Ok(out)
            })
            .collect::<Result<_, _>>()?;

        // 2. The uniform choice: the candidate that spends the most of the budget (the
        // smaller error breaks ties), with overrides at their formats.
        let base_of = |c: Choice| -> Vec<Format> {
            layers
                .iter()
                .zip(self.fixed)
                .map(|(layer, fixed)| fixed.unwrap_or(c).resolve(layer.k, layer.format).unwrap_or(layer.format))
                .collect()
        };
        let cost = |formats: &[Format]| -> (u64, f64) {
            let mut total = (0u64, 0.0f64);
            for ((layer, f), m) in layers.iter().zip(formats).zip(&measured) {
                total.0 += layer.bits(*f).unwrap_or(u64::MAX / 4);
                total.1 += m.iter().find(|m| m.format == *f).map_or(0.0, |m| m.relative);
            }
            total
        };
        // The budget counts everything, so the natural format for `bits=4.5`, int4g64a, can
        // miss it by the norms' f32 weights: the anchor may overshoot by ANCHOR_SLACK (it is
        // then only measured against, never chosen).
        let uniform = candidates
            .iter()
            .map(|&c| (c, cost(&base_of(c))))
            .filter(|(_, (b, _))| *b as f64 <= budget as f64 * (1.0 + ANCHOR_SLACK))
            .max_by(|(_, (b1, e1)), (_, (b2, e2))| b1.cmp(b2).then(e2.total_cmp(e1)))
            .map(|(c, _)| c)
            .ok_or_else(|| format!("bits={bits}: even the smallest candidate format everywhere exceeds the budget"))?;
        let base = base_of(uniform);
        let base_fits = cost(&base).0 <= budget;

        // 3. Every layer at the uniform format by the pass's method.
        let done = std::sync::atomic::AtomicUsize::new(0);
        let encode_all = |formats: &[Format], skip: &[bool], what: &str| -> Result<Vec<Option<Encoded>>, String> {
            let todo = skip.iter().filter(|s| !**s).count();
            layers
                .par_iter()
                .zip(formats)
                .zip(skip)
                .enumerate()
                .map(|(l, ((layer, &f), &skip))| {
                    if skip {
                        return Ok(None);
                    }
                    let sample = measured[l].iter().find(|m| m.format == f).and_then(|m| m.sample.as_deref());
                    let r = encode(layer, f, method, &self.options.gptq, factored[l].as_ref(), sample)
                        .map(Some)
                        .map_err(|e| format!("{}: {e}", layer.scope));
                    let d = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    (self.progress)(d, todo, &format!("{what} {}", layer.scope));
                    r
                })
                .collect()
        };
        let at_base = encode_all(&base, &vec![false; layers.len()], &format!("{uniform} everywhere:"))?;
        done.store(0, std::sync::atomic::Ordering::Relaxed);
        let with = |formats: &[Format], encoded: &[Option<Encoded>], only: &dyn Fn(usize) -> bool| {
            let mut g = graph.clone();
            for (l, layer) in layers.iter().enumerate().filter(|(l, _)| only(*l)) {
                if let Some(Some(bytes)) = &encoded[l] {
                    set_weight(&mut g, layer, formats[l], bytes.clone())
                        .map_err(|e| format!("{}: {e}", layer.scope))?;
                }
            }
            Ok::<Graph, String>(g)
        };

        // 4. Each kind's end-to-end effect at the uniform format, per unit of its layers'
        // error (with a probe), or each layer's error relative to its output (without).
        let mut names: BTreeMap<String, usize> = BTreeMap::new();
        let kind: Vec<usize> = layers
            .iter()
            .map(|layer| {
                let n = names.len();
                *names.entry(layer.kind.clone()).or_insert(n)
            })
            .collect();
        let gain: Option<Vec<f64>> = match probe {
            Some(probe) => {
                let mut gain = vec![0.0; names.len()];
                for (i, (name, &k)) in names.iter().enumerate() {
                    (self.progress)(i, names.len(), &format!("probing {name} at {uniform}"));
                    let moved = probe(&with(&base, &at_base, &|l| kind[l] == k)?)?;
                    let error: f64 = (0..layers.len())
                        .filter(|&l| kind[l] == k)
                        .filter_map(|l| measured[l].iter().find(|m| m.format == base[l]).map(|m| m.absolute))
                        .sum();
                    gain[k] = if error > 0.0 { moved.max(0.0) / error } else { 0.0 };
                }
                Some(gain)
            }
            None => None,
        };
        let sensitivity = |l: usize, m: &Measured| match &gain {
            Some(gain) => gain[kind[l]] * m.absolute,
            None => m.relative,
        };

        // 5. The allocation.
        let options: Vec<Vec<(Format, u64, f64)>> = (0..layers.len())
            .map(|l| {
                let mut opts: Vec<(Format, u64, f64)> =
                    measured[l].iter().map(|m| (m.format, m.bits, sensitivity(l, m))).collect();
                if !opts.iter().any(|o| o.0 == base[l]) {
                    // Fixed, or the uniform format is below the search's floor.
                    let bits = layers[l].bits(base[l]).map_err(|e| e.to_string())?;
                    opts.push((base[l], bits, 0.0));
                }
                Ok(opts)
            })
            .collect::<Result<_, String>>()?;
        let knapsack: Vec<Knapsack> = options
            .iter()
            .zip(self.fixed)
            .map(|(opts, fixed)| Knapsack {
                choices: opts.iter().map(|&(_, bits, sensitivity)| Candidate { bits, sensitivity }).collect(),
                fixed: fixed.map(|_| opts.len() - 1),
            })
            .collect();
        let picked = allocate::allocate(&knapsack, budget).map_err(|e| format!("bits={bits}: {e}"))?;
        let formats: Vec<Format> = picked.picks.iter().zip(&options).map(|(&p, o)| o[p].0).collect();
        let sensitivities: Vec<f64> = picked.picks.iter().zip(&options).map(|(&p, o)| o[p].2).collect();

        // 6. The layers whose format moved, by the method; then, with a probe, the mix
        // against the uniform choice end to end, keeping the better.
        let moved: Vec<bool> = formats.iter().zip(&base).map(|(f, b)| f != b).collect();
        let skip: Vec<bool> = moved.iter().map(|m| !m).collect();
        let mut encoded = encode_all(&formats, &skip, "mixed:")?;
        for (l, e) in encoded.iter_mut().enumerate() {
            if !moved[l] {
                *e = at_base[l].clone();
            }
        }
        let mut notes = Vec::new();
        let changed = moved.iter().filter(|m| **m).count();
        if !base_fits {
            notes.push(format!(
                "bits={bits}: {changed} layers moved from {uniform}, which everywhere exceeds the budget"
            ));
        } else if let Some(probe) = probe.filter(|_| changed > 0) {
            (self.progress)(0, 2, "checking the mix against the uniform format");
            let mix = probe(&with(&formats, &encoded, &|_| true)?)?;
            let flat = probe(&with(&base, &at_base, &|_| true)?)?;
            if mix < flat {
                notes.push(format!(
                    "bits={bits}: the mix ({changed} layers moved from {uniform}) moves the outputs by {mix:.4e} on the probe rows, {uniform} everywhere by {flat:.4e}"
                ));
            } else {
                notes.push(format!(
                    "bits={bits}: {uniform} everywhere kept: it moves the outputs by {flat:.4e} on the probe rows, the searched mix by {mix:.4e}"
                ));
                let sensitivities = (0..layers.len())
                    .map(|l| options[l].iter().find(|o| o.0 == base[l]).map_or(0.0, |o| o.2))
                    .collect();
                return Ok(Found { formats: base, sensitivities, encoded: at_base, notes });
            }
        }
        Ok(Found { formats, sensitivities, encoded, notes })
    }
}

/// Stores `bytes` in `format` as the layer's weight in `graph`.
/// A sparse layer's bytes are its values': its mask stays, and its pattern unless [`widen`]
/// gave its rows more slots.
fn set_weight(graph: &mut Graph, layer: &Layer, format: Format, bytes: Vec<u8>) -> Result<(), kiln_ir::FormatError> {
    let data = TensorData::new(format, vec![layer.n, layer.k], Bytes::from_vec(bytes))?;
    match &layer.sparse {
        Some(s) => {
            if let Op::Weight(w) = &mut graph.node_mut(layer.node).op
                && let Some(pattern) = &mut w.sparse
            {
                pattern.n = s.n;
            }
            graph.set_sparse_values(layer.node, data)
        }
        None => graph.set_weight(layer.node, data),
    };
    Ok(())
}

/// Gives an unstructured sparse layer (`n:cols`) rows of `slots` values, the added slots
/// zeros (unread: the mask is the same).
fn widen(layer: &mut Layer, slots: u64) {
    let Some(s) = &mut layer.sparse else { return };
    let (k, w) = (layer.k as usize, slots as usize);
    let mut values = vec![0f32; layer.n as usize * w];
    for (to, from) in values.chunks_exact_mut(w).zip(layer.values.chunks_exact(k)) {
        to[..k].copy_from_slice(from);
    }
    layer.values = values;
    layer.k = slots;
    s.n = slots;
}

/// The stored bytes of `values` in `format` by rounding to nearest.
fn encode_rtn(values: &[f32], format: Format) -> Result<Vec<u8>, kiln_ir::FormatError> {
    Ok(match format {
        Format::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Format::F16 => values.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        Format::BF16 => values.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        Format::Int(f) => f.quantize(values),
        Format::Fp8(f) => f.quantize(values),
        other => {
            return Err(kiln_ir::FormatError::Unknown(format!("{other} (the quantize pass writes kiln's formats)")));
        }
    })
}

/// The stored bytes of the layer in `format` by rounding to nearest, with scales searched
/// on `clip`'s grid (weighted by the diagonal of its input's `H`, if any: `k` values that
/// every row shares, or one per value) when given.
fn round(
    values: &[f32],
    diag: Option<&[f64]>,
    format: Format,
    clip: Option<Grid>,
) -> Result<Vec<u8>, kiln_ir::FormatError> {
    match (format, clip) {
        (Format::Int(f), Some(grid)) => {
            let importance: Vec<f32> = diag.map_or(Vec::new(), |d| d.iter().map(|&h| h as f32).collect());
            Ok(clip::quantize(grid, f, values, &importance))
        }
        _ => encode_rtn(values, format),
    }
}

/// Rows of a layer its reported error is measured on (evenly spaced).
const ERROR_ROWS: usize = 256;

/// A layer's new bytes (`None`: the stored bytes stay).
type Encoded = Option<Vec<u8>>;

/// The layer's bytes in `format` by `method`; `None` if the format does not change (the
/// stored bytes stay, a GGUF block format as it is). `factored` is the layer's GPTQ
/// factorization when the caller has it (the budget search factors each layer once for
/// all its phases), and `sample` the bytes it gave the sampled rows ([`errors`]), which
/// are then not quantized again.
fn encode(
    layer: &Layer,
    format: Format,
    method: Method,
    opts: &GptqOptions,
    factored: Option<&gptq::Factored>,
    sample: Option<&[u8]>,
) -> Result<Encoded, String> {
    let (n, k) = (layer.n as usize, layer.k as usize);
    if format == layer.format {
        return Ok(None);
    }
    let bytes = match (format, method, &layer.gram, factored) {
        (Format::Int(f), Method::Gptq, Some(_), Some(fz)) => match sample {
            Some(sample) => {
                let step = sample_step(n);
                let rest: Vec<f32> = layer
                    .values
                    .chunks_exact(k)
                    .enumerate()
                    .filter(|(r, _)| r % step != 0)
                    .flat_map(|(_, row)| row)
                    .copied()
                    .collect();
                let rest = fz.quantize(&rest, rest.len() / k, f).map_err(|e| e.to_string())?.0;
                let row = format.byte_len(k as u64).map_err(|e| e.to_string())? as usize;
                let (mut sampled, mut others) = (sample.chunks_exact(row), rest.chunks_exact(row));
                let mut bytes = Vec::with_capacity(sample.len() + rest.len());
                for r in 0..n {
                    let from = if r % step == 0 { sampled.next() } else { others.next() };
                    bytes.extend_from_slice(from.ok_or("the sampled rows do not match the layer")?);
                }
                bytes
            }
            None => fz.quantize(&layer.values, n, f).map_err(|e| e.to_string())?.0,
        },
        (Format::Int(f), Method::Gptq, Some(g), None) => {
            gptq::gptq(&layer.values, n, k, &g.sum, f, opts).map_err(|e| e.to_string())?
        }
        (Format::Int(f), Method::Gptq, None, _) if layer.sparse.as_ref().is_some_and(|s| s.gram.is_some()) => {
            sparse_gptq(layer, f, opts)?
        }
        _ => round(&layer.values, layer.importance(0..n).as_deref(), format, opts.clip.then_some(Grid::Fine))
            .map_err(|e| e.to_string())?,
    };
    Ok(Some(bytes))
}

/// GPTQ on a sparse layer's kept values ([`sparsegpt::round_kept`]), over its dense rows.
/// The scales are rounding to nearest's (searched on `clip`'s grid when it is on), fixed
/// before the sweep: a group of slots spans columns that differ from row to row, so no
/// column of the sweep starts them all. Each kept value is then rounded under its group's
/// scales when the sweep reaches its column, and its error spread onto the columns after
/// it; the removed weights stay 0. Unused slots keep rounding's codes.
fn sparse_gptq(layer: &Layer, f: IntFormat, opts: &GptqOptions) -> Result<Vec<u8>, String> {
    let (Some(s), n, slots) = (&layer.sparse, layer.n as usize, layer.k as usize) else {
        return Err("not a sparse layer".into());
    };
    let g = s.gram.as_ref().ok_or("no statistics")?;
    let (cols, group) = (s.cols as usize, f.group as usize);
    let rtn = round(&layer.values, layer.importance(0..n).as_deref(), Format::Int(f), opts.clip.then_some(Grid::Fine))
        .map_err(|e| e.to_string())?;
    let mut codes = vec![0u8; n * slots];
    let scales: Vec<kiln_ir::BlockScales> = rtn
        .chunks_exact(f.block_bytes())
        .zip(codes.chunks_exact_mut(group))
        .map(|(block, codes)| f.unpack_block(block, codes))
        .collect();
    if scales.len() * group != n * slots {
        return Err(format!("{} blocks of scales for {n} rows of {slots} values", scales.len()));
    }
    // Each kept weight's slot, and the dense rows.
    let mut slot = vec![u32::MAX; n * cols];
    let mut dense = vec![0f32; n * cols];
    let mut keep = vec![false; n * cols];
    for r in 0..n {
        for (j, c) in s.columns(r).into_iter().enumerate() {
            if let Some(c) = c {
                slot[r * cols + c] = j as u32;
                dense[r * cols + c] = layer.values[r * slots + j];
                keep[r * cols + c] = true;
            }
        }
    }
    let scale = |r: usize, c: usize| scales[(r * slots + slot[r * cols + c] as usize) / group];
    let round = |r: usize, c: usize, x: f32| {
        let s = scale(r, c);
        f.value(s, f.code(s, x))
    };
    let swept = sparsegpt::round_kept(&dense, n, cols, &g.sum, &keep, opts.damp, &round).map_err(|e| e.to_string())?;
    for (i, (&v, &j)) in swept.values.iter().zip(&slot).enumerate() {
        if j != u32::MAX {
            let (r, c) = (i / cols, i % cols);
            codes[r * slots + j as usize] = f.code(scale(r, c), v);
        }
    }
    let mut bytes = Vec::with_capacity(rtn.len());
    for (s, c) in scales.iter().zip(codes.chunks_exact(group)) {
        f.pack_block(*s, c, &mut bytes);
    }
    Ok(bytes)
}

/// The layer's output error relative to its output's energy, `|dW X|^2 / |W X|^2` over the
/// calibration inputs, with `bytes` in `format` as its weight (`None`: unchanged, error
/// 0); `None` without calibration data. On every `step`-th row: the exact error costs
/// `n k^2` multiply-adds, which for all of a layer's rows takes as long as GPTQ itself,
/// so it is measured once, for the format the pass keeps.
fn relative_error(
    layer: &Layer,
    format: Format,
    bytes: Option<&[u8]>,
    correction: Option<&Correction>,
) -> Result<Option<f64>, String> {
    let gram = layer.gram.as_ref().or(layer.sparse.as_ref().and_then(|s| s.gram.as_ref()));
    let (Some(g), Some(bytes)) = (gram, bytes) else {
        return Ok(gram.map(|_| 0.0));
    };
    let (n, k) = (layer.n as usize, layer.k as usize);
    // Only the sampled rows are decoded (a tied head has 49152 rows for 256 sampled).
    let row_bytes = format.byte_len(layer.k).map_err(|e| e.to_string())? as usize;
    let (mut w, mut q) = (Vec::new(), Vec::new());
    for row in (0..n).step_by(sample_step(n)) {
        let stored = bytes.get(row * row_bytes..(row + 1) * row_bytes).ok_or("the stored bytes end early")?;
        let mut values = format.dequantize(stored, layer.k).map_err(|e| e.to_string())?;
        if let Some((a, b)) = correction {
            let r = b.len() / k;
            for (j, b) in b.chunks_exact(k).enumerate() {
                let aj = a[row * r + j];
                for (q, &b) in values.iter_mut().zip(b) {
                    *q += aj * b;
                }
            }
        }
        let stored = &layer.values[row * k..(row + 1) * k];
        match &layer.sparse {
            // Over the dense rows: the statistics are the dense columns'.
            Some(s) => {
                w.extend(s.densify_row(row, stored));
                q.extend(s.densify_row(row, &values));
            }
            None => {
                w.extend_from_slice(stored);
                q.extend(values);
            }
        }
    }
    let k = g.k;
    Ok(Some(gptq::relative_output_error(&w, &q, w.len() / k, k, &g.sum)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 2:4 sparse weight `w` of `[4, 128]` read by a linear: its dense value, which of
    /// its values are kept (the 2 largest magnitudes of each group of 4), and the graph
    /// holding its values (`[4, 64]`, f32) and mask (`u8[4, 16]`).
    fn sparse_graph() -> (Graph, Vec<f32>, Vec<bool>, Vec<f32>, Vec<u8>) {
        let (rows, cols) = (4u64, 128u64);
        let text = "graph g {\n  %0 = input \"x\" : f32[2, 128]\n  %1 = weight \"w.values\" f32 sparse 2:4 \"w.mask\" : f32[4, 128] @fc\n  %2 = linear %0, %1 : f32[2, 4] @fc\n  output \"y\" = %2\n}\n";
        let mut graph = kiln_ir::parse(text).unwrap();
        // Values of several magnitudes, rows of different ranges.
        let dense: Vec<f32> =
            (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0 * (1.0 + (i / cols) as f32)).collect();
        let mut keep = vec![false; dense.len()];
        for (g, group) in dense.chunks(4).enumerate() {
            let mut order = [0, 1, 2, 3];
            order.sort_by(|&a, &b| group[b].abs().total_cmp(&group[a].abs()));
            keep[g * 4 + order[0]] = true;
            keep[g * 4 + order[1]] = true;
        }
        let (values, mask) = kiln_ir::sparse::pack(2, 4, rows, cols, &dense, &keep).unwrap();
        graph.store.insert("w.values", TensorData::from_f32(vec![rows, cols / 2], &values));
        let mask_data =
            TensorData { format: Format::U8, shape: vec![rows, cols / 8], bytes: Bytes::from_vec(mask.clone()) };
        graph.store.insert("w.mask", mask_data);
        kiln_ir::verify(&graph).unwrap();
        (graph, dense, keep, values, mask)
    }

    fn rtn(target: Choice) -> QuantizeOptions {
        QuantizeOptions {
            target: Target::Format(target),
            method: Method::Rtn,
            overrides: Vec::new(),
            gptq: GptqOptions { clip: false, ..GptqOptions::default() },
            activations: Activations::F32,
            measure_activations: false,
            lorc_rank: 0,
        }
    }

    /// Quantizing a sparse weight rounds its kept values (groups along the values' rows of
    /// 64 slots), keeps its mask, and counts the mask in its bytes.
    #[test]
    fn a_sparse_weight_quantizes_its_values() {
        // (choice, the format of 64-slot rows, stored bytes worked out by hand: per row,
        // blocks of a 2-byte f16 scale and the codes; plus the mask's 4 x 128 / 8 = 64).
        let int8g64 = IntFormat::new(8, 64, false).unwrap();
        let int4g32 = IntFormat::new(4, 32, false).unwrap();
        for (choice, format, bytes) in
            [(Choice::Int8, int8g64, 4 * (2 + 64) + 64), (Choice::Int(int4g32), int4g32, 4 * 2 * (2 + 16) + 64)]
        {
            let (mut graph, dense, keep, values, mask) = sparse_graph();
            let report = quantize(&mut graph, &rtn(choice), None, None, &|_, _, _| {}).unwrap();
            assert!(report.notes.is_empty(), "{choice}: {:?}", report.notes);

            // The node keeps its pattern and mask, with the new format and checksum.
            let node = graph.node_ids().find(|&n| matches!(graph.node(n).op, Op::Weight(_))).unwrap();
            let Op::Weight(w) = &graph.node(node).op else { unreachable!() };
            let s = w.sparse.as_ref().expect("still sparse");
            assert_eq!((s.n, s.m, s.mask.as_str()), (2, 4, "w.mask"));
            assert_eq!(w.format, Format::Int(format), "{choice}");
            let stored = graph.store.get("w.values").unwrap();
            assert_eq!(stored.shape, [4, 64]);
            assert_eq!(w.checksum, Some(stored.checksum()));
            assert_eq!(graph.store.get("w.mask").unwrap().bytes.as_slice(), &mask[..], "{choice}: the mask changed");

            // The stored values are the values tensor rounded to nearest.
            let expected = format.quantize(&values);
            assert_eq!(stored.bytes.as_slice(), &expected[..], "{choice}");
            let rounded = Format::Int(format).dequantize(&expected, values.len() as u64).unwrap();
            // Its meaning: the j-th kept position of a row holds the row's j-th rounded value.
            let meaning = w.value(&graph.store, &[4, 128]).unwrap();
            for r in 0..4 {
                let mut j = 0;
                for c in 0..128 {
                    let i = r * 128 + c;
                    if keep[i] {
                        assert_eq!(meaning[i], rounded[r * 64 + j], "{choice} at ({r}, {c})");
                        assert!((meaning[i] - dense[i]).abs() <= dense[i].abs() * 0.2 + 0.2, "{choice} at ({r}, {c})");
                        j += 1;
                    } else {
                        assert_eq!(meaning[i], 0.0, "{choice} at ({r}, {c})");
                    }
                }
            }

            // Bytes as stored: values in the format, and the mask.
            let layer = &report.layers[0];
            assert_eq!((layer.scope.as_str(), layer.format, layer.params), ("fc", Format::Int(format), 4 * 128));
            assert_eq!(layer.bytes, bytes, "{choice}");
            assert_eq!((report.params, report.bytes), (512, bytes));
            assert_eq!(report.bits_per_weight(), bytes as f64 * 8.0 / 512.0);
            kiln_ir::verify(&graph).unwrap();
        }
    }

    /// A group that does not divide a sparse layer's 64 slots falls back to one that does,
    /// with a note.
    #[test]
    fn a_sparse_weight_falls_back_on_its_values_rows() {
        let (mut graph, ..) = sparse_graph();
        let int4g128 = IntFormat::new(4, 128, false).unwrap();
        let report = quantize(&mut graph, &rtn(Choice::Int(int4g128)), None, None, &|_, _, _| {}).unwrap();
        assert_eq!(report.layers[0].format.to_string(), "int4g64");
        assert_eq!(report.notes, ["fc: rows of 64 kept values (2:4) take groups of 64, not 128"]);
        assert_eq!(report.layers[0].bytes, 4 * (2 + 32) + 64);
    }

    /// An unstructured layer of 48 values in rows of 96 (48:96) fits no int8 group: it
    /// gets 64 slots (64:96), the added ones zeros, and keeps its meaning and mask.
    #[test]
    fn an_unstructured_layer_is_widened_to_a_group() {
        let text = "graph g {\n  %0 = input \"x\" : f32[2, 96]\n  %1 = weight \"w.values\" f32 sparse 48:96 \"w.mask\" : f32[2, 96] @fc\n  %2 = linear %0, %1 : f32[2, 2] @fc\n  output \"y\" = %2\n}\n";
        let mut graph = kiln_ir::parse(text).unwrap();
        let dense: Vec<f32> = (0..192).map(|i| ((i * 29 % 97) as f32 - 48.0) / 10.0).collect();
        // Row 0 keeps its even columns, row 1 its first 48.
        let keep: Vec<bool> = (0..192).map(|i| if i < 96 { i % 2 == 0 } else { i < 96 + 48 }).collect();
        let (values, mask) = kiln_ir::sparse::pack(48, 96, 2, 96, &dense, &keep).unwrap();
        graph.store.insert("w.values", TensorData::from_f32(vec![2, 48], &values));
        graph.store.insert(
            "w.mask",
            TensorData { format: Format::U8, shape: vec![2, 12], bytes: Bytes::from_vec(mask.clone()) },
        );
        kiln_ir::verify(&graph).unwrap();
        let report = quantize(&mut graph, &rtn(Choice::Int8), None, None, &|_, _, _| {}).unwrap();
        assert_eq!(
            report.notes,
            ["fc: rows of 48 kept values (48:96) fit no group; stored as 64:96 (zeros in the added slots)"]
        );
        let node = graph.node_ids().find(|&n| matches!(graph.node(n).op, Op::Weight(_))).unwrap();
        let Op::Weight(w) = &graph.node(node).op else { unreachable!() };
        assert_eq!((w.format.to_string(), w.sparse.as_ref().map(|s| (s.n, s.m))), ("int8g64".into(), Some((64, 96))));
        assert_eq!(graph.store.get("w.mask").unwrap().bytes.as_slice(), &mask[..]);
        // Rows of 64 values: the 48 kept, then 16 zeros, rounded with one scale per row.
        let widened: Vec<f32> = values.chunks(48).flat_map(|r| r.iter().copied().chain([0.0; 16])).collect();
        let int8g64 = IntFormat::new(8, 64, false).unwrap();
        let rounded = Format::Int(int8g64).dequantize(&int8g64.quantize(&widened), 128).unwrap();
        let meaning = w.value(&graph.store, &[2, 96]).unwrap();
        for r in 0..2 {
            let mut j = 0;
            for c in 0..96 {
                let i = r * 96 + c;
                let expected = if keep[i] { rounded[r * 64 + j] } else { 0.0 };
                j += keep[i] as usize;
                assert_eq!(meaning[i], expected, "({r}, {c})");
            }
        }
        // 2 rows of a 2-byte scale and 64 codes, and 2 x 96 / 8 bytes of mask.
        assert_eq!(report.layers[0].bytes, 2 * (2 + 64) + 24);
        kiln_ir::verify(&graph).unwrap();
    }

    /// Under GPTQ a sparse layer's kept values are rounded by the masked sweep: no note,
    /// rounding's scales and the mask stay, the removed weights stay 0, every kept value is
    /// on its group's grid, and the output error over the dense rows (by hand, against the
    /// dense `H`) is what the report says and well below rounding to nearest's.
    #[test]
    fn a_sparse_layer_under_gptq_spreads_its_errors_over_its_kept_values() {
        // H = X^T X of inputs mixed from a few sources: strongly correlated columns.
        let (t, sources) = (256, 6);
        let (z, mix) = (crate::testing::values(t * sources, 3), crate::testing::values(sources * 128, 4));
        let noise = crate::testing::values(t * 128, 5);
        let x: Vec<f64> = (0..t * 128)
            .map(|i| {
                let (r, j) = (i / 128, i % 128);
                (0..sources).map(|s| z[r * sources + s] as f64 * mix[s * 128 + j] as f64).sum::<f64>()
                    + 0.1 * noise[i] as f64
            })
            .collect();
        let mut gram = Gram::new(128);
        gram.sum = (0..128 * 128).map(|i| (0..t).map(|r| x[r * 128 + i / 128] * x[r * 128 + i % 128]).sum()).collect();
        gram.rows = t as u64;
        let int4g32 = IntFormat::new(4, 32, false).unwrap();
        let run = |method: Method| {
            let (mut graph, dense, keep, values, mask) = sparse_graph();
            let input = graph.inputs()[0];
            let calibration = Calibration { inputs: [(input, gram.clone())].into_iter().collect(), tokens: t as u64 };
            let options = QuantizeOptions { method, ..rtn(Choice::Int(int4g32)) };
            let report = quantize(&mut graph, &options, Some(&calibration), None, &|_, _, _| {}).unwrap();
            assert!(report.notes.is_empty(), "{method:?}: {:?}", report.notes);
            assert_eq!(graph.store.get("w.mask").unwrap().bytes.as_slice(), &mask[..]);
            let node = graph.node_ids().find(|&n| matches!(graph.node(n).op, Op::Weight(_))).unwrap();
            let Op::Weight(w) = &graph.node(node).op else { unreachable!() };
            let q = w.value(&graph.store, &[4, 128]).unwrap();
            let stored = graph.store.get("w.values").unwrap().bytes.as_slice().to_vec();
            // Every kept value is a code of its group's scales; removed weights are 0.
            for r in 0..4 {
                let mut slot = 0;
                for c in 0..128 {
                    let i = r * 128 + c;
                    if !keep[i] {
                        assert_eq!(q[i], 0.0, "{method:?} at ({r}, {c})");
                        continue;
                    }
                    let block = &stored[(r * 2 + slot / 32) * 18..][..18];
                    let scales = int4g32.unpack_block(block, &mut [0u8; 32]);
                    assert_eq!(int4g32.value(scales, int4g32.code(scales, q[i])), q[i], "{method:?} at ({r}, {c})");
                    slot += 1;
                }
            }
            // The error over the dense rows, by hand: trace(dW H dW^T) / trace(W H W^T).
            let pruned: Vec<f64> = dense.iter().zip(&keep).map(|(&v, &k)| if k { v as f64 } else { 0.0 }).collect();
            let quad = |v: &[f64]| -> f64 {
                (0..128)
                    .flat_map(|i| (0..128).map(move |j| (i, j)))
                    .map(|(i, j)| v[i] * gram.sum[i * 128 + j] * v[j])
                    .sum()
            };
            let (mut error, mut energy) = (0.0, 0.0);
            for r in 0..4 {
                let row = &pruned[r * 128..(r + 1) * 128];
                let d: Vec<f64> = row.iter().zip(&q[r * 128..(r + 1) * 128]).map(|(&w, &q)| q as f64 - w).collect();
                error += quad(&d);
                energy += quad(row);
            }
            let got = report.layers[0].error.expect("an error with calibration");
            assert!((got - error / energy).abs() <= 1e-6 * (error / energy), "{got} against {}", error / energy);
            assert_eq!(values.len(), 256);
            (got, stored)
        };
        let (rounded, rtn_bytes) = run(Method::Rtn);
        let (swept, gptq_bytes) = run(Method::Gptq);
        assert_eq!(rtn_bytes, int4g32.quantize(&sparse_graph().3), "rounding to nearest");
        // The same scales (each block's first two bytes), other codes.
        for (a, b) in rtn_bytes.chunks(18).zip(gptq_bytes.chunks(18)) {
            assert_eq!(a[..2], b[..2]);
        }
        assert_ne!(rtn_bytes, gptq_bytes);
        assert!(swept < 0.7 * rounded, "GPTQ {swept} against rounding {rounded}");
    }

    /// W8A8 does not reach a sparse linear: its activations stay f32, and a note says so.
    #[test]
    fn a_sparse_linear_keeps_f32_activations() {
        let (mut graph, ..) = sparse_graph();
        let options = QuantizeOptions { activations: Activations::Int8, ..rtn(Choice::Int8) };
        let report = quantize(&mut graph, &options, None, None, &|_, _, _| {}).unwrap();
        assert_eq!(
            report.notes,
            [
                "activations=int8: 1 sparse linears keep f32 activations, sparse weights running on their dense value (e.g. fc)"
            ]
        );
        let linear = graph.node_ids().find(|&n| matches!(graph.node(n).op, Op::Linear { .. })).unwrap();
        assert_eq!(graph.node(linear).op, Op::Linear { activations: Activations::F32 });
    }

    /// A weight read by two linears with different inputs is one layer whose statistics
    /// are the sum of both inputs' Gram matrices.
    #[test]
    fn a_weight_read_by_two_linears_sums_their_grams() {
        let text = "graph g {\n  %0 = input \"x\" : f32[4, 8]\n  %1 = input \"z\" : f32[4, 8]\n  %2 = weight \"w\" f32 : f32[3, 8] @fc\n  %3 = linear %0, %2 : f32[4, 3] @fc\n  %4 = linear %1, %2 : f32[4, 3] @fc\n  %5 = add %3, %4 : f32[4, 3]\n  output \"y\" = %5\n}\n";
        let mut graph = kiln_ir::parse(text).unwrap();
        let values: Vec<f32> = (0..24).map(|i| i as f32 / 24.0 - 0.5).collect();
        graph.store.insert("w", TensorData::from_f32(vec![3, 8], &values));
        kiln_ir::verify(&graph).unwrap();
        let [x, z] = graph.inputs()[..] else { panic!("two inputs") };
        let gram = |seed: f64, rows: u64| {
            let mut g = Gram::new(8);
            g.sum = (0..64).map(|i| seed + i as f64).collect();
            g.rows = rows;
            g
        };
        let calibration =
            Calibration { inputs: [(x, gram(1.0, 5)), (z, gram(100.0, 7))].into_iter().collect(), tokens: 12 };
        let layers = find_layers(&graph, Some(&calibration)).unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!((layers[0].scope.as_str(), layers[0].linear, layers[0].gathered), ("fc", true, false));
        let sum = layers[0].gram.as_ref().unwrap();
        assert_eq!(sum.rows, 12);
        let expected: Vec<f64> = (0..64).map(|i| 101.0 + 2.0 * i as f64).collect();
        assert_eq!(sum.sum, expected);
        // One input without statistics adds nothing.
        let one = Calibration { inputs: [(z, gram(100.0, 7))].into_iter().collect(), tokens: 7 };
        assert_eq!(find_layers(&graph, Some(&one)).unwrap()[0].gram.as_ref().unwrap().rows, 7);
    }
}
