//! Tensors in and out of safetensors files, by name.

use kiln_interp::{Tensor, Value};
use kiln_ir::{Graph, Op};
use miette::{IntoDiagnostic, Result, WrapErr, miette};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Every f32 and i64 tensor of a safetensors file (other dtypes are listed as unusable).
pub struct TensorFile {
    pub tensors: BTreeMap<String, Value>,
    pub other: BTreeMap<String, Dtype>,
}

pub fn read(path: &Path) -> Result<TensorFile> {
    let bytes = std::fs::read(path).into_diagnostic().wrap_err_with(|| format!("cannot read {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| miette!("{} is not a valid safetensors file: {e}", path.display()))?;
    let mut tensors = BTreeMap::new();
    let mut other = BTreeMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        let data = view.data();
        let value = match view.dtype() {
            Dtype::F32 => Value::F32(Tensor::new(
                shape,
                data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            )),
            Dtype::I64 => Value::I64 {
                shape,
                data: data.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect(),
            },
            dtype => {
                other.insert(name, dtype);
                continue;
            }
        };
        tensors.insert(name, value);
    }
    Ok(TensorFile { tensors, other })
}

/// The graph's inputs, taken from `file` by name (other tensors are ignored).
pub fn inputs_from(file: &TensorFile, path: &Path, graph: &Graph) -> Result<HashMap<String, Value>> {
    let mut inputs = HashMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let Op::Input { name } = &node.op else { continue };
        let value = match file.tensors.get(name) {
            Some(v) => v,
            None => {
                if let Some(dtype) = file.other.get(name) {
                    return Err(miette!(
                        "input `{name}` in {} has dtype {dtype:?}, but the model takes {}",
                        path.display(),
                        node.ty
                    ));
                }
                let names: Vec<&str> = file.tensors.keys().chain(file.other.keys()).map(String::as_str).collect();
                return Err(miette!(
                    help = format!("the file holds: {}", names.join(", ")),
                    "{} has no tensor `{name}`, the model's input {}",
                    path.display(),
                    node.ty
                ));
            }
        };
        if value.dtype() != node.ty.dtype {
            return Err(miette!(
                "input `{name}` in {} is {}{:?}, but the model takes {}",
                path.display(),
                value.dtype(),
                value.shape(),
                node.ty
            ));
        }
        inputs.insert(name.clone(), value.clone());
    }
    Ok(inputs)
}

/// Writes named values to a safetensors file.
pub fn write(path: &Path, values: &[(String, Value)]) -> Result<()> {
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = values
        .iter()
        .map(|(name, v)| match v {
            Value::F32(t) => {
                (name.clone(), Dtype::F32, t.shape.clone(), t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            Value::I64 { shape, data } => {
                (name.clone(), Dtype::I64, shape.clone(), data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(n, d, s, b)| Ok((n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).into_diagnostic()?)))
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .into_diagnostic()
        .wrap_err_with(|| format!("cannot write {}", path.display()))
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
