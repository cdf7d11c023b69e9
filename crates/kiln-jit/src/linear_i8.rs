//! W8A8 fused linear kernels: the emitter of the kernels whose contract (signature, numbers
//! and packed weight layout) [`kiln_exec::linear_i8`] states.
//!
//! # Code shape
//!
//! x86-64 without VNNI (the target host is a Zen 3: AVX2 + FMA): the u8 x i8 products are
//! `vpmaddubsw` (pairs summed into saturating i16 lanes) and the i16 -> i32 pairwise sums
//! `vpmaddwd` against ones (Cranelift: `x86_pmaddubsw`, and `iadd_pairwise` of `swiden_low` /
//! `swiden_high` of one `i16x8`). No saturation is possible:
//! - Q4_0/Q4_1: the nibble is the unsigned operand, `q` the signed one: a pair is at most
//!   `2 * 15 * 127 = 3810`; two `vpmaddubsw` (low and high nibbles) are added in i16 (7620)
//!   and two such lanes once more (15240) before `vpmaddwd`;
//! - Q8_0: the sign trick, `vpmaddubsw(|qw|, q * sign(qw))`: `|qw| <= 128` (`vpabsb` of -128
//!   is 128 read unsigned), so a pair is at most `2 * 128 * 127 = 32512`; each `vpmaddubsw`
//!   result goes through its own `vpmaddwd`.
//!
//! Weight rows are processed in groups of four: the four rows' lane partials are reduced
//! and transposed in one go (`vpunpck{l,h}dq`/`vpunpck{l,h}qdq` + adds) into an `i32x4` whose
//! lane `r` is `isum` of row `r`, so one `vcvtdq2ps` and one FMA per block update the four
//! outputs, whose accumulator is an `f32x4` (lane `r` = output `r`): no horizontal sums at
//! the end, and the block scales of the four rows are gathered (one 16-byte load per row,
//! three unpacks) and widened from f16 together. Per block, all groups' scales are emitted
//! first, then the integer dot products, then the float updates: the scale chains are long
//! and `opt_level=none` keeps this order, which lets the out-of-order core overlap them
//! (measured +10%). Per four rows and block the Q4_1 GEMV loop is ~60 instructions for 128
//! multiply-adds, 8 of them `vpmaddubsw` and 2 `vpmaddwd`.
//!
//! Two paths, chosen at run time by the number of rows `m1 - m0`:
//! - **direct** (GEMV, decode): tiles of `direct_rows` (16) weight rows x one row of `x`;
//!   the block of `q` and its scales are loaded once and shared by the tile's rows (16
//!   spills a few vectors, yet beat 8 and 12 by 2-3%);
//! - **tile** (GEMM, prefill): tiles of `gemm_rows` (4) weight rows x `gemm_xrows` (4) rows
//!   of `x`; each weight row is loaded, unpacked and its scale widened once per block and
//!   multiplied into every row of `x` (whose `q` is folded into `vpmaddubsw` as a memory
//!   operand). 4 x 4 beat 4 x 2, 4 x 3 and 8 x 2 (67 vs 55-61 GOP/s on Q4_1 576x576) despite
//!   a few spills.

use cranelift_codegen::ir::types::{F32, F32X4, I8X16, I16X8, I32, I32X4};
use cranelift_codegen::ir::{InstBuilder, Type, Value, condcodes::IntCC};
use cranelift_frontend::{FunctionBuilder, Variable};
use kiln_ir::Format;
use std::ops::Range;
use std::sync::Arc;

use crate::JitError;
use crate::emit::{
    barrier, cast, counted_loop, f32s, i32s, load_f32_partial, ro, rw, select_lanes, shuffle4, store_f32_partial, u16s,
    vconst_bytes,
};
use crate::isa::HostIsa;
use crate::linear::Residual;
use crate::math::activation;
use crate::module::{CodeModule, FunctionId, FunctionStats, JitCode, JitModule};
use cranelift_module::Module;
use kiln_exec::linear_i8::{D_OFF, MAX_PANEL, Q_OFF, QBLOCK, QBLOCK_BYTES, S_OFF, SUM_OFF, scale_bytes};
pub use kiln_exec::linear_i8::{LinearI8Fn, LinearI8Spec, QuantizedActivations};

/// Register tiling of a W8A8 kernel; [`LinearI8Tiles::default`] gives the measured defaults,
/// the fields are public for experiments (`examples/i8_timing.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LinearI8Tiles {
    /// Weight rows per tile on the direct path (1..=16).
    pub direct_rows: usize,
    /// Weight rows per tile on the tile path (1..=8).
    pub gemm_rows: usize,
    /// Rows of `x` per tile on the tile path (1..=4).
    pub gemm_xrows: usize,
    /// Take the tile path when `m1 - m0 >= gemm_min_rows` (`usize::MAX`: never).
    pub gemm_min_rows: usize,
}

impl Default for LinearI8Tiles {
    fn default() -> Self {
        LinearI8Tiles { direct_rows: 16, gemm_rows: 4, gemm_xrows: 4, gemm_min_rows: 2 }
    }
}

impl LinearI8Tiles {
    fn validate(&self) -> Result<(), JitError> {
        let ok = (1..=16).contains(&self.direct_rows)
            && (1..=8).contains(&self.gemm_rows)
            && (1..=4).contains(&self.gemm_xrows)
            && self.gemm_min_rows >= 1;
        if ok { Ok(()) } else { Err(JitError::Spec(format!("bad tiles {self:?}"))) }
    }
}

/// A compiled W8A8 linear kernel, owning (a share of) its code.
#[derive(Clone)]
pub struct LinearI8Kernel {
    code: Arc<JitCode>,
    id: FunctionId,
    f: LinearI8Fn,
    spec: LinearI8Spec,
}

impl std::fmt::Debug for LinearI8Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinearI8Kernel").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl LinearI8Kernel {
    /// Compiles `spec` with the default tiles into its own module.
    pub fn compile(isa: &HostIsa, spec: LinearI8Spec) -> Result<LinearI8Kernel, JitError> {
        LinearI8Kernel::compile_with(isa, spec, LinearI8Tiles::default(), false)
    }

    /// Compiles `spec` with explicit tiles, optionally capturing the disassembly.
    pub fn compile_with(
        isa: &HostIsa,
        spec: LinearI8Spec,
        tiles: LinearI8Tiles,
        disasm: bool,
    ) -> Result<LinearI8Kernel, JitError> {
        let mut module = JitModule::new(isa);
        module.set_disasm(disasm);
        let id = emit_linear_i8(&mut module, "linear_i8", &spec, &tiles)?;
        let code = Arc::new(module.finalize()?);
        // SAFETY: `id` was defined by `emit_linear_i8` for `spec` in this module.
        Ok(unsafe { LinearI8Kernel::from_code(code, id, spec) })
    }

    /// Wraps a kernel that [`emit_linear_i8`] defined in a module shared with other functions.
    ///
    /// # Safety
    /// `id` must have been returned by `emit_linear_i8(.., spec, ..)` for the module `code`
    /// was finalized from.
    pub unsafe fn from_code(code: Arc<JitCode>, id: FunctionId, spec: LinearI8Spec) -> LinearI8Kernel {
        // SAFETY: `emit_linear_i8` defines functions with exactly `LinearI8Fn`'s signature.
        let f = unsafe { code.function::<LinearI8Fn>(id) }.get();
        LinearI8Kernel { code, id, f, spec }
    }

    pub fn spec(&self) -> &LinearI8Spec {
        &self.spec
    }

    pub fn stats(&self) -> &FunctionStats {
        self.code.stats(self.id)
    }

    /// The raw entry point; see the module docs for its contract. Valid while `self` (or a
    /// clone) lives.
    pub fn entry(&self) -> LinearI8Fn {
        self.f
    }

    /// Computes rows `rows` of `y` (`[M, N]`) from the quantized `x` (`[M, K]`), checking
    /// every length.
    pub fn run(
        &self,
        xq: &QuantizedActivations,
        w: &[u8],
        bias: Option<&[f32]>,
        residual: Residual<'_>,
        y: &mut [f32],
        rows: Range<usize>,
    ) -> Result<(), JitError> {
        let s = &self.spec;
        let fail = |why: String| Err(JitError::Arguments(why));
        if xq.k() != s.k {
            return fail(format!("quantized x has K = {}, the kernel K = {}", xq.k(), s.k));
        }
        let m = xq.rows();
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
        // SAFETY: all lengths were checked above against the kernel's contract (xq: M rows
        // of K / 32 blocks, w: the stored weight, bias: [N], residual: [M, N] or y itself,
        // y: [M, N], rows within 0..M); `y` is a unique borrow, so nothing else overlaps it.
        unsafe { (self.f)(xq.as_ptr(), w.as_ptr(), bias_ptr, residual_ptr, y.as_mut_ptr(), rows.start, rows.end) };
        Ok(())
    }
}

/// Defines the kernel for `spec` in `module` under `name` and returns its id (signature
/// [`LinearI8Fn`]).
pub fn emit_linear_i8<M: Module>(
    module: &mut CodeModule<M>,
    name: &str,
    spec: &LinearI8Spec,
    tiles: &LinearI8Tiles,
) -> Result<FunctionId, JitError> {
    spec.validate()?;
    tiles.validate()?;
    let ptr = module.pointer_type();
    let sig = module.signature(&[ptr; 7]);
    let e = Emitter { spec: *spec, tiles: *tiles, ptr };
    module.define(name, sig, |b| {
        e.function(b);
        Ok(())
    })
}

/// The kernel's pointer arguments and row range.
#[derive(Clone, Copy)]
struct Args {
    xq: Value,
    w: Value,
    bias: Value,
    residual: Value,
    y: Value,
    m0: Value,
    m1: Value,
}

/// Where the rows of a tile live relative to the pointer at their current block.
#[derive(Clone, Copy)]
enum Layout {
    /// As stored: row `r` at `r * row_bytes`; the block pointer steps by a block.
    Plain,
    /// Packed ([`kiln_exec::linear_i8::pack_weight`]): the tile is consecutive groups of four
    /// rows of a panel of `panel_len` rows, starting at a group; the block pointer steps by
    /// `panel_len` blocks.
    Packed { panel_len: usize },
}

/// The weight rows of one group of (up to) four rows, relative to the block pointer.
enum Group {
    /// Byte offsets of each row's block.
    Plain(Vec<i32>),
    /// The group's scales at `at`, then the quants of its `rows` rows.
    Packed { at: i32, rows: usize },
}

/// One weight-row tile fixed for the `m` loop.
#[derive(Clone, Copy)]
struct NTile {
    /// Row 0 of the tile at block 0.
    w: Value,
    /// Number of weight rows (outputs).
    len: usize,
    layout: Layout,
    /// `bias + n0`, `y + n0`, `residual + n0` (row 0).
    bias: Value,
    y: Value,
    residual: Value,
}

/// A weight row unpacked for one block: the unsigned operands of `vpmaddubsw` (Q4: the low
/// and high nibbles) or, for Q8_0, `|qw|` and the mask `qw < 0` of both halves.
#[derive(Clone, Copy)]
enum WRow {
    Q4 { lo: Value, hi: Value },
    Q8 { abs: [Value; 2], neg: [Value; 2] },
}

struct Emitter {
    spec: LinearI8Spec,
    tiles: LinearI8Tiles,
    ptr: Type,
}

impl Emitter {
    fn x_row_bytes(&self) -> usize {
        self.spec.k / QBLOCK * QBLOCK_BYTES
    }

    fn w_row_bytes(&self) -> i32 {
        (self.spec.k / QBLOCK) as i32 * self.spec.format.block_bytes() as i32
    }

    fn function(&self, b: &mut FunctionBuilder<'_>) {
        let entry = b.create_block();
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let a = Args { xq: p[0], w: p[1], bias: p[2], residual: p[3], y: p[4], m0: p[5], m1: p[6] };

        let work = b.create_block();
        let exit = b.create_block();
        let nonempty = b.ins().icmp(IntCC::UnsignedLessThan, a.m0, a.m1);
        b.ins().brif(nonempty, work, &[], exit, &[]);
        b.switch_to_block(work);

        let t = self.tiles;
        let packed = self.spec.panel > 0;
        if t.gemm_min_rows != usize::MAX {
            let direct = b.create_block();
            let gemm = b.create_block();
            let rows = b.ins().isub(a.m1, a.m0);
            let many = b.ins().icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, rows, t.gemm_min_rows as i64);
            b.ins().brif(many, gemm, &[], direct, &[]);
            b.switch_to_block(gemm);
            match packed {
                true => self.panels(b, &a, t.gemm_rows.div_ceil(4), t.gemm_xrows),
                false => self.n_tiles(b, &a, t.gemm_rows, t.gemm_xrows),
            }
            b.ins().jump(exit, &[]);
            b.switch_to_block(direct);
        }
        match packed {
            // Direct tiles are whole panels.
            true => self.panels(b, &a, MAX_PANEL / 4, 1),
            false => self.n_tiles(b, &a, t.direct_rows, 1),
        }
        b.ins().jump(exit, &[]);

        b.switch_to_block(exit);
        b.ins().return_(&[]);
    }

    /// All `N` outputs in tiles of `len` weight rows (a runtime loop over the full tiles,
    /// then the remainder tile).
    fn n_tiles(&self, b: &mut FunctionBuilder<'_>, a: &Args, len: usize, xrows: usize) {
        let n = self.spec.n;
        let full = n / len;
        if full > 0 {
            let zero = b.ins().iconst(self.ptr, 0);
            counted_loop(b, self.ptr, full, &[(zero, len as i64)], |b, n0| self.n_tile(b, a, n0[0], len, xrows));
        }
        if !n.is_multiple_of(len) {
            let n0 = b.ins().iconst(self.ptr, (full * len) as i64);
            self.n_tile(b, a, n0, n % len, xrows);
        }
    }

    /// All `N` outputs of a packed weight, panel by panel (a runtime loop over the full
    /// panels, then the remainder panel), in tiles of up to `groups` groups of four rows.
    fn panels(&self, b: &mut FunctionBuilder<'_>, a: &Args, groups: usize, xrows: usize) {
        let (n, p) = (self.spec.n, self.spec.panel);
        let full = n / p;
        if full > 0 {
            let zero = b.ins().iconst(self.ptr, 0);
            counted_loop(b, self.ptr, full, &[(zero, p as i64)], |b, n0| self.panel(b, a, n0[0], p, groups, xrows));
        }
        if !n.is_multiple_of(p) {
            let n0 = b.ins().iconst(self.ptr, (full * p) as i64);
            self.panel(b, a, n0, n % p, groups, xrows);
        }
    }

    /// The panel of `len` rows from row `n0` on, in tiles of up to `groups` groups.
    fn panel(&self, b: &mut FunctionBuilder<'_>, a: &Args, n0: Value, len: usize, groups: usize, xrows: usize) {
        let bb = self.spec.format.block_bytes() as i64;
        let w_off = b.ins().imul_imm_u(n0, self.w_row_bytes() as i64);
        let panel_w = b.ins().iadd(a.w, w_off);
        let layout = Layout::Packed { panel_len: len };
        let rows = 4 * groups;
        if len > rows && len.is_multiple_of(rows) {
            // Equal tiles: a loop (the groups before a tile's are full: four rows' blocks each).
            let steps = [(n0, rows as i64), (panel_w, rows as i64 * bb)];
            counted_loop(b, self.ptr, len / rows, &steps, |b, p| self.n_tile_at(b, a, p[0], p[1], rows, layout, xrows));
            return;
        }
        for r0 in (0..len).step_by(rows) {
            let tile_n0 = b.ins().iadd_imm_s(n0, r0 as i64);
            let w = b.ins().iadd_imm_s(panel_w, r0 as i64 * bb);
            self.n_tile_at(b, a, tile_n0, w, (len - r0).min(rows), layout, xrows);
        }
    }

    /// Outputs `n0..n0 + len` for all rows `m0..m1`.
    fn n_tile(&self, b: &mut FunctionBuilder<'_>, a: &Args, n0: Value, len: usize, xrows: usize) {
        let w_off = b.ins().imul_imm_u(n0, self.w_row_bytes() as i64);
        let w = b.ins().iadd(a.w, w_off);
        self.n_tile_at(b, a, n0, w, len, Layout::Plain, xrows);
    }

    /// Outputs `n0..n0 + len` for all rows `m0..m1`, the weight rows at `w` in `layout`.
    #[allow(clippy::too_many_arguments)]
    fn n_tile_at(
        &self,
        b: &mut FunctionBuilder<'_>,
        a: &Args,
        n0: Value,
        w: Value,
        len: usize,
        layout: Layout,
        xrows: usize,
    ) {
        let n0_bytes = b.ins().imul_imm_u(n0, 4);
        let bias = b.ins().iadd(a.bias, n0_bytes);
        let y = b.ins().iadd(a.y, n0_bytes);
        let residual = b.ins().iadd(a.residual, n0_bytes);
        let tile = NTile { w, len, layout, bias, y, residual };

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

    /// The register tile: outputs `n0..n0 + tile.len` of rows `m..m + xrows`.
    fn tile(&self, b: &mut FunctionBuilder<'_>, a: &Args, tile: &NTile, m: Value, xrows: usize) {
        let s = &self.spec;
        let x_off = b.ins().imul_imm_u(m, self.x_row_bytes() as i64);
        let x = b.ins().iadd(a.xq, x_off);
        let y_off = b.ins().imul_imm_u(m, (s.n * 4) as i64);
        let y = b.ins().iadd(tile.y, y_off);
        let residual = b.ins().iadd(tile.residual, y_off);

        let groups = tile.len.div_ceil(4);
        let zero = f32s(b, 0.0);
        // acc[g * xrows + c]: lane r = output (row 4 g + r of the tile, row c of x).
        let acc: Vec<Variable> = (0..groups * xrows)
            .map(|_| {
                let v = b.declare_var(F32X4);
                b.def_var(v, zero);
                v
            })
            .collect();

        // exps[g]: lane-wise maximum of the f16 exponent bits of the group's block scales.
        let zero16 = vconst_bytes(b, I16X8, [0; 16]);
        let exps: Vec<Variable> = (0..groups)
            .map(|_| {
                let v = b.declare_var(I16X8);
                b.def_var(v, zero16);
                v
            })
            .collect();

        let trips = s.k / QBLOCK;
        let bb = s.format.block_bytes() as usize;
        let (w_step, addrs) = match tile.layout {
            Layout::Plain => {
                let ws = self.w_row_bytes();
                let rows = |g: usize| (4 * g..tile.len.min(4 * g + 4)).map(|r| r as i32 * ws).collect();
                (bb, (0..groups).map(|g| Group::Plain(rows(g))).collect::<Vec<_>>())
            }
            Layout::Packed { panel_len } => {
                let group = |g: usize| Group::Packed { at: (4 * g * bb) as i32, rows: (tile.len - 4 * g).min(4) };
                (panel_len * bb, (0..groups).map(group).collect())
            }
        };
        let steps = [(x, QBLOCK_BYTES as i64), (tile.w, w_step as i64)];
        counted_loop(b, self.ptr, trips, &steps, |b, p| self.block(b, p[0], p[1], &addrs, xrows, (&acc, &exps)));
        barrier(b, &acc, F32X4);
        barrier(b, &exps, I16X8);

        // A row with an inf/NaN block scale (exponent bits 0x7C00) gives NaN outputs.
        for (g, &e) in exps.iter().enumerate() {
            let seen = b.use_var(e);
            let special = u16s(b, I16X8, 0x7C00);
            let bad16 = b.ins().icmp(IntCC::Equal, seen, special);
            let bad16 = cast(b, I32X4, bad16);
            let zero = vconst_bytes(b, I32X4, [0; 16]);
            let bad = b.ins().icmp(IntCC::NotEqual, bad16, zero);
            let nan = f32s(b, f32::NAN);
            for c in 0..xrows {
                let a = b.use_var(acc[g * xrows + c]);
                let a = select_lanes(b, bad, nan, a);
                b.def_var(acc[g * xrows + c], a);
            }
        }

        // Epilogue: each accumulator holds four consecutive outputs of one row.
        for c in 0..xrows {
            for g in 0..groups {
                let lanes = (tile.len - 4 * g).min(4);
                let mut out = b.use_var(acc[g * xrows + c]);
                if s.bias {
                    let bv = load_f32_partial(b, ro(), tile.bias, (16 * g) as i32, lanes);
                    out = b.ins().fadd(out, bv);
                }
                out = activation(b, s.activation, out);
                let y_at = ((c * s.n + 4 * g) * 4) as i32;
                if s.residual {
                    let rv = load_f32_partial(b, rw(), residual, y_at, lanes);
                    out = b.ins().fadd(rv, out);
                }
                store_f32_partial(b, out, y, y_at, lanes);
            }
        }
    }

    /// One block of 32 along `K` for the `groups` of the weight tile at `wp` (its current
    /// block) and rows `0..xrows` of `x` at `xp` (block of row 0).
    fn block(
        &self,
        b: &mut FunctionBuilder<'_>,
        xp: Value,
        wp: Value,
        groups: &[Group],
        xrows: usize,
        (acc, exps): (&[Variable], &[Variable]),
    ) {
        let f = self.spec.format;
        let xs = self.x_row_bytes() as i32;
        let mask = match f {
            Format::Q8_0 => vconst_bytes(b, I8X16, [0; 16]),
            _ => vconst_bytes(b, I8X16, [0x0F; 16]),
        };
        // With one row of x its q is loaded once and shared by the rows; with several each
        // use loads it again (folded into `vpmaddubsw` as a memory operand).
        let shared: Option<[Value; 2]> =
            (xrows == 1).then(|| std::array::from_fn(|h| b.ins().load(I8X16, ro(), xp, Q_OFF + 16 * h as i32)));
        let xq = |b: &mut FunctionBuilder<'_>, c: usize, h: usize| match shared {
            Some(v) => v[h],
            None => b.ins().load(I8X16, ro(), xp, c as i32 * xs + Q_OFF + 16 * h as i32),
        };

        // Per row of x: `d` and `s` broadcast, Q4_0's `8 * sum`. With one row of x they are
        // loaded once and shared by the groups; with several, at each use (register pressure).
        let per_x_at = |b: &mut FunctionBuilder<'_>, c: usize| -> (Value, Option<Value>) {
            let xc = c as i32 * xs;
            let dx = b.ins().load(F32, ro(), xp, xc + D_OFF);
            let dx = b.ins().splat(F32X4, dx);
            let extra = match f {
                Format::Q4_1 => {
                    let sx = b.ins().load(F32, ro(), xp, xc + S_OFF);
                    Some(b.ins().splat(F32X4, sx))
                }
                Format::Q4_0 => {
                    let sum = b.ins().load(I32, ro(), xp, xc + SUM_OFF);
                    let sum8 = b.ins().ishl_imm_u(sum, 3);
                    Some(b.ins().splat(I32X4, sum8))
                }
                _ => None,
            };
            (dx, extra)
        };
        let shared_x: Option<(Value, Option<Value>)> = (xrows == 1).then(|| per_x_at(b, 0));
        // Emission order (kept by `opt_level=none`): the scales of every group first (long
        // dependency chains), then the integer dot products, then the float updates, so the
        // out-of-order core finds independent work next to each chain.
        let mut scales = Vec::new();
        for (g, group) in groups.iter().enumerate() {
            let (dw, mw, e) = self.weight_scales(b, wp, group);
            let seen = b.use_var(exps[g]);
            let seen = b.ins().umax(seen, e);
            b.def_var(exps[g], seen);
            scales.push((dw, mw));
        }
        let mut isums: Vec<Vec<Value>> = Vec::new();
        for group in groups {
            let rows = self.quant_offsets(group);
            // t[pair][c]: i32x4 [row a part A, row b part A, row a part B, row b part B]
            // (A + B = the row's dot product).
            let mut t: Vec<Vec<Value>> = Vec::new();
            for pair in [[0usize, 1], [2, 3]] {
                let [ra, rb] = pair.map(|r| r.min(rows.len() - 1));
                if pair[0] >= rows.len() {
                    t.push(t[0].clone()); // no rows 2, 3: duplicate (lanes never stored)
                    continue;
                }
                let wa = self.unpack(b, wp, rows[ra], mask);
                let wb = if rb == ra { None } else { Some(self.unpack(b, wp, rows[rb], mask)) };
                let tc = (0..xrows)
                    .map(|c| {
                        let pa = self.products(b, wa, c, &xq);
                        let pb = match wb {
                            Some(wb) => self.products(b, wb, c, &xq),
                            None => pa,
                        };
                        self.combine_pair(b, pa, pb)
                    })
                    .collect();
                t.push(tc);
            }
            isums.push(
                (0..xrows)
                    .map(|c| {
                        let (t01, t23) = (t[0][c], t[1][c]);
                        let lo = shuffle4(b, t01, t23, [0, 1, 4, 5]);
                        let hi = shuffle4(b, t01, t23, [2, 3, 6, 7]);
                        b.ins().iadd(lo, hi)
                    })
                    .collect(),
            );
        }
        for (g, ((dw, mw), isum)) in scales.into_iter().zip(isums).enumerate() {
            for (c, mut isum) in isum.into_iter().enumerate() {
                let (dx, extra) = match shared_x {
                    Some(v) => v,
                    None => per_x_at(b, c),
                };
                if f == Format::Q4_0 {
                    isum = b.ins().isub(isum, extra.unwrap());
                }
                let fsum = b.ins().fcvt_from_sint(F32X4, isum);
                let scale = b.ins().fmul(dx, dw);
                let a = acc[g * xrows + c];
                let prev = b.use_var(a);
                let mut next = b.ins().fma(scale, fsum, prev);
                if let (Some(mw), Some(sx)) = (mw, extra) {
                    next = b.ins().fma(mw, sx, next); // `mw` dies here, `sx` is shared
                }
                b.def_var(a, next);
            }
        }
    }

    /// The block scales of up to four rows (block at `wp + rows[j]`), widened to f32 (lane
    /// `j` for row `j`): `dw`, `mw` for Q4_1, and the f16 exponent bits of both (`i16x8`; a
    /// lane equals 0x7C00 for an inf/NaN scale) for the caller's sticky check.
    ///
    /// Each row's first 16 bytes are loaded as a vector (the scales are its low dword) and
    /// the four dwords gathered with three unpacks. The widening is
    /// [`crate::emit::f16_to_f32`]'s (mask the sign and exponent/mantissa into an f32 that is
    /// the value times 2^-112, multiply by 2^112), exact for finite scales, without its
    /// inf/NaN fix-up: an inf/NaN scale instead makes the whole output column NaN (see the
    /// module docs), which the caller implements with the exponent bits returned here.
    ///
    /// In the packed layout the four rows' scales are one load (Q4_1: 16 bytes; otherwise 8,
    /// zero-extended to 32-bit lanes); lanes past a short group's rows hold other bytes of
    /// the group, which only reach outputs that are never stored.
    fn weight_scales(&self, b: &mut FunctionBuilder<'_>, wp: Value, group: &Group) -> (Value, Option<Value>, Value) {
        let q4_1 = self.spec.format == Format::Q4_1;
        let v = match group {
            Group::Plain(rows) => {
                let at = |j: usize| rows[j.min(rows.len() - 1)];
                let ld = |b: &mut FunctionBuilder<'_>, j: usize| b.ins().load(I32X4, ro(), wp, at(j));
                let (v0, v1) = (ld(b, 0), ld(b, 1));
                let v01 = shuffle4(b, v0, v1, [0, 4, 1, 5]);
                let (v2, v3) = (ld(b, 2), ld(b, 3));
                let v23 = shuffle4(b, v2, v3, [0, 4, 1, 5]);
                shuffle4(b, v01, v23, [0, 1, 4, 5])
            }
            Group::Packed { at, .. } if q4_1 => b.ins().load(I32X4, ro(), wp, *at),
            Group::Packed { at, .. } => b.ins().uload16x4(ro(), wp, *at),
        };

        let sign_mag = i32s(b, 0x8FFF_E000);
        let pow112 = f32s(b, f32::from_bits((127 + 112) << 23));
        let widen = |b: &mut FunctionBuilder<'_>, t: Value| {
            // `t`: the f16 in bits 31..16, sign-extended 3 bits (sign in 31..28).
            let o = b.ins().band(t, sign_mag);
            let o = cast(b, F32X4, o);
            b.ins().fmul(o, pow112)
        };
        let d_hi = b.ins().ishl_imm_u(v, 16);
        let d_t = b.ins().sshr_imm_u(d_hi, 3);
        let dw = widen(b, d_t);
        let mw = q4_1.then(|| {
            let m_t = b.ins().sshr_imm_u(v, 3);
            widen(b, m_t)
        });
        // Exponent bits of d (low half) and, for Q4_1, m (high half; otherwise the high half
        // holds quants and is masked out).
        let exp_bits = if q4_1 { 0x7C00_7C00 } else { 0x0000_7C00 };
        let exp_mask = i32s(b, exp_bits);
        let e = b.ins().band(v, exp_mask);
        (dw, mw, cast(b, I16X8, e))
    }

    /// Row `c` of x times an unpacked weight row: an i16x8 (Q4: lane sums of four
    /// products) or i32x4 (Q8_0: of eight) whose lanes add up to the block's dot product.
    fn products(
        &self,
        b: &mut FunctionBuilder<'_>,
        w: WRow,
        c: usize,
        xq: &dyn Fn(&mut FunctionBuilder<'_>, usize, usize) -> Value,
    ) -> Value {
        match w {
            WRow::Q4 { lo, hi } => {
                let x0 = xq(b, c, 0);
                let p0 = b.ins().x86_pmaddubsw(x0, lo);
                let x1 = xq(b, c, 1);
                let p1 = b.ins().x86_pmaddubsw(x1, hi);
                b.ins().iadd(p0, p1)
            }
            WRow::Q8 { abs, neg } => {
                let e: [Value; 2] = std::array::from_fn(|h| {
                    // q * sign(qw): (q ^ m) - m with m = (qw < 0 ? -1 : 0).
                    let x = xq(b, c, h);
                    let flip = b.ins().bxor(x, neg[h]);
                    let sx = b.ins().isub(flip, neg[h]);
                    let p = b.ins().x86_pmaddubsw(sx, abs[h]);
                    pairwise_i32(b, p)
                });
                b.ins().iadd(e[0], e[1])
            }
        }
    }

    /// The offsets of the quants of each row of `group` from the block pointer.
    fn quant_offsets(&self, group: &Group) -> Vec<i32> {
        let f = self.spec.format;
        let sb = scale_bytes(f) as i32;
        match group {
            Group::Plain(rows) => rows.iter().map(|r| r + sb).collect(),
            &Group::Packed { at, rows } => {
                let qb = f.block_bytes() as i32 - sb;
                (0..rows as i32).map(|j| at + rows as i32 * sb + j * qb).collect()
            }
        }
    }

    /// Loads and unpacks the weight row whose quants are at `wp + at` for `vpmaddubsw`.
    fn unpack(&self, b: &mut FunctionBuilder<'_>, wp: Value, at: i32, mask: Value) -> WRow {
        match self.spec.format {
            Format::Q8_0 => {
                let half = |b: &mut FunctionBuilder<'_>, h: i32| {
                    // Two loads of the same bytes, each folded into its instruction.
                    let w = b.ins().load(I8X16, ro(), wp, at + 16 * h);
                    let abs = b.ins().iabs(w);
                    let w = b.ins().load(I8X16, ro(), wp, at + 16 * h);
                    let neg = b.ins().icmp(IntCC::SignedLessThan, w, mask);
                    (abs, neg)
                };
                let (a0, n0) = half(b, 0);
                let (a1, n1) = half(b, 1);
                WRow::Q8 { abs: [a0, a1], neg: [n0, n1] }
            }
            _ => {
                let qs = b.ins().load(I8X16, ro(), wp, at);
                let lo = b.ins().band(qs, mask);
                let q16 = cast(b, I16X8, qs);
                let shifted = b.ins().ushr_imm_u(q16, 4);
                let shifted = cast(b, I8X16, shifted);
                let hi = b.ins().band(shifted, mask);
                WRow::Q4 { lo, hi }
            }
        }
    }

    /// Reduces the products of rows a and b (`row_products` of one x row) to an i32x4
    /// `[a part A, b part A, a part B, b part B]` (`A + B` = the row's dot product).
    fn combine_pair(&self, b: &mut FunctionBuilder<'_>, pa: Value, pb: Value) -> Value {
        let lo = shuffle4(b, pa, pb, [0, 4, 1, 5]);
        let hi = shuffle4(b, pa, pb, [2, 6, 3, 7]);
        let s = b.ins().iadd(lo, hi);
        match self.spec.format {
            // i16 lanes of at most 4 * 2 * 3810 = 15240: still exact.
            Format::Q4_0 | Format::Q4_1 => pairwise_i32(b, s),
            _ => s,
        }
    }
}

/// `vpmaddwd` against ones: i32 lane `j` = i16 lanes `2j + 2j+1` of `v`, exactly.
fn pairwise_i32(b: &mut FunctionBuilder<'_>, v: Value) -> Value {
    let lo = b.ins().swiden_low(v);
    let hi = b.ins().swiden_high(v);
    b.ins().iadd_pairwise(lo, hi)
}
