//! The JIT engine, first increment: every `linear` — with the bias, activation and
//! residual add that follow it fused in — runs as a Cranelift kernel specialized to its
//! shape and its weight's *stored* format (no dequantized copy), split across threads by
//! rows. Every other op runs the runtime's reference kernel, so the engine already runs
//! any graph; ops move to emitted kernels one family at a time.
//!
//! A linear whose weight is computed from weights alone (a tensor train's cores rebuilt into
//! `W` by `reshape`, `matmul` and `transpose`, scaled by a `mul`: any op on weights and
//! constants only) runs as an f32 linear like any other: the engine evaluates that weight
//! once, with the reference kernels, when it is built. The chain then runs per call only
//! where some other op or an output reads its values.
//!
//! Linears whose IR attribute says [`Activations::Int8`] (on Q8_0/Q4_0/Q4_1 weights, and
//! kiln's int formats repacked to those) quantize their input rows
//! to int8 per block of 32 and run the integer kernels of [`crate::linear_i8`] (llama.cpp's
//! numerics class); an input shared by several linears (q, k, v) is quantized once (once
//! per row and once per block when it feeds both kinds, under [`Activations::Int8Row`]). Their
//! weights are packed once, when the engine is built, into the panel layout of
//! [`crate::linear_i8::pack_weight`] (a copy as large as the stored weights; the kernels
//! then never touch the stored bytes), which they stream at about twice the bandwidth of
//! the stored layout. Blocks of rows (prefill, encoders) take the 256-bit GEMMs instead:
//! [`crate::gemm_i8`] on the same panels, or for Q8_0 weights [`crate::gemm_q8`] on a
//! second copy in its own layout (so Q8_0 weights take twice their size in memory there).
//!
//! Building an engine has three steps, so that the kernels can also come from an object
//! file compiled ahead of time: `Plan::new` decides the fusion groups and the ordered list
//! of distinct kernel specs; `kiln-jit` defines their functions in a JIT module
//! ([`Engine::with_kernels`]) or an object file (its `emit_object`, with a table of their
//! addresses and [`kernel_specs_text`]); `Kernel::bind` turns entry addresses into kernels,
//! from the JIT's code or from a linked table ([`Engine::with_kernel_table`], which plans
//! again and looks each kernel up by its [`KernelSpec::key`]). This crate has no
//! Cranelift: native executables link it with the object.
//!
//! Outputs are bitwise identical for any thread count and for a sequence alone or inside a
//! batch: the linear kernels compute each output from its row alone in a fixed order (see
//! [`crate::linear`]), and the reference kernels are deterministic.

use crate::ExecError;
use crate::activation::Activation;
use crate::epilogue::EpilogueFn;
use crate::linear::{LinearFn, LinearSpec};
use crate::linear_i8::{LinearI8Fn, LinearI8Spec, MAX_PANEL, QuantizedActivations, pack_weight, quantize_rows};
use crate::linear_i8row::{RowQuantized, RowWeights, quantize_per_row};
use crate::sparse::SparseWeight;
pub use kiln_ir::Activations;
use kiln_ir::{BinaryOp, Format, Graph, NodeId, Op, Role, UnaryOp};
use kiln_rt::eval::{RunError, Snapshot, bind_inputs, decode_weights, eval_node};
use kiln_rt::par::SharedPtr;
use kiln_rt::{KvCache, Pool, Tensor, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A linear layer with its fused epilogue, computed when the engine reaches the node that
/// ends the fusion group.
#[derive(Clone, Debug)]
struct Fused {
    kernel: usize,
    /// For single-row inputs (decode): the output columns split across threads, as
    /// `(first column, kernel over that many columns)`; empty when not split.
    columns: Vec<(usize, usize)>,
    x: NodeId,
    weight: NodeId,
    /// What the kernel reads of the weight.
    data: KernelWeight,
    /// For int8 kernels on Q8_0 weights, when the host runs it: the weight in the layout of
    /// the prefill GEMM [`crate::gemm_q8`].
    gemm_q8: Option<Arc<PackedWeight>>,
    bias: Option<NodeId>,
    residual: Option<NodeId>,
    /// The first half of a low-rank pair ([`Plan::pair`]): a plain f32 linear whose output,
    /// read by nothing else, is this one's `x`. Both run in one pass over blocks of rows,
    /// each block's rank-`r` intermediate staying in cache; `x` is then not a value.
    pre: Option<Box<Fused>>,
    /// A sparse weight's layout for the sparse kernel, which takes calls of up to
    /// [`SPARSE_ROWS`] rows (the f32 GEMM on its dense value takes the others).
    sparse: Option<Arc<SparseWeight>>,
}

/// The weight a linear kernel reads.
#[derive(Clone, Debug)]
enum KernelWeight {
    /// The stored bytes, in the graph's tensor store (for sgemm linears, f32 weights stored
    /// aligned, read in place).
    Stored,
    /// A copy in another layout: an int format repacked as GGUF blocks
    /// ([`crate::repack`]), and for int8 kernels packed into panels
    /// ([`crate::linear_i8::pack_weight`]).
    Owned(Arc<PackedWeight>),
    /// For sgemm linears: the weight as f32.
    Dense(Arc<Value>),
    /// For per-row int8 linears: `i8` rows and their scales.
    Rows(Arc<RowWeights>),
    /// For sgemm linears with a short side ([`short`]): the f32 weight transposed, `[K, N]`,
    /// for [`crate::sgemm_kn`].
    Transposed(Arc<Vec<f32>>),
}

/// Whether an f32 linear of `k` inputs and `n` outputs runs faster on its transposed weight
/// ([`crate::sgemm_kn`]) than on its own ([`crate::sgemm`]): with a short reduction or few
/// outputs, as the second and first halves of low-rank pairs have (`cargo run --release
/// -p kiln-exec --example sgemm_timing`, one thread at 128 rows: `K` = 32..128 by 384
/// outputs 1.04-1.33x, 384 by 96 1.2x; 1536 by 128 0.9x, 160..256 by 1536 0.78-0.86x).
fn short(k: usize, n: usize) -> bool {
    k <= 128 || (n <= 96 && k <= 512)
}

/// Rows per panel of the weights of int8 kernels: the kernels then read their weight
/// strictly sequentially (the stored layout, read 16 rows at a time, streamed at half the
/// bandwidth; `i8_timing --cold`).
pub const I8_PANEL: usize = MAX_PANEL;

/// Bytes of packed weight per unit of work when the pool packs the weights.
const PACK_UNIT_BYTES: usize = 1 << 20;

/// A 64-byte aligned copy of a weight in the packed layout of the int8 kernels.
struct PackedWeight {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// SAFETY: owned memory, written only while uniquely owned (`pack_weights`).
unsafe impl Send for PackedWeight {}
unsafe impl Sync for PackedWeight {}

impl PackedWeight {
    fn layout(len: usize) -> std::alloc::Layout {
        std::alloc::Layout::from_size_align(len.max(1), 64).expect("a weight's size fits a layout")
    }

    /// `len` zeroed bytes: fresh pages from the OS for large weights, first written by the
    /// packing.
    fn zeroed(len: usize) -> PackedWeight {
        // SAFETY: the layout has a nonzero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(PackedWeight::layout(len)) };
        let ptr = std::ptr::NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(Self::layout(len)));
        PackedWeight { ptr, len }
    }

    fn copy_of(bytes: &[u8]) -> PackedWeight {
        let p = PackedWeight::zeroed(bytes.len());
        // SAFETY: `p` owns `len` writable bytes and is not shared yet.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), p.ptr.as_ptr(), bytes.len()) };
        p
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` holds `len` initialized (zeroed, then packed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for PackedWeight {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), PackedWeight::layout(self.len)) }
    }
}

impl std::fmt::Debug for PackedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedWeight({} bytes)", self.len)
    }
}

/// A layout that int8 kernels read a weight in, copied once at engine build.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// The panels of the emitted kernels and [`crate::gemm_i8`]
    /// ([`crate::linear_i8::pack_weight`]; the spec's `panel` is nonzero).
    Panels(LinearI8Spec),
    /// Q8_0 rows interleaved by eight for [`crate::gemm_q8`].
    GemmQ8 { n: usize, k: usize },
}

impl Layout {
    /// Rows of the weight.
    fn rows(self) -> usize {
        match self {
            Layout::Panels(spec) => spec.n,
            Layout::GemmQ8 { n, .. } => n,
        }
    }

    /// Rows that are laid out together: ranges of rows starting at a multiple of this are
    /// packed on their own, into the bytes from [`Layout::bytes`] of the rows before.
    fn group(self) -> usize {
        match self {
            Layout::Panels(spec) => spec.panel,
            Layout::GemmQ8 { .. } => crate::gemm_q8::ROWS,
        }
    }

    /// Bytes of the first `rows` rows in the layout.
    fn bytes(self, rows: usize) -> usize {
        match self {
            Layout::Panels(spec) => LinearI8Spec { n: rows, ..spec }.weight_bytes(),
            Layout::GemmQ8 { k, .. } => crate::gemm_q8::layout_bytes(rows, k),
        }
    }

    /// Packs `rows` stored rows `w` into `out`.
    fn pack(self, rows: usize, w: &[u8], out: &mut [u8]) -> Result<(), ExecError> {
        match self {
            Layout::Panels(spec) => pack_weight(&LinearI8Spec { n: rows, ..spec }, w, out),
            Layout::GemmQ8 { k, .. } => crate::gemm_q8::pack(w, rows, k, out),
        }
    }
}

/// Packs the stored `bytes` of each weight into its layout, all weights at once on the
/// pool, in units of about [`PACK_UNIT_BYTES`] of whole row groups: the time goes mostly
/// into first touches of the fresh pages, which the threads then share.
fn pack_weights(jobs: &[(Layout, &[u8])], pool: &Pool) -> Result<Vec<PackedWeight>, ExecError> {
    let out: Vec<PackedWeight> =
        jobs.iter().map(|(layout, _)| PackedWeight::zeroed(layout.bytes(layout.rows()))).collect();
    // Units of whole row groups: (job, first row, rows).
    let mut units = Vec::new();
    for (j, (layout, w)) in jobs.iter().enumerate() {
        let (n, group) = (layout.rows(), layout.group());
        let groups = (PACK_UNIT_BYTES / (group * w.len() / n.max(1)).max(1)).max(1);
        for r0 in (0..n).step_by(groups * group) {
            units.push((j, r0, (groups * group).min(n - r0)));
        }
    }
    let ptrs: Vec<usize> = out.iter().map(|p| p.ptr.as_ptr() as usize).collect();
    let failed = std::sync::Mutex::new(None);
    pool.for_ranges(units.len(), 1, 2, |part| {
        for &(j, r0, n) in &units[part] {
            let (layout, w) = jobs[j];
            let row = w.len() / layout.rows();
            let (at, len) = (layout.bytes(r0), layout.bytes(r0 + n) - layout.bytes(r0));
            // SAFETY: the units are disjoint ranges of whole row groups, so these parts of the
            // buffers (`layout.bytes(rows)` each, alive until the end of the function) are too.
            let dst = unsafe { std::slice::from_raw_parts_mut((ptrs[j] as *mut u8).add(at), len) };
            if let Err(e) = layout.pack(n, &w[r0 * row..(r0 + n) * row], dst) {
                *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
            }
        }
    });
    match failed.into_inner().unwrap_or_else(|e| e.into_inner()) {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

#[derive(Clone, Debug)]
enum Action {
    /// Computed by a fusion group that ends at a later node.
    Absorbed,
    /// Ends a fusion group: run the linear kernel.
    Linear(Fused),
    /// Run the reference kernel.
    Reference,
    /// A row lookup in a table stored in a block format (an embedding, the tied head's
    /// table): decode only the rows it reads, from the stored bytes.
    GatherRows,
}

/// Rows up to which a linear on a half-sparse weight runs the sparse kernel
/// ([`crate::sparse`]). It does half the products of the dense one, one row at a time; more
/// rows take the f32 GEMM on the weight's dense value, whose blocking reuses each weight
/// across rows.
pub const SPARSE_ROWS: usize = 4;

/// What an [`Engine`] is built with. The activations of each linear are the graph's (its
/// `activations` attribute); to run other ones, set them on the graph first
/// ([`kiln_ir::set_activations`]).
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub threads: usize,
    /// Time every node and keep the totals per kind of work ([`Engine::profile`]).
    pub profile: bool,
}

impl EngineOptions {
    /// `threads` threads, no profiling.
    pub fn threads(threads: usize) -> EngineOptions {
        EngineOptions { threads, profile: false }
    }
}

/// A linear kernel of either activation type, as function pointers into code the engine
/// keeps alive (`Engine::code`).
enum Kernel {
    /// The emitted f32-activation kernel, and for block formats on a host that runs
    /// [`crate::gemm_f32`] the epilogue for it (as for `I8`): blocks of [`GEMM_F32_ROWS`]
    /// rows or more take the 256-bit GEMM, then the epilogue, for the same bits.
    F32(LinearSpec, LinearFn, Option<Option<EpilogueFn>>),
    /// The emitted W8A8 kernel, and when the host runs [`crate::gemm_i8`] the epilogue for
    /// it (`None` inside: the epilogue is the identity): blocks of [`GEMM_I8_ROWS`] rows or
    /// more take the 256-bit GEMM, then the epilogue, for the same bits.
    I8(LinearI8Spec, LinearI8Fn, Option<Option<EpilogueFn>>),
    /// f32 weights: [`crate::sgemm`] (256-bit AVX2, which Cranelift cannot emit; without
    /// AVX2 and FMA, matrixmultiply), then an emitted epilogue kernel for bias, activation
    /// and residual (none if identity).
    Sgemm(LinearSpec, Option<EpilogueFn>),
    /// int8gK weights with per-row int8 activations ([`crate::linear_i8row`]), then the
    /// epilogue.
    I8Row(LinearSpec, Option<EpilogueFn>),
}

impl Kernel {
    fn spec(&self) -> LinearSpec {
        match self {
            Kernel::I8(spec, ..) => spec.linear(),
            Kernel::F32(spec, ..) | Kernel::Sgemm(spec, _) | Kernel::I8Row(spec, _) => *spec,
        }
    }

    /// The kernel for `spec` run as `how` from the entry addresses of its functions (see
    /// [`Engine::with_kernels`]), on a host that runs `host`'s GEMMs.
    ///
    /// # Safety
    /// `linear` and `epilogue` must be the entries of the functions `kiln-jit`'s `emit_kernels` defines
    /// for `(spec, how)` and `host` (of signatures [`LinearFn`] or [`LinearI8Fn`], and
    /// [`EpilogueFn`]), alive as long as the kernel is used.
    unsafe fn bind(
        spec: LinearSpec,
        how: Impl,
        host: Host,
        linear: Option<*const u8>,
        epilogue: Option<*const u8>,
    ) -> Result<Kernel, ExecError> {
        // SAFETY: the caller's: each address is a function of that signature.
        let epilogue = epilogue.map(|e| unsafe { std::mem::transmute::<*const u8, EpilogueFn>(e) });
        let missing = || ExecError::Spec(format!("no kernel function for {spec:?} ({how:?})"));
        let after_gemm = host.gemm(&spec, how).then_some(epilogue);
        Ok(match how {
            Impl::Int8 => {
                let i8spec = LinearI8Spec::from_linear(&spec).ok_or_else(missing)?.packed(I8_PANEL);
                // SAFETY: as above.
                let entry = unsafe { std::mem::transmute::<*const u8, LinearI8Fn>(linear.ok_or_else(missing)?) };
                Kernel::I8(i8spec, entry, after_gemm)
            }
            Impl::Jit => {
                // SAFETY: as above.
                let entry = unsafe { std::mem::transmute::<*const u8, LinearFn>(linear.ok_or_else(missing)?) };
                Kernel::F32(spec, entry, after_gemm)
            }
            Impl::Sgemm => Kernel::Sgemm(spec, epilogue),
            Impl::Int8Row => Kernel::I8Row(spec, epilogue),
        })
    }
}

/// How a planned linear runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Impl {
    /// The emitted f32-activation kernel ([`crate::linear`]).
    Jit,
    /// The emitted int8-activation kernel ([`crate::linear_i8`]) on packed weights.
    Int8,
    /// sgemm on f32 weights, then an emitted epilogue.
    Sgemm,
    /// The per-row int8 GEMM, then an emitted epilogue.
    Int8Row,
}

impl Impl {
    /// The name [`KernelSpec::key`] spells it with: `jit`, `int8`, `sgemm`, `int8row`.
    pub fn name(self) -> &'static str {
        match self {
            Impl::Jit => "jit",
            Impl::Int8 => "int8",
            Impl::Sgemm => "sgemm",
            Impl::Int8Row => "int8row",
        }
    }
}

/// What a run does with the values it computes.
#[derive(Clone, Copy)]
enum Keep<'a> {
    /// Frees each after its last read.
    Nothing,
    /// Keeps them all, for the [`Snapshot`] it returns.
    All,
    /// Keeps them all, and takes from `base` every value not `stale` instead of computing it.
    Reusing { base: &'a Snapshot, stale: &'a std::collections::HashSet<NodeId> },
}

/// A graph compiled for the host: kernels, the fusion plan, and decoded weights for the ops
/// that still run reference kernels.
pub struct Engine<'g> {
    graph: &'g Graph,
    order: Vec<NodeId>,
    actions: HashMap<NodeId, Action>,
    kernels: Vec<Kernel>,
    /// The code the kernels point into (the JIT's), kept alive with the engine.
    _code: Code,
    weights: HashMap<NodeId, Arc<Value>>,
    /// The values each node of `order` reads under the fusion plan.
    reads: Vec<Vec<NodeId>>,
    /// How often each value is read, for freeing it after its last use.
    uses: HashMap<NodeId, usize>,
    pool: Pool,
    compile_time: Duration,
    /// Time and calls per kind of work, when profiling.
    profile: Option<std::sync::Mutex<HashMap<String, (Duration, usize)>>>,
    /// The weights that are factors of a low-rank layer ([`Role::LowRankU`],
    /// [`Role::LowRankV`]): the profile counts their linears apart.
    factors: std::collections::HashSet<NodeId>,
}

/// Rows per thread from which a low-rank pair splits its rows across the threads (each
/// running both halves on its rows) rather than each half's columns.
const PAIR_ROWS: usize = 8;

/// An f32 linear's GEMM ([`crate::sgemm`], or [`crate::sgemm_kn`] on the transposed weight)
/// over the weight the engine holds, `K` inputs and `N` outputs.
#[derive(Clone, Copy)]
struct F32Gemm {
    k: usize,
    n: usize,
    w: SharedPtr<f32>,
    transposed: bool,
}

impl F32Gemm {
    /// Columns a thread's part is a multiple of.
    fn group(&self) -> usize {
        if self.transposed { 8 } else { 3 }
    }

    /// `y[rows, cols] = x W^T` for `x` of rows of `K` and `y` of rows of `N`.
    ///
    /// # Safety
    /// The CPU runs the kernels ([`crate::sgemm::available`]); `x` holds rows
    /// `0..rows.end`, `y` rows `0..rows.end` of which no one else touches `rows x cols`
    /// meanwhile; `cols.end <= N`.
    unsafe fn run(&self, x: *const f32, y: *mut f32, rows: std::ops::Range<usize>, cols: std::ops::Range<usize>) {
        // SAFETY: the caller's; `w` holds the weight (`F32Gemm` is made from its checked
        // length).
        unsafe {
            if self.transposed {
                crate::sgemm_kn::sgemm_kn(self.k, self.n, x, self.w.get(), y, rows, cols)
            } else {
                crate::sgemm::sgemm(self.k, self.n, x, self.w.get(), y, rows, cols)
            }
        }
    }
}

/// What ends the [`Engine::profile`] kind of a linear on a low-rank factor.
pub const FACTOR: &str = " (low-rank factor)";

/// Rows below which a linear kernel runs on the calling thread only.
const MIN_PARALLEL_ROWS: usize = 4;

/// Rows of a block from which W8A8 linears take the 256-bit GEMM ([`crate::gemm_i8`]),
/// which computes the emitted kernel's bits (`i8_timing --panel 16`: 1.1-2.5x its tile path
/// at 128 rows; with four rows per tile, fewer rows would waste most of one).
const GEMM_I8_ROWS: usize = 4;

/// Rows from which f32-activation linears on block formats take the 256-bit GEMM
/// ([`crate::gemm_f32`]), which decodes each weight once per call and computes the emitted
/// kernel's bits.
const GEMM_F32_ROWS: usize = 8;

/// Output columns per thread below which a single-row linear is not split by columns.
const MIN_SPLIT_COLUMNS: usize = 64;

/// Bytes of `x` per kernel call. The kernel streams all its rows of `x` past each tile of
/// weight rows (decoding the tile once per call), so calls over blocks of rows whose `x`
/// fits in L2 keep that stream out of memory while amortizing the decode.
const ROW_BLOCK_BYTES: usize = 256 << 10;

impl<'g> Engine<'g> {
    /// Plans fusion for `options` and builds the engine around the kernels `kernels` gives
    /// for the plan's distinct kernel specs on this host (`kernel_specs[i]` at `entries[i]`),
    /// with the code they live in, which the engine keeps alive. This is how `kiln-jit`
    /// builds an engine on JIT-compiled kernels.
    ///
    /// # Safety
    /// Each entry must be the function(s) [`Impl`] and [`Host::gemm`] call for for its spec
    /// (the linear kernel of signature [`LinearFn`] or [`LinearI8Fn`], and the epilogue after
    /// a GEMM, of signature [`EpilogueFn`], where one is needed and is not the identity),
    /// alive as long as the returned code is.
    pub unsafe fn with_kernels<E: From<ExecError>>(
        graph: &'g Graph,
        options: EngineOptions,
        kernels: impl FnOnce(&[KernelSpec], Host) -> Result<(Vec<KernelEntries>, Code), E>,
    ) -> Result<Engine<'g>, E> {
        let start = Instant::now();
        let order = graph.topo_order().ok_or_else(|| ExecError::Spec("the graph has a cycle".into()))?;
        let plan = Plan::new(graph, &order, options.threads);
        let host = Host::detect();
        let (entries, code) = kernels(&plan.specs, host)?;
        if entries.len() != plan.specs.len() {
            return Err(ExecError::Spec(format!("{} kernels for {} specs", entries.len(), plan.specs.len())).into());
        }
        // SAFETY: the caller's.
        Ok(unsafe { Engine::assemble(graph, options, order, plan, host, &entries, code, start) }?)
    }

    /// An engine whose kernels were compiled ahead of time and linked into this program
    /// (`kiln-jit`'s `emit_object`): the graph is planned again for `options`, and each kernel
    /// the plan needs is looked up by its [`KernelSpec::key`] in `linked`. A kernel missing
    /// there (an object for another model, other activations or another CPU's GEMMs) is an
    /// error. Single rows split their columns into at most as many parts as the object has
    /// kernels for ([`AOT_THREADS`]), whatever the thread count: the parts are the same sums
    /// either way.
    ///
    /// # Safety
    /// `linked` must describe an object `kiln-jit`'s `emit_object` wrote, linked into this program and
    /// run on a CPU with its features, and `code` must keep its functions alive.
    pub unsafe fn with_kernel_table(
        graph: &'g Graph,
        options: EngineOptions,
        linked: &LinkedKernels<'_>,
        code: Code,
    ) -> Result<Engine<'g>, ExecError> {
        let start = Instant::now();
        let order = graph.topo_order().ok_or_else(|| ExecError::Spec("the graph has a cycle".into()))?;
        let parts = options.threads.min(*AOT_THREADS.end());
        let plan = Plan::new(graph, &order, parts);
        let mut lines = linked.specs.lines();
        let other = ExecError::Linked;
        let first = lines.next().unwrap_or_default();
        // The kernels were compiled for the GEMMs of the CPU they target: the engine uses
        // those (a program for an older CPU runs on a newer one), if this CPU runs them.
        let host = Host::from_line(first).ok_or_else(|| other(format!("no host line, `{first}` instead")))?;
        let cpu = lines.next().and_then(|l| l.strip_prefix("cpu")).ok_or_else(|| other("no cpu line".into()))?;
        let lacks = |what: String| {
            other(format!(
                "they were compiled for a CPU with {what}, which this one lacks; compile them for it with --target-cpu native"
            ))
        };
        for feature in cpu.split_whitespace() {
            if !cpu_has(feature) {
                return Err(lacks(feature.to_string()));
            }
        }
        let here = Host::detect();
        if (host.gemm_i8 && !here.gemm_i8) || (host.gemm_f32 && !here.gemm_f32) {
            return Err(lacks("AVX2, FMA and F16C (for the 256-bit GEMMs)".into()));
        }
        let index: HashMap<&str, usize> = lines.enumerate().map(|(i, l)| (l, i)).collect();
        if index.len() != linked.table.len() {
            return Err(other(format!("{} specs for {} kernels", index.len(), linked.table.len())));
        }
        let entries = plan
            .specs
            .iter()
            .map(|s| {
                let key = s.key();
                index.get(key.as_str()).map(|&i| linked.table[i]).ok_or_else(|| other(format!("no kernel for {key}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        // SAFETY: the caller's; each entry is the kernel of its spec.
        unsafe { Engine::assemble(graph, options, order, plan, host, &entries, code, start) }
    }

    /// The engine around kernels whose functions are at `entries` (see [`Kernel::bind`]).
    ///
    /// # Safety
    /// As [`Kernel::bind`], for every kernel of the plan, with `code` keeping them alive.
    #[allow(clippy::too_many_arguments)]
    unsafe fn assemble(
        graph: &'g Graph,
        options: EngineOptions,
        order: Vec<NodeId>,
        plan: Plan,
        host: Host,
        entries: &[KernelEntries],
        code: Code,
        start: Instant,
    ) -> Result<Engine<'g>, ExecError> {
        let EngineOptions { threads, profile, .. } = options;
        let Host { gemm_i8, .. } = host;
        let pool = Pool::new(threads);
        let Plan { mut actions, specs, to_pack, mut dense, folded, row_weights } = plan;
        let compile_time = start.elapsed();
        // Weights in int formats, repacked once as the GGUF blocks their kernels read.
        // On the pool: a budget search builds an engine per probe, and repacking a whole
        // model's weights one after the other took a third of a second.
        let mut to_repack: Vec<(NodeId, Format, &[u8])> = Vec::new();
        for action in actions.values() {
            let Action::Linear(f) = action else { continue };
            if folded.binary_search(&f.weight).is_ok() || is_sparse(graph, f.weight) {
                continue; // an f32 value, computed below
            }
            let stored = stored_weight(graph, f.weight)?;
            let repacked = match stored.format {
                Format::Int(_) => true,
                Format::Fp8(fp8) => fp8.group != 32,
                _ => false,
            };
            if repacked
                && !to_repack.iter().any(|(n, ..)| *n == f.weight)
                && !row_weights.iter().any(|(n, ..)| *n == f.weight)
            {
                to_repack.push((f.weight, stored.format, stored.bytes.as_slice()));
            }
        }
        to_repack.sort_by_key(|(n, ..)| *n);
        let repacked: Vec<std::sync::Mutex<Option<PackedWeight>>> =
            to_repack.iter().map(|_| std::sync::Mutex::new(None)).collect();
        pool.for_ranges(to_repack.len(), 1, 2, |part| {
            for i in part {
                let packed = match to_repack[i] {
                    (_, Format::Int(int), bytes) => crate::repack::repack(int, bytes),
                    (_, Format::Fp8(fp8), bytes) => crate::repack::fp8_blocks(fp8, bytes),
                    _ => unreachable!("only int and fp8 weights are repacked"),
                };
                let packed = PackedWeight::copy_of(&packed);
                *repacked[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(packed);
            }
        });
        let mut owned: HashMap<NodeId, Arc<PackedWeight>> = HashMap::new();
        for ((node, ..), packed) in to_repack.iter().zip(repacked) {
            let packed = packed.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every part ran");
            owned.insert(*node, Arc::new(packed));
        }
        let mut jobs = Vec::new();
        for (&node, spec) in &to_pack {
            jobs.push((node, *spec));
        }
        let mut layouts: Vec<(NodeId, Layout, &[u8])> = Vec::new();
        for (node, spec) in jobs {
            let bytes = match owned.get(&node) {
                Some(p) => p.bytes(),
                None => stored_weight(graph, node)?.bytes.as_slice(),
            };
            if bytes.len() != spec.weight_bytes() {
                return Err(ExecError::Spec(format!("{spec:?}: the weight has {} bytes", bytes.len())));
            }
            layouts.push((node, Layout::Panels(spec), bytes));
            // Q8_0 weights also in the layout of their prefill GEMM.
            if gemm_i8 && spec.format == Format::Q8_0 {
                layouts.push((node, Layout::GemmQ8 { n: spec.n, k: spec.k }, bytes));
            }
        }
        let jobs: Vec<(Layout, &[u8])> = layouts.iter().map(|&(_, layout, bytes)| (layout, bytes)).collect();
        let packed = pack_weights(&jobs, &pool)?;
        // The packed panels replace the repacked blocks they were made from.
        let targets: Vec<(NodeId, bool)> =
            layouts.iter().map(|(node, layout, _)| (*node, matches!(layout, Layout::GemmQ8 { .. }))).collect();
        let mut q8_layouts: HashMap<NodeId, Arc<PackedWeight>> = HashMap::new();
        for ((node, q8), p) in targets.into_iter().zip(packed) {
            if q8 {
                q8_layouts.insert(node, Arc::new(p))
            } else {
                owned.insert(node, Arc::new(p))
            };
        }
        dense.sort();
        dense.dedup();
        // f32 weights stored aligned are read in place (an artifact's mapping, a native
        // program's data): decoding would copy them, most of a small model's start-up.
        let mut in_place = Vec::new();
        for &node in &dense {
            if !is_sparse(graph, node) && stored_f32(stored_weight(graph, node)?).is_some() {
                in_place.push(node);
            }
        }
        dense.retain(|n| !in_place.contains(n));
        let mut dense = decode_weights(graph, &dense).map_err(|e| ExecError::Spec(e.to_string()))?;
        // Weights computed from weights (a tensor train's chain): evaluated once, here, and
        // read by their linears as dense f32 weights.
        dense.extend(fold_weights(graph, &order, &folded)?);
        let mut rows: HashMap<NodeId, Arc<RowWeights>> = HashMap::new();
        for &(node, n, k) in &row_weights {
            if let std::collections::hash_map::Entry::Vacant(e) = rows.entry(node) {
                let stored = stored_weight(graph, node)?;
                let Format::Int(f) = stored.format else { unreachable!("planned for int8gK weights") };
                e.insert(Arc::new(RowWeights::from_int8(f, stored.bytes.as_slice(), n, k)?));
            }
        }
        // f32 linears with a short side take the GEMM on the transposed weight (a copy).
        let mut transposed: HashMap<NodeId, Arc<Vec<f32>>> = HashMap::new();
        let mut fill = |f: &mut Fused| -> Result<(), ExecError> {
            f.data = match (owned.get(&f.weight), dense.get(&f.weight), rows.get(&f.weight)) {
                (_, _, Some(r)) => KernelWeight::Rows(r.clone()),
                (Some(p), ..) => KernelWeight::Owned(p.clone()),
                (None, Some(d), _) => KernelWeight::Dense(d.clone()),
                (None, None, None) => KernelWeight::Stored,
            };
            f.gemm_q8 = q8_layouts.get(&f.weight).cloned();
            let LinearSpec { k, n, .. } = specs[f.kernel].linear;
            if specs[f.kernel].how != Impl::Sgemm || !crate::sgemm_kn::available() || !short(k, n) {
                return Ok(());
            }
            let w = match &f.data {
                KernelWeight::Dense(w) => w.as_f32().map(|t| &t.data[..]),
                KernelWeight::Stored => stored_f32(stored_weight(graph, f.weight)?),
                _ => None,
            };
            if let Some(w) = w.filter(|w| w.len() == n * k) {
                let wt = transposed.entry(f.weight).or_insert_with(|| Arc::new(crate::sgemm_kn::transpose(k, n, w)));
                f.data = KernelWeight::Transposed(wt.clone());
            }
            Ok(())
        };
        // Half-sparse weights laid out for the sparse kernel, once per weight node.
        let mut layouts: HashMap<NodeId, Arc<SparseWeight>> = HashMap::new();
        for action in actions.values_mut() {
            let Action::Linear(f) = action else { continue };
            let Op::Weight(w) = &graph.node(f.weight).op else { continue };
            let Some(sp) = &w.sparse else { continue };
            let shape = graph.node(f.weight).ty.known_shape().unwrap_or_default();
            let &[n, k] = &shape[..] else { continue };
            if !SparseWeight::fits(sp.n, sp.m, k) {
                continue;
            }
            if let Some(l) = layouts.get(&f.weight) {
                f.sparse = Some(l.clone());
                continue;
            }
            let values =
                graph.store.get(&w.tensor).ok_or_else(|| ExecError::Spec(format!("no tensor `{}`", w.tensor)))?;
            let mask = graph.store.get(&sp.mask).ok_or_else(|| ExecError::Spec(format!("no mask `{}`", sp.mask)))?;
            let layout = SparseWeight::new(sp.n, sp.m, n as usize, k as usize, values, mask.bytes.as_slice())
                .map_err(|e| ExecError::Spec(format!("weight `{}`: {e}", w.tensor)))?;
            let layout = Arc::new(layout);
            layouts.insert(f.weight, layout.clone());
            f.sparse = Some(layout);
        }
        for action in actions.values_mut() {
            if let Action::Linear(f) = action {
                fill(f)?;
                if let Some(pre) = &mut f.pre {
                    fill(pre)?;
                }
            }
        }
        let kernels = entries
            .iter()
            .zip(specs)
            .map(|(&(linear, epilogue), KernelSpec { linear: spec, how })| {
                // SAFETY: the caller's: these are the functions of `(spec, how)` for `host`.
                unsafe { Kernel::bind(spec, how, host, linear, epilogue) }
            })
            .collect::<Result<_, _>>()?;
        let mut engine = Engine {
            graph,
            order,
            actions,
            kernels,
            _code: code,
            weights: HashMap::new(),
            reads: vec![],
            uses: HashMap::new(),
            pool,
            compile_time,
            profile: profile.then(Default::default),
            factors: graph
                .layers
                .iter()
                .flat_map(|(_, l)| l.role(Role::LowRankU).chain(l.role(Role::LowRankV)))
                .collect(),
        };
        engine.reads = engine.order.iter().map(|&n| reads_of(graph, &engine.actions, n)).collect();
        engine.uses = engine.use_counts();
        // Weights that some value reads (not only linear kernels, which read stored bytes).
        let needed: Vec<NodeId> = engine
            .order
            .iter()
            .copied()
            .filter(|&n| matches!(graph.node(n).op, Op::Weight(_)) && engine.uses.get(&n).is_some_and(|&u| u > 0))
            .collect();
        engine.weights = decode_weights(graph, &needed).map_err(|e| ExecError::Spec(e.to_string()))?;
        Ok(engine)
    }

    /// The graph the engine runs.
    pub fn graph(&self) -> &'g Graph {
        self.graph
    }

    /// Time spent planning and compiling (not decoding weights).
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    /// Time and calls per kind of work (each linear shape and format, each other op) since
    /// the engine was built, most time first; empty unless built with `profile`. The kinds
    /// of the linears of low-rank factors end in [`FACTOR`].
    pub fn profile(&self) -> Vec<(String, Duration, usize)> {
        let Some(p) = &self.profile else { return vec![] };
        let p = p.lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = p.iter().map(|(k, (t, n))| (k.clone(), *t, *n)).collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.1));
        rows
    }

    /// Number of weights held decoded to f32 (read by reference kernels); linears and row
    /// lookups read the others in their stored format.
    pub fn decoded_weights(&self) -> usize {
        self.weights.len()
    }

    /// Number of distinct compiled linear kernels.
    pub fn kernel_count(&self) -> usize {
        self.kernels.len()
    }

    /// Number of linear layers that run as compiled kernels.
    pub fn compiled_linears(&self) -> usize {
        self.actions.values().filter(|a| matches!(a, Action::Linear(_))).count()
    }

    /// Number of linears on half-sparse weights, which run the sparse kernel for up to
    /// [`SPARSE_ROWS`] rows.
    pub fn sparse_linears(&self) -> usize {
        self.actions.values().filter(|a| matches!(a, Action::Linear(f) if f.sparse.is_some())).count()
    }

    fn use_counts(&self) -> HashMap<NodeId, usize> {
        let mut uses: HashMap<NodeId, usize> = HashMap::new();
        for &o in self.reads.iter().flatten() {
            *uses.entry(o).or_default() += 1;
        }
        for (_, o) in self.graph.outputs() {
            *uses.entry(*o).or_default() += 1;
        }
        uses
    }

    /// Runs the graph on named inputs; returns every output by name, in declaration order.
    pub fn run(&self, inputs: &HashMap<String, Value>) -> Result<Vec<(String, Value)>, RunError> {
        self.run_with(inputs, None)
    }

    /// Runs the graph over new tokens of the sequences held in `cache` (see
    /// [`kiln_rt::cache`]), and adds them to it.
    pub fn run_cached(
        &self,
        inputs: &HashMap<String, Value>,
        cache: &mut KvCache,
    ) -> Result<Vec<(String, Value)>, RunError> {
        cache.step(|cache| self.run_with(inputs, Some(cache)))
    }

    /// Runs the graph as [`Engine::run`] does, keeping every value it computes: the
    /// [`Snapshot`] that [`Engine::rerun`] starts from.
    pub fn run_keeping(&self, inputs: &HashMap<String, Value>) -> Result<(Vec<(String, Value)>, Snapshot), RunError> {
        kiln_rt::par::with_pool(&self.pool, || self.run_on_pool(inputs, None, Keep::All))
    }

    /// Runs the graph on the inputs `base` was taken on, by an engine on a graph that
    /// differs from this one only in the values of the weights `changed`: the values that
    /// do not depend on them come from `base`, the others are computed. The outputs are
    /// those of [`Engine::run`], bit for bit. This is how a search that changes a few
    /// layers at a time (healing's probes) pays only for what comes after them.
    pub fn rerun(
        &self,
        inputs: &HashMap<String, Value>,
        base: &Snapshot,
        changed: &[NodeId],
    ) -> Result<(Vec<(String, Value)>, Snapshot), RunError> {
        let g = self.graph;
        // A value is stale when any operand in the graph is: that covers the operands a
        // fused linear reads through the nodes it absorbed.
        let mut stale: std::collections::HashSet<NodeId> = changed.iter().copied().collect();
        for &id in &self.order {
            if g.operands(id).iter().any(|o| stale.contains(o)) {
                stale.insert(id);
            }
        }
        let keep = Keep::Reusing { base, stale: &stale };
        kiln_rt::par::with_pool(&self.pool, || self.run_on_pool(inputs, None, keep))
    }

    fn run_with(
        &self,
        inputs: &HashMap<String, Value>,
        cache: Option<&mut KvCache>,
    ) -> Result<Vec<(String, Value)>, RunError> {
        // The reference kernels share the pool's threads with the compiled ones.
        kiln_rt::par::with_pool(&self.pool, || self.run_on_pool(inputs, cache, Keep::Nothing).map(|(out, _)| out))
    }

    /// One run, keeping its values as `keep` says (an empty [`Snapshot`] with
    /// [`Keep::Nothing`]).
    fn run_on_pool(
        &self,
        inputs: &HashMap<String, Value>,
        mut cache: Option<&mut KvCache>,
        keep: Keep<'_>,
    ) -> Result<(Vec<(String, Value)>, Snapshot), RunError> {
        let g = self.graph;
        let symbols = bind_inputs(g, inputs)?;
        let mut uses = self.uses.clone();
        let mut values: HashMap<NodeId, Arc<Value>> = HashMap::new();
        let mut computed = 0;
        // Int8 activations of values that int8 kernels read, quantized once per value and
        // kind (per row or not): a value may feed per-row and per-block linears alike.
        let mut quantized: HashMap<(NodeId, bool), Quantized> = HashMap::new();
        for (&id, reads) in self.order.iter().zip(&self.reads) {
            let node = g.node(id);
            let fail = |message: String| RunError::Node { op: node.op.name(), scope: node.scope.clone(), message };
            let action = self.actions.get(&id).unwrap_or(&Action::Reference);
            if let Keep::Reusing { base, stale } = keep
                && !stale.contains(&id)
                && let Some(v) = base.values.get(&id)
            {
                values.insert(id, v.clone());
                continue;
            }
            let started = self.profile.as_ref().map(|_| Instant::now());
            let value = match (action, &node.op) {
                (Action::Absorbed, _) => continue,
                (_, Op::Input { name }) => Arc::new(inputs[name].clone()),
                (_, Op::Weight(_)) => match self.weights.get(&id) {
                    Some(w) => w.clone(),
                    None => continue, // read only by compiled kernels, in its stored format
                },
                (Action::Linear(f), _) => Arc::new(self.linear(f, &values, &mut quantized).map_err(fail)?),
                (Action::GatherRows, _) => {
                    let ids = values.get(&reads[0]).ok_or_else(|| fail("operand not computed".into()))?;
                    Arc::new(
                        gather_rows(stored_weight(g, g.operands(id)[0]).map_err(|e| fail(e.to_string()))?, ids)
                            .map_err(fail)?,
                    )
                }
                // The last read of a value no one else holds: reshape its buffer, no copy.
                (Action::Reference, Op::Reshape { shape }) if uses[&reads[0]] == 1 && matches!(keep, Keep::Nothing) => {
                    let x = values.remove(&reads[0]).ok_or_else(|| fail("operand not computed".into()))?;
                    let x = Arc::try_unwrap(x).unwrap_or_else(|shared| Value::clone(&shared));
                    Arc::new(kiln_rt::eval::reshape_owned(x, shape, &symbols).map_err(fail)?)
                }
                (Action::Reference, op) => {
                    let args: Vec<Arc<Value>> = reads.iter().map(|o| values[o].clone()).collect();
                    Arc::new(eval_node(id, op, &args, &symbols, cache.as_deref_mut()).map_err(fail)?)
                }
            };
            if let (Some(profile), Some(started)) = (&self.profile, started) {
                let kind = match action {
                    Action::Linear(f) => {
                        let spec = self.kernels[f.kernel].spec();
                        let (format, x) = match self.kernels[f.kernel] {
                            Kernel::I8(..) => (spec.format.to_string(), " (int8 x)"),
                            Kernel::I8Row(..) => (format!("int8g{}", spec.k), " (int8 x per row)"),
                            _ => (spec.format.to_string(), ""),
                        };
                        let factor = if self.factors.contains(&f.weight) { FACTOR } else { "" };
                        let rows = values.get(&f.x).and_then(|x| x.as_f32()).map_or(0, |x| x.numel()) / spec.k.max(1);
                        let (format, x) = match (&f.sparse, is_sparse(g, f.weight)) {
                            (Some(_), _) if rows <= SPARSE_ROWS => ("half-sparse".to_string(), " (sparse kernel)"),
                            (_, true) => ("sparse".to_string(), " (dense value)"),
                            _ => (format, x),
                        };
                        match &f.pre {
                            Some(first) => {
                                let first = self.kernels[first.kernel].spec();
                                format!("linear pair {}x{}x{} {format}{x}{factor}", first.k, first.n, spec.n)
                            }
                            None => format!("linear {}x{} {format}{x}{factor}", spec.k, spec.n),
                        }
                    }
                    _ => node.op.name().to_string(),
                };
                let mut p = profile.lock().unwrap_or_else(|e| e.into_inner());
                let entry = p.entry(kind).or_default();
                entry.0 += started.elapsed();
                entry.1 += 1;
            }
            for o in reads {
                let left = uses.get_mut(o).expect("counted in use_counts");
                *left -= 1;
                if *left == 0 {
                    if matches!(keep, Keep::Nothing) {
                        values.remove(o);
                    }
                    quantized.remove(&(*o, false));
                    quantized.remove(&(*o, true));
                }
            }
            values.insert(id, value);
            computed += 1;
        }
        let outputs = g.outputs().iter().map(|(name, id)| (name.clone(), Value::clone(&values[id]))).collect();
        let values = if matches!(keep, Keep::Nothing) { HashMap::new() } else { values };
        let snapshot = Snapshot { values, computed };
        Ok((outputs, snapshot))
    }

    fn linear(
        &self,
        f: &Fused,
        values: &HashMap<NodeId, Arc<Value>>,
        quantized: &mut HashMap<(NodeId, bool), Quantized>,
    ) -> Result<Value, String> {
        if let Some(first) = &f.pre {
            return self.pair(first, f, values);
        }
        let kernel = &self.kernels[f.kernel];
        let spec = kernel.spec();
        let x = values[&f.x].as_f32().ok_or("the input of a linear must be f32")?;
        let m = x.numel() / spec.k;
        let mut shape = x.shape.clone();
        *shape.last_mut().ok_or("the input of a linear must have rank >= 1")? = spec.n;
        // The stored weight, for the kernels that read it (a folded weight has none).
        let weight = || stored_weight(self.graph, f.weight).map_err(|e| e.to_string());
        let f32_of = |id: NodeId| values[&id].as_f32().map(|t| t.data.as_ptr()).ok_or("bias and residual must be f32");
        let bias = f.bias.map(f32_of).transpose()?.unwrap_or(std::ptr::null());
        let residual = f.residual.map(f32_of).transpose()?.unwrap_or(std::ptr::null());
        let mut y = vec![0f32; m * spec.n];
        if let (Kernel::Sgemm(_, epilogue), Some(w)) = (kernel, &f.sparse)
            && m <= SPARSE_ROWS
        {
            if x.data.len() < m * w.k || w.n != spec.n {
                return Err(format!("the sparse linear {}x{} has {} inputs", w.k, w.n, x.data.len()));
            }
            let (xp, out) = (SharedPtr::of(x.data.as_ptr()), SharedPtr(y.as_mut_ptr()));
            self.columns(w.n, 8, |cols| {
                // SAFETY: x holds [m, K] values (checked above), y is [m, N]; the column
                // parts are disjoint; the bias is the epilogue's.
                unsafe { w.run(xp.get(), m, out.get(), std::ptr::null(), cols) }
            });
            // SAFETY: y is [m, N]; bias and residual are the spec's (the plan checked them).
            unsafe { self.epilogue_rows(*epilogue, m, y.as_mut_ptr(), bias, residual) };
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        if let Kernel::Sgemm(_, epilogue) = kernel
            && crate::sgemm::available()
        {
            let (k, n) = (spec.k, spec.n);
            if x.data.len() < m * k {
                return Err(format!("the sgemm linear {k}x{n} has {} inputs", x.data.len()));
            }
            let (xp, out) = (SharedPtr::of(x.data.as_ptr()), SharedPtr(y.as_mut_ptr()));
            let gemm = self.f32_gemm(f)?;
            self.columns(n, gemm.group(), |cols| {
                // SAFETY: x holds [m, K] values (checked above), y is [m, N]; the column
                // parts are disjoint.
                unsafe { gemm.run(xp.get(), out.get(), 0..m, cols) }
            });
            // SAFETY: y is [m, N]; bias and residual are the spec's (the plan checked them).
            unsafe { self.epilogue_rows(*epilogue, m, y.as_mut_ptr(), bias, residual) };
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        if let Kernel::Sgemm(_, epilogue) = kernel {
            let w: &[f32] = match &f.data {
                KernelWeight::Dense(w) => &w.as_f32().ok_or("the weight of an sgemm linear is not f32")?.data,
                KernelWeight::Stored => {
                    stored_f32(weight()?).ok_or("the weight of an sgemm linear is not stored f32")?
                }
                _ => return Err("the weight of an sgemm linear is not decoded".into()),
            };
            let (k, n) = (spec.k, spec.n);
            if w.len() < n * k || x.data.len() < m * k {
                return Err(format!("the sgemm linear {k}x{n} has {} weights and {} inputs", w.len(), x.data.len()));
            }
            // Without AVX2 and FMA. One call: it splits the rows across the pool (`run_with`
            // runs under `par::with_pool`), one sgemm per part, whose sums do not depend on
            // the split.
            kiln_rt::kernels::linear_rows(&x.data, k, w, n, None, &mut y);
            // SAFETY: y is [m, N]; bias and residual are the spec's (the plan checked them).
            unsafe { self.epilogue_rows(*epilogue, m, y.as_mut_ptr(), bias, residual) };
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        if let Kernel::I8Row(_, epilogue) = kernel {
            let KernelWeight::Rows(w) = &f.data else {
                return Err("the weight of a per-row int8 linear is not prepared".into());
            };
            let Quantized::Rows(xq) = quantized.entry((f.x, true)).or_insert_with(|| {
                let mut q = RowQuantized::new();
                quantize_per_row(&x.data, spec.k, &mut q);
                Quantized::Rows(q)
            }) else {
                return Err("the input of a per-row int8 linear was quantized per block".into());
            };
            let out = SharedPtr(y.as_mut_ptr());
            let epilogue = *epilogue;
            let (bias, residual) = (SharedPtr::of(bias), SharedPtr::of(residual));
            if m < MIN_PARALLEL_ROWS * self.pool.threads() {
                // Few rows: split the columns, then the epilogue.
                self.columns(spec.n, 4, |cols| {
                    // SAFETY: y is [m, N]; the column parts are disjoint.
                    unsafe { w.gemm_unchecked(xq, out.get(), 0..m, cols) }
                });
                // SAFETY: y is [m, N], bias [N] and the residual [m, N] when the spec has them.
                unsafe { self.epilogue_rows(epilogue, m, y.as_mut_ptr(), bias.get(), residual.get()) };
            } else {
                self.pool.for_ranges(m, 1, MIN_PARALLEL_ROWS, |rows| {
                    // SAFETY: as above; the row parts are disjoint.
                    unsafe {
                        w.gemm_unchecked(xq, out.get(), rows.clone(), 0..spec.n);
                        if let Some(epilogue) = epilogue {
                            epilogue(out.get(), bias.get(), residual.get(), rows.start, rows.end);
                        }
                    }
                });
            }
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        if let (Kernel::F32(_, _, Some(epilogue)), true) = (kernel, m >= GEMM_F32_ROWS) {
            let w = match &f.data {
                KernelWeight::Owned(p) => p.bytes(),
                _ => weight()?.bytes.as_slice(),
            };
            let (xp, wp, out) = (SharedPtr::of(x.data.as_ptr()), SharedPtr::of(w.as_ptr()), SharedPtr(y.as_mut_ptr()));
            let (k, n, format) = (spec.k, spec.n, spec.format);
            self.columns(n, 4, |cols| {
                // SAFETY: x is [m, K], the weight [N, K] in `format` (its stored or repacked
                // bytes, `K % 32 == 0` for block formats), y [m, N]; the column parts are
                // disjoint; the host runs `gemm_f32` (the kernel has an epilogue only then).
                unsafe { crate::gemm_f32::gemm_f32(format, k, n, xp.get(), wp.get(), out.get(), 0..m, cols) }
            });
            // SAFETY: y is [m, N], bias [N] and the residual [m, N] when the spec has them.
            unsafe { self.epilogue_rows(*epilogue, m, y.as_mut_ptr(), bias, residual) };
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        let x_ptr = match kernel {
            Kernel::Sgemm(..) | Kernel::I8Row(..) => unreachable!("handled above"),
            Kernel::F32(..) => x.data.as_ptr().cast::<u8>(),
            Kernel::I8(..) => {
                let q = quantized.entry((f.x, false)).or_insert_with(|| {
                    let mut q = QuantizedActivations::new();
                    quantize_rows(&x.data, spec.k, &mut q);
                    Quantized::Blocks(q)
                });
                match q {
                    Quantized::Blocks(q) => q.as_ptr(),
                    Quantized::Rows(_) => return Err("the input of an int8 linear was quantized per row".into()),
                }
            }
        };
        let w = match &f.data {
            KernelWeight::Owned(p) => p.bytes().as_ptr(),
            _ => weight()?.bytes.as_slice().as_ptr(),
        };
        let wq8 = f.gemm_q8.as_ref().map_or(std::ptr::null(), |p| p.bytes().as_ptr());
        let args = KernelArgs { x: x_ptr, w, wq8, bias, residual, y: y.as_mut_ptr() };
        if m == 1 && !f.columns.is_empty() {
            // Rows of the format the kernel reads (a repacked int format's is not the stored one).
            let row_bytes = spec.format.byte_len(spec.k as u64).map_err(|e| e.to_string())? as usize;
            self.pool.for_ranges(f.columns.len(), 1, 0, |parts| {
                for &(n0, k) in &f.columns[parts] {
                    // SAFETY: as below, for the kernel over columns `n0..n0 + len` of the one
                    // row: the weight rows from `n0` on hold `len` rows of `row_bytes` (packed:
                    // `n0` is at a panel, and the packed rows from there are the packed weight
                    // of those rows alone, see `pack_weight`), and
                    // bias, residual and y are offset to column `n0` (with a single row, the
                    // row stride never applies); the column parts are disjoint.
                    unsafe { args.offset_columns(n0, row_bytes).call(&self.kernels[k], 0..1) }
                }
            });
            return Ok(Value::F32(Tensor::new(shape, y)));
        }
        let block = (ROW_BLOCK_BYTES / (4 * spec.k)).max(8);
        self.pool.for_ranges(m, 1, MIN_PARALLEL_ROWS, |rows| {
            // SAFETY: the plan checked the shapes against the spec: x is [m, K] f32 (int8
            // kernels: its quantized rows), the weight holds N*K values in the spec's format
            // (int8 kernels: packed for the spec's panels), bias (if the spec has one) is
            // [N], residual (if any) is [m, N] and distinct from y, y is [m, N]; the row
            // ranges of `for_ranges` are disjoint, so no two calls write the same output.
            for start in rows.clone().step_by(block) {
                unsafe { args.call(kernel, start..(start + block).min(rows.end)) }
            }
        });
        Ok(Value::F32(Tensor::new(shape, y)))
    }

    /// Runs `gemm` on parts of `0..n` (whole groups of `group` columns) across the pool:
    /// the split of the Rust GEMMs, where each thread reads only its columns' weights.
    /// The GEMM of an f32 (sgemm) linear on its weight as the engine holds it.
    fn f32_gemm(&self, f: &Fused) -> Result<F32Gemm, String> {
        let LinearSpec { k, n, .. } = self.kernels[f.kernel].spec();
        let (w, transposed): (&[f32], bool) = match &f.data {
            KernelWeight::Transposed(wt) => (wt, true),
            KernelWeight::Dense(w) => (&w.as_f32().ok_or("the weight of an sgemm linear is not f32")?.data, false),
            KernelWeight::Stored => {
                let stored = stored_weight(self.graph, f.weight).map_err(|e| e.to_string())?;
                (stored_f32(stored).ok_or("the weight of an sgemm linear is not stored f32")?, false)
            }
            _ => return Err("the weight of an sgemm linear is not decoded".into()),
        };
        if w.len() != n * k {
            return Err(format!("the sgemm linear {k}x{n} has {} weights", w.len()));
        }
        Ok(F32Gemm { k, n, w: SharedPtr::of(w.as_ptr()), transposed })
    }

    /// A low-rank pair ([`Plan::pair`]): `first`'s output `t` (`r` wide) feeds `second`,
    /// whose epilogue follows. Blocks of rows go to the threads, each computing its rows'
    /// `t` into a buffer of its own, then their outputs; a few rows (decode) run each half
    /// split by columns instead.
    fn pair(&self, first: &Fused, second: &Fused, values: &HashMap<NodeId, Arc<Value>>) -> Result<Value, String> {
        let (a, b) = (self.f32_gemm(first)?, self.f32_gemm(second)?);
        let Kernel::Sgemm(_, epilogue) = self.kernels[second.kernel] else {
            return Err("a low-rank pair runs on sgemm kernels".into());
        };
        let x = values[&first.x].as_f32().ok_or("the input of a linear must be f32")?;
        let (k, r, n) = (a.k, a.n, b.n);
        if b.k != r || x.data.len() % k != 0 {
            return Err(format!("a low-rank pair {k}x{r}, {}x{n} on {} inputs", b.k, x.data.len()));
        }
        let m = x.data.len() / k;
        let mut shape = x.shape.clone();
        *shape.last_mut().ok_or("the input of a linear must have rank >= 1")? = n;
        let f32_of = |id: NodeId| values[&id].as_f32().map(|t| t.data.as_ptr()).ok_or("bias and residual must be f32");
        let bias = SharedPtr::of(second.bias.map(f32_of).transpose()?.unwrap_or(std::ptr::null()));
        let residual = SharedPtr::of(second.residual.map(f32_of).transpose()?.unwrap_or(std::ptr::null()));
        let mut y = vec![0f32; m * n];
        let (xp, out) = (SharedPtr::of(x.data.as_ptr()), SharedPtr(y.as_mut_ptr()));
        if m < PAIR_ROWS * self.pool.threads() {
            let mut t = vec![0f32; m * r];
            let tp = SharedPtr(t.as_mut_ptr());
            // SAFETY: x is [m, K], t [m, r], y [m, N]; the column parts are disjoint.
            self.columns(r, a.group(), |cols| unsafe { a.run(xp.get(), tp.get(), 0..m, cols) });
            let tp = SharedPtr::of(t.as_ptr());
            self.columns(n, b.group(), |cols| unsafe { b.run(tp.get(), out.get(), 0..m, cols) });
            // SAFETY: y is [m, N]; bias and residual are the spec's (the plan checked them).
            unsafe { self.epilogue_rows(epilogue, m, y.as_mut_ptr(), bias.get(), residual.get()) };
        } else {
            self.pool.for_ranges(m, 1, 2, |rows| {
                let mut t = vec![0f32; rows.len() * r];
                // SAFETY: the rows are this part's alone: x's rows are read, t is the
                // part's own, y's rows are written by this part only; the epilogue's
                // contract as in `epilogue_rows`.
                unsafe {
                    a.run(xp.get().add(rows.start * k), t.as_mut_ptr(), 0..rows.len(), 0..r);
                    b.run(t.as_ptr(), out.get().add(rows.start * n), 0..rows.len(), 0..n);
                    if let Some(epilogue) = epilogue {
                        epilogue(out.get(), bias.get(), residual.get(), rows.start, rows.end);
                    }
                }
            });
        }
        Ok(Value::F32(Tensor::new(shape, y)))
    }

    fn columns(&self, n: usize, group: usize, gemm: impl Fn(std::ops::Range<usize>) + Sync) {
        self.pool.for_ranges(n.div_ceil(group), 1, 2, |part| gemm(group * part.start..(group * part.end).min(n)));
    }

    /// Runs `epilogue` (if any) on the `m` rows of `y`, split across the pool.
    ///
    /// # Safety
    /// `y` is `[m, N]` for the epilogue's `N`, which no one else uses meanwhile; `bias` is
    /// `[N]` and `residual` `[m, N]` (distinct from `y`) where the epilogue has them.
    unsafe fn epilogue_rows(
        &self,
        epilogue: Option<EpilogueFn>,
        m: usize,
        y: *mut f32,
        bias: *const f32,
        residual: *const f32,
    ) {
        let Some(epilogue) = epilogue else { return };
        let (y, bias, residual) = (SharedPtr(y), SharedPtr::of(bias), SharedPtr::of(residual));
        self.pool.for_ranges(m, 1, MIN_PARALLEL_ROWS, |rows| {
            // SAFETY: the caller's; the row parts are disjoint.
            unsafe { epilogue(y.get(), bias.get(), residual.get(), rows.start, rows.end) }
        });
    }
}

/// The int8 activations of a value, as the int8 linears reading it need them.
enum Quantized {
    Blocks(QuantizedActivations),
    Rows(RowQuantized),
}

/// The pointers of one kernel call, shared by the threads that split its rows. `x` is f32
/// rows for f32 kernels and quantized rows for int8 kernels.
#[derive(Clone, Copy)]
struct KernelArgs {
    x: *const u8,
    w: *const u8,
    /// The weight in [`crate::gemm_q8`]'s layout, or null.
    wq8: *const u8,
    bias: *const f32,
    residual: *const f32,
    y: *mut f32,
}

impl KernelArgs {
    /// The arguments for the outputs from column `n0` on (weight rows of `row_bytes`), for
    /// single rows (the GEMM's layout is not offset: it is dropped). Null bias or residual
    /// pointers stay null.
    fn offset_columns(self, n0: usize, row_bytes: usize) -> KernelArgs {
        let f = |p: *const f32| if p.is_null() { p } else { p.wrapping_add(n0) };
        KernelArgs {
            x: self.x,
            w: self.w.wrapping_add(n0 * row_bytes),
            wq8: std::ptr::null(),
            bias: f(self.bias),
            residual: f(self.residual),
            y: self.y.wrapping_add(n0),
        }
    }

    /// # Safety
    /// The pointers must satisfy the contract of `kernel` for rows `rows`.
    unsafe fn call(&self, kernel: &Kernel, rows: std::ops::Range<usize>) {
        let (w, b, r, y, m0, m1) = (self.w, self.bias, self.residual, self.y, rows.start, rows.end);
        // SAFETY: forwarded from the caller.
        unsafe {
            match kernel {
                Kernel::F32(_, entry, _) => entry(self.x.cast(), w, b, r, y, m0, m1),
                Kernel::I8(spec, _, Some(epilogue)) if m1 - m0 >= GEMM_I8_ROWS => {
                    match self.wq8.is_null() {
                        true => crate::gemm_i8::gemm_i8(spec, self.x.cast(), w, y, m0, m1),
                        false => crate::gemm_q8::gemm_q8(spec.n, spec.k, self.x.cast(), self.wq8, y, m0, m1),
                    }
                    if let Some(epilogue) = epilogue {
                        epilogue(y, b, r, m0, m1);
                    }
                }
                Kernel::I8(_, entry, _) => entry(self.x, w, b, r, y, m0, m1),
                Kernel::Sgemm(..) | Kernel::I8Row(..) => unreachable!("these linears do not run through KernelArgs"),
            }
        }
    }
}

// SAFETY: the pointers are only dereferenced by kernel calls over disjoint output rows
// while the buffers they point into are borrowed by `Engine::linear`.
unsafe impl Send for KernelArgs {}
unsafe impl Sync for KernelArgs {}

/// The fusion plan of a graph: what each node does, and the distinct kernels the linears
/// run, which the JIT compiles and object files hold in this order.
struct Plan {
    actions: HashMap<NodeId, Action>,
    /// Distinct kernels: the spec, and how it runs.
    specs: Vec<KernelSpec>,
    /// The weights of int8 kernels, packed once per weight node.
    to_pack: HashMap<NodeId, LinearI8Spec>,
    /// The weights of sgemm linears, read as f32.
    dense: Vec<NodeId>,
    /// The weight-only values that sgemm linears read as their weight ([`weight_only`]),
    /// evaluated once at build ([`fold_weights`]).
    folded: Vec<NodeId>,
    /// The weights of per-row int8 linears: node, N, K.
    row_weights: Vec<(NodeId, usize, usize)>,
}

impl Plan {
    /// Plans `graph` (nodes in topological `order`), each linear taking the activations of
    /// its attribute, with single-row linears split by columns across `threads`.
    fn new(graph: &Graph, order: &[NodeId], threads: usize) -> Plan {
        let mut to_pack: HashMap<NodeId, LinearI8Spec> = HashMap::new();
        let mut dense: Vec<NodeId> = Vec::new();
        let mut folded: Vec<NodeId> = Vec::new();
        let weight_only = weight_only(graph, order);
        let mut row_weights: Vec<(NodeId, usize, usize)> = Vec::new();
        let mut specs: Vec<KernelSpec> = Vec::new();
        let mut actions: HashMap<NodeId, Action> = HashMap::new();
        for &id in order {
            let Some((spec, fused, end, absorbed)) = plan_linear(graph, id, &actions, &weight_only) else { continue };
            // A folded weight is f32.
            let stored = match &graph.node(fused.weight).op {
                Op::Weight(w) => w.format,
                _ => Format::F32,
            };
            let Op::Linear { activations: mode } = graph.node(id).op else { unreachable!("plan_linear takes linears") };
            // The verifier holds every linear to this rule (the attribute is what it gives);
            // applied again, an unverified graph never reaches a kernel that cannot read its
            // weight.
            let mode = mode.for_weight(stored, spec.k as u64);
            let rows = mode == Activations::Int8Row;
            let int8 = mode == Activations::Int8;
            debug_assert!(!rows || matches!(stored, Format::Int(f) if RowWeights::supports(f, spec.k)));
            debug_assert!(!int8 || LinearI8Spec::supports(spec.format));
            let how = match spec.format {
                _ if rows => Impl::Int8Row,
                _ if int8 => Impl::Int8,
                Format::F32 => Impl::Sgemm,
                _ => Impl::Jit,
            };
            let mut kernel_for = |linear: LinearSpec| {
                let spec = KernelSpec { linear, how };
                match specs.iter().position(|s| *s == spec) {
                    Some(k) => k,
                    None => {
                        specs.push(spec);
                        specs.len() - 1
                    }
                }
            };
            let kernel = kernel_for(spec);
            let mut columns = Vec::new();
            if how != Impl::Sgemm && how != Impl::Int8Row && threads > 1 && spec.n >= threads * MIN_SPLIT_COLUMNS {
                // Int8 kernels' column parts start at a panel (their packed weight's rows).
                for part in kiln_rt::split(spec.n, threads, if int8 { I8_PANEL } else { 8 }) {
                    columns.push((part.start, kernel_for(LinearSpec { n: part.len(), ..spec })));
                }
            }
            if int8 && let Some(i8spec) = LinearI8Spec::from_linear(&spec) {
                to_pack.entry(fused.weight).or_insert(i8spec.packed(I8_PANEL));
            }
            if how == Impl::Sgemm {
                match graph.node(fused.weight).op {
                    Op::Weight(_) => dense.push(fused.weight),
                    _ => folded.push(fused.weight),
                }
            }
            if how == Impl::Int8Row {
                row_weights.push((fused.weight, spec.n, spec.k));
            }
            for a in absorbed {
                actions.insert(a, Action::Absorbed);
            }
            actions.insert(end, Action::Linear(Fused { kernel, columns, ..fused }));
        }
        Plan::pair(graph, order, &specs, &mut actions);
        // Row lookups read the stored rows: the table is never decoded whole (SmolLM2's
        // would take 113 MB as f32; MiniLM's f32 one, copied, 47 MB).
        for &id in order {
            let node = graph.node(id);
            if node.op != Op::Gather || actions.contains_key(&id) {
                continue;
            }
            if let Ok(t) = stored_weight(graph, graph.operands(id)[0])
                && t.shape.len() == 2
                && t.format.byte_len(t.shape[1]).is_ok()
            {
                actions.insert(id, Action::GatherRows);
            }
        }
        // The weight-only values no run reads (the chains that only folded weights read):
        // never computed per run. Those that other ops or outputs read run as before.
        let mut read: HashSet<NodeId> = graph.outputs().iter().map(|(_, o)| *o).collect();
        for &id in order.iter().rev() {
            if weight_only.contains(&id) && !read.contains(&id) {
                if !matches!(graph.node(id).op, Op::Weight(_)) {
                    actions.insert(id, Action::Absorbed);
                }
                continue;
            }
            read.extend(reads_of(graph, &actions, id));
        }
        folded.sort();
        folded.dedup();
        Plan { actions, specs, to_pack, dense, folded, row_weights }
    }
}

impl Plan {
    /// Joins low-rank pairs: an f32 linear whose input is the output of another f32 linear
    /// with no epilogue, read by nothing else (the halves `x V^T`, then `U`, that
    /// `factorize` writes), takes that one as its [`Fused::pre`]. Both kernels stay in the
    /// plan's specs.
    fn pair(graph: &Graph, order: &[NodeId], specs: &[KernelSpec], actions: &mut HashMap<NodeId, Action>) {
        if !crate::sgemm::available() {
            return;
        }
        let plain_f32 = |f: &Fused| specs[f.kernel].how == Impl::Sgemm && !is_sparse(graph, f.weight);
        for &id in order {
            let Some(Action::Linear(second)) = actions.get(&id) else { continue };
            let first_id = second.x;
            let Some(Action::Linear(first)) = actions.get(&first_id) else { continue };
            let spec = specs[first.kernel].linear;
            let alone = graph.users(first_id).len() == 1 && !graph.outputs().iter().any(|(_, o)| *o == first_id);
            let plain = !spec.bias && !spec.residual && spec.activation == crate::Activation::None;
            if !(plain_f32(first) && plain_f32(second) && alone && plain && first.pre.is_none()) {
                continue;
            }
            let first = first.clone();
            actions.insert(first_id, Action::Absorbed);
            if let Some(Action::Linear(second)) = actions.get_mut(&id) {
                second.pre = Some(Box::new(first));
            }
        }
    }
}

/// Thread counts an object file has kernels for (see [`object_specs`]).
pub const AOT_THREADS: std::ops::RangeInclusive<usize> = 1..=8;

/// The distinct kernel specs of the engines for `graphs` (their linears' activations) on every thread
/// count in [`AOT_THREADS`] (single rows split their columns by thread count; engines on
/// more threads split them as for the largest): what an object file compiled ahead of time
/// holds (`kiln-jit`'s `emit_object`).
pub fn object_specs(graphs: &[&Graph]) -> Result<Vec<KernelSpec>, ExecError> {
    let mut specs: Vec<KernelSpec> = Vec::new();
    for graph in graphs {
        let order = graph.topo_order().ok_or_else(|| ExecError::Spec("the graph has a cycle".into()))?;
        for threads in AOT_THREADS {
            for spec in Plan::new(graph, &order, threads).specs {
                if !specs.contains(&spec) {
                    specs.push(spec);
                }
            }
        }
    }
    Ok(specs)
}

/// The text an object file holds beside its kernel table, which
/// [`Engine::with_kernel_table`] reads: a line naming `host`'s GEMMs, a line `cpu F1 F2 ...`
/// naming the CPU features the code may use (Cranelift's names, e.g. `sse41 avx2 fma`),
/// then a line per kernel of `specs`, in the table's order: its [`KernelSpec::key`].
pub fn kernel_specs_text(host: Host, cpu: &[String], specs: &[KernelSpec]) -> String {
    let head = [host.line(), format!("cpu {}", cpu.join(" ")).trim_end().to_string()];
    head.into_iter().chain(specs.iter().map(KernelSpec::key)).collect::<Vec<_>>().join("\n")
}

/// Whether this CPU has the feature Cranelift names `name` (false for a name this build
/// does not know: code that may use it cannot be vouched for).
fn cpu_has(name: &str) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        match name {
            "sse3" => has!("sse3"),
            "ssse3" => has!("ssse3"),
            "cmpxchg16b" => has!("cmpxchg16b"),
            "sse41" => has!("sse4.1"),
            "sse42" => has!("sse4.2"),
            "popcnt" => has!("popcnt"),
            "avx" => has!("avx"),
            "avx2" => has!("avx2"),
            "fma" => has!("fma"),
            "bmi1" => has!("bmi1"),
            "bmi2" => has!("bmi2"),
            "lzcnt" => has!("lzcnt"),
            "avx512f" => has!("avx512f"),
            "avx512vl" => has!("avx512vl"),
            "avx512dq" => has!("avx512dq"),
            "avx512vbmi" => has!("avx512vbmi"),
            "avx512bitalg" => has!("avx512bitalg"),
            "avx512vnni" => has!("avx512vnni"),
            "avx_vnni" => has!("avxvnni"),
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = name;
        false
    }
}

/// The kernels of an object file compiled ahead of time (`kiln-jit`'s `emit_object`), as
/// linked into this program.
pub struct LinkedKernels<'a> {
    /// Its `{prefix}kernel_specs` text.
    pub specs: &'a str,
    /// Its `{prefix}kernels` table, a pair of entry addresses per kernel.
    pub table: &'a [KernelEntries],
}

/// What the host runs besides emitted code, which decides the functions a kernel needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Host {
    /// [`crate::gemm_i8`]: int8 kernels also need their epilogue, for after the GEMM.
    pub gemm_i8: bool,
    /// [`crate::gemm_f32`]: f32-activation kernels on block formats too.
    pub gemm_f32: bool,
}

impl Host {
    /// What this CPU runs.
    pub fn detect() -> Host {
        Host { gemm_i8: crate::gemm_i8::available(), gemm_f32: crate::gemm_f32::available() }
    }

    /// What a CPU with these features runs (code compiled ahead of time for it): the
    /// 256-bit GEMMs need AVX2 and FMA (and F16C, which every such x86 CPU has).
    pub fn for_features(avx2: bool, fma: bool) -> Host {
        let gemm = cfg!(target_arch = "x86_64") && avx2 && fma;
        Host { gemm_i8: gemm, gemm_f32: gemm }
    }

    /// How an object's spec list names the host's GEMMs: `host gemm_i8=B gemm_f32=B`.
    pub fn line(self) -> String {
        format!("host gemm_i8={} gemm_f32={}", self.gemm_i8, self.gemm_f32)
    }

    /// The host a [`Host::line`] names.
    pub fn from_line(line: &str) -> Option<Host> {
        let rest = line.strip_prefix("host gemm_i8=")?;
        let (i8, f32) = rest.split_once(" gemm_f32=")?;
        Some(Host { gemm_i8: i8.parse().ok()?, gemm_f32: f32.parse().ok()? })
    }

    /// Whether a Rust GEMM computes the kernel's sums (for some rows at least), which its
    /// emitted epilogue then completes: always for sgemm and per-row int8, and where this
    /// host runs the 256-bit GEMMs for the emitted kernels.
    pub fn gemm(self, spec: &LinearSpec, how: Impl) -> bool {
        match how {
            Impl::Int8 => self.gemm_i8,
            Impl::Jit => self.gemm_f32 && crate::gemm_f32::supports(spec.format),
            Impl::Sgemm | Impl::Int8Row => true,
        }
    }
}

/// The entry addresses of a kernel's functions: the linear kernel, and the epilogue after
/// a GEMM (see [`Engine::with_kernels`]).
pub type KernelEntries = (Option<*const u8>, Option<*const u8>);

/// A distinct kernel of a plan: the linear layer's spec, and how it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelSpec {
    pub linear: LinearSpec,
    pub how: Impl,
}

impl KernelSpec {
    /// The kernel's name in an object's spec list ([`kernel_specs_text`]), by which
    /// [`Engine::with_kernel_table`] looks it up: every field, spelled by name, in this
    /// order, e.g. `linear k=1536 n=576 format=q4_1 bias=true activation=gelu residual=false
    /// impl=jit`. Formats are named as in the IR text ([`Format::name`]), activations by
    /// [`Activation::name`], `impl` by [`Impl::name`]; each of these names one value only, so
    /// distinct specs have distinct keys. The key is part of the object format: it does not
    /// follow `Debug`, and a field added to the spec fails to compile here until it is named.
    pub fn key(&self) -> String {
        let KernelSpec { linear: LinearSpec { k, n, format, bias, activation, residual }, how } = *self;
        let (format, activation, how) = (format.name(), activation.name(), how.name());
        format!("linear k={k} n={n} format={format} bias={bias} activation={activation} residual={residual} impl={how}")
    }
}

/// The code kernels live in, kept alive by the engines on them.
pub type Code = Arc<dyn std::any::Any + Send + Sync>;

/// If `id` is a linear the kernels support, its spec, its operands, the node that ends its
/// fusion group, and the nodes absorbed into it (the linear itself, and an activation
/// before the end).
///
/// The weight operand is a `weight` node, or a weight-only value computed from weights
/// ([`weight_only`]; a tensor train's chain), which the engine folds to a dense f32 weight at
/// build: such a linear is an f32 one. A linear that is itself weight-only is part of such a
/// chain, not a layer: it is not planned.
fn plan_linear(
    g: &Graph,
    id: NodeId,
    claimed: &HashMap<NodeId, Action>,
    weight_only: &HashSet<NodeId>,
) -> Option<(LinearSpec, Fused, NodeId, Vec<NodeId>)> {
    if !matches!(g.node(id).op, Op::Linear { .. }) || weight_only.contains(&id) {
        return None;
    }
    let operands = g.operands(id);
    let (x, weight) = (*operands.first()?, *operands.get(1)?);
    let shape = &g.node(weight).ty.shape;
    let (k, n) = match shape[..] {
        [ref n, ref k] => (k.known()? as usize, n.known()? as usize),
        _ => return None,
    };
    let format = match &g.node(weight).op {
        Op::Weight(w) => {
            // A sparse weight runs as an f32 linear on its dense value (decoded at build),
            // and half-sparse ones take the sparse kernel for few rows.
            if w.sparse.is_some() {
                Format::F32
            } else if !k.is_multiple_of(w.format.block_len() as usize) {
                return None;
            } else {
                match w.format {
                    Format::Int(int) => crate::repack::kernel_format(int),
                    // fp8 runs in groups of 32 (repacked at build: the group's scale in each block).
                    Format::Fp8(_) => Format::Fp8(kiln_ir::Fp8Format { group: 32 }),
                    f => f,
                }
            }
        }
        _ if weight_only.contains(&weight) && g.node(weight).ty.dtype == kiln_ir::DType::F32 => Format::F32,
        _ => return None,
    };
    let mut spec = LinearSpec::new(k, n, format);
    spec.bias = operands.len() > 2;
    let mut fused = Fused {
        kernel: 0,
        columns: vec![],
        x,
        weight,
        data: KernelWeight::Stored,
        gemm_q8: None,
        bias: operands.get(2).copied(),
        residual: None,
        pre: None,
        sparse: None,
    };
    let is_output = |n: NodeId| g.outputs().iter().any(|(_, o)| *o == n);
    let single_user = |n: NodeId| match g.users(n).as_slice() {
        [u] if !is_output(n) && g.operands(*u).iter().filter(|&&o| o == n).count() == 1 => Some(*u),
        _ => None,
    };
    let (mut end, mut absorbed) = (id, vec![]);
    if let Some(u) = single_user(end) {
        let act = match g.node(u).op {
            Op::Unary(UnaryOp::Gelu) => Some(Activation::Gelu),
            Op::Unary(UnaryOp::Silu) => Some(Activation::Silu),
            Op::Unary(UnaryOp::Relu) => Some(Activation::Relu),
            _ => None,
        };
        if let Some(act) = act {
            spec.activation = act;
            absorbed.push(end);
            end = u;
        }
    }
    // The residual add, unless another group has it, or will: of two linears added
    // together (a layer and its low-rank correction), the larger one takes the add.
    let weight_len = |l: NodeId| {
        g.operands(l).get(1).map_or(0, |&w| g.node(w).ty.shape.iter().filter_map(|d| d.known()).product::<u64>())
    };
    if let Some(add) = single_user(end)
        && g.node(add).op == Op::Binary(BinaryOp::Add)
        && !claimed.contains_key(&add)
    {
        let other = g.operands(add).into_iter().find(|&o| o != end)?;
        let larger_linear = matches!(g.node(other).op, Op::Linear { .. }) && weight_len(other) > weight_len(id);
        if !larger_linear && g.node(other).ty == g.node(add).ty && g.node(end).ty == g.node(add).ty {
            spec.residual = true;
            fused.residual = Some(other);
            absorbed.push(end);
            end = add;
        }
    }
    Some((spec, fused, end, absorbed))
}

/// `table[ids]` for a `[rows, width]` table in a block format: each row read is decoded
/// from its bytes, exactly as [`Format::dequantize`] decodes the whole table.
fn gather_rows(table: &kiln_ir::TensorData, ids: &Value) -> Result<Value, String> {
    let Value::I64 { shape, data } = ids else {
        return Err("ids must be i64".into());
    };
    let (rows, width) = match table.shape[..] {
        [rows, width] => (rows, width),
        _ => return Err(format!("the table is not [rows, width]: {:?}", table.shape)),
    };
    let row_bytes = table.format.byte_len(width).map_err(|e| e.to_string())? as usize;
    let mut out = Vec::with_capacity(data.len() * width as usize);
    for &i in data {
        if i < 0 || i as u64 >= rows {
            return Err(format!("id {i} is outside the table's {rows} rows"));
        }
        let at = i as usize * row_bytes;
        let row = table.bytes.as_slice().get(at..at + row_bytes).ok_or("the table's bytes end early")?;
        out.extend(table.format.dequantize(row, width).map_err(|e| e.to_string())?);
    }
    let mut shape = shape.clone();
    shape.push(width as usize);
    Ok(Value::F32(Tensor::new(shape, out)))
}

/// A stored f32 tensor's values in place, when its bytes are aligned for `f32` (and the
/// host is little-endian, as the stored bytes are).
fn stored_f32(t: &kiln_ir::TensorData) -> Option<&[f32]> {
    let bytes = t.bytes.as_slice();
    let aligned = bytes.as_ptr().align_offset(std::mem::align_of::<f32>()) == 0 && bytes.len().is_multiple_of(4);
    (t.format == Format::F32 && aligned && cfg!(target_endian = "little")).then(|| {
        // SAFETY: aligned, `len / 4` whole f32s of initialized bytes, any bit pattern is an
        // f32, and the slice borrows `t`.
        unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<f32>(), bytes.len() / 4) }
    })
}

/// The stored tensor of dense weight node `id` (a sparse weight has no one tensor that holds
/// its value).
fn stored_weight(g: &Graph, id: NodeId) -> Result<&kiln_ir::TensorData, ExecError> {
    let Op::Weight(w) = &g.node(id).op else {
        return Err(ExecError::Spec("a linear's weight is not a weight node".into()));
    };
    if w.sparse.is_some() {
        return Err(ExecError::Spec(format!("weight `{}` is sparse: it runs on its dense value", w.tensor)));
    }
    g.store.get(&w.tensor).ok_or_else(|| ExecError::Spec(format!("weight `{}` is not bound", w.tensor)))
}

/// The values node `id` reads under the fusion plan `actions` (a linear's weight is not
/// one: its kernel reads the weight the engine holds).
fn reads_of(g: &Graph, actions: &HashMap<NodeId, Action>, id: NodeId) -> Vec<NodeId> {
    match actions.get(&id).unwrap_or(&Action::Reference) {
        Action::Absorbed => vec![],
        Action::Linear(f) => {
            let x = f.pre.as_ref().map_or(f.x, |p| p.x);
            [Some(x), f.bias, f.residual].into_iter().flatten().collect()
        }
        Action::GatherRows => vec![g.operands(id)[1]],
        // The weight's dense value too, for batches of more than SPARSE_ROWS rows.
        Action::Reference => match g.node(id).op {
            Op::Weight(_) | Op::Input { .. } => vec![],
            _ => g.operands(id),
        },
    }
}

/// Whether `id` is a sparse weight node.
fn is_sparse(g: &Graph, id: NodeId) -> bool {
    matches!(&g.node(id).op, Op::Weight(w) if w.sparse.is_some())
}

/// The nodes of `order` (topological) whose value depends on weights alone: `weight` and
/// `const` nodes, and every other op (not an `input`) all of whose operands are weight-only.
fn weight_only(g: &Graph, order: &[NodeId]) -> HashSet<NodeId> {
    let mut set = HashSet::new();
    for &id in order {
        let yes = match g.node(id).op {
            Op::Weight(_) | Op::Const { .. } => true,
            Op::Input { .. } => false,
            _ => {
                let operands = g.operands(id);
                !operands.is_empty() && operands.iter().all(|o| set.contains(o))
            }
        };
        if yes {
            set.insert(id);
        }
    }
    set
}

/// The values of the weight-only nodes `targets` ([`weight_only`]), evaluated once with the
/// reference kernels from the decoded weights they depend on: the dense f32 weights of the
/// linears that read them. A value that does not evaluate, or is not an f32 matrix, is an
/// error naming its node.
fn fold_weights(g: &Graph, order: &[NodeId], targets: &[NodeId]) -> Result<HashMap<NodeId, Arc<Value>>, ExecError> {
    if targets.is_empty() {
        return Ok(HashMap::new());
    }
    // Named as the verifier and the printed IR number nodes: by position in `order`.
    let name = |id: NodeId| {
        let node = g.node(id);
        let number = order.iter().position(|&n| n == id).unwrap_or(usize::MAX);
        let scope = if node.scope.is_empty() { String::new() } else { format!(" @{}", node.scope) };
        format!("%{number} ({}{scope})", node.op.name())
    };
    // The nodes the targets depend on, and how often each is read among them.
    let mut needed: HashSet<NodeId> = targets.iter().copied().collect();
    let mut uses: HashMap<NodeId, usize> = HashMap::new();
    for &id in order.iter().rev() {
        if needed.contains(&id) && !matches!(g.node(id).op, Op::Weight(_)) {
            for o in g.operands(id) {
                needed.insert(o);
                *uses.entry(o).or_default() += 1;
            }
        }
    }
    let leaves: Vec<NodeId> =
        order.iter().copied().filter(|n| needed.contains(n) && matches!(g.node(*n).op, Op::Weight(_))).collect();
    let mut values = decode_weights(g, &leaves).map_err(|e| ExecError::Spec(format!("folding weights: {e}")))?;
    let symbols = kiln_rt::eval::Symbols::default();
    let mut folded = HashMap::new();
    for &id in order {
        if !needed.contains(&id) || matches!(g.node(id).op, Op::Weight(_)) {
            continue;
        }
        let node = g.node(id);
        if matches!(node.op, Op::Input { .. }) {
            return Err(ExecError::Spec(format!("folding {}: it reads an input", name(id))));
        }
        let operands = g.operands(id);
        let mut args = Vec::with_capacity(operands.len());
        for o in &operands {
            let v =
                values.get(o).ok_or_else(|| ExecError::Spec(format!("folding {}: operand not computed", name(id))))?;
            args.push(v.clone());
        }
        let value = kiln_rt::eval::eval_reference(&node.op, &args, &symbols)
            .map_err(|e| ExecError::Spec(format!("folding {}: {e}", name(id))))?;
        drop(args);
        for o in operands {
            if let Some(left) = uses.get_mut(&o) {
                *left -= 1;
                if *left == 0 {
                    values.remove(&o);
                }
            }
        }
        let value = Arc::new(value);
        if targets.contains(&id) {
            let matrix = match (value.as_f32(), &node.ty.known_shape()) {
                (Some(t), Some(shape)) if shape.len() == 2 => {
                    let want: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
                    t.shape == want && t.data.len() == want.iter().product::<usize>()
                }
                _ => false,
            };
            if !matrix {
                return Err(ExecError::Spec(format!(
                    "folding {}: the value is {}{:?}, not the f32 matrix {} a linear reads",
                    name(id),
                    value.dtype(),
                    value.shape(),
                    node.ty
                )));
            }
            folded.insert(id, value.clone());
        }
        values.insert(id, value);
    }
    Ok(folded)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight computed from weights is planned as an f32 linear's folded weight, its chain
    /// never runs per call, and a chain that does not evaluate is an error naming its node.
    #[test]
    fn weights_computed_from_weights_are_folded_or_named_in_errors() {
        let text = "graph g {
  %0 = input \"x\" : f32[m, 6]
  %1 = weight \"a\" f32 : f32[4, 6]
  %2 = cast %1 {to = i64} : i64[4, 6]
  %3 = cast %2 {to = f32} : f32[4, 6]
  %4 = transpose %3 {perm = [1, 0]} : f32[6, 4]
  %5 = transpose %4 {perm = [1, 0]} : f32[4, 6]
  %6 = linear %0, %5 : f32[m, 4]
  output \"y\" = %6
}
";
        let mut g = kiln_ir::parse(text).unwrap();
        g.store.insert("a", kiln_ir::TensorData::from_f32(vec![4, 6], &[0.5; 24]));
        let order = g.topo_order().unwrap();
        let plan = Plan::new(&g, &order, 1);
        assert_eq!(plan.folded, [order[5]]);
        assert_eq!(plan.specs.len(), 1);
        assert_eq!(plan.specs[0].how, Impl::Sgemm);
        assert_eq!(plan.specs[0].linear.format, Format::F32);
        for &chain in &order[1..6] {
            let absorbed = matches!(plan.actions.get(&chain), Some(Action::Absorbed));
            assert_eq!(absorbed, chain != order[1], "{:?}: only the chain's ops are absorbed", g.node(chain).op);
        }
        let Err(e) = fold_weights(&g, &order, &plan.folded) else { panic!("a cast to i64 folds") };
        assert!(e.to_string().contains("folding %2 (cast)"), "{e}");
    }

    /// A host line names the host it was written for, and nothing else parses as one.
    #[test]
    fn host_lines_round_trip() {
        for (i8, f32) in [(false, false), (true, false), (false, true), (true, true)] {
            let host = Host { gemm_i8: i8, gemm_f32: f32 };
            assert_eq!(Host::from_line(&host.line()), Some(host));
        }
        for bad in ["", "host", "host gemm_i8=yes gemm_f32=true", "Host { gemm_i8: true, gemm_f32: true }"] {
            assert_eq!(Host::from_line(bad), None, "{bad:?}");
        }
        let x86 = cfg!(target_arch = "x86_64");
        assert_eq!(Host::for_features(true, true), Host { gemm_i8: x86, gemm_f32: x86 });
        assert_eq!(Host::for_features(true, false), Host { gemm_i8: false, gemm_f32: false });
    }

    /// The keys an object's spec list names kernels by are part of the object format:
    /// pinned here, so that nothing (a derived `Debug`, a renamed variant) changes them
    /// silently.
    #[test]
    fn kernel_keys_are_pinned() {
        let linear =
            LinearSpec { bias: true, activation: Activation::Gelu, ..LinearSpec::new(1536, 576, Format::Q4_1) };
        assert_eq!(
            KernelSpec { linear, how: Impl::Jit }.key(),
            "linear k=1536 n=576 format=q4_1 bias=true activation=gelu residual=false impl=jit"
        );
        let int = Format::Int(kiln_ir::IntFormat::new(4, 64, true).unwrap());
        let linear = LinearSpec { residual: true, ..LinearSpec::new(576, 49152, int) };
        assert_eq!(
            KernelSpec { linear, how: Impl::Int8Row }.key(),
            "linear k=576 n=49152 format=int4g64a bias=false activation=none residual=true impl=int8row"
        );
        let names: Vec<&str> = [Impl::Jit, Impl::Int8, Impl::Sgemm, Impl::Int8Row].map(Impl::name).to_vec();
        assert_eq!(names, ["jit", "int8", "sgemm", "int8row"]);
    }

    /// Distinct specs have distinct keys, each one line: over every value of every field
    /// (formats of each family), and over the specs of objects for a small model.
    #[test]
    fn distinct_kernel_specs_have_distinct_keys() {
        let int = |bits, group, asym| Format::Int(kiln_ir::IntFormat::new(bits, group, asym).unwrap());
        let fp8 = |group| Format::Fp8(kiln_ir::Fp8Format::new(group).unwrap());
        let mut formats = Format::ALL.to_vec();
        formats.extend([int(4, 64, true), int(4, 64, false), int(8, 32, false), int(2, 128, true), fp8(32), fp8(576)]);
        let hows = [Impl::Jit, Impl::Int8, Impl::Sgemm, Impl::Int8Row];
        let mut keys: HashMap<String, KernelSpec> = HashMap::new();
        let mut count = 0;
        for format in formats {
            for (k, n) in [(64, 32), (32, 64), (1536, 576), (576, 1536), (576, 576)] {
                for bias in [false, true] {
                    for activation in Activation::ALL {
                        for residual in [false, true] {
                            for how in hows {
                                let linear = LinearSpec { k, n, format, bias, activation, residual };
                                let spec = KernelSpec { linear, how };
                                let key = spec.key();
                                assert!(!key.contains('\n'), "{key:?}");
                                if let Some(other) = keys.insert(key.clone(), spec) {
                                    panic!("{other:?} and {spec:?} share the key `{key}`");
                                }
                                count += 1;
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(keys.len(), count);

        // f32 weights (sgemm), Q4_1 with a bias and GELU (split by columns on more
        // threads), int8 per row with a residual add (per-row int8, or Q8_0), f16 with SiLU.
        let text = "graph g {
  %0 = input \"x\" : f32[m, 64]
  %1 = weight \"w1\" q4_1 : f32[576, 64]
  %2 = weight \"b1\" f32 : f32[576]
  %3 = linear %0, %1, %2 : f32[m, 576]
  %4 = gelu %3 : f32[m, 576]
  %5 = weight \"w2\" int8g576 : f32[64, 576]
  %6 = linear %4, %5 : f32[m, 64]
  %7 = add %6, %0 : f32[m, 64]
  %8 = weight \"w3\" f32 : f32[64, 64]
  %9 = linear %7, %8 : f32[m, 64]
  %10 = silu %9 : f32[m, 64]
  %11 = weight \"w4\" f16 : f32[128, 64]
  %12 = linear %10, %11 : f32[m, 128]
  output \"y\" = %12
}
";
        let mut g = kiln_ir::parse(text).unwrap();
        for activations in [Activations::F32, Activations::Int8, Activations::Int8Row] {
            kiln_ir::set_activations(&mut g, activations);
            let specs = object_specs(&[&g]).unwrap();
            assert!(specs.len() > 4, "{activations:?}: column splits too");
            let text = kernel_specs_text(Host { gemm_i8: true, gemm_f32: true }, &["avx2".into()], &specs);
            let lines: Vec<&str> = text.lines().skip(2).collect();
            let keys: Vec<String> = specs.iter().map(KernelSpec::key).collect();
            assert_eq!(lines, keys, "{activations:?}: a line per kernel, its key");
            let distinct: std::collections::HashSet<&String> = keys.iter().collect();
            assert_eq!(distinct.len(), specs.len(), "{activations:?}: {keys:#?}");
        }
    }
}
