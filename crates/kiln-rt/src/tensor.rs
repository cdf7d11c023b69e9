//! The interpreter's dense f32 tensor.
//!
//! A [`Tensor`] is a row-major, contiguous buffer of `f32` plus its shape. There is no
//! stride/view machinery on purpose: every kernel in [`crate::kernels`] reads contiguous inputs
//! and returns a fresh contiguous output, which keeps the reference semantics easy to audit.
//! (i64 tensors, e.g. token ids, are handled by the caller.)

/// Number of elements of a tensor of this shape (1 for the empty shape, i.e. a scalar).
#[inline]
pub fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major contiguous strides (in elements) of `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1;
    for (s, &d) in strides.iter_mut().zip(shape).rev() {
        *s = acc;
        acc *= d;
    }
    strides
}

/// A dense, row-major, contiguous f32 tensor.
///
/// Invariant: `data.len() == shape.iter().product()`. A rank-0 tensor (`shape == []`) holds
/// exactly one element.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    /// Wraps `data` with `shape`. Panics if the element count does not match.
    pub fn new(shape: impl Into<Vec<usize>>, data: Vec<f32>) -> Tensor {
        let shape = shape.into();
        assert_eq!(
            numel_of(&shape),
            data.len(),
            "Tensor::new: shape {shape:?} needs {} elements, got {}",
            numel_of(&shape),
            data.len()
        );
        Tensor { shape, data }
    }

    /// A tensor of zeros.
    pub fn zeros(shape: impl Into<Vec<usize>>) -> Tensor {
        Tensor::full(shape, 0.0)
    }

    /// A tensor with every element equal to `v`.
    pub fn full(shape: impl Into<Vec<usize>>, v: f32) -> Tensor {
        let shape = shape.into();
        let n = numel_of(&shape);
        Tensor { shape, data: vec![v; n] }
    }

    /// A rank-0 tensor holding `v`.
    pub fn scalar(v: f32) -> Tensor {
        Tensor { shape: Vec::new(), data: vec![v] }
    }

    /// Number of elements.
    #[inline]
    pub fn numel(&self) -> usize {
        self.data.len()
    }

    /// Number of dimensions.
    #[inline]
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The same data under a new shape (no copy). Panics if the element count differs.
    /// See also [`crate::kernels::reshape`], which borrows and copies.
    pub fn reshaped(self, shape: impl Into<Vec<usize>>) -> Tensor {
        Tensor::new(shape, self.data)
    }
}

/// A run-time value: f32 activations or i64 ids/masks, row-major.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    F32(Tensor),
    I64 { shape: Vec<usize>, data: Vec<i64> },
}

impl Value {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::F32(t) => &t.shape,
            Value::I64 { shape, .. } => shape,
        }
    }
    pub fn dtype(&self) -> kiln_ir::DType {
        match self {
            Value::F32(_) => kiln_ir::DType::F32,
            Value::I64 { .. } => kiln_ir::DType::I64,
        }
    }
    /// Rows `start..end` along axis 0 (a batch slice). Panics if the value is a scalar or
    /// the range is out of bounds.
    pub fn rows(&self, start: usize, end: usize) -> Value {
        let shape = self.shape();
        let row: usize = shape[1..].iter().product();
        let mut new_shape = shape.to_vec();
        new_shape[0] = end - start;
        match self {
            Value::F32(t) => Value::F32(Tensor::new(new_shape, t.data[start * row..end * row].to_vec())),
            Value::I64 { data, .. } => Value::I64 { shape: new_shape, data: data[start * row..end * row].to_vec() },
        }
    }

    /// The f32 tensor, if this is one.
    pub fn as_f32(&self) -> Option<&Tensor> {
        match self {
            Value::F32(t) => Some(t),
            Value::I64 { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constructors() {
        let t = Tensor::new([2, 3], vec![1.0; 6]);
        assert_eq!(t.numel(), 6);
        assert_eq!(t.rank(), 2);
        let s = Tensor::scalar(4.0);
        assert_eq!(s.shape, Vec::<usize>::new());
        assert_eq!(s.numel(), 1);
        let z = Tensor::zeros(vec![0, 5]);
        assert_eq!(z.numel(), 0);
        assert_eq!(t.reshaped([3, 2]).shape, vec![3, 2]);
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
    }

    #[test]
    #[should_panic]
    fn new_checks_len() {
        let _ = Tensor::new([2, 2], vec![0.0; 3]);
    }
}
