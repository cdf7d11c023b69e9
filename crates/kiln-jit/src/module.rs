//! A small owner of a Cranelift module: define functions with a [`FunctionBuilder`], then
//! either finalize them in memory and call them through typed function pointers whose
//! lifetime is tied to the finalized code (the JIT), or write them to an object file (ahead
//! of time). The emitters are the same for both: they only see a [`CodeModule`].
//!
//! - [`CodeModule`] (building): [`CodeModule::define`] runs an emitter closure on a fresh
//!   `FunctionBuilder`, compiles the function and records its statistics (IR build time,
//!   Cranelift compile time, code size, and the disassembly when asked for);
//! - [`JitModule`] finalizes to [`JitCode`] (immutable, `Send + Sync`): it owns the
//!   executable memory and frees it on drop. [`JitCode::function`] hands out a [`JitFn`]
//!   that borrows the code;
//! - [`ObjectCodeModule`] emits an [`ObjectFile`]: relocatable machine code (ELF on Linux)
//!   whose functions are global symbols under the names they were defined with, for the
//!   system linker.

use cranelift_codegen::Context;
use cranelift_codegen::ir::{AbiParam, Signature, Type, UserFuncName};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{DataDescription, FuncId, Linkage, Module, default_libcall_names};
use cranelift_object::{ObjectBuilder, ObjectModule};
use std::marker::PhantomData;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::JitError;
use crate::isa::HostIsa;

/// Index of a function defined in a [`CodeModule`], valid for the [`JitCode`] or
/// [`ObjectFile`] it becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FunctionId(usize);

/// What compiling one function cost and produced.
#[derive(Clone, Debug)]
pub struct FunctionStats {
    pub name: String,
    /// Time spent in the emitter closure building the IR.
    pub build: Duration,
    /// Time spent in Cranelift (verifier, optimization, lowering, register allocation,
    /// emission).
    pub compile: Duration,
    /// Machine code bytes (including the constant pool).
    pub code_bytes: usize,
    /// Cranelift's disassembly of the final machine code (`ctx.set_disasm(true)`), when the
    /// module was asked to capture it.
    pub disasm: Option<String>,
}

/// A module under construction, for the JIT ([`JitModule`]) or an object file
/// ([`ObjectCodeModule`]).
pub struct CodeModule<M: Module> {
    module: M,
    ctx: Context,
    fctx: FunctionBuilderContext,
    capture_disasm: bool,
    /// `Local` in the JIT; `Export` in object files, for the linker.
    linkage: Linkage,
    functions: Vec<(FuncId, FunctionStats)>,
}

/// A module compiled into this process's memory.
pub type JitModule = CodeModule<JITModule>;

/// A module written to an object file.
pub type ObjectCodeModule = CodeModule<ObjectModule>;

impl<M: Module> CodeModule<M> {
    fn with(module: M, linkage: Linkage) -> CodeModule<M> {
        let ctx = module.make_context();
        CodeModule {
            module,
            ctx,
            fctx: FunctionBuilderContext::new(),
            capture_disasm: false,
            linkage,
            functions: Vec::new(),
        }
    }

    /// Capture the disassembly of every function defined from now on (for tests and for
    /// looking at kernels; costs compile time).
    pub fn set_disasm(&mut self, on: bool) {
        self.capture_disasm = on;
    }

    /// A signature in the host's default calling convention (System V on Linux x86-64,
    /// i.e. `extern "C"`) with the given parameter types and no results.
    pub fn signature(&self, params: &[Type]) -> Signature {
        let mut sig = self.module.make_signature();
        sig.params.extend(params.iter().map(|&t| AbiParam::new(t)));
        sig
    }

    pub fn pointer_type(&self) -> Type {
        self.module.target_config().pointer_type()
    }

    /// Defines function `name` with signature `sig`; `emit` builds its body (it creates and
    /// fills the blocks; sealing and finalizing the builder are done here).
    pub fn define<E>(&mut self, name: &str, sig: Signature, emit: E) -> Result<FunctionId, JitError>
    where
        E: FnOnce(&mut FunctionBuilder<'_>) -> Result<(), JitError>,
    {
        let id = self.module.declare_function(name, self.linkage, &sig).map_err(module_error)?;
        self.module.clear_context(&mut self.ctx);
        self.ctx.func.signature = sig;
        self.ctx.func.name = UserFuncName::user(0, id.as_u32());
        self.ctx.set_disasm(self.capture_disasm);

        let start = Instant::now();
        {
            let mut b = FunctionBuilder::new(&mut self.ctx.func, &mut self.fctx);
            emit(&mut b)?;
            b.seal_all_blocks();
            b.finalize(self.module.target_config());
        }
        let build = start.elapsed();

        let start = Instant::now();
        if let Err(e) = self.module.define_function(id, &mut self.ctx) {
            let why = match e {
                // Name the offending instructions in the printed function.
                cranelift_module::ModuleError::Compilation(c) => {
                    cranelift_codegen::print_errors::pretty_error(&self.ctx.func, c)
                }
                other => module_error(other).to_string(),
            };
            return Err(JitError::Codegen(format!("{name}: {why}")));
        }
        let compile = start.elapsed();

        let compiled = self.ctx.compiled_code().expect("define_function compiled the context");
        let stats = FunctionStats {
            name: name.to_string(),
            build,
            compile,
            code_bytes: compiled.code_buffer().len(),
            disasm: compiled.vcode.clone(),
        };
        self.functions.push((id, stats));
        Ok(FunctionId(self.functions.len() - 1))
    }

    /// Defines `name` as read-only data: the entry address of each of `functions` (null for
    /// `None`), one pointer each (an object file's loader or linker fills them in).
    pub fn define_function_table(&mut self, name: &str, functions: &[Option<FunctionId>]) -> Result<(), JitError> {
        let ptr = self.pointer_type().bytes() as usize;
        let mut data = DataDescription::new();
        // Zeros written out, not `define_zeroinit`: that places the table in `.bss`, where
        // linkers drop its relocations (the entries stayed null in a shared library).
        data.define(vec![0u8; functions.len().max(1) * ptr].into_boxed_slice());
        data.set_align(ptr as u64);
        for (i, f) in functions.iter().enumerate() {
            if let Some(f) = f {
                let func = self.module.declare_func_in_data(self.functions[f.0].0, &mut data);
                data.write_function_addr((i * ptr) as u32, func);
            }
        }
        self.define_data(name, &data)
    }

    /// Defines `name` as read-only data holding `bytes`, at an address that is a multiple of
    /// `align` (a power of two; 8 for a `u64`).
    pub fn define_bytes(&mut self, name: &str, bytes: &[u8], align: u64) -> Result<(), JitError> {
        let mut data = DataDescription::new();
        data.define(bytes.into());
        data.set_align(align);
        self.define_data(name, &data)
    }

    fn define_data(&mut self, name: &str, data: &DataDescription) -> Result<(), JitError> {
        let id = self.module.declare_data(name, self.linkage, false, false).map_err(module_error)?;
        self.module.define_data(id, data).map_err(module_error)
    }

    /// The statistics of a function defined so far.
    pub fn stats(&self, id: FunctionId) -> &FunctionStats {
        &self.functions[id.0].1
    }
}

impl JitModule {
    pub fn new(isa: &HostIsa) -> JitModule {
        let builder = JITBuilder::with_isa(isa.isa_arc(), default_libcall_names());
        CodeModule::with(JITModule::new(builder), Linkage::Local)
    }

    /// Links and makes every defined function executable.
    pub fn finalize(mut self) -> Result<JitCode, JitError> {
        let start = Instant::now();
        self.module.finalize_definitions().map_err(module_error)?;
        let finalize = start.elapsed();
        let functions = self
            .functions
            .into_iter()
            .map(|(id, stats)| (self.module.get_finalized_function(id) as usize, stats))
            .collect();
        Ok(JitCode { module: Mutex::new(Some(self.module)), functions, finalize })
    }
}

impl ObjectCodeModule {
    /// A module for an object file named `name` (recorded in the file), for `isa`'s target
    /// and CPU features.
    pub fn object(isa: &HostIsa, name: &str) -> Result<ObjectCodeModule, JitError> {
        let builder = ObjectBuilder::new(isa.isa_arc(), name, default_libcall_names()).map_err(module_error)?;
        Ok(CodeModule::with(ObjectModule::new(builder), Linkage::Export))
    }

    /// The object file's bytes, and the statistics of each function (by [`FunctionId`]).
    pub fn emit(self) -> Result<ObjectFile, JitError> {
        let bytes = self.module.finish().emit().map_err(|e| JitError::Module(e.to_string()))?;
        Ok(ObjectFile { bytes, functions: self.functions.into_iter().map(|(_, s)| s).collect() })
    }
}

/// A relocatable object file of compiled functions.
pub struct ObjectFile {
    /// The file's bytes (ELF on Linux).
    pub bytes: Vec<u8>,
    /// Per function, by [`FunctionId`]: its statistics; `name` is its symbol.
    pub functions: Vec<FunctionStats>,
}

fn module_error(e: cranelift_module::ModuleError) -> JitError {
    match e {
        cranelift_module::ModuleError::Compilation(c) => JitError::Codegen(c.to_string()),
        other => JitError::Module(other.to_string()),
    }
}

/// Finalized, executable code. Dropping it frees the code memory.
pub struct JitCode {
    // Only touched on drop; the mutex makes `JitCode` `Sync` (`JITModule` is `Send` only).
    module: Mutex<Option<JITModule>>,
    /// (entry address, stats) per function, indexed by `FunctionId`.
    functions: Vec<(usize, FunctionStats)>,
    finalize: Duration,
}

impl JitCode {
    /// Entry address of a function. Valid as long as `self` lives.
    pub fn address(&self, id: FunctionId) -> *const u8 {
        self.functions[id.0].0 as *const u8
    }

    pub fn stats(&self, id: FunctionId) -> &FunctionStats {
        &self.functions[id.0].1
    }

    pub fn all_stats(&self) -> impl Iterator<Item = &FunctionStats> {
        self.functions.iter().map(|(_, s)| s)
    }

    /// Time spent linking and changing page protections.
    pub fn finalize_time(&self) -> Duration {
        self.finalize
    }

    /// The function as a typed pointer `F` (an `extern "C" fn(...)` type).
    ///
    /// # Safety
    /// `F` must be an `extern "C" fn` pointer type whose parameters match the signature
    /// the function was defined with, in number, order and width.
    pub unsafe fn function<F: Copy>(&self, id: FunctionId) -> JitFn<'_, F> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<usize>(),
            "JitCode::function: F must be a function pointer type"
        );
        let addr = self.functions[id.0].0;
        // SAFETY: `F` is a function pointer type (size checked above; signature guaranteed
        // by the caller) and `addr` is the entry of finalized, executable code that lives as
        // long as `self`, which the returned `JitFn` borrows.
        let f = unsafe { std::mem::transmute_copy::<usize, F>(&addr) };
        JitFn { f, _code: PhantomData }
    }
}

impl Drop for JitCode {
    fn drop(&mut self) {
        if let Some(module) = self.module.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            // SAFETY: every pointer handed out by safe code borrows `self` (`JitFn`), so none
            // is alive now; raw `address()` values are documented to die with `self`.
            unsafe { module.free_memory() };
        }
    }
}

/// A typed pointer to a JIT-compiled function, borrowed from its [`JitCode`].
#[derive(Clone, Copy)]
pub struct JitFn<'code, F> {
    f: F,
    _code: PhantomData<&'code JitCode>,
}

impl<F: Copy> JitFn<'_, F> {
    /// The function pointer. Calling it is `unsafe` per its own contract; it must not be
    /// called after the `JitCode` is dropped (the borrow this `JitFn` holds ensures that as
    /// long as the pointer is not copied out of the borrow's scope).
    pub fn get(&self) -> F {
        self.f
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cranelift_codegen::ir::{InstBuilder, types};

    #[test]
    fn define_finalize_call() {
        let isa = HostIsa::native().unwrap();
        let mut m = JitModule::new(&isa);
        m.set_disasm(true);
        let sig = {
            let mut s = m.signature(&[types::I64]);
            s.returns.push(AbiParam::new(types::I64));
            s
        };
        let id = m
            .define("add37", sig, |b| {
                let block = b.create_block();
                b.append_block_params_for_function_params(block);
                b.switch_to_block(block);
                let p = b.block_params(block)[0];
                let r = b.ins().iadd_imm_s(p, 37);
                b.ins().return_(&[r]);
                Ok(())
            })
            .unwrap();
        let code = m.finalize().unwrap();
        let f = unsafe { code.function::<extern "C" fn(i64) -> i64>(id) };
        assert_eq!((f.get())(5), 42);
        let stats = code.stats(id);
        assert!(stats.code_bytes > 0);
        assert!(stats.disasm.as_deref().unwrap().contains("ret"), "{:?}", stats.disasm);
    }
}
