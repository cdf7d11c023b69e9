//! Prints the machine code of one linear kernel, as Cranelift disassembles it.
//!
//! `cargo run --release -p kiln-jit --example linear_disasm -- q4_1 576 576 [--opt speed]`

use kiln_ir::Format;
use kiln_jit::{HostIsa, IsaOptions, LinearKernel, LinearSpec, LinearTiles, OptLevel};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: linear_disasm FORMAT K N [--opt none|speed]";
    let format: Format = args.first().expect(usage).parse().expect("format");
    let k: usize = args.get(1).expect(usage).parse().expect("K");
    let n: usize = args.get(2).expect(usage).parse().expect("N");
    let opt_level = match args.iter().position(|a| a == "--opt").map(|i| args[i + 1].as_str()) {
        Some("speed") => OptLevel::Speed,
        _ => OptLevel::None,
    };
    let isa = HostIsa::with_options(IsaOptions { opt_level, ..IsaOptions::default() }).unwrap();
    eprintln!("host: {}", isa.features());
    let spec = LinearSpec::new(k, n, format);
    let kernel = LinearKernel::compile_with(&isa, spec, LinearTiles::for_format(format), true).unwrap();
    let stats = kernel.stats();
    eprintln!("{} code bytes, compiled in {:?} (+{:?} IR build)", stats.code_bytes, stats.compile, stats.build);
    print!("{}", stats.disasm.as_deref().unwrap_or(""));
}
