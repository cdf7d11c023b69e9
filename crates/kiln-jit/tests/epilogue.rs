//! Epilogue kernels against the fused linear kernel: a plain matmul followed by the
//! epilogue gives bitwise what the linear kernel with that epilogue fused in gives.

mod common;

use common::Rng;
use kiln_ir::Format;
use kiln_jit::epilogue::{EpilogueFn, EpilogueSpec, emit_epilogue};
use kiln_jit::{Activation, HostIsa, JitModule, LinearKernel, LinearSpec, Residual};

#[test]
fn matmul_then_epilogue_is_the_fused_kernel() {
    let isa = HostIsa::native().expect("host ISA");
    let mut rng = Rng::new(7);
    for n in [1, 3, 4, 9, 64, 130] {
        for act in [Activation::None, Activation::Relu, Activation::Silu, Activation::Gelu] {
            for (bias, residual) in [(false, false), (true, false), (false, true), (true, true)] {
                let (m, k) = (5, 24);
                let x = rng.vec(m * k, 1.0);
                let w = rng.vec(n * k, 1.0);
                let b = rng.vec(n, 1.0);
                let r = rng.vec(m * n, 1.0);
                let wb: Vec<u8> = w.iter().flat_map(|v| v.to_le_bytes()).collect();
                let spec = LinearSpec { bias, activation: act, residual, ..LinearSpec::new(k, n, Format::F32) };
                let fused = LinearKernel::compile(&isa, spec).expect("compiles");
                let mut want = vec![0f32; m * n];
                let res = if residual { Residual::Input(&r) } else { Residual::None };
                fused.run(&x, &wb, bias.then_some(&b[..]), res, &mut want, 0..m).expect("runs");

                let plain = LinearKernel::compile(&isa, LinearSpec::new(k, n, Format::F32)).expect("compiles");
                let mut got = vec![0f32; m * n];
                plain.run(&x, &wb, None, Residual::None, &mut got, 0..m).expect("runs");
                let mut module = JitModule::new(&isa);
                let espec = EpilogueSpec { n, bias, activation: act, residual };
                let id = emit_epilogue(&mut module, "epilogue", &espec).expect("emits");
                let code = module.finalize().expect("finalizes");
                // SAFETY: `id` was defined by `emit_epilogue`, whose signature is `EpilogueFn`.
                let f = unsafe { code.function::<EpilogueFn>(id) }.get();
                // Two calls over a split of the rows, as threads would make them.
                for rows in [0..2, 2..m] {
                    // SAFETY: y and r are [m, n], b is [n]; rows are within 0..m.
                    unsafe { f(got.as_mut_ptr(), b.as_ptr(), r.as_ptr(), rows.start, rows.end) };
                }
                let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "n={n} {act:?} bias={bias} residual={residual}:\n{got:?}\n{want:?}");
            }
        }
    }
}
