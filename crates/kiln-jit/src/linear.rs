//! Fused linear kernels: the emitter of the kernels whose contract (signature and numbers)
//! [`kiln_exec::linear`] states.
//!
//! # Code shape
//!
//! Two paths, chosen at run time by the number of rows `m1 - m0`:
//! - **direct** (fewer than `panel_min_rows` rows; decode's GEMV): tiles of `direct_rows`
//!   weight rows x one row of `x`, weights decoded from their stored bytes inside the `K`
//!   loop, one `f32x4` accumulator per weight row (8 rows for f32: eight independent FMA
//!   chains). `x` is folded into each FMA as a memory operand (`vfmadd132ps xmm, xmm, [x]`),
//!   so a tile needs no register for it.
//! - **panel** (GEMM): per tile of `panel_rows` weight rows, the rows are decoded once into
//!   an f32 panel on the stack (`panel_rows * K * 4` bytes; f32 weights are used in place),
//!   then every group of `panel_xrows` rows of `x` runs a `panel_rows x panel_xrows`
//!   register tile over it: per vector step, 4 weight + 2 x loads feed 8 FMAs into 8
//!   accumulators (4 x 2, the measured best; 12 accumulators spill). Decoding is then
//!   amortized over all rows, so every format runs at f32 GEMM speed.
//!
//! Both paths decode to the same f32 values and accumulate in the same order, which is what
//! makes the choice invisible in the results. `K` loops advance by one block (32 weights,
//! block formats) or `unroll` vectors (float formats and panels) per iteration, with static
//! offsets inside; the outer loops (`n` tiles, `m` rows) are runtime loops. Cranelift's
//! FMA result is always tied to a multiplicand (`vfmadd213ps`/`vfmadd132ps`, never the
//! accumulator form), so emitters pass the operand that dies (a decoded weight) first.

use cranelift_codegen::ir::types::{F32, F32X4};
use cranelift_codegen::ir::{InstBuilder, StackSlotData, StackSlotKind, Type, Value, condcodes::IntCC};
use cranelift_frontend::{FunctionBuilder, Variable};
use kiln_ir::Format;
use std::ops::Range;
use std::sync::Arc;

use crate::JitError;
use crate::decode::{Rows, decode_lanes, decode_rows};
use crate::emit::{barrier, counted_loop, f32s, hsum4, load_f32_partial, ro, rw, store_f32_partial};
use crate::isa::HostIsa;
use crate::math::activation;
use crate::module::{CodeModule, FunctionId, FunctionStats, JitCode, JitModule};
use cranelift_module::Module;
pub use kiln_exec::linear::{LinearFn, LinearSpec};
/// Register tiling of a linear kernel. [`LinearTiles::for_format`] gives measured defaults;
/// the fields are public for experiments (`examples/linear_timing.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearTiles {
    /// Weight rows per tile on the direct path (1..=8).
    pub direct_rows: usize,
    /// Weight rows per tile on the panel path (1..=8).
    pub panel_rows: usize,
    /// Rows of `x` per tile on the panel path (1..=4).
    pub panel_xrows: usize,
    /// Take the panel path when `m1 - m0 >= panel_min_rows` (`usize::MAX`: never).
    pub panel_min_rows: usize,
    /// Vectors per `K`-loop iteration for the float formats and panels.
    pub unroll: usize,
}

impl LinearTiles {
    pub fn for_format(format: Format) -> LinearTiles {
        match format {
            Format::F32 => LinearTiles { direct_rows: 8, panel_rows: 4, panel_xrows: 2, panel_min_rows: 2, unroll: 4 },
            _ => LinearTiles { direct_rows: 4, panel_rows: 4, panel_xrows: 2, panel_min_rows: 4, unroll: 4 },
        }
    }

    /// Stack bytes a kernel for `spec` with these tiles uses for its weight panel (the
    /// frame is probed page by page, so an overflow faults on the guard page).
    pub fn panel_bytes(&self, spec: &LinearSpec) -> usize {
        let panel = spec.format != Format::F32 && self.panel_min_rows != usize::MAX;
        if panel { self.panel_rows * spec.k * 4 } else { 0 }
    }

    fn validate(&self) -> Result<(), JitError> {
        let ok = (1..=8).contains(&self.direct_rows)
            && (1..=8).contains(&self.panel_rows)
            && (1..=8).contains(&self.panel_xrows)
            && self.panel_min_rows >= 1
            && (1..=16).contains(&self.unroll);
        if ok { Ok(()) } else { Err(JitError::Spec(format!("bad tiles {self:?}"))) }
    }
}

/// The residual operand of [`LinearKernel::run`].
#[derive(Clone, Copy, Debug)]
pub enum Residual<'a> {
    None,
    /// `y = residual + ...` with a separate `[M, N]` input.
    Input(&'a [f32]),
    /// `y = y + ...`: `y` holds the residual on entry.
    InPlace,
}

/// A compiled linear kernel, owning (a share of) its code.
#[derive(Clone)]
pub struct LinearKernel {
    code: Arc<JitCode>,
    id: FunctionId,
    f: LinearFn,
    spec: LinearSpec,
}

impl std::fmt::Debug for LinearKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearKernel").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl LinearKernel {
    /// Compiles `spec` with the default tiles into its own module.
    pub fn compile(isa: &HostIsa, spec: LinearSpec) -> Result<LinearKernel, JitError> {
        LinearKernel::compile_with(isa, spec, LinearTiles::for_format(spec.format), false)
    }

    /// Compiles `spec` with explicit tiles, optionally capturing the disassembly.
    pub fn compile_with(
        isa: &HostIsa,
        spec: LinearSpec,
        tiles: LinearTiles,
        disasm: bool,
    ) -> Result<LinearKernel, JitError> {
        let mut module = JitModule::new(isa);
        module.set_disasm(disasm);
        let id = emit_linear(&mut module, "linear", &spec, &tiles)?;
        let code = Arc::new(module.finalize()?);
        // SAFETY: `id` was defined by `emit_linear` for `spec` in this module.
        Ok(unsafe { LinearKernel::from_code(code, id, spec) })
    }

    /// Wraps a kernel that [`emit_linear`] defined in a module shared with other functions.
    ///
    /// # Safety
    /// `id` must have been returned by `emit_linear(.., spec, ..)` for the module `code` was
    /// finalized from.
    pub unsafe fn from_code(code: Arc<JitCode>, id: FunctionId, spec: LinearSpec) -> LinearKernel {
        // SAFETY: `emit_linear` defines functions with exactly `LinearFn`'s signature.
        let f = unsafe { code.function::<LinearFn>(id) }.get();
        LinearKernel { code, id, f, spec }
    }

    pub fn spec(&self) -> &LinearSpec {
        &self.spec
    }

    pub fn stats(&self) -> &FunctionStats {
        self.code.stats(self.id)
    }

    /// The raw entry point; see the module docs for its contract. Valid while `self` (or a
    /// clone) lives.
    pub fn entry(&self) -> LinearFn {
        self.f
    }

    /// Computes rows `rows` of `y` (`[M, N]`) from `x` (`[M, K]`), checking every length.
    pub fn run(
        &self,
        x: &[f32],
        w: &[u8],
        bias: Option<&[f32]>,
        residual: Residual<'_>,
        y: &mut [f32],
        rows: Range<usize>,
    ) -> Result<(), JitError> {
        let s = &self.spec;
        let fail = |why: String| Err(JitError::Arguments(why));
        if !x.len().is_multiple_of(s.k) {
            return fail(format!("x has {} values, not a multiple of K = {}", x.len(), s.k));
        }
        let m = x.len() / s.k;
        if y.len() != m * s.n {
            return fail(format!("y has {} values, expected M * N = {m} * {}", y.len(), s.n));
        }
        if rows.end > m {
            return fail(format!("rows {rows:?} out of 0..{m}"));
        }
        if w.len() != s.weight_bytes() {
            return fail(format!("w has {} bytes, {} needs {}", w.len(), s.format, s.weight_bytes()));
        }
        let bias_ptr = match (s.bias, bias) {
            (true, Some(b)) if b.len() == s.n => b.as_ptr(),
            (false, None) => std::ptr::null(),
            _ => return fail(format!("bias: spec says {}, got {:?} values", s.bias, bias.map(<[f32]>::len))),
        };
        let residual_ptr = match (s.residual, residual) {
            (true, Residual::Input(r)) if r.len() == m * s.n => r.as_ptr(),
            (true, Residual::InPlace) => y.as_ptr(),
            (false, Residual::None) => std::ptr::null(),
            _ => return fail(format!("residual: spec says {}, got {residual:?}", s.residual)),
        };
        // SAFETY: all lengths were checked above against the kernel's contract (x: [M, K],
        // w: the stored weight, bias: [N], residual: [M, N] or y itself, y: [M, N],
        // rows within 0..M); `y` is a unique borrow, so nothing else overlaps it.
        unsafe { (self.f)(x.as_ptr(), w.as_ptr(), bias_ptr, residual_ptr, y.as_mut_ptr(), rows.start, rows.end) };
        Ok(())
    }
}

/// Defines the kernel for `spec` in `module` under `name` and returns its id (signature
/// [`LinearFn`]).
pub fn emit_linear<M: Module>(
    module: &mut CodeModule<M>,
    name: &str,
    spec: &LinearSpec,
    tiles: &LinearTiles,
) -> Result<FunctionId, JitError> {
    spec.validate()?;
    tiles.validate()?;
    let ptr = module.pointer_type();
    let sig = module.signature(&[ptr; 7]);
    let e = LinearEmitter { spec: *spec, tiles: *tiles, ptr };
    module.define(name, sig, |b| {
        e.function(b);
        Ok(())
    })
}

/// The kernel's pointer arguments and row range.
#[derive(Clone, Copy)]
struct Args {
    x: Value,
    w: Value,
    bias: Value,
    residual: Value,
    y: Value,
    m0: Value,
    m1: Value,
}

/// How the tiles of one path read their weight rows.
#[derive(Clone, Copy)]
enum Source {
    /// Decode the stored rows in the `K` loop.
    Direct,
    /// Decode each tile's rows once into this stack panel first (f32 rows, stride `K`).
    Panel(Value),
}

/// One weight-row tile fixed for the `m` loop: where its rows are and which outputs it
/// writes.
#[derive(Clone, Copy)]
struct NTile {
    rows: Rows,
    /// Row 0 of the tile (stored bytes or panel).
    w: Value,
    /// Byte stride between the tile's rows.
    stride: i32,
    /// Number of weight rows (outputs) in the tile.
    len: usize,
    /// `bias + n0`, `y + n0`, `residual + n0` (row 0).
    bias: Value,
    y: Value,
    residual: Value,
}

struct LinearEmitter {
    spec: LinearSpec,
    tiles: LinearTiles,
    ptr: Type,
}

impl LinearEmitter {
    fn function(&self, b: &mut FunctionBuilder<'_>) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let a = Args { x: p[0], w: p[1], bias: p[2], residual: p[3], y: p[4], m0: p[5], m1: p[6] };

        let work = b.create_block();
        let exit = b.create_block();
        let nonempty = b.ins().icmp(IntCC::UnsignedLessThan, a.m0, a.m1);
        b.ins().brif(nonempty, work, &[], exit, &[]);
        b.switch_to_block(work);

        let t = self.tiles;
        let panel_path = t.panel_min_rows != usize::MAX;
        if panel_path {
            let direct = b.create_block();
            let panel = b.create_block();
            let rows = b.ins().isub(a.m1, a.m0);
            let many = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, rows, t.panel_min_rows as i64);
            b.ins().brif(many, panel, &[], direct, &[]);

            b.switch_to_block(panel);
            let source = if self.spec.format == Format::F32 {
                Source::Direct // f32 rows are their own panel
            } else {
                let bytes = t.panel_bytes(&self.spec) as u32;
                let slot = b.create_sized_stack_slot(StackSlotData::new(StackSlotKind::ExplicitSlot, bytes, 4));
                Source::Panel(b.ins().stack_addr(self.ptr, slot, 0))
            };
            self.n_tiles(b, &a, t.panel_rows, t.panel_xrows, source);
            b.ins().jump(exit, &[]);
            b.switch_to_block(direct);
        }
        self.n_tiles(b, &a, t.direct_rows, 1, Source::Direct);
        b.ins().jump(exit, &[]);

        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }

    /// All `N` outputs in tiles of `len` weight rows (a runtime loop over the full tiles,
    /// then the remainder tile).
    fn n_tiles(&self, b: &mut FunctionBuilder<'_>, a: &Args, len: usize, xrows: usize, src: Source) {
        let n = self.spec.n;
        let full = n / len;
        if full > 0 {
            let zero = b.ins().iconst(self.ptr, 0);
            counted_loop(b, self.ptr, full, &[(zero, len as i64)], |b, n0| self.n_tile(b, a, n0[0], len, xrows, src));
        }
        if !n.is_multiple_of(len) {
            let n0 = b.ins().iconst(self.ptr, (full * len) as i64);
            self.n_tile(b, a, n0, n % len, xrows, src);
        }
    }

    /// Outputs `n0..n0 + len` for all rows `m0..m1`.
    fn n_tile(&self, b: &mut FunctionBuilder<'_>, a: &Args, n0: Value, len: usize, xrows: usize, src: Source) {
        let s = &self.spec;
        let stored = Rows::Stored(s.format);
        let row_bytes = stored.bytes(s.k);
        let w_off = b.ins().imul_imm_u(n0, row_bytes as i64);
        let w = b.ins().iadd(a.w, w_off);
        let n0_bytes = b.ins().imul_imm_u(n0, 4);
        let bias = b.ins().iadd(a.bias, n0_bytes);
        let y = b.ins().iadd(a.y, n0_bytes);
        let residual = b.ins().iadd(a.residual, n0_bytes);
        let tile = match src {
            Source::Direct => NTile { rows: stored, w, stride: row_bytes, len, bias, y, residual },
            Source::Panel(panel) => {
                self.decode_panel(b, w, row_bytes, len, panel);
                NTile { rows: Rows::Panel, w: panel, stride: (s.k * 4) as i32, len, bias, y, residual }
            }
        };

        // for m in m0..m1 step xrows { tile(m, xrows) }, then single rows.
        let m_var = b.declare_var(self.ptr);
        b.def_var(m_var, a.m0);
        let step_loop = |b: &mut FunctionBuilder<'_>, step: usize| {
            let head = b.create_block();
            let body = b.create_block();
            let done = b.create_block();
            b.ins().jump(head, &[]);
            b.switch_to_block(head);
            let m = b.use_var(m_var);
            let next = b.ins().iadd_imm_s(m, step as i64);
            let fits = b.ins().icmp(IntCC::UnsignedLessThanOrEqual, next, a.m1);
            b.ins().brif(fits, body, &[], done, &[]);
            b.switch_to_block(body);
            self.tile(b, a, &tile, m, step);
            b.def_var(m_var, next);
            b.ins().jump(head, &[]);
            b.switch_to_block(done);
        };
        step_loop(b, xrows);
        if xrows > 1 {
            step_loop(b, 1);
        }
    }

    /// Decodes weight rows `0..len` of the tile at `w` into the f32 panel (row stride `K`).
    fn decode_panel(&self, b: &mut FunctionBuilder<'_>, w: Value, row_bytes: i32, len: usize, panel: Value) {
        let s = &self.spec;
        let stored = Rows::Stored(s.format);
        let k4 = s.k / 4 * 4;
        let chunk = stored.unit() * if stored.unit() == 4 { self.tiles.unroll } else { 1 };
        let trips = k4 / chunk;
        let steps = [(w, stored.bytes(chunk) as i64), (panel, (chunk * 4) as i64)];
        let rows_at: Vec<i32> = (0..len).map(|r| r as i32 * row_bytes).collect();
        let panel_row = |r: usize| (r * s.k * 4) as i32;
        let ends = counted_loop(b, self.ptr, trips, &steps, |b, p| {
            decode_rows(b, stored, p[0], &rows_at, 0, chunk, &mut |b, r, i, v| {
                b.ins().store(rw(), v, p[1], panel_row(r) + 16 * i as i32);
            });
        });
        let rest = k4 - trips * chunk;
        if rest > 0 {
            decode_rows(b, stored, ends[0], &rows_at, 0, rest, &mut |b, r, i, v| {
                b.ins().store(rw(), v, ends[1], panel_row(r) + 16 * i as i32);
            });
        }
        for kk in k4..s.k {
            for g in (0..len).step_by(4) {
                let lanes = (len - g).min(4);
                let at: Vec<(Value, i32)> =
                    (g..g + lanes).map(|r| (w, r as i32 * row_bytes + stored.bytes(kk))).collect();
                let v = decode_lanes(b, stored, &at);
                for (i, r) in (g..g + lanes).enumerate() {
                    let x = b.ins().extractlane(v, i as u8);
                    b.ins().store(rw(), x, panel, ((r * s.k + kk) * 4) as i32);
                }
            }
        }
    }

    /// The register tile: outputs `n0..n0 + tile.len` of rows `m..m + xrows`.
    fn tile(&self, b: &mut FunctionBuilder<'_>, a: &Args, tile: &NTile, m: Value, xrows: usize) {
        let s = &self.spec;
        let (k, len) = (s.k, tile.len);
        let x_off = b.ins().imul_imm_u(m, (k * 4) as i64);
        let x = b.ins().iadd(a.x, x_off);
        let y_off = b.ins().imul_imm_u(m, (s.n * 4) as i64);
        let y = b.ins().iadd(tile.y, y_off);
        let residual = b.ins().iadd(tile.residual, y_off);

        let zero = f32s(b, 0.0);
        let acc: Vec<Variable> = (0..len * xrows)
            .map(|_| {
                let v = b.declare_var(F32X4);
                b.def_var(v, zero);
                v
            })
            .collect();
        let acc_at = |r: usize, c: usize| acc[r * xrows + c];

        // K loop: per chunk, each weight row is decoded once and multiplied into all xrows.
        let k4 = k / 4 * 4;
        let unit = tile.rows.unit();
        let chunk = unit * if unit == 4 { self.tiles.unroll } else { 1 };
        let trips = k4 / chunk;
        let rows_at: Vec<i32> = (0..len).map(|r| r as i32 * tile.stride).collect();
        // x vectors: for the float formats and panels (one vector per unit, consumed row
        // after row) each x vector is loaded once per unit into a register and shared by
        // the tile's rows; for the block formats (a whole block per row before the next
        // row) it is folded into each FMA as a memory operand.
        let share_x = unit == 4 && xrows > 1;
        let mut xs: Vec<Value> = Vec::new();
        let mut fma_into = |b: &mut FunctionBuilder<'_>, xp: Value, r: usize, i: usize, w: Value| {
            if share_x && r == 0 {
                xs = (0..xrows).map(|c| b.ins().load(F32X4, ro(), xp, ((c * k + 4 * i) * 4) as i32)).collect();
            }
            for c in 0..xrows {
                let xv = match xs.get(c) {
                    Some(&v) if share_x => v,
                    _ => b.ins().load(F32X4, ro(), xp, ((c * k + 4 * i) * 4) as i32),
                };
                // `w` first: the FMA's result is tied to its first operand, so `w` is
                // copied only when another row of x still needs it.
                let prev = b.use_var(acc_at(r, c));
                let next = b.ins().fma(w, xv, prev);
                b.def_var(acc_at(r, c), next);
            }
        };
        let steps = [(x, (chunk * 4) as i64), (tile.w, tile.rows.bytes(chunk) as i64)];
        let ends = counted_loop(b, self.ptr, trips, &steps, |b, p| {
            decode_rows(b, tile.rows, p[1], &rows_at, 0, chunk, &mut |b, r, i, w| fma_into(b, p[0], r, i, w));
        });
        let rest = k4 - trips * chunk;
        if rest > 0 {
            decode_rows(b, tile.rows, ends[1], &rows_at, 0, rest, &mut |b, r, i, w| fma_into(b, ends[0], r, i, w));
        }
        barrier(b, &acc, F32X4);

        // Epilogue, four outputs at a time.
        for c in 0..xrows {
            for g in (0..len).step_by(4) {
                let lanes = (len - g).min(4);
                let parts: [Value; 4] =
                    std::array::from_fn(|i| b.use_var(acc_at(g + if i < lanes { i } else { 0 }, c)));
                let mut out = hsum4(b, parts);
                for kk in k4..k {
                    let at: Vec<(Value, i32)> =
                        (g..g + lanes).map(|r| (tile.w, r as i32 * tile.stride + tile.rows.bytes(kk))).collect();
                    let wt = decode_lanes(b, tile.rows, &at);
                    let xs = b.ins().load(F32, ro(), x, ((c * k + kk) * 4) as i32);
                    let xs = b.ins().splat(F32X4, xs);
                    out = b.ins().fma(wt, xs, out);
                }
                if s.bias {
                    let bv = load_f32_partial(b, ro(), tile.bias, (g * 4) as i32, lanes);
                    out = b.ins().fadd(out, bv);
                }
                out = activation(b, s.activation, out);
                let y_at = ((c * s.n + g) * 4) as i32;
                if s.residual {
                    let rv = load_f32_partial(b, rw(), residual, y_at, lanes);
                    out = b.ins().fadd(rv, out);
                }
                store_f32_partial(b, out, y, y_at, lanes);
            }
        }
    }
}
