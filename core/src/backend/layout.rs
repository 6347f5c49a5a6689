use alloc::vec::Vec;

use super::geometry::concat_channels_shape;
use super::{DType, Shape, TensorOps};
use crate::{Error, Result};

/// Nearest upsampling and channel concat/slice (NCHW).
pub trait LayoutOps: TensorOps {
    /// `y[n, c, i, j] = x[n, c, ⌊i/f⌋, ⌊j/f⌋]`, `[n, c, h, w] → [n, c, f·h, f·w]`.
    fn upsample_nearest(x: &Self::Tensor, factor: usize) -> Result<Self::Tensor>;

    /// Backward: `dx[n, c, i, j] = Σ_{u,v < f} g[n, c, f·i + u, f·j + v]`.
    fn upsample_nearest_backward(grad_out: &Self::Tensor, factor: usize) -> Result<Self::Tensor>;

    /// Concatenation along dim 1 of tensors equal in every other dim.
    fn concat_channels(parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    /// Channels `start .. start + len` of `x [n, c, ...]` (the backward of concat).
    fn slice_channels(x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;

    /// The checks every [`LayoutOps::concat_channels`] starts with: at least one part, one
    /// dtype, shapes equal but in dim 1. Returns the output shape and the dtype.
    fn concat_channels_check(op: &'static str, parts: &[&Self::Tensor]) -> Result<(Shape, DType)> {
        let first = parts.first().ok_or(Error::Empty { op })?;
        for p in parts {
            Self::expect_same_dtype(op, first, p)?;
        }
        let shapes: Vec<Shape> = parts.iter().map(|p| Self::shape(p)).collect();
        let refs: Vec<&Shape> = shapes.iter().collect();
        Ok((concat_channels_shape(op, &refs)?, Self::dtype(first)))
    }
}
