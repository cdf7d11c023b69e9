//! What the binary's end-to-end tests share: running `kiln` and checking its failures,
//! scratch directories, the tiny model's checkpoint, and safetensors files.
#![allow(dead_code)] // each test binary uses its own part

use kiln_tests::{spec, write_tiny_checkpoint};
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ---------------------------------------------------------------------------------------
// Running the binary
// ---------------------------------------------------------------------------------------

/// Runs `kiln` with `args` (no colors, no backtrace settings inherited).
pub fn kiln<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("the kiln binary runs")
}

pub fn describe<S: AsRef<std::ffi::OsStr>>(args: &[S], out: &Output) -> String {
    let args: Vec<String> = args.iter().map(|a| a.as_ref().to_string_lossy().into_owned()).collect();
    format!(
        "kiln {}\nstatus: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts the output shows no panic and no backtrace hint.
pub fn assert_no_panic<S: AsRef<std::ffi::OsStr>>(args: &[S], out: &Output) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    for text in [&stderr, &stdout] {
        assert!(
            !text.contains("panicked") && !text.contains("RUST_BACKTRACE") && !text.contains("stack backtrace"),
            "a panic or backtrace:\n{}",
            describe(args, out)
        );
    }
    // 101 is the exit code of a panicking Rust program; `None` means a signal (abort, SEGV).
    assert!(
        out.status.code().is_some() && out.status.code() != Some(101),
        "killed by a signal or a panic:\n{}",
        describe(args, out)
    );
}

/// Runs `kiln` expecting success; returns stdout.
pub fn ok<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> String {
    let out = kiln(args);
    assert_no_panic(args, &out);
    assert!(out.status.success(), "expected success:\n{}", describe(args, &out));
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Runs `kiln` expecting a clean failure; returns stderr, checked to contain every one
/// of `needles`.
pub fn fails<S: AsRef<std::ffi::OsStr>>(args: &[S], needles: &[&str]) -> String {
    let out = kiln(args);
    assert_no_panic(args, &out);
    assert!(!out.status.success(), "expected failure:\n{}", describe(args, &out));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!stderr.trim().is_empty(), "failure without a message:\n{}", describe(args, &out));
    // The report wraps long messages (continuation lines start with `│`, and a path may
    // be broken after a `/`): compare the needles against the text with the wrapping
    // undone.
    let flat = flatten(&stderr);
    for needle in needles {
        assert!(
            stderr.contains(needle) || flat.contains(&flatten(needle)),
            "stderr lacks {needle:?}:\n{}",
            describe(args, &out)
        );
    }
    stderr
}

/// `text` without the report's box-drawing margins and without whitespace.
pub fn flatten(text: &str) -> String {
    text.chars().filter(|c| *c != '│' && !c.is_whitespace()).collect()
}

pub fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn tiny_spec() -> String {
    s(&spec("tiny/tiny.kiln"))
}

/// A fresh temp dir, removed when the test passes (kept for inspection when it fails).
pub struct Scratch(pub PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

pub fn scratch(name: &str) -> Scratch {
    Scratch(kiln_tests::temp_dir(&format!("cli-{name}")))
}

/// A temp dir with the tiny checkpoint in it: `(dir, weights)`.
/// A two-layer MLP written to `dir`: the spec `mlp.kiln` (`up` 64 -> 96 with a relu,
/// `down` 96 -> 64, a residual), its weights with biases drawn from `seed`
/// (`mlp.safetensors`), and a 3-row input `x` (`in.safetensors`).
pub struct Mlp {
    pub model: PathBuf,
    pub weights: PathBuf,
    pub input: PathBuf,
}

pub fn write_mlp(dir: &Path, seed: u64) -> Mlp {
    let model = dir.join("mlp.kiln");
    let source = "model mlp\n\ninput x: f32[batch, 64]\n\nlet h = relu(Linear(x, 64, 96) as \"up\")\nlet d = Linear(h, 96, 64) as \"down\"\noutput y: f32[batch, 64] = d + x\n";
    std::fs::write(&model, source).unwrap();
    let mut rng = kiln_tests::Rng::new(seed);
    let mut values = |n: usize| (0..n).map(|_| rng.next_f32()).collect::<Vec<f32>>();
    let weights = dir.join("mlp.safetensors");
    write_safetensors(
        &weights,
        &[
            f32s("up.weight", &[96, 64], &values(96 * 64)),
            f32s("up.bias", &[96], &values(96)),
            f32s("down.weight", &[64, 96], &values(64 * 96)),
            f32s("down.bias", &[64], &values(64)),
        ],
    );
    let input = dir.join("in.safetensors");
    write_safetensors(&input, &[f32s("x", &[3, 64], &values(3 * 64))]);
    Mlp { model, weights, input }
}

pub fn tiny_setup(name: &str) -> (Scratch, PathBuf) {
    let dir = scratch(name);
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 7);
    (dir, weights)
}

// ---------------------------------------------------------------------------------------
// Safetensors and GGUF files
// ---------------------------------------------------------------------------------------

/// A tensor to write: name, dtype, shape, raw little-endian bytes.
pub type Raw = (String, Dtype, Vec<usize>, Vec<u8>);

pub fn i64s(name: &str, shape: &[usize], data: &[i64]) -> Raw {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    (name.into(), Dtype::I64, shape.to_vec(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

pub fn f32s(name: &str, shape: &[usize], data: &[f32]) -> Raw {
    assert_eq!(shape.iter().product::<usize>(), data.len());
    (name.into(), Dtype::F32, shape.to_vec(), data.iter().flat_map(|v| v.to_le_bytes()).collect())
}

pub fn write_safetensors(path: &Path, tensors: &[Raw]) {
    let views: Vec<_> = tensors
        .iter()
        .map(|(n, d, shape, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, shape.clone(), b).expect("view")))
        .collect();
    safetensors::serialize_to_file(views, None, path).expect("write safetensors");
}

/// Every tensor of a safetensors file, in file order.
pub fn read_safetensors(path: &Path) -> Vec<Raw> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut out: Vec<Raw> =
        st.tensors().into_iter().map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

pub fn as_f32(raw: &Raw) -> Vec<f32> {
    assert_eq!(raw.1, Dtype::F32, "{} is not f32", raw.0);
    raw.3.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}
