//! Tensors in and out of safetensors files, by name.

use kiln_interp::Value;
use kiln_ir::Graph;
use kiln_rt::io::TensorFile;
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use std::collections::HashMap;
use std::path::Path;

/// Reads a safetensors file's f32 and i64 tensors (see [`kiln_rt::io::decode`]).
pub fn read(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).into_diagnostic().wrap_err_with(|| format!("cannot read {}", path.display()))?;
    kiln_rt::io::decode(&bytes).map_err(|e| miette!("{} is not a valid safetensors file: {e}", path.display()))
}

/// The graph's inputs, taken from `file` by name (other tensors are ignored).
pub fn inputs_from(file: &TensorFile, path: &Path, graph: &Graph) -> Result<HashMap<String, Value>> {
    kiln_rt::io::inputs_from(file, &path.display().to_string(), graph).map_err(|e| match e.help {
        Some(help) => miette!(help = help, "{}", e.message),
        None => miette!("{}", e.message),
    })
}

/// Writes named values to a safetensors file.
pub fn write(path: &Path, values: &[(String, Value)]) -> Result<()> {
    let bytes = kiln_rt::io::encode(values).into_diagnostic()?;
    std::fs::write(path, bytes).into_diagnostic().wrap_err_with(|| format!("cannot write {}", path.display()))
}

/// The number of rows (axis 0) shared by all inputs.
pub fn batch_of(inputs: &HashMap<String, Value>) -> Result<usize> {
    let mut batch = None;
    for (name, v) in inputs {
        let b = v.shape().first().copied().ok_or_else(|| miette!("input `{name}` is a scalar; expected a batch"))?;
        match batch {
            Some(other) if other != b => {
                return Err(miette!("inputs disagree on the batch size: {other} vs {b} (`{name}`)"));
            }
            _ => batch = Some(b),
        }
    }
    batch.ok_or_else(|| miette!("the model has no inputs"))
}
