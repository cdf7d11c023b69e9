//! The engine's kernels, compiled: at load time into the JIT ([`compile`]), or ahead of
//! time into an object file ([`emit_object`]) that a native program links and binds with
//! [`Engine::with_kernel_table`]. Both define the same functions for the same kernel specs
//! ([`emit_kernels`]), so an executable computes the JIT's bits. The engine itself (the
//! fusion plan, weight packing and the loop over the graph) is `kiln-exec`'s.

use crate::JitError;
use crate::epilogue::{EpilogueSpec, emit_epilogue};
use crate::isa::HostIsa;
use crate::linear::{LinearTiles, emit_linear};
use crate::linear_i8::{LinearI8Spec, LinearI8Tiles, emit_linear_i8};
use crate::module::{CodeModule, FunctionId, JitModule, ObjectCodeModule, ObjectFile};
use kiln_exec::engine::{Code, I8_PANEL, KernelEntries, KernelSpec, kernel_specs_text, object_specs};
use kiln_exec::{Engine, EngineOptions, Host, Impl};
use kiln_ir::{Graph, NodeId};
use kiln_rt::Value;
use kiln_rt::eval::Snapshot;
use std::collections::HashMap;
use std::sync::Arc;

/// Plans `graph` for `options`, JIT-compiles one kernel per distinct linear spec for this
/// CPU, and builds the engine on them (see [`kiln_exec::engine`]).
pub fn compile(graph: &Graph, options: EngineOptions) -> Result<Engine<'_>, JitError> {
    let kernels = |specs: &[KernelSpec], host: Host| -> Result<(Vec<KernelEntries>, Code), JitError> {
        let mut module = JitModule::new(&HostIsa::native()?);
        let ids = emit_kernels(&mut module, "", specs, host)?;
        let code = Arc::new(module.finalize()?);
        let entries = ids.iter().map(|(l, e)| (l.map(|f| code.address(f)), e.map(|f| code.address(f)))).collect();
        Ok((entries, code))
    };
    // SAFETY: `emit_kernels` defines, for each spec and `host`, the functions the engine
    // calls, in the module whose code is handed to the engine to keep alive.
    unsafe { Engine::with_kernels(graph, options, kernels) }
}

/// Compiles `graph` on `threads` threads and runs it once, keeping its values; with `base`
/// (the snapshot of a run on the same inputs of a graph that differs only in the weights
/// listed), reruns only what those weights reach ([`Engine::rerun`]). What probes of a
/// model that changes a few weights at a time run.
pub fn run_keeping(
    graph: &Graph,
    threads: usize,
    inputs: &HashMap<String, Value>,
    base: Option<(&Snapshot, &[NodeId])>,
) -> Result<(Vec<(String, Value)>, Snapshot), String> {
    let engine = compile(graph, EngineOptions::threads(threads)).map_err(|e| e.to_string())?;
    match base {
        Some((base, changed)) => engine.rerun(inputs, base, changed),
        None => engine.run_keeping(inputs),
    }
    .map_err(|e| e.to_string())
}

/// The kernels [`Engine`]s for `graphs` (the activations their linears take) would compile, for every thread
/// count in [`kiln_exec::AOT_THREADS`] ([`object_specs`]), written to an object file for
/// `isa`: the same functions (see [`emit_kernels`]), named with `prefix`, for the GEMMs a
/// CPU with `isa`'s features runs ([`Host::for_features`]; they decide which epilogues
/// exist). Beside them, for
/// [`Engine::with_kernel_table`]: `{prefix}kernels`, two pointers per kernel (its linear
/// function and its epilogue, null when it has none); `{prefix}kernel_count`, a
/// little-endian `u64`; and `{prefix}kernel_specs` (`{prefix}kernel_specs_len` bytes, a
/// `u64`), the text of [`kernel_specs_text`] (with the CPU features `isa` lets the code use,
/// which the program checks for when it starts). Each `(name, bytes)` of `data` becomes
/// `{prefix}{name}`, 64-byte aligned, with its length in `{prefix}{name}_len`.
pub fn emit_object(
    graphs: &[&Graph],
    isa: &HostIsa,
    prefix: &str,
    data: &[(&str, &[u8])],
) -> Result<ObjectFile, JitError> {
    let specs = object_specs(graphs)?;
    let features = isa.features();
    let host = Host::for_features(features.avx2, features.fma);
    let mut module = ObjectCodeModule::object(isa, prefix)?;
    let ids = emit_kernels(&mut module, prefix, &specs, host)?;
    let table: Vec<Option<FunctionId>> = ids.iter().flat_map(|&(l, e)| [l, e]).collect();
    module.define_function_table(&format!("{prefix}kernels"), &table)?;
    module.define_bytes(&format!("{prefix}kernel_count"), &(ids.len() as u64).to_le_bytes(), 8)?;
    let text = kernel_specs_text(host, &isa.required_features(), &specs);
    let data = [("kernel_specs", text.as_bytes())].into_iter().chain(data.iter().copied());
    for (name, bytes) in data {
        module.define_bytes(&format!("{prefix}{name}"), bytes, 64)?;
        module.define_bytes(&format!("{prefix}{name}_len"), &(bytes.len() as u64).to_le_bytes(), 8)?;
    }
    module.emit()
}

/// A kernel's emitted functions: the linear kernel, and the epilogue after a GEMM.
type KernelFunctions = (Option<FunctionId>, Option<FunctionId>);

/// Defines the functions of each kernel of `specs` in `module`, in order: the linear kernel
/// (`{prefix}linear{i}`; emitted kernels only) and the epilogue (`{prefix}epilogue{i}`)
/// where one runs after a GEMM ([`Host::gemm`]) and is not the identity. The JIT and object
/// files emit the same functions under the same names.
fn emit_kernels<M: cranelift_module::Module>(
    module: &mut CodeModule<M>,
    prefix: &str,
    specs: &[KernelSpec],
    host: Host,
) -> Result<Vec<KernelFunctions>, JitError> {
    let mut ids = Vec::with_capacity(specs.len());
    for (i, &KernelSpec { linear: spec, how }) in specs.iter().enumerate() {
        let name = format!("{prefix}linear{i}");
        let epilogue =
            EpilogueSpec { n: spec.n, bias: spec.bias, activation: spec.activation, residual: spec.residual };
        let after_gemm = match host.gemm(&spec, how) && !epilogue.is_identity() {
            true => Some(emit_epilogue(module, &format!("{prefix}epilogue{i}"), &epilogue)?),
            false => None,
        };
        let linear = match how {
            Impl::Int8 => {
                let i8spec = LinearI8Spec::from_linear(&spec).expect("int8 formats").packed(I8_PANEL);
                Some(emit_linear_i8(module, &name, &i8spec, &LinearI8Tiles::default())?)
            }
            Impl::Jit => Some(emit_linear(module, &name, &spec, &LinearTiles::for_format(spec.format))?),
            Impl::Sgemm | Impl::Int8Row => None,
        };
        ids.push((linear, after_gemm));
    }
    Ok(ids)
}
