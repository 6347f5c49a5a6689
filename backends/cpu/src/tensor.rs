use std::borrow::Cow;
use std::sync::Arc;

use half::{bf16, f16};
use lisa_core::backend::{DType, Shape};
use lisa_core::{Error, Result};

/// Storage of one tensor. `f16`/`bf16` are stored as such (half the memory) and widened
/// to `f32` for compute.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Storage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

/// A CPU tensor: shared storage (cheap to clone) and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct CpuTensor {
    pub(crate) storage: Arc<Storage>,
    pub(crate) shape: Shape,
}

impl CpuTensor {
    /// A tensor from `f32` values, stored as `dtype`; checks the length against `shape`.
    pub fn from_f32(data: Vec<f32>, shape: Shape, dtype: DType) -> Result<Self> {
        let n = shape.num_elements()?;
        if data.len() != n {
            return Err(Error::LengthMismatch { op: "CpuTensor::from_f32", expected: n, got: data.len() });
        }
        Ok(Self::store(data, shape, dtype))
    }

    /// Stores `data` (already of `shape`'s length) as `dtype`.
    pub(crate) fn store(data: Vec<f32>, shape: Shape, dtype: DType) -> Self {
        let storage = match dtype {
            DType::F32 => Storage::F32(data),
            DType::F16 => Storage::F16(data.iter().map(|&v| f16::from_f32(v)).collect()),
            DType::BF16 => Storage::BF16(data.iter().map(|&v| bf16::from_f32(v)).collect()),
        };
        Self { storage: Arc::new(storage), shape }
    }

    /// The storage dtype.
    pub fn dtype(&self) -> DType {
        match *self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
        }
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        match &*self.storage {
            Storage::F32(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The values as `f32`: borrowed for `f32` storage, widened otherwise.
    pub fn values(&self) -> Cow<'_, [f32]> {
        match &*self.storage {
            Storage::F32(v) => Cow::Borrowed(v),
            Storage::F16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
            Storage::BF16(v) => Cow::Owned(v.iter().map(|x| x.to_f32()).collect()),
        }
    }

    /// The values as an owned `f32` vector, without copying when this is the only handle to
    /// `f32` storage (used by in-place updates).
    pub(crate) fn into_values(self) -> Vec<f32> {
        match Arc::try_unwrap(self.storage) {
            Ok(Storage::F32(v)) => v,
            Ok(other) => CpuTensor { storage: Arc::new(other), shape: self.shape }.values().into_owned(),
            Err(shared) => CpuTensor { storage: shared, shape: self.shape }.values().into_owned(),
        }
    }
}
