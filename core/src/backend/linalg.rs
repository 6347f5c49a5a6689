use super::geometry::{Conv2dParams, Transpose};
use super::{ReduceOps, Shape, TensorOps};
use crate::Result;

/// Batched matrix multiplication.
pub trait MatmulOps: TensorOps {
    /// `op(a) · op(b)` over the last two dims, `[.., m, k] × [.., k, n] → [.., m, n]`,
    /// with `op` the optional transpose; leading dims must be equal.
    fn matmul(a: &Self::Tensor, b: &Self::Tensor, transpose: Transpose) -> Result<Self::Tensor>;
}

/// 2-D convolution (NCHW, cross-correlation as in torch) and its two backward kernels.
pub trait ConvOps: ReduceOps {
    /// `y[n, o, i, j] = b[o] + Σ_{c,u,v} x[n, c, s_h·i + u − p_h, s_w·j + v − p_w]·w[o, c, u, v]`;
    /// `x [n, c_in, h, w]`, `w [c_out, c_in, kh, kw]`, `bias [c_out]`.
    fn conv2d(
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: Option<&Self::Tensor>,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// `∂L/∂x` from `∂L/∂y` (a transposed convolution), for an input of `input_shape`.
    fn conv2d_backward_data(
        grad_out: &Self::Tensor,
        weight: &Self::Tensor,
        input_shape: &Shape,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// `∂L/∂w[o, c, u, v] = Σ_{n,i,j} ∂L/∂y[n, o, i, j]·x[n, c, s_h·i + u − p_h, s_w·j + v − p_w]`.
    fn conv2d_backward_weight(
        x: &Self::Tensor,
        grad_out: &Self::Tensor,
        weight_shape: &Shape,
        params: Conv2dParams,
    ) -> Result<Self::Tensor>;

    /// *Default*: `∂L/∂b[o] = Σ_{n,i,j} ∂L/∂y[n, o, i, j]`, shape `[c_out]`.
    fn conv2d_backward_bias(grad_out: &Self::Tensor) -> Result<Self::Tensor> {
        let s = Self::shape(grad_out);
        s.expect_rank("conv2d_backward_bias", 4)?;
        let c = s.dims()[1];
        let summed = Self::sum_to_shape(grad_out, &Shape::new([1, c, 1, 1]))?;
        Self::reshape(&summed, &Shape::new([c]))
    }
}
