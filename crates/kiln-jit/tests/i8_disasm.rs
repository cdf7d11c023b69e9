//! What the int8 kernels compile to on this host: integer dot products, not a scalar
//! fallback. (On a host with AVX-512 VNNI, `vpdpbusd` would be the instruction to expect;
//! kiln does not emit that variant yet, so such a host must still show the AVX2 pair.)

use kiln_ir::Format;
use kiln_jit::{HostIsa, LinearI8Kernel, LinearI8Spec, LinearI8Tiles};

#[test]
#[cfg(target_arch = "x86_64")]
fn int8_kernels_use_integer_dot_products() {
    let isa = HostIsa::native().expect("host ISA");
    for format in [Format::Q4_1, Format::Q4_0, Format::Q8_0] {
        let spec = LinearI8Spec::new(576, 64, format);
        let kernel = LinearI8Kernel::compile_with(&isa, spec, LinearI8Tiles::default(), true).expect("compiles");
        let asm = kernel.stats().disasm.clone().expect("disassembly captured");
        // u8 x i8 -> i16 pairs, then i16 -> i32 pairs: `pmaddubsw` and `pmaddwd` (with a `v`
        // prefix under AVX).
        let count = |needle: &str| asm.matches(needle).count();
        assert!(count("pmaddubsw") >= 2, "{format}: no pmaddubsw in\n{asm}");
        assert!(count("pmaddwd") >= 1, "{format}: no pmaddwd in\n{asm}");
        // No calls out (a libm or helper fallback) in a kernel.
        let calls = asm.lines().filter(|l| l.trim_start().starts_with("call")).count();
        assert_eq!(calls, 0, "{format}: calls in\n{asm}");
    }
}
