//! Test support: JIT-compiles small "map" functions around one emitter helper, so helpers
//! can be checked exhaustively against Rust references.

use cranelift_codegen::ir::condcodes::IntCC;
use cranelift_codegen::ir::types::I64;
use cranelift_codegen::ir::{InstBuilder, Value};
use cranelift_frontend::FunctionBuilder;

use crate::emit::rw;
use crate::isa::HostIsa;
use crate::module::{JitCode, JitModule};

/// A compiled `fn(src: *const u8, dst: *mut f32, groups: usize)` that, for each group `i`,
/// stores `emit(b, src + i * src_step)` (an `f32x4`) at `dst + 16 i`.
pub(crate) struct Map4 {
    code: JitCode,
    id: crate::module::FunctionId,
    src_step: usize,
}

type Map4Fn = unsafe extern "C" fn(*const u8, *mut f32, usize);

impl Map4 {
    pub(crate) fn new(src_step: usize, emit: impl Fn(&mut FunctionBuilder<'_>, Value) -> Value) -> Map4 {
        let isa = HostIsa::native().unwrap();
        let mut m = JitModule::new(&isa);
        let sig = m.signature(&[I64, I64, I64]);
        let id = m
            .define("map4", sig, |b| {
                let entry = b.create_block();
                b.append_block_params_for_function_params(entry);
                b.switch_to_block(entry);
                let p = b.block_params(entry).to_vec();
                let (src, dst, n) = (p[0], p[1], p[2]);
                let (lp, done) = (b.create_block(), b.create_block());
                let i_var = b.declare_var(I64);
                let zero = b.ins().iconst(I64, 0);
                b.def_var(i_var, zero);
                let nonempty = b.ins().icmp_imm_u(IntCC::NotEqual, n, 0);
                b.ins().brif(nonempty, lp, &[], done, &[]);
                b.switch_to_block(lp);
                let i = b.use_var(i_var);
                let s_off = b.ins().imul_imm_u(i, src_step as i64);
                let s = b.ins().iadd(src, s_off);
                let d_off = b.ins().imul_imm_u(i, 16);
                let d = b.ins().iadd(dst, d_off);
                let v = emit(b, s);
                b.ins().store(rw(), v, d, 0);
                let next = b.ins().iadd_imm_u(i, 1);
                b.def_var(i_var, next);
                let more = b.ins().icmp(IntCC::UnsignedLessThan, next, n);
                b.ins().brif(more, lp, &[], done, &[]);
                b.switch_to_block(done);
                b.ins().return_(&[]);
                Ok(())
            })
            .unwrap();
        Map4 { code: m.finalize().unwrap(), id, src_step }
    }

    /// Runs over `src` (whole groups) and returns 4 results per group.
    pub(crate) fn run(&self, src: &[u8]) -> Vec<f32> {
        let groups = src.len() / self.src_step;
        let mut out = vec![0.0f32; 4 * groups];
        // Reads stay inside `src` as long as `emit` reads at most `src_step` bytes per
        // group, which every caller in this crate's tests does.
        // SAFETY: the function was defined with `Map4Fn`'s signature above.
        let f = unsafe { self.code.function::<Map4Fn>(self.id) };
        // SAFETY: `src` holds `groups * src_step` bytes and `out` 4 * groups f32.
        unsafe { (f.get())(src.as_ptr(), out.as_mut_ptr(), groups) };
        out
    }
}

/// Bytes of little-endian f32 values.
pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
