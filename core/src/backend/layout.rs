use super::TensorOps;
use crate::Result;

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
}
