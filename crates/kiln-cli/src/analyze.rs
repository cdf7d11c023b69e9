//! `kiln analyze SPEC -w W [--calib C] --similarity [--plot FILE.svg] [--json]`: how alike
//! the model's blocks are, pair by pair ([`kiln_passes::tie::similarity`]): the weight
//! cosine of every matrix role, and with calibration rows the cosine and CKA of the blocks'
//! output deltas.

use kiln_interp::Calibrator;
use kiln_interp::calibrate::{ProbeEngine, interpreter_engine};
use kiln_passes::calibration::Executor;
use kiln_passes::tie::similarity::{Similarity, Table, similarity};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use serde_json::{Value as Json, json};
use std::fmt::Write as _;
use std::path::PathBuf;

pub struct AnalyzeArgs {
    pub spec: PathBuf,
    pub weights: Option<PathBuf>,
    pub calib: Option<PathBuf>,
    pub similarity: bool,
    pub plot: Option<PathBuf>,
    pub json: bool,
}

pub fn analyze(args: AnalyzeArgs) -> Result<()> {
    if !args.similarity {
        return Err(miette!(
            help = "kiln analyze SPEC -w W --calib C --similarity [--plot FILE.svg] [--json]",
            "say what to analyze: --similarity is the one analysis so far"
        ));
    }
    let model = crate::load::load(&args.spec, args.weights.as_deref())?;
    let graph = &model.graph;
    let calibrator = match args.calib.as_deref() {
        Some(path) => {
            let inputs = crate::tensors::inputs_from(&crate::tensors::read(path)?, path, graph)?;
            // No probes: the engine is never asked to run.
            let engine: ProbeEngine = interpreter_engine();
            Some(
                Calibrator::new(graph, inputs, false, engine)
                    .map_err(|e| miette!("--calib {}: {e}", path.display()))?,
            )
        }
        None => None,
    };
    let bar = crate::progress::bar(0, "steps");
    let progress = crate::progress::steps(&bar);
    let executor = calibrator.as_ref().map(|c| c as &dyn Executor);
    let s = similarity(graph, executor, &progress).map_err(|e| miette!("similarity: {e}"))?;
    bar.finish_and_clear();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&to_json(&s)).into_diagnostic()?);
    } else {
        print!("{}", text(&s));
        if args.calib.is_none() {
            println!("(weights only: --calib compares the blocks' outputs too)");
        }
    }
    if let Some(plot) = &args.plot {
        std::fs::write(plot, svg(&s)).into_diagnostic().wrap_err_with(|| format!("cannot write {}", plot.display()))?;
        eprintln!("wrote {}", plot.display());
    }
    Ok(())
}

/// The short name of block `i` in tables: its index (the prefix's last part).
fn short(s: &Similarity, i: usize) -> &str {
    s.blocks[i].rsplit('.').next().unwrap_or(&s.blocks[i])
}

fn to_json(s: &Similarity) -> Json {
    let n = s.blocks.len();
    let table =
        |t: &Table| -> Json { (0..n).map(|i| (0..n).map(|j| json!(t.get(n, i, j))).collect::<Vec<Json>>()).collect() };
    let tables = |ts: &[Table]| -> Json {
        ts.iter().map(|t| (t.name.clone(), table(t))).collect::<serde_json::Map<_, _>>().into()
    };
    json!({
        "blocks": s.blocks,
        "tokens": s.tokens,
        "weights": tables(&s.weights),
        "outputs": tables(&s.outputs),
    })
}

/// The tables as text: each a matrix, then the most alike pairs of blocks.
fn text(s: &Similarity) -> String {
    let n = s.blocks.len();
    let mut out = String::new();
    let tables = s.weights.iter().map(|t| ("weight cosine", t)).chain(s.outputs.iter().map(|t| ("output delta", t)));
    for (kind, t) in tables {
        let _ = writeln!(out, "{kind}: {}", t.name);
        let _ = write!(out, "{:>6}", "");
        for j in 0..n {
            let _ = write!(out, "{:>6}", short(s, j));
        }
        out.push('\n');
        for i in 0..n {
            let _ = write!(out, "{:>6}", short(s, i));
            for j in 0..n {
                match t.get(n, i, j) {
                    Some(v) => {
                        let _ = write!(out, "{v:>6.2}");
                    }
                    None => out.push_str("     -"),
                }
            }
            out.push('\n');
        }
        let mut pairs: Vec<(f64, usize, usize)> =
            (0..n).flat_map(|i| (i + 1..n).filter_map(move |j| Some((t.get(n, i, j)?, i, j)))).collect();
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let best: Vec<String> =
            pairs.iter().take(5).map(|(v, i, j)| format!("{}~{} {v:.3}", short(s, *i), short(s, *j))).collect();
        let _ = writeln!(out, "most alike: {}\n", best.join(", "));
    }
    if !s.outputs.is_empty() {
        let _ = writeln!(out, "outputs compared over {} calibration tokens", s.tokens);
    }
    out
}

const PANEL: f64 = 240.0;
const PER_ROW: usize = 3;

/// One heatmap per table, in rows of [`PER_ROW`]. Each panel colours the off-diagonal
/// values from its lowest (white) to its highest (dark red), the range in its title; the
/// diagonal (a block against itself) is grey, a pair without a value blank.
fn svg(s: &Similarity) -> String {
    let n = s.blocks.len();
    let tables: Vec<(&str, &Table)> =
        s.weights.iter().map(|t| ("weights", t)).chain(s.outputs.iter().map(|t| ("outputs", t))).collect();
    let (pad, title) = (36.0, 34.0);
    let cell = PANEL / n as f64;
    let rows = tables.len().div_ceil(PER_ROW);
    let (width, height) = (PER_ROW as f64 * (PANEL + 2.0 * pad), rows as f64 * (PANEL + title + 2.0 * pad));
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"10\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (p, (kind, t)) in tables.iter().enumerate() {
        let x0 = (p % PER_ROW) as f64 * (PANEL + 2.0 * pad) + pad;
        let y0 = (p / PER_ROW) as f64 * (PANEL + title + 2.0 * pad) + pad + title;
        let off: Vec<f64> = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .filter_map(|(i, j)| t.get(n, i, j))
            .collect();
        let lo = off.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = off.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(
            out,
            "<text x=\"{x0}\" y=\"{}\" font-size=\"12\">{kind}: {}</text><text x=\"{x0}\" y=\"{}\">white {lo:.3}, dark red {hi:.3}</text>",
            y0 - 20.0,
            crate::report::escape(&t.name),
            y0 - 6.0
        );
        for i in 0..n {
            for j in 0..n {
                let fill = match t.get(n, i, j) {
                    _ if i == j => "#bbbbbb".to_string(),
                    None => continue,
                    Some(v) => {
                        let a = if hi > lo { ((v - lo) / (hi - lo)).clamp(0.0, 1.0) } else { 0.5 };
                        let (r, g, b) = (255.0 - a * 115.0, 255.0 * (1.0 - a), 255.0 * (1.0 - a));
                        format!("rgb({r:.0},{g:.0},{b:.0})")
                    }
                };
                let _ = writeln!(
                    out,
                    "<rect x=\"{:.2}\" y=\"{:.2}\" width=\"{cell:.2}\" height=\"{cell:.2}\" fill=\"{fill}\"><title>{} {} {}</title></rect>",
                    x0 + j as f64 * cell,
                    y0 + i as f64 * cell,
                    short(s, i),
                    short(s, j),
                    t.get(n, i, j).map_or("-".into(), |v| format!("{v:.4}"))
                );
            }
        }
        // Block indices along both axes, every few blocks.
        let every = n.div_ceil(10).max(1);
        for i in (0..n).step_by(every) {
            let c = (i as f64 + 0.5) * cell;
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0 - 3.0,
                y0 + c + 3.0,
                short(s, i),
                x0 + c,
                y0 + PANEL + 12.0,
                short(s, i)
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
