//! Run-time values in and out of safetensors files, by name: model inputs and outputs,
//! evaluation data, reference fixtures.

use crate::{Tensor, Value};
use kiln_ir::{Graph, Op};
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{BTreeMap, HashMap};

/// The f32 and i64 tensors of a safetensors file as values, and the dtypes of the others
/// (which no model input can take, but which an error message should name).
#[derive(Debug, Default)]
pub struct TensorFile {
    pub tensors: BTreeMap<String, Value>,
    pub other: BTreeMap<String, Dtype>,
}

/// Decodes a safetensors file's bytes.
pub fn decode(bytes: &[u8]) -> Result<TensorFile, SafeTensorError> {
    let st = SafeTensors::deserialize(bytes)?;
    let mut file = TensorFile::default();
    for (name, view) in st.tensors() {
        let (shape, data) = (view.shape().to_vec(), view.data());
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
                file.other.insert(name, dtype);
                continue;
            }
        };
        file.tensors.insert(name, value);
    }
    Ok(file)
}

/// Encodes named values as a safetensors file.
pub fn encode(values: &[(String, Value)]) -> Result<Vec<u8>, SafeTensorError> {
    let raw: Vec<(&str, Dtype, &[usize], Vec<u8>)> = values
        .iter()
        .map(|(name, v)| match v {
            Value::F32(t) => {
                (name.as_str(), Dtype::F32, &t.shape[..], t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            Value::I64 { shape, data } => {
                (name.as_str(), Dtype::I64, &shape[..], data.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
        })
        .collect();
    let views = raw
        .iter()
        .map(|(n, d, s, b)| Ok((*n, safetensors::tensor::TensorView::new(*d, s.to_vec(), b)?)))
        .collect::<Result<Vec<_>, SafeTensorError>>()?;
    safetensors::serialize(views, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip() {
        let values = vec![
            ("a".to_string(), Value::F32(Tensor::new(vec![2, 3], vec![1.0, -2.5, 0.0, 3.25, f32::MAX, -0.0]))),
            ("ids".to_string(), Value::I64 { shape: vec![3], data: vec![7, -1, i64::MAX] }),
        ];
        let file = decode(&encode(&values).unwrap()).unwrap();
        assert!(file.other.is_empty());
        for (name, v) in &values {
            assert_eq!(&file.tensors[name], v);
        }
        assert!(decode(b"not safetensors").is_err());
    }
}

/// An input file that does not fit the model.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InputError {
    pub message: String,
    /// What would help, when there is something to say.
    pub help: Option<String>,
}

/// The graph's inputs, taken from `file` (named `source` in errors) by name; other
/// tensors are ignored.
pub fn inputs_from(file: &TensorFile, source: &str, graph: &Graph) -> Result<HashMap<String, Value>, InputError> {
    let fail = |message: String, help: Option<String>| Err(InputError { message, help });
    let mut inputs = HashMap::new();
    for id in graph.inputs() {
        let node = graph.node(id);
        let Op::Input { name } = &node.op else { continue };
        let Some(value) = file.tensors.get(name) else {
            if let Some(dtype) = file.other.get(name) {
                return fail(
                    format!("input `{name}` in {source} has dtype {dtype:?}, but the model takes {}", node.ty),
                    None,
                );
            }
            let names: Vec<&str> = file.tensors.keys().chain(file.other.keys()).map(String::as_str).collect();
            return fail(
                format!("{source} has no tensor `{name}`, the model's input {}", node.ty),
                Some(format!("{source} holds: {}", names.join(", "))),
            );
        };
        if value.dtype() != node.ty.dtype {
            return fail(
                format!(
                    "input `{name}` in {source} is {}{:?}, but the model takes {}",
                    value.dtype(),
                    value.shape(),
                    node.ty
                ),
                None,
            );
        }
        inputs.insert(name.clone(), value.clone());
    }
    Ok(inputs)
}
