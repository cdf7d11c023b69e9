//! `kiln report ARTIFACT [--json] [--plot FILE.svg]`: what the passes did, layer by layer,
//! read from the reports stored in the artifact (`kiln.passes`): the formats of the last
//! quantize (or the weights as stored), and the ranks of the last factorize.

use kiln_ir::{Op, Role};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use serde_json::{Value as Json, json};
use std::path::Path;

pub fn report(path: &Path, as_json: bool, plot: Option<&Path>) -> Result<()> {
    if !kiln_rt::artifact::looks_like_artifact(path) {
        return Err(miette!(
            help = "compile one with `kiln compile SPEC -w WEIGHTS --passes ... -o OUT.kiln`",
            "{} is not a kiln artifact",
            path.display()
        ));
    }
    let artifact = kiln_rt::artifact::read(path).into_diagnostic()?;
    let passes: Json = serde_json::from_str(artifact.passes())
        .into_diagnostic()
        .wrap_err_with(|| format!("{}: the pass reports are not valid JSON", path.display()))?;
    // The last quantize report describes the stored formats; without one, every matrix is
    // listed as stored.
    let quantize = passes.as_array().into_iter().flatten().rev().find(|p| p["report"]["pass"] == "quantize");
    let (layers, bits) = match quantize {
        Some(q) => {
            (q["report"]["layers"].as_array().cloned().unwrap_or_default(), q["report"]["bits_per_weight"].clone())
        }
        None => unquantized(&artifact.graph),
    };
    // The last factorize report: each factorized layer's rank and the error it measured
    // (relative to the layer's whole spectrum), beside the rows of the layer or its factors
    // (`NAME.lowrank_u`, `NAME.lowrank_v` once quantized).
    let factorize = passes.as_array().into_iter().flatten().rev().find(|p| p["report"]["pass"] == "factorize");
    let factored: std::collections::HashMap<&str, &Json> = factorize
        .and_then(|f| f["report"]["layers"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["scope"].as_str()?, l)))
        .collect();
    let summary: Vec<Json> = layers
        .iter()
        .map(|l| {
            let scope = l["scope"].as_str().unwrap_or_default();
            let layer = scope.strip_suffix(".lowrank_u").or_else(|| scope.strip_suffix(".lowrank_v")).unwrap_or(scope);
            let f = factored.get(layer);
            let (params_before, params_after) = f.map_or((None, None), |f| params(f));
            json!({
                "scope": l["scope"], "format": l["format"], "bits_per_weight": l["bits_per_weight"],
                "bytes": l["bytes"], "sensitivity": l["sensitivity"], "error": l["error"],
                "rank": f.map(|f| if f["rank"].is_null() { json!("dense") } else { f["rank"].clone() }),
                "rank_error": f.map(|f| f["relative_error"].clone()),
                "healed": f.map(|f| f["healed"].clone()),
                "params_before": params_before, "params_after": params_after,
            })
        })
        .collect();
    // The factorized candidates' parameters before and after, over all of them.
    let candidates: Vec<Json> = factorize.and_then(|f| f["report"]["layers"].as_array().cloned()).unwrap_or_default();
    let totals = factorize.map(|f| {
        let sum = |i: usize| candidates.iter().filter_map(|l| [params(l).0, params(l).1][i]).sum::<u64>();
        let before = f["report"]["params_before"].as_u64().unwrap_or_else(|| sum(0));
        let after = f["report"]["params"].as_u64().unwrap_or_else(|| sum(1));
        (before, after, after as f64 / before.max(1) as f64)
    });
    if let Some(plot) = plot {
        std::fs::write(plot, svg(&summary))
            .into_diagnostic()
            .wrap_err_with(|| format!("cannot write {}", plot.display()))?;
    }
    // The mode the last quantize pass set, and what each linear of the IR takes by it (what
    // `run`, `eval`, `generate` and `bench` run unless `--activations` overrides it).
    let activations = quantize.and_then(|q| q["report"]["activations"].as_str()).unwrap_or("f32");
    let mut linears: std::collections::BTreeMap<&str, usize> = Default::default();
    for id in artifact.graph.node_ids() {
        if let Op::Linear { activations } = artifact.graph.node(id).op {
            *linears.entry(activations.name()).or_default() += 1;
        }
    }
    if as_json {
        let mut json =
            json!({"layers": summary, "bits_per_weight": bits, "activations": activations, "linears": linears});
        if let Some((before, after, ratio)) = totals {
            json["factorized"] = json!({"params_before": before, "params_after": after, "ratio": ratio});
        }
        println!("{json}");
        return Ok(());
    }
    let calls: Vec<&str> = passes.as_array().into_iter().flatten().filter_map(|p| p["call"].as_str()).collect();
    println!("{}: passes {}", path.display(), if calls.is_empty() { "none".to_string() } else { calls.join("; ") });
    let ranks = factorize.is_some();
    let mut header =
        format!("{:<28} {:<12} {:>6} {:>12} {:>12} {:>10}", "scope", "format", "bits", "bytes", "sensitivity", "error");
    let healed = factorize.is_some_and(|f| !f["report"]["heal"].is_null());
    if ranks {
        header += &format!(" {:>6} {:>13} {:>12} {:>10}", "rank", "params before", "params after", "rank error");
    }
    if healed {
        header += &format!(" {:>13}", "healed error");
    }
    println!("{header}");
    for l in &summary {
        let num = |v: &Json, digits: usize| v.as_f64().map_or("-".to_string(), |x| format!("{x:.digits$e}"));
        let mut row = format!(
            "{:<28} {:<12} {:>6.2} {:>12} {:>12} {:>10}",
            l["scope"].as_str().unwrap_or("?"),
            l["format"].as_str().unwrap_or("?"),
            l["bits_per_weight"].as_f64().unwrap_or(0.0),
            l["bytes"].as_u64().unwrap_or(0),
            num(&l["sensitivity"], 2),
            num(&l["error"], 2),
        );
        if ranks {
            // A rank, "dense" (a candidate left dense), or "-" (not a candidate).
            let rank = match &l["rank"] {
                Json::Number(r) => r.to_string(),
                Json::String(s) => s.clone(),
                _ => "-".to_string(),
            };
            let count = |v: &Json| v.as_u64().map_or("-".to_string(), |p| p.to_string());
            row += &format!(
                " {rank:>6} {:>13} {:>12} {:>10}",
                count(&l["params_before"]),
                count(&l["params_after"]),
                num(&l["rank_error"], 2)
            );
        }
        if healed {
            // The refit's layer-wise error over the one-shot factors' (on the inputs of the
            // model healed so far), and whether the probe kept it.
            let h = &l["healed"];
            let cell = match (h["error_before"].as_f64(), h["error_after"].as_f64(), h["kept"].as_bool()) {
                (Some(b), Some(a), Some(kept)) => {
                    format!("{:.3}x {}", a / b.max(f64::MIN_POSITIVE), if kept { "kept" } else { "no" })
                }
                _ => "-".to_string(),
            };
            row += &format!(" {cell:>13}");
        }
        println!("{row}");
    }
    if let (Some(f), Some((before, after, ratio))) = (factorize, totals) {
        println!(
            "factorize ({}): {:.1}% of the factorized layers' parameters kept; rank error: the discarded share of the layer's (whitened) spectrum",
            f["report"]["method"].as_str().unwrap_or("?"),
            100.0 * ratio
        );
        println!(
            "parameters of the {} factorize candidates: {before} before, {after} after (ratio {ratio:.4}); params after: rank * (rows + columns), or rows * columns for a candidate left dense",
            candidates.len()
        );
        let heal = &f["report"]["heal"];
        if let (Some(before), Some(after)) = (heal["probe_before"].as_f64(), heal["probe_after"].as_f64()) {
            println!(
                "healing: the probe moved from {before:.4e} to {after:.4e}; healed error: the refit's layer-wise error over the one-shot factors' on the same inputs, and whether the probe kept it"
            );
        }
        for note in f["report"]["notes"].as_array().into_iter().flatten() {
            println!("note: {}", note.as_str().unwrap_or_default());
        }
    }
    println!("average over all parameters: {:.3} bits per weight", bits.as_f64().unwrap_or(0.0));
    let by_mode: Vec<String> = linears.iter().map(|(mode, n)| format!("{n} {mode}")).collect();
    println!("activations of linears on quantized weights: {activations} (linears: {})", by_mode.join(", "));
    for note in quantize.into_iter().flat_map(|q| q["report"]["notes"].as_array().cloned().unwrap_or_default()) {
        println!("note: {}", note.as_str().unwrap_or_default());
    }
    Ok(())
}

/// Layers of an artifact no quantize pass ran on, from its layer table: each layer's main
/// weight as stored, its bytes counting every weight of the layer. The average counts every
/// stored tensor once.
fn unquantized(graph: &kiln_ir::Graph) -> (Vec<Json>, Json) {
    let (mut params, mut bytes) = (0u64, 0u64);
    let mut seen = std::collections::HashSet::new();
    for n in graph.node_ids() {
        let Op::Weight(w) = &graph.node(n).op else { continue };
        if graph.store.get(&w.tensor).is_some() && seen.insert(w.tensor.clone()) {
            params += graph.node(n).ty.shape.iter().filter_map(|d| d.known()).product::<u64>();
            bytes += w.stored_bytes(&graph.store);
        }
    }
    let stored = |id| match &graph.node(id).op {
        Op::Weight(w) => w.stored_bytes(&graph.store),
        _ => 0,
    };
    let mut layers = Vec::new();
    for (name, layer) in graph.layers.iter() {
        let shape = |id| -> Vec<u64> { graph.node(id).ty.shape.iter().filter_map(|d| d.known()).collect() };
        // A factorized layer: the shape it had, its factors' format and rank.
        let (elements, format) =
            match (layer.main(), layer.role(Role::LowRankU).next(), layer.role(Role::LowRankV).next()) {
                (Some(id), ..) => match &graph.node(id).op {
                    Op::Weight(main) => (shape(id).iter().product::<u64>(), main.storage()),
                    _ => continue,
                },
                (None, Some(u), Some(v)) => match &graph.node(u).op {
                    Op::Weight(w) => {
                        let (u, v) = (shape(u), shape(v));
                        (u[0] * v[1], format!("{} rank {}", w.storage(), u[1]))
                    }
                    _ => continue,
                },
                _ => continue,
            };
        let layer_bytes: u64 = layer.weights.iter().map(|&(_, id)| stored(id)).sum();
        layers.push(json!({
            "scope": name, "format": format,
            "bits_per_weight": layer_bytes as f64 * 8.0 / elements.max(1) as f64,
            "bytes": layer_bytes, "sensitivity": null, "error": null,
        }));
    }
    (layers, json!(bytes as f64 * 8.0 / params.max(1) as f64))
}

/// A factorize candidate's parameters (from its JSON layer) before (rows * columns) and
/// after (rank * (rows + columns), or as before when it stayed dense), as the pass counted
/// them, or from its shape and rank in a report that did not record them.
fn params(layer: &Json) -> (Option<u64>, Option<u64>) {
    let (n, k) = (layer["n"].as_u64(), layer["k"].as_u64());
    let before = layer["params_before"].as_u64().or(n.zip(k).map(|(n, k)| n * k));
    let after = layer["params"].as_u64().or_else(|| match layer["rank"].as_u64() {
        Some(r) => n.zip(k).map(|(n, k)| r * (n + k)),
        None => before,
    });
    (before, after)
}

/// Bits per weight as bars and log10 sensitivity as a line, one column per layer.
fn svg(layers: &[Json]) -> String {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let n = layers.len().max(1) as f64;
    let step = (w - 2.0 * pad) / n;
    let bits: Vec<f64> = layers.iter().map(|l| l["bits_per_weight"].as_f64().unwrap_or(0.0)).collect();
    let max_bits = bits.iter().cloned().fold(1.0, f64::max);
    let logs: Vec<Option<f64>> =
        layers.iter().map(|l| l["sensitivity"].as_f64().filter(|s| *s > 0.0).map(f64::log10)).collect();
    let (lo, hi) = logs.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">bits per weight (bars, left axis, max {max_bits:.1}) and log10 sensitivity (line, right axis) by layer</text>\n"
    );
    let y_of = |frac: f64| h - pad - frac * (h - 2.0 * pad);
    for (i, b) in bits.iter().enumerate() {
        let (x, y) = (pad + i as f64 * step, y_of(b / max_bits));
        let title = layers[i]["scope"].as_str().unwrap_or("?");
        let format = layers[i]["format"].as_str().unwrap_or("?");
        out += &format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#7aa6d6\"><title>{title}: {format}, {b:.2} bits</title></rect>\n",
            (step * 0.8).max(0.5),
            h - pad - y
        );
    }
    if lo.is_finite() {
        let span = (hi - lo).max(1e-9);
        let points: Vec<String> = logs
            .iter()
            .enumerate()
            .filter_map(|(i, l)| {
                l.map(|v| format!("{:.1},{:.1}", pad + (i as f64 + 0.4) * step, y_of((v - lo) / span)))
            })
            .collect();
        out += &format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"#c0392b\" stroke-width=\"1.5\"/>\n",
            points.join(" ")
        );
        out += &format!("<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">1e{hi:.1}</text>\n", w - 5.0, pad);
        out += &format!("<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">1e{lo:.1}</text>\n", w - 5.0, h - pad);
    }
    out += &format!(
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<text x=\"5\" y=\"{pad}\">{max_bits:.1}</text>\n<text x=\"5\" y=\"{0}\">0</text>\n</svg>\n",
        h - pad,
        w - pad
    );
    out
}
