//! Filetests of the passes, in the manner of Cranelift's: every `tests/filetests/*.kir` is
//! hand-written IR and a pipeline to run on it, followed by the IR expected after each pass.
//!
//! ```text
//! ; What the test pins, in words.
//! ; run: quantize(format=int8)
//! ; calib: 8x16                 (optional) calibration rows x positions, seeded token ids
//! ; override: blk.0.*=f16       (optional, repeatable) as --override
//! graph toy {
//!   ...
//! }
//!
//! ; after quantize(format=int8)
//! graph toy {
//!   ...
//! }
//! ```
//!
//! Weights the IR names are bound to seeded values (from the tensor's name), so checksums in
//! the expected IR pin the bytes a pass writes. With `; calib:`, the passes get the CLI's
//! executor (`kiln_interp::Calibrator`) over seeded token ids, with the interpreter as the
//! engine its probes run on. The expected sections are
//! what `kiln ir --passes P --print-after all` prints. `KILN_BLESS=1 cargo test -p
//! kiln-passes --test filetests` rewrites them from what the passes do now: review the diff.

use kiln_interp::calibrate::{Calibrator, interpreter_engine};
use kiln_interp::{Tensor, Value};
use kiln_ir::{DType, Dim, Graph, Op, TensorData};
use kiln_passes::Context;
use kiln_passes::calibration::Executor;
use kiln_passes::manager;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// One filetest, split into its parts.
struct FileTest {
    /// Everything before the first `; after` line, kept as written.
    head: String,
    run: String,
    calib: Option<(usize, usize)>,
    overrides: Vec<(String, String)>,
    input: String,
    /// The expected sections, as written.
    expected: String,
}

fn parse_file(path: &Path, text: &str) -> FileTest {
    let split = text.find("\n; after ").map_or(text.len(), |i| i + 1);
    let (head, expected) = text.split_at(split);
    let (mut run, mut calib, mut overrides) = (None, None, Vec::new());
    for line in head.lines() {
        if let Some(p) = line.strip_prefix("; run:") {
            assert!(run.is_none(), "{}: one `; run:` line per file", path.display());
            run = Some(p.trim().to_string());
        } else if let Some(c) = line.strip_prefix("; calib:") {
            let (rows, seq) = c.trim().split_once('x').expect("`; calib: ROWSxPOSITIONS`");
            calib = Some((rows.trim().parse().expect("rows"), seq.trim().parse().expect("positions")));
        } else if let Some(o) = line.strip_prefix("; override:") {
            let (p, v) = o.trim().split_once('=').expect("`; override: PATTERN=VALUE`");
            overrides.push((p.to_string(), v.to_string()));
        }
    }
    let start = head
        .find("\ngraph ")
        .map(|i| i + 1)
        .filter(|_| !head.starts_with("graph "))
        .or(head.starts_with("graph ").then_some(0))
        .unwrap_or_else(|| panic!("{}: no line starting with `graph`", path.display()));
    let end = head[start..].find("\n}").map(|e| start + e + 3).unwrap_or_else(|| panic!("{}: no `}}`", path.display()));
    FileTest {
        head: head.to_string(),
        run: run.unwrap_or_else(|| panic!("{}: no `; run:` line", path.display())),
        calib,
        overrides,
        input: head[start..end].to_string(),
        expected: expected.to_string(),
    }
}

/// A small deterministic generator (xorshift64*), seeded per tensor.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Roughly normal: the sum of four uniforms in [-0.5, 0.5), scaled to variance 1/3.
    fn normal(&mut self) -> f32 {
        (0..4).map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5).sum::<f32>()
    }
}

/// Binds every weight the graph names and the store lacks to seeded f32 values: norm-like
/// vectors (rank 1, named `*norm*`) near 1, everything else roughly normal with a
/// standard deviation of 0.3.
fn bind_weights(graph: &mut Graph) {
    let weights: Vec<(String, Vec<u64>)> = graph
        .node_ids()
        .filter_map(|n| match &graph.node(n).op {
            Op::Weight(w) if graph.store.get(&w.tensor).is_none() => {
                let shape =
                    graph.node(n).ty.shape.iter().map(|d| d.known().expect("weights have known shapes")).collect();
                Some((w.tensor.clone(), shape))
            }
            _ => None,
        })
        .collect();
    for (name, shape) in weights {
        let mut rng = Rng::new(kiln_ir::store::fnv1a(name.as_bytes()));
        let count = shape.iter().product::<u64>() as usize;
        let norm = shape.len() == 1 && name.contains("norm");
        let values: Vec<f32> =
            (0..count).map(|_| if norm { 1.0 + 0.1 * rng.normal() } else { 0.3 * rng.normal() }).collect();
        graph.store.insert(name, TensorData::from_f32(shape, &values));
    }
    for n in graph.node_ids().collect::<Vec<_>>() {
        if let Op::Weight(w) = &graph.node(n).op {
            let sum = graph.store.get(&w.tensor).map(|t| t.checksum());
            if let Op::Weight(w) = &mut graph.node_mut(n).op {
                w.checksum = sum;
            }
        }
    }
}

/// Seeded inputs: `rows x seq` of every input. Token ids (i64 inputs read by a gather)
/// spread over the table's rows; other i64 inputs are masks (row `r` has its last `r % 3`
/// positions padded); f32 inputs roughly normal. Symbolic dims: the first is `rows`, the second `seq`.
fn inputs(graph: &Graph, rows: usize, seq: usize, seed: u64) -> HashMap<String, Value> {
    let mut rng = Rng::new(seed);
    let mut out = HashMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let Op::Input { name } = &node.op else { continue };
        let shape: Vec<usize> = node
            .ty
            .shape
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Known(n) => *n as usize,
                _ if i == 0 => rows,
                _ if i == 1 => seq,
                _ => panic!("input {name}: only the first two dims may be symbolic"),
            })
            .collect();
        let count = shape.iter().product::<usize>();
        let value = match node.ty.dtype {
            DType::I64 => {
                let vocab = graph.users(id).into_iter().find_map(|u| match graph.node(u).op {
                    Op::Gather => graph.node(graph.operands(u)[0]).ty.shape[0].known(),
                    _ => None,
                });
                // Masks: row r has its last r % 3 positions padded (0).
                let data = (0..count)
                    .map(|i| match vocab {
                        Some(v) => (rng.next() % v) as i64,
                        None => i64::from(i % seq < seq - (i / seq) % 3),
                    })
                    .collect();
                Value::I64 { shape, data }
            }
            DType::F32 => Value::F32(Tensor::new(shape, (0..count).map(|_| rng.normal()).collect())),
        };
        out.insert(name.clone(), value);
    }
    out
}

/// Runs the test's pipeline and prints the IR after each pass as `--print-after all` does.
fn run(test: &FileTest, path: &Path) -> String {
    let mut graph = kiln_ir::parse(&test.input).unwrap_or_else(|e| panic!("{}: the input IR: {e}", path.display()));
    bind_weights(&mut graph);
    kiln_ir::verify(&graph).unwrap_or_else(|e| panic!("{}: the input IR does not verify: {e}", path.display()));
    let calls = manager::parse(&test.run).unwrap_or_else(|e| panic!("{}: `; run:`: {e}", path.display()));
    let calibrator = test.calib.map(|(rows, seq)| {
        let inputs = inputs(&graph, rows, seq, 1);
        Calibrator::new(&graph, inputs, manager::probes_any(&calls), interpreter_engine())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    });
    let ctx = Context::new(calibrator.as_ref().map(|c| c as &dyn Executor), test.overrides.clone(), &|_, _, _| {});
    let mut printed = String::new();
    let mut after = |call: &manager::PassCall, g: &Graph| {
        printed.push_str(&format!("; after {call}\n{}", kiln_ir::print(g)));
    };
    manager::run(&mut graph, &calls, &ctx, &mut after).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    printed
}

fn files() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/filetests")
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "kir"))
        .collect();
    files.sort();
    files
}

#[test]
fn filetests() {
    let bless = std::env::var_os("KILN_BLESS").is_some_and(|v| v == "1");
    let files = files();
    assert!(files.len() >= 10, "expected the filetests, found {}", files.len());
    let mut failed = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("readable");
        let test = parse_file(path, &text);
        let got = run(&test, path);
        // Every section's IR parses back to itself (the text form round-trips).
        for section in got.split("; after ").filter(|s| !s.is_empty()) {
            let ir = &section[section.find('\n').expect("a header line") + 1..];
            let back =
                kiln_ir::parse(ir).unwrap_or_else(|e| panic!("{}: printed IR does not parse: {e}", path.display()));
            assert_eq!(kiln_ir::print(&back), ir, "{}: the printed IR round-trips", path.display());
        }
        let head =
            if test.head.ends_with("\n\n") { test.head.clone() } else { format!("{}\n", test.head.trim_end()) + "\n" };
        if got != test.expected {
            if bless {
                std::fs::write(path, format!("{head}{got}")).expect("writable");
            } else {
                failed.push(format!("{}:\n--- expected\n{}--- got\n{got}", path.display(), test.expected));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} filetests differ (KILN_BLESS=1 rewrites them):\n{}",
        failed.len(),
        failed.join("\n")
    );
}
