//! The C API of native libraries (`kiln compile --emit lib`): create a model, run it on
//! tensors given as plain pointers and shapes, read its outputs, free both. The header
//! `kiln compile` writes beside the library (`C_HEADER`) declares and documents these
//! functions; `examples/c/` shows them in use.
//!
//! Errors never unwind into C: a failing call returns null or -1, and
//! [`kiln_last_error`] describes the last failure on the calling thread.

use crate::{ModelData, Program};
use kiln_exec::Engine;
use kiln_ir::DType;
use kiln_rt::{Tensor, Value};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int};

/// `kiln_dtype` in C.
pub const KILN_F32: c_int = 0;
pub const KILN_I64: c_int = 1;

/// A tensor as C sees it (`kiln_tensor`): row-major, `shape[0..rank]`, elements of `dtype`.
#[repr(C)]
pub struct KilnTensor {
    pub name: *const c_char,
    pub dtype: c_int,
    pub rank: usize,
    pub shape: *const usize,
    pub data: *const std::ffi::c_void,
}

/// A model ready to run (`kiln_model`). The engine borrows the program's graph, which lives
/// behind a raw pointer (never moved, never reborrowed uniquely) and is freed after the
/// engine.
pub struct KilnModel {
    engine: std::mem::ManuallyDrop<Engine<'static>>,
    program: *mut Program,
}

impl Drop for KilnModel {
    fn drop(&mut self) {
        // SAFETY: the engine is dropped once, here, before the program it borrows, which
        // `kiln_create` leaked from a box and nothing else frees.
        unsafe {
            std::mem::ManuallyDrop::drop(&mut self.engine);
            drop(Box::from_raw(self.program));
        }
    }
}

/// The outputs of a run (`kiln_result`), owned until [`kiln_result_free`].
pub struct KilnResult {
    names: Vec<CString>,
    shapes: Vec<Vec<usize>>,
    values: Vec<Value>,
    tensors: Vec<KilnTensor>,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: impl std::fmt::Display) {
    let text = CString::new(message.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = text);
}

/// Runs `f`, turning an error or a panic into the thread's last error and `fallback`.
fn guarded<T>(fallback: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => {
            set_error(message);
            fallback
        }
        Err(_) => {
            set_error("internal error (a panic in kiln's runtime)");
            fallback
        }
    }
}

/// The message of the last failed call on this thread ("" if none). Valid until the next
/// failing call on the thread.
#[unsafe(no_mangle)]
pub extern "C" fn kiln_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Creates the model `data` describes, on `threads` worker threads (0: all cores). Null on
/// failure.
///
/// # Safety
/// `data` must describe a model linked into this program (see [`Program::from_data`]).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_create(data: *const ModelData, threads: c_int) -> *mut KilnModel {
    guarded(std::ptr::null_mut(), || {
        if data.is_null() {
            return Err("kiln_create: null model data".into());
        }
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t if t > 0 => t as usize,
            t => return Err(format!("kiln_create: {t} threads")),
        };
        // SAFETY: the caller's.
        let program = unsafe { Program::from_data(&*data) }.map_err(|e| e.to_string())?;
        let program: *mut Program = Box::into_raw(Box::new(program));
        // SAFETY: `program` is valid until the model frees it, after its engine (`Drop`);
        // only shared references to it are made.
        let shared: &'static Program = unsafe { &*program };
        match shared.engine(shared.graph(), threads) {
            Ok(engine) => {
                let model = KilnModel { engine: std::mem::ManuallyDrop::new(engine), program };
                Ok(Box::into_raw(Box::new(model)))
            }
            Err(e) => {
                // SAFETY: nothing borrows the program any more.
                drop(unsafe { Box::from_raw(program) });
                Err(e.to_string())
            }
        }
    })
}

/// Frees a model (null is ignored).
///
/// # Safety
/// `model` must come from [`kiln_create`] and not be used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_free(model: *mut KilnModel) {
    if !model.is_null() {
        // SAFETY: the caller's.
        drop(unsafe { Box::from_raw(model) });
    }
}

/// Runs the model on `n_inputs` named tensors; on success stores the outputs in `*result`
/// and returns 0, else returns -1.
///
/// # Safety
/// `model` from [`kiln_create`]; `inputs` points at `n_inputs` tensors whose name is a C
/// string and whose `shape` and `data` hold `rank` sizes and their product of elements;
/// `result` is writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_run(
    model: *mut KilnModel,
    inputs: *const KilnTensor,
    n_inputs: usize,
    result: *mut *mut KilnResult,
) -> c_int {
    guarded(-1, || {
        if model.is_null() || result.is_null() || (inputs.is_null() && n_inputs > 0) {
            return Err("kiln_run: a null argument".into());
        }
        // SAFETY: the caller's (a null `inputs` only with no inputs).
        let (model, given) =
            unsafe { (&*model, if n_inputs == 0 { &[][..] } else { std::slice::from_raw_parts(inputs, n_inputs) }) };
        let mut values = HashMap::new();
        for t in given {
            // SAFETY: the caller's (see above).
            let (name, value) = unsafe { input(t) }?;
            values.insert(name, value);
        }
        let file = kiln_rt::io::TensorFile { tensors: values.into_iter().collect(), other: Default::default() };
        let inputs =
            kiln_rt::io::inputs_from(&file, "kiln_run's inputs", model.engine.graph()).map_err(|e| match e.help {
                Some(help) => format!("{} ({help})", e.message),
                None => e.message,
            })?;
        let outputs = model.engine.run(&inputs).map_err(|e| format!("cannot run the model: {e}"))?;
        let mut r = KilnResult { names: vec![], shapes: vec![], values: vec![], tensors: vec![] };
        for (name, value) in outputs {
            r.names.push(CString::new(name).map_err(|e| e.to_string())?);
            r.shapes.push(value.shape().to_vec());
            r.values.push(value);
        }
        for i in 0..r.values.len() {
            let (dtype, data) = match &r.values[i] {
                Value::F32(t) => (KILN_F32, t.data.as_ptr().cast()),
                Value::I64 { data, .. } => (KILN_I64, data.as_ptr().cast()),
            };
            let shape = &r.shapes[i];
            r.tensors.push(KilnTensor {
                name: r.names[i].as_ptr(),
                dtype,
                rank: shape.len(),
                shape: shape.as_ptr(),
                data,
            });
        }
        // SAFETY: the caller's: `result` is writable.
        unsafe { *result = Box::into_raw(Box::new(r)) };
        Ok(0)
    })
}

/// One input tensor, copied.
///
/// # Safety
/// As [`kiln_run`]'s `inputs`.
unsafe fn input(t: &KilnTensor) -> Result<(String, Value), String> {
    if t.name.is_null() || (t.rank > 0 && t.shape.is_null()) {
        return Err("kiln_run: an input without a name or shape".into());
    }
    // SAFETY: the caller's.
    let name = unsafe { CStr::from_ptr(t.name) }.to_string_lossy().into_owned();
    // SAFETY: the caller's (a null `shape` only for rank 0).
    let shape: Vec<usize> =
        if t.rank == 0 { vec![] } else { unsafe { std::slice::from_raw_parts(t.shape, t.rank) }.to_vec() };
    let n =
        shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or(format!("input `{name}`: shape overflows"))?;
    if t.data.is_null() && n > 0 {
        return Err(format!("input `{name}`: null data"));
    }
    let value = match t.dtype {
        // SAFETY: the caller's: `n` elements of the dtype.
        KILN_F32 => Value::F32(Tensor::new(shape, unsafe { copy::<f32>(t.data, n) })),
        // SAFETY: as above.
        KILN_I64 => Value::I64 { shape, data: unsafe { copy::<i64>(t.data, n) } },
        other => return Err(format!("input `{name}`: unknown dtype {other} (KILN_F32 = 0, KILN_I64 = 1)")),
    };
    debug_assert!(matches!(value.dtype(), DType::F32 | DType::I64));
    Ok((name, value))
}

/// # Safety
/// `p` points at `n` readable `T`s (any alignment), or `n == 0`.
unsafe fn copy<T: Copy>(p: *const std::ffi::c_void, n: usize) -> Vec<T> {
    if n == 0 {
        return Vec::new();
    }
    let mut out: Vec<T> = Vec::with_capacity(n);
    // SAFETY: the caller's; the copy is bytewise, so `p` needs no alignment.
    unsafe {
        std::ptr::copy_nonoverlapping(p.cast::<u8>(), out.as_mut_ptr().cast::<u8>(), n * std::mem::size_of::<T>());
        out.set_len(n);
    }
    out
}

/// The number of outputs of a run.
///
/// # Safety
/// `result` from [`kiln_run`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_result_count(result: *const KilnResult) -> usize {
    // SAFETY: the caller's.
    unsafe { result.as_ref() }.map_or(0, |r| r.tensors.len())
}

/// Output `i` of a run (in the model's declaration order), valid until the result is
/// freed; null if out of range.
///
/// # Safety
/// `result` from [`kiln_run`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_result_get(result: *const KilnResult, i: usize) -> *const KilnTensor {
    // SAFETY: the caller's.
    unsafe { result.as_ref() }.and_then(|r| r.tensors.get(i)).map_or(std::ptr::null(), |t| t as *const KilnTensor)
}

/// Frees a run's outputs (null is ignored).
///
/// # Safety
/// `result` from [`kiln_run`], not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn kiln_result_free(result: *mut KilnResult) {
    if !result.is_null() {
        // SAFETY: the caller's.
        drop(unsafe { Box::from_raw(result) });
    }
}
