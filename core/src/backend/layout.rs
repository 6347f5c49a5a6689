use alloc::vec::Vec;

use super::geometry::{concat_channels_shape, permute_shape};
use super::{DType, Shape, TensorOps};
use crate::{Error, Result};

/// Nearest upsampling, channel concat/slice (NCHW), and axis permutation.
pub trait LayoutOps: TensorOps {
    /// `y[i_0, …, i_{r−1}] = x[j]` with `j[axes[k]] = i_k`: `y.dims[k] = x.dims[axes[k]]`
    /// (torch's `permute`), materialised row-major. Backward: the inverse permutation
    /// ([`super::geometry::inverse_permutation`]).
    fn permute(x: &Self::Tensor, axes: &[usize]) -> Result<Self::Tensor>;

    /// *Default*: elements `start .. start + len` of `axis` (torch's `narrow`), as a
    /// [`LayoutOps::slice_channels`] of the `[before, dim, after]` view.
    fn narrow(x: &Self::Tensor, axis: usize, start: usize, len: usize) -> Result<Self::Tensor> {
        let shape = Self::shape(x);
        let (view, mut dims) = axis_view("narrow", &shape, axis)?;
        let part = Self::slice_channels(&Self::reshape(x, &view)?, start, len)?;
        dims[axis] = len;
        Self::reshape(&part, &Shape::new(dims))
    }

    /// *Default*: concatenation along `axis` of tensors equal in every other dim (torch's
    /// `cat`), as a [`LayoutOps::concat_channels`] of `[before, dim, after]` views.
    fn concat(parts: &[&Self::Tensor], axis: usize) -> Result<Self::Tensor> {
        const OP: &str = "concat";
        let first = parts.first().ok_or(Error::Empty { op: OP })?;
        let (_, mut dims) = axis_view(OP, &Self::shape(first), axis)?;
        let mut views = Vec::with_capacity(parts.len());
        let mut total = 0usize;
        for p in parts {
            let (view, d) = axis_view(OP, &Self::shape(p), axis)?;
            if d.len() != dims.len() {
                return Err(Error::ShapeMismatch { op: OP, expected: Self::shape(first), got: Self::shape(p) });
            }
            total += d[axis];
            views.push(Self::reshape(p, &view)?);
        }
        let refs: Vec<&Self::Tensor> = views.iter().collect();
        let joined = Self::concat_channels(&refs)?;
        dims[axis] = total;
        Self::reshape(&joined, &Shape::new(dims))
    }

    /// `y[n, c, i, j] = x[n, c, ⌊i/f⌋, ⌊j/f⌋]`, `[n, c, h, w] → [n, c, f·h, f·w]`.
    fn upsample_nearest(x: &Self::Tensor, factor: usize) -> Result<Self::Tensor>;

    /// Backward: `dx[n, c, i, j] = Σ_{u,v < f} g[n, c, f·i + u, f·j + v]`.
    fn upsample_nearest_backward(grad_out: &Self::Tensor, factor: usize) -> Result<Self::Tensor>;

    /// Concatenation along dim 1 of tensors equal in every other dim.
    fn concat_channels(parts: &[&Self::Tensor]) -> Result<Self::Tensor>;

    /// Channels `start .. start + len` of `x [n, c, ...]` (the backward of concat).
    fn slice_channels(x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;

    /// *Default*: zero padding of the last two dims of `x [.., h, w]` by `[top, bottom, left,
    /// right]` (torch's `F.pad(x, (left, right, top, bottom))`), as concatenations with
    /// zeros. Its backward is a [`LayoutOps::narrow`] of each of the two dims.
    fn pad_spatial(x: &Self::Tensor, [top, bottom, left, right]: [usize; 4]) -> Result<Self::Tensor> {
        const OP: &str = "pad_spatial";
        let shape = Self::shape(x);
        let r = shape.rank();
        if r < 2 {
            return Err(Error::invalid(OP, alloc::format!("padding needs [.., h, w], got {shape}")));
        }
        let (dtype, device) = (Self::dtype(x), Self::device(x));
        let mut out = x.clone();
        for (axis, before, after) in [(r - 2, top, bottom), (r - 1, left, right)] {
            if before == 0 && after == 0 {
                continue;
            }
            let zeros = |n: usize, like: &Self::Tensor| -> Result<Option<Self::Tensor>> {
                if n == 0 {
                    return Ok(None);
                }
                let mut d = Self::shape(like).dims().to_vec();
                d[axis] = n;
                Self::zeros(&Shape::new(d), dtype, &device).map(Some)
            };
            let (b, a) = (zeros(before, &out)?, zeros(after, &out)?);
            let parts: Vec<&Self::Tensor> = b.iter().chain(core::iter::once(&out)).chain(a.iter()).collect();
            out = Self::concat(&parts, axis)?;
        }
        Ok(out)
    }

    /// The checks every [`LayoutOps::permute`] starts with: `axes` a permutation of the
    /// dims. Returns the output shape.
    fn permute_check(op: &'static str, x: &Self::Tensor, axes: &[usize]) -> Result<Shape> {
        permute_shape(op, &Self::shape(x), axes)
    }

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

/// `shape` viewed as `[before, dims[axis], after]` (the products of the dims around `axis`),
/// and the dims themselves.
fn axis_view(op: &'static str, shape: &Shape, axis: usize) -> Result<(Shape, Vec<usize>)> {
    let dims = shape.dims().to_vec();
    if axis >= dims.len() {
        return Err(Error::invalid(op, alloc::format!("axis {axis} out of range for {shape}")));
    }
    let before: usize = dims[..axis].iter().product();
    let after: usize = dims[axis + 1..].iter().product();
    Ok((Shape::new([before, dims[axis], after]), dims))
}
