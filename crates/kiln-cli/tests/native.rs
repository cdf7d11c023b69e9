//! `kiln compile --emit exe`: native programs compute what `kiln run` and `kiln generate`
//! compute, bit for bit, and fail on bad input with the same messages. The tiny model runs
//! always; the real models when fetched.

mod common;

use common::*;
use kiln_tests::{MINILM_WEIGHTS, SMOLLM2_WEIGHTS, fixtures, real_checkpoint, spec};
use object::{Object, ObjectSection, ObjectSymbol};
use safetensors::Dtype;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Builds kiln's runtime library where `kiln compile --emit exe` looks for it: beside the
/// `kiln` under test, in the directory of cargo's profile (`cargo test` builds the binary,
/// not the static library). Once per test binary.
fn runtime_library() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let kiln = Path::new(env!("CARGO_BIN_EXE_kiln"));
        let dir = kiln.parent().expect("the binary's directory");
        let profile = match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") => "dev",
            Some(other) => other,
            None => panic!("no profile directory above {}", kiln.display()),
        };
        let out = Command::new(env!("CARGO"))
            .args(["build", "-q", "-p", "kiln-native", "--profile", profile])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("cargo runs");
        assert!(out.status.success(), "building kiln-native failed:\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(dir.join("libkiln_native.a").is_file(), "no libkiln_native.a in {}", dir.display());
    });
}

/// Runs a native program with `args`.
fn program<S: AsRef<std::ffi::OsStr>>(exe: &Path, args: &[S]) -> Output {
    Command::new(exe).args(args).env_remove("RUST_BACKTRACE").output().expect("the program runs")
}

fn program_ok<S: AsRef<std::ffi::OsStr>>(exe: &Path, args: &[S]) -> String {
    let out = program(exe, args);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}",
        exe.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 stdout")
}

/// Compiles `model` (a spec with `weights`, or an artifact) to an executable in `dir`.
fn compile_exe(dir: &Path, model: &str, weights: Option<&Path>, extra: &[&str]) -> PathBuf {
    runtime_library();
    let exe = dir.join("model-exe");
    let mut args = vec!["compile".to_string(), model.to_string()];
    if let Some(w) = weights {
        args.extend(["-w".into(), s(w)]);
    }
    args.extend(["--emit".into(), "exe".into(), "-o".into(), s(&exe)]);
    args.extend(extra.iter().map(|a| a.to_string()));
    ok(&args);
    assert!(exe.is_file(), "no executable at {}", exe.display());
    exe
}

/// The ids of a `{"ids": [...]}` line (kiln generate --json, or a program's).
fn ids_of(json: &str) -> Vec<i64> {
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{json:?}: {e}"));
    v["ids"].as_array().expect("ids").iter().map(|i| i.as_i64().expect("an id")).collect()
}

const IDS: [i64; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

fn tiny_input(dir: &Path) -> PathBuf {
    let input = dir.join("in.safetensors");
    let mask = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0];
    write_safetensors(&input, &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[2, 5], &mask)]);
    input
}

/// The tiny model as an executable: its outputs are `kiln run`'s, byte for byte (on other
/// thread counts), its greedy continuation is `kiln generate`'s, and `--help` names the
/// model, its inputs and outputs.
#[test]
fn tiny_executable_runs_and_generates_like_kiln() {
    let (dir, weights) = tiny_setup("native-tiny");
    let exe = compile_exe(&dir, &s(&spec("tiny/tiny.kiln")), Some(&weights), &[]);
    let input = tiny_input(&dir);
    let (by_exe, by_jit) = (dir.join("exe.safetensors"), dir.join("jit.safetensors"));
    program_ok(&exe, &["--input", &s(&input), "--output", &s(&by_exe), "--threads", "3"]);
    ok(&[
        "run",
        &s(&spec("tiny/tiny.kiln")),
        "-w",
        &s(&weights),
        "-i",
        &s(&input),
        "-o",
        &s(&by_jit),
        "--threads",
        "1",
    ]);
    let (a, b) = (read_safetensors(&by_exe), read_safetensors(&by_jit));
    assert_eq!(a.iter().map(|t| &t.0).collect::<Vec<_>>(), b.iter().map(|t| &t.0).collect::<Vec<_>>());
    assert!(!a.is_empty());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "output `{}` differs from kiln run's", x.0);
    }

    let generated = program_ok(&exe, &["--prompt-ids", "3,1,4,1,5", "--max-tokens", "12", "--json"]);
    let want = ok(&[
        "generate",
        &s(&spec("tiny/tiny.kiln")),
        "-w",
        &s(&weights),
        "--prompt-ids",
        "3,1,4,1,5",
        "--max-tokens",
        "12",
        "--json",
    ]);
    assert_eq!(ids_of(&generated), ids_of(&want));
    assert_eq!(ids_of(&generated).len(), 12);

    // Kernels for an older CPU (no AVX, no FMA: the program's engine takes no 256-bit GEMM)
    // run here and compute the same bits.
    let old_cpu = dir.join("old-cpu");
    std::fs::create_dir_all(&old_cpu).expect("mkdir");
    let old = compile_exe(&old_cpu, &s(&spec("tiny/tiny.kiln")), Some(&weights), &["--target-cpu", "x86-64-v2"]);
    let by_old = dir.join("old.safetensors");
    program_ok(&old, &["--input", &s(&input), "--output", &s(&by_old)]);
    assert_eq!(read_safetensors(&by_old), b);
    assert!(program_ok(&old, &["--help"]).contains("x86-64-v2"));

    let help = program_ok(&exe, &["--help"]);
    for needle in
        ["`tiny`", "input_ids: i64[batch, seq]", "attention_mask: i64[batch, seq]", "logits: f32[batch, seq, 32]"]
    {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }

    // The runtime's debug information is left out (it was most of a program's size beside
    // its weights); the symbols stay, for profilers.
    let elf = std::fs::read(&exe).expect("the program");
    let elf = object::File::parse(&*elf).expect("an object file");
    let debug: Vec<_> = elf.sections().filter_map(|s| s.name().ok()).filter(|n| n.starts_with(".debug")).collect();
    assert!(debug.is_empty(), "the program keeps debug sections {debug:?}");
    assert!(elf.symbols().any(|s| s.name() == Ok("kiln_native_main")), "the program lost its symbols");
}

/// Bad input gets the message `kiln run` gives (and a non-zero exit, no panic).
#[test]
fn tiny_executable_rejects_bad_input_as_kiln_run_does() {
    let (dir, weights) = tiny_setup("native-errors");
    let exe = compile_exe(&dir, &s(&spec("tiny/tiny.kiln")), Some(&weights), &[]);
    let input = tiny_input(&dir);
    let bytes = std::fs::read(&input).expect("read");
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..20]).expect("write");
    let no_mask = dir.join("no_mask.safetensors");
    write_safetensors(&no_mask, &[i64s("input_ids", &[2, 5], &IDS), i64s("mask", &[2, 5], &[1; 10])]);
    let f32_ids = dir.join("f32_ids.safetensors");
    write_safetensors(&f32_ids, &[f32s("input_ids", &[2, 5], &[1.0; 10]), i64s("attention_mask", &[2, 5], &[1; 10])]);
    let i32_ids = dir.join("i32_ids.safetensors");
    let raw: Raw =
        ("input_ids".into(), Dtype::I32, vec![2, 5], IDS.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect());
    write_safetensors(&i32_ids, &[raw, i64s("attention_mask", &[2, 5], &[1; 10])]);
    let absent = dir.join("absent.safetensors");
    // Errors of the input file: the same message, word for word.
    for file in [&absent, &cut, &no_mask, &f32_ids, &i32_ids] {
        let out = program(&exe, &["--input", &s(file)]);
        assert_eq!(out.status.code(), Some(1), "{}: {:?}", file.display(), out);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let message = stderr.trim().strip_prefix("Error: ").unwrap_or_else(|| panic!("no `Error: ` in {stderr:?}"));
        let message = message.lines().next().expect("a message");
        let kiln = fails(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(file)], &[]);
        // The same words in the same order (kiln's report draws a cause on its own line).
        let words = |t: &str| t.chars().filter(|c| c.is_alphanumeric()).collect::<String>();
        assert!(words(&kiln).contains(&words(message)), "the program says {message:?}, kiln run says:\n{kiln}");
    }
    // Errors of the run: the same facts.
    let oov = dir.join("oov.safetensors");
    let mut ids = IDS;
    ids[3] = 1000;
    write_safetensors(&oov, &[i64s("input_ids", &[2, 5], &ids), i64s("attention_mask", &[2, 5], &[1; 10])]);
    let batch = dir.join("batch.safetensors");
    write_safetensors(&batch, &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[3, 5], &[1; 15])]);
    for (file, needles) in
        [(&oov, &["oov.safetensors", "1000", "32"][..]), (&batch, &["attention_mask", "`batch` is 2"])]
    {
        let out = program(&exe, &["--input", &s(file)]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "{} lacks {needle:?}: {stderr}", file.display());
        }
        fails(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(file)], needles);
    }
    // Usage errors: status 1, or clap's 2 for what it parses.
    for (args, needle, status) in [
        (vec![], "--input", 1),
        (vec!["--input", "x", "--prompt-ids", "1"], "not both", 1),
        (vec!["--prompt-ids", "1,x"], "`x` is not a token id", 1),
        (vec!["--prompt-ids", "99"], "outside the vocabulary", 1),
        (vec!["--threads", "0", "--prompt-ids", "1"], "--threads", 1),
        (vec!["--no-such-flag"], "--no-such-flag", 2),
    ] {
        let out = program(&exe, &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(status), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: stderr lacks {needle:?}: {stderr}");
    }
}

/// A spec compiled straight to a program keeps what its passes chose: the activations its
/// IR gives the linears, which `kiln run` takes too; `--activations` overrides them, and
/// either way the program computes `kiln run`'s bits with the same flag.
#[test]
fn compile_exe_keeps_the_activations_the_passes_chose() {
    let dir = scratch("native-activations");
    let Mlp { model, weights, input } = write_mlp(&dir, 5);
    let passes = "quantize(format=int4g32, activations=int8-block)";
    let artifact = dir.join("mlp.kiln.st");
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", passes, "-o", &s(&artifact)]);
    let by_kiln = |extra: &[&str]| {
        let out = dir.join("by-kiln.safetensors");
        ok(&[&["run", &s(&artifact), "-i", &s(&input), "-o", &s(&out)][..], extra].concat());
        read_safetensors(&out)
    };
    let by_program = |exe: &Path| {
        let out = dir.join("by-program.safetensors");
        program_ok(exe, &["--input", &s(&input), "--output", &s(&out)]);
        read_safetensors(&out)
    };
    let exe = compile_exe(&dir, &s(&model), Some(&weights), &["--passes", passes]);
    let help = program_ok(&exe, &["--help"]);
    assert!(help.contains("Activations: int8\n") && help.contains(passes), "{help}");
    let int8 = by_kiln(&[]);
    assert_eq!(by_program(&exe), int8, "the IR's int8 activations");
    let exe = compile_exe(&dir, &s(&model), Some(&weights), &["--passes", passes, "--activations", "f32"]);
    assert!(program_ok(&exe, &["--help"]).contains("Activations: f32\n"));
    let exact = by_kiln(&["--activations", "f32"]);
    assert_eq!(by_program(&exe), exact, "overridden to f32");
    assert_ne!(exact, int8, "int8 activations changed the outputs");
}

/// What `kiln compile --emit exe` refuses, and how.
#[test]
fn compile_exe_errors_are_clear() {
    let (dir, weights) = tiny_setup("native-compile-errors");
    runtime_library();
    let exe = s(&dir.join("p"));
    let (tiny, w) = (tiny_spec(), s(&weights));
    let compile = |env: &[(&str, &str)], extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["compile", &tiny, "-w", &w, "--emit", "exe", "-o", &exe]).args(extra).env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("kiln runs");
        assert!(!out.status.success() && out.status.code() != Some(101), "{env:?} {extra:?}: {}", out.status);
        flatten(&String::from_utf8_lossy(&out.stderr))
    };
    let stderr = compile(&[("CC", "/nonexistent/cc")], &[]);
    assert!(stderr.contains(&flatten("cannot run the C compiler `/nonexistent/cc`")), "{stderr}");
    assert!(stderr.contains(&flatten("apt install gcc")), "{stderr}");
    let stderr = compile(&[("KILN_NATIVE_LIB", "/nonexistent/libkiln_native.a")], &[]);
    assert!(stderr.contains(&flatten("/nonexistent/libkiln_native.a")), "{stderr}");
    let stderr = compile(&[], &["--target-cpu", "pentium-mmx"]);
    assert!(stderr.contains(&flatten("unknown target CPU `pentium-mmx`")), "{stderr}");
    assert!(!dir.join("p").exists(), "a failed compile left a program");
    // Artifacts: their passes have run.
    let artifact = dir.join("tiny.kiln.st");
    ok(&["compile", &tiny, "-w", &w, "-o", &s(&artifact)]);
    let a = s(&artifact);
    fails(&["compile", &a, "--emit", "exe", "-o", &exe, "--passes", "quantize(format=int8)"], &["its passes have run"]);
    fails(&["compile", &a, "-o", &exe], &["already a compiled artifact"]);
    fails(&["compile", &tiny, "-w", &w, "-o", &exe, "--target-cpu", "x86-64-v3"], &["--emit exe"]);
    fails(&["compile", &tiny, "-w", &w, "--emit", "lib", "-o", &s(&dir.join("libkiln.a"))], &["kiln_create"]);
    fails(&["compile", &tiny, "-w", &w, "--emit", "lib", "-o", &s(&dir.join("lib9x.a"))], &["C identifier"]);
}

/// `--weights-beside`: the weights in `PROGRAM.kiln`, mapped at start-up; the same outputs,
/// and clear errors when the file is missing or is not the one the program was built with.
#[test]
fn tiny_executable_with_weights_beside() {
    let (dir, weights) = tiny_setup("native-beside");
    let exe = compile_exe(&dir, &tiny_spec(), Some(&weights), &["--weights-beside"]);
    let sidecar = dir.join("model-exe.kiln");
    assert!(sidecar.is_file(), "no {}", sidecar.display());
    let input = tiny_input(&dir);
    let (by_exe, by_jit) = (dir.join("exe.safetensors"), dir.join("jit.safetensors"));
    program_ok(&exe, &["--input", &s(&input), "--output", &s(&by_exe)]);
    ok(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(&input), "-o", &s(&by_jit)]);
    assert_eq!(read_safetensors(&by_exe), read_safetensors(&by_jit));
    // The sidecar is an artifact: kiln runs it too.
    let by_artifact = dir.join("artifact.safetensors");
    ok(&["run", &s(&sidecar), "-i", &s(&input), "-o", &s(&by_artifact)]);
    assert_eq!(read_safetensors(&by_artifact), read_safetensors(&by_jit));
    // Other weights of the same model (another seed) are refused, then none at all.
    let other = dir.join("other.safetensors");
    kiln_tests::write_tiny_checkpoint(&other, 8);
    ok(&["compile", &tiny_spec(), "-w", &s(&other), "-o", &s(&sidecar)]);
    let out = program(&exe, &["--input", &s(&input)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("not the weights this program was compiled with"), "{stderr}");
    std::fs::remove_file(&sidecar).expect("remove");
    let out = program(&exe, &["--input", &s(&input)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("model-exe.kiln"), "{stderr}");
    fails(
        &[
            "compile",
            &tiny_spec(),
            "-w",
            &s(&weights),
            "--emit",
            "lib",
            "-o",
            &s(&dir.join("libt.a")),
            "--weights-beside",
        ],
        &["--emit exe"],
    );
}

/// Reads the named i64 tensors of a fixture file.
fn fixture_ids(file: &str, names: &[&str]) -> Vec<Vec<i64>> {
    let raw = read_safetensors(&fixtures().join(file));
    names
        .iter()
        .map(|n| {
            let t = raw.iter().find(|t| t.0 == *n).unwrap_or_else(|| panic!("{file} has no `{n}`"));
            t.3.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect()
        })
        .collect()
}

/// MiniLM as an executable: its embeddings of 24 dev sentences are `kiln run`'s, bit for bit.
#[test]
fn minilm_executable_embeddings_are_kiln_runs() {
    let Some(weights) = real_checkpoint(MINILM_WEIGHTS) else { return };
    let dir = scratch("native-minilm");
    let exe = compile_exe(&dir, &s(&spec("minilm/minilm.kiln")), Some(&weights), &[]);
    // The first 24 rows of the dev fixture's inputs.
    let rows = 24;
    let raw = read_safetensors(&fixtures().join("minilm_dev.safetensors"));
    let inputs: Vec<Raw> = raw
        .iter()
        .filter(|t| t.0 == "input_ids" || t.0 == "attention_mask")
        .map(|(n, d, shape, bytes)| {
            let row = bytes.len() / shape[0];
            (n.clone(), *d, vec![rows, shape[1]], bytes[..rows * row].to_vec())
        })
        .collect();
    assert_eq!(inputs.len(), 2);
    let input = dir.join("in.safetensors");
    write_safetensors(&input, &inputs);
    let (by_exe, by_jit) = (dir.join("exe.safetensors"), dir.join("jit.safetensors"));
    program_ok(&exe, &["-i", &s(&input), "-o", &s(&by_exe), "--threads", "2"]);
    let minilm = s(&spec("minilm/minilm.kiln"));
    ok(&["run", &minilm, "-w", &s(&weights), "-i", &s(&input), "-o", &s(&by_jit), "--threads", "1"]);
    let (a, b) = (read_safetensors(&by_exe), read_safetensors(&by_jit));
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].2, vec![rows, 384]);
    assert_eq!(a, b, "the program's embeddings differ from kiln run's");
}

/// SmolLM2 as executables: the exact model continues the fixture's prompt as PyTorch does,
/// and a quantized one with int8 activations as `kiln generate` does on the same artifact.
#[test]
fn smollm2_executables_generate_kiln_s_tokens() {
    let Some(weights) = real_checkpoint(SMOLLM2_WEIGHTS) else { return };
    let dir = scratch("native-smollm2");
    let [prompt, want] = &fixture_ids("smollm2_greedy.safetensors", &["prompt_ids", "generated_ids"])[..] else {
        unreachable!()
    };
    let prompt: String = prompt.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    let n = want.len().to_string();
    let smollm2 = s(&spec("smollm2/smollm2.kiln"));
    let w = s(&weights);
    let exe = compile_exe(&dir, &smollm2, Some(&weights), &[]);
    let got = program_ok(&exe, &["--prompt-ids", &prompt, "--max-tokens", &n, "--ignore-eos", "--json"]);
    assert_eq!(&ids_of(&got), want, "the exact program's continuation is not PyTorch's");

    // Every kernel format: int4g64a and int3g32a run as Q4_1, int4g96 as Q4_0, int8 as
    // Q8_0, fp8g64 as fp8g32 (and the program stores them so, `repack::prepack`).
    let artifact = dir.join("q.kiln.st");
    let overrides = ["blk.0.*=int3g32a", "blk.1.*=int4g96", "blk.2.*=int8", "blk.3.*=fp8g64"];
    let mut args = vec!["compile", &smollm2, "-w", &w, "--passes", "quantize(format=int4g64a, method=rtn)"];
    args.extend(overrides.iter().flat_map(|o| ["--override", o]));
    let a = s(&artifact);
    args.extend(["-o", &a]);
    ok(&args);
    let exe = compile_exe(&dir, &s(&artifact), None, &["--activations", "int8"]);
    let got = program_ok(&exe, &["--prompt-ids", &prompt, "--max-tokens", "16", "--threads", "3", "--json"]);
    let by_kiln = ok(&[
        "generate",
        &s(&artifact),
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "16",
        "--activations",
        "int8",
        "--threads",
        "1",
        "--json",
    ]);
    assert_eq!(ids_of(&got), ids_of(&by_kiln), "the quantized program's tokens are not kiln generate's");
}

/// Compiles `model` to `DIR/libNAME.a` (and `NAME.h`), then `c_source` against it with the
/// link line the header documents; returns the C program.
fn build_c_program(dir: &Path, name: &str, model: &str, weights: Option<&Path>, c_source: &Path) -> PathBuf {
    runtime_library();
    let lib = dir.join(format!("lib{name}.a"));
    let mut args = vec!["compile".to_string(), model.to_string()];
    if let Some(w) = weights {
        args.extend(["-w".into(), s(w)]);
    }
    args.extend(["--emit".into(), "lib".into(), "-o".into(), s(&lib)]);
    ok(&args);
    let header = std::fs::read_to_string(dir.join(format!("{name}.h"))).expect("the header is written");
    let link = header
        .lines()
        .find_map(|l| l.trim_start_matches([' ', '*']).strip_prefix(&format!("Link: cc program.c lib{name}.a ")))
        .unwrap_or_else(|| panic!("{name}.h documents no link line:\n{header}"));
    let exe = dir.join(format!("{name}-c"));
    let out = Command::new("cc")
        .arg(c_source)
        .arg("-I")
        .arg(dir)
        .arg(&lib)
        .args(link.split_whitespace())
        .arg("-o")
        .arg(&exe)
        .output()
        .expect("cc runs");
    assert!(out.status.success(), "cc failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

/// The values a C program printed one per line after a `NAME [shape]` line, as f32 bits.
fn printed_floats(stdout: &str, output: &str) -> Vec<u32> {
    let mut lines = stdout.lines().skip_while(|l| !l.starts_with(&format!("{output} [")));
    assert!(lines.next().is_some(), "no output `{output}` in:\n{stdout}");
    lines
        .take_while(|l| !l.contains('['))
        .map(|l| l.trim().parse::<f32>().unwrap_or_else(|e| panic!("{l:?}: {e}")).to_bits())
        .collect()
}

fn f32_bits(raw: &Raw) -> Vec<u32> {
    raw.3.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// A C program on the tiny model's library: its logits are `kiln run`'s bit for bit (9
/// significant digits give back every f32), two models live at once, and a bad input is
/// reported through `kiln_last_error`.
#[test]
fn tiny_library_from_c() {
    let (dir, weights) = tiny_setup("native-tiny-lib");
    let c = dir.join("tiny.c");
    std::fs::write(
        &c,
        r#"#include <stdint.h>
#include <stdio.h>
#include "tiny.h"

int main(void) {
    int64_t ids[10] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10}, mask[10] = {1, 1, 1, 1, 1, 1, 1, 1, 0, 0};
    size_t shape[2] = {2, 5};
    kiln_tensor in[2] = {{"input_ids", KILN_I64, 2, shape, ids}, {"attention_mask", KILN_I64, 2, shape, mask}};
    kiln_model *a = tiny_create(3), *b = tiny_create(1);
    if (!a || !b) { printf("create: %s\n", kiln_last_error()); return 1; }
    kiln_result *ra = NULL, *rb = NULL;
    if (kiln_run(a, in, 2, &ra) || kiln_run(b, in, 2, &rb)) { printf("run: %s\n", kiln_last_error()); return 1; }
    const kiln_tensor *t = kiln_result_get(ra, 0), *u = kiln_result_get(rb, 0);
    size_t n = 1;
    printf("%s [", t->name);
    for (size_t d = 0; d < t->rank; d++) { printf(d ? ", %zu" : "%zu", t->shape[d]); n *= t->shape[d]; }
    printf("]\n");
    for (size_t i = 0; i < n; i++) {
        float x = ((const float *)t->data)[i], y = ((const float *)u->data)[i];
        if (x != y) { printf("threads differ at %zu\n", i); return 1; }
        printf("%.9g\n", x);
    }
    if (kiln_result_get(ra, kiln_result_count(ra)) != NULL) return 1;
    kiln_result *none = NULL;
    if (kiln_run(a, NULL, 0, &none) != -1 || none != NULL) return 1;
    printf("[no inputs] %s\n", kiln_last_error());
    kiln_result_free(ra);
    kiln_result_free(rb);
    in[1].name = "mask";
    kiln_result *bad = NULL;
    if (kiln_run(a, in, 2, &bad) != -1 || bad != NULL) return 1;
    printf("[error] %s\n", kiln_last_error());
    kiln_free(a);
    kiln_free(b);
    return 0;
}
"#,
    )
    .expect("write");
    let exe = build_c_program(&dir, "tiny", &tiny_spec(), Some(&weights), &c);
    let stdout = program_ok(&exe, &[] as &[&str]);
    let input = tiny_input(&dir);
    let by_jit = dir.join("jit.safetensors");
    ok(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(&input), "-o", &s(&by_jit)]);
    let want = read_safetensors(&by_jit);
    let logits = want.iter().find(|t| t.0 == "logits").expect("logits");
    assert!(
        stdout
            .starts_with(&format!("logits [{}]", logits.2.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")))
    );
    assert_eq!(printed_floats(&stdout, "logits"), f32_bits(logits));
    let error = stdout.lines().find_map(|l| l.strip_prefix("[error] ")).expect("the error line");
    assert!(error.contains("attention_mask"), "{error}");
    let error = stdout.lines().find_map(|l| l.strip_prefix("[no inputs] ")).expect("the error line");
    assert!(error.contains("kiln_run's inputs has no tensor `input_ids`"), "{error}");
}

/// `examples/c/minilm.c` builds against MiniLM's library and embeds a sentence as `kiln run`
/// does, bit for bit.
#[test]
fn minilm_c_example_matches_kiln_run() {
    let Some(weights) = real_checkpoint(MINILM_WEIGHTS) else { return };
    let dir = scratch("native-minilm-c");
    let example = kiln_tests::root().join("examples/c/minilm.c");
    let exe = build_c_program(&dir, "minilm", &s(&spec("minilm/minilm.kiln")), Some(&weights), &example);
    let ids = [101i64, 1037, 6251, 2055, 24264, 1012, 102];
    let args: Vec<String> = ids.iter().map(i64::to_string).collect();
    let stdout = program_ok(&exe, &args);
    let input = dir.join("in.safetensors");
    write_safetensors(
        &input,
        &[i64s("input_ids", &[1, ids.len()], &ids), i64s("attention_mask", &[1, ids.len()], &[1; 7])],
    );
    let by_jit = dir.join("jit.safetensors");
    ok(&["run", &s(&spec("minilm/minilm.kiln")), "-w", &s(&weights), "-i", &s(&input), "-o", &s(&by_jit)]);
    let want = read_safetensors(&by_jit);
    assert!(stdout.starts_with("embeddings [1, 384]"), "{stdout}");
    assert_eq!(printed_floats(&stdout, "embeddings"), f32_bits(&want[0]));
}
