//! The tensor handle: a contiguous device buffer with its shape and storage type.

use std::fmt;

use cubecl::Runtime;
use cubecl::server::Handle;
use lisa_core::backend::{DType, Shape};

use crate::device::CubeDevice;

/// A contiguous row-major tensor on a cubecl device. Cloning shares the buffer; no op
/// writes into a buffer it did not allocate, so shared buffers never change.
pub struct CubeTensor<R: Runtime> {
    /// The buffer (at least one element long, even for empty tensors).
    pub handle: Handle,
    /// The logical shape.
    pub shape: Shape,
    /// The storage type.
    pub dtype: DType,
    /// Where the buffer lives.
    pub device: CubeDevice<R>,
}

impl<R: Runtime> CubeTensor<R> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.dims().iter().product()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<R: Runtime> Clone for CubeTensor<R> {
    fn clone(&self) -> Self {
        Self { handle: self.handle.clone(), shape: self.shape.clone(), dtype: self.dtype, device: self.device.clone() }
    }
}

impl<R: Runtime> fmt::Debug for CubeTensor<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CubeTensor({}, {}, {:?})", self.shape, self.dtype, self.device)
    }
}

/// `data` encoded as little-endian `dtype` bytes (round to nearest even).
pub fn encode(data: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => data.iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        DType::BF16 => data.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect(),
    }
}

/// The first `len` values of `bytes`, decoded from `dtype`.
pub fn decode(bytes: &[u8], dtype: DType, len: usize) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes.chunks_exact(4).take(len).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        DType::F16 => {
            bytes.chunks_exact(2).take(len).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        DType::BF16 => {
            bytes.chunks_exact(2).take(len).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
    }
}
