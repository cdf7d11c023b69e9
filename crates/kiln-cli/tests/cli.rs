//! End-to-end tests of the `kiln` binary: the happy paths of `check`, `ir`, `run` and
//! `eval` on the tiny model (whose checkpoint the tests write themselves), and the
//! promise that bad input of every kind gets a clear error and a non-zero exit, never a
//! panic or a backtrace.

mod common;

use common::*;
use kiln_tests::{fixtures, real_checkpoint, spec, write_tiny_checkpoint};
use safetensors::Dtype;
use std::path::{Path, PathBuf};

/// A GGUF (version 3) file holding `tensors` (F32, F16 or BF16), with one string
/// key/value pair.
fn gguf_bytes(tensors: &[Raw]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(1u64.to_le_bytes());
    string(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes()); // string
    string(&mut out, "tiny");
    let mut offset = 0u64;
    let mut offsets = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        string(&mut out, name);
        out.extend((shape.len() as u32).to_le_bytes());
        for &d in shape.iter().rev() {
            out.extend((d as u64).to_le_bytes());
        }
        let ggml_type: u32 = match dtype {
            Dtype::F32 => 0,
            Dtype::F16 => 1,
            Dtype::BF16 => 30,
            other => panic!("no GGUF type for {other:?}"),
        };
        out.extend(ggml_type.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + bytes.len() as u64).next_multiple_of(32);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    let data_start = out.len();
    for ((_, _, _, bytes), off) in tensors.iter().zip(offsets) {
        out.resize(data_start + off as usize, 0);
        out.extend(bytes);
    }
    out
}

// ---------------------------------------------------------------------------------------
// Happy paths
// ---------------------------------------------------------------------------------------

#[test]
fn run_tiny_writes_every_output_by_name_deterministically() {
    let (dir, weights) = tiny_setup("run");
    let input = dir.join("in.safetensors");
    write_safetensors(
        &input,
        &[
            i64s("input_ids", &[2, 5], &[1, 5, 9, 30, 31, 0, 2, 4, 8, 16]),
            i64s("attention_mask", &[2, 5], &[1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
            f32s("unrelated", &[3], &[1.0, 2.0, 3.0]),
            (
                "also_unrelated".into(),
                Dtype::BF16,
                vec![2],
                [half::bf16::from_f32(1.0), half::bf16::from_f32(2.0)].iter().flat_map(|v| v.to_le_bytes()).collect(),
            ),
        ],
    );
    let mut runs = Vec::new();
    for name in ["out1.safetensors", "out2.safetensors"] {
        let out = dir.join(name);
        let args = ["run", &tiny_spec(), "--weights", &s(&weights), "--input", &s(&input), "--output", &s(&out)];
        let o = kiln(&args);
        assert_no_panic(&args, &o);
        assert!(o.status.success(), "{}", describe(&args, &o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(stderr.contains("wrote 2 output(s)") && stderr.contains(name), "{}", describe(&args, &o));
        runs.push(std::fs::read(&out).expect("output written"));
    }
    assert_eq!(runs[0], runs[1], "two runs on the same input differ");

    let tensors = read_safetensors(&dir.join("out1.safetensors"));
    let names: Vec<&str> = tensors.iter().map(|t| t.0.as_str()).collect();
    assert_eq!(names, ["hidden", "logits"]);
    let hidden = &tensors[0];
    let logits = &tensors[1];
    assert_eq!((hidden.1, hidden.2.as_slice()), (Dtype::F32, &[2usize, 16][..]));
    assert_eq!((logits.1, logits.2.as_slice()), (Dtype::F32, &[2usize, 5, 32][..]));
    for t in [hidden, logits] {
        let values = as_f32(t);
        assert!(values.iter().all(|v| v.is_finite()), "{} has non-finite values", t.0);
        assert!(values.iter().any(|&v| v != 0.0), "{} is all zeros", t.0);
    }
    // The batch rows are independent: the second row's logits differ from the first's.
    let l = as_f32(logits);
    assert_ne!(l[..5 * 32], l[5 * 32..]);

    // Without --output, the outputs are printed.
    let stdout = ok(&["run", &tiny_spec(), "--weights", &s(&weights), "--input", &s(&input)]);
    assert!(stdout.contains("logits: f32[2, 5, 32]"), "{stdout}");
    assert!(stdout.contains("hidden: f32[2, 16]"), "{stdout}");
}

#[test]
fn run_tiny_from_gguf_matches_safetensors() {
    let (dir, weights) = tiny_setup("gguf-run");
    let gguf = dir.join("tiny.gguf");
    std::fs::write(&gguf, gguf_bytes(&read_safetensors(&weights))).expect("write gguf");
    let stdout = ok(&["check", &tiny_spec(), "--weights", &s(&gguf)]);
    assert!(stdout.contains("(GGUF)"), "{stdout}");

    let input = dir.join("in.safetensors");
    write_safetensors(
        &input,
        &[i64s("input_ids", &[1, 4], &[3, 1, 4, 1]), i64s("attention_mask", &[1, 4], &[1, 1, 1, 1])],
    );
    let mut outs = Vec::new();
    for (w, name) in [(&weights, "a.safetensors"), (&gguf, "b.safetensors")] {
        let out = dir.join(name);
        ok(&["run", &tiny_spec(), "-w", &s(w), "-i", &s(&input), "-o", &s(&out)]);
        outs.push(std::fs::read(out).expect("output"));
    }
    assert_eq!(outs[0], outs[1], "the same weights from GGUF and safetensors give different outputs");
}

#[test]
fn check_tiny_counts_parameters() {
    let (_dir, weights) = tiny_setup("check");
    let expected: usize = read_safetensors(&weights).iter().map(|t| t.2.iter().product::<usize>()).sum();

    let stdout = ok(&["check", &tiny_spec()]);
    assert!(stdout.contains("tiny.kiln: ok ("), "{stdout}");
    assert!(stdout.contains(&format!(" {expected} parameters)")), "expected {expected} parameters:\n{stdout}");
    assert!(!stdout.contains("weights bound"), "{stdout}");

    let stdout = ok(&["check", &tiny_spec(), "--weights", &s(&weights)]);
    assert!(stdout.contains(&format!(" {expected} parameters)")), "expected {expected} parameters:\n{stdout}");
    assert!(stdout.contains(&format!("weights bound from {} (safetensors)", weights.display())), "{stdout}");
    assert!(!stdout.contains("not used by the model"), "{stdout}");
}

#[test]
fn check_notes_unused_checkpoint_tensors() {
    let (dir, weights) = tiny_setup("check-unused");
    let mut tensors = read_safetensors(&weights);
    tensors.push(f32s("lm_head.weight", &[2, 2], &[0.0; 4]));
    let extra = dir.join("extra.safetensors");
    write_safetensors(&extra, &tensors);
    let stdout = ok(&["check", &tiny_spec(), "--weights", &s(&extra)]);
    assert!(stdout.contains("1 checkpoint tensors are not used by the model: lm_head.weight"), "{stdout}");
}

/// `kiln passes` lists every pass with its options; `kiln ir --print-after` shows the IR
/// after each pass, each section headed by the call, and each section is the IR that
/// running the pipeline up to that pass prints.
#[test]
fn passes_are_listed_and_printed_after() {
    // Every pass of the registry with its summary, and every option with its values,
    // default and help, whatever the wrapping.
    let listed = ok(&["passes"]);
    let words = |text: &str| text.split_whitespace().collect::<Vec<_>>().join(" ");
    let flat = words(&listed);
    for pass in kiln_passes::manager::REGISTRY {
        assert!(listed.contains(&format!("{}: ", pass.name)), "{} in\n{listed}", pass.name);
        assert!(flat.contains(&words(pass.summary)), "{}'s summary in\n{listed}", pass.name);
        for o in pass.options {
            for text in [o.name, o.values, o.default, o.help] {
                assert!(flat.contains(&words(text)), "{}'s {}: {text:?} in\n{listed}", pass.name, o.name);
            }
        }
    }
    assert!(kiln_passes::manager::REGISTRY.iter().any(|p| p.name == "quantize" && p.options.len() > 5));
    let (_dir, weights) = tiny_setup("print-after");
    let pipeline = "quantize(format=bf16), last_position(output=logits), dead_code";
    let all = ok(&["ir", &tiny_spec(), "-w", &s(&weights), "--passes", pipeline, "--print-after", "all"]);
    let headers: Vec<&str> = all.lines().filter(|l| l.starts_with("; after ")).collect();
    assert_eq!(headers, ["; after quantize(format=bf16)", "; after last_position(output=logits)", "; after dead_code"]);
    let sections: Vec<&str> = all.split("; after ").skip(1).map(|s| &s[s.find('\n').unwrap() + 1..]).collect();
    let first = ok(&["ir", &tiny_spec(), "-w", &s(&weights), "--passes", "quantize(format=bf16)"]);
    assert_eq!(sections[0], first);
    let whole = ok(&["ir", &tiny_spec(), "-w", &s(&weights), "--passes", pipeline]);
    assert_eq!(sections[2], whole, "the last section is the pipeline's result");
    assert!(sections[1].contains("slice") && !sections[0].contains("slice"), "{all}");
    let one = ok(&["ir", &tiny_spec(), "-w", &s(&weights), "--passes", pipeline, "--print-after", "last_position"]);
    assert_eq!(one, format!("; after last_position(output=logits)\n{}", sections[1]));
    fails(&["ir", &tiny_spec(), "--passes", pipeline, "--print-after", "merge"], &["unknown pass `merge`"]);
    fails(&["ir", &tiny_spec(), "--passes", pipeline, "--print-after", "drop"], &["does not run drop"]);
    fails(
        &["ir", &tiny_spec(), "--passes", "quantize(format=bf16, bitz=3)"],
        &["unknown option `bitz`", "kiln passes"],
    );
    fails(&["ir", &tiny_spec(), "--passes", "dead_code", "--print-after", "quantize"], &["does not run quantize"]);
    fails(
        &["ir", &tiny_spec(), "--passes", "dead_code", "--override", "embed=int8"],
        &["no pass in the pipeline takes --override"],
    );
}

#[test]
fn ir_tiny_shows_formats_when_bound() {
    let (_dir, weights) = tiny_setup("ir");
    let unbound = ok(&["ir", &tiny_spec()]);
    assert!(unbound.starts_with("graph tiny {"), "{unbound}");
    assert!(unbound.contains("input \"input_ids\" : i64[batch, seq]"), "{unbound}");
    assert!(!unbound.contains('#'), "an unbound graph has no checksums:\n{unbound}");

    let bound = ok(&["ir", &tiny_spec(), "--weights", &s(&weights)]);
    let weight_lines: Vec<&str> = bound.lines().filter(|l| l.contains("= weight ")).collect();
    assert!(!weight_lines.is_empty(), "{bound}");
    for line in &weight_lines {
        let expected = if line.contains("norm.weight") {
            "bf16 #"
        } else if line.contains(".bias\"") {
            "f16 #"
        } else {
            "f32 #"
        };
        assert!(line.contains(expected), "expected {expected:?} in {line:?}");
    }
    assert!(weight_lines.iter().any(|l| l.contains("bf16 #")), "{bound}");
    assert!(weight_lines.iter().any(|l| l.contains(" f16 #")), "{bound}");
    // Everything but the weight lines is the same as unbound.
    let strip =
        |text: &str| -> Vec<String> { text.lines().filter(|l| !l.contains("= weight ")).map(String::from).collect() };
    assert_eq!(strip(&unbound), strip(&bound));
}

#[test]
fn eval_tiny_reports_perplexity() {
    let (dir, weights) = tiny_setup("eval");
    let data = dir.join("data.safetensors");
    // batch 3, seq 6, all mask ones: 3 * 5 predicted tokens.
    let ids: Vec<i64> = (0..18).map(|i| (i * 7 % 32) as i64).collect();
    write_safetensors(&data, &[i64s("input_ids", &[3, 6], &ids), i64s("attention_mask", &[3, 6], &[1; 18])]);
    let stdout = ok(&["eval", &tiny_spec(), "--weights", &s(&weights), "--data", &s(&data), "--json", "--batch", "2"]);
    let json: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    assert_eq!(json["tokens"], 15, "{json}");
    let ppl = json["perplexity"].as_f64().expect("perplexity");
    assert!(ppl.is_finite() && ppl > 1.0, "{json}");
    let nll = json["nll_mean"].as_f64().expect("nll_mean");
    assert!((nll.exp() - ppl).abs() < 1e-9 * ppl, "{json}");

    // The batch size does not change the result.
    let stdout1 = ok(&["eval", &tiny_spec(), "--weights", &s(&weights), "--data", &s(&data), "--json", "--batch", "1"]);
    let json1: serde_json::Value = serde_json::from_str(stdout1.trim()).expect("JSON");
    assert!((json1["perplexity"].as_f64().unwrap() - ppl).abs() < 1e-6 * ppl, "{json} vs {json1}");

    // Masked targets are not counted: row 0 keeps 3 of 5 targets, rows 1 and 2 all 5.
    let mut mask = vec![1i64; 18];
    mask[4] = 0;
    mask[5] = 0;
    let masked = dir.join("masked.safetensors");
    write_safetensors(&masked, &[i64s("input_ids", &[3, 6], &ids), i64s("attention_mask", &[3, 6], &mask)]);
    let stdout = ok(&["eval", &tiny_spec(), "--weights", &s(&weights), "--data", &s(&masked), "--json"]);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert_eq!(json["tokens"], 13, "{json}");

    // Without --json: one line per metric.
    let stdout = ok(&["eval", &tiny_spec(), "--weights", &s(&weights), "--data", &s(&data)]);
    assert!(stdout.lines().any(|l| l.trim_start().starts_with("perplexity:")), "{stdout}");
    assert!(stdout.lines().any(|l| l.trim() == "tokens: 15"), "{stdout}");
}

#[test]
fn eval_compares_reference_outputs() {
    let (dir, weights) = tiny_setup("eval-ref");
    let input = dir.join("in.safetensors");
    let ids = [i64s("input_ids", &[2, 4], &[1, 2, 3, 4, 5, 6, 7, 8]), i64s("attention_mask", &[2, 4], &[1; 8])];
    write_safetensors(&input, &ids);
    let out = dir.join("out.safetensors");
    ok(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(&input), "-o", &s(&out)]);
    let hidden = read_safetensors(&out).into_iter().find(|t| t.0 == "hidden").expect("hidden");
    let data = dir.join("data.safetensors");
    write_safetensors(&data, &[ids[0].clone(), ids[1].clone(), hidden]);
    let stdout = ok(&["eval", &tiny_spec(), "-w", &s(&weights), "--data", &s(&data), "--json"]);
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
    assert!(json["cosine_min"].as_f64().expect("cosine_min") > 0.999_999, "{json}");
    assert!(json["cosine_mean"].as_f64().expect("cosine_mean") > 0.999_999, "{json}");
    assert_eq!(json["rows"], 2, "{json}");
    assert_eq!(json["max_abs_diff_hidden"], 0.0, "{json}");
    assert_eq!(json["tokens"], 6, "{json}");
}

// ---------------------------------------------------------------------------------------
// Errors: files and specs
// ---------------------------------------------------------------------------------------

#[test]
fn missing_spec_file() {
    let dir = scratch("missing-spec");
    let missing = dir.join("nope.kiln");
    for cmd in ["check", "ir"] {
        fails(&[cmd, &s(&missing)], &["nope.kiln", "cannot read model spec"]);
    }
    let weights = dir.join("w.safetensors");
    write_tiny_checkpoint(&weights, 1);
    fails(&["run", &s(&missing), "-w", &s(&weights), "--text", "hi"], &["nope.kiln"]);
    fails(&["eval", &s(&missing), "-w", &s(&weights), "--data", &s(&weights)], &["nope.kiln"]);
    // A directory is not a spec either.
    fails(&["check", &s(&dir)], &[&s(&dir)]);
}

#[test]
fn missing_weights_file() {
    let dir = scratch("missing-weights");
    let missing = dir.join("absent.safetensors");
    for cmd in ["check", "ir"] {
        fails(&[cmd, &tiny_spec(), "--weights", &s(&missing)], &["absent.safetensors", "cannot open"]);
    }
    fails(&["run", &tiny_spec(), "--weights", &s(&missing), "--text", "hi"], &["absent.safetensors"]);
    fails(&["eval", &tiny_spec(), "--weights", &s(&missing), "--data", &s(&missing)], &["absent.safetensors"]);
}

#[test]
fn dsl_syntax_error_shows_file_line_column_and_source() {
    let dir = scratch("syntax");
    let source = std::fs::read_to_string(spec("tiny/tiny.kiln")).expect("spec");
    let broken = source.replacen("let heads = 4", "let heads = = 4", 1);
    assert_ne!(broken, source);
    let line = broken.lines().position(|l| l == "let heads = = 4").expect("edited line") + 1;
    let path = dir.join("broken_tiny.kiln");
    std::fs::write(&path, &broken).expect("write");
    for cmd in ["check", "ir"] {
        let stderr =
            fails(&[cmd, &s(&path)], &["syntax error", &format!("broken_tiny.kiln:{line}:13"), "let heads = = 4"]);
        // The caret sits under column 13 of the source line.
        let src_line = stderr.lines().find(|l| l.ends_with("let heads = = 4")).expect("source line shown");
        let caret_line =
            stderr.lines().skip_while(|l| !l.ends_with("let heads = = 4")).nth(1).expect("a line under the source");
        let col0 = src_line.find("let heads").expect("source text");
        let caret = caret_line.find(['▲', '^']).unwrap_or_else(|| panic!("no caret under the source line:\n{stderr}"));
        // `▲` is multi-byte; compare columns in chars.
        let chars = |s: &str, byte: usize| s[..byte].chars().count();
        assert_eq!(chars(caret_line, caret), chars(src_line, col0) + 12, "caret misplaced:\n{stderr}");
    }

    // An unterminated block at the end of the file.
    let path = dir.join("unterminated.kiln");
    std::fs::write(&path, "model m\ninput x: f32[n]\nblock B(x) {\n    return x\n").expect("write");
    fails(&["check", &s(&path)], &["unterminated.kiln:"]);
    // A file that is not a spec at all (binary bytes, invalid UTF-8).
    let path = dir.join("binary.kiln");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80, 0x01]).expect("write");
    fails(&["check", &s(&path)], &["binary.kiln"]);
    // An empty file.
    let path = dir.join("empty.kiln");
    std::fs::write(&path, "").expect("write");
    fails(&["check", &s(&path)], &["empty.kiln"]);
}

#[test]
fn unknown_name_in_spec() {
    let dir = scratch("unknown");
    let source = std::fs::read_to_string(spec("tiny/tiny.kiln")).expect("spec");
    let path = dir.join("unknown_block.kiln");
    std::fs::write(&path, source.replacen("silu(", "sillu(", 1)).expect("write");
    fails(&["check", &s(&path)], &["unknown block or builtin `sillu`", "unknown_block.kiln:", "silu"]);

    let path = dir.join("unknown_var.kiln");
    std::fs::write(
        &path,
        source.replacen("RMSNorm(x, hidden, eps) as \"final_norm\"", "RMSNorm(x, hiden, eps) as \"final_norm\"", 1),
    )
    .expect("write");
    fails(&["check", &s(&path)], &["hiden", "unknown_var.kiln:"]);
}

#[test]
fn param_shape_disagrees_with_checkpoint() {
    let (dir, weights) = tiny_setup("shape");
    let source = std::fs::read_to_string(spec("tiny/tiny.kiln")).expect("spec");
    let edited = source.replacen("let ffn = [24, 40]", "let ffn = [24, 48]", 1);
    assert_ne!(edited, source);
    let path = dir.join("wide.kiln");
    std::fs::write(&path, edited).expect("write");
    // Without weights the edited spec is fine...
    ok(&["check", &s(&path)]);
    // ...with them, the first tensor of layer 1's wider MLP disagrees.
    for cmd in ["check", "ir"] {
        fails(
            &[cmd, &s(&path), "--weights", &s(&weights)],
            &["layers.1.mlp.up.weight", "[48, 16]", "[40, 16]", "wide.kiln:"],
        );
    }
    fails(
        &["run", &s(&path), "--weights", &s(&weights), "--input", &s(&weights)],
        &["layers.1.mlp.up.weight", "[48, 16]", "[40, 16]"],
    );
}

#[test]
fn checkpoint_missing_a_tensor() {
    let (dir, weights) = tiny_setup("missing-tensor");
    let tensors: Vec<Raw> =
        read_safetensors(&weights).into_iter().filter(|t| t.0 != "layers.1.mlp.down.bias").collect();
    let partial = dir.join("partial.safetensors");
    write_safetensors(&partial, &tensors);
    for cmd in ["check", "ir"] {
        fails(&[cmd, &tiny_spec(), "--weights", &s(&partial)], &["partial.safetensors", "layers.1.mlp.down.bias"]);
    }
    // A tensor present with a dtype kiln cannot use.
    let mut tensors = read_safetensors(&weights);
    let t = tensors.iter_mut().find(|t| t.0 == "layers.0.attn.o.weight").expect("o.weight");
    t.1 = Dtype::I32;
    let bad = dir.join("i32.safetensors");
    write_safetensors(&bad, &tensors);
    fails(&["check", &tiny_spec(), "--weights", &s(&bad)], &["i32.safetensors", "layers.0.attn.o.weight", "I32"]);
}

#[test]
fn truncated_safetensors() {
    let (dir, weights) = tiny_setup("truncated-st");
    let bytes = std::fs::read(&weights).expect("read");
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut lengths = vec![0, 1, 7, 8, 9, 20, header / 2, header + 7, header + 8, header + 9, header + 100];
    lengths.extend([bytes.len() / 2, bytes.len() - 100, bytes.len() - 1]);
    for len in lengths {
        let path = dir.join(format!("cut_{len}.safetensors"));
        std::fs::write(&path, &bytes[..len]).expect("write");
        let stderr = fails(&["check", &tiny_spec(), "--weights", &s(&path)], &[&format!("cut_{len}.safetensors")]);
        if len > 8 {
            assert!(stderr.contains("truncated"), "cut at {len} of {}:\n{stderr}", bytes.len());
        }
    }
}

#[test]
fn corrupt_safetensors_header() {
    let (dir, weights) = tiny_setup("corrupt-st");
    let original = std::fs::read(&weights).expect("read");
    let with_header = |json: &str, data: usize| -> Vec<u8> {
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend(json.as_bytes());
        out.resize(out.len() + data, 0);
        out
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("garbage", with_header("{this is not json at all", 64)),
        ("not_object", with_header("[1, 2, 3]", 0)),
        ("bad_dtype", with_header(r#"{"embed.weight":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}"#, 8)),
        (
            "shape_vs_offsets",
            with_header(r#"{"embed.weight":{"dtype":"F32","shape":[32,16],"data_offsets":[0,8]}}"#, 8),
        ),
        (
            "offsets_past_end",
            with_header(r#"{"embed.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8000000]}}"#, 8),
        ),
        ("reversed_offsets", with_header(r#"{"embed.weight":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}"#, 8)),
        (
            "huge_shape",
            with_header(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,0]}}"#, 0),
        ),
        ("huge_header_len", {
            let mut b = u64::MAX.to_le_bytes().to_vec();
            b.extend(b"{}");
            b
        }),
        ("bad_utf8", {
            let mut b = 4u64.to_le_bytes().to_vec();
            b.extend([b'{', 0xff, 0xfe, b'}']);
            b
        }),
        // The real header with a byte flipped inside it.
        ("flipped", {
            let mut b = original.clone();
            b[20] = b'"';
            b[21] = b'\\';
            b
        }),
    ];
    for (name, bytes) in cases {
        let path = dir.join(format!("{name}.safetensors"));
        std::fs::write(&path, bytes).expect("write");
        fails(&["check", &tiny_spec(), "--weights", &s(&path)], &[&format!("{name}.safetensors")]);
    }
}

/// A hand-built GGUF of the tiny model cut at many lengths and with corrupt header fields;
/// then the real SmolLM2 GGUF cut at a few lengths, when it has been fetched.
#[test]
fn truncated_and_corrupt_gguf() {
    let (dir, weights) = tiny_setup("gguf");
    let full = gguf_bytes(&read_safetensors(&weights));
    let full_path = dir.join("full.gguf");
    std::fs::write(&full_path, &full).expect("write");
    ok(&["check", &tiny_spec(), "--weights", &s(&full_path)]);

    let mut lengths: Vec<usize> = vec![1, 3, 4, 6, 8, 12, 16, 23, 24, 30, 40, 60, 100, 200, 500, 1000];
    lengths.extend([full.len() / 2, full.len() - 33, full.len() - 1]);
    for len in lengths {
        let path = dir.join(format!("cut_{len}.gguf"));
        std::fs::write(&path, &full[..len]).expect("write");
        let stderr = fails(&["check", &tiny_spec(), "--weights", &s(&path)], &[&format!("cut_{len}.gguf")]);
        if len > 4 {
            assert!(stderr.contains("truncated"), "cut at {len} of {}:\n{stderr}", full.len());
        }
    }

    let patch = |at: usize, with: &[u8]| -> Vec<u8> {
        let mut b = full.clone();
        b[at..at + with.len()].copy_from_slice(with);
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("version_1", patch(4, &1u32.to_le_bytes()), "version 1"),
        ("version_big_endian", patch(4, &3u32.to_be_bytes()), "big-endian"),
        ("huge_tensor_count", patch(8, &u64::MAX.to_le_bytes()), ""),
        ("huge_kv_count", patch(16, &(1u64 << 60).to_le_bytes()), ""),
        ("huge_key_len", patch(24, &u64::MAX.to_le_bytes()), ""),
        ("bad_value_type", patch(24 + 8 + "general.architecture".len(), &999u32.to_le_bytes()), ""),
        // The first tensor info: its name follows the key/value pair.
        ("huge_dims", patch(24 + 8 + 20 + 4 + 8 + 4 + 8 + "embed.weight".len(), &77u32.to_le_bytes()), ""),
        ("huge_extent", patch(24 + 8 + 20 + 4 + 8 + 4 + 8 + "embed.weight".len() + 4, &u64::MAX.to_le_bytes()), ""),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(format!("{name}.gguf"));
        std::fs::write(&path, bytes).expect("write");
        fails(&["check", &tiny_spec(), "--weights", &s(&path)], &[&format!("{name}.gguf"), needle]);
    }

    if let Some(real) = real_checkpoint(kiln_tests::SMOLLM2_WEIGHTS) {
        use std::io::Read;
        let size = std::fs::metadata(&real).expect("metadata").len() as usize;
        for len in [10usize, 1000, 100_000, 1_000_000, size / 2, size - 1] {
            let mut head = Vec::with_capacity(len);
            std::fs::File::open(&real).expect("open").take(len as u64).read_to_end(&mut head).expect("read");
            let path = dir.join(format!("smollm2_cut_{len}.gguf"));
            std::fs::write(&path, head).expect("write");
            fails(
                &["check", &s(&spec("smollm2/smollm2.kiln")), "--weights", &s(&path)],
                &[&format!("smollm2_cut_{len}.gguf"), "truncated"],
            );
            std::fs::remove_file(&path).ok();
        }
    }
}

#[test]
fn not_a_checkpoint() {
    let dir = scratch("not-checkpoint");
    let mut rng = kiln_tests::Rng::new(3);
    let random: Vec<u8> = (0..4096).map(|_| (rng.next_f32() * 127.0) as i8 as u8).collect();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random.bin", random, "not a checkpoint"),
        ("empty.safetensors", vec![], "empty"),
        (
            "lfs.safetensors",
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n".to_vec(),
            "Git LFS",
        ),
        ("model.pt", b"PK\x03\x04rest of a zip archive".to_vec(), "zip"),
        ("spec.safetensors", std::fs::read(spec("tiny/tiny.kiln")).expect("spec"), "not a checkpoint"),
    ];
    for (name, bytes, needle) in cases {
        let path = dir.join(name);
        std::fs::write(&path, bytes).expect("write");
        fails(&["check", &tiny_spec(), "--weights", &s(&path)], &[name, needle]);
    }
    // A directory.
    fails(&["check", &tiny_spec(), "--weights", &s(&dir)], &[&s(&dir)]);
}

// ---------------------------------------------------------------------------------------
// Errors: kiln run
// ---------------------------------------------------------------------------------------

/// Runs the tiny model on an input file holding `tensors`; expects failure with `needles`.
fn run_fails(name: &str, tensors: &[Raw], needles: &[&str]) -> String {
    let (dir, weights) = tiny_setup(&format!("run-{name}"));
    let input = dir.join(format!("{name}.safetensors"));
    write_safetensors(&input, tensors);
    let out = dir.join("out.safetensors");
    let stderr = fails(&["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(&input), "-o", &s(&out)], needles);
    assert!(!out.exists(), "a failed run wrote {}", out.display());
    stderr
}

const IDS: [i64; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

#[test]
fn run_input_missing() {
    run_fails(
        "no_mask",
        &[i64s("input_ids", &[2, 5], &IDS), i64s("mask", &[2, 5], &[1; 10])],
        &["attention_mask", "no_mask.safetensors", "i64[batch, seq]", "mask"],
    );
    run_fails("nothing", &[f32s("x", &[1], &[0.0])], &["input_ids", "nothing.safetensors"]);
}

#[test]
fn run_input_wrong_dtype() {
    run_fails(
        "f32_ids",
        &[f32s("input_ids", &[2, 5], &[1.0; 10]), i64s("attention_mask", &[2, 5], &[1; 10])],
        &["input_ids", "f32_ids.safetensors", "f32[2, 5]", "i64[batch, seq]"],
    );
    let i32_ids: Raw =
        ("input_ids".into(), Dtype::I32, vec![2, 5], IDS.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect());
    run_fails(
        "i32_ids",
        &[i32_ids, i64s("attention_mask", &[2, 5], &[1; 10])],
        &["input_ids", "I32", "i64[batch, seq]"],
    );
}

#[test]
fn run_input_wrong_shape() {
    run_fails(
        "rank1",
        &[i64s("input_ids", &[5], &IDS[..5]), i64s("attention_mask", &[2, 5], &[1; 10])],
        &["input_ids", "rank1.safetensors", "i64[batch, seq]", "[5]"],
    );
    run_fails(
        "rank3",
        &[i64s("input_ids", &[1, 2, 5], &IDS), i64s("attention_mask", &[2, 5], &[1; 10])],
        &["input_ids", "rank3.safetensors", "i64[batch, seq]", "[1, 2, 5]"],
    );
    run_fails(
        "scalar",
        &[i64s("input_ids", &[], &[1]), i64s("attention_mask", &[2, 5], &[1; 10])],
        &["input_ids", "i64[batch, seq]"],
    );
}

#[test]
fn run_inputs_disagree_on_batch() {
    let stderr = run_fails(
        "batch",
        &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[3, 5], &[1; 15])],
        &["attention_mask", "batch.safetensors", "`batch` is 2", "3 on axis 0"],
    );
    assert!(stderr.contains("tiny.kiln"), "{stderr}");
    run_fails(
        "seq",
        &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[2, 4], &[1; 8])],
        &["attention_mask", "`seq` is 5", "4 on axis 1"],
    );
}

#[test]
fn run_id_out_of_vocabulary() {
    let mut ids = IDS;
    ids[3] = 1000;
    run_fails(
        "oov",
        &[i64s("input_ids", &[2, 5], &ids), i64s("attention_mask", &[2, 5], &[1; 10])],
        &["oov.safetensors", "1000", "32"],
    );
    ids[3] = -1;
    run_fails("negative", &[i64s("input_ids", &[2, 5], &ids), i64s("attention_mask", &[2, 5], &[1; 10])], &["-1"]);
    ids[3] = i64::MIN;
    run_fails(
        "min",
        &[i64s("input_ids", &[2, 5], &ids), i64s("attention_mask", &[2, 5], &[1; 10])],
        &[&i64::MIN.to_string()],
    );
}

#[test]
fn run_empty_batch_or_sequence_does_not_panic() {
    let (dir, weights) = tiny_setup("run-empty");
    for (name, shape) in [("zero_batch", [0usize, 5]), ("zero_seq", [2, 0])] {
        let input = dir.join(format!("{name}.safetensors"));
        write_safetensors(&input, &[i64s("input_ids", &shape, &[]), i64s("attention_mask", &shape, &[])]);
        let args = ["run", &tiny_spec(), "-w", &s(&weights), "-i", &s(&input)];
        let out = kiln(&args);
        assert_no_panic(&args, &out);
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("Error"), "{}", describe(&args, &out));
        }
    }
}

#[test]
fn run_input_file_problems() {
    let (dir, weights) = tiny_setup("run-input-file");
    let w = s(&weights);
    let missing = dir.join("absent_input.safetensors");
    fails(&["run", &tiny_spec(), "-w", &w, "-i", &s(&missing)], &["absent_input.safetensors"]);
    // Neither --input nor --text.
    fails(&["run", &tiny_spec(), "-w", &w], &["--input", "--text"]);
    // Both.
    let input = dir.join("in.safetensors");
    write_safetensors(&input, &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[2, 5], &[1; 10])]);
    fails(&["run", &tiny_spec(), "-w", &w, "-i", &s(&input), "--text", "hi"], &["--input", "--text"]);
    // A corrupt or truncated input file.
    let bytes = std::fs::read(&input).expect("read");
    for len in [0, 5, 8, 20, bytes.len() - 1] {
        let path = dir.join(format!("cut_input_{len}.safetensors"));
        std::fs::write(&path, &bytes[..len]).expect("write");
        fails(&["run", &tiny_spec(), "-w", &w, "-i", &s(&path)], &[&format!("cut_input_{len}.safetensors")]);
    }
    // The output cannot be written.
    let out = dir.join("no_such_dir").join("out.safetensors");
    fails(&["run", &tiny_spec(), "-w", &w, "-i", &s(&input), "-o", &s(&out)], &["out.safetensors"]);
}

#[test]
fn run_text_without_tokenizer() {
    let (dir, weights) = tiny_setup("run-text");
    let stderr = fails(&["run", &tiny_spec(), "-w", &s(&weights), "--text", "hello"], &["tokenizer"]);
    assert!(stderr.contains(&s(&dir.join("tokenizer.json"))), "{stderr}");
    let absent = dir.join("absent_tokenizer.json");
    fails(
        &["run", &tiny_spec(), "-w", &s(&weights), "--text", "hello", "--tokenizer", &s(&absent)],
        &["absent_tokenizer.json"],
    );
    let garbage = dir.join("garbage_tokenizer.json");
    std::fs::write(&garbage, "{ not a tokenizer").expect("write");
    fails(
        &["run", &tiny_spec(), "-w", &s(&weights), "--text", "hello", "--tokenizer", &s(&garbage)],
        &["garbage_tokenizer.json"],
    );
}

// ---------------------------------------------------------------------------------------
// Errors: kiln eval
// ---------------------------------------------------------------------------------------

#[test]
fn eval_errors() {
    let (dir, weights) = tiny_setup("eval-errors");
    let w = s(&weights);
    let ids = i64s("input_ids", &[2, 5], &IDS);
    let mask = i64s("attention_mask", &[2, 5], &[1; 10]);

    // Data file missing, or without the model's inputs.
    fails(
        &["eval", &tiny_spec(), "-w", &w, "--data", &s(&dir.join("absent_data.safetensors"))],
        &["absent_data.safetensors"],
    );
    let data = dir.join("no_inputs.safetensors");
    write_safetensors(&data, &[f32s("hidden", &[2, 16], &[0.0; 32])]);
    fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data)], &["no_inputs.safetensors", "input_ids"]);

    // A model that is not a language model, with nothing to compare its outputs to.
    let source = std::fs::read_to_string(spec("tiny/tiny.kiln")).expect("spec");
    let not_lm = dir.join("not_lm.kiln");
    std::fs::write(&not_lm, source.replacen("output logits:", "output scores:", 1)).expect("write");
    let data = dir.join("plain.safetensors");
    write_safetensors(&data, &[ids.clone(), mask.clone()]);
    fails(
        &["eval", &s(&not_lm), "-w", &w, "--data", &s(&data)],
        &["plain.safetensors", "nothing to evaluate against", "scores", "hidden"],
    );

    // References that do not fit the outputs.
    let cases: Vec<(&str, Raw, &[&str])> = vec![
        (
            "ref_rows",
            f32s("hidden", &[3, 16], &[0.0; 48]),
            &["hidden", "ref_rows.safetensors", "3 rows", "inputs have 2"],
        ),
        ("ref_width", f32s("hidden", &[2, 7], &[0.0; 14]), &["hidden", "[2, 7]", "[2, 16]"]),
        ("ref_dtype", i64s("hidden", &[2, 16], &[0; 32]), &["hidden", "must be f32", "i64[2, 16]"]),
        ("ref_scalar", f32s("hidden", &[], &[0.0]), &["`hidden`", "scalar"]),
        ("ref_first", f32s("first_logits", &[2, 31], &[0.0; 62]), &["first_logits"]),
        // A reference nll that does not match the data's rows.
        ("ref_nll_rows", f32s("nll", &[1, 4], &[0.0; 4]), &["`nll`", "1 rows", "inputs have 2"]),
        ("ref_nll_scalar", f32s("nll", &[], &[0.0]), &["`nll`", "scalar"]),
    ];
    for (name, reference, needles) in cases {
        let data = dir.join(format!("{name}.safetensors"));
        write_safetensors(&data, &[ids.clone(), mask.clone(), reference]);
        fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data)], needles);
    }

    // Ids out of the vocabulary, or disagreeing inputs.
    let mut bad = IDS;
    bad[9] = 32;
    let data = dir.join("oov.safetensors");
    write_safetensors(&data, &[i64s("input_ids", &[2, 5], &bad), mask.clone()]);
    fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data)], &["32"]);
    let data = dir.join("batch.safetensors");
    write_safetensors(&data, &[ids.clone(), i64s("attention_mask", &[3, 5], &[1; 15])]);
    fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data)], &["batch", "2", "3"]);
    let data = dir.join("f32_ids.safetensors");
    write_safetensors(&data, &[f32s("input_ids", &[2, 5], &[0.0; 10]), mask.clone()]);
    fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data)], &["input_ids", "f32", "i64[batch, seq]"]);
}

#[test]
fn eval_language_model_with_unusual_logits_does_not_panic() {
    // A spec whose `logits` output is not [batch, seq, vocab].
    let (dir, weights) = tiny_setup("eval-logits-rank");
    let source = std::fs::read_to_string(spec("tiny/tiny.kiln")).expect("spec");
    let edited = source
        .replacen("output logits: f32[batch, seq, vocab]", "output scores: f32[batch, seq, vocab]", 1)
        .replacen("output hidden: f32[batch, hidden]", "output logits: f32[batch, hidden]", 1);
    let path = dir.join("rank2_logits.kiln");
    std::fs::write(&path, edited).expect("write");
    let data = dir.join("data.safetensors");
    write_safetensors(&data, &[i64s("input_ids", &[2, 5], &IDS), i64s("attention_mask", &[2, 5], &[1; 10])]);
    let args = ["eval", &s(&path), "-w", &s(&weights), "--data", &s(&data), "--json"];
    let out = kiln(&args);
    assert_no_panic(&args, &out);
    assert!(!out.status.success(), "perplexity of non-[batch, seq, vocab] logits:\n{}", describe(&args, &out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("logits"), "{}", describe(&args, &out));
}

#[test]
fn eval_with_nothing_to_score() {
    let (dir, weights) = tiny_setup("eval-empty");
    let w = s(&weights);
    // (file name, shape, attention_mask, what the error says)
    let cases: [(&str, [usize; 2], &[i64], &str); 3] = [
        ("zero_rows", [0, 5], &[], "no rows"),
        ("one_token", [2, 1], &[1, 1], "no next-token targets"),
        ("all_masked", [2, 3], &[1, 0, 0, 1, 0, 0], "no next-token targets"),
    ];
    for (name, shape, mask, message) in cases {
        let n = shape[0] * shape[1];
        let data = dir.join(format!("{name}.safetensors"));
        let ids: Vec<i64> = (0..n as i64).collect();
        let needles = [&format!("{name}.safetensors"), message];
        write_safetensors(&data, &[i64s("input_ids", &shape, &ids), i64s("attention_mask", &shape, mask)]);
        fails(&["eval", &tiny_spec(), "-w", &w, "--data", &s(&data), "--json"], &needles);
    }
}

#[test]
fn run_text_with_gguf_weights_without_tokenizer() {
    let (dir, weights) = tiny_setup("gguf-text");
    let gguf = dir.join("tiny.gguf");
    std::fs::write(&gguf, gguf_bytes(&read_safetensors(&weights))).expect("write gguf");
    fails(&["run", &tiny_spec(), "-w", &s(&gguf), "--text", "hello"], &["tokenizer"]);
}

// ---------------------------------------------------------------------------------------
// Real models
// ---------------------------------------------------------------------------------------

#[test]
fn minilm_run_text_and_eval() {
    let Some(weights) = real_checkpoint(kiln_tests::MINILM_WEIGHTS) else {
        return;
    };
    let minilm = s(&spec("minilm/minilm.kiln"));
    let stdout = ok(&[
        "run",
        &minilm,
        "--weights",
        &s(&weights),
        "--text",
        "A first sentence.",
        "--text",
        "Another, somewhat longer second sentence here.",
    ]);
    assert!(stdout.contains("embeddings: f32[2, 384]"), "{stdout}");
    assert!(stdout.contains("\"A first sentence.\""), "{stdout}");
    assert!(stdout.contains("\"Another, somewhat longer second sentence here.\""), "{stdout}");

    let data = fixtures().join("minilm_dev.safetensors");
    let stdout = ok(&["eval", &minilm, "--weights", &s(&weights), "--data", &s(&data), "--json", "--batch", "50"]);
    let json: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    let min = json["cosine_min"].as_f64().expect("cosine_min");
    let mean = json["cosine_mean"].as_f64().expect("cosine_mean");
    assert!(min >= 0.99999, "{json}");
    assert!(mean >= min, "{json}");
    assert_eq!(json["rows"], 300, "{json}");
}

/// `--text` must tokenize exactly as the reference pipeline: the fixture's sentences of
/// different lengths, run through `--text` in one batch, give PyTorch's embeddings. (MiniLM's
/// tokenizer.json pads every text to 128 tokens; kiln must not feed those pads as text.)
#[test]
fn minilm_text_matches_pytorch_embeddings() {
    let Some(weights) = real_checkpoint(kiln_tests::MINILM_WEIGHTS) else {
        return;
    };
    let sentences: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("minilm_dev.json")).unwrap()).unwrap();
    let picked = [0usize, 1, 7];
    let dir = scratch("minilm-text");
    let out = dir.join("out.safetensors");
    let mut args = vec!["run".to_string(), s(&spec("minilm/minilm.kiln")), "--weights".into(), s(&weights)];
    args.extend(["--output".into(), s(&out)]);
    for &i in &picked {
        args.extend(["--text".to_string(), sentences[i].clone()]);
    }
    ok(&args);
    let got = as_f32(&read_safetensors(&out)[0]);
    let reference = read_safetensors(&fixtures().join("minilm_dev.safetensors"));
    let want = as_f32(reference.iter().find(|r| r.0 == "embeddings").unwrap());
    for (row, &i) in picked.iter().enumerate() {
        let (a, b) = (&got[row * 384..(row + 1) * 384], &want[i * 384..(i + 1) * 384]);
        let cos = kiln_tests::cosine(a, b);
        assert!(cos >= 0.99999, "sentence {i}: cosine {cos}");
    }
}

// ---------------------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------------------

fn generated_ids(stdout: &str) -> Vec<i64> {
    let json: serde_json::Value =
        serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"));
    json["ids"].as_array().expect("ids").iter().map(|v| v.as_i64().expect("id")).collect()
}

#[test]
fn generate_on_the_tiny_model() {
    let (_dir, weights) = tiny_setup("generate");
    let base = ["generate", &tiny_spec(), "-w", &s(&weights), "--prompt-ids", "3,1,4,1,5", "--json"];
    let greedy = generated_ids(&ok(&[&base[..], &["--max-tokens", "6"]].concat()));
    assert_eq!(greedy.len(), 6);
    assert!(greedy.iter().all(|&i| (0..32).contains(&i)), "{greedy:?}");
    // The JIT agrees with the interpreter, and top-k 1 sampling is greedy.
    let jit = generated_ids(&ok(&[&base[..], &["--max-tokens", "6", "--engine", "jit"]].concat()));
    assert_eq!(jit, greedy);
    let top1 = generated_ids(&ok(&[&base[..], &["--max-tokens", "6", "--temperature", "1", "--top-k", "1"]].concat()));
    assert_eq!(top1, greedy);
    // Sampling is reproducible for a seed and follows the seed.
    let sample = |seed: &str| {
        generated_ids(&ok(&[&base[..], &["--max-tokens", "12", "--temperature", "5", "--seed", seed]].concat()))
    };
    assert_eq!(sample("1"), sample("1"));
    assert!((2..6).any(|seed| sample(&seed.to_string()) != sample("1")), "every seed gives the same tokens");
}

#[test]
fn generate_errors() {
    let (_dir, weights) = tiny_setup("generate-errors");
    let (spec, w) = (tiny_spec(), s(&weights));
    let base = ["generate", spec.as_str(), "-w", w.as_str()];
    fails(&base, &["--prompt TEXT or --prompt-ids"]);
    fails(&[&base[..], &["--prompt-ids", "1,x"]].concat(), &["`x` is not a token id"]);
    fails(&[&base[..], &["--prompt-ids", "1,32"]].concat(), &["32 is outside the vocabulary (0..32)"]);
    fails(&[&base[..], &["--prompt-ids", ""]].concat(), &["no tokens"]);
    fails(&[&base[..], &["--prompt-ids", "1", "--prompt", "hi"]].concat(), &["not both"]);
    fails(&[&base[..], &["--prompt", "hi"]].concat(), &["tokenizer"]);
    fails(&[&base[..], &["--prompt-ids", "1", "--temperature=-1"]].concat(), &["--temperature"]);
    fails(&[&base[..], &["--prompt-ids", "1", "--top-p", "0"]].concat(), &["--top-p"]);
    fails(&[&base[..], &["--prompt-ids", "1", "--activations", "int8-block"]].concat(), &["int8-block", "int8-row"]);
}

/// `--engine interp --activations int8|int8-row` computes what the JIT computes with int8
/// activations (bit for bit here: the only activation is a relu), not the f32 outputs; the
/// activations the artifact's IR gives its linears are both engines' default, and
/// `--activations` overrides them either way.
#[test]
fn the_interpreter_runs_int8_activations_as_the_jit() {
    let dir = scratch("interp-w8a8");
    let Mlp { model, weights, input } = write_mlp(&dir, 3);
    let artifact = dir.join("mlp-q.kiln");
    let run = |extra: &[&str]| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&[&["run", &s(&artifact), "-i", &s(&input), "-o", &s(&out)][..], extra].concat());
        as_f32(&read_safetensors(&out)[0])
    };
    for (passes, activations) in
        [("quantize(format=int4g32)", "int8"), ("quantize(format=int8, activations=int8-row)", "int8-row")]
    {
        ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", passes, "-o", &s(&artifact)]);
        let exact = run(&["--engine", "interp", "--activations", "f32"]);
        let interp = run(&["--engine", "interp", "--activations", activations]);
        let jit = run(&["--engine", "jit", "--activations", activations]);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&interp), bits(&jit), "{passes}: the interpreter's int8 activations are the JIT's");
        assert_ne!(bits(&interp), bits(&exact), "{passes}: --activations {activations} changed nothing");
        // Without the flag, what the IR says: f32 activations, then int8-row ones. (With f32
        // activations the JIT sums in another order than the interpreter: close, not bitwise.)
        let (interp_default, jit_default) =
            if activations == "int8" { (exact.clone(), run(&["--activations", "f32"])) } else { (interp, jit) };
        assert_eq!(bits(&run(&["--engine", "interp"])), bits(&interp_default), "{passes}");
        assert_eq!(bits(&run(&[])), bits(&jit_default), "{passes}");
    }
    // The IR of the last artifact says int8-row (on the int8gK weights of both linears),
    // which bench names, and which `--activations` overrides.
    let ir = ok(&["ir", &s(&artifact)]);
    assert_eq!(ir.matches("{activations = int8-row}").count(), 2, "{ir}");
    let bench = |extra: &[&str]| -> String {
        let path = s(&artifact);
        let a = [&["bench", &path, "--shape", "batch=2", "--runs", "2", "--warmup", "0", "--json"][..], extra];
        let json: serde_json::Value = serde_json::from_str(ok(&a.concat()).trim()).unwrap();
        json["activations"].as_str().unwrap_or("?").to_string()
    };
    assert_eq!(bench(&[]), "int8-row");
    assert_eq!(bench(&["--activations", "int8"]), "int8");
    assert_eq!(bench(&["--activations", "f32"]), "f32");
    let table = ok(&["report", &s(&artifact)]);
    assert!(table.contains("quantized weights: int8-row (linears: 2 int8-row)"), "{table}");
}

/// `factorize(method=tt)` end to end: the artifact stores the cores, both engines run the
/// train (the JIT on the weight it rebuilds at build, with no op of the chain per run), and
/// the report gives each layer's bonds, its parameters as the artifact stores them, and the
/// SVD's error beside the train's.
#[test]
fn tensor_trains_compile_run_and_report() {
    let dir = scratch("tensor-train");
    let Mlp { model, weights, input } = write_mlp(&dir, 5);
    let artifact = dir.join("mlp-tt.kiln");
    let run = |extra: &[&str]| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&[&["run", &s(&artifact), "-i", &s(&input), "-o", &s(&out)][..], extra].concat());
        as_f32(&read_safetensors(&out)[0])
    };
    ok(&["compile", &s(&model), "-w", &s(&weights), "-o", &s(&artifact)]);
    let dense = run(&[]);
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", "factorize(method=tt, bond=3)", "-o", &s(&artifact)]);
    let (interp, jit) = (run(&["--engine", "interp"]), run(&["--engine", "jit"]));
    let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "the JIT's train is {worst} from the interpreter's");
    let moved = interp.iter().zip(&dense).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-2, "bond 3 changes the model ({moved})");

    // The stored cores: 96 = 4 x 4 x 6 by 64 = 4 x 4 x 4, bonds 3 and 3.
    let ir = ok(&["ir", &s(&artifact)]);
    let stored = |layer: &str| -> u64 {
        ir.lines()
            .filter(|l| l.contains(&format!("weight \"{layer}.weight.tt_core")))
            .map(|l| {
                let dims = l.rsplit_once("f32[").and_then(|(_, d)| d.split_once(']')).map(|(d, _)| d).unwrap_or("");
                dims.split(", ").map(|d| d.parse::<u64>().unwrap_or(0)).product::<u64>()
            })
            .sum()
    };
    assert_eq!(stored("up"), 4 * 4 * 3 + 3 * 4 * 4 * 3 + 3 * 6 * 4, "{ir}");
    assert_eq!(stored("down"), 4 * 4 * 3 + 3 * 4 * 4 * 3 + 3 * 4 * 6, "{ir}");
    let json: serde_json::Value = serde_json::from_str(ok(&["report", &s(&artifact), "--json"]).trim()).unwrap();
    for (layer, n, k) in [("up", 96u64, 64u64), ("down", 64, 96)] {
        let row = json["layers"].as_array().unwrap().iter().find(|l| l["scope"] == layer).cloned().unwrap_or_default();
        assert_eq!(row["format"], "f32 train 3x3", "{json}");
        assert_eq!(row["bonds"], serde_json::json!([3, 3]), "{json}");
        assert_eq!(row["params_before"].as_u64(), Some(n * k), "{json}");
        assert_eq!(row["params_after"].as_u64(), Some(stored(layer)), "{json}");
        let (tt, svd) = (row["rank_error"].as_f64().unwrap_or(0.0), row["svd_error"].as_f64().unwrap_or(0.0));
        assert!(tt > 0.0 && tt < 1.0 && svd > 0.0 && svd < 1.0, "{json}");
    }
    let table = ok(&["report", &s(&artifact)]);
    assert!(table.contains("bonds") && table.contains("SVD error") && table.contains(" 3x3 "), "{table}");
    assert!(table.contains("the engine rebuilds each weight once"), "the report says how trains run: {table}");
    // The chain runs once, at build: the profile has the two linears and no op of it.
    let path = s(&artifact);
    let bench = ["bench", path.as_str(), "--shape", "batch=2", "--runs", "3", "--warmup", "0", "--profile"];
    let profile = kiln(&bench);
    assert!(profile.status.success(), "{}", describe(&bench, &profile));
    let profile = String::from_utf8_lossy(&profile.stderr).into_owned();
    for op in ["matmul", "reshape", "transpose", " mul "] {
        assert!(!profile.contains(op), "{op} runs per call:\n{profile}");
    }
    assert_eq!(profile.lines().filter(|l| l.contains("  linear ")).count(), 2, "{profile}");
    // A quantize after leaves the cores f32, says so, and the report still lists the trains.
    let passes = "factorize(method=tt, bond=3), quantize(format=bf16)";
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", passes, "-o", &s(&artifact)]);
    let json: serde_json::Value = serde_json::from_str(ok(&["report", &s(&artifact), "--json"]).trim()).unwrap();
    let rows = json["layers"].as_array().unwrap();
    for layer in ["up", "down"] {
        let row = rows.iter().find(|l| l["scope"] == layer).cloned().unwrap_or_default();
        assert_eq!(
            (row["format"].as_str(), row["bonds"].clone()),
            (Some("f32 train 3x3"), serde_json::json!([3, 3])),
            "{json}"
        );
    }
    let table = ok(&["report", &s(&artifact)]);
    assert!(table.contains("2 layers are tensor trains, whose cores stay f32"), "{table}");
}

/// The fixture's prompt, as text through the GGUF's tokenizer, continues greedily into
/// PyTorch's tokens; the same holds from the prompt's ids.
#[test]
fn smollm2_generate_matches_pytorch_greedy() {
    let Some(weights) = real_checkpoint(kiln_tests::SMOLLM2_WEIGHTS) else {
        return;
    };
    let fixture = read_safetensors(&fixtures().join("smollm2_greedy.safetensors"));
    let i64s = |name: &str| -> Vec<i64> {
        let (_, _, _, bytes) = fixture.iter().find(|r| r.0 == name).expect("fixture tensor");
        bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect()
    };
    let (prompt, want) = (i64s("prompt_ids"), i64s("generated_ids"));
    let smollm2 = s(&spec("smollm2/smollm2.kiln"));
    let base = ["generate", smollm2.as_str(), "-w", &s(&weights), "--max-tokens", "32", "--json", "--engine", "jit"];
    let text = ok(&[&base[..], &["--prompt", "The key idea of post-training quantization is"]].concat());
    assert_eq!(generated_ids(&text), want);
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(json["text"].as_str().unwrap().starts_with(" to reduce the number of parameters"), "{json}");
    let ids = prompt.iter().map(i64::to_string).collect::<Vec<_>>().join(",");
    assert_eq!(generated_ids(&ok(&[&base[..], &["--prompt-ids", &ids]].concat())), want);
}

// ---------------------------------------------------------------------------------------
// Artifacts
// ---------------------------------------------------------------------------------------

/// The tiny model's inputs, as a file.
fn tiny_inputs(dir: &Path) -> PathBuf {
    let input = dir.join("in.safetensors");
    write_safetensors(
        &input,
        &[
            i64s("input_ids", &[2, 4], &[3, 1, 4, 1, 5, 9, 2, 6]),
            i64s("attention_mask", &[2, 4], &[1, 1, 1, 1, 1, 1, 1, 0]),
        ],
    );
    input
}

#[test]
fn artifacts_run_bitwise_like_their_spec() {
    let (dir, weights) = tiny_setup("artifact");
    let artifact = dir.join("tiny.kiln");
    let stdout = ok(&["compile", &tiny_spec(), "-w", &s(&weights), "-o", &s(&artifact)]);
    assert!(stdout.contains("wrote"), "{stdout}");
    let input = tiny_inputs(&dir);
    for engine in ["interp", "jit"] {
        let (from_spec, from_artifact) = (dir.join("spec.safetensors"), dir.join("artifact.safetensors"));
        let common = ["--input", &s(&input), "--engine", engine];
        ok(&[&["run", &tiny_spec(), "-w", &s(&weights)][..], &common, &["-o", &s(&from_spec)]].concat());
        ok(&[&["run", &s(&artifact)][..], &common, &["-o", &s(&from_artifact)]].concat());
        let (a, b) = (read_safetensors(&from_spec), read_safetensors(&from_artifact));
        assert_eq!(a.len(), 2);
        assert_eq!(a, b, "{engine}: the artifact's outputs differ from the spec's");
    }
    // Generation and the IR come back the same too.
    let generate = |model: &[&str]| {
        generated_ids(&ok(
            &[&["generate"][..], model, &["--prompt-ids", "3,1,4", "--max-tokens", "5", "--json"]].concat()
        ))
    };
    assert_eq!(generate(&[&s(&artifact)]), generate(&[&tiny_spec(), "-w", &s(&weights)]));
    assert_eq!(ok(&["ir", &s(&artifact)]), ok(&["ir", &tiny_spec(), "-w", &s(&weights)]));
    let bench = ok(&["bench", &s(&artifact), "--shape", "batch=1,seq=4", "--runs", "2", "--json"]);
    assert!(bench.contains("median_ms"), "{bench}");
}

#[test]
fn artifact_errors() {
    let (dir, weights) = tiny_setup("artifact-errors");
    let artifact = dir.join("tiny.kiln");
    ok(&["compile", &tiny_spec(), "-w", &s(&weights), "-o", &s(&artifact)]);
    let input = tiny_inputs(&dir);
    fails(&["run", &s(&artifact), "-w", &s(&weights), "--input", &s(&input)], &["carries its own weights"]);
    fails(&["run", &tiny_spec(), "--input", &s(&input)], &["needs its weights"]);
    // A checkpoint is safetensors too, but not an artifact.
    fails(&["run", &s(&weights), "--input", &s(&input)], &["is not a kiln artifact", "kiln.format_version"]);
    // A flipped byte in the last tensor's data is caught by its checksum.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x40;
    let damaged = dir.join("damaged.kiln");
    std::fs::write(&damaged, &bytes).unwrap();
    fails(&["run", &s(&damaged), "--input", &s(&input)], &["is damaged", "checksum"]);
    // A truncated artifact is not read past its end.
    let truncated = dir.join("truncated.kiln");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    fails(&["run", &s(&truncated), "--input", &s(&input)], &["truncated.kiln"]);
    // A tokenizer is needed for text, and the tiny model has none.
    fails(&["run", &s(&artifact), "--text", "hi"], &["holds no tokenizer"]);
}

/// The compiled SmolLM2 carries its tokenizer and end-of-sequence id: text in, PyTorch's
/// greedy tokens out, from the artifact alone.
#[test]
fn smollm2_artifact_generates_like_the_spec() {
    let Some(weights) = real_checkpoint(kiln_tests::SMOLLM2_WEIGHTS) else {
        return;
    };
    let dir = scratch("smollm2-artifact");
    let artifact = dir.join("smollm2.kiln");
    ok(&["compile", &s(&spec("smollm2/smollm2.kiln")), "-w", &s(&weights), "-o", &s(&artifact)]);
    let fixture = read_safetensors(&fixtures().join("smollm2_greedy.safetensors"));
    let (_, _, _, bytes) = fixture.iter().find(|r| r.0 == "generated_ids").expect("fixture tensor");
    let want: Vec<i64> = bytes.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    let args = [
        "generate",
        &s(&artifact),
        "--prompt",
        "The key idea of post-training quantization is",
        "--max-tokens",
        "32",
        "--json",
        "--engine",
        "jit",
    ];
    assert_eq!(generated_ids(&ok(&args)), want);
}

/// `compile --passes` with calibration, then `report` and `ir` of the artifact: formats,
/// budget and errors as the pass left them; bad pipelines and overrides are clear errors.
#[test]
fn compile_with_quantize_and_report() {
    let (dir, weights) = tiny_setup("quantize");
    let calib = dir.join("calib.safetensors");
    let ids: Vec<i64> = (0..48).map(|i| (i * 5 % 32) as i64).collect();
    write_safetensors(&calib, &[i64s("input_ids", &[4, 12], &ids), i64s("attention_mask", &[4, 12], &[1; 48])]);
    let out = dir.join("tiny-q.kiln");
    let args = |passes: &str| {
        vec![
            "compile".to_string(),
            tiny_spec(),
            "-w".into(),
            s(&weights),
            "--passes".into(),
            passes.into(),
            "--calib".into(),
            s(&calib),
            "-o".into(),
            s(&out),
        ]
    };
    // The tiny model's rows (16 wide) fit no int group: 16-bit formats here; the int
    // formats and GPTQ are tested on wider hand-written graphs (tests/quantize.rs).
    // Without a quantize pass, the report lists the layer table's layers as stored.
    ok(&args("dead_code"));
    let report = ok(&["report".to_string(), s(&out), "--json".into()]);
    let json: serde_json::Value = serde_json::from_str(report.trim()).unwrap_or_else(|e| panic!("{e}: {report}"));
    let layers = json["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 14, "{json}");
    assert!(layers.iter().all(|l| l["format"] == "f32" && l["bits_per_weight"] == 32.0), "{json}");
    assert!(layers.iter().any(|l| l["scope"] == "layers.1.attn.q"), "{json}");
    // Factorized layers keep their names and show their rank; overrides give one candidate
    // another rank and leave one dense.
    let overrides = ["--override", "layers.1.mlp.up=rank:2", "--override", "layers.0.attn.k=dense"].map(String::from);
    ok(&[args("factorize(rank=4)"), overrides.to_vec()].concat());
    // The profile counts the factors' linears apart and totals them: 12 factorized layers,
    // each a pair of linears run as one, and the one left dense (and the head) untagged.
    let bench = ["bench", &s(&out), "--shape", "batch=1,seq=8", "--runs", "2", "--warmup", "0", "--profile"];
    let profile = kiln(&bench);
    assert!(profile.status.success(), "{}", describe(&bench, &profile));
    let profile = String::from_utf8_lossy(&profile.stderr).into_owned();
    let factor_calls: usize = profile
        .lines()
        .filter(|l| l.ends_with("(low-rank factor)"))
        .map(|l| l.split_whitespace().nth(2).and_then(|c| c.parse::<usize>().ok()).expect("a calls column"))
        .sum();
    assert_eq!(factor_calls, 2 * 12, "two runs of 12 pairs:\n{profile}");
    assert!(
        profile.lines().filter(|l| l.ends_with("(low-rank factor)")).all(|l| l.contains("linear pair ")),
        "{profile}"
    );
    assert!(profile.lines().any(|l| l.contains("  linear ") && !l.ends_with("(low-rank factor)")), "{profile}");
    assert!(profile.contains("the linears of low-rank factors, together"), "{profile}");
    let report = ok(&["report".to_string(), s(&out), "--json".into()]);
    let json: serde_json::Value = serde_json::from_str(report.trim()).unwrap_or_else(|e| panic!("{e}: {report}"));
    let q = json["layers"].as_array().unwrap().iter().find(|l| l["scope"] == "layers.1.attn.q").cloned();
    assert_eq!(q.as_ref().map(|l| l["format"].clone()), Some("f32 rank 4".into()), "{json}");
    assert_eq!(q.as_ref().map(|l| l["rank"].clone()), Some(4.into()), "{json}");
    let embed = json["layers"].as_array().unwrap().iter().find(|l| l["scope"] == "embed").cloned();
    assert_eq!(embed.map(|l| l["rank"].clone()), Some(serde_json::Value::Null), "a table is no candidate: {json}");
    // With --calib, healing ran: each factored layer says whether its refit was kept.
    let healed = q.as_ref().map(|l| l["healed"].clone()).unwrap_or_default();
    assert!(healed["kept"].is_boolean() && healed["error_before"].as_f64().is_some_and(|e| e > 0.0), "{json}");
    let table = ok(&["report".to_string(), s(&out)]);
    assert!(table.contains("rank error") && table.contains("of the factorized layers' parameters kept"), "{table}");
    assert!(table.contains("healed error") && table.contains("healing: the probe moved from"), "{table}");
    // Parameters before and after, from the checkpoint's shapes and the ranks asked for:
    // the candidates are the 2-D weights but the embedding table (read by a gather).
    let rank_of = |scope: &str| match scope {
        "layers.1.mlp.up" => Some(2),
        "layers.0.attn.k" => None,
        _ => Some(4),
    };
    let candidates: Vec<(String, usize, usize)> = read_safetensors(&weights)
        .into_iter()
        .filter_map(|(name, _, shape, _)| {
            let scope = name.strip_suffix(".weight")?;
            (shape.len() == 2 && scope != "embed").then(|| (scope.to_string(), shape[0], shape[1]))
        })
        .collect();
    assert_eq!(candidates.len(), 13, "{candidates:?}");
    let rows = json["layers"].as_array().unwrap();
    let (mut total_before, mut total_after) = (0, 0);
    for (scope, m, n) in &candidates {
        let row = rows.iter().find(|l| l["scope"] == scope.as_str()).unwrap_or_else(|| panic!("{scope}: {json}"));
        let (before, rank) = (m * n, rank_of(scope));
        let after = rank.map_or(before, |r| r * (m + n));
        let rank = rank.map_or("dense".to_string(), |r| r.to_string());
        assert_eq!(row["rank"].to_string().trim_matches('"'), rank, "{row}");
        assert_eq!(row["params_before"].as_u64(), Some(before as u64), "{row}");
        assert_eq!(row["params_after"].as_u64(), Some(after as u64), "{row}");
        let line = table.lines().find(|l| l.starts_with(&format!("{scope} "))).unwrap_or_else(|| panic!("{table}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        let want = [rank, before.to_string(), after.to_string()];
        assert!(cells.windows(3).any(|w| w == want), "{want:?} in {line}");
        total_before += before;
        total_after += after;
    }
    assert_eq!(rows.iter().filter(|l| !l["params_before"].is_null()).count(), 13, "only candidates count: {json}");
    let ratio = total_after as f64 / total_before as f64;
    let factorized = &json["factorized"];
    assert_eq!(factorized["params_before"].as_u64(), Some(total_before as u64), "{json}");
    assert_eq!(factorized["params_after"].as_u64(), Some(total_after as u64), "{json}");
    assert!(factorized["ratio"].as_f64().is_some_and(|r| (r - ratio).abs() < 1e-12), "{ratio}: {json}");
    let total = format!("{total_before} before, {total_after} after (ratio {ratio:.4})");
    assert!(
        table.lines().any(|l| l.starts_with("parameters of the 13 factorize candidates") && l.contains(&total)),
        "{total}: {table}"
    );
    // The plot draws one rank mark per candidate, the dense one marked as such, each with
    // its rank over min(rows, columns).
    let rank_plot = |out: &Path, rank_of: &dyn Fn(&str) -> Option<usize>| {
        let plot = dir.join("ranks.svg");
        ok(&["report".to_string(), s(out), "--plot".into(), s(&plot)]);
        let svg = std::fs::read_to_string(&plot).unwrap();
        assert_eq!(svg.matches("class=\"rank").count(), 13, "{svg}");
        for (scope, m, n) in &candidates {
            let class = if rank_of(scope).is_some() { "rank" } else { "rank dense" };
            let mark = format!("<rect class=\"{class}\" data-layer=\"{scope}\" ");
            assert_eq!(svg.matches(&mark).count(), 1, "{mark} in {svg}");
            let what = rank_of(scope)
                .map_or(format!("dense (full rank {})", m.min(n)), |r| format!("rank {r} of {}", m.min(n)));
            assert!(svg.contains(&format!("{scope} [{m}, {n}]: {what}</title>")), "{scope}: {what} in {svg}");
        }
        svg
    };
    assert!(rank_plot(&out, &rank_of).contains("bits per weight"), "the bits panel stays");
    // Quantized after factorize (at rank 4 throughout: overrides reach every pass), a
    // factor's rows carry its layer's numbers.
    ok(&args("factorize(rank=4), quantize(format=bf16)"));
    let json: serde_json::Value =
        serde_json::from_str(ok(&["report".to_string(), s(&out), "--json".into()]).trim()).unwrap();
    let (_, m, n) = candidates.iter().find(|c| c.0 == "layers.1.mlp.up").unwrap();
    for factor in ["u", "v"] {
        let scope = format!("layers.1.mlp.up.lowrank_{factor}");
        let row = json["layers"].as_array().unwrap().iter().find(|l| l["scope"] == scope.as_str()).cloned();
        let params = row.map(|l| (l["params_before"].as_u64(), l["params_after"].as_u64()));
        assert_eq!(params, Some((Some((m * n) as u64), Some((4 * (m + n)) as u64))), "{scope}: {json}");
    }
    assert!(rank_plot(&out, &|_| Some(4)).contains("bf16"), "the bits panel shows the formats");

    ok(&args("quantize(format=bf16)"));
    let report = ok(&["report".to_string(), s(&out), "--json".into()]);
    let json: serde_json::Value = serde_json::from_str(report.trim()).unwrap_or_else(|e| panic!("{e}: {report}"));
    let layers = json["layers"].as_array().expect("layers");
    assert_eq!(layers.len(), 14, "{json}");
    for l in layers {
        assert_eq!(l["format"], "bf16", "{l}");
        assert_eq!(l["bits_per_weight"], 16.0, "{l}");
        for key in ["scope", "bytes", "sensitivity"] {
            assert!(!l[key].is_null(), "{key} in {l}");
        }
        // Measured where calibration saw the layer's input (not for a table only gathered).
        assert_eq!(l["error"].is_null(), l["scope"] == "embed", "{l}");
    }
    let ir = ok(&["ir".to_string(), s(&out)]);
    assert!(ir.contains(" bf16 #"), "{ir}");

    // A budget: met, and the plot is written.
    let mut budget = args("quantize(bits=20)");
    budget.extend(["--override".to_string(), "*.q=f16".into()]);
    ok(&budget);
    let plot = dir.join("layers.svg");
    let table = ok(&["report".to_string(), s(&out), "--plot".into(), s(&plot)]);
    assert!(table.lines().any(|l| l.contains("layers.1.attn.q") && l.contains("f16")), "{table}");
    let json: serde_json::Value =
        serde_json::from_str(ok(&["report".to_string(), s(&out), "--json".into()]).trim()).unwrap();
    assert!(json["bits_per_weight"].as_f64().unwrap() <= 20.0, "{json}");
    assert!(std::fs::read_to_string(&plot).unwrap().starts_with("<svg"));

    // The artifact runs like any other.
    let input = dir.join("in.safetensors");
    write_safetensors(
        &input,
        &[i64s("input_ids", &[1, 5], &[1, 2, 3, 4, 5]), i64s("attention_mask", &[1, 5], &[1; 5])],
    );
    ok(&["run".to_string(), s(&out), "--input".into(), s(&input)]);

    // Activations are the linears' attributes in the artifact's IR, and bench says which
    // ran. This model's rows (16, 24 and 40 values) fit no group of 32, so its weights stay
    // f32 or bf16, which take no int8 activations whatever the pass or the flag asks: the
    // report names the pass's choice, and that every linear stays f32 (the interpreter and
    // `--activations` tests above have int8 linears).
    let bench_activations = |extra: &[&str]| -> String {
        let mut a = vec!["bench".to_string(), s(&out), "--shape".into(), "batch=1,seq=4".into(), "--runs".into()];
        a.extend(["2".to_string(), "--warmup".into(), "0".into(), "--json".into()]);
        a.extend(extra.iter().map(|e| e.to_string()));
        let json: serde_json::Value = serde_json::from_str(ok(&a).trim()).unwrap();
        json["activations"].as_str().unwrap_or("?").to_string()
    };
    assert_eq!(bench_activations(&[]), "f32");
    ok(&args("quantize(format=bf16, activations=int8)"));
    assert_eq!(bench_activations(&[]), "f32");
    assert_eq!(bench_activations(&["--activations", "int8"]), "f32");
    let table = ok(&["report".to_string(), s(&out)]);
    assert!(table.contains("activations of linears on quantized weights: int8 (linears: 13 f32)"), "{table}");
    assert!(table.contains("linears keep f32 activations"), "the bf16 linears are named: {table}");
    ok(&["run".to_string(), s(&out), "--input".into(), s(&input), "--engine".into(), "interp".into()]);
    ok(&args("quantize(format=int8, activations=int8-row)"));
    assert_eq!(bench_activations(&[]), "f32");
    assert_eq!(bench_activations(&["--activations", "int8-row"]), "f32");
    // `activations=int8` measures per-row against per-block scales only where they differ
    // (per-channel int8 weights; tests/quantize.rs has the choice), `int8-block` never.
    ok(&args("quantize(format=int8, activations=int8)"));
    let table = ok(&["report".to_string(), s(&out)]);
    assert!(table.contains("no linear has per-channel int8 weights"), "{table}");
    assert_eq!(bench_activations(&[]), "f32");
    ok(&args("quantize(format=int8, activations=int8-block)"));
    assert_eq!(bench_activations(&[]), "f32");
    assert!(!ok(&["report".to_string(), s(&out)]).contains("per-channel int8 weights"));
    fails(&args("quantize(format=bf16, activations=int4)"), &["activations=int4", "f32|int8|int8-block|int8-row"]);

    fails(&args("quantize(format=bf16, lorc_rank=0)"), &["lorc_rank=0", "a rank from 1 to 1024"]);
    fails(&args("quantize(bits 4)"), &["invalid --passes", "expected `key=value`"]);
    fails(&args("frobnicate"), &["unknown pass `frobnicate`"]);
    fails(&args("quantize(format=int5g32)"), &["int5g32"]);
    let mut nomatch = args("quantize(format=int8)");
    nomatch.extend(["--override".to_string(), "nothing.*=int8".into()]);
    fails(&nomatch, &["`nothing.*` matches no layer"]);
}

/// The `compress` example of kiln-passes (the library calls, no CLI) writes the artifact
/// `kiln compile` writes, byte for byte: MiniLM under a bit budget with calibration (the
/// first 48 dev sentences; the budget probes on held-out rows, GPTQ on the rest).
#[test]
fn the_compress_example_writes_kiln_compiles_bytes() {
    let Some(weights) = real_checkpoint(kiln_tests::MINILM_WEIGHTS) else {
        return;
    };
    // The example, built as `cargo test` built `kiln` (same profile, same directory).
    let kiln = std::path::Path::new(env!("CARGO_BIN_EXE_kiln"));
    let dir = kiln.parent().expect("the binary's directory");
    let profile = match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile directory above {}", kiln.display()),
    };
    let built = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "kiln-passes", "--example", "compress", "--profile", profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo runs");
    assert!(built.status.success(), "building the example failed:\n{}", String::from_utf8_lossy(&built.stderr));
    let example = dir.join("examples/compress");

    let scratch = scratch("compress-example");
    let calib = scratch.join("calib.safetensors");
    let rows = 48;
    let dev: Vec<Raw> = read_safetensors(&fixtures().join("minilm_dev.safetensors"))
        .into_iter()
        .filter(|(n, ..)| n == "input_ids" || n == "attention_mask")
        .map(|(n, d, shape, bytes)| {
            let row = bytes.len() / shape[0];
            (n, d, vec![rows, shape[1]], bytes[..rows * row].to_vec())
        })
        .collect();
    assert_eq!(dev.len(), 2, "input_ids and attention_mask in the fixture");
    write_safetensors(&calib, &dev);
    let minilm = s(&spec("minilm/minilm.kiln"));
    let passes = "quantize(bits=4.5)";
    let by_kiln = scratch.join("kiln.kiln");
    ok(&["compile", &minilm, "-w", &s(&weights), "--passes", passes, "--calib", &s(&calib), "-o", &s(&by_kiln)]);
    let by_example = scratch.join("example.kiln");
    let out = std::process::Command::new(&example)
        .args([&minilm, &s(&weights), &s(&calib), passes, &s(&by_example)])
        .output()
        .expect("the example runs");
    assert!(out.status.success(), "the example failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let (a, b) = (std::fs::read(&by_kiln).unwrap(), std::fs::read(&by_example).unwrap());
    assert!(a == b, "the artifacts differ ({} and {} bytes)", a.len(), b.len());
    // And the pass did its work: a 4.5-bit model, not the f32 one.
    assert!(a.len() < 15_000_000, "{} bytes", a.len());
}

/// `prune` end to end: compile prints the pass's summary line, the artifact stores each
/// layer's kept values and mask, and both engines run it alike, differently from the dense
/// model.
#[test]
fn pruned_models_compile_and_run() {
    let dir = scratch("prune");
    let Mlp { model, weights, input } = write_mlp(&dir, 6);
    let artifact = dir.join("mlp-pruned.kiln");
    let run = |extra: &[&str]| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&[&["run", &s(&artifact), "-i", &s(&input), "-o", &s(&out)][..], extra].concat());
        as_f32(&read_safetensors(&out)[0])
    };
    ok(&["compile", &s(&model), "-w", &s(&weights), "-o", &s(&artifact)]);
    let dense = run(&[]);
    let args = ["compile", &s(&model), "-w", &s(&weights), "--passes", "prune(pattern=2:4)", "-o", &s(&artifact)];
    let out = kiln(&args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // up: 96 x 64 f32 = 24,576 bytes, down the same; 2:4 stores half the values and a
    // bit per weight: 12,288 + 768 each.
    assert!(
        stderr.contains(
            "prune(pattern=2:4): 2 of 2 layers pruned (magnitude), 50.0% of their weights removed; 49152 -> 26112 bytes"
        ),
        "{stderr}"
    );
    let (interp, jit) = (run(&["--engine", "interp"]), run(&["--engine", "jit"]));
    let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "the JIT's pruned model is {worst} from the interpreter's");
    let moved = interp.iter().zip(&dense).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-2, "2:4 changes the model ({moved})");
    let ir = ok(&["ir", &s(&artifact)]);
    for layer in ["up", "down"] {
        let line = format!("weight \"{layer}.weight.values\" f32");
        assert!(ir.lines().any(|l| l.contains(&line) && l.contains("sparse 2:4")), "{ir}");
    }
}

/// `prune(...), quantize(format=int8)` composes: the pruned layers' kept values are int8,
/// their masks kept, and the artifact is smaller than `quantize(format=int8)` alone. At
/// 50%, up (`[96, 64]`) keeps 32 values a row, int8g32: 96 x (2 + 32) + 768 mask bytes =
/// 4,032; down (`[64, 96]`) keeps 48, which no int8 group fits, so it is stored as 64:96,
/// int8g64: 64 x (2 + 64) + 768 = 4,992. Dense int8 is 96 x (2 + 64) + 64 x (2 + 96) =
/// 12,608 bytes for both. Both artifacts run on the JIT as the interpreter means them.
#[test]
fn pruned_then_quantized_models_are_smaller() {
    let dir = scratch("prune-quantize");
    let Mlp { model, weights, input } = write_mlp(&dir, 8);
    let run = |artifact: &std::path::Path, engine: &str| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&["run", &s(artifact), "-i", &s(&input), "-o", &s(&out), "--engine", engine]);
        as_f32(&read_safetensors(&out)[0])
    };
    let compile = |passes: &str, name: &str| -> (std::path::PathBuf, String) {
        let artifact = dir.join(name);
        let args = ["compile", &s(&model), "-w", &s(&weights), "--passes", passes, "-o", &s(&artifact)];
        let out = kiln(&args);
        assert!(out.status.success(), "{passes}: {}", String::from_utf8_lossy(&out.stderr));
        (artifact, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (sparse, stderr) = compile("prune(sparsity=0.5, method=magnitude), quantize(format=int8)", "sparse.kiln");
    assert!(stderr.contains("stored as 64:96"), "{stderr}");
    let (dense, _) = compile("quantize(format=int8)", "dense.kiln");
    let size = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
    let (sparse_bytes, dense_bytes) = (size(&sparse), size(&dense));
    eprintln!("artifact bytes: pruned + int8 {sparse_bytes}, int8 {dense_bytes}");
    // The weights differ by 12,608 - 9,024 = 3,584 bytes, less the prune report's
    // metadata in the first (about 1.3 KB).
    assert!(sparse_bytes + 1500 < dense_bytes, "pruned + int8 {sparse_bytes} bytes, int8 {dense_bytes}");

    let ir = ok(&["ir", &s(&sparse)]);
    for (layer, storage) in [("up", "int8g32 #"), ("down", "int8g64 #")] {
        let values = format!("weight \"{layer}.weight.values\" {storage}");
        let line = ir.lines().find(|l| l.contains(&values)).unwrap_or_else(|| panic!("{layer}: {ir}"));
        let pattern = if layer == "up" { "sparse 32:64" } else { "sparse 64:96" };
        assert!(line.contains(pattern), "{line}");
    }
    // The report's bytes per layer: values in int8 and the mask; bits over the dense
    // parameters (4,032 x 8 / 6,144 = 5.25; 4,992 x 8 / 6,144 = 6.5).
    let text = ok(&["report", &s(&sparse), "--json"]);
    let json: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    let rows = json["layers"].as_array().cloned().unwrap_or_default();
    // The format column says the pattern as stored: down's 48 of 96 per row in 64 slots.
    for (layer, format, bytes, bits) in [("up", "int8g32 32:64", 4032, 5.25), ("down", "int8g64 64:96", 4992, 6.5)] {
        let row = rows.iter().find(|l| l["scope"] == layer).unwrap_or_else(|| panic!("{layer}: {json}"));
        assert_eq!((row["format"].as_str(), row["bytes"].as_u64()), (Some(format), Some(bytes)), "{layer}: {json}");
        assert_eq!(row["bits_per_weight"].as_f64(), Some(bits), "{layer}: {json}");
    }
    let mut outputs = Vec::new();
    for artifact in [&sparse, &dense] {
        let (interp, jit) = (run(artifact, "interp"), run(artifact, "jit"));
        let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        assert!(worst < 1e-4, "{}: the JIT is {worst} from the interpreter", artifact.display());
        outputs.push(interp);
    }
    // Pruning moved the model; int8 alone barely.
    let moved = outputs[0].iter().zip(&outputs[1]).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-2, "pruning changes the model ({moved})");
}

/// `kiln report` after `prune`: per candidate layer its pattern (or "dense" and why), its
/// sparsity, its weight's bytes before and after, bits per weight; the pass's summary and
/// notes under the table; a sparsity panel in the plot. The numbers are the MLP's shapes':
/// `up` [96, 64] and `down` [64, 96], f32, 24,576 bytes each; 2:4 keeps half the values
/// and a bit per weight, 96 * 64 / 2 * 4 + 96 * 64 / 8 = 13,056 bytes, 0.5 * 32 + 1 = 17
/// bits per weight.
#[test]
fn pruned_layers_in_the_report() {
    let dir = scratch("prune-report");
    let Mlp { model, weights, .. } = write_mlp(&dir, 7);
    let artifact = dir.join("mlp-pruned.kiln");
    let (dense, sparse) = (96 * 64 * 4u64, 96 * 64 / 2 * 4 + 96 * 64 / 8);
    let report = || -> serde_json::Value {
        let text = ok(&["report", &s(&artifact), "--json"]);
        serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
    };
    let row = |json: &serde_json::Value, layer: &str| -> serde_json::Value {
        let rows = json["layers"].as_array().cloned().unwrap_or_default();
        let found: Vec<_> = rows.into_iter().filter(|l| l["scope"] == layer).collect();
        assert_eq!(found.len(), 1, "one row of {layer}: {json}");
        found[0].clone()
    };

    // Both layers 2:4.
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", "prune(pattern=2:4)", "-o", &s(&artifact)]);
    let json = report();
    for layer in ["up", "down"] {
        let l = row(&json, layer);
        let p = &l["prune"];
        assert_eq!(p["pattern"], "2:4", "{layer}: {json}");
        assert_eq!(p["sparsity"].as_f64(), Some(0.5), "{layer}: {json}");
        assert_eq!((p["bytes_before"].as_u64(), p["bytes_after"].as_u64()), (Some(dense), Some(sparse)), "{json}");
        assert_eq!(p["bits_per_weight"].as_f64(), Some(17.0), "{layer}: {json}");
        assert!(p["dense_because"].is_null(), "{layer}: {json}");
        // The row as stored: the values' format and the pattern, the layer's bytes.
        assert_eq!((l["format"].as_str(), l["bytes"].as_u64()), (Some("f32 2:4"), Some(sparse)), "{json}");
    }
    let pruned = &json["pruned"];
    assert_eq!((pruned["candidates"].as_u64(), pruned["pruned"].as_u64()), (Some(2), Some(2)), "{json}");
    assert_eq!((pruned["bytes_before"].as_u64(), pruned["bytes_after"].as_u64()), (Some(2 * dense), Some(2 * sparse)));
    assert_eq!(pruned["sparsity"].as_f64(), Some(0.5), "{json}");

    // `down` left dense by an override: its row says so and why, its bytes unchanged.
    let args = [
        "compile",
        &s(&model),
        "-w",
        &s(&weights),
        "--passes",
        "prune(pattern=2:4)",
        "--override",
        "down=dense",
        "-o",
        &s(&artifact),
    ];
    ok(&args);
    let json = report();
    let (up, down) = (row(&json, "up"), row(&json, "down"));
    assert_eq!(up["prune"]["pattern"], "2:4", "{json}");
    assert_eq!(up["prune"]["bytes_after"].as_u64(), Some(sparse), "{json}");
    assert_eq!(down["prune"]["pattern"], "dense", "{json}");
    assert_eq!(down["prune"]["sparsity"].as_f64(), Some(0.0), "{json}");
    assert_eq!(down["prune"]["dense_because"], "--override says dense", "{json}");
    assert_eq!(
        (down["prune"]["bytes_before"].as_u64(), down["prune"]["bytes_after"].as_u64()),
        (Some(dense), Some(dense))
    );
    assert_eq!((down["format"].as_str(), down["bytes"].as_u64()), (Some("f32"), Some(dense)), "{json}");
    let pruned = &json["pruned"];
    assert_eq!((pruned["candidates"].as_u64(), pruned["pruned"].as_u64()), (Some(2), Some(1)), "{json}");
    assert_eq!(
        (pruned["bytes_before"].as_u64(), pruned["bytes_after"].as_u64()),
        (Some(2 * dense), Some(dense + sparse))
    );
    // Half of one of two equal layers removed.
    assert_eq!(pruned["sparsity"].as_f64(), Some(0.25), "{json}");

    // The table: the prune columns, each row's cells, the summary line and the notes.
    let table = ok(&["report", &s(&artifact)]);
    let header = table.lines().find(|l| l.starts_with("scope")).unwrap_or_default();
    for column in
        ["pattern", "sparsity", "bytes before", "bytes after", "pruned bits", "prune error", "kernel", "dense because"]
    {
        assert!(header.contains(column), "{column}: {table}");
    }
    let cells = |layer: &str| -> Vec<String> {
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(layer)).unwrap_or_default();
        line.split_whitespace().map(String::from).collect()
    };
    let (up, down) = (cells("up"), cells("down"));
    let has = |cells: &[String], run: &[&str]| cells.windows(run.len()).any(|w| w.iter().zip(run).all(|(a, b)| a == b));
    assert!(has(&up, &["2:4", "50.0%", &dense.to_string(), &sparse.to_string(), "17.00"]), "up: {table}");
    assert!(has(&down, &["dense", "0.0%", &dense.to_string(), &dense.to_string(), "32.00"]), "down: {table}");
    assert!(table.lines().any(|l| l.starts_with("down") && l.ends_with("--override says dense")), "{table}");
    assert!(!table.lines().any(|l| l.starts_with("up ") && l.contains("override")), "{table}");
    assert!(
        table.contains(&format!(
            "prune (magnitude, pattern=2:4): 1 of 2 layers pruned, 25.0% of their weights removed; {} -> {} bytes, masks included",
            2 * dense,
            dense + sparse
        )),
        "{table}"
    );
    assert!(table.contains("note: 1 of 2 layers stay dense: down (--override says dense)"), "{table}");

    // The plot: one sparsity bar per candidate, `up` at half the panel's 240 pixels, `down`
    // marked dense.
    let plot = dir.join("layers.svg");
    ok(&["report", &s(&artifact), "--plot", &s(&plot)]);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("sparsity (the share of the weights removed), by prune candidate"), "{svg}");
    assert_eq!(svg.matches("class=\"sparsity").count(), 2, "{svg}");
    let bar = |class: &str, layer: &str| -> String {
        let start = format!("<rect class=\"{class}\" data-layer=\"{layer}\" ");
        let line = svg.lines().find(|l| l.starts_with(&start)).unwrap_or_else(|| panic!("{start} in {svg}"));
        line.to_string()
    };
    let up = bar("sparsity", "up");
    assert!(up.contains(" height=\"120.0\" "), "{up}");
    assert!(up.contains(&format!("up [96, 64]: 2:4, 50.0% removed, {dense} -&gt; {sparse} bytes</title>")), "{up}");
    assert!(bar("sparsity dense", "down").contains("down [64, 96]: dense: --override says dense</title>"), "{svg}");
    assert!(svg.contains("bits per weight"), "the bits panel stays");

    // Quantized before the prune: the quantize report's rows predate it, so the pruned
    // layers are listed as stored, bf16 values (2 bytes each) and the mask:
    // 96 * 64 / 2 * 2 + 96 * 64 / 8 = 6,912 bytes, from 96 * 64 * 2 = 12,288.
    let passes = "quantize(format=bf16), prune(pattern=2:4)";
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", passes, "-o", &s(&artifact)]);
    let json = report();
    for layer in ["up", "down"] {
        let l = row(&json, layer);
        assert_eq!((l["format"].as_str(), l["bytes"].as_u64()), (Some("bf16 2:4"), Some(6912)), "{json}");
        assert_eq!(
            (l["prune"]["bytes_before"].as_u64(), l["prune"]["bytes_after"].as_u64()),
            (Some(12288), Some(6912))
        );
    }
    // All that is stored is the two layers' values and masks and the biases, 96 + 64 f32.
    let stored_bits = (2 * 6912 + (96 + 64) * 4) as f64 * 8.0 / (2 * 96 * 64 + 96 + 64) as f64;
    assert!(json["bits_per_weight"].as_f64().is_some_and(|b| (b - stored_bits).abs() < 1e-9), "{stored_bits}: {json}");

    // A quantize after a prune that leaves the sparse layers to it (quantize refuses them
    // today, so its report is put in the artifact by hand): the layers it does not list
    // are listed as stored, with their prune columns.
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", "prune(pattern=2:4)", "-o", &s(&artifact)]);
    edit_pass_reports(&artifact, |passes| {
        passes.push(serde_json::json!({"call": "quantize(format=bf16)", "report": {
            "pass": "quantize", "layers": [], "params": 0, "bytes": 0, "bits_per_weight": 16.0,
            "notes": ["a note of the quantize"], "activations": "f32",
        }}))
    });
    let json = report();
    for layer in ["up", "down"] {
        let l = row(&json, layer);
        assert_eq!((l["format"].as_str(), l["bytes"].as_u64()), (Some("f32 2:4"), Some(sparse)), "{json}");
        assert_eq!(l["prune"]["pattern"], "2:4", "{json}");
    }
    let table = ok(&["report", &s(&artifact)]);
    assert!(table.contains("note: a note of the quantize"), "the edited artifact is the one reported: {table}");
    for layer in ["up", "down"] {
        let line = table.lines().find(|l| l.split_whitespace().next() == Some(layer)).unwrap_or_default();
        assert!(line.contains(&format!(" 2:4    50.0% {dense:>12} {sparse:>11} ")), "{layer}: {table}");
    }

    // A layer's error, when the prune report gives it, in its column ("-" when null); the
    // kernel is the engine's for the weight as stored (2:4 over rows of 64 and 96 columns:
    // the sparse kernel), whatever the report says.
    edit_pass_reports(&artifact, |passes| {
        for l in passes[0]["report"]["layers"].as_array_mut().into_iter().flatten() {
            if l["scope"] == "up" {
                l["error"] = serde_json::json!(0.0123);
                l["kernel"] = serde_json::json!("made up");
            } else if let Some(l) = l.as_object_mut() {
                l.insert("error".into(), serde_json::Value::Null);
            }
        }
    });
    let json = report();
    let (up, down) = (row(&json, "up"), row(&json, "down"));
    assert_eq!((up["prune"]["error"].as_f64(), up["prune"]["kernel"].as_str()), (Some(0.0123), Some("sparse")));
    assert!(down["prune"]["error"].is_null() && down["prune"]["kernel"] == "sparse", "{json}");
    let table = ok(&["report", &s(&artifact)]);
    let line = |layer: &str| table.lines().find(|l| l.split_whitespace().next() == Some(layer)).unwrap_or_default();
    assert!(line("up").ends_with(" 17.00     1.23e-2   sparse  -"), "{table}");
    assert!(line("down").ends_with(" 17.00           -   sparse  -"), "{table}");
    // Unstructured rows have no sparse kernel: their dense value runs.
    ok(&["compile", &s(&model), "-w", &s(&weights), "--passes", "prune(sparsity=0.5)", "-o", &s(&artifact)]);
    assert_eq!(row(&report(), "up")["prune"]["kernel"], "dense");

    // Without a prune there is no panel.
    ok(&["compile", &s(&model), "-w", &s(&weights), "-o", &s(&artifact)]);
    ok(&["report", &s(&artifact), "--plot", &s(&plot)]);
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(!svg.contains("class=\"sparsity"), "{svg}");
}

/// Edits the pass reports in an artifact's metadata (`kiln.passes`), its tensors
/// untouched: the safetensors header is rewritten, the data after it copied.
fn edit_pass_reports(artifact: &Path, edit: impl FnOnce(&mut Vec<serde_json::Value>)) {
    let bytes = std::fs::read(artifact).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let passes = header["__metadata__"]["kiln.passes"].as_str().expect("the artifact's pass reports");
    let mut passes: Vec<serde_json::Value> = serde_json::from_str(passes).unwrap();
    edit(&mut passes);
    header["__metadata__"]["kiln.passes"] = serde_json::Value::String(serde_json::to_string(&passes).unwrap());
    let mut text = serde_json::to_vec(&header).unwrap();
    // The data stays 8-byte aligned, as the header's length was.
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(artifact, out).unwrap();
}

/// `drop(blocks=[1])` on the tiny decoder: its second layer's nodes, layers and tensors are
/// gone, both engines run the model that is left alike, and it differs from the whole
/// model; the compile summary and `kiln report` name the block.
#[test]
fn dropped_blocks_compile_run_and_report() {
    let (dir, weights) = tiny_setup("drop");
    let input = dir.join("in.safetensors");
    let ids = [i64s("input_ids", &[2, 4], &[1, 2, 3, 4, 5, 6, 7, 8]), i64s("attention_mask", &[2, 4], &[1; 8])];
    write_safetensors(&input, &ids);
    let run = |artifact: &Path, engine: &str| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&["run", &s(artifact), "-i", &s(&input), "-o", &s(&out), "--engine", engine]);
        as_f32(&read_safetensors(&out)[0])
    };
    let (whole, dropped) = (dir.join("whole.kiln"), dir.join("dropped.kiln"));
    ok(&["compile", &tiny_spec(), "-w", &s(&weights), "-o", &s(&whole)]);
    let out = kiln(&["compile", &tiny_spec(), "-w", &s(&weights), "--passes", "drop(blocks=[1])", "-o", &s(&dropped)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("drop(blocks=[1]): dropped 1 of 2 blocks: layers.1;"), "{stderr}");
    let ir = ok(&["ir", &s(&dropped)]);
    assert!(!ir.contains("@layers.1") && ir.contains("@layers.0"), "{ir}");
    assert!(!ir.contains("\"layers.1."), "no tensor of layers.1 is left: {ir}");
    let (interp, jit) = (run(&dropped, "interp"), run(&dropped, "jit"));
    let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "the engines differ by {worst}");
    let moved = interp.iter().zip(&run(&whole, "interp")).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-3, "dropping a layer changes the model ({moved})");
    let table = ok(&["report", &s(&dropped)]);
    assert!(table.contains("drop: 1 of 2 blocks removed: layers.1;"), "{table}");
    let err = kiln(&["compile", &tiny_spec(), "-w", &s(&weights), "--passes", "drop(blocks=1)", "-o", &s(&dropped)]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("pass --calib"), "a chosen drop needs calibration");
}

/// `prune(heads=, channels=)` on the tiny decoder (grouped key/value heads, one gated and one
/// GELU MLP): the matrices shrink, both engines run the result alike, the model changes, and
/// `kiln report` lists what each consumer kept; with calibration the consumers are refit.
#[test]
fn heads_and_channels_shrink_compile_run_and_report() {
    let (dir, weights) = tiny_setup("structured");
    let input = dir.join("in.safetensors");
    let ids = [i64s("input_ids", &[2, 4], &[1, 2, 3, 4, 5, 6, 7, 8]), i64s("attention_mask", &[2, 4], &[1; 8])];
    write_safetensors(&input, &ids);
    let calib = dir.join("calib.safetensors");
    let rows: Vec<i64> = (0..192).map(|i| (i * 7 % 32) as i64).collect();
    write_safetensors(&calib, &[i64s("input_ids", &[16, 12], &rows), i64s("attention_mask", &[16, 12], &[1; 192])]);
    let run = |artifact: &Path, engine: &str| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&["run", &s(artifact), "-i", &s(&input), "-o", &s(&out), "--engine", engine]);
        as_f32(&read_safetensors(&out)[0])
    };
    let (whole, pruned) = (dir.join("whole.kiln"), dir.join("pruned.kiln"));
    ok(&["compile", &tiny_spec(), "-w", &s(&weights), "-o", &s(&whole)]);
    let passes = "prune(heads=0.5, channels=0.5)";
    let out = kiln(&["compile", &tiny_spec(), "-w", &s(&weights), "--passes", passes, "-o", &s(&pruned)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 4 query heads in 2 groups lose one each; 24 and 40 channels keep 16 and 24 (multiples of 8).
    assert!(stderr.contains("heads: 4 of 8 kept, channels: 40 of 64 kept"), "{stderr}");
    let ir = ok(&["ir", &s(&pruned)]);
    assert!(ir.contains("reshape") && ir.contains("[batch, seq, 2, 4]"), "two query heads per layer: {ir}");
    assert!(ir.contains("f32[16, 8] @layers.0.attn.o") && ir.contains("f32[16, 24] @layers.1.mlp.down"), "{ir}");
    let (interp, jit) = (run(&pruned, "interp"), run(&pruned, "jit"));
    let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-4, "the engines differ by {worst}");
    let moved = interp.iter().zip(&run(&whole, "interp")).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(moved > 1e-3, "removing heads and channels changes the model ({moved})");
    let table = ok(&["report", &s(&pruned)]);
    assert!(table.contains("prune: layers.0.attn.o 2 of 4 heads kept;"), "{table}");
    assert!(
        table.contains("prune: layers.1.mlp.down 24 of 40 channels kept;") && table.contains("not refit"),
        "{table}"
    );

    let out = kiln(&[
        "compile",
        &tiny_spec(),
        "-w",
        &s(&weights),
        "--passes",
        passes,
        "--calib",
        &s(&calib),
        "-o",
        &s(&pruned),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.contains("the refit (own) was kept for"), "{stderr}");
    let json: serde_json::Value = serde_json::from_str(ok(&["report", &s(&pruned), "--json"]).trim()).unwrap();
    let groups = json["structured"].as_array().expect("the groups");
    assert_eq!(groups.len(), 4, "{json}");
    assert!(groups.iter().all(|g| g["error"].as_f64().is_some_and(|e| e > 0.0) && g["healed"].is_object()), "{json}");
    let err = kiln(&[
        "compile",
        &tiny_spec(),
        "-w",
        &s(&weights),
        "--passes",
        "prune(heads=0.5, sparsity=0.5)",
        "-o",
        &s(&pruned),
    ]);
    assert!(String::from_utf8_lossy(&err.stderr).contains("run two calls"), "structured and masks are two calls");
}

/// `kiln analyze --similarity` on the tiny decoder (two blocks whose MLPs differ in width):
/// JSON tables that are symmetric with 1 on the diagonal, null for matrices of different
/// shapes and for a role one block lacks, output tables over the calibration tokens; the
/// text names the tables; the plot is an SVG of one heatmap per table. Without
/// --similarity, an error that says what to ask for.
#[test]
fn analyze_similarity_prints_tables_and_plots() {
    let (dir, weights) = tiny_setup("similarity");
    let calib = dir.join("calib.safetensors");
    let rows: Vec<i64> = (0..96).map(|i| (i * 5 % 32) as i64).collect();
    let mut mask = vec![1i64; 96];
    mask[95] = 0; // one padded position: not a token
    write_safetensors(&calib, &[i64s("input_ids", &[8, 12], &rows), i64s("attention_mask", &[8, 12], &mask)]);
    let svg = dir.join("similarity.svg");
    let spec = tiny_spec();
    let out = ok(&[
        "analyze",
        &spec,
        "-w",
        &s(&weights),
        "--calib",
        &s(&calib),
        "--similarity",
        "--json",
        "--plot",
        &s(&svg),
    ]);
    let json: serde_json::Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
    assert_eq!(json["blocks"], serde_json::json!(["layers.0", "layers.1"]));
    assert_eq!(json["tokens"], 95);
    let weights_tables = json["weights"].as_object().expect("weights");
    let roles: Vec<&str> = weights_tables.keys().map(|k| k.as_str()).collect();
    assert!(roles.contains(&"attn.q") && roles.contains(&"mlp.down"), "{roles:?}");
    // Same-shape attention matrices compare; the MLPs (24 and 40 wide) do not.
    let q = &weights_tables["attn.q"];
    assert_eq!(q[0][0], 1.0);
    assert_eq!(q[0][1], q[1][0]);
    assert!(q[0][1].as_f64().is_some_and(|c| c.abs() < 0.99), "{q}");
    assert!(weights_tables["mlp.up"][0][1].is_null(), "{}", weights_tables["mlp.up"]);
    for name in ["cosine", "cka"] {
        let t = &json["outputs"][name];
        assert!((t[1][1].as_f64().unwrap() - 1.0).abs() < 1e-6, "{name}: {t}");
        assert_eq!(t[0][1], t[1][0], "{name}");
    }
    let plot = std::fs::read_to_string(&svg).expect("the plot is written");
    assert!(plot.starts_with("<svg") && plot.contains("outputs: cka") && plot.contains("weights: attn.q"));

    let text = ok(&["analyze", &spec, "-w", &s(&weights), "--similarity"]);
    assert!(text.contains("weight cosine: attn.q") && text.contains("most alike: 0~1"), "{text}");
    assert!(text.contains("--calib compares the blocks' outputs too"), "{text}");
    fails(&["analyze", &spec, "-w", &s(&weights)], &["--similarity"]);
}

/// `tie` on the tiny decoder: its two blocks' attention matrices are tied (their MLPs
/// differ in width and stay, with a note), both engines run the result alike, and with a
/// quantize after it the shared weights are stored once.
#[test]
fn tied_blocks_compile_run_and_store_once() {
    let (dir, weights) = tiny_setup("tie");
    let input = dir.join("in.safetensors");
    write_safetensors(&input, &[i64s("input_ids", &[1, 4], &[1, 2, 3, 4]), i64s("attention_mask", &[1, 4], &[1; 4])]);
    let calib = dir.join("calib.safetensors");
    let rows: Vec<i64> = (0..96).map(|i| (i * 7 % 32) as i64).collect();
    write_safetensors(&calib, &[i64s("input_ids", &[8, 12], &rows), i64s("attention_mask", &[8, 12], &[1; 96])]);
    let (plain, tied) = (dir.join("plain.kiln"), dir.join("tied.kiln"));
    ok(&["compile", &tiny_spec(), "-w", &s(&weights), "--passes", "quantize(format=int8)", "-o", &s(&plain)]);
    let passes = "tie(groups=[[0,1]], delta_rank=2), quantize(format=int8)";
    let out = kiln(&[
        "compile",
        &tiny_spec(),
        "-w",
        &s(&weights),
        "--passes",
        passes,
        "--calib",
        &s(&calib),
        "-o",
        &s(&tied),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("4 roles tied (delta rank 2)") && stderr.contains("roles not tied"), "{stderr}");
    let ir = ok(&["ir", &s(&tied)]);
    assert!(ir.contains("layer \"layers.1.attn.q\" = shared_base"), "{ir}");
    assert!(ir.matches("layers.0.attn.q.weight.shared\"").count() == 1, "one shared node: {ir}");
    let run = |engine: &str| -> Vec<f32> {
        let out = dir.join("out.safetensors");
        ok(&["run", &s(&tied), "-i", &s(&input), "-o", &s(&out), "--engine", engine]);
        as_f32(&read_safetensors(&out)[0])
    };
    let (interp, jit) = (run("interp"), run("jit"));
    let worst = interp.iter().zip(&jit).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(worst < 1e-3, "the engines differ by {worst}");
    let table = ok(&["report", &s(&tied)]);
    assert!(
        table.contains("tie: layers.0.attn.q + layers.1.attn.q share [16, 16] with deltas of rank 2; 512 -> 384 parameters; errors 0."),
        "{table}"
    );
    let json: serde_json::Value = serde_json::from_str(ok(&["report", &s(&tied), "--json"]).trim()).expect("JSON");
    assert_eq!(json["tied"].as_array().map(|t| t.len()), Some(4), "{json}");
    // The weights' bytes (on a model this small the IR text and reports weigh more): the
    // four shared matrices are stored once, 3072 bytes, and each block's rank-2 deltas take
    // 896, so 1280 bytes fewer.
    let weights_bytes = |p: &Path| read_safetensors(p).iter().map(|t| t.3.len()).sum::<usize>();
    assert_eq!(weights_bytes(&plain) - weights_bytes(&tied), 1280);
}
