use alloc::sync::Arc;
use alloc::vec::Vec;

use super::*;
use crate::backend::geometry::{Conv2dParams, GroupNormParams, Transpose};
use crate::backend::{
    ArithOps, AttentionOps, BackendTypes, BinaryOp, ConvOps, DType, FusedOps, GroupNormGrads, GroupNormOutput,
    LayoutOps, MatmulOps, NormOps, ReduceOps, Shape, TensorOps, UnaryOp,
};
use crate::rng::fill_normal;
use crate::{Error, Result};

/// The reference backend: single-threaded loops over `Vec<f32>`, every dtype emulated by
/// rounding each op's output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefBackend;

/// The reference backend's only device (host memory).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RefDevice;

/// A reference tensor: shared row-major `f32` values (already rounded to `dtype`).
#[derive(Debug, Clone, PartialEq)]
pub struct RefTensor {
    data: Arc<Vec<f32>>,
    shape: Shape,
    dtype: DType,
}

impl RefTensor {
    /// A tensor from owned data; fails if `data.len()` is not `shape`'s element count.
    pub fn new(data: Vec<f32>, shape: Shape, dtype: DType) -> Result<Self> {
        expect_len("RefTensor::new", &data, &shape)?;
        Ok(Self::rounded(data, shape, dtype))
    }

    fn rounded(mut data: Vec<f32>, shape: Shape, dtype: DType) -> Self {
        if dtype != DType::F32 {
            data.iter_mut().for_each(|v| *v = dtype.round(*v));
        }
        Self { data: Arc::new(data), shape, dtype }
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The shape.
    pub fn shape(&self) -> &Shape {
        &self.shape
    }
}

type T = RefTensor;

impl BackendTypes for RefBackend {
    type Device = RefDevice;
    type Tensor = RefTensor;
    fn name() -> &'static str {
        "reference"
    }
}

impl TensorOps for RefBackend {
    fn default_device() -> RefDevice {
        RefDevice
    }
    fn supports_dtype(_: &RefDevice, _: DType) -> bool {
        true
    }
    fn from_slice(data: &[f32], shape: &Shape, dtype: DType, _: &RefDevice) -> Result<T> {
        RefTensor::new(data.to_vec(), shape.clone(), dtype)
    }
    fn to_vec(t: &T) -> Result<Vec<f32>> {
        Ok(t.data.to_vec())
    }
    fn shape(t: &T) -> Shape {
        t.shape.clone()
    }
    fn dtype(t: &T) -> DType {
        t.dtype
    }
    fn device(_: &T) -> RefDevice {
        RefDevice
    }
    fn reshape(t: &T, shape: &Shape) -> Result<T> {
        expect_len("reshape", &t.data, shape)?;
        Ok(RefTensor { data: t.data.clone(), shape: shape.clone(), dtype: t.dtype })
    }
    fn cast(t: &T, dtype: DType) -> Result<T> {
        Ok(RefTensor::rounded(t.data.to_vec(), t.shape.clone(), dtype))
    }
    fn full(shape: &Shape, value: f32, dtype: DType, _: &RefDevice) -> Result<T> {
        Ok(RefTensor::rounded(alloc::vec![value; shape.num_elements()?], shape.clone(), dtype))
    }
    fn random_normal(shape: &Shape, seed: u64, dtype: DType, _: &RefDevice) -> Result<T> {
        let mut data = alloc::vec![0.0f32; shape.num_elements()?];
        fill_normal(seed, 0, &mut data);
        Ok(RefTensor::rounded(data, shape.clone(), dtype))
    }
}

impl ArithOps for RefBackend {
    fn binary(op: BinaryOp, a: &T, b: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("binary", a, b)?;
        let (data, shape) = binary_broadcast(op, &a.data, &a.shape, &b.data, &b.shape)?;
        Ok(RefTensor::rounded(data, shape, dtype))
    }
    fn affine(t: &T, scale: f32, shift: f32) -> Result<T> {
        let data = t.data.iter().map(|&v| scale * v + shift).collect();
        Ok(RefTensor::rounded(data, t.shape.clone(), t.dtype))
    }
    fn unary(op: UnaryOp, t: &T) -> Result<T> {
        let data = t.data.iter().map(|&v| op.apply(v)).collect();
        Ok(RefTensor::rounded(data, t.shape.clone(), t.dtype))
    }
    fn unary_backward(op: UnaryOp, x: &T, grad: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("unary_backward", x, grad)?;
        x.shape.expect_eq("unary_backward", &grad.shape)?;
        let data = x.data.iter().zip(grad.data.iter()).map(|(&v, &g)| g * op.derivative(v)).collect();
        Ok(RefTensor::rounded(data, x.shape.clone(), dtype))
    }
}

impl ReduceOps for RefBackend {
    fn sum(t: &T) -> Result<T> {
        let s: f64 = t.data.iter().map(|&v| v as f64).sum();
        Ok(RefTensor::rounded(alloc::vec![s as f32], Shape::scalar(), t.dtype))
    }
    fn sum_to_shape(t: &T, shape: &Shape) -> Result<T> {
        Ok(RefTensor::rounded(sum_to_shape(&t.data, &t.shape, shape)?, shape.clone(), t.dtype))
    }
    fn softmax_last(t: &T) -> Result<T> {
        Ok(RefTensor::rounded(softmax_last(&t.data, &t.shape)?, t.shape.clone(), t.dtype))
    }
    fn softmax_last_backward(y: &T, grad: &T) -> Result<T> {
        let dtype = Self::expect_same_dtype("softmax_last_backward", y, grad)?;
        y.shape.expect_eq("softmax_last_backward", &grad.shape)?;
        Ok(RefTensor::rounded(softmax_last_backward(&y.data, &grad.data, &y.shape)?, y.shape.clone(), dtype))
    }
}

impl MatmulOps for RefBackend {
    fn matmul(a: &T, b: &T, transpose: Transpose) -> Result<T> {
        let dtype = Self::expect_same_dtype("matmul", a, b)?;
        let (data, shape) = matmul(&a.data, &a.shape, &b.data, &b.shape, transpose)?;
        Ok(RefTensor::rounded(data, shape, dtype))
    }
}

impl ConvOps for RefBackend {
    fn conv2d(x: &T, weight: &T, bias: Option<&T>, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d", x, weight)?;
        if let Some(b) = bias {
            Self::expect_same_dtype("conv2d", x, b)?;
        }
        let (data, shape) = conv2d(&x.data, &x.shape, &weight.data, &weight.shape, bias.map(|b| b.data()), params)?;
        Ok(RefTensor::rounded(data, shape, dtype))
    }
    fn conv2d_backward_data(grad_out: &T, weight: &T, input_shape: &Shape, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d_backward_data", grad_out, weight)?;
        let data =
            conv2d_backward_data(&grad_out.data, &grad_out.shape, &weight.data, &weight.shape, input_shape, params)?;
        Ok(RefTensor::rounded(data, input_shape.clone(), dtype))
    }
    fn conv2d_backward_weight(x: &T, grad_out: &T, weight_shape: &Shape, params: Conv2dParams) -> Result<T> {
        let dtype = Self::expect_same_dtype("conv2d_backward_weight", x, grad_out)?;
        let data = conv2d_backward_weight(&x.data, &x.shape, &grad_out.data, &grad_out.shape, weight_shape, params)?;
        Ok(RefTensor::rounded(data, weight_shape.clone(), dtype))
    }
}

impl NormOps for RefBackend {
    fn group_norm(x: &T, gamma: &T, beta: &T, params: GroupNormParams) -> Result<GroupNormOutput<T>> {
        let dtype = Self::expect_same_dtype("group_norm", x, gamma)?;
        Self::expect_same_dtype("group_norm", x, beta)?;
        crate::backend::geometry::GroupNormGeometry::new("group_norm", &x.shape, &gamma.shape, &beta.shape, params)?;
        let (y, mean, rstd) = group_norm(&x.data, &x.shape, &gamma.data, &beta.data, params)?;
        let stats = Shape::new([x.shape.dims()[0], params.groups]);
        Ok(GroupNormOutput {
            output: RefTensor::rounded(y, x.shape.clone(), dtype),
            // Statistics stay in f32 whatever the storage type (as torch's autocast does).
            mean: RefTensor::rounded(mean, stats.clone(), DType::F32),
            rstd: RefTensor::rounded(rstd, stats, DType::F32),
        })
    }
    fn group_norm_backward(
        x: &T,
        gamma: &T,
        stats: &GroupNormOutput<T>,
        grad_out: &T,
        params: GroupNormParams,
    ) -> Result<GroupNormGrads<T>> {
        let dtype = Self::expect_same_dtype("group_norm_backward", x, gamma)?;
        Self::expect_same_dtype("group_norm_backward", x, grad_out)?;
        crate::backend::geometry::GroupNormGeometry::new(
            "group_norm_backward",
            &x.shape,
            &gamma.shape,
            &gamma.shape,
            params,
        )?;
        let (dx, dg, db) = group_norm_backward(
            &x.data,
            &x.shape,
            &gamma.data,
            &stats.mean.data,
            &stats.rstd.data,
            &grad_out.data,
            params,
        )?;
        Ok(GroupNormGrads {
            input: RefTensor::rounded(dx, x.shape.clone(), dtype),
            gamma: RefTensor::rounded(dg, gamma.shape.clone(), dtype),
            beta: RefTensor::rounded(db, gamma.shape.clone(), dtype),
        })
    }
}

impl LayoutOps for RefBackend {
    fn permute(x: &T, axes: &[usize]) -> Result<T> {
        let (data, shape) = super::layout::permute(&x.data, &x.shape, axes)?;
        Ok(RefTensor::rounded(data, shape, x.dtype))
    }
    fn upsample_nearest(x: &T, factor: usize) -> Result<T> {
        let (data, shape) = upsample_nearest(&x.data, &x.shape, factor)?;
        Ok(RefTensor::rounded(data, shape, x.dtype))
    }
    fn upsample_nearest_backward(grad_out: &T, factor: usize) -> Result<T> {
        let (data, shape) = upsample_nearest_backward(&grad_out.data, &grad_out.shape, factor)?;
        Ok(RefTensor::rounded(data, shape, grad_out.dtype))
    }
    fn concat_channels(parts: &[&T]) -> Result<T> {
        let first = parts.first().ok_or(Error::Empty { op: "concat_channels" })?;
        for p in parts {
            Self::expect_same_dtype("concat_channels", first, p)?;
        }
        let views: Vec<(&[f32], &Shape)> = parts.iter().map(|p| (p.data(), &p.shape)).collect();
        let (data, shape) = concat_channels(&views)?;
        Ok(RefTensor::rounded(data, shape, first.dtype))
    }
    fn slice_channels(x: &T, start: usize, len: usize) -> Result<T> {
        let (data, shape) = slice_channels(&x.data, &x.shape, start, len)?;
        Ok(RefTensor::rounded(data, shape, x.dtype))
    }
}

impl FusedOps for RefBackend {}

impl AttentionOps for RefBackend {}

/// The definition: upsample, then convolve.
impl crate::backend::UpsampleConvOps for RefBackend {}
