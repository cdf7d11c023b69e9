//! The JIT engine against the interpreter (the oracle), and its determinism rules: the
//! same bits for any thread count, and for a sequence alone or inside a batch.

use kiln_rt::Value;
use kiln_tests::*;
use std::collections::HashMap;

fn tiny() -> kiln_ir::Graph {
    let dir = temp_dir("jit-tiny");
    let weights = dir.join("tiny.safetensors");
    write_tiny_checkpoint(&weights, 3);
    compile_bound("tiny/tiny.kiln", &weights).0
}

fn feed(rows: &[&[i64]]) -> HashMap<String, Value> {
    let mask: Vec<Vec<i64>> = rows.iter().map(|r| vec![1; r.len()]).collect();
    let mask: Vec<&[i64]> = mask.iter().map(|r| r.as_slice()).collect();
    [("input_ids".to_string(), ids(rows)), ("attention_mask".to_string(), ids(&mask))].into()
}

fn f32s(outputs: &[(String, Value)], name: &str) -> Vec<f32> {
    let (_, v) = outputs.iter().find(|(n, _)| n == name).expect("output present");
    v.as_f32().expect("f32").data.clone()
}

const ROWS: [&[i64]; 3] = [&[3, 1, 4, 1, 5, 9, 2], &[6, 5, 3, 5, 8, 9, 7], &[9, 3, 2, 3, 8, 4, 6]];

#[test]
fn jit_matches_the_interpreter_on_the_tiny_model() {
    let g = tiny();
    let engine = Prepared::new(&g, Exec::Jit { threads: 2 });
    if let Prepared::Jit(e) = &engine {
        let linears = g.node_ids().filter(|&n| matches!(g.node(n).op, kiln_ir::Op::Linear { .. })).count();
        assert_eq!(linears, 13, "4 attention linears per layer, a gated and a plain MLP");
        assert_eq!(e.compiled_linears(), linears, "every linear runs compiled");
    }
    let inputs = feed(&ROWS);
    let (got, want) = (engine.run(&inputs), Prepared::new(&g, Exec::Interp).run(&inputs));
    for name in ["logits", "hidden"] {
        let (a, b) = (f32s(&got, name), f32s(&want, name));
        let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
        let diff = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff <= 1e-5 * scale.max(1.0), "{name}: max diff {diff} (scale {scale})");
    }
}

#[test]
fn jit_outputs_do_not_depend_on_the_thread_count() {
    let g = tiny();
    let inputs = feed(&ROWS);
    let one = Prepared::new(&g, Exec::Jit { threads: 1 }).run(&inputs);
    for threads in [2, 3] {
        assert_eq!(one, Prepared::new(&g, Exec::Jit { threads }).run(&inputs), "threads = {threads}");
    }
}

#[test]
fn jit_sequence_alone_equals_the_same_sequence_in_a_batch() {
    let g = tiny();
    let engine = Prepared::new(&g, Exec::Jit { threads: 2 });
    let batch = engine.run(&feed(&ROWS));
    let logits = f32s(&batch, "logits");
    let per_row = logits.len() / ROWS.len();
    for (i, row) in ROWS.iter().enumerate() {
        let alone = f32s(&engine.run(&feed(&[row])), "logits");
        assert!(alone == logits[i * per_row..(i + 1) * per_row], "row {i} differs inside the batch");
    }
}

/// A single row (decode) splits a linear's output columns across threads: same bits as one
/// thread, for float and block-quantized weights, with bias, activation and residual.
#[test]
fn single_rows_split_by_columns_give_the_same_bits() {
    let text = r#"graph g {
  %0 = input "x" : f32[m, 64]
  %1 = weight "w1" f32 : f32[256, 64]
  %2 = weight "b1" f32 : f32[256]
  %3 = linear %0, %1, %2 : f32[m, 256]
  %4 = gelu %3 : f32[m, 256]
  %5 = weight "w2" q8_0 : f32[200, 256]
  %6 = linear %4, %5 : f32[m, 200]
  %7 = weight "w3" f32 : f32[200, 200]
  %8 = linear %6, %7 : f32[m, 200]
  %9 = add %6, %8 : f32[m, 200]
  output "y" = %9
}
"#;
    let mut g = kiln_ir::parse(text).unwrap();
    let mut rng = Rng::new(11);
    let mut values = |n: usize| (0..n).map(|_| rng.next_f32()).collect::<Vec<f32>>();
    g.store.insert("w1", kiln_ir::TensorData::from_f32(vec![256, 64], &values(256 * 64)));
    g.store.insert("b1", kiln_ir::TensorData::from_f32(vec![256], &values(256)));
    g.store.insert("w3", kiln_ir::TensorData::from_f32(vec![200, 200], &values(200 * 200)));
    let q8: Vec<u8> = (0..200 * 256 / 32)
        .flat_map(|b| {
            let mut block = half::f16::from_f32(0.01 + b as f32 * 1e-5).to_le_bytes().to_vec();
            block.extend((0..32).map(|j| ((b * 7 + j * 13) % 255) as u8));
            block
        })
        .collect();
    let q8 = kiln_ir::TensorData::new(kiln_ir::Format::Q8_0, vec![200, 256], kiln_ir::Bytes::from_vec(q8)).unwrap();
    g.store.insert("w2", q8);
    kiln_ir::verify(&g).unwrap();

    let x = Value::F32(kiln_rt::Tensor::new(vec![1, 64], values(64)));
    let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
    let one = Prepared::new(&g, Exec::Jit { threads: 1 }).run(&inputs);
    for threads in [2, 3] {
        let split = Prepared::new(&g, Exec::Jit { threads });
        if let Prepared::Jit(e) = &split {
            assert!(e.kernel_count() > 3, "the column kernels were compiled");
        }
        assert_eq!(one, split.run(&inputs), "threads = {threads}");
    }
    let (got, want) = (f32s(&one, "y"), f32s(&Prepared::new(&g, Exec::Interp).run(&inputs), "y"));
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff <= 1e-5 * scale.max(1.0), "JIT vs interpreter: {diff} (scale {scale})");
}

/// Weights in kiln's int formats (what the quantize pass writes) run compiled, as the GGUF
/// blocks with the same values: f32 activations match the interpreter, int8 activations
/// stay close to it, and the bits do not depend on threads or on how rows are split. (With
/// int8 activations, 7 rows on one thread take the 256-bit GEMM, split 4 + 3 across two
/// threads the GEMM and the emitted kernel: the two paths give the same bits. With f32
/// activations, 9 rows take `gemm_f32`, its columns split across the threads.)
#[test]
fn int_format_weights_run_compiled_with_their_exact_values() {
    for (format, k) in [("int4g64", 128), ("int4g64a", 192), ("int3g128a", 256), ("int2g32", 64), ("int8g576", 576)] {
        let f: kiln_ir::IntFormat = format.parse().unwrap();
        let n = 136; // a single row splits its columns across 2 threads (>= 2 x 64)
        let text = format!(
            "graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n  %1 = weight \"w\" {format} : f32[{n}, {k}]\n  %2 = weight \"b\" f32 : f32[{n}]\n  %3 = linear %0, %1, %2 : f32[m, {n}]\n  %4 = silu %3 : f32[m, {n}]\n  output \"y\" = %4\n}}\n"
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        let mut rng = Rng::new(5);
        let mut values = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
        let w = kiln_ir::Bytes::from_vec(f.quantize(&values(n * k)));
        g.store.insert("w", kiln_ir::TensorData::new(kiln_ir::Format::Int(f), vec![n as u64, k as u64], w).unwrap());
        g.store.insert("b", kiln_ir::TensorData::from_f32(vec![n as u64], &values(n)));
        kiln_ir::verify(&g).unwrap();
        for m in [1, 5, 7, 9] {
            let x = Value::F32(kiln_rt::Tensor::new(vec![m, k], values(m * k)));
            let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
            let want = f32s(&Prepared::new(&g, Exec::Interp).run(&inputs), "y");
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs())).max(1.0);
            let one = Prepared::new(&g, Exec::Jit { threads: 1 });
            if let Prepared::Jit(e) = &one {
                assert_eq!(e.compiled_linears(), 1, "{format}: the linear runs compiled");
            }
            let one = one.run(&inputs);
            let diff = f32s(&one, "y").iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "{format}, m = {m}: JIT vs interpreter {diff}");
            assert_eq!(one, Prepared::new(&g, Exec::Jit { threads: 2 }).run(&inputs), "{format}, m = {m}");

            let int8 = Prepared::new(&g, Exec::JitInt8 { threads: 1 }).run(&inputs);
            let diff = f32s(&int8, "y").iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 0.0 && diff <= 0.05 * scale, "{format}, m = {m}: int8 activations {diff}");
            assert_eq!(int8, Prepared::new(&g, Exec::JitInt8 { threads: 2 }).run(&inputs), "{format}, m = {m}");
        }
    }
}

/// A table in a block format (an embedding tied to the head) is never decoded whole: row
/// lookups decode the rows they read, with the interpreter's exact values, and a bad id
/// is an error of the run.
#[test]
fn row_lookups_in_quantized_tables_decode_only_their_rows() {
    for format in ["int4g32a", "q8_0", "bf16"] {
        let (n, k) = (50, 64);
        let text = format!(
            "graph g {{\n  %0 = input \"ids\" : i64[b, s]\n  %1 = weight \"e\" {format} : f32[{n}, {k}]\n  %2 = gather %1, %0 : f32[b, s, {k}]\n  %3 = linear %2, %1 : f32[b, s, {n}]\n  output \"h\" = %2\n  output \"logits\" = %3\n}}\n"
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        let mut rng = Rng::new(4);
        let values: Vec<f32> = (0..n * k).map(|_| rng.next_f32()).collect();
        let f: kiln_ir::Format = format.parse().unwrap();
        let bytes: Vec<u8> = match f {
            kiln_ir::Format::Int(i) => i.quantize(&values),
            // Blocks of an f16 scale of 1/64 and 32 codes.
            kiln_ir::Format::Q8_0 => (0..n * k / 32)
                .flat_map(|b| [0x00, 0x24].into_iter().chain((0..32).map(move |i| ((b * 7 + i * 13) % 255) as u8)))
                .collect(),
            // The upper half of each f32 is a bf16.
            _ => values.iter().flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes()).collect(),
        };
        g.store.insert(
            "e",
            kiln_ir::TensorData::new(f, vec![n as u64, k as u64], kiln_ir::Bytes::from_vec(bytes)).unwrap(),
        );
        kiln_ir::verify(&g).unwrap();
        let inputs: HashMap<String, Value> = [("ids".to_string(), ids(&[&[3, 49, 0], &[7, 7, 12]]))].into();
        let want = Prepared::new(&g, Exec::Interp).run(&inputs);
        let jit = Prepared::new(&g, Exec::Jit { threads: 2 });
        if let Prepared::Jit(e) = &jit {
            assert_eq!(e.decoded_weights(), 0, "{format}: the table stays in its stored format");
        }
        let got = jit.run(&inputs);
        assert_eq!(f32s(&got, "h"), f32s(&want, "h"), "{format}: the rows decode exactly");
        let Prepared::Jit(e) = jit else { unreachable!("built as a JIT engine") };
        let bad: HashMap<String, Value> = [("ids".to_string(), ids(&[&[3, 50]]))].into();
        let error = e.run(&bad).expect_err("id 50 of 50 rows").to_string();
        assert!(error.contains("id 50 is outside the table's 50 rows"), "{error}");
    }
}

/// Per-row int8 activations: int8 weights with one scale per row take the per-row GEMM
/// (close to the interpreter, and not the per-block kernels' bits), other int formats the
/// per-block kernels (the same bits as `int8`); threads and row counts never change a bit.
#[test]
fn per_row_int8_activations_apply_to_per_channel_int8_weights() {
    for (format, k) in [("int8g192", 192), ("int4g64a", 128)] {
        let f: kiln_ir::IntFormat = format.parse().unwrap();
        let n = 136;
        let text = format!(
            "graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n  %1 = input \"r\" : f32[m, {n}]\n  %2 = weight \"w\" {format} : f32[{n}, {k}]\n  %3 = weight \"b\" f32 : f32[{n}]\n  %4 = linear %0, %2, %3 : f32[m, {n}]\n  %5 = gelu %4 : f32[m, {n}]\n  %6 = add %5, %1 : f32[m, {n}]\n  output \"y\" = %6\n}}\n"
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        let mut rng = Rng::new(8);
        let mut values = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
        let w = kiln_ir::Bytes::from_vec(f.quantize(&values(n * k)));
        g.store.insert("w", kiln_ir::TensorData::new(kiln_ir::Format::Int(f), vec![n as u64, k as u64], w).unwrap());
        g.store.insert("b", kiln_ir::TensorData::from_f32(vec![n as u64], &values(n)));
        kiln_ir::verify(&g).unwrap();
        for m in [1, 2, 7] {
            let x = Value::F32(kiln_rt::Tensor::new(vec![m, k], values(m * k)));
            let r = Value::F32(kiln_rt::Tensor::new(vec![m, n], values(m * n)));
            let inputs: HashMap<String, Value> = [("x".to_string(), x), ("r".to_string(), r)].into();
            let want = f32s(&Prepared::new(&g, Exec::Interp).run(&inputs), "y");
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs())).max(1.0);
            let rows = Prepared::new(&g, Exec::JitInt8Row { threads: 1 }).run(&inputs);
            let diff = f32s(&rows, "y").iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff > 0.0 && diff <= 0.05 * scale, "{format}, m = {m}: per-row int8 activations {diff}");
            assert_eq!(rows, Prepared::new(&g, Exec::JitInt8Row { threads: 2 }).run(&inputs), "{format}, m = {m}");
            let blocks = Prepared::new(&g, Exec::JitInt8 { threads: 1 }).run(&inputs);
            assert_eq!(rows == blocks, format == "int4g64a", "{format}, m = {m}: which kernel ran");
        }
    }
}

/// fp8 weights run compiled (their own kernel, groups repacked to blocks of 32; never an
/// f32 copy) with the interpreter's values.
#[test]
fn fp8_weights_run_compiled_with_their_exact_values() {
    for group in [32, 96] {
        let (n, k) = (72, 96);
        let text = format!(
            "graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n  %1 = weight \"w\" fp8g{group} : f32[{n}, {k}]\n  %2 = linear %0, %1 : f32[m, {n}]\n  output \"y\" = %2\n}}\n"
        );
        let mut g = kiln_ir::parse(&text).unwrap();
        let mut rng = Rng::new(9);
        let mut values = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
        let f = kiln_ir::Fp8Format::new(group).unwrap();
        let w = kiln_ir::Bytes::from_vec(f.quantize(&values(n * k)));
        g.store.insert("w", kiln_ir::TensorData::new(kiln_ir::Format::Fp8(f), vec![n as u64, k as u64], w).unwrap());
        kiln_ir::verify(&g).unwrap();
        for m in [1, 7] {
            let x = Value::F32(kiln_rt::Tensor::new(vec![m, k], values(m * k)));
            let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
            let want = f32s(&Prepared::new(&g, Exec::Interp).run(&inputs), "y");
            let jit = Prepared::new(&g, Exec::Jit { threads: 2 });
            if let Prepared::Jit(e) = &jit {
                assert_eq!(e.compiled_linears(), 1, "the fp8 linear runs compiled");
                assert_eq!(e.decoded_weights(), 0, "fp8g{group}: no f32 copy");
            }
            let got = jit.run(&inputs);
            let scale = want.iter().fold(0f32, |a, x| a.max(x.abs())).max(1.0);
            let diff = f32s(&got, "y").iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff <= 1e-5 * scale, "fp8g{group}, m = {m}: JIT vs interpreter {diff}");
            assert_eq!(got, Prepared::new(&g, Exec::Jit { threads: 1 }).run(&inputs), "fp8g{group}, m = {m}: threads");
        }
    }
}

/// The bits of every value of output `name`.
fn bits(outputs: &[(String, Value)], name: &str) -> Vec<u32> {
    f32s(outputs, name).iter().map(|v| v.to_bits()).collect()
}

/// The largest difference between two outputs, and the largest magnitude of `want`.
fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    (diff, want.iter().fold(0f32, |a, x| a.max(x.abs())))
}

/// A weight `[n, k]` stored in `format`: kiln's int formats rounded from `values`, GGUF
/// blocks with f16 scales near 0.01 and codes from a fixed pattern.
fn int_weight(format: &str, n: usize, k: usize, values: &[f32]) -> kiln_ir::TensorData {
    let f: kiln_ir::Format = format.parse().unwrap();
    let scale = |b: usize| half::f16::from_f32(0.008 + (b % 7) as f32 * 1e-3).to_le_bytes();
    let code = |b: usize, j: usize| ((b * 7 + j * 13) % 255) as u8;
    let blocks = 0..n * k / 32;
    let bytes: Vec<u8> = match f {
        kiln_ir::Format::Int(i) => i.quantize(values),
        kiln_ir::Format::Q8_0 => {
            blocks.flat_map(|b| scale(b).into_iter().chain((0..32).map(move |j| code(b, j)))).collect()
        }
        kiln_ir::Format::Q4_0 => {
            blocks.flat_map(|b| scale(b).into_iter().chain((0..16).map(move |j| code(b, j)))).collect()
        }
        kiln_ir::Format::Q4_1 => blocks
            .flat_map(|b| {
                let m = half::f16::from_f32(-0.06 + (b % 5) as f32 * 0.01).to_le_bytes();
                scale(b).into_iter().chain(m).chain((0..16).map(move |j| code(b, j)))
            })
            .collect(),
        _ => unreachable!("an integer format"),
    };
    kiln_ir::TensorData::new(f, vec![n as u64, k as u64], kiln_ir::Bytes::from_vec(bytes)).unwrap()
}

/// `g` with its linears' activations set by `mode` (each as its weight allows).
fn with_activations(g: &kiln_ir::Graph, mode: kiln_ir::Activations) -> kiln_ir::Graph {
    let mut g = g.clone();
    kiln_ir::set_activations(&mut g, mode);
    kiln_ir::verify(&g).unwrap();
    g
}

/// The interpreter with int8 activations computes a linear on integer weights as the
/// engine's W8A8 kernels do, bit for bit: every integer format, per block and per row,
/// with bias, relu and residual fused in the engine, for single rows (the emitted kernel,
/// columns split across threads) and blocks of rows (the 256-bit GEMMs). A fused silu or
/// gelu differs by the engine's polynomials only (the bound `kiln_ir::Activations` states).
#[test]
fn the_interpreter_computes_w8a8_linears_bit_for_bit() {
    let (k, n) = (384, 136);
    let formats = ["q8_0", "q4_0", "q4_1", "int4g64", "int4g64a", "int3g128a", "int2g32", "int8g64", "int8g384"];
    let mut worst_activation = 0f32;
    for format in formats {
        for act in ["none", "relu", "silu", "gelu"] {
            let (bias, op) =
                if act == "none" { ("", String::new()) } else { (", %3", format!("  %5 = {act} %4 : f32[m, {n}]\n")) };
            let y = if act == "none" { "%4" } else { "%5" };
            let text = format!(
                "graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n  %1 = input \"r\" : f32[m, {n}]\n  %2 = weight \"w\" {format} : f32[{n}, {k}]\n  %3 = weight \"b\" f32 : f32[{n}]\n  %4 = linear %0, %2{bias} : f32[m, {n}]\n{op}  %6 = add {y}, %1 : f32[m, {n}]\n  output \"y\" = %6\n}}\n"
            );
            let mut g = kiln_ir::parse(&text).unwrap();
            let mut rng = Rng::new(12);
            let mut values = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
            g.store.insert("w", int_weight(format, n, k, &values(n * k)));
            g.store.insert("b", kiln_ir::TensorData::from_f32(vec![n as u64], &values(n)));
            kiln_ir::verify(&g).unwrap();
            for m in [1, 3, 4, 9] {
                let mut x = values(m * k);
                // Blocks of very different magnitudes, so that scales per row and per block differ.
                x.iter_mut().enumerate().for_each(|(i, v)| *v *= [1.0, 0.05, 3.0][i / 32 % 3]);
                let x = Value::F32(kiln_rt::Tensor::new(vec![m, k], x));
                let r = Value::F32(kiln_rt::Tensor::new(vec![m, n], values(m * n)));
                let inputs: HashMap<String, Value> = [("x".to_string(), x), ("r".to_string(), r)].into();
                let exact = f32s(&Prepared::new(&g, Exec::Interp).run(&inputs), "y");
                for activations in [kiln_ir::Activations::Int8, kiln_ir::Activations::Int8Row] {
                    let what = format!("{format}, {act}, m = {m}, {activations}");
                    let g = with_activations(&g, activations);
                    let interp = kiln_interp::Interpreter::new(&g).unwrap();
                    let want = interp.run(&inputs).unwrap();
                    let (diff, scale) = max_diff(&f32s(&want, "y"), &exact);
                    assert!(diff > 1e-4 * scale && diff < 0.05 * scale, "{what}: W8A8 against f32 activations {diff}");
                    for threads in [1, 2] {
                        let engine = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(threads)).unwrap();
                        assert_eq!(engine.compiled_linears(), 1, "{what}");
                        let got = engine.run(&inputs).unwrap();
                        if act == "silu" || act == "gelu" {
                            let (diff, scale) = max_diff(&f32s(&got, "y"), &f32s(&want, "y"));
                            worst_activation = worst_activation.max(diff / scale);
                            assert!(diff <= 1e-6 * scale, "{what}, threads = {threads}: {diff} (scale {scale})");
                        } else {
                            assert!(bits(&got, "y") == bits(&want, "y"), "{what}, threads = {threads}: not bitwise");
                        }
                    }
                }
            }
        }
    }
    eprintln!("largest difference after a fused silu or gelu, relative to the output's scale: {worst_activation:e}");
}

/// The tiny model at widths that are multiples of 32 (hidden 64, MLPs of 96 and 128), every
/// linear on integer weights (int2 to int8, per block and per row, symmetric and not): its
/// graph, bound to random weights.
fn tiny_on_int_weights(seed: u64) -> kiln_ir::Graph {
    let source =
        read_spec("tiny/tiny.kiln").replace("let hidden = 16", "let hidden = 64").replace("[24, 40]", "[96, 128]");
    let mut g = kiln_frontend::compile(&source, None).expect("the widened spec compiles").graph;
    let linear_weights: Vec<kiln_ir::NodeId> = g
        .topo_order()
        .unwrap()
        .into_iter()
        .filter(|&n| matches!(g.node(n).op, kiln_ir::Op::Linear { .. }))
        .map(|n| g.operands(n)[1])
        .collect();
    let mut rng = Rng::new(seed);
    let mut at = 0;
    for id in g.topo_order().unwrap() {
        let node = g.node(id);
        let kiln_ir::Op::Weight(w) = &node.op else { continue };
        let shape: Vec<u64> = node.ty.shape.iter().map(|d| d.known().unwrap()).collect();
        let is_norm = w.tensor.contains("norm");
        let values: Vec<f32> = (0..shape.iter().product::<u64>())
            .map(|_| if is_norm { 1.0 + 0.1 * rng.next_f32() } else { 0.5 * rng.next_f32() })
            .collect();
        let (name, data) = if linear_weights.contains(&id) {
            let k = shape[1];
            let format =
                ["int4g32", &format!("int8g{k}"), "int4g32a", "int3g32a", "int2g32", "int8g32", &format!("int4g{k}a")]
                    [at % 7]
                    .parse::<kiln_ir::IntFormat>()
                    .unwrap();
            at += 1;
            let bytes = kiln_ir::Bytes::from_vec(format.quantize(&values));
            (w.tensor.clone(), kiln_ir::TensorData::new(kiln_ir::Format::Int(format), shape, bytes).unwrap())
        } else {
            (w.tensor.clone(), kiln_ir::TensorData::from_f32(shape, &values))
        };
        let (format, checksum) = (data.format, data.checksum());
        g.store.insert(name, data);
        if let kiln_ir::Op::Weight(w) = &mut g.node_mut(id).op {
            (w.format, w.checksum) = (format, Some(checksum));
        }
    }
    assert_eq!(at, 13, "every linear has an integer weight");
    kiln_ir::verify(&g).unwrap();
    g
}

/// Through a whole model the interpreter with int8 activations stays within the bound
/// `kiln_ir::Activations` states of the engine (the fused silu and gelu are the engine's
/// polynomials, and a difference they leave can move a later quantization by one step),
/// while int8 activations move the outputs far more than that from f32 ones. (Under
/// `int8-row` the attention's input feeds per-row and per-block linears: the engine
/// quantizes it both ways.)
#[test]
fn the_interpreter_reproduces_w8a8_models_within_the_stated_bound() {
    let g = tiny_on_int_weights(21);
    let inputs = feed(&ROWS);
    let exact = Prepared::new(&g, Exec::Interp).run(&inputs);
    for activations in [kiln_ir::Activations::Int8, kiln_ir::Activations::Int8Row] {
        let g = with_activations(&g, activations);
        let want = kiln_interp::Interpreter::new(&g).unwrap().run(&inputs).unwrap();
        let engine = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(2)).unwrap();
        assert_eq!(engine.compiled_linears(), 13, "{activations}");
        let got = engine.run(&inputs).unwrap();
        for name in ["logits", "hidden"] {
            let (diff, scale) = max_diff(&f32s(&got, name), &f32s(&want, name));
            let (moved, _) = max_diff(&f32s(&want, name), &f32s(&exact, name));
            eprintln!(
                "{activations} {name}: interpreter vs engine {diff:e} (scale {scale}), vs f32 activations {moved:e}"
            );
            assert!(diff <= 1e-5 * scale, "{activations}, {name}: interpreter vs engine {diff} (scale {scale})");
            assert!(
                moved > 1e-3 * scale && moved > 100.0 * diff,
                "{activations}, {name}: int8 activations moved the outputs by {moved} only"
            );
        }
    }
}

/// Under `int8-row` one value can feed a per-row linear (int8gK weights) and a per-block
/// one (other int formats): each gets its own quantization, the bits of each linear alone.
#[test]
fn a_value_read_by_per_row_and_per_block_linears_is_quantized_both_ways() {
    let (k, n) = (128, 72);
    let graph = |linears: &[&str]| {
        let mut text = format!("graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n");
        for (i, format) in linears.iter().enumerate() {
            let name = format.replace(|c: char| !c.is_ascii_alphanumeric(), "");
            text += &format!("  %{} = weight \"{name}\" {format} : f32[{n}, {k}]\n", 1 + 2 * i);
            text += &format!("  %{} = linear %0, %{} : f32[m, {n}]\n", 2 + 2 * i, 1 + 2 * i);
        }
        for (i, format) in linears.iter().enumerate() {
            text += &format!("  output \"{format}\" = %{}\n", 2 + 2 * i);
        }
        let mut g = kiln_ir::parse(&(text + "}\n")).unwrap();
        for format in linears {
            let f: kiln_ir::IntFormat = format.parse().unwrap();
            let mut rng = Rng::new(f.bits as u64); // the same weights in every graph
            let w = kiln_ir::Bytes::from_vec(f.quantize(&(0..n * k).map(|_| rng.next_f32()).collect::<Vec<f32>>()));
            let name = format.replace(|c: char| !c.is_ascii_alphanumeric(), "");
            g.store
                .insert(name, kiln_ir::TensorData::new(kiln_ir::Format::Int(f), vec![n as u64, k as u64], w).unwrap());
        }
        kiln_ir::verify(&g).unwrap();
        g
    };
    let mut rng = Rng::new(2);
    let x = Value::F32(kiln_rt::Tensor::new(vec![5, k], (0..5 * k).map(|_| rng.next_f32()).collect()));
    let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
    let both = graph(&["int8g128", "int4g32a"]);
    let got = Prepared::new(&both, Exec::JitInt8Row { threads: 2 }).run(&inputs);
    for format in ["int8g128", "int4g32a"] {
        let alone = Prepared::new(&graph(&[format]), Exec::JitInt8Row { threads: 2 }).run(&inputs);
        assert!(bits(&got, format) == bits(&alone, format), "{format}");
    }
}

/// A sparse weight (2:4 over int4 and int8 values, 4:8 over f32, 5:16 over f16) means its
/// dense matrix: the interpreter gives exactly the outputs of the same graph with that
/// matrix stored densely as f32, and the engine agrees with it, with the same bits for any
/// thread count. The half-sparse ones run the sparse kernel on one row and the dense value
/// on six ([`kiln_exec::engine::SPARSE_ROWS`]); 5:16 runs the dense value; f32 activations
/// under any mode.
#[test]
fn sparse_weights_run_as_their_dense_matrix() {
    let (n, k) = (40, 128);
    let mut rng = Rng::new(11);
    let mut values = |len: usize| (0..len).map(|_| rng.next_f32()).collect::<Vec<f32>>();
    let patterns = [
        ("int4g32", "2:4", (2u64, 4u64)),
        ("int8g32", "2:4", (2, 4)),
        ("f32", "4:8", (4, 8)),
        ("f16", "5:16", (5, 16)),
    ];
    for (format, pattern, (sn, sm)) in patterns {
        let text = |weight: &str| {
            format!(
                "graph g {{\n  %0 = input \"x\" : f32[m, {k}]\n  %1 = {weight} : f32[{n}, {k}]\n  %2 = weight \"b\" f32 : f32[{n}]\n  %3 = linear %0, %1, %2 : f32[m, {n}]\n  output \"y\" = %3\n}}\n"
            )
        };
        let f: kiln_ir::Format = format.parse().unwrap();
        // Keep the largest `sn` magnitudes of each group, as a magnitude pruner would.
        let dense = values(n * k);
        let mut keep = vec![false; n * k];
        for group in (0..n * k).collect::<Vec<_>>().chunks(sm as usize) {
            let mut order = group.to_vec();
            order.sort_by(|&a, &b| dense[b].abs().total_cmp(&dense[a].abs()));
            order[..sn as usize].iter().for_each(|&i| keep[i] = true);
        }
        let (kept, mask) = kiln_ir::sparse::pack(sn, sm, n as u64, k as u64, &dense, &keep).unwrap();
        let stored = match f {
            kiln_ir::Format::Int(i) => i.quantize(&kept),
            kiln_ir::Format::F32 => kept.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            _ => kept.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
        };
        let mut g = kiln_ir::parse(&text(&format!("weight \"w\" {format} sparse {pattern} \"w.mask\""))).unwrap();
        let slots = k as u64 / sm * sn;
        g.store
            .insert("w", kiln_ir::TensorData::new(f, vec![n as u64, slots], kiln_ir::Bytes::from_vec(stored)).unwrap());
        let mask =
            kiln_ir::TensorData::new(kiln_ir::Format::U8, vec![n as u64, k as u64 / 8], kiln_ir::Bytes::from_vec(mask));
        g.store.insert("w.mask", mask.unwrap());
        let bias = values(n);
        g.store.insert("b", kiln_ir::TensorData::from_f32(vec![n as u64], &bias));
        kiln_ir::verify(&g).unwrap();

        // The same matrix, dense, built here: the kept entries take the stored values in
        // column order, the others are zero.
        let stored = g.store.get("w").unwrap().to_f32().unwrap();
        let mut next = stored.iter();
        let matrix: Vec<f32> = (0..n * k).map(|i| if keep[i] { *next.next().unwrap() } else { 0.0 }).collect();
        let kiln_ir::Op::Weight(w) = &g.node(g.topo_order().unwrap()[1]).op else { panic!("%1 is the weight") };
        assert_eq!(w.value(&g.store, &[n as u64, k as u64]).unwrap(), matrix, "{pattern}");
        let mut d = kiln_ir::parse(&text("weight \"w\" f32")).unwrap();
        d.store.insert("w", kiln_ir::TensorData::from_f32(vec![n as u64, k as u64], &matrix));
        d.store.insert("b", kiln_ir::TensorData::from_f32(vec![n as u64], &bias));

        if let Prepared::Jit(e) = Prepared::new(&g, Exec::Jit { threads: 2 }) {
            assert_eq!(e.sparse_linears(), usize::from(sn * 2 == sm), "{format} {pattern}: the sparse kernel");
        }
        for m in [1, 6] {
            let x = Value::F32(kiln_rt::Tensor::new(vec![m, k], values(m * k)));
            let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
            let want = Prepared::new(&d, Exec::Interp).run(&inputs);
            assert_eq!(Prepared::new(&g, Exec::Interp).run(&inputs), want, "{pattern}, m = {m}");
            let jit = Prepared::new(&g, Exec::Jit { threads: 2 }).run(&inputs);
            let (diff, scale) = max_diff(&f32s(&jit, "y"), &f32s(&want, "y"));
            assert!(diff <= 1e-5 * scale.max(1.0), "{format} {pattern}, m = {m}: JIT vs interpreter {diff}");
            assert_eq!(Prepared::new(&g, Exec::Jit { threads: 1 }).run(&inputs), jit, "{format} {pattern}: threads");
            assert_eq!(Prepared::new(&g, Exec::JitInt8 { threads: 1 }).run(&inputs), jit, "{pattern}: f32 activations");
        }
    }
}

/// A rerun from a snapshot recomputes only what the changed weight reaches, and gives the
/// bits of a whole run of the changed model: healing's probes rely on both.
#[test]
fn a_rerun_from_a_snapshot_recomputes_what_a_changed_weight_reaches() {
    let g = tiny();
    let inputs = feed(&ROWS);
    let before = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(2)).expect("compiles");
    let (outputs, base) = before.run_keeping(&inputs).expect("runs");
    assert_eq!(outputs, before.run(&inputs).expect("runs"), "keeping the values changes nothing");
    // Scale the last linear weight of the blocks (not the head, which shares the embedding).
    let w = g
        .node_ids()
        .filter(|&n| matches!(g.node(n).op, kiln_ir::Op::Linear { .. }))
        .map(|n| g.operands(n)[1])
        .filter(|&w| matches!(g.node(w).op, kiln_ir::Op::Weight(_)) && g.node(w).scope.starts_with("layers."))
        .max()
        .expect("a block linear");
    let mut changed = g.clone();
    let shape = changed.node(w).ty.known_shape().expect("a weight's shape is known");
    let kiln_ir::Op::Weight(weight) = &changed.node(w).op else { unreachable!("filtered to weights") };
    let data = weight.value(&changed.store, &shape).expect("decodes");
    let scaled: Vec<f32> = data.iter().map(|x| x * 1.5).collect();
    changed.set_weight(w, kiln_ir::TensorData::from_f32(shape, &scaled)).expect("dense weight");
    let after = kiln_jit::compile(&changed, kiln_jit::EngineOptions::threads(2)).expect("compiles");
    let whole = after.run(&inputs).expect("runs");
    assert_ne!(whole, outputs, "the change reaches the outputs");
    let (rerun, snapshot) = after.rerun(&inputs, &base, &[w]).expect("reruns");
    assert_eq!(rerun, whole, "a rerun gives the bits of a whole run");
    // The weight is in the last block: less than half of the model runs again.
    assert!(
        snapshot.computed > 0 && snapshot.computed < base.computed / 2,
        "{} of {}",
        snapshot.computed,
        base.computed
    );
}

/// A low-rank pair (`x V^T`, then `U` with a bias, GELU and a residual; `V` long enough for
/// `sgemm`, `U` short enough for `sgemm_kn`) runs as one pass over blocks of rows when there
/// are many rows and each half split by columns when there are few: the same bits on any
/// thread count, and the interpreter's values.
#[test]
fn low_rank_pairs_run_as_one_pass_with_the_bits_of_two_linears() {
    let text = "graph pair {
  %0 = input \"x\" : f32[b, s, 600]
  %1 = weight \"v\" f32 : f32[12, 600] @l
  %2 = linear %0, %1 : f32[b, s, 12] @l
  %3 = weight \"u\" f32 : f32[600, 12] @l
  %4 = weight \"bias\" f32 : f32[600] @l
  %5 = linear %2, %3, %4 : f32[b, s, 600] @l
  %6 = gelu %5 : f32[b, s, 600] @l
  %7 = add %0, %6 : f32[b, s, 600] @l
  output \"y\" = %7
}
";
    let mut g = kiln_ir::parse(text).expect("parses");
    let mut rng = Rng::new(5);
    for (name, shape) in [("v", vec![12u64, 600]), ("u", vec![600, 12]), ("bias", vec![600])] {
        let values: Vec<f32> = (0..shape.iter().product::<u64>()).map(|_| rng.next_f32()).collect();
        g.store.insert(name, kiln_ir::TensorData::from_f32(shape, &values));
    }
    for rows in [1usize, 3, 64] {
        let x: Vec<f32> = (0..rows * 600).map(|_| rng.next_f32()).collect();
        let inputs: HashMap<String, Value> =
            [("x".to_string(), Value::F32(kiln_rt::Tensor::new(vec![1, rows, 600], x)))].into();
        let profiled = kiln_jit::compile(&g, kiln_jit::EngineOptions { threads: 2, profile: true }).expect("compiles");
        let two = profiled.run(&inputs).expect("runs");
        let kinds: Vec<String> = profiled.profile().into_iter().map(|(kind, ..)| kind).collect();
        assert!(kinds.iter().any(|k| k.starts_with("linear pair 600x12x600")), "{kinds:?}");
        assert_eq!(kinds.iter().filter(|k| k.starts_with("linear")).count(), 1, "{kinds:?}");
        for threads in [1, 3] {
            let engine = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(threads)).expect("compiles");
            assert_eq!(engine.run(&inputs).expect("runs"), two, "{rows} rows on {threads} threads");
        }
        let want = Prepared::new(&g, Exec::Interp).run(&inputs);
        let (got, want) = (f32s(&two, "y"), f32s(&want, "y"));
        let (diff, scale) = max_diff(&got, &want);
        assert!(diff <= 1e-5 * scale.max(1.0), "{rows} rows: max diff {diff} (scale {scale})");
    }
}

/// Two linears on weights rebuilt from tensor-train cores by chains of `reshape`, `matmul`
/// and `transpose`, each scaled per column by a `mul`: the first (`x` of `i1 i2` inputs,
/// `o1 o2` outputs) from two cores, with a bias and a GELU; the second (`o1 o2` inputs, 12
/// outputs) from three cores, with neither. With `outputs`, the first's weight and the
/// product of its cores are outputs too. The weights, cores and scales are bound to random
/// values.
fn tensor_train_graph((o1, o2): (usize, usize), (i1, i2): (usize, usize), outputs: bool) -> kiln_ir::Graph {
    let (n, k) = (o1 * o2, i1 * i2);
    let mut text = format!(
        "graph tt {{
  %0 = input \"x\" : f32[m, {k}]
  %1 = weight \"a1\" f32 : f32[{o1}, {i1}, 2]
  %2 = weight \"a2\" f32 : f32[2, {o2}, {i2}]
  %3 = reshape %1 {{shape = [{a1}, 2]}} : f32[{a1}, 2]
  %4 = reshape %2 {{shape = [2, {a2}]}} : f32[2, {a2}]
  %5 = matmul %3, %4 : f32[{a1}, {a2}]
  %6 = reshape %5 {{shape = [{o1}, {i1}, {o2}, {i2}]}} : f32[{o1}, {i1}, {o2}, {i2}]
  %7 = transpose %6 {{perm = [0, 2, 1, 3]}} : f32[{o1}, {o2}, {i1}, {i2}]
  %8 = reshape %7 {{shape = [{n}, {k}]}} : f32[{n}, {k}]
  %9 = weight \"s1\" f32 : f32[1, {k}]
  %10 = mul %8, %9 : f32[{n}, {k}]
  %11 = weight \"b1\" f32 : f32[{n}]
  %12 = linear %0, %10, %11 : f32[m, {n}]
  %13 = gelu %12 : f32[m, {n}]
  %14 = weight \"c1\" f32 : f32[2, 2]
  %15 = weight \"c2\" f32 : f32[2, {b2}, 3]
  %16 = weight \"c3\" f32 : f32[3, {b3}]
  %17 = reshape %15 {{shape = [2, {b23}]}} : f32[2, {b23}]
  %18 = matmul %14, %17 : f32[2, {b23}]
  %19 = reshape %18 {{shape = [{b12}, 3]}} : f32[{b12}, 3]
  %20 = matmul %19, %16 : f32[{b12}, {b3}]
  %21 = reshape %20 {{shape = [2, 1, 2, {o1}, 3, {o2}]}} : f32[2, 1, 2, {o1}, 3, {o2}]
  %22 = transpose %21 {{perm = [0, 2, 4, 1, 3, 5]}} : f32[2, 2, 3, 1, {o1}, {o2}]
  %23 = reshape %22 {{shape = [12, {n}]}} : f32[12, {n}]
  %24 = weight \"s2\" f32 : f32[{n}]
  %25 = mul %23, %24 : f32[12, {n}]
  %26 = linear %13, %25 : f32[m, 12]
  output \"y\" = %26
",
        a1 = o1 * i1,
        a2 = o2 * i2,
        b2 = 2 * o1,
        b3 = 3 * o2,
        b23 = 6 * o1,
        b12 = 4 * o1,
    );
    if outputs {
        text += "  output \"w\" = %10\n  output \"t\" = %5\n";
    }
    let mut g = kiln_ir::parse(&(text + "}\n")).expect("parses");
    let mut rng = Rng::new(17);
    for id in g.topo_order().unwrap() {
        let node = g.node(id);
        let kiln_ir::Op::Weight(w) = &node.op else { continue };
        let shape = node.ty.known_shape().unwrap();
        let values: Vec<f32> = (0..shape.iter().product::<u64>()).map(|_| rng.next_f32()).collect();
        g.store.insert(w.tensor.clone(), kiln_ir::TensorData::from_f32(shape, &values));
    }
    kiln_ir::verify(&g).expect("verifies");
    g
}

fn tt_inputs(rows: usize, k: usize, seed: u64) -> HashMap<String, Value> {
    let mut rng = Rng::new(seed);
    let x: Vec<f32> = (0..rows * k).map(|_| rng.next_f32()).collect();
    [("x".to_string(), Value::F32(kiln_rt::Tensor::new(vec![rows, k], x)))].into()
}

/// A linear whose weight is computed from weights alone (a tensor train's chain) runs as a
/// compiled f32 linear on that weight, evaluated once when the engine is built: the
/// interpreter's values (on the transposed-weight GEMM of short sides and the plain one),
/// with no op of the chain in the profile after several runs, and a fold that cannot be
/// evaluated (an unbound core) is an error.
#[test]
fn weights_computed_from_weights_are_folded_at_build() {
    for (o, i) in [((3, 5), (3, 4)), ((7, 15), (12, 12))] {
        let (n, k) = (o.0 * o.1, i.0 * i.1);
        let g = tensor_train_graph(o, i, false);
        for threads in [1, 2] {
            let engine = kiln_jit::compile(&g, kiln_jit::EngineOptions { threads, profile: true }).expect("compiles");
            assert_eq!(engine.compiled_linears(), 2, "{n}x{k}: both linears run compiled");
            assert_eq!(engine.decoded_weights(), 1, "{n}x{k}: only the bias is held decoded, not the cores");
            for rows in [1, 5, 3] {
                let inputs = tt_inputs(rows, k, rows as u64);
                let got = engine.run(&inputs).expect("runs");
                let want = Prepared::new(&g, Exec::Interp).run(&inputs);
                let (diff, scale) = max_diff(&f32s(&got, "y"), &f32s(&want, "y"));
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{n}x{k}, {rows} rows, {threads} threads: {diff} (scale {scale})"
                );
            }
            let profile = engine.profile();
            let kinds: Vec<&str> = profile.iter().map(|(kind, ..)| kind.as_str()).collect();
            for op in ["matmul", "reshape", "transpose", "mul", "const"] {
                assert!(!kinds.contains(&op), "{n}x{k}: `{op}` ran per call: {kinds:?}");
            }
            let mut linears: Vec<(&str, usize)> = profile
                .iter()
                .filter(|(kind, ..)| kind.starts_with("linear"))
                .map(|(kind, _, calls)| (kind.as_str(), *calls))
                .collect();
            linears.sort();
            let (a, b) = (format!("linear {k}x{n} f32"), format!("linear {n}x12 f32"));
            let mut want = vec![(a.as_str(), 3), (b.as_str(), 3)];
            want.sort();
            assert_eq!(linears, want, "{n}x{k}: two f32 linears, once per run");
        }
        let mut unbound = g.clone();
        unbound.store.remove("c2");
        match kiln_jit::compile(&unbound, kiln_jit::EngineOptions::threads(1)) {
            Ok(_) => panic!("{n}x{k}: an engine without the core `c2`"),
            Err(e) => assert!(e.to_string().contains("c2"), "{n}x{k}: {e}"),
        }
    }
}

/// A weight-only value that an output reads too still computes per run, with the
/// interpreter's bits, beside the linear that reads it folded.
#[test]
fn a_folded_weight_that_is_also_an_output_still_comes_out() {
    let g = tensor_train_graph((3, 5), (3, 4), true);
    let engine = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(2)).expect("compiles");
    assert_eq!(engine.compiled_linears(), 2);
    let inputs = tt_inputs(4, 12, 9);
    let got = engine.run(&inputs).expect("runs");
    let want = Prepared::new(&g, Exec::Interp).run(&inputs);
    for name in ["w", "t"] {
        assert!(bits(&got, name) == bits(&want, name), "{name}: not the interpreter's bits");
    }
    assert_eq!(f32s(&got, "w").len(), 15 * 12);
    let (diff, scale) = max_diff(&f32s(&got, "y"), &f32s(&want, "y"));
    assert!(diff <= 1e-5 * scale.max(1.0), "y: {diff} (scale {scale})");
    // And the same as the engine of the graph without those outputs.
    let plain = tensor_train_graph((3, 5), (3, 4), false);
    let alone = kiln_jit::compile(&plain, kiln_jit::EngineOptions::threads(2)).expect("compiles");
    assert!(bits(&got, "y") == bits(&alone.run(&inputs).expect("runs"), "y"));
}

/// A rerun after a change to a core of a folded weight recomputes the linears it reaches
/// (the chain is folded again when the changed graph's engine is built) and gives the bits
/// of a whole run.
#[test]
fn a_rerun_after_changing_a_core_matches_a_whole_run() {
    let g = tensor_train_graph((3, 5), (3, 4), false);
    let inputs = tt_inputs(6, 12, 4);
    let before = kiln_jit::compile(&g, kiln_jit::EngineOptions::threads(2)).expect("compiles");
    let (outputs, base) = before.run_keeping(&inputs).expect("runs");
    assert_eq!(outputs, before.run(&inputs).expect("runs"), "keeping the values changes nothing");
    for (core, recomputed) in [("a2", 2), ("c3", 1)] {
        let w = g
            .node_ids()
            .find(|&n| matches!(&g.node(n).op, kiln_ir::Op::Weight(w) if w.tensor == core))
            .expect("the core");
        let mut changed = g.clone();
        let shape = changed.node(w).ty.known_shape().unwrap();
        let scaled: Vec<f32> = changed.store.get(core).unwrap().to_f32().unwrap().iter().map(|x| x * 1.5).collect();
        changed.set_weight(w, kiln_ir::TensorData::from_f32(shape, &scaled)).expect("dense weight");
        let after = kiln_jit::compile(&changed, kiln_jit::EngineOptions::threads(2)).expect("compiles");
        let whole = after.run(&inputs).expect("runs");
        assert_ne!(whole, outputs, "{core}: the change reaches the output");
        let (rerun, snapshot) = after.rerun(&inputs, &base, &[w]).expect("reruns");
        assert!(bits(&rerun, "y") == bits(&whole, "y"), "{core}: a rerun gives the bits of a whole run");
        assert_eq!(snapshot.computed, recomputed, "{core}: only the linears after it run again");
    }
}
