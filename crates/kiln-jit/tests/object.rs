//! Ahead-of-time kernels: the JIT's emitters write the same kernels into an object file
//! ([`ObjectCodeModule`]); linked by the system C compiler into a program, each computes
//! the JIT kernel's bits. Needs `cc` (the AOT path of `kiln compile --emit` does too).

mod common;

use common::{Rng, bits, random_weight};
use kiln_exec::linear_i8::quantize_rows;
use kiln_ir::Format;
use kiln_jit::{
    Activation, HostIsa, LinearI8Kernel, LinearI8Spec, LinearI8Tiles, LinearKernel, LinearSpec, LinearTiles,
    ObjectCodeModule, QuantizedActivations, Residual, emit_linear, emit_linear_i8,
};
use std::process::Command;

/// The C program: runs kernel `argv[1]` (every kernel has the seven pointer-sized
/// arguments of `LinearFn` / `LinearI8Fn`) over `argv[2]` rows of `x`, writing `argv[3]`
/// outputs per row to the file `argv[8]`; `-` for no bias or residual.
fn harness(symbols: &[String]) -> String {
    let externs: String = symbols
        .iter()
        .map(|s| {
            format!("extern void {s}(const void*, const void*, const void*, const void*, void*, size_t, size_t);\n")
        })
        .collect();
    format!(
        r#"#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>
{externs}
typedef void (*kernel)(const void*, const void*, const void*, const void*, void*, size_t, size_t);
static kernel kernels[] = {{ {table} }};

static void* slurp(const char* path) {{
    if (strcmp(path, "-") == 0) return NULL;
    FILE* f = fopen(path, "rb");
    if (!f) {{ perror(path); exit(2); }}
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    void* p = malloc(len > 0 ? len : 1);
    if (fread(p, 1, len, f) != (size_t)len) {{ perror(path); exit(2); }}
    fclose(f);
    return p;
}}

int main(int argc, char** argv) {{
    if (argc != 9) return 2;
    int k = atoi(argv[1]);
    size_t m = strtoul(argv[2], 0, 10), n = strtoul(argv[3], 0, 10);
    float* y = malloc(m * n * sizeof(float));
    kernels[k](slurp(argv[4]), slurp(argv[5]), slurp(argv[6]), slurp(argv[7]), y, 0, m);
    FILE* out = fopen(argv[8], "wb");
    fwrite(y, sizeof(float), m * n, out);
    fclose(out);
    return 0;
}}
"#,
        table = symbols.join(", ")
    )
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// One kernel call: the JIT's output, and the files the harness reads.
struct Call {
    m: usize,
    n: usize,
    want: Vec<f32>,
    x: Vec<u8>,
    w: Vec<u8>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<f32>>,
}

#[test]
fn object_kernels_linked_by_cc_compute_the_jit_bits() {
    let isa = HostIsa::native().unwrap();
    let mut module = ObjectCodeModule::object(&isa, "kiln_object_test").unwrap();
    let mut calls = Vec::new();
    let mut symbols = Vec::new();
    let mut rng = Rng::new(77);
    let m = 5;
    let f32_specs = [
        LinearSpec { k: 64, n: 24, format: Format::F32, bias: true, activation: Activation::Gelu, residual: true },
        LinearSpec { k: 96, n: 33, format: Format::Q8_0, bias: true, activation: Activation::Silu, residual: false },
        LinearSpec { k: 64, n: 17, format: Format::Q4_1, bias: false, activation: Activation::None, residual: false },
        LinearSpec { k: 40, n: 9, format: Format::BF16, bias: false, activation: Activation::None, residual: true },
    ];
    for spec in f32_specs {
        let name = format!("kiln_test_linear{}", symbols.len());
        emit_linear(&mut module, &name, &spec, &LinearTiles::for_format(spec.format)).unwrap();
        symbols.push(name);
        let x = rng.vec(m * spec.k, 1.0);
        let w = random_weight(&mut rng, spec.format, spec.n, spec.k);
        let bias = spec.bias.then(|| rng.vec(spec.n, 0.5));
        let residual = spec.residual.then(|| rng.vec(m * spec.n, 1.0));
        let mut want = vec![f32::NAN; m * spec.n];
        let r = residual.as_deref().map_or(Residual::None, Residual::Input);
        LinearKernel::compile(&isa, spec).unwrap().run(&x, &w, bias.as_deref(), r, &mut want, 0..m).unwrap();
        calls.push(Call { m, n: spec.n, want, x: f32_bytes(&x), w, bias, residual });
    }
    // A W8A8 kernel: `x` is the quantized blocks.
    let spec = LinearI8Spec { bias: true, activation: Activation::Gelu, ..LinearI8Spec::new(96, 20, Format::Q8_0) };
    let name = format!("kiln_test_linear{}", symbols.len());
    emit_linear_i8(&mut module, &name, &spec, &LinearI8Tiles::default()).unwrap();
    symbols.push(name);
    let x = rng.vec(m * spec.k, 1.0);
    let mut xq = QuantizedActivations::new();
    quantize_rows(&x, spec.k, &mut xq);
    let w = random_weight(&mut rng, spec.format, spec.n, spec.k);
    let bias = Some(rng.vec(spec.n, 0.5));
    let mut want = vec![f32::NAN; m * spec.n];
    LinearI8Kernel::compile(&isa, spec)
        .unwrap()
        .run(&xq, &w, bias.as_deref(), Residual::None, &mut want, 0..m)
        .unwrap();
    // SAFETY: the blocks are plain old data (`QBlock` is `repr(C)`).
    let xbytes = unsafe { std::slice::from_raw_parts(xq.as_ptr(), std::mem::size_of_val(xq.blocks())) }.to_vec();
    calls.push(Call { m, n: spec.n, want, x: xbytes, w, bias, residual: None });

    let object = module.emit().unwrap();
    assert_eq!(object.functions.iter().map(|f| f.name.clone()).collect::<Vec<_>>(), symbols);
    let dir = std::env::temp_dir().join(format!("kiln-object-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    std::fs::write(path("kernels.o"), &object.bytes).unwrap();
    std::fs::write(path("harness.c"), harness(&symbols)).unwrap();
    let cc = Command::new("cc")
        .args([&path("harness.c"), &path("kernels.o"), "-o", &path("harness")])
        .output()
        .expect("the system C compiler `cc` runs");
    assert!(cc.status.success(), "cc failed: {}", String::from_utf8_lossy(&cc.stderr));

    for (i, call) in calls.iter().enumerate() {
        let file = |name: String, data: Option<Vec<u8>>| match data {
            Some(d) => {
                std::fs::write(path(&name), d).unwrap();
                path(&name)
            }
            None => "-".to_string(),
        };
        let args = [
            i.to_string(),
            call.m.to_string(),
            call.n.to_string(),
            file(format!("x{i}"), Some(call.x.clone())),
            file(format!("w{i}"), Some(call.w.clone())),
            file(format!("b{i}"), call.bias.as_deref().map(f32_bytes)),
            file(format!("r{i}"), call.residual.as_deref().map(f32_bytes)),
            path(&format!("y{i}")),
        ];
        let run = Command::new(path("harness")).args(&args).output().unwrap();
        assert!(run.status.success(), "kernel {i}: {}", String::from_utf8_lossy(&run.stderr));
        let y: Vec<f32> = std::fs::read(path(&format!("y{i}")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(bits(&y), bits(&call.want), "kernel {i} ({})", symbols[i]);
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// A model's kernels as an object file: the functions the engine compiles, in the plan's
/// order, named with the prefix. Three linears: f32 weights with a bias and GELU (sgemm:
/// only the epilogue is emitted), Q8_0 weights, plain (an emitted kernel; identity
/// epilogue, none), and the same Q8_0 shape again with a bias (a second kernel, whose
/// epilogue runs after the 256-bit GEMM where the host has one).
#[test]
fn a_models_kernels_are_the_engines_in_order() {
    let text = "graph g {
  %0 = input \"x\" : f32[m, 64]
  %1 = weight \"w1\" f32 : f32[32, 64]
  %2 = weight \"b1\" f32 : f32[32]
  %3 = linear %0, %1, %2 : f32[m, 32]
  %4 = gelu %3 : f32[m, 32]
  %5 = weight \"w2\" q8_0 : f32[64, 32]
  %6 = linear %4, %5 : f32[m, 64]
  %7 = weight \"w3\" q8_0 : f32[64, 32]
  %8 = weight \"b3\" f32 : f32[64]
  %9 = linear %4, %7, %8 : f32[m, 64]
  output \"y\" = %6
  output \"z\" = %9
}
";
    let g = kiln_ir::parse(text).unwrap();
    let isa = HostIsa::native().unwrap();
    let object = kiln_jit::emit_object(&[&g], &isa, "m_", &[]).unwrap();
    let names: Vec<&str> = object.functions.iter().map(|f| f.name.as_str()).collect();
    let after_gemm = kiln_exec::gemm_f32::available();
    let mut want = vec!["m_epilogue0", "m_linear1"];
    if after_gemm {
        want.push("m_epilogue2");
    }
    want.push("m_linear2");
    assert_eq!(names, want);
    assert!(object.bytes.starts_with(b"\x7fELF"), "an ELF object");
}

/// An engine on kernels compiled ahead of time: the object [`emit_object`] writes, linked
/// by `cc` into a shared library and loaded, drives `Engine::with_kernel_table`, which
/// computes the JIT engine's bits for one row (the emitted kernels, their columns split
/// across 1, 2, 3 or 12 threads: the object has splits for up to 8, which 12 threads
/// share) and nine (the GEMMs after which the emitted epilogues run), with f32 and int8
/// activations; kernels for other activations are refused.
#[test]
fn an_engine_runs_on_linked_kernels_with_the_jit_bits() {
    use kiln_exec::{KernelEntries, LinkedKernels};
    use kiln_jit::{Activations, Engine, EngineOptions};
    use kiln_rt::{Tensor, Value};
    use std::collections::HashMap;
    use std::sync::Arc;

    let text = "graph g {
  %0 = input \"x\" : f32[m, 64]
  %1 = weight \"w1\" f32 : f32[64, 64]
  %2 = weight \"b1\" f32 : f32[64]
  %3 = linear %0, %1, %2 : f32[m, 64]
  %4 = gelu %3 : f32[m, 64]
  %5 = weight \"w2\" q8_0 : f32[1024, 64]
  %6 = linear %4, %5 : f32[m, 1024]
  %7 = weight \"w3\" q4_1 : f32[64, 1024]
  %8 = weight \"b3\" f32 : f32[64]
  %9 = linear %6, %7, %8 : f32[m, 64]
  %10 = silu %9 : f32[m, 64]
  output \"y\" = %10
}
";
    let mut base = kiln_ir::parse(text).unwrap();
    let g = &mut base;
    let mut rng = Rng::new(11);
    for (name, format, n, k) in
        [("w1", Format::F32, 64, 64), ("w2", Format::Q8_0, 1024, 64), ("w3", Format::Q4_1, 64, 1024)]
    {
        let bytes = kiln_ir::Bytes::from_vec(random_weight(&mut rng, format, n, k));
        g.store.insert(name, kiln_ir::TensorData::new(format, vec![n as u64, k as u64], bytes).unwrap());
    }
    for name in ["b1", "b3"] {
        g.store.insert(name, kiln_ir::TensorData::from_f32(vec![64], &rng.vec(64, 0.5)));
    }
    kiln_ir::verify(g).unwrap();
    let with = |activations: Activations| {
        let mut g = base.clone();
        kiln_ir::set_activations(&mut g, activations);
        kiln_ir::verify(&g).unwrap();
        g
    };
    let isa = HostIsa::native().unwrap();
    let dir = std::env::temp_dir().join(format!("kiln-object-engine-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, activations) in [Activations::F32, Activations::Int8].into_iter().enumerate() {
        let options = |threads| EngineOptions { threads, profile: false };
        let g = with(activations);
        let object = kiln_jit::emit_object(&[&g], &isa, "kiln_t_", &[]).unwrap();
        let (obj, lib) = (dir.join(format!("k{i}.o")), dir.join(format!("libk{i}.so")));
        std::fs::write(&obj, &object.bytes).unwrap();
        let cc = Command::new("cc").arg("-shared").arg(&obj).arg("-o").arg(&lib).output().expect("`cc` runs");
        assert!(cc.status.success(), "cc -shared: {}", String::from_utf8_lossy(&cc.stderr));
        // SAFETY: the library holds only the kernels and data; loading it runs no
        // initializers of ours.
        let lib = Arc::new(unsafe { libloading::Library::new(&lib) }.unwrap());
        // SAFETY: the symbols are data of the types `emit_object` documents.
        let (specs, table) = unsafe {
            let count = **lib.get::<*const u64>(b"kiln_t_kernel_count").unwrap() as usize;
            let pairs = *lib.get::<*const [*const u8; 2]>(b"kiln_t_kernels").unwrap();
            let table: Vec<KernelEntries> = std::slice::from_raw_parts(pairs, count)
                .iter()
                .map(|[l, e]| ((!l.is_null()).then_some(*l), (!e.is_null()).then_some(*e)))
                .collect();
            let len = **lib.get::<*const u64>(b"kiln_t_kernel_specs_len").unwrap() as usize;
            let text = *lib.get::<*const u8>(b"kiln_t_kernel_specs").unwrap();
            (std::str::from_utf8(std::slice::from_raw_parts(text, len)).unwrap().to_string(), table)
        };
        // The whole of each linear, and w2's 1024 columns split for 2..=8 threads.
        assert!(table.len() >= 10, "{specs}");
        let linked = LinkedKernels { specs: &specs, table: &table };
        for threads in [1, 2, 3, 12] {
            // SAFETY: the object written for this graph, on this CPU, kept alive by `lib`.
            let aot = unsafe { Engine::with_kernel_table(&g, options(threads), &linked, lib.clone()) }.unwrap();
            let jit = kiln_jit::compile(&g, options(threads)).unwrap();
            for m in [1, 9] {
                let x = Value::F32(Tensor::new(vec![m, 64], rng.vec(m * 64, 1.0)));
                let inputs: HashMap<String, Value> = [("x".to_string(), x)].into();
                assert_eq!(
                    aot.run(&inputs).unwrap(),
                    jit.run(&inputs).unwrap(),
                    "{activations:?}, {threads} threads, m = {m}"
                );
            }
        }
        // Kernels for the graph with the other activations are not these.
        let other = with(if i == 0 { Activations::Int8 } else { Activations::F32 });
        // SAFETY: as above; the call fails before binding anything.
        let err = unsafe { Engine::with_kernel_table(&other, options(2), &linked, lib.clone()) }.err().unwrap();
        assert!(err.to_string().contains("no kernel for"), "{err}");
        // Code that may use a CPU feature this build cannot check for is refused.
        let (host, rest) = specs.split_once('\n').unwrap();
        let (_, rest) = rest.split_once('\n').unwrap();
        let strange = format!("{host}\ncpu sse41 avx2 fma made_up_feature\n{rest}");
        let linked = LinkedKernels { specs: &strange, table: &table };
        // SAFETY: as above; the call fails before binding anything.
        let err = unsafe { Engine::with_kernel_table(&g, options(2), &linked, lib.clone()) }.err().unwrap();
        assert!(err.to_string().contains("made_up_feature"), "{err}");
        // A spec text without its host line is refused.
        let headless = specs.split_once('\n').unwrap().1;
        let linked = LinkedKernels { specs: headless, table: &table };
        // SAFETY: as above; the call fails before binding anything.
        let err = unsafe { Engine::with_kernel_table(&g, options(2), &linked, lib.clone()) }.err().unwrap();
        assert!(err.to_string().contains("no host line"), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
