//! `kiln report ARTIFACT [--json] [--plot FILE.svg]`: what the passes did, layer by layer,
//! read from the reports stored in the artifact (`kiln.passes`): the formats of the last
//! quantize (or the weights as stored), the ranks (or a tensor train's bonds) of the last
//! factorize, and the patterns or sparsity of the last prune: per candidate layer its
//! weight's bytes before and after, bits per weight, output error and kernel (when the
//! pass gave them) and why it stayed dense, then the pass's summary and notes; with
//! `--plot`, a panel of sparsity by candidate. A layer a quantize report does not list (a
//! tensor train, a sparse weight) or lists from before a later prune is listed as stored.

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
    let reports: Vec<&Json> = passes.as_array().into_iter().flatten().collect();
    // A structured prune (heads, channels) has lines of its own, not the mask columns.
    let structured = |p: &Json| p["report"]["structured"] == true;
    let last = |pass: &str| reports.iter().rposition(|p| p["report"]["pass"] == pass && !structured(p));
    let (quantize_at, prune_at) = (last("quantize"), last("prune"));
    // The last quantize report describes the stored formats; without one, every matrix is
    // listed as stored.
    let quantize = quantize_at.map(|i| reports[i]);
    let prune = prune_at.map(|i| reports[i]);
    // A prune after the last quantize stored its layers anew (float values and a mask), so
    // the quantize report's average no longer holds: the artifact's is given instead.
    let pruned_since = matches!((quantize_at, prune_at), (Some(q), Some(p)) if p > q);
    let (mut layers, bits) = match quantize {
        Some(q) if !pruned_since => {
            (q["report"]["layers"].as_array().cloned().unwrap_or_default(), q["report"]["bits_per_weight"].clone())
        }
        Some(q) => (q["report"]["layers"].as_array().cloned().unwrap_or_default(), unquantized(&artifact.graph).1),
        None => unquantized(&artifact.graph),
    };
    // A quantize leaves tensor trains and sparse weights alone, so its report does not list
    // them: their rows as stored, and then every row in name order. A layer a later prune
    // made sparse is listed as stored too, in place of the format the quantize gave it.
    if quantize.is_some() {
        let graph = &artifact.graph;
        let sparse = |name: &str| {
            graph
                .layers
                .main_of(name)
                .is_some_and(|id| matches!(&graph.node(id).op, Op::Weight(w) if w.sparse.is_some()))
        };
        let listed: std::collections::HashSet<String> =
            layers.iter().filter_map(|l| l["scope"].as_str().map(String::from)).collect();
        let stored: Vec<Json> = unquantized(graph)
            .0
            .into_iter()
            .filter(|l| {
                l["scope"].as_str().is_some_and(|s| match listed.contains(s) {
                    true => pruned_since && sparse(s),
                    false => sparse(s) || graph.layers.get(s).is_some_and(kiln_ir::Layer::is_train),
                })
            })
            .collect();
        if !stored.is_empty() {
            layers.retain(|l| !stored.iter().any(|s| s["scope"] == l["scope"]));
            layers.extend(stored);
            layers.sort_by(|a, b| a["scope"].as_str().cmp(&b["scope"].as_str()));
        }
    }
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
    // The last prune report: each candidate's pattern (or why it stayed dense), its
    // weight's bytes before and after, bits per weight and, where the pass gave them, its
    // output error and the kernel that runs it.
    let pruned: std::collections::HashMap<&str, &Json> = prune
        .and_then(|p| p["report"]["layers"].as_array())
        .into_iter()
        .flatten()
        .filter_map(|l| Some((l["scope"].as_str()?, l)))
        .collect();
    let summary: Vec<Json> =
        layers
            .iter()
            .map(|l| {
                let scope = l["scope"].as_str().unwrap_or_default();
                let layer =
                    scope.strip_suffix(".lowrank_u").or_else(|| scope.strip_suffix(".lowrank_v")).unwrap_or(scope);
                let f = factored.get(layer);
                let (params_before, params_after) = f.map_or((None, None), |f| params(f));
                // A sparse weight's pattern as stored (a quantize may have given its rows more
                // slots than prune chose), beside a format that does not say it.
                let sparse = artifact.graph.layers.get(layer).and_then(kiln_ir::Layer::main).and_then(|w| {
                    let cols = artifact.graph.node(w).ty.known_shape().and_then(|s| s.last().copied()).unwrap_or(0);
                    match &artifact.graph.node(w).op {
                        Op::Weight(w) => w.sparse.as_ref().map(|s| (s.pattern(), s.n, s.m, cols)),
                        _ => None,
                    }
                });
                let stored = sparse.as_ref().map(|(p, ..)| p.clone());
                // Which kernel the engine runs a sparse weight with (kiln_exec::sparse).
                let kernel = sparse.as_ref().map(|&(_, n, m, cols)| {
                    if kiln_exec::sparse::SparseWeight::fits(n, m, cols) { "sparse" } else { "dense" }
                });
                let format = match (l["format"].as_str(), stored) {
                    (Some(f), Some(p)) if !f.contains(':') => json!(format!("{f} {p}")),
                    _ => l["format"].clone(),
                };
                json!({
                    "scope": l["scope"], "format": format, "bits_per_weight": l["bits_per_weight"],
                    "bytes": l["bytes"], "sensitivity": l["sensitivity"], "error": l["error"],
                    "rank": f.map(|f| if f["rank"].is_null() { json!("dense") } else { f["rank"].clone() }),
                    "bonds": f.map(|f| f["bonds"].clone()),
                    "rank_error": f.map(|f| f["relative_error"].clone()),
                    "svd_error": f.map(|f| f["svd_relative_error"].clone()),
                    "healed": f.map(|f| f["healed"].clone()),
                    "params_before": params_before, "params_after": params_after,
                    "prune": pruned.get(scope).map(|p| {
                        let mut row = prune_row(p);
                        row["kernel"] = json!(kernel);
                        row
                    }),
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
    let prune_candidates: Vec<Json> = prune
        .and_then(|p| p["report"]["layers"].as_array())
        .into_iter()
        .flatten()
        .map(|l| json!({"scope": l["scope"], "rows": l["rows"], "cols": l["cols"], "prune": prune_row(l)}))
        .collect();
    if let Some(plot) = plot {
        let ranks = factorize.map(|_| candidates.as_slice());
        let sparsity = prune.map(|_| prune_candidates.as_slice());
        std::fs::write(plot, svg(&summary, ranks, sparsity))
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
        let drops: Vec<Json> = passes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["report"]["pass"] == "drop")
            .map(|p| json!({"blocks": p["report"]["blocks"], "dropped": p["report"]["dropped"]}))
            .collect();
        if !drops.is_empty() {
            json["dropped"] = Json::Array(drops);
        }
        let tied: Vec<Json> = passes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["report"]["pass"] == "tie")
            .flat_map(|p| p["report"]["tied"].as_array().cloned().unwrap_or_default())
            .collect();
        if !tied.is_empty() {
            json["tied"] = Json::Array(tied);
        }
        let groups: Vec<Json> = reports
            .iter()
            .filter(|p| structured(p))
            .flat_map(|p| p["report"]["groups"].as_array().cloned().unwrap_or_default())
            .collect();
        if !groups.is_empty() {
            json["structured"] = Json::Array(groups);
        }
        if let Some(p) = prune {
            let r = &p["report"];
            json["pruned"] = json!({
                "method": r["method"], "target": r["target"], "sparsity": r["sparsity"],
                "candidates": prune_candidates.len(), "pruned": pruned_count(&prune_candidates),
                "params_before": r["params_before"], "params_after": r["params"],
                "bytes_before": r["bytes_before"], "bytes_after": r["bytes"],
            });
        }
        println!("{json}");
        return Ok(());
    }
    let calls: Vec<&str> = passes.as_array().into_iter().flatten().filter_map(|p| p["call"].as_str()).collect();
    println!("{}: passes {}", path.display(), if calls.is_empty() { "none".to_string() } else { calls.join("; ") });
    let ranks = factorize.is_some();
    let trains = factorize.is_some_and(|f| f["report"]["method"] == "tt");
    let mut header =
        format!("{:<28} {:<12} {:>6} {:>12} {:>12} {:>10}", "scope", "format", "bits", "bytes", "sensitivity", "error");
    let healed = factorize.is_some_and(|f| !f["report"]["heal"].is_null());
    if ranks {
        let rank = if trains { "bonds" } else { "rank" };
        header += &format!(" {rank:>6} {:>13} {:>12} {:>10}", "params before", "params after", "rank error");
    }
    if trains {
        header += &format!(" {:>10}", "SVD error");
    }
    if healed {
        header += &format!(" {:>13}", "healed error");
    }
    if prune.is_some() {
        header += &format!(
            " {:>9} {:>8} {:>12} {:>11} {:>11} {:>11} {:>8}  {}",
            "pattern",
            "sparsity",
            "bytes before",
            "bytes after",
            "pruned bits",
            "prune error",
            "kernel",
            "dense because"
        );
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
            // A rank, a train's bonds, "dense" (a candidate left dense), or "-" (not a
            // candidate).
            let bonds: Vec<String> =
                l["bonds"].as_array().into_iter().flatten().filter_map(|b| Some(b.as_u64()?.to_string())).collect();
            let rank = match &l["rank"] {
                Json::Number(_) if !bonds.is_empty() => bonds.join("x"),
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
        if trains {
            row += &format!(" {:>10}", num(&l["svd_error"], 2));
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
        if prune.is_some() {
            // A prune candidate's pattern ("dense" when left dense) and the rest, or "-" in
            // every column for a layer that was not one.
            let p = &l["prune"];
            let text = |v: &Json| v.as_str().map_or("-".to_string(), String::from);
            let count = |v: &Json| v.as_u64().map_or("-".to_string(), |n| n.to_string());
            row += &format!(
                " {:>9} {:>8} {:>12} {:>11} {:>11} {:>11} {:>8}  {}",
                text(&p["pattern"]),
                p["sparsity"].as_f64().map_or("-".to_string(), |s| format!("{:.1}%", 100.0 * s)),
                count(&p["bytes_before"]),
                count(&p["bytes_after"]),
                p["bits_per_weight"].as_f64().map_or("-".to_string(), |b| format!("{b:.2}")),
                num(&p["error"], 2),
                text(&p["kernel"]),
                text(&p["dense_because"]),
            );
        }
        println!("{}", row.trim_end());
    }
    if let (Some(f), Some((before, after, ratio))) = (factorize, totals) {
        println!(
            "factorize ({}): {:.1}% of the factorized layers' parameters kept; rank error: the discarded share of the layer's (whitened) spectrum",
            f["report"]["method"].as_str().unwrap_or("?"),
            100.0 * ratio
        );
        let counted = if trains { "the cores' values and the column scale" } else { "rank * (rows + columns)" };
        println!(
            "parameters of the {} factorize candidates: {before} before, {after} after (ratio {ratio:.4}); params after: {counted}, or rows * columns for a candidate left dense",
            candidates.len()
        );
        if trains {
            println!(
                "bonds: a tensor train's bonds between its cores; SVD error: the rank error of the SVD (whitened as the train is) at the rank storing at most the train's parameters"
            );
        }
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
    if let Some(p) = prune {
        let r = &p["report"];
        let count = |v: &Json| v.as_u64().map_or("?".to_string(), |n| n.to_string());
        println!(
            "prune ({}, {}): {} of {} layers pruned, {:.1}% of their weights removed; {} -> {} bytes, masks included",
            r["method"].as_str().unwrap_or("?"),
            r["target"].as_str().unwrap_or("?"),
            pruned_count(&prune_candidates),
            prune_candidates.len(),
            100.0 * r["sparsity"].as_f64().unwrap_or(0.0),
            count(&r["bytes_before"]),
            count(&r["bytes"]),
        );
        println!(
            "pattern: N kept of every M weights along a row (N:columns when unstructured), dense for a candidate left dense; sparsity: the share of its weights removed; bytes before and after: the weight's, its mask included; prune error: the layer's output error relative to its output energy on the calibration data; kernel: sparse = the sparse kernel for up to 4 rows (decode), the dense value for more; dense = always the dense value"
        );
        for note in r["notes"].as_array().into_iter().flatten() {
            println!("note: {}", note.as_str().unwrap_or_default());
        }
    }
    // Each drop: the blocks it removed, in the order chosen, with the probe's distance.
    for d in passes.as_array().into_iter().flatten().filter(|p| p["report"]["pass"] == "drop") {
        let r = &d["report"];
        let dropped: Vec<String> = r["dropped"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|b| {
                let scope = b["scope"].as_str().unwrap_or("?");
                match b["probe"].as_f64() {
                    Some(p) => format!("{scope} (probe {p:.4e})"),
                    None => scope.to_string(),
                }
            })
            .collect();
        println!(
            "drop: {} of {} blocks removed: {}; {} parameters",
            dropped.len(),
            r["blocks"].as_u64().unwrap_or(0),
            dropped.join(", "),
            r["params"].as_u64().unwrap_or(0)
        );
        for note in r["notes"].as_array().into_iter().flatten() {
            println!("note: {}", note.as_str().unwrap_or_default());
        }
    }
    // Each tie: per role tied across a group, its members, the shared weight's shape, the
    // deltas' rank, the parameters before and after and each member's measured error.
    for t in passes.as_array().into_iter().flatten().filter(|p| p["report"]["pass"] == "tie") {
        let r = &t["report"];
        for g in r["tied"].as_array().into_iter().flatten() {
            let members: Vec<&str> = g["layers"].as_array().into_iter().flatten().filter_map(|l| l.as_str()).collect();
            let errors: Vec<String> = g["errors"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| e.as_f64().map_or("-".to_string(), |e| format!("{e:.4}")))
                .collect();
            println!(
                "tie: {} share [{}, {}] with deltas of rank {}; {} -> {} parameters; errors {}",
                members.join(" + "),
                g["rows"].as_u64().unwrap_or(0),
                g["cols"].as_u64().unwrap_or(0),
                g["rank"].as_u64().unwrap_or(0),
                g["params_before"].as_u64().unwrap_or(0),
                g["params"].as_u64().unwrap_or(0),
                errors.join(", ")
            );
        }
        for note in r["notes"].as_array().into_iter().flatten() {
            println!("note: {}", note.as_str().unwrap_or_default());
        }
    }
    // Each structured prune: per consumer, the units kept, the parameters of the weights
    // around them, the measured error and whether the refit was kept.
    for p in reports.iter().filter(|p| structured(p)) {
        let r = &p["report"];
        for g in r["groups"].as_array().into_iter().flatten() {
            let error = g["error"].as_f64().map_or("-".to_string(), |e| format!("{e:.4}"));
            let refit = match g["healed"]["kept"].as_bool() {
                Some(true) => "refit kept",
                Some(false) => "refit dropped (the probe did not improve)",
                None => "not refit",
            };
            println!(
                "prune: {} {} of {} {} kept; {} -> {} parameters; error {error}; {refit}",
                g["scope"].as_str().unwrap_or("?"),
                g["kept"].as_u64().unwrap_or(0),
                g["units"].as_u64().unwrap_or(0),
                g["kind"].as_str().unwrap_or("?"),
                g["params_before"].as_u64().unwrap_or(0),
                g["params"].as_u64().unwrap_or(0),
            );
        }
        for note in r["notes"].as_array().into_iter().flatten() {
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
        let shape = |id| -> Vec<u64> { graph.node(id).ty.known_shape().unwrap_or_default() };
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
                // A tensor train: cores [r, o, i, r'], the shape their products make.
                _ if layer.is_train() => {
                    let cores: Vec<Vec<u64>> = layer.role(Role::TtCore).map(shape).collect();
                    let (n, k) =
                        cores.iter().fold((1, 1), |(n, k), c| (n * c.get(1).unwrap_or(&1), k * c.get(2).unwrap_or(&1)));
                    let bonds: Vec<String> =
                        cores.iter().skip(1).map(|c| c.first().unwrap_or(&0).to_string()).collect();
                    (n * k, format!("f32 train {}", bonds.join("x")))
                }
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

/// A prune report's layer as the report's rows give it: its pattern ("dense" when left
/// dense), the share of its weights removed, its weight's bytes before and after, bits per
/// weight, and the output error, kernel and reason for staying dense when given (null
/// otherwise).
fn prune_row(l: &Json) -> Json {
    json!({
        "pattern": if l["pattern"].is_null() { json!("dense") } else { l["pattern"].clone() },
        "sparsity": l["kept"].as_f64().map(|k| 1.0 - k), "kept": l["kept"],
        "bytes_before": l["bytes_before"], "bytes_after": l["bytes"], "bits_per_weight": l["bits_per_weight"],
        "error": l["error"], "kernel": l["kernel"], "dense_because": l["dense_because"],
    })
}

/// How many of the prune candidates (as [`prune_row`] gives them) were made sparse.
fn pruned_count(candidates: &[Json]) -> usize {
    candidates.iter().filter(|l| l["prune"]["pattern"].as_str().is_some_and(|p| p != "dense")).count()
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

/// `text` with the characters XML gives a meaning escaped.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const WIDTH: f64 = 900.0;
const PAD: f64 = 50.0;

/// The plot: bits per weight and sensitivity by layer, below it, after a factorize, each
/// candidate's rank as a fraction of its full rank, and below that, after a prune, each
/// candidate's sparsity.
fn svg(layers: &[Json], ranks: Option<&[Json]>, sparsity: Option<&[Json]>) -> String {
    let (bits, bits_height) = bits_panel(layers, 0.0);
    let (ranks, ranks_height) = ranks.map_or((String::new(), 0.0), |r| rank_panel(r, bits_height));
    let (sparsity, sparsity_height) =
        sparsity.map_or((String::new(), 0.0), |p| sparsity_panel(p, bits_height + ranks_height));
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n{bits}{ranks}{sparsity}</svg>\n",
        bits_height + ranks_height + sparsity_height
    )
}

/// Bits per weight as bars and log10 sensitivity as a line, one column per layer, in a
/// panel whose top is at `top`; returns it and its height.
fn bits_panel(layers: &[Json], top: f64) -> (String, f64) {
    let (w, h, pad) = (WIDTH, 360.0, PAD);
    let n = layers.len().max(1) as f64;
    let step = (w - 2.0 * pad) / n;
    let bits: Vec<f64> = layers.iter().map(|l| l["bits_per_weight"].as_f64().unwrap_or(0.0)).collect();
    let max_bits = bits.iter().cloned().fold(1.0, f64::max);
    let logs: Vec<Option<f64>> =
        layers.iter().map(|l| l["sensitivity"].as_f64().filter(|s| *s > 0.0).map(f64::log10)).collect();
    let (lo, hi) = logs.iter().flatten().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let mut out = format!(
        "<text x=\"{pad}\" y=\"{:.0}\">bits per weight (bars, left axis, max {max_bits:.1}) and log10 sensitivity (line, right axis) by layer</text>\n",
        top + 20.0
    );
    let y_of = |frac: f64| top + h - pad - frac * (h - 2.0 * pad);
    for (i, b) in bits.iter().enumerate() {
        let (x, y) = (pad + i as f64 * step, y_of(b / max_bits));
        let title = escape(layers[i]["scope"].as_str().unwrap_or("?"));
        let format = escape(layers[i]["format"].as_str().unwrap_or("?"));
        out += &format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#7aa6d6\"><title>{title}: {format}, {b:.2} bits</title></rect>\n",
            (step * 0.8).max(0.5),
            y_of(0.0) - y
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
        out += &format!("<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">1e{hi:.1}</text>\n", w - 5.0, y_of(1.0));
        out += &format!("<text x=\"{:.0}\" y=\"{:.0}\" text-anchor=\"end\">1e{lo:.1}</text>\n", w - 5.0, y_of(0.0));
    }
    out += &format!(
        "<line x1=\"{pad}\" y1=\"{0}\" x2=\"{1}\" y2=\"{0}\" stroke=\"black\"/>\n<text x=\"5\" y=\"{2}\">{max_bits:.1}</text>\n<text x=\"5\" y=\"{0}\">0</text>\n",
        y_of(0.0),
        w - pad,
        y_of(1.0)
    );
    (out, h)
}

/// A panel of one bar per candidate on a 0..1 axis (the rank and sparsity panels): where
/// the bars go, and their drawing.
struct Bars {
    top: f64,
    left: f64,
    step: f64,
    /// Every `every`-th candidate is named below the axis.
    every: usize,
}

impl Bars {
    const PLOT_H: f64 = 240.0;

    /// Lays out `candidates` (named by `scope`) in a panel whose top is at `top`: the
    /// panel's frame (title, ticks and grid, the axis named `axis`, a legend of the bars'
    /// colour `colour` for `made` and grey for `dense`), and its height.
    fn new(
        candidates: &[Json],
        top: f64,
        title: &str,
        axis: &str,
        (colour, made): (&str, &str),
        dense: &str,
    ) -> (Bars, String, f64) {
        let (w, pad) = (WIDTH, PAD);
        let n = candidates.len().max(1) as f64;
        // Every candidate is named below the axis when there is room, else every `every`-th,
        // slanted at 60 degrees: room below for the longest name (about 5 pixels a character
        // at this size) and on the left for the first.
        let every = (candidates.len() as f64 / 80.0).ceil().max(1.0) as usize;
        let length = |l: &Json| 5.0 * l["scope"].as_str().map_or(1, str::len) as f64;
        let longest = candidates.iter().step_by(every).map(length).fold(0.0, f64::max);
        let label_h = (0.87 * longest + 20.0).min(400.0);
        let left = candidates.first().map_or(pad, |l| pad.max(0.5 * length(l) + 5.0 - 0.5 * (w - 2.0 * pad) / n));
        let bars = Bars { top, left, step: (w - left - pad) / n, every };
        let mut out = format!("<text x=\"{left:.0}\" y=\"{:.0}\">{title}</text>\n", top + 30.0);
        // The axis, its ticks and grid lines.
        for tick in [0.0, 0.25, 0.5, 0.75, 1.0] {
            let y = bars.y(tick);
            out += &format!(
                "<line x1=\"{left:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{}\"/>\n<text x=\"{:.0}\" y=\"{:.1}\" text-anchor=\"end\">{tick:.2}</text>\n",
                w - pad,
                if tick == 0.0 { "black" } else { "#dddddd" },
                left - 6.0,
                y + 4.0
            );
        }
        out += &format!(
            "<text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{axis}</text>\n",
            left - 36.0,
            bars.y(0.5)
        );
        // The legend, top right.
        let (lx, ly) = (w - pad - 250.0, top + 12.0);
        out += &format!(
            "<rect x=\"{lx:.0}\" y=\"{ly:.0}\" width=\"10\" height=\"10\" fill=\"{colour}\"/><text x=\"{:.0}\" y=\"{:.0}\">{made}</text>\n\
             <rect x=\"{:.0}\" y=\"{ly:.0}\" width=\"10\" height=\"10\" fill=\"#bbbbbb\" stroke=\"#555555\"/><text x=\"{:.0}\" y=\"{:.0}\">{dense}</text>\n",
            lx + 14.0,
            ly + 9.5,
            lx + 110.0,
            lx + 124.0,
            ly + 9.5
        );
        (bars, out, pad + Self::PLOT_H + label_h)
    }

    /// The height on the page of `frac` on the axis.
    fn y(&self, frac: f64) -> f64 {
        self.top + PAD + (1.0 - frac) * Self::PLOT_H
    }

    /// Candidate `i`'s bar from the axis up to `y`, of `class` and `style`, titled, with a
    /// "D" above it when `dense` and the bars are wide enough to tell apart, and its name
    /// below the axis.
    fn bar(&self, i: usize, name: &str, (class, style): (&str, &str), title: &str, y: f64, dense: bool) -> String {
        let (x, bar_w) = (self.left + i as f64 * self.step + self.step * 0.1, (self.step * 0.8).max(0.5));
        let mut out = format!(
            "<rect class=\"{class}\" data-layer=\"{name}\" x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{:.1}\" {style}><title>{title}</title></rect>\n",
            self.y(0.0) - y
        );
        if dense && self.step >= 7.0 {
            out += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">D</text>\n",
                x + bar_w / 2.0,
                y - 3.0
            );
        }
        if i.is_multiple_of(self.every) {
            let (lx, ly) = (x + bar_w / 2.0, self.y(0.0) + 8.0);
            out += &format!(
                "<text transform=\"translate({lx:.1},{ly:.1}) rotate(-60)\" text-anchor=\"end\" font-size=\"9\">{name}</text>\n"
            );
        }
        out
    }
}

/// Grey, for a candidate left dense.
const DENSE: &str = "fill=\"#bbbbbb\" stroke=\"#555555\" stroke-width=\"0.5\"";

/// Each factorize candidate's rank over its full rank min(rows, columns), one bar per
/// candidate in the report's order (a candidate left dense drawn at 1.0 in grey, marked "D"
/// where there is room), each bar a `class="rank"` element naming its layer in `data-layer`, in a panel
/// whose top is at `top`; returns it and its height.
fn rank_panel(candidates: &[Json], top: f64) -> (String, f64) {
    let (bars, mut out, h) = Bars::new(
        candidates,
        top,
        "rank as a fraction of the full rank min(rows, columns), by factorize candidate",
        "rank / min(rows, columns)",
        ("#2e86c1", "factorized"),
        "left dense (at 1.0, D)",
    );
    for (i, l) in candidates.iter().enumerate() {
        let name = escape(l["scope"].as_str().unwrap_or("?"));
        let (rows, cols) = (l["n"].as_u64().unwrap_or(0), l["k"].as_u64().unwrap_or(0));
        let full = rows.min(cols).max(1);
        let rank = l["rank"].as_u64();
        // A train: its parameters over the layer's, as a rank's over the full rank's.
        let bonds: Vec<String> =
            l["bonds"].as_array().into_iter().flatten().filter_map(|b| Some(b.as_u64()?.to_string())).collect();
        let kept = match (l["params"].as_u64(), l["params_before"].as_u64()) {
            (Some(a), Some(b)) if !bonds.is_empty() => Some(a as f64 / b.max(1) as f64),
            _ => None,
        };
        let frac = kept.unwrap_or_else(|| rank.map_or(1.0, |r| r as f64 / full as f64)).min(1.0);
        let (style, what) = match rank {
            Some(_) if !bonds.is_empty() => (
                "fill=\"#2e86c1\"",
                format!("train of bonds {}: {:.1}% of the parameters", bonds.join("x"), 100.0 * frac),
            ),
            Some(r) => ("fill=\"#2e86c1\"", format!("rank {r} of {full}")),
            None => (DENSE, format!("dense (full rank {full})")),
        };
        let class = if rank.is_some() { "rank" } else { "rank dense" };
        let title = format!("{name} [{rows}, {cols}]: {what}");
        out += &bars.bar(i, &name, (class, style), &title, bars.y(frac), rank.is_none());
    }
    (out, h)
}

/// Each prune candidate's sparsity (the share of its weights removed), one bar per
/// candidate in the report's order (a candidate left dense drawn as a grey stub at 0,
/// marked "D" where there is room), each bar a `class="sparsity"` element naming its layer
/// in `data-layer`, its title giving the pattern and the bytes before and after, in a panel
/// whose top is at `top`; returns it and its height.
fn sparsity_panel(candidates: &[Json], top: f64) -> (String, f64) {
    let (bars, mut out, h) = Bars::new(
        candidates,
        top,
        "sparsity (the share of the weights removed), by prune candidate",
        "sparsity",
        ("#27ae60", "pruned"),
        "left dense (at 0, D)",
    );
    for (i, l) in candidates.iter().enumerate() {
        let name = escape(l["scope"].as_str().unwrap_or("?"));
        let (rows, cols) = (l["rows"].as_u64().unwrap_or(0), l["cols"].as_u64().unwrap_or(0));
        let p = &l["prune"];
        let pattern = p["pattern"].as_str().filter(|p| *p != "dense");
        let frac = p["sparsity"].as_f64().unwrap_or(0.0).clamp(0.0, 1.0);
        let bytes = |v: &Json| v.as_u64().map_or("?".to_string(), |b| b.to_string());
        let (class, style, what, y) = match pattern {
            Some(pattern) => (
                "sparsity",
                "fill=\"#27ae60\"",
                format!(
                    "{pattern}, {:.1}% removed, {} -> {} bytes",
                    100.0 * frac,
                    bytes(&p["bytes_before"]),
                    bytes(&p["bytes_after"])
                ),
                bars.y(frac),
            ),
            None => (
                "sparsity dense",
                DENSE,
                format!("dense: {}", p["dense_because"].as_str().unwrap_or("left dense")),
                bars.y(0.0) - 3.0,
            ),
        };
        let title = format!("{name} [{rows}, {cols}]: {}", escape(&what));
        out += &bars.bar(i, &name, (class, style), &title, y, pattern.is_none());
    }
    (out, h)
}
