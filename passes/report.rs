//! What a pass reports about its work, and its JSON form: the form `kiln compile` stores in
//! the artifact (`kiln.passes`) and `kiln report` reads.

use crate::factorize::FactorizeReport;
use crate::heal::HealedLayer;
use crate::manager::PassCall;
use crate::prune::PruneReport;
use crate::prune::drop::DropReport;
use crate::prune::structured::StructuredReport;
use crate::quantize::QuantizeReport;
use crate::tie::TieReport;
use serde_json::{Value as Json, json};

/// What a pass reports about its work.
#[derive(Clone, Debug, PartialEq)]
pub enum PassReport {
    Quantize(QuantizeReport),
    Factorize(FactorizeReport),
    Prune(PruneReport),
    Drop(DropReport),
    Tie(TieReport),
    /// A structured `prune` (heads and channels).
    Structured(StructuredReport),
    /// A clean-up pass: how many nodes it removed or rewrote, and notes.
    Cleanup {
        pass: &'static str,
        nodes: usize,
        notes: Vec<String>,
    },
}

impl PassReport {
    /// Things the user should know.
    pub fn notes(&self) -> &[String] {
        match self {
            PassReport::Quantize(q) => &q.notes,
            PassReport::Factorize(f) => &f.notes,
            PassReport::Prune(p) => &p.notes,
            PassReport::Drop(d) => &d.notes,
            PassReport::Tie(t) => &t.notes,
            PassReport::Structured(s) => &s.notes,
            PassReport::Cleanup { notes, .. } => notes,
        }
    }

    /// The report as JSON; a quantize report in the shape `kiln report --json` prints.
    pub fn to_json(&self) -> Json {
        match self {
            PassReport::Quantize(q) => quantize_json(q),
            PassReport::Factorize(f) => factorize_json(f),
            PassReport::Prune(p) => prune_json(p),
            PassReport::Drop(d) => drop_json(d),
            PassReport::Tie(t) => tie_json(t),
            PassReport::Structured(s) => structured_json(s),
            PassReport::Cleanup { pass, nodes, notes } => json!({"pass": pass, "nodes": nodes, "notes": notes}),
        }
    }
}

/// A pipeline's reports as an artifact stores them (`kiln.passes`): a JSON list of
/// `{"call": "quantize(bits=4.5)", "report": {...}}`, in the order the passes ran.
pub fn pipeline_json(ran: &[(PassCall, PassReport)]) -> String {
    let list: Vec<Json> = ran.iter().map(|(c, r)| json!({"call": c.to_string(), "report": r.to_json()})).collect();
    Json::Array(list).to_string()
}

/// What healing did to one layer: whether its refit was kept, its layer-wise error before
/// and after.
fn healed_json(h: &HealedLayer) -> Json {
    json!({"kept": h.kept, "error_before": h.error_before, "error_after": h.error_after})
}

/// The probe's distance before and after a refit.
fn probes_json((before, after): (f64, f64)) -> Json {
    json!({"probe_before": before, "probe_after": after})
}

fn factorize_json(f: &FactorizeReport) -> Json {
    let layers: Vec<Json> = f
        .layers
        .iter()
        .map(|l| {
            json!({
                "scope": l.name, "n": l.n, "k": l.k, "rank": l.rank,
                "bonds": (!l.bonds.is_empty()).then_some(&l.bonds), "svd_relative_error": l.svd_relative_error,
                "params_before": l.params_before, "params": l.params,
                "error": l.error, "relative_error": l.relative_error, "dense_because": l.why_dense,
                "healed": l.healed.as_ref().map(healed_json),
            })
        })
        .collect();
    json!({
        "pass": "factorize", "method": f.method.to_string(), "layers": layers,
        "params_before": f.params_before, "params": f.params, "notes": f.notes,
        "heal": f.heal.map(probes_json),
    })
}

fn prune_json(p: &PruneReport) -> Json {
    let layers: Vec<Json> = p
        .layers
        .iter()
        .map(|l| {
            json!({
                "scope": l.name, "rows": l.rows, "cols": l.cols, "pattern": l.pattern, "kept": l.kept,
                "params_before": l.params_before, "params": l.params,
                "bytes_before": l.bytes_before, "bytes": l.bytes,
                "bits_per_weight": l.bits_per_weight, "error": l.error, "dense_because": l.why_dense,
            })
        })
        .collect();
    json!({
        "pass": "prune", "method": p.method.to_string(), "target": p.target.to_string(), "layers": layers,
        "sparsity": p.sparsity(), "params_before": p.params_before, "params": p.params,
        "bytes_before": p.bytes_before, "bytes": p.bytes, "notes": p.notes,
    })
}

fn drop_json(d: &DropReport) -> Json {
    let dropped: Vec<Json> = d
        .dropped
        .iter()
        .map(|b| json!({"block": b.index, "scope": b.prefix, "params": b.params, "probe": b.probe}))
        .collect();
    let rounds: Vec<Json> = d
        .rounds
        .iter()
        .map(|r| Json::Array(r.iter().map(|(i, p)| json!({"block": i, "probe": p})).collect()))
        .collect();
    json!({
        "pass": "drop", "blocks": d.blocks, "dropped": dropped, "rounds": rounds,
        "refit": d.refit.iter().map(|h| {
            let mut j = healed_json(h);
            j["scope"] = json!(h.layer);
            j
        }).collect::<Vec<Json>>(),
        "probe_refit": d.probe_refit.map(probes_json),
        "params": d.dropped.iter().map(|b| b.params).sum::<u64>(), "notes": d.notes,
    })
}

fn tie_json(t: &TieReport) -> Json {
    let tied: Vec<Json> = t
        .tied
        .iter()
        .map(|r| {
            json!({
                "role": r.role, "layers": r.layers, "rows": r.rows, "cols": r.cols, "rank": r.rank,
                "params_before": r.params_before, "params": r.params, "errors": r.errors,
            })
        })
        .collect();
    json!({
        "pass": "tie", "delta_rank": t.delta_rank, "tied": tied,
        "candidates": t.candidates.iter().map(|c| json!({
            "blocks": c.blocks, "cosine": c.cosine, "probe": c.probe, "saved": c.saved, "chosen": c.chosen,
        })).collect::<Vec<Json>>(),
        "params_before": t.params_before(), "params": t.params(), "notes": t.notes,
    })
}

fn structured_json(s: &StructuredReport) -> Json {
    let groups: Vec<Json> = s
        .groups
        .iter()
        .map(|g| {
            json!({
                "scope": g.name, "kind": g.kind.to_string(), "units": g.units, "kept": g.kept,
                "params_before": g.params_before, "params": g.params, "error": g.error,
                "unchanged_because": g.why_unchanged,
                "healed": g.healed.as_ref().map(healed_json),
            })
        })
        .collect();
    json!({
        "pass": "prune", "structured": true, "heads": s.options.heads, "channels": s.options.channels,
        "refit": s.options.refit.to_string(), "groups": groups,
        "params_before": s.params_before, "params": s.params, "notes": s.notes,
        "heal": s.heal.map(probes_json),
    })
}

fn quantize_json(q: &QuantizeReport) -> Json {
    let layers: Vec<Json> = q
        .layers
        .iter()
        .map(|l| {
            json!({
                "scope": l.scope,
                "tensor": l.tensor,
                "format": l.format.name(),
                "params": l.params,
                "bits_per_weight": l.bytes as f64 * 8.0 / l.params.max(1) as f64,
                "bytes": l.bytes,
                "sensitivity": l.sensitivity,
                "error": l.error,
            })
        })
        .collect();
    json!({
        "pass": "quantize",
        "layers": layers,
        "params": q.params,
        "bytes": q.bytes,
        "bits_per_weight": q.bits_per_weight(),
        "notes": q.notes,
        "activations": q.activations.to_string(),
    })
}
