//! The runtime of kiln's native executables and libraries.
//!
//! `kiln compile --emit exe` writes a model's kernels ahead of time into an object file
//! (`kiln_jit::emit_object`), its artifact beside them as data, and a few lines of C that
//! hand both to this library, which it links into one program with the system's `cc`. The
//! program carries no Cranelift and compiles nothing when it starts: it reads the embedded
//! artifact in place, plans the graph again and binds each kernel the plan needs from the
//! linked table by its spec's key ([`kiln_exec::Engine::with_kernel_table`]), so it runs the very
//! kernels, in the very order, that `kiln run` JIT-compiles, and computes the same bits.
//!
//! - [`ModelData`]: what the generated C passes in (the kernel table, the spec text and
//!   the artifact's bytes, all in the program's read-only data);
//! - [`Program`]: the artifact read from them, and engines built on the linked kernels;
//! - [`cli`]: `main` for executables (`PROGRAM --input IN --output OUT`, generation);
//! - [`capi`]: the C API of libraries (create, run, read outputs, free).

pub mod capi;
pub mod cli;

use kiln_exec::{Activations, Engine, EngineOptions, KernelEntries, LinkedKernels};
use kiln_ir::{Bytes, Graph};
use kiln_rt::artifact::{self, Artifact};
use std::sync::Arc;

pub use kiln_rt::artifact::{GENERATE_IR_KEY, TARGET_KEY};

/// A compiled model as linked into a program: the symbols `kiln_jit::emit_object` writes,
/// gathered by the generated C. The layout is C's (the header `kiln compile --emit lib`
/// writes declares it).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ModelData {
    /// `2 * kernel_count` entry addresses: each kernel's linear function and its epilogue
    /// (null when it has none).
    pub kernels: *const *const u8,
    pub kernel_count: u64,
    /// The kernel spec text (`kiln_exec::engine::kernel_specs_text`), UTF-8, not terminated.
    pub kernel_specs: *const u8,
    pub kernel_specs_len: u64,
    /// The artifact's bytes (a safetensors file); none when the weights are beside the
    /// program.
    pub artifact: *const u8,
    pub artifact_len: u64,
    /// With `--weights-beside`: the artifact's file name, in the executable's directory
    /// (UTF-8, not terminated), and the FNV-1a hash of its header ([`artifact::header_of`]),
    /// which names every tensor's checksum and place. Empty otherwise.
    pub weights_file: *const u8,
    pub weights_file_len: u64,
    pub weights_header_hash: u64,
}

/// Errors of a native program.
#[derive(Debug, thiserror::Error)]
pub enum NativeError {
    #[error("the program's embedded model is damaged: {0}")]
    Damaged(String),
    #[error("{0}")]
    Weights(String),
    #[error(transparent)]
    Artifact(#[from] artifact::ArtifactError),
    #[error(transparent)]
    Exec(#[from] kiln_exec::ExecError),
}

/// The artifact `name` beside the executable, mapped, after checking that its header is the
/// one the program was compiled with (the header names every tensor's checksum and place;
/// the tensors are not hashed at start-up).
fn weights_beside(name: &str, header_hash: u64) -> Result<Artifact, NativeError> {
    use std::io::Read;
    let exe = std::env::current_exe().map_err(|e| NativeError::Weights(format!("cannot find this program: {e}")))?;
    let path = exe.with_file_name(name);
    let fail = |why: String| NativeError::Weights(format!("cannot use the weights {}: {why}", path.display()));
    let mut file = std::fs::File::open(&path).map_err(|e| fail(e.to_string()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| fail(e.to_string()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > 256 << 20 {
        return Err(fail("not a kiln artifact".into()));
    }
    let mut header = len.to_vec();
    header.resize(8 + header_len as usize, 0);
    file.read_exact(&mut header[8..]).map_err(|e| fail(e.to_string()))?;
    if kiln_ir::store::fnv1a(&header) != header_hash {
        return Err(fail("they are not the weights this program was compiled with".into()));
    }
    Ok(artifact::open(&path, false)?)
}

/// A model linked into this program: its artifact, read in place, and its kernels.
pub struct Program {
    pub artifact: Artifact,
    specs: &'static str,
    table: Vec<KernelEntries>,
}

impl Program {
    /// Reads the model `data` describes.
    ///
    /// # Safety
    /// `data` must describe symbols of an object `kiln_jit::emit_object` wrote, linked into
    /// this program (static data, alive as long as the program), for this CPU.
    pub unsafe fn from_data(data: &ModelData) -> Result<Program, NativeError> {
        let damaged = |why: &str| NativeError::Damaged(why.into());
        let len = |n: u64| usize::try_from(n).map_err(|_| damaged("a length does not fit this machine"));
        let (count, specs_len) = (len(data.kernel_count)?, len(data.kernel_specs_len)?);
        let (artifact_len, file_len) = (len(data.artifact_len)?, len(data.weights_file_len)?);
        if data.kernels.is_null()
            || data.kernel_specs.is_null()
            || data.artifact.is_null()
            || data.weights_file.is_null()
        {
            return Err(damaged("a null pointer"));
        }
        // SAFETY: the caller's: static data of these lengths.
        let (raw, specs, bytes, file) = unsafe {
            (
                std::slice::from_raw_parts(data.kernels, 2 * count),
                std::slice::from_raw_parts(data.kernel_specs, specs_len),
                std::slice::from_raw_parts(data.artifact, artifact_len),
                std::slice::from_raw_parts(data.weights_file, file_len),
            )
        };
        let entry = |p: *const u8| (!p.is_null()).then_some(p);
        let table = raw.chunks_exact(2).map(|p| (entry(p[0]), entry(p[1]))).collect();
        let specs = std::str::from_utf8(specs).map_err(|_| damaged("the kernel specs are not UTF-8"))?;
        let artifact = match file.is_empty() {
            true => {
                let static_bytes: &'static [u8] = bytes;
                // The artifact is part of the program's own bytes: not hashed again at
                // start-up.
                artifact::read_bytes(Bytes::new(Arc::new(static_bytes)), "the embedded model", false)?
            }
            false => {
                let name = std::str::from_utf8(file).map_err(|_| damaged("the weights' file name is not UTF-8"))?;
                weights_beside(name, data.weights_header_hash)?
            }
        };
        Ok(Program { artifact, specs, table })
    }

    /// The activations of the program's linears, as one mode ([`Graph::activations`]): what
    /// its IR says, which the kernels were compiled for.
    pub fn activations(&self) -> Activations {
        self.artifact.graph.activations()
    }

    /// The graph `kiln run` runs.
    pub fn graph(&self) -> &Graph {
        &self.artifact.graph
    }

    /// The graph generation runs, when the program holds a language model.
    pub fn generation_graph(&self) -> Option<Result<Graph, NativeError>> {
        self.artifact.metadata.contains_key(GENERATE_IR_KEY).then(|| Ok(self.artifact.graph_at(GENERATE_IR_KEY)?))
    }

    /// An engine for `graph` (this program's, or its generation graph) on `threads` threads,
    /// on the linked kernels.
    pub fn engine<'g>(&self, graph: &'g Graph, threads: usize) -> Result<Engine<'g>, NativeError> {
        let options = EngineOptions::threads(threads);
        let linked = LinkedKernels { specs: self.specs, table: &self.table };
        // SAFETY: `from_data`'s caller vouched for the table: kernels linked into this
        // program, static code that needs no owner.
        Ok(unsafe { Engine::with_kernel_table(graph, options, &linked, Arc::new(())) }?)
    }
}
