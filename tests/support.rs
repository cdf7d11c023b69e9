//! Shared helpers for kiln's tests: where the specs, fixtures and real checkpoints are,
//! and a writer for the tiny model's checkpoint (so most tests need no download).

use kiln_interp::{Interpreter, Value};
use kiln_ir::{Graph, Op};
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// A model spec in `examples/`, e.g. `spec("minilm/minilm.kiln")`.
pub fn spec(rel: &str) -> PathBuf {
    root().join("examples").join(rel)
}

pub fn read_spec(rel: &str) -> String {
    std::fs::read_to_string(spec(rel)).expect("example spec is readable")
}

/// The PyTorch reference outputs: `$KILN_FIXTURES`, else `../shared/fixtures` beside
/// the repository. They are the outside truth, so their absence is an error, not a skip.
pub fn fixtures() -> PathBuf {
    let candidates = [
        std::env::var_os("KILN_FIXTURES").map(PathBuf::from),
        Some(root().join("../shared/fixtures")),
        Some(PathBuf::from("/work/shared/fixtures")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.join("README.md").exists())
        .expect("reference fixtures not found: set KILN_FIXTURES to the shared/fixtures directory")
}

/// Where `examples/fetch.sh` puts the real checkpoints: `$KILN_MODELS` or `~/.cache/kiln/models`.
pub fn models() -> PathBuf {
    match std::env::var_os("KILN_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/kiln/models"),
    }
}

/// A real checkpoint if it has been fetched; otherwise prints why the test is skipped.
/// With `KILN_REQUIRE_MODELS=1` (as `.ci/run` sets it), a missing checkpoint fails the
/// test instead: CI must never pass by skipping the real models.
pub fn real_checkpoint(rel: &str) -> Option<PathBuf> {
    let p = models().join(rel);
    if p.exists() {
        Some(p)
    } else if require_models() {
        panic!("{} is not fetched and KILN_REQUIRE_MODELS=1: run examples/fetch.sh", p.display());
    } else {
        eprintln!("SKIPPED: {} is not fetched (run examples/fetch.sh)", p.display());
        None
    }
}

/// Whether `KILN_REQUIRE_MODELS=1`: tests that need a real checkpoint fail without it.
pub fn require_models() -> bool {
    std::env::var_os("KILN_REQUIRE_MODELS").is_some_and(|v| v == "1")
}

pub const MINILM_WEIGHTS: &str = "minilm/model.safetensors";
pub const SMOLLM2_WEIGHTS: &str = "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// A fresh empty directory under the system temp dir, unique per call.
pub fn temp_dir(name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("kiln-test-{}-{n}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

/// Deterministic pseudo-random numbers in [-1, 1) (SplitMix64).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// Writes a checkpoint for `examples/tiny/tiny.kiln` with random weights: norm weights
/// near 1 stored as bf16, biases as f16, everything else f32. The tensor list comes from
/// the spec itself, so the two cannot drift apart.
pub fn write_tiny_checkpoint(path: &Path, seed: u64) {
    let graph = kiln_frontend::compile(&read_spec("tiny/tiny.kiln"), None).expect("tiny spec compiles").graph;
    let mut rng = Rng::new(seed);
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for id in graph.topo_order().expect("acyclic") {
        let node = graph.node(id);
        let Op::Weight(w) = &node.op else { continue };
        let shape: Vec<usize> = node.ty.shape.iter().map(|d| d.known().expect("known") as usize).collect();
        let n: usize = shape.iter().product();
        let is_norm = w.tensor.contains("norm");
        let values: Vec<f32> =
            (0..n).map(|_| if is_norm { 1.0 + 0.1 * rng.next_f32() } else { 0.5 * rng.next_f32() }).collect();
        let (dtype, bytes) = if is_norm {
            (Dtype::BF16, values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect())
        } else if w.tensor.ends_with(".bias") {
            (Dtype::F16, values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect())
        } else {
            (Dtype::F32, values.iter().flat_map(|&v| v.to_le_bytes()).collect())
        };
        tensors.push((w.tensor.clone(), dtype, shape, bytes));
    }
    let views: Vec<_> = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            (name.clone(), safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).expect("valid view"))
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write tiny checkpoint");
}

/// Compiles an example spec bound to a checkpoint, panicking with the rendered diagnostic.
pub fn compile_bound(spec_rel: &str, weights: &Path) -> (Graph, kiln_frontend::Checkpoint) {
    let ck = kiln_frontend::checkpoint::load(weights).expect("checkpoint loads");
    let graph = match kiln_frontend::compile(&read_spec(spec_rel), Some(&ck)) {
        Ok(c) => c.graph,
        Err(d) => panic!("{spec_rel} does not compile: {}", render(d, spec_rel, &read_spec(spec_rel))),
    };
    (graph, ck)
}

/// Renders a diagnostic as the CLI shows it, without colors.
pub fn render(d: kiln_frontend::Diagnostic, name: &str, source: &str) -> String {
    let report = miette::Report::new(d.with_source(name, source.into()));
    let mut out = String::new();
    miette::GraphicalReportHandler::new_themed(miette::GraphicalTheme::unicode_nocolor())
        .with_width(100)
        .render_report(&mut out, report.as_ref())
        .expect("render");
    out
}

/// i64 input from rows of ids.
pub fn ids(rows: &[&[i64]]) -> Value {
    let seq = rows.first().map_or(0, |r| r.len());
    assert!(rows.iter().all(|r| r.len() == seq), "rows must have equal length");
    Value::I64 { shape: vec![rows.len(), seq], data: rows.iter().flat_map(|r| r.iter().copied()).collect() }
}

/// An executor under test: the reference interpreter or the JIT engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exec {
    Interp,
    Jit {
        threads: usize,
    },
    /// The JIT with int8 activations set on the quantized-weight linears
    /// ([`kiln_ir::set_activations`]).
    JitInt8 {
        threads: usize,
    },
    /// The JIT with int8 activations, per row for int8 weights with one scale per row.
    JitInt8Row {
        threads: usize,
    },
}

/// A graph prepared for repeated runs by the chosen executor.
pub enum Prepared<'g> {
    Interp(Interpreter<'g>),
    Jit(Box<kiln_jit::Engine<'g>>),
}

impl<'g> Prepared<'g> {
    pub fn new(graph: &'g Graph, exec: Exec) -> Prepared<'g> {
        match exec {
            Exec::Interp => Prepared::Interp(Interpreter::new(graph).expect("weights decode")),
            Exec::Jit { threads } => Prepared::Jit(Box::new(
                kiln_jit::compile(graph, kiln_jit::EngineOptions::threads(threads)).expect("compiles"),
            )),
            Exec::JitInt8 { threads } | Exec::JitInt8Row { threads } => {
                let activations = match exec {
                    Exec::JitInt8 { .. } => kiln_jit::Activations::Int8,
                    _ => kiln_jit::Activations::Int8Row,
                };
                // The mode set on a copy of the graph, as `kiln run --activations` does; the
                // engine borrows it for as long as the test runs (weights are shared, not
                // copied).
                let mut copy = graph.clone();
                kiln_ir::set_activations(&mut copy, activations);
                let copy: &'g Graph = Box::leak(Box::new(copy));
                let options = kiln_jit::EngineOptions::threads(threads);
                Prepared::Jit(Box::new(kiln_jit::compile(copy, options).expect("compiles")))
            }
        }
    }

    pub fn run(&self, inputs: &HashMap<String, Value>) -> Vec<(String, Value)> {
        match self {
            Prepared::Interp(i) => i.run(inputs),
            Prepared::Jit(e) => e.run(inputs),
        }
        .expect("runs")
    }

    /// Runs over new tokens of the sequences in `cache`, adding them to it.
    pub fn run_cached(
        &self,
        inputs: &HashMap<String, Value>,
        cache: &mut kiln_rt::KvCache,
    ) -> Result<Vec<(String, Value)>, kiln_rt::eval::RunError> {
        match self {
            Prepared::Interp(i) => i.run_cached(inputs, cache),
            Prepared::Jit(e) => e.run_cached(inputs, cache),
        }
    }
}

/// Runs a graph and returns its outputs by name.
pub fn run(graph: &Graph, inputs: &[(&str, Value)]) -> HashMap<String, Value> {
    let interp = Interpreter::new(graph).expect("weights decode");
    let inputs = inputs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    interp.run(&inputs).expect("runs").into_iter().collect()
}

/// Cosine similarity of two vectors, in f64.
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}
