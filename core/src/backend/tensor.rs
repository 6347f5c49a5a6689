use alloc::vec::Vec;

use super::{BackendTypes, DType, Shape};
use crate::{Error, Result};

/// Creation, read-back and metadata: the core set every other op builds on.
pub trait TensorOps: BackendTypes {
    /// The device used when none is named.
    fn default_device() -> Self::Device;

    /// Whether `device` can store and compute `dtype`. Ops check this before launching.
    fn supports_dtype(device: &Self::Device, dtype: DType) -> bool;

    /// *Default*: how products with `dtype` inputs run on `device` (no tensor cores).
    fn half_products(device: &Self::Device, dtype: DType) -> super::HalfProducts {
        let _ = (device, dtype);
        super::HalfProducts::F32Arithmetic
    }

    /// *Default*: where `device`'s tensors live and how much memory that is (host memory).
    fn memory_capacity(device: &Self::Device) -> super::MemoryCapacity {
        let _ = device;
        super::MemoryCapacity::Host
    }

    /// A tensor of `shape` from row-major `data` (rounded to `dtype`).
    fn from_slice(data: &[f32], shape: &Shape, dtype: DType, device: &Self::Device) -> Result<Self::Tensor>;

    /// The elements in row-major order, as `f32`.
    fn to_vec(t: &Self::Tensor) -> Result<Vec<f32>>;

    /// The tensor's shape.
    fn shape(t: &Self::Tensor) -> Shape;

    /// The tensor's storage type.
    fn dtype(t: &Self::Tensor) -> DType;

    /// The tensor's device.
    fn device(t: &Self::Tensor) -> Self::Device;

    /// The same elements viewed with another shape of equal element count.
    fn reshape(t: &Self::Tensor, shape: &Shape) -> Result<Self::Tensor>;

    /// The same values stored as `dtype` (rounded to nearest even).
    fn cast(t: &Self::Tensor, dtype: DType) -> Result<Self::Tensor>;

    /// A tensor of `shape` filled with `value`.
    fn full(shape: &Shape, value: f32, dtype: DType, device: &Self::Device) -> Result<Self::Tensor>;

    /// Standard normals: element `i` is [`crate::rng::normal_at`]`(seed, i)`, whatever the
    /// backend or thread count (up to the last bits of the transcendental functions).
    fn random_normal(shape: &Shape, seed: u64, dtype: DType, device: &Self::Device) -> Result<Self::Tensor>;

    /// Waits until all queued work on `device` has finished (benchmarks).
    fn sync(_device: &Self::Device) -> Result<()> {
        Ok(())
    }

    /// *Default*: zeros of `shape`.
    fn zeros(shape: &Shape, dtype: DType, device: &Self::Device) -> Result<Self::Tensor> {
        Self::full(shape, 0.0, dtype, device)
    }

    /// *Default*: zeros with `t`'s shape, dtype and device.
    fn zeros_like(t: &Self::Tensor) -> Result<Self::Tensor> {
        Self::zeros(&Self::shape(t), Self::dtype(t), &Self::device(t))
    }

    /// *Default*: the single element of a one-element tensor.
    fn item(t: &Self::Tensor) -> Result<f32> {
        let v = Self::to_vec(t)?;
        match v.as_slice() {
            [x] => Ok(*x),
            _ => Err(Error::ShapeMismatch { op: "item", expected: Shape::scalar(), got: Self::shape(t) }),
        }
    }

    /// *Default*: checks that `a` and `b` share a dtype (for binary ops).
    fn expect_same_dtype(op: &'static str, a: &Self::Tensor, b: &Self::Tensor) -> Result<DType> {
        let (da, db) = (Self::dtype(a), Self::dtype(b));
        if da == db { Ok(da) } else { Err(Error::DTypeMismatch { op, expected: da, got: db }) }
    }
}
