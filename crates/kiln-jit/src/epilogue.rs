//! Epilogue kernels: the emitter of the kernels whose contract [`kiln_exec::epilogue`] states.

use cranelift_codegen::ir::{InstBuilder, condcodes::IntCC};

use crate::JitError;
use crate::emit::{load_f32_partial, ro, rw, store_f32_partial};
use crate::math::activation;
use crate::module::{CodeModule, FunctionId};
use cranelift_module::Module;

pub use kiln_exec::epilogue::{EpilogueFn, EpilogueSpec};

/// Defines the epilogue kernel for `spec` in `module` under `name`.
pub fn emit_epilogue<M: Module>(
    module: &mut CodeModule<M>,
    name: &str,
    spec: &EpilogueSpec,
) -> Result<FunctionId, JitError> {
    if spec.n == 0 || spec.n.checked_mul(4).is_none_or(|b| b > i32::MAX as usize) {
        return Err(JitError::Spec(format!("epilogue {spec:?}: N out of range")));
    }
    let ptr = module.pointer_type();
    let sig = module.signature(&[ptr, ptr, ptr, ptr, ptr]);
    let s = *spec;
    module.define(name, sig, |b| {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (y, bias, residual, m0, m1) = (p[0], p[1], p[2], p[3], p[4]);
        let row_bytes = (s.n * 4) as i64;
        // Pointers to row m0 of y and the residual; the row loop advances them.
        let start = b.ins().imul_imm_s(m0, row_bytes);
        let y0 = b.ins().iadd(y, start);
        let r0 = b.ins().iadd(residual, start);
        let rows = b.ins().isub(m1, m0);

        let header = b.create_block();
        let body = b.create_block();
        let done = b.create_block();
        for _ in 0..3 {
            b.append_block_param(header, ptr);
        }
        b.ins().jump(header, &[y0.into(), r0.into(), rows.into()]);
        b.switch_to_block(header);
        let hp = b.block_params(header).to_vec();
        let (yr, rr, left) = (hp[0], hp[1], hp[2]);
        // `rows` is unsigned: m1 <= m0 means no rows, so stop on zero or on wrap-around.
        let more = b.ins().icmp_imm_s(IntCC::SignedGreaterThan, left, 0);
        b.ins().brif(more, body, &[], done, &[]);

        b.switch_to_block(body);
        // Inner loop over groups of four outputs (runtime loop), then the tail.
        let groups = s.n / 4;
        let tail = s.n % 4;
        let emit_group = |b: &mut cranelift_frontend::FunctionBuilder<'_>,
                          yp: cranelift_codegen::ir::Value,
                          rp: cranelift_codegen::ir::Value,
                          bp: cranelift_codegen::ir::Value,
                          lanes: usize| {
            let mut v = load_f32_partial(b, rw(), yp, 0, lanes);
            if s.bias {
                let bv = load_f32_partial(b, ro(), bp, 0, lanes);
                v = b.ins().fadd(v, bv);
            }
            v = activation(b, s.activation, v);
            if s.residual {
                let rv = load_f32_partial(b, rw(), rp, 0, lanes);
                v = b.ins().fadd(rv, v);
            }
            store_f32_partial(b, v, yp, 0, lanes);
        };
        let (mut yp, mut rp, mut bp) = (yr, rr, bias);
        if groups > 0 {
            let ghead = b.create_block();
            let gbody = b.create_block();
            let gdone = b.create_block();
            for _ in 0..4 {
                b.append_block_param(ghead, ptr);
                b.append_block_param(gdone, ptr);
            }
            let count = b.ins().iconst(ptr, groups as i64);
            b.ins().jump(ghead, &[yp.into(), rp.into(), bp.into(), count.into()]);
            b.switch_to_block(ghead);
            let gp = b.block_params(ghead).to_vec();
            let more = b.ins().icmp_imm_s(IntCC::NotEqual, gp[3], 0);
            b.ins().brif(more, gbody, &[], gdone, &[gp[0].into(), gp[1].into(), gp[2].into(), gp[3].into()]);
            b.switch_to_block(gbody);
            emit_group(b, gp[0], gp[1], gp[2], 4);
            let ny = b.ins().iadd_imm_s(gp[0], 16);
            let nr = b.ins().iadd_imm_s(gp[1], 16);
            let nb = b.ins().iadd_imm_s(gp[2], 16);
            let nc = b.ins().iadd_imm_s(gp[3], -1);
            b.ins().jump(ghead, &[ny.into(), nr.into(), nb.into(), nc.into()]);
            b.switch_to_block(gdone);
            let dp = b.block_params(gdone).to_vec();
            (yp, rp, bp) = (dp[0], dp[1], dp[2]);
        }
        if tail > 0 {
            emit_group(b, yp, rp, bp, tail);
        }
        let ny = b.ins().iadd_imm_s(yr, row_bytes);
        let nr = b.ins().iadd_imm_s(rr, row_bytes);
        let nl = b.ins().iadd_imm_s(left, -1);
        b.ins().jump(header, &[ny.into(), nr.into(), nl.into()]);

        b.switch_to_block(done);
        b.ins().return_(&[]);
        Ok(())
    })
}
